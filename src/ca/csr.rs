//! Checking of PKCS#10 certification requests sent by proxies.
//!
//! This module owns everything about the CSR itself: parsing the DER request
//! (strictly: one DER structure, nothing after it, version v1), finding the key
//! type from the SubjectPublicKeyInfo (never from the signature algorithm),
//! enforcing the [`KeyPolicy`], verifying the self-signature with `ring`, and
//! checking that the request names the caller's identity and nothing else. It
//! does not decide who the caller is (auth/identity supplies [`Expected`]), what
//! the leaf looks like (ca::profile) or how it is signed (ca::issuer).
//!
//! Policy: nothing but the public key is taken from a CSR. The names, extensions
//! and attributes are only checked so that a request for something else fails
//! loudly; the leaf is always built from our own template around
//! [`CheckedCsr::spki_der`].
//!
//! Requests made by Windows `certreq.exe` are accepted as they come: its attributes
//! (OS version, client information, enrollment CSP) are ignored, and so are the
//! certificate-template and key-identifier extensions it asks for. Extensions may be
//! requested in PKCS#9's extensionRequest or in Microsoft's legacy extension-request
//! attribute (1.3.6.1.4.1.311.2.1.14); both are checked alike, so no name can hide
//! in the second.

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::asn1_rs::Tag;
use x509_parser::certification_request::{X509CertificationRequest, X509CertificationRequestInfo};
use x509_parser::cri_attributes::{ExtensionRequest, ParsedCriAttribute};
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{OID_PKCS9_EMAIL_ADDRESS, OID_X509_COMMON_NAME};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// Largest CSR accepted, in bytes (an RSA-4096 request is well under 2 KiB).
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Key type of a checked request, taken from its SubjectPublicKeyInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    P256,
    P384,
    Rsa { bits: u32 },
}

impl KeyType {
    /// Short label for audit records: "p256", "p384", "rsa2048".
    pub fn label(&self) -> String {
        match self {
            KeyType::P256 => "p256".to_string(),
            KeyType::P384 => "p384".to_string(),
            KeyType::Rsa { bits } => format!("rsa{bits}"),
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// Which keys a CSR may carry. Default: P-256, P-384, RSA 2048..=4096.
///
/// RSA bounds are further limited to what `ring` verifies (2048..=8192 bits):
/// a smaller minimum or a larger maximum has no effect.
#[derive(Clone, Debug)]
pub struct KeyPolicy {
    pub allow_p256: bool,
    pub allow_p384: bool,
    /// Smallest RSA modulus in bits; `None` refuses RSA keys.
    pub rsa_min_bits: Option<u32>,
    pub rsa_max_bits: u32,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy { allow_p256: true, allow_p384: true, rsa_min_bits: Some(2048), rsa_max_bits: 4096 }
    }
}

/// What the request may name: the names the leaf will certify ([`Names`]), the
/// DNS name (when the naming policy has one) as CN or DNS SAN and the SPIFFE ID as
/// URI SAN. Comparison is byte-exact.
pub type Expected<'a> = super::profile::Names<'a>;

/// A CSR that passed every check.
#[derive(Clone, Debug)]
pub struct CheckedCsr {
    pub key_type: KeyType,
    /// The SubjectPublicKeyInfo exactly as in the CSR (DER).
    pub spki_der: Vec<u8>,
}

/// Why a CSR was refused. Messages never include the CSR's bytes; a requested
/// name appears only when it is printable ASCII, truncated to 253 characters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is longer than [`MAX_CSR_LEN`].
    #[error("CSR is {len} bytes, over the {max}-byte limit; send a DER PKCS#10 request carrying only the key and identity")]
    TooLarge { len: usize, max: usize },
    /// The request has no bytes at all.
    #[error("CSR is empty; send a DER-encoded PKCS#10 certification request")]
    Empty,
    /// Not a DER PKCS#10 request: bad structure, bytes after it, version other
    /// than v1, duplicate or unparsable extensions, critical unknown extensions.
    #[error("CSR is malformed ({reason}); send a single DER-encoded PKCS#10 request (not PEM)")]
    Malformed { reason: String },
    /// The key algorithm or curve is not supported (Ed25519, P-521, DSA, ...),
    /// or the key type is disabled by policy.
    #[error("CSR key is not accepted ({what}); use a key type this CA allows (by default ECDSA P-256/P-384 or RSA 2048-4096 bits)")]
    UnsupportedKey { what: String },
    /// The RSA modulus is shorter than the policy minimum.
    #[error("CSR RSA key has {bits} bits, below the minimum of {min}; generate a larger key")]
    WeakKey { bits: u32, min: u32 },
    /// The RSA modulus is longer than the policy maximum.
    #[error("CSR RSA key has {bits} bits, above the maximum of {max}; generate a smaller key or use ECDSA")]
    KeyTooLarge { bits: u32, max: u32 },
    /// The key is structurally invalid: EC point not uncompressed or of the
    /// wrong length, RSA modulus even, exponent even or outside 3..2^33.
    #[error("CSR public key is invalid ({reason}); generate a fresh key pair")]
    InvalidKey { reason: String },
    /// The signature algorithm is not ECDSA SHA-256/384 for an EC key or
    /// PKCS#1 v1.5 SHA-256/384/512 for an RSA key (RSA-PSS, SHA-1 and
    /// mismatched key/algorithm pairs included).
    #[error("CSR signature algorithm is not accepted ({what}); sign with ECDSA SHA-256/SHA-384 (EC keys) or PKCS#1 v1.5 SHA-256/384/512 (RSA keys)")]
    UnsupportedSignatureAlgorithm { what: String },
    /// The self-signature does not verify with the CSR's own public key.
    #[error("CSR signature does not verify with the key it carries; the request was altered or signed with another key")]
    BadSignature,
    /// The request names something other than the caller's identity: a CN or
    /// DNS SAN other than the DNS name, a URI SAN other than the SPIFFE ID, an
    /// emailAddress in the subject, or an IP/email/other SAN.
    #[error("CSR requests a name the caller may not have ({what}); request only the caller's own identity, or no names")]
    NameNotAllowed { what: String },
    /// basicConstraints asks for CA:TRUE or carries a pathLenConstraint.
    #[error("CSR asks for a CA certificate (basicConstraints); leaf requests must not ask for CA rights")]
    CaRequested,
}

impl Error {
    /// Stable snake_case reason code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::TooLarge { .. } => "csr_too_large",
            Error::Empty => "csr_empty",
            Error::Malformed { .. } => "csr_malformed",
            Error::UnsupportedKey { .. } => "csr_unsupported_key",
            Error::WeakKey { .. } => "csr_weak_key",
            Error::KeyTooLarge { .. } => "csr_key_too_large",
            Error::InvalidKey { .. } => "csr_invalid_key",
            Error::UnsupportedSignatureAlgorithm { .. } => "csr_unsupported_signature_algorithm",
            Error::BadSignature => "csr_bad_signature",
            Error::NameNotAllowed { .. } => "csr_name_not_allowed",
            Error::CaRequested => "csr_ca_requested",
        }
    }

    /// True when the request is well-formed but asks for more than the caller
    /// may have (PermissionDenied); false for bad input (InvalidArgument).
    pub(crate) fn is_permission(&self) -> bool {
        matches!(self, Error::NameNotAllowed { .. } | Error::CaRequested)
    }
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed { reason: reason.into() }
}
fn invalid_key(reason: &str) -> Error {
    Error::InvalidKey { reason: reason.to_string() }
}
fn unsupported_key(what: impl Into<String>) -> Error {
    Error::UnsupportedKey { what: what.into() }
}
fn unsupported_sig(what: impl Into<String>) -> Error {
    Error::UnsupportedSignatureAlgorithm { what: what.into() }
}

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_ATTRIBUTES: u8 = 0xa0;
const DER_NULL: &[u8] = &[0x05, 0x00];

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const OID_SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const OID_SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const OID_SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];
const OID_DSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01];
/// Microsoft's legacy extension-request attribute (szOID_CERT_EXTENSIONS), 1.3.6.1.4.1.311.2.1.14.
const OID_MS_CERT_EXTENSIONS: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x01, 0x0e];
/// ring verifies RSA PKCS#1 signatures for moduli of 2048..=8192 bits only.
const RING_RSA_BITS: (u32, u32) = (2048, 8192);

/// (contents, whole TLV, rest of the input).
type Tlv<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// Reads one DER TLV with the given single-byte tag (definite, minimal length).
fn read_tlv(input: &[u8], tag: u8) -> Result<Tlv<'_>, Error> {
    let bad = |what: &str| malformed(format!("invalid DER {what}"));
    match input.first() {
        Some(&t) if t == tag => {}
        Some(_) => return Err(bad("tag")),
        None => return Err(bad("structure (truncated)")),
    }
    let first = *input.get(1).ok_or_else(|| bad("length (truncated)"))?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 {
            return Err(bad("length"));
        }
        let bytes = input.get(2..2 + n).ok_or_else(|| bad("length (truncated)"))?;
        if bytes[0] == 0 {
            return Err(bad("length (not minimal)"));
        }
        let len = bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if len < 0x80 {
            return Err(bad("length (not minimal)"));
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len).ok_or_else(|| bad("length"))?;
    let tlv = input.get(..end).ok_or_else(|| bad("structure (truncated)"))?;
    Ok((&tlv[header..], tlv, &input[end..]))
}

/// Requires `input` to be exactly one TLV with the given tag; returns its contents.
fn read_only(input: &[u8], tag: u8) -> Result<&[u8], Error> {
    let (contents, _, rest) = read_tlv(input, tag)?;
    if !rest.is_empty() {
        return Err(malformed("unexpected bytes after a DER value"));
    }
    Ok(contents)
}

/// Requires `input` to be exactly one TLV of any single-byte tag.
fn single_value(input: &[u8]) -> Result<(), Error> {
    let tag = *input.first().ok_or_else(|| malformed("empty DER value"))?;
    read_only(input, tag).map(|_| ())
}

/// The pieces of a CertificationRequest, located by a strict DER walk.
struct Frame<'a> {
    info: &'a [u8],
    /// Contents of the `[0]` attributes field.
    attributes: &'a [u8],
    spki: &'a [u8],
    key_alg: &'a [u8],
    key_params: &'a [u8],
    key_bits: &'a [u8],
    sig_alg: &'a [u8],
    sig_params: &'a [u8],
    signature: &'a [u8],
}

impl<'a> Frame<'a> {
    fn parse(der: &'a [u8]) -> Result<Self, Error> {
        let outer = read_only(der, TAG_SEQUENCE)?;
        let (info_body, info, rest) = read_tlv(outer, TAG_SEQUENCE)?;
        let (sig_alg_body, _, rest) = read_tlv(rest, TAG_SEQUENCE)?;
        let signature = bit_string_bytes(read_only(rest, TAG_BIT_STRING)?)?;

        let (version, _, rest) = read_tlv(info_body, TAG_INTEGER)?;
        if version != [0] {
            return Err(malformed("version is not v1"));
        }
        let (_subject, _, rest) = read_tlv(rest, TAG_SEQUENCE)?;
        let (spki_body, spki, rest) = read_tlv(rest, TAG_SEQUENCE)?;
        let attributes = read_only(rest, TAG_ATTRIBUTES)?;

        let (key_alg_body, _, rest) = read_tlv(spki_body, TAG_SEQUENCE)?;
        let key_bits = bit_string_bytes(read_only(rest, TAG_BIT_STRING)?)?;
        let (key_alg, _, key_params) = read_tlv(key_alg_body, TAG_OID)?;
        let (sig_alg, _, sig_params) = read_tlv(sig_alg_body, TAG_OID)?;
        Ok(Frame { info, attributes, spki, key_alg, key_params, key_bits, sig_alg, sig_params, signature })
    }
}

/// BIT STRING contents without the unused-bits byte, which must be zero.
fn bit_string_bytes(contents: &[u8]) -> Result<&[u8], Error> {
    match contents.split_first() {
        Some((0, bytes)) => Ok(bytes),
        _ => Err(malformed("BIT STRING is not byte-aligned")),
    }
}

/// Dotted form of an OID for messages; digits and dots only.
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &b in oid.iter().take(64) {
        if value > u64::MAX >> 7 {
            return "invalid OID".to_string();
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(value);
            value = 0;
        }
    }
    let Some((&first, rest)) = arcs.split_first() else { return "invalid OID".to_string() };
    let (a, b) = if first < 40 {
        (0, first)
    } else if first < 80 {
        (1, first - 40)
    } else {
        (2, first - 80)
    };
    let mut out = format!("{a}.{b}");
    for arc in rest {
        out.push_str(&format!(".{arc}"));
    }
    out
}

/// `kind`, plus the requested name when it is printable ASCII (at most 253 chars).
fn describe(kind: &str, value: &[u8]) -> String {
    if value.is_empty() || !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return kind.to_string();
    }
    let shown: String = value.iter().take(253).map(|&b| char::from(b)).collect();
    format!("{kind} {shown:?}")
}

/// Positive DER INTEGER contents to big-endian magnitude without leading zeros.
fn positive_integer(contents: &[u8]) -> Result<&[u8], Error> {
    match contents {
        [] => Err(invalid_key("empty INTEGER in RSA key")),
        [first, ..] if first & 0x80 != 0 => Err(invalid_key("negative INTEGER in RSA key")),
        [0, second, ..] if second & 0x80 == 0 => Err(invalid_key("non-minimal INTEGER in RSA key")),
        [0] => Err(invalid_key("zero INTEGER in RSA key")),
        [0, rest @ ..] => Ok(rest),
        _ => Ok(contents),
    }
}

/// Key type from the SubjectPublicKeyInfo, with policy applied.
fn key_type(frame: &Frame<'_>, policy: &KeyPolicy) -> Result<KeyType, Error> {
    let alg = frame.key_alg;
    if alg == OID_EC_PUBLIC_KEY {
        let curve = read_only(frame.key_params, TAG_OID)
            .map_err(|_| unsupported_key("EC key without a named curve"))?;
        let (key_type, len, allowed) = if curve == OID_P256 {
            (KeyType::P256, 65, policy.allow_p256)
        } else if curve == OID_P384 {
            (KeyType::P384, 97, policy.allow_p384)
        } else if curve == OID_P521 {
            return Err(unsupported_key("EC curve P-521"));
        } else {
            return Err(unsupported_key(format!("EC curve {}", dotted(curve))));
        };
        if !allowed {
            return Err(unsupported_key(format!("{key_type} keys are disabled by policy")));
        }
        let point = frame.key_bits;
        if point.first() != Some(&0x04) {
            return Err(invalid_key("EC point is not in uncompressed form"));
        }
        if point.len() != len {
            return Err(invalid_key("EC point has the wrong length for its curve"));
        }
        return Ok(key_type);
    }
    if alg == OID_RSA {
        if !frame.key_params.is_empty() && frame.key_params != DER_NULL {
            return Err(invalid_key("rsaEncryption parameters are not NULL"));
        }
        let Some(min) = policy.rsa_min_bits else {
            return Err(unsupported_key("RSA keys are disabled by policy"));
        };
        let not_rsa = |_| invalid_key("RSA key is not a DER RSAPublicKey");
        let body = read_only(frame.key_bits, TAG_SEQUENCE).map_err(not_rsa)?;
        let (n, _, rest) = read_tlv(body, TAG_INTEGER).map_err(not_rsa)?;
        let e = read_only(rest, TAG_INTEGER).map_err(not_rsa)?;
        let (n, e) = (positive_integer(n)?, positive_integer(e)?);
        let lead = n.first().copied().unwrap_or(0);
        let bits = u32::try_from(n.len() * 8)
            .map_err(|_| invalid_key("RSA modulus too long"))?
            .saturating_sub(lead.leading_zeros());
        if n.last().is_some_and(|b| b & 1 == 0) {
            return Err(invalid_key("RSA modulus is even"));
        }
        if e.len() > 5 {
            return Err(invalid_key("RSA exponent is too large"));
        }
        let e = e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        if !(3..(1 << 33)).contains(&e) || e & 1 == 0 {
            return Err(invalid_key("RSA exponent must be odd and in 3..2^33"));
        }
        let min = min.max(RING_RSA_BITS.0);
        let max = policy.rsa_max_bits.min(RING_RSA_BITS.1);
        if bits < min {
            return Err(Error::WeakKey { bits, min });
        }
        if bits > max {
            return Err(Error::KeyTooLarge { bits, max });
        }
        return Ok(KeyType::Rsa { bits });
    }
    Err(unsupported_key(match alg {
        OID_ED25519 => "Ed25519".to_string(),
        OID_ED448 => "Ed448".to_string(),
        OID_DSA => "DSA".to_string(),
        OID_RSA_PSS => "RSA-PSS key".to_string(),
        other => format!("key algorithm {}", dotted(other)),
    }))
}

/// The ring algorithm for a (key type, signature algorithm) pair.
fn verification_alg(key: KeyType, frame: &Frame<'_>) -> Result<&'static dyn VerificationAlgorithm, Error> {
    let (oid, params) = (frame.sig_alg, frame.sig_params);
    let ecdsa = oid == OID_ECDSA_SHA256 || oid == OID_ECDSA_SHA384;
    let rsa = oid == OID_SHA256_RSA || oid == OID_SHA384_RSA || oid == OID_SHA512_RSA;
    if (ecdsa && !params.is_empty()) || (rsa && !params.is_empty() && params != DER_NULL) {
        return Err(unsupported_sig(format!("{} with unexpected parameters", dotted(oid))));
    }
    Ok(match key {
        KeyType::P256 if oid == OID_ECDSA_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::P256 if oid == OID_ECDSA_SHA384 => &signature::ECDSA_P256_SHA384_ASN1,
        KeyType::P384 if oid == OID_ECDSA_SHA256 => &signature::ECDSA_P384_SHA256_ASN1,
        KeyType::P384 if oid == OID_ECDSA_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa { .. } if oid == OID_SHA256_RSA => &signature::RSA_PKCS1_2048_8192_SHA256,
        KeyType::Rsa { .. } if oid == OID_SHA384_RSA => &signature::RSA_PKCS1_2048_8192_SHA384,
        KeyType::Rsa { .. } if oid == OID_SHA512_RSA => &signature::RSA_PKCS1_2048_8192_SHA512,
        _ if oid == OID_RSA_PSS => return Err(unsupported_sig("RSA-PSS")),
        _ if ecdsa || rsa => return Err(unsupported_sig(format!("{} with a {key} key", dotted(oid)))),
        _ => return Err(unsupported_sig(dotted(oid))),
    })
}

/// The key type a request declares, from a structural walk alone (no signature
/// check): what admission control charges for before the real [`check`]. `None`
/// when the request is too malformed to say; [`check`] then refuses it.
pub(crate) fn peek_key_type(der: &[u8], policy: &KeyPolicy) -> Option<KeyType> {
    if der.is_empty() || der.len() > MAX_CSR_LEN {
        return None;
    }
    key_type(&Frame::parse(der).ok()?, policy).ok()
}

/// Checks a DER PKCS#10 request against the key policy and the caller's
/// identity; on success returns the key type and the SubjectPublicKeyInfo.
pub fn check(der: &[u8], expected: &Expected<'_>, policy: &KeyPolicy) -> Result<CheckedCsr, Error> {
    if der.is_empty() {
        return Err(Error::Empty);
    }
    if der.len() > MAX_CSR_LEN {
        return Err(Error::TooLarge { len: der.len(), max: MAX_CSR_LEN });
    }
    let (rest, req) = X509CertificationRequest::from_der(der)
        .map_err(|_| malformed("not a DER PKCS#10 CertificationRequest"))?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes after the request"));
    }
    let frame = Frame::parse(der)?;
    let info = &req.certification_request_info;
    // x509-parser ignores unparsed bytes at the end of a SEQUENCE; the strict
    // walk must agree with it on what was signed.
    if info.raw != frame.info || info.version.0 != 0 {
        return Err(malformed("certificationRequestInfo has unexpected contents"));
    }

    let key_type = key_type(&frame, policy)?;
    let alg = verification_alg(key_type, &frame)?;
    UnparsedPublicKey::new(alg, frame.key_bits)
        .verify(frame.info, frame.signature)
        .map_err(|_| Error::BadSignature)?;

    let extensions = requested_extensions(info, frame.attributes)?;
    check_subject(&info.subject, expected)?;
    for ext in &extensions {
        check_extension(ext, expected)?;
    }
    Ok(CheckedCsr { key_type, spki_der: frame.spki.to_vec() })
}

/// The requested extensions, from PKCS#9's extensionRequest and Microsoft's legacy
/// extension-request attribute, after structural checks: each attribute at most once
/// and with one value; in each, every extension a single DER value, parsable, no OID
/// twice, no critical extension we do not understand.
fn requested_extensions<'b>(
    info: &'b X509CertificationRequestInfo<'_>,
    attributes: &'b [u8],
) -> Result<Vec<X509Extension<'b>>, Error> {
    let mut pkcs9: Option<Vec<X509Extension<'b>>> = None;
    for attr in info.iter_attributes() {
        if let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() {
            if pkcs9.is_some() {
                return Err(malformed("more than one extensionRequest attribute"));
            }
            let set = read_only(attr.value, TAG_SET)?;
            read_only(set, TAG_SEQUENCE)?;
            pkcs9 = Some(req.extensions.clone());
        }
    }
    // x509-parser leaves attributes it does not know unparsed: walk them here.
    let mut microsoft: Option<Vec<X509Extension<'b>>> = None;
    let mut rest = attributes;
    while !rest.is_empty() {
        let (attr, _, after) = read_tlv(rest, TAG_SEQUENCE)?;
        rest = after;
        let (oid, _, values) = read_tlv(attr, TAG_OID)?;
        if oid != OID_MS_CERT_EXTENSIONS {
            continue;
        }
        if microsoft.is_some() {
            return Err(malformed("more than one Microsoft extension-request attribute"));
        }
        let set = read_only(values, TAG_SET)?;
        read_only(set, TAG_SEQUENCE)?;
        let (left, req) = ExtensionRequest::from_der(set)
            .map_err(|_| malformed("Microsoft extension-request attribute could not be parsed"))?;
        if !left.is_empty() {
            return Err(malformed("unexpected bytes in the Microsoft extension-request attribute"));
        }
        microsoft = Some(req.extensions);
    }
    let mut all = Vec::new();
    for exts in [pkcs9, microsoft].into_iter().flatten() {
        check_extension_list(&exts)?;
        all.extend(exts);
    }
    Ok(all)
}

/// One attribute's extensions: each a single parsable DER value, no OID twice, no
/// critical extension we do not understand.
fn check_extension_list(exts: &[X509Extension<'_>]) -> Result<(), Error> {
    let mut seen: Vec<&[u8]> = Vec::with_capacity(exts.len());
    for ext in exts {
        let oid = ext.oid.as_bytes();
        let name = dotted(oid);
        if seen.contains(&oid) {
            return Err(malformed(format!("extension {name} appears more than once")));
        }
        seen.push(oid);
        if single_value(ext.value).is_err() || ext.parsed_extension().error().is_some() {
            return Err(malformed(format!("extension {name} could not be parsed")));
        }
        let understood = matches!(
            ext.parsed_extension(),
            ParsedExtension::SubjectAlternativeName(_)
                | ParsedExtension::BasicConstraints(_)
                | ParsedExtension::KeyUsage(_)
                | ParsedExtension::ExtendedKeyUsage(_)
                | ParsedExtension::SubjectKeyIdentifier(_)
        );
        if ext.critical && !understood {
            return Err(malformed(format!("critical extension {name} is not supported")));
        }
    }
    Ok(())
}

/// Every CN must be the expected DNS name; emailAddress is refused; other
/// attributes are ignored.
fn check_subject(subject: &X509Name<'_>, expected: &Expected<'_>) -> Result<(), Error> {
    for atv in subject.iter_attributes() {
        let value = atv.attr_value();
        if *atv.attr_type() == OID_X509_COMMON_NAME {
            if !matches!(value.header.tag(), Tag::Utf8String | Tag::PrintableString | Tag::Ia5String) {
                return Err(Error::NameNotAllowed { what: "CN of an unsupported string type".into() });
            }
            if Some(value.data) != expected.dns_name.map(str::as_bytes) {
                return Err(Error::NameNotAllowed { what: describe("CN", value.data) });
            }
        } else if *atv.attr_type() == OID_PKCS9_EMAIL_ADDRESS {
            return Err(Error::NameNotAllowed { what: describe("emailAddress in subject", value.data) });
        }
    }
    Ok(())
}

fn check_extension(ext: &X509Extension<'_>, expected: &Expected<'_>) -> Result<(), Error> {
    let refuse = |what: String| Err(Error::NameNotAllowed { what });
    match ext.parsed_extension() {
        ParsedExtension::BasicConstraints(bc) if bc.ca || bc.path_len_constraint.is_some() => {
            Err(Error::CaRequested)
        }
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(s) if Some(*s) == expected.dns_name => {}
                    GeneralName::URI(s) if *s == expected.spiffe_id => {}
                    GeneralName::DNSName(s) => return refuse(describe("DNS SAN", s.as_bytes())),
                    GeneralName::URI(s) => return refuse(describe("URI SAN", s.as_bytes())),
                    GeneralName::RFC822Name(s) => return refuse(describe("email SAN", s.as_bytes())),
                    GeneralName::IPAddress(_) => return refuse("IP SAN".into()),
                    GeneralName::DirectoryName(_) => return refuse("directoryName SAN".into()),
                    GeneralName::OtherName(..) => return refuse("otherName SAN".into()),
                    GeneralName::RegisteredID(_) => return refuse("registeredID SAN".into()),
                    GeneralName::Invalid(..) => return refuse("SAN entry with invalid encoding".into()),
                    _ => return refuse("unsupported SAN type".into()),
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, KeyPair,
        PublicKeyData, SanType, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
        PKCS_ED25519, PKCS_RSA_SHA256,
    };

    const ID: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
    const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/web";
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).unwrap()
    }
    fn run(der: &[u8]) -> Result<CheckedCsr, Error> {
        check(der, &Expected { dns_name: Some(ID), spiffe_id: SPIFFE }, &KeyPolicy::default())
    }
    fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
        KeyPair::generate_for(alg).unwrap()
    }
    fn rsa_key(name: &str) -> KeyPair {
        let pem = String::from_utf8(fixture(name)).unwrap();
        KeyPair::from_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256).unwrap()
    }
    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }
    fn uri(name: &str) -> SanType {
        SanType::URI(name.try_into().unwrap())
    }
    fn request(
        key: &KeyPair,
        cn: Option<&str>,
        sans: Vec<SanType>,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        edit(&mut params);
        params.serialize_request(key).unwrap().der().to_vec()
    }
    fn identity_request(key: &KeyPair) -> Vec<u8> {
        request(key, Some(ID), vec![dns(ID)], |_| {})
    }
    fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let body = parts.concat();
        let mut out = vec![tag];
        match body.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend(body);
        out
    }
    /// The certificationRequestInfo of `csr` with another signature algorithm and value.
    fn resigned(csr: &[u8], sig_oid: &[u8], sig: &[u8]) -> Vec<u8> {
        let info = Frame::parse(csr).unwrap().info;
        let alg = tlv(TAG_SEQUENCE, &[&tlv(TAG_OID, &[sig_oid])]);
        tlv(TAG_SEQUENCE, &[info, &alg, &tlv(TAG_BIT_STRING, &[&[0], sig])])
    }
    fn assert_refused(result: Result<CheckedCsr, Error>, code: &str) {
        match result {
            Err(e) => assert_eq!(e.code(), code, "{e}"),
            Ok(c) => panic!("accepted {c:?}, expected {code}"),
        }
    }

    #[test]
    fn ec_and_rsa_requests_naming_the_identity_are_accepted_with_their_key_type() {
        let cases = [
            (key(&PKCS_ECDSA_P256_SHA256), KeyType::P256, "p256"),
            (key(&PKCS_ECDSA_P384_SHA384), KeyType::P384, "p384"),
            (rsa_key("rsa2048.pk8.pem"), KeyType::Rsa { bits: 2048 }, "rsa2048"),
            (rsa_key("rsa3072.pk8.pem"), KeyType::Rsa { bits: 3072 }, "rsa3072"),
        ];
        for (key, key_type, label) in cases {
            let csr = identity_request(&key);
            // What admission control charges for, before the check, is the same key type.
            assert_eq!(peek_key_type(&csr, &KeyPolicy::default()), Some(key_type));
            let checked = run(&csr).unwrap();
            assert_eq!(checked.key_type, key_type);
            assert_eq!(checked.key_type.to_string(), label);
            assert_eq!(checked.spki_der, key.subject_public_key_info());
        }
    }

    /// `openssl req -new -sha256` with a fresh P-384 key, CN and DNS SAN = ID:
    /// rcgen and ring cannot sign P-384 with SHA-256.
    const P384_SHA256_CSR: [&str; 9] = [
        "308201a130820126020100304a3148304606035504030c3f7765622e64656661756c742e736572766963656163636f75",
        "6e742e6964656e746974792e6d65736863612d73797374656d2e636c75737465722e6c6f63616c3076301006072a8648",
        "ce3d020106052b8104002203620004af98c286622d22691ff630c43c2530d9baf04c6580e87a383f8ee2344172bb6fd8",
        "ce7309d66054aef720ff2674170b3947e89a445541fe9327f6d81419f5ffb3f5bdbf3bb228a198f55b072efc0b208cd5",
        "a9be66bf76524e3af2c75614ada909a05d305b06092a864886f70d01090e314e304c304a0603551d1104433041823f77",
        "65622e64656661756c742e736572766963656163636f756e742e6964656e746974792e6d65736863612d73797374656d",
        "2e636c75737465722e6c6f63616c300a06082a8648ce3d0403020369003066023100bce508f058625335e8fe8e518bfc",
        "f271504b1af3995750e5c80a2751549ffd9fa4034a9b6a31a115b6986388afaf76fe023100bddeb50d3df1cfc4e09c8f",
        "92bab0f31c8bc442a7294c262e6e2590063a6525b4e7a1f6f5b872db2eb67b6a309e666ac4",
    ];

    #[test]
    fn p384_key_signed_with_sha256_is_accepted_as_p384() {
        let hex = P384_SHA256_CSR.concat();
        let csr: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        assert_eq!(run(&csr).unwrap().key_type, KeyType::P384);
        // The same signature labelled as an RSA signature is refused.
        let sig = Frame::parse(&csr).unwrap().signature;
        let relabelled = resigned(&csr, OID_SHA256_RSA, sig);
        assert_refused(run(&relabelled), "csr_unsupported_signature_algorithm");
    }

    #[test]
    fn request_naming_nothing_is_accepted() {
        let csr = request(&key(&PKCS_ECDSA_P256_SHA256), None, vec![], |_| {});
        assert_eq!(run(&csr).unwrap().key_type, KeyType::P256);
    }

    #[test]
    fn names_other_than_the_identity_are_refused() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let other = "api.default.serviceaccount.identity.meshca-system.cluster.local";
        let upper = ID.to_ascii_uppercase();
        let dotted_id = format!("{ID}.");
        let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
        let email = SanType::Rfc822Name("web@example.com".try_into().unwrap());
        let cases = [
            request(&k, Some(other), vec![], |_| {}),
            request(&k, None, vec![dns(other)], |_| {}),
            request(&k, Some(&upper), vec![], |_| {}),
            request(&k, None, vec![dns(&upper)], |_| {}),
            request(&k, Some(&dotted_id), vec![], |_| {}),
            request(&k, None, vec![dns(&dotted_id)], |_| {}),
            request(&k, None, vec![dns(ID), uri("spiffe://cluster.local/ns/default/sa/api")], |_| {}),
            request(&k, None, vec![ip], |_| {}),
            request(&k, None, vec![email], |_| {}),
            request(&k, None, vec![], |p| {
                p.distinguished_name.push(DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]), "a@b.c")
            }),
        ];
        for csr in cases {
            let err = run(&csr).unwrap_err();
            assert_eq!(err.code(), "csr_name_not_allowed", "{err}");
            assert!(err.is_permission());
        }
    }

    #[test]
    fn uri_san_with_the_spiffe_id_is_accepted() {
        let csr = request(&key(&PKCS_ECDSA_P256_SHA256), Some(ID), vec![dns(ID), uri(SPIFFE)], |_| {});
        assert!(run(&csr).is_ok());
    }

    #[test]
    fn refusal_names_only_printable_ascii_truncated() {
        let long = format!("{}.example", "a".repeat(300));
        let csr = request(&key(&PKCS_ECDSA_P256_SHA256), None, vec![dns(&long)], |_| {});
        let Err(Error::NameNotAllowed { what }) = run(&csr) else { panic!("expected NameNotAllowed") };
        assert_eq!(what, format!("DNS SAN {:?}", "a".repeat(253)));
        assert_eq!(describe("CN", b"web\0"), "CN");
    }

    #[test]
    fn ca_requests_are_refused_and_ca_false_is_accepted() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        for is_ca in [IsCa::Ca(BasicConstraints::Unconstrained), IsCa::Ca(BasicConstraints::Constrained(0))] {
            let err = run(&request(&k, Some(ID), vec![dns(ID)], |p| p.is_ca = is_ca)).unwrap_err();
            assert!(matches!(err, Error::CaRequested) && err.is_permission(), "{err}");
        }
        assert!(run(&request(&k, Some(ID), vec![dns(ID)], |p| p.is_ca = IsCa::ExplicitNoCa)).is_ok());
    }

    #[test]
    fn duplicate_and_unknown_critical_extensions_are_malformed_and_unknown_others_ignored() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let san = tlv(TAG_SEQUENCE, &[&tlv(0x82, &[ID.as_bytes()])]);
        let dup = request(&k, None, vec![dns(ID)], |p| {
            p.custom_extensions.push(CustomExtension::from_oid_content(&[2, 5, 29, 17], san));
        });
        assert_refused(run(&dup), "csr_malformed");
        let mut unknown = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
        assert!(run(&request(&k, None, vec![], |p| p.custom_extensions.push(unknown.clone()))).is_ok());
        unknown.set_criticality(true);
        assert_refused(
            run(&request(&k, None, vec![], |p| p.custom_extensions.push(unknown))),
            "csr_malformed",
        );
    }

    #[test]
    fn names_in_microsofts_legacy_extension_request_attribute_are_checked_like_any_other() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let ms_oid: &[u64] = &[1, 3, 6, 1, 4, 1, 311, 2, 1, 14];
        let san = |name: &str| {
            let names = tlv(TAG_SEQUENCE, &[&tlv(0x82, &[name.as_bytes()])]);
            let oid = tlv(TAG_OID, &[&[0x55, 0x1d, 0x11]]);
            tlv(TAG_SEQUENCE, &[&oid, &tlv(0x04, &[&names])])
        };
        let attribute = |exts: &[&[u8]]| rcgen::Attribute {
            oid: ms_oid,
            values: tlv(TAG_SET, &[&tlv(TAG_SEQUENCE, exts)]),
        };
        let csr = |attrs: Vec<rcgen::Attribute>| {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.serialize_request_with_attributes(&k, attrs).unwrap().der().to_vec()
        };
        let other = "api.default.serviceaccount.identity.meshca-system.cluster.local";
        assert!(run(&csr(vec![attribute(&[&san(ID)])])).is_ok());
        assert_refused(run(&csr(vec![attribute(&[&san(other)])])), "csr_name_not_allowed");
        assert_refused(run(&csr(vec![attribute(&[&san(ID), &san(ID)])])), "csr_malformed");
        let twice = vec![attribute(&[&san(ID)]), attribute(&[&san(ID)])];
        assert_refused(run(&csr(twice)), "csr_malformed");
        let not_extensions = rcgen::Attribute { oid: ms_oid, values: tlv(TAG_SET, &[DER_NULL]) };
        assert_refused(run(&csr(vec![not_extensions])), "csr_malformed");
    }

    #[test]
    fn tampered_or_foreign_signatures_are_refused_whatever_is_named() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let csr = identity_request(&k);
        let mut tampered = csr.clone();
        let at = csr.windows(ID.len()).position(|w| w == ID.as_bytes()).unwrap();
        tampered[at] ^= 0x01; // the CN now names something else, unsigned
        assert!(matches!(run(&tampered), Err(Error::BadSignature)));

        let foreign = identity_request(&key(&PKCS_ECDSA_P256_SHA256));
        let sig = Frame::parse(&foreign).unwrap().signature;
        assert!(matches!(run(&resigned(&csr, OID_ECDSA_SHA256, sig)), Err(Error::BadSignature)));
    }

    #[test]
    fn off_curve_point_is_never_accepted() {
        let csr = identity_request(&key(&PKCS_ECDSA_P256_SHA256));
        let spki = Frame::parse(&csr).unwrap().spki;
        let at = csr.windows(spki.len()).position(|w| w == spki).unwrap() + spki.len() - 1;
        let mut bad = csr.clone();
        bad[at] ^= 0x01;
        let err = run(&bad).unwrap_err();
        assert!(matches!(err, Error::BadSignature | Error::InvalidKey { .. }), "{err}");
    }

    #[test]
    fn broken_framing_is_malformed() {
        let csr = identity_request(&key(&PKCS_ECDSA_P256_SHA256));
        assert_refused(run(&[csr.as_slice(), &[0]].concat()), "csr_malformed");
        let inner = read_only(&csr, TAG_SEQUENCE).unwrap();
        assert_refused(run(&tlv(TAG_SEQUENCE, &[inner, DER_NULL])), "csr_malformed");
        assert_refused(run(&csr[..csr.len() - 1]), "csr_malformed");
        let info_at = csr.windows(3).position(|w| w == [0x02, 0x01, 0x00]).unwrap();
        let mut v2 = csr.clone();
        v2[info_at + 2] = 1;
        assert_refused(run(&v2), "csr_malformed");
        assert!(matches!(run(&[]), Err(Error::Empty)));
        let big = vec![0x30; MAX_CSR_LEN + 1];
        assert!(
            matches!(run(&big), Err(Error::TooLarge { len, max: MAX_CSR_LEN }) if len == MAX_CSR_LEN + 1)
        );
    }

    /// A request for the identity, padded with an unknown non-critical extension (which
    /// is ignored) to exactly `len` bytes; re-signed until the ECDSA signature's
    /// varying length lands on it.
    fn request_of_len(k: &KeyPair, len: usize) -> Vec<u8> {
        let padded = |pad: usize| {
            let value = tlv(0x04, &[&vec![0; pad]]);
            let ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 2], value);
            request(k, Some(ID), vec![dns(ID)], |p| p.custom_extensions.push(ext))
        };
        let mut pad = len - 512;
        for _ in 0..100 {
            let csr = padded(pad);
            if csr.len() == len {
                return csr;
            }
            pad = (pad + len).saturating_sub(csr.len());
        }
        panic!("no request of {len} bytes");
    }

    #[test]
    fn request_of_exactly_the_size_limit_is_checked_and_one_byte_more_is_too_large() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let at_limit = request_of_len(&k, MAX_CSR_LEN);
        assert_eq!(run(&at_limit).unwrap().key_type, KeyType::P256);
        assert_eq!(peek_key_type(&at_limit, &KeyPolicy::default()), Some(KeyType::P256));

        let over = request_of_len(&k, MAX_CSR_LEN + 1);
        let err = run(&over).unwrap_err();
        assert!(matches!(err, Error::TooLarge { len, max: MAX_CSR_LEN } if len == MAX_CSR_LEN + 1), "{err}");
        assert_eq!(peek_key_type(&over, &KeyPolicy::default()), None);
    }

    #[test]
    fn each_refused_san_type_is_named_in_the_refusal() {
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let with_sans = |names: &[&[u8]]| {
            let san = CustomExtension::from_oid_content(&[2, 5, 29, 17], tlv(TAG_SEQUENCE, names));
            request(&k, None, vec![], |p| p.custom_extensions.push(san))
        };
        let other = "api.default.serviceaccount.identity.meshca-system.cluster.local";
        let other_spiffe = "spiffe://cluster.local/ns/default/sa/api";
        let cn_type = tlv(TAG_OID, &[&[0x55, 0x04, 0x03]]);
        let name = tlv(
            TAG_SEQUENCE,
            &[&tlv(TAG_SET, &[&tlv(TAG_SEQUENCE, &[&cn_type, &tlv(0x0c, &[ID.as_bytes()])])])],
        );
        // otherName: a Microsoft UPN (1.3.6.1.4.1.311.20.2.3), as certreq can ask for.
        let upn = tlv(TAG_OID, &[&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x14, 0x02, 0x03]]);
        let cases = [
            (tlv(0x82, &[other.as_bytes()]), format!("DNS SAN {other:?}")),
            (tlv(0x86, &[other_spiffe.as_bytes()]), format!("URI SAN {other_spiffe:?}")),
            (tlv(0x81, &[b"web@example.com"]), "email SAN \"web@example.com\"".into()),
            (tlv(0x87, &[&[10, 0, 0, 1]]), "IP SAN".into()),
            (tlv(0xa4, &[&name]), "directoryName SAN".into()),
            (tlv(0xa0, &[&upn, &tlv(0xa0, &[&tlv(0x0c, &[b"web@cluster.local"])])]), "otherName SAN".into()),
            (tlv(0x88, &[&[0x2a, 0x03, 0x04]]), "registeredID SAN".into()),
            // A DNS name that is not IA5String (a byte above 0x7f).
            (tlv(0x82, &[b"web\xff.example"]), "SAN entry with invalid encoding".into()),
            (tlv(0xa3, &[&tlv(TAG_SEQUENCE, &[])]), "unsupported SAN type".into()),
        ];
        let own = [tlv(0x82, &[ID.as_bytes()]), tlv(0x86, &[SPIFFE.as_bytes()])];
        for (refused, what) in cases {
            // Alone, and after the caller's own names: the first name not allowed is named.
            for names in [vec![refused.as_slice()], vec![&own[0], &own[1], &refused]] {
                match run(&with_sans(&names)) {
                    Err(Error::NameNotAllowed { what: got }) => assert_eq!(got, what),
                    other => panic!("{what}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn attributes_whose_length_disagrees_with_the_request_info_are_malformed() {
        // x509-parser reads the attributes up to the end of the request info whatever
        // the [0] length says; the strict walk refuses bytes after the [0] value, so
        // the two never disagree on what was signed (the check in `check` after it).
        let csr = request(&key(&PKCS_ECDSA_P256_SHA256), None, vec![uri(SPIFFE)], |_| {});
        let attributes = Frame::parse(&csr).unwrap().attributes;
        assert!(!attributes.is_empty() && attributes.len() < 0x80);
        let attrs = attributes.as_ptr() as usize - csr.as_ptr() as usize - 2;
        assert_eq!(csr[attrs..attrs + 2], [TAG_ATTRIBUTES, attributes.len() as u8]);
        let mut short = csr.clone();
        short[attrs + 1] = 0;
        assert!(X509CertificationRequest::from_der(&short).is_ok());
        assert_refused(run(&short), "csr_malformed");
    }

    #[test]
    fn weak_unsupported_and_disabled_keys_are_refused() {
        assert!(matches!(run(&fixture("rsa1024.csr.der")), Err(Error::WeakKey { bits: 1024, min: 2048 })));
        assert_refused(run(&fixture("p521.csr.der")), "csr_unsupported_key");
        assert_refused(run(&identity_request(&key(&PKCS_ED25519))), "csr_unsupported_key");
        let csr = identity_request(&rsa_key("rsa3072.pk8.pem"));
        let expected = Expected { dns_name: Some(ID), spiffe_id: SPIFFE };
        let no_rsa = KeyPolicy { rsa_min_bits: None, ..KeyPolicy::default() };
        assert_refused(check(&csr, &expected, &no_rsa), "csr_unsupported_key");
        let small = KeyPolicy { rsa_max_bits: 2048, ..KeyPolicy::default() };
        assert!(matches!(check(&csr, &expected, &small), Err(Error::KeyTooLarge { bits: 3072, max: 2048 })));
        let no_p384 = KeyPolicy { allow_p384: false, ..KeyPolicy::default() };
        let p384 = identity_request(&key(&PKCS_ECDSA_P384_SHA384));
        assert_refused(check(&p384, &expected, &no_p384), "csr_unsupported_key");
    }

    #[test]
    fn prefixes_and_byte_flips_never_panic_or_pass() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let ec = request(&key(&PKCS_ECDSA_P256_SHA256), Some(ID), vec![dns(ID), uri(SPIFFE)], |_| {});
        for csr in [ec, identity_request(&rsa_key("rsa2048.pk8.pem"))] {
            for len in 0..csr.len() {
                assert!(run(&csr[..len]).is_err());
            }
            for _ in 0..3000 {
                let mut bad = csr.clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % bad.len() as u64) as usize;
                    bad[at] ^= 1 + (next() % 255) as u8;
                }
                assert!(run(&bad).is_err(), "a modified request was accepted");
            }
        }
    }

    /// `read_tlv` on `input` for an OCTET STRING: `Ok((contents, tlv, rest))`
    /// lengths, or the error's text.
    fn tlv_of(input: &[u8]) -> Result<(usize, usize, usize), String> {
        read_tlv(input, 0x04).map(|(c, t, r)| (c.len(), t.len(), r.len())).map_err(|e| match e {
            Error::Malformed { reason } => reason,
            other => other.to_string(),
        })
    }

    #[test]
    fn der_lengths_must_be_definite_minimal_and_at_most_three_bytes_and_each_fault_is_named() {
        let with =
            |header: &[u8], body: usize, extra: usize| [header, &vec![0xab; body + extra][..]].concat();
        // Short form up to 127; long form from 128, in 1 to 3 bytes.
        assert_eq!(tlv_of(&with(&[0x04, 0x00], 0, 1)), Ok((0, 2, 1)));
        assert_eq!(tlv_of(&with(&[0x04, 0x7f], 127, 2)), Ok((127, 129, 2)));
        assert_eq!(tlv_of(&with(&[0x04, 0x81, 0x80], 128, 0)), Ok((128, 131, 0)));
        assert_eq!(tlv_of(&with(&[0x04, 0x82, 0x01, 0x00], 256, 3)), Ok((256, 260, 3)));
        assert_eq!(tlv_of(&with(&[0x04, 0x82, 0x01, 0x23], 0x123, 0)), Ok((0x123, 0x127, 0)));
        assert_eq!(tlv_of(&with(&[0x04, 0x83, 0x01, 0x00, 0x01], 65_537, 0)), Ok((65_537, 65_542, 0)));
        let fault = |input: &[u8]| tlv_of(input).unwrap_err();
        assert_eq!(fault(&[]), "invalid DER structure (truncated)");
        assert_eq!(fault(&[0x05, 0x00]), "invalid DER tag");
        assert_eq!(fault(&[0x04]), "invalid DER length (truncated)");
        // Indefinite length (BER), and four length bytes.
        assert_eq!(fault(&with(&[0x04, 0x80], 128, 2)), "invalid DER length");
        assert_eq!(fault(&with(&[0x04, 0x84, 0x00, 0x01, 0x00, 0x00], 65_536, 0)), "invalid DER length");
        assert_eq!(fault(&with(&[0x04, 0x84, 0x01, 0x00, 0x00, 0x00], 0, 0)), "invalid DER length");
        assert_eq!(fault(&[0x04, 0x82, 0x01]), "invalid DER length (truncated)");
        // Not minimal: a leading zero byte, or the long form for a short length.
        assert_eq!(fault(&with(&[0x04, 0x82, 0x00, 0x80], 128, 0)), "invalid DER length (not minimal)");
        assert_eq!(fault(&with(&[0x04, 0x81, 0x7f], 127, 0)), "invalid DER length (not minimal)");
        assert_eq!(fault(&with(&[0x04, 0x02], 1, 0)), "invalid DER structure (truncated)");
        assert_eq!(fault(&with(&[0x04, 0x81, 0x80], 127, 0)), "invalid DER structure (truncated)");
    }

    #[test]
    fn oids_in_messages_are_dotted_with_each_first_arc_and_overlong_ones_are_invalid() {
        assert_eq!(dotted(OID_SHA256_RSA), "1.2.840.113549.1.1.11");
        assert_eq!(dotted(OID_P384), "1.3.132.0.34");
        assert_eq!(dotted(&[0x27, 0x05]), "0.39.5");
        assert_eq!(dotted(&[0x28]), "1.0");
        assert_eq!(dotted(&[0x4f]), "1.39");
        assert_eq!(dotted(&[0x50]), "2.0");
        assert_eq!(dotted(&[0x55, 0x1d, 0x11]), "2.5.29.17");
        assert_eq!(dotted(&[0x88, 0x37, 0x01]), "2.999.1");
        assert_eq!(dotted(&[]), "invalid OID");
        // An arc of 63 bits fits; one more 7-bit group does not.
        let arc = |groups: usize| [vec![0xff; groups - 1], vec![0x7f]].concat();
        assert_eq!(dotted(&[&[0x2a][..], &arc(9)].concat()), format!("1.2.{}", u64::MAX >> 1));
        assert_eq!(dotted(&[&[0x2a][..], &arc(10)].concat()), "invalid OID");
        // 64 bits: one leading bit, then nine full groups.
        let widest = [&[0x2a, 0x81][..], &[0xff; 8], &[0x7f]].concat();
        assert_eq!(dotted(&widest), format!("1.2.{}", u64::MAX));
        assert_eq!(dotted(&[&[0x2a, 0x82][..], &[0xff; 8], &[0x7f]].concat()), "invalid OID");
        // Only the first 64 bytes are read.
        let long = [vec![0x2a], vec![0x01; 70]].concat();
        assert_eq!(dotted(&long), format!("1.2{}", ".1".repeat(63)));
    }

    #[test]
    fn names_in_refusals_are_shown_only_when_printable_and_at_most_253_characters() {
        assert_eq!(describe("DNS SAN", b"evil.example"), "DNS SAN \"evil.example\"");
        assert_eq!(describe("DNS SAN", b""), "DNS SAN");
        assert_eq!(describe("DNS SAN", b"a\x1fb"), "DNS SAN");
        assert_eq!(describe("DNS SAN", b"a\x7fb"), "DNS SAN");
        assert_eq!(describe("DNS SAN", b" ~"), "DNS SAN \" ~\"");
        let long = "a".repeat(300);
        assert_eq!(describe("CN", long.as_bytes()), format!("CN {:?}", "a".repeat(253)));
    }

    #[test]
    fn rsa_integers_must_be_positive_nonzero_and_minimal() {
        let of = |contents: &[u8]| {
            positive_integer(contents).map(<[u8]>::to_vec).map_err(|e| match e {
                Error::InvalidKey { reason } => reason,
                other => other.to_string(),
            })
        };
        assert_eq!(of(&[0x01, 0x00]), Ok(vec![0x01, 0x00]));
        assert_eq!(of(&[0x7f]), Ok(vec![0x7f]));
        assert_eq!(of(&[0x00, 0x80, 0x01]), Ok(vec![0x80, 0x01]));
        assert_eq!(of(&[]), Err("empty INTEGER in RSA key".into()));
        assert_eq!(of(&[0x80]), Err("negative INTEGER in RSA key".into()));
        assert_eq!(of(&[0xff, 0x01]), Err("negative INTEGER in RSA key".into()));
        assert_eq!(of(&[0x00, 0x7f]), Err("non-minimal INTEGER in RSA key".into()));
        assert_eq!(of(&[0x00, 0x00]), Err("non-minimal INTEGER in RSA key".into()));
        assert_eq!(of(&[0x00]), Err("zero INTEGER in RSA key".into()));
    }

    /// A frame holding only a public key: `alg`, `params`, and the BIT STRING's bytes.
    fn key_frame<'a>(alg: &'a [u8], params: &'a [u8], bits: &'a [u8]) -> Frame<'a> {
        let none: &[u8] = &[];
        Frame {
            info: none,
            attributes: none,
            spki: none,
            key_alg: alg,
            key_params: params,
            key_bits: bits,
            sig_alg: none,
            sig_params: none,
            signature: none,
        }
    }

    /// `key_type`'s verdict in words: the key type's label, or the refusal's text.
    fn key_verdict(alg: &[u8], params: &[u8], bits: &[u8], policy: &KeyPolicy) -> String {
        match key_type(&key_frame(alg, params, bits), policy) {
            Ok(t) => t.label(),
            Err(Error::InvalidKey { reason }) => format!("invalid: {reason}"),
            Err(Error::UnsupportedKey { what }) => format!("unsupported: {what}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ec_keys_need_a_named_allowed_curve_and_an_uncompressed_point_of_its_length() {
        let policy = KeyPolicy::default();
        let curve = |oid: &[u8]| tlv(TAG_OID, &[oid]);
        let point = |len: usize| [vec![0x04], vec![0x11; len - 1]].concat();
        let ec = |params: &[u8], bits: &[u8], policy: &KeyPolicy| {
            key_verdict(OID_EC_PUBLIC_KEY, params, bits, policy)
        };
        assert_eq!(ec(&curve(OID_P256), &point(65), &policy), "p256");
        assert_eq!(ec(&curve(OID_P384), &point(97), &policy), "p384");
        assert_eq!(
            ec(&curve(OID_P256), &point(97), &policy),
            "invalid: EC point has the wrong length for its curve"
        );
        assert_eq!(
            ec(&curve(OID_P384), &point(65), &policy),
            "invalid: EC point has the wrong length for its curve"
        );
        let compressed = [&[0x02][..], &[0x11; 32]].concat();
        assert_eq!(
            ec(&curve(OID_P256), &compressed, &policy),
            "invalid: EC point is not in uncompressed form"
        );
        assert_eq!(ec(&curve(OID_P256), &[], &policy), "invalid: EC point is not in uncompressed form");
        assert_eq!(ec(&curve(OID_P521), &point(133), &policy), "unsupported: EC curve P-521");
        let secp256k1 = [0x2b, 0x81, 0x04, 0x00, 0x0a];
        assert_eq!(ec(&curve(&secp256k1), &point(65), &policy), "unsupported: EC curve 1.3.132.0.10");
        assert_eq!(ec(DER_NULL, &point(65), &policy), "unsupported: EC key without a named curve");
        assert_eq!(ec(&[], &point(65), &policy), "unsupported: EC key without a named curve");
        let no_p256 = KeyPolicy { allow_p256: false, ..KeyPolicy::default() };
        assert_eq!(
            ec(&curve(OID_P256), &point(65), &no_p256),
            "unsupported: p256 keys are disabled by policy"
        );
        assert_eq!(ec(&curve(OID_P384), &point(97), &no_p256), "p384");
    }

    #[test]
    fn rsa_keys_need_null_or_no_parameters_an_odd_modulus_in_bounds_and_a_small_odd_exponent() {
        let policy = KeyPolicy::default();
        // A modulus of `bits` bits (a multiple of 8 plus 1..=8), odd unless `even`.
        let modulus = |bits: usize, even: bool| {
            let mut n = vec![0xc5; bits.div_ceil(8)];
            n[0] = 0xff >> ((8 - bits % 8) % 8);
            *n.last_mut().unwrap() = if even { 0xc4 } else { 0xc5 };
            if n[0] & 0x80 != 0 {
                n.insert(0, 0);
            }
            n
        };
        let key = |n: &[u8], e: &[u8]| tlv(TAG_SEQUENCE, &[&tlv(TAG_INTEGER, &[n]), &tlv(TAG_INTEGER, &[e])]);
        let rsa = |params: &[u8], n: &[u8], e: &[u8], policy: &KeyPolicy| {
            key_verdict(OID_RSA, params, &key(n, e), policy)
        };
        let n2048 = modulus(2048, false);
        let f4 = [0x01, 0x00, 0x01];
        assert_eq!(rsa(DER_NULL, &n2048, &f4, &policy), "rsa2048");
        assert_eq!(rsa(&[], &n2048, &f4, &policy), "rsa2048");
        let params = tlv(TAG_INTEGER, &[&[0]]);
        assert_eq!(rsa(&params, &n2048, &f4, &policy), "invalid: rsaEncryption parameters are not NULL");
        // Bits: the modulus's, counted from its first set bit, within the policy and ring's bounds.
        assert_eq!(
            rsa(DER_NULL, &modulus(2047, false), &f4, &policy),
            "CSR RSA key has 2047 bits, below the minimum of 2048; generate a larger key"
        );
        assert_eq!(rsa(DER_NULL, &modulus(4096, false), &f4, &policy), "rsa4096");
        assert_eq!(rsa(DER_NULL, &modulus(3073, false), &f4, &policy), "rsa3073");
        assert_eq!(
            rsa(DER_NULL, &modulus(4097, false), &f4, &policy),
            "CSR RSA key has 4097 bits, above the maximum of 4096; generate a smaller key or use ECDSA"
        );
        let wide = KeyPolicy { rsa_min_bits: Some(1024), rsa_max_bits: 16_384, ..KeyPolicy::default() };
        assert!(rsa(DER_NULL, &modulus(2047, false), &f4, &wide).contains("below the minimum of 2048"));
        assert!(rsa(DER_NULL, &modulus(8193, false), &f4, &wide).contains("above the maximum of 8192"));
        assert_eq!(rsa(DER_NULL, &modulus(8192, false), &f4, &wide), "rsa8192");
        let no_rsa = KeyPolicy { rsa_min_bits: None, ..KeyPolicy::default() };
        assert_eq!(rsa(DER_NULL, &n2048, &f4, &no_rsa), "unsupported: RSA keys are disabled by policy");
        assert_eq!(rsa(DER_NULL, &modulus(2048, true), &f4, &policy), "invalid: RSA modulus is even");
        // The exponent: odd, 3 up to 2^33 (exclusive), at most five bytes.
        for (e, verdict) in [
            (&[0x03][..], "rsa2048"),
            (&[0x01, 0xff, 0xff, 0xff, 0xff], "rsa2048"),
            (&[0x01, 0x00, 0x00, 0x00, 0x01], "rsa2048"),
            (&[0x01], "invalid: RSA exponent must be odd and in 3..2^33"),
            (&[0x02, 0x00, 0x00, 0x00, 0x01], "invalid: RSA exponent must be odd and in 3..2^33"),
            (&[0x01, 0x00, 0x00], "invalid: RSA exponent must be odd and in 3..2^33"),
            (&[0x01, 0x00, 0x00, 0x00, 0x00, 0x01], "invalid: RSA exponent is too large"),
        ] {
            assert_eq!(rsa(DER_NULL, &n2048, e, &policy), verdict, "e = {e:02x?}");
        }
        assert_eq!(rsa(DER_NULL, &n2048, &[0x00, 0x01], &policy), "invalid: non-minimal INTEGER in RSA key");
        let not_a_key = tlv(TAG_SEQUENCE, &[&tlv(TAG_INTEGER, &[&n2048])]);
        assert_eq!(
            key_verdict(OID_RSA, DER_NULL, &not_a_key, &policy),
            "invalid: RSA key is not a DER RSAPublicKey"
        );
    }

    #[test]
    fn other_key_algorithms_are_named_in_the_refusal() {
        let policy = KeyPolicy::default();
        for (alg, named) in [
            (OID_ED25519, "Ed25519"),
            (OID_ED448, "Ed448"),
            (OID_DSA, "DSA"),
            (OID_RSA_PSS, "RSA-PSS key"),
            (&[0x2a, 0x03][..], "key algorithm 1.2.3"),
        ] {
            assert_eq!(key_verdict(alg, &[], &[0x04; 32], &policy), format!("unsupported: {named}"));
        }
    }

    /// `verification_alg`'s choice for `key` and a signature algorithm (`oid`,
    /// `params`): ring's name for it, or the refusal's text.
    fn sig_verdict(key: KeyType, oid: &[u8], params: &[u8]) -> String {
        let none: &[u8] = &[];
        let frame = Frame { sig_alg: oid, sig_params: params, ..key_frame(none, none, none) };
        match verification_alg(key, &frame) {
            Ok(alg) => format!("{alg:?}"),
            Err(Error::UnsupportedSignatureAlgorithm { what }) => format!("unsupported: {what}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn each_key_type_verifies_with_exactly_its_signature_algorithms() {
        let rsa = KeyType::Rsa { bits: 2048 };
        let ok: [(KeyType, &[u8], &'static dyn VerificationAlgorithm); 7] = [
            (KeyType::P256, OID_ECDSA_SHA256, &signature::ECDSA_P256_SHA256_ASN1),
            (KeyType::P256, OID_ECDSA_SHA384, &signature::ECDSA_P256_SHA384_ASN1),
            (KeyType::P384, OID_ECDSA_SHA256, &signature::ECDSA_P384_SHA256_ASN1),
            (KeyType::P384, OID_ECDSA_SHA384, &signature::ECDSA_P384_SHA384_ASN1),
            (rsa, OID_SHA256_RSA, &signature::RSA_PKCS1_2048_8192_SHA256),
            (rsa, OID_SHA384_RSA, &signature::RSA_PKCS1_2048_8192_SHA384),
            (rsa, OID_SHA512_RSA, &signature::RSA_PKCS1_2048_8192_SHA512),
        ];
        let names: std::collections::BTreeSet<String> =
            ok.iter().map(|(_, _, alg)| format!("{alg:?}")).collect();
        assert_eq!(names.len(), ok.len(), "ring names each algorithm apart: {names:?}");
        for (key, oid, alg) in ok {
            let chosen = sig_verdict(key, oid, &[]);
            assert_eq!(chosen, format!("{alg:?}"), "{key} {}", dotted(oid));
            if matches!(key, KeyType::Rsa { .. }) {
                assert_eq!(sig_verdict(key, oid, DER_NULL), chosen, "RSA with NULL parameters");
            }
        }
        assert_eq!(
            sig_verdict(rsa, OID_SHA256_RSA, &[0x02, 0x01, 0x00]),
            "unsupported: 1.2.840.113549.1.1.11 with unexpected parameters"
        );
        assert_eq!(
            sig_verdict(KeyType::P256, OID_ECDSA_SHA256, DER_NULL),
            "unsupported: 1.2.840.10045.4.3.2 with unexpected parameters"
        );
        assert_eq!(
            sig_verdict(KeyType::P256, OID_ECDSA_SHA384, DER_NULL),
            "unsupported: 1.2.840.10045.4.3.3 with unexpected parameters"
        );
        // A known algorithm with the other family's key, RSA-PSS, and anything else.
        assert_eq!(
            sig_verdict(KeyType::P256, OID_SHA256_RSA, &[]),
            "unsupported: 1.2.840.113549.1.1.11 with a p256 key"
        );
        assert_eq!(
            sig_verdict(KeyType::P384, OID_SHA512_RSA, DER_NULL),
            "unsupported: 1.2.840.113549.1.1.13 with a p384 key"
        );
        assert_eq!(
            sig_verdict(rsa, OID_ECDSA_SHA384, &[]),
            "unsupported: 1.2.840.10045.4.3.3 with a rsa2048 key"
        );
        assert_eq!(sig_verdict(rsa, OID_RSA_PSS, &[]), "unsupported: RSA-PSS");
        assert_eq!(sig_verdict(KeyType::P256, OID_RSA_PSS, &[0x30, 0x00]), "unsupported: RSA-PSS");
        let ecdsa_sha512 = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
        assert_eq!(sig_verdict(KeyType::P256, &ecdsa_sha512, &[]), "unsupported: 1.2.840.10045.4.3.4");
        assert_eq!(sig_verdict(rsa, &ecdsa_sha512, DER_NULL), "unsupported: 1.2.840.10045.4.3.4");
    }
}
