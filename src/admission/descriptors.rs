//! File descriptors: the process's limit (`RLIMIT_NOFILE`) raised to its hard limit
//! at start, and the gRPC connections that fit below it.
//!
//! Every connection is a descriptor, and so are the audit log, its lock, the data
//! directory's files, the Kubernetes client's connections and the runtime's own. With
//! the gRPC listener's connections capped by `--max-connections` and the admin
//! listener's by [`ADMIN_CONNECTIONS`], [`RESERVED`] are left for everything else, so
//! the gRPC listener never fails to accept for want of a descriptor. Without
//! `--max-connections`, its default is lowered to what fits; a `--max-connections`
//! that does not fit is refused at start.

/// Admin listener connections open at once (`server::admin_listener`).
pub const ADMIN_CONNECTIONS: usize = 32;
/// Descriptors kept for everything but the two listeners' connections.
pub const RESERVED: u64 = 64;

/// Raises the soft limit to the hard limit; the soft limit after (None: no such
/// limit on this platform, or it cannot be read).
pub fn raise() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::increase_nofile_limit(u64::MAX).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The soft limit now (None: no such limit on this platform, or it cannot be read).
pub fn limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The most gRPC connections that fit below a descriptor limit of `nofile` (None:
/// no limit to fit).
pub fn max_connections_for(nofile: Option<u64>) -> Option<usize> {
    let spare = nofile?.saturating_sub(RESERVED).saturating_sub(ADMIN_CONNECTIONS as u64);
    Some(usize::try_from(spare).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_below_the_limit_with_the_admin_listener_and_the_reserve() {
        assert_eq!(max_connections_for(None), None);
        assert_eq!(max_connections_for(Some(1024)), Some(1024 - 64 - 32));
        assert_eq!(max_connections_for(Some(50)), Some(0));
        assert_eq!(max_connections_for(Some(1 << 20)), Some((1 << 20) - 96));
    }

    #[cfg(unix)]
    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let raised = raise().expect("a descriptor limit on unix");
        assert_eq!(limit(), Some(raised));
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert!(raised <= hard);
    }
}
