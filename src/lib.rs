//! meshca: a trust-anchor certificate authority for service meshes.
//!
//! Proxies call Certify (Linkerd's identity protocol) or CreateCertificate (Istio's)
//! with a workload token and a CSR; meshca proves who the caller is, checks that the CSR asks for that identity
//! and nothing more, signs a short-lived leaf, records the decision in a
//! hash-chained audit log, and returns the chain.
//!
//! # Layout: the request path, in order
//! - [`server`]: transport — gRPC over TLS, connection limits, the admin listener;
//!   `server::grpc` (Linkerd's Certify) and `server::istio` (Istio's
//!   CreateCertificate) are adapters over [`issuance`], the core that runs every
//!   application through the stages below, once for every API.
//! - [`admission`]: admit — in-flight bound, rate limits, the signing workers.
//! - [`auth`]: authenticate — token bytes → [`auth::Subject`].
//! - [`identity`]: authorize — Subject → the one identity it may hold.
//! - [`ca`]: issue — CSR checks, leaf profile, signing with the current issuer snapshot
//!   (swapped whole when the issuer or trust-anchor files change: [`ca::reload`]).
//! - [`audit`]: record — hash-chained, durable before the reply.
//! - [`status`]: the one mapping from any stage's error to a gRPC status; [`wire`]:
//!   the metadata names server and clients agree on.
//!
//! Beside the path: [`cluster`] (Kubernetes Events, node OS), [`metrics`] (the
//! `/metrics` registry), [`files`] (atomic writes), [`jose`] (compact JWS, base64url, key ids), [`config`] and [`cli`]
//! (settings; [`setting`], one value's checks), [`clock`] (injected time), [`logging`] (log lines that never fail a thread),
//! [`coalesce`] (HTTP/2 writes held until a flush, for server and client),
//! [`agent`] (the client side: key, CSR, Certify, verify, write files), [`doctor`]
//! (what stands between a host and its certificate), [`dev`] (the embedded default)
//! and [`commands`] (what each subcommand does). No module depends on one that
//! depends on it (`tests/architecture.rs`).
#![forbid(unsafe_code)]

pub mod admission;
pub mod agent;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod cluster;
pub(crate) mod coalesce;
pub mod commands;
pub mod config;
pub mod dev;
pub mod digest;
pub mod doctor;
pub(crate) mod files;
pub mod identity;
pub mod issuance;
pub mod jose;
pub mod logging;
pub mod metrics;
pub mod server;
pub(crate) mod setting;
pub mod status;
pub(crate) mod wire;

/// Generated from proto/identity.proto: `io.linkerd.proxy.identity`.
#[allow(clippy::all, missing_docs)] // generated code
pub mod proto {
    tonic::include_proto!("io.linkerd.proxy.identity");
}

/// Generated from proto/istio_ca.proto: `istio.v1.auth`, Istio's certificate service.
#[allow(clippy::all, missing_docs)] // generated code
pub mod istio {
    tonic::include_proto!("istio.v1.auth");
}

/// Generated from proto/trustbundle.proto: `meshca.v1`, meshca's own API (TrustBundle).
#[allow(clippy::all, missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("meshca.v1");
}
