//! The line format: a record (or a marker) as compact JSON, its hash over those exact
//! bytes, the `hash` suffix, and reading a line back (see the module docs above).

use super::*;

/// A writer's own record without `hash` (field order is the contract).
#[derive(Serialize)]
pub(super) struct MarkerBody<'a> {
    pub(super) seq: u64,
    pub(super) prev_hash: &'a str,
    pub(super) time: String,
    pub(super) request_id: &'a str,
    pub(super) outcome: &'a str,
    pub(super) reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) refused: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) failing_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) torn_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) previous_checkpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) uncovered_from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) uncovered_to: Option<u64>,
}

pub(super) fn encode_marker(
    marker: &Marker,
    now: SystemTime,
    seq: u64,
    prev_hash: &str,
) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut body = MarkerBody {
        seq,
        prev_hash,
        time: rfc3339(now),
        request_id: GAP_ID,
        outcome: "gap",
        reason: String::new(),
        refused: None,
        failing_since: None,
        error: None,
        torn_bytes: None,
        previous_file: None,
        previous_seq: None,
        previous_hash: None,
        previous_checkpoint: None,
        uncovered_from: None,
        uncovered_to: None,
    };
    match marker {
        Marker::Refused { refused, since, error } => {
            body.reason = format!(
                "audit_unavailable: the audit sink failed; {refused} decisions were refused unrecorded \
                 (no certificate was returned for them)"
            );
            (body.refused, body.failing_since, body.error) =
                (Some(*refused), Some(rfc3339(*since)), Some(error.as_str()));
        }
        Marker::Torn { bytes } => {
            body.reason = format!(
                "interrupted_write: an incomplete final line of {bytes} bytes was cut off at open; no checkpoint \
                 covered it, so the log cannot tell whether a certificate was returned for it"
            );
            body.torn_bytes = Some(*bytes);
        }
        Marker::Continued { previous_file, previous_seq, previous_hash, previous_checkpoint } => {
            body.request_id = CONTINUED_ID;
            body.outcome = "continued";
            body.reason = match *previous_file {
                "replaced" => {
                    "log_replaced: a new log started with --audit-new-log where the previous one was \
                     missing or empty; previous_checkpoint is that log's last checkpoint"
                        .into()
                }
                _ => format!(
                    "file_{previous_file}: the previous audit file was {previous_file} underneath meshca; \
                     this file continues its chain"
                ),
            };
            body.previous_file = Some(previous_file);
            body.previous_seq = Some(*previous_seq);
            body.previous_hash = Some(previous_hash.as_str()).filter(|h| !h.is_empty());
            body.previous_checkpoint = previous_checkpoint.as_deref();
        }
        Marker::Uncovered { from, to, why } => {
            body.request_id = UNCOVERED_ID;
            body.outcome = "uncovered";
            body.reason = match *why {
                "unclean_stop" => format!(
                    "unclean_stop: records {from}..={to} were written after the last checkpoint before meshca \
                     stopped without closing the log; checkpoints cover them from here on, but only the file \
                     vouches that meshca wrote them"
                ),
                _ => format!(
                    "{why}: records {from}..={to} were written before any checkpoint; checkpoints cover them \
                     from here on, but only the file vouches that meshca wrote them"
                ),
            };
            (body.uncovered_from, body.uncovered_to) = (Some(*from), Some(*to));
        }
    }
    finish_line(serde_json::to_vec(&body)?)
}

/// The serialised form of a record without `hash` (field order is the contract).
#[derive(Serialize)]
pub(super) struct Body<'a> {
    pub(super) seq: u64,
    pub(super) prev_hash: &'a str,
    pub(super) time: String,
    pub(super) request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) peer: Option<&'a str>,
    pub(super) requested_identity: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) subject: Option<&'a SubjectRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) auth_method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) token_issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) bootstrap_token_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) csr_key_type: Option<&'a str>,
    pub(super) outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) not_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer_fingerprint_sha256: Option<&'a str>,
}

/// Returns the full line (with `hash` and newline) and its hash.
pub(super) fn encode(r: &Record, seq: u64, prev_hash: &str) -> Result<(Vec<u8>, String), serde_json::Error> {
    let issued = r.issued.as_ref();
    let line = serde_json::to_vec(&Body {
        seq,
        prev_hash,
        time: rfc3339(r.time),
        request_id: &r.request_id,
        peer: r.peer.as_deref(),
        requested_identity: &r.requested_identity,
        subject: r.subject.as_ref(),
        auth_method: r.auth_method.as_deref(),
        token_issuer: r.token_issuer.as_deref(),
        bootstrap_token_id: r.bootstrap_token_id.as_deref(),
        csr_key_type: r.csr_key_type.as_deref(),
        outcome: r.outcome,
        code: r.code.as_deref(),
        reason: r.reason.as_deref(),
        serial: issued.map(|i| i.serial_hex.as_str()),
        fingerprint_sha256: issued.map(|i| i.fingerprint_sha256.as_str()),
        not_before: issued.map(|i| rfc3339(i.not_before)),
        not_after: issued.map(|i| rfc3339(i.not_after)),
        issuer_fingerprint_sha256: issued.map(|i| i.issuer_fingerprint_sha256.as_str()),
    })?;
    finish_line(line)
}

/// Appends `hash` (of `line`, the serialised body B) and the newline: the full line and its hash.
pub(super) fn finish_line(mut line: Vec<u8>) -> Result<(Vec<u8>, String), serde_json::Error> {
    let hash = sha256_hex(&line);
    line.pop(); // the closing brace of B
    line.extend_from_slice(HASH_KEY);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, hash))
}

/// RFC 3339 UTC with millis, clamped to 1970..=9999 (the formatter's range).
pub(super) fn rfc3339(t: SystemTime) -> String {
    let max = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    humantime::format_rfc3339_millis(t.clamp(UNIX_EPOCH, max)).to_string()
}

pub(super) struct Parsed {
    pub(super) seq: u64,
    pub(super) prev_hash: String,
    pub(super) hash: String,
    pub(super) value: serde_json::Value,
}

/// Where the `,"hash":"<64 hex>"}` suffix of a complete record line starts, if it has one.
pub(super) fn hash_suffix_at(line: &[u8]) -> Option<usize> {
    let suffix_len = HASH_KEY.len() + 64 + 2;
    line.len().checked_sub(suffix_len).filter(|&at| {
        let (key, rest) = line[at..].split_at(HASH_KEY.len());
        key == HASH_KEY
            && rest.ends_with(b"\"}")
            && rest[..64].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Whether `line` ends like a complete record (a write cut short cannot: `hash` is the last field).
pub(super) fn has_hash_suffix(line: &[u8]) -> bool {
    hash_suffix_at(line).is_some()
}

/// Checks one line (without its newline) on its own: hash suffix, digest, seq and prev_hash present.
pub(super) fn parse_line(line: &[u8]) -> Result<Parsed, (Option<u64>, String)> {
    let seq_of = |json: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(json).ok().and_then(|v| v.get("seq")?.as_u64())
    };
    let Some(at) = hash_suffix_at(line) else {
        return Err((seq_of(line), "missing or malformed hash".into()));
    };
    let mut body = line[..at].to_vec();
    body.push(b'}');
    let claimed = String::from_utf8_lossy(&line[at + HASH_KEY.len()..line.len() - 2]).into_owned();
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| (None, format!("not JSON: {e}")))?;
    let seq = value.get("seq").and_then(|v| v.as_u64());
    if sha256_hex(&body) != claimed {
        return Err((seq, "hash mismatch: record edited".into()));
    }
    let Some(seq) = seq else {
        return Err((None, "missing seq".into()));
    };
    let Some(prev_hash) = value.get("prev_hash").and_then(|v| v.as_str()) else {
        return Err((Some(seq), "missing prev_hash".into()));
    };
    Ok(Parsed { seq, prev_hash: prev_hash.to_string(), hash: claimed, value })
}
