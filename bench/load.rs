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
//! `--server-pid`, the server's CPU time (utime+stime, /proc/PID/stat) is sampled at
//! both ends of the window, and its RSS and peak RSS (VmRSS, VmHWM) at the end.
//!
//! `--crypto-bound` mode needs no server: on one OS thread per core it runs the
//! cryptographic core of Certify in-process — CSR check (parse + signature
//! verification) and leaf signing with a freshly generated hierarchy — over the same
//! kind of pool, and prints operations/s. A second figure adds the token (ES256 JWT)
//! verification the server also performs per call.

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
    /// HTTP/2 connections the calls are spread over [default: min(concurrency, 8)].
    #[arg(long)]
    connections: Option<usize>,
    /// Distinct token + CSR pairs prepared before the clock starts.
    #[arg(long, default_value_t = 10_000)]
    pool: usize,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
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

/// Builds `n` items on all cores; tokens are signed by `signer` (empty without one).
fn prepare_pool(n: usize, signer: Option<&DevSigner>, token_ttl: Duration) -> Result<Vec<Item>> {
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
                                Some(signer) => signer
                                    .sign(&TokenClaims {
                                        issuer: DEV_TOKEN_ISSUER.into(),
                                        audience: vec![DEFAULT_AUDIENCE.into()],
                                        namespace: "bench".into(),
                                        service_account: sa,
                                        pod: None,
                                        issued_at: now,
                                        expires_at: now + token_ttl,
                                    })?
                                    .into_bytes(),
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
) -> TaskStats {
    let mut client = IdentityClient::new(channel);
    let mut stats = TaskStats { latencies_us: Vec::with_capacity(4096), ..TaskStats::default() };
    let mut next = first % pool.len();
    loop {
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
    let connections = args.connections.unwrap_or(args.concurrency.min(8)).clamp(1, args.concurrency);
    let key_path = args.data_dir.join("dev-token.key");
    let pem = std::fs::read_to_string(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let signer = DevSigner::from_pem(&pem)?;
    let anchors_path = args.trust_anchors.clone().unwrap_or_else(|| args.data_dir.join("trust-anchors.pem"));
    let anchors = TrustAnchors::load(&anchors_path)?;
    let ttl = Duration::from_secs_f64(args.warmup + args.duration) + Duration::from_secs(3600);

    let prep = Instant::now();
    let pool = std::sync::Arc::new(prepare_pool(args.pool, Some(&signer), ttl)?);
    let prep_s = prep.elapsed().as_secs_f64();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let pid = args.server_pid.map(|p| p.to_string());
    let (stats, window, (cpu, own_cpu), memory) = runtime.block_on(async {
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
                tokio::spawn(drive(channel, pool.clone(), t, args.concurrency, measure_from, until))
            })
            .collect();
        tokio::time::sleep_until(measure_from.into()).await;
        let (cpu_before, mark) = (pid.as_deref().and_then(cpu_seconds), Instant::now());
        let own_before = cpu_seconds("self");
        tokio::time::sleep_until(until.into()).await;
        let (cpu_after, window) = (pid.as_deref().and_then(cpu_seconds), mark.elapsed().as_secs_f64());
        let own = own_before.zip(cpu_seconds("self")).map(|(b, a)| a - b);
        let memory = pid.as_deref().and_then(memory_mib);
        let mut stats = Vec::with_capacity(tasks.len());
        for task in tasks {
            stats.push(task.await?);
        }
        let cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
        Ok::<_, Box<dyn Error + Send + Sync>>((stats, window, (cpu, own), memory))
    })?;

    let mut latencies: Vec<u32> = Vec::with_capacity(stats.iter().map(|s| s.latencies_us.len()).sum());
    let mut errors = [0u64; 18];
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
            "mode": "certify", "concurrency": args.concurrency, "connections": connections,
            "pool": args.pool, "window_s": window, "certs": certs, "certs_per_s": rate,
            "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "max_ms": max,
            "errors": error_total, "errors_by_code": by_code,
            "server_cpu_s": cpu, "server_cpu_s_per_1k": cpu_per_1k,
            "server_rss_mib": memory.map(|m| m.0), "server_peak_rss_mib": memory.map(|m| m.1),
            "client_cpu_s_per_1k": own_per_1k, "pool_prep_s": prep_s,
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
    let (signer, _) = DevSigner::generate()?;
    let settings = Settings {
        issuer: DEV_TOKEN_ISSUER.into(),
        audiences: vec![DEFAULT_AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        algorithms: vec![Algorithm::ES256],
    };
    let auth = JwksAuthenticator::new(settings, Jwks::from_json(signer.jwks_json().as_bytes())?);
    let ttl = Duration::from_secs_f64(2.0 * (args.warmup + args.duration)) + Duration::from_secs(3600);
    let pool = prepare_pool(args.pool.max(1), Some(&signer), ttl)?;
    let (policy, lifetimes) = (KeyPolicy::default(), Lifetimes::default());

    let check_and_sign = |id: &Identity, csr_der: &[u8]| -> Result<()> {
        let expected = Expected { dns_name: &id.dns_name, spiffe_id: &id.spiffe_id };
        let checked = csr::check(csr_der, &expected, &policy)?;
        issuer.issue(id, &checked, &lifetimes, SystemClock.now())?;
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
    if args.json {
        let out = json!({
            "mode": "crypto-bound", "threads": threads, "ops_per_s": bound, "ops_per_s_per_core": per_core,
            "with_token_ops_per_s": full, "with_token_ops_per_s_per_core": full / threads as f64,
        });
        println!("{out}");
    } else {
        println!("crypto bound on {threads} cores (in-process, no TLS, no audit):");
        println!("  CSR check + leaf sign:                  {bound:.0} ops/s ({per_core:.0} per core)");
        println!(
            "  token verify + CSR check + leaf sign:   {full:.0} ops/s ({:.0} per core)",
            full / threads as f64
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = if args.crypto_bound { crypto_bound(&args) } else { load(&args) };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshca-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
