//! The real binary in a real memory limit: `meshca serve` started inside a memory
//! cgroup of its own (created below this process's, v1 or v2, wherever the machine
//! lets it be created and limited) reports the in-flight bound that fits the limit,
//! logs it, and an explicit `--max-in-flight` still wins; and in deploy/base's limit
//! it survives a flood of unfinished messages from anonymous connections, its memory
//! within the bound docs/operations.md computes, while legitimate calls on new
//! connections go on being answered.
//!
//! Needs permission to create cgroups (root, as on the CI machines). Without it the
//! tests fail, saying so, unless `MESHCA_TEST_NO_CGROUPS=1` says to skip them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use meshca::admission::memory;
use meshca::ca::issuer::TrustAnchors;
use meshca::server::{MAX_DECODED_MESSAGE, UNFINISHED_PER_CONNECTION};
use support::h2::{self, RawH2};
use support::process::ServeBin;
use support::SERVER_NAME;

const LIMIT: u64 = 128 << 20;

/// A child of this process's memory cgroup with a memory limit; removed on drop
/// (once the processes in it have exited).
struct Cgroup(PathBuf);

impl Cgroup {
    /// One limited to `limit` bytes; `None` (after saying why) only where
    /// `MESHCA_TEST_NO_CGROUPS=1` allows the test to be skipped.
    fn create_or_skip(limit: u64) -> Option<Cgroup> {
        if let Some(cgroup) = Cgroup::create(limit) {
            return Some(cgroup);
        }
        let why = "cannot create a memory cgroup here (not root, or no writable cgroup file system)";
        assert!(
            std::env::var_os("MESHCA_TEST_NO_CGROUPS").is_some_and(|v| v == "1"),
            "{why}: run as root, or set MESHCA_TEST_NO_CGROUPS=1 to skip this test"
        );
        eprintln!("{why}: skipped (MESHCA_TEST_NO_CGROUPS=1)");
        None
    }

    fn create(limit: u64) -> Option<Cgroup> {
        for (dir, file) in memory::own_cgroups() {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let child = dir.join(format!("meshca-test-{}-{n}", std::process::id()));
            if std::fs::create_dir(&child).is_err() {
                continue;
            }
            let cgroup = Cgroup(child);
            if std::fs::write(cgroup.0.join(file), limit.to_string()).is_ok() {
                return Some(cgroup);
            }
        }
        None
    }
}

impl Cgroup {
    /// `sh -c` wrapper text that moves the shell into this cgroup, then execs.
    fn wrapper(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.0.display())
    }

    /// Processes the kernel's OOM killer killed in this cgroup (v2 `memory.events`,
    /// v1 `memory.oom_control`).
    fn oom_kills(&self) -> u64 {
        for file in ["memory.events", "memory.oom_control"] {
            if let Ok(text) = std::fs::read_to_string(self.0.join(file)) {
                let kills =
                    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).map(|n| n.trim().parse().unwrap());
                if let Some(kills) = kills {
                    return kills;
                }
            }
        }
        panic!("{}: neither memory.events nor memory.oom_control counts OOM kills", self.0.display())
    }

    /// The most memory the cgroup has been charged (v2 `memory.peak`, v1
    /// `memory.max_usage_in_bytes`), when the kernel reports it.
    fn peak(&self) -> Option<u64> {
        ["memory.peak", "memory.max_usage_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(self.0.join(f)).ok())
            .and_then(|t| t.trim().parse().ok())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

async fn in_flight_limit(serve: &ServeBin) -> u64 {
    let (status, body) = support::http_get(serve.admin, "/metrics").await;
    assert_eq!(status, 200);
    support::sample(&body, "meshca_admission_in_flight_limit")
}

#[tokio::test]
async fn the_in_flight_bound_fits_the_cgroups_memory_limit_unless_given() {
    let Some(cgroup) = Cgroup::create_or_skip(LIMIT) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = cgroup.wrapper();
    let expected = memory::max_in_flight_for(Some(LIMIT), 1024);
    assert!(expected < memory::DEFAULT_MAX_IN_FLIGHT, "{expected}");

    let mut serve = ServeBin::start(&[], &wrapper, &tmp.path().join("data"), &[]).await;
    assert_eq!(in_flight_limit(&serve).await, expected as u64);
    let log = serve
        .process
        .stderr
        .wait_for("admission bounds", std::time::Instant::now() + support::process::PATIENCE);
    assert!(
        log.contains(&format!("max_in_flight={expected}")) && log.contains("memory_limit_mib=128"),
        "{log}"
    );
    serve.stop().await;

    let mut serve =
        ServeBin::start(&[], &wrapper, &tmp.path().join("data"), &["--max-in-flight", "100"]).await;
    assert_eq!(in_flight_limit(&serve).await, 100);
    serve.stop().await;

    // Outside the cgroup there is no such limit (on a machine without one).
    if memory::limit().is_none() {
        let mut serve = ServeBin::start(&[], "exec \"$@\"", &tmp.path().join("data"), &[]).await;
        assert_eq!(in_flight_limit(&serve).await, memory::DEFAULT_MAX_IN_FLIGHT as u64);
        serve.stop().await;
    }
    drop(cgroup);
}

/// deploy/base's memory limit for the meshca container.
const DEPLOY_LIMIT: u64 = 160 << 20;
/// Attacking connections: a few dozen anonymous peers, well under `--max-connections`.
const ATTACKERS: usize = 32;

/// Anonymous resident memory of `pid` (`RssAnon`: the heap and stacks, not the
/// binary's mapped pages), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib =
        status.lines().find_map(|l| l.strip_prefix("RssAnon:")).map(|v| v.trim().trim_end_matches(" kB"));
    kib.and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// A TLS connection with ALPN h2 to `serve`, verified against its trust anchors,
/// past the HTTP/2 settings exchange.
async fn raw_connection(serve_addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> RawH2 {
    let tcp = tokio::net::TcpStream::connect(serve_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(SERVER_NAME.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    RawH2::handshake(tls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_messages_stays_within_the_memory_bound_and_legitimate_calls_go_on() {
    let Some(cgroup) = Cgroup::create_or_skip(DEPLOY_LIMIT) else { return };
    let seconds: u64 = std::env::var("MESHCA_ATTACK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let tmp = tempfile::tempdir().unwrap();
    let mut serve = ServeBin::start(&[], &cgroup.wrapper(), &tmp.path().join("data"), &[]).await;
    let pid = serve.pid();
    let idle = rss(pid);
    let addr: std::net::SocketAddr = serve.grpc.trim_start_matches("https://").parse().unwrap();
    let anchors = TrustAnchors::load(&serve.data.join("trust-anchors.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for anchor in anchors.certificates() {
        roots.add(anchor.clone()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);

    // Each attacker keeps its connection full of messages announcing just under the
    // decoding limit, 16 KiB of each sent, none finished.
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let announce = (MAX_DECODED_MESSAGE - 5) as u32;
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let connect = || raw_connection(addr, config.clone());
                h2::flood_unfinished(connect, SERVER_NAME, announce, 16 * 1024 - 5, until).await
            })
        })
        .collect();

    // Meanwhile: a legitimate call on a new connection every 250 ms, and the memory.
    let (mut answered, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
    let (mut peak_rss, mut peak_held) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while tokio::time::Instant::now() < until {
        tick.tick().await;
        let started = std::time::Instant::now();
        let call = async { serve.client().await.certify(serve.request("web")).await };
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => answered += 1,
            Ok(Err(status)) => failed.push(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => failed.push("no answer within 5 s".to_owned()),
        }
        slowest = slowest.max(started.elapsed());
        peak_rss = peak_rss.max(rss(pid));
        let (_, metrics) = support::http_get(serve.admin, "/metrics").await;
        peak_held = peak_held.max(support::sample(&metrics, "meshca_unfinished_request_bytes"));
    }
    let mut flooded = h2::Flooded::default();
    for attacker in attackers {
        let done = attacker.await.unwrap();
        flooded.connections += done.connections;
        flooded.streams += done.streams;
    }

    // The bound docs/operations.md states: the idle server, and for each connection its
    // own cost, its share of unfinished messages and its HTTP/2 receive window; with
    // the allocator's slack, for which the in-flight sizing leaves a quarter.
    let connections = (ATTACKERS + 1) as u64;
    let per_connection = memory::PER_CONNECTION_BYTES + 2 * UNFINISHED_PER_CONNECTION as u64;
    let bound = (memory::BASE_BYTES + connections * per_connection) / 3 * 4;
    eprintln!(
        "flood of {seconds} s: {} connections, {} unfinished messages opened; server RSS idle {} KiB, peak {} KiB \
         (bound {} KiB), cgroup peak {:?} KiB; unfinished bytes held at most {} KiB; {answered} legitimate calls \
         answered, slowest {slowest:?}",
        flooded.connections,
        flooded.streams,
        idle >> 10,
        peak_rss >> 10,
        bound >> 10,
        cgroup.peak().map(|p| p >> 10),
        peak_held >> 10,
    );
    assert!(try_alive(&mut serve), "meshca died under the flood: {}", serve.process.stderr.text());
    assert_eq!(cgroup.oom_kills(), 0, "the OOM killer struck");
    assert!(failed.is_empty(), "legitimate calls failed during the flood: {failed:?}");
    assert!(answered >= seconds * 2, "only {answered} legitimate calls in {seconds} s");
    assert!(flooded.streams > ATTACKERS * 17, "the flood did not get going: {flooded:?}");
    assert!(peak_held <= (ATTACKERS as u64 + 1) * UNFINISHED_PER_CONNECTION as u64, "{peak_held}");
    assert!(peak_rss <= bound, "RSS {peak_rss} over the bound {bound}");
    assert!(cgroup.peak().is_none_or(|peak| peak < DEPLOY_LIMIT / 2), "{:?}", cgroup.peak());
    serve.stop().await;
    drop(cgroup);
}

/// The server process has not exited.
fn try_alive(serve: &mut ServeBin) -> bool {
    serve.process.child.try_wait().unwrap().is_none()
}
