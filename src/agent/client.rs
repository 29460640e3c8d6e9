//! One Certify round trip, as a proxy would make it, and the trust bundle.
//!
//! Generates a new key (never reused), builds a CSR naming the identity, calls
//! Certify over TLS (verifying meshca's serving certificate against the trust
//! anchors and the expected server name), and verifies that the returned chain
//! leads to the trust anchors and carries the identity before anything is written.
//! [`trust_bundle`] asks the same server (`meshca.v1.TrustBundle/Get`) for the
//! anchors it currently trusts; what to do with them is the caller's decision.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::ca::issuer::TrustAnchors;
use crate::ca::material::to_pem;
use crate::coalesce::Coalesce;
use crate::proto::identity_client::IdentityClient;
use crate::proto::CertifyRequest;
use crate::v1::trust_bundle_client::TrustBundleClient;
use crate::v1::GetTrustBundleRequest;

/// Why a certificate could not be obtained. The Display text is one line that
/// says what to fix, never a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address is not a usable http(s) URL.
    #[error("--addr {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    /// Could not connect or complete the TLS handshake; `reason` says what to fix.
    #[error("cannot connect to meshca at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// meshca refused the request; `retry_after` is its pushback hint
    /// (`grpc-retry-pushback-ms`, sent with ResourceExhausted).
    /// `reason` is the server's reason code (`x-meshca-reason`), when it sent one.
    #[error(
        "meshca refused the request ({code:?}{}): {message}",
        reason.as_deref().map(|r| format!(", {r}")).unwrap_or_default()
    )]
    Refused {
        code: tonic::Code,
        message: String,
        reason: Option<String>,
        retry_after: Option<std::time::Duration>,
    },
    /// The response is unusable: missing leaf, bad chain, wrong identity.
    #[error("the returned certificate is unusable: {0}")]
    BadResponse(String),
    /// Key or CSR generation failed.
    #[error("cannot create the key or CSR: {0}")]
    Key(String),
}

/// A refusal, with the server's pushback hint when it gave one.
fn refused(status: tonic::Status) -> Error {
    let retry_after = (status.metadata().get(crate::wire::RETRY_PUSHBACK_HEADER))
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    // Shown only when it is a plain code word (`csr_name_not_allowed`): whatever else a
    // server puts there stays out of the one line the user reads.
    let reason = (status.metadata().get(crate::wire::REASON_HEADER))
        .and_then(|v| v.to_str().ok())
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned);
    Error::Refused { code: status.code(), message: status.message().to_owned(), reason, retry_after }
}

impl Error {
    /// How long the server asked the caller to wait before retrying, if it did.
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Key algorithm for the new key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
}

/// What a Certify call needs.
pub struct Request<'a> {
    /// `https://host:port`, or `http://` for a plaintext server.
    pub addr: &'a str,
    pub anchors: &'a TrustAnchors,
    /// Name expected in meshca's serving certificate.
    pub server_name: &'a str,
    pub identity: &'a str,
    /// Token bytes as read from the token file; empty to renew by proof of possession.
    pub token: Vec<u8>,
    pub key_type: KeyType,
    /// Current certificate chain and key (PEM), presented for mutual TLS: renewal
    /// by proof of possession when `token` is empty.
    pub client_identity: Option<(String, String)>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("addr", &self.addr)
            .field("identity", &self.identity)
            .field("token", &"...")
            .finish_non_exhaustive()
    }
}

/// A verified certificate, with its key when meshca made it (`None` for a
/// submitted CSR, whose key stays where it was made). Debug omits the key.
pub struct Credentials {
    pub key_pkcs8: Option<Vec<u8>>,
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub valid_until: Option<SystemTime>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The server's clock at the request, when it said.
    pub server_time: Option<SystemTime>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("valid_until", &self.valid_until).finish_non_exhaustive()
    }
}

impl Credentials {
    /// `tls.crt`: leaf, then intermediates.
    pub(crate) fn chain_pem(&self) -> String {
        std::iter::once(&self.leaf).chain(&self.intermediates).map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// `tls.key`: PKCS#8 PEM, when meshca made the key.
    pub fn key_pem(&self) -> Option<String> {
        self.key_pkcs8.as_deref().map(|key| to_pem("PRIVATE KEY", key))
    }
}

/// Connects to meshca: TLS verified against `anchors` for `server_name`, or
/// plaintext for an `http://` address.
pub async fn connect(addr: &str, anchors: &TrustAnchors, server_name: &str) -> Result<Channel, Error> {
    connect_as(addr, anchors, server_name, None).await
}

/// Like [`connect`], presenting `identity` (chain PEM, key PEM) for mutual TLS.
pub async fn connect_as(
    addr: &str,
    anchors: &TrustAnchors,
    server_name: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, Error> {
    connect_to(&endpoint(addr, anchors, server_name, identity)?, addr).await
}

/// Opens a connection to `endpoint` (made by [`endpoint`] for `addr`).
pub async fn connect_to(endpoint: &Endpoint, addr: &str) -> Result<Channel, Error> {
    endpoint
        .connect_with_connector(TcpConnector)
        .await
        .map_err(|e| Error::Connect { addr: addr.to_owned(), reason: explain_connect(&e, addr) })
}

/// Why a connection to `addr` failed, in the terms of what to fix: the first cause
/// meshca recognises (nothing listening, no TLS there, anchors or name that do not
/// match meshca's certificate, a name that does not resolve), else the chain of
/// causes with repeats removed.
fn explain_connect(e: &(dyn std::error::Error + 'static), addr: &str) -> String {
    let place = addr.split_once("://").map_or(addr, |(_, rest)| rest).trim_end_matches('/');
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            let io = err.downcast_ref::<std::io::Error>()?;
            io.get_ref()?.downcast_ref::<rustls::Error>()
        });
        if let Some(tls) = tls {
            return explain_tls(tls, place);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return format!(
                        "nothing listens on {place} (connection refused): is meshca running, and is this its gRPC \
                         port (--listen, 8080 by default)?"
                    )
                }
                std::io::ErrorKind::TimedOut => {
                    return format!("no answer from {place} (timed out): a firewall may drop the connection")
                }
                _ if io.to_string().contains("lookup address") => {
                    let host = place.rsplit_once(':').map_or(place, |(host, _)| host);
                    return format!("cannot resolve the host name {host}: {io}");
                }
                _ => {}
            }
        }
        cur = err.source();
    }
    source_chain(e)
}

/// A TLS failure while connecting to meshca at `place`, in user terms.
fn explain_tls(e: &rustls::Error, place: &str) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "meshca's certificate at {place} is not for the server name expected ({e}): set --server-name to \
             meshca's name (meshca.NAMESPACE.serviceaccount.identity.NAMESPACE.TRUST_DOMAIN)"
        ),
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => format!(
            "meshca's certificate at {place} is not valid at this host's time ({e}): check this host's clock"
        ),
        rustls::Error::InvalidCertificate(_) => format!(
            "meshca's certificate at {place} does not chain to --trust-anchors ({e}): the anchors are not those \
             of this meshca's CA; use its trust-anchors.pem"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "{place} does not speak TLS ({e}): is it meshca's admin port (9990 by default)? gRPC is on its \
             --listen port (8080 by default); http:// is for a --plaintext server"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("meshca at {place} refused the TLS handshake (alert {alert:?})")
        }
        _ => format!("TLS with {place} failed: {e}"),
    }
}

/// Longest a Certify call waits for its answer: longer than meshca's own
/// `--request-timeout` (30 s by default), after which it answers itself.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// The message of a call [`CALL_TIMEOUT`] cut.
const TIMED_OUT: &str = "no answer within the call timeout";

/// A refused call to `addr`: the status as the server sent it, except a plaintext
/// call that hit a TLS port, which fails inside HTTP/2 before any server answers.
/// How it fails depends on how far the call got when the TLS alert closed the
/// connection: an HTTP/2 protocol error (the alert read as a frame), a call
/// cancelled because the connection closed first, or a transport error (a broken
/// pipe) once it was sent on a new connection.
pub(crate) fn refused_at(addr: &str, status: tonic::Status) -> Error {
    if status.message() == TIMED_OUT && status.metadata().is_empty() && !addr.starts_with("http://") {
        return Error::Connect {
            addr: addr.to_owned(),
            reason: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
        };
    }
    let client_side = matches!(
        status.code(),
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    ) && status.metadata().get(crate::wire::REQUEST_ID_HEADER).is_none();
    let transport = ["h2 protocol error", "operation was canceled", "transport error", TIMED_OUT]
        .iter()
        .any(|failure| status.message().contains(failure));
    if addr.starts_with("http://") && client_side && transport {
        let https = format!("https://{}", &addr["http://".len()..]);
        return Error::Connect {
            addr: addr.to_owned(),
            reason: format!(
                "the server there does not speak plaintext gRPC: meshca serves TLS there; use {https}"
            ),
        };
    }
    refused(status)
}

/// TCP for tonic (which adds TLS on top for `https://`), with Nagle's algorithm
/// off as tonic's own connector does, and writes held until a flush
/// ([`crate::coalesce`]): a request's message and the frame that ends it leave in
/// one write.
#[derive(Clone, Copy, Debug)]
struct TcpConnector;

impl tower_service::Service<http::Uri> for TcpConnector {
    type Response = hyper_util::rt::TokioIo<Coalesce<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} in {uri}"))
            };
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            // An IPv6 literal keeps its brackets in `host`, as "host:port" needs.
            let tcp = tokio::net::TcpStream::connect(format!("{host}:{port}")).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(Coalesce::new(tcp)))
        })
    }
}

/// What [`connect_as`] connects with, built once: the address, and for `https://`
/// the TLS settings (trust anchors, server name, client identity). Callers that
/// open many connections keep it and call [`connect_to`] for each.
pub fn endpoint(
    addr: &str,
    anchors: &TrustAnchors,
    server_name: &str,
    identity: Option<&(String, String)>,
) -> Result<Endpoint, Error> {
    let bad = |reason: String| Error::Address { addr: addr.to_owned(), reason };
    let mut endpoint = Endpoint::from_shared(addr.to_owned()).map_err(|e| bad(e.to_string()))?;
    if addr.starts_with("https://") {
        let ca: String = anchors.certificates().iter().map(|c| to_pem("CERTIFICATE", c)).collect();
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(server_name);
        if let Some((chain, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    } else if !addr.starts_with("http://") {
        return Err(bad("use https://HOST:PORT (or http:// for a --plaintext server)".into()));
    }
    Ok(endpoint)
}

/// `e` and its causes, each once: a cause whose text the one before already
/// contains is left out (tonic repeats its source in its own message).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

/// Makes a key and a CSR naming `identity` (CN and DNS SAN).
/// RSA keys take up to a second to generate: call it off the async workers.
pub fn make_csr(identity: &str, key_type: KeyType) -> Result<(KeyPair, Vec<u8>), Error> {
    let key_err = |e: &dyn std::fmt::Display| Error::Key(e.to_string());
    let key = match key_type {
        KeyType::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| key_err(&e))?,
        KeyType::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| key_err(&e))?,
        KeyType::Rsa2048 | KeyType::Rsa3072 => {
            let bits = if key_type == KeyType::Rsa2048 { 2048 } else { 3072 };
            let der = crate::ca::keygen::generate_pkcs8(bits).map_err(|e| key_err(&e))?;
            KeyPair::from_pkcs8_der_and_sign_algo(
                &rustls_pki_types::PrivatePkcs8KeyDer::from(der),
                &rcgen::PKCS_RSA_SHA256,
            )
            .map_err(|e| key_err(&e))?
        }
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity);
    params.distinguished_name = dn;
    let san = identity.to_owned().try_into().map_err(|e: rcgen::Error| Error::Key(e.to_string()))?;
    params.subject_alt_names = vec![SanType::DnsName(san)];
    let csr = params.serialize_request(&key).map_err(|e| Error::Key(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// The server's clock as reported in a Certify response or status.
pub fn server_time(metadata: &tonic::metadata::MetadataMap) -> Option<SystemTime> {
    let millis: u64 = metadata.get(crate::wire::SERVER_TIME_HEADER)?.to_str().ok()?.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(millis))
}

/// Requests one certificate. `now` is this host's wall clock at the time of the
/// call; the chain is verified at the server's time when the response carries it
/// (a host clock minutes off must not throw away a good certificate), else at `now`.
pub async fn certify(req: Request<'_>, now: SystemTime) -> Result<Credentials, Error> {
    let channel = connect_as(req.addr, req.anchors, req.server_name, req.client_identity.as_ref()).await?;
    certify_on(channel, req, now).await
}

/// [`certify`] over an established `channel` (`req.addr` and
/// `req.client_identity` were for connecting it and are not used again): a new
/// key and CSR, then [`submit_on`].
pub(crate) async fn certify_on(
    channel: Channel,
    req: Request<'_>,
    now: SystemTime,
) -> Result<Credentials, Error> {
    let (identity, key_type) = (req.identity.to_owned(), req.key_type);
    let (key, csr) = tokio::task::spawn_blocking(move || make_csr(&identity, key_type))
        .await
        .map_err(|e| Error::Key(e.to_string()))??;
    let mut creds = submit_on(channel, req, csr, key.public_key_raw(), now).await?;
    creds.key_pkcs8 = Some(key.serialize_der());
    Ok(creds)
}

/// Sends `csr` unchanged in one Certify call and verifies the answer: the chain
/// leads to `req.anchors` and names `req.identity` (at the server's time when the
/// response carries it, else at `now`), and the leaf certifies `public_key` (the
/// BIT STRING of the CSR's SubjectPublicKeyInfo). The credentials carry no key:
/// it stays wherever the CSR was made.
pub(crate) async fn submit_on(
    channel: Channel,
    req: Request<'_>,
    csr: Vec<u8>,
    public_key: &[u8],
    now: SystemTime,
) -> Result<Credentials, Error> {
    let addr = req.addr;
    let mut client = IdentityClient::new(channel);
    let call = client.certify(CertifyRequest {
        identity: req.identity.to_owned(),
        token: req.token,
        certificate_signing_request: csr,
    });
    // Never wait forever: not for a server that stopped answering, nor for a
    // connection that closed before the call could go out on it.
    let response = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => answer.map_err(|status| refused_at(addr, status))?,
        Err(_) => return Err(refused_at(addr, tonic::Status::cancelled(TIMED_OUT))),
    };
    let server_time = server_time(response.metadata());
    let response = response.into_inner();
    if response.leaf_certificate.is_empty() {
        return Err(Error::BadResponse("no leaf certificate".into()));
    }
    let leaf = CertificateDer::from(response.leaf_certificate);
    let intermediates: Vec<_> =
        response.intermediate_certificates.into_iter().map(CertificateDer::from).collect();
    req.anchors
        .verify(&leaf, &intermediates, server_time.unwrap_or(now), Some(req.identity))
        .map_err(Error::BadResponse)?;
    // A valid chain for someone else's key is of no use (and a sign of a broken server).
    let (_, cert) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|e| Error::BadResponse(format!("leaf: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(Error::BadResponse("the leaf does not carry the requested key".into()));
    }
    let valid_until = response.valid_until.and_then(|t| SystemTime::try_from(t).ok());
    let validity = cert.validity();
    let not_before = crate::ca::issuer::to_system_time(validity.not_before);
    let not_after = crate::ca::issuer::to_system_time(validity.not_after);
    Ok(Credentials { key_pkcs8: None, leaf, intermediates, valid_until, not_before, not_after, server_time })
}

/// A CSR made elsewhere (`meshca certify --csr`, e.g. by Windows `certreq -new`
/// with a key that cannot leave the machine's key store): the DER sent unchanged,
/// and the public key the leaf must carry.
#[derive(Clone, Debug)]
pub(crate) struct SubmittedCsr {
    pub der: Vec<u8>,
    /// The BIT STRING of its SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
}

/// Largest CSR file read: four times meshca's CSR limit, room for PEM's base64 and
/// line breaks.
const MAX_CSR_FILE: usize = 64 * 1024;

impl SubmittedCsr {
    /// Reads a CSR as PEM (label `CERTIFICATE REQUEST`, or certreq's `NEW
    /// CERTIFICATE REQUEST`; CRLF line ends and a UTF-8 byte-order mark accepted) or
    /// DER. Only the framing and the public key are read here: the server checks the
    /// signature and every name.
    pub(crate) fn parse(bytes: &[u8]) -> Result<SubmittedCsr, String> {
        if bytes.len() > MAX_CSR_FILE {
            return Err(format!("{} bytes is more than a CSR can be ({MAX_CSR_FILE} at most)", bytes.len()));
        }
        let der = match crate::ca::material::without_byte_order_marks(bytes) {
            text if text.trim_ascii_start().starts_with(b"-----BEGIN ") => {
                crate::ca::material::csr_from_pem(&text)?
            }
            _ if bytes.first() == Some(&0x30) => bytes.to_vec(),
            _ => return Err("neither a PEM CERTIFICATE REQUEST nor a DER CSR".into()),
        };
        use x509_parser::prelude::FromDer as _;
        let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| format!("not a PKCS#10 certificate request: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the request", rest.len()));
        }
        let public_key = csr.certification_request_info.subject_pki.subject_public_key.data.to_vec();
        Ok(SubmittedCsr { der, public_key })
    }
}

/// The trust anchors meshca currently trusts, from `meshca.v1.TrustBundle/Get`.
/// Refused by a server without the service (`Unimplemented`); an empty bundle, or
/// one holding something that is not a usable root, is a bad response.
pub(crate) async fn trust_bundle(channel: Channel) -> Result<TrustAnchors, Error> {
    let response =
        TrustBundleClient::new(channel).get(GetTrustBundleRequest {}).await.map_err(refused)?.into_inner();
    if response.trust_anchors.is_empty() {
        return Err(Error::BadResponse("the trust bundle is empty".into()));
    }
    let certs = response.trust_anchors.into_iter().map(CertificateDer::from).collect();
    TrustAnchors::from_certs(certs, std::path::Path::new("the trust bundle"))
        .map_err(|e| Error::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_refusal_carries_the_servers_pushback_hint_when_it_sent_one() {
        let mut status = tonic::Status::resource_exhausted("over capacity");
        status.metadata_mut().insert(crate::wire::RETRY_PUSHBACK_HEADER, "250".parse().unwrap());
        let e = refused(status);
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_millis(250)));
        assert!(matches!(e, Error::Refused { code: tonic::Code::ResourceExhausted, .. }));

        assert_eq!(refused(tonic::Status::unauthenticated("no")).retry_after(), None);
        let mut garbled = tonic::Status::resource_exhausted("over capacity");
        garbled.metadata_mut().insert(crate::wire::RETRY_PUSHBACK_HEADER, "soon".parse().unwrap());
        assert_eq!(refused(garbled).retry_after(), None);
    }

    /// The connector reaches IPv4 and IPv6 literals and names, on the URL's port.
    #[tokio::test]
    async fn the_connector_reaches_ipv4_ipv6_and_named_hosts() {
        use tower_service::Service;
        for (bind, host) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]"), ("127.0.0.1:0", "localhost")]
        {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let uri: http::Uri = format!("https://{host}:{port}").parse().unwrap();
            let (io, accepted) = tokio::join!(TcpConnector.call(uri), listener.accept());
            let io = io.unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(io.inner().get_ref().peer_addr().unwrap(), accepted.unwrap().0.local_addr().unwrap());
        }
        let no_host: http::Uri = "/path/only".parse().unwrap();
        assert!(TcpConnector.call(no_host).await.is_err());
    }
}
