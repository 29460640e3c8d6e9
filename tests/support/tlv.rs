//! One DER TLV, encoded and read by hand, for test code only: the integration tests
//! (through `support::der`, which includes this file) and the fuzz targets
//! (fuzz/src/lib.rs includes it by path too, so there is one copy). A hand-written encoder stays here, out of meshca,
//! because these tests craft malformed encodings on purpose (wrong lengths, wrong or
//! unexpected tags, contents that do not parse) and DER libraries refuse to emit them.
//! Production code encodes and parses ASN.1 with yasna, x509-parser and rcgen.

/// Encodes one DER TLV: single-byte `tag`, definite length (short form below 128
/// bytes, long form above), `content` as given, unchecked.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
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
pub fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_der_lengths_round_trip() {
        let content = vec![7u8; 300];
        let encoded = tlv(0x04, &content);
        assert_eq!(&encoded[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (tag, body, rest) = read_tlv(&encoded).unwrap();
        assert_eq!((tag, body.len(), rest.len()), (0x04, 300, 0));
    }
}
