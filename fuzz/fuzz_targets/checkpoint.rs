//! Signed checkpoints and verifier keys on arbitrary bytes, as `meshca audit verify
//! --key VKEYFILE --checkpoint FILE` and `meshca serve` read them.
//!
//! Invariants: opening arbitrary text as a checkpoint never panics and never accepts
//! it (no input carries a valid signature by a key made here); a verifier key that
//! parses prints back as the same text; and a checkpoint built from the input (an
//! origin line, a size, a root, extension lines) signs and opens back equal, while
//! the same note with any one byte of its text changed does not open.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshca::audit::checkpoint::{Checkpoint, SigningKey, VerifierKey};

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("meshca/fuzz.example").expect("key").0)
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    let text = String::from_utf8_lossy(data);
    assert!(
        Checkpoint::open(&text, &[key.verifier()]).is_err(),
        "accepted a note signed by no one: {text:?}"
    );
    if let Ok(vkey) = text.trim().parse::<VerifierKey>() {
        assert_eq!(vkey.to_string(), text.trim(), "a verifier key prints back as read");
    }
    // A checkpoint from the input: origin, size and root from the first bytes, the
    // remaining lines as extensions (each non-empty, without a line feed).
    if data.len() < 48 {
        return;
    }
    let origin: String = data[..8].iter().map(|b| char::from(b'a' + b % 26)).collect();
    let size = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let mut root = [0u8; 32];
    root.copy_from_slice(&data[16..48]);
    let extensions: Vec<String> = String::from_utf8_lossy(&data[48..])
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let checkpoint = Checkpoint { origin: format!("meshca/fuzz.example/{origin}"), size, root, extensions };
    let note = key.sign(&checkpoint);
    assert_eq!(Checkpoint::open(&note, &[key.verifier()]).expect("a signed checkpoint opens"), checkpoint);
    let text_len = checkpoint.text().len();
    let at = usize::from(data[0]) * text_len / 256;
    let mut bytes = note.into_bytes();
    bytes[at] ^= 0x01;
    if let Ok(changed) = String::from_utf8(bytes) {
        assert!(Checkpoint::open(&changed, &[key.verifier()]).is_err(), "a changed text opened: {changed:?}");
    }
});
