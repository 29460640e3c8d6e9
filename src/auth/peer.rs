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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};

    const SKEW: Duration = Duration::from_secs(60);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A CA and its anchors, and leaves it signs with the given names and validity.
    struct Ca {
        key: KeyPair,
        params: CertificateParams,
        anchors: TrustAnchors,
    }

    impl Ca {
        fn new() -> Ca {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, "test root");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.not_before = t(0).into();
            params.not_after = t(1_000_000).into();
            let cert = params.self_signed(&key).unwrap();
            let anchors =
                TrustAnchors::from_certs(vec![cert.der().clone()], std::path::Path::new("(test)")).unwrap();
            Ca { key, params, anchors }
        }

        fn leaf(&self, sans: Vec<SanType>, not_before: u64, not_after: u64) -> CertificateDer<'static> {
            let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            params.not_before = t(not_before).into();
            params.not_after = t(not_after).into();
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages =
                vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            params.signed_by(&key, &issuer).unwrap().der().clone()
        }
    }

    fn naming() -> Naming {
        Naming::new("cluster.local", "meshca-system").unwrap()
    }

    fn dns(sa: &str) -> SanType {
        SanType::DnsName(naming().identity("default", sa).unwrap().dns_name.try_into().unwrap())
    }

    fn uri(sa: &str) -> SanType {
        SanType::URI(naming().identity("default", sa).unwrap().spiffe_id.try_into().unwrap())
    }

    fn holder(ca: &Ca, leaf: CertificateDer<'static>, now: u64) -> Result<(String, String), Error> {
        authenticate(&[leaf], &ca.anchors, &naming(), t(now), SKEW).map(|s| (s.namespace, s.service_account))
    }

    #[test]
    fn a_leaf_naming_one_identity_by_dns_name_spiffe_id_or_both_authenticates_as_it() {
        let ca = Ca::new();
        let web = Ok(("default".to_owned(), "web".to_owned()));
        assert_eq!(holder(&ca, ca.leaf(vec![dns("web"), uri("web")], 100, 10_000), 500), web);
        assert_eq!(holder(&ca, ca.leaf(vec![dns("web")], 100, 10_000), 500), web, "DNS name only");
        assert_eq!(holder(&ca, ca.leaf(vec![uri("web")], 100, 10_000), 500), web, "SPIFFE ID only (Istio)");
    }

    #[test]
    fn a_leaf_whose_dns_name_and_spiffe_id_name_two_identities_is_refused() {
        let ca = Ca::new();
        for sans in [vec![dns("web"), uri("db")], vec![uri("db"), dns("web")]] {
            assert!(matches!(holder(&ca, ca.leaf(sans, 100, 10_000), 500), Err(Error::WrongIdentity)));
        }
    }

    #[test]
    fn validity_is_stretched_by_the_skew_allowance_on_both_sides_and_no_further() {
        let ca = Ca::new();
        let leaf = || ca.leaf(vec![dns("web"), uri("web")], 1_000, 2_000);
        // Not valid yet by less than the allowance (the holder's clock runs ahead): accepted.
        assert!(holder(&ca, leaf(), 1_000 - 30).is_ok());
        assert!(matches!(holder(&ca, leaf(), 1_000 - 120), Err(Error::NotYetValid)));
        // Expired by less than the allowance: accepted; by more: refused.
        assert!(holder(&ca, leaf(), 2_000 + 30).is_ok());
        assert!(matches!(holder(&ca, leaf(), 2_000 + 120), Err(Error::Expired)));
    }
}
