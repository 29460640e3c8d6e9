//! meshca's log lines captured in a test: a `tracing` subscriber set as this
//! thread's default, so with `#[tokio::test]`'s current-thread runtime it sees the
//! in-process server's tasks (and nothing of other tests running at the same time).

use std::sync::{Arc, Mutex};

/// meshca's log lines (debug and up) from the tasks polled on this thread: with
/// `#[tokio::test]`'s runtime, the in-process server's.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn start(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("meshca=debug"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
