//! Refused authentications cost O(1): a flood of unauthenticated calls
//! (30,000 header-only requests pipelined on one kept-open connection, and
//! separately 2,000 in flight at once across 20 connections) never touches
//! the database per call, so a legitimate CreateLease during it succeeds,
//! health stays SERVING, and the refusals land in the audit trail as a few
//! aggregated `authenticate` rows whose counts add up to what was sent.
//! Also: a bearer over 16 KiB is UNAUTHENTICATED `TOKEN_MALFORMED`, counted.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::codegen::{http, Bytes};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt as _;

use common::broker::{spawn_broker_with_config, BrokerSpec, TestBroker};
use common::db::{sqlite_url, DbGuard, TestDatabase};
use token_broker::audit::{AuditEvent, Outcome, AUTHENTICATE};
use token_broker::auth::MAX_BEARER_BYTES;
use token_broker::emulator::{self, RunningEmulator};
use token_broker::proto::v1 as pb;

/// A well-formed API key no broker is configured with.
const BOGUS_BEARER: &str = "Bearer tbk_never-configured-0123456789abcdefghij";

/// Which store a scenario runs on.
enum Db {
    Postgres,
    Sqlite,
}

/// A fresh store of `db`'s kind: its URL and what keeps it alive.
async fn store(db: Db) -> (String, DbGuard) {
    match db {
        Db::Postgres => {
            let pg = TestDatabase::create().await;
            (pg.url.clone(), DbGuard::Postgres(pg))
        }
        Db::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (sqlite_url(&dir), DbGuard::Sqlite(dir))
        }
    }
}

/// A broker on `store_url` writing aggregated refusal rows every second.
async fn broker(store_url: String) -> (TestBroker, BrokerSpec, RunningEmulator) {
    let emu = emulator::spawn(Default::default()).await.unwrap();
    let spec = BrokerSpec::new(store_url, emu.url());
    let mut config = spec.config();
    config.audit.auth_failure_interval = Duration::from_secs(1);
    let broker = spawn_broker_with_config(&spec, config).await;
    (broker, spec, emu)
}

/// A raw HTTP/2 connection (prior knowledge, as gRPC over plaintext).
async fn h2_connection(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// A header-only gRPC GetLease (HEADERS with END_STREAM, no message) with a
/// bearer the broker refuses.
fn refused_request(addr: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/tokenbroker.v1.LeaseService/GetLease"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", BOGUS_BEARER)
        .body(())
        .unwrap()
}

/// The `grpc-status` of an answer: from its headers (trailers-only, as a
/// refusal is) or else its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    if let Some(s) = response.headers().get("grpc-status") {
        return s.to_str().ok().map(str::to_owned);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.ok()?;
    }
    let trailers = body.trailers().await.ok()??;
    trailers
        .get("grpc-status")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// Sends `total` refused requests on one connection to `addr`, at most
/// `in_flight` at once (and never more than the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS: `ready()` waits for a free stream), and
/// keeps the connection open until every answer is in. Counts each
/// UNAUTHENTICATED answer in `refused`; returns the number of other answers.
async fn flood_one_connection(
    addr: SocketAddr,
    total: usize,
    in_flight: usize,
    refused: Arc<AtomicUsize>,
) -> usize {
    let mut send = h2_connection(addr).await;
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut answers = JoinSet::new();
    let mut other = 0;
    let mut tally = |answer: Option<String>| {
        if answer.as_deref() == Some("16") {
            refused.fetch_add(1, Ordering::Relaxed);
        } else {
            other += 1;
        }
    };
    // One answer first: by then the server's SETTINGS (its stream limit)
    // are in, so `ready()` below never opens a stream past it.
    send = send.ready().await.expect("the connection stays open");
    let (response, _) = send
        .send_request(refused_request(addr), true)
        .expect("the connection takes a request");
    tally(grpc_status(response).await);
    for _ in 1..total {
        let slot = slots.clone().acquire_owned().await.unwrap();
        send = send.ready().await.expect("the connection stays open");
        let (response, _) = send
            .send_request(refused_request(addr), true)
            .expect("the connection takes a request");
        answers.spawn(async move {
            let answer = grpc_status(response).await;
            drop(slot);
            answer
        });
        while let Some(done) = answers.try_join_next() {
            tally(done.unwrap());
        }
    }
    while let Some(done) = answers.join_next().await {
        tally(done.unwrap());
    }
    drop(send);
    other
}

/// The refused authentications the broker wrote, from its store.
async fn refusal_rows(store_url: &str) -> Vec<AuditEvent> {
    let store = token_broker::store::open(store_url).await.unwrap();
    store
        .list_audit(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == AUTHENTICATE)
        .collect()
}

/// `N` of a refusal row's `caller_detail` `count=N interval_start=…
/// interval_end=…`.
fn count_of(row: &AuditEvent) -> u64 {
    let detail = row.caller_detail.as_deref().expect("an aggregated row");
    let mut parts = detail.split(' ');
    let count = parts.next().and_then(|p| p.strip_prefix("count="));
    assert!(
        parts
            .next()
            .is_some_and(|p| p.starts_with("interval_start="))
            && parts.next().is_some_and(|p| p.starts_with("interval_end=")),
        "{detail}"
    );
    count.and_then(|n| n.parse().ok()).expect(detail)
}

async fn health(broker: &TestBroker) -> ServingStatus {
    HealthClient::new(broker.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

/// A legitimate CreateLease (and its time, for the report; not asserted).
async fn create_lease(broker: &TestBroker, spec: &BrokerSpec) -> Duration {
    let mut client = broker.client(&spec.key("ci")).await;
    let started = Instant::now();
    client
        .create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.packaging".into()],
            ..Default::default()
        })
        .await
        .expect("a legitimate CreateLease succeeds during the flood");
    started.elapsed()
}

/// Runs `connections` × `per_connection` refused requests, `in_flight` at
/// once per connection; once a tenth are answered, checks that a legitimate
/// CreateLease succeeds and health is SERVING; then stops the broker (its
/// shutdown writes the last interval) and checks that the aggregated rows
/// count every refusal in few rows, and that the chain verifies.
async fn flood_leaves_grants_alone(
    db: Db,
    connections: usize,
    per_connection: usize,
    in_flight: usize,
) {
    let (store_url, _guard) = store(db).await;
    let (broker, spec, _emu) = broker(store_url.clone()).await;
    let idle = create_lease(&broker, &spec).await;
    let refused = Arc::new(AtomicUsize::new(0));
    let total = connections * per_connection;
    let mut flood = JoinSet::new();
    for _ in 0..connections {
        flood.spawn(flood_one_connection(
            broker.addr,
            per_connection,
            in_flight,
            refused.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while refused.load(Ordering::Relaxed) < total / 10 {
        assert!(Instant::now() < deadline, "the flood did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = create_lease(&broker, &spec).await;
    let answered_then = refused.load(Ordering::Relaxed);
    assert_eq!(health(&broker).await, ServingStatus::Serving);
    let mut other = 0;
    while let Some(done) = flood.join_next().await {
        other += done.unwrap();
    }
    eprintln!(
        "CreateLease idle {idle:?}, during the flood {during:?} ({answered_then} of {total} refusals answered when it returned)"
    );
    assert_eq!(other, 0, "every flood request is refused UNAUTHENTICATED");
    assert_eq!(refused.load(Ordering::Relaxed), total);
    assert_eq!(health(&broker).await, ServingStatus::Serving);
    broker.stop().await;

    let rows = refusal_rows(&store_url).await;
    let counted: u64 = rows
        .iter()
        .filter(|r| r.outcome == Outcome::Denied)
        .map(count_of)
        .sum();
    assert_eq!(counted, total as u64, "the rows account for every refusal");
    for row in &rows {
        assert_eq!(row.identity, "-");
        assert_eq!(row.outcome, Outcome::Denied);
        assert_eq!(row.reason.as_deref(), Some("UNAUTHENTICATED"));
        assert_eq!(
            row.peer.as_deref(),
            Some("127.0.0.1"),
            "the address, no port"
        );
    }
    // One row per second of flood at most (plus the last, at shutdown).
    assert!(rows.len() <= 200, "{} rows: not aggregated", rows.len());
    token_broker::cli::audit::verify(&spec.config(), None)
        .await
        .expect("the chain with the aggregated rows verifies");
}

/// 30,000 on one connection, as many in flight as the server allows.
async fn thirty_thousand_refusals_on_one_connection_leave_grants_and_health_alone(db: Db) {
    flood_leaves_grants_alone(db, 1, 30_000, 10_000).await;
}

/// 2,000 in flight at once: 20 connections × 100 streams, 5 rounds each.
async fn two_thousand_refusals_in_flight_leave_grants_and_health_alone(db: Db) {
    flood_leaves_grants_alone(db, 20, 500, 100).await;
}

/// A bearer of 16 KiB + 1 (under the HTTP/2 header limit) reaches the
/// authenticator and is refused `TOKEN_MALFORMED`, and counted; one of
/// exactly 16 KiB is read (an unknown key: `UNAUTHENTICATED`).
async fn a_bearer_over_16_kib_is_token_malformed_and_counted(db: Db) {
    let (store_url, _guard) = store(db).await;
    let (broker, _spec, _emu) = broker(store_url.clone()).await;
    let over = format!("Bearer tbk_{}", "x".repeat(MAX_BEARER_BYTES + 1 - 4));
    let status = broker
        .client_with_header(&over)
        .await
        .get_lease(pb::GetLeaseRequest {
            name: "leases/00000000-0000-4000-8000-000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "TOKEN_MALFORMED");
    assert!(
        !status.message().contains("xxxxxxxx"),
        "no echo of the bearer"
    );
    let at_limit = format!("Bearer tbk_{}", "x".repeat(MAX_BEARER_BYTES - 4));
    let status = broker
        .client_with_header(&at_limit)
        .await
        .get_lease(pb::GetLeaseRequest {
            name: "leases/00000000-0000-4000-8000-000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "UNAUTHENTICATED"
    );
    broker.stop().await;

    let rows = refusal_rows(&store_url).await;
    let malformed: Vec<&AuditEvent> = rows
        .iter()
        .filter(|r| r.reason.as_deref() == Some("TOKEN_MALFORMED"))
        .collect();
    assert_eq!(malformed.len(), 1, "{rows:?}");
    assert_eq!(count_of(malformed[0]), 1);
    assert_eq!(malformed[0].outcome, Outcome::Denied);
}

on_both_stores!(
    postgres = super::Db::Postgres,
    sqlite = super::Db::Sqlite;
    thirty_thousand_refusals_on_one_connection_leave_grants_and_health_alone,
    two_thousand_refusals_in_flight_leave_grants_and_health_alone,
    a_bearer_over_16_kib_is_token_malformed_and_counted,
);

/// By hand, for BENCHMARKS.md ("Refusal floods"): floods a running broker
/// at `TB_FLOOD_ADDR` (`HOST:PORT`, plaintext) with refused header-only
/// requests: `TB_FLOOD_CONNECTIONS` connections (default 1) ×
/// `TB_FLOOD_REQUESTS` each (default 30,000), at most `TB_FLOOD_IN_FLIGHT`
/// in flight per connection (default 10,000, i.e. the server's stream
/// limit), and prints how many were refused and how fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement against a broker started by hand; see BENCHMARKS.md"]
async fn flood_a_running_broker() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .map_or(default, |v| v.parse().expect(name))
    };
    let addr: SocketAddr = std::env::var("TB_FLOOD_ADDR")
        .expect("TB_FLOOD_ADDR=HOST:PORT")
        .parse()
        .expect("TB_FLOOD_ADDR is HOST:PORT");
    let connections = env("TB_FLOOD_CONNECTIONS", 1);
    let per_connection = env("TB_FLOOD_REQUESTS", 30_000);
    let in_flight = env("TB_FLOOD_IN_FLIGHT", 10_000);
    let refused = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut flood = JoinSet::new();
    for _ in 0..connections {
        flood.spawn(flood_one_connection(
            addr,
            per_connection,
            in_flight,
            refused.clone(),
        ));
    }
    let mut other = 0;
    while let Some(done) = flood.join_next().await {
        other += done.unwrap();
    }
    let elapsed = started.elapsed();
    let refused = refused.load(Ordering::Relaxed);
    eprintln!(
        "{refused} refused, {other} other answers, in {elapsed:?} ({:.0} a second)",
        refused as f64 / elapsed.as_secs_f64()
    );
}
