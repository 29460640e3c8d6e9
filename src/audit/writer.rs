//! The writer thread: group commit (every record queued at that moment, one write and
//! one sync), cutting the file back after a failed batch, the `gap` and `continued`
//! records, following the path across rotation, and retrying on its own while failing.

use super::*;

pub(super) enum Out {
    Stdout,
    File(FileOut),
}

/// The open audit file, the path it was opened at, and its durable length: what
/// every acknowledged batch wrote, and nothing after.
pub(super) struct FileOut {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) len: u64,
}

impl FileOut {
    /// Cuts the file back to its durable length (regular files only: a device
    /// such as /dev/full has nothing to cut).
    pub(super) fn cut_back(&mut self) -> io::Result<()> {
        if self.file.metadata()?.is_file() {
            self.file.set_len(self.len)?;
        }
        Ok(())
    }

    /// Whether the path still names the open file.
    pub(super) fn still_at_path(&self) -> io::Result<bool> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            match std::fs::metadata(&self.path) {
                Ok(at_path) => {
                    let open = self.file.metadata()?;
                    Ok(at_path.dev() == open.dev() && at_path.ino() == open.ino())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        }
        #[cfg(not(unix))]
        {
            Ok(self.path.exists())
        }
    }

    /// Whether the open file has no name left (removed, not renamed).
    pub(super) fn removed(&self) -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            self.file.metadata().is_ok_and(|m| m.nlink() == 0)
        }
        #[cfg(not(unix))]
        {
            false
        }
    }
}

impl Out {
    pub(super) fn write_durably(&mut self, bytes: &[u8], fail_syncs: bool) -> io::Result<()> {
        match self {
            Out::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Out::File(out) => {
                out.file.write_all(bytes)?;
                if fail_syncs {
                    return Err(io::Error::other("fsync failed: Input/output error (injected by a test)"));
                }
                out.file.sync_data()?;
                if !bytes.is_empty() && out.removed() {
                    // Durable in an inode nobody can reach: as good as lost.
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the audit file was removed while it was being written",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Why appends are being refused: from the first failed batch until one succeeds.
pub(super) struct Failure {
    pub(super) since: SystemTime,
    pub(super) refused: u64,
    pub(super) error: String,
}

/// A record the writer adds on its own account (see the module docs).
#[derive(Clone, Debug)]
pub(super) enum Marker {
    /// First record of a file opened because the previous one went away.
    /// `previous_checkpoint`: the previous file's last checkpoint, signed as it was left.
    Continued {
        previous_file: &'static str,
        previous_seq: u64,
        previous_hash: String,
        previous_checkpoint: Option<String>,
    },
    /// Records `from..=to` are not covered by any checkpoint meshca signed before
    /// they were written (`why`: `unclean_stop` or `no_checkpoint`).
    Uncovered { from: u64, to: u64, why: &'static str },
    /// An incomplete final line of this many bytes was cut off at open.
    Torn { bytes: u64 },
    /// Appends were refused while the sink failed.
    Refused { refused: u64, since: SystemTime, error: String },
}

pub(super) type Reply = oneshot::Sender<Result<Appended, Error>>;

pub(super) struct Writer {
    /// The exclusive lock on `PATH.lock`, held as long as the writer runs (file sinks).
    pub(super) _lock: Option<File>,
    pub(super) out: Out,
    pub(super) seq: u64,
    pub(super) prev_hash: String,
    /// Set from a failed batch until a batch is durable again.
    pub(super) failure: Option<Failure>,
    /// Markers to write first in the next batch (kept until one is durable).
    pub(super) pending: Vec<Marker>,
    pub(super) failing: Arc<AtomicBool>,
    pub(super) fail_syncs: bool,
    /// The Merkle tree over the lines of the current file (its size is `seq`).
    pub(super) tree: super::merkle::Frontier,
    /// The first record's hash (the log id), once there is one.
    pub(super) first_hash: Option<String>,
    /// Signed checkpoints, when an audit key is configured.
    pub(super) checkpoints: Option<Checkpointer>,
}

impl Writer {
    pub(super) fn open(
        sink: Sink,
        failing: Arc<AtomicBool>,
        checkpoints: Option<Checkpoints>,
    ) -> Result<Writer, Error> {
        let (lock, out, opened, markers) = match &sink {
            Sink::Stdout => (None, Out::Stdout, None, Vec::new()),
            Sink::File(path) => {
                // Before anything is read or cut: the tail belongs to whoever holds the lock.
                let lock = lock_file(path)?;
                let (mut opened, markers) = match &checkpoints {
                    Some(cp) => {
                        let start = open_checked(path, cp)?;
                        (start.opened, start.markers)
                    }
                    None => {
                        let mut opened = open_file(path, None)?;
                        cut_torn(&mut opened, path)?;
                        let markers = opened.torn.map(|bytes| Marker::Torn { bytes }).into_iter().collect();
                        (opened, markers)
                    }
                };
                let file =
                    opened.file.try_clone().map_err(|source| Error::Open { path: path.clone(), source })?;
                let out = FileOut { file, len: opened.len, path: path.clone() };
                opened.torn = None;
                (Some(lock), Out::File(out), Some(opened), markers)
            }
        };
        let mut writer = Writer {
            _lock: lock,
            out,
            seq: 0,
            prev_hash: ZERO_HASH.to_string(),
            failure: None,
            pending: markers,
            failing,
            fail_syncs: false,
            tree: Default::default(),
            first_hash: None,
            checkpoints: None,
        };
        if let Some(opened) = opened {
            (writer.seq, writer.prev_hash) = (opened.seq, opened.hash);
            (writer.tree, writer.first_hash) = (opened.tree, opened.first_hash);
        }
        if !writer.pending.is_empty() {
            // Recorded before anything else, so a crash now cannot hide the cut; if
            // the sink fails already, like any failure: retried with the next append.
            if let Err(e) = writer.write_batch(&mut Vec::new()) {
                writer.failed(&e, 0);
            }
        }
        if let Some(settings) = checkpoints {
            let file = match &sink {
                Sink::File(path) => Some(checkpoint_path(path)),
                Sink::Stdout => None,
            };
            let mut checkpointer = Checkpointer::new(settings, file.clone());
            checkpointer
                .start(&writer.tree, writer.first_hash.as_deref())
                .map_err(|source| Error::Open { path: file.unwrap_or_else(|| PathBuf::from("-")), source })?;
            writer.checkpoints = Some(checkpointer);
        }
        Ok(writer)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Msg>, ready: oneshot::Sender<Result<(), Error>>) {
        let _ = ready.send(Ok(()));
        let mut batch = Vec::new();
        // A timer for the retries while failing (built when first needed).
        let mut timer = None;
        loop {
            let first = match self.next_or_timer(&mut rx, &mut timer) {
                Some(Some(msg)) => msg,
                Some(None) => continue,
                None => return,
            };
            batch.push(first);
            while batch.len() < CAPACITY {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            if let Some(close) = self.commit(&mut batch) {
                let result = match self.failure {
                    Some(ref f) => Err(Error::Write { source: io::Error::other(f.error.clone()) }),
                    None => self.out.write_durably(&[], false).map_err(|source| Error::Write { source }),
                };
                if let Some(checkpoints) = self.checkpoints.as_mut() {
                    // The last checkpoint says the log was closed: nothing may follow it.
                    if let Err(e) = checkpoints.close(&self.tree, self.first_hash.as_deref()) {
                        tracing::error!(error = %e, "cannot write the closing audit checkpoint");
                    }
                }
                // The file and its lock go before the answer: once `close` returns,
                // another writer may open the log.
                drop(self);
                let _ = close.send(result);
                return; // dropping `rx` fails everything still queued with `Closed`
            }
        }
    }

    /// The next message; or, when a timer is due first, `Some(None)` after acting on
    /// it: while failing, a retry of its own after [`RETRY_WHILE_FAILING`] without a
    /// message (a replica that readiness took out of traffic must recover, and record
    /// the gap, without an append to do it); a checkpoint whose interval has passed.
    /// `None` once every handle is gone.
    pub(super) fn next_or_timer(
        &mut self,
        rx: &mut mpsc::Receiver<Msg>,
        timer: &mut Option<tokio::runtime::Runtime>,
    ) -> Option<Option<Msg>> {
        let now = std::time::Instant::now();
        let retry = self.failure.is_some().then(|| now + RETRY_WHILE_FAILING);
        let checkpoint = self.checkpoints.as_ref().and_then(Checkpointer::deadline);
        let Some(deadline) = retry.into_iter().chain(checkpoint).min() else {
            return rx.blocking_recv().map(Some);
        };
        if timer.is_none() {
            *timer = tokio::runtime::Builder::new_current_thread().enable_time().build().ok();
        }
        let Some(runtime) = timer.as_ref() else {
            return rx.blocking_recv().map(Some); // no timer: retried with the next append only
        };
        let wait = deadline.saturating_duration_since(now);
        match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
            Ok(msg) => msg.map(Some),
            Err(_) => {
                if retry.is_some_and(|at| at <= std::time::Instant::now()) {
                    match self.write_batch(&mut Vec::new()) {
                        Ok(_) => self.recovered(),
                        Err(e) => self.failed(&e, 0),
                    }
                }
                self.checkpoint_if_due();
                Some(None)
            }
        }
    }

    /// Hands a checkpoint to the publisher if one is due (never before a reply).
    pub(super) fn checkpoint_if_due(&mut self) {
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            checkpoints.after_batch(&self.tree, self.first_hash.as_deref());
        }
    }

    /// After a durable batch.
    pub(super) fn recovered(&mut self) {
        if let Some(failure) = self.failure.take() {
            tracing::warn!(
                refused = failure.refused,
                "audit log writable again; the gap is recorded in the log"
            );
        }
        self.failing.store(false, Ordering::Relaxed);
    }

    /// After a failed batch of `refused` appends (0: a retry of its own).
    pub(super) fn failed(&mut self, e: &io::Error, refused: u64) {
        // No unacknowledged record stays in the file (best effort; the next
        // batch cuts back again before writing).
        if let Out::File(out) = &mut self.out {
            let _ = out.cut_back();
        }
        let first = self.failure.is_none();
        let failure = self.failure.get_or_insert_with(|| Failure {
            since: SystemClock.now(),
            refused: 0,
            error: e.to_string(),
        });
        failure.refused += refused;
        self.failing.store(true, Ordering::Relaxed);
        if first || refused > 0 {
            tracing::error!(
                error = %e,
                records = refused,
                refused_since_failing = failure.refused,
                "audit write failed; appends refused (no certificate without a record) until a write succeeds"
            );
        } else {
            tracing::debug!(error = %e, "audit log still failing");
        }
    }

    /// Writes the appends of `batch` up to the first close, which it returns.
    pub(super) fn commit(&mut self, batch: &mut Vec<Msg>) -> Option<oneshot::Sender<Result<(), Error>>> {
        let mut appends = Vec::new();
        let mut close = None;
        for msg in batch.drain(..) {
            match msg {
                Msg::Append(record, reply) => appends.push((record, reply)),
                Msg::FailSyncs(fail, ack) => {
                    self.fail_syncs = fail;
                    let _ = ack.send(());
                }
                Msg::Close(reply) => {
                    close = Some(reply);
                    break;
                }
            }
        }
        // A close while failing tries once more, to record the gap before exit.
        if appends.is_empty() && (close.is_none() || self.failure.is_none()) {
            return close;
        }
        let waiters = appends.len() as u64;
        match self.write_batch(&mut appends) {
            Ok(written) => {
                self.recovered();
                for (reply, appended) in written {
                    let _ = reply.send(Ok(appended));
                }
                self.checkpoint_if_due();
            }
            Err(e) => {
                self.failed(&e, waiters);
                for (_, reply) in appends {
                    let source = match e.raw_os_error() {
                        Some(code) => io::Error::from_raw_os_error(code),
                        None => io::Error::new(e.kind(), e.to_string()),
                    };
                    let _ = reply.send(Err(Error::Write { source }));
                }
            }
        }
        close
    }

    /// Makes the sink ready for a batch (follows a renamed or removed file; cuts
    /// a failed batch off), then writes the pending markers, a gap record if
    /// appends were refused, and `appends`, with one write and one sync. On
    /// success, returns the replies with their positions (records that cannot
    /// be encoded are answered at once and left out); on error, `appends` keeps
    /// the ones still to be answered.
    pub(super) fn write_batch(
        &mut self,
        appends: &mut Vec<(Box<Record>, Reply)>,
    ) -> io::Result<Vec<(Reply, Appended)>> {
        self.prepare()?;
        let mut markers = self.pending.clone();
        if let Some(f) = self.failure.as_ref().filter(|f| f.refused > 0) {
            markers.push(Marker::Refused { refused: f.refused, since: f.since, error: f.error.clone() });
        }
        let now = SystemClock.now();
        let (mut seq, mut prev_hash) = (self.seq, self.prev_hash.clone());
        let (mut tree, mut first_hash) = (self.tree.clone(), self.first_hash.clone());
        let mut leaf = |line: &[u8], hash: &str| {
            tree.push(super::merkle::leaf_hash(line.strip_suffix(b"\n").unwrap_or(line)));
            first_hash.get_or_insert_with(|| hash.to_owned());
        };
        let mut bytes = Vec::new();
        for marker in &markers {
            let (line, hash) = encode_marker(marker, now, seq + 1, &prev_hash).map_err(io::Error::other)?;
            leaf(&line, &hash);
            bytes.extend_from_slice(&line);
            seq += 1;
            prev_hash = hash;
        }
        let mut encoded = Vec::new();
        for (record, reply) in appends.drain(..) {
            match encode(&record, seq + 1, &prev_hash) {
                Ok((line, hash)) => {
                    leaf(&line, &hash);
                    bytes.extend_from_slice(&line);
                    seq += 1;
                    prev_hash.clone_from(&hash);
                    encoded.push((record, reply, Appended { seq, hash }));
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::Write { source: io::Error::other(e) }));
                }
            }
        }
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.out.write_durably(&bytes, self.fail_syncs) {
            appends.extend(encoded.into_iter().map(|(record, reply, _)| (record, reply)));
            return Err(e);
        }
        if let Out::File(out) = &mut self.out {
            out.len += bytes.len() as u64;
        }
        (self.seq, self.prev_hash) = (seq, prev_hash);
        (self.tree, self.first_hash) = (tree, first_hash);
        self.pending.clear();
        Ok(encoded.into_iter().map(|(_, reply, appended)| (reply, appended)).collect())
    }

    /// Before a batch: a file renamed away or removed is replaced by the one at
    /// the path (a `continued` marker goes first); after a failure, the file is
    /// cut back to its durable length.
    pub(super) fn prepare(&mut self) -> io::Result<()> {
        let Out::File(out) = &mut self.out else { return Ok(()) };
        if out.still_at_path()? {
            if self.failure.is_some() {
                out.cut_back()?;
            }
            return Ok(());
        }
        // Leave the old file ending in a complete line, wherever it went.
        if self.failure.is_some() {
            let _ = out.cut_back();
        }
        let previous_file = if out.removed() { "removed" } else { "renamed" };
        let mut opened = open_file(&out.path, None).map_err(io::Error::other)?;
        cut_torn(&mut opened, &out.path).map_err(io::Error::other)?;
        tracing::warn!(
            path = %out.path.display(),
            previous_file,
            previous_seq = self.seq,
            next_seq = opened.seq + 1,
            "the audit file was {previous_file} underneath meshca; continuing in a file at the path"
        );
        // A marker for the file before is kept until written; one for an
        // interrupted write in a file given up before it was written is dropped.
        self.pending.retain(|m| matches!(m, Marker::Continued { .. }));
        if self.pending.is_empty() {
            let previous_checkpoint =
                self.checkpoints.as_mut().and_then(|c| c.hand_over(&self.tree, self.first_hash.as_deref()));
            self.pending.push(Marker::Continued {
                previous_file,
                previous_seq: self.seq,
                previous_hash: self.prev_hash.clone(),
                previous_checkpoint,
            });
        }
        if let Some(bytes) = opened.torn {
            self.pending.push(Marker::Torn { bytes });
        }
        *out = FileOut { file: opened.file, path: out.path.clone(), len: opened.len };
        (self.seq, self.prev_hash) = (opened.seq, opened.hash);
        (self.tree, self.first_hash) = (opened.tree, opened.first_hash);
        if let Some(checkpoints) = self.checkpoints.as_mut() {
            checkpoints.restart_at(opened.seq);
        }
        Ok(())
    }
}
