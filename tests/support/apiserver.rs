//! A test Kubernetes API server that answers TokenReviews, serves the
//! service-account issuer discovery and accepts Events the way kube-apiserver
//! does, for meshca's real `kube` client to talk to over real TLS.
//!
//! It listens with HTTPS on 127.0.0.1 (a self-signed CA and a server certificate
//! for IP 127.0.0.1), writes a kubeconfig that trusts that CA and carries a bearer
//! token (requests without it get 401), and serves
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`: it verifies the reviewed
//! token itself as the cluster's token issuer (an ES256 key and the RS256 fixture
//! key, checked with meshca's `JwksAuthenticator` for the issuer and the requested
//! `spec.audiences`) and answers 201 with the TokenReview echoed (spec included,
//! as the real one does) and a status: authenticated, the audiences granted, the
//! service account user and the pod in `extra` — or `error` for a bad token.
//! Unlike a real cluster it does not check that the service account or pod exist.
//!
//! It also serves `GET /.well-known/openid-configuration` (its issuer, and a
//! `jwks_uri` on itself) and `GET /openid/v1/jwks` (the keys it signs tokens with);
//! [`ApiServer::rotate`] adds a new ES256 key with a new kid and signs with it from
//! then on. And it accepts core/v1 Events (`POST /api/v1/namespaces/NS/events`),
//! checking their namespace like the real one, and records them. It serves the
//! pods and nodes a test adds ([`ApiServer::add_pod`], [`ApiServer::add_node`]) or
//! deletes ([`ApiServer::remove_pod`]) with `GET /api/v1/namespaces/NS/pods/NAME`
//! and `GET /api/v1/nodes/NAME`.
//!
//! It keeps `coordination.k8s.io/v1` Leases like etcd behind the real one would:
//! `POST /apis/coordination.k8s.io/v1/namespaces/NS/leases` creates one when the
//! name is free (201 with the stored object) and answers 409 with a `Status` of
//! reason `AlreadyExists` when it is taken, atomically, so replicas racing for one
//! name get exactly one 201; `GET` lists them (with a `labelSelector` of `k=v` and
//! `k` terms) and `DELETE …/leases/NAME` removes one (404 when absent).
//!
//! It applies core/v1 ConfigMaps the way server-side apply does:
//! `PATCH /api/v1/namespaces/NS/configmaps/NAME?fieldManager=M` with content type
//! `application/apply-patch+yaml` creates the object or replaces its fields (201 or
//! 200 with the stored object); anything else on ConfigMaps is refused as the real
//! one refuses it (415 for another patch type, 422 for a name that differs, 400
//! without a field manager). [`ApiServer::configmap`] reads one back.
//!
//! Failure modes switch at run time, separately for reviews, the discovery
//! endpoints, Events, pod/node GETs and Leases: answer 500 or 403, answer garbage, hold answers until released; or stop
//! listening (connection refused). It counts what it was asked for.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::auth::jwt::{Algorithm, Jwks, JwksAuthenticator, Settings};
use meshca::auth::Error;
use meshca::clock::{Clock, SystemClock};
use ring::signature::{RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The cluster's token issuer (`iss`).
pub const ISSUER: &str = super::TOKEN_ISSUER;
/// Audiences a token gets when the review names none: the API server's own.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const DISCOVERY: &str = "/.well-known/openid-configuration";
const JWKS: &str = "/openid/v1/jwks";
const RSA_KID: &str = "cluster-rsa";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// How the server answers a family of requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Verify and answer, like a healthy API server.
    Answer,
    /// 500 with a Status body.
    Fail500,
    /// 403 with a Status body, as without the RBAC rule.
    Forbidden,
    /// Hold every answer until [`ApiServer::release`] (or drop).
    Hold,
    /// 200 with a body that is not JSON at all (a broken proxy in between).
    Garbage,
    /// 409 `Conflict` (not `AlreadyExists`), as for a write that lost a race.
    Conflict,
}

struct State {
    jwks: RwLock<String>,
    bearer: String,
    addr: SocketAddr,
    calls: AtomicUsize,
    discovery_calls: AtomicUsize,
    jwks_calls: watch::Sender<usize>,
    events: Mutex<Vec<Value>>,
    events_seen: watch::Sender<usize>,
    mode: watch::Sender<Mode>,
    oidc_mode: watch::Sender<Mode>,
    events_mode: watch::Sender<Mode>,
    anonymous_oidc: AtomicBool,
    /// (namespace, name) → (uid, node name).
    pods: Mutex<std::collections::HashMap<(String, String), (String, String)>>,
    /// Uids of deleted pods: TokenReviews of tokens bound to them fail, as
    /// kube-apiserver's do once the pod a token is bound to is gone.
    deleted: Mutex<std::collections::HashSet<String>>,
    /// node name → `kubernetes.io/os` label, if any.
    nodes: Mutex<std::collections::HashMap<String, Option<String>>>,
    pod_gets: AtomicUsize,
    node_gets: AtomicUsize,
    lookups_mode: watch::Sender<Mode>,
    /// (namespace, name) → the stored Lease.
    leases: Mutex<std::collections::BTreeMap<(String, String), Value>>,
    lease_calls: AtomicUsize,
    lease_creates: watch::Sender<usize>,
    configmaps: Mutex<std::collections::BTreeMap<(String, String), Value>>,
    configmap_applies: watch::Sender<usize>,
    leases_mode: watch::Sender<Mode>,
    /// What a Lease deletion answers after removing the Lease: `None` 200 with it.
    lease_delete_answer: Mutex<Option<StatusCode>>,
    released: watch::Sender<bool>,
    down: watch::Sender<bool>,
}

/// A running test API server.
pub struct ApiServer {
    pub addr: SocketAddr,
    /// A kubeconfig pointing at this server, for `--kubeconfig`.
    pub kubeconfig: PathBuf,
    /// The cluster's first ES256 token-signing key.
    pub signer: DevSigner,
    /// Keys added by [`Self::rotate`], the newest last: tokens are signed with it.
    rotated: Mutex<Vec<Arc<DevSigner>>>,
    rsa: RsaKeyPair,
    state: Arc<State>,
    accept: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let dir = tempfile::tempdir().unwrap();
        let (signer, _) = DevSigner::generate().unwrap();
        let pem =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/jwt-rs256.pk8.pem"))
                .unwrap();
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let rsa = RsaKeyPair::from_pkcs8(&STANDARD.decode(der).unwrap()).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
        let mut jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        // Like kube-apiserver's: RSA keys carry "alg" and "use".
        jwks["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"kty": "RSA", "kid": RSA_KID, "use": "sig", "alg": "RS256",
            "n": meshca::jose::encode(&public.n), "e": meshca::jose::encode(&public.e)}));

        // TLS: a CA of its own and a certificate for 127.0.0.1.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = leaf.signed_by(&key, &rcgen::Issuer::new(ca, &ca_key)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bearer = format!("meshca-reviewer-{}", addr.port());
        let kubeconfig = dir.path().join("kubeconfig");
        let ca_data = STANDARD.encode(&ca_pem);
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
                 clusters:\n- name: test\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca_data}\n\
                 users:\n- name: meshca\n  user:\n    token: {bearer}\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: meshca\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        let state = Arc::new(State {
            jwks: RwLock::new(jwks.to_string()),
            bearer,
            addr,
            calls: AtomicUsize::new(0),
            discovery_calls: AtomicUsize::new(0),
            jwks_calls: watch::channel(0).0,
            events: Mutex::new(Vec::new()),
            events_seen: watch::channel(0).0,
            mode: watch::channel(Mode::Answer).0,
            oidc_mode: watch::channel(Mode::Answer).0,
            events_mode: watch::channel(Mode::Answer).0,
            anonymous_oidc: AtomicBool::new(false),
            pods: Mutex::default(),
            deleted: Mutex::default(),
            nodes: Mutex::default(),
            pod_gets: AtomicUsize::new(0),
            node_gets: AtomicUsize::new(0),
            lookups_mode: watch::channel(Mode::Answer).0,
            leases: Mutex::default(),
            lease_calls: AtomicUsize::new(0),
            lease_creates: watch::channel(0).0,
            configmaps: Mutex::default(),
            configmap_applies: watch::channel(0).0,
            leases_mode: watch::channel(Mode::Answer).0,
            lease_delete_answer: Mutex::new(None),
            released: watch::channel(false).0,
            down: watch::channel(false).0,
        });
        let accept = tokio::spawn(accept(listener, acceptor, state.clone()));
        let rotated = Mutex::new(Vec::new());
        ApiServer { addr, kubeconfig, signer, rotated, rsa, state, accept: Some(accept), _dir: dir }
    }

    /// Reviews asked for so far (with the right bearer token).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Discovery documents served or refused so far (authorized requests).
    pub fn discovery_calls(&self) -> usize {
        self.state.discovery_calls.load(Ordering::SeqCst)
    }

    /// JWKS requests so far (authorized, whether answered or failed).
    pub fn jwks_calls(&self) -> usize {
        *self.state.jwks_calls.borrow()
    }

    /// Waits until `n` JWKS requests have arrived.
    pub async fn jwks_calls_reach(&self, n: usize) {
        let _ = self.state.jwks_calls.subscribe().wait_for(|calls| *calls >= n).await;
    }

    /// The issuer URL its discovery document names (and its tokens carry).
    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// meshca's tokenreview mode against this server: the test audience, 2 s
    /// timeout, 100 qps (burst 200), cache 5 min (refusals 10 s).
    pub fn tokenreview_config(&self) -> meshca::config::TokenConfig {
        meshca::config::TokenConfig::TokenReview(meshca::config::TokenReviewSettings {
            kubeconfig: Some(self.kubeconfig.clone()),
            audiences: vec![meshca::config::DEFAULT_AUDIENCE.into()],
            timeout: Duration::from_secs(2),
            qps: 100,
            burst: 200,
            cache_ttl: Duration::from_secs(300),
            cache_failure_ttl: Duration::from_secs(10),
        })
    }

    /// The PEM CA certificate its TLS certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self._dir.path().join("ca.pem")
    }

    /// Its own `https://127.0.0.1:PORT/openid/v1/jwks`.
    pub fn jwks_url(&self) -> String {
        format!("https://{}{JWKS}", self.addr)
    }

    /// Serves the discovery endpoints without a bearer token too (clusters that
    /// bind the discovery role to `system:unauthenticated`).
    pub fn allow_anonymous_discovery(&self) {
        self.state.anonymous_oidc.store(true, Ordering::SeqCst);
    }

    /// Adds a new ES256 key (new kid) to the JWKS and signs tokens with it from now on.
    pub fn rotate(&self) -> String {
        let (signer, _) = DevSigner::generate().unwrap();
        let kid = signer.kid().to_owned();
        let key: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        let mut jwks: Value = serde_json::from_str(&self.state.jwks.read().unwrap()).unwrap();
        jwks["keys"].as_array_mut().unwrap().push(key["keys"][0].clone());
        *self.state.jwks.write().unwrap() = jwks.to_string();
        self.rotated.lock().unwrap().push(Arc::new(signer));
        kid
    }

    /// Replaces the whole JWKS with one new ES256 key (the old keys are retired)
    /// and signs tokens with it from now on.
    pub fn replace_keys(&self) -> String {
        let (signer, _) = DevSigner::generate().unwrap();
        let kid = signer.kid().to_owned();
        *self.state.jwks.write().unwrap() = signer.jwks_json();
        self.rotated.lock().unwrap().push(Arc::new(signer));
        kid
    }

    /// A pod `namespace/name` with this uid, scheduled on `node`.
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, node: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.state.pods.lock().unwrap().insert(key, (uid.to_owned(), node.to_owned()));
    }

    /// Deletes pod `namespace/name`: GETs of it answer 404 from now on.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.state.pods.lock().unwrap().remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// The pod with `uid` is gone: TokenReviews of tokens bound to it fail from now on.
    pub fn delete_pod_tokens(&self, uid: &str) {
        self.state.deleted.lock().unwrap().insert(uid.to_owned());
    }

    /// A node, labelled `kubernetes.io/os: OS` when `os` is given.
    pub fn add_node(&self, name: &str, os: Option<&str>) {
        self.state.nodes.lock().unwrap().insert(name.to_owned(), os.map(str::to_owned));
    }

    /// Pod GETs so far (authorized, whether found or not).
    pub fn pod_gets(&self) -> usize {
        self.state.pod_gets.load(Ordering::SeqCst)
    }

    /// Node GETs so far (authorized, whether found or not).
    pub fn node_gets(&self) -> usize {
        self.state.node_gets.load(Ordering::SeqCst)
    }

    /// Answers pod and node GETs from now on like this.
    pub fn set_lookups_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.lookups_mode.send_replace(mode);
    }

    /// Events created so far, as posted.
    pub fn events(&self) -> Vec<Value> {
        self.state.events.lock().unwrap().clone()
    }

    /// Waits until `n` Events have been created.
    pub async fn events_reach(&self, n: usize) {
        let _ = self.state.events_seen.subscribe().wait_for(|seen| *seen >= n).await;
    }

    /// Answers reviews from now on like this; switching to `Hold` holds until the next release.
    pub fn set_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.mode.send_replace(mode);
    }

    /// Answers the discovery document and the JWKS from now on like this.
    pub fn set_discovery_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.oidc_mode.send_replace(mode);
    }

    /// Answers Event creations from now on like this.
    pub fn set_events_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.events_mode.send_replace(mode);
    }

    /// Answers Lease calls (create, list, delete) from now on like this.
    pub fn set_leases_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.leases_mode.send_replace(mode);
    }

    /// Lease deletions from now on remove the Lease and answer `code` instead of 200
    /// (404: another replica deleted it first; 500: the deletion failed), or 200 with
    /// `None`.
    pub fn set_lease_delete_answer(&self, code: Option<StatusCode>) {
        *self.state.lease_delete_answer.lock().unwrap() = code;
    }

    /// The Leases stored now, in name order.
    pub fn leases(&self) -> Vec<Value> {
        self.state.leases.lock().unwrap().values().cloned().collect()
    }

    /// Lease calls so far (authorized, whether answered or failed).
    pub fn lease_calls(&self) -> usize {
        self.state.lease_calls.load(Ordering::SeqCst)
    }

    /// Waits until `n` Lease creations have arrived (answered, failed or held).
    pub async fn lease_creates_reach(&self, n: usize) {
        let _ = self.state.lease_creates.subscribe().wait_for(|creates| *creates >= n).await;
    }

    /// The ConfigMap `namespace/name`, as stored.
    pub fn configmap(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.configmaps.lock().unwrap().get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Waits until `n` ConfigMap applies have been stored.
    pub async fn configmap_applies_reach(&self, n: usize) {
        let _ = self.state.configmap_applies.subscribe().wait_for(|applies| *applies >= n).await;
    }

    /// Lets held answers go.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Closes the listener and every open connection: connecting is refused from now on.
    pub async fn stop_listening(&mut self) {
        self.state.down.send_replace(true);
        if let Some(accept) = self.accept.take() {
            accept.await.unwrap();
        }
    }

    /// An ES256 token for `claims`, signed with the cluster's newest key.
    pub fn token(&self, claims: &TokenClaims) -> Vec<u8> {
        match self.rotated.lock().unwrap().last() {
            Some(signer) => signer.sign(claims).unwrap().into_bytes(),
            None => self.signer.sign(claims).unwrap().into_bytes(),
        }
    }

    /// An ES256 token for `claims` signed with the first key, whatever rotated since.
    pub fn token_with_first_key(&self, claims: &TokenClaims) -> Vec<u8> {
        self.signer.sign(claims).unwrap().into_bytes()
    }

    /// The same claims as [`Self::token`], signed RS256 with the cluster's RSA key.
    pub fn rs256_token(&self, claims: &TokenClaims) -> Vec<u8> {
        let token = claims.sign_with("RS256", RSA_KID, |msg| {
            let mut sig = vec![0; self.rsa.public().modulus_len()];
            let rng = ring::rand::SystemRandom::new();
            self.rsa.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig).unwrap();
            Ok::<_, Error>(sig)
        });
        token.unwrap().into_bytes()
    }

    /// The RSA public key (PKCS#1 DER), as an attacker who read the JWKS has it.
    pub fn rsa_public_key(&self) -> Vec<u8> {
        self.rsa.public().as_ref().to_vec()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.state.released.send_replace(true);
        self.state.down.send_replace(true);
    }
}

async fn accept(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, state: Arc<State>) {
    let mut down = state.down.subscribe();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = down.wait_for(|d| *d) => return,
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let mut down = state.down.subscribe();
            let serve = async {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            };
            tokio::select! {
                () = serve => {}
                _ = down.wait_for(|d| *d) => {}
            }
        });
    }
}

fn respond(code: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

/// A `v1.Status` failure, as the API server sends with every error code.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    respond(code, body)
}

fn not_found() -> Response<Full<Bytes>> {
    failure(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource")
}

/// Applies `mode`: `Some` failure to send, or `None` to answer (after a hold).
async fn mode_answer(state: &State, mode: Mode) -> Option<Response<Full<Bytes>>> {
    match mode {
        Mode::Fail500 => {
            Some(failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "etcdserver: request timed out"))
        }
        Mode::Forbidden => Some(failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "forbidden: User \"system:serviceaccount:meshca-system:meshca\" cannot do this",
        )),
        Mode::Hold => {
            let _ = state.released.subscribe().wait_for(|r| *r).await;
            None
        }
        Mode::Garbage => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{\"kind\":\"TokenRev<html>502")));
            response.headers_mut().insert("content-type", "application/json".parse().unwrap());
            Some(response)
        }
        Mode::Conflict => Some(failure(
            StatusCode::CONFLICT,
            "Conflict",
            "Operation cannot be fulfilled on leases.coordination.k8s.io: the object has been modified",
        )),
        Mode::Answer => None,
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {}", state.bearer));
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, DISCOVERY | JWKS) => {
            if !authorized && !state.anonymous_oidc.load(Ordering::SeqCst) {
                return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
            return oidc(state, &path).await;
        }
        (Method::POST, PATH) => {}
        (Method::GET, lookup)
            if lookup.starts_with("/api/v1/namespaces/") || lookup.starts_with("/api/v1/nodes/") =>
        {
            if !authorized {
                return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
            return get_object(state, lookup).await;
        }
        (Method::PATCH, configmap)
            if configmap.starts_with("/api/v1/namespaces/") && configmap.contains("/configmaps/") =>
        {
            if !authorized {
                return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
            return apply_configmap(state, req).await;
        }
        (method, leases) if leases.starts_with(LEASES) => {
            if !authorized {
                return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
            return lease_call(state, method, req).await;
        }
        (Method::POST, events)
            if events.starts_with("/api/v1/namespaces/") && events.ends_with("/events") =>
        {
            if !authorized {
                return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
            let namespace = events.trim_start_matches("/api/v1/namespaces/").trim_end_matches("/events");
            let namespace = namespace.to_owned();
            return create_event(state, &namespace, req).await;
        }
        _ => return not_found(),
    }
    if !authorized {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    state.calls.fetch_add(1, Ordering::SeqCst);
    let mode = *state.mode.borrow();
    if let Some(failed) = mode_answer(state, mode).await {
        return failed;
    }
    let Ok(body) = req.into_body().collect().await else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let review: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview" {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "not an authentication.k8s.io/v1 TokenReview");
    }
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let requested: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(list) if !list.is_empty() => list.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
        _ => vec![API_AUDIENCE.to_owned()],
    };
    let settings = Settings {
        issuer: ISSUER.into(),
        audiences: requested.clone(),
        leeway: Duration::from_secs(60),
        algorithms: vec![Algorithm::ES256, Algorithm::RS256],
    };
    let jwks = state.jwks.read().unwrap().clone();
    let verifier = JwksAuthenticator::new(settings, Jwks::from_json(jwks.as_bytes()).unwrap());
    let claims = token.split('.').nth(1).and_then(meshca::jose::decode);
    let claims: Value = claims.and_then(|c| serde_json::from_slice(&c).ok()).unwrap_or_default();
    let aud: Vec<String> = match &claims["aud"] {
        Value::String(one) => vec![one.clone()],
        many => many.as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
    };
    let status = match verifier.verify(token.as_bytes(), SystemClock.now()) {
        Ok(subject)
            if subject.pod_uid.as_ref().is_some_and(|uid| state.deleted.lock().unwrap().contains(uid)) =>
        {
            json!({"user": {}, "error": "[invalid bearer token, pod does not exist]"})
        }
        Ok(subject) => {
            let granted: Vec<&String> = requested.iter().filter(|r| aud.contains(r)).collect();
            let (ns, sa) = (&subject.namespace, &subject.service_account);
            let mut extra = serde_json::Map::new();
            if let (Some(name), Some(uid)) = (&subject.pod_name, &subject.pod_uid) {
                extra.insert("authentication.kubernetes.io/pod-name".into(), json!([name]));
                extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
            }
            json!({"authenticated": true, "audiences": granted,
                "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": format!("uid-of-{sa}"),
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": extra}})
        }
        Err(e) => {
            json!({"user": {}, "error": format!("[invalid bearer token, {}]", apiserver_words(&e, &aud, &requested))})
        }
    };
    let answer = json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status});
    respond(StatusCode::CREATED, answer)
}

/// The discovery document or the JWKS, as kube-apiserver serves them.
async fn oidc(state: &State, path: &str) -> Response<Full<Bytes>> {
    if path == JWKS {
        state.jwks_calls.send_modify(|n| *n += 1);
    } else {
        state.discovery_calls.fetch_add(1, Ordering::SeqCst);
    }
    let mode = *state.oidc_mode.borrow();
    if let Some(failed) = mode_answer(state, mode).await {
        return failed;
    }
    if path == JWKS {
        let jwks: Value = serde_json::from_str(&state.jwks.read().unwrap()).unwrap();
        return respond(StatusCode::OK, jwks);
    }
    respond(
        StatusCode::OK,
        json!({"issuer": ISSUER, "jwks_uri": format!("https://{}{JWKS}", state.addr),
            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256"]}),
    )
}

/// `GET` of a pod (`/api/v1/namespaces/NS/pods/NAME`) or node (`/api/v1/nodes/NAME`).
async fn get_object(state: &State, path: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let object = match parts[..] {
        ["api", "v1", "namespaces", ns, "pods", name] => {
            state.pod_gets.fetch_add(1, Ordering::SeqCst);
            let pod = state.pods.lock().unwrap().get(&(ns.to_owned(), name.to_owned())).cloned();
            pod.map(|(uid, node)| {
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns, "uid": uid},
                    "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
                    "status": {"phase": "Running"}})
            })
        }
        ["api", "v1", "nodes", name] => {
            state.node_gets.fetch_add(1, Ordering::SeqCst);
            let node = state.nodes.lock().unwrap().get(name).cloned();
            node.map(|os| {
                let mut labels = serde_json::Map::new();
                labels.insert("kubernetes.io/hostname".into(), json!(name));
                if let Some(os) = os {
                    labels.insert("kubernetes.io/os".into(), json!(os));
                }
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
            })
        }
        _ => return not_found(),
    };
    let mode = *state.lookups_mode.borrow();
    if let Some(failed) = mode_answer(state, mode).await {
        return failed;
    }
    match object {
        Some(object) => respond(StatusCode::OK, object),
        None => failure(StatusCode::NOT_FOUND, "NotFound", "not found"),
    }
}

/// `POST /api/v1/namespaces/NS/events`: checks the Event like kube-apiserver's
/// validation (kind, namespace agreement, a name, no duplicate), records it, and
/// answers 201 with it.
async fn create_event(state: &State, namespace: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mode = *state.events_mode.borrow();
    if let Some(failed) = mode_answer(state, mode).await {
        return failed;
    }
    let Ok(body) = req.into_body().collect().await else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let mut event: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    if event["apiVersion"] != "v1" || event["kind"] != "Event" {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "not a v1 Event");
    }
    let name = event["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let meta_ns = event["metadata"]["namespace"].as_str().unwrap_or(namespace);
    let involved_ns = event["involvedObject"]["namespace"].as_str().unwrap_or_default();
    if name.is_empty() || meta_ns != namespace || involved_ns != namespace {
        return failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Event is invalid: involvedObject.namespace: Invalid value: does not match event.namespace",
        );
    }
    let mut events = state.events.lock().unwrap();
    if events
        .iter()
        .any(|e| e["metadata"]["name"] == name.as_str() && e["metadata"]["namespace"] == namespace)
    {
        drop(events);
        return failure(StatusCode::CONFLICT, "AlreadyExists", "events already exists");
    }
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["uid"] = json!(format!("uid-{}", events.len()));
    event["metadata"]["resourceVersion"] = json!(events.len().to_string());
    events.push(event.clone());
    let seen = events.len();
    drop(events);
    state.events_seen.send_replace(seen);
    respond(StatusCode::CREATED, event)
}

/// `/apis/coordination.k8s.io/v1/namespaces/NS/leases[/NAME]`: create, list, delete.
async fn lease_call(state: &State, method: Method, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let parts: Vec<&str> = path.trim_start_matches(LEASES).split('/').collect();
    let (namespace, name) = match parts[..] {
        [ns, "leases"] => (ns.to_owned(), None),
        [ns, "leases", name] => (ns.to_owned(), Some(name.to_owned())),
        _ => return not_found(),
    };
    state.lease_calls.fetch_add(1, Ordering::SeqCst);
    if method == Method::POST {
        state.lease_creates.send_modify(|n| *n += 1);
    }
    let mode = *state.leases_mode.borrow();
    if let Some(failed) = mode_answer(state, mode).await {
        return failed;
    }
    match (method, name) {
        (Method::POST, None) => {
            let Ok(body) = req.into_body().collect().await else {
                return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            create_lease(state, &namespace, serde_json::from_slice(&body.to_bytes()).unwrap_or_default())
        }
        (Method::GET, None) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(percent_decode)
                .unwrap_or_default();
            let leases = state.leases.lock().unwrap();
            let items: Vec<Value> = leases
                .iter()
                .filter(|((ns, _), lease)| {
                    *ns == namespace && selects(&selector, &lease["metadata"]["labels"])
                })
                .map(|(_, lease)| {
                    // Items of a list carry no apiVersion and kind, as the real server sends them.
                    let mut item = lease.clone();
                    item.as_object_mut().unwrap().retain(|k, _| k != "apiVersion" && k != "kind");
                    item
                })
                .collect();
            let version = leases.len().to_string();
            respond(
                StatusCode::OK,
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                    "metadata": {"resourceVersion": version}, "items": items}),
            )
        }
        (Method::DELETE, Some(name)) => match state.leases.lock().unwrap().remove(&(namespace, name.clone()))
        {
            Some(lease) => match *state.lease_delete_answer.lock().unwrap() {
                None => respond(StatusCode::OK, lease),
                Some(code) => failure(code, code.canonical_reason().unwrap_or_default(), "as configured"),
            },
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("leases.coordination.k8s.io \"{name}\" not found"),
            ),
        },
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method",
        ),
    }
}

/// Server-side apply of a ConfigMap: creates it or replaces the applied fields.
async fn apply_configmap(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_start_matches("/api/v1/namespaces/").to_owned();
    let Some((namespace, name)) = path.split_once("/configmaps/") else { return not_found() };
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    let query = req.uri().query().unwrap_or_default().to_owned();
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if content_type != "application/apply-patch+yaml" {
        return failure(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", "unsupported patch type");
    }
    if !query.split('&').any(|kv| kv.starts_with("fieldManager=") && kv.len() > "fieldManager=".len()) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "PATCH requests with apply must have a fieldManager",
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    // YAML is a superset of JSON; kube sends the object as JSON.
    let mut object: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    if object["apiVersion"] != "v1"
        || object["kind"] != "ConfigMap"
        || object["metadata"]["name"] != name.as_str()
    {
        return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "ConfigMap is invalid: metadata.name");
    }
    let size: usize =
        object["data"].as_object().map_or(0, |d| d.iter().map(|(k, v)| k.len() + v.to_string().len()).sum());
    if size > 1024 * 1024 {
        return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "ConfigMap is invalid: data: Too long");
    }
    let mut configmaps = state.configmaps.lock().unwrap();
    let created = !configmaps.contains_key(&(namespace.clone(), name.clone()));
    let version = state.configmap_applies.borrow().to_owned() + 1;
    object["metadata"]["namespace"] = json!(namespace);
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    configmaps.insert((namespace, name), object.clone());
    drop(configmaps);
    state.configmap_applies.send_modify(|n| *n += 1);
    respond(if created { StatusCode::CREATED } else { StatusCode::OK }, object)
}

/// Creates a Lease unless its name is taken, checked and stored under one lock.
fn create_lease(state: &State, namespace: &str, mut lease: Value) -> Response<Full<Bytes>> {
    if lease["apiVersion"] != "coordination.k8s.io/v1" || lease["kind"] != "Lease" {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "not a coordination.k8s.io/v1 Lease");
    }
    let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let valid_name = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let labels_ok = lease["metadata"]["labels"]
        .as_object()
        .is_none_or(|labels| labels.values().all(|v| v.as_str().is_some_and(|v| v.len() <= 63)));
    let meta_ns = lease["metadata"]["namespace"].as_str().unwrap_or(namespace);
    if !valid_name || !labels_ok || meta_ns != namespace {
        return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "Lease.coordination.k8s.io is invalid");
    }
    let mut leases = state.leases.lock().unwrap();
    let key = (namespace.to_owned(), name.clone());
    if leases.contains_key(&key) {
        drop(leases);
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("leases.coordination.k8s.io \"{name}\" already exists"),
            "reason": "AlreadyExists",
            "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"}, "code": 409});
        return respond(StatusCode::CONFLICT, body);
    }
    let version = leases.len() + 1;
    lease["metadata"]["namespace"] = json!(namespace);
    lease["metadata"]["uid"] = json!(format!("lease-uid-{version}"));
    lease["metadata"]["resourceVersion"] = json!(version.to_string());
    lease["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    leases.insert(key, lease.clone());
    respond(StatusCode::CREATED, lease)
}

/// Whether `labels` satisfy a selector of comma-separated `k=v` and `k` terms.
fn selects(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
        Some((k, v)) => labels[k] == v,
        None => labels.get(term).is_some(),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What kube-apiserver says about a token it does not accept (its texts, which
/// quote the token's audiences).
fn apiserver_words(e: &Error, aud: &[String], requested: &[String]) -> String {
    match e {
        Error::Expired { .. } => "service account token has expired".into(),
        Error::NotYetValid { .. } | Error::IssuedInFuture { .. } => {
            "service account token is not valid yet".into()
        }
        Error::WrongAudience => {
            format!("token audiences {aud:?} is invalid for the target audiences {requested:?}")
        }
        Error::BadSignature | Error::UnknownKey => "square/go-jose: error in cryptographic primitive".into(),
        Error::UnsupportedAlgorithm => {
            "square/go-jose: unexpected signature algorithm; expected [ES256 RS256]".into()
        }
        Error::WrongIssuer => "token issuer is not recognised".into(),
        other => format!("square/go-jose: {}", other.code()),
    }
}
