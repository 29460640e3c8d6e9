//! Where meshca's log lines go, and what happens when they cannot: a line is written
//! to stderr, and a failed write (a full disk under a redirected stderr, a closed
//! pipe) drops the line and counts it (`meshca_log_write_failures_total`). Nothing
//! is printed elsewhere instead and nothing panics: the subscriber's own error
//! reporting, which `eprint!`s and so panics when stderr itself fails, is turned off.
//! A log line is never worth a thread, least of all the audit writer's.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cli::LogFormat;

/// Log lines dropped because stderr refused them.
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr refused them, since start.
pub fn write_failures() -> u64 {
    WRITE_FAILURES.load(Ordering::Relaxed)
}

/// Stderr, with failed writes dropped and counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// A string a caller chose, for a log field (`%Escaped(&name)`): line breaks, quotes,
/// backslashes and control characters (terminal escapes) written as Rust escapes, so
/// that it can neither forge a log line nor drive a terminal; ordinary text unchanged.
pub(crate) struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.escape_debug())
    }
}

/// One line for the person at the terminal, on stderr, as [`Stderr`] writes: where
/// `eprintln!` would panic on a failing stderr, this drops the line and counts it.
pub fn line(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(Stderr, "{text}");
}

/// Installs the process's subscriber: `MESHCA_LOG` filters (default `info`), text
/// (colours only on a terminal that has not asked for none, https://no-color.org) or
/// one JSON object a line, to [`Stderr`].
pub fn init(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_writer(|| Stderr)
        .with_ansi(ansi)
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHCA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    match format {
        LogFormat::Text => logs.init(),
        // One object a line: timestamp, level, target, then the event's fields
        // (message, request_id, ...) at the top level, for log pipelines.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_keeps_ordinary_names_and_defuses_breaks_and_escapes() {
        let name = "web.default.serviceaccount.identity.meshca-system.cluster.local";
        assert_eq!(Escaped(name).to_string(), name);
        assert_eq!(Escaped("a\nb\u{1b}[2J\"").to_string(), r#"a\nb\u{1b}[2J\""#);
    }
}
