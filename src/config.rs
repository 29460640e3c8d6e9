//! From flags, `MESHCA_*` variables and the TOML file to one checked [`Config`].
//!
//! Precedence: flag or environment variable (clap merges those), then the config
//! file, then the default. Every value is checked here, so `serve` starts only with
//! a configuration that makes sense; errors name the setting and what to put there.
//! No I/O beyond what two defaults are sized to (the cores for `--signing-workers`,
//! the cgroup's memory limit for `--max-in-flight`): the caller reads the config
//! file and hands over its text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::admission::memory;
pub use crate::admission::Settings as AdmissionSettings;
use crate::admission::{self, Rate};
pub use crate::auth::discovery::{Settings as KeyRefresh, Source as KeySource};
pub use crate::auth::pods::Settings as PodSettings;
use crate::ca::issuer::Algorithms as IssuerAlgorithms;
use crate::ca::profile::Lifetimes;
pub use crate::ca::reload::Settings as ReloadSettings;
use crate::cli::{BootstrapReplayStore, ServeArgs};
use crate::identity::{check_label, Naming};

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The config file is not valid TOML or has unknown keys.
    #[error("config file: {0}")]
    File(String),
    /// A setting has a value that cannot be used.
    #[error("--{setting}: {reason}")]
    Invalid { setting: &'static str, reason: String },
    /// A setting required in this mode is missing.
    #[error("--{setting} is required {when}")]
    Missing { setting: &'static str, when: &'static str },
}

impl From<crate::setting::Error> for Error {
    fn from(e: crate::setting::Error) -> Self {
        match e {
            crate::setting::Error::Invalid { setting, reason } => Error::Invalid { setting, reason },
            crate::setting::Error::Missing { setting, when } => Error::Missing { setting, when },
        }
    }
}

/// The TOML file: `meshca serve`'s own settings ([`ServeArgs`]), keys named as the
/// flags without their dashes (`issuance-lifetime = "24h"`).
pub(crate) type FileConfig = ServeArgs;

/// `meshca serve`'s long flags but `--config` and `--help`: the keys a config file
/// may hold.
fn setting_names() -> std::collections::BTreeSet<String> {
    serve_flags(|_| true)
}

/// `meshca serve`'s long flags, but `--config` and `--help`, whose argument `keep`s.
fn serve_flags(keep: impl Fn(&clap::Arg) -> bool) -> std::collections::BTreeSet<String> {
    let cli = <crate::cli::Cli as clap::CommandFactory>::command();
    let serve = cli.find_subcommand("serve").map(|c| c.get_arguments().cloned().collect::<Vec<_>>());
    (serve.unwrap_or_default().iter())
        .filter(|arg| keep(arg))
        .filter_map(|arg| arg.get_long().map(str::to_owned))
        .filter(|long| long != "config" && long != "help")
        .collect()
}

/// Flags and environment over the file: each setting the command line left unset
/// (`None`, or a switch left off) is taken from the file. Generic over the
/// settings, through their one serde definition: nothing here names a setting.
fn merged(args: ServeArgs, file: FileConfig) -> Result<ServeArgs, Error> {
    let internal = |e: serde_json::Error| Error::File(format!("cannot merge the settings: {e}"));
    // A switch (`--dev`) left off is unset; an `Option<bool>` given as false is not.
    let switches = serve_flags(|arg| matches!(arg.get_action(), clap::ArgAction::SetTrue));
    let mut over = serde_json::to_value(args).map_err(internal)?;
    let under = serde_json::to_value(file).map_err(internal)?;
    if let (Some(over), Some(under)) = (over.as_object_mut(), under.as_object()) {
        for (key, value) in under {
            let unset = match over.get(key) {
                None | Some(serde_json::Value::Null) => true,
                Some(serde_json::Value::Bool(false)) => switches.contains(key),
                Some(_) => false,
            };
            if unset {
                over.insert(key.clone(), value.clone());
            }
        }
    }
    serde_json::from_value(over).map_err(internal)
}

pub use crate::auth::source::dev::DEV_TOKEN_ISSUER;
pub use crate::auth::source::jwks::{ConfirmPod, Settings as JwksSettings};
pub use crate::auth::source::tokenreview::Settings as TokenReviewSettings;
/// How tokens are checked: the token source's settings (`auth::source`).
pub use crate::auth::source::{TokenConfig, DEFAULT_AUDIENCE};

/// Where dev mode keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPaths {
    pub data_dir: PathBuf,
}

impl DevPaths {
    pub fn trust_anchors(&self) -> PathBuf {
        self.data_dir.join("trust-anchors.pem")
    }
    pub fn anchor_key(&self) -> PathBuf {
        self.data_dir.join("trust-anchor.key")
    }
    pub fn issuer_dir(&self) -> PathBuf {
        self.data_dir.join("issuer")
    }
    pub fn token_key(&self) -> PathBuf {
        self.data_dir.join("dev-token.key")
    }
    pub fn jwks(&self) -> PathBuf {
        self.data_dir.join("dev-jwks.json")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit.jsonl")
    }
    pub fn audit_signing_key(&self) -> PathBuf {
        self.data_dir.join("audit-signing.key")
    }
    pub fn audit_verifier_key(&self) -> PathBuf {
        self.data_dir.join("audit.pub")
    }
    pub(crate) fn bootstrap_replay_file(&self) -> PathBuf {
        self.data_dir.join("bootstrap-used.jsonl")
    }
}

/// Everything `serve` needs, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// Set in dev mode: create the state in this directory when absent.
    pub dev: Option<DevPaths>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub naming: Naming,
    pub service_account: String,
    pub trust_anchors: PathBuf,
    pub issuer_dir: PathBuf,
    /// The issuer key in a PKCS#11 token (`--issuer-key`), instead of `tls.key`.
    pub issuer_key: Option<crate::ca::token::Uri>,
    pub lifetimes: Lifetimes,
    pub token: TokenConfig,
    /// "-" for stdout, else a path.
    pub audit_log: String,
    /// How the audit log's checkpoints are signed (none: no checkpoints).
    pub audit_checkpoints: Option<AuditCheckpoints>,
    /// In-flight bound, signing workers and rate limits (`admission`).
    pub admission: AdmissionSettings,
    /// Connection limit and age of the gRPC listener (`server::connections`).
    pub connections: ConnectionSettings,
    /// The cgroup's memory limit in bytes, if any; without `--max-in-flight` the
    /// in-flight bound is sized to it (`admission::memory`).
    pub memory_limit: Option<u64>,
    pub plaintext: bool,
    /// When the issuer and trust anchors are re-checked (`ca::reload`).
    pub reload: ReloadSettings,
    /// How long the token validation backend may fail every call before `/ready` fails.
    pub ready_api_unreachable_threshold: Duration,
    /// Emit Kubernetes Events for issuances and denials (needs [`TokenConfig::kubernetes`]).
    pub events: bool,
    /// Record the caller's node OS in audit records (needs [`TokenConfig::kubernetes`]).
    pub node_os: bool,
    /// Accept bootstrap tokens (`auth::bootstrap`), and where their uses are recorded.
    pub bootstrap: Option<BootstrapConfig>,
}

/// `--audit-signing-key` and the checkpoint schedule (`audit::checkpointer`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditCheckpoints {
    pub signing_key: PathBuf,
    pub every: u64,
    pub interval: Duration,
    pub new_log: bool,
    /// Keep the latest checkpoint in a ConfigMap too (needs [`TokenConfig::kubernetes`]).
    pub configmap: bool,
}

/// Default `--max-connections`.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `--max-connection-age`.
pub(crate) const DEFAULT_MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Default `--request-timeout`.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--ready-api-unreachable-threshold`.
pub(crate) const DEFAULT_API_UNREACHABLE_THRESHOLD: Duration = Duration::from_secs(60);

/// `--max-connections`, `--max-connection-age` and `--request-timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Connections open at once (at least 1).
    pub max: usize,
    /// When a connection is asked to close (GOAWAY); `None`: never.
    pub max_age: Option<Duration>,
    /// How long one request may take, from its headers to its answer (tonic's
    /// `timeout`); the request is cancelled after it. A connection asked to close
    /// waits for its requests, so this also bounds how long a client that never
    /// finishes sending a request keeps its slot past the age.
    pub request_timeout: Duration,
    /// Bytes of request messages not yet received whole (so not yet authenticated)
    /// held at once, process-wide (`server::budget`).
    pub unfinished_budget: usize,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            max: DEFAULT_MAX_CONNECTIONS,
            max_age: Some(DEFAULT_MAX_AGE),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            unfinished_budget: memory::unfinished_budget_for(None),
        }
    }
}

pub use crate::auth::bootstrap::{BootstrapConfig, ReplayConfig};

/// A rate limit from its two settings: a positive number of requests per second
/// (or "off") and an optional burst, 10 × the rate by default.
fn rate(
    setting: &'static str,
    value: Option<&str>,
    burst: Option<f64>,
    default: Option<Rate>,
) -> Result<Option<Rate>, Error> {
    let per_second = match value.map(str::trim) {
        None => return Ok(default.map(|d| Rate { burst: burst.unwrap_or(d.burst), ..d })),
        Some("off") | Some("0") => return Ok(None),
        Some(v) => v.trim_end_matches("/s").parse::<f64>().ok().filter(|r| r.is_finite() && *r > 0.0).ok_or(
            Error::Invalid {
                setting,
                reason: format!("{v:?} is not a positive number of requests per second or \"off\""),
            },
        )?,
    };
    let burst = burst.unwrap_or(per_second * 10.0);
    if !(burst.is_finite() && burst >= 1.0) {
        return Err(Error::Invalid { setting, reason: "the burst must be at least 1".into() });
    }
    Ok(Some(Rate { per_second, burst }))
}

fn duration(setting: &'static str, value: Option<&str>, default: Duration) -> Result<Duration, Error> {
    Ok(crate::setting::duration(setting, value, default)?)
}

fn address(setting: &'static str, value: Option<&str>, default: &str) -> Result<SocketAddr, Error> {
    let v = value.unwrap_or(default);
    v.parse().map_err(|_| Error::Invalid {
        setting,
        reason: format!("{v:?} is not an IP:port address (e.g. 127.0.0.1:8080)"),
    })
}

impl Config {
    /// Parses a config file's text.
    pub(crate) fn parse_file(text: &str) -> Result<FileConfig, Error> {
        let table: toml::Table = toml::from_str(text).map_err(|e| Error::File(e.to_string()))?;
        // Only `serve`'s flags are settings (not `--config` itself): a mistyped
        // key is an error, not a setting silently ignored.
        let known = setting_names();
        if let Some(unknown) = table.keys().find(|key| !known.contains(key.as_str())) {
            return Err(Error::File(format!(
                "unknown setting `{unknown}`: the settings are `meshca serve`'s flags without the dashes \
                 (`meshca serve --help`)"
            )));
        }
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| Error::File(e.to_string()))
    }

    /// Merges flags (and environment) over the file over the defaults, and checks the
    /// result, one concern at a time (each helper below owns its settings' checks).
    pub fn resolve(args: ServeArgs, file: FileConfig) -> Result<Config, Error> {
        let args = merged(args, file)?;
        let dev_paths = args.issuer.dev.then(|| DevPaths {
            data_dir: args.issuer.data_dir.clone().unwrap_or_else(|| PathBuf::from("./meshca-dev")),
        });
        let (listen, admin_listen) = listeners(&args)?;
        let (naming, service_account) = names(&args)?;
        let (trust_anchors, issuer_dir) = ca_files(&args, dev_paths.as_ref())?;
        let issuer_key = issuer_key(&args)?;
        let lifetimes = lifetimes(&args)?;
        let token = args.token.resolve(dev_paths.as_ref().map(DevPaths::jwks).as_deref())?;
        let audit_log = audit_log(&args, dev_paths.as_ref())?;
        let audit_checkpoints = audit_checkpoints(&args, dev_paths.as_ref(), &audit_log, &token)?;
        let (events, node_os) = kubernetes_reports(&args, &token)?;
        let (admission, connections, memory_limit) = capacity(&args, &token)?;
        let (reload, ready_api_unreachable_threshold) = reload(&args)?;
        let leeway = crate::auth::source::leeway(args.token.token_leeway.as_deref())?;
        let bootstrap = bootstrap(
            args.bootstrap_tokens.unwrap_or(dev_paths.is_some()),
            args.bootstrap_replay_store,
            args.bootstrap_replay_file.clone(),
            (dev_paths.as_ref(), &token, args.token.kubeconfig.clone()),
            leeway,
        )?;
        Ok(Config {
            dev: dev_paths,
            listen,
            admin_listen,
            naming,
            service_account,
            trust_anchors,
            issuer_dir,
            issuer_key,
            lifetimes,
            token,
            audit_log,
            audit_checkpoints,
            admission,
            connections,
            memory_limit,
            plaintext: args.plaintext,
            reload,
            ready_api_unreachable_threshold,
            events,
            node_os,
            bootstrap,
        })
    }
}

/// `--listen` and `--admin-listen`: loopback in dev mode, every interface otherwise.
fn listeners(args: &ServeArgs) -> Result<(SocketAddr, SocketAddr), Error> {
    let dev = args.issuer.dev;
    let (listen_default, admin_default) =
        if dev { ("127.0.0.1:8080", "127.0.0.1:9990") } else { ("0.0.0.0:8080", "0.0.0.0:9990") };
    let listen = address("listen", args.listen.as_deref(), listen_default)?;
    let admin_listen = address("admin-listen", args.admin_listen.as_deref(), admin_default)?;

    Ok((listen, admin_listen))
}

/// The trust domain, the control-plane namespace and meshca's own service account.
fn names(args: &ServeArgs) -> Result<(Naming, String), Error> {
    let trust_domain = args.issuer.trust_domain.as_deref().unwrap_or("cluster.local");
    let cpns = args.issuer.control_plane_namespace.as_deref().unwrap_or("meshca-system");
    let naming = Naming::new(trust_domain, cpns).map_err(|e| Error::Invalid {
        setting: match e {
            crate::identity::Error::InvalidConfig { what: "trust domain", .. } => "trust-domain",
            _ => "control-plane-namespace",
        },
        reason: e.to_string(),
    })?;
    let service_account = args.service_account.clone().unwrap_or_else(|| "meshca".into());
    check_label(&service_account).map_err(|r| Error::Invalid {
        setting: "service-account",
        reason: format!("not a DNS-1123 label: {r}"),
    })?;

    Ok((naming, service_account))
}

/// The trust-anchor file and the issuer directory: the dev data directory's, or given.
fn ca_files(args: &ServeArgs, dev_paths: Option<&DevPaths>) -> Result<(PathBuf, PathBuf), Error> {
    Ok(match dev_paths {
        Some(p) => (
            args.issuer.trust_anchors.clone().unwrap_or_else(|| p.trust_anchors()),
            args.issuer.issuer_dir.clone().unwrap_or_else(|| p.issuer_dir()),
        ),
        None => (
            args.issuer.trust_anchors.clone().ok_or(Error::Missing {
                setting: "trust-anchors",
                when: "(or use --dev for the embedded default)",
            })?,
            args.issuer.issuer_dir.clone().ok_or(Error::Missing {
                setting: "issuer-dir",
                when: "(or use --dev for the embedded default)",
            })?,
        ),
    })
}

/// `--issuer-key`: a PKCS#11 URI, checked here (the token is opened at start).
fn issuer_key(args: &ServeArgs) -> Result<Option<crate::ca::token::Uri>, Error> {
    let Some(text) = &args.issuer.issuer_key else { return Ok(None) };
    if !crate::ca::token::is_uri(&text.0) {
        return Err(Error::Invalid {
            setting: "issuer-key",
            reason: "not a pkcs11: URI (a key file goes in --issuer-dir as tls.key)".into(),
        });
    }
    let uri = text.0.parse().map_err(|e: crate::ca::token::Error| Error::Invalid {
        setting: "issuer-key",
        reason: e.to_string(),
    })?;
    Ok(Some(uri))
}

/// Leaf lifetime and backdate, bounded.
fn lifetimes(args: &ServeArgs) -> Result<Lifetimes, Error> {
    let lifetimes = Lifetimes {
        issuance_lifetime: duration(
            "issuance-lifetime",
            args.issuance_lifetime.as_deref(),
            Duration::from_secs(24 * 3600),
        )?,
        clock_skew_allowance: duration(
            "clock-skew-allowance",
            args.clock_skew_allowance.as_deref(),
            Duration::from_secs(120),
        )?,
    };
    if lifetimes.issuance_lifetime < Duration::from_secs(10) {
        return Err(Error::Invalid { setting: "issuance-lifetime", reason: "must be at least 10s".into() });
    }
    if lifetimes.clock_skew_allowance > Duration::from_secs(3600) {
        return Err(Error::Invalid { setting: "clock-skew-allowance", reason: "must be at most 1h".into() });
    }

    Ok(lifetimes)
}

/// Where audit records go: the dev data directory's log, else stdout.
fn audit_log(args: &ServeArgs, dev_paths: Option<&DevPaths>) -> Result<String, Error> {
    let audit_log = args.audit_log.clone().unwrap_or_else(|| match dev_paths {
        Some(p) => p.audit_log().display().to_string(),
        None => "-".into(),
    });
    if audit_log.is_empty() {
        return Err(Error::Invalid { setting: "audit-log", reason: "empty path (use - for stdout)".into() });
    }

    Ok(audit_log)
}

/// The audit key and checkpoint schedule: required for a file log outside dev (a
/// file's history is only as good as the checkpoints that sign it); optional for
/// stdout, where the log pipeline keeps the records.
fn audit_checkpoints(
    args: &ServeArgs,
    dev_paths: Option<&DevPaths>,
    audit_log: &str,
    token: &TokenConfig,
) -> Result<Option<AuditCheckpoints>, Error> {
    let configmap =
        match (args.audit_checkpoint_configmap, token.kubernetes()) {
            (Some(true), None) => return Err(Error::Invalid {
                setting: "audit-checkpoint-configmap",
                reason:
                    "ConfigMaps need a Kubernetes client: --token-validation tokenreview, or jwks without \
                         --jwks-file and --jwks-url (discovery) or with --jwks-confirm-pod; or pass \
                         --audit-checkpoint-configmap=false"
                        .into(),
            }),
            (explicit, kubernetes) => explicit.unwrap_or(kubernetes.is_some()),
        };
    let every = args.audit_checkpoint_every.unwrap_or(crate::audit::DEFAULT_EVERY);
    if every == 0 {
        return Err(Error::Invalid {
            setting: "audit-checkpoint-every",
            reason: "must be at least 1".into(),
        });
    }
    let interval = crate::setting::duration(
        "audit-checkpoint-interval",
        args.audit_checkpoint_interval.as_deref(),
        crate::audit::DEFAULT_INTERVAL,
    )?;
    crate::setting::within(
        "audit-checkpoint-interval",
        interval,
        Duration::from_millis(100),
        Duration::from_secs(24 * 3600),
        "between 100ms and 24h",
    )?;
    let signing_key = match (&args.audit_signing_key, dev_paths) {
        (Some(path), _) => path.clone(),
        (None, Some(dev)) => dev.audit_signing_key(),
        (None, None) if audit_log == "-" => return Ok(None),
        (None, None) => {
            return Err(Error::Missing {
                setting: "audit-signing-key",
                when: "when the audit log is a file (make one with `meshca init --dir DIR`, which writes \
                       DIR/audit-signing.key and DIR/audit.pub)",
            })
        }
    };
    Ok(Some(AuditCheckpoints { signing_key, every, interval, new_log: args.audit_new_log, configmap }))
}

/// Events and node-OS lookups: on only where the token validation has a Kubernetes client.
fn kubernetes_reports(args: &ServeArgs, token: &TokenConfig) -> Result<(bool, bool), Error> {
    let events = match (args.events, token.kubernetes()) {
        (Some(true), None) => {
            return Err(Error::Invalid {
                setting: "events",
                reason: "Events need a Kubernetes client: --token-validation tokenreview, or jwks without \
                         --jwks-file and --jwks-url (discovery) or with --jwks-confirm-pod; or pass --events=false"
                    .into(),
            })
        }
        (explicit, kubernetes) => explicit.unwrap_or(kubernetes.is_some()),
    };
    let node_os = args.audit_node_os.unwrap_or(false);
    if node_os && token.kubernetes().is_none() {
        return Err(Error::Invalid {
            setting: "audit-node-os",
            reason: "node lookups need a Kubernetes client: --token-validation tokenreview, or jwks \
                     without --jwks-file and --jwks-url (discovery) or with --jwks-confirm-pod"
                .into(),
        });
    }

    Ok((events, node_os))
}

/// Admission (in-flight bound, workers, rate limits) and the listener's connection
/// limits, with the memory limit that sizes the in-flight bound's default.
fn capacity(
    args: &ServeArgs,
    token: &TokenConfig,
) -> Result<(AdmissionSettings, ConnectionSettings, Option<u64>), Error> {
    // gRPC connections, the admin listener's and a reserve must fit in the descriptors.
    let nofile = admission::descriptors::limit();
    let fit = admission::descriptors::max_connections_for(nofile);
    let max_connections = match (args.max_connections, fit) {
        (Some(0), _) => {
            return Err(Error::Invalid { setting: "max-connections", reason: "must be at least 1".into() })
        }
        (Some(n), Some(fit)) if n > fit => {
            return Err(Error::Invalid {
                setting: "max-connections",
                reason: format!(
                    "{n} connections need more file descriptors than the limit of {} leaves (at most {fit} \
                     beside the admin listener and a reserve of {}): raise the limit (ulimit -n, \
                     LimitNOFILE=) or lower --max-connections",
                    nofile.unwrap_or_default(),
                    admission::descriptors::RESERVED
                ),
            })
        }
        (Some(n), _) => n,
        (None, fit) => DEFAULT_MAX_CONNECTIONS.min(fit.unwrap_or(usize::MAX)).max(1),
    };
    let memory_limit = memory::limit();
    let max_in_flight = match args.max_in_flight {
        Some(0) => {
            return Err(Error::Invalid { setting: "max-in-flight", reason: "must be at least 1".into() })
        }
        Some(n) => n,
        None => memory::max_in_flight_for(memory_limit, max_connections),
    };
    let workers = args.signing_workers.unwrap_or_else(admission::cores);
    if workers == 0 || workers > 1024 {
        return Err(Error::Invalid { setting: "signing-workers", reason: "must be from 1 to 1024".into() });
    }
    let per_identity = rate(
        "rate-limit-per-identity",
        args.rate_limit_per_identity.as_deref(),
        args.rate_limit_per_identity_burst,
        Some(admission::DEFAULT_PER_IDENTITY),
    )?;
    let per_peer = rate(
        "rate-limit-per-peer",
        args.rate_limit_per_peer.as_deref(),
        args.rate_limit_per_peer_burst,
        None,
    )?;
    let admission = AdmissionSettings { max_in_flight, workers, per_peer, per_identity };
    let max_connection_age = match args.max_connection_age.as_deref() {
        Some(v) if v.trim() == "off" => None,
        v => match duration("max-connection-age", v, DEFAULT_MAX_AGE)? {
            age if age < Duration::from_secs(1) => {
                return Err(Error::Invalid {
                    setting: "max-connection-age",
                    reason: "must be at least 1s, or \"off\"".into(),
                })
            }
            age => Some(age),
        },
    };
    let request_timeout =
        duration("request-timeout", args.request_timeout.as_deref(), DEFAULT_REQUEST_TIMEOUT)?;
    if request_timeout < Duration::from_secs(1) {
        return Err(Error::Invalid { setting: "request-timeout", reason: "must be at least 1s".into() });
    }
    // A TokenReview may wait its timeout for a rate-limit turn, then as long for the answer.
    if let TokenConfig::TokenReview(review) = token {
        let timeout = &review.timeout;
        if request_timeout <= *timeout * 2 {
            return Err(Error::Invalid {
                setting: "request-timeout",
                reason: format!(
                    "must be more than twice --token-review-timeout ({}), which a TokenReview may take",
                    humantime::format_duration(*timeout)
                ),
            });
        }
    }
    let connections = ConnectionSettings {
        max: max_connections,
        max_age: max_connection_age,
        request_timeout,
        unfinished_budget: memory::unfinished_budget_for(memory_limit),
    };

    Ok((admission, connections, memory_limit))
}

/// Issuer reloads and readiness: how often, and how long a failing backend is tolerated.
fn reload(args: &ServeArgs) -> Result<(ReloadSettings, Duration), Error> {
    let reload_interval =
        duration("reload-interval", args.reload_interval.as_deref(), crate::ca::reload::DEFAULT_INTERVAL)?;
    if reload_interval < Duration::from_secs(1) || reload_interval > Duration::from_secs(3600) {
        return Err(Error::Invalid {
            setting: "reload-interval",
            reason: "must be at least 1s and at most 1h".into(),
        });
    }

    let ready_api_unreachable_threshold = duration(
        "ready-api-unreachable-threshold",
        args.ready_api_unreachable_threshold.as_deref(),
        DEFAULT_API_UNREACHABLE_THRESHOLD,
    )?;
    if ready_api_unreachable_threshold < Duration::from_secs(1) {
        return Err(Error::Invalid {
            setting: "ready-api-unreachable-threshold",
            reason: "must be at least 1s".into(),
        });
    }

    let issuer_algorithms = if args.issuer.allow_non_windows_algorithms {
        IssuerAlgorithms::Any
    } else {
        IssuerAlgorithms::WindowsCompatible
    };
    let reload = ReloadSettings {
        interval: reload_interval,
        notifications: true,
        issuer_algorithms,
        allow_world_readable_issuer_key: args.allow_world_readable_issuer_key,
    };
    Ok((reload, ready_api_unreachable_threshold))
}

/// The bootstrap token settings: off, or on with a replay store: Kubernetes
/// Leases by default when the token validation has a Kubernetes client, else a
/// file (in the dev data directory unless given).
fn bootstrap(
    on: bool,
    store: Option<BootstrapReplayStore>,
    path: Option<PathBuf>,
    (dev, token, kubeconfig): (Option<&DevPaths>, &TokenConfig, Option<PathBuf>),
    leeway: Duration,
) -> Result<Option<BootstrapConfig>, Error> {
    if !on {
        let setting = match (store, &path) {
            (Some(_), _) => "bootstrap-replay-store",
            (None, Some(_)) => "bootstrap-replay-file",
            (None, None) => return Ok(None),
        };
        return Err(Error::Invalid { setting, reason: "only used with --bootstrap-tokens".into() });
    }
    let store = store.unwrap_or(if token.kubernetes().is_some() {
        BootstrapReplayStore::Kubernetes
    } else {
        BootstrapReplayStore::File
    });
    let replay = match (store, path) {
        (BootstrapReplayStore::Kubernetes, Some(_)) => {
            return Err(Error::Invalid {
                setting: "bootstrap-replay-file",
                reason: "only used with --bootstrap-replay-store file".into(),
            })
        }
        (BootstrapReplayStore::Kubernetes, None) => ReplayConfig::Kubernetes { kubeconfig },
        (BootstrapReplayStore::File, Some(path)) => ReplayConfig::File(path),
        (BootstrapReplayStore::File, None) => match dev {
            Some(dev) => ReplayConfig::File(dev.bootstrap_replay_file()),
            None => {
                return Err(Error::Missing {
                    setting: "bootstrap-replay-file",
                    when: "with --bootstrap-tokens and the file replay store outside --dev \
                           (one replica only; several share --bootstrap-replay-store kubernetes)",
                })
            }
        },
    };
    Ok(Some(BootstrapConfig { replay, leeway }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::source::TokenValidation;
    use crate::cli::IssuerArgs;

    /// Settings as a config file with these lines would give them.
    fn from_toml(toml: &str) -> ServeArgs {
        Config::parse_file(toml).unwrap()
    }

    /// `args` with `--dev`.
    fn in_dev(mut args: ServeArgs) -> ServeArgs {
        args.issuer.dev = true;
        args
    }

    #[test]
    fn dev_mode_defaults_to_loopback_and_data_dir_paths() {
        let args = in_dev(ServeArgs::default());
        let c = Config::resolve(args, FileConfig::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9990");
        assert_eq!(c.trust_anchors, PathBuf::from("./meshca-dev/trust-anchors.pem"));
        assert_eq!(c.audit_log, "./meshca-dev/audit.jsonl");
        assert_eq!(c.lifetimes, Lifetimes::default());
    }

    #[test]
    fn every_serve_flag_is_a_config_file_key_and_nothing_else_is() {
        // The file's keys come from the same struct as the flags: one definition.
        let value = serde_json::to_value(ServeArgs::default()).unwrap();
        let keys: std::collections::BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        let mut flags = setting_names();
        flags.insert("config".into()); // a field of the flags, refused in the file below
        assert_eq!(keys, flags);
        let err = Config::parse_file("config = \"other.toml\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown setting `config`"), "{err}");
        let err = Config::parse_file("issuance-lifetme = \"1h\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown setting `issuance-lifetme`") && err.contains("serve --help"), "{err}");
        // Switches, optional switches, numbers, lists and enums all read from a file.
        let file = Config::parse_file(
            "dev = true\nevents = false\nmax-in-flight = 7\ntoken-audiences = [\"a\", \"b\"]\n\
             token-validation = \"jwks\"\nrate-limit-per-peer-burst = 3\n",
        )
        .unwrap();
        assert!(file.issuer.dev);
        assert_eq!((file.events, file.max_in_flight), (Some(false), Some(7)));
        assert_eq!(file.token.token_audiences, Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            (file.token.token_validation, file.rate_limit_per_peer_burst),
            (Some(TokenValidation::Jwks), Some(3.0))
        );
    }

    #[test]
    fn a_flag_set_to_false_wins_over_the_file_and_a_switch_left_off_does_not() {
        let file = || Config::parse_file("events = true\nplaintext = true\n").unwrap();
        let args = ServeArgs { events: Some(false), ..Default::default() };
        let merged = merged(in_dev(args), file()).unwrap();
        assert_eq!(merged.events, Some(false), "--events=false over events = true");
        assert!(merged.plaintext, "--plaintext not given: the file's plaintext = true");
        assert!(merged.issuer.dev, "--dev given: kept");
    }

    #[test]
    fn reload_interval_defaults_to_30s_comes_from_flag_over_file_and_is_bounded() {
        let c = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert_eq!(
            c.reload,
            ReloadSettings { interval: Duration::from_secs(30), ..ReloadSettings::default() }
        );
        let file = || Config::parse_file("reload-interval = \"2m\"\n").unwrap();
        let c = Config::resolve(in_dev(ServeArgs::default()), file()).unwrap();
        assert_eq!(c.reload.interval, Duration::from_secs(120));
        let args = ServeArgs { reload_interval: Some("5s".into()), ..Default::default() };
        assert_eq!(Config::resolve(in_dev(args), file()).unwrap().reload.interval, Duration::from_secs(5));
        for bad in ["0s", "500ms", "2h", "soon"] {
            let args = ServeArgs { reload_interval: Some(bad.into()), ..Default::default() };
            let err = Config::resolve(in_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with("--reload-interval:"), "{bad}: {err}");
        }
    }

    #[test]
    fn connection_limit_age_and_request_timeout_default_to_1024_10m_30s_come_from_flag_over_file_and_are_checked(
    ) {
        let c = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        let thirty = Duration::from_secs(30);
        assert_eq!(
            c.connections,
            ConnectionSettings {
                // 1,024, unless fewer fit in this process's descriptor limit.
                max: admission::descriptors::max_connections_for(admission::descriptors::limit())
                    .map_or(1024, |fit| fit.min(1024)),
                max_age: Some(Duration::from_secs(600)),
                request_timeout: thirty,
                unfinished_budget: memory::unfinished_budget_for(memory::limit()),
            }
        );
        let file = || {
            let text = "max-connections = 100\nmax-connection-age = \"1h\"\nrequest-timeout = \"5s\"\n";
            Config::parse_file(text).unwrap()
        };
        let c = Config::resolve(in_dev(ServeArgs::default()), file()).unwrap();
        let five = Duration::from_secs(5);
        assert_eq!(
            c.connections,
            ConnectionSettings {
                max: 100,
                max_age: Some(Duration::from_secs(3600)),
                request_timeout: five,
                ..c.connections
            }
        );
        let args = ServeArgs {
            max_connections: Some(7),
            max_connection_age: Some("off".into()),
            ..Default::default()
        };
        let c = Config::resolve(in_dev(args), file()).unwrap();
        assert_eq!(
            c.connections,
            ConnectionSettings { max: 7, max_age: None, request_timeout: five, ..c.connections }
        );
        let args = ServeArgs { max_connections: Some(0), ..Default::default() };
        let err = Config::resolve(in_dev(args), FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("--max-connections:"), "{err}");
        for bad in ["0s", "500ms", "soon"] {
            let args = ServeArgs { max_connection_age: Some(bad.into()), ..Default::default() };
            let err = Config::resolve(in_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with("--max-connection-age:"), "{bad}: {err}");
            let args = ServeArgs { request_timeout: Some(bad.into()), ..Default::default() };
            let err = Config::resolve(in_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with("--request-timeout:"), "{bad}: {err}");
        }
        // Longer than a TokenReview may take: its rate-limit wait and its call.
        let review = |request: &str, review: &str| {
            from_toml(&format!(
                "token-validation = \"tokenreview\"\ntoken-review-timeout = \"{review}\"\nrequest-timeout = \"{request}\""
            ))
        };
        let err = Config::resolve(in_dev(review("20s", "10s")), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("twice --token-review-timeout (10s)"), "{err}");
        let c = Config::resolve(in_dev(review("21s", "10s")), FileConfig::default()).unwrap();
        assert_eq!(c.connections.request_timeout, Duration::from_secs(21));
    }

    #[test]
    fn ready_api_unreachable_threshold_defaults_to_60s_comes_from_flag_over_file_and_is_at_least_1s() {
        let c = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert_eq!(c.ready_api_unreachable_threshold, Duration::from_secs(60));
        let file = || Config::parse_file("ready-api-unreachable-threshold = \"2m\"\n").unwrap();
        let c = Config::resolve(in_dev(ServeArgs::default()), file()).unwrap();
        assert_eq!(c.ready_api_unreachable_threshold, Duration::from_secs(120));
        let args = ServeArgs { ready_api_unreachable_threshold: Some("90s".into()), ..Default::default() };
        let c = Config::resolve(in_dev(args), file()).unwrap();
        assert_eq!(c.ready_api_unreachable_threshold, Duration::from_secs(90));
        for bad in ["0s", "500ms", "soon"] {
            let args = ServeArgs { ready_api_unreachable_threshold: Some(bad.into()), ..Default::default() };
            let err = Config::resolve(in_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with("--ready-api-unreachable-threshold:"), "{bad}: {err}");
        }
    }

    #[test]
    fn non_windows_issuer_algorithms_are_refused_unless_the_flag_or_the_file_allows_them() {
        let c = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert_eq!(c.reload.issuer_algorithms, IssuerAlgorithms::WindowsCompatible);
        let args = ServeArgs {
            issuer: IssuerArgs { allow_non_windows_algorithms: true, ..Default::default() },
            ..Default::default()
        };
        let c = Config::resolve(in_dev(args), FileConfig::default()).unwrap();
        assert_eq!(c.reload.issuer_algorithms, IssuerAlgorithms::Any);
        let file = Config::parse_file("allow-non-windows-algorithms = true\n").unwrap();
        let c = Config::resolve(in_dev(ServeArgs::default()), file).unwrap();
        assert_eq!(c.reload.issuer_algorithms, IssuerAlgorithms::Any);
        let file = Config::parse_file("allow-non-windows-algorithms = false\n").unwrap();
        let c = Config::resolve(in_dev(ServeArgs::default()), file).unwrap();
        assert_eq!(c.reload.issuer_algorithms, IssuerAlgorithms::WindowsCompatible);
    }

    #[test]
    fn world_readable_issuer_keys_are_refused_unless_the_flag_or_the_file_allows_them() {
        let c = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert!(!c.reload.allow_world_readable_issuer_key);
        let args = ServeArgs { allow_world_readable_issuer_key: true, ..Default::default() };
        assert!(
            Config::resolve(in_dev(args), FileConfig::default())
                .unwrap()
                .reload
                .allow_world_readable_issuer_key
        );
        let file = Config::parse_file("allow-world-readable-issuer-key = true\n").unwrap();
        assert!(
            Config::resolve(in_dev(ServeArgs::default()), file)
                .unwrap()
                .reload
                .allow_world_readable_issuer_key
        );
        let file = Config::parse_file("allow-world-readable-issuer-key = false\n").unwrap();
        assert!(
            !Config::resolve(in_dev(ServeArgs::default()), file)
                .unwrap()
                .reload
                .allow_world_readable_issuer_key
        );
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let file = Config::parse_file(
            "issuance-lifetime = \"1h\"\nclock-skew-allowance = \"30s\"\ntrust-anchors = \"/a.pem\"\nissuer-dir = \"/i\"\njwks-file = \"/j\"\ntoken-issuer = \"k8s\"\n",
        )
        .unwrap();
        let args = ServeArgs { issuance_lifetime: Some("90s".into()), ..Default::default() };
        let c = Config::resolve(args, file).unwrap();
        assert_eq!(c.lifetimes.issuance_lifetime, Duration::from_secs(90));
        assert_eq!(c.lifetimes.clock_skew_allowance, Duration::from_secs(30));
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.audit_log, "-");
    }

    #[test]
    fn missing_or_bad_settings_name_the_flag() {
        let err = Config::resolve(ServeArgs::default(), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("--trust-anchors"), "{err}");
        let args = in_dev(ServeArgs { issuance_lifetime: Some("soon".into()), ..Default::default() });
        let err = Config::resolve(args, FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("--issuance-lifetime"), "{err}");
        let args = ServeArgs {
            issuer: IssuerArgs { trust_domain: Some("Bad_Domain".into()), ..Default::default() },
            ..Default::default()
        };
        let args = in_dev(args);
        let err = Config::resolve(args, FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("--trust-domain"), "{err}");
        assert!(Config::parse_file("no-such-key = 1").is_err());
    }

    fn outside_dev(mut args: ServeArgs) -> ServeArgs {
        args.issuer.trust_anchors = Some("/a.pem".into());
        args.issuer.issuer_dir = Some("/i".into());
        args
    }

    #[test]
    fn tokenreview_is_the_default_outside_dev_mode_with_its_documented_defaults() {
        let c = Config::resolve(outside_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        let expected = TokenConfig::TokenReview(TokenReviewSettings {
            kubeconfig: None,
            audiences: vec![DEFAULT_AUDIENCE.into()],
            timeout: Duration::from_secs(2),
            qps: 100,
            burst: 200,
            cache_ttl: Duration::from_secs(300),
            cache_failure_ttl: Duration::from_secs(10),
        });
        assert_eq!(c.token, expected);
        let dev = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert!(
            matches!(dev.token, TokenConfig::Jwks(JwksSettings { ref issuer, .. }) if issuer.as_deref() == Some(DEV_TOKEN_ISSUER))
        );
        assert!(c.events && !dev.events, "events default on with a Kubernetes client only");
    }

    #[test]
    fn tokenreview_settings_come_from_flags_over_the_file() {
        let file = Config::parse_file(
            "token-validation = \"tokenreview\"\nkubeconfig = \"/k\"\ntoken-review-timeout = \"300ms\"\n\
             token-review-qps = 5\ntoken-review-burst = 7\ntoken-cache-ttl = \"1m\"\ntoken-cache-failure-ttl = \"3s\"\n",
        )
        .unwrap();
        let args = from_toml("token-review-qps = 9\ntoken-audiences = [\"a\", \"b\"]");
        let c = Config::resolve(outside_dev(args), file).unwrap();
        let expected = TokenConfig::TokenReview(TokenReviewSettings {
            kubeconfig: Some("/k".into()),
            audiences: vec!["a".into(), "b".into()],
            timeout: Duration::from_millis(300),
            qps: 9,
            burst: 7,
            cache_ttl: Duration::from_secs(60),
            cache_failure_ttl: Duration::from_secs(3),
        });
        assert_eq!(c.token, expected);
    }

    #[test]
    fn a_token_leeway_over_five_minutes_is_refused() {
        let ok = Config::resolve(in_dev(from_toml("token-leeway = \"5m\"")), FileConfig::default()).unwrap();
        assert_eq!(ok.bootstrap.map(|b| b.leeway), Some(Duration::from_secs(300)));
        let err =
            Config::resolve(in_dev(from_toml("token-leeway = \"301s\"")), FileConfig::default()).unwrap_err();
        assert_eq!(err.to_string(), "--token-leeway: must be at most 5m");
    }

    #[test]
    fn unusable_tokenreview_settings_name_the_flag() {
        let cases = [
            ("token-review-timeout", from_toml("token-review-timeout = \"0s\"")),
            ("token-review-timeout", from_toml("token-review-timeout = \"2 fortnights\"")),
            ("token-review-qps", from_toml("token-review-qps = 0")),
            ("token-review-burst", from_toml("token-review-burst = 0")),
            ("token-cache-ttl", from_toml("token-cache-ttl = \"2h\"")),
            ("token-cache-failure-ttl", from_toml("token-cache-failure-ttl = \"1h\"")),
        ];
        for (flag, args) in cases {
            let err = Config::resolve(outside_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with(&format!("--{flag}:")), "{flag}: {err}");
        }
    }

    fn jwks(mut args: ServeArgs) -> ServeArgs {
        args.token.token_validation = Some(TokenValidation::Jwks);
        outside_dev(args)
    }

    #[test]
    fn jwks_mode_discovers_the_issuer_by_default_or_reads_a_file_or_an_https_url() {
        let c = Config::resolve(jwks(from_toml("kubeconfig = \"/k\"")), FileConfig::default()).unwrap();
        let expected = TokenConfig::Jwks(JwksSettings {
            keys: KeySource::Discovery { kubeconfig: Some("/k".into()) },
            issuer: None,
            audiences: vec![DEFAULT_AUDIENCE.into()],
            leeway: Duration::from_secs(60),
            refresh: KeyRefresh::default(),
            confirm_pod: None,
        });
        assert_eq!(c.token, expected);
        assert_eq!(c.token.kubernetes(), Some(Some(std::path::Path::new("/k"))));
        assert!(c.events, "discovery has a Kubernetes client, so events default on");
        assert!(!c.node_os, "node lookups are asked for, never assumed");
        let on = ServeArgs { audit_node_os: Some(true), events: Some(false), ..Default::default() };
        let c = Config::resolve(jwks(on), FileConfig::default()).unwrap();
        assert!(c.node_os && !c.events);

        let file = Config::parse_file(
            "jwks-url = \"https://issuer.example/keys\"\njwks-ca-file = \"/ca.pem\"\ntoken-issuer = \"https://issuer.example\"\n\
             jwks-refresh-interval = \"1m\"\njwks-refresh-min-interval = \"0s\"\n",
        )
        .unwrap();
        let c = Config::resolve(jwks(ServeArgs::default()), file).unwrap();
        let TokenConfig::Jwks(JwksSettings { keys, issuer, refresh, .. }) = &c.token else {
            panic!("{:?}", c.token)
        };
        let url =
            KeySource::Url { url: "https://issuer.example/keys".into(), ca_file: Some("/ca.pem".into()) };
        assert_eq!((keys, issuer.as_deref()), (&url, Some("https://issuer.example")));
        assert_eq!(
            (refresh.refresh_interval, refresh.refresh_min_interval),
            (Duration::from_secs(60), Duration::ZERO)
        );
        assert!(!c.events && c.token.kubernetes().is_none());

        let args = from_toml("jwks-file = \"/j\"\ntoken-issuer = \"k8s\"\nevents = false");
        let c = Config::resolve(jwks(args), FileConfig::default()).unwrap();
        assert!(
            matches!(c.token, TokenConfig::Jwks(JwksSettings { keys: KeySource::File(ref p), .. }) if p == std::path::Path::new("/j"))
        );
    }

    #[test]
    fn jwks_confirm_pod_comes_from_the_flag_or_the_file_and_brings_a_kubernetes_client() {
        let file_keys = || from_toml("jwks-file = \"/j\"\ntoken-issuer = \"k8s\"");
        let c = Config::resolve(jwks(file_keys()), FileConfig::default()).unwrap();
        assert!(
            matches!(c.token, TokenConfig::Jwks(JwksSettings { confirm_pod: None, .. }))
                && c.token.kubernetes().is_none()
        );
        let mut args = file_keys();
        (args.token.jwks.jwks_confirm_pod, args.token.kubeconfig) = (Some(true), Some("/k".into()));
        let c = Config::resolve(jwks(args), FileConfig::default()).unwrap();
        let TokenConfig::Jwks(JwksSettings { confirm_pod: Some(confirm), .. }) = &c.token else {
            panic!("{:?}", c.token)
        };
        assert_eq!(confirm, &ConfirmPod { kubeconfig: Some("/k".into()), settings: PodSettings::default() });
        assert_eq!(
            (confirm.settings.ttl, confirm.settings.failure_ttl),
            (Duration::from_secs(30), Duration::from_secs(5))
        );
        assert_eq!(c.token.kubernetes(), Some(Some(std::path::Path::new("/k"))));
        assert!(c.events, "a Kubernetes client, so events default on");
        let file = Config::parse_file("jwks-confirm-pod = true\n").unwrap();
        let c = Config::resolve(jwks(file_keys()), file).unwrap();
        assert!(matches!(c.token, TokenConfig::Jwks(JwksSettings { confirm_pod: Some(_), .. })));
        let file = Config::parse_file("jwks-confirm-pod = true\n").unwrap();
        let mut args = file_keys();
        args.token.jwks.jwks_confirm_pod = Some(false);
        let c = Config::resolve(jwks(args), file).unwrap();
        assert!(
            matches!(c.token, TokenConfig::Jwks(JwksSettings { confirm_pod: None, .. })),
            "the flag wins over the file"
        );
        for mode in [TokenValidation::TokenReview, TokenValidation::Dev] {
            let mut args = from_toml("jwks-confirm-pod = true");
            args.token.token_validation = Some(mode);
            args.issuer.dev = mode == TokenValidation::Dev;
            let err = Config::resolve(outside_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with("--jwks-confirm-pod:"), "{mode:?}: {err}");
        }
        let args = from_toml("token-validation = \"tokenreview\"\njwks-confirm-pod = false");
        assert!(Config::resolve(outside_dev(args), FileConfig::default()).is_ok());
    }

    #[test]
    fn unusable_jwks_and_events_settings_name_the_flag() {
        let cases = [
            ("token-issuer", from_toml("jwks-file = \"/j\"")),
            (
                "token-issuer",
                from_toml("jwks-url = \"https://issuer.example/keys\""),
            ),
            (
                "jwks-url",
                from_toml("jwks-url = \"http://issuer.example/keys\"\ntoken-issuer = \"https://issuer.example\""),
            ),
            (
                "jwks-url",
                from_toml("jwks-url = \"https://a/k\"\njwks-file = \"/j\"\ntoken-issuer = \"https://issuer.example\""),
            ),
            ("jwks-ca-file", from_toml("jwks-ca-file = \"/ca.pem\"")),
            (
                "jwks-refresh-interval",
                from_toml("jwks-refresh-interval = \"0s\""),
            ),
            (
                "jwks-refresh-interval",
                from_toml("jwks-refresh-interval = \"2days\""),
            ),
            (
                "jwks-refresh-min-interval",
                from_toml("jwks-refresh-min-interval = \"2h\""),
            ),
            (
                "events",
                from_toml("jwks-file = \"/j\"\ntoken-issuer = \"https://issuer.example\"\nevents = true"),
            ),
            (
                "audit-node-os",
                from_toml("jwks-file = \"/j\"\ntoken-issuer = \"https://issuer.example\"\naudit-node-os = true"),
            ),
        ];
        for (flag, args) in cases {
            let err = Config::resolve(jwks(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with(&format!("--{flag}")), "{flag}: {err}");
        }
        let dev = in_dev(ServeArgs { events: Some(true), ..Default::default() });
        let err = Config::resolve(dev, FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("--events"), "{err}");
    }

    #[test]
    fn bootstrap_tokens_are_on_in_dev_off_otherwise_and_pick_a_replay_store() {
        let dev = Config::resolve(in_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        let expected = ReplayConfig::File(PathBuf::from("./meshca-dev/bootstrap-used.jsonl"));
        assert_eq!(
            dev.bootstrap,
            Some(BootstrapConfig { replay: expected, leeway: Duration::from_secs(60) })
        );
        let off = in_dev(ServeArgs { bootstrap_tokens: Some(false), ..Default::default() });
        assert_eq!(Config::resolve(off, FileConfig::default()).unwrap().bootstrap, None);

        // Outside dev: off by default; on, tokenreview's Kubernetes client brings Leases.
        let c = Config::resolve(outside_dev(ServeArgs::default()), FileConfig::default()).unwrap();
        assert_eq!(c.bootstrap, None);
        let on = || from_toml("bootstrap-tokens = true\nkubeconfig = \"/k\"");
        let c = Config::resolve(outside_dev(on()), FileConfig::default()).unwrap();
        let kubernetes = ReplayConfig::Kubernetes { kubeconfig: Some("/k".into()) };
        assert_eq!(c.bootstrap.map(|b| b.replay), Some(kubernetes));
        let file = Config::parse_file(
            "bootstrap-tokens = true\nbootstrap-replay-store = \"file\"\nbootstrap-replay-file = \"/var/lib/meshca/used.jsonl\"\n",
        )
        .unwrap();
        let c = Config::resolve(outside_dev(ServeArgs::default()), file).unwrap();
        assert_eq!(
            c.bootstrap.map(|b| b.replay),
            Some(ReplayConfig::File("/var/lib/meshca/used.jsonl".into()))
        );

        let file_keys = from_toml("bootstrap-tokens = true\njwks-file = \"/j\"\ntoken-issuer = \"k8s\"");
        let err = Config::resolve(jwks(file_keys), FileConfig::default()).unwrap_err().to_string();
        assert!(err.starts_with("--bootstrap-replay-file is required"), "{err}");
        let cases = [
            (
                "bootstrap-replay-store",
                ServeArgs { bootstrap_replay_store: Some(BootstrapReplayStore::File), ..Default::default() },
            ),
            (
                "bootstrap-replay-file",
                ServeArgs { bootstrap_replay_file: Some("/f".into()), ..Default::default() },
            ),
            (
                "bootstrap-replay-file",
                ServeArgs {
                    bootstrap_replay_store: Some(BootstrapReplayStore::Kubernetes),
                    bootstrap_replay_file: Some("/f".into()),
                    ..on()
                },
            ),
        ];
        for (flag, args) in cases {
            let err = Config::resolve(outside_dev(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with(&format!("--{flag}:")), "{flag}: {err}");
        }
    }
}
