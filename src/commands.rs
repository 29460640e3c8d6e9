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
    AgentArgs, AgentFile, CaKeyArg, CertifyArgs, DevTokenArgs, InitArgs, IssuerArgs, LeafKeyArg, ServeArgs,
};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, FileConfig, DEV_TOKEN_ISSUER};
use crate::identity::Naming;

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
    let h = hierarchy::generate(&naming, key_type, SystemClock.now(), HierarchyLifetimes::default())
        .map_err(Failure::other)?;
    if args.kubernetes {
        return init_kubernetes(&args.dir, namespace, &h);
    }
    crate::dev::write_hierarchy(&args.dir, &h).map_err(Failure::other)?;
    eprintln!(
        "wrote {dir}/trust-anchors.pem, {dir}/issuer/tls.crt and {dir}/issuer/tls.key\n\
         {dir}/trust-anchor.key signs new issuers: keep it offline.",
        dir = args.dir.display()
    );
    Ok(())
}

/// `meshca init --kubernetes`: the anchor (certificate and key) to `dir`, key first,
/// so nothing it signed is published before its key is safe; then the issuer and the
/// anchor as Kubernetes objects on stdout. The anchor's key is never printed.
fn init_kubernetes(dir: &Path, namespace: &str, h: &hierarchy::Hierarchy) -> Result<(), Failure> {
    use crate::agent::files::{write_new, Access};
    use std::io::Write as _;
    let write = |name: &str, contents: &str, access| {
        let path = dir.join(name);
        write_new(&path, contents.as_bytes(), access)
            .map_err(|e| Failure::other(format!("cannot write {}: {e}", path.display())))
    };
    write("trust-anchor.key", &h.anchor_key_pem, Access::Private)?;
    write("trust-anchors.pem", &h.anchor_cert_pem, Access::Public)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(kubernetes_objects(namespace, h).as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write to stdout: {e}")))?;
    eprintln!(
        "printed Secret {namespace}/meshca-issuer and ConfigMap {namespace}/meshca-trust-anchors\n\
         wrote {dir}/trust-anchors.pem and {dir}/trust-anchor.key: the key signs new issuers, keep it offline.",
        dir = dir.display()
    );
    Ok(())
}

/// The issuer as a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`) and
/// the anchor as a ConfigMap (`ca-bundle.crt`), the names `deploy/base` mounts. The
/// namespace is a checked DNS label and the rest is base64 or PEM, so nothing needs
/// quoting.
fn kubernetes_objects(namespace: &str, h: &hierarchy::Hierarchy) -> String {
    use base64::Engine as _;
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let bundle: String = h.anchor_cert_pem.lines().map(|line| format!("    {line}\n")).collect();
    let metadata = |name: &str| {
        format!(
            "metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    \
             app.kubernetes.io/name: meshca\n    app.kubernetes.io/part-of: meshca\n"
        )
    };
    format!(
        "# meshca init --kubernetes: a new issuer and its trust anchor. The anchor's key is not here.\n\
         apiVersion: v1\nkind: Secret\n{secret}type: kubernetes.io/tls\ndata:\n  \
         tls.crt: {crt}\n  tls.key: {key}\n  ca.crt: {ca}\n---\n\
         apiVersion: v1\nkind: ConfigMap\n{config_map}data:\n  ca-bundle.crt: |\n{bundle}",
        secret = metadata("meshca-issuer"),
        crt = b64(&h.issuer_cert_pem),
        key = b64(&h.issuer_key_pem),
        ca = b64(&h.anchor_cert_pem),
        config_map = metadata("meshca-trust-anchors"),
    )
}

/// `meshca serve`: resolves the configuration, binds, and runs until SIGTERM/Ctrl-C.
pub async fn serve(args: ServeArgs) -> Result<(), Failure> {
    survive_file_size_limit()?;
    let file = config_file(&args.issuer)?;
    let config = Config::resolve(args, file).map_err(Failure::usage)?;
    let shutdown = shutdown_signal()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let prepared = match &config.dev {
        Some(paths) => Some(crate::dev::prepare(paths, &config.naming, clock.now()).map_err(Failure::other)?),
        None => None,
    };
    let listener = crate::server::connections::listen(config.listen)
        .map_err(|e| Failure::other(format!("cannot listen on {}: {e}", config.listen)))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| Failure::other(format!("cannot listen on {}: {e}", config.admin_listen)))?;
    if let Some(prepared) = prepared {
        let bound = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let addrs = (bound(&listener, config.listen), bound(&admin, config.admin_listen));
        print_dev_instructions(&config, prepared.created_ca, addrs);
    }
    crate::server::run(config, clock, listener, admin, shutdown).await.map_err(Failure::other)
}

/// The server's `--config` file, parsed (empty without one).
fn config_file(args: &IssuerArgs) -> Result<FileConfig, Failure> {
    let Some(path) = &args.config else { return Ok(FileConfig::default()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("--config {}: {e}", path.display())))?;
    Config::parse_file(&text).map_err(Failure::usage)
}

fn print_dev_instructions(config: &Config, created: bool, (listen, admin): (SocketAddr, SocketAddr)) {
    let Some(paths) = &config.dev else { return };
    let dir = paths.data_dir.display();
    let scheme = if config.plaintext { "http" } else { "https" };
    eprintln!(
        "meshca dev mode: {} CA in {dir}; gRPC on {scheme}://{}, admin on http://{}\n\
         get a certificate:\n  \
         meshca dev-token --data-dir {dir} --namespace default --service-account web > /tmp/web.token\n  \
         meshca certify --addr {scheme}://{} --trust-anchors {dir}/trust-anchors.pem --token-file /tmp/web.token \\\n    \
         --identity web.default.serviceaccount.identity.{}.{} --out /tmp/web",
        if created { "created a new" } else { "reusing the" },
        listen,
        admin,
        listen,
        config.naming.control_plane_namespace(),
        config.naming.trust_domain(),
    );
}

/// Registers SIGTERM and Ctrl-C handlers now (so a signal that arrives during
/// start-up is not lost to the default action) and returns a future that completes
/// on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, Failure> {
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
            tracing::info!("shutting down: finishing in-flight requests");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: finishing in-flight requests");
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
    let from_file = args.issuer.config.is_some();
    // The server's own settings and defaults decide names and the issuer's place.
    let config = Config::resolve(ServeArgs { issuer: args.issuer, ..Default::default() }, file)
        .map_err(Failure::usage)?;
    let identity = args.identity.trim();
    if config.naming.parse(identity).is_none() {
        let (ns, td) = (config.naming.control_plane_namespace(), config.naming.trust_domain());
        return Err(Failure::usage(format!(
            "--identity {identity:?} is not an identity of trust domain {td} and control-plane namespace {ns}; \
             use SA.NS.serviceaccount.identity.{ns}.{td}"
        )));
    }
    let now = SystemClock.now();
    let hint = if config.dev.is_some() { " (start `meshca serve --dev` once first)" } else { "" };
    let snapshot = crate::ca::store::Snapshot::load_with(
        &config.trust_anchors,
        &config.issuer_dir,
        now,
        config.reload.issuer_algorithms,
    )
    .map_err(|e| Failure::usage(format!("{e}{hint}")))?;
    let key = crate::ca::material::read_pkcs8_key(&issuer_files(&config.issuer_dir).1)
        .map_err(|e| Failure::usage(format!("{e}{hint}")))?;
    let signer =
        BootstrapSigner::new(&key, &snapshot.issuer, config.naming.clone()).map_err(Failure::other)?;
    let (token, claims) = signer.create(identity, ttl, args.uses, now).map_err(Failure::other)?;
    if from_file && config.bootstrap.is_none() {
        eprintln!("warning: this configuration does not enable --bootstrap-tokens: the server refuses the token until it does");
    }
    eprintln!(
        "bootstrap token {id} for {identity}: {uses} certificate(s) until {exp}.\n\
         It is signed by the issuer {kid}: rotating the issuer makes it worthless. Give it to the host over a \
         private channel; once the host has its certificate it renews with it and needs no token.",
        id = claims.token_id,
        uses = claims.uses,
        exp = humantime::format_rfc3339_seconds(claims.expires_at),
        kid = signer.kid(),
    );
    Ok(token.expose().to_owned())
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
        addr: args.addr.or(file.addr.clone()).ok_or_else(|| missing("addr"))?,
        trust_anchors,
        token_file: args.token_file.or(file.token_file.clone()).ok_or_else(|| missing("token-file"))?,
        identity: args.identity.or(file.identity.clone()).ok_or_else(|| missing("identity"))?,
        out: args.out.or(file.out.clone()).ok_or_else(|| missing("out"))?,
        key_type: key_type(args.key_type.or(file.key_type).unwrap_or(LeafKeyArg::P256)),
        policy,
        offset_warning: Duration::from_secs(30),
        on_renew: None,
    })
}

fn round_failure(e: agent_run::Error) -> Failure {
    match e {
        agent_run::Error::Certify(client::Error::Address { .. }) | agent_run::Error::Token { .. } => {
            Failure::usage(e)
        }
        _ => Failure::other(e),
    }
}

/// `meshca certify`: one certificate, verified, written to `--out`.
pub async fn certify(args: CertifyArgs) -> Result<(), Failure> {
    survive_file_size_limit()?;
    let file = agent_file(args.config.as_deref())?;
    certify_round(&agent_settings(args, &file, Policy::default())?).await
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
    if args.once {
        return certify_round(&settings).await;
    }
    let shutdown = shutdown_signal()?;
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

async fn certify_round(settings: &AgentSettings) -> Result<(), Failure> {
    let renewed = agent_run::renew_once(settings, &SystemClock).await.map_err(round_failure)?;
    eprintln!(
        "wrote {}, tls.key, ca.crt for {} (valid until {})",
        settings.out.join("tls.crt").display(),
        settings.identity,
        humantime::format_rfc3339_seconds(renewed.not_after)
    );
    Ok(())
}

/// `meshca doctor`: the report on stdout (lines, or JSON with `--json`); exit 1
/// when a check failed, 2 for unusable flags.
pub async fn doctor(args: crate::cli::DoctorArgs) -> Result<(), Failure> {
    let duration = |flag: &str, value: &str| match humantime::parse_duration(value) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err(Failure::usage(format!("{flag} must be more than 0"))),
        Err(e) => Err(Failure::usage(format!("{flag} {value:?}: {e}"))),
    };
    if let Some(addr) = &args.addr {
        crate::doctor::net::Target::parse(addr).map_err(Failure::usage)?;
    }
    let options = crate::doctor::Options {
        timeout: duration("--timeout", &args.timeout)?,
        skew_allowance: duration("--skew-allowance", &args.skew_allowance)?,
        server_name: args.server_name.unwrap_or_else(|| crate::doctor::DEFAULT_SERVER_NAME.to_owned()),
        addr: args.addr,
        trust_anchors: args.trust_anchors,
        token_file: args.token_file,
        identity: args.identity,
        cert_dir: args.cert_dir,
    };
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

/// `meshca audit verify FILE`.
pub fn audit_verify(file: &Path) -> Result<(), Failure> {
    match crate::audit::verify_file(file) {
        Ok(report) => {
            let name = file.display();
            eprintln!("{name}: intact, {} records", report.records);
            if report.gaps > 0 {
                eprintln!(
                    "{name}: {} gap(s) recorded: {} decision(s) refused unrecorded while the audit sink failed, \
                     {} interrupted write(s) cut off at start; no certificate was returned for any of them",
                    report.gaps, report.refused, report.torn
                );
            }
            if let Some(c) = &report.continues {
                eprintln!(
                    "{name}: record {} continues a previous file ({}) that ends at seq {}, hash {}",
                    c.seq, c.previous_file, c.previous_seq, c.previous_hash
                );
            }
            if let Some(bytes) = report.incomplete_tail {
                eprintln!(
                    "{name}: the final line is incomplete ({bytes} bytes, not counted): an interrupted write, \
                     never acknowledged, so no certificate was returned for it; `meshca serve` cuts it off \
                     and records a gap at its next start"
                );
            }
            Ok(())
        }
        Err(crate::audit::VerifyError::Io(e)) => {
            Err(Failure::usage(format!("cannot read {}: {e}", file.display())))
        }
        Err(e) => Err(Failure::other(format!("{}: {e}", file.display()))),
    }
}
