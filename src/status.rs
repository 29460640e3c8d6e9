//! The one mapping from a refused Certify request to a gRPC status.
//!
//! Every stage of the request path has its own error type; [`Refusal`] gathers
//! them, and [`Refusal::status`] is the only place a `tonic::Status` is built for a
//! refusal. The status message says what was wrong and what to do; it never echoes
//! token contents (the stage errors guarantee that for their Display text).
//!
//! | status              | when                                                        |
//! |---------------------|-------------------------------------------------------------|
//! | `InvalidArgument`   | malformed or oversized request, CSR or token; bad CSR signature |
//! | `Unauthenticated`   | token invalid, expired, wrong issuer or audience; bootstrap token used up |
//! | `PermissionDenied`  | token valid but for another identity; CSR names something else |
//! | `FailedPrecondition`| issuer expired or unusable                                  |
//! | `Unavailable`       | no issuer loaded, audit log failing, token backend unreachable |
//! | `ResourceExhausted` | over capacity or a rate limit; `grpc-retry-pushback-ms` says when to retry |
//! | `Internal`          | signing failed (a fault of ours, logged with the request id) |

use tonic::{Code, Status};

use crate::admission::Scope;
use crate::{audit, auth, ca, identity};

pub(crate) use crate::wire::REASON_HEADER;
pub use crate::wire::RETRY_PUSHBACK_HEADER;

/// Why the request itself is unusable before any stage looks at it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RequestError {
    /// The encoded request exceeds the size limit.
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
}

/// A refused Certify request: the error of the stage that refused it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("token refused: {0}")]
    Auth(#[from] auth::Error),
    #[error(transparent)]
    Peer(#[from] auth::peer::Error),
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error(transparent)]
    Ca(#[from] ca::Error),
    /// No issuer has been loaded yet (or it was unloadable at start).
    #[error("no issuer is loaded; retry shortly")]
    NoIssuer,
    /// The audit record could not be written: nothing is issued without one.
    #[error(
        "the audit log cannot be written; no certificate is issued without an audit record; retry later"
    )]
    Audit(#[from] audit::Error),
    /// Too many requests in flight (`admission`).
    #[error("meshca is over capacity; retry in {} ms", retry_after.as_millis())]
    Overloaded { retry_after: std::time::Duration },
    /// A signing worker lost the request (it panicked, or the server is stopping).
    #[error("{0}; retry")]
    Workers(crate::admission::workers::Error),
    /// A rate limit (per peer address or per identity) has no room for this request.
    #[error("{} rate limit reached; retry in {} ms", scope.as_str(), retry_after.as_millis())]
    RateLimited { scope: crate::admission::Scope, retry_after: std::time::Duration },
}

impl Refusal {
    /// The gRPC status code for this refusal.
    pub(crate) fn code(&self) -> Code {
        match self {
            Refusal::Request(_) => Code::InvalidArgument,
            Refusal::Auth(e) => match e {
                auth::Error::TooLarge { .. } => Code::InvalidArgument,
                auth::Error::Unavailable { .. } | auth::Error::Config { .. } => Code::Unavailable,
                _ => Code::Unauthenticated,
            },
            Refusal::Peer(_) => Code::Unauthenticated,
            Refusal::Identity(e) => match e {
                identity::Error::RequestedMalformed { .. } => Code::InvalidArgument,
                _ => Code::PermissionDenied,
            },
            Refusal::Ca(e) => match e {
                ca::Error::Csr(c) if c.is_permission() => Code::PermissionDenied,
                ca::Error::Csr(_) => Code::InvalidArgument,
                ca::Error::Sign { .. } => Code::Internal,
                ca::Error::KeyUnavailable { .. } => Code::Unavailable,
                _ => Code::FailedPrecondition,
            },
            Refusal::NoIssuer | Refusal::Audit(_) => Code::Unavailable,
            Refusal::Workers(_) => Code::Internal,
            Refusal::Overloaded { .. } | Refusal::RateLimited { .. } => Code::ResourceExhausted,
        }
    }

    /// Stable snake_case reason for audit records and metrics.
    pub(crate) fn reason_code(&self) -> &'static str {
        match self {
            Refusal::Request(RequestError::TooLarge { .. }) => "request_too_large",
            Refusal::Auth(e) => e.code(),
            Refusal::Peer(e) => e.code(),
            Refusal::Identity(e) => e.code(),
            Refusal::Ca(e) => e.code(),
            Refusal::NoIssuer => "no_issuer",
            Refusal::Audit(_) => "audit_unavailable",
            Refusal::Workers(_) => "worker_lost",
            Refusal::Overloaded { .. } => "overloaded",
            Refusal::RateLimited { scope: Scope::Peer, .. } => "rate_limited_peer",
            Refusal::RateLimited { scope: Scope::Identity, .. } => "rate_limited_identity",
        }
    }

    /// The status sent to the caller, tagged with the request id.
    pub(crate) fn status(&self, request_id: &str) -> Status {
        let message = match self.code() {
            // Internal details stay in the log, under the request id.
            Code::Internal => format!("internal error (request id {request_id})"),
            _ => self.to_string(),
        };
        let mut status = Status::new(self.code(), message);
        if let Ok(v) = request_id.parse() {
            status.metadata_mut().insert(crate::wire::REQUEST_ID_HEADER, v);
        }
        status
            .metadata_mut()
            .insert(REASON_HEADER, tonic::metadata::MetadataValue::from_static(self.reason_code()));
        if let Some(wait) = self.retry_after() {
            // gRPC's retry pushback (proposal A6), honoured by gRPC retry policies.
            if let Ok(v) = wait.as_millis().to_string().parse() {
                status.metadata_mut().insert(RETRY_PUSHBACK_HEADER, v);
            }
        }
        status
    }

    /// How long the caller should wait before retrying, when meshca can tell.
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Refusal::Overloaded { retry_after } | Refusal::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

/// The name of a status code as written in audit records (e.g. "PermissionDenied").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
