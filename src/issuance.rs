//! The issuance core: one decision per application for a certificate, whatever API
//! it came through.
//!
//! A front end (`server::grpc` for Linkerd's Certify) turns its request into an
//! [`Application`] — credential (token bytes, or the TLS peer's chain for renewal
//! by proof of possession), requested name, CSR, peer, dry run — and its protocol's
//! answer out of the [`Decision`]. Everything between is here, once:
//! admission (in-flight bound, rate limits) → authenticate (`auth`) → authorize
//! (`identity`) → check the CSR and sign on a signing worker (`ca`) → spend a
//! single-use credential → audit (`audit`) → metrics, log line and Kubernetes
//! Event.
//!
//! `now` is read once, here, and passed down. Every decision, issued or denied, is
//! written to the audit log; a certificate is granted only after its record is
//! durable (fail closed). Refusals are [`Refusal`]s; `status` alone turns them into
//! gRPC statuses. Once recorded, a decision about a known service account is also
//! reported as a Kubernetes Event (`cluster::events`), without waiting for it.
//!
//! A dry run (what `meshca doctor` asks for) runs authenticate, authorize and the
//! CSR check, asks whether a single-use token has a use left (spending none), and
//! stops before signing: nothing is issued. It is audited like any decision, so the
//! chain stays complete: one that passes is recorded with outcome `denied` (no
//! certificate left), code `Ok` and reason `dry_run: …`, counted under that reason
//! and emits no Event; one that is refused gets the usual record, its reason ending
//! in "(dry run)".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use rustls_pki_types::CertificateDer;

use crate::admission::{self, Admission, Scope};
use crate::audit::{self, AuditLog, Outcome, Record, SubjectRecord};
use crate::auth::bootstrap::{self, BootstrapTokens};
use crate::auth::{peer, Authenticator};
use crate::ca::csr::{self, KeyPolicy};
use crate::ca::issuer::Leaf;
use crate::ca::profile::{Lifetimes, Names};
use crate::ca::store::Store;
use crate::clock::Clock;
use crate::cluster::events::{Emitter, Notice};
use crate::cluster::nodes::NodeOs;
use crate::identity::{Identity, Naming};
use crate::metrics::Metrics;
use crate::status::{code_name, Refusal, RequestError};

/// Largest application accepted, as its front end encodes it (a Certify request's
/// protobuf encoding).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// Reason code of the records that count unauthenticated refusals over the quota
/// (`audit::quota`).
pub(crate) const SUPPRESSED_REASON: &str = "suppressed";
/// Largest requested-identity string copied into an audit record.
const MAX_AUDITED_NAME: usize = 256;
/// The shortest lifetime a caller may ask for (`Application::lifetime`); the
/// configured `--issuance-lifetime` is the longest.
pub(crate) const MIN_REQUESTED_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// Reason code of a dry run that passed.
pub(crate) const DRY_RUN_REASON: &str = "dry_run";

/// What the core needs, shared by every application.
pub struct Issuance {
    pub naming: Naming,
    pub store: Arc<Store>,
    /// Every token but bootstrap tokens (`auth`: TokenReview, JWKS, dev).
    pub authenticator: Arc<dyn Authenticator>,
    /// Bootstrap tokens, accepted or refused as not enabled (`auth::bootstrap`).
    pub bootstrap: Arc<BootstrapTokens>,
    pub audit: AuditLog,
    pub clock: Arc<dyn Clock>,
    pub lifetimes: Lifetimes,
    pub key_policy: KeyPolicy,
    pub metrics: Arc<Metrics>,
    /// In-flight bound, rate limits and signing workers (`admission`).
    pub admission: Arc<Admission>,
    /// Reports decisions as Kubernetes Events, when on.
    pub events: Option<Emitter>,
    /// Tells the OS of the caller's node for its audit record, when on.
    pub nodes: Option<Arc<NodeOs>>,
    /// How fast refusals of unauthenticated requests are recorded one by one
    /// (`audit::quota`); [`Issuance::flush_suppressed`] writes the rest's counts.
    pub quota: Arc<audit::quota::Quota>,
}

/// How an API names its leaves (`ca::profile::Names`), from the identity authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NamePolicy {
    /// Linkerd: the DNS name as subject CN and DNS SAN, and the SPIFFE ID as URI SAN.
    DnsAndSpiffe,
    /// Istio: the SPIFFE ID alone, as a (critical) URI SAN; no subject.
    SpiffeOnly,
}

impl NamePolicy {
    /// The names a leaf for `identity` certifies under this policy.
    pub(crate) fn names(self, identity: &Identity) -> Names<'_> {
        let dns_name = match self {
            NamePolicy::DnsAndSpiffe => Some(identity.dns_name.as_str()),
            NamePolicy::SpiffeOnly => None,
        };
        Names { dns_name, spiffe_id: &identity.spiffe_id }
    }

    /// The identity's name in this policy's terms (what a requested name must equal).
    fn name(self, identity: &Identity) -> &str {
        match self {
            NamePolicy::DnsAndSpiffe => &identity.dns_name,
            NamePolicy::SpiffeOnly => &identity.spiffe_id,
        }
    }
}

/// One application for a certificate, as a front end received it.
pub(crate) struct Application {
    /// The name asked for, in the naming policy's terms (Linkerd: the identity's DNS
    /// name; Istio: the SPIFFE ID); it must be the credential's own. `None`: the
    /// credential's own, whatever it is (Istio's CreateCertificate names none).
    pub requested: Option<String>,
    /// What the leaf names.
    pub naming: NamePolicy,
    /// A shorter lifetime than the configured one, if the caller asked for it.
    pub lifetime: Option<std::time::Duration>,
    /// The token as sent (whitespace included); empty to renew by proof of possession.
    pub token: Vec<u8>,
    /// The TLS peer's certificate chain, when it presented one.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The PKCS#10 request, DER.
    pub csr: Vec<u8>,
    pub peer: Option<SocketAddr>,
    /// Check everything, sign nothing.
    pub dry_run: bool,
    /// The application's size as its front end encoded it (bounded by [`MAX_REQUEST_LEN`]).
    pub size: usize,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("requested", &self.requested)
            .field("token", &"...")
            .field("peer", &self.peer)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// What was decided, with what a front end tags its answer with.
pub(crate) struct Decision {
    /// The id in the audit record and the log line.
    pub request_id: String,
    /// The server's time at the decision.
    pub now: SystemTime,
    pub outcome: Result<Granted, Refusal>,
}

/// A decision in the caller's favour.
pub(crate) enum Granted {
    /// A certificate, recorded: the leaf, and the snapshot that signed it (its
    /// issuer's chain, issuer first, and the trust anchors above it).
    Issued { leaf: Leaf, snapshot: Arc<crate::ca::store::Snapshot> },
    /// A dry run that passed: nothing was signed.
    DryRun,
}

/// What a signing worker needs for one request: owned, as it runs on another thread.
struct Job {
    csr: Vec<u8>,
    identity: Identity,
    naming: NamePolicy,
    snapshot: Arc<crate::ca::store::Snapshot>,
    policy: KeyPolicy,
    lifetimes: Lifetimes,
    now: SystemTime,
    /// False for a dry run: check only.
    sign: bool,
}

impl Job {
    /// Checks the CSR against the names and, unless a dry run, signs the leaf.
    fn run(self) -> Result<(csr::KeyType, Option<Leaf>), Refusal> {
        let names = self.naming.names(&self.identity);
        let checked = csr::check(&self.csr, &names, &self.policy).map_err(crate::ca::Error::from)?;
        let leaf = match self.sign {
            true => Some(self.snapshot.issuer.issue(&names, &checked, &self.lifetimes, self.now)?),
            false => None,
        };
        Ok((checked.key_type, leaf))
    }
}

/// A random request id: 16 hex digits.
pub(crate) fn new_request_id() -> String {
    let mut id = [0u8; 8];
    // A failed RNG leaves zeros: the id is for correlation, not security.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    audit::hex(&id)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Issuance {
    /// Decides `app`: admission, the checks, signing, the audit record (durable
    /// before a certificate is granted), metrics, the log line and the Event.
    pub(crate) async fn decide(&self, app: Application) -> Decision {
        let started = Instant::now();
        let _counted = self.metrics.in_flight();
        let now = self.clock.now();
        let request_id = new_request_id();
        let peer = app.peer.map(|a| a.to_string());
        let requested = truncate(app.requested.as_deref().unwrap_or_default(), MAX_AUDITED_NAME);
        let mut record = Record::begin(now, request_id.clone(), peer, requested);
        let decision = match self.admission.enter() {
            Ok(_in_flight) => self.check(&app, now, &mut record).await,
            Err(retry_after) => Err(Refusal::Overloaded { retry_after }),
        };
        // The Event for an issuance (`None` for a denial, or with events off).
        let issued = self.events.as_ref().and_then(|_| Notice::issued(&record));
        // The name the log line gives: the one audited.
        let name = record.requested_identity.clone();
        let outcome = match decision {
            Ok(Granted::DryRun) => {
                record.code = Some(code_name(tonic::Code::Ok).to_owned());
                record.reason = Some(format!(
                    "{DRY_RUN_REASON}: authentication, authorization and the CSR check passed; nothing was signed"
                ));
                let (reason, outcome) = match self.audit.append(record).await {
                    Ok(_) => (DRY_RUN_REASON, Ok(Granted::DryRun)),
                    Err(e) => {
                        tracing::error!(%request_id, error = %e, "audit write failed for a dry run");
                        let refusal = Refusal::from(e);
                        (refusal.reason_code(), Err(refusal))
                    }
                };
                self.finished(&request_id, &name, Some(reason), started);
                outcome
            }
            Ok(granted) => match self.audit.append(record).await {
                Ok(_) => {
                    self.emit(issued);
                    self.finished(&request_id, &name, None, started);
                    Ok(granted)
                }
                Err(e) => {
                    tracing::error!(%request_id, error = %e, "audit write failed; certificate withheld");
                    let refusal = Refusal::from(e);
                    self.emit(issued.map(|n| n.withheld(refusal.reason_code(), refusal.to_string())));
                    self.finished(&request_id, &name, Some(refusal.reason_code()), started);
                    Err(refusal)
                }
            },
            Err(refusal) => {
                let code = refusal.code();
                if code == tonic::Code::Internal {
                    tracing::error!(%request_id, error = %crate::logging::Escaped(&refusal.to_string()), "certify failed");
                }
                record.outcome = Outcome::Denied;
                record.issued = None;
                record.code = Some(code_name(code).to_owned());
                let marker = if app.dry_run { " (dry run)" } else { "" };
                record.reason = Some(format!("{}: {}{marker}", refusal.reason_code(), refusal));
                let notice = (self.events.as_ref())
                    .and_then(|_| Notice::denied(&record, refusal.reason_code(), refusal.to_string()));
                // A caller that proved nothing is recorded one by one only within the quota.
                let anonymous = record.subject.is_none();
                let peer_ip = app.peer.map(|a| a.ip());
                if anonymous && !self.quota.record(peer_ip, now, code_name(code), refusal.reason_code()) {
                    self.metrics.record_suppressed();
                } else if let Err(e) = self.audit.append(record).await {
                    tracing::error!(%request_id, error = %e, "audit write failed for a denial");
                }
                self.emit(notice);
                self.finished(&request_id, &name, Some(refusal.reason_code()), started);
                Err(refusal)
            }
        };
        Decision { request_id, now, outcome }
    }

    /// Authenticate, authorize, check and issue; fills `record` as it learns.
    async fn check(
        &self,
        app: &Application,
        now: SystemTime,
        record: &mut Record,
    ) -> Result<Granted, Refusal> {
        if app.size > MAX_REQUEST_LEN {
            return Err(RequestError::TooLarge { len: app.size, max: MAX_REQUEST_LEN }.into());
        }
        let peer_addr = app.peer.map(|a| a.ip());
        // What this request will cost the workers, charged against the rate limits.
        let cost = admission::cost(csr::peek_key_type(&app.csr, &self.key_policy));
        let mono = tokio::time::Instant::now();
        self.admission
            .check_peer(peer_addr, cost, mono)
            .map_err(|retry_after| Refusal::RateLimited { scope: Scope::Peer, retry_after })?;
        // One snapshot for the whole request: anchors and issuer from the same load.
        let snapshot = self.store.current().ok_or(Refusal::NoIssuer)?;
        let no_token = app.token.iter().all(u8::is_ascii_whitespace);
        let bootstrap_token = bootstrap::is_bootstrap_token(&app.token);
        let subject = match app.peer_certs.as_deref().map(Vec::as_slice) {
            // Renewal by proof of possession: no token, a client certificate.
            Some(chain) if no_token && !chain.is_empty() => {
                record.auth_method = Some("certificate".into());
                peer::authenticate(
                    chain,
                    &snapshot.anchors,
                    &self.naming,
                    now,
                    self.lifetimes.clock_skew_allowance,
                )?
            }
            _ if no_token => return Err(peer::Error::NoCredentials.into()),
            // A bootstrap token (told by its prefix): the single-use path.
            _ if bootstrap_token => {
                record.auth_method = Some(bootstrap::METHOD.to_owned());
                let subject = self.bootstrap.authenticate(&app.token, now)?;
                // Verified: its claimed id is its id.
                record.bootstrap_token_id = bootstrap::claimed_token_id(&app.token);
                subject
            }
            _ => {
                record.auth_method = Some(self.authenticator.name().to_owned());
                self.authenticator.authenticate(&app.token, now).await?
            }
        };
        record.token_issuer = (subject.issuer != peer::CERTIFICATE_ISSUER).then(|| subject.issuer.clone());
        let node_os = match (&self.nodes, &subject.pod_name) {
            (Some(nodes), Some(pod)) => {
                nodes.lookup(&subject.namespace, pod, subject.pod_uid.as_deref()).await
            }
            _ => None,
        };
        record.subject = Some(SubjectRecord {
            namespace: subject.namespace.clone(),
            service_account: subject.service_account.clone(),
            pod_name: subject.pod_name.clone(),
            pod_uid: subject.pod_uid.clone(),
            node_os,
        });
        let identity = match &app.requested {
            // A DNS name is checked as one first (malformed: InvalidArgument).
            Some(requested) if app.naming == NamePolicy::DnsAndSpiffe => {
                self.naming.authorize(&subject, requested)?
            }
            Some(requested) => self.naming.authorize_as(&subject, requested, |id| app.naming.name(id))?,
            None => self.naming.identity(&subject.namespace, &subject.service_account)?,
        };
        if app.requested.is_none() {
            // Named by the credential alone: the audit record names what was issued for.
            record.requested_identity = truncate(app.naming.name(&identity), MAX_AUDITED_NAME);
        }
        self.admission
            .check_identity(&identity.dns_name, cost, mono)
            .map_err(|retry_after| Refusal::RateLimited { scope: Scope::Identity, retry_after })?;
        // The CPU-bound part runs on a signing worker, in arrival order (admitted
        // requests queue there): the CSR check, and unless this is a dry run, the
        // leaf signature.
        // A caller may ask for less than the configured lifetime, never for more.
        let lifetimes = match app.lifetime {
            Some(asked) => Lifetimes {
                issuance_lifetime: asked.clamp(MIN_REQUESTED_LIFETIME, self.lifetimes.issuance_lifetime),
                ..self.lifetimes
            },
            None => self.lifetimes,
        };
        let job = Job {
            csr: app.csr.clone(),
            identity: identity.clone(),
            naming: app.naming,
            snapshot: snapshot.clone(),
            policy: self.key_policy.clone(),
            lifetimes,
            now,
            sign: !app.dry_run,
        };
        let (key_type, leaf) = self.admission.run(move || job.run()).await.map_err(Refusal::Workers)??;
        record.csr_key_type = Some(key_type.label());
        let Some(leaf) = leaf else {
            if bootstrap_token {
                // Where a real request spends the token: would it have a use left?
                self.bootstrap.unspent(&app.token, now).await?;
            }
            return Ok(Granted::DryRun); // checked, nothing signed
        };
        if bootstrap_token {
            // A single-use token is spent only now, every check passed; the leaf
            // leaves only if that succeeds. Spending may wait on the API server, so
            // it happens here, not on a worker.
            self.bootstrap.spend(&app.token, now).await?;
        }
        record.outcome = Outcome::Issued;
        record.issued = Some(audit::Issued {
            serial_hex: audit::hex(&leaf.serial),
            fingerprint_sha256: audit::sha256_hex(&leaf.der),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            issuer_fingerprint_sha256: snapshot.issuer.fingerprint().to_owned(),
        });
        Ok(Granted::Issued { leaf, snapshot })
    }

    /// Counts a decision (`reason`: `None` when issued) and logs its one line, at
    /// debug: request id (as in the audit record), outcome, reason code, requested
    /// identity, latency. Never the token or the CSR.
    fn finished(&self, request_id: &str, identity: &str, reason: Option<&'static str>, started: Instant) {
        let latency = started.elapsed();
        match reason {
            None => self.metrics.record_issued(latency),
            Some(reason) => self.metrics.record_denied(reason, latency),
        }
        tracing::debug!(
            request_id,
            outcome = if reason.is_none() { "issued" } else { "denied" },
            reason = reason.unwrap_or(""),
            // The caller's bytes, quoted and escaped: no forged lines, no terminal escapes.
            identity = %crate::logging::Escaped(&truncate(identity, MAX_AUDITED_NAME)),
            latency_ms = latency.as_secs_f64() * 1e3,
            "certify"
        );
    }

    /// Writes one `suppressed` record for each peer whose unauthenticated refusals
    /// went over the quota since the last flush: how many, since when, the last reason.
    pub(crate) async fn flush_suppressed(&self) {
        for s in self.quota.flush() {
            let now = self.clock.now();
            let peer = s.peer.map(|ip| ip.to_string());
            let mut record =
                Record::begin(now, format!("suppressed-{}", new_request_id()), peer, String::new());
            record.code = Some(s.code);
            let since = humantime::format_rfc3339_millis(s.since);
            record.reason = Some(format!(
                "{SUPPRESSED_REASON}: {} refusals of unauthenticated requests from this address since {since} \
                 were not recorded one by one (over the quota); the last: {}",
                s.count, s.reason
            ));
            if let Err(e) = self.audit.append(record).await {
                tracing::error!(error = %e, count = s.count, "audit write failed for the suppressed refusals' count");
            }
        }
    }

    /// Queues an Event for a recorded decision; never waits.
    fn emit(&self, notice: Option<Notice>) {
        if let (Some(events), Some(notice)) = (&self.events, notice) {
            events.emit(notice);
        }
    }
}
