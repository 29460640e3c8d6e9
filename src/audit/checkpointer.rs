//! The writer's signed checkpoints: checking a file against its last checkpoint
//! before anything is appended, deciding when to sign the next one (every
//! `every` records or `interval`, whichever comes first, at start and at a clean
//! stop), and the publisher thread that puts each one where a verifier finds it.
//!
//! Start-up rules, for a file sink with an audit key (the checkpoint is
//! `PATH.checkpoint`):
//! - a log shorter than its checkpoint (deleted, truncated, an incomplete line at or
//!   below the signed size), a log whose first records do not hash to the signed
//!   root, a checkpoint of another log, or one not signed by the key: refused
//!   ([`Error::Checkpoint`]);
//! - records after a checkpoint written at a clean stop (`closed`): refused, meshca
//!   wrote nothing after it;
//! - records after any other checkpoint were written before an unclean stop (or
//!   before checkpoints were kept): accepted, and an `uncovered` record says which,
//!   since only the file vouches for them;
//! - `--audit-new-log` starts a new log where the old one is missing or empty; its
//!   first record (`continued`, `previous_file: "replaced"`) holds the old checkpoint.
//!   Where a log is present the flag has no effect (so a flag left in place cannot
//!   discard a log at the next restart).
//!
//! Publishing a checkpoint (never on the path of a reply): the note replaces
//! `PATH.checkpoint` atomically, and one log line (`audit checkpoint`, with the note
//! in its `checkpoint` field) carries it off the host through the log pipeline. A
//! failed publication is logged and retried with the next checkpoint; it never
//! refuses an append, whose own record is already durable.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::checkpoint::{self, Checkpoint, SigningKey};
use super::merkle::Frontier;
use super::*;

/// Default `--audit-checkpoint-every`.
pub const DEFAULT_EVERY: u64 = 1000;
/// Default `--audit-checkpoint-interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Checkpoints waiting for the publisher; a newer one supersedes any dropped.
const PUBLISH_QUEUE: usize = 4;

/// Somewhere else each checkpoint goes (e.g. a ConfigMap), called on the
/// publisher thread with the checkpoint and its signed note; it must not block long.
pub type PublishHook = Arc<dyn Fn(&Checkpoint, &str) + Send + Sync>;

/// How a log is checkpointed.
#[derive(Clone)]
pub struct Checkpoints {
    pub key: Arc<SigningKey>,
    /// Named in the origin line.
    pub trust_domain: String,
    /// Sign after this many records since the last checkpoint...
    pub every: u64,
    /// ...or this long after a record the last checkpoint does not cover.
    pub interval: Duration,
    /// Start a new log where the old one is missing (see the module docs).
    pub new_log: bool,
    /// Also hand every checkpoint published to this.
    pub also: Option<PublishHook>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("key", &self.key)
            .field("every", &self.every)
            .field("interval", &self.interval)
            .field("new_log", &self.new_log)
            .field("also", &self.also.is_some())
            .finish_non_exhaustive()
    }
}

/// `PATH.checkpoint`, beside the audit log `PATH`.
pub fn checkpoint_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".checkpoint");
    PathBuf::from(name)
}

/// The checkpoint beside a log at start, as read.
pub(super) enum Previous {
    None,
    /// Opened with the key.
    Signed(Checkpoint, String),
    /// Present but not openable (text kept for `--audit-new-log`).
    Unreadable(String, Option<String>),
}

pub(super) fn read_previous(path: &Path, key: &SigningKey) -> Previous {
    let cp_path = checkpoint_path(path);
    if !cp_path.exists() {
        return Previous::None;
    }
    match Checkpoint::read(&cp_path, &[key.verifier()]) {
        Ok((cp, note)) => Previous::Signed(cp, note),
        Err(e) => {
            let text = std::fs::read(&cp_path).ok().filter(|t| t.len() <= checkpoint::MAX_NOTE);
            let text = text.map(|t| String::from_utf8_lossy(&t).into_owned());
            let problem = match e {
                checkpoint::Error::Unsigned(_) => format!(
                    "the checkpoint is not signed by this audit key ({}); after rotating the audit key, start a new log",
                    key.verifier()
                ),
                e => e.to_string(),
            };
            Previous::Unreadable(problem, text)
        }
    }
}

/// What the start-up check decided.
pub(super) struct Start {
    pub(super) opened: Opened,
    /// Markers to write before anything else.
    pub(super) markers: Vec<Marker>,
}

/// Opens a file sink with checkpoints: checks it against `PATH.checkpoint` (see the
/// module docs) before anything is changed, then cuts an incomplete tail.
pub(super) fn open_checked(path: &Path, cp: &Checkpoints) -> Result<Start, Error> {
    let cp_path = checkpoint_path(path);
    let refuse = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        checkpoint: cp_path.clone(),
        problem,
    };
    let previous = read_previous(path, &cp.key);
    let mut markers = Vec::new();
    let present = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    if cp.new_log && present {
        tracing::warn!(path = %path.display(), "--audit-new-log has no effect: the audit log is present, and is checked as usual");
    }
    if cp.new_log && !present {
        let (size, note) = match previous {
            Previous::None => (0, None),
            Previous::Signed(c, note) => (c.size, Some(note)),
            Previous::Unreadable(_, note) => (0, note),
        };
        let mut opened = open_file(path, None)?;
        cut_torn(&mut opened, path)?;
        if note.is_some() {
            tracing::warn!(path = %path.display(), "starting a new audit log; its first record holds the previous log's checkpoint");
            markers.push(Marker::Continued {
                previous_file: "replaced",
                previous_seq: size,
                previous_hash: String::new(),
                previous_checkpoint: note,
            });
        }
        return Ok(Start { opened, markers });
    }
    let signed = match previous {
        Previous::None => None,
        Previous::Signed(c, _) => Some(c),
        Previous::Unreadable(problem, _) => return Err(refuse(problem)),
    };
    let mut opened = open_file(path, signed.as_ref().map(|c| c.size))?;
    let records = opened.seq;
    match &signed {
        None if records > 0 => {
            tracing::warn!(
                path = %path.display(),
                records,
                "no checkpoint beside the audit log: its records so far are covered from now on, vouched for by the file alone"
            );
            markers.push(Marker::Uncovered { from: 1, to: records, why: "no_checkpoint" });
        }
        None => {}
        Some(c) => {
            let log_id = opened.first_hash.as_deref().map(checkpoint::log_id).unwrap_or_default();
            if records < c.size {
                let torn = if opened.torn.is_some() { " and an incomplete line" } else { "" };
                return Err(refuse(format!(
                    "the log has {records} complete record(s){torn} but the checkpoint signed {} (origin {}): \
                     records {}..={} were removed, or the log was deleted or replaced",
                    c.size,
                    c.origin,
                    records + 1,
                    c.size
                )));
            }
            if c.size > 0 && c.log_id() != log_id {
                return Err(refuse(format!(
                    "the checkpoint is for log {} (origin {}) but this log's id is {log_id}: the log was replaced",
                    c.log_id(),
                    c.origin
                )));
            }
            if opened.root_at != Some(c.root) {
                return Err(refuse(format!(
                    "the first {} record(s) do not hash to the root the checkpoint signed: a record at or before \
                     seq {} was edited, deleted, inserted or reordered (and the chain recomputed)",
                    c.size, c.size
                )));
            }
            if records > c.size && c.closed() {
                return Err(refuse(format!(
                    "records {}..={records} follow the checkpoint meshca wrote as it closed the log at {} \
                     record(s): meshca did not write them",
                    c.size + 1,
                    c.size
                )));
            }
            if records > c.size {
                tracing::warn!(
                    path = %path.display(),
                    from = c.size + 1,
                    to = records,
                    "records written after the last checkpoint before an unclean stop: covered from now on, \
                     vouched for by the file alone"
                );
                markers.push(Marker::Uncovered { from: c.size + 1, to: records, why: "unclean_stop" });
            }
        }
    }
    cut_torn(&mut opened, path)?;
    if let Some(bytes) = opened.torn {
        markers.push(Marker::Torn { bytes });
    }
    Ok(Start { opened, markers })
}

enum Publish {
    Note(String, Checkpoint),
    Flush(std_mpsc::SyncSender<()>),
}

/// The writer's checkpoint state.
pub(super) struct Checkpointer {
    settings: Checkpoints,
    /// `PATH.checkpoint` (none for stdout).
    file: Option<PathBuf>,
    also: Option<PublishHook>,
    /// Tree size the last checkpoint signed.
    pub(super) covered: u64,
    /// When the first record the last checkpoint does not cover was written.
    uncovered_since: Option<Instant>,
    queue: Option<std_mpsc::SyncSender<Publish>>,
    publisher: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn new(settings: Checkpoints, file: Option<PathBuf>) -> Checkpointer {
        let also = settings.also.clone();
        Checkpointer { settings, file, also, covered: 0, uncovered_since: None, queue: None, publisher: None }
    }

    /// Signs the tree as it stands.
    pub(super) fn sign(
        &self,
        tree: &Frontier,
        first_hash: Option<&str>,
        closed: bool,
    ) -> (String, Checkpoint) {
        let log_id = first_hash.map(checkpoint::log_id).unwrap_or_default();
        let cp = Checkpoint {
            origin: checkpoint::origin(&self.settings.trust_domain, &log_id),
            size: tree.size(),
            root: tree.root(),
            extensions: if closed { vec![checkpoint::CLOSED.into()] } else { Vec::new() },
        };
        (self.settings.key.sign(&cp), cp)
    }

    /// The first checkpoint, on the writer thread before any append is taken:
    /// published at once, then the publisher starts.
    pub(super) fn start(&mut self, tree: &Frontier, first_hash: Option<&str>) -> io::Result<()> {
        if tree.size() > 0 {
            let (note, cp) = self.sign(tree, first_hash, false);
            publish(self.file.as_deref(), self.also.as_ref(), &note, &cp)?;
        }
        self.covered = tree.size();
        let (tx, rx) = std_mpsc::sync_channel(PUBLISH_QUEUE);
        let (file, also) = (self.file.clone(), self.also.clone());
        let publisher = std::thread::Builder::new().name("meshca-audit-checkpoint".into()).spawn(move || {
            for msg in rx {
                match msg {
                    Publish::Note(note, cp) => {
                        if let Err(e) = publish(file.as_deref(), also.as_ref(), &note, &cp) {
                            tracing::error!(error = %e, size = cp.size, "cannot write the audit checkpoint; retried with the next one");
                        }
                    }
                    Publish::Flush(done) => drop(done.send(())),
                }
            }
        })?;
        (self.queue, self.publisher) = (Some(tx), Some(publisher));
        Ok(())
    }

    /// When the next checkpoint is due without more records, if any is.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.uncovered_since.map(|since| since + self.settings.interval)
    }

    /// After a durable batch, or when [`Self::deadline`] passed: signs and hands
    /// a checkpoint to the publisher if `every` records or `interval` say so.
    pub(super) fn after_batch(&mut self, tree: &Frontier, first_hash: Option<&str>) {
        if tree.size() <= self.covered {
            return;
        }
        let since = *self.uncovered_since.get_or_insert_with(Instant::now);
        if tree.size() - self.covered < self.settings.every && since.elapsed() < self.settings.interval {
            return;
        }
        let (note, cp) = self.sign(tree, first_hash, false);
        if let Some(queue) = &self.queue {
            // Full: the publisher is behind; this one is dropped, the next supersedes it.
            let _ = queue.try_send(Publish::Note(note, cp));
        }
        self.covered = tree.size();
        self.uncovered_since = None;
    }

    /// The tree's last checkpoint at a clean stop (`closed`), published before
    /// this returns; the publisher is stopped.
    pub(super) fn close(&mut self, tree: &Frontier, first_hash: Option<&str>) -> io::Result<()> {
        self.flush();
        self.queue = None;
        if let Some(publisher) = self.publisher.take() {
            let _ = publisher.join();
        }
        if tree.size() == 0 {
            return Ok(());
        }
        let (note, cp) = self.sign(tree, first_hash, true);
        publish(self.file.as_deref(), self.also.as_ref(), &note, &cp)?;
        self.covered = tree.size();
        Ok(())
    }

    /// Waits until every checkpoint handed over is published.
    pub(super) fn flush(&self) {
        if let Some(queue) = &self.queue {
            let (tx, rx) = std_mpsc::sync_channel(1);
            if queue.send(Publish::Flush(tx)).is_ok() {
                let _ = rx.recv();
            }
        }
    }

    /// A file was renamed away or removed underneath the writer: its final
    /// checkpoint (signed now, for the `continued` record of the next file), and a
    /// fresh start for the next file's tree.
    pub(super) fn hand_over(&mut self, tree: &Frontier, first_hash: Option<&str>) -> Option<String> {
        let note = (tree.size() > 0).then(|| self.sign(tree, first_hash, false).0);
        self.covered = 0;
        self.uncovered_since = None;
        note
    }

    /// The next file's tree starts at `size` (records already in it, uncovered).
    pub(super) fn restart_at(&mut self, size: u64) {
        self.covered = 0;
        self.uncovered_since = (size > 0).then(Instant::now);
    }
}

/// Puts a checkpoint where verifiers find it: the file beside the log (replaced
/// atomically), one log line, and the hook.
fn publish(file: Option<&Path>, also: Option<&PublishHook>, note: &str, cp: &Checkpoint) -> io::Result<()> {
    let written = match file {
        Some(path) => crate::files::write_atomic(path, note.as_bytes(), crate::files::Access::Public),
        None => Ok(()),
    };
    if let Some(hook) = also {
        hook(cp, note);
    }
    tracing::info!(
        origin = %cp.origin,
        size = cp.size,
        root = %base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cp.root),
        closed = cp.closed(),
        // A &str: JSON logs carry it as a string, text logs quoted and escaped on one line.
        checkpoint = note,
        "audit checkpoint"
    );
    written
}
