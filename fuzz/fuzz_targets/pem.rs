//! The loaders of operator-supplied material on arbitrary bytes: certificate bundles
//! and issuer keys (`ca::material`, read from a file as meshca reads them), SEC1 →
//! PKCS#8 wrapping, trust anchors from DER, the development key PEM, JWKS JSON and
//! token trimming.
//!
//! Invariants: line endings do not matter (LF, CRLF or a mix load the same
//! certificates and keys, or fail alike), nor do UTF-8 byte-order marks at the start
//! of lines (a Windows editor's, or several from concatenated files); trailing CR/LF
//! after a token is trimmed and changes nothing; a SEC1 key is wrapped whole; a JWKS
//! that loads holds a key; no certificate or key loads as zero bytes (an empty PEM
//! block is refused).
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshca::auth::dev::DevSigner;
use meshca::auth::jwt::Jwks;
use meshca::auth::MAX_TOKEN_LEN;
use meshca::ca::issuer::TrustAnchors;
use meshca::ca::material::{read_certificates, read_pkcs8_key, sec1_to_pkcs8};
use rustls_pki_types::CertificateDer;

static PATH: LazyLock<PathBuf> = LazyLock::new(|| meshca_fuzz::scratch_dir().join("input.pem"));

/// CRLF → LF.
fn lf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for (i, &b) in data.iter().enumerate() {
        if !(b == b'\r' && data.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

/// Every LF not already preceded by CR → CRLF.
fn crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' && (i == 0 || data[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// A UTF-8 byte-order mark at the start of every line.
fn with_boms(data: &[u8]) -> Vec<u8> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let mut out = Vec::with_capacity(data.len() + 3 * (1 + data.len() / 32));
    out.extend_from_slice(BOM);
    for &b in data {
        out.push(b);
        if b == b'\n' || b == b'\r' {
            out.extend_from_slice(BOM);
        }
    }
    out
}

type Loaded = (Option<Vec<Vec<u8>>>, Option<Vec<u8>>);

/// Certificates and key as meshca reads them from a file holding `data`.
fn load(data: &[u8]) -> Loaded {
    std::fs::write(&*PATH, data).expect("write scratch file");
    let certs = read_certificates(&PATH).ok().map(|certs| {
        for c in &certs {
            assert!(!c.is_empty());
        }
        certs.iter().map(|c| c.to_vec()).collect()
    });
    let key = read_pkcs8_key(&PATH).ok();
    assert!(key.as_ref().is_none_or(|k| !k.is_empty()));
    (certs, key)
}

fuzz_target!(|data: &[u8]| {
    let loaded = load(data);
    if let Some(certs) = &loaded.0 {
        let certs = certs.iter().map(|c| CertificateDer::from(c.clone())).collect();
        let _ = TrustAnchors::from_certs(certs, &PATH);
    }
    assert_eq!(load(&lf(data)), loaded, "CRLF → LF changed what loads");
    assert_eq!(load(&crlf(data)), loaded, "LF → CRLF changed what loads");
    assert_eq!(load(&with_boms(data)), loaded, "byte-order marks changed what loads");

    // DER given where a trust anchor is expected.
    let _ = TrustAnchors::from_certs(vec![CertificateDer::from(data.to_vec())], &PATH);

    if let Some(pkcs8) = sec1_to_pkcs8(data) {
        assert!(pkcs8.ends_with(data), "SEC1 key not wrapped whole");
    }

    if let Ok(text) = std::str::from_utf8(data) {
        let kid = DevSigner::from_pem(text).ok().map(|s| s.kid().to_owned());
        let crlf_text = String::from_utf8(crlf(data)).expect("still UTF-8");
        assert_eq!(DevSigner::from_pem(&crlf_text).ok().map(|s| s.kid().to_owned()), kid, "dev key PEM");
    }

    let jwks = Jwks::from_json(data).ok().map(|j| j.key_count());
    if let Some(n) = jwks {
        assert!(n >= 1);
    }
    assert_eq!(Jwks::from_json(&crlf(data)).ok().map(|j| j.key_count()), jwks, "JWKS line endings");

    let token = meshca::auth::trimmed(data);
    if let Ok(t) = token {
        assert!(!t.is_empty() && !t[0].is_ascii_whitespace() && !t[t.len() - 1].is_ascii_whitespace());
    }
    if data.len() + 2 <= MAX_TOKEN_LEN {
        let newline = [data, b"\r\n"].concat();
        assert_eq!(meshca::auth::trimmed(&newline).ok(), token.ok(), "trailing CRLF after a token");
    }
});
