//! `meshca doctor`: why can this host not get (or keep) a certificate?
//!
//! Runs, in order, the checks the agent depends on and reports one [`Finding`] per
//! check, each saying what it found and what to do:
//! 1. `dns`: the CA host's addresses from the system resolver ([`net`]);
//! 2. `tcp`: a connection to each address, refused told apart from timed out;
//! 3. `tls`: the handshake against the trust anchors for the expected server name,
//!    with the verification failure in words ([`tls`]);
//! 4. `clock`: this host's offset to meshca's clock, from the `x-meshca-time`
//!    header of one Certify dry run ([`probe`]), which also tells check 6 whether
//!    meshca would issue with the token;
//! 5. `credentials`: tls.crt and tls.key on disk, judged at meshca's time ([`local`]);
//! 6. `token`: the token file's claims (read, never verified, never printed) and
//!    meshca's verdict on it.
//!
//! A check whose input is missing or whose prerequisite failed says so ("not
//! checked", WARN) rather than guessing. Nothing here writes a file or prints; the
//! [`Report`] is data, rendered as lines or JSON by `commands`. Wall time comes
//! from an injected [`Clock`], so clock offsets and expiry are tested without
//! waiting; timeouts use the monotonic clock.

pub(crate) mod local;
pub(crate) mod net;
pub(crate) mod probe;
pub(crate) mod tls;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::ca::issuer::TrustAnchors;
use crate::clock::Clock;

/// meshca's own name for the default trust domain and control-plane namespace:
/// the server name expected unless `--server-name` says otherwise.
pub(crate) const DEFAULT_SERVER_NAME: &str =
    "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local";
/// Offsets beyond this are worth a warning (the agent warns from here too).
pub(crate) const OFFSET_WARNING: Duration = Duration::from_secs(30);

/// What to check and with which inputs; every input is optional.
#[derive(Clone, Debug)]
pub struct Options {
    /// meshca's address, `https://HOST:PORT` (or `http://` for a plaintext server).
    pub addr: Option<String>,
    pub trust_anchors: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// The identity the agent requests (else the one in `cert_dir/tls.crt`).
    pub identity: Option<String>,
    /// The agent's output directory: `tls.crt`, `tls.key`.
    pub cert_dir: Option<PathBuf>,
    /// Name expected in meshca's serving certificate.
    pub server_name: String,
    /// Bound on each lookup, connection, handshake and call.
    pub timeout: Duration,
    /// meshca's clock-skew allowance: offsets beyond it fail.
    pub skew_allowance: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            addr: None,
            trust_anchors: None,
            token_file: None,
            identity: None,
            cert_dir: None,
            server_name: DEFAULT_SERVER_NAME.to_owned(),
            timeout: Duration::from_secs(3),
            skew_allowance: Duration::from_secs(120),
        }
    }
}

/// Why the doctor cannot start: a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `--addr` is not an http(s) URL with a host.
    #[error("--addr {addr:?}: {reason}")]
    Address { addr: String, reason: &'static str },
}

/// The checks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Dns,
    Tcp,
    Tls,
    Clock,
    Credentials,
    Token,
}

impl Check {
    /// The name printed and used in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Check::Dns => "dns",
            Check::Tcp => "tcp",
            Check::Tls => "tls",
            Check::Clock => "clock",
            Check::Credentials => "credentials",
            Check::Token => "token",
        }
    }
}

/// How a check went; ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result: what it found and, unless it is OK, what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: Check,
    pub status: Status,
    pub found: String,
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: Check, found: impl Into<String>) -> Self {
        Finding { check, status: Status::Ok, found: found.into(), fix: None }
    }
    pub fn warn(check: Check, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding { check, status: Status::Warn, found: found.into(), fix: Some(fix.into()) }
    }
    pub fn fail(check: Check, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding { check, status: Status::Fail, found: found.into(), fix: Some(fix.into()) }
    }
    /// A check that could not run: its input is missing or a prerequisite failed.
    pub(crate) fn not_checked(check: Check, why: &str, fix: impl Into<String>) -> Self {
        Self::warn(check, format!("not checked: {why}"), fix)
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<4}  {}: {}", self.status.label(), self.check.name(), self.found)?;
        match &self.fix {
            Some(fix) => write!(f, "; {fix}"),
            None => Ok(()),
        }
    }
}

/// Every check's finding, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// True when no check failed (warnings allowed).
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.status != Status::Fail)
    }

    /// The finding of `check`.
    pub fn finding(&self, check: Check) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }

    /// Names of the checks that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.findings.iter().filter(|f| f.status == Status::Fail).map(|f| f.check.name()).collect()
    }

    /// One JSON array of `{check, status, found, fix}` (fix `null` when OK).
    pub fn to_json(&self) -> String {
        /// One entry, fields in the documented order.
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            check: &'a str,
            status: &'a str,
            found: &'a str,
            fix: Option<&'a str>,
        }
        let entries: Vec<Entry<'_>> = self
            .findings
            .iter()
            .map(|f| Entry {
                check: f.check.name(),
                status: f.status.label(),
                found: &f.found,
                fix: f.fix.as_deref(),
            })
            .collect();
        // Strings and options only: serialising cannot fail.
        serde_json::to_string_pretty(&entries).unwrap_or_else(|_| "[]".into())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.findings.iter().try_for_each(|finding| writeln!(f, "{finding}"))
    }
}

/// The time a judgement was made at, and whose clock it came from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct At {
    pub time: SystemTime,
    /// True when it is meshca's clock (from the probe), false for this host's.
    pub server: bool,
}

impl At {
    fn whose(&self) -> &'static str {
        if self.server {
            "meshca's clock"
        } else {
            "this host's clock"
        }
    }
}

/// Runs every check and reports. Never fails: what goes wrong is a finding.
pub async fn run(options: &Options, clock: &dyn Clock) -> Report {
    let mut findings = Vec::with_capacity(6);
    let target = options.addr.as_deref().map(net::Target::parse);
    let anchors =
        options.trust_anchors.as_ref().map(|path| TrustAnchors::load(path).map_err(|e| e.to_string()));

    // 1–3: the path to meshca.
    let no_addr = "no --addr (or MESHCA_ADDR) given";
    let addr_fix =
        "pass meshca's address as the agent has it, e.g. --addr https://meshca.meshca-system.svc:8080";
    let target = match target {
        None => {
            findings.push(Finding::not_checked(Check::Dns, no_addr, addr_fix));
            None
        }
        Some(Err(e)) => {
            findings.push(Finding::fail(
                Check::Dns,
                e.to_string(),
                "use https://HOST:PORT (http:// for a --plaintext meshca)",
            ));
            None
        }
        Some(Ok(t)) => Some(t),
    };
    let addresses = match &target {
        Some(t) => {
            let (finding, addresses) = net::resolve(t, options.timeout).await;
            findings.push(finding);
            addresses
        }
        None => None,
    };
    let stream = match (&target, addresses) {
        (Some(_), Some(addresses)) => {
            let (finding, stream) = net::reach(&addresses, options.timeout).await;
            findings.push(finding);
            stream
        }
        (Some(_), None) => {
            findings.push(Finding::not_checked(
                Check::Tcp,
                "the host did not resolve",
                "fix name resolution first (dns)",
            ));
            None
        }
        (None, _) => {
            findings.push(Finding::not_checked(Check::Tcp, no_addr, addr_fix));
            None
        }
    };
    let tls_ok = match (&target, stream, &anchors) {
        (None, ..) => {
            findings.push(Finding::not_checked(Check::Tls, no_addr, addr_fix));
            false
        }
        (Some(t), _, _) if !t.tls => {
            findings.push(tls::plaintext_finding(t));
            true
        }
        (Some(_), None, _) => {
            findings.push(Finding::not_checked(
                Check::Tls,
                "no address accepted a connection",
                "fix reachability first (tcp)",
            ));
            false
        }
        (Some(_), Some(_), None) => {
            findings.push(Finding::not_checked(
                Check::Tls,
                "no --trust-anchors (or MESHCA_TRUST_ANCHORS) given",
                "pass the trust anchors the agent uses",
            ));
            false
        }
        (Some(_), Some(_), Some(Err(e))) => {
            findings.push(Finding::fail(Check::Tls, format!("cannot use the trust anchors: {e}"), "pass a PEM bundle of meshca's trust anchors (the meshca-trust-anchors ConfigMap, or the agent's ca.crt)"));
            false
        }
        (Some(_), Some((addr, stream)), Some(Ok(anchors))) => {
            let finding =
                tls::handshake(stream, addr, anchors, &options.server_name, clock.now(), options.timeout)
                    .await;
            let ok = finding.status == Status::Ok;
            findings.push(finding);
            ok
        }
    };

    // 4: one Certify dry run, for meshca's clock and its verdict on the token.
    let leaf_identity = options.cert_dir.as_deref().and_then(local::leaf_identity);
    let identity = options.identity.clone().or(leaf_identity);
    let token = options.token_file.as_ref().and_then(|path| std::fs::read(path).ok());
    let probe = match (&target, tls_ok) {
        (Some(t), true) => {
            let empty = TrustAnchors::from_certs(Vec::new(), std::path::Path::new("(none)"));
            let anchors = match (&anchors, empty) {
                (Some(Ok(a)), _) => Some(a.clone()),
                (_, Ok(empty)) if !t.tls => Some(empty),
                _ => None,
            };
            match anchors {
                Some(anchors) => {
                    let call = probe::Call {
                        url: &t.url,
                        anchors: &anchors,
                        server_name: &options.server_name,
                        identity: identity.as_deref(),
                        token: token.clone(),
                        timeout: options.timeout,
                    };
                    Some(probe::certify(call, clock).await)
                }
                None => None,
            }
        }
        _ => None,
    };
    if let (Some(t), Some(Err(why))) = (&target, &probe) {
        // http:// to a TLS port: the connection looked fine, the call did not.
        if !t.tls && why.contains("serves TLS there") {
            if let Some(f) = findings.iter_mut().find(|f| f.check == Check::Tls) {
                *f = Finding::fail(
                    Check::Tls,
                    why.clone(),
                    format!("use https:// in --addr ({})", t.url.replacen("http://", "https://", 1)),
                );
            }
        }
    }
    findings.push(probe::clock_finding(probe.as_ref(), options.skew_allowance));
    let at = match probe.as_ref().and_then(|p| p.as_ref().ok()).and_then(|p| p.server_time) {
        Some(time) => At { time, server: true },
        None => At { time: clock.now(), server: false },
    };

    // 5–6: what is on disk, judged at meshca's time when known.
    let anchors = anchors.as_ref().and_then(|a| a.as_ref().ok());
    findings.push(local::credentials(options, anchors, at));
    let verdict = probe.as_ref().map(|p| p.as_ref().map(|p| &p.outcome));
    findings.push(local::token(options, identity.as_deref(), at, verdict));
    Report { findings }
}

/// `d` for people: to the nearest second (`10m 3s`), or milliseconds below a second.
pub(crate) fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{} ms", d.as_millis());
    }
    let secs = u64::try_from(d.as_millis().saturating_add(500) / 1000).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A wall-clock time for people (RFC 3339, seconds, UTC).
pub fn when(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// How to fix this host's clock, for the platform doctor runs on.
pub(crate) fn clock_fix() -> &'static str {
    if cfg!(windows) {
        "resync this host's clock: `w32tm /resync`, and check the Windows Time service \
         (`w32tm /query /status`; domain members sync from the domain hierarchy: \
         `w32tm /config /syncfromflags:domhier /update`, then `net stop w32time && net start w32time`)"
    } else if cfg!(target_os = "linux") {
        "sync this host's clock with NTP: `timedatectl status` must say \"System clock synchronized: yes\" \
         (`timedatectl set-ntp true`); with chrony, `chronyc tracking` shows the offset and `chronyc makestep` corrects it at once"
    } else {
        "sync this host's clock with NTP"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_server_name_is_meshcas_own_identity_in_the_default_naming() {
        let naming = crate::identity::Naming::new("cluster.local", "meshca-system").unwrap();
        assert_eq!(naming.own_identity("meshca").unwrap().dns_name, DEFAULT_SERVER_NAME);
    }

    #[test]
    fn a_finding_prints_status_check_found_and_fix_on_one_line() {
        let f = Finding::fail(Check::Tcp, "127.0.0.1:1 refused", "start meshca");
        assert_eq!(f.to_string(), "FAIL  tcp: 127.0.0.1:1 refused; start meshca");
        assert_eq!(Finding::ok(Check::Dns, "fine").to_string(), "OK    dns: fine");
    }

    #[test]
    fn a_report_passes_with_warnings_but_not_with_a_failure() {
        let mut report = Report { findings: vec![Finding::warn(Check::Dns, "x", "y")] };
        assert!(report.passed());
        report.findings.push(Finding::fail(Check::Tls, "x", "y"));
        assert!(!report.passed());
        assert_eq!(report.failed(), ["tls"]);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json[1]["check"], "tls");
        assert_eq!(json[1]["status"], "FAIL");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_millis(12)), "12 ms");
        assert_eq!(human(Duration::from_millis(600_400)), "10m");
        assert_eq!(human(Duration::from_millis(599_999)), "10m");
        assert_eq!(human(Duration::from_secs(3725)), "1h 2m 5s");
    }
}
