//! meshca: a trust-anchor certificate authority for service meshes.
//!
//! Proxies call Certify (Linkerd's identity protocol) with a workload token and a
//! CSR; meshca proves who the caller is, checks that the CSR asks for that identity
//! and nothing more, signs a short-lived leaf, records the decision in a
//! hash-chained audit log, and returns the chain.
//!
//! # Layout: the request path, in order
//! - [`server`]: transport — gRPC over TLS, limits, request ids, the admin listener;
//!   `server::grpc` is Linkerd's Certify, an adapter over [`issuance`], the core that
//!   runs every application through the stages below, once for every API.
//! - [`auth`]: authenticate — token bytes → [`auth::Subject`].
//! - [`identity`]: authorize — Subject → the one identity it may hold.
//! - [`ca`]: issue — CSR checks, leaf profile, signing with the current issuer snapshot
//!   (swapped whole when the issuer or trust-anchor files change: [`ca::reload`]).
//! - [`audit`]: record — hash-chained, durable before the reply.
//! - [`status`]: the one mapping from any stage's error to a gRPC status.
//!
//! Beside the path: [`config`] and [`cli`] (settings), [`clock`] (injected time),
//! [`coalesce`] (HTTP/2 writes held until a flush, for server and client),
//! [`agent`] (the client side: key, CSR, Certify, verify, write files), [`doctor`]
//! (what stands between a host and its certificate), [`dev`] (the embedded default)
//! and [`commands`] (what each subcommand does).
#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod dev;
pub mod doctor;
pub mod identity;
pub mod issuance;
pub mod server;
pub mod status;

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
