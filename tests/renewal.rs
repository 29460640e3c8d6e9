//! Renewal by proof of possession: Certify over mutual TLS with the current meshca
//! certificate and an empty token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::Duration;

use meshca::ca::material::to_pem;
use meshca::clock::Clock;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use support::{chain, csr, request_id, Options, TestServer, SERVER_NAME};
use tonic::Code;

/// Chain PEM and key PEM of a freshly issued certificate for `sa`.
async fn issued(server: &TestServer, sa: &str) -> (String, String) {
    let (key, req) = server.request("default", sa);
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    let pem = std::iter::once(&leaf).chain(&intermediates).map(|c| to_pem("CERTIFICATE", c)).collect();
    (pem, key.serialize_pem())
}

async fn client_as(
    server: &TestServer,
    identity: &(String, String),
) -> IdentityClient<tonic::transport::Channel> {
    let channel =
        meshca::agent::client::connect_as(&server.url(), &server.anchors, SERVER_NAME, Some(identity))
            .await
            .unwrap();
    IdentityClient::new(channel)
}

fn renewal_request(server: &TestServer, sa: &str) -> CertifyRequest {
    let identity = server.identity("default", sa);
    let (_, csr) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
    CertifyRequest { identity, token: Vec::new(), certificate_signing_request: csr }
}

#[tokio::test]
async fn a_valid_certificate_renews_itself_without_a_token() {
    let server = TestServer::start().await;
    let current = issued(&server, "web").await;
    let resp = client_as(&server, &current).await.certify(renewal_request(&server, "web")).await.unwrap();
    let id = request_id(resp.metadata());
    let (leaf, intermediates) = chain(&resp.into_inner());
    let web = server.identity("default", "web");
    server.anchors.verify(&leaf, &intermediates, server.clock.now(), Some(&web)).unwrap();
    let record = server.audit_record(&id);
    assert_eq!(record["outcome"], "issued");
    assert_eq!(record["auth_method"], "certificate");
    assert_eq!(record["subject"]["service_account"], "web");
    assert!(record.get("token_issuer").is_none());
}

#[tokio::test]
async fn a_certificate_cannot_renew_into_another_identity() {
    let server = TestServer::start().await;
    let current = issued(&server, "web").await;
    let status =
        client_as(&server, &current).await.certify(renewal_request(&server, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
}

#[tokio::test]
async fn expiry_is_judged_on_the_server_clock_with_the_skew_allowance() {
    let opts = Options {
        lifetimes: meshca::ca::profile::Lifetimes {
            issuance_lifetime: Duration::from_secs(3600),
            clock_skew_allowance: Duration::from_secs(120),
        },
        ..Default::default()
    };
    let server = TestServer::start_with(opts).await;
    let current = issued(&server, "web").await;
    let start = server.clock.now();
    // Expired 60 s ago: inside the allowance.
    server.clock.set(start + Duration::from_secs(3600 + 60));
    let mut client = client_as(&server, &current).await;
    client.certify(renewal_request(&server, "web")).await.unwrap();
    // Expired 10 min ago: refused, audited.
    server.clock.set(start + Duration::from_secs(3600 + 600));
    let status = client.certify(renewal_request(&server, "web")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("client_certificate_expired"), "{record}");
    assert_eq!(record["auth_method"], "certificate");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let server = TestServer::start().await;
    let other = TestServer::start().await;
    let foreign = issued(&other, "web").await;
    let status =
        client_as(&server, &foreign).await.certify(renewal_request(&server, "web")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("client_certificate_untrusted"), "{record}");
}

#[tokio::test]
async fn a_certificate_for_another_trust_domain_is_refused() {
    let server = TestServer::start().await;
    // Signed by this very issuer, but naming another trust domain.
    let dir = server.dir.path();
    let issuer_pem = std::fs::read_to_string(dir.join("issuer/tls.crt")).unwrap();
    let issuer_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer/tls.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).unwrap();
    let name = "web.default.serviceaccount.identity.meshca-system.other.org";
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_before = (server.clock.now() - Duration::from_secs(60)).into();
    params.not_after = (server.clock.now() + Duration::from_secs(3600)).into();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let identity = (format!("{}{issuer_pem}", cert.pem()), key.serialize_pem());
    let status =
        client_as(&server, &identity).await.certify(renewal_request(&server, "web")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("client_certificate_wrong_identity"), "{record}");
}

#[tokio::test]
async fn a_token_still_wins_over_a_client_certificate() {
    let server = TestServer::start().await;
    let current = issued(&server, "web").await;
    // A token for db with web's certificate: the token decides, and it is for db.
    let mut req = renewal_request(&server, "db");
    req.token = server.token("default", "db");
    let resp = client_as(&server, &current).await.certify(req).await.unwrap();
    let record = server.audit_record(&request_id(resp.metadata()));
    assert_eq!(record["auth_method"], "jwks");
    assert_eq!(record["subject"]["service_account"], "db");
}
