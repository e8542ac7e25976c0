//! Every gRPC call observed once, by one tower service around every route
//! ([`Observed`]): its span ([`super::rpc_span`]), its metrics and its
//! access log line. The method is looked up once per call and its final
//! status is read once (one response-body wrapper) and reported to all
//! three.
//!
//! Metrics carry the names and labels of go-grpc-middleware's Prometheus
//! interceptor (`providers/prometheus`, and go-grpc-prometheus before it),
//! so stock gRPC dashboards work unchanged:
//! - `grpc_server_started_total{grpc_type,grpc_service,grpc_method}`;
//! - `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`;
//! - `grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`
//!   histogram with Prometheus' default buckets (5 ms … 10 s). As in
//!   go-grpc-middleware (v1 and v2), it has no `grpc_code` label.
//!
//! Only methods the server serves get their own labels (read from the
//! services' file descriptors); any other path is counted under
//! `grpc_service="unknown", grpc_method="unknown", grpc_type="unknown"`,
//! so no caller can add series. (Its span is still named after the path
//! when the path has the shape of one, [`super::rpc_span`].)
//!
//! A call is handled when its `grpc-status` is known: in the response
//! headers (trailers-only answers, e.g. refusals) or in the trailers at
//! the body's end. A status that is missing or not a number (trailers
//! without one, a body that ends without trailers) counts as `Unknown`; a
//! call dropped before its status (the client went away, `grpc-timeout`
//! expired), whether before its response or during its body, counts as
//! `Canceled`.
//!
//! The access log: one line per call, target [`ACCESS_LOG_TARGET`], with
//! `method`, `code`, `duration_ms` and `identity`. At INFO when the caller
//! authenticated; at DEBUG when it did not (refusals, health checks,
//! reflection, unknown methods): anything an unauthenticated caller can
//! trigger in bulk must not become a flood of INFO lines.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use prost::Message as _;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::Service;
use tracing::{Instrument as _, Span};

use super::rpc_span;
use crate::auth::Caller;

/// `tracing` target of the access log lines.
pub const ACCESS_LOG_TARGET: &str = "token_broker::access";

/// The label value of paths that name no served method.
const UNKNOWN: &str = "unknown";

/// `grpc-status` UNKNOWN: a status that is missing or not a number.
const STATUS_UNKNOWN: i32 = 2;

/// `grpc-status` CANCELLED: the call was dropped before its status (the
/// client went away or the deadline passed).
const STATUS_CANCELLED: i32 = 1;

/// Labels of one served method (or of every unknown path).
#[derive(Clone, Debug)]
struct MethodLabels {
    /// `unary`, `server_stream`, `client_stream` or `bidi_stream`.
    kind: &'static str,
    /// Full service name, e.g. `tokenbroker.v1.LeaseService`.
    service: Arc<str>,
    /// Method name, e.g. `CreateLease`.
    method: Arc<str>,
}

impl MethodLabels {
    fn unknown() -> Self {
        MethodLabels {
            kind: UNKNOWN,
            service: UNKNOWN.into(),
            method: UNKNOWN.into(),
        }
    }

    fn values(&self) -> [&str; 3] {
        [self.kind, &self.service, &self.method]
    }
}

/// The `grpc_server_*` metrics and the table of served methods.
pub struct RpcMetrics {
    started: IntCounterVec,
    handled: IntCounterVec,
    handling: HistogramVec,
    /// By request path (`/package.Service/Method`).
    methods: HashMap<String, MethodLabels>,
    /// Length of the longest key of `methods`: a longer path is not hashed
    /// (it is the caller's to choose, before authentication).
    longest: usize,
    unknown: MethodLabels,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics")
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

impl RpcMetrics {
    /// Registers the three metrics on `registry`, labelling the methods of
    /// the services in `descriptor_sets` (encoded `FileDescriptorSet`s).
    ///
    /// Errors: a metric of the same name already registered; a descriptor
    /// set that does not decode.
    pub fn register(
        registry: &Registry,
        descriptor_sets: &[&[u8]],
    ) -> Result<RpcMetrics, prometheus::Error> {
        let labels = ["grpc_type", "grpc_service", "grpc_method"];
        let started = IntCounterVec::new(
            Opts::new(
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
            ),
            &labels,
        )?;
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )?;
        // prometheus::DEFAULT_BUCKETS are Go's prometheus.DefBuckets.
        let handling = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            ),
            &labels,
        )?;
        registry.register(Box::new(started.clone()))?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(handling.clone()))?;
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .map_err(|e| prometheus::Error::Msg(format!("file descriptor set: {e}")))?;
            for file in &set.file {
                for service in &file.service {
                    let full: Arc<str> = match file.package() {
                        "" => service.name().into(),
                        package => format!("{package}.{}", service.name()).into(),
                    };
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        methods.insert(
                            format!("/{full}/{}", method.name()),
                            MethodLabels {
                                kind,
                                service: full.clone(),
                                method: method.name().into(),
                            },
                        );
                    }
                }
            }
        }
        Ok(RpcMetrics {
            started,
            handled,
            handling,
            longest: methods.keys().map(String::len).max().unwrap_or(0),
            methods,
            unknown: MethodLabels::unknown(),
        })
    }

    /// The labels of the method `path` names, if the server serves it.
    fn served(&self, path: &str) -> Option<&MethodLabels> {
        if path.len() > self.longest {
            return None;
        }
        self.methods.get(path)
    }
}

/// Go's name of a gRPC status code, as go-grpc-middleware labels it
/// (`codes.Code.String()`).
pub fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Where the authentication wrapper leaves who called, for the access log:
/// [`Observed`] puts one in each request's extensions, and
/// [`super::Authenticated`] fills it once the caller is known.
#[derive(Clone, Debug, Default)]
pub struct CallerSlot(Arc<OnceLock<String>>);

impl CallerSlot {
    /// Records `caller`'s identity (e.g. `apikey:ci`; never a credential).
    pub fn fill(&self, caller: &Caller) {
        let _ = self.0.set(caller.identity.to_string());
    }

    fn identity(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// One call in progress: reported once, when its status is known or,
/// failing that, when it is dropped.
struct CallRecord {
    metrics: Arc<RpcMetrics>,
    labels: MethodLabels,
    start: Instant,
    caller: CallerSlot,
    /// The call's span; it ends when the record is dropped.
    span: Span,
    done: bool,
}

impl CallRecord {
    /// Reports the call's `grpc-status` `code`: counted handled, logged,
    /// recorded into its span (in that order, so a log of the span's
    /// fields reads as before).
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.start.elapsed();
        let [kind, service, method] = self.labels.values();
        let code_name = go_code_name(Code::from_i32(code));
        self.metrics
            .handled
            .with_label_values(&[kind, service, method, code_name])
            .inc();
        self.metrics
            .handling
            .with_label_values(&[kind, service, method])
            .observe(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let rpc = format_args!("{service}/{method}");
        match self.caller.identity() {
            Some(identity) => tracing::info!(
                target: ACCESS_LOG_TARGET,
                method = %rpc,
                code = code_name,
                duration_ms,
                identity,
                "rpc"
            ),
            None => tracing::debug!(
                target: ACCESS_LOG_TARGET,
                method = %rpc,
                code = code_name,
                duration_ms,
                identity = "-",
                "rpc"
            ),
        }
        rpc_span::record_status(&self.span, code);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Dropped before a status: the client reset the stream, or the
        // call's grpc-timeout expired.
        self.finish(STATUS_CANCELLED);
    }
}

/// The `grpc-status` in `headers`, if there is one (UNKNOWN if it is not a
/// number).
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(STATUS_UNKNOWN),
    )
}

/// `S` observed: every call in its span, counted in [`RpcMetrics`] and
/// logged (see the module doc).
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S> Observed<S> {
    /// `inner`, observed into `metrics`.
    pub fn new(inner: S, metrics: Arc<RpcMetrics>) -> Self {
        Observed { inner, metrics }
    }
}

impl<S> Service<http::Request<Body>> for Observed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The one lookup: a served method's labels name its span too; any
        // other path is counted `unknown`, its span named after the path.
        let path = request.uri().path();
        let (labels, span) = match self.metrics.served(path) {
            Some(labels) => {
                let span = rpc_span::call_span(&labels.service, &labels.method, request.headers());
                (labels.clone(), span)
            }
            None => {
                let (service, method) =
                    rpc_span::service_and_method(path).unwrap_or((UNKNOWN, UNKNOWN));
                let span = rpc_span::call_span(service, method, request.headers());
                (self.metrics.unknown.clone(), span)
            }
        };
        let entered = span.enter();
        self.metrics
            .started
            .with_label_values(&labels.values())
            .inc();
        let caller = CallerSlot::default();
        request.extensions_mut().insert(caller.clone());
        let mut record = CallRecord {
            metrics: self.metrics.clone(),
            labels,
            start: Instant::now(),
            caller,
            span: span.clone(),
            done: false,
        };
        let response = self.inner.call(request);
        drop(entered);
        Box::pin(
            async move {
                let Ok(response) = response.await;
                // Trailers-only answers (every error tonic sends) carry the
                // status in the headers; others in the trailers.
                if let Some(code) = grpc_status(response.headers()) {
                    record.finish(code);
                    return Ok(response);
                }
                Ok(response.map(|body| {
                    Body::new(ObservedBody {
                        body,
                        record: Some(record),
                    })
                }))
            }
            // Everything the call does runs in its span.
            .instrument(span),
        )
    }
}

/// A response body that reports its call's status from its trailers, and
/// keeps the call's span open until then (a streamed answer is part of the
/// call). Dropped before them: CANCELLED.
struct ObservedBody {
    body: Body,
    record: Option<CallRecord>,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| grpc_status(t).unwrap_or(STATUS_UNKNOWN)),
            Poll::Ready(Some(Err(status))) => Some(status.code() as i32),
            // Ended without trailers: no status was sent.
            Poll::Ready(None) => Some(STATUS_UNKNOWN),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(mut record) = self.record.take() {
                record.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_get_their_labels_and_other_paths_one_fixed_set() {
        let registry = Registry::new();
        let m = RpcMetrics::register(
            &registry,
            &[
                crate::proto::v1::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        )
        .unwrap();
        let labels = |path| m.served(path).unwrap_or(&m.unknown);
        let create = labels("/tokenbroker.v1.LeaseService/CreateLease");
        assert_eq!(
            create.values(),
            ["unary", "tokenbroker.v1.LeaseService", "CreateLease"]
        );
        assert_eq!(
            labels("/tokenbroker.v1.CredentialService/WatchCredential").values(),
            [
                "server_stream",
                "tokenbroker.v1.CredentialService",
                "WatchCredential"
            ]
        );
        assert_eq!(
            labels("/tokenbroker.v1.AdminService/RotateCredential").values(),
            ["unary", "tokenbroker.v1.AdminService", "RotateCredential"]
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Watch").values(),
            ["server_stream", "grpc.health.v1.Health", "Watch"]
        );
        let long = format!(
            "/tokenbroker.v1.LeaseService/CreateLease{}",
            "x".repeat(10_000)
        );
        for path in ["/x.Y/Z", "/tokenbroker.v1.LeaseService/Nope", "/", &long] {
            assert_eq!(labels(path).values(), ["unknown"; 3]);
        }
    }

    #[test]
    fn every_code_has_its_go_name() {
        assert_eq!(go_code_name(Code::Cancelled), "Canceled");
        assert_eq!(go_code_name(Code::PermissionDenied), "PermissionDenied");
        assert_eq!(go_code_name(Code::from_i32(16)), "Unauthenticated");
    }

    #[test]
    fn grpc_status_is_read_as_a_number_and_anything_else_is_unknown() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), Some(5));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), Some(STATUS_UNKNOWN));
    }
}
