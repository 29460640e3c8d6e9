//! One Certify dry run: meshca's clock, and its verdict on the token.
//!
//! The call goes through the agent's own client (`agent::client::connect`), so it
//! succeeds or fails as the agent's would. It carries the `x-meshca-dry-run: 1`
//! header: meshca authenticates the token, authorizes the identity and checks the
//! CSR (made with a throwaway P-256 key), audits the decision (a dry run that
//! passes is recorded as `denied` with reason `dry_run`), and signs nothing. Every
//! answer, refusals included, carries `x-meshca-time`; the offset is meshca's time
//! minus the midpoint of this host's clock before and after the call. A meshca
//! that predates dry runs issues a real certificate, which is reported as such.

use std::time::{Duration, SystemTime};

use tonic::metadata::MetadataValue;

use super::{clock_fix, human, Check, Finding, OFFSET_WARNING};
use crate::agent::client::{self, KeyType};
use crate::ca::issuer::TrustAnchors;
use crate::clock::Clock;
use crate::proto::identity_client::IdentityClient;
use crate::proto::CertifyRequest;
use crate::wire::DRY_RUN_HEADER;

/// What the probe sends.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub url: &'a str,
    pub anchors: &'a TrustAnchors,
    pub server_name: &'a str,
    /// The identity to ask for; without one, meshca can only judge the token.
    pub identity: Option<&'a str>,
    /// Token bytes as read; `None` sends an empty token.
    pub token: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// meshca's verdict on the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The dry run passed: meshca would issue.
    WouldIssue,
    /// meshca does not know dry runs and issued a real certificate (key discarded).
    Issued { serial: String },
    /// meshca refused, with its status, its reason code (`x-meshca-reason`, as in
    /// the audit record) and the request id to look up in its audit log.
    Refused { code: tonic::Code, message: String, reason: Option<String>, request_id: Option<String> },
}

/// The answer to the probe.
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    /// meshca's clock at the request, when it said.
    pub server_time: Option<SystemTime>,
    /// meshca's clock minus this host's, in milliseconds.
    pub offset_millis: Option<i64>,
    pub round_trip: Duration,
    pub outcome: Verdict,
}

fn signed_millis(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Makes the call. `Err` says why there was no answer at all.
pub(crate) async fn certify(call: Call<'_>, clock: &dyn Clock) -> Result<Probe, String> {
    let channel =
        tokio::time::timeout(call.timeout, client::connect(call.url, call.anchors, call.server_name))
            .await
            .map_err(|_| format!("connecting for Certify timed out after {}", human(call.timeout)))?
            .map_err(|e| e.to_string())?;
    let identity = call.identity.unwrap_or_default().to_owned();
    // An identity that cannot be put in a CSR gets an empty one: meshca says what is wrong.
    let csr = match call.identity {
        Some(name) => {
            let name = name.to_owned();
            tokio::task::spawn_blocking(move || client::make_csr(&name, KeyType::P256))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|(_, csr)| csr)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let mut request = tonic::Request::new(CertifyRequest {
        identity,
        token: call.token.unwrap_or_default(),
        certificate_signing_request: csr,
    });
    request.metadata_mut().insert(DRY_RUN_HEADER, MetadataValue::from_static("1"));
    let before = clock.now();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(call.timeout, IdentityClient::new(channel).certify(request))
        .await
        .map_err(|_| format!("Certify did not answer within {}", human(call.timeout)))?;
    let round_trip = started.elapsed();
    let midpoint = before + round_trip / 2;
    let (metadata, outcome) = match answer {
        Ok(response) => {
            let passed = response.metadata().get(DRY_RUN_HEADER).is_some_and(|v| v == "passed");
            let metadata = response.metadata().clone();
            let leaf = response.into_inner().leaf_certificate;
            let outcome = if passed {
                Verdict::WouldIssue
            } else {
                let serial = x509_parser::parse_x509_certificate(&leaf)
                    .map(|(_, c)| c.raw_serial_as_string())
                    .unwrap_or_else(|_| "unknown".into());
                Verdict::Issued { serial }
            };
            (metadata, outcome)
        }
        Err(status) => {
            let text = |name| status.metadata().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let (request_id, reason) =
                (text(crate::wire::REQUEST_ID_HEADER), text(crate::wire::REASON_HEADER));
            if request_id.is_none() {
                // Not meshca's answer: the call failed on this side (a TLS port called with http://).
                if let client::Error::Connect { reason, .. } = client::refused_at(call.url, status.clone()) {
                    return Err(reason);
                }
            }
            let outcome = Verdict::Refused {
                code: status.code(),
                message: status.message().to_owned(),
                reason,
                request_id,
            };
            (status.metadata().clone(), outcome)
        }
    };
    let server_time = client::server_time(&metadata);
    Ok(Probe {
        server_time,
        offset_millis: server_time.map(|t| signed_millis(t, midpoint)),
        round_trip,
        outcome,
    })
}

/// Check 4 from the probe's answer (`None`: no probe was possible).
pub(crate) fn clock_finding(probe: Option<&Result<Probe, String>>, allowance: Duration) -> Finding {
    let probe = match probe {
        None => {
            return Finding::not_checked(
                Check::Clock,
                "no verified connection to meshca to ask for its time",
                "fix the checks above first",
            )
        }
        Some(Err(e)) => {
            return Finding::fail(
                Check::Clock,
                format!("cannot call Certify to learn meshca's time: {e}"),
                "the agent's calls fail the same way: check meshca's log, and --timeout if meshca is slow to answer",
            )
        }
        Some(Ok(p)) => p,
    };
    let Some(offset) = probe.offset_millis else {
        return Finding::warn(
            Check::Clock,
            "meshca did not send its time (no x-meshca-time header)",
            "upgrade meshca; meanwhile compare clocks by hand",
        );
    };
    let size = Duration::from_millis(offset.unsigned_abs());
    let found = match offset {
        0 => format!("this host's clock agrees with meshca's (round trip {})", human(probe.round_trip)),
        _ => format!(
            "this host's clock is {} {} meshca's (round trip {})",
            human(size),
            if offset > 0 { "behind" } else { "ahead of" },
            human(probe.round_trip)
        ),
    };
    if size > allowance {
        let effect = if offset > 0 {
            "new certificates are not yet valid here when they arrive"
        } else {
            "certificates and tokens look expired here before they are"
        };
        Finding::fail(
            Check::Clock,
            format!("{found}, beyond meshca's clock-skew allowance of {}: {effect}", human(allowance)),
            clock_fix(),
        )
    } else if size > OFFSET_WARNING {
        Finding::warn(
            Check::Clock,
            format!(
                "{found}: more than {}, within meshca's allowance of {}",
                human(OFFSET_WARNING),
                human(allowance)
            ),
            clock_fix(),
        )
    } else {
        Finding::ok(Check::Clock, found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(offset_millis: i64) -> Result<Probe, String> {
        Ok(Probe {
            server_time: Some(SystemTime::UNIX_EPOCH),
            offset_millis: Some(offset_millis),
            round_trip: Duration::from_millis(3),
            outcome: Verdict::WouldIssue,
        })
    }

    #[test]
    fn offsets_warn_beyond_thirty_seconds_and_fail_beyond_the_allowance() {
        let allowance = Duration::from_secs(120);
        let status = |ms| clock_finding(Some(&probe(ms)), allowance).status;
        use super::super::Status::*;
        assert_eq!([status(0), status(30_000), status(-30_000)], [Ok, Ok, Ok]);
        assert_eq!([status(30_001), status(-120_000)], [Warn, Warn]);
        assert_eq!([status(120_001), status(-600_000)], [Fail, Fail]);
    }

    #[test]
    fn the_clock_finding_says_which_way_the_host_is_off() {
        let ahead = clock_finding(Some(&probe(-600_000)), Duration::from_secs(120));
        assert!(ahead.found.starts_with("this host's clock is 10m ahead of meshca's"), "{}", ahead.found);
        let behind = clock_finding(Some(&probe(600_000)), Duration::from_secs(120));
        assert!(behind.found.starts_with("this host's clock is 10m behind meshca's"), "{}", behind.found);
    }
}
