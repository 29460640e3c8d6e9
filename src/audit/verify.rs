//! Reading a log back, record by record: each hash and the chain, recorded gaps,
//! continuations and an incomplete tail told apart from corruption, and the Merkle
//! tree over the lines ([`scan`]: what `serve` checks at start and `meshca audit
//! verify` reports).

use std::io::BufRead as _;

use super::merkle::{leaf_hash, Frontier, Hash, Leaves};
use super::*;

/// Result of a successful [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records, the writer's own (`gap`, `continued`) included.
    pub records: u64,
    pub last_hash: Option<String>,
    /// `gap` records: places where decisions are missing, recorded as such.
    pub gaps: u64,
    /// Appends the gap records say were refused while the sink failed.
    pub refused: u64,
    /// Incomplete lines the gap records say were cut off at open.
    pub torn: u64,
    /// The previous file's last record, when this file continues another's chain.
    pub continues: Option<Continuation>,
    /// Length of a final line without newline: an interrupted write, not
    /// counted in `records` (the next open cuts it off).
    pub incomplete_tail: Option<u64>,
    /// The `hash` of the first record (the log id is its first 16 hex digits).
    pub first_hash: Option<String>,
    /// Records after which a writer says checkpoints were not kept (`uncovered`
    /// markers: records written before an unclean stop, or before checkpoints).
    pub uncovered: u64,
}

/// A [`verify`] that also builds the Merkle tree over the complete lines.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) report: VerifyReport,
    pub(crate) tree: Frontier,
    /// Every leaf hash, when asked for.
    pub(crate) leaves: Option<Leaves>,
    /// The root once the tree had the asked-for size (if it reached it).
    pub(crate) root_at: Option<Hash>,
}

/// What a `continued` record says about the file before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Continuation {
    /// At which record of this file (1 when it was new).
    pub seq: u64,
    /// `renamed` or `removed`.
    pub previous_file: String,
    pub previous_seq: u64,
    pub previous_hash: String,
}

/// Why a log failed [`verify`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The log could not be read.
    #[error("cannot read audit log: {0}")]
    Io(#[from] io::Error),
    /// The first broken record: 1-based line number, its seq if readable, and what is wrong.
    #[error("audit log broken at line {line}{}: {problem}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Broken { line: u64, seq: Option<u64>, problem: String },
}

/// Checks a whole log: every line's hash, seq = previous + 1 starting at 1,
/// and prev_hash = previous hash (64 zeros first). Stops at the first broken
/// record. A final line without newline is reported as
/// [`VerifyReport::incomplete_tail`], unless it is a complete record whose
/// hash or chain is wrong (then it is broken like any other).
pub fn verify(reader: impl io::BufRead) -> Result<VerifyReport, VerifyError> {
    Ok(scan(reader, false, None)?.report)
}

/// [`verify`], building the tree; `keep_leaves` keeps every leaf hash, `root_at`
/// asks for the root of the tree of that many records.
pub(crate) fn scan(
    mut reader: impl io::BufRead,
    keep_leaves: bool,
    root_at: Option<u64>,
) -> Result<Scan, VerifyError> {
    let mut buf = Vec::new();
    let mut scan = Scan { leaves: keep_leaves.then(Leaves::default), ..Scan::default() };
    if root_at == Some(0) {
        scan.root_at = Some(scan.tree.root());
    }
    let report = &mut scan.report;
    let mut line_no: u64 = 0;
    loop {
        buf.clear();
        if (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)? == 0 {
            report.records = line_no;
            return Ok(scan);
        }
        line_no += 1;
        if buf.len() > MAX_LINE {
            let problem = format!("a line longer than {MAX_LINE} bytes: not a record");
            return Err(VerifyError::Broken { line: line_no, seq: None, problem });
        }
        let broken = |seq, problem: String| VerifyError::Broken { line: line_no, seq, problem };
        let (line, complete) = match buf.strip_suffix(b"\n") {
            Some(line) => (line, true),
            None if !has_hash_suffix(&buf) => {
                report.records = line_no - 1;
                report.incomplete_tail = Some(buf.len() as u64);
                return Ok(scan);
            }
            None => (&buf[..], false),
        };
        let parsed = parse_line(line).map_err(|(seq, problem)| broken(seq, problem))?;
        if parsed.seq != line_no {
            let problem = format!(
                "seq gap: expected {line_no}, found {} (record deleted, inserted or reordered)",
                parsed.seq
            );
            return Err(broken(Some(parsed.seq), problem));
        }
        if parsed.prev_hash != report.last_hash.as_deref().unwrap_or(ZERO_HASH) {
            return Err(broken(
                Some(parsed.seq),
                "prev_hash mismatch: does not chain to the previous record".into(),
            ));
        }
        if !complete {
            // A whole, chained record whose newline never made it: still an interrupted write.
            report.records = line_no - 1;
            report.incomplete_tail = Some(buf.len() as u64);
            return Ok(scan);
        }
        let leaf = leaf_hash(line);
        scan.tree.push(leaf);
        if let Some(leaves) = scan.leaves.as_mut() {
            leaves.0.push(leaf);
        }
        if root_at == Some(line_no) {
            scan.root_at = Some(scan.tree.root());
        }
        if line_no == 1 {
            report.first_hash = Some(parsed.hash.clone());
        }
        let field = |name: &str| parsed.value.get(name);
        let number = |name: &str| field(name).and_then(|v| v.as_u64());
        match field("outcome").and_then(|v| v.as_str()) {
            Some("gap") => {
                report.gaps += 1;
                report.refused += number("refused").unwrap_or(0);
                report.torn += u64::from(number("torn_bytes").is_some());
            }
            Some("continued") if report.continues.is_none() => {
                let text = |name: &str| field(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                report.continues = Some(Continuation {
                    seq: parsed.seq,
                    previous_file: text("previous_file"),
                    previous_seq: number("previous_seq").unwrap_or(0),
                    previous_hash: text("previous_hash"),
                });
            }
            Some("uncovered") => {
                let (from, to) = (number("uncovered_from").unwrap_or(1), number("uncovered_to").unwrap_or(0));
                report.uncovered += (to + 1).saturating_sub(from);
            }
            _ => {}
        }
        report.last_hash = Some(parsed.hash);
    }
}

/// [`verify`] on a file.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify(io::BufReader::new(File::open(path)?))
}
