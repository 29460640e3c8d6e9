//! The Windows-compatible profile, end to end. CAs are made by `meshca init --key-type
//! p256|p384|rsa3072` (the binary itself), leaves are issued through Certify for P-256,
//! P-384 and RSA-2048 keys, and then:
//!
//! - every certificate of every chain is checked against what Windows Server 2016
//!   (Schannel) accepts: ECDSA P-256/P-384 with SHA-256/384 or RSA PKCS#1 v1.5 with
//!   SHA-256 only; non-empty subjects and issuers; EKU serverAuth + clientAuth on the
//!   leaf and no EKU on the CA certificates; no name constraints; positive serials of at
//!   most 20 octets; each validity window inside its issuer's;
//! - every chain is validated by each independent verifier: rustls-webpki, OpenSSL
//!   (`verify -x509_strict`, client and server purposes), GnuTLS (`certtool --verify`
//!   against the anchors, client and server purposes) and NSS (`vfychain`, SSL client
//!   and SSL server usages); and each of them must reject the same leaf checked against
//!   another CA's anchors, so that none of them can pass by failing to look.
//!
//! It also proves the start-up and reload policy: an issuer chain Windows cannot verify
//! (Ed25519, RSA-PSS) stops meshca unless `--allow-non-windows-algorithms` (flag,
//! environment or config file) is given.
//!
//! The verifiers come from Debian packages `openssl`, `gnutls-bin` and `libnss3-tools`,
//! which `tests/run.sh` installs; a missing one fails the test and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use meshca::ca::issuer::Algorithms;
use meshca::ca::material::to_pem;
use meshca::ca::reload::Outcome;
use meshca::clock::Clock;
use meshca::config::ReloadSettings;
use meshca::proto::CertifyRequest;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use support::der::tlv;
use support::process::{bin, meshca, output};
use support::verifiers::{
    another_cas_anchors, assert_every_verifier_accepts_only_under_its_anchors, run, text, ChainFiles,
};
use support::{chain, Options, TestServer};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_NAME_CONSTRAINTS,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

// ---- CAs and leaves ----

/// A test server whose CA was made by `meshca init --key-type KEY_TYPE` in its directory.
async fn server_with_init_ca(key_type: &str) -> TestServer {
    let key_type = key_type.to_owned();
    let mut server = TestServer::start_prepared(Options::default(), move |dir| {
        // Replace the harness's CA with one from `meshca init` itself.
        std::fs::remove_file(dir.join("trust-anchors.pem")).unwrap();
        std::fs::remove_file(dir.join("trust-anchor.key")).unwrap();
        std::fs::remove_dir_all(dir.join("issuer")).unwrap();
        let out = run(Command::new(bin()).arg("init").arg("--dir").arg(dir).args(["--key-type", &key_type]));
        assert!(out.status.success(), "meshca init --key-type {key_type}: {}", text(&out));
    })
    .await;
    if server.handles.is_none() {
        panic!("meshca did not start with the CA from init: {:?}", server.stop().await);
    }
    server
}

/// The key of each leaf the profile covers: P-256, P-384, RSA-2048.
fn leaf_keys() -> [(&'static str, KeyPair); 3] {
    [
        ("p256", KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()),
        ("p384", KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap()),
        ("rsa2048", support::rsa_key(2048)),
    ]
}

/// Leaf and intermediates issued through Certify for `key`, as `web` in `default`.
async fn issue(
    server: &TestServer,
    key: &KeyPair,
) -> (CertificateDer<'static>, Vec<CertificateDer<'static>>) {
    let identity = server.identity("default", "web");
    let req = CertifyRequest {
        identity: identity.clone(),
        token: server.token("default", "web"),
        certificate_signing_request: support::csr_with_key(key, &identity),
    };
    let resp = server.client().await.certify(req).await.unwrap().into_inner();
    chain(&resp)
}

fn parse<'a>(der: &'a [u8]) -> X509Certificate<'a> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

// ---- The profile ----

/// What a key is, for the profile: "p256", "p384" or "rsaBITS".
fn key_kind(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => "p256".into(),
            Some(c) if c == OID_NIST_EC_P384 => "p384".into(),
            other => panic!("EC key on curve {other:?}"),
        };
    }
    assert_eq!(*alg, OID_PKCS1_RSAENCRYPTION, "key algorithm {alg}");
    match spki.parsed().unwrap() {
        PublicKey::RSA(rsa) => format!("rsa{}", rsa.key_size()),
        other => panic!("rsaEncryption key that is not RSA: {other:?}"),
    }
}

/// The signature on `cert`, made with `signer_kind`'s key, is one Schannel verifies.
fn assert_windows_signature(who: &str, cert: &X509Certificate<'_>, signer_kind: &str) {
    let alg = &cert.signature_algorithm;
    let oid: &Oid<'_> = &alg.algorithm;
    if signer_kind.starts_with("rsa") {
        assert_eq!(*oid, OID_PKCS1_SHA256WITHRSA, "{who}: signed with {oid}, not sha256WithRSAEncryption");
        let params = alg.parameters.as_ref().expect("sha256WithRSAEncryption parameters");
        assert_eq!(params.header.tag(), x509_parser::asn1_rs::Tag::Null, "{who}: parameters are not NULL");
    } else {
        assert!(
            *oid == OID_SIG_ECDSA_WITH_SHA256 || *oid == OID_SIG_ECDSA_WITH_SHA384,
            "{who}: signed with {oid}, not ECDSA with SHA-256/384"
        );
        assert!(alg.parameters.is_none(), "{who}: ECDSA signature algorithm with parameters");
    }
}

/// Checks leaf, issuer and anchor against the Windows-compatible profile.
fn assert_windows_profile(leaf: &[u8], intermediates: &[CertificateDer<'_>], anchor: &[u8], ca_kind: &str) {
    assert_eq!(intermediates.len(), 1, "init makes one issuer under the anchor");
    let (leaf, issuer, anchor) = (parse(leaf), parse(&intermediates[0]), parse(anchor));
    let chain = [("leaf", &leaf, &issuer), ("issuer", &issuer, &anchor), ("anchor", &anchor, &anchor)];
    for (who, cert, signer) in chain {
        assert!(cert.subject().iter_attributes().count() > 0, "{who}: empty subject");
        assert!(cert.issuer().iter_attributes().count() > 0, "{who}: empty issuer");
        for cn in cert.subject().iter_common_name() {
            assert!(!cn.as_str().unwrap().is_empty(), "{who}: empty CN");
        }
        assert_eq!(cert.issuer().as_raw(), signer.subject().as_raw(), "{who}: issuer name");
        let serial = cert.raw_serial();
        assert!((1..=20).contains(&serial.len()), "{who}: serial of {} octets", serial.len());
        assert_eq!(serial[0] & 0x80, 0, "{who}: negative serial");
        assert!(serial.iter().any(|b| *b != 0), "{who}: zero serial");
        assert!(serial.len() == 1 || serial[0] != 0 || serial[1] & 0x80 != 0, "{who}: non-minimal serial");
        let oids: Vec<_> = cert.extensions().iter().map(|e| e.oid.clone()).collect();
        assert!(!oids.contains(&OID_X509_EXT_NAME_CONSTRAINTS), "{who}: name constraints");
        assert_windows_signature(who, cert, &key_kind(signer));
        let (validity, outer) = (cert.validity(), signer.validity());
        assert!(validity.not_before >= outer.not_before, "{who}: starts before its issuer");
        assert!(validity.not_after <= outer.not_after, "{who}: ends after its issuer");
    }
    assert_eq!(key_kind(&issuer), ca_kind);
    assert_eq!(key_kind(&anchor), ca_kind);
    assert!(["p256", "p384", "rsa2048"].contains(&key_kind(&leaf).as_str()), "leaf key {}", key_kind(&leaf));
    for (who, ca) in [("issuer", &issuer), ("anchor", &anchor)] {
        assert!(ca.is_ca(), "{who}: not a CA");
        let has_eku = ca.extensions().iter().any(|e| e.oid == OID_X509_EXT_EXTENDED_KEY_USAGE);
        assert!(!has_eku, "{who}: a CA certificate with an extended key usage restricts the leaves under it");
    }
    let eku = leaf.extended_key_usage().unwrap().expect("leaf EKU").value;
    assert!(eku.server_auth && eku.client_auth, "leaf EKU {eku:?}");
    assert!(
        !eku.any && eku.other.is_empty() && !eku.code_signing && !eku.email_protection,
        "leaf EKU {eku:?}"
    );
    assert!(!leaf.is_ca(), "the leaf is a CA");
}

/// Issues a leaf for each key type under a CA made by `meshca init --key-type
/// KEY_TYPE`; checks the profile; every verifier accepts the chain and rejects it
/// against another CA's anchors.
async fn assert_windows_chains(key_type: &str) {
    let server = server_with_init_ca(key_type).await;
    let now = server.clock.now();
    let identity = server.identity("default", "web");
    let anchors: Vec<_> = server.anchors.certificates().to_vec();
    let other_trust = another_cas_anchors(&server.naming, now);
    for (leaf_kind, key) in leaf_keys() {
        let what = format!("{key_type} CA, {leaf_kind} leaf");
        let (leaf, intermediates) = issue(&server, &key).await;
        assert_windows_profile(&leaf, &intermediates, &anchors[0], key_type);
        if key_type == "rsa3072" {
            assert_eq!(parse(&leaf).signature_algorithm.algorithm, OID_PKCS1_SHA256WITHRSA, "{what}");
        }

        assert_every_verifier_accepts_only_under_its_anchors(
            &what,
            &leaf,
            &intermediates,
            &server.anchors,
            &other_trust,
            &identity,
            now,
        );
    }
}

#[tokio::test]
async fn chains_under_a_p256_ca_from_init_meet_the_windows_profile_and_every_verifier_accepts_them() {
    assert_windows_chains("p256").await;
}

#[tokio::test]
async fn chains_under_a_p384_ca_from_init_meet_the_windows_profile_and_every_verifier_accepts_them() {
    assert_windows_chains("p384").await;
}

#[tokio::test]
async fn chains_under_an_rsa3072_ca_from_init_meet_the_windows_profile_and_every_verifier_accepts_them() {
    assert_windows_chains("rsa3072").await;
}

#[tokio::test]
async fn every_verifier_rejects_a_leaf_without_client_auth_for_client_use() {
    // The purpose checks are live: a leaf for server use only, signed by a real issuer,
    // passes the server checks and fails the client ones.
    let server = TestServer::start().await;
    let dir = server.dir.path();
    let issuer_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer/tls.key")).unwrap()).unwrap();
    let issuer_pem = std::fs::read_to_string(dir.join("issuer/tls.crt")).unwrap();
    let issuer_der = CertificateDer::from_pem_slice(issuer_pem.as_bytes()).unwrap();
    let signer = rcgen::Issuer::from_ca_cert_der(&issuer_der, issuer_key).unwrap();
    let identity = server.identity("default", "web");
    let mut params = CertificateParams::new(vec![identity.clone()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, identity.as_str());
    let now = server.clock.now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true; // -x509_strict wants it
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = params.signed_by(&leaf_key, &signer).unwrap();
    let anchors = server.anchors.certificates().to_vec();
    let files = ChainFiles::write(leaf.der(), std::slice::from_ref(&issuer_der), &anchors, &identity);
    let verdicts = files.verdicts(&server.anchors, leaf.der(), std::slice::from_ref(&issuer_der), now);
    // rustls-webpki's check covers client and server use at once: it must reject.
    for v in verdicts {
        let client_use = !v.verifier.contains("sslserver")
            && !v.verifier.contains("serverAuth")
            && !v.verifier.contains("SSL server");
        if client_use {
            assert!(v.rejected, "{} accepted a server-only leaf for client use: {}", v.verifier, v.said);
        } else {
            assert!(v.accepted, "{} rejected a server-only leaf for server use: {}", v.verifier, v.said);
        }
    }
}

// ---- Issuers Windows cannot verify ----

fn ca_params(cn: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Splits one DER TLV off `input`: (tag, contents, whole TLV, rest).
fn split(input: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
    let (len, header) = match input[1] {
        n if n < 0x80 => (n as usize, 2),
        0x81 => (input[2] as usize, 3),
        0x82 => ((input[2] as usize) << 8 | input[3] as usize, 4),
        _ => panic!("length form not used here"),
    };
    (input[0], &input[header..header + len], &input[..header + len], &input[header + len..])
}

/// `cert` with its signature replaced by an RSA-PSS (SHA-256) one from `pkcs8` (RSA).
fn resigned_with_rsa_pss(cert: &[u8], pkcs8: &[u8]) -> Vec<u8> {
    let (_, outer, _, _) = split(cert);
    let (_, tbs, _, _) = split(outer);
    // TBSCertificate: [0] version, serialNumber, signature, then the rest unchanged.
    let (_, _, version, rest) = split(tbs);
    let (_, _, serial, rest) = split(rest);
    let (_, _, _old_alg, rest) = split(rest);
    let pss = tlv(0x30, &[rustls_pki_types::alg_id::RSA_PSS_SHA256.as_ref()]);
    let tbs = tlv(0x30, &[version, serial, &pss, rest]);
    let key = ring::signature::RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let mut signature = vec![0; key.public().modulus_len()];
    let rng = ring::rand::SystemRandom::new();
    key.sign(&ring::signature::RSA_PSS_SHA256, &rng, &tbs, &mut signature).unwrap();
    let bits = [&[0u8][..], &signature].concat();
    tlv(0x30, &[tbs.as_slice(), &pss, &tlv(0x03, &[&bits])])
}

/// An anchor and an issuer Windows cannot verify: both Ed25519, or a P-256 issuer the
/// RSA anchor signed with RSA-PSS. Returns (anchor PEM, issuer certificate PEM, issuer key PEM).
fn non_windows_ca(kind: &str, now: SystemTime) -> (String, String, String) {
    match kind {
        "ed25519" => {
            let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let anchor = ca_params("ed25519 root", now).self_signed(&anchor_key).unwrap();
            let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let signer = rcgen::Issuer::new(ca_params("ed25519 root", now), &anchor_key);
            let issuer = ca_params("ed25519 issuer", now).signed_by(&issuer_key, &signer).unwrap();
            (anchor.pem(), issuer.pem(), issuer_key.serialize_pem())
        }
        "rsa-pss" => {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa2048.pk8.pem");
            let anchor_pkcs8 = PrivatePkcs8KeyDer::from_pem_file(path).unwrap();
            let anchor_key =
                KeyPair::from_pkcs8_der_and_sign_algo(&anchor_pkcs8, &rcgen::PKCS_RSA_SHA256).unwrap();
            let anchor = ca_params("rsa root", now).self_signed(&anchor_key).unwrap();
            let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let signer = rcgen::Issuer::new(ca_params("rsa root", now), &anchor_key);
            let issuer = ca_params("pss-signed issuer", now).signed_by(&issuer_key, &signer).unwrap();
            let issuer = resigned_with_rsa_pss(issuer.der(), anchor_pkcs8.secret_pkcs8_der());
            (anchor.pem(), to_pem("CERTIFICATE", &issuer), issuer_key.serialize_pem())
        }
        other => panic!("no such CA kind {other}"),
    }
}

fn write_ca(dir: &Path, (anchor, crt, key): &(String, String, String)) {
    std::fs::write(dir.join("trust-anchors.pem"), anchor).unwrap();
    std::fs::write(dir.join("issuer/tls.crt"), crt).unwrap();
    std::fs::write(dir.join("issuer/tls.key"), key).unwrap();
    // Owner-only, as meshca requires of an issuer key (a new file gets 0644 here).
    #[cfg(unix)]
    std::fs::set_permissions(dir.join("issuer/tls.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
}

fn allowing(algorithms: Algorithms) -> Options {
    let reload =
        ReloadSettings { issuer_algorithms: algorithms, notifications: false, ..ReloadSettings::default() };
    Options { reload, ..Default::default() }
}

#[tokio::test]
async fn an_ed25519_or_rsa_pss_issuer_stops_the_server_unless_non_windows_algorithms_are_allowed() {
    for kind in ["ed25519", "rsa-pss"] {
        // The harness's clock starts at the system time.
        let prepare = |dir: &Path| write_ca(dir, &non_windows_ca(kind, meshca::clock::SystemClock.now()));
        let mut refused = TestServer::start_prepared(Options::default(), prepare).await;
        assert!(refused.handles.is_none(), "{kind}: the server started");
        let err = refused.stop().await.unwrap_err().to_string();
        assert!(err.contains("Windows Server 2016 cannot verify"), "{kind}: {err}");
        assert!(err.contains("--allow-non-windows-algorithms"), "{kind}: {err}");
        let expected = if kind == "ed25519" { "has an Ed25519 key" } else { "is signed with RSA-PSS" };
        assert!(err.contains(expected), "{kind}: {err}");

        // Allowed: the server starts and its leaves verify.
        let server = TestServer::start_prepared(allowing(Algorithms::Any), prepare).await;
        let (leaf, intermediates) = issue(&server, &support::rsa_key(2048)).await;
        let identity = server.identity("default", "web");
        server.anchors.verify(&leaf, &intermediates, server.clock.now(), Some(&identity)).unwrap();
    }
}

#[tokio::test]
async fn a_reload_to_an_ed25519_issuer_is_refused_unless_non_windows_algorithms_are_allowed() {
    for (algorithms, refused) in [(Algorithms::WindowsCompatible, true), (Algorithms::Any, false)] {
        let server = TestServer::start_with(allowing(algorithms)).await;
        let before = server.reloader().store().current().unwrap().issuer.fingerprint().to_owned();
        write_ca(server.dir.path(), &non_windows_ca("ed25519", server.clock.now()));
        let outcome = server.reloader().check();
        let after = server.reloader().store().current().unwrap().issuer.fingerprint().to_owned();
        if refused {
            let Outcome::Failed(err) = outcome else { panic!("reloaded an Ed25519 issuer: {outcome:?}") };
            assert!(err.to_string().contains("--allow-non-windows-algorithms"), "{err}");
            assert_eq!(after, before, "the previous issuer is kept");
            // And it still issues, under the anchors it started with.
            let (leaf, intermediates) = issue(&server, &support::rsa_key(2048)).await;
            server.anchors.verify(&leaf, &intermediates, server.clock.now(), None).unwrap();
        } else {
            assert!(matches!(outcome, Outcome::Reloaded(_)), "{outcome:?}");
            assert_ne!(after, before);
        }
    }
}

/// `meshca serve` with an Ed25519 issuer, `extra` flags and environment; returns when it exits.
fn serve_ed25519(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let p = |name: &str| dir.join(name).display().to_string();
    let mut cmd = meshca();
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--trust-anchors", &p("trust-anchors.pem"), "--issuer-dir", &p("issuer")])
        // A JWKS file that is not there: start-up fails right after the issuer is checked.
        .args(["--token-validation", "jwks", "--jwks-file", &p("absent-jwks.json"), "--token-issuer", "test"])
        .args(extra)
        .envs(env.iter().copied());
    output(&mut cmd, Duration::from_secs(60))
}

#[test]
fn serve_allows_non_windows_algorithms_from_the_flag_the_environment_or_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("issuer")).unwrap();
    write_ca(dir.path(), &non_windows_ca("ed25519", meshca::clock::SystemClock.now()));
    let config = dir.path().join("meshca.toml");
    std::fs::write(&config, "allow-non-windows-algorithms = true\n").unwrap();

    let out = serve_ed25519(dir.path(), &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("has an Ed25519 key") && stderr.contains("--allow-non-windows-algorithms"),
        "{stderr}"
    );

    let config = config.display().to_string();
    let allowed = [
        ("the flag", serve_ed25519(dir.path(), &["--allow-non-windows-algorithms"], &[])),
        (
            "the environment",
            serve_ed25519(dir.path(), &[], &[("MESHCA_ALLOW_NON_WINDOWS_ALGORITHMS", "true")]),
        ),
        ("the config file", serve_ed25519(dir.path(), &["--config", &config], &[])),
    ];
    for (how, out) in allowed {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Past the issuer check, stopped by the missing JWKS file.
        assert_eq!(out.status.code(), Some(1), "{how}: {stderr}");
        assert!(!stderr.contains("Windows"), "{how}: {stderr}");
        assert!(stderr.contains("token validation"), "{how}: {stderr}");
    }
}
