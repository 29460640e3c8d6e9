//! TLS for the gRPC listener, with a serving certificate meshca issues itself.
//!
//! meshca signs its own serving certificate from its issuer, for its own identity
//! (service account `meshca` in the control-plane namespace, by default), with a
//! fresh P-256 key, and renews it at half its lifetime. The certificate is served
//! through a resolver holding an `Arc` that is swapped whole, so renewal needs no
//! restart and a handshake never sees half a certificate. Every serving certificate
//! is written to the audit log like any other issuance.
//!
//! Handshakes run in their own tasks with a timeout, so a client that connects and
//! says nothing never holds up the accept loop. The same deadline, counted from the
//! TCP accept, covers the HTTP/2 client preface that must follow the handshake
//! (`connections::Held`): hyper waits for it without a timeout of its own, so without
//! this a client that completes TLS and then goes quiet would hold its connection
//! forever.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::audit::{self, Outcome, Record};
use crate::ca::csr::{CheckedCsr, KeyType};
use crate::ca::issuer::Leaf;
use crate::ca::profile::Lifetimes;
use crate::ca::store::Snapshot;
use crate::identity::Identity;
use crate::server::connections::{self, Held, Limit};

/// How long a client may take, from the TCP accept, to complete the TLS handshake
/// and send the HTTP/2 client preface.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot issue the serving certificate: {0}")]
    Issue(#[from] crate::ca::Error),
    #[error("cannot use the serving key: {0}")]
    Key(String),
    #[error("the serving certificate's audit record could not be written: {0}")]
    Audit(#[from] audit::Error),
}

/// The serving certificate currently presented; observers may watch it change.
#[derive(Debug)]
pub struct Resolver {
    current: watch::Sender<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.borrow().clone())
    }
}

impl Resolver {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Resolver { current: watch::Sender::new(Arc::new(key)) })
    }

    /// Presents `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        self.current.send_replace(Arc::new(key));
    }

    /// Notified on every replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CertifiedKey>> {
        self.current.subscribe()
    }
}

/// Issues a serving certificate for `identity` with a new key, and audits it.
pub(crate) async fn issue_serving(
    snapshot: &Snapshot,
    identity: &Identity,
    lifetimes: &Lifetimes,
    now: SystemTime,
    audit_log: &audit::AuditLog,
) -> Result<(CertifiedKey, Leaf), Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| Error::Key(e.to_string()))?;
    let csr = CheckedCsr { key_type: KeyType::P256, spki_der: key.subject_public_key_info() };
    // meshca's own name: Linkerd's (proxies verify it by DNS name) and its SPIFFE ID.
    let names =
        crate::ca::profile::Names { dns_name: Some(&identity.dns_name), spiffe_id: &identity.spiffe_id };
    let leaf = snapshot.issuer.issue(&names, &csr, lifetimes, now)?;
    audit_log
        .append(Record {
            time: now,
            request_id: "serving-certificate".into(),
            peer: None,
            requested_identity: identity.dns_name.clone(),
            subject: None,
            auth_method: None,
            token_issuer: None,
            bootstrap_token_id: None,
            csr_key_type: Some(KeyType::P256.label()),
            outcome: Outcome::Issued,
            code: None,
            reason: None,
            issued: Some(audit::Issued {
                serial_hex: audit::hex(&leaf.serial),
                fingerprint_sha256: audit::sha256_hex(&leaf.der),
                not_before: leaf.not_before,
                not_after: leaf.not_after,
                issuer_fingerprint_sha256: snapshot.issuer.fingerprint().to_owned(),
            }),
        })
        .await?;
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&pkcs8).map_err(|e| Error::Key(e.to_string()))?;
    let mut chain = vec![leaf.der.clone()];
    chain.extend(snapshot.issuer.intermediates().iter().cloned());
    Ok((CertifiedKey::new(chain, signing_key), leaf))
}

/// Offers (never requires) client authentication and checks only that the client
/// holds the key of the certificate it presents (the handshake signature). Whether
/// that certificate means anything — chain, validity at the server's time, identity
/// — is decided per request by `auth::peer`, so a refusal is a gRPC status with an
/// audit record rather than a bare TLS alert.
#[derive(Debug)]
pub(crate) struct PossessionVerifier {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PossessionVerifier {
    pub(crate) fn new(provider: &rustls::crypto::CryptoProvider) -> Self {
        PossessionVerifier { algorithms: provider.signature_verification_algorithms }
    }
}

impl rustls::server::danger::ClientCertVerifier for PossessionVerifier {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        // Must at least parse as a certificate; the chain is judged per request.
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// rustls server settings: ring provider, TLS 1.2 and 1.3, ALPN h2 (gRPC), client
/// certificates offered for renewal by proof of possession, AES-128-GCM preferred
/// (see [`server_provider`]), no session resumption.
pub fn server_config(resolver: Arc<Resolver>) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(server_provider());
    let verifier = Arc::new(PossessionVerifier::new(&provider));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Key(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order, not the client's: rustls clients (Linkerd's proxy, tonic)
    // list AES-256-GCM-SHA384 first.
    config.ignore_client_order = true;
    // No session resumption. A resumed session would carry its first connection's
    // client certificate without the checks a handshake makes (renewal by proof of
    // possession trusts that certificate), and proxies reconnect hours apart, so a
    // cache would only cost: two TLS 1.3 tickets made, stored and written per new
    // connection (2% of the server's CPU in a herd), and memory for 256 sessions.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// ring's provider with the AES-128-GCM suites ahead of the others, as BoringSSL and
/// Go order them. Both are strong; what differs is the hash of the handshake: SHA-256,
/// which x86-64's SHA extensions compute in hardware, where AES-256-GCM's SHA-384
/// runs in software (ring's SHA-512 code was 3% of the server's CPU in a herd of
/// new connections). The other suites keep their order behind them.
pub(crate) fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Accepts TCP connections within `limit` and completes TLS handshakes
/// concurrently; yields the established streams with their slots. Stops when the
/// returned receiver is dropped. From the TCP accept, a client has
/// [`HANDSHAKE_TIMEOUT`] to finish the handshake and send the HTTP/2 preface; a
/// client that does not is disconnected (and its slot freed).
pub(crate) fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limit: Limit,
) -> mpsc::Receiver<std::io::Result<Held<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        while let Some((tcp, peer, slot)) = connections::accept(&listener, &limit, tx.closed()).await {
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Held::new(stream, slot, deadline))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %crate::logging::Escaped(&e.to_string()), "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
