//! `meshca doctor` against failures provoked for real on loopback: a name that does
//! not resolve (`.invalid`), a closed port, a port that never speaks TLS, another
//! CA's anchors, the wrong server name, host clocks off by ten minutes, an expired
//! certificate, a mismatched key, an expired token, a token for another audience,
//! and a healthy setup. Most tests call `doctor::run` with an injected clock; the
//! last ones run the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use meshca::agent::client::KeyType;
use meshca::agent::run::{renew_once, Settings};
use meshca::agent::schedule::Policy;
use meshca::auth::bootstrap::BootstrapSigner;
use meshca::ca::material::read_pkcs8_key;
use meshca::ca::profile::Lifetimes;
use meshca::ca::store::Snapshot;
use meshca::clock::{Clock, FakeClock, SystemClock};
use meshca::config::{BootstrapConfig, ReplayConfig};
use meshca::doctor::{self, Check, Options, Report, Status};
use support::process::{bin, command};
use support::{TestServer, SERVER_NAME};

const WEB: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
const TEN_MINUTES: Duration = Duration::from_secs(600);

/// This host's clock: meshca's, set ahead (positive) or behind (negative) by a
/// number of seconds.
struct OffsetClock(FakeClock, i64);

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        let by = Duration::from_secs(self.1.unsigned_abs());
        if self.1 >= 0 {
            self.0.now() + by
        } else {
            self.0.now() - by
        }
    }
}

/// What the agent on a healthy host has: a token file and the files it wrote.
struct Host {
    dir: tempfile::TempDir,
    options: Options,
}

impl Host {
    fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }
}

fn anchors(server: &TestServer) -> PathBuf {
    server.dir.path().join("trust-anchors.pem")
}

/// The agent's settings for `server`, writing to `out`.
fn agent_settings(server: &TestServer, token_file: &Path, out: &Path) -> Settings {
    Settings {
        addr: server.url(),
        trust_anchors: anchors(server),
        token_file: token_file.to_path_buf(),
        identity: WEB.into(),
        out: out.to_path_buf(),
        server_name: SERVER_NAME.into(),
        key_type: KeyType::P256,
        policy: Policy::default(),
        offset_warning: Duration::from_secs(30),
        on_renew: None,
        check_with: None,
    }
}

/// A host whose agent got its certificate from `server` (one round, as `certify`).
async fn healthy_host(server: &TestServer) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, server.token("default", "web")).unwrap();
    let out = dir.path().join("out");
    renew_once(&agent_settings(server, &token_file, &out), &server.clock).await.unwrap();
    let options = Options {
        addr: Some(server.url()),
        trust_anchors: Some(anchors(server)),
        token_file: Some(token_file),
        identity: Some(WEB.into()),
        cert_dir: Some(out),
        ..Options::default()
    };
    Host { dir, options }
}

/// Runs the doctor and shows its report (the test's output is the sample in docs/operations.md).
async fn diagnose(options: &Options, clock: &dyn Clock) -> Report {
    let report = doctor::run(options, clock).await;
    print!("{report}");
    assert_eq!(report.findings.len(), 6, "one finding per check:\n{report}");
    report
}

fn finding(report: &Report, check: Check) -> &doctor::Finding {
    report.finding(check).unwrap_or_else(|| panic!("no {} finding in\n{report}", check.name()))
}

#[track_caller]
fn assert_finding(report: &Report, check: Check, status: Status, needles: &[&str]) {
    let f = finding(report, check);
    assert_eq!(f.status, status, "{}:\n{report}", check.name());
    let line = f.to_string();
    for needle in needles {
        assert!(line.contains(needle), "{:?} not in {line:?}", needle);
    }
}

fn audit_issued(server: &TestServer) -> usize {
    server.audit_records().iter().filter(|r| r["outcome"] == "issued").count()
}

#[tokio::test]
async fn every_check_is_ok_for_a_healthy_setup_and_the_dry_run_issues_nothing() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let issued_before = audit_issued(&server);

    let report = diagnose(&host.options, &SystemClock).await;

    for f in &report.findings {
        assert_eq!(f.status, Status::Ok, "{f}");
        assert_eq!(f.fix, None, "{f}");
    }
    assert!(report.passed());
    assert_finding(&report, Check::Dns, Status::Ok, &["127.0.0.1 is an address"]);
    assert_finding(
        &report,
        Check::Tls,
        Status::Ok,
        &[SERVER_NAME, "spiffe://cluster.local/ns/meshca-system/sa/meshca", "leaf + 1 intermediate"],
    );
    assert_finding(
        &report,
        Check::Credentials,
        Status::Ok,
        &["tls.key matches it", "at meshca's clock", "the agent renews in about", "mode 0600"],
    );
    assert_finding(
        &report,
        Check::Token,
        Status::Ok,
        &["\"identity.l5d.io\"", &format!("meshca would issue {WEB}")],
    );
    let token = std::fs::read_to_string(host.options.token_file.as_ref().unwrap()).unwrap();
    assert!(
        !report.to_string().contains(token.trim()) && !report.to_json().contains(token.trim()),
        "the token is never printed"
    );

    // The dry run is audited, chained, and signs nothing.
    assert_eq!(audit_issued(&server), issued_before, "doctor must not cause an issuance");
    let records = server.audit_records();
    let dry = records.last().unwrap();
    assert_eq!(dry["outcome"], "denied");
    assert_eq!(dry["code"], "Ok");
    assert!(dry["reason"].as_str().unwrap().starts_with("dry_run: "), "{dry}");
    assert_eq!(dry["requested_identity"], WEB);
    assert!(dry.get("serial").is_none(), "{dry}");
    meshca::audit::verify_file(&server.audit_path).unwrap();
}

#[tokio::test]
async fn a_name_that_does_not_resolve_fails_name_resolution_with_the_resolver_error() {
    let options = Options { addr: Some("https://meshca.invalid:8080".into()), ..Options::default() };
    let report = diagnose(&options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Dns,
        Status::Fail,
        &["meshca.invalid does not resolve: ", "asked the system resolver", "getent hosts meshca.invalid"],
    );
    assert_finding(&report, Check::Tcp, Status::Warn, &["not checked: the host did not resolve"]);
    assert!(!report.passed());
}

#[tokio::test]
async fn a_host_name_is_resolved_and_every_address_listed() {
    let server = TestServer::start().await;
    let mut host = healthy_host(&server).await;
    host.options.addr = Some(format!("https://localhost:{}", server.addr.port()));
    let report = diagnose(&host.options, &server.clock).await;
    assert_finding(
        &report,
        Check::Dns,
        Status::Ok,
        &["localhost resolves to ", "127.0.0.1 (IPv4)", "via the system resolver"],
    );
    // The server listens on 127.0.0.1 only: where localhost is also ::1, that address is refused.
    assert_ne!(finding(&report, Check::Tcp).status, Status::Fail, "{report}");
    assert_finding(&report, Check::Tls, Status::Ok, &["127.0.0.1"]);
}

#[tokio::test]
async fn a_port_with_nothing_listening_is_reported_as_refused_not_filtered() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let options = Options { addr: Some(format!("https://127.0.0.1:{port}")), ..Options::default() };
    let report = diagnose(&options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Tcp,
        Status::Fail,
        &[&format!("127.0.0.1:{port} refused the connection (nothing listens there)"), "start meshca"],
    );
    assert!(!finding(&report, Check::Tcp).found.contains("firewall"));
    assert_finding(&report, Check::Tls, Status::Warn, &["not checked: no address accepted a connection"]);
}

#[tokio::test]
async fn a_port_that_accepts_but_never_completes_tls_is_a_handshake_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and holds every connection, saying nothing, until the test ends.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let naming = meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap();
    support::write_ca(dir.path(), &naming, &support::Options::default(), SystemClock.now());
    let options = Options {
        addr: Some(format!("https://{addr}")),
        trust_anchors: Some(dir.path().join("trust-anchors.pem")),
        timeout: Duration::from_millis(500),
        ..Options::default()
    };
    let started = Instant::now();
    let report = diagnose(&options, &SystemClock).await;
    let took = started.elapsed();
    assert_finding(&report, Check::Tcp, Status::Ok, &[&format!("{addr} accepted")]);
    assert_finding(
        &report,
        Check::Tls,
        Status::Fail,
        &["handshake timed out", "did not complete TLS within 500 ms"],
    );
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(5), "took {took:?}");
    holder.abort();
}

#[tokio::test]
async fn another_cas_trust_anchors_fail_tls_as_an_unknown_issuer() {
    let server = TestServer::start().await;
    let mut host = healthy_host(&server).await;
    // Another trust domain's CA, and a second CA made for the same names.
    for naming in [meshca::identity::Naming::new("other.example", "mesh").unwrap(), server.naming.clone()] {
        let other = tempfile::tempdir().unwrap();
        support::write_ca(other.path(), &naming, &support::Options::default(), SystemClock.now());
        host.options.trust_anchors = Some(other.path().join("trust-anchors.pem"));
        let report = diagnose(&host.options, &server.clock).await;
        assert_finding(
            &report,
            Check::Tls,
            Status::Fail,
            &["unknown issuer", SERVER_NAME, "does not chain to the trust anchors", "--trust-anchors"],
        );
        assert_finding(&report, Check::Clock, Status::Warn, &["not checked"]);
        // The certificate on disk does not chain to those anchors either.
        assert_finding(&report, Check::Credentials, Status::Fail, &["does not chain to the trust anchors"]);
    }
}

#[tokio::test]
async fn a_wrong_server_name_fails_tls_naming_the_name_the_server_has() {
    let server = TestServer::start().await;
    let mut host = healthy_host(&server).await;
    let wrong = "meshca.linkerd.serviceaccount.identity.linkerd.cluster.local";
    host.options.server_name = wrong.into();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Tls,
        Status::Fail,
        &["name mismatch", &format!("DNS:{SERVER_NAME}"), &format!("not for {wrong}"), "--server-name"],
    );
}

#[tokio::test]
async fn a_host_clock_ten_minutes_ahead_fails_the_clock_check() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let report = diagnose(&host.options, &OffsetClock(server.clock.clone(), 600)).await;
    assert_finding(
        &report,
        Check::Clock,
        Status::Fail,
        &["10m", "ahead of meshca's", "clock-skew allowance of 2m", "timedatectl"],
    );
    // Everything else is judged at meshca's time, and is fine.
    assert_eq!(report.failed(), ["clock"], "{report}");
}

#[tokio::test]
async fn a_host_clock_ten_minutes_behind_fails_the_clock_check() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    // meshca's serving certificate is usually hours old: make it twenty minutes old,
    // so a host ten minutes behind still accepts it and only the clock is off.
    server.clock.advance(2 * TEN_MINUTES);
    let report = diagnose(&host.options, &OffsetClock(server.clock.clone(), -600)).await;
    assert_finding(
        &report,
        Check::Clock,
        Status::Fail,
        &["10m", "behind meshca's", "not yet valid here", "chronyc"],
    );
    assert_eq!(report.failed(), ["clock"], "{report}");
}

#[tokio::test]
async fn a_host_clock_behind_a_fresh_serving_certificate_fails_tls_as_not_yet_valid() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let report = diagnose(&host.options, &OffsetClock(server.clock.clone(), -600)).await;
    assert_finding(
        &report,
        Check::Tls,
        Status::Fail,
        &["not yet valid", "this host's clock is probably behind"],
    );
}

#[tokio::test]
async fn a_clock_offset_of_a_minute_warns_without_failing() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let report = diagnose(&host.options, &OffsetClock(server.clock.clone(), -60)).await;
    assert_finding(
        &report,
        Check::Clock,
        Status::Warn,
        &["behind meshca's", "more than 30s, within meshca's allowance of 2m"],
    );
    assert!(report.passed(), "a warning is not a failure");
}

#[tokio::test]
async fn an_expired_certificate_on_disk_fails_credentials_at_meshcas_time() {
    // The meshca doctor asks must keep a valid serving certificate, so the short-lived
    // certificate comes from a second server sharing its CA.
    let server = TestServer::start().await;
    let ca = server.dir.path().to_path_buf();
    let short = support::Options {
        lifetimes: Lifetimes { issuance_lifetime: Duration::from_secs(60), ..Lifetimes::default() },
        ..support::Options::default()
    };
    let short_lived = TestServer::start_prepared(short, |dir| {
        std::fs::copy(ca.join("trust-anchors.pem"), dir.join("trust-anchors.pem")).unwrap();
        for file in ["tls.crt", "tls.key"] {
            std::fs::copy(ca.join("issuer").join(file), dir.join("issuer").join(file)).unwrap();
        }
    })
    .await;
    let mut host = healthy_host(&server).await;
    let token_file = host.options.token_file.clone().unwrap();
    renew_once(&agent_settings(&short_lived, &token_file, &host.cert_dir()), &short_lived.clock)
        .await
        .unwrap();
    server.clock.advance(TEN_MINUTES);
    std::fs::write(&token_file, server.token("default", "web")).unwrap();
    host.options.token_file = Some(token_file);

    // This host's clock agrees with meshca's.
    let report = diagnose(&host.options, &server.clock).await;
    assert_finding(
        &report,
        Check::Credentials,
        Status::Fail,
        &["expired at", "s ago by meshca's clock", "meshca agent"],
    );
    assert_eq!(report.failed(), ["credentials"], "{report}");
}

#[tokio::test]
async fn a_key_from_another_issuance_fails_credentials_as_a_mismatch() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let other = host.dir.path().join("other");
    renew_once(&agent_settings(&server, host.options.token_file.as_ref().unwrap(), &other), &server.clock)
        .await
        .unwrap();
    std::fs::copy(other.join("tls.key"), host.cert_dir().join("tls.key")).unwrap();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Credentials,
        Status::Fail,
        &["tls.key does not match tls.crt", "write them as a pair again"],
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_key_readable_by_others_fails_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let key = host.cert_dir().join("tls.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Credentials,
        Status::Fail,
        &["tls.key is mode 0644: readable by group or others", "chmod 600"],
    );
}

#[tokio::test]
async fn an_expired_token_fails_the_token_check_and_meshca_refuses_it() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let mut claims = server.claims("default", "web");
    claims.issued_at -= 2 * 6 * TEN_MINUTES;
    claims.expires_at = claims.issued_at + 6 * TEN_MINUTES;
    std::fs::write(host.options.token_file.as_ref().unwrap(), server.signer.sign(&claims).unwrap()).unwrap();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Fail,
        &[
            "expired at",
            "3600 s ago by meshca's clock",
            "meshca refuses it: Unauthenticated",
            "request id",
            "kubelet refreshes",
        ],
    );
    let refusal = server.audit_records().into_iter().last().unwrap();
    assert_eq!(refusal["outcome"], "denied");
    assert!(refusal["reason"].as_str().unwrap().starts_with("token_expired: "), "{refusal}");
    assert!(refusal["reason"].as_str().unwrap().ends_with("(dry run)"), "{refusal}");
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused_and_says_which_audience_to_request() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let mut claims = server.claims("default", "web");
    claims.audience = vec!["vault".into()];
    std::fs::write(host.options.token_file.as_ref().unwrap(), server.signer.sign(&claims).unwrap()).unwrap();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Fail,
        &[
            "aud [\"vault\"]",
            "aud lacks identity.l5d.io",
            "meshca refuses it: Unauthenticated",
            "serviceAccountToken.audience",
        ],
    );
}

#[tokio::test]
async fn a_token_for_another_service_account_names_the_identity_it_may_request() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    std::fs::write(host.options.token_file.as_ref().unwrap(), server.token("default", "db")).unwrap();
    let report = diagnose(&host.options, &SystemClock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Fail,
        &["PermissionDenied", "--identity db.default.serviceaccount.identity.meshca-system.cluster.local"],
    );
}

/// A signer with the server's current issuer, as `meshca bootstrap-token create` has.
fn bootstrap_signer(server: &TestServer) -> BootstrapSigner {
    let dir = server.dir.path();
    let snapshot =
        Snapshot::load(&dir.join("trust-anchors.pem"), &dir.join("issuer"), server.clock.now()).unwrap();
    let key = read_pkcs8_key(&dir.join("issuer/tls.key")).unwrap();
    BootstrapSigner::new(&key, &snapshot.issuer, server.naming.clone()).unwrap()
}

#[tokio::test]
async fn a_bootstrap_token_is_read_as_one_and_dry_run_without_spending_a_use() {
    let replay = ReplayConfig::File("bootstrap-used.jsonl".into());
    let bootstrap = Some(BootstrapConfig { replay, leeway: Duration::from_secs(60) });
    let server = TestServer::start_with(support::Options { bootstrap, ..support::Options::default() }).await;
    let issued_before = audit_issued(&server);
    let signer = bootstrap_signer(&server);
    let now = server.clock.now();
    let (token, claims) = signer.create(WEB, Duration::from_secs(3600), 2, now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("bootstrap.token");
    std::fs::write(&token_file, format!("{}\n", token.expose())).unwrap();
    // A host before its first certificate: no --cert-dir yet.
    let mut options = Options {
        addr: Some(server.url()),
        trust_anchors: Some(anchors(&server)),
        token_file: Some(token_file.clone()),
        identity: Some(WEB.into()),
        ..Options::default()
    };

    let report = diagnose(&options, &server.clock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Ok,
        &[
            "holds a bootstrap token (not verified here)",
            &format!("sub \"{WEB}\""),
            &format!("token id \"{}\"", claims.token_id),
            &format!("kid \"{}\"", signer.kid()),
            "good for 2 certificate(s)",
            "expires ",
            "s by meshca's clock",
            &format!("meshca would issue {WEB}"),
        ],
    );
    assert!(!finding(&report, Check::Token).found.contains("does not hold a JWT"));
    let secret = token.expose();
    assert!(
        !report.to_string().contains(secret) && !report.to_json().contains(secret),
        "the token is printed"
    );
    assert_eq!(audit_issued(&server), issued_before, "doctor must not cause an issuance");
    let spent = std::fs::read_to_string(server.dir.path().join("bootstrap-used.jsonl")).unwrap_or_default();
    assert!(!spent.contains(&claims.token_id), "a dry run spent a use: {spent}");

    // For another identity than the one requested: said offline, refused by meshca.
    let db = server.identity("default", "db");
    options.identity = Some(db.clone());
    let report = diagnose(&options, &server.clock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Fail,
        &[&format!("it is for \"{WEB}\", not for the identity requested, {db}"), "PermissionDenied"],
    );
    options.identity = Some(WEB.into());

    // Expired by meshca's clock: a new one is needed.
    let (expired, _) = signer.create(WEB, Duration::from_secs(600), 1, now - 2 * TEN_MINUTES * 6).unwrap();
    std::fs::write(&token_file, expired.expose()).unwrap();
    let report = diagnose(&options, &server.clock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Fail,
        &[
            "expired at",
            "s ago by meshca's clock",
            "meshca refuses it: Unauthenticated",
            &format!("meshca bootstrap-token create --identity \"{WEB}\""),
        ],
    );

    // With a valid certificate on disk the agent renews with that: the expired
    // token is a warning, not a failure.
    let host = healthy_host(&server).await;
    options.cert_dir = host.options.cert_dir.clone();
    let report = diagnose(&options, &server.clock).await;
    assert_finding(
        &report,
        Check::Token,
        Status::Warn,
        &[
            "expired at",
            "the agent renews with it and presents the token only if meshca refuses the certificate",
        ],
    );
    assert!(report.passed(), "{report}");
}

// The real binary.

/// `meshca doctor ARGS` with no `MESHCA_*` settings inherited: (exit code, stdout, stderr).
async fn doctor_binary(args: &[String]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::from(command(bin()));
    cmd.arg("doctor").args(args).env("NO_COLOR", "1").kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("doctor did not finish")
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

fn flags(options: &Options) -> Vec<String> {
    let mut args = Vec::new();
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            args.extend([name.to_owned(), v]);
        }
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    flag("--addr", options.addr.clone());
    flag("--trust-anchors", path(&options.trust_anchors));
    flag("--token-file", path(&options.token_file));
    flag("--identity", options.identity.clone());
    flag("--cert-dir", path(&options.cert_dir));
    args
}

#[tokio::test]
async fn the_binary_prints_six_ok_lines_and_exits_0_for_a_healthy_setup() {
    let server = TestServer::start().await;
    let host = healthy_host(&server).await;
    let (code, stdout, stderr) = doctor_binary(&flags(&host.options)).await;
    print!("{stdout}");
    assert_eq!(code, Some(0), "stdout:\n{stdout}stderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let names: Vec<&str> = lines.iter().map(|l| l[6..].split(':').next().unwrap()).collect();
    assert_eq!(names, ["dns", "tcp", "tls", "clock", "credentials", "token"], "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("OK    ")), "{stdout}");
}

#[tokio::test]
async fn the_binary_exits_1_naming_the_failed_checks() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (code, stdout, stderr) = doctor_binary(&[format!("--addr=https://127.0.0.1:{port}")]).await;
    assert_eq!(code, Some(1), "stdout:\n{stdout}stderr:\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  tcp: ") && l.contains("refused")), "{stdout}");
    assert_eq!(stderr.trim_end(), "meshca: doctor: failed: tcp");
}

#[tokio::test]
async fn the_binary_prints_one_json_entry_per_check_with_json() {
    let server = TestServer::start().await;
    let mut host = healthy_host(&server).await;
    host.options.server_name = "meshca.other.serviceaccount.identity.other.cluster.local".into();
    let mut args = flags(&host.options);
    args.extend(["--server-name".into(), host.options.server_name.clone(), "--json".into()]);
    let (code, stdout, stderr) = doctor_binary(&args).await;
    assert_eq!(code, Some(1), "stdout:\n{stdout}stderr:\n{stderr}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("one JSON document");
    let checks: Vec<&str> = entries.iter().map(|e| e["check"].as_str().unwrap()).collect();
    assert_eq!(checks, ["dns", "tcp", "tls", "clock", "credentials", "token"]);
    for e in &entries {
        assert!(["OK", "WARN", "FAIL"].contains(&e["status"].as_str().unwrap()), "{e}");
        assert!(e["found"].is_string(), "{e}");
        assert_eq!(e["fix"].is_null(), e["status"] == "OK", "{e}");
    }
    assert_eq!(entries[2]["status"], "FAIL");
    assert!(entries[2]["found"].as_str().unwrap().starts_with("name mismatch"), "{}", entries[2]);
}

#[tokio::test]
async fn the_binary_exits_2_for_unusable_flags() {
    for args in [["--addr", "meshca:8080"], ["--timeout", "soon"]] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (code, stdout, stderr) = doctor_binary(&args).await;
        assert_eq!(code, Some(2), "{args:?}: stdout:\n{stdout}stderr:\n{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
    }
}
