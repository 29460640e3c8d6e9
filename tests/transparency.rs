//! The audit log against an insider who can write it but does not hold the audit
//! key: records edited, deleted or appended with the whole chain recomputed, a
//! checkpointed record cut off, the log deleted. Each is caught by `meshca audit
//! verify --key … --checkpoint …` and by `meshca serve` at start, naming what
//! disagrees; an unclean stop and a new log are told apart from forgeries; and Go's
//! `golang.org/x/mod/sumdb/note` and `sumdb/tlog`, an implementation meshca shares
//! no code with, accept meshca's checkpoints and proofs and reject tampered ones.
//!
//! Every server is the real binary (`serve --dev`) on loopback ports; the forgeries
//! are made on copies of its data directory after a clean stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use meshca_test_support as support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::apiserver::ApiServer;
use support::audit::{forge, lines};
use support::process::{meshca, output, ServeBin, PATIENCE};

const RUN: &str = "exec \"$@\"";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn run(args: &[&str]) -> Output {
    output(meshca().args(args), PATIENCE)
}

/// `meshca audit verify LOG --key DATA/audit.pub [--checkpoint SAVED]`.
fn verify(data: &Path, saved: Option<&Path>) -> Output {
    let (log, key) = (data.join("audit.jsonl"), data.join("audit.pub"));
    let mut args = vec!["audit", "verify", p(&log), "--key", p(&key)];
    if let Some(saved) = saved {
        args.extend(["--checkpoint", p(saved)]);
    }
    run(&args)
}

/// `meshca serve --dev --data-dir DATA` expected to refuse to start: its output.
fn serve_refused(data: &Path) -> Output {
    let out = run(&[
        "serve",
        "--dev",
        "--data-dir",
        p(data),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1), "serve must refuse the log: {}", text(&out));
    out
}

/// Certifies `n` times.
async fn certify(serve: &ServeBin, n: usize) {
    let mut client = serve.client().await;
    for _ in 0..n {
        client.certify(serve.request("web")).await.unwrap();
    }
}

/// The `serial` of every `issued` record.
fn serials(log: &Path) -> Vec<String> {
    let records = lines(log).into_iter().map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap());
    records.filter(|r| r["outcome"] == "issued").map(|r| r["serial"].as_str().unwrap().to_owned()).collect()
}

/// A dev server's data directory after two runs: three certificates, a clean stop,
/// the checkpoint copied as a witness keeps it (returned), two more, a clean stop.
async fn two_runs(data: &Path) -> PathBuf {
    let mut serve = ServeBin::start(&[], RUN, data, &[]).await;
    certify(&serve, 3).await;
    serve.stop().await;
    let saved = data.with_file_name("witness.checkpoint");
    std::fs::copy(data.join("audit.jsonl.checkpoint"), &saved).unwrap();
    let mut serve = ServeBin::start(&[], RUN, data, &[]).await;
    certify(&serve, 2).await;
    serve.stop().await;
    saved
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_log_verifies_against_both_checkpoints_and_proves_each_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let saved = two_runs(&data).await;
    let log = data.join("audit.jsonl");
    let records = lines(&log).len();
    // Two serving certificates and five Certify calls.
    assert_eq!(serials(&log).len(), 7, "{:?}", lines(&log));

    let out = verify(&data, Some(&saved));
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("intact, {records} records; {records} proven by signed checkpoints")),
        "{said}"
    );
    assert!(
        said.contains("written as meshca closed the log") && said.contains("append-only since"),
        "{said}"
    );
    assert!(!said.contains("not yet covered"), "{said}");
    // serve --dev made the audit key (owner-only) and its verifier key.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("audit-signing.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let vkey = std::fs::read_to_string(data.join("audit.pub")).unwrap();
    vkey.trim().parse::<meshca::audit::checkpoint::VerifierKey>().unwrap();
    let checkpoint = std::fs::read_to_string(data.join("audit.jsonl.checkpoint")).unwrap();
    assert!(
        checkpoint.starts_with("meshca/cluster.local/") && checkpoint.contains("\nclosed\n\n"),
        "{checkpoint}"
    );

    for serial in serials(&log) {
        let key = data.join("audit.pub");
        let out = run(&["audit", "prove", p(&log), "--key", p(&key), "--serial", &serial]);
        assert!(out.status.success(), "{}", text(&out));
        let proof: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(proof["tree_size"], records as u64);
        assert!(proof["record"].as_str().unwrap().contains(&serial));
    }
    // Without a key the chain alone is checked, and said to prove nothing.
    let out = run(&["audit", "verify", p(&log)]);
    assert!(out.status.success() && text(&out).contains("without --key nothing is proven"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_with_a_recomputed_chain_fail_verify_and_stop_serve_naming_what_disagrees() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    let saved = two_runs(&original).await;
    let cut_in_half = |lines: &mut Vec<String>| {
        let last = lines.pop().unwrap();
        lines.push(last[..last.len() / 2].to_owned());
    };
    type Edit = Box<dyn Fn(&Path)>;
    let forgeries: Vec<(&str, Edit, &str)> = vec![
        (
            "an issued record's identity edited",
            Box::new(|log| forge(log, |l| l[2] = l[2].replace("\"web.default.", "\"admin.default."))),
            "do not hash to the root",
        ),
        ("a record deleted", Box::new(|log| forge(log, |l| drop(l.remove(3)))), "were removed"),
        (
            "a record appended",
            Box::new(|log| forge(log, |l| l.push(l[2].replace("\"web.default.", "\"admin.default.")))),
            "meshca did not write them",
        ),
        (
            "the last (checkpointed) record cut in half",
            Box::new(move |log| {
                let mut l = lines(log);
                cut_in_half(&mut l);
                std::fs::write(log, l.concat()).unwrap();
            }),
            "and an incomplete line",
        ),
        (
            "the log emptied",
            Box::new(|log| std::fs::write(log, "").unwrap()),
            "the log has 0 complete record(s)",
        ),
    ];
    for (i, (what, edit, says)) in forgeries.iter().enumerate() {
        let data = tmp.path().join(format!("forged-{i}"));
        copy_dir(&original, &data);
        edit(&data.join("audit.jsonl"));
        let forged = lines(&data.join("audit.jsonl"));
        // The chain alone is fooled by a recomputed chain; the checkpoints are not.
        let out = verify(&data, Some(&saved));
        assert_eq!(out.status.code(), Some(1), "{what}: verify must fail: {}", text(&out));
        assert!(
            text(&out).contains("audit.jsonl.checkpoint") && text(&out).contains(says),
            "{what}: {}",
            text(&out)
        );
        let out = serve_refused(&data);
        let said = text(&out);
        assert!(
            said.contains("disagrees with its signed checkpoint") && said.contains(says),
            "{what}: {said}"
        );
        assert!(said.contains("--audit-new-log"), "{what}: names the way out: {said}");
        // Nothing was changed by the refused start.
        assert_eq!(
            lines(&data.join("audit.jsonl")),
            forged,
            "{what}: the refused start left the log as it was"
        );
    }
    // The witness's copy alone (the log's own checkpoint removed as well) still catches an edit.
    let data = tmp.path().join("no-checkpoint");
    copy_dir(&original, &data);
    std::fs::remove_file(data.join("audit.jsonl.checkpoint")).unwrap();
    forge(&data.join("audit.jsonl"), |l| l[1] = l[1].replace("\"web.default.", "\"admin.default."));
    let out = verify(&data, Some(&saved));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("witness.checkpoint") && text(&out).contains("do not hash to the root"),
        "{}",
        text(&out)
    );
    // And a missing log is refused at start too.
    let data = tmp.path().join("deleted");
    copy_dir(&original, &data);
    std::fs::remove_file(data.join("audit.jsonl")).unwrap();
    let said = text(&serve_refused(&data));
    assert!(
        said.contains("the log has 0 complete record(s)") && said.contains("deleted or replaced"),
        "{said}"
    );
    assert!(
        !data.join("audit.jsonl").exists() || std::fs::read(data.join("audit.jsonl")).unwrap().is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclean_stop_is_recorded_and_its_uncovered_records_are_covered_from_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start(&[], RUN, &data, &[]).await;
    certify(&serve, 1).await;
    serve.stop().await;
    // Checkpoints only every 1000 records or 1 hour: the next two records stay uncovered.
    let slow = ["--audit-checkpoint-interval", "1h"];
    let mut serve = ServeBin::start(&[], RUN, &data, &slow).await;
    certify(&serve, 2).await;
    assert!(serve.process.signal("KILL"));
    serve.wait_exit().await;
    let log = data.join("audit.jsonl");
    let records = lines(&log).len() as u64;
    let out = verify(&data, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("are not yet covered by a checkpoint: not proven"), "{}", text(&out));

    let mut serve = ServeBin::start(&[], RUN, &data, &[]).await;
    serve.stop().await;
    let uncovered: Vec<serde_json::Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["outcome"] == "uncovered")
        .collect();
    assert_eq!(uncovered.len(), 1, "{:?}", lines(&log));
    assert_eq!(uncovered[0]["uncovered_to"], records);
    assert!(uncovered[0]["reason"].as_str().unwrap().starts_with("unclean_stop:"), "{}", uncovered[0]);
    let out = verify(&data, None);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    let covered = records - uncovered[0]["uncovered_from"].as_u64().unwrap() + 1;
    assert!(
        said.contains(&format!("{covered} record(s) were written before a checkpoint could cover them")),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_starts_only_when_asked_and_its_first_record_holds_the_old_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = ServeBin::start(&[], RUN, &data, &[]).await;
    certify(&serve, 1).await;
    serve.stop().await;
    let old = std::fs::read_to_string(data.join("audit.jsonl.checkpoint")).unwrap();
    std::fs::rename(data.join("audit.jsonl"), tmp.path().join("kept-as-evidence.jsonl")).unwrap();
    serve_refused(&data);
    let mut serve = ServeBin::start(&[], RUN, &data, &["--audit-new-log"]).await;
    certify(&serve, 1).await;
    serve.stop().await;
    let first: serde_json::Value = serde_json::from_str(&lines(&data.join("audit.jsonl"))[0]).unwrap();
    assert_eq!(
        (first["outcome"].as_str(), first["previous_file"].as_str()),
        (Some("continued"), Some("replaced"))
    );
    assert_eq!(first["previous_checkpoint"], old.as_str());
    let out = verify(&data, None);
    assert!(
        out.status.success() && text(&out).contains("continues a previous log (replaced)"),
        "{}",
        text(&out)
    );
    // Left in place, the flag does nothing to a log that is there.
    let before = lines(&data.join("audit.jsonl")).len();
    let mut serve = ServeBin::start(&[], RUN, &data, &["--audit-new-log"]).await;
    serve.stop().await;
    assert_eq!(
        lines(&data.join("audit.jsonl")).len(),
        before + 1,
        "one more record: the serving certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checkpoint_is_also_one_json_log_line_that_jq_style_extraction_gets_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let json = ["--log-format", "json", "--audit-checkpoint-every", "1"];
    let mut serve = ServeBin::start_quiet(&[], RUN, &data, &json).await;
    certify(&serve, 2).await;
    serve.stop().await;
    assert!(serve.process.stderr.read_to_end(std::time::Instant::now() + PATIENCE));
    let notes: Vec<String> = serve
        .process
        .stderr
        .seen
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["message"] == "audit checkpoint")
        .map(|v| v["checkpoint"].as_str().expect("the note as a string").to_owned())
        .collect();
    let key: meshca::audit::checkpoint::VerifierKey =
        std::fs::read_to_string(data.join("audit.pub")).unwrap().trim().parse().unwrap();
    let sizes: Vec<u64> = notes
        .iter()
        .map(|note| {
            meshca::audit::checkpoint::Checkpoint::open(note, std::slice::from_ref(&key)).unwrap().size
        })
        .collect();
    // One a record (the serving certificate, two issuances), then the closing one again at 3.
    assert_eq!(sizes, [1, 2, 3, 3], "{notes:?}");
    assert_eq!(notes.last().unwrap(), &std::fs::read_to_string(data.join("audit.jsonl.checkpoint")).unwrap());
}

#[test]
fn init_writes_an_audit_key_and_a_file_log_outside_dev_requires_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = run(&["init", "--dir", p(&ca)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("audit.pub"), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("audit-signing.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let vkey = std::fs::read_to_string(ca.join("audit.pub")).unwrap();
    assert!(vkey.starts_with("meshca/cluster.local+"), "{vkey}");
    vkey.trim().parse::<meshca::audit::checkpoint::VerifierKey>().unwrap();

    let jwks = support::process::jwks_file(tmp.path());
    let audit = tmp.path().join("audit.jsonl");
    let mut cmd = meshca();
    support::process::serve_with_jwks(&mut cmd, &ca.join("trust-anchors.pem"), &ca.join("issuer"), &jwks);
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let key_at = args.iter().position(|a| a == "--audit-signing-key").unwrap();
    let mut without_key = meshca();
    without_key.args(&args[..key_at]).args(&args[key_at + 2..]).args(["--audit-log", p(&audit)]);
    let out = output(&mut without_key, PATIENCE);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--audit-signing-key is required when the audit log is a file"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_kubernetes_client_each_logs_latest_checkpoint_is_kept_in_a_configmap() {
    let api = ApiServer::start().await;
    let opts = support::Options {
        token: Some(api.tokenreview_config()),
        audit_checkpoint_every: 2,
        audit_configmap: true,
        ..Default::default()
    };
    let server = support::TestServer::start_with(opts).await;
    let mut client = server.client().await;
    for _ in 0..3 {
        let (_key, request) = server.request("default", "web");
        let token = api.token(&server.claims("default", "web"));
        let request = meshca::proto::CertifyRequest { token, ..request };
        client.certify(request).await.unwrap();
    }
    // Records, one batch each: the serving certificate and three issuances; a
    // checkpoint at 2 and at 4. A newer one may replace one not yet applied.
    let log_id = lines(&server.audit_path)[0][..].split("\"hash\":\"").nth(1).unwrap()[..16].to_owned();
    let name = meshca::cluster::checkpoints::configmap_name(&log_id);
    let stored = tokio::time::timeout(PATIENCE, async {
        for applies in 1.. {
            api.configmap_applies_reach(applies).await;
            let stored = api.configmap("meshca-system", &name).expect("the ConfigMap");
            if stored["data"]["checkpoint"].as_str().unwrap().contains("\n4\n") {
                return stored;
            }
        }
        unreachable!()
    })
    .await
    .expect("the checkpoint of 4 records reaches the ConfigMap");
    assert_eq!(stored["metadata"]["labels"]["app.kubernetes.io/component"], "audit-checkpoint");
    let note = stored["data"]["checkpoint"].as_str().unwrap();
    let key: meshca::audit::checkpoint::VerifierKey =
        std::fs::read_to_string(server.dir.path().join("audit.pub")).unwrap().trim().parse().unwrap();
    let checkpoint = meshca::audit::checkpoint::Checkpoint::open(note, &[key]).unwrap();
    assert_eq!(stored["metadata"]["annotations"]["meshca.io/audit-origin"], checkpoint.origin.as_str());
    assert_eq!(checkpoint.log_id(), log_id);
    assert_eq!(checkpoint.size, 4, "{note}");
    let file = std::fs::read_to_string(meshca::audit::checkpoint_path(&server.audit_path)).unwrap();
    assert_eq!(file, note, "the same note beside the log");
}

// ---------------------------------------------------------------------------
// An independent verifier: Go's sumdb/note and sumdb/tlog
// ---------------------------------------------------------------------------

/// Builds tests/go/src/tlogcheck offline in GOPATH mode against Debian's
/// golang-golang-x-mod-dev (tests/run.sh installs both).
fn tlogcheck() -> PathBuf {
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bin = out_dir.join("tlogcheck");
    let gopath = format!("{}/tests/go:/usr/share/gocode", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("tlogcheck")
        .env("GOPATH", gopath)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", out_dir.join("gocache"))
        .output()
        .expect("go (Debian's golang-go; tests/run.sh installs it)");
    assert!(out.status.success(), "go build tlogcheck: {}", text(&out));
    bin
}

fn go_check(bin: &Path, args: &[&Path]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    output(&mut cmd, PATIENCE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_sumdb_accepts_meshcas_checkpoints_and_proofs_and_rejects_tampered_ones() {
    let bin = tlogcheck();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let saved = two_runs(&data).await;
    let (log, key, checkpoint) =
        (data.join("audit.jsonl"), data.join("audit.pub"), data.join("audit.jsonl.checkpoint"));
    let ok = |out: Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert!(text(&out).starts_with("ok "), "{what}: {}", text(&out));
    };
    let refused = |out: Output, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{what} must be rejected: {}", text(&out));
    };
    ok(go_check(&bin, &[Path::new("tree"), &key, &log, &checkpoint]), "the latest checkpoint");
    ok(go_check(&bin, &[Path::new("tree"), &key, &log, &saved]), "the witness's checkpoint");

    let write = |name: &str, out: Output| {
        assert!(out.status.success(), "{}", text(&out));
        let path = tmp.path().join(name);
        std::fs::write(&path, &out.stdout).unwrap();
        path
    };
    let mut inclusions = Vec::new();
    for (i, serial) in serials(&log).iter().enumerate() {
        let out = run(&["audit", "prove", p(&log), "--key", p(&key), "--serial", serial]);
        let proof = write(&format!("inclusion-{i}.json"), out);
        ok(go_check(&bin, &[Path::new("inclusion"), &key, &proof]), "an inclusion proof");
        inclusions.push(proof);
    }
    let out = run(&["audit", "prove", p(&log), "--key", p(&key), "--checkpoint", p(&saved)]);
    let consistency = write("consistency.json", out);
    ok(go_check(&bin, &[Path::new("consistency"), &key, &consistency]), "the consistency proof");

    // Tampered: a record (its chain recomputed), a proof, a checkpoint, a key.
    let forged = tmp.path().join("forged.jsonl");
    std::fs::copy(&log, &forged).unwrap();
    forge(&forged, |l| l[2] = l[2].replace("\"web.default.", "\"admin.default."));
    refused(go_check(&bin, &[Path::new("tree"), &key, &forged, &checkpoint]), "a forged log");
    let mut proof: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&inclusions[3]).unwrap()).unwrap();
    proof["record"] = proof["record"].as_str().unwrap().replace("\"web.default.", "\"admin.default.").into();
    let bad = tmp.path().join("bad-inclusion.json");
    std::fs::write(&bad, proof.to_string()).unwrap();
    refused(go_check(&bin, &[Path::new("inclusion"), &key, &bad]), "an edited record's inclusion");
    let mut proof: serde_json::Value = serde_json::from_slice(&std::fs::read(&consistency).unwrap()).unwrap();
    proof["consistency_proof"][0] = proof["consistency_proof"][1].clone();
    let bad = tmp.path().join("bad-consistency.json");
    std::fs::write(&bad, proof.to_string()).unwrap();
    refused(go_check(&bin, &[Path::new("consistency"), &key, &bad]), "an altered consistency proof");
    let note = std::fs::read_to_string(&checkpoint).unwrap();
    let size = note.lines().nth(1).unwrap();
    let bigger = tmp.path().join("bigger.checkpoint");
    std::fs::write(
        &bigger,
        note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size.parse::<u64>().unwrap() + 1), 1),
    )
    .unwrap();
    refused(go_check(&bin, &[Path::new("tree"), &key, &log, &bigger]), "a checkpoint with its size changed");
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other_key = support::audit_key(&other).with_file_name("audit.pub");
    refused(go_check(&bin, &[Path::new("tree"), &other_key, &log, &checkpoint]), "another key");
}
