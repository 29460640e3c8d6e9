//! Counters and gauges served on the admin listener's `/metrics` (Prometheus text).
//!
//! Kept to what an operator alerts on: issuances, denials by reason, Certify latency,
//! audit write failures, issuer, trust-anchor and serving-certificate expiry, and
//! issuer/trust-anchor reloads (counted through [`crate::ca::reload::Observer`]).
//! Recording is lock-free on the issuance path; denials take a short lock keyed by
//! reason. The authenticator's own metrics (token reviews, its cache, JWKS
//! refreshes) are appended to the same page by
//! [`crate::auth::Authenticator::render_metrics`], the Kubernetes Events
//! counters by [`Emitter::render_metrics`], and the node OS lookup counters by
//! [`NodeOs::render_metrics`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::auth::Authenticator;
use crate::ca::reload::Observer;
use crate::ca::store::Snapshot;
use crate::clock::unix_seconds;
use crate::server::events::Emitter;
use crate::server::nodes::NodeOs;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

#[derive(Debug, Default)]
pub struct Metrics {
    issued: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// Unix seconds.
    issuer_not_after: AtomicU64,
    anchors_not_after: AtomicU64,
    serving_not_after: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    ready: AtomicBool,
    authenticator: AuthenticatorMetrics,
    /// The Kubernetes Events emitter, when events are on; set once at start.
    events: OnceLock<Emitter>,
    /// The node OS lookups, when on; set once at start.
    nodes: OnceLock<Arc<NodeOs>>,
}

/// The authenticator whose metrics `/metrics` also shows; set once at start.
#[derive(Default)]
struct AuthenticatorMetrics(OnceLock<Arc<dyn Authenticator>>);

impl std::fmt::Debug for AuthenticatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AuthenticatorMetrics").field(&self.0.get().map(|a| a.name())).finish()
    }
}

impl Metrics {
    fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn record_issued(&self, latency: Duration) {
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.observe(latency);
    }

    pub fn record_denied(&self, reason: &'static str, latency: Duration) {
        *self.denied.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
        self.observe(latency);
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    pub fn set_issuer_not_after(&self, unix: u64) {
        self.issuer_not_after.store(unix, Ordering::Relaxed);
    }

    /// Sets the issuer and trust-anchor expiry gauges from the snapshot in use.
    pub fn set_snapshot(&self, snapshot: &Snapshot) {
        self.set_issuer_not_after(unix_seconds(snapshot.issuer.window().not_after));
        let anchors = snapshot.anchors_not_after().map(unix_seconds).unwrap_or(0);
        self.anchors_not_after.store(anchors, Ordering::Relaxed);
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Failed reload attempts since start.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    pub fn set_serving_not_after(&self, unix: u64) {
        self.serving_not_after.store(unix, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Shows `authenticator`'s own metrics after these; only the first call counts.
    pub fn set_authenticator(&self, authenticator: Arc<dyn Authenticator>) {
        let _ = self.authenticator.0.set(authenticator);
    }

    /// Shows the Kubernetes Events counters too; only the first call counts.
    pub fn set_events(&self, emitter: Emitter) {
        let _ = self.events.set(emitter);
    }

    /// Shows the node OS lookup counters too; only the first call counts.
    pub fn set_nodes(&self, nodes: Arc<NodeOs>) {
        let _ = self.nodes.set(nodes);
    }

    /// Prometheus text exposition.
    pub fn render(&self, audit_write_failures: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP meshca_certify_total Certify decisions by outcome and reason.");
        let _ = writeln!(out, "# TYPE meshca_certify_total counter");
        let _ = writeln!(out, "meshca_certify_total{{outcome=\"issued\",reason=\"\"}} {}", self.issued());
        for (reason, n) in self.denied.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "meshca_certify_total{{outcome=\"denied\",reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP meshca_certify_duration_seconds Certify latency inside the server.");
        let _ = writeln!(out, "# TYPE meshca_certify_duration_seconds histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "meshca_certify_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "meshca_certify_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "meshca_certify_duration_seconds_sum {sum}");
        let _ = writeln!(out, "meshca_certify_duration_seconds_count {count}");
        let gauges = [
            (
                "meshca_audit_write_failures_total",
                "counter",
                "Audit appends that failed.",
                audit_write_failures,
            ),
            (
                "meshca_issuer_not_after_seconds",
                "gauge",
                "Unix time the issuer chain expires.",
                self.issuer_not_after.load(Ordering::Relaxed),
            ),
            (
                "meshca_trust_anchor_earliest_not_after_seconds",
                "gauge",
                "Unix time the first of the trust anchors expires.",
                self.anchors_not_after.load(Ordering::Relaxed),
            ),
            (
                "meshca_reloads_total",
                "counter",
                "Issuer and trust-anchor reloads swapped in.",
                self.reloads(),
            ),
            (
                "meshca_reload_failures_total",
                "counter",
                "Reload attempts whose files could not be used (the previous issuer stayed).",
                self.reload_failures(),
            ),
            (
                "meshca_serving_certificate_not_after_seconds",
                "gauge",
                "Unix time the serving certificate expires.",
                self.serving_not_after.load(Ordering::Relaxed),
            ),
            (
                "meshca_ready",
                "gauge",
                "1 when an issuer is loaded and gRPC is listening.",
                u64::from(self.is_ready()),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        if let Some(authenticator) = self.authenticator.0.get() {
            authenticator.render_metrics(&mut out);
        }
        if let Some(events) = self.events.get() {
            events.render_metrics(&mut out);
        }
        if let Some(nodes) = self.nodes.get() {
            nodes.render_metrics(&mut out);
        }
        out
    }
}

impl Observer for Metrics {
    fn reloaded(&self, snapshot: &Snapshot) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.set_snapshot(snapshot);
    }

    fn reload_failed(&self, _error: &crate::ca::Error) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes counters in Prometheus text: `(name, help, value)` each.
pub fn write_counters(out: &mut String, counters: &[(&str, &str, &AtomicU64)]) {
    for (name, help, value) in counters {
        let value = value.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_outcomes_and_latency() {
        let m = Metrics::default();
        m.record_issued(Duration::from_micros(800));
        m.record_denied("token_expired", Duration::from_millis(3));
        m.record_denied("token_expired", Duration::from_millis(3));
        let text = m.render(4);
        assert!(text.contains("meshca_certify_total{outcome=\"issued\",reason=\"\"} 1"), "{text}");
        assert!(text.contains("meshca_certify_total{outcome=\"denied\",reason=\"token_expired\"} 2"));
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("meshca_certify_duration_seconds_count 3"));
        assert!(text.contains("meshca_audit_write_failures_total 4"));
    }

    #[test]
    fn reloads_failures_and_the_earliest_anchor_expiry_are_rendered() {
        use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
        use crate::clock::{Clock, SystemClock};
        let dir = tempfile::tempdir().unwrap();
        let naming = crate::identity::Naming::new("cluster.local", "meshca-system").unwrap();
        let now = SystemClock.now();
        let h = hierarchy::generate(&naming, CaKeyType::P256, now, HierarchyLifetimes::default()).unwrap();
        crate::dev::write_hierarchy(dir.path(), &h).unwrap();
        let snapshot =
            Snapshot::load(&dir.path().join("trust-anchors.pem"), &dir.path().join("issuer"), now).unwrap();
        let m = Metrics::default();
        m.reloaded(&snapshot);
        m.reload_failed(&crate::ca::Error::KeyMismatch);
        m.reload_failed(&crate::ca::Error::KeyMismatch);
        let text = m.render(0);
        assert!(text.contains("\nmeshca_reloads_total 1\n"), "{text}");
        assert!(text.contains("\nmeshca_reload_failures_total 2\n"), "{text}");
        let anchor = unix_seconds(snapshot.anchors_not_after().unwrap());
        assert!(anchor > unix_seconds(now) + 9 * 365 * 86_400, "the root lasts ten years");
        let gauge = format!("\nmeshca_trust_anchor_earliest_not_after_seconds {anchor}\n");
        assert!(text.contains(&gauge), "{text}");
        let issuer = unix_seconds(snapshot.issuer.window().not_after);
        assert!(text.contains(&format!("\nmeshca_issuer_not_after_seconds {issuer}\n")), "{text}");
    }

    #[test]
    fn the_authenticators_own_metrics_follow_the_servers() {
        struct Reviewing;
        impl Authenticator for Reviewing {
            fn authenticate<'a>(
                &'a self,
                _: &'a [u8],
                _: std::time::SystemTime,
            ) -> crate::auth::AuthFuture<'a> {
                Box::pin(async { Err(crate::auth::Error::Empty) })
            }
            fn name(&self) -> &'static str {
                "reviewing"
            }
            fn render_metrics(&self, out: &mut String) {
                out.push_str("meshca_token_reviews_total 7\n");
            }
        }
        let m = Metrics::default();
        assert!(!m.render(0).contains("meshca_token_reviews_total"));
        m.set_authenticator(Arc::new(Reviewing));
        let text = m.render(0);
        assert!(text.ends_with("meshca_ready 0\nmeshca_token_reviews_total 7\n"), "{text}");
    }
}
