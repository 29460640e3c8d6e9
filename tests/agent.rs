//! The agent keeping a certificate fresh against a real server, with the agent's
//! wall clock ten minutes ahead of or behind the server's. Time is injected: the
//! agent's waits go through a test timer that advances both fake clocks, so many
//! rotations take no real time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::agent::run::{self, Settings, Timer};
use meshca::agent::schedule::Policy;
use meshca::clock::{Clock, FakeClock};
use support::{http_get, Options, TestServer, SERVER_NAME};
use tokio::sync::{mpsc, oneshot};

/// Hands every requested wait to the test, which moves time and then lets it end.
struct SteppedTimer {
    steps: mpsc::UnboundedSender<(Duration, oneshot::Sender<()>)>,
}

impl Timer for SteppedTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let (done, wait) = oneshot::channel();
        let sent = self.steps.send((duration, done)).is_ok();
        Box::pin(async move {
            if sent {
                let _ = wait.await;
            } else {
                std::future::pending::<()>().await;
            }
        })
    }
}

fn not_after(pem: &str) -> SystemTime {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    meshca::ca::issuer::to_system_time(cert.validity().not_after)
}

use rustls_pki_types::pem::PemObject;

type Steps = mpsc::UnboundedReceiver<(Duration, oneshot::Sender<()>)>;

/// A stepped timer and the receiving end the test drives it from.
fn stepped() -> (Steps, Arc<SteppedTimer>) {
    let (steps_tx, steps) = mpsc::unbounded_channel();
    (steps, Arc::new(SteppedTimer { steps: steps_tx }))
}

/// An agent running against `server` with a stepped timer, its token file holding a
/// valid token for `web`.
struct RunningAgent {
    steps: Steps,
    token_file: std::path::PathBuf,
    out: std::path::PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Starts the agent on `clock`, reporting to `status`.
    fn start(server: &TestServer, clock: FakeClock, status: Arc<meshca::agent::status::Status>) -> Self {
        let dir = server.dir.path();
        let token_file = dir.join("token");
        std::fs::write(&token_file, server.token("default", "web")).unwrap();
        let out = dir.join("out");
        let (steps, timer) = stepped();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run::run_with_status(
            settings(server, &token_file, &out),
            Arc::new(clock),
            timer,
            status,
            async move {
                let _ = stopped.await;
            },
        ));
        RunningAgent { steps, token_file, out, stop, task }
    }

    /// Stops the agent and waits for it.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

/// Agent settings for the web identity against `server`.
fn settings(server: &TestServer, token_file: &std::path::Path, out: &std::path::Path) -> Settings {
    Settings {
        addr: server.url(),
        trust_anchors: server.dir.path().join("trust-anchors.pem"),
        token_file: token_file.to_owned(),
        identity: server.identity("default", "web"),
        out: out.to_owned(),
        server_name: SERVER_NAME.into(),
        key_type: meshca::agent::client::KeyType::P256,
        policy: Policy::default(),
        offset_warning: Duration::from_secs(30),
        on_renew: None,
        check_with: None,
    }
}

async fn keeps_a_certificate_fresh_with_offset(offset_secs: i64) {
    const ROTATIONS: usize = 12;
    let opts = Options {
        lifetimes: meshca::ca::profile::Lifetimes {
            issuance_lifetime: Duration::from_secs(600),
            clock_skew_allowance: Duration::from_secs(120),
        },
        ..Default::default()
    };
    let server = TestServer::start_with(opts).await;
    let agent_clock = FakeClock::at(if offset_secs >= 0 {
        server.clock.now() + Duration::from_secs(offset_secs as u64)
    } else {
        server.clock.now() - Duration::from_secs(offset_secs.unsigned_abs())
    });
    let mut agent = RunningAgent::start(&server, agent_clock.clone(), Default::default());
    let (token_file, out) = (agent.token_file.clone(), agent.out.clone());

    let mut keys = HashSet::new();
    let mut last = None;
    for rotation in 0..ROTATIONS {
        let (wait, done) = agent.steps.recv().await.expect("the agent stopped");
        // The agent just wrote its files: a fresh key, valid at the server's time.
        let key = std::fs::read_to_string(out.join("tls.key")).unwrap();
        assert!(keys.insert(key), "rotation {rotation}: key reused");
        let chain = std::fs::read_to_string(out.join("tls.crt")).unwrap();
        let expires = not_after(&chain);
        let server_now = server.clock.now();
        assert!(expires > server_now + wait, "rotation {rotation}: waits {wait:?} past expiry");
        // Renewal at about half the lifetime (600 s ± 10%), never a tight loop.
        assert!(
            wait >= Duration::from_secs(240) && wait <= Duration::from_secs(360),
            "rotation {rotation}: {wait:?}"
        );
        if rotation + 1 == ROTATIONS {
            last = Some(done); // the agent stays asleep until it is stopped
            break;
        }
        server.clock.advance(wait);
        agent_clock.advance(wait);
        // The kubelet rotates projected tokens; the agent re-reads the file.
        std::fs::write(&token_file, server.token("default", "web")).unwrap();
        done.send(()).unwrap();
    }
    agent.stop().await;
    drop(last);
    let issued = server.audit_records().iter().filter(|r| r["outcome"] == "issued").count();
    assert_eq!(issued, ROTATIONS + 1, "one request per rotation (plus the serving certificate)");
    let denied = server.audit_records().iter().filter(|r| r["outcome"] == "denied").count();
    assert_eq!(denied, 0);
}

#[tokio::test]
async fn agent_ten_minutes_ahead_keeps_a_valid_certificate_across_rotations() {
    keeps_a_certificate_fresh_with_offset(600).await;
}

#[tokio::test]
async fn agent_ten_minutes_behind_keeps_a_valid_certificate_across_rotations() {
    keeps_a_certificate_fresh_with_offset(-600).await;
}

#[tokio::test]
async fn agent_backs_off_and_keeps_its_files_while_meshca_refuses() {
    let server = TestServer::start().await;
    let mut agent = RunningAgent::start(&server, server.clock.clone(), Default::default());
    let (token_file, out) = (agent.token_file.clone(), agent.out.clone());

    let (wait, done) = agent.steps.recv().await.unwrap();
    assert!(wait > Duration::from_secs(3600), "first round renews normally");
    let first = std::fs::read(out.join("tls.crt")).unwrap();
    // Every later round is refused: the token no longer matches the identity.
    std::fs::write(&token_file, server.token("default", "db")).unwrap();
    done.send(()).unwrap();
    let mut ceilings = Vec::new();
    let mut total = Duration::ZERO;
    for attempt in 0..12u32 {
        let (wait, done) = agent.steps.recv().await.unwrap();
        let ceiling = Duration::from_millis(100).saturating_mul(1 << attempt).min(Duration::from_secs(60));
        assert!(wait <= ceiling, "attempt {attempt}: {wait:?} > {ceiling:?}");
        ceilings.push(ceiling);
        total += wait;
        assert_eq!(std::fs::read(out.join("tls.crt")).unwrap(), first, "old files kept");
        if attempt == 11 {
            // The token is fixed: the next round succeeds.
            std::fs::write(&token_file, server.token("default", "web")).unwrap();
        }
        done.send(()).unwrap();
    }
    assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(60), "backoff reaches its cap");
    assert!(total > Duration::ZERO, "backoff waits");
    let (wait, done) = agent.steps.recv().await.unwrap();
    assert!(wait > Duration::from_secs(3600), "back on the renewal schedule");
    assert_ne!(std::fs::read(out.join("tls.crt")).unwrap(), first);
    agent.stop().await;
    drop(done);
}

#[tokio::test]
async fn agent_without_a_token_renews_with_its_current_certificate() {
    let server = TestServer::start().await;
    let mut agent = RunningAgent::start(&server, server.clock.clone(), Default::default());
    let (token_file, out) = (agent.token_file.clone(), agent.out.clone());
    let (_, done) = agent.steps.recv().await.unwrap();
    let first = std::fs::read(out.join("tls.crt")).unwrap();
    std::fs::remove_file(&token_file).unwrap(); // e.g. a VM with no token source
    done.send(()).unwrap();
    let (wait, done) = agent.steps.recv().await.unwrap();
    assert!(wait > Duration::from_secs(3600), "renewed on schedule");
    assert_ne!(std::fs::read(out.join("tls.crt")).unwrap(), first);
    agent.stop().await;
    drop(done);
    let methods: Vec<_> = server
        .audit_records()
        .iter()
        .filter(|r| r["outcome"] == "issued" && r["request_id"] != "serving-certificate")
        .map(|r| r["auth_method"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["jwks", "certificate"]);
}

#[tokio::test]
async fn agent_admin_is_ready_only_with_a_valid_certificate_and_counts_rounds() {
    let server = TestServer::start().await;
    let status = Arc::new(meshca::agent::status::Status::default());
    let clock: Arc<dyn Clock> = Arc::new(server.clock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(meshca::agent::admin::serve(
        listener,
        status.clone(),
        clock.clone(),
        std::future::pending(),
    ));
    assert_eq!(http_get(admin, "/live").await.0, 200);
    assert_eq!(http_get(admin, "/ready").await.0, 503, "nothing on disk yet");

    let mut agent = RunningAgent::start(&server, server.clock.clone(), status);
    let (wait, done) = agent.steps.recv().await.unwrap();
    assert_eq!(http_get(admin, "/ready").await.0, 200);
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(metrics.contains("meshca_agent_renewals_total 1"), "{metrics}");
    assert!(metrics.contains("meshca_agent_ready 1"));
    // Past the certificate's expiry without a renewal, the agent is no longer ready.
    server.clock.advance(wait * 3);
    assert_eq!(http_get(admin, "/ready").await.0, 503);
    agent.stop().await;
    drop(done);
}

#[tokio::test]
async fn agent_rides_out_a_server_outage_longer_than_a_renewal_interval() {
    let opts = Options {
        lifetimes: meshca::ca::profile::Lifetimes {
            issuance_lifetime: Duration::from_secs(600),
            clock_skew_allowance: Duration::from_secs(120),
        },
        // The fake clock moves far ahead while TLS would judge meshca's restarted
        // serving certificate by the real clock; this test is about the outage.
        plaintext: true,
        ..Default::default()
    };
    let mut server = TestServer::start_with(opts).await;
    let mut agent = RunningAgent::start(&server, server.clock.clone(), Default::default());
    let (token_file, out) = (agent.token_file.clone(), agent.out.clone());
    let (interval, done) = agent.steps.recv().await.unwrap();
    let first = std::fs::read(out.join("tls.crt")).unwrap();
    server.stop().await.unwrap();
    server.clock.advance(interval);
    done.send(()).unwrap();
    // The server stays down for longer than a renewal interval: the agent backs off
    // (never more than the cap) and never touches the files it has.
    let mut down_for = Duration::ZERO;
    let mut rounds = 0;
    let mut step = agent.steps.recv().await.unwrap();
    while down_for <= interval {
        let (backoff, done) = step;
        assert!(backoff <= Duration::from_secs(60));
        assert_eq!(
            std::fs::read(out.join("tls.crt")).unwrap(),
            first,
            "old files kept while the server is down"
        );
        server.clock.advance(backoff);
        down_for += backoff;
        rounds += 1;
        assert!(rounds < 1000, "backoff does not grow");
        done.send(()).unwrap();
        step = agent.steps.recv().await.unwrap();
    }
    // Back up: the next round succeeds.
    server.restart().await;
    std::fs::write(&token_file, server.token("default", "web")).unwrap();
    let (_, done) = step;
    done.send(()).unwrap();
    let (wait, done) = agent.steps.recv().await.unwrap();
    assert!(
        wait >= Duration::from_secs(240),
        "back on the renewal schedule: {wait:?} (down for {down_for:?}, {rounds} rounds)"
    );
    let renewed = std::fs::read(out.join("tls.crt")).unwrap();
    assert_ne!(renewed, first);
    agent.stop().await;
    drop(done);
}
