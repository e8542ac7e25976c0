//! Several `token-broker serve` processes (the real binary) on one
//! PostgreSQL database, and a broker killed at the worst moment: work is
//! shared without being done twice, migrations run once, and no upstream
//! PAT outlives a crash without a lease.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use common::broker::BrokerSpec;
use common::db::TestDatabase;
use common::emulator::Emu;
use common::leases::list_repositories;
use common::process::ServeProcess;
use common::wait::poll;
use token_broker::crypto::Keyring;
use token_broker::domain::{AuthorizationId, LeaseId, LeaseState, Organization, ScopeSet};
use token_broker::emulator::EmulatorConfig;
use token_broker::proto::v1 as pb;
use token_broker::server::DEPLOYMENT_ID_META;
use token_broker::store::{self, LeaseFilter, LeaseRecord, Store};

/// Leases that expire at once in the replicas test; `TB_MASS_EXPIRY`
/// overrides it (BENCHMARKS.md runs 10,000 in a release build).
fn mass_expiry() -> usize {
    std::env::var("TB_MASS_EXPIRY")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2400)
}

/// Every lease in the store in one of `states` (all of them when empty).
async fn all_leases(store: &Arc<dyn Store>, states: Vec<LeaseState>) -> Vec<LeaseRecord> {
    let filter = LeaseFilter {
        states,
        ..LeaseFilter::default()
    };
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_leases(&filter, after.as_ref(), 1000)
            .await
            .expect("list leases");
        let full = page.len() == 1000;
        if let Some(last) = page.last() {
            after = Some(store::PageCursor {
                create_time: last.create_time,
                id: last.id,
            });
        }
        out.extend(page);
        if !full {
            return out;
        }
    }
}

/// An ACTIVE lease of `apikey:ci` in `fabrikam`, expiring in an hour, as
/// CreateLease would have stored it, before its PAT is attached.
fn active_lease(deployment_id: &str) -> LeaseRecord {
    let id = LeaseId::new();
    let now = token_broker::domain::Timestamp::now();
    LeaseRecord {
        id,
        holder: "apikey:ci".parse().unwrap(),
        organization: Organization::parse("fabrikam").unwrap(),
        scopes: ScopeSet::parse(["vso.code_write"]).unwrap(),
        display_name: format!("token-broker:{deployment_id}:{id}"),
        authorization_id: None,
        sealed_token: None,
        state: LeaseState::Active,
        create_time: now,
        update_time: now,
        expire_time: now + chrono::Duration::hours(1),
        max_expire_time: now + chrono::Duration::hours(8),
        revoke_time: None,
        upstream_valid_to: Some(now + chrono::Duration::days(1)),
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: None,
        claimed_until: None,
    }
}

/// Makes the lease's PAT on the emulator (display name, scope and validTo
/// as the broker asks for them) and records it in the lease, the token
/// sealed as the broker seals it (lease id as associated data).
async fn mint_for(emu: &Emu, bearer: &str, keyring: &Keyring, lease: &mut LeaseRecord) {
    let body = emu
        .create(
            bearer,
            "fabrikam",
            json!({"displayName": lease.display_name, "scope": "vso.code_write",
                   "validTo": lease.upstream_valid_to.unwrap().to_rfc3339(), "allOrgs": false}),
        )
        .await;
    assert_eq!(body["patTokenError"], "none", "{body}");
    let pat = &body["patToken"];
    let id: Uuid = pat["authorizationId"].as_str().unwrap().parse().unwrap();
    lease.authorization_id = Some(AuthorizationId::from_uuid(id));
    let token = SecretString::from(pat["token"].as_str().unwrap());
    lease.sealed_token = Some(keyring.seal(&token, lease.id.to_string().as_bytes()));
}

/// Settings every process here runs with: a short reaper interval and an
/// orphan sweep that stays out of the way (these tests count DELETEs).
const REPLICA_SETTINGS: &[(&str, &str)] = &[
    ("leases.reaper_interval", "200ms"),
    ("leases.sweep_interval", "1h"),
];

/// Three brokers on one database, 2400 leases (or `TB_MASS_EXPIRY`) expiring at once: every PAT
/// is deleted upstream exactly once, every lease ends EXPIRED, and each
/// broker did part of the work.
///
/// The leases are written straight through the Store API over PATs made on
/// the emulator over HTTP: 2400 CreateLease calls would spend minutes on
/// sealing, audit-chain appends and upstream round trips that this test is
/// not about, and CreateLease cannot make a lease expire "a moment from
/// now" for all of them at once. They are stored expiring in an hour; once
/// the three brokers serve, one UPDATE moves every expire_time to now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_on_one_database_share_a_mass_expiry_and_delete_each_pat_exactly_once() {
    let expiring = mass_expiry();
    let emu = Emu::start(EmulatorConfig::default()).await;
    let db = TestDatabase::create().await;
    let spec = BrokerSpec::new(db.url.clone(), emu.running.url());
    let store = store::open(&db.url).await.expect("open the database");
    store.migrate().await.expect("migrate");
    let deployment_id = store
        .put_meta_if_absent(DEPLOYMENT_ID_META, "replicas-test")
        .await
        .unwrap();
    let keyring = Keyring::new(
        "test".to_owned(),
        [("test".to_owned(), spec.sealing_key.clone())],
    )
    .unwrap();

    // PATs upstream, each with its lease row.
    let bearer = emu.user_bearer().await;
    let leases: Vec<LeaseRecord> = futures::stream::iter(0..expiring)
        .map(|_| async {
            let mut lease = active_lease(&deployment_id);
            mint_for(&emu, &bearer, &keyring, &mut lease).await;
            store
                .create_lease(&lease, None, None)
                .await
                .expect("store the lease");
            lease
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let pat_ids: HashSet<String> = leases
        .iter()
        .map(|l| l.authorization_id.unwrap().to_string())
        .collect();
    assert_eq!(pat_ids.len(), expiring);

    let mut brokers: Vec<ServeProcess> = (0..3)
        .map(|_| ServeProcess::spawn(&spec, REPLICA_SETTINGS))
        .collect();
    futures::future::join_all(brokers.iter_mut().map(|b| b.wait_ready())).await;

    // Every lease expires at the same instant.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let expired_at = Utc::now();
    let moved = sqlx::query("UPDATE leases SET expire_time = $1 WHERE state = 'ACTIVE'")
        .bind(expired_at)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(moved as usize, expiring);

    poll(
        "every lease to be EXPIRED",
        Duration::from_secs(600),
        || async {
            let counts: Vec<(String, i64)> =
                sqlx::query_as("SELECT state, count(*) FROM leases GROUP BY state")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            match counts.iter().find(|(state, _)| state == "EXPIRED") {
                Some(&(_, n)) if n as usize == expiring => Ok(()),
                _ => Err(format!("{counts:?}")),
            }
        },
    )
    .await;
    // From the common expiry to the last lease written EXPIRED, as the
    // rows record it (not a timed assertion: BENCHMARKS.md reports it).
    let last: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT max(update_time) FROM leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    let took = (last - expired_at).to_std().unwrap_or_default();
    eprintln!(
        "mass expiry: {expiring} leases EXPIRED by 3 replicas in {:.2} s ({:.0} per second)",
        took.as_secs_f64(),
        expiring as f64 / took.as_secs_f64().max(1e-9)
    );

    let stats = emu.stats().await;
    let deletes = stats["deletes"].as_object().expect("deletes per PAT");
    for id in &pat_ids {
        assert_eq!(
            deletes.get(id).and_then(Value::as_u64),
            Some(1),
            "PAT {id} was not deleted exactly once"
        );
    }
    assert_eq!(
        deletes.len(),
        expiring,
        "DELETEs for PATs no lease holds: {:?}",
        deletes
            .keys()
            .filter(|k| !pat_ids.contains(*k))
            .collect::<Vec<_>>()
    );
    let live = emu
        .pats()
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .count();
    assert_eq!(live, 0, "PATs still live upstream");

    // Each process counts what it expired; the audit rows land before the
    // counters move, so the sum may trail the lease states for a moment.
    let shares = poll(
        "the expirations metrics to add up",
        Duration::from_secs(60),
        || async {
            let mut shares = Vec::new();
            for b in &brokers {
                shares.push(b.metric("token_broker_lease_expirations_total").await);
            }
            let sum: u64 = shares.iter().sum();
            if sum == expiring as u64 {
                Ok(shares)
            } else {
                Err(format!("shares {shares:?}, sum {sum}"))
            }
        },
    )
    .await;
    assert!(
        shares.iter().all(|&n| n > 0),
        "every broker expired some leases: {shares:?}"
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'lease.expire' AND outcome = 'allowed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited as usize, expiring, "one lease.expire row per lease");
    eprintln!("expirations per broker: {shares:?}");

    for b in &mut brokers {
        assert!(b.sigterm().await.success(), "{}", b.log_tail());
    }
}

/// Three brokers started at the same moment on a fresh database: all come
/// up serving, each migration is applied once, and they agree on one
/// deployment id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_starting_at_once_on_a_fresh_database_migrate_it_once() {
    let emu = Emu::start(EmulatorConfig::default()).await;
    let db = TestDatabase::create().await;
    let spec = BrokerSpec::new(db.url.clone(), emu.running.url());

    let mut brokers: Vec<ServeProcess> = (0..3)
        .map(|_| ServeProcess::spawn(&spec, REPLICA_SETTINGS))
        .collect();
    futures::future::join_all(brokers.iter_mut().map(|b| b.wait_ready())).await;

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let applied: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT version, count(*), bool_and(success) FROM _sqlx_migrations \
         GROUP BY version ORDER BY version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert_eq!(applied.len(), files, "every migration applied: {applied:?}");
    for (version, count, success) in &applied {
        assert_eq!(*count, 1, "migration {version} applied {count} times");
        assert!(success, "migration {version} failed");
    }
    let ids: HashSet<&str> = brokers.iter().map(|b| b.deployment_id()).collect();
    assert_eq!(ids.len(), 1, "one deployment id: {ids:?}");

    // And they serve: each answers a CreateLease.
    for b in &brokers {
        let mut client = b.client(&spec.key("ci")).await;
        let lease = client
            .create_lease(pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.code".into()],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", b.log_tail()))
            .into_inner();
        assert_eq!(lease.state(), pb::lease::State::Active);
    }
    for b in &mut brokers {
        assert!(b.sigterm().await.success(), "{}", b.log_tail());
    }
}

/// Every PAT the emulator holds as live whose authorizationId no ACTIVE
/// lease records.
async fn live_pats_without_an_active_lease(emu: &Emu, store: &Arc<dyn Store>) -> Vec<Value> {
    let active: HashSet<String> = all_leases(store, vec![LeaseState::Active])
        .await
        .iter()
        .filter_map(|l| l.authorization_id.map(|a| a.to_string()))
        .collect();
    emu.pats()
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .filter(|p| !active.contains(p["authorizationId"].as_str().unwrap_or_default()))
        .collect()
}

/// The broker is SIGKILLed after upstream minted the PAT but before it
/// stored the answer: the lease is left PENDING; after a restart one
/// reconcile pass revokes the PAT and fails the lease, so no live PAT lacks
/// an ACTIVE lease, and the client's retry with the same request_id gets a
/// fresh lease whose token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_between_the_upstream_create_and_the_commit_leaves_no_pat_without_a_lease()
{
    let emu = Emu::start(EmulatorConfig::default()).await;
    let db = TestDatabase::create().await;
    let spec = BrokerSpec::new(db.url.clone(), emu.running.url());
    // reconcile_after must exceed request_timeout (a create still in flight
    // is never reconciled); both short so the test does not wait minutes.
    let settings: &[(&str, &str)] = &[
        ("leases.reaper_interval", "200ms"),
        ("leases.sweep_interval", "1h"),
        ("upstream.azure_devops.request_timeout", "5s"),
        ("leases.reconcile_after", "6s"),
    ];
    let mut first = ServeProcess::start(&spec, settings).await;

    // The create takes effect upstream, then its answer is held back.
    emu.set_faults(json!([
        {"operation": "create", "latencyMs": 4000, "latencyWhen": "after", "times": 1}
    ]))
    .await;
    let request_id = Uuid::new_v4().to_string();
    let request = pb::CreateLeaseRequest {
        organization: "fabrikam".into(),
        scopes: vec!["vso.code".into()],
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        request_id: request_id.clone(),
    };
    let mut client = first.client(&spec.key("ci")).await;
    let in_flight = {
        let request = request.clone();
        tokio::spawn(async move { client.create_lease(request).await })
    };
    let minted = poll(
        "the PAT to exist upstream",
        Duration::from_secs(60),
        || async {
            let pats = emu.pats().await;
            if pats.is_empty() {
                Err("no PAT yet".to_owned())
            } else {
                Ok(pats)
            }
        },
    )
    .await;
    first.sigkill();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the killed broker cannot have answered"
    );
    assert_eq!(minted.len(), 1, "{minted:?}");
    let orphan = minted[0]["authorizationId"].as_str().unwrap().to_owned();

    let store = store::open(&db.url).await.unwrap();
    let leases = all_leases(&store, vec![]).await;
    assert_eq!(leases.len(), 1);
    let crashed = leases[0].clone();
    assert_eq!(
        crashed.state,
        LeaseState::Pending,
        "the kill must land between the upstream create and the commit"
    );
    assert_eq!(crashed.authorization_id, None);
    assert_eq!(minted[0]["displayName"], crashed.display_name.as_str());
    assert_eq!(
        live_pats_without_an_active_lease(&emu, &store).await.len(),
        1,
        "the crash left one PAT without a lease"
    );

    let second = ServeProcess::start(&spec, settings).await;
    // The reconciler marks the lease FAILED first (so a create still in
    // flight can no longer activate it), then revokes its PAT.
    poll(
        "the reconciler to fail the lease and revoke its PAT",
        Duration::from_secs(120),
        || async {
            let lease = store.get_lease(crashed.id).await.unwrap().unwrap();
            let orphans = live_pats_without_an_active_lease(&emu, &store).await;
            match lease.state {
                LeaseState::Failed if orphans.is_empty() => Ok(()),
                other => Err(format!(
                    "state {other}, live PATs without a lease: {orphans:?}"
                )),
            }
        },
    )
    .await;
    assert_eq!(emu.stats().await["deletes"][&orphan], 1);

    // The client retries with its request_id: a fresh lease and PAT.
    let mut client = second.client(&spec.key("ci")).await;
    let lease = client
        .create_lease(request)
        .await
        .unwrap_or_else(|e| panic!("the retry failed: {e:?}\n{}", second.log_tail()))
        .into_inner();
    assert_eq!(lease.state(), pb::lease::State::Active);
    assert_ne!(lease.name, crashed.id.name(), "a fresh lease");
    assert_ne!(lease.authorization_id, orphan, "a fresh PAT");
    assert_eq!(
        list_repositories(
            &emu.running.url(),
            "fabrikam",
            &SecretString::from(lease.token.clone())
        )
        .await,
        200,
        "the fresh lease's token works"
    );
    let orphans = live_pats_without_an_active_lease(&emu, &store).await;
    assert!(orphans.is_empty(), "live PATs without a lease: {orphans:?}");
}

/// SIGTERM while background work waits on an upstream revoke that takes
/// minutes: the broker still exits within its shutdown grace (the
/// in-flight revoke is cut off, its claim lapses), and the lease is kept
/// REVOKING for whoever runs next, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_background_revoke_exits_within_the_grace_and_keeps_the_lease() {
    let emu = Emu::start(EmulatorConfig::default()).await;
    let db = TestDatabase::create().await;
    let spec = BrokerSpec::new(db.url.clone(), emu.running.url());
    let settings: &[(&str, &str)] = &[
        ("leases.reaper_interval", "200ms"),
        ("leases.sweep_interval", "1h"),
        ("upstream.azure_devops.request_timeout", "5m"),
        ("upstream.azure_devops.max_retries", "0"),
        ("leases.reconcile_after", "6m"),
    ];
    let mut broker = ServeProcess::start(&spec, settings).await;
    let mut client = broker.client(&spec.key("ci")).await;
    let lease = client
        .create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.code".into()],
            ttl: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            request_id: String::new(),
        })
        .await
        .expect("a lease")
        .into_inner();
    // Every revoke now hangs for two minutes before upstream acts.
    emu.set_faults(json!([{"operation": "revoke", "latencyMs": 120000}]))
        .await;
    poll(
        "the reaper's revoke to be in flight upstream",
        Duration::from_secs(60),
        || async {
            let stats = emu.stats().await;
            if stats["inFlight"].as_u64().unwrap_or(0) >= 1 {
                Ok(())
            } else {
                Err(format!("stats: {stats}"))
            }
        },
    )
    .await;

    // `sigterm` fails the test if the process has not exited in 60 s; the
    // grace is 20 s, the hung revoke two minutes.
    let status = broker.sigterm().await;
    assert!(status.success(), "{status}:\n{}", broker.log_tail());
    assert!(
        broker
            .log_tail()
            .contains("background work did not finish within the grace period"),
        "{}",
        broker.log_tail()
    );
    let store = store::open(&db.url).await.unwrap();
    let id = LeaseId::from_name(&lease.name).expect("a lease name");
    let kept = store.get_lease(id).await.unwrap().expect("the lease row");
    assert_eq!(kept.state, LeaseState::Revoking, "{kept:?}");
}
