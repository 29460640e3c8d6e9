//! A test Kubernetes API server that answers TokenReviews the way kube-apiserver
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
//! Failure modes switch at run time: answer 500, hold answers until released, or
//! stop listening (connection refused). It counts the reviews it was asked for.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
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
const RSA_KID: &str = "cluster-rsa";

/// How the server answers reviews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Verify and answer, like a healthy API server.
    Answer,
    /// 500 with a Status body.
    Fail500,
    /// Hold every answer until [`ApiServer::release`] (or drop).
    Hold,
}

struct State {
    jwks: String,
    bearer: String,
    calls: AtomicUsize,
    mode: watch::Sender<Mode>,
    released: watch::Sender<bool>,
    down: watch::Sender<bool>,
}

/// A running test API server.
pub struct ApiServer {
    pub addr: SocketAddr,
    /// A kubeconfig pointing at this server, for `--kubeconfig`.
    pub kubeconfig: PathBuf,
    /// The cluster's ES256 token-signing key.
    pub signer: DevSigner,
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
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt-rs256.pk8.pem"))
                .unwrap();
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let rsa = RsaKeyPair::from_pkcs8(&STANDARD.decode(der).unwrap()).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
        let mut jwks: Value = serde_json::from_str(&signer.jwks_json()).unwrap();
        jwks["keys"].as_array_mut().unwrap().push(json!({"kty": "RSA", "kid": RSA_KID, "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e)}));

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
        let ca_data = STANDARD.encode(ca_pem);
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
        let state = Arc::new(State {
            jwks: jwks.to_string(),
            bearer,
            calls: AtomicUsize::new(0),
            mode: watch::channel(Mode::Answer).0,
            released: watch::channel(false).0,
            down: watch::channel(false).0,
        });
        let accept = tokio::spawn(accept(listener, acceptor, state.clone()));
        ApiServer { addr, kubeconfig, signer, rsa, state, accept: Some(accept), _dir: dir }
    }

    /// Reviews asked for so far (with the right bearer token).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Answers from now on like this; switching to `Hold` holds until the next release.
    pub fn set_mode(&self, mode: Mode) {
        if mode == Mode::Hold {
            self.state.released.send_replace(false);
        }
        self.state.mode.send_replace(mode);
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

    /// An ES256 token for `claims`, signed with the cluster's key.
    pub fn token(&self, claims: &TokenClaims) -> Vec<u8> {
        self.signer.sign(claims).unwrap().into_bytes()
    }

    /// The same claims as [`Self::token`], signed RS256 with the cluster's RSA key.
    pub fn rs256_token(&self, claims: &TokenClaims) -> Vec<u8> {
        let es256 = self.signer.sign(claims).unwrap();
        let payload = es256.split('.').nth(1).unwrap();
        let header =
            URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "typ": "JWT", "kid": RSA_KID}).to_string());
        let msg = format!("{header}.{payload}");
        let mut sig = vec![0; self.rsa.public().modulus_len()];
        let rng = ring::rand::SystemRandom::new();
        self.rsa.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig).unwrap();
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig)).into_bytes()
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

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != PATH {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {}", state.bearer));
    if !authorized {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    state.calls.fetch_add(1, Ordering::SeqCst);
    let mode = *state.mode.borrow();
    match mode {
        Mode::Fail500 => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcdserver: request timed out",
            )
        }
        Mode::Hold => {
            let _ = state.released.subscribe().wait_for(|r| *r).await;
        }
        Mode::Answer => {}
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
    let verifier = JwksAuthenticator::new(settings, Jwks::from_json(state.jwks.as_bytes()).unwrap());
    let claims = token.split('.').nth(1).and_then(|p| URL_SAFE_NO_PAD.decode(p).ok());
    let claims: Value = claims.and_then(|c| serde_json::from_slice(&c).ok()).unwrap_or_default();
    let aud: Vec<String> = match &claims["aud"] {
        Value::String(one) => vec![one.clone()],
        many => many.as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
    };
    let status = match verifier.verify(token.as_bytes(), SystemClock.now()) {
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
