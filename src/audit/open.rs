//! Opening a file sink: its lock (one writer per log), and where its chain stands,
//! read off its last line; an interrupted final write is cut off here.

use super::*;

/// An audit file opened for appending, and where its chain stands.
pub(super) struct Opened {
    pub(super) file: File,
    /// Length after any incomplete final line was cut off.
    pub(super) len: u64,
    pub(super) seq: u64,
    pub(super) hash: String,
    /// Bytes of an incomplete final line that were cut off.
    pub(super) torn: Option<u64>,
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

/// Opens (or creates) the file and reads the chain state off its last line,
/// cutting off an incomplete final line (see the module docs).
pub(super) fn open_file(path: &Path) -> Result<Opened, Error> {
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
    let corrupt = |line: &[u8]| {
        let excerpt = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
        Error::TailCorrupt { path: path.to_path_buf(), line: excerpt }
    };
    let mut last = last_line(&mut file).map_err(open_err)?;
    let mut torn = None;
    if let Some(fragment) = last.as_ref().filter(|l| !l.ends_with(b"\n")) {
        // An interrupted write (never acknowledged), unless it is a whole record
        // that fails its own hash: that is an edit, not a crash.
        if fragment.len() > MAX_LINE || (has_hash_suffix(fragment) && parse_line(fragment).is_err()) {
            return Err(corrupt(fragment));
        }
        let bytes = fragment.len() as u64;
        let keep = file.seek(SeekFrom::End(0)).map_err(open_err)? - bytes;
        file.set_len(keep).and_then(|()| file.sync_data()).map_err(open_err)?;
        tracing::warn!(
            path = %path.display(),
            bytes,
            "the audit log ended in an incomplete line (an interrupted write, never acknowledged); cut off, gap recorded"
        );
        torn = Some(bytes);
        last = last_line(&mut file).map_err(open_err)?;
    }
    let (seq, hash) = match last {
        None => (0, ZERO_HASH.to_string()),
        Some(line) => {
            let body = line.strip_suffix(b"\n").filter(|_| line.len() <= MAX_LINE);
            let parsed = body.and_then(|body| parse_line(body).ok());
            let Some(Parsed { seq, hash, .. }) = parsed else {
                return Err(corrupt(&line));
            };
            (seq, hash)
        }
    };
    let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    tracing::info!(path = %path.display(), next_seq = seq + 1, "audit log opened");
    Ok(Opened { file, len, seq, hash, torn })
}

/// Last line of `file` including its newline if any; `None` for an empty file.
/// Stops reading backwards past [`MAX_LINE`] (the caller rejects the result).
pub(super) fn last_line(file: &mut File) -> io::Result<Option<Vec<u8>>> {
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
