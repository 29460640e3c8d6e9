//! Local JWT verification against a JWKS: [`Jwks`] parses an RFC 7517 key set
//! (RSA and EC P-256 signing keys only), and [`JwksAuthenticator`] checks a compact
//! JWS token against it — segment and JSON shape (duplicate keys refused), an
//! allow-listed algorithm (RS256, ES256; never `none` or HMAC), the signature, and
//! only then the claims: `exp`/`nbf`/`iat` with leeway, `iss`, `aud`, and the
//! Kubernetes service account identity. Signature checks use `ring`.

use super::{AuthFuture, Authenticator, Error, Subject, MAX_TOKEN_LEN};
use ring::signature::{
    RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256,
};
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::{
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A JWS algorithm this crate can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RS256,
    ES256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
        }
    }
}

impl FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "RS256" => Ok(Algorithm::RS256),
            "ES256" => Ok(Algorithm::ES256),
            _ => Err(Error::UnsupportedAlgorithm),
        }
    }
}

/// What a token must satisfy besides its signature.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Required `iss`.
    pub issuer: String,
    /// The token's `aud` (string or array) must name at least one of these.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Allow-list of header `alg` values.
    pub algorithms: Vec<Algorithm>,
}

enum Material {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec(Vec<u8>),
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    material: Material,
}

impl Key {
    fn verifies(&self, msg: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(&RSA_PKCS1_2048_8192_SHA256, msg, sig).is_ok()
            }
            Material::Ec(point) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(msg, sig).is_ok()
            }
        }
    }
}

/// The usable signing keys of a JWKS.
pub struct Jwks {
    keys: Vec<Key>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |alg| self.keys.iter().filter(|k| k.alg == alg).count();
        f.debug_struct("Jwks")
            .field("rs256", &count(Algorithm::RS256))
            .field("es256", &count(Algorithm::ES256))
            .field("with_kid", &self.keys.iter().filter(|k| k.kid.is_some()).count())
            .finish()
    }
}

impl Jwks {
    /// Parses `{"keys":[...]}`. Keys of other types (`oct` included), other curves,
    /// other algorithms or a `use` other than `sig` are skipped; a malformed RSA or
    /// P-256 key, or a set with no usable key, is an [`Error::Config`].
    pub fn from_json(bytes: &[u8]) -> Result<Jwks, Error> {
        let config = |reason: String| Error::Config { reason };
        let root = parse_object(bytes, "")
            .map_err(|_| config("JWKS is not a JSON object (without duplicate keys)".into()))?;
        let Some(Value::Array(entries)) = root.get("keys") else {
            return Err(config("JWKS has no \"keys\" array".into()));
        };
        let mut keys = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let Value::Object(jwk) = entry else {
                return Err(config(format!("JWKS key #{i} is not an object")));
            };
            if let Some(key) = parse_jwk(jwk).map_err(|e| config(format!("JWKS key #{i}: {e}")))? {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(config("JWKS holds no usable signing key (RSA or EC P-256, use \"sig\")".into()));
        }
        Ok(Jwks { keys })
    }

    /// How many usable signing keys the set holds (at least one).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

fn parse_jwk(jwk: &Map<String, Value>) -> Result<Option<Key>, String> {
    let text = |name: &str| match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    };
    let bytes = |name: &str| {
        let value = text(name)?.ok_or_else(|| format!("\"{name}\" is missing"))?;
        crate::jose::decode(value).ok_or_else(|| format!("\"{name}\" is not base64url"))
    };
    if text("use")?.is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let (alg, material) = match (text("kty")?, text("crv")?) {
        (Some("RSA"), _) => {
            let (n, e) = (bytes("n")?, bytes("e")?);
            let strip = |v: &[u8]| v.iter().position(|b| *b != 0).map_or(Vec::new(), |i| v[i..].to_vec());
            let (n, e) = (strip(&n), strip(&e));
            if !(256..=1024).contains(&n.len()) || !(1..=5).contains(&e.len()) {
                return Err("RSA modulus must be 2048 to 8192 bits with a small exponent".into());
            }
            (Algorithm::RS256, Material::Rsa { n, e })
        }
        (Some("EC"), Some("P-256")) => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes each".into());
            }
            (Algorithm::ES256, Material::Ec([&[4u8][..], &x, &y].concat()))
        }
        _ => return Ok(None),
    };
    if text("alg")?.is_some_and(|a| a != alg.as_str()) {
        return Ok(None);
    }
    Ok(Some(Key { kid: text("kid")?.map(str::to_owned), alg, material }))
}

/// Verifies tokens locally against a JWKS. The key set is an immutable snapshot
/// swapped whole by [`JwksAuthenticator::replace_keys`] (key rotation, see
/// `super::discovery`): a verification sees one set from start to end.
#[derive(Debug)]
pub struct JwksAuthenticator {
    settings: Settings,
    jwks: RwLock<Arc<Jwks>>,
}

impl JwksAuthenticator {
    pub fn new(settings: Settings, jwks: Jwks) -> Self {
        JwksAuthenticator { settings, jwks: RwLock::new(Arc::new(jwks)) }
    }

    /// The key set verifications use now.
    pub fn keys(&self) -> Arc<Jwks> {
        self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in a new key set; verifications already running finish with the old one.
    pub fn replace_keys(&self, jwks: Jwks) {
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(jwks);
    }

    /// Reads the JWKS at `path`; errors name the path.
    #[cfg(test)]
    fn from_file(path: &std::path::Path, settings: Settings) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::Config {
            reason: format!("cannot read JWKS file {}: {e}", path.display()),
        })?;
        let jwks = Jwks::from_json(&bytes).map_err(|e| {
            let reason = if let Error::Config { reason } = e { reason } else { e.to_string() };
            Error::Config { reason: format!("JWKS file {}: {reason}", path.display()) }
        })?;
        Ok(Self::new(settings, jwks))
    }

    /// The synchronous core, used by `authenticate` and by fuzzers.
    pub fn verify(&self, token: &[u8], now: SystemTime) -> Result<Subject, Error> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::TooLarge { len: token.len(), max: MAX_TOKEN_LEN });
        }
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err(Error::Empty);
        }
        let Some(parts) = crate::jose::Compact::split(token) else {
            return Err(malformed("not three dot-separated segments"));
        };
        let header =
            parse_object(&b64(parts.header, "header is not base64url")?, "header is not a JSON object")?;
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.parse::<Algorithm>()?,
            _ => return Err(malformed("header alg is missing or not a string")),
        };
        if !self.settings.algorithms.contains(&alg) {
            return Err(Error::UnsupportedAlgorithm);
        }
        if header.contains_key("crit") {
            return Err(malformed("header crit is not supported"));
        }
        if header.contains_key("cty") {
            return Err(malformed("header cty is set: nested tokens are not accepted"));
        }
        match header.get("typ") {
            None => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => {}
            Some(_) => return Err(malformed("header typ is not JWT")),
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(malformed("header kid is not a string")),
        };
        let sig = b64(parts.signature, "signature is not base64url")?;
        let msg = parts.signing_input;
        let jwks = self.keys();
        let mut candidates = (jwks.keys.iter())
            .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
            .peekable();
        if candidates.peek().is_none() {
            return Err(Error::UnknownKey);
        }
        if !candidates.any(|k| k.verifies(msg, &sig)) {
            return Err(Error::BadSignature);
        }
        let claims =
            parse_object(&b64(parts.payload, "payload is not base64url")?, "claims are not a JSON object")?;
        self.check_claims(&claims, now)
    }

    fn check_claims(&self, claims: &Map<String, Value>, now: SystemTime) -> Result<Subject, Error> {
        let leeway = self.settings.leeway;
        let exp = time(claims, "exp", "exp is not a valid NumericDate")?.ok_or(Error::MissingExpiry)?;
        if now.duration_since(exp).is_ok_and(|late| late > leeway) {
            return Err(Error::Expired { exp, now });
        }
        if let Some(nbf) = time(claims, "nbf", "nbf is not a valid NumericDate")? {
            if nbf.duration_since(now).is_ok_and(|early| early > leeway) {
                return Err(Error::NotYetValid { nbf, now });
            }
        }
        if let Some(iat) = time(claims, "iat", "iat is not a valid NumericDate")? {
            if iat.duration_since(now).is_ok_and(|early| early > leeway) {
                return Err(Error::IssuedInFuture { iat, now });
            }
        }
        let issuer = match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.settings.issuer => iss.clone(),
            None | Some(Value::String(_)) => return Err(Error::WrongIssuer),
            Some(_) => return Err(malformed("iss is not a string")),
        };
        let audiences: Vec<&Value> = match claims.get("aud") {
            None => return Err(Error::WrongAudience),
            Some(Value::Array(items)) => items.iter().collect(),
            Some(single) => vec![single],
        };
        let mut accepted = false;
        for aud in audiences {
            let aud = aud.as_str().ok_or(malformed("aud is not a string or array of strings"))?;
            accepted |= self.settings.audiences.iter().any(|a| a == aud);
        }
        if !accepted {
            return Err(Error::WrongAudience);
        }
        let (namespace, service_account, pod) = identity(claims)?;
        let (pod_name, pod_uid) = pod.unzip();
        Ok(Subject { namespace, service_account, pod_name, pod_uid, issuer })
    }
}

impl Authenticator for JwksAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a> {
        Box::pin(async move { self.verify(token, now) })
    }

    fn name(&self) -> &'static str {
        "jwks"
    }
}

type Identity = (String, String, Option<(String, String)>);

/// Namespace, service account and pod from `kubernetes.io` and/or a legacy `sub`.
fn identity(claims: &Map<String, Value>) -> Result<Identity, Error> {
    let sub = match claims.get("sub") {
        None => None,
        Some(Value::String(sub)) => Some(match sub.split(':').collect::<Vec<_>>()[..] {
            ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => Some((ns, sa)),
            _ => None,
        }),
        Some(_) => return Err(malformed("sub is not a string")),
    };
    let k8s = match claims.get("kubernetes.io") {
        None => None,
        Some(Value::Object(k8s)) => {
            Some(kubernetes_claim(k8s).ok_or(malformed("kubernetes.io claim is incomplete"))?)
        }
        Some(_) => return Err(malformed("kubernetes.io claim is not an object")),
    };
    match (k8s, sub) {
        (Some(id), None) => Ok(id),
        (Some(id), Some(sub)) if sub == Some((id.0.as_str(), id.1.as_str())) => Ok(id),
        (Some(_), Some(_)) => Err(malformed("sub disagrees with the kubernetes.io claim")),
        (None, Some(Some((ns, sa)))) => Ok((ns.to_owned(), sa.to_owned(), None)),
        (None, _) => Err(Error::MissingIdentity),
    }
}

fn kubernetes_claim(k8s: &Map<String, Value>) -> Option<Identity> {
    let text =
        |m: &Map<String, Value>, k: &str| m.get(k)?.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let namespace = text(k8s, "namespace")?;
    let service_account = text(k8s.get("serviceaccount")?.as_object()?, "name")?;
    let pod = match k8s.get("pod") {
        None => None,
        Some(pod) => {
            let pod = pod.as_object()?;
            Some((text(pod, "name")?, text(pod, "uid")?))
        }
    };
    Some((namespace, service_account, pod))
}

/// A NumericDate claim; non-numbers, negatives and unrepresentable times are `Malformed`.
fn time(claims: &Map<String, Value>, name: &str, what: &'static str) -> Result<Option<SystemTime>, Error> {
    let Some(value) = claims.get(name) else { return Ok(None) };
    let since_epoch = match value {
        Value::Number(n) => match n.as_u64() {
            Some(secs) => Some(Duration::from_secs(secs)),
            None => n.as_f64().and_then(|f| Duration::try_from_secs_f64(f).ok()),
        },
        _ => None,
    };
    since_epoch.and_then(|d| UNIX_EPOCH.checked_add(d)).map(Some).ok_or(malformed(what))
}

fn malformed(what: &'static str) -> Error {
    Error::Malformed { what }
}

pub(crate) fn b64(segment: &[u8], what: &'static str) -> Result<Vec<u8>, Error> {
    crate::jose::decode(segment).ok_or_else(|| malformed(what))
}

pub(crate) fn parse_object(bytes: &[u8], what: &'static str) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(map))) => Ok(map),
        _ => Err(malformed(what)),
    }
}

/// A JSON value whose objects, at every depth, have no duplicate keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if object.insert(key, value).is_some() {
                return Err(A::Error::custom("duplicate key"));
            }
        }
        Ok(Strict(Value::Object(object)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::dev::{compact_jws, pem_decode, DevSigner, TokenClaims};
    use ring::{rand::SystemRandom, signature::RsaKeyPair};
    use serde_json::json;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const T: u64 = 1_700_000_000;
    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt-rs256.pk8.pem");

    macro_rules! refused {
        ($result:expr, $pattern:pat) => {
            let result = $result;
            assert!(matches!(result, Err($pattern)), "{result:?}");
        };
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T)
    }
    fn settings() -> Settings {
        let (issuer, audiences, leeway) = (ISS.into(), vec!["meshca".into()], Duration::from_secs(60));
        Settings { issuer, audiences, leeway, algorithms: vec![Algorithm::ES256, Algorithm::RS256] }
    }
    fn dev() -> (DevSigner, JwksAuthenticator) {
        let signer = DevSigner::generate().unwrap().0;
        let jwks = Jwks::from_json(signer.jwks_json().as_bytes()).unwrap();
        (signer, JwksAuthenticator::new(settings(), jwks))
    }
    fn header(signer: &DevSigner) -> String {
        json!({"alg": "ES256", "typ": "JWT", "kid": signer.kid()}).to_string()
    }
    fn claims() -> Value {
        json!({"iss": ISS, "aud": ["meshca"], "exp": T + 3600, "iat": T, "nbf": T,
               "sub": "system:serviceaccount:web:web-sa",
               "kubernetes.io": {"namespace": "web", "serviceaccount": {"name": "web-sa", "uid": "u1"},
                                 "pod": {"name": "web-0", "uid": "p1"}}})
    }
    /// Verifies a freshly signed token with the default claims patched (`null` removes).
    fn with(patch: Value) -> Result<Subject, Error> {
        let mut claims = claims();
        for (k, v) in patch.as_object().unwrap() {
            match v {
                Value::Null => claims.as_object_mut().unwrap().remove(k),
                _ => claims.as_object_mut().unwrap().insert(k.clone(), v.clone()),
            };
        }
        let (signer, auth) = dev();
        auth.verify(
            signer.sign_raw(header(&signer).as_bytes(), claims.to_string().as_bytes()).as_bytes(),
            now(),
        )
    }
    fn raw(header: &str, claims: &str) -> Result<Subject, Error> {
        let (signer, auth) = dev();
        auth.verify(signer.sign_raw(header.as_bytes(), claims.as_bytes()).as_bytes(), now())
    }
    fn enc(bytes: impl AsRef<[u8]>) -> String {
        crate::jose::encode(bytes)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn es256_token_from_the_dev_signer_yields_a_subject_with_pod_fields() {
        let (signer, auth) = dev();
        let token = signer
            .sign(
                &TokenClaims::projected(ISS, "meshca", "web", "web-sa", now(), Duration::from_secs(600))
                    .with_pod("web-0", "p-uid"),
            )
            .unwrap();
        let subject = auth.authenticate(token.as_bytes(), now()).await.unwrap();
        let (namespace, service_account, issuer) = ("web".into(), "web-sa".into(), ISS.into());
        let (pod_name, pod_uid) = (Some("web-0".into()), Some("p-uid".into()));
        assert_eq!(subject, Subject { namespace, service_account, pod_name, pod_uid, issuer });
        assert_eq!(auth.name(), "jwks");
    }

    #[test]
    fn rs256_token_signed_with_the_fixture_key_is_accepted_with_or_without_kid() {
        let pem = std::fs::read_to_string(FIXTURE).unwrap();
        let key = RsaKeyPair::from_pkcs8(&pem_decode(&pem, "PRIVATE KEY").unwrap()).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
        let n = [&[0u8][..], &public.n].concat(); // a leading zero, as some encoders write it
        let jwks =
            json!({"keys": [{"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": enc(n), "e": enc(&public.e)}]});
        let jwks = jwks.to_string();
        let auth = JwksAuthenticator::new(settings(), Jwks::from_json(jwks.as_bytes()).unwrap());
        let es_only = Settings { algorithms: vec![Algorithm::ES256], ..settings() };
        let es_only = JwksAuthenticator::new(es_only, Jwks::from_json(jwks.as_bytes()).unwrap());
        for header in [r#"{"alg":"RS256","kid":"rsa-1"}"#, r#"{"alg":"RS256"}"#] {
            let token = compact_jws(header.as_bytes(), claims().to_string().as_bytes(), |msg| {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&ring::signature::RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut sig)
                    .map(|()| sig)
            })
            .unwrap();
            assert_eq!(auth.verify(token.as_bytes(), now()).unwrap().pod_uid.as_deref(), Some("p1"));
            refused!(es_only.verify(token.as_bytes(), now()), Error::UnsupportedAlgorithm);
        }
    }

    #[test]
    fn time_claims_are_checked_with_leeway_and_exp_is_required() {
        refused!(with(json!({"exp": T - 61})), Error::Expired { .. });
        assert!(with(json!({"exp": T - 60})).is_ok());
        assert!(with(json!({"exp": T as f64 - 30.5})).is_ok());
        refused!(with(json!({"nbf": T + 61})), Error::NotYetValid { .. });
        assert!(with(json!({"nbf": T + 60, "iat": T + 60})).is_ok());
        refused!(with(json!({"iat": T + 61})), Error::IssuedInFuture { .. });
        refused!(with(json!({"exp": null})), Error::MissingExpiry);
    }

    #[test]
    fn issuer_must_match_and_audience_must_intersect() {
        refused!(with(json!({"iss": "https://elsewhere"})), Error::WrongIssuer);
        refused!(with(json!({"iss": null})), Error::WrongIssuer);
        refused!(with(json!({"aud": ["other"]})), Error::WrongAudience);
        refused!(with(json!({"aud": null})), Error::WrongAudience);
        assert!(with(json!({"aud": ["other", "meshca"]})).is_ok());
        assert!(with(json!({"aud": "meshca"})).is_ok());
    }

    #[test]
    fn alg_none_and_hmac_are_refused_even_with_an_oct_key_of_that_kid() {
        let none = format!("{}.{}.", enc(r#"{"alg":"none"}"#), enc(claims().to_string()));
        refused!(dev().1.verify(none.as_bytes(), now()), Error::UnsupportedAlgorithm);
        let signer = DevSigner::generate().unwrap().0;
        let mut jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        jwks["keys"].as_array_mut().unwrap().push(json!({"kty": "oct", "kid": "h", "k": enc("secret")}));
        let auth = JwksAuthenticator::new(settings(), Jwks::from_json(jwks.to_string().as_bytes()).unwrap());
        assert_eq!(auth.keys().key_count(), 1);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
        let Ok(hs256) =
            compact_jws(br#"{"alg":"HS256","kid":"h"}"#, claims().to_string().as_bytes(), |msg| {
                Ok::<_, std::convert::Infallible>(ring::hmac::sign(&key, msg))
            });
        refused!(auth.verify(hs256.as_bytes(), now()), Error::UnsupportedAlgorithm);
    }

    #[test]
    fn jwks_without_a_usable_signing_key_is_a_config_error() {
        let skipped = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}, {"kty": "EC", "crv": "P-256", "use": "enc"}]});
        let short = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#;
        for bad in [&skipped.to_string(), "{}", "[]", short, r#"{"keys":[],"keys":[]}"#] {
            refused!(Jwks::from_json(bad.as_bytes()), Error::Config { .. });
        }
        let err = JwksAuthenticator::from_file(std::path::Path::new("/nonexistent/jwks.json"), settings())
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
        let path = std::env::temp_dir().join(format!("meshca-jwks-test-{}.json", std::process::id()));
        std::fs::write(&path, short).unwrap();
        let err = JwksAuthenticator::from_file(&path, settings()).unwrap_err().to_string();
        std::fs::write(&path, DevSigner::generate().unwrap().0.jwks_json()).unwrap();
        assert!(JwksAuthenticator::from_file(&path, settings()).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(&*path.to_string_lossy()) && err.matches("invalid").count() == 1, "{err}");
    }

    #[test]
    fn unknown_kids_foreign_signatures_and_tampering_are_refused() {
        let (signer, auth) = dev();
        let body = claims().to_string();
        let unknown = signer.sign_raw(br#"{"alg":"ES256","kid":"nope"}"#, body.as_bytes());
        refused!(auth.verify(unknown.as_bytes(), now()), Error::UnknownKey);
        let rs = signer.sign_raw(json!({"alg": "RS256", "kid": signer.kid()}).to_string().as_bytes(), b"{}");
        refused!(auth.verify(rs.as_bytes(), now()), Error::UnknownKey);
        let foreign = DevSigner::generate().unwrap().0.sign_raw(header(&signer).as_bytes(), body.as_bytes());
        refused!(auth.verify(foreign.as_bytes(), now()), Error::BadSignature);
        let good = signer.sign_raw(header(&signer).as_bytes(), body.as_bytes());
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], enc(body.replace("web-sa", "admin")), parts[2]);
        refused!(auth.verify(tampered.as_bytes(), now()), Error::BadSignature);
        refused!(auth.verify(format!("{good}=").as_bytes(), now()), Error::Malformed { .. });
        let kidless = signer.sign_raw(br#"{"alg":"ES256"}"#, body.as_bytes());
        assert!(auth.verify(kidless.as_bytes(), now()).is_ok());
    }

    #[test]
    fn legacy_sub_alone_is_an_identity_but_other_subjects_are_not() {
        let subject = with(json!({"kubernetes.io": null})).unwrap();
        assert_eq!(
            (&*subject.namespace, &*subject.service_account, subject.pod_name),
            ("web", "web-sa", None)
        );
        assert!(with(json!({"sub": null})).is_ok());
        for sub in [
            "alice",
            "system:serviceaccount:web",
            "system:serviceaccount:web:sa:x",
            "system:serviceaccount::sa",
        ] {
            refused!(with(json!({"kubernetes.io": null, "sub": sub})), Error::MissingIdentity);
        }
        refused!(with(json!({"sub": "system:serviceaccount:kube-system:admin"})), Error::Malformed { .. });
        refused!(with(json!({"sub": null, "kubernetes.io": null})), Error::MissingIdentity);
    }

    #[test]
    fn duplicate_keys_and_nested_tokens_are_malformed() {
        let exp = T + 60;
        let sub = r#""sub":"system:serviceaccount:a:b","s\u0075b":"system:serviceaccount:kube-system:admin""#;
        refused!(
            raw(r#"{"alg":"ES256"}"#, &format!(r#"{{"iss":"{ISS}","aud":"meshca","exp":{exp},{sub}}}"#)),
            Error::Malformed { .. }
        );
        let k8s = r#""kubernetes.io":{"namespace":"a","namespace":"b","serviceaccount":{"name":"s"}}"#;
        refused!(
            raw(r#"{"alg":"ES256"}"#, &format!(r#"{{"iss":"{ISS}","aud":"meshca","exp":{exp},{k8s}}}"#)),
            Error::Malformed { .. }
        );
        let headers = [
            r#"{"alg":"ES256","alg":"ES256"}"#,
            r#"{"alg":"ES256","cty":"JWT"}"#,
            r#"{"alg":"ES256","typ":"JWE"}"#,
            r#"{"alg":"ES256","crit":["exp"]}"#,
        ];
        for header in headers {
            refused!(raw(header, &claims().to_string()), Error::Malformed { .. });
        }
    }

    #[test]
    fn surrounding_whitespace_is_trimmed_but_oversized_tokens_are_refused() {
        let (signer, auth) = dev();
        let token = signer.sign_raw(header(&signer).as_bytes(), claims().to_string().as_bytes());
        assert!(auth.verify(format!("{token}\n").as_bytes(), now()).is_ok());
        assert!(auth.verify(format!(" \t{token}\r\n").as_bytes(), now()).is_ok());
        refused!(
            auth.verify(format!("{token}{}", " ".repeat(MAX_TOKEN_LEN)).as_bytes(), now()),
            Error::TooLarge { .. }
        );
        refused!(auth.verify(&[b'a'; MAX_TOKEN_LEN + 1], now()), Error::TooLarge { .. });
        // Exactly the limit, padding included, is checked on its merits.
        let padded = format!("{token}{}", " ".repeat(MAX_TOKEN_LEN - token.len()));
        assert_eq!(padded.len(), MAX_TOKEN_LEN);
        assert!(auth.verify(padded.as_bytes(), now()).is_ok());
    }

    #[test]
    fn rsa_keys_need_a_2048_to_8192_bit_modulus_and_a_one_to_five_byte_exponent() {
        let rsa = |n_len: usize, e: &[u8]| {
            let n = [&[0xc5u8][..], &vec![0x5a; n_len - 1]].concat();
            let jwks = json!({"keys": [{"kty": "RSA", "n": enc(n), "e": enc(e)}]}).to_string();
            Jwks::from_json(jwks.as_bytes()).map(|j| j.key_count())
        };
        assert_eq!(rsa(256, &[1, 0, 1]).unwrap(), 1);
        assert_eq!(rsa(1024, &[1, 0, 1, 0, 1]).unwrap(), 1);
        for (n_len, e) in
            [(255, &[1u8, 0, 1][..]), (1025, &[1, 0, 1]), (256, &[1, 0, 1, 0, 1, 1]), (256, &[0])]
        {
            let err = rsa(n_len, e).unwrap_err().to_string();
            assert!(
                err.contains("RSA modulus must be 2048 to 8192 bits with a small exponent"),
                "{n_len} {e:?}: {err}"
            );
        }
    }

    #[test]
    fn p256_keys_need_both_coordinates_of_32_bytes_and_every_usable_key_is_counted() {
        let ec = |x: usize, y: usize| json!({"kty": "EC", "crv": "P-256", "x": enc(vec![7; x]), "y": enc(vec![9; y])});
        for (x, y) in [(32, 31), (31, 32), (33, 32), (32, 33)] {
            let jwks = json!({"keys": [ec(x, y)]}).to_string();
            let err = Jwks::from_json(jwks.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("P-256 coordinates must be 32 bytes each"), "{x} {y}: {err}");
        }
        let jwks = json!({"keys": [ec(32, 32), ec(32, 32), {"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        assert_eq!(Jwks::from_json(jwks.as_bytes()).unwrap().key_count(), 2);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let (signer, auth) = dev();
        refused!(auth.verify(b"", now()), Error::Empty);
        refused!(auth.verify(b" \n", now()), Error::Empty);
        for input in
            ["a.b", "...", "a.b.c.d", "!!.@@.##", "\u{0}\u{ff}", "e30.e30.e30", "e30.e30.", "\u{80}.\u{ff}."]
        {
            refused!(auth.verify(input.as_bytes(), now()), Error::Malformed { .. });
        }
        for exp in ["1e300", "-5", "\"soon\"", "1e400", "18446744073709551615", "[1]", "true"] {
            let body =
                format!(r#"{{"iss":"{ISS}","aud":"meshca","exp":{exp},"sub":"system:serviceaccount:a:b"}}"#);
            refused!(
                auth.verify(signer.sign_raw(header(&signer).as_bytes(), body.as_bytes()).as_bytes(), now()),
                Error::Malformed { .. }
            );
        }
        for patch in [
            json!({"aud": 5}),
            json!({"aud": [5]}),
            json!({"iss": 1}),
            json!({"sub": 7}),
            json!({"iat": -1.5}),
            json!({"kubernetes.io": "x"}),
            json!({"kubernetes.io": {"namespace": "", "serviceaccount": {"name": "a"}}}),
        ] {
            refused!(with(patch), Error::Malformed { .. });
        }
        let token = signer.sign_raw(header(&signer).as_bytes(), claims().to_string().as_bytes()).into_bytes();
        for i in 0..token.len() {
            for b in [b'.', b'A', b'=', b'_', 0x00, 0xff] {
                let mut mutated = token.clone();
                mutated[i] = b;
                let _ = auth.verify(&mutated, now());
            }
        }
    }

    #[test]
    fn error_messages_and_debug_output_reveal_no_token_or_key_content() {
        let marker = "zq81x";
        let mut errors = vec![
            raw(&json!({"alg": "ES256", "kid": marker}).to_string(), &claims().to_string()).unwrap_err(),
            raw(&json!({"alg": marker}).to_string(), &claims().to_string()).unwrap_err(),
            raw(&json!({"alg": "ES256", "typ": marker}).to_string(), &claims().to_string()).unwrap_err(),
        ];
        for claim in ["iss", "aud", "sub", "exp", "kubernetes.io"] {
            errors.push(with(json!({"kubernetes.io": null, claim: marker})).unwrap_err());
        }
        errors.push(with(json!({"kubernetes.io": {"namespace": marker}})).unwrap_err());
        for e in &errors {
            assert!(!e.to_string().contains(marker), "{e}");
        }
        let (signer, auth) = dev();
        let jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        let debug = format!("{auth:?}");
        assert!(
            debug.contains("es256: 1") && !debug.contains(jwks["keys"][0]["x"].as_str().unwrap()),
            "{debug}"
        );
    }
}
