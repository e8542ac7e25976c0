//! Logging and tracing set-up: one global `tracing` subscriber writing to
//! stderr, as text or JSON lines, filtered by `RUST_LOG` when set, else by
//! the configured filter (`tracing_subscriber::EnvFilter` directive syntax,
//! e.g. `info,token_broker=debug`).
//!
//! For `serve` and `dev`, [`init_with_traces`] also exports the broker's
//! spans as OpenTelemetry traces over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
//! set (README "Traces"): the same subscriber gets a second layer, with a
//! filter of its own, so the log filter does not decide what is traced.
//! Unset, no exporter, propagator or layer is installed.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::codegen::http::HeaderMap;
use tracing::{Level, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error::{ErrorCode, ServiceError};

/// The environment variable that overrides the configured filter.
pub const RUST_LOG: &str = "RUST_LOG";

/// Turns trace export on: the OTLP/gRPC endpoint for every signal
/// (`http://collector:4317`), read by the exporter itself.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Turns trace export on: the OTLP/gRPC endpoint for traces only; wins over
/// [`OTEL_EXPORTER_OTLP_ENDPOINT`].
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The `service.name` of the exported resource unless `OTEL_SERVICE_NAME`
/// or `service.name` in `OTEL_RESOURCE_ATTRIBUTES` names another.
pub const DEFAULT_SERVICE_NAME: &str = "token-broker";

/// The `tracing` name of the store-call spans (`store::sql`): exported only
/// inside another exported span, so health pings and idle background polls
/// do not each become a trace of their own.
pub const STORE_SPAN: &str = "store";

/// How long [`Traces::shutdown`] waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once trace export is installed; until then propagation is skipped.
static EXPORTING: AtomicBool = AtomicBool::new(false);

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
    /// The OTLP exporter could not be built from the `OTEL_*` variables
    /// (e.g. an endpoint that is not a URI).
    #[error("cannot set up OTLP trace export: {0}")]
    Exporter(String),
}

impl ServiceError for TelemetryError {
    /// Always internal: start-up configuration, never a caller's input.
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn reason(&self) -> &'static str {
        match self {
            TelemetryError::BadFilter { .. } => "LOG_FILTER_INVALID",
            TelemetryError::Exporter(_) => "OTLP_EXPORTER_INVALID",
        }
    }
}

/// Installs the global subscriber writing to stderr. `RUST_LOG`, when set
/// and not empty, overrides `filter`; an empty `filter` means `info`.
/// `json`: one JSON object per line, else human-readable text (coloured on a
/// terminal). Records of the `log` crate are forwarded too. Exports no
/// traces: see [`init_with_traces`].
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
    let _ = subscriber(filter, json, ansi, writer, None).try_init();
    Ok(())
}

/// As [`init`], and when [`OTEL_EXPORTER_OTLP_ENDPOINT`] or
/// [`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`] is set (not empty), exports
/// traces over OTLP/gRPC: a batch exporter configured by the standard
/// variables (`OTEL_EXPORTER_OTLP_*`; the sampler from
/// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, default
/// `parentbased_always_on`; the resource from `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`, `service.name` defaulting to
/// [`DEFAULT_SERVICE_NAME`]), and the W3C TraceContext propagator.
///
/// Exported: the broker's own spans (`token_broker` targets) at DEBUG and
/// above and the events inside them at INFO and above, whatever the log
/// filter says.
///
/// Must run inside the tokio runtime that outlives the exporter (its
/// channel lives there). Call [`Traces::shutdown`] before the process
/// ends so the last spans are sent.
///
/// Errors: [`TelemetryError::BadFilter`] as [`init`];
/// [`TelemetryError::Exporter`] when the exporter cannot be built.
pub fn init_with_traces(filter: &str, json: bool) -> Result<Traces, TelemetryError> {
    let ansi = !json && std::io::stderr().is_terminal();
    let rust_log = std::env::var(RUST_LOG).ok();
    let filter = env_filter(filter, rust_log.as_deref())?;
    if !export_configured(|name| std::env::var(name).ok()) {
        let _ = subscriber(filter, json, ansi, std::io::stderr, None).try_init();
        return Ok(Traces { provider: None });
    }
    let provider = tracer_provider()?;
    let otel = otel_layer(&provider);
    if subscriber(filter, json, ansi, std::io::stderr, Some(otel))
        .try_init()
        .is_err()
    {
        // A subscriber was already installed: nothing would reach ours.
        let _ = provider.shutdown();
        return Ok(Traces { provider: None });
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    EXPORTING.store(true, Ordering::Release);
    Ok(Traces {
        provider: Some(provider),
    })
}

/// Is trace export asked for: either endpoint variable set and not empty.
fn export_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    [
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
        OTEL_EXPORTER_OTLP_ENDPOINT,
    ]
    .iter()
    .any(|name| var(name).is_some_and(|v| !v.trim().is_empty()))
}

/// Whether spans are being exported ([`init_with_traces`] installed it).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// The tracer provider: OTLP/gRPC batch exporter (endpoint, timeout,
/// headers and compression from the `OTEL_EXPORTER_OTLP_*` variables,
/// which the exporter reads), sampler from the environment (the SDK reads
/// it), resource from the environment with our default service name.
fn tracer_provider() -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

/// The SDK's resource from the environment (`OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`), with `service.name` [`DEFAULT_SERVICE_NAME`]
/// instead of the SDK's `unknown_service` and our `service.version`, each
/// only where the environment names none.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let mut builder = Resource::builder();
    let unnamed = detected
        .get(&Key::from_static_str("service.name"))
        .is_none_or(|name| name.as_str().starts_with("unknown_service"));
    if unnamed {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let version = Key::from_static_str("service.version");
    if detected.get(&version).is_none() {
        builder = builder.with_attribute(KeyValue::new(
            version,
            Value::from(env!("CARGO_PKG_VERSION")),
        ));
    }
    builder.build()
}

/// The layer that turns `tracing` spans into OpenTelemetry spans, behind
/// its own filter ([`exported`]).
fn otel_layer(provider: &SdkTracerProvider) -> Box<dyn Layer<Registry> + Send + Sync> {
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("token-broker"))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(exported))
        .boxed()
}

/// What the trace layer takes: the broker's own spans at DEBUG and above
/// (store spans only inside another exported span) and its events at INFO
/// and above; nothing of its libraries (the exporter's own transport
/// included, which would otherwise trace itself).
fn exported<S>(meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !meta.target().starts_with("token_broker") {
        return false;
    }
    if meta.is_event() {
        return *meta.level() <= Level::INFO;
    }
    if *meta.level() > Level::DEBUG {
        return false;
    }
    meta.name() != STORE_SPAN || cx.lookup_current().is_some()
}

/// The OpenTelemetry tracer provider, when traces are exported.
#[must_use = "call shutdown() so the last spans are sent"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued and stops the exporter, waiting at most
    /// 5 s (a collector that is down must not hold up the exit). A failure
    /// is logged, not returned: the process is ending anyway.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // Blocking (it waits for the export thread), and the export itself
        // needs this runtime's tasks: run it beside them.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the last trace spans"),
            Err(e) => tracing::warn!(error = %e, "could not flush the last trace spans"),
        }
    }
}

/// The parent context a caller sent in its W3C `traceparent` /
/// `tracestate` headers (gRPC metadata), to give to
/// `OpenTelemetrySpanExt::set_parent`; an empty context when there is none
/// or export is off.
pub fn extract_parent(headers: &HeaderMap) -> opentelemetry::Context {
    if !exporting() {
        return opentelemetry::Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Adds the current span's W3C `traceparent` (and `tracestate`) to
/// `headers`, for an outgoing request; nothing when export is off or the
/// span is not sampled.
pub fn inject_current(headers: &mut HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
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

/// One registry: the log layer behind `filter`, and `otel` (behind its own
/// filter) when given.
fn subscriber<W>(
    filter: EnvFilter,
    json: bool,
    ansi: bool,
    writer: W,
    otel: Option<Box<dyn Layer<Registry> + Send + Sync>>,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        // A failed write (stderr closed) would otherwise be reported with
        // eprintln!, which panics inside whatever request was logging.
        .log_internal_errors(false);
    let fmt = if json {
        fmt.json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
        std::iter::once(fmt).chain(otel).collect();
    Box::new(tracing_subscriber::registry().with(layers))
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
            None,
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
    fn export_is_on_only_with_an_endpoint_variable_that_is_not_empty() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            export_configured(move |name| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        assert!(!with(&[]));
        assert!(!with(&[(OTEL_EXPORTER_OTLP_ENDPOINT, " ")]));
        assert!(!with(&[("OTEL_SERVICE_NAME", "x")]));
        assert!(with(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317")]));
        assert!(with(&[(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
            "http://c:4317"
        )]));
    }

    /// Names the spans a layer behind [`exported`] sees.
    #[derive(Clone, Default)]
    struct SeenSpans(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SeenSpans {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _id: &tracing::span::Id,
            _cx: Context<'_, S>,
        ) {
            self.0
                .lock()
                .unwrap()
                .push(attrs.metadata().name().to_owned());
        }
    }

    #[test]
    fn only_our_spans_are_exported_and_store_spans_only_inside_another() {
        let seen = SeenSpans::default();
        let sub = tracing_subscriber::registry().with(
            seen.clone()
                .with_filter(tracing_subscriber::filter::dynamic_filter_fn(exported)),
        );
        tracing::subscriber::with_default(sub, || {
            // A store call on its own (a health ping): not exported.
            tracing::debug_span!(target: "token_broker::store::sql", "store").in_scope(|| {});
            // A library's span: never.
            tracing::info_span!(target: "sqlx::query", "query").in_scope(|| {});
            // TRACE: below what is exported.
            tracing::trace_span!(target: "token_broker::x", "fine").in_scope(|| {});
            tracing::debug_span!(target: "token_broker::api::rpc_span", "rpc").in_scope(|| {
                tracing::debug_span!(target: "token_broker::store::sql", "store").in_scope(|| {});
            });
        });
        assert_eq!(*seen.0.lock().unwrap(), ["rpc", "store"]);
    }

    #[test]
    fn init_twice_is_harmless() {
        // A sink, so other tests in this binary stay quiet.
        assert!(init_with_writer("info", false, false, std::io::sink).is_ok());
        assert!(init_with_writer("info", true, false, std::io::sink).is_ok());
    }
}
