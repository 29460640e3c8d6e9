//! Istio's certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`),
//! an adapter over the issuance core ([`crate::issuance`]), served on the gRPC port
//! beside Linkerd's Certify: one CA, one trust domain and one audit log for both meshes.
//!
//! The request becomes an [`Application`] named by the SPIFFE ID alone
//! ([`NamePolicy::SpiffeOnly`]): the caller's token from `authorization: Bearer
//! TOKEN` (none: renewal by proof of possession with its current certificate), the
//! PEM CSR as DER (a CSR that is not PEM goes on as it is and is refused by the CSR
//! check, audited like any other refusal), `subject_id` when an older client sends
//! one, and `validity_duration` as the lifetime asked for. The [`Decision`] becomes
//! `cert_chain`: the leaf, the issuer chain and the root it ends in, PEM; or the
//! status `status::Refusal` maps the refusal to. Answers carry `x-request-id` and
//! `x-meshca-time` as Certify's do, and `x-meshca-dry-run: 1` works the same way.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tonic::{Request, Response, Status};

use super::grpc::{tag, DRY_RUN_HEADER};
use crate::ca::material::{csr_from_pem, to_pem, without_byte_order_marks};
use crate::issuance::{Application, Decision, Granted, Issuance, NamePolicy};
use crate::istio::istio_certificate_service_server::IstioCertificateService;
use crate::istio::{IstioCertificateRequest, IstioCertificateResponse};

/// The token's request metadata, as Istio's agents send it: `Bearer TOKEN`.
const AUTHORIZATION: &str = "authorization";

/// The token in `authorization: Bearer TOKEN` (the scheme in any case); the whole
/// value when it names no scheme; empty without the header.
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Vec<u8> {
    let Some(value) = metadata.get(AUTHORIZATION) else { return Vec::new() };
    let value = value.as_bytes();
    match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value[7..].to_vec(),
        _ => value.to_vec(),
    }
}

/// The CreateCertificate answer for `decision`.
fn answer(decision: Decision) -> Result<Response<IstioCertificateResponse>, Status> {
    let Decision { request_id, now, outcome } = decision;
    let mut response = match outcome {
        Ok(Granted::Issued { leaf, snapshot }) => {
            let intermediates = snapshot.issuer.intermediates();
            let chain = std::iter::once(&leaf.der).chain(intermediates);
            let cert_chain = chain.chain(&snapshot.root).map(|c| to_pem("CERTIFICATE", c)).collect();
            Response::new(IstioCertificateResponse { cert_chain })
        }
        Ok(Granted::DryRun) => {
            let mut response = Response::new(IstioCertificateResponse::default());
            response
                .metadata_mut()
                .insert(DRY_RUN_HEADER, tonic::metadata::MetadataValue::from_static("passed"));
            response
        }
        Err(refusal) => {
            let mut status = refusal.status(&request_id);
            tag(status.metadata_mut(), &request_id, now);
            return Err(status);
        }
    };
    tag(response.metadata_mut(), &request_id, now);
    Ok(response)
}

#[tonic::async_trait]
impl IstioCertificateService for Arc<Issuance> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let dry_run = request.metadata().get(DRY_RUN_HEADER).is_some_and(|v| v == "1");
        let token = bearer(request.metadata());
        let req = request.into_inner();
        let size = req.encoded_len().saturating_add(token.len());
        let pem = without_byte_order_marks(req.csr.as_bytes());
        let csr = csr_from_pem(&pem).unwrap_or_else(|_| req.csr.into_bytes());
        let lifetime = u64::try_from(req.validity_duration).ok().filter(|s| *s > 0).map(Duration::from_secs);
        let application = Application {
            requested: (!req.subject_id.is_empty()).then_some(req.subject_id),
            naming: NamePolicy::SpiffeOnly,
            lifetime,
            token,
            peer_certs,
            csr,
            peer,
            dry_run,
            size,
        };
        answer(self.decide(application).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_read_from_a_bearer_authorization_in_any_case() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert!(bearer(&metadata).is_empty());
        for (value, token) in
            [("Bearer abc.def", "abc.def"), ("bearer x", "x"), ("BEARER y", "y"), ("abc", "abc")]
        {
            metadata.insert(AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&metadata), token.as_bytes(), "{value}");
        }
    }
}
