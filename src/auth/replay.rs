//! Where the uses of bootstrap tokens are recorded, so a token is spent at most as
//! often as it allows (`super::bootstrap`), also across restarts and replicas.
//!
//! - [`LeaseReplayStore`] (Kubernetes, any number of replicas): one
//!   `coordination.k8s.io/v1` Lease per use, in the control-plane namespace, named
//!   `meshca-bootstrap-JTI-K` for use K (0-based). A use is spent by creating the
//!   Leases K = 0, 1, … in order until one is created: the API server's
//!   create-if-absent decides between replicas racing for the same use (one gets
//!   201, the others 409 AlreadyExists and try the next K). When every K up to
//!   `uses` exists, the token is used up. Any other answer, or none within
//!   [`LEASE_TIMEOUT`] (all of them within [`CONSUME_TIMEOUT`]), refuses the
//!   request: fail closed. Leases are labelled
//!   `app.kubernetes.io/managed-by: meshca`, `meshca.io/bootstrap-token: JTI` and
//!   `meshca.io/bootstrap-expires: UNIX_SECONDS` (when the token stops being
//!   accepted anyway); [`LeaseReplayStore::cleanup`] deletes those past that time by
//!   more than [`CLEANUP_GRACE`], every [`CLEANUP_INTERVAL`].
//! - [`FileReplayStore`] (dev mode, or one replica on one host): one JSON line per
//!   spent use, appended and synced before the use counts, read back at start
//!   (entries past their expiry dropped, the file rewritten). An in-process mutex
//!   orders uses; nothing orders two processes, so two servers must never share
//!   the file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use super::Error;
use crate::clock::Clock;

/// Why a use could not be spent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Every use of the token has been spent.
    #[error("the token has been used as often as it allows")]
    Used,
    /// The store could not record the use (unreachable, refused, failing): nothing
    /// is issued without a record.
    #[error("{reason}")]
    Unavailable { reason: String },
}

impl From<ReplayError> for Error {
    fn from(e: ReplayError) -> Error {
        match e {
            ReplayError::Used => Error::BootstrapTokenUsed,
            ReplayError::Unavailable { reason } => {
                Error::Unavailable { reason: format!("cannot record the bootstrap token's use: {reason}") }
            }
        }
    }
}

pub(crate) type ConsumeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ReplayError>> + Send + 'a>>;

/// The record of spent uses.
pub trait ReplayStore: Send + Sync + 'static {
    /// Spends one of the `uses` uses of token `jti`, which no verifier accepts
    /// after `expires` (so the record need not outlive it).
    fn consume<'a>(&'a self, jti: &'a str, uses: u32, expires: SystemTime) -> ConsumeFuture<'a>;
    /// Whether token `jti` still has one of its `uses` left, recording nothing:
    /// `Err(Used)` when all are spent. For an early, accurate refusal (a dry run
    /// above all); only [`Self::consume`] decides, atomically, for a real request.
    fn check<'a>(&'a self, jti: &'a str, uses: u32) -> ConsumeFuture<'a>;
    /// Short name for logs: "file", "kubernetes".
    fn name(&self) -> &'static str;
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Uses recorded in a file, for one process.
pub(crate) struct FileReplayStore {
    path: PathBuf,
    state: Arc<Mutex<FileState>>,
}

struct FileState {
    file: File,
    /// jti → (uses spent, expiry in Unix seconds).
    used: HashMap<String, (u32, u64)>,
    /// An append failed and may have left a partial line: no more appends.
    poisoned: bool,
}

impl std::fmt::Debug for FileReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReplayStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// One line of the file: one spent use.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    jti: String,
    #[serde(rename = "use")]
    index: u32,
    expires: u64,
}

impl FileReplayStore {
    /// Opens (or creates, mode 0600, with its directory) the file at `path` and
    /// reads the uses in it; uses of tokens expired at `now` are dropped and the
    /// file rewritten without them. A last line without its newline (a write cut
    /// short, never acknowledged) is dropped too; any other unreadable line refuses
    /// the start, since forgetting a use would allow a replay.
    pub(crate) fn open(path: &Path, now: SystemTime) -> Result<FileReplayStore, Error> {
        let config = |what: String| Error::Config {
            reason: format!("bootstrap token replay file {}: {what}", path.display()),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| config(format!("cannot create its directory: {e}")))?;
        }
        let mut used: HashMap<String, (u32, u64)> = HashMap::new();
        let mut rewrite = false;
        match File::open(path) {
            Ok(file) => {
                let mut reader = std::io::BufReader::new(file);
                let mut line = Vec::new();
                let mut number = 0;
                loop {
                    line.clear();
                    let read = reader
                        .read_until(b'\n', &mut line)
                        .map_err(|e| config(format!("cannot read: {e}")))?;
                    if read == 0 {
                        break;
                    }
                    number += 1;
                    let Some(complete) = line.strip_suffix(b"\n") else {
                        rewrite = true; // a torn last write
                        break;
                    };
                    let entry: Line = serde_json::from_slice(complete).map_err(|_| {
                        config(format!("line {number} is not a recorded use; repair or remove it"))
                    })?;
                    if entry.expires < unix_seconds(now) {
                        rewrite = true;
                        continue;
                    }
                    let spent = used.entry(entry.jti).or_insert((0, entry.expires));
                    spent.0 += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(config(format!("cannot read: {e}"))),
        }
        if rewrite {
            let mut text = String::new();
            for (jti, (count, expires)) in &used {
                for index in 0..*count {
                    let line = Line { jti: jti.clone(), index, expires: *expires };
                    text.push_str(&serde_json::to_string(&line).unwrap_or_default());
                    text.push('\n');
                }
            }
            crate::files::write_atomic(path, text.as_bytes(), crate::files::Access::Private)
                .map_err(|e| config(format!("cannot rewrite: {e}")))?;
        }
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|e| config(format!("cannot open: {e}")))?;
        let state = FileState { file, used, poisoned: false };
        Ok(FileReplayStore { path: path.to_owned(), state: Arc::new(Mutex::new(state)) })
    }

    fn consume_now(
        state: &Mutex<FileState>,
        path: &Path,
        jti: &str,
        uses: u32,
        expires: u64,
    ) -> Result<(), ReplayError> {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if state.poisoned {
            return Err(ReplayError::Unavailable {
                reason: format!(
                    "an earlier write to {} failed; restart meshca once it can be written",
                    path.display()
                ),
            });
        }
        let spent = state.used.get(jti).map_or(0, |(count, _)| *count);
        if spent >= uses {
            return Err(ReplayError::Used);
        }
        let line = Line { jti: jti.to_owned(), index: spent, expires };
        let mut text =
            serde_json::to_vec(&line).map_err(|e| ReplayError::Unavailable { reason: e.to_string() })?;
        text.push(b'\n');
        if let Err(e) = state.file.write_all(&text).and_then(|()| state.file.sync_data()) {
            state.poisoned = true;
            return Err(ReplayError::Unavailable { reason: format!("cannot write {}: {e}", path.display()) });
        }
        state.used.insert(jti.to_owned(), (spent + 1, expires));
        Ok(())
    }
}

impl ReplayStore for FileReplayStore {
    fn consume<'a>(&'a self, jti: &'a str, uses: u32, expires: SystemTime) -> ConsumeFuture<'a> {
        let (state, path, jti, expires) =
            (self.state.clone(), self.path.clone(), jti.to_owned(), unix_seconds(expires));
        Box::pin(async move {
            // The write and its fsync block: off the async workers.
            tokio::task::spawn_blocking(move || Self::consume_now(&state, &path, &jti, uses, expires))
                .await
                .unwrap_or_else(|e| Err(ReplayError::Unavailable { reason: e.to_string() }))
        })
    }

    fn check<'a>(&'a self, jti: &'a str, uses: u32) -> ConsumeFuture<'a> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let spent = state.used.get(jti).map_or(0, |(count, _)| *count);
        Box::pin(std::future::ready(if spent >= uses { Err(ReplayError::Used) } else { Ok(()) }))
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

/// Bound on each Lease call (create, list, delete), connecting included.
pub(crate) const LEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on spending one use, however many Leases that takes.
pub(crate) const CONSUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired Leases are looked for.
pub(crate) const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// How long past its expiry label a Lease is kept, for replicas whose clocks lag.
pub(crate) const CLEANUP_GRACE: Duration = Duration::from_secs(3600);
/// Label naming the token a Lease records a use of.
pub(crate) const TOKEN_LABEL: &str = "meshca.io/bootstrap-token";
/// Label holding the Unix second after which the token is refused anyway.
pub(crate) const EXPIRES_LABEL: &str = "meshca.io/bootstrap-expires";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca");

/// Uses recorded as Leases through the Kubernetes API: shared by every replica.
pub struct LeaseReplayStore {
    api: Api<Lease>,
    namespace: String,
    /// This replica (the pod's name), written as each Lease's holder.
    holder: Option<String>,
}

impl std::fmt::Debug for LeaseReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseReplayStore").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// Why a Lease call failed, in words; API server bodies are not quoted.
fn lease_error(e: &kube::Error, verb: &str) -> String {
    match e {
        kube::Error::Api(status) if status.code == 403 => format!(
            "the Kubernetes API server answered 403 to {verb} a Lease: meshca's service account needs \
             leases create, list and delete in its namespace (deploy/base/rbac.yaml, Role meshca-bootstrap)"
        ),
        kube::Error::Api(status) => {
            format!("the Kubernetes API server answered {} to {verb} a Lease", status.code)
        }
        other => super::discovery::unreachable_reason(other, &format!(" ({verb} a Lease)")),
    }
}

impl LeaseReplayStore {
    /// Builds a client from `kubeconfig` (else `KUBECONFIG`, `~/.kube/config` or
    /// in-cluster) for Leases in `namespace`.
    pub async fn connect(kubeconfig: Option<&Path>, namespace: &str) -> Result<LeaseReplayStore, Error> {
        let config = super::discovery::kube_config(kubeconfig, "record bootstrap token uses in").await?;
        let client = super::discovery::kube_client(config, LEASE_TIMEOUT)?;
        Ok(Self::new(client, namespace))
    }

    pub fn new(client: kube::Client, namespace: &str) -> LeaseReplayStore {
        // In a pod, HOSTNAME is the pod's name.
        let holder = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
        LeaseReplayStore { api: Api::namespaced(client, namespace), namespace: namespace.to_owned(), holder }
    }

    /// The Lease recording use `index` of token `jti`.
    pub fn lease_name(jti: &str, index: u32) -> String {
        format!("meshca-bootstrap-{jti}-{index}")
    }

    fn lease(&self, jti: &str, index: u32, expires: u64) -> Lease {
        let labels = [
            (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            (TOKEN_LABEL.to_owned(), jti.to_owned()),
            (EXPIRES_LABEL.to_owned(), expires.to_string()),
        ];
        Lease {
            metadata: ObjectMeta {
                name: Some(Self::lease_name(jti, index)),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels.into_iter().collect()),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: self.holder.clone(), ..Default::default() }),
        }
    }

    async fn spend(&self, jti: &str, uses: u32, expires: u64) -> Result<(), ReplayError> {
        let unavailable = |reason| ReplayError::Unavailable { reason };
        for index in 0..uses {
            let created = tokio::time::timeout(
                LEASE_TIMEOUT,
                self.api.create(&PostParams::default(), &self.lease(jti, index, expires)),
            )
            .await;
            match created {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(kube::Error::Api(status)))
                    if status.code == 409 && status.reason == "AlreadyExists" => {}
                Ok(Err(e)) => return Err(unavailable(lease_error(&e, "create"))),
                Err(_) => {
                    return Err(unavailable(format!(
                        "the Kubernetes API server did not answer a Lease creation within {}",
                        humantime::format_duration(LEASE_TIMEOUT)
                    )))
                }
            }
        }
        Err(ReplayError::Used)
    }

    /// Deletes the Leases of tokens that expired more than [`CLEANUP_GRACE`] before
    /// `now`; returns how many. Leases without a readable expiry label are kept.
    pub async fn cleanup(&self, now: SystemTime) -> Result<usize, ReplayError> {
        let unavailable = |reason| ReplayError::Unavailable { reason };
        let selector = format!("{}={},{EXPIRES_LABEL}", MANAGED_BY.0, MANAGED_BY.1);
        let listed =
            tokio::time::timeout(LEASE_TIMEOUT, self.api.list(&ListParams::default().labels(&selector)))
                .await
                .map_err(|_| {
                    unavailable("the Kubernetes API server did not answer a Lease list in time".into())
                })?
                .map_err(|e| unavailable(lease_error(&e, "list")))?;
        let cutoff = unix_seconds(now).saturating_sub(CLEANUP_GRACE.as_secs());
        let mut deleted = 0;
        for lease in listed.items {
            let labels = lease.metadata.labels.unwrap_or_default();
            let expires = labels.get(EXPIRES_LABEL).and_then(|v| v.parse::<u64>().ok());
            let (Some(expires), Some(name)) = (expires, lease.metadata.name) else { continue };
            if expires >= cutoff {
                continue;
            }
            match tokio::time::timeout(LEASE_TIMEOUT, self.api.delete(&name, &DeleteParams::default())).await
            {
                Ok(Ok(_)) => deleted += 1,
                Ok(Err(kube::Error::Api(status))) if status.code == 404 => {} // another replica was first
                Ok(Err(e)) => return Err(unavailable(lease_error(&e, "delete"))),
                Err(_) => {
                    return Err(unavailable(
                        "the Kubernetes API server did not answer a Lease deletion in time".into(),
                    ))
                }
            }
        }
        Ok(deleted)
    }

    /// Runs [`Self::cleanup`] every [`CLEANUP_INTERVAL`] (the first one at once) for
    /// as long as the store is in use; the task ends once it has been dropped.
    pub(crate) fn spawn_cleanup(self: &Arc<Self>, clock: Arc<dyn Clock>) {
        let store: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(live) = store.upgrade() else { return };
                match live.cleanup(clock.now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "deleted the Leases of expired bootstrap tokens"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot clean up the Leases of expired bootstrap tokens")
                    }
                }
                drop(live);
                tokio::time::sleep(CLEANUP_INTERVAL).await;
            }
        });
    }
}

impl ReplayStore for LeaseReplayStore {
    fn consume<'a>(&'a self, jti: &'a str, uses: u32, expires: SystemTime) -> ConsumeFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(CONSUME_TIMEOUT, self.spend(jti, uses, unix_seconds(expires)))
                .await
                .unwrap_or_else(|_| {
                    Err(ReplayError::Unavailable {
                        reason: format!(
                            "recording the use took longer than {}",
                            humantime::format_duration(CONSUME_TIMEOUT)
                        ),
                    })
                })
        })
    }

    fn check<'a>(&'a self, jti: &'a str, uses: u32) -> ConsumeFuture<'a> {
        Box::pin(async move {
            let selector = format!("{}={},{TOKEN_LABEL}={jti}", MANAGED_BY.0, MANAGED_BY.1);
            let listed =
                tokio::time::timeout(LEASE_TIMEOUT, self.api.list(&ListParams::default().labels(&selector)))
                    .await
                    .map_err(|_| ReplayError::Unavailable {
                        reason: "the Kubernetes API server did not answer a Lease list in time".into(),
                    })?
                    .map_err(|e| ReplayError::Unavailable { reason: lease_error(&e, "list") })?;
            if listed.items.len() >= uses as usize {
                Err(ReplayError::Used)
            } else {
                Ok(())
            }
        })
    }

    fn name(&self) -> &'static str {
        "kubernetes"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const JTI: &str = "0123456789abcdef0123456789abcdef";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn the_file_store_spends_each_use_once_and_remembers_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/bootstrap-used.jsonl");
        let store = FileReplayStore::open(&path, at(1000)).unwrap();
        store.consume(JTI, 2, at(5000)).await.unwrap();
        store.consume(JTI, 2, at(5000)).await.unwrap();
        assert_eq!(store.consume(JTI, 2, at(5000)).await, Err(ReplayError::Used));
        store.consume("ffffffffffffffffffffffffffffffff", 1, at(2000)).await.unwrap();
        drop(store);
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 3, "{lines}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // Reopened after the second token expired: it is dropped from the file, the first is kept.
        let store = FileReplayStore::open(&path, at(3000)).unwrap();
        assert_eq!(store.consume(JTI, 2, at(5000)).await, Err(ReplayError::Used));
        assert_eq!(store.consume(JTI, 3, at(5000)).await, Ok(()), "a third use of a three-use token");
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(!lines.contains("ffff"), "{lines}");
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped_but_a_corrupt_line_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("used.jsonl");
        let good = format!("{{\"jti\":\"{JTI}\",\"use\":0,\"expires\":5000}}\n");
        std::fs::write(&path, format!("{good}{{\"jti\":\"ab")).unwrap();
        let store = FileReplayStore::open(&path, at(1000)).unwrap();
        assert_eq!(store.consume(JTI, 1, at(5000)).await, Err(ReplayError::Used));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        drop(store);
        std::fs::write(&path, format!("garbage\n{good}")).unwrap();
        let err = FileReplayStore::open(&path, at(1000)).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("used.jsonl"), "{err}");
    }

    #[test]
    #[cfg(unix)]
    fn a_file_that_cannot_be_read_refuses_the_start_and_debug_names_only_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("used.jsonl");
        // A symbolic link to itself: opening it fails, and not because it is missing.
        std::os::unix::fs::symlink("used.jsonl", &path).unwrap();
        let err = FileReplayStore::open(&path, at(1000)).unwrap_err().to_string();
        assert!(err.contains("used.jsonl: cannot read:"), "{err}");
        // A use is kept through its token's last second and dropped after it.
        let path = dir.path().join("kept.jsonl");
        let good = format!("{{\"jti\":\"{JTI}\",\"use\":0,\"expires\":5000}}\n");
        std::fs::write(&path, &good).unwrap();
        drop(FileReplayStore::open(&path, at(5000)).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        drop(FileReplayStore::open(&path, at(5001)).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let path = dir.path().join("fresh.jsonl");
        let store = FileReplayStore::open(&path, at(1000)).unwrap();
        assert_eq!(format!("{store:?}"), format!("FileReplayStore {{ path: {path:?}, .. }}"));
        assert_eq!(store.name(), "file");
    }

    #[tokio::test]
    async fn the_lease_store_names_itself_and_its_namespace_only() {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let store = LeaseReplayStore::new(kube::Client::try_from(config).unwrap(), "meshca-system");
        assert_eq!(format!("{store:?}"), "LeaseReplayStore { namespace: \"meshca-system\", .. }");
        assert_eq!(store.name(), "kubernetes");
    }

    #[tokio::test]
    async fn a_lease_names_the_use_its_token_expiry_and_the_replica_that_spent_it() {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let mut store = LeaseReplayStore::new(kube::Client::try_from(config).unwrap(), "meshca-system");
        store.holder = Some("meshca-7c9d-x2k4".into());
        let lease = store.lease(JTI, 3, 5000);
        assert_eq!(lease.metadata.name.as_deref(), Some(&*format!("meshca-bootstrap-{JTI}-3")));
        assert_eq!(lease.metadata.namespace.as_deref(), Some("meshca-system"));
        let labels = lease.metadata.labels.unwrap();
        assert_eq!(labels[TOKEN_LABEL], JTI);
        assert_eq!(labels[EXPIRES_LABEL], "5000");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "meshca");
        assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("meshca-7c9d-x2k4"));
    }

    #[tokio::test]
    async fn concurrent_uses_of_one_token_spend_each_use_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileReplayStore::open(&dir.path().join("used.jsonl"), at(1000)).unwrap());
        let tries: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.consume(JTI, 3, at(5000)).await })
            })
            .collect();
        let mut spent = 0;
        for t in tries {
            if t.await.unwrap().is_ok() {
                spent += 1;
            }
        }
        assert_eq!(spent, 3);
    }

    #[test]
    fn lease_names_are_valid_object_names() {
        let name = LeaseReplayStore::lease_name(JTI, 99);
        assert_eq!(name, format!("meshca-bootstrap-{JTI}-99"));
        assert!(crate::identity::check_label(&name).is_ok(), "{name}");
        assert_eq!(Error::from(ReplayError::Used).code(), "bootstrap_token_used");
        let e = Error::from(ReplayError::Unavailable { reason: "down".into() });
        assert_eq!((e.code(), e.to_string().contains("down")), ("backend_unavailable", true));
    }
}
