//! Writing credentials to disk without ever exposing a half-written file.
//!
//! [`write_atomic`] writes a temporary file in the same directory, syncs it, and
//! renames it over the target, then syncs the directory. [`write_new`] refuses to
//! replace an existing file (for `meshca init`). Directories are created when absent.
//!
//! Unix: the rename is atomic, key files get mode 0600 from the moment they exist,
//! and the directory is fsynced so the rename survives a crash.
//!
//! Windows: `std::fs::rename` is `MoveFileExW` with `MOVEFILE_REPLACE_EXISTING`
//! (and, when that is refused with access denied, a POSIX-semantics rename through
//! `SetFileInformationByHandle(FileRenameInfoEx)`), so the target is replaced
//! whole, never seen half-written. A reader that holds the target open without
//! `FILE_SHARE_DELETE` can make the rename fail; the round then fails and the
//! agent retries with backoff. Files get no mode: they inherit the ACL of their
//! directory, the temporary file from its creation, so a key is never readable by
//! more accounts than the directory allows; keep `--out` in a directory readable
//! only by the agent's account and the proxy's. The directory is not synced: NTFS
//! journals the rename.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Who may read a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Owner read/write only (private keys, tokens); on Windows, the directory's ACL.
    Private,
    /// World-readable (certificates).
    Public,
}

fn open_options(access: Access) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match access {
            Access::Private => 0o600,
            Access::Public => 0o644,
        });
    }
    // Windows: the directory's inherited ACL decides (module doc).
    #[cfg(not(unix))]
    let _ = access;
    options
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable on Linux; not done on Windows (module doc).
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `contents` atomically.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], access: Access) -> std::io::Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut suffix = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix);
    let tmp = dir.join(format!(".{name}.tmp-{}", crate::digest::hex(&suffix)));
    let result = (|| {
        let mut f = open_options(access).create_new(true).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir);
    Ok(())
}

/// Writes `contents` to a file that must not exist yet.
pub(crate) fn write_new(path: &Path, contents: &[u8], access: Access) -> std::io::Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir)?;
    let mut f = open_options(access).create_new(true).open(path)?;
    f.write_all(contents)?;
    f.sync_all()?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tls.key");
        write_atomic(&path, b"one", Access::Private).unwrap();
        write_atomic(&path, b"two", Access::Private).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> =
            fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pem");
        write_new(&path, b"x", Access::Public).unwrap();
        let err = write_new(&path, b"y", Access::Public).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }
}
