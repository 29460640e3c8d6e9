//! Generation of the private keys meshca makes that ring cannot generate itself.
//!
//! ring, meshca's one crypto provider, generates ECDSA keys (callers ask it, or rcgen,
//! directly) but no RSA keys, though it loads them and signs with them. This module owns
//! making those: RSA private keys (2048, 3072 or 4096 bits, e = 65537) as PKCS#8 DER, for
//! `init --key-type rsa3072` and the agent's `--key-type rsa2048|rsa3072` (Windows Server
//! 2016's Schannel). Generation alone is done by RustCrypto's `rsa` crate (prime generation
//! and the key arithmetic in constant-time `crypto-bigint`), with ring's `SystemRandom` as
//! its only source of randomness. The key then goes back to ring: it is loaded by
//! `RsaKeyPair::from_pkcs8`, which validates its components, and must pass a sign/verify
//! round trip before it is returned; a key that fails is never returned.

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use rsa::pkcs8::EncodePrivateKey;

/// Why no RSA key could be generated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Only 2048, 3072 and 4096 bits are generated.
    #[error("unsupported RSA key size {0}; use 2048, 3072 or 4096")]
    UnsupportedSize(u32),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// The key failed a consistency check (an internal fault); no key is returned.
    #[error("generated key failed validation: {0}")]
    Invalid(String),
}

/// Generates an RSA key of `bits` (2048, 3072 or 4096) and returns it as PKCS#8 DER.
///
/// CPU-bound for tens of milliseconds to seconds (longer for larger keys, and several times
/// longer in unoptimized builds): on an async runtime, call it from a blocking context such
/// as `tokio::task::spawn_blocking`.
pub(crate) fn generate_pkcs8(bits: u32) -> Result<Vec<u8>, Error> {
    if !matches!(bits, 2048 | 3072 | 4096) {
        return Err(Error::UnsupportedSize(bits));
    }
    let rng = SystemRandom::new();
    let key = rsa::PrivateKey::new(&mut RingRng(&rng), bits as usize).map_err(|e| match e {
        rsa::Error::Rng => Error::Rng,
        other => Error::Invalid(other.to_string()),
    })?;
    let der = key.to_pkcs8_der().map_err(|e| Error::Invalid(format!("PKCS#8 encoding: {e}")))?;
    let der = der.as_bytes().to_vec();
    self_check(&der, bits, &rng)?;
    Ok(der)
}

/// ring's `SystemRandom` as the `rsa` crate's random source: the adapter only moves bytes.
struct RingRng<'a>(&'a SystemRandom);

impl rsa::rand_core::TryRng for RingRng<'_> {
    type Error = RngFailed;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0; 4];
        self.0.fill(&mut bytes).map_err(|_| RngFailed)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0; 8];
        self.0.fill(&mut bytes).map_err(|_| RngFailed)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst).map_err(|_| RngFailed)
    }
}

/// ring's `SystemRandom` failed.
#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
struct RngFailed;

/// ring's `SystemRandom` is the operating system's CSPRNG.
impl rsa::rand_core::TryCryptoRng for RingRng<'_> {}

/// Loads the key in ring, checks its size, and signs and verifies a fixed message with it.
fn self_check(der: &[u8], bits: u32, rng: &SystemRandom) -> Result<(), Error> {
    const MESSAGE: &[u8] = b"meshca RSA key self-check";
    let key = RsaKeyPair::from_pkcs8(der).map_err(|e| Error::Invalid(format!("ring rejected it: {e}")))?;
    if key.public().modulus_len() * 8 != bits as usize {
        return Err(Error::Invalid("modulus has the wrong size".to_string()));
    }
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, rng, MESSAGE, &mut signature)
        .map_err(|_| Error::Invalid("signing failed".to_string()))?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref())
        .verify(MESSAGE, &signature)
        .map_err(|_| Error::Invalid("its signature does not verify".to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    use x509_parser::prelude::FromDer;

    fn assert_loads_and_signs_in_ring(der: &[u8], bits: usize) {
        let key = RsaKeyPair::from_pkcs8(der).unwrap();
        assert_eq!(key.public().modulus_len(), bits / 8);
        let message = b"a message";
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut signature).unwrap();
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref());
        public.verify(message, &signature).unwrap();
        signature[10] ^= 1;
        assert!(public.verify(message, &signature).is_err());
    }

    /// e = 65537, two primes of half the size each, and the `rsa` crate's own validation
    /// (n = p·q, d·e ≡ 1) passes on the key read back from the DER.
    fn assert_well_formed(der: &[u8], bits: usize) {
        let key = rsa::PrivateKey::from_pkcs8_der(der).unwrap();
        key.validate().unwrap();
        assert_eq!(key.n().bit_width() as usize, bits);
        assert_eq!(key.e().to_be_bytes_trimmed_vartime().as_ref(), [1, 0, 1]);
        assert_eq!(key.primes().len(), 2);
        for p in key.primes() {
            assert_eq!(p.bit_width() as usize, bits / 2);
        }
    }

    #[test]
    fn a_generated_2048_bit_key_loads_in_ring_signs_and_is_well_formed() {
        let der = generate_pkcs8(2048).unwrap();
        assert_loads_and_signs_in_ring(&der, 2048);
        assert_well_formed(&der, 2048);
    }

    #[test]
    fn a_generated_3072_bit_key_loads_in_ring_signs_and_is_well_formed() {
        let der = generate_pkcs8(3072).unwrap();
        assert_loads_and_signs_in_ring(&der, 3072);
        assert_well_formed(&der, 3072);
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(generate_pkcs8(2048).unwrap(), generate_pkcs8(2048).unwrap());
    }

    #[test]
    fn unsupported_sizes_are_refused() {
        for bits in [0, 512, 1024, 2047, 2049, 8192] {
            assert!(matches!(generate_pkcs8(bits), Err(Error::UnsupportedSize(b)) if b == bits), "{bits}");
        }
    }

    #[test]
    fn a_key_of_the_wrong_size_fails_the_self_check() {
        let der = generate_pkcs8(2048).unwrap();
        assert!(matches!(self_check(&der, 3072, &SystemRandom::new()), Err(Error::Invalid(_))));
        self_check(&der, 2048, &SystemRandom::new()).unwrap();
    }

    #[test]
    fn rcgen_loads_a_generated_key_and_signs_a_csr_that_verifies() {
        let der = generate_pkcs8(2048).unwrap();
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(der),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let params = rcgen::CertificateParams::new(vec!["web.default.svc".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr.der()).unwrap();
        parsed.verify_signature().unwrap();
        assert_eq!(
            &*parsed.certification_request_info.subject_pki.subject_public_key.data,
            key.public_key_raw()
        );
    }
}
