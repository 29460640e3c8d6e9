//! The transport stage and the long-lived tasks beside it.
//!
//! [`run`] takes listeners that are already bound (so `main` binds the configured
//! addresses and tests bind `127.0.0.1:0` and connect at once) and a shutdown
//! future. It loads and checks the issuer, opens the audit log, issues the serving
//! certificate, then serves gRPC (TLS unless `--plaintext`) and the admin listener
//! until shutdown: stop accepting, finish in-flight requests, flush the audit log.
//! Beside them run the reloader (`ca::reload`: issuer and trust-anchor files →
//! new snapshots) and the serving-certificate renewer, which re-issues at half
//! the lifetime and at once whenever a new snapshot is swapped in.
//!
//! - [`grpc`]: Linkerd's Certify, an adapter over the issuance core (`crate::issuance`).
//! - [`istio`]: Istio's CreateCertificate, the same core's other adapter.
//! - [`bundle`]: the TrustBundle service (the current trust anchors).
//! - [`connections`]: the connection limit and age of the gRPC listener.
//! - [`tls`]: serving certificate, its renewal, the TLS acceptor.
//! - [`admin`]: `/live`, `/ready`, `/metrics`.
//!
//! What the issuance core needs beside it lives outside the transport:
//! [`crate::admission`] (in-flight bound, rate limits, signing workers),
//! [`crate::cluster`] (Events, node OS) and [`crate::metrics`].

pub(crate) mod admin;
pub mod admin_listener;
pub(crate) mod budget;
pub(crate) mod bundle;
pub(crate) mod connections;
pub mod grpc;
pub(crate) mod istio;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::admission;
use crate::audit::{AuditLog, Sink};
use crate::ca::csr::KeyPolicy;
use crate::ca::reload::Reloader;
use crate::ca::store::{self, Store};
use crate::clock::Clock;
use crate::cluster::{events, nodes};
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::proto::identity_server::IdentityServer;
use crate::v1::trust_bundle_server::TrustBundleServer;

/// Hard cap on a decoded gRPC message: the largest valid request (64 KiB) and a
/// little more, so that slightly larger ones are decoded to be refused and audited;
/// beyond it tonic refuses the message (`OUT_OF_RANGE`) as its length prefix comes
/// in, before buffering it. Also the HTTP/2 receive window of one stream.
pub const MAX_DECODED_MESSAGE: usize = crate::issuance::MAX_REQUEST_LEN + 4 * 1024;

/// HTTP/2 streams one connection may have open at once; more are refused
/// (`REFUSED_STREAM`), and each refusal counts as a local reset (below). A proxy
/// has one request at a time; 100 is what HTTP/2 clients assume before they have
/// the server's settings (RFC 9113 §6.5.2's advice), so a burst at connection start
/// is never refused.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Bytes of unfinished request messages one connection may hold at once
/// (`budget`): four of the largest, and the decoder's first buffer (1 KiB) for each
/// of its streams. Also the connection's HTTP/2 receive window.
pub const UNFINISHED_PER_CONNECTION: usize =
    4 * MAX_DECODED_MESSAGE + MAX_CONCURRENT_STREAMS as usize * crate::wire::DECODER_BUFFER;

/// Longest time from a request's headers to the end of its message, whatever
/// `--request-timeout` says: proxies send theirs in one write.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams the client opened and reset before meshca accepted them, per connection,
/// beyond which it gets `GOAWAY ENHANCE_YOUR_CALM` (the HTTP/2 rapid-reset attack,
/// CVE-2023-44487). h2's default, set here so it stays.
pub(crate) const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams meshca reset because of the client's errors (refused streams included),
/// per connection, beyond which it gets `GOAWAY ENHANCE_YOUR_CALM` (RUSTSEC-2024-0003,
/// "MadeYouReset"). h2's default, which tonic otherwise replaces with no limit at all.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("issuer: {0}")]
    Issuer(#[from] crate::ca::Error),
    #[error("token validation: {0}")]
    Auth(#[from] crate::auth::Error),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::Error),
    #[error("{0}")]
    Tls(#[from] tls::Error),
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
    #[error("{0}")]
    Events(#[from] events::Error),
    #[error("{0}")]
    Nodes(#[from] nodes::Error),
    #[error("cannot start the signing workers: {0}")]
    Workers(std::io::Error),
    /// The token `--issuer-key` names could not be opened (the URI, without its PIN).
    #[error("--issuer-key {uri}: {source}")]
    IssuerKey { uri: String, source: crate::ca::token::Error },
}

/// One start-up line naming where `listener` listens.
fn log_listening(listener: &TcpListener, what: &str) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "{what}"),
        Err(e) => tracing::info!(error = %e, "{what}"),
    }
}

/// What a running server lends to whoever started it with [`run_with`] (tests,
/// embedders): ways to look inside and to check the files now.
#[derive(Clone, Debug)]
pub struct Handles {
    /// Re-checks the issuer and trust anchors on demand ([`Reloader::check`]).
    pub reloader: Arc<Reloader>,
    pub metrics: Arc<Metrics>,
    /// The audit log ([`AuditLog::is_failing`]; fault injection in tests).
    pub audit: AuditLog,
    /// The serving certificate as it changes; `None` with `--plaintext`.
    pub serving: Option<watch::Receiver<Arc<rustls::sign::CertifiedKey>>>,
}

/// Runs meshca until `shutdown` completes.
pub async fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with(config, clock, listener, admin_listener, shutdown, None).await
}

/// The audit key and schedule, loaded (none: records are chained but no checkpoint
/// is signed), and the ConfigMap publisher when there is one.
fn audit_checkpoints(
    config: &Config,
) -> Result<(Option<crate::audit::Checkpoints>, Option<crate::cluster::checkpoints::Publisher>), Error> {
    use crate::audit::checkpoint::{key_name, SigningKey};
    let Some(settings) = &config.audit_checkpoints else {
        tracing::warn!(
            "audit records are chained but no checkpoint is signed (no --audit-signing-key): anyone who can \
             rewrite the log can recompute its chain"
        );
        return Ok((None, None));
    };
    let trust_domain = config.naming.trust_domain().to_owned();
    let key = SigningKey::read(&key_name(&trust_domain), &settings.signing_key)
        .map_err(|e| crate::audit::Error::SigningKey(e.to_string()))?;
    tracing::info!(verifier_key = %key.verifier(), "audit checkpoints are signed by this key");
    // Connected once the token validation's own client is (its errors come first).
    let publisher = config
        .token
        .kubernetes()
        .filter(|_| settings.configmap)
        .map(|_| crate::cluster::checkpoints::Publisher::default());
    let checkpoints = crate::audit::Checkpoints {
        key: Arc::new(key),
        trust_domain,
        every: settings.every,
        interval: settings.interval,
        new_log: settings.new_log,
        also: publisher.as_ref().map(|p| p.hook()),
    };
    Ok((Some(checkpoints), publisher))
}

/// Like [`run`]; `handles` receives the [`Handles`] just before serving starts
/// (dropped unsent when start-up fails).
pub async fn run_with(
    config: Config,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handles: Option<oneshot::Sender<Handles>>,
) -> Result<(), Error> {
    // First: its lock says whether another meshca writes here, before anything else
    // in a shared data directory (the bootstrap replay file) is touched.
    let (checkpoints, configmaps) = audit_checkpoints(&config)?;
    let audit = AuditLog::open_with(Sink::parse(&config.audit_log), checkpoints).await?;
    let token = match &config.issuer_key {
        Some(uri) => {
            let opened = crate::ca::token::TokenKey::open(uri)
                .map_err(|source| Error::IssuerKey { uri: uri.display(), source })?;
            tracing::info!(issuer_key = %uri.display(), kind = ?opened.kind(), "the issuer key is in a PKCS#11 token");
            Some(Arc::new(opened))
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new(clock.clone()));
    if let Some(configmaps) = &configmaps {
        metrics.register(|r| configmaps.register_metrics(r));
    }
    let store = Arc::new(Store::default());
    let reloader = Arc::new(
        Reloader::new(
            config.trust_anchors.clone(),
            config.issuer_dir.clone(),
            store.clone(),
            clock.clone(),
            metrics.clone(),
        )
        .with_algorithms(config.reload.issuer_algorithms)
        .with_token(token)
        .allow_world_readable_key(config.reload.allow_world_readable_issuer_key),
    );
    metrics.set_snapshot(reloader.load()?.as_ref());
    let authenticator = config.token.connect().await?;
    if let (Some(configmaps), Some(kubeconfig)) = (&configmaps, config.token.kubernetes()) {
        let namespace = config.naming.control_plane_namespace();
        configmaps.connect(kubeconfig, namespace).await?;
        tracing::info!(namespace, "audit checkpoints are also kept in ConfigMaps meshca-audit-<log id>");
    }
    let bootstrap = Arc::new(
        crate::auth::bootstrap::open(config.bootstrap.as_ref(), &store, &config.naming, &clock).await?,
    );
    metrics.register(|r| authenticator.register_metrics(r));
    let events = match config.token.kubernetes().filter(|_| config.events) {
        Some(kubeconfig) => {
            let emitter = events::Emitter::connect(kubeconfig).await?;
            metrics.register(|r| emitter.register_metrics(r));
            Some(emitter)
        }
        None => None,
    };
    let nodes = match config.token.kubernetes().filter(|_| config.node_os) {
        Some(kubeconfig) => {
            let nodes = Arc::new(nodes::NodeOs::connect(kubeconfig).await?);
            metrics.register(|r| nodes.register_metrics(r));
            Some(nodes)
        }
        None => None,
    };
    metrics.register(|r| metrics::register_audit(r, &audit));
    tracing::info!(
        max_in_flight = config.admission.max_in_flight,
        signing_workers = config.admission.workers,
        max_connections = config.connections.max,
        descriptor_limit = crate::admission::descriptors::limit(),
        memory_limit_mib = config.memory_limit.map(|bytes| bytes >> 20),
        "admission bounds"
    );
    let admission = Arc::new(admission::Admission::new(config.admission).map_err(Error::Workers)?);
    metrics.register(|r| admission::register_metrics(r, &admission));
    let connection_limit = connections::Limit::new(config.connections.max);
    metrics.register(|r| connections::register_metrics(r, &connection_limit));
    let readiness = Arc::new(admin::Readiness::new(
        store.clone(),
        clock.clone(),
        audit.clone(),
        authenticator.clone(),
        config.ready_api_unreachable_threshold,
    ));
    metrics.register(|r| readiness.register_metrics(r));

    // One shutdown signal, fanned out to gRPC, admin and the renewer.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Aborted when `run_with` returns, early errors included.
    let mut beside = tokio::task::JoinSet::new();
    beside.spawn(reloader.clone().run(config.reload, stopped(stop_rx.clone())));

    log_listening(&admin_listener, "serving /live, /ready and /metrics over HTTP");
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        metrics.clone(),
        readiness.clone(),
        stopped(stop_rx.clone()),
    ));

    let certifier = Arc::new(crate::issuance::Issuance {
        naming: config.naming.clone(),
        store: store.clone(),
        authenticator,
        bootstrap,
        audit: audit.clone(),
        clock: clock.clone(),
        lifetimes: config.lifetimes,
        key_policy: KeyPolicy::default(),
        metrics: metrics.clone(),
        admission: admission.clone(),
        events,
        nodes,
        quota: Arc::new(crate::audit::quota::Quota::new(clock.now())),
    });
    // The counts of unauthenticated refusals over the quota, every FLUSH.
    let flushing = certifier.clone();
    beside.spawn(async move {
        let mut every = tokio::time::interval(crate::audit::quota::FLUSH);
        loop {
            every.tick().await;
            flushing.flush_suppressed().await;
        }
    });
    let service = IdentityServer::new(certifier.clone())
        .max_decoding_message_size(MAX_DECODED_MESSAGE)
        .max_encoding_message_size(MAX_DECODED_MESSAGE);
    let budget = budget::Budget::new(budget::Settings {
        total: config.connections.unfinished_budget,
        per_connection: UNFINISHED_PER_CONNECTION,
        body_timeout: BODY_TIMEOUT,
    });
    metrics.register(|r| budget.register_metrics(r));
    metrics.register(|r| {
        r.register(
            "meshca_log_write_failures",
            "Log lines dropped because stderr refused them (a full disk, a closed pipe)",
            metrics::ScrapeCounter::new(crate::logging::write_failures),
        )
    });
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(MAX_DECODED_MESSAGE as u32))
        .initial_connection_window_size(Some(UNFINISHED_PER_CONNECTION as u32))
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    builder = builder.timeout(config.connections.request_timeout);
    if let Some(age) = config.connections.max_age {
        builder = builder.max_connection_age(age);
    }
    let istio =
        crate::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(certifier.clone())
            .max_decoding_message_size(MAX_DECODED_MESSAGE)
            .max_encoding_message_size(MAX_DECODED_MESSAGE);
    let router = builder
        .layer(budget::BudgetLayer(budget))
        .add_service(service)
        .add_service(istio)
        .add_service(TrustBundleServer::new(bundle::Bundles { store: store.clone() }));
    let lend = |serving| {
        if let Some(tx) = handles {
            let _ = tx.send(Handles { reloader, metrics: metrics.clone(), audit: audit.clone(), serving });
        }
    };

    let result = if config.plaintext {
        lend(None);
        readiness.set_serving(true);
        log_listening(&listener, "serving gRPC (plaintext)");
        let incoming =
            ReceiverStream::new(connections::plaintext(listener, connection_limit, tls::HANDSHAKE_TIMEOUT));
        router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())).await
    } else {
        let identity = config.naming.own_identity(&config.service_account)?;
        // Subscribed before the first issue, so a swap from now on is never missed.
        let mut snapshots = store.subscribe();
        let snapshot = snapshots
            .borrow_and_update()
            .clone()
            .ok_or(crate::ca::Error::Sign { reason: "no issuer".into() })?;
        let (key, leaf) =
            tls::issue_serving(&snapshot, &identity, &config.lifetimes, clock.now(), &audit).await?;
        metrics.set_serving_not_after(leaf.not_after);
        let resolver = tls::Resolver::new(key);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(resolver.clone())?));
        lend(Some(resolver.subscribe()));
        tokio::spawn(renew_serving(
            snapshots,
            identity,
            config.lifetimes,
            clock.clone(),
            audit.clone(),
            resolver,
            metrics.clone(),
            leaf,
            stop_rx.clone(),
        ));
        readiness.set_serving(true);
        log_listening(&listener, "serving gRPC over TLS");
        let incoming = ReceiverStream::new(tls::incoming(listener, acceptor, connection_limit));
        router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())).await
    };
    readiness.set_serving(false);
    // In-flight requests have finished: the last counts, then every record on disk.
    certifier.flush_suppressed().await;
    let closed = audit.close().await;
    match admin_task.await {
        Ok(Err(e)) => return Err(Error::Admin(e)),
        Err(e) => return Err(Error::Admin(std::io::Error::other(e))),
        Ok(Ok(())) => {}
    }
    result?;
    closed?;
    Ok(())
}

/// Renews the serving certificate at half its lifetime (measured on the monotonic
/// clock from issuance), and at once when a new snapshot is swapped in (the
/// certificate is signed by the issuer and chains to the anchors); retries every
/// 30 s on failure while the old one is valid.
///
/// Half of the validity *left* at issuance, not of notAfter − notBefore: the latter
/// includes the clock-skew backdate and, for lifetimes shorter than the allowance,
/// would renew after expiry. Never sooner than 1 s.
fn renewal_wait(leaf: &crate::ca::issuer::Leaf, issued_at: std::time::SystemTime) -> Duration {
    (leaf.not_after.duration_since(issued_at).unwrap_or_default() / 2).max(Duration::from_secs(1))
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
async fn renew_serving(
    mut snapshots: watch::Receiver<store::Current>,
    identity: crate::identity::Identity,
    lifetimes: crate::ca::profile::Lifetimes,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    resolver: Arc<tls::Resolver>,
    metrics: Arc<Metrics>,
    mut leaf: crate::ca::issuer::Leaf,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = renewal_wait(&leaf, clock.now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // Only an error when the store is gone, i.e. the server is stopping.
            Ok(()) = snapshots.changed() => tracing::info!("new issuer or trust anchors; re-issuing the serving certificate"),
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(snapshot) = snapshots.borrow_and_update().clone() else { continue };
        match tls::issue_serving(&snapshot, &identity, &lifetimes, clock.now(), &audit).await {
            Ok((key, new_leaf)) => {
                resolver.replace(key);
                metrics.set_serving_not_after(new_leaf.not_after);
                leaf = new_leaf;
                wait = renewal_wait(&leaf, clock.now());
                tracing::info!("serving certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "serving certificate renewal failed; retrying in 30s");
                wait = Duration::from_secs(30);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Sink;
    use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
    use crate::ca::profile::Lifetimes;
    use crate::ca::store::Snapshot;
    use crate::clock::{FakeClock, SystemClock};
    use crate::identity::Naming;

    #[test]
    fn serving_renewal_waits_half_the_validity_left_not_half_the_backdated_span() {
        let now = SystemClock.now();
        let leaf = crate::ca::issuer::Leaf {
            der: rustls_pki_types::CertificateDer::from(Vec::new()),
            serial: [1; 16],
            not_before: now - Duration::from_secs(120),
            not_after: now + Duration::from_secs(10),
        };
        assert_eq!(renewal_wait(&leaf, now), Duration::from_secs(5));
        assert_eq!(renewal_wait(&leaf, now + Duration::from_secs(60)), Duration::from_secs(1), "floor");
    }

    #[tokio::test]
    async fn serving_certificate_is_renewed_at_half_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let clock = FakeClock::at(SystemClock.now());
        let h = hierarchy::generate(&naming, CaKeyType::P256, clock.now(), HierarchyLifetimes::default())
            .unwrap();
        crate::dev::write_hierarchy(dir.path(), &h).unwrap();
        let snapshot =
            Snapshot::load(&dir.path().join("trust-anchors.pem"), &dir.path().join("issuer"), clock.now())
                .unwrap();
        let store = Arc::new(Store::new(snapshot));
        let audit_path = dir.path().join("audit.jsonl");
        let audit = AuditLog::open(Sink::File(audit_path.clone())).await.unwrap();
        let identity = naming.own_identity("meshca").unwrap();
        let lifetimes =
            Lifetimes { issuance_lifetime: Duration::from_secs(3600), clock_skew_allowance: Duration::ZERO };
        let snap = store.current().unwrap();
        let (key, leaf) =
            tls::issue_serving(&snap, &identity, &lifetimes, clock.now(), &audit).await.unwrap();
        let first = key.cert[0].clone();
        let resolver = tls::Resolver::new(key);
        let mut changes = resolver.subscribe();
        let (stop_tx, stop_rx) = watch::channel(false);
        let clock_dyn: Arc<dyn Clock> = Arc::new(clock.clone());
        let metrics = Arc::new(Metrics::new(clock_dyn.clone()));
        tokio::spawn(renew_serving(
            store.subscribe(),
            identity,
            lifetimes,
            clock_dyn,
            audit.clone(),
            resolver.clone(),
            metrics.clone(),
            leaf,
            stop_rx,
        ));
        // Let the renewer start its wait, then hold monotonic time until the test moves it.
        tokio::task::yield_now().await;
        tokio::time::pause();

        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(!changes.has_changed().unwrap(), "renewed before half the lifetime");

        clock.advance(Duration::from_secs(30 * 60));
        tokio::time::advance(Duration::from_secs(61)).await;
        // The renewal is due; let time run again so the audit writer (a thread of its
        // own) is not raced by virtual timers, and bound the wait in real time.
        tokio::time::resume();
        tokio::time::timeout(Duration::from_secs(30), changes.changed()).await.expect("no renewal").unwrap();
        let renewed = changes.borrow_and_update().cert[0].clone();
        assert_ne!(renewed, first);
        assert!(metrics.render().contains("meshca_serving_certificate_not_after_seconds"));
        let _ = stop_tx.send(true);
        audit.close().await.unwrap();
        let records = std::fs::read_to_string(&audit_path).unwrap();
        assert!(
            records.lines().filter(|l| l.contains("\"request_id\":\"serving-certificate\"")).count() >= 2
        );
        crate::audit::verify_file(&audit_path).unwrap();
    }
}
