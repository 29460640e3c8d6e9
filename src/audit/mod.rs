//! Tamper-evident audit log of Certify decisions.
//!
//! The audit log owns one append-only sink (a file, or standard output) and
//! one writer thread. Every Certify decision, issued or denied, becomes one
//! JSON object on one line, with these fields in this order (absent ones are
//! omitted): `seq` (1 for the first record of a file), `prev_hash` (hash of
//! the previous record, 64 zeros for seq 1), `time` (RFC 3339 UTC, millis),
//! `request_id`, `peer`, `requested_identity`, `subject` (`namespace`,
//! `service_account`, `pod_name`, `pod_uid`, and `node_os`: the
//! `kubernetes.io/os` label of the pod's node, when `--audit-node-os` could tell
//! it), `auth_method` (how the caller
//! proved who it is: `jwks`, `tokenreview`, `certificate`, `bootstrap`), `token_issuer`,
//! `bootstrap_token_id` (the `jti` of a bootstrap token), `csr_key_type`,
//! `outcome` (`issued` | `denied`), `code` (gRPC status code name),
//! `reason`, `serial` (hex), `fingerprint_sha256` (hex SHA-256 of the leaf
//! DER), `not_before`, `not_after` (RFC 3339), `issuer_fingerprint_sha256`,
//! and last `hash`.
//!
//! Hash rule: serialise every field but `hash` as compact JSON text B; `hash`
//! is the lowercase hex SHA-256 of B's bytes; the line is B with its closing
//! `}` replaced by `,"hash":"<hex>"}` plus `\n`. A verifier strips that suffix,
//! restores the `}` and re-hashes the exact bytes, so no JSON
//! re-serialisation is involved. Chaining `seq` and `prev_hash` makes edited,
//! deleted, inserted, reordered and truncated records detectable ([`verify`]).
//! Caller strings are JSON-escaped, so no record can span two lines.
//!
//! Durability and fail-closed policy: [`AuditLog::append`] returns only after
//! the record is written and synced (`sync_data` for a file, `flush` for
//! stdout); a caller must not hand out a certificate unless it returned `Ok`.
//! When a batch fails (write error, disk full, file size limit, fsync error),
//! every append in it is refused, the file is cut back at once to the length
//! it had before the batch (no partial line, no unsynced record stays), and
//! [`AuditLog::is_failing`] turns true. The log is not poisoned: the next
//! append tries again, first cutting the file back to that length again, then
//! writing a `gap` record (below) before its own records; without appends the
//! writer retries on its own every second (writing just the `gap` record), so
//! a replica that readiness took out of traffic recovers too. Until a batch is
//! durable, every append is refused: no certificate without a durable record.
//!
//! The file under the path is checked before every batch (unix: device and
//! inode of the path against those of the open file; elsewhere: the path
//! still exists). When it was renamed away (log rotation) or removed, the
//! path is opened anew (created if missing, or its chain continued if a file
//! is there) and the new file starts with a `continued` record naming the
//! last record of the previous one. Records written to a file removed during
//! the write (its link count is 0 after the sync) are refused like a failed
//! write. A path that cannot be opened (its directory gone, a directory in
//! its place) is a failing sink like any other, retried with each append.
//!
//! Records the writer adds on its own account have `request_id`, `outcome`
//! and `reason`, no `requested_identity`, and are hashed and chained like any
//! other (fields in this order after `reason`):
//!
//! - `outcome: "gap"`, `request_id: "audit-gap"`: decisions are missing here.
//!   After a failing period: `refused` (appends refused, none of which handed
//!   out a certificate), `failing_since` (RFC 3339, the first failure) and
//!   `error` (the first failure's error). After an interrupted write found at
//!   open (a final line without newline, e.g. after SIGKILL or power loss
//!   mid-batch, which was never acknowledged, so no certificate left for it):
//!   `torn_bytes`, the length of the fragment that was cut off.
//! - `outcome: "continued"`, `request_id: "audit-continued"`: first record of
//!   a file opened because the previous one was renamed away or removed;
//!   `previous_file` (`renamed` | `removed`), `previous_seq` and
//!   `previous_hash` (the previous file's last record, 0 and 64 zeros if it
//!   had none), so an operator can join the files. Its own chain starts anew
//!   (seq 1 in a new file), so each file verifies on its own.
//!
//! [`verify`] counts gap records and their refused appends, reports the
//! continuation, and reports a final line without newline as an incomplete
//! tail (an interrupted write; the next open cuts it off) rather than as
//! corruption, unless it is a complete record that fails its hash or chain.
//! [`AuditLog::open`] likewise cuts off such a fragment (logging a warning and
//! writing a `gap` record) and refuses a tail that is really corrupt.
//!
//! Group commit: the writer thread takes every record queued at that moment,
//! assigns seq/prev_hash/hash in queue order, writes the whole batch with one
//! write and one sync, then answers each waiter. Blocking I/O and fsync run
//! on that dedicated thread, never on the async workers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, SystemClock};

/// Queue depth between handlers and the writer thread (also the largest batch).
const CAPACITY: usize = 4096;
/// `prev_hash` of the first record.
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Text that precedes the hex digest at the end of every line.
const HASH_KEY: &[u8] = b",\"hash\":\"";
/// Read size when an existing file is read through at open.
const READ_CHUNK: usize = 64 * 1024;
/// A last line longer than this is treated as corrupt rather than loaded.
const MAX_LINE: usize = 1 << 20;
/// While failing, the writer retries on its own this long after the last attempt.
const RETRY_WHILE_FAILING: Duration = Duration::from_secs(1);
/// `request_id` of the records the writer adds on its own account.
const GAP_ID: &str = "audit-gap";
const CONTINUED_ID: &str = "audit-continued";
const UNCOVERED_ID: &str = "audit-uncovered";

/// Decision recorded in `outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Issued,
    Denied,
}

/// Workload the token was issued to (the `subject` object).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SubjectRecord {
    pub namespace: String,
    pub service_account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The OS of the node the pod runs on, as its `kubernetes.io/os` label says
    /// (looked up from the API server, not vouched for by the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_os: Option<String>,
}

/// One decision, as the handler fills it in (seq/prev_hash/hash are assigned by the writer).
#[derive(Clone, Debug)]
pub struct Record {
    pub time: SystemTime,
    pub request_id: String,
    pub peer: Option<String>,
    pub requested_identity: String,
    pub subject: Option<SubjectRecord>,
    /// How the caller authenticated: the authenticator's name, or `certificate`.
    pub auth_method: Option<String>,
    pub token_issuer: Option<String>,
    /// The id (`jti`) of the bootstrap token presented, once it verified.
    pub bootstrap_token_id: Option<String>,
    pub csr_key_type: Option<String>,
    pub outcome: Outcome,
    pub code: Option<String>,
    pub reason: Option<String>,
    pub issued: Option<Issued>,
}

impl Record {
    /// What is known of a decision before any stage has run: when, which request,
    /// from where, for which name; denied until a stage says otherwise.
    pub fn begin(
        time: SystemTime,
        request_id: String,
        peer: Option<String>,
        requested_identity: String,
    ) -> Record {
        Record {
            time,
            request_id,
            peer,
            requested_identity,
            subject: None,
            auth_method: None,
            token_issuer: None,
            bootstrap_token_id: None,
            csr_key_type: None,
            outcome: Outcome::Denied,
            code: None,
            reason: None,
            issued: None,
        }
    }
}

/// The certificate handed out, for `issued` records.
#[derive(Clone, Debug)]
pub struct Issued {
    pub serial_hex: String,
    pub fingerprint_sha256: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issuer_fingerprint_sha256: String,
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `-` means standard output; anything else is a file path.
    pub fn parse(s: &str) -> Sink {
        if s == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(s))
        }
    }
}

/// Why the audit log could not be opened or could not record a decision.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file (or its parent directory) could not be created, opened or read.
    #[error("cannot open audit log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// Writing or syncing the batch holding this record failed (or the sink
    /// is still failing): it is not durable. The next append tries again.
    #[error("cannot write audit log: {source}")]
    Write { source: io::Error },
    /// The existing file fails verification (`error` names the first broken record):
    /// meshca does not append to a log it cannot vouch for.
    #[error(
        "audit log {} is broken: {error}; refusing to extend it. Keep it as evidence: move it aside \
         (with its .checkpoint), check it with `meshca audit verify`, and start a new log with --audit-new-log",
        path.display()
    )]
    Broken { path: PathBuf, error: String },
    /// The log disagrees with its last signed checkpoint (`problem` says how), or
    /// the checkpoint cannot be read or is not signed by the audit key.
    #[error(
        "audit log {} disagrees with its signed checkpoint {}: {problem}. Refusing to extend it: keep both as \
         evidence (move them aside) and start a new log with --audit-new-log, whose first record names the checkpoint",
        path.display(), checkpoint.display()
    )]
    Checkpoint { path: PathBuf, checkpoint: PathBuf, problem: String },
    /// The audit signing key cannot be used.
    #[error("--audit-signing-key: {0}")]
    SigningKey(String),
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {source}")]
    Spawn { source: io::Error },
    /// The writer has stopped (after `close`, or it is gone).
    #[error("audit log is closed")]
    Closed,
    /// Another process holds the log's lock file: two writers would interleave
    /// their chains. `holder` is what that process wrote there (its pid).
    #[error(
        "audit log {} is in use by another meshca (pid {holder}, holding {}): two writers would break its chain; \
         stop that process, or give this one another --audit-log (or --data-dir)",
        path.display(), lock.display()
    )]
    InUse { path: PathBuf, lock: PathBuf, holder: String },
}

/// Position given to an appended record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: String,
}

enum Msg {
    Append(Box<Record>, oneshot::Sender<Result<Appended, Error>>),
    Close(oneshot::Sender<Result<(), Error>>),
    /// Test hook: make every file sync fail (`true`) or not.
    FailSyncs(bool, oneshot::Sender<()>),
}

/// Handle to the writer thread; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    failures: Arc<AtomicU64>,
    /// Appends that returned `Ok` (written and synced).
    written: Arc<AtomicU64>,
    /// Set by the writer when a write fails, cleared when one succeeds.
    failing: Arc<AtomicBool>,
}

/// Exit status of a process whose audit writer died (`EX_SOFTWARE`).
pub const EXIT_AUDIT_WRITER_DIED: i32 = 70;

/// Runs the writer; if it panics anyway, the process exits with
/// [`EXIT_AUDIT_WRITER_DIED`] rather than live on unable to issue (every append would
/// be [`Error::Closed`]): the orchestrator restarts it, and the next start continues
/// the chain from the file, repairing an interrupted last line.
fn supervised(run: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"meshca: the audit writer died; exiting so that a restart continues the audit log\n",
        );
        std::process::exit(EXIT_AUDIT_WRITER_DIED);
    }
}

impl AuditLog {
    /// Opens the sink and continues its chain. A file is first locked (an
    /// exclusive lock on `PATH.lock`, which holds this process's pid) until the log
    /// is closed: a second writer, here or in another process, would interleave its
    /// chain with this one's and is refused with [`Error::InUse`]. A file is opened in append
    /// mode, created with mode 0600 (unix) along with its parent directories;
    /// an existing file is read through (every record's hash and chain, and the
    /// Merkle tree) and gives the seq and hash to continue from; an empty file
    /// starts at seq 1. A final line without newline (an interrupted write) is
    /// cut off and a `gap` record written in its place; any record with a
    /// malformed hash suffix, a wrong digest or a broken chain is
    /// [`Error::Broken`], and the file is left as it is. With checkpoints, the
    /// file is first checked against its last signed checkpoint (see `checkpointer`). Standard output
    /// always starts a new chain at seq 1. The writer runs on a dedicated
    /// thread, so this works under any tokio runtime flavour.
    pub async fn open(sink: Sink) -> Result<AuditLog, Error> {
        AuditLog::open_with(sink, None).await
    }

    /// [`AuditLog::open`] with signed checkpoints (see `checkpointer`): a file is
    /// first checked against its last checkpoint and refused if it disagrees.
    pub async fn open_with(sink: Sink, checkpoints: Option<Checkpoints>) -> Result<AuditLog, Error> {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let writer_failing = failing.clone();
        std::thread::Builder::new()
            .name("meshca-audit".into())
            .spawn(move || match Writer::open(sink, writer_failing, checkpoints) {
                Ok(writer) => supervised(|| writer.run(rx, ready_tx)),
                Err(e) => drop(ready_tx.send(Err(e))),
            })
            .map_err(|source| Error::Spawn { source })?;
        ready_rx.await.unwrap_or(Err(Error::Closed))?;
        Ok(AuditLog { tx, failures: Arc::new(AtomicU64::new(0)), written: Arc::default(), failing })
    }

    /// Appends one record and returns only once it is written and synced,
    /// with its seq and hash. On `Err` the decision is not recorded: fail closed.
    pub async fn append(&self, record: Record) -> Result<Appended, Error> {
        let (tx, rx) = oneshot::channel();
        let result = match self.tx.send(Msg::Append(Box::new(record), tx)).await {
            Ok(()) => rx.await.unwrap_or(Err(Error::Closed)),
            Err(_) => Err(Error::Closed),
        };
        match &result {
            Ok(_) => self.written.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failures.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Writes what is queued before it, syncs and stops the writer; later
    /// appends return [`Error::Closed`]. Closing a closed log is `Ok`. Closing
    /// a failing log tries once more to record the gap, and reports
    /// [`Error::Write`] if that fails too.
    pub async fn close(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).await.is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// Appends that returned an error since open, whatever the cause.
    pub(crate) fn write_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Appends that returned `Ok` since open: records written and synced.
    pub(crate) fn records_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// True while the sink is failing: the last write failed and no write has
    /// succeeded since. Readiness reads this.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Test hook for the one sink failure that cannot be produced on demand
    /// with real files: from now on every file sync fails with an I/O error
    /// after the write went through (`true`), or syncs work again (`false`).
    /// Applied before any append queued after this call. No effect on stdout.
    #[doc(hidden)]
    pub async fn fail_syncs(&self, fail: bool) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::FailSyncs(fail, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("failing", &self.is_failing()).finish_non_exhaustive()
    }
}

pub mod checkpoint;
mod checkpointer;
mod format;
pub mod merkle;
mod open;
pub mod prove;
pub mod quota;
mod verify;
mod writer;

pub use crate::digest::{hex, sha256_hex};
use checkpointer::*;
pub use checkpointer::{checkpoint_path, Checkpoints, PublishHook, DEFAULT_EVERY, DEFAULT_INTERVAL};
use format::*;
use open::*;
pub(crate) use verify::scan;
pub use verify::{verify, verify_file, Continuation, VerifyError, VerifyReport};
use writer::*;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + 250)
    }

    fn record(i: u64) -> Record {
        let issued = i % 2 == 1;
        Record {
            time: at(1_700_000_000 + i),
            request_id: format!("req-{i}"),
            peer: Some("10.0.0.7:41234".into()),
            requested_identity: "web.shop.serviceaccount.identity.linkerd.cluster.local".into(),
            subject: Some(SubjectRecord {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod_name: Some("web-1".into()),
                pod_uid: None,
                node_os: Some("linux".into()),
            }),
            auth_method: Some("tokenreview".into()),
            token_issuer: Some("https://kubernetes.default.svc".into()),
            bootstrap_token_id: None,
            csr_key_type: Some("p256".into()),
            outcome: [Outcome::Denied, Outcome::Issued][usize::from(issued)],
            code: (!issued).then(|| "PermissionDenied".into()),
            reason: (!issued).then(|| "token audience mismatch".into()),
            issued: issued.then(|| Issued {
                serial_hex: format!("{i:032x}"),
                fingerprint_sha256: sha256_hex(b"leaf"),
                not_before: at(1_700_000_000),
                not_after: at(1_700_086_400),
                issuer_fingerprint_sha256: sha256_hex(b"issuer"),
            }),
        }
    }

    async fn log_with(dir: &Path, n: u64) -> PathBuf {
        let path = dir.join("audit").join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        for i in 1..=n {
            assert_eq!(log.append(record(i)).await.unwrap().seq, i);
        }
        log.close().await.unwrap();
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().split_inclusive('\n').map(String::from).collect()
    }

    /// Writes 5 records, applies `edit` to the lines and returns the broken line number.
    async fn tampered(edit: impl FnOnce(&mut Vec<String>)) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5).await;
        let mut lines = lines(&path);
        edit(&mut lines);
        std::fs::write(&path, lines.concat()).unwrap();
        match verify_file(&path) {
            Err(VerifyError::Broken { line, .. }) => line,
            other => panic!("expected a broken log, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn appended_records_verify_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        let tasks: Vec<_> = (1..=100)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(record(i)).await.unwrap() })
            })
            .collect();
        let mut appended = Vec::new();
        for task in tasks {
            appended.push(task.await.unwrap());
        }
        log.close().await.unwrap();
        let report = verify_file(&path).unwrap();
        assert_eq!(report.records, 100);
        appended.sort_by_key(|a| a.seq);
        assert_eq!(appended.iter().map(|a| a.seq).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());
        assert_eq!(report.last_hash.as_deref(), Some(appended[99].hash.as_str()));
        for (line, a) in lines(&path).iter().zip(&appended) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!((v["seq"].as_u64(), v["hash"].as_str()), (Some(a.seq), Some(a.hash.as_str())));
        }
        assert_eq!(log.write_failures(), 0);
    }

    #[tokio::test]
    async fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 3).await;
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        let long = Record { reason: Some("x".repeat(100_000)), ..record(4) };
        assert_eq!(log.append(long).await.unwrap().seq, 4);
        log.close().await.unwrap();
        // The last line is now longer than one backwards read.
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        assert_eq!(log.append(record(5)).await.unwrap().seq, 5);
        log.close().await.unwrap();
        assert!(matches!(log.append(record(6)).await, Err(Error::Closed)));
        assert_eq!(verify_file(&path).unwrap().records, 5);
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_naming_the_first_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let first = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        let Err(refused) = AuditLog::open(Sink::File(path.clone())).await else {
            panic!("a second writer is refused")
        };
        let message = refused.to_string();
        let Error::InUse { holder, lock, .. } = refused else { panic!("{message}") };
        assert_eq!(holder, std::process::id().to_string());
        assert_eq!(lock, dir.path().join("audit.jsonl.lock"));
        assert!(
            message.contains("in use") && message.contains(&holder) && message.contains("--audit-log"),
            "{message}"
        );
        assert_eq!(first.append(record(1)).await.unwrap().seq, 1, "the first writer goes on");
        first.close().await.unwrap();
        let second = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        assert_eq!(second.append(record(2)).await.unwrap().seq, 2);
        second.close().await.unwrap();
        assert_eq!(verify_file(&path).unwrap().records, 2);
    }

    #[tokio::test]
    async fn issued_record_has_the_documented_fields_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 1).await;
        let line = &lines(&path)[0];
        let fields = "seq prev_hash time request_id peer requested_identity subject namespace \
            service_account pod_name node_os auth_method token_issuer csr_key_type outcome serial fingerprint_sha256 \
            not_before not_after issuer_fingerprint_sha256 hash";
        let positions: Vec<usize> =
            fields.split_whitespace().map(|f| line.find(&format!("\"{f}\":")).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(line.starts_with(&format!(
            "{{\"seq\":1,\"prev_hash\":\"{ZERO_HASH}\",\"time\":\"2023-11-14T22:13:21.250Z\""
        )));
        assert!(!line.contains("pod_uid") && !line.contains("\"code\"") && !line.contains("\"reason\""));
    }

    #[tokio::test]
    async fn deleted_line_is_detected() {
        assert_eq!(tampered(|lines| drop(lines.remove(2))).await, 3);
    }

    #[tokio::test]
    async fn edited_field_is_detected() {
        let edit = |lines: &mut Vec<String>| lines[3] = lines[3].replace("\"denied\"", "\"issued\"");
        assert_eq!(tampered(edit).await, 4);
    }

    #[tokio::test]
    async fn reordered_pair_is_detected() {
        assert_eq!(tampered(|lines| lines.swap(1, 2)).await, 2);
    }

    /// Writes 5 records, applies `edit` to the lines and returns what verify says.
    async fn verified_after(edit: impl FnOnce(&mut Vec<String>)) -> VerifyReport {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5).await;
        let mut lines = lines(&path);
        edit(&mut lines);
        std::fs::write(&path, lines.concat()).unwrap();
        verify_file(&path).unwrap()
    }

    #[tokio::test]
    async fn a_truncated_last_line_is_reported_as_an_incomplete_tail_not_counted() {
        let report = verified_after(|lines| lines[4].truncate(100)).await;
        assert_eq!((report.records, report.incomplete_tail), (4, Some(100)));
        // A whole record whose newline never made it is still an interrupted write.
        let report = verified_after(|l| l[4] = l[4].trim_end().into()).await;
        assert_eq!(report.records, 4);
        assert!(report.incomplete_tail.unwrap() > 100);
        let intact = verified_after(|_| {}).await;
        assert_eq!((intact.records, intact.incomplete_tail), (5, None));
        assert_eq!(report.last_hash, verified_after(|l| drop(l.pop())).await.last_hash);
    }

    #[tokio::test]
    async fn an_edited_last_record_without_newline_is_broken_not_incomplete() {
        let edit = |l: &mut Vec<String>| l[4] = l[4].trim_end().replace("\"issued\"", "\"denied\"");
        assert_eq!(tampered(edit).await, 5);
        // A whole record that does not chain (the 4th, again, without newline).
        assert_eq!(tampered(|l| l[4] = l[3].trim_end().into()).await, 5);
    }

    #[tokio::test]
    async fn inserted_forged_line_is_detected() {
        assert_eq!(tampered(|lines| lines.insert(2, lines[1].clone())).await, 3);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn appends_fail_closed_while_the_file_cannot_be_written_and_every_one_retries() {
        let log = AuditLog::open(Sink::File("/dev/full".into())).await.unwrap();
        let err = log.append(record(1)).await.unwrap_err();
        assert!(matches!(&err, Error::Write { source } if source.raw_os_error() == Some(28)), "{err:?}");
        assert!(log.write_failures() > 0);
        assert!(log.is_failing());
        // Not poisoned: tried again, and still failing (ENOSPC again, not a stored verdict).
        let err = log.append(record(2)).await.unwrap_err();
        assert!(matches!(&err, Error::Write { source } if source.raw_os_error() == Some(28)), "{err:?}");
        assert_eq!(log.write_failures(), 2);
        assert!(log.is_failing());
        assert!(matches!(log.close().await, Err(Error::Write { .. })));
    }

    /// The log's records, parsed.
    fn records(path: &Path) -> Vec<serde_json::Value> {
        lines(path).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_failed_sync_refuses_the_batch_leaves_nothing_of_it_and_the_next_append_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        log.append(record(1)).await.unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        log.fail_syncs(true).await;
        for i in 2..=4 {
            assert!(matches!(log.append(record(i)).await, Err(Error::Write { .. })));
            assert!(log.is_failing());
            // Written to the file, then cut off again: no record of a refused append stays.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        }
        log.fail_syncs(false).await;
        let appended = log.append(record(5)).await.unwrap();
        assert!(!log.is_failing());
        assert_eq!(appended.seq, 3, "record 1, the gap, record 5");
        log.close().await.unwrap();
        let records = records(&path);
        let gap = &records[1];
        assert_eq!((gap["outcome"].as_str(), gap["request_id"].as_str()), (Some("gap"), Some(GAP_ID)));
        assert_eq!(gap["refused"], 3);
        assert!(gap["error"].as_str().unwrap().contains("fsync failed"), "{gap}");
        assert!(gap["failing_since"].as_str().unwrap().ends_with('Z'), "{gap}");
        assert!(gap.get("requested_identity").is_none());
        assert_eq!(records[2]["request_id"], "req-5");
        let report = verify_file(&path).unwrap();
        assert_eq!((report.records, report.gaps, report.refused), (3, 1, 3));
        assert_eq!(report.last_hash, Some(appended.hash));
    }

    #[tokio::test]
    async fn without_appends_the_writer_retries_on_its_own_and_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        log.fail_syncs(true).await;
        assert!(log.append(record(1)).await.is_err());
        assert!(log.append(record(2)).await.is_err());
        log.fail_syncs(false).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while log.is_failing() {
            assert!(std::time::Instant::now() < deadline, "no recovery without an append");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Recorded by the retry itself, before any append.
        let report = verify_file(&path).unwrap();
        assert_eq!((report.records, report.gaps, report.refused), (1, 1, 2));
        assert_eq!(log.append(record(3)).await.unwrap().seq, 2);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_close_while_failing_records_the_gap_if_the_sink_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        log.fail_syncs(true).await;
        assert!(log.append(record(1)).await.is_err());
        log.fail_syncs(false).await;
        log.close().await.unwrap();
        let report = verify_file(&path).unwrap();
        assert_eq!((report.records, report.gaps, report.refused), (1, 1, 1));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_file_renamed_away_is_followed_by_a_new_one_that_names_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        log.append(record(1)).await.unwrap();
        let last = log.append(record(2)).await.unwrap();
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        let appended = log.append(record(3)).await.unwrap();
        assert_eq!(appended.seq, 2, "a new chain: the continuation, then record 3");
        assert!(!log.is_failing());
        log.close().await.unwrap();
        let old = verify_file(&rotated).unwrap();
        assert_eq!((old.records, old.last_hash.as_deref()), (2, Some(last.hash.as_str())));
        let new = verify_file(&path).unwrap();
        assert_eq!((new.records, new.gaps), (2, 0));
        let joined = Continuation {
            seq: 1,
            previous_file: "renamed".into(),
            previous_seq: 2,
            previous_hash: last.hash.clone(),
        };
        assert_eq!(new.continues, Some(joined));
        let records = records(&path);
        assert_eq!(
            (records[0]["outcome"].as_str(), records[0]["request_id"].as_str()),
            (Some("continued"), Some(CONTINUED_ID))
        );
        assert_eq!(records[1]["request_id"], "req-3");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_file_renamed_away_keeps_its_final_checkpoint_in_the_next_files_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (key, _) = checkpoint::SigningKey::generate("meshca/cluster.local").unwrap();
        let vkey = key.verifier();
        let settings = Checkpoints {
            key: Arc::new(key),
            trust_domain: "cluster.local".into(),
            every: 1000,
            interval: Duration::from_secs(3600),
            new_log: false,
            also: None,
        };
        let log = AuditLog::open_with(Sink::File(path.clone()), Some(settings)).await.unwrap();
        for i in 1..=3 {
            log.append(record(i)).await.unwrap();
        }
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.append(record(4)).await.unwrap();
        log.close().await.unwrap();
        let first = &records(&path)[0];
        assert_eq!(
            (first["outcome"].as_str(), first["previous_file"].as_str()),
            (Some("continued"), Some("renamed"))
        );
        let note = first["previous_checkpoint"].as_str().unwrap();
        let old = checkpoint::Checkpoint::open(note, std::slice::from_ref(&vkey)).unwrap();
        // It signs the whole renamed file, and verifies it as a saved checkpoint would.
        let saved = dir.path().join("old.checkpoint");
        std::fs::write(&saved, note).unwrap();
        let checked = prove::check(&rotated, std::slice::from_ref(&vkey), Some(&saved)).unwrap();
        assert_eq!((old.size, checked.covered(), checked.report.records), (3, 3, 3));
        // And the new file's own checkpoint (written at close) covers its two records.
        let new = prove::check(&path, &[vkey], None).unwrap();
        assert_eq!((new.covered(), new.report.records), (2, 2));
        assert!(new.latest.unwrap().checkpoint.closed());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_removed_file_is_recreated_and_a_path_that_cannot_be_opened_fails_closed_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        let first = log.append(record(1)).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        log.append(record(2)).await.unwrap();
        let report = verify_file(&path).unwrap();
        assert_eq!(
            report.continues.as_ref().map(|c| (c.previous_file.as_str(), c.previous_seq)),
            Some(("removed", 1))
        );
        assert_eq!(report.continues.unwrap().previous_hash, first.hash);

        // Removed again, and a directory in its place: nothing can be recorded.
        let last = verify_file(&path).unwrap().last_hash.unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        for i in 3..=4 {
            assert!(matches!(log.append(record(i)).await, Err(Error::Write { .. })));
            assert!(log.is_failing());
        }
        std::fs::remove_dir(&path).unwrap();
        let appended = log.append(record(5)).await.unwrap();
        assert!(!log.is_failing());
        assert_eq!(appended.seq, 3, "continuation, gap, record 5");
        log.close().await.unwrap();
        let report = verify_file(&path).unwrap();
        assert_eq!((report.records, report.gaps, report.refused), (3, 1, 2));
        let continues = report.continues.unwrap();
        assert_eq!((continues.previous_file.as_str(), continues.previous_seq), ("removed", 2));
        assert_eq!(continues.previous_hash, last);
    }

    #[tokio::test]
    async fn open_cuts_off_an_interrupted_write_and_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 2).await;
        let good = std::fs::read_to_string(&path).unwrap();
        let third = {
            let more = tempfile::tempdir().unwrap();
            lines(&log_with(more.path(), 3).await).pop().unwrap()
        };
        // Cut mid-record, and cut just before the newline.
        for fragment in [&third[..40], third.trim_end()] {
            std::fs::write(&path, format!("{good}{fragment}")).unwrap();
            assert_eq!(verify_file(&path).unwrap().incomplete_tail, Some(fragment.len() as u64));
            let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
            // Recorded at once, before any append.
            let records = records(&path);
            assert_eq!(records.len(), 3);
            assert_eq!(
                (records[2]["outcome"].as_str(), records[2]["torn_bytes"].as_u64()),
                (Some("gap"), Some(fragment.len() as u64))
            );
            assert_eq!(log.append(record(3)).await.unwrap().seq, 4);
            log.close().await.unwrap();
            let report = verify_file(&path).unwrap();
            assert_eq!((report.records, report.gaps, report.torn, report.incomplete_tail), (4, 1, 1, None));
            std::fs::write(&path, &good).unwrap();
        }
    }

    #[tokio::test]
    async fn open_refuses_a_log_broken_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 2).await;
        let good = std::fs::read_to_string(&path).unwrap();
        let edited_last = {
            let mut lines = lines(&path);
            let last = lines.pop().unwrap();
            format!("{}{}", lines.concat(), last.trim_end().replace("\"denied\"", "\"issued\""))
        };
        for bad in [format!("{good}not a record\n"), format!("{good}\n"), edited_last] {
            std::fs::write(&path, &bad).unwrap();
            let err = AuditLog::open(Sink::File(path.clone())).await.err();
            assert!(matches!(err, Some(Error::Broken { .. })), "{bad:?}: {err:?}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), bad, "left as it was");
        }
        // The first record edited, the last one intact: the whole file is read at open.
        std::fs::write(&path, good.replacen("\"req-1\"", "\"req-X\"", 1)).unwrap();
        let err = AuditLog::open(Sink::File(path)).await.err().unwrap();
        assert!(matches!(&err, Error::Broken { error, .. } if error.contains("line 1")), "{err}");
    }

    #[tokio::test]
    async fn stdout_sink_accepts_appends() {
        assert_eq!(Sink::parse("-"), Sink::Stdout);
        let log = AuditLog::open(Sink::parse("-")).await.unwrap();
        assert_eq!(log.append(record(1)).await.unwrap().seq, 1);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_reason_with_newlines_and_quotes_stays_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let reason = "bad \"token\"\nsecond line\r\u{2028}\\";
        let log = AuditLog::open(Sink::File(path.clone())).await.unwrap();
        log.append(Record { reason: Some(reason.into()), ..record(2) }).await.unwrap();
        log.close().await.unwrap();
        let lines = lines(&path);
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["reason"], reason);
        assert_eq!(verify_file(&path).unwrap().records, 1);
    }

    #[test]
    fn sha256_hex_is_lowercase_hex() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
    }

    #[test]
    fn verifying_an_empty_log_finds_no_records() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let report = verify_file(file.path()).unwrap();
        assert_eq!((report.records, report.last_hash), (0, None));
    }
}
