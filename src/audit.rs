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
//! proved who it is: `jwks`, `tokenreview`, `certificate`), `token_issuer`, `csr_key_type`,
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
//! After a failed write the file may end in a partial line, so the log is
//! poisoned: every later append fails until the process is restarted (and the
//! file repaired), because a CA must never issue without a record.
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

/// Queue depth between handlers and the writer thread (also the largest batch).
const CAPACITY: usize = 4096;
/// `prev_hash` of the first record.
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Text that precedes the hex digest at the end of every line.
const HASH_KEY: &[u8] = b",\"hash\":\"";
/// Backwards read size when looking for the last line of an existing file.
const TAIL_CHUNK: u64 = 64 * 1024;
/// A last line longer than this is treated as corrupt rather than loaded.
const MAX_LINE: usize = 1 << 20;

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
    pub csr_key_type: Option<String>,
    pub outcome: Outcome,
    pub code: Option<String>,
    pub reason: Option<String>,
    pub issued: Option<Issued>,
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
    /// Writing or syncing the batch holding this record failed: it is not
    /// durable, and the log is now poisoned.
    #[error("cannot write audit log: {source}")]
    Write { source: io::Error },
    /// The existing file's last record is unreadable (`line` is an excerpt),
    /// so the chain cannot be continued.
    #[error("audit log {} ends in an unreadable record {line:?}; refusing to extend it, run `meshca audit verify {}`", path.display(), path.display())]
    TailCorrupt { path: PathBuf, line: String },
    /// An earlier write failed and may have left a partial line; nothing is
    /// recorded (and so nothing may be issued) until restart.
    #[error("audit log is poisoned by an earlier write failure; restart once the sink is fixed")]
    Poisoned,
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {source}")]
    Spawn { source: io::Error },
    /// The writer has stopped (after `close`, or it is gone).
    #[error("audit log is closed")]
    Closed,
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
}

/// Handle to the writer thread; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    failures: Arc<AtomicU64>,
    /// Set by the writer when a write fails, cleared when one succeeds.
    failing: Arc<AtomicBool>,
}

impl AuditLog {
    /// Opens the sink and continues its chain. A file is opened in append
    /// mode, created with mode 0600 (unix) along with its parent directories;
    /// an existing file's last line (read backwards, never the whole file)
    /// gives the seq and hash to continue from, and an empty file starts at
    /// seq 1. A last line without trailing newline, with a malformed hash
    /// suffix or a wrong digest is [`Error::TailCorrupt`]. Standard output
    /// always starts a new chain at seq 1. The writer runs on a dedicated
    /// thread, so this works under any tokio runtime flavour.
    pub async fn open(sink: Sink) -> Result<AuditLog, Error> {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let writer_failing = failing.clone();
        std::thread::Builder::new()
            .name("meshca-audit".into())
            .spawn(move || match Writer::open(sink, writer_failing) {
                Ok(writer) => writer.run(rx, ready_tx),
                Err(e) => drop(ready_tx.send(Err(e))),
            })
            .map_err(|source| Error::Spawn { source })?;
        ready_rx.await.unwrap_or(Err(Error::Closed))?;
        Ok(AuditLog { tx, failures: Arc::new(AtomicU64::new(0)), failing })
    }

    /// Appends one record and returns only once it is written and synced,
    /// with its seq and hash. On `Err` the decision is not recorded: fail closed.
    pub async fn append(&self, record: Record) -> Result<Appended, Error> {
        let (tx, rx) = oneshot::channel();
        let result = match self.tx.send(Msg::Append(Box::new(record), tx)).await {
            Ok(()) => rx.await.unwrap_or(Err(Error::Closed)),
            Err(_) => Err(Error::Closed),
        };
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Writes what is queued before it, syncs and stops the writer; later
    /// appends return [`Error::Closed`]. Closing a closed log is `Ok`; closing
    /// a poisoned log reports [`Error::Poisoned`].
    pub async fn close(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).await.is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// Appends that returned an error since open, whatever the cause.
    pub fn write_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// True while the sink is failing: the last write failed (or the log is
    /// poisoned) and no write has succeeded since. Readiness reads this.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

enum Out {
    Stdout,
    File(File),
}

impl Out {
    fn write_durably(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Out::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Out::File(file) => {
                file.write_all(bytes)?;
                file.sync_data()
            }
        }
    }
}

struct Writer {
    out: Out,
    seq: u64,
    prev_hash: String,
    poisoned: bool,
    failing: Arc<AtomicBool>,
}

impl Writer {
    fn open(sink: Sink, failing: Arc<AtomicBool>) -> Result<Writer, Error> {
        let (out, seq, prev_hash) = match sink {
            Sink::Stdout => (Out::Stdout, 0, ZERO_HASH.to_string()),
            Sink::File(path) => open_file(&path)?,
        };
        Ok(Writer { out, seq, prev_hash, poisoned: false, failing })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>, ready: oneshot::Sender<Result<(), Error>>) {
        let _ = ready.send(Ok(()));
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < CAPACITY {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            if let Some(close) = self.commit(&mut batch) {
                let result = if self.poisoned {
                    Err(Error::Poisoned)
                } else {
                    let synced = self.out.write_durably(&[]);
                    synced.map_err(|source| Error::Write { source })
                };
                let _ = close.send(result);
                return; // dropping `rx` fails everything still queued with `Closed`
            }
        }
    }

    /// Writes the appends of `batch` up to the first close, which it returns.
    fn commit(&mut self, batch: &mut Vec<Msg>) -> Option<oneshot::Sender<Result<(), Error>>> {
        let (mut seq, mut prev_hash) = (self.seq, self.prev_hash.clone());
        let mut bytes = Vec::new();
        let mut waiters = Vec::new();
        let mut close = None;
        for msg in batch.drain(..) {
            let (record, reply) = match msg {
                Msg::Append(record, reply) => (record, reply),
                Msg::Close(reply) => {
                    close = Some(reply);
                    break;
                }
            };
            if self.poisoned {
                let _ = reply.send(Err(Error::Poisoned));
                continue;
            }
            match encode(&record, seq + 1, &prev_hash) {
                Ok((line, hash)) => {
                    bytes.extend_from_slice(&line);
                    seq += 1;
                    prev_hash.clone_from(&hash);
                    waiters.push((reply, Appended { seq, hash }));
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::Write { source: io::Error::other(e) }));
                }
            }
        }
        if waiters.is_empty() {
            return close;
        }
        match self.out.write_durably(&bytes) {
            Ok(()) => {
                self.failing.store(false, Ordering::Relaxed);
                (self.seq, self.prev_hash) = (seq, prev_hash);
                for (reply, appended) in waiters {
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(e) => {
                let records = waiters.len();
                tracing::error!(error = %e, records, "audit write failed; appends refused until restart");
                self.poisoned = true;
                self.failing.store(true, Ordering::Relaxed);
                for (reply, _) in waiters {
                    let _ = reply.send(Err(Error::Write { source: io::Error::new(e.kind(), e.to_string()) }));
                }
            }
        }
        close
    }
}

/// Opens (or creates) the file and reads the chain state off its last line.
fn open_file(path: &Path) -> Result<(Out, u64, String), Error> {
    let open_err = |source| Error::Open { path: path.to_path_buf(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(open_err)?;
    #[cfg(unix)]
    let existed = path.exists();
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(open_err)?;
    #[cfg(unix)]
    if !existed {
        // Make the new directory entry itself durable.
        File::open(parent).and_then(|dir| dir.sync_all()).map_err(open_err)?;
    }
    let (seq, hash) = match last_line(&mut file).map_err(open_err)? {
        None => (0, ZERO_HASH.to_string()),
        Some(line) => {
            let body = line.strip_suffix(b"\n").filter(|_| line.len() <= MAX_LINE);
            let parsed = body.and_then(|body| parse_line(body).ok());
            let Some(Parsed { seq, hash, .. }) = parsed else {
                let excerpt = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
                return Err(Error::TailCorrupt { path: path.to_path_buf(), line: excerpt });
            };
            (seq, hash)
        }
    };
    tracing::info!(path = %path.display(), next_seq = seq + 1, "audit log opened");
    Ok((Out::File(file), seq, hash))
}

/// The serialised form of a record without `hash` (field order is the contract).
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    prev_hash: &'a str,
    time: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<&'a str>,
    requested_identity: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a SubjectRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    csr_key_type: Option<&'a str>,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer_fingerprint_sha256: Option<&'a str>,
}

/// Returns the full line (with `hash` and newline) and its hash.
fn encode(r: &Record, seq: u64, prev_hash: &str) -> Result<(Vec<u8>, String), serde_json::Error> {
    let issued = r.issued.as_ref();
    let mut line = serde_json::to_vec(&Body {
        seq,
        prev_hash,
        time: rfc3339(r.time),
        request_id: &r.request_id,
        peer: r.peer.as_deref(),
        requested_identity: &r.requested_identity,
        subject: r.subject.as_ref(),
        auth_method: r.auth_method.as_deref(),
        token_issuer: r.token_issuer.as_deref(),
        csr_key_type: r.csr_key_type.as_deref(),
        outcome: r.outcome,
        code: r.code.as_deref(),
        reason: r.reason.as_deref(),
        serial: issued.map(|i| i.serial_hex.as_str()),
        fingerprint_sha256: issued.map(|i| i.fingerprint_sha256.as_str()),
        not_before: issued.map(|i| rfc3339(i.not_before)),
        not_after: issued.map(|i| rfc3339(i.not_after)),
        issuer_fingerprint_sha256: issued.map(|i| i.issuer_fingerprint_sha256.as_str()),
    })?;
    let hash = sha256_hex(&line);
    line.pop(); // the closing brace of B
    line.extend_from_slice(HASH_KEY);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, hash))
}

/// RFC 3339 UTC with millis, clamped to 1970..=9999 (the formatter's range).
fn rfc3339(t: SystemTime) -> String {
    let max = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    humantime::format_rfc3339_millis(t.clamp(UNIX_EPOCH, max)).to_string()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = |b: &u8| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]];
    bytes.iter().flat_map(digits).map(char::from).collect()
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Last line of `file` including its newline if any; `None` for an empty file.
/// Stops reading backwards past [`MAX_LINE`] (the caller rejects the result).
fn last_line(file: &mut File) -> io::Result<Option<Vec<u8>>> {
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut tail = Vec::new();
    while pos > 0 && tail.len() <= MAX_LINE {
        let n = TAIL_CHUNK.min(pos);
        pos -= n;
        let mut chunk = vec![0; n as usize];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        chunk.append(&mut tail);
        tail = chunk;
        // A newline other than the file's final byte ends the previous line.
        if let Some(i) = tail[..tail.len() - 1].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(tail.split_off(i + 1)));
        }
    }
    Ok((!tail.is_empty()).then_some(tail))
}

struct Parsed {
    seq: u64,
    prev_hash: String,
    hash: String,
}

/// Checks one line (without its newline) on its own: hash suffix, digest, seq and prev_hash present.
fn parse_line(line: &[u8]) -> Result<Parsed, (Option<u64>, String)> {
    let seq_of = |json: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(json).ok().and_then(|v| v.get("seq")?.as_u64())
    };
    let suffix_len = HASH_KEY.len() + 64 + 2;
    let split = line.len().checked_sub(suffix_len).filter(|&at| {
        let (key, rest) = line[at..].split_at(HASH_KEY.len());
        key == HASH_KEY
            && rest.ends_with(b"\"}")
            && rest[..64].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    let Some(at) = split else {
        return Err((seq_of(line), "missing or malformed hash".into()));
    };
    let mut body = line[..at].to_vec();
    body.push(b'}');
    let claimed = String::from_utf8_lossy(&line[at + HASH_KEY.len()..line.len() - 2]).into_owned();
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| (None, format!("not JSON: {e}")))?;
    let seq = value.get("seq").and_then(|v| v.as_u64());
    if sha256_hex(&body) != claimed {
        return Err((seq, "hash mismatch: record edited".into()));
    }
    let Some(seq) = seq else {
        return Err((None, "missing seq".into()));
    };
    let Some(prev_hash) = value.get("prev_hash").and_then(|v| v.as_str()) else {
        return Err((Some(seq), "missing prev_hash".into()));
    };
    Ok(Parsed { seq, prev_hash: prev_hash.to_string(), hash: claimed })
}

/// Result of a successful [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub last_hash: Option<String>,
}

/// Why a log failed [`verify`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The log could not be read.
    #[error("cannot read audit log: {0}")]
    Io(#[from] io::Error),
    /// The first broken record: 1-based line number, its seq if readable, and what is wrong.
    #[error("audit log broken at line {line}{}: {problem}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Broken { line: u64, seq: Option<u64>, problem: String },
}

/// Checks a whole log: every line's hash, seq = previous + 1 starting at 1,
/// and prev_hash = previous hash (64 zeros first). Stops at the first broken record.
pub fn verify(mut reader: impl io::BufRead) -> Result<VerifyReport, VerifyError> {
    let mut buf = Vec::new();
    let (mut line_no, mut last_hash): (u64, Option<String>) = (0, None);
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(VerifyReport { records: line_no, last_hash });
        }
        line_no += 1;
        let broken = |seq, problem: String| VerifyError::Broken { line: line_no, seq, problem };
        let Some(line) = buf.strip_suffix(b"\n") else {
            let seq = parse_line(&buf).map(|p| Some(p.seq)).unwrap_or_else(|(seq, _)| seq);
            return Err(broken(seq, "truncated last line (no newline)".into()));
        };
        let parsed = parse_line(line).map_err(|(seq, problem)| broken(seq, problem))?;
        if parsed.seq != line_no {
            let problem = format!(
                "seq gap: expected {line_no}, found {} (record deleted, inserted or reordered)",
                parsed.seq
            );
            return Err(broken(Some(parsed.seq), problem));
        }
        if parsed.prev_hash != last_hash.as_deref().unwrap_or(ZERO_HASH) {
            return Err(broken(
                Some(parsed.seq),
                "prev_hash mismatch: does not chain to the previous record".into(),
            ));
        }
        last_hash = Some(parsed.hash);
    }
}

/// [`verify`] on a file.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify(io::BufReader::new(File::open(path)?))
}

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

    #[tokio::test]
    async fn truncated_last_line_is_detected() {
        assert_eq!(tampered(|l| l[4] = l[4].trim_end().into()).await, 5);
        assert_eq!(tampered(|lines| lines[4].truncate(100)).await, 5);
    }

    #[tokio::test]
    async fn inserted_forged_line_is_detected() {
        assert_eq!(tampered(|lines| lines.insert(2, lines[1].clone())).await, 3);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn appends_fail_closed_when_the_file_cannot_be_written() {
        let log = AuditLog::open(Sink::File("/dev/full".into())).await.unwrap();
        assert!(matches!(log.append(record(1)).await, Err(Error::Write { .. })));
        assert!(log.write_failures() > 0);
        assert!(log.is_failing());
        assert!(matches!(log.append(record(2)).await, Err(Error::Poisoned)));
        assert_eq!(log.write_failures(), 2);
        assert!(matches!(log.close().await, Err(Error::Poisoned)));
    }

    #[tokio::test]
    async fn open_refuses_a_corrupt_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 2).await;
        let good = std::fs::read_to_string(&path).unwrap();
        for tail in ["{\"seq\":3", "not a record\n", "\n"] {
            std::fs::write(&path, format!("{good}{tail}")).unwrap();
            let err = AuditLog::open(Sink::File(path.clone())).await.err();
            assert!(matches!(err, Some(Error::TailCorrupt { .. })), "{tail:?}: {err:?}");
        }
        std::fs::write(&path, good.replace("\"denied\"", "\"issued\"")).unwrap();
        assert!(matches!(AuditLog::open(Sink::File(path)).await, Err(Error::TailCorrupt { .. })));
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
