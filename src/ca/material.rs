//! Reading certificates and private keys from PEM files.
//!
//! Accepts what operators have: certificate chains in PEM; keys as PKCS#8
//! (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, as openssl and cert-manager write
//! them, parsed and wrapped here into PKCS#8 with yasna because ring loads only
//! PKCS#8), with LF or CRLF line endings and with or without UTF-8 byte-order marks
//! (Windows editors and PowerShell write one; see [`without_byte_order_marks`]). Key
//! bytes never appear in an error.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Error;

/// Reads every certificate in a PEM file, in file order.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let certs = CertificateDer::pem_slice_iter(&without_byte_order_marks(&pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::BadCertificate { path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.into() });
    }
    // pem_slice_iter yields an empty DER for a block with nothing between its lines.
    if let Some(n) = certs.iter().position(|c| c.is_empty()) {
        let reason = format!("CERTIFICATE block {} of {} is empty", n + 1, certs.len());
        return Err(Error::BadCertificate { path: path.into(), reason });
    }
    Ok(certs)
}

/// The mode bits (unix) of the file at `path`, read through symlinks: a Kubernetes
/// Secret volume links `tls.key` to `..data/tls.key`, whose mode is the volume's
/// `defaultMode`. `None` on platforms without mode bits.
pub(crate) fn file_mode(path: &Path) -> Result<Option<u32>, Error> {
    let metadata = std::fs::metadata(path).map_err(|source| Error::Read { path: path.into(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(Some(metadata.permissions().mode() & 0o7777))
    }
    #[cfg(not(unix))]
    {
        let _ = metadata;
        Ok(None)
    }
}

/// Refuses a private key file that every user of the host may read (mode & 0o004).
/// Owner- and group-readable keys pass (Kubernetes mounts a Secret with `fsGroup` as
/// group owner). Windows has no mode bits: its ACLs are not inspected here.
pub(crate) fn check_not_world_readable(path: &Path) -> Result<(), Error> {
    match file_mode(path)? {
        Some(mode) if mode & 0o004 != 0 => Err(Error::KeyWorldReadable { path: path.into(), mode }),
        _ => Ok(()),
    }
}

/// Reads a private key and returns it as PKCS#8 DER.
pub fn read_pkcs8_key(path: &Path) -> Result<Vec<u8>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let bad = |reason: &str| Error::BadKey { path: path.into(), reason: reason.into() };
    let key = PrivateKeyDer::from_pem_slice(&without_byte_order_marks(&pem))
        .map_err(|_| bad("no PEM private key found"))?;
    match key {
        PrivateKeyDer::Pkcs8(k) if k.secret_pkcs8_der().is_empty() => {
            Err(bad("the PRIVATE KEY block is empty"))
        }
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => sec1_to_pkcs8(k.secret_sec1_der())
            .ok_or_else(|| bad("EC PRIVATE KEY is not a well-formed P-256 or P-384 key")),
        PrivateKeyDer::Pkcs1(_) => {
            Err(bad("PKCS#1 RSA keys are not supported; convert with `openssl pkcs8 -topk8 -nocrypt`"))
        }
        _ => Err(bad("unsupported private key format")),
    }
}

/// id-ecPublicKey (RFC 5480).
const OID_EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
/// secp256r1, P-256 (RFC 5480).
const OID_P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
/// secp384r1, P-384 (RFC 5480).
const OID_P384: &[u64] = &[1, 3, 132, 0, 34];

/// Wraps a SEC1 `ECPrivateKey` (RFC 5915) into a PKCS#8 `PrivateKeyInfo` (RFC 5208)
/// whose privateKey is the SEC1 encoding, unchanged.
///
/// The key is parsed as DER, strictly: version 1, the private key, then the optional
/// `[0]` parameters and `[1]` public key, nothing after. The curve is the `[0]` named
/// curve when present (P-256 or P-384), otherwise the one the private key's length
/// implies (32 bytes: P-256, 48: P-384). `None` for anything else: another version,
/// another curve, or a named curve whose private key has the other curve's length.
pub fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
    use yasna::models::ObjectIdentifier;
    use yasna::{ASN1Error, ASN1ErrorKind, Tag};

    // ECPrivateKey ::= SEQUENCE { version INTEGER (1), privateKey OCTET STRING,
    //   parameters [0] EXPLICIT ECParameters OPTIONAL, publicKey [1] EXPLICIT BIT STRING OPTIONAL }
    let (private_key_len, named_curve) = yasna::parse_der(sec1, |r| {
        r.read_sequence(|r| {
            if r.next().read_u8()? != 1 {
                return Err(ASN1Error::new(ASN1ErrorKind::Invalid));
            }
            let private_key_len = r.next().read_bytes()?.len();
            // ECParameters is a CHOICE; of its alternatives only namedCurve is read.
            let named_curve = r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_oid()))?;
            r.read_optional(|r| r.read_tagged(Tag::context(1), |r| r.read_bitvec_bytes()))?;
            Ok((private_key_len, named_curve))
        })
    })
    .ok()?;
    let by_length = match private_key_len {
        32 => OID_P256,
        48 => OID_P384,
        _ => return None,
    };
    if named_curve.is_some_and(|oid| oid.components().as_slice() != by_length) {
        return None;
    }
    let curve = ObjectIdentifier::from_slice(by_length);
    Some(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u8(0);
            w.next().write_sequence(|w| {
                w.next().write_oid(&ObjectIdentifier::from_slice(OID_EC_PUBLIC_KEY));
                w.next().write_oid(&curve);
            });
            w.next().write_bytes(sec1);
        })
    }))
}

/// UTF-8 byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `pem` without the byte-order marks that begin a line. A BOM before `-----BEGIN`
/// would make the PEM parser skip that whole section: an error for a one-certificate
/// file, but a certificate silently missing from a bundle (the first, or the first of
/// each file concatenated into it). No PEM line holds U+FEFF otherwise.
pub(crate) fn without_byte_order_marks(pem: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !pem.windows(BOM.len()).any(|w| w == BOM) {
        return pem.into();
    }
    let mut out = Vec::with_capacity(pem.len());
    let mut rest = pem;
    let mut line_start = true;
    while let Some((&b, tail)) = rest.split_first() {
        if line_start && rest.starts_with(BOM) {
            rest = &rest[BOM.len()..];
            continue;
        }
        out.push(b);
        line_start = b == b'\n' || b == b'\r';
        rest = tail;
    }
    out.into()
}

/// The DER of the one `CERTIFICATE REQUEST` (or certreq's `NEW CERTIFICATE REQUEST`)
/// block in `pem`, whatever else the text holds; CRLF line ends are fine (strip a
/// byte-order mark first: [`without_byte_order_marks`]).
pub(crate) fn csr_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let text = std::str::from_utf8(pem).map_err(|_| "the PEM file is not UTF-8 text".to_owned())?;
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end {
                closed = true;
                break;
            }
            body.push_str(line);
        }
        if !closed {
            return Err(format!("the PEM block {label:?} has no END line"));
        }
        if label == "CERTIFICATE REQUEST" || label == "NEW CERTIFICATE REQUEST" {
            blocks.push(body);
        }
    }
    match blocks.as_slice() {
        [body] => base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("the PEM block is not base64: {e}")),
        [] => Err("no CERTIFICATE REQUEST (or NEW CERTIFICATE REQUEST) PEM block".into()),
        _ => Err(format!("{} certificate requests in one file; give one", blocks.len())),
    }
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

    #[cfg(unix)]
    #[test]
    fn keys_readable_by_others_are_refused_through_symlinks_and_owner_or_group_ones_pass() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "k").unwrap();
        let link = dir.path().join("tls.key");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let modes = [(0o600, false), (0o400, false), (0o640, false), (0o440, false)];
        let world = [(0o644, true), (0o604, true), (0o666, true), (0o444, true)];
        for (mode, refused) in modes.into_iter().chain(world) {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            match check_not_world_readable(&link) {
                Ok(()) => assert!(!refused, "{mode:o} passed"),
                Err(e) => {
                    assert!(refused, "{mode:o}: {e}");
                    let message = e.to_string();
                    assert!(message.contains(&format!("(mode {mode:04o})")), "{message}");
                    assert!(message.contains(&format!("chmod 600 {}", link.display())), "{message}");
                    assert!(message.contains("--allow-world-readable-issuer-key"), "{message}");
                }
            }
        }
        assert!(matches!(check_not_world_readable(&dir.path().join("absent")), Err(Error::Read { .. })));
    }

    /// The SEC1 `ECPrivateKey` ring puts in the PKCS#8 it generates (no `[0]`
    /// parameters; the `[1]` public key, which ring requires).
    fn ring_sec1(alg: &'static ring::signature::EcdsaSigningAlgorithm) -> Vec<u8> {
        let pkcs8 =
            ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &ring::rand::SystemRandom::new()).unwrap();
        yasna::parse_der(pkcs8.as_ref(), |r| {
            r.read_sequence(|r| {
                r.next().read_u8()?;
                r.next().read_der()?;
                r.next().read_bytes()
            })
        })
        .unwrap()
    }

    /// `ECPrivateKey` of the given version, private key, `[0]` named curve (its arcs) and
    /// `[1]` public key: as openssl writes it with a curve, as ring does without.
    fn sec1(version: u8, private_key: &[u8], curve: Option<&[u64]>, public_key: &[u8]) -> Vec<u8> {
        yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_u8(version);
                w.next().write_bytes(private_key);
                if let Some(curve) = curve {
                    w.next().write_tagged(yasna::Tag::context(0), |w| {
                        w.write_oid(&yasna::models::ObjectIdentifier::from_slice(curve))
                    });
                }
                w.next().write_tagged(yasna::Tag::context(1), |w| {
                    w.write_bitvec_bytes(public_key, public_key.len() * 8)
                });
            })
        })
    }

    /// The parts of a `ring_sec1` key: (private key, public key).
    fn sec1_parts(sec1: &[u8]) -> (Vec<u8>, Vec<u8>) {
        yasna::parse_der(sec1, |r| {
            r.read_sequence(|r| {
                r.next().read_u8()?;
                let private_key = r.next().read_bytes()?;
                let public_key = r.next().read_tagged(yasna::Tag::context(1), |r| r.read_bitvec_bytes())?.0;
                Ok((private_key, public_key))
            })
        })
        .unwrap()
    }

    /// The curve OID of the AlgorithmIdentifier of a PKCS#8 `PrivateKeyInfo`.
    fn pkcs8_curve(pkcs8: &[u8]) -> Vec<u64> {
        yasna::parse_der(pkcs8, |r| {
            r.read_sequence(|r| {
                r.next().read_u8()?;
                let curve = r.next().read_sequence(|r| {
                    r.next().read_oid()?;
                    r.next().read_oid()
                })?;
                r.next().read_bytes()?;
                Ok(curve.components().clone())
            })
        })
        .unwrap()
    }

    #[test]
    fn sec1_keys_are_wrapped_into_pkcs8_that_ring_loads() {
        let rng = ring::rand::SystemRandom::new();
        for (alg, curve) in [
            (&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, OID_P256),
            (&ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING, OID_P384),
        ] {
            let sec1 = ring_sec1(alg);
            let wrapped = sec1_to_pkcs8(&sec1).unwrap();
            ring::signature::EcdsaKeyPair::from_pkcs8(alg, &wrapped, &rng).unwrap();
            assert_eq!(pkcs8_curve(&wrapped), curve);
            assert!(wrapped.ends_with(&sec1), "the SEC1 key is wrapped whole");
        }
        assert_eq!(sec1_to_pkcs8(b"garbage"), None);
        assert_eq!(sec1_to_pkcs8(&[]), None);
    }

    #[test]
    fn a_p384_sec1_key_naming_its_curve_is_wrapped_as_p384_that_ring_loads() {
        let alg = &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING;
        let (private_key, public_key) = sec1_parts(&ring_sec1(alg));
        let named = sec1(1, &private_key, Some(OID_P384), &public_key);
        let wrapped = sec1_to_pkcs8(&named).unwrap();
        assert_eq!(pkcs8_curve(&wrapped), OID_P384);
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &wrapped, &ring::rand::SystemRandom::new());
        assert_eq!(
            ring::signature::KeyPair::public_key(&key.unwrap()).as_ref(),
            public_key.as_slice(),
            "the same key"
        );
    }

    #[test]
    fn sec1_keys_of_another_version_or_a_mismatched_or_unknown_curve_are_refused() {
        let (p256, p256_public) = sec1_parts(&ring_sec1(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING));
        let (p384, p384_public) = sec1_parts(&ring_sec1(&ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING));
        assert!(sec1_to_pkcs8(&sec1(1, &p256, Some(OID_P256), &p256_public)).is_some());
        assert!(sec1_to_pkcs8(&sec1(1, &p256, None, &p256_public)).is_some());
        let secp256k1: &[u64] = &[1, 3, 132, 0, 10];
        for (case, key) in [
            ("version 0", sec1(0, &p256, None, &p256_public)),
            ("version 2", sec1(2, &p384, Some(OID_P384), &p384_public)),
            ("P-256 named, 48-byte key", sec1(1, &p384, Some(OID_P256), &p384_public)),
            ("P-384 named, 32-byte key", sec1(1, &p256, Some(OID_P384), &p256_public)),
            ("secp256k1", sec1(1, &p256, Some(secp256k1), &p256_public)),
            ("31-byte key", sec1(1, &p256[1..], None, &p256_public)),
            ("trailing bytes", [sec1(1, &p256, None, &p256_public), vec![0x05, 0x00]].concat()),
        ] {
            assert_eq!(sec1_to_pkcs8(&key), None, "{case}");
        }
    }

    /// Found with the `pem` fuzz target (fuzz/README.md): a byte-order mark before
    /// `-----BEGIN` made the parser skip that section, so a bundle saved by a Windows
    /// editor, or concatenated from such files, silently lost a certificate.
    #[test]
    fn byte_order_marks_at_line_starts_hide_no_certificate_and_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let certs: Vec<_> = ["a.example", "b.example"]
            .map(|name| rcgen::CertificateParams::new(vec![name.into()]).unwrap().self_signed(&key).unwrap())
            .into();
        let ders: Vec<_> = certs.iter().map(|c| c.der().to_vec()).collect();
        let (a, b) = (certs[0].pem(), certs[1].pem());
        let bom = "\u{feff}";
        for text in [
            format!("{a}{b}"),
            format!("{bom}{a}{b}"),
            format!("{bom}{a}{bom}{b}"),
            format!("{bom}{a}{b}").replace('\n', "\r\n"),
            format!("{bom}{bom}{a}{b}"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let read: Vec<_> = read_certificates(&path).unwrap().iter().map(|c| c.to_vec()).collect();
            assert!(read == ders, "{} of the 2 certificates read from {text:?}", read.len());
        }
        // Anywhere else a BOM is still not base64: refused, not skipped.
        std::fs::write(&path, a.replacen("\nMII", &format!("\nMI{bom}I"), 1)).unwrap();
        assert!(matches!(read_certificates(&path), Err(Error::BadCertificate { .. })));

        let pem = key.serialize_pem();
        std::fs::write(&path, format!("{bom}{pem}")).unwrap();
        assert_eq!(read_pkcs8_key(&path).unwrap(), key.serialize_der());
    }

    /// A PEM block with nothing between its BEGIN and END lines decodes to zero bytes;
    /// it is refused by name, not handed on as a certificate or key of length 0.
    #[test]
    fn empty_pem_blocks_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".into()]).unwrap().self_signed(&key).unwrap();
        let empty = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
        for (text, which) in [(empty.to_owned(), "1 of 1"), (format!("{}{empty}", cert.pem()), "2 of 2")] {
            std::fs::write(&path, &text).unwrap();
            match read_certificates(&path) {
                Err(Error::BadCertificate { reason, .. }) => {
                    assert_eq!(reason, format!("CERTIFICATE block {which} is empty"));
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\r\n-----END PRIVATE KEY-----\r\n").unwrap();
        match read_pkcs8_key(&path) {
            Err(Error::BadKey { reason, .. }) => assert_eq!(reason, "the PRIVATE KEY block is empty"),
            other => panic!("{:?}", other.map(|k| k.len())),
        }
    }
}
