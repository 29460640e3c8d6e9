#!/usr/bin/env bash
# Reproducible Certify benchmark.
#
#   bench/run.sh [DURATION_SECS]      (default 10; each figure also gets a 2 s warm-up)
#
# Builds the release binaries and the grpc-go client (bench/grpc-go.sh), starts
# `meshca serve --dev` on loopback with a fresh data directory (audit log in it) and
# `jwks` token validation: the tokens are RS256 service-account tokens signed by a
# fresh RSA-2048 key, as a Kubernetes API server issues them (MESHCA_BENCH_TOKENS=es256:
# the dev server's own ES256 tokens instead). It measures start-to-ready time and idle
# RSS and runs `meshca-load --crypto-bound` (in-process CSR check + leaf sign on all
# cores). Then the headline: the shapes proxies make, each with two clients, our
# meshca-load and grpc-go (bench/go, not ours), beside cfssl loaded by hey at the same
# concurrency:
#
# - 16 x 1 and 64 x 1: that many connections, one call in flight on each (a proxy
#   holds its own connection and makes one call at a time);
# - 8 x 8: 64 calls on 8 shared connections (the friendliest shape);
# - a herd: MESHCA_BENCH_HERD proxies (default 10,000) starting within 1 s, each on a
#   new TLS connection of its own, asking once (retrying after the pushback hint).
#
# Each row has the server's CPU per certificate from /proc (utime + stime over the
# window), which does not depend on how much CPU the client takes from the shared
# cores. Then meshca-load alone at MESHCA_BENCH_LEVELS streams over min(N, 8)
# connections, and herds over 1,000 shared connections within 1 s and 10 s. Last it
# stops the server with SIGTERM, verifies the audit log against its signed checkpoints,
# measures what the log's Merkle tree and checkpoints cost per record
# (bench/audit_cost.rs), and prints markdown tables. Client and server share the
# machine's cores.
#
# A level counts only when other processes used at most MESHCA_BENCH_MAX_OTHER % of
# the cores (default 10) during its window; otherwise it is repeated, up to three
# times, and if the machine stays busy the script refuses to report (exit 3).
#
# MESHCA_BENCH_ISSUER_KEY=softhsm keeps the issuer key in a SoftHSM2 token made in
# the data directory (`serve --dev --issuer-key`, Debian's softhsm2): every leaf is
# signed inside the token through PKCS#11.
#
# Needs: openssl, curl, python3; for the grpc-go client golang-go and
# golang-google-grpc-dev; for the peer golang-cfssl and hey (Debian packages; a missing
# one skips its rows and says so).
#
# Environment: MESHCA_BENCH_TOKENS (rs256 | es256, default rs256), MESHCA_BENCH_ISSUER_KEY
# (file | softhsm, default file), MESHCA_BENCH_PORT (gRPC, default 18080),
# MESHCA_BENCH_ADMIN_PORT (default 19990), MESHCA_BENCH_SHAPES (default "16x1 64x1 8x8"),
# MESHCA_BENCH_LEVELS (default "1024"), MESHCA_BENCH_HERD (default 10000),
# MESHCA_BENCH_KEEP=1 keeps the data directory.
set -euo pipefail

DURATION="${1:-10}"
PORT="${MESHCA_BENCH_PORT:-18080}"
ADMIN_PORT="${MESHCA_BENCH_ADMIN_PORT:-19990}"
LEVELS="${MESHCA_BENCH_LEVELS:-1024}"
SHAPES="${MESHCA_BENCH_SHAPES:-16x1 64x1 8x8}"
HERD="${MESHCA_BENCH_HERD:-10000}"
MAX_OTHER="${MESHCA_BENCH_MAX_OTHER:-10}"
TOKENS="${MESHCA_BENCH_TOKENS:-rs256}"
ISSUER_KEY="${MESHCA_BENCH_ISSUER_KEY:-file}"

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
case "$DURATION" in
  '' | *[!0-9]*) echo "usage: bench/run.sh [DURATION_SECS]" >&2; exit 2 ;;
esac
case "$TOKENS" in
  rs256 | es256) ;;
  *) echo "MESHCA_BENCH_TOKENS must be rs256 or es256" >&2; exit 2 ;;
esac
for tool in curl openssl python3; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool" >&2; exit 2; }
done

DATA="$(mktemp -d "${TMPDIR:-/tmp}/meshca-bench.XXXXXX")"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "${MESHCA_BENCH_KEEP:-0}" = 1 ]; then
    echo "data directory kept: $DATA" >&2
  else
    rm -rf "$DATA"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }

# Reads a top-level scalar from meshca-load's one-line JSON.
field() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"; }
# printf for numbers that may be null.
num() { awk -v v="$2" -v f="$1" 'BEGIN { if (v == "" || v == "null") print "n/a"; else printf f, v }'; }
now_ms() { date +%s%3N; }

log "building release binaries"
cargo build --release --locked --workspace --bins >&2
MESHCA=target/release/meshca
LOAD=target/release/meshca-load
GRPC_GO=""
if GRPC_GO="$(bash bench/grpc-go.sh)"; then
  log "grpc-go client: $GRPC_GO"
else
  GRPC_GO=""
  log "the grpc-go client cannot be built (apt-get install golang-go golang-google-grpc-dev): skipping its rows"
fi

# CPU seconds (utime + stime) of a process so far (USER_HZ 100).
proc_cpu() { awk '{ sub(/.*\) /, ""); print ($12 + $13) / 100 }' "/proc/$1/stat"; }

# Share of all cores busy over one second (from /proc/stat).
busy_percent() {
  local a b
  a="$(head -1 /proc/stat)"
  sleep 1
  b="$(head -1 /proc/stat)"
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x); split(b, y); total = 0
    for (i = 2; i <= n; i++) total += y[i] - x[i]
    idle = (y[5] + y[6]) - (x[5] + x[6])
    busy = 0
    if (total > 0) busy = 100 * (total - idle) / total
    printf "%.0f", busy }'
}
BUSY="$(busy_percent)"
log "machine: $(nproc) cores, ${BUSY}% busy before the run"
if [ "$BUSY" -gt 10 ]; then
  log "warning: something else is using the CPU; results will be lower and noisier"
fi

# The token issuer. rs256: a service-account key like kube-apiserver's (RSA-2048,
# kid = base64url SHA-256 of its RSAPublicKey DER) and its JWKS, written by
# meshca-load (the one place that computes the kid); meshca verifies with
# --token-validation jwks --jwks-file. es256: the dev key meshca creates.
SERVE_TOKEN_ARGS=()
LOAD_TOKEN_ARGS=()
BOUND_TOKEN_ARGS=()
if [ "$TOKENS" = rs256 ]; then
  SA_ISSUER="https://kubernetes.default.svc.cluster.local"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$DATA/sa.key" 2>/dev/null
  "$LOAD" --write-jwks "$DATA/sa-jwks.json" --token-key "$DATA/sa.key"
  SERVE_TOKEN_ARGS=(--token-validation jwks --jwks-file "$DATA/sa-jwks.json" --token-issuer "$SA_ISSUER")
  LOAD_TOKEN_ARGS=(--token-key "$DATA/sa.key" --token-issuer "$SA_ISSUER")
  BOUND_TOKEN_ARGS=("${LOAD_TOKEN_ARGS[@]}" --jwks-file "$DATA/sa-jwks.json")
fi
TOKEN_LABEL="$(tr '[:lower:]' '[:upper:]' <<<"$TOKENS")"

# The issuer key: a file (the dev default), or made in a SoftHSM2 token on first start.
SERVE_KEY_ARGS=()
KEY_LABEL="issuer key in a file"
case "$ISSUER_KEY" in
  file) ;;
  softhsm)
    module=/usr/lib/softhsm/libsofthsm2.so
    [ -f "$module" ] && command -v softhsm2-util >/dev/null || { echo "MESHCA_BENCH_ISSUER_KEY=softhsm needs softhsm2 (apt-get install softhsm2)" >&2; exit 2; }
    mkdir -p "$DATA/softhsm/tokens"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$DATA/softhsm/tokens" >"$DATA/softhsm/softhsm2.conf"
    export SOFTHSM2_CONF="$DATA/softhsm/softhsm2.conf"
    printf 'bench-pin\n' >"$DATA/softhsm/pin"
    softhsm2-util --init-token --free --label bench --pin bench-pin --so-pin bench-so-pin >/dev/null
    SERVE_KEY_ARGS=(--issuer-key "pkcs11:token=bench;object=issuer;type=private?module-path=$module&pin-source=file:$DATA/softhsm/pin")
    KEY_LABEL="issuer key in SoftHSM2 (PKCS#11)"
    ;;
  *) echo "MESHCA_BENCH_ISSUER_KEY must be file or softhsm" >&2; exit 2 ;;
esac

log "crypto bound (${DURATION}s per figure, no server running; $TOKEN_LABEL tokens)"
CRYPTO="$("$LOAD" --crypto-bound --duration "$DURATION" "${BOUND_TOKEN_ARGS[@]}" --json)"
BOUND="$(field "$CRYPTO" ops_per_s)"
BOUND_TOKEN="$(field "$CRYPTO" with_token_ops_per_s)"

if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" 2>/dev/null; then
  echo "something already answers on 127.0.0.1:$ADMIN_PORT; set MESHCA_BENCH_ADMIN_PORT" >&2
  exit 1
fi
# Starts meshca on $DATA and sets SERVER_PID and READY_MS (start to /ready 200).
start_meshca() {
  local start
  start="$(now_ms)"
  "$MESHCA" serve --dev --data-dir "$DATA" "${SERVE_TOKEN_ARGS[@]}" "${SERVE_KEY_ARGS[@]}" \
    --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" 2>>"$DATA/server.log" &
  SERVER_PID=$!
  wait_ready "$ADMIN_PORT" "$SERVER_PID" "$DATA/server.log" 0.005 || exit 1
  READY_MS=$(($(now_ms) - start))
}

log "starting meshca serve --dev in $DATA"
start_meshca
FIRST_READY_MS="$READY_MS"
log "ready in ${READY_MS} ms (first start: creates the CA); restarting on the existing data directory"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
start_meshca
sleep 1
IDLE_RSS_KB="$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status")"
log "ready in ${READY_MS} ms (existing data directory), idle RSS $((IDLE_RSS_KB / 1024)) MiB"
RESTART_READY_MS="$READY_MS"

ROWS=""
LOADED=""
# The headline: each shape with each client. Rows go to $SHAPES_TSV (shape, client,
# calls, certs/s, p50 ms, p99 ms, errors, server CPU us per cert) and are printed,
# with the ratio to cfssl at the same concurrency, at the end.
SHAPES_TSV="$DATA/shapes.tsv"
: >"$SHAPES_TSV"
# One meshca-load window (its arguments after LABEL), in OUT and results.jsonl. It
# counts only if nothing but meshca and the load generator used the cores during the
# window (other processes' share <= MAX_OTHER %); else it is repeated, up to three times.
measure() {
  local label="$1" attempt
  shift
  for attempt in 1 2 3; do
    log "$label: meshca-load, ${DURATION}s (attempt $attempt)"
    OUT="$("$LOAD" --addr "https://127.0.0.1:$PORT" --data-dir "$DATA" "$@" \
      "${LOAD_TOKEN_ARGS[@]}" --duration "$DURATION" --server-pid "$SERVER_PID" --json)"
    other="$(field "$OUT" other_load_pct)"
    if awk -v o="$other" -v m="$MAX_OTHER" 'BEGIN { exit !(o != "null" && o <= m) }'; then
      break
    fi
    log "other processes used ${other}% of the cores during the window (limit ${MAX_OTHER}%): repeating"
    if [ "$attempt" = 3 ]; then LOADED+=" $label"; fi
  done
  echo "$OUT" >>"$DATA/results.jsonl"
}
shape_row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$SHAPES_TSV"; }
if [ -n "$GRPC_GO" ]; then
  # What the grpc-go client sends: a pool like meshca-load's, written once.
  "$LOAD" --data-dir "$DATA" --write-requests "$DATA/requests.bin" --pool 10000 "${LOAD_TOKEN_ARGS[@]}"
fi
for shape in $SHAPES; do
  conns="${shape%x*}"
  streams="${shape#*x}"
  calls=$((conns * streams))
  label="$conns × $streams"
  measure "$label" --concurrency "$calls" --connections "$conns"
  shape_row "$label" meshca-load "$calls" "$(field "$OUT" certs_per_s)" "$(field "$OUT" p50_ms)" \
    "$(field "$OUT" p99_ms)" "$(field "$OUT" errors)" \
    "$(awk -v c="$(field "$OUT" server_cpu_s_per_1k)" 'BEGIN { if (c == "null") print "null"; else print c * 1000 }')"
  if [ -n "$GRPC_GO" ]; then
    log "shape $label: grpc-go, ${DURATION}s"
    OUT="$("$GRPC_GO" -addr "127.0.0.1:$PORT" -trust-anchors "$DATA/trust-anchors.pem" -requests "$DATA/requests.bin" \
      -conns "$conns" -streams "$streams" -warmup 2 -duration "$DURATION" -server-pid "$SERVER_PID" -json)"
    echo "$OUT" >>"$DATA/results.jsonl"
    shape_row "$label" "grpc-go" "$calls" "$(field "$OUT" certs_per_s)" "$(field "$OUT" p50_ms)" \
      "$(field "$OUT" p99_ms)" "$(field "$OUT" errors)" "$(field "$OUT" server_cpu_us_per_cert)"
  fi
done

SHAPES_PEAK_RSS_KB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$SERVER_PID/status")"
# The herd on new connections, with each client, each on a fresh server (so its
# in-flight high-water mark and peak RSS are the herd's). Server CPU per proxy: the
# clients prepare before the herd starts, with the server idle.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
restart_meshca() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  start_meshca
}
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((HERD + 100)) ]; then
  log "skipping the herds on own connections: $HERD connections need more than $(ulimit -n) file descriptors"
else
  for client in meshca-load grpc-go; do
    [ "$client" = grpc-go ] && [ -z "$GRPC_GO" ] && continue
    restart_meshca
    log "herd: $HERD new connections within 1 s, $client"
    herd_cpu="$(proc_cpu "$SERVER_PID")"
    if [ "$client" = meshca-load ]; then
      OUT="$("$LOAD" --addr "https://127.0.0.1:$PORT" --data-dir "$DATA" --herd "$HERD" --spread 1 \
        --own-connections "${LOAD_TOKEN_ARGS[@]}" --admin-addr "127.0.0.1:$ADMIN_PORT" --json)" || true
    else
      OUT="$("$GRPC_GO" -addr "127.0.0.1:$PORT" -trust-anchors "$DATA/trust-anchors.pem" \
        -requests "$DATA/requests.bin" -herd "$HERD" -spread 1 -json)" || true
    fi
    echo "$OUT" >>"$DATA/results.jsonl"
    served_s="$(field "$OUT" all_served_s)"
    shape_row "herd of $HERD" "$client" "$HERD" \
      "$(awk -v s="$served_s" -v n="$HERD" 'BEGIN { if (s == "null" || s == "" || s <= 0) print "null"; else print n / s }')" \
      "null" "null" "$(field "$OUT" failed)" \
      "$(awk -v a="$herd_cpu" -v b="$(proc_cpu "$SERVER_PID")" -v n="$HERD" 'BEGIN { print (b - a) / n * 1e6 }')"
  done
fi
restart_meshca

for level in $LEVELS; do
  measure "$level streams" --concurrency "$level"
  rate="$(field "$OUT" certs_per_s)"
  errors="$(field "$OUT" errors)"
  if [ "$errors" != 0 ]; then
    log "errors at $level: $(sed -n 's/.*"errors_by_code":\({[^}]*}\).*/\1/p' <<<"$OUT")"
  fi
  ROWS+="| $level streams / $(field "$OUT" connections) conns"
  ROWS+=" | $(num '%.0f' "$rate")"
  ROWS+=" | $(num '%.2f' "$(field "$OUT" p50_ms)")"
  ROWS+=" | $(num '%.2f' "$(field "$OUT" p99_ms)")"
  ROWS+=" | $(num '%.2f' "$(field "$OUT" p999_ms)")"
  ROWS+=" | $errors"
  ROWS+=" | $(num '%.3f' "$(field "$OUT" server_cpu_s_per_1k)")"
  ROWS+=" | $(num '%.3f' "$(field "$OUT" client_cpu_s_per_1k)")"
  ROWS+=" | $(num '%.1f' "$(field "$OUT" server_rss_mib)") / $(num '%.1f' "$(field "$OUT" server_peak_rss_mib)")"
  ROWS+=" | $(awk -v r="$rate" -v b="$BOUND" 'BEGIN { printf "%.0f%%", 100 * r / b }')"
  ROWS+=" | $(awk -v r="$rate" -v b="$BOUND_TOKEN" 'BEGIN { printf "%.0f%%", 100 * r / b }')"
  ROWS+=" | $(num '%.1f' "$other") |"$'\n'
done

# Herds over shared connections: HERD proxies each asking once, starting within 1 s,
# then within 10 s; refused ones retry after the server's pushback hint (plus jitter).
LEVELS_PEAK_RSS_KB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$SERVER_PID/status")"
HERD_ROWS=""
for spread in 1 10; do
  how=(--connections 1000)
  label="$HERD within ${spread} s, 1,000 shared connections"
  # A fresh server per herd, so its in-flight high-water mark and peak RSS are the herd's.
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  start_meshca
  log "herd: $label"
  herd_cpu="$(proc_cpu "$SERVER_PID")"
  OUT="$("$LOAD" --addr "https://127.0.0.1:$PORT" --data-dir "$DATA" --herd "$HERD" --spread "$spread" "${how[@]}" \
    "${LOAD_TOKEN_ARGS[@]}" --admin-addr "127.0.0.1:$ADMIN_PORT" --json)" || true
  echo "$OUT" >>"$DATA/results.jsonl"
  HERD_ROWS+="| $label | $(num '%.2f' "$(field "$OUT" all_served_s)")"
  HERD_ROWS+=" | $(field "$OUT" served) | $(field "$OUT" failed) | $(field "$OUT" retries)"
  HERD_ROWS+=" | $(field "$OUT" max_retries) | $(num '%.0f' "$(field "$OUT" max_queue)")"
  HERD_ROWS+=" | $(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVER_PID/status")"
  # Server CPU per proxy: the pool is prepared before the herd starts, with the server idle.
  HERD_ROWS+=" | $(awk -v a="$herd_cpu" -v b="$(proc_cpu "$SERVER_PID")" -v n="$HERD" 'BEGIN { printf "%.0f", (b - a) / n * 1e6 }') |"$'\n'
done

log "stopping meshca (SIGTERM)"
kill -TERM "$SERVER_PID"
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=""
if [ "$status" != 0 ]; then
  echo "meshca exited with status $status; its log:" >&2
  tail -20 "$DATA/server.log" >&2
  exit 1
fi

# The peer on the same machine: cfssl's HTTP signer (no TLS, no authentication,
# no audit) with an equivalent P-256 CA (meshca's own dev issuer), loaded by hey
# with a P-256 CSR at the same concurrency levels.
if command -v cfssl >/dev/null && command -v hey >/dev/null; then
  CF_PORT="${MESHCA_BENCH_CFSSL_PORT:-18888}"
  printf '{"signing":{"default":{"expiry":"24h","usages":["digital signature","server auth","client auth"]}}}' \
    >"$DATA/cfssl.json"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$DATA/cfssl-leaf.key" \
    -subj "/CN=web.default.serviceaccount.identity.meshca-system.cluster.local" -out "$DATA/cfssl.csr" 2>/dev/null
  python3 -c 'import json,sys; print(json.dumps({"certificate_request": open(sys.argv[1]).read()}))' \
    "$DATA/cfssl.csr" >"$DATA/cfssl-body.json"
  log "starting cfssl serve (peer)"
  cfssl serve -ca "$DATA/issuer/tls.crt" -ca-key "$DATA/issuer/tls.key" -config "$DATA/cfssl.json" \
    -address 127.0.0.1 -port "$CF_PORT" 2>"$DATA/cfssl.log" &
  SERVER_PID=$!
  for _ in $(seq 1 500); do
    curl -fsS -o /dev/null -X POST -d @"$DATA/cfssl-body.json" "http://127.0.0.1:$CF_PORT/api/v1/cfssl/sign" \
      2>/dev/null && break
    sleep 0.01
  done
  for shape in $SHAPES; do
    [ "${shape#*x}" = 1 ] || continue
    level="${shape%x*}"
    log "cfssl load: $level concurrent requests (hey: a connection per worker), ${DURATION}s"
    cf_cpu_before="$(proc_cpu "$SERVER_PID")"
    HEY="$(hey -z "${DURATION}s" -c "$level" -m POST -T application/json -D "$DATA/cfssl-body.json" \
      "http://127.0.0.1:$CF_PORT/api/v1/cfssl/sign" 2>&1)"
    cf_cpu="$(awk -v a="$cf_cpu_before" -v b="$(proc_cpu "$SERVER_PID")" 'BEGIN { print b - a }')"
    cf_rate="$(awk '/Requests\/sec/ { print $2 }' <<<"$HEY")"
    cf_p50="$(awk '/ 50% in/ { print $3 * 1000 }' <<<"$HEY")"
    cf_p99="$(awk '/ 99% in/ { print $3 * 1000 }' <<<"$HEY")"
    cf_ok="$(awk '/\[200\]/ { print $2 }' <<<"$HEY")"
    shape_row "$level × 1" "cfssl (hey)" "$level" "${cf_rate:-null}" "${cf_p50:-null}" "${cf_p99:-null}" \
      "$(awk '/^  \[[0-9]+\]/ && !/\[200\]/ { n += $2 } /^Error distribution/ { e = 1 } e && /^  \[[0-9]+\]/ { n += substr($1, 2) } END { print n + 0 }' <<<"$HEY")" \
      "$(awk -v c="$cf_cpu" -v n="${cf_ok:-0}" 'BEGIN { if (n > 0) print 1e6 * c / n; else print "null" }')"
  done
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
else
  log "cfssl or hey not installed (apt-get install golang-cfssl hey): skipping the peer comparison"
fi

log "verifying the audit log"
AUDIT="$("$MESHCA" audit verify "$DATA/audit.jsonl" --key "$DATA/audit.pub" 2>&1)" || {
  echo "$AUDIT" >&2
  exit 1
}
log "measuring the audit log's tree and checkpoints"
AUDIT_COST="$(target/release/audit_cost --dir "$DATA" --records 20000 --rounds 3 --start-records 200000)"

if [ -n "$LOADED" ]; then
  echo "refusing to report: other processes kept loading the machine at levels:$LOADED" >&2
  exit 3
fi

# The headline table: every shape and client, meshca against cfssl at the same concurrency.
HEADLINE="$(awk -F '\t' '
  function n(v, f) { return (v == "" || v == "null") ? "n/a" : sprintf(f, v) }
  { row[NR] = $0; if ($2 ~ /^cfssl/) cf[$3] = $4 }
  END {
    for (i = 1; i <= NR; i++) {
      split(row[i], x, "\t")
      ratio = ""
      if (x[2] !~ /^cfssl/ && x[1] ~ / × 1$/ && (x[3] in cf) && cf[x[3]] > 0 && x[4] != "null") ratio = sprintf("%.2f", x[4] / cf[x[3]])
      printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", x[1], x[2], n(x[4], "%.0f"), n(x[5], "%.2f"), n(x[6], "%.2f"), x[7], n(x[8], "%.0f"), ratio
    }
  }' "$SHAPES_TSV")"

cat <<EOF

meshca Certify benchmark, $(date -u +%F): $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)) shared by client and server (${BUSY}% busy before the run); $TOKEN_LABEL tokens (jwks validation), $KEY_LABEL; ${DURATION}s per row after a 2 s warm-up

The shapes proxies make (C × S: C connections, S calls in flight on each; a herd: new TLS connections, one call each, starting within 1 s; its certs/s is proxies / seconds until all were served, its errors the proxies never served), with meshca-load, grpc-go $(sed -n 's/.*"client":"grpc-go \([^"]*\)".*/\1/p' "$DATA/results.jsonl" | head -1) and cfssl serve (HTTP, no TLS, no authentication, no audit; same P-256 issuer) loaded by hey

| shape | client | certs/s | p50 ms | p99 ms | errors | server CPU µs per cert | meshca / cfssl |
|---|---|---:|---:|---:|---:|---:|---:|
${HEADLINE}

meshca-load at more streams, over min(N, 8) connections (and the crypto bound): pool of 10,000 distinct P-256 CSRs

| level | certs/s | p50 ms | p99 ms | p999 ms | errors | server CPU s / 1k certs | client CPU s / 1k | server RSS / peak MiB | vs crypto bound | vs bound with token | other load % |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| crypto bound: CSR check + leaf sign, in-process, $(field "$CRYPTO" threads) threads | $(num '%.0f' "$BOUND") | | | | | $(awk -v b="$BOUND" -v t="$(field "$CRYPTO" threads)" 'BEGIN { printf "%.3f", 1000 * t / b }') | | | 100% | | |
| (same + token verify) | $(num '%.0f' "$BOUND_TOKEN") | | | | | $(awk -v b="$BOUND_TOKEN" -v t="$(field "$CRYPTO" threads)" 'BEGIN { printf "%.3f", 1000 * t / b }') | | | $(awk -v r="$BOUND_TOKEN" -v b="$BOUND" 'BEGIN { printf "%.0f%%", 100 * r / b }') | 100% | |
${ROWS}
start to ready: ${RESTART_READY_MS} ms on the existing data directory (${FIRST_READY_MS} ms on the first start, CA generated; includes the curl polling every 5 ms); idle RSS: $(awk -v k="$IDLE_RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }') MiB; peak RSS over the steady shapes: $(awk -v k="$SHAPES_PEAK_RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }') MiB, over the levels: $(awk -v k="$LEVELS_PEAK_RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }') MiB
audit log: ${AUDIT#"$DATA"/}

Herd: simulated proxies, one request each, retrying after the pushback hint

| herd | all served after s | served | failed | retries | most retries by one proxy | most in flight at the server | server peak RSS MiB | server CPU µs per proxy |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
${HERD_ROWS}

The audit log's Merkle tree and signed checkpoints (bench/audit_cost.rs, in-process):

\`\`\`
${AUDIT_COST}
\`\`\`
EOF
