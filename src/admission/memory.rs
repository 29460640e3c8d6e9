//! The memory a replica may use, read from its cgroup, and the in-flight bound
//! that fits in it.
//!
//! Without `--max-in-flight`, the bound is sized to the container's memory limit
//! (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`, the smallest on the way
//! up from the process's cgroup to the root of the mounted hierarchy): a herd then
//! queues and is answered `ResourceExhausted` instead of the kernel killing the
//! replica for memory. With no limit the bound is [`DEFAULT_MAX_IN_FLIGHT`]. The
//! per-request and per-connection costs are measured figures (docs/performance.md, Admission
//! control); a quarter of the limit is left for the allocator's slack and the page
//! cache the audit log's writes are charged with.

use std::path::{Path, PathBuf};

/// The in-flight bound without a memory limit (and the most it is ever sized to).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8192;
/// The least the bound is sized to, however small the limit.
pub(crate) const MIN_MAX_IN_FLIGHT: usize = 64;
/// Resident memory of a started server before any request (12.0–12.5 MiB idle).
pub const BASE_BYTES: u64 = 16 << 20;
/// One open connection: 34–48 KiB measured with 250 to 2,000 connections.
pub const PER_CONNECTION_BYTES: u64 = 40 << 10;
/// One request in flight: 14–20 KiB measured at 1,024 to 4,096 in flight.
pub const PER_REQUEST_BYTES: u64 = 20 << 10;

/// Limits at or above this are "no limit" (cgroup v1 reports one near `i64::MAX`).
const UNLIMITED: u64 = 1 << 60;

/// The process-wide budget for request messages not yet received whole
/// (`server::budget`): an eighth of the memory limit, from 2 MiB to
/// [`MAX_UNFINISHED_BUDGET`], which is also the budget without a limit.
pub fn unfinished_budget_for(limit: Option<u64>) -> usize {
    let Some(limit) = limit else { return MAX_UNFINISHED_BUDGET };
    usize::try_from(limit / 8).unwrap_or(usize::MAX).clamp(MIN_UNFINISHED_BUDGET, MAX_UNFINISHED_BUDGET)
}

/// The largest budget for unfinished request messages.
pub const MAX_UNFINISHED_BUDGET: usize = 64 << 20;
/// The smallest: room for about thirty connections' shares.
const MIN_UNFINISHED_BUDGET: usize = 2 << 20;

/// The in-flight bound for a replica with `limit` bytes of memory (None: no limit)
/// that holds up to `max_connections` connections: what is left of three quarters of
/// the limit after the idle server, the connections and the budget for unfinished
/// request messages ([`unfinished_budget_for`]).
pub fn max_in_flight_for(limit: Option<u64>, max_connections: usize) -> usize {
    let Some(limit) = limit else { return DEFAULT_MAX_IN_FLIGHT };
    let connections = PER_CONNECTION_BYTES.saturating_mul(max_connections as u64);
    let unfinished = unfinished_budget_for(Some(limit)) as u64;
    let for_requests =
        (limit / 4 * 3).saturating_sub(BASE_BYTES).saturating_sub(connections).saturating_sub(unfinished);
    usize::try_from(for_requests / PER_REQUEST_BYTES)
        .unwrap_or(usize::MAX)
        .clamp(MIN_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT)
}

/// This process's memory limit in bytes, None when there is none (or no cgroup
/// file system to read it from).
pub fn limit() -> Option<u64> {
    let (cgroup, mountinfo) = proc_files()?;
    limit_from(&cgroup, &mountinfo, |path| std::fs::read_to_string(path).ok())
}

/// This process's memory cgroup directories (v2, and v1's memory hierarchy) with
/// the name of the limit file in each.
pub fn own_cgroups() -> Vec<(PathBuf, &'static str)> {
    let Some((cgroup, mountinfo)) = proc_files() else { return Vec::new() };
    memory_cgroups(&cgroup, &mountinfo)
        .into_iter()
        .map(|(point, below, file)| (point.join(below), file))
        .collect()
}

/// `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn proc_files() -> Option<(String, String)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    Some((cgroup, std::fs::read_to_string("/proc/self/mountinfo").ok()?))
}

/// The smallest memory limit on the way from this process's memory cgroup up to
/// the root of its mounted hierarchy, `read` giving a file's contents.
fn limit_from(cgroup: &str, mountinfo: &str, read: impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let mut files = Vec::new();
    for (point, below, file) in memory_cgroups(cgroup, mountinfo) {
        // The cgroup's own directory, then each parent up to the mount point.
        files.extend(below.ancestors().map(|dir| point.join(dir).join(file)));
    }
    files
        .iter()
        .filter_map(|path| read(path)?.trim().parse::<u64>().ok()) // v2's "max": no limit
        .filter(|&bytes| bytes < UNLIMITED)
        .min()
}

/// Where this process's memory cgroups are: (mount point, the cgroup's path below
/// it, the limit file's name), for the v2 hierarchy and the v1 memory hierarchy
/// where each is mounted.
fn memory_cgroups(cgroup: &str, mountinfo: &str) -> Vec<(PathBuf, PathBuf, &'static str)> {
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut found = Vec::new();
    for line in cgroup.lines() {
        // "hierarchy-id:controllers:path"; v2 is "0::path".
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let v2 = id == "0" && controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        for mount in &mounts {
            let kind = if v2 { mount.fs == "cgroup2" } else { mount.fs == "cgroup" && mount.memory };
            // A mount shows its hierarchy from `root` down (a container's cgroup
            // namespace, or a bind mount of one cgroup); paths outside it are not here.
            if let (true, Ok(below)) = (kind, Path::new(path).strip_prefix(mount.root)) {
                found.push((PathBuf::from(mount.point), below.to_owned(), file));
            }
        }
    }
    found
}

/// One line of `/proc/self/mountinfo`, the fields used here.
struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fs: &'a str,
    /// A v1 cgroup mount carrying the memory controller (in the super options).
    memory: bool,
}

impl<'a> Mount<'a> {
    /// "id parent major:minor root mount-point options [optional…] - fstype source super-options"
    fn parse(line: &'a str) -> Option<Mount<'a>> {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let (root, point) = (left.nth(3)?, left.next()?);
        let mut right = right.split(' ');
        let fs = right.next()?;
        let memory = right.nth(1).is_some_and(|options| options.split(',').any(|o| o == "memory"));
        Some(Mount { root, point, fs, memory })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// This machine's kind of layout: v1 memory hierarchy beside a v2 one without
    /// the memory controller.
    const HYBRID_CGROUP: &str = "9:name=systemd:/\n4:memory:/pods/web\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
24 1 0:21 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 24 0:23 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
27 24 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 24 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    fn files(entries: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> =
            entries.iter().map(|(p, v)| (PathBuf::from(p), (*v).to_owned())).collect();
        move |p: &Path| map.get(p).cloned()
    }

    #[test]
    fn v1_the_smallest_limit_from_the_cgroup_up_to_the_mount_counts() {
        let read = files(&[
            ("/sys/fs/cgroup/memory/pods/web/memory.limit_in_bytes", "268435456\n"),
            ("/sys/fs/cgroup/memory/pods/memory.limit_in_bytes", "134217728\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            // The v2 hierarchy has no memory controller here: no memory.max.
        ]);
        assert_eq!(limit_from(HYBRID_CGROUP, HYBRID_MOUNTS, read), Some(128 << 20));
    }

    #[test]
    fn v1_without_a_limit_is_none() {
        let read = files(&[
            ("/sys/fs/cgroup/memory/pods/web/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        assert_eq!(limit_from(HYBRID_CGROUP, HYBRID_MOUNTS, read), None);
    }

    #[test]
    fn v2_in_a_container_namespace_reads_the_mount_points_memory_max() {
        let cgroup = "0::/\n";
        let mounts = "31 25 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw,nsdelegate\n";
        let read = files(&[("/sys/fs/cgroup/memory.max", "167772160\n")]);
        assert_eq!(limit_from(cgroup, mounts, read), Some(160 << 20));
        let read = files(&[("/sys/fs/cgroup/memory.max", "max\n")]);
        assert_eq!(limit_from(cgroup, mounts, read), None);
    }

    #[test]
    fn v2_on_a_host_walks_up_from_the_service_cgroup() {
        let cgroup = "0::/system.slice/meshca.service\n";
        let mounts = "31 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let read = files(&[
            ("/sys/fs/cgroup/system.slice/meshca.service/memory.max", "max\n"),
            ("/sys/fs/cgroup/system.slice/memory.max", "1073741824\n"),
        ]);
        assert_eq!(limit_from(cgroup, mounts, read), Some(1 << 30));
    }

    #[test]
    fn a_mount_of_part_of_the_hierarchy_is_read_below_its_root() {
        // Docker without a cgroup namespace: /proc/self/cgroup names the host's
        // path, the container sees only its own cgroup mounted.
        let cgroup = "4:memory:/docker/abc\n";
        let mounts = "40 30 0:35 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        let read = files(&[("/sys/fs/cgroup/memory/memory.limit_in_bytes", "100663296\n")]);
        assert_eq!(limit_from(cgroup, mounts, read), Some(96 << 20));
        // A process outside the mounted part finds nothing.
        assert_eq!(limit_from("4:memory:/other\n", mounts, files(&[])), None);
    }

    #[test]
    fn no_cgroup_file_system_is_none() {
        assert_eq!(limit_from("", "", files(&[])), None);
        assert_eq!(limit_from("garbage\n::\n", "also garbage\n", files(&[])), None);
    }

    #[test]
    fn the_bound_fits_the_limit_and_stays_within_its_floor_and_ceiling() {
        assert_eq!(max_in_flight_for(None, 1024), DEFAULT_MAX_IN_FLIGHT);
        // 160 MiB with 1,024 connections: three quarters are 120 MiB; less 16 for the
        // idle server, 40 for the connections and 20 for unfinished messages, that
        // leaves 44 MiB for requests.
        assert_eq!(max_in_flight_for(Some(160 << 20), 1024), (44 << 20) / (20 << 10));
        assert_eq!(unfinished_budget_for(Some(160 << 20)), 20 << 20);
        assert_eq!(unfinished_budget_for(Some(8 << 20)), 2 << 20);
        assert_eq!(unfinished_budget_for(Some(64 << 30)), MAX_UNFINISHED_BUDGET);
        assert_eq!(unfinished_budget_for(None), MAX_UNFINISHED_BUDGET);
        let worst = |n: usize| BASE_BYTES + 1024 * PER_CONNECTION_BYTES + n as u64 * PER_REQUEST_BYTES;
        for mib in [96u64, 128, 160, 256, 512] {
            let n = max_in_flight_for(Some(mib << 20), 1024);
            assert!(worst(n) <= (mib << 20) / 4 * 3, "{mib} MiB: {n} in flight");
        }
        assert_eq!(max_in_flight_for(Some(32 << 20), 1024), MIN_MAX_IN_FLIGHT);
        assert_eq!(max_in_flight_for(Some(64 << 30), 1024), DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(max_in_flight_for(Some(u64::MAX - 1), usize::MAX), MIN_MAX_IN_FLIGHT);
    }
}
