//! Istio's CreateCertificate (`istio.v1.auth.IstioCertificateService`), served beside
//! Linkerd's Certify on the same TLS port, called by a client generated from Istio's
//! `ca.proto` (proto/istio_ca.proto) over real TLS.
//!
//! What Istio's agents do: a PEM CSR naming the workload's SPIFFE ID as its only
//! URI SAN, the service-account token in `authorization: Bearer …`, a requested
//! validity; they expect the chain leaf first and root last, the leaf naming the
//! SPIFFE ID alone. The hostile cases are Certify's: another service account's
//! token, extra or DNS names, CA:TRUE, a bad signature, an oversized request, no
//! credential; each is refused with Certify's status, reason code and audit record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::Duration;

use meshca::ca::material::to_pem;
use meshca::clock::Clock;
use meshca::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca::istio::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, PublicKeyData, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use support::{request_id, Options, TestServer, SERVER_NAME};
use tonic::transport::Channel;
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const WEB_SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/web";

async fn client(server: &TestServer) -> IstioCertificateServiceClient<Channel> {
    let channel = meshca::agent::client::connect(&server.url(), &server.anchors, SERVER_NAME).await.unwrap();
    IstioCertificateServiceClient::new(channel)
}

/// A CSR as Istio's agent makes it: empty subject, the SPIFFE ID as its one URI SAN,
/// plus whatever `more` adds.
fn istio_csr(key: &KeyPair, spiffe_id: &str, more: impl FnOnce(&mut CertificateParams)) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into().unwrap())];
    more(&mut params);
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// A request with `token` as the bearer token.
fn with_token(req: IstioCertificateRequest, token: &[u8]) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(req);
    let bearer = format!("Bearer {}", String::from_utf8(token.to_vec()).unwrap());
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    request
}

fn csr_request(csr: String) -> IstioCertificateRequest {
    IstioCertificateRequest { csr, validity_duration: 3600, ..Default::default() }
}

fn chain(response: &IstioCertificateResponse) -> Vec<CertificateDer<'static>> {
    response
        .cert_chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).expect("one PEM certificate per entry"))
        .collect()
}

/// The leaf names `spiffe_id` alone, in a critical SAN, with an empty subject.
fn assert_spiffe_only(leaf: &[u8], spiffe_id: &str) {
    let (_, cert) = X509Certificate::from_der(leaf).unwrap();
    assert!(cert.subject().as_raw().len() <= 2, "empty subject: {}", cert.subject());
    let san = cert
        .extensions()
        .iter()
        .find(|e| matches!(e.parsed_extension(), ParsedExtension::SubjectAlternativeName(_)))
        .expect("a SAN");
    assert!(san.critical, "with an empty subject the SAN is critical (RFC 5280 4.2.1.6)");
    let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else { unreachable!() };
    assert!(
        matches!(names.general_names.as_slice(), [GeneralName::URI(uri)] if *uri == spiffe_id),
        "{:?}",
        names.general_names
    );
}

#[tokio::test]
async fn an_istio_agent_gets_a_spiffe_only_leaf_with_the_chain_to_the_root() {
    let server = TestServer::start().await;
    let key = KeyPair::generate().unwrap();
    let req = csr_request(istio_csr(&key, WEB_SPIFFE, |_| {}));
    let response =
        client(&server).await.create_certificate(with_token(req, &server.token("default", "web"))).await;
    let response = response.unwrap_or_else(|s| panic!("{:?}: {}", s.code(), s.message()));
    let id = request_id(response.metadata());
    let certs = chain(response.get_ref());
    // Leaf, issuer, root: the root is the trust anchor the chain ends in.
    assert_eq!(certs.len(), 3, "{:?}", response.get_ref().cert_chain);
    assert_eq!(certs[2].as_ref(), server.anchors.certificates()[0].as_ref(), "root last");
    server.anchors.verify(&certs[0], &certs[1..2], server.clock.now(), None).unwrap();
    assert_spiffe_only(&certs[0], WEB_SPIFFE);
    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info().as_slice(), "the CSR's key");
    // One hour asked for: one hour from now, plus the backdate.
    let validity = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(validity, 3600 + 120, "asked-for lifetime plus the clock-skew backdate");

    let record = server.audit_record(&id);
    assert_eq!(record["outcome"], "issued", "{record}");
    assert_eq!(record["requested_identity"], WEB_SPIFFE, "{record}");
    assert_eq!(record["subject"]["service_account"], "web", "{record}");
    assert_eq!(record["auth_method"], "jwks", "{record}");
}

#[tokio::test]
async fn a_longer_validity_than_configured_is_capped_and_none_means_the_configured_one() {
    let server = TestServer::start().await;
    let key = KeyPair::generate().unwrap();
    let configured = Duration::from_secs(24 * 3600).as_secs() as i64;
    for asked in [10 * 365 * 24 * 3600, 0, -5] {
        let req = IstioCertificateRequest {
            validity_duration: asked,
            ..csr_request(istio_csr(&key, WEB_SPIFFE, |_| {}))
        };
        let response = client(&server)
            .await
            .create_certificate(with_token(req, &server.token("default", "web")))
            .await
            .unwrap();
        let certs = chain(response.get_ref());
        let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
        let validity = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(validity, configured + 120, "asked {asked}");
    }
}

#[tokio::test]
async fn a_token_for_istios_audience_is_accepted_where_it_is_configured() {
    let istio_claims = |server: &TestServer| {
        let mut claims = server.claims("default", "web");
        claims.audience = vec!["istio-ca".into()];
        server.signer.sign(&claims).unwrap().into_bytes()
    };
    let key = KeyPair::generate().unwrap();
    let request = || csr_request(istio_csr(&key, WEB_SPIFFE, |_| {}));
    // By default meshca accepts Linkerd's audience only.
    let default = TestServer::start().await;
    let status =
        client(&default).await.create_certificate(with_token(request(), &istio_claims(&default))).await;
    assert_eq!(status.unwrap_err().code(), Code::Unauthenticated);
    // With --token-audiences identity.l5d.io,istio-ca both meshes' tokens are.
    let both =
        Options { audiences: Some(vec!["identity.l5d.io".into(), "istio-ca".into()]), ..Options::default() };
    let server = TestServer::start_with(both).await;
    client(&server).await.create_certificate(with_token(request(), &istio_claims(&server))).await.unwrap();
}

#[tokio::test]
async fn renewal_by_mutual_tls_with_the_current_istio_certificate_needs_no_token() {
    let server = TestServer::start().await;
    let key = KeyPair::generate().unwrap();
    let req = csr_request(istio_csr(&key, WEB_SPIFFE, |_| {}));
    let first = client(&server)
        .await
        .create_certificate(with_token(req, &server.token("default", "web")))
        .await
        .unwrap();
    let pems = &first.get_ref().cert_chain;
    let identity = (format!("{}{}", pems[0], pems[1]), key.serialize_pem());
    let channel =
        meshca::agent::client::connect_as(&server.url(), &server.anchors, SERVER_NAME, Some(&identity))
            .await
            .unwrap();
    let next = KeyPair::generate().unwrap();
    let renewed = IstioCertificateServiceClient::new(channel)
        .create_certificate(csr_request(istio_csr(&next, WEB_SPIFFE, |_| {})))
        .await
        .unwrap_or_else(|s| panic!("{:?}: {}", s.code(), s.message()));
    let record = server.audit_record(&request_id(renewed.metadata()));
    assert_eq!(
        (&record["outcome"], &record["auth_method"]),
        (&"issued".into(), &"certificate".into()),
        "{record}"
    );
    assert_spiffe_only(&chain(renewed.get_ref())[0], WEB_SPIFFE);
}

#[tokio::test]
async fn hostile_requests_are_refused_with_certifys_codes_and_audited() {
    let server = TestServer::start().await;
    let key = KeyPair::generate().unwrap();
    let web = server.token("default", "web");
    let db = server.token("default", "db");
    let dns = server.identity("default", "web");
    let plain = || istio_csr(&key, WEB_SPIFFE, |_| {});
    let mut bad_signature =
        CertificateSigningRequestDer::from_pem_slice(plain().as_bytes()).unwrap().as_ref().to_vec();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    // (what, request, bearer token, status code, reason code)
    type Case<'a> = (&'a str, IstioCertificateRequest, Option<&'a [u8]>, Code, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "another service account's token",
            csr_request(plain()),
            Some(&db),
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "a second URI SAN",
            csr_request(istio_csr(&key, WEB_SPIFFE, |p| {
                p.subject_alt_names
                    .push(SanType::URI("spiffe://cluster.local/ns/default/sa/db".try_into().unwrap()))
            })),
            Some(&web),
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "a DNS SAN, even the Linkerd name of the same identity",
            csr_request(istio_csr(&key, WEB_SPIFFE, |p| {
                p.subject_alt_names.push(SanType::DnsName(dns.clone().try_into().unwrap()))
            })),
            Some(&web),
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "a subject CN (Istio leaves have none)",
            csr_request(istio_csr(&key, WEB_SPIFFE, |p| {
                p.distinguished_name.push(rcgen::DnType::CommonName, dns.as_str())
            })),
            Some(&web),
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "CA:TRUE",
            csr_request(istio_csr(&key, WEB_SPIFFE, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained))),
            Some(&web),
            Code::PermissionDenied,
            "csr_ca_requested",
        ),
        (
            "a bad signature",
            csr_request(to_pem("CERTIFICATE REQUEST", &bad_signature)),
            Some(&web),
            Code::InvalidArgument,
            "csr_bad_signature",
        ),
        ("not PEM", csr_request("MIIB...".into()), Some(&web), Code::InvalidArgument, "csr_malformed"),
        (
            "an oversized request",
            csr_request(format!("{}{}", plain(), "x".repeat(65 * 1024))),
            Some(&web),
            Code::InvalidArgument,
            "request_too_large",
        ),
        (
            "a subject_id of another service account",
            IstioCertificateRequest {
                subject_id: "spiffe://cluster.local/ns/default/sa/db".into(),
                ..csr_request(plain())
            },
            Some(&web),
            Code::PermissionDenied,
            "identity_mismatch",
        ),
        ("no credential at all", csr_request(plain()), None, Code::Unauthenticated, "no_credentials"),
    ];
    let mut client = client(&server).await;
    for (what, req, token, code, reason) in cases {
        let request = match token {
            Some(token) => with_token(req, token),
            None => tonic::Request::new(req),
        };
        let status = match client.create_certificate(request).await {
            Ok(_) => panic!("{what}: a certificate was issued"),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert_eq!(status.metadata().get("x-meshca-reason").unwrap(), reason, "{what}: {}", status.message());
        let record = server.audit_record(&request_id(status.metadata()));
        assert_eq!(record["outcome"], "denied", "{what}: {record}");
        assert!(record["reason"].as_str().unwrap().starts_with(reason), "{what}: {record}");
    }
    let issued = server.audit_records().iter().filter(|r| r["outcome"] == "issued").count();
    assert_eq!(issued, 1, "only meshca's own serving certificate");
}

#[tokio::test]
async fn linkerd_and_istio_proxies_share_one_ca_and_one_audit_log() {
    let server = TestServer::start().await;
    let (_, linkerd) = server.request("default", "web");
    let mut certify = server.client().await;
    let from_linkerd = certify.certify(linkerd).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let req = csr_request(istio_csr(&key, WEB_SPIFFE, |_| {}));
    let from_istio = client(&server)
        .await
        .create_certificate(with_token(req, &server.token("default", "web")))
        .await
        .unwrap();
    let linkerd_issuer = &from_linkerd.get_ref().intermediate_certificates[0];
    let istio_issuer = &chain(from_istio.get_ref())[1];
    assert_eq!(linkerd_issuer.as_slice(), istio_issuer.as_ref(), "the same issuer");
    let records = server.audit_records();
    let ids = [request_id(from_linkerd.metadata()), request_id(from_istio.metadata())];
    let seqs: Vec<u64> = ids
        .iter()
        .map(|id| records.iter().find(|r| r["request_id"] == id.as_str()).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs[1], seqs[0] + 1, "one chain of records");
    assert_eq!(meshca::audit::verify_file(&server.audit_path).unwrap().records, records.len() as u64);
}
