//! Dev-mode token signer: the key `meshca serve --dev` creates and `meshca dev-token`
//! signs with. ES256 only. It owns the P-256 key (PKCS#8 DER or PEM), its key id,
//! the one-key JWKS that [`super::jwt::Jwks`] loads, and the signing of
//! Kubernetes-style projected tokens (and of arbitrary header/claims for tests).
//! The claims ([`TokenClaims::projected`]) and the compact JWS assembly
//! ([`TokenClaims::sign_with`], [`compact_jws`]) serve other signers too: the
//! benchmark's RS256 one signs through them with its own algorithm.

use super::Error;
use base64::{engine::general_purpose::STANDARD, Engine};
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, Signature, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Map, Value};
use std::{
    convert::Infallible,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// A P-256 key that signs development tokens.
pub struct DevSigner {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl fmt::Debug for DevSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// The claims of a development token, shaped like a Kubernetes projected token.
#[derive(Clone, Debug)]
pub struct TokenClaims {
    pub issuer: String,
    pub audience: Vec<String>,
    pub namespace: String,
    pub service_account: String,
    /// Pod name and uid.
    pub pod: Option<(String, String)>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl TokenClaims {
    /// The claims of a projected service-account token for `service_account` in
    /// `namespace`: `issuer`, the one `audience`, no pod (see [`Self::with_pod`]),
    /// valid from `issued_at` for `ttl`.
    pub fn projected(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
        issued_at: SystemTime,
        ttl: Duration,
    ) -> TokenClaims {
        TokenClaims {
            issuer: issuer.into(),
            audience: vec![audience.into()],
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: None,
            issued_at,
            expires_at: issued_at + ttl,
        }
    }

    /// The same claims, bound to the pod `name` with `uid`.
    pub fn with_pod(self, name: impl Into<String>, uid: impl Into<String>) -> TokenClaims {
        TokenClaims { pod: Some((name.into(), uid.into())), ..self }
    }

    /// Signs these claims as a JWT with header `{"alg": alg, "typ": "JWT", "kid": kid}`
    /// and [`Self::to_json`] as its claims set; `sign` computes the signature over the
    /// signing input (see [`compact_jws`]), so only the algorithm is the caller's.
    pub fn sign_with<S: AsRef<[u8]>, E: From<Error>>(
        &self,
        alg: &str,
        kid: &str,
        sign: impl FnOnce(&[u8]) -> Result<S, E>,
    ) -> Result<String, E> {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let body = self.to_json()?;
        compact_jws(header.to_string().as_bytes(), body.to_string().as_bytes(), sign)
    }

    /// The JWT claims set, as the API server writes it into a projected token
    /// (`iss`, `aud`, `exp`, `iat`, `nbf`, `sub`, `kubernetes.io`).
    pub fn to_json(&self) -> Result<Value, Error> {
        let secs = |t: SystemTime| {
            (t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()))
                .map_err(|_| Error::Signing { reason: "token times must be after 1970" })
        };
        let (iat, exp) = (secs(self.issued_at)?, secs(self.expires_at)?);
        if exp <= iat {
            return Err(Error::Signing { reason: "token expiry must be after its issue time" });
        }
        let mut k8s = Map::new();
        k8s.insert("namespace".into(), json!(self.namespace));
        k8s.insert("serviceaccount".into(), json!({"name": self.service_account}));
        if let Some((name, uid)) = &self.pod {
            k8s.insert("pod".into(), json!({"name": name, "uid": uid}));
        }
        Ok(json!({
            "iss": self.issuer, "aud": self.audience, "exp": exp, "iat": iat, "nbf": iat,
            "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
            "kubernetes.io": Value::Object(k8s),
        }))
    }
}

impl DevSigner {
    /// A fresh key, with its PKCS#8 DER for storing.
    pub fn generate() -> Result<(DevSigner, Vec<u8>), Error> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| Error::Signing { reason: "generating a P-256 key failed" })?;
        Ok((Self::from_pkcs8(pkcs8.as_ref())?, pkcs8.as_ref().to_vec()))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<DevSigner, Error> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).map_err(|e| {
            Error::Config { reason: format!("development signing key is not a P-256 PKCS#8 key ({e})") }
        })?;
        let kid = crate::jose::key_id(key.public_key().as_ref());
        Ok(DevSigner { key, kid, rng })
    }

    /// Loads a `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM.
    pub fn from_pem(pem: &str) -> Result<DevSigner, Error> {
        let der = pem_decode(pem, "PRIVATE KEY").ok_or_else(|| Error::Config {
            reason: "development signing key is not a PRIVATE KEY PEM".into(),
        })?;
        Self::from_pkcs8(&der)
    }

    /// Wraps PKCS#8 DER as a `PRIVATE KEY` PEM with 64-column lines.
    pub(crate) fn pkcs8_pem(pkcs8: &[u8]) -> String {
        crate::ca::material::to_pem("PRIVATE KEY", pkcs8)
    }

    /// base64url(SHA-256(uncompressed public point)): stable per key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A JWKS holding this key's public half.
    pub fn jwks_json(&self) -> String {
        let point = self.key.public_key().as_ref();
        let coordinate = |range| crate::jose::encode(point.get(range).unwrap_or_default());
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": coordinate(1..33), "y": coordinate(33..65),
        }]})
        .to_string()
    }

    /// Signs a Kubernetes-style projected token.
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, Error> {
        claims.sign_with("ES256", &self.kid, |msg| self.es256(msg))
    }

    /// Signs arbitrary header and claims bytes (for hostile-input tests). Should the
    /// random generator fail, the token carries an empty signature, which no
    /// verifier accepts.
    pub fn sign_raw(&self, header_json: &[u8], claims_json: &[u8]) -> String {
        let Ok(token) = compact_jws(header_json, claims_json, |msg| {
            Ok::<_, Infallible>(self.es256(msg).map(|sig| sig.as_ref().to_vec()).unwrap_or_default())
        });
        token
    }

    fn es256(&self, msg: &[u8]) -> Result<Signature, Error> {
        (self.key.sign(&self.rng, msg)).map_err(|_| Error::Signing { reason: "ECDSA signing failed" })
    }
}

pub use crate::jose::compact_jws;

/// The DER inside the first `-----BEGIN {label}-----` block of `pem`.
pub(crate) fn pem_decode(pem: &str, label: &str) -> Option<Vec<u8>> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut lines = pem.lines().map(str::trim).skip_while(|line| *line != begin);
    lines.next()?;
    let mut body = String::new();
    for line in lines {
        if line == end {
            return STANDARD.decode(body).ok();
        }
        body.push_str(line);
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::jwt::Jwks;
    use std::time::Duration;

    fn claims() -> TokenClaims {
        let issued_at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        TokenClaims::projected("meshca-dev", "meshca", "web", "web-sa", issued_at, Duration::from_secs(600))
    }

    #[test]
    fn a_generated_key_round_trips_through_pem_with_a_stable_kid() {
        let (signer, pkcs8) = DevSigner::generate().unwrap();
        let pem = DevSigner::pkcs8_pem(&pkcs8);
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\n") && pem.ends_with("-----END PRIVATE KEY-----\n")
        );
        let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.last().unwrap().len() <= 64, "{pem}");
        assert!(body[..body.len() - 1].iter().all(|line| line.len() == 64), "{pem}");
        assert!(!body.last().unwrap().is_empty(), "{pem}");
        let reloaded = DevSigner::from_pem(&pem).unwrap();
        assert_eq!(reloaded.kid(), signer.kid());
        assert_eq!(
            signer.kid(),
            crate::jose::encode(ring::digest::digest(
                &ring::digest::SHA256,
                signer.key.public_key().as_ref()
            ))
        );
        assert_ne!(DevSigner::generate().unwrap().0.kid(), signer.kid());
        assert_eq!(Jwks::from_json(reloaded.jwks_json().as_bytes()).unwrap().key_count(), 1);
    }

    #[test]
    fn keys_that_are_not_p256_pkcs8_are_config_errors() {
        let rsa =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt-rs256.pk8.pem"));
        for pem in [rsa.unwrap().as_str(), "", "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n"]
        {
            assert!(matches!(DevSigner::from_pem(pem), Err(Error::Config { .. })));
        }
        assert!(matches!(DevSigner::from_pkcs8(b"\x30\x00"), Err(Error::Config { .. })));
    }

    #[test]
    fn sign_emits_a_kubernetes_shaped_token_and_refuses_inverted_times() {
        let signer = DevSigner::generate().unwrap().0;
        let token = signer.sign(&claims()).unwrap();
        let parts: Vec<_> = token.split('.').map(|p| crate::jose::decode(p).unwrap()).collect();
        let header: Value = serde_json::from_slice(&parts[0]).unwrap();
        assert_eq!(header, json!({"alg": "ES256", "typ": "JWT", "kid": signer.kid()}));
        let body: Value = serde_json::from_slice(&parts[1]).unwrap();
        assert_eq!(body["sub"], "system:serviceaccount:web:web-sa");
        assert_eq!(body["kubernetes.io"], json!({"namespace": "web", "serviceaccount": {"name": "web-sa"}}));
        assert_eq!((body["aud"].clone(), body["nbf"].clone()), (json!(["meshca"]), body["iat"].clone()));
        assert_eq!(parts[2].len(), 64);
        let inverted = TokenClaims { expires_at: claims().issued_at, ..claims() };
        assert!(matches!(signer.sign(&inverted), Err(Error::Signing { .. })));
        assert!(signer.sign_raw(b"not json", b"\xff").split('.').nth(2).is_some_and(|s| !s.is_empty()));
    }

    #[test]
    fn projected_claims_sign_with_any_algorithm_through_one_assembly() {
        let claims = claims().with_pod("web-0", "p-uid");
        assert_eq!((claims.issuer.as_str(), claims.audience.clone()), ("meshca-dev", vec!["meshca".into()]));
        assert_eq!(claims.expires_at.duration_since(claims.issued_at).unwrap(), Duration::from_secs(600));
        let body = claims.to_json().unwrap();
        assert_eq!(body["kubernetes.io"]["pod"], json!({"name": "web-0", "uid": "p-uid"}));
        let mut signed_input = Vec::new();
        let token = (claims.sign_with("XS1", "k1", |msg| {
            signed_input = msg.to_vec();
            Ok::<_, Error>(*b"sig")
        }))
        .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(signed_input, format!("{}.{}", parts[0], parts[1]).into_bytes());
        let decode =
            |part: &str| serde_json::from_slice::<Value>(&crate::jose::decode(part).unwrap()).unwrap();
        assert_eq!(decode(parts[0]), json!({"alg": "XS1", "typ": "JWT", "kid": "k1"}));
        assert_eq!((decode(parts[1]), parts[2]), (body, crate::jose::encode("sig").as_str()));
        let failed = claims.sign_with("XS1", "k1", |_| Err::<[u8; 0], _>(Error::Signing { reason: "no" }));
        assert!(matches!(failed, Err(Error::Signing { reason: "no" })));
    }

    #[test]
    fn debug_shows_the_kid_and_no_key_material() {
        let (signer, pkcs8) = DevSigner::generate().unwrap();
        let debug = format!("{signer:?}");
        let jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        assert!(debug.contains(signer.kid()), "{debug}");
        for secret in [STANDARD.encode(&pkcs8), jwks["keys"][0]["x"].as_str().unwrap().to_owned()] {
            assert!(!debug.contains(&secret[..16]), "{debug}");
        }
    }
}
