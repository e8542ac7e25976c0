//! The lease rules end to end, on PostgreSQL and on SQLite: the lease
//! service on the real store and the real upstream client, the emulator
//! over a real socket, the PAT used on the emulator's data plane.

#[macro_use]
mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::leases::*;
use token_broker::audit::Outcome;
use token_broker::domain::LeaseState;
use token_broker::leases::{LeaseError, ListQuery};
use token_broker::policy::Denial;
use token_broker::store::LeaseFilter;
use uuid::Uuid;

on_both_stores!(
    postgres = super::Backend::Postgres,
    sqlite = super::Backend::Sqlite;
    leased_token_works_on_azure_devops_only_within_its_scope_and_organization,
    renewing_a_lease_moves_the_pat_valid_to_upstream,
    of_two_concurrent_renewals_the_first_to_commit_wins_and_the_pat_follows_it,
    revoked_lease_token_is_refused_by_azure_devops,
    lease_past_its_expiry_is_revoked_by_the_reaper,
    repeated_request_id_returns_the_same_lease_and_one_pat,
    repeated_request_id_returns_the_same_lease_after_a_broker_restart,
    twenty_concurrent_retries_share_one_lease_and_one_pat,
    request_id_reused_with_other_parameters_is_refused,
    request_outside_policy_is_refused_without_a_lease_row_or_upstream_call,
    another_holders_lease_is_not_found,
    leases_are_listed_newest_first_in_pages_and_tampered_page_tokens_are_refused,
    upstream_outage_on_create_fails_the_lease_and_a_retry_mints_afresh,
    create_whose_answer_is_lost_leaves_no_live_pat_and_a_retry_mints_afresh,
    revoke_during_an_upstream_outage_answers_revoking_and_is_finished_later,
    lease_never_outlives_a_pat_whose_valid_to_upstream_clamped,
    upstream_policy_refusal_fails_the_lease_and_says_why,
    pending_lease_left_by_a_crash_is_reconciled_and_a_retry_mints_afresh,
    revocation_that_keeps_failing_becomes_revoke_failed_and_still_finishes_later,
    closed_leases_keep_no_token_and_are_deleted_after_retention,
);

fn parse_time(v: &serde_json::Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a time string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

fn within_a_second(a: impl Into<DateTime<Utc>>, b: impl Into<DateTime<Utc>>) -> bool {
    (a.into() - b.into()).num_milliseconds().abs() <= 1000
}

async fn leased_token_works_on_azure_devops_only_within_its_scope_and_organization(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;

    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .expect("lease created");

    let lease = &issued.lease;
    assert_eq!(lease.state, LeaseState::Active);
    assert_eq!(
        lease.display_name,
        format!("token-broker:test-deployment:{}", lease.id)
    );
    // The policy default TTL (1 h) applies; the PAT outlives it by the skew.
    assert_eq!(
        lease.expire_time - lease.create_time,
        chrono::Duration::hours(1)
    );
    assert_eq!(
        lease.max_expire_time - lease.create_time,
        chrono::Duration::hours(8)
    );
    let pat = emulator_pat_of(&url, lease).await;
    assert_eq!(pat["scope"], "vso.code");
    assert!(within_a_second(
        parse_time(&pat["validTo"]),
        lease.expire_time + chrono::Duration::from_std(SKEW).unwrap()
    ));

    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
    // vso.code does not cover packaging, and the PAT is bound to fabrikam.
    assert_ne!(
        list_feeds(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
    assert_ne!(
        list_repositories(&url, "contoso", issued.token.as_ref().unwrap()).await,
        200
    );

    // Get and list never carry the token; the stored copy is sealed.
    let got = broker.leases.get(&caller("ci"), lease.id).await.unwrap();
    assert_eq!(got.id, lease.id);
    assert!(got.sealed_token.is_some());
}

async fn renewing_a_lease_moves_the_pat_valid_to_upstream(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let issued = broker
        .leases
        .create(
            &caller("ci"),
            request(&["vso.code_write"], Some(Duration::from_secs(600)), None),
        )
        .await
        .unwrap();
    let before = parse_time(&emulator_pat_of(&url, &issued.lease).await["validTo"]);

    let renewed = broker
        .leases
        .renew(
            &caller("ci"),
            issued.lease.id,
            Some(Duration::from_secs(7200)),
        )
        .await
        .expect("renewed");

    assert_eq!(renewed.state, LeaseState::Active);
    assert!(renewed.expire_time > issued.lease.expire_time);
    let after = parse_time(&emulator_pat_of(&url, &renewed).await["validTo"]);
    assert!(after > before, "validTo moved upstream");
    assert!(within_a_second(
        after,
        renewed.expire_time + chrono::Duration::from_std(SKEW).unwrap()
    ));
    assert_eq!(
        stored(&broker.store, renewed.id).await.expire_time,
        renewed.expire_time
    );

    // Renewal is capped at max_expire_time (create + 8 h), even when asked for more.
    let capped = broker
        .leases
        .renew(
            &caller("ci"),
            issued.lease.id,
            Some(Duration::from_secs(24 * 3600)),
        )
        .await
        .unwrap();
    assert_eq!(capped.expire_time, capped.max_expire_time);
    // And then it cannot go further.
    assert!(matches!(
        broker
            .leases
            .renew(&caller("ci"), issued.lease.id, None)
            .await,
        Err(LeaseError::AtMaxExpireTime(_))
    ));
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
}

async fn revoked_lease_token_is_refused_by_azure_devops(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );

    let revoked = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .expect("revoked");

    assert_eq!(revoked.state, LeaseState::Revoked);
    assert!(revoked.revoke_time.is_some());
    assert_ne!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
    assert_eq!(emulator_pat_of(&url, &revoked).await["state"], "revoked");
    // Idempotent: revoking again answers the same lease.
    let again = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .unwrap();
    assert_eq!(again, revoked);
    // A revoked lease cannot be renewed.
    assert!(matches!(
        broker
            .leases
            .renew(&caller("ci"), issued.lease.id, None)
            .await,
        Err(LeaseError::NotRenewable(LeaseState::Revoked))
    ));
}

async fn lease_past_its_expiry_is_revoked_by_the_reaper(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let issued = broker
        .leases
        .create(
            &caller("ci"),
            request(&["vso.code"], Some(Duration::from_secs(1)), None),
        )
        .await
        .unwrap();
    // The skew keeps the PAT itself alive past the lease: only the reaper ends it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let leases = broker.leases.clone();
    let reaper = tokio::spawn(async move {
        leases
            .run_background(async {
                let _ = stopped.await;
            })
            .await
    });

    let store = broker.store.clone();
    let id = issued.lease.id;
    eventually("the reaper expires the lease", || {
        let store = store.clone();
        async move { stored(&store, id).await.state == LeaseState::Expired }
    })
    .await;
    stop.send(()).unwrap();
    reaper.await.unwrap();

    let expired = stored(&broker.store, id).await;
    assert!(expired.revoke_time.unwrap() >= expired.expire_time);
    assert_ne!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
    assert_eq!(emulator_pat_of(&url, &expired).await["state"], "revoked");
    let audit = broker.store.list_audit(0, 100).await.unwrap();
    assert!(audit.iter().any(|e| e.action == "lease.expire"
        && e.lease_id == Some(id)
        && e.outcome == Outcome::Allowed));
}

async fn repeated_request_id_returns_the_same_lease_and_one_pat(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());

    let first = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await
        .unwrap();
    let second = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await
        .unwrap();

    assert_eq!(second.lease.id, first.lease.id);
    use secrecy::ExposeSecret;
    assert_eq!(
        second.token.as_ref().unwrap().expose_secret(),
        first.token.as_ref().unwrap().expose_secret()
    );
    assert_eq!(emulator_pats(&url).await.len(), 1);
    // The key is the caller's own: another caller's same key is a new lease.
    let other = broker
        .leases
        .create(&caller("other"), request(&["vso.code"], None, request_id))
        .await
        .unwrap();
    assert_ne!(other.lease.id, first.lease.id);
}

async fn repeated_request_id_returns_the_same_lease_after_a_broker_restart(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let keys = TestKeys::new();
    let request_id = Some(Uuid::new_v4());
    let first = {
        let broker = start_broker(&db, &url, &keys, BrokerOptions::default()).await;
        broker
            .leases
            .create(&caller("ci"), request(&["vso.packaging"], None, request_id))
            .await
            .unwrap()
    };

    let restarted = start_broker(&db, &url, &keys, BrokerOptions::default()).await;
    let again = restarted
        .leases
        .create(&caller("ci"), request(&["vso.packaging"], None, request_id))
        .await
        .unwrap();

    assert_eq!(again.lease.id, first.lease.id);
    use secrecy::ExposeSecret;
    assert_eq!(
        again.token.as_ref().unwrap().expose_secret(),
        first.token.as_ref().unwrap().expose_secret()
    );
    assert_eq!(emulator_pats(&url).await.len(), 1);
    assert_eq!(
        list_feeds(&url, "fabrikam", again.token.as_ref().unwrap()).await,
        200
    );
}

async fn twenty_concurrent_retries_share_one_lease_and_one_pat(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());
    // A slow upstream create, so the retries arrive while the first attempt
    // is in flight (PENDING) and must wait for it.
    set_faults(
        &url,
        serde_json::json!([{ "operation": "create", "latencyMs": 500 }]),
    )
    .await;

    let attempts = (0..20).map(|_| {
        let leases = broker.leases.clone();
        tokio::spawn(async move {
            leases
                .create(&caller("ci"), request(&["vso.code"], None, request_id))
                .await
        })
    });
    let answers = futures::future::join_all(attempts).await;

    let mut ids = std::collections::BTreeSet::new();
    let mut tokens = std::collections::BTreeSet::new();
    for answer in answers {
        let issued = answer.unwrap().expect("every retry gets the lease");
        ids.insert(issued.lease.id);
        use secrecy::ExposeSecret;
        tokens.insert(issued.token.as_ref().unwrap().expose_secret().to_owned());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(tokens.len(), 1);
    assert_eq!(emulator_pats(&url).await.len(), 1);
    assert_eq!(
        emulator_stats(&url).await["calls"]["create"],
        1,
        "one upstream create"
    );
    let rows = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
}

async fn request_id_reused_with_other_parameters_is_refused(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());
    broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await
        .unwrap();

    for other in [
        request(&["vso.code_write"], None, request_id),
        request(&["vso.code"], Some(Duration::from_secs(600)), request_id),
    ] {
        let refused = broker.leases.create(&caller("ci"), other).await;
        assert!(matches!(refused, Err(LeaseError::RequestIdReused)));
    }
    assert_eq!(emulator_pats(&url).await.len(), 1);
}

async fn request_outside_policy_is_refused_without_a_lease_row_or_upstream_call(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;

    let cases = [
        (
            caller("ci"),
            request_in("contoso", &["vso.code"], None, None),
            Denial::OrganizationNotAllowed,
        ),
        (
            caller("ci"),
            request(&["vso.code_manage"], None, None),
            Denial::ScopeNotAllowed,
        ),
        (
            caller("ci"),
            request(&["vso.code"], Some(Duration::from_secs(9 * 3600)), None),
            Denial::TtlExceedsMax,
        ),
        (
            caller("stranger"),
            request(&["vso.code"], None, None),
            Denial::NoMatchingRule,
        ),
    ];
    for (who, req, expected) in cases {
        match broker.leases.create(&who, req).await {
            Err(LeaseError::Denied { denial, .. }) => assert_eq!(denial, expected),
            other => panic!("expected {expected:?}, got {:?}", other.map(|i| i.lease)),
        }
    }

    let rows = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert!(rows.is_empty(), "no lease row for a refused request");
    assert!(emulator_pats(&url).await.is_empty());
    let stats = emulator_stats(&url).await;
    for operation in ["create", "get", "list", "update", "revoke", "token"] {
        assert!(
            stats["calls"][operation].as_u64().unwrap_or(0) == 0,
            "no upstream call ({operation}): {stats}"
        );
    }
    let audit = broker.store.list_audit(0, 100).await.unwrap();
    let denied: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "lease.create" && e.outcome == Outcome::Denied)
        .collect();
    assert_eq!(denied.len(), 4, "every refusal is audited");
    assert!(denied
        .iter()
        .any(|e| e.reason.as_deref() == Some("SCOPE_NOT_ALLOWED")));
}

async fn another_holders_lease_is_not_found(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let issued = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, None))
        .await
        .unwrap();
    let id = issued.lease.id;
    let intruder = caller("other");

    assert!(matches!(
        broker.leases.get(&intruder, id).await,
        Err(LeaseError::NotFound)
    ));
    assert!(matches!(
        broker.leases.renew(&intruder, id, None).await,
        Err(LeaseError::NotFound)
    ));
    assert!(matches!(
        broker.leases.revoke(&intruder, id).await,
        Err(LeaseError::NotFound)
    ));
    let page = broker
        .leases
        .list(
            &intruder,
            ListQuery {
                page_size: 50,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page.leases.is_empty());
    // The holder's lease is untouched and still works.
    assert_eq!(stored(&broker.store, id).await.state, LeaseState::Active);
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
}

async fn leases_are_listed_newest_first_in_pages_and_tampered_page_tokens_are_refused(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        let issued = broker
            .leases
            .create(&caller("ci"), request(&["vso.code"], None, None))
            .await
            .unwrap();
        created.push(issued.lease.id);
    }
    broker
        .leases
        .revoke(&caller("ci"), created[0])
        .await
        .unwrap();
    broker
        .leases
        .create(&caller("other"), request(&["vso.code"], None, None))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut query = ListQuery {
        page_size: 2,
        ..ListQuery::default()
    };
    loop {
        let page = broker
            .leases
            .list(&caller("ci"), query.clone())
            .await
            .unwrap();
        assert!(page.leases.len() <= 2);
        seen.extend(page.leases.iter().map(|l| l.id));
        if page.next_page_token.is_empty() {
            break;
        }
        query.page_token = page.next_page_token;
    }
    created.reverse();
    assert_eq!(seen, created, "all of the caller's leases, newest first");

    let active_only = ListQuery {
        page_size: 50,
        states: vec![LeaseState::Active],
        ..ListQuery::default()
    };
    let page = broker
        .leases
        .list(&caller("ci"), active_only.clone())
        .await
        .unwrap();
    assert_eq!(page.leases.len(), 4);

    // A token is bound to its query and cannot be altered.
    let first = broker
        .leases
        .list(
            &caller("ci"),
            ListQuery {
                page_size: 2,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    let token = first.next_page_token;
    let mut tampered = token.clone();
    tampered.replace_range(2..3, if &token[2..3] == "A" { "B" } else { "A" });
    for (query, who) in [
        (
            ListQuery {
                page_size: 2,
                page_token: tampered,
                ..ListQuery::default()
            },
            "ci",
        ),
        (
            ListQuery {
                page_token: token.clone(),
                ..active_only
            },
            "ci",
        ),
        (
            ListQuery {
                page_size: 2,
                page_token: token.clone(),
                ..ListQuery::default()
            },
            "other",
        ),
    ] {
        assert!(matches!(
            broker.leases.list(&caller(who), query).await,
            Err(LeaseError::InvalidPageToken)
        ));
    }
}

async fn upstream_outage_on_create_fails_the_lease_and_a_retry_mints_afresh(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());
    set_faults(
        &url,
        serde_json::json!([{ "operation": "create", "status": 503, "times": 1 }]),
    )
    .await;

    let refused = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await;
    let Err(LeaseError::Upstream(e)) = refused else {
        panic!("expected an upstream error");
    };
    use token_broker::error::{ErrorCode, ServiceError};
    assert_eq!(e.code(), ErrorCode::Unavailable);
    assert!(e.retry_after().is_some());
    let rows = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, LeaseState::Failed);
    assert!(rows[0].last_error.is_some());

    let retried = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await
        .expect("a retry mints afresh");
    assert_ne!(retried.lease.id, rows[0].id);
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
    assert_eq!(live.len(), 1, "one live PAT");
    let stats = emulator_stats(&url).await;
    assert_eq!(
        stats["calls"]["create"], 2,
        "create is never retried blindly"
    );
    assert!(
        stats["calls"]["list"].as_u64().unwrap_or(0) >= 1,
        "the broker looked for the display name after the 503"
    );
}

async fn create_whose_answer_is_lost_leaves_no_live_pat_and_a_retry_mints_afresh(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());
    // Upstream makes the PAT, then the answer is lost in a 500.
    set_faults(
        &url,
        serde_json::json!([{
            "operation": "create", "status": 500, "latencyWhen": "after", "times": 1
        }]),
    )
    .await;

    let refused = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await;

    assert!(matches!(refused, Err(LeaseError::Upstream(_))));
    let pats = emulator_pats(&url).await;
    assert_eq!(pats.len(), 1, "upstream made one PAT");
    assert_eq!(
        pats[0]["state"], "revoked",
        "the broker found and revoked it"
    );
    let rows = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(rows[0].state, LeaseState::Failed);

    let retried = broker
        .leases
        .create(&caller("ci"), request(&["vso.code"], None, request_id))
        .await
        .expect("a retry mints afresh");
    assert_eq!(
        list_repositories(&url, "fabrikam", retried.token.as_ref().unwrap()).await,
        200
    );
    let live: Vec<_> = emulator_pats(&url)
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .collect();
    assert_eq!(live.len(), 1, "one live PAT, the retry's");
    assert_eq!(live[0]["displayName"], retried.lease.display_name.as_str());
}

async fn revoke_during_an_upstream_outage_answers_revoking_and_is_finished_later(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
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
        .expect("answered, not an error");
    assert_eq!(answer.state, LeaseState::Revoking);
    assert!(answer.next_attempt_time.is_some());
    assert!(answer.last_error.is_some());

    clear_faults(&url).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let leases = broker.leases.clone();
    let background = tokio::spawn(async move {
        leases
            .run_background(async {
                let _ = stopped.await;
            })
            .await
    });
    let store = broker.store.clone();
    let id = issued.lease.id;
    eventually("the background loop finishes the revocation", || {
        let store = store.clone();
        async move { stored(&store, id).await.state == LeaseState::Revoked }
    })
    .await;
    stop.send(()).unwrap();
    background.await.unwrap();
    assert_ne!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
}

async fn lease_never_outlives_a_pat_whose_valid_to_upstream_clamped(backend: Backend) {
    let emulator = start_emulator_with(token_broker::emulator::EmulatorConfig {
        max_lifespan_days: Some(1),
        ..Default::default()
    })
    .await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;

    let issued = broker
        .leases
        .create(
            &caller("long"),
            request(
                &["vso.code"],
                Some(Duration::from_secs(7 * 24 * 3600)),
                None,
            ),
        )
        .await
        .unwrap();

    let valid_to = parse_time(&emulator_pat_of(&url, &issued.lease).await["validTo"]);
    assert!(valid_to < issued.lease.create_time + chrono::Duration::days(2));
    assert!(issued.lease.expire_time <= valid_to);
    assert!(issued.lease.max_expire_time <= valid_to);
    assert_eq!(stored(&broker.store, issued.lease.id).await, issued.lease);
}

async fn upstream_policy_refusal_fails_the_lease_and_says_why(backend: Backend) {
    let emulator = start_emulator_with(token_broker::emulator::EmulatorConfig {
        restrict_full_scope: true,
        ..Default::default()
    })
    .await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Some(Uuid::new_v4());

    for _attempt in 0..2 {
        // The key may be retried after a refusal; upstream refuses again.
        let refused = broker
            .leases
            .create(&caller("long"), request(&["app_token"], None, request_id))
            .await;
        let Err(LeaseError::Upstream(e)) = refused else {
            panic!("expected an upstream refusal");
        };
        use token_broker::error::{ErrorCode, ServiceError};
        assert_eq!(e.code(), ErrorCode::FailedPrecondition);
        assert_eq!(e.reason(), "UPSTREAM_POLICY_VIOLATION");
    }

    let rows = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "one FAILED lease per attempt");
    for row in &rows {
        assert_eq!(row.state, LeaseState::Failed);
        assert!(row.sealed_token.is_none());
        assert!(row
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("fullScopePatPolicyViolation")));
    }
    assert!(emulator_pats(&url).await.is_empty());
    let audit = broker.store.list_audit(0, 100).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.action == "lease.create" && e.outcome == Outcome::Error)
            .count(),
        2
    );
}

async fn pending_lease_left_by_a_crash_is_reconciled_and_a_retry_mints_afresh(backend: Backend) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let request_id = Uuid::new_v4();
    let req = request(&["vso.code"], None, Some(request_id));

    // A broker that crashed between the upstream create and its commit
    // left, three minutes ago, a PENDING row (with its key) and a live PAT.
    let then = token_broker::domain::Timestamp::now() - chrono::Duration::minutes(3);
    let id = token_broker::domain::LeaseId::new();
    let pending = token_broker::store::LeaseRecord {
        id,
        holder: caller("ci").identity,
        organization: req.organization.clone(),
        scopes: req.scopes.clone(),
        display_name: format!("token-broker:test-deployment:{id}"),
        authorization_id: None,
        sealed_token: None,
        state: LeaseState::Pending,
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
    };
    let key = token_broker::store::IdempotencyRecord {
        holder: pending.holder.clone(),
        request_id,
        fingerprint: req.fingerprint(),
        lease_id: id,
        create_time: then,
    };
    broker
        .store
        .create_lease(&pending, Some(&key), None)
        .await
        .unwrap();
    let orphan = broker
        .upstream
        .create(
            &pending.organization,
            &token_broker::upstream::CreatePat {
                display_name: pending.display_name.clone(),
                scope: "vso.code".into(),
                valid_to: Utc::now() + chrono::Duration::hours(1),
            },
        )
        .await
        .unwrap();
    let orphan_token = orphan.token.expect("create answers the token");
    assert_eq!(
        list_repositories(&url, "fabrikam", &orphan_token).await,
        200
    );

    broker.leases.run_background_once().await.unwrap();

    let reconciled = stored(&broker.store, id).await;
    assert_eq!(reconciled.state, LeaseState::Failed);
    assert!(reconciled.last_error.is_some());
    assert_ne!(
        list_repositories(&url, "fabrikam", &orphan_token).await,
        200
    );

    let retried = broker
        .leases
        .create(&caller("ci"), req)
        .await
        .expect("a retry of the crashed request mints afresh");
    assert_ne!(retried.lease.id, id);
    assert_eq!(
        list_repositories(&url, "fabrikam", retried.token.as_ref().unwrap()).await,
        200
    );
    let live: Vec<_> = emulator_pats(&url)
        .await
        .into_iter()
        .filter(|p| p["state"] == "active")
        .collect();
    assert_eq!(live.len(), 1, "no PAT left live without a lease");
}

/// States of the leases whose row still holds a sealed token, read with
/// SQL of its own (not through the store).
async fn states_holding_a_sealed_token(backend: Backend, db: &TestDb) -> Vec<String> {
    use sqlx::Connection;
    let sql = "SELECT state FROM leases WHERE sealed_token IS NOT NULL ORDER BY state";
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
        }
    }
}

/// Issue 15: a revoked, an expired and a failed lease keep no sealed
/// token (only the ACTIVE one does); a replay of the revoked one answers
/// it without a token; once retention and its PAT's validTo have passed it
/// is deleted with its key, and a late retry of its request_id is a new
/// request.
async fn closed_leases_keep_no_token_and_are_deleted_after_retention(backend: Backend) {
    use secrecy::ExposeSecret;
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let ci = caller("ci");
    let request_id = Some(Uuid::new_v4());

    let revoked = broker
        .leases
        .create(&ci, request(&["vso.code"], None, request_id))
        .await
        .unwrap();
    broker.leases.revoke(&ci, revoked.lease.id).await.unwrap();
    let expiring = broker
        .leases
        .create(
            &ci,
            request(&["vso.code"], Some(Duration::from_secs(1)), None),
        )
        .await
        .unwrap();
    set_faults(
        &url,
        serde_json::json!([{ "operation": "create", "status": 503, "times": 1 }]),
    )
    .await;
    assert!(broker
        .leases
        .create(&ci, request(&["vso.code"], None, None))
        .await
        .is_err());
    let active = broker
        .leases
        .create(&ci, request(&["vso.code"], None, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    broker.leases.run_background_once().await.unwrap();
    assert_eq!(
        stored(&broker.store, expiring.lease.id).await.state,
        LeaseState::Expired
    );
    let mut states: Vec<LeaseState> = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap()
        .iter()
        .map(|l| l.state)
        .collect();
    states.sort_by_key(|s| s.to_string());
    assert_eq!(
        states,
        [
            LeaseState::Active,
            LeaseState::Expired,
            LeaseState::Failed,
            LeaseState::Revoked
        ]
    );
    assert_eq!(
        states_holding_a_sealed_token(backend, &db).await,
        ["ACTIVE"]
    );

    // The replay answers the revoked lease, without a token.
    let replayed = broker
        .leases
        .create(&ci, request(&["vso.code"], None, request_id))
        .await
        .unwrap();
    assert_eq!(replayed.lease.id, revoked.lease.id);
    assert_eq!(replayed.lease.state, LeaseState::Revoked);
    assert!(replayed.token.is_none());

    // As if 91 days had passed since it closed, and its PAT's validTo too;
    // the other leases closed (or were made) just now.
    let long_ago: token_broker::domain::Timestamp =
        (Utc::now() - chrono::Duration::days(91)).into();
    let row = stored(&broker.store, revoked.lease.id).await;
    let aged = token_broker::store::LeaseRecord {
        update_time: long_ago,
        upstream_valid_to: Some(long_ago),
        ..row
    };
    assert!(broker
        .store
        .update_lease(&aged, LeaseState::Revoked)
        .await
        .unwrap());
    let report = broker.leases.run_retention_once().await.unwrap();
    assert!(report.ran);
    assert_eq!(report.deleted, 1);
    assert!(broker
        .store
        .get_lease(revoked.lease.id)
        .await
        .unwrap()
        .is_none());
    let left = broker
        .store
        .list_leases(&LeaseFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(left.len(), 3, "the expired, failed and active leases stay");
    // One run per interval for the deployment.
    assert!(!broker.leases.run_retention_once().await.unwrap().ran);

    // A late retry of the deleted lease's request_id is a new request.
    let late = broker
        .leases
        .create(&ci, request(&["vso.code"], None, request_id))
        .await
        .unwrap();
    assert_ne!(late.lease.id, revoked.lease.id);
    assert_eq!(late.lease.state, LeaseState::Active);
    assert_ne!(
        late.token.as_ref().unwrap().expose_secret(),
        revoked.token.as_ref().unwrap().expose_secret()
    );
    assert_eq!(active.lease.state, LeaseState::Active);
}

async fn revocation_that_keeps_failing_becomes_revoke_failed_and_still_finishes_later(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
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
    let revoking = broker
        .leases
        .revoke(&caller("ci"), issued.lease.id)
        .await
        .unwrap();
    assert_eq!(revoking.state, LeaseState::Revoking);

    // Nine more failures have happened; the next due retry is the last of
    // the budget (rather than waiting out the real backoff here).
    let mut due = stored(&broker.store, revoking.id).await;
    due.attempts = 9;
    due.next_attempt_time = Some((Utc::now() - chrono::Duration::seconds(1)).into());
    assert!(broker
        .store
        .update_lease(&due, LeaseState::Revoking)
        .await
        .unwrap());
    broker.leases.run_background_once().await.unwrap();

    let failed = stored(&broker.store, revoking.id).await;
    assert_eq!(failed.state, LeaseState::RevokeFailed);
    assert_eq!(failed.attempts, 10);
    assert!(failed.last_error.is_some());
    assert!(failed.next_attempt_time.unwrap() > Utc::now() + chrono::Duration::minutes(30));
    assert_eq!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );

    // Upstream recovers; the slow retry finishes it (made due here).
    clear_faults(&url).await;
    let mut due = failed.clone();
    due.next_attempt_time = Some((Utc::now() - chrono::Duration::seconds(1)).into());
    assert!(broker
        .store
        .update_lease(&due, LeaseState::RevokeFailed)
        .await
        .unwrap());
    broker.leases.run_background_once().await.unwrap();

    let revoked = stored(&broker.store, revoking.id).await;
    assert_eq!(revoked.state, LeaseState::Revoked);
    assert_ne!(
        list_repositories(&url, "fabrikam", issued.token.as_ref().unwrap()).await,
        200
    );
    // Asking again answers the finished lease.
    let answer = broker
        .leases
        .revoke(&caller("ci"), revoked.id)
        .await
        .unwrap();
    assert_eq!(answer.state, LeaseState::Revoked);
}

// ---------------------------------------------------------------------------
// Over gRPC: the real server (tests/common/broker.rs), a client with an API
// key, the emulator and the database, all over real sockets.
// ---------------------------------------------------------------------------

mod grpc {
    use super::*;
    use common::broker::{spawn_broker, BrokerSpec, Client, TestBroker};
    use prost_types::Duration as ProtoDuration;
    use secrecy::SecretString;
    use token_broker::proto::v1::{
        lease, CreateLeaseRequest, GetLeaseRequest, Lease, ListLeasesRequest, RenewLeaseRequest,
        RevokeLeaseRequest,
    };
    use tonic::Code;
    use tonic_types::StatusExt;

    macro_rules! on_both_stores_over_grpc {
        ($($name:ident),* $(,)?) => {
            mod postgres {
                use super::*;
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(Backend::Postgres).await
                    }
                )*
            }
            mod sqlite {
                use super::*;
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(Backend::Sqlite).await
                    }
                )*
            }
        };
    }

    on_both_stores_over_grpc!(
        a_leased_token_works_until_revoked_and_renewal_moves_its_valid_to,
        a_lease_past_its_expiry_is_expired_by_the_reaper,
        a_repeated_request_id_returns_the_same_lease_concurrently_and_after_a_restart,
        a_request_id_reused_with_other_parameters_is_already_exists,
        bad_input_is_invalid_argument_naming_the_field,
        a_request_outside_policy_is_permission_denied_saying_why_and_leaves_no_trace,
        a_call_without_a_known_api_key_is_unauthenticated,
        another_callers_lease_is_not_found,
    );

    struct Setup {
        emulator: token_broker::emulator::RunningEmulator,
        url: String,
        db: TestDb,
        spec: BrokerSpec,
        broker: TestBroker,
    }

    async fn setup(backend: Backend, reaper_interval: Duration) -> Setup {
        let emulator = start_emulator().await;
        let url = emulator.url();
        let db = TestDb::new(backend).await;
        let mut spec = BrokerSpec::new(db.url.clone(), url.clone())
            .with_policy(POLICY_YAML)
            .with_key("other");
        spec.reaper_interval = reaper_interval;
        spec.valid_to_skew = SKEW;
        let broker = spawn_broker(&spec).await;
        Setup {
            emulator,
            url,
            db,
            spec,
            broker,
        }
    }

    impl Setup {
        async fn client(&self, name: &str) -> Client {
            self.broker.client(&self.spec.key(name)).await
        }
    }

    fn create_request(
        organization: &str,
        scopes: &[&str],
        ttl_secs: Option<i64>,
        request_id: &str,
    ) -> CreateLeaseRequest {
        CreateLeaseRequest {
            organization: organization.to_owned(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl: ttl_secs.map(|seconds| ProtoDuration { seconds, nanos: 0 }),
            request_id: request_id.to_owned(),
        }
    }

    fn token_of(lease: &Lease) -> SecretString {
        assert!(!lease.token.is_empty(), "CreateLease answers the token");
        SecretString::from(lease.token.clone())
    }

    fn time_of(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
        let t = t.as_ref().expect("a timestamp");
        DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
    }

    async fn a_leased_token_works_until_revoked_and_renewal_moves_its_valid_to(backend: Backend) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let mut ci = s.client("ci").await;

        let lease = ci
            .create_lease(create_request("fabrikam", &["vso.code"], Some(900), ""))
            .await
            .expect("lease created")
            .into_inner();
        assert_eq!(lease.state(), lease::State::Active);
        assert_eq!(lease.holder, "apikey:ci");
        assert!(lease.name.starts_with("leases/"));
        let token = token_of(&lease);

        assert_eq!(list_repositories(&s.url, "fabrikam", &token).await, 200);
        assert_ne!(list_feeds(&s.url, "fabrikam", &token).await, 200);
        assert_ne!(list_repositories(&s.url, "contoso", &token).await, 200);

        // GetLease and ListLeases never carry the token.
        let got = ci
            .get_lease(GetLeaseRequest {
                name: lease.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.token.is_empty());
        let listed = ci
            .list_leases(ListLeasesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.leases.len(), 1);
        assert!(listed.leases.iter().all(|l| l.token.is_empty()));

        let valid_to = |pats: Vec<serde_json::Value>| {
            parse_time(
                &pats
                    .into_iter()
                    .find(|p| p["displayName"] == lease.display_name.as_str())
                    .expect("the lease's PAT")["validTo"],
            )
        };
        let before = valid_to(emulator_pats(&s.url).await);
        let renewed = ci
            .renew_lease(RenewLeaseRequest {
                name: lease.name.clone(),
                increment: Some(ProtoDuration {
                    seconds: 7200,
                    nanos: 0,
                }),
            })
            .await
            .expect("renewed")
            .into_inner();
        assert!(renewed.token.is_empty());
        assert!(time_of(&renewed.expire_time) > time_of(&lease.expire_time));
        let after = valid_to(emulator_pats(&s.url).await);
        assert!(after > before, "validTo moved upstream");
        assert!(within_a_second(
            after,
            time_of(&renewed.expire_time) + chrono::Duration::from_std(SKEW).unwrap()
        ));

        let revoked = ci
            .revoke_lease(RevokeLeaseRequest {
                name: lease.name.clone(),
            })
            .await
            .expect("revoked")
            .into_inner();
        assert_eq!(revoked.state(), lease::State::Revoked);
        assert!(revoked.revoke_time.is_some());
        assert!(revoked.token.is_empty());
        assert_ne!(list_repositories(&s.url, "fabrikam", &token).await, 200);
        s.broker.stop().await;
        drop((s.emulator, s.db));
    }

    async fn a_lease_past_its_expiry_is_expired_by_the_reaper(backend: Backend) {
        let s = setup(backend, Duration::from_millis(200)).await;
        let mut ci = s.client("ci").await;
        let lease = ci
            .create_lease(create_request("fabrikam", &["vso.code"], Some(1), ""))
            .await
            .unwrap()
            .into_inner();
        let token = token_of(&lease);

        let name = lease.name.clone();
        eventually("the reaper expires the lease", || {
            let mut ci = ci.clone();
            let name = name.clone();
            async move {
                let got = ci
                    .get_lease(GetLeaseRequest { name })
                    .await
                    .unwrap()
                    .into_inner();
                got.state() == lease::State::Expired
            }
        })
        .await;
        let expired = ci
            .get_lease(GetLeaseRequest {
                name: lease.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(time_of(&expired.revoke_time) >= time_of(&expired.expire_time));
        assert_ne!(list_repositories(&s.url, "fabrikam", &token).await, 200);
        s.broker.stop().await;
    }

    async fn a_repeated_request_id_returns_the_same_lease_concurrently_and_after_a_restart(
        backend: Backend,
    ) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let request_id = Uuid::new_v4().to_string();
        let ci = s.client("ci").await;

        let attempts = (0..20).map(|_| {
            let mut ci = ci.clone();
            let req = create_request("fabrikam", &["vso.code"], None, &request_id);
            tokio::spawn(async move { ci.create_lease(req).await })
        });
        let answers = futures::future::join_all(attempts).await;
        let mut names = std::collections::BTreeSet::new();
        let mut tokens = std::collections::BTreeSet::new();
        for answer in answers {
            let lease = answer
                .unwrap()
                .expect("every retry gets the lease")
                .into_inner();
            names.insert(lease.name.clone());
            tokens.insert(lease.token.clone());
        }
        assert_eq!(names.len(), 1);
        assert_eq!(tokens.len(), 1);
        assert_eq!(emulator_pats(&s.url).await.len(), 1);

        // A restarted broker on the same store answers the same.
        s.broker.stop().await;
        let restarted = spawn_broker(&s.spec).await;
        let mut ci = restarted.client(&s.spec.key("ci")).await;
        let again = ci
            .create_lease(create_request("fabrikam", &["vso.code"], None, &request_id))
            .await
            .expect("replayed after restart")
            .into_inner();
        assert_eq!(Some(&again.name), names.iter().next());
        assert_eq!(Some(&again.token), tokens.iter().next());
        assert_eq!(emulator_pats(&s.url).await.len(), 1, "still one PAT");
        assert_eq!(
            list_repositories(&s.url, "fabrikam", &token_of(&again)).await,
            200
        );
        restarted.stop().await;
    }

    async fn a_request_id_reused_with_other_parameters_is_already_exists(backend: Backend) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let mut ci = s.client("ci").await;
        let request_id = Uuid::new_v4().to_string();
        ci.create_lease(create_request("fabrikam", &["vso.code"], None, &request_id))
            .await
            .unwrap();

        let status = ci
            .create_lease(create_request(
                "fabrikam",
                &["vso.packaging"],
                None,
                &request_id,
            ))
            .await
            .unwrap_err();

        assert_eq!(status.code(), Code::AlreadyExists);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "REQUEST_ID_REUSED");
        assert_eq!(emulator_pats(&s.url).await.len(), 1);
        s.broker.stop().await;
    }

    async fn bad_input_is_invalid_argument_naming_the_field(backend: Backend) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let mut ci = s.client("ci").await;
        let cases = [
            (
                create_request("fabrikam", &["vso.nonsense"], None, ""),
                "scopes",
            ),
            (create_request("fabrikam", &[], None, ""), "scopes"),
            (create_request("", &["vso.code"], None, ""), "organization"),
            (
                create_request("fabrikam", &["vso.code"], Some(0), ""),
                "ttl",
            ),
            (
                create_request("fabrikam", &["vso.code"], Some(-60), ""),
                "ttl",
            ),
            (
                create_request("fabrikam", &["vso.code"], Some(366 * 24 * 3600), ""),
                "ttl",
            ),
            (
                create_request("fabrikam", &["vso.code"], None, "not-a-uuid"),
                "request_id",
            ),
        ];
        for (request, field) in cases {
            let status = ci.create_lease(request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            let bad = status
                .get_details_bad_request()
                .expect("BadRequest details");
            assert!(
                bad.field_violations.iter().any(|v| v.field == field),
                "names {field}: {:?}",
                bad.field_violations
            );
        }
        let status = ci
            .get_lease(GetLeaseRequest {
                name: "leases/nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_no_lease_and_no_upstream_call(&s).await;
        s.broker.stop().await;
    }

    async fn a_request_outside_policy_is_permission_denied_saying_why_and_leaves_no_trace(
        backend: Backend,
    ) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let mut ci = s.client("ci").await;
        let cases = [
            (
                create_request("contoso", &["vso.code"], None, ""),
                "ORGANIZATION_NOT_ALLOWED",
            ),
            (
                create_request("fabrikam", &["vso.code_manage"], None, ""),
                "SCOPE_NOT_ALLOWED",
            ),
            (
                create_request("fabrikam", &["app_token"], None, ""),
                "SCOPE_NOT_ALLOWED",
            ),
            (
                create_request("fabrikam", &["vso.code"], Some(9 * 3600), ""),
                "TTL_EXCEEDS_MAX",
            ),
        ];
        for (request, reason) in cases {
            let status = ci.create_lease(request).await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{reason}: {status:?}"
            );
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, "tokenbroker");
        }
        assert_no_lease_and_no_upstream_call(&s).await;
        s.broker.stop().await;
    }

    async fn a_call_without_a_known_api_key_is_unauthenticated(backend: Backend) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let unknown =
            SecretString::from("tbk_0000000000000000000000000000000000000000000".to_owned());
        for mut client in [
            s.broker.anonymous_client().await,
            s.broker.client(&unknown).await,
            s.broker.client_with_header("Basic Y2k6Y2k=").await,
        ] {
            let status = client
                .create_lease(create_request("fabrikam", &["vso.code"], None, ""))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            let status = client
                .list_leases(ListLeasesRequest::default())
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
        assert_no_lease_and_no_upstream_call(&s).await;
        s.broker.stop().await;
    }

    async fn another_callers_lease_is_not_found(backend: Backend) {
        let s = setup(backend, Duration::from_secs(15)).await;
        let mut ci = s.client("ci").await;
        let mut other = s.client("other").await;
        let lease = ci
            .create_lease(create_request("fabrikam", &["vso.code"], None, ""))
            .await
            .unwrap()
            .into_inner();

        let get = other
            .get_lease(GetLeaseRequest {
                name: lease.name.clone(),
            })
            .await
            .unwrap_err();
        let revoke = other
            .revoke_lease(RevokeLeaseRequest {
                name: lease.name.clone(),
            })
            .await
            .unwrap_err();
        let renew = other
            .renew_lease(RenewLeaseRequest {
                name: lease.name.clone(),
                increment: None,
            })
            .await
            .unwrap_err();
        for status in [get, revoke, renew] {
            assert_eq!(status.code(), Code::NotFound);
        }
        let listed = other
            .list_leases(ListLeasesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.leases.is_empty());
        assert_eq!(
            list_repositories(&s.url, "fabrikam", &token_of(&lease)).await,
            200
        );
        s.broker.stop().await;
    }

    /// No lease row was written and the emulator saw no PAT call.
    async fn assert_no_lease_and_no_upstream_call(s: &Setup) {
        let store = token_broker::store::open(&s.db.url).await.unwrap();
        let rows = store
            .list_leases(&LeaseFilter::default(), None, 100)
            .await
            .unwrap();
        assert!(rows.is_empty(), "no lease row");
        let stats = emulator_stats(&s.url).await;
        for operation in ["create", "get", "list", "update", "revoke"] {
            assert_eq!(
                stats["calls"][operation].as_u64().unwrap_or(0),
                0,
                "no upstream {operation}: {stats}"
            );
        }
        assert!(emulator_pats(&s.url).await.is_empty());
    }
}

/// Two renewals of one lease at once whose upstream PUTs and commits land
/// in opposite orders: the first to commit wins, the other answers
/// ABORTED `RENEW_CONFLICT`, and the PAT's validTo is put back to follow
/// the stored lease (it never ends hours before its lease).
async fn of_two_concurrent_renewals_the_first_to_commit_wins_and_the_pat_follows_it(
    backend: Backend,
) {
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(backend).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let issued = broker
        .leases
        .create(
            &caller("ci"),
            request(&["vso.code"], Some(Duration::from_secs(600)), None),
        )
        .await
        .unwrap();
    let id = issued.lease.id;
    // The first renewal's PUT takes effect at once; its answer comes late.
    set_faults(
        &url,
        serde_json::json!([{"operation":"update","latencyMs":1500,"latencyWhen":"after","times":1}]),
    )
    .await;
    let long = {
        let leases = broker.leases.clone();
        tokio::spawn(async move {
            leases
                .renew(&caller("ci"), id, Some(Duration::from_secs(7 * 3600)))
                .await
        })
    };
    eventually("the first renewal's PUT upstream", || async {
        emulator_stats(&url).await["calls"]["update"].as_u64() == Some(1)
    })
    .await;
    let short = broker
        .leases
        .renew(&caller("ci"), id, Some(Duration::from_secs(60)))
        .await
        .expect("the second renewal commits first");
    let err = long
        .await
        .unwrap()
        .expect_err("the first renewal lost the race");
    use token_broker::error::ServiceError as _;
    assert_eq!(err.reason(), "RENEW_CONFLICT", "{err}");
    assert_eq!(err.code(), token_broker::error::ErrorCode::Aborted);

    let stored = stored(&broker.store, id).await;
    assert_eq!(stored.expire_time, short.expire_time);
    let valid_to = parse_time(&emulator_pat_of(&url, &stored).await["validTo"]);
    assert!(
        within_a_second(
            valid_to,
            stored.expire_time + chrono::Duration::from_std(SKEW).unwrap()
        ),
        "validTo {valid_to} follows the stored lease {}",
        stored.expire_time
    );
}
