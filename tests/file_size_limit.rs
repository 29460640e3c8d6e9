//! A file size limit (`RLIMIT_FSIZE`: `ulimit -f`, systemd `LimitFSIZE=`) on the
//! real `meshca serve --dev`, started the way a service manager starts it: the
//! limit set, SIGXFSZ left at its default action (no `trap '' XFSZ`). meshca
//! handles the signal itself, so a write past the limit fails with EFBIG instead
//! of killing the process: the audit log refuses issuance (no certificate
//! without a record), `/ready` turns 503, the process stays up, and once the
//! file is rotated it serves again and records the gap.
//!
//! (tests/faults.rs raises and lowers the limit of a running server with
//! `prlimit`; this file needs nothing beyond `sh`.)
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshca::agent::client::{self, KeyType};
use meshca::audit::{sha256_hex, verify_file};
use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::ca::issuer::TrustAnchors;
use meshca::clock::{Clock, SystemClock};
use meshca::config::{DEFAULT_AUDIENCE, DEV_TOKEN_ISSUER};
use meshca::identity::Naming;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::{CertifyRequest, CertifyResponse};
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_meshca");
/// Bound on waits that only a broken implementation would reach.
const PATIENCE: Duration = Duration::from_secs(60);
/// The limit, in the 512-byte blocks of POSIX `ulimit -f`: 16 KiB, room for the
/// dev CA's files and a dozen audit records.
const LIMIT_BLOCKS: u64 = 32;
const SERVER_NAME: &str = "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local";

/// `GET path` on an admin listener: status code and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
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

/// Polls `/ready` until it answers `code`; returns the body.
async fn wait_ready(admin: SocketAddr, code: u16) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (got, body) = get(admin, "/ready").await;
        if got == code {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready still answers {got} {body:?}, not {code}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `meshca audit verify FILE`: exit code and stderr.
fn audit_verify(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(["audit", "verify"]).arg(path).env("NO_COLOR", "1").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Fingerprints of the certificates the records of a log say were issued.
fn issued_fingerprints(path: &Path) -> HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["outcome"] == "issued")
        .map(|r| r["fingerprint_sha256"].as_str().unwrap().to_owned())
        .collect()
}

/// A running `meshca serve --dev` under `ulimit -f` (SIGXFSZ at its default
/// action); its stderr is read line by line; SIGKILLed on drop.
struct Serve {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    data: PathBuf,
    grpc: String,
    admin: SocketAddr,
}

impl Serve {
    /// Starts it with a file size limit of `blocks` and waits for `/ready`.
    async fn start(blocks: u64, data: &Path) -> Serve {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ulimit -f \"$1\" && shift && exec \"$@\"", "sh", &blocks.to_string(), BIN])
            .args(["serve", "--dev", "--data-dir"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MESHCA_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let pipe = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut serve = Serve {
            child,
            lines,
            seen: Vec::new(),
            data: data.to_owned(),
            grpc: String::new(),
            admin: "127.0.0.1:0".parse().unwrap(),
        };
        let first = serve.wait_for("meshca dev mode:");
        let after = |from: &str, to: &str| {
            let rest = &first[first.find(from).unwrap() + from.len()..];
            rest[..rest.find(to).unwrap_or(rest.len())].to_owned()
        };
        serve.grpc = after("gRPC on ", ",");
        serve.admin = after("admin on http://", "\n").trim().parse().unwrap();
        wait_ready(serve.admin, 200).await;
        serve
    }

    /// Reads stderr until a line contains `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e:?}); stderr:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn stderr(&mut self) -> String {
        let rest: Vec<String> = self.lines.try_iter().collect();
        self.seen.extend(rest);
        self.seen.join("\n")
    }

    /// The process must still be running (not killed by SIGXFSZ).
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("meshca is gone ({status}); stderr:\n{}", self.stderr());
        }
    }

    /// The limit the process runs under, in bytes, as the kernel reports it
    /// (Linux); else what POSIX `ulimit -f` means.
    fn file_size_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id()));
        let from_proc = limits.ok().and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max file size"))?;
            line["Max file size".len()..].split_whitespace().next()?.parse().ok()
        });
        from_proc.unwrap_or(LIMIT_BLOCKS * 512)
    }

    /// A refusal because the audit log cannot be written: no certificate, and the
    /// process still up.
    #[track_caller]
    fn assert_refused_for_audit(&mut self, result: Result<tonic::Response<CertifyResponse>, tonic::Status>) {
        let status = result.expect_err("a certificate was handed out past the file size limit");
        let for_audit =
            status.code() == Code::Unavailable && status.message().contains("audit log cannot be written");
        if !for_audit {
            // A connection cut off: the process probably died. Say how.
            std::thread::sleep(Duration::from_millis(200));
            self.assert_alive();
            panic!("not refused for the audit log: {status:?}");
        }
        self.assert_alive();
    }

    /// SIGTERM; the process must exit 0.
    async fn stop(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "meshca did not exit; stderr:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(status.success(), "meshca exited with {status}:\n{}", self.stderr());
    }

    /// A Certify client verifying the server against the data directory's anchors.
    async fn client(&self) -> IdentityClient<Channel> {
        let anchors = TrustAnchors::load(&self.data.join("trust-anchors.pem")).unwrap();
        IdentityClient::new(client::connect(&self.grpc, &anchors, SERVER_NAME).await.unwrap())
    }

    /// A request for `web` in `default` with a dev token and a fresh P-256 key.
    fn request(&self) -> CertifyRequest {
        let pem = std::fs::read_to_string(self.data.join("dev-token.key")).unwrap();
        let signer = DevSigner::from_pem(&pem).unwrap();
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let identity = naming.identity("default", "web").unwrap().dns_name;
        let (_key, csr) = client::make_csr(&identity, KeyType::P256).unwrap();
        let now = SystemClock.now();
        let claims = TokenClaims {
            issuer: DEV_TOKEN_ISSUER.into(),
            audience: vec![DEFAULT_AUDIENCE.into()],
            namespace: "default".into(),
            service_account: "web".into(),
            pod: None,
            issued_at: now,
            expires_at: now + Duration::from_secs(3600),
        };
        let token = signer.sign(&claims).unwrap().into_bytes();
        CertifyRequest { identity, token, certificate_signing_request: csr }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn past_a_file_size_limit_serve_refuses_issuance_stays_up_and_serves_again_after_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = Serve::start(LIMIT_BLOCKS, &data).await;
    let limit = serve.file_size_limit();
    let log = data.join("audit.jsonl");
    assert!(limit < 1 << 20, "no file size limit took effect: {limit}");

    // Issue until nothing fits any more. A write past the limit fails (EFBIG, as
    // SIGXFSZ is handled) and its request is refused; the writer's own retry a
    // second later may still fit a short gap record (ready again), and issuance
    // goes on. Full when the retry after a refusal fails too (still unready).
    let mut client = serve.client().await;
    let (mut handed_out, mut refused) = (Vec::new(), 0);
    loop {
        assert!(
            handed_out.len() < 200,
            "200 certificates issued and none refused under a {limit}-byte limit"
        );
        match client.certify(serve.request()).await {
            Ok(resp) => handed_out.push(sha256_hex(&resp.into_inner().leaf_certificate)),
            Err(status) => {
                serve.assert_refused_for_audit(Err(status));
                refused += 1;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if get(serve.admin, "/ready").await.0 == 503 {
                    break; // the retry failed too
                }
            }
        }
    }
    assert!(!handed_out.is_empty(), "the limit left no room for one record");
    let body = wait_ready(serve.admin, 503).await;
    assert!(body.contains("audit log is failing"), "{body}");

    // While the limit holds: still up, still refusing, nothing past the limit.
    for _ in 0..3 {
        serve.assert_refused_for_audit(client.certify(serve.request()).await);
        refused += 1;
    }
    serve.assert_alive();
    assert_eq!(get(serve.admin, "/ready").await.0, 503);
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size <= limit, "the audit file is {size} bytes, past the {limit}-byte limit");
    let old = verify_file(&log).unwrap();
    assert_eq!(old.incomplete_tail, None, "a partial line was left: {old:?}");
    let recorded = issued_fingerprints(&log);
    for fingerprint in &handed_out {
        assert!(recorded.contains(fingerprint), "certificate {fingerprint} was handed out without a record");
    }

    // Room again: the file is rotated, meshca continues in a new one by itself.
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    wait_ready(serve.admin, 200).await;
    let resp = client.certify(serve.request()).await.unwrap().into_inner();
    let after = sha256_hex(&resp.leaf_certificate);
    serve.assert_alive();
    serve.stop().await;

    assert!(issued_fingerprints(&log).contains(&after), "issued after rotation without a record");
    let new = verify_file(&log).unwrap();
    assert_eq!(new.continues.as_ref().map(|c| c.previous_file.as_str()), Some("renamed"), "{new:?}");
    assert_eq!(new.gaps, 1, "{new:?}");
    assert_eq!(old.refused + new.refused, refused, "every refusal is counted in a gap: {old:?} {new:?}");
    for file in [&rotated, &log] {
        let (code, stderr) = audit_verify(file);
        assert_eq!(code, Some(0), "{}: {stderr}", file.display());
    }
    let gap = std::fs::read_to_string(&log).unwrap();
    assert!(gap.contains("os error 27"), "the gap names EFBIG:\n{gap}");
}
