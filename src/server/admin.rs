//! The admin HTTP listener: `/live`, `/ready`, `/metrics`.
//!
//! `/live` answers 200 whenever the runtime gets to answer at all: it fails (by
//! timing out) only when the process is wedged, and never because of something
//! outside it (an API server outage, a failing audit disk, an expired issuer),
//! which a restart would not mend and which `/ready` reports instead.
//!
//! `/ready` answers 200 `ready`, or 503 with a one-line reason ([`Readiness`]):
//! while gRPC is not being served (starting, shutting down), when no valid issuer is
//! loaded (none, or the one held has expired or is not valid yet), while the audit
//! sink is failing ([`AuditLog::is_failing`]: appends are refused, so nothing can
//! be issued), and when the authenticator's backend (tokenreview: the Kubernetes
//! API server) has failed every call for longer than
//! `--ready-api-unreachable-threshold`. In that last case `/ready` probes the
//! backend itself ([`Authenticator::probe`]): a replica taken out of its Service
//! gets no Certify calls to find out that the API server is back.
//!
//! `/metrics` is the Prometheus text format ([`Metrics::render`]). Nothing here can
//! issue a certificate. Connections are few and short-lived
//! ([`super::admin_listener`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::auth::Authenticator;
use crate::ca::store::Store;
use crate::clock::Clock;
use crate::metrics::{Metrics, Registry, ScrapeGauge};

/// How long `/ready` waits for a probe of the backend before answering from what
/// it knows; a slower probe goes on and the next check sees its result.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// What `/ready` and `meshca_ready` check.
pub(crate) struct Readiness {
    serving: AtomicBool,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    authenticator: Arc<dyn Authenticator>,
    api_unreachable_threshold: Duration,
    /// The reason last reported, to log changes once.
    last: Mutex<Option<String>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("serving", &self.serving)
            .field("api_unreachable_threshold", &self.api_unreachable_threshold)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// Not serving until [`Self::set_serving`].
    pub(crate) fn new(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        authenticator: Arc<dyn Authenticator>,
        api_unreachable_threshold: Duration,
    ) -> Readiness {
        Readiness {
            serving: AtomicBool::new(false),
            store,
            clock,
            audit,
            authenticator,
            api_unreachable_threshold,
            last: Mutex::new(None),
        }
    }

    /// gRPC is served (`true` once listening, `false` from shutdown on).
    pub(crate) fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// `Ok`, or why this replica should get no traffic; asks nothing of anyone.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Acquire) {
            return Err("gRPC is not being served (starting or shutting down)".into());
        }
        let now = self.clock.now();
        let Some(snapshot) = self.store.current() else {
            return Err("no issuer is loaded".into());
        };
        let window = snapshot.issuer.window();
        if now >= window.not_after {
            return Err(format!("the issuer expired at {}", rfc3339(window.not_after)));
        }
        if now < window.not_before {
            return Err(format!("the issuer is not valid before {}", rfc3339(window.not_before)));
        }
        if self.audit.is_failing() {
            return Err("the audit log is failing: every decision is refused until a write succeeds".into());
        }
        if let Some(reason) = snapshot.issuer.key_failing() {
            return Err(format!(
                "the issuer key's PKCS#11 token does not sign ({reason}); retried every second"
            ));
        }
        if let Some(down) = self.unreachable_for(now) {
            return Err(format!(
                "the token validation backend (Kubernetes API server) has failed every call for {} \
                 (--ready-api-unreachable-threshold {})",
                humantime::format_duration(down),
                humantime::format_duration(self.api_unreachable_threshold)
            ));
        }
        Ok(())
    }

    /// How long the backend has failed every call, when longer than the threshold.
    fn unreachable_for(&self, now: SystemTime) -> Option<Duration> {
        let since = self.authenticator.unreachable_since()?;
        let down = now.duration_since(since).unwrap_or_default();
        (down > self.api_unreachable_threshold).then(|| Duration::from_secs(down.as_secs()))
    }

    /// Like [`Self::check`], after probing the backend when it has been unreachable
    /// too long (bounded by [`PROBE_WAIT`]); logs when the answer changes.
    pub(crate) async fn check_probing(&self) -> Result<(), String> {
        if let Some(snapshot) = self.store.current().filter(|s| s.issuer.key_failing().is_some()) {
            // Blocking PKCS#11 calls, off the runtime; bounded like the backend probe.
            let probe = tokio::task::spawn_blocking(move || snapshot.issuer.reopen_key());
            let _ = tokio::time::timeout(PROBE_WAIT, probe).await;
        }
        let now = self.clock.now();
        if self.unreachable_for(now).is_some() {
            let authenticator = self.authenticator.clone();
            let probe = tokio::spawn(async move { authenticator.probe(now).await });
            let _ = tokio::time::timeout(PROBE_WAIT, probe).await;
        }
        let verdict = self.check();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let reason = verdict.as_ref().err();
        if last.as_ref() != reason {
            match reason {
                Some(reason) => tracing::warn!(%reason, "not ready"),
                None => tracing::info!("ready"),
            }
            *last = reason.cloned();
        }
        verdict
    }

    /// Registers `meshca_ready`.
    pub(crate) fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let readiness = self.clone();
        registry.register(
            "meshca_ready",
            "1 when /ready answers 200: serving, a valid issuer, a working audit log, a reachable token backend",
            ScrapeGauge::new(move || i64::from(readiness.check().is_ok())),
        );
    }
}

fn rfc3339(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    match s.readiness.check_probing().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn scrape(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], s.metrics.render())
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(scrape))
        .with_state(AdminState { metrics, readiness });
    axum::serve(super::admin_listener::Limited::new(listener), app).with_graceful_shutdown(shutdown).await
}
