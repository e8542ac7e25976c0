//! Logging and tracing set-up: one global `tracing` subscriber writing to
//! stderr, as text or JSON lines, filtered by `RUST_LOG` when set, else by
//! the configured filter (`tracing_subscriber::EnvFilter` directive syntax,
//! e.g. `info,token_broker=debug`).

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::error::{ErrorCode, ServiceError};

/// The environment variable that overrides the configured filter.
pub const RUST_LOG: &str = "RUST_LOG";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A filter is not valid `EnvFilter` directive syntax.
    #[error("invalid log filter in {setting}: {message}")]
    BadFilter {
        /// Where it came from: `RUST_LOG` or `filter` (the configured one).
        setting: &'static str,
        /// The parser's complaint.
        message: String,
    },
}

impl ServiceError for TelemetryError {
    /// Always internal: start-up configuration, never a caller's input.
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn reason(&self) -> &'static str {
        "LOG_FILTER_INVALID"
    }
}

/// Installs the global subscriber writing to stderr. `RUST_LOG`, when set
/// and not empty, overrides `filter`; an empty `filter` means `info`.
/// `json`: one JSON object per line, else human-readable text (coloured on a
/// terminal). Records of the `log` crate are forwarded too.
///
/// Idempotent: if a global subscriber is already installed (a second call,
/// or a test harness), it is kept and this returns `Ok`.
///
/// Errors: [`TelemetryError::BadFilter`] naming `RUST_LOG` or `filter`.
pub fn init(filter: &str, json: bool) -> Result<(), TelemetryError> {
    let ansi = !json && std::io::stderr().is_terminal();
    init_with_writer(filter, json, ansi, std::io::stderr)
}

/// As [`init`], writing to `writer` instead of stderr (tests capture output
/// this way), with ANSI colours only when `ansi`.
pub fn init_with_writer<W>(
    filter: &str,
    json: bool,
    ansi: bool,
    writer: W,
) -> Result<(), TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let rust_log = std::env::var(RUST_LOG).ok();
    let filter = env_filter(filter, rust_log.as_deref())?;
    // Err only when a global subscriber or logger is already installed.
    let _ = subscriber(filter, json, ansi, writer).try_init();
    Ok(())
}

/// The filter in force: `rust_log` if set and not empty, else `filter`,
/// else `info`.
fn env_filter(filter: &str, rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    let (setting, directives) = match rust_log.map(str::trim) {
        Some(env) if !env.is_empty() => (RUST_LOG, env),
        _ if filter.trim().is_empty() => ("filter", "info"),
        _ => ("filter", filter.trim()),
    };
    EnvFilter::try_new(directives).map_err(|e| TelemetryError::BadFilter {
        setting,
        message: e.to_string(),
    })
}

fn subscriber<W>(
    filter: EnvFilter,
    json: bool,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // A failed write (stderr closed) would otherwise be reported with
        // eprintln!, which panics inside whatever request was logging.
        .log_internal_errors(false);
    if json {
        Box::new(builder.json().with_current_span(true).finish())
    } else {
        Box::new(builder.with_ansi(ansi).finish())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects everything written, for assertions.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Capture {
        type Writer = Capture;
        fn make_writer(&'w self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn emit_with(filter: &str, json: bool) -> String {
        let capture = Capture::default();
        let sub = subscriber(
            env_filter(filter, None).unwrap(),
            json,
            false,
            capture.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::info!(lease_id = "l-1", "lease created");
            tracing::debug!("debug detail");
        });
        capture.text()
    }

    #[test]
    fn rust_log_overrides_the_configured_filter() {
        let f = env_filter("info", Some("token_broker=trace")).unwrap();
        assert_eq!(f.to_string(), "token_broker=trace");
        let f = env_filter("warn", Some("  ")).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = env_filter("warn", None).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = env_filter("", None).unwrap();
        assert_eq!(f.to_string(), "info");
    }

    #[test]
    fn a_bad_filter_is_refused_naming_where_it_came_from() {
        let err = env_filter("info,token_broker=loud", None).unwrap_err();
        assert!(err.to_string().contains("filter"), "{err}");
        let err = env_filter("info", Some("token_broker=loud")).unwrap_err();
        assert!(
            matches!(
                err,
                TelemetryError::BadFilter {
                    setting: "RUST_LOG",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn text_output_carries_message_and_fields_and_respects_the_filter() {
        let out = emit_with("info", false);
        assert!(
            out.contains("lease created") && out.contains("lease_id=\"l-1\""),
            "{out}"
        );
        assert!(!out.contains("debug detail"), "{out}");
        assert!(emit_with("debug", false).contains("debug detail"));
    }

    #[test]
    fn json_output_is_one_object_per_line() {
        let out = emit_with("info", true);
        let line = out.lines().next().unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["message"], "lease created");
        assert_eq!(v["fields"]["lease_id"], "l-1");
    }

    #[test]
    fn init_twice_is_harmless() {
        // A sink, so other tests in this binary stay quiet.
        assert!(init_with_writer("info", false, false, std::io::sink).is_ok());
        assert!(init_with_writer("info", true, false, std::io::sink).is_ok());
    }
}
