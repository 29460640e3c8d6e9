//! End-to-end tests of the `meshca` binary: real processes, real files, real TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use meshca_test_support as support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use support::process::{jwks_file, meshca, output, serve_with_jwks, Process, PATIENCE};

const WEB: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
const DB: &str = "db.default.serviceaccount.identity.meshca-system.cluster.local";
const LOOPBACK: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

fn run(args: &[&str]) -> Output {
    output(meshca().args(args), PATIENCE)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: stderr:\n{}", stderr(out));
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `openssl verify ARGS` must succeed.
fn assert_openssl_verifies(args: &[&str]) {
    let out = match Command::new("openssl").arg("verify").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("openssl is not installed; install it (e.g. apt-get install openssl) to run these tests")
        }
        Err(e) => panic!("cannot run openssl: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openssl verify {args:?}: {stdout}{}", stderr(&out));
}

/// A running `meshca serve`, killed on drop; its stderr is read line by line.
struct Server {
    process: Process,
    dir: PathBuf,
    grpc: String,
}

impl Server {
    fn spawn(cmd: &mut Command) -> Server {
        Server { process: Process::spawn(cmd), dir: PathBuf::new(), grpc: String::new() }
    }

    /// `serve --dev` in `dir` on ephemeral ports; returns once the addresses are known.
    fn dev(dir: &Path) -> Server {
        let mut cmd = meshca();
        cmd.args(["serve", "--dev", "--data-dir", p(dir)]).args(LOOPBACK);
        Server::dev_from(cmd, dir)
    }

    fn dev_from(mut cmd: Command, dir: &Path) -> Server {
        let mut server = Server::spawn(&mut cmd);
        server.dir = dir.to_path_buf();
        let first = server.wait_for("meshca dev mode:");
        assert_eq!(server.seen()[0], first, "the dev mode line comes first");
        let between = |from: &str, to: &str| {
            let rest =
                &first[first.find(from).unwrap_or_else(|| panic!("{from:?} in {first}")) + from.len()..];
            rest[..rest.find(to).unwrap_or(rest.len())].to_string()
        };
        server.grpc = between("gRPC on ", ",");
        let admin = between("admin on http://", "\n");
        assert!(server.grpc.starts_with("https://127.0.0.1:") && !server.grpc.ends_with(":0"), "{first}");
        assert!(admin.starts_with("127.0.0.1:") && !admin.ends_with(":0"), "{first}");
        server
    }

    /// Every stderr line read so far.
    fn seen(&self) -> &[String] {
        &self.process.stderr.seen
    }

    /// Reads stderr until a line contains `needle`; fails after the overall timeout.
    fn wait_for(&mut self, needle: &str) -> String {
        self.process.stderr.wait_for(needle, Instant::now() + PATIENCE)
    }

    /// SIGTERM, then waits for stderr to close and the process to exit; fails after
    /// the timeout.
    fn stop(&mut self) -> ExitStatus {
        self.process.stop("TERM", PATIENCE)
    }

    fn token_file(&self, namespace: &str, service_account: &str) -> PathBuf {
        let mut cmd = meshca();
        cmd.args(["dev-token", "--data-dir", p(&self.dir)]);
        let out =
            output(cmd.args(["--namespace", namespace, "--service-account", service_account]), PATIENCE);
        assert_exit(&out, 0, "dev-token");
        let stdout = String::from_utf8(out.stdout).expect("utf-8 token");
        assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout:?}");
        let token = stdout.trim_end_matches('\n');
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "a JWT: {token}");
        assert!(parts.iter().all(|s| !s.is_empty() && !s.contains(char::is_whitespace)), "{token}");
        let file = self.dir.with_extension(format!("{namespace}-{service_account}.token"));
        std::fs::write(&file, token).expect("write token");
        file
    }

    fn certify(&self, token: &Path, identity: &str, out: &Path) -> Output {
        let mut cmd = meshca();
        cmd.args([
            "certify",
            "--addr",
            &self.grpc,
            "--trust-anchors",
            p(&self.dir.join("trust-anchors.pem")),
        ]);
        output(cmd.args(["--token-file", p(token), "--identity", identity, "--out", p(out)]), PATIENCE)
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
}

fn pem_blocks(pem: &str) -> Vec<String> {
    let end = "-----END CERTIFICATE-----";
    pem.split_inclusive(end).filter(|b| b.contains(end)).map(|b| format!("{}\n", b.trim_start())).collect()
}

fn audit_verify(path: &Path) -> Output {
    run(&["audit", "verify", p(path)])
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("read audit log");
    text.lines().map(|l| serde_json::from_str(l).expect("audit record is JSON")).collect()
}

#[test]
fn readme_quick_start_issues_a_certificate_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::dev(&data);
    assert!(
        server.seen()[0].contains(&format!("created a new CA in {}", data.display())),
        "{}",
        server.seen()[0]
    );
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    assert_exit(&server.certify(&token, WEB, &out), 0, "certify");

    let chain = std::fs::read_to_string(out.join("tls.crt")).unwrap();
    let blocks = pem_blocks(&chain);
    assert!(blocks.len() >= 2, "leaf and issuer expected in tls.crt:\n{chain}");
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    let anchors = data.join("trust-anchors.pem");
    assert_eq!(
        std::fs::read_to_string(out.join("ca.crt")).unwrap(),
        std::fs::read_to_string(&anchors).unwrap()
    );
    let (leaf, rest) = (tmp.path().join("leaf.pem"), tmp.path().join("intermediates.pem"));
    std::fs::write(&leaf, &blocks[0]).unwrap();
    std::fs::write(&rest, blocks[1..].concat()).unwrap();
    assert_openssl_verifies(&["-CAfile", p(&anchors), "-untrusted", p(&rest), p(&leaf)]);

    assert!(server.stop().success(), "graceful exit:\n{}", server.seen().join("\n"));
    let report = audit_verify(&server.audit_log());
    assert_exit(&report, 0, "audit verify");
    assert!(stderr(&report).contains("intact, 2 records"), "{}", stderr(&report));
    let records = audit_records(&server.audit_log());
    assert!(
        records.iter().any(|r| r["outcome"] == "issued" && r["requested_identity"] == WEB),
        "{records:?}"
    );
}

#[test]
fn dev_mode_reuses_its_data_dir_on_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut first = Server::dev(&data);
    first.wait_for("serving gRPC over TLS");
    assert!(first.stop().success(), "{}", first.seen().join("\n"));
    let anchors = std::fs::read(data.join("trust-anchors.pem")).unwrap();

    let mut second = Server::dev(&data);
    assert!(second.seen()[0].contains("reusing the CA"), "{}", second.seen()[0]);
    second.wait_for("serving gRPC over TLS");
    assert!(second.stop().success(), "{}", second.seen().join("\n"));
    assert_eq!(std::fs::read(data.join("trust-anchors.pem")).unwrap(), anchors, "trust anchors changed");
    let report = audit_verify(&second.audit_log());
    assert_exit(&report, 0, "audit verify across restarts");
    assert!(stderr(&report).contains("intact, 2 records"), "{}", stderr(&report));
}

#[test]
fn certify_for_another_identity_is_refused_with_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev(&tmp.path().join("data"));
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    let refused = server.certify(&token, DB, &out);
    assert_exit(&refused, 1, "certify as db with web's token");
    assert!(stderr(&refused).contains("PermissionDenied"), "{}", stderr(&refused));
    let written = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written, 0, "nothing written to {}", out.display());
}

#[test]
fn audit_verify_detects_deleted_edited_and_reordered_records() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::dev(&tmp.path().join("data"));
    let token = server.token_file("default", "web");
    for i in 0..3 {
        assert_exit(&server.certify(&token, WEB, &tmp.path().join(format!("out{i}"))), 0, "certify");
    }
    assert!(server.stop().success());
    let text = std::fs::read_to_string(server.audit_log()).unwrap();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 4, "serving certificate + 3 leaves:\n{text}");

    let check = |name: &str, tampered: Vec<String>, code: i32| {
        let copy = tmp.path().join(name);
        std::fs::write(&copy, tampered.concat()).unwrap();
        let out = audit_verify(&copy);
        assert_exit(&out, code, name);
        stderr(&out)
    };
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(check("intact", owned(), 0).contains("intact, 4 records"));

    let mut deleted = owned();
    deleted.remove(1);
    let err = check("deleted", deleted, 1);
    assert!(err.contains("line 2"), "names the line: {err}");

    let mut edited = owned();
    let at = edited[2].find("\"serial\":\"").expect("serial in an issued record") + "\"serial\":\"".len();
    let digit = if edited[2].as_bytes()[at] == b'0' { "1" } else { "0" };
    edited[2].replace_range(at..at + 1, digit);
    assert!(check("edited", edited, 1).contains("line 3"));

    let mut swapped = owned();
    swapped.swap(1, 2);
    assert!(check("swapped", swapped, 1).contains("line 2"));

    assert_exit(&audit_verify(&tmp.path().join("no-such.jsonl")), 2, "missing audit log");
}

fn init(dir: &Path) {
    assert_exit(&run(&["init", "--dir", p(dir)]), 0, "init");
}

#[test]
fn init_writes_a_hierarchy_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init(&ca);
    assert_eq!(mode(&ca.join("issuer/tls.key")), 0o600);
    let (anchors, issuer) = (ca.join("trust-anchors.pem"), ca.join("issuer"));
    assert_openssl_verifies(&["-CAfile", p(&anchors), p(&issuer.join("tls.crt"))]);

    let files = ["trust-anchors.pem", "trust-anchor.key", "issuer/tls.crt", "issuer/tls.key"];
    let snapshot = || files.map(|f| std::fs::read(ca.join(f)).unwrap());
    let before = snapshot();
    assert_exit(&run(&["init", "--dir", p(&ca)]), 2, "second init");
    assert!(before == snapshot(), "a refused init changed the files");

    let ca_args = ["serve", "--trust-anchors", p(&anchors), "--issuer-dir", p(&issuer)];
    let dev_validation = output(meshca().args(ca_args).args(["--token-validation", "dev"]), PATIENCE);
    assert_exit(&dev_validation, 2, "dev token validation without --dev");
    assert!(stderr(&dev_validation).contains("--dev"), "{}", stderr(&dev_validation));

    let jwks = jwks_file(tmp.path());
    let mut server = Server::spawn(serve_with_jwks(&mut meshca(), &anchors, &issuer, &jwks));
    server.wait_for("serving gRPC over TLS");
    assert!(server.stop().success(), "{}", server.seen().join("\n"));
}

#[test]
fn serve_refuses_an_issuer_that_does_not_chain_to_the_trust_anchors() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a);
    init(&b);
    let jwks = jwks_file(tmp.path());
    let mut cmd = meshca();
    let out =
        output(serve_with_jwks(&mut cmd, &a.join("trust-anchors.pem"), &b.join("issuer"), &jwks), PATIENCE);
    assert_exit(&out, 2, "serve with a foreign issuer: a configuration error");
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("meshca:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{err}");
    assert!(errors[0].contains("--trust-anchors") && errors[0].contains("--issuer-dir"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let serve = run(&["serve"]);
    assert_exit(&serve, 2, "serve without trust anchors");
    assert!(stderr(&serve).contains("--trust-anchors"), "{}", stderr(&serve));

    let lifetime =
        run(&["serve", "--dev", "--data-dir", p(&tmp.path().join("d")), "--issuance-lifetime", "soon"]);
    assert_exit(&lifetime, 2, "unparsable --issuance-lifetime");
    assert!(stderr(&lifetime).contains("--issuance-lifetime"), "{}", stderr(&lifetime));

    let token =
        run(&["dev-token", "--data-dir", p(&missing), "--namespace", "default", "--service-account", "web"]);
    assert_exit(&token, 2, "dev-token without a data dir");
    assert!(token.stdout.is_empty(), "no token printed");

    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "a.b.c").unwrap();
    let mut cmd = meshca();
    cmd.args(["certify", "--addr", "https://127.0.0.1:1", "--trust-anchors", p(&missing.join("a.pem"))]);
    let certify =
        output(cmd.args(["--token-file", p(&token_file), "--identity", WEB, "--out", p(&missing)]), PATIENCE);
    assert_exit(&certify, 2, "certify with a missing --trust-anchors file");
    assert_exit(&run(&["no-such-command"]), 2, "unknown subcommand");

    // http:// to another host needs --plaintext (the token would cross in clear), and
    // --plaintext is refused for https://; both before any connection is tried.
    let anchors = tmp.path().join("anchors");
    assert_exit(&run(&["init", "--dir", p(&anchors)]), 0, "init");
    let certify_at = |addr: &str, extra: &[&str]| {
        let mut cmd = meshca();
        cmd.args(["certify", "--addr", addr, "--trust-anchors", p(&anchors.join("trust-anchors.pem"))]);
        cmd.args(["--token-file", p(&token_file), "--identity", WEB, "--out", p(&missing)]).args(extra);
        output(&mut cmd, PATIENCE)
    };
    let clear = certify_at("http://meshca.invalid:8080", &[]);
    assert_exit(&clear, 2, "http:// to another host without --plaintext");
    assert!(
        stderr(&clear).contains("in clear") && stderr(&clear).contains("--plaintext"),
        "{}",
        stderr(&clear)
    );
    let both = certify_at("https://127.0.0.1:1", &["--plaintext"]);
    assert_exit(&both, 2, "--plaintext with https://");
    assert!(stderr(&both).contains("--plaintext is for an http://"), "{}", stderr(&both));
}

#[test]
fn environment_variables_configure_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = meshca();
    cmd.arg("serve").envs([
        ("MESHCA_DEV", "true"),
        ("MESHCA_DATA_DIR", p(&data)),
        ("MESHCA_LISTEN", "127.0.0.1:0"),
        ("MESHCA_ADMIN_LISTEN", "127.0.0.1:0"),
        ("MESHCA_ISSUANCE_LIFETIME", "1h"),
    ]);
    let server = Server::dev_from(cmd, &data);
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    assert_exit(&server.certify(&token, WEB, &out), 0, "certify");

    let chain = std::fs::read(out.join("tls.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&chain).expect("PEM leaf");
    let leaf = pem.parse_x509().expect("X.509 leaf");
    let validity = leaf.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!((lifetime - 3720).abs() <= 2, "notAfter - notBefore = {lifetime}s, expected 1h + 2m");
}

#[test]
fn serve_help_documents_every_flag() {
    let out = run(&["serve", "--help"]);
    assert_exit(&out, 0, "serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags = "listen admin-listen trust-domain control-plane-namespace trust-anchors issuer-dir \
        issuance-lifetime clock-skew-allowance token-validation audit-log plaintext config dev data-dir \
        kubeconfig token-review-timeout token-review-qps token-review-burst token-cache-ttl token-cache-failure-ttl \
        ready-api-unreachable-threshold log-format";
    for flag in flags.split_whitespace() {
        let env = format!("MESHCA_{}", flag.replace('-', "_").to_uppercase());
        let documented = help.lines().map(str::trim_start).any(|l| {
            l.strip_prefix(&format!("--{flag}")).is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        });
        assert!(documented, "--{flag} missing from:\n{help}");
        assert!(help.contains(&format!("[env: {env}=")), "{env} missing from:\n{help}");
    }
}

#[test]
fn agent_once_writes_a_certificate_runs_its_hook_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::dev(&data);
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    let marker = tmp.path().join("renewed");
    let hook = format!("cat {}/tls.crt > {}", p(&out), p(&marker));
    let mut cmd = meshca();
    cmd.args([
        "agent",
        "--once",
        "--addr",
        &server.grpc,
        "--trust-anchors",
        p(&data.join("trust-anchors.pem")),
    ]);
    cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&out), "--key-type", "rsa2048"]);
    let run = output(cmd.args(["--on-renew", &hook]), PATIENCE);
    assert_exit(&run, 0, "agent --once");
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    let chain = std::fs::read_to_string(out.join("tls.crt")).unwrap();
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), chain, "the hook ran after the files were written");
    let records = audit_records(&server.audit_log());
    assert!(records.iter().any(|r| r["outcome"] == "issued" && r["csr_key_type"] == "rsa2048"));
    let mut cmd = meshca();
    cmd.args(["agent", "--once", "--renew-at", "1.5", "--addr", &server.grpc]);
    cmd.args(["--trust-anchors", p(&data.join("trust-anchors.pem")), "--token-file", p(&token)]);
    let bad = output(cmd.args(["--identity", WEB, "--out", p(&out)]), PATIENCE);
    assert_exit(&bad, 2, "agent --renew-at 1.5");
    assert_eq!(server.stop().code(), Some(0));
}

#[test]
fn killing_certify_at_any_moment_never_leaves_a_partial_file() {
    use rustls_pki_types::pem::PemObject;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::dev(&data);
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    let mut killed_early = 0;
    for i in 0..24u64 {
        let mut cmd = meshca();
        cmd.args(["certify", "--addr", &server.grpc, "--trust-anchors", p(&data.join("trust-anchors.pem"))]);
        cmd.args(["--token-file", p(&token), "--identity", WEB, "--out", p(&out)]);
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Fault injection: SIGKILL after a varying delay, landing before, during and
        // after the writes.
        std::thread::sleep(Duration::from_millis(i * 4));
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed_early += usize::from(!status.success());
        for entry in std::fs::read_dir(&out).into_iter().flatten() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            match name.as_str() {
                "tls.crt" | "ca.crt" => {
                    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes).collect();
                    assert!(
                        !certs.is_empty() && certs.iter().all(Result::is_ok),
                        "round {i}: {name} is partial"
                    );
                }
                "tls.key" => {
                    assert!(
                        rustls_pki_types::PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
                        "round {i}: tls.key is partial"
                    );
                }
                // A temporary file may survive a kill; it is never the file a proxy reads.
                other => {
                    assert!(other.starts_with('.') && other.contains(".tmp-"), "round {i}: stray {other}")
                }
            }
        }
    }
    assert!(killed_early > 0, "no round was interrupted");
    // A completed round clears what killed ones left behind.
    let done = server.certify(&token, WEB, &out);
    assert_exit(&done, 0, "certify after the kills");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(server.stop().code(), Some(0));
}

#[test]
fn agent_reads_its_settings_from_a_config_file_under_its_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::dev(&data);
    let token = server.token_file("default", "web");
    let out = tmp.path().join("out");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "addr = \"{}\"\ntrust-anchors = \"{}\"\ntoken-file = \"{}\"\nidentity = \"{WEB}\"\nout = \"{}\"\nkey-type = \"p384\"\n",
            server.grpc,
            p(&data.join("trust-anchors.pem")),
            p(&token),
            p(&out)
        ),
    )
    .unwrap();
    assert_exit(&run(&["agent", "--once", "--config", p(&config)]), 0, "agent --once --config");
    // A flag wins over the file.
    assert_exit(
        &run(&["agent", "--once", "--config", p(&config), "--key-type", "p256"]),
        0,
        "flag over file",
    );
    let types: Vec<_> = audit_records(&server.audit_log())
        .into_iter()
        .filter(|r| r["requested_identity"] == WEB)
        .map(|r| r["csr_key_type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["p384", "p256"]);
    std::fs::write(&config, "addr = \"https://127.0.0.1:1\"\nno-such-setting = 1\n").unwrap();
    let bad = run(&["agent", "--once", "--config", p(&config)]);
    assert_exit(&bad, 2, "unknown config key");
    assert!(stderr(&bad).contains("no-such-setting"), "{}", stderr(&bad));
    assert_eq!(server.stop().code(), Some(0));
}
