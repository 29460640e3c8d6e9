//! Issuer keys that never leave a PKCS#11 token (an HSM, or SoftHSM2).
//!
//! [`Uri`] reads an RFC 7512 PKCS#11 URI naming the private key, with the module to
//! load and where its PIN is in the query:
//! `pkcs11:token=meshca;object=issuer;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/meshca/pin`.
//! Path attributes: `token` (the token label), `object` (the key's label), `id`
//! (its `CKA_ID`, percent-encoded bytes), `type` (`private`, the only one that
//! names a signing key); query attributes: `module-path`, and the PIN as
//! `pin-source=file:PATH` or `pin-value`. Others are refused rather than ignored, so
//! a URI never selects a key other than the one it seems to name. The PIN never
//! appears in `Debug`, an error or a log line.
//!
//! [`TokenKey`] opens the token through the `cryptoki` binding (the PKCS#11 C
//! interface; meshca's own code stays free of `unsafe`), logs in, finds the key and
//! its public half, and signs inside the token: ECDSA P-256/P-384 with `CKM_ECDSA`
//! over the SHA-256/SHA-384 digest (ring computes the digest; the token's raw
//! `r ‖ s` is encoded as the DER `Ecdsa-Sig-Value` X.509 carries, with `yasna`), and
//! RSA with `CKM_SHA256_RSA_PKCS`. It implements rcgen's `SigningKey`, so the
//! issuer signs certificates with it exactly as with a key in memory. Sessions are
//! pooled: one is taken for each signature and put back after, so concurrent
//! signers never share one, and the pool never holds more sessions than there were
//! signers at once. [`TokenKey::generate`] makes a key pair inside the token
//! (`CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, `CKA_SIGN` only).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

/// Why a token key could not be opened or used. Messages name the PKCS#11 function
/// and its return code, never the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("not a PKCS#11 URI for the issuer key: {0}")]
    Uri(String),
    #[error("cannot read the PIN file {}: {source}", path.display())]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("cannot load the PKCS#11 module {}: {reason}", path.display())]
    Module { path: PathBuf, reason: String },
    #[error("PKCS#11 {function} failed: {code}")]
    Call { function: String, code: String },
    #[error("{0}")]
    Token(String),
}

fn call(e: cryptoki::error::Error) -> Error {
    match e {
        cryptoki::error::Error::Pkcs11(rv, function) => {
            Error::Call { function: format!("{function:?}"), code: rv_name(rv) }
        }
        other => Error::Call { function: "call".into(), code: other.to_string() },
    }
}

/// The return code as `CKR_…`-style text (the variant name, e.g. `PinIncorrect`).
fn rv_name(rv: RvError) -> String {
    format!("CKR {rv:?}")
}

/// Where the PIN comes from.
#[derive(Clone, PartialEq, Eq)]
enum PinSource {
    File(PathBuf),
    Value(String),
}

/// A PKCS#11 URI naming the issuer's private key (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Uri {
    pub token: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module_path: PathBuf,
    pin: Option<PinSource>,
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pin = match &self.pin {
            Some(PinSource::File(path)) => format!("file:{}", path.display()),
            Some(PinSource::Value(_)) => "(a value)".into(),
            None => "none".into(),
        };
        f.debug_struct("Uri")
            .field("token", &self.token)
            .field("object", &self.object)
            .field("id", &self.id)
            .field("module_path", &self.module_path)
            .field("pin", &pin)
            .finish()
    }
}

fn percent_decode(s: &str) -> Result<Vec<u8>, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex =
                s.get(i + 1..i + 3).ok_or_else(|| Error::Uri("a % not followed by two hex digits".into()))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| Error::Uri("a % not followed by two hex digits".into()))?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(value: &str, what: &str) -> Result<String, Error> {
    String::from_utf8(percent_decode(value)?).map_err(|_| Error::Uri(format!("{what} is not UTF-8")))
}

impl std::str::FromStr for Uri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Uri, Error> {
        let rest =
            s.strip_prefix("pkcs11:").ok_or_else(|| Error::Uri("it does not start with pkcs11:".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Uri { token: None, object: None, id: None, module_path: PathBuf::new(), pin: None };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) =
                attr.split_once('=').ok_or_else(|| Error::Uri(format!("{attr:?} has no value")))?;
            match name {
                "token" => uri.token = Some(text(value, "token")?),
                "object" => uri.object = Some(text(value, "object")?),
                "id" => uri.id = Some(percent_decode(value)?),
                "type" if value == "private" => {}
                "type" => return Err(Error::Uri(format!("type={value}: the issuer key is type=private"))),
                other => return Err(Error::Uri(format!("unsupported path attribute {other:?}"))),
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) =
                attr.split_once('=').ok_or_else(|| Error::Uri(format!("{attr:?} has no value")))?;
            match name {
                "module-path" => uri.module_path = PathBuf::from(text(value, "module-path")?),
                "pin-source" => {
                    let source = text(value, "pin-source")?;
                    let path = source.strip_prefix("file:").unwrap_or(&source);
                    uri.pin = Some(PinSource::File(PathBuf::from(path)));
                }
                "pin-value" => uri.pin = Some(PinSource::Value(text(value, "pin-value")?)),
                other => return Err(Error::Uri(format!("unsupported query attribute {other:?}"))),
            }
        }
        if uri.module_path.as_os_str().is_empty() {
            return Err(Error::Uri("module-path is required (the PKCS#11 module to load)".into()));
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(Error::Uri("object= or id= must name the key".into()));
        }
        Ok(uri)
    }
}

impl Uri {
    fn pin(&self) -> Result<Option<AuthPin>, Error> {
        Ok(match &self.pin {
            None => None,
            Some(PinSource::Value(v)) => Some(AuthPin::from(v.clone())),
            Some(PinSource::File(path)) => {
                let pin = std::fs::read_to_string(path)
                    .map_err(|source| Error::Pin { path: path.clone(), source })?;
                Some(AuthPin::from(pin.trim_end_matches(['\r', '\n']).to_owned()))
            }
        })
    }

    /// The file the PIN is read from (`pin-source=file:…`), if the URI names one.
    pub fn pin_file(&self) -> Option<&Path> {
        match &self.pin {
            Some(PinSource::File(path)) => Some(path),
            _ => None,
        }
    }

    /// The URI as the operator wrote it, without the PIN value.
    pub fn display(&self) -> String {
        let mut s = String::from("pkcs11:");
        let mut path = Vec::new();
        if let Some(t) = &self.token {
            path.push(format!("token={t}"));
        }
        if let Some(o) = &self.object {
            path.push(format!("object={o}"));
        }
        s.push_str(&path.join(";"));
        s.push_str(&format!("?module-path={}", self.module_path.display()));
        s
    }
}

/// The kinds of key the issuer can have in a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    EcP256,
    EcP384,
    Rsa,
}

/// DER of the named-curve OIDs, as `CKA_EC_PARAMS` holds them.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Finalises the module at `path` and forgets it: the next [`loaded`] initialises
/// it anew (every session of it ends).
fn reset(path: &std::path::Path) {
    let mut modules =
        MODULES.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(ctx) = modules.remove(path) {
        let _ = ctx.finalize();
    }
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// A module is loaded and initialised once per process and kept (`C_Initialize` may
/// be called only once, and `C_Finalize` would end every other user's sessions).
fn loaded(path: &std::path::Path) -> Result<Pkcs11, Error> {
    let mut modules =
        MODULES.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::Token(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(call(e)),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// An open token and the private key in it.
struct Open {
    ctx: Pkcs11,
    slot: Slot,
    pin: Option<AuthPin>,
}

impl Open {
    fn new(uri: &Uri) -> Result<Open, Error> {
        let module = |reason: String| Error::Module { path: uri.module_path.clone(), reason };
        if !uri.module_path.is_file() {
            return Err(module("no such file".into()));
        }
        let ctx = loaded(&uri.module_path).map_err(|e| match e {
            Error::Call { .. } => e,
            other => module(other.to_string()),
        })?;
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(call)? {
            let info = ctx.get_token_info(slot).map_err(call)?;
            if uri.token.as_deref().is_none_or(|label| info.label() == label) {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| {
            Error::Token(format!(
                "no token labelled {:?} in {}",
                uri.token.as_deref().unwrap_or("(any)"),
                uri.module_path.display()
            ))
        })?;
        Ok(Open { ctx, slot, pin: uri.pin()? })
    }

    /// A session, logged in (a login holds for every session of the token).
    fn session(&self, rw: bool) -> Result<Session, Error> {
        let session =
            if rw { self.ctx.open_rw_session(self.slot) } else { self.ctx.open_ro_session(self.slot) };
        let session = session.map_err(call)?;
        match session.login(UserType::User, self.pin.as_ref()) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(call(e)),
        }
    }
}

fn key_template(uri: &Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut template = vec![Attribute::Class(class)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

/// A private key in a token, signing for rcgen (see the module docs).
pub struct TokenKey {
    /// The module, the key's handle and the session pool; replaced whole when the
    /// token is reopened after a failure.
    handle: std::sync::RwLock<Arc<Handle>>,
    kind: Kind,
    /// The public key as rcgen's `PublicKeyData` gives it: the EC point, or the
    /// DER `RSAPublicKey`. A reopened token must hold the same key.
    public: Vec<u8>,
    uri: Uri,
    /// Why the last signature failed, until one succeeds.
    failing: Mutex<Option<String>>,
    /// When the token was last reopened (at most one attempt per [`REOPEN_EVERY`]).
    reopened: Mutex<Option<std::time::Instant>>,
}

/// An open token: the module, the private key's handle, and pooled sessions.
struct Handle {
    open: Open,
    key: ObjectHandle,
    sessions: Mutex<Vec<Session>>,
}

/// A failing token is reopened at most this often.
const REOPEN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey").field("uri", &self.uri).field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Opens the token, logs in and finds the private key the URI names and its
    /// public key (the public-key object with the same label or id).
    pub fn open(uri: &Uri) -> Result<TokenKey, Error> {
        let (handle, kind, public) = Self::find(uri)?;
        Ok(TokenKey {
            handle: std::sync::RwLock::new(Arc::new(handle)),
            kind,
            public,
            uri: uri.clone(),
            failing: Mutex::new(None),
            reopened: Mutex::new(None),
        })
    }

    fn find(uri: &Uri) -> Result<(Handle, Kind, Vec<u8>), Error> {
        let open = Open::new(uri)?;
        let session = open.session(false)?;
        let keys = session.find_objects(&key_template(uri, ObjectClass::PRIVATE_KEY)).map_err(call)?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] => return Err(Error::Token(format!("no private key {} in the token", uri.display()))),
            _ => {
                return Err(Error::Token(format!(
                    "{} names {} private keys; add id= to pick one",
                    uri.display(),
                    keys.len()
                )))
            }
        };
        let kind = kind_of(&session, key)?;
        let publics = session.find_objects(&key_template(uri, ObjectClass::PUBLIC_KEY)).map_err(call)?;
        let public = match publics.first() {
            Some(public) => public_bytes(&session, *public, kind)?,
            None if kind == Kind::Rsa => public_bytes(&session, key, kind)?,
            None => return Err(Error::Token(format!("no public key beside {} in the token", uri.display()))),
        };
        Ok((Handle { open, key, sessions: Mutex::new(vec![session]) }, kind, public))
    }

    /// Makes a key pair inside the token under the URI's label and id: the private
    /// key sensitive, not extractable, for signing only.
    pub fn generate(uri: &Uri, kind: Kind) -> Result<TokenKey, Error> {
        let open = Open::new(uri)?;
        let session = open.session(true)?;
        if !session.find_objects(&key_template(uri, ObjectClass::PRIVATE_KEY)).map_err(call)?.is_empty() {
            return Err(Error::Token(format!(
                "the token already holds a key {}; refusing to make another",
                uri.display()
            )));
        }
        let mut naming = Vec::new();
        if let Some(label) = &uri.object {
            naming.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            naming.push(Attribute::Id(id.clone()));
        }
        let mut public = vec![Attribute::Token(true), Attribute::Verify(true)];
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Unwrap(false),
        ];
        public.extend(naming.iter().cloned());
        private.extend(naming);
        let mechanism = match kind {
            Kind::EcP256 | Kind::EcP384 => {
                let params = if kind == Kind::EcP256 { P256_PARAMS } else { P384_PARAMS };
                public.push(Attribute::EcParams(params.to_vec()));
                Mechanism::EccKeyPairGen
            }
            Kind::Rsa => {
                public.push(Attribute::ModulusBits(3072.into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        session.generate_key_pair(&mechanism, &public, &private).map_err(call)?;
        drop(session);
        drop(open);
        TokenKey::open(uri)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The signature algorithm rcgen writes into what this key signs.
    pub fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.kind {
            Kind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Kind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Kind::Rsa => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// Signs `msg` inside the token with a pooled session.
    pub fn sign_message(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        if self.failing().is_some() {
            self.reopen();
        }
        let signed = self.sign_once(msg);
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &signed {
            Ok(_) if failing.is_some() => {
                tracing::info!(issuer_key = %self.uri.display(), "the issuer key's token signs again");
                *failing = None;
            }
            Ok(_) => {}
            Err(e) => *failing = Some(e.to_string()),
        }
        signed
    }

    /// Why the token did not sign last time, until it signs again.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// After a failure (at most once per [`REOPEN_EVERY`]): finalises and
    /// reinitialises the module (a token that went away and came back is seen again
    /// only then), finds the key anew, and uses it only if it is the same key. Then
    /// signs a probe, so that a token that is back is reported healthy without a
    /// request. Returns whether the token signs.
    pub fn reopen(&self) -> bool {
        {
            let mut reopened = self.reopened.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if reopened.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
                return self.failing().is_none();
            }
            *reopened = Some(std::time::Instant::now());
        }
        let current = self.handle.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        current.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        reset(&self.uri.module_path);
        let found = Self::find(&self.uri).and_then(|(handle, _, public)| {
            if public == self.public {
                Ok(handle)
            } else {
                Err(Error::Token(format!(
                    "{} now holds another key than the one tls.crt certifies",
                    self.uri.display()
                )))
            }
        });
        match found {
            Ok(handle) => {
                *self.handle.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(handle);
                let probe = self.sign_once(b"meshca: is the issuer key's token back?");
                let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match probe {
                    Ok(_) => {
                        if failing.take().is_some() {
                            tracing::info!(issuer_key = %self.uri.display(), "the issuer key's token signs again");
                        }
                        true
                    }
                    Err(e) => {
                        *failing = Some(e.to_string());
                        false
                    }
                }
            }
            Err(e) => {
                tracing::warn!(issuer_key = %self.uri.display(), error = %e, "the issuer key's token is still unusable");
                *self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                false
            }
        }
    }

    /// Signs `msg` as a JWS wants it: ECDSA as the fixed `r ‖ s` (ES256, ES384), RSA
    /// as PKCS#1 v1.5 with SHA-256 (RS256).
    pub fn sign_jws(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let der = self.sign_message(msg)?;
        match self.kind {
            Kind::Rsa => Ok(der),
            Kind::EcP256 | Kind::EcP384 => {
                let width = if self.kind == Kind::EcP256 { 32 } else { 48 };
                fixed_ecdsa(&der, width)
            }
        }
    }

    fn sign_once(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let handle = self.handle.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let session = handle.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let session = match session {
            Some(session) => session,
            None => handle.open.session(false)?,
        };
        let signed = match self.kind {
            Kind::Rsa => session.sign(&Mechanism::Sha256RsaPkcs, handle.key, msg).map_err(call),
            Kind::EcP256 | Kind::EcP384 => {
                let digest = match self.kind {
                    Kind::EcP256 => ring::digest::digest(&ring::digest::SHA256, msg),
                    _ => ring::digest::digest(&ring::digest::SHA384, msg),
                };
                session
                    .sign(&Mechanism::Ecdsa, handle.key, digest.as_ref())
                    .map_err(call)
                    .and_then(|raw| ecdsa_der(&raw))
            }
        };
        // A session whose token went away is dropped, not pooled.
        if signed.is_ok() {
            handle.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(session);
        }
        signed
    }

    /// Sessions in the pool now.
    pub fn pooled_sessions(&self) -> usize {
        let handle = self.handle.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let sessions = handle.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        sessions
    }
}

/// The raw `r ‖ s` of `CKM_ECDSA` as the DER `Ecdsa-Sig-Value` (RFC 3279).
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>, Error> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(Error::Token(format!("the token returned a {}-byte ECDSA signature", raw.len())));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_bigint_bytes(r, true);
            w.next().write_bigint_bytes(s, true);
        })
    }))
}

/// The DER `Ecdsa-Sig-Value` back to the fixed `r ‖ s` of `width` bytes each.
fn fixed_ecdsa(der: &[u8], width: usize) -> Result<Vec<u8>, Error> {
    let bad = || Error::Token("not an ECDSA signature".into());
    let (r, s) = yasna::parse_der(der, |reader| {
        reader.read_sequence(|reader| {
            let r = reader.next().read_bigint_bytes()?.0;
            let s = reader.next().read_bigint_bytes()?.0;
            Ok((r, s))
        })
    })
    .map_err(|_| bad())?;
    let mut out = vec![0u8; 2 * width];
    for (i, part) in [r, s].iter().enumerate() {
        let part = part.strip_prefix(&[0u8][..]).unwrap_or(part);
        if part.len() > width {
            return Err(bad());
        }
        out[(i + 1) * width - part.len()..(i + 1) * width].copy_from_slice(part);
    }
    Ok(out)
}

fn kind_of(session: &Session, key: ObjectHandle) -> Result<Kind, Error> {
    let attrs =
        session.get_attributes(key, &[AttributeType::KeyType, AttributeType::EcParams]).map_err(call)?;
    let key_type = attrs.iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(*t),
        _ => None,
    });
    let params = attrs.iter().find_map(|a| match a {
        Attribute::EcParams(p) => Some(p.clone()),
        _ => None,
    });
    match (key_type, params.as_deref()) {
        (Some(KeyType::RSA), _) => Ok(Kind::Rsa),
        (Some(KeyType::EC), Some(P256_PARAMS)) => Ok(Kind::EcP256),
        (Some(KeyType::EC), Some(P384_PARAMS)) => Ok(Kind::EcP384),
        (Some(KeyType::EC), _) => {
            Err(Error::Token("the key is on a curve other than P-256 and P-384".into()))
        }
        _ => Err(Error::Token("the key is neither EC nor RSA".into())),
    }
}

fn public_bytes(session: &Session, object: ObjectHandle, kind: Kind) -> Result<Vec<u8>, Error> {
    match kind {
        Kind::EcP256 | Kind::EcP384 => {
            let attrs = session.get_attributes(object, &[AttributeType::EcPoint]).map_err(call)?;
            let point = attrs.into_iter().find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            });
            let point = point.ok_or_else(|| Error::Token("the public key has no CKA_EC_POINT".into()))?;
            // CKA_EC_POINT is a DER OCTET STRING holding the uncompressed point.
            yasna::parse_der(&point, |r| r.read_bytes())
                .or_else(|_| {
                    if point.first() == Some(&4) {
                        Ok(point.clone())
                    } else {
                        Err(yasna::ASN1Error::new(yasna::ASN1ErrorKind::Invalid))
                    }
                })
                .map_err(|_| Error::Token("CKA_EC_POINT is not an uncompressed point".into()))
        }
        Kind::Rsa => {
            let attrs = session
                .get_attributes(object, &[AttributeType::Modulus, AttributeType::PublicExponent])
                .map_err(call)?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(m) => n = Some(m),
                    Attribute::PublicExponent(x) => e = Some(x),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (n, e) else {
                return Err(Error::Token("the RSA key has no modulus or exponent".into()));
            };
            Ok(yasna::construct_der(|w| {
                w.write_sequence(|w| {
                    w.next().write_bigint_bytes(&n, true);
                    w.next().write_bigint_bytes(&e, true);
                })
            }))
        }
    }
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        TokenKey::algorithm(self)
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_message(msg).map_err(|e| {
            tracing::error!(error = %e, "the issuer key's token did not sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Whether `path` looks like a PKCS#11 URI rather than a file.
pub fn is_uri(value: &str) -> bool {
    value.starts_with("pkcs11:")
}

// Signing workers share one key.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<TokenKey>();
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_uri_names_the_token_the_key_the_module_and_the_pin_source() {
        let uri: Uri = "pkcs11:token=meshca;object=issuer;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/meshca/pin"
            .parse()
            .unwrap();
        assert_eq!((uri.token.as_deref(), uri.object.as_deref()), (Some("meshca"), Some("issuer")));
        assert_eq!(uri.module_path, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert!(matches!(&uri.pin, Some(PinSource::File(p)) if p == Path::new("/etc/meshca/pin")));
        let uri: Uri =
            "pkcs11:object=my%20key;id=%01%02?module-path=/m.so&pin-value=s3cr%65t".parse().unwrap();
        assert_eq!((uri.object.as_deref(), uri.id.as_deref()), (Some("my key"), Some(&[1u8, 2][..])));
        assert!(matches!(&uri.pin, Some(PinSource::Value(v)) if v == "s3cret"));
        assert!(!format!("{uri:?}").contains("s3cret"), "{uri:?}");
        assert!(!uri.display().contains("s3cret"));
    }

    #[test]
    fn uris_that_could_name_another_key_are_refused() {
        for bad in [
            "file:/etc/key",
            "pkcs11:object=k",
            "pkcs11:token=t?module-path=/m.so",
            "pkcs11:object=k;type=public?module-path=/m.so",
            "pkcs11:object=k;slot-description=x?module-path=/m.so",
            "pkcs11:object=k?module-path=/m.so&pin-sourcee=x",
            "pkcs11:object=%zz?module-path=/m.so",
            "pkcs11:object?module-path=/m.so",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_raw_ecdsa_signature_becomes_der_with_minimal_integers() {
        let mut raw = vec![0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has its high bit set: a leading zero byte
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert!(ecdsa_der(&[1, 2, 3]).is_err());
        // And back, zero-padded to the curve's width.
        assert_eq!(fixed_ecdsa(&der, 32).unwrap(), raw);
        assert!(fixed_ecdsa(&der[..10], 32).is_err());
    }
}
