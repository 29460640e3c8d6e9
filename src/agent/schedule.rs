//! When to renew and how long to back off: pure functions of their arguments.
//!
//! Policy (all durations are measured on the monotonic clock from the moment a
//! certificate was received, so a wall clock that jumps or disagrees with the
//! server's by minutes changes nothing):
//! - the usable lifetime is `notAfter − notBefore − backdate`, the backdate being
//!   what the server subtracted for clock skew (the server's time at issuance minus
//!   notBefore, when known);
//! - renew after `renew_at × lifetime`, scaled by `1 ± jitter` so that a fleet
//!   issued together does not renew together;
//! - never later than `lifetime − margin` (time to retry before expiry), never
//!   sooner than `floor` (no tight loop, even for a certificate received already past
//!   its renewal point);
//! - after a failure, wait a full-jitter exponential backoff: uniformly random in
//!   `[0, min(cap, base × 2^attempt)]` (100 ms base, 60 s cap by default).
//!
//! Randomness is an argument (`u` in `[0, 1]`), so every rule is table-tested.

use std::time::Duration;

/// Renewal policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Fraction of the lifetime after which to renew (0 < renew_at < 1).
    pub renew_at: f64,
    /// Relative jitter (0 ≤ jitter < 1): the delay is scaled by a factor in `[1 − jitter, 1 + jitter]`.
    pub jitter: f64,
    /// The latest renewal leaves at least this much validity to retry in.
    pub margin: Duration,
    /// The earliest renewal is this long after receipt.
    pub floor: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { renew_at: 0.5, jitter: 0.1, margin: Duration::from_secs(120), floor: Duration::from_secs(1) }
    }
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `renew_at` is outside (0, 1).
    #[error("--renew-at must be between 0 and 1 (exclusive)")]
    RenewAt,
    /// `jitter` is outside [0, 1).
    #[error("--jitter must be at least 0 and less than 1")]
    Jitter,
}

impl Policy {
    /// Checks the fractions.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.renew_at > 0.0 && self.renew_at < 1.0) {
            return Err(Error::RenewAt);
        }
        if !(self.jitter >= 0.0 && self.jitter < 1.0) {
            return Err(Error::Jitter);
        }
        Ok(())
    }
}

/// Usable lifetime of a certificate valid for `validity` (notAfter − notBefore)
/// of which `backdate` lies before its issuance.
pub fn lifetime(validity: Duration, backdate: Duration) -> Duration {
    validity.saturating_sub(backdate)
}

/// Delay from receipt until renewal, for a certificate with `lifetime` left at
/// receipt, with `u` uniformly random in `[0, 1]`.
pub fn renewal_delay(lifetime: Duration, policy: &Policy, u: f64) -> Duration {
    let u = if u.is_finite() { u.clamp(0.0, 1.0) } else { 0.5 };
    let factor = 1.0 + policy.jitter * (2.0 * u - 1.0);
    let wanted = lifetime.mul_f64((policy.renew_at * factor).clamp(0.0, 1.0));
    // Leave `margin` to retry before expiry, but never more than half the lifetime:
    // a very short certificate still renews late enough to be useful.
    let margin = policy.margin.min(lifetime / 2);
    let latest = lifetime.saturating_sub(margin);
    wanted.min(latest).max(policy.floor)
}

/// Backoff before retry number `attempt` (0 for the first retry), with `u`
/// uniformly random in `[0, 1]`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, u: f64) -> Duration {
    let u = if u.is_finite() { u.clamp(0.0, 1.0) } else { 1.0 };
    let ceiling = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(cap);
    ceiling.mul_f64(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    /// Deterministic samples spread over [0, 1], ends included.
    fn samples() -> impl Iterator<Item = f64> {
        (0..=1000).map(|i| f64::from(i) / 1000.0)
    }

    #[test]
    fn renewal_falls_within_the_jitter_band_around_renew_at() {
        let p = Policy::default();
        for u in samples() {
            let d = renewal_delay(24 * H, &p, u);
            assert!(d >= (12 * H).mul_f64(0.9) && d <= (12 * H).mul_f64(1.1), "u={u} d={d:?}");
        }
        assert_eq!(renewal_delay(24 * H, &p, 0.5), 12 * H);
        assert_eq!(renewal_delay(24 * H, &Policy { jitter: 0.0, ..p }, 0.9), 12 * H);
    }

    #[test]
    fn renewal_is_never_later_than_lifetime_minus_margin_nor_sooner_than_the_floor() {
        let policies = [
            Policy::default(),
            Policy { renew_at: 0.95, jitter: 0.5, ..Policy::default() },
            Policy { renew_at: 0.01, jitter: 0.9, ..Policy::default() },
        ];
        let lifetimes = [0, 1, 2, 5, 30, 90, 240, 3600, 86_400, 365 * 86_400].map(Duration::from_secs);
        for p in &policies {
            for &l in &lifetimes {
                for u in samples() {
                    let d = renewal_delay(l, p, u);
                    assert!(d >= p.floor, "{p:?} {l:?} {u}");
                    if l > p.floor * 2 {
                        assert!(d <= l - p.margin.min(l / 2), "{p:?} {l:?} {u} {d:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_certificate_received_past_its_renewal_point_renews_at_the_floor_not_in_a_loop() {
        let p = Policy::default();
        assert_eq!(renewal_delay(Duration::ZERO, &p, 0.7), p.floor);
        assert_eq!(renewal_delay(Duration::from_millis(500), &p, 0.7), p.floor);
    }

    #[test]
    fn short_lifetimes_renew_late_enough_to_be_useful() {
        // A 90 s certificate with a 2 min margin would otherwise renew at once.
        let d = renewal_delay(
            Duration::from_secs(90),
            &Policy { renew_at: 0.9, jitter: 0.0, ..Policy::default() },
            0.5,
        );
        assert_eq!(d, Duration::from_secs(45));
    }

    #[test]
    fn lifetime_subtracts_the_server_backdate() {
        assert_eq!(lifetime(24 * H + Duration::from_secs(120), Duration::from_secs(120)), 24 * H);
        assert_eq!(lifetime(Duration::from_secs(10), Duration::from_secs(20)), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_up_to_the_cap() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(60));
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(backoff(u32::MAX, base, cap, 1.0), cap);
        assert_eq!(backoff(5, base, cap, 0.0), Duration::ZERO);
        for attempt in 0..64 {
            for u in samples() {
                assert!(backoff(attempt, base, cap, u) <= cap);
            }
        }
    }

    #[test]
    fn non_finite_randomness_is_tamed() {
        let p = Policy::default();
        assert_eq!(renewal_delay(24 * H, &p, f64::NAN), 12 * H);
        assert!(
            backoff(2, Duration::from_millis(100), Duration::from_secs(60), f64::INFINITY)
                <= Duration::from_secs(60)
        );
    }

    #[test]
    fn policies_outside_their_ranges_are_refused() {
        assert_eq!(Policy { renew_at: 1.0, ..Policy::default() }.validate(), Err(Error::RenewAt));
        assert_eq!(Policy { renew_at: f64::NAN, ..Policy::default() }.validate(), Err(Error::RenewAt));
        assert_eq!(Policy { jitter: 1.0, ..Policy::default() }.validate(), Err(Error::Jitter));
        assert_eq!(Policy::default().validate(), Ok(()));
        // Each range's ends: renew_at excludes 0, jitter includes it.
        assert_eq!(Policy { renew_at: 0.0, ..Policy::default() }.validate(), Err(Error::RenewAt));
        assert_eq!(Policy { renew_at: f64::MIN_POSITIVE, ..Policy::default() }.validate(), Ok(()));
        assert_eq!(Policy { renew_at: 0.999, ..Policy::default() }.validate(), Ok(()));
        assert_eq!(Policy { jitter: 0.0, ..Policy::default() }.validate(), Ok(()));
        assert_eq!(Policy { jitter: -f64::MIN_POSITIVE, ..Policy::default() }.validate(), Err(Error::Jitter));
        assert_eq!(Policy { jitter: 0.999, ..Policy::default() }.validate(), Ok(()));
    }
}
