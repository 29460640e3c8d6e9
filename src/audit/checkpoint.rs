//! Signed checkpoints: the audit log's tree size and root in the C2SP
//! `tlog-checkpoint` form, wrapped in a C2SP `signed-note` with meshca's Ed25519
//! audit key (ring signs and verifies).
//!
//! A checkpoint's text is three lines and, optionally, extension lines:
//!
//! ```text
//! meshca/cluster.local/3f2a9c0d11b4e5f6     origin: meshca/<trust domain>/<log id>
//! 1042                                       tree size (records)
//! 7Uq...=                                    base64 of the RFC 6962 root hash
//! closed                                     (only in the checkpoint written at a clean stop)
//! ```
//!
//! The log id is the first 16 hex digits of the `hash` of the log's first record,
//! so a checkpoint names the one log it is about. The note is the text, a blank
//! line, and one signature line per key: `— <key name> <base64(key hash ‖ signature)>`,
//! where the key hash is the first four bytes of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`
//! and the signature is over the text's bytes. The verifier key is the text
//! `<name>+<key hash, 8 hex digits>+<base64(0x01 ‖ public key)>` (the form Go's
//! `golang.org/x/mod/sumdb/note` reads). meshca's key name is `meshca/<trust domain>`.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use super::merkle::Hash;

/// The Ed25519 algorithm byte in signed-note keys.
const ALG_ED25519: u8 = 1;
/// A checkpoint file larger than this is not one of meshca's.
pub const MAX_NOTE: usize = 16 * 1024;
/// The extension line of a checkpoint written as the log was closed.
pub const CLOSED: &str = "closed";

/// Why a key or a checkpoint was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    BadKey { path: std::path::PathBuf, reason: String },
    #[error("not a verifier key (want NAME+HASH+BASE64): {0}")]
    BadVerifierKey(&'static str),
    #[error("not a signed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("the checkpoint carries no valid signature by {0}")]
    Unsigned(String),
}

/// The name meshca's audit key signs under.
pub fn key_name(trust_domain: &str) -> String {
    format!("meshca/{trust_domain}")
}

/// A log's origin line.
pub fn origin(trust_domain: &str, log_id: &str) -> String {
    format!("meshca/{trust_domain}/{log_id}")
}

/// The log id: the first 16 hex digits of the first record's hash.
pub fn log_id(first_record_hash: &str) -> String {
    first_record_hash.chars().take(16).collect()
}

fn key_hash(name: &str, public: &[u8]) -> u32 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[ALG_ED25519]);
    ctx.update(public);
    let d = ctx.finish();
    u32::from_be_bytes([d.as_ref()[0], d.as_ref()[1], d.as_ref()[2], d.as_ref()[3]])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// meshca's audit signing key: an Ed25519 key pair and the name it signs under.
/// `Debug` shows the name and the public key only.
pub struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("verifier", &self.verifier().to_string()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// From PKCS#8 DER (v1, as `openssl genpkey -algorithm ed25519` writes it, or v2).
    pub fn from_pkcs8(name: &str, der: &[u8]) -> Result<SigningKey, &'static str> {
        if !valid_name(name) {
            return Err("the key name is empty or holds a space or a plus");
        }
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|_| "not an Ed25519 PKCS#8 key")?;
        Ok(SigningKey { name: name.to_owned(), pair })
    }

    /// Reads a `PRIVATE KEY` PEM file (Ed25519 PKCS#8); refuses a world-readable one.
    pub fn read(name: &str, path: &Path) -> Result<SigningKey, Error> {
        let bad = |reason: String| Error::BadKey { path: path.to_path_buf(), reason };
        crate::ca::material::check_not_world_readable(path).map_err(|e| bad(e.to_string()))?;
        let der = crate::ca::material::read_pkcs8_key(path).map_err(|e| bad(e.to_string()))?;
        SigningKey::from_pkcs8(name, &der).map_err(|e| bad(e.into()))
    }

    /// A new key, and its PKCS#8 PEM to store.
    pub fn generate(name: &str) -> Result<(SigningKey, String), &'static str> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "the system random generator failed")?;
        let key = SigningKey::from_pkcs8(name, der.as_ref())?;
        Ok((key, crate::ca::material::to_pem("PRIVATE KEY", der.as_ref())))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key that checks this key's signatures.
    pub fn verifier(&self) -> VerifierKey {
        let mut public = [0; 32];
        public.copy_from_slice(self.pair.public_key().as_ref());
        VerifierKey { hash: key_hash(&self.name, &public), name: self.name.clone(), public }
    }

    /// The signed note of `checkpoint`.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let text = checkpoint.text();
        let mut blob = self.verifier().hash.to_be_bytes().to_vec();
        blob.extend_from_slice(self.pair.sign(text.as_bytes()).as_ref());
        format!("{text}\n\u{2014} {} {}\n", self.name, BASE64.encode(blob))
    }
}

/// A verifier key, as `NAME+HASH+BASE64` text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierKey {
    pub name: String,
    hash: u32,
    public: [u8; 32],
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(&self.public);
        write!(f, "{}+{:08x}+{}", self.name, self.hash, BASE64.encode(key))
    }
}

impl std::str::FromStr for VerifierKey {
    type Err = Error;

    fn from_str(text: &str) -> Result<VerifierKey, Error> {
        let bad = Error::BadVerifierKey;
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("three +-separated parts"));
        };
        if !valid_name(name) {
            return Err(bad("the name is empty or holds a space"));
        }
        if hash.len() != 8 {
            return Err(bad("the key hash is 8 hex digits"));
        }
        let hash = u32::from_str_radix(hash, 16).map_err(|_| bad("the key hash is 8 hex digits"))?;
        let key = BASE64.decode(key).map_err(|_| bad("the key is not base64"))?;
        let (Some(&ALG_ED25519), Ok(public)) = (key.first(), <[u8; 32]>::try_from(&key[1.min(key.len())..]))
        else {
            return Err(bad("not an Ed25519 key"));
        };
        if key_hash(name, &public) != hash {
            return Err(bad("the key hash does not match the name and key"));
        }
        Ok(VerifierKey { name: name.to_owned(), hash, public })
    }
}

impl VerifierKey {
    /// Reads a verifier key file (its first line).
    pub fn read(path: &Path) -> Result<VerifierKey, Error> {
        let text = read_bounded(path)?;
        text.lines().next().unwrap_or_default().parse()
    }
}

fn read_bounded(path: &Path) -> Result<String, Error> {
    use std::io::Read as _;
    let read = |source| Error::Read { path: path.to_path_buf(), source };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_NOTE as u64 + 1).read_to_string(&mut text))
        .map_err(read)?;
    Ok(text)
}

/// A tree head: which log, how many records, which root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Extension lines ([`CLOSED`] for the checkpoint of a clean stop).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note text: origin, size, base64 root, extension lines, each ending in a line feed.
    pub fn text(&self) -> String {
        let mut text = format!("{}\n{}\n{}\n", self.origin, self.size, BASE64.encode(self.root));
        for line in &self.extensions {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Whether meshca wrote this checkpoint as it closed the log (nothing follows it
    /// until the next start writes a checkpoint of its own).
    pub fn closed(&self) -> bool {
        self.extensions.iter().any(|e| e == CLOSED)
    }

    /// The log id in the origin (its last `/`-separated part).
    pub fn log_id(&self) -> &str {
        self.origin.rsplit('/').next().unwrap_or_default()
    }

    fn parse_text(text: &str) -> Result<Checkpoint, Error> {
        let bad = Error::Malformed;
        let mut lines =
            text.strip_suffix('\n').ok_or(bad("the text does not end in a line feed"))?.split('\n');
        let origin = lines.next().filter(|o| !o.is_empty()).ok_or(bad("no origin line"))?;
        let size = lines.next().and_then(|s| s.parse().ok()).ok_or(bad("no tree size line"))?;
        let root = lines
            .next()
            .and_then(|r| BASE64.decode(r).ok())
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or(bad("no root hash line"))?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(bad("an empty extension line"));
        }
        Ok(Checkpoint { origin: origin.to_owned(), size, root, extensions })
    }

    /// Opens a signed note: it must carry a valid signature by one of `keys`.
    pub fn open(note: &str, keys: &[VerifierKey]) -> Result<Checkpoint, Error> {
        if note.len() > MAX_NOTE {
            return Err(Error::Malformed("longer than 16 KiB"));
        }
        let split = note.rfind("\n\n").ok_or(Error::Malformed("no blank line before the signatures"))?;
        let (text, signatures) = (&note[..=split], &note[split + 2..]);
        let checkpoint = Checkpoint::parse_text(text)?;
        let signatures = signatures.strip_suffix('\n').ok_or(Error::Malformed("no signature line"))?;
        for line in signatures.split('\n') {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return Err(Error::Malformed("a signature line does not start with an em dash"));
            };
            let (name, blob) =
                rest.split_once(' ').ok_or(Error::Malformed("a signature line without a name"))?;
            let blob = BASE64.decode(blob).map_err(|_| Error::Malformed("a signature is not base64"))?;
            if blob.len() < 4 {
                return Err(Error::Malformed("a signature too short"));
            }
            let (hash, signature) = blob.split_at(4);
            for key in keys.iter().filter(|k| k.name == name && k.hash.to_be_bytes() == hash) {
                if UnparsedPublicKey::new(&ED25519, key.public).verify(text.as_bytes(), signature).is_ok() {
                    return Ok(checkpoint);
                }
            }
        }
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        Err(Error::Unsigned(names.join(", ")))
    }

    /// Reads and opens a checkpoint file.
    pub fn read(path: &Path, keys: &[VerifierKey]) -> Result<(Checkpoint, String), Error> {
        let note = read_bounded(path)?;
        Ok((Checkpoint::open(&note, keys)?, note))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: origin("cluster.local", "0123456789abcdef"),
            size: 42,
            root: super::super::merkle::leaf_hash(b"x"),
            extensions: vec![],
        }
    }

    #[test]
    fn a_signed_checkpoint_opens_with_its_verifier_key_and_with_no_other() {
        let (key, pem) = SigningKey::generate(&key_name("cluster.local")).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let vkey: VerifierKey = key.verifier().to_string().parse().unwrap();
        assert_eq!(vkey, key.verifier());
        assert!(vkey.to_string().starts_with("meshca/cluster.local+"));
        let note = key.sign(&checkpoint());
        assert!(note.starts_with("meshca/cluster.local/0123456789abcdef\n42\n"), "{note}");
        assert!(note.contains("\n\n\u{2014} meshca/cluster.local "), "{note}");
        assert_eq!(Checkpoint::open(&note, std::slice::from_ref(&vkey)).unwrap(), checkpoint());

        let (other, _) = SigningKey::generate(&key_name("cluster.local")).unwrap();
        assert!(matches!(Checkpoint::open(&note, &[other.verifier()]), Err(Error::Unsigned(_))));
        // Any change to the signed text fails.
        let bigger = note.replacen("\n42\n", "\n43\n", 1);
        assert!(matches!(Checkpoint::open(&bigger, std::slice::from_ref(&vkey)), Err(Error::Unsigned(_))));
        let closed = Checkpoint { extensions: vec![CLOSED.into()], ..checkpoint() };
        let note = key.sign(&closed);
        let opened = Checkpoint::open(&note, std::slice::from_ref(&vkey)).unwrap();
        assert!(opened.closed() && !checkpoint().closed());
        assert_eq!(opened.log_id(), "0123456789abcdef");
        let unclosed = note.replacen("closed\n", "", 1);
        assert!(Checkpoint::open(&unclosed, &[vkey]).is_err());
    }

    #[test]
    fn malformed_keys_and_notes_are_refused() {
        let (key, _) = SigningKey::generate("meshca/td").unwrap();
        let good = key.verifier().to_string();
        for bad in [
            "",
            "name",
            "name+1234abcd",
            &good.replacen("meshca/td", "meshca/other", 1),
            &good.replacen('+', "+0", 1),
            &format!("{good}AA"),
        ] {
            assert!(bad.parse::<VerifierKey>().is_err(), "{bad}");
        }
        assert!(SigningKey::generate("with space").is_err());
        let note = key.sign(&checkpoint());
        for bad in [
            note.replacen("\n\n", "\n", 1),
            note.replacen("\u{2014}", "-", 1),
            format!("{}x", note),
            note.replacen("\n42\n", "\nforty\n", 1),
            "x".repeat(MAX_NOTE + 1),
        ] {
            assert!(Checkpoint::open(&bad, &[key.verifier()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_shows_no_private_key() {
        let (key, pem) = SigningKey::generate("meshca/td").unwrap();
        let der = crate::auth::dev::pem_decode(&pem, "PRIVATE KEY").unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.verifier().to_string()));
        // PKCS#8 v2 for Ed25519: the 32-byte seed follows a 16-byte header.
        assert!(
            !debug.contains(&BASE64.encode(&der[16..48]))
                && !debug.contains(&crate::audit::hex(&der[16..48]))
        );
    }
}
