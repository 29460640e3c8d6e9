//! `--token-validation tokenreview` end to end: meshca's real `kube` client asks
//! the test API server (tests/support/apiserver.rs) over TLS, and Certify answers
//! with a certificate or the status and audit record the API server's verdict
//! calls for. Also: what meshca does when the API server fails, is slow or is
//! gone, how many reviews the cache spares it, and start-up without a cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::{Duration, Instant};

use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::config::TokenConfig;
use meshca::proto::CertifyRequest;
use support::apiserver::{ApiServer, Mode};
use support::{chain, request_id, Options, TestServer};
use tonic::Code;

/// meshca in tokenreview mode, pointed at a test API server.
struct Cluster {
    api: ApiServer,
    server: TestServer,
}

async fn cluster() -> Cluster {
    cluster_with_timeout(Duration::from_secs(2)).await
}

async fn cluster_with_timeout(timeout: Duration) -> Cluster {
    let api = ApiServer::start().await;
    let mut token = api.tokenreview_config();
    if let TokenConfig::TokenReview(meshca::config::TokenReviewSettings { timeout: t, .. }) = &mut token {
        *t = timeout;
    }
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    Cluster { api, server }
}

impl Cluster {
    /// A request for `sa` in `default` carrying `token`.
    fn request(&self, sa: &str, token: Vec<u8>) -> CertifyRequest {
        CertifyRequest { token, ..self.server.request("default", sa).1 }
    }

    /// Claims the cluster would put in a pod's projected token for `sa`.
    fn claims(&self, sa: &str) -> TokenClaims {
        self.server.claims("default", sa)
    }

    /// A valid ES256 token for `sa`.
    fn token(&self, sa: &str) -> Vec<u8> {
        self.api.token(&self.claims(sa))
    }

    /// Certify must be refused with `code`; returns the message and the audit record.
    async fn refused(&self, request: CertifyRequest, code: Code) -> (String, serde_json::Value) {
        let status = self.server.client().await.certify(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        let record = self.server.audit_record(&request_id(status.metadata()));
        assert_eq!(record["outcome"], "denied");
        assert_eq!(record["code"], meshca::status::code_name(code));
        (status.message().to_owned(), record)
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    meshca::jose::encode(bytes)
}

/// The payload segment of a compact JWT.
fn payload(token: &[u8]) -> String {
    String::from_utf8(token.to_vec()).unwrap().split('.').nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn a_token_the_api_server_vouches_for_gets_a_certificate_and_an_audit_record_with_its_pod() {
    let c = cluster().await;
    let resp = c.server.client().await.certify(c.request("web", c.token("web"))).await.unwrap();
    let id = request_id(resp.metadata());
    let (leaf, intermediates) = chain(resp.get_ref());
    let identity = c.server.identity("default", "web");
    c.server
        .anchors
        .verify(&leaf, &intermediates, meshca::clock::Clock::now(&c.server.clock), Some(&identity))
        .unwrap();
    let record = c.server.audit_record(&id);
    assert_eq!(record["outcome"], "issued");
    assert_eq!(record["subject"]["namespace"], "default");
    assert_eq!(record["subject"]["service_account"], "web");
    assert_eq!(record["subject"]["pod_name"], "web-5d8f7");
    assert_eq!(record["subject"]["pod_uid"], "0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c");
    assert_eq!(record["token_issuer"], meshca::auth::tokenreview::ISSUER);
    assert_eq!(record["auth_method"], "tokenreview");
    assert_eq!(c.api.calls(), 1);
}

#[tokio::test]
async fn an_rs256_token_the_api_server_vouches_for_gets_a_certificate() {
    let c = cluster().await;
    let token = c.api.rs256_token(&c.claims("web"));
    let resp = c.server.client().await.certify(c.request("web", token)).await.unwrap().into_inner();
    assert!(!resp.leaf_certificate.is_empty());
    assert_eq!(c.api.calls(), 1);
}

#[tokio::test]
async fn tokens_the_api_server_refuses_are_unauthenticated_audited_and_never_echoed() {
    let c = cluster().await;
    let now = meshca::clock::Clock::now(&c.server.clock);
    let hour = Duration::from_secs(3600);
    let with = |f: &dyn Fn(&mut TokenClaims)| {
        let mut claims = c.claims("web");
        f(&mut claims);
        c.api.token(&claims)
    };
    let good = payload(&c.token("web"));
    let forged = DevSigner::generate().unwrap().0.sign_raw(
        serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": c.api.signer.kid()}).to_string().as_bytes(),
        &meshca::jose::decode(&good).unwrap(),
    );
    let hs_header = b64(r#"{"alg":"HS256","typ":"JWT","kid":"cluster-rsa"}"#);
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &c.api.rsa_public_key());
    let hs_tag = ring::hmac::sign(&hmac_key, format!("{hs_header}.{good}").as_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "expired",
            with(&|t| (t.issued_at, t.expires_at) = (now - 2 * hour, now - hour)),
            "token has expired",
        ),
        ("not yet valid", with(&|t| t.issued_at = now + Duration::from_secs(600)), "token is not valid yet"),
        (
            "wrong audience",
            with(&|t| t.audience = vec!["aud-marker-7f3a".into()]),
            "audience is not accepted",
        ),
        ("wrong issuer", with(&|t| t.issuer = "https://issuer.example".into()), "issuer is not trusted"),
        ("forged signature", forged.into_bytes(), "signature does not verify"),
        (
            "alg none",
            format!("{}.{good}.", b64(r#"{"alg":"none","typ":"JWT"}"#)).into_bytes(),
            "signature does not verify",
        ),
        (
            "HS256 keyed with the public key",
            format!("{hs_header}.{good}.{}", b64(hs_tag)).into_bytes(),
            "signature does not verify",
        ),
    ];
    let count = cases.len();
    for (name, token, summary) in cases {
        let (message, record) = c.refused(c.request("web", token.clone()), Code::Unauthenticated).await;
        assert!(message.contains(summary), "{name}: {message}");
        assert!(record["reason"].as_str().unwrap().starts_with("token_rejected:"), "{name}: {record}");
        assert!(record.get("subject").is_none() && record.get("serial").is_none(), "{name}: {record}");
        let audit = std::fs::read_to_string(&c.server.audit_path).unwrap();
        let token = String::from_utf8(token).unwrap();
        for secret in [&token[..], payload(token.as_bytes()).as_str(), "aud-marker-7f3a"] {
            assert!(!message.contains(secret) && !audit.contains(secret), "{name}: echoed");
        }
    }
    assert_eq!(c.api.calls(), count, "one review per token");
}

#[tokio::test]
async fn a_token_for_another_service_account_is_permission_denied() {
    let c = cluster().await;
    let (_, record) = c.refused(c.request("web", c.token("db")), Code::PermissionDenied).await;
    assert!(record["reason"].as_str().unwrap().starts_with("identity_mismatch"), "{record}");
    assert_eq!(record["subject"]["service_account"], "db");
}

#[tokio::test]
async fn an_api_server_answering_500_is_unavailable_audited_and_not_cached() {
    let c = cluster().await;
    c.api.set_mode(Mode::Fail500);
    let token = c.token("web");
    let (message, record) = c.refused(c.request("web", token.clone()), Code::Unavailable).await;
    assert!(message.contains("answered 500"), "{message}");
    assert!(record["reason"].as_str().unwrap().starts_with("backend_unavailable:"), "{record}");
    c.api.set_mode(Mode::Answer);
    c.server.client().await.certify(c.request("web", token)).await.unwrap();
    assert_eq!(c.api.calls(), 2, "the failure was not remembered");
}

#[tokio::test]
async fn an_api_server_holding_its_answer_beyond_the_timeout_is_unavailable_promptly() {
    let c = cluster_with_timeout(Duration::from_millis(300)).await;
    let mut client = c.server.client().await;
    c.api.set_mode(Mode::Hold);
    let started = Instant::now();
    let held = tokio::time::timeout(Duration::from_secs(5), client.certify(c.request("web", c.token("web"))));
    let status = held.await.expect("no answer within 5s").unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(status.message().contains("did not answer the TokenReview within 300ms"), "{}", status.message());
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "took {took:?}");
    c.api.release();
    c.api.set_mode(Mode::Answer);
    client.certify(c.request("web", c.token("web"))).await.unwrap();
    assert_eq!(c.api.calls(), 2);
}

#[tokio::test]
async fn an_api_server_refusing_connections_is_unavailable() {
    let mut c = cluster().await;
    c.api.stop_listening().await;
    let (message, record) = c.refused(c.request("web", c.token("web")), Code::Unavailable).await;
    assert!(message.contains("refused the connection"), "{message}");
    assert!(record["reason"].as_str().unwrap().starts_with("backend_unavailable:"), "{record}");
}

#[tokio::test]
async fn a_thousand_sequential_requests_with_one_token_make_one_review() {
    let c = cluster().await;
    let mut client = c.server.client().await;
    let request = c.request("web", c.token("web"));
    for _ in 0..1000 {
        client.certify(request.clone()).await.unwrap();
    }
    assert_eq!(c.api.calls(), 1);
    let metrics = c.server.metrics().await;
    assert!(metrics.contains("\nmeshca_token_reviews_total 1\n"), "{metrics}");
    assert!(metrics.contains("\nmeshca_token_cache_hits_total 999\n"), "{metrics}");
    assert!(metrics.contains("\nmeshca_token_review_duration_seconds_count 1\n"), "{metrics}");
}

#[tokio::test]
async fn a_hundred_concurrent_first_requests_with_one_new_token_make_one_review() {
    let c = cluster().await;
    let client = c.server.client().await;
    let request = c.request("web", c.token("web"));
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (mut client, request) = (client.clone(), request.clone());
            tokio::spawn(async move { client.certify(request).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(c.api.calls(), 1);
}

#[tokio::test]
async fn a_refused_token_retried_ten_times_within_the_failure_ttl_makes_one_review() {
    let c = cluster().await;
    let mut claims = c.claims("web");
    claims.audience = vec!["someone-else".into()];
    let request = c.request("web", c.api.token(&claims));
    for _ in 0..10 {
        let status = c.server.client().await.certify(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(c.api.calls(), 1);
}

#[test]
fn serve_without_a_reachable_cluster_configuration_exits_1_naming_kubeconfig() {
    let tmp = tempfile::tempdir().unwrap();
    let naming = meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap();
    support::write_ca(
        tmp.path(),
        &naming,
        &Options::default(),
        meshca::clock::Clock::now(&meshca::clock::SystemClock),
    );
    let (anchors, issuer) = (tmp.path().join("trust-anchors.pem"), tmp.path().join("issuer"));
    let serve = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meshca"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--audit-log"])
            .arg(tmp.path().join("audit.jsonl"))
            .arg("--audit-signing-key")
            .arg(support::audit_key(tmp.path()))
            .arg("--trust-anchors")
            .arg(&anchors)
            .arg("--issuer-dir")
            .arg(&issuer)
            .args(extra)
            .env("HOME", tmp.path())
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT");
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for extra in [&[][..], &["--kubeconfig", "/nonexistent/kubeconfig"][..]] {
        let (code, stderr) = serve(extra);
        assert_eq!(code, Some(1), "{extra:?}: {stderr}");
        let line = stderr.lines().find(|l| l.starts_with("meshca:")).unwrap_or_default();
        assert!(line.contains("--kubeconfig"), "{extra:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_deleted_pods_token_is_refused_within_30_s_of_the_deletion_despite_the_cache() {
    let c = cluster().await;
    let token = c.token("web");
    let mut client = c.server.client().await;
    client.certify(c.request("web", token.clone())).await.unwrap();
    c.api.delete_pod_tokens("0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c");
    // Remembered for now, without asking again...
    client.certify(c.request("web", token.clone())).await.unwrap();
    assert_eq!(c.api.calls(), 1);
    // ...but not past 30 s, although --token-cache-ttl is 5 minutes.
    c.server.clock.advance(Duration::from_secs(31));
    c.refused(c.request("web", token), Code::Unauthenticated).await;
    assert_eq!(c.api.calls(), 2, "asked again once the acceptance was 30 s old");
}
