//! Kubernetes Events for Certify decisions, end to end: meshca (tokenreview or
//! jwks discovery mode, with `--events`) reports issuances and denials of known
//! service accounts to the test API server (tests/support/apiserver.rs) through
//! its real `kube` client, in the background — with Event creation held, issuance
//! goes on at full speed and the Events that do not fit the queue are dropped
//! and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::{Duration, Instant};

use meshca::config::{KeyRefresh, KeySource, TokenConfig};
use meshca::proto::CertifyRequest;
use serde_json::Value;
use support::apiserver::{ApiServer, Mode};
use support::{request_id, Options, TestServer, AUDIENCE};
use tonic::Code;

/// Bound on waits that only a broken implementation would reach.
const PATIENCE: Duration = Duration::from_secs(60);

struct Cluster {
    api: ApiServer,
    server: TestServer,
}

fn tokenreview(api: &ApiServer) -> TokenConfig {
    api.tokenreview_config()
}

async fn cluster_with(token: impl FnOnce(&ApiServer) -> TokenConfig, events: bool) -> Cluster {
    let api = ApiServer::start().await;
    let options = Options { token: Some(token(&api)), events, ..Default::default() };
    let server = TestServer::start_with(options).await;
    Cluster { api, server }
}

async fn cluster() -> Cluster {
    cluster_with(tokenreview, true).await
}

impl Cluster {
    /// A request for `sa` in `default` with a token for `token_sa`.
    fn request(&self, sa: &str, token_sa: &str) -> CertifyRequest {
        let token = self.api.token(&self.server.claims("default", token_sa));
        CertifyRequest { token, ..self.server.request("default", sa).1 }
    }

    /// Issues a certificate for `web`; returns the request id.
    async fn issue(&self) -> String {
        let resp = self.server.client().await.certify(self.request("web", "web")).await.unwrap();
        request_id(resp.metadata())
    }

    /// Waits for the Event of request `id`, which is also the suffix of its name.
    async fn event(&self, id: &str) -> Value {
        let named =
            |e: &Value| e["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(&format!(".{id}")));
        let wait = async {
            let mut seen = 0;
            loop {
                if let Some(event) = self.api.events().into_iter().find(named) {
                    return event;
                }
                seen += 1;
                self.api.events_reach(seen).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait).await.unwrap_or_else(|_| panic!("no Event for request {id}"))
    }
}

#[tokio::test]
async fn an_issuance_is_a_normal_event_on_the_service_account_naming_identity_expiry_and_fingerprint() {
    let c = cluster().await;
    let id = c.issue().await;
    let event = c.event(&id).await;
    let record = c.server.audit_record(&id);
    let involved = &event["involvedObject"];
    assert_eq!(
        (&involved["kind"], &involved["namespace"], &involved["name"], &involved["apiVersion"]),
        (&Value::from("ServiceAccount"), &Value::from("default"), &Value::from("web"), &Value::from("v1"))
    );
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&Value::from("Normal"), &Value::from("IssuedLeafCertificate"))
    );
    let identity = c.server.identity("default", "web");
    // The audit record has milliseconds; the message, like the certificate, seconds.
    let not_after = format!("{}Z", record["not_after"].as_str().unwrap().split('.').next().unwrap());
    let fingerprint = record["fingerprint_sha256"].as_str().unwrap();
    let message = event["message"].as_str().unwrap();
    assert_eq!(message, format!("issued certificate for {identity} until {not_after}: {fingerprint}"));
    assert_eq!(event["metadata"]["name"], format!("web.{id}"));
    assert_eq!(event["source"]["component"], "meshca");
    assert_eq!(event["count"], 1);
}

#[tokio::test]
async fn a_denial_of_a_known_service_account_is_a_warning_with_its_reason_code_and_an_unknown_caller_none() {
    let c = cluster().await;
    let mut client = c.server.client().await;
    let status = client.certify(c.request("web", "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let denied = request_id(status.metadata());
    let garbage = CertifyRequest { token: b"not-a-token".to_vec(), ..c.request("web", "web") };
    let anonymous = request_id(client.certify(garbage).await.unwrap_err().metadata());
    let issued = c.issue().await;

    let event = c.event(&denied).await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&Value::from("Warning"), &Value::from("IdentityMismatch"))
    );
    assert_eq!(event["involvedObject"]["name"], "db", "the service account the token proved");
    assert_eq!(event["involvedObject"]["kind"], "ServiceAccount");
    assert!(event["message"].as_str().unwrap().contains(": identity_mismatch: "), "{event}");
    // Events leave in order: once the issuance's has arrived, the unknown caller's would have.
    c.event(&issued).await;
    let names: Vec<String> =
        c.api.events().iter().map(|e| e["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, [format!("db.{denied}"), format!("web.{issued}")], "nothing for request {anonymous}");
}

#[tokio::test]
async fn jwks_discovery_mode_has_a_kubernetes_client_and_so_events() {
    let discovery = |api: &ApiServer| {
        TokenConfig::Jwks(meshca::config::JwksSettings {
            keys: KeySource::Discovery { kubeconfig: Some(api.kubeconfig.clone()) },
            issuer: None,
            audiences: vec![AUDIENCE.into()],
            leeway: Duration::from_secs(60),
            refresh: KeyRefresh::default(),
            confirm_pod: None,
        })
    };
    let c = cluster_with(discovery, true).await;
    let id = c.issue().await;
    assert_eq!(c.event(&id).await["reason"], "IssuedLeafCertificate");
    assert_eq!(c.api.calls(), 0, "tokens were verified locally");
}

#[tokio::test]
async fn with_events_off_no_emitter_runs() {
    let c = cluster_with(tokenreview, false).await;
    c.issue().await;
    let metrics = c.server.metrics().await;
    assert!(!metrics.contains("meshca_events_"), "{metrics}");
    assert!(metrics.contains("meshca_token_reviews_total"), "{metrics}");
}

#[tokio::test]
async fn with_event_creation_blocked_two_thousand_issuances_succeed_promptly_and_drops_are_counted() {
    let c = cluster().await;
    c.api.set_events_mode(Mode::Hold);
    let client = c.server.client().await;
    let request = c.request("web", "web");
    let started = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (mut client, request) = (client.clone(), request.clone());
            tokio::spawn(async move {
                for _ in 0..125 {
                    client.certify(request.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for worker in workers {
        tokio::time::timeout(PATIENCE, worker).await.expect("issuance waited for Events").unwrap();
    }
    let took = started.elapsed();
    let metrics = c.server.metrics().await;
    let value = |name: &str| support::sample(&metrics, name);
    let (issued, sent, dropped, errors, queued) = (
        c.server.metric("meshca_certify_total{outcome=\"issued\",reason=\"\"}").await,
        value("meshca_events_sent_total"),
        value("meshca_events_dropped_total"),
        value("meshca_event_errors_total"),
        value("meshca_events_queued"),
    );
    eprintln!(
        "2000 issuances in {took:?} with Event creation held: sent {sent}, dropped {dropped}, errors {errors}, queued {queued}"
    );
    assert_eq!(issued, 2000);
    assert_eq!(sent, 0, "every creation is held");
    assert!(dropped > 0 && queued <= 1024, "dropped {dropped}, queued {queued}");
    // The queue holds 1,024 and the task holds one more (plus those it gave up on).
    assert!(dropped + 1024 + 1 + errors >= 2000, "dropped {dropped}, errors {errors}");

    // Released, the queue drains in order: the next issuance's Event arrives.
    c.api.release();
    c.api.set_events_mode(Mode::Answer);
    let id = c.issue().await;
    c.event(&id).await;
    assert!(c.api.events().len() > 1, "the queued Events went out first");
}
