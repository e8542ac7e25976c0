//! Capturing the log lines a test's own thread writes, at a chosen level.
//!
//! `tracing::subscriber::set_default` alone is unreliable in a test binary
//! whose other tests run on other threads: while it is the only registered
//! dispatcher, tracing-core computes a new callsite's interest from the
//! default of whichever thread hits it first (a subscriber-less test thread
//! answers "never") and caches that for every thread. A second registered
//! dispatcher makes it ask every registered one instead, ours included.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;
use tracing::{Dispatch, Level};

/// This thread's log lines (plain text, no colours) at `level` and above
/// while the value lives.
pub struct CapturedLogs {
    buffer: Buffer,
    _default: DefaultGuard,
    _second: Dispatch,
}

impl CapturedLogs {
    /// Starts capturing on the calling thread (a `#[tokio::test]` body and
    /// the tasks it spawns run there).
    pub fn start(level: Level) -> Self {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let default = tracing::subscriber::set_default(subscriber);
        let second = Dispatch::new(tracing_subscriber::registry());
        tracing::callsite::rebuild_interest_cache();
        CapturedLogs {
            buffer,
            _default: default,
            _second: second,
        }
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.buffer.0.lock().unwrap().clone()).expect("log lines are UTF-8")
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
