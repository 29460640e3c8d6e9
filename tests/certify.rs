//! Certify over real TLS sockets: issuance, every refusal with its status code and
//! audit record, serials, validity windows, fail-closed auditing, admin endpoints,
//! graceful shutdown and start-up refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use meshca::ca::hierarchy::HierarchyLifetimes;
use meshca::ca::profile::Lifetimes;
use meshca::clock::Clock;
use meshca::proto::CertifyRequest;
use support::{chain, csr, csr_with_key, http_get, request_id, rsa_key, Options, TestServer};
use tonic::Code;
use x509_parser::prelude::*;

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Asserts everything the leaf profile promises.
fn assert_leaf_profile(der: &[u8], identity: &str, spiffe: &str, rsa: bool) {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), identity);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san.value.general_names.iter().map(|n| format!("{n}")).collect();
    assert_eq!(names, vec![format!("DNSName({identity})"), format!("URI({spiffe})")]);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert_eq!(ku.key_encipherment(), rsa);
    assert!(!ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let has = |oid| cert.extensions().iter().any(|e| e.oid == oid);
    assert!(has(x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER));
    assert!(has(x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER));
    let serial = cert.raw_serial();
    assert!(serial[0] & 0x80 == 0, "serial must be positive");
    assert!(serial.len() <= 17 && cert.serial.bits() > 100, "128 random bits");
}

#[tokio::test]
async fn p256_p384_and_rsa_csrs_get_leaves_that_chain_to_the_anchors() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let identity = server.identity("default", "web");
    let keys = [
        ("p256", rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(), false),
        ("p384", rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(), false),
        ("rsa2048", rsa_key(2048), true),
        ("rsa3072", rsa_key(3072), true),
    ];
    for (label, key, rsa) in keys {
        let req = CertifyRequest {
            identity: identity.clone(),
            token: server.token("default", "web"),
            certificate_signing_request: csr_with_key(&key, &identity),
        };
        let resp = client.certify(req).await.unwrap_or_else(|s| panic!("{label}: {s:?}"));
        let id = request_id(resp.metadata());
        let resp = resp.into_inner();
        let (leaf, intermediates) = chain(&resp);
        assert_eq!(intermediates.len(), 1, "issuer only, never the anchor");
        assert!(!server.anchors.certificates().contains(&intermediates[0]));
        server.anchors.verify(&leaf, &intermediates, server.clock.now(), Some(&identity)).unwrap();
        assert_leaf_profile(&leaf, &identity, "spiffe://cluster.local/ns/default/sa/web", rsa);
        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "{label}");
        let valid_until = resp.valid_until.unwrap();
        assert_eq!(valid_until.seconds, cert.validity().not_after.timestamp());
        let record = server.audit_record(&id);
        assert_eq!(record["outcome"], "issued");
        assert_eq!(record["csr_key_type"], label);
        assert_eq!(record["subject"]["namespace"], "default");
        assert_eq!(record["subject"]["pod_name"], "web-5d8f7");
        assert_eq!(
            record["serial"].as_str().unwrap().trim_start_matches('0'),
            hex(cert.raw_serial()).trim_start_matches('0')
        );
        assert_eq!(record["fingerprint_sha256"], meshca::audit::sha256_hex(&leaf));
    }
}

fn hex(b: &[u8]) -> String {
    meshca::audit::hex(b)
}

#[tokio::test]
async fn p384_issuer_signs_with_ecdsa_sha384() {
    let opts = Options { key_type: meshca::ca::hierarchy::CaKeyType::P384, ..Default::default() };
    let server = TestServer::start_with(opts).await;
    let (_key, req) = server.request("default", "web");
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    let (_, cert) = X509Certificate::from_der(&resp.leaf_certificate).unwrap();
    assert_eq!(cert.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA384);
}

#[tokio::test]
async fn linkerd_layout_with_an_sec1_issuer_key_is_accepted() {
    let server = TestServer::start_prepared(Options::default(), |dir| {
        let issuer = dir.join("issuer");
        // openssl writes the traditional SEC1 form ("EC PRIVATE KEY"), as cert-manager does.
        let out = std::process::Command::new("openssl")
            .args(["ec", "-in"])
            .arg(issuer.join("tls.key"))
            .arg("-out")
            .arg(issuer.join("key.pem"))
            .output()
            .expect("openssl is required for this test (tests/run.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::rename(issuer.join("tls.crt"), issuer.join("crt.pem")).unwrap();
        std::fs::remove_file(issuer.join("tls.key")).unwrap();
        let key = std::fs::read_to_string(issuer.join("key.pem")).unwrap();
        assert!(key.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    })
    .await;
    let (_key, req) = server.request("default", "web");
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    server.anchors.verify(&leaf, &intermediates, server.clock.now(), None).unwrap();
}

/// A request that must be refused, how, and why.
struct Refused {
    name: &'static str,
    request: CertifyRequest,
    code: Code,
    reason: &'static str,
}

fn refusals(server: &TestServer) -> Vec<Refused> {
    let web = server.identity("default", "web");
    let (_, good_csr) = csr(&web, &rcgen::PKCS_ECDSA_P256_SHA256);
    let token = server.token("default", "web");
    let req = |token: Vec<u8>, csr: Vec<u8>, identity: &str| CertifyRequest {
        identity: identity.to_owned(),
        token,
        certificate_signing_request: csr,
    };
    let signed = |f: &dyn Fn(&mut meshca::auth::dev::TokenClaims)| {
        let mut c = server.claims("default", "web");
        f(&mut c);
        server.signer.sign(&c).unwrap().into_bytes()
    };
    let now = server.clock.now();
    let fixture =
        |name: &str| std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut bad_sig = good_csr.clone();
    let n = bad_sig.len();
    bad_sig[n - 5] ^= 0x55; // inside the signature value
    let mut ca_params = rcgen::CertificateParams::new(vec![web.clone()]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    let ca_csr = ca_params
        .serialize_request(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .unwrap()
        .der()
        .to_vec();
    let (_, ed_csr) = csr(&web, &rcgen::PKCS_ED25519);
    let (_, other_csr) = csr(&server.identity("default", "db"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let none_token = {
        let b64 = |s: &str| meshca::jose::encode(s);
        let claims = String::from_utf8(token.split(|b| *b == b'.').nth(1).unwrap().to_vec()).unwrap();
        format!("{}.{claims}.", b64(r#"{"alg":"none","typ":"JWT"}"#)).into_bytes()
    };
    vec![
        Refused {
            name: "expired token",
            request: req(
                signed(&|c| {
                    c.issued_at = now - Duration::from_secs(7200);
                    c.expires_at = now - Duration::from_secs(3600);
                }),
                good_csr.clone(),
                &web,
            ),
            code: Code::Unauthenticated,
            reason: "token_expired",
        },
        Refused {
            name: "wrong audience",
            request: req(signed(&|c| c.audience = vec!["kubernetes".into()]), good_csr.clone(), &web),
            code: Code::Unauthenticated,
            reason: "wrong_audience",
        },
        Refused {
            name: "wrong issuer",
            request: req(signed(&|c| c.issuer = "https://evil.example".into()), good_csr.clone(), &web),
            code: Code::Unauthenticated,
            reason: "wrong_issuer",
        },
        Refused {
            name: "alg none",
            request: req(none_token, good_csr.clone(), &web),
            code: Code::Unauthenticated,
            reason: "unsupported_algorithm",
        },
        Refused {
            name: "garbage token",
            request: req(b"not-a-jwt".to_vec(), good_csr.clone(), &web),
            code: Code::Unauthenticated,
            reason: "token_malformed",
        },
        Refused {
            name: "no token and no client certificate",
            request: req(Vec::new(), good_csr.clone(), &web),
            code: Code::Unauthenticated,
            reason: "no_credentials",
        },
        Refused {
            name: "token over 16 KiB",
            request: req(vec![b'a'; 16 * 1024 + 1], good_csr.clone(), &web),
            code: Code::InvalidArgument,
            reason: "token_too_large",
        },
        Refused {
            name: "token for another service account",
            request: req(server.token("default", "db"), good_csr.clone(), &web),
            code: Code::PermissionDenied,
            reason: "identity_mismatch",
        },
        Refused {
            name: "identity in another trust domain",
            request: req(
                token.clone(),
                good_csr.clone(),
                "web.default.serviceaccount.identity.meshca-system.other.org",
            ),
            code: Code::PermissionDenied,
            reason: "identity_mismatch",
        },
        Refused {
            name: "empty identity",
            request: req(token.clone(), good_csr.clone(), ""),
            code: Code::InvalidArgument,
            reason: "identity_malformed",
        },
        Refused {
            name: "CSR naming another identity",
            request: req(token.clone(), other_csr, &web),
            code: Code::PermissionDenied,
            reason: "csr_name_not_allowed",
        },
        Refused {
            name: "CSR asking for CA:TRUE",
            request: req(token.clone(), ca_csr, &web),
            code: Code::PermissionDenied,
            reason: "csr_ca_requested",
        },
        Refused {
            name: "CSR with a bad signature",
            request: req(token.clone(), bad_sig, &web),
            code: Code::InvalidArgument,
            reason: "csr_bad_signature",
        },
        Refused {
            name: "malformed CSR",
            request: req(token.clone(), b"\x30\x03\x02\x01".to_vec(), &web),
            code: Code::InvalidArgument,
            reason: "csr_malformed",
        },
        Refused {
            name: "empty CSR",
            request: req(token.clone(), Vec::new(), &web),
            code: Code::InvalidArgument,
            reason: "csr_empty",
        },
        Refused {
            name: "CSR over 16 KiB",
            request: req(token.clone(), vec![0x30; 16 * 1024 + 1], &web),
            code: Code::InvalidArgument,
            reason: "csr_too_large",
        },
        Refused {
            name: "RSA-1024 key",
            request: req(token.clone(), fixture("rsa1024.csr.der"), &web),
            code: Code::InvalidArgument,
            reason: "csr_weak_key",
        },
        Refused {
            name: "P-521 key",
            request: req(token.clone(), fixture("p521.csr.der"), &web),
            code: Code::InvalidArgument,
            reason: "csr_unsupported_key",
        },
        Refused {
            name: "Ed25519 key",
            request: req(token.clone(), ed_csr, &web),
            code: Code::InvalidArgument,
            reason: "csr_unsupported_key",
        },
        Refused {
            name: "request over 64 KiB (within the decoding limit)",
            request: req(token.clone(), good_csr.clone(), &"a".repeat(66 * 1024)),
            code: Code::InvalidArgument,
            reason: "request_too_large",
        },
    ]
}

#[tokio::test]
async fn every_refusal_has_its_status_code_no_certificate_and_an_audit_record() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in refusals(&server) {
        let status = client.certify(case.request).await.err().unwrap_or_else(|| {
            panic!("{}: a certificate was issued", case.name);
        });
        assert_eq!(status.code(), case.code, "{}: {}", case.name, status.message());
        let record = server.audit_record(&request_id(status.metadata()));
        assert_eq!(record["outcome"], "denied", "{}", case.name);
        assert_eq!(record["code"], meshca::status::code_name(case.code), "{}", case.name);
        let reason = record["reason"].as_str().unwrap();
        assert!(reason.starts_with(case.reason), "{}: reason {reason:?}", case.name);
        assert!(record.get("serial").is_none() && record.get("fingerprint_sha256").is_none());
    }
    let issued = server.audit_records().iter().filter(|r| r["outcome"] == "issued").count();
    assert_eq!(issued, 1, "only the serving certificate was issued");
    assert!(meshca::audit::verify_file(&server.audit_path).is_ok());
}

#[tokio::test]
async fn refusal_messages_never_echo_the_token() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut claims = server.claims("default", "web");
    claims.audience = vec!["aud-marker-7f3a".into()];
    let token = server.signer.sign(&claims).unwrap();
    let (_, req) = server.request("default", "web");
    let status =
        client.certify(CertifyRequest { token: token.clone().into_bytes(), ..req }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("aud-marker-7f3a"));
    let audit = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(!audit.contains(&token) && !audit.contains("aud-marker-7f3a"));
}

#[tokio::test]
async fn a_thousand_issuances_never_reuse_a_serial() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (_key, req) = server.request("default", "web");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut serials = Vec::new();
            for _ in 0..125 {
                let resp = client.certify(req.clone()).await.unwrap().into_inner();
                let (_, cert) = X509Certificate::from_der(&resp.leaf_certificate).unwrap();
                serials.push(cert.raw_serial().to_vec());
            }
            serials
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for s in t.await.unwrap() {
            assert!(seen.insert(s), "serial reused");
        }
    }
    assert_eq!(seen.len(), 1000);
}

#[tokio::test]
async fn validity_is_backdated_by_the_skew_allowance_and_lasts_the_issuance_lifetime() {
    let opts = Options {
        lifetimes: Lifetimes {
            issuance_lifetime: Duration::from_secs(90),
            clock_skew_allowance: Duration::from_secs(30),
        },
        // The fake clock moves hours ahead; TLS clients would check the serving
        // certificate against the real clock, which is not what this test is about.
        plaintext: true,
        ..Default::default()
    };
    let server = TestServer::start_with(opts).await;
    server.clock.advance(Duration::from_secs(7200)); // well past the issuer's own backdated start
    let now = secs(server.clock.now());
    let (_key, req) = server.request("default", "web");
    let resp = server.client().await.certify(req).await.unwrap();
    let server_time: i64 = resp.metadata().get("x-meshca-time").unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(server_time / 1000, now, "the response carries the server's clock");
    let resp = resp.into_inner();
    let (_, cert) = X509Certificate::from_der(&resp.leaf_certificate).unwrap();
    assert_eq!(cert.validity().not_before.timestamp(), now - 30);
    assert_eq!(cert.validity().not_after.timestamp(), now + 90);
    assert_eq!(resp.valid_until.unwrap().seconds, now + 90);
}

#[tokio::test]
async fn leaves_never_outlive_the_issuer_and_an_expired_issuer_refuses() {
    let opts = Options {
        hierarchy: HierarchyLifetimes {
            anchor: Duration::from_secs(86_400 * 365),
            issuer: Duration::from_secs(3600),
        },
        plaintext: true,
        ..Default::default()
    };
    let server = TestServer::start_with(opts).await;
    let start = server.clock.now();
    let issuer_end = secs(start) + 3600;
    server.clock.advance(Duration::from_secs(3000));
    let (_key, req) = server.request("default", "web");
    let mut client = server.client().await;
    let resp = client.certify(req).await.unwrap().into_inner();
    let (_, cert) = X509Certificate::from_der(&resp.leaf_certificate).unwrap();
    assert_eq!(cert.validity().not_after.timestamp(), issuer_end, "clamped to the issuer");
    assert_eq!(resp.valid_until.unwrap().seconds, issuer_end);

    server.clock.set(start + Duration::from_secs(3601));
    let (_key, req) = server.request("default", "web");
    let status = client.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    let record = server.audit_record(&request_id(status.metadata()));
    assert!(record["reason"].as_str().unwrap().starts_with("issuer_expired"));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn no_certificate_leaves_when_the_audit_log_cannot_be_written() {
    let opts = Options { plaintext: true, audit_log: Some("/dev/full".into()), ..Default::default() };
    let server = TestServer::start_with(opts).await;
    let (_key, req) = server.request("default", "web");
    let status = server.client().await.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("audit"), "{}", status.message());
}

#[tokio::test]
async fn a_server_over_capacity_answers_resource_exhausted_and_audits_it() {
    // No capacity at all: every request finds the in-flight bound reached.
    let server = TestServer::start_with(Options { max_in_flight: 0, ..Default::default() }).await;
    let (_key, req) = server.request("default", "web");
    let status = server.client().await.certify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let record = server.audit_record(&request_id(status.metadata()));
    assert_eq!(record["outcome"], "denied");
    assert!(record["reason"].as_str().unwrap().starts_with("overloaded"));
}

#[tokio::test]
async fn linkerd_proxies_trailing_newline_tokens_are_accepted() {
    let server = TestServer::start().await;
    let (_key, mut req) = server.request("default", "web");
    req.token.extend_from_slice(b"\n");
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    assert!(!resp.leaf_certificate.is_empty());
}

#[tokio::test]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let server = TestServer::start().await;
    let (_key, req) = server.request("default", "web");
    // The first answered Certify proves the gRPC listener is serving.
    server.client().await.certify(req).await.unwrap();
    assert_eq!(http_get(server.admin, "/live").await.0, 200);
    assert_eq!(http_get(server.admin, "/ready").await.0, 200);
    let (code, body) = http_get(server.admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("meshca_certify_total{outcome=\"issued\",reason=\"\"} 1"), "{body}");
    assert!(body.contains("meshca_ready 1"));
    assert_eq!(http_get(server.admin, "/nope").await.0, 404);
}

#[tokio::test]
async fn graceful_shutdown_leaves_an_intact_audit_log() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    for _ in 0..20 {
        let (_key, req) = server.request("default", "web");
        client.certify(req).await.unwrap();
    }
    let path = server.audit_path.clone();
    server.stop().await.unwrap();
    let report = meshca::audit::verify_file(&path).unwrap();
    assert_eq!(report.records, 21, "serving certificate + 20 leaves");
    let (_key, req) = server.request("default", "web");
    assert!(client.certify(req).await.is_err(), "no service after shutdown");
}

/// Starts `run` on prepared material and returns its error.
async fn start_error(dir: &std::path::Path) -> meshca::server::Error {
    let naming = meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap();
    std::fs::write(dir.join("jwks.json"), meshca::auth::dev::DevSigner::generate().unwrap().0.jwks_json())
        .unwrap();
    let config = support::config(dir, &naming, &Options::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let clock = std::sync::Arc::new(meshca::clock::SystemClock);
    // Told to stop at once: a server that started, instead of refusing, returns Ok.
    meshca::server::run(config, clock, l, a, std::future::ready(())).await.expect_err("the server started")
}

#[tokio::test]
async fn serve_refuses_unusable_issuers() {
    let naming = meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap();
    let now = meshca::clock::SystemClock.now();
    let make = || {
        let d = tempfile::tempdir().unwrap();
        support::write_ca(d.path(), &naming, &Options::default(), now);
        d
    };

    // Issuer from another hierarchy: does not chain to these anchors.
    let (a, b) = (make(), make());
    std::fs::copy(b.path().join("trust-anchors.pem"), a.path().join("trust-anchors.pem")).unwrap();
    let err = start_error(a.path()).await;
    assert!(matches!(err, meshca::server::Error::Issuer(meshca::ca::Error::Untrusted { .. })), "{err}");

    // Key of another issuer.
    let (a, b) = (make(), make());
    std::fs::copy(b.path().join("issuer/tls.key"), a.path().join("issuer/tls.key")).unwrap();
    let err = start_error(a.path()).await;
    assert!(matches!(err, meshca::server::Error::Issuer(meshca::ca::Error::KeyMismatch)), "{err}");

    // A leaf is not a CA.
    let a = make();
    let leaf = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.self_signed(&key).unwrap();
    std::fs::write(a.path().join("issuer/tls.crt"), cert.pem()).unwrap();
    std::fs::write(a.path().join("issuer/tls.key"), key.serialize_pem()).unwrap();
    let err = start_error(a.path()).await;
    assert!(matches!(err, meshca::server::Error::Issuer(meshca::ca::Error::NotCa { .. })), "{err}");

    // Expired issuer.
    let d = tempfile::tempdir().unwrap();
    let opts = Options {
        hierarchy: HierarchyLifetimes {
            anchor: Duration::from_secs(86_400),
            issuer: Duration::from_secs(60),
        },
        ..Default::default()
    };
    support::write_ca(d.path(), &naming, &opts, now - Duration::from_secs(3600));
    let err = start_error(d.path()).await;
    assert!(matches!(err, meshca::server::Error::Issuer(meshca::ca::Error::IssuerExpired { .. })), "{err}");
}
