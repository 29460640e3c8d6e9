//! Admission control: how much Certify work runs at once, how much may wait, and
//! who is turned away, so a herd of proxies degrades into short waits and retry
//! hints instead of latency that grows without bound.
//!
//! A request meets three gates, in order:
//! 1. **In flight** (`--max-in-flight`): beyond it a request is refused at once,
//!    before any work, with `ResourceExhausted` and a retry hint sized to the
//!    work already admitted ([`Admission::overloaded`]).
//! 2. **Rate limits**: token buckets per peer address (`--rate-limit-per-peer`,
//!    off by default: pods behind one node address would share it) and per
//!    authenticated identity (`--rate-limit-per-identity`). A request costs the
//!    [`cost`] of its CSR's key type, in P-256 requests: a P-384 signature check
//!    costs several P-256 ones. A limited request is refused with
//!    `ResourceExhausted` and the time until its bucket holds enough.
//! 3. **Workers**: the CPU-bound part (CSR signature check and signing) runs on
//!    one of `--signing-workers` threads (default: the cores; [`workers`]),
//!    first come, first served; admitted requests wait here. That wait is the
//!    queue whose depth `/metrics` reports.
//!
//! Buckets refill in monotonic time (`tokio::time::Instant`, so tests can pause
//! it); the wall clock the rest of the request uses may jump without effect here.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::ca::csr::KeyType;
use crate::metrics::{Registry, ScrapeCounter, ScrapeGauge};
pub mod descriptors;
pub mod memory;
pub(crate) mod workers;

use workers::Workers;

/// Buckets kept per limiter before idle (full) ones are swept.
const MAX_BUCKETS: usize = 100_000;
/// Bounds of the retry hint given to an overloaded caller.
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// A token-bucket rate: `per_second` cost units refill, up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Admission settings; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub max_in_flight: usize,
    pub workers: usize,
    pub per_peer: Option<Rate>,
    pub per_identity: Option<Rate>,
}

/// Default per-identity limit: 100 P-256 requests a second after a burst of
/// 1,000, so one deployment's whole rollout passes and a looping client cannot
/// take the cores from everyone else.
pub(crate) const DEFAULT_PER_IDENTITY: Rate = Rate { per_second: 100.0, burst: 1000.0 };

impl Settings {
    /// `max_in_flight` requests, one worker per core, the default per-identity
    /// limit and no per-peer limit.
    pub fn new(max_in_flight: usize) -> Settings {
        Settings { max_in_flight, workers: cores(), per_peer: None, per_identity: Some(DEFAULT_PER_IDENTITY) }
    }
}

/// The machine's cores (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// What a request with this CSR key type costs, in P-256 requests (CPU of the
/// whole request). Only the CSR signature check depends on the key type;
/// `meshca-load --crypto-bound` measures it with ring on one core: P-384 ≈ 13×
/// a P-256 check, RSA-2048 ≈ 0.4×, RSA-3072 ≈ 0.9×, RSA-4096 about twice
/// RSA-3072. A P-256 check is about a quarter of a P-256 request's CPU (token
/// verification, signing, TLS and HTTP/2 are the rest), hence P-384 ≈ 4 + 1.
pub fn cost(key_type: Option<KeyType>) -> f64 {
    match key_type {
        None | Some(KeyType::P256) => 1.0,
        Some(KeyType::P384) => 5.0,
        Some(KeyType::Rsa { bits }) if bits <= 3072 => 1.0,
        Some(KeyType::Rsa { .. }) => 2.0,
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    Peer,
    Identity,
}

impl Scope {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::Peer => "peer",
            Scope::Identity => "identity",
        }
    }
}

/// The gates, shared by every request.
#[derive(Debug)]
pub struct Admission {
    settings: Settings,
    in_flight: Semaphore,
    workers: Workers,
    per_peer: Option<Limiter<IpAddr>>,
    per_identity: Option<Limiter<String>>,
    /// The most requests ever in flight at once.
    max_in_flight: AtomicUsize,
    /// Moving average of one worker job, nanoseconds (retry hints).
    service_ns: Arc<AtomicU64>,
    limited_peer: AtomicU64,
    limited_identity: AtomicU64,
    overloaded: AtomicU64,
}

/// A request's place among those in flight; dropping it frees the place.
pub struct InFlight<'a>(#[allow(dead_code)] SemaphorePermit<'a>);

/// Folds one job's duration into the moving average (EWMA, weight 1/16; races
/// between workers only blur it).
fn record_service(average: &AtomicU64, took: Duration) {
    let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    let old = average.load(Ordering::Relaxed);
    let new = if old == 0 { took } else { old - old / 16 + took / 16 };
    average.store(new, Ordering::Relaxed);
}

/// Registers the admission metrics of `admission`, read at scrape time.
pub(crate) fn register_metrics(registry: &mut Registry, admission: &Arc<Admission>) {
    let a = admission.clone();
    registry.register(
        "meshca_admission_queue",
        "Certify requests waiting for a signing worker now",
        ScrapeGauge::new(move || i64::try_from(a.queue_depth()).unwrap_or(i64::MAX)),
    );
    let a = admission.clone();
    registry.register(
        "meshca_admission_queue_max",
        "The most Certify requests ever waiting for a signing worker at once",
        ScrapeGauge::new(move || i64::try_from(a.max_queue_depth()).unwrap_or(i64::MAX)),
    );
    let a = admission.clone();
    registry.register(
        "meshca_admission_in_flight_max",
        "The most Certify requests ever in flight at once (admitted, not yet answered)",
        ScrapeGauge::new(move || i64::try_from(a.max_in_flight()).unwrap_or(i64::MAX)),
    );
    let limit = i64::try_from(admission.settings.max_in_flight).unwrap_or(i64::MAX);
    registry.register(
        "meshca_admission_in_flight_limit",
        "Certify requests admitted at once at most (--max-in-flight, or sized to the memory limit)",
        ScrapeGauge::new(move || limit),
    );
    let workers = i64::try_from(admission.settings.workers).unwrap_or(i64::MAX);
    registry.register(
        "meshca_admission_workers",
        "Signing workers (--signing-workers)",
        ScrapeGauge::new(move || workers),
    );
    /// Which of [`Admission::refusals`] a counter reads.
    type Read = fn(&Admission) -> u64;
    let refusals: [(&str, &str, Read); 3] = [
        (
            "meshca_admission_overloaded",
            "Certify requests refused because --max-in-flight were in flight",
            |a| a.refusals().0,
        ),
        ("meshca_admission_rate_limited_peer", "Certify requests refused by the per-peer rate limit", |a| {
            a.refusals().1
        }),
        (
            "meshca_admission_rate_limited_identity",
            "Certify requests refused by the per-identity rate limit",
            |a| a.refusals().2,
        ),
    ];
    for (name, help, read) in refusals {
        let a = admission.clone();
        registry.register(name, help, ScrapeCounter::new(move || read(&a)));
    }
}

impl Admission {
    /// The gates, with the signing worker threads started.
    pub fn new(settings: Settings) -> std::io::Result<Admission> {
        let service_ns = Arc::new(AtomicU64::new(0));
        let average = service_ns.clone();
        let workers = Workers::start(settings.workers, move |took| record_service(&average, took))?;
        Ok(Admission {
            in_flight: Semaphore::new(settings.max_in_flight),
            workers,
            per_peer: settings.per_peer.map(Limiter::new),
            per_identity: settings.per_identity.map(Limiter::new),
            settings,
            max_in_flight: AtomicUsize::new(0),
            service_ns,
            limited_peer: AtomicU64::new(0),
            limited_identity: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Gate 1: a place in flight, or `Err(retry hint)` when all are taken.
    pub(crate) fn enter(&self) -> Result<InFlight<'_>, Duration> {
        match self.in_flight.try_acquire() {
            Ok(permit) => {
                self.max_in_flight.fetch_max(self.in_flight(), Ordering::Relaxed);
                Ok(InFlight(permit))
            }
            Err(_) => {
                self.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(self.overloaded_hint())
            }
        }
    }

    /// How long an overloaded caller should wait: the admitted work divided among
    /// the workers, at the recent pace, within [`MIN_RETRY`, `MAX_RETRY`].
    fn overloaded_hint(&self) -> Duration {
        let per = Duration::from_nanos(self.service_ns.load(Ordering::Relaxed));
        let queued = self.settings.max_in_flight as u32 / self.settings.workers.max(1) as u32;
        per.saturating_mul(queued.max(1)).clamp(MIN_RETRY, MAX_RETRY)
    }

    /// Gate 2, per peer address: `Err(wait)` when the peer's bucket lacks `cost`.
    pub(crate) fn check_peer(&self, peer: Option<IpAddr>, cost: f64, now: Instant) -> Result<(), Duration> {
        match (&self.per_peer, peer) {
            (Some(limiter), Some(ip)) => limiter.take(ip, cost, now).inspect_err(|_| {
                self.limited_peer.fetch_add(1, Ordering::Relaxed);
            }),
            _ => Ok(()),
        }
    }

    /// Gate 2, per identity: `Err(wait)` when the identity's bucket lacks `cost`.
    pub(crate) fn check_identity(&self, identity: &str, cost: f64, now: Instant) -> Result<(), Duration> {
        match &self.per_identity {
            Some(limiter) => limiter.take_with(identity, cost, now).inspect_err(|_| {
                self.limited_identity.fetch_add(1, Ordering::Relaxed);
            }),
            None => Ok(()),
        }
    }

    /// Gate 3: runs `job` on a signing worker, first come first served.
    pub async fn run<T, F>(&self, job: F) -> Result<T, workers::Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.workers.run(job).await
    }

    /// Requests waiting for a worker now.
    pub(crate) fn queue_depth(&self) -> usize {
        self.workers.waiting()
    }

    /// The most requests ever waiting for a worker at once.
    pub(crate) fn max_queue_depth(&self) -> usize {
        self.workers.max_waiting()
    }

    /// The most requests ever in flight at once: the deepest the herd queued.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.settings.max_in_flight - self.in_flight.available_permits()
    }

    /// Refusals so far: (over capacity, per-peer limit, per-identity limit).
    pub fn refusals(&self) -> (u64, u64, u64) {
        (
            self.overloaded.load(Ordering::Relaxed),
            self.limited_peer.load(Ordering::Relaxed),
            self.limited_identity.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key, bounded in number.
#[derive(Debug)]
struct Limiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq> Limiter<K> {
    fn new(rate: Rate) -> Limiter<K> {
        Limiter { rate, buckets: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, key: K, cost: f64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        self.sweep(&mut buckets, now);
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: self.rate.burst, last: now });
        self.spend(bucket, cost, now)
    }

    /// Refills `bucket` to `now` and spends `cost`, or says how long until it could.
    fn spend(&self, bucket: &mut Bucket, cost: f64, now: Instant) -> Result<(), Duration> {
        let Rate { per_second, burst } = self.rate;
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.last = now;
        // A request dearer than the whole burst may still pass on a full bucket.
        let cost = cost.min(burst);
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            return Ok(());
        }
        let wait = (cost - bucket.tokens) / per_second.max(f64::MIN_POSITIVE);
        Err(Duration::try_from_secs_f64(wait).unwrap_or(MAX_RETRY).clamp(MIN_RETRY, MAX_RETRY))
    }

    /// Over [`MAX_BUCKETS`], forgets the buckets that have refilled (they would be
    /// created full again); if none has, forgets them all rather than grow.
    fn sweep(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        if buckets.len() < MAX_BUCKETS {
            return;
        }
        let Rate { per_second, burst } = self.rate;
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_second < burst
        });
        if buckets.len() >= MAX_BUCKETS {
            buckets.clear();
        }
    }
}

impl Limiter<String> {
    /// [`Limiter::take`] without allocating a key for a known identity.
    fn take_with(&self, key: &str, cost: f64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        if let Some(bucket) = buckets.get_mut(key) {
            return self.spend(bucket, cost, now);
        }
        self.sweep(&mut buckets, now);
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.rate.burst, last: now });
        self.spend(bucket, cost, now)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn admission(max_in_flight: usize, per_identity: Option<Rate>, per_peer: Option<Rate>) -> Admission {
        Admission::new(Settings { max_in_flight, workers: 1, per_peer, per_identity }).unwrap()
    }

    #[test]
    fn beyond_max_in_flight_requests_are_refused_with_a_bounded_hint_until_one_leaves() {
        let a = admission(2, None, None);
        let first = a.enter().unwrap();
        let _second = a.enter().unwrap();
        let hint = a.enter().err().unwrap();
        assert!((MIN_RETRY..=MAX_RETRY).contains(&hint), "{hint:?}");
        assert_eq!(a.in_flight(), 2);
        assert_eq!(a.max_in_flight(), 2);
        drop(first);
        assert!(a.enter().is_ok());
        assert_eq!(a.refusals(), (1, 0, 0));
    }

    #[test]
    fn an_identity_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let a = admission(10, Some(Rate { per_second: 10.0, burst: 3.0 }), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            a.check_identity("web", 1.0, t0).unwrap();
        }
        let wait = a.check_identity("web", 1.0, t0).unwrap_err();
        assert!(wait >= Duration::from_millis(50) && wait <= Duration::from_millis(150), "{wait:?}");
        a.check_identity("api", 1.0, t0).unwrap();
        // 100 ms later one unit has refilled.
        a.check_identity("web", 1.0, t0 + Duration::from_millis(100)).unwrap();
        assert!(a.check_identity("web", 1.0, t0 + Duration::from_millis(100)).is_err());
        assert_eq!(a.refusals().2, 2);
    }

    #[test]
    fn dearer_key_types_drain_the_bucket_faster() {
        let a = admission(10, Some(Rate { per_second: 1.0, burst: 10.0 }), None);
        let t0 = Instant::now();
        let p384 = cost(Some(KeyType::P384));
        assert!(p384 > cost(Some(KeyType::P256)));
        a.check_identity("web", p384, t0).unwrap();
        a.check_identity("web", 2.0, t0).unwrap();
        assert!(a.check_identity("web", p384, t0).is_err());
        assert!(cost(Some(KeyType::Rsa { bits: 4096 })) > cost(Some(KeyType::Rsa { bits: 2048 })));
    }

    #[test]
    fn per_peer_limits_are_off_unless_configured_and_key_on_the_address() {
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let off = admission(10, None, None);
        for _ in 0..100 {
            off.check_peer(Some(ip), 1.0, t0).unwrap();
        }
        let on = admission(10, None, Some(Rate { per_second: 1.0, burst: 2.0 }));
        on.check_peer(Some(ip), 1.0, t0).unwrap();
        on.check_peer(Some(ip), 1.0, t0).unwrap();
        assert!(on.check_peer(Some(ip), 1.0, t0).is_err());
        on.check_peer(Some("10.0.0.2".parse().unwrap()), 1.0, t0).unwrap();
        assert_eq!(on.refusals().1, 1);
    }

    #[test]
    fn the_bucket_map_stays_bounded() {
        let a = admission(10, Some(Rate { per_second: 1000.0, burst: 1.0 }), None);
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS + 10) {
            a.check_identity(&format!("id-{i}"), 1.0, t0).unwrap();
        }
        let len = a.per_identity.as_ref().unwrap().lock().len();
        assert!(len <= MAX_BUCKETS, "{len}");
    }

    // Multi-thread: the test thread blocks on std channels while tasks run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_the_signing_workers_and_their_queue_is_reported() {
        let a = std::sync::Arc::new(admission(10, None, None));
        // Hold the only worker, so the next job waits in the queue.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let holder = tokio::spawn({
            let a = a.clone();
            async move {
                a.run(move || {
                    started_tx.send(()).unwrap();
                    held.recv().unwrap();
                })
                .await
            }
        });
        started.recv().unwrap();
        let queued = tokio::spawn({
            let a = a.clone();
            async move { a.run(|| std::thread::current().name().map(str::to_owned)).await }
        });
        workers::yield_until("the job is queued", || a.queue_depth() > 0).await;
        assert_eq!((a.queue_depth(), a.max_queue_depth()), (1, 1));
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let name = queued.await.unwrap().unwrap().unwrap();
        assert!(name.starts_with("meshca-sign-"), "{name}");
        assert_eq!(a.queue_depth(), 0);
    }
}
