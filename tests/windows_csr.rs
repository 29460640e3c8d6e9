//! Requests as Windows `certreq.exe` makes them, sent through a real Certify call.
//!
//! The corpus is built here, byte by byte, the way certreq lays a PKCS#10 request out:
//! RSA-2048, ECDSA P-256 and P-384 keys; SHA-256, SHA-384 and SHA-512 signatures;
//! subject CN = the identity (PrintableString, as Windows encodes an ASCII name; also
//! UTF8String) or an empty subject; the Microsoft attributes OS version
//! (1.3.6.1.4.1.311.13.2.3), client information (1.3.6.1.4.1.311.21.20) and enrollment
//! CSP (1.3.6.1.4.1.311.13.2.2); an extensionRequest carrying the certificate template
//! name and information (1.3.6.1.4.1.311.20.2, 1.3.6.1.4.1.311.21.7), application
//! policies (1.3.6.1.4.1.311.21.10), subjectKeyIdentifier, a critical keyUsage and an
//! extendedKeyUsage; and the same extensions again in Microsoft's legacy
//! extension-request attribute (1.3.6.1.4.1.311.2.1.14).
//!
//! Accepted requests must yield a leaf with meshca's profile and nothing requested:
//! its own keyUsage, EKU, SKI and names, no template or policy extension. Requests
//! that ask for more are refused with their reason: another identity or an IP address
//! in a SAN, CA:TRUE, a name hidden in the legacy attribute, an RSA-PSS signature, and
//! ECDSA with SHA-512 (ring, meshca's one crypto provider, verifies ECDSA with
//! SHA-256/384 only; certreq must be told `HashAlgorithm = sha256` or `sha384` for EC
//! keys). Every request is also checked by `openssl req -verify`, so that the corpus
//! is proven well-formed and correctly signed by a parser other than meshca's.
//!
//! Signatures are made with ring where it can (P-256/SHA-256, P-384/SHA-384, RSA); the
//! mixed ECDSA pairs (P-256/SHA-384, P-384/SHA-256, SHA-512) are made by `openssl dgst`.
//!
//! The same corpus goes through `meshca certify --csr FILE`, the command an
//! administrator runs with certreq's output: saved as certreq saves it (`NEW
//! CERTIFICATE REQUEST`, CRLF), with a byte-order mark, with OpenSSL's label, or as
//! DER; accepted requests yield `tls.crt` and `ca.crt` and no key, refused ones exit 1
//! with the server's reason, and misuse exits 2 before anything is sent. A server
//! that lies (a plaintext Identity service replaying real answers to other requests)
//! shows that the command writes nothing unless the chain leads to the anchors, names
//! the identity and carries the CSR's own key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use meshca::ca::material::to_pem;
use meshca::clock::Clock;
use meshca::proto::identity_server::{Identity, IdentityServer};
use meshca::proto::{CertifyRequest, CertifyResponse};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use support::der::{
    attribute, bits, bmp, cn_name, dns, ec_spki, extension, int, oid, rsa_spki, san, seq, sorted, tlv, NULL,
    OID_BASIC_CONSTRAINTS, OID_EXTENSION_REQUEST, OID_MS_EXTENSION_REQUEST, OID_P256, TRUE,
};
use support::{chain, request_id, TestServer};
use tonic::Code;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

// ---- Keys and signatures ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn openssl(self) -> &'static str {
        match self {
            Hash::Sha256 => "-sha256",
            Hash::Sha384 => "-sha384",
            Hash::Sha512 => "-sha512",
        }
    }
}

/// A request key: its PKCS#8 form and SubjectPublicKeyInfo.
struct Key {
    label: &'static str,
    pkcs8: Vec<u8>,
    spki: Vec<u8>,
}

impl Key {
    fn ec(label: &'static str, alg: &'static signature::EcdsaSigningAlgorithm, curve: &str) -> Key {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap().as_ref().to_vec();
        let public = EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng).unwrap().public_key().as_ref().to_vec();
        let spki = ec_spki(curve, &public);
        Key { label, pkcs8, spki }
    }

    fn p256() -> Key {
        Key::ec("p256", &signature::ECDSA_P256_SHA256_ASN1_SIGNING, OID_P256)
    }

    fn p384() -> Key {
        Key::ec("p384", &signature::ECDSA_P384_SHA384_ASN1_SIGNING, "1.3.132.0.34")
    }

    fn rsa2048() -> Key {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa2048.pk8.pem");
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_file(path).unwrap().secret_pkcs8_der().to_vec();
        let public = RsaKeyPair::from_pkcs8(&pkcs8).unwrap().public().as_ref().to_vec();
        let spki = rsa_spki(&public);
        Key { label: "rsa2048", pkcs8, spki }
    }

    fn is_rsa(&self) -> bool {
        self.label.starts_with("rsa")
    }

    /// (signatureAlgorithm, signature) over `data`.
    fn sign(&self, hash: Hash, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let rng = SystemRandom::new();
        if self.is_rsa() {
            let (id, alg): (_, &'static dyn signature::RsaEncoding) = match hash {
                Hash::Sha256 => ("1.2.840.113549.1.1.11", &signature::RSA_PKCS1_SHA256),
                Hash::Sha384 => ("1.2.840.113549.1.1.12", &signature::RSA_PKCS1_SHA384),
                Hash::Sha512 => ("1.2.840.113549.1.1.13", &signature::RSA_PKCS1_SHA512),
            };
            let key = RsaKeyPair::from_pkcs8(&self.pkcs8).unwrap();
            let mut sig = vec![0; key.public().modulus_len()];
            key.sign(alg, &rng, data, &mut sig).unwrap();
            return (seq(&[&oid(id), NULL]), sig);
        }
        let id = match hash {
            Hash::Sha256 => "1.2.840.10045.4.3.2",
            Hash::Sha384 => "1.2.840.10045.4.3.3",
            Hash::Sha512 => "1.2.840.10045.4.3.4",
        };
        let native = match (self.label, hash) {
            ("p256", Hash::Sha256) => Some(&signature::ECDSA_P256_SHA256_ASN1_SIGNING),
            ("p384", Hash::Sha384) => Some(&signature::ECDSA_P384_SHA384_ASN1_SIGNING),
            _ => None,
        };
        let sig = match native {
            Some(alg) => {
                let key = EcdsaKeyPair::from_pkcs8(alg, &self.pkcs8, &rng).unwrap();
                key.sign(&rng, data).unwrap().as_ref().to_vec()
            }
            None => openssl_sign(&self.pkcs8, hash, data),
        };
        (seq(&[&oid(id)]), sig)
    }

    /// An RSA-PSS (SHA-256) signature, as certreq makes with `AlternateSignatureAlgorithm = true`.
    fn sign_pss(&self, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let key = RsaKeyPair::from_pkcs8(&self.pkcs8).unwrap();
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(&signature::RSA_PSS_SHA256, &SystemRandom::new(), data, &mut sig).unwrap();
        (seq(&[rustls_pki_types::alg_id::RSA_PSS_SHA256.as_ref()]), sig)
    }
}

/// Runs openssl, failing the test with a pointer to `tests/run.sh` when it is missing.
fn openssl(args: &[&str], dir: &std::path::Path) -> Output {
    match Command::new("openssl").args(args).current_dir(dir).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("openssl is not installed; run `bash tests/run.sh`, which installs it")
        }
        Err(e) => panic!("cannot run openssl: {e}"),
    }
}

/// An ECDSA signature by `openssl dgst`, for the hash/curve pairs ring does not sign.
fn openssl_sign(pkcs8: &[u8], hash: Hash, data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.pem"), to_pem("PRIVATE KEY", pkcs8)).unwrap();
    std::fs::write(dir.path().join("data"), data).unwrap();
    let out = openssl(&["dgst", hash.openssl(), "-sign", "key.pem", "-out", "sig", "data"], dir.path());
    assert!(out.status.success(), "openssl dgst: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(dir.path().join("sig")).unwrap()
}

/// `openssl req -verify`: the request parses and its self-signature verifies.
fn assert_openssl_verifies(csr: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("req.der"), csr).unwrap();
    let out = openssl(&["req", "-inform", "DER", "-in", "req.der", "-verify", "-noout"], dir.path());
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("verify OK"), "{what}: openssl req -verify: {said}");
}

// ---- The requests ----

const SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";
const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
const EMAIL_PROTECTION: &str = "1.3.6.1.5.5.7.3.4";
const TEMPLATE_NAME: &str = "1.3.6.1.4.1.311.20.2";
const TEMPLATE_INFO: &str = "1.3.6.1.4.1.311.21.7";
const APPLICATION_POLICIES: &str = "1.3.6.1.4.1.311.21.10";
/// SKI certreq would not compute: the leaf must carry meshca's own.
const REQUESTED_SKI: [u8; 20] = [0x5a; 20];

#[derive(Clone, Copy, Debug)]
enum Subject<'a> {
    Printable(&'a str),
    Utf8(&'a str),
    Empty,
}

/// How a request departs from what certreq makes for the identity.
#[derive(Clone, Debug)]
struct Request<'a> {
    subject: Subject<'a>,
    hash: Hash,
    /// DNS names in a subjectAltName of the extensionRequest.
    san_dns: Vec<&'a str>,
    /// An IPv4 address in that subjectAltName.
    san_ip: Option<[u8; 4]>,
    ca: bool,
    /// Also send the extensions in Microsoft's legacy attribute, with a SAN of this DNS name.
    legacy_attribute: Option<&'a str>,
    pss: bool,
}

impl Request<'_> {
    fn plain(identity: &str) -> Request<'_> {
        Request {
            subject: Subject::Printable(identity),
            hash: Hash::Sha256,
            san_dns: vec![],
            san_ip: None,
            ca: false,
            legacy_attribute: None,
            pss: false,
        }
    }
}

fn name(subject: Subject<'_>) -> Vec<u8> {
    let cn = |tag: u8, s: &str| cn_name(&tlv(tag, &[s.as_bytes()]));
    match subject {
        Subject::Printable(s) => cn(0x13, s),
        Subject::Utf8(s) => cn(0x0c, s),
        Subject::Empty => seq(&[]),
    }
}

/// The extensions certreq asks for, with the request's SAN and basicConstraints.
fn extensions(req: &Request<'_>, san_dns: &[&str]) -> Vec<u8> {
    let mut exts = vec![
        extension(TEMPLATE_NAME, false, &bmp("WebServer")),
        extension(TEMPLATE_INFO, false, &seq(&[&oid("1.3.6.1.4.1.311.21.8.1.2.3.4"), &int(100), &int(4)])),
        extension("2.5.29.37", false, &seq(&[&oid(SERVER_AUTH), &oid(CLIENT_AUTH), &oid(EMAIL_PROTECTION)])),
        extension(
            APPLICATION_POLICIES,
            false,
            &seq(&[&seq(&[&oid(SERVER_AUTH)]), &seq(&[&oid(CLIENT_AUTH)])]),
        ),
        // digitalSignature, nonRepudiation, keyEncipherment, dataEncipherment: more
        // than meshca grants, so the leaf shows whose key usage it carries.
        extension("2.5.29.15", true, &tlv(0x03, &[&[0x04, 0xf0]])),
        extension("2.5.29.14", false, &tlv(0x04, &[&REQUESTED_SKI])),
    ];
    let mut names: Vec<Vec<u8>> = san_dns.iter().map(|n| dns(n.as_bytes())).collect();
    if let Some(ip) = req.san_ip {
        names.push(tlv(0x87, &[&ip]));
    }
    if !names.is_empty() {
        exts.push(san(&names));
    }
    if req.ca {
        exts.push(extension(OID_BASIC_CONSTRAINTS, true, &seq(&[TRUE])));
    }
    let exts: Vec<&[u8]> = exts.iter().map(Vec::as_slice).collect();
    seq(&exts)
}

/// A request laid out as certreq lays it out, signed by `key`.
fn certreq(key: &Key, req: &Request<'_>) -> Vec<u8> {
    let (key_spec, csp) = if key.is_rsa() {
        (1, "Microsoft RSA SChannel Cryptographic Provider")
    } else {
        (0, "Microsoft Software Key Storage Provider")
    };
    let client_info = seq(&[
        &int(5),
        &tlv(0x0c, &[b"WIN-2016-NODE1.corp.example.com"]),
        &tlv(0x0c, &[b"CORP\\svc-web"]),
        &tlv(0x0c, &[b"certreq.exe"]),
    ]);
    let mut attributes = vec![
        attribute("1.3.6.1.4.1.311.13.2.3", &tlv(0x16, &[b"10.0.14393.2"])),
        attribute("1.3.6.1.4.1.311.21.20", &client_info),
        attribute("1.3.6.1.4.1.311.13.2.2", &seq(&[&int(key_spec), &bmp(csp), &bits(&[])])),
        attribute(OID_EXTENSION_REQUEST, &extensions(req, &req.san_dns)),
    ];
    if let Some(dns) = req.legacy_attribute {
        attributes.push(attribute(
            OID_MS_EXTENSION_REQUEST,
            &extensions(&Request { ca: false, ..req.clone() }, &[dns]),
        ));
    }
    let attributes: Vec<&[u8]> = attributes.iter().map(Vec::as_slice).collect();
    // attributes [0] IMPLICIT SET OF Attribute
    let info = seq(&[&int(0), &name(req.subject), &key.spki, &tlv(0xa0, &[&sorted(&attributes)])]);
    let (alg, sig) = if req.pss { key.sign_pss(&info) } else { key.sign(req.hash, &info) };
    seq(&[&info, &alg, &bits(&sig)])
}

/// The three key types certreq makes.
struct Keys {
    p256: Key,
    p384: Key,
    rsa: Key,
}

impl Keys {
    fn new() -> Keys {
        Keys { p256: Key::p256(), p384: Key::p384(), rsa: Key::rsa2048() }
    }
}

/// The requests meshca accepts for `id`: every key with every hash certreq can be
/// told to use, with and without the identity in a SAN and the legacy attribute,
/// with a UTF8String CN and with an empty subject.
fn accepted<'a>(id: &'a str, keys: &'a Keys) -> Vec<(String, &'a Key, Request<'a>)> {
    let hashes = |key: &Key| {
        if key.is_rsa() {
            vec![Hash::Sha256, Hash::Sha384, Hash::Sha512]
        } else {
            vec![Hash::Sha256, Hash::Sha384]
        }
    };
    let mut cases: Vec<(String, &Key, Request<'_>)> = Vec::new();
    for key in [&keys.p256, &keys.p384, &keys.rsa] {
        for hash in hashes(key) {
            let what = format!("{} {hash:?}", key.label);
            cases.push((what.clone(), key, Request { hash, ..Request::plain(id) }));
            let sans = Request { hash, san_dns: vec![id], legacy_attribute: Some(id), ..Request::plain(id) };
            cases.push((format!("{what}, SAN and legacy attribute"), key, sans));
        }
        cases.push((
            format!("{} UTF8String CN", key.label),
            key,
            Request { subject: Subject::Utf8(id), ..Request::plain(id) },
        ));
        cases.push((
            format!("{} empty subject", key.label),
            key,
            Request { subject: Subject::Empty, ..Request::plain(id) },
        ));
    }
    cases
}

/// The requests that ask for more than `id`, with the gRPC code and the audit
/// reason of their refusal (`other` is another identity of the same deployment).
fn refused<'a>(
    id: &'a str,
    other: &'a str,
    keys: &'a Keys,
) -> Vec<(&'static str, &'a Key, Request<'a>, Code, &'static str)> {
    let (p256, p384, rsa) = (&keys.p256, &keys.p384, &keys.rsa);
    let plain = || Request::plain(id);
    vec![
        (
            "SAN naming another identity",
            rsa,
            Request { san_dns: vec![id, other], ..plain() },
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "CN naming another identity",
            p256,
            Request { subject: Subject::Printable(other), ..plain() },
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "IP address SAN",
            p256,
            Request { san_ip: Some([10, 0, 0, 7]), ..plain() },
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        ("CA:TRUE", rsa, Request { ca: true, ..plain() }, Code::PermissionDenied, "csr_ca_requested"),
        (
            "another identity hidden in the legacy extension-request attribute",
            p384,
            Request { legacy_attribute: Some(other), ..plain() },
            Code::PermissionDenied,
            "csr_name_not_allowed",
        ),
        (
            "RSA-PSS signature",
            rsa,
            Request { pss: true, ..plain() },
            Code::InvalidArgument,
            "csr_unsupported_signature_algorithm",
        ),
        (
            "ECDSA P-256 with SHA-512",
            p256,
            Request { hash: Hash::Sha512, ..plain() },
            Code::InvalidArgument,
            "csr_unsupported_signature_algorithm",
        ),
        (
            "ECDSA P-384 with SHA-512",
            p384,
            Request { hash: Hash::Sha512, ..plain() },
            Code::InvalidArgument,
            "csr_unsupported_signature_algorithm",
        ),
    ]
}

// ---- The tests ----

fn certify_request(server: &TestServer, csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: server.identity("default", "web"),
        token: server.token("default", "web"),
        certificate_signing_request: csr,
    }
}

/// The leaf carries meshca's profile for `key` and nothing the request asked for.
fn assert_only_meshcas_profile(leaf: &[u8], key: &Key, identity: &str, what: &str) {
    let (_, cert) = X509Certificate::from_der(leaf).unwrap();
    let mut oids: Vec<String> = cert.extensions().iter().map(|e| e.oid.to_id_string()).collect();
    oids.sort();
    // basicConstraints, keyUsage, extendedKeyUsage, SAN, SKI, AKI: nothing else.
    let expected = ["2.5.29.14", "2.5.29.15", "2.5.29.17", "2.5.29.19", "2.5.29.35", "2.5.29.37"];
    assert_eq!(oids, expected, "{what}: leaf extensions");
    assert_eq!(cert.public_key().raw, key.spki.as_slice(), "{what}: the leaf certifies the request's key");
    let cn: Vec<_> = cert.subject().iter_common_name().map(|a| a.as_str().unwrap().to_owned()).collect();
    assert_eq!(cn, [identity], "{what}: subject");
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => {
                assert_ne!(ski.0, REQUESTED_SKI, "{what}: requested SKI")
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(
                    ku.digital_signature() && !ku.non_repudiation() && !ku.data_encipherment(),
                    "{what}: {ku}"
                );
                assert_eq!(ku.key_encipherment(), key.is_rsa(), "{what}: {ku}");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth && !eku.email_protection, "{what}: {eku:?}");
                assert!(eku.other.is_empty() && !eku.any, "{what}: {eku:?}");
            }
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "{what}: CA:TRUE"),
            ParsedExtension::SubjectAlternativeName(san) => match san.general_names.as_slice() {
                [GeneralName::DNSName(dns), GeneralName::URI(uri)] => {
                    assert_eq!(*dns, identity, "{what}: DNS SAN");
                    assert!(
                        uri.starts_with("spiffe://cluster.local/ns/default/sa/web"),
                        "{what}: URI SAN {uri}"
                    );
                }
                names => panic!("{what}: SAN {names:?}"),
            },
            _ => {}
        }
    }
}

#[tokio::test]
async fn certreq_style_requests_are_accepted_and_the_leaf_carries_only_meshcas_profile() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let identity = server.identity("default", "web");
    let id = identity.as_str();
    let keys = Keys::new();
    let cases = accepted(id, &keys);
    assert_eq!(cases.len(), 20);
    for (what, key, req) in cases {
        let csr = certreq(key, &req);
        assert_openssl_verifies(&csr, &what);
        let resp = client.certify(certify_request(&server, csr)).await;
        let resp =
            resp.unwrap_or_else(|s| panic!("{what}: refused: {:?} {}", s.code(), s.message())).into_inner();
        let (leaf, intermediates) = chain(&resp);
        server.anchors.verify(&leaf, &intermediates, server.clock.now(), Some(id)).unwrap();
        assert_only_meshcas_profile(&leaf, key, id, &what);
    }
}

#[tokio::test]
async fn certreq_style_requests_asking_for_more_are_refused_with_their_reason() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let identity = server.identity("default", "web");
    let id = identity.as_str();
    let other = server.identity("default", "db");
    let keys = Keys::new();
    let cases = refused(id, &other, &keys);
    for (what, key, req, code, reason) in cases {
        let csr = certreq(key, &req);
        // Well-formed and correctly signed: refused for what it asks, not for how it is made.
        assert_openssl_verifies(&csr, what);
        let status = match client.certify(certify_request(&server, csr)).await {
            Ok(_) => panic!("{what}: a certificate was issued"),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        let record = server.audit_record(&request_id(status.metadata()));
        assert_eq!(record["outcome"], "denied", "{what}");
        let got = record["reason"].as_str().unwrap();
        assert!(got.starts_with(reason), "{what}: reason {got:?}, expected {reason}");
    }
    let issued = server.audit_records().iter().filter(|r| r["outcome"] == "issued").count();
    assert_eq!(issued, 1, "only the serving certificate was issued");
}

// ---- `meshca certify --csr`: the same corpus through the command line ----

/// How certreq (or another tool) may have saved a request.
#[derive(Clone, Copy, Debug)]
enum Saved {
    /// Binary, as `certreq -new -binary` writes it.
    Der,
    /// certreq's default: `NEW CERTIFICATE REQUEST`, CRLF line ends.
    CertreqPem,
    /// The same, saved by an editor that adds a UTF-8 byte-order mark.
    CertreqPemWithBom,
    /// OpenSSL's label, LF line ends.
    OpensslPem,
}

fn saved(csr: &[u8], how: Saved) -> Vec<u8> {
    let pem = |label: &str, crlf: bool| {
        let text = to_pem(label, csr);
        if crlf {
            text.replace('\n', "\r\n")
        } else {
            text
        }
    };
    match how {
        Saved::Der => csr.to_vec(),
        Saved::CertreqPem => pem("NEW CERTIFICATE REQUEST", true).into_bytes(),
        Saved::CertreqPemWithBom => {
            [b"\xEF\xBB\xBF".as_slice(), pem("NEW CERTIFICATE REQUEST", true).as_bytes()].concat()
        }
        Saved::OpensslPem => pem("CERTIFICATE REQUEST", false).into_bytes(),
    }
}

/// Runs `meshca certify --csr CSR` against `server` for `web` with extra `args`;
/// returns its output. Runs off the async workers, which serve the call.
async fn certify_csr(
    server: &TestServer,
    csr: &std::path::Path,
    out: &std::path::Path,
    args: &[&str],
) -> Output {
    let token = out.with_extension("token");
    std::fs::write(&token, server.token("default", "web")).unwrap();
    let mut cmd = support::process::meshca();
    cmd.arg("certify")
        .arg("--csr")
        .arg(csr)
        .args(["--addr", &server.url(), "--identity", &server.identity("default", "web")])
        .arg("--trust-anchors")
        .arg(server.dir.path().join("trust-anchors.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(out)
        .args(args);
    tokio::task::spawn_blocking(move || support::process::output(&mut cmd, support::process::PATIENCE))
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn certify_csr_sends_certreq_files_unchanged_and_writes_the_chain_without_a_key() {
    let server = TestServer::start().await;
    let identity = server.identity("default", "web");
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let saves = [Saved::CertreqPem, Saved::Der, Saved::CertreqPemWithBom, Saved::OpensslPem];
    // The whole accepted corpus, each request saved one of the four ways in turn.
    for (i, (what, key, req)) in accepted(&identity, &keys).into_iter().enumerate() {
        let how = saves[i % saves.len()];
        let what = format!("{what}, {how:?}");
        let csr = certreq(key, &req);
        let path = tmp.path().join(format!("{i}.req"));
        std::fs::write(&path, saved(&csr, how)).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let run = certify_csr(&server, &path, &out, &[]).await;
        assert_eq!(run.status.code(), Some(0), "{what}: {}", text(&run.stderr));
        assert!(text(&run.stderr).contains("tls.crt"), "{what}: {}", text(&run.stderr));

        let chain: Vec<_> =
            CertificateDer::pem_file_iter(out.join("tls.crt")).unwrap().map(Result::unwrap).collect();
        assert_eq!(chain.len(), 2, "{what}: leaf, then the issuer");
        server.anchors.verify(&chain[0], &chain[1..], server.clock.now(), Some(&identity)).unwrap();
        assert_only_meshcas_profile(&chain[0], key, &identity, &what);
        let bundle: Vec<_> =
            CertificateDer::pem_file_iter(out.join("ca.crt")).unwrap().map(Result::unwrap).collect();
        assert_eq!(bundle, server.anchors.certificates(), "{what}: ca.crt holds the trust anchors");
        assert!(!out.join("tls.key").exists(), "{what}: no key is written: it stays where the CSR was made");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certify_csr_refused_by_the_server_exits_1_with_its_reason_and_writes_nothing() {
    let server = TestServer::start().await;
    let identity = server.identity("default", "web");
    let other = server.identity("default", "db");
    let tmp = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let cases = refused(&identity, &other, &keys);
    let before = server.audit_records().len();
    for (i, (what, key, req, code, reason_code)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("{i}.req"));
        std::fs::write(&path, saved(&certreq(key, req), Saved::CertreqPem)).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let run = certify_csr(&server, &path, &out, &[]).await;
        let stderr = text(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("meshca refused the request ({code:?}, {reason_code})")),
            "{what}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        // The server's own reason, as its audit record of this refusal gives it.
        let record = server.audit_records().pop().unwrap();
        let reason = record["reason"].as_str().unwrap();
        let (_, words) = reason.split_once(": ").unwrap();
        assert!(stderr.contains(words), "{what}: the server's reason {reason:?} in: {stderr}");
        assert!(!out.join("tls.crt").exists(), "{what}: no certificate written");
    }
    let denied = server.audit_records()[before..].iter().filter(|r| r["outcome"] == "denied").count();
    assert_eq!(denied, cases.len(), "each refusal is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn certify_csr_usage_errors_exit_2_before_anything_is_sent() {
    let server = TestServer::start().await;
    let identity = server.identity("default", "web");
    let tmp = tempfile::tempdir().unwrap();
    let key = Key::p256();
    let good = tmp.path().join("good.req");
    std::fs::write(&good, saved(&certreq(&key, &Request::plain(&identity)), Saved::CertreqPem)).unwrap();
    let before = server.audit_records().len();

    let both = certify_csr(&server, &good, &tmp.path().join("a"), &["--key-type", "p384"]).await;
    assert_eq!(both.status.code(), Some(2), "--csr with --key-type: {}", text(&both.stderr));
    assert!(text(&both.stderr).contains("--key-type"), "{}", text(&both.stderr));

    let garbage = tmp.path().join("garbage.req");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let run = certify_csr(&server, &garbage, &tmp.path().join("b"), &[]).await;
    assert_eq!(run.status.code(), Some(2), "not a CSR: {}", text(&run.stderr));
    assert!(text(&run.stderr).contains("CERTIFICATE REQUEST"), "{}", text(&run.stderr));

    let missing = certify_csr(&server, &tmp.path().join("absent.req"), &tmp.path().join("c"), &[]).await;
    assert_eq!(missing.status.code(), Some(2), "missing file: {}", text(&missing.stderr));

    // A tls.key in --out that is not the CSR's key would sit beside a certificate it does not match.
    let out = tmp.path().join("d");
    std::fs::create_dir(&out).unwrap();
    let stranger = rcgen::KeyPair::generate().unwrap();
    std::fs::write(out.join("tls.key"), stranger.serialize_pem()).unwrap();
    let run = certify_csr(&server, &good, &out, &[]).await;
    assert_eq!(run.status.code(), Some(2), "another key in --out: {}", text(&run.stderr));
    assert!(!out.join("tls.crt").exists());
    assert_eq!(server.audit_records().len(), before, "none of these reached the server");

    // The CSR's own key beside it is fine (a key made with openssl, say).
    let own = rustls_pki_types::PrivatePkcs8KeyDer::from(key.pkcs8.clone());
    std::fs::write(out.join("tls.key"), to_pem("PRIVATE KEY", own.secret_pkcs8_der())).unwrap();
    let run = certify_csr(&server, &good, &out, &[]).await;
    assert_eq!(run.status.code(), Some(0), "the CSR's own key in --out: {}", text(&run.stderr));
    assert!(out.join("tls.crt").exists());
}

/// A plaintext Identity service that answers every call with whatever response
/// it holds: a server that lies, for the checks `certify --csr` makes of an answer.
/// It keeps the CSR of the last call it received.
#[derive(Clone, Default)]
struct Replay(Arc<Mutex<CertifyResponse>>, Arc<Mutex<Vec<u8>>>);

#[tonic::async_trait]
impl Identity for Replay {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        *self.1.lock().unwrap() = request.into_inner().certificate_signing_request;
        Ok(tonic::Response::new(self.0.lock().unwrap().clone()))
    }
}

impl Replay {
    /// Serves on a loopback port; returns its `http://` address.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = IdentityServer::new(self.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        format!("http://{addr}")
    }
}

/// What `ca` answers to a request for `sa` in `default` with `csr`.
async fn answer_of(ca: &TestServer, sa: &str, csr: Vec<u8>) -> CertifyResponse {
    let request = CertifyRequest {
        identity: ca.identity("default", sa),
        token: ca.token("default", sa),
        certificate_signing_request: csr,
    };
    ca.client().await.certify(request).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn certify_csr_refuses_an_answer_for_another_key_identity_or_ca_and_writes_nothing() {
    let server = TestServer::start().await;
    let stranger_ca = TestServer::start().await;
    let identity = server.identity("default", "web");
    let db = server.identity("default", "db");
    let tmp = tempfile::tempdir().unwrap();
    let (key, other_key) = (Key::p256(), Key::p256());
    let csr = certreq(&key, &Request::plain(&identity));
    let path = tmp.path().join("web.req");
    std::fs::write(&path, saved(&csr, Saved::CertreqPemWithBom)).unwrap();

    // Real answers from real CAs, each right for some request but this one.
    let honest = answer_of(&server, "web", csr.clone()).await;
    let cases = [
        (
            "a leaf for another key",
            answer_of(&server, "web", certreq(&other_key, &Request::plain(&identity))).await,
            "does not carry the requested key",
        ),
        (
            "a leaf for another identity",
            answer_of(&server, "db", certreq(&key, &Request::plain(&db))).await,
            "CertNotValidForName",
        ),
        // Both test CAs name their issuers alike: the path leads to this CA's issuer,
        // whose key did not sign the leaf.
        (
            "a leaf from another CA",
            answer_of(&stranger_ca, "web", csr.clone()).await,
            "InvalidSignatureForPublicKey",
        ),
        ("no leaf", CertifyResponse::default(), "no leaf certificate"),
    ];

    let replay = Replay::default();
    let addr = replay.start().await;
    let run = |out: std::path::PathBuf| {
        let token = tmp.path().join("any.token");
        std::fs::write(&token, server.token("default", "web")).unwrap();
        let mut cmd = support::process::meshca();
        cmd.arg("certify").arg("--csr").arg(&path).args(["--addr", &addr, "--identity", &identity]);
        cmd.arg("--trust-anchors").arg(server.dir.path().join("trust-anchors.pem"));
        cmd.arg("--token-file").arg(&token).arg("--out").arg(&out);
        tokio::task::spawn_blocking(move || support::process::output(&mut cmd, support::process::PATIENCE))
    };
    for (i, (what, response, reason)) in cases.into_iter().enumerate() {
        *replay.0.lock().unwrap() = response;
        let out = tmp.path().join(format!("out{i}"));
        let result = run(out.clone()).await.unwrap();
        let stderr = text(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains("the returned certificate is unusable") && stderr.contains(reason),
            "{what}: {stderr}"
        );
        assert!(!out.join("tls.crt").exists() && !out.join("ca.crt").exists(), "{what}: nothing written");
    }
    // The same server, answering honestly: the refusals above were the answers'.
    *replay.0.lock().unwrap() = honest;
    let out = tmp.path().join("honest");
    let result = run(out.clone()).await.unwrap();
    assert_eq!(result.status.code(), Some(0), "the honest answer: {}", text(&result.stderr));
    assert!(out.join("tls.crt").exists());
    assert!(*replay.1.lock().unwrap() == csr, "the CSR went out as certreq made it, byte for byte");
}
