//! meshca-load: load generator for Certify, and the crypto bound it is compared to.
//!
//! Default mode: prepares a pool of distinct requests up front (service accounts
//! `load-0` … `load-{N-1}` in namespace `bench`, each with its own P-256 key, a CSR
//! for its identity and a dev token signed with DATA_DIR/dev-token.key), opens
//! `--connections` TLS HTTP/2 connections to a `meshca serve --dev` server, and
//! keeps `--concurrency` Certify calls in flight, each task walking the pool
//! round-robin so that no two consecutive calls reuse a token or CSR. Calls that
//! complete during the measured window (after `--warmup`, for `--duration`) are
//! counted: certificates/s, latency percentiles, errors by gRPC code. With
//! `--rate R` the calls are paced to R per second in all (bench/soak.sh drives a
//! fraction of the measured capacity this way) rather than closed-loop. With
//! `--server-pid`, the server's CPU time (utime+stime, /proc/PID/stat) is sampled at
//! both ends of the window, and its RSS and peak RSS (VmRSS, VmHWM) at the end.
//!
//! `--herd N` mode simulates a herd: N proxies (each its own identity, token and
//! CSR) start within `--spread` seconds and ask once each, retrying after the
//! server's `grpc-retry-pushback-ms` (plus jitter) when refused with
//! ResourceExhausted; it reports when the last was served, the retries, and the
//! most requests the server ever had in flight (scraped from `--admin-addr`).
//!
//! `--crypto-bound` mode needs no server: on one OS thread per core it runs the
//! cryptographic core of Certify in-process — CSR check (parse + signature
//! verification) and leaf signing with a freshly generated hierarchy — over the same
//! kind of pool, and prints operations/s. A second figure adds the token
//! verification the server also performs per call (ES256 with a fresh dev key, or
//! the algorithm of --token-key checked against --jwks-file).
//!
//! Tokens are shaped like Kubernetes projected service-account tokens. By default
//! they are ES256, signed with the dev server's key; `--token-key` takes another
//! PKCS#8 key: an RSA one gives RS256 tokens, as a Kubernetes API server issues
//! them (bench/run.sh does that, with the server in jwks mode).
//!
//! `--write-jwks FILE` writes the token key's JWKS (its key id is
//! base64url(SHA-256(public key DER)), computed only here) and exits: bench/run.sh
//! serves it to meshca as --jwks-file.
//!
//! `--write-requests FILE` builds the pool the default mode would (`--pool`
//! requests, tokens from the same key and issuer, valid for an hour), writes each
//! CertifyRequest as a 4-byte big-endian length and its protobuf bytes, and exits:
//! the grpc-go client (bench/go, built by bench/grpc-go.sh) sends them as they are.

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use meshca::agent::client::{self, KeyType};
use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::auth::jwt::{Algorithm, Jwks, JwksAuthenticator, Settings};
use meshca::ca::csr::{self, Expected, KeyPolicy};
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::issuer::{Issuer, TrustAnchors};
use meshca::ca::profile::Lifetimes;
use meshca::clock::{Clock, SystemClock};
use meshca::config::{DEFAULT_AUDIENCE, DEV_TOKEN_ISSUER};
use meshca::identity::{Identity, Naming};
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(name = "meshca-load", about = "Load generator for meshca's Certify (and its crypto bound)")]
struct Args {
    /// meshca's gRPC address.
    #[arg(long, default_value = "https://127.0.0.1:8080")]
    addr: String,
    /// PEM trust anchors to verify meshca's serving certificate [default: DATA_DIR/trust-anchors.pem].
    #[arg(long, value_name = "FILE")]
    trust_anchors: Option<PathBuf>,
    /// Name expected in meshca's serving certificate.
    #[arg(long, default_value = "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local")]
    server_name: String,
    /// Dev server state directory: dev-token.key signs the pool's tokens.
    #[arg(long, value_name = "DIR", default_value = "./meshca-dev")]
    data_dir: PathBuf,
    /// Concurrent in-flight Certify calls.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over [default: min(concurrency, 8), or more so that each carries at most meshca's 100 streams].
    #[arg(long)]
    connections: Option<usize>,
    /// PKCS#8 PEM key that signs the pool's tokens: an RSA key makes RS256 tokens
    /// (what a Kubernetes API server issues), a P-256 key ES256 ones
    /// [default: DATA_DIR/dev-token.key, the dev server's ES256 key].
    #[arg(long, value_name = "FILE")]
    token_key: Option<PathBuf>,
    /// `iss` of the pool's tokens [default: the dev issuer, meshca-dev].
    #[arg(long, value_name = "ISSUER")]
    token_issuer: Option<String>,
    /// --crypto-bound with --token-key: the JWKS holding its public half.
    #[arg(long, value_name = "FILE")]
    jwks_file: Option<PathBuf>,
    /// Distinct token + CSR pairs prepared before the clock starts.
    #[arg(long, default_value_t = 10_000)]
    pool: usize,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Pace the calls to this many per second in all, spread evenly over the
    /// tasks (each waits for its next slot; one that fell behind starts afresh
    /// rather than bursting), instead of calling again as soon as one completes.
    #[arg(long, value_name = "PER_SECOND")]
    rate: Option<f64>,
    /// Unmeasured ramp-up before the window, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Server process to sample CPU time and memory of (Linux /proc).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Measure in-process CSR check + leaf sign throughput on all cores (no server).
    #[arg(long)]
    crypto_bound: bool,
    /// Herd mode: this many simulated proxies, each asking once (retrying on
    /// ResourceExhausted after the server's pushback hint), starting within --spread.
    #[arg(long, value_name = "N")]
    herd: Option<usize>,
    /// Herd mode: the proxies' start times are spread uniformly over this many seconds.
    #[arg(long, default_value_t = 1.0)]
    spread: f64,
    /// Writes every measured call as `END_US LATENCY_US TASK` (END: µs after the
    /// window opened) to this file, for plotting the latency distribution over time.
    #[arg(long, value_name = "FILE")]
    latency_log: Option<PathBuf>,
    /// Herd mode: the server's admin address, to read its largest queue depth.
    #[arg(long, value_name = "HOST:PORT")]
    admin_addr: Option<String>,
    /// Herd mode: every proxy opens its own connection when it starts and closes it
    /// once served, as proxies in separate pods do (instead of sharing --connections).
    #[arg(long)]
    own_connections: bool,
    /// Writes the JWKS of the token key (--token-key, or the dev key in --data-dir)
    /// to this file, with the `kid` its tokens carry, and exits (bench/run.sh gives
    /// it to the server as --jwks-file).
    #[arg(long, value_name = "FILE")]
    write_jwks: Option<PathBuf>,
    /// Writes the pool the default mode would build (--pool requests, tokens from
    /// --token-key and --token-issuer, valid for an hour), each CertifyRequest as a
    /// 4-byte big-endian length and its protobuf bytes, and exits (for the grpc-go
    /// client, bench/go).
    #[arg(long, value_name = "FILE")]
    write_requests: Option<PathBuf>,
}

/// One prepared call: distinct identity, token and CSR.
struct Item {
    identity: Identity,
    token: Vec<u8>,
    csr: Vec<u8>,
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Signs the pool's tokens, shaped like Kubernetes projected service-account tokens.
enum TokenSigner {
    /// ES256 with the dev server's key (or any P-256 key).
    Es256(DevSigner),
    /// RS256, as kube-apiserver signs with an RSA service-account key.
    Rs256 { key: ring::signature::RsaKeyPair, kid: String, rng: ring::rand::SystemRandom },
}

impl TokenSigner {
    /// Loads a PKCS#8 PEM key: RSA gives RS256, P-256 ES256.
    fn load(path: &std::path::Path) -> Result<TokenSigner> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("{}: not a PKCS#8 PRIVATE KEY PEM ({e})", path.display()))?;
        match ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()) {
            Ok(key) => {
                let kid = meshca::jose::key_id(key.public().as_ref());
                Ok(TokenSigner::Rs256 { key, kid, rng: ring::rand::SystemRandom::new() })
            }
            Err(_) => Ok(TokenSigner::Es256(DevSigner::from_pkcs8(der.secret_pkcs8_der())?)),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            TokenSigner::Es256(_) => Algorithm::ES256,
            TokenSigner::Rs256 { .. } => Algorithm::RS256,
        }
    }

    fn sign(&self, claims: &TokenClaims) -> Result<String> {
        match self {
            TokenSigner::Es256(signer) => Ok(signer.sign(claims)?),
            TokenSigner::Rs256 { key, kid, rng } => {
                claims.sign_with("RS256", kid, |msg| -> Result<Vec<u8>> {
                    let mut sig = vec![0; key.public().modulus_len()];
                    key.sign(&ring::signature::RSA_PKCS1_SHA256, rng, msg, &mut sig)
                        .map_err(|_| "RSA signing failed")?;
                    Ok(sig)
                })
            }
        }
    }

    /// A JWKS holding the public half, with the `kid` the tokens carry.
    fn jwks_json(&self) -> String {
        use meshca::jose::encode;
        match self {
            TokenSigner::Es256(signer) => signer.jwks_json(),
            TokenSigner::Rs256 { key, kid, .. } => {
                let public = ring::signature::RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
                let (n, e) = (encode(&public.n), encode(&public.e));
                json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": n, "e": e}]})
                    .to_string()
            }
        }
    }
}

/// The token signer and `iss` from --token-key and --token-issuer (defaults: the
/// dev server's key in --data-dir and the dev issuer).
fn token_signer(args: &Args) -> Result<(TokenSigner, String)> {
    let path = args.token_key.clone().unwrap_or_else(|| args.data_dir.join("dev-token.key"));
    let issuer = args.token_issuer.clone().unwrap_or_else(|| DEV_TOKEN_ISSUER.into());
    Ok((TokenSigner::load(&path)?, issuer))
}

/// `--write-jwks FILE`: the token key's JWKS, for the server's --jwks-file.
fn write_jwks(args: &Args, path: &std::path::Path) -> Result<()> {
    let (signer, _) = token_signer(args)?;
    std::fs::write(path, signer.jwks_json()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// How long the tokens of `--write-requests` stay valid: the file is written
/// before the server starts and serves a whole benchmark run.
const WRITTEN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// `--write-requests FILE`: the default mode's pool as length-prefixed CertifyRequests.
fn write_requests(args: &Args, path: &std::path::Path) -> Result<()> {
    if args.pool == 0 {
        return Err("--pool must be positive".into());
    }
    let (signer, issuer) = token_signer(args)?;
    let mut out = Vec::new();
    for item in prepare_pool(args.pool, Some((&signer, &issuer)), WRITTEN_TOKEN_TTL)? {
        let request = CertifyRequest {
            identity: item.identity.dns_name,
            token: item.token,
            certificate_signing_request: item.csr,
        };
        let bytes = prost::Message::encode_to_vec(&request);
        out.extend_from_slice(&u32::try_from(bytes.len())?.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Builds `n` items on all cores; tokens are signed by `signer` for `issuer`
/// (empty without a signer).
fn prepare_pool(n: usize, signer: Option<(&TokenSigner, &str)>, token_ttl: Duration) -> Result<Vec<Item>> {
    let naming = Naming::new("cluster.local", "meshca-system")?;
    let now = SystemClock.now();
    let chunk = n.div_ceil(cores()).max(1);
    let indices: Vec<usize> = (0..n).collect();
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|ids| {
                let naming = &naming;
                s.spawn(move || -> Result<Vec<Item>> {
                    ids.iter()
                        .map(|i| {
                            let sa = format!("load-{i}");
                            let identity = naming.identity("bench", &sa)?;
                            let (_key, csr) = client::make_csr(&identity.dns_name, KeyType::P256)?;
                            let token = match signer {
                                Some((signer, issuer)) => {
                                    let claims = TokenClaims::projected(
                                        issuer,
                                        DEFAULT_AUDIENCE,
                                        "bench",
                                        sa,
                                        now,
                                        token_ttl,
                                    );
                                    signer.sign(&claims)?.into_bytes()
                                }
                                None => Vec::new(),
                            };
                            Ok(Item { identity, token, csr })
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| "pool worker panicked")?).collect::<Vec<_>>()
    });
    let mut pool = Vec::with_capacity(n);
    for part in parts {
        pool.extend(part?);
    }
    Ok(pool)
}

/// Busy CPU seconds of the whole machine so far, all cores (/proc/stat: every
/// field but idle and iowait; USER_HZ is 100 on Linux).
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle) as f64 / 100.0)
}

/// CPU seconds (utime + stime) of a process; USER_HZ is 100 on Linux.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// (VmRSS, VmHWM) of a process, MiB.
fn memory_mib(pid: &str) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}

/// Value at quantile `q` of sorted micros, in ms.
fn quantile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

/// What one driver task saw in the measured window.
#[derive(Default)]
struct TaskStats {
    latencies_us: Vec<u32>,
    /// When each of `latencies_us` completed, µs after the window opened.
    ends_us: Vec<u32>,
    /// Errors by gRPC code (0..=16); index 17: empty leaf in an OK response.
    errors: [u64; 18],
}

async fn drive(
    channel: tonic::transport::Channel,
    pool: std::sync::Arc<Vec<Item>>,
    first: usize,
    stride: usize,
    measure_from: Instant,
    until: Instant,
    pace: Option<Duration>,
) -> TaskStats {
    let mut client = IdentityClient::new(channel);
    let mut stats = TaskStats { latencies_us: Vec::with_capacity(4096), ..TaskStats::default() };
    let mut next = first % pool.len();
    // With a pace: this task's slots, offset so that the tasks take turns.
    let mut slot = pace.map(|p| Instant::now() + p.mul_f64(first as f64 / stride as f64));
    loop {
        if let (Some(at), Some(pace)) = (slot.as_mut(), pace) {
            let now = Instant::now();
            if *at + pace < now {
                *at = now; // fell behind: no catch-up burst
            }
            tokio::time::sleep_until((*at).into()).await;
            *at += pace;
        }
        let start = Instant::now();
        if start >= until {
            return stats;
        }
        let item = &pool[next];
        next = (next + stride) % pool.len();
        let request = CertifyRequest {
            identity: item.identity.dns_name.clone(),
            token: item.token.clone(),
            certificate_signing_request: item.csr.clone(),
        };
        let result = client.certify(request).await;
        let end = Instant::now();
        if end < measure_from || end > until {
            continue;
        }
        match result {
            Ok(response) if !response.get_ref().leaf_certificate.is_empty() => {
                let us = end.duration_since(start).as_micros();
                stats.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                stats
                    .ends_us
                    .push(u32::try_from(end.duration_since(measure_from).as_micros()).unwrap_or(u32::MAX));
            }
            Ok(_) => stats.errors[17] += 1,
            Err(status) => stats.errors[(status.code() as usize).min(16)] += 1,
        }
    }
}

fn load(args: &Args) -> Result<()> {
    if args.concurrency == 0 || args.pool == 0 || args.duration <= 0.0 || args.warmup < 0.0 {
        return Err("--concurrency and --pool must be positive, --duration > 0, --warmup >= 0".into());
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of calls per second".into());
    }
    // Each task's interval between calls, so that all of them together make --rate.
    let pace = args.rate.map(|r| Duration::from_secs_f64(args.concurrency as f64 / r));
    let streams = meshca::server::MAX_CONCURRENT_STREAMS as usize;
    let fewest = args.concurrency.min(8).max(args.concurrency.div_ceil(streams));
    let connections = args.connections.unwrap_or(fewest).clamp(1, args.concurrency);
    let (signer, issuer) = token_signer(args)?;
    let anchors_path = args.trust_anchors.clone().unwrap_or_else(|| args.data_dir.join("trust-anchors.pem"));
    let anchors = TrustAnchors::load(&anchors_path)?;
    let ttl = Duration::from_secs_f64(args.warmup + args.duration) + Duration::from_secs(3600);

    let prep = Instant::now();
    let pool = std::sync::Arc::new(prepare_pool(args.pool, Some((&signer, &issuer)), ttl)?);
    let prep_s = prep.elapsed().as_secs_f64();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let pid = args.server_pid.map(|p| p.to_string());
    let (stats, window, (cpu, own_cpu, machine), memory) = runtime.block_on(async {
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(client::connect(&args.addr, &anchors, &args.server_name).await?);
        }
        let begin = Instant::now();
        let measure_from = begin + Duration::from_secs_f64(args.warmup);
        let until = measure_from + Duration::from_secs_f64(args.duration);
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|t| {
                let channel = channels[t % connections].clone();
                tokio::spawn(drive(channel, pool.clone(), t, args.concurrency, measure_from, until, pace))
            })
            .collect();
        tokio::time::sleep_until(measure_from.into()).await;
        let (cpu_before, mark) = (pid.as_deref().and_then(cpu_seconds), Instant::now());
        let own_before = cpu_seconds("self");
        let machine_before = machine_busy_seconds();
        tokio::time::sleep_until(until.into()).await;
        let (cpu_after, window) = (pid.as_deref().and_then(cpu_seconds), mark.elapsed().as_secs_f64());
        let own = own_before.zip(cpu_seconds("self")).map(|(b, a)| a - b);
        let machine = machine_before.zip(machine_busy_seconds()).map(|(b, a)| a - b);
        let memory = pid.as_deref().and_then(memory_mib);
        let mut stats = Vec::with_capacity(tasks.len());
        for task in tasks {
            stats.push(task.await?);
        }
        let cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
        Ok::<_, Box<dyn Error + Send + Sync>>((stats, window, (cpu, own, machine), memory))
    })?;
    // CPU that neither the server nor this client used during the window: another
    // process loading the machine. As a share of all cores.
    let other_pct = cpu.zip(own_cpu).zip(machine).map(|((server, client), machine)| {
        100.0 * (machine - server - client).max(0.0) / (window * cores() as f64)
    });

    let mut latencies: Vec<u32> = Vec::with_capacity(stats.iter().map(|s| s.latencies_us.len()).sum());
    let mut errors = [0u64; 18];
    if let Some(path) = &args.latency_log {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (task, s) in stats.iter().enumerate() {
            for (end, us) in s.ends_us.iter().zip(&s.latencies_us) {
                writeln!(out, "{end} {us} {task}")?;
            }
        }
        out.flush()?;
    }
    for s in stats {
        latencies.extend_from_slice(&s.latencies_us);
        for (total, n) in errors.iter_mut().zip(s.errors) {
            *total += n;
        }
    }
    latencies.sort_unstable();
    let certs = latencies.len() as u64;
    let rate = certs as f64 / args.duration;
    let (p50, p99, p999) =
        (quantile_ms(&latencies, 0.50), quantile_ms(&latencies, 0.99), quantile_ms(&latencies, 0.999));
    let max = latencies.last().map_or(0.0, |m| f64::from(*m) / 1000.0);
    let error_total: u64 = errors.iter().sum();
    let by_code: serde_json::Map<String, serde_json::Value> = (errors.iter().enumerate())
        .filter(|(_, n)| **n > 0)
        .map(|(code, n)| {
            let name = match code {
                17 => "EmptyLeaf".to_owned(),
                c => format!("{:?}", tonic::Code::from(c as i32)),
            };
            (name, json!(n))
        })
        .collect();
    let per_1k = |c: Option<f64>| c.filter(|_| certs > 0).map(|c| c * 1000.0 / certs as f64);
    let (cpu_per_1k, own_per_1k) = (per_1k(cpu), per_1k(own_cpu));

    if args.json {
        let out = json!({
            "mode": "certify", "concurrency": args.concurrency, "connections": connections, "rate": args.rate,
            "pool": args.pool, "window_s": window, "certs": certs, "certs_per_s": rate,
            "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "max_ms": max,
            "errors": error_total, "errors_by_code": by_code,
            "server_cpu_s": cpu, "server_cpu_s_per_1k": cpu_per_1k,
            "server_rss_mib": memory.map(|m| m.0), "server_peak_rss_mib": memory.map(|m| m.1),
            "client_cpu_s_per_1k": own_per_1k, "pool_prep_s": prep_s,
            "other_load_pct": other_pct,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "Certify over TLS: {} streams on {connections} connections, pool {} (prepared in {prep_s:.1}s)",
        args.concurrency, args.pool
    );
    println!("  certificates/s   {rate:.0}  ({certs} in {:.2}s)", args.duration);
    println!("  latency (ms)     p50 {p50:.2}  p99 {p99:.2}  p999 {p999:.2}  max {max:.2}");
    println!("  errors           {error_total} {}", serde_json::Value::Object(by_code));
    if let Some(c) = cpu {
        println!("  server CPU       {c:.2}s ({:.3}s per 1,000 certificates)", cpu_per_1k.unwrap_or(0.0));
    }
    if let Some(c) = own_per_1k {
        println!("  client CPU       {c:.3}s per 1,000 certificates");
    }
    if let Some((rss, hwm)) = memory {
        println!("  server RSS       {rss:.1} MiB now, {hwm:.1} MiB peak");
    }
    if let Some(other) = other_pct {
        println!("  other processes  {other:.1}% of the cores during the window");
    }
    Ok(())
}

/// Runs `op` on every item round-robin, one thread per core, for `secs`; ops/s.
fn saturate(
    pool: &[Item],
    threads: usize,
    secs: f64,
    op: &(dyn Fn(&Item) -> Result<()> + Sync),
) -> Result<f64> {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<u64> {
                    let (mut n, mut i) = (0u64, t * pool.len() / threads);
                    while Instant::now() < until {
                        op(&pool[i])?;
                        i = (i + 1) % pool.len();
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| "worker panicked")?).collect::<Vec<_>>()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok(total as f64 / elapsed)
}

fn crypto_bound(args: &Args) -> Result<()> {
    let threads = cores();
    let naming = Naming::new("cluster.local", "meshca-system")?;
    let now = SystemClock.now();
    let h = hierarchy::generate(&naming, CaKeyType::P256, now, HierarchyLifetimes::default())?;
    let anchor = CertificateDer::from_pem_slice(h.anchor_cert_pem.as_bytes())?;
    let issuer_cert = CertificateDer::from_pem_slice(h.issuer_cert_pem.as_bytes())?;
    let issuer_key = PrivatePkcs8KeyDer::from_pem_slice(h.issuer_key_pem.as_bytes())?;
    let nowhere = std::path::Path::new("(generated)");
    let anchors = TrustAnchors::from_certs(vec![anchor], nowhere)?;
    let issuer = Issuer::from_parts(
        vec![issuer_cert],
        issuer_key.secret_pkcs8_der(),
        &anchors,
        now,
        nowhere,
        nowhere,
    )?;
    // The token: --token-key with the JWKS in --jwks-file, or a fresh dev (ES256) key.
    let (signer, token_issuer, jwks) = match (&args.token_key, &args.jwks_file) {
        (Some(_), Some(jwks)) => {
            let (signer, issuer) = token_signer(args)?;
            let jwks = std::fs::read(jwks).map_err(|e| format!("{}: {e}", jwks.display()))?;
            (signer, issuer, Jwks::from_json(&jwks)?)
        }
        (None, None) => {
            let (dev, _) = DevSigner::generate()?;
            let jwks = Jwks::from_json(dev.jwks_json().as_bytes())?;
            (TokenSigner::Es256(dev), DEV_TOKEN_ISSUER.to_owned(), jwks)
        }
        _ => return Err("--crypto-bound takes --token-key and --jwks-file together".into()),
    };
    let settings = Settings {
        issuer: token_issuer.clone(),
        audiences: vec![DEFAULT_AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        algorithms: vec![signer.algorithm()],
    };
    let auth = JwksAuthenticator::new(settings, jwks);
    let ttl = Duration::from_secs_f64(2.0 * (args.warmup + args.duration)) + Duration::from_secs(3600);
    let pool = prepare_pool(args.pool.max(1), Some((&signer, &token_issuer)), ttl)?;
    let (policy, lifetimes) = (KeyPolicy::default(), Lifetimes::default());

    let check_and_sign = |id: &Identity, csr_der: &[u8]| -> Result<()> {
        let expected = Expected { dns_name: Some(&id.dns_name), spiffe_id: &id.spiffe_id };
        let checked = csr::check(csr_der, &expected, &policy)?;
        issuer.issue(&expected, &checked, &lifetimes, SystemClock.now())?;
        Ok(())
    };
    let bare = |item: &Item| check_and_sign(&item.identity, &item.csr);
    let with_token = |item: &Item| -> Result<()> {
        let subject = auth.verify(&item.token, SystemClock.now())?;
        let id = naming.authorize(&subject, &item.identity.dns_name)?;
        check_and_sign(&id, &item.csr)
    };
    if args.warmup > 0.0 {
        saturate(&pool, threads, args.warmup.min(1.0), &bare)?;
    }
    let bound = saturate(&pool, threads, args.duration, &bare)?;
    let full = saturate(&pool, threads, args.duration, &with_token)?;
    let per_core = bound / threads as f64;
    // CSR check cost per key type relative to P-256, on one core: the weights
    // admission control charges (admission::cost).
    let naming_ref = &naming;
    let check_rate = |key_type: KeyType| -> Result<f64> {
        let items: Vec<(Identity, Vec<u8>)> = (0..32)
            .map(|i| {
                let id = naming_ref.identity("bench", &format!("cost-{i}"))?;
                let (_key, csr) = client::make_csr(&id.dns_name, key_type)?;
                Ok((id, csr))
            })
            .collect::<Result<_>>()?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(500) {
            let (id, der) = &items[n as usize % items.len()];
            let expected = Expected { dns_name: Some(&id.dns_name), spiffe_id: &id.spiffe_id };
            csr::check(der, &expected, &policy)?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let p256 = check_rate(KeyType::P256)?;
    let mut costs = serde_json::Map::new();
    for (name, key_type) in
        [("p384", KeyType::P384), ("rsa2048", KeyType::Rsa2048), ("rsa3072", KeyType::Rsa3072)]
    {
        costs.insert(name.into(), json!(p256 / check_rate(key_type)?));
    }
    if args.json {
        let out = json!({
            "mode": "crypto-bound", "threads": threads, "ops_per_s": bound, "ops_per_s_per_core": per_core,
            "with_token_ops_per_s": full, "with_token_ops_per_s_per_core": full / threads as f64,
            "csr_check_p256_per_s": p256, "csr_check_cost_vs_p256": costs,
        });
        println!("{out}");
    } else {
        println!("crypto bound on {threads} cores (in-process, no TLS, no audit):");
        println!("  CSR check + leaf sign:                  {bound:.0} ops/s ({per_core:.0} per core)");
        println!(
            "  token verify + CSR check + leaf sign:   {full:.0} ops/s ({:.0} per core)",
            full / threads as f64
        );
        println!("  CSR check alone, P-256, one core:      {p256:.0} ops/s");
        for (name, cost) in &costs {
            println!("  CSR check cost of {name} vs P-256:      {:.2}x", cost.as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}

/// What one simulated proxy went through.
struct Proxy {
    /// From the herd's start until its certificate arrived; `None`: never.
    done_after: Option<Duration>,
    retries: u32,
    /// The last refusal that was not retried (permanent failure).
    failure: Option<String>,
}

/// How a simulated proxy reaches the server.
#[derive(Clone)]
enum Route {
    /// A connection shared with other proxies.
    Shared(tonic::transport::Channel),
    /// Its own connection, opened at its start (the endpoint, built once, and its address).
    Own(std::sync::Arc<(tonic::transport::Endpoint, String)>),
}

/// One proxy: waits for its start, then asks until served, honouring the
/// server's pushback (plus up to 50% jitter) on ResourceExhausted and backing
/// off on Unavailable (a connection that could not be opened counts as that);
/// any other refusal, or 60 s without success, is permanent.
async fn proxy(
    route: Route,
    item: &Item,
    herd_start: tokio::time::Instant,
    offset: Duration,
    jitter: [u8; 8],
) -> Proxy {
    tokio::time::sleep_until(herd_start + offset).await;
    let give_up = herd_start + offset + Duration::from_secs(60);
    let mut retries = 0u32;
    let mut backoff = Duration::from_millis(100);
    let channel = match route {
        Route::Shared(channel) => channel,
        Route::Own(to) => loop {
            match client::connect_to(&to.0, &to.1).await {
                Ok(channel) => break channel,
                Err(e) if tokio::time::Instant::now() + backoff > give_up => {
                    return Proxy { done_after: None, retries, failure: Some(format!("connect: {e}")) };
                }
                Err(_) => {
                    retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        },
    };
    let mut client = IdentityClient::new(channel);
    loop {
        let request = CertifyRequest {
            identity: item.identity.dns_name.clone(),
            token: item.token.clone(),
            certificate_signing_request: item.csr.clone(),
        };
        let wait = match client.certify(request).await {
            Ok(r) if !r.get_ref().leaf_certificate.is_empty() => {
                return Proxy { done_after: Some(herd_start.elapsed()), retries, failure: None };
            }
            Ok(_) => return Proxy { done_after: None, retries, failure: Some("empty leaf".into()) },
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                let pushback = (status.metadata().get("grpc-retry-pushback-ms"))
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(backoff, Duration::from_millis);
                pushback
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
            Err(status) => {
                return Proxy { done_after: None, retries, failure: Some(format!("{:?}", status.code())) };
            }
        };
        retries += 1;
        // Jitter: 0–50% on top, from this proxy's random bytes.
        let j = f64::from(jitter[(retries as usize) % jitter.len()]) / 255.0 * 0.5;
        let wait = wait.mul_f64(1.0 + j);
        if tokio::time::Instant::now() + wait > give_up {
            return Proxy { done_after: None, retries, failure: Some("gave up after 60 s".into()) };
        }
        tokio::time::sleep(wait).await;
    }
}

/// A gauge's value from a Prometheus text page.
fn scrape(admin: &str, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Herd mode: `--herd N` proxies, each once, starting within `--spread` seconds.
fn herd(args: &Args) -> Result<()> {
    let n = args.herd.unwrap_or(0);
    if n == 0 || args.spread < 0.0 {
        return Err("--herd must be positive and --spread >= 0".into());
    }
    let connections = match args.own_connections {
        true => n,
        false => args.connections.unwrap_or(n.min(1000)).clamp(1, n),
    };
    let (signer, issuer) = token_signer(args)?;
    let anchors_path = args.trust_anchors.clone().unwrap_or_else(|| args.data_dir.join("trust-anchors.pem"));
    let anchors = TrustAnchors::load(&anchors_path)?;
    let own = std::sync::Arc::new((
        client::endpoint(&args.addr, &anchors, &args.server_name, None)?,
        args.addr.clone(),
    ));
    let pool = std::sync::Arc::new(prepare_pool(n, Some((&signer, &issuer)), Duration::from_secs(3600))?);
    let rng = ring::rand::SystemRandom::new();
    let mut random = vec![0u8; n * 16];
    ring::rand::SecureRandom::fill(&rng, &mut random).map_err(|_| "random generator failed")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (proxies, elapsed) = runtime.block_on(async {
        let mut channels = Vec::new();
        if !args.own_connections {
            for _ in 0..connections {
                channels.push(Route::Shared(client::connect_to(&own.0, &own.1).await?));
            }
        }
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let bytes = &random[i * 16..i * 16 + 16];
                let unit = f64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                    / f64::from(u32::MAX);
                let offset = Duration::from_secs_f64(args.spread * unit);
                let mut jitter = [0u8; 8];
                jitter.copy_from_slice(&bytes[8..16]);
                let route = match args.own_connections {
                    true => Route::Own(own.clone()),
                    false => channels[i % connections].clone(),
                };
                let pool = pool.clone();
                tokio::spawn(async move { proxy(route, &pool[i], start, offset, jitter).await })
            })
            .collect();
        let mut proxies = Vec::with_capacity(n);
        for task in tasks {
            proxies.push(task.await?);
        }
        Ok::<_, Box<dyn Error + Send + Sync>>((proxies, start.elapsed()))
    })?;

    let mut done: Vec<Duration> = proxies.iter().filter_map(|p| p.done_after).collect();
    done.sort_unstable();
    let served = done.len();
    let failed = n - served;
    let retries: u64 = proxies.iter().map(|p| u64::from(p.retries)).sum();
    let max_retries = proxies.iter().map(|p| p.retries).max().unwrap_or(0);
    let all_served_s = (failed == 0).then(|| done.last().map_or(0.0, Duration::as_secs_f64));
    let at = |q: f64| {
        done.get(((q * served as f64).ceil() as usize).clamp(1, served.max(1)) - 1).map(Duration::as_secs_f64)
    };
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    for f in proxies.iter().filter_map(|p| p.failure.clone()) {
        *failures.entry(f).or_default() += 1;
    }
    let max_queue = args.admin_addr.as_deref().and_then(|a| scrape(a, "meshca_admission_in_flight_max"));
    if args.json {
        let out = json!({
            "mode": "herd", "proxies": n, "spread_s": args.spread, "connections": connections,
            "served": served, "failed": failed, "failures": failures, "retries": retries,
            "max_retries": max_retries, "all_served_s": all_served_s,
            "p50_s": at(0.5), "p99_s": at(0.99), "run_s": elapsed.as_secs_f64(), "max_queue": max_queue,
        });
        println!("{out}");
    } else {
        let on = if args.own_connections {
            "each on its own connection".to_owned()
        } else {
            format!("on {connections} connections")
        };
        println!("herd: {n} proxies starting within {:.1}s {on}", args.spread);
        match all_served_s {
            Some(t) => println!("  all served after {t:.2}s"),
            None => println!("  {failed} proxies never served: {failures:?}"),
        }
        println!("  retries {retries} (at most {max_retries} for one proxy)");
        if let Some(q) = max_queue {
            println!("  most requests in flight at the server: {q:.0}");
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {n} proxies were not served").into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = if let Some(path) = &args.write_jwks {
        write_jwks(&args, path)
    } else if let Some(path) = &args.write_requests {
        write_requests(&args, path)
    } else if args.crypto_bound {
        crypto_bound(&args)
    } else if args.herd.is_some() {
        herd(&args)
    } else {
        load(&args)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshca-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
