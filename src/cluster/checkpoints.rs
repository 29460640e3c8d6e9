//! The audit log's signed checkpoints, kept where a verifier can read them later:
//! one ConfigMap per log in the control-plane namespace, `meshca-audit-<log id>`,
//! whose `checkpoint` key holds the latest signed note (and whose annotation
//! `meshca.io/audit-origin` names the log). A verifier with `get` on ConfigMaps
//! fetches it with
//! `kubectl get configmap meshca-audit-ID -o jsonpath='{.data.checkpoint}'`.
//!
//! Applied with server-side apply (one PATCH creates or replaces it). The audit
//! writer's publisher thread only hands the latest note over ([`Publisher::hook`],
//! a watch channel: a newer note replaces one not yet sent) and never waits; one
//! task applies it, each call bounded by [`APPLY_TIMEOUT`]. Failures are logged and
//! counted, and the next checkpoint tries again: the file beside the log and the
//! `audit checkpoint` log line carry every checkpoint regardless.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;

use crate::audit::checkpoint::Checkpoint;
use crate::metrics::{Counter, Registry};

/// Bound on one apply, connecting included.
pub(crate) const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Field manager of the applied ConfigMaps.
const MANAGER: &str = "meshca";

/// The ConfigMap that holds the checkpoints of the log with this id.
pub fn configmap_name(log_id: &str) -> String {
    format!("meshca-audit-{log_id}")
}

#[derive(Debug, Default)]
struct Counters {
    applied: Counter,
    errors: Counter,
}

type Latest = Option<(String, String)>;

/// Hands checkpoints to the apply task. Made before the audit log opens (its hook
/// goes with the log); [`Publisher::connect`] starts the task later, and a
/// checkpoint handed over before then waits for it.
pub struct Publisher {
    tx: Arc<watch::Sender<Latest>>,
    rx: std::sync::Mutex<Option<watch::Receiver<Latest>>>,
    counters: Arc<Counters>,
}

impl Default for Publisher {
    fn default() -> Self {
        let (tx, rx) = watch::channel(None);
        Publisher { tx: Arc::new(tx), rx: std::sync::Mutex::new(Some(rx)), counters: Arc::default() }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("counters", &self.counters).finish_non_exhaustive()
    }
}

impl Publisher {
    /// Builds a Kubernetes client from `kubeconfig` (or `KUBECONFIG`, `~/.kube/config`,
    /// in-cluster) and starts the task applying ConfigMaps in `namespace` (once; a
    /// second call does nothing).
    pub async fn connect(
        &self,
        kubeconfig: Option<&Path>,
        namespace: &str,
    ) -> Result<(), crate::auth::Error> {
        let config = crate::auth::discovery::kube_config(kubeconfig, "publish audit checkpoints to").await?;
        let client = crate::auth::discovery::kube_client(config, APPLY_TIMEOUT)?;
        let rx = self.rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(rx) = rx {
            let api: Api<ConfigMap> = Api::namespaced(client, namespace);
            tokio::spawn(apply_each(api, rx, self.counters.clone()));
        }
        Ok(())
    }

    /// The hook for `audit::Checkpoints::also`: hands the note over, never waits.
    pub fn hook(&self) -> crate::audit::PublishHook {
        let tx = self.tx.clone();
        Arc::new(move |cp: &Checkpoint, note: &str| {
            tx.send_replace(Some((cp.log_id().to_owned(), note.to_owned())));
        })
    }

    /// Registers `meshca_audit_checkpoints_applied_total` and `…_apply_errors_total`.
    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "meshca_audit_checkpoints_applied",
            "audit checkpoints written to their ConfigMap",
            self.counters.applied.clone(),
        );
        registry.register(
            "meshca_audit_checkpoint_apply_errors",
            "audit checkpoints the Kubernetes API server did not store (error, timeout, unreachable)",
            self.counters.errors.clone(),
        );
    }
}

/// The ConfigMap for one log's latest checkpoint.
fn configmap(log_id: &str, origin: &str, note: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(configmap_name(log_id)),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "meshca".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "audit-checkpoint".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([("meshca.io/audit-origin".to_owned(), origin.to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("checkpoint".to_owned(), note.to_owned())])),
        ..Default::default()
    }
}

async fn apply_each(api: Api<ConfigMap>, mut rx: watch::Receiver<Latest>, counters: Arc<Counters>) {
    // A checkpoint handed over before the task started counts as changed.
    rx.mark_changed();
    while rx.changed().await.is_ok() {
        let Some((log_id, note)) = rx.borrow_and_update().clone() else { continue };
        let origin = note.lines().next().unwrap_or_default().to_owned();
        let mut object = configmap(&log_id, &origin, &note);
        object.metadata.namespace = None;
        let params = PatchParams::apply(MANAGER).force();
        let name = configmap_name(&log_id);
        let applied =
            tokio::time::timeout(APPLY_TIMEOUT, api.patch(&name, &params, &Patch::Apply(&object))).await;
        match applied {
            Ok(Ok(_)) => {
                counters.applied.inc();
            }
            Ok(Err(e)) => {
                counters.errors.inc();
                let reason = match &e {
                    kube::Error::Api(status) if status.code == 403 => {
                        "the Kubernetes API server answered 403: meshca's service account may not create and \
                         patch configmaps in its namespace (grant them, see deploy/base/rbac.yaml)"
                            .to_owned()
                    }
                    kube::Error::Api(status) => format!("the Kubernetes API server answered {}", status.code),
                    other => format!(
                        "cannot reach the Kubernetes API server ({})",
                        crate::logging::Escaped(&other.to_string())
                    ),
                };
                tracing::warn!(configmap = %name, %reason, "cannot store the audit checkpoint; the next one tries again");
            }
            Err(_) => {
                counters.errors.inc();
                tracing::warn!(configmap = %name, "storing the audit checkpoint timed out; the next one tries again");
            }
        }
    }
}
