//! What an auditor runs: `meshca audit verify FILE --key … [--checkpoint …]` checks a
//! log against its signed checkpoints ([`check`]), and `meshca audit prove` prints
//! RFC 6962 inclusion and consistency proofs against them ([`inclusion`],
//! [`consistency`]).
//!
//! A log is checked record by record first (hash and chain, naming the first broken
//! record), then against each checkpoint: `PATH.checkpoint` (the latest meshca
//! wrote) and, with `--checkpoint`, one saved earlier anywhere (a witness's copy, or
//! one taken from the log pipeline). Each must be signed by a given key, name this
//! log, be no larger than the log, and sign the root of the log's first `size`
//! records; the latest must not be a closing checkpoint with records after it; and
//! a consistency proof from the saved one to the latest must hold. Records after the
//! largest checkpoint are reported as not covered, never as proven.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::checkpoint::{self, Checkpoint, VerifierKey};
use super::merkle::{self, Hash, Leaves};
use super::*;

/// Why a log failed [`check`] or a proof could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Log(#[from] VerifyError),
    /// A checkpoint the log disagrees with, or one that cannot be opened.
    #[error("checkpoint {}: {problem}", path.display())]
    Checkpoint { path: PathBuf, problem: String },
    /// `--key` without any checkpoint to check against.
    #[error(
        "no checkpoint: {} is missing and no --checkpoint was given, so nothing is signed to check the log against",
        path.display()
    )]
    NoCheckpoint { path: PathBuf },
    /// What `prove` was asked for is not in the log, or not covered yet.
    #[error("{0}")]
    NotProvable(String),
}

impl From<io::Error> for CheckError {
    fn from(e: io::Error) -> Self {
        CheckError::Log(VerifyError::Io(e))
    }
}

/// A checkpoint read and opened, with where it came from.
#[derive(Clone, Debug)]
pub struct Opened {
    pub path: PathBuf,
    pub checkpoint: Checkpoint,
    pub note: String,
}

/// What [`check`] found.
#[derive(Debug)]
pub struct Checked {
    pub report: VerifyReport,
    pub leaves: Leaves,
    /// `PATH.checkpoint`, when present.
    pub latest: Option<Opened>,
    /// The `--checkpoint` given.
    pub saved: Option<Opened>,
}

impl Checked {
    /// Records the checkpoints cover (the largest size).
    pub fn covered(&self) -> u64 {
        [&self.latest, &self.saved]
            .iter()
            .filter_map(|o| o.as_ref())
            .map(|o| o.checkpoint.size)
            .max()
            .unwrap_or(0)
    }

    /// The checkpoint proofs are made against: the latest, else the saved one.
    fn head(&self) -> Option<&Opened> {
        self.latest.as_ref().or(self.saved.as_ref())
    }
}

fn open(path: &Path, keys: &[VerifierKey]) -> Result<Opened, CheckError> {
    let (checkpoint, note) = Checkpoint::read(path, keys)
        .map_err(|e| CheckError::Checkpoint { path: path.to_path_buf(), problem: e.to_string() })?;
    Ok(Opened { path: path.to_path_buf(), checkpoint, note })
}

/// Checks `file` (see the module docs). `keys` empty: the chain only.
pub fn check(file: &Path, keys: &[VerifierKey], saved: Option<&Path>) -> Result<Checked, CheckError> {
    let scanned = scan(io::BufReader::new(File::open(file)?), true, None)?;
    let (report, leaves) = (scanned.report, scanned.leaves.unwrap_or_default());
    let mut checked = Checked { report, leaves, latest: None, saved: None };
    if keys.is_empty() {
        return Ok(checked);
    }
    let latest_path = checkpoint_path(file);
    if latest_path.exists() {
        checked.latest = Some(open(&latest_path, keys)?);
    }
    if let Some(path) = saved {
        checked.saved = Some(open(path, keys)?);
    }
    if checked.latest.is_none() && checked.saved.is_none() {
        return Err(CheckError::NoCheckpoint { path: latest_path });
    }
    let records = checked.report.records;
    let log_id = checked.report.first_hash.as_deref().map(checkpoint::log_id).unwrap_or_default();
    for (opened, is_latest) in [(&checked.latest, true), (&checked.saved, false)] {
        let Some(Opened { path, checkpoint: cp, .. }) = opened else { continue };
        let refuse = |problem: String| CheckError::Checkpoint { path: path.clone(), problem };
        if cp.size > records {
            let torn = if checked.report.incomplete_tail.is_some() { " and an incomplete line" } else { "" };
            return Err(refuse(format!(
                "it signed {} records but the log has {records} complete record(s){torn}: records {}..={} were \
                 removed (truncated below a signed size), or the log was replaced",
                cp.size,
                records + 1,
                cp.size
            )));
        }
        if cp.size > 0 && cp.log_id() != log_id {
            return Err(refuse(format!(
                "it is for log {} (origin {}), but this log's id is {log_id} (its first record differs): the \
                 log was replaced",
                cp.log_id(),
                cp.origin
            )));
        }
        if checked.leaves.root(cp.size) != cp.root {
            return Err(refuse(format!(
                "the log's first {} record(s) do not hash to the root it signed: a record at or before seq {} \
                 was edited, deleted, inserted or reordered (and the chain recomputed)",
                cp.size, cp.size
            )));
        }
        if is_latest && cp.closed() && records > cp.size {
            return Err(refuse(format!(
                "records {}..={records} follow the checkpoint meshca wrote as it closed the log at {} record(s): \
                 meshca did not write them (a forged append)",
                cp.size + 1,
                cp.size
            )));
        }
    }
    if let (Some(latest), Some(saved)) = (&checked.latest, &checked.saved) {
        let (old, new) = (&saved.checkpoint, &latest.checkpoint);
        if old.size > new.size {
            return Err(CheckError::Checkpoint {
                path: latest.path.clone(),
                problem: format!(
                    "it signs {} records, fewer than the saved checkpoint {} ({}): the checkpoint was rolled back",
                    new.size,
                    saved.path.display(),
                    old.size
                ),
            });
        }
        let consistent = old.size == 0
            || checked.leaves.consistency_proof(old.size, new.size).is_some_and(|proof| {
                merkle::check_consistency(old.size, new.size, &old.root, &new.root, &proof)
            });
        if !consistent {
            return Err(CheckError::Checkpoint {
                path: latest.path.clone(),
                problem: format!("no consistency proof from the saved checkpoint {}", saved.path.display()),
            });
        }
    }
    Ok(checked)
}

fn b64(hash: &Hash) -> String {
    BASE64.encode(hash)
}

/// An inclusion proof of the `issued` record for `serial` (hex, any case, colons
/// allowed) against the checkpoint, as JSON.
pub fn inclusion(file: &Path, checked: &Checked, serial: &str) -> Result<serde_json::Value, CheckError> {
    use std::io::BufRead as _;
    let wanted: String = serial.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let head =
        checked.head().ok_or_else(|| CheckError::NotProvable("no checkpoint to prove against".into()))?;
    let mut found = None;
    for (index, line) in io::BufReader::new(File::open(file)?).split(b'\n').enumerate() {
        let line = line?;
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else { break };
        if value["outcome"] == "issued"
            && value["serial"].as_str().is_some_and(|s| s.eq_ignore_ascii_case(&wanted))
        {
            found = Some((index as u64, line));
            break;
        }
    }
    let Some((index, line)) = found else {
        return Err(CheckError::NotProvable(format!(
            "no issued record with serial {wanted} in {}",
            file.display()
        )));
    };
    let cp = &head.checkpoint;
    if index >= cp.size {
        return Err(CheckError::NotProvable(format!(
            "the record for serial {wanted} (seq {}) is not yet covered by a checkpoint ({} signs {} records); \
             try again after the next one",
            index + 1,
            head.path.display(),
            cp.size
        )));
    }
    let proof = checked.leaves.inclusion_proof(index, cp.size).unwrap_or_default();
    Ok(serde_json::json!({
        "origin": cp.origin,
        "tree_size": cp.size,
        "root_hash": b64(&cp.root),
        "log_index": index,
        "seq": index + 1,
        "record": String::from_utf8_lossy(&line),
        "leaf_hash": b64(&merkle::leaf_hash(&line)),
        "inclusion_proof": proof.iter().map(b64).collect::<Vec<_>>(),
        "checkpoint": head.note,
    }))
}

/// A consistency proof from the saved checkpoint to the latest, as JSON.
pub fn consistency(checked: &Checked) -> Result<serde_json::Value, CheckError> {
    let (Some(latest), Some(saved)) = (&checked.latest, &checked.saved) else {
        return Err(CheckError::NotProvable(
            "a consistency proof needs the log's checkpoint and --checkpoint".into(),
        ));
    };
    let (old, new) = (&saved.checkpoint, &latest.checkpoint);
    let proof = checked.leaves.consistency_proof(old.size, new.size).unwrap_or_default();
    Ok(serde_json::json!({
        "origin": new.origin,
        "old_size": old.size,
        "old_root": b64(&old.root),
        "new_size": new.size,
        "new_root": b64(&new.root),
        "consistency_proof": proof.iter().map(b64).collect::<Vec<_>>(),
        "old_checkpoint": saved.note,
        "checkpoint": latest.note,
    }))
}
