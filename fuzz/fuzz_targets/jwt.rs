//! JWT verification against a fixed JWKS (an ES256 and an RS256 key), at a frozen
//! time. Each input is verified as a token; an input holding a NUL byte is also read
//! as `header JSON \0 claims JSON`, signed here with the ES256 key, so that mutated
//! headers and claims get past the signature to the claim checks.
//!
//! Invariants: a token is accepted only if its header names an allowed algorithm and
//! no `crit`/`cty`, its claims (read independently with serde_json) carry the
//! configured issuer, an accepted audience and an unexpired `exp`, and the subject
//! returned is the one the claims state (`kubernetes.io`, else `sub`). Refusals have
//! a code and a message that repeats no part of the token.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshca::auth::dev::DevSigner;
use meshca::auth::jwt::JwksAuthenticator;
use meshca::auth::{Subject, MAX_TOKEN_LEN};
use meshca_fuzz::{AUDIENCE, LEEWAY, NOW_SECS, TOKEN_ISSUER};
use serde_json::Value;

static AUTH: LazyLock<JwksAuthenticator> = LazyLock::new(meshca_fuzz::authenticator);
static SIGNER: LazyLock<DevSigner> = LazyLock::new(meshca_fuzz::signer);

fn json(segment: &[u8]) -> Value {
    let bytes = URL_SAFE_NO_PAD.decode(segment).expect("accepted segment is base64url");
    serde_json::from_slice(&bytes).expect("accepted segment is JSON")
}

fn seconds(v: &Value) -> f64 {
    v.as_f64().expect("accepted time claim is a number")
}

/// The accepted token's claims must justify `subject`.
fn justified(token: &[u8], subject: &Subject) {
    let parts: Vec<&[u8]> = token.trim_ascii().split(|b| *b == b'.').collect();
    assert_eq!(parts.len(), 3);
    let header = json(parts[0]);
    assert!(matches!(header["alg"].as_str(), Some("ES256" | "RS256")), "alg {header}");
    assert!(header.get("crit").is_none() && header.get("cty").is_none(), "{header}");
    let claims = json(parts[1]);
    assert_eq!(claims["iss"], TOKEN_ISSUER);
    assert_eq!(subject.issuer, TOKEN_ISSUER);
    let aud = match &claims["aud"] {
        Value::Array(items) => items.iter().any(|a| a == AUDIENCE),
        single => single == AUDIENCE,
    };
    assert!(aud, "audience {}", claims["aud"]);
    let now = NOW_SECS as f64;
    let leeway = LEEWAY.as_secs_f64();
    assert!(seconds(&claims["exp"]) + leeway >= now, "expired");
    for early in ["nbf", "iat"] {
        if let Some(t) = claims.get(early) {
            assert!(seconds(t) - leeway <= now + 1.0, "{early} in the future");
        }
    }
    assert!(!subject.namespace.is_empty() && !subject.service_account.is_empty());
    let k8s = &claims["kubernetes.io"];
    let sub = claims["sub"].as_str().map(|s| s.split(':').collect::<Vec<_>>());
    let from_sub = match sub.as_deref() {
        Some(["system", "serviceaccount", ns, sa]) => Some((ns.to_string(), sa.to_string())),
        _ => None,
    };
    if k8s.is_object() {
        assert_eq!(k8s["namespace"], subject.namespace.as_str());
        assert_eq!(k8s["serviceaccount"]["name"], subject.service_account.as_str());
        assert_eq!(k8s["pod"]["name"].as_str(), subject.pod_name.as_deref());
        assert_eq!(k8s["pod"]["uid"].as_str(), subject.pod_uid.as_deref());
        if let Some(from_sub) = from_sub {
            assert_eq!(from_sub, (subject.namespace.clone(), subject.service_account.clone()));
        }
    } else {
        assert_eq!(from_sub, Some((subject.namespace.clone(), subject.service_account.clone())));
        assert!(subject.pod_name.is_none() && subject.pod_uid.is_none());
    }
}

fn verify(token: &[u8]) {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(NOW_SECS);
    match AUTH.verify(token, now) {
        Ok(subject) => justified(token, &subject),
        Err(e) => {
            assert!(!e.code().is_empty());
            let message = e.to_string();
            if token.len() > MAX_TOKEN_LEN {
                assert!(matches!(e, meshca::auth::Error::TooLarge { .. }), "{e:?}");
            }
            // No run of the fixed messages without space or dot is 20 bytes long, so
            // a token segment that long found in one was copied from the token.
            for segment in token.split(|b| *b == b'.' || b.is_ascii_whitespace()) {
                if segment.len() >= 20 {
                    let shown = message.as_bytes();
                    assert!(
                        !shown.windows(segment.len()).any(|w| w == segment),
                        "refusal repeats part of the token: {message}"
                    );
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    verify(data);
    if let Some(nul) = data.iter().position(|b| *b == 0) {
        let (header, claims) = (&data[..nul], &data[nul + 1..]);
        verify(SIGNER.sign_raw(header, claims).as_bytes());
    }
});
