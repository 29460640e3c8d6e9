//! What the agent knows about its certificate, for its admin endpoints.
//!
//! Updated by the agent loop after every round; read by `/ready` and `/metrics`
//! (see `agent::admin`). Lock-free: a handful of atomics.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::clock::unix_seconds;

/// The agent's state, shared between its loop and its admin listener.
#[derive(Debug, Default)]
pub struct Status {
    renewals: AtomicU64,
    failures: AtomicU64,
    /// Unix seconds; 0 until the first certificate.
    not_after: AtomicU64,
    offset_millis: AtomicI64,
    offset_known: AtomicBool,
}

impl Status {
    /// A certificate valid until `not_after` was written; the server's clock was
    /// `offset_millis` ahead of ours (when it said).
    pub fn renewed(&self, not_after: SystemTime, offset_millis: Option<i64>) {
        self.not_after.store(unix_seconds(not_after), Ordering::Release);
        if let Some(o) = offset_millis {
            self.offset_millis.store(o, Ordering::Relaxed);
            self.offset_known.store(true, Ordering::Relaxed);
        }
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// A round failed.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Our clock corrected by the last known offset: the server's time, estimated.
    fn server_now(&self, now: SystemTime) -> SystemTime {
        let offset = self.offset_millis.load(Ordering::Relaxed);
        let by = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            now.checked_add(by).unwrap_or(now)
        } else {
            now.checked_sub(by).unwrap_or(now)
        }
    }

    /// Seconds the certificate on disk has left at the server's time (negative once
    /// expired); `None` before the first certificate.
    pub(crate) fn seconds_left(&self, now: SystemTime) -> Option<i64> {
        let not_after = self.not_after.load(Ordering::Acquire);
        if not_after == 0 {
            return None;
        }
        let now = i64::try_from(unix_seconds(self.server_now(now))).unwrap_or(i64::MAX);
        Some(i64::try_from(not_after).unwrap_or(i64::MAX).saturating_sub(now))
    }

    /// Ready once a certificate valid at the server's time is on disk.
    pub(crate) fn is_ready(&self, now: SystemTime) -> bool {
        self.seconds_left(now).is_some_and(|s| s > 0)
    }

    /// Prometheus text exposition, with the values at `now`.
    pub fn render(&self, now: SystemTime) -> String {
        crate::metrics::render(|r| {
            let counters = [
                ("meshca_agent_renewals", "Certificates obtained and written", &self.renewals),
                ("meshca_agent_failures", "Rounds that failed (the files on disk were kept)", &self.failures),
            ];
            for (name, help, value) in counters {
                r.register(name, help, ConstCounter::new(value.load(Ordering::Relaxed)));
            }
            let gauges = [
                (
                    "meshca_agent_certificate_not_after_seconds",
                    "Unix time the certificate on disk expires (0: none yet)",
                    i64::try_from(self.not_after.load(Ordering::Acquire)).unwrap_or(i64::MAX),
                ),
                (
                    "meshca_agent_certificate_seconds_left",
                    "Seconds until the certificate on disk expires, at the server's time",
                    self.seconds_left(now).unwrap_or(0),
                ),
                (
                    "meshca_agent_ready",
                    "1 when a valid certificate is on disk",
                    i64::from(self.is_ready(now)),
                ),
            ];
            for (name, help, value) in gauges {
                r.register(name, help, ConstGauge::new(value));
            }
            r.register(
                "meshca_agent_clock_offset_seconds",
                "meshca's clock minus this host's, from the last response",
                ConstGauge::new(self.offset_millis.load(Ordering::Relaxed) as f64 / 1000.0),
            );
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_certificate_at_the_servers_time() {
        let s = Status::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!s.is_ready(now), "no certificate yet");
        // Valid for 100 s more by the server's clock, which is 150 s ahead of ours.
        s.renewed(now + Duration::from_secs(250), Some(150_000));
        assert_eq!(s.seconds_left(now), Some(100));
        assert!(s.is_ready(now));
        assert!(!s.is_ready(now + Duration::from_secs(100)));
        s.failed();
        let text = s.render(now);
        assert!(text.contains("meshca_agent_renewals_total 1"), "{text}");
        assert!(text.contains("meshca_agent_failures_total 1"));
        assert!(text.contains("meshca_agent_clock_offset_seconds 150"));
        assert!(text.contains("meshca_agent_ready 1"));
    }
}
