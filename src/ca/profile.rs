//! The leaf template: what every certificate meshca issues looks like.
//!
//! Policy, in one place:
//! - serial: 128 random bits from the system CSPRNG, encoded as a positive INTEGER;
//! - notBefore = now − clock-skew allowance, never earlier than any chain
//!   certificate's notBefore; notAfter = now + issuance lifetime, never later than
//!   any chain certificate's notAfter (the leaf nests inside its issuer);
//! - subject CN = identity; SANs: DNS = identity, URI = SPIFFE ID;
//! - keyUsage digitalSignature (+ keyEncipherment for RSA keys only), EKU
//!   serverAuth + clientAuth, basicConstraints CA:FALSE, SKI and AKI.
//!
//! Nothing here reads the clock or touches keys: [`validity`] is a pure function of
//! its arguments and [`leaf_params`] only fills in a template.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};

use super::csr::KeyType;
use super::Error;

/// How long leaves live and how far they are backdated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// notAfter − now (default 24 h).
    pub issuance_lifetime: Duration,
    /// now − notBefore (default 2 min): tolerance for clocks behind ours.
    pub clock_skew_allowance: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            issuance_lifetime: Duration::from_secs(24 * 3600),
            clock_skew_allowance: Duration::from_secs(120),
        }
    }
}

/// The window every certificate of the chain is valid in: the latest notBefore and
/// the earliest notAfter of the issuer and the certificates above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainWindow {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Computes a leaf's (notBefore, notAfter) at `now`.
///
/// Fails with [`Error::IssuerExpired`] once `now` is past the chain's notAfter and
/// with [`Error::IssuerNotYetValid`] before its notBefore: a leaf must never outlive
/// or predate the certificates that vouch for it.
pub fn validity(
    now: SystemTime,
    lifetimes: &Lifetimes,
    chain: &ChainWindow,
) -> Result<(SystemTime, SystemTime), Error> {
    if now >= chain.not_after {
        return Err(Error::IssuerExpired { not_after: chain.not_after, now });
    }
    if now < chain.not_before {
        return Err(Error::IssuerNotYetValid { not_before: chain.not_before, now });
    }
    let backdated = now.checked_sub(lifetimes.clock_skew_allowance).unwrap_or(chain.not_before);
    let not_before = backdated.max(chain.not_before);
    let wanted = now.checked_add(lifetimes.issuance_lifetime).unwrap_or(chain.not_after);
    let not_after = wanted.min(chain.not_after);
    Ok((not_before, not_after))
}

/// A fresh serial: 128 random bits, positive, never zero.
pub(crate) fn random_serial(rng: &dyn ring::rand::SecureRandom) -> Result<[u8; 16], Error> {
    let mut serial = [0u8; 16];
    loop {
        rng.fill(&mut serial).map_err(|_| Error::Sign { reason: "system RNG failed".into() })?;
        if serial.iter().any(|b| *b != 0) {
            return Ok(serial);
        }
    }
}

/// The names a leaf certifies, as the API's naming policy chose them from the
/// authorized identity: Linkerd's DNS name (the subject's CN and a DNS SAN) with the
/// SPIFFE ID (a URI SAN), or the SPIFFE ID alone (Istio: an empty subject and a
/// critical URI SAN, RFC 5280 §4.2.1.6). A CSR may name these and nothing else
/// (`csr::check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Names<'a> {
    pub dns_name: Option<&'a str>,
    pub spiffe_id: &'a str,
}

/// Fills in the leaf template for `names`.
pub(crate) fn leaf_params(
    names: &Names<'_>,
    key_type: KeyType,
    serial: &[u8; 16],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, Error> {
    let bad_name = |e: rcgen::Error| Error::Sign { reason: format!("name rejected: {e}") };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let mut sans = Vec::with_capacity(2);
    if let Some(dns_name) = names.dns_name {
        dn.push(DnType::CommonName, dns_name);
        sans.push(SanType::DnsName(dns_name.to_owned().try_into().map_err(bad_name)?));
    }
    sans.push(SanType::URI(names.spiffe_id.to_owned().try_into().map_err(bad_name)?));
    // Without a subject, rcgen marks the SAN critical, as RFC 5280 requires.
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    // rcgen encodes the bytes as an unsigned INTEGER: positive and minimal, with a
    // leading zero byte when the first bit is set, so all 128 bits are kept (pinned by
    // `serials_are_encoded_positive_and_minimal_with_all_128_bits`).
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.is_ca = IsCa::ExplicitNoCa; // CA:FALSE, and makes rcgen write the SKI
    params.use_authority_key_identifier_extension = true;
    params.key_usages = match key_type {
        KeyType::Rsa { .. } => {
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment]
        }
        KeyType::P256 | KeyType::P384 => vec![KeyUsagePurpose::DigitalSignature],
    };
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn validity_window_follows_policy_and_nests_inside_the_chain() {
        let lt = Lifetimes::default();
        let chain = ChainWindow { not_before: t(1_000), not_after: t(1_000_000) };
        // (now, expected notBefore, expected notAfter)
        let table = [
            (t(10_000), t(10_000 - 120), t(10_000 + 86_400)), // ordinary
            (t(1_050), t(1_000), t(1_050 + 86_400)),          // backdate clamped to issuer start
            (t(990_000), t(990_000 - 120), t(1_000_000)),     // lifetime clamped to issuer end
        ];
        for (now, nb, na) in table {
            assert_eq!(validity(now, &lt, &chain).unwrap(), (nb, na), "now={now:?}");
        }
    }

    #[test]
    fn expired_or_future_issuer_refuses_to_issue() {
        let lt = Lifetimes { issuance_lifetime: HOUR, clock_skew_allowance: Duration::ZERO };
        let chain = ChainWindow { not_before: t(1_000), not_after: t(2_000) };
        assert!(matches!(validity(t(2_000), &lt, &chain), Err(Error::IssuerExpired { .. })));
        assert!(matches!(validity(t(999), &lt, &chain), Err(Error::IssuerNotYetValid { .. })));
        // The chain's own first and last valid seconds: the first issues, the last
        // refuses (a leaf would end no later than the instant it starts).
        assert_eq!(validity(t(1_000), &lt, &chain).unwrap(), (t(1_000), t(2_000)));
        assert!(validity(t(1_999), &lt, &chain).is_ok());
    }

    #[test]
    #[allow(deprecated)] // ring's fixed-output test RNG lives in its deprecated `test` module
    fn an_all_zero_draw_is_drawn_again() {
        let pattern: [u8; 16] = std::array::from_fn(|i| 0x11 * (i as u8 % 15 + 1));
        let rng = ring::test::rand::FixedSliceSequenceRandom {
            bytes: &[&[0u8; 16], &pattern],
            current: core::cell::UnsafeCell::new(0),
        };
        assert_eq!(random_serial(&rng).unwrap(), pattern);
    }

    /// The serial as the certificate encodes it: DER INTEGER contents.
    fn encoded_serial(serial: [u8; 16]) -> Vec<u8> {
        let names =
            Names { dns_name: Some("web.default.example"), spiffe_id: "spiffe://example/ns/default/sa/web" };
        let params = leaf_params(&names, KeyType::P256, &serial, t(1_000), t(2_000)).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        parsed.raw_serial().to_vec()
    }

    #[test]
    fn serials_are_encoded_positive_and_minimal_with_all_128_bits() {
        let mut high = [0x5a; 16];
        high[0] = 0x80;
        assert_eq!(encoded_serial(high), [&[0u8][..], &high].concat(), "a leading zero keeps it positive");
        let low = [0x7f; 16];
        assert_eq!(encoded_serial(low), low.to_vec(), "no leading zero when none is needed");
    }

    #[test]
    fn serials_are_random_and_nonzero() {
        let rng = ring::rand::SystemRandom::new();
        let a = random_serial(&rng).unwrap();
        let b = random_serial(&rng).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|x| *x != 0));
    }
}
