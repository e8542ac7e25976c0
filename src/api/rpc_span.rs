//! A span per gRPC call, named and attributed as the OpenTelemetry semantic
//! conventions for RPC say (`tokenbroker.v1.LeaseService/CreateLease`,
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`),
//! child of the W3C trace context the caller sent in its metadata. The call
//! observer ([`super::observe::Observed`]) opens it and records the call's
//! status; what is learnt inside the call is recorded into it from there:
//! [`record_caller`], [`record_lease`], [`record_organization`].
//!
//! The span is at DEBUG: exported whenever traces are (the trace layer has
//! its own filter, [`crate::telemetry`]), in the log only at `debug`, and
//! free when neither wants it. Its target stays this module's path
//! (`token_broker::api::rpc_span`), which log filters may name.

use std::fmt::Display;

use tonic::codegen::http;
use tracing::field::Empty;
use tracing::Span;
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

/// The span of a call to `service`/`method`, child of the trace context in
/// `headers` (the request's metadata).
pub(super) fn call_span(service: &str, method: &str, headers: &http::HeaderMap) -> Span {
    let span = tracing::debug_span!(
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
    );
    if !span.is_disabled() {
        // Err only when no trace layer is installed: then nothing to join.
        let _ = span.set_parent(crate::telemetry::extract_parent(headers));
    }
    span
}

/// `("pkg.Service", "Method")` out of `/pkg.Service/Method`, if the path
/// has that shape, is at most [`MAX_PATH`] long and uses only the
/// characters protobuf names use: how a path no service serves is named.
pub(super) fn service_and_method(path: &str) -> Option<(&str, &str)> {
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

/// Records the call's final `grpc-status` (and, for a server error, the
/// span's error status).
pub(super) fn record_status(span: &Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
    if SERVER_ERRORS.contains(&code) {
        span.record("otel.status_code", "error");
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
}
