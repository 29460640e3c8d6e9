//! Bootstrap tokens: a first certificate for a host that has no Kubernetes token.
//!
//! `meshca bootstrap-token create --identity NAME` (run by an operator who can read
//! the server's issuer directory) mints a token bound to one identity, signed with
//! the *current issuer's* private key. The host presents it once (`meshca agent
//! --token-file`), gets a certificate, and from then on renews by proof of
//! possession (`super::peer`): it never needs a token again while it renews in time.
//!
//! # Format
//!
//! `mcbt1.` followed by a compact JWS, so a bootstrap token is told from a
//! Kubernetes token by its prefix, without parsing. The JWS header is exactly
//! `{"alg", "typ", "kid"}`: `alg` follows the issuer key (ES256 for P-256, ES384 for
//! P-384, RS256 for RSA), `typ` is [`TYP`], `kid` the issuer certificate's SHA-256
//! fingerprint (hex). The claims are exactly these, all required:
//!
//! | claim  | value |
//! |--------|-------|
//! | `iss`  | [`ISSUER`] (`meshca-bootstrap`) |
//! | `aud`  | [`audience`]: `meshca-bootstrap:` + the trust domain |
//! | `sub`  | the identity's full DNS name, `SA.NS.serviceaccount.identity.CPNS.TD` |
//! | `jti`  | 128 random bits, 32 lowercase hex digits: the token id in audit records |
//! | `iat`, `exp` | integer Unix seconds; `exp - iat` at most [`MAX_TTL`] |
//! | `uses` | how many certificates the token may get, 1 to [`MAX_USES`] |
//!
//! # Verification
//!
//! [`verify`] checks, in this order: size, segments, a strict header (duplicate or
//! unknown keys refused; `none`, HMAC and any algorithm but the issuer key's
//! refused), that `kid` names the current issuer, the signature with the issuer's
//! public key, then strict claims (duplicates and unknown claims refused), time with
//! the token leeway, `iss`, `aud`, and `sub` read back with the deployment's naming
//! into a [`Subject`] (issuer [`ISSUER`], no pod). Authorization (`crate::identity`)
//! then requires the CSR to ask for exactly that identity.
//!
//! Rotating the issuer invalidates every bootstrap token it signed that has not been
//! used: the `kid` no longer names the current issuer ([`Error::BootstrapUnknownKey`]).
//!
//! # Single use
//!
//! A token is spent only once a request has passed every check and is about to be
//! signed ([`BootstrapTokens::spend`]; a dry run asks [`BootstrapTokens::unspent`]
//! instead, which reads the store and spends nothing): one use is recorded in a
//! [`ReplayStore`] (a Lease per use in Kubernetes, a file on one host), and a token
//! used up is refused with [`Error::BootstrapTokenUsed`]. A store that cannot answer
//! refuses the request ([`Error::Unavailable`]): no certificate without a record of
//! the use.
//!
//! The issuer key signs these tokens as well as certificates. The two cannot be
//! confused: a JWS signing input is ASCII base64url text, a TBSCertificate DER that
//! starts with a SEQUENCE tag.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256,
};
use serde_json::{json, Map, Value};

use super::jwt::{b64, parse_object};
use super::replay::ReplayStore;
use super::{Error, Subject};
use crate::ca::issuer::Issuer;
use crate::ca::store::Store;
use crate::identity::Naming;
use crate::jose::Compact;

/// What every bootstrap token starts with.
pub const PREFIX: &str = "mcbt1.";
/// The JWS header `typ`.
pub const TYP: &str = "meshca-bootstrap+jwt";
/// The `iss` claim, and [`Subject::issuer`] of bootstrapped callers.
pub const ISSUER: &str = "meshca-bootstrap";
/// `auth_method` in audit records of requests that presented a bootstrap token.
pub(crate) const METHOD: &str = "bootstrap";
/// Lifetime of a token unless `--ttl` says otherwise (the flag's default, `1h`).
#[cfg(test)]
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime a token may have (`exp - iat`).
pub(crate) const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most certificates one token may get.
pub(crate) const MAX_USES: u32 = 100;

/// The `aud` of bootstrap tokens for a deployment: `meshca-bootstrap:TRUST_DOMAIN`.
pub fn audience(naming: &Naming) -> String {
    format!("{ISSUER}:{}", naming.trust_domain())
}

/// True when `token` (surrounding whitespace aside) is a bootstrap token by its prefix.
pub(crate) fn is_bootstrap_token(token: &[u8]) -> bool {
    token.trim_ascii_start().starts_with(PREFIX.as_bytes())
}

/// A signature algorithm of bootstrap tokens: the issuer key's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    ES256,
    ES384,
    RS256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::RS256 => "RS256",
        }
    }

    /// The algorithm an issuer key of this rcgen algorithm signs tokens with;
    /// `None` for keys bootstrap tokens do not use (Ed25519, RSA-PSS).
    fn of_issuer(alg: &rcgen::SignatureAlgorithm) -> Option<Algorithm> {
        if *alg == rcgen::PKCS_ECDSA_P256_SHA256 {
            Some(Algorithm::ES256)
        } else if *alg == rcgen::PKCS_ECDSA_P384_SHA384 {
            Some(Algorithm::ES384)
        } else if *alg == rcgen::PKCS_RSA_SHA256 {
            // RSA issuer keys sign with SHA-256 alone: rcgen loads an RSA key file so,
            // and `ca::hierarchy` and `ca::token` choose it.
            Some(Algorithm::RS256)
        } else {
            None
        }
    }

    fn parse(alg: &str) -> Result<Algorithm, Error> {
        match alg {
            "ES256" => Ok(Algorithm::ES256),
            "ES384" => Ok(Algorithm::ES384),
            "RS256" => Ok(Algorithm::RS256),
            _ => Err(Error::UnsupportedAlgorithm),
        }
    }

    fn verification(self) -> &'static dyn ring::signature::VerificationAlgorithm {
        match self {
            Algorithm::ES256 => &ECDSA_P256_SHA256_FIXED,
            Algorithm::ES384 => &ECDSA_P384_SHA384_FIXED,
            Algorithm::RS256 => &RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

/// The claims of a bootstrap token, as minted or as verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The identity's full DNS name (`sub`).
    pub identity: String,
    /// `jti`: 32 lowercase hex digits.
    pub token_id: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub uses: u32,
}

/// A minted token. `Debug` never shows it; [`BootstrapToken::expose`] does, for stdout.
pub struct BootstrapToken(String);

impl BootstrapToken {
    /// The token text, `mcbt1.` + JWS: a credential, for stdout and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

enum SigningKey {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    /// The issuer key in a PKCS#11 token (`--issuer-key`).
    Token(std::sync::Arc<crate::ca::token::TokenKey>),
}

/// The issuer key, ready to sign bootstrap tokens for one deployment.
pub struct BootstrapSigner {
    key: SigningKey,
    alg: Algorithm,
    kid: String,
    audience: String,
    naming: Naming,
    rng: SystemRandom,
}

impl fmt::Debug for BootstrapSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapSigner")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Why a signer could not be made or a token not minted.
fn signing(reason: &'static str) -> Error {
    Error::Signing { reason }
}

impl BootstrapSigner {
    /// The signer for `issuer`, whose PKCS#8 private key is `pkcs8` (the issuer
    /// directory's `tls.key`). Refused when the key is not the issuer
    /// certificate's, or is of a type bootstrap tokens do not use.
    pub fn new(pkcs8: &[u8], issuer: &Issuer, naming: Naming) -> Result<BootstrapSigner, Error> {
        let rng = SystemRandom::new();
        let (issuer_alg, public) = issuer.public_key();
        let alg = Algorithm::of_issuer(issuer_alg).ok_or(Error::Config {
            reason: "bootstrap tokens need a P-256, P-384 or RSA issuer key".into(),
        })?;
        let key = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let signing_alg = if alg == Algorithm::ES256 {
                    &ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &ECDSA_P384_SHA384_FIXED_SIGNING
                };
                let key = EcdsaKeyPair::from_pkcs8(signing_alg, pkcs8, &rng)
                    .map_err(|_| signing("the issuer key is not a PKCS#8 key of the issuer's curve"))?;
                SigningKey::Ecdsa(key)
            }
            Algorithm::RS256 => SigningKey::Rsa(
                RsaKeyPair::from_pkcs8(pkcs8)
                    .map_err(|_| signing("the issuer key is not a PKCS#8 RSA key"))?,
            ),
        };
        let own_public = match &key {
            SigningKey::Ecdsa(k) => ring::signature::KeyPair::public_key(k).as_ref(),
            SigningKey::Rsa(k) => ring::signature::KeyPair::public_key(k).as_ref(),
            SigningKey::Token(t) => rcgen::PublicKeyData::der_bytes(t.as_ref()),
        };
        if own_public != public {
            return Err(signing("the issuer key does not belong to the issuer certificate"));
        }
        Ok(Self::with_key(key, alg, issuer, naming, rng))
    }

    /// The signer for `issuer` whose key is in a PKCS#11 token: the token signs.
    pub fn with_token(
        token: std::sync::Arc<crate::ca::token::TokenKey>,
        issuer: &Issuer,
        naming: Naming,
    ) -> Result<BootstrapSigner, Error> {
        let (issuer_alg, public) = issuer.public_key();
        let alg = Algorithm::of_issuer(issuer_alg).ok_or(Error::Config {
            reason: "bootstrap tokens need a P-256, P-384 or RSA issuer key".into(),
        })?;
        if rcgen::PublicKeyData::der_bytes(token.as_ref()) != public {
            return Err(signing("the issuer key does not belong to the issuer certificate"));
        }
        Ok(Self::with_key(SigningKey::Token(token), alg, issuer, naming, SystemRandom::new()))
    }

    fn with_key(
        key: SigningKey,
        alg: Algorithm,
        issuer: &Issuer,
        naming: Naming,
        rng: SystemRandom,
    ) -> BootstrapSigner {
        BootstrapSigner {
            key,
            alg,
            kid: issuer.fingerprint().to_owned(),
            audience: audience(&naming),
            naming,
            rng,
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The `kid`: the issuer certificate's SHA-256 fingerprint (hex).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a token for `identity` (a full identity name of this deployment),
    /// valid for `ttl` from `now` and for `uses` certificates.
    pub fn create(
        &self,
        identity: &str,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<(BootstrapToken, Claims), Error> {
        if self.naming.parse(identity).is_none() {
            return Err(signing("the identity is not an identity of this trust domain and control plane"));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(signing("the lifetime must be more than 0 and at most 24h"));
        }
        if uses == 0 || uses > MAX_USES {
            return Err(signing("the number of uses must be 1 to 100"));
        }
        let iat = now.duration_since(UNIX_EPOCH).map_err(|_| signing("the clock is before 1970"))?.as_secs();
        let exp = iat + ttl.as_secs().max(1);
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut id)
            .map_err(|_| signing("the random generator failed"))?;
        let token_id = crate::audit::hex(&id);
        let header = json!({"alg": self.alg.as_str(), "typ": TYP, "kid": self.kid});
        let claims = json!({"iss": ISSUER, "aud": self.audience, "sub": identity, "jti": token_id,
            "iat": iat, "exp": exp, "uses": uses});
        let jws = self.sign_raw(header.to_string().as_bytes(), claims.to_string().as_bytes())?;
        let claims = Claims {
            identity: identity.to_owned(),
            token_id,
            issued_at: UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
            uses,
        };
        Ok((BootstrapToken(format!("{PREFIX}{jws}")), claims))
    }

    /// Signs arbitrary header and claims bytes into a compact JWS (no prefix), for
    /// hostile-input tests.
    pub fn sign_raw(&self, header_json: &[u8], claims_json: &[u8]) -> Result<String, Error> {
        crate::jose::compact_jws(header_json, claims_json, |msg| match &self.key {
            SigningKey::Ecdsa(key) => {
                Ok(key.sign(&self.rng, msg).map_err(|_| signing("ECDSA signing failed"))?.as_ref().to_vec())
            }
            SigningKey::Rsa(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
                    .map_err(|_| signing("RSA signing failed"))?;
                Ok(sig)
            }
            SigningKey::Token(token) => token.sign_jws(msg).map_err(|e| {
                tracing::error!(error = %e, "the issuer key's token did not sign the bootstrap token");
                signing("the issuer key's PKCS#11 token did not sign")
            }),
        })
    }
}

/// A token that passed every check: who it vouches for, and its claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub subject: Subject,
    pub claims: Claims,
}

fn malformed(what: &'static str) -> Error {
    Error::Malformed { what }
}

/// Verifies a bootstrap token against the current `issuer` at `now` (see the module
/// documentation for the checks and their order). Nothing is spent here.
pub fn verify(
    token: &[u8],
    issuer: &Issuer,
    naming: &Naming,
    leeway: Duration,
    now: SystemTime,
) -> Result<Verified, Error> {
    let token = super::trimmed(token)?;
    let jws = token.strip_prefix(PREFIX.as_bytes()).ok_or(malformed("not a bootstrap token"))?;
    let Some(parts) = Compact::split(jws) else {
        return Err(malformed("not three dot-separated segments"));
    };
    let header = parse_object(&b64(parts.header, "header is not base64url")?, "header is not a JSON object")?;
    if header.keys().any(|k| !matches!(k.as_str(), "alg" | "typ" | "kid")) {
        return Err(malformed("header has fields other than alg, typ and kid"));
    }
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => Algorithm::parse(alg)?,
        _ => return Err(malformed("header alg is missing or not a string")),
    };
    if header.get("typ").and_then(Value::as_str) != Some(TYP) {
        return Err(malformed("header typ is not meshca-bootstrap+jwt"));
    }
    let Some(Value::String(kid)) = header.get("kid") else {
        return Err(malformed("header kid is missing or not a string"));
    };
    if kid != issuer.fingerprint() {
        return Err(Error::BootstrapUnknownKey);
    }
    let (issuer_alg, public) = issuer.public_key();
    if Algorithm::of_issuer(issuer_alg) != Some(alg) {
        return Err(Error::UnsupportedAlgorithm);
    }
    let sig = b64(parts.signature, "signature is not base64url")?;
    let msg = parts.signing_input;
    UnparsedPublicKey::new(alg.verification(), public).verify(msg, &sig).map_err(|_| Error::BadSignature)?;
    let claims =
        parse_object(&b64(parts.payload, "payload is not base64url")?, "claims are not a JSON object")?;
    check_claims(&claims, naming, leeway, now)
}

fn check_claims(
    claims: &Map<String, Value>,
    naming: &Naming,
    leeway: Duration,
    now: SystemTime,
) -> Result<Verified, Error> {
    const CLAIMS: [&str; 7] = ["iss", "aud", "sub", "jti", "iat", "exp", "uses"];
    if claims.keys().any(|k| !CLAIMS.contains(&k.as_str())) {
        return Err(malformed("claims other than iss, aud, sub, jti, iat, exp and uses"));
    }
    let seconds = |name: &str, what: &'static str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().filter(|s| *s < 1 << 40).map(Some).ok_or(malformed(what)),
    };
    let exp = seconds("exp", "exp is not integer Unix seconds")?.ok_or(Error::MissingExpiry)?;
    let iat = seconds("iat", "iat is not integer Unix seconds")?.ok_or(malformed("iat is missing"))?;
    if exp <= iat || exp - iat > MAX_TTL.as_secs() {
        return Err(malformed("lifetime (exp - iat) is not more than 0 and at most 24h"));
    }
    let (exp, iat) = (UNIX_EPOCH + Duration::from_secs(exp), UNIX_EPOCH + Duration::from_secs(iat));
    if now.duration_since(exp).is_ok_and(|late| late > leeway) {
        return Err(Error::Expired { exp, now });
    }
    if iat.duration_since(now).is_ok_and(|early| early > leeway) {
        return Err(Error::IssuedInFuture { iat, now });
    }
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == ISSUER => {}
        None | Some(Value::String(_)) => return Err(Error::WrongIssuer),
        Some(_) => return Err(malformed("iss is not a string")),
    }
    match claims.get("aud") {
        Some(Value::String(aud)) if *aud == audience(naming) => {}
        None | Some(Value::String(_)) => return Err(Error::WrongAudience),
        Some(_) => return Err(malformed("aud is not a string")),
    }
    let token_id = match claims.get("jti") {
        Some(Value::String(jti)) if is_token_id(jti) => jti.clone(),
        _ => return Err(malformed("jti is not 32 lowercase hex digits")),
    };
    let uses = match claims.get("uses").and_then(Value::as_u64) {
        Some(n @ 1..) if n <= u64::from(MAX_USES) => n as u32,
        _ => return Err(malformed("uses is not an integer from 1 to 100")),
    };
    let Some(Value::String(identity)) = claims.get("sub") else {
        return Err(malformed("sub is missing or not a string"));
    };
    let (namespace, service_account) =
        naming.parse(identity).ok_or(malformed("sub is not an identity of this deployment"))?;
    let subject =
        Subject { namespace, service_account, pod_name: None, pod_uid: None, issuer: ISSUER.to_owned() };
    let claims = Claims { identity: identity.clone(), token_id, issued_at: iat, expires_at: exp, uses };
    Ok(Verified { subject, claims })
}

fn is_token_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `jti` a bootstrap token claims, read without verifying anything: for the
/// audit record of a token [`verify`] accepted. `None` unless it is a well-formed id.
pub fn claimed_token_id(token: &[u8]) -> Option<String> {
    let jws = token.trim_ascii().strip_prefix(PREFIX.as_bytes())?;
    let claims = crate::jose::unverified_claims(jws)?;
    claims.get("jti")?.as_str().filter(|jti| is_token_id(jti)).map(str::to_owned)
}

/// `--bootstrap-tokens`: how bootstrap tokens are checked and their uses recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapConfig {
    pub replay: ReplayConfig,
    /// Clock skew tolerated on `exp` and `iat` (`--token-leeway`).
    pub leeway: Duration,
}

/// Where the uses of bootstrap tokens are recorded (`auth::replay`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayConfig {
    /// A local file: one replica only.
    File(PathBuf),
    /// A Lease per use in the control-plane namespace. `None`: `KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service account.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Bootstrap tokens as the issuance core meets them: told from other tokens by their
/// prefix ([`is_bootstrap_token`]) before any [`Authenticator`] sees one, verified
/// against the issuer current now, and spent only once their request has passed
/// every check ([`Self::spend`]; a dry run asks [`Self::unspent`]). Disabled (no
/// replay store: `--bootstrap-tokens` off) they are refused as such
/// ([`Error::BootstrapDisabled`]), so the caller is told so rather than that its
/// token is malformed.
pub struct BootstrapTokens {
    /// The current issuer: its key verifies tokens.
    store: Arc<Store>,
    replay: Option<Arc<dyn ReplayStore>>,
    naming: Naming,
    leeway: Duration,
}

impl fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("replay", &self.replay.as_ref().map(|r| r.name()))
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl BootstrapTokens {
    /// Accepting bootstrap tokens, their uses recorded in `replay`.
    pub fn new(store: Arc<Store>, replay: Arc<dyn ReplayStore>, naming: Naming, leeway: Duration) -> Self {
        BootstrapTokens { store, replay: Some(replay), naming, leeway }
    }

    /// Refusing every bootstrap token as not enabled.
    pub fn disabled(store: Arc<Store>, naming: Naming) -> Self {
        BootstrapTokens { store, replay: None, naming, leeway: Duration::ZERO }
    }

    /// Verifies a bootstrap token against the issuer current now; refuses it when
    /// bootstrap tokens are disabled.
    pub fn verify(&self, token: &[u8], now: SystemTime) -> Result<Verified, Error> {
        if self.replay.is_none() {
            return Err(Error::BootstrapDisabled);
        }
        let snapshot = self.store.current().ok_or_else(|| Error::Unavailable {
            reason: "no issuer is loaded to check the token with".into(),
        })?;
        verify(token, &snapshot.issuer, &self.naming, self.leeway, now)
    }

    /// Who the token names, once it verifies (spending nothing).
    pub(crate) fn authenticate(&self, token: &[u8], now: SystemTime) -> Result<Subject, Error> {
        self.verify(token, now).map(|v| v.subject)
    }

    /// Spends one use of the token: its request passed every check and is about
    /// to be answered with a certificate, which leaves only if this succeeds.
    pub(crate) async fn spend(&self, token: &[u8], now: SystemTime) -> Result<(), Error> {
        let verified = self.verify(token, now)?;
        let replay = self.replay.as_ref().ok_or(Error::BootstrapDisabled)?;
        let claims = &verified.claims;
        // The last moment any verifier, under any leeway meshca accepts, accepts the
        // token: the record need not outlive it, and must not die before it.
        let expires = claims.expires_at + super::MAX_TOKEN_LEEWAY;
        replay.consume(&claims.token_id, claims.uses, expires).await.map_err(Error::from)
    }

    /// Whether [`Self::spend`] would find a use left, spending none (a dry run).
    pub(crate) async fn unspent(&self, token: &[u8], now: SystemTime) -> Result<(), Error> {
        let verified = self.verify(token, now)?;
        let replay = self.replay.as_ref().ok_or(Error::BootstrapDisabled)?;
        replay.check(&verified.claims.token_id, verified.claims.uses).await.map_err(Error::from)
    }
}

/// Bootstrap tokens as the server runs them: accepted when `--bootstrap-tokens` is
/// on (`settings`), with the replay store opened (the file read, or the Kubernetes
/// client built and the Lease cleanup started); else refused as not enabled.
pub async fn open(
    settings: Option<&BootstrapConfig>,
    store: &Arc<Store>,
    naming: &Naming,
    clock: &Arc<dyn crate::clock::Clock>,
) -> Result<BootstrapTokens, Error> {
    use super::replay::{FileReplayStore, LeaseReplayStore};
    let Some(settings) = settings else {
        return Ok(BootstrapTokens::disabled(store.clone(), naming.clone()));
    };
    let replay: Arc<dyn ReplayStore> = match &settings.replay {
        ReplayConfig::File(path) => Arc::new(FileReplayStore::open(path, clock.now())?),
        ReplayConfig::Kubernetes { kubeconfig } => {
            let leases = Arc::new(
                LeaseReplayStore::connect(kubeconfig.as_deref(), naming.control_plane_namespace()).await?,
            );
            leases.spawn_cleanup(clock.clone());
            leases
        }
    };
    tracing::info!(replay_store = replay.name(), "accepting bootstrap tokens");
    Ok(BootstrapTokens::new(store.clone(), replay, naming.clone(), settings.leeway))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::replay::{ConsumeFuture, ReplayError};
    use crate::ca::issuer::TrustAnchors;
    use crate::ca::store::Snapshot;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Mutex;

    const T: u64 = 1_700_000_000;
    const RSA2048: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa2048.pk8.pem");

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T)
    }
    fn naming() -> Naming {
        Naming::new("cluster.local", "meshca-system").unwrap()
    }
    fn web() -> String {
        naming().identity("default", "web").unwrap().dns_name
    }
    fn enc(bytes: impl AsRef<[u8]>) -> String {
        crate::jose::encode(bytes)
    }

    /// A self-signed CA that is its own trust anchor, with `key`, and its signer.
    fn issuer_with(key: KeyPair) -> (Issuer, BootstrapSigner) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "issuer");
        params.not_before = (now() - Duration::from_secs(3600)).into();
        params.not_after = (now() + Duration::from_secs(30 * 86_400)).into();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        let nowhere = Path::new("(test)");
        let anchors = TrustAnchors::from_certs(vec![cert.der().clone()], nowhere).unwrap();
        let pkcs8 = key.serialize_der();
        let issuer =
            Issuer::from_parts(vec![cert.der().clone()], &pkcs8, &anchors, now(), nowhere, nowhere).unwrap();
        let signer = BootstrapSigner::new(&pkcs8, &issuer, naming()).unwrap();
        (issuer, signer)
    }
    fn p256() -> (Issuer, BootstrapSigner) {
        issuer_with(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
    }
    fn check(issuer: &Issuer, token: &str) -> Result<Verified, Error> {
        verify(token.as_bytes(), issuer, &naming(), Duration::from_secs(60), now())
    }
    fn header(signer: &BootstrapSigner) -> Value {
        json!({"alg": signer.algorithm().as_str(), "typ": TYP, "kid": signer.kid()})
    }
    fn claims() -> Value {
        json!({"iss": ISSUER, "aud": "meshca-bootstrap:cluster.local", "sub": web(),
            "jti": "0123456789abcdef0123456789abcdef", "iat": T, "exp": T + 3600, "uses": 1})
    }
    /// A token with the default header and claims patched (`null` removes).
    fn with(signer: &BootstrapSigner, header_patch: Value, claims_patch: Value) -> String {
        let patch = |mut base: Value, patch: Value| {
            for (k, v) in patch.as_object().unwrap() {
                match v {
                    Value::Null => base.as_object_mut().unwrap().remove(k),
                    _ => base.as_object_mut().unwrap().insert(k.clone(), v.clone()),
                };
            }
            base
        };
        let (h, c) = (patch(header(signer), header_patch), patch(claims(), claims_patch));
        format!("{PREFIX}{}", signer.sign_raw(h.to_string().as_bytes(), c.to_string().as_bytes()).unwrap())
    }

    macro_rules! refused {
        ($result:expr, $pattern:pat) => {
            let result = $result;
            assert!(matches!(result, Err($pattern)), "{result:?}");
        };
    }

    #[test]
    fn minted_tokens_verify_for_each_issuer_key_type_and_name_the_identity() {
        let rsa = KeyPair::from_pkcs8_pem_and_sign_algo(
            &std::fs::read_to_string(RSA2048).unwrap(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let keys = [
            (KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(), "ES256"),
            (KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(), "ES384"),
            (rsa, "RS256"),
        ];
        for (key, alg) in keys {
            let (issuer, signer) = issuer_with(key);
            assert_eq!(signer.algorithm().as_str(), alg);
            let (token, minted) = signer.create(&web(), DEFAULT_TTL, 3, now()).unwrap();
            let text = token.expose();
            assert!(text.starts_with(PREFIX) && is_bootstrap_token(format!(" {text}\n").as_bytes()));
            let h: Value = serde_json::from_slice(
                &crate::jose::decode(text[PREFIX.len()..].split('.').next().unwrap()).unwrap(),
            )
            .unwrap();
            assert_eq!(h, json!({"alg": alg, "typ": TYP, "kid": issuer.fingerprint()}));
            let verified = check(&issuer, &format!("{text}\n")).unwrap();
            assert_eq!(verified.claims, minted);
            assert_eq!((minted.uses, minted.expires_at), (3, now() + DEFAULT_TTL));
            assert!(is_token_id(&minted.token_id));
            assert_eq!(claimed_token_id(text.as_bytes()), Some(minted.token_id.clone()));
            let expected = Subject {
                namespace: "default".into(),
                service_account: "web".into(),
                pod_name: None,
                pod_uid: None,
                issuer: ISSUER.into(),
            };
            assert_eq!(verified.subject, expected);
        }
    }

    #[test]
    fn minting_refuses_foreign_identities_zero_or_long_lifetimes_and_bad_use_counts() {
        let (_, signer) = p256();
        let other = Naming::new("other.org", "meshca-system").unwrap().identity("default", "web").unwrap();
        for (identity, ttl, uses) in [
            (other.dns_name.as_str(), DEFAULT_TTL, 1),
            ("web", DEFAULT_TTL, 1),
            (&web(), Duration::ZERO, 1),
            (&web(), MAX_TTL + Duration::from_secs(1), 1),
            (&web(), DEFAULT_TTL, 0),
            (&web(), DEFAULT_TTL, MAX_USES + 1),
        ] {
            refused!(signer.create(identity, ttl, uses, now()), Error::Signing { .. });
        }
        assert!(signer.create(&web(), MAX_TTL, MAX_USES, now()).is_ok());
        // The documented bounds: a day and 100 certificates.
        assert!(signer.create(&web(), Duration::from_secs(24 * 3600), 100, now()).is_ok());
        refused!(signer.create(&web(), Duration::from_secs(24 * 3600 + 1), 1, now()), Error::Signing { .. });
        refused!(signer.create(&web(), DEFAULT_TTL, 101, now()), Error::Signing { .. });
    }

    #[test]
    fn a_key_that_is_not_the_issuers_signs_nothing() {
        let (issuer, _) = p256();
        let stranger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        refused!(BootstrapSigner::new(&stranger.serialize_der(), &issuer, naming()), Error::Signing { .. });
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        refused!(BootstrapSigner::new(&p384.serialize_der(), &issuer, naming()), Error::Signing { .. });
    }

    #[test]
    fn time_is_checked_with_leeway_and_lifetimes_are_bounded() {
        let (issuer, signer) = p256();
        refused!(
            check(&issuer, &with(&signer, json!({}), json!({"exp": T - 61, "iat": T - 100}))),
            Error::Expired { .. }
        );
        assert!(check(&issuer, &with(&signer, json!({}), json!({"exp": T - 60, "iat": T - 100}))).is_ok());
        refused!(
            check(&issuer, &with(&signer, json!({}), json!({"iat": T + 61}))),
            Error::IssuedInFuture { .. }
        );
        assert!(check(&issuer, &with(&signer, json!({}), json!({"iat": T + 60}))).is_ok());
        refused!(check(&issuer, &with(&signer, json!({}), json!({"exp": null}))), Error::MissingExpiry);
        // The longest lifetime, a day, to the second.
        assert!(check(&issuer, &with(&signer, json!({}), json!({"exp": T + 24 * 3600}))).is_ok());
        for patch in [
            json!({"iat": null}),
            json!({"exp": T}),
            json!({"exp": T + 24 * 3600 + 1}),
            json!({"exp": (T + 60) as f64 + 0.5}),
            json!({"iat": -1}),
            json!({"exp": "soon"}),
            // Seconds from 2^40 on (about the year 36812) are not times.
            json!({"iat": (1u64 << 40) - 3600, "exp": 1u64 << 40}),
        ] {
            refused!(check(&issuer, &with(&signer, json!({}), patch.clone())), Error::Malformed { .. });
        }
    }

    #[test]
    fn issuer_audience_subject_id_and_uses_must_be_exactly_right() {
        let (issuer, signer) = p256();
        let t = |claims| check(&issuer, &with(&signer, json!({}), claims));
        refused!(t(json!({"iss": "meshca-dev"})), Error::WrongIssuer);
        refused!(t(json!({"iss": null})), Error::WrongIssuer);
        refused!(t(json!({"aud": "meshca-bootstrap:other.org"})), Error::WrongAudience);
        refused!(t(json!({"aud": "identity.l5d.io"})), Error::WrongAudience);
        refused!(t(json!({"aud": null})), Error::WrongAudience);
        let foreign = Naming::new("cluster.local", "linkerd").unwrap().identity("default", "web").unwrap();
        for patch in [
            json!({"aud": ["meshca-bootstrap:cluster.local"]}),
            json!({"sub": foreign.dns_name}),
            json!({"sub": "system:serviceaccount:default:web"}),
            json!({"sub": null}),
            json!({"jti": "0123456789ABCDEF0123456789ABCDEF"}),
            json!({"jti": "abc"}),
            json!({"jti": null}),
            json!({"uses": 0}),
            json!({"uses": 101}),
            json!({"uses": 1.5}),
            json!({"uses": null}),
            json!({"nbf": T}),
            json!({"kubernetes.io": {"namespace": "kube-system"}}),
        ] {
            refused!(t(patch.clone()), Error::Malformed { .. });
        }
        assert_eq!(t(json!({"uses": 100})).unwrap().claims.uses, 100);
    }

    #[test]
    fn none_hmac_and_mismatched_algorithms_are_refused() {
        let (issuer, signer) = p256();
        let body = enc(claims().to_string());
        let none_header = json!({"alg": "none", "typ": TYP, "kid": signer.kid()}).to_string();
        refused!(
            check(&issuer, &format!("{PREFIX}{}.{body}.", enc(none_header))),
            Error::UnsupportedAlgorithm
        );
        let hs_header = enc(json!({"alg": "HS256", "typ": TYP, "kid": signer.kid()}).to_string());
        let msg = format!("{hs_header}.{body}");
        // An HMAC keyed with the issuer's public key, the classic confusion.
        let (_, public) = issuer.public_key();
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public), msg.as_bytes());
        refused!(check(&issuer, &format!("{PREFIX}{msg}.{}", enc(tag))), Error::UnsupportedAlgorithm);
        for alg in ["ES384", "RS256"] {
            refused!(
                check(&issuer, &with(&signer, json!({"alg": alg}), json!({}))),
                Error::UnsupportedAlgorithm
            );
        }
    }

    #[test]
    fn headers_are_strict_and_the_kid_must_name_the_current_issuer() {
        let (issuer, signer) = p256();
        for patch in [
            json!({"typ": "JWT"}),
            json!({"typ": null}),
            json!({"kid": null}),
            json!({"kid": 7}),
            json!({"crit": ["exp"]}),
            json!({"cty": "JWT"}),
            json!({"jku": "https://attacker.example/keys"}),
        ] {
            refused!(check(&issuer, &with(&signer, patch.clone(), json!({}))), Error::Malformed { .. });
        }
        refused!(
            check(&issuer, &with(&signer, json!({"kid": "00".repeat(32)}), json!({}))),
            Error::BootstrapUnknownKey
        );
        // After a rotation: another issuer's token, and this issuer's token at the new one.
        let (rotated, rotated_signer) = p256();
        let (old_token, _) = signer.create(&web(), DEFAULT_TTL, 1, now()).unwrap();
        refused!(check(&rotated, old_token.expose()), Error::BootstrapUnknownKey);
        // The right kid with another key's signature.
        let forged = with(&rotated_signer, json!({"kid": signer.kid()}), json!({}));
        refused!(check(&issuer, &forged), Error::BadSignature);
    }

    #[test]
    fn duplicate_keys_tampering_and_garbage_are_refused_without_panicking() {
        let (issuer, signer) = p256();
        let h = header(&signer).to_string();
        let dup_claims = claims().to_string().replacen('{', &format!("{{\"sub\":\"{}\",", web()), 1);
        let dup = signer.sign_raw(h.as_bytes(), dup_claims.as_bytes()).unwrap();
        refused!(check(&issuer, &format!("{PREFIX}{dup}")), Error::Malformed { .. });
        let dup_header = h.replacen('{', "{\"alg\":\"ES256\",", 1);
        let dup = signer.sign_raw(dup_header.as_bytes(), claims().to_string().as_bytes()).unwrap();
        refused!(check(&issuer, &format!("{PREFIX}{dup}")), Error::Malformed { .. });

        let good = with(&signer, json!({}), json!({}));
        let parts: Vec<&str> = good[PREFIX.len()..].split('.').collect();
        let db = naming().identity("default", "db").unwrap().dns_name;
        let tampered =
            format!("{PREFIX}{}.{}.{}", parts[0], enc(claims().to_string().replace(&web(), &db)), parts[2]);
        refused!(check(&issuer, &tampered), Error::BadSignature);
        let mut sig = crate::jose::decode(parts[2]).unwrap();
        sig[10] ^= 1;
        refused!(
            check(&issuer, &format!("{PREFIX}{}.{}.{}", parts[0], parts[1], enc(sig))),
            Error::BadSignature
        );
        refused!(check(&issuer, &format!("{good}=")), Error::Malformed { .. });
        refused!(check(&issuer, &good[PREFIX.len()..]), Error::Malformed { .. });
        refused!(check(&issuer, ""), Error::Empty);
        refused!(
            check(&issuer, &format!("{PREFIX}{}", "a".repeat(super::super::MAX_TOKEN_LEN))),
            Error::TooLarge { .. }
        );
        for input in
            ["mcbt1.", "mcbt1.a.b", "mcbt1....", "mcbt1.a.b.c.d", "mcbt1.!!.@@.##", "mcbt1.e30.e30.e30"]
        {
            refused!(check(&issuer, input), Error::Malformed { .. });
        }
        let bytes = good.as_bytes().to_vec();
        for i in 0..bytes.len() {
            for b in [b'.', b'A', b'_', 0x00, 0xff] {
                let mut mutated = bytes.clone();
                mutated[i] = b;
                let _ = verify(&mutated, &issuer, &naming(), Duration::from_secs(60), now());
                let _ = claimed_token_id(&mutated);
            }
        }
    }

    #[test]
    fn debug_output_and_error_messages_reveal_no_token_or_key() {
        let (issuer, signer) = p256();
        let (token, _) = signer.create(&web(), DEFAULT_TTL, 1, now()).unwrap();
        let debug = format!("{token:?} {signer:?}");
        let signature = token.expose().rsplit('.').next().unwrap();
        assert!(!debug.contains(signature) && !debug.contains(&token.expose()[..20]), "{debug}");
        assert!(debug.contains("<redacted>") && debug.contains(signer.kid()), "{debug}");
        let marker = "zq81x";
        let errors = [
            check(&issuer, &with(&signer, json!({"alg": marker}), json!({}))).unwrap_err(),
            check(&issuer, &with(&signer, json!({"kid": marker}), json!({}))).unwrap_err(),
            check(&issuer, &with(&signer, json!({"typ": marker}), json!({}))).unwrap_err(),
            check(&issuer, &with(&signer, json!({}), json!({"sub": marker}))).unwrap_err(),
            check(&issuer, &with(&signer, json!({}), json!({"aud": marker}))).unwrap_err(),
            check(&issuer, &with(&signer, json!({}), json!({"jti": marker}))).unwrap_err(),
        ];
        for e in errors {
            assert!(!e.to_string().contains(marker), "{e}");
        }
    }

    /// A replay store in memory, counting uses per id.
    #[derive(Default)]
    struct Memory(Mutex<HashMap<String, u32>>);

    impl ReplayStore for Memory {
        fn consume<'a>(&'a self, jti: &'a str, uses: u32, _expires: SystemTime) -> ConsumeFuture<'a> {
            let mut used = self.0.lock().unwrap();
            let count = used.entry(jti.to_owned()).or_default();
            let result = if *count >= uses {
                Err(ReplayError::Used)
            } else {
                *count += 1;
                Ok(())
            };
            Box::pin(std::future::ready(result))
        }
        fn check<'a>(&'a self, jti: &'a str, uses: u32) -> ConsumeFuture<'a> {
            let spent = self.0.lock().unwrap().get(jti).copied().unwrap_or(0);
            Box::pin(std::future::ready(if spent >= uses { Err(ReplayError::Used) } else { Ok(()) }))
        }
        fn name(&self) -> &'static str {
            "memory"
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bootstrap_tokens_are_verified_spent_once_per_use_and_refused_when_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let h = crate::ca::hierarchy::generate(
            &naming(),
            crate::ca::hierarchy::CaKeyType::P256,
            now(),
            crate::ca::hierarchy::HierarchyLifetimes::default(),
        )
        .unwrap();
        crate::dev::write_hierarchy(dir.path(), &h).unwrap();
        let snapshot =
            Snapshot::load(&dir.path().join("trust-anchors.pem"), &dir.path().join("issuer"), now()).unwrap();
        let pkcs8 = crate::ca::material::read_pkcs8_key(&dir.path().join("issuer/tls.key")).unwrap();
        let signer = BootstrapSigner::new(&pkcs8, &snapshot.issuer, naming()).unwrap();
        let store = Arc::new(Store::new(snapshot));
        let tokens = BootstrapTokens::new(
            store.clone(),
            Arc::new(Memory::default()),
            naming(),
            Duration::from_secs(60),
        );
        let (token, claims) = signer.create(&web(), DEFAULT_TTL, 2, now()).unwrap();
        let token = token.expose().as_bytes();
        assert!(is_bootstrap_token(token));
        assert_eq!(claimed_token_id(token), Some(claims.token_id));
        assert_eq!(tokens.authenticate(token, now()).unwrap().service_account, "web");
        // Authenticating spends nothing; each spend takes one use; unspent tells, spending none.
        tokens.authenticate(token, now()).unwrap();
        tokens.unspent(token, now()).await.unwrap();
        tokens.spend(token, now()).await.unwrap();
        tokens.spend(token, now()).await.unwrap();
        refused!(tokens.unspent(token, now()).await, Error::BootstrapTokenUsed);
        refused!(tokens.spend(token, now()).await, Error::BootstrapTokenUsed);
        assert_eq!(Error::BootstrapTokenUsed.code(), "bootstrap_token_used");
        assert!(format!("{tokens:?}").contains("memory"));

        let off = BootstrapTokens::disabled(store, naming());
        refused!(off.authenticate(token, now()), Error::BootstrapDisabled);
        refused!(off.spend(token, now()).await, Error::BootstrapDisabled);
        assert_eq!(Error::BootstrapDisabled.code(), "bootstrap_tokens_disabled");
    }
}
