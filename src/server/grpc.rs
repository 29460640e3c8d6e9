//! Linkerd's identity API (`io.linkerd.proxy.identity.Identity/Certify`), an
//! adapter over the issuance core ([`crate::issuance`]).
//!
//! The request becomes an [`Application`]: the identity asked for, the token, the
//! CSR, the peer's address and TLS chain, and `x-meshca-dry-run: 1` (what `meshca
//! doctor` sends) as a dry run. The [`Decision`] becomes the answer: the leaf, the
//! intermediates and `valid_until`; for a dry run that passed, an empty response
//! tagged `x-meshca-dry-run: passed`; for a refusal, the status `status::Refusal`
//! maps it to. Every answer carries the request id (`x-request-id`, as in the audit
//! record) and the server's time (`x-meshca-time`).

use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;
use tonic::{Request, Response, Status};

use crate::issuance::{Application, Decision, Granted, Issuance, NamePolicy};
use crate::proto::identity_server::Identity;
use crate::proto::{CertifyRequest, CertifyResponse};

pub(crate) use crate::issuance::new_request_id;
pub use crate::issuance::MAX_REQUEST_LEN;

pub(crate) use crate::wire::{DRY_RUN_HEADER, SERVER_TIME_HEADER};

fn unix_millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Tags a response or status with the request id and the server's time.
pub(crate) fn tag(metadata: &mut tonic::metadata::MetadataMap, request_id: &str, now: SystemTime) {
    if let Ok(v) = request_id.parse() {
        metadata.insert(crate::wire::REQUEST_ID_HEADER, v);
    }
    if let Ok(v) = unix_millis(now).to_string().parse() {
        metadata.insert(SERVER_TIME_HEADER, v);
    }
}

/// The Certify answer for `decision`.
fn answer(decision: Decision) -> Result<Response<CertifyResponse>, Status> {
    let Decision { request_id, now, outcome } = decision;
    match outcome {
        Ok(Granted::Issued { leaf, snapshot }) => {
            let intermediates = snapshot.issuer.intermediates();
            let mut response = Response::new(CertifyResponse {
                leaf_certificate: leaf.der.to_vec(),
                intermediate_certificates: intermediates.iter().map(|c| c.to_vec()).collect(),
                valid_until: Some(prost_types::Timestamp::from(leaf.not_after)),
            });
            tag(response.metadata_mut(), &request_id, now);
            Ok(response)
        }
        Ok(Granted::DryRun) => {
            let mut response = Response::new(CertifyResponse::default());
            tag(response.metadata_mut(), &request_id, now);
            response
                .metadata_mut()
                .insert(DRY_RUN_HEADER, tonic::metadata::MetadataValue::from_static("passed"));
            Ok(response)
        }
        Err(refusal) => {
            let mut status = refusal.status(&request_id);
            tag(status.metadata_mut(), &request_id, now);
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl Identity for Arc<Issuance> {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let dry_run = request.metadata().get(DRY_RUN_HEADER).is_some_and(|v| v == "1");
        let req = request.into_inner();
        let application = Application {
            size: req.encoded_len(),
            requested: Some(req.identity),
            naming: NamePolicy::DnsAndSpiffe,
            lifetime: None,
            token: req.token,
            peer_certs,
            csr: req.certificate_signing_request,
            peer,
            dry_run,
        };
        answer(self.decide(application).await)
    }
}
