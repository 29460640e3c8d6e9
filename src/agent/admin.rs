//! The agent's optional admin listener: `/live`, `/ready`, `/metrics`.
//!
//! `/ready` answers 200 once a certificate valid at the server's time is on disk
//! (so an init container or a proxy's start-up probe can wait for it), 503 before
//! and after it expires. Nothing here can change the files.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::status::Status;
use crate::clock::Clock;

#[derive(Clone)]
struct AdminState {
    status: Arc<Status>,
    clock: Arc<dyn Clock>,
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.status.is_ready(s.clock.now()) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no valid certificate on disk\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.status.render(s.clock.now()))
}

/// Serves the agent's admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AdminState { status, clock });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
