//! The admin HTTP listener: `/live`, `/ready`, `/metrics`.
//!
//! `/live` answers 200 while the process serves HTTP at all. `/ready` answers 200
//! only once an issuer is loaded and the gRPC listener is up, 503 before (and during
//! shutdown). `/metrics` is Prometheus text. Nothing here can issue a certificate.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::server::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    audit: AuditLog,
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.metrics.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(s.audit.write_failures()))
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    counters: Arc<Metrics>,
    audit: AuditLog,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AdminState { metrics: counters, audit });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
