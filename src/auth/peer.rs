//! Renewal by proof of possession: authenticating a caller by the meshca
//! certificate it presented in the TLS handshake.
//!
//! The handshake proves the caller holds the certificate's private key (its
//! CertificateVerify signature is checked by rustls; see `server::tls`). Here the
//! certificate itself is judged, with the server's clock: it must chain to the
//! *current* trust anchors (so a root removed by rotation stops working at once),
//! be meant for client authentication, be valid now — or have expired, or start,
//! no more than the clock-skew allowance away — and name an identity of this
//! deployment. The identity it names becomes the caller's [`Subject`].

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use super::Subject;
use crate::ca::issuer::TrustAnchors;
use crate::identity::Naming;

/// `Subject::issuer` for callers authenticated by their certificate.
pub(crate) const CERTIFICATE_ISSUER: &str = "certificate";

/// Why a presented certificate does not authenticate its holder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Error {
    /// Neither a token nor a client certificate was presented.
    #[error("no token and no client certificate; send a token, or renew over mutual TLS with a valid meshca certificate")]
    NoCredentials,
    /// The certificate does not chain to the current trust anchors, or is not for client use.
    #[error("the client certificate does not chain to the current trust anchors: {reason}")]
    Untrusted { reason: String },
    /// The certificate expired longer ago than the clock-skew allowance.
    #[error("the client certificate has expired; request a new one with a token")]
    Expired,
    /// The certificate starts later than the clock-skew allowance from now.
    #[error("the client certificate is not valid yet; check this host's clock")]
    NotYetValid,
    /// The certificate names no identity of this trust domain and control plane.
    #[error("the client certificate names no identity of this trust domain")]
    WrongIdentity,
}

impl Error {
    /// Stable reason code for audit records and metrics.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Error::NoCredentials => "no_credentials",
            Error::Untrusted { .. } => "client_certificate_untrusted",
            Error::Expired => "client_certificate_expired",
            Error::NotYetValid => "client_certificate_not_yet_valid",
            Error::WrongIdentity => "client_certificate_wrong_identity",
        }
    }
}

/// Authenticates the holder of `chain` (leaf first) at `now`.
pub(crate) fn authenticate(
    chain: &[CertificateDer<'_>],
    anchors: &TrustAnchors,
    naming: &Naming,
    now: SystemTime,
    skew: Duration,
) -> Result<Subject, Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(Error::NoCredentials)?;
    // Valid now, or within the allowance on either side.
    let verified = anchors.verify_path(leaf, intermediates, now).or_else(|e| {
        let retry_at = match e {
            webpki::Error::CertExpired { .. } => now.checked_sub(skew),
            webpki::Error::CertNotValidYet { .. } => now.checked_add(skew),
            _ => None,
        };
        match retry_at {
            Some(t) => anchors.verify_path(leaf, intermediates, t).map_err(|_| e),
            None => Err(e),
        }
    });
    match verified {
        Ok(()) => {}
        Err(webpki::Error::CertExpired { .. }) => return Err(Error::Expired),
        Err(webpki::Error::CertNotValidYet { .. }) => return Err(Error::NotYetValid),
        Err(e) => return Err(Error::Untrusted { reason: e.to_string() }),
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| Error::Untrusted { reason: e.to_string() })?;
    let san = cert.subject_alternative_name().ok().flatten().ok_or(Error::WrongIdentity)?;
    // The identity in its DNS name (Linkerd's leaves) and its SPIFFE ID (every
    // leaf; Istio's have no other name): all that the leaf names must be one identity.
    let mut identities = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => naming.parse(d),
        x509_parser::extensions::GeneralName::URI(u) => naming.parse_spiffe(u),
        _ => None,
    });
    let (namespace, service_account) = identities.next().ok_or(Error::WrongIdentity)?;
    if identities.any(|other| other != (namespace.clone(), service_account.clone())) {
        return Err(Error::WrongIdentity); // meshca never issues two identities in one leaf
    }
    Ok(Subject {
        namespace,
        service_account,
        pod_name: None,
        pod_uid: None,
        issuer: CERTIFICATE_ISSUER.into(),
    })
}
