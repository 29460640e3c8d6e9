//! Making a trust anchor and an issuer (`meshca init`, `meshca serve --dev`).
//!
//! The anchor is a self-signed root; the issuer is an intermediate CA it signs, with
//! pathLen 0. Neither carries an extended key usage (Windows restricts leaves by the
//! EKUs of every CA above them) nor name constraints. Every key type offered is one
//! Windows Server 2016 verifies: ECDSA P-256 (signing with SHA-256), P-384 (SHA-384)
//! or RSA 3072 (PKCS#1 v1.5 with SHA-256; the key from [`super::keygen`], as ring
//! generates no RSA keys). Writing the files, and refusing to overwrite them, is left
//! to the caller.

use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::Error;
use crate::identity::Naming;

/// Key algorithm for the anchor and the issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaKeyType {
    P256,
    P384,
    /// RSA 3072 bits, signing with PKCS#1 v1.5 and SHA-256.
    Rsa3072,
}

impl CaKeyType {
    /// A fresh key. RSA generation is CPU-bound for about a second (several in an
    /// unoptimized build): call this where blocking is fine.
    fn generate_key(self) -> Result<KeyPair, Error> {
        let sign_err = |e: rcgen::Error| Error::Sign { reason: e.to_string() };
        match self {
            CaKeyType::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err),
            CaKeyType::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(sign_err),
            CaKeyType::Rsa3072 => {
                let der = super::keygen::generate_pkcs8(3072)
                    .map_err(|e| Error::Sign { reason: format!("RSA key generation: {e}") })?;
                KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &rcgen::PKCS_RSA_SHA256)
                    .map_err(sign_err)
            }
        }
    }
}

/// Validity of what `init` makes.
#[derive(Clone, Copy, Debug)]
pub struct HierarchyLifetimes {
    pub anchor: Duration,
    pub issuer: Duration,
}

impl Default for HierarchyLifetimes {
    fn default() -> Self {
        HierarchyLifetimes {
            anchor: Duration::from_secs(10 * 365 * 86_400),
            issuer: Duration::from_secs(365 * 86_400),
        }
    }
}

/// A freshly generated anchor and issuer, PEM-encoded. Debug omits the keys.
pub struct Hierarchy {
    pub anchor_cert_pem: String,
    pub anchor_key_pem: String,
    pub issuer_cert_pem: String,
    /// Empty when the issuer's key stays elsewhere ([`generate_for_key`]: a PKCS#11
    /// token); then no `tls.key` is written.
    pub issuer_key_pem: String,
}

impl std::fmt::Debug for Hierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hierarchy").finish_non_exhaustive()
    }
}

fn ca_params(
    cn: String,
    not_before: SystemTime,
    not_after: SystemTime,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = path_len.is_some();
    params
}

/// Generates an anchor valid from `now − 1h` and an issuer nested inside it.
/// With [`CaKeyType::Rsa3072`] this blocks while two RSA keys are generated.
pub fn generate(
    naming: &Naming,
    key_type: CaKeyType,
    now: SystemTime,
    lifetimes: HierarchyLifetimes,
) -> Result<Hierarchy, Error> {
    let issuer_key = key_type.generate_key()?;
    let h = generate_for_key(naming, key_type, now, lifetimes, &issuer_key)?;
    Ok(Hierarchy { issuer_key_pem: issuer_key.serialize_pem(), ..h })
}

/// A new anchor of `key_type` and an issuer certificate, signed by it, for a key
/// that stays elsewhere (a PKCS#11 token), with an empty `issuer_key_pem`.
pub fn generate_for_key(
    naming: &Naming,
    key_type: CaKeyType,
    now: SystemTime,
    lifetimes: HierarchyLifetimes,
    issuer_key: &impl rcgen::PublicKeyData,
) -> Result<Hierarchy, Error> {
    let sign_err = |e: rcgen::Error| Error::Sign { reason: e.to_string() };
    let start = now - Duration::from_secs(3600);
    let suffix = format!("{}.{}", naming.control_plane_namespace(), naming.trust_domain());

    let anchor_key = key_type.generate_key()?;
    let mut anchor_params = ca_params(format!("root.{suffix}"), start, now + lifetimes.anchor, None);
    anchor_params.serial_number = Some(random_serial()?);
    let anchor = anchor_params.self_signed(&anchor_key).map_err(sign_err)?;

    let issuer_end = (now + lifetimes.issuer).min(now + lifetimes.anchor);
    let mut issuer_params = ca_params(format!("identity.{suffix}"), start, issuer_end, Some(0));
    issuer_params.serial_number = Some(random_serial()?);
    let signer = rcgen::Issuer::new(anchor_params, &anchor_key);
    let issuer = issuer_params.signed_by(issuer_key, &signer).map_err(sign_err)?;
    Ok(Hierarchy {
        anchor_cert_pem: anchor.pem(),
        anchor_key_pem: anchor_key.serialize_pem(),
        issuer_cert_pem: issuer.pem(),
        issuer_key_pem: String::new(),
    })
}

fn random_serial() -> Result<rcgen::SerialNumber, Error> {
    let serial = super::profile::random_serial(&ring::rand::SystemRandom::new())?;
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&serial);
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}
