//! The admin HTTP port (`admin.listen`) over a real socket: the audit chain
//! head is reported outside the database as metrics, in a form `audit
//! verify --expected-head` takes back, and the health endpoints answer.

mod common;

use common::broker::{spawn_broker, spawn_broker_with_config, BrokerSpec, TestBroker};
use common::db::{admin_url, sqlite_url, TestDatabase};
use sqlx::Connection as _;
use token_broker::emulator::{self, EmulatorConfig};
use token_broker::proto::v1 as pb;

/// `GET url`: status and body.
async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("admin port answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The value of the unlabelled sample `name` in Prometheus text.
fn sample(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
}

/// The series of Prometheus text: each sample's name and labels, except
/// those of the per-call metrics (`grpc_server_*`, upstream requests),
/// whose first call of a kind adds its series (their stability over calls
/// of one kind is checked by
/// `grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series`).
fn series(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| {
            !l.starts_with("grpc_server_") && !l.starts_with("token_broker_upstream_request")
        })
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

async fn the_metrics_report_the_newest_audit_row_which_audit_verify_accepts(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = if postgres {
        Some(TestDatabase::create().await)
    } else {
        None
    };
    let store_url = match &db {
        Some(db) => db.url.clone(),
        None => sqlite_url(&dir),
    };
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(store_url.clone(), emulator.url()).with_admin_port();
    // The refusal's aggregated row is written at shutdown, not while the
    // head is compared (however slow the machine).
    let mut config = spec.config();
    config.audit.auth_failure_interval = std::time::Duration::from_secs(3600);
    let broker: TestBroker = spawn_broker_with_config(&spec, config).await;

    assert_eq!(get(&broker.admin_url("/healthz")).await.0, 200);
    assert_eq!(get(&broker.admin_url("/readyz")).await.0, 200);
    let (status, before) = get(&broker.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    // The one row so far: the configured refresh token, adopted at start.
    assert_eq!(
        sample(&before, "token_broker_audit_chain_head_id").as_deref(),
        Some("1"),
        "{before}"
    );
    assert_eq!(
        sample(&before, "token_broker_audit_chain_tamper_detected_total").as_deref(),
        Some("0"),
        "{before}"
    );

    // A refused caller (counted at once, its audit row written later,
    // aggregated), many granted leases and one revoked: audit rows.
    let refused = broker
        .anonymous_client()
        .await
        .create_lease(pb::CreateLeaseRequest::default())
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut client = broker.client(&spec.key("ci")).await;
    let mut leases = Vec::new();
    for _ in 0..12 {
        let lease = client
            .create_lease(pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.packaging".into()],
                ..Default::default()
            })
            .await
            .expect("the ci rule grants the lease");
        leases.push(lease.into_inner());
    }
    client
        .revoke_lease(pb::RevokeLeaseRequest {
            name: leases[0].name.clone(),
        })
        .await
        .expect("the holder revokes its lease");

    let (_, text) = get(&broker.admin_url("/metrics")).await;
    let store = token_broker::store::open(&store_url).await.unwrap();
    let newest = store
        .list_audit_chain(0, 1000)
        .await
        .unwrap()
        .pop()
        .expect("audit rows were written");
    let newest_mac = newest.mac.expect("the newest row is chained");
    assert_eq!(
        sample(&text, "token_broker_audit_chain_head_id"),
        Some(newest.id.to_string()),
        "{text}"
    );
    // No series per audit row: thirteen more rows, the same series.
    assert_eq!(series(&text), series(&before), "{before}\n---\n{text}");
    assert!(!text.contains(&newest_mac), "no MAC in the metrics: {text}");
    assert_eq!(
        sample(&text, "token_broker_leases_created_total").as_deref(),
        Some("12")
    );
    assert_eq!(
        sample(&text, "token_broker_lease_revocations_total").as_deref(),
        Some("1")
    );
    assert_eq!(
        sample(&text, "token_broker_auth_failures_total").as_deref(),
        Some("1")
    );

    // What `audit head` prints (the head id the metric shows) is what
    // `audit verify --expected-head` takes.
    let expected = format!("{}:{}", newest.id, newest_mac);
    assert_eq!(
        token_broker::cli::audit::head(&spec.config())
            .await
            .unwrap(),
        expected
    );
    let report = token_broker::cli::audit::verify(&spec.config(), Some(&expected))
        .await
        .expect("the chain verifies up to the exported head");
    assert!(report.ends_with(&expected), "{report}");
    broker.stop().await;
}

#[tokio::test]
async fn after_lease_creates_the_metrics_show_the_chain_head_that_audit_verify_accepts_on_sqlite() {
    the_metrics_report_the_newest_audit_row_which_audit_verify_accepts(false).await;
}

#[tokio::test]
async fn after_lease_creates_the_metrics_show_the_chain_head_that_audit_verify_accepts_on_postgres()
{
    the_metrics_report_the_newest_audit_row_which_audit_verify_accepts(true).await;
}

/// Runs `sql` on the PostgreSQL server's admin database.
async fn admin_sql(sql: &str) {
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
}

#[tokio::test]
async fn readyz_is_503_while_the_database_refuses_connections_and_200_once_it_is_back() {
    let db = TestDatabase::create().await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(db.url.clone(), emulator.url()).with_admin_port();
    let broker = spawn_broker(&spec).await;
    assert_eq!(get(&broker.admin_url("/readyz")).await.0, 200);

    admin_sql(&format!(
        r#"ALTER DATABASE "{name}" ALLOW_CONNECTIONS false"#
    ))
    .await;
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    let terminated: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid")
        .bind(&terminated)
        .execute(&mut conn)
        .await
        .unwrap();
    // Termination is signalled, not awaited: wait until those sessions are
    // gone, so the next ping must open a new connection. (Counting every
    // session of the database instead could spin for long: the broker's
    // refused reconnection attempts show there briefly, over and over.)
    let gone_by = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&terminated)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < gone_by,
            "the terminated sessions did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = get(&broker.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    // The process itself is fine: liveness stays green.
    assert_eq!(get(&broker.admin_url("/healthz")).await.0, 200);

    admin_sql(&format!(
        r#"ALTER DATABASE "{name}" ALLOW_CONNECTIONS true"#
    ))
    .await;
    assert_eq!(get(&broker.admin_url("/readyz")).await.0, 200);
    broker.stop().await;
}

#[tokio::test]
async fn without_admin_listen_no_admin_port_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(sqlite_url(&dir), emulator.url());
    let broker = spawn_broker(&spec).await;
    assert_eq!(broker.admin_addr, None);
    broker.stop().await;
}

/// Runs `sql` on the broker's database (`url`), as a database writer would.
async fn tamper_sql(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.expect(sql);
    }
}

/// Threat model, "database writer deletes the newest row" against a running
/// broker: the replica that wrote it says so at its next append (ERROR log
/// line, `token_broker_audit_chain_tamper_detected_total`, an
/// `audit.tamper_detected` row), and the head published before the deletion
/// (`audit head`) fails `audit verify --expected-head`. The `audit chain
/// head` line is logged once, at shutdown (interval 1h), not per row.
async fn deleting_the_newest_audit_row_is_detected_by_the_broker_that_wrote_it(postgres: bool) {
    let captured = common::logs::CapturedLogs::start(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let db = if postgres {
        Some(TestDatabase::create().await)
    } else {
        None
    };
    let store_url = match &db {
        Some(db) => db.url.clone(),
        None => sqlite_url(&dir),
    };
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(store_url.clone(), emulator.url()).with_admin_port();
    let mut config = spec.config();
    config.audit.head_log_interval = std::time::Duration::from_secs(3600);
    let broker: TestBroker = spawn_broker_with_config(&spec, config).await;
    let mut client = broker.client(&spec.key("ci")).await;
    let create = pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.packaging".into()],
        ..Default::default()
    };
    for _ in 0..2 {
        client.create_lease(create.clone()).await.expect("granted");
    }
    let published = token_broker::cli::audit::head(&spec.config())
        .await
        .unwrap();
    let (published_id, _) = published.split_once(':').unwrap();
    let published_id: i64 = published_id.parse().unwrap();
    token_broker::cli::audit::verify(&spec.config(), Some(&published))
        .await
        .expect("intact before the deletion");

    tamper_sql(
        &store_url,
        &format!("DELETE FROM audit_events WHERE id = {published_id}"),
    )
    .await;
    client
        .create_lease(create.clone())
        .await
        .expect("the broker keeps granting");

    let (_, text) = get(&broker.admin_url("/metrics")).await;
    assert_eq!(
        sample(&text, "token_broker_audit_chain_tamper_detected_total").as_deref(),
        Some("1"),
        "{text}"
    );
    let store = token_broker::store::open(&store_url).await.unwrap();
    let rows = store.list_audit_chain(0, 1000).await.unwrap();
    let tamper: Vec<_> = rows
        .iter()
        .filter(|r| r.event.as_ref().unwrap().action == token_broker::audit::AUDIT_TAMPER_DETECTED)
        .collect();
    assert_eq!(tamper.len(), 1);
    assert_eq!(
        tamper[0].id,
        published_id + 1,
        "the deleted id is not reused"
    );
    let detail = tamper[0].event.as_ref().unwrap().caller_detail.clone();
    assert!(
        detail
            .as_deref()
            .is_some_and(|d| d.starts_with(&format!("expected={published} found="))),
        "{detail:?}"
    );
    let err = token_broker::cli::audit::verify(&spec.config(), Some(&published))
        .await
        .expect_err("the published head fails after the deletion");
    assert!(err.to_string().contains("audit chain broken"), "{err}");

    broker.stop().await;
    let logs = captured.text();
    let errors = logs
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("audit chain tampered"))
        .count();
    assert_eq!(errors, 1, "{logs}");
    let heads: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("audit chain head"))
        .collect();
    let newest = rows.last().unwrap();
    assert_eq!(heads.len(), 1, "one line, at shutdown: {heads:?}");
    assert!(
        heads[0].contains(&format!("audit_id={}", newest.id)),
        "{}",
        heads[0]
    );
}

#[tokio::test]
async fn deleting_the_newest_audit_row_is_detected_by_the_broker_that_wrote_it_on_sqlite() {
    deleting_the_newest_audit_row_is_detected_by_the_broker_that_wrote_it(false).await;
}

#[tokio::test]
async fn deleting_the_newest_audit_row_is_detected_by_the_broker_that_wrote_it_on_postgres() {
    deleting_the_newest_audit_row_is_detected_by_the_broker_that_wrote_it(true).await;
}

/// `/metrics` parsed by a Prometheus text parser (not a regex).
async fn scrape(broker: &TestBroker) -> prometheus_parse::Scrape {
    let (status, text) = get(&broker.admin_url("/metrics")).await;
    assert_eq!(status, 200, "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text")
}

/// The value of the sample `name` whose labels include `labels` (0 when
/// no such series exists yet); histograms: their `_count`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: unexpected {other:?}"),
        })
        .sum()
}

/// Every series of a scrape: metric name and its sorted labels.
fn series_of(scrape: &prometheus_parse::Scrape) -> std::collections::BTreeSet<String> {
    scrape
        .samples
        .iter()
        .map(|s| {
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            format!("{}{{{}}}", s.metric, labels.join(","))
        })
        .collect()
}

const CREATE: [(&str, &str); 3] = [
    ("grpc_type", "unary"),
    ("grpc_service", "tokenbroker.v1.LeaseService"),
    ("grpc_method", "CreateLease"),
];
const GET: [(&str, &str); 3] = [
    ("grpc_type", "unary"),
    ("grpc_service", "tokenbroker.v1.LeaseService"),
    ("grpc_method", "GetLease"),
];

fn with<'a>(labels: &[(&'a str, &'a str)], more: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(more);
    all
}

/// Sends `n` calls to methods no service has (each a different path), as
/// an unauthenticated caller would: plain HTTP/2 POSTs with the gRPC
/// content type.
async fn call_unknown_methods(broker: &TestBroker, n: usize) {
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for i in 0..n {
        let response = http
            .post(format!("{}/probe.v{i}.Nope/Method{i}", broker.url))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(vec![0u8, 0, 0, 0, 0])
            .send()
            .await
            .expect("the server answers");
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(status.as_deref(), Some("12"), "UNIMPLEMENTED");
    }
}

async fn grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series(
    postgres: bool,
) {
    let captured = common::logs::CapturedLogs::start(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let db = if postgres {
        Some(TestDatabase::create().await)
    } else {
        None
    };
    let store_url = match &db {
        Some(db) => db.url.clone(),
        None => sqlite_url(&dir),
    };
    let emulator = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let spec = BrokerSpec::new(store_url, emulator.url()).with_admin_port();
    let broker = spawn_broker(&spec).await;
    let before = scrape(&broker).await;
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.metric == "process_cpu_seconds_total"),
        "process_cpu_seconds_total"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(value(&before, name, &[]) > 0.0, "{name}");
    }
    for pool in ["requests", "background", "audit"] {
        assert!(
            value(
                &before,
                "token_broker_db_pool_max_connections",
                &[("pool", pool)]
            ) >= 1.0,
            "{pool}"
        );
        for name in [
            "token_broker_db_pool_connections_in_use",
            "token_broker_db_pool_connections_idle",
        ] {
            assert!(
                before
                    .samples
                    .iter()
                    .any(|s| s.metric == name && s.labels.get("pool") == Some(pool)),
                "{name}{{pool={pool}}}"
            );
        }
    }
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.metric == "token_broker_db_pool_acquire_timeouts_total"),
        "token_broker_db_pool_acquire_timeouts_total"
    );
    for state in [
        "PENDING",
        "ACTIVE",
        "REVOKING",
        "REVOKED",
        "EXPIRED",
        "FAILED",
        "REVOKE_FAILED",
    ] {
        assert!(
            before
                .samples
                .iter()
                .any(|s| s.metric == "token_broker_leases" && s.labels.get("state") == Some(state)),
            "{state}"
        );
    }
    for name in [
        "token_broker_revocation_queue_depth",
        "token_broker_revocation_queue_oldest_age_seconds",
        "token_broker_upstream_throttle_wait_seconds_total",
    ] {
        assert!(before.samples.iter().any(|s| s.metric == name), "{name}");
    }

    let mut client = broker.client(&spec.key("ci")).await;
    let create = pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.packaging".into()],
        ..Default::default()
    };
    let missing = pb::GetLeaseRequest {
        name: format!("leases/{}", uuid::Uuid::new_v4()),
    };
    client.create_lease(create.clone()).await.expect("granted");
    let err = client.get_lease(missing.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let refused = broker
        .anonymous_client()
        .await
        .create_lease(create.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    call_unknown_methods(&broker, 3).await;

    let first = scrape(&broker).await;
    assert_eq!(value(&first, "grpc_server_started_total", &CREATE), 2.0);
    assert_eq!(
        value(
            &first,
            "grpc_server_handled_total",
            &with(&CREATE, ("grpc_code", "OK"))
        ),
        1.0
    );
    assert_eq!(
        value(
            &first,
            "grpc_server_handled_total",
            &with(&CREATE, ("grpc_code", "Unauthenticated"))
        ),
        1.0
    );
    assert_eq!(
        value(&first, "grpc_server_handling_seconds_count", &CREATE),
        2.0
    );
    assert_eq!(
        value(
            &first,
            "grpc_server_handled_total",
            &with(&GET, ("grpc_code", "NotFound"))
        ),
        1.0
    );
    assert_eq!(
        value(&first, "grpc_server_handling_seconds_count", &GET),
        1.0
    );
    // Unknown paths: one fixed series, whatever the path.
    let unknown = [("grpc_service", "unknown"), ("grpc_method", "unknown")];
    assert_eq!(value(&first, "grpc_server_started_total", &unknown), 3.0);
    assert_eq!(
        value(
            &first,
            "grpc_server_handled_total",
            &with(&unknown, ("grpc_code", "Unimplemented"))
        ),
        3.0
    );
    let create_ok = [("operation", "create"), ("status", "200")];
    assert_eq!(
        value(&first, "token_broker_upstream_requests_total", &create_ok),
        1.0
    );
    assert_eq!(
        value(
            &first,
            "token_broker_upstream_request_duration_seconds_count",
            &[("operation", "create")]
        ),
        1.0
    );

    // More calls of the same kinds, other unknown paths: the numbers move,
    // the series stay (no series per lease, audit row or path).
    for _ in 0..5 {
        client.create_lease(create.clone()).await.expect("granted");
        client.get_lease(missing.clone()).await.unwrap_err();
    }
    call_unknown_methods(&broker, 5).await;
    let second = scrape(&broker).await;
    assert_eq!(series_of(&second), series_of(&first));
    assert_eq!(
        value(
            &second,
            "grpc_server_handled_total",
            &with(&CREATE, ("grpc_code", "OK"))
        ),
        6.0
    );
    assert_eq!(
        value(&second, "token_broker_upstream_requests_total", &create_ok),
        6.0
    );
    assert_eq!(value(&second, "grpc_server_started_total", &unknown), 8.0);
    broker.stop().await;

    // The access log: one INFO line per authenticated call, with its
    // identity and never its key; refusals and unknown paths stay at DEBUG.
    let logs = captured.text();
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("token_broker::access"))
        .collect();
    let created = access
        .iter()
        .filter(|l| {
            l.contains("INFO")
                && l.contains("method=tokenbroker.v1.LeaseService/CreateLease")
                && l.contains("code=\"OK\"")
                && l.contains("identity=\"apikey:ci\"")
                && l.contains("duration_ms=")
        })
        .count();
    assert_eq!(created, 6, "{access:#?}");
    assert_eq!(
        access
            .iter()
            .filter(|l| l.contains("code=\"NotFound\""))
            .count(),
        6,
        "{access:#?}"
    );
    assert!(
        !access
            .iter()
            .any(|l| l.contains("Unauthenticated") || l.contains("Unimplemented")),
        "{access:#?}"
    );
    let key = secrecy::ExposeSecret::expose_secret(&spec.key("ci")).to_owned();
    assert!(!logs.contains(&key), "no API key in the logs");
}

#[tokio::test]
async fn grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series_on_sqlite()
{
    grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series(false).await;
}

#[tokio::test]
async fn grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series_on_postgres(
) {
    grpc_upstream_pool_process_and_lease_metrics_move_with_calls_in_bounded_series(true).await;
}
