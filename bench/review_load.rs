//! review_load: what token validation costs the Kubernetes API server and Certify
//! throughput, measured in one process against the test API server
//! (tests/support/apiserver.rs: TokenReview, discovery, JWKS and pods over TLS).
//!
//! Prepares a pool of `--tokens` projected-style tokens (service accounts `load-0`
//! … in namespace `bench`, each bound to a pod of its own) and `--tokens` ×
//! `--reuse` P-256 CSRs, the way proxies renew: the same token many times, a new
//! key each time. Then, for each mode, starts meshca in-process (`server::run_with`,
//! TLS, audit log fsynced to a temporary file, no Events) and drives every request
//! once over TLS at `--concurrency` streams on `--connections` HTTP/2 connections,
//! consecutive requests using different tokens. Modes:
//! - `dev-equivalent`: jwks with the cluster's keys from a file (what `serve --dev`
//!   does with its own key): the baseline;
//! - `tokenreview`: the default mode, with its default cache (5 m) and rate limit;
//! - `jwks`: jwks with keys from the API server's service-account issuer discovery;
//! - `jwks+confirm-pod`: the same with `--jwks-confirm-pod`.
//!
//! Prints certificates/s per mode, the TokenReviews and pod GETs the test API server
//! saw, per token and per certificate, and each mode's throughput relative to the
//! baseline. Run in release: `cargo run --release -p meshca-bench --bin review_load`.

use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use meshca::agent::client::{self, KeyType};
use meshca::auth::dev::TokenClaims;
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::issuer::TrustAnchors;
use meshca::ca::profile::Lifetimes;
use meshca::clock::{Clock, SystemClock};
use meshca::config::{
    Config, ConfirmPod, KeyRefresh, KeySource, PodSettings, ReloadSettings, TokenConfig, DEFAULT_AUDIENCE,
};
use meshca::identity::Naming;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use meshca_test_support::apiserver::ApiServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The cluster's token issuer, as the test API server signs and discovers it.
const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const SERVER_NAME: &str = "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local";
const NAMESPACE: &str = "bench";

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(name = "review_load", about = "TokenReviews per certificate and Certify throughput per token mode")]
struct Args {
    /// Distinct tokens (one service account and pod each).
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Certify calls per token, each with a new key.
    #[arg(long, default_value_t = 50)]
    reuse: usize,
    /// Concurrent in-flight Certify calls.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

/// One prepared call.
struct Item {
    identity: String,
    token: Arc<Vec<u8>>,
    csr: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    DevEquivalent,
    TokenReview,
    Jwks,
    JwksConfirmPod,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::DevEquivalent => "dev-equivalent",
            Mode::TokenReview => "tokenreview",
            Mode::Jwks => "jwks",
            Mode::JwksConfirmPod => "jwks+confirm-pod",
        }
    }

    fn token_config(self, api: &ApiServer, jwks_file: &Path) -> TokenConfig {
        let kubeconfig = Some(api.kubeconfig.clone());
        let jwks = |keys, confirm_pod| {
            TokenConfig::Jwks(meshca::config::JwksSettings {
                keys,
                issuer: Some(TOKEN_ISSUER.into()),
                audiences: vec![DEFAULT_AUDIENCE.into()],
                leeway: Duration::from_secs(60),
                refresh: KeyRefresh::default(),
                confirm_pod,
            })
        };
        match self {
            Mode::DevEquivalent => jwks(KeySource::File(jwks_file.to_owned()), None),
            Mode::TokenReview => TokenConfig::TokenReview(meshca::config::TokenReviewSettings {
                kubeconfig,
                audiences: vec![DEFAULT_AUDIENCE.into()],
                timeout: Duration::from_secs(2),
                qps: 100,
                burst: 200,
                cache_ttl: Duration::from_secs(300),
                cache_failure_ttl: Duration::from_secs(10),
            }),
            Mode::Jwks => jwks(KeySource::Discovery { kubeconfig }, None),
            Mode::JwksConfirmPod => jwks(
                KeySource::Discovery { kubeconfig: kubeconfig.clone() },
                Some(ConfirmPod { kubeconfig, settings: PodSettings::default() }),
            ),
        }
    }
}

/// What one mode measured.
struct Outcome {
    mode: Mode,
    certs: usize,
    errors: usize,
    seconds: f64,
    reviews: usize,
    pod_gets: usize,
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `tokens × reuse` items on all cores: item `k` uses token `k % tokens`.
fn prepare(api: &ApiServer, naming: &Naming, tokens: usize, reuse: usize) -> Result<Vec<Item>> {
    let now = SystemClock.now();
    let mut signed = Vec::with_capacity(tokens);
    for i in 0..tokens {
        let (pod, uid) = (format!("load-{i}-pod"), format!("uid-{i}"));
        let claims = TokenClaims::projected(
            TOKEN_ISSUER,
            DEFAULT_AUDIENCE,
            NAMESPACE,
            format!("load-{i}"),
            now,
            Duration::from_secs(3600),
        )
        .with_pod(&pod, &uid);
        api.add_pod(NAMESPACE, &pod, &uid, "node-a");
        signed.push(Arc::new(api.token(&claims)));
    }
    let identities = (0..tokens)
        .map(|i| naming.identity(NAMESPACE, &format!("load-{i}")).map(|id| id.dns_name))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let total = tokens * reuse;
    let chunk = total.div_ceil(cores()).max(1);
    let indices: Vec<usize> = (0..total).collect();
    let parts = std::thread::scope(|s| {
        let workers: Vec<_> = indices
            .chunks(chunk)
            .map(|ks| {
                let (identities, signed) = (&identities, &signed);
                s.spawn(move || -> Result<Vec<Item>> {
                    ks.iter()
                        .map(|k| {
                            let identity = identities[k % tokens].clone();
                            let (_key, csr) = client::make_csr(&identity, KeyType::P256)?;
                            Ok(Item { identity, token: signed[k % tokens].clone(), csr })
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().map_err(|_| "CSR worker panicked")?).collect::<Vec<_>>()
    });
    let mut items = Vec::with_capacity(total);
    for part in parts {
        items.extend(part?);
    }
    Ok(items)
}

/// Starts meshca with `token` on loopback; returns its address and its stop switch.
async fn start(
    dir: &Path,
    naming: &Naming,
    token: TokenConfig,
    audit: &Path,
) -> Result<(String, oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let config = Config {
        dev: None,
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        naming: naming.clone(),
        service_account: "meshca".into(),
        trust_anchors: dir.join("trust-anchors.pem"),
        issuer_dir: dir.join("issuer"),
        issuer_key: None,
        lifetimes: Lifetimes::default(),
        token,
        audit_log: audit.display().to_string(),
        // Checkpoints on the default schedule, as a production file log has them.
        audit_checkpoints: Some(meshca_test_support::audit_checkpoints(dir, naming)),
        admission: meshca::config::AdmissionSettings::new(8192),
        connections: Default::default(),
        memory_limit: None,
        plaintext: false,
        reload: ReloadSettings { notifications: false, ..ReloadSettings::default() },
        ready_api_unreachable_threshold: std::time::Duration::from_secs(60),
        events: false,
        node_os: false,
        bootstrap: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("https://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let (lent, handles) = oneshot::channel();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(async move {
        if let Err(e) = meshca::server::run_with(config, clock, listener, admin, shutdown, Some(lent)).await {
            eprintln!("meshca stopped: {e}");
        }
    });
    handles.await.map_err(|_| "meshca did not start")?;
    Ok((addr, stop, task))
}

/// Sends every item once, `concurrency` at a time; (certificates, errors, seconds).
async fn drive(
    args: &Args,
    addr: &str,
    anchors: &TrustAnchors,
    items: Arc<Vec<Item>>,
) -> Result<(usize, usize, f64)> {
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        channels.push(client::connect(addr, anchors, SERVER_NAME).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..args.concurrency.max(1) {
        let mut client = IdentityClient::new(channels[t % channels.len()].clone());
        let (items, stride) = (items.clone(), args.concurrency.max(1));
        tasks.spawn(async move {
            let (mut certs, mut errors) = (0, 0);
            for item in items.iter().skip(t).step_by(stride) {
                let request = CertifyRequest {
                    identity: item.identity.clone(),
                    token: item.token.to_vec(),
                    certificate_signing_request: item.csr.clone(),
                };
                match client.certify(request).await {
                    Ok(response) if !response.get_ref().leaf_certificate.is_empty() => certs += 1,
                    _ => errors += 1,
                }
            }
            (certs, errors)
        });
    }
    let (mut certs, mut errors) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (c, e) = done?;
        certs += c;
        errors += e;
    }
    Ok((certs, errors, started.elapsed().as_secs_f64()))
}

async fn run(args: Args) -> Result<()> {
    if args.tokens == 0 || args.reuse == 0 {
        return Err("--tokens and --reuse must be positive".into());
    }
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir()?;
    let naming = Naming::new("cluster.local", "meshca-system")?;
    let h = hierarchy::generate(&naming, CaKeyType::P256, SystemClock.now(), HierarchyLifetimes::default())?;
    meshca::dev::write_hierarchy(dir.path(), &h)?;
    let anchors = TrustAnchors::load(&dir.path().join("trust-anchors.pem"))?;
    let jwks_file = dir.path().join("cluster-jwks.json");
    std::fs::write(&jwks_file, api.signer.jwks_json())?;

    let prep = Instant::now();
    let items = Arc::new(prepare(&api, &naming, args.tokens, args.reuse)?);
    println!(
        "review_load: {} tokens × {} reuses = {} Certify calls per mode, {} streams on {} connections \
         (prepared in {:.1}s, {} cores shared by client, meshca and the test API server)",
        args.tokens,
        args.reuse,
        items.len(),
        args.concurrency,
        args.connections,
        prep.elapsed().as_secs_f64(),
        cores()
    );

    let mut outcomes = Vec::new();
    let modes =
        [Mode::DevEquivalent, Mode::TokenReview, Mode::Jwks, Mode::JwksConfirmPod, Mode::DevEquivalent];
    for (round, mode) in modes.into_iter().enumerate() {
        let audit = dir.path().join(format!("audit-{round}.jsonl"));
        let (reviews, pod_gets) = (api.calls(), api.pod_gets());
        let (addr, stop, task) =
            start(dir.path(), &naming, mode.token_config(&api, &jwks_file), &audit).await?;
        let (certs, errors, seconds) = drive(&args, &addr, &anchors, items.clone()).await?;
        let _ = stop.send(());
        task.await?;
        let (reviews, pod_gets) = (api.calls() - reviews, api.pod_gets() - pod_gets);
        outcomes.push(Outcome { mode, certs, errors, seconds, reviews, pod_gets });
    }

    // The baseline: the better of the two dev-equivalent runs (first and last), so
    // that warming up does not flatter the modes measured in between.
    let baseline = outcomes
        .iter()
        .filter(|o| o.mode == Mode::DevEquivalent)
        .map(|o| o.certs as f64 / o.seconds)
        .fold(0.0, f64::max);
    println!();
    println!("| mode | certificates/s | vs dev-equivalent | errors | TokenReviews | per token | per certificate | pod GETs | per token |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        let rate = o.certs as f64 / o.seconds;
        let per_cert = |n: usize| if o.certs == 0 { 0.0 } else { n as f64 / o.certs as f64 };
        println!(
            "| {} | {rate:.0} | {:.1}% | {} | {} | {:.2} | {:.4} | {} | {:.2} |",
            o.mode.name(),
            100.0 * rate / baseline.max(f64::MIN_POSITIVE),
            o.errors,
            o.reviews,
            o.reviews as f64 / args.tokens as f64,
            per_cert(o.reviews),
            o.pod_gets,
            o.pod_gets as f64 / args.tokens as f64,
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("review_load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("review_load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
