//! `--jwks-confirm-pod` end to end: meshca verifies tokens locally (jwks mode, keys
//! from a file or from discovery), then asks the test API server
//! (tests/support/apiserver.rs), through its real `kube` client over TLS, whether
//! the token's pod still exists with the token's uid. Time is the test server's
//! fake clock: cache windows pass when a test moves it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::Duration;

use meshca::config::{ConfirmPod, KeyRefresh, KeySource, PodSettings, TokenConfig};
use meshca::proto::CertifyRequest;
use support::apiserver::{ApiServer, Mode};
use support::{request_id, Options, TestServer, AUDIENCE};
use tonic::Code;

const POD: &str = "web-5d8f7";
const UID: &str = "0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c";

struct Cluster {
    api: ApiServer,
    server: TestServer,
    _keys: tempfile::TempDir,
}

/// meshca in jwks mode with the API server's keys from a file (`discovery`: from
/// the API server), confirming pods with `settings`.
async fn cluster_with(discovery: bool, settings: PodSettings) -> Cluster {
    let api = ApiServer::start().await;
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    std::fs::write(&jwks, api.signer.jwks_json()).unwrap();
    let kubeconfig = Some(api.kubeconfig.clone());
    let source = if discovery {
        KeySource::Discovery { kubeconfig: kubeconfig.clone() }
    } else {
        KeySource::File(jwks)
    };
    let token = TokenConfig::Jwks(meshca::config::JwksSettings {
        keys: source,
        issuer: Some(api.issuer().into()),
        audiences: vec![AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        refresh: KeyRefresh::default(),
        confirm_pod: Some(ConfirmPod { kubeconfig, settings }),
    });
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    assert!(server.handles.is_some(), "meshca did not start");
    Cluster { api, server, _keys: keys }
}

async fn cluster() -> Cluster {
    cluster_with(false, PodSettings::default()).await
}

impl Cluster {
    /// A request for `web` whose token is bound to `pod` (`None`: to no pod).
    fn request(&self, pod: Option<(&str, &str)>) -> CertifyRequest {
        let mut claims = self.server.claims("default", "web");
        claims.pod = pod.map(|(name, uid)| (name.into(), uid.into()));
        CertifyRequest { token: self.api.token(&claims), ..self.server.request("default", "web").1 }
    }

    async fn issued(&self, pod: Option<(&str, &str)>) {
        let resp = self.server.client().await.certify(self.request(pod)).await.unwrap();
        let record = self.server.audit_record(&request_id(resp.metadata()));
        assert_eq!(
            (record["outcome"].as_str(), record["auth_method"].as_str()),
            (Some("issued"), Some("jwks"))
        );
    }

    /// Certify must be refused with `code` and this audit reason code; the message
    /// names neither the token nor the pod.
    async fn refused(&self, pod: (&str, &str), code: Code, reason: &str) -> String {
        let request = self.request(Some(pod));
        let token = String::from_utf8(request.token.clone()).unwrap();
        let status = self.server.client().await.certify(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        let record = self.server.audit_record(&request_id(status.metadata()));
        assert!(record["reason"].as_str().unwrap().starts_with(&format!("{reason}:")), "{record}");
        let message = status.message();
        for secret in [&token[..], token.split('.').nth(1).unwrap(), pod.0, pod.1] {
            assert!(!message.contains(secret), "{message}");
        }
        message.to_owned()
    }
}

#[tokio::test]
async fn a_live_pods_token_is_accepted_and_refused_once_the_pod_is_deleted_and_the_ttl_has_passed() {
    let c = cluster().await;
    c.api.add_pod("default", POD, UID, "node-a");
    c.issued(Some((POD, UID))).await;
    assert_eq!(c.api.pod_gets(), 1);
    c.api.remove_pod("default", POD);
    c.server.clock.advance(Duration::from_secs(29));
    c.issued(Some((POD, UID))).await;
    assert_eq!(c.api.pod_gets(), 1, "an acceptance holds for the 30 s ttl: the staleness bound");
    c.server.clock.advance(Duration::from_secs(1));
    let message = c.refused((POD, UID), Code::Unauthenticated, "pod_not_found").await;
    assert!(message.contains("no longer exists"), "{message}");
    assert_eq!(c.api.pod_gets(), 2);
    c.server.clock.advance(Duration::from_secs(4));
    c.refused((POD, UID), Code::Unauthenticated, "pod_not_found").await;
    assert_eq!(c.api.pod_gets(), 2, "a refusal holds for the 5 s failure ttl");
    c.server.clock.advance(Duration::from_secs(1));
    c.refused((POD, UID), Code::Unauthenticated, "pod_not_found").await;
    assert_eq!(c.api.pod_gets(), 3);
    assert_eq!(c.server.metric("meshca_pod_refusals_total").await, 3);
    assert_eq!(c.api.calls(), 0, "no TokenReview in jwks mode");
}

#[tokio::test]
async fn a_pod_recreated_under_the_same_name_refuses_the_old_pods_token_and_accepts_the_new_ones() {
    let c = cluster().await;
    c.api.add_pod("default", POD, UID, "node-a");
    c.issued(Some((POD, UID))).await;
    c.api.remove_pod("default", POD);
    c.api.add_pod("default", POD, "uid-of-the-new-pod", "node-a");
    c.server.clock.advance(Duration::from_secs(5));
    c.issued(Some((POD, "uid-of-the-new-pod"))).await;
    assert_eq!(c.api.pod_gets(), 2, "a uid the cached facts refute is looked up again past the failure ttl");
    let message = c.refused((POD, UID), Code::Unauthenticated, "pod_uid_mismatch").await;
    assert!(message.contains("replaced by another pod"), "{message}");
    assert_eq!(c.api.pod_gets(), 2);
}

#[tokio::test]
async fn tokens_bound_to_no_pod_are_not_looked_up() {
    let c = cluster().await;
    c.issued(None).await;
    assert_eq!(c.api.pod_gets(), 0);
}

#[tokio::test]
async fn an_api_server_that_is_down_forbids_or_fails_gives_unavailable_never_an_acceptance() {
    let mut c = cluster().await;
    c.api.add_pod("default", POD, UID, "node-a");
    c.api.set_lookups_mode(Mode::Forbidden);
    let message = c.refused((POD, UID), Code::Unavailable, "backend_unavailable").await;
    assert!(message.contains("403") && message.contains("get pods"), "{message}");
    c.api.set_lookups_mode(Mode::Fail500);
    let message = c.refused((POD, UID), Code::Unavailable, "backend_unavailable").await;
    assert!(message.contains("500"), "{message}");
    c.api.set_lookups_mode(Mode::Answer);
    c.issued(Some((POD, UID))).await;
    c.api.stop_listening().await;
    c.server.clock.advance(Duration::from_secs(30));
    let message = c.refused((POD, UID), Code::Unavailable, "backend_unavailable").await;
    assert!(message.contains("Kubernetes API server"), "{message}");
    assert_eq!(c.server.metric("meshca_pod_lookup_errors_total").await, 3);
}

#[tokio::test]
async fn a_pod_lookup_that_hangs_is_unavailable_after_its_timeout() {
    let settings = PodSettings { timeout: Duration::from_millis(300), ..PodSettings::default() };
    let c = cluster_with(false, settings).await;
    c.api.add_pod("default", POD, UID, "node-a");
    c.api.set_lookups_mode(Mode::Hold);
    let message = c.refused((POD, UID), Code::Unavailable, "backend_unavailable").await;
    assert!(message.contains("within 300ms"), "{message}");
    c.api.release();
}

#[tokio::test]
async fn a_hundred_concurrent_calls_with_one_pods_tokens_make_one_pod_get() {
    let c = cluster_with(true, PodSettings::default()).await;
    c.api.add_pod("default", POD, UID, "node-a");
    let client = c.server.client().await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (mut client, request) = (client.clone(), c.request(Some((POD, UID))));
        calls.spawn(async move { client.certify(request).await.map(|_| ()) });
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap().unwrap();
    }
    assert_eq!(c.api.pod_gets(), 1);
    let coalesced = c.server.metric("meshca_pod_lookups_coalesced_total").await;
    let hits = c.server.metric("meshca_pod_cache_hits_total").await;
    assert_eq!((coalesced + hits, c.server.metric("meshca_pod_lookups_total").await), (99, 1));
}
