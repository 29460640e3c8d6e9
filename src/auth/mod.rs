//! The authentication step: turning the token bytes a proxy sent into a [`Subject`],
//! the workload the token issuer vouches for, or a typed [`Error`] saying why not.
//! This module only proves who the caller is. Turning a subject into a certificate
//! identity, and deciding whether that identity may be issued, belongs to
//! `crate::identity`; mapping an [`Error`] to a gRPC status belongs to
//! `crate::status`. [`jwt`] verifies tokens locally against a JWKS, whose keys
//! [`discovery`] fetches (a file, a URL, or the cluster's service-account issuer)
//! and keeps current; [`tokenreview`] asks the Kubernetes API server; [`cache`]
//! remembers answers so the API server is asked once per token, not once per
//! request; [`pods`] confirms, in jwks mode, that a token's pod still exists;
//! [`dev`] holds the key and signer used in development mode. Those are
//! [`Authenticator`]s: authenticate, plus the health of a remote backend. Bootstrap
//! tokens, single-use, are not one: [`bootstrap`] checks the tokens `meshca
//! bootstrap-token create` mints for hosts without Kubernetes, the issuance core
//! sends it the tokens with their prefix and has it spend a use once a request
//! passed every check, and [`replay`] records those uses so each is spent once.
//! [`source`] registers the token sources `--token-validation` chooses between: each
//! owns its flags, their checks and the construction of its authenticator.

pub mod bootstrap;
pub(crate) mod cache;
pub mod dev;
pub(crate) mod discovery;
pub mod jwt;
pub(crate) mod peer;
pub(crate) mod pods;
pub mod replay;
pub(crate) mod source;
pub mod tokenreview;

use std::{future::Future, pin::Pin, time::SystemTime};

use crate::metrics::Registry;

/// Largest token accepted, in bytes, before whitespace is trimmed.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The largest `--token-leeway` meshca accepts. A spent bootstrap token's record is
/// kept until its expiry plus this, whatever leeway was in force when it was spent, so
/// that no restart with a larger leeway finds it accepted and forgotten.
pub const MAX_TOKEN_LEEWAY: std::time::Duration = std::time::Duration::from_secs(300);

/// Who the caller proved to be: defined with the names it maps to (`identity`),
/// which decide what it may hold.
pub use crate::identity::Subject;

pub(crate) type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Subject, Error>> + Send + 'a>>;

/// The authentication step. Later implementations (Kubernetes TokenReview, OIDC
/// discovery) are async, hence the future.
pub trait Authenticator: Send + Sync + 'static {
    /// `token` is the raw bytes the proxy sent (Linkerd proxies send the token file
    /// exactly as read, trailing newline included: trim ASCII whitespace first).
    /// `now` is injected; never read the clock here.
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a>;
    /// Short name for logs and metrics, e.g. "jwks".
    fn name(&self) -> &'static str;
    /// Registers this authenticator's own metrics (and, for a wrapper, its inner
    /// one's) into the `/metrics` registry; called once at start. Those without
    /// any register nothing.
    fn register_metrics(&self, _registry: &mut Registry) {}
    /// Readiness: since when the remote backend this authenticator depends on (the
    /// Kubernetes API server, for TokenReview) has failed every call, at the `now`
    /// of the first such call; `None` while it answers, before any call, or when
    /// there is no backend. A wrapper returns its inner authenticator's.
    fn unreachable_since(&self) -> Option<SystemTime> {
        None
    }
    /// Asks the backend once, outside any request, whether it answers again, so an
    /// unreachable backend is seen to recover without traffic (a replica that is
    /// not ready gets none); updates [`Self::unreachable_since`]. Nothing to do
    /// without a backend. A wrapper probes its inner authenticator.
    fn probe(&self, _now: SystemTime) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}

/// The token with surrounding ASCII whitespace trimmed, refused when oversized
/// (measured before trimming, as [`jwt`] does) or empty.
pub fn trimmed(token: &[u8]) -> Result<&[u8], Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::TooLarge { len: token.len(), max: MAX_TOKEN_LEN });
    }
    match token.trim_ascii() {
        [] => Err(Error::Empty),
        token => Ok(token),
    }
}

/// Why a token was refused. Messages never echo token contents (claim values, key
/// ids, token bytes): they say what was wrong and what to do about it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token is longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("token is {len} bytes, more than the {max} accepted; send the projected service account token, nothing else")]
    TooLarge { len: usize, max: usize },
    /// The token is empty or only whitespace.
    #[error("token is empty; mount a projected service account token and point the proxy at it")]
    Empty,
    /// The token is not a well-formed JWT: segments, base64url, JSON, types or duplicate keys.
    #[error("token is malformed ({what}); send a compact-serialized JWS JWT")]
    Malformed { what: &'static str },
    /// The header `alg` is not on the allow-list (`none`, HMAC and others never are).
    #[error("token signing algorithm is not accepted; sign with an allowed algorithm (RS256 or ES256)")]
    UnsupportedAlgorithm,
    /// No key in the key set matches the token's `kid` and algorithm.
    #[error("no trusted key matches the token's key id and algorithm; check that the JWKS is current")]
    UnknownKey,
    /// A candidate key exists but the signature does not verify.
    #[error("token signature does not verify; the token was altered or signed by an untrusted key")]
    BadSignature,
    /// `now` is later than `exp` plus leeway.
    #[error("token has expired; the proxy must re-read its refreshed token")]
    Expired { exp: SystemTime, now: SystemTime },
    /// `now` plus leeway is earlier than `nbf`.
    #[error("token is not valid yet; check clock synchronisation between issuer and CA")]
    NotYetValid { nbf: SystemTime, now: SystemTime },
    /// `iat` is later than `now` plus leeway.
    #[error("token was issued in the future; check clock synchronisation between issuer and CA")]
    IssuedInFuture { iat: SystemTime, now: SystemTime },
    /// The claims carry no `exp`; tokens that never expire are refused.
    #[error("token has no expiry; use a bound, expiring (projected) service account token")]
    MissingExpiry,
    /// `iss` is missing or not the configured issuer.
    #[error("token issuer is not the configured issuer; check the issuer setting or the token source")]
    WrongIssuer,
    /// `aud` is missing or names none of the configured audiences.
    #[error(
        "token audience does not include an accepted audience; request the token with the CA's audience"
    )]
    WrongAudience,
    /// Neither `kubernetes.io` claims nor a `system:serviceaccount:NS:SA` subject.
    #[error("token names no Kubernetes service account; use a service account token")]
    MissingIdentity,
    /// The Kubernetes API server reviewed the token and did not authenticate it.
    /// `summary` is one of a fixed set of descriptions chosen from its answer: the
    /// API server's own text may quote token claims, so it is never passed on.
    #[error("the Kubernetes API server did not authenticate the token ({summary}); send a current projected service account token requested with the CA's audience")]
    Rejected { summary: &'static str },
    /// `--jwks-confirm-pod`: the pod the token is bound to does not exist (deleted),
    /// or has been terminating for more than a minute.
    #[error(
        "the pod the token is bound to no longer exists; the proxy must present the token of its current pod"
    )]
    PodNotFound,
    /// `--jwks-confirm-pod`: a pod of that name exists with another uid (deleted and
    /// re-created under the same name).
    #[error("the pod the token is bound to was replaced by another pod of the same name; the proxy must present the token of its current pod")]
    PodUidMismatch,
    /// The authentication backend could not be reached, did not answer in time,
    /// answered with an error, or is being spared (rate limit). Never cached.
    #[error("authentication backend unavailable: {reason}; retry later")]
    Unavailable { reason: String },
    /// Building an authenticator failed (unreadable or invalid key set, no usable keys).
    #[error("authenticator configuration is invalid: {reason}")]
    Config { reason: String },
    /// A bootstrap token sent to a server that does not accept them (started
    /// without `--bootstrap-tokens`).
    #[error("this meshca does not accept bootstrap tokens: start it with --bootstrap-tokens (MESHCA_BOOTSTRAP_TOKENS=true, or `bootstrap-tokens = true` in its config), or present a Kubernetes token or the current certificate")]
    BootstrapDisabled,
    /// A bootstrap token whose every use has been spent (replayed, or shared).
    #[error("the bootstrap token has already been used as often as it allows; create a new one with `meshca bootstrap-token create`, or renew with the current certificate")]
    BootstrapTokenUsed,
    /// A bootstrap token whose key id is not meshca's current issuer: signed before
    /// an issuer rotation, or by another deployment.
    #[error("the bootstrap token was not signed by meshca's current issuer (it was rotated since, or the token is from another deployment); create a new one with `meshca bootstrap-token create`")]
    BootstrapUnknownKey,
    /// Signing a development token failed (times before 1970, random generator failure).
    #[error("cannot sign development token: {reason}")]
    Signing { reason: &'static str },
}

impl Error {
    /// A stable snake_case reason code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::TooLarge { .. } => "token_too_large",
            Error::Empty => "token_empty",
            Error::Malformed { .. } => "token_malformed",
            Error::UnsupportedAlgorithm => "unsupported_algorithm",
            Error::UnknownKey => "unknown_key",
            Error::BadSignature => "bad_signature",
            Error::Expired { .. } => "token_expired",
            Error::NotYetValid { .. } => "token_not_yet_valid",
            Error::IssuedInFuture { .. } => "token_issued_in_future",
            Error::MissingExpiry => "missing_expiry",
            Error::WrongIssuer => "wrong_issuer",
            Error::WrongAudience => "wrong_audience",
            Error::MissingIdentity => "missing_identity",
            Error::Rejected { .. } => "token_rejected",
            Error::PodNotFound => "pod_not_found",
            Error::PodUidMismatch => "pod_uid_mismatch",
            Error::Unavailable { .. } => "backend_unavailable",
            Error::Config { .. } => "config_invalid",
            Error::Signing { .. } => "signing_failed",
            Error::BootstrapTokenUsed => "bootstrap_token_used",
            Error::BootstrapDisabled => "bootstrap_tokens_disabled",
            Error::BootstrapUnknownKey => "bootstrap_unknown_key",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_up_to_the_size_limit_are_trimmed_and_longer_or_blank_ones_refused() {
        let padded = [&b" \t"[..], &[b'a'; MAX_TOKEN_LEN - 3], b"\n"].concat();
        assert_eq!(padded.len(), MAX_TOKEN_LEN);
        assert_eq!(trimmed(&padded).unwrap(), &[b'a'; MAX_TOKEN_LEN - 3][..]);
        let long = [b'a'; MAX_TOKEN_LEN + 1];
        assert!(
            matches!(trimmed(&long), Err(Error::TooLarge { len, max: MAX_TOKEN_LEN }) if len == MAX_TOKEN_LEN + 1)
        );
        assert!(matches!(trimmed(b" \r\n"), Err(Error::Empty)));
    }
}
