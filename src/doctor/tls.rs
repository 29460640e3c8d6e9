//! The TLS handshake with meshca, checked as the agent would check it, explained
//! when it fails.
//!
//! It uses rustls with ring directly, not the gRPC client, so both the chain the
//! server presents and the typed verification error are at hand: unknown issuer,
//! name mismatch, expired, not yet valid, or a server that never completes the
//! handshake. It verifies at the injected clock's time, so a host clock that is
//! off shows here as it would for the agent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::net::Target;
use super::{clock_fix, human, when, Check, Finding};
use crate::ca::issuer::{to_system_time, TrustAnchors};

/// Check 3 for an `http://` address: there is no TLS to check.
pub(crate) fn plaintext_finding(target: &Target) -> Finding {
    Finding::warn(
        Check::Tls,
        format!(
            "{} is plaintext (http://): meshca is not authenticated and traffic is not encrypted",
            target.url
        ),
        "use https:// unless a TLS-terminating sidecar in front of a --plaintext meshca is intended",
    )
}

/// rustls asks this for the time: the injected clock's reading at the handshake.
#[derive(Debug)]
struct FixedTime(UnixTime);

impl rustls::time_provider::TimeProvider for FixedTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

/// The webpki verifier, remembering what the server presented.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    presented: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain =
            std::iter::once(end_entity).chain(intermediates).map(|c| c.clone().into_owned()).collect();
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The subject alternative names of a certificate, as `DNS:…`, `URI:…`.
pub(crate) fn names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(format!("DNS:{d}")),
            GeneralName::URI(u) => Some(format!("URI:{u}")),
            GeneralName::IPAddress(ip) => Some(format!("IP:{ip:?}")),
            _ => None,
        })
        .collect()
}

/// A certificate's notAfter, when it parses.
pub(crate) fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(to_system_time(cert.validity().not_after))
}

/// Check 3: the TLS handshake on `stream` (to `addr`) against `anchors` for
/// `server_name`, verified at `now`.
pub(crate) async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    anchors: &TrustAnchors,
    server_name: &str,
    now: SystemTime,
    timeout: Duration,
) -> Finding {
    let name = match ServerName::try_from(server_name.to_owned()) {
        Ok(name) => name,
        Err(_) => return Finding::fail(Check::Tls, format!("--server-name {server_name:?} is not a DNS name"), "pass meshca's identity, e.g. meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local"),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in anchors.certificates() {
        // Anchors were accepted by webpki when loaded; a refusal here is the same refusal.
        let _ = roots.add(cert.clone());
    }
    let setup = |e: &dyn std::fmt::Display| {
        Finding::fail(Check::Tls, format!("cannot set up TLS: {e}"), "report this as a bug")
    };
    let inner = match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build() {
        Ok(v) => v,
        Err(e) => return setup(&e),
    };
    let recording = Arc::new(Recording { inner, presented: Mutex::new(Vec::new()) });
    let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let builder = match rustls::ClientConfig::builder_with_details(provider, Arc::new(FixedTime(unix)))
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        Err(e) => return setup(&e),
    };
    let mut config =
        builder.dangerous().with_custom_certificate_verifier(recording.clone()).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = tokio::time::timeout(timeout, connector.connect(name, stream)).await;
    let presented = recording.presented.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let server = |chain: &[CertificateDer<'_>]| match chain.first() {
        Some(leaf) => names(leaf).join(", "),
        None => "(no certificate)".into(),
    };
    match result {
        Err(_) => Finding::fail(
            Check::Tls,
            format!("handshake timed out: {addr} accepted TCP but did not complete TLS within {}", human(timeout)),
            "check that --addr is meshca's gRPC port (not the admin port, nor a proxy that holds connections) and that meshca is not overloaded",
        ),
        Ok(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let chain = conn.peer_certificates().map(<[_]>::to_vec).unwrap_or(presented);
            let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            let expiry = match chain.first().and_then(not_after) {
                Some(t) => format!(
                    "expires {} (in {} s)",
                    when(t),
                    t.duration_since(now).unwrap_or_default().as_secs()
                ),
                None => "expiry unknown".into(),
            };
            Finding::ok(
                Check::Tls,
                format!(
                    "{version} handshake with {addr}: meshca is {}, chain of {} (leaf + {}) verified against the trust anchors for {server_name}; {expiry}",
                    server(&chain),
                    chain.len(),
                    match chain.len().saturating_sub(1) {
                        1 => "1 intermediate".to_owned(),
                        n => format!("{n} intermediates"),
                    },
                ),
            )
        }
        Ok(Err(e)) => {
            let error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
            failure(error, &e, &server(&presented), server_name, now)
        }
    }
}

/// A failed handshake in words, with what to do.
fn failure(
    error: Option<rustls::Error>,
    io: &std::io::Error,
    presented: &str,
    server_name: &str,
    now: SystemTime,
) -> Finding {
    use rustls::Error as E;
    let anchors_fix = "give --trust-anchors the roots meshca's issuer chains to (the meshca-trust-anchors ConfigMap, or the agent's ca.crt)";
    let (found, fix) = match error {
        Some(E::InvalidCertificate(CertificateError::UnknownIssuer)) => (
            format!("unknown issuer: the server's certificate ({presented}) does not chain to the trust anchors"),
            anchors_fix.to_owned(),
        ),
        // webpki found an issuer of the right name whose key did not sign: another CA
        // with the same names (e.g. a second `meshca init` for the same trust domain).
        Some(E::InvalidCertificate(CertificateError::BadSignature)) => (
            format!(
                "unknown issuer: the server's certificate ({presented}) does not chain to the trust anchors \
                 (they hold a CA of the same name with another key)"
            ),
            anchors_fix.to_owned(),
        ),
        Some(E::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => (
            format!("name mismatch: the server's certificate is for {presented}, not for {server_name}"),
            "pass --server-name with meshca's identity (the DNS name above, if this is meshca), or correct --addr".to_owned(),
        ),
        Some(E::InvalidCertificate(CertificateError::ExpiredContext { not_after, .. })) => (
            format!(
                "expired: the server's certificate ({presented}) expired at {} ({} ago by this host's clock)",
                when(to_time(not_after)),
                human(now.duration_since(to_time(not_after)).unwrap_or_default())
            ),
            format!("if this host's clock is right, meshca's serving certificate was not renewed: check meshca's log and its issuer; otherwise {}", clock_fix()),
        ),
        Some(E::InvalidCertificate(CertificateError::NotValidYetContext { not_before, .. })) => (
            format!(
                "not yet valid: the server's certificate ({presented}) is valid from {}, {} after this host's time",
                when(to_time(not_before)),
                human(to_time(not_before).duration_since(now).unwrap_or_default())
            ),
            format!("this host's clock is probably behind: {}", clock_fix()),
        ),
        Some(E::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet)) => (
            format!("the server's certificate ({presented}) is outside its validity at this host's time"),
            clock_fix().to_owned(),
        ),
        Some(E::InvalidCertificate(other)) => (
            format!("the server's certificate ({presented}) is invalid: {other:?}"),
            anchors_fix.to_owned(),
        ),
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. }) => (
            format!("the server did not answer in TLS ({io})"),
            "if meshca runs with --plaintext, use an http:// address; otherwise check that --addr is meshca's gRPC port".to_owned(),
        ),
        Some(E::AlertReceived(alert)) => (
            format!("the server refused the handshake (TLS alert {alert:?})"),
            "check meshca's log for the refused handshake; TLS 1.2 or 1.3 with ALPN h2 is required".to_owned(),
        ),
        _ => (
            format!("handshake failed: {io}"),
            "check that --addr is meshca's gRPC port and that nothing between this host and meshca intercepts TLS".to_owned(),
        ),
    };
    Finding::fail(Check::Tls, found, fix)
}

fn to_time(t: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs())
}
