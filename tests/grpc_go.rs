//! The benchmark's second client, `meshcagrpcload` (bench/go, written with grpc-go
//! and built offline by bench/grpc-go.sh against Debian's golang-google-grpc-dev): an
//! independent gRPC and HTTP/2 stack gets certificates from meshca over TLS, one call
//! per connection and in a herd of new connections, and counts a refusal as an error,
//! never as a certificate served. What bench/run.sh reports for it rests on this.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::TestServer;

/// Builds the client with the benchmark's own script and returns its path.
fn client() -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash").arg("bench/grpc-go.sh").current_dir(root).output().unwrap();
    assert!(
        out.status.success(),
        "bench/grpc-go.sh (needs golang-go and golang-google-grpc-dev; tests/run.sh installs them): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `n` requests as `meshca-load --write-requests` writes them: a 4-byte big-endian
/// length, then the CertifyRequest's protobuf bytes.
fn write_requests(server: &TestServer, path: &Path, n: usize, token: impl Fn(usize) -> Vec<u8>) {
    let mut out = Vec::new();
    for i in 0..n {
        let (_, mut request) = server.request("default", &format!("sa-{i}"));
        request.token = token(i);
        let bytes = prost::Message::encode_to_vec(&request);
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// Runs the client with `args` against `server` and parses its JSON line.
async fn run(bin: &Path, server: &TestServer, requests: &Path, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(bin);
    cmd.arg("-addr")
        .arg(server.addr.to_string())
        .arg("-trust-anchors")
        .arg(server.dir.path().join("trust-anchors.pem"))
        .arg("-server-name")
        .arg(support::SERVER_NAME)
        .arg("-requests")
        .arg(requests)
        .arg("-json")
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_gets_certificates_on_its_own_connections_and_counts_refusals_as_errors() {
    let bin = client();
    let server = TestServer::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.bin");
    write_requests(&server, &good, 16, |i| server.token("default", &format!("sa-{i}")));
    let before = server.audit_records().len();

    // One call at a time on each of two connections, with the server's CPU sampled.
    let pid = std::process::id().to_string();
    let steady =
        run(&bin, &server, &good, &["-conns", "2", "-warmup", "0", "-duration", "0.5", "-server-pid", &pid])
            .await;
    assert_eq!(steady["errors"], 0, "{steady}");
    let certs = steady["certs"].as_u64().unwrap();
    assert!(certs > 0, "{steady}");
    assert!(steady["server_cpu_us_per_cert"].as_f64().unwrap() > 0.0, "{steady}");

    // A herd: each proxy on a new connection of its own, asking once.
    let herd = run(&bin, &server, &good, &["-herd", "20", "-spread", "0.2"]).await;
    assert_eq!((herd["served"].as_u64(), herd["failed"].as_u64()), (Some(20), Some(0)), "{herd}");

    // Every certificate it counted was issued and recorded (the steady run's
    // unmeasured calls too, so at least as many).
    let issued = server.audit_records()[before..].iter().filter(|r| r["outcome"] == "issued").count();
    assert!(issued as u64 >= certs + 20, "{issued} issued, {certs} + 20 counted");

    // Tokens signed by another key: every call refused, none counted as served.
    let (other, _) = meshca::auth::dev::DevSigner::generate().unwrap();
    let bad = tmp.path().join("bad.bin");
    write_requests(&server, &bad, 4, |i| {
        other.sign(&server.claims("default", &format!("sa-{i}"))).unwrap().into_bytes()
    });
    let refused = run(&bin, &server, &bad, &["-conns", "1", "-warmup", "0", "-duration", "0.3"]).await;
    assert_eq!(refused["certs"], 0, "{refused}");
    assert!(refused["errors_by_code"]["Unauthenticated"].as_u64().unwrap() > 0, "{refused}");
    let herd = run(&bin, &server, &bad, &["-herd", "3", "-spread", "0"]).await;
    assert_eq!((herd["served"].as_u64(), herd["failed"].as_u64()), (Some(0), Some(3)), "{herd}");
}
