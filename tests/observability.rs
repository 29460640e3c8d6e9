//! Metrics, probes and logs, through the real admin listener and the real binary:
//! `/metrics` scraped over HTTP and parsed, `/ready` for each condition that fails
//! it (an expired issuer, a failing audit sink, an unreachable API server) and its
//! recovery, and `--log-format json` lines matched to audit records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::collections::BTreeMap;
use std::time::Duration;

use meshca::ca::hierarchy::HierarchyLifetimes;
use meshca::clock::{unix_seconds, Clock};
use meshca::proto::CertifyRequest;
use support::apiserver::{ApiServer, Mode};
use support::logs::Captured;
use support::{request_id, Options, TestServer};
use tonic::Code;

/// Every sample of a Prometheus text page: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            (name.to_owned(), value.parse().unwrap_or_else(|_| panic!("not a number: {l:?}")))
        })
        .collect()
}

/// `/metrics`, parsed; every sample line must parse.
async fn scrape(server: &TestServer) -> BTreeMap<String, f64> {
    let (status, body) = server.admin_get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    samples(&body)
}

fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no {name} in {samples:#?}"))
}

/// The reason code of a denial's audit record (`code: words`).
fn reason_code(record: &serde_json::Value) -> String {
    record["reason"].as_str().unwrap().split(':').next().unwrap().to_owned()
}

#[tokio::test]
async fn certify_metrics_move_with_each_decision_and_expiry_follows_the_clock() {
    let server = TestServer::start().await;
    let before = scrape(&server).await;
    let issued = "meshca_certify_total{outcome=\"issued\",reason=\"\"}";
    assert_eq!(value(&before, issued), 0.0, "the issued series is there from the start");
    assert_eq!(value(&before, "meshca_certify_duration_seconds_count"), 0.0);
    assert_eq!(value(&before, "meshca_audit_records_written_total"), 1.0, "the serving certificate's");
    assert_eq!(value(&before, "meshca_audit_write_failures_total"), 0.0);
    assert_eq!(value(&before, "meshca_ready"), 1.0);
    assert_eq!(server.admin_get("/ready").await, (200, "ready\n".to_owned()));
    assert_eq!(server.admin_get("/live").await.0, 200);

    let mut client = server.client().await;
    for sa in ["web", "db"] {
        client.certify(server.request("default", sa).1).await.unwrap();
    }
    // A token for web asking for db's identity: denied, and counted under its reason.
    let (_, mut wrong) = server.request("default", "db");
    wrong.token = server.token("default", "web");
    let status = client.certify(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
    let reason = reason_code(&server.audit_record(&request_id(status.metadata())));

    let after = scrape(&server).await;
    assert_eq!(value(&after, issued), 2.0);
    let denied = format!("meshca_certify_total{{outcome=\"denied\",reason=\"{reason}\"}}");
    assert_eq!(value(&after, &denied), 1.0, "{after:#?}");
    let decisions: f64 =
        after.iter().filter(|(k, _)| k.starts_with("meshca_certify_total{")).map(|(_, v)| v).sum();
    assert_eq!(decisions, 3.0);
    assert_eq!(value(&after, "meshca_certify_duration_seconds_count"), 3.0, "one observation a decision");
    assert_eq!(value(&after, "meshca_certify_duration_seconds_bucket{le=\"+Inf\"}"), 3.0);
    assert!(value(&after, "meshca_certify_duration_seconds_sum") > 0.0);
    assert_eq!(value(&after, "meshca_certify_in_flight"), 0.0, "every request has finished");
    assert_eq!(value(&after, "meshca_audit_records_written_total"), 4.0, "one record a decision");
    assert_eq!(value(&after, "meshca_audit_write_failures_total"), 0.0);
    assert_eq!(server.audit_records().len(), 4);

    // Expiry: the issuer on disk, and the seconds left at the server's clock.
    let pem = std::fs::read(server.dir.path().join("issuer/tls.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let not_after = pem.parse_x509().unwrap().validity().not_after.timestamp();
    assert_eq!(value(&after, "meshca_issuer_not_after_seconds"), not_after as f64);
    let now = unix_seconds(server.clock.now()) as i64;
    assert_eq!(value(&after, "meshca_issuer_expires_in_seconds"), (not_after - now) as f64);
    let anchor_left = value(&after, "meshca_trust_anchor_earliest_expires_in_seconds");
    let anchor_at = value(&after, "meshca_trust_anchor_earliest_not_after_seconds");
    assert_eq!(anchor_left, anchor_at - now as f64);
    let serving_left = value(&after, "meshca_serving_certificate_expires_in_seconds");
    assert!(serving_left > 0.0, "{serving_left}");
    server.clock.advance(Duration::from_secs(3600));
    let later = scrape(&server).await;
    assert_eq!(value(&later, "meshca_issuer_expires_in_seconds"), (not_after - now - 3600) as f64);
    assert_eq!(value(&later, "meshca_serving_certificate_expires_in_seconds"), serving_left - 3600.0);
}

#[tokio::test]
async fn ready_fails_once_the_issuer_has_expired() {
    let opts = Options {
        hierarchy: HierarchyLifetimes { issuer: Duration::from_secs(3600), ..HierarchyLifetimes::default() },
        // The fake clock runs past the serving certificate too; TLS is not what this is about.
        plaintext: true,
        ..Default::default()
    };
    let server = TestServer::start_with(opts).await;
    assert_eq!(server.admin_get("/ready").await.0, 200);
    server.clock.advance(Duration::from_secs(3601));
    let (status, body) = server.admin_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: the issuer expired at ") && body.lines().count() == 1, "{body}");
    let metrics = scrape(&server).await;
    assert_eq!(value(&metrics, "meshca_ready"), 0.0);
    assert!(value(&metrics, "meshca_issuer_expires_in_seconds") < 0.0);
    assert_eq!(server.admin_get("/live").await.0, 200, "a restart would not mend it");
}

#[tokio::test]
async fn ready_fails_while_the_audit_sink_is_failing() {
    // Every write to /dev/full fails (ENOSPC). Plaintext: the serving certificate
    // would need an audit record to start.
    let opts = Options { audit_log: Some("/dev/full".into()), plaintext: true, ..Default::default() };
    let server = TestServer::start_with(opts).await;
    assert_eq!(server.admin_get("/ready").await.0, 200, "nothing has failed yet");
    let status = server.client().await.certify(server.request("default", "web").1).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    let (status, body) = server.admin_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: the audit log is failing") && body.lines().count() == 1, "{body}");
    let metrics = scrape(&server).await;
    assert_eq!(value(&metrics, "meshca_ready"), 0.0);
    assert!(value(&metrics, "meshca_audit_write_failures_total") >= 1.0);
    assert_eq!(value(&metrics, "meshca_audit_records_written_total"), 0.0);
    assert_eq!(value(&metrics, "meshca_certify_total{outcome=\"issued\",reason=\"\"}"), 0.0);
    assert_eq!(value(&metrics, "meshca_certify_total{outcome=\"denied\",reason=\"audit_unavailable\"}"), 1.0);
    assert_eq!(value(&metrics, "meshca_certify_in_flight"), 0.0);
    assert_eq!(server.admin_get("/live").await.0, 200);
}

/// meshca in tokenreview mode against the test API server, threshold 60 s.
async fn cluster() -> (ApiServer, TestServer) {
    let api = ApiServer::start().await;
    let token = api.tokenreview_config();
    let opts = Options { token: Some(token), ..Default::default() };
    (api, TestServer::start_with(opts).await)
}

/// A request for `sa` in `default` with a token the cluster signed: a new
/// service account means a token the cache has not seen.
fn reviewed(api: &ApiServer, server: &TestServer, sa: &str) -> CertifyRequest {
    CertifyRequest { token: api.token(&server.claims("default", sa)), ..server.request("default", sa).1 }
}

/// `/ready` until it answers `want`, a bounded number of times (a probe that took
/// longer than `/ready` waits for it is seen by the next check).
async fn ready_becomes(server: &TestServer, want: u16) -> String {
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = server.admin_get("/ready").await;
        if last.0 == want {
            return last.1;
        }
        tokio::task::yield_now().await;
    }
    panic!("/ready never answered {want}; last {last:?}");
}

#[tokio::test]
async fn ready_fails_when_the_api_server_is_unreachable_past_the_threshold_and_recovers_without_traffic() {
    let log = Captured::default();
    let _logging = log.start();
    let (mut api, server) = cluster().await;
    let mut client = server.client().await;

    // A held review: the request is in flight until the API server answers.
    api.set_mode(Mode::Hold);
    let held = tokio::spawn({
        let (mut client, request) = (client.clone(), reviewed(&api, &server, "held"));
        async move { client.certify(request).await }
    });
    let mut in_flight = 0.0;
    for _ in 0..1000 {
        in_flight = value(&scrape(&server).await, "meshca_certify_in_flight");
        if in_flight == 1.0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(in_flight, 1.0, "the held request never showed as in flight");
    api.release();
    api.set_mode(Mode::Answer);
    held.await.unwrap().unwrap();
    let metrics = scrape(&server).await;
    assert_eq!(value(&metrics, "meshca_certify_in_flight"), 0.0);
    assert_eq!(value(&metrics, "meshca_token_reviews_total"), 1.0);
    assert_eq!(server.admin_get("/ready").await.0, 200);

    // The API server fails every review from now on.
    api.set_mode(Mode::Fail500);
    let status = client.certify(reviewed(&api, &server, "web")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    server.clock.advance(Duration::from_secs(60));
    assert_eq!(server.admin_get("/ready").await.0, 200, "60 s is not longer than the threshold");
    let reviews = api.calls();
    server.clock.advance(Duration::from_secs(1));
    let body = ready_becomes(&server, 503).await;
    assert!(
        body.starts_with(
            "not ready: the token validation backend (Kubernetes API server) has failed every call for 1m 1s"
        ) && body.lines().count() == 1,
        "{body}"
    );
    assert!(api.calls() > reviews, "/ready probed the API server before failing");
    let logged = log.text();
    assert!(logged.contains("readiness probe: the Kubernetes API server is still unreachable"), "{logged}");
    assert!(!logged.contains("answers TokenReviews again"), "a failed probe is not a recovery:\n{logged}");
    let metrics = scrape(&server).await;
    assert_eq!(value(&metrics, "meshca_ready"), 0.0);
    assert!(value(&metrics, "meshca_token_review_errors_total") >= 1.0);
    assert_eq!(server.admin_get("/live").await.0, 200);

    // It answers again: the probe sees it, with no Certify call to tell.
    api.set_mode(Mode::Answer);
    assert_eq!(ready_becomes(&server, 200).await, "ready\n");
    assert_eq!(value(&scrape(&server).await, "meshca_ready"), 1.0);
    assert!(log.text().contains("the Kubernetes API server answers TokenReviews again"), "{}", log.text());

    // Gone for good: connections refused.
    api.stop_listening().await;
    let status = client.certify(reviewed(&api, &server, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert_eq!(server.admin_get("/ready").await.0, 200);
    server.clock.advance(Duration::from_secs(120));
    let body = ready_becomes(&server, 503).await;
    assert!(body.contains("has failed every call for 2m"), "{body}");
}

#[cfg(unix)]
mod binary {
    //! `meshca serve --dev --log-format json`, run as a process.
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use crate::support::process::{meshca, Process, PATIENCE};

    const WEB: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
    const DB: &str = "db.default.serviceaccount.identity.meshca-system.cluster.local";

    fn run(cmd: &mut Command) -> std::process::Output {
        let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("run meshca");
        assert!(out.status.code().is_some(), "{cmd:?} was killed");
        out
    }

    fn certify(dir: &Path, grpc: &str, token: &Path, identity: &str) -> std::process::Output {
        let anchors = dir.join("trust-anchors.pem");
        let out = dir.with_extension("out");
        run(meshca().args(["certify", "--addr", grpc, "--trust-anchors", anchors.to_str().unwrap()]).args([
            "--token-file",
            token.to_str().unwrap(),
            "--identity",
            identity,
            "--out",
            out.to_str().unwrap(),
        ]))
    }

    #[test]
    fn json_logs_carry_the_request_ids_of_the_audit_records_and_never_the_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut serve = Process::spawn(
            meshca()
                .args(["serve", "--dev", "--data-dir", dir.to_str().unwrap()])
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .env("MESHCA_LOG_FORMAT", "json")
                .env("MESHCA_LOG", "info,meshca=debug"),
        );
        let banner = serve.stderr.wait_for("meshca dev mode:", Instant::now() + PATIENCE);
        let grpc = banner.split("gRPC on ").nth(1).unwrap().split(',').next().unwrap().to_owned();
        serve.stderr.wait_for("serving gRPC over TLS", Instant::now() + PATIENCE);

        let token = run(meshca().args(["dev-token", "--data-dir", dir.to_str().unwrap()]).args([
            "--namespace",
            "default",
            "--service-account",
            "web",
        ]));
        assert!(token.status.success());
        let token_text = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let token_file = tmp.path().join("web.token");
        std::fs::write(&token_file, &token_text).unwrap();
        assert!(certify(&dir, &grpc, &token_file, WEB).status.success());
        assert!(!certify(&dir, &grpc, &token_file, DB).status.success(), "web's token for db's identity");

        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
        let records: Vec<serde_json::Value> =
            audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let decisions: Vec<_> = records.iter().filter(|r| r["request_id"] != "serving-certificate").collect();
        assert_eq!(decisions.len(), 2, "{audit}");
        for record in decisions {
            let id = record["request_id"].as_str().unwrap();
            let line = serve.stderr.wait_for(&format!("\"request_id\":\"{id}\""), Instant::now() + PATIENCE);
            let log: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert_eq!(log["level"], "DEBUG", "{line}");
            assert_eq!(log["message"], "certify", "{line}");
            assert_eq!(log["identity"], record["requested_identity"], "{line}");
            assert_eq!(log["outcome"], record["outcome"], "{line}");
            let reason = record["reason"].as_str().map_or("", |r| r.split(':').next().unwrap());
            assert_eq!(log["reason"], reason, "{line}");
            assert!(log["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
            assert!(log["timestamp"].is_string(), "{line}");
        }
        let _ = serve.signal("TERM");
        // Whatever was logged: JSON a line (the dev-mode banner aside), and no token.
        serve.stderr.read_to_end(Instant::now() + PATIENCE);
        let payload = token_text.split('.').nth(1).unwrap();
        for line in &serve.stderr.seen {
            assert!(!line.contains(payload), "a token reached the log: {line}");
        }
        // The banner is five lines of text for people, on purpose.
        let banner_at = serve.stderr.seen.iter().position(|l| l.contains("meshca dev mode:")).unwrap();
        let logs =
            serve.stderr.seen.iter().enumerate().filter(|(i, _)| !(banner_at..banner_at + 5).contains(i));
        let mut count = 0;
        for (_, line) in logs {
            let log: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(log["level"].is_string() && log["message"].is_string(), "{line}");
            count += 1;
        }
        assert!(count >= 4, "serving, two decisions, shutdown:\n{}", serve.stderr.seen.join("\n"));
    }
}

#[tokio::test]
async fn a_requested_name_with_line_breaks_and_escapes_is_logged_quoted_never_as_forged_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = "MESHCA_LOG=debug exec \"$@\"";
    let mut serve = support::process::ServeBin::start(&[], wrapper, &tmp.path().join("data"), &[]).await;
    let forged = "web\n2026-01-01T00:00:00Z DEBUG certify outcome=\"issued\" identity=admin\u{1b}[2J";
    let request = CertifyRequest { identity: forged.into(), ..serve.request("web") };
    let status = serve.client().await.certify(request).await.unwrap_err();
    let id = request_id(status.metadata());
    let line = serve.process.stderr.wait_for(&id, std::time::Instant::now() + support::process::PATIENCE);
    serve.stop().await;
    let text = serve.process.stderr.text();
    assert!(!text.contains('\u{1b}'), "an escape reached the log: {text:?}");
    assert!(!text.lines().any(|l| l.starts_with("2026-01-01")), "a forged line: {text}");
    assert!(line.contains(r#"identity=web\n2026-01-01"#), "{line}");
}
