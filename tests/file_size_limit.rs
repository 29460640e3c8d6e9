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

use meshca_test_support as support;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshca::audit::{sha256_hex, verify_file};
use meshca::proto::CertifyResponse;
use support::process::{bin, ServeBin};
use support::{http_get, wait_ready};
use tonic::Code;

/// The limit, in the 512-byte blocks of POSIX `ulimit -f`: 16 KiB, room for the
/// dev CA's files and a dozen audit records.
const LIMIT_BLOCKS: u64 = 32;

/// `meshca audit verify FILE`: exit code and stderr.
fn audit_verify(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(["audit", "verify"]).arg(path).env("NO_COLOR", "1").output().unwrap();
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

/// `meshca serve --dev` under `ulimit -f BLOCKS`, SIGXFSZ at its default action.
async fn start(blocks: u64, data: &Path) -> ServeBin {
    ServeBin::start(&[], &format!("ulimit -f {blocks} && exec \"$@\""), data, &[]).await
}

/// The process must still be running (not killed by SIGXFSZ).
fn assert_alive(serve: &mut ServeBin) {
    if let Some(status) = serve.process.child.try_wait().unwrap() {
        panic!("meshca is gone ({status}); stderr:\n{}", serve.process.stderr.text());
    }
}

/// The limit the process runs under, in bytes, as the kernel reports it
/// (Linux); else what POSIX `ulimit -f` means.
fn file_size_limit(serve: &ServeBin) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serve.pid()));
    let from_proc = limits.ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("Max file size"))?;
        line["Max file size".len()..].split_whitespace().next()?.parse().ok()
    });
    from_proc.unwrap_or(LIMIT_BLOCKS * 512)
}

/// A refusal because the audit log cannot be written: no certificate, and the
/// process still up.
#[track_caller]
fn assert_refused_for_audit(
    serve: &mut ServeBin,
    result: Result<tonic::Response<CertifyResponse>, tonic::Status>,
) {
    let status = result.expect_err("a certificate was handed out past the file size limit");
    let for_audit =
        status.code() == Code::Unavailable && status.message().contains("audit log cannot be written");
    if !for_audit {
        // A connection cut off: the process probably died. Say how.
        std::thread::sleep(Duration::from_millis(200));
        assert_alive(serve);
        panic!("not refused for the audit log: {status:?}");
    }
    assert_alive(serve);
}

#[tokio::test]
async fn past_a_file_size_limit_serve_refuses_issuance_stays_up_and_serves_again_after_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = start(LIMIT_BLOCKS, &data).await;
    let limit = file_size_limit(&serve);
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
        match client.certify(serve.request("web")).await {
            Ok(resp) => handed_out.push(sha256_hex(&resp.into_inner().leaf_certificate)),
            Err(status) => {
                assert_refused_for_audit(&mut serve, Err(status));
                refused += 1;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if http_get(serve.admin, "/ready").await.0 == 503 {
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
        let result = client.certify(serve.request("web")).await;
        assert_refused_for_audit(&mut serve, result);
        refused += 1;
    }
    assert_alive(&mut serve);
    assert_eq!(http_get(serve.admin, "/ready").await.0, 503);
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
    let resp = client.certify(serve.request("web")).await.unwrap().into_inner();
    let after = sha256_hex(&resp.leaf_certificate);
    assert_alive(&mut serve);
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
