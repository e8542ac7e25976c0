//! The store conformance suite: every test is written once against
//! `Arc<dyn Store>` and runs on PostgreSQL (`postgres::…`) and SQLite
//! (`sqlite::…`), each on a fresh database.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use token_broker::audit::{AuditEvent, Outcome};
use token_broker::crypto::Sealed;
use token_broker::domain::{
    AuthorizationId, Identity, LeaseId, LeaseState, Organization, ScopeSet, Timestamp, VersionState,
};
use token_broker::store::CredentialVersionRecord;
use token_broker::store::{
    AuditAppend, AuditFilter, CreateOutcome, CredentialSource, CredentialState, CredentialWrite,
    IdempotencyRecord, KeyCheck, LeaseFilter, LeaseRecord, LeaseWrite, NewUpstreamCredential,
    PageCursor, RefreshRecord, ReplaceOutcome, SecretOwner, SecretReplacement, Store, StoreError,
    Work,
};
use uuid::Uuid;

/// Instantiates each named conformance test for both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = crate::common::db::postgres_store().await;
                    super::$name(store).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = crate::common::db::sqlite_store().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

conformance!(
    created_lease_reads_back_field_for_field,
    an_unchanged_update_is_refused_once_the_row_was_written_since,
    unknown_lease_is_none,
    leases_are_read_by_a_set_of_ids_leaving_out_unknown_ones,
    listing_is_newest_first_and_pages_cover_every_lease_once,
    listing_filters_by_holder_state_and_organization,
    update_writes_every_mutable_field_while_state_is_as_expected,
    update_is_refused_once_the_state_has_moved,
    create_with_a_known_key_returns_the_existing_record_and_writes_nothing,
    twenty_concurrent_creators_with_one_key_make_exactly_one_lease,
    duplicate_display_name_is_refused_and_writes_nothing,
    failed_lease_is_replaced_only_while_the_key_still_points_at_it,
    two_concurrent_claimers_split_due_leases_without_overlap,
    each_kind_of_work_claims_only_its_due_leases,
    lapsed_claim_can_be_taken_again_but_a_live_one_cannot,
    released_claim_can_be_taken_again_at_once,
    one_lease_is_claimed_only_while_unclaimed_and_unchanged,
    lease_organizations_are_every_organization_leased_in_once,
    a_job_is_claimed_once_per_interval_and_a_lapsed_claim_is_taken_over,
    twenty_concurrent_job_claimers_get_exactly_one_claim,
    live_lease_count_ignores_finished_leases_and_other_holders,
    thirty_concurrent_capped_creates_admit_exactly_the_cap_and_write_nothing_else,
    a_capped_create_replays_a_known_key_and_a_capped_replacement_respects_the_cap,
    leases_in_a_state_are_counted_across_holders,
    audit_events_list_in_append_order_after_an_id,
    audit_time_filters_find_rows_appended_out_of_time_order,
    concurrent_audit_appends_all_land_with_distinct_increasing_ids,
    a_lease_write_and_its_audit_row_land_together_or_not_at_all,
    batches_writing_the_same_leases_in_opposite_orders_do_not_deadlock,
    concurrent_meta_writers_agree_on_the_first_value,
    upstream_credential_versions_replace_rotate_and_adopt_configuration,
    timestamps_round_trip_with_microseconds_in_utc,
    migrating_twice_is_harmless,
    key_checks_are_recorded_once_and_the_first_value_stands,
    sealed_secrets_are_found_counted_paged_and_replaced_by_compare_and_set,
    audit_rows_are_counted_by_key_with_unrecorded_ids_as_default,
    a_lease_is_found_by_the_token_fingerprint_of_its_grant_under_its_key_id,
    a_lease_keeps_its_sealed_token_only_while_active,
    retention_deletes_only_closed_leases_past_both_bounds_with_their_keys,
    twenty_concurrent_minters_of_one_credential_version_insert_it_once,
    activating_a_version_makes_the_current_one_previous_in_one_write,
    credential_version_updates_compare_state_and_claimer,
    a_credential_version_is_claimed_only_without_a_live_claim,
    managed_credentials_record_absence_retirement_and_return,
    credential_version_tokens_are_sealed_secrets_kept_only_while_valid,
    credential_version_retention_deletes_only_closed_versions_past_both_bounds_never_the_newest,
    a_version_number_at_or_below_the_newest_stored_is_never_inserted,
    the_versions_in_use_are_the_live_ones_and_each_named_credentials_newest,
);

// ---- fixtures ----------------------------------------------------------

/// A fixed instant, so tests never depend on the clock.
fn t0() -> Timestamp {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap().into()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn holder(name: &str) -> Identity {
    format!("apikey:{name}").parse().unwrap()
}

fn org(name: &str) -> Organization {
    Organization::parse(name).unwrap()
}

/// A tiny sealed value: the store never opens it.
fn sealed(byte: u8) -> Sealed {
    Sealed {
        key_id: "k1".into(),
        nonce: [byte; 12],
        ciphertext: vec![byte, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    }
}

/// An ACTIVE lease for `who` created at `created`, expiring an hour later.
fn lease(who: &str, created: Timestamp) -> LeaseRecord {
    let id = LeaseId::new();
    LeaseRecord {
        id,
        holder: holder(who),
        organization: org("contoso"),
        scopes: ScopeSet::parse(["vso.code", "vso.packaging"]).unwrap(),
        display_name: format!("tb:test:{id}"),
        authorization_id: Some(AuthorizationId::from_uuid(Uuid::new_v4())),
        sealed_token: Some(sealed(1)),
        state: LeaseState::Active,
        create_time: created,
        update_time: created,
        expire_time: created + secs(3600),
        max_expire_time: created + secs(4 * 3600),
        revoke_time: None,
        upstream_valid_to: Some(created + secs(3600)),
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: None,
        claimed_until: None,
    }
}

fn pending(who: &str, created: Timestamp) -> LeaseRecord {
    LeaseRecord {
        state: LeaseState::Pending,
        authorization_id: None,
        sealed_token: None,
        upstream_valid_to: None,
        ..lease(who, created)
    }
}

fn key_for(lease: &LeaseRecord, request_id: Uuid) -> IdempotencyRecord {
    IdempotencyRecord {
        holder: lease.holder.clone(),
        request_id,
        fingerprint: "ab".repeat(32),
        lease_id: lease.id,
        create_time: lease.create_time,
    }
}

async fn create(store: &Arc<dyn Store>, lease: &LeaseRecord) {
    assert_eq!(
        store.create_lease(lease, None, None).await.unwrap(),
        CreateOutcome::Created
    );
}

async fn all_leases(store: &Arc<dyn Store>) -> Vec<LeaseRecord> {
    store
        .list_leases(&LeaseFilter::default(), None, 10_000)
        .await
        .unwrap()
}

fn ids(leases: &[LeaseRecord]) -> Vec<LeaseId> {
    leases.iter().map(|l| l.id).collect()
}

// ---- leases -------------------------------------------------------------

async fn created_lease_reads_back_field_for_field(store: Arc<dyn Store>) {
    let mut full = lease("ci", t0());
    full.revoke_time = Some(t0() + secs(5));
    full.attempts = 3;
    full.next_attempt_time = Some(t0() + secs(7));
    full.last_error = Some("upstream said 503".into());
    full.claimed_by = Some("replica-a".into());
    full.claimed_until = Some(t0() + secs(60));
    create(&store, &full).await;
    assert_eq!(store.get_lease(full.id).await.unwrap(), Some(full));

    let bare = pending("ci", t0());
    create(&store, &bare).await;
    assert_eq!(store.get_lease(bare.id).await.unwrap(), Some(bare));
}

async fn unknown_lease_is_none(store: Arc<dyn Store>) {
    assert_eq!(store.get_lease(LeaseId::new()).await.unwrap(), None);
}

async fn leases_are_read_by_a_set_of_ids_leaving_out_unknown_ones(store: Arc<dyn Store>) {
    assert_eq!(store.get_leases(&[]).await.unwrap(), vec![]);
    // More than one query's worth of ids (500), known ones spread among them.
    let mut known = Vec::new();
    for i in 0..7 {
        let mut row = if i % 2 == 0 {
            lease("ci", t0() + secs(i))
        } else {
            pending("ci", t0() + secs(i))
        };
        row.claimed_by = Some("replica-a".into());
        row.claimed_until = Some(t0() + secs(60));
        create(&store, &row).await;
        known.push(row);
    }
    let mut asked: Vec<LeaseId> = (0..1200).map(|_| LeaseId::new()).collect();
    for (i, row) in known.iter().enumerate() {
        asked.insert(i * 170, row.id);
    }
    // A repeated id is read once.
    asked.push(known[0].id);
    let mut found = store.get_leases(&asked).await.unwrap();
    found.sort_by_key(|l| l.create_time);
    assert_eq!(found, known, "field for field, each once, none made up");
    assert_eq!(store.get_leases(&[LeaseId::new()]).await.unwrap(), vec![]);
}

async fn listing_is_newest_first_and_pages_cover_every_lease_once(store: Arc<dyn Store>) {
    // 25 leases; pairs share a create_time so the id breaks ties.
    let mut made = Vec::new();
    for i in 0..25 {
        let l = lease("ci", t0() + secs(i / 2));
        create(&store, &l).await;
        made.push(l);
    }
    made.sort_by_key(|l| std::cmp::Reverse((l.create_time, l.id)));

    let mut seen = Vec::new();
    let mut cursor: Option<PageCursor> = None;
    loop {
        let page = store
            .list_leases(&LeaseFilter::default(), cursor.as_ref(), 7)
            .await
            .unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        cursor = Some(PageCursor {
            create_time: last.create_time,
            id: last.id,
        });
        seen.extend(page);
    }
    assert_eq!(ids(&seen), ids(&made));
}

async fn listing_filters_by_holder_state_and_organization(store: Arc<dyn Store>) {
    let mine_active = lease("alice", t0());
    let mine_pending = pending("alice", t0() + secs(1));
    let mine_other_org = LeaseRecord {
        organization: org("fabrikam"),
        ..lease("alice", t0() + secs(2))
    };
    let theirs = lease("bob", t0() + secs(3));
    for l in [&mine_active, &mine_pending, &mine_other_org, &theirs] {
        create(&store, l).await;
    }

    let by_holder = LeaseFilter {
        holder: Some(holder("alice")),
        ..Default::default()
    };
    assert_eq!(
        ids(&store.list_leases(&by_holder, None, 100).await.unwrap()),
        vec![mine_other_org.id, mine_pending.id, mine_active.id]
    );

    let active_contoso = LeaseFilter {
        holder: Some(holder("alice")),
        states: vec![LeaseState::Active],
        organization: Some(org("contoso")),
    };
    assert_eq!(
        ids(&store.list_leases(&active_contoso, None, 100).await.unwrap()),
        vec![mine_active.id]
    );

    let two_states = LeaseFilter {
        states: vec![LeaseState::Pending, LeaseState::Revoked],
        ..Default::default()
    };
    assert_eq!(
        ids(&store.list_leases(&two_states, None, 100).await.unwrap()),
        vec![mine_pending.id]
    );
}

async fn update_writes_every_mutable_field_while_state_is_as_expected(store: Arc<dyn Store>) {
    let before = pending("ci", t0());
    create(&store, &before).await;
    let after = LeaseRecord {
        authorization_id: Some(AuthorizationId::from_uuid(Uuid::new_v4())),
        sealed_token: Some(sealed(9)),
        state: LeaseState::Active,
        update_time: t0() + secs(10),
        expire_time: t0() + secs(20),
        max_expire_time: t0() + secs(30),
        revoke_time: Some(t0() + secs(40)),
        upstream_valid_to: Some(t0() + secs(50)),
        attempts: 2,
        next_attempt_time: Some(t0() + secs(60)),
        last_error: Some("timeout".into()),
        claimed_by: Some("replica-b".into()),
        claimed_until: Some(t0() + secs(70)),
        ..before.clone()
    };
    assert!(store
        .update_lease(&after, LeaseState::Pending)
        .await
        .unwrap());
    assert_eq!(store.get_lease(before.id).await.unwrap(), Some(after));
}

async fn update_is_refused_once_the_state_has_moved(store: Arc<dyn Store>) {
    let original = lease("ci", t0());
    create(&store, &original).await;
    let revoking = LeaseRecord {
        state: LeaseState::Revoking,
        update_time: t0() + secs(1),
        ..original.clone()
    };
    assert!(store
        .update_lease(&revoking, LeaseState::Active)
        .await
        .unwrap());

    // A second writer that still believes the lease is ACTIVE loses.
    let renewed = LeaseRecord {
        expire_time: t0() + secs(7200),
        ..original.clone()
    };
    assert!(!store
        .update_lease(&renewed, LeaseState::Active)
        .await
        .unwrap());
    // As written, less the sealed token: only an ACTIVE lease keeps it.
    let stored = LeaseRecord {
        sealed_token: None,
        ..revoking
    };
    assert_eq!(store.get_lease(original.id).await.unwrap(), Some(stored));
}

async fn an_unchanged_update_is_refused_once_the_row_was_written_since(store: Arc<dyn Store>) {
    let original = lease("ci", t0());
    create(&store, &original).await;
    // A renewal commits: same state, a new update_time.
    let renewed = LeaseRecord {
        expire_time: t0() + secs(7200),
        update_time: t0() + secs(1),
        ..original.clone()
    };
    assert!(store
        .update_lease_unchanged(&renewed, LeaseState::Active, original.update_time)
        .await
        .unwrap());
    // An expiry decided on the copy read before it loses, though the state
    // is still ACTIVE.
    let revoking = LeaseRecord {
        state: LeaseState::Revoking,
        update_time: t0() + secs(2),
        ..original.clone()
    };
    assert!(!store
        .update_lease_unchanged(&revoking, LeaseState::Active, original.update_time)
        .await
        .unwrap());
    assert_eq!(
        store.get_lease(original.id).await.unwrap(),
        Some(renewed.clone())
    );
    // Decided on the current copy, it wins.
    assert!(store
        .update_lease_unchanged(&revoking, LeaseState::Active, renewed.update_time)
        .await
        .unwrap());
}

// ---- idempotency ----------------------------------------------------------

async fn create_with_a_known_key_returns_the_existing_record_and_writes_nothing(
    store: Arc<dyn Store>,
) {
    let request_id = Uuid::new_v4();
    let first = lease("ci", t0());
    let first_key = key_for(&first, request_id);
    assert_eq!(
        store
            .create_lease(&first, Some(&first_key), None)
            .await
            .unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store
            .get_idempotency(&first.holder, request_id)
            .await
            .unwrap(),
        Some(first_key.clone())
    );

    let retry = lease("ci", t0() + secs(1));
    let retry_key = IdempotencyRecord {
        fingerprint: "cd".repeat(32),
        ..key_for(&retry, request_id)
    };
    assert_eq!(
        store
            .create_lease(&retry, Some(&retry_key), None)
            .await
            .unwrap(),
        CreateOutcome::Existing(first_key.clone())
    );
    assert_eq!(store.get_lease(retry.id).await.unwrap(), None);
    assert_eq!(ids(&all_leases(&store).await), vec![first.id]);

    // The same request id from another holder is another key.
    let other = lease("bob", t0() + secs(2));
    assert_eq!(
        store
            .create_lease(&other, Some(&key_for(&other, request_id)), None)
            .await
            .unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store
            .get_idempotency(&holder("nobody"), request_id)
            .await
            .unwrap(),
        None
    );
}

async fn twenty_concurrent_creators_with_one_key_make_exactly_one_lease(store: Arc<dyn Store>) {
    let request_id = Uuid::new_v4();
    let creators = (0..20).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let l = lease("ci", t0() + secs(i));
            let outcome = store
                .create_lease(&l, Some(&key_for(&l, request_id)), None)
                .await
                .unwrap();
            (l.id, outcome)
        })
    });
    let results: Vec<_> = futures::future::join_all(creators)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let winners: Vec<LeaseId> = results
        .iter()
        .filter(|(_, o)| *o == CreateOutcome::Created)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one creator wins");
    for (_, outcome) in &results {
        if let CreateOutcome::Existing(record) = outcome {
            assert_eq!(record.lease_id, winners[0]);
        }
    }
    assert_eq!(ids(&all_leases(&store).await), winners);
}

async fn duplicate_display_name_is_refused_and_writes_nothing(store: Arc<dyn Store>) {
    let first = lease("ci", t0());
    create(&store, &first).await;
    let clash = LeaseRecord {
        display_name: first.display_name.clone(),
        ..lease("ci", t0() + secs(1))
    };
    let clash_key = key_for(&clash, Uuid::new_v4());
    let err = store
        .create_lease(&clash, Some(&clash_key), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    assert_eq!(ids(&all_leases(&store).await), vec![first.id]);
    assert_eq!(
        store
            .get_idempotency(&clash.holder, clash_key.request_id)
            .await
            .unwrap(),
        None
    );
}

async fn failed_lease_is_replaced_only_while_the_key_still_points_at_it(store: Arc<dyn Store>) {
    let request_id = Uuid::new_v4();
    let failed = LeaseRecord {
        state: LeaseState::Failed,
        ..pending("ci", t0())
    };
    assert_eq!(
        store
            .create_lease(&failed, Some(&key_for(&failed, request_id)), None)
            .await
            .unwrap(),
        CreateOutcome::Created
    );

    let retry = pending("ci", t0() + secs(2));
    assert_eq!(
        store
            .replace_failed_lease(&retry, &key_for(&retry, request_id), failed.id, None)
            .await
            .unwrap(),
        ReplaceOutcome::Replaced
    );
    let key_now = store
        .get_idempotency(&retry.holder, request_id)
        .await
        .unwrap();
    assert_eq!(key_now.map(|k| k.lease_id), Some(retry.id));
    assert_eq!(
        store.get_lease(retry.id).await.unwrap(),
        Some(retry.clone())
    );
    assert!(
        store.get_lease(failed.id).await.unwrap().is_some(),
        "the failed lease is kept"
    );

    // A second replacer that still thinks the key points at the failed
    // lease loses, and its lease is not written.
    let late = pending("ci", t0() + secs(3));
    assert_eq!(
        store
            .replace_failed_lease(&late, &key_for(&late, request_id), failed.id, None)
            .await
            .unwrap(),
        ReplaceOutcome::KeyMoved
    );
    assert_eq!(store.get_lease(late.id).await.unwrap(), None);
    let key_now = store
        .get_idempotency(&retry.holder, request_id)
        .await
        .unwrap();
    assert_eq!(key_now.map(|k| k.lease_id), Some(retry.id));
}

// ---- claims ----------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

async fn two_concurrent_claimers_split_due_leases_without_overlap(store: Arc<dyn Store>) {
    let mut due = HashSet::new();
    for i in 0..200 {
        // Created two hours ago, expired an hour ago: due for the reaper.
        let l = lease("ci", t0() - secs(7200) + chrono::Duration::milliseconds(i));
        create(&store, &l).await;
        due.insert(l.id);
    }
    let now = t0();
    let claimer = |name: &'static str| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim_due(Work::Expiry, now, name, HOUR, 9)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return mine;
                }
                for l in &batch {
                    assert_eq!(l.claimed_by.as_deref(), Some(name));
                    assert_eq!(l.claimed_until, Some(now + secs(3600)));
                }
                mine.extend(ids(&batch));
            }
        })
    };
    let (a, b) = (claimer("replica-a"), claimer("replica-b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());

    let a_set: HashSet<_> = a.iter().copied().collect();
    let b_set: HashSet<_> = b.iter().copied().collect();
    assert_eq!(a_set.len(), a.len(), "no lease handed to one claimer twice");
    assert_eq!(b_set.len(), b.len(), "no lease handed to one claimer twice");
    assert!(
        a_set.is_disjoint(&b_set),
        "no lease handed to both claimers"
    );
    let all: HashSet<_> = a_set.union(&b_set).copied().collect();
    assert_eq!(all, due, "together they claimed every due lease");
    // The claims are committed: every row names its claimer.
    for l in all_leases(&store).await {
        let expected = if a_set.contains(&l.id) {
            "replica-a"
        } else {
            "replica-b"
        };
        assert_eq!(l.claimed_by.as_deref(), Some(expected));
    }
}

async fn each_kind_of_work_claims_only_its_due_leases(store: Arc<dyn Store>) {
    let now = t0();
    // Expiry: ACTIVE and expire_time <= now.
    let expired = LeaseRecord {
        expire_time: now,
        ..lease("ci", now - secs(3600))
    };
    let not_yet = lease("ci", now - secs(60));
    let revoked_past_expiry = LeaseRecord {
        state: LeaseState::Revoked,
        expire_time: now - secs(10),
        ..lease("ci", now - secs(3600))
    };
    // Revocation: REVOKING / REVOKE_FAILED, next attempt unset or due.
    let revoking_unset = LeaseRecord {
        state: LeaseState::Revoking,
        ..lease("ci", now - secs(30))
    };
    let revoke_failed_due = LeaseRecord {
        state: LeaseState::RevokeFailed,
        next_attempt_time: Some(now - secs(1)),
        ..lease("ci", now - secs(30))
    };
    let revoking_later = LeaseRecord {
        state: LeaseState::Revoking,
        next_attempt_time: Some(now + secs(30)),
        ..lease("ci", now - secs(30))
    };
    // Reconcile: PENDING created more than 5 minutes ago.
    let stale_pending = pending("ci", now - secs(600));
    let young_pending = pending("ci", now - secs(10));
    for l in [
        &expired,
        &not_yet,
        &revoked_past_expiry,
        &revoking_unset,
        &revoke_failed_due,
        &revoking_later,
        &stale_pending,
        &young_pending,
    ] {
        create(&store, l).await;
    }

    let claim = |work| {
        let store = store.clone();
        async move {
            let mut got = ids(&store.claim_due(work, now, "r", HOUR, 100).await.unwrap());
            got.sort();
            got
        }
    };
    let sorted = |mut v: Vec<LeaseId>| {
        v.sort();
        v
    };
    assert_eq!(claim(Work::Expiry).await, vec![expired.id]);
    assert_eq!(
        claim(Work::Revocation).await,
        sorted(vec![revoking_unset.id, revoke_failed_due.id])
    );
    assert_eq!(
        claim(Work::Reconcile {
            older_than: Duration::from_secs(300)
        })
        .await,
        vec![stale_pending.id]
    );
}

async fn lapsed_claim_can_be_taken_again_but_a_live_one_cannot(store: Arc<dyn Store>) {
    let l = LeaseRecord {
        expire_time: t0() - secs(1),
        ..lease("ci", t0() - secs(3600))
    };
    create(&store, &l).await;
    let minute = Duration::from_secs(60);
    let first = store
        .claim_due(Work::Expiry, t0(), "replica-a", minute, 10)
        .await
        .unwrap();
    assert_eq!(ids(&first), vec![l.id]);

    // Within the minute nobody else gets it, not even the same replica.
    for (who, at) in [
        ("replica-b", t0() + secs(30)),
        ("replica-a", t0() + secs(59)),
    ] {
        let none = store
            .claim_due(Work::Expiry, at, who, minute, 10)
            .await
            .unwrap();
        assert!(none.is_empty(), "{who} took a live claim");
    }

    // Once the claim lapses, another replica takes it over.
    let later = t0() + secs(60);
    let second = store
        .claim_due(Work::Expiry, later, "replica-b", minute, 10)
        .await
        .unwrap();
    assert_eq!(ids(&second), vec![l.id]);
    assert_eq!(second[0].claimed_by.as_deref(), Some("replica-b"));
    assert_eq!(second[0].claimed_until, Some(later + secs(60)));
}

async fn released_claim_can_be_taken_again_at_once(store: Arc<dyn Store>) {
    let l = LeaseRecord {
        expire_time: t0() - secs(1),
        ..lease("ci", t0() - secs(3600))
    };
    create(&store, &l).await;
    store
        .claim_due(Work::Expiry, t0(), "replica-a", HOUR, 10)
        .await
        .unwrap();

    // Only the holder of a claim can release it.
    store.release_claim(l.id, "replica-b").await.unwrap();
    let stored = store.get_lease(l.id).await.unwrap().unwrap();
    assert_eq!(stored.claimed_by.as_deref(), Some("replica-a"));

    store.release_claim(l.id, "replica-a").await.unwrap();
    let stored = store.get_lease(l.id).await.unwrap().unwrap();
    assert_eq!((stored.claimed_by, stored.claimed_until), (None, None));
    let again = store
        .claim_due(Work::Expiry, t0(), "replica-b", HOUR, 10)
        .await
        .unwrap();
    assert_eq!(ids(&again), vec![l.id]);
}

async fn one_lease_is_claimed_only_while_unclaimed_and_unchanged(store: Arc<dyn Store>) {
    let l = LeaseRecord {
        state: LeaseState::Failed,
        ..lease("ci", t0() - secs(3600))
    };
    create(&store, &l).await;
    let minute = Duration::from_secs(60);

    // In another state than the caller judged: not claimed.
    assert!(!store
        .claim_lease(l.id, LeaseState::Active, t0(), "sweeper", minute, t0())
        .await
        .unwrap());
    // Written at or after the bound: not claimed.
    assert!(!store
        .claim_lease(
            l.id,
            LeaseState::Failed,
            t0(),
            "sweeper",
            minute,
            l.update_time
        )
        .await
        .unwrap());
    assert!(store
        .claim_lease(l.id, LeaseState::Failed, t0(), "sweeper", minute, t0())
        .await
        .unwrap());
    let claimed = store.get_lease(l.id).await.unwrap().unwrap();
    assert_eq!(claimed.claimed_by.as_deref(), Some("sweeper"));
    assert_eq!(claimed.claimed_until, Some(t0() + secs(60)));
    assert_eq!(claimed.update_time, l.update_time, "a claim is no write");

    // A live claim keeps everyone else out, until it lapses or is released.
    assert!(!store
        .claim_lease(
            l.id,
            LeaseState::Failed,
            t0() + secs(59),
            "other",
            minute,
            t0()
        )
        .await
        .unwrap());
    assert!(store
        .claim_due(
            Work::Reconcile {
                older_than: Duration::ZERO
            },
            t0(),
            "other",
            minute,
            10
        )
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .claim_lease(
            l.id,
            LeaseState::Failed,
            t0() + secs(60),
            "other",
            minute,
            t0()
        )
        .await
        .unwrap());
    store.release_claim(l.id, "other").await.unwrap();
    assert!(store
        .claim_lease(
            l.id,
            LeaseState::Failed,
            t0() + secs(61),
            "sweeper",
            minute,
            t0()
        )
        .await
        .unwrap());

    assert!(!store
        .claim_lease(
            LeaseId::new(),
            LeaseState::Failed,
            t0(),
            "sweeper",
            minute,
            t0()
        )
        .await
        .unwrap());
}

async fn lease_organizations_are_every_organization_leased_in_once(store: Arc<dyn Store>) {
    assert!(store.lease_organizations().await.unwrap().is_empty());
    for (i, (name, state)) in [
        ("fabrikam", LeaseState::Active),
        ("contoso", LeaseState::Failed),
        ("fabrikam", LeaseState::Revoked),
        ("adatum", LeaseState::Pending),
    ]
    .into_iter()
    .enumerate()
    {
        create(
            &store,
            &LeaseRecord {
                organization: org(name),
                state,
                ..lease("ci", t0() + secs(i as i64))
            },
        )
        .await;
    }
    assert_eq!(
        store.lease_organizations().await.unwrap(),
        vec![org("adatum"), org("contoso"), org("fabrikam")]
    );
}

async fn a_job_is_claimed_once_per_interval_and_a_lapsed_claim_is_taken_over(
    store: Arc<dyn Store>,
) {
    let minute = Duration::from_secs(60);
    let interval = Duration::from_secs(600);
    // Never run: due at once (the row is made on first use).
    assert!(store
        .claim_job("sweep", t0(), "replica-a", minute, interval)
        .await
        .unwrap());
    // Claimed: nobody, not even the holder, claims it again.
    for who in ["replica-a", "replica-b"] {
        assert!(!store
            .claim_job("sweep", t0() + secs(30), who, minute, interval)
            .await
            .unwrap());
    }
    // Other jobs are independent.
    assert!(store
        .claim_job("other", t0(), "replica-b", minute, interval)
        .await
        .unwrap());

    // Finished at t0: not due again until t0 + interval.
    store.finish_job("sweep", "replica-b", t0()).await.unwrap();
    assert!(
        !store
            .claim_job("sweep", t0() + secs(59), "replica-b", minute, interval)
            .await
            .unwrap(),
        "a finish by a replica without the claim is ignored: the claim holds"
    );
    store.finish_job("sweep", "replica-a", t0()).await.unwrap();
    assert!(!store
        .claim_job("sweep", t0() + secs(599), "replica-b", minute, interval)
        .await
        .unwrap());
    assert!(store
        .claim_job("sweep", t0() + secs(600), "replica-b", minute, interval)
        .await
        .unwrap());

    // replica-b dies mid-run: its claim lapses and replica-a takes over.
    assert!(!store
        .claim_job("sweep", t0() + secs(659), "replica-a", minute, interval)
        .await
        .unwrap());
    assert!(store
        .claim_job("sweep", t0() + secs(660), "replica-a", minute, interval)
        .await
        .unwrap());
}

async fn twenty_concurrent_job_claimers_get_exactly_one_claim(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim_job(
                    "sweep",
                    t0(),
                    &format!("replica-{i}"),
                    Duration::from_secs(60),
                    Duration::from_secs(600),
                )
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
}

// ---- quotas, audit, meta, upstream credential -------------------------------

async fn live_lease_count_ignores_finished_leases_and_other_holders(store: Arc<dyn Store>) {
    for (i, state) in LeaseState::ALL.into_iter().enumerate() {
        let l = LeaseRecord {
            state,
            ..lease("alice", t0() + secs(i as i64))
        };
        create(&store, &l).await;
    }
    create(&store, &lease("bob", t0())).await;
    // PENDING, ACTIVE and REVOKING count; REVOKED, EXPIRED, FAILED and
    // REVOKE_FAILED do not.
    assert_eq!(store.count_live_leases(&holder("alice")).await.unwrap(), 3);
    assert_eq!(store.count_live_leases(&holder("bob")).await.unwrap(), 1);
    assert_eq!(store.count_live_leases(&holder("carol")).await.unwrap(), 0);
}

async fn thirty_concurrent_capped_creates_admit_exactly_the_cap_and_write_nothing_else(
    store: Arc<dyn Store>,
) {
    // Another holder's leases never count against this one's cap.
    create(&store, &pending("other", t0())).await;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let l = pending("ci", t0() + secs(i));
                let key = (i % 2 == 0).then(|| key_for(&l, Uuid::new_v4()));
                store.create_lease(&l, key.as_ref(), Some(5)).await.unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            CreateOutcome::Created => created += 1,
            CreateOutcome::OverQuota { live } => assert_eq!(live, 5),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 5, "exactly the cap is admitted");
    assert_eq!(store.count_live_leases(&holder("ci")).await.unwrap(), 5);
    assert_eq!(
        all_leases(&store).await.len(),
        6,
        "a refused create writes no row"
    );
}

async fn a_capped_create_replays_a_known_key_and_a_capped_replacement_respects_the_cap(
    store: Arc<dyn Store>,
) {
    let request_id = Uuid::new_v4();
    let first = pending("ci", t0());
    let first_key = key_for(&first, request_id);
    assert_eq!(
        store
            .create_lease(&first, Some(&first_key), Some(1))
            .await
            .unwrap(),
        CreateOutcome::Created
    );
    // At the cap, a retry with the same key is the same lease, not a new one.
    let retry = pending("ci", t0() + secs(1));
    assert_eq!(
        store
            .create_lease(&retry, Some(&key_for(&retry, request_id)), Some(1))
            .await
            .unwrap(),
        CreateOutcome::Existing(first_key.clone())
    );
    let other = pending("ci", t0() + secs(2));
    assert_eq!(
        store.create_lease(&other, None, Some(1)).await.unwrap(),
        CreateOutcome::OverQuota { live: 1 }
    );

    // A FAILED lease under a key is replaced only within the cap.
    let failed_id = Uuid::new_v4();
    let failed = LeaseRecord {
        state: LeaseState::Failed,
        ..pending("ci", t0() + secs(3))
    };
    create_keyed(&store, &failed, failed_id).await;
    let fresh = pending("ci", t0() + secs(4));
    assert_eq!(
        store
            .replace_failed_lease(&fresh, &key_for(&fresh, failed_id), failed.id, Some(1))
            .await
            .unwrap(),
        ReplaceOutcome::OverQuota { live: 1 }
    );
    assert_eq!(store.get_lease(fresh.id).await.unwrap(), None);
    assert_eq!(
        store
            .replace_failed_lease(&fresh, &key_for(&fresh, failed_id), failed.id, Some(2))
            .await
            .unwrap(),
        ReplaceOutcome::Replaced
    );
}

async fn create_keyed(store: &Arc<dyn Store>, lease: &LeaseRecord, request_id: Uuid) {
    assert_eq!(
        store
            .create_lease(lease, Some(&key_for(lease, request_id)), None)
            .await
            .unwrap(),
        CreateOutcome::Created
    );
}

async fn leases_in_a_state_are_counted_across_holders(store: Arc<dyn Store>) {
    for state in LeaseState::ALL {
        assert_eq!(store.count_leases_in_state(state).await.unwrap(), 0);
    }
    for (i, who) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let l = LeaseRecord {
            state: LeaseState::RevokeFailed,
            ..lease(who, t0() + secs(i as i64))
        };
        create(&store, &l).await;
    }
    create(&store, &lease("alice", t0() + secs(10))).await;
    let moved = LeaseRecord {
        state: LeaseState::Revoking,
        ..lease("dave", t0() + secs(11))
    };
    create(&store, &moved).await;
    let count = |state| {
        let store = store.clone();
        async move { store.count_leases_in_state(state).await.unwrap() }
    };
    assert_eq!(count(LeaseState::RevokeFailed).await, 3);
    assert_eq!(count(LeaseState::Active).await, 1);
    assert_eq!(count(LeaseState::Revoking).await, 1);
    assert_eq!(count(LeaseState::Revoked).await, 0);

    // The count follows the rows: one REVOKING lease gives up, then one
    // REVOKE_FAILED lease is closed.
    let failed = LeaseRecord {
        state: LeaseState::RevokeFailed,
        ..moved.clone()
    };
    assert!(store
        .update_lease(&failed, LeaseState::Revoking)
        .await
        .unwrap());
    assert_eq!(count(LeaseState::RevokeFailed).await, 4);
    let closed = LeaseRecord {
        state: LeaseState::Revoked,
        ..failed
    };
    assert!(store
        .update_lease(&closed, LeaseState::RevokeFailed)
        .await
        .unwrap());
    assert_eq!(count(LeaseState::RevokeFailed).await, 3);
    assert_eq!(count(LeaseState::Revoked).await, 1);
}

fn audit(action: &str, outcome: Outcome) -> AuditEvent {
    AuditEvent {
        id: 0,
        time: t0(),
        identity: "apikey:ci".into(),
        peer: Some("127.0.0.1:4711".into()),
        action: action.into(),
        outcome,
        reason: Some("SCOPE_NOT_ALLOWED".into()),
        policy_rule: Some("ci-readers".into()),
        lease_id: Some(LeaseId::new()),
        organization: Some("contoso".into()),
        scopes: Some("vso.code".into()),
        token_fingerprint: Some("0f".repeat(32)),
        caller_detail: Some("pod=web-1 pod_uid=p1 sa_uid=s1 jti=j1".into()),
    }
}

async fn audit_events_list_in_append_order_after_an_id(store: Arc<dyn Store>) {
    let mut appended = Vec::new();
    for (i, outcome) in [Outcome::Allowed, Outcome::Denied, Outcome::Error]
        .into_iter()
        .cycle()
        .take(5)
        .enumerate()
    {
        let mut event = audit(&format!("lease.step{i}"), outcome);
        event.time = t0() + secs(i as i64);
        if i == 4 {
            // The bare minimum an unauthenticated refusal carries.
            event = AuditEvent {
                identity: "-".into(),
                peer: None,
                reason: None,
                policy_rule: None,
                lease_id: None,
                organization: None,
                scopes: None,
                token_fingerprint: None,
                caller_detail: None,
                ..event
            };
        }
        event.id = store.append_audit(&event).await.unwrap();
        appended.push(event);
    }
    let ids: Vec<i64> = appended.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    assert_eq!(store.list_audit(0, 100).await.unwrap(), appended);
    assert_eq!(store.list_audit(0, 2).await.unwrap(), appended[..2]);
    assert_eq!(store.list_audit(ids[1], 100).await.unwrap(), appended[2..]);
    assert!(store.list_audit(ids[4], 100).await.unwrap().is_empty());
}

/// Every event `filter` matches, paged `limit` at a time as the listing
/// pages.
async fn all_matching(store: &dyn Store, filter: &AuditFilter, limit: u32) -> Vec<AuditEvent> {
    let mut events: Vec<AuditEvent> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e.id);
        let page = store
            .list_audit_matching(filter, after, limit)
            .await
            .unwrap();
        let last = page.len() < limit as usize;
        events.extend(page);
        if last {
            return events;
        }
    }
}

/// Checks that every time range (bounds at each stored time, before, after
/// and open), alone and with an identity, lists exactly the stored events
/// it covers, in id order, whatever the page size.
async fn assert_time_filters_list_exactly_what_they_cover(store: &dyn Store) {
    let stored = store.list_audit(0, 1000).await.unwrap();
    let mut bounds: Vec<Option<Timestamp>> = vec![
        None,
        Some(t0() - secs(2 * 86_400)),
        Some(t0() + secs(2 * 86_400)),
    ];
    for event in &stored {
        if !bounds.contains(&Some(event.time)) {
            bounds.push(Some(event.time));
        }
    }
    for start in &bounds {
        for end in &bounds {
            for identity in [None, Some("apikey:odd")] {
                let filter = AuditFilter {
                    start_time: *start,
                    end_time: *end,
                    identity: identity.map(Into::into),
                    ..AuditFilter::default()
                };
                let covered: Vec<AuditEvent> = stored
                    .iter()
                    .filter(|e| start.is_none_or(|t| e.time >= t))
                    .filter(|e| end.is_none_or(|t| e.time < t))
                    .filter(|e| identity.is_none_or(|i| e.identity == i))
                    .cloned()
                    .collect();
                for limit in [2, 100] {
                    assert_eq!(
                        all_matching(store, &filter, limit).await,
                        covered,
                        "{filter:?}, {limit} a page"
                    );
                }
            }
        }
    }
}

/// Seconds after t0 of test events, in append order: rising, with some a
/// little behind the newest (as concurrent appends commit), some far behind
/// (a retried append keeps its first time), equal times, and one a day
/// ahead (a replica with a fast clock) that puts every later one far behind.
const OUT_OF_ORDER_OFFSETS: [i64; 17] = [
    0, 5, 3, 20, -3600, 30, 30, 40, 35, 50, 38, 60, 61, 45, 70, 86_400, 80,
];

fn event_at(i: usize, offset: i64) -> AuditEvent {
    let mut event = audit(&format!("lease.step{}", i % 3), Outcome::Allowed);
    event.time = t0() + secs(offset);
    event.identity = if i % 2 == 0 {
        "apikey:even"
    } else {
        "apikey:odd"
    }
    .into();
    event
}

async fn audit_time_filters_find_rows_appended_out_of_time_order(store: Arc<dyn Store>) {
    for (i, offset) in OUT_OF_ORDER_OFFSETS.into_iter().enumerate() {
        store.append_audit(&event_at(i, offset)).await.unwrap();
    }
    assert_time_filters_list_exactly_what_they_cover(&*store).await;
}

async fn concurrent_audit_appends_all_land_with_distinct_increasing_ids(store: Arc<dyn Store>) {
    let appenders = (0..30).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append_audit(&audit(&format!("lease.create{i}"), Outcome::Allowed))
                .await
                .unwrap()
        })
    });
    let mut ids: Vec<i64> = futures::future::join_all(appenders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    ids.sort();
    let listed: Vec<i64> = store
        .list_audit(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, ids);
    ids.dedup();
    assert_eq!(ids.len(), 30);
}

/// One transaction, three appends: a lease write that applies (its row is
/// written), one whose compare-and-set misses (neither it nor its row is
/// written) and a plain event; the written rows are contiguous.
async fn a_lease_write_and_its_audit_row_land_together_or_not_at_all(store: Arc<dyn Store>) {
    let moving = pending("svc-a", t0());
    let moved = lease("svc-b", t0());
    create(&store, &moving).await;
    create(&store, &moved).await;
    let activated = LeaseRecord {
        state: LeaseState::Active,
        authorization_id: Some(AuthorizationId::from_uuid(Uuid::new_v4())),
        sealed_token: Some(sealed(9)),
        update_time: t0() + secs(1),
        ..moving.clone()
    };
    let stale = LeaseRecord {
        state: LeaseState::Revoked,
        update_time: t0() + secs(1),
        ..moved.clone()
    };
    let appends = vec![
        AuditAppend {
            event: audit("lease.create", Outcome::Allowed),
            lease_write: Some(LeaseWrite {
                lease: activated.clone(),
                expected: LeaseState::Pending,
            }),
        },
        AuditAppend {
            event: audit("lease.revoke", Outcome::Allowed),
            // Stored ACTIVE, not PENDING: the write misses.
            lease_write: Some(LeaseWrite {
                lease: stale,
                expected: LeaseState::Pending,
            }),
        },
        AuditAppend {
            event: audit("policy.reload", Outcome::Allowed),
            lease_write: None,
        },
    ];
    let mac = |prev: Option<&str>, _: &AuditEvent| format!("{}+", prev.unwrap_or(""));
    let rows = store
        .append_audit_chained_batch(&appends, &mac)
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![Some((1, "+".to_owned())), None, Some((2, "++".to_owned()))]
    );
    assert_eq!(store.get_lease(moving.id).await.unwrap(), Some(activated));
    assert_eq!(store.get_lease(moved.id).await.unwrap(), Some(moved));
    let actions: Vec<String> = store
        .list_audit(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["lease.create", "policy.reload"]);
}

/// Every write that moves a lease out of ACTIVE (plain update, update on
/// an unchanged row, the lease write of an audit append) and every insert
/// of a lease in another state stores no sealed token, whatever the record
/// written holds; an ACTIVE lease keeps it.
async fn a_lease_keeps_its_sealed_token_only_while_active(store: Arc<dyn Store>) {
    let closed = [
        LeaseState::Revoking,
        LeaseState::Revoked,
        LeaseState::Expired,
        LeaseState::Failed,
        LeaseState::RevokeFailed,
    ];
    let mac = |prev: Option<&str>, _: &AuditEvent| format!("{}+", prev.unwrap_or(""));
    for (i, state) in closed.into_iter().enumerate() {
        for how in 0..4 {
            let active = lease(&format!("svc-{i}-{how}"), t0());
            create(&store, &active).await;
            assert_eq!(
                store
                    .get_lease(active.id)
                    .await
                    .unwrap()
                    .unwrap()
                    .sealed_token,
                Some(sealed(1)),
                "an ACTIVE lease keeps its token"
            );
            let next = LeaseRecord {
                state,
                update_time: t0() + secs(1),
                revoke_time: Some(t0() + secs(1)),
                ..active.clone()
            };
            let written = match how {
                0 => store.update_lease(&next, LeaseState::Active).await.unwrap(),
                1 => store
                    .update_lease_unchanged(&next, LeaseState::Active, active.update_time)
                    .await
                    .unwrap(),
                2 => {
                    let append = AuditAppend {
                        event: audit("lease.revoke", Outcome::Allowed),
                        lease_write: Some(LeaseWrite {
                            lease: next.clone(),
                            expected: LeaseState::Active,
                        }),
                    };
                    store
                        .append_audit_chained_batch(&[append], &mac)
                        .await
                        .unwrap()[0]
                        .is_some()
                }
                _ => {
                    // Inserted closed (e.g. a replacement written whole).
                    let fresh = LeaseRecord {
                        id: LeaseId::new(),
                        display_name: format!("tb:test:closed-{i}"),
                        ..next.clone()
                    };
                    create(&store, &fresh).await;
                    let row = store.get_lease(fresh.id).await.unwrap().unwrap();
                    assert_eq!(row.sealed_token, None, "{state} inserted");
                    true
                }
            };
            assert!(written, "{state} via write {how}");
            let row = store.get_lease(active.id).await.unwrap().unwrap();
            if how < 3 {
                let expected = LeaseRecord {
                    sealed_token: None,
                    ..next
                };
                assert_eq!(row, expected, "{state} via write {how}");
            }
        }
    }
}

/// Retention's store call: closed leases (REVOKED, EXPIRED, FAILED) that
/// closed before the retention bound and whose PAT's validTo has passed
/// (or, with none recorded, max_expire_time is past its bound) go, with
/// their idempotency keys, oldest first and at most `limit` per call; a
/// lease closed recently, one whose validTo is still ahead, and every
/// ACTIVE, PENDING, REVOKING and REVOKE_FAILED lease stay.
async fn retention_deletes_only_closed_leases_past_both_bounds_with_their_keys(
    store: Arc<dyn Store>,
) {
    let day = secs(24 * 3600);
    let now = t0() + day * 200;
    let closed_before = now - day * 90;
    let unrecorded_before = now - day;
    let closed =
        |who: &str, state: LeaseState, closed_at: Timestamp, valid_to: Option<Timestamp>| {
            LeaseRecord {
                state,
                sealed_token: None,
                update_time: closed_at,
                revoke_time: Some(closed_at),
                upstream_valid_to: valid_to,
                ..lease(who, t0())
            }
        };
    let long_ago = t0() + secs(7200);
    let gone = [
        closed(
            "revoked-old",
            LeaseState::Revoked,
            long_ago,
            Some(t0() + secs(3600)),
        ),
        closed(
            "expired-old",
            LeaseState::Expired,
            long_ago + secs(1),
            Some(t0() + secs(3600)),
        ),
        LeaseRecord {
            max_expire_time: t0() + secs(4 * 3600),
            revoke_time: None,
            authorization_id: None,
            ..closed("failed-old", LeaseState::Failed, long_ago + secs(2), None)
        },
    ];
    let kept = [
        // Closed within the retention.
        closed(
            "revoked-recently",
            LeaseState::Revoked,
            now - day * 10,
            Some(t0() + secs(3600)),
        ),
        // validTo still ahead.
        closed(
            "valid-to-ahead",
            LeaseState::Revoked,
            long_ago,
            Some(now + day),
        ),
        // No validTo recorded, max_expire_time within a day of now.
        LeaseRecord {
            max_expire_time: now - secs(3600),
            ..closed("failed-unrecorded", LeaseState::Failed, long_ago, None)
        },
        // Never deleted, however old: PAT possibly live, or lease live.
        closed(
            "revoke-failed",
            LeaseState::RevokeFailed,
            long_ago,
            Some(t0() + secs(3600)),
        ),
        closed(
            "revoking",
            LeaseState::Revoking,
            long_ago,
            Some(t0() + secs(3600)),
        ),
        LeaseRecord {
            update_time: long_ago,
            ..lease("active", t0())
        },
        LeaseRecord {
            update_time: long_ago,
            ..pending("pending", t0())
        },
    ];
    let mut keys = Vec::new();
    for l in gone.iter().chain(kept.iter()) {
        let request_id = Uuid::new_v4();
        create_keyed(&store, l, request_id).await;
        keys.push((l.holder.clone(), request_id, l.id));
    }
    // Nothing is due yet at t0 + 1 day.
    let early = t0() + day;
    assert_eq!(
        store
            .delete_closed_leases(early - day * 90, early, early - day, 100)
            .await
            .unwrap(),
        0
    );

    assert_eq!(
        store
            .delete_closed_leases(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        2,
        "a batch is at most its limit"
    );
    assert_eq!(
        store.get_lease(gone[2].id).await.unwrap().map(|l| l.id),
        Some(gone[2].id),
        "oldest closed first"
    );
    assert_eq!(
        store
            .delete_closed_leases(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_closed_leases(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        0
    );

    let mut left: Vec<LeaseId> = ids(&all_leases(&store).await);
    left.sort();
    let mut expected: Vec<LeaseId> = ids(&kept);
    expected.sort();
    assert_eq!(left, expected);
    let (_, reused, _) = keys[0].clone();
    for (holder, request_id, lease_id) in keys {
        let key = store.get_idempotency(&holder, request_id).await.unwrap();
        let deleted = gone.iter().any(|l| l.id == lease_id);
        assert_eq!(key.is_none(), deleted, "key of {holder}");
    }
    // The request_id of a deleted lease is free again: a new lease takes it.
    let again = lease("revoked-old", now);
    let outcome = store
        .create_lease(&again, Some(&key_for(&again, reused)), None)
        .await
        .unwrap();
    assert_eq!(outcome, CreateOutcome::Created);
}

/// Two appends at once (two replicas' group commits) whose lease writes
/// name the same leases in opposite orders: both commit, neither is
/// aborted as a deadlock (rows are locked in one order).
async fn batches_writing_the_same_leases_in_opposite_orders_do_not_deadlock(store: Arc<dyn Store>) {
    let leases: Vec<LeaseRecord> = (0..4).map(|i| lease(&format!("svc-{i}"), t0())).collect();
    for l in &leases {
        create(&store, l).await;
    }
    let batch = |order: Vec<usize>, round: i64| -> Vec<AuditAppend> {
        order
            .into_iter()
            .map(|i| AuditAppend {
                event: audit("lease.renew", Outcome::Allowed),
                lease_write: Some(LeaseWrite {
                    lease: LeaseRecord {
                        update_time: t0() + secs(round),
                        ..leases[i].clone()
                    },
                    expected: LeaseState::Active,
                }),
            })
            .collect()
    };
    let mac =
        |prev: Option<&str>, _: &AuditEvent| format!("{}+", prev.unwrap_or("")).len().to_string();
    for round in 0..10 {
        let forward = batch(vec![0, 1, 2, 3], round);
        let backward = batch(vec![3, 2, 1, 0], round);
        let (a, b) = tokio::join!(
            store.append_audit_chained_batch(&forward, &mac),
            store.append_audit_chained_batch(&backward, &mac)
        );
        assert_eq!(a.unwrap().len(), 4);
        assert_eq!(b.unwrap().len(), 4);
    }
    assert_eq!(store.list_audit(0, 100).await.unwrap().len(), 80);
}

async fn concurrent_meta_writers_agree_on_the_first_value(store: Arc<dyn Store>) {
    assert_eq!(store.get_meta("deployment_id").await.unwrap(), None);
    let writers = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .put_meta_if_absent("deployment_id", &format!("d{i}"))
                .await
                .unwrap()
        })
    });
    let answers: HashSet<String> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.len(), 1, "every writer sees one value: {answers:?}");
    let stored = store.get_meta("deployment_id").await.unwrap();
    assert_eq!(stored.as_ref(), answers.iter().next());
    // Later writers never change it.
    assert_eq!(
        Some(
            store
                .put_meta_if_absent("deployment_id", "other")
                .await
                .unwrap()
        ),
        stored
    );
}

async fn upstream_credential_versions_replace_rotate_and_adopt_configuration(
    store: Arc<dyn Store>,
) {
    let new = |n: u8, source: CredentialSource, account: Option<&str>| NewUpstreamCredential {
        sealed: sealed(n),
        account: account.map(str::to_owned),
        source,
        refreshed: source != CredentialSource::Config,
    };
    assert!(store.load_upstream_credential().await.unwrap().is_none());
    // A rotation of a credential never stored writes nothing.
    let rotate = |v| CredentialWrite::Rotate {
        expected_version: v,
    };
    assert_eq!(
        store
            .save_upstream_credential(&new(1, CredentialSource::Rotated, None), rotate(1), t0())
            .await
            .unwrap(),
        None
    );

    // The configured value is adopted once; the same value again is not.
    let adopt = |d| CredentialWrite::AdoptConfigured { digest: d };
    let v = store
        .save_upstream_credential(&new(1, CredentialSource::Config, None), adopt("d1"), t0())
        .await
        .unwrap();
    assert_eq!(v, Some(1));
    let first = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(
        (
            first.version,
            &first.sealed,
            first.update_time,
            first.source
        ),
        (1, &sealed(1), t0(), CredentialSource::Config)
    );
    assert_eq!(
        (first.state, first.last_refresh_time, first.account),
        (CredentialState::Ok, None, None)
    );

    // Two replicas redeem version 1: the first rotation wins, the second
    // writes nothing.
    let later = t0() + secs(10);
    let rotated = |n| new(n, CredentialSource::Rotated, Some("ops@contoso.com"));
    assert_eq!(
        store
            .save_upstream_credential(&rotated(2), rotate(1), later)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        store
            .save_upstream_credential(&rotated(3), rotate(1), later)
            .await
            .unwrap(),
        None
    );
    let second = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(
        (
            second.version,
            &second.sealed,
            second.source,
            second.last_refresh_time
        ),
        (2, &sealed(2), CredentialSource::Rotated, Some(later))
    );
    assert_eq!(second.account.as_deref(), Some("ops@contoso.com"));

    // A restart with the same configured value keeps the rotation.
    assert_eq!(
        store
            .save_upstream_credential(&new(1, CredentialSource::Config, None), adopt("d1"), later)
            .await
            .unwrap(),
        None
    );

    // A refusal marks only the version it redeemed.
    let refused = RefreshRecord::Refused {
        error: "invalid_grant (AADSTS50173)".into(),
    };
    assert!(!store
        .record_upstream_refresh(1, &refused, later)
        .await
        .unwrap());
    assert!(store
        .record_upstream_refresh(2, &refused, later)
        .await
        .unwrap());
    let failing = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(failing.state, CredentialState::Failing);
    assert_eq!(
        failing.last_error.as_deref(),
        Some("invalid_grant (AADSTS50173)")
    );

    // A login replaces it, whatever the version, and starts OK; the
    // configured digest stays, so the old configured value is still not
    // adopted again.
    let login = store
        .save_upstream_credential(
            &new(4, CredentialSource::Login, Some("ops@contoso.com")),
            CredentialWrite::Replace,
            later,
        )
        .await
        .unwrap();
    assert_eq!(login, Some(3));
    let third = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(
        (third.state, third.last_error, third.source),
        (CredentialState::Ok, None, CredentialSource::Login)
    );
    assert_eq!(
        store
            .save_upstream_credential(&new(1, CredentialSource::Config, None), adopt("d1"), later)
            .await
            .unwrap(),
        None
    );
    // A changed configured value is adopted.
    assert_eq!(
        store
            .save_upstream_credential(&new(5, CredentialSource::Config, None), adopt("d2"), later)
            .await
            .unwrap(),
        Some(4)
    );
    let success = RefreshRecord::Succeeded { account: None };
    assert!(store
        .record_upstream_refresh(4, &success, later)
        .await
        .unwrap());
    let fourth = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(
        (fourth.version, &fourth.sealed, fourth.last_refresh_time),
        (4, &sealed(5), Some(later))
    );
}

// ---- time and schema ----------------------------------------------------

async fn timestamps_round_trip_with_microseconds_in_utc(store: Arc<dyn Store>) {
    // Nanoseconds are truncated to the microseconds both databases keep
    // (by `Timestamp`, when the record is made).
    let precise = Utc.with_ymd_and_hms(2026, 7, 4, 23, 59, 58).unwrap()
        + chrono::Duration::nanoseconds(123_456_789);
    let kept = Timestamp::from(precise - chrono::Duration::nanoseconds(789));
    let l = LeaseRecord {
        create_time: precise.into(),
        update_time: precise.into(),
        revoke_time: Some(precise.into()),
        ..lease("ci", precise.into())
    };
    create(&store, &l).await;
    let read = store.get_lease(l.id).await.unwrap().unwrap();
    assert_eq!(read.create_time, kept);
    assert_eq!(read.revoke_time, Some(kept));
    assert_eq!(read.create_time.timezone(), Utc);
    assert_eq!(
        read.create_time.to_rfc3339(),
        "2026-07-04T23:59:58.123456+00:00"
    );

    // Sub-second order holds: a microsecond later sorts first in listings.
    let next = lease("ci", kept + chrono::Duration::microseconds(1));
    create(&store, &next).await;
    assert_eq!(ids(&all_leases(&store).await), vec![next.id, l.id]);
}

async fn migrating_twice_is_harmless(store: Arc<dyn Store>) {
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
}

// ---- backend specifics ----------------------------------------------------

/// A server that answers but refuses the session (no such database, one
/// that does not accept connections, a role over its connection limit) is
/// `Unavailable` (UNAVAILABLE STORE_UNAVAILABLE, retryable), not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_server_refusing_the_session_is_unavailable() {
    use token_broker::error::ServiceError as _;
    let db = common::db::TestDatabase::create().await;
    let admin = sqlx::PgPool::connect(&common::db::admin_url())
        .await
        .unwrap();
    let (base, name) = db.url.rsplit_once('/').unwrap();
    let suffix = &Uuid::new_v4().simple().to_string()[..12];
    let role = format!("tb_test_role_{suffix}");
    sqlx::query(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .execute(&admin)
        .await
        .unwrap();
    let mut over_limit = url::Url::parse(&db.url).unwrap();
    over_limit.set_username(&role).unwrap();
    let cases = [
        ("3D000", format!("{base}/tb_test_no_such_database_{suffix}")),
        ("53300", over_limit.to_string()),
        ("55000", db.url.clone()),
    ];
    for (sqlstate, url) in cases {
        if sqlstate == "55000" {
            sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
                .execute(&admin)
                .await
                .unwrap();
        }
        let err = match token_broker::store::open(&url).await {
            Ok(_) => panic!("{sqlstate}: the session was not refused"),
            Err(err) => err,
        };
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "{sqlstate}: {err:?}"
        );
        // sqlx retries a too-many-connections refusal itself, so that case
        // ends as the pool's timeout: unavailable all the same.
        assert_eq!(err.reason(), "STORE_UNAVAILABLE");
    }
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await
        .unwrap();
}

/// The sessions of `database` whose `application_name` is `name` that are
/// waiting for a lock.
async fn sessions_waiting_for_a_lock(admin: &sqlx::PgPool, database: &str, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2 AND wait_event_type = 'Lock'",
    )
    .bind(database)
    .bind(name)
    .fetch_one(admin)
    .await
    .unwrap()
}

/// A PostgreSQL session ended under a call (`pg_terminate_backend`, what a
/// server shutting down does: SQLSTATE 57P01, or just a closed connection)
/// is `Unavailable`; the store then opens a fresh session by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_session_terminated_under_a_call_is_unavailable_and_the_next_call_reconnects()
{
    use token_broker::error::ServiceError as _;
    let db = common::db::TestDatabase::create().await;
    let name = db.url.rsplit_once('/').unwrap().1.to_owned();
    let app = format!("tb-test-{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store: Arc<dyn Store> = Arc::new(
        token_broker::store::PostgresStore::connect_with(
            &db.url,
            token_broker::store::PostgresOptions {
                max_connections: 2,
                acquire_timeout: Duration::from_secs(10),
                application_name: app.clone(),
            },
        )
        .await
        .unwrap(),
    );
    store.migrate().await.unwrap();
    let l = lease("ci", t0());
    create(&store, &l).await;
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();

    // Mid-call: the store's read waits on a lock the test holds, and its
    // session is terminated while it waits.
    let mut lock = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let read = tokio::spawn({
        let store = store.clone();
        async move { store.get_lease(l.id).await }
    });
    common::leases::eventually("the read waits for the lock", || async {
        sessions_waiting_for_a_lock(&admin, &name, &app).await == 1
    })
    .await;
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2 AND wait_event_type = 'Lock'",
    )
    .bind(&name)
    .bind(&app)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(terminated, vec![true]);
    let err = read
        .await
        .unwrap()
        .expect_err("the session ended under the read");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(err.reason(), "STORE_UNAVAILABLE");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    lock.rollback().await.unwrap();

    // Between calls: every pooled session is terminated. The next call may
    // see that (unavailable, never another error) or reconnect at once;
    // the one after it is served.
    store.get_lease(l.id).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2",
    )
    .bind(&name)
    .bind(&app)
    .execute(&admin)
    .await
    .unwrap();
    if let Err(err) = store.get_lease(l.id).await {
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
    assert_eq!(store.get_lease(l.id).await.unwrap(), Some(l));
    admin.close().await;
}

/// A PostgreSQL server still starting up answers every session with
/// SQLSTATE 57P03 ("the database system is starting up"). Stood in for by
/// a listener that answers each startup message just so: the store keeps
/// trying for `acquire_timeout`, then reports `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_server_still_starting_up_is_unavailable() {
    use token_broker::error::ServiceError as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// The SSLRequest code (PostgreSQL protocol, "Message Formats").
    const SSL_REQUEST: u32 = 80_877_103;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn({
        let sessions = sessions.clone();
        async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let sessions = sessions.clone();
                tokio::spawn(async move {
                    // Startup packets: length (itself included), then a code.
                    loop {
                        let Ok(len) = socket.read_u32().await else {
                            return;
                        };
                        let mut rest = vec![0; len as usize - 4];
                        if socket.read_exact(&mut rest).await.is_err() {
                            return;
                        }
                        if rest[..4] == SSL_REQUEST.to_be_bytes() {
                            socket.write_all(b"N").await.unwrap();
                            continue;
                        }
                        break;
                    }
                    sessions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut fields = Vec::new();
                    for (tag, value) in [
                        (b'S', "FATAL"),
                        (b'V', "FATAL"),
                        (b'C', "57P03"),
                        (b'M', "the database system is starting up"),
                    ] {
                        fields.push(tag);
                        fields.extend_from_slice(value.as_bytes());
                        fields.push(0);
                    }
                    fields.push(0);
                    let mut answer = vec![b'E'];
                    answer.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                    answer.extend_from_slice(&fields);
                    let _ = socket.write_all(&answer).await;
                });
            }
        }
    });
    let err = token_broker::store::PostgresStore::connect_with(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        token_broker::store::PostgresOptions {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .expect_err("a starting server serves no session");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(err.reason(), "STORE_UNAVAILABLE");
    assert!(
        sessions.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the refusal came from the starting server"
    );
    server.abort();
}

/// `Stores::open` splits `max_connections` into shares: background work
/// that holds every connection of its share (here: stuck on a lock) gets
/// no more, while callers' requests and audit appends keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_holding_its_whole_share_leaves_requests_and_audit_their_connections() {
    use token_broker::error::ServiceError as _;
    use token_broker::store::{PoolOptions, PoolShares, Stores};
    let db = common::db::TestDatabase::create().await;
    let name = db.url.rsplit_once('/').unwrap().1.to_owned();
    let options = PoolOptions {
        max_connections: 5,
        acquire_timeout: Duration::from_secs(2),
    };
    assert_eq!(
        PoolShares::of(5),
        Some(PoolShares {
            requests: 3,
            background: 1,
            audit: 1
        })
    );
    let stores = Stores::open(&db.url, &options).await.unwrap();
    stores.requests.migrate().await.unwrap();
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();

    let mut lock = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE background_jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let stuck = tokio::spawn({
        let background = stores.background.clone();
        async move {
            background
                .claim_job(
                    "sweep",
                    t0(),
                    "replica-a",
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                )
                .await
        }
    });
    common::leases::eventually("background work waits for the lock", || async {
        sessions_waiting_for_a_lock(&admin, &name, "token-broker:background").await == 1
    })
    .await;

    // Its share is spent: more background work waits, then is refused.
    let err = stores
        .background
        .ping()
        .await
        .expect_err("no connection left");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(err.reason(), "STORE_UNAVAILABLE");

    // Requests (as many at once as their share) and audit appends are served.
    let leases: Vec<LeaseRecord> = (0..3).map(|_| lease("ci", t0())).collect();
    let calls = leases.iter().map(|l| {
        let requests = stores.requests.clone();
        async move {
            requests.create_lease(l, None, None).await?;
            requests.get_lease(l.id).await
        }
    });
    for (l, read) in leases.iter().zip(futures::future::join_all(calls).await) {
        assert_eq!(read.unwrap().as_ref(), Some(l));
    }
    stores
        .audit
        .append_audit(&audit("lease.create", Outcome::Allowed))
        .await
        .unwrap();

    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'token-broker:%'")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(sessions <= 5, "{sessions} sessions");

    lock.rollback().await.unwrap();
    assert!(
        stuck.await.unwrap().unwrap(),
        "the claim goes through once the lock is gone"
    );
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_migrating_one_fresh_database_at_once_all_succeed() {
    let db = common::db::TestDatabase::create().await;
    let mut stores = Vec::new();
    for i in 0..4 {
        // Both URL schemes PostgreSQL documents open the PostgreSQL store.
        let url = if i % 2 == 0 {
            db.url.clone()
        } else {
            db.url.replacen("postgres://", "postgresql://", 1)
        };
        stores.push(token_broker::store::open(&url).await.unwrap());
    }
    let migrations = stores.iter().map(|s| {
        let s = s.clone();
        tokio::spawn(async move { s.migrate().await })
    });
    for result in futures::future::join_all(migrations).await {
        result.unwrap().unwrap();
    }
    // The schema is there once and usable.
    let l = lease("ci", t0());
    create(&stores[0], &l).await;
    assert!(stores[3].get_lease(l.id).await.unwrap().is_some());
}

#[tokio::test]
async fn unreachable_postgres_is_reported_as_unavailable() {
    let options = token_broker::store::PostgresOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let err = token_broker::store::PostgresStore::connect_with(
        "postgres://postgres:not-a-real-password@127.0.0.1:1/postgres",
        options,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("not-a-real-password"));

    let err = match token_broker::store::open("postgres://postgres@127.0.0.1:1/postgres").await {
        Ok(_) => panic!("opened a store on a closed port"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn sqlite_store_creates_its_file_from_a_bare_path_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested-ok.db");
    assert!(!path.exists());
    let store = token_broker::store::SqliteStore::open(path.to_str().unwrap())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    assert!(path.exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);

    // Times are stored as fixed-form RFC 3339 text, so text order is time order.
    let l = lease("ci", t0());
    store.create_lease(&l, None, None).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT create_time FROM leases")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, "2026-03-01T12:00:00.000000Z");

    // The data outlives the process's handle on it.
    store.close().await;
    let reopened = token_broker::store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(reopened.get_lease(l.id).await.unwrap(), Some(l));
}

#[tokio::test]
async fn in_memory_sqlite_store_works_for_one_process() {
    let store = token_broker::store::open("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    let l = lease("ci", t0());
    create(&store, &l).await;
    assert_eq!(store.get_lease(l.id).await.unwrap(), Some(l));
}

/// Audit rows written before migration 0006 (time_high, late) and rows
/// written by anything but the store after it are listed by time filters
/// like the rows the store appends.
mod audit_rows_not_appended_by_this_store {
    use std::path::Path;

    use sqlx::{Connection, Executor};
    use token_broker::domain::Timestamp;
    use token_broker::store;

    use super::{assert_time_filters_list_exactly_what_they_cover, event_at, OUT_OF_ORDER_OFFSETS};
    use crate::common::db::{sqlite_url, TestDatabase};

    /// The migrations of `dialect` before 0006, in a directory of their own.
    fn migrations_before_0006(dialect: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dialect);
        for entry in std::fs::read_dir(source).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.as_str() < "0006" {
                std::fs::copy(&path, dir.path().join(name)).unwrap();
            }
        }
        dir
    }

    /// `INSERT` of row `id` of `identity`, its time bound as `$1`, without
    /// the columns of 0006 (PostgreSQL adds `OVERRIDING SYSTEM VALUE`).
    fn raw_insert(id: i64, identity: &str) -> String {
        format!(
            "INSERT INTO audit_events (id, time, identity, action, outcome) \
             VALUES ({id}, $1, '{identity}', 'lease.step{}', 'allowed')",
            id % 3
        )
    }

    /// Writes the first test events raw with ids 1.. through `insert`
    /// (`insert(sql, time)` runs one), migrates with the store, appends
    /// the rest through it, writes one more row raw, and checks the
    /// listing.
    async fn check(url: &str, mut insert: impl AsyncFnMut(String, Timestamp)) {
        let (before, after) = OUT_OF_ORDER_OFFSETS.split_at(12);
        for (i, offset) in before.iter().enumerate() {
            let event = event_at(i, *offset);
            insert(raw_insert(i as i64 + 1, &event.identity), event.time).await;
        }
        let store = store::open(url).await.unwrap();
        store.migrate().await.unwrap();
        for (i, offset) in after.iter().enumerate() {
            store
                .append_audit(&event_at(i + 12, *offset))
                .await
                .unwrap();
        }
        let last = store.list_audit(0, 1000).await.unwrap().last().unwrap().id;
        let early = event_at(1, -7200);
        insert(raw_insert(last + 1, &early.identity), early.time).await;
        assert_time_filters_list_exactly_what_they_cover(&*store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let db = TestDatabase::create().await;
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let dir = migrations_before_0006("postgres");
        sqlx::migrate::Migrator::new(dir.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        check(&db.url, async |sql: String, time: Timestamp| {
            let sql = sql.replace(") VALUES", ") OVERRIDING SYSTEM VALUE VALUES");
            pool.execute(sqlx::query(&sql).bind(time)).await.unwrap();
        })
        .await;
        pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir);
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let mut conn = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
            .await
            .unwrap();
        let migrations = migrations_before_0006("sqlite");
        sqlx::migrate::Migrator::new(migrations.path())
            .await
            .unwrap()
            .run(&mut conn)
            .await
            .unwrap();
        check(&url, async |sql: String, time: Timestamp| {
            conn.execute(sqlx::query(&sql).bind(time)).await.unwrap();
        })
        .await;
        conn.close().await.unwrap();
    }
}

// ---- key checks and stored secrets (migration 0009) --------------------

fn key_check(purpose: &str, key_id: &str, value: &str) -> KeyCheck {
    KeyCheck {
        purpose: purpose.into(),
        key_id: key_id.into(),
        check_value: value.into(),
    }
}

async fn key_checks_are_recorded_once_and_the_first_value_stands(store: Arc<dyn Store>) {
    let first = store
        .record_key_checks(&[key_check("sealing", "k1", "aa")], t0())
        .await
        .unwrap();
    assert_eq!(first, vec![key_check("sealing", "k1", "aa")]);
    // Another value for k1 is not recorded; new ids are; all come back.
    let recorded = store
        .record_key_checks(
            &[
                key_check("sealing", "k1", "bb"),
                key_check("sealing", "k2", "cc"),
                key_check("audit_chain", "default", "dd"),
            ],
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(
        recorded,
        vec![
            key_check("audit_chain", "default", "dd"),
            key_check("sealing", "k1", "aa"),
            key_check("sealing", "k2", "cc"),
        ]
    );
    // Replicas starting together agree on one value per key.
    let writers = (0..10).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .record_key_checks(&[key_check("fingerprint", "f1", &format!("v{i}"))], t0())
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.purpose == "fingerprint")
                .unwrap()
                .check_value
        })
    });
    let answers: HashSet<String> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
}

fn sealed_under(key_id: &str, byte: u8) -> Sealed {
    Sealed {
        key_id: key_id.into(),
        ..sealed(byte)
    }
}

async fn sealed_secrets_are_found_counted_paged_and_replaced_by_compare_and_set(
    store: Arc<dyn Store>,
) {
    assert!(store.sealed_key_ids().await.unwrap().is_empty());
    let mut under_k1 = Vec::new();
    for i in 0..5u8 {
        let mut l = lease("alice", t0() + secs(i64::from(i)));
        l.sealed_token = Some(sealed_under(if i < 3 { "k1" } else { "k2" }, i));
        create(&store, &l).await;
        if i < 3 {
            under_k1.push(l.id);
        }
    }
    create(&store, &pending("bob", t0())).await;
    store
        .save_upstream_credential(
            &NewUpstreamCredential {
                sealed: sealed_under("k0_old-1", 9),
                account: None,
                source: CredentialSource::Login,
                refreshed: true,
            },
            CredentialWrite::Replace,
            t0(),
        )
        .await
        .unwrap();

    let ids: Vec<String> = store.sealed_key_ids().await.unwrap().into_iter().collect();
    assert_eq!(ids, ["k0_old-1", "k1", "k2"]);
    let counts = store
        .count_sealed_by_key(&["k0_old-1".into(), "k1".into(), "k2".into(), "k3".into()])
        .await
        .unwrap();
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [
            ("k0_old-1".to_string(), 1),
            ("k1".to_string(), 3),
            ("k2".to_string(), 2),
            ("k3".to_string(), 0)
        ]
    );

    // Pages of 2 cover every secret not under k2 once: the credential
    // first, then leases by id.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_secrets_not_under("k2", after.as_ref(), 2)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.owner.clone());
        seen.extend(page);
    }
    assert_eq!(seen[0].owner, SecretOwner::UpstreamCredential);
    assert_eq!(seen[0].sealed, sealed_under("k0_old-1", 9));
    let mut leases: Vec<LeaseId> = seen[1..]
        .iter()
        .map(|s| match s.owner {
            SecretOwner::Lease(id) => id,
            SecretOwner::UpstreamCredential => panic!("the credential twice"),
            SecretOwner::CredentialVersion { .. } => panic!("no credential versions here"),
        })
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let mut sorted = leases.clone();
    sorted.sort();
    assert_eq!(leases, sorted, "leases come by id");
    leases.sort();
    under_k1.sort();
    assert_eq!(leases, under_k1);

    // Compare-and-set: a stale `old` replaces nothing, the stored one does.
    let stale: Vec<SecretReplacement> = seen
        .iter()
        .map(|s| SecretReplacement {
            owner: s.owner.clone(),
            old: sealed_under(&s.sealed.key_id, 200),
            new: sealed_under("k2", 100),
        })
        .collect();
    assert_eq!(store.replace_secrets(&stale).await.unwrap(), 0);
    let fresh: Vec<SecretReplacement> = seen
        .iter()
        .map(|s| SecretReplacement {
            owner: s.owner.clone(),
            old: s.sealed.clone(),
            new: sealed_under("k2", 100),
        })
        .collect();
    assert_eq!(store.replace_secrets(&fresh).await.unwrap(), 4);
    let ids: Vec<String> = store.sealed_key_ids().await.unwrap().into_iter().collect();
    assert_eq!(ids, ["k2"]);
    assert!(store
        .list_secrets_not_under("k2", None, 10)
        .await
        .unwrap()
        .is_empty());
    let credential = store.load_upstream_credential().await.unwrap().unwrap();
    assert_eq!(credential.sealed, sealed_under("k2", 100));
    assert_eq!(credential.version, 1, "a re-seal is not a new version");
    let lease = store.get_lease(under_k1[0]).await.unwrap().unwrap();
    assert_eq!(lease.sealed_token, Some(sealed_under("k2", 100)));
}

async fn audit_rows_are_counted_by_key_with_unrecorded_ids_as_default(store: Arc<dyn Store>) {
    let (chain, fingerprint) = store.count_audit_rows_by_key().await.unwrap();
    assert!(chain.is_empty() && fingerprint.is_empty());
    for i in 0..5 {
        let mut event = audit("lease.create", Outcome::Allowed);
        if i % 2 == 0 {
            event.token_fingerprint = None;
        }
        store.append_audit(&event).await.unwrap();
    }
    let (chain, fingerprint) = store.count_audit_rows_by_key().await.unwrap();
    assert_eq!(
        chain.into_iter().collect::<Vec<_>>(),
        [("default".to_string(), 5)]
    );
    assert_eq!(
        fingerprint.into_iter().collect::<Vec<_>>(),
        [("default".to_string(), 2)]
    );
}

/// Only an allowed `lease.create` row with a lease counts, and only under
/// the key id it records (none recorded: `default`).
async fn a_lease_is_found_by_the_token_fingerprint_of_its_grant_under_its_key_id(
    store: Arc<dyn Store>,
) {
    let find = |wanted: &[(&str, String)]| {
        let wanted: Vec<(String, String)> = wanted
            .iter()
            .map(|(k, f)| (k.to_string(), f.clone()))
            .collect();
        let store = store.clone();
        async move {
            store
                .find_lease_by_token_fingerprint(&wanted)
                .await
                .unwrap()
        }
    };
    let fp = |c: &str| c.repeat(64);
    assert_eq!(find(&[]).await, None);
    assert_eq!(find(&[("default", fp("a"))]).await, None);

    let (old, new) = (LeaseId::new(), LeaseId::new());
    let grant =
        |lease: Option<LeaseId>, action: &str, outcome: Outcome, fingerprint: &str| AuditEvent {
            lease_id: lease,
            token_fingerprint: Some(fingerprint.to_owned()),
            ..audit(action, outcome)
        };
    // A grant written without key ids (before migration 0008).
    store
        .append_audit(&grant(
            Some(old),
            "lease.create",
            Outcome::Allowed,
            &fp("a"),
        ))
        .await
        .unwrap();
    // Rows with fingerprint `b` that are not grants of `new`.
    for (lease, action, outcome) in [
        (Some(old), "admin.lookup_token", Outcome::Allowed),
        (Some(old), "lease.create", Outcome::Denied),
        (None, "lease.create", Outcome::Allowed),
    ] {
        store
            .append_audit(&grant(lease, action, outcome, &fp("b")))
            .await
            .unwrap();
    }
    assert_eq!(find(&[("default", fp("b"))]).await, None);
    // The grant of `new`, under fingerprint key id `f2`.
    let chain_key = token_broker::crypto::Keyring::generate_key();
    let log = token_broker::audit::AuditLog::with_keys(
        store.clone(),
        token_broker::audit::ChainKeys::new("default", [("default".to_owned(), chain_key)])
            .unwrap(),
        "f2",
    );
    log.append(&grant(
        Some(new),
        "lease.create",
        Outcome::Allowed,
        &fp("b"),
    ))
    .await
    .unwrap();

    assert_eq!(find(&[("default", fp("a"))]).await, Some(old));
    assert_eq!(find(&[("f2", fp("a"))]).await, None, "key ids must match");
    assert_eq!(find(&[("default", fp("b"))]).await, None);
    assert_eq!(
        find(&[("default", fp("c")), ("f2", fp("b"))]).await,
        Some(new)
    );
}

// ---- managed credentials ------------------------------------------------

/// A PENDING version `version` of credential `name`, claimed by `claimer`
/// until t0 + 60 s.
fn intent(name: &str, version: i64, claimer: &str) -> CredentialVersionRecord {
    CredentialVersionRecord {
        credential: name.into(),
        version,
        state: VersionState::Pending,
        organization: Organization::parse("fabrikam").unwrap(),
        scopes: ScopeSet::parse(["vso.packaging"]).unwrap(),
        display_name: format!("tb:dep:credential:{name}:{version}"),
        authorization_id: None,
        sealed_token: None,
        create_time: t0(),
        update_time: t0(),
        valid_from: t0(),
        rotate_time: t0() + secs(20),
        expire_time: t0() + secs(28),
        revoke_at: Some(t0() + secs(28)),
        revoke_time: None,
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: Some(claimer.into()),
        claimed_until: Some(t0() + secs(60)),
    }
}

/// `pending` made CURRENT with a token sealed as `byte`.
fn activated(pending: &CredentialVersionRecord, byte: u8) -> CredentialVersionRecord {
    CredentialVersionRecord {
        state: VersionState::Current,
        authorization_id: Some(AuthorizationId::from_uuid(Uuid::new_v4())),
        sealed_token: Some(sealed(byte)),
        update_time: pending.create_time + secs(1),
        claimed_by: None,
        claimed_until: None,
        ..pending.clone()
    }
}

async fn twenty_concurrent_minters_of_one_credential_version_insert_it_once(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .insert_credential_version(&intent("feed", 1, &format!("replica-{i}")))
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    let rows = store.list_credential_versions(Some("feed")).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, VersionState::Pending);
}

async fn activating_a_version_makes_the_current_one_previous_in_one_write(store: Arc<dyn Store>) {
    let one = intent("feed", 1, "a");
    assert!(store.insert_credential_version(&one).await.unwrap());
    let one_current = activated(&one, 1);
    assert!(store
        .activate_credential_version(&one_current, "a", t0(), false)
        .await
        .unwrap());
    let two = intent("feed", 2, "b");
    assert!(store.insert_credential_version(&two).await.unwrap());
    // Only its minter can activate it.
    let two_current = activated(&two, 2);
    assert!(!store
        .activate_credential_version(&two_current, "a", t0() + secs(30), false)
        .await
        .unwrap());
    assert!(store
        .activate_credential_version(&two_current, "b", t0() + secs(30), false)
        .await
        .unwrap());
    // Not twice.
    assert!(!store
        .activate_credential_version(&two_current, "b", t0() + secs(30), false)
        .await
        .unwrap());
    // Another credential is untouched.
    let other = intent("other", 1, "a");
    store.insert_credential_version(&other).await.unwrap();
    let rows = store.list_credential_versions(None).await.unwrap();
    let names: Vec<(&str, i64)> = rows
        .iter()
        .map(|r| (r.credential.as_str(), r.version))
        .collect();
    assert_eq!(names, [("feed", 2), ("feed", 1), ("other", 1)]);
    assert_eq!(rows[0], two_current);
    assert_eq!(rows[1].state, VersionState::Previous);
    assert_eq!(rows[1].revoke_at, Some(t0() + secs(30)));
    assert_eq!(
        rows[1].sealed_token,
        Some(sealed(1)),
        "PREVIOUS keeps its token"
    );
    assert_eq!(rows[2].state, VersionState::Pending);
    // NOW: every older PREVIOUS is due at once too.
    let three = intent("feed", 3, "c");
    store.insert_credential_version(&three).await.unwrap();
    assert!(store
        .activate_credential_version(&activated(&three, 3), "c", t0() + secs(5), true)
        .await
        .unwrap());
    let rows = store.list_credential_versions(Some("feed")).await.unwrap();
    let revoke_at: Vec<Option<Timestamp>> = rows.iter().map(|r| r.revoke_at).collect();
    assert_eq!(
        revoke_at,
        [
            Some(t0() + secs(28)),
            Some(t0() + secs(5)),
            Some(t0() + secs(5))
        ]
    );
}

async fn credential_version_updates_compare_state_and_claimer(store: Arc<dyn Store>) {
    let one = intent("feed", 1, "a");
    store.insert_credential_version(&one).await.unwrap();
    let failed = CredentialVersionRecord {
        state: VersionState::Failed,
        last_error: Some("refused".into()),
        claimed_by: None,
        claimed_until: None,
        ..one.clone()
    };
    assert!(!store
        .update_credential_version(&failed, VersionState::Current, None)
        .await
        .unwrap());
    assert!(!store
        .update_credential_version(&failed, VersionState::Pending, Some("b"))
        .await
        .unwrap());
    assert!(store
        .update_credential_version(&failed, VersionState::Pending, Some("a"))
        .await
        .unwrap());
    let rows = store.list_credential_versions(Some("feed")).await.unwrap();
    assert_eq!(rows, [failed]);
}

async fn a_credential_version_is_claimed_only_without_a_live_claim(store: Arc<dyn Store>) {
    let one = intent("feed", 1, "minter");
    store.insert_credential_version(&one).await.unwrap();
    let claim = Duration::from_secs(30);
    // The minter's claim is live until t0 + 60 s.
    assert!(store
        .claim_credential_version(
            "feed",
            1,
            VersionState::Pending,
            "r",
            t0() + secs(59),
            claim
        )
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim_credential_version(
            "feed",
            1,
            VersionState::Current,
            "r",
            t0() + secs(61),
            claim
        )
        .await
        .unwrap()
        .is_none());
    let claimed = store
        .claim_credential_version(
            "feed",
            1,
            VersionState::Pending,
            "r",
            t0() + secs(61),
            claim,
        )
        .await
        .unwrap()
        .expect("a lapsed claim is taken over");
    assert_eq!(claimed.claimed_by.as_deref(), Some("r"));
    assert_eq!(claimed.claimed_until, Some(t0() + secs(91)));
    assert!(store
        .claim_credential_version(
            "feed",
            1,
            VersionState::Pending,
            "s",
            t0() + secs(62),
            claim
        )
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim_credential_version(
            "feed",
            2,
            VersionState::Pending,
            "s",
            t0() + secs(62),
            claim
        )
        .await
        .unwrap()
        .is_none());
}

async fn managed_credentials_record_absence_retirement_and_return(store: Arc<dyn Store>) {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let rows = store
        .sync_managed_credentials(&names(&["a", "b"]), t0())
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.absent_since.is_none() && r.first_seen == t0()));
    // b leaves the policy; its clock starts once and keeps its start.
    store
        .sync_managed_credentials(&names(&["a"]), t0() + secs(10))
        .await
        .unwrap();
    let rows = store
        .sync_managed_credentials(&names(&["a"]), t0() + secs(20))
        .await
        .unwrap();
    assert_eq!(rows[1].name, "b");
    assert_eq!(rows[1].absent_since, Some(t0() + secs(10)));
    assert!(!store
        .retire_managed_credential("b", t0() + secs(9), t0() + secs(20))
        .await
        .unwrap());
    assert!(!store
        .retire_managed_credential("a", t0() + secs(20), t0() + secs(20))
        .await
        .unwrap());
    assert!(store
        .retire_managed_credential("b", t0() + secs(10), t0() + secs(20))
        .await
        .unwrap());
    assert!(!store
        .retire_managed_credential("b", t0() + secs(10), t0() + secs(21))
        .await
        .unwrap());
    // An empty policy: every credential absent.
    let rows = store
        .sync_managed_credentials(&[], t0() + secs(30))
        .await
        .unwrap();
    assert_eq!(rows[0].absent_since, Some(t0() + secs(30)));
    assert_eq!(rows[1].retired_time, Some(t0() + secs(20)));
    // Put back: managed again.
    let rows = store
        .sync_managed_credentials(&names(&["a", "b"]), t0() + secs(40))
        .await
        .unwrap();
    assert!(rows
        .iter()
        .all(|r| r.absent_since.is_none() && r.retired_time.is_none()));
}

async fn credential_version_tokens_are_sealed_secrets_kept_only_while_valid(store: Arc<dyn Store>) {
    let one = intent("feed", 1, "a");
    store.insert_credential_version(&one).await.unwrap();
    let current = CredentialVersionRecord {
        sealed_token: Some(sealed_under("k1", 1)),
        ..activated(&one, 1)
    };
    store
        .activate_credential_version(&current, "a", t0(), false)
        .await
        .unwrap();
    let ids = store.sealed_key_ids().await.unwrap();
    assert!(ids.contains("k1"), "{ids:?}");
    let counts = store.count_sealed_by_key(&["k1".into()]).await.unwrap();
    assert_eq!(counts["k1"], 1);
    let page = store.list_secrets_not_under("k2", None, 10).await.unwrap();
    let owner = SecretOwner::CredentialVersion {
        credential: "feed".into(),
        version: 1,
    };
    assert_eq!(page.len(), 1, "{page:?}");
    assert_eq!(page[0].owner, owner);
    assert!(store
        .list_secrets_not_under("k2", Some(&owner), 10)
        .await
        .unwrap()
        .is_empty());
    let replaced = store
        .replace_secrets(&[SecretReplacement {
            owner: owner.clone(),
            old: sealed_under("k1", 1),
            new: sealed_under("k2", 1),
        }])
        .await
        .unwrap();
    assert_eq!(replaced, 1);
    assert!(store
        .list_secrets_not_under("k2", None, 10)
        .await
        .unwrap()
        .is_empty());
    // Revocation erases the token whatever the record holds.
    let rows = store.list_credential_versions(Some("feed")).await.unwrap();
    let revoking = CredentialVersionRecord {
        state: VersionState::Revoking,
        ..rows[0].clone()
    };
    assert!(revoking.sealed_token.is_some());
    assert!(store
        .update_credential_version(&revoking, VersionState::Current, None)
        .await
        .unwrap());
    let rows = store.list_credential_versions(Some("feed")).await.unwrap();
    assert_eq!(rows[0].sealed_token, None);
    assert!(store.sealed_key_ids().await.unwrap().is_empty());
}

/// Version `version` of `name` in `state`, last written (closed) at
/// `closed_at`, its PAT valid until `valid_to`; minted upstream (an
/// authorization id) unless `minted` is false (a FAILED mint upstream
/// never answered for).
fn stored_version(
    name: &str,
    version: i64,
    state: VersionState,
    closed_at: Timestamp,
    valid_to: Timestamp,
    minted: bool,
) -> CredentialVersionRecord {
    let minted_pat = activated(&intent(name, version, "a"), version as u8);
    CredentialVersionRecord {
        state,
        authorization_id: minted_pat.authorization_id.filter(|_| minted),
        sealed_token: minted_pat.sealed_token.filter(|_| state.holds_token()),
        update_time: closed_at,
        expire_time: valid_to,
        revoke_time: matches!(state, VersionState::Revoking | VersionState::Revoked)
            .then_some(closed_at),
        claimed_by: None,
        claimed_until: None,
        ..intent(name, version, "a")
    }
}

/// The (credential, version) keys of `rows`, in their order.
fn version_keys(rows: &[CredentialVersionRecord]) -> Vec<(String, i64)> {
    rows.iter()
        .map(|r| (r.credential.clone(), r.version))
        .collect()
}

fn key(name: &str, version: i64) -> (String, i64) {
    (name.to_owned(), version)
}

/// Retention of credential versions, as of leases: REVOKED and FAILED
/// versions that closed before the retention bound and whose PAT is past
/// its validTo (for a FAILED mint upstream never answered for, its
/// asked-for validTo a day before now) go, oldest closed first and at
/// most `limit` per call; a version closed recently, one whose validTo is
/// ahead, every live one however old, each credential's newest version
/// whatever its state, and every audit row stay.
async fn credential_version_retention_deletes_only_closed_versions_past_both_bounds_never_the_newest(
    store: Arc<dyn Store>,
) {
    use VersionState::*;
    let day = secs(24 * 3600);
    let now = t0() + day * 200;
    let closed_before = now - day * 90;
    let unrecorded_before = now - day;
    let long_ago = t0() + secs(7200);
    let past = t0() + secs(3600);
    let rows = [
        // feed: a credential in use with history.
        stored_version("feed", 1, Revoked, long_ago, past, true), // gone
        stored_version("feed", 2, Failed, long_ago + secs(1), past, false), // gone
        // A FAILED mint whose asked-for validTo is within a day of now.
        stored_version("feed", 3, Failed, long_ago, now - secs(3600), false),
        // validTo ahead.
        stored_version("feed", 4, Revoked, long_ago, now + day, true),
        // Closed within the retention.
        stored_version("feed", 5, Revoked, now - day * 10, past, true),
        stored_version("feed", 6, Revoked, long_ago + secs(2), past, true), // gone
        // Live, however old.
        stored_version("feed", 7, Revoking, long_ago, past, true),
        stored_version("feed", 8, Previous, long_ago, past, true),
        stored_version("feed", 9, Current, long_ago, past, true),
        // A later PENDING (its minter at work): still feed's newest.
        stored_version("feed", 10, Pending, long_ago, past, false),
        // retired: every version revoked long ago; the newest stays.
        stored_version("retired", 1, Revoked, long_ago + secs(3), past, true), // gone
        stored_version("retired", 2, Revoked, long_ago, past, true),
        // broken: only FAILED versions; the newest stays.
        stored_version("broken", 1, Failed, long_ago + secs(4), past, false), // gone
        stored_version("broken", 2, Failed, long_ago, past, false),
    ];
    for r in &rows {
        assert!(
            store.insert_credential_version(r).await.unwrap(),
            "{} {}",
            r.credential,
            r.version
        );
    }
    let mut event = audit("credential.mint", Outcome::Allowed);
    event.id = store.append_audit(&event).await.unwrap();

    // Nothing is due yet at t0 + 1 day.
    let early = t0() + day;
    assert_eq!(
        store
            .delete_closed_credential_versions(early - day * 90, early, early - day, 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .delete_closed_credential_versions(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        2,
        "a batch is at most its limit"
    );
    let left = version_keys(&store.list_credential_versions(None).await.unwrap());
    assert!(
        !left.contains(&key("feed", 1)),
        "oldest closed first: {left:?}"
    );
    assert!(
        !left.contains(&key("feed", 2)),
        "oldest closed first: {left:?}"
    );
    assert_eq!(
        store
            .delete_closed_credential_versions(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .delete_closed_credential_versions(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_closed_credential_versions(closed_before, now, unrecorded_before, 2)
            .await
            .unwrap(),
        0
    );
    let left = version_keys(&store.list_credential_versions(None).await.unwrap());
    assert_eq!(
        left,
        [
            key("broken", 2),
            key("feed", 10),
            key("feed", 9),
            key("feed", 8),
            key("feed", 7),
            key("feed", 5),
            key("feed", 4),
            key("feed", 3),
            key("retired", 2),
        ]
    );
    // What stays is unchanged.
    for r in store.list_credential_versions(None).await.unwrap() {
        let original = rows
            .iter()
            .find(|o| o.credential == r.credential && o.version == r.version)
            .unwrap();
        assert_eq!(&r, original);
    }
    // Audit rows are never deleted.
    assert_eq!(store.list_audit(0, 10).await.unwrap(), [event]);
}

/// Retention deletes older numbers but keeps the newest, so a minter with
/// a stale view can never mint a number again: an insert at or below the
/// newest stored number is refused, the next one goes in.
async fn a_version_number_at_or_below_the_newest_stored_is_never_inserted(store: Arc<dyn Store>) {
    let day = secs(24 * 3600);
    let now = t0() + day * 200;
    let long_ago = t0() + secs(7200);
    for v in 1..=3 {
        let r = stored_version("feed", v, VersionState::Revoked, long_ago, long_ago, true);
        assert!(store.insert_credential_version(&r).await.unwrap());
    }
    assert_eq!(
        store
            .delete_closed_credential_versions(now - day * 90, now, now - day, 100)
            .await
            .unwrap(),
        2
    );
    for v in [1, 2, 3] {
        assert!(
            !store
                .insert_credential_version(&intent("feed", v, "stale"))
                .await
                .unwrap(),
            "version {v} minted again"
        );
    }
    assert!(store
        .insert_credential_version(&intent("feed", 4, "b"))
        .await
        .unwrap());
    // Other credentials number on their own.
    assert!(store
        .insert_credential_version(&intent("other", 1, "b"))
        .await
        .unwrap());
    let left = version_keys(&store.list_credential_versions(None).await.unwrap());
    assert_eq!(left, [key("feed", 4), key("feed", 3), key("other", 1)]);
}

/// An engine pass reads every live version (PENDING, CURRENT, PREVIOUS,
/// REVOKING) of any credential, and the `recent` newest versions of each
/// credential it names, each once, in the listing's order: nothing of the
/// closed history beyond that.
async fn the_versions_in_use_are_the_live_ones_and_each_named_credentials_newest(
    store: Arc<dyn Store>,
) {
    use VersionState::*;
    let t = t0();
    let mut rows = vec![
        stored_version("feed", 1, Revoked, t, t, true),
        // The CURRENT version, behind ten failed mints.
        stored_version("feed", 2, Current, t, t, true),
    ];
    for v in 3..=12 {
        rows.push(stored_version("feed", v, Failed, t, t, false));
    }
    rows.extend([
        // Not in the policy: only its live versions.
        stored_version("gone", 1, Revoked, t, t, true),
        stored_version("gone", 2, Previous, t, t, true),
        stored_version("gone", 3, Revoking, t, t, true),
        stored_version("gone", 4, Revoked, t, t, true),
        // Live and among the newest: listed once.
        stored_version("new", 1, Pending, t, t, false),
    ]);
    for r in &rows {
        assert!(store.insert_credential_version(r).await.unwrap());
    }
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let in_use = store
        .list_credential_versions_in_use(&names(&["feed", "new", "unknown"]), 3)
        .await
        .unwrap();
    assert_eq!(
        version_keys(&in_use),
        [
            key("feed", 12),
            key("feed", 11),
            key("feed", 10),
            key("feed", 2),
            key("gone", 3),
            key("gone", 2),
            key("new", 1),
        ]
    );
    for r in &in_use {
        let original = rows
            .iter()
            .find(|o| o.credential == r.credential && o.version == r.version)
            .unwrap();
        assert_eq!(r, original, "read back field for field");
    }
    // No names: the live versions alone.
    let live = store.list_credential_versions_in_use(&[], 3).await.unwrap();
    assert_eq!(
        version_keys(&live),
        [
            key("feed", 2),
            key("gone", 3),
            key("gone", 2),
            key("new", 1)
        ]
    );
    // A credential whose versions are all closed: its newest.
    let gone = store
        .list_credential_versions_in_use(&names(&["gone"]), 1)
        .await
        .unwrap();
    assert_eq!(
        version_keys(&gone),
        [
            key("feed", 2),
            key("gone", 4),
            key("gone", 3),
            key("gone", 2),
            key("new", 1)
        ]
    );
}
