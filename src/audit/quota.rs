//! How fast refusals of unauthenticated requests are recorded one by one, so that
//! anonymous traffic cannot grow the audit log (and fill its disk) without bound.
//!
//! Every decision on a request whose caller proved who it is gets its own record,
//! always. A refusal of a request whose caller did not (no subject: a bad or missing
//! token, a malformed request, an overload) is recorded one by one while its peer
//! address stays within [`PER_PEER_RATE`] records a second (bursts of
//! [`PER_PEER_BURST`]) and all peers together within [`TOTAL_RATE`] (bursts of
//! [`TOTAL_BURST`]); beyond that it is counted instead, and every [`FLUSH`] one
//! `suppressed` record per peer says how many were, since when, and the last reason.
//! Peers are tracked up to [`MAX_PEERS`]; beyond that the rest share one entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Unauthenticated refusals recorded one by one per second, per peer address.
pub const PER_PEER_RATE: f64 = 10.0;
/// ... and at once after a quiet period.
pub const PER_PEER_BURST: f64 = 200.0;
/// Unauthenticated refusals recorded one by one per second, all peers together.
pub const TOTAL_RATE: f64 = 200.0;
/// ... and at once after a quiet period.
pub const TOTAL_BURST: f64 = 2_000.0;
/// How often the counts of refusals not recorded one by one are written.
pub const FLUSH: Duration = Duration::from_secs(10);
/// Peer addresses tracked; beyond them, the rest share one entry (`None`).
pub const MAX_PEERS: usize = 1_000;

/// The rates and bursts a [`Quota`] holds refusals to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub per_peer_rate: f64,
    pub per_peer_burst: f64,
    pub total_rate: f64,
    pub total_burst: f64,
}

impl Default for Limits {
    /// [`PER_PEER_RATE`], [`PER_PEER_BURST`], [`TOTAL_RATE`], [`TOTAL_BURST`].
    fn default() -> Limits {
        Limits {
            per_peer_rate: PER_PEER_RATE,
            per_peer_burst: PER_PEER_BURST,
            total_rate: TOTAL_RATE,
            total_burst: TOTAL_BURST,
        }
    }
}

impl Limits {
    /// Every refusal recorded one by one (the fuzz harness checks one record per
    /// decision, whatever the rate).
    pub const UNLIMITED: Limits = Limits {
        per_peer_rate: f64::INFINITY,
        per_peer_burst: f64::INFINITY,
        total_rate: f64::INFINITY,
        total_burst: f64::INFINITY,
    };
}

/// A token bucket, refilled by the clock's time.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

impl Bucket {
    fn full(burst: f64, now: SystemTime) -> Bucket {
        Bucket { tokens: burst, at: now }
    }

    /// Refills for the time since the last take (none for a clock that went back).
    fn refill(&mut self, rate: f64, burst: f64, now: SystemTime) {
        let elapsed = now.duration_since(self.at).unwrap_or_default().as_secs_f64();
        // (An infinite bucket stays infinite: no 0 × ∞.)
        if self.tokens < burst {
            self.tokens = (self.tokens + elapsed * rate).min(burst);
        }
        self.at = self.at.max(now);
    }
}

/// Refusals of one peer not recorded one by one since the last flush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppressed {
    /// `None`: the peers beyond [`MAX_PEERS`], together.
    pub peer: Option<IpAddr>,
    pub count: u64,
    /// The first of them.
    pub since: SystemTime,
    /// The last one's gRPC status name and reason code.
    pub code: String,
    pub reason: &'static str,
}

#[derive(Debug)]
struct Peer {
    bucket: Bucket,
    pending: Option<Suppressed>,
}

#[derive(Debug)]
struct State {
    total: Bucket,
    peers: HashMap<Option<IpAddr>, Peer>,
}

/// The quota (`Issuance` asks it before recording an unauthenticated refusal).
#[derive(Debug)]
pub struct Quota {
    limits: Limits,
    state: Mutex<State>,
}

impl Quota {
    /// The default [`Limits`].
    pub fn new(now: SystemTime) -> Quota {
        Quota::with_limits(Limits::default(), now)
    }

    pub fn with_limits(limits: Limits, now: SystemTime) -> Quota {
        let state = State { total: Bucket::full(limits.total_burst, now), peers: HashMap::new() };
        Quota { limits, state: Mutex::new(state) }
    }

    /// Whether this unauthenticated refusal from `peer` is recorded one by one
    /// (`true`), or counted for the next flush (`false`).
    pub fn record(&self, peer: Option<IpAddr>, now: SystemTime, code: &str, reason: &'static str) -> bool {
        let l = self.limits;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        // Peers beyond the bound share one entry; idle full ones are forgotten first.
        let mut key = peer;
        if !state.peers.contains_key(&key) && state.peers.len() >= MAX_PEERS {
            state.peers.retain(|_, p| {
                p.bucket.refill(l.per_peer_rate, l.per_peer_burst, now);
                p.pending.is_some() || p.bucket.tokens < l.per_peer_burst
            });
            if state.peers.len() >= MAX_PEERS {
                key = None;
            }
        }
        let entry = state
            .peers
            .entry(key)
            .or_insert_with(|| Peer { bucket: Bucket::full(l.per_peer_burst, now), pending: None });
        entry.bucket.refill(l.per_peer_rate, l.per_peer_burst, now);
        state.total.refill(l.total_rate, l.total_burst, now);
        if entry.bucket.tokens >= 1.0 && state.total.tokens >= 1.0 {
            entry.bucket.tokens -= 1.0;
            state.total.tokens -= 1.0;
            return true;
        }
        let pending = entry.pending.get_or_insert(Suppressed {
            peer: key,
            count: 0,
            since: now,
            code: String::new(),
            reason,
        });
        pending.count += 1;
        pending.code = code.to_owned();
        pending.reason = reason;
        false
    }

    /// The counts to write now: every peer's pending count, taken.
    pub fn flush(&self) -> Vec<Suppressed> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.peers.values_mut().filter_map(|p| p.pending.take()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_000.0 + secs)
    }

    #[test]
    fn a_peer_is_recorded_one_by_one_up_to_its_burst_then_at_its_rate_and_the_rest_is_counted() {
        let q = Quota::new(at(0.0));
        let peer = Some("10.0.0.1".parse().unwrap());
        let recorded =
            (0..1_000).filter(|_| q.record(peer, at(0.0), "Unauthenticated", "bad_signature")).count();
        assert_eq!(recorded, PER_PEER_BURST as usize);
        let flushed = q.flush();
        assert_eq!(flushed.len(), 1);
        assert_eq!((flushed[0].count, flushed[0].since, flushed[0].reason), (800, at(0.0), "bad_signature"));
        assert!(q.flush().is_empty(), "taken");
        // One second later: the rate's worth again.
        let recorded =
            (0..100).filter(|_| q.record(peer, at(1.0), "Unauthenticated", "bad_signature")).count();
        assert_eq!(recorded, PER_PEER_RATE as usize);
        // Another peer has its own burst.
        assert!(q.record(Some("10.0.0.2".parse().unwrap()), at(1.0), "InvalidArgument", "csr_malformed"));
    }

    #[test]
    fn all_peers_together_are_held_to_the_total() {
        let q = Quota::new(at(0.0));
        let mut recorded = 0;
        for i in 0..100u32 {
            let peer = Some(IpAddr::from([10, 0, (i >> 8) as u8, i as u8]));
            recorded += (0..100).filter(|_| q.record(peer, at(0.0), "Unauthenticated", "x")).count();
        }
        assert_eq!(recorded, TOTAL_BURST as usize);
        assert_eq!(q.flush().iter().map(|s| s.count).sum::<u64>(), 10_000 - TOTAL_BURST as u64);
    }

    #[test]
    fn peers_beyond_the_bound_share_one_entry_and_idle_ones_are_forgotten_first() {
        let q = Quota::new(at(0.0));
        let peer = |i: u32| Some(IpAddr::from(i.to_be_bytes()));
        // Every tracked peer over its burst (pending counts keep it tracked).
        for i in 0..MAX_PEERS as u32 {
            for _ in 0..=PER_PEER_BURST as usize {
                q.record(peer(i), at(0.0), "Unauthenticated", "x");
            }
        }
        q.state.lock().unwrap().total = Bucket::full(f64::MAX, at(0.0));
        let newcomer = peer(u32::MAX);
        for _ in 0..=PER_PEER_BURST as usize {
            q.record(newcomer, at(0.0), "Unauthenticated", "y");
        }
        let flushed = q.flush();
        assert_eq!(flushed.len(), MAX_PEERS + 1);
        let shared = flushed.iter().find(|s| s.peer.is_none()).expect("the shared entry");
        assert_eq!((shared.count, shared.reason), (1, "y"));
        // Flushed and refilled, the tracked peers are idle: a newcomer gets its own entry.
        assert!(q.record(newcomer, at(3_600.0), "Unauthenticated", "y"));
        assert!(q.state.lock().unwrap().peers.contains_key(&newcomer));
    }

    #[test]
    fn unlimited_records_everything() {
        let q = Quota::with_limits(Limits::UNLIMITED, at(0.0));
        assert!((0..10_000).all(|_| q.record(None, at(0.0), "Unauthenticated", "x")));
        assert!(q.flush().is_empty());
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let q = Quota::new(at(10.0));
        let peer = Some("10.0.0.1".parse().unwrap());
        for _ in 0..PER_PEER_BURST as usize {
            assert!(q.record(peer, at(10.0), "Unauthenticated", "x"));
        }
        assert!(!q.record(peer, at(0.0), "Unauthenticated", "x"));
    }
}
