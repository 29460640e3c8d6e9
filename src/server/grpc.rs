//! The Certify handler: runs one request through the pipeline.
//!
//! transport (limits, request id) → authenticate (`auth`) → authorize
//! (`identity`) → check CSR and issue (`ca`) → audit (`audit`) → respond.
//!
//! `now` is read once, here, and passed down. Every decision, issued or denied, is
//! written to the audit log; an issued certificate is returned only after its record
//! is durable (fail closed). Status codes come from `status::Refusal` alone. Once
//! recorded, a decision about a known service account is also reported as a
//! Kubernetes Event (`events`), without waiting for it.
//!
//! A request with the header `x-meshca-dry-run: 1` (what `meshca doctor` sends) runs
//! authenticate, authorize and the CSR check, asks whether a single-use token has a
//! use left (spending none), and stops before signing: nothing is issued. It is audited like any decision, so the chain stays complete: one that
//! passes is recorded with outcome `denied` (no certificate left), code `Ok` and
//! reason `dry_run: …`, counted under that reason, emits no Event, and is answered
//! with an empty response tagged `x-meshca-dry-run: passed`; one that is refused
//! gets the usual status and record, its reason ending in "(dry run)".

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use prost::Message;
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditLog, Outcome, Record, SubjectRecord};
use crate::auth::{peer, Authenticator};
use crate::ca::csr::{self, Expected, KeyPolicy};
use crate::ca::profile::Lifetimes;
use crate::ca::store::Store;
use crate::clock::Clock;
use crate::identity::Naming;
use crate::proto::identity_server::Identity;
use crate::proto::{CertifyRequest, CertifyResponse};
use crate::server::admission::{self, Admission, Scope};
use crate::server::events::{Emitter, Notice};
use crate::server::metrics::Metrics;
use crate::server::nodes::NodeOs;
use crate::status::{code_name, Refusal, RequestError};
use rustls_pki_types::CertificateDer;

/// Largest Certify request accepted (encoded protobuf).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Largest requested-identity string copied into an audit record.
const MAX_AUDITED_NAME: usize = 256;

/// What the handler needs, shared by every request.
pub struct Certifier {
    pub naming: Naming,
    pub store: Arc<Store>,
    pub authenticator: Arc<dyn Authenticator>,
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
}

/// What a signing worker needs for one request: owned, as it runs on another thread.
struct Job {
    csr: Vec<u8>,
    identity: crate::identity::Identity,
    snapshot: Arc<crate::ca::store::Snapshot>,
    policy: KeyPolicy,
    lifetimes: Lifetimes,
    now: SystemTime,
    /// False for a dry run: check only.
    sign: bool,
}

impl Job {
    /// Checks the CSR against the identity and, unless a dry run, signs the leaf.
    fn run(self) -> Result<(csr::KeyType, Option<crate::ca::issuer::Leaf>), Refusal> {
        let expected = Expected { dns_name: &self.identity.dns_name, spiffe_id: &self.identity.spiffe_id };
        let checked = csr::check(&self.csr, &expected, &self.policy).map_err(crate::ca::Error::from)?;
        let leaf = match self.sign {
            true => Some(self.snapshot.issuer.issue(&self.identity, &checked, &self.lifetimes, self.now)?),
            false => None,
        };
        Ok((checked.key_type, leaf))
    }
}

/// Response header carrying the server's wall-clock time at the request, in Unix
/// milliseconds, so clients can estimate their clock offset.
pub const SERVER_TIME_HEADER: &str = "x-meshca-time";
/// Request header asking for a dry run (value `1`); the answer's header says `passed`.
pub const DRY_RUN_HEADER: &str = "x-meshca-dry-run";
/// Reason code of a dry run that passed.
pub const DRY_RUN_REASON: &str = "dry_run";

fn unix_millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Tags a response or status with the request id and the server's time.
fn tag(metadata: &mut tonic::metadata::MetadataMap, request_id: &str, now: SystemTime) {
    if let Ok(v) = request_id.parse() {
        metadata.insert("x-request-id", v);
    }
    if let Ok(v) = unix_millis(now).to_string().parse() {
        metadata.insert(SERVER_TIME_HEADER, v);
    }
}

/// A random request id: 16 hex digits.
pub fn new_request_id() -> String {
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

impl Certifier {
    /// Authenticate, authorize, check and issue; fills `record` as it learns.
    async fn decide(
        &self,
        req: &CertifyRequest,
        peer_addr: Option<std::net::IpAddr>,
        peer_certs: Option<&[CertificateDer<'static>]>,
        dry_run: bool,
        now: SystemTime,
        record: &mut Record,
    ) -> Result<CertifyResponse, Refusal> {
        let len = req.encoded_len();
        if len > MAX_REQUEST_LEN {
            return Err(RequestError::TooLarge { len, max: MAX_REQUEST_LEN }.into());
        }
        // What this request will cost the workers, charged against the rate limits.
        let cost = admission::cost(csr::peek_key_type(&req.certificate_signing_request, &self.key_policy));
        let mono = tokio::time::Instant::now();
        self.admission
            .check_peer(peer_addr, cost, mono)
            .map_err(|retry_after| Refusal::RateLimited { scope: Scope::Peer, retry_after })?;
        // One snapshot for the whole request: anchors and issuer from the same load.
        let snapshot = self.store.current().ok_or(Refusal::NoIssuer)?;
        let no_token = req.token.iter().all(u8::is_ascii_whitespace);
        let subject = match peer_certs {
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
            _ => {
                record.auth_method = Some(self.authenticator.method(&req.token).to_owned());
                let subject = self.authenticator.authenticate(&req.token, now).await?;
                record.bootstrap_token_id = self.authenticator.token_id(&req.token);
                subject
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
        let identity = self.naming.authorize(&subject, &req.identity)?;
        self.admission
            .check_identity(&identity.dns_name, cost, mono)
            .map_err(|retry_after| Refusal::RateLimited { scope: Scope::Identity, retry_after })?;
        // The CPU-bound part runs on a signing worker, in arrival order (admitted
        // requests queue there): the CSR check, and unless this is a dry run, the
        // leaf signature.
        let job = Job {
            csr: req.certificate_signing_request.clone(),
            identity: identity.clone(),
            snapshot: snapshot.clone(),
            policy: self.key_policy.clone(),
            lifetimes: self.lifetimes,
            now,
            sign: !dry_run,
        };
        let (key_type, leaf) = self.admission.run(move || job.run()).await.map_err(Refusal::Workers)??;
        record.csr_key_type = Some(key_type.label());
        let Some(leaf) = leaf else {
            if !no_token {
                // Where a real request spends a single-use token: would it have a use left?
                self.authenticator.check_commit(&req.token, now).await?;
            }
            return Ok(CertifyResponse::default()); // dry run: checked, nothing signed
        };
        if !no_token {
            // A single-use token (bootstrap) is spent only now, every check passed;
            // the leaf leaves only if that succeeds. Spending may wait on the API
            // server, so it happens here, not on a worker.
            self.authenticator.commit(&req.token, now).await?;
        }
        record.outcome = Outcome::Issued;
        record.issued = Some(audit::Issued {
            serial_hex: audit::hex(&leaf.serial),
            fingerprint_sha256: audit::sha256_hex(&leaf.der),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            issuer_fingerprint_sha256: snapshot.issuer.fingerprint().to_owned(),
        });
        Ok(CertifyResponse {
            leaf_certificate: leaf.der.to_vec(),
            intermediate_certificates: snapshot.issuer.intermediates().iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp::from(leaf.not_after)),
        })
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
            identity = %truncate(identity, MAX_AUDITED_NAME),
            latency_ms = latency.as_secs_f64() * 1e3,
            "certify"
        );
    }

    /// Queues an Event for a recorded decision; never waits.
    fn emit(&self, notice: Option<Notice>) {
        if let (Some(events), Some(notice)) = (&self.events, notice) {
            events.emit(notice);
        }
    }
}

#[tonic::async_trait]
impl Identity for Arc<Certifier> {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let started = Instant::now();
        let _counted = self.metrics.in_flight();
        let now = self.clock.now();
        let request_id = new_request_id();
        let peer_addr = request.remote_addr();
        let peer = peer_addr.map(|a| a.to_string());
        let peer_certs = request.peer_certs();
        let dry_run = request.metadata().get(DRY_RUN_HEADER).is_some_and(|v| v == "1");
        let req = request.into_inner();
        let mut record = Record {
            time: now,
            request_id: request_id.clone(),
            peer,
            requested_identity: truncate(&req.identity, MAX_AUDITED_NAME),
            subject: None,
            auth_method: None,
            token_issuer: None,
            bootstrap_token_id: None,
            csr_key_type: None,
            outcome: Outcome::Denied,
            code: None,
            reason: None,
            issued: None,
        };

        let decision = match self.admission.enter() {
            Ok(_in_flight) => {
                let certs = peer_certs.as_deref().map(Vec::as_slice);
                self.decide(&req, peer_addr.map(|a| a.ip()), certs, dry_run, now, &mut record).await
            }
            Err(retry_after) => Err(Refusal::Overloaded { retry_after }),
        };
        // The Event for an issuance (`None` for a denial, or with events off).
        let issued = self.events.as_ref().and_then(|_| Notice::issued(&record));
        let result = match decision {
            Ok(response) if dry_run => {
                record.code = Some(code_name(tonic::Code::Ok).to_owned());
                record.reason = Some(format!(
                    "{DRY_RUN_REASON}: authentication, authorization and the CSR check passed; nothing was signed"
                ));
                let (reason, answer) = match self.audit.append(record).await {
                    Ok(_) => {
                        let mut response = Response::new(response);
                        tag(response.metadata_mut(), &request_id, now);
                        response
                            .metadata_mut()
                            .insert(DRY_RUN_HEADER, tonic::metadata::MetadataValue::from_static("passed"));
                        (DRY_RUN_REASON, Ok(response))
                    }
                    Err(e) => {
                        tracing::error!(%request_id, error = %e, "audit write failed for a dry run");
                        let refusal = Refusal::from(e);
                        let mut status = refusal.status(&request_id);
                        tag(status.metadata_mut(), &request_id, now);
                        (refusal.reason_code(), Err(status))
                    }
                };
                self.finished(&request_id, &req.identity, Some(reason), started);
                answer
            }
            Ok(response) => match self.audit.append(record).await {
                Ok(_) => {
                    self.emit(issued);
                    self.finished(&request_id, &req.identity, None, started);
                    let mut response = Response::new(response);
                    tag(response.metadata_mut(), &request_id, now);
                    Ok(response)
                }
                Err(e) => {
                    tracing::error!(%request_id, error = %e, "audit write failed; certificate withheld");
                    let refusal = Refusal::from(e);
                    self.emit(issued.map(|n| n.withheld(refusal.reason_code(), refusal.to_string())));
                    self.finished(&request_id, &req.identity, Some(refusal.reason_code()), started);
                    let mut status = refusal.status(&request_id);
                    tag(status.metadata_mut(), &request_id, now);
                    Err(status)
                }
            },
            Err(refusal) => {
                let code = refusal.code();
                if code == tonic::Code::Internal {
                    tracing::error!(%request_id, error = %refusal, "certify failed");
                }
                record.outcome = Outcome::Denied;
                record.issued = None;
                record.code = Some(code_name(code).to_owned());
                let marker = if dry_run { " (dry run)" } else { "" };
                record.reason = Some(format!("{}: {}{marker}", refusal.reason_code(), refusal));
                let notice = (self.events.as_ref())
                    .and_then(|_| Notice::denied(&record, refusal.reason_code(), refusal.to_string()));
                if let Err(e) = self.audit.append(record).await {
                    tracing::error!(%request_id, error = %e, "audit write failed for a denial");
                }
                self.emit(notice);
                self.finished(&request_id, &req.identity, Some(refusal.reason_code()), started);
                let mut status = refusal.status(&request_id);
                tag(status.metadata_mut(), &request_id, now);
                Err(status)
            }
        };
        result
    }
}
