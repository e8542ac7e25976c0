//! Never lose a PAT (docs/durability.md): the orphan sweep, durable revocation retries
//! and the reconciler under an incomplete upstream listing. The lease
//! service runs in-process on a real store (PostgreSQL and SQLite) against
//! the emulator over a real socket; what is checked is what upstream holds
//! (`/_emulator/pats`, `/_emulator/stats`, the data plane) and the rows.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use common::leases::*;
use secrecy::SecretString;
use token_broker::audit::{Outcome, PAT_REVOKE_ORPHAN};
use token_broker::domain::Timestamp;
use token_broker::domain::{LeaseId, LeaseState, Organization};
use token_broker::leases::RetrySchedule;
use token_broker::store::LeaseRecord;
use token_broker::upstream::{CreatePat, PatToken};
use uuid::Uuid;

on_both_stores!(
    postgres = super::Backend::Postgres,
    sqlite = super::Backend::Sqlite;
    orphan_pats_of_this_deployment_are_swept_in_every_organization_and_nothing_else,
    one_organization_failing_does_not_stop_the_sweep_of_the_others,
    a_revoke_that_failed_five_times_is_finished_once_upstream_recovers,
    a_revoke_past_its_budget_is_revoke_failed_then_finished_once_upstream_recovers,
    a_stale_pending_lease_under_an_incomplete_listing_is_failed_and_its_unseen_pat_swept,
    a_revoke_failed_lease_met_by_the_sweep_is_finished_the_normal_way,
    a_create_that_outlives_the_reconcile_bound_is_abandoned_cleanly_and_its_retry_mints,
    a_sweep_over_several_pages_revokes_exactly_the_orphans_and_keeps_live_leases_pats,
    one_reconcile_pass_lists_each_organization_once_and_revokes_every_stale_pending_leases_pat,
);

/// The display name the test broker (deployment `test-deployment`) gives
/// lease `id`.
fn broker_name(id: impl std::fmt::Display) -> String {
    format!("token-broker:test-deployment:{id}")
}

fn org(name: &str) -> Organization {
    Organization::parse(name).unwrap()
}

/// Makes a PAT named `name` in `organization` directly upstream, as a
/// crashed broker (or a human) would have; returns it with its token.
async fn mint(broker: &Broker, organization: &str, name: &str) -> (PatToken, SecretString) {
    let pat = broker
        .upstream
        .create(
            &org(organization),
            &CreatePat {
                display_name: name.to_owned(),
                scope: "vso.code".into(),
                valid_to: Utc::now() + chrono::Duration::hours(1),
            },
        )
        .await
        .expect("the emulator mints");
    let token = pat.token.clone().expect("create answers the token");
    (pat, token)
}

/// A lease row of `state` in `organization`, written `age` ago, as the
/// broker would have left it (no token kept).
fn lease_row(state: LeaseState, organization: &str, age: chrono::Duration) -> LeaseRecord {
    let then = Timestamp::now() - age;
    let id = LeaseId::new();
    LeaseRecord {
        id,
        holder: caller("ci").identity,
        organization: org(organization),
        scopes: token_broker::domain::ScopeSet::parse(["vso.code"]).unwrap(),
        display_name: broker_name(id),
        authorization_id: None,
        sealed_token: None,
        state,
        create_time: then,
        update_time: then,
        expire_time: then + chrono::Duration::hours(1),
        max_expire_time: then + chrono::Duration::hours(8),
        revoke_time: None,
        upstream_valid_to: None,
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: None,
        claimed_until: None,
    }
}

fn id_text(pat: &PatToken) -> String {
    pat.authorization_id.to_string()
}

async fn orphan_pats_of_this_deployment_are_swept_in_every_organization_and_nothing_else(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;

    // Owned by live leases: an ACTIVE one, and a PENDING one whose create
    // is in flight (young).
    let active = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    let young = lease_row(
        LeaseState::Pending,
        "fabrikam",
        chrono::Duration::seconds(5),
    );
    broker.store.create_lease(&young, None, None).await.unwrap();
    let (young_pat, _) = mint(&broker, "fabrikam", &young.display_name).await;

    // Orphans: no lease row at all, in each organization leased in, and
    // the PAT of a FAILED lease (the second organization's only lease).
    let failed = lease_row(LeaseState::Failed, "contoso", chrono::Duration::minutes(1));
    broker
        .store
        .create_lease(&failed, None, None)
        .await
        .unwrap();
    let (failed_pat, failed_token) = mint(&broker, "contoso", &failed.display_name).await;
    let lost_fabrikam = Uuid::new_v4();
    let (orphan_fabrikam, orphan_token) =
        mint(&broker, "fabrikam", &broker_name(lost_fabrikam)).await;
    let lost_contoso = Uuid::new_v4();
    let (orphan_contoso, _) = mint(&broker, "contoso", &broker_name(lost_contoso)).await;

    // Not this deployment's: never touched.
    let mut foreign = Vec::new();
    for name in [
        format!("token-broker:another-deployment:{}", Uuid::new_v4()),
        format!("token-broker-staging:test-deployment:{}", Uuid::new_v4()),
        "alice's laptop".to_owned(),
        "token-broker:test-deployment:not-a-lease".to_owned(),
    ] {
        foreign.push(mint(&broker, "fabrikam", &name).await.0);
    }
    foreign.push(
        mint(
            &broker,
            "contoso",
            &format!("token-broker:another-deployment:{}", Uuid::new_v4()),
        )
        .await
        .0,
    );

    let report = broker.leases.run_sweep_once().await.unwrap();
    assert!(report.ran, "{report:?}");
    assert_eq!(report.organizations, 2, "{report:?}");
    assert_eq!(report.failed_organizations, 0, "{report:?}");
    assert_eq!(report.incomplete_organizations, 0, "{report:?}");
    assert_eq!(report.revoked, 3, "{report:?}");
    assert_eq!(report.live, 2, "{report:?}");

    for orphan in [&failed_pat, &orphan_fabrikam, &orphan_contoso] {
        assert_eq!(
            emulator_pat_state(&url, &id_text(orphan)).await,
            "revoked",
            "{}",
            orphan.display_name
        );
        assert_eq!(deletes_of(&url, &id_text(orphan)).await, 1);
    }
    assert_eq!(
        list_repositories(&url, "fabrikam", &orphan_token).await,
        401
    );
    assert_eq!(list_repositories(&url, "contoso", &failed_token).await, 401);

    let active_pat = active.lease.authorization_id.unwrap().to_string();
    for kept in foreign
        .iter()
        .map(id_text)
        .chain([active_pat, id_text(&young_pat)])
    {
        assert_eq!(emulator_pat_state(&url, &kept).await, "active", "{kept}");
        assert_eq!(deletes_of(&url, &kept).await, 0, "{kept}");
    }
    assert_eq!(
        list_repositories(&url, "fabrikam", active.token.as_ref().unwrap()).await,
        200
    );
    // The rows the sweep read are as they were.
    assert_eq!(
        stored(&broker.store, young.id).await.state,
        LeaseState::Pending
    );
    assert_eq!(
        stored(&broker.store, failed.id).await.claimed_by,
        None,
        "the sweep's claim on the row is released"
    );

    // Each revocation is audited, by the background actor, with the
    // organization and the lease id the name carried.
    let audit = broker.store.list_audit(0, 1000).await.unwrap();
    let swept: Vec<_> = audit
        .iter()
        .filter(|e| e.action == PAT_REVOKE_ORPHAN)
        .collect();
    assert_eq!(swept.len(), 3);
    assert!(swept.iter().all(|e| e.outcome == Outcome::Allowed
        && e.identity == "system:token-broker"
        && e.token_fingerprint.is_none()));
    let seen: HashSet<(String, String, String)> = swept
        .iter()
        .map(|e| {
            (
                e.organization.clone().unwrap(),
                e.lease_id.unwrap().to_string(),
                e.reason.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        HashSet::from([
            (
                "contoso".to_owned(),
                failed.id.to_string(),
                "ORPHAN_LEASE_FAILED".to_owned()
            ),
            (
                "contoso".to_owned(),
                lost_contoso.to_string(),
                "ORPHAN_NO_LEASE".to_owned()
            ),
            (
                "fabrikam".to_owned(),
                lost_fabrikam.to_string(),
                "ORPHAN_NO_LEASE".to_owned()
            ),
        ])
    );

    // Within the sweep interval, no replica sweeps again.
    assert!(!broker.leases.run_sweep_once().await.unwrap().ran);
}

async fn one_organization_failing_does_not_stop_the_sweep_of_the_others(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        sweep_interval: Duration::from_secs(1),
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    for organization in ["contoso", "fabrikam"] {
        let row = lease_row(
            LeaseState::Failed,
            organization,
            chrono::Duration::minutes(1),
        );
        broker.store.create_lease(&row, None, None).await.unwrap();
    }
    let (in_contoso, _) = mint(&broker, "contoso", &broker_name(Uuid::new_v4())).await;
    let (in_fabrikam, _) = mint(&broker, "fabrikam", &broker_name(Uuid::new_v4())).await;

    // The first organization listed (the order is random) fails.
    set_faults(
        &url,
        serde_json::json!([{ "operation": "list", "status": 503, "times": 1 }]),
    )
    .await;
    let report = broker.leases.run_sweep_once().await.unwrap();
    assert!(report.ran);
    assert_eq!(
        (
            report.failed_organizations,
            report.organizations,
            report.revoked
        ),
        (1, 1, 1),
        "{report:?}"
    );
    let states = (
        emulator_pat_state(&url, &id_text(&in_contoso)).await,
        emulator_pat_state(&url, &id_text(&in_fabrikam)).await,
    );
    let (left, _) = match (states.0.as_str(), states.1.as_str()) {
        ("active", "revoked") => (&in_contoso, &in_fabrikam),
        ("revoked", "active") => (&in_fabrikam, &in_contoso),
        other => panic!("one organization swept, the other left: {other:?}"),
    };
    let left = left.clone();

    // A later sweep (one interval on) finishes the job.
    let leases = broker.leases.clone();
    eventually("a later sweep revokes the orphan left", || {
        let leases = leases.clone();
        let url = url.clone();
        let id = id_text(&left);
        async move {
            let report = leases.run_sweep_once().await.unwrap();
            report.ran && emulator_pat_state(&url, &id).await == "revoked"
        }
    })
    .await;
    assert_eq!(deletes_of(&url, &id_text(&in_fabrikam)).await, 1);
    assert_eq!(deletes_of(&url, &id_text(&in_contoso)).await, 1);
}

/// Runs background passes until the lease reaches `state` (at most 60 s).
async fn pass_until(broker: &Broker, id: LeaseId, state: LeaseState) -> LeaseRecord {
    let leases = broker.leases.clone();
    let store = broker.store.clone();
    eventually(&format!("the lease reaches {state}"), || {
        let leases = leases.clone();
        let store = store.clone();
        async move {
            leases.run_background_once().await.unwrap();
            stored(&store, id).await.state == state
        }
    })
    .await;
    stored(&broker.store, id).await
}

async fn a_revoke_that_failed_five_times_is_finished_once_upstream_recovers(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        upstream_max_retries: 0,
        revocation_retry: RetrySchedule {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_attempts: 10,
            failed_interval: Duration::from_secs(3600),
        },
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    let pat = issued.lease.authorization_id.unwrap().to_string();
    set_faults(
        &url,
        serde_json::json!([{ "operation": "revoke", "status": 503, "times": 5 }]),
    )
    .await;

    let answer = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .expect("answered, not an error");
    assert_eq!(answer.state, LeaseState::Revoking);
    assert_eq!(answer.attempts, 1);
    assert!(answer.last_error.is_some());

    let revoked = pass_until(&broker, issued.lease.id, LeaseState::Revoked).await;
    assert_eq!(revoked.attempts, 5, "five failures recorded before success");
    assert_eq!(revoked.last_error, None);
    assert_eq!(revoked.next_attempt_time, None);
    assert_eq!(
        deletes_of(&url, &pat).await,
        6,
        "five failed DELETEs, one good"
    );
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        401
    );
    let audit = broker.store.list_audit(0, 1000).await.unwrap();
    let revokes: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "lease.revoke" && e.lease_id == Some(issued.lease.id))
        .collect();
    assert_eq!(
        revokes
            .iter()
            .filter(|e| e.outcome == Outcome::Error)
            .count(),
        5
    );
    assert_eq!(
        revokes
            .iter()
            .filter(|e| e.outcome == Outcome::Allowed)
            .count(),
        1
    );
}

async fn a_revoke_past_its_budget_is_revoke_failed_then_finished_once_upstream_recovers(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let failed_interval = Duration::from_secs(2);
    let options = BrokerOptions {
        upstream_max_retries: 0,
        revocation_retry: RetrySchedule {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_attempts: 3,
            failed_interval,
        },
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    set_faults(
        &url,
        serde_json::json!([{ "operation": "revoke", "status": 503 }]),
    )
    .await;
    let answer = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .unwrap();
    assert_eq!(answer.state, LeaseState::Revoking);

    let failed = pass_until(&broker, issued.lease.id, LeaseState::RevokeFailed).await;
    assert_eq!(failed.attempts, 3);
    assert!(failed
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("upstream revoke failed")));
    assert_eq!(
        failed.next_attempt_time,
        Some(failed.update_time + chrono::Duration::from_std(failed_interval).unwrap()),
        "past the budget, retries come every failed_interval"
    );
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );

    clear_faults(&url).await;
    let revoked = pass_until(&broker, issued.lease.id, LeaseState::Revoked).await;
    assert_eq!(revoked.last_error, None);
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        401
    );
}

async fn a_stale_pending_lease_under_an_incomplete_listing_is_failed_and_its_unseen_pat_swept(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        upstream_page_size: 2,
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;

    // Upstream lists in creation order, two a page: the lease's PAT is on
    // the second page, behind two a human made.
    for name in ["alice's laptop", "bob's build"] {
        mint(&broker, "fabrikam", name).await;
    }
    let pending = lease_row(
        LeaseState::Pending,
        "fabrikam",
        chrono::Duration::minutes(3),
    );
    broker
        .store
        .create_lease(&pending, None, None)
        .await
        .unwrap();
    let (pat, token) = mint(&broker, "fabrikam", &pending.display_name).await;

    // The list keeps answering its first page: the PAT cannot be seen. The
    // reconciler settles the lease first (FAILED, so a create still in
    // flight can never make it ACTIVE) and revokes what it finds; the PAT
    // it could not see is left under the FAILED lease for the sweep.
    set_faults(
        &url,
        serde_json::json!([{ "operation": "list", "repeatPage": true }]),
    )
    .await;
    broker.leases.run_background_once().await.unwrap();
    let reconciled = stored(&broker.store, pending.id).await;
    assert_eq!(reconciled.state, LeaseState::Failed);
    assert_eq!(reconciled.claimed_by, None);
    assert_eq!(emulator_pat_state(&url, &id_text(&pat)).await, "active");

    // With the listing whole again, the sweep finds it: an orphan of a
    // FAILED lease.
    clear_faults(&url).await;
    let report = broker.leases.run_sweep_once().await.unwrap();
    assert!(report.ran);
    assert_eq!(report.revoked, 1, "{report:?}");
    assert_eq!(emulator_pat_state(&url, &id_text(&pat)).await, "revoked");
    assert_eq!(list_repositories(&url, "fabrikam", &token).await, 401);
    let live: Vec<_> = emulator_pats(&url)
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .map(|p| p["displayName"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(live.len(), 2, "the humans' PATs are untouched: {live:?}");
}

/// Two replicas on one PostgreSQL, each running its sweep and its reaper
/// at the same moment: exactly one sweeps (the claim), and every PAT, an
/// orphan's or an expiring lease's, gets exactly one DELETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sweeping_and_reaping_at_once_revoke_each_pat_exactly_once() {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(Backend::Postgres).await;
    let keys = TestKeys::new();
    let a = start_broker(&db, &url, &keys, BrokerOptions::default()).await;
    let b = start_broker(&db, &url, &keys, BrokerOptions::default()).await;

    // Five leases past their expiry: the reapers' work.
    let mut expiring = Vec::new();
    for _ in 0..5 {
        let issued = a
            .leases
            .create(&caller("ci"), request(&["vso.code"], None, None))
            .await
            .unwrap();
        let mut due = stored(&a.store, issued.lease.id).await;
        due.expire_time = Timestamp::now() - chrono::Duration::seconds(1);
        assert!(a
            .store
            .update_lease(&due, LeaseState::Active)
            .await
            .unwrap());
        expiring.push(due);
    }
    // Twelve orphans: ten without a row, two under FAILED leases.
    let mut orphans = Vec::new();
    for _ in 0..10 {
        orphans.push(mint(&a, "fabrikam", &broker_name(Uuid::new_v4())).await.0);
    }
    for _ in 0..2 {
        let row = lease_row(LeaseState::Failed, "fabrikam", chrono::Duration::minutes(1));
        a.store.create_lease(&row, None, None).await.unwrap();
        orphans.push(mint(&a, "fabrikam", &row.display_name).await.0);
    }

    let (swept_a, swept_b, reaped_a, reaped_b) = tokio::join!(
        a.leases.run_sweep_once(),
        b.leases.run_sweep_once(),
        a.leases.run_background_once(),
        b.leases.run_background_once(),
    );
    let (swept_a, swept_b) = (swept_a.unwrap(), swept_b.unwrap());
    reaped_a.unwrap();
    reaped_b.unwrap();
    assert!(
        swept_a.ran != swept_b.ran,
        "exactly one replica sweeps: {swept_a:?} {swept_b:?}"
    );
    let sweep = if swept_a.ran { &swept_a } else { &swept_b };
    assert_eq!(sweep.revoked, 12, "{sweep:?}");

    for lease in &expiring {
        let store = a.store.clone();
        let id = lease.id;
        let (la, lb) = (a.leases.clone(), b.leases.clone());
        eventually("the reapers expire every lease", || {
            let store = store.clone();
            let (la, lb) = (la.clone(), lb.clone());
            async move {
                let _ = tokio::join!(la.run_background_once(), lb.run_background_once());
                stored(&store, id).await.state == LeaseState::Expired
            }
        })
        .await;
    }
    for pat in orphans.iter().map(id_text).chain(
        expiring
            .iter()
            .map(|l| l.authorization_id.unwrap().to_string()),
    ) {
        assert_eq!(deletes_of(&url, &pat).await, 1, "one DELETE for {pat}");
        assert_eq!(emulator_pat_state(&url, &pat).await, "revoked");
    }

    // Within the interval, neither replica sweeps again.
    let (again_a, again_b) = tokio::join!(a.leases.run_sweep_once(), b.leases.run_sweep_once());
    assert!(!again_a.unwrap().ran);
    assert!(!again_b.unwrap().ran);
}

/// A create still in flight when the reconciler settles its lease (a
/// reconcile bound set shorter than a slow upstream create really takes):
/// the PAT is revoked, the caller gets UNAVAILABLE `CREATE_ABANDONED` with
/// a retry delay (not INTERNAL), and its retry mints a working lease.
async fn a_create_that_outlives_the_reconcile_bound_is_abandoned_cleanly_and_its_retry_mints(
    backend: Backend,
) {
    use token_broker::error::ServiceError as _;
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(
        &db,
        &url,
        &TestKeys::new(),
        BrokerOptions {
            reconcile_after: Duration::from_millis(300),
            ..BrokerOptions::default()
        },
    )
    .await;
    // The PAT is made at once; its answer comes 3 s later.
    set_faults(
        &url,
        serde_json::json!([{"operation":"create","latencyMs":3000,"latencyWhen":"after","times":1}]),
    )
    .await;
    let request_id = Uuid::new_v4();
    let req = request(&["vso.code"], None, Some(request_id));
    let create = {
        let leases = broker.leases.clone();
        let req = req.clone();
        tokio::spawn(async move { leases.create(&caller("ci"), req).await })
    };
    eventually("the PAT exists upstream", || async {
        !emulator_pats(&url).await.is_empty()
    })
    .await;
    let minted = emulator_pats(&url).await[0]["authorizationId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The reconciler takes the (now stale) PENDING lease while the create
    // still waits for its answer.
    eventually("the reconciler settles the lease", || async {
        broker.leases.run_background_once().await.unwrap();
        emulator_pat_state(&url, &minted).await == "revoked"
    })
    .await;
    let err = create
        .await
        .unwrap()
        .expect_err("the abandoned create fails");
    assert_eq!(err.reason(), "CREATE_ABANDONED", "{err}");
    assert_eq!(err.code(), token_broker::error::ErrorCode::Unavailable);
    assert!(err.retry_after().is_some());

    let retried = broker
        .leases
        .create(&caller("ci"), req)
        .await
        .expect("the retry mints afresh");
    assert_eq!(retried.lease.state, LeaseState::Active);
    assert_eq!(
        list_repositories(&url, "fabrikam", retried.token.as_ref().unwrap()).await,
        200
    );
    let live: Vec<_> = emulator_pats(&url)
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .collect();
    assert_eq!(live.len(), 1, "only the retry's PAT is live: {live:?}");
}

/// The sweep meets the live PAT of a REVOKE_FAILED lease long before its
/// next slow retry: it finishes the revocation the normal way, so the
/// lease leaves REVOKE_FAILED (and `admin list-failed`) as REVOKED.
async fn a_revoke_failed_lease_met_by_the_sweep_is_finished_the_normal_way(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        upstream_max_retries: 0,
        revocation_retry: RetrySchedule {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            max_attempts: 1,
            failed_interval: Duration::from_secs(3600),
        },
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    set_faults(
        &url,
        serde_json::json!([{ "operation": "revoke", "status": 503, "times": 1 }]),
    )
    .await;
    let answer = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .unwrap();
    assert_eq!(answer.state, LeaseState::RevokeFailed);

    let report = broker.leases.run_sweep_once().await.unwrap();
    assert_eq!(report.revoked, 1, "{report:?}");
    let done = stored(&broker.store, issued.lease.id).await;
    assert_eq!(done.state, LeaseState::Revoked);
    assert_eq!(done.last_error, None);
    assert_eq!(done.claimed_by, None);
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        401
    );
    let pat = done.authorization_id.unwrap().to_string();
    assert_eq!(
        deletes_of(&url, &pat).await,
        2,
        "the failed one and the sweep's"
    );
}

/// How many list requests (pages) the emulator has answered.
async fn list_calls(url: &str) -> u64 {
    emulator_stats(url).await["calls"]["list"]
        .as_u64()
        .expect("a list counter")
}

/// An organization with more PATs than one upstream page (three a page
/// here): the sweep reads it page by page and revokes exactly the orphans,
/// among them the last PAT of a page (the one upstream's continuation
/// token points after), and leaves live leases' PATs and others' alone.
async fn a_sweep_over_several_pages_revokes_exactly_the_orphans_and_keeps_live_leases_pats(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        upstream_page_size: 3,
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    let (mut orphans, mut kept) = (Vec::new(), Vec::new());
    let active = || async {
        broker
            .leases
            .create(&caller("ci"), request(&["vso.code"], None, None))
            .await
            .unwrap()
            .lease
            .authorization_id
            .unwrap()
            .to_string()
    };
    let under = |state: LeaseState, age: chrono::Duration| {
        let broker = &broker;
        async move {
            let row = lease_row(state, "fabrikam", age);
            broker.store.create_lease(&row, None, None).await.unwrap();
            id_text(&mint(broker, "fabrikam", &row.display_name).await.0)
        }
    };
    let lost = || async {
        id_text(
            &mint(&broker, "fabrikam", &broker_name(Uuid::new_v4()))
                .await
                .0,
        )
    };
    // Upstream lists in creation order. Page 1: an orphan without a row, a
    // live lease's PAT, a FAILED lease's PAT (last on the page).
    orphans.push(lost().await);
    kept.push(active().await);
    orphans.push(under(LeaseState::Failed, chrono::Duration::minutes(1)).await);
    // Page 2: a human's PAT, a REVOKED lease's PAT, a young PENDING
    // lease's PAT (its create is in flight: live).
    kept.push(id_text(
        &mint(&broker, "fabrikam", "alice's laptop").await.0,
    ));
    orphans.push(under(LeaseState::Revoked, chrono::Duration::minutes(1)).await);
    kept.push(under(LeaseState::Pending, chrono::Duration::seconds(5)).await);
    // Page 3: an orphan, a live lease's PAT, an orphan (last on the page).
    orphans.push(lost().await);
    kept.push(active().await);
    orphans.push(lost().await);
    // Page 4: an orphan alone.
    orphans.push(lost().await);

    let lists_before = list_calls(&url).await;
    let report = broker.leases.run_sweep_once().await.unwrap();
    assert_eq!(
        list_calls(&url).await - lists_before,
        4,
        "ten PATs three a page, each page read once"
    );
    assert!(report.ran && !report.cut_short, "{report:?}");
    assert_eq!(
        (
            report.organizations,
            report.incomplete_organizations,
            report.failed_organizations
        ),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        report.candidates, 9,
        "every name but the human's: {report:?}"
    );
    assert_eq!(report.live, 3, "{report:?}");
    assert_eq!(report.busy, 0, "{report:?}");
    assert_eq!(report.revoked, orphans.len(), "{report:?}");
    assert_eq!(report.revoke_failures, 0, "{report:?}");
    for orphan in &orphans {
        assert_eq!(
            emulator_pat_state(&url, orphan).await,
            "revoked",
            "{orphan}"
        );
        assert_eq!(deletes_of(&url, orphan).await, 1, "{orphan}");
    }
    for pat in &kept {
        assert_eq!(emulator_pat_state(&url, pat).await, "active", "{pat}");
        assert_eq!(deletes_of(&url, pat).await, 0, "{pat}");
    }
    let audit = broker.store.list_audit(0, 1000).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.action == PAT_REVOKE_ORPHAN && e.outcome == Outcome::Allowed)
            .count(),
        orphans.len()
    );
}

/// Several stale PENDING leases in one organization (and one in another):
/// one background pass settles each FAILED, lists each organization's PATs
/// once (page by page, two a page here) for all of its leases, and revokes
/// every PAT carrying one of their names, and nothing else.
async fn one_reconcile_pass_lists_each_organization_once_and_revokes_every_stale_pending_leases_pat(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let options = BrokerOptions {
        upstream_page_size: 2,
        ..BrokerOptions::default()
    };
    let broker = start_broker(&db, &url, &TestKeys::new(), options).await;
    let stale = |organization: &'static str| {
        let broker = &broker;
        async move {
            let row = lease_row(
                LeaseState::Pending,
                organization,
                chrono::Duration::minutes(3),
            );
            broker.store.create_lease(&row, None, None).await.unwrap();
            let (pat, token) = mint(broker, organization, &row.display_name).await;
            (row, id_text(&pat), token)
        }
    };
    // fabrikam in creation order, two a page: [alice, lease 1] [lease 2,
    // bob] [lease 3]; lease 1's PAT is the last on its page.
    let mut humans = vec![id_text(
        &mint(&broker, "fabrikam", "alice's laptop").await.0,
    )];
    let mut pending = vec![stale("fabrikam").await, stale("fabrikam").await];
    humans.push(id_text(&mint(&broker, "fabrikam", "bob's build").await.0));
    pending.push(stale("fabrikam").await);
    // contoso: one page.
    pending.push(stale("contoso").await);

    let lists_before = list_calls(&url).await;
    broker.leases.run_background_once().await.unwrap();
    assert_eq!(
        list_calls(&url).await - lists_before,
        3 + 1,
        "one listing of fabrikam (three pages) and one of contoso"
    );
    for (row, pat, token) in &pending {
        let settled = stored(&broker.store, row.id).await;
        assert_eq!(settled.state, LeaseState::Failed, "{}", row.id);
        assert_eq!(settled.claimed_by, None, "claim released");
        assert_eq!(emulator_pat_state(&url, pat).await, "revoked", "{}", row.id);
        assert_eq!(deletes_of(&url, pat).await, 1, "{}", row.id);
        assert_eq!(
            list_repositories(&url, row.organization.as_str(), token).await,
            401
        );
    }
    for pat in &humans {
        assert_eq!(emulator_pat_state(&url, pat).await, "active");
        assert_eq!(deletes_of(&url, pat).await, 0);
    }
    let audit = broker.store.list_audit(0, 1000).await.unwrap();
    let reconciled: HashSet<LeaseId> = audit
        .iter()
        .filter(|e| e.action == token_broker::audit::LEASE_RECONCILE)
        .filter_map(|e| e.lease_id)
        .collect();
    assert_eq!(
        reconciled,
        pending.iter().map(|(row, _, _)| row.id).collect(),
        "each settled lease audited"
    );
}
