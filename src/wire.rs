//! The names meshca and its clients agree on over gRPC, beyond the messages: request
//! and response metadata. A leaf module: the server's adapters (`server::grpc`,
//! `server::istio`), the refusal mapping (`status`) and the client side (`agent`,
//! `doctor`) all read these from here, so no client depends on the server.

/// Response metadata: the server's wall-clock time at the request, Unix
/// milliseconds, so clients can estimate their clock offset.
pub(crate) const SERVER_TIME_HEADER: &str = "x-meshca-time";
/// Request metadata asking for a dry run (value `1`); the answer says `passed`.
pub(crate) const DRY_RUN_HEADER: &str = "x-meshca-dry-run";
/// Response metadata: the request id, as in the audit record and the log line.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";
/// Metadata on every refusal: its stable reason code, as in the audit record, so
/// that clients (`meshca doctor`) tell refusals apart without reading their text.
pub(crate) const REASON_HEADER: &str = "x-meshca-reason";
/// Metadata on a `ResourceExhausted` status: milliseconds to wait before retrying
/// (gRPC's retry pushback, proposal A6).
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";
