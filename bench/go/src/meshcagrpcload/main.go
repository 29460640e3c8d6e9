// meshcagrpcload is a second, independent load client for meshca's Certify
// (io.linkerd.proxy.identity.Identity/Certify), written with grpc-go rather than
// our own tonic stack, so that the benchmark also measures meshca against another
// HTTP/2 and gRPC implementation: grpc-go's own framing, window updates and pings,
// with default settings over TLS 1.3. It generates nothing itself: the requests are
// the pre-built CertifyRequest messages that `meshca-load --write-requests FILE`
// writes (4-byte big-endian length, then the protobuf bytes), sent as they are
// through a raw codec, so no generated protobuf code is needed. A response counts as
// served when its first field is field 1 (the leaf certificate).
//
// Steady mode (default): -conns connections, each with -streams calls in flight
// (closed loop; default 1, as a proxy makes them), measured for -duration after
// -warmup; with -server-pid, the server's CPU time over the window per certificate.
// Herd mode (-herd N): N proxies start within -spread seconds, each dials its own
// connection, asks once
// (retrying on ResourceExhausted after the server's grpc-retry-pushback-ms plus up to
// 50% jitter, at most 50 times; any other error, a failed dial included, fails the
// proxy) and closes it.
//
// bench/grpc-go.sh builds it offline in GOPATH mode against Debian's
// golang-google-grpc-dev (GOPATH=bench/go:/usr/share/gocode, GO111MODULE=off) into
// target/bench-go/meshcagrpcload; bench/run.sh runs it beside meshca-load.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"math"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	method      = "/io.linkerd.proxy.identity.Identity/Certify"
	callTimeout = 30 * time.Second
	maxRetries  = 50
	// Key in errors_by_code for an OK response without a leaf certificate first.
	noLeaf = "EmptyLeaf"
)

// rawCodec sends a []byte as the message and keeps the response's bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return v.([]byte), nil }
func (rawCodec) Name() string                          { return "proto" }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

// served: a CertifyResponse whose first field is field 1, length-delimited
// (tag byte 0x0a): leaf_certificate, present and so non-empty.
func served(resp []byte) bool { return len(resp) > 0 && resp[0] == 0x0a }

// certify makes one call; its outcome is "" when served, else the gRPC code's name
// (or noLeaf), and the pushback trailer in ms (-1 if absent).
func certify(conn *grpc.ClientConn, req []byte) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	var resp []byte
	var trailer metadata.MD
	err := conn.Invoke(ctx, method, req, &resp, grpc.ForceCodec(rawCodec{}), grpc.Trailer(&trailer))
	if err != nil {
		pushback := -1
		if v := trailer.Get("grpc-retry-pushback-ms"); len(v) > 0 {
			if ms, e := strconv.Atoi(v[0]); e == nil {
				pushback = ms
			}
		}
		return status.Code(err).String(), pushback
	}
	if !served(resp) {
		return noLeaf, -1
	}
	return "", -1
}

// readRequests reads the pool: repeated 4-byte big-endian length + message.
func readRequests(path string) ([][]byte, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var pool [][]byte
	for len(data) > 0 {
		if len(data) < 4 || uint64(len(data)-4) < uint64(binary.BigEndian.Uint32(data)) {
			return nil, fmt.Errorf("%s: truncated after %d requests", path, len(pool))
		}
		n := binary.BigEndian.Uint32(data)
		pool = append(pool, data[4:4+n])
		data = data[4+n:]
	}
	if len(pool) == 0 {
		return nil, fmt.Errorf("%s: no requests", path)
	}
	return pool, nil
}

// quantileMs: value at quantile q of sorted latencies, in ms (nearest rank).
func quantileMs(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(q * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	} else if rank > len(sorted) {
		rank = len(sorted)
	}
	return float64(sorted[rank-1].Microseconds()) / 1000
}

type config struct {
	addr     string
	creds    credentials.TransportCredentials
	pool     [][]byte
	conns    int
	streams  int
	pid      int
	warmup   float64
	duration float64
	herd     int
	spread   float64
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// cpuSeconds: utime + stime of process pid so far, from /proc/PID/stat (USER_HZ 100);
// -1 when it cannot be read.
func cpuSeconds(pid int) float64 {
	data, err := ioutil.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	rest := string(data)
	rest = rest[strings.LastIndex(rest, ") ")+2:]
	fields := strings.Fields(rest)
	if len(fields) < 13 {
		return -1
	}
	utime, e1 := strconv.ParseFloat(fields[11], 64)
	stime, e2 := strconv.ParseFloat(fields[12], 64)
	if e1 != nil || e2 != nil {
		return -1
	}
	return (utime + stime) / 100
}

// steady: each connection c.streams calls at a time, the pool walked round-robin.
func steady(c config) (map[string]interface{}, error) {
	conns := make([]*grpc.ClientConn, c.conns)
	for i := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := grpc.DialContext(ctx, c.addr, grpc.WithTransportCredentials(c.creds), grpc.WithReturnConnectionError())
		cancel()
		if err != nil {
			return nil, fmt.Errorf("connection %d: %v", i, err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	var next uint64
	begin := time.Now()
	from, until := begin.Add(seconds(c.warmup)), begin.Add(seconds(c.warmup+c.duration))
	var mu sync.Mutex
	var latencies []time.Duration
	errors := map[string]int{}
	// The server's CPU over the measured window.
	cpu := make(chan float64, 1)
	if c.pid > 0 {
		go func() {
			time.Sleep(time.Until(from))
			a := cpuSeconds(c.pid)
			time.Sleep(time.Until(until))
			cpu <- cpuSeconds(c.pid) - a
		}()
	}
	var wg sync.WaitGroup
	for i := 0; i < len(conns)*c.streams; i++ {
		conn := conns[i%len(conns)]
		wg.Add(1)
		go func(conn *grpc.ClientConn) {
			defer wg.Done()
			var mine []time.Duration
			myErrors := map[string]int{}
			for {
				start := time.Now()
				if !start.Before(until) {
					break
				}
				req := c.pool[(atomic.AddUint64(&next, 1)-1)%uint64(len(c.pool))]
				outcome, _ := certify(conn, req)
				end := time.Now()
				if end.Before(from) || end.After(until) {
					continue
				}
				if outcome == "" {
					mine = append(mine, end.Sub(start))
				} else {
					myErrors[outcome]++
				}
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			for code, n := range myErrors {
				errors[code] += n
			}
			mu.Unlock()
		}(conn)
	}
	wg.Wait()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	total := 0
	for _, n := range errors {
		total += n
	}
	perCert := interface{}(nil)
	if c.pid > 0 && len(latencies) > 0 {
		perCert = <-cpu / float64(len(latencies)) * 1e6
	}
	return map[string]interface{}{
		"mode": "steady", "connections": c.conns, "streams_per_connection": c.streams,
		"server_cpu_us_per_cert": perCert, "pool": len(c.pool), "duration_s": c.duration,
		"certs": len(latencies), "certs_per_s": float64(len(latencies)) / c.duration,
		"p50_ms": quantileMs(latencies, 0.50), "p99_ms": quantileMs(latencies, 0.99),
		"p999_ms": quantileMs(latencies, 0.999), "errors": total, "errors_by_code": errors,
		"client": "grpc-go " + grpc.Version,
	}, nil
}

// proxy: one simulated proxy of the herd, on its own connection; it returns when
// it was served (zero time if never), its retries and its last outcome.
func proxy(c config, req []byte) (time.Time, int, string) {
	conn, err := grpc.Dial(c.addr, grpc.WithTransportCredentials(c.creds))
	if err != nil {
		return time.Time{}, 0, codes.Unavailable.String()
	}
	defer conn.Close()
	for retries := 0; ; retries++ {
		outcome, pushback := certify(conn, req)
		if outcome == "" {
			return time.Now(), retries, ""
		}
		if outcome != codes.ResourceExhausted.String() || retries == maxRetries {
			return time.Time{}, retries, outcome
		}
		if pushback < 0 {
			pushback = 100
		}
		wait := time.Duration(pushback) * time.Millisecond
		time.Sleep(wait + time.Duration(rand.Float64()*0.5*float64(wait)))
	}
}

// herd: c.herd proxies starting uniformly within c.spread seconds.
func herd(c config) map[string]interface{} {
	t0 := time.Now().Add(100 * time.Millisecond)
	offsets := make([]time.Duration, c.herd)
	first := seconds(c.spread)
	for i := range offsets {
		offsets[i] = seconds(rand.Float64() * c.spread)
		if offsets[i] < first {
			first = offsets[i]
		}
	}
	var mu sync.Mutex
	var last time.Time
	servedN, failed, retries, most := 0, 0, 0, 0
	errors := map[string]int{}
	var wg sync.WaitGroup
	for i := 0; i < c.herd; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			time.Sleep(time.Until(t0.Add(offsets[i])))
			done, r, outcome := proxy(c, c.pool[i%len(c.pool)])
			mu.Lock()
			defer mu.Unlock()
			retries += r
			if r > most {
				most = r
			}
			if outcome != "" {
				failed++
				errors[outcome]++
				return
			}
			servedN++
			if done.After(last) {
				last = done
			}
		}(i)
	}
	wg.Wait()
	out := map[string]interface{}{
		"mode": "herd", "herd": c.herd, "spread_s": c.spread, "served": servedN, "failed": failed,
		"retries": retries, "max_retries": most, "errors_by_code": errors, "all_served_s": nil,
		"client": "grpc-go " + grpc.Version,
	}
	if failed == 0 {
		out["all_served_s"] = last.Sub(t0.Add(first)).Seconds()
	}
	return out
}

func human(out map[string]interface{}) {
	if out["mode"] == "steady" {
		fmt.Printf("Certify with %s: %v connections, %v calls in flight each, pool %v\n", out["client"], out["connections"], out["streams_per_connection"], out["pool"])
		fmt.Printf("  certificates/s   %.0f  (%v in %.2fs)\n", out["certs_per_s"], out["certs"], out["duration_s"])
		fmt.Printf("  latency (ms)     p50 %.2f  p99 %.2f  p999 %.2f\n", out["p50_ms"], out["p99_ms"], out["p999_ms"])
		fmt.Printf("  errors           %v %v\n", out["errors"], out["errors_by_code"])
		if us, ok := out["server_cpu_us_per_cert"].(float64); ok {
			fmt.Printf("  server CPU       %.0f us per certificate\n", us)
		}
		return
	}
	fmt.Printf("herd with %s: %v proxies starting within %.1fs, each on its own connection\n", out["client"], out["herd"], out["spread_s"])
	if t, ok := out["all_served_s"].(float64); ok {
		fmt.Printf("  all served after %.2fs\n", t)
	} else {
		fmt.Printf("  %v of %v proxies never served: %v\n", out["failed"], out["herd"], out["errors_by_code"])
	}
	fmt.Printf("  retries %v (at most %v for one proxy)\n", out["retries"], out["max_retries"])
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "meshca's gRPC address, host:port (an https:// prefix is ignored)")
	anchors := flag.String("trust-anchors", "", "PEM trust anchors that verify meshca's serving certificate (required)")
	serverName := flag.String("server-name", "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local", "name expected in meshca's serving certificate")
	requests := flag.String("requests", "", "pre-built CertifyRequests from meshca-load --write-requests (required)")
	conns := flag.Int("conns", 64, "steady: connections")
	streams := flag.Int("streams", 1, "steady: calls in flight on each connection")
	pid := flag.Int("server-pid", 0, "steady: the server's process, whose CPU time over the window is reported per certificate")
	warmup := flag.Float64("warmup", 2, "steady: unmeasured seconds before the window")
	duration := flag.Float64("duration", 10, "steady: measured seconds")
	herdN := flag.Int("herd", 0, "herd mode: this many proxies, each on its own connection, asking once")
	spread := flag.Float64("spread", 1, "herd: the proxies start uniformly within this many seconds")
	asJSON := flag.Bool("json", false, "print one JSON line instead of text")
	flag.Parse()
	fail := func(format string, a ...interface{}) {
		fmt.Fprintf(os.Stderr, "meshcagrpcload: "+format+"\n", a...)
		os.Exit(2)
	}
	if *anchors == "" || *requests == "" {
		fail("-trust-anchors and -requests are required")
	}
	if *conns < 1 || *streams < 1 || *duration <= 0 || *warmup < 0 || *herdN < 0 || *spread < 0 {
		fail("-conns must be positive, -duration > 0, -warmup, -herd and -spread >= 0")
	}
	// A herd holds one descriptor per proxy; go as far as the hard limit allows.
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	rand.Seed(time.Now().UnixNano()) // Go < 1.20 does not seed the global source
	pem, err := ioutil.ReadFile(*anchors)
	if err != nil {
		fail("%v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fail("%s: no PEM certificates", *anchors)
	}
	pool, err := readRequests(*requests)
	if err != nil {
		fail("%v", err)
	}
	c := config{
		addr:  strings.TrimPrefix(*addr, "https://"),
		creds: credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: *serverName}),
		pool:  pool, conns: *conns, streams: *streams, pid: *pid, warmup: *warmup, duration: *duration,
		herd: *herdN, spread: *spread,
	}
	var out map[string]interface{}
	if c.herd > 0 {
		out = herd(c)
	} else if out, err = steady(c); err != nil {
		fail("%v", err)
	}
	if *asJSON {
		line, _ := json.Marshal(out)
		fmt.Println(string(line))
	} else {
		human(out)
	}
	if f, ok := out["failed"].(int); ok && f > 0 {
		os.Exit(1)
	}
}
