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

/// The `mac` label of `token_broker_audit_chain_head_info` series whose
/// value is 1.
fn head_macs(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("token_broker_audit_chain_head_info{mac=\"")?;
            let (mac, value) = rest.split_once("\"} ")?;
            (value == "1").then(|| mac.to_owned())
        })
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
    assert_eq!(head_macs(&before).len(), 1, "{before}");

    // A refused caller (counted at once, its audit row written later,
    // aggregated), two granted leases and one revoked: three audit rows.
    let refused = broker
        .anonymous_client()
        .await
        .create_lease(pb::CreateLeaseRequest::default())
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut client = broker.client(&spec.key("ci")).await;
    let mut leases = Vec::new();
    for _ in 0..2 {
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
    assert_eq!(
        head_macs(&text),
        vec![newest_mac.clone()],
        "one head series, the newest row's MAC: {text}"
    );
    assert_eq!(
        sample(&text, "token_broker_leases_created_total").as_deref(),
        Some("2")
    );
    assert_eq!(
        sample(&text, "token_broker_lease_revocations_total").as_deref(),
        Some("1")
    );
    assert_eq!(
        sample(&text, "token_broker_auth_failures_total").as_deref(),
        Some("1")
    );

    // What the metric shows is what `audit verify --expected-head` takes.
    let expected = format!("{}:{}", newest.id, newest_mac);
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
