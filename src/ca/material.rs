//! Reading certificates and private keys from PEM files.
//!
//! Accepts what operators have: certificate chains in PEM; keys as PKCS#8
//! (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, as openssl and cert-manager write
//! them, wrapped here into PKCS#8 because ring loads only PKCS#8). Key bytes never
//! appear in an error.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Error;

/// Reads every certificate in a PEM file, in file order.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::BadCertificate { path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// Reads a private key and returns it as PKCS#8 DER.
pub fn read_pkcs8_key(path: &Path) -> Result<Vec<u8>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let bad = |reason: &str| Error::BadKey { path: path.into(), reason: reason.into() };
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| bad("no PEM private key found"))?;
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => sec1_to_pkcs8(k.secret_sec1_der())
            .ok_or_else(|| bad("EC PRIVATE KEY is not a P-256 or P-384 key")),
        PrivateKeyDer::Pkcs1(_) => {
            Err(bad("PKCS#1 RSA keys are not supported; convert with `openssl pkcs8 -topk8 -nocrypt`"))
        }
        _ => Err(bad("unsupported private key format")),
    }
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// Wraps a SEC1 `ECPrivateKey` into a PKCS#8 `PrivateKeyInfo` (RFC 5915, RFC 5208).
/// The curve is read from the private key's length (32 bytes: P-256, 48: P-384).
pub fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
    // ECPrivateKey ::= SEQUENCE { version INTEGER (1), privateKey OCTET STRING, ... }
    let (tag, body, _) = der_read(sec1)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _version, rest) = der_read(body)?;
    if tag != 0x02 {
        return None;
    }
    let (tag, private_key, _) = der_read(rest)?;
    if tag != 0x04 {
        return None;
    }
    let curve = match private_key.len() {
        32 => OID_P256,
        48 => OID_P384,
        _ => return None,
    };
    let algorithm = der(0x30, &[der(0x06, OID_EC_PUBLIC_KEY), der(0x06, curve)].concat());
    Some(der(0x30, &[der(0x02, &[0]), algorithm, der(0x04, sec1)].concat()))
}

/// Encodes one DER TLV.
pub fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Reads one DER TLV: (tag, contents, rest). Definite lengths up to 4 bytes only.
fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Wraps DER bytes as PEM with the given label, 64 columns per line.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec1_keys_are_wrapped_into_pkcs8_that_ring_loads() {
        let rng = ring::rand::SystemRandom::new();
        for (alg, sign) in [
            (&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, 32usize),
            (&ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING, 48usize),
        ] {
            let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            // Extract the SEC1 ECPrivateKey ring embedded in its PKCS#8 output.
            let (_, info, _) = der_read(pkcs8.as_ref()).unwrap();
            let (_, _, rest) = der_read(info).unwrap();
            let (_, _, rest) = der_read(rest).unwrap();
            let (_, sec1, _) = der_read(rest).unwrap();
            let wrapped = sec1_to_pkcs8(sec1).unwrap();
            ring::signature::EcdsaKeyPair::from_pkcs8(alg, &wrapped, &rng).unwrap();
            assert!(wrapped.len() > sign);
        }
        assert_eq!(sec1_to_pkcs8(b"garbage"), None);
        assert_eq!(sec1_to_pkcs8(&[]), None);
    }

    #[test]
    fn long_der_lengths_round_trip() {
        let content = vec![7u8; 300];
        let tlv = der(0x04, &content);
        assert_eq!(&tlv[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (tag, body, rest) = der_read(&tlv).unwrap();
        assert_eq!((tag, body.len(), rest.len()), (0x04, 300, 0));
    }
}
