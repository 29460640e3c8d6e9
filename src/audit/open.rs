//! Opening a file sink: its lock (one writer per log), and where its chain and tree
//! stand, read through from the first record; an interrupted final write is cut off here.

use super::*;

/// An audit file opened for appending, and where its chain stands.
pub(super) struct Opened {
    pub(super) file: File,
    /// Length after any incomplete final line was cut off.
    pub(super) len: u64,
    pub(super) seq: u64,
    pub(super) hash: String,
    /// Bytes of an incomplete final line (cut off by [`cut_torn`]).
    pub(super) torn: Option<u64>,
    /// The tree over the complete records.
    pub(super) tree: super::merkle::Frontier,
    pub(super) first_hash: Option<String>,
    /// The tree's root at the size asked for.
    pub(super) root_at: Option<super::merkle::Hash>,
}

/// `PATH.lock`, beside the audit log `PATH`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the exclusive advisory lock (flock on Unix, LockFileEx on Windows) on
/// `PATH.lock`, creating it, and writes this process's pid there; the lock goes with
/// the returned handle (or the process). Held by another process: [`Error::InUse`],
/// naming the pid it wrote.
pub(super) fn lock_file(path: &Path) -> Result<File, Error> {
    let lock = lock_path(path);
    let open_err = |source| Error::Open { path: lock.clone(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(open_err)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(open_err)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| writeln!(file, "{}", std::process::id()))
                .map_err(open_err)?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // Bounded: a pid is a few bytes; anything longer is not ours.
            let _ = (&file).take(64).read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown".to_owned(),
                pid => pid.to_owned(),
            };
            Err(Error::InUse { path: path.to_path_buf(), lock, holder })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(open_err(source)),
    }
}

/// Opens (or creates) the file and reads it through ([`scan`]): every record's hash
/// and chain, and the Merkle tree (with its root at `root_at` records, if asked).
/// Nothing is changed yet: an incomplete final line is reported in `torn` and cut
/// off by [`cut_torn`] once the caller has checked the file against its checkpoint.
pub(super) fn open_file(path: &Path, root_at: Option<u64>) -> Result<Opened, Error> {
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
    // A device (/dev/full, /dev/null) has no records to read; reading one could go on forever.
    let regular = file.metadata().map_err(open_err)?.is_file();
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let scanned = match regular {
        true => scan(io::BufReader::with_capacity(READ_CHUNK, &file), false, root_at),
        false => scan(io::empty(), false, root_at),
    };
    let scanned = match scanned {
        Ok(scanned) => scanned,
        Err(VerifyError::Io(source)) => return Err(open_err(source)),
        Err(e) => return Err(Error::Broken { path: path.to_path_buf(), error: e.to_string() }),
    };
    let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    let report = scanned.report;
    Ok(Opened {
        file,
        len,
        seq: report.records,
        hash: report.last_hash.unwrap_or_else(|| ZERO_HASH.to_string()),
        torn: report.incomplete_tail,
        tree: scanned.tree,
        first_hash: report.first_hash,
        root_at: scanned.root_at,
    })
}

/// Cuts off the incomplete final line [`open_file`] found (an interrupted write,
/// or a tail cut short by someone else: either way not covered by a checkpoint).
pub(super) fn cut_torn(opened: &mut Opened, path: &Path) -> Result<(), Error> {
    let Some(bytes) = opened.torn else { return Ok(()) };
    let open_err = |source| Error::Open { path: path.to_path_buf(), source };
    let keep = opened.len - bytes;
    opened.file.set_len(keep).and_then(|()| opened.file.sync_data()).map_err(open_err)?;
    opened.len = keep;
    tracing::warn!(
        path = %path.display(),
        bytes,
        "the audit log ended in an incomplete line, not covered by a checkpoint (an interrupted write, \
         or a tail cut short); cut off, gap recorded"
    );
    Ok(())
}
