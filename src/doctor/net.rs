//! The way to meshca: its address, name resolution and TCP reachability.
//!
//! Resolution uses the system resolver (`getaddrinfo`, through tokio), as the
//! agent does, twice, to notice answers that change. Every address is connected
//! to at once, each bounded by the timeout: "refused" (something answered: nothing
//! listens) and "timed out" (nothing answered: usually a firewall dropping packets)
//! call for different fixes. The first connection that succeeds is handed to the
//! TLS check ([`super::tls`]).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{human, Check, Error, Finding};

/// meshca's address, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// As given, for the gRPC client.
    pub url: String,
    /// `https://` (true) or `http://` (false).
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses `https://HOST[:PORT]` or `http://HOST[:PORT]` (default ports 443, 80).
    pub(crate) fn parse(addr: &str) -> Result<Target, Error> {
        let bad = |reason| Error::Address { addr: addr.to_owned(), reason };
        let uri: http::Uri = addr.parse().map_err(|_| bad("not a URL; use https://HOST:PORT"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("use https://HOST:PORT (or http:// for a --plaintext server)")),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or(bad("names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Target { url: addr.to_owned(), tls, host, port })
    }
}

/// Which resolver answers: the system's, with the nameservers it is configured with.
fn resolver() -> String {
    if cfg!(windows) {
        return "the system resolver, the Windows DNS client".into();
    }
    let servers: Vec<String> = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|s| s.trim().to_owned())
        .collect();
    if servers.is_empty() {
        "the system resolver".into()
    } else {
        format!("the system resolver, nameservers {} from /etc/resolv.conf", servers.join(", "))
    }
}

fn family(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| format!("{} ({})", a.ip(), family(a))).collect::<Vec<_>>().join(", ")
}

async fn lookup(target: &Target, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    let found = tokio::time::timeout(timeout, tokio::net::lookup_host((target.host.as_str(), target.port)))
        .await
        .map_err(|_| format!("no answer within {}", human(timeout)))?
        .map_err(|e| e.to_string())?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in found {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    Ok(addrs)
}

/// Check 1: every address the host resolves to, and how long it took.
pub(crate) async fn resolve(target: &Target, timeout: Duration) -> (Finding, Option<Vec<SocketAddr>>) {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, target.port);
        return (
            Finding::ok(Check::Dns, format!("{ip} is an address; nothing to resolve")),
            Some(vec![addr]),
        );
    }
    let host = &target.host;
    let started = Instant::now();
    let first = lookup(target, timeout).await;
    let took = started.elapsed();
    let lookup_fix = if cfg!(windows) {
        format!("check the host name in --addr and this host's DNS settings (`Resolve-DnsName {host}`)")
    } else {
        format!(
            "check the host name in --addr (inside the cluster: meshca.meshca-system.svc) and this host's resolver (`getent hosts {host}`)"
        )
    };
    let addrs = match first {
        Err(e) => {
            return (
                Finding::fail(
                    Check::Dns,
                    format!("{host} does not resolve: {e}; asked {}", resolver()),
                    lookup_fix,
                ),
                None,
            )
        }
        Ok(a) if a.is_empty() => {
            return (
                Finding::fail(
                    Check::Dns,
                    format!("{host} resolves to no address; asked {}", resolver()),
                    lookup_fix,
                ),
                None,
            )
        }
        Ok(a) => a,
    };
    let found = format!("{host} resolves to {} in {} via {}", list(&addrs), human(took), resolver());
    let sorted = |a: &[SocketAddr]| {
        let mut v = a.to_vec();
        v.sort();
        v
    };
    let finding = match lookup(target, timeout).await {
        Ok(again) if sorted(&again) != sorted(&addrs) => Finding::warn(
            Check::Dns,
            format!("{found}, but a second lookup gave {}", list(&again)),
            "answers that change are expected for round-robin DNS; otherwise check the DNS records for the host",
        ),
        Ok(_) => Finding::ok(Check::Dns, found),
        Err(e) => Finding::warn(Check::Dns, format!("{found}, but a second lookup failed: {e}"), "the resolver is unreliable; check this host's DNS settings"),
    };
    (finding, Some(addrs))
}

/// How one connection attempt ended.
enum Attempt {
    Connected(TcpStream, Duration),
    Refused,
    TimedOut,
    Other(std::io::Error),
}

async fn attempt(addr: SocketAddr, timeout: Duration) -> Attempt {
    let started = Instant::now();
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Attempt::TimedOut,
        Ok(Ok(stream)) => Attempt::Connected(stream, started.elapsed()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Attempt::Refused,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => Attempt::TimedOut,
        Ok(Err(e)) => Attempt::Other(e),
    }
}

/// Check 2: a TCP connection to every address at once; returns the first address
/// (in resolver order) that accepted, with its connection.
pub(crate) async fn reach(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> (Finding, Option<(SocketAddr, TcpStream)>) {
    let mut set = tokio::task::JoinSet::new();
    for (i, &addr) in addrs.iter().enumerate() {
        set.spawn(async move { (i, attempt(addr, timeout).await) });
    }
    let mut results: Vec<Option<Attempt>> = addrs.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, a)) = joined {
            results[i] = Some(a);
        }
    }
    let (mut parts, mut fixes, mut first) = (Vec::new(), Vec::new(), None);
    let port = addrs.first().map(SocketAddr::port).unwrap_or_default();
    for (addr, result) in addrs.iter().zip(results) {
        match result {
            Some(Attempt::Connected(stream, took)) => {
                parts.push(format!("{addr} accepted in {}", human(took)));
                if first.is_none() {
                    first = Some((*addr, stream));
                }
            }
            Some(Attempt::Refused) => {
                parts.push(format!("{addr} refused the connection (nothing listens there)"));
                fixes.push(format!(
                    "start meshca or correct the port in --addr (meshca's gRPC port, 8080 by default, not the admin port 9990); \
                     check with `ss -ltn` on meshca's host that it listens on {port}"
                ));
            }
            Some(Attempt::TimedOut) => {
                parts.push(format!(
                    "{addr} did not answer within {} (likely dropped by a firewall)",
                    human(timeout)
                ));
                fixes.push(format!(
                    "allow TCP {port} from this host to {} (firewall, security group or NetworkPolicy)",
                    addr.ip()
                ));
            }
            Some(Attempt::Other(e)) => {
                parts.push(format!("{addr}: {e}"));
                fixes.push("check this host's network and routes to meshca".into());
            }
            None => parts.push(format!("{addr}: the attempt was lost")),
        }
    }
    fixes.dedup();
    let found = parts.join(", ");
    let finding = match (&first, fixes.is_empty()) {
        (Some(_), true) => Finding::ok(Check::Tcp, found),
        (Some((addr, _)), false) => Finding::warn(
            Check::Tcp,
            format!("{found}; clients may try the failing addresses first (doctor continues with {addr})"),
            fixes.join("; "),
        ),
        (None, _) => Finding::fail(Check::Tcp, found, fixes.join("; ")),
    };
    (finding, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_taken_apart_with_default_ports() {
        let t = Target::parse("https://meshca.example:8080").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (true, "meshca.example", 8080));
        let t = Target::parse("http://[::1]").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (false, "::1", 80));
        assert_eq!(Target::parse("https://h").unwrap().port, 443);
    }

    #[test]
    fn addresses_without_a_scheme_or_host_are_usage_errors() {
        assert!(matches!(Target::parse("meshca:8080"), Err(Error::Address { .. })));
        assert!(matches!(Target::parse("ftp://meshca"), Err(Error::Address { .. })));
        assert!(matches!(Target::parse("not a url"), Err(Error::Address { .. })));
    }
}
