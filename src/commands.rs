//! Acting on each subcommand: the layer between the parsed command line and the
//! library. Each command returns a [`Failure`] that knows its exit code: 2 for a
//! usage or configuration error, 1 for anything else. Results go to stdout only
//! where scripts read them (`dev-token`, `bootstrap-token create`, `init
//! --kubernetes`); everything else goes to stderr.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::client::{self, KeyType};
use crate::agent::run::{self as agent_run, Settings as AgentSettings, TokioTimer};
use crate::agent::schedule::Policy;
use crate::auth::dev::{DevSigner, TokenClaims};
use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use crate::ca::issuer::TrustAnchors;
use crate::cli::{
    AgentArgs, AgentFile, CaKeyArg, CertifyArgs, CertifyCommandArgs, DevTokenArgs, InitArgs, IssuerArgs,
    LeafKeyArg, ServeArgs,
};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, FileConfig, DEV_TOKEN_ISSUER};
use crate::identity::Naming;

/// Whether stderr lines are JSON objects (`--log-format json`).
static JSON_OUTPUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses how [`say`] and [`report_failure`] write: plain lines, or (for
/// `--log-format json`) one JSON object a line through the log subscriber.
pub fn set_json_output(json: bool) {
    JSON_OUTPUT.store(json, std::sync::atomic::Ordering::Relaxed);
}

fn json_output() -> bool {
    JSON_OUTPUT.load(std::sync::atomic::Ordering::Relaxed)
}

/// A line for the person at the terminal (stderr), as a log event under `--log-format json`.
fn say(message: impl std::fmt::Display) {
    if json_output() {
        tracing::info!(target: "meshca", "{message}");
    } else {
        crate::logging::line(format_args!("{message}"));
    }
}

/// Prints a failed command's one line on stderr: `meshca: MESSAGE`, or a JSON
/// object with level ERROR and the exit code under `--log-format json`.
pub fn report_failure(failure: &Failure) {
    if json_output() {
        tracing::error!(target: "meshca", exit_code = failure.exit_code(), "{}", failure.message);
    } else {
        crate::logging::line(format_args!("meshca: {}", failure.message));
    }
}

/// A command that failed: the message printed (one line) and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub usage: bool,
}

impl Failure {
    fn usage(message: impl std::fmt::Display) -> Self {
        Failure { message: message.to_string(), usage: true }
    }
    fn other(message: impl std::fmt::Display) -> Self {
        Failure { message: message.to_string(), usage: false }
    }
    /// 2 for usage/configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.usage {
            2
        } else {
            1
        }
    }
}

/// `meshca init`.
pub fn init(args: InitArgs) -> Result<(), Failure> {
    let naming = Naming::new(&args.trust_domain, &args.control_plane_namespace).map_err(Failure::usage)?;
    let namespace = args.namespace.as_deref().unwrap_or(&args.control_plane_namespace);
    crate::identity::check_label(namespace)
        .map_err(|e| Failure::usage(format!("--namespace {namespace:?}: {e}")))?;
    if args.dir.join("trust-anchors.pem").exists()
        || args.dir.join("trust-anchor.key").exists()
        || args.dir.join("issuer").exists()
        || args.dir.join("audit-signing.key").exists()
    {
        return Err(Failure::usage(format!(
            "{} already holds a CA; refusing to overwrite (choose an empty --dir)",
            args.dir.display()
        )));
    }
    let key_type = match args.key_type {
        CaKeyArg::P256 => CaKeyType::P256,
        CaKeyArg::P384 => CaKeyType::P384,
        CaKeyArg::Rsa3072 => CaKeyType::Rsa3072,
    };
    if let Some(uri) = &args.issuer_key {
        return init_in_token(&args, &naming, key_type, uri);
    }
    let h = hierarchy::generate(&naming, key_type, SystemClock.now(), HierarchyLifetimes::default())
        .map_err(Failure::other)?;
    if args.kubernetes {
        return init_kubernetes(&args.dir, namespace, &args.trust_domain, &h);
    }
    crate::dev::write_hierarchy(&args.dir, &h).map_err(Failure::other)?;
    crate::dev::write_audit_key(&args.dir, &args.trust_domain).map_err(Failure::other)?;
    say(format_args!(
        "wrote {dir}/trust-anchors.pem, {dir}/issuer/tls.crt and {dir}/issuer/tls.key\n\
         {dir}/trust-anchor.key signs new issuers: keep it offline.\n\
         wrote {dir}/audit-signing.key (serve --audit-signing-key) and its verifier key {dir}/audit.pub \
         (audit verify --key): give auditors audit.pub.",
        dir = args.dir.display()
    ));
    Ok(())
}

/// `meshca init --issuer-key URI`: the issuer's key made in the token, its
/// certificate signed by a new anchor as usual; DIR/issuer holds tls.crt only.
fn init_in_token(
    args: &InitArgs,
    naming: &Naming,
    key_type: CaKeyType,
    uri: &crate::cli::SecretText,
) -> Result<(), Failure> {
    use crate::ca::token::{Kind, TokenKey, Uri};
    let uri: Uri = uri.0.parse().map_err(|e| Failure::usage(format!("--issuer-key: {e}")))?;
    let kind = match key_type {
        CaKeyType::P256 => Kind::EcP256,
        CaKeyType::P384 => Kind::EcP384,
        CaKeyType::Rsa3072 => Kind::Rsa,
    };
    let key = TokenKey::generate(&uri, kind)
        .map_err(|e| Failure::usage(format!("--issuer-key {}: {e}", uri.display())))?;
    let h =
        hierarchy::generate_for_key(naming, key_type, SystemClock.now(), HierarchyLifetimes::default(), &key)
            .map_err(Failure::other)?;
    crate::dev::write_hierarchy(&args.dir, &h).map_err(Failure::other)?;
    crate::dev::write_audit_key(&args.dir, &args.trust_domain).map_err(Failure::other)?;
    say(format_args!(
        "made the issuer key in the token ({uri}) and wrote {dir}/trust-anchors.pem and {dir}/issuer/tls.crt \
         (no tls.key: serve with --issuer-key)\n\
         {dir}/trust-anchor.key signs new issuers: keep it offline.\n\
         wrote {dir}/audit-signing.key (serve --audit-signing-key) and its verifier key {dir}/audit.pub.",
        uri = uri.display(),
        dir = args.dir.display()
    ));
    Ok(())
}

/// `meshca init --kubernetes`: the anchor (certificate and key) to `dir`, key first,
/// so nothing it signed is published before its key is safe; then the issuer and the
/// anchor as Kubernetes objects on stdout. The anchor's key is never printed.
fn init_kubernetes(
    dir: &Path,
    namespace: &str,
    trust_domain: &str,
    h: &hierarchy::Hierarchy,
) -> Result<(), Failure> {
    use crate::files::{write_new, Access};
    use std::io::Write as _;
    let write = |name: &str, contents: &str, access| {
        let path = dir.join(name);
        write_new(&path, contents.as_bytes(), access)
            .map_err(|e| Failure::other(format!("cannot write {}: {e}", path.display())))
    };
    write("trust-anchor.key", &h.anchor_key_pem, Access::Private)?;
    write("trust-anchors.pem", &h.anchor_cert_pem, Access::Public)?;
    let name = crate::audit::checkpoint::key_name(trust_domain);
    let (audit_key, audit_pem) =
        crate::audit::checkpoint::SigningKey::generate(&name).map_err(Failure::other)?;
    write("audit.pub", &format!("{}\n", audit_key.verifier()), Access::Public)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(kubernetes_objects(namespace, h, &audit_pem).as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write to stdout: {e}")))?;
    say(format_args!(
        "printed Secrets {namespace}/meshca-issuer and {namespace}/meshca-audit-key and ConfigMap \
         {namespace}/meshca-trust-anchors\n\
         wrote {dir}/trust-anchors.pem and {dir}/trust-anchor.key: the key signs new issuers, keep it offline.\n\
         wrote {dir}/audit.pub: the verifier key of the audit log's checkpoints, for auditors.",
        dir = dir.display()
    ));
    Ok(())
}

/// The issuer as a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`) and
/// the anchor as a ConfigMap (`ca-bundle.crt`), and the audit signing key as an
/// Opaque Secret (`audit-signing.key`), the names `deploy/base` mounts. The namespace
/// is a checked DNS label and the rest is base64 or PEM, so nothing needs quoting.
fn kubernetes_objects(namespace: &str, h: &hierarchy::Hierarchy, audit_key_pem: &str) -> String {
    use base64::Engine as _;
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let bundle: String = h.anchor_cert_pem.lines().map(|line| format!("    {line}\n")).collect();
    // `component` tells the CA (ca) from the audit key (audit-key), so that
    // `kubectl apply -l app.kubernetes.io/component=ca` replaces one and not the other.
    let metadata = |name: &str, component: &str| {
        format!(
            "metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    \
             app.kubernetes.io/name: meshca\n    app.kubernetes.io/part-of: meshca\n    \
             app.kubernetes.io/component: {component}\n"
        )
    };
    format!(
        "# meshca init --kubernetes: a new issuer and its trust anchor. The anchor's key is not here.\n\
         apiVersion: v1\nkind: Secret\n{secret}type: kubernetes.io/tls\ndata:\n  \
         tls.crt: {crt}\n  tls.key: {key}\n  ca.crt: {ca}\n---\n\
         apiVersion: v1\nkind: ConfigMap\n{config_map}data:\n  ca-bundle.crt: |\n{bundle}---\n\
         apiVersion: v1\nkind: Secret\n{audit_secret}type: Opaque\ndata:\n  audit-signing.key: {audit_key}\n",
        secret = metadata("meshca-issuer", "ca"),
        crt = b64(&h.issuer_cert_pem),
        key = b64(&h.issuer_key_pem),
        ca = b64(&h.anchor_cert_pem),
        config_map = metadata("meshca-trust-anchors", "ca"),
        audit_secret = metadata("meshca-audit-key", "audit-key"),
        audit_key = b64(audit_key_pem),
    )
}

/// `meshca serve`: resolves the configuration, binds, and runs until SIGTERM/Ctrl-C.
pub async fn serve(args: ServeArgs) -> Result<(), Failure> {
    survive_file_size_limit()?;
    // As many descriptors as the hard limit allows; --max-connections is sized below it.
    crate::admission::descriptors::raise();
    let file = config_file(&args.issuer)?;
    let config = Config::resolve(args, file).map_err(Failure::usage)?;
    let shutdown = shutdown_signal("finishing in-flight requests")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let prepared = match &config.dev {
        Some(paths) => Some(
            crate::dev::prepare(paths, &config.naming, clock.now(), config.issuer_key.as_ref())
                .map_err(Failure::other)?,
        ),
        None => None,
    };
    let listener = crate::server::connections::listen(config.listen)
        .map_err(|e| listen_failure("--listen", config.listen, &e))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| listen_failure("--admin-listen", config.admin_listen, &e))?;
    if let Some(prepared) = prepared {
        let bound = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let addrs = (bound(&listener, config.listen), bound(&admin, config.admin_listen));
        print_dev_instructions(&config, prepared.created_ca, addrs);
    }
    let (anchors, issuer_dir) = (config.trust_anchors.clone(), config.issuer_dir.clone());
    crate::server::run(config, clock, listener, admin, shutdown)
        .await
        .map_err(|e| start_failure(e, &anchors, &issuer_dir))
}

/// A listener that could not be bound, naming the flag that chose its address.
fn listen_failure(flag: &str, addr: SocketAddr, e: &std::io::Error) -> Failure {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(": another process (another meshca?) listens there; stop it or choose another {flag}")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!(": ports below 1024 need privileges; choose another {flag}")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!(": no interface of this host has that address; fix {flag}")
        }
        _ => String::new(),
    };
    Failure::other(format!("cannot listen on {addr} ({flag} {addr}): {e}{hint}"))
}

/// Why `serve` stopped, naming the flag to fix when the CA material is at fault.
fn start_failure(e: crate::server::Error, anchors: &Path, issuer_dir: &Path) -> Failure {
    use crate::ca::Error as Ca;
    use crate::server::Error as Server;
    let (anchors_flag, issuer_flag) =
        (format!("--trust-anchors {}", anchors.display()), format!("--issuer-dir {}", issuer_dir.display()));
    let flag_of =
        |path: &Path| if path.starts_with(issuer_dir) { issuer_flag.clone() } else { anchors_flag.clone() };
    match e {
        Server::Issuer(Ca::Read { path, source }) => {
            Failure::usage(format!("{}: cannot read {}: {source}", flag_of(&path), path.display()))
        }
        Server::Issuer(
            ref inner @ (Ca::NoCertificate { ref path } | Ca::BadCertificate { ref path, .. } | Ca::BadKey { ref path, .. }),
        ) => Failure::usage(format!("{}: {inner}", flag_of(path))),
        Server::Issuer(Ca::Untrusted { reason }) => Failure::usage(format!(
            "the issuer in {issuer_flag} does not chain to {anchors_flag} ({reason}): it was signed by another CA; \
             give the trust anchors of the CA that signed it, or an issuer made for these anchors"
        )),
        Server::Issuer(inner @ (Ca::NotCa { .. } | Ca::KeyMismatch | Ca::KeyWorldReadable { .. })) => {
            Failure::usage(format!("{issuer_flag}: {inner}"))
        }
        inner @ Server::IssuerKey { .. } => Failure::usage(inner),
        other => Failure::other(other),
    }
}

/// The server's `--config` file, parsed (empty without one).
fn config_file(args: &IssuerArgs) -> Result<FileConfig, Failure> {
    let Some(path) = &args.config else { return Ok(FileConfig::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("--config {}: {e}", path.display())))?;
    Config::parse_file(&text).map_err(Failure::usage)
}

/// The dev-mode banner: where meshca listens and two commands that get a
/// certificate from it as configured (its trust domain, namespace and serving name),
/// naming this binary as it was started (`target/release/meshca` after `cargo run`).
fn print_dev_instructions(config: &Config, created: bool, (listen, admin): (SocketAddr, SocketAddr)) {
    let Some(paths) = &config.dev else { return };
    let scheme = if config.plaintext { "http" } else { "https" };
    let program = program_name();
    let dir = shell_quote(&paths.data_dir.display().to_string());
    let identity = match config.naming.identity("default", "web") {
        Ok(identity) => identity.dns_name,
        Err(_) => return,
    };
    let server_name = match config.naming.own_identity(&config.service_account) {
        Ok(own) if own.dns_name != crate::doctor::DEFAULT_SERVER_NAME && !config.plaintext => {
            format!(" --server-name {}", own.dns_name)
        }
        _ => String::new(),
    };
    say(format_args!(
        "meshca dev mode: {} CA in {dir}; gRPC on {scheme}://{listen}, admin on http://{admin}\n\
         get a certificate:\n  \
         {program} dev-token --data-dir {dir} --namespace default --service-account web > /tmp/web.token\n  \
         {program} certify --addr {scheme}://{listen} --trust-anchors {dir}/trust-anchors.pem --token-file /tmp/web.token \\\n    \
         --identity {identity}{server_name} --out /tmp/web",
        if created { "created a new" } else { "reusing the" },
    ));
}

/// This program as the user started it, for commands printed to be pasted: the
/// path it was run by (`target/release/meshca`), or `meshca` when it was found on PATH.
fn program_name() -> String {
    match std::env::args().next() {
        Some(arg0) if arg0.contains(std::path::MAIN_SEPARATOR) || arg0.contains('/') => shell_quote(&arg0),
        _ => "meshca".into(),
    }
}

/// `s` as one word for a POSIX shell: unchanged when it holds only characters no
/// shell treats specially, else in single quotes.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':' | ',' | '=' | '+'));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Registers SIGTERM and Ctrl-C handlers now (so a signal that arrives during
/// start-up is not lost to the default action) and returns a future that completes
/// on either.
fn shutdown_signal(
    what: &'static str,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind| signal(kind).map_err(|e| Failure::other(format!("cannot handle signals: {e}")));
        let mut term = handler(SignalKind::terminate())?;
        let mut int = handler(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: {what}");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: {what}");
        })
    }
}

/// SIGXFSZ: 25 on Linux (but MIPS), macOS and the BSDs.
#[cfg(unix)]
const SIGXFSZ: i32 = if cfg!(any(
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_os = "solaris",
    target_os = "illumos",
    target_os = "nto"
)) {
    31
} else if cfg!(target_os = "haiku") {
    29
} else {
    25
};

/// Makes a write past a file size limit (`RLIMIT_FSIZE`: `ulimit -f`, systemd
/// `LimitFSIZE=`) fail with EFBIG instead of killing the process: by default
/// SIGXFSZ terminates it, mid-request. With a handler registered (Unix only;
/// the signal is not ignored, so programs the process starts get the default
/// action back), the write fails and its writer handles the error like a full
/// disk: the audit log refuses issuance and recovers (`crate::audit`), the agent
/// retries the round. The task drains the signals for the life of the runtime.
fn survive_file_size_limit() -> Result<(), Failure> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut xfsz = signal(SignalKind::from_raw(SIGXFSZ))
            .map_err(|e| Failure::other(format!("cannot handle SIGXFSZ: {e}")))?;
        tokio::spawn(async move {
            while xfsz.recv().await.is_some() {
                tracing::debug!("SIGXFSZ: a write went past the file size limit and fails with EFBIG");
            }
        });
    }
    Ok(())
}

/// `meshca dev-token`: prints the token alone on stdout.
pub fn dev_token(args: DevTokenArgs) -> Result<String, Failure> {
    let ttl = humantime::parse_duration(&args.ttl)
        .map_err(|e| Failure::usage(format!("--ttl {:?}: {e}", args.ttl)))?;
    if ttl < Duration::from_secs(1) {
        return Err(Failure::usage("--ttl must be at least 1s"));
    }
    let key_path = args.data_dir.join("dev-token.key");
    let pem = std::fs::read_to_string(&key_path).map_err(|e| {
        Failure::usage(format!(
            "cannot read {}: {e} (start `meshca serve --dev --data-dir {}` once first)",
            key_path.display(),
            args.data_dir.display()
        ))
    })?;
    let signer = DevSigner::from_pem(&pem).map_err(Failure::other)?;
    let now = SystemClock.now();
    let pod = args.pod_name.map(|name| {
        let mut uid = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uid);
        (name, crate::audit::hex(&uid))
    });
    let claims = TokenClaims {
        pod,
        ..TokenClaims::projected(
            DEV_TOKEN_ISSUER,
            args.audience,
            args.namespace,
            args.service_account,
            now,
            ttl,
        )
    };
    signer.sign(&claims).map_err(Failure::other)
}

/// `meshca bootstrap-token create`: the token alone on stdout (it is a credential:
/// nothing else ever shows it), what it allows on stderr.
pub fn bootstrap_token_create(args: crate::cli::BootstrapTokenCreateArgs) -> Result<String, Failure> {
    use crate::auth::bootstrap::{BootstrapSigner, MAX_TTL, MAX_USES};
    use crate::ca::issuer::issuer_files;
    let ttl = humantime::parse_duration(&args.ttl)
        .map_err(|e| Failure::usage(format!("--ttl {:?}: {e}", args.ttl)))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(Failure::usage("--ttl must be at least 1s and at most 24h"));
    }
    if args.uses == 0 || args.uses > MAX_USES {
        return Err(Failure::usage(format!("--uses must be from 1 to {MAX_USES}")));
    }
    let file = config_file(&args.issuer)?;
    // What tells whether the server accepts bootstrap tokens: its config file, --dev
    // (on by default), or MESHCA_BOOTSTRAP_TOKENS in this environment.
    let bootstrap_tokens = match std::env::var("MESHCA_BOOTSTRAP_TOKENS") {
        Ok(value) => Some(parse_bool(&value).ok_or_else(|| {
            Failure::usage(format!("MESHCA_BOOTSTRAP_TOKENS={value:?}: use true or false"))
        })?),
        Err(_) => None,
    };
    let known = args.issuer.config.is_some() || args.issuer.dev || bootstrap_tokens.is_some();
    // The server's own settings and defaults decide names and the issuer's place.
    let config =
        Config::resolve(ServeArgs { issuer: args.issuer, bootstrap_tokens, ..Default::default() }, file)
            .map_err(Failure::usage)?;
    let identity = args.identity.trim();
    if config.naming.parse(identity).is_none() {
        let (ns, td) = (config.naming.control_plane_namespace(), config.naming.trust_domain());
        return Err(Failure::usage(format!(
            "--identity {identity:?} is not an identity of trust domain {td} and control-plane namespace {ns}; \
             use SA.NS.serviceaccount.identity.{ns}.{td}"
        )));
    }
    let token = match &config.issuer_key {
        Some(uri) => Some(std::sync::Arc::new(
            crate::ca::token::TokenKey::open(uri)
                .map_err(|e| Failure::usage(format!("--issuer-key {}: {e}", uri.display())))?,
        )),
        None => None,
    };
    let now = SystemClock.now();
    let hint = if config.dev.is_some() { " (start `meshca serve --dev` once first)" } else { "" };
    let snapshot = crate::ca::store::Snapshot::load_with(
        &config.trust_anchors,
        &config.issuer_dir,
        now,
        config.reload.issuer_algorithms,
        token.as_ref(),
    )
    .map_err(|e| Failure::usage(format!("{e}{hint}")))?;
    let signer = match token {
        Some(token) => BootstrapSigner::with_token(token, &snapshot.issuer, config.naming.clone()),
        None => {
            let key = crate::ca::material::read_pkcs8_key(&issuer_files(&config.issuer_dir).1)
                .map_err(|e| Failure::usage(format!("{e}{hint}")))?;
            BootstrapSigner::new(&key, &snapshot.issuer, config.naming.clone())
        }
    }
    .map_err(Failure::other)?;
    let (token, claims) = signer.create(identity, ttl, args.uses, now).map_err(Failure::other)?;
    if known && config.bootstrap.is_none() {
        say("warning: this configuration does not enable --bootstrap-tokens: the server refuses the token until it does");
    } else if !known {
        say("note: the server must run with --bootstrap-tokens (off unless --dev) to accept this token");
    }
    say(format_args!(
        "bootstrap token {id} for {identity}: {uses} certificate(s) until {exp}.\n\
         It is signed by the issuer {kid}: rotating the issuer makes it worthless. Give it to the host over a \
         private channel; once the host has its certificate it renews with it and needs no token.",
        id = claims.token_id,
        uses = claims.uses,
        exp = humantime::format_rfc3339_seconds(claims.expires_at),
        kid = signer.kid(),
    ));
    Ok(token.expose().to_owned())
}

/// A boolean as the `MESHCA_*` switches read one: clap's own boolish parser
/// (true/false, 1/0, yes/no, on/off, y/n, t/f).
fn parse_bool(value: &str) -> Option<bool> {
    use clap::builder::TypedValueParser as _;
    let parser = clap::builder::BoolishValueParser::new();
    parser.parse_ref(&clap::Command::new("meshca"), None, std::ffi::OsStr::new(value.trim())).ok()
}

fn key_type(arg: LeafKeyArg) -> KeyType {
    match arg {
        LeafKeyArg::P256 => KeyType::P256,
        LeafKeyArg::P384 => KeyType::P384,
        LeafKeyArg::Rsa2048 => KeyType::Rsa2048,
        LeafKeyArg::Rsa3072 => KeyType::Rsa3072,
    }
}

/// meshca's own name for the default trust domain and namespace.
fn default_server_name() -> Result<String, Failure> {
    Naming::new("cluster.local", "meshca-system")
        .and_then(|n| n.own_identity("meshca"))
        .map(|i| i.dns_name)
        .map_err(Failure::other)
}

/// Reads the agent's `--config` file, if any.
fn agent_file(path: Option<&Path>) -> Result<AgentFile, Failure> {
    let Some(path) = path else { return Ok(AgentFile::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("--config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::usage(format!("--config {}: {e}", path.display())))
}

/// Agent settings from `certify`/`agent` arguments over the config file, checked.
fn agent_settings(args: CertifyArgs, file: &AgentFile, policy: Policy) -> Result<AgentSettings, Failure> {
    policy.validate().map_err(Failure::usage)?;
    let missing =
        |flag: &str| Failure::usage(format!("--{flag} is required (flag, environment or --config)"));
    let trust_anchors =
        args.trust_anchors.or(file.trust_anchors.clone()).ok_or_else(|| missing("trust-anchors"))?;
    // Fail early, as a usage error, on anchors that cannot be read at all.
    TrustAnchors::load(&trust_anchors).map_err(Failure::usage)?;
    Ok(AgentSettings {
        server_name: match args.server_name.or(file.server_name.clone()) {
            Some(n) => n,
            None => default_server_name()?,
        },
        addr: plaintext_allowed(
            args.addr.or(file.addr.clone()).ok_or_else(|| missing("addr"))?,
            args.plaintext || file.plaintext.unwrap_or(false),
        )?,
        trust_anchors,
        token_file: args.token_file.or(file.token_file.clone()).ok_or_else(|| missing("token-file"))?,
        identity: args.identity.or(file.identity.clone()).ok_or_else(|| missing("identity"))?,
        out: args.out.or(file.out.clone()).ok_or_else(|| missing("out"))?,
        key_type: key_type(args.key_type.or(file.key_type).unwrap_or(LeafKeyArg::P256)),
        policy,
        offset_warning: Duration::from_secs(30),
        on_renew: None,
        check_with: None,
    })
}

/// `addr`, unless it would send the token in clear to another host without
/// `--plaintext` saying so (or names `--plaintext` for an https:// address).
fn plaintext_allowed(addr: String, plaintext: bool) -> Result<String, Failure> {
    let target = crate::doctor::net::Target::parse(&addr).map_err(Failure::usage)?;
    let loopback = target.host == "localhost"
        || target.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match (target.tls, plaintext) {
        (true, true) => Err(Failure::usage(format!(
            "--plaintext is for an http:// --addr; {addr} is TLS (leave --plaintext out)"
        ))),
        (false, false) if !loopback => Err(Failure::usage(format!(
            "--addr {addr}: http:// would send the token in clear to another host and not check meshca's \
             certificate; use https://, or pass --plaintext if meshca sits behind a TLS-terminating sidecar"
        ))),
        _ => Ok(addr),
    }
}

fn round_failure(e: agent_run::Error, settings: &AgentSettings) -> Failure {
    use agent_run::Error as E;
    match e {
        E::Certify(client::Error::Address { .. }) | E::Token { .. } | E::Csr { .. } | E::OtherKey { .. } => {
            Failure::usage(e)
        }
        E::Certify(client::Error::Connect { .. }) | E::Certify(client::Error::Refused { .. }) => {
            Failure::other(format!("{e}; to check each step: {}", doctor_command(settings)))
        }
        _ => Failure::other(e),
    }
}

/// The `meshca doctor` command line that checks what `settings` would do.
fn doctor_command(settings: &AgentSettings) -> String {
    let program = program_name();
    format!(
        "{program} doctor --addr {} --trust-anchors {} --token-file {} --identity {}",
        settings.addr,
        settings.trust_anchors.display(),
        settings.token_file.display(),
        settings.identity
    )
}

/// `meshca certify`: one certificate, verified, written to `--out`; with `--csr`,
/// for a CSR made elsewhere (no `tls.key` is written).
pub async fn certify(args: CertifyCommandArgs) -> Result<(), Failure> {
    survive_file_size_limit()?;
    let file = agent_file(args.request.config.as_deref())?;
    let settings = agent_settings(args.request, &file, Policy::default())?;
    let Some(csr) = args.csr else { return certify_round(&settings).await };
    let renewed = agent_run::submit_csr(&settings, &csr, &SystemClock)
        .await
        .map_err(|e| round_failure(e, &settings))?;
    say(format_args!(
        "wrote {}, ca.crt for {} (valid until {}); the key stays where the CSR was made",
        settings.out.join("tls.crt").display(),
        settings.identity,
        humantime::format_rfc3339_seconds(renewed.not_after)
    ));
    Ok(())
}

/// `meshca agent`: keeps `--out` fresh until SIGTERM/Ctrl-C (or once with `--once`).
pub async fn agent(args: AgentArgs) -> Result<(), Failure> {
    survive_file_size_limit()?;
    let file = agent_file(args.request.config.as_deref())?;
    let offset_warning =
        args.clock_offset_warning.or(file.clock_offset_warning.clone()).unwrap_or_else(|| "30s".into());
    let offset_warning = humantime::parse_duration(&offset_warning)
        .map_err(|e| Failure::usage(format!("--clock-offset-warning: {e}")))?;
    let defaults = Policy::default();
    let policy = Policy {
        renew_at: args.renew_at.or(file.renew_at).unwrap_or(defaults.renew_at),
        jitter: args.jitter.or(file.jitter).unwrap_or(defaults.jitter),
        ..defaults
    };
    let admin_listen = args.admin_listen.or(file.admin_listen.clone());
    let on_renew = args.on_renew.or(file.on_renew.clone());
    let mut settings = agent_settings(args.request, &file, policy)?;
    settings.offset_warning = offset_warning;
    settings.on_renew = on_renew;
    settings.check_with = Some(doctor_command(&settings));
    if args.once {
        return certify_round(&settings).await;
    }
    let shutdown = shutdown_signal("no more renewals; the certificate files stay as they are")?;
    let status = Arc::new(crate::agent::status::Status::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    if let Some(addr) = &admin_listen {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| Failure::usage(format!("--admin-listen {addr:?} is not an IP:port address")))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::other(format!("cannot listen on {addr}: {e}")))?;
        // Ends with the process, after the loop below has returned.
        tokio::spawn(crate::agent::admin::serve(
            listener,
            status.clone(),
            clock.clone(),
            std::future::pending(),
        ));
    }
    agent_run::run_with_status(settings, clock, Arc::new(TokioTimer), status, shutdown).await;
    Ok(())
}

/// One round (`certify`, `agent --once`), then `--on-renew`: exit 1 when it fails.
async fn certify_round(settings: &AgentSettings) -> Result<(), Failure> {
    let renewed =
        agent_run::renew_once(settings, &SystemClock).await.map_err(|e| round_failure(e, settings))?;
    say(format_args!(
        "wrote {}, tls.key, ca.crt for {} (valid until {})",
        settings.out.join("tls.crt").display(),
        settings.identity,
        humantime::format_rfc3339_seconds(renewed.not_after)
    ));
    agent_run::notify(settings).await.map_err(Failure::other)
}

/// `meshca doctor`: the report on stdout (lines, or JSON with `--json`); exit 1
/// when a check failed, 2 for unusable flags.
pub async fn doctor(args: crate::cli::DoctorArgs) -> Result<(), Failure> {
    let duration = |flag: &str, value: &str| match humantime::parse_duration(value) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err(Failure::usage(format!("{flag} must be more than 0"))),
        Err(e) => Err(Failure::usage(format!("{flag} {value:?}: {e}"))),
    };
    // The agent's own file, under the flags: doctor sees what the agent sees.
    let file = agent_file(args.config.as_deref())?;
    let addr = args.addr.or(file.addr);
    if let Some(addr) = &addr {
        crate::doctor::net::Target::parse(addr).map_err(Failure::usage)?;
    }
    let options = crate::doctor::Options {
        timeout: duration("--timeout", &args.timeout)?,
        skew_allowance: duration("--skew-allowance", &args.skew_allowance)?,
        server_name: args
            .server_name
            .or(file.server_name)
            .unwrap_or_else(|| crate::doctor::DEFAULT_SERVER_NAME.to_owned()),
        addr,
        trust_anchors: args.trust_anchors.or(file.trust_anchors),
        token_file: args.token_file.or(file.token_file),
        identity: args.identity.or(file.identity),
        cert_dir: args.cert_dir.or(file.out),
    };
    if options.addr.is_none() && options.cert_dir.is_none() && options.token_file.is_none() {
        return Err(Failure::usage(
            "doctor checks what the agent would do: give it the agent's settings, --config FILE (the agent's \
             TOML), or --addr URL --trust-anchors FILE --token-file FILE --identity NAME [--cert-dir DIR] \
             (the MESHCA_* variables work too)",
        ));
    }
    let report = crate::doctor::run(&options, &SystemClock).await;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    match report.failed() {
        failed if failed.is_empty() => Ok(()),
        failed => Err(Failure::other(format!("doctor: failed: {}", failed.join(", ")))),
    }
}

/// Reads the verifier keys `--key` names.
fn verifier_keys(
    paths: &[std::path::PathBuf],
) -> Result<Vec<crate::audit::checkpoint::VerifierKey>, Failure> {
    paths
        .iter()
        .map(|p| {
            crate::audit::checkpoint::VerifierKey::read(p)
                .map_err(|e| Failure::usage(format!("--key {}: {e}", p.display())))
        })
        .collect()
}

/// [`crate::audit::prove::check`], its errors as failures: unreadable input is a usage error.
fn audit_check(
    file: &Path,
    keys: &[std::path::PathBuf],
    checkpoint: Option<&Path>,
) -> Result<crate::audit::prove::Checked, Failure> {
    use crate::audit::prove::CheckError;
    let keys = verifier_keys(keys)?;
    crate::audit::prove::check(file, &keys, checkpoint).map_err(|e| match e {
        CheckError::Log(crate::audit::VerifyError::Io(e)) => {
            Failure::usage(format!("cannot read {}: {e}", file.display()))
        }
        e => Failure::other(format!("{}: {e}", file.display())),
    })
}

/// `meshca audit verify FILE [--key VKEYFILE]... [--checkpoint CHECKPOINTFILE]`.
pub fn audit_verify(
    file: &Path,
    keys: &[std::path::PathBuf],
    checkpoint: Option<&Path>,
) -> Result<(), Failure> {
    let checked = audit_check(file, keys, checkpoint)?;
    let report = &checked.report;
    let name = file.display();
    let covered = checked.covered();
    if keys.is_empty() {
        say(format_args!(
            "{name}: chain intact, {} records; without --key nothing is proven: anyone who can write the file \
             can recompute the chain",
            report.records
        ));
    } else {
        say(format_args!(
            "{name}: intact, {} records; {covered} proven by signed checkpoints",
            report.records
        ));
        for opened in [&checked.latest, &checked.saved].into_iter().flatten() {
            let cp = &opened.checkpoint;
            say(format_args!(
                "{name}: checkpoint {}: {} records, origin {}{}",
                opened.path.display(),
                cp.size,
                cp.origin,
                if cp.closed() { ", written as meshca closed the log" } else { "" }
            ));
        }
        if let (Some(latest), Some(saved)) = (&checked.latest, &checked.saved) {
            say(format_args!(
                "{name}: append-only since {} (consistency proof from {} to {} records)",
                saved.path.display(),
                saved.checkpoint.size,
                latest.checkpoint.size
            ));
        }
        if report.records > covered {
            say(format_args!(
                "{name}: records {}..={} are not yet covered by a checkpoint: not proven",
                covered + 1,
                report.records
            ));
        }
    }
    if report.gaps > 0 {
        say(format_args!(
            "{name}: {} gap(s) recorded: {} decision(s) refused unrecorded while the audit sink failed (no \
             certificate was returned for them), {} incomplete line(s) cut off at start",
            report.gaps, report.refused, report.torn
        ));
    }
    if report.uncovered > 0 {
        say(format_args!(
            "{name}: {} record(s) were written before a checkpoint could cover them (an unclean stop, or before \
             checkpoints were kept): only the file vouches for them (see the `uncovered` records)",
            report.uncovered
        ));
    }
    if let Some(c) = &report.continues {
        say(format_args!(
            "{name}: record {} continues a previous log ({}) that ends at seq {}{}",
            c.seq,
            c.previous_file,
            c.previous_seq,
            if c.previous_hash.is_empty() { String::new() } else { format!(", hash {}", c.previous_hash) }
        ));
    }
    if let Some(bytes) = report.incomplete_tail {
        say(format_args!(
            "{name}: the final line is incomplete ({bytes} bytes, not counted) and no checkpoint covers it: \
             an interrupted write or a tail cut short, so the log cannot tell whether a certificate was \
             returned for it; `meshca serve` cuts it off and records a gap at its next start"
        ));
    }
    Ok(())
}

/// `meshca audit prove FILE --key VKEYFILE (--serial HEX | --checkpoint CHECKPOINTFILE)`.
pub fn audit_prove(
    file: &Path,
    keys: &[std::path::PathBuf],
    serial: Option<&str>,
    checkpoint: Option<&Path>,
) -> Result<(), Failure> {
    let checked = audit_check(file, keys, checkpoint)?;
    let proof = match serial {
        Some(serial) => crate::audit::prove::inclusion(file, &checked, serial),
        None => crate::audit::prove::consistency(&checked),
    }
    .map_err(|e| Failure::other(format!("{}: {e}", file.display())))?;
    println!("{proof:#}");
    Ok(())
}
