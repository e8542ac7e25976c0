//! The tamper-evident audit trail: every test runs on PostgreSQL
//! (`postgres::…`) and SQLite (`sqlite::…`), each on a fresh database, and
//! tampers with rows through a raw connection of its own, as someone with
//! write access to the database but without the chain key would.

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use common::audit::AuditDb;
use secrecy::SecretString;
use token_broker::audit::{
    parse_expected_head, verify, verify_from, verify_heads, AppendedEvent, AuditError, AuditEvent,
    AuditLog, ChainBroken, ChainKey, ChainKeys, Defect, Outcome, VerifyError, VerifyReport,
    AUDIT_TAMPER_DETECTED, CHAIN_KEY_ROTATE, SYSTEM_IDENTITY,
};
use token_broker::crypto::Keyring;
use token_broker::domain::LeaseId;
use token_broker::store::{AuditAppend, AuditKeyIds, StoredAuditRow};

on_both_stores!(
    postgres = crate::common::audit::AuditDb::postgres().await,
    sqlite = crate::common::audit::AuditDb::sqlite().await;
    an_intact_chain_verifies_up_to_the_head_the_log_reported,
    editing_any_field_of_one_row_makes_verify_name_that_row,
    deleting_a_middle_row_makes_verify_name_the_gap,
    swapping_two_rows_makes_verify_name_the_first_of_them,
    dropping_the_newest_rows_is_caught_only_against_the_expected_head,
    concurrent_appends_from_several_replicas_still_verify,
    many_callers_at_once_share_commits_and_each_gets_its_own_row,
    a_batch_longer_than_one_insert_is_one_contiguous_run_of_the_chain,
    callers_queued_behind_a_failing_commit_all_fail_and_nothing_is_written,
    a_database_writer_without_the_chain_key_cannot_rechain_an_edit,
    a_chain_made_under_one_key_does_not_verify_under_another,
    a_row_written_around_the_audit_log_is_named_by_verify,
    a_row_forged_after_the_newest_is_named_by_verify,
    a_row_without_a_mac_breaks_the_chain_even_when_every_mac_is_erased,
    a_row_written_around_the_chain_key_first_is_named_by_verify,
    an_audit_row_that_cannot_be_written_is_an_error_and_leaves_nothing_behind,
    the_chain_head_is_logged_when_asked_not_per_row,
    ids_are_never_reused_after_the_newest_rows_are_deleted,
    a_replica_detects_its_last_row_rewritten_when_the_id_counter_was_rewound,
    several_published_heads_are_each_checked,
    an_archived_trail_verifies_from_its_recorded_head,
    a_chain_rotated_from_a1_to_a2_verifies_across_the_switch_and_an_edit_on_either_side_is_caught,
    a_row_whose_chain_key_is_not_configured_is_named_as_such_and_relabelled_key_ids_as_tampering,
    chains_from_before_key_ids_keep_verifying_and_a_single_string_key_is_id_default,
    replicas_with_different_active_chain_keys_during_a_rollout_keep_one_verifiable_chain,
);

// ---- fixtures ----------------------------------------------------------

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn new_key() -> SecretString {
    Keyring::generate_key()
}

/// A keyring of the one key `key`, id `default` (as the single-string
/// `keys.audit_chain` makes).
fn chain_key(key: &SecretString) -> ChainKeys {
    ChainKey::new(key).expect("a generated key is valid").into()
}

/// The `i`-th event of a varied trail: grants, refusals and expiries, with
/// optional fields both set and unset, and sub-microsecond times.
fn event(i: i64) -> AuditEvent {
    let granted = i % 3 != 1;
    AuditEvent {
        id: 0,
        time: (t0() + chrono::Duration::nanoseconds(i * 1_000_000_123)).into(),
        identity: format!("apikey:svc{}", i % 4),
        peer: (i % 2 == 0).then(|| format!("10.0.0.{i}:5{i:04}")),
        action: [
            "lease.create",
            "lease.renew",
            "lease.revoke",
            "lease.expire",
        ][(i % 4) as usize]
            .to_owned(),
        outcome: if granted {
            Outcome::Allowed
        } else {
            Outcome::Denied
        },
        reason: (!granted).then(|| "SCOPE_NOT_ALLOWED".to_owned()),
        policy_rule: granted.then(|| format!("rule-{i}")),
        lease_id: granted.then(LeaseId::new),
        organization: Some("contoso".to_owned()),
        scopes: Some("vso.code vso.packaging".to_owned()),
        token_fingerprint: granted.then(|| format!("{i:02x}").repeat(32)),
        caller_detail: (i % 5 == 0).then(|| format!("pod=web-{i} pod_uid=p{i} sa_uid=s{i}")),
    }
}

/// Appends events 1..=n through `log`; returns what each append reported.
async fn append_n(log: &AuditLog, n: i64) -> Vec<AppendedEvent> {
    let mut appended = Vec::new();
    for i in 1..=n {
        appended.push(log.append(&event(i)).await.expect("append"));
    }
    appended
}

fn head_of(appended: &AppendedEvent) -> Option<(i64, String)> {
    Some((appended.id, appended.mac.clone()))
}

/// The chain break `verify` reports, or a panic naming what it said instead.
async fn broken(
    db: &AuditDb,
    key: &ChainKeys,
    expected_head: Option<(i64, String)>,
) -> ChainBroken {
    match verify(db.store.as_ref(), key, expected_head).await {
        Err(VerifyError::Broken(b)) => b,
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

async fn intact(
    db: &AuditDb,
    key: &ChainKeys,
    expected_head: Option<(i64, String)>,
) -> VerifyReport {
    verify(db.store.as_ref(), key, expected_head)
        .await
        .unwrap_or_else(|e| panic!("expected an intact chain, got {e}"))
}

// ---- tests -------------------------------------------------------------

async fn an_intact_chain_verifies_up_to_the_head_the_log_reported(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    assert_eq!(log.head(), None);
    let appended = append_n(&log, 7).await;

    let ids: Vec<i64> = appended.iter().map(|a| a.id).collect();
    assert_eq!(
        ids,
        (1..=7).collect::<Vec<_>>(),
        "chained ids are contiguous"
    );
    assert_eq!(log.head().as_ref(), appended.last());

    let report = intact(&db, &chain_key(&key), None).await;
    assert_eq!(report.chained_rows, 7);
    assert_eq!(report.head.as_ref(), appended.last());
    // The report's line gives the head in the form verify takes back.
    let shown = report.to_string();
    assert_eq!(
        shown,
        format!(
            "audit chain intact: 7 chained rows, head 7:{}",
            appended[6].mac
        )
    );
    let head = parse_expected_head(shown.rsplit(' ').next().unwrap()).unwrap();
    intact(&db, &chain_key(&key), Some(head)).await;
    // Any head the log reported along the way still checks out.
    intact(&db, &chain_key(&key), head_of(&appended[6])).await;
    intact(&db, &chain_key(&key), head_of(&appended[2])).await;
    // The stored rows are the events appended (time kept to the microsecond).
    let rows = db.store.list_audit(0, 100).await.unwrap();
    assert_eq!(rows[4].identity, event(5).identity);
    assert_eq!(
        rows[4].time.timestamp_micros(),
        event(5).time.timestamp_micros()
    );
}

async fn editing_any_field_of_one_row_makes_verify_name_that_row(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 5).await;
    db.exec("CREATE TABLE audit_backup AS SELECT * FROM audit_events")
        .await;

    let row2_mac = db.text(2, "mac").await.unwrap();
    let time_edit = db.earlier_time().to_owned();
    // Row 3 is a grant without a peer: set fields are changed or cleared,
    // unset ones are set.
    let edits: Vec<(&str, String)> = vec![
        ("identity", "'apikey:mallory'".into()),
        ("peer", "'10.6.6.6:443'".into()),
        ("action", "'lease.renew'".into()),
        ("outcome", "'denied'".into()),
        ("reason", "'EDITED'".into()),
        ("scopes", "NULL".into()),
        ("policy_rule", "'rule-99'".into()),
        ("lease_id", "'00000000-0000-4000-8000-000000000001'".into()),
        ("organization", "'fabrikam'".into()),
        ("scopes", "'vso.code_full'".into()),
        ("token_fingerprint", format!("'{}'", "ab".repeat(32))),
        ("caller_detail", "'pod=web-3 sa_uid=forged'".into()),
        ("time", time_edit),
        ("mac", format!("'{row2_mac}'")),
    ];
    for (column, value) in edits {
        db.exec(&format!(
            "UPDATE audit_events SET {column} = {value} WHERE id = 3"
        ))
        .await;
        let b = broken(&db, &chain_key(&key), None).await;
        assert_eq!(
            b,
            ChainBroken {
                row_id: 3,
                defect: Defect::MacMismatch
            },
            "after editing {column}"
        );
        assert!(b.to_string().contains("row 3"), "{b}");

        db.exec(&format!(
            "UPDATE audit_events SET {column} = \
             (SELECT {column} FROM audit_backup WHERE audit_backup.id = 3) WHERE id = 3"
        ))
        .await;
        intact(&db, &chain_key(&key), None).await;
    }
}

async fn deleting_a_middle_row_makes_verify_name_the_gap(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 5).await;
    db.exec("DELETE FROM audit_events WHERE id = 3").await;

    let b = broken(&db, &chain_key(&key), head_of(&appended[4])).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 4,
            defect: Defect::RowsMissing { after: 2 }
        }
    );
    assert_eq!(
        b.to_string(),
        "audit chain broken at row 4: rows after id 2 are missing (deleted)"
    );

    // Closing the gap by renumbering does not help: row 3's MAC is covered
    // by row 4's.
    if db.postgres {
        db.exec("ALTER TABLE audit_events ALTER COLUMN id SET GENERATED BY DEFAULT")
            .await;
    }
    db.exec("UPDATE audit_events SET id = 3 WHERE id = 4").await;
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 3,
            defect: Defect::MacMismatch
        }
    );
}

async fn swapping_two_rows_makes_verify_name_the_first_of_them(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 5).await;
    db.swap_rows(2, 4).await;
    assert_eq!(db.text(2, "identity").await.unwrap(), event(4).identity);

    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 2,
            defect: Defect::MacMismatch
        }
    );
}

async fn dropping_the_newest_rows_is_caught_only_against_the_expected_head(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 5).await;
    let reported_head = head_of(log.head().as_ref().unwrap());
    db.exec("DELETE FROM audit_events WHERE id >= 4").await;

    // The documented limit: what is left is a consistent, shorter chain.
    let report = intact(&db, &chain_key(&key), None).await;
    assert_eq!(report.chained_rows, 3);
    assert_eq!(report.head.as_ref(), Some(&appended[2]));

    // The head reported outside the database catches it.
    let b = broken(&db, &chain_key(&key), reported_head.clone()).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 5,
            defect: Defect::HeadMissing { newest: Some(3) }
        }
    );

    // New appends after the truncation do not hide it from that head.
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 3).await;
    broken(&db, &chain_key(&key), reported_head).await;

    // Dropping every row is caught the same way.
    db.exec("DELETE FROM audit_events").await;
    let b = broken(&db, &chain_key(&key), head_of(&appended[4])).await;
    assert_eq!(b.defect, Defect::HeadMissing { newest: None });
}

async fn concurrent_appends_from_several_replicas_still_verify(db: AuditDb) {
    const REPLICAS: usize = 4;
    const EACH: i64 = 25;
    let key = new_key();
    let mut logs = Vec::new();
    for _ in 0..REPLICAS {
        logs.push(Arc::new(AuditLog::new(
            db.another_store().await,
            chain_key(&key),
        )));
    }
    let mut tasks = Vec::new();
    for log in &logs {
        let log = log.clone();
        tasks.push(tokio::spawn(async move { append_n(&log, EACH).await }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap().into_iter().map(|a| a.id));
    }
    ids.sort_unstable();
    let total = REPLICAS as i64 * EACH;
    assert_eq!(ids, (1..=total).collect::<Vec<_>>());

    let newest = logs.iter().filter_map(|l| l.head()).max_by_key(|h| h.id);
    let report = intact(&db, &chain_key(&key), newest.as_ref().and_then(head_of)).await;
    assert_eq!(report.chained_rows, total as u64);
    assert_eq!(report.head, newest);
}

/// Group commit: callers appending at once through one log (and another
/// replica's) queue behind the commit in flight and go out together, yet
/// each gets back the row that holds its own event, ids stay contiguous
/// and the chain verifies.
async fn many_callers_at_once_share_commits_and_each_gets_its_own_row(db: AuditDb) {
    const CALLERS: i64 = 200;
    let key = new_key();
    let log = Arc::new(AuditLog::new(db.store.clone(), chain_key(&key)));
    let other = Arc::new(AuditLog::new(db.another_store().await, chain_key(&key)));
    let mut tasks = Vec::new();
    for i in 1..=CALLERS {
        let log = if i % 4 == 0 {
            other.clone()
        } else {
            log.clone()
        };
        tasks.push(tokio::spawn(async move {
            (i, log.append(&event(i)).await.expect("append"))
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        let (i, appended) = task.await.unwrap();
        let stored = db.store.list_audit(appended.id - 1, 1).await.unwrap();
        assert_eq!(stored[0].id, appended.id);
        assert_eq!(stored[0].identity, event(i).identity, "row {}", appended.id);
        assert_eq!(stored[0].peer, event(i).peer, "row {}", appended.id);
        ids.push(appended.id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=CALLERS).collect::<Vec<_>>());

    let newest = [log.head(), other.head()]
        .into_iter()
        .flatten()
        .max_by_key(|h| h.id);
    let report = intact(&db, &chain_key(&key), newest.as_ref().and_then(head_of)).await;
    assert_eq!(report.chained_rows, CALLERS as u64);
    if db.postgres {
        // Each PostgreSQL transaction stamps its rows with its own xmin:
        // fewer transactions than rows means the appends were grouped.
        let transactions: i64 = db
            .scalar("SELECT count(DISTINCT xmin::text) FROM audit_events")
            .await;
        assert!(transactions < CALLERS, "{transactions} transactions");
    }
}

async fn a_batch_longer_than_one_insert_is_one_contiguous_run_of_the_chain(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 2).await;
    let events: Vec<AuditEvent> = (3..=102).map(event).collect();
    let appends: Vec<AuditAppend> = events
        .iter()
        .map(|event| AuditAppend {
            event: event.clone(),
            lease_write: None,
        })
        .collect();
    let chain = chain_key(&key);
    let mac = |prev: Option<&str>, stored: &AuditEvent| chain.active().mac(prev, stored);
    let rows: Vec<(i64, String)> = db
        .store
        .append_audit_chained_batch(&appends, &mac)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.expect("no lease write, always written"))
        .collect();
    assert_eq!(
        rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (3..=102).collect::<Vec<_>>()
    );
    let stored = db.store.list_audit(2, 200).await.unwrap();
    assert_eq!(stored.len(), 100);
    for (row, want) in stored.iter().zip(&events) {
        assert_eq!(row.action, want.action, "row {}", row.id);
        assert_eq!(row.identity, want.identity, "row {}", row.id);
    }
    let (id, mac) = rows.last().unwrap().clone();
    let report = intact(&db, &chain, Some((id, mac))).await;
    assert_eq!(report.chained_rows, 102);
    assert!(db
        .store
        .append_audit_chained_batch(&[], &mac_of_nothing)
        .await
        .unwrap()
        .is_empty());
}

fn mac_of_nothing(_: Option<&str>, _: &AuditEvent) -> String {
    unreachable!("an empty batch computes no MAC")
}

async fn callers_queued_behind_a_failing_commit_all_fail_and_nothing_is_written(db: AuditDb) {
    let key = new_key();
    let log = Arc::new(AuditLog::new(db.store.clone(), chain_key(&key)));
    let appended = append_n(&log, 1).await;

    db.refuse_appends(true).await;
    let mut tasks = Vec::new();
    for i in 2..=40 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move { log.append(&event(i)).await }));
    }
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, AuditError::NotWritten(_)), "{err:?}");
    }
    assert_eq!(log.head().as_ref(), appended.last());
    assert_eq!(db.store.list_audit(0, 100).await.unwrap().len(), 1);

    db.refuse_appends(false).await;
    let next = log.append(&event(2)).await.unwrap();
    assert_eq!(next.id, 2);
    intact(&db, &chain_key(&key), head_of(&next)).await;
}

async fn a_database_writer_without_the_chain_key_cannot_rechain_an_edit(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 5).await;

    // Edit row 3, then recompute the MACs of rows 3..=5 with a given key,
    // exactly as the broker would, and write them back.
    async fn rechain(db: &AuditDb, with: &ChainKeys) {
        let rows = db.store.list_audit_chain(0, 100).await.unwrap();
        let mut prev = rows[1].mac.clone();
        for row in &rows[2..] {
            let mut event = row.event.as_ref().unwrap().clone();
            if row.id == 3 {
                event.identity = "apikey:mallory".into();
            }
            let mac = with
                .active()
                .mac_with_ids(prev.as_deref(), &event, &row.key_ids);
            db.exec(&format!(
                "UPDATE audit_events SET identity = '{}', mac = '{mac}' WHERE id = {}",
                event.identity, row.id
            ))
            .await;
            prev = Some(mac);
        }
    }

    rechain(&db, &chain_key(&new_key())).await;
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 3,
            defect: Defect::MacMismatch
        }
    );

    // Only the key makes a forged chain consistent: it must stay outside
    // the database.
    rechain(&db, &chain_key(&key)).await;
    intact(&db, &chain_key(&key), None).await;
}

async fn a_chain_made_under_one_key_does_not_verify_under_another(db: AuditDb) {
    let (key, other) = (new_key(), new_key());
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 3).await;

    let rows = db.store.list_audit_chain(0, 100).await.unwrap();
    for (row, appended) in rows.iter().zip(&appended) {
        assert_eq!(row.mac.as_ref(), Some(&appended.mac));
        let prev = (row.id > 1).then(|| rows[row.id as usize - 2].mac.clone().unwrap());
        let event = row.event.as_ref().unwrap();
        let ids = &row.key_ids;
        let mac = |key: &SecretString| {
            chain_key(key)
                .active()
                .mac_with_ids(prev.as_deref(), event, ids)
        };
        assert_eq!(mac(&key), appended.mac);
        assert_ne!(mac(&other), appended.mac);
    }
    let b = broken(&db, &chain_key(&other), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 1,
            defect: Defect::MacMismatch
        }
    );
}

async fn a_row_written_around_the_audit_log_is_named_by_verify(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 2).await;
    let id = db.store.append_audit(&event(3)).await.unwrap();
    assert_eq!(id, 3);
    log.append(&event(4)).await.unwrap();

    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 3,
            defect: Defect::MacMissing
        }
    );
}

async fn a_row_forged_after_the_newest_is_named_by_verify(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 5).await;
    // A copy of row 2, MAC and all, as row 6.
    let overriding = if db.postgres {
        "OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    db.exec(&format!(
        "INSERT INTO audit_events (id, time, identity, peer, action, outcome, reason, \
         policy_rule, lease_id, organization, scopes, token_fingerprint, mac) {overriding} \
         SELECT 6, time, identity, peer, action, outcome, reason, policy_rule, lease_id, \
         organization, scopes, token_fingerprint, mac FROM audit_events WHERE id = 2"
    ))
    .await;

    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 6,
            defect: Defect::MacMismatch
        }
    );
}

async fn a_row_without_a_mac_breaks_the_chain_even_when_every_mac_is_erased(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 4).await;
    intact(&db, &chain_key(&key), None).await;

    // A database writer without the key erases every MAC and edits a row:
    // the MAC-less rows must not pass as rows from before the chain.
    db.exec("UPDATE audit_events SET mac = NULL").await;
    db.exec("UPDATE audit_events SET action = 'x' WHERE id = 2")
        .await;
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 1,
            defect: Defect::MacMissing
        }
    );
}

async fn a_row_written_around_the_chain_key_first_is_named_by_verify(db: AuditDb) {
    db.store.append_audit(&event(1)).await.unwrap();
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    append_n(&log, 2).await;
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 1,
            defect: Defect::MacMissing
        }
    );
}

async fn an_audit_row_that_cannot_be_written_is_an_error_and_leaves_nothing_behind(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 2).await;

    db.refuse_appends(true).await;
    let err = log.append(&event(3)).await.unwrap_err();
    assert!(matches!(err, AuditError::NotWritten(_)), "{err:?}");
    assert_eq!(log.head().as_ref(), appended.last(), "head did not move");
    assert_eq!(db.store.list_audit(0, 100).await.unwrap().len(), 2);

    db.refuse_appends(false).await;
    let next = log.append(&event(3)).await.unwrap();
    assert_eq!(next.id, 3);
    intact(&db, &chain_key(&key), head_of(&next)).await;
}

async fn the_chain_head_is_logged_when_asked_not_per_row(db: AuditDb) {
    let captured = common::logs::CapturedLogs::start(tracing::Level::INFO);

    let log = Arc::new(AuditLog::new(db.store.clone(), chain_key(&new_key())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = {
        let log = log.clone();
        tokio::spawn(async move {
            log.run_head_log(std::time::Duration::from_secs(3600), async {
                let _ = stopped.await;
            })
            .await
        })
    };
    let appended = append_n(&log, 5).await;
    let _ = stop.send(());
    ticker.await.unwrap();
    let heads = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("audit chain head"))
            .map(str::to_owned)
            .collect()
    };
    // Five rows within one interval: no line per row.
    assert_eq!(heads(captured.text()), Vec::<String>::new());

    // At shutdown the server asks once: one line, the newest row.
    assert!(log.log_head());
    assert!(!log.log_head(), "an unchanged head is not logged again");
    let lines = heads(captured.text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    let newest = appended.last().unwrap();
    assert!(
        lines[0].contains(&format!("audit_id={}", newest.id)),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("mac={}", newest.mac)),
        "{}",
        lines[0]
    );
}

/// Counts the `audit.tamper_detected` rows `log` appends.
fn tamper_counter(log: AuditLog) -> (AuditLog, Arc<std::sync::atomic::AtomicU64>) {
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    let log = log.with_tamper_observer(Box::new(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    (log, count)
}

fn tampers(count: &std::sync::atomic::AtomicU64) -> u64 {
    count.load(std::sync::atomic::Ordering::SeqCst)
}

/// Threat model, "database writer deletes the newest rows" (docs/audit-chain.md):
/// the replica that wrote the deleted row notices at its next append (error
/// log, tamper observer, an `audit.tamper_detected` row chained onto what it
/// found, after a gap, since ids are never reused), and the head published
/// before the deletion no longer verifies.
async fn deleting_the_newest_row_then_appending_through_the_same_log_is_detected(db: AuditDb) {
    let captured = common::logs::CapturedLogs::start(tracing::Level::INFO);
    let key = new_key();
    let (log, detected) = tamper_counter(AuditLog::new(db.store.clone(), chain_key(&key)));
    let appended = append_n(&log, 3).await;
    let published = head_of(&appended[2]);
    intact(&db, &chain_key(&key), published.clone()).await;

    db.exec("DELETE FROM audit_events WHERE id = 3").await;
    // Without a new append, plain verify sees a consistent shorter chain.
    intact(&db, &chain_key(&key), None).await;
    assert_eq!(tampers(&detected), 0);

    let next = log
        .append(&event(4))
        .await
        .expect("append after the deletion");
    assert_eq!(tampers(&detected), 1);
    // Id 3 is not reused: the tamper row is 4, the caller's row 5.
    assert_eq!(next.id, 5);
    let rows = rows(&db).await;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![1, 2, 4, 5]);
    let tamper = rows[2].event.as_ref().unwrap();
    assert_eq!(tamper.action, AUDIT_TAMPER_DETECTED);
    assert_eq!(tamper.identity, SYSTEM_IDENTITY);
    assert_eq!(tamper.outcome, Outcome::Error);
    assert_eq!(tamper.reason.as_deref(), Some("ROWS_DELETED"));
    assert_eq!(
        tamper.caller_detail.as_deref(),
        Some(format!("expected=3:{} found=2:{}", appended[2].mac, appended[1].mac).as_str())
    );
    // Chained onto what it found (row 2), so the gap is on the record and
    // plain verify names it.
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 4,
            defect: Defect::RowsMissing { after: 2 }
        }
    );
    // ... and the head published before the deletion fails.
    broken(&db, &chain_key(&key), published).await;

    let text = captured.text();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("audit chain tampered"))
        .collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].contains(&format!("expected=3:{}", appended[2].mac)),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains(&format!("found=2:{}", appended[1].mac)),
        "{}",
        errors[0]
    );

    // Detected once: the next append finds its own last row intact.
    log.append(&event(5)).await.unwrap();
    assert_eq!(tampers(&detected), 1);
}

#[tokio::test]
async fn deleting_the_newest_row_then_appending_through_the_same_log_is_detected_on_postgres() {
    deleting_the_newest_row_then_appending_through_the_same_log_is_detected(
        AuditDb::postgres().await,
    )
    .await;
}

#[tokio::test]
async fn deleting_the_newest_row_then_appending_through_the_same_log_is_detected_on_sqlite() {
    deleting_the_newest_row_then_appending_through_the_same_log_is_detected(
        AuditDb::sqlite().await,
    )
    .await;
}

/// Threat model, "database writer deletes the newest rows" with no replica
/// that remembers them (a fresh process): the next ids continue above the
/// deleted ones (PostgreSQL: migration 0010; SQLite: AUTOINCREMENT), so
/// plain verify names the gap and the published head still fails.
async fn ids_are_never_reused_after_the_newest_rows_are_deleted(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 5).await;
    let published = head_of(&appended[4]);
    db.exec("DELETE FROM audit_events WHERE id >= 4").await;

    let fresh = AuditLog::new(db.another_store().await, chain_key(&key));
    let next = fresh.append(&event(6)).await.unwrap();
    assert_eq!(next.id, 6, "ids 4 and 5 are not reused");
    let b = broken(&db, &chain_key(&key), None).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 6,
            defect: Defect::RowsMissing { after: 3 }
        }
    );
    broken(&db, &chain_key(&key), published).await;

    // Deleting every row does not restart the numbering either.
    db.exec("DELETE FROM audit_events").await;
    let next = fresh.append(&event(7)).await.unwrap();
    assert!(next.id > 6, "{next:?}");
}

/// Threat model, "database writer deletes the newest rows and rewinds the
/// id counter": another process then reuses the id, but the replica that
/// wrote the row finds another MAC there (ROW_REWRITTEN), and the published
/// head fails with a MAC mismatch.
async fn a_replica_detects_its_last_row_rewritten_when_the_id_counter_was_rewound(db: AuditDb) {
    let key = new_key();
    let (log, detected) = tamper_counter(AuditLog::new(db.store.clone(), chain_key(&key)));
    let appended = append_n(&log, 3).await;
    let published = head_of(&appended[2]);
    db.exec("DELETE FROM audit_events WHERE id = 3").await;
    db.exec(if db.postgres {
        "UPDATE audit_id_high SET id = 2"
    } else {
        "UPDATE sqlite_sequence SET seq = 2 WHERE name = 'audit_events'"
    })
    .await;
    let other = AuditLog::new(db.another_store().await, chain_key(&key));
    let reused = other.append(&event(9)).await.unwrap();
    assert_eq!(reused.id, 3, "the rewound counter hands out id 3 again");
    // The rewritten chain is consistent: only heads and replicas catch it.
    intact(&db, &chain_key(&key), None).await;
    let b = broken(&db, &chain_key(&key), published).await;
    assert_eq!(
        b,
        ChainBroken {
            row_id: 3,
            defect: Defect::HeadMismatch
        }
    );

    let next = log.append(&event(4)).await.unwrap();
    assert_eq!(tampers(&detected), 1);
    assert_eq!(next.id, 5);
    let tamper = rows(&db).await[3].event.clone().unwrap();
    assert_eq!(tamper.action, AUDIT_TAMPER_DETECTED);
    assert_eq!(tamper.reason.as_deref(), Some("ROW_REWRITTEN"));
    assert_eq!(
        tamper.caller_detail,
        Some(format!(
            "expected=3:{} found=3:{}",
            appended[2].mac, reused.mac
        ))
    );
    // Chained onto what it found: the chain itself stays consistent, the
    // record of the rewrite is in it.
    intact(&db, &chain_key(&key), head_of(&next)).await;
}

/// Archiving: once the rows up to a recorded head are deleted, the rows
/// left verify from that head, and a change after it, or a wrong head, is
/// still caught.
async fn an_archived_trail_verifies_from_its_recorded_head(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 6).await;
    let recorded = head_of(&appended[2]).unwrap();
    db.exec(&format!(
        "DELETE FROM audit_events WHERE id <= {}",
        recorded.0
    ))
    .await;
    // From the first row, the chain no longer proves itself.
    assert!(verify(db.store.as_ref(), &chain_key(&key), None)
        .await
        .is_err());
    let report = verify_from(
        db.store.as_ref(),
        &chain_key(&key),
        Some(recorded.clone()),
        &[],
    )
    .await
    .expect("the rows left chain from the recorded head");
    assert_eq!(report.chained_rows, 3);
    assert_eq!(report.head.as_ref(), appended.last());

    // A head that is not the one recorded fails at the next row.
    let forged = (recorded.0, "0".repeat(64));
    match verify_from(db.store.as_ref(), &chain_key(&key), Some(forged), &[]).await {
        Err(VerifyError::Broken(b)) => assert_eq!(
            b,
            ChainBroken {
                row_id: recorded.0 + 1,
                defect: Defect::MacMismatch
            }
        ),
        other => panic!("expected a MAC mismatch, got {other:?}"),
    }
    // A row after the head deleted too: the gap shows.
    db.exec(&format!(
        "DELETE FROM audit_events WHERE id = {}",
        recorded.0 + 1
    ))
    .await;
    match verify_from(db.store.as_ref(), &chain_key(&key), Some(recorded), &[]).await {
        Err(VerifyError::Broken(b)) => assert_eq!(b.row_id, appended[4].id),
        other => panic!("expected the gap, got {other:?}"),
    }
}

/// Threat model, "verify with the history of heads": every head published
/// is checked; one that was dropped or rewritten fails by its id.
async fn several_published_heads_are_each_checked(db: AuditDb) {
    let key = new_key();
    let log = AuditLog::new(db.store.clone(), chain_key(&key));
    let appended = append_n(&log, 5).await;
    let heads: Vec<(i64, String)> = appended
        .iter()
        .map(|a| head_of(a).unwrap())
        .filter(|(id, _)| [2, 3, 5].contains(id))
        .collect();
    let report = verify_heads(db.store.as_ref(), &chain_key(&key), &heads)
        .await
        .expect("every published head is intact");
    assert_eq!(report.head.as_ref(), appended.last());

    // A head whose MAC is not the stored one fails, wherever it is listed.
    let mut wrong = heads.clone();
    wrong.insert(1, (4, "0".repeat(64)));
    match verify_heads(db.store.as_ref(), &chain_key(&key), &wrong).await {
        Err(VerifyError::Broken(b)) => assert_eq!(
            b,
            ChainBroken {
                row_id: 4,
                defect: Defect::HeadMismatch
            }
        ),
        other => panic!("expected a head mismatch, got {other:?}"),
    }

    // The newest row dropped: the older heads still hold, the newest fails.
    db.exec("DELETE FROM audit_events WHERE id = 5").await;
    verify_heads(db.store.as_ref(), &chain_key(&key), &heads[..2])
        .await
        .expect("heads 2 and 3 are still intact");
    match verify_heads(db.store.as_ref(), &chain_key(&key), &heads).await {
        Err(VerifyError::Broken(b)) => assert_eq!(
            b,
            ChainBroken {
                row_id: 5,
                defect: Defect::HeadMissing { newest: Some(4) }
            }
        ),
        other => panic!("expected a missing head, got {other:?}"),
    }
}

// ---- chain key rotation (issue 14) ------------------------------------

/// A chain keyring holding `keys` (id, key), `active` MACing new rows.
fn ring(active: &str, keys: &[(&str, &SecretString)]) -> ChainKeys {
    ChainKeys::new(
        active,
        keys.iter()
            .map(|(id, key)| (id.to_string(), (*key).clone())),
    )
    .expect("valid keys")
}

async fn rows(db: &AuditDb) -> Vec<StoredAuditRow> {
    db.store.list_audit_chain(0, 1000).await.unwrap()
}

fn chain_ids(rows: &[StoredAuditRow]) -> Vec<Option<&str>> {
    rows.iter().map(|r| r.key_ids.chain.as_deref()).collect()
}

/// Sets `column` of row `id` to `value` (SQL), verifies, and puts the old
/// value back; returns what verify said.
async fn verify_with_edit(
    db: &AuditDb,
    keys: &ChainKeys,
    id: i64,
    column: &str,
    value: &str,
) -> Result<VerifyReport, VerifyError> {
    let old = db.text(id, column).await;
    let quoted = |v: Option<String>| v.map_or("NULL".to_owned(), |v| format!("'{v}'"));
    db.exec(&format!(
        "UPDATE audit_events SET {column} = {value} WHERE id = {id}"
    ))
    .await;
    let outcome = verify(db.store.as_ref(), keys, None).await;
    db.exec(&format!(
        "UPDATE audit_events SET {column} = {} WHERE id = {id}",
        quoted(old)
    ))
    .await;
    outcome
}

/// Rows 1-3 under a1 (fingerprint key `default`), then a broker with a2
/// active: a switch row (4) and rows 5-7 under a2 (fingerprint key f2).
async fn rotated_chain(db: &AuditDb) -> (SecretString, SecretString) {
    let (k1, k2) = (new_key(), new_key());
    let before = AuditLog::new(db.store.clone(), ring("a1", &[("a1", &k1)]));
    append_n(&before, 3).await;
    let after = AuditLog::with_keys(
        db.store.clone(),
        ring("a2", &[("a1", &k1), ("a2", &k2)]),
        "f2",
    );
    let appended = append_n(&after, 3).await;
    assert_eq!(
        appended.iter().map(|a| a.id).collect::<Vec<_>>(),
        [5, 6, 7],
        "the switch row takes id 4"
    );
    (k1, k2)
}

async fn a_chain_rotated_from_a1_to_a2_verifies_across_the_switch_and_an_edit_on_either_side_is_caught(
    db: AuditDb,
) {
    let (k1, k2) = rotated_chain(&db).await;
    let stored = rows(&db).await;
    assert_eq!(
        chain_ids(&stored),
        [
            Some("a1"),
            Some("a1"),
            Some("a1"),
            Some("a2"),
            Some("a2"),
            Some("a2"),
            Some("a2")
        ]
    );
    let switch = stored[3].event.as_ref().unwrap();
    assert_eq!(switch.action, CHAIN_KEY_ROTATE);
    assert_eq!(switch.identity, SYSTEM_IDENTITY);
    assert_eq!(switch.caller_detail.as_deref(), Some("from=a1 to=a2"));
    assert_eq!(stored[3].key_ids.fingerprint, None);
    // Fingerprint key ids only where there is a fingerprint.
    for row in &stored {
        let event = row.event.as_ref().unwrap();
        let want = event
            .token_fingerprint
            .as_ref()
            .map(|_| if row.id < 4 { "default" } else { "f2" });
        assert_eq!(row.key_ids.fingerprint.as_deref(), want, "row {}", row.id);
    }
    let (chain, fingerprint) = db.store.count_audit_rows_by_key().await.unwrap();
    assert_eq!(chain, [("a1".into(), 3), ("a2".into(), 4)].into());
    assert_eq!(
        fingerprint,
        [("default".into(), 2), ("f2".into(), 2)].into()
    );

    // Either key active: verification picks each row's own key.
    let both = ring("a1", &[("a1", &k1), ("a2", &k2)]);
    let report = intact(&db, &both, None).await;
    assert_eq!(report.chained_rows, 7);
    assert_eq!(report.head.as_ref().map(|h| h.id), Some(7));
    intact(&db, &ring("a2", &[("a1", &k1), ("a2", &k2)]), None).await;

    // A row edited before the switch, and a row after it.
    for id in [2, 6] {
        let outcome = verify_with_edit(&db, &both, id, "identity", "'apikey:mallory'").await;
        assert!(
            matches!(outcome, Err(VerifyError::Broken(ChainBroken { row_id, defect: Defect::MacMismatch })) if row_id == id),
            "row {id}: {outcome:?}"
        );
    }
    // The switch row edited: no longer a switch, so the key id changes
    // without one.
    let outcome = verify_with_edit(&db, &both, 4, "identity", "'apikey:mallory'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken { row_id: 4, .. }))
        ),
        "{outcome:?}"
    );
    // The switch row's record of the switch is covered too.
    let outcome = verify_with_edit(&db, &both, 4, "caller_detail", "'from=a1 to=a3'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken { row_id: 4, .. }))
        ),
        "{outcome:?}"
    );
    // And the fingerprint key id of a row after it.
    let outcome = verify_with_edit(&db, &both, 6, "fingerprint_key_id", "'f1'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken {
                row_id: 6,
                defect: Defect::MacMismatch
            }))
        ),
        "{outcome:?}"
    );
    intact(&db, &both, None).await;
}

async fn a_row_whose_chain_key_is_not_configured_is_named_as_such_and_relabelled_key_ids_as_tampering(
    db: AuditDb,
) {
    let (k1, k2) = rotated_chain(&db).await;
    // Without a1: the first row needs it.
    let err = verify(db.store.as_ref(), &ring("a2", &[("a2", &k2)]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, VerifyError::KeyMissing { row_id: 1, key_id, checked: 0 } if key_id == "a1"),
        "{err:?}"
    );
    // Without a2: rows 1-3 verify, the switch row needs it.
    let err = verify(db.store.as_ref(), &ring("a1", &[("a1", &k1)]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, VerifyError::KeyMissing { row_id: 4, key_id, checked: 3 } if key_id == "a2"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("needs chain key \"a2\", not configured") && !text.contains("broken"),
        "{text}"
    );

    // Relabelling a row's key id, to a key held or not, is tampering.
    let both = ring("a2", &[("a1", &k1), ("a2", &k2)]);
    for (id, value) in [
        (6, "'zzz'"),
        (6, "'a1'"),
        (2, "'a2'"),
        (6, "NULL"),
        (7, "'zzz'"),
    ] {
        let outcome = verify_with_edit(&db, &both, id, "chain_key_id", value).await;
        assert!(
            matches!(&outcome, Err(VerifyError::Broken(ChainBroken { row_id, defect: Defect::KeyIdChanged { .. } })) if *row_id == id),
            "row {id} = {value}: {outcome:?}"
        );
    }
    // The switch row relabelled to another key (its detail kept): its MAC
    // no longer matches under the key it claims.
    let outcome = verify_with_edit(&db, &both, 4, "chain_key_id", "'a1'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken { row_id: 4, .. }))
        ),
        "{outcome:?}"
    );
    intact(&db, &both, None).await;
}

async fn chains_from_before_key_ids_keep_verifying_and_a_single_string_key_is_id_default(
    db: AuditDb,
) {
    let key = new_key();
    // Rows as a release before migration 0008 wrote them: no key ids,
    // MAC encoding version 1.
    let old = ChainKey::new(&key).unwrap();
    let mac = |prev: Option<&str>, stored: &AuditEvent| old.mac(prev, stored);
    let appends: Vec<AuditAppend> = (1..=3)
        .map(|i| AuditAppend {
            event: event(i),
            lease_write: None,
        })
        .collect();
    db.store
        .append_audit_chained_batch(&appends, &mac)
        .await
        .unwrap();
    // The same key as the single-string `audit_chain`: id `default`, no
    // switch row.
    append_n(&AuditLog::new(db.store.clone(), chain_key(&key)), 2).await;
    assert_eq!(
        chain_ids(&rows(&db).await),
        [None, None, None, Some("default"), Some("default")]
    );
    assert!(rows(&db).await[..3]
        .iter()
        .all(|r| r.key_ids == AuditKeyIds::default()));
    intact(&db, &chain_key(&key), None).await;
    // The same key moved to `[audit_chain_keys] default = …`.
    intact(&db, &ring("default", &[("default", &key)]), None).await;
    // Under another id it is another key as far as the rows go.
    let err = verify(db.store.as_ref(), &ring("k", &[("k", &key)]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, VerifyError::KeyMissing { row_id: 1, key_id, .. } if key_id == "default"),
        "{err:?}"
    );
    // An old row relabelled `default` (or given a fingerprint key id) no
    // longer matches: version 1 rows stay version 1.
    let outcome = verify_with_edit(&db, &chain_key(&key), 2, "chain_key_id", "'default'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken {
                row_id: 2,
                defect: Defect::MacMismatch
            }))
        ),
        "{outcome:?}"
    );
    let outcome =
        verify_with_edit(&db, &chain_key(&key), 2, "fingerprint_key_id", "'default'").await;
    assert!(
        matches!(
            &outcome,
            Err(VerifyError::Broken(ChainBroken { row_id: 2, .. }))
        ),
        "{outcome:?}"
    );

    // Rotating away from `default`.
    let k2 = new_key();
    let keys = ring("a2", &[("default", &key), ("a2", &k2)]);
    append_n(
        &AuditLog::new(
            db.store.clone(),
            ring("a2", &[("default", &key), ("a2", &k2)]),
        ),
        1,
    )
    .await;
    let stored = rows(&db).await;
    assert_eq!(stored.len(), 7);
    assert_eq!(
        stored[5].event.as_ref().unwrap().caller_detail.as_deref(),
        Some("from=default to=a2")
    );
    assert_eq!(intact(&db, &keys, None).await.chained_rows, 7);
}

async fn replicas_with_different_active_chain_keys_during_a_rollout_keep_one_verifiable_chain(
    db: AuditDb,
) {
    let (k1, k2) = (new_key(), new_key());
    let keys = || ring("a1", &[("a1", &k1), ("a2", &k2)]);
    // Mid-rollout: one replica still has a1 active, the other a2; both
    // hold both keys (step 1 of the rollout).
    let old = Arc::new(AuditLog::new(db.store.clone(), keys()));
    let new = Arc::new(AuditLog::new(
        db.another_store().await,
        ring("a2", &[("a1", &k1), ("a2", &k2)]),
    ));
    for i in 0..3 {
        old.append(&event(2 * i)).await.unwrap();
        new.append(&event(2 * i + 1)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let log = if i % 2 == 0 { old.clone() } else { new.clone() };
        tasks.push(tokio::spawn(async move { log.append(&event(i)).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stored = rows(&db).await;
    let switches = stored
        .iter()
        .filter(|r| r.event.as_ref().unwrap().action == CHAIN_KEY_ROTATE)
        .count();
    // Each change of writer in the sequential part switched the key.
    assert!(switches >= 5, "{switches} switch rows");
    assert_eq!(stored.len(), 26 + switches);
    let report = intact(&db, &keys(), None).await;
    assert_eq!(report.chained_rows as usize, stored.len());
    let (chain, _) = db.store.count_audit_rows_by_key().await.unwrap();
    assert_eq!(chain.values().sum::<u64>() as usize, stored.len());
}
