//! [`CachingAuthenticator`]: remembers another authenticator's answers so that a
//! remote one (TokenReview) is asked once per token, not once per request, and
//! bounds how often it is asked at all.
//!
//! Policy, per token (keyed by the SHA-256 of the trimmed token; tokens themselves
//! are never stored):
//! - a success is kept until the earlier of the token's own `exp` (read from the
//!   JWT payload without verification: the inner authenticator verified it; a
//!   payload without a readable `exp` gets the TTL alone) and `now` + TTL;
//! - a refusal is kept for the failure TTL; [`Error::Unavailable`] is never kept;
//! - concurrent requests for a token with no answer yet share one inner call, run
//!   as a task of its own so that a caller giving up does not abandon the others;
//! - inner calls draw from a token bucket (QPS, burst, on the monotonic clock): a
//!   call that would wait longer than the review timeout for its turn fails at
//!   once with `Unavailable` and a retry hint;
//! - at most `max_entries` entries: when full, expired entries are swept (at most
//!   once a second of `now`), and if it is still full the new answer is simply not
//!   kept (nothing valid is evicted to make room).
//!
//! Expiry is judged by the injected `now`. An entry that would outlive its TTL
//! measured from `now` (the wall clock stepped back) is treated as expired.
//! Oversized and empty tokens are refused here, without an entry or inner call.

use super::{AuthFuture, Authenticator, Error, Subject};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{Counter, LatencyHistogram, Registry, ScrapeGauge};

/// Default bound on cached entries.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Upper bounds of the inner-call latency histogram, in seconds.
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Longest an acceptance of a pod-bound token is remembered: the staleness bound of
/// `--jwks-confirm-pod`'s pod lookups (`auth::pods`), whatever `--token-cache-ttl` says.
pub(crate) const POD_BOUND_TTL: Duration = super::pods::DEFAULT_TTL;

/// How long answers are kept and how often the inner authenticator may be asked.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Longest a success is kept.
    pub ttl: Duration,
    /// How long a refusal is kept.
    pub failure_ttl: Duration,
    /// Inner calls per second, sustained.
    pub qps: u32,
    /// Inner calls allowed at once after a quiet period.
    pub burst: u32,
    /// Longest a call waits for its turn before failing with `Unavailable`.
    pub max_wait: Duration,
    /// Bound on cached entries.
    pub max_entries: usize,
}

type Outcome = Result<Subject, Error>;
type Key = [u8; 32];

enum Slot {
    /// An answer, kept until `until`; `ttl` is the longest it may be kept from any `now`.
    Done { outcome: Outcome, until: SystemTime, ttl: Duration },
    /// An inner call is running; its outcome arrives here.
    Pending(watch::Receiver<Option<Outcome>>),
}

struct Entries {
    map: HashMap<Key, Slot>,
    next_sweep: SystemTime,
}

/// Token bucket on the monotonic clock.
struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Counters {
    reviews: Counter,
    errors: Counter,
    throttled: Counter,
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
    duration: LatencyHistogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            reviews: Counter::default(),
            errors: Counter::default(),
            throttled: Counter::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            coalesced: Counter::default(),
            duration: LatencyHistogram::new(BUCKETS),
        }
    }
}

/// State shared with the tasks that run inner calls.
struct Shared {
    inner: Arc<dyn Authenticator>,
    settings: Settings,
    entries: Mutex<Entries>,
    bucket: Mutex<Bucket>,
    counters: Counters,
}

/// Wraps an authenticator with the cache, coalescing and rate limit above.
pub(crate) struct CachingAuthenticator {
    shared: Arc<Shared>,
}

impl fmt::Debug for CachingAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingAuthenticator")
            .field("inner", &self.shared.inner.name())
            .field("settings", &self.shared.settings)
            .field("entries", &self.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CachingAuthenticator {
    pub(crate) fn new(inner: Arc<dyn Authenticator>, settings: Settings) -> Self {
        let bucket = Bucket { tokens: f64::from(settings.burst.max(1)), last: Instant::now() };
        let entries = Entries { map: HashMap::new(), next_sweep: UNIX_EPOCH };
        let shared = Shared {
            inner,
            settings,
            entries: Mutex::new(entries),
            bucket: Mutex::new(bucket),
            counters: Counters::default(),
        };
        CachingAuthenticator { shared: Arc::new(shared) }
    }

    /// Entries held, answered and pending.
    pub(crate) fn len(&self) -> usize {
        lock(&self.shared.entries).map.len()
    }

    async fn lookup(&self, token: &[u8], now: SystemTime) -> Outcome {
        let token = super::trimmed(token)?;
        let mut key: Key = [0; 32];
        // SHA-256 digests are 32 bytes, always.
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token).as_ref());
        let counters = &self.shared.counters;
        let mut pending = {
            let mut entries = lock(&self.shared.entries);
            match entries.map.get(&key) {
                Some(Slot::Done { outcome, until, ttl }) if fresh(now, *until, *ttl) => {
                    counters.hits.inc();
                    return outcome.clone();
                }
                // A closed channel means the task running the call died: start anew.
                Some(Slot::Pending(rx)) if rx.has_changed().is_ok() => {
                    counters.coalesced.inc();
                    rx.clone()
                }
                _ => {
                    counters.misses.inc();
                    let (tx, rx) = watch::channel(None);
                    entries.map.insert(key, Slot::Pending(rx.clone()));
                    let shared = self.shared.clone();
                    let token = token.to_vec();
                    tokio::spawn(async move {
                        let outcome = shared.call(&token, now).await;
                        shared.keep(key, &token, &outcome, now);
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = match pending.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| Err(abandoned()))
    }
}

fn abandoned() -> Error {
    Error::Unavailable { reason: "the token review was abandoned before it answered".into() }
}

/// Whether an entry kept until `until` still holds at `now`.
fn fresh(now: SystemTime, until: SystemTime, ttl: Duration) -> bool {
    until.duration_since(now).is_ok_and(|left| !left.is_zero() && left <= ttl)
}

impl Shared {
    /// One inner call, once the bucket allows it.
    async fn call(&self, token: &[u8], now: SystemTime) -> Outcome {
        let wait = {
            let mut bucket = lock(&self.bucket);
            bucket.reserve(Instant::now(), &self.settings)
        };
        let Some(wait) = wait else {
            self.counters.throttled.inc();
            return Err(Error::Unavailable {
                reason: format!(
                    "meshca allows {} token reviews a second (burst {}) and none is free within {}; retry with backoff",
                    self.settings.qps,
                    self.settings.burst,
                    humantime::format_duration(self.settings.max_wait)
                ),
            });
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.counters.reviews.inc();
        let started = Instant::now();
        let outcome = self.inner.authenticate(token, now).await;
        self.counters.duration.observe(started.elapsed());
        if matches!(outcome, Err(Error::Unavailable { .. })) {
            self.counters.errors.inc();
        }
        outcome
    }

    /// Replaces the pending entry with the answer, or drops it when the answer is
    /// not to be kept (or there is no room).
    fn keep(&self, key: Key, token: &[u8], outcome: &Outcome, now: SystemTime) {
        let s = &self.settings;
        let kept = match outcome {
            Err(Error::Unavailable { .. }) => None,
            Err(_) => Some((now + s.failure_ttl, s.failure_ttl)),
            Ok(subject) => {
                // A token bound to a pod dies with it: remember its acceptance no longer
                // than `--jwks-confirm-pod` trusts a pod lookup, so a deleted pod's token
                // is refused as soon in tokenreview mode as in jwks mode with the check.
                let ttl = match subject.pod_uid {
                    Some(_) => s.ttl.min(POD_BOUND_TTL),
                    None => s.ttl,
                };
                let by_ttl = now + ttl;
                Some((expiry(token).map_or(by_ttl, |exp| exp.min(by_ttl)), ttl))
            }
        };
        let mut entries = lock(&self.entries);
        let Some((until, ttl)) = kept.filter(|(until, ttl)| fresh(now, *until, *ttl)) else {
            entries.map.remove(&key);
            return;
        };
        if entries.map.len() > s.max_entries && now >= entries.next_sweep {
            entries.next_sweep = now + Duration::from_secs(1);
            entries.map.retain(|_, slot| match slot {
                Slot::Done { until, ttl, .. } => fresh(now, *until, *ttl),
                Slot::Pending(_) => true,
            });
        }
        if entries.map.len() > s.max_entries {
            entries.map.remove(&key);
        } else {
            entries.map.insert(key, Slot::Done { outcome: outcome.clone(), until, ttl });
        }
    }
}

impl Bucket {
    /// Takes a token now, or reserves the next one and says how long to wait for
    /// it; `None` when that wait would exceed `max_wait` (nothing is reserved).
    fn reserve(&mut self, now: Instant, s: &Settings) -> Option<Duration> {
        let (rate, burst) = (f64::from(s.qps.max(1)), f64::from(s.burst.max(1)));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        let wait = if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64((1.0 - self.tokens) / rate).ok().filter(|w| *w <= s.max_wait)?
        };
        self.tokens -= 1.0;
        Some(wait)
    }
}

/// The `exp` of a JWT's payload, unverified; `None` when there is no readable one.
fn expiry(token: &[u8]) -> Option<SystemTime> {
    let claims = crate::jose::unverified_claims(token)?;
    let exp = claims.get("exp")?;
    let secs =
        exp.as_u64().map(Duration::from_secs).or_else(|| Duration::try_from_secs_f64(exp.as_f64()?).ok())?;
    UNIX_EPOCH.checked_add(secs)
}

impl Authenticator for CachingAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a> {
        Box::pin(self.lookup(token, now))
    }

    fn name(&self) -> &'static str {
        self.shared.inner.name()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.shared.counters;
        let counters = [
            ("meshca_token_reviews", "Calls made to the token review backend", &c.reviews),
            (
                "meshca_token_review_errors",
                "Token reviews that ended without an answer (unreachable, timed out, HTTP error)",
                &c.errors,
            ),
            ("meshca_token_review_throttled", "Token reviews refused by the rate limit", &c.throttled),
            ("meshca_token_cache_hits", "Tokens answered from the cache", &c.hits),
            ("meshca_token_cache_misses", "Tokens that started a review", &c.misses),
            ("meshca_token_cache_coalesced", "Tokens that joined a review already running", &c.coalesced),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let shared = self.shared.clone();
        let entries = move || i64::try_from(lock(&shared.entries).map.len()).unwrap_or(i64::MAX);
        registry.register(
            "meshca_token_cache_entries",
            "Entries in the token cache",
            ScrapeGauge::new(entries),
        );
        registry.register(
            "meshca_token_review_duration_seconds",
            "Latency of token review calls",
            c.duration.clone(),
        );
        self.shared.inner.register_metrics(registry);
    }

    fn unreachable_since(&self) -> Option<SystemTime> {
        self.shared.inner.unreachable_since()
    }

    fn probe(&self, now: SystemTime) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        self.shared.inner.probe(now)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const T: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T + secs)
    }

    fn subject() -> Subject {
        Subject {
            namespace: "web".into(),
            service_account: "web-sa".into(),
            pod_name: None,
            pod_uid: None,
            issuer: "kubernetes".into(),
        }
    }

    /// An unsigned JWT-shaped token with this `exp` (the inner fake does not verify).
    fn token(name: &str, exp: u64) -> Vec<u8> {
        let claims = serde_json::json!({"exp": T + exp, "sub": name});
        format!("e30.{}.c2ln", crate::jose::encode(claims.to_string())).into_bytes()
    }

    /// Counts calls; answers with `answer` (panics when it is `None`); when gated,
    /// each call waits until the gate opens.
    struct Fake {
        calls: AtomicUsize,
        answer: Mutex<Option<Outcome>>,
        gate: Option<watch::Receiver<bool>>,
    }

    impl Fake {
        fn answering(answer: Outcome) -> Arc<Fake> {
            Arc::new(Fake { calls: AtomicUsize::new(0), answer: Mutex::new(Some(answer)), gate: None })
        }
        fn gated(answer: Outcome) -> (Arc<Fake>, watch::Sender<bool>) {
            let (open, gate) = watch::channel(false);
            (
                Arc::new(Fake {
                    calls: AtomicUsize::new(0),
                    answer: Mutex::new(Some(answer)),
                    gate: Some(gate),
                }),
                open,
            )
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn answer(&self, answer: Option<Outcome>) {
            *self.answer.lock().unwrap() = answer;
        }
    }

    impl Authenticator for Fake {
        fn authenticate<'a>(&'a self, _token: &'a [u8], _now: SystemTime) -> AuthFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(mut gate) = self.gate.clone() {
                    let _ = gate.wait_for(|open| *open).await;
                }
                let answer = self.answer.lock().unwrap().clone();
                answer.expect("the fake was told to fail hard")
            })
        }
        fn name(&self) -> &'static str {
            "fake"
        }
        fn unreachable_since(&self) -> Option<SystemTime> {
            Some(at(7))
        }
    }

    fn settings() -> Settings {
        Settings {
            ttl: Duration::from_secs(300),
            failure_ttl: Duration::from_secs(10),
            qps: 100,
            burst: 200,
            max_wait: Duration::from_secs(2),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }

    fn cache(fake: &Arc<Fake>, settings: Settings) -> CachingAuthenticator {
        CachingAuthenticator::new(fake.clone(), settings)
    }

    /// Lets the other tasks run until `done` holds; a bounded number of turns.
    async fn settle(done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the other tasks never got there");
    }

    fn metric(cache: &CachingAuthenticator, name: &str) -> u64 {
        let out = crate::metrics::render(|r| cache.register_metrics(r));
        let line =
            out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{out}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_seen_before_is_answered_from_the_cache_whitespace_and_all() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        let t = token("a", 3600);
        assert_eq!(cache.authenticate(&t, at(0)).await.unwrap(), subject());
        assert_eq!(cache.authenticate(&t, at(1)).await.unwrap(), subject());
        let newline = [&t[..], b"\n"].concat();
        assert_eq!(cache.authenticate(&newline, at(2)).await.unwrap(), subject());
        assert_eq!(fake.calls(), 1);
        assert_eq!(
            (
                metric(&cache, "meshca_token_cache_hits_total"),
                metric(&cache, "meshca_token_cache_misses_total")
            ),
            (2, 1)
        );
        cache.authenticate(&token("b", 3600), at(3)).await.unwrap();
        assert_eq!((fake.calls(), cache.len()), (2, 2));
        assert_eq!(metric(&cache, "meshca_token_reviews_total"), 2);
        assert_eq!(metric(&cache, "meshca_token_review_duration_seconds_count"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_kept_until_the_token_expires_when_that_comes_before_the_ttl() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        let t = token("a", 60);
        cache.authenticate(&t, at(0)).await.unwrap();
        cache.authenticate(&t, at(59)).await.unwrap();
        assert_eq!(fake.calls(), 1);
        cache.authenticate(&t, at(60)).await.unwrap();
        assert_eq!(fake.calls(), 2, "asked again at the token's exp");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_is_kept_for_the_ttl_when_the_token_lives_longer_or_has_no_readable_exp() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        for (i, t) in [token("a", 3600), b"opaque-token".to_vec(), b"x.!!!.y".to_vec()].iter().enumerate() {
            cache.authenticate(t, at(0)).await.unwrap();
            cache.authenticate(t, at(299)).await.unwrap();
            assert_eq!(fake.calls(), 2 * i + 1);
            cache.authenticate(t, at(300)).await.unwrap();
            assert_eq!(fake.calls(), 2 * i + 2, "asked again after the TTL");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_kept_for_the_failure_ttl_only() {
        let fake = Fake::answering(Err(Error::Rejected { summary: "token has expired" }));
        let cache = cache(&fake, settings());
        let t = token("a", 3600);
        for s in 0..10 {
            assert!(matches!(cache.authenticate(&t, at(s)).await, Err(Error::Rejected { .. })));
        }
        assert_eq!(fake.calls(), 1);
        fake.answer(Some(Ok(subject())));
        assert!(cache.authenticate(&t, at(10)).await.is_ok(), "refusal kept past the failure TTL");
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_never_kept() {
        let fake = Fake::answering(Err(Error::Unavailable { reason: "API server answered 500".into() }));
        let cache = cache(&fake, settings());
        let t = token("a", 3600);
        for _ in 0..3 {
            assert!(matches!(cache.authenticate(&t, at(0)).await, Err(Error::Unavailable { .. })));
        }
        assert_eq!((fake.calls(), cache.len()), (3, 0));
        assert_eq!(metric(&cache, "meshca_token_review_errors_total"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_and_empty_tokens_are_refused_without_asking() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        assert!(matches!(cache.authenticate(b" \n", at(0)).await, Err(Error::Empty)));
        let big = vec![b'a'; super::super::MAX_TOKEN_LEN + 1];
        assert!(matches!(cache.authenticate(&big, at(0)).await, Err(Error::TooLarge { .. })));
        assert_eq!((fake.calls(), cache.len()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_requests_for_a_new_token_make_one_inner_call() {
        let (fake, open) = Fake::gated(Ok(subject()));
        let cache = Arc::new(cache(&fake, settings()));
        let t = token("a", 3600);
        let waiting: Vec<_> = (0..100)
            .map(|_| {
                let (cache, t) = (cache.clone(), t.clone());
                tokio::spawn(async move { cache.authenticate(&t, at(0)).await })
            })
            .collect();
        // Every request is either waiting on the one call or about to join it.
        settle(|| {
            metric(&cache, "meshca_token_cache_misses_total")
                + metric(&cache, "meshca_token_cache_coalesced_total")
                == 100
        })
        .await;
        assert_eq!(fake.calls(), 1);
        open.send(true).unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), subject());
        }
        assert_eq!(fake.calls(), 1);
        assert_eq!(metric(&cache, "meshca_token_cache_coalesced_total"), 99);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_giving_up_does_not_abandon_the_others() {
        let (fake, open) = Fake::gated(Ok(subject()));
        let cache = Arc::new(cache(&fake, settings()));
        let t = token("a", 3600);
        let first = tokio::time::timeout(Duration::from_millis(10), cache.authenticate(&t, at(0))).await;
        assert!(first.is_err(), "the first caller gave up");
        let second = tokio::spawn({
            let (cache, t) = (cache.clone(), t.clone());
            async move { cache.authenticate(&t, at(0)).await }
        });
        settle(|| metric(&cache, "meshca_token_cache_coalesced_total") == 1).await;
        open.send(true).unwrap();
        assert!(second.await.unwrap().is_ok());
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_task_that_dies_answers_unavailable_and_the_next_request_asks_again() {
        let fake = Fake::answering(Ok(subject()));
        fake.answer(None);
        let cache = cache(&fake, settings());
        let t = token("a", 3600);
        let died = cache.authenticate(&t, at(0)).await;
        assert!(matches!(died, Err(Error::Unavailable { .. })), "{died:?}");
        fake.answer(Some(Ok(subject())));
        assert!(cache.authenticate(&t, at(0)).await.is_ok());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_bucket_fails_fast_with_a_retry_hint_and_refills_with_time() {
        let fake = Fake::answering(Ok(subject()));
        let slow = Settings { qps: 1, burst: 2, max_wait: Duration::from_millis(500), ..settings() };
        let cache = cache(&fake, slow);
        cache.authenticate(&token("a", 3600), at(0)).await.unwrap();
        cache.authenticate(&token("b", 3600), at(0)).await.unwrap();
        let started = Instant::now();
        let refused = cache.authenticate(&token("c", 3600), at(0)).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "failed at once, without waiting");
        assert!(
            matches!(refused, Error::Unavailable { .. }) && refused.to_string().contains("retry"),
            "{refused}"
        );
        assert_eq!((fake.calls(), metric(&cache, "meshca_token_review_throttled_total")), (2, 1));
        tokio::time::advance(Duration::from_millis(600)).await;
        cache.authenticate(&token("c", 3600), at(1)).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1000) && waited <= Duration::from_millis(1002), "{waited:?}");
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepping_back_does_not_stretch_an_entry() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        let t = token("a", 86_400);
        cache.authenticate(&t, at(3600)).await.unwrap();
        cache.authenticate(&t, at(0)).await.unwrap();
        assert_eq!(fake.calls(), 2, "an hour back: the entry would outlive its TTL");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_keeps_no_new_answer_until_entries_expire() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, Settings { max_entries: 2, ..settings() });
        for name in ["a", "b", "c"] {
            cache.authenticate(&token(name, 3600), at(0)).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        cache.authenticate(&token("c", 3600), at(1)).await.unwrap();
        assert_eq!(fake.calls(), 4, "c was not kept");
        cache.authenticate(&token("c", 3600), at(400)).await.unwrap();
        cache.authenticate(&token("c", 3600), at(401)).await.unwrap();
        assert_eq!((fake.calls(), cache.len()), (5, 1), "expired entries swept, c kept");
    }

    /// The bucket's arithmetic at a rate other than one a second (where `*` and `/`
    /// agree): at 4 a second a token comes every 250 ms.
    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_and_waits_at_its_rate() {
        let fake = Fake::answering(Ok(subject()));
        let four = Settings { qps: 4, burst: 1, max_wait: Duration::from_secs(1), ..settings() };
        let cache = cache(&fake, four);
        let started = Instant::now();
        cache.authenticate(&token("a", 3600), at(0)).await.unwrap();
        // Half a token back after 125 ms; the other half takes 125 ms more.
        tokio::time::advance(Duration::from_millis(125)).await;
        cache.authenticate(&token("b", 3600), at(0)).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited <= Duration::from_millis(251), "{waited:?}");
        // The bucket is empty again: the next token is 250 ms away, within max_wait.
        cache.authenticate(&token("c", 3600), at(0)).await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(500) && waited <= Duration::from_millis(502), "{waited:?}");
        assert_eq!(fake.calls(), 3);
    }

    /// Expired entries are swept only when the cache is over its bound, and then at
    /// most once a second of `now`.
    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_only_when_full_and_at_most_once_a_second() {
        let ms = |ms: u64| UNIX_EPOCH + Duration::from_millis(T * 1000 + ms);
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, Settings { max_entries: 2, ..settings() });
        cache.authenticate(&token("a", 100), at(0)).await.unwrap();
        // At the bound but not over it: a, expired, stays until a sweep.
        cache.authenticate(&token("b", 3600), at(200)).await.unwrap();
        assert_eq!((fake.calls(), cache.len()), (2, 2), "b kept beside the expired a, nothing swept");

        let cache = self::cache(&fake, Settings { max_entries: 2, ..settings() });
        cache.authenticate(&token("a", 100), at(0)).await.unwrap();
        cache.authenticate(&token("b", 3600), at(0)).await.unwrap();
        // Over the bound at 99.5 s: a sweep finds nothing expired; c is not kept.
        cache.authenticate(&token("c", 3600), ms(99_500)).await.unwrap();
        // At 100.2 s a has expired, but the last sweep was under a second ago: d is not kept.
        cache.authenticate(&token("d", 3600), ms(100_200)).await.unwrap();
        cache.authenticate(&token("d", 3600), ms(100_300)).await.unwrap();
        assert_eq!((fake.calls(), cache.len()), (7, 2), "d asked for twice");
        // At 100.6 s a sweep is due again: a goes, e is kept.
        cache.authenticate(&token("e", 3600), ms(100_600)).await.unwrap();
        cache.authenticate(&token("e", 3600), ms(100_700)).await.unwrap();
        assert_eq!((fake.calls(), cache.len()), (8, 2), "e kept in a's place");
    }

    #[tokio::test(start_paused = true)]
    async fn debug_output_holds_no_token() {
        let fake = Fake::answering(Ok(subject()));
        let cache = cache(&fake, settings());
        cache.authenticate(b"token-marker-5e1d", at(0)).await.unwrap();
        let debug = format!("{cache:?}");
        assert!(debug.contains("entries: 1") && !debug.contains("marker"), "{debug}");
    }

    /// Readiness (`/ready`) asks the cache what its backend says.
    #[tokio::test(start_paused = true)]
    async fn the_name_and_reachability_are_the_inner_authenticators() {
        let cache = cache(&Fake::answering(Ok(subject())), settings());
        assert_eq!((cache.name(), cache.unreachable_since()), ("fake", Some(at(7))));
    }
}
