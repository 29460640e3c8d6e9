//! `--jwks-confirm-pod`: after a token verifies locally, [`PodConfirmingAuthenticator`]
//! checks that the pod it is bound to (the `kubernetes.io.pod` claim, name and uid)
//! still exists with that uid, reading it with `GET /api/v1/namespaces/NS/pods/NAME`
//! through the Kubernetes API client. Local JWT verification alone cannot tell that
//! a pod was deleted; this closes most of that gap at the cost of one cached GET.
//!
//! Policy, per pod (`namespace/name`):
//! - a token without a pod binding (a legacy or non-projected token) is passed
//!   through unchanged: there is no pod to confirm;
//! - the pod is refused when the API server says it does not exist
//!   ([`Error::PodNotFound`]), when it has been terminating for more than
//!   [`DELETION_GRACE`] (as the API server's own token authenticator does), or
//!   when it exists with another uid: deleted and re-created under the same name
//!   ([`Error::PodUidMismatch`]);
//! - answers are facts about the pod (uid, deletion time), kept from the time they
//!   were fetched: an acceptance is decided on facts at most `ttl` old, a refusal on
//!   facts at most `failure_ttl` old; older facts are fetched again. So a deleted
//!   pod's token is accepted for at most `ttl` after deletion (the staleness bound),
//!   and the token of a pod re-created under the same name is refused for at most
//!   `failure_ttl`;
//! - concurrent lookups of one pod share one GET, run as a task of its own so a
//!   caller giving up does not abandon the others; each GET is bounded by `timeout`;
//! - an API server that cannot be reached, does not answer in time or answers an
//!   error other than 404 gives [`Error::Unavailable`], never an acceptance, and is
//!   never cached;
//! - at most `max_entries` pods are remembered; when full, entries too old to decide
//!   anything are swept and, failing that, new answers are not kept.
//!
//! Ages are judged by the injected `now`; facts dated after `now` (the wall clock
//! stepped back) are too old. A cached GET per pod was chosen over a watch of all
//! pods: it needs only `get` on pods (no cluster-wide `list`/`watch`), holds only
//! the pods that present tokens, and bounds staleness by `ttl` instead of by watch
//! health. Verifying the token stays with the inner authenticator.

use super::{AuthFuture, Authenticator, Error, Subject};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

use crate::metrics::{Counter, Registry};

/// Default longest age of the facts an acceptance is decided on.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Default longest age of the facts a refusal is decided on.
pub(crate) const DEFAULT_FAILURE_TTL: Duration = Duration::from_secs(5);
/// Default bound on one pod GET, connecting included.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on remembered pods.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// A pod terminating for longer than this no longer vouches for its tokens
/// (kube-apiserver's service-account token authenticator uses the same 60 s).
pub(crate) const DELETION_GRACE: Duration = Duration::from_secs(60);

/// How pod confirmations are cached and bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Longest age of the facts an acceptance is decided on (the staleness bound).
    pub ttl: Duration,
    /// Longest age of the facts a refusal is decided on.
    pub failure_ttl: Duration,
    /// Bound on each GET, connecting included.
    pub timeout: Duration,
    /// Bound on remembered pods.
    pub max_entries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ttl: DEFAULT_TTL,
            failure_ttl: DEFAULT_FAILURE_TTL,
            timeout: DEFAULT_TIMEOUT,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What the API server says about a pod that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodFacts {
    pub uid: Option<String>,
    /// `metadata.deletionTimestamp`: the pod is terminating since then.
    pub deleting_since: Option<SystemTime>,
}

/// A pod lookup: `Ok(None)` when the pod does not exist.
pub(crate) type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<PodFacts>, Error>> + Send + 'a>>;

/// Where pods are looked up.
pub(crate) trait PodSource: Send + Sync + 'static {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> LookupFuture<'a>;
}

/// Pods through the Kubernetes API client.
pub(crate) struct KubePods {
    client: kube::Client,
}

impl KubePods {
    pub(crate) fn new(client: kube::Client) -> Self {
        KubePods { client }
    }
}

impl PodSource for KubePods {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            match api.get(name).await {
                Ok(pod) => Ok(Some(PodFacts {
                    uid: pod.metadata.uid,
                    deleting_since: pod.metadata.deletion_timestamp.map(|t| SystemTime::from(t.0)),
                })),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                Err(e) => Err(unavailable(&e)),
            }
        })
    }
}

/// Why a pod GET failed, in words; response bodies are never quoted.
fn unavailable(e: &kube::Error) -> Error {
    let reason = match e {
        kube::Error::Api(status) if status.code == 403 => {
            "the Kubernetes API server answered 403 to a pod lookup: meshca's service account may not get \
             pods (grant get on pods, as deploy/base does)"
                .to_owned()
        }
        kube::Error::Api(status) => {
            format!("the Kubernetes API server answered {} to a pod lookup", status.code)
        }
        kube::Error::SerdeError(_) => "the Kubernetes API server's pod answer does not parse".to_owned(),
        other => super::discovery::unreachable_reason(other, " (pod lookup)"),
    };
    Error::Unavailable { reason }
}

/// Whether `facts` (or their absence) vouch for a token bound to a pod with `uid` at `now`.
pub(crate) fn judge(facts: Option<&PodFacts>, uid: &str, now: SystemTime) -> Result<(), Error> {
    let Some(facts) = facts else { return Err(Error::PodNotFound) };
    if facts.uid.as_deref() != Some(uid) {
        return Err(Error::PodUidMismatch);
    }
    match facts.deleting_since {
        Some(since) if since + DELETION_GRACE < now => Err(Error::PodNotFound),
        _ => Ok(()),
    }
}

type Fetched = Result<Option<PodFacts>, Error>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodKey {
    namespace: String,
    name: String,
}

enum Slot {
    /// Facts fetched at `at`; `None`: the pod did not exist.
    Known { facts: Option<PodFacts>, at: SystemTime },
    /// A GET is running; its answer arrives here.
    Pending(watch::Receiver<Option<Fetched>>),
}

#[derive(Debug, Default)]
struct Counters {
    lookups: Counter,
    errors: Counter,
    hits: Counter,
    coalesced: Counter,
    refused: Counter,
}

struct Shared {
    source: Arc<dyn PodSource>,
    settings: Settings,
    entries: Mutex<HashMap<PodKey, Slot>>,
    counters: Counters,
}

/// Wraps an authenticator (jwks) and confirms the pods its tokens are bound to.
pub(crate) struct PodConfirmingAuthenticator {
    inner: Arc<dyn Authenticator>,
    shared: Arc<Shared>,
}

impl fmt::Debug for PodConfirmingAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodConfirmingAuthenticator")
            .field("inner", &self.inner.name())
            .field("settings", &self.shared.settings)
            .field("counters", &self.shared.counters)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How old facts fetched at `at` are at `now`; `None` when dated after `now`.
fn age(at: SystemTime, now: SystemTime) -> Option<Duration> {
    now.duration_since(at).ok()
}

impl PodConfirmingAuthenticator {
    pub(crate) fn new(inner: Arc<dyn Authenticator>, source: Arc<dyn PodSource>, settings: Settings) -> Self {
        let shared =
            Shared { source, settings, entries: Mutex::new(HashMap::new()), counters: Counters::default() };
        PodConfirmingAuthenticator { inner, shared: Arc::new(shared) }
    }

    /// Builds a Kubernetes client from `kubeconfig` (or `KUBECONFIG`,
    /// `~/.kube/config`, in-cluster) that never waits longer than the timeout to connect.
    pub(crate) async fn connect(
        inner: Arc<dyn Authenticator>,
        kubeconfig: Option<&Path>,
        settings: Settings,
    ) -> Result<Self, Error> {
        let config = super::discovery::kube_config(kubeconfig, "confirm token pods on").await?;
        let client = super::discovery::kube_client(config, settings.timeout)?;
        Ok(Self::new(inner, Arc::new(KubePods::new(client)), settings))
    }

    /// Pods remembered or being looked up.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.shared.entries).len()
    }

    async fn check(&self, token: &[u8], now: SystemTime) -> Result<Subject, Error> {
        let subject = self.inner.authenticate(token, now).await?;
        if let (Some(name), Some(uid)) = (&subject.pod_name, &subject.pod_uid) {
            let verdict = self.confirm(&subject.namespace, name, uid, now).await;
            if matches!(verdict, Err(Error::PodNotFound | Error::PodUidMismatch)) {
                self.shared.counters.refused.inc();
            }
            verdict?;
        }
        Ok(subject)
    }

    /// Whether pod `namespace/name` exists with `uid` (see the module notes).
    pub(crate) async fn confirm(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        now: SystemTime,
    ) -> Result<(), Error> {
        let key = PodKey { namespace: namespace.to_owned(), name: name.to_owned() };
        let (s, counters) = (&self.shared.settings, &self.shared.counters);
        let mut pending = {
            let mut entries = lock(&self.shared.entries);
            match entries.get(&key) {
                Some(Slot::Known { facts, at }) => {
                    let verdict = judge(facts.as_ref(), uid, now);
                    let limit = if verdict.is_ok() { s.ttl } else { s.failure_ttl };
                    if age(*at, now).is_some_and(|age| age < limit) {
                        counters.hits.inc();
                        return verdict;
                    }
                    self.start(&mut entries, key, now)
                }
                // A closed channel means the task running the GET died: start anew.
                Some(Slot::Pending(rx)) if rx.has_changed().is_ok() => {
                    counters.coalesced.inc();
                    rx.clone()
                }
                _ => self.start(&mut entries, key, now),
            }
        };
        let fetched = match pending.wait_for(Option::is_some).await {
            Ok(fetched) => fetched.clone(),
            Err(_) => None,
        };
        match fetched {
            Some(Ok(facts)) => judge(facts.as_ref(), uid, now),
            Some(Err(e)) => Err(e),
            None => {
                Err(Error::Unavailable { reason: "the pod lookup was abandoned before it answered".into() })
            }
        }
    }

    /// Starts the GET for `key` as a task of its own and marks the entry pending;
    /// its answer is dated `now`, the time of the request that asked.
    fn start(
        &self,
        entries: &mut HashMap<PodKey, Slot>,
        key: PodKey,
        now: SystemTime,
    ) -> watch::Receiver<Option<Fetched>> {
        let (tx, rx) = watch::channel(None);
        entries.insert(key.clone(), Slot::Pending(rx.clone()));
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let fetched = shared.fetch(&key, now).await;
            let _ = tx.send(Some(fetched));
        });
        rx
    }
}

impl Shared {
    /// One bounded GET; the answer replaces the pending entry (or drops it).
    async fn fetch(&self, key: &PodKey, now: SystemTime) -> Fetched {
        self.counters.lookups.inc();
        let timeout = self.settings.timeout;
        let fetched = match tokio::time::timeout(timeout, self.source.get(&key.namespace, &key.name)).await {
            Ok(fetched) => fetched,
            Err(_) => Err(Error::Unavailable {
                reason: format!(
                    "the Kubernetes API server did not answer the pod lookup within {}",
                    humantime::format_duration(timeout)
                ),
            }),
        };
        self.keep(key, &fetched, now);
        fetched
    }

    fn keep(&self, key: &PodKey, fetched: &Fetched, at: SystemTime) {
        let mut entries = lock(&self.entries);
        let Ok(facts) = fetched else {
            self.counters.errors.inc();
            entries.remove(key);
            return;
        };
        if entries.len() > self.settings.max_entries {
            let keep_for = self.settings.ttl.max(self.settings.failure_ttl);
            entries.retain(|_, slot| match slot {
                Slot::Known { at: fetched_at, .. } => age(*fetched_at, at).is_some_and(|a| a < keep_for),
                Slot::Pending(_) => true,
            });
        }
        if entries.len() > self.settings.max_entries {
            entries.remove(key);
        } else {
            entries.insert(key.clone(), Slot::Known { facts: facts.clone(), at });
        }
    }
}

impl Authenticator for PodConfirmingAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a> {
        Box::pin(self.check(token, now))
    }

    /// The inner authenticator's: confirming the pod is part of `jwks` mode.
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.shared.counters;
        let counters = [
            ("meshca_pod_lookups", "Pod GETs made to confirm token pods", &c.lookups),
            (
                "meshca_pod_lookup_errors",
                "Pod GETs that ended without an answer (unreachable, timed out, HTTP error other than 404)",
                &c.errors,
            ),
            ("meshca_pod_cache_hits", "Token pods confirmed or refused from the cache", &c.hits),
            ("meshca_pod_lookups_coalesced", "Token pods that joined a GET already running", &c.coalesced),
            (
                "meshca_pod_refusals",
                "Tokens refused because their pod is gone or has another uid",
                &c.refused,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        self.inner.register_metrics(registry);
    }

    fn unreachable_since(&self) -> Option<SystemTime> {
        self.inner.unreachable_since()
    }

    fn probe(&self, now: SystemTime) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.inner.probe(now)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    const T: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T + secs)
    }

    fn live(uid: &str) -> Option<PodFacts> {
        Some(PodFacts { uid: Some(uid.into()), deleting_since: None })
    }

    /// Accepts any token as `web-sa` bound to pod `web-0` with the uid the token's text names.
    struct Inner;
    impl Authenticator for Inner {
        fn authenticate<'a>(&'a self, token: &'a [u8], _now: SystemTime) -> AuthFuture<'a> {
            let uid = String::from_utf8_lossy(token).into_owned();
            Box::pin(async move {
                Ok(Subject {
                    namespace: "web".into(),
                    service_account: "web-sa".into(),
                    pod_name: (!uid.is_empty()).then(|| "web-0".into()),
                    pod_uid: (!uid.is_empty()).then_some(uid),
                    issuer: "iss".into(),
                })
            })
        }
        fn name(&self) -> &'static str {
            "jwks"
        }
        fn unreachable_since(&self) -> Option<SystemTime> {
            Some(at(7))
        }
    }

    /// A pod source whose answer a test sets; counts GETs; when gated, each GET
    /// waits until the gate opens.
    struct Fake {
        gets: AtomicUsize,
        answer: Mutex<Fetched>,
        gate: Option<watch::Receiver<bool>>,
    }

    impl Fake {
        fn new(answer: Option<PodFacts>) -> Arc<Fake> {
            Arc::new(Fake { gets: AtomicUsize::new(0), answer: Mutex::new(Ok(answer)), gate: None })
        }
        fn set(&self, answer: Fetched) {
            *self.answer.lock().unwrap() = answer;
        }
        fn gets(&self) -> usize {
            self.gets.load(Ordering::SeqCst)
        }
    }

    impl PodSource for Fake {
        fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> LookupFuture<'a> {
            assert_eq!((namespace, name), ("web", "web-0"));
            self.gets.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            Box::pin(async move {
                if let Some(gate) = &mut gate {
                    let _ = gate.wait_for(|open| *open).await;
                }
                self.answer.lock().unwrap().clone()
            })
        }
    }

    fn confirming(fake: Arc<Fake>) -> PodConfirmingAuthenticator {
        PodConfirmingAuthenticator::new(Arc::new(Inner), fake, Settings::default())
    }

    #[test]
    fn a_pod_vouches_only_with_the_tokens_uid_and_until_a_minute_into_its_deletion() {
        assert!(judge(live("u1").as_ref(), "u1", at(0)).is_ok());
        assert!(matches!(judge(None, "u1", at(0)), Err(Error::PodNotFound)));
        assert!(matches!(judge(live("u2").as_ref(), "u1", at(0)), Err(Error::PodUidMismatch)));
        let no_uid = PodFacts { uid: None, deleting_since: None };
        assert!(matches!(judge(Some(&no_uid), "u1", at(0)), Err(Error::PodUidMismatch)));
        let deleting = PodFacts { uid: Some("u1".into()), deleting_since: Some(at(0)) };
        assert!(judge(Some(&deleting), "u1", at(60)).is_ok());
        assert!(matches!(judge(Some(&deleting), "u1", at(61)), Err(Error::PodNotFound)));
    }

    #[tokio::test]
    async fn acceptances_last_the_ttl_refusals_the_failure_ttl_and_tokens_without_a_pod_pass() {
        let fake = Fake::new(live("u1"));
        let auth = confirming(fake.clone());
        assert!(auth.authenticate(b"u1", at(0)).await.is_ok());
        fake.set(Ok(None));
        assert!(auth.authenticate(b"u1", at(29)).await.is_ok(), "within the ttl the pod is taken as live");
        assert_eq!(fake.gets(), 1);
        let refused = auth.authenticate(b"u1", at(30)).await.unwrap_err();
        assert_eq!((refused.code(), fake.gets()), ("pod_not_found", 2));
        fake.set(Ok(live("u2")));
        assert!(matches!(auth.authenticate(b"u2", at(34)).await, Err(Error::PodNotFound)));
        assert_eq!(fake.gets(), 2, "a refusal is kept for the failure ttl");
        assert!(auth.authenticate(b"u2", at(35)).await.is_ok(), "the re-created pod's token, once refetched");
        let refused = auth.authenticate(b"u1", at(36)).await.unwrap_err();
        assert_eq!((refused.code(), fake.gets()), ("pod_uid_mismatch", 3), "facts 1 s old decide a refusal");
        assert!(auth.authenticate(b"", at(37)).await.is_ok());
        assert_eq!(fake.gets(), 3, "no pod binding, no lookup");
        let metrics = crate::metrics::render(|r| auth.register_metrics(r));
        assert!(metrics.contains("meshca_pod_lookups_total 3\n"), "{metrics}");
        assert!(metrics.contains("meshca_pod_refusals_total 3\n"), "{metrics}");
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable_and_never_remembered() {
        let fake = Fake::new(live("u1"));
        let auth = confirming(fake.clone());
        fake.set(Err(Error::Unavailable { reason: "down".into() }));
        for _ in 0..2 {
            assert!(matches!(auth.authenticate(b"u1", at(0)).await, Err(Error::Unavailable { .. })));
        }
        assert_eq!((fake.gets(), auth.len()), (2, 0));
        fake.set(Ok(live("u1")));
        assert!(auth.authenticate(b"u1", at(0)).await.is_ok());
    }

    #[tokio::test]
    async fn a_wall_clock_stepped_back_makes_remembered_facts_too_old() {
        let fake = Fake::new(live("u1"));
        let auth = confirming(fake.clone());
        assert!(auth.authenticate(b"u1", at(100)).await.is_ok());
        assert!(auth.authenticate(b"u1", at(50)).await.is_ok());
        assert_eq!(fake.gets(), 2);
    }

    #[tokio::test]
    async fn a_hung_lookup_is_unavailable_after_the_timeout() {
        let (_open, gate) = watch::channel(false);
        let fake = Arc::new(Fake {
            gets: AtomicUsize::new(0),
            answer: Mutex::new(Ok(live("u1"))),
            gate: Some(gate),
        });
        let settings = Settings { timeout: Duration::from_millis(50), ..Settings::default() };
        let auth = PodConfirmingAuthenticator::new(Arc::new(Inner), fake, settings);
        tokio::time::pause();
        let e = auth.authenticate(b"u1", at(0)).await.unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }) && e.to_string().contains("50ms"), "{e}");
    }

    #[tokio::test]
    async fn a_hundred_concurrent_lookups_of_one_pod_share_one_get() {
        let (open, gate) = watch::channel(false);
        let fake = Arc::new(Fake {
            gets: AtomicUsize::new(0),
            answer: Mutex::new(Ok(live("u1"))),
            gate: Some(gate),
        });
        let auth = Arc::new(confirming(fake.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let auth = auth.clone();
            let uid = if i % 2 == 0 { "u1" } else { "u-other" };
            tasks.spawn(async move { auth.authenticate(uid.as_bytes(), at(0)).await.map(|_| ()) });
        }
        // Every task has joined once all 100 are blocked on the gate; each yield
        // lets every runnable task run, so a few suffice when lookups are shared.
        for _ in 0..1_000 {
            if auth.shared.counters.coalesced.get() == 99 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!((auth.shared.counters.coalesced.get(), fake.gets()), (99, 1));
        open.send_replace(true);
        let (mut accepted, mut mismatched) = (0, 0);
        while let Some(result) = tasks.join_next().await {
            match result.unwrap() {
                Ok(()) => accepted += 1,
                Err(Error::PodUidMismatch) => mismatched += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((fake.gets(), accepted, mismatched), (1, 50, 50));
    }

    /// Every pod exists, with its name for uid; counts GETs.
    struct Every(AtomicUsize);

    impl PodSource for Every {
        fn get<'a>(&'a self, _namespace: &'a str, name: &'a str) -> LookupFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(live(name)) })
        }
    }

    /// Over `max_entries`, facts too old to decide anything (older than the longer
    /// of the two TTLs, 30 s) are swept; failing that, the new pod is not kept.
    #[tokio::test]
    async fn a_full_cache_sweeps_facts_too_old_to_decide_and_otherwise_keeps_no_new_pod() {
        let source = Arc::new(Every(AtomicUsize::new(0)));
        let settings = Settings { max_entries: 2, ..Settings::default() };
        let auth = PodConfirmingAuthenticator::new(Arc::new(Inner), source.clone(), settings);
        let confirm = |pod: &'static str, secs| auth.confirm("web", pod, pod, at(secs));
        confirm("a", 0).await.unwrap();
        // At the bound, not over it: b is kept beside a, whose facts are too old.
        confirm("b", 40).await.unwrap();
        assert_eq!((source.0.load(Ordering::SeqCst), auth.len()), (2, 2));
        // Over the bound at 45 s: a's facts (45 s old) are swept and c is kept.
        confirm("c", 45).await.unwrap();
        confirm("c", 46).await.unwrap();
        assert_eq!((source.0.load(Ordering::SeqCst), auth.len()), (3, 2), "c answered from the cache");
        // Over the bound at 50 s, b's and c's facts are 10 s and 5 s old: d is not kept.
        confirm("d", 50).await.unwrap();
        confirm("d", 51).await.unwrap();
        assert_eq!((source.0.load(Ordering::SeqCst), auth.len()), (5, 2), "d looked up twice");
        // At 75 s c's facts are exactly 30 s old: too old, swept with b's; e alone is kept.
        confirm("e", 75).await.unwrap();
        assert_eq!((source.0.load(Ordering::SeqCst), auth.len()), (6, 1));
    }

    /// Its first GET panics, as a task that dies would; later ones find pod `u1`.
    struct DiesOnce(AtomicUsize);

    impl PodSource for DiesOnce {
        fn get<'a>(&'a self, _namespace: &'a str, _name: &'a str) -> LookupFuture<'a> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                assert!(n > 0, "the first pod GET dies (expected by this test)");
                Ok(live("u1"))
            })
        }
    }

    #[tokio::test]
    async fn a_lookup_task_that_dies_answers_unavailable_and_the_next_request_looks_again() {
        let source = Arc::new(DiesOnce(AtomicUsize::new(0)));
        let auth = PodConfirmingAuthenticator::new(Arc::new(Inner), source.clone(), Settings::default());
        let died = auth.authenticate(b"u1", at(0)).await.unwrap_err();
        assert!(
            matches!(died, Error::Unavailable { .. }) && died.to_string().contains("abandoned"),
            "{died}"
        );
        assert!(auth.authenticate(b"u1", at(0)).await.is_ok(), "not joined to the dead lookup");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn debug_shows_the_inner_authenticator_settings_and_counters() {
        let auth = confirming(Fake::new(live("u1")));
        assert!(auth.authenticate(b"u1", at(0)).await.is_ok());
        let debug = format!("{auth:?}");
        let settings = "Settings { ttl: 30s, failure_ttl: 5s, timeout: 2s, max_entries: 100000 }";
        assert!(debug
            .starts_with(&format!("PodConfirmingAuthenticator {{ inner: \"jwks\", settings: {settings}, ")));
        assert!(debug.contains("lookups: Counter { value: 1") && debug.ends_with(", .. }"), "{debug}");
    }

    /// Readiness (`/ready`) asks the wrapper what the inner authenticator says.
    #[test]
    fn the_name_and_reachability_are_the_inner_authenticators() {
        let auth = confirming(Fake::new(live("u1")));
        assert_eq!((auth.name(), auth.unreachable_since()), ("jwks", Some(at(7))));
    }

    #[tokio::test]
    async fn refusals_name_no_pod_uid_or_token_content() {
        let fake = Fake::new(live("uid-marker-55"));
        let auth = confirming(fake);
        let e = auth.authenticate(b"token-uid-marker-66", at(0)).await.unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("marker") && !text.contains("web-0"), "{text}");
    }
}
