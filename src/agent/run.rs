//! The agent loop: keep a certificate fresh on disk.
//!
//! Each round makes a new key (never reused), re-reads the token file (projected
//! tokens rotate) and the trust anchors, calls Certify, verifies the chain at the
//! server's time, asks for meshca's trust bundle on the same connection, writes
//! `tls.key`, `tls.crt` and `ca.crt` atomically, optionally runs `--on-renew`, and
//! waits for the next renewal per [`schedule`]. Waiting is done through a [`Timer`]
//! (tokio's monotonic clock in production, a test timer in tests), and every delay
//! is counted from receipt, so a wall clock that jumps or disagrees with the
//! server's changes nothing. On failure the agent backs off with full jitter, keeps
//! the old files, and logs the validity left.
//!
//! `ca.crt` is meshca's trust bundle (`meshca.v1.TrustBundle/Get`), not the local
//! `--trust-anchors`: during a root rotation the bundle grows to old + new root,
//! and the proxy must trust both before any peer's certificate chains to the new
//! one. The local anchors still decide what is accepted: meshca's serving
//! certificate and the issued chain are verified against them alone. The bundle is
//! written only when it, too, verifies the chain just issued (one that does not is
//! no root set for this certificate); when it cannot be fetched (a meshca without
//! the service answers `Unimplemented`) or does not verify the chain, `ca.crt`
//! gets the local anchors and a warning is logged.
//!
//! The clock offset to the server (from the `x-meshca-time` response header) is
//! logged and warned about past a threshold.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

use super::client::{self, Credentials, KeyType};
use super::schedule::{self, Policy};
use super::status::Status;
use crate::ca::issuer::TrustAnchors;
use crate::ca::material::to_pem;
use crate::clock::Clock;
use crate::files::{write_atomic, Access};

/// First retry waits up to this long; the wait doubles per failure.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest wait between retries.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The server's default clock-skew allowance, assumed as its backdate when the
/// response does not say the server's time.
const ASSUMED_BACKDATE: Duration = Duration::from_secs(120);

/// Waits on a monotonic clock.
pub trait Timer: Send + Sync + 'static {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// tokio's monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TokioTimer;

impl Timer for TokioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("trust anchors: {0}")]
    Anchors(#[from] crate::ca::Error),
    #[error("cannot read the token file {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Certify(#[from] client::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// `--on-renew` failed; the new files are in place.
    #[error("the certificate was written, but the --on-renew command failed: {reason}")]
    Hook { reason: String },
    /// `certify --csr`: the CSR file cannot be read or is not a CSR.
    #[error("--csr {path}: {reason}")]
    Csr { path: PathBuf, reason: String },
    /// `certify --csr`: `--out` holds a `tls.key` for another key, which the new
    /// `tls.crt` would not match.
    #[error(
        "{path} is not the key of the CSR: the certificate would not match it; remove it or choose another --out"
    )]
    OtherKey { path: PathBuf },
}

/// What the agent does.
#[derive(Clone, Debug)]
pub struct Settings {
    pub addr: String,
    pub trust_anchors: PathBuf,
    pub token_file: PathBuf,
    pub identity: String,
    pub out: PathBuf,
    pub server_name: String,
    pub key_type: KeyType,
    pub policy: Policy,
    /// Warn when the clock offset to the server exceeds this.
    pub offset_warning: Duration,
    /// Shell command run after each successful write.
    pub on_renew: Option<String>,
    /// The command that checks each step of a round (`meshca doctor …` with these
    /// settings), named in the log when a round fails after one that did not.
    pub check_with: Option<String>,
}

impl Settings {
    /// The Certify call these settings make, verified against `anchors`.
    fn request<'a>(
        &'a self,
        anchors: &'a TrustAnchors,
        token: Vec<u8>,
        client_identity: Option<(String, String)>,
    ) -> client::Request<'a> {
        client::Request {
            addr: &self.addr,
            anchors,
            server_name: &self.server_name,
            identity: &self.identity,
            token,
            key_type: self.key_type,
            client_identity,
        }
    }
}

/// The outcome of one successful round.
#[derive(Clone, Debug)]
pub struct Renewed {
    pub not_after: SystemTime,
    /// Validity left at receipt, on the server's clock.
    pub lifetime: Duration,
    /// Server clock minus ours, in milliseconds, when the server said its time.
    pub offset_millis: Option<i64>,
}

fn signed_millis(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A uniform sample in [0, 1] from the system RNG (0.5 if it fails).
pub fn uniform() -> f64 {
    let mut b = [0u8; 8];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b) {
        Ok(()) => (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Removes temporary files a killed earlier round may have left in `out` (they may
/// hold a private key). Only this agent's own names are touched.
fn remove_stale_temporaries(out: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = ["tls.key", "tls.crt", "ca.crt"].iter().any(|f| name.starts_with(&format!(".{f}.tmp-")));
        if ours {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The certificate and key currently on disk, if both are there.
fn current_identity(out: &std::path::Path) -> Option<(String, String)> {
    let chain = std::fs::read_to_string(out.join("tls.crt")).ok()?;
    let key = std::fs::read_to_string(out.join("tls.key")).ok()?;
    Some((chain, key))
}

/// One round: new key, Certify, verify, write, hook.
///
/// Authenticates with the token file; when it is absent, or its token is refused
/// as unauthenticated, and a certificate is on disk, renews by proof of possession
/// (mutual TLS with the current certificate, empty token) instead. A bootstrap
/// token (`meshca bootstrap-token create`) is for the first certificate: with one
/// on disk, proof of possession comes first and the token only when that is
/// refused as unauthenticated (the certificate expired while the host was off).
pub async fn renew_once(settings: &Settings, clock: &dyn Clock) -> Result<Renewed, Error> {
    let anchors = TrustAnchors::load(&settings.trust_anchors)?;
    remove_stale_temporaries(&settings.out);
    let current = current_identity(&settings.out);
    let token = match std::fs::read(&settings.token_file) {
        Ok(token) => Some(token),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && current.is_some() => None,
        Err(source) => return Err(Error::Token { path: settings.token_file.clone(), source }),
    };
    let request = |token: Vec<u8>, client_identity| settings.request(&anchors, token, client_identity);
    let (creds, channel) = match token {
        Some(token) if current.is_some() && crate::auth::bootstrap::is_bootstrap_token(&token) => {
            match certify(request(Vec::new(), current), clock.now()).await {
                Err(client::Error::Refused { code: tonic::Code::Unauthenticated, .. }) => {
                    tracing::warn!("the current certificate was refused; trying the bootstrap token");
                    certify(request(token, None), clock.now()).await?
                }
                other => other?,
            }
        }
        Some(token) => match certify(request(token, None), clock.now()).await {
            Err(client::Error::Refused { code: tonic::Code::Unauthenticated, .. }) if current.is_some() => {
                tracing::warn!("token refused; renewing with the current certificate");
                certify(request(Vec::new(), current), clock.now()).await?
            }
            other => other?,
        },
        None => {
            tracing::debug!("no token file; renewing with the current certificate");
            certify(request(Vec::new(), current), clock.now()).await?
        }
    };
    received(settings, &anchors, channel, &creds, clock.now()).await
}

/// `meshca certify --csr`: one Certify call with a CSR made elsewhere, sent
/// unchanged and authenticated by the token file (there is no key here to prove
/// possession of a current certificate with). The chain is verified like a
/// round's, and must certify the CSR's own key; `tls.crt` and `ca.crt` are written,
/// never `tls.key`. A `tls.key` already in `--out` must be the CSR's key, or nothing
/// is sent.
pub(crate) async fn submit_csr(
    settings: &Settings,
    csr_path: &std::path::Path,
    clock: &dyn Clock,
) -> Result<Renewed, Error> {
    let csr_error = |reason: String| Error::Csr { path: csr_path.to_owned(), reason };
    let bytes = std::fs::read(csr_path).map_err(|e| csr_error(e.to_string()))?;
    let csr = client::SubmittedCsr::parse(&bytes).map_err(csr_error)?;
    let key_path = settings.out.join("tls.key");
    if let Ok(pem) = std::fs::read_to_string(&key_path) {
        let same =
            rcgen::KeyPair::from_pem(&pem).is_ok_and(|key| key.public_key_raw() == csr.public_key.as_slice());
        if !same {
            return Err(Error::OtherKey { path: key_path });
        }
    }
    let anchors = TrustAnchors::load(&settings.trust_anchors)?;
    remove_stale_temporaries(&settings.out);
    let token = std::fs::read(&settings.token_file)
        .map_err(|source| Error::Token { path: settings.token_file.clone(), source })?;
    let request = settings.request(&anchors, token, None);
    let channel = client::connect_as(request.addr, request.anchors, request.server_name, None).await?;
    let creds = client::submit_on(channel.clone(), request, csr.der, &csr.public_key, clock.now()).await?;
    received(settings, &anchors, channel, &creds, clock.now()).await
}

/// What every round does with a verified answer received at `received` (this
/// host's clock): warn about the clock offset to meshca, write the files
/// ([`write_credentials`]), and say how long the certificate has left.
async fn received(
    settings: &Settings,
    anchors: &TrustAnchors,
    channel: Channel,
    creds: &Credentials,
    received: SystemTime,
) -> Result<Renewed, Error> {
    let offset_millis = creds.server_time.map(|t| signed_millis(t, received));
    if let Some(offset) = offset_millis {
        if offset.unsigned_abs() > settings.offset_warning.as_millis() as u64 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from meshca's by more than {:?}; fix time sync (chrony/timedatectl, or w32tm /resync on Windows)",
                settings.offset_warning
            );
        } else {
            tracing::debug!(offset_ms = offset, "clock offset to meshca");
        }
    }

    write_credentials(settings, anchors, channel, creds, received).await?;

    // Validity left, on the server's clock: notAfter minus the server's time, or
    // (when it did not say) the whole validity minus the server's usual backdate.
    let validity = creds.not_after.duration_since(creds.not_before).unwrap_or_default();
    let lifetime = match creds.server_time {
        Some(t) => creds.not_after.duration_since(t).unwrap_or_default(),
        None => schedule::lifetime(validity, ASSUMED_BACKDATE),
    };
    Ok(Renewed { not_after: creds.not_after, lifetime, offset_millis })
}

/// Writes what a round got into `--out`: `tls.key` when meshca made the key, then
/// `tls.crt`, then `ca.crt` (meshca's trust bundle, asked for on `channel`, when it
/// verifies the chain at the server's time, else the local anchors: [`ca_bundle`]).
async fn write_credentials(
    settings: &Settings,
    anchors: &TrustAnchors,
    channel: Channel,
    creds: &Credentials,
    received: SystemTime,
) -> Result<(), Error> {
    let verified_at = creds.server_time.unwrap_or(received);
    let fetched = client::trust_bundle(channel).await;
    let bundle = ca_bundle(anchors, fetched, &creds.leaf, &creds.intermediates, verified_at);
    let write = |name: &str, contents: String, access| {
        let path = settings.out.join(name);
        write_atomic(&path, contents.as_bytes(), access).map_err(|source| Error::Write { path, source })
    };
    if let Some(key) = creds.key_pem() {
        write("tls.key", key, Access::Private)?;
    }
    write("tls.crt", creds.chain_pem(), Access::Public)?;
    let ca: String = bundle.certificates().iter().map(|c| to_pem("CERTIFICATE", c)).collect();
    write("ca.crt", ca, Access::Public)
}

/// Connects (presenting `request.client_identity`, if any) and calls Certify;
/// returns the channel as well, for the trust bundle.
async fn certify(
    request: client::Request<'_>,
    now: SystemTime,
) -> Result<(Credentials, Channel), client::Error> {
    let channel = client::connect_as(
        request.addr,
        request.anchors,
        request.server_name,
        request.client_identity.as_ref(),
    )
    .await?;
    let creds = client::certify_on(channel.clone(), request, now).await?;
    Ok((creds, channel))
}

/// What `ca.crt` holds (see the module doc): the fetched bundle when it verifies
/// `leaf` + `intermediates` at `at`, else the local anchors.
fn ca_bundle(
    local: &TrustAnchors,
    fetched: Result<TrustAnchors, client::Error>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    at: SystemTime,
) -> TrustAnchors {
    let usable = fetched.and_then(|bundle| match bundle.verify(leaf, intermediates, at, None) {
        Ok(()) => Ok(bundle),
        Err(reason) => Err(client::Error::BadResponse(format!(
            "the trust bundle does not verify the issued certificate: {reason}"
        ))),
    });
    match usable {
        Ok(bundle) => bundle,
        Err(error) => {
            tracing::warn!(%error, "cannot use meshca's trust bundle; writing the local trust anchors to ca.crt");
            local.clone()
        }
    }
}

/// Runs `--on-renew`, if set, after new files were written. A command that cannot
/// start or exits non-zero is an error: `--once` exits 1 on it; the agent loop logs
/// it and keeps its schedule (the files are in place; the next renewal runs the
/// command again).
pub(crate) async fn notify(settings: &Settings) -> Result<(), Error> {
    match &settings.on_renew {
        Some(cmd) => run_hook(cmd).await,
        None => Ok(()),
    }
}

async fn run_hook(cmd: &str) -> Result<(), Error> {
    #[cfg(windows)]
    let mut command = tokio::process::Command::new("cmd");
    #[cfg(windows)]
    command.args(["/C", cmd]);
    #[cfg(not(windows))]
    let mut command = tokio::process::Command::new("sh");
    #[cfg(not(windows))]
    command.args(["-c", cmd]);
    match command.status().await {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(Error::Hook { reason: s.to_string() }),
        Err(e) => Err(Error::Hook { reason: format!("cannot start it: {e}") }),
    }
}

/// Runs rounds until `shutdown` completes.
pub async fn run(
    settings: Settings,
    clock: Arc<dyn Clock>,
    timer: Arc<dyn Timer>,
    shutdown: impl Future<Output = ()>,
) {
    run_with_status(settings, clock, timer, Arc::new(Status::default()), shutdown).await;
}

/// Like [`run`], reporting every round to `status` (for the admin endpoints).
pub async fn run_with_status(
    settings: Settings,
    clock: Arc<dyn Clock>,
    timer: Arc<dyn Timer>,
    status: Arc<Status>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    // Validity left on the current files, counted down by the time waited.
    let mut left: Option<Duration> = None;
    loop {
        let wait = match renew_once(&settings, clock.as_ref()).await {
            Ok(r) => {
                if let Err(e) = notify(&settings).await {
                    tracing::error!(error = %e, "--on-renew failed");
                }
                attempt = 0;
                left = Some(r.lifetime);
                status.renewed(r.not_after, r.offset_millis);
                let delay = schedule::renewal_delay(r.lifetime, &settings.policy, uniform());
                tracing::info!(
                    identity = %settings.identity,
                    not_after = %humantime::format_rfc3339_seconds(r.not_after),
                    next_renewal_in = ?delay,
                    "certificate renewed"
                );
                delay
            }
            Err(e) => {
                status.failed();
                let delay = schedule::backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, uniform());
                // The server's pushback (over capacity, rate limited) is a floor, not a cap.
                let delay = match &e {
                    Error::Certify(c) => c.retry_after().map_or(delay, |hint| delay.max(hint)),
                    _ => delay,
                };
                // The first failure of a streak names the command that checks each step.
                let check_with = settings.check_with.as_deref().filter(|_| attempt == 0);
                attempt = attempt.saturating_add(1);
                const KEEPING: &str = "renewal failed; keeping the current certificate";
                const RETRYING: &str = "no certificate yet; retrying";
                match (left, check_with) {
                    (Some(l), Some(c)) => {
                        tracing::error!(error = %e, validity_left = ?l, retry_in = ?delay, check_with = c, "{KEEPING}")
                    }
                    (Some(l), None) => {
                        tracing::error!(error = %e, validity_left = ?l, retry_in = ?delay, "{KEEPING}")
                    }
                    (None, Some(c)) => {
                        tracing::error!(error = %e, retry_in = ?delay, check_with = c, "{RETRYING}")
                    }
                    (None, None) => tracing::error!(error = %e, retry_in = ?delay, "{RETRYING}"),
                }
                delay
            }
        };
        tokio::select! {
            () = timer.sleep(wait) => {}
            () = &mut shutdown => return,
        }
        left = left.map(|l| l.saturating_sub(wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
    use crate::ca::issuer::Issuer;
    use crate::ca::profile::Lifetimes;
    use crate::clock::SystemClock;
    use crate::identity::Naming;

    /// Anchors of a fresh CA and a leaf it issued: (anchors, leaf, intermediates).
    fn ca_and_leaf(now: SystemTime) -> (TrustAnchors, CertificateDer<'static>, Vec<CertificateDer<'static>>) {
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let h = hierarchy::generate(&naming, CaKeyType::P256, now, HierarchyLifetimes::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        crate::dev::write_hierarchy(dir.path(), &h).unwrap();
        let anchors = TrustAnchors::load(&dir.path().join("trust-anchors.pem")).unwrap();
        let issuer = Issuer::load(&dir.path().join("issuer"), &anchors, now).unwrap();
        let (_, csr) = client::make_csr(
            "web.default.serviceaccount.identity.meshca-system.cluster.local",
            KeyType::P256,
        )
        .unwrap();
        let csr = crate::ca::csr::check(
            &csr,
            &crate::ca::csr::Expected {
                dns_name: Some("web.default.serviceaccount.identity.meshca-system.cluster.local"),
                spiffe_id: "spiffe://cluster.local/ns/default/sa/web",
            },
            &crate::ca::csr::KeyPolicy::default(),
        )
        .unwrap();
        let identity = naming.identity("default", "web").unwrap();
        let names =
            crate::ca::profile::Names { dns_name: Some(&identity.dns_name), spiffe_id: &identity.spiffe_id };
        let leaf = issuer.issue(&names, &csr, &Lifetimes::default(), now).unwrap();
        (anchors, leaf.der, issuer.intermediates().to_vec())
    }

    fn roots(anchors: &TrustAnchors) -> Vec<CertificateDer<'static>> {
        anchors.certificates().to_vec()
    }

    #[test]
    fn ca_crt_is_the_fetched_bundle_when_it_verifies_the_issued_chain() {
        let now = SystemClock.now();
        let (local, leaf, intermediates) = ca_and_leaf(now);
        let (other, _, _) = ca_and_leaf(now);
        // A rotation in progress: the bundle holds the current root and the next one.
        let both = [roots(&local), roots(&other)].concat();
        let fetched = TrustAnchors::from_certs(both.clone(), std::path::Path::new("bundle")).unwrap();
        assert_eq!(roots(&ca_bundle(&local, Ok(fetched), &leaf, &intermediates, now)), both);
    }

    #[test]
    fn ca_crt_falls_back_to_the_local_anchors_when_the_bundle_is_unusable() {
        let now = SystemClock.now();
        let (local, leaf, intermediates) = ca_and_leaf(now);
        let (other, _, _) = ca_and_leaf(now);
        // Unreachable or unimplemented: the local anchors.
        let refused = Err(client::Error::Refused {
            code: tonic::Code::Unimplemented,
            message: "no".into(),
            reason: None,
            retry_after: None,
        });
        assert_eq!(roots(&ca_bundle(&local, refused, &leaf, &intermediates, now)), roots(&local));
        // A bundle without the root of the certificate just issued: the local anchors.
        assert_eq!(roots(&ca_bundle(&local, Ok(other), &leaf, &intermediates, now)), roots(&local));
    }
}
