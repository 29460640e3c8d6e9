//! The issuer: certificate, key and chain that sign leaves, and the trust anchors
//! they lead to.
//!
//! [`Issuer::load`] refuses material meshca must not serve with: a certificate that
//! is not a CA, a key that does not match it, an issuer outside its validity window,
//! or a chain that does not reach the trust anchors. The last check is done the way
//! a client would do it: a probe leaf is signed and verified with rustls-webpki
//! against the anchors, so the key, the chain and the constraints are all proven
//! together. Directory layouts accepted: `tls.crt`/`tls.key` (Kubernetes and
//! cert-manager secrets) or `crt.pem`/`key.pem` (Linkerd).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::csr::{CheckedCsr, KeyType};
use super::material::{read_certificates, read_pkcs8_key};
use super::profile::{self, ChainWindow};
use super::Error;
use crate::identity::Identity;

/// The roots every issued chain must lead to.
#[derive(Clone)]
pub struct TrustAnchors {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors").field("count", &self.certs.len()).finish()
    }
}

impl TrustAnchors {
    /// Reads a PEM bundle of one or more root certificates.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_certs(read_certificates(path)?, path)
    }

    /// Builds anchors from DER certificates (`origin` names them in errors).
    pub fn from_certs(certs: Vec<CertificateDer<'static>>, origin: &Path) -> Result<Self, Error> {
        let anchors = certs
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::BadCertificate {
                path: origin.into(),
                reason: format!("not a usable trust anchor: {e:?}"),
            })?;
        Ok(TrustAnchors { certs, anchors })
    }

    /// The anchors' certificates, DER.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Verifies `leaf` + `intermediates` up to these anchors at `at`, for client
    /// and server use, and (when given) for `name`.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: SystemTime,
        name: Option<&str>,
    ) -> Result<(), String> {
        self.verify_path(leaf, intermediates, at).map_err(|e| e.to_string())?;
        if let Some(name) = name {
            let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf: {e}"))?;
            let name = ServerName::try_from(name).map_err(|e| e.to_string())?;
            ee.verify_is_valid_for_subject_name(&name).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The path check alone, with webpki's typed error (expired, not yet valid, …).
    pub fn verify_path(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: SystemTime,
    ) -> Result<(), webpki::Error> {
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO));
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &self.anchors, intermediates, time, usage, None, None)?;
        }
        Ok(())
    }
}

/// The subject public key of a CSR, in the form rcgen writes into a certificate.
/// The algorithm comes from the key type found in the key itself, never from the
/// CSR's signature algorithm.
struct LeafKey {
    alg: &'static SignatureAlgorithm,
    raw: Vec<u8>,
}

impl PublicKeyData for LeafKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

impl LeafKey {
    fn from_csr(csr: &CheckedCsr) -> Result<Self, Error> {
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| Error::Sign { reason: format!("subject key: {e}") })?;
        let alg = match csr.key_type {
            KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
        };
        Ok(LeafKey { alg, raw: spki.subject_public_key.data.to_vec() })
    }
}

/// A signed leaf.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub serial: [u8; 16],
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Certificate, key and chain that sign leaves.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    /// Issuer certificate, then any further intermediates: what Certify returns.
    chain: Vec<CertificateDer<'static>>,
    window: ChainWindow,
    fingerprint: String,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("fingerprint_sha256", &self.fingerprint)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Where an issuer directory keeps its certificate and key.
pub fn issuer_files(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    if !crt.exists() && dir.join("crt.pem").exists() {
        return (dir.join("crt.pem"), dir.join("key.pem"));
    }
    (crt, key)
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>, path: &Path) -> Result<X509Certificate<'a>, Error> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| Error::BadCertificate {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::BadCertificate { path: path.into(), reason: "trailing data".into() });
    }
    Ok(cert)
}

/// An X.509 time as a `SystemTime`.
pub fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl Issuer {
    /// Loads and checks the issuer in `dir` against `anchors` at `now`.
    pub fn load(dir: &Path, anchors: &TrustAnchors, now: SystemTime) -> Result<Self, Error> {
        let (crt_path, key_path) = issuer_files(dir);
        let certs = read_certificates(&crt_path)?;
        let key = read_pkcs8_key(&key_path)?;
        Self::from_parts(certs, &key, anchors, now, &crt_path, &key_path)
    }

    /// Checks and assembles an issuer from its chain (issuer first) and PKCS#8 key.
    pub fn from_parts(
        certs: Vec<CertificateDer<'static>>,
        pkcs8_key: &[u8],
        anchors: &TrustAnchors,
        now: SystemTime,
        crt_path: &Path,
        key_path: &Path,
    ) -> Result<Self, Error> {
        let key = KeyPair::try_from(pkcs8_key).map_err(|_| Error::BadKey {
            path: key_path.into(),
            reason: "not a P-256, P-384 or RSA PKCS#8 private key".into(),
        })?;
        if key.algorithm() == &rcgen::PKCS_ED25519 {
            return Err(Error::UnsupportedIssuerKey {
                what: "Ed25519 (Windows Server 2016 and many TLS stacks cannot verify it)",
            });
        }
        let issuer_der = certs.first().ok_or(Error::NoCertificate { path: crt_path.into() })?;
        let issuer_cert = parse_cert(issuer_der, crt_path)?;
        match issuer_cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(Error::NotCa { reason: "basicConstraints CA:TRUE is missing" }),
            Err(_) => return Err(Error::NotCa { reason: "basicConstraints is malformed" }),
        }
        if let Ok(Some(ku)) = issuer_cert.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(Error::NotCa { reason: "keyUsage lacks keyCertSign" });
            }
        }
        if issuer_cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(Error::KeyMismatch);
        }

        // The window every chain certificate (and the anchor above them) is valid in.
        let mut window = ChainWindow {
            not_before: to_system_time(issuer_cert.validity().not_before),
            not_after: to_system_time(issuer_cert.validity().not_after),
        };
        let mut top_issuer = issuer_cert.issuer().as_raw().to_vec();
        for der in &certs[1..] {
            let c = parse_cert(der, crt_path)?;
            window.not_before = window.not_before.max(to_system_time(c.validity().not_before));
            window.not_after = window.not_after.min(to_system_time(c.validity().not_after));
            top_issuer = c.issuer().as_raw().to_vec();
        }
        for der in anchors.certificates() {
            let Ok((_, a)) = X509Certificate::from_der(der) else { continue };
            if a.subject().as_raw() == top_issuer.as_slice() {
                window.not_before = window.not_before.max(to_system_time(a.validity().not_before));
                window.not_after = window.not_after.min(to_system_time(a.validity().not_after));
            }
        }
        if now >= window.not_after {
            return Err(Error::IssuerExpired { not_after: window.not_after, now });
        }
        if now < window.not_before {
            return Err(Error::IssuerNotYetValid { not_before: window.not_before, now });
        }

        let signer = rcgen::Issuer::from_ca_cert_der(issuer_der, key).map_err(|e| {
            Error::BadCertificate { path: crt_path.into(), reason: e.to_string() }
        })?;
        let fingerprint = crate::audit::sha256_hex(issuer_der);
        drop(issuer_cert);
        // Never hand out a trust anchor as an intermediate.
        let chain: Vec<_> = certs
            .into_iter()
            .filter(|c| !anchors.certificates().contains(c))
            .collect();
        let issuer = Issuer {
            signer,
            fingerprint,
            chain,
            window,
            rng: ring::rand::SystemRandom::new(),
        };
        issuer.probe(anchors, now)?;
        Ok(issuer)
    }

    /// Signs a throwaway leaf and verifies it as a client would.
    fn probe(&self, anchors: &TrustAnchors, now: SystemTime) -> Result<(), Error> {
        let rng = ring::rand::SystemRandom::new();
        let probe_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Sign { reason: e.to_string() })?;
        let csr = CheckedCsr { key_type: KeyType::P256, spki_der: probe_key.subject_public_key_info() };
        let identity = Identity {
            namespace: "probe".into(),
            service_account: "probe".into(),
            dns_name: "probe.meshca.invalid".into(),
            spiffe_id: "spiffe://meshca.invalid/probe".into(),
        };
        let serial = profile::random_serial(&rng)?;
        let lifetimes = profile::Lifetimes {
            issuance_lifetime: Duration::from_secs(60),
            clock_skew_allowance: Duration::ZERO,
        };
        let (nb, na) = profile::validity(now, &lifetimes, &self.window)?;
        let leaf = self.sign_with(&identity, &csr, serial, nb, na)?;
        anchors
            .verify(&leaf.der, &self.chain, now, None)
            .map_err(|reason| Error::Untrusted { reason })
    }

    /// Issues a leaf for `identity` with the CSR's key, valid per `lifetimes` at `now`.
    pub fn issue(
        &self,
        identity: &Identity,
        csr: &CheckedCsr,
        lifetimes: &profile::Lifetimes,
        now: SystemTime,
    ) -> Result<Leaf, Error> {
        let (not_before, not_after) = profile::validity(now, lifetimes, &self.window)?;
        let serial = profile::random_serial(&self.rng)?;
        self.sign_with(identity, csr, serial, not_before, not_after)
    }

    fn sign_with(
        &self,
        identity: &Identity,
        csr: &CheckedCsr,
        serial: [u8; 16],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, Error> {
        let params = profile::leaf_params(identity, csr.key_type, &serial, not_before, not_after)?;
        let key = LeafKey::from_csr(csr)?;
        let cert = params
            .signed_by(&key, &self.signer)
            .map_err(|e| Error::Sign { reason: e.to_string() })?;
        Ok(Leaf { der: cert.der().clone(), serial, not_before, not_after })
    }

    /// The certificates returned with every leaf: issuer first, never the anchor.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Validity window of the whole chain.
    pub fn window(&self) -> ChainWindow {
        self.window
    }

    /// SHA-256 fingerprint (hex) of the issuer certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}
