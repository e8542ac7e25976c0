//! Faults at the broker level: gRPC in, the
//! emulator over a socket out, PostgreSQL underneath. What a caller sees
//! when upstream throttles, stalls, fails or drops the connection, and
//! what reached upstream meanwhile (the emulator's request log); and a
//! PostgreSQL restart under load, on a cluster the test owns.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;
use uuid::Uuid;

use common::broker::{spawn_broker_with_config, BrokerSpec, Client, TestBroker};
use common::db::TestDatabase;
use common::emulator::Emu;
use common::leases::eventually;
use common::pg_cluster::PgCluster;
use token_broker::config::Config;
use token_broker::proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A CreateLease for `vso.code` in `fabrikam`, ten minutes.
fn create_request(request_id: &str) -> pb::CreateLeaseRequest {
    pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code".into()],
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        request_id: request_id.into(),
    }
}

/// A fresh database, the emulator, and a broker on both whose
/// configuration `configure` adjusts.
struct Setup {
    emu: Emu,
    spec: BrokerSpec,
    broker: TestBroker,
    db: TestDatabase,
}

impl Setup {
    async fn start(configure: impl FnOnce(&mut Config)) -> Setup {
        let db = TestDatabase::create().await;
        let emu = Emu::start_default().await;
        let spec = BrokerSpec::new(db.url.clone(), emu.running.url());
        let mut config = spec.config();
        configure(&mut config);
        let broker = spawn_broker_with_config(&spec, config).await;
        Setup {
            emu,
            spec,
            broker,
            db,
        }
    }

    async fn client(&self) -> Client {
        self.broker.client(&self.spec.key("ci")).await
    }

    /// `(display_name, state)` of every lease row.
    async fn lease_states(&self) -> Vec<(String, String)> {
        let pool = sqlx::PgPool::connect(&self.db.url).await.unwrap();
        let rows = sqlx::query_as("SELECT display_name, state FROM leases ORDER BY create_time")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        rows
    }

    /// PATs upstream that are still active.
    async fn active_pats(&self) -> Vec<Value> {
        self.emu
            .pats()
            .await
            .into_iter()
            .filter(|p| p["state"] == "active")
            .collect()
    }

    /// The emulator's count of create requests.
    async fn creates(&self) -> u64 {
        self.emu.stats().await["calls"]["create"].as_u64().unwrap()
    }
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("ErrorInfo on {status:?}"))
        .reason
}

fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

fn micros(record: &Value, field: &str) -> u64 {
    record[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {record}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_429_with_retry_after_2_no_upstream_request_is_sent_before_the_window_passes() {
    // One request in flight at a time: every request then leaves the broker
    // after the answer before it was read, so a request that arrives inside
    // the window could only have been sent inside it (with more in flight,
    // one sent just before the 429 came back would arrive after it).
    let s = Setup::start(|c| c.upstream.azure_devops.max_concurrent_requests = 1).await;
    s.emu
        .set_faults(json!([{"operation": "create", "retryAfterSeconds": 2, "times": 1}]))
        .await;

    let client = s.client().await;
    let calls = (0..6).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .create_lease(create_request(&Uuid::new_v4().to_string()))
                .await
        }
    });
    let leases: Vec<pb::Lease> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| {
            r.expect("every call succeeds once the window passed")
                .into_inner()
        })
        .collect();

    let log = s.emu.requests().await;
    let throttled: Vec<&Value> = log.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(throttled.len(), 1, "{log:#?}");
    let answered_429 = micros(throttled[0], "answeredMicros");
    let window_end = answered_429 + 2_000_000;
    for r in &log {
        if r["seq"] == throttled[0]["seq"] {
            continue;
        }
        let before = r["seq"].as_u64() < throttled[0]["seq"].as_u64();
        if before {
            assert!(micros(r, "answeredMicros") <= micros(throttled[0], "arrivedMicros"));
        } else {
            assert!(
                micros(r, "arrivedMicros") >= window_end,
                "a request arrived {} µs after the 429 was answered: {r}",
                micros(r, "arrivedMicros") - answered_429
            );
        }
    }
    // Six leases, the throttled create sent again (a 429 means nothing was
    // made), and nothing else.
    assert_eq!(s.creates().await, 7);
    assert_eq!(s.active_pats().await.len(), 6);
    for lease in &leases {
        assert_eq!(lease.state(), pb::lease::State::Active);
        assert_eq!(
            s.emu
                .use_pat("fabrikam", "git/repositories", &lease.token)
                .await,
            200
        );
    }
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_broker_waits_is_unavailable_with_retry_info_and_a_later_retry_mints(
) {
    let s =
        Setup::start(|c| c.upstream.azure_devops.max_retry_after = Duration::from_secs(1)).await;
    s.emu
        .set_faults(json!([{"operation": "create", "retryAfterSeconds": 3, "times": 1}]))
        .await;
    let mut client = s.client().await;
    let request_id = Uuid::new_v4().to_string();

    let status = client
        .create_lease(create_request(&request_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(3)));
    assert!(s.emu.pats().await.is_empty(), "no PAT was minted");
    let states = s.lease_states().await;
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1, "FAILED");

    // Inside the window the retry is refused without reaching upstream,
    // told to wait what is left of it.
    let status = client
        .create_lease(create_request(&request_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    let left = retry_delay(&status).expect("RetryInfo");
    assert!(
        left > Duration::ZERO && left <= Duration::from_secs(3),
        "{left:?}"
    );
    assert_eq!(s.creates().await, 1);

    // Once it has passed, the same request_id mints afresh.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let lease = loop {
        match client.create_lease(create_request(&request_id)).await {
            Ok(ok) => break ok.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "gave up: {status:?}"
                );
                tokio::time::sleep(retry_delay(&status).unwrap_or(Duration::from_millis(100)))
                    .await;
            }
        }
    };
    assert_eq!(lease.state(), pb::lease::State::Active);
    assert_eq!(
        s.emu
            .use_pat("fabrikam", "git/repositories", &lease.token)
            .await,
        200
    );
    assert_eq!(s.creates().await, 2);
    assert_eq!(s.active_pats().await.len(), 1);
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_in_flight_never_exceed_max_concurrent_requests_over_creates_and_revokes()
{
    let s = Setup::start(|c| c.upstream.azure_devops.max_concurrent_requests = 3).await;
    let client = s.client().await;
    let mut to_revoke = Vec::new();
    for _ in 0..5 {
        let lease = client
            .clone()
            .create_lease(create_request(""))
            .await
            .unwrap()
            .into_inner();
        to_revoke.push(lease.name);
    }

    // Every create and revoke held 300 ms upstream; 20 creates and 5
    // revokes at once.
    s.emu
        .set_faults(json!([
            {"operation": "create", "latencyMs": 300},
            {"operation": "revoke", "latencyMs": 300}
        ]))
        .await;
    s.emu.reset_stats().await;
    let creates = (0..20).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .create_lease(create_request(&Uuid::new_v4().to_string()))
                .await
                .map(|r| r.into_inner().state())
        }
    });
    let revokes = to_revoke.iter().map(|name| {
        let mut client = client.clone();
        let name = name.clone();
        async move {
            client
                .revoke_lease(pb::RevokeLeaseRequest { name })
                .await
                .map(|r| r.into_inner().state())
        }
    });
    let (created, revoked) = futures::future::join(
        futures::future::join_all(creates),
        futures::future::join_all(revokes),
    )
    .await;
    for state in created {
        assert_eq!(state.expect("create succeeds"), pb::lease::State::Active);
    }
    for state in revoked {
        assert_eq!(state.expect("revoke succeeds"), pb::lease::State::Revoked);
    }

    let stats = s.emu.stats().await;
    let max = stats["maxInFlight"].as_u64().unwrap();
    assert!(
        max <= 3,
        "{max} PAT API requests in flight at once: {stats}"
    );
    // The bound, not a lack of callers, is what held them back.
    assert!(max >= 2, "{stats}");
    assert_eq!(stats["calls"]["create"], 20);
    assert_eq!(stats["calls"]["revoke"], 5);
    assert_eq!(s.active_pats().await.len(), 20);
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_upstream_cannot_answer_in_time_is_unavailable_sent_once_and_its_pat_revoked() {
    let s =
        Setup::start(|c| c.upstream.azure_devops.request_timeout = Duration::from_secs(1)).await;
    // Upstream makes the PAT, then answers after 4 s: past the broker's
    // 1 s request_timeout.
    s.emu
        .set_faults(json!([{"operation": "create", "latencyMs": 4000,
            "latencyWhen": "after", "times": 1}]))
        .await;
    let mut client = s.client().await;
    let request_id = Uuid::new_v4().to_string();
    let mut request = Request::new(create_request(&request_id));
    // The caller's own deadline is far away: the answer is the broker's.
    request.set_timeout(Duration::from_secs(60));
    let status = client.create_lease(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_UNAVAILABLE");
    assert!(retry_delay(&status).is_some(), "RetryInfo: {status:?}");

    // The PAT it made was found by its display name and revoked.
    let pats = s.emu.pats().await;
    assert_eq!(pats.len(), 1, "{pats:?}");
    assert_eq!(pats[0]["state"], "revoked", "{pats:?}");
    let states = s.lease_states().await;
    assert_eq!(states.len(), 1);
    assert_eq!(
        states[0],
        (
            pats[0]["displayName"].as_str().unwrap().to_owned(),
            "FAILED".to_owned()
        )
    );

    // Once upstream is done with the slow create, still only that one.
    eventually("the slow create is over upstream", || async {
        s.emu
            .requests()
            .await
            .iter()
            .filter(|r| r["operation"] == "create")
            .all(|r| !r["answeredMicros"].is_null())
    })
    .await;
    assert_eq!(s.creates().await, 1);

    // The same request_id mints afresh.
    let lease = client
        .create_lease(create_request(&request_id))
        .await
        .expect("the retry succeeds")
        .into_inner();
    assert_eq!(lease.state(), pb::lease::State::Active);
    assert_eq!(s.creates().await, 2);
    assert_eq!(s.active_pats().await.len(), 1);
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_or_dropped_creates_answer_clean_errors_and_are_never_sent_twice() {
    let s = Setup::start(|_| {}).await;
    let mut client = s.client().await;
    let cases = [
        (json!({"status": 500}), "UPSTREAM_UNAVAILABLE"),
        (
            json!({"status": 503, "latencyWhen": "after"}),
            "UPSTREAM_UNAVAILABLE",
        ),
        (json!({"dropConnection": true}), "UPSTREAM_UNAVAILABLE"),
        (
            json!({"dropConnection": true, "latencyWhen": "after"}),
            "UPSTREAM_UNAVAILABLE",
        ),
        (
            json!({"signInPage": true}),
            "UPSTREAM_AUTHENTICATION_FAILED",
        ),
    ];
    for (fault, want_reason) in cases {
        let mut rule = fault.clone();
        rule["operation"] = json!("create");
        rule["times"] = json!(1);
        s.emu.set_faults(json!([rule])).await;
        s.emu.reset_stats().await;

        let status = client
            .create_lease(create_request(&Uuid::new_v4().to_string()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{fault}: {status:?}");
        assert_eq!(reason(&status), want_reason, "{fault}");
        if want_reason == "UPSTREAM_UNAVAILABLE" {
            assert!(retry_delay(&status).is_some(), "{fault}: {status:?}");
        }
        assert_eq!(s.creates().await, 1, "{fault}: one create, never a second");
        assert!(
            s.active_pats().await.is_empty(),
            "{fault}: a PAT made upstream is revoked"
        );
    }
    let states = s.lease_states().await;
    assert_eq!(states.len(), 5);
    assert!(
        states.iter().all(|(_, state)| state == "FAILED"),
        "{states:?}"
    );

    // Upstream back to normal: a create works.
    let lease = client
        .create_lease(create_request(""))
        .await
        .expect("create succeeds")
        .into_inner();
    assert_eq!(lease.state(), pb::lease::State::Active);
    s.broker.stop().await;
}

// ------------------------------------------------- database restart

/// What one CreateLease of the load ended with.
enum Outcome {
    /// Acknowledged: the lease's name and token.
    Leased { name: String, token: String },
    /// Refused: code, ErrorInfo reason, how long the call took.
    Failed {
        code: Code,
        reason: String,
        took: Duration,
    },
}

/// Outcomes with the instant each call ended.
type LoadLog = Arc<Mutex<Vec<(tokio::time::Instant, Outcome)>>>;

/// The deadline every load call carries.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// CreateLease after CreateLease (fresh request_id each) until `stop`.
async fn load(mut client: Client, log: LoadLog, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut request = Request::new(create_request(&Uuid::new_v4().to_string()));
        request.set_timeout(CALL_DEADLINE);
        let started = tokio::time::Instant::now();
        let outcome = match client.create_lease(request).await {
            Ok(ok) => {
                let lease = ok.into_inner();
                Outcome::Leased {
                    name: lease.name,
                    token: lease.token,
                }
            }
            Err(status) => Outcome::Failed {
                code: status.code(),
                reason: status
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default(),
                took: started.elapsed(),
            },
        };
        let failed = matches!(outcome, Outcome::Failed { .. });
        log.lock()
            .unwrap()
            .push((tokio::time::Instant::now(), outcome));
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn leased_since(log: &LoadLog, since: tokio::time::Instant) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(at, o)| *at >= since && matches!(o, Outcome::Leased { .. }))
        .count()
}

fn failed_since(log: &LoadLog, since: tokio::time::Instant) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(at, o)| *at >= since && matches!(o, Outcome::Failed { .. }))
        .count()
}

async fn health(channel: tonic::transport::Channel) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers while the database is down too")
        .into_inner()
        .status()
}

/// `(id, display_name, state)` of every lease row.
async fn lease_rows(url: &str) -> Vec<(Uuid, String, String)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let rows = sqlx::query_as("SELECT id, display_name, state FROM leases")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_during_load_loses_no_acknowledged_lease_and_the_broker_serves_again()
{
    let cluster = PgCluster::start().await;
    let emu = Emu::start_default().await;
    let mut spec = BrokerSpec::new(cluster.url(), emu.running.url());
    spec.reaper_interval = Duration::from_millis(500);
    let mut config = spec.config();
    // Short enough that the reconciler resolves, within the test, what
    // the outage left PENDING.
    config.upstream.azure_devops.request_timeout = Duration::from_secs(5);
    config.leases.reconcile_after = Duration::from_secs(10);
    let broker = spawn_broker_with_config(&spec, config).await;
    let channel = broker.channel().await;
    assert_eq!(health(channel.clone()).await, ServingStatus::Serving);

    let log: LoadLog = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = broker.client(&spec.key("ci")).await;
    let workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load(client.clone(), log.clone(), stop.clone())))
        .collect();
    let began = tokio::time::Instant::now();
    eventually("leases are issued under load", || async {
        leased_since(&log, began) >= 10
    })
    .await;

    cluster.stop().await;
    let down = tokio::time::Instant::now();
    eventually(
        "health answers NOT_SERVING while the database is down",
        || {
            let channel = channel.clone();
            async move { health(channel).await == ServingStatus::NotServing }
        },
    )
    .await;
    eventually("calls fail while the database is down", || async {
        failed_since(&log, down) >= 4
    })
    .await;

    cluster.start_again().await;
    let up = tokio::time::Instant::now();
    eventually("health answers SERVING once the database is back", || {
        let channel = channel.clone();
        async move { health(channel).await == ServingStatus::Serving }
    })
    .await;
    eventually(
        "leases are issued again, without a broker restart",
        || async { leased_since(&log, up) >= 10 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let outcomes = std::mem::take(&mut *log.lock().unwrap());
    let rows = lease_rows(&cluster.url()).await;
    let state_of: HashMap<String, &str> = rows
        .iter()
        .map(|(id, _, state)| (format!("leases/{id}"), state.as_str()))
        .collect();
    let mut acknowledged = 0;
    let mut refusals: HashMap<(Code, String), usize> = HashMap::new();
    for (_, outcome) in &outcomes {
        match outcome {
            Outcome::Leased { name, token } => {
                acknowledged += 1;
                assert_eq!(
                    state_of.get(name).copied(),
                    Some("ACTIVE"),
                    "acknowledged lease {name} is ACTIVE after the restart"
                );
                assert_eq!(
                    emu.use_pat("fabrikam", "git/repositories", token).await,
                    200,
                    "the token of {name} works"
                );
            }
            Outcome::Failed { code, reason, took } => {
                assert!(
                    *took < CALL_DEADLINE,
                    "answered within the deadline: {took:?}"
                );
                *refusals.entry((*code, reason.clone())).or_default() += 1;
            }
        }
    }
    // Clean refusals only: the database (or the audit trail in it) is
    // unavailable, retry later.
    for (code, reason) in refusals.keys() {
        assert!(
            *code == Code::Unavailable
                && ["STORE_UNAVAILABLE", "AUDIT_UNAVAILABLE"].contains(&reason.as_str()),
            "{refusals:?}"
        );
    }
    assert!(acknowledged >= 20 && !refusals.is_empty(), "{refusals:?}");

    // No PAT stays live upstream without an ACTIVE lease: what the outage
    // left PENDING is reconciled.
    let url = cluster.url();
    eventually(
        "every live PAT has an ACTIVE lease, none PENDING",
        || async {
            let rows = lease_rows(&url).await;
            let active: HashSet<&str> = rows
                .iter()
                .filter(|(_, _, state)| state == "ACTIVE")
                .map(|(_, name, _)| name.as_str())
                .collect();
            let pending = rows.iter().any(|(_, _, state)| state == "PENDING");
            let orphans = emu
                .pats()
                .await
                .into_iter()
                .filter(|p| p["state"] == "active")
                .filter(|p| !active.contains(p["displayName"].as_str().unwrap()))
                .count();
            !pending && orphans == 0
        },
    )
    .await;
    broker.stop().await;
}

// ------------------------------------------------- honest codes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_400_on_create_is_failed_precondition_with_upstreams_message_sent_once() {
    let s = Setup::start(|_| {}).await;
    let mut client = s.client().await;
    s.emu
        .set_faults(json!([{"operation": "create", "status": 400, "times": 1}]))
        .await;

    let status = client
        .create_lease(create_request(&Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "UPSTREAM_BAD_REQUEST");
    assert_eq!(retry_delay(&status), None, "the same request fails again");
    // Upstream's own words (the service's 400 for a body it cannot read),
    // on one bounded line.
    let message = status.message();
    assert!(
        message.contains("JsonReaderException: TF400898: An Internal Error Occurred."),
        "{message}"
    );
    assert!(message.chars().count() <= 512, "{message}");
    assert!(!message.chars().any(char::is_control), "{message}");
    assert!(
        !message.contains(token_broker::emulator::DEFAULT_REFRESH_TOKEN),
        "{message}"
    );

    // A definite refusal: sent once, nothing minted, the lease FAILED.
    assert_eq!(s.creates().await, 1);
    assert!(s.active_pats().await.is_empty());
    let states = s.lease_states().await;
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1, "FAILED");
    s.broker.stop().await;
}

/// `name` of the database at `url` (its path).
fn database_name(url: &str) -> String {
    url.rsplit_once('/').unwrap().1.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_the_brokers_sessions_is_unavailable_store_unavailable_with_retry_info()
{
    let s = Setup::start(|c| c.database.acquire_timeout = Duration::from_secs(2)).await;
    let mut client = s.client().await;
    let lease = client
        .create_lease(create_request(""))
        .await
        .expect("create succeeds")
        .into_inner();
    let get = || pb::GetLeaseRequest {
        name: lease.name.clone(),
    };

    // The database stops accepting sessions (SQLSTATE 55000) and every
    // session the broker had is terminated (57P01).
    let name = database_name(&s.db.url);
    let admin = sqlx::PgPool::connect(&common::db::admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();

    for _ in 0..2 {
        let status = client.get_lease(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "STORE_UNAVAILABLE");
        assert_eq!(retry_delay(&status), Some(Duration::from_secs(1)));
        // Nothing of the database's own words reaches the caller.
        assert!(!status.message().contains("55000"), "{status:?}");
        assert!(!status.message().contains(&name), "{status:?}");
    }
    let status = client
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    assert!(retry_delay(&status).is_some(), "{status:?}");
    let status = client.create_lease(create_request("")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        ["STORE_UNAVAILABLE", "AUDIT_UNAVAILABLE"].contains(&reason(&status).as_str()),
        "{status:?}"
    );
    assert!(retry_delay(&status).is_some(), "{status:?}");

    // Sessions allowed again: the same broker serves, no restart.
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    eventually("the lease is read again", || {
        let mut client = client.clone();
        let request = get();
        async move { client.get_lease(request).await.is_ok() }
    })
    .await;
    s.broker.stop().await;
}

/// Sessions of database `name`, not counting `except` (the test's own),
/// by `application_name`.
async fn sessions_by_application(
    admin: &sqlx::PgPool,
    name: &str,
    except: i32,
) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT application_name, count(*) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> $2 GROUP BY application_name",
    )
    .bind(name)
    .bind(except)
    .fetch_all(admin)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_max_connections_bounds_the_brokers_sessions_and_stuck_background_work_leaves_callers_served(
) {
    let s = Setup::start(|c| {
        c.database.max_connections = 3;
        c.leases.reaper_interval = Duration::from_secs(1);
    })
    .await;
    let name = database_name(&s.db.url);
    let admin = sqlx::PgPool::connect(&common::db::admin_url())
        .await
        .unwrap();

    // Background work gets stuck holding its whole share (one connection):
    // the orphan sweep's claim waits for a lock the test holds.
    let mut locker = sqlx::PgPool::connect(&s.db.url)
        .await
        .unwrap()
        .begin()
        .await
        .unwrap();
    let locker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *locker)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE background_jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    eventually("the sweep waits for the lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'token-broker:background' AND wait_event_type = 'Lock'",
        )
        .bind(&name)
        .fetch_one(&admin)
        .await
        .unwrap()
            == 1
    })
    .await;

    // Callers under load meanwhile: every call is served, and the
    // broker never holds more than 3 sessions (1 per share).
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let (admin, name, stop) = (admin.clone(), name.clone(), stop.clone());
        tokio::spawn(async move {
            let mut most: HashMap<String, i64> = HashMap::new();
            let mut most_total = 0;
            while !stop.load(Ordering::Relaxed) {
                let now = sessions_by_application(&admin, &name, locker_pid).await;
                most_total = most_total.max(now.values().sum::<i64>());
                for (app, n) in now {
                    let m = most.entry(app).or_default();
                    *m = (*m).max(n);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (most_total, most)
        })
    };
    let mut callers = Vec::new();
    for _ in 0..6 {
        let mut client = s.client().await;
        callers.push(tokio::spawn(async move {
            let mut served = 0;
            for _ in 0..5 {
                let mut request = Request::new(create_request(""));
                request.set_timeout(CALL_DEADLINE);
                let lease = client.create_lease(request).await?.into_inner();
                let got = client
                    .get_lease(pb::GetLeaseRequest { name: lease.name })
                    .await?
                    .into_inner();
                assert_eq!(got.state(), pb::lease::State::Active);
                served += 1;
            }
            Ok::<_, Status>(served)
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap().expect("every call is served"), 5);
    }
    stop.store(true, Ordering::Relaxed);
    let (most_total, most) = seen.await.unwrap();
    assert!(most_total <= 3, "{most_total} sessions: {most:?}");
    for app in [
        "token-broker:requests",
        "token-broker:background",
        "token-broker:audit",
    ] {
        assert_eq!(most.get(app), Some(&1), "{app}: {most:?}");
    }
    assert_eq!(most.len(), 3, "no session outside the shares: {most:?}");

    locker.rollback().await.unwrap();
    admin.close().await;
    s.broker.stop().await;
}
