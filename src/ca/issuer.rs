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
//!
//! Unless [`Algorithms::Any`] is asked for (`serve --allow-non-windows-algorithms`),
//! the chain must also be one Windows Server 2016 (Schannel) can verify: every key of
//! the chain and of the anchor above it ECDSA P-256/P-384 or RSA, every chain
//! certificate signed with ECDSA SHA-256/384 or RSA PKCS#1 v1.5 SHA-256 — no Ed25519,
//! no RSA-PSS. Leaves are signed with the issuer key's own algorithm (ECDSA P-256
//! SHA-256, P-384 SHA-384, RSA PKCS#1 v1.5 SHA-256), so they follow.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA1WITHRSA, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    OID_SIG_ED25519, OID_SIG_ED448,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use super::csr::{CheckedCsr, KeyType};
use super::material::{read_certificates, read_pkcs8_key};
use super::profile::{self, ChainWindow, Names};
use super::Error;

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
    pub(crate) fn verify_path(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: SystemTime,
    ) -> Result<(), webpki::Error> {
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        let time =
            UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO));
        for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                time,
                usage,
                None,
                None,
            )?;
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

/// The issuer's private key: in memory (read from `tls.key`), or in a PKCS#11 token
/// (`--issuer-key pkcs11:…`, [`super::token`]), where it signs without leaving it.
/// One per issuer, never moved on a hot path: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum IssuerKey {
    File(KeyPair),
    Token(std::sync::Arc<super::token::TokenKey>),
}

impl rcgen::PublicKeyData for IssuerKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            IssuerKey::File(key) => key.der_bytes(),
            IssuerKey::Token(key) => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            IssuerKey::File(key) => key.algorithm(),
            IssuerKey::Token(key) => rcgen::PublicKeyData::algorithm(key.as_ref()),
        }
    }
}

impl rcgen::SigningKey for IssuerKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            IssuerKey::File(key) => key.sign(msg),
            IssuerKey::Token(key) => key.sign(msg),
        }
    }
}

/// Certificate, key and chain that sign leaves.
pub struct Issuer {
    signer: rcgen::Issuer<'static, IssuerKey>,
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

/// Which algorithms the issuer chain may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithms {
    /// Only what Windows Server 2016 verifies (the default): keys ECDSA P-256/P-384 or
    /// RSA; chain certificates signed with ECDSA SHA-256/384 or RSA PKCS#1 v1.5 SHA-256.
    #[default]
    WindowsCompatible,
    /// Whatever rustls-webpki verifies, Ed25519 and RSA-PSS included
    /// (`serve --allow-non-windows-algorithms`).
    Any,
}

/// A signature or key algorithm, named for an error message.
fn algorithm_name(oid: &Oid<'_>) -> String {
    let known = [
        (&OID_SIG_ED25519, "Ed25519"),
        (&OID_SIG_ED448, "Ed448"),
        (&OID_PKCS1_RSASSAPSS, "RSA-PSS"),
        (&OID_PKCS1_SHA1WITHRSA, "RSA PKCS#1 v1.5 with SHA-1"),
        (&OID_PKCS1_SHA384WITHRSA, "RSA PKCS#1 v1.5 with SHA-384"),
        (&OID_PKCS1_SHA512WITHRSA, "RSA PKCS#1 v1.5 with SHA-512"),
        (&OID_SIG_ECDSA_WITH_SHA512, "ECDSA with SHA-512"),
    ];
    known
        .iter()
        .find(|(known, _)| *known == oid)
        .map_or_else(|| format!("algorithm {}", oid.to_id_string()), |(_, name)| (*name).to_string())
}

/// `Err(what)` unless the key is ECDSA P-256/P-384 or RSA.
fn check_windows_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return Ok(());
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        return match spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
            Some(curve) if curve == OID_EC_P256 || curve == OID_NIST_EC_P384 => Ok(()),
            Some(curve) => Err(format!("has an EC key on curve {}", curve.to_id_string())),
            None => Err("has an EC key without a named curve".into()),
        };
    }
    Err(format!("has an {} key", algorithm_name(alg)))
}

/// `Err(what)` unless the signature is ECDSA SHA-256/384 or RSA PKCS#1 v1.5 SHA-256.
fn check_windows_signature(alg: &AlgorithmIdentifier<'_>) -> Result<(), String> {
    let oid = &alg.algorithm;
    if *oid == OID_SIG_ECDSA_WITH_SHA256
        || *oid == OID_SIG_ECDSA_WITH_SHA384
        || *oid == OID_PKCS1_SHA256WITHRSA
    {
        return Ok(());
    }
    Err(format!("is signed with {}", algorithm_name(oid)))
}

/// Refuses a chain (issuer first) that Windows Server 2016 cannot verify, or one whose
/// anchors (those named by its top issuer; several during a rotation) all have keys it
/// cannot verify with. Anchors' own self-signatures are not checked: a verifier trusts
/// an anchor for being an anchor, not for its signature.
fn check_windows(chain: &[X509Certificate<'_>], anchors: &[X509Certificate<'_>]) -> Result<(), Error> {
    let refuse = |who: String, what: String| Error::NotWindowsCompatible { what: format!("{who} {what}") };
    for (i, cert) in chain.iter().enumerate() {
        let who = match i {
            0 => "the issuer certificate".to_string(),
            i => format!("certificate {} of the issuer chain", i + 1),
        };
        check_windows_key(cert.public_key()).map_err(|what| refuse(who.clone(), what))?;
        check_windows_signature(&cert.signature_algorithm).map_err(|what| refuse(who, what))?;
    }
    if anchors.iter().any(|a| check_windows_key(a.public_key()).is_ok()) {
        return Ok(());
    }
    match anchors.first() {
        Some(anchor) => check_windows_key(anchor.public_key())
            .map_err(|what| refuse(format!("the trust anchor \"{}\"", anchor.subject()), what)),
        // No anchor names the chain's top issuer: the probe reports it as untrusted.
        None => Ok(()),
    }
}

/// Where an issuer directory keeps its certificate and key.
pub(crate) fn issuer_files(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    if !crt.exists() && dir.join("crt.pem").exists() {
        return (dir.join("crt.pem"), dir.join("key.pem"));
    }
    (crt, key)
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>, path: &Path) -> Result<X509Certificate<'a>, Error> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::BadCertificate { path: path.into(), reason: e.to_string() })?;
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
    /// Loads and checks the issuer in `dir` against `anchors` at `now`, allowing only
    /// algorithms Windows verifies ([`Algorithms::WindowsCompatible`]).
    pub fn load(dir: &Path, anchors: &TrustAnchors, now: SystemTime) -> Result<Self, Error> {
        Self::load_with(dir, anchors, now, Algorithms::WindowsCompatible, None)
    }

    /// Like [`Issuer::load`], signing with the key in `token` instead of `tls.key`
    /// (`serve --issuer-key`).
    pub fn load_with_token(
        dir: &Path,
        anchors: &TrustAnchors,
        now: SystemTime,
        token: &std::sync::Arc<super::token::TokenKey>,
    ) -> Result<Self, Error> {
        Self::load_with(dir, anchors, now, Algorithms::WindowsCompatible, Some(token))
    }

    /// Like [`Issuer::load`], with the algorithms the chain may use, and the key in
    /// `token` instead of `tls.key` when there is one.
    pub(crate) fn load_with(
        dir: &Path,
        anchors: &TrustAnchors,
        now: SystemTime,
        algorithms: Algorithms,
        token: Option<&std::sync::Arc<super::token::TokenKey>>,
    ) -> Result<Self, Error> {
        let (crt_path, key_path) = issuer_files(dir);
        let certs = read_certificates(&crt_path)?;
        match token {
            Some(token) => {
                let key = IssuerKey::Token(token.clone());
                Self::from_key(certs, key, anchors, now, &crt_path, algorithms)
            }
            None => {
                let key = read_pkcs8_key(&key_path)?;
                Self::from_parts_with(certs, &key, anchors, now, (&crt_path, &key_path), algorithms)
            }
        }
    }

    /// Checks and assembles an issuer from its chain (issuer first) and PKCS#8 key,
    /// allowing only algorithms Windows verifies. The paths name the material in errors.
    pub fn from_parts(
        certs: Vec<CertificateDer<'static>>,
        pkcs8_key: &[u8],
        anchors: &TrustAnchors,
        now: SystemTime,
        crt_path: &Path,
        key_path: &Path,
    ) -> Result<Self, Error> {
        Self::from_parts_with(
            certs,
            pkcs8_key,
            anchors,
            now,
            (crt_path, key_path),
            Algorithms::WindowsCompatible,
        )
    }

    /// Like [`Issuer::from_parts`], with the algorithms the chain may use.
    pub(crate) fn from_parts_with(
        certs: Vec<CertificateDer<'static>>,
        pkcs8_key: &[u8],
        anchors: &TrustAnchors,
        now: SystemTime,
        (crt_path, key_path): (&Path, &Path),
        algorithms: Algorithms,
    ) -> Result<Self, Error> {
        let key = KeyPair::try_from(pkcs8_key).map_err(|_| Error::BadKey {
            path: key_path.into(),
            reason: "not a P-256, P-384, RSA or Ed25519 PKCS#8 private key".into(),
        })?;
        Self::from_key(certs, IssuerKey::File(key), anchors, now, crt_path, algorithms)
    }

    /// Checks and assembles an issuer from its chain (issuer first) and its key.
    fn from_key(
        certs: Vec<CertificateDer<'static>>,
        key: IssuerKey,
        anchors: &TrustAnchors,
        now: SystemTime,
        crt_path: &Path,
        algorithms: Algorithms,
    ) -> Result<Self, Error> {
        use rcgen::PublicKeyData as _;
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
        let mut parsed = vec![issuer_cert.clone()]; // the chain file, issuer first
        for der in &certs[1..] {
            let c = parse_cert(der, crt_path)?;
            window.not_before = window.not_before.max(to_system_time(c.validity().not_before));
            window.not_after = window.not_after.min(to_system_time(c.validity().not_after));
            top_issuer = c.issuer().as_raw().to_vec();
            parsed.push(c);
        }
        let mut top_anchors = Vec::new();
        for der in anchors.certificates() {
            let Ok((_, a)) = X509Certificate::from_der(der) else { continue };
            if a.subject().as_raw() == top_issuer.as_slice() {
                window.not_before = window.not_before.max(to_system_time(a.validity().not_before));
                window.not_after = window.not_after.min(to_system_time(a.validity().not_after));
                top_anchors.push(a);
            }
        }
        if algorithms == Algorithms::WindowsCompatible {
            check_windows(&parsed, &top_anchors)?;
        }
        if now >= window.not_after {
            return Err(Error::IssuerExpired { not_after: window.not_after, now });
        }
        if now < window.not_before {
            return Err(Error::IssuerNotYetValid { not_before: window.not_before, now });
        }

        let signer = rcgen::Issuer::from_ca_cert_der(issuer_der, key)
            .map_err(|e| Error::BadCertificate { path: crt_path.into(), reason: e.to_string() })?;
        let fingerprint = crate::digest::sha256_hex(issuer_der);
        drop(issuer_cert);
        // Never hand out a trust anchor as an intermediate.
        let chain: Vec<_> = certs.into_iter().filter(|c| !anchors.certificates().contains(c)).collect();
        let issuer = Issuer { signer, fingerprint, chain, window, rng: ring::rand::SystemRandom::new() };
        issuer.probe(anchors, now)?;
        Ok(issuer)
    }

    /// Signs a throwaway leaf and verifies it as a client would.
    fn probe(&self, anchors: &TrustAnchors, now: SystemTime) -> Result<(), Error> {
        let rng = ring::rand::SystemRandom::new();
        let probe_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Sign { reason: e.to_string() })?;
        let csr = CheckedCsr { key_type: KeyType::P256, spki_der: probe_key.subject_public_key_info() };
        let names =
            Names { dns_name: Some("probe.meshca.invalid"), spiffe_id: "spiffe://meshca.invalid/probe" };
        let serial = profile::random_serial(&rng)?;
        let lifetimes = profile::Lifetimes {
            issuance_lifetime: Duration::from_secs(60),
            clock_skew_allowance: Duration::ZERO,
        };
        let (nb, na) = profile::validity(now, &lifetimes, &self.window)?;
        let leaf = self.sign_with(&names, &csr, serial, nb, na)?;
        anchors.verify(&leaf.der, &self.chain, now, None).map_err(|reason| Error::Untrusted { reason })
    }

    /// Issues a leaf certifying `names` with the CSR's key, valid per `lifetimes` at `now`.
    pub fn issue(
        &self,
        names: &Names<'_>,
        csr: &CheckedCsr,
        lifetimes: &profile::Lifetimes,
        now: SystemTime,
    ) -> Result<Leaf, Error> {
        let (not_before, not_after) = profile::validity(now, lifetimes, &self.window)?;
        let serial = profile::random_serial(&self.rng)?;
        self.sign_with(names, csr, serial, not_before, not_after)
    }

    fn sign_with(
        &self,
        names: &Names<'_>,
        csr: &CheckedCsr,
        serial: [u8; 16],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, Error> {
        let params = profile::leaf_params(names, csr.key_type, &serial, not_before, not_after)?;
        let key = LeafKey::from_csr(csr)?;
        let cert = params.signed_by(&key, &self.signer).map_err(|e| match e {
            rcgen::Error::RemoteKeyError => {
                Error::KeyUnavailable { reason: "PKCS#11 signing failed (the error is logged)".into() }
            }
            e => Error::Sign { reason: e.to_string() },
        })?;
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

    /// Why the issuer key's token did not sign last time (none for a key file, or
    /// a token that signs).
    pub fn key_failing(&self) -> Option<String> {
        match self.signer.key() {
            IssuerKey::Token(token) => token.failing(),
            IssuerKey::File(_) => None,
        }
    }

    /// A failing token key reopened and probed ([`super::token::TokenKey::reopen`]);
    /// blocks on the token. `true` when the key signs.
    pub fn reopen_key(&self) -> bool {
        match self.signer.key() {
            IssuerKey::Token(token) => token.failing().is_none() || token.reopen(),
            IssuerKey::File(_) => true,
        }
    }

    /// The issuer key's algorithm and raw public key (an uncompressed EC point, or a
    /// PKCS#1 RSAPublicKey), to check what it signed besides certificates (bootstrap
    /// tokens, `auth::bootstrap`).
    pub fn public_key(&self) -> (&'static SignatureAlgorithm, &[u8]) {
        use rcgen::PublicKeyData as _;
        let key = self.signer.key();
        (key.algorithm(), key.der_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose, SignatureAlgorithm};

    fn ca_params(cn: &str, now: SystemTime) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86_400)).into();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        params
    }

    /// Loads an issuer with an `issuer_alg` key under an anchor with an `anchor_alg` key.
    fn load(
        anchor_alg: &'static SignatureAlgorithm,
        issuer_alg: &'static SignatureAlgorithm,
        algorithms: Algorithms,
    ) -> Result<Issuer, Error> {
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let anchor_key = KeyPair::generate_for(anchor_alg).unwrap();
        let anchor = ca_params("anchor", now).self_signed(&anchor_key).unwrap();
        let issuer_key = KeyPair::generate_for(issuer_alg).unwrap();
        let signer = rcgen::Issuer::new(ca_params("anchor", now), &anchor_key);
        let issuer = ca_params("issuer", now).signed_by(&issuer_key, &signer).unwrap();
        let nowhere = Path::new("(test)");
        let anchors = TrustAnchors::from_certs(vec![anchor.der().clone()], nowhere).unwrap();
        let certs = vec![issuer.der().clone()];
        Issuer::from_parts_with(
            certs,
            &issuer_key.serialize_der(),
            &anchors,
            now,
            (nowhere, nowhere),
            algorithms,
        )
    }

    /// Loads an issuer made from `issuer` and signed by the anchor made from `anchor`
    /// (both P-256), with `others` in the anchor bundle after it, at `now`.
    fn load_chain(
        anchor: CertificateParams,
        issuer: CertificateParams,
        others: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<Issuer, Error> {
        let anchor_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let anchor_cert = anchor.clone().self_signed(&anchor_key).unwrap();
        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = issuer.signed_by(&issuer_key, &rcgen::Issuer::new(anchor, &anchor_key)).unwrap();
        let nowhere = Path::new("(test)");
        let mut bundle = vec![anchor_cert.der().clone()];
        bundle.extend_from_slice(others);
        let anchors = TrustAnchors::from_certs(bundle, nowhere).unwrap();
        let certs = vec![issuer.der().clone()];
        let key = issuer_key.serialize_der();
        Issuer::from_parts_with(certs, &key, &anchors, now, (nowhere, nowhere), Algorithms::WindowsCompatible)
    }

    /// Now, to the second (certificates carry whole seconds).
    fn whole_second_now() -> SystemTime {
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn an_issuer_certificate_that_says_it_is_not_a_ca_is_refused_as_such() {
        let now = whole_second_now();
        let mut issuer = ca_params("issuer", now);
        issuer.is_ca = IsCa::ExplicitNoCa;
        match load_chain(ca_params("anchor", now), issuer, &[], now) {
            Err(Error::NotCa { reason }) => assert_eq!(reason, "basicConstraints CA:TRUE is missing"),
            other => panic!("expected NotCa, got {other:?}"),
        }
    }

    #[test]
    fn the_chain_is_valid_from_its_first_second_and_not_one_second_earlier() {
        let now = whole_second_now();
        let (start, mut issuer) = (now + Duration::from_secs(60), ca_params("issuer", now));
        issuer.not_before = start.into();
        let issuer_at = |at| load_chain(ca_params("anchor", now), issuer.clone(), &[], at);
        let loaded = issuer_at(start).unwrap();
        assert_eq!(loaded.window().not_before, start);
        match issuer_at(start - Duration::from_secs(1)) {
            Err(Error::IssuerNotYetValid { not_before, .. }) => assert_eq!(not_before, start),
            other => panic!("expected IssuerNotYetValid, got {other:?}"),
        }
    }

    #[test]
    fn only_the_anchors_that_name_the_chains_top_issuer_bound_its_window_and_algorithms() {
        let now = whole_second_now();
        // Another CA's anchors in the same bundle: an Ed25519 one (not Windows
        // compatible) and a P-256 one that expires in a minute. Neither issued this chain.
        let other = |alg, cn, lifetime| {
            let mut params = ca_params(cn, now);
            params.not_after = (now + Duration::from_secs(lifetime)).into();
            params.self_signed(&KeyPair::generate_for(alg).unwrap()).unwrap().der().clone()
        };
        let others = [
            other(&rcgen::PKCS_ED25519, "other-ed", 86_400),
            other(&rcgen::PKCS_ECDSA_P256_SHA256, "other-p256", 60),
        ];
        let issuer = load_chain(ca_params("anchor", now), ca_params("issuer", now), &others, now).unwrap();
        assert_eq!(issuer.window().not_after, now + Duration::from_secs(86_400));
    }

    #[test]
    fn an_issuer_directory_keeps_tls_crt_and_falls_back_to_crt_pem_only_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let tls = (path.join("tls.crt"), path.join("tls.key"));
        assert_eq!(issuer_files(path), tls);
        std::fs::write(path.join("crt.pem"), "").unwrap();
        assert_eq!(issuer_files(path), (path.join("crt.pem"), path.join("key.pem")));
        std::fs::write(path.join("tls.crt"), "").unwrap();
        assert_eq!(issuer_files(path), tls);
    }

    #[test]
    fn times_before_1970_are_before_the_epoch() {
        let day = Duration::from_secs(86_400);
        let at = |secs| to_system_time(x509_parser::time::ASN1Time::from_timestamp(secs).unwrap());
        assert_eq!(at(-86_400), SystemTime::UNIX_EPOCH - day);
        assert_eq!(at(86_400), SystemTime::UNIX_EPOCH + day);
        assert_eq!(at(0), SystemTime::UNIX_EPOCH);
    }

    fn refusal(result: Result<Issuer, Error>) -> String {
        match result {
            Err(e @ Error::NotWindowsCompatible { .. }) => e.to_string(),
            other => panic!("expected NotWindowsCompatible, got {other:?}"),
        }
    }

    #[test]
    fn an_ed25519_issuer_is_refused_naming_the_flag_unless_any_algorithm_is_allowed() {
        let ed = &rcgen::PKCS_ED25519;
        let message = refusal(load(ed, ed, Algorithms::WindowsCompatible));
        assert!(message.starts_with("the issuer certificate has an Ed25519 key"), "{message}");
        assert!(message.contains("--allow-non-windows-algorithms"), "{message}");
        assert!(load(ed, ed, Algorithms::Any).is_ok());
    }

    #[test]
    fn an_ecdsa_issuer_signed_by_an_ed25519_anchor_is_refused_unless_any_algorithm_is_allowed() {
        let (ed, p256) = (&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256);
        let message = refusal(load(ed, p256, Algorithms::WindowsCompatible));
        assert!(message.starts_with("the issuer certificate is signed with Ed25519"), "{message}");
        assert!(load(ed, p256, Algorithms::Any).is_ok());
    }

    #[test]
    fn anchors_are_refused_only_when_none_of_them_has_a_key_windows_verifies_with() {
        let now = crate::clock::Clock::now(&crate::clock::SystemClock);
        let self_signed = |alg| {
            let key = KeyPair::generate_for(alg).unwrap();
            ca_params("anchor", now).self_signed(&key).unwrap().der().clone()
        };
        let (p256, ed) = (self_signed(&rcgen::PKCS_ECDSA_P256_SHA256), self_signed(&rcgen::PKCS_ED25519));
        let (p256, ed) =
            (parse_cert(&p256, Path::new("p256")).unwrap(), parse_cert(&ed, Path::new("ed")).unwrap());
        let chain = std::slice::from_ref(&p256);
        let err = check_windows(chain, std::slice::from_ref(&ed)).unwrap_err().to_string();
        assert!(err.starts_with("the trust anchor \"CN=anchor\" has an Ed25519 key"), "{err}");
        check_windows(chain, &[ed.clone(), p256.clone()]).unwrap();
        check_windows(chain, &[]).unwrap();
    }

    #[test]
    fn ec_keys_on_curves_other_than_p256_and_p384_are_not_windows_compatible() {
        // SubjectPublicKeyInfo of an EC key on `curve` (the point's value does not matter).
        let spki = |curve: &[u64]| {
            yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(&[
                            1, 2, 840, 10045, 2, 1,
                        ]));
                        w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(curve));
                    });
                    w.next().write_bitvec_bytes(&[4; 65], 65 * 8);
                })
            })
        };
        let check = |der: &[u8]| {
            let (_, spki) = SubjectPublicKeyInfo::from_der(der).unwrap();
            check_windows_key(&spki)
        };
        check(&spki(&[1, 2, 840, 10045, 3, 1, 7])).unwrap(); // P-256
        check(&spki(&[1, 3, 132, 0, 34])).unwrap(); // P-384
        assert_eq!(check(&spki(&[1, 3, 132, 0, 35])).unwrap_err(), "has an EC key on curve 1.3.132.0.35"); // P-521
        assert_eq!(check(&spki(&[1, 3, 132, 0, 10])).unwrap_err(), "has an EC key on curve 1.3.132.0.10");
        // secp256k1
    }

    #[test]
    fn debug_strings_name_the_chain_and_never_the_key() {
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
        let issuer = load(p256, p256, Algorithms::WindowsCompatible).unwrap();
        let debug = format!("{issuer:?}");
        assert_eq!(
            debug,
            format!("Issuer {{ fingerprint_sha256: {:?}, chain_len: 1, .. }}", issuer.fingerprint())
        );
        assert_eq!(issuer.fingerprint().len(), 64);
        let anchors = TrustAnchors::from_certs(issuer.intermediates().to_vec(), Path::new("(test)")).unwrap();
        assert_eq!(format!("{anchors:?}"), "TrustAnchors { count: 1 }");
    }

    #[test]
    fn ecdsa_chains_are_windows_compatible() {
        let (p256, p384) = (&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384);
        for (anchor, issuer) in [(p256, p256), (p384, p384), (p384, p256), (p256, p384)] {
            load(anchor, issuer, Algorithms::WindowsCompatible).unwrap();
        }
    }
}
