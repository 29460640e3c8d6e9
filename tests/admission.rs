//! Admission control through the real server: rate limits per identity and per
//! peer refuse with ResourceExhausted, a retry hint and an audit record, charge
//! dearer key types more, and leave everyone else unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use meshca::admission::Rate;
use meshca::config::AdmissionSettings;
use meshca::status::RETRY_PUSHBACK_HEADER;
use support::{csr, request_id, Options, TestServer};
use tonic::Code;

/// Refill so slow that no request in a test can be paid for by elapsed time.
const SLOW: f64 = 0.001;

fn limited(per_identity: Option<Rate>, per_peer: Option<Rate>) -> Options {
    let admission = AdmissionSettings { per_identity, per_peer, ..AdmissionSettings::new(8192) };
    Options { admission: Some(admission), ..Default::default() }
}

/// The pushback hint of a refusal, in milliseconds.
fn pushback(status: &tonic::Status) -> u64 {
    let value = status.metadata().get(RETRY_PUSHBACK_HEADER).expect("no pushback header on the refusal");
    value.to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_identity_past_its_burst_is_refused_with_a_hint_and_others_are_still_served() {
    let server = TestServer::start_with(limited(Some(Rate { per_second: SLOW, burst: 2.0 }), None)).await;
    let mut client = server.client().await;
    for _ in 0..2 {
        let (_key, req) = server.request("default", "web");
        assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());
    }
    let (_key, req) = server.request("default", "web");
    let status = client.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("identity rate limit"), "{}", status.message());
    assert!(pushback(&status) >= 50, "{status:?}");
    let record = server.audit_record(&request_id(status.metadata()));
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["code"], "ResourceExhausted");
    assert!(record["reason"].as_str().unwrap().starts_with("rate_limited_identity"), "{record}");
    assert!(record.get("serial").is_none(), "{record}");

    // Another identity has its own bucket.
    let (_key, req) = server.request("default", "api");
    assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());

    // Counted on the admin listener; nobody waits for a worker now.
    assert_eq!(server.metric("meshca_admission_rate_limited_identity_total").await, 1);
    assert_eq!(server.metric("meshca_admission_rate_limited_peer_total").await, 0);
    assert_eq!(server.metric("meshca_admission_queue").await, 0);
    assert!(server.metric("meshca_admission_workers").await >= 1);
}

#[tokio::test]
async fn a_p384_request_costs_more_than_a_p256_one() {
    // A burst of 6: one P-384 request (cost 5) and one P-256 request (cost 1) pass;
    // nothing more. Six P-256 requests would have passed.
    let server = TestServer::start_with(limited(Some(Rate { per_second: SLOW, burst: 6.0 }), None)).await;
    let mut client = server.client().await;
    let identity = server.identity("default", "web");
    let (_key, der) = csr(&identity, &rcgen::PKCS_ECDSA_P384_SHA384);
    let (_k, mut req) = server.request("default", "web");
    req.certificate_signing_request = der;
    assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());
    let (_key, req) = server.request("default", "web");
    assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());
    let (_key, req) = server.request("default", "web");
    let status = client.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let other = TestServer::start_with(limited(Some(Rate { per_second: SLOW, burst: 6.0 }), None)).await;
    let mut client = other.client().await;
    for _ in 0..6 {
        let (_key, req) = other.request("default", "web");
        assert!(client.certify(req).await.is_ok());
    }
}

#[tokio::test]
async fn the_per_peer_limit_is_off_by_default_and_keys_on_the_caller_address() {
    // Default settings: 30 requests from one address for 30 identities all pass.
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..30 {
        let (_key, req) = server.request("default", &format!("sa-{i}"));
        assert!(client.certify(req).await.is_ok());
    }

    let server = TestServer::start_with(limited(None, Some(Rate { per_second: SLOW, burst: 3.0 }))).await;
    let mut client = server.client().await;
    for i in 0..3 {
        let (_key, req) = server.request("default", &format!("sa-{i}"));
        assert!(client.certify(req).await.is_ok());
    }
    let (_key, req) = server.request("default", "sa-3");
    let status = client.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(pushback(&status) >= 50);
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("rate_limited_peer"), "{record}");
    // Refused before authentication: no subject was established.
    assert!(record.get("subject").is_none(), "{record}");
}

#[tokio::test]
async fn over_capacity_refusals_carry_a_retry_hint() {
    let server = TestServer::start_with(Options { max_in_flight: 0, ..Default::default() }).await;
    let (_key, req) = server.request("default", "web");
    let status = server.client().await.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let hint = pushback(&status);
    assert!((50..=10_000).contains(&hint), "{hint}");
    assert_eq!(server.metric("meshca_admission_overloaded_total").await, 1);
}
