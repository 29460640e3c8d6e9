//! Issuer keys in a real PKCS#11 token: SoftHSM2 (Debian's `softhsm2`) loaded
//! through meshca's `ca::token`, keys made inside the token, signatures made there
//! and checked with ring, certificates signed through rcgen and checked with
//! x509-parser, and the failures an operator meets (wrong PIN, module, token, key)
//! named with the PKCS#11 function and return code, never the PIN.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(target_os = "linux")]

use meshca_test_support as support;

use std::sync::OnceLock;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use meshca::ca::token::{Kind, TokenKey, Uri};
use ring::signature::{
    UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, RSA_PKCS1_2048_8192_SHA256,
};
use support::softhsm::{SoftHsm, MODULE, PIN};

/// Every token these tests use, made before the module is first loaded (it reads
/// its configuration and token list then).
const TOKENS: [&str; 5] = ["p256", "p384", "rsa", "failures", "pool"];

fn store() -> &'static SoftHsm {
    static STORE: OnceLock<SoftHsm> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = SoftHsm::default();
        for token in TOKENS {
            store.init_token(token);
        }
        store.use_in_this_process();
        store
    })
}

fn uri(token: &str, object: &str) -> Uri {
    store().uri(token, object).parse().unwrap()
}

/// How ring verifies what a key of `kind` signs.
fn verification(kind: Kind) -> &'static dyn ring::signature::VerificationAlgorithm {
    match kind {
        Kind::EcP256 => &ECDSA_P256_SHA256_ASN1,
        Kind::EcP384 => &ECDSA_P384_SHA384_ASN1,
        Kind::Rsa => &RSA_PKCS1_2048_8192_SHA256,
    }
}

fn check(kind: Kind, key: &TokenKey, msg: &[u8], signature: &[u8]) {
    UnparsedPublicKey::new(verification(kind), rcgen::PublicKeyData::der_bytes(key))
        .verify(msg, signature)
        .expect("ring verifies");
}

#[test]
fn keys_made_in_the_token_sign_inside_it_and_ring_verifies_each_kind() {
    for (token, kind) in [("p256", Kind::EcP256), ("p384", Kind::EcP384), ("rsa", Kind::Rsa)] {
        let key = TokenKey::generate(&uri(token, "issuer"), kind).unwrap();
        assert_eq!(key.kind(), kind);
        let msg = format!("a TBSCertificate for {token}");
        let signature = key.sign_message(msg.as_bytes()).unwrap();
        check(kind, &key, msg.as_bytes(), &signature);
        let other = key.sign_message(b"something else").unwrap();
        let public = UnparsedPublicKey::new(verification(kind), rcgen::PublicKeyData::der_bytes(&key));
        assert!(
            public.verify(msg.as_bytes(), &other).is_err(),
            "a signature of another message must not verify"
        );

        // Reopened by its URI, the same key.
        let again = TokenKey::open(&uri(token, "issuer")).unwrap();
        assert_eq!(rcgen::PublicKeyData::der_bytes(&again), rcgen::PublicKeyData::der_bytes(&key));
        // A second key under the same name is refused.
        let err = TokenKey::generate(&uri(token, "issuer"), kind).unwrap_err().to_string();
        assert!(err.contains("already holds"), "{err}");
    }
}

#[test]
fn the_private_key_is_sensitive_not_extractable_and_signs_only() {
    let key = TokenKey::generate(&uri("pool", "attributes"), Kind::EcP256).unwrap();
    drop(key);
    let ctx = Pkcs11::new(MODULE).unwrap();
    // The module is initialised already (by meshca in this process).
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    ));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == "pool")
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .login(cryptoki::session::UserType::User, Some(&cryptoki::types::AuthPin::from(PIN.to_owned())))
        .ok();
    let template = [Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(b"attributes".to_vec())];
    let key = session.find_objects(&template).unwrap()[0];
    let wanted = [
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Sign,
        AttributeType::Decrypt,
        AttributeType::Derive,
        AttributeType::Unwrap,
    ];
    let attrs = session.get_attributes(key, &wanted).unwrap();
    let flags: Vec<(String, bool)> = attrs
        .iter()
        .filter_map(|a| match a {
            Attribute::Sensitive(v) => Some(("sensitive".into(), *v)),
            Attribute::Extractable(v) => Some(("extractable".into(), *v)),
            Attribute::Sign(v) => Some(("sign".into(), *v)),
            Attribute::Decrypt(v) => Some(("decrypt".into(), *v)),
            Attribute::Derive(v) => Some(("derive".into(), *v)),
            Attribute::Unwrap(v) => Some(("unwrap".into(), *v)),
            _ => None,
        })
        .collect();
    let expected: Vec<(String, bool)> = [
        ("sensitive", true),
        ("extractable", false),
        ("sign", true),
        ("decrypt", false),
        ("derive", false),
        ("unwrap", false),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(flags, expected);
    // The token refuses to reveal the private value.
    assert!(session.get_attributes(key, &[AttributeType::Value]).map(|a| a.is_empty()).unwrap_or(true));
}

#[test]
fn a_certificate_signed_through_rcgen_with_the_token_key_verifies_against_its_public_key() {
    let key = TokenKey::generate(&uri("pool", "rcgen"), Kind::EcP256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["issuer.example".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    parsed.verify_signature(None).expect("self-signed with the token's key");
    assert_eq!(parsed.public_key().subject_public_key.data.as_ref(), rcgen::PublicKeyData::der_bytes(&key));
}

#[test]
fn concurrent_signers_each_get_a_session_of_their_own_and_the_pool_stays_at_their_number() {
    let key = std::sync::Arc::new(TokenKey::generate(&uri("pool", "concurrent"), Kind::EcP256).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let key = key.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let msg = format!("thread {t} message {i}");
                    let signature = key.sign_message(msg.as_bytes()).unwrap();
                    check(Kind::EcP256, &key, msg.as_bytes(), &signature);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let pooled = key.pooled_sessions();
    assert!((1..=8).contains(&pooled), "{pooled} sessions pooled for 8 signers");
}

#[test]
fn failures_name_the_flag_the_function_and_the_return_code_never_the_pin() {
    let store = store();
    TokenKey::generate(&uri("failures", "issuer"), Kind::EcP256).unwrap();
    let wrong_pin = store.dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "not-the-pin-9876\n").unwrap();
    let with_pin_file = |pin: &std::path::Path| -> Uri {
        format!("pkcs11:token=failures;object=issuer?module-path={MODULE}&pin-source=file:{}", pin.display())
            .parse()
            .unwrap()
    };
    let cases: Vec<(Uri, &str)> = vec![
        (with_pin_file(&wrong_pin), "PinIncorrect"),
        (
            format!(
                "pkcs11:token=failures;object=issuer?module-path=/nonexistent/libpkcs11.so&pin-value={PIN}"
            )
            .parse()
            .unwrap(),
            "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
        ),
        (uri("no-such-token", "issuer"), "no token labelled \"no-such-token\""),
        (uri("failures", "no-such-key"), "no private key"),
        (with_pin_file(&store.dir.path().join("missing-pin")), "cannot read the PIN file"),
    ];
    for (uri, says) in cases {
        let err = TokenKey::open(&uri).unwrap_err();
        let text = format!("{err} {err:?} {uri:?}");
        assert!(err.to_string().contains(says), "{uri:?}: {err}");
        assert!(!text.contains(PIN) && !text.contains("not-the-pin-9876"), "the PIN leaked: {text}");
    }
    let err = TokenKey::open(&with_pin_file(&wrong_pin)).unwrap_err().to_string();
    assert!(err.contains("Login"), "names the function: {err}");
}

/// The deployment every test here names identities in.
fn naming() -> meshca::identity::Naming {
    meshca::identity::Naming::new("cluster.local", "meshca-system").unwrap()
}

/// The `addr=` of a start-up log line.
fn logged_addr(line: &str) -> std::net::SocketAddr {
    let field = line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap();
    field.trim_start_matches("Some(").trim_end_matches(')').parse().unwrap()
}

/// `meshca init --issuer-key` (the key made in a token of its own) and then `meshca
/// serve --issuer-key`, both the real binary, with a JWKS token signer.
struct TokenServe {
    /// A token store of its own, for the child processes only: SoftHSM2 does not
    /// share a store between processes that use it at once.
    store: SoftHsm,
    tmp: tempfile::TempDir,
    /// The URI of the issuer key `init` made.
    uri: String,
    signer: meshca::auth::dev::DevSigner,
    anchors: meshca::ca::issuer::TrustAnchors,
}

impl TokenServe {
    /// Runs `meshca init --dir CA --issuer-key URI --key-type KEY_TYPE`.
    fn init(label: &str, key_type: &str) -> TokenServe {
        use support::process::{output, PATIENCE};
        let store = SoftHsm::default();
        store.init_token(label);
        let tmp = tempfile::tempdir().unwrap();
        let uri = store.uri(label, "issuer");
        let mut init = Self::command(&store);
        init.args(["init", "--dir", tmp.path().join("ca").to_str().unwrap(), "--issuer-key", &uri]);
        let out = output(init.args(["--key-type", key_type]), PATIENCE);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "init --issuer-key --key-type {key_type}: {said}");
        assert!(!said.contains(PIN));
        let ca = tmp.path().join("ca");
        assert!(ca.join("issuer/tls.crt").is_file() && !ca.join("issuer/tls.key").exists(), "no key file");
        let (signer, _) = meshca::auth::dev::DevSigner::generate().unwrap();
        std::fs::write(tmp.path().join("jwks.json"), signer.jwks_json()).unwrap();
        let anchors = meshca::ca::issuer::TrustAnchors::load(&ca.join("trust-anchors.pem")).unwrap();
        TokenServe { store, tmp, uri, signer, anchors }
    }

    /// The real binary, with this store as its SoftHSM2 configuration.
    fn command(store: &SoftHsm) -> std::process::Command {
        let mut cmd = support::process::meshca();
        cmd.env("SOFTHSM2_CONF", &store.conf);
        cmd
    }

    fn ca(&self) -> std::path::PathBuf {
        self.tmp.path().join("ca")
    }

    fn audit(&self) -> std::path::PathBuf {
        self.tmp.path().join("audit.jsonl")
    }

    /// `meshca serve` over the CA `init` wrote, with the issuer key at `uri`.
    fn serve(&self, uri: &str) -> std::process::Command {
        let mut cmd = Self::command(&self.store);
        let ca = self.ca();
        support::process::serve_with_jwks(
            &mut cmd,
            &ca.join("trust-anchors.pem"),
            &ca.join("issuer"),
            &self.tmp.path().join("jwks.json"),
        )
        .args(["--issuer-key", uri, "--audit-log", self.audit().to_str().unwrap()]);
        cmd
    }

    /// Starts the server with the key `init` made; returns it, a client and the admin address.
    async fn start(
        &self,
    ) -> (
        support::process::Process,
        meshca::proto::identity_client::IdentityClient<tonic::transport::Channel>,
        std::net::SocketAddr,
    ) {
        let mut process = support::process::Process::spawn(&mut self.serve(&self.uri));
        let deadline = std::time::Instant::now() + support::process::PATIENCE;
        let serving = process.stderr.wait_for("serving gRPC over TLS", deadline);
        assert!(process.stderr.seen.iter().any(|l| l.contains("the issuer key is in a PKCS#11 token")));
        let grpc = format!("https://{}", logged_addr(&serving));
        let admin_line = process.stderr.seen.iter().find(|l| l.contains("/metrics")).unwrap().clone();
        let channel =
            meshca::agent::client::connect(&grpc, &self.anchors, support::SERVER_NAME).await.unwrap();
        (process, meshca::proto::identity_client::IdentityClient::new(channel), logged_addr(&admin_line))
    }

    /// The identity the requests ask for.
    fn identity(&self) -> String {
        naming().identity("default", "web").unwrap().dns_name
    }

    /// A Certify request for `web` in `default`, with a fresh P-256 key.
    fn request(&self) -> meshca::proto::CertifyRequest {
        use meshca::clock::Clock as _;
        let identity = self.identity();
        let (_key, csr) =
            meshca::agent::client::make_csr(&identity, meshca::agent::client::KeyType::P256).unwrap();
        let claims = meshca::auth::dev::TokenClaims::projected(
            "https://issuer.example",
            meshca::config::DEFAULT_AUDIENCE,
            "default",
            "web",
            meshca::clock::SystemClock.now(),
            std::time::Duration::from_secs(600),
        );
        let token = self.signer.sign(&claims).unwrap().into_bytes();
        meshca::proto::CertifyRequest { identity, token, certificate_signing_request: csr }
    }
}

/// `init --issuer-key --key-type KEY_TYPE` makes the key in the token; `serve
/// --issuer-key` signs leaves with it (the leaf's signature algorithm is the key's);
/// the four independent verifiers accept each chain and reject it under another CA.
async fn leaves_signed_in_the_token_pass_every_verifier(key_type: &str, algorithm: &str) {
    use meshca::clock::Clock as _;
    let serve = TokenServe::init(key_type, key_type);
    let (mut process, mut client, _) = serve.start().await;
    let now = meshca::clock::SystemClock.now();
    let naming = naming();
    let other = support::verifiers::another_cas_anchors(&naming, now);
    let response = client.certify(serve.request()).await.unwrap().into_inner();
    let (leaf, chain) = support::chain(&response);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(parsed.signature_algorithm.algorithm.to_id_string(), algorithm, "{key_type}");
    support::verifiers::assert_every_verifier_accepts_only_under_its_anchors(
        &format!("{key_type} issuer key in the token"),
        &leaf,
        &chain,
        &serve.anchors,
        &other,
        &serve.identity(),
        now,
    );
    assert!(process.signal("TERM"));
    process.stderr.read_to_end(std::time::Instant::now() + support::process::PATIENCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p256_issuer_key_in_the_token_signs_leaves_every_verifier_accepts() {
    leaves_signed_in_the_token_pass_every_verifier("p256", "1.2.840.10045.4.3.2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p384_issuer_key_in_the_token_signs_leaves_every_verifier_accepts() {
    leaves_signed_in_the_token_pass_every_verifier("p384", "1.2.840.10045.4.3.3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa3072_issuer_key_in_the_token_signs_leaves_every_verifier_accepts() {
    leaves_signed_in_the_token_pass_every_verifier("rsa3072", "1.2.840.113549.1.1.11").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_signs_leaves_with_the_key_init_made_in_the_token_and_a_wrong_pin_stops_it_naming_the_flag() {
    use meshca::clock::Clock as _;
    use support::process::{meshca, output, PATIENCE};

    let serve = TokenServe::init("serve", "p256");
    let (store, tmp, ca, uri, anchors) = (&serve.store, &serve.tmp, serve.ca(), &serve.uri, &serve.anchors);
    let audit = serve.audit();

    // A wrong PIN: start-up stops, naming the flag and the return code, not the PIN.
    let wrong =
        uri.replace(&format!("pin-source=file:{}", store.pin_file().display()), "pin-value=wrong-pin-5555");
    let out = output(&mut serve.serve(&wrong), PATIENCE);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--issuer-key pkcs11:token=serve;object=issuer") && said.contains("PinIncorrect"),
        "{said}"
    );
    assert!(!said.contains("wrong-pin-5555"), "the PIN leaked: {said}");

    // Every other start-up failure: exit 2, the flag and what is wrong named, no PIN.
    let pin_file = format!("pin-source=file:{}", store.pin_file().display());
    let cases = [
        (
            uri.replace(support::softhsm::MODULE, "/nonexistent/libpkcs11.so"),
            "cannot load the PKCS#11 module",
        ),
        (uri.replace("token=serve", "token=no-such-token"), "no token labelled \"no-such-token\""),
        (uri.replace("object=issuer", "object=no-such-key"), "no private key"),
        (uri.replace(&pin_file, "pin-source=file:/nonexistent/pin"), "cannot read the PIN file"),
    ];
    for (bad, says) in cases {
        let out = output(&mut serve.serve(&bad), PATIENCE);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {said}");
        assert!(said.contains("--issuer-key pkcs11:") && said.contains(says), "{bad}: {said}");
        assert!(!said.contains(PIN), "the PIN leaked: {said}");
    }

    // A tls.crt for another key (an issuer made with a key file): refused at start,
    // never served with the token's key.
    let other = tmp.path().join("other-ca");
    assert!(output(meshca().args(["init", "--dir", other.to_str().unwrap()]), PATIENCE).status.success());
    let mut mismatched = TokenServe::command(store);
    support::process::serve_with_jwks(
        &mut mismatched,
        &other.join("trust-anchors.pem"),
        &other.join("issuer"),
        &tmp.path().join("jwks.json"),
    )
    .args(["--issuer-key", uri, "--audit-log", tmp.path().join("other.jsonl").to_str().unwrap()]);
    let out = output(&mut mismatched, PATIENCE);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("does not match the issuer certificate"), "{said}");

    let (mut process, mut client, admin) = serve.start().await;
    let now = meshca::clock::SystemClock.now();
    let request = || serve.request();
    for _ in 0..3 {
        let response = client.certify(request()).await.unwrap().into_inner();
        // The leaf verifies under the anchor through the issuer whose key is in the token.
        let chain: Vec<_> = response
            .intermediate_certificates
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        let leaf = rustls_pki_types::CertificateDer::from(response.leaf_certificate);
        anchors.verify(&leaf, &chain, now, None).expect("the leaf chains to the anchor");
        // Signed by the issuer init wrote, whose key exists only in the token.
        let written = std::fs::read(ca.join("issuer/tls.crt")).unwrap();
        let written = rustls_pki_types::pem::PemObject::from_pem_slice(&written)
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(chain[0], written);
    }

    // Hot reload: a new tls.crt for the same key in the token (signed by the same
    // anchor) is picked up, and the next leaf chains through it.
    let anchor_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("trust-anchor.key")).unwrap()).unwrap();
    let anchor = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca.join("trust-anchors.pem")).unwrap(),
        anchor_key,
    )
    .unwrap();
    let old = std::fs::read(ca.join("issuer/tls.crt")).unwrap();
    let old: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&old).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&old).unwrap();
    let public = rcgen::SubjectPublicKeyInfo::from_der(parsed.public_key().raw).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "identity.meshca-system.cluster.local (renewed)");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(30 * 86400)).into();
    let renewed = params.signed_by(&public, &anchor).unwrap();
    let staged = ca.join("issuer/.tls.crt.new");
    std::fs::write(&staged, renewed.pem()).unwrap();
    std::fs::rename(&staged, ca.join("issuer/tls.crt")).unwrap();
    process.stderr.wait_for("issuer and trust anchors reloaded", std::time::Instant::now() + PATIENCE);
    let response = client.certify(request()).await.unwrap().into_inner();
    assert_eq!(response.intermediate_certificates[0], renewed.der().to_vec(), "the renewed issuer signs");

    // The token goes away (its directory is moved): Certify answers Unavailable, the
    // decision is audited, and nothing is issued with another key.
    std::fs::rename(store.dir.path().join("tokens"), store.dir.path().join("tokens-gone")).unwrap();
    let status = client.certify(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let body = support::wait_ready(admin, 503).await;
    assert!(body.contains("PKCS#11 token does not sign"), "{body}");

    // Back: /ready recovers on its own (the token is reopened and probed), and so
    // does issuance, with the same key.
    std::fs::rename(store.dir.path().join("tokens-gone"), store.dir.path().join("tokens")).unwrap();
    support::wait_ready(admin, 200).await;
    let response = client.certify(request()).await.unwrap().into_inner();
    let leaf = rustls_pki_types::CertificateDer::from(response.leaf_certificate);
    let chain: Vec<_> =
        response.intermediate_certificates.into_iter().map(rustls_pki_types::CertificateDer::from).collect();
    anchors.verify(&leaf, &chain, now, None).expect("after recovery, the same issuer");
    assert!(process.signal("TERM"));
    process.stderr.read_to_end(std::time::Instant::now() + PATIENCE);
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let leaves = records
        .iter()
        .filter(|r| r["outcome"] == "issued" && r["request_id"] != "serving-certificate")
        .count();
    assert_eq!(leaves, 5, "three leaves, one after the reload, one after recovery");
    let last = records.iter().rev().find(|r| r["outcome"] == "denied").unwrap();
    assert_eq!(
        (last["outcome"].as_str(), last["code"].as_str()),
        (Some("denied"), Some("Unavailable")),
        "{last}"
    );
    assert!(last["reason"].as_str().unwrap().starts_with("issuer_key_unavailable"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_with_an_issuer_key_makes_the_dev_issuer_in_the_token_and_reuses_it() {
    let store = SoftHsm::default();
    store.init_token("dev");
    let conf = format!("SOFTHSM2_CONF={}", store.conf.display());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let uri = store.uri("dev", "issuer");
    let by_env = format!("MESHCA_ISSUER_KEY={uri}");
    let config = tmp.path().join("meshca.toml");
    std::fs::write(&config, format!("issuer-key = {uri:?}\n")).unwrap();
    let config = config.to_str().unwrap();
    // The flag first (the key is made), then the environment and the config file (the
    // key is reused: making another under the same name would be refused, "already
    // holds", and the server would not start; without the URI it would make tls.key).
    let runs: [(&str, Vec<&str>, Vec<&str>); 3] = [
        ("flag", vec!["env", &conf], vec!["--issuer-key", &uri]),
        ("environment", vec!["env", &conf, &by_env], vec![]),
        ("config file", vec!["env", &conf], vec!["--config", config]),
    ];
    for (how, prefix, extra) in runs {
        let mut serve = support::process::ServeBin::start(&prefix, "exec \"$@\"", &data, &extra).await;
        assert!(data.join("issuer/tls.crt").is_file() && !data.join("issuer/tls.key").exists(), "{how}");
        let mut client = serve.client().await;
        client.certify(serve.request("web")).await.expect("a leaf signed in the token");
        serve.stop().await;
    }
}

#[test]
fn bootstrap_tokens_signed_in_the_token_verify_with_the_issuers_public_key() {
    use meshca::clock::Clock as _;
    for (object, kind, key_type) in [
        ("bootstrap-p256", Kind::EcP256, meshca::ca::hierarchy::CaKeyType::P256),
        ("bootstrap-p384", Kind::EcP384, meshca::ca::hierarchy::CaKeyType::P384),
    ] {
        let token = std::sync::Arc::new(TokenKey::generate(&uri("pool", object), kind).unwrap());
        let naming = naming();
        let now = meshca::clock::SystemClock.now();
        let h = meshca::ca::hierarchy::generate_for_key(
            &naming,
            key_type,
            now,
            meshca::ca::hierarchy::HierarchyLifetimes::default(),
            token.as_ref(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();

        meshca::dev::write_hierarchy(dir.path(), &h).unwrap();
        let anchors = meshca::ca::issuer::TrustAnchors::load(&dir.path().join("trust-anchors.pem")).unwrap();
        let issuer =
            meshca::ca::issuer::Issuer::load_with_token(&dir.path().join("issuer"), &anchors, now, &token)
                .unwrap();
        let signer =
            meshca::auth::bootstrap::BootstrapSigner::with_token(token.clone(), &issuer, naming.clone())
                .unwrap();
        let identity = naming.identity("default", "host-1").unwrap().dns_name;
        let (minted, _) = signer.create(&identity, std::time::Duration::from_secs(600), 1, now).unwrap();
        let verified = meshca::auth::bootstrap::verify(
            minted.expose().as_bytes(),
            &issuer,
            &naming,
            std::time::Duration::from_secs(60),
            now,
        )
        .unwrap_or_else(|e| panic!("{object}: {e}"));
        assert_eq!(verified.claims.identity, identity);
        // A signature of other claims does not verify.
        let forged = minted.expose().replacen('.', ".e30", 1);
        assert!(meshca::auth::bootstrap::verify(
            forged.as_bytes(),
            &issuer,
            &naming,
            std::time::Duration::from_secs(60),
            now
        )
        .is_err());
    }
}
