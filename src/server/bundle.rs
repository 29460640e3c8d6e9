//! The TrustBundle service (`meshca.v1.TrustBundle/Get`): the trust anchors of
//! the current snapshot, on the same gRPC port as Certify.
//!
//! Clients write the bundle out as the roots their proxy trusts (the agent's
//! `ca.crt`). It follows the trust-anchor file as the reloader last loaded it, so
//! during a root rotation it carries the old and the new root. Anchors are public:
//! Get needs no credentials, issues nothing and is not audited. A refusal (no
//! snapshot loaded) goes through `status::Refusal` like any other.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::ca::store::Store;
use crate::server::grpc::new_request_id;
use crate::status::Refusal;
use crate::v1::trust_bundle_server::TrustBundle;
use crate::v1::{GetTrustBundleRequest, GetTrustBundleResponse};

/// Serves the anchors of whatever snapshot is current at each call.
#[derive(Debug)]
pub(crate) struct Bundles {
    pub store: Arc<Store>,
}

#[tonic::async_trait]
impl TrustBundle for Bundles {
    async fn get(
        &self,
        _request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<GetTrustBundleResponse>, Status> {
        let snapshot = self.store.current().ok_or_else(|| Refusal::NoIssuer.status(&new_request_id()))?;
        let trust_anchors = snapshot.anchors.certificates().iter().map(|c| c.to_vec()).collect();
        Ok(Response::new(GetTrustBundleResponse { trust_anchors }))
    }
}
