//! The real `meshca` binary as a child process, for the tests that need what only
//! a process has (signals, resource limits, namespaces, its own log output, another
//! platform's build). This module owns reading a child's stderr line by line
//! ([`StderrLines`]: a thread and a channel, every line kept for panic messages), a
//! child killed on drop ([`Process`]), and `meshca serve --dev` started through a
//! `sh -c` wrapper with its addresses taken from the dev-mode banner and `/ready`
//! awaited ([`ServeBin`]). [`command`] starts a program without the caller's
//! `MESHCA_*` settings ([`meshca`]: the binary under test, started that way), [`output`] runs one
//! to completion within a deadline, and [`serve_with_jwks`] gives `meshca serve` a
//! CA and a JWKS file ([`jwks_file`]). Talking to an admin listener is
//! [`super::http_get`].

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use meshca::agent::client::{self, KeyType};
use meshca::auth::dev::{DevSigner, TokenClaims};
use meshca::ca::issuer::TrustAnchors;
use meshca::clock::{Clock, SystemClock};
use meshca::config::{DEFAULT_AUDIENCE, DEV_TOKEN_ISSUER};
use meshca::identity::Naming;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use tonic::transport::Channel;

use super::{wait_ready, SERVER_NAME};

/// The binary under test: the `meshca` cargo built for this test run, in the target
/// directory the test binary runs from (`target/<profile>/deps/<test>-<hash>` beside
/// `target/<profile>/meshca`). Cargo builds it before any integration test of the
/// main package runs.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let test = std::env::current_exe().expect("the test binary's path");
        let dir = test.parent().and_then(Path::parent).expect("the test binary is in target/<profile>/deps");
        let bin = dir.join(format!("meshca{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "{} is missing: run the tests with cargo test", bin.display());
        bin.into_os_string().into_string().expect("a UTF-8 target directory")
    })
}
/// Bound on waits that only a broken implementation would reach.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `program` with no `MESHCA_*` variables inherited from the caller's environment,
/// so that only what a test sets configures meshca.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHCA_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The binary under test ([`command`]), with `NO_COLOR` and stdin from /dev/null.
pub fn meshca() -> Command {
    let mut cmd = command(bin());
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion, stdin from /dev/null and stdout and stderr captured;
/// kills it and panics after `timeout`.
pub fn output(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let child = child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id().to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

/// Writes the JWKS of a fresh development key to `dir/jwks.json`.
pub fn jwks_file(dir: &Path) -> PathBuf {
    let (signer, _) = DevSigner::generate().expect("dev signer");
    let path = dir.join("jwks.json");
    std::fs::write(&path, signer.jwks_json()).unwrap();
    path
}

/// Adds `serve` with the trust anchors `anchors` and the issuer in `issuer_dir`
/// (as `meshca init` writes them, with the audit signing key beside the anchors),
/// tokens checked against the JWKS file `jwks` for the issuer
/// `https://issuer.example`, and both listeners on ephemeral loopback ports.
pub fn serve_with_jwks<'a>(
    cmd: &'a mut Command,
    anchors: &Path,
    issuer_dir: &Path,
    jwks: &Path,
) -> &'a mut Command {
    cmd.arg("serve")
        .arg("--trust-anchors")
        .arg(anchors)
        .arg("--issuer-dir")
        .arg(issuer_dir)
        .args(["--token-validation", "jwks", "--jwks-file"])
        .arg(jwks)
        .args(["--token-issuer", "https://issuer.example"])
        .arg("--audit-signing-key")
        .arg(anchors.with_file_name("audit-signing.key"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
}

/// A child's stderr, read line by line on a thread; every line read is kept in
/// `seen`.
pub struct StderrLines {
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl StderrLines {
    /// Takes the child's piped stderr and reads it on a thread of its own.
    pub fn of(child: &mut Child) -> StderrLines {
        let pipe = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        StderrLines { lines, seen: Vec::new() }
    }

    /// Reads until a line contains `needle` and returns that line; panics with
    /// everything seen when `deadline` passes or stderr closes first.
    pub fn wait_for(&mut self, needle: &str, deadline: Instant) -> String {
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e:?}); stderr so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Reads until stderr closes: false when `deadline` came first.
    pub fn read_to_end(&mut self, deadline: Instant) -> bool {
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Everything read so far and whatever has arrived since, one line each.
    pub fn text(&mut self) -> String {
        let rest: Vec<String> = self.lines.try_iter().collect();
        self.seen.extend(rest);
        self.seen.join("\n")
    }
}

/// A child process whose stderr is read line by line; killed on drop.
pub struct Process {
    pub child: Child,
    pub stderr: StderrLines,
}

impl Process {
    /// Spawns `cmd` with stdin and stdout null and stderr read by [`StderrLines`].
    pub fn spawn(cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = StderrLines::of(&mut child);
        Process { child, stderr }
    }

    /// Sends `signal` (`kill -s SIGNAL PID`); whether `kill` succeeded.
    pub fn signal(&self, signal: &str) -> bool {
        let sent = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status();
        sent.expect("run kill").success()
    }

    /// Sends `signal`, then waits for stderr to close and the process to exit;
    /// panics after `timeout`.
    pub fn stop(&mut self, signal: &str, timeout: Duration) -> ExitStatus {
        assert!(self.signal(signal), "kill -s {signal} failed");
        if !self.stderr.read_to_end(Instant::now() + timeout) {
            panic!("no exit after SIG{signal}:\n{}", self.stderr.seen.join("\n"));
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `meshca serve --dev` on loopback ports, started through
/// `sh -c WRAPPER`; SIGKILLed on drop.
pub struct ServeBin {
    pub process: Process,
    /// The `--data-dir`: the dev CA, `dev-token.key`, `audit.jsonl`.
    pub data: PathBuf,
    /// The gRPC URL from the banner (`https://127.0.0.1:PORT`).
    pub grpc: String,
    pub admin: SocketAddr,
}

impl ServeBin {
    /// Runs `PREFIX... sh -c WRAPPER sh BIN serve --dev --data-dir DATA
    /// --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 EXTRA...`, without the
    /// caller's `MESHCA_*` settings and with `NO_COLOR`: `wrapper` must end in
    /// `exec "$@"` (e.g. `ulimit -f 32 && exec "$@"`); `prefix` runs the wrapper
    /// shell (e.g. `unshare -m`, or nothing). Reads the addresses from the dev-mode
    /// banner and waits for `/ready` to answer 200.
    pub async fn start(prefix: &[&str], wrapper: &str, data: &Path, extra: &[&str]) -> ServeBin {
        let mut process = Self::spawn(prefix, wrapper, data, ("127.0.0.1:0", "127.0.0.1:0"), extra);
        let first = process.stderr.wait_for("meshca dev mode:", Instant::now() + PATIENCE);
        let after = |from: &str, to: &str| {
            let rest = &first[first.find(from).unwrap() + from.len()..];
            rest[..rest.find(to).unwrap_or(rest.len())].to_owned()
        };
        let grpc = after("gRPC on ", ",");
        let admin = after("admin on http://", "\n").trim().parse().unwrap();
        wait_ready(admin, 200).await;
        ServeBin { process, data: data.to_owned(), grpc, admin }
    }

    /// As [`ServeBin::start`], for a wrapper that sends meshca's stderr elsewhere (e.g.
    /// `exec "$@" 2>/dev/full`): the ports are picked here, not read from the banner.
    pub async fn start_quiet(prefix: &[&str], wrapper: &str, data: &Path, extra: &[&str]) -> ServeBin {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (grpc, admin) = (free(), free());
        let mut process = Self::spawn(prefix, wrapper, data, (&grpc.to_string(), &admin.to_string()), extra);
        // No banner to wait for: poll until the admin listener accepts.
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("meshca exited with {status} before listening");
            }
            assert!(Instant::now() < deadline, "meshca did not listen on {admin}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wait_ready(admin, 200).await;
        ServeBin { process, data: data.to_owned(), grpc: format!("https://{grpc}"), admin }
    }

    /// `PREFIX... sh -c WRAPPER sh BIN serve --dev --data-dir DATA --listen GRPC
    /// --admin-listen ADMIN EXTRA...`, started.
    fn spawn(
        prefix: &[&str],
        wrapper: &str,
        data: &Path,
        (grpc, admin): (&str, &str),
        extra: &[&str],
    ) -> Process {
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend(["sh", "-c", wrapper, "sh", bin(), "serve", "--dev", "--data-dir"]);
        argv.push(data.to_str().unwrap());
        argv.extend(["--listen", grpc, "--admin-listen", admin]);
        argv.extend(extra);
        let mut cmd = command(argv[0]);
        cmd.args(&argv[1..]).env("NO_COLOR", "1");
        Process::spawn(&mut cmd)
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// SIGTERM; the process must exit 0. (Async: the runtime must keep serving
    /// the test's client connections, which a graceful shutdown waits for.)
    pub async fn stop(&mut self) {
        assert!(self.process.signal("TERM"), "kill -s TERM failed");
        let status = self.wait_exit().await;
        assert!(status.success(), "meshca exited with {status}:\n{}", self.process.stderr.text());
    }

    /// Waits for the process to exit; panics after [`PATIENCE`].
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.process.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "meshca did not exit; stderr:\n{}",
                self.process.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A Certify client verifying the server against the data directory's anchors.
    pub async fn client(&self) -> IdentityClient<Channel> {
        let anchors = TrustAnchors::load(&self.data.join("trust-anchors.pem")).unwrap();
        IdentityClient::new(client::connect(&self.grpc, &anchors, SERVER_NAME).await.unwrap())
    }

    /// A request for `sa` in `default` with a dev token and a fresh P-256 key.
    pub fn request(&self, sa: &str) -> CertifyRequest {
        let pem = std::fs::read_to_string(self.data.join("dev-token.key")).unwrap();
        let signer = DevSigner::from_pem(&pem).unwrap();
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let identity = naming.identity("default", sa).unwrap().dns_name;
        let (_key, csr) = client::make_csr(&identity, KeyType::P256).unwrap();
        let now = SystemClock.now();
        let claims = TokenClaims::projected(
            DEV_TOKEN_ISSUER,
            DEFAULT_AUDIENCE,
            "default",
            sa,
            now,
            Duration::from_secs(3600),
        );
        let token = signer.sign(&claims).unwrap().into_bytes();
        CertifyRequest { identity, token, certificate_signing_request: csr }
    }
}
