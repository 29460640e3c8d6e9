//! The Windows build of `meshca agent`, run for real under Wine against a Linux
//! `meshca serve --dev` on loopback.
//!
//! `tests/run.sh` cross-compiles `meshca.exe` (`x86_64-pc-windows-gnu`) with the
//! command the Windows documentation gives operators (`--profile dist`: stripped,
//! no debug info), builds the test-only `bcryptprimitives.dll` shim
//! (tests/wine/bcryptprimitives.c) next to it, and installs Wine, before `cargo test`. When any of them is missing,
//! or older than a source cargo built it from (its dep-info file says which), the
//! test fails and says how to build it: it never passes without having run the
//! current Windows binary.
//!
//! What runs on Windows code paths here: file replacement by `std::fs::rename`
//! (MoveFileExW), directory creation, `Z:\` paths, the `--on-renew` hook through
//! `cmd /C`, TLS and gRPC over Windows sockets, the monotonic renewal timer, and
//! shutdown on Ctrl-C (Wine turns SIGINT into a console Ctrl-C event). Waiting for
//! real renewals is inherent: the server issues 10 s leaves (its minimum), the
//! agent renews at half of that, and the test waits on the agent's log lines, with
//! one overall deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(target_os = "linux")]

use meshca_test_support as support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use meshca::ca::issuer::TrustAnchors;
use meshca::clock::{Clock, SystemClock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use support::process::{self, bin, Process};

const WEB: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
/// Bound on one Wine command (the first one also creates the Wine prefix).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the agent's three certificates (expected: about 10 s).
const RENEWALS_TIMEOUT: Duration = Duration::from_secs(60);
const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";
const BUILD_HINT: &str = "run `bash tests/run.sh`, which installs and builds it: \
    `rustup target add x86_64-pc-windows-gnu`, \
    `apt-get install --no-install-recommends gcc-mingw-w64-x86-64 wine64`, \
    `cargo build --locked --profile dist --target x86_64-pc-windows-gnu --bin meshca`, \
    `x86_64-w64-mingw32-gcc -shared -O2 -o target/x86_64-pc-windows-gnu/dist/bcryptprimitives.dll \
    tests/wine/bcryptprimitives.c -ladvapi32`";
/// A stripped `meshca.exe` is about 21 MB; with debug info it was 163 MB.
const EXE_SIZE_LIMIT: u64 = 32 << 20;

/// `target/x86_64-pc-windows-gnu/dist`, beside the directory of the Linux binary
/// (so a custom `CARGO_TARGET_DIR` is followed).
fn windows_dir() -> PathBuf {
    let target = Path::new(bin()).parent().and_then(Path::parent).expect("target directory");
    target.join(WINDOWS_TARGET).join("dist")
}

/// The sources cargo built `exe` from, as its dep-info file (`meshca.d`) lists them:
/// the crate's own files, build.rs, the protos and the generated code.
fn cargo_sources(exe: &Path) -> Vec<PathBuf> {
    let dep_info = exe.with_extension("d");
    let text = std::fs::read_to_string(&dep_info)
        .unwrap_or_else(|e| panic!("{} is missing ({e}); {BUILD_HINT}", dep_info.display()));
    let (_, deps) = text.split_once(": ").unwrap_or_else(|| panic!("no rule in {}", dep_info.display()));
    // Make escapes a space in a path as `\ `.
    let deps = deps.replace("\\ ", "\0");
    deps.split_whitespace().map(|p| PathBuf::from(p.replace('\0', " "))).collect()
}

/// `output`, which must exist and be newer than every one of `sources`.
fn built(output: PathBuf, sources: &[PathBuf]) -> PathBuf {
    let built_at = match std::fs::metadata(&output) {
        Ok(meta) => meta.modified().expect("mtime"),
        Err(e) => panic!("{} is missing ({e}); {BUILD_HINT}", output.display()),
    };
    for source in sources {
        let changed_at = std::fs::metadata(source).and_then(|m| m.modified());
        assert!(
            changed_at.is_ok_and(|t| t <= built_at),
            "{} is older than {} (or that is gone); rebuild it: {BUILD_HINT}",
            output.display(),
            source.display()
        );
    }
    output
}

/// A program named one of `names` on `PATH`, else `absolute` (where Debian's
/// `wine64` package puts it).
fn program(names: &[&str], absolute: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .chain([PathBuf::from(absolute)])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("Wine is not installed (no {names:?} on PATH, no {absolute}); {BUILD_HINT}")
        })
}

/// Windows' name for a Linux path: Wine maps `/` to drive `Z:`.
fn windows_path(path: &Path) -> String {
    format!("Z:{}", path.to_str().expect("utf-8 path").replace('/', "\\"))
}

/// Runs to completion with output captured; fails after [`COMMAND_TIMEOUT`].
fn output(cmd: &mut Command) -> Output {
    process::output(cmd, COMMAND_TIMEOUT)
}

fn assert_success(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {}\n{stderr}", out.status);
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// A Wine prefix of its own; on drop, every Windows process in it is ended
/// (`wineserver -k`) and its wineserver has exited (`wineserver -w`).
struct Wine {
    loader: PathBuf,
    server: PathBuf,
    prefix: PathBuf,
}

impl Wine {
    fn new(prefix: PathBuf) -> Wine {
        let loader = program(&["wine64", "wine"], "/usr/lib/wine/wine64");
        let server = program(&["wineserver"], "/usr/lib/wine/wineserver64");
        Wine { loader, server, prefix }
    }

    /// `exe ARGS` under Wine, without `MESHCA_*` settings from the caller.
    fn command(&self, exe: &Path) -> Command {
        let mut cmd = process::command(&self.loader);
        cmd.arg(exe)
            .env("WINEPREFIX", &self.prefix)
            // Quiet, headless, and no offer to install Mono or Gecko into the new prefix.
            .env("WINEDEBUG", "-all")
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .env("NO_COLOR", "1");
        cmd
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = Command::new(&self.server).arg("-k").env("WINEPREFIX", &self.prefix).status();
        let _ = Command::new(&self.server).arg("-w").env("WINEPREFIX", &self.prefix).status();
    }
}

/// The leaf's SHA-256, as audit records spell it.
fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn certificates(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().expect("PEM certificates")
}

fn issued_for(audit_log: &Path, identity: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(audit_log).expect("read audit log");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit record is JSON"))
        .filter(|r| r["requested_identity"] == identity)
        // doctor's dry runs sign nothing; they are audited as such.
        .filter(|r| {
            !r["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("dry_run") || reason.contains("(dry run)"))
        })
        .collect()
}

/// The documented Windows build is a binary of normal size without debug sections
/// or a symbol table.
fn assert_shipping_size(exe: &Path) {
    let bytes = std::fs::read(exe).unwrap();
    let size = bytes.len() as u64;
    assert!(size < EXE_SIZE_LIMIT, "{} is {size} bytes: debug info was not stripped", exe.display());
    let sections = pe_sections(&bytes).unwrap_or_else(|| panic!("{} is not a PE image", exe.display()));
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    // mingw names DWARF sections `.debug_*`, through the string table (`/N`) when longer than 8 bytes.
    let debug: Vec<_> = sections.iter().filter(|s| s.starts_with(".debug") || s.starts_with('/')).collect();
    assert!(debug.is_empty(), "{} has debug sections {debug:?}: not stripped", exe.display());
    let symbols = u32::from_le_bytes(bytes[pe_offset(&bytes).unwrap() + 12..][..4].try_into().unwrap());
    assert_eq!(symbols, 0, "{} has a COFF symbol table: not stripped", exe.display());
}

/// Where the `PE\0\0` signature is (from the DOS header's `e_lfanew`).
fn pe_offset(bytes: &[u8]) -> Option<usize> {
    let at = u32::from_le_bytes(bytes.get(0x3c..0x40)?.try_into().ok()?) as usize;
    (bytes.get(at..at + 4)? == b"PE\0\0").then_some(at)
}

/// The names in a PE image's section table (raw: `/N` for a long name).
fn pe_sections(bytes: &[u8]) -> Option<Vec<String>> {
    let coff = pe_offset(bytes)? + 4;
    let count = u16::from_le_bytes(bytes.get(coff + 2..coff + 4)?.try_into().ok()?) as usize;
    let optional = u16::from_le_bytes(bytes.get(coff + 16..coff + 18)?.try_into().ok()?) as usize;
    let table = coff + 20 + optional;
    (0..count)
        .map(|i| {
            let name = bytes.get(table + 40 * i..table + 40 * i + 8)?;
            let end = name.iter().position(|b| *b == 0).unwrap_or(8);
            Some(String::from_utf8_lossy(&name[..end]).into_owned())
        })
        .collect()
}

#[test]
fn windows_agent_under_wine_gets_a_certificate_and_renews_it_twice() {
    let exe = windows_dir().join("meshca.exe");
    let exe = built(exe.clone(), &cargo_sources(&exe));
    assert_shipping_size(&exe);
    let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wine/bcryptprimitives.c");
    built(windows_dir().join("bcryptprimitives.dll"), &[shim]);
    let tmp = tempfile::tempdir().unwrap();
    let wine = Wine::new(tmp.path().join("wine"));

    // Smoke: the Windows binary starts (this run also creates the prefix).
    let version = assert_success(&output(wine.command(&exe).arg("--version")), "meshca.exe --version");
    assert_eq!(version.trim_end(), format!("meshca {}", env!("CARGO_PKG_VERSION")));
    let help = assert_success(&output(wine.command(&exe).args(["certify", "--help"])), "certify --help");
    assert!(help.contains("--trust-anchors") && help.contains("--out"), "{help}");

    // The server, on this host's clock: Wine shares it, so no backdate is needed
    // and a leaf is valid for exactly the 10 s asked for.
    let data = tmp.path().join("data");
    let mut server =
        Process::spawn(process::meshca().args(["serve", "--dev", "--data-dir"]).arg(&data).args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--issuance-lifetime",
            "10s",
            "--clock-skew-allowance",
            "0s",
        ]));
    let first = server.stderr.wait_for("meshca dev mode:", Instant::now() + COMMAND_TIMEOUT);
    let grpc =
        first.split("gRPC on ").nth(1).and_then(|s| s.split(',').next()).expect("gRPC address").to_owned();
    let token = assert_success(
        &output(process::meshca().args(["dev-token", "--data-dir"]).arg(&data).args([
            "--namespace",
            "default",
            "--service-account",
            "web",
        ])),
        "dev-token",
    );
    let token_file = tmp.path().join("web.token");
    std::fs::write(&token_file, token.trim_end()).unwrap();

    let anchors_file = data.join("trust-anchors.pem");
    let anchors = TrustAnchors::load(&anchors_file).unwrap();
    let out = tmp.path().join("out");
    let hooked = tmp.path().join("hooked.crt");
    let hook = format!("type {} > {}", windows_path(&out.join("tls.crt")), windows_path(&hooked));
    let mut agent = Process::spawn(wine.command(&exe).args([
        "agent",
        "--addr",
        &grpc,
        "--trust-anchors",
        &windows_path(&anchors_file),
        "--token-file",
        &windows_path(&token_file),
        "--identity",
        WEB,
        "--out",
        &windows_path(&out),
        "--on-renew",
        &hook,
    ]));

    // Three rounds: the first certificate and two renewals, each a new key and a
    // new leaf that chains to the anchors, written whole, with the hook run after.
    let deadline = Instant::now() + RENEWALS_TIMEOUT;
    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut fingerprints = BTreeSet::new();
    let mut last_round: Option<SystemTime> = None;
    while seen.len() < 3 {
        let line = agent.stderr.wait_for("certificate renewed", deadline);
        // The agent's own timestamp, which starts the line.
        let at = line.split_whitespace().next().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        let at = at.unwrap_or_else(|| panic!("no timestamp in {line:?}"));
        if let Some(previous) = last_round {
            // Half of the 10 s lifetime, less at most 10% jitter: no renewal loop.
            let gap = at.duration_since(previous).unwrap_or_default();
            assert!(gap >= Duration::from_secs(4), "renewed {gap:?} after the previous round");
        }
        last_round = Some(at);
        let chain = std::fs::read(out.join("tls.crt")).unwrap();
        let key = std::fs::read(out.join("tls.key")).unwrap();
        assert!(
            seen.iter().all(|(c, k)| *c != chain && *k != key),
            "round {} reused a certificate or key",
            seen.len() + 1
        );
        let certs = certificates(&chain);
        assert!(certs.len() >= 2, "leaf and issuer expected in tls.crt");
        anchors.verify(&certs[0], &certs[1..], SystemClock.now(), Some(WEB)).expect("the chain verifies");
        assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), std::fs::read(&anchors_file).unwrap());
        assert_eq!(
            std::fs::read(&hooked).unwrap(),
            chain,
            "the --on-renew hook ran after the files were written"
        );
        fingerprints.insert(fingerprint(&certs[0]));
        seen.push((chain, key));
    }
    let names: BTreeSet<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["ca.crt", "tls.crt", "tls.key"].map(Into::into).into(), "temporary files left behind");

    // Ctrl-C ends the agent cleanly.
    let status = agent.stop("INT", COMMAND_TIMEOUT);
    assert!(status.success(), "agent exit after Ctrl-C: {status}\n{}", agent.stderr.seen.join("\n"));
    let errors: Vec<&String> = agent.stderr.seen.iter().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "the agent logged errors:\n{}", agent.stderr.seen.join("\n"));

    // `meshca doctor` from the Windows build: name, port, TLS and clock are fine
    // (Wine shares this host's clock); the 10 s certificate on disk may have expired.
    let doctor = output(wine.command(&exe).args([
        "doctor",
        "--addr",
        &grpc,
        "--trust-anchors",
        &windows_path(&anchors_file),
        "--cert-dir",
        &windows_path(&out),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| {
        panic!("doctor --json under Wine: {e}\n{}", String::from_utf8_lossy(&doctor.stderr))
    });
    let checks = report.as_array().expect("an array of checks");
    assert_eq!(checks.len(), 6, "{report}");
    for name in ["dns", "tcp", "tls", "clock"] {
        let check = checks.iter().find(|c| c["check"] == name).expect("every check reported");
        assert_eq!(check["status"], "OK", "doctor under Wine, {name}: {check}");
    }

    // The audit log holds exactly these three issuances and no refusal.
    assert!(server.stop("TERM", COMMAND_TIMEOUT).success(), "serve exit:\n{}", server.stderr.seen.join("\n"));
    let records = issued_for(&data.join("audit.jsonl"), WEB);
    assert!(records.iter().all(|r| r["outcome"] == "issued"), "{records:?}");
    let audited: BTreeSet<String> =
        records.iter().map(|r| r["fingerprint_sha256"].as_str().expect("fingerprint").to_owned()).collect();
    assert_eq!(audited, fingerprints, "audited issuances differ from the certificates written");
}
