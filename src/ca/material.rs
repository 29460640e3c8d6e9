//! Reading certificates and private keys from PEM files.
//!
//! Accepts what operators have: certificate chains in PEM; keys as PKCS#8
//! (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, as openssl and cert-manager write
//! them, wrapped here into PKCS#8 because ring loads only PKCS#8), with LF or CRLF
//! line endings and with or without UTF-8 byte-order marks (Windows editors and
//! PowerShell write one; see [`without_byte_order_marks`]). Key bytes never appear in
//! an error.

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

/// Reads one DER TLV: (tag, contents, rest). Definite lengths up to 4 bytes only;
/// `None` for anything else or when the input is shorter than the length says.
pub fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
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
}
