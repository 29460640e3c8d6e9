//! JOSE's compact form, shared by everything that makes or reads a JWS (service-account
//! tokens, dev tokens, bootstrap tokens, the JWKS meshca writes, `doctor`'s token
//! checks, the load generator): base64url without padding, the compact serialization
//! assembled in one place ([`compact_jws`]) and split in one place ([`Compact::split`]),
//! the unverified look at a payload that caches and diagnostics need
//! ([`unverified_claims`]), and the key ids meshca gives its keys ([`key_id`]). A leaf:
//! no signing or verifying here, callers bring ring's.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ring::digest::{digest, SHA256};
use serde_json::{Map, Value};

/// base64url without padding (RFC 7515 §2).
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The bytes of an unpadded base64url segment; `None` when it is not one.
pub fn decode(segment: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(segment).ok()
}

/// A compact JWS split into its three segments, neither decoded nor verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Compact<'a> {
    pub header: &'a [u8],
    pub payload: &'a [u8],
    pub signature: &'a [u8],
    /// What the signature covers: the header, a dot, the payload.
    pub signing_input: &'a [u8],
}

impl<'a> Compact<'a> {
    /// Exactly three dot-separated segments, else `None`.
    pub(crate) fn split(jws: &'a [u8]) -> Option<Self> {
        let mut parts = jws.split(|b| *b == b'.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let signing_input = &jws[..header.len() + 1 + payload.len()];
        Some(Compact { header, payload, signature, signing_input })
    }
}

/// A JWS in compact serialization: `base64url(header).base64url(claims).base64url(signature)`,
/// where `sign` returns the signature over the signing input (the first two parts and
/// the dot between them). Every token meshca signs is assembled by this one function;
/// callers choose the algorithm.
pub fn compact_jws<S: AsRef<[u8]>, E>(
    header_json: &[u8],
    claims_json: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<S, E>,
) -> Result<String, E> {
    let msg = format!("{}.{}", encode(header_json), encode(claims_json));
    let sig = sign(msg.as_bytes())?;
    Ok(format!("{msg}.{}", encode(sig)))
}

/// The payload of a compact JWS as a JSON object, read without verifying anything:
/// for a cache's expiry, an audit record's claimed id, a diagnosis. `None` unless the
/// token has three segments and its payload is base64url of a JSON object.
pub(crate) fn unverified_claims(jws: &[u8]) -> Option<Map<String, Value>> {
    let payload = decode(Compact::split(jws)?.payload)?;
    match serde_json::from_slice(&payload) {
        Ok(Value::Object(claims)) => Some(claims),
        _ => None,
    }
}

/// The key id meshca gives a public key in its JWKS and token headers: base64url of the
/// SHA-256 of the key's bytes as ring gives them.
pub fn key_id(public_key: &[u8]) -> String {
    encode(digest(&SHA256, public_key))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_compact_jws_splits_into_the_segments_it_was_made_of() {
        let jws =
            compact_jws(br#"{"alg":"none"}"#, br#"{"sub":"a"}"#, |msg| Ok::<_, ()>([msg.len() as u8, 0xff]))
                .unwrap();
        let parts = Compact::split(jws.as_bytes()).unwrap();
        assert_eq!(decode(parts.header).unwrap(), br#"{"alg":"none"}"#);
        assert_eq!(decode(parts.payload).unwrap(), br#"{"sub":"a"}"#);
        assert_eq!(parts.signing_input, &jws.as_bytes()[..jws.rfind('.').unwrap()]);
        assert_eq!(decode(parts.signature).unwrap(), [parts.signing_input.len() as u8, 0xff]);
        assert!(!jws.contains('='), "no padding: {jws}");
    }

    #[test]
    fn anything_but_three_segments_does_not_split() {
        for bad in ["", "a", "a.b", "a.b.c.d", "...."] {
            assert_eq!(Compact::split(bad.as_bytes()), None, "{bad:?}");
        }
        let empty = Compact::split(b"..").unwrap();
        assert_eq!(
            (empty.header, empty.payload, empty.signature, empty.signing_input),
            (&b""[..], &b""[..], &b""[..], &b"."[..])
        );
    }

    #[test]
    fn unverified_claims_are_an_object_or_nothing() {
        let token = |payload: &str| format!("e30.{}.c2ln", encode(payload));
        let claims = unverified_claims(token(r#"{"exp":5}"#).as_bytes()).unwrap();
        assert_eq!(claims.get("exp"), Some(&Value::from(5)));
        assert_eq!(unverified_claims(token("[1]").as_bytes()), None);
        assert_eq!(unverified_claims(token("not json").as_bytes()), None);
        assert_eq!(unverified_claims(b"e30.e30"), None);
        assert_eq!(unverified_claims(b"e30.!!!.c2ln"), None);
    }

    #[test]
    fn padded_or_standard_base64_is_not_base64url() {
        assert_eq!(decode("YQ").unwrap(), b"a");
        assert_eq!(decode("YQ=="), None);
        assert_eq!(decode("+/8"), None);
        assert_eq!(decode("-_8").unwrap(), [0xfb, 0xff]);
    }

    #[test]
    fn key_ids_are_the_unpadded_sha256_of_the_key() {
        let kid = key_id(b"abc");
        assert_eq!(kid, "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
    }
}
