//! Where `--token-validation jwks` gets the token issuer's public keys, and how it
//! keeps them current.
//!
//! [`Source`] names the keys: a JWKS file (`--jwks-file`), an HTTPS URL
//! (`--jwks-url`), or — when neither is given — the cluster's service-account
//! issuer discovery through the Kubernetes API client:
//! `GET /.well-known/openid-configuration` names the `issuer` (the default for
//! `--token-issuer`), and the keys are read with `GET /openid/v1/jwks` from the API
//! server, which serves them there whatever the document's `jwks_uri` says (that
//! address may be outside the cluster or need other credentials; it is logged).
//!
//! [`RotatingJwksAuthenticator`] keeps the keys of the synchronous
//! [`JwksAuthenticator::verify`] current:
//! - a token whose key id is unknown triggers a refresh and is verified again
//!   against the new keys; such refreshes start at most once per
//!   `refresh_min_interval` (monotonic clock), so tokens with made-up key ids cannot
//!   make meshca hammer the key source;
//! - the keys are also re-fetched every `refresh_interval`;
//! - one refresh runs at a time: requests arriving while one runs wait for it
//!   instead of starting another; it runs as a task of its own, so a caller giving
//!   up does not abandon the others;
//! - a refresh that fails (unreachable, timed out, HTTP error, oversized, not a
//!   usable JWKS) keeps the keys held, and is logged and counted. The first fetch,
//!   at start, must succeed.
//!
//! Verifying tokens is `jwt`'s business; this module only fetches and swaps key
//! sets. Response bodies are never quoted in errors or logs.

use super::jwt::{Algorithm, Jwks, JwksAuthenticator, Settings as JwtSettings};
use super::{AuthFuture, Authenticator, Error, Subject};
use http_body_util::{BodyExt, Limited};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{Counter, Registry, ScrapeGauge};

/// Default period of the scheduled refresh.
pub(crate) const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Default shortest time between two refreshes triggered by unknown key ids.
pub(crate) const DEFAULT_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound on one fetch, connecting included.
pub(crate) const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery document or JWKS accepted, in bytes.
pub(crate) const MAX_DOCUMENT: usize = 1024 * 1024;
/// The API server path of the service-account issuer discovery document.
pub(crate) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The API server path of the service-account token signing keys.
pub(crate) const JWKS_PATH: &str = "/openid/v1/jwks";

/// Where the token issuer's public keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A JWKS file, re-read at each refresh.
    File(PathBuf),
    /// An `https://` URL serving a JWKS; `ca_file` (PEM) replaces the system's
    /// trusted roots for it.
    Url { url: String, ca_file: Option<PathBuf> },
    /// The cluster's service-account issuer, through the Kubernetes API client.
    /// `None`: `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
    Discovery { kubeconfig: Option<PathBuf> },
}

/// How keys are refreshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Period of the scheduled refresh.
    pub refresh_interval: Duration,
    /// Shortest time between two refreshes triggered by unknown key ids.
    pub refresh_min_interval: Duration,
    /// Bound on one fetch, connecting included.
    pub fetch_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            refresh_min_interval: DEFAULT_REFRESH_MIN_INTERVAL,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// Why a key set or discovery document could not be fetched. Never quotes a
/// response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FetchError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    /// No connection, or the connection failed (TLS included).
    #[error("cannot reach {what} ({reason})")]
    Unreachable { what: String, reason: String },
    /// No complete answer within the fetch timeout.
    #[error("{what} did not answer within {}", humantime::format_duration(*.timeout))]
    TimedOut { what: String, timeout: Duration },
    /// An HTTP error status; `hint` says what to do about the usual ones.
    #[error("{what} answered {code}{hint}")]
    Status { what: String, code: u16, hint: &'static str },
    /// The body is larger than [`MAX_DOCUMENT`].
    #[error("{what} sent more than {} bytes", MAX_DOCUMENT)]
    TooLarge { what: String },
    /// The body is not what was asked for (`reason` never quotes it).
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

/// Fetches the raw bytes of a key set.
pub(crate) type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, FetchError>> + Send + 'a>>;

/// A place key sets are fetched from.
pub(crate) trait KeyFetcher: Send + Sync + 'static {
    /// The current key set's bytes (a JWKS document).
    fn fetch(&self) -> FetchFuture<'_>;
    /// Where the keys come from, for logs and errors: a path, or a URL without
    /// credentials.
    fn describe(&self) -> String;
}

/// Reads a JWKS file.
#[derive(Debug)]
pub(crate) struct FileFetcher(pub PathBuf);

impl KeyFetcher for FileFetcher {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let read = |e: std::io::Error| FetchError::Read { path: self.describe(), reason: e.to_string() };
            let file = tokio::fs::File::open(&self.0).await.map_err(read)?;
            let mut bytes = Vec::new();
            let mut limited = tokio::io::AsyncReadExt::take(file, MAX_DOCUMENT as u64 + 1);
            tokio::io::AsyncReadExt::read_to_end(&mut limited, &mut bytes).await.map_err(read)?;
            if bytes.len() > MAX_DOCUMENT {
                return Err(FetchError::TooLarge { what: self.describe() });
            }
            Ok(bytes)
        })
    }

    fn describe(&self) -> String {
        format!("JWKS file {}", self.0.display())
    }
}

/// GETs one path through a Kubernetes API client (the API server's, or one built
/// for a `--jwks-url`).
pub(crate) struct HttpFetcher {
    client: kube::Client,
    path: String,
    what: String,
    timeout: Duration,
    /// The Kubernetes API server's: errors carry its RBAC hints.
    kube: bool,
}

impl fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFetcher").field("what", &self.what).finish_non_exhaustive()
    }
}

impl KeyFetcher for HttpFetcher {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(get(&self.client, &self.path, &self.what, self.timeout, self.kube))
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// GET `path` through `client`: the body, at most [`MAX_DOCUMENT`] bytes, of a 2xx
/// answer arriving within `timeout`. `kube`: the API server's, whose 401 and 403
/// have known causes.
async fn get(
    client: &kube::Client,
    path: &str,
    what: &str,
    timeout: Duration,
    kube: bool,
) -> Result<Vec<u8>, FetchError> {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, "application/json")
        .body(kube::client::Body::empty())
        .map_err(|e| FetchError::Invalid {
            what: what.into(),
            reason: format!("unusable request path: {e}"),
        })?;
    let exchange = async {
        let response = client.send(request).await.map_err(|e| unreachable(what, &e))?;
        let status = response.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                _ if !kube => "",
                401 => ": it refused meshca's credentials (check --kubeconfig or the pod's service account token)",
                403 => ": meshca may not read the service-account issuer discovery (bind its service account to the system:service-account-issuer-discovery cluster role)",
                404 => ": nothing is served there",
                _ => "",
            };
            return Err(FetchError::Status { what: what.into(), code: status.as_u16(), hint });
        }
        match Limited::new(response.into_body(), MAX_DOCUMENT).collect().await {
            Ok(body) => Ok(body.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(FetchError::TooLarge { what: what.into() })
            }
            Err(e) => Err(FetchError::Unreachable { what: what.into(), reason: innermost(e.as_ref()) }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(FetchError::TimedOut { what: what.into(), timeout }))
}

fn unreachable(what: &str, e: &kube::Error) -> FetchError {
    let reason = if connection_refused(e) { "connection refused".to_owned() } else { innermost(e) };
    FetchError::Unreachable { what: what.into(), reason }
}

/// Whether one of `e`'s causes is a connection the peer refused.
fn connection_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = e.source();
    while let Some(source) = cause {
        let io = source.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        cause = source.source();
    }
    false
}

/// The innermost cause's text, cut to 200 characters.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string().chars().take(200).collect()
}

/// The service-account issuer discovery document, the fields meshca reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Discovered {
    /// `issuer`: what the cluster's tokens carry as `iss`.
    pub issuer: String,
    /// `jwks_uri`, for logs: keys are read from [`JWKS_PATH`] on the API server.
    pub jwks_uri: Option<String>,
}

impl Discovered {
    /// Parses a discovery document: a JSON object with a non-empty string `issuer`.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Discovered, FetchError> {
        let invalid = |reason: &str| FetchError::Invalid {
            what: format!("the discovery document ({DISCOVERY_PATH})"),
            reason: reason.into(),
        };
        let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| invalid("not JSON"))?;
        let issuer = match doc.get("issuer") {
            Some(serde_json::Value::String(issuer)) if !issuer.is_empty() => issuer.clone(),
            _ => return Err(invalid("no \"issuer\" string")),
        };
        let jwks_uri = doc.get("jwks_uri").and_then(|u| u.as_str()).map(str::to_owned);
        Ok(Discovered { issuer, jwks_uri })
    }
}

/// Loads the Kubernetes client configuration: `kubeconfig` when given, else
/// `KUBECONFIG`, `~/.kube/config` or the in-cluster service account (in that
/// order). `purpose` completes "no Kubernetes API server to …" in the error.
pub(crate) async fn kube_config(kubeconfig: Option<&Path>, purpose: &str) -> Result<kube::Config, Error> {
    match kubeconfig {
        Some(path) => {
            let bad = |e: &KubeconfigError| Error::Config {
                reason: format!("--kubeconfig {}: {}", path.display(), kubeconfig_reason(e)),
            };
            let file = Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| bad(&e))
        }
        None => kube::Config::infer().await.map_err(|e| {
            let kubeconfig = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<KubeconfigError>())
                .map_or_else(|| "unusable".to_owned(), kubeconfig_reason);
            Error::Config {
                reason: format!(
                    "no Kubernetes API server to {purpose}: not running in a pod with a service account, \
                     and KUBECONFIG or ~/.kube/config: {kubeconfig}; pass --kubeconfig FILE"
                ),
            }
        }),
    }
}

/// Why the API server could not be reached, in words: a refused connection said
/// as such, anything else by its innermost cause (at most 200 characters; transport
/// errors carry no token). `context` is appended, e.g. " (pod lookup)".
pub(crate) fn unreachable_reason(err: &kube::Error, context: &str) -> String {
    if connection_refused(err) {
        format!("the Kubernetes API server refused the connection{context}")
    } else {
        format!("cannot reach the Kubernetes API server{context} ({})", innermost(err))
    }
}

/// A kubeconfig problem in words; YAML errors are not quoted, as they may show the
/// credentials in the file.
fn kubeconfig_reason(e: &KubeconfigError) -> String {
    match e {
        KubeconfigError::Parse(_) => "not valid kubeconfig YAML".into(),
        other => other.to_string(),
    }
}

/// A client for `config` that neither retries on its own (callers do, within
/// their timeouts) nor waits longer than `timeout` to connect.
pub(crate) fn kube_client(mut config: kube::Config, timeout: Duration) -> Result<kube::Client, Error> {
    config.default_retry = false;
    config.connect_timeout = Some(timeout);
    kube::Client::try_from(config)
        .map_err(|e| Error::Config { reason: format!("cannot build the Kubernetes client: {e}") })
}

/// A fetcher for `--jwks-url`: HTTPS only, trusting `ca_file` (PEM) instead of the
/// system's roots when given. No credentials are sent.
pub(crate) fn url_fetcher(
    url: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<HttpFetcher, Error> {
    let bad = |reason: &str| Error::Config { reason: format!("--jwks-url: {reason}") };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must be an https:// URL"));
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    let base: http::Uri = format!("https://{authority}").parse().map_err(|_| bad("has no usable host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut config = kube::Config::new(base);
    if let Some(ca_file) = ca_file {
        use rustls_pki_types::pem::PemObject as _;
        let bad_ca = |reason: String| Error::Config {
            reason: format!("--jwks-ca-file {}: {reason}", ca_file.display()),
        };
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| bad_ca(e.to_string()))?
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_ca(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad_ca("no CERTIFICATE block".into()));
        }
        config.root_cert = Some(certs);
    }
    let what = format!("https://{authority}{}", uri.path());
    Ok(HttpFetcher { client: kube_client(config, timeout)?, path, what, timeout, kube: false })
}

/// Counters behind the `meshca_jwks_*` metrics.
#[derive(Default)]
struct Counters {
    refreshes: Counter,
    failures: Counter,
    throttled: Counter,
}

/// What started a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// A token named a key id the set of generation `seen` does not hold.
    UnknownKey { seen: u64 },
    /// The refresh interval elapsed.
    Scheduled,
}

#[derive(Default)]
struct RefreshState {
    /// The refresh running now, if any; its sender says `true` when it is done.
    running: Option<watch::Receiver<bool>>,
    /// When the last refresh triggered by an unknown key id started.
    last_unknown_key: Option<Instant>,
    /// Refreshes finished (successful or not); a caller that saw an older key set
    /// than the one held now only verifies again.
    generation: u64,
    /// Digest of the last key set fetched, to log changes once.
    digest: Option<[u8; 32]>,
}

struct Shared {
    core: JwksAuthenticator,
    fetcher: Arc<dyn KeyFetcher>,
    settings: Settings,
    state: Mutex<RefreshState>,
    counters: Counters,
}

/// JWKS verification whose keys follow the key source (see the module notes).
pub(crate) struct RotatingJwksAuthenticator {
    shared: Arc<Shared>,
}

impl fmt::Debug for RotatingJwksAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingJwksAuthenticator")
            .field("source", &self.shared.fetcher.describe())
            .field("keys", &self.shared.core.keys())
            .field("settings", &self.shared.settings)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    // SHA-256 digests are 32 bytes, always.
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl RotatingJwksAuthenticator {
    /// Sets up `source` and starts: the API server's discovery document supplies
    /// the issuer when `issuer` is `None` (only allowed with [`Source::Discovery`]).
    pub(crate) async fn connect(
        source: &Source,
        issuer: Option<String>,
        audiences: Vec<String>,
        leeway: Duration,
        settings: Settings,
    ) -> Result<Self, Error> {
        let (fetcher, issuer): (Arc<dyn KeyFetcher>, String) = match source {
            Source::File(path) => (Arc::new(FileFetcher(path.clone())), required(issuer, "--jwks-file")?),
            Source::Url { url, ca_file } => (
                Arc::new(url_fetcher(url, ca_file.as_deref(), settings.fetch_timeout)?),
                required(issuer, "--jwks-url")?,
            ),
            Source::Discovery { kubeconfig } => {
                let config = kube_config(kubeconfig.as_deref(), "discover the token issuer from").await?;
                let client = kube_client(config, settings.fetch_timeout)?;
                let what = format!("the Kubernetes API server ({DISCOVERY_PATH})");
                let document = get(&client, DISCOVERY_PATH, &what, settings.fetch_timeout, true)
                    .await
                    .and_then(|bytes| Discovered::parse(&bytes))
                    .map_err(|e| Error::Config {
                        reason: format!("service-account issuer discovery: {e}"),
                    })?;
                tracing::info!(
                    issuer = %document.issuer,
                    jwks_uri = document.jwks_uri.as_deref().unwrap_or("-"),
                    "discovered the service-account token issuer; keys are read from {JWKS_PATH}"
                );
                let issuer = match issuer {
                    Some(configured) if configured != document.issuer => {
                        tracing::warn!(
                            configured = %configured,
                            discovered = %document.issuer,
                            "--token-issuer differs from the cluster's discovered issuer; accepting only the configured one"
                        );
                        configured
                    }
                    _ => document.issuer,
                };
                let what = format!("the Kubernetes API server ({JWKS_PATH})");
                let path = JWKS_PATH.to_owned();
                let fetcher = HttpFetcher { client, path, what, timeout: settings.fetch_timeout, kube: true };
                (Arc::new(fetcher), issuer)
            }
        };
        let jwt =
            JwtSettings { issuer, audiences, leeway, algorithms: vec![Algorithm::RS256, Algorithm::ES256] };
        Self::start(fetcher, jwt, settings).await
    }

    /// Fetches the keys once (that fetch must succeed, or this is an
    /// [`Error::Config`]) and starts the scheduled refresh, which ends once this
    /// authenticator is dropped.
    pub(crate) async fn start(
        fetcher: Arc<dyn KeyFetcher>,
        jwt: JwtSettings,
        settings: Settings,
    ) -> Result<Self, Error> {
        let what = fetcher.describe();
        let bytes = tokio::time::timeout(settings.fetch_timeout, fetcher.fetch())
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::TimedOut { what: what.clone(), timeout: settings.fetch_timeout })
            })
            .map_err(|e| Error::Config { reason: format!("cannot load the token signing keys: {e}") })?;
        let jwks = Jwks::from_json(&bytes).map_err(|e| {
            let reason = if let Error::Config { reason } = e { reason } else { e.to_string() };
            Error::Config { reason: format!("{what}: {reason}") }
        })?;
        tracing::info!(keys = jwks.key_count(), source = %what, issuer = %jwt.issuer, "token signing keys loaded");
        let state = RefreshState { digest: Some(digest(&bytes)), ..RefreshState::default() };
        let shared = Arc::new(Shared {
            core: JwksAuthenticator::new(jwt, jwks),
            fetcher,
            settings,
            state: Mutex::new(state),
            counters: Counters::default(),
        });
        let first = Instant::now() + settings.refresh_interval;
        tokio::spawn(scheduled(Arc::downgrade(&shared), first, settings.refresh_interval));
        Ok(RotatingJwksAuthenticator { shared })
    }

    /// The verifier with the current keys.
    #[cfg(test)]
    fn core(&self) -> &JwksAuthenticator {
        &self.shared.core
    }

    async fn check(&self, token: &[u8], now: SystemTime) -> Result<Subject, Error> {
        let seen = lock(&self.shared.state).generation;
        match self.shared.core.verify(token, now) {
            Err(Error::UnknownKey) => {
                // Whether this refreshed, joined a refresh, found one finished since
                // or was throttled, the keys held now are the best there are.
                self.shared.refresh(Trigger::UnknownKey { seen }).await;
                self.shared.core.verify(token, now)
            }
            other => other,
        }
    }
}

fn required(issuer: Option<String>, source: &str) -> Result<String, Error> {
    issuer.ok_or_else(|| Error::Config { reason: format!("--token-issuer is required with {source}") })
}

/// Refreshes at `next` and every `interval` after (not measured from each refresh) until
/// the authenticator is gone; a refresh outlasting the interval skips the missed turns.
async fn scheduled(shared: Weak<Shared>, mut next: Instant, interval: Duration) {
    loop {
        tokio::time::sleep_until(next).await;
        let Some(shared) = shared.upgrade() else { return };
        shared.refresh(Trigger::Scheduled).await;
        drop(shared);
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now + interval;
        }
    }
}

impl Shared {
    /// Runs a refresh, or waits for the one running. An unknown key id starts none
    /// when a refresh finished since its caller verified, or (rate limit) when one
    /// started less than the minimum interval ago.
    async fn refresh(self: &Arc<Self>, trigger: Trigger) {
        let mut done = {
            let mut state = lock(&self.state);
            match &state.running {
                // A closed channel means the task running it died: start anew.
                Some(running) if running.has_changed().is_ok() => running.clone(),
                _ => {
                    let now = Instant::now();
                    if let Trigger::UnknownKey { seen } = trigger {
                        if seen != state.generation {
                            return;
                        }
                        let min = self.settings.refresh_min_interval;
                        if state.last_unknown_key.is_some_and(|last| now.duration_since(last) < min) {
                            self.counters.throttled.inc();
                            return;
                        }
                        state.last_unknown_key = Some(now);
                    }
                    let (tx, rx) = watch::channel(false);
                    state.running = Some(rx.clone());
                    let shared = self.clone();
                    tokio::spawn(async move {
                        shared.fetch_and_swap(trigger).await;
                        let mut state = lock(&shared.state);
                        state.running = None;
                        state.generation += 1;
                        drop(state);
                        let _ = tx.send(true);
                    });
                    rx
                }
            }
        };
        let _ = done.wait_for(|done| *done).await;
    }

    async fn fetch_and_swap(&self, trigger: Trigger) {
        self.counters.refreshes.inc();
        let what = self.fetcher.describe();
        let timeout = self.settings.fetch_timeout;
        let fetched = tokio::time::timeout(timeout, self.fetcher.fetch())
            .await
            .unwrap_or_else(|_| Err(FetchError::TimedOut { what: what.clone(), timeout }));
        let parsed = fetched.map_err(|e| e.to_string()).and_then(|bytes| {
            let jwks = Jwks::from_json(&bytes).map_err(|e| match e {
                Error::Config { reason } => format!("{what}: {reason}"),
                other => other.to_string(),
            })?;
            Ok((jwks, digest(&bytes)))
        });
        match parsed {
            Ok((jwks, new)) => {
                let keys = jwks.key_count();
                self.core.replace_keys(jwks);
                let changed = lock(&self.state).digest.replace(new) != Some(new);
                if changed {
                    tracing::info!(keys, source = %what, ?trigger, "token signing keys changed");
                } else {
                    tracing::debug!(keys, source = %what, ?trigger, "token signing keys unchanged");
                }
            }
            Err(reason) => {
                self.counters.failures.inc();
                tracing::warn!(
                    error = %reason,
                    ?trigger,
                    keys = self.core.keys().key_count(),
                    "refreshing the token signing keys failed; keeping the keys held"
                );
            }
        }
    }
}

impl Authenticator for RotatingJwksAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a> {
        Box::pin(self.check(token, now))
    }

    fn name(&self) -> &'static str {
        "jwks"
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.shared.counters;
        let counters = [
            (
                "meshca_jwks_refreshes",
                "Key set refreshes started after the first load (unknown key ids and schedule)",
                &c.refreshes,
            ),
            ("meshca_jwks_refresh_failures", "Key set refreshes that failed; the keys held were kept", &c.failures),
            (
                "meshca_jwks_refresh_throttled",
                "Unknown key ids that did not refresh the keys: one did less than the minimum interval before",
                &c.throttled,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let shared = self.shared.clone();
        let keys = move || i64::try_from(shared.core.keys().key_count()).unwrap_or(i64::MAX);
        registry.register("meshca_jwks_keys", "Signing keys in the key set in use", ScrapeGauge::new(keys));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::dev::{DevSigner, TokenClaims};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const T: u64 = 1_700_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T)
    }

    fn jwt() -> JwtSettings {
        JwtSettings {
            issuer: ISS.into(),
            audiences: vec!["meshca".into()],
            leeway: Duration::from_secs(60),
            algorithms: vec![Algorithm::ES256, Algorithm::RS256],
        }
    }

    fn token(signer: &DevSigner) -> Vec<u8> {
        let claims = TokenClaims::projected(ISS, "meshca", "web", "web-sa", now(), Duration::from_secs(600));
        signer.sign(&claims).unwrap().into_bytes()
    }

    /// A token signed by `signer` but naming another key id.
    fn bogus_kid(signer: &DevSigner, kid: &str) -> Vec<u8> {
        let token = String::from_utf8(token(signer)).unwrap();
        let payload = crate::jose::decode(token.split('.').nth(1).unwrap()).unwrap();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid}).to_string();
        signer.sign_raw(header.as_bytes(), &payload).into_bytes()
    }

    /// A JWKS holding the public keys of `signers`.
    fn jwks(signers: &[&DevSigner]) -> Vec<u8> {
        let keys: Vec<serde_json::Value> = signers
            .iter()
            .map(|s| serde_json::from_str::<serde_json::Value>(&s.jwks_json()).unwrap()["keys"][0].clone())
            .collect();
        serde_json::json!({ "keys": keys }).to_string().into_bytes()
    }

    /// Answers what it is told to; counts calls; when gated, each call waits for the gate.
    struct Fake {
        answer: Mutex<Result<Vec<u8>, FetchError>>,
        calls: AtomicUsize,
        gate: Option<watch::Receiver<bool>>,
    }

    impl Fake {
        fn new(answer: Vec<u8>) -> Arc<Fake> {
            Arc::new(Fake { answer: Mutex::new(Ok(answer)), calls: AtomicUsize::new(0), gate: None })
        }
        fn gated(answer: Vec<u8>) -> (Arc<Fake>, watch::Sender<bool>) {
            let (open, gate) = watch::channel(false);
            let fake = Fake { answer: Mutex::new(Ok(answer)), calls: AtomicUsize::new(0), gate: Some(gate) };
            (Arc::new(fake), open)
        }
        fn answer(&self, answer: Result<Vec<u8>, FetchError>) {
            *self.answer.lock().unwrap() = answer;
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl KeyFetcher for Fake {
        fn fetch(&self) -> FetchFuture<'_> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(mut gate) = self.gate.clone() {
                    let _ = gate.wait_for(|open| *open).await;
                }
                self.answer.lock().unwrap().clone()
            })
        }
        fn describe(&self) -> String {
            "the fake key source".into()
        }
    }

    fn settings(min: u64) -> Settings {
        Settings { refresh_min_interval: Duration::from_secs(min), ..Settings::default() }
    }

    async fn start(fake: &Arc<Fake>, settings: Settings) -> RotatingJwksAuthenticator {
        RotatingJwksAuthenticator::start(fake.clone(), jwt(), settings).await.unwrap()
    }

    fn metric(auth: &RotatingJwksAuthenticator, name: &str) -> u64 {
        let out = crate::metrics::render(|r| auth.register_metrics(r));
        let line =
            out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{out}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Lets the other tasks run until `done` holds; a bounded number of turns.
    async fn settle(done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the other tasks never got there");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_signed_with_a_rotated_key_is_accepted_after_exactly_one_refresh() {
        let (old, new) = (DevSigner::generate().unwrap().0, DevSigner::generate().unwrap().0);
        let fake = Fake::new(jwks(&[&old]));
        let auth = start(&fake, Settings::default()).await;
        assert_eq!((fake.calls(), metric(&auth, "meshca_jwks_keys")), (1, 1));
        fake.answer(Ok(jwks(&[&old, &new])));
        let subject = auth.authenticate(&token(&new), now()).await.unwrap();
        assert_eq!(subject.service_account, "web-sa");
        assert_eq!(fake.calls(), 2);
        auth.authenticate(&token(&new), now()).await.unwrap();
        auth.authenticate(&token(&old), now()).await.unwrap();
        assert_eq!(fake.calls(), 2, "known keys need no refresh");
        assert_eq!(metric(&auth, "meshca_jwks_refreshes_total"), 1);
        assert_eq!(metric(&auth, "meshca_jwks_keys"), 2);
        assert_eq!(auth.name(), "jwks");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_unknown_key_ids_share_one_refresh_even_without_a_min_interval() {
        let (old, new) = (DevSigner::generate().unwrap().0, DevSigner::generate().unwrap().0);
        let (fake, open) = Fake::gated(jwks(&[&old]));
        open.send_replace(true);
        let auth = Arc::new(start(&fake, settings(0)).await);
        open.send_replace(false);
        fake.answer(Ok(jwks(&[&old, &new])));
        let t = token(&new);
        let waiting: Vec<_> = (0..100)
            .map(|_| {
                let (auth, t) = (auth.clone(), t.clone());
                tokio::spawn(async move { auth.authenticate(&t, now()).await })
            })
            .collect();
        settle(|| fake.calls() == 2).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fake.calls(), 2, "everyone waits for the one refresh");
        open.send_replace(true);
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap().namespace, "web");
        }
        assert_eq!((fake.calls(), metric(&auth, "meshca_jwks_refreshes_total")), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_key_ids_refresh_at_most_once_per_min_interval() {
        let signer = DevSigner::generate().unwrap().0;
        let fake = Fake::new(jwks(&[&signer]));
        let auth = start(&fake, settings(10)).await;
        for i in 0..5 {
            let refused = auth.authenticate(&bogus_kid(&signer, &format!("made-up-{i}")), now()).await;
            assert!(matches!(refused, Err(Error::UnknownKey)), "{refused:?}");
        }
        assert_eq!(fake.calls(), 2, "one refresh for five made-up key ids");
        assert_eq!(metric(&auth, "meshca_jwks_refresh_throttled_total"), 4);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let _ = auth.authenticate(&bogus_kid(&signer, "again"), now()).await;
        assert_eq!(fake.calls(), 2);
        tokio::time::advance(Duration::from_millis(1)).await;
        let _ = auth.authenticate(&bogus_kid(&signer, "again"), now()).await;
        assert_eq!(fake.calls(), 3, "the interval passed: one more");
        assert!(auth.authenticate(&token(&signer), now()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_keys_held_and_is_counted() {
        let (old, new) = (DevSigner::generate().unwrap().0, DevSigner::generate().unwrap().0);
        let fake = Fake::new(jwks(&[&old]));
        let auth = start(&fake, settings(0)).await;
        let failures = [
            Err(FetchError::Status { what: "x".into(), code: 500, hint: "" }),
            Ok(b"<html>".to_vec()),
            Ok(br#"{"keys":[]}"#.to_vec()),
        ];
        for (i, failure) in failures.into_iter().enumerate() {
            fake.answer(failure);
            let refused = auth.authenticate(&token(&new), now()).await;
            assert!(matches!(refused, Err(Error::UnknownKey)), "{refused:?}");
            assert!(auth.authenticate(&token(&old), now()).await.is_ok(), "the old key still works");
            assert_eq!(metric(&auth, "meshca_jwks_refresh_failures_total"), i as u64 + 1);
        }
        assert_eq!(metric(&auth, "meshca_jwks_keys"), 1);
        fake.answer(Ok(jwks(&[&new])));
        assert!(auth.authenticate(&token(&new), now()).await.is_ok());
        assert_eq!(metric(&auth, "meshca_jwks_refreshes_total"), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_refreshed_on_schedule_and_the_schedule_ends_with_the_authenticator() {
        let (old, new) = (DevSigner::generate().unwrap().0, DevSigner::generate().unwrap().0);
        let fake = Fake::new(jwks(&[&old]));
        let auth = start(&fake, Settings::default()).await;
        tokio::time::advance(DEFAULT_REFRESH_INTERVAL - Duration::from_secs(1)).await;
        settle(|| true).await;
        assert_eq!(fake.calls(), 1);
        fake.answer(Ok(jwks(&[&new])));
        tokio::time::advance(Duration::from_secs(1)).await;
        settle(|| fake.calls() == 2).await;
        settle(|| auth.core().keys().key_count() == 1 && auth.core().verify(&token(&new), now()).is_ok())
            .await;
        assert!(
            matches!(auth.core().verify(&token(&old), now()), Err(Error::UnknownKey)),
            "the old key is gone"
        );
        tokio::time::advance(DEFAULT_REFRESH_INTERVAL).await;
        settle(|| fake.calls() == 3).await;
        drop(auth);
        tokio::time::advance(DEFAULT_REFRESH_INTERVAL * 3).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fake.calls(), 3, "no refresh once the authenticator is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_fetch_must_succeed_and_its_failure_names_the_source() {
        let fake = Fake::new(b"{}".to_vec());
        let err =
            RotatingJwksAuthenticator::start(fake.clone(), jwt(), Settings::default()).await.unwrap_err();
        assert!(
            matches!(err, Error::Config { .. }) && err.to_string().contains("the fake key source"),
            "{err}"
        );
        let (held, _closed) = Fake::gated(b"{}".to_vec());
        let err = RotatingJwksAuthenticator::start(held, jwt(), Settings::default()).await.unwrap_err();
        assert!(err.to_string().contains("did not answer within 5s"), "{err}");
    }

    #[test]
    fn a_discovery_document_needs_an_issuer_and_may_name_its_jwks_uri() {
        let doc = br#"{"issuer":"https://kubernetes.default.svc","jwks_uri":"https://10.0.0.1:6443/openid/v1/jwks"}"#;
        let found = Discovered::parse(doc).unwrap();
        assert_eq!(found.issuer, "https://kubernetes.default.svc");
        assert_eq!(found.jwks_uri.as_deref(), Some("https://10.0.0.1:6443/openid/v1/jwks"));
        for bad in [&b"{}"[..], b"[]", b"<html>", br#"{"issuer":""}"#, br#"{"issuer":7}"#] {
            assert!(matches!(Discovered::parse(bad), Err(FetchError::Invalid { .. })));
        }
        let err = Discovered::parse(b"secret-marker-91c").unwrap_err().to_string();
        assert!(!err.contains("secret-marker"), "{err}");
    }

    #[tokio::test]
    async fn a_jwks_url_must_be_https_without_credentials() {
        let t = DEFAULT_FETCH_TIMEOUT;
        for (url, words) in [
            ("http://issuer.example/keys", "https://"),
            ("https://user:pw@issuer.example/keys", "credentials"),
            ("not a url", "not a URL"),
            ("/keys", "https://"),
        ] {
            let err = url_fetcher(url, None, t).unwrap_err().to_string();
            assert!(err.contains("--jwks-url") && err.contains(words), "{url}: {err}");
        }
        let fetcher = url_fetcher("https://issuer.example:8443/keys?v=1", None, t).unwrap();
        assert_eq!(
            (fetcher.path.as_str(), fetcher.describe()),
            ("/keys?v=1", "https://issuer.example:8443/keys".into())
        );
        let missing = url_fetcher("https://issuer.example/keys", Some(Path::new("/nonexistent/ca.pem")), t);
        assert!(missing.unwrap_err().to_string().contains("--jwks-ca-file /nonexistent/ca.pem"));
    }

    #[tokio::test]
    async fn a_jwks_file_is_read_whole_but_not_beyond_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, b"{}").unwrap();
        assert_eq!(FileFetcher(path.clone()).fetch().await.unwrap(), b"{}");
        std::fs::write(&path, vec![b' '; MAX_DOCUMENT]).unwrap();
        assert_eq!(FileFetcher(path.clone()).fetch().await.unwrap().len(), MAX_DOCUMENT);
        std::fs::write(&path, vec![b' '; MAX_DOCUMENT + 1]).unwrap();
        let too_large = FileFetcher(path).fetch().await.unwrap_err();
        assert!(matches!(too_large, FetchError::TooLarge { .. }));
        assert!(too_large.to_string().ends_with("sent more than 1048576 bytes"), "{too_large}");
        let missing = FileFetcher(dir.path().join("none")).fetch().await.unwrap_err().to_string();
        assert!(missing.contains("JWKS file") && missing.contains("none"), "{missing}");
    }

    /// A response body: `data` in one frame, then an error when `fail` is set.
    struct CannedBody {
        data: Option<prost::bytes::Bytes>,
        fail: bool,
    }

    impl http_body::Body for CannedBody {
        type Data = prost::bytes::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            if let Some(data) = self.data.take() {
                return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
            }
            if std::mem::take(&mut self.fail) {
                let reset = std::io::Error::other("the connection was reset mid-body");
                return std::task::Poll::Ready(Some(Err(reset)));
            }
            std::task::Poll::Ready(None)
        }
    }

    type Answer = Result<http::Response<CannedBody>, std::io::Error>;

    /// A transport that answers every request with what the closure makes: the
    /// real kube client and `get` above it, without a network.
    #[derive(Clone)]
    struct Canned(Arc<dyn Fn() -> Answer + Send + Sync>);

    impl tower_service::Service<http::Request<kube::client::Body>> for Canned {
        type Response = http::Response<CannedBody>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Answer>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            std::future::ready((self.0)())
        }
    }

    fn canned(kube: bool, answer: impl Fn() -> Answer + Send + Sync + 'static) -> HttpFetcher {
        HttpFetcher {
            client: kube::Client::new(Canned(Arc::new(answer)), "default"),
            path: JWKS_PATH.into(),
            what: "the keys".into(),
            timeout: DEFAULT_FETCH_TIMEOUT,
            kube,
        }
    }

    fn status(code: u16) -> impl Fn() -> Answer + Send + Sync + 'static {
        move || {
            let body = CannedBody { data: Some("{}".into()), fail: false };
            Ok(http::Response::builder().status(code).body(body).unwrap())
        }
    }

    /// Each error status is reported with its code; the API server's (not a
    /// `--jwks-url`'s) 401, 403 and 404 also say what usually causes them.
    #[tokio::test]
    async fn error_statuses_are_reported_with_the_api_servers_usual_causes() {
        for (code, hint) in [
            (401, "it refused meshca's credentials (check --kubeconfig"),
            (403, "bind its service account to the system:service-account-issuer-discovery cluster role"),
            (404, "nothing is served there"),
            (500, ""),
        ] {
            let err = canned(true, status(code)).fetch().await.unwrap_err();
            assert!(matches!(err, FetchError::Status { code: c, .. } if c == code), "{err:?}");
            let text = err.to_string();
            match hint {
                "" => assert_eq!(text, format!("the keys answered {code}")),
                hint => {
                    assert!(text.starts_with(&format!("the keys answered {code}: ")) && text.contains(hint))
                }
            }
            let url = canned(false, status(code)).fetch().await.unwrap_err().to_string();
            assert_eq!(url, format!("the keys answered {code}"), "no Kubernetes hint for a --jwks-url");
        }
        assert_eq!(canned(false, status(200)).fetch().await.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn a_body_is_read_up_to_the_size_limit_and_a_broken_one_is_unreachable() {
        let body = |len: usize, fail| {
            move || {
                let body = CannedBody { data: Some(vec![b' '; len].into()), fail };
                Ok(http::Response::new(body))
            }
        };
        assert_eq!(canned(true, body(MAX_DOCUMENT, false)).fetch().await.unwrap().len(), MAX_DOCUMENT);
        let err = canned(true, body(MAX_DOCUMENT + 1, false)).fetch().await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { .. }), "{err:?}");
        let err = canned(true, body(10, true)).fetch().await.unwrap_err();
        assert_eq!(
            err,
            FetchError::Unreachable {
                what: "the keys".into(),
                reason: "the connection was reset mid-body".into()
            }
        );
    }

    /// A refused connection is named as such whatever the OS's words; any other
    /// transport failure is reported by its innermost cause.
    #[tokio::test]
    async fn transport_errors_name_a_refused_connection_or_the_innermost_cause() {
        let failing = |kind, words: &'static str| move || Err(std::io::Error::new(kind, words));
        let refused = canned(true, failing(std::io::ErrorKind::ConnectionRefused, "os words 111"));
        assert_eq!(
            refused.fetch().await.unwrap_err(),
            FetchError::Unreachable { what: "the keys".into(), reason: "connection refused".into() }
        );
        let reset = canned(true, failing(std::io::ErrorKind::ConnectionReset, "reset by the peer"));
        assert_eq!(
            reset.fetch().await.unwrap_err(),
            FetchError::Unreachable { what: "the keys".into(), reason: "reset by the peer".into() }
        );
        assert_eq!(format!("{reset:?}"), r#"HttpFetcher { what: "the keys", .. }"#);
        let long = canned(true, failing(std::io::ErrorKind::Other, "éx".repeat(150).leak()));
        match long.fetch().await.unwrap_err() {
            FetchError::Unreachable { reason, .. } => {
                assert_eq!(reason, "éx".repeat(100), "cut at 200 characters")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn debug_shows_the_source_the_keys_and_the_settings() {
        let signer = DevSigner::generate().unwrap().0;
        let auth = start(&Fake::new(jwks(&[&signer])), Settings::default()).await;
        assert_eq!(
            format!("{auth:?}"),
            "RotatingJwksAuthenticator { source: \"the fake key source\", keys: Jwks { rs256: 0, es256: 1, \
             with_kid: 1 }, settings: Settings { refresh_interval: 300s, refresh_min_interval: 10s, \
             fetch_timeout: 5s } }"
        );
    }

    /// The pod lookup's words for an API server it cannot reach.
    #[test]
    fn unreachable_api_servers_are_named_refused_or_by_the_innermost_cause() {
        let failed = |kind, words: &str| kube::Error::Service(Box::new(std::io::Error::new(kind, words)));
        assert_eq!(
            unreachable_reason(&failed(std::io::ErrorKind::ConnectionRefused, "os words"), " (pod lookup)"),
            "the Kubernetes API server refused the connection (pod lookup)"
        );
        assert_eq!(
            unreachable_reason(&failed(std::io::ErrorKind::TimedOut, "no route"), " (pod lookup)"),
            "cannot reach the Kubernetes API server (pod lookup) (no route)"
        );
    }

    /// A kubeconfig that is not YAML is not quoted (it may hold credentials); one
    /// that cannot be read says why.
    #[tokio::test]
    async fn kubeconfig_problems_name_the_file_and_never_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "users: [{name: a, user: {token: secret-marker-4f1}\n").unwrap();
        let err = kube_config(Some(&path), "test").await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "authenticator configuration is invalid: --kubeconfig {}: not valid kubeconfig YAML",
                path.display()
            )
        );
        let missing = dir.path().join("absent");
        let err = kube_config(Some(&missing), "test").await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "authenticator configuration is invalid: --kubeconfig {}: ",
                missing.display()
            )),
            "{err}"
        );
        assert!(
            err.contains("absent") && err.len() > format!("--kubeconfig {}: ", missing.display()).len() + 16
        );
    }

    /// Lets every runnable task run for a while, without moving the clock.
    async fn run_a_while() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// Scheduled refreshes keep to their grid (every `interval` from the start) when
    /// one is slow, and one that outlasts the interval skips the turns it missed.
    #[tokio::test(start_paused = true)]
    async fn a_slow_scheduled_refresh_keeps_the_grid_and_one_outlasting_the_interval_skips_turns() {
        let signer = DevSigner::generate().unwrap().0;
        let (fake, open) = Fake::gated(jwks(&[&signer]));
        open.send_replace(true);
        let every_ten = Settings {
            refresh_interval: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(60),
            ..settings(10)
        };
        let auth = start(&fake, every_ten).await;
        let generation = || lock(&auth.shared.state).generation;
        open.send_replace(false);
        // At 10 s a refresh that takes 4 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        settle(|| fake.calls() == 2).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        open.send_replace(true);
        settle(|| generation() == 1).await;
        open.send_replace(false);
        // The next is at 20 s, not 10 s after the slow one ended.
        tokio::time::advance(Duration::from_secs(5)).await;
        run_a_while().await;
        assert_eq!(fake.calls(), 2, "no refresh at 19 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle(|| fake.calls() == 3).await;
        // This one takes 25 s: the turns at 30 s and 40 s are skipped; the next is
        // 10 s after it ended, at 55 s.
        tokio::time::advance(Duration::from_secs(25)).await;
        open.send_replace(true);
        settle(|| generation() == 2).await;
        tokio::time::advance(Duration::from_secs(9)).await;
        run_a_while().await;
        assert_eq!(fake.calls(), 3, "no refresh at 54 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle(|| fake.calls() == 4).await;
    }

    /// Its second fetch panics, as a refresh task that dies would.
    struct DiesOnce(AtomicUsize, Vec<u8>);

    impl KeyFetcher for DiesOnce {
        fn fetch(&self) -> FetchFuture<'_> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                assert!(n != 1, "the key refresh dies (expected by this test)");
                Ok(self.1.clone())
            })
        }
        fn describe(&self) -> String {
            "a dying key source".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_task_that_died_is_not_waited_for_the_next_refresh_starts_anew() {
        let signer = DevSigner::generate().unwrap().0;
        let source = Arc::new(DiesOnce(AtomicUsize::new(0), jwks(&[&signer])));
        let auth = RotatingJwksAuthenticator::start(source.clone(), jwt(), settings(0)).await.unwrap();
        let unknown = bogus_kid(&signer, "unknown");
        for calls in [2, 3] {
            assert!(matches!(auth.authenticate(&unknown, now()).await, Err(Error::UnknownKey)));
            assert_eq!(source.0.load(Ordering::SeqCst), calls);
        }
    }

    /// A caller whose unknown key id was seen against an older key set than the one
    /// held now only verifies again: the refresh it would start has happened.
    #[tokio::test(start_paused = true)]
    async fn a_caller_that_saw_an_older_key_set_starts_no_refresh() {
        let signer = DevSigner::generate().unwrap().0;
        let fake = Fake::new(jwks(&[&signer]));
        let auth = start(&fake, settings(0)).await;
        auth.shared.refresh(Trigger::UnknownKey { seen: 0 }).await;
        assert_eq!((fake.calls(), lock(&auth.shared.state).generation), (2, 1));
        auth.shared.refresh(Trigger::UnknownKey { seen: 0 }).await;
        assert_eq!(fake.calls(), 2, "seen against generation 0, 1 is held");
        auth.shared.refresh(Trigger::UnknownKey { seen: 1 }).await;
        assert_eq!((fake.calls(), lock(&auth.shared.state).generation), (3, 2));
    }
}
