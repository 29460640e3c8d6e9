//! The issuer key's file permissions (unix): meshca refuses to start, and refuses a
//! reload, when every user of the host can read the issuer key (mode & 0o004), naming
//! the file, its mode and the fix, unless `--allow-world-readable-issuer-key`
//! (`MESHCA_ALLOW_WORLD_READABLE_ISSUER_KEY`, `allow-world-readable-issuer-key` in the
//! config file) says otherwise; owner- and group-readable keys (a Kubernetes Secret
//! mounted with `defaultMode: 0440` and `fsGroup`) are fine. And the keys meshca
//! writes itself (`meshca init`, `meshca serve --dev`) are 0600 whatever the umask.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshca::ca::reload::Outcome;
use meshca::clock::Clock;
use meshca::config::ReloadSettings;
use support::process::{jwks_file, serve_with_jwks};
use support::{chain, Options, TestServer};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn key_of(dir: &Path) -> std::path::PathBuf {
    dir.join("issuer/tls.key")
}

#[tokio::test]
async fn a_world_readable_issuer_key_stops_the_server_naming_the_file_its_mode_and_the_fix() {
    for world in [0o644, 0o604, 0o444] {
        let mut server =
            TestServer::start_prepared(Options::default(), |dir| chmod(&key_of(dir), world)).await;
        assert!(server.handles.is_none(), "the server started with a {world:o} issuer key");
        let key = key_of(server.dir.path()).display().to_string();
        let err = server.stop().await.unwrap_err().to_string();
        assert!(err.contains(&format!("the issuer key {key} is readable by every user")), "{err}");
        assert!(err.contains(&format!("(mode {world:04o})")), "{err}");
        assert!(err.contains(&format!("chmod 600 {key}")), "{err}");
        assert!(err.contains("--allow-world-readable-issuer-key"), "{err}");
    }
}

#[tokio::test]
async fn keys_readable_by_owner_or_group_only_serve_as_kubernetes_mounts_them() {
    for private in [0o600, 0o400, 0o640, 0o440] {
        let server = TestServer::start_prepared(Options::default(), |dir| chmod(&key_of(dir), private)).await;
        let (_key, req) = server.request("default", "web");
        let resp = server.client().await.certify(req).await.unwrap_or_else(|s| panic!("{private:o}: {s:?}"));
        assert!(!resp.into_inner().leaf_certificate.is_empty());
    }
}

#[tokio::test]
async fn the_override_serves_with_a_world_readable_key() {
    let reload = ReloadSettings {
        allow_world_readable_issuer_key: true,
        notifications: false,
        ..ReloadSettings::default()
    };
    let server = TestServer::start_prepared(Options { reload, ..Default::default() }, |dir| {
        chmod(&key_of(dir), 0o644)
    })
    .await;
    let (_key, req) = server.request("default", "web");
    assert!(server.client().await.certify(req).await.is_ok());
    // Nor is a later look at the files a failure.
    assert!(matches!(server.reloader().check(), Outcome::Unchanged));
}

#[tokio::test]
async fn a_key_made_world_readable_while_serving_is_refused_at_every_look_and_the_old_issuer_kept() {
    let server = TestServer::start().await;
    let key = key_of(server.dir.path());
    let mut client = server.client().await;
    let issued_by = |resp: &meshca::proto::CertifyResponse| resp.intermediate_certificates[0].clone();
    let (_k, req) = server.request("default", "web");
    let first = client.certify(req).await.unwrap().into_inner();

    // A chmod alone, no new contents: refused, counted, and refused again at the next look.
    chmod(&key, 0o644);
    for attempt in 1..=2 {
        let outcome = server.reloader().check();
        assert!(
            matches!(outcome, Outcome::Failed(meshca::ca::Error::KeyWorldReadable { .. })),
            "{outcome:?}"
        );
        assert_eq!(server.metric("meshca_reload_failures_total").await, attempt);
    }
    let (_k, req) = server.request("default", "web");
    let meanwhile =
        client.certify(req).await.expect("still serving with the issuer loaded before").into_inner();
    assert_eq!(issued_by(&meanwhile), issued_by(&first));
    let (leaf, intermediates) = chain(&meanwhile);
    server.anchors.verify(&leaf, &intermediates, server.clock.now(), None).unwrap();

    // Its mode restored, the key is what was loaded: nothing to do.
    chmod(&key, 0o600);
    assert!(matches!(server.reloader().check(), Outcome::Unchanged));

    // New contents in a new world-readable file: refused; the same file made private: loaded.
    let pem = std::fs::read_to_string(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, format!("{pem}\n")).unwrap();
    chmod(&key, 0o644);
    assert!(matches!(server.reloader().check(), Outcome::Failed(meshca::ca::Error::KeyWorldReadable { .. })));
    assert_eq!(server.metric("meshca_reload_failures_total").await, 3);
    chmod(&key, 0o600);
    assert!(matches!(server.reloader().check(), Outcome::Reloaded(_)));
    assert_eq!(server.metric("meshca_reloads_total").await, 1);
}

// ---- The binary ----

fn meshca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshca"))
}

/// `meshca ARGS` run with umask 000, so every mode bit left off was left off by meshca.
fn meshca_umask_000(args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_meshca")]).args(args);
    cmd
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// How a started `meshca serve` went: serving (its stderr said so), or exited.
enum Started {
    Serving(Child),
    Exited(ExitStatus, String),
}

/// Starts `cmd` and waits (at most 60 s) until its stderr shows `ready` or it exits.
fn start(mut cmd: Command, ready: &str) -> Started {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(ready) => return Started::Serving(child),
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Started::Exited(child.wait().unwrap(), seen.join("\n"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("neither {ready:?} nor an exit within 60 s:\n{}", seen.join("\n"));
            }
        }
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn serve_refuses_a_world_readable_issuer_key_unless_the_flag_the_environment_or_the_config_file_allows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    assert!(meshca().args(["init", "--dir", p(&ca)]).output().unwrap().status.success());
    let key = key_of(&ca);
    chmod(&key, 0o644);
    let jwks = jwks_file(tmp.path());
    let audit = tmp.path().join("audit.jsonl");
    let serve = || {
        let mut cmd = meshca();
        serve_with_jwks(&mut cmd, &ca.join("trust-anchors.pem"), &ca.join("issuer"), &jwks)
            .args(["--audit-log", p(&audit)]);
        cmd
    };
    const SERVING: &str = "serving gRPC over TLS";

    match start(serve(), SERVING) {
        Started::Exited(status, stderr) => {
            // A configuration error: exit 2, naming the flag that chose the key.
            assert_eq!(status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("--issuer-dir"), "{stderr}");
            let key = key.display().to_string();
            assert!(stderr.contains(&format!("the issuer key {key} is readable by every user")), "{stderr}");
            assert!(
                stderr.contains("(mode 0644)") && stderr.contains(&format!("chmod 600 {key}")),
                "{stderr}"
            );
        }
        Started::Serving(child) => {
            stop(child);
            panic!("serve started with a world-readable issuer key");
        }
    }

    let config = tmp.path().join("meshca.toml");
    std::fs::write(&config, "allow-world-readable-issuer-key = true\n").unwrap();
    let mut by_flag = serve();
    by_flag.arg("--allow-world-readable-issuer-key");
    let mut by_env = serve();
    by_env.env("MESHCA_ALLOW_WORLD_READABLE_ISSUER_KEY", "true");
    let mut by_file = serve();
    by_file.args(["--config", p(&config)]);
    for (how, cmd) in [("flag", by_flag), ("environment", by_env), ("config file", by_file)] {
        match start(cmd, SERVING) {
            Started::Serving(child) => stop(child),
            Started::Exited(status, stderr) => panic!("allowed by {how}, yet exited {status}:\n{stderr}"),
        }
    }

    // And with the key made private again, no override is needed.
    chmod(&key, 0o600);
    match start(serve(), SERVING) {
        Started::Serving(child) => stop(child),
        Started::Exited(status, stderr) => panic!("exited {status} with a 0600 key:\n{stderr}"),
    }
}

#[test]
fn init_writes_private_keys_0600_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = meshca_umask_000(&["init", "--dir", p(&ca)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&ca.join("trust-anchor.key")), 0o600);
    assert_eq!(mode(&ca.join("issuer/tls.key")), 0o600);
    assert_eq!(mode(&ca.join("trust-anchors.pem")), 0o644);
    assert_eq!(mode(&ca.join("issuer/tls.crt")), 0o644);

    let k8s = tmp.path().join("k8s");
    let out = meshca_umask_000(&["init", "--kubernetes", "--dir", p(&k8s)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&k8s.join("trust-anchor.key")), 0o600);
    assert_eq!(mode(&k8s.join("trust-anchors.pem")), 0o644);
}

#[test]
fn serve_dev_writes_private_keys_0600_whatever_the_umask_and_starts_with_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "serve",
        "--dev",
        "--data-dir",
        p(&data),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    match start(meshca_umask_000(&args), "serving gRPC over TLS") {
        Started::Serving(child) => stop(child),
        Started::Exited(status, stderr) => panic!("serve --dev exited {status}:\n{stderr}"),
    }
    for key in ["trust-anchor.key", "issuer/tls.key", "dev-token.key"] {
        assert_eq!(mode(&data.join(key)), 0o600, "{key}");
    }
    for public in ["trust-anchors.pem", "issuer/tls.crt", "dev-jwks.json"] {
        assert_eq!(mode(&data.join(public)), 0o644, "{public}");
    }
    assert_eq!(mode(&data.join("audit.jsonl")), 0o600, "audit.jsonl");
}
