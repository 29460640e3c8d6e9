//! The issue step: from a checked CSR and an authorized identity to a signed leaf.
//!
//! - [`csr`] parses a PKCS#10 request, verifies its self-signature and checks that it
//!   names nothing but the identity; only its public key is used afterwards.
//! - [`profile`] is the leaf template: serial, validity window, names, key usages.
//! - [`issuer`] loads the issuer certificate and key, checks them at start, and signs.
//! - [`store`] holds the current issuer and trust anchors as one immutable snapshot.
//! - [`reload`] watches the issuer directory and the trust-anchor file and swaps a
//!   new, fully checked snapshot into the store when their contents change.
//! - [`material`] reads PEM certificates and keys from files.
//!
//! Who the caller is and which identity it may hold are decided before this step
//! (`auth`, `identity`); recording the decision comes after it (`audit`).

pub mod csr;
pub mod hierarchy;
pub mod issuer;
pub(crate) mod keygen;
pub mod material;
pub mod profile;
pub mod reload;
pub mod store;
pub mod token;

use std::path::PathBuf;
use std::time::SystemTime;

/// Why the CA could not load its material or issue a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A file holds no usable PEM certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    /// A certificate or PEM block could not be parsed.
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    /// The private key is missing, unparsable or of an unsupported type. Never names key bytes.
    #[error("{path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    /// The issuer certificate is not a CA certificate allowed to sign certificates.
    #[error("the issuer certificate is not a CA ({reason}); use a certificate with basicConstraints CA:TRUE and keyCertSign, e.g. from `meshca init`")]
    NotCa { reason: &'static str },
    /// The issuer key does not belong to the issuer certificate.
    #[error("the issuer key does not match the issuer certificate's public key")]
    KeyMismatch,
    /// The issuer key file can be read by every user of the host (unix: mode & 0o004),
    /// and `--allow-world-readable-issuer-key` was not given.
    #[error("the issuer key {} is readable by every user of this host (mode {mode:04o}); run `chmod 600 {}` (Kubernetes: mount the Secret with defaultMode: 0400 or 0440), or start with --allow-world-readable-issuer-key", path.display(), path.display())]
    KeyWorldReadable { path: PathBuf, mode: u32 },
    /// The issuer is not valid yet at `now`.
    #[error("the issuer certificate is not valid until {}; check the clock or the issuer", humantime::format_rfc3339_seconds(*not_before))]
    IssuerNotYetValid { not_before: SystemTime, now: SystemTime },
    /// The issuer has expired: nothing can be issued until it is replaced.
    #[error("the issuer certificate expired at {}; rotate the issuer", humantime::format_rfc3339_seconds(*not_after))]
    IssuerExpired { not_after: SystemTime, now: SystemTime },
    /// The issuer does not chain to the trust anchors.
    #[error("the issuer does not chain to the trust anchors: {reason}")]
    Untrusted { reason: String },
    /// The issuer chain uses a key or signature algorithm Windows Server 2016 cannot
    /// verify (Ed25519, RSA-PSS, ...) and non-Windows algorithms were not allowed.
    #[error("{what}, which Windows Server 2016 cannot verify; use ECDSA P-256/P-384 or RSA keys with ECDSA SHA-256/384 or RSA PKCS#1 v1.5 SHA-256 signatures (e.g. `meshca init --key-type p256|p384|rsa3072`), or start with --allow-non-windows-algorithms")]
    NotWindowsCompatible { what: String },
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] csr::Error),
    /// Building or signing the certificate failed (an internal fault, not the caller's).
    #[error("signing failed: {reason}")]
    Sign { reason: String },
    /// The issuer key's PKCS#11 token did not sign (gone, locked, failing): nothing
    /// is issued with another key; the caller may retry elsewhere.
    #[error("the issuer key's token did not sign: {reason}")]
    KeyUnavailable { reason: String },
}

impl Error {
    /// Stable reason code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Csr(e) => e.code(),
            Error::IssuerExpired { .. } => "issuer_expired",
            Error::IssuerNotYetValid { .. } => "issuer_not_yet_valid",
            Error::Sign { .. } => "sign_failed",
            Error::KeyUnavailable { .. } => "issuer_key_unavailable",
            Error::Untrusted { .. } => "issuer_untrusted",
            _ => "issuer_unusable",
        }
    }
}
