//! Shared harness for the integration tests: a real meshca server on loopback
//! ports, with a generated CA, a token signer, and a fake clock.
//!
//! The listeners are bound before the server task starts, so a test may connect at
//! once; time moves only when a test moves the [`FakeClock`]. File notifications
//! are off by default: a test that changes the CA files decides when meshca looks
//! (`server.reloader().check()`).
//!
//! Admin listeners (this server's, a real binary's, an agent's) are read with
//! [`http_get`] and [`wait_ready`]; the real binary as a child process is in
//! [`process`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod audit;
pub mod der;
pub mod h2;
pub mod logs;
pub mod process;
pub mod softhsm;
pub mod verifiers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::issuer::TrustAnchors;
use meshca::ca::profile::Lifetimes;
use meshca::clock::{Clock, FakeClock, SystemClock};
use meshca::config::{Config, KeyRefresh, KeySource, ReloadSettings, TokenConfig};
use meshca::identity::Naming;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::{CertifyRequest, CertifyResponse};
use meshca::v1::trust_bundle_client::TrustBundleClient;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "identity.l5d.io";
pub const SERVER_NAME: &str = "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local";

/// How to start a test server.
#[derive(Clone, Debug)]
pub struct Options {
    pub lifetimes: Lifetimes,
    pub hierarchy: HierarchyLifetimes,
    pub key_type: CaKeyType,
    pub plaintext: bool,
    /// Audit log path; default: DIR/audit.jsonl.
    pub audit_log: Option<String>,
    pub max_in_flight: usize,
    /// Workers and rate limits; default: one worker per core, no rate limits.
    pub admission: Option<meshca::config::AdmissionSettings>,
    /// Connection limit and age; default: the server's defaults.
    pub connections: meshca::config::ConnectionSettings,
    /// Token validation; default: JWKS with the test signer's keys (DIR/jwks.json).
    pub token: Option<TokenConfig>,
    /// Kubernetes Events (only with a token mode that has a Kubernetes client).
    pub events: bool,
    /// Node OS in audit records (only with a token mode that has a Kubernetes client).
    pub node_os: bool,
    /// Issuer and trust-anchor re-checks; default: every 30 s, no notifications.
    pub reload: ReloadSettings,
    /// `--ready-api-unreachable-threshold`; default 60 s.
    pub ready_api_unreachable_threshold: Duration,
    /// `--bootstrap-tokens`; default off. A relative replay file is in the server's directory.
    pub bootstrap: Option<meshca::config::BootstrapConfig>,
    /// `--token-audiences` of the default (JWKS) token validation; default [`AUDIENCE`].
    pub audiences: Option<Vec<String>>,
    /// `--audit-checkpoint-every`; default 1000.
    pub audit_checkpoint_every: u64,
    /// `--audit-checkpoint-configmap` (only with a token mode that has a Kubernetes client).
    pub audit_configmap: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lifetimes: Lifetimes::default(),
            hierarchy: HierarchyLifetimes::default(),
            key_type: CaKeyType::P256,
            plaintext: false,
            audit_log: None,
            max_in_flight: 8192,
            admission: None,
            connections: Default::default(),
            token: None,
            events: false,
            node_os: false,
            reload: ReloadSettings { notifications: false, ..ReloadSettings::default() },
            ready_api_unreachable_threshold: Duration::from_secs(60),
            bootstrap: None,
            audiences: None,
            audit_checkpoint_every: meshca::audit::DEFAULT_EVERY,
            audit_configmap: false,
        }
    }
}

/// A running server and everything a test needs to talk to it.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub naming: Naming,
    pub clock: FakeClock,
    pub signer: DevSigner,
    pub anchors: TrustAnchors,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub audit_path: PathBuf,
    pub plaintext: bool,
    /// What the running server lends (reloader, metrics, serving certificate);
    /// `None` when it failed to start.
    pub handles: Option<meshca::server::Handles>,
    /// What the server was started with; a test may change it before [`Self::restart`].
    pub opts: Options,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), meshca::server::Error>>>,
}

/// Writes a CA hierarchy made at `now` into `dir` (trust-anchors.pem, issuer/).
pub fn write_ca(dir: &std::path::Path, naming: &Naming, opts: &Options, now: SystemTime) {
    let h = hierarchy::generate(naming, opts.key_type, now, opts.hierarchy).unwrap();
    meshca::dev::write_hierarchy(dir, &h).unwrap();
}

/// `dir/audit-signing.key` for the trust domain `cluster.local`, with `dir/audit.pub`
/// (made once, as `meshca init` makes them).
pub fn audit_key(dir: &std::path::Path) -> std::path::PathBuf {
    audit_key_for(dir, "cluster.local")
}

fn audit_key_for(dir: &std::path::Path, trust_domain: &str) -> std::path::PathBuf {
    if !dir.join("audit-signing.key").exists() {
        meshca::dev::write_audit_key(dir, trust_domain).expect("audit signing key");
    }
    dir.join("audit-signing.key")
}

/// A signing key for the audit log's checkpoints in `dir` (made once), on the
/// default schedule.
pub fn audit_checkpoints(dir: &std::path::Path, naming: &Naming) -> meshca::config::AuditCheckpoints {
    meshca::config::AuditCheckpoints {
        signing_key: audit_key_for(dir, naming.trust_domain()),
        every: meshca::audit::DEFAULT_EVERY,
        interval: meshca::audit::DEFAULT_INTERVAL,
        new_log: false,
        configmap: false,
    }
}

/// The configuration a test server runs with.
pub fn config(dir: &std::path::Path, naming: &Naming, opts: &Options) -> Config {
    Config {
        dev: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        naming: naming.clone(),
        service_account: "meshca".into(),
        trust_anchors: dir.join("trust-anchors.pem"),
        issuer_dir: dir.join("issuer"),
        issuer_key: None,
        lifetimes: opts.lifetimes,
        token: opts.token.clone().unwrap_or_else(|| {
            TokenConfig::Jwks(meshca::config::JwksSettings {
                keys: KeySource::File(dir.join("jwks.json")),
                issuer: Some(TOKEN_ISSUER.into()),
                audiences: opts.audiences.clone().unwrap_or_else(|| vec![AUDIENCE.into()]),
                leeway: Duration::from_secs(60),
                refresh: KeyRefresh::default(),
                confirm_pod: None,
            })
        }),
        audit_log: opts.audit_log.clone().unwrap_or_else(|| dir.join("audit.jsonl").display().to_string()),
        audit_checkpoints: Some(meshca::config::AuditCheckpoints {
            every: opts.audit_checkpoint_every,
            configmap: opts.audit_configmap,
            ..audit_checkpoints(dir, naming)
        }),
        admission: meshca::config::AdmissionSettings {
            max_in_flight: opts.max_in_flight,
            // Tests that hammer one identity must not meet the production per-identity
            // limit; tests/admission.rs sets limits explicitly.
            ..opts.admission.unwrap_or(meshca::config::AdmissionSettings {
                per_identity: None,
                ..meshca::config::AdmissionSettings::new(8192)
            })
        },
        connections: opts.connections,
        memory_limit: None,
        plaintext: opts.plaintext,
        events: opts.events,
        node_os: opts.node_os,
        reload: opts.reload,
        ready_api_unreachable_threshold: opts.ready_api_unreachable_threshold,
        bootstrap: opts.bootstrap.clone().map(|mut b| {
            if let meshca::config::ReplayConfig::File(path) = &mut b.replay {
                *path = dir.join(&*path);
            }
            b
        }),
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Self {
        Self::start_prepared(opts, |_| {}).await
    }

    /// Like `start_with`, but lets `prepare` change the generated CA files first.
    pub async fn start_prepared(opts: Options, prepare: impl FnOnce(&std::path::Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let clock = FakeClock::at(SystemClock.now());
        write_ca(dir.path(), &naming, &opts, clock.now());
        prepare(dir.path());
        let (signer, _) = DevSigner::generate().unwrap();
        std::fs::write(dir.path().join("jwks.json"), signer.jwks_json()).unwrap();
        let config = config(dir.path(), &naming, &opts);
        let audit_path = PathBuf::from(&config.audit_log);
        let anchors = TrustAnchors::load(&config.trust_anchors).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let mut server = TestServer {
            dir,
            naming,
            clock,
            signer,
            anchors,
            addr,
            admin,
            audit_path,
            plaintext: opts.plaintext,
            handles: None,
            opts,
            stop: None,
            task: None,
        };
        server.spawn(config, listener, admin_listener).await;
        server
    }

    /// Runs the server on the given listeners.
    async fn spawn(&mut self, config: Config, listener: TcpListener, admin_listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (lent, handles) = oneshot::channel();
        let task = tokio::spawn(meshca::server::run_with(
            config,
            Arc::new(self.clock.clone()),
            listener,
            admin_listener,
            async move {
                let _ = stopped.await;
            },
            Some(lent),
        ));
        self.handles = handles.await.ok();
        self.stop = Some(stop);
        self.task = Some(task);
    }

    /// Starts a stopped server again on the same ports, CA and audit log.
    pub async fn restart(&mut self) {
        assert!(self.task.is_none(), "stop the server first");
        let config = config(self.dir.path(), &self.naming, &self.opts);
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let admin_listener = TcpListener::bind(self.admin).await.unwrap();
        self.spawn(config, listener, admin_listener).await;
    }

    pub fn url(&self) -> String {
        let scheme = if self.plaintext { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// A gRPC client that verifies the server against the trust anchors.
    pub async fn client(&self) -> IdentityClient<Channel> {
        let channel = meshca::agent::client::connect(&self.url(), &self.anchors, SERVER_NAME).await.unwrap();
        IdentityClient::new(channel)
    }

    /// rustls client settings that trust the server's anchors and speak h2, with
    /// `provider`'s cipher suites in its order.
    pub fn tls_config(&self, provider: rustls::crypto::CryptoProvider) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for anchor in self.anchors.certificates() {
            roots.add(anchor.clone()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A new TCP connection with the TLS handshake done (no HTTP/2 yet).
    pub async fn tls(
        &self,
        config: &Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(SERVER_NAME.to_owned()).unwrap();
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.unwrap()
    }

    /// The server's reloader, to check the CA files now.
    pub fn reloader(&self) -> &meshca::ca::reload::Reloader {
        &self.handles.as_ref().expect("the server did not start").reloader
    }

    /// A TrustBundle client that verifies the server against the trust anchors.
    pub async fn bundle_client(&self) -> TrustBundleClient<Channel> {
        let channel = meshca::agent::client::connect(&self.url(), &self.anchors, SERVER_NAME).await.unwrap();
        TrustBundleClient::new(channel)
    }

    /// `/metrics` from the admin listener, over HTTP.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// A GET on the admin listener: status code and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one sample in `/metrics` ([`sample`]).
    pub async fn metric(&self, name: &str) -> u64 {
        sample(&self.metrics().await, name)
    }

    /// The identity of `sa` in `ns`.
    pub fn identity(&self, ns: &str, sa: &str) -> String {
        self.naming.identity(ns, sa).unwrap().dns_name
    }

    /// Claims for a valid token for `sa` in `ns`, at the server's clock.
    pub fn claims(&self, ns: &str, sa: &str) -> TokenClaims {
        TokenClaims::projected(TOKEN_ISSUER, AUDIENCE, ns, sa, self.clock.now(), Duration::from_secs(3600))
            .with_pod("web-5d8f7", "0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c")
    }

    /// A valid token for `sa` in `ns`.
    pub fn token(&self, ns: &str, sa: &str) -> Vec<u8> {
        self.signer.sign(&self.claims(ns, sa)).unwrap().into_bytes()
    }

    /// A complete, valid request for `sa` in `ns` with a P-256 key.
    pub fn request(&self, ns: &str, sa: &str) -> (KeyPair, CertifyRequest) {
        let identity = self.identity(ns, sa);
        let (key, csr) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
        (key, CertifyRequest { identity, token: self.token(ns, sa), certificate_signing_request: csr })
    }

    /// Every audit record written so far, parsed.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The audit record of the request with this id.
    pub fn audit_record(&self, request_id: &str) -> serde_json::Value {
        self.audit_records()
            .into_iter()
            .find(|r| r["request_id"] == request_id)
            .unwrap_or_else(|| panic!("no audit record for request {request_id}"))
    }

    /// Shuts the server down gracefully and returns how `run` ended.
    pub async fn stop(&mut self) -> Result<(), meshca::server::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("stopped twice").await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The value of the sample `name` (with its labels, if any) in a `/metrics` text.
pub fn sample(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
    line.and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// `GET path` on an admin listener (meshca's or the agent's), over raw HTTP/1.1:
/// status code (0 when the answer has none) and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Polls `/ready` on an admin listener, in real time, until it answers `code`;
/// returns the body. Panics after [`process::PATIENCE`].
pub async fn wait_ready(admin: SocketAddr, code: u16) -> String {
    let deadline = std::time::Instant::now() + process::PATIENCE;
    loop {
        let (got, body) = http_get(admin, "/ready").await;
        if got == code {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "/ready still answers {got} {body:?}, not {code}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A key and a DER CSR naming `identity` (CN and DNS SAN), signed with `alg`.
pub fn csr(identity: &str, alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(alg).unwrap();
    let der = csr_with_key(&key, identity);
    (key, der)
}

/// A DER CSR for `key` naming `identity`.
pub fn csr_with_key(key: &KeyPair, identity: &str) -> Vec<u8> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(identity.to_string().try_into().unwrap())];
    params.serialize_request(key).unwrap().der().to_vec()
}

/// An RSA key from the checked-in fixtures (ring generates no RSA keys).
pub fn rsa_key(bits: u32) -> KeyPair {
    let path = format!("{}/../fixtures/rsa{bits}.pk8.pem", env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read_to_string(path).unwrap();
    KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap()
}

/// The request id meshca attached to a response or status.
pub fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata.get("x-request-id").expect("x-request-id").to_str().unwrap().to_owned()
}

/// The leaf and intermediates of a response.
pub fn chain(
    resp: &CertifyResponse,
) -> (rustls_pki_types::CertificateDer<'static>, Vec<rustls_pki_types::CertificateDer<'static>>) {
    (
        resp.leaf_certificate.clone().into(),
        resp.intermediate_certificates.iter().map(|c| c.clone().into()).collect(),
    )
}

/// A new issuer signed by the anchor in DIR (trust-anchors.pem, trust-anchor.key),
/// valid for 30 days from `now`: (certificate PEM, key PEM).
pub fn issuer_under_anchor(dir: &std::path::Path, now: SystemTime) -> (String, String) {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let anchor_key = rcgen::KeyPair::from_pem(&read("trust-anchor.key")).unwrap();
    let anchor = rcgen::Issuer::from_ca_cert_pem(&read("trust-anchors.pem"), anchor_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, "identity.meshca-system.cluster.local");
    params.distinguished_name = name;
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(30 * 86_400)).into();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &anchor).unwrap();
    (cert.pem(), key.serialize_pem())
}
