//! The one implementation of [`Store`], generic over the two backends.
//!
//! The SQL is written once: both dialects accept `$N` placeholders (sqlx
//! binds `$N` on SQLite too), row values (`(a, b) < ($1, $2)`), `NULLS
//! FIRST`, `RETURNING` and `ON CONFLICT`. What truly differs is a
//! [`Dialect`]: connecting and migrating, how a claim locks the rows it
//! takes, and how audit appends are serialized and numbered.
//!
//! Generic rather than a macro so the compiler checks one body; the price
//! is the sqlx bounds on the one `impl` block (Rust does not imply a trait's
//! where-clauses, so a helper function would have to repeat them all: the
//! few statements used by several methods are local macros instead).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Datelike;
use sqlx::{
    Arguments, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Row,
    Transaction, Type,
};
use uuid::Uuid;

use super::codec::{self, AuditRow, UuidColumn};
use super::{
    map_sqlx, AuditAppend, AuditChainer, AuditFilter, AuditKeyIds, ChainMacFn, CreateOutcome,
    IdempotencyRecord, LeaseFilter, LeaseRecord, LeaseWrite, PageCursor, ReplaceOutcome, Store,
    StoreError, StoredAuditRow, UpstreamCredential, Work, DEFAULT_KEY_ID,
};
use super::{
    CredentialSource, CredentialState, CredentialWrite, NewUpstreamCredential, RefreshRecord,
};
use super::{CredentialVersionRecord, ManagedCredentialRecord};
use super::{KeyCheck, LeaseGauges, PoolStatus, SecretOwner, SecretReplacement, StoredSecret};
use crate::crypto::Sealed;
use crate::domain::{AuditEvent, Outcome};
use crate::domain::{
    AuthorizationId, Identity, LeaseId, LeaseState, Organization, ScopeSet, Timestamp, VersionState,
};

/// A statement's count of rows written (sqlx has it per backend only).
pub(crate) trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

/// What differs between PostgreSQL and SQLite.
pub(crate) trait Dialect: Database<QueryResult: RowsAffected> {
    /// The store's name in `Debug` output.
    const STORE_NAME: &'static str;

    /// `db.system` in the store spans (OpenTelemetry semantic conventions:
    /// `postgresql`, `sqlite`).
    const DB_SYSTEM: &'static str;

    /// Ends the subquery that picks the rows a claim takes. PostgreSQL:
    /// `FOR UPDATE SKIP LOCKED`, so concurrent claimers get disjoint sets;
    /// SQLite needs nothing (one writer runs the whole statement).
    const CLAIM_LOCK: &'static str;

    /// Between the column list and `VALUES` of the audit insert, which
    /// always names the id (PostgreSQL's identity column is `GENERATED
    /// ALWAYS`).
    const AUDIT_INSERT_ID: &'static str;

    /// SQL for the last audit id handed out, 0 if none; the next is + 1,
    /// and an id is never reused. PostgreSQL: the greater of the newest
    /// row's and the high-water mark of migration 0010 (transactional, so a
    /// rolled-back append leaves no gap, which an identity sequence would);
    /// SQLite: AUTOINCREMENT's counter.
    const LAST_AUDIT_ID: &'static str;

    /// After `FROM audit_events` where the audit listing looks up late rows
    /// by time (migration 0006). SQLite keeps no statistics to tell that
    /// partial index is small, and takes an index of another filter or the
    /// id order instead: `INDEXED BY` it. PostgreSQL needs nothing (its
    /// statistics count the late rows).
    const LATE_AUDIT_ROWS: &'static str;

    /// The sealing key id of a lease's `sealed_token` (the `<key_id>` of
    /// `v1:<key_id>:<base64>`, NULL without a token): exactly the
    /// expression migration 0009 indexes (`leases_sealed_key_id_idx`), so
    /// lookups by it use that index.
    const SEALED_KEY_ID: &'static str;

    /// A statement that tells other replicas' listeners a managed
    /// credential changed (the credential's name bound as `$1`).
    /// PostgreSQL: `pg_notify` on [`super::CREDENTIALS_CHANNEL`] (it works
    /// through PgBouncer's transaction pooling too; only LISTEN does not);
    /// SQLite: none (a single replica: the process wakes its own watchers).
    const NOTIFY_CREDENTIALS: Option<&'static str>;

    /// Applies pending migrations.
    fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Migration versions not applied yet ([`super::Store::pending_migrations`]).
    fn pending_migrations(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Run in an audit append's transaction after its lease writes and
    /// before it reads the chain head, if the transaction itself does not
    /// already serialize appends: taken this late, the lock is held only
    /// for the head read, the insert and the commit. PostgreSQL: a
    /// transaction-scoped advisory lock; SQLite: none (its transaction holds
    /// the one write lock from its start).
    const SERIALIZE_AUDIT_APPEND: Option<&'static str>;

    /// Starts an audit append: a transaction that, with
    /// [`Dialect::SERIALIZE_AUDIT_APPEND`], serializes appends, so ids
    /// follow commit order and each chained row sees the MAC of the row
    /// committed just before it.
    fn begin_audit_append(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, StoreError>> + Send;

    /// Run first in a quota-checked create's transaction, with the holder
    /// bound as `$1`, if the transaction itself does not already serialize
    /// writers: then creates of one holder count and insert one after
    /// another. PostgreSQL: a transaction-scoped advisory lock on the
    /// holder; SQLite: none (see [`Dialect::begin_quota_create`]).
    const SERIALIZE_HOLDER: Option<&'static str>;

    /// Starts a quota-checked create. PostgreSQL: a plain transaction
    /// ([`Dialect::SERIALIZE_HOLDER`] follows); SQLite: one that takes the
    /// write lock up front, so the count it reads is still true when it
    /// inserts.
    fn begin_quota_create(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, StoreError>> + Send;
}

/// A value bound to and read from columns of `DB`.
pub(crate) trait Column<DB: Database>:
    for<'q> Encode<'q, DB> + Type<DB> + for<'r> Decode<'r, DB> + Send + Sync
{
}

impl<DB: Database, T> Column<DB> for T where
    T: for<'q> Encode<'q, DB> + Type<DB> + for<'r> Decode<'r, DB> + Send + Sync
{
}

/// A [`Store`] on a pool of `DB` connections: [`super::PostgresStore`] or
/// [`super::SqliteStore`].
#[derive(Clone)]
pub struct SqlStore<DB: Database> {
    pub(super) pool: Pool<DB>,
}

// Written by hand so connection settings (which may hold a password)
// never reach a log.
impl<DB: Dialect> std::fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(DB::STORE_NAME)
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl<DB: Database> SqlStore<DB> {
    /// The underlying pool (for tests and health checks).
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `$from, $from+1, ..., $from+n-1`.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most ids bound into one `IN (…)` list ([`Store::get_leases`]).
const MAX_IDS_PER_QUERY: usize = 500;

/// The columns of `leases` every update writes, in bind order.
const LEASE_MUTABLE: &str = "authorization_id, sealed_token, state, update_time, expire_time, \
     max_expire_time, revoke_time, upstream_valid_to, attempts, next_attempt_time, last_error, \
     claimed_by, claimed_until";
const LEASE_MUTABLE_COUNT: usize = 13;

/// Inserts a whole lease: the immutable columns, then [`LEASE_MUTABLE`].
static INSERT_LEASE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO leases (id, holder, organization, scopes, display_name, create_time, \
         {LEASE_MUTABLE}) VALUES ({})",
        placeholders(1, 6 + LEASE_MUTABLE_COUNT)
    )
});

/// Compare-and-set of [`LEASE_MUTABLE`] on the stored state, and on the
/// stored `update_time` when one is bound.
static UPDATE_LEASE: LazyLock<String> = LazyLock::new(|| {
    let n = LEASE_MUTABLE_COUNT;
    format!(
        "UPDATE leases SET ({LEASE_MUTABLE}) = ({}) \
         WHERE id = ${} AND state = ${} AND (${u} IS NULL OR update_time = ${u})",
        placeholders(1, n),
        n + 1,
        n + 2,
        u = n + 3,
    )
});

const AUDIT_COLUMNS: &str = "id, time, identity, peer, action, outcome, reason, policy_rule, \
     lease_id, organization, scopes, token_fingerprint, caller_detail, mac, time_high, late, \
     chain_key_id, fingerprint_key_id";
const AUDIT_COLUMN_COUNT: usize = 18;

/// How far an audit row's time may trail the newest time before it and the
/// row still lie within the id bounds a time filter derives from
/// `time_high` (migration 0006): appends taken at nearly the same moment
/// commit a little out of time order. A row further behind is `late`, and
/// the listing finds it by time alone. Larger: fewer late rows; smaller:
/// fewer rows past a range's end scanned before a page is known to be the
/// last.
const AUDIT_LATE_SLACK: Duration = Duration::from_secs(10);

/// Above every audit id: the id bound of a time filter whose end no row's
/// `time_high` reaches.
const NO_AUDIT_ID: i64 = i64::MAX;

/// A holder's live leases (`$1` the holder, `$2`..`$4` [`codec::LIVE_STATES`]):
/// the quota count, alone or under the holder's lock.
const COUNT_LIVE_LEASES: &str =
    "SELECT count(*) FROM leases WHERE holder = $1 AND state IN ($2, $3, $4)";

const SELECT_KEY: &str = "SELECT * FROM idempotency_keys WHERE holder = $1 AND request_id = $2";

/// Where each kind of work is due, as SQL over `leases` with `$1` the
/// bound returned, and the column it is ordered by.
fn due_condition(work: Work, now: Timestamp) -> (&'static str, &'static str, Timestamp) {
    match work {
        Work::Expiry => ("state = 'ACTIVE' AND expire_time <= $1", "expire_time", now),
        Work::Revocation => (
            "state IN ('REVOKING', 'REVOKE_FAILED') \
             AND (next_attempt_time IS NULL OR next_attempt_time <= $1)",
            "next_attempt_time",
            now,
        ),
        Work::Reconcile { older_than } => (
            "state = 'PENDING' AND create_time < $1",
            "create_time",
            now.saturating_sub(older_than),
        ),
    }
}

/// `now + claim_for`; an error if out of range.
fn claim_end(now: Timestamp, claim_for: Duration) -> Result<Timestamp, StoreError> {
    now.checked_add(claim_for)
        .ok_or_else(|| StoreError::Database("claim duration is out of range".into()))
}

/// A value sqlx could not encode as an argument.
fn bind_error(err: sqlx::error::BoxDynError) -> StoreError {
    StoreError::Database(err.to_string())
}

fn corrupt(err: sqlx::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// Binds `$value` as the next argument of `$args` (a `DB::Arguments`) and
/// evaluates to its placeholder `$n`: for statements built from only the
/// conditions a filter gives. Not sqlx's QueryBuilder: its arguments borrow
/// the builder, which generic code cannot shorten to the query's lifetime.
macro_rules! bind_next {
    ($args:ident, $value:expr) => {{
        $args.add($value).map_err(bind_error)?;
        format!("${}", $args.len())
    }};
}

/// The `sealed_token` a write of `lease` stores: its token while ACTIVE,
/// NULL in every other state. Every insert and update of a lease binds
/// this, so the state change and the token's erasure are one statement: a
/// lease that leaves ACTIVE (REVOKING, REVOKED, EXPIRED, FAILED,
/// REVOKE_FAILED) never keeps its sealed PAT, whichever caller wrote it.
fn stored_token(lease: &LeaseRecord) -> Option<Sealed> {
    if lease.state == LeaseState::Active {
        lease.sealed_token.clone()
    } else {
        None
    }
}

/// Binds [`LEASE_MUTABLE`] of `$lease`, in order.
macro_rules! bind_mutable {
    ($query:expr, $lease:expr) => {{
        let lease: &LeaseRecord = $lease;
        $query
            .bind(lease.authorization_id)
            .bind(stored_token(lease))
            .bind(lease.state)
            .bind(lease.update_time)
            .bind(lease.expire_time)
            .bind(lease.max_expire_time)
            .bind(lease.revoke_time)
            .bind(lease.upstream_valid_to)
            .bind(lease.attempts)
            .bind(lease.next_attempt_time)
            .bind(lease.last_error.clone())
            .bind(lease.claimed_by.clone())
            .bind(lease.claimed_until)
    }};
}

/// Runs [`INSERT_LEASE`] for `$lease` on the connection `$conn`.
macro_rules! insert_lease {
    ($conn:expr, $lease:expr) => {{
        let lease: &LeaseRecord = $lease;
        let query = sqlx::query(&INSERT_LEASE)
            .bind(lease.id)
            .bind(lease.holder.clone())
            .bind(lease.organization.clone())
            .bind(lease.scopes.clone())
            .bind(lease.display_name.clone())
            .bind(lease.create_time);
        bind_mutable!(query, lease)
            .execute($conn)
            .await
            .map_err(map_sqlx)
    }};
}

/// The idempotency key `$key` names (its holder and request_id), read in
/// the transaction `$tx`: `Result<Option<IdempotencyRecord>, StoreError>`.
macro_rules! select_key {
    ($tx:expr, $key:expr) => {{
        let key: &IdempotencyRecord = $key;
        sqlx::query_as::<DB, IdempotencyRecord>(SELECT_KEY)
            .bind(key.holder.clone())
            .bind(UuidColumn(key.request_id))
            .fetch_optional(&mut *$tx)
            .await
            .map_err(map_sqlx)
    }};
}

/// In the quota-checked create `$tx`: takes the holder's lock
/// ([`Dialect::SERIALIZE_HOLDER`]) and counts `$holder`'s live leases:
/// `Ok(Some(live))` when they are `$cap` or more, `Ok(None)` when one more
/// fits.
macro_rules! over_quota {
    ($tx:expr, $holder:expr, $cap:expr) => {{
        let holder: &Identity = $holder;
        let cap: u32 = $cap;
        let mut result: Result<Option<u64>, StoreError> = Ok(None);
        if let Some(lock) = DB::SERIALIZE_HOLDER {
            if let Err(e) = sqlx::query(lock)
                .bind(holder.clone())
                .execute(&mut *$tx)
                .await
            {
                result = Err(map_sqlx(e));
            }
        }
        if result.is_ok() {
            let [a, b, c] = codec::LIVE_STATES;
            result = sqlx::query_as::<DB, (i64,)>(COUNT_LIVE_LEASES)
                .bind(holder.clone())
                .bind(a)
                .bind(b)
                .bind(c)
                .fetch_one(&mut *$tx)
                .await
                .map_err(map_sqlx)
                .map(|(live,)| {
                    let live = u64::try_from(live).unwrap_or(0);
                    (live >= u64::from(cap)).then_some(live)
                });
        }
        result
    }};
}

/// Runs [`UPDATE_LEASE`] for `$lease` if its state is `$expected` and, if
/// `$read` (an `Option<Timestamp>`) is given, its `update_time` is that.
macro_rules! update_lease {
    ($store:expr, $lease:expr, $expected:expr, $read:expr) => {{
        let lease: &LeaseRecord = $lease;
        let read: Option<Timestamp> = $read;
        let updated = bind_mutable!(sqlx::query(&UPDATE_LEASE), lease)
            .bind(lease.id)
            .bind($expected)
            .bind(read)
            .execute(&$store.pool)
            .await
            .map_err(map_sqlx)?
            .rows_affected();
        Ok(updated == 1)
    }};
}

/// Most audit rows one INSERT statement carries: 18 binds each, within
/// SQLite's oldest bind limit (999), and few distinct statement shapes for
/// the connection's statement cache.
const AUDIT_ROWS_PER_INSERT: usize = 32;

/// `INSERT INTO audit_events (...) VALUES (...), ...` for `rows` rows.
fn audit_insert<DB: Dialect>(rows: usize) -> String {
    let values = (0..rows)
        .map(|r| {
            format!(
                "({})",
                placeholders(1 + r * AUDIT_COLUMN_COUNT, AUDIT_COLUMN_COUNT)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO audit_events ({AUDIT_COLUMNS}) {} VALUES {values}",
        DB::AUDIT_INSERT_ID
    )
}

/// How an append chains its rows.
#[derive(Clone, Copy)]
enum Linking<'a> {
    /// No MAC, no key ids ([`Store::append_audit`]).
    Unchained,
    /// A MAC from this function, no key ids
    /// ([`Store::append_audit_chained_batch`]).
    Mac(ChainMacFn<'a>),
    /// Key ids, their MAC and a switch row when the chain key changes
    /// ([`Store::append_audit_keyed_batch`]).
    Keyed(&'a dyn AuditChainer),
}

/// Appends `$appends` (a slice of [`AuditAppend`]), in order, under the
/// dialect's append serialization, in one transaction: each lease write
/// first (compare-and-set), then the events whose write applied (or that
/// have none), each with the MAC and key ids `$link` (a [`Linking`])
/// gives from the MAC before it and the event as stored (after a switch
/// row when the chain key changes), and each row's
/// `time_high` and `late` (migration 0006) from the greatest `time_high`
/// before it; evaluates to a
/// `Vec<Option<(id, mac)>>` in the same order, `None` where the lease write
/// did not apply.
macro_rules! append_audit {
    ($store:expr, $appends:expr, $link:expr) => {{
        let appends: &[AuditAppend] = $appends;
        let link: Linking<'_> = $link;
        let mut appended: Vec<Option<(i64, Option<String>)>> = Vec::with_capacity(appends.len());
        if !appends.is_empty() {
            let mut tx = DB::begin_audit_append(&$store.pool).await?;
            // Lease rows are locked in id order (a stable sort keeps two
            // writes of one lease in queue order), so two replicas' batches
            // never wait for each other's rows in a cycle.
            let mut writes: Vec<(usize, &LeaseWrite)> = appends
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.lease_write.as_ref().map(|w| (i, w)))
                .collect();
            writes.sort_by_key(|(_, w)| w.lease.id.as_uuid());
            let mut applies = vec![true; appends.len()];
            for (i, write) in writes {
                applies[i] = bind_mutable!(sqlx::query(&UPDATE_LEASE), &write.lease)
                    .bind(write.lease.id)
                    .bind(write.expected)
                    // No `update_time` condition: compare-and-set on state only.
                    .bind(None::<Timestamp>)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?
                    .rows_affected()
                    == 1;
            }
            let events: Vec<Option<&AuditEvent>> = appends
                .iter()
                .zip(&applies)
                .map(|(a, applies)| applies.then_some(&a.event))
                .collect();
            if let Some(serialize) = DB::SERIALIZE_AUDIT_APPEND {
                sqlx::query(serialize)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
            }
            #[allow(clippy::type_complexity)]
            let (last_id, mut prev, mut high, head_id, head_key_id): (
                i64,
                Option<String>,
                Option<Timestamp>,
                Option<i64>,
                Option<String>,
            ) = sqlx::query_as(&format!(
                "SELECT {} AS id, \
                 (SELECT mac FROM audit_events ORDER BY id DESC LIMIT 1) AS mac, \
                 (SELECT max(time_high) FROM audit_events) AS time_high, \
                 (SELECT max(id) FROM audit_events) AS head_id, \
                 (SELECT chain_key_id FROM audit_events ORDER BY id DESC LIMIT 1) AS chain_key_id",
                DB::LAST_AUDIT_ID
            ))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx)?;
            let mut id = last_id;
            // (event, whether it is a row no caller asked for: a switch or
            // tamper row)
            let mut written: Vec<(std::borrow::Cow<'_, AuditEvent>, bool)> = events
                .iter()
                .flatten()
                .map(|e| (std::borrow::Cow::Borrowed(*e), false))
                .collect();
            if let Linking::Keyed(chainer) = link {
                // Is the row this replica wrote last still there, as it was?
                // Not: the tail was deleted or rewritten since; record that,
                // chained onto what is found, before anything else.
                // The common case, this replica wrote the newest row, is
                // answered by the head read above: no second read.
                let head_is_ours =
                    |(id, mac): &(i64, &str)| head_id == Some(*id) && prev.as_deref() == Some(*mac);
                if let Some((last_id, last_mac)) = chainer
                    .last_appended()
                    .filter(|_| !written.is_empty())
                    .filter(|last| !head_is_ours(last))
                {
                    let at: Option<(Option<String>,)> =
                        sqlx::query_as("SELECT mac FROM audit_events WHERE id = $1")
                            .bind(last_id)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(map_sqlx)?;
                    if !at
                        .as_ref()
                        .is_some_and(|(mac,)| mac.as_deref() == Some(last_mac))
                    {
                        let found = match &at {
                            Some((mac,)) => Some((last_id, mac.as_deref())),
                            None => head_id.map(|id| (id, prev.as_deref())),
                        };
                        let tamper = chainer.tamper_event((last_id, last_mac), found);
                        written.insert(0, (std::borrow::Cow::Owned(tamper), true));
                    }
                }
                let from = head_key_id.as_deref().unwrap_or(super::DEFAULT_KEY_ID);
                if !written.is_empty() && head_id.is_some() && from != chainer.chain_key_id() {
                    written.insert(
                        0,
                        (std::borrow::Cow::Owned(chainer.switch_event(from)), true),
                    );
                }
            }
            let mut rows = Vec::with_capacity(written.len());
            for chunk in written.chunks(AUDIT_ROWS_PER_INSERT) {
                // Before the arguments, which borrow it for as long as they live.
                let insert = audit_insert::<DB>(chunk.len());
                let mut args = DB::Arguments::default();
                for (event, switch) in chunk {
                    let event: &AuditEvent = event;
                    id = id
                        .checked_add(1)
                        .ok_or_else(|| StoreError::Database("audit id space exhausted".into()))?;
                    let stored = AuditEvent {
                        id,
                        time: event.time.into(),
                        ..event.clone()
                    };
                    let (key_ids, row_mac) = match link {
                        Linking::Unchained => (AuditKeyIds::default(), None),
                        Linking::Mac(mac) => {
                            (AuditKeyIds::default(), Some(mac(prev.as_deref(), &stored)))
                        }
                        Linking::Keyed(chainer) => {
                            let key_ids = AuditKeyIds {
                                chain: Some(chainer.chain_key_id().to_owned()),
                                fingerprint: stored
                                    .token_fingerprint
                                    .is_some()
                                    .then(|| chainer.fingerprint_key_id().to_owned()),
                            };
                            let mac = chainer.mac(prev.as_deref(), &stored, &key_ids);
                            (key_ids, Some(mac))
                        }
                    };
                    args.add(id).map_err(bind_error)?;
                    args.add(event.time).map_err(bind_error)?;
                    args.add(stored.identity).map_err(bind_error)?;
                    args.add(stored.peer).map_err(bind_error)?;
                    args.add(stored.action).map_err(bind_error)?;
                    args.add(stored.outcome).map_err(bind_error)?;
                    args.add(stored.reason).map_err(bind_error)?;
                    args.add(stored.policy_rule).map_err(bind_error)?;
                    args.add(stored.lease_id).map_err(bind_error)?;
                    args.add(stored.organization).map_err(bind_error)?;
                    args.add(stored.scopes).map_err(bind_error)?;
                    args.add(stored.token_fingerprint).map_err(bind_error)?;
                    args.add(stored.caller_detail).map_err(bind_error)?;
                    args.add(row_mac.clone()).map_err(bind_error)?;
                    // Migration 0006: the running maximum of time, and
                    // whether this row trails it by more than the slack.
                    let late = high.is_some_and(|high| {
                        event
                            .time
                            .checked_add(AUDIT_LATE_SLACK)
                            .is_some_and(|time| time < high)
                    });
                    let time_high = high.map_or(event.time, |high| high.max(event.time));
                    high = Some(time_high);
                    args.add(time_high).map_err(bind_error)?;
                    args.add(late).map_err(bind_error)?;
                    args.add(key_ids.chain).map_err(bind_error)?;
                    args.add(key_ids.fingerprint).map_err(bind_error)?;
                    prev = row_mac.clone();
                    if !switch {
                        rows.push((id, row_mac));
                    }
                }
                sqlx::query_with(&insert, args)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?;
            }
            tx.commit().await.map_err(map_sqlx)?;
            let mut rows = rows.into_iter();
            appended.extend(events.iter().map(|e| e.and_then(|_| rows.next())));
        }
        appended
    }};
}

/// Every sealed token of a managed credential version, as
/// `((credential, version), sealed)` ordered by credential and version
/// (`Result<Vec<_>, StoreError>`): at most two per credential, so read whole.
macro_rules! credential_sealed {
    ($store:expr) => {
        sqlx::query_as::<_, (String, i64, Sealed)>(
            "SELECT credential, version, sealed_token FROM credential_versions \
             WHERE sealed_token IS NOT NULL ORDER BY credential, version",
        )
        .fetch_all(&$store.pool)
        .await
        .map_err(map_sqlx)
        .map(|rows| {
            rows.into_iter()
                .map(|(c, v, s)| ((c, v), s))
                .collect::<Vec<((String, i64), Sealed)>>()
        })
    };
}

/// A managed credential version's stored secret.
fn credential_secret(((credential, version), sealed): ((String, i64), Sealed)) -> StoredSecret {
    StoredSecret {
        owner: SecretOwner::CredentialVersion {
            credential,
            version,
        },
        sealed,
    }
}

/// Columns of `credential_versions`, in [`CredentialVersionRecord`] order.
const CREDENTIAL_VERSION_COLUMNS: &str = "credential, version, state, organization, scopes, \
     display_name, authorization_id, sealed_token, create_time, update_time, valid_from, \
     rotate_time, expire_time, revoke_at, revoke_time, attempts, next_attempt_time, last_error, \
     claimed_by, claimed_until";

/// The live states of a credential version, spelt exactly as the partial
/// index `credential_versions_in_use_idx` (migration 0014) spells them:
/// both backends use a partial index only for a query whose predicate
/// matches its own, and a bound parameter never does.
const LIVE_VERSION_STATES: &str = "state IN ('PENDING', 'CURRENT', 'PREVIOUS', 'REVOKING')";

/// The `sealed_token` a write of `version` stores: its token while CURRENT
/// or PREVIOUS, NULL in every other state, so leaving them erases it in
/// the same statement.
fn stored_version_token(version: &CredentialVersionRecord) -> Option<Sealed> {
    if version.state.holds_token() {
        version.sealed_token.clone()
    } else {
        None
    }
}

/// `UPDATE credential_versions` of every mutable column ($1..$15), keyed by
/// credential ($16), version ($17), expected state ($18) and, unless NULL,
/// the claimer expected to hold the row ($19).
const UPDATE_CREDENTIAL_VERSION: &str = "UPDATE credential_versions SET state = $1, \
     authorization_id = $2, sealed_token = $3, update_time = $4, valid_from = $5, \
     rotate_time = $6, expire_time = $7, revoke_at = $8, revoke_time = $9, attempts = $10, \
     next_attempt_time = $11, last_error = $12, claimed_by = $13, claimed_until = $14, \
     display_name = $15 \
     WHERE credential = $16 AND version = $17 AND state = $18 \
       AND ($19 IS NULL OR claimed_by = $19)";

/// Binds [`UPDATE_CREDENTIAL_VERSION`] for `$v` expected in state `$expected`.
macro_rules! bind_version_update {
    ($v:expr, $expected:expr, $claimer:expr) => {{
        let v: &CredentialVersionRecord = $v;
        sqlx::query(UPDATE_CREDENTIAL_VERSION)
            .bind(v.state)
            .bind(v.authorization_id)
            .bind(stored_version_token(v))
            .bind(v.update_time)
            .bind(v.valid_from)
            .bind(v.rotate_time)
            .bind(v.expire_time)
            .bind(v.revoke_at)
            .bind(v.revoke_time)
            .bind(v.attempts)
            .bind(v.next_attempt_time)
            .bind(v.last_error.clone())
            .bind(v.claimed_by.clone())
            .bind(v.claimed_until)
            .bind(v.display_name.clone())
            .bind(v.credential.clone())
            .bind(v.version)
            .bind($expected)
            .bind($claimer)
    }};
}

/// The upstream credential's sealed refresh token, if one is stored
/// (`Result<Option<Sealed>, StoreError>`).
macro_rules! upstream_sealed {
    ($store:expr) => {
        sqlx::query_scalar::<_, Sealed>("SELECT sealed FROM upstream_credentials WHERE id = 1")
            .fetch_optional(&$store.pool)
            .await
            .map_err(map_sqlx)
    };
}

#[async_trait]
impl<DB> Store for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
    Timestamp: Column<DB>,
    LeaseId: Column<DB>,
    AuthorizationId: Column<DB>,
    UuidColumn: Column<DB>,
    Identity: Column<DB>,
    Organization: Column<DB>,
    ScopeSet: Column<DB>,
    LeaseState: Column<DB>,
    VersionState: Column<DB>,
    Sealed: Column<DB>,
    Outcome: Column<DB>,
    String: Column<DB>,
    i32: Column<DB>,
    i64: Column<DB>,
    bool: Column<DB>,
    // sqlx implements `Encode` for `Option` per backend, not generically.
    Option<Timestamp>: Column<DB>,
    Option<LeaseId>: Column<DB>,
    Option<AuthorizationId>: Column<DB>,
    Option<Sealed>: Column<DB>,
    Option<String>: Column<DB>,
{
    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.migrate", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "migrate"))]
    async fn migrate(&self) -> Result<(), StoreError> {
        DB::migrate(&self.pool).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.pending_migrations", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "pending_migrations"))]
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        DB::pending_migrations(&self.pool).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.ping", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "ping"))]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.create_lease", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "create_lease"))]
    async fn create_lease(
        &self,
        lease: &LeaseRecord,
        key: Option<&IdempotencyRecord>,
        cap: Option<u32>,
    ) -> Result<CreateOutcome, StoreError> {
        if key.is_none() && cap.is_none() {
            let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
            insert_lease!(&mut *conn, lease)?;
            return Ok(CreateOutcome::Created);
        }
        // A concurrent creator with the same key makes our key insert wait
        // for its commit (PostgreSQL) or for the write lock (SQLite), then
        // do nothing; we read the winner's key, which is visible to our
        // next statement, and roll back our lease. If the winner rolled
        // back meanwhile, try again.
        for _ in 0..3 {
            let mut tx = match cap {
                Some(_) => DB::begin_quota_create(&self.pool).await?,
                None => self.pool.begin().await.map_err(map_sqlx)?,
            };
            if let Some(cap) = cap {
                // Under the holder's lock: a same-key creator that got here
                // first has committed its key (a replay, not a new lease),
                // and every other create of this holder is counted.
                if let Some(key) = key {
                    if let Some(existing) = select_key!(tx, key)? {
                        tx.rollback().await.map_err(map_sqlx)?;
                        return Ok(CreateOutcome::Existing(existing));
                    }
                }
                if let Some(live) = over_quota!(tx, &lease.holder, cap)? {
                    tx.rollback().await.map_err(map_sqlx)?;
                    return Ok(CreateOutcome::OverQuota { live });
                }
            }
            insert_lease!(&mut *tx, lease)?;
            let Some(key) = key else {
                tx.commit().await.map_err(map_sqlx)?;
                return Ok(CreateOutcome::Created);
            };
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (holder, request_id, fingerprint, lease_id, create_time) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (holder, request_id) DO NOTHING",
            )
            .bind(key.holder.clone())
            .bind(UuidColumn(key.request_id))
            .bind(key.fingerprint.clone())
            .bind(key.lease_id)
            .bind(key.create_time)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?
            .rows_affected();
            if inserted == 1 {
                tx.commit().await.map_err(map_sqlx)?;
                return Ok(CreateOutcome::Created);
            }
            let existing = select_key!(tx, key)?;
            tx.rollback().await.map_err(map_sqlx)?;
            if let Some(existing) = existing {
                return Ok(CreateOutcome::Existing(existing));
            }
        }
        Err(StoreError::Database(
            "idempotency key kept conflicting without a visible row".into(),
        ))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.replace_failed_lease", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "replace_failed_lease"))]
    async fn replace_failed_lease(
        &self,
        lease: &LeaseRecord,
        key: &IdempotencyRecord,
        failed: LeaseId,
        cap: Option<u32>,
    ) -> Result<ReplaceOutcome, StoreError> {
        let mut tx = match cap {
            Some(_) => DB::begin_quota_create(&self.pool).await?,
            None => self.pool.begin().await.map_err(map_sqlx)?,
        };
        if let Some(cap) = cap {
            if let Some(live) = over_quota!(tx, &lease.holder, cap)? {
                tx.rollback().await.map_err(map_sqlx)?;
                return Ok(ReplaceOutcome::OverQuota { live });
            }
        }
        insert_lease!(&mut *tx, lease)?;
        let repointed = sqlx::query(
            "UPDATE idempotency_keys SET lease_id = $1, fingerprint = $2 \
             WHERE holder = $3 AND request_id = $4 AND lease_id = $5",
        )
        .bind(lease.id)
        .bind(key.fingerprint.clone())
        .bind(key.holder.clone())
        .bind(UuidColumn(key.request_id))
        .bind(failed)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        if repointed == 1 {
            tx.commit().await.map_err(map_sqlx)?;
            Ok(ReplaceOutcome::Replaced)
        } else {
            tx.rollback().await.map_err(map_sqlx)?;
            Ok(ReplaceOutcome::KeyMoved)
        }
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.get_lease", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "get_lease"))]
    async fn get_lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        sqlx::query_as("SELECT * FROM leases WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.get_leases", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "get_leases"))]
    async fn get_leases(&self, ids: &[LeaseId]) -> Result<Vec<LeaseRecord>, StoreError> {
        // Each id once, even when it falls into several chunks.
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut found = Vec::with_capacity(ids.len());
        // Chunked to stay far below SQLite's bound on bound parameters.
        for chunk in ids.chunks(MAX_IDS_PER_QUERY) {
            let sql = format!(
                "SELECT * FROM leases WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query_as::<DB, LeaseRecord>(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            found.extend(query.fetch_all(&self.pool).await.map_err(map_sqlx)?);
        }
        Ok(found)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_leases", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_leases"))]
    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        after: Option<&PageCursor>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut sql = String::from("SELECT * FROM leases WHERE 1 = 1");
        let mut args = DB::Arguments::default();
        if let Some(holder) = &filter.holder {
            sql += &format!(" AND holder = {}", bind_next!(args, holder.clone()));
        }
        if let Some(org) = &filter.organization {
            sql += &format!(" AND organization = {}", bind_next!(args, org.clone()));
        }
        if !filter.states.is_empty() {
            let mut states = Vec::new();
            for state in &filter.states {
                states.push(bind_next!(args, *state));
            }
            sql += &format!(" AND state IN ({})", states.join(", "));
        }
        if let Some(cursor) = after {
            let time = bind_next!(args, cursor.create_time);
            let id = bind_next!(args, cursor.id);
            sql += &format!(" AND (create_time, id) < ({time}, {id})");
        }
        sql += &format!(
            " ORDER BY create_time DESC, id DESC LIMIT {}",
            bind_next!(args, i64::from(limit))
        );
        sqlx::query_as_with(&sql, args)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.update_lease", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "update_lease"))]
    async fn update_lease(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
    ) -> Result<bool, StoreError> {
        update_lease!(self, lease, expected, None)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.update_lease_unchanged", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "update_lease_unchanged"))]
    async fn update_lease_unchanged(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
        read_update_time: Timestamp,
    ) -> Result<bool, StoreError> {
        update_lease!(self, lease, expected, Some(read_update_time))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.get_idempotency", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "get_idempotency"))]
    async fn get_idempotency(
        &self,
        holder: &Identity,
        request_id: Uuid,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        sqlx::query_as(SELECT_KEY)
            .bind(holder.clone())
            .bind(UuidColumn(request_id))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.claim_due", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "claim_due"))]
    async fn claim_due(
        &self,
        work: Work,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let (due, order_by, due_bound) = due_condition(work, now);
        // One statement, committed on return: rows another replica holds
        // are skipped (PostgreSQL) or wait for its commit (SQLite), rows it
        // has claimed are not due.
        let sql = format!(
            "UPDATE leases SET claimed_by = $2, claimed_until = $3 WHERE id IN ( \
               SELECT id FROM leases WHERE {due} \
                 AND (claimed_until IS NULL OR claimed_until <= $4) \
               ORDER BY {order_by} NULLS FIRST, id LIMIT $5 {}) \
             RETURNING *",
            DB::CLAIM_LOCK
        );
        let mut leases: Vec<LeaseRecord> = sqlx::query_as(&sql)
            .bind(due_bound)
            .bind(claimer.to_owned())
            .bind(claim_end(now, claim_for)?)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        codec::sort_due(&mut leases, work);
        Ok(leases)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.release_claim", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "release_claim"))]
    async fn release_claim(&self, id: LeaseId, claimer: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leases SET claimed_by = NULL, claimed_until = NULL \
             WHERE id = $1 AND claimed_by = $2",
        )
        .bind(id)
        .bind(claimer.to_owned())
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.delete_closed_leases", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "delete_closed_leases"))]
    async fn delete_closed_leases(
        &self,
        closed_before: Timestamp,
        valid_to_before: Timestamp,
        unrecorded_valid_to_before: Timestamp,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // SQLite: the write lock from the start, so the rows picked are
        // still the ones deleted; PostgreSQL: the picked rows are locked
        // (a concurrent run skips them).
        let mut tx = DB::begin_quota_create(&self.pool).await?;
        let sql = format!(
            "SELECT id FROM leases WHERE state IN ($1, $2, $3) AND update_time < $4 \
               AND ((upstream_valid_to IS NOT NULL AND upstream_valid_to < $5) \
                 OR (upstream_valid_to IS NULL AND max_expire_time < $6)) \
             ORDER BY update_time, id LIMIT $7 {}",
            DB::CLAIM_LOCK
        );
        let ids: Vec<(LeaseId,)> = sqlx::query_as(&sql)
            .bind(LeaseState::Revoked)
            .bind(LeaseState::Expired)
            .bind(LeaseState::Failed)
            .bind(closed_before)
            .bind(valid_to_before)
            .bind(unrecorded_valid_to_before)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in ids.chunks(MAX_IDS_PER_QUERY) {
            let list = placeholders(1, chunk.len());
            // The keys first: each references its lease.
            for (table, column) in [("idempotency_keys", "lease_id"), ("leases", "id")] {
                let sql = format!("DELETE FROM {table} WHERE {column} IN ({list})");
                let mut query = sqlx::query::<DB>(&sql);
                for (id,) in chunk {
                    query = query.bind(*id);
                }
                let done = query
                    .execute(&mut *tx)
                    .await
                    .map_err(map_sqlx)?
                    .rows_affected();
                if table == "leases" {
                    deleted += done;
                }
            }
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(deleted)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.count_live_leases", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "count_live_leases"))]
    async fn count_live_leases(&self, holder: &Identity) -> Result<u64, StoreError> {
        let [a, b, c] = codec::LIVE_STATES;
        let (count,): (i64,) = sqlx::query_as(COUNT_LIVE_LEASES)
            .bind(holder.clone())
            .bind(a)
            .bind(b)
            .bind(c)
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(count as u64)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.count_leases_in_state", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "count_leases_in_state"))]
    async fn count_leases_in_state(&self, state: LeaseState) -> Result<u64, StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM leases WHERE state = $1")
            .bind(state)
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(count as u64)
    }

    async fn lease_gauges(&self, now: Timestamp) -> Result<LeaseGauges, StoreError> {
        let by_state: Vec<(LeaseState, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM leases GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(map_sqlx)?;
        let (due, _, bound) = due_condition(Work::Revocation, now);
        let (queue,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM leases WHERE {due}"))
            .bind(bound)
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        let oldest: Option<(Option<Timestamp>, Timestamp)> = sqlx::query_as(&format!(
            "SELECT next_attempt_time, update_time FROM leases WHERE {due} \
             ORDER BY COALESCE(next_attempt_time, update_time) LIMIT 1"
        ))
        .bind(bound)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(LeaseGauges {
            by_state: by_state
                .into_iter()
                .map(|(state, n)| (state, u64::try_from(n).unwrap_or(0)))
                .collect(),
            revocation_queue: u64::try_from(queue).unwrap_or(0),
            revocation_oldest_due: oldest.map(|(next, updated)| next.unwrap_or(updated)),
        })
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        Some(PoolStatus {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
        })
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.claim_lease", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "claim_lease"))]
    async fn claim_lease(
        &self,
        id: LeaseId,
        expected: LeaseState,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        unchanged_before: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE leases SET claimed_by = $2, claimed_until = $3 \
             WHERE id = $1 AND (claimed_until IS NULL OR claimed_until <= $4) \
               AND update_time < $5 AND state = $6",
        )
        .bind(id)
        .bind(claimer.to_owned())
        .bind(claim_end(now, claim_for)?)
        .bind(now)
        .bind(unchanged_before)
        .bind(expected)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.lease_organizations", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "lease_organizations"))]
    async fn lease_organizations(&self) -> Result<Vec<Organization>, StoreError> {
        let rows: Vec<(Organization,)> =
            sqlx::query_as("SELECT DISTINCT organization FROM leases ORDER BY organization")
                .fetch_all(&self.pool)
                .await
                .map_err(map_sqlx)?;
        Ok(rows.into_iter().map(|(org,)| org).collect())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.claim_job", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "claim_job"))]
    async fn claim_job(
        &self,
        name: &str,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        interval: Duration,
    ) -> Result<bool, StoreError> {
        // A concurrent upsert on the same name waits for this one's commit
        // and then sees the live claim, so it claims nothing; an upsert
        // whose WHERE fails returns no row.
        let claimed: Option<(String,)> = sqlx::query_as(
            "INSERT INTO background_jobs AS j (name, claimed_by, claimed_until) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
               SET claimed_by = excluded.claimed_by, claimed_until = excluded.claimed_until \
               WHERE (j.claimed_until IS NULL OR j.claimed_until <= $4) \
                 AND (j.last_run_time IS NULL OR j.last_run_time <= $5) \
             RETURNING name",
        )
        .bind(name.to_owned())
        .bind(claimer.to_owned())
        .bind(claim_end(now, claim_for)?)
        .bind(now)
        .bind(now.saturating_sub(interval))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(claimed.is_some())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.finish_job", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "finish_job"))]
    async fn finish_job(
        &self,
        name: &str,
        claimer: &str,
        run_time: Timestamp,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE background_jobs \
             SET last_run_time = $3, claimed_by = NULL, claimed_until = NULL \
             WHERE name = $1 AND claimed_by = $2",
        )
        .bind(name.to_owned())
        .bind(claimer.to_owned())
        .bind(run_time)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.append_audit", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "append_audit"))]
    async fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError> {
        let append = AuditAppend {
            event: event.clone(),
            lease_write: None,
        };
        let appended = append_audit!(self, std::slice::from_ref(&append), Linking::Unchained);
        appended
            .into_iter()
            .next()
            .flatten()
            .map(|(id, _)| id)
            .ok_or_else(|| StoreError::Database("audit append returned no row".into()))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.append_audit_chained_batch", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "append_audit_chained_batch"))]
    async fn append_audit_chained_batch(
        &self,
        appends: &[AuditAppend],
        mac: ChainMacFn<'_>,
    ) -> Result<Vec<Option<(i64, String)>>, StoreError> {
        let appended = append_audit!(self, appends, Linking::Mac(mac));
        Ok(appended
            .into_iter()
            .map(|row| row.map(|(id, mac)| (id, mac.unwrap_or_default())))
            .collect())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.append_audit_keyed_batch", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "append_audit_keyed_batch"))]
    async fn append_audit_keyed_batch(
        &self,
        appends: &[AuditAppend],
        chainer: &dyn AuditChainer,
    ) -> Result<Vec<Option<(i64, String)>>, StoreError> {
        let appended = append_audit!(self, appends, Linking::Keyed(chainer));
        Ok(appended
            .into_iter()
            .map(|row| row.map(|(id, mac)| (id, mac.unwrap_or_default())))
            .collect())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.newest_audit_row", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "newest_audit_row"))]
    async fn newest_audit_row(&self) -> Result<Option<(i64, Option<String>)>, StoreError> {
        sqlx::query_as("SELECT id, mac FROM audit_events ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.find_lease_by_token_fingerprint", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "find_lease_by_token_fingerprint"))]
    async fn find_lease_by_token_fingerprint(
        &self,
        fingerprints: &[(String, String)],
    ) -> Result<Option<LeaseId>, StoreError> {
        if fingerprints.is_empty() {
            return Ok(None);
        }
        // Declared before the arguments, which borrow it until run.
        let mut sql = String::new();
        let mut args = DB::Arguments::default();
        let action = bind_next!(args, crate::audit::LEASE_CREATE.to_owned());
        let allowed = bind_next!(args, Outcome::Allowed);
        let mut wanted = Vec::with_capacity(fingerprints.len());
        for (_, fingerprint) in fingerprints {
            wanted.push(bind_next!(args, fingerprint.clone()));
        }
        // The fingerprint index finds the rows (`action || ''` and `+id`
        // keep both planners off the action and id indexes, which would
        // walk every grant); the key id is checked here, on the few found.
        sql += &format!(
            "SELECT lease_id, COALESCE(fingerprint_key_id, 'default') AS key_id, token_fingerprint \
             FROM audit_events \
             WHERE token_fingerprint IN ({}) AND action || '' = {action} AND outcome = {allowed} \
               AND lease_id IS NOT NULL \
             ORDER BY +id LIMIT 100",
            wanted.join(", ")
        );
        let rows: Vec<(LeaseId, String, String)> = sqlx::query_as_with(&sql, args)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(rows
            .into_iter()
            .find(|(_, key_id, fingerprint)| {
                fingerprints
                    .iter()
                    .any(|(k, f)| k == key_id && f == fingerprint)
            })
            .map(|(lease, _, _)| lease))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_audit_chain", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_audit_chain"))]
    async fn list_audit_chain(
        &self,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredAuditRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        let optional = |row: &DB::Row, name: &str| match row.try_get::<Option<String>, _>(name) {
            Err(sqlx::Error::ColumnNotFound(_)) => Ok(None),
            other => other.map_err(corrupt),
        };
        rows.iter()
            .map(|row| {
                Ok(StoredAuditRow {
                    id: row.try_get("id").map_err(corrupt)?,
                    event: AuditRow::from_row(row).map(Into::into).map_err(corrupt),
                    mac: row.try_get("mac").map_err(corrupt)?,
                    // A database not yet migrated to 0008 (a backup being
                    // verified) has no key ids: every row is `default`.
                    key_ids: AuditKeyIds {
                        chain: optional(row, "chain_key_id")?,
                        fingerprint: optional(row, "fingerprint_key_id")?,
                    },
                })
            })
            .collect()
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_audit_matching", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_audit_matching"))]
    async fn list_audit_matching(
        &self,
        filter: &AuditFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        // Built like list_leases: only the given conditions, so each can use
        // its index (a `$n IS NULL OR …` form defeats PostgreSQL's plans).
        // Declared before the arguments, which borrow it until run.
        let mut sql = String::new();
        let mut args = DB::Arguments::default();
        let after = bind_next!(args, after_id);
        let mut matching = String::new();
        let start = match filter.start_time {
            Some(t) => Some(bind_next!(args, t)),
            None => None,
        };
        if let Some(start) = &start {
            matching += &format!(" AND time >= {start}");
        }
        if let Some(t) = filter.end_time {
            matching += &format!(" AND time < {}", bind_next!(args, t));
        }
        if let Some(identity) = &filter.identity {
            matching += &format!(" AND identity = {}", bind_next!(args, identity.clone()));
        }
        if let Some(action) = &filter.action {
            matching += &format!(" AND action = {}", bind_next!(args, action.clone()));
        }
        if let Some(lease) = filter.lease_id {
            matching += &format!(" AND lease_id = {}", bind_next!(args, lease));
        }
        let limit = bind_next!(args, i64::from(limit));
        sql += &if start.is_none() && filter.end_time.is_none() {
            format!(
                "SELECT * FROM audit_events WHERE id > {after}{matching} ORDER BY id LIMIT {limit}"
            )
        } else {
            // A time range as id bounds (migration 0006): every row before
            // the first whose time_high reaches the start is earlier than
            // the start, and from the first whose time_high passes the end
            // by the slack on, only late rows are earlier than the end.
            let first_id = |bound: &str| {
                format!(
                    "(SELECT id FROM audit_events WHERE time_high >= {bound} \
                     ORDER BY time_high, id LIMIT 1)"
                )
            };
            let mut bounds = String::new();
            if let Some(start) = &start {
                bounds += &format!(" AND id >= {}", first_id(start));
            }
            // Past year 9999 the text form of a time no longer sorts (SQLite).
            let beyond_end = filter
                .end_time
                .and_then(|t| t.checked_add(AUDIT_LATE_SLACK))
                .filter(|t| t.as_datetime().year() <= 9999);
            if let Some(t) = beyond_end {
                bounds += &format!(
                    " AND id < COALESCE({}, {NO_AUDIT_ID})",
                    first_id(&bind_next!(args, t))
                );
            }
            // Late rows, wherever their ids lie, by time through their
            // partial index (`+id` keeps PostgreSQL off the id order even
            // while its statistics are stale).
            let late_rows = DB::LATE_AUDIT_ROWS;
            format!(
                "SELECT * FROM ( \
                   SELECT * FROM (SELECT * FROM audit_events \
                                  WHERE NOT late{bounds} AND id > {after}{matching} \
                                  ORDER BY id LIMIT {limit}) AS steady \
                   UNION ALL \
                   SELECT * FROM (SELECT * FROM audit_events {late_rows} \
                                  WHERE late AND +id > {after}{matching} \
                                  ORDER BY +id LIMIT {limit}) AS late_rows \
                 ) AS page ORDER BY id LIMIT {limit}"
            )
        };
        let rows: Vec<AuditRow> = sqlx::query_as_with(&sql, args)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.get_meta", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "get_meta"))]
    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
            .bind(key.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(row.map(|(value,)| value))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.put_meta_if_absent", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "put_meta_if_absent"))]
    async fn put_meta_if_absent(&self, key: &str, value: &str) -> Result<String, StoreError> {
        // A concurrent insert of the same key waits for the first to commit,
        // then does nothing; the read after it sees the winner's value.
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key.to_owned())
            .bind(value.to_owned())
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        self.get_meta(key)
            .await?
            .ok_or_else(|| StoreError::Database(format!("meta key {key:?} vanished")))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.load_upstream_credential", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "load_upstream_credential"))]
    async fn load_upstream_credential(&self) -> Result<Option<UpstreamCredential>, StoreError> {
        let row: Option<CredentialRow> = sqlx::query_as(
            "SELECT version, sealed, update_time, account, source, last_refresh_time, state, \
             last_error FROM upstream_credentials",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        row.map(CredentialRow::into_credential).transpose()
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.save_upstream_credential", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "save_upstream_credential"))]
    async fn save_upstream_credential(
        &self,
        new: &NewUpstreamCredential,
        write: CredentialWrite<'_>,
        now: Timestamp,
    ) -> Result<Option<i64>, StoreError> {
        let refreshed = new.refreshed.then_some(now);
        let source = new.source.as_str();
        let version: Option<i64> = match write {
            CredentialWrite::Replace => sqlx::query_scalar(
                "INSERT INTO upstream_credentials (id, version, sealed, update_time, account, \
                 source, last_refresh_time, state, last_error) \
                 VALUES (1, 1, $1, $2, $3, $4, $5, 'OK', NULL) \
                 ON CONFLICT (id) DO UPDATE SET version = upstream_credentials.version + 1, \
                 sealed = excluded.sealed, update_time = excluded.update_time, \
                 account = excluded.account, source = excluded.source, \
                 last_refresh_time = excluded.last_refresh_time, state = 'OK', last_error = NULL \
                 RETURNING version",
            )
            .bind(new.sealed.clone())
            .bind(now)
            .bind(new.account.clone())
            .bind(source.to_owned())
            .bind(refreshed)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?,
            CredentialWrite::Rotate { expected_version } => sqlx::query_scalar(
                "UPDATE upstream_credentials SET version = version + 1, sealed = $1, \
                 update_time = $2, account = COALESCE($3, account), source = $4, \
                 last_refresh_time = COALESCE($5, last_refresh_time), state = 'OK', \
                 last_error = NULL WHERE id = 1 AND version = $6 RETURNING version",
            )
            .bind(new.sealed.clone())
            .bind(now)
            .bind(new.account.clone())
            .bind(source.to_owned())
            .bind(refreshed)
            .bind(expected_version)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?,
            CredentialWrite::AdoptConfigured { digest } => {
                // A row from before migration 0007 holds a rotation newer
                // than any configured value: record the value, keep the row.
                let recorded = sqlx::query(
                    "UPDATE upstream_credentials SET configured_digest = $1 \
                     WHERE id = 1 AND configured_digest = 'legacy'",
                )
                .bind(digest.to_owned())
                .execute(&self.pool)
                .await
                .map_err(map_sqlx)?
                .rows_affected();
                if recorded == 1 {
                    return Ok(None);
                }
                sqlx::query_scalar(
                    "INSERT INTO upstream_credentials (id, version, sealed, update_time, account, \
                     source, last_refresh_time, state, last_error, configured_digest) \
                     VALUES (1, 1, $1, $2, $3, $4, $5, 'OK', NULL, $6) \
                     ON CONFLICT (id) DO UPDATE SET version = upstream_credentials.version + 1, \
                     sealed = excluded.sealed, update_time = excluded.update_time, \
                     account = excluded.account, source = excluded.source, \
                     last_refresh_time = excluded.last_refresh_time, state = 'OK', \
                     last_error = NULL, configured_digest = excluded.configured_digest \
                     WHERE upstream_credentials.configured_digest IS NULL \
                     OR upstream_credentials.configured_digest <> excluded.configured_digest \
                     RETURNING version",
                )
                .bind(new.sealed.clone())
                .bind(now)
                .bind(new.account.clone())
                .bind(source.to_owned())
                .bind(refreshed)
                .bind(digest.to_owned())
                .fetch_optional(&self.pool)
                .await
                .map_err(map_sqlx)?
            }
        };
        Ok(version)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.record_upstream_refresh", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "record_upstream_refresh"))]
    async fn record_upstream_refresh(
        &self,
        version: i64,
        record: &RefreshRecord,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let query = match record {
            RefreshRecord::Succeeded { account } => sqlx::query(
                "UPDATE upstream_credentials SET last_refresh_time = $1, state = 'OK', \
                 last_error = NULL, account = COALESCE($2, account) \
                 WHERE id = 1 AND version = $3",
            )
            .bind(now)
            .bind(account.clone()),
            RefreshRecord::Refused { error } => sqlx::query(
                "UPDATE upstream_credentials SET state = 'FAILING', last_error = $1 \
                 WHERE id = 1 AND version = $2",
            )
            .bind(error.clone()),
            RefreshRecord::Unavailable { error } => sqlx::query(
                "UPDATE upstream_credentials SET last_error = $1 WHERE id = 1 AND version = $2",
            )
            .bind(error.clone()),
        };
        let written = query
            .bind(version)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?
            .rows_affected();
        Ok(written == 1)
    }
    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.record_key_checks", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "record_key_checks"))]
    async fn record_key_checks(
        &self,
        checks: &[KeyCheck],
        now: Timestamp,
    ) -> Result<Vec<KeyCheck>, StoreError> {
        // A concurrent insert of the same key waits for the first to commit,
        // then does nothing; the read after it sees the winner's value.
        for check in checks {
            sqlx::query(
                "INSERT INTO key_checks (purpose, key_id, check_value, create_time) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (purpose, key_id) DO NOTHING",
            )
            .bind(check.purpose.clone())
            .bind(check.key_id.clone())
            .bind(check.check_value.clone())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        }
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT purpose, key_id, check_value FROM key_checks ORDER BY purpose, key_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|(purpose, key_id, check_value)| KeyCheck {
                purpose,
                key_id,
                check_value,
            })
            .collect())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.sealed_key_ids", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "sealed_key_ids"))]
    async fn sealed_key_ids(&self) -> Result<BTreeSet<String>, StoreError> {
        // A skip scan over leases_sealed_key_id_idx: the next key id after
        // the last one found, one index lookup per key id in use.
        let next = format!(
            "SELECT {k} FROM leases WHERE {k} > $1 ORDER BY {k} LIMIT 1",
            k = DB::SEALED_KEY_ID
        );
        let mut ids = BTreeSet::new();
        let mut last = String::new();
        while let Some(id) = sqlx::query_scalar::<_, String>(&next)
            .bind(last.clone())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?
        {
            ids.insert(id.clone());
            last = id;
        }
        if let Some(sealed) = upstream_sealed!(self)? {
            ids.insert(sealed.key_id);
        }
        // Managed credentials keep a token for at most two versions each.
        for sealed in credential_sealed!(self)? {
            ids.insert(sealed.1.key_id);
        }
        Ok(ids)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.count_sealed_by_key", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "count_sealed_by_key"))]
    async fn count_sealed_by_key(
        &self,
        key_ids: &[String],
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let count = format!(
            "SELECT count(*) FROM leases WHERE {} = $1",
            DB::SEALED_KEY_ID
        );
        let credential_key = upstream_sealed!(self)?.map(|s| s.key_id);
        let versions = credential_sealed!(self)?;
        let mut counts = BTreeMap::new();
        for id in key_ids {
            let leases: i64 = sqlx::query_scalar(&count)
                .bind(id.clone())
                .fetch_one(&self.pool)
                .await
                .map_err(map_sqlx)?;
            let credential = u64::from(credential_key.as_deref() == Some(id.as_str()));
            let versions = versions.iter().filter(|(_, s)| &s.key_id == id).count() as u64;
            counts.insert(
                id.clone(),
                u64::try_from(leases).unwrap_or_default() + credential + versions,
            );
        }
        Ok(counts)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_secrets_not_under", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_secrets_not_under"))]
    async fn list_secrets_not_under(
        &self,
        key_id: &str,
        after: Option<&SecretOwner>,
        limit: u32,
    ) -> Result<Vec<StoredSecret>, StoreError> {
        let mut page = Vec::new();
        if after.is_none() && limit > 0 {
            if let Some(sealed) = upstream_sealed!(self)? {
                if sealed.key_id != key_id {
                    page.push(StoredSecret {
                        owner: SecretOwner::UpstreamCredential,
                        sealed,
                    });
                }
            }
        }
        // Managed credential versions come last, by (credential, version).
        if let Some(SecretOwner::CredentialVersion {
            credential,
            version,
        }) = after
        {
            let after = (credential.clone(), *version);
            page.extend(
                credential_sealed!(self)?
                    .into_iter()
                    .filter(|(owner, sealed)| sealed.key_id != key_id && *owner > after)
                    .take(usize::try_from(limit).unwrap_or(usize::MAX))
                    .map(credential_secret),
            );
            return Ok(page);
        }
        let left = i64::from(limit) - page.len() as i64;
        if left == 0 {
            return Ok(page);
        }
        let k = DB::SEALED_KEY_ID;
        let rows: Vec<(LeaseId, Sealed)> = match after {
            Some(SecretOwner::CredentialVersion { .. }) => unreachable!("handled above"),
            Some(SecretOwner::Lease(after)) => {
                sqlx::query_as(&format!(
                    "SELECT id, sealed_token FROM leases WHERE {k} <> $1 AND id > $2 \
                     ORDER BY id LIMIT $3"
                ))
                .bind(key_id.to_owned())
                .bind(*after)
                .bind(left)
                .fetch_all(&self.pool)
                .await
            }
            None | Some(SecretOwner::UpstreamCredential) => {
                sqlx::query_as(&format!(
                    "SELECT id, sealed_token FROM leases WHERE {k} <> $1 ORDER BY id LIMIT $2"
                ))
                .bind(key_id.to_owned())
                .bind(left)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(map_sqlx)?;
        let leases_done = (rows.len() as i64) < left;
        page.extend(rows.into_iter().map(|(id, sealed)| StoredSecret {
            owner: SecretOwner::Lease(id),
            sealed,
        }));
        if leases_done {
            let left = usize::try_from(limit).unwrap_or(usize::MAX) - page.len();
            page.extend(
                credential_sealed!(self)?
                    .into_iter()
                    .filter(|(_, sealed)| sealed.key_id != key_id)
                    .take(left)
                    .map(credential_secret),
            );
        }
        Ok(page)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.replace_secrets", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "replace_secrets"))]
    async fn replace_secrets(&self, replacements: &[SecretReplacement]) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let mut replaced = 0;
        for r in replacements {
            let done =
                match &r.owner {
                    SecretOwner::Lease(id) => sqlx::query(
                        "UPDATE leases SET sealed_token = $1 WHERE id = $2 AND sealed_token = $3",
                    )
                    .bind(r.new.clone())
                    .bind(*id)
                    .bind(r.old.clone())
                    .execute(&mut *tx)
                    .await,
                    SecretOwner::UpstreamCredential => sqlx::query(
                        "UPDATE upstream_credentials SET sealed = $1 WHERE id = 1 AND sealed = $2",
                    )
                    .bind(r.new.clone())
                    .bind(r.old.clone())
                    .execute(&mut *tx)
                    .await,
                    SecretOwner::CredentialVersion {
                        credential,
                        version,
                    } => {
                        sqlx::query(
                            "UPDATE credential_versions SET sealed_token = $1 \
                         WHERE credential = $2 AND version = $3 AND sealed_token = $4",
                        )
                        .bind(r.new.clone())
                        .bind(credential.clone())
                        .bind(*version)
                        .bind(r.old.clone())
                        .execute(&mut *tx)
                        .await
                    }
                }
                .map_err(map_sqlx)?;
            replaced += done.rows_affected();
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(replaced)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.count_audit_rows_by_key", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "count_audit_rows_by_key"))]
    async fn count_audit_rows_by_key(
        &self,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>), StoreError> {
        let count = |n: i64| u64::try_from(n).unwrap_or_default();
        let (mut chain, mut fingerprint) = (BTreeMap::new(), BTreeMap::new());
        // Grouped by the bare columns (NULL: `default`, mapped here), so an
        // index on (chain_key_id, fingerprint_key_id) serves the grouping.
        let rows: Vec<(Option<String>, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT chain_key_id, fingerprint_key_id, count(*), count(token_fingerprint) \
             FROM audit_events GROUP BY chain_key_id, fingerprint_key_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_sqlx)?;
        let or_default = |id: Option<String>| id.unwrap_or_else(|| DEFAULT_KEY_ID.to_owned());
        for (chain_id, fingerprint_id, all_rows, fingerprinted) in rows {
            *chain.entry(or_default(chain_id)).or_insert(0) += count(all_rows);
            if fingerprinted > 0 {
                *fingerprint.entry(or_default(fingerprint_id)).or_insert(0) += count(fingerprinted);
            }
        }
        Ok((chain, fingerprint))
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.insert_credential_version", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "insert_credential_version"))]
    async fn insert_credential_version(
        &self,
        v: &CredentialVersionRecord,
    ) -> Result<bool, StoreError> {
        // Never a number at or below the newest stored one (retention may
        // have deleted older rows; the newest always stays). The WHERE also
        // keeps SQLite from parsing ON CONFLICT as a join's ON.
        let sql = format!(
            "INSERT INTO credential_versions ({CREDENTIAL_VERSION_COLUMNS}) SELECT {} \
             WHERE NOT EXISTS (SELECT 1 FROM credential_versions \
                               WHERE credential = $1 AND version >= $2) \
             ON CONFLICT (credential, version) DO NOTHING",
            placeholders(1, 20)
        );
        let done = sqlx::query(&sql)
            .bind(v.credential.clone())
            .bind(v.version)
            .bind(v.state)
            .bind(v.organization.clone())
            .bind(v.scopes.clone())
            .bind(v.display_name.clone())
            .bind(v.authorization_id)
            .bind(stored_version_token(v))
            .bind(v.create_time)
            .bind(v.update_time)
            .bind(v.valid_from)
            .bind(v.rotate_time)
            .bind(v.expire_time)
            .bind(v.revoke_at)
            .bind(v.revoke_time)
            .bind(v.attempts)
            .bind(v.next_attempt_time)
            .bind(v.last_error.clone())
            .bind(v.claimed_by.clone())
            .bind(v.claimed_until)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_credential_versions", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_credential_versions"))]
    async fn list_credential_versions(
        &self,
        credential: Option<&str>,
    ) -> Result<Vec<CredentialVersionRecord>, StoreError> {
        let sql = format!(
            "SELECT {CREDENTIAL_VERSION_COLUMNS} FROM credential_versions \
             WHERE ($1 IS NULL OR credential = $1) ORDER BY credential, version DESC"
        );
        sqlx::query_as::<DB, CredentialVersionRecord>(&sql)
            .bind(credential.map(str::to_owned))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.list_credential_versions_in_use", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "list_credential_versions_in_use"))]
    async fn list_credential_versions_in_use(
        &self,
        names: &[String],
        recent: u32,
    ) -> Result<Vec<CredentialVersionRecord>, StoreError> {
        // The live rows over the partial index, then each name's newest
        // over the primary key (a backward range scan stopped at `recent`);
        // UNION drops a row both parts read (one statement, one snapshot).
        let mut sql = format!(
            "SELECT {CREDENTIAL_VERSION_COLUMNS} FROM credential_versions \
             WHERE {LIVE_VERSION_STATES}"
        );
        for i in 0..names.len() {
            sql.push_str(&format!(
                " UNION SELECT {CREDENTIAL_VERSION_COLUMNS} FROM \
                 (SELECT {CREDENTIAL_VERSION_COLUMNS} FROM credential_versions \
                  WHERE credential = ${} ORDER BY version DESC LIMIT $1) AS recent_{i}",
                i + 2
            ));
        }
        sql.push_str(" ORDER BY credential, version DESC");
        let mut args = DB::Arguments::default();
        args.add(i64::from(recent)).map_err(bind_error)?;
        for name in names {
            args.add(name.clone()).map_err(bind_error)?;
        }
        sqlx::query_as_with::<DB, CredentialVersionRecord, _>(&sql, args)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.delete_closed_credential_versions", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "delete_closed_credential_versions"))]
    async fn delete_closed_credential_versions(
        &self,
        closed_before: Timestamp,
        valid_to_before: Timestamp,
        unrecorded_valid_to_before: Timestamp,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // As `delete_closed_leases`: SQLite takes the write lock first;
        // PostgreSQL locks the picked rows. A closed version never changes
        // again, and a newer version only raises the MAX, so a row picked
        // as "not the newest" is still not the newest when deleted.
        let mut tx = DB::begin_quota_create(&self.pool).await?;
        let sql = format!(
            "SELECT credential, version FROM credential_versions v \
             WHERE state IN ($1, $2) AND update_time < $3 \
               AND ((authorization_id IS NOT NULL AND expire_time < $4) \
                 OR (authorization_id IS NULL AND expire_time < $5)) \
               AND version < (SELECT MAX(n.version) FROM credential_versions n \
                              WHERE n.credential = v.credential) \
             ORDER BY update_time, credential, version LIMIT $6 {}",
            DB::CLAIM_LOCK
        );
        let keys: Vec<(String, i64)> = sqlx::query_as(&sql)
            .bind(VersionState::Revoked)
            .bind(VersionState::Failed)
            .bind(closed_before)
            .bind(valid_to_before)
            .bind(unrecorded_valid_to_before)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in keys.chunks(MAX_IDS_PER_QUERY / 2) {
            let pairs = (0..chunk.len())
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql =
                format!("DELETE FROM credential_versions WHERE (credential, version) IN ({pairs})");
            let mut query = sqlx::query::<DB>(&sql);
            for (credential, version) in chunk {
                query = query.bind(credential.clone()).bind(*version);
            }
            deleted += query
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?
                .rows_affected();
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(deleted)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.update_credential_version", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "update_credential_version"))]
    async fn update_credential_version(
        &self,
        v: &CredentialVersionRecord,
        expected: VersionState,
        claimer: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done = bind_version_update!(v, expected, claimer.map(str::to_owned))
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.activate_credential_version", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "activate_credential_version"))]
    async fn activate_credential_version(
        &self,
        v: &CredentialVersionRecord,
        claimer: &str,
        previous_revoke_at: Timestamp,
        revoke_all_previous: bool,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let done = bind_version_update!(v, VersionState::Pending, Some(claimer.to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE credential_versions SET state = $1, revoke_at = $2, update_time = $3 \
             WHERE credential = $4 AND version < $5 AND state = $6",
        )
        .bind(VersionState::Previous)
        .bind(previous_revoke_at)
        .bind(v.update_time)
        .bind(v.credential.clone())
        .bind(v.version)
        .bind(VersionState::Current)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        if revoke_all_previous {
            sqlx::query(
                "UPDATE credential_versions SET revoke_at = $1, update_time = $2 \
                 WHERE credential = $3 AND version < $4 AND state = $5 \
                   AND (revoke_at IS NULL OR revoke_at > $1)",
            )
            .bind(previous_revoke_at)
            .bind(v.update_time)
            .bind(v.credential.clone())
            .bind(v.version)
            .bind(VersionState::Previous)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(true)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.claim_credential_version", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "claim_credential_version"))]
    async fn claim_credential_version(
        &self,
        credential: &str,
        version: i64,
        expected: VersionState,
        claimer: &str,
        now: Timestamp,
        claim_for: Duration,
    ) -> Result<Option<CredentialVersionRecord>, StoreError> {
        let sql = format!(
            "UPDATE credential_versions SET claimed_by = $1, claimed_until = $2 \
             WHERE credential = $3 AND version = $4 AND state = $5 \
               AND (claimed_until IS NULL OR claimed_until <= $6) \
             RETURNING {CREDENTIAL_VERSION_COLUMNS}"
        );
        sqlx::query_as::<DB, CredentialVersionRecord>(&sql)
            .bind(claimer.to_owned())
            .bind(claim_end(now, claim_for)?)
            .bind(credential.to_owned())
            .bind(version)
            .bind(expected)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.sync_managed_credentials", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "sync_managed_credentials"))]
    async fn sync_managed_credentials(
        &self,
        present: &[String],
        now: Timestamp,
    ) -> Result<Vec<ManagedCredentialRecord>, StoreError> {
        // Runs every engine pass: in the steady state every statement
        // matches nothing, so the transaction writes nothing and its commit
        // costs no WAL flush (an ON CONFLICT DO UPDATE would lock, and so
        // write, each row on every pass).
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        for name in present {
            sqlx::query(
                "INSERT INTO managed_credentials (name, first_seen) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name.clone())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
            sqlx::query(
                "UPDATE managed_credentials SET absent_since = NULL, retired_time = NULL \
                 WHERE name = $1 AND (absent_since IS NOT NULL OR retired_time IS NOT NULL)",
            )
            .bind(name.clone())
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        }
        let not_named = if present.is_empty() {
            String::new()
        } else {
            format!(" AND name NOT IN ({})", placeholders(2, present.len()))
        };
        let sql = format!(
            "UPDATE managed_credentials SET absent_since = $1 \
             WHERE absent_since IS NULL AND retired_time IS NULL{not_named}"
        );
        let mut args = DB::Arguments::default();
        args.add(now).map_err(bind_error)?;
        for name in present {
            args.add(name.clone()).map_err(bind_error)?;
        }
        sqlx::query_with(&sql, args)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        let rows = sqlx::query_as::<DB, ManagedCredentialRecord>(
            "SELECT name, first_seen, absent_since, retired_time FROM managed_credentials \
             ORDER BY name",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(rows)
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.notify_credential_change", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "notify_credential_change"))]
    async fn notify_credential_change(&self, credential: &str) -> Result<(), StoreError> {
        if let Some(notify) = DB::NOTIFY_CREDENTIALS {
            sqlx::query(notify)
                .bind(credential.to_owned())
                .execute(&self.pool)
                .await
                .map_err(map_sqlx)?;
        }
        Ok(())
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(otel.name = "store.retire_managed_credential", otel.kind = "client", db.system = DB::DB_SYSTEM, db.operation.name = "retire_managed_credential"))]
    async fn retire_managed_credential(
        &self,
        name: &str,
        absent_before: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE managed_credentials SET retired_time = $1 \
             WHERE name = $2 AND retired_time IS NULL AND absent_since IS NOT NULL \
               AND absent_since <= $3",
        )
        .bind(now)
        .bind(name.to_owned())
        .bind(absent_before)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(done.rows_affected() == 1)
    }
}

/// An `upstream_credentials` row as read (migration 0007's columns).
#[derive(FromRow)]
struct CredentialRow {
    version: i64,
    sealed: Sealed,
    update_time: Timestamp,
    account: Option<String>,
    source: String,
    last_refresh_time: Option<Timestamp>,
    state: String,
    last_error: Option<String>,
}

impl CredentialRow {
    fn into_credential(self) -> Result<UpstreamCredential, StoreError> {
        let source = CredentialSource::parse(&self.source).ok_or_else(|| {
            StoreError::Corrupt(format!("upstream credential source {:?}", self.source))
        })?;
        let state = match self.state.as_str() {
            "OK" => CredentialState::Ok,
            "FAILING" => CredentialState::Failing,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "upstream credential state {other:?}"
                )))
            }
        };
        Ok(UpstreamCredential {
            version: self.version,
            sealed: self.sealed,
            update_time: self.update_time,
            account: self.account,
            source,
            last_refresh_time: self.last_refresh_time,
            state,
            last_error: self.last_error,
        })
    }
}
