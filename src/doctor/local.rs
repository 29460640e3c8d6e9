//! What is on this host: the credentials the agent wrote, and its token.
//!
//! Credentials (`tls.crt`, `tls.key` in `--cert-dir`) are judged at meshca's time
//! when the probe learned it, else at this host's: the key must match the leaf,
//! the chain must lead to the trust anchors and be valid, the key must be
//! readable by its owner only (Unix). The next renewal is estimated with the
//! agent's own policy (`agent::schedule`, default policy: half the lifetime,
//! ±10%). The token's claims are read without verifying the signature, and only
//! the claims are reported: the token itself is never printed. A bootstrap token
//! (`mcbt1.` + JWS, `crate::auth::bootstrap`) is told apart by its prefix: its
//! identity (`sub`), token id, `kid` (the signing issuer's fingerprint), uses and
//! expiry are reported, and its expiry matters less while a valid certificate is
//! in `--cert-dir` (the agent renews with that first). Whether meshca accepts the
//! token is meshca's verdict from the probe (a dry run spends no bootstrap use).

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::probe::Verdict;
use super::tls::names;
use super::{human, when, At, Check, Finding, Options, Status};
use crate::agent::schedule::{self, Policy};
use crate::auth::bootstrap::{is_bootstrap_token, PREFIX as BOOTSTRAP_PREFIX};
use crate::ca::issuer::{to_system_time, TrustAnchors};
use crate::ca::material::{read_certificates, read_pkcs8_key};

/// The audience meshca accepts unless configured otherwise (`--token-audiences`).
pub(crate) use crate::auth::source::DEFAULT_AUDIENCE;

/// The identity (first DNS SAN) of `dir/tls.crt`, if there is one.
pub(crate) fn leaf_identity(dir: &Path) -> Option<String> {
    let certs = read_certificates(&dir.join("tls.crt")).ok()?;
    names(certs.first()?).into_iter().find_map(|n| n.strip_prefix("DNS:").map(str::to_owned))
}

/// Findings of one check, gathered as it goes: facts, and problems with fixes.
struct Notes {
    status: Status,
    facts: Vec<String>,
    fixes: Vec<String>,
}

impl Notes {
    fn new() -> Self {
        Notes { status: Status::Ok, facts: Vec::new(), fixes: Vec::new() }
    }
    fn fact(&mut self, fact: impl Into<String>) {
        self.facts.push(fact.into());
    }
    /// A problem; a fix already given is not repeated.
    fn problem(&mut self, status: Status, fact: impl Into<String>, fix: impl Into<String>) {
        self.status = self.status.max(status);
        self.facts.push(fact.into());
        let fix = fix.into();
        if !self.fixes.contains(&fix) {
            self.fixes.push(fix);
        }
    }
    fn finish(self, check: Check) -> Finding {
        let found = self.facts.join(", ");
        match self.status {
            Status::Ok => Finding::ok(check, found),
            status => Finding { check, status, found, fix: Some(self.fixes.join("; ")) },
        }
    }
}

/// Seconds from `at` to `t` (negative when `t` is past).
fn seconds_until(t: SystemTime, at: SystemTime) -> i64 {
    match t.duration_since(at) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Check 5: `tls.crt` and `tls.key` in `--cert-dir`.
pub(crate) fn credentials(options: &Options, anchors: Option<&TrustAnchors>, at: At) -> Finding {
    let Some(dir) = &options.cert_dir else {
        return Finding::not_checked(
            Check::Credentials,
            "no --cert-dir given",
            "pass the agent's --out directory",
        );
    };
    let renew = format!(
        "let the agent write them: `meshca agent --once` (or `meshca certify`) with --out {}",
        dir.display()
    );
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let certs = match read_certificates(&crt) {
        Ok(c) => c,
        Err(e) => return Finding::fail(Check::Credentials, e.to_string(), renew),
    };
    let pkcs8 = match read_pkcs8_key(&key) {
        Ok(k) => k,
        Err(e) => return Finding::fail(Check::Credentials, e.to_string(), renew),
    };
    let (leaf, intermediates) = (&certs[0], &certs[1..]);
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Finding::fail(
            Check::Credentials,
            format!("{}: the first certificate does not parse", crt.display()),
            renew,
        );
    };
    let mut notes = Notes::new();
    let sans = names(leaf);
    notes.fact(format!(
        "{} is for {}",
        crt.display(),
        if sans.is_empty() { "no name".into() } else { sans.join(", ") }
    ));
    if let Some(identity) = &options.identity {
        if !sans.iter().any(|n| n.strip_prefix("DNS:") == Some(identity)) {
            notes.problem(Status::Fail, format!("not for --identity {identity}"), renew.clone());
        }
    }

    // The key must be the leaf's: a mismatched pair fails every handshake.
    match rcgen::KeyPair::try_from(pkcs8.as_slice()) {
        Ok(k) if k.public_key_raw() == cert.public_key().subject_public_key.data.as_ref() => {
            notes.fact("tls.key matches it")
        }
        Ok(_) => notes.problem(
            Status::Fail,
            "tls.key does not match tls.crt (the key belongs to another certificate)",
            format!("the files were replaced separately; write them as a pair again: {renew}"),
        ),
        Err(_) => notes.problem(Status::Fail, "tls.key is not a P-256, P-384 or RSA key", renew.clone()),
    }

    let not_before = to_system_time(cert.validity().not_before);
    let not_after = to_system_time(cert.validity().not_after);
    match anchors.map(|a| a.verify_path(leaf, intermediates, at.time)) {
        None => notes.fact("chain not verified (no usable --trust-anchors)"),
        Some(Ok(())) => notes.fact(format!("chain of {} verified to the trust anchors at {}", certs.len(), at.whose())),
        Some(Err(webpki::Error::CertExpired { .. })) => notes.problem(
            Status::Fail,
            format!(
                "expired at {} ({} s ago by {})",
                when(not_after),
                seconds_until(at.time, not_after),
                at.whose()
            ),
            format!("the agent did not renew it: check that `meshca agent` runs and that its log shows no errors; then {renew}"),
        ),
        Some(Err(webpki::Error::CertNotValidYet { .. })) => notes.problem(
            Status::Fail,
            format!("not valid until {} by {}", when(not_before), at.whose()),
            "check this host's clock (see clock)",
        ),
        Some(Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey)) => notes.problem(
            Status::Fail,
            "does not chain to the trust anchors",
            format!("it was issued under other roots (a rotated or different CA): {renew}"),
        ),
        Some(Err(e)) => notes.problem(Status::Fail, format!("chain does not verify: {e:?}"), renew.clone()),
    }

    // When the agent will renew: its default policy, from the issuance time
    // (notBefore plus meshca's backdate), at the midpoint of the jitter band.
    if at.time < not_after {
        let validity = not_after.duration_since(not_before).unwrap_or_default();
        let backdate = options.skew_allowance.min(validity);
        let lifetime = schedule::lifetime(validity, backdate);
        let policy = Policy::default();
        let renew_at = not_before + backdate + schedule::renewal_delay(lifetime, &policy, 0.5);
        notes.fact(format!("expires {} (in {} s)", when(not_after), seconds_until(not_after, at.time)));
        let due = seconds_until(renew_at, at.time);
        let band = human(lifetime.mul_f64(policy.renew_at * policy.jitter));
        if due >= 0 {
            notes.fact(format!("the agent renews in about {due} s (half the lifetime, ± {band})"));
        } else if due.unsigned_abs() > lifetime.mul_f64(policy.renew_at * policy.jitter).as_secs() {
            notes.problem(
                Status::Warn,
                format!("renewal is {} overdue (due about {})", human(Duration::from_secs(due.unsigned_abs())), when(renew_at)),
                "check that `meshca agent` runs for this directory and can reach meshca (its log names each failed attempt)",
            );
        } else {
            notes.fact(format!("the agent renews about now (due {}, ± {band})", when(renew_at)));
        }
    }
    permissions(&key, &mut notes);
    notes.finish(Check::Credentials)
}

#[cfg(unix)]
fn permissions(key: &Path, notes: &mut Notes) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(key) else { return };
    let mode = meta.permissions().mode() & 0o777;
    let fix = format!("chmod 600 {} (the agent writes it 0600)", key.display());
    if mode & 0o044 != 0 {
        notes.problem(Status::Fail, format!("tls.key is mode {mode:04o}: readable by group or others"), fix);
    } else if mode & 0o033 != 0 {
        notes.problem(Status::Warn, format!("tls.key is mode {mode:04o}: writable by group or others"), fix);
    } else {
        notes.fact(format!("tls.key mode {mode:04o}"));
    }
}

#[cfg(not(unix))]
fn permissions(_key: &Path, notes: &mut Notes) {
    notes.fact("tls.key permissions not checked on this platform");
}

/// The claims doctor reports; read, not verified.
#[derive(Debug, Default)]
struct Claims {
    issuer: Option<String>,
    subject: Option<String>,
    audience: Vec<String>,
    expires: Option<SystemTime>,
    /// Namespace and service account from `kubernetes.io` or a legacy `sub`.
    workload: Option<(String, String)>,
}

/// A claim value fit to print: quoted, escaped, at most 128 characters.
fn shown(s: &str) -> String {
    let s: String = s.chars().take(128).collect();
    format!("{s:?}")
}

fn claims(token: &[u8]) -> Result<Claims, &'static str> {
    let token = std::str::from_utf8(token.trim_ascii()).map_err(|_| "not text")?;
    if token.is_empty() {
        return Err("empty");
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err("not three dot-separated parts");
    }
    let payload =
        crate::jose::decode(parts[1].trim_end_matches('=')).ok_or("the payload is not base64url")?;
    let value: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| "the payload is not JSON")?;
    let text = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let audience = match value.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    let k8s = value.get("kubernetes.io");
    let from_k8s = k8s.and_then(|k| {
        let ns = k.get("namespace")?.as_str()?;
        let sa = k.get("serviceaccount")?.get("name")?.as_str()?;
        Some((ns.to_owned(), sa.to_owned()))
    });
    let from_sub = text("sub").and_then(|s| {
        let rest = s.strip_prefix("system:serviceaccount:")?;
        let (ns, sa) = rest.split_once(':')?;
        Some((ns.to_owned(), sa.to_owned()))
    });
    Ok(Claims {
        issuer: text("iss"),
        subject: text("sub"),
        audience,
        expires: value
            .get("exp")
            .and_then(|v| v.as_u64())
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        workload: from_k8s.or(from_sub),
    })
}

/// The identity `claims` may hold, in the naming of `identity` (`….serviceaccount.identity.CPNS.TD`).
fn own_identity(claims: &Claims, identity: Option<&str>) -> Option<String> {
    let (ns, sa) = claims.workload.as_ref()?;
    let (_, suffix) = identity?.split_once(".serviceaccount.identity.")?;
    Some(format!("{sa}.{ns}.serviceaccount.identity.{suffix}"))
}

/// Check 6: the token file, and meshca's verdict on it (`None`: not asked).
pub(crate) fn token(
    options: &Options,
    identity: Option<&str>,
    at: At,
    verdict: Option<Result<&Verdict, &String>>,
) -> Finding {
    let Some(path) = &options.token_file else {
        return Finding::not_checked(
            Check::Token,
            "no --token-file given (the agent then renews by proof of possession while its certificate is valid)",
            "pass the agent's --token-file",
        );
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return Finding::fail(
                Check::Token,
                format!("cannot read {}: {e}", path.display()),
                "check the path and that this user may read it (projected tokens are mounted read-only for the pod's user)",
            )
        }
    };
    if is_bootstrap_token(&bytes) {
        return bootstrap_token(path, &bytes, options, identity, at, verdict);
    }
    let claims = match claims(&bytes) {
        Ok(c) => c,
        Err(why) => {
            return Finding::fail(
                Check::Token,
                format!("{} does not hold a JWT ({why})", path.display()),
                "point --token-file at the projected service account token file",
            )
        }
    };
    let mut notes = Notes::new();
    let audience = claims.audience.iter().map(|a| shown(a)).collect::<Vec<_>>().join(", ");
    let optional = |v: &Option<String>| v.as_deref().map(shown).unwrap_or_else(|| "(none)".into());
    notes.fact(format!(
        "{} holds a JWT (not verified here): iss {}, sub {}, aud [{audience}]",
        path.display(),
        optional(&claims.issuer),
        optional(&claims.subject),
    ));
    let refresh = "the kubelet refreshes projected tokens before they expire: check the pod's serviceAccountToken volume, and that the agent reads that file, not a copy";
    match claims.expires {
        None => notes.problem(Status::Fail, "no exp: meshca refuses tokens that never expire", refresh),
        Some(exp) if exp <= at.time => notes.problem(
            Status::Fail,
            format!("expired at {} ({} s ago by {})", when(exp), seconds_until(at.time, exp), at.whose()),
            refresh,
        ),
        Some(exp) => notes.fact(format!(
            "expires {} (in {} s by {})",
            when(exp),
            seconds_until(exp, at.time),
            at.whose()
        )),
    }
    let audience_fix = format!("request the token with meshca's audience ({DEFAULT_AUDIENCE} unless meshca's --token-audiences says otherwise): serviceAccountToken.audience in the pod spec");
    if !claims.audience.iter().any(|a| a == DEFAULT_AUDIENCE) {
        let status = if matches!(verdict, Some(Ok(Verdict::WouldIssue | Verdict::Issued { .. }))) {
            Status::Ok
        } else {
            Status::Warn
        };
        notes.problem(status, format!("aud lacks {DEFAULT_AUDIENCE}"), audience_fix.clone());
    }
    let fixes = RefusalFixes {
        unauthenticated: format!(
            "give the agent a current projected token requested with meshca's audience ({DEFAULT_AUDIENCE} unless meshca's --token-audiences says otherwise)"
        ),
        permission_denied: match own_identity(&claims, identity) {
            Some(own) => format!(
                "request the identity the token holds (--identity {own}), or give the agent the token of the service account it requests for"
            ),
            None => "request the identity of the token's own service account, or give the agent that service account's token".into(),
        },
    };
    meshca_verdict(&mut notes, verdict, identity, fixes);
    notes.finish(Check::Token)
}

/// How to fix a refusal of meshca's, for the kind of token presented.
struct RefusalFixes {
    /// `Unauthenticated`: the token itself is not accepted.
    unauthenticated: String,
    /// `PermissionDenied`: the token is for another identity than the one asked for.
    permission_denied: String,
}

/// meshca's verdict on the token (`None`: not asked) into `notes`; a refusal
/// the notes already explain gets no second fix.
fn meshca_verdict(
    notes: &mut Notes,
    verdict: Option<Result<&Verdict, &String>>,
    identity: Option<&str>,
    fixes: RefusalFixes,
) {
    let explained = notes.status != Status::Ok;
    match (verdict, identity) {
        (None, _) => notes.problem(Status::Warn, "not tried with meshca (no verified connection)", "fix the checks above first"),
        (Some(Err(_)), _) => notes.problem(Status::Warn, "not tried with meshca (Certify did not answer)", "see clock"),
        (Some(Ok(Verdict::WouldIssue)), Some(identity)) => notes.fact(format!(
            "meshca would issue {identity} with it (dry run: nothing signed; audited as denied, reason dry_run)"
        )),
        (Some(Ok(Verdict::WouldIssue)), None) => notes.fact("meshca accepts it (dry run)"),
        (Some(Ok(Verdict::Issued { serial })), _) => notes.fact(format!(
            "meshca issued a certificate with it (serial {serial}): this meshca does not support dry runs, so a real certificate was issued and audited; its key was discarded"
        )),
        (Some(Ok(Verdict::Refused { code: tonic::Code::InvalidArgument, .. })), None) => notes.problem(
            Status::Warn,
            "meshca authenticated it, but no identity was asked for",
            "pass --identity (or --cert-dir) to test the whole request",
        ),
        (Some(Ok(Verdict::Refused { code, message, reason, request_id })), _) => {
            let id = request_id.as_deref().map(|id| format!(" (request id {id})")).unwrap_or_default();
            let why = reason.as_deref().map(|r| format!(" (reason {r})")).unwrap_or_default();
            let found = format!("meshca refuses it: {code:?}: {message}{why}{id}");
            if reason.as_deref() == Some("bootstrap_tokens_disabled") {
                let fix = "start meshca with --bootstrap-tokens (MESHCA_BOOTSTRAP_TOKENS=true, or \
                           `bootstrap-tokens = true` in its config), or give this host a Kubernetes token";
                notes.problem(Status::Fail, found, fix);
                return;
            }
            // A refusal the claims already explain needs no second fix.
            if *code == tonic::Code::Unauthenticated && explained {
                notes.status = Status::Fail;
                notes.fact(found);
                return;
            }
            let fix = match code {
                tonic::Code::Unauthenticated => fixes.unauthenticated,
                tonic::Code::PermissionDenied => fixes.permission_denied,
                tonic::Code::Unavailable => "meshca cannot decide now (token backend or audit log): look up the request id in meshca's log".into(),
                tonic::Code::FailedPrecondition => "meshca's issuer is unusable: rotate the issuer (docs/RUNBOOK.md)".into(),
                _ => "look up the request id in meshca's log and audit log".into(),
            };
            notes.problem(Status::Fail, found, fix);
        }
    }
}

/// What doctor reads of a bootstrap token; read, not verified.
#[derive(Debug, Default, PartialEq, Eq)]
struct BootstrapClaims {
    /// Header `alg` and `kid` (the signing issuer certificate's SHA-256 fingerprint).
    alg: Option<String>,
    kid: Option<String>,
    /// `sub`: the identity the token is for.
    identity: Option<String>,
    /// `jti`: the token id audit records name.
    token_id: Option<String>,
    expires: Option<SystemTime>,
    uses: Option<u64>,
}

/// Decodes the header and claims of `mcbt1.` + JWS; never echoes the token.
fn bootstrap_claims(token: &[u8]) -> Result<BootstrapClaims, &'static str> {
    let token = std::str::from_utf8(token.trim_ascii()).map_err(|_| "not text")?;
    let jws = token.strip_prefix(BOOTSTRAP_PREFIX).ok_or("no mcbt1. prefix")?;
    let parts: Vec<&str> = jws.split('.').collect();
    let [header, payload, _signature] = parts[..] else {
        return Err("not three dot-separated parts after mcbt1.");
    };
    let object = |part: &str, not_base64, not_json| {
        let bytes = crate::jose::decode(part).ok_or(not_base64)?;
        match serde_json::from_slice(&bytes) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            _ => Err(not_json),
        }
    };
    let header = object(header, "the header is not base64url", "the header is not a JSON object")?;
    let claims = object(payload, "the payload is not base64url", "the payload is not a JSON object")?;
    let text = |map: &serde_json::Map<String, serde_json::Value>, k: &str| {
        map.get(k).and_then(|v| v.as_str()).map(str::to_owned)
    };
    Ok(BootstrapClaims {
        alg: text(&header, "alg"),
        kid: text(&header, "kid"),
        identity: text(&claims, "sub"),
        token_id: text(&claims, "jti"),
        expires: claims
            .get("exp")
            .and_then(|v| v.as_u64())
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        uses: claims.get("uses").and_then(|v| v.as_u64()),
    })
}

/// When the leaf in `--cert-dir` expires, if it is valid at `at`: the agent then
/// renews with it (proof of possession) before it presents a bootstrap token.
fn valid_certificate_until(options: &Options, at: At) -> Option<SystemTime> {
    let certs = read_certificates(&options.cert_dir.as_ref()?.join("tls.crt")).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let (not_before, not_after) =
        (to_system_time(cert.validity().not_before), to_system_time(cert.validity().not_after));
    (not_before <= at.time && at.time < not_after).then_some(not_after)
}

/// Check 6 for a bootstrap token (`meshca bootstrap-token create`).
fn bootstrap_token(
    path: &Path,
    bytes: &[u8],
    options: &Options,
    identity: Option<&str>,
    at: At,
    verdict: Option<Result<&Verdict, &String>>,
) -> Finding {
    let file = path.display();
    let claims = match bootstrap_claims(bytes) {
        Ok(c) => c,
        Err(why) => {
            return Finding::fail(
                Check::Token,
                format!("{file} starts like a bootstrap token ({BOOTSTRAP_PREFIX}) but is not one ({why})"),
                format!("create a new one with `meshca bootstrap-token create` and write its output to {file} unchanged"),
            )
        }
    };
    let optional = |v: &Option<String>| v.as_deref().map(shown).unwrap_or_else(|| "(none)".into());
    let mut notes = Notes::new();
    notes.fact(format!(
        "{file} holds a bootstrap token (not verified here): sub {}, token id {}, kid {}, alg {}",
        optional(&claims.identity),
        optional(&claims.token_id),
        optional(&claims.kid),
        optional(&claims.alg),
    ));
    let for_whom = claims.identity.as_deref().or(identity).map(shown).unwrap_or_else(|| "NAME".into());
    let create = format!(
        "create a new one where meshca's issuer key can be read: `meshca bootstrap-token create --identity \
         {for_whom}` (with the server's --config or flags), and write it to {file}"
    );
    let asked = identity.map(shown).unwrap_or_else(|| for_whom.clone());
    let fixes = RefusalFixes {
        unauthenticated: create.clone(),
        permission_denied: format!(
            "request the identity the token is for (--identity {for_whom}), or create a token for {asked}"
        ),
    };
    match (claims.identity.as_deref(), identity) {
        (None, _) => notes.problem(Status::Fail, "no sub: meshca refuses it", create.clone()),
        (Some(sub), Some(asked)) if asked != sub => notes.problem(
            Status::Fail,
            format!("it is for {}, not for the identity requested, {asked}", shown(sub)),
            fixes.permission_denied.clone(),
        ),
        _ => {}
    }
    match claims.uses {
        Some(n) => notes.fact(format!(
            "good for {n} certificate(s) (how many are spent only meshca knows; a dry run spends none)"
        )),
        None => notes.problem(Status::Fail, "no uses: meshca refuses it", create.clone()),
    }
    match claims.expires {
        None => notes.problem(Status::Fail, "no exp: meshca refuses it", create.clone()),
        Some(exp) if exp <= at.time => notes.problem(
            Status::Fail,
            format!("expired at {} ({} s ago by {})", when(exp), seconds_until(at.time, exp), at.whose()),
            create.clone(),
        ),
        Some(exp) => notes.fact(format!(
            "expires {} (in {} s by {})",
            when(exp),
            seconds_until(exp, at.time),
            at.whose()
        )),
    }
    meshca_verdict(&mut notes, verdict, identity, fixes);
    if let Some(until) = valid_certificate_until(options, at) {
        // The token is the agent's fallback only: what is wrong with it can wait,
        // unlike a refusal that renewing with the certificate would meet as well.
        let about_the_token = match verdict {
            Some(Ok(Verdict::Refused { code, .. })) => {
                matches!(code, tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
            }
            _ => true,
        };
        if about_the_token {
            notes.status = notes.status.min(Status::Warn);
        }
        notes.fact(format!(
            "the certificate in --cert-dir is valid until {}: the agent renews with it and presents the token \
             only if meshca refuses the certificate",
            when(until)
        ));
    }
    notes.finish(Check::Token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &serde_json::Value) -> Vec<u8> {
        let b64 = |v: &[u8]| crate::jose::encode(v);
        format!("{}.{}.{}\n", b64(b"{\"alg\":\"ES256\"}"), b64(payload.to_string().as_bytes()), b64(b"sig"))
            .into_bytes()
    }

    #[test]
    fn claims_are_read_from_kubernetes_or_legacy_subjects() {
        let k8s = claims(&jwt(&serde_json::json!({
            "aud": "identity.l5d.io", "exp": 100,
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web"}}
        })))
        .unwrap();
        assert_eq!(k8s.audience, ["identity.l5d.io"]);
        assert_eq!(k8s.expires, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100)));
        assert_eq!(k8s.workload, Some(("default".into(), "web".into())));
        let legacy =
            claims(&jwt(&serde_json::json!({"sub": "system:serviceaccount:ns:sa", "aud": ["a", "b"]})))
                .unwrap();
        assert_eq!(legacy.workload, Some(("ns".into(), "sa".into())));
        assert_eq!(legacy.audience, ["a", "b"]);
    }

    #[test]
    fn anything_but_a_jwt_is_named_without_echoing_it() {
        assert_eq!(claims(b"  \n").unwrap_err(), "empty");
        assert_eq!(claims(b"secret-value").unwrap_err(), "not three dot-separated parts");
        assert_eq!(claims(b"a.!!!.c").unwrap_err(), "the payload is not base64url");
    }

    fn bootstrap(header: &serde_json::Value, claims: &serde_json::Value) -> Vec<u8> {
        let b64 = |v: &[u8]| crate::jose::encode(v);
        let (h, c) = (b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        format!("{BOOTSTRAP_PREFIX}{h}.{c}.{}\n", b64(b"sig")).into_bytes()
    }

    #[test]
    fn bootstrap_tokens_are_read_after_their_prefix() {
        let token = bootstrap(
            &serde_json::json!({"alg": "ES256", "typ": "meshca-bootstrap+jwt", "kid": "ab12"}),
            &serde_json::json!({"iss": "meshca-bootstrap", "sub": "web.default.serviceaccount.identity.cp.td",
                "jti": "0123456789abcdef0123456789abcdef", "iat": 40, "exp": 100, "uses": 3}),
        );
        assert!(is_bootstrap_token(&token));
        assert_eq!(claims(&token).unwrap_err(), "not three dot-separated parts", "no JWT");
        let read = bootstrap_claims(&token).unwrap();
        assert_eq!(
            read,
            BootstrapClaims {
                alg: Some("ES256".into()),
                kid: Some("ab12".into()),
                identity: Some("web.default.serviceaccount.identity.cp.td".into()),
                token_id: Some("0123456789abcdef0123456789abcdef".into()),
                expires: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100)),
                uses: Some(3),
            }
        );
        let bare = bootstrap(&serde_json::json!({}), &serde_json::json!({}));
        assert_eq!(bootstrap_claims(&bare).unwrap(), BootstrapClaims::default());
    }

    #[test]
    fn anything_but_a_bootstrap_token_after_the_prefix_is_named_without_echoing_it() {
        let err = |t: &str| bootstrap_claims(t.as_bytes()).unwrap_err();
        assert_eq!(err("mcbt1.secret-value"), "not three dot-separated parts after mcbt1.");
        assert_eq!(err("mcbt1.a.b.c.d"), "not three dot-separated parts after mcbt1.");
        assert_eq!(err("mcbt1.!!!.e30.c"), "the header is not base64url");
        assert_eq!(err("mcbt1.WzFd.e30.c"), "the header is not a JSON object");
        assert_eq!(err("mcbt1.e30.!!!.c"), "the payload is not base64url");
        assert_eq!(err("mcbt1.e30.bnVsbA.c"), "the payload is not a JSON object");
    }

    #[test]
    fn a_bootstrap_token_for_another_identity_or_expired_fails_offline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let web = "web.default.serviceaccount.identity.meshca-system.cluster.local";
        let token = bootstrap(
            &serde_json::json!({"alg": "ES256", "kid": "ab12"}),
            &serde_json::json!({"sub": web, "jti": "0123456789abcdef0123456789abcdef", "exp": 1000, "uses": 1}),
        );
        std::fs::write(&path, &token).unwrap();
        let options = Options { token_file: Some(path), ..Options::default() };
        let at = |secs| At { time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs), server: false };
        let verdict = Verdict::WouldIssue;

        let fine = super::token(&options, Some(web), at(400), Some(Ok(&verdict)));
        assert_eq!(fine.status, Status::Ok, "{fine}");
        assert!(fine.found.contains("holds a bootstrap token") && fine.found.contains("in 600 s"), "{fine}");
        let secret = String::from_utf8(token).unwrap();
        assert!(!fine.to_string().contains(secret.trim()), "the token is printed: {fine}");

        let db = "db.default.serviceaccount.identity.meshca-system.cluster.local";
        let other = super::token(&options, Some(db), at(400), None);
        assert_eq!(other.status, Status::Fail, "{other}");
        assert!(other.found.contains(&format!("not for the identity requested, {db}")), "{other}");

        let expired = super::token(&options, Some(web), at(1060), None);
        assert_eq!(expired.status, Status::Fail, "{expired}");
        assert!(
            expired.found.contains("expired at 1970-01-01T00:16:40Z (60 s ago by this host's clock)"),
            "{expired}"
        );
        assert!(expired.fix.unwrap().contains("meshca bootstrap-token create --identity"));
    }

    #[test]
    fn the_suggested_identity_keeps_the_requested_naming() {
        let c = Claims { workload: Some(("default".into(), "web".into())), ..Claims::default() };
        let asked = "db.default.serviceaccount.identity.meshca-system.cluster.local";
        assert_eq!(
            own_identity(&c, Some(asked)).as_deref(),
            Some("web.default.serviceaccount.identity.meshca-system.cluster.local")
        );
        assert_eq!(own_identity(&c, None), None);
    }
}
