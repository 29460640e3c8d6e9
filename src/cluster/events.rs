//! Kubernetes Events for Certify decisions, on the caller's ServiceAccount.
//!
//! An issuance becomes a `Normal` Event with reason `IssuedLeafCertificate` and the
//! message `issued certificate for IDENTITY until NOT_AFTER: SHA256` (the leaf's
//! fingerprint), as Linkerd's identity controller writes it. A denial of a caller
//! whose service account is known (it authenticated, then was refused) becomes a
//! `Warning` Event whose reason is the audit reason code in UpperCamelCase
//! (`identity_mismatch` → `IdentityMismatch`). Both name the ServiceAccount as
//! `involvedObject` and are core/v1 Events in its namespace, named
//! `SA.REQUEST_ID` so they lead to their audit record.
//!
//! Events are a convenience for people running `kubectl`; the audit log stays the
//! system of record. So [`Emitter::emit`] never waits: notices go into a bounded
//! queue ([`QUEUE_CAPACITY`]) drained by one background task that creates them one
//! at a time, each bounded by [`CREATE_TIMEOUT`]; a notice that finds the queue
//! full is dropped and counted. Failed creations are counted and logged, never
//! retried. Deciding what is issued, and writing the audit record, belong to
//! `grpc`; this module only reports decisions already made.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::mpsc;

use crate::audit::{Outcome, Record};
use crate::metrics::{Counter, Registry, ScrapeGauge};

/// Notices waiting to be created, at most; beyond, they are dropped.
pub(crate) const QUEUE_CAPACITY: usize = 1024;
/// Bound on one Event creation, connecting included.
pub(crate) const CREATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reason of the Event for an issued certificate.
pub(crate) const REASON_ISSUED: &str = "IssuedLeafCertificate";
/// `source.component` and `reportingComponent` of every Event.
pub(crate) const COMPONENT: &str = "meshca";
/// Longest message written; longer ones are cut.
const MAX_MESSAGE: usize = 1024;

/// Why Events cannot be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No Kubernetes client could be built (configuration, kubeconfig).
    #[error("Kubernetes Events: {reason}")]
    Client { reason: String },
    /// The API server did not create an Event (`reason` never quotes its body).
    #[error("creating an Event failed: {reason}")]
    Create { reason: String },
}

/// One decision to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Notice {
    pub namespace: String,
    pub service_account: String,
    /// The identity asked for (as audited).
    pub identity: String,
    pub request_id: String,
    /// When the decision was made.
    pub time: SystemTime,
    pub kind: Kind,
}

/// What was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Issued { not_after: SystemTime, fingerprint_sha256: String },
    Denied { code: &'static str, detail: String },
}

impl Notice {
    /// The issuance `record` describes; `None` without a subject or certificate.
    pub(crate) fn issued(record: &Record) -> Option<Notice> {
        let issued = record.issued.as_ref().filter(|_| record.outcome == Outcome::Issued)?;
        let kind = Kind::Issued {
            not_after: issued.not_after,
            fingerprint_sha256: issued.fingerprint_sha256.clone(),
        };
        Self::about(record, kind)
    }

    /// The denial `record` describes, with its reason code and the text the caller
    /// was sent; `None` when the caller's service account is not known.
    pub(crate) fn denied(record: &Record, code: &'static str, detail: String) -> Option<Notice> {
        Self::about(record, Kind::Denied { code, detail })
    }

    /// This notice's decision, reversed: the certificate was withheld after all.
    pub(crate) fn withheld(self, code: &'static str, detail: String) -> Notice {
        Notice { kind: Kind::Denied { code, detail }, ..self }
    }

    fn about(record: &Record, kind: Kind) -> Option<Notice> {
        let subject = record.subject.as_ref()?;
        Some(Notice {
            namespace: subject.namespace.clone(),
            service_account: subject.service_account.clone(),
            identity: record.requested_identity.clone(),
            request_id: record.request_id.clone(),
            time: record.time,
            kind,
        })
    }

    /// The core/v1 Event for this notice.
    pub(crate) fn event(&self, reporting_instance: Option<&str>) -> Event {
        let (type_, reason, message) = match &self.kind {
            Kind::Issued { not_after, fingerprint_sha256 } => (
                "Normal",
                REASON_ISSUED.to_owned(),
                format!(
                    "issued certificate for {} until {}: {fingerprint_sha256}",
                    self.identity,
                    humantime::format_rfc3339_seconds(clamp(*not_after))
                ),
            ),
            Kind::Denied { code, detail } => (
                "Warning",
                camel_case(code),
                format!("denied certificate for {}: {code}: {detail}", self.identity),
            ),
        };
        let time = Time(timestamp(self.time));
        Event {
            metadata: ObjectMeta {
                name: Some(event_name(&self.service_account, &self.request_id)),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("ServiceAccount".into()),
                namespace: Some(self.namespace.clone()),
                name: Some(self.service_account.clone()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            reason: Some(reason),
            message: Some(truncate(message, MAX_MESSAGE)),
            action: Some("Certify".into()),
            count: Some(1),
            first_timestamp: Some(time.clone()),
            last_timestamp: Some(time),
            source: Some(EventSource { component: Some(COMPONENT.into()), host: None }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: reporting_instance.map(str::to_owned),
            ..Default::default()
        }
    }
}

/// The reason of a client configuration error, without the authenticator's framing.
pub(crate) fn client_reason(e: crate::auth::Error) -> String {
    match e {
        crate::auth::Error::Config { reason } => reason,
        other => other.to_string(),
    }
}

/// `identity_mismatch` → `IdentityMismatch`.
pub(crate) fn camel_case(code: &str) -> String {
    code.split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

/// `SA.REQUEST_ID`, kept within the 253 characters of an object name (the service
/// account part is cut, and never left ending in `-` or `.`).
fn event_name(service_account: &str, request_id: &str) -> String {
    let mut end = service_account.len().min(253 - 1 - request_id.len().min(64));
    while !service_account.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = service_account[..end].trim_end_matches(['-', '.']);
    format!("{prefix}.{request_id}")
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `t` within 1970..=9999, the range both formatters accept.
fn clamp(t: SystemTime) -> SystemTime {
    t.clamp(UNIX_EPOCH, UNIX_EPOCH + Duration::from_secs(253_402_300_799))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let since = clamp(t).duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(0);
    Timestamp::new(secs, 0).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A future creating one Event.
pub(crate) type CreateFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// Where Events are created.
pub trait EventSink: Send + Sync + 'static {
    fn create(&self, event: Event) -> CreateFuture<'_>;
}

/// Creates Events through the Kubernetes API client.
pub(crate) struct KubeSink {
    client: kube::Client,
}

impl EventSink for KubeSink {
    fn create(&self, event: Event) -> CreateFuture<'_> {
        Box::pin(async move {
            let namespace = event.metadata.namespace.clone().unwrap_or_default();
            let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) => Err(Error::Create {
                    reason: match status.code {
                        403 => "the Kubernetes API server answered 403: meshca's service account may not \
                                create events (grant it create on events)"
                            .to_owned(),
                        code => format!("the Kubernetes API server answered {code}"),
                    },
                }),
                Err(other) => {
                    let mut cause: &dyn std::error::Error = &other;
                    while let Some(source) = cause.source() {
                        cause = source;
                    }
                    let text: String = cause.to_string().chars().take(200).collect();
                    Err(Error::Create { reason: format!("cannot reach the Kubernetes API server ({text})") })
                }
            }
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    sent: Counter,
    errors: Counter,
    dropped: Counter,
}

/// Hands notices to the background task; cheap to clone. The task ends once every
/// clone is gone and the queue is drained.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::Sender<Notice>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emitter").field("queued", &self.queued()).field("counters", &self.counters).finish()
    }
}

impl Emitter {
    /// Builds a Kubernetes client from `kubeconfig` (or `KUBECONFIG`, `~/.kube/config`,
    /// in-cluster) and starts the background task.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Emitter, Error> {
        let client = async {
            let config = crate::auth::discovery::kube_config(kubeconfig, "send Events to").await?;
            crate::auth::discovery::kube_client(config, CREATE_TIMEOUT)
        };
        let client = client.await.map_err(|e| Error::Client { reason: client_reason(e) })?;
        // In a pod, HOSTNAME is the pod's name: the Events' reporting instance.
        let instance = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
        Ok(Self::start(Arc::new(KubeSink { client }), QUEUE_CAPACITY, CREATE_TIMEOUT, instance))
    }

    /// Starts the background task draining a queue of `capacity` into `sink`.
    pub fn start(
        sink: Arc<dyn EventSink>,
        capacity: usize,
        timeout: Duration,
        instance: Option<String>,
    ) -> Emitter {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        tokio::spawn(drain(rx, sink, timeout, instance, counters.clone()));
        Emitter { tx, counters }
    }

    /// Queues `notice` without waiting; when the queue is full it is dropped and
    /// counted.
    pub(crate) fn emit(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            self.counters.dropped.inc();
        }
    }

    /// Notices waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Registers the `meshca_events_*` metrics.
    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.counters;
        let counters = [
            ("meshca_events_sent", "Kubernetes Events created", &c.sent),
            (
                "meshca_event_errors",
                "Kubernetes Events the API server did not create (error, timeout, unreachable)",
                &c.errors,
            ),
            ("meshca_events_dropped", "Kubernetes Events dropped because the queue was full", &c.dropped),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        // Weak: the registry must not keep the queue (and so its task) alive.
        let tx = self.tx.downgrade();
        let queued = move || tx.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity());
        let queued = move || i64::try_from(queued()).unwrap_or(i64::MAX);
        registry.register(
            "meshca_events_queued",
            "Kubernetes Events waiting to be created",
            ScrapeGauge::new(queued),
        );
    }
}

async fn drain(
    mut rx: mpsc::Receiver<Notice>,
    sink: Arc<dyn EventSink>,
    timeout: Duration,
    instance: Option<String>,
    counters: Arc<Counters>,
) {
    // Log the first failure after a success at warn, the rest at debug: a missing
    // RBAC rule must show once, not once per certificate.
    let mut failing = false;
    while let Some(notice) = rx.recv().await {
        let event = notice.event(instance.as_deref());
        let created = tokio::time::timeout(timeout, sink.create(event)).await.unwrap_or_else(|_| {
            Err(Error::Create {
                reason: format!(
                    "the Kubernetes API server did not answer within {}",
                    humantime::format_duration(timeout)
                ),
            })
        });
        match created {
            Ok(()) => {
                counters.sent.inc();
                failing = false;
            }
            Err(e) => {
                counters.errors.inc();
                let request_id = &notice.request_id;
                if !failing {
                    tracing::warn!(%request_id, error = %e, "Kubernetes Event not created (the audit log has the decision)");
                } else {
                    tracing::debug!(%request_id, error = %e, "Kubernetes Event not created");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Issued, SubjectRecord};
    use std::sync::Mutex;
    use tokio::sync::watch;

    const T: u64 = 1_700_000_000;

    fn record(subject: bool) -> Record {
        let time = UNIX_EPOCH + Duration::from_secs(T);
        let requested = "web.default.serviceaccount.identity.meshca-system.cluster.local".into();
        Record {
            subject: subject.then(|| SubjectRecord {
                namespace: "default".into(),
                service_account: "web".into(),
                pod_name: None,
                pod_uid: None,
                node_os: None,
            }),
            auth_method: Some("tokenreview".into()),
            ..Record::begin(time, "00112233aabbccdd".into(), None, requested)
        }
    }

    fn issued() -> Record {
        Record {
            outcome: Outcome::Issued,
            issued: Some(Issued {
                serial_hex: "01".into(),
                fingerprint_sha256: "ab".repeat(32),
                not_before: UNIX_EPOCH + Duration::from_secs(T),
                not_after: UNIX_EPOCH + Duration::from_secs(T + 86_400),
                issuer_fingerprint_sha256: "cd".repeat(32),
            }),
            ..record(true)
        }
    }

    #[test]
    fn an_issuance_is_a_normal_event_on_the_service_account_with_identity_expiry_and_fingerprint() {
        let event = Notice::issued(&issued()).unwrap().event(Some("meshca-0"));
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        assert_eq!(event.reason.as_deref(), Some(REASON_ISSUED));
        let o = &event.involved_object;
        assert_eq!(
            (o.kind.as_deref(), o.namespace.as_deref(), o.name.as_deref(), o.api_version.as_deref()),
            (Some("ServiceAccount"), Some("default"), Some("web"), Some("v1"))
        );
        assert_eq!(
            event.message.as_deref(),
            Some(
                format!(
                    "issued certificate for web.default.serviceaccount.identity.meshca-system.cluster.local \
                     until 2023-11-15T22:13:20Z: {}",
                    "ab".repeat(32)
                )
                .as_str()
            )
        );
        assert_eq!(event.metadata.name.as_deref(), Some("web.00112233aabbccdd"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(event.first_timestamp.unwrap().0.as_second(), T as i64);
        assert_eq!(event.reporting_instance.as_deref(), Some("meshca-0"));
    }

    #[test]
    fn a_denial_is_a_warning_with_the_reason_code_and_only_when_the_subject_is_known() {
        let notice =
            Notice::denied(&record(true), "identity_mismatch", "the token is for another identity".into());
        let event = notice.unwrap().event(None);
        assert_eq!(
            (event.type_.as_deref(), event.reason.as_deref()),
            (Some("Warning"), Some("IdentityMismatch"))
        );
        assert!(event.message.unwrap().contains(": identity_mismatch: the token is for another identity"));
        assert_eq!(Notice::denied(&record(false), "token_expired", String::new()), None);
        assert_eq!(Notice::issued(&record(true)), None, "a denied record is no issuance");
        let withheld = Notice::issued(&issued()).unwrap().withheld("audit_unavailable", "no audit".into());
        assert_eq!(withheld.event(None).reason.as_deref(), Some("AuditUnavailable"));
    }

    #[test]
    fn names_stay_valid_and_messages_short() {
        assert_eq!(camel_case("csr_key_too_weak"), "CsrKeyTooWeak");
        let long = format!("{}-x", "a".repeat(250));
        let name = event_name(&long, "00112233aabbccdd");
        assert!(name.len() <= 253 && name.ends_with("a.00112233aabbccdd"), "{name}");
        let mut notice = Notice::denied(&record(true), "csr_invalid", "é".repeat(2000)).unwrap();
        notice.identity = "x".into();
        assert!(notice.event(None).message.unwrap().len() <= MAX_MESSAGE);
    }

    /// Records created events; while the gate is closed, each creation waits.
    struct Fake {
        created: Mutex<Vec<Event>>,
        fail: bool,
        gate: watch::Receiver<bool>,
        seen: watch::Sender<usize>,
    }

    impl EventSink for Fake {
        fn create(&self, event: Event) -> CreateFuture<'_> {
            Box::pin(async move {
                let mut gate = self.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
                self.created.lock().unwrap().push(event);
                self.seen.send_modify(|n| *n += 1);
                if self.fail {
                    Err(Error::Create { reason: "answered 403".into() })
                } else {
                    Ok(())
                }
            })
        }
    }

    fn fake(open: bool, fail: bool) -> (Arc<Fake>, watch::Sender<bool>, watch::Receiver<usize>) {
        let (gate_tx, gate) = watch::channel(open);
        let (seen, seen_rx) = watch::channel(0);
        (Arc::new(Fake { created: Mutex::new(Vec::new()), fail, gate, seen }), gate_tx, seen_rx)
    }

    fn metric(emitter: &Emitter, name: &str) -> u64 {
        let out = crate::metrics::render(|r| emitter.register_metrics(r));
        let line =
            out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{out}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn queued_notices_are_created_in_order_and_counted() {
        let (sink, _gate, mut seen) = fake(true, false);
        let emitter = Emitter::start(sink.clone(), 8, Duration::from_secs(5), None);
        emitter.emit(Notice::issued(&issued()).unwrap());
        emitter.emit(Notice::denied(&record(true), "csr_invalid", "bad".into()).unwrap());
        seen.wait_for(|n| *n == 2).await.unwrap();
        // The counter follows the creation; drain is sequential, so one more makes it certain.
        emitter.emit(Notice::issued(&issued()).unwrap());
        seen.wait_for(|n| *n == 3).await.unwrap();
        let reasons: Vec<_> =
            sink.created.lock().unwrap().iter().map(|e| e.reason.clone().unwrap()).collect();
        assert_eq!(reasons, [REASON_ISSUED, "CsrInvalid", REASON_ISSUED]);
        assert!(metric(&emitter, "meshca_events_sent_total") >= 2);
        assert_eq!(metric(&emitter, "meshca_events_dropped_total"), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (sink, gate, mut seen) = fake(false, false);
        let emitter = Emitter::start(sink.clone(), 4, Duration::from_secs(3600), None);
        let notice = Notice::issued(&issued()).unwrap();
        emitter.emit(notice.clone());
        // The first is taken by the task and held at the gate: the queue is empty again.
        tokio::task::yield_now().await;
        for _ in 0..10 {
            emitter.emit(notice.clone());
        }
        assert_eq!(emitter.queued(), 4);
        assert_eq!(metric(&emitter, "meshca_events_dropped_total"), 6);
        assert_eq!(metric(&emitter, "meshca_events_sent_total"), 0);
        gate.send_replace(true);
        seen.wait_for(|n| *n == 5).await.unwrap();
        assert_eq!(sink.created.lock().unwrap().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn creations_that_fail_or_hang_are_counted_as_errors_and_the_queue_moves_on() {
        let (sink, _gate, mut seen) = fake(true, true);
        let emitter = Emitter::start(sink, 8, Duration::from_secs(10), None);
        emitter.emit(Notice::issued(&issued()).unwrap());
        emitter.emit(Notice::issued(&issued()).unwrap());
        seen.wait_for(|n| *n == 2).await.unwrap();
        let (hung, _closed, _) = fake(false, false);
        let stuck = Emitter::start(hung, 8, Duration::from_secs(10), None);
        stuck.emit(Notice::issued(&issued()).unwrap());
        stuck.emit(Notice::issued(&issued()).unwrap());
        // Paused time runs ahead only when every task waits: both creations time out.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(metric(&stuck, "meshca_event_errors_total"), 2);
        assert_eq!(stuck.queued(), 0);
        assert!(metric(&emitter, "meshca_event_errors_total") >= 1);
    }
}
