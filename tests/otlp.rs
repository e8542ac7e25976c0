//! OpenTelemetry traces: the real `token-broker serve` binary, pointed at
//! an OTLP/gRPC receiver of the test's own by `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! traces a CreateLease under the trace id the caller sent in
//! `traceparent`, with its store and upstream calls as descendants, the
//! upstream request carrying the trace on to the emulator, and no secret in
//! anything exported. Without the `OTEL_*` variables it exports nothing and
//! propagates nothing. Calls that end without an answer (dropped by the
//! client) or reach no service get the same status in their span, in the
//! metrics and in the access log.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use opentelemetry_proto::tonic::trace::v1::Span;
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::broker::BrokerSpec;
use common::db::sqlite_url;
use common::emulator::Emu;
use common::process::ServeProcess;
use common::wait::poll;
use token_broker::emulator::DEFAULT_REFRESH_TOKEN;
use token_broker::proto::v1 as pb;

/// The caller's trace and span (W3C trace context, sampled).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

/// A span with its resource's attributes.
type ResourceSpan = (Vec<KeyValue>, Span);

/// What the receiver got: every span, with its resource's attributes.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ResourceSpan>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((resource.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    /// An OTLP/gRPC trace receiver on a loopback port; its URL.
    async fn start() -> (Received, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Received::default();
        let service = TraceServiceServer::new(received.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (received, url)
    }

    fn spans(&self) -> Vec<ResourceSpan> {
        self.0.lock().unwrap().clone()
    }
}

/// The attribute `key` as text (strings as they are, numbers in decimal).
fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let kv = attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The attribute `key` if it is an integer.
fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    let kv = attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// Every attribute value exported (resource, spans, their events and
/// links) as text, with span names, for the secret check.
fn everything_exported(spans: &[ResourceSpan]) -> String {
    let mut all = String::new();
    for (resource, span) in spans {
        all.push_str(&format!("{resource:?}\n{span:?}\n"));
    }
    all
}

fn spec(dir: &tempfile::TempDir, emu: &Emu) -> BrokerSpec {
    BrokerSpec::new(sqlite_url(dir), emu.running.url())
}

async fn create_lease_with_traceparent(
    broker: &ServeProcess,
    spec: &BrokerSpec,
    traceparent: Option<&str>,
) -> pb::Lease {
    let mut client = broker.client(&spec.key("ci")).await;
    let mut request = tonic::Request::new(pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code_write".into()],
        ttl: None,
        request_id: String::new(),
    });
    if let Some(tp) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    client
        .create_lease(request)
        .await
        .expect("lease created")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_lease_is_traced_under_the_callers_trace_id_down_to_its_upstream_call() {
    let (received, endpoint) = Received::start().await;
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = spec(&dir, &emu);
    let mut broker = ServeProcess::spawn_with_env(
        &spec,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "token-broker-otlp-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        ],
    );
    broker.wait_ready().await;

    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let lease = create_lease_with_traceparent(&broker, &spec, Some(&traceparent)).await;
    let token = lease.token.clone();
    assert!(!token.is_empty(), "CreateLease answers the PAT");

    // The upstream request carried the trace on.
    let requests = emu.requests().await;
    let create = requests
        .iter()
        .find(|r| r["operation"] == "create")
        .expect("the emulator saw the create");
    let sent = create["traceparent"]
        .as_str()
        .expect("the create request carried a traceparent");
    assert!(
        sent.starts_with(&format!("00-{TRACE_ID}-")) && sent.ends_with("-01"),
        "{sent}"
    );

    // SIGTERM: `serve` sends the spans still queued before it exits.
    assert!(broker.sigterm().await.success(), "{}", broker.log_tail());
    let spans = received.spans();
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();

    let trace_id = hex::decode(TRACE_ID).unwrap();
    let (resource, rpc) = spans
        .iter()
        .find(|(_, s)| s.name == "tokenbroker.v1.LeaseService/CreateLease")
        .unwrap_or_else(|| panic!("no CreateLease span among {names:?}"));
    assert_eq!(rpc.trace_id, trace_id, "the caller's trace");
    assert_eq!(
        rpc.parent_span_id,
        hex::decode(CALLER_SPAN_ID).unwrap(),
        "child of the caller's span"
    );
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    let a = &rpc.attributes;
    assert_eq!(attr(a, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attr(a, "rpc.service").as_deref(),
        Some("tokenbroker.v1.LeaseService")
    );
    assert_eq!(attr(a, "rpc.method").as_deref(), Some("CreateLease"));
    assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(0));
    assert_eq!(attr(a, "identity.kind").as_deref(), Some("apikey"));
    assert_eq!(attr(a, "organization").as_deref(), Some("fabrikam"));
    assert_eq!(
        a.iter().filter(|kv| kv.key == "lease.id").count(),
        1,
        "lease.id recorded once"
    );
    let lease_id = attr(a, "lease.id").expect("lease.id recorded");
    assert!(
        lease.name.ends_with(&lease_id),
        "lease.id {lease_id} names the lease {}",
        lease.name
    );
    assert_eq!(
        attr(resource, "service.name").as_deref(),
        Some("token-broker-otlp-test")
    );
    assert_eq!(
        attr(resource, "deployment.environment").as_deref(),
        Some("test")
    );

    // Descendants of the RPC span, by parent links within the trace.
    let by_id: HashMap<&[u8], &Span> = spans
        .iter()
        .filter(|(_, s)| s.trace_id == trace_id)
        .map(|(_, s)| (s.span_id.as_slice(), s))
        .collect();
    let under_rpc = |span: &Span| {
        let mut parent = span.parent_span_id.as_slice();
        while let Some(p) = by_id.get(parent) {
            if p.span_id == rpc.span_id {
                return true;
            }
            parent = p.parent_span_id.as_slice();
        }
        false
    };

    let upstream = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "upstream.create")
        .unwrap_or_else(|| panic!("no upstream create span among {names:?}"));
    assert_eq!(
        upstream.trace_id, trace_id,
        "the upstream call is in the trace"
    );
    assert!(under_rpc(upstream), "the upstream call is under the RPC");
    assert_eq!(upstream.kind, SpanKind::Client as i32);
    let u = &upstream.attributes;
    assert_eq!(attr(u, "operation").as_deref(), Some("create"));
    assert_eq!(attr(u, "organization").as_deref(), Some("fabrikam"));
    assert_eq!(attr(u, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(int_attr(u, "http.response.status_code"), Some(200));
    assert_eq!(attr(u, "http.request.resend_count"), None, "no retry");
    // What the emulator received is this span's context.
    assert_eq!(
        sent,
        format!("00-{TRACE_ID}-{}-01", hex::encode(&upstream.span_id)),
        "traceparent names the upstream span"
    );

    let store = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.trace_id == trace_id && s.name == "store.create_lease")
        .unwrap_or_else(|| panic!("no store create_lease span among {names:?}"));
    assert!(under_rpc(store), "the store call is under the RPC");
    assert_eq!(
        attr(&store.attributes, "db.system").as_deref(),
        Some("sqlite")
    );

    // No secret in anything exported: the leased PAT, the caller's API key,
    // the refresh token, the keys.
    let all = everything_exported(&spans);
    for (what, secret) in [
        ("the leased PAT", token.as_str()),
        ("the caller's API key", spec.key("ci").expose_secret()),
        ("the refresh token", DEFAULT_REFRESH_TOKEN),
        ("the sealing key", spec.sealing_key.expose_secret()),
        ("the fingerprint key", spec.fingerprint_key.expose_secret()),
        ("the audit chain key", spec.audit_chain_key.expose_secret()),
    ] {
        assert!(!all.contains(secret), "{what} was exported");
    }
    assert!(
        !all.to_ascii_lowercase().contains("bearer"),
        "an Authorization value was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otel_variables_the_broker_serves_and_propagates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = spec(&dir, &emu);
    let mut broker = ServeProcess::start(&spec, &[]).await;

    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let lease = create_lease_with_traceparent(&broker, &spec, Some(&traceparent)).await;
    assert!(!lease.token.is_empty());
    let requests = emu.requests().await;
    let create = requests
        .iter()
        .find(|r| r["operation"] == "create")
        .expect("the emulator saw the create");
    assert!(create["traceparent"].is_null(), "{create}");
    assert!(broker.sigterm().await.success(), "{}", broker.log_tail());
}

/// The `grpc_server_handled_total` sample of `service`/`method` with
/// `grpc_code` `code` in the Prometheus text `metrics` (0 when absent).
fn handled(metrics: &str, service: &str, method: &str, code: &str) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "grpc_server_handled_total")
        .filter(|s| {
            s.labels.get("grpc_service") == Some(service)
                && s.labels.get("grpc_method") == Some(method)
                && s.labels.get("grpc_code") == Some(code)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("grpc_server_handled_total: {other:?}"),
        })
        .sum()
}

/// An HTTP/2 gRPC POST to `path` (no service has it), as an
/// unauthenticated caller would send it; its `grpc-status`.
async fn call_path(broker: &ServeProcess, path: &str) -> Option<String> {
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = http
        .post(format!("http://{}{path}", broker.grpc_addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .expect("the server answers");
    response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_unserved_calls_end_with_one_status_in_their_span_metrics_and_access_log() {
    let (received, endpoint) = Received::start().await;
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = spec(&dir, &emu);
    let mut broker = ServeProcess::spawn_with_env(
        &spec,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            // Exported as they end, so the test can wait for them.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    broker.wait_ready().await;

    // A Health/Watch stream the client drops after its first message: the
    // call's response body is dropped before its trailers.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", broker.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch answers")
        .into_inner();
    watch
        .message()
        .await
        .expect("a first status")
        .expect("the stream is open");
    drop(watch);

    // A CreateLease the client gives up on while the upstream is slow: the
    // call is dropped before its response.
    emu.set_faults(serde_json::json!([{"operation": "create", "latencyMs": 2000, "times": 1}]))
        .await;
    let mut client = broker.client(&spec.key("ci")).await;
    let given_up = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        client.create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.code_write".into()],
            ttl: None,
            request_id: String::new(),
        }),
    )
    .await;
    assert!(
        given_up.is_err(),
        "answered despite the slow upstream: {given_up:?}"
    );

    // Paths no service serves: one shaped like a method, one not.
    assert_eq!(
        call_path(&broker, "/probe.v1.Nope/Method").await.as_deref(),
        Some("12")
    );
    assert_eq!(
        call_path(&broker, "/probe/a/b").await.as_deref(),
        Some("12")
    );

    // Metrics: both dropped calls Canceled, the unserved paths `unknown`.
    let metrics = poll(
        "both dropped calls counted",
        std::time::Duration::from_secs(30),
        || async {
            let metrics = broker.metrics().await;
            let watch = handled(&metrics, "grpc.health.v1.Health", "Watch", "Canceled");
            let create = handled(
                &metrics,
                "tokenbroker.v1.LeaseService",
                "CreateLease",
                "Canceled",
            );
            if watch == 1.0 && create == 1.0 {
                Ok(metrics)
            } else {
                Err(format!("Watch {watch}, CreateLease {create}"))
            }
        },
    )
    .await;
    assert_eq!(
        handled(&metrics, "unknown", "unknown", "Unimplemented"),
        2.0
    );
    assert_eq!(
        handled(&metrics, "tokenbroker.v1.LeaseService", "CreateLease", "OK"),
        0.0
    );

    // The access log: the authenticated caller's dropped call at INFO, Canceled.
    let log = broker.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("token_broker::access"))
        .collect();
    assert_eq!(
        access
            .iter()
            .filter(|l| l.contains("INFO")
                && l.contains("tokenbroker.v1.LeaseService/CreateLease")
                && l.contains("Canceled")
                && l.contains("apikey:ci"))
            .count(),
        1,
        "{access:#?}"
    );

    // The given-up CreateLease still runs to its commit on its own task,
    // in the call's span: that span ends (and is exported) after it.
    let rpcs = [
        "grpc.health.v1.Health/Watch",
        "tokenbroker.v1.LeaseService/CreateLease",
        "probe.v1.Nope/Method",
        "unknown/unknown",
    ];
    let spans = poll(
        "every call's span exported",
        std::time::Duration::from_secs(30),
        || async {
            let spans = received.spans();
            let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
            if rpcs.iter().all(|rpc| names.contains(rpc)) {
                Ok(spans)
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
    .await;
    assert!(broker.sigterm().await.success(), "{}", broker.log_tail());
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let span = |name: &str| {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span among {names:?}"))
    };
    let status = |s: &Span| s.status.as_ref().map_or(0, |st| st.code);

    // Dropped calls: CANCELLED, which is the caller's doing (no error).
    for name in [
        "grpc.health.v1.Health/Watch",
        "tokenbroker.v1.LeaseService/CreateLease",
    ] {
        let s = span(name);
        assert_eq!(
            int_attr(&s.attributes, "rpc.grpc.status_code"),
            Some(1),
            "{name}"
        );
        assert_ne!(status(s), SpanStatus::Error as i32, "{name}");
    }
    assert_eq!(
        attr(
            &span("tokenbroker.v1.LeaseService/CreateLease").attributes,
            "identity.kind"
        )
        .as_deref(),
        Some("apikey")
    );

    // Unserved paths: named after the path when it has a method's shape,
    // `unknown/unknown` otherwise; UNIMPLEMENTED, a server error.
    for (name, service) in [
        ("probe.v1.Nope/Method", "probe.v1.Nope"),
        ("unknown/unknown", "unknown"),
    ] {
        let s = span(name);
        assert_eq!(attr(&s.attributes, "rpc.service").as_deref(), Some(service));
        assert_eq!(
            int_attr(&s.attributes, "rpc.grpc.status_code"),
            Some(12),
            "{name}"
        );
        assert_eq!(status(s), SpanStatus::Error as i32, "{name}");
    }
}
