//! Fixtures shared by the fuzz targets and the corpus generator: one naming scheme,
//! one frozen clock, fixed keys (so the committed seed corpus stays valid: its tokens
//! verify and its signed CSR bodies match the key the `csr` target signs with), DER
//! builders, an independent reading of the names a CSR asks for, and the Certify
//! harness (a real `Certifier` with a generated issuer).
//!
//! What is fuzzed, and which invariant each target checks, is in fuzz/README.md.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use meshca::auth::dev::DevSigner;
use meshca::auth::jwt::{Algorithm, Jwks, JwksAuthenticator, Settings};
use meshca::identity::Naming;
use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ExtensionRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_PKCS9_EMAIL_ADDRESS, OID_X509_COMMON_NAME};
use x509_parser::prelude::FromDer;

/// One DER TLV encoded and read by hand: the integration tests' file, shared.
#[path = "../../tests/support/tlv.rs"]
mod tlv_file;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CONTROL_PLANE_NAMESPACE: &str = "meshca-system";
/// The identity the `csr` target expects (service account `web` in `default`).
pub const ID: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
pub const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/web";
/// A second identity: a CSR accepted for both [`ID`] and this one names nothing.
pub const OTHER_ID: &str = "api.default.serviceaccount.identity.meshca-system.cluster.local";
pub const OTHER_SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/api";
pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "identity.l5d.io";
pub const LEEWAY: Duration = Duration::from_secs(60);
/// The frozen wall clock: 2023-11-14T22:13:20Z.
pub const NOW_SECS: u64 = 1_700_000_000;

/// A fixed P-256 key (test material, committed): signs tokens (ES256) and the CSR
/// bodies of the `csr` target.
pub const P256_PEM: &str = include_str!("../keys/p256.pk8.pem");
/// The RS256 JWKS key of the unit tests (tests/fixtures/jwt-rs256.pk8.pem).
pub const RSA_PEM: &str = include_str!("../../tests/fixtures/jwt-rs256.pk8.pem");
pub const RSA_KID: &str = "rsa-1";

pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

pub fn naming() -> Naming {
    Naming::new(TRUST_DOMAIN, CONTROL_PLANE_NAMESPACE).expect("valid naming")
}

pub fn p256_pkcs8() -> Vec<u8> {
    PrivatePkcs8KeyDer::from_pem_slice(P256_PEM.as_bytes()).expect("P-256 PEM").secret_pkcs8_der().to_vec()
}

pub fn rsa_pkcs8() -> Vec<u8> {
    PrivatePkcs8KeyDer::from_pem_slice(RSA_PEM.as_bytes()).expect("RSA PEM").secret_pkcs8_der().to_vec()
}

/// The token signer (ES256, the fixed P-256 key).
pub fn signer() -> DevSigner {
    DevSigner::from_pkcs8(&p256_pkcs8()).expect("P-256 PKCS#8")
}

/// The fixed P-256 key, for signing CSRs (ASN.1 ECDSA signatures).
pub fn csr_key() -> EcdsaKeyPair {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &p256_pkcs8(), &ring::rand::SystemRandom::new())
        .expect("P-256 PKCS#8")
}

/// A JWKS holding the ES256 signer's key and the RS256 fixture key.
pub fn jwks_json() -> String {
    let es: serde_json::Value = serde_json::from_str(&signer().jwks_json()).expect("JWKS JSON");
    let rsa = RsaKeyPair::from_pkcs8(&rsa_pkcs8()).expect("RSA PKCS#8");
    let public = ring::signature::RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
    let rs = serde_json::json!({"kty": "RSA", "kid": RSA_KID, "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e)});
    serde_json::json!({"keys": [es["keys"][0].clone(), rs]}).to_string()
}

pub fn settings() -> Settings {
    Settings {
        issuer: TOKEN_ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        leeway: LEEWAY,
        algorithms: vec![Algorithm::ES256, Algorithm::RS256],
    }
}

pub fn authenticator() -> JwksAuthenticator {
    JwksAuthenticator::new(settings(), Jwks::from_json(jwks_json().as_bytes()).expect("JWKS"))
}

/// A scratch directory for files a target must write (under `$TMPDIR`).
pub fn scratch_dir() -> PathBuf {
    tempfile::Builder::new().prefix("meshca-fuzz-").tempdir().expect("temp dir").keep()
}

/// DER encoding helpers (definite lengths, single-byte tags).
pub mod der {
    /// One TLV, encoded by hand (tests/support/tlv.rs).
    pub use super::tlv_file::tlv;

    pub fn seq(parts: &[&[u8]]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }
    pub fn set(parts: &[&[u8]]) -> Vec<u8> {
        tlv(0x31, &parts.concat())
    }
    pub fn oid(bytes: &[u8]) -> Vec<u8> {
        tlv(0x06, bytes)
    }
    pub fn bits(bytes: &[u8]) -> Vec<u8> {
        tlv(0x03, &[&[0u8][..], bytes].concat())
    }

    pub const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    pub const OID_O: &[u8] = &[0x55, 0x04, 0x0a];
    pub const OID_EMAIL: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01];
    pub const OID_EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];
    pub const OID_MS_EXTENSION_REQUEST: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x0e];
    pub const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
    pub const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    pub const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

    /// One RDN of a Name: SET { SEQUENCE { type, value } }; `string_tag` e.g. 0x0c (UTF8String).
    pub fn rdn(attr: &[u8], string_tag: u8, value: &[u8]) -> Vec<u8> {
        set(&[&seq(&[&oid(attr), &tlv(string_tag, value)])])
    }
    /// An Extension: SEQUENCE { extnID, [critical], extnValue }.
    pub fn extension(id: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
        let critical = if critical { vec![0x01, 0x01, 0xff] } else { Vec::new() };
        seq(&[&oid(id), &critical, &tlv(0x04, value)])
    }
    /// An Attribute: SEQUENCE { type, SET { value } }.
    pub fn attribute(id: &[u8], value: &[u8]) -> Vec<u8> {
        seq(&[&oid(id), &set(&[value])])
    }
    /// SubjectPublicKeyInfo of an uncompressed P-256 point.
    pub fn p256_spki(point: &[u8]) -> Vec<u8> {
        seq(&[&seq(&[&oid(OID_EC_PUBLIC_KEY), &oid(OID_P256)]), &bits(point)])
    }
    /// certificationRequestInfo: version 0, subject (RDNs), SPKI, `[0]` attributes.
    pub fn request_info(rdns: &[Vec<u8>], spki: &[u8], attributes: &[Vec<u8>]) -> Vec<u8> {
        let name = tlv(0x30, &rdns.concat());
        seq(&[&[0x02, 0x01, 0x00], &name, spki, &tlv(0xa0, &attributes.concat())])
    }
}

/// Wraps `info` (a certificationRequestInfo, or anything) into a CertificationRequest
/// signed with ECDSA P-256/SHA-256 by `key`: what the `csr` target does with every
/// input so that mutated request bodies get past the signature check.
pub fn sign_request_info(key: &EcdsaKeyPair, info: &[u8]) -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    let sig = key.sign(&rng, info).map(|s| s.as_ref().to_vec()).unwrap_or_default();
    der::seq(&[info, &der::seq(&[&der::oid(der::OID_ECDSA_SHA256)]), &der::bits(&sig)])
}

/// The SubjectPublicKeyInfo of the fixed P-256 key.
pub fn csr_key_spki() -> Vec<u8> {
    der::p256_spki(csr_key().public_key().as_ref())
}

/// What a CSR asks for, read independently of `meshca::ca::csr` (x509-parser for the
/// subject and the extensions, a lenient walk to find the attributes that carry them).
#[derive(Debug, Default)]
pub struct RequestedNames {
    /// Every commonName value, whatever its string type.
    pub common_names: Vec<Vec<u8>>,
    pub subject_emails: usize,
    /// `DNS:…`, `URI:…` or a label for any other SAN type.
    pub sans: Vec<String>,
    pub asks_for_ca: bool,
}

impl RequestedNames {
    pub fn names_nothing(&self) -> bool {
        self.common_names.is_empty() && self.subject_emails == 0 && self.sans.is_empty()
    }
    /// True when every name is exactly `dns_name` (CN, DNS SAN) or `spiffe_id` (URI SAN).
    pub fn only(&self, dns_name: &str, spiffe_id: &str) -> bool {
        self.common_names.iter().all(|cn| cn == dns_name.as_bytes())
            && self.subject_emails == 0
            && self.sans.iter().all(|s| *s == format!("DNS:{dns_name}") || *s == format!("URI:{spiffe_id}"))
    }
}

/// Reads one TLV: (tag, contents, rest).
pub use tlv_file::read_tlv;

/// The names `der` asks for, or `None` when x509-parser cannot read it as a CSR.
pub fn requested_names(der: &[u8]) -> Option<RequestedNames> {
    let (_, req) = X509CertificationRequest::from_der(der).ok()?;
    let mut names = RequestedNames::default();
    for atv in req.certification_request_info.subject.iter_attributes() {
        if *atv.attr_type() == OID_X509_COMMON_NAME {
            names.common_names.push(atv.attr_value().data.to_vec());
        } else if *atv.attr_type() == OID_PKCS9_EMAIL_ADDRESS {
            names.subject_emails += 1;
        }
    }
    // The attributes field: certificationRequestInfo ::= SEQUENCE { version, subject,
    // spki, [0] attributes }. Every value of an extension-request attribute, PKCS#9
    // or Microsoft's, is read.
    let (_, info, _) = read_tlv(der).and_then(|(_, outer, _)| read_tlv(outer))?;
    let (_, _, rest) = read_tlv(info)?;
    let (_, _, rest) = read_tlv(rest)?;
    let (_, _, rest) = read_tlv(rest)?;
    let (_, mut attributes, _) = read_tlv(rest)?;
    while let Some((_, attr, next)) = read_tlv(attributes) {
        attributes = next;
        let Some((0x06, oid, values)) = read_tlv(attr) else { continue };
        if oid != der::OID_EXTENSION_REQUEST && oid != der::OID_MS_EXTENSION_REQUEST {
            continue;
        }
        let Some((_, mut values, _)) = read_tlv(values) else { continue };
        while let Some((_, _, next)) = read_tlv(values) {
            let value = &values[..values.len() - next.len()];
            values = next;
            let Ok((_, request)) = ExtensionRequest::from_der(value) else { continue };
            for ext in &request.extensions {
                match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(san) => {
                        for name in &san.general_names {
                            names.sans.push(match name {
                                GeneralName::DNSName(s) => format!("DNS:{s}"),
                                GeneralName::URI(s) => format!("URI:{s}"),
                                other => format!("other:{other:?}"),
                            });
                        }
                    }
                    ParsedExtension::BasicConstraints(bc) => names.asks_for_ca |= bc.ca,
                    _ => {}
                }
            }
        }
    }
    Some(names)
}

/// A real Certify handler around a generated issuer, the fixed-key JWKS verifier,
/// a frozen clock and an audit log in a scratch file, on a current-thread runtime.
pub mod certify {
    use super::*;
    use meshca::admission::{Admission, Settings as AdmissionSettings};
    use meshca::audit::{AuditLog, Sink};
    use meshca::auth::bootstrap::BootstrapTokens;
    use meshca::ca::csr::KeyPolicy;
    use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
    use meshca::ca::issuer::TrustAnchors;
    use meshca::ca::profile::Lifetimes;
    use meshca::ca::store::{Snapshot, Store};
    use meshca::clock::{Clock, FakeClock};
    use meshca::issuance::Issuance as Certifier;
    use meshca::metrics::Metrics;

    pub struct Harness {
        pub runtime: tokio::runtime::Runtime,
        pub certifier: Arc<Certifier>,
        /// The same verifier the certifier uses: tells whom a token authenticates.
        pub authenticator: Arc<JwksAuthenticator>,
        pub naming: Naming,
        pub anchors: TrustAnchors,
        pub lifetimes: Lifetimes,
        pub audit_path: PathBuf,
    }

    impl Harness {
        /// Generates the issuer (P-256, valid around [`now`]) and starts the audit writer.
        pub fn new() -> Harness {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let dir = scratch_dir();
            let naming = naming();
            let h = hierarchy::generate(&naming, CaKeyType::P256, now(), HierarchyLifetimes::default())
                .expect("hierarchy");
            meshca::dev::write_hierarchy(&dir, &h).expect("write hierarchy");
            let snapshot =
                Snapshot::load(&dir.join("trust-anchors.pem"), &dir.join("issuer"), now()).expect("snapshot");
            let anchors = snapshot.anchors.clone();
            // Loaded: the CA files (keys included) need not outlive this.
            for file in ["trust-anchors.pem", "trust-anchor.key"] {
                let _ = std::fs::remove_file(dir.join(file));
            }
            let _ = std::fs::remove_dir_all(dir.join("issuer"));
            let audit_path = dir.join("audit.jsonl");
            let audit = runtime.block_on(AuditLog::open(Sink::File(audit_path.clone()))).expect("audit log");
            let authenticator = Arc::new(authenticator());
            let lifetimes = Lifetimes::default();
            let clock: Arc<dyn Clock> = Arc::new(FakeClock::at(now()));
            let store = Arc::new(Store::new(snapshot));
            let certifier = Arc::new(Certifier {
                naming: naming.clone(),
                store: store.clone(),
                authenticator: authenticator.clone(),
                // Bootstrap tokens off: every token goes to the JWKS verifier, as before.
                bootstrap: Arc::new(BootstrapTokens::disabled(store.clone(), naming.clone())),
                audit,
                clock: clock.clone(),
                lifetimes,
                key_policy: KeyPolicy::default(),
                metrics: Arc::new(Metrics::new(clock.clone())),
                // No rate limits: the fuzzer asks for the same identity far more often
                // than any workload would, and a limited request is not a finding.
                admission: Admission::new(AdmissionSettings {
                    max_in_flight: 64,
                    workers: 1,
                    per_peer: None,
                    per_identity: None,
                })
                .expect("the signing worker thread starts")
                .into(),
                events: None,
                nodes: None,
                // Every refusal recorded: the target checks one record per decision.
                quota: Arc::new(meshca::audit::quota::Quota::with_limits(
                    meshca::audit::quota::Limits::UNLIMITED,
                    clock.now(),
                )),
            });
            Harness { runtime, certifier, authenticator, naming, anchors, lifetimes, audit_path }
        }
    }

    impl Default for Harness {
        fn default() -> Self {
            Self::new()
        }
    }
}
