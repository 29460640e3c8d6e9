//! The metrics served on the admin listener's `/metrics`, in the Prometheus text
//! format (0.0.4), encoded by the `prometheus-client` crate.
//!
//! Kept to what an operator alerts on or debugs with: Certify decisions by outcome
//! and reason, Certify latency, requests in flight, issuer, trust-anchor and
//! serving-certificate expiry (as not-after timestamps and as seconds left at the
//! injected clock), issuer/trust-anchor reloads (counted through
//! [`crate::ca::reload::Observer`]), audit records written and failed
//! ([`register_audit`]) and readiness (`admin::Readiness`).
//!
//! Other parts register their own metrics into the same [`Registry`] once, at
//! start ([`Metrics::register`]): the authenticator
//! ([`crate::auth::Authenticator::register_metrics`]: token reviews, its cache, JWKS
//! refreshes, pod lookups), the Kubernetes Events emitter
//! ([`Emitter::register_metrics`](crate::cluster::events::Emitter::register_metrics))
//! and the node OS lookups
//! ([`NodeOs::register_metrics`](crate::cluster::nodes::NodeOs::register_metrics)).
//! Each keeps its counters as `prometheus_client` [`Counter`]s (an `Arc`'d atomic:
//! the registry holds a clone) and registers values known only at scrape time
//! (queue lengths, cache sizes, seconds left) as [`ScrapeGauge`]s.
//!
//! Recording on the issuance path is atomics only: the `issued` series and the
//! latency histogram ([`LatencyHistogram`], lock-free unlike the crate's own) are
//! held as handles. A denial looks its reason's series up in the label family
//! (a shared read lock; a write lock the first time a reason is seen). The
//! registry's mutex is taken at registration and per scrape, never per request.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

use crate::audit::AuditLog;
use crate::ca::reload::Observer;
use crate::ca::store::Snapshot;
use crate::clock::{unix_seconds, Clock};

/// `Content-Type` of `/metrics`: the Prometheus text format, version 0.0.4.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the Certify latency histogram, in seconds.
const CERTIFY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Labels of `meshca_certify_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertifyLabels {
    /// `issued` or `denied`.
    outcome: &'static str,
    /// Empty for an issuance; the refusal's reason code for a denial.
    reason: &'static str,
}

/// The server's own metrics and the registry every other part adds to.
pub struct Metrics {
    registry: Mutex<Registry>,
    certify: Family<CertifyLabels, Counter>,
    /// The `outcome="issued"` series of `certify`, held so that recording is one atomic add.
    issued: Counter,
    latency: LatencyHistogram,
    in_flight: Gauge,
    /// Unix seconds; 0 while unknown (no serving certificate with `--plaintext`).
    issuer_not_after: Arc<AtomicU64>,
    anchors_not_after: Arc<AtomicU64>,
    serving_not_after: Arc<AtomicU64>,
    reloads: Counter,
    reload_failures: Counter,
    /// Unauthenticated refusals over the audit quota (counted, not recorded one by one).
    suppressed: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("issued", &self.issued.get())
            .field("in_flight", &self.in_flight.get())
            .field("reloads", &self.reloads.get())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The server's metrics, registered; `clock` tells the seconds left to each
    /// expiry at scrape time.
    pub fn new(clock: Arc<dyn Clock>) -> Metrics {
        let certify = Family::<CertifyLabels, Counter>::default();
        let issued = certify.get_or_create(&CertifyLabels { outcome: "issued", reason: "" }).clone();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            certify,
            issued,
            latency: LatencyHistogram::new(CERTIFY_BUCKETS),
            in_flight: Gauge::default(),
            issuer_not_after: Arc::default(),
            anchors_not_after: Arc::default(),
            serving_not_after: Arc::default(),
            reloads: Counter::default(),
            suppressed: Counter::default(),
            reload_failures: Counter::default(),
        };
        m.register(|r| {
            r.register(
                "meshca_certify",
                "Certify decisions by outcome (issued, denied) and reason code (empty when issued)",
                m.certify.clone(),
            );
            r.register(
                "meshca_certify_duration_seconds",
                "Certify latency inside the server, decisions of either outcome",
                m.latency.clone(),
            );
            r.register("meshca_certify_in_flight", "Certify requests being handled now", m.in_flight.clone());
            // Names spelt out whole, so that grepping the source for a metric finds it.
            let expiries = [
                (
                    "meshca_issuer_not_after_seconds",
                    "meshca_issuer_expires_in_seconds",
                    "the issuer chain",
                    &m.issuer_not_after,
                ),
                (
                    "meshca_trust_anchor_earliest_not_after_seconds",
                    "meshca_trust_anchor_earliest_expires_in_seconds",
                    "the first of the trust anchors",
                    &m.anchors_not_after,
                ),
                (
                    "meshca_serving_certificate_not_after_seconds",
                    "meshca_serving_certificate_expires_in_seconds",
                    "the serving certificate",
                    &m.serving_not_after,
                ),
            ];
            for (not_after_name, expires_in_name, what, not_after) in expiries {
                let at = not_after.clone();
                r.register(
                    not_after_name,
                    format!("Unix time {what} expires"),
                    ScrapeGauge::optional(move || known(&at).map(|t| i64::try_from(t).unwrap_or(i64::MAX))),
                );
                let (at, clock) = (not_after.clone(), clock.clone());
                r.register(
                    expires_in_name,
                    format!("Seconds until {what} expires, at meshca's clock (negative once expired)"),
                    ScrapeGauge::optional(move || known(&at).map(|t| seconds_until(t, clock.now()))),
                );
            }
            r.register("meshca_reloads", "Issuer and trust-anchor reloads swapped in", m.reloads.clone());
            r.register(
                "meshca_audit_suppressed",
                "Refusals of unauthenticated requests over the audit quota: counted in a suppressed record, not recorded one by one",
                m.suppressed.clone(),
            );
            r.register(
                "meshca_reload_failures",
                "Reload attempts whose files could not be used (the previous issuer stayed)",
                m.reload_failures.clone(),
            );
        });
        m
    }

    /// Adds metrics to the page; for start-up, not for the request path.
    pub(crate) fn register(&self, register: impl FnOnce(&mut Registry)) {
        register(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn record_issued(&self, latency: Duration) {
        self.issued.inc();
        self.latency.observe(latency);
    }

    pub(crate) fn record_denied(&self, reason: &'static str, latency: Duration) {
        self.certify.get_or_create(&CertifyLabels { outcome: "denied", reason }).inc();
        self.latency.observe(latency);
    }

    /// One unauthenticated refusal over the audit quota.
    pub(crate) fn record_suppressed(&self) {
        self.suppressed.inc();
    }

    /// Certificates issued since start.
    pub fn issued(&self) -> u64 {
        self.issued.get()
    }

    /// Counts a Certify request as in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Sets the issuer and trust-anchor expiry from the snapshot in use.
    pub(crate) fn set_snapshot(&self, snapshot: &Snapshot) {
        self.issuer_not_after.store(unix_seconds(snapshot.issuer.window().not_after), Ordering::Relaxed);
        let anchors = snapshot.anchors_not_after().map(unix_seconds).unwrap_or(0);
        self.anchors_not_after.store(anchors, Ordering::Relaxed);
    }

    pub(crate) fn set_serving_not_after(&self, not_after: SystemTime) {
        self.serving_not_after.store(unix_seconds(not_after), Ordering::Relaxed);
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.get()
    }

    /// Everything registered, in the Prometheus text format.
    pub fn render(&self) -> String {
        encode(&self.registry.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Observer for Metrics {
    fn reloaded(&self, snapshot: &Snapshot) {
        self.reloads.inc();
        self.set_snapshot(snapshot);
    }

    fn reload_failed(&self, _error: &crate::ca::Error) {
        self.reload_failures.inc();
    }
}

/// A Certify request in flight; see [`Metrics::in_flight`].
#[must_use = "the request counts as in flight only while the guard lives"]
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn known(unix: &AtomicU64) -> Option<u64> {
    Some(unix.load(Ordering::Relaxed)).filter(|t| *t != 0)
}

/// `unix` − `now` in whole seconds, negative when `unix` has passed.
fn seconds_until(unix: u64, now: SystemTime) -> i64 {
    let now = i64::try_from(unix_seconds(now)).unwrap_or(i64::MAX);
    i64::try_from(unix).unwrap_or(i64::MAX).saturating_sub(now)
}

/// Registers `meshca_audit_records_written_total` and
/// `meshca_audit_write_failures_total`, read from `audit` at scrape time.
pub(crate) fn register_audit(registry: &mut Registry, audit: &AuditLog) {
    let log = audit.clone();
    registry.register(
        "meshca_audit_records_written",
        "Audit records written and synced (decisions and serving certificates)",
        ScrapeCounter::new(move || log.records_written()),
    );
    let log = audit.clone();
    registry.register(
        "meshca_audit_write_failures",
        "Audit appends that failed (the decision was refused or the certificate withheld)",
        ScrapeCounter::new(move || log.write_failures()),
    );
}

/// `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would leave a partial page.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// What `register` registers, in the Prometheus text format: for tests and for
/// pages built at each scrape (the agent's).
pub fn render(register: impl FnOnce(&mut Registry)) -> String {
    let mut registry = Registry::default();
    register(&mut registry);
    encode(&registry)
}

/// A gauge whose value is computed when scraped (a queue length, a cache size,
/// seconds left); absent from the page while the function says `None`.
pub(crate) struct ScrapeGauge(Box<dyn Fn() -> Option<i64> + Send + Sync>);

impl ScrapeGauge {
    pub(crate) fn new(value: impl Fn() -> i64 + Send + Sync + 'static) -> ScrapeGauge {
        ScrapeGauge(Box::new(move || Some(value())))
    }

    pub(crate) fn optional(value: impl Fn() -> Option<i64> + Send + Sync + 'static) -> ScrapeGauge {
        ScrapeGauge(Box::new(value))
    }
}

impl fmt::Debug for ScrapeGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ScrapeGauge").field(&(self.0)()).finish()
    }
}

impl EncodeMetric for ScrapeGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        match (self.0)() {
            Some(v) => encoder.encode_gauge(&v),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        (self.0)().is_none()
    }
}

/// A counter kept elsewhere (another module's atomic), read when scraped.
pub(crate) struct ScrapeCounter(Box<dyn Fn() -> u64 + Send + Sync>);

impl ScrapeCounter {
    pub(crate) fn new(value: impl Fn() -> u64 + Send + Sync + 'static) -> ScrapeCounter {
        ScrapeCounter(Box::new(value))
    }
}

impl fmt::Debug for ScrapeCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ScrapeCounter").field(&(self.0)()).finish()
    }
}

impl EncodeMetric for ScrapeCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, u64, u64>(&(self.0)(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A latency histogram recorded with atomics alone: one add to the bucket the
/// value falls in and one to the sum (`prometheus_client`'s own histogram takes a
/// write lock per observation). The count is the sum of the buckets, read at
/// scrape, so `_count` always equals the `+Inf` bucket. Clones share the counts.
#[derive(Clone, Debug)]
pub(crate) struct LatencyHistogram(Arc<HistogramCounts>);

#[derive(Debug)]
struct HistogramCounts {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds`, for `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// `bounds`: the buckets' upper bounds in seconds, ascending.
    pub(crate) fn new(bounds: &'static [f64]) -> LatencyHistogram {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram(Arc::new(HistogramCounts { bounds, buckets, sum_nanos: AtomicU64::new(0) }))
    }

    pub(crate) fn observe(&self, took: Duration) {
        let c = &self.0;
        let secs = took.as_secs_f64();
        let i = c.bounds.iter().position(|b| secs <= *b).unwrap_or(c.bounds.len());
        c.buckets[i].fetch_add(1, Ordering::Relaxed);
        c.sum_nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Observations so far.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let c = &self.0;
        let bounds = c.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> =
            bounds.zip(c.buckets.iter().map(|b| b.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = c.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            count,
            &buckets,
            None::<&HashMap<usize, Exemplar<_, f64>>>,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{FakeClock, SystemClock};

    fn metrics() -> (Metrics, FakeClock) {
        let clock = FakeClock::at(SystemClock.now());
        (Metrics::new(Arc::new(clock.clone())), clock)
    }

    #[test]
    fn render_counts_outcomes_latency_and_in_flight() {
        let (m, _) = metrics();
        let text = m.render();
        assert!(text.contains("\nmeshca_certify_total{outcome=\"issued\",reason=\"\"} 0\n"), "{text}");
        assert!(!text.contains("outcome=\"denied\""), "{text}");
        m.record_issued(Duration::from_micros(800));
        m.record_denied("token_expired", Duration::from_millis(3));
        m.record_denied("token_expired", Duration::from_millis(3));
        let guard = m.in_flight();
        let text = m.render();
        assert!(text.contains("# TYPE meshca_certify_total counter\n"), "{text}");
        assert!(text.contains("meshca_certify_total{outcome=\"issued\",reason=\"\"} 1\n"), "{text}");
        assert!(text.contains("meshca_certify_total{outcome=\"denied\",reason=\"token_expired\"} 2\n"));
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"0.0005\"} 0\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"0.0025\"} 1\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"0.005\"} 3\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_sum 0.0068\n"), "{text}");
        assert!(text.contains("meshca_certify_duration_seconds_count 3\n"), "{text}");
        assert!(text.contains("\nmeshca_certify_in_flight 1\n"), "{text}");
        drop(guard);
        assert!(m.render().contains("\nmeshca_certify_in_flight 0\n"));
        assert_eq!(m.issued(), 1);
    }

    #[test]
    fn a_slow_request_lands_in_the_inf_bucket_only() {
        let h = LatencyHistogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_secs(3));
        h.observe(Duration::from_secs(1));
        let text = render(|r| r.register("h_seconds", "h", h.clone()));
        assert!(text.contains("h_seconds_bucket{le=\"0.1\"} 0\nh_seconds_bucket{le=\"1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("h_seconds_count 2\n"), "{text}");
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn reloads_failures_and_expiries_are_rendered_with_seconds_left_at_the_clock() {
        use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
        let (m, clock) = metrics();
        let text = m.render();
        assert!(!text.contains("meshca_issuer_not_after_seconds"), "unknown yet: {text}");
        assert!(!text.contains("meshca_serving_certificate_expires_in_seconds"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let naming = crate::identity::Naming::new("cluster.local", "meshca-system").unwrap();
        let now = clock.now();
        let h = hierarchy::generate(&naming, CaKeyType::P256, now, HierarchyLifetimes::default()).unwrap();
        crate::dev::write_hierarchy(dir.path(), &h).unwrap();
        let snapshot =
            Snapshot::load(&dir.path().join("trust-anchors.pem"), &dir.path().join("issuer"), now).unwrap();
        m.reloaded(&snapshot);
        m.reload_failed(&crate::ca::Error::KeyMismatch);
        m.reload_failed(&crate::ca::Error::KeyMismatch);
        m.set_serving_not_after(now + Duration::from_secs(3600));
        clock.advance(Duration::from_secs(600));
        let text = m.render();
        assert!(text.contains("\nmeshca_reloads_total 1\n"), "{text}");
        assert!(text.contains("\nmeshca_reload_failures_total 2\n"), "{text}");
        let anchor = unix_seconds(snapshot.anchors_not_after().unwrap());
        assert!(anchor > unix_seconds(now) + 9 * 365 * 86_400, "the root lasts ten years");
        let gauge = format!("\nmeshca_trust_anchor_earliest_not_after_seconds {anchor}\n");
        assert!(text.contains(&gauge), "{text}");
        let issuer = unix_seconds(snapshot.issuer.window().not_after);
        assert!(text.contains(&format!("\nmeshca_issuer_not_after_seconds {issuer}\n")), "{text}");
        let left = issuer - unix_seconds(clock.now());
        assert!(text.contains(&format!("\nmeshca_issuer_expires_in_seconds {left}\n")), "{text}");
        assert!(text.contains("\nmeshca_serving_certificate_expires_in_seconds 3000\n"), "{text}");
        clock.advance(Duration::from_secs(3600));
        let text = m.render();
        assert!(text.contains("\nmeshca_serving_certificate_expires_in_seconds -600\n"), "{text}");
    }

    #[test]
    fn registered_parts_follow_the_servers_own_metrics() {
        let (m, _) = metrics();
        let reviews = Counter::<u64>::default();
        m.register(|r| {
            r.register("meshca_token_reviews", "Calls made to the token review backend", reviews.clone());
            r.register("meshca_token_cache_entries", "Entries", ScrapeGauge::new(|| 7));
        });
        reviews.inc();
        let text = m.render();
        assert!(text.contains("# HELP meshca_token_reviews_total Calls made to the token review backend.\n"));
        assert!(text.ends_with("meshca_token_reviews_total 1\n# HELP meshca_token_cache_entries Entries.\n# TYPE meshca_token_cache_entries gauge\nmeshca_token_cache_entries 7\n"), "{text}");
    }
}
