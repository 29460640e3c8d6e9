//! audit_cost: what the audit log's Merkle tree and signed checkpoints cost, per
//! record and at start.
//!
//! Appends: `--records` realistic `issued` records through `AuditLog` (the writer
//! thread, group commit, fsync per batch) from `--concurrency` tasks, into a fresh
//! file in `--dir` (default: the system temporary directory), under three settings,
//! interleaved `--rounds` times: no checkpoints (the chain only, as before the tree),
//! checkpoints on the default schedule (every 1000 records or 10 s), and a checkpoint
//! after every batch (`every` = 1, the worst case). For each it prints records/s and
//! the process's CPU time per record (getrusage via /proc/self/stat), whose
//! difference from the chain-only runs is the tree's and the checkpoints' cost.
//!
//! Start: writes a log of `--start-records` records once, then times `AuditLog`
//! opening it (every record read and checked, the tree rebuilt and compared with the
//! signed checkpoint) and `meshca::audit::prove::check` (what `meshca audit verify
//! --key` does), per million records.
//!
//! Run in release: `cargo run --release -p meshca-bench --bin audit_cost`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use meshca::audit::checkpoint::{key_name, SigningKey};
use meshca::audit::{AuditLog, Checkpoints, Issued, Outcome, Record, Sink, SubjectRecord};

#[derive(Parser)]
struct Args {
    /// Records appended per run.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Concurrent appenders (requests in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Interleaved rounds of the three settings.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Records in the log opened for the start-up figure.
    #[arg(long, default_value_t = 200_000)]
    start_records: usize,
    /// Where the logs are written [default: the temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn record(i: usize) -> Record {
    let now = meshca::clock::Clock::now(&meshca::clock::SystemClock);
    let mut r = Record::begin(
        now,
        format!("{i:016x}"),
        Some("10.42.7.19:53412".into()),
        "web-7.shop.serviceaccount.identity.linkerd.cluster.local".into(),
    );
    r.subject = Some(SubjectRecord {
        namespace: "shop".into(),
        service_account: "web-7".into(),
        pod_name: Some("web-7-5d9c8b7f6d-x2x7q".into()),
        pod_uid: Some("0b5b2c1e-3f0e-4c43-9d7a-1a3c2c4d5e6f".into()),
        node_os: None,
    });
    r.auth_method = Some("jwks".into());
    r.token_issuer = Some("https://kubernetes.default.svc.cluster.local".into());
    r.csr_key_type = Some("p256".into());
    r.outcome = Outcome::Issued;
    r.issued = Some(Issued {
        serial_hex: format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        fingerprint_sha256: meshca::audit::sha256_hex(&i.to_le_bytes()),
        not_before: now,
        not_after: now + Duration::from_secs(86_400),
        issuer_fingerprint_sha256: meshca::audit::sha256_hex(b"issuer"),
    });
    r
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or_default().split(' ').collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn checkpoints(key: &Arc<SigningKey>, every: u64) -> Checkpoints {
    Checkpoints {
        key: key.clone(),
        trust_domain: "cluster.local".into(),
        every,
        interval: meshca::audit::DEFAULT_INTERVAL,
        new_log: false,
        also: None,
    }
}

/// Appends `n` records from `concurrency` tasks; (records/s, CPU µs per record).
async fn append(path: &Path, settings: Option<Checkpoints>, n: usize, concurrency: usize) -> (f64, f64) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(meshca::audit::checkpoint_path(path));
    let log = AuditLog::open_with(Sink::File(path.to_owned()), settings).await.expect("open");
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in (t..n).step_by(concurrency) {
                    log.append(record(i)).await.expect("append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    log.close().await.expect("close");
    (n as f64 / wall, cpu / n as f64 * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .expect("temporary directory");
    let (key, _) = SigningKey::generate(&key_name("cluster.local")).expect("key");
    let key = Arc::new(key);
    let path = tmp.path().join("audit.jsonl");
    let settings: [(&str, Option<u64>); 3] = [
        ("chain only", None),
        ("checkpoints every 1000 / 10 s", Some(1000)),
        ("a checkpoint every batch", Some(1)),
    ];
    let mut results = vec![Vec::new(); settings.len()];
    for _ in 0..args.rounds {
        for (i, (_, every)) in settings.iter().enumerate() {
            let cp = every.map(|every| checkpoints(&key, every));
            results[i].push(append(&path, cp, args.records, args.concurrency).await);
        }
    }
    println!(
        "appends: {} records a run, {} in flight, {} interleaved rounds (records/s; process CPU µs per record)",
        args.records, args.concurrency, args.rounds
    );
    for ((name, _), runs) in settings.iter().zip(&results) {
        let rates: Vec<String> = runs.iter().map(|(r, _)| format!("{r:.0}")).collect();
        let cpus: Vec<String> = runs.iter().map(|(_, c)| format!("{c:.1}")).collect();
        println!("  {name:32} records/s {:24} CPU µs/record {}", rates.join(" "), cpus.join(" "));
    }

    // The parts on their own: a leaf (a line of the size just written) into the
    // tree, and signing a checkpoint.
    let line =
        vec![b'x'; std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as usize / args.records.max(1)];
    let mut tree = meshca::audit::merkle::Frontier::default();
    let started = Instant::now();
    for _ in 0..1_000_000 {
        tree.push(meshca::audit::merkle::leaf_hash(&line));
    }
    let per_leaf = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let checkpoint = meshca::audit::checkpoint::Checkpoint {
        origin: "meshca/cluster.local/0123456789abcdef".into(),
        size: tree.size(),
        root: tree.root(),
        extensions: Vec::new(),
    };
    for _ in 0..10_000 {
        std::hint::black_box(key.sign(&checkpoint));
    }
    let per_sign = started.elapsed().as_secs_f64() / 10_000.0;
    println!(
        "parts: a {}-byte line into the tree {:.2} µs (leaf hash and frontier push, 1M leaves); \
         signing a checkpoint {:.1} µs (Ed25519 over its text)",
        line.len(),
        per_leaf,
        per_sign * 1e6
    );

    // Start: a log of `start_records`, closed with a checkpoint, opened again.
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(meshca::audit::checkpoint_path(&path));
    append(&path, Some(checkpoints(&key, 1000)), args.start_records, args.concurrency).await;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let log =
        AuditLog::open_with(Sink::File(path.clone()), Some(checkpoints(&key, 1000))).await.expect("reopen");
    let open = started.elapsed().as_secs_f64();
    log.close().await.expect("close");
    let started = Instant::now();
    let checked = meshca::audit::prove::check(&path, &[key.verifier()], None).expect("check");
    let check = started.elapsed().as_secs_f64();
    let per_million = |s: f64| s / checked.report.records as f64 * 1e6;
    println!(
        "start: {} records ({:.0} MB): serve opens and checks it in {open:.2} s ({:.2} s per million records); \
         audit verify --key in {check:.2} s ({:.2} s per million)",
        checked.report.records,
        bytes as f64 / 1e6,
        per_million(open),
        per_million(check)
    );
}
