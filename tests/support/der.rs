//! DER written by hand, for the tests that craft CSRs byte by byte (hostile.rs,
//! windows_csr.rs, properties.rs). One TLV is encoded (and, by [`read_tlv`], read) in
//! tlv.rs, which the fuzz targets include too; this module owns what those tests build
//! on it: the universal types they spell (SEQUENCE, SET, SET OF, OBJECT
//! IDENTIFIER from dotted text, INTEGER, BIT STRING, strings, NULL, TRUE), the X.509
//! and PKCS#10 pieces they share (Names, extensions, general names, attributes,
//! SubjectPublicKeyInfo, signature algorithms) and the OIDs of those. Nothing here
//! checks what it is given: a test that wants a malformed encoding writes it with
//! [`tlv`] and raw bytes.
//!
//! The encoder is hand-written, and kept in test code, because these tests craft
//! malformed encodings on purpose (wrong lengths, wrong or unexpected tags, contents
//! that do not parse) that DER libraries refuse to emit; meshca itself encodes and
//! parses ASN.1 with yasna, x509-parser and rcgen.

#[path = "tlv.rs"]
mod raw;

pub use raw::read_tlv;

pub const OID_CN: &str = "2.5.4.3";
pub const OID_O: &str = "2.5.4.10";
pub const OID_EMAIL: &str = "1.2.840.113549.1.9.1";
pub const OID_SAN: &str = "2.5.29.17";
pub const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";
/// PKCS#9 extensionRequest.
pub const OID_EXTENSION_REQUEST: &str = "1.2.840.113549.1.9.14";
/// Microsoft's legacy extension-request attribute.
pub const OID_MS_EXTENSION_REQUEST: &str = "1.3.6.1.4.1.311.2.1.14";
pub const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
pub const OID_P256: &str = "1.2.840.10045.3.1.7";
pub const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
pub const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
pub const OID_SHA256_RSA: &str = "1.2.840.113549.1.1.11";

pub const NULL: &[u8] = &[0x05, 0x00];
pub const TRUE: &[u8] = &[0x01, 0x01, 0xff];

/// One TLV whose contents are `parts`, concatenated.
pub fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    raw::tlv(tag, &parts.concat())
}

pub fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, parts)
}

/// A SET with its elements in the order given ([`set_of`] sorts them, as DER wants).
pub fn set(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x31, parts)
}

/// The elements of a DER SET OF, sorted by their encoding.
pub fn sorted(parts: &[&[u8]]) -> Vec<u8> {
    let mut parts = parts.to_vec();
    parts.sort();
    parts.concat()
}

pub fn set_of(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x31, &[&sorted(parts)])
}

/// An OBJECT IDENTIFIER from its dotted form.
pub fn oid(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().unwrap()).collect();
    let mut body = vec![(arcs[0] * 40 + arcs[1]) as u8];
    for &arc in &arcs[2..] {
        let mut groups = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        body.extend(groups.iter().rev());
    }
    tlv(0x06, &[&body])
}

/// A positive INTEGER from big-endian magnitude bytes.
pub fn integer(magnitude: &[u8]) -> Vec<u8> {
    if magnitude.first().is_some_and(|b| b & 0x80 != 0) {
        tlv(0x02, &[&[0], magnitude])
    } else {
        tlv(0x02, &[magnitude])
    }
}

/// A small non-negative INTEGER.
pub fn int(v: u8) -> Vec<u8> {
    integer(&[v])
}

/// A BIT STRING with no unused bits.
pub fn bits(bytes: &[u8]) -> Vec<u8> {
    tlv(0x03, &[&[0], bytes])
}

pub fn utf8(s: &[u8]) -> Vec<u8> {
    tlv(0x0c, &[s])
}

pub fn bmp(s: &str) -> Vec<u8> {
    let units: Vec<u8> = s.encode_utf16().flat_map(u16::to_be_bytes).collect();
    tlv(0x1e, &[&units])
}

/// One RDN of a Name: SET { SEQUENCE { type, value } }, `value` an encoded string.
pub fn rdn(attr: &str, value: &[u8]) -> Vec<u8> {
    set(&[&seq(&[&oid(attr), value])])
}

/// A Name holding one CommonName of the given encoded string.
pub fn cn_name(value: &[u8]) -> Vec<u8> {
    seq(&[&rdn(OID_CN, value)])
}

/// An Extension: SEQUENCE { extnID, [critical TRUE], extnValue }.
pub fn extension(id: &str, critical: bool, value: &[u8]) -> Vec<u8> {
    let critical: &[u8] = if critical { TRUE } else { &[] };
    seq(&[&oid(id), critical, &tlv(0x04, &[value])])
}

/// A subjectAltName extension (not critical) of these general names.
pub fn san(names: &[Vec<u8>]) -> Vec<u8> {
    extension(OID_SAN, false, &seq(&[&names.concat()]))
}

/// A dNSName general name.
pub fn dns(name: &[u8]) -> Vec<u8> {
    tlv(0x82, &[name])
}

/// A uniformResourceIdentifier general name.
pub fn uri(name: &[u8]) -> Vec<u8> {
    tlv(0x86, &[name])
}

/// An Attribute with one value: SEQUENCE { type, SET { value } }.
pub fn attribute(id: &str, value: &[u8]) -> Vec<u8> {
    seq(&[&oid(id), &set_of(&[value])])
}

/// An attribute whose one value is a SEQUENCE of the given extensions.
pub fn extensions_attribute(id: &str, exts: &[Vec<u8>]) -> Vec<u8> {
    attribute(id, &seq(&[&exts.concat()]))
}

/// A PKCS#9 extensionRequest attribute.
pub fn extension_request(exts: &[Vec<u8>]) -> Vec<u8> {
    extensions_attribute(OID_EXTENSION_REQUEST, exts)
}

/// SubjectPublicKeyInfo of an EC point on the named curve.
pub fn ec_spki(curve: &str, point: &[u8]) -> Vec<u8> {
    seq(&[&seq(&[&oid(OID_EC_PUBLIC_KEY), &oid(curve)]), &bits(point)])
}

/// SubjectPublicKeyInfo of an RSAPublicKey (DER).
pub fn rsa_spki(public_key: &[u8]) -> Vec<u8> {
    seq(&[&seq(&[&oid(OID_RSA_ENCRYPTION), NULL]), &bits(public_key)])
}

/// AlgorithmIdentifier of ecdsa-with-SHA256 (no parameters).
pub fn ecdsa_sha256() -> Vec<u8> {
    seq(&[&oid(OID_ECDSA_SHA256)])
}

/// AlgorithmIdentifier of sha256WithRSAEncryption (NULL parameters).
pub fn sha256_rsa() -> Vec<u8> {
    seq(&[&oid(OID_SHA256_RSA), NULL])
}
