//! Bootstrap tokens, end to end: `meshca bootstrap-token create` (the built binary)
//! mints a token with a test server's issuer; Certify over real gRPC spends it
//! once (or `--uses` times), refuses it after, and the host renews by proof of
//! possession from then on. Uses are recorded in a file (one replica, kept across
//! a restart) or as Leases in the test Kubernetes API server (two replicas sharing
//! it see each other's uses).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::auth::bootstrap::{self, BootstrapSigner, PREFIX, TYP};
use meshca::auth::replay::{LeaseReplayStore, ReplayError, ReplayStore};
use meshca::ca::material::{read_pkcs8_key, to_pem};
use meshca::ca::reload::Outcome;
use meshca::ca::store::Snapshot;
use meshca::clock::Clock;
use meshca::config::{BootstrapConfig, ReplayConfig};
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use serde_json::{json, Value};
use support::apiserver::{ApiServer, Mode};
use support::process::{bin, command};
use support::{chain, csr, request_id, Options, TestServer, SERVER_NAME};
use tonic::Code;

const LEEWAY: Duration = Duration::from_secs(60);

/// Bootstrap tokens on, uses recorded in DIR/bootstrap-used.jsonl.
fn with_file_store() -> Options {
    let replay = ReplayConfig::File("bootstrap-used.jsonl".into());
    Options { bootstrap: Some(BootstrapConfig { replay, leeway: LEEWAY }), ..Options::default() }
}

/// Bootstrap tokens on, uses recorded as Leases in `api`.
fn with_lease_store(api: &ApiServer) -> Options {
    let replay = ReplayConfig::Kubernetes { kubeconfig: Some(api.kubeconfig.clone()) };
    Options { bootstrap: Some(BootstrapConfig { replay, leeway: LEEWAY }), ..Options::default() }
}

/// Runs the meshca binary with `args`, no `MESHCA_*` variables from outside.
async fn meshca(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::from(command(bin()));
    cmd.args(args).env("MESHCA_LOG", "warn").output().await.unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `meshca bootstrap-token create` against the server's issuer: the token, and what
/// it said on stderr.
async fn mint(server: &TestServer, identity: &str, extra: &[&str]) -> (String, String) {
    let dir = server.dir.path();
    let (issuer, anchors) = (dir.join("issuer"), dir.join("trust-anchors.pem"));
    let mut args = vec!["bootstrap-token", "create", "--identity", identity];
    args.extend(["--issuer-dir", path(&issuer), "--trust-anchors", path(&anchors)]);
    args.extend(extra);
    let out = meshca(&args).await;
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "stdout is the token alone: {stdout}");
    (stdout.trim_end().to_owned(), stderr)
}

/// A signer with the server's current issuer, for tokens the CLI would not make.
fn signer(server: &TestServer) -> BootstrapSigner {
    let dir = server.dir.path();
    let now = server.clock.now();
    let snapshot = Snapshot::load(&dir.join("trust-anchors.pem"), &dir.join("issuer"), now).unwrap();
    let key = read_pkcs8_key(&dir.join("issuer/tls.key")).unwrap();
    BootstrapSigner::new(&key, &snapshot.issuer, server.naming.clone()).unwrap()
}

/// A request for `sa` in `default` with a fresh P-256 key, presenting `token`.
fn request(server: &TestServer, sa: &str, token: &str) -> CertifyRequest {
    let identity = server.identity("default", sa);
    let (_, csr) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
    CertifyRequest { identity, token: token.as_bytes().to_vec(), certificate_signing_request: csr }
}

/// Certify once; on success, checks the chain for `req.identity` and returns its audit record.
async fn issued(server: &TestServer, req: CertifyRequest) -> Value {
    let identity = req.identity.clone();
    let resp = server.client().await.certify(req).await.unwrap_or_else(|s| panic!("refused: {s:?}"));
    let id = request_id(resp.metadata());
    let (leaf, intermediates) = chain(&resp.into_inner());
    server.anchors.verify(&leaf, &intermediates, server.clock.now(), Some(&identity)).unwrap();
    let record = server.audit_record(&id);
    assert_eq!(record["outcome"], "issued", "{record}");
    record
}

/// Certify once, expecting a refusal: its status and audit record.
async fn refused(server: &TestServer, req: CertifyRequest) -> (tonic::Status, Value) {
    let status = server.client().await.certify(req).await.expect_err("a certificate was issued");
    let record = server.audit_record(&request_id(status.metadata()));
    assert_eq!(record["outcome"], "denied", "{record}");
    (status, record)
}

fn reason(record: &Value) -> &str {
    record["reason"].as_str().unwrap_or_default()
}

fn token_id(token: &str) -> String {
    bootstrap::claimed_token_id(token.as_bytes()).unwrap()
}

/// Writes a new issuer under the same trust anchor and has the server load it.
fn rotate_issuer(server: &TestServer) {
    let dir = server.dir.path();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let anchor_key = rcgen::KeyPair::from_pem(&read("trust-anchor.key")).unwrap();
    let anchor = rcgen::Issuer::from_ca_cert_pem(&read("trust-anchors.pem"), anchor_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "identity.meshca-system.cluster.local");
    let now = server.clock.now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &anchor).unwrap();
    std::fs::write(dir.join("issuer/tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("issuer/tls.crt"), cert.pem()).unwrap();
    assert!(matches!(server.reloader().check(), Outcome::Reloaded(_)));
}

#[tokio::test]
async fn a_cli_token_gets_one_certificate_through_meshca_certify_and_is_refused_after() {
    let server = TestServer::start_with(with_file_store()).await;
    let dir = server.dir.path();
    let web = server.identity("default", "web");
    let (token, stderr) = mint(&server, &web, &[]).await;
    assert!(token.starts_with(PREFIX), "{token}");
    let id = token_id(&token);
    assert!(stderr.contains(&id) && stderr.contains(&web) && stderr.contains("1 certificate"), "{stderr}");
    assert!(!stderr.contains(&token[PREFIX.len()..]), "the token is on stdout only: {stderr}");

    std::fs::write(dir.join("web.token"), format!("{token}\n")).unwrap();
    let certify = |out: PathBuf| {
        let (url, anchors, token_file) = (server.url(), dir.join("trust-anchors.pem"), dir.join("web.token"));
        let web = web.clone();
        async move {
            let args = ["certify", "--addr", url.as_str(), "--trust-anchors", path(&anchors)];
            let more = ["--token-file", path(&token_file), "--identity", web.as_str(), "--out", path(&out)];
            meshca(&[&args[..], &more[..]].concat()).await
        }
    };
    let first = certify(dir.join("host-a")).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let written = std::fs::read_to_string(dir.join("host-a/tls.crt")).unwrap();
    assert!(written.starts_with("-----BEGIN CERTIFICATE-----"));
    let records = server.audit_records();
    let record = records.last().unwrap();
    assert_eq!(
        (&record["outcome"], &record["auth_method"], &record["token_issuer"]),
        (&json!("issued"), &json!("bootstrap"), &json!("meshca-bootstrap")),
        "{record}"
    );
    assert_eq!(record["bootstrap_token_id"], id.as_str(), "{record}");
    assert_eq!(record["subject"], json!({"namespace": "default", "service_account": "web"}));

    // The same token from another host: refused, exit 1, audited with the token id.
    let second = certify(dir.join("host-b")).await;
    let message = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{message}");
    assert!(message.contains("Unauthenticated") && message.contains("already been used"), "{message}");
    assert!(!dir.join("host-b/tls.crt").exists());
    let records = server.audit_records();
    let record = records.last().unwrap();
    assert_eq!((&record["outcome"], &record["code"]), (&json!("denied"), &json!("Unauthenticated")));
    assert!(reason(record).starts_with("bootstrap_token_used"), "{record}");
    assert_eq!((&record["auth_method"], &record["bootstrap_token_id"]), (&json!("bootstrap"), &json!(id)));

    // Host A, its certificate on disk and the spent token still in its file, renews
    // by proof of possession: the token is never presented again.
    let renewed = certify(dir.join("host-a")).await;
    assert!(renewed.status.success(), "{}", String::from_utf8_lossy(&renewed.stderr));
    assert_ne!(std::fs::read_to_string(dir.join("host-a/tls.crt")).unwrap(), written, "a new certificate");
    let records = server.audit_records();
    let record = records.last().unwrap();
    assert_eq!((&record["outcome"], &record["auth_method"]), (&json!("issued"), &json!("certificate")));
    assert!(record.get("bootstrap_token_id").is_none(), "{record}");
    assert_eq!(records.iter().filter(|r| r["outcome"] == "denied").count(), 1, "no refused token on renewal");
}

#[tokio::test]
async fn a_token_for_three_uses_gets_three_certificates_then_is_refused() {
    let server = TestServer::start_with(with_file_store()).await;
    let (token, stderr) =
        mint(&server, &server.identity("default", "web"), &["--uses", "3", "--ttl", "10m"]).await;
    assert!(stderr.contains("3 certificate"), "{stderr}");
    for _ in 0..3 {
        issued(&server, request(&server, "web", &token)).await;
    }
    let (status, record) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(reason(&record).starts_with("bootstrap_token_used"), "{record}");
    let lines = std::fs::read_to_string(server.dir.path().join("bootstrap-used.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3, "{lines}");
}

#[tokio::test]
async fn the_cli_refuses_unusable_terms_and_foreign_identities_as_usage_errors() {
    let server = TestServer::start_with(with_file_store()).await;
    let web = server.identity("default", "web");
    let dir = server.dir.path();
    let (issuer, anchors) = (dir.join("issuer"), dir.join("trust-anchors.pem"));
    let base =
        ["bootstrap-token", "create", "--issuer-dir", path(&issuer), "--trust-anchors", path(&anchors)];
    let foreign = "web.default.serviceaccount.identity.meshca-system.other.org";
    let web = web.as_str();
    for (extra, expected) in [
        (vec!["--identity", web, "--ttl", "0s"], "--ttl"),
        (vec!["--identity", web, "--ttl", "25h"], "--ttl"),
        (vec!["--identity", web, "--uses", "0"], "--uses"),
        (vec!["--identity", web, "--uses", "101"], "--uses"),
        (vec!["--identity", foreign], "--identity"),
        (vec!["--identity", "web"], "--identity"),
    ] {
        let out = meshca(&[&base[..], &extra[..]].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected) && out.stdout.is_empty(), "{extra:?}: {stderr}");
    }
    // Without the issuer's files: a usage error naming them, no token.
    let args = ["bootstrap-token", "create", "--identity", web, "--issuer-dir", "/nonexistent"];
    let out = meshca(&[&args[..], &["--trust-anchors", path(&anchors)]].concat()).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent") && out.stdout.is_empty());
}

#[tokio::test]
async fn another_identity_is_refused_and_spends_nothing_nor_does_a_dry_run() {
    let server = TestServer::start_with(with_file_store()).await;
    let (token, _) = mint(&server, &server.identity("default", "web"), &[]).await;
    // Asking for db's identity with web's token.
    let (status, record) = refused(&server, request(&server, "db", &token)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
    assert!(reason(&record).starts_with("identity_mismatch"), "{record}");
    // Asking for web's identity with a CSR naming db.
    let mut req = request(&server, "web", &token);
    req.certificate_signing_request =
        csr(&server.identity("default", "db"), &rcgen::PKCS_ECDSA_P256_SHA256).1;
    let (status, _) = refused(&server, req).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());
    // A dry run (what `meshca doctor` sends) passes and spends nothing.
    let mut dry = tonic::Request::new(request(&server, "web", &token));
    dry.metadata_mut().insert("x-meshca-dry-run", "1".parse().unwrap());
    let resp = server.client().await.certify(dry).await.unwrap();
    assert_eq!(resp.metadata().get("x-meshca-dry-run").unwrap(), "passed");
    assert!(resp.into_inner().leaf_certificate.is_empty());
    // So the token still gets its one certificate.
    issued(&server, request(&server, "web", &token)).await;
    let (status, _) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    // Spent, a dry run is refused as the real call is (it once said "would issue").
    let mut dry = tonic::Request::new(request(&server, "web", &token));
    dry.metadata_mut().insert("x-meshca-dry-run", "1".parse().unwrap());
    let status = server.client().await.certify(dry).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert_eq!(status.metadata().get("x-meshca-reason").unwrap(), "bootstrap_token_used");
    let record = server.audit_record(&support::request_id(status.metadata()));
    assert!(reason(&record).starts_with("bootstrap_token_used"), "{record}");
    assert!(reason(&record).ends_with("(dry run)"), "{record}");
}

#[tokio::test]
async fn an_expired_token_is_refused_after_the_leeway() {
    let server = TestServer::start_with(with_file_store()).await;
    let web = server.identity("default", "web");
    let (token, claims) =
        signer(&server).create(&web, Duration::from_secs(600), 2, server.clock.now()).unwrap();
    let token = token.expose().to_owned();
    server.clock.set(claims.expires_at + LEEWAY);
    issued(&server, request(&server, "web", &token)).await;
    server.clock.set(claims.expires_at + LEEWAY + Duration::from_secs(1));
    let (status, record) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(reason(&record).starts_with("token_expired"), "{record}");
    assert_eq!(record["auth_method"], "bootstrap");
    assert!(record.get("bootstrap_token_id").is_none(), "only verified ids are recorded: {record}");
}

#[tokio::test]
async fn tampered_tokens_and_none_or_hmac_algorithms_are_refused() {
    let server = TestServer::start_with(with_file_store()).await;
    let signer = signer(&server);
    let web = server.identity("default", "web");
    let (token, _) = signer.create(&web, Duration::from_secs(600), 1, server.clock.now()).unwrap();
    let parts: Vec<String> = token.expose()[PREFIX.len()..].split('.').map(str::to_owned).collect();

    // A flipped signature bit, and a payload naming another identity.
    let mut sig = meshca::jose::decode(&parts[2]).unwrap();
    sig[0] ^= 0x80;
    let flipped = format!("{PREFIX}{}.{}.{}", parts[0], parts[1], meshca::jose::encode(sig));
    let claims = String::from_utf8(meshca::jose::decode(&parts[1]).unwrap()).unwrap();
    let db = server.identity("default", "db");
    let swapped = meshca::jose::encode(claims.replace(&web, &db));
    let rewritten = format!("{PREFIX}{}.{swapped}.{}", parts[0], parts[2]);
    for (token, sa) in [(flipped, "web"), (rewritten, "db")] {
        let (status, record) = refused(&server, request(&server, sa, &token)).await;
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(reason(&record).starts_with("bad_signature"), "{record}");
    }

    // alg none, and HS256 keyed with the issuer's public key (from its certificate).
    let none = json!({"alg": "none", "typ": TYP, "kid": signer.kid()}).to_string();
    let none = format!("{PREFIX}{}.{}.", meshca::jose::encode(none), parts[1]);
    let hs = json!({"alg": "HS256", "typ": TYP, "kid": signer.kid()}).to_string();
    let msg = format!("{}.{}", meshca::jose::encode(hs), parts[1]);
    let crt = std::fs::read(server.dir.path().join("issuer/tls.crt")).unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &crt);
    let hs = format!("{PREFIX}{msg}.{}", meshca::jose::encode(ring::hmac::sign(&key, msg.as_bytes())));
    for token in [none, hs] {
        let (status, record) = refused(&server, request(&server, "web", &token)).await;
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(reason(&record).starts_with("unsupported_algorithm"), "{record}");
        assert!(!status.message().contains(signer.kid()), "{}", status.message());
    }
    // The genuine token was never spent by any of these.
    issued(&server, request(&server, "web", token.expose())).await;
}

#[tokio::test]
async fn rotating_the_issuer_invalidates_unused_tokens_it_signed() {
    let server = TestServer::start_with(with_file_store()).await;
    let web = server.identity("default", "web");
    let (old, _) = mint(&server, &web, &[]).await;
    rotate_issuer(&server);
    let (status, record) = refused(&server, request(&server, "web", &old)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(reason(&record).starts_with("bootstrap_unknown_key"), "{record}");
    assert!(status.message().contains("bootstrap-token create"), "{}", status.message());
    // A token from the new issuer works.
    let (new, _) = mint(&server, &web, &[]).await;
    issued(&server, request(&server, "web", &new)).await;
}

#[tokio::test]
async fn with_bootstrap_tokens_off_a_bootstrap_token_is_refused_as_not_enabled() {
    let server = TestServer::start().await;
    let (token, _) = mint(&server, &server.identity("default", "web"), &[]).await;
    let (status, record) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    // Said as it is, with the setting that enables them: not "malformed", which
    // sends the operator minting new tokens that fail the same way.
    assert!(reason(&record).starts_with("bootstrap_tokens_disabled"), "{record}");
    assert!(status.message().contains("--bootstrap-tokens"), "{}", status.message());
    assert_eq!(status.metadata().get("x-meshca-reason").unwrap(), "bootstrap_tokens_disabled");
    assert_eq!(record["auth_method"], "bootstrap");
    // Kubernetes tokens are unaffected when it is on.
    let on = TestServer::start_with(with_file_store()).await;
    let record = issued(&on, on.request("default", "web").1).await;
    assert_eq!(record["auth_method"], "jwks");
}

#[tokio::test]
async fn the_file_store_remembers_a_spent_token_across_a_restart() {
    let mut server = TestServer::start_with(with_file_store()).await;
    let (token, _) = mint(&server, &server.identity("default", "web"), &["--uses", "2"]).await;
    issued(&server, request(&server, "web", &token)).await;
    server.stop().await.unwrap();
    server.restart().await;
    issued(&server, request(&server, "web", &token)).await;
    server.stop().await.unwrap();
    server.restart().await;
    let (status, record) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(reason(&record).starts_with("bootstrap_token_used"), "{record}");
}

#[tokio::test]
async fn a_spent_token_stays_spent_across_a_restart_with_a_larger_leeway() {
    let mut server = TestServer::start_with(with_file_store()).await;
    let web = server.identity("default", "web");
    // Short-lived, so that the time moved below stays within the backdating of the
    // serving certificate made at the restart (the client checks it by the real clock).
    let (token, claims) =
        signer(&server).create(&web, Duration::from_secs(10), 1, server.clock.now()).unwrap();
    let token = token.expose().to_owned();
    issued(&server, request(&server, "web", &token)).await;
    server.stop().await.unwrap();
    // Past the expiry plus the leeway it was spent under, within the largest leeway.
    let largest = meshca::auth::MAX_TOKEN_LEEWAY;
    server.clock.set(claims.expires_at + LEEWAY + Duration::from_secs(1));
    let replay = ReplayConfig::File("bootstrap-used.jsonl".into());
    server.opts.bootstrap = Some(BootstrapConfig { replay, leeway: largest });
    server.restart().await;
    let (status, record) = refused(&server, request(&server, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(reason(&record).starts_with("bootstrap_token_used"), "{record}");
}

#[tokio::test]
async fn after_bootstrap_the_host_renews_by_proof_of_possession_without_a_token() {
    let server = TestServer::start_with(with_file_store()).await;
    let (token, _) = mint(&server, &server.identity("default", "web"), &[]).await;
    let identity = server.identity("default", "web");
    let (key, csr_der) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
    let req = CertifyRequest {
        identity: identity.clone(),
        token: token.into_bytes(),
        certificate_signing_request: csr_der,
    };
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    let pem: String =
        std::iter::once(&leaf).chain(&intermediates).map(|c| to_pem("CERTIFICATE", c)).collect();
    let holder = (pem, key.serialize_pem());
    for _ in 0..2 {
        let channel =
            meshca::agent::client::connect_as(&server.url(), &server.anchors, SERVER_NAME, Some(&holder))
                .await
                .unwrap();
        let (_, csr_der) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
        let renewal = CertifyRequest {
            identity: identity.clone(),
            token: Vec::new(),
            certificate_signing_request: csr_der,
        };
        let resp = IdentityClient::new(channel).certify(renewal).await.unwrap();
        let record = server.audit_record(&request_id(resp.metadata()));
        assert_eq!((&record["outcome"], &record["auth_method"]), (&json!("issued"), &json!("certificate")));
    }
}

/// Two replicas sharing one API server (their CA, and their Leases).
async fn two_replicas(api: &ApiServer) -> (TestServer, TestServer) {
    let a = TestServer::start_with(with_lease_store(api)).await;
    let from = a.dir.path().to_owned();
    let b = TestServer::start_prepared(with_lease_store(api), move |dir| {
        for file in ["trust-anchors.pem", "trust-anchor.key", "issuer/tls.crt", "issuer/tls.key"] {
            std::fs::copy(from.join(file), dir.join(file)).unwrap();
        }
    })
    .await;
    (a, b)
}

#[tokio::test]
async fn a_token_spent_on_one_replica_is_refused_on_the_other() {
    let api = ApiServer::start().await;
    let (a, b) = two_replicas(&api).await;
    let (token, _) = mint(&a, &a.identity("default", "web"), &[]).await;
    let id = token_id(&token);
    issued(&a, request(&a, "web", &token)).await;
    let (status, record) = refused(&b, request(&b, "web", &token)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(reason(&record).starts_with("bootstrap_token_used"), "{record}");
    let leases = api.leases();
    assert_eq!(leases.len(), 1, "{leases:?}");
    let lease = &leases[0];
    assert_eq!(lease["metadata"]["name"], format!("meshca-bootstrap-{id}-0"));
    assert_eq!(lease["metadata"]["namespace"], "meshca-system");
    let labels = &lease["metadata"]["labels"];
    assert_eq!(
        (&labels["app.kubernetes.io/managed-by"], &labels["meshca.io/bootstrap-token"]),
        (&json!("meshca"), &json!(id))
    );
    let expires: u64 = labels["meshca.io/bootstrap-expires"].as_str().unwrap().parse().unwrap();
    let exp = a.clock.now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let grace = meshca::auth::MAX_TOKEN_LEEWAY.as_secs();
    assert!(
        (exp + grace..exp + grace + 60).contains(&expires),
        "expiry + the largest leeway: {expires} vs {exp}"
    );
}

#[tokio::test]
async fn one_single_use_token_presented_to_both_replicas_at_once_gets_exactly_one_certificate() {
    let api = ApiServer::start().await;
    let (a, b) = two_replicas(&api).await;
    let (token, _) = mint(&a, &a.identity("default", "web"), &[]).await;
    // Both requests verify, then wait at the API server with their Lease creation.
    api.set_leases_mode(Mode::Hold);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (ra, rb) = (request(&a, "web", &token), request(&b, "web", &token));
    let both = tokio::spawn(async move { tokio::join!(ca.certify(ra), cb.certify(rb)) });
    tokio::time::timeout(Duration::from_secs(30), api.lease_creates_reach(2))
        .await
        .expect("both replicas record the use");
    api.release();
    let (ra, rb) = both.await.unwrap();
    let outcomes = [ra.map(|_| ()), rb.map(|_| ())];
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1, "{outcomes:?}");
    let refusal = outcomes.into_iter().find_map(Result::err).unwrap();
    assert_eq!(refusal.code(), Code::Unauthenticated, "{}", refusal.message());
    assert!(refusal.message().contains("already been used"), "{}", refusal.message());
    assert_eq!(api.leases().len(), 1);
}

#[tokio::test]
async fn an_unavailable_lease_store_issues_nothing_and_spends_nothing() {
    let mut api = ApiServer::start().await;
    let a = TestServer::start_with(with_lease_store(&api)).await;
    let (token, _) = mint(&a, &a.identity("default", "web"), &[]).await;
    // A 409 that is not AlreadyExists is no proof the use was spent before.
    let modes = [
        (Mode::Fail500, "answered 500"),
        (Mode::Forbidden, "Role meshca-bootstrap"),
        (Mode::Conflict, "answered 409"),
    ];
    for (mode, words) in modes {
        api.set_leases_mode(mode);
        let (status, record) = refused(&a, request(&a, "web", &token)).await;
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(status.message().contains(words), "{}", status.message());
        assert!(reason(&record).starts_with("backend_unavailable"), "{record}");
        assert!(record.get("serial").is_none());
    }
    assert!(api.leases().is_empty());
    api.set_leases_mode(Mode::Answer);
    issued(&a, request(&a, "web", &token)).await;
    // And with the API server gone, refused as unavailable too (a new token).
    let (other, _) = mint(&a, &a.identity("default", "web"), &[]).await;
    api.stop_listening().await;
    let (status, _) = refused(&a, request(&a, "web", &other)).await;
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
}

/// A Lease store in `meshca-system` on `api`, through its kubeconfig.
async fn lease_store(api: &ApiServer) -> LeaseReplayStore {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&api.kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    LeaseReplayStore::new(kube::Client::try_from(config).unwrap(), "meshca-system")
}

#[tokio::test]
async fn leases_of_expired_tokens_are_cleaned_up_after_a_grace_period() {
    let api = ApiServer::start().await;
    let store = Arc::new(lease_store(&api).await);
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let (old, recent) = ("a".repeat(32), "b".repeat(32));
    // `check` (doctor's dry run) spends nothing and says Used once every use is.
    for _ in 0..2 {
        assert_eq!(store.check(&old, 2).await, Ok(()));
        store.consume(&old, 2, t).await.unwrap();
    }
    assert_eq!(store.check(&old, 2).await, Err(ReplayError::Used));
    assert_eq!(store.consume(&old, 2, t).await, Err(ReplayError::Used));
    store.consume(&recent, 1, t + Duration::from_secs(3000)).await.unwrap();
    assert_eq!(api.leases().len(), 3);
    // An hour and a minute after the first token's expiry: its two Leases go.
    let deleted = store.cleanup(t + Duration::from_secs(3660)).await.unwrap();
    assert_eq!(deleted, 2);
    let names: Vec<Value> = api.leases().iter().map(|l| l["metadata"]["name"].clone()).collect();
    assert_eq!(names, vec![json!(LeaseReplayStore::lease_name(&recent, 0))]);
    api.set_leases_mode(Mode::Fail500);
    assert!(matches!(store.cleanup(t).await, Err(ReplayError::Unavailable { .. })));

    // Another replica deleted them first (404): not counted, not a failure. A
    // deletion that fails otherwise fails the cleanup.
    api.set_leases_mode(Mode::Answer);
    let later = t + Duration::from_secs(3660 + 3000);
    api.set_lease_delete_answer(Some(http::StatusCode::NOT_FOUND));
    assert_eq!(store.cleanup(later).await, Ok(0));
    assert!(api.leases().is_empty());
    store.consume(&"c".repeat(32), 1, t).await.unwrap();
    api.set_lease_delete_answer(Some(http::StatusCode::INTERNAL_SERVER_ERROR));
    assert!(matches!(store.cleanup(later).await, Err(ReplayError::Unavailable { .. })));
}

#[tokio::test]
async fn a_server_with_the_lease_store_cleans_up_expired_leases_when_it_starts() {
    let api = ApiServer::start().await;
    let store = lease_store(&api).await;
    // A use of a token that expired two hours ago, and one of a token still valid.
    let now = meshca::clock::SystemClock.now();
    store.consume(&"d".repeat(32), 1, now - Duration::from_secs(7200)).await.unwrap();
    store.consume(&"e".repeat(32), 1, now + Duration::from_secs(3600)).await.unwrap();
    let _server = TestServer::start_with(with_lease_store(&api)).await;
    let deadline = std::time::Instant::now() + support::process::PATIENCE;
    while api.leases().len() != 1 {
        assert!(std::time::Instant::now() < deadline, "expired Leases not cleaned up: {:?}", api.leases());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = &api.leases()[0]["metadata"]["name"];
    assert_eq!(*left, json!(LeaseReplayStore::lease_name(&"e".repeat(32), 0)));
}
