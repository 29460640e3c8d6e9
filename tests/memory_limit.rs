//! The in-flight bound sized to a real memory limit: `meshca serve` started inside
//! a memory cgroup of its own (created below this process's, v1 or v2, wherever
//! the machine lets it be created and limited) reports the bound that fits the
//! limit, logs it, and an explicit `--max-in-flight` still wins.
//!
//! Needs permission to create cgroups (root, as on the CI machines); without it the
//! test says so on stderr and checks nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::path::PathBuf;

use meshca::admission::memory;
use support::process::ServeBin;

const LIMIT: u64 = 128 << 20;

/// A child of this process's memory cgroup limited to [`LIMIT`]; removed on drop
/// (once the processes in it have exited).
struct Cgroup(PathBuf);

impl Cgroup {
    fn create() -> Option<Cgroup> {
        for (dir, file) in memory::own_cgroups() {
            let child = dir.join(format!("meshca-test-{}", std::process::id()));
            if std::fs::create_dir(&child).is_err() {
                continue;
            }
            let cgroup = Cgroup(child);
            if std::fs::write(cgroup.0.join(file), LIMIT.to_string()).is_ok() {
                return Some(cgroup);
            }
        }
        None
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

async fn in_flight_limit(serve: &ServeBin) -> u64 {
    let (status, body) = support::http_get(serve.admin, "/metrics").await;
    assert_eq!(status, 200);
    support::sample(&body, "meshca_admission_in_flight_limit")
}

#[tokio::test]
async fn the_in_flight_bound_fits_the_cgroups_memory_limit_unless_given() {
    let Some(cgroup) = Cgroup::create() else {
        eprintln!(
            "cannot create a memory cgroup here (not root, or no writable cgroup file system): not checked"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cgroup.0.display());
    let expected = memory::max_in_flight_for(Some(LIMIT), 1024);
    assert!(expected < memory::DEFAULT_MAX_IN_FLIGHT, "{expected}");

    let mut serve = ServeBin::start(&[], &wrapper, &tmp.path().join("data"), &[]).await;
    assert_eq!(in_flight_limit(&serve).await, expected as u64);
    let log = serve
        .process
        .stderr
        .wait_for("admission bounds", std::time::Instant::now() + support::process::PATIENCE);
    assert!(
        log.contains(&format!("max_in_flight={expected}")) && log.contains("memory_limit_mib=128"),
        "{log}"
    );
    serve.stop().await;

    let mut serve =
        ServeBin::start(&[], &wrapper, &tmp.path().join("data"), &["--max-in-flight", "100"]).await;
    assert_eq!(in_flight_limit(&serve).await, 100);
    serve.stop().await;

    // Outside the cgroup there is no such limit (on a machine without one).
    if memory::limit().is_none() {
        let mut serve = ServeBin::start(&[], "exec \"$@\"", &tmp.path().join("data"), &[]).await;
        assert_eq!(in_flight_limit(&serve).await, memory::DEFAULT_MAX_IN_FLIGHT as u64);
        serve.stop().await;
    }
    drop(cgroup);
}
