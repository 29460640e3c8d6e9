//! What a newcomer meets first: the dev-mode banner and the commands it prints, a
//! second `serve` started on a data directory already in use, start-up errors that
//! name the flag to fix, one-line connection errors from `certify` that point at
//! `meshca doctor`, bootstrap tokens (spent, or sent to a server that does not accept
//! them) as `certify` and `doctor` explain them, and the small things met on the way:
//! help defaults, `MESHCA_*` variables, colours in a pipe, the start-up log,
//! `--log-format json`, `doctor` without settings or with the agent's config file,
//! `--on-renew` failures and the agent's shutdown line.
//!
//! Every test runs the real `meshca` binary as a child process: servers listen on
//! ephemeral loopback ports, their addresses are read from the dev-mode banner or
//! the start-up log, and nothing waits on a timer, only on log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use meshca_test_support as support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Instant;

use support::process::{bin, command, jwks_file, meshca, output, serve_with_jwks, Process, PATIENCE};

/// The identity of service account `web` in namespace `default`, default naming.
const WEB: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
const LOOPBACK: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
/// The start-up line logged once the gRPC listener serves.
const SERVING: &str = "serving gRPC over TLS";
/// Calls made with `http://` to the TLS port, for each way the race between the
/// server's TLS alert and the call can fall (each about a third of the time).
const HTTP_ROUNDS: usize = 12;

// ---------------------------------------------------------------------------
// Running the binary and reading what it says
// ---------------------------------------------------------------------------

fn run(args: &[&str]) -> Output {
    output(meshca().args(args), PATIENCE)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: stdout:\n{}\nstderr:\n{}", stdout(out), stderr(out));
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The one `meshca: …` line of a failed command's stderr.
fn error_line(out: &Output) -> String {
    let err = stderr(out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("meshca:")).collect();
    assert_eq!(errors.len(), 1, "one `meshca:` line expected in:\n{err}");
    errors[0].to_owned()
}

/// The first run of `n` words that appears twice in `line`.
fn repeated_phrase(line: &str, n: usize) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut seen = HashSet::new();
    words.windows(n).map(|w| w.join(" ")).find(|phrase| !seen.insert(phrase.clone()))
}

/// A failed connection as `certify` reports it: exit 1, stderr exactly one line
/// starting with `meshca:`, no phrase said twice, and the way on to `meshca
/// doctor`. Returns the line.
fn assert_one_line_connection_error(out: &Output, what: &str) -> String {
    assert_exit(out, 1, what);
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line on stderr:\n{err}");
    let line = lines[0];
    assert!(line.starts_with("meshca:"), "{what}: {line}");
    assert_eq!(repeated_phrase(line, 4), None, "{what}: a phrase is repeated in: {line}");
    assert!(line.contains("meshca doctor"), "{what}: no way on to `meshca doctor`: {line}");
    line.to_owned()
}

/// `meshca init --dir DIR`: a trust anchor and an issuer.
fn init_ca(dir: &Path) {
    assert_exit(&run(&["init", "--dir", p(dir)]), 0, "init");
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on an HTTP/1.1 listener: the status code.
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

/// The text of `line` after `from` and before `to` (or its end).
fn between(line: &str, from: &str, to: &str) -> String {
    let start = line.find(from).unwrap_or_else(|| panic!("{from:?} in {line}")) + from.len();
    let rest = &line[start..];
    rest[..rest.find(to).unwrap_or(rest.len())].to_owned()
}

/// The address in a start-up log line's `addr=` field.
fn logged_addr(line: &str) -> SocketAddr {
    let field = between(line, "addr=", " ");
    let plain = field.trim_start_matches("Some(").trim_end_matches(')');
    plain.parse().unwrap_or_else(|e| panic!("addr {field:?} in {line}: {e}"))
}

// ---------------------------------------------------------------------------
// Doctor's findings
// ---------------------------------------------------------------------------

/// `meshca doctor --json ARGS`: the exit code and the findings.
fn doctor_json(args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>) {
    let out = output(meshca().arg("doctor").arg("--json").args(args), PATIENCE);
    let text = stdout(&out);
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("doctor --json prints a JSON array ({e}):\n{text}\nstderr:\n{}", stderr(&out))
    });
    (out.status.code(), findings)
}

/// The finding of `check`.
fn finding<'a>(findings: &'a [serde_json::Value], check: &str) -> &'a serde_json::Value {
    findings
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
}

/// A finding's `found` and `fix`, as one text.
fn said(finding: &serde_json::Value) -> String {
    format!("{} / {}", finding["found"].as_str().unwrap_or(""), finding["fix"].as_str().unwrap_or(""))
}

// ---------------------------------------------------------------------------
// A running server
// ---------------------------------------------------------------------------

/// A running `meshca serve`, killed on drop; its stderr is read line by line.
struct Server {
    process: Process,
    /// The data directory (dev mode) or the CA directory of `meshca init`.
    dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    grpc: String,
    /// The admin listener, when meshca said where it is.
    admin: Option<SocketAddr>,
}

impl Server {
    /// `serve --dev --data-dir DIR` on ephemeral loopback ports.
    fn dev(dir: &Path) -> Server {
        let mut cmd = meshca();
        cmd.args(["serve", "--dev", "--data-dir", p(dir)]).args(LOOPBACK);
        Server::dev_from(cmd, dir)
    }

    /// Starts `cmd`, a dev-mode `serve` with data directory `dir`: the addresses
    /// come from the banner; returns once gRPC is served.
    fn dev_from(mut cmd: Command, dir: &Path) -> Server {
        let mut process = Process::spawn(&mut cmd);
        let banner = process.stderr.wait_for("meshca dev mode:", Instant::now() + PATIENCE);
        let grpc = between(&banner, "gRPC on ", ",");
        let admin =
            between(&banner, "admin on http://", " ").trim().parse().expect("admin address in the banner");
        let mut server = Server { process, dir: dir.to_owned(), grpc, admin: Some(admin) };
        server.wait_for(SERVING);
        server
    }

    /// `serve` (not dev) with the CA `meshca init` wrote in `ca`, tokens checked
    /// against `jwks`, on ephemeral loopback ports, and `extra` flags; the gRPC
    /// address comes from the start-up log.
    fn jwks(ca: &Path, jwks: &Path, extra: &[&str]) -> Server {
        let mut cmd = meshca();
        serve_with_jwks(&mut cmd, &ca.join("trust-anchors.pem"), &ca.join("issuer"), jwks).args(extra);
        let mut process = Process::spawn(&mut cmd);
        let serving = process.stderr.wait_for(SERVING, Instant::now() + PATIENCE);
        let grpc = format!("https://{}", logged_addr(&serving));
        let admin = process.stderr.seen.iter().find(|l| l.contains("/metrics")).map(|l| logged_addr(l));
        Server { process, dir: ca.to_owned(), grpc, admin }
    }

    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    fn wait_for(&mut self, needle: &str) -> String {
        self.process.stderr.wait_for(needle, Instant::now() + PATIENCE)
    }

    /// Every stderr line read so far.
    fn seen(&self) -> &[String] {
        &self.process.stderr.seen
    }

    /// The line read so far that contains `needle`.
    fn seen_line(&self, needle: &str) -> String {
        let line = self.seen().iter().find(|l| l.contains(needle));
        line.unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", self.seen().join("\n"))).clone()
    }

    /// SIGTERM; waits for stderr to close and the process to exit.
    fn stop(&mut self) -> ExitStatus {
        self.process.stop("TERM", PATIENCE)
    }

    fn anchors(&self) -> PathBuf {
        self.dir.join("trust-anchors.pem")
    }

    /// A `meshca dev-token` for `sa` in `default`, written to `file`.
    fn dev_token(&self, sa: &str, file: &Path) -> PathBuf {
        let mut cmd = meshca();
        cmd.args([
            "dev-token",
            "--data-dir",
            p(&self.dir),
            "--namespace",
            "default",
            "--service-account",
            sa,
        ]);
        let out = output(&mut cmd, PATIENCE);
        assert_exit(&out, 0, "dev-token");
        std::fs::write(file, stdout(&out).trim_end()).unwrap();
        file.to_owned()
    }

    /// `certify` against this server with its trust anchors, without `--out`.
    fn certify_cmd(&self, token: &Path, identity: &str) -> Command {
        let mut cmd = meshca();
        cmd.args(["certify", "--addr", &self.grpc, "--trust-anchors", p(&self.anchors())]);
        cmd.args(["--token-file", p(token), "--identity", identity]);
        cmd
    }

    fn certify(&self, token: &Path, identity: &str, out: &Path) -> Output {
        output(self.certify_cmd(token, identity).args(["--out", p(out)]), PATIENCE)
    }

    /// The flags `doctor` needs to check what `certify` with `token` would do.
    fn doctor_flags<'a>(&'a self, anchors: &'a Path, token: &'a Path) -> Vec<&'a str> {
        vec!["--addr", &self.grpc, "--trust-anchors", p(anchors), "--token-file", p(token), "--identity", WEB]
    }
}

/// `meshca bootstrap-token create --identity WEB ARGS` with `env`: the token is
/// written to `file`; returns what the command said on stderr.
fn bootstrap_token(args: &[&str], env: &[(&str, &str)], file: &Path) -> String {
    let mut cmd = meshca();
    cmd.args(["bootstrap-token", "create", "--identity", WEB]).args(args).envs(env.iter().copied());
    let out = output(&mut cmd, PATIENCE);
    assert_exit(&out, 0, "bootstrap-token create");
    let token = stdout(&out);
    assert_eq!(token.lines().count(), 1, "stdout is the token alone: {token:?}");
    std::fs::write(file, token.trim_end()).unwrap();
    stderr(&out)
}

// ---------------------------------------------------------------------------
// 1. A spent bootstrap token
// ---------------------------------------------------------------------------

#[test]
fn a_spent_bootstrap_token_is_reported_by_doctor_as_used() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = tmp.path().join("bootstrap.token");
    bootstrap_token(&["--dev", "--data-dir", p(&server.dir)], &[], &token);
    assert_exit(&server.certify(&token, WEB, &tmp.path().join("out")), 0, "certify spends the token");

    let anchors = server.anchors();
    let flags = server.doctor_flags(&anchors, &token);
    let out = output(meshca().arg("doctor").args(&flags), PATIENCE);
    assert_exit(&out, 1, "doctor with a spent token");
    let report = stdout(&out);
    let line =
        report.lines().find(|l| l.contains(" token: ")).unwrap_or_else(|| panic!("no token line:\n{report}"));
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("bootstrap_token_used"), "{line}");
    assert!(!line.contains("meshca would issue"), "{line}");

    let (code, findings) = doctor_json(&flags);
    assert_eq!(code, Some(1), "{findings:#?}");
    let token = finding(&findings, "token");
    assert_eq!(token["status"], "FAIL", "{token}");
    assert!(said(token).contains("bootstrap_token_used"), "{token}");
}

// ---------------------------------------------------------------------------
// 2. Bootstrap tokens and a server that does not accept them
// ---------------------------------------------------------------------------

#[test]
fn a_bootstrap_token_sent_to_a_server_without_bootstrap_tokens_is_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let server = Server::jwks(&ca, &jwks_file(tmp.path()), &[]);
    let token = tmp.path().join("bootstrap.token");
    let (anchors, issuer) = (server.anchors(), ca.join("issuer"));
    bootstrap_token(&["--trust-anchors", p(&anchors), "--issuer-dir", p(&issuer)], &[], &token);

    let refused = server.certify(&token, WEB, &tmp.path().join("out"));
    assert_exit(&refused, 1, "certify with a bootstrap token");
    let line = error_line(&refused);
    assert!(line.contains("does not accept bootstrap tokens"), "{line}");
    assert!(line.contains("--bootstrap-tokens"), "{line}");
    assert!(!line.contains("malformed"), "{line}");

    let (code, findings) = doctor_json(&server.doctor_flags(&anchors, &token));
    assert_eq!(code, Some(1), "{findings:#?}");
    let token = finding(&findings, "token");
    assert_eq!(token["status"], "FAIL", "{token}");
    assert!(token["found"].as_str().unwrap().contains("bootstrap_tokens_disabled"), "{token}");
    let fix = token["fix"].as_str().unwrap();
    assert!(fix.contains("--bootstrap-tokens"), "{fix}");
    assert!(!fix.contains("create a new one"), "{fix}");
}

#[test]
fn bootstrap_token_create_warns_unless_the_server_is_known_to_accept_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let token = tmp.path().join("bootstrap.token");
    let (anchors, issuer) = (ca.join("trust-anchors.pem"), ca.join("issuer"));
    let config = |name: &str, extra: &str| {
        let file = tmp.path().join(name);
        let text = format!("trust-anchors = {:?}\nissuer-dir = {:?}\n{extra}", p(&anchors), p(&issuer));
        std::fs::write(&file, text).unwrap();
        file
    };

    let off = config("off.toml", "");
    let said = bootstrap_token(&["--config", p(&off)], &[], &token);
    assert!(said.contains("warning:") && said.contains("--bootstrap-tokens"), "config without them:\n{said}");

    let on = config("on.toml", "bootstrap-tokens = true\n");
    let said = bootstrap_token(&["--config", p(&on)], &[], &token);
    assert!(!said.contains("warning:") && !said.contains("note:"), "config with them:\n{said}");

    let flags = ["--trust-anchors", p(&anchors), "--issuer-dir", p(&issuer)];
    let said = bootstrap_token(&flags, &[("MESHCA_BOOTSTRAP_TOKENS", "false")], &token);
    assert!(said.contains("warning:"), "MESHCA_BOOTSTRAP_TOKENS=false:\n{said}");

    let said = bootstrap_token(&flags, &[], &token);
    assert!(!said.contains("warning:"), "nothing known about the server:\n{said}");
    let note = said.lines().find(|l| l.starts_with("note:")).unwrap_or_else(|| panic!("no note:\n{said}"));
    assert!(note.contains("--bootstrap-tokens"), "{note}");

    let data = tmp.path().join("data");
    let _server = Server::dev(&data);
    let said = bootstrap_token(&["--dev", "--data-dir", p(&data)], &[], &token);
    assert!(!said.contains("warning:") && !said.contains("note:"), "--dev:\n{said}");
}

// ---------------------------------------------------------------------------
// 3. Two servers on one audit log
// ---------------------------------------------------------------------------

/// Runs a second `serve` on an audit log in use until it exits. A second server
/// that opens the log instead fails the test at once, not after [`PATIENCE`]: both
/// name the audit log first, in their refusal or in the "audit log opened" line.
fn second_server(cmd: &mut Command) -> Output {
    let mut process = Process::spawn(cmd);
    let first = process.stderr.wait_for("audit log", Instant::now() + PATIENCE);
    assert!(first.starts_with("meshca:"), "a second server opened the audit log:\n{}", process.stderr.text());
    assert!(process.stderr.read_to_end(Instant::now() + PATIENCE), "no exit:\n{}", process.stderr.text());
    let status = process.child.wait().unwrap();
    Output { status, stdout: Vec::new(), stderr: process.stderr.text().into_bytes() }
}

/// A `serve` refused because the audit log is in use: exit 1 and one line naming
/// the log, the lock file and the pid of the process that holds them.
fn assert_refused_as_in_use(out: &Output, audit_log: &Path, holder: u32) {
    assert_exit(out, 1, "a second serve on the same audit log");
    let line = error_line(out);
    assert!(line.contains(p(audit_log)), "names the audit log: {line}");
    assert!(line.contains("in use"), "{line}");
    assert!(line.contains(&format!("pid {holder}")), "names the holder, pid {holder}: {line}");
    let lock = format!("{}.lock", p(audit_log));
    assert!(line.contains(&lock), "names the lock file {lock}: {line}");
}

#[test]
fn a_second_dev_server_on_a_data_dir_in_use_exits_naming_the_first_and_leaves_it_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut first = Server::dev(&data);
    let second = second_server(meshca().args(["serve", "--dev", "--data-dir", p(&data)]).args(LOOPBACK));
    assert_refused_as_in_use(&second, &data.join("audit.jsonl"), first.pid());

    let token = first.dev_token("web", &tmp.path().join("web.token"));
    assert_exit(&first.certify(&token, WEB, &tmp.path().join("out")), 0, "certify against the first");
    assert!(first.stop().success(), "{}", first.seen().join("\n"));

    let mut third = Server::dev(&data);
    assert_exit(&third.certify(&token, WEB, &tmp.path().join("out3")), 0, "certify once the first is gone");
    assert!(third.stop().success(), "{}", third.seen().join("\n"));
}

#[test]
fn a_second_server_on_an_audit_log_in_use_exits_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let jwks = jwks_file(tmp.path());
    let log = tmp.path().join("logs/audit.jsonl");
    let first = Server::jwks(&ca, &jwks, &["--audit-log", p(&log)]);
    let mut cmd = meshca();
    serve_with_jwks(&mut cmd, &ca.join("trust-anchors.pem"), &ca.join("issuer"), &jwks);
    let second = second_server(cmd.args(["--audit-log", p(&log)]));
    assert_refused_as_in_use(&second, &log, first.pid());
}

// ---------------------------------------------------------------------------
// 4. Connection errors from certify, and doctor on the wrong scheme
// ---------------------------------------------------------------------------

#[test]
fn certify_with_another_cas_trust_anchors_says_to_fix_trust_anchors_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let other = tmp.path().join("other");
    init_ca(&other);
    let mut cmd = meshca();
    cmd.args(["certify", "--addr", &server.grpc, "--trust-anchors", p(&other.join("trust-anchors.pem"))]);
    let out = output(
        cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&tmp.path().join("out"))]),
        PATIENCE,
    );
    let line = assert_one_line_connection_error(&out, "another CA's anchors");
    assert!(line.contains("--trust-anchors"), "{line}");
}

#[test]
fn certify_against_the_admin_port_says_it_does_not_speak_tls_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let admin = format!("https://{}", server.admin.unwrap());
    let mut cmd = meshca();
    cmd.args(["certify", "--addr", &admin, "--trust-anchors", p(&server.anchors())]);
    let out = output(
        cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&tmp.path().join("out"))]),
        PATIENCE,
    );
    let line = assert_one_line_connection_error(&out, "the admin port");
    assert!(line.contains("does not speak TLS"), "{line}");
    assert!(line.contains("admin port"), "{line}");
}

/// `meshca COMMAND…` for web against a loopback port nothing listens on, with a CA
/// of its own under `dir`; returns the command and the address it dials.
fn to_a_closed_port(dir: &Path, command: &[&str]) -> (Command, String) {
    let ca = dir.join("ca");
    if !ca.exists() {
        init_ca(&ca);
    }
    let token = dir.join("web.token");
    std::fs::write(&token, "a.b.c").unwrap();
    let addr = format!("https://127.0.0.1:{}", free_port());
    let mut cmd = meshca();
    cmd.args(command).args(["--addr", &addr, "--trust-anchors", p(&ca.join("trust-anchors.pem"))]);
    cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&dir.join("out"))]);
    (cmd, addr)
}

#[test]
fn certify_and_agent_to_a_port_nothing_listens_on_say_so_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for command in [&["certify"][..], &["agent", "--once"]] {
        let (mut cmd, _) = to_a_closed_port(tmp.path(), command);
        let out = output(&mut cmd, PATIENCE);
        let line = assert_one_line_connection_error(&out, &format!("{command:?} to a closed port"));
        assert!(line.contains("nothing listens"), "{line}");
    }
}

#[test]
fn a_running_agent_that_cannot_connect_logs_one_line_a_round_and_names_doctor_on_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cmd, addr) = to_a_closed_port(tmp.path(), &["agent"]);
    let mut agent = Process::spawn(&mut cmd);
    let deadline = Instant::now() + PATIENCE;
    let first = agent.stderr.wait_for("no certificate yet", deadline);
    let second = agent.stderr.wait_for("no certificate yet", deadline);
    agent.stop("TERM", PATIENCE);
    for line in [&first, &second] {
        assert!(line.contains("nothing listens"), "{line}");
        assert_eq!(repeated_phrase(line, 4), None, "a phrase is repeated in: {line}");
    }
    assert!(first.contains(&format!("doctor --addr {addr}")), "the first failure names doctor: {first}");
    assert!(!second.contains("doctor"), "once a streak: {second}");
}

#[test]
fn certify_with_http_to_the_tls_port_says_to_use_https_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let http = server.grpc.replacen("https://", "http://", 1);
    // The server's TLS alert races the call (an HTTP/2 error, a call cancelled, a
    // broken pipe): however it falls, the line is the same.
    for round in 0..HTTP_ROUNDS {
        let mut cmd = meshca();
        cmd.args(["certify", "--addr", &http, "--trust-anchors", p(&server.anchors())]);
        let out = output(
            cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&tmp.path().join("out"))]),
            PATIENCE,
        );
        let line = assert_one_line_connection_error(&out, &format!("http:// to the TLS port, round {round}"));
        assert!(line.contains("meshca serves TLS there; use https://"), "round {round}: {line}");
    }
}

#[test]
fn doctor_with_http_to_the_tls_port_fails_tls_and_blames_neither_the_clock_nor_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let http = server.grpc.replacen("https://", "http://", 1);
    let anchors = server.anchors();
    let mut flags = server.doctor_flags(&anchors, &token);
    flags[1] = &http;
    let clock_blame =
        ["x-meshca-time", "compare clocks", "sync this host's clock", "check this host's clock"];
    for round in 0..HTTP_ROUNDS {
        let (code, findings) = doctor_json(&flags);
        assert_eq!(code, Some(1), "round {round}: {findings:#?}");
        let tls = finding(&findings, "tls");
        assert_eq!(tls["status"], "FAIL", "round {round}: {tls}");
        assert!(said(tls).contains("use https://"), "round {round}: {tls}");
        for f in &findings {
            let text = said(f);
            assert!(!clock_blame.iter().any(|b| text.contains(b)), "round {round}: blames the clock: {f}");
            assert!(
                !text.contains("request id"),
                "round {round}: a request id, but meshca never answered: {f}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 5. The dev-mode banner's commands
// ---------------------------------------------------------------------------

#[test]
fn the_dev_banner_commands_get_a_certificate_in_another_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = meshca();
    cmd.args(["serve", "--dev", "--trust-domain", "example.org", "--data-dir", p(&data)]).args(LOOPBACK);
    // The banner comes before gRPC is served: every line of it has been read.
    let server = Server::dev_from(cmd, &data);
    let dev_token = server.seen_line(" dev-token --data-dir ").trim().to_owned();
    let certify_first = server.seen_line(" certify --addr ").trim().to_owned();
    let certify_rest = server.seen_line("--out /tmp/web").trim().to_owned();
    for line in [&dev_token, &certify_first] {
        let program = line.split_whitespace().next().unwrap();
        assert!(
            program == bin() || program == format!("'{}'", bin()),
            "starts with the binary as run, {}: {line}",
            bin()
        );
    }
    let identity = "web.default.serviceaccount.identity.meshca-system.example.org";
    assert!(certify_rest.contains(&format!("--identity {identity}")), "{certify_rest}");

    // Exactly those commands, with temporary paths for /tmp/web.token and /tmp/web.
    let (token, out) = (tmp.path().join("web.token"), tmp.path().join("web"));
    let retarget = |cmd: &str| {
        cmd.replace("/tmp/web.token", p(&token)).replace("--out /tmp/web", &format!("--out {}", p(&out)))
    };
    let shell = |script: String| {
        let mut sh = command("sh");
        sh.env("NO_COLOR", "1").args(["-c", &script]);
        output(&mut sh, PATIENCE)
    };
    assert_exit(&shell(retarget(&dev_token)), 0, &dev_token);
    let certify = retarget(&format!("{}\n{certify_rest}", certify_first));
    let got = shell(certify.clone());
    assert_exit(&got, 0, &certify);
    let chain = std::fs::read(out.join("tls.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&chain).expect("PEM leaf");
    let leaf = pem.parse_x509().expect("X.509 leaf");
    let san = leaf.subject_alternative_name().unwrap().expect("a SAN").value;
    let names = format!("{:?}", san.general_names);
    assert!(names.contains(identity), "{names}");
}

// ---------------------------------------------------------------------------
// 6. serve's start-up errors name the flag
// ---------------------------------------------------------------------------

/// `serve` with the CA files given, tokens checked against `jwks`, on `listen` and
/// `admin_listen`.
fn serve_cmd(anchors: &Path, issuer: &Path, jwks: &Path, listen: &str, admin_listen: &str) -> Command {
    let mut cmd = meshca();
    cmd.args(["serve", "--trust-anchors", p(anchors), "--issuer-dir", p(issuer)]);
    cmd.args([
        "--token-validation",
        "jwks",
        "--jwks-file",
        p(jwks),
        "--token-issuer",
        "https://issuer.example",
    ]);
    cmd.args(["--listen", listen, "--admin-listen", admin_listen]);
    cmd
}

#[test]
fn serve_with_a_missing_trust_anchors_file_names_the_flag_and_the_path_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let missing = tmp.path().join("no-such-anchors.pem");
    let jwks = jwks_file(tmp.path());
    let out =
        output(&mut serve_cmd(&missing, &ca.join("issuer"), &jwks, "127.0.0.1:0", "127.0.0.1:0"), PATIENCE);
    assert_exit(&out, 2, "serve with a missing --trust-anchors file");
    let line = error_line(&out);
    assert!(line.contains("--trust-anchors") && line.contains(p(&missing)), "{line}");
}

#[test]
fn serve_with_an_issuer_of_another_ca_names_both_flags_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init_ca(&a);
    init_ca(&b);
    let jwks = jwks_file(tmp.path());
    let mut cmd = meshca();
    let out =
        output(serve_with_jwks(&mut cmd, &a.join("trust-anchors.pem"), &b.join("issuer"), &jwks), PATIENCE);
    assert_exit(&out, 2, "serve with another CA's issuer");
    let line = error_line(&out);
    assert!(line.contains("--issuer-dir") && line.contains("--trust-anchors"), "{line}");
}

#[test]
fn serve_on_a_port_in_use_names_the_listen_flag_that_chose_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let jwks = jwks_file(tmp.path());
    let (anchors, issuer) = (ca.join("trust-anchors.pem"), ca.join("issuer"));
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();

    let grpc = output(&mut serve_cmd(&anchors, &issuer, &jwks, &taken, "127.0.0.1:0"), PATIENCE);
    assert_exit(&grpc, 1, "--listen on a port in use");
    let line = error_line(&grpc);
    assert!(line.contains(&format!("--listen {taken}")), "{line}");
    assert!(!line.contains("--admin-listen"), "blames the other listener: {line}");

    let admin = output(&mut serve_cmd(&anchors, &issuer, &jwks, "127.0.0.1:0", &taken), PATIENCE);
    assert_exit(&admin, 1, "--admin-listen on a port in use");
    let line = error_line(&admin);
    assert!(line.contains(&format!("--admin-listen {taken}")), "{line}");
    drop(held);
}

// ---------------------------------------------------------------------------
// 7. The wrong identity
// ---------------------------------------------------------------------------

#[test]
fn certify_for_the_wrong_identity_names_the_identity_the_token_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let out = server.certify(&token, "web", &tmp.path().join("out"));
    assert_exit(&out, 1, "certify --identity web");
    let line = error_line(&out);
    assert!(line.contains(WEB), "names {WEB}: {line}");
}

// ---------------------------------------------------------------------------
// 8. Nits
// ---------------------------------------------------------------------------

#[test]
fn help_shows_each_default_once() {
    let count = |args: &[&str], needle: &str| {
        let out = run(args);
        assert_exit(&out, 0, &args.join(" "));
        stdout(&out).matches(needle).count()
    };
    assert_eq!(count(&["dev-token", "--help"], "[default: identity.l5d.io]"), 1, "dev-token --help");
    assert_eq!(count(&["init", "--help"], "[default: cluster.local]"), 1, "init --help");
    assert_eq!(count(&["init", "--help"], "[default: meshca-system]"), 1, "init --help");
}

#[test]
fn meshca_dev_set_to_1_yes_or_on_starts_dev_mode() {
    for value in ["1", "yes", "on"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut cmd = meshca();
        cmd.args(["serve", "--data-dir", p(&data)]).args(LOOPBACK).env("MESHCA_DEV", value);
        let mut server = Server::dev_from(cmd, &data);
        assert!(server.stop().success(), "MESHCA_DEV={value}:\n{}", server.seen().join("\n"));
    }
}

#[test]
fn meshca_out_gives_certify_its_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let out = tmp.path().join("from-env");
    let got = output(server.certify_cmd(&token, WEB).env("MESHCA_OUT", &out), PATIENCE);
    assert_exit(&got, 0, "certify with MESHCA_OUT and no --out");
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(out.join(name).is_file(), "{name} in {}", out.display());
    }
}

#[test]
fn serve_dev_writes_no_colour_codes_into_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = command(bin());
    cmd.env_remove("NO_COLOR").args(["serve", "--dev", "--data-dir", p(&data)]).args(LOOPBACK);
    let server = Server::dev_from(cmd, &data);
    let coloured: Vec<&String> = server.seen().iter().filter(|l| l.contains("\x1b[")).collect();
    assert!(coloured.is_empty(), "ANSI escapes in piped stderr: {coloured:?}");
}

#[test]
fn the_start_up_log_shows_plain_addresses_and_where_the_admin_listener_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Server::dev(&tmp.path().join("data"));
    assert!(!dev.seen().iter().any(|l| l.contains("Some(")), "dev start-up log:\n{}", dev.seen().join("\n"));

    let ca = tmp.path().join("ca");
    init_ca(&ca);
    let server = Server::jwks(&ca, &jwks_file(tmp.path()), &[]);
    let log = server.seen().join("\n");
    assert!(!log.contains("Some("), "start-up log:\n{log}");
    let admin = server.admin.unwrap_or_else(|| panic!("no /metrics line naming the admin address:\n{log}"));
    assert_ne!(admin.port(), 0, "the bound address, not the configured one:\n{log}");
    assert_eq!(http_status(admin, "/metrics"), 200, "/metrics on the logged admin address {admin}");
}

#[test]
fn certify_with_log_format_json_writes_only_json_lines_with_its_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let json_lines = |out: &Output| -> Vec<serde_json::Value> {
        let err = stderr(out);
        err.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
            })
            .inspect(|v| assert!(v.is_object(), "not an object: {v}"))
            .collect()
    };

    let ok = output(
        server.certify_cmd(&token, WEB).args(["--out", p(&tmp.path().join("out")), "--log-format", "json"]),
        PATIENCE,
    );
    assert_exit(&ok, 0, "certify --log-format json");
    let lines = json_lines(&ok);
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["message"].as_str().is_some_and(|m| m.starts_with("wrote"))),
        "{lines:#?}"
    );

    let refused = output(
        server.certify_cmd(&token, "web").args(["--out", p(&tmp.path().join("out")), "--log-format", "json"]),
        PATIENCE,
    );
    let missing = tmp.path().join("no-such-anchors.pem");
    let mut cmd = meshca();
    cmd.args(["certify", "--log-format", "json", "--addr", &server.grpc, "--trust-anchors", p(&missing)]);
    let unusable = output(
        cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&tmp.path().join("out"))]),
        PATIENCE,
    );
    for (out, code) in [(refused, 1), (unusable, 2)] {
        assert_exit(&out, code, "a failed certify --log-format json");
        let lines = json_lines(&out);
        let error = lines
            .iter()
            .find(|l| l["level"] == "ERROR")
            .unwrap_or_else(|| panic!("no ERROR line: {lines:#?}"));
        assert_eq!(error["exit_code"], code, "{error}");
    }
}

#[test]
fn doctor_without_any_setting_says_what_it_needs_and_exits_2() {
    let out = run(&["doctor"]);
    assert_exit(&out, 2, "doctor without settings");
    let line = error_line(&out);
    assert!(line.contains("--addr") && line.contains("--config"), "{line}");
}

#[test]
fn agent_once_exits_1_when_its_on_renew_command_fails_and_0_when_it_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let agent = |hook: &str, out: &Path| {
        let mut cmd = meshca();
        cmd.args(["agent", "--once", "--addr", &server.grpc, "--trust-anchors", p(&server.anchors())]);
        cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(out), "--on-renew", hook]);
        output(&mut cmd, PATIENCE)
    };
    let failed_out = tmp.path().join("failed");
    let failed = agent("false", &failed_out);
    assert_exit(&failed, 1, "agent --once --on-renew false");
    assert!(error_line(&failed).contains("--on-renew"), "{}", stderr(&failed));
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(failed_out.join(name).is_file(), "{name} written before the hook ran");
    }
    assert_exit(&agent("true", &tmp.path().join("ok")), 0, "agent --once --on-renew true");
}

#[test]
fn an_agent_stopped_with_sigterm_does_not_claim_to_finish_in_flight_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let mut cmd = meshca();
    cmd.args(["agent", "--addr", &server.grpc, "--trust-anchors", p(&server.anchors())]);
    cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&tmp.path().join("out"))]);
    let mut agent = Process::spawn(&mut cmd);
    agent.stderr.wait_for("certificate renewed", Instant::now() + PATIENCE);
    let status = agent.stop("TERM", PATIENCE);
    let log = agent.stderr.seen.join("\n");
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("shutting down"), "the signal was handled:\n{log}");
    assert!(!log.contains("finishing in-flight requests"), "{log}");
}

// ---------------------------------------------------------------------------
// 9. doctor reads the agent's config file
// ---------------------------------------------------------------------------

#[test]
fn doctor_with_the_agents_config_file_runs_the_same_checks_as_with_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.dev_token("web", &tmp.path().join("web.token"));
    let out = tmp.path().join("out");
    let config = tmp.path().join("agent.toml");
    let toml = format!(
        "addr = {:?}\ntrust-anchors = {:?}\ntoken-file = {:?}\nidentity = {WEB:?}\nout = {:?}\n",
        server.grpc,
        p(&server.anchors()),
        p(&token),
        p(&out)
    );
    std::fs::write(&config, toml).unwrap();
    assert_exit(&run(&["agent", "--once", "--config", p(&config)]), 0, "agent --once --config");

    let (code, findings) = doctor_json(&["--config", p(&config)]);
    assert_eq!(code, Some(0), "{findings:#?}");
    for check in ["dns", "tcp", "tls", "clock", "credentials", "token"] {
        assert_eq!(finding(&findings, check)["status"], "OK", "{check}: {findings:#?}");
    }
    let token = finding(&findings, "token");
    assert!(token["found"].as_str().unwrap().contains("meshca would issue"), "{token}");
}

// ---- The README's two commands ----

/// The README's Quick start: exactly the two commands, and they are what cargo and
/// the repository make of them (the second is also what `.ci/run` runs).
#[test]
fn the_readme_quick_start_is_two_commands_that_the_repository_backs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme.split("## Quick start").nth(1).expect("a Quick start section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let commands: Vec<&str> =
        block.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).collect();
    assert_eq!(commands, ["cargo run --release -- serve --dev", "bash tests/run.sh"], "{block}");
    assert!(
        readme.len() <= 20 * 1024,
        "README.md is {} bytes: a front door, not the reference",
        readme.len()
    );

    // `cargo run` picks meshca: the package's default-run (cargo metadata, no build).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let meta = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(meta.status.success(), "{}", String::from_utf8_lossy(&meta.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    let package = meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "meshca").unwrap();
    assert_eq!(package["default_run"], "meshca", "{package}");
    let bins: Vec<&str> = package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(bins, ["meshca"], "one binary in the main package");

    // The test command exists, installs, and is what CI runs.
    let script = std::fs::read_to_string(root.join("tests/run.sh")).unwrap();
    for step in [
        "apt-get install",
        "kubernetes-validate",
        "rustup target add",
        "--profile dist",
        "cargo test --locked",
    ] {
        assert!(script.contains(step), "tests/run.sh lacks {step:?}");
    }
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim() == "bash tests/run.sh"), ".ci/run runs the README's command");

    // The Windows build docs/agent.md gives operators is the one the Wine test runs
    // (whose binary tests/wine.rs checks is stripped and of shipping size).
    let words = |line: &str| {
        let mut words: Vec<String> = line
            .replace("\"$windows_target\"", "x86_64-pc-windows-gnu")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        words.sort();
        words
    };
    let built = |text: &str, what: &str| {
        let lines: Vec<Vec<String>> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("cargo build") && l.contains("windows"))
            .map(words)
            .collect();
        assert_eq!(lines.len(), 1, "{what}: one Windows build line");
        lines.into_iter().next().unwrap()
    };
    let documented = built(&std::fs::read_to_string(root.join("docs/agent.md")).unwrap(), "docs/agent.md");
    assert_eq!(documented, built(&script, "tests/run.sh"), "the documented Windows build is the tested one");
}
