//! `--token-validation jwks` with keys from the cluster's service-account issuer
//! discovery (and from a `--jwks-url`), end to end: meshca's real `kube` client asks
//! the test API server (tests/support/apiserver.rs) over TLS for the discovery
//! document and the JWKS, verifies tokens locally, and follows key rotation —
//! refreshing once for a new key id, sharing one refresh among concurrent
//! requests, refusing to refresh more than once per minimum interval for made-up
//! key ids, and keeping the old keys when a refresh fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::Duration;

use meshca::config::{KeyRefresh, KeySource, TokenConfig};
use meshca::proto::CertifyRequest;
use support::apiserver::{ApiServer, Mode};
use support::logs::Captured;
use support::{request_id, Options, TestServer, AUDIENCE};
use tonic::Code;

/// Bound on waits that only a broken implementation would reach.
const PATIENCE: Duration = Duration::from_secs(30);

/// meshca in jwks mode, pointed at a test API server.
struct Cluster {
    api: ApiServer,
    server: TestServer,
}

fn discovery(api: &ApiServer, issuer: Option<&str>, min_interval: Duration) -> TokenConfig {
    TokenConfig::Jwks(meshca::config::JwksSettings {
        keys: KeySource::Discovery { kubeconfig: Some(api.kubeconfig.clone()) },
        issuer: issuer.map(str::to_owned),
        audiences: vec![AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        refresh: KeyRefresh { refresh_min_interval: min_interval, ..KeyRefresh::default() },
        confirm_pod: None,
    })
}

async fn start(api: ApiServer, token: TokenConfig) -> Cluster {
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    Cluster { api, server }
}

async fn cluster(min_interval: Duration) -> Cluster {
    let api = ApiServer::start().await;
    let token = discovery(&api, None, min_interval);
    start(api, token).await
}

impl Cluster {
    /// A request for `web` in `default` carrying `token`.
    fn request(&self, token: Vec<u8>) -> CertifyRequest {
        CertifyRequest { token, ..self.server.request("default", "web").1 }
    }

    /// A token for `web` signed with the cluster's newest key.
    fn token(&self) -> Vec<u8> {
        self.api.token(&self.server.claims("default", "web"))
    }

    /// A token for `web` signed with the cluster's key but naming key id `kid`.
    fn token_naming(&self, kid: &str) -> Vec<u8> {
        let good =
            String::from_utf8(self.api.token_with_first_key(&self.server.claims("default", "web"))).unwrap();
        let payload = meshca::jose::decode(good.split('.').nth(1).unwrap()).unwrap();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid}).to_string();
        self.api.signer.sign_raw(header.as_bytes(), &payload).into_bytes()
    }

    /// Certify must be refused as unauthenticated with this audit reason code.
    async fn refused(&self, token: Vec<u8>, reason: &str) {
        let status = self.server.client().await.certify(self.request(token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
        let record = self.server.audit_record(&request_id(status.metadata()));
        assert!(record["reason"].as_str().unwrap().starts_with(&format!("{reason}:")), "{record}");
    }
}

#[tokio::test]
async fn discovery_finds_the_issuer_and_keys_and_cluster_tokens_get_certificates() {
    let c = cluster(Duration::from_secs(10)).await;
    let resp = c.server.client().await.certify(c.request(c.token())).await.unwrap();
    let record = c.server.audit_record(&request_id(resp.metadata()));
    assert_eq!((record["outcome"].as_str(), record["auth_method"].as_str()), (Some("issued"), Some("jwks")));
    assert_eq!(record["token_issuer"], c.api.issuer(), "the discovered issuer");
    let rs256 = c.api.rs256_token(&c.server.claims("default", "web"));
    c.server.client().await.certify(c.request(rs256)).await.unwrap();
    let mut claims = c.server.claims("default", "web");
    claims.issuer = "https://issuer.example".into();
    c.refused(c.api.token(&claims), "wrong_issuer").await;
    assert_eq!((c.api.discovery_calls(), c.api.jwks_calls()), (1, 1));
    assert_eq!(c.server.metric("meshca_jwks_keys").await, 2);
    assert_eq!(c.server.metric("meshca_jwks_refreshes_total").await, 0);
    assert_eq!(c.api.calls(), 0, "no TokenReview in jwks mode");
}

#[tokio::test]
async fn a_configured_issuer_wins_over_the_discovered_one() {
    let api = ApiServer::start().await;
    let token = discovery(&api, Some("https://issuer.example"), Duration::from_secs(10));
    let c = start(api, token).await;
    c.refused(c.token(), "wrong_issuer").await;
    let mut claims = c.server.claims("default", "web");
    claims.issuer = "https://issuer.example".into();
    c.server.client().await.certify(c.request(c.api.token(&claims))).await.unwrap();
}

/// What the log says about the keys and the issuer: a refresh that fetched the set
/// held (from the first load on) is "unchanged", a rotation "changed", once; a
/// configured issuer is warned about only when it differs from the discovered one.
#[tokio::test]
async fn the_log_says_when_the_keys_changed_and_when_the_configured_issuer_differs() {
    let log = Captured::default();
    let _logging = log.start();
    let api = ApiServer::start().await;
    let issuer = api.issuer();
    let token = discovery(&api, Some(issuer), Duration::ZERO);
    let c = start(api, token).await;
    c.refused(c.token_naming("made-up"), "unknown_key").await;
    let changed = |text: &str| text.matches("token signing keys changed").count();
    let text = log.text();
    assert!(text.contains("token signing keys unchanged") && changed(&text) == 0, "{text}");
    c.api.rotate();
    c.server.client().await.certify(c.request(c.token())).await.unwrap();
    c.refused(c.token_naming("made-up"), "unknown_key").await;
    let text = log.text();
    assert_eq!((c.api.jwks_calls(), changed(&text)), (4, 1), "{text}");
    assert!(!text.contains("differs from the cluster's discovered issuer"), "{text}");

    let api = ApiServer::start().await;
    let token = discovery(&api, Some("https://issuer.example"), Duration::ZERO);
    let _other = start(api, token).await;
    let text = log.text();
    let warning = text.lines().find(|l| l.contains("differs from the cluster's discovered issuer"));
    let warning = warning.unwrap_or_else(|| panic!("{text}"));
    assert!(warning.contains("configured=https://issuer.example") && warning.contains(issuer), "{warning}");
}

#[tokio::test]
async fn a_token_signed_with_a_newly_rotated_key_is_accepted_after_exactly_one_refresh() {
    let c = cluster(Duration::from_secs(10)).await;
    let old = c.token();
    c.api.rotate();
    let mut client = c.server.client().await;
    client.certify(c.request(c.token())).await.unwrap();
    assert_eq!(c.api.jwks_calls(), 2, "the first load and one refresh");
    for _ in 0..10 {
        client.certify(c.request(c.token())).await.unwrap();
    }
    client.certify(c.request(old)).await.unwrap();
    assert_eq!(c.api.jwks_calls(), 2, "known keys need no refresh");
    assert_eq!(c.server.metric("meshca_jwks_refreshes_total").await, 1);
    assert_eq!(c.server.metric("meshca_jwks_keys").await, 3);
    eprintln!("rotation: JWKS fetched {} times (1 at start, 1 refresh)", c.api.jwks_calls());
}

#[tokio::test]
async fn a_hundred_concurrent_requests_with_a_new_key_id_cause_one_refresh() {
    // No minimum interval: only sharing the running refresh keeps it to one.
    let c = cluster(Duration::ZERO).await;
    c.api.set_discovery_mode(Mode::Hold);
    c.api.rotate();
    let client = c.server.client().await;
    let request = c.request(c.token());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (mut client, request) = (client.clone(), request.clone());
            tokio::spawn(async move { client.certify(request).await })
        })
        .collect();
    tokio::time::timeout(PATIENCE, c.api.jwks_calls_reach(2)).await.expect("no refresh started");
    c.api.release();
    for call in calls {
        tokio::time::timeout(PATIENCE, call).await.expect("a request hung").unwrap().unwrap();
    }
    assert_eq!(c.api.jwks_calls(), 2, "one refresh for the whole burst");
    assert_eq!(c.server.metric("meshca_jwks_refreshes_total").await, 1);
}

#[tokio::test]
async fn made_up_key_ids_refresh_the_keys_at_most_once_per_min_interval() {
    let c = cluster(Duration::from_secs(3600)).await;
    for i in 0..20 {
        c.refused(c.token_naming(&format!("made-up-{i}")), "unknown_key").await;
    }
    assert_eq!(c.api.jwks_calls(), 2, "the first load and one refresh");
    assert_eq!(c.server.metric("meshca_jwks_refresh_throttled_total").await, 19);
    c.server.client().await.certify(c.request(c.token())).await.unwrap();
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_old_keys_working() {
    let c = cluster(Duration::from_secs(10)).await;
    let old = c.token();
    c.api.set_discovery_mode(Mode::Fail500);
    c.api.rotate();
    c.refused(c.token(), "unknown_key").await;
    assert_eq!(c.api.jwks_calls(), 2, "a refresh was tried");
    c.server.client().await.certify(c.request(old)).await.unwrap();
    assert_eq!(c.server.metric("meshca_jwks_refresh_failures_total").await, 1);
    assert_eq!(c.server.metric("meshca_jwks_keys").await, 2, "the old keys are held");
}

#[tokio::test]
async fn discovery_without_the_rbac_rule_stops_start_up_naming_the_cluster_role() {
    let api = ApiServer::start().await;
    api.set_discovery_mode(Mode::Forbidden);
    let token = discovery(&api, None, Duration::from_secs(10));
    let mut c = start(api, token).await;
    let err = c.server.stop().await.unwrap_err().to_string();
    assert!(err.contains("answered 403") && err.contains("system:service-account-issuer-discovery"), "{err}");
}

#[tokio::test]
async fn a_jwks_url_is_fetched_over_https_trusting_the_given_ca_without_credentials() {
    let api = ApiServer::start().await;
    api.allow_anonymous_discovery();
    let url = |ca_file| {
        TokenConfig::Jwks(meshca::config::JwksSettings {
            keys: KeySource::Url { url: api.jwks_url(), ca_file },
            issuer: Some(api.issuer().into()),
            audiences: vec![AUDIENCE.into()],
            leeway: Duration::from_secs(60),
            refresh: KeyRefresh::default(),
            confirm_pod: None,
        })
    };
    let (trusted, untrusted) = (url(Some(api.ca_file())), url(None));
    let mut refused = TestServer::start_with(Options { token: Some(untrusted), ..Default::default() }).await;
    let err = refused.stop().await.unwrap_err().to_string();
    assert!(err.contains("cannot reach https://127.0.0.1") && err.contains("/openid/v1/jwks"), "{err}");
    assert_eq!(api.jwks_calls(), 0, "no answer without a verified certificate");
    let c = start(api, trusted).await;
    c.server.client().await.certify(c.request(c.token())).await.unwrap();
    assert_eq!((c.api.jwks_calls(), c.api.discovery_calls()), (1, 0));
}

#[test]
fn serve_in_jwks_mode_without_a_key_source_or_cluster_exits_1_naming_kubeconfig() {
    let tmp = tempfile::tempdir().unwrap();
    let naming = meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap();
    let now = meshca::clock::Clock::now(&meshca::clock::SystemClock);
    support::write_ca(tmp.path(), &naming, &Options::default(), now);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token-validation",
            "jwks",
        ])
        .arg("--audit-log")
        .arg(tmp.path().join("audit.jsonl"))
        .arg("--audit-signing-key")
        .arg(support::audit_key(tmp.path()))
        .arg("--trust-anchors")
        .arg(tmp.path().join("trust-anchors.pem"))
        .arg("--issuer-dir")
        .arg(tmp.path().join("issuer"))
        .env("HOME", tmp.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("meshca:")).unwrap_or_default();
    assert!(line.contains("discover the token issuer") && line.contains("--kubeconfig"), "{stderr}");
}
