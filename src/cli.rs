//! The command line, defined and nothing more.
//!
//! Every `serve` flag also reads a `MESHCA_…` environment variable and may be set
//! in the TOML file given by `--config` (same names, e.g. `issuance-lifetime =
//! "24h"`). Precedence: flag, then environment, then file, then default. The
//! defaults live in `config`, which turns these raw values into a checked `Config`;
//! nothing here touches the file system.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "meshca", version, about = "A trust-anchor certificate authority for service meshes")]
pub struct Cli {
    /// Log lines on standard error: text, or json (one JSON object a line, fields at the top level).
    #[arg(long, global = true, env = "MESHCA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a trust anchor and an issuer in a directory.
    Init(InitArgs),
    /// Run the identity service (gRPC Certify + admin HTTP).
    Serve(Box<ServeArgs>),
    /// Print a token that a `serve --dev` server accepts (stdout: the token alone).
    DevToken(DevTokenArgs),
    /// Request one certificate and write it to a directory (a new key, or --csr FILE made elsewhere).
    Certify(CertifyCommandArgs),
    /// Keep a certificate fresh in a directory: renew before expiry, with a new key each time.
    Agent(AgentArgs),
    /// Check, on this host, everything the agent needs: name resolution, reachability, TLS, clock, credentials, token.
    Doctor(DoctorArgs),
    /// Bootstrap tokens: a first certificate for a host without Kubernetes.
    BootstrapToken {
        #[command(subcommand)]
        command: BootstrapTokenCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum BootstrapTokenCommand {
    /// Mint a signed, single-use (by default), short-lived token for one identity, with the server's issuer key (stdout: the token alone).
    Create(BootstrapTokenCreateArgs),
}

/// `meshca bootstrap-token create`: the token's terms, and where the server's
/// issuer is ([`IssuerArgs`]: the same flags, defaults and `MESHCA_*` variables as
/// `serve`; the help of five of them is reworded for this command).
#[derive(Debug, Args)]
#[command(
    mut_arg("config", |a| a.help("The server's TOML configuration file (its trust domain, namespace and issuer are used)")),
    mut_arg("dev", |a| a.help("The server runs with --dev: its issuer is in --data-dir")),
    mut_arg("trust_anchors", |a| a.help("PEM bundle of trust anchors the issuer chains to [required unless --dev]")),
    mut_arg("issuer_dir", |a| a.help("The server's issuer directory: tls.crt + tls.key (or crt.pem + key.pem) [required unless --dev]")),
    mut_arg("allow_non_windows_algorithms", |a| a.help("The server accepts issuers Windows Server 2016 cannot verify")),
)]
pub struct BootstrapTokenCreateArgs {
    /// The identity the token is for: SA.NS.serviceaccount.identity.CPNS.TD.
    #[arg(long, value_name = "NAME")]
    pub identity: String,
    /// How long the token may be presented, more than 0 and at most 24h.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub ttl: String,
    /// How many certificates the token may get, 1 to 100.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub uses: u32,
    #[command(flatten)]
    pub issuer: IssuerArgs,
}

/// Where the server's CA is and what it names: the flags `serve` and `bootstrap-token
/// create` share, so that both read the same settings (flags, `MESHCA_*` variables,
/// the `--config` file) the same way.
#[derive(Debug, Default, Clone, PartialEq, Eq, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct IssuerArgs {
    /// TOML file with any of these settings (same names as the flags).
    #[arg(long, env = "MESHCA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Embedded default: create (or reuse) a CA, issuer and dev token key in --data-dir and serve on loopback.
    #[arg(long, env = "MESHCA_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,
    /// Dev mode state directory [default: ./meshca-dev].
    #[arg(long, env = "MESHCA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Trust domain [default: cluster.local].
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", value_name = "D")]
    pub trust_domain: Option<String>,
    /// Control-plane namespace [default: meshca-system].
    #[arg(long, env = "MESHCA_CONTROL_PLANE_NAMESPACE", value_name = "NS")]
    pub control_plane_namespace: Option<String>,
    /// PEM bundle of trust anchors [required unless --dev].
    #[arg(long, env = "MESHCA_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,
    /// Issuer directory: tls.crt + tls.key (or crt.pem + key.pem) [required unless --dev].
    #[arg(long, env = "MESHCA_ISSUER_DIR", value_name = "DIR")]
    pub issuer_dir: Option<PathBuf>,
    /// The issuer's private key in a PKCS#11 token instead of ISSUER_DIR/tls.key, as an RFC 7512 URI: pkcs11:token=LABEL;object=LABEL;type=private?module-path=MODULE.so&pin-source=file:PINFILE (the certificate still comes from ISSUER_DIR/tls.crt).
    #[arg(long, env = "MESHCA_ISSUER_KEY", value_name = "URI")]
    pub issuer_key: Option<SecretText>,
    /// Accept an issuer chain with keys or signatures Windows Server 2016 cannot verify (Ed25519, RSA-PSS, ...); without it such an issuer is refused at start and on reload.
    #[arg(long, env = "MESHCA_ALLOW_NON_WINDOWS_ALGORITHMS", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_non_windows_algorithms: bool,
}

/// A setting that may carry a secret (a PKCS#11 URI with `pin-value`): `Debug`
/// shows only what precedes a `?`.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.0.split('?').next().unwrap_or_default();
        write!(f, "{shown:?}{}", if shown.len() < self.0.len() { " (query hidden)" } else { "" })
    }
}

impl std::str::FromStr for SecretText {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretText(s.to_owned()))
    }
}

/// Where used bootstrap tokens are recorded (`--bootstrap-replay-store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapReplayStore {
    /// A local file (--bootstrap-replay-file): one replica only.
    File,
    /// A Lease per use in the control-plane namespace: shared by every replica.
    Kubernetes,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log: every record's hash and chain, and with --key its signed checkpoints (FILE.checkpoint, and --checkpoint); exit 0 only when intact. Records after the last checkpoint are reported as not yet covered, never as proven.
    Verify {
        /// The audit log (JSON lines).
        file: PathBuf,
        /// Verifier key file (NAME+HASH+BASE64, e.g. DATA_DIR/audit.pub); repeat for a rotated key. Without it only the chain is checked, which proves nothing against someone who can rewrite the file.
        #[arg(long = "key", value_name = "VKEYFILE")]
        keys: Vec<PathBuf>,
        /// A checkpoint saved earlier (anywhere): the log must be an append-only extension of it (checked with a consistency proof).
        #[arg(long, value_name = "CHECKPOINTFILE", requires = "keys")]
        checkpoint: Option<PathBuf>,
    },
    /// Print an RFC 6962 proof as JSON, after checking the log as `verify --key` does: with --serial, the inclusion of that certificate's `issued` record under FILE.checkpoint; with --checkpoint, the consistency of FILE.checkpoint with that earlier one.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["serial", "checkpoint"])))]
    Prove {
        /// The audit log (JSON lines).
        file: PathBuf,
        /// Verifier key file; repeat for a rotated key.
        #[arg(long = "key", value_name = "VKEYFILE", required = true)]
        keys: Vec<PathBuf>,
        /// The certificate's serial number (hex; colons allowed).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// An earlier checkpoint: prove FILE.checkpoint extends it.
        #[arg(long, value_name = "CHECKPOINTFILE")]
        checkpoint: Option<PathBuf>,
    },
}

/// Key algorithm of `init`'s anchor and issuer: each one Windows Server 2016 verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaKeyArg {
    /// ECDSA P-256, signing with SHA-256.
    P256,
    /// ECDSA P-384, signing with SHA-384.
    P384,
    /// RSA 3072 bits, signing with PKCS#1 v1.5 and SHA-256 (key generation takes a few seconds).
    Rsa3072,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to create: DIR/trust-anchors.pem, DIR/trust-anchor.key, DIR/issuer/tls.{crt,key}, and the audit log's signing key DIR/audit-signing.key with its verifier key DIR/audit.pub (with --kubernetes: the anchor's two files only).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the issuer as Secret meshca-issuer (kubernetes.io/tls) and the anchor as ConfigMap meshca-trust-anchors, YAML on stdout for `kubectl apply -f -`. The anchor's key goes to --dir (mode 0600), never into the cluster.
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace of the objects --kubernetes prints [default: the control-plane namespace].
    #[arg(long, value_name = "NS", requires = "kubernetes")]
    pub namespace: Option<String>,
    /// Trust domain named in the CA subjects.
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Control-plane namespace named in the CA subjects.
    #[arg(long, env = "MESHCA_CONTROL_PLANE_NAMESPACE", default_value = "meshca-system")]
    pub control_plane_namespace: String,
    /// Key algorithm for anchor and issuer.
    #[arg(long, value_enum, default_value = "p256")]
    pub key_type: CaKeyArg,
    /// Make the issuer's key inside a PKCS#11 token instead (an RFC 7512 URI, as `serve --issuer-key` takes it): sensitive, not extractable, for signing only; DIR/issuer gets tls.crt and no tls.key.
    #[arg(long, value_name = "URI", conflicts_with = "kubernetes")]
    pub issuer_key: Option<SecretText>,
}

/// `meshca serve`'s settings, defined once: as flags (with their `MESHCA_*`
/// variables) here, and as the keys of the `--config` TOML file through serde
/// (kebab-case, the flags' names; `config::Config::parse_file`).
#[derive(Debug, Default, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ServeArgs {
    /// Where the CA is and what it names (shared with `bootstrap-token create`).
    #[command(flatten)]
    #[serde(flatten)]
    pub issuer: IssuerArgs,
    /// gRPC listen address [default: 127.0.0.1:8080 in dev, 0.0.0.0:8080 otherwise].
    #[arg(long, env = "MESHCA_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP listen address for /live, /ready, /metrics [default: 127.0.0.1:9990 in dev, 0.0.0.0:9990 otherwise].
    #[arg(long, env = "MESHCA_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// meshca's own service account, named in its serving certificate [default: meshca].
    #[arg(long, env = "MESHCA_SERVICE_ACCOUNT", value_name = "SA")]
    pub service_account: Option<String>,
    /// Lifetime of issued leaves, e.g. 24h, 90s [default: 24h].
    #[arg(long, env = "MESHCA_ISSUANCE_LIFETIME", value_name = "DURATION")]
    pub issuance_lifetime: Option<String>,
    /// How far leaves are backdated, for clocks behind ours [default: 2m].
    #[arg(long, env = "MESHCA_CLOCK_SKEW_ALLOWANCE", value_name = "DURATION")]
    pub clock_skew_allowance: Option<String>,
    /// How callers prove who they are: the token sources' flags (`auth::source`).
    #[command(flatten)]
    #[serde(flatten)]
    pub token: crate::auth::source::TokenFlags,
    /// Audit log path, or - for stdout [default: DATA_DIR/audit.jsonl in dev, - otherwise].
    #[arg(long, env = "MESHCA_AUDIT_LOG", value_name = "PATH")]
    pub audit_log: Option<String>,
    /// Ed25519 PKCS#8 key (PEM) that signs the audit log's checkpoints; required for a file --audit-log outside dev [default: DATA_DIR/audit-signing.key in dev, created with DATA_DIR/audit.pub].
    #[arg(long, env = "MESHCA_AUDIT_SIGNING_KEY", value_name = "FILE")]
    pub audit_signing_key: Option<PathBuf>,
    /// Sign an audit checkpoint after this many records [default: 1000].
    #[arg(long, env = "MESHCA_AUDIT_CHECKPOINT_EVERY", value_name = "N")]
    pub audit_checkpoint_every: Option<u64>,
    /// ...or this long after a record no checkpoint covers, whichever comes first, e.g. 10s [default: 10s].
    #[arg(long, env = "MESHCA_AUDIT_CHECKPOINT_INTERVAL", value_name = "DURATION")]
    pub audit_checkpoint_interval: Option<String>,
    /// Also keep each audit log's latest checkpoint in ConfigMap meshca-audit-<log id> in the control-plane namespace, through the Kubernetes client: --audit-checkpoint-configmap or --audit-checkpoint-configmap=BOOL [default: true when the token validation has a Kubernetes client and checkpoints are signed].
    #[arg(
        long,
        env = "MESHCA_AUDIT_CHECKPOINT_CONFIGMAP",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub audit_checkpoint_configmap: Option<bool>,
    /// Start a new audit log where the old one is missing or empty although its checkpoint remains (without it such a log is refused); the new log's first record holds the old checkpoint. No effect while a log is present.
    #[arg(long, env = "MESHCA_AUDIT_NEW_LOG", value_parser = clap::builder::BoolishValueParser::new())]
    pub audit_new_log: bool,
    /// Certify requests in flight beyond which callers get ResourceExhausted
    /// [default: sized to the cgroup's memory limit, at most 8192].
    #[arg(long, env = "MESHCA_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Threads that check CSRs and sign; admitted Certify requests queue for them in arrival order [default: the number of cores].
    #[arg(long, env = "MESHCA_SIGNING_WORKERS", value_name = "N")]
    pub signing_workers: Option<usize>,
    /// gRPC connections open at once; beyond it, new ones wait in the listen backlog until one closes (about 36 KiB each); with the admin listener's 32 and a reserve of 64 they must fit in the file-descriptor limit [default: 1024, or fewer to fit].
    #[arg(long, env = "MESHCA_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Age after which a gRPC connection is asked to close (GOAWAY; it closes once its requests in progress are answered), so idle clients free their slots and connections spread over new replicas, or "off" [default: 10m].
    #[arg(long, env = "MESHCA_MAX_CONNECTION_AGE", value_name = "DURATION")]
    pub max_connection_age: Option<String>,
    /// How long one gRPC request may take, from its headers to its answer, before it is cancelled; also bounds how long a connection asked to close can be held open by an unfinished request; with tokenreview, more than twice --token-review-timeout [default: 30s].
    #[arg(long, env = "MESHCA_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// Requests per second one identity may make (P-256 equivalents: a P-384 CSR costs 5), or "off" [default: 100].
    #[arg(long, env = "MESHCA_RATE_LIMIT_PER_IDENTITY", value_name = "RATE")]
    pub rate_limit_per_identity: Option<String>,
    /// Requests one identity may make at once after a quiet period [default: 10 x the rate].
    #[arg(long, env = "MESHCA_RATE_LIMIT_PER_IDENTITY_BURST", value_name = "N")]
    pub rate_limit_per_identity_burst: Option<f64>,
    /// Requests per second one peer address may make (P-256 equivalents), or "off" [default: off].
    #[arg(long, env = "MESHCA_RATE_LIMIT_PER_PEER", value_name = "RATE")]
    pub rate_limit_per_peer: Option<String>,
    /// Requests one peer address may make at once after a quiet period [default: 10 x the rate].
    #[arg(long, env = "MESHCA_RATE_LIMIT_PER_PEER_BURST", value_name = "N")]
    pub rate_limit_per_peer_burst: Option<f64>,
    /// Serve gRPC without TLS (only where a sidecar terminates TLS).
    #[arg(long, env = "MESHCA_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    pub plaintext: bool,
    /// How often the issuer directory and trust anchors are re-read for changes, besides file notifications [default: 30s].
    #[arg(long, env = "MESHCA_RELOAD_INTERVAL", value_name = "DURATION")]
    pub reload_interval: Option<String>,
    /// How long the token validation backend (tokenreview: the Kubernetes API server) may fail every call before /ready answers 503 [default: 60s].
    #[arg(long, env = "MESHCA_READY_API_UNREACHABLE_THRESHOLD", value_name = "DURATION")]
    pub ready_api_unreachable_threshold: Option<String>,
    /// Record issuances and denials as Kubernetes Events on the service account: --events, --events=true or --events=false [default: true with tokenreview or jwks discovery, which have a Kubernetes client].
    #[arg(
        long,
        env = "MESHCA_EVENTS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub events: Option<bool>,
    /// Record the OS of the caller's node (its kubernetes.io/os label) in audit records, looking up pods and nodes through the Kubernetes client: --audit-node-os or --audit-node-os=BOOL [default: false].
    #[arg(
        long,
        env = "MESHCA_AUDIT_NODE_OS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub audit_node_os: Option<bool>,
    /// Accept bootstrap tokens (`meshca bootstrap-token create`) for hosts without Kubernetes: --bootstrap-tokens or --bootstrap-tokens=BOOL [default: true with --dev, false otherwise].
    #[arg(
        long,
        env = "MESHCA_BOOTSTRAP_TOKENS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub bootstrap_tokens: Option<bool>,
    /// Where used bootstrap tokens are recorded [default: kubernetes when the token validation has a Kubernetes client, file otherwise].
    #[arg(long, env = "MESHCA_BOOTSTRAP_REPLAY_STORE", value_enum, value_name = "STORE")]
    pub bootstrap_replay_store: Option<BootstrapReplayStore>,
    /// The file store's path [default: DATA_DIR/bootstrap-used.jsonl in dev; required otherwise].
    #[arg(long, env = "MESHCA_BOOTSTRAP_REPLAY_FILE", value_name = "FILE")]
    pub bootstrap_replay_file: Option<PathBuf>,
    /// Accept an issuer key file every user of the host can read (unix mode o+r); without it such a key is refused at start and on reload (fix: chmod 600).
    #[arg(long, env = "MESHCA_ALLOW_WORLD_READABLE_ISSUER_KEY", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_world_readable_issuer_key: bool,
}

#[derive(Debug, Args)]
pub struct DevTokenArgs {
    /// The dev server's state directory.
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "./meshca-dev", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Namespace the token names.
    #[arg(long)]
    pub namespace: String,
    /// Service account the token names.
    #[arg(long)]
    pub service_account: String,
    /// Token lifetime, e.g. 1h, 10m.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub ttl: String,
    /// Audience the token names.
    #[arg(long, default_value = "identity.l5d.io")]
    pub audience: String,
    /// Bind the token to a pod of this name (a uid is generated).
    #[arg(long)]
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeafKeyArg {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
}

/// What every certificate request needs (`certify` and `agent`).
#[derive(Debug, Args)]
pub struct CertifyArgs {
    /// TOML file with any of these settings (same names as the flags, e.g. `token-file = "…"`).
    #[arg(long, env = "MESHCA_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// meshca's address, e.g. https://127.0.0.1:8080 (http:// for a --plaintext server).
    #[arg(long, env = "MESHCA_ADDR", value_name = "URL", required_unless_present = "config")]
    pub addr: Option<String>,
    /// PEM bundle of trust anchors to verify the server and the issued chain.
    #[arg(long, env = "MESHCA_TRUST_ANCHORS", value_name = "FILE", required_unless_present = "config")]
    pub trust_anchors: Option<PathBuf>,
    /// File holding the token to present (re-read on every attempt).
    #[arg(long, env = "MESHCA_TOKEN_FILE", value_name = "FILE", required_unless_present = "config")]
    pub token_file: Option<PathBuf>,
    /// The identity to request.
    #[arg(long, env = "MESHCA_IDENTITY", value_name = "NAME", required_unless_present = "config")]
    pub identity: Option<String>,
    /// Output directory for tls.crt, tls.key, ca.crt (created when absent).
    #[arg(long, env = "MESHCA_OUT", value_name = "DIR", required_unless_present = "config")]
    pub out: Option<PathBuf>,
    /// Name expected in meshca's serving certificate [default: meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local].
    #[arg(long, env = "MESHCA_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,
    /// Key algorithm of the new key [default: p256].
    #[arg(long, env = "MESHCA_KEY_TYPE", value_enum)]
    pub key_type: Option<LeafKeyArg>,
    /// Allow an http:// --addr on another host: the token then crosses the network in clear and meshca's certificate is not checked (only behind a TLS-terminating sidecar). Loopback http:// needs no flag.
    #[arg(long, env = "MESHCA_CLIENT_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    pub plaintext: bool,
}

/// `meshca certify`: the request flags, and optionally a CSR made elsewhere.
#[derive(Debug, Args)]
pub struct CertifyCommandArgs {
    #[command(flatten)]
    pub request: CertifyArgs,
    /// Send this CSR (PEM or DER, e.g. from `certreq -new`) unchanged instead of making a key; writes tls.crt and ca.crt, no tls.key.
    #[arg(long, env = "MESHCA_CSR", value_name = "FILE", conflicts_with = "key_type")]
    pub csr: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub request: CertifyArgs,
    /// Renew after this fraction of the certificate's lifetime [default: 0.5].
    #[arg(long, env = "MESHCA_RENEW_AT", value_name = "FRACTION")]
    pub renew_at: Option<f64>,
    /// Relative jitter on the renewal time, 0.1 = ±10% [default: 0.1].
    #[arg(long, env = "MESHCA_JITTER", value_name = "FRACTION")]
    pub jitter: Option<f64>,
    /// Get one certificate and exit (init containers, scheduled tasks).
    #[arg(long, env = "MESHCA_ONCE", value_parser = clap::builder::BoolishValueParser::new())]
    pub once: bool,
    /// Shell command run after each renewal (e.g. to make a proxy reload its files).
    #[arg(long, env = "MESHCA_ON_RENEW", value_name = "CMD")]
    pub on_renew: Option<String>,
    /// Warn when this host's clock differs from meshca's by more than this [default: 30s].
    #[arg(long, env = "MESHCA_CLOCK_OFFSET_WARNING", value_name = "DURATION")]
    pub clock_offset_warning: Option<String>,
    /// Serve /live, /ready (a valid certificate is on disk) and /metrics on this address.
    #[arg(long, env = "MESHCA_AGENT_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
}

/// The agent's TOML file (`--config` of `agent` and `certify`): the flags' names.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct AgentFile {
    pub addr: Option<String>,
    pub trust_anchors: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub identity: Option<String>,
    pub out: Option<PathBuf>,
    pub server_name: Option<String>,
    pub key_type: Option<LeafKeyArg>,
    pub plaintext: Option<bool>,
    pub renew_at: Option<f64>,
    pub jitter: Option<f64>,
    pub on_renew: Option<String>,
    pub clock_offset_warning: Option<String>,
    pub admin_listen: Option<String>,
}

/// `meshca doctor`: every input optional; what is missing is reported as not checked.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The agent's TOML file (`agent --config`): its addr, trust-anchors, token-file, identity, out and server-name, under the flags.
    #[arg(long, env = "MESHCA_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// meshca's address, e.g. https://meshca.meshca-system.svc:8080 (http:// for a --plaintext server).
    #[arg(long, env = "MESHCA_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// PEM bundle of trust anchors the agent verifies meshca and its certificates with.
    #[arg(long, env = "MESHCA_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,
    /// The agent's token file (its claims are shown, never the token).
    #[arg(long, env = "MESHCA_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The identity the agent requests [default: the one in --cert-dir/tls.crt].
    #[arg(long, env = "MESHCA_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// The agent's --out directory (tls.crt, tls.key).
    #[arg(long, env = "MESHCA_OUT", value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Name expected in meshca's serving certificate [default: meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local].
    #[arg(long, env = "MESHCA_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,
    /// Bound on each lookup, connection, handshake and call.
    #[arg(long, default_value = "3s", value_name = "DURATION")]
    pub timeout: String,
    /// meshca's --clock-skew-allowance: a larger clock offset fails.
    #[arg(long, env = "MESHCA_CLOCK_SKEW_ALLOWANCE", default_value = "2m", value_name = "DURATION")]
    pub skew_allowance: String,
    /// Print the findings as one JSON array of {check, status, found, fix}.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["meshca", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn switches_take_no_value_an_equals_value_or_nothing_at_all() {
        assert_eq!(serve(&[]).unwrap().events, None);
        assert_eq!(serve(&["--events"]).unwrap().events, Some(true));
        assert_eq!(serve(&["--events=false"]).unwrap().events, Some(false));
        assert_eq!(serve(&["--events=true"]).unwrap().events, Some(true));
        assert_eq!(serve(&["--audit-node-os"]).unwrap().audit_node_os, Some(true));
        assert!(serve(&["--events", "false"]).is_err(), "a value needs the equals sign");
        assert!(serve(&["--events=maybe"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Also fails when a `mut_arg` of `bootstrap-token create` names no flag of it.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn bootstrap_token_create_reads_the_issuer_flags_as_serve_does() {
        let flags = [
            "--config=c.toml",
            "--dev",
            "--data-dir=d",
            "--trust-domain=t.example",
            "--control-plane-namespace=cp",
            "--trust-anchors=a.pem",
            "--issuer-dir=i",
            "--allow-non-windows-algorithms",
        ];
        let create = ["meshca", "bootstrap-token", "create", "--identity", "x"];
        let cli = Cli::try_parse_from(create.iter().chain(&flags)).unwrap();
        let Command::BootstrapToken { command: BootstrapTokenCommand::Create(create) } = cli.command else {
            panic!("{:?}", cli.command)
        };
        let serve = serve(&flags).unwrap().issuer;
        assert_eq!(create.issuer, serve);
        assert_eq!(serve.trust_domain.as_deref(), Some("t.example"));
        assert!(serve.dev && serve.allow_non_windows_algorithms);
    }
}
