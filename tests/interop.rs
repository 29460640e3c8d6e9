//! Issued certificates used the way the rest of the world uses them: a mutual TLS
//! handshake between two workloads with rustls, verification by OpenSSL, and
//! Certify called by Linkerd's own generated client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::sync::Arc;

use meshca::ca::material::to_pem;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::{chain, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Issues a leaf for `sa` and returns (chain: leaf first, PKCS#8 key).
async fn credentials(
    server: &TestServer,
    sa: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let (key, req) = server.request("default", sa);
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    let mut certs = vec![leaf];
    certs.extend(intermediates);
    (certs, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}

fn roots(server: &TestServer) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in server.anchors.certificates() {
        roots.add(c.clone()).unwrap();
    }
    Arc::new(roots)
}

#[tokio::test]
async fn issued_leaves_complete_a_mutual_tls_handshake() {
    let server = TestServer::start().await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (server_chain, server_key) = credentials(&server, "web").await;
    let (client_chain, client_key) = credentials(&server, "db").await;

    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&server), provider.clone())
            .build()
            .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&server))
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        (peer, buf)
    });

    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(server.identity("default", "web")).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"pong");
    let (peer, got) = accept.await.unwrap();
    assert_eq!(&got, b"ping");
    // The server saw the client's identity in its certificate.
    let (_, cert) = x509_parser::parse_x509_certificate(&peer).unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned();
    assert_eq!(cn, server.identity("default", "db"));
}

#[tokio::test]
async fn a_leaf_for_another_name_fails_the_handshake() {
    let server = TestServer::start().await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (server_chain, server_key) = credentials(&server, "web").await;
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&server))
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(server.identity("default", "db")).unwrap();
    let err = connector.connect(name, tcp).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

fn openssl_verify(
    dir: &std::path::Path,
    anchors: &str,
    intermediates: &str,
    leaf: &str,
    purpose: &str,
) -> std::process::Output {
    std::fs::write(dir.join("anchors.pem"), anchors).unwrap();
    std::fs::write(dir.join("intermediates.pem"), intermediates).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf).unwrap();
    std::process::Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(dir.join("anchors.pem"))
        .arg("-untrusted")
        .arg(dir.join("intermediates.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .expect("openssl is required for this test (apt-get install openssl; tests/run.sh installs it)")
}

#[tokio::test]
async fn openssl_verifies_the_returned_chain_for_client_and_server_use() {
    let server = TestServer::start().await;
    let anchors: String = server.anchors.certificates().iter().map(|c| to_pem("CERTIFICATE", c)).collect();
    for (key, label) in [
        (rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(), "p256"),
        (rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(), "p384"),
        (support::rsa_key(2048), "rsa2048"),
    ] {
        let identity = server.identity("default", "web");
        let req = meshca::proto::CertifyRequest {
            identity: identity.clone(),
            token: server.token("default", "web"),
            certificate_signing_request: support::csr_with_key(&key, &identity),
        };
        let resp = server.client().await.certify(req).await.unwrap().into_inner();
        let (leaf, intermediates) = chain(&resp);
        let inter: String = intermediates.iter().map(|c| to_pem("CERTIFICATE", c)).collect();
        for purpose in ["sslclient", "sslserver"] {
            let out =
                openssl_verify(server.dir.path(), &anchors, &inter, &to_pem("CERTIFICATE", &leaf), purpose);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains(": OK"),
                "{label} {purpose}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Negative control: without the issuer, OpenSSL must fail.
        let out = openssl_verify(server.dir.path(), &anchors, "", &to_pem("CERTIFICATE", &leaf), "sslclient");
        assert!(!out.status.success(), "{label}: verified without its issuer");
    }
}

#[tokio::test]
async fn linkerds_own_client_gets_a_certificate() {
    use linkerd2_proxy_api::identity as l5d;
    let server = TestServer::start().await;
    let (_key, req) = server.request("default", "web");
    let channel =
        meshca::agent::client::connect(&server.url(), &server.anchors, support::SERVER_NAME).await.unwrap();
    let mut client = l5d::identity_client::IdentityClient::new(channel);
    let mut token = req.token.clone();
    token.push(b'\n'); // the proxy sends the token file as read
    let resp = client
        .certify(l5d::CertifyRequest {
            identity: req.identity.clone(),
            token,
            certificate_signing_request: req.certificate_signing_request.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let leaf = CertificateDer::from(resp.leaf_certificate);
    let intermediates: Vec<_> =
        resp.intermediate_certificates.into_iter().map(CertificateDer::from).collect();
    server
        .anchors
        .verify(&leaf, &intermediates, meshca::clock::Clock::now(&server.clock), Some(&req.identity))
        .unwrap();
    let valid_until = resp.valid_until.expect("the proxy needs valid_until");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(valid_until.seconds, cert.validity().not_after.timestamp());
}

#[tokio::test]
async fn the_client_makes_rsa_keys_that_meshca_certifies() {
    let server = TestServer::start().await;
    let identity = server.identity("default", "web");
    let request = meshca::agent::client::Request {
        addr: &server.url(),
        anchors: &server.anchors,
        server_name: support::SERVER_NAME,
        identity: &identity,
        token: server.token("default", "web"),
        key_type: meshca::agent::client::KeyType::Rsa2048,
        client_identity: None,
    };
    let creds =
        meshca::agent::client::certify(request, meshca::clock::Clock::now(&server.clock)).await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&creds.leaf).unwrap();
    assert_eq!(cert.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION);
    assert!(cert.key_usage().unwrap().unwrap().value.key_encipherment());
    assert!(creds.key_pem().unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
}
