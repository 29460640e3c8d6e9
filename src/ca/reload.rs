//! Issuer and trust-anchor rotation without restarts: the reloader.
//!
//! The reloader keeps the [`Store`] in step with the issuer directory and the
//! trust-anchor file. A check reads the files through any symlinks (Kubernetes
//! mounts a Secret as `tls.crt -> ..data/tls.crt` and updates it by swapping the
//! `..data` symlink) and compares the SHA-256 of their contents with that of the
//! files the current snapshot came from; modification times are never consulted.
//! When the contents differ, the new issuer and anchors are loaded and checked
//! exactly as at start ([`Snapshot::load_with`] at the injected clock's now, with the
//! same [`Algorithms`] policy: by default, only what Windows verifies). On success
//! the new snapshot is swapped in whole. On failure the old snapshot stays, the
//! error is logged (what is wrong and where, never key material) and reported, and
//! the next check tries again: some failures pass with time (an issuer not valid
//! yet), others when the files are fixed.
//!
//! A check runs on a file-system notification for either location (after a short
//! settling delay, so an update touching several files is read once), every
//! [`Settings::interval`] regardless (a lost notification, or none at all, costs
//! at most one interval), and on demand through [`Reloader::check`]. Contents are
//! hashed before they are loaded, so a change racing a check is seen again by the
//! next one rather than lost.
//!
//! What a swap means elsewhere is decided elsewhere: requests use the new snapshot
//! from their next start; the serving-certificate renewer (`server`) subscribes to
//! the store and re-issues at once; metrics hear of reloads through [`Observer`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use super::issuer::{issuer_files, Algorithms};
use super::material::check_not_world_readable;
use super::store::{Snapshot, Store};
use super::Error;
use crate::clock::Clock;

/// How often the files are re-checked when no notification arrives.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Quiet time after a notification before the files are read.
const SETTLE: Duration = Duration::from_millis(200);

/// When the reloader looks at the files, and what it accepts in them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Period of the re-check that runs whatever the notifications say.
    pub interval: Duration,
    /// Also check on file-system notifications (off: the periodic re-check alone).
    pub notifications: bool,
    /// Algorithms the issuer chain may use, at start and on every reload; given to
    /// the reloader when it is built ([`Reloader::with_algorithms`]).
    pub issuer_algorithms: Algorithms,
    /// Accept an issuer key file every user of the host can read
    /// (`--allow-world-readable-issuer-key`); given to the reloader when it is built
    /// ([`Reloader::allow_world_readable_key`]).
    pub allow_world_readable_issuer_key: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval: DEFAULT_INTERVAL,
            notifications: true,
            issuer_algorithms: Algorithms::default(),
            allow_world_readable_issuer_key: false,
        }
    }
}

/// Told about every reload and every failed attempt (not about the start-up load).
pub trait Observer: Send + Sync + 'static {
    /// `snapshot` was swapped in.
    fn reloaded(&self, snapshot: &Snapshot);
    /// Changed files could not be used; the previous snapshot stays.
    fn reload_failed(&self, error: &Error);
}

/// What one check did.
#[derive(Debug)]
pub enum Outcome {
    /// The files hold what the current snapshot was loaded from.
    Unchanged,
    /// A new snapshot was checked and swapped in.
    Reloaded(Arc<Snapshot>),
    /// The files changed but cannot be used (or cannot be read); nothing was swapped.
    Failed(Error),
}

/// Watches the issuer directory and trust-anchor file; swaps snapshots into the store.
pub struct Reloader {
    trust_anchors: PathBuf,
    issuer_dir: PathBuf,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn Observer>,
    algorithms: Algorithms,
    /// Whether an issuer key file readable by every user is accepted.
    allow_world_readable_key: bool,
    /// The issuer key in a PKCS#11 token (`--issuer-key`), used instead of `tls.key`.
    token: Option<Arc<super::token::TokenKey>>,
    /// SHA-256 of the files the current snapshot was loaded from; the lock also
    /// makes checks run one at a time.
    loaded: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("trust_anchors", &self.trust_anchors)
            .field("issuer_dir", &self.issuer_dir)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for these locations, accepting only issuers Windows can verify
    /// ([`Algorithms::WindowsCompatible`]) and issuer keys not readable by every user
    /// of the host; nothing is read until [`Reloader::load`].
    pub fn new(
        trust_anchors: PathBuf,
        issuer_dir: PathBuf,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Reloader {
            trust_anchors,
            issuer_dir,
            store,
            clock,
            observer,
            algorithms: Algorithms::WindowsCompatible,
            allow_world_readable_key: false,
            token: None,
            loaded: Mutex::new(None),
        }
    }

    /// The same reloader, signing with `token`'s key instead of `tls.key` (which is
    /// then neither read nor watched): a new `tls.crt` must certify the token's key.
    pub(crate) fn with_token(mut self, token: Option<Arc<super::token::TokenKey>>) -> Self {
        self.token = token;
        self
    }

    /// The same reloader, accepting issuer chains that use `algorithms`.
    pub(crate) fn with_algorithms(mut self, algorithms: Algorithms) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// The same reloader, accepting (`true`) or refusing (`false`, the default) an
    /// issuer key file every user of the host can read (unix mode & 0o004), at start
    /// and on every reload. Windows: no mode bits, nothing is checked.
    pub(crate) fn allow_world_readable_key(mut self, allow: bool) -> Self {
        self.allow_world_readable_key = allow;
        self
    }

    /// The store this reloader swaps snapshots into.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The start-up load: the files must be usable now, or meshca does not start.
    /// Not reported to the observer.
    pub fn load(&self) -> Result<Arc<Snapshot>, Error> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let digest = self.digest()?;
        let snapshot = self.load_snapshot()?;
        *loaded = Some(digest);
        Ok(self.store.replace(snapshot))
    }

    /// Compares the files with the current snapshot's and reloads when they differ.
    /// Logs and reports what happened; never leaves the store without a snapshot.
    pub fn check(&self) -> Outcome {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let attempt = self.digest().and_then(|digest| {
            if loaded.as_ref() == Some(&digest) {
                return Ok(None);
            }
            // Hashed before loading: if the files change in between, the recorded
            // digest is the older one and the next check loads again.
            let snapshot = self.load_snapshot()?;
            Ok(Some((digest, snapshot)))
        });
        match attempt {
            Ok(None) => Outcome::Unchanged,
            Ok(Some((digest, snapshot))) => {
                let previous = self.store.current();
                let snapshot = self.store.replace(snapshot);
                *loaded = Some(digest);
                tracing::info!(
                    issuer_sha256 = snapshot.issuer.fingerprint(),
                    previous_issuer_sha256 = previous.as_ref().map(|p| p.issuer.fingerprint()),
                    issuer_not_after = %humantime::format_rfc3339_seconds(snapshot.issuer.window().not_after),
                    trust_anchors = snapshot.anchors.certificates().len(),
                    "issuer and trust anchors reloaded"
                );
                self.observer.reloaded(&snapshot);
                Outcome::Reloaded(snapshot)
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    issuer_dir = %self.issuer_dir.display(),
                    trust_anchors = %self.trust_anchors.display(),
                    "the changed issuer or trust anchors cannot be used; still serving with the previous ones, retrying"
                );
                self.observer.reload_failed(&error);
                Outcome::Failed(error)
            }
        }
    }

    /// Reads and checks the files now, as at start; then, unless allowed, refuses an
    /// issuer key every user may read (after the contents, so that a broken issuer
    /// is reported as such first).
    fn load_snapshot(&self) -> Result<Snapshot, Error> {
        let now = self.clock.now();
        let snapshot = Snapshot::load_with(
            &self.trust_anchors,
            &self.issuer_dir,
            now,
            self.algorithms,
            self.token.as_ref(),
        )?;
        if !self.allow_world_readable_key && self.token.is_none() {
            check_not_world_readable(&issuer_files(&self.issuer_dir).1)?;
        }
        Ok(snapshot)
    }

    /// SHA-256 over the trust-anchor file, the issuer certificate and the issuer
    /// key, each read through its symlinks and prefixed with its length; while
    /// world-readable keys are refused, also over whether the key is, so that a
    /// `chmod` alone is checked (and refused) like a change of contents.
    fn digest(&self) -> Result<Vec<u8>, Error> {
        let (crt, key) = issuer_files(&self.issuer_dir);
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let files = if self.token.is_some() {
            vec![&self.trust_anchors, &crt]
        } else {
            vec![&self.trust_anchors, &crt, &key]
        };
        for path in files {
            let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.clone(), source })?;
            digest.update(&(bytes.len() as u64).to_be_bytes());
            digest.update(&bytes);
        }
        if !self.allow_world_readable_key && self.token.is_none() {
            digest.update(&[u8::from(check_not_world_readable(&key).is_err())]);
        }
        Ok(digest.finish().as_ref().to_vec())
    }

    /// Checks on notifications and every `settings.interval` until `shutdown`.
    pub async fn run(self: Arc<Self>, settings: Settings, shutdown: impl Future<Output = ()>) {
        let wake = Arc::new(Notify::new());
        // Dropping the watcher stops the notifications.
        let _watcher = if settings.notifications { self.watch(wake.clone()) } else { None };
        let interval = settings.interval.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {}
                () = wake.notified() => {
                    // Let an update that touches several files finish first.
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(SETTLE) => {}
                    }
                }
            }
            // A few small reads, and signing one probe only when something changed.
            let _ = self.check();
        }
    }

    /// Starts notifications for the issuer directory and the trust-anchor file's
    /// directory (not recursive: a `..data` swap is an event in the directory
    /// itself). None when the platform refuses; the periodic re-check remains.
    fn watch(&self, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
        let anchors_dir = match self.trust_anchors.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let relevant = Relevance {
            // Events name absolute paths, whatever the watched path looked like.
            issuer_dir: std::path::absolute(&self.issuer_dir).unwrap_or_else(|_| self.issuer_dir.clone()),
            anchors_name: self.trust_anchors.file_name().map(ToOwned::to_owned),
        };
        let handler = move |event: notify::Result<notify::Event>| match event {
            Ok(event) if relevant.matters(&event) => wake.notify_one(),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "file notification error; checking the issuer and trust anchors now");
                wake.notify_one();
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(error) => {
                tracing::warn!(%error, "file notifications unavailable; relying on the periodic re-check");
                return None;
            }
        };
        let mut dirs = vec![self.issuer_dir.clone()];
        if anchors_dir != self.issuer_dir {
            dirs.push(anchors_dir);
        }
        for dir in dirs {
            if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch; relying on the periodic re-check");
            }
        }
        Some(watcher)
    }
}

/// Which notifications can mean new issuer or anchor contents.
struct Relevance {
    issuer_dir: PathBuf,
    anchors_name: Option<std::ffi::OsString>,
}

impl Relevance {
    fn matters(&self, event: &notify::Event) -> bool {
        // Reads (our own included) change nothing; a finished write does.
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return false;
            }
        }
        event.paths.iter().any(|path| self.concerns(path))
    }

    /// Anything in the issuer directory; in the anchors' directory (which may hold
    /// other files, e.g. a busy log), the anchors file and Kubernetes' `..data*` entries.
    fn concerns(&self, path: &Path) -> bool {
        if path.parent() == Some(self.issuer_dir.as_path()) {
            return true;
        }
        let Some(name) = path.file_name() else { return false };
        Some(name) == self.anchors_name.as_deref() || name.to_string_lossy().starts_with("..")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;

    use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
    use crate::clock::{FakeClock, SystemClock};
    use crate::identity::Naming;

    #[derive(Default)]
    struct Counts {
        reloads: AtomicU64,
        failures: AtomicU64,
    }

    impl Observer for Counts {
        fn reloaded(&self, _: &Snapshot) {
            self.reloads.fetch_add(1, Ordering::Relaxed);
        }
        fn reload_failed(&self, _: &Error) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        clock: FakeClock,
        counts: Arc<Counts>,
        reloader: Arc<Reloader>,
    }

    /// A CA made at `at`: (anchor PEM, issuer certificate PEM, issuer key PEM).
    fn ca(at: SystemTime) -> (String, String, String) {
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let h = hierarchy::generate(&naming, CaKeyType::P256, at, HierarchyLifetimes::default()).unwrap();
        (h.anchor_cert_pem, h.issuer_cert_pem, h.issuer_key_pem)
    }

    /// Writes a CA the way Kubernetes mounts a Secret: the files are symlinks
    /// through `..data`, which is replaced by renaming a new symlink over it.
    #[cfg(unix)]
    fn write_mounted(dir: &Path, generation: u32, (anchor, crt, key): &(String, String, String)) {
        let data = dir.join(format!("..gen{generation}"));
        std::fs::create_dir_all(&data).unwrap();
        for (name, contents) in [("trust-anchors.pem", anchor), ("tls.crt", crt), ("tls.key", key)] {
            std::fs::write(data.join(name), contents).unwrap();
            // As a Secret volume with `defaultMode: 0440` mounts them.
            std::fs::set_permissions(data.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o440))
                .unwrap();
            let link = dir.join(name);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
            }
        }
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..gen{generation}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    }

    /// Anchors and issuer in one mounted directory, loaded at the start.
    #[cfg(unix)]
    fn mounted() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::at(SystemClock.now());
        write_mounted(dir.path(), 0, &ca(clock.now()));
        let counts = Arc::new(Counts::default());
        let reloader = Arc::new(Reloader::new(
            dir.path().join("trust-anchors.pem"),
            dir.path().to_owned(),
            Arc::new(Store::default()),
            Arc::new(clock.clone()),
            counts.clone(),
        ));
        reloader.load().unwrap();
        Fixture { dir, clock, counts, reloader }
    }

    fn issuer_of(reloader: &Reloader) -> String {
        reloader.store().current().unwrap().issuer.fingerprint().to_owned()
    }

    #[cfg(unix)]
    #[test]
    fn unchanged_files_are_not_reloaded_and_a_data_swap_is() {
        let f = mounted();
        let first = issuer_of(&f.reloader);
        assert!(matches!(f.reloader.check(), Outcome::Unchanged));
        write_mounted(f.dir.path(), 1, &ca(f.clock.now()));
        let Outcome::Reloaded(snapshot) = f.reloader.check() else { panic!("not reloaded") };
        assert_ne!(snapshot.issuer.fingerprint(), first);
        assert_eq!(issuer_of(&f.reloader), snapshot.issuer.fingerprint());
        assert!(matches!(f.reloader.check(), Outcome::Unchanged));
        assert_eq!(f.counts.reloads.load(Ordering::Relaxed), 1);
        assert_eq!(f.counts.failures.load(Ordering::Relaxed), 0);
    }

    #[cfg(unix)]
    #[test]
    fn an_unusable_update_keeps_the_old_snapshot_and_is_retried_until_it_becomes_usable() {
        let f = mounted();
        let first = issuer_of(&f.reloader);
        // Anchors and issuer that start in two hours: unusable now, usable later.
        write_mounted(f.dir.path(), 1, &ca(f.clock.now() + Duration::from_secs(7200)));
        for attempt in 1..=3 {
            let outcome = f.reloader.check();
            assert!(matches!(outcome, Outcome::Failed(Error::IssuerNotYetValid { .. })), "{outcome:?}");
            assert_eq!(issuer_of(&f.reloader), first, "old issuer kept");
            assert_eq!(f.counts.failures.load(Ordering::Relaxed), attempt);
        }
        f.clock.advance(Duration::from_secs(7200));
        assert!(matches!(f.reloader.check(), Outcome::Reloaded(_)));
        assert_ne!(issuer_of(&f.reloader), first);
    }

    #[cfg(unix)]
    #[test]
    fn a_key_from_another_issuer_and_key_like_garbage_are_refused_without_echoing_the_key() {
        let f = mounted();
        let read = |name| std::fs::read_to_string(f.dir.path().join(name)).unwrap();
        let (anchor, crt) = (read("trust-anchors.pem"), read("tls.crt"));
        let (_, _, other_key) = ca(f.clock.now());
        write_mounted(f.dir.path(), 1, &(anchor.clone(), crt.clone(), other_key));
        assert!(matches!(f.reloader.check(), Outcome::Failed(Error::KeyMismatch)));
        // Key-like garbage: refused, and nothing of it reaches the error (which is logged).
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n";
        write_mounted(f.dir.path(), 2, &(anchor, crt, secret.into()));
        let Outcome::Failed(error) = f.reloader.check() else { panic!("garbage accepted") };
        assert!(matches!(error, Error::BadKey { .. }), "{error:?}");
        assert!(!format!("{error} {error:?}").contains("c2VjcmV0"), "{error}");
        assert_eq!(f.counts.failures.load(Ordering::Relaxed), 2);
        assert_eq!(f.counts.reloads.load(Ordering::Relaxed), 0);
    }

    #[cfg(unix)]
    #[tokio::test(start_paused = true)]
    async fn without_notifications_the_periodic_recheck_picks_up_a_change_after_one_interval() {
        let f = mounted();
        let mut swaps = f.reloader.store().subscribe();
        let settings =
            Settings { interval: Duration::from_secs(30), notifications: false, ..Settings::default() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(f.reloader.clone().run(settings, async move {
            let _ = stopped.await;
        }));
        tokio::task::yield_now().await; // the reloader arms its interval now
        write_mounted(f.dir.path(), 1, &ca(f.clock.now()));
        tokio::time::advance(Duration::from_secs(29)).await;
        tokio::task::yield_now().await;
        assert!(!swaps.has_changed().unwrap(), "reloaded before the interval");
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(1), swaps.changed())
            .await
            .expect("no reload after one interval")
            .unwrap();
        assert_eq!(f.counts.reloads.load(Ordering::Relaxed), 1);
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_notification_triggers_a_reload_long_before_the_interval() {
        let f = mounted();
        let mut swaps = f.reloader.store().subscribe();
        let settings = Settings { interval: Duration::from_secs(3600), ..Settings::default() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(f.reloader.clone().run(settings, async move {
            let _ = stopped.await;
        }));
        // The reloader starts watching now; should the first update still beat
        // the watch, the next one is seen.
        tokio::task::yield_now().await;
        let mut generation = 0;
        let reloaded = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                generation += 1;
                write_mounted(f.dir.path(), generation, &ca(f.clock.now()));
                if tokio::time::timeout(Duration::from_secs(2), swaps.changed()).await.is_ok() {
                    return;
                }
            }
        })
        .await;
        reloaded.expect("no reload on notification within 20s (interval: 1h)");
        assert_eq!(f.counts.failures.load(Ordering::Relaxed), 0);
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn reads_and_unrelated_files_beside_the_anchors_do_not_count() {
        let relevance = Relevance {
            issuer_dir: PathBuf::from("/etc/meshca/issuer"),
            anchors_name: Some("ca.pem".into()),
        };
        let event = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
        let modify = EventKind::Modify(notify::event::ModifyKind::Any);
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let moved = EventKind::Modify(notify::event::ModifyKind::Name(notify::event::RenameMode::To));
        assert!(relevance.matters(&event(modify, "/etc/meshca/issuer/tls.key")));
        assert!(relevance.matters(&event(written, "/etc/meshca/ca.pem")));
        assert!(relevance.matters(&event(moved, "/etc/meshca/..data")));
        assert!(!relevance.matters(&event(open, "/etc/meshca/issuer/tls.key")));
        assert!(!relevance.matters(&event(modify, "/etc/meshca/audit.jsonl")));
    }
}
