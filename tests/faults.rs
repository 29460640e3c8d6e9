//! Fault injection, end to end: what meshca does when the things it depends on
//! fail underneath it, and that it recovers by itself when they come back.
//!
//! - Audit sink: disk full (a real file size limit, `RLIMIT_FSIZE`, and a real
//!   full tmpfs where mounts are allowed), an fsync error (the one fault a real
//!   file cannot produce on demand: [`meshca::audit::AuditLog::fail_syncs`], a
//!   test double inside the writer), the file removed, the path unopenable, the
//!   file rotated (renamed) underneath. Certify fails closed (`Unavailable`, no
//!   certificate, no record), `/ready` turns 503, and both come back without
//!   help; `meshca audit verify` passes across the gap, which is recorded.
//! - Issuer: its key file unreadable, the clock jumping past its expiry:
//!   `FailedPrecondition` and 503 until a valid issuer is loaded. (tests/reload.rs
//!   covers a key from another issuer, key-like garbage, a not-yet-valid issuer
//!   and the periodic re-check; tests/certify.rs the expiry clamp and
//!   `issuer_expired` in the record.)
//! - Token backend: TokenReview flapping and answering garbage; the JWKS
//!   replaced (old keys retired) and garbled mid-run. (tests/tokenreview.rs
//!   covers an API server slower than the timeout, 500s and refused connections;
//!   tests/discovery.rs key rotation, shared and throttled refreshes.)
//! - Process: SIGKILL during a burst of issuances: every certificate a client
//!   received has a record, the log verifies, and the next start cuts off an
//!   interrupted write and records the gap.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshca::audit::{sha256_hex, verify_file, AuditLog};
use meshca::ca::hierarchy::HierarchyLifetimes;
use meshca::ca::reload::Outcome;
use meshca::clock::Clock;
use meshca::config::{KeyRefresh, KeySource, TokenConfig};
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::{CertifyRequest, CertifyResponse};
use support::apiserver::{ApiServer, Mode};
use support::process::{bin, ServeBin, PATIENCE};
use support::{chain, http_get, issuer_under_anchor, request_id, wait_ready, Options, TestServer, AUDIENCE};
use tonic::transport::Channel;
use tonic::Code;

// ---------------------------------------------------------------------------
// Helpers

/// `meshca audit verify FILE`: exit code and stderr.
fn audit_verify(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(["audit", "verify"]).arg(path).env("NO_COLOR", "1").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The audit records in a file, parsed (a final line without newline left out).
fn records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Fingerprints of the certificates the records say were issued.
fn issued_fingerprints(records: &[serde_json::Value]) -> HashSet<String> {
    records
        .iter()
        .filter(|r| r["outcome"] == "issued")
        .map(|r| r["fingerprint_sha256"].as_str().unwrap().to_owned())
        .collect()
}

/// Certify for `web` must be refused as `Unavailable` because of the audit log,
/// with no certificate and no record.
async fn refused_for_audit(server: &TestServer, client: &mut IdentityClient<Channel>) {
    let status = client.certify(server.request("default", "web").1).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(status.message().contains("audit log cannot be written"), "{}", status.message());
    let id = request_id(status.metadata());
    assert!(
        server.audit_records().iter().all(|r| r["request_id"] != id.as_str()),
        "a refused decision was recorded"
    );
}

/// Certify for `web` must succeed; returns the leaf's fingerprint, after
/// checking that the server's audit log names it.
async fn issued(server: &TestServer, client: &mut IdentityClient<Channel>) -> String {
    let resp = client.certify(server.request("default", "web").1).await.unwrap().into_inner();
    let fingerprint = sha256_hex(&resp.leaf_certificate);
    assert!(issued_fingerprints(&server.audit_records()).contains(&fingerprint), "issued without a record");
    fingerprint
}

fn audit_of(server: &TestServer) -> AuditLog {
    server.handles.as_ref().expect("the server did not start").audit.clone()
}

/// One certificate for `web`; its fingerprint.
async fn issue_one(serve: &ServeBin, client: &mut IdentityClient<Channel>) -> String {
    let resp = client.certify(serve.request("web")).await.unwrap().into_inner();
    sha256_hex(&resp.leaf_certificate)
}

/// Certify until one is refused (at most `max` tries): the fingerprints issued
/// before, and the refusal.
async fn issue_until_refused(
    serve: &ServeBin,
    client: &mut IdentityClient<Channel>,
    max: usize,
) -> (Vec<String>, tonic::Status) {
    let mut fingerprints = Vec::new();
    for _ in 0..max {
        match client.certify(serve.request("web")).await {
            Ok(resp) => fingerprints.push(sha256_hex(&resp.into_inner().leaf_certificate)),
            Err(status) => return (fingerprints, status),
        }
    }
    panic!("{max} certificates issued and none refused");
}

// ---------------------------------------------------------------------------
// Audit sink

#[tokio::test]
async fn an_fsync_error_refuses_issuance_turns_unready_and_recovery_records_the_gap() {
    let server = TestServer::start().await;
    let audit = audit_of(&server);
    let mut client = server.client().await;
    let before = issued(&server, &mut client).await;
    assert_eq!(http_get(server.admin, "/ready").await.0, 200);

    // The test double: syncs fail after the write went through (the one fault
    // a real file cannot be made to produce on demand).
    audit.fail_syncs(true).await;
    for _ in 0..3 {
        refused_for_audit(&server, &mut client).await;
    }
    assert!(audit.is_failing());
    let body = wait_ready(server.admin, 503).await;
    assert!(body.contains("audit log is failing"), "{body}");
    assert_eq!(verify_file(&server.audit_path).unwrap().incomplete_tail, None, "nothing unsynced left");

    // The sink recovers: so does meshca, with no request to prompt it.
    audit.fail_syncs(false).await;
    wait_ready(server.admin, 200).await;
    assert!(!audit.is_failing());
    let after = issued(&server, &mut client).await;

    let records = server.audit_records();
    let gap = records.iter().find(|r| r["outcome"] == "gap").expect("a gap record");
    assert_eq!(gap["refused"], 3, "{gap}");
    assert!(gap["error"].as_str().unwrap().contains("fsync"), "{gap}");
    let fingerprints = issued_fingerprints(&records);
    assert!(fingerprints.contains(&before) && fingerprints.contains(&after));
    let (code, stderr) = audit_verify(&server.audit_path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("1 gap(s) recorded: 3 decision(s) refused"), "{stderr}");
}

/// What the disk-full tests find in the log after recovery.
fn assert_gap_recovered(log: &Path, issued: &[String], refused: u64, error: &str) {
    let report = verify_file(log).unwrap();
    assert_eq!((report.gaps, report.refused, report.incomplete_tail), (1, refused, None), "{report:?}");
    let records = records(log);
    let gap = records.iter().find(|r| r["outcome"] == "gap").unwrap();
    assert!(gap["error"].as_str().unwrap().contains(error), "{gap}");
    let recorded = issued_fingerprints(&records);
    for fingerprint in issued {
        assert!(recorded.contains(fingerprint), "certificate {fingerprint} was handed out without a record");
    }
    let (code, stderr) = audit_verify(log);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("gap(s) recorded"), "{stderr}");
}

/// Sets process `pid`'s file size limit (`RLIMIT_FSIZE`) with util-linux's prlimit.
fn set_file_size_limit(pid: u32, value: &str) {
    let status =
        Command::new("prlimit").args(["--pid", &pid.to_string(), &format!("--fsize={value}:")]).status();
    assert!(status.expect("prlimit (util-linux) is needed for this test").success());
}

/// Sets `serve`'s file size limit to room for about one more record after `log`'s
/// end (the next write is cut off mid-line) and issues until refused, adding what
/// was handed out; the limit, and the refusal, which must be `Unavailable`.
async fn refused_at_a_file_size_limit(
    serve: &ServeBin,
    client: &mut IdentityClient<Channel>,
    log: &Path,
    handed_out: &mut Vec<String>,
) -> (u64, tonic::Status) {
    let limit = std::fs::metadata(log).unwrap().len() + 1200;
    set_file_size_limit(serve.pid(), &limit.to_string());
    let (issued, status) = issue_until_refused(serve, client, 10).await;
    handed_out.extend(issued);
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    (limit, status)
}

#[tokio::test]
async fn a_file_size_limit_reached_mid_record_fails_closed_and_recovers_when_lifted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // meshca handles SIGXFSZ itself: past the limit, writes fail with EFBIG.
    let mut serve = ServeBin::start(&[], "exec \"$@\"", &data, &[]).await;
    let log = data.join("audit.jsonl");
    let mut client = serve.client().await;
    let mut handed_out = vec![issue_one(&serve, &mut client).await];
    let (limit, status) = refused_at_a_file_size_limit(&serve, &mut client, &log, &mut handed_out).await;
    assert!(status.message().contains("audit"), "{}", status.message());
    let body = wait_ready(serve.admin, 503).await;
    assert!(body.contains("audit log is failing"), "{body}");
    // Refused again while the limit holds; the partial line was cut off at once.
    assert_eq!(client.certify(serve.request("web")).await.unwrap_err().code(), Code::Unavailable);
    assert!(std::fs::metadata(&log).unwrap().len() <= limit);
    let report = verify_file(&log).unwrap();
    assert_eq!((report.gaps, report.incomplete_tail), (0, None), "{report:?}");

    set_file_size_limit(serve.pid(), "unlimited");
    wait_ready(serve.admin, 200).await;
    let resp = client.certify(serve.request("web")).await.unwrap().into_inner();
    handed_out.push(sha256_hex(&resp.leaf_certificate));
    serve.stop().await;
    assert_gap_recovered(&log, &handed_out, 2, "os error 27");
}

#[tokio::test]
async fn a_full_tmpfs_fails_closed_and_recovers_when_space_returns() {
    // A 64 KiB tmpfs in a mount namespace of meshca's own; where mounts are not
    // allowed (unprivileged CI), the file size limit test above covers the path.
    let mount = tempfile::tempdir().unwrap();
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=64k meshca-probe \"$0\""])
        .arg(mount.path())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs in a new mount namespace here (needs CAP_SYS_ADMIN)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let wrapper = "mount -t tmpfs -o size=64k meshca-faults \"$FAULTS_MOUNT\" && exec \"$@\"";
    let set_mount = format!("FAULTS_MOUNT={}", mount.path().display());
    let log_arg = mount.path().join("audit.jsonl");
    let log_arg = ["--audit-log", log_arg.to_str().unwrap()];
    let mut serve = ServeBin::start(&["env", &set_mount, "unshare", "-m"], wrapper, &data, &log_arg).await;
    // The tmpfs exists only in meshca's namespace: reach it through /proc/PID/root.
    let inside = PathBuf::from(format!("/proc/{}/root{}", serve.pid(), mount.path().display()));
    let log = inside.join("audit.jsonl");
    let mut client = serve.client().await;
    let mut handed_out = vec![issue_one(&serve, &mut client).await];
    assert!(!std::fs::read_to_string(&log).unwrap().is_empty());

    // Fill it.
    let filler = inside.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let full = loop {
        match std::io::Write::write_all(&mut file, &[0u8; 1024]) {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "{full}");
    drop(file);
    let (issued, status) = issue_until_refused(&serve, &mut client, 10).await;
    handed_out.extend(issued);
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let body = wait_ready(serve.admin, 503).await;
    assert!(body.contains("audit log is failing"), "{body}");

    std::fs::remove_file(&filler).unwrap();
    wait_ready(serve.admin, 200).await;
    let resp = client.certify(serve.request("web")).await.unwrap().into_inner();
    handed_out.push(sha256_hex(&resp.leaf_certificate));
    // The log goes with the namespace: copy it out before stopping.
    let copy = tmp.path().join("audit.jsonl");
    std::fs::copy(&log, &copy).unwrap();
    serve.stop().await;
    assert_gap_recovered(&copy, &handed_out, 1, "os error 28");
}

#[tokio::test]
async fn an_audit_file_removed_underneath_is_recreated_and_an_unopenable_path_fails_closed_until_fixed() {
    let server = TestServer::start().await;
    let audit = audit_of(&server);
    let mut client = server.client().await;
    let first = issued(&server, &mut client).await;
    let last_hash = verify_file(&server.audit_path).unwrap().last_hash.unwrap();

    // Removed: the next decision goes to a new file at the path, which says what it continues.
    std::fs::remove_file(&server.audit_path).unwrap();
    let second = issued(&server, &mut client).await;
    let report = verify_file(&server.audit_path).unwrap();
    let continues = report.continues.expect("a continued record");
    assert_eq!(
        (continues.previous_file.as_str(), continues.previous_hash.as_str()),
        ("removed", last_hash.as_str())
    );
    assert!(issued_fingerprints(&server.audit_records()).contains(&second));
    assert!(
        !issued_fingerprints(&server.audit_records()).contains(&first),
        "the old records went with the file"
    );

    // Removed, and a directory in its place: nothing can be recorded, nothing issued.
    std::fs::remove_file(&server.audit_path).unwrap();
    std::fs::create_dir(&server.audit_path).unwrap();
    refused_for_audit(&server, &mut client).await;
    refused_for_audit(&server, &mut client).await;
    assert!(audit.is_failing());
    wait_ready(server.admin, 503).await;

    std::fs::remove_dir(&server.audit_path).unwrap();
    wait_ready(server.admin, 200).await;
    let third = issued(&server, &mut client).await;
    let report = verify_file(&server.audit_path).unwrap();
    assert_eq!((report.gaps, report.refused), (1, 2), "{report:?}");
    assert_eq!(report.continues.unwrap().previous_file, "removed");
    assert!(issued_fingerprints(&server.audit_records()).contains(&third));
    let (code, stderr) = audit_verify(&server.audit_path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("continues a previous log (removed)") && stderr.contains("1 gap(s)"), "{stderr}");
}

#[tokio::test]
async fn an_audit_file_rotated_underneath_is_followed_and_the_two_files_join() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut handed_out = Vec::new();
    for _ in 0..3 {
        handed_out.push(issued(&server, &mut client).await);
    }
    let rotated = server.audit_path.with_extension("jsonl.1");
    std::fs::rename(&server.audit_path, &rotated).unwrap();
    for _ in 0..3 {
        handed_out.push(issued(&server, &mut client).await);
    }
    assert!(!audit_of(&server).is_failing());
    assert_eq!(http_get(server.admin, "/ready").await.0, 200);

    let old = verify_file(&rotated).unwrap();
    let new = verify_file(&server.audit_path).unwrap();
    let continues = new.continues.clone().expect("the new file names the old one's end");
    assert_eq!(continues.seq, 1);
    assert_eq!(continues.previous_file, "renamed");
    assert_eq!((continues.previous_seq, Some(continues.previous_hash)), (old.records, old.last_hash));
    assert_eq!(new.gaps, 0, "nothing was lost");
    let mut recorded = issued_fingerprints(&records(&rotated));
    recorded.extend(issued_fingerprints(&records(&server.audit_path)));
    for fingerprint in &handed_out {
        assert!(recorded.contains(fingerprint), "certificate {fingerprint} has no record in either file");
    }
    for file in [&rotated, &server.audit_path] {
        let (code, stderr) = audit_verify(file);
        assert_eq!(code, Some(0), "{stderr}");
    }
}

// ---------------------------------------------------------------------------
// Issuer

#[tokio::test]
async fn an_unreadable_issuer_key_at_start_stops_start_up() {
    let mut server = TestServer::start_prepared(Options::default(), |dir| {
        // Root ignores mode bits, so "unreadable" is a directory where the key should be.
        std::fs::remove_file(dir.join("issuer/tls.key")).unwrap();
        std::fs::create_dir(dir.join("issuer/tls.key")).unwrap();
    })
    .await;
    assert!(server.handles.is_none());
    let err = server.stop().await.unwrap_err().to_string();
    assert!(err.contains("tls.key"), "{err}");
}

#[tokio::test]
async fn an_unreadable_key_keeps_the_loaded_issuer_and_its_expiry_refuses_until_a_valid_issuer_is_loaded() {
    let hierarchy = HierarchyLifetimes { issuer: Duration::from_secs(7200), ..HierarchyLifetimes::default() };
    let server = TestServer::start_with(Options { hierarchy, ..Default::default() }).await;
    let dir = server.dir.path();
    let start = server.clock.now();
    // One connection for the whole test: its TLS session outlives the serving
    // certificates that later reloads issue at the moved clock.
    let mut client = server.client().await;
    let old_issuer = std::fs::read(dir.join("issuer/tls.crt")).unwrap();

    // The key file becomes unreadable (a directory: root ignores mode bits).
    std::fs::remove_file(dir.join("issuer/tls.key")).unwrap();
    std::fs::create_dir(dir.join("issuer/tls.key")).unwrap();
    let outcome = server.reloader().check();
    assert!(matches!(outcome, Outcome::Failed(meshca::ca::Error::Read { .. })), "{outcome:?}");
    // The key in memory still signs: nothing to refuse yet.
    issued(&server, &mut client).await;
    assert_eq!(http_get(server.admin, "/ready").await.0, 200);

    // The clock jumps forward past the issuer's expiry.
    server.clock.set(start + Duration::from_secs(3 * 3600));
    let status = client.certify(server.request("default", "web").1).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("issuer_expired"), "{record}");
    let body = wait_ready(server.admin, 503).await;
    assert!(body.contains("the issuer expired"), "{body}");
    // Still unreadable: still refused.
    assert!(matches!(server.reloader().check(), Outcome::Failed(_)));
    assert_eq!(
        client.certify(server.request("default", "web").1).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // A valid issuer arrives (under the same anchor, valid at the moved clock).
    let (crt, key) = issuer_under_anchor(dir, server.clock.now());
    std::fs::remove_dir(dir.join("issuer/tls.key")).unwrap();
    std::fs::write(dir.join("issuer/tls.key"), key).unwrap();
    let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(dir.join("issuer/tls.key"), owner_only).unwrap();
    std::fs::write(dir.join("issuer/tls.crt"), &crt).unwrap();
    let outcome = server.reloader().check();
    assert!(matches!(outcome, Outcome::Reloaded(_)), "{outcome:?}");
    wait_ready(server.admin, 200).await;
    let resp = client.certify(server.request("default", "web").1).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    assert_ne!(intermediates[0].as_ref(), &old_issuer[..]);
    server.anchors.verify(&leaf, &intermediates, server.clock.now(), None).unwrap();
}

// ---------------------------------------------------------------------------
// Token backend

struct Cluster {
    api: ApiServer,
    server: TestServer,
}

async fn tokenreview_cluster() -> Cluster {
    let api = ApiServer::start().await;
    let token = api.tokenreview_config();
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    Cluster { api, server }
}

impl Cluster {
    /// A request for `web` with a fresh token from the cluster (ECDSA: a new one each call).
    fn request(&self) -> CertifyRequest {
        let token = self.api.token(&self.server.claims("default", "web"));
        CertifyRequest { token, ..self.server.request("default", "web").1 }
    }

    fn request_with(&self, token: &[u8]) -> CertifyRequest {
        CertifyRequest { token: token.to_vec(), ..self.server.request("default", "web").1 }
    }

    async fn unavailable(&self, client: &mut IdentityClient<Channel>, request: CertifyRequest, says: &str) {
        let status = client.certify(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(status.message().contains(says), "{}", status.message());
        let record = self.server.audit_record(&request_id(status.metadata()));
        assert!(record["reason"].as_str().unwrap().starts_with("backend_unavailable:"), "{record}");
        assert!(record.get("serial").is_none());
    }
}

#[tokio::test]
async fn a_flapping_api_server_refuses_only_what_it_cannot_review_and_readiness_holds() {
    let c = tokenreview_cluster().await;
    let mut client = c.server.client().await;
    let reviewed = c.request();
    client.certify(reviewed.clone()).await.unwrap();
    const FLAPS: usize = 5;
    for _ in 0..FLAPS {
        c.api.set_mode(Mode::Fail500);
        let new = c.request();
        c.unavailable(&mut client, new.clone(), "answered 500").await;
        // A token reviewed while it was up is served from the cache meanwhile.
        client.certify(reviewed.clone()).await.unwrap();
        c.api.set_mode(Mode::Answer);
        // The failure was not remembered: the same token gets its review now.
        client.certify(c.request_with(&new.token)).await.unwrap();
        assert_eq!(http_get(c.server.admin, "/ready").await.0, 200, "a flap shorter than the threshold");
    }
    assert_eq!(c.api.calls(), 1 + 2 * FLAPS, "one review per new token, plus one per failure");
}

#[tokio::test]
async fn an_api_server_answering_garbage_is_unavailable_and_not_cached() {
    let c = tokenreview_cluster().await;
    let mut client = c.server.client().await;
    c.api.set_mode(Mode::Garbage);
    let request = c.request();
    c.unavailable(&mut client, request.clone(), "does not parse").await;
    c.api.set_mode(Mode::Answer);
    let resp = client.certify(request).await.unwrap();
    assert!(!resp.get_ref().leaf_certificate.is_empty());
    assert_eq!(c.api.calls(), 2);
}

async fn jwks_cluster(refresh: KeyRefresh) -> Cluster {
    let api = ApiServer::start().await;
    let token = TokenConfig::Jwks(meshca::config::JwksSettings {
        keys: KeySource::Discovery { kubeconfig: Some(api.kubeconfig.clone()) },
        issuer: None,
        audiences: vec![AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        refresh,
        confirm_pod: None,
    });
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    Cluster { api, server }
}

/// Certify with `token` must be refused as unauthenticated with this reason code.
async fn unauthenticated(c: &Cluster, client: &mut IdentityClient<Channel>, token: &[u8], reason: &str) {
    let status = client.certify(c.request_with(token)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    let record = c.server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with(reason), "{record}");
}

#[tokio::test]
async fn jwks_keys_replaced_mid_run_retire_the_old_key_and_garbage_keeps_the_held_keys() {
    let refresh = KeyRefresh { refresh_min_interval: Duration::ZERO, ..KeyRefresh::default() };
    let c = jwks_cluster(refresh).await;
    let mut client = c.server.client().await;
    let claims = || c.server.claims("default", "web");
    let first = c.api.token(&claims());
    client.certify(c.request_with(&first)).await.unwrap();

    // The cluster replaces its keys: the old one is retired.
    c.api.replace_keys();
    let second = c.api.token(&claims());
    client.certify(c.request_with(&second)).await.unwrap();
    unauthenticated(&c, &mut client, &first, "unknown_key").await;

    // A garbled key set keeps the keys held: the current token still works, a
    // token with a key the garbage may have held is refused, nothing crashes.
    c.api.set_discovery_mode(Mode::Garbage);
    let jwks_calls = c.api.jwks_calls();
    c.api.rotate();
    let third = c.api.token(&claims());
    unauthenticated(&c, &mut client, &third, "unknown_key").await;
    assert!(c.api.jwks_calls() > jwks_calls, "a refresh was tried");
    client.certify(c.request_with(&second)).await.unwrap();

    c.api.set_discovery_mode(Mode::Answer);
    client.certify(c.request_with(&third)).await.unwrap();
    assert_eq!(http_get(c.server.admin, "/ready").await.0, 200);
}

// ---------------------------------------------------------------------------
// Process

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_a_burst_leaves_a_record_of_every_certificate_handed_out() {
    const CLIENTS: usize = 24;
    const BEFORE_KILL: usize = 150;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start(&[], "exec \"$@\"", &data, &[]).await;
    let log = data.join("audit.jsonl");

    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = serve.client().await;
        let requests: Vec<CertifyRequest> = (0..200).map(|_| serve.request(&format!("burst-{i}"))).collect();
        let (received, killed) = (received.clone(), killed.clone());
        clients.push(tokio::spawn(async move {
            let mut refused_after_kill = 0;
            for request in requests {
                match client.certify(request).await {
                    Ok(resp) => {
                        let resp: CertifyResponse = resp.into_inner();
                        received.lock().unwrap().push(sha256_hex(&resp.leaf_certificate));
                    }
                    Err(status) => {
                        assert!(killed.load(Ordering::SeqCst), "refused before the kill: {status:?}");
                        refused_after_kill += 1;
                        break;
                    }
                }
            }
            refused_after_kill
        }));
    }
    let deadline = Instant::now() + PATIENCE;
    while received.lock().unwrap().len() < BEFORE_KILL {
        assert!(Instant::now() < deadline, "the burst did not get going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, Ordering::SeqCst);
    serve.process.child.kill().unwrap(); // SIGKILL, mid-burst
    serve.wait_exit().await;
    let mut cut_short = 0;
    for client in clients {
        cut_short += client.await.unwrap();
    }
    assert!(cut_short > 0, "no request was in flight at the kill");

    // Every certificate a client got has its record, and the log verifies (up
    // to an interrupted final write, if the kill cut one).
    let received = received.lock().unwrap().clone();
    let report = verify_file(&log).unwrap();
    let recorded = issued_fingerprints(&records(&log));
    let missing: Vec<_> = received.iter().filter(|f| !recorded.contains(*f)).collect();
    assert!(missing.is_empty(), "{} of {} certificates without a record", missing.len(), received.len());
    assert!(report.records as usize > received.len(), "serving certificate + every one handed out");
    eprintln!(
        "SIGKILL: {} certificates received, {} records, {} requests cut short, incomplete tail: {:?}",
        received.len(),
        report.records,
        cut_short,
        report.incomplete_tail
    );

    // Make the interrupted write certain: half a record, no newline, as a kill
    // in the middle of a write leaves it.
    if report.incomplete_tail.is_none() {
        let last = std::fs::read_to_string(&log).unwrap().lines().last().unwrap().to_owned();
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut file, &last.as_bytes()[..last.len() / 2]).unwrap();
    }
    let torn = verify_file(&log).unwrap();
    assert_eq!(torn.records, report.records);
    let torn_bytes = torn.incomplete_tail.expect("an incomplete final line");
    let (code, stderr) = audit_verify(&log);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&format!("intact, {} records", torn.records)), "{stderr}");
    assert!(stderr.contains(&format!("the final line is incomplete ({torn_bytes} bytes")), "{stderr}");

    // The next start cuts it off, records the gap, and carries on.
    let mut again = ServeBin::start(&[], "exec \"$@\"", &data, &[]).await;
    let after = verify_file(&log).unwrap();
    assert_eq!((after.incomplete_tail, after.gaps, after.torn), (None, 1, 1), "{after:?}");
    let mut client = again.client().await;
    let resp = client.certify(again.request("web")).await.unwrap().into_inner();
    again.stop().await;
    let records = records(&log);
    let gap = records.iter().find(|r| r["outcome"] == "gap").unwrap();
    assert_eq!(gap["torn_bytes"], torn_bytes, "{gap}");
    let recorded = issued_fingerprints(&records);
    assert!(received.iter().all(|f| recorded.contains(f)));
    assert!(recorded.contains(&sha256_hex(&resp.leaf_certificate)));
    let (code, stderr) = audit_verify(&log);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("1 gap(s) recorded: 0 decision(s) refused")
            && stderr.contains("1 incomplete line(s) cut off at start"),
        "{stderr}"
    );
    assert!(!stderr.contains("final line is incomplete"), "{stderr}");
}

#[tokio::test]
async fn logs_that_cannot_be_written_are_dropped_and_counted_and_the_audit_writer_recovers() {
    // stderr is /dev/full: every log line fails to be written. The audit log then
    // reaches a file size limit, which the audit writer logs as it fails closed.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start_quiet(&[], "exec \"$@\" 2>/dev/full", &data, &[]).await;
    let log = data.join("audit.jsonl");
    let mut client = serve.client().await;
    let mut handed_out = vec![issue_one(&serve, &mut client).await];
    refused_at_a_file_size_limit(&serve, &mut client, &log, &mut handed_out).await;
    wait_ready(serve.admin, 503).await;

    set_file_size_limit(serve.pid(), "unlimited");
    wait_ready(serve.admin, 200).await;
    let resp = client.certify(serve.request("web")).await.expect("issuing again once the limit is lifted");
    handed_out.push(sha256_hex(&resp.into_inner().leaf_certificate));
    let (_, metrics) = support::http_get(serve.admin, "/metrics").await;
    let dropped = support::sample(&metrics, "meshca_log_write_failures_total");
    assert!(dropped > 0, "the failed log lines are counted: {dropped}");
    assert!(serve.process.child.try_wait().unwrap().is_none(), "meshca is still running");
    serve.stop().await;
    assert_gap_recovered(&log, &handed_out, 1, "os error 27");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_refusal_flood_grows_the_audit_log_by_the_quota_not_by_its_rate() {
    use meshca::audit::quota::{PER_PEER_BURST, PER_PEER_RATE};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start(&[], "exec \"$@\"", &data, &[]).await;
    let log = data.join("audit.jsonl");
    let client = serve.client().await;
    let bad = CertifyRequest { token: b"not.a.token".to_vec(), ..serve.request("web") };
    let before = std::fs::metadata(&log).unwrap().len();
    // Eight callers on one connection, refusing as fast as meshca answers, for 5 s.
    let seconds = 5.0;
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let (mut client, bad) = (client.clone(), bad.clone());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while tokio::time::Instant::now() < until {
                    assert_eq!(client.certify(bad.clone()).await.unwrap_err().code(), Code::Unauthenticated);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for flood in floods {
        sent += flood.await.unwrap();
    }
    serve.stop().await;
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    let records = records(&log);
    let one_by_one =
        records.iter().filter(|r| r["reason"].as_str().is_some_and(|r| r.starts_with("token_"))).count();
    let counted: u64 = records
        .iter()
        .filter_map(|r| r["reason"].as_str()?.strip_prefix("suppressed: "))
        .map(|r| r.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    eprintln!(
        "{sent} refusals in {seconds} s ({:.0}/s): {one_by_one} recorded one by one, {counted} counted; the log grew \
         {grown} bytes ({:.0} bytes/s; {:.0} bytes per refusal sent)",
        sent as f64 / seconds,
        grown as f64 / seconds,
        grown as f64 / sent as f64
    );
    assert!(sent > 2 * PER_PEER_BURST as u64, "the flood did not get going: {sent}");
    assert_eq!(one_by_one as u64 + counted, sent, "every refusal is recorded or counted");
    let most = PER_PEER_BURST + PER_PEER_RATE * (seconds + 1.0);
    assert!(one_by_one as f64 <= most, "{one_by_one} recorded one by one, at most {most}");
}
