//! The operating system of the node a caller's pod runs on, for its audit record
//! (`subject.node_os`): the `kubernetes.io/os` label of the node named by the
//! pod's `spec.nodeName`, read with `GET /api/v1/namespaces/NS/pods/NAME` and
//! `GET /api/v1/nodes/NODE` through the Kubernetes API client.
//!
//! Policy:
//! - asked only when the token names the pod; a pod whose uid is not the token's
//!   (deleted, and re-created under the same name) has no node OS here;
//! - answers are cached: pod → node for [`POD_TTL`] (a pod never changes node),
//!   node → OS for [`NODE_TTL`], and failures (not found, forbidden, timed out)
//!   for [`FAILURE_TTL`], so a missing RBAC rule costs one call per pod and node
//!   per minute, not one per request; at most [`MAX_ENTRIES`] per cache (when
//!   full, expired entries are swept and, failing that, new answers not kept);
//! - each lookup is bounded by a timeout, and a failure only leaves the field out:
//!   it never refuses or fails a request.
//!
//! The label is the kubelet's word, not the workload's proof: it describes, it
//! does not authorize. Nothing here decides anything about issuance.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use tokio::time::Instant;

use crate::metrics::{Counter, Registry};

/// The node label holding the operating system (`linux`, `windows`).
pub(crate) const OS_LABEL: &str = "kubernetes.io/os";
/// How long a pod's node is kept.
pub(crate) const POD_TTL: Duration = Duration::from_secs(3600);
/// How long a node's OS is kept.
pub(crate) const NODE_TTL: Duration = Duration::from_secs(3600);
/// How long a failed lookup is kept.
pub(crate) const FAILURE_TTL: Duration = Duration::from_secs(60);
/// Bound on the lookups of one request, both calls included.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on each cache's entries.
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// Why node OSes cannot be looked up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No Kubernetes client could be built (configuration, kubeconfig).
    #[error("node OS lookups: {reason}")]
    Client { reason: String },
}

/// A pod, as the token names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodKey {
    namespace: String,
    name: String,
}

/// A pod's node name and uid; `None` when the lookup failed.
type PodAnswer = Option<(String, Option<String>)>;

struct Entry<V> {
    value: V,
    until: Instant,
}

/// A small TTL map on the monotonic clock.
struct Cache<K, V> {
    map: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Eq + Hash, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache { map: Mutex::new(HashMap::new()) }
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).filter(|e| e.until > Instant::now()).map(|e| e.value.clone())
    }

    fn put(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| e.until > now);
        }
        if map.len() < MAX_ENTRIES {
            map.insert(key, Entry { value, until: now + ttl });
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: Counter,
    failures: Counter,
}

/// Finds and caches node operating systems.
pub struct NodeOs {
    client: kube::Client,
    pods: Cache<PodKey, PodAnswer>,
    nodes: Cache<String, Option<String>>,
    counters: Counters,
}

impl fmt::Debug for NodeOs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeOs").field("counters", &self.counters).finish_non_exhaustive()
    }
}

impl NodeOs {
    /// Builds a Kubernetes client from `kubeconfig` (or `KUBECONFIG`,
    /// `~/.kube/config`, in-cluster).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<NodeOs, Error> {
        let client = async {
            let config = crate::auth::discovery::kube_config(kubeconfig, "look up pods and nodes on").await?;
            crate::auth::discovery::kube_client(config, LOOKUP_TIMEOUT)
        };
        let client = client.await.map_err(|e| Error::Client { reason: super::events::client_reason(e) })?;
        Ok(Self::new(client))
    }

    pub fn new(client: kube::Client) -> NodeOs {
        NodeOs { client, pods: Cache::new(), nodes: Cache::new(), counters: Counters::default() }
    }

    /// The OS of the node pod `namespace/name` (uid `uid`, when the token says) runs
    /// on; `None` when it cannot be told within [`LOOKUP_TIMEOUT`].
    pub async fn lookup(&self, namespace: &str, name: &str, uid: Option<&str>) -> Option<String> {
        tokio::time::timeout(LOOKUP_TIMEOUT, self.find(namespace, name, uid)).await.ok().flatten()
    }

    async fn find(&self, namespace: &str, name: &str, uid: Option<&str>) -> Option<String> {
        let key = PodKey { namespace: namespace.to_owned(), name: name.to_owned() };
        let pod = match self.pods.get(&key) {
            Some(answer) => answer,
            None => {
                let answer = self.pod(namespace, name).await;
                let ttl = if answer.is_some() { POD_TTL } else { FAILURE_TTL };
                self.pods.put(key, answer.clone(), ttl);
                answer
            }
        };
        let (node, pod_uid) = pod?;
        if uid.is_some_and(|uid| pod_uid.as_deref() != Some(uid)) {
            return None;
        }
        match self.nodes.get(&node) {
            Some(os) => os,
            None => {
                let os = self.node(&node).await;
                let ttl = if os.is_some() { NODE_TTL } else { FAILURE_TTL };
                self.nodes.put(node, os.clone(), ttl);
                os
            }
        }
    }

    async fn pod(&self, namespace: &str, name: &str) -> PodAnswer {
        self.counters.calls.inc();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match api.get(name).await {
            Ok(pod) => {
                let node = pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty());
                if node.is_none() {
                    self.failed("the pod is not scheduled on a node");
                }
                node.map(|node| (node, pod.metadata.uid))
            }
            Err(e) => {
                self.failed(&describe(&e, "pods"));
                None
            }
        }
    }

    async fn node(&self, name: &str) -> Option<String> {
        self.counters.calls.inc();
        let api: Api<Node> = Api::all(self.client.clone());
        match api.get(name).await {
            Ok(node) => {
                let os = node.metadata.labels.and_then(|mut labels| labels.remove(OS_LABEL));
                if os.is_none() {
                    self.failed("the node has no kubernetes.io/os label");
                }
                os
            }
            Err(e) => {
                self.failed(&describe(&e, "nodes"));
                None
            }
        }
    }

    fn failed(&self, reason: &str) {
        // Warn on the first failure only: a missing RBAC rule must show once.
        if self.counters.failures.inc() == 0 {
            tracing::warn!(reason, "cannot tell the node OS for audit records (they will lack node_os)");
        } else {
            tracing::debug!(reason, "node OS lookup failed");
        }
    }

    /// Registers the `meshca_node_os_*` metrics.
    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "meshca_node_os_lookups",
            "Pod and node GETs made to tell node OSes",
            self.counters.calls.clone(),
        );
        registry.register(
            "meshca_node_os_lookup_failures",
            "Pod and node lookups that told no OS (not found, forbidden, unlabelled, unreachable)",
            self.counters.failures.clone(),
        );
    }
}

/// A failed GET in words; bodies are not quoted.
fn describe(e: &kube::Error, resource: &str) -> String {
    match e {
        kube::Error::Api(status) if status.code == 403 => {
            format!("the Kubernetes API server answered 403: meshca may not get {resource}")
        }
        kube::Error::Api(status) => format!("the Kubernetes API server answered {}", status.code),
        other => {
            let mut cause: &dyn std::error::Error = other;
            while let Some(source) = cause.source() {
                cause = source;
            }
            cause.to_string().chars().take(200).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cached_answers_expire_with_their_ttl_and_a_full_cache_keeps_no_new_one() {
        let cache: Cache<u32, &str> = Cache::new();
        cache.put(1, "linux", Duration::from_secs(60));
        assert_eq!(cache.get(&1), Some("linux"));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(cache.get(&1), None);
        let full: Cache<usize, ()> = Cache::new();
        for i in 0..MAX_ENTRIES {
            full.put(i, (), Duration::from_secs(10));
        }
        full.put(MAX_ENTRIES, (), Duration::from_secs(10));
        assert_eq!(full.get(&MAX_ENTRIES), None, "nothing valid is evicted");
        tokio::time::advance(Duration::from_secs(10)).await;
        full.put(MAX_ENTRIES, (), Duration::from_secs(10));
        assert_eq!(full.get(&MAX_ENTRIES), Some(()), "expired entries made room");
    }
}
