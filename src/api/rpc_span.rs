//! A span per gRPC call, named and attributed as the OpenTelemetry semantic
//! conventions for RPC say (`tokenbroker.v1.LeaseService/CreateLease`,
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`),
//! child of the W3C trace context the caller sent in its metadata. What is
//! learnt inside the call is recorded into it from there: [`record_caller`],
//! [`record_lease`], [`record_organization`].
//!
//! The span is at DEBUG: exported whenever traces are (the trace layer has
//! its own filter, [`crate::telemetry`]), in the log only at `debug`, and
//! free when neither wants it.

use std::convert::Infallible;
use std::fmt::Display;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::domain::Identity;

/// Longest `/service/method` path whose parts are put into the span as
/// they are; anything longer or odd is named `unknown` (the path is the
/// caller's to choose, unauthenticated).
const MAX_PATH: usize = 160;

/// gRPC status codes the semantic conventions count as server errors
/// (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
/// DATA_LOSS); the rest are the caller's doing and leave the span unset.
const SERVER_ERRORS: [i32; 6] = [2, 4, 12, 13, 14, 15];

/// `grpc-status` when a call ends without one (its body dropped before the
/// trailers: the client went away or the deadline passed): CANCELLED.
const CANCELLED: i32 = 1;

/// Wraps a service (the broker's routes) so every call runs in its span.
#[derive(Clone)]
pub struct RpcSpans<S> {
    inner: S,
}

impl<S> RpcSpans<S> {
    /// `inner`, each call in a span.
    pub fn new(inner: S) -> Self {
        RpcSpans { inner }
    }
}

impl<S: NamedService> NamedService for RpcSpans<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for RpcSpans<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let span = rpc_span(request.uri().path());
        if !span.is_disabled() {
            // Err only when no trace layer is installed: then nothing to join.
            let _ = span.set_parent(crate::telemetry::extract_parent(request.headers()));
        }
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let Ok(response) = response.await;
                let span = Span::current();
                if span.is_disabled() {
                    return Ok(response);
                }
                // Trailers-only answers (every error tonic sends) carry the
                // status in the headers; others in the trailers.
                if let Some(code) = grpc_status(response.headers()) {
                    record_status(&span, code);
                    return Ok(response);
                }
                Ok(response.map(|body| {
                    Body::new(StatusFromTrailers {
                        body,
                        span: Some(span),
                    })
                }))
            }
            .instrument(span),
        )
    }
}

/// The span for a call to `path` (`/tokenbroker.v1.LeaseService/CreateLease`).
fn rpc_span(path: &str) -> Span {
    let (service, method) = service_and_method(path).unwrap_or(("unknown", "unknown"));
    tracing::debug_span!(
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        identity.kind = Empty,
        lease.id = Empty,
        organization = Empty,
    )
}

/// `("pkg.Service", "Method")` out of `/pkg.Service/Method`, if the path
/// has that shape, is at most [`MAX_PATH`] long and uses only the
/// characters protobuf names use.
fn service_and_method(path: &str) -> Option<(&str, &str)> {
    if path.len() > MAX_PATH {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let name = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    (name(service) && name(method)).then_some((service, method))
}

/// The `grpc-status` header or trailer, if present and a number.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn record_status(span: &Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
    if SERVER_ERRORS.contains(&code) {
        span.record("otel.status_code", "error");
    }
}

/// A response body that records the `grpc-status` of its trailers into the
/// call's span, and keeps the span open until the body ends (a streamed
/// answer is part of the call). Dropped before its trailers: CANCELLED.
struct StatusFromTrailers {
    body: Body,
    span: Option<Span>,
}

impl http_body::Body for StatusFromTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                    if let Some(span) = self.span.take() {
                        record_status(&span, code);
                    }
                }
            }
            Poll::Ready(None) => {
                // Ended without trailers: not a well-formed gRPC answer.
                if let Some(span) = self.span.take() {
                    record_status(&span, 2);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for StatusFromTrailers {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            record_status(&span, CANCELLED);
        }
    }
}

/// Records the authenticated caller's identity kind (`apikey`, `k8s`,
/// `spiffe`, `x509`; never the identity's secret or name) into the current
/// call's span.
pub fn record_caller(identity: &Identity) {
    Span::current().record("identity.kind", identity.kind());
}

/// Records the lease a call created or reads into the current call's span.
pub fn record_lease(id: impl Display) {
    Span::current().record("lease.id", tracing::field::display(id));
}

/// Records the Azure DevOps organization a call is about into the current
/// call's span.
pub fn record_organization(organization: impl Display) {
    Span::current().record("organization", tracing::field::display(organization));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_split_into_service_and_method_and_odd_ones_do_not() {
        assert_eq!(
            service_and_method("/tokenbroker.v1.LeaseService/CreateLease"),
            Some(("tokenbroker.v1.LeaseService", "CreateLease"))
        );
        assert_eq!(
            service_and_method("/tokenbroker.v1.CredentialService/WatchCredential"),
            Some(("tokenbroker.v1.CredentialService", "WatchCredential"))
        );
        assert_eq!(
            service_and_method("/grpc.health.v1.Health/Check"),
            Some(("grpc.health.v1.Health", "Check"))
        );
        for odd in [
            "/",
            "/a",
            "/a/",
            "//m",
            "/a/b/c",
            "/a b/c",
            "no-slash",
            &format!("/{}/m", "s".repeat(MAX_PATH)),
        ] {
            assert_eq!(service_and_method(odd), None, "{odd}");
        }
    }

    #[test]
    fn grpc_status_is_read_as_a_number() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&h), Some(5));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), None);
    }
}
