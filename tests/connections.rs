//! The connection limit and age through the real server: a connection beyond
//! `--max-connections` waits, unserved, until an open one closes, then is served;
//! a connection past `--max-connection-age` is closed by the server (GOAWAY) and
//! the client's next call simply reconnects. Both are visible on `/metrics`. The
//! server, not the client, picks the TLS cipher suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::Duration;

use meshca::config::ConnectionSettings;
use support::process::PATIENCE;
use support::{Options, TestServer};

type Client = meshca::proto::identity_client::IdentityClient<tonic::transport::Channel>;

/// A new client (its own connection) asking once for `ns/sa`, in a task that
/// returns the client (so its connection stays open) and the answer.
fn certify_on_a_new_connection(
    server: &TestServer,
    ns: &str,
    sa: &str,
) -> tokio::task::JoinHandle<(Client, Result<tonic::Response<meshca::proto::CertifyResponse>, tonic::Status>)>
{
    let (_key, req) = server.request(ns, sa);
    let (url, anchors) = (server.url(), server.anchors.clone());
    tokio::spawn(async move {
        let channel = meshca::agent::client::connect(&url, &anchors, support::SERVER_NAME).await.unwrap();
        let mut client = Client::new(channel);
        let response = client.certify(req).await;
        (client, response)
    })
}

/// Waits until the server reports `want` open connections.
async fn open_connections_become(server: &TestServer, want: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let open = server.metric("meshca_connections_open").await;
        if open == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{open} connections open, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_limit_waits_until_an_open_one_closes() {
    let connections = ConnectionSettings { max: 2, ..Default::default() };
    let server = TestServer::start_with(Options { connections, ..Default::default() }).await;
    assert_eq!(server.metric("meshca_connections_max").await, 2);
    let mut first = server.client().await;
    let mut second = server.client().await;
    for client in [&mut first, &mut second] {
        let (_key, req) = server.request("default", "web");
        assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());
    }
    open_connections_become(&server, 2).await;

    // A third client: its TCP connection lands in the listen backlog, and its TLS
    // handshake gets no answer while both slots are taken.
    let mut third = certify_on_a_new_connection(&server, "default", "api");
    let early = tokio::time::timeout(Duration::from_millis(700), &mut third).await;
    assert!(early.is_err(), "served beyond the limit: {:?}", early.map(|r| r.map(|(_, response)| response)));
    assert_eq!(server.metric("meshca_connections_open").await, 2);

    // Closing one lets it in.
    drop(first);
    let (_third, response) = tokio::time::timeout(PATIENCE, third).await.expect("still waiting").unwrap();
    assert!(!response.unwrap().into_inner().leaf_certificate.is_empty());
    open_connections_become(&server, 2).await;
    let (_key, req) = server.request("default", "web");
    assert!(second.certify(req).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_is_closed_and_the_next_call_reconnects() {
    let connections = ConnectionSettings { max_age: Some(Duration::from_millis(300)), ..Default::default() };
    let server = TestServer::start_with(Options { connections, ..Default::default() }).await;
    let mut client = server.client().await;
    let (_key, req) = server.request("default", "web");
    assert!(client.certify(req).await.is_ok());
    // Idle past its age: the server sends GOAWAY and closes it.
    open_connections_become(&server, 0).await;
    // The same channel connects again for the next call.
    let (_key, req) = server.request("default", "web");
    assert!(!client.certify(req).await.unwrap().into_inner().leaf_certificate.is_empty());
    assert_eq!(server.metric("meshca_connections_open").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_for_plaintext_too() {
    let connections = ConnectionSettings { max: 1, ..Default::default() };
    let server = TestServer::start_with(Options { connections, plaintext: true, ..Default::default() }).await;
    let mut first = server.client().await;
    let (_key, req) = server.request("default", "web");
    assert!(first.certify(req).await.is_ok());
    let mut second = certify_on_a_new_connection(&server, "default", "api");
    let early = tokio::time::timeout(Duration::from_millis(700), &mut second).await;
    assert!(early.is_err(), "served beyond the limit: {:?}", early.map(|r| r.map(|(_, response)| response)));
    drop(first);
    let (_second, response) = tokio::time::timeout(PATIENCE, second).await.expect("still waiting").unwrap();
    assert!(!response.unwrap().into_inner().leaf_certificate.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_loses_its_slot_at_the_handshake_deadline() {
    use meshca::server::tls::HANDSHAKE_TIMEOUT;
    let connections = ConnectionSettings { max: 1, ..Default::default() };
    let server = TestServer::start_with(Options { connections, plaintext: true, ..Default::default() }).await;
    // Takes the only slot and never sends the HTTP/2 preface.
    let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    open_connections_become(&server, 1).await;
    let opened = tokio::time::Instant::now();
    let mut client = server.client().await;
    let (_key, req) = server.request("default", "web");
    let response = tokio::time::timeout(HANDSHAKE_TIMEOUT + PATIENCE, client.certify(req)).await;
    assert!(!response.expect("still waiting").unwrap().into_inner().leaf_certificate.is_empty());
    assert!(opened.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1), "served before the deadline");
    drop(silent);
}

/// rustls (as in Linkerd's proxy and tonic) lists AES-256-GCM-SHA384 first; the
/// server answers with AES-128-GCM-SHA256, whose handshake hash runs in hardware,
/// and still serves a client that offers only AES-256 or only ChaCha20.
#[tokio::test]
async fn the_server_chooses_aes_128_gcm_over_the_clients_first_choice_and_serves_any_other() {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    use rustls::CipherSuite;
    let server = &TestServer::start().await;
    let negotiated = move |suites: Option<Vec<rustls::SupportedCipherSuite>>| {
        let mut provider = default_provider();
        if let Some(suites) = suites {
            provider.cipher_suites = suites;
        }
        let config = server.tls_config(provider);
        async move { server.tls(&config).await.get_ref().1.negotiated_cipher_suite().unwrap().suite() }
    };
    assert_eq!(
        default_provider().cipher_suites[0].suite(),
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        "the client prefers AES-256"
    );
    assert_eq!(negotiated(None).await, CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(
        negotiated(Some(vec![cipher_suite::TLS13_AES_256_GCM_SHA384])).await,
        CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    assert_eq!(
        negotiated(Some(vec![cipher_suite::TLS13_CHACHA20_POLY1305_SHA256])).await,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    );
}

/// No session resumption: a client that kept what the server sent after its first
/// handshake (TLS 1.3 tickets, or a TLS 1.2 session id) still gets a full handshake
/// on its next connection. A resumed session would carry the first connection's
/// client certificate unchecked (renewal by proof of possession trusts it), and
/// proxies reconnect hours apart, so a cache would only cost: two tickets per new
/// connection, each a record written and read.
#[tokio::test]
async fn a_second_connection_from_the_same_client_gets_a_full_handshake_and_no_tickets() {
    use rustls::HandshakeKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| s.version() == versions);
        let config = server.tls_config(provider);
        for attempt in 0..2 {
            let mut tls = server.tls(&config).await;
            assert_eq!(
                tls.get_ref().1.handshake_kind(),
                Some(HandshakeKind::Full),
                "{versions:?} #{attempt}"
            );
            // Read past anything sent after the handshake (TLS 1.3 tickets come
            // first): the HTTP/2 preface and an empty SETTINGS frame are answered
            // with the server's SETTINGS.
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
            let mut header = [0u8; 9];
            tls.read_exact(&mut header).await.unwrap();
            assert_eq!(header[3], 0x04, "the server's first frame is SETTINGS");
        }
    }
}

/// Descriptors open in process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_flood_under_a_low_descriptor_limit_leaves_grpc_and_the_probes_served() {
    use meshca::admission::descriptors::{max_connections_for, ADMIN_CONNECTIONS, RESERVED};
    use support::process::ServeBin;
    const NOFILE: u64 = 256;
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start(&["prlimit", &limit, "--"], "exec \"$@\"", &data, &[]).await;
    let fit = max_connections_for(Some(NOFILE)).unwrap();
    let (_, metrics) = support::http_get(serve.admin, "/metrics").await;
    assert_eq!(
        support::sample(&metrics, "meshca_connections_max"),
        fit as u64,
        "the default, lowered to fit"
    );

    // Four times the descriptor limit in idle admin connections, held open.
    let mut idle = Vec::new();
    for _ in 0..4 * NOFILE {
        let connect = tokio::net::TcpStream::connect(serve.admin);
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(stream) => idle.push(stream.unwrap()),
            Err(_) => break, // the listen backlog is full: the server stopped accepting
        }
    }
    assert_eq!(idle.len() as u64, 4 * NOFILE, "the admin listener kept accepting");
    // The probes and Certify on new connections are still answered, promptly.
    let five = Duration::from_secs(5);
    for path in ["/live", "/ready"] {
        let probe = tokio::time::timeout(five, support::http_get(serve.admin, path)).await;
        assert_eq!(probe.expect("a probe answered within 5 s during the admin flood").0, 200, "{path}");
    }
    let certify = async { serve.client().await.certify(serve.request("web")).await };
    let answer = tokio::time::timeout(five, certify).await.expect("Certify answered within 5 s");
    answer.expect("Certify during the admin flood");
    let open = descriptors(serve.pid());
    assert!(open as u64 <= RESERVED + ADMIN_CONNECTIONS as u64 + 8, "{open} descriptors open");
    drop(idle);
    let log = serve.process.stderr.text();
    assert!(!log.contains("Too many open files"), "{log}");
    serve.stop().await;

    // A --max-connections that does not fit is refused at start, naming the fix.
    let mut cmd = support::process::command("prlimit");
    cmd.args([&limit, "--", support::process::bin(), "serve", "--dev", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--max-connections", "1024", "--data-dir"])
        .arg(&data)
        .env("NO_COLOR", "1");
    let out = support::process::output(&mut cmd, PATIENCE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-connections") && stderr.contains("ulimit -n"), "{stderr}");
}
