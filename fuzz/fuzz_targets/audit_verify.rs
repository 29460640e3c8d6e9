//! `audit::verify` on arbitrary bytes, as `meshca audit verify` reads a file.
//!
//! Invariants: it never panics; for a log it accepts, `records` is the number of
//! complete (newline-terminated) lines, a final line without newline is reported as
//! an incomplete tail of its exact length (and only then), `last_hash` is the hash
//! of the last complete line, and both the log without its tail and the log without
//! its last record are accepted with the counts that follow; a log it refuses is
//! refused at a line that exists, and says what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca::audit::{verify, VerifyError};

fuzz_target!(|data: &[u8]| {
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64;
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let tail = (data.len() - complete) as u64;
    match verify(data) {
        Ok(report) => {
            assert_eq!(report.records, lines);
            assert_eq!(report.incomplete_tail, (tail > 0).then_some(tail), "incomplete tail");
            assert!(report.gaps <= report.records);
            assert_eq!(report.last_hash.is_some(), lines > 0);
            if let Some(hash) = &report.last_hash {
                let last = data[..complete - 1].rsplit(|b| *b == b'\n').next().unwrap_or_default();
                let suffix = format!(",\"hash\":\"{hash}\"}}");
                assert!(last.ends_with(suffix.as_bytes()), "last_hash is not the last line's");
            }
            if tail > 0 {
                let whole = verify(&data[..complete]).expect("the log without its tail is valid");
                assert_eq!((whole.records, &whole.last_hash), (lines, &report.last_hash));
                assert_eq!(whole.incomplete_tail, None);
            }
            if lines > 0 {
                let cut = data[..complete - 1].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let shorter = verify(&data[..cut]).expect("a valid log without its last record is valid");
                assert_eq!(shorter.records, lines - 1);
            }
        }
        Err(VerifyError::Broken { line, problem, .. }) => {
            let partial = u64::from(tail > 0);
            assert!(line >= 1 && line <= lines + partial, "line {line} of {lines} (+{partial}): {problem}");
            assert!(!problem.is_empty());
        }
        Err(e) => panic!("reading a slice failed: {e}"),
    }
});
