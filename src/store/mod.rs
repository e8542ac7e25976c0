//! Persistence: the [`Store`] trait and its two implementations,
//! PostgreSQL (production) and SQLite (embedded default). Both pass one
//! conformance suite (tests/store.rs).
//!
//! Rules: runtime `sqlx::query` only (no compile-time macros); `now` is
//! always bound from the application, never the database's clock; a call
//! either writes everything it names or nothing. Times are kept to the
//! microsecond (finer parts are truncated on write) and read back in UTC.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::crypto::Sealed;
use crate::domain::{
    AuditEvent, AuthorizationId, Identity, LeaseId, LeaseState, Organization, ScopeSet, Timestamp,
    VersionState,
};
use crate::error::{ErrorCode, ServiceError};

mod codec;
pub mod postgres;
mod sql;
pub mod sqlite;

pub use postgres::{PostgresOptions, PostgresStore};
pub use sql::SqlStore;
pub use sqlite::{SqliteOptions, SqliteStore};

/// Opens the store named by `url` without migrating it (call
/// [`Store::migrate`]). `postgres://` or `postgresql://` opens PostgreSQL;
/// `sqlite:` (e.g. `sqlite://broker.db`, `sqlite::memory:`) or a bare file
/// path opens SQLite, creating the file if missing.
///
/// Errors: [`StoreError::Unavailable`] if the database cannot be reached,
/// [`StoreError::Database`] for a malformed URL. The URL (which may hold a
/// password) is never put in an error.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if is_postgres(url) {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else {
        Ok(Arc::new(SqliteStore::open(url).await?))
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The versions `migrator` has (up migrations only) that are not in
/// `applied`, ascending.
fn pending_versions(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> Vec<i64> {
    let mut pending: Vec<i64> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| m.version)
        .collect();
    pending.sort_unstable();
    pending
}

/// Connection limits of the store (`[database]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// `database.max_connections`: the most connections this process holds
    /// open to the database, over every [`Stores`] handle together; at
    /// least [`PoolShares::MIN_CONNECTIONS`].
    pub max_connections: u32,
    /// `database.acquire_timeout`: how long a store call waits for a
    /// connection of its share (including while the database refuses new
    /// sessions) before failing with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    /// 10 connections, 10 s.
    fn default() -> Self {
        PoolOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// How `database.max_connections` is split between the three kinds of
/// store work, each a pool of its own, so none can take the others'
/// connections: the callers' requests (every gRPC call, grants among them)
/// get what the other two leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShares {
    /// Callers' requests (and start-up, migrations, readiness).
    pub requests: u32,
    /// Background work: reaper, revocation retries, reconciler, orphan
    /// sweep: a fifth, at least 1.
    pub background: u32,
    /// Audit appends: 1, since one group-commit transaction at a time
    /// writes every queued row ([`crate::audit::AuditLog`]).
    pub audit: u32,
}

impl PoolShares {
    /// The fewest connections that give each kind of work one.
    pub const MIN_CONNECTIONS: u32 = 3;

    /// The split of `max_connections`; None below [`Self::MIN_CONNECTIONS`].
    pub fn of(max_connections: u32) -> Option<PoolShares> {
        if max_connections < Self::MIN_CONNECTIONS {
            return None;
        }
        let audit = 1;
        let background = (max_connections / 5).max(1);
        Some(PoolShares {
            requests: max_connections - audit - background,
            background,
            audit,
        })
    }
}

/// One database opened as one [`Store`] handle per kind of work, each over
/// its own connections ([`PoolShares`]), so busy background work or a slow
/// audit transaction never holds the connections a caller's request needs.
#[derive(Clone)]
pub struct Stores {
    /// For callers' requests, start-up and migrations.
    pub requests: Arc<dyn Store>,
    /// For background work.
    pub background: Arc<dyn Store>,
    /// For the audit log's append transactions.
    pub audit: Arc<dyn Store>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Opens the store named by `url` (as [`open`] does, without migrating)
    /// as three handles whose pools together hold at most
    /// `options.max_connections` connections, split by [`PoolShares::of`].
    /// On PostgreSQL each pool names itself in `application_name`
    /// (`token-broker:requests`, `token-broker:background`,
    /// `token-broker:audit`, seen in `pg_stat_activity`). An in-memory
    /// SQLite database lives in its one connection, so there all three
    /// handles share it.
    ///
    /// Errors: as [`open`]; [`StoreError::Database`] when
    /// `max_connections` is below [`PoolShares::MIN_CONNECTIONS`].
    pub async fn open(url: &str, options: &PoolOptions) -> Result<Stores, StoreError> {
        let shares = PoolShares::of(options.max_connections).ok_or_else(|| {
            StoreError::Database(format!(
                "max_connections must be at least {}",
                PoolShares::MIN_CONNECTIONS
            ))
        })?;
        if is_postgres(url) {
            let part = |kind: &str, max_connections: u32| PostgresOptions {
                max_connections,
                acquire_timeout: options.acquire_timeout,
                application_name: format!("token-broker:{kind}"),
            };
            let requests = PostgresStore::connect_with(url, part("requests", shares.requests));
            let background =
                PostgresStore::connect_with(url, part("background", shares.background));
            let audit = PostgresStore::connect_with(url, part("audit", shares.audit));
            let (requests, background, audit) = tokio::try_join!(requests, background, audit)?;
            return Ok(Stores {
                requests: Arc::new(requests),
                background: Arc::new(background),
                audit: Arc::new(audit),
            });
        }
        let part = |max_connections: u32| SqliteOptions {
            max_connections,
            acquire_timeout: options.acquire_timeout,
        };
        let requests = SqliteStore::open_with(url, part(shares.requests)).await?;
        if sqlite::is_in_memory(url) {
            let one: Arc<dyn Store> = Arc::new(requests);
            return Ok(Stores {
                requests: one.clone(),
                background: one.clone(),
                audit: one,
            });
        }
        // One after another: the first creates the file.
        let background = SqliteStore::open_with(url, part(shares.background)).await?;
        let audit = SqliteStore::open_with(url, part(shares.audit)).await?;
        Ok(Stores {
            requests: Arc::new(requests),
            background: Arc::new(background),
            audit: Arc::new(audit),
        })
    }
}

/// Maps a sqlx error to a [`StoreError`]: failures to reach the database
/// (I/O, TLS, pool timeout or closed, PostgreSQL SQLSTATE classes 08, 53
/// insufficient resources, 55 and 57P, 3D000, SQLite busy or locked past
/// the busy timeout) are `Unavailable`, so a retry can help; the rest are
/// `Database`. Only the database's message is kept: sqlx never puts bound
/// values in it, so no secret reaches the error.
/// Calls that waited `database.acquire_timeout` for a pooled connection
/// and gave up (sqlx's `PoolTimedOut`), in every pool of this process.
/// Counted here because sqlx 0.8 exposes no count of acquire waits.
static POOL_ACQUIRE_TIMEOUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many calls gave up waiting for a pooled connection since this
/// process started (all pools, all stores): the
/// `token_broker_db_pool_acquire_timeouts_total` counter.
pub fn pool_acquire_timeouts() -> u64 {
    POOL_ACQUIRE_TIMEOUTS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn map_sqlx(err: sqlx::Error) -> StoreError {
    if matches!(err, sqlx::Error::PoolTimedOut) {
        POOL_ACQUIRE_TIMEOUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.to_string()),
        // A stored value that does not parse; the message names the column.
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => StoreError::Corrupt(err.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default().into_owned();
            // A server that refuses the session: connection exceptions
            // (08), shutting down or starting (57P01, 57P03), no such
            // database (3D000), a database not accepting connections
            // (class 55); or one out of resources (class 53: too many
            // connections, disk full, out of memory). Retrying later can help.
            let unavailable = code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "3D000"
                || code.starts_with("55")
                // SQLite primary result codes 5 (BUSY) and 6 (LOCKED), with extended codes.
                || (db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && code
                        .parse::<i32>()
                        .is_ok_and(|c| matches!(c & 0xff, 5 | 6)));
            let text = format!("{} (code {code})", db.message());
            if unavailable {
                StoreError::Unavailable(text)
            } else {
                StoreError::Database(text)
            }
        }
        _ => StoreError::Database(err.to_string()),
    }
}

fn map_migrate(err: sqlx::migrate::MigrateError) -> StoreError {
    match err {
        sqlx::migrate::MigrateError::Execute(e) => match map_sqlx(e) {
            StoreError::Unavailable(m) => StoreError::Unavailable(m),
            other => StoreError::Migration(other.to_string()),
        },
        other => StoreError::Migration(other.to_string()),
    }
}

/// The PostgreSQL notification channel on which a replica announces a
/// changed managed credential (payload: its name).
pub const CREDENTIALS_CHANNEL: &str = "token_broker_credentials";

/// One lease row (see `docs/architecture.md` for the lease state machine).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct LeaseRecord {
    /// Primary key.
    pub id: LeaseId,
    /// Who holds it.
    pub holder: Identity,
    /// Azure DevOps organization.
    pub organization: Organization,
    /// Scopes the PAT carries.
    pub scopes: ScopeSet,
    /// Upstream `displayName`: `<prefix>:<deployment id>:<lease id>`.
    pub display_name: String,
    /// Upstream `authorizationId`, once minted.
    pub authorization_id: Option<AuthorizationId>,
    /// The PAT, sealed with the lease id as associated data. Stored only
    /// while the lease is ACTIVE: every insert and update of a lease in any
    /// other state stores NULL here, whatever the record holds.
    pub sealed_token: Option<Sealed>,
    /// Lifecycle state.
    pub state: LeaseState,
    /// When created (UTC).
    pub create_time: Timestamp,
    /// Last write (UTC).
    pub update_time: Timestamp,
    /// When the lease ends unless renewed (UTC).
    pub expire_time: Timestamp,
    /// Latest reachable `expire_time` (UTC).
    pub max_expire_time: Timestamp,
    /// When revoked or expired (UTC).
    pub revoke_time: Option<Timestamp>,
    /// Upstream's `validTo` as read back (UTC).
    pub upstream_valid_to: Option<Timestamp>,
    /// Upstream attempts made for the current step (revocation retries).
    pub attempts: i32,
    /// Earliest time background work may retry (UTC).
    pub next_attempt_time: Option<Timestamp>,
    /// Last upstream error, free text without secrets.
    pub last_error: Option<String>,
    /// Replica that holds the claim on background work, if any.
    pub claimed_by: Option<String>,
    /// When that claim lapses (UTC).
    pub claimed_until: Option<Timestamp>,
}

/// One version of a managed credential (table `credential_versions`,
/// migration 0013; the states: [`VersionState`]).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct CredentialVersionRecord {
    /// The credential's name in the policy.
    pub credential: String,
    /// 1, 2, ... per credential; with `credential`, the primary key.
    pub version: i64,
    /// Where it is in its life.
    pub state: VersionState,
    /// Azure DevOps organization.
    pub organization: Organization,
    /// Scopes the PAT carries.
    pub scopes: ScopeSet,
    /// Upstream `displayName`: `<prefix>:<deployment id>:credential:<name>:<version>`.
    pub display_name: String,
    /// Upstream `authorizationId`, once minted.
    pub authorization_id: Option<AuthorizationId>,
    /// The PAT, sealed with `credential:<name>:<version>` as associated
    /// data. Stored only while CURRENT or PREVIOUS: every write in another
    /// state stores NULL here, whatever the record holds.
    pub sealed_token: Option<Sealed>,
    /// When the row was written first (UTC).
    pub create_time: Timestamp,
    /// Last write (UTC).
    pub update_time: Timestamp,
    /// When it was minted (became CURRENT) (UTC).
    pub valid_from: Timestamp,
    /// When the next version is due (UTC).
    pub rotate_time: Timestamp,
    /// The PAT's validTo (UTC): asked for at minting, then as upstream stored it.
    pub expire_time: Timestamp,
    /// When its revocation is due (set when it turns PREVIOUS) (UTC).
    pub revoke_at: Option<Timestamp>,
    /// When revocation began (UTC).
    pub revoke_time: Option<Timestamp>,
    /// Failed upstream attempts of the current step (revocation retries).
    pub attempts: i32,
    /// Earliest time background work retries (UTC).
    pub next_attempt_time: Option<Timestamp>,
    /// Last upstream error, free text without secrets.
    pub last_error: Option<String>,
    /// Replica holding the claim (the minting replica while PENDING).
    pub claimed_by: Option<String>,
    /// When that claim lapses (UTC).
    pub claimed_until: Option<Timestamp>,
}

/// A credential the policy has named (table `managed_credentials`): the
/// clock of its retirement.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct ManagedCredentialRecord {
    /// The credential's name.
    pub name: String,
    /// When a policy first named it (UTC).
    pub first_seen: Timestamp,
    /// Since when the policy no longer names it (None: it does) (UTC).
    pub absent_since: Option<Timestamp>,
    /// When it was retired (None: it is not) (UTC).
    pub retired_time: Option<Timestamp>,
}

/// An idempotency key: (holder, request_id) -> lease, with a fingerprint
/// of the request's parameters.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct IdempotencyRecord {
    /// The caller that chose the key.
    pub holder: Identity,
    /// The client-chosen key.
    #[sqlx(try_from = "codec::UuidColumn")]
    pub request_id: Uuid,
    /// Hex SHA-256 over the normalized request parameters.
    pub fingerprint: String,
    /// The lease the key points at.
    pub lease_id: LeaseId,
    /// When first recorded (UTC).
    pub create_time: Timestamp,
}

/// What [`Store::create_lease`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum CreateOutcome {
    /// The lease (and key, if any) were inserted.
    Created,
    /// The key existed; nothing was written. Carries the existing record.
    Existing(IdempotencyRecord),
    /// The holder already had `cap` or more live leases; nothing was
    /// written. Carries how many it had.
    OverQuota {
        /// The holder's live leases when the create was refused.
        live: u64,
    },
}

/// What [`Store::replace_failed_lease`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplaceOutcome {
    /// The lease was inserted and the key repointed at it.
    Replaced,
    /// The key no longer points at the failed lease (another retry replaced
    /// it first); nothing was written.
    KeyMoved,
    /// The holder already had `cap` or more live leases; nothing was
    /// written.
    OverQuota {
        /// The holder's live leases when the replacement was refused.
        live: u64,
    },
}

/// Which leases [`Store::list_leases`] returns. Empty fields match all.
#[derive(Clone, Debug, Default)]
pub struct LeaseFilter {
    /// Only this holder's.
    pub holder: Option<Identity>,
    /// Only these states.
    pub states: Vec<LeaseState>,
    /// Only this organization.
    pub organization: Option<Organization>,
}

/// Which audit events [`Store::list_audit_matching`] returns. Empty fields
/// match all; given ones must all match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditFilter {
    /// Only events at or after this time.
    pub start_time: Option<Timestamp>,
    /// Only events before this time.
    pub end_time: Option<Timestamp>,
    /// Only events by this identity, exactly as recorded (`-` for callers
    /// that were not authenticated).
    pub identity: Option<String>,
    /// Only this action, e.g. `lease.create`.
    pub action: Option<String>,
    /// Only events about this lease.
    pub lease_id: Option<LeaseId>,
}

/// Keyset position for listing newest first: the last row of a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageCursor {
    /// `create_time` of the last row returned.
    pub create_time: Timestamp,
    /// `id` of the last row returned.
    pub id: LeaseId,
}

/// A pool's connections now, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections open (in use and idle).
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Most connections the pool opens.
    pub max: u32,
}

/// Lease counts for metrics ([`Store::lease_gauges`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseGauges {
    /// Leases of every holder per state (states without leases absent).
    pub by_state: Vec<(LeaseState, u64)>,
    /// The revocation queue: REVOKING and REVOKE_FAILED leases whose next
    /// attempt is due (what [`Work::Revocation`] claims).
    pub revocation_queue: u64,
    /// When the queue's longest-waiting lease became due (its
    /// `next_attempt_time`, or its `update_time` when unset); None when the
    /// queue is empty.
    pub revocation_oldest_due: Option<Timestamp>,
}

/// Background work a replica can claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// ACTIVE leases whose `expire_time` <= now: the reaper's.
    Expiry,
    /// REVOKING or REVOKE_FAILED leases whose `next_attempt_time` <= now
    /// (or unset): the revocation queue's.
    Revocation,
    /// PENDING leases created before now - `older_than`: the reconciler's.
    Reconcile {
        /// How old a PENDING lease must be.
        older_than: Duration,
    },
}

/// The sealed upstream refresh token, its optimistic-lock version and its
/// story (migration 0007): who it belongs to, how it was stored, and how
/// its last refresh went. Never holds the token in the clear.
#[derive(Clone, Debug)]
pub struct UpstreamCredential {
    /// Increments on every new refresh token stored (login, stdin,
    /// adopted configuration, rotation).
    pub version: i64,
    /// Sealed with associated data [`UpstreamCredential::AAD`].
    pub sealed: Sealed,
    /// When this version was stored (UTC).
    pub update_time: Timestamp,
    /// The signed-in account (the id token's `preferred_username`), once known.
    pub account: Option<String>,
    /// How this version was stored.
    pub source: CredentialSource,
    /// Last successful redemption at Entra (UTC), if any.
    pub last_refresh_time: Option<Timestamp>,
    /// `Failing` once Entra refused this version.
    pub state: CredentialState,
    /// The last refresh error (an OAuth error and AADSTS code, never a
    /// token); cleared by a success or a new version.
    pub last_error: Option<String>,
}

impl UpstreamCredential {
    /// Associated data used to seal the upstream refresh token.
    pub const AAD: &'static [u8] = b"upstream_credentials/refresh_token";
}

/// A key's check value as the database records it (migration 0009): the
/// purpose (`sealing`, `audit_chain`, `fingerprint`), the key id and hex
/// HMAC-SHA256 of a fixed label under the key (see `keycheck`). Not secret:
/// it tells keys apart without revealing them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyCheck {
    /// `sealing`, `audit_chain` or `fingerprint`.
    pub purpose: String,
    /// The key's id in its keyring.
    pub key_id: String,
    /// 64 lower-case hex characters.
    pub check_value: String,
}

/// Where a stored secret lives; decides the associated data it is sealed
/// with ([`SecretOwner::aad`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretOwner {
    /// The upstream refresh token (`upstream_credentials.sealed`).
    UpstreamCredential,
    /// A lease's PAT (`leases.sealed_token`).
    Lease(LeaseId),
    /// A managed credential version's PAT (`credential_versions.sealed_token`).
    CredentialVersion {
        /// The credential's name.
        credential: String,
        /// The version.
        version: i64,
    },
}

impl SecretOwner {
    /// The associated data its reader opens it with: the lease id in its
    /// hyphenated text form for a lease's PAT, `credential:<name>:<version>`
    /// for a managed credential version's, [`UpstreamCredential::AAD`]
    /// for the upstream refresh token.
    pub fn aad(&self) -> Vec<u8> {
        match self {
            SecretOwner::UpstreamCredential => UpstreamCredential::AAD.to_vec(),
            SecretOwner::Lease(id) => id.to_string().into_bytes(),
            SecretOwner::CredentialVersion {
                credential,
                version,
            } => format!("credential:{credential}:{version}").into_bytes(),
        }
    }
}

/// A stored secret, still sealed, and where it lives.
#[derive(Clone, Debug)]
pub struct StoredSecret {
    /// Its row.
    pub owner: SecretOwner,
    /// The sealed value as stored.
    pub sealed: Sealed,
}

/// One compare-and-set re-seal for [`Store::replace_secrets`]: `owner`'s
/// secret becomes `new` if it is still `old`.
#[derive(Clone, Debug)]
pub struct SecretReplacement {
    /// Its row.
    pub owner: SecretOwner,
    /// The value read (compared as stored text).
    pub old: Sealed,
    /// The same plaintext sealed anew (same associated data).
    pub new: Sealed,
}

/// How the stored upstream credential's current version was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// Adopted from `upstream.refresh_token` at start.
    Config,
    /// `token-broker upstream login` (device-code sign-in).
    Login,
    /// `token-broker upstream set-refresh-token` (read from stdin).
    Stdin,
    /// Entra's rotated refresh token, stored by a refresh.
    Rotated,
}

impl CredentialSource {
    /// Stored and shown form: `config`, `login`, `stdin`, `rotated`.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialSource::Config => "config",
            CredentialSource::Login => "login",
            CredentialSource::Stdin => "stdin",
            CredentialSource::Rotated => "rotated",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "config" => CredentialSource::Config,
            "login" => CredentialSource::Login,
            "stdin" => CredentialSource::Stdin,
            "rotated" => CredentialSource::Rotated,
            _ => return None,
        })
    }
}

/// Whether the stored credential's version last worked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialState {
    /// Not refused (a new version starts here).
    Ok,
    /// Entra refused this version (`invalid_grant` and the like).
    Failing,
}

impl CredentialState {
    /// Stored and shown form: `OK`, `FAILING`.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Ok => "OK",
            CredentialState::Failing => "FAILING",
        }
    }
}

/// A refresh token to store as a new credential version.
#[derive(Clone, Debug)]
pub struct NewUpstreamCredential {
    /// Sealed with [`UpstreamCredential::AAD`].
    pub sealed: Sealed,
    /// The signed-in account, if known (a rotation without one keeps the
    /// stored account).
    pub account: Option<String>,
    /// How it was obtained.
    pub source: CredentialSource,
    /// It was just redeemed (login, rotation): sets `last_refresh_time`.
    pub refreshed: bool,
}

/// When [`Store::save_upstream_credential`] writes the new version.
#[derive(Clone, Copy, Debug)]
pub enum CredentialWrite<'a> {
    /// Always (login, stdin): replaces whatever is stored, keeping the
    /// digest of the last adopted configured value.
    Replace,
    /// Only if the stored version is still this one (a rotation; a replica
    /// that loses the race keeps the winner's).
    Rotate {
        /// The version the rotated token was redeemed from.
        expected_version: i64,
    },
    /// Only if `digest` differs from the last adopted configured value's
    /// (start-up adoption of `upstream.refresh_token`); then `digest` is
    /// recorded. A row from before migration 0007 records it without
    /// adopting.
    AdoptConfigured {
        /// [`configured_digest`](crate::upstream::credential::configured_digest) of the value.
        digest: &'a str,
    },
}

/// The result of a refresh, recorded on the version it redeemed.
#[derive(Clone, Debug)]
pub enum RefreshRecord {
    /// Entra answered with an access token (and no rotated refresh token
    /// was stored by this call).
    Succeeded {
        /// The account, if the answer named one.
        account: Option<String>,
    },
    /// Entra refused the refresh token: the version becomes `FAILING`.
    Refused {
        /// Why, without any token.
        error: String,
    },
    /// Entra could not answer (outage, throttling): noted, state kept.
    Unavailable {
        /// Why, without any token.
        error: String,
    },
}

/// One audit row as stored, for walking the audit chain
/// ([`Store::list_audit_chain`]): a row whose fields do not parse is still
/// returned, with the parse error, so a verifier can name it.
#[derive(Debug)]
pub struct StoredAuditRow {
    /// The row's id.
    pub id: i64,
    /// The row's fields, or why they do not parse (`Corrupt`).
    pub event: Result<AuditEvent, StoreError>,
    /// The row's chain MAC (hex), `None` for a row written without one.
    pub mac: Option<String>,
    /// The ids of the keys the row was made with (migration 0008).
    pub key_ids: AuditKeyIds,
}

/// The key ids an audit row records (migration 0008): `chain`, the audit
/// chain key its MAC was made with; `fingerprint`, the fingerprint key of
/// its `token_fingerprint` (`None` when it has none). `chain: None` marks a
/// row written without key ids (before migration 0008, or through
/// [`Store::append_audit_chained_batch`]): key id `default`, MAC encoding
/// version 1 (see `audit::chain`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditKeyIds {
    /// Id of the chain key the row's MAC was made with.
    pub chain: Option<String>,
    /// Id of the fingerprint key of the row's token fingerprint.
    pub fingerprint: Option<String>,
}

/// What a key id of `None` stands for: rows from before migration 0008,
/// and the single-string `keys.audit_chain` / `keys.fingerprint`.
pub const DEFAULT_KEY_ID: &str = "default";

/// Chains audit rows for [`Store::append_audit_keyed_batch`] (implemented
/// by `audit::AuditLog`): which chain key new rows are MAC'd with, the row
/// that records a switch to it, and the MAC itself.
pub trait AuditChainer: Send + Sync {
    /// Id of the chain key new rows are MAC'd with (recorded as
    /// `chain_key_id`).
    fn chain_key_id(&self) -> &str;
    /// Id of the fingerprint key recorded with a row that has a token
    /// fingerprint.
    fn fingerprint_key_id(&self) -> &str;
    /// The row written first, under [`AuditChainer::chain_key_id`], when
    /// the newest stored row was chained under key id `from` (NULL counts
    /// as [`DEFAULT_KEY_ID`]) and that differs: it records the switch. Its
    /// `id` is assigned by the store.
    fn switch_event(&self, from: &str) -> AuditEvent;
    /// The MAC of `event` as stored (id assigned, time truncated to the
    /// microsecond) with `key_ids`, after a row whose MAC is `prev`.
    fn mac(&self, prev: Option<&str>, event: &AuditEvent, key_ids: &AuditKeyIds) -> String;
    /// The row this replica appended last, `(id, MAC)`, or `None` (nothing
    /// appended yet: no check). Checked under the chain lock before a batch
    /// that writes rows: when the newest stored row's id is lower, or the
    /// row at that id is gone or carries another MAC, the chain was
    /// truncated or rewritten since, and the batch first writes
    /// [`AuditChainer::tamper_event`], chained onto what it found.
    fn last_appended(&self) -> Option<(i64, &str)>;
    /// The row recording a detected truncation or rewrite: `expected` is
    /// [`AuditChainer::last_appended`], `found` the `(id, MAC)` stored at
    /// its id, else the newest stored row (`None`: no row left; a MAC of
    /// `None`: that row has none). Called inside the append transaction,
    /// which may still fail (then the next batch detects it again). Its
    /// `id` is assigned by the store.
    fn tamper_event(&self, expected: (i64, &str), found: Option<(i64, Option<&str>)>)
        -> AuditEvent;
}

/// A lease write an audit row records: written in the row's transaction,
/// and the row only if it applies, so the change and its audit row land
/// together or not at all.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseWrite {
    /// The lease as it is to be stored (every mutable field is written, as
    /// by [`Store::update_lease`]).
    pub lease: LeaseRecord,
    /// The stored state it must still have (compare-and-set).
    pub expected: LeaseState,
}

/// One audit event to chain, with the lease write it records, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditAppend {
    /// The event (its `id` is ignored; the chain assigns it).
    pub event: AuditEvent,
    /// Written first in the same transaction; the event is appended only if
    /// this applies.
    pub lease_write: Option<LeaseWrite>,
}

/// Computes a chained audit row's MAC for [`Store::append_audit_chained`]
/// from the previous row's `mac` (`None` when there is no earlier row or it
/// has no MAC) and the event exactly as it will be stored (id assigned, time
/// truncated to the microsecond). See `audit::ChainKey::mac`.
pub type ChainMacFn<'a> = &'a (dyn Fn(Option<&str>, &AuditEvent) -> String + Send + Sync);

/// A store failure. Never carries secrets. `Clone`, so one failed audit
/// batch can answer each of its waiters.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A stored row does not parse (corrupt or written by a newer version).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Database(String),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
}

impl ServiceError for StoreError {
    fn code(&self) -> ErrorCode {
        match self {
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "STORE_UNAVAILABLE",
            _ => "INTERNAL",
        }
    }
    /// 1 s for `Unavailable`: the database may be back (or have a free
    /// connection) by then.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            StoreError::Unavailable(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Everything the broker persists. Implemented once, by [`SqlStore`], for
/// PostgreSQL ([`PostgresStore`]) and SQLite ([`SqliteStore`]).
///
/// Its methods are grouped by aggregate: the database itself, leases with
/// their idempotency keys, claims on background work (leases and jobs),
/// the audit chain, then meta values and the upstream credential.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations (PostgreSQL: under an advisory lock, so
    /// concurrent replicas run them once).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Versions of this binary's migrations the database has not applied
    /// (ascending; empty when up to date). Reads only: an unmigrated
    /// database answers every version.
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError>;

    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- leases and their idempotency keys ----

    /// Inserts `lease` and, if given, its idempotency key, atomically. If the
    /// key (holder, request_id) exists, writes nothing and returns it; of
    /// concurrent creators with one key exactly one gets `Created`. A
    /// duplicate lease id or `display_name` is a `Database` error, and
    /// nothing is written.
    ///
    /// With `cap`, the insert happens only while the lease's holder has
    /// fewer than `cap` live leases ([`Store::count_live_leases`]), counted
    /// and inserted under one per-holder lock (PostgreSQL: a
    /// transaction-scoped advisory lock on the holder; SQLite: the write
    /// lock), so concurrent creates admit exactly up to the cap; otherwise
    /// [`CreateOutcome::OverQuota`] and nothing is written. An existing key
    /// wins over the cap (a retry of a lease already counted).
    async fn create_lease(
        &self,
        lease: &LeaseRecord,
        key: Option<&IdempotencyRecord>,
        cap: Option<u32>,
    ) -> Result<CreateOutcome, StoreError>;

    /// Atomically inserts `lease` and repoints `key` at it, only if the key
    /// still points at `failed` ([`ReplaceOutcome::KeyMoved`] otherwise)
    /// and, with `cap`, the holder has fewer than `cap` live leases, checked
    /// as in [`Store::create_lease`]. Nothing is written unless
    /// [`ReplaceOutcome::Replaced`].
    async fn replace_failed_lease(
        &self,
        lease: &LeaseRecord,
        key: &IdempotencyRecord,
        failed: LeaseId,
        cap: Option<u32>,
    ) -> Result<ReplaceOutcome, StoreError>;

    /// One lease by id.
    async fn get_lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError>;

    /// The leases among `ids` that exist, each once, in no set order (ids
    /// without a row are left out): one primary-key look-up per call for a
    /// page of them (the orphan sweep's batch), several queries of at most
    /// 500 ids each for a longer slice.
    async fn get_leases(&self, ids: &[LeaseId]) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Leases matching `filter`, newest first (`create_time` DESC, `id`
    /// DESC), strictly after `after`, at most `limit`.
    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        after: Option<&PageCursor>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Writes every mutable field of `lease` if its stored state is still
    /// `expected` (compare-and-set). Returns false if the state had moved
    /// (or the lease does not exist). Immutable fields (id, holder,
    /// organization, scopes, display_name, create_time) are not written;
    /// `sealed_token` is written as NULL unless `lease` is ACTIVE.
    async fn update_lease(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
    ) -> Result<bool, StoreError>;

    /// [`Store::update_lease`] that also requires the stored `update_time`
    /// to still be `read_update_time` (the copy the caller decided on has
    /// not been written since): optimistic concurrency for writes that
    /// must not overwrite a concurrent one in the same state (a renewal
    /// against an expiry, or another renewal).
    async fn update_lease_unchanged(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
        read_update_time: Timestamp,
    ) -> Result<bool, StoreError>;

    /// The idempotency record for (holder, request_id).
    async fn get_idempotency(
        &self,
        holder: &Identity,
        request_id: Uuid,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Deletes up to `limit` closed leases (REVOKED, EXPIRED, FAILED; never
    /// REVOKE_FAILED, whose PAT may still be live, nor a live state) that
    /// both closed before `closed_before` (their last write, `update_time`,
    /// is when they closed: a closed lease is never written again) and
    /// whose PAT is past its validTo: `upstream_valid_to` before
    /// `valid_to_before`, or, when none was recorded (a lease that failed
    /// before upstream answered), `max_expire_time` before
    /// `unrecorded_valid_to_before`. Their idempotency keys go in the same
    /// transaction, so a later CreateLease with such a `request_id` is a
    /// new request. Oldest closed first; returns how many leases were
    /// deleted (fewer than `limit`: none of the rest is due). Audit rows
    /// are never deleted.
    async fn delete_closed_leases(
        &self,
        closed_before: Timestamp,
        valid_to_before: Timestamp,
        unrecorded_valid_to_before: Timestamp,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// ACTIVE, PENDING and REVOKING leases held by `holder` (for quotas).
    async fn count_live_leases(&self, holder: &Identity) -> Result<u64, StoreError>;

    /// How many leases, of every holder, are in `state` now (one COUNT over
    /// the state index; e.g. REVOKE_FAILED for the
    /// `token_broker_leases_revoke_failed` gauge).
    async fn count_leases_in_state(&self, state: LeaseState) -> Result<u64, StoreError>;

    /// Lease counts per state and the revocation queue's depth and oldest
    /// due time at `now` (three small queries).
    async fn lease_gauges(&self, now: Timestamp) -> Result<LeaseGauges, StoreError>;

    /// This handle's connection pool now (no query); None where no pool
    /// can say.
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }

    /// Every organization any lease (in any state) was issued in, sorted,
    /// each once.
    async fn lease_organizations(&self) -> Result<Vec<Organization>, StoreError>;

    // ---- claims on background work ----

    /// Claims up to `limit` leases due for `work`, not claimed by anyone
    /// else (or whose claim lapsed), setting `claimed_by = claimer` and
    /// `claimed_until = now + claim_for` in a committed transaction.
    /// A claim is live while `claimed_until > now`. Returned in the order
    /// they fell due (then id). PostgreSQL selects with `FOR UPDATE SKIP
    /// LOCKED`, so concurrent claimers get disjoint sets.
    async fn claim_due(
        &self,
        work: Work,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Clears the claim on `id` if `claimer` holds it.
    async fn release_claim(&self, id: LeaseId, claimer: &str) -> Result<(), StoreError>;

    /// Claims one lease for work outside [`Store::claim_due`]'s kinds (the
    /// orphan sweep): sets `claimed_by = claimer`, `claimed_until = now +
    /// claim_for` only if its state is still `expected`, no live claim is
    /// held and the row has not been
    /// written since `unchanged_before` (`update_time < unchanged_before`),
    /// in one committed statement. False if it exists but either test
    /// failed, or it does not exist.
    async fn claim_lease(
        &self,
        id: LeaseId,
        expected: LeaseState,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        unchanged_before: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Claims the deployment-wide job `name` (a `background_jobs` row,
    /// made on first use) for `claimer` until `now + claim_for`, if it is
    /// due: never run, or last run at or before `now - interval`, and no
    /// live claim held (`claimed_until > now`). One committed
    /// compare-and-set: of concurrent claimers at most one gets true.
    async fn claim_job(
        &self,
        name: &str,
        now: Timestamp,
        claimer: &str,
        claim_for: Duration,
        interval: Duration,
    ) -> Result<bool, StoreError>;

    /// Ends `claimer`'s run of job `name` started at `run_time`: records
    /// `last_run_time = run_time` and clears the claim. Does nothing if
    /// `claimer` no longer holds the claim (it lapsed and was taken).
    async fn finish_job(
        &self,
        name: &str,
        claimer: &str,
        run_time: Timestamp,
    ) -> Result<(), StoreError>;

    // ---- the audit chain ----

    /// Appends an audit event; returns its assigned id. Ids increase in
    /// commit order (appends are serialized), so paging with
    /// [`Store::list_audit`] never skips a row.
    ///
    /// The row carries no chain MAC: once the chain has begun, `audit::verify`
    /// reports such a row as broken. The broker appends through
    /// `audit::AuditLog` ([`Store::append_audit_chained`]) instead.
    async fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError>;

    /// Appends `event` as the next link of the audit chain and returns its
    /// id and MAC: [`Store::append_audit_chained_batch`] of one event.
    async fn append_audit_chained(
        &self,
        event: &AuditEvent,
        mac: ChainMacFn<'_>,
    ) -> Result<(i64, String), StoreError> {
        let append = AuditAppend {
            event: event.clone(),
            lease_write: None,
        };
        let appended = self
            .append_audit_chained_batch(std::slice::from_ref(&append), mac)
            .await?;
        appended
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| StoreError::Database("audit append returned no row".into()))
    }

    /// Appends `appends`, in order, as the next links of the audit chain,
    /// and returns each one's id and MAC in the same order: `None` for one
    /// whose [`LeaseWrite`] did not apply (the lease had moved), which
    /// wrote nothing. In one transaction under the same serialization as
    /// [`Store::append_audit`] (PostgreSQL: a transaction-scoped advisory
    /// lock; SQLite: one writer transaction): writes each lease write
    /// (compare-and-set), reads the newest row's `mac`, calls `mac` with it
    /// and each event as stored (each row's MAC feeding the next), and
    /// writes the rows. All of it is written or, on error, none. Ids of
    /// chained rows are contiguous and never reused (PostgreSQL: above both
    /// the newest id and the highest id ever written, migration 0010; SQLite:
    /// AUTOINCREMENT, which never reuses an id). An empty `appends` writes
    /// nothing and touches no database.
    async fn append_audit_chained_batch(
        &self,
        appends: &[AuditAppend],
        mac: ChainMacFn<'_>,
    ) -> Result<Vec<Option<(i64, String)>>, StoreError>;

    /// As [`Store::append_audit_chained_batch`], but each row also records
    /// the key ids `chainer` gives (migration 0008: `chain_key_id`, and
    /// `fingerprint_key_id` for a row with a token fingerprint), its MAC
    /// covers them, and when the newest stored row's chain key id (NULL:
    /// [`DEFAULT_KEY_ID`]) differs from `chainer`'s, the transaction first
    /// writes [`AuditChainer::switch_event`] (not among the answers). When
    /// the row at [`AuditChainer::last_appended`]'s id is gone or carries
    /// another MAC, it then writes [`AuditChainer::tamper_event`] (not
    /// among the answers either), chained onto the newest row found. A
    /// batch that writes no row writes neither.
    async fn append_audit_keyed_batch(
        &self,
        appends: &[AuditAppend],
        chainer: &dyn AuditChainer,
    ) -> Result<Vec<Option<(i64, String)>>, StoreError>;

    /// The newest stored audit row (highest id): `(id, MAC)` (`None` MAC:
    /// the row has none), or `None` when there is no audit row. Verifies
    /// nothing (`token-broker audit head`).
    async fn newest_audit_row(&self) -> Result<Option<(i64, Option<String>)>, StoreError>;

    /// How many audit rows each key id protects, for `keys status`:
    /// `(chain, fingerprint)`, each key id -> rows. `chain` counts every
    /// row by `chain_key_id`; `fingerprint` counts the rows with a token
    /// fingerprint by `fingerprint_key_id`; NULL counts as
    /// [`DEFAULT_KEY_ID`]. Key ids with no rows are absent. One pass over
    /// the index `audit_events_key_ids_idx` (migration 0009); every
    /// command that opens the database runs it (`keycheck::check_keys`).
    async fn count_audit_rows_by_key(
        &self,
    ) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>), StoreError>;

    /// The lease whose PAT has one of `fingerprints`, `(fingerprint key id,
    /// hex fingerprint)` pairs: the lease of the oldest allowed
    /// `lease.create` audit row carrying such a fingerprint under that key
    /// id (NULL `fingerprint_key_id` counts as [`DEFAULT_KEY_ID`]). One
    /// query over the fingerprint index (migration 0012). `None` when no
    /// row matches (or `fingerprints` is empty). The lease row itself may
    /// since have been deleted.
    async fn find_lease_by_token_fingerprint(
        &self,
        fingerprints: &[(String, String)],
    ) -> Result<Option<LeaseId>, StoreError>;

    /// Audit rows with id > `after_id`, oldest first, at most `limit`,
    /// with their stored MACs; unparsable rows are returned, not skipped.
    async fn list_audit_chain(
        &self,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredAuditRow>, StoreError>;

    /// Audit events with id > `after_id`, oldest first, at most `limit`.
    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.list_audit_matching(&AuditFilter::default(), after_id, limit)
            .await
    }

    /// Audit events matching `filter` with id > `after_id`, oldest first,
    /// at most `limit`: one indexed query (migrations 0005 and 0006; a time
    /// range is bounded by ids through `time_high`), so a page costs the
    /// same on a trail of a million rows as on a short one (BENCHMARKS.md,
    /// "Scale").
    async fn list_audit_matching(
        &self,
        filter: &AuditFilter,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    // ---- meta values and the upstream credential ----

    /// A small setting kept in the database (e.g. the deployment id).
    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores `value` under `key` unless a value is there; returns the
    /// stored value either way (race-safe across replicas).
    async fn put_meta_if_absent(&self, key: &str, value: &str) -> Result<String, StoreError>;

    /// The sealed upstream refresh token and its story, if one was saved.
    async fn load_upstream_credential(&self) -> Result<Option<UpstreamCredential>, StoreError>;

    /// Stores `new` as the next credential version when `write` allows it
    /// (see [`CredentialWrite`]); returns the new version, or `None` when
    /// nothing was written. One statement: a new version is stored whole
    /// or not at all.
    async fn save_upstream_credential(
        &self,
        new: &NewUpstreamCredential,
        write: CredentialWrite<'_>,
        now: Timestamp,
    ) -> Result<Option<i64>, StoreError>;

    /// Records how a refresh of `version` went, if it is still the stored
    /// version (a newer one has its own story). Returns whether it was.
    async fn record_upstream_refresh(
        &self,
        version: i64,
        record: &RefreshRecord,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    // ---- key checks and stored secrets (migration 0009) ----

    /// Records each of `checks` whose (purpose, key id) has none yet
    /// (insert if absent: replicas starting together record one value), and
    /// returns every recorded check, configured here or not.
    async fn record_key_checks(
        &self,
        checks: &[KeyCheck],
        now: Timestamp,
    ) -> Result<Vec<KeyCheck>, StoreError>;

    /// The sealing key ids of every stored secret (lease tokens and the
    /// upstream credential). Cheap: one indexed lookup per key id in use.
    async fn sealed_key_ids(&self) -> Result<BTreeSet<String>, StoreError>;

    /// How many stored secrets each of `key_ids` seals (0 for none): one
    /// indexed count per key id.
    async fn count_sealed_by_key(
        &self,
        key_ids: &[String],
    ) -> Result<BTreeMap<String, u64>, StoreError>;

    /// Stored secrets not sealed under `key_id`, at most `limit`, in a
    /// stable order (the upstream credential, then leases by id), after
    /// `after` (a secret an earlier page ended with; `None`: from the
    /// start).
    async fn list_secrets_not_under(
        &self,
        key_id: &str,
        after: Option<&SecretOwner>,
        limit: u32,
    ) -> Result<Vec<StoredSecret>, StoreError>;

    /// Replaces each secret that still holds its `old` value with `new`
    /// (compare-and-set per row, one transaction); returns how many were
    /// replaced. A row changed meanwhile (a live broker's write) is left
    /// as it is.
    async fn replace_secrets(&self, replacements: &[SecretReplacement]) -> Result<u64, StoreError>;
    // Managed credentials (issue 17; table `credential_versions`).

    /// Inserts `version` (a PENDING intent claimed by its minter) unless a
    /// row of its credential with that version number or a higher one
    /// exists: true if inserted. The primary key makes this the claim on
    /// minting that version, so concurrent replicas mint each version once;
    /// the "or higher" keeps a minter with a stale view from reusing a
    /// number retention deleted
    /// ([`Store::delete_closed_credential_versions`] keeps each
    /// credential's newest row, so numbers only grow).
    async fn insert_credential_version(
        &self,
        version: &CredentialVersionRecord,
    ) -> Result<bool, StoreError>;

    /// Every version of `credential` (None: of every credential), ordered
    /// by credential name, then newest version first.
    async fn list_credential_versions(
        &self,
        credential: Option<&str>,
    ) -> Result<Vec<CredentialVersionRecord>, StoreError>;

    /// What one engine pass needs: every live version (PENDING, CURRENT,
    /// PREVIOUS, REVOKING) of any credential, and the `recent` newest
    /// versions, in any state, of each credential in `names`; ordered as
    /// [`Store::list_credential_versions`], each once. Its cost follows the
    /// live versions and `names.len() * recent`, not the history: the live
    /// rows come from a partial index (migration 0014), the newest from the
    /// primary key.
    async fn list_credential_versions_in_use(
        &self,
        names: &[String],
        recent: u32,
    ) -> Result<Vec<CredentialVersionRecord>, StoreError>;

    /// Deletes up to `limit` closed credential versions (REVOKED, FAILED;
    /// never a live one) that closed before `closed_before` (their last
    /// write, `update_time`: a closed version is never written again),
    /// whose PAT is past its validTo (`expire_time` before
    /// `valid_to_before`; for a version upstream never answered for, with
    /// no `authorization_id` (a FAILED mint), `expire_time` is only what
    /// was asked for, so before `unrecorded_valid_to_before`), and that are
    /// not their credential's newest version (the highest number stays:
    /// the next number is derived from it and watchers resume after it).
    /// Oldest closed first; returns how many were deleted (fewer than
    /// `limit`: none of the rest is due). Audit rows are never deleted.
    async fn delete_closed_credential_versions(
        &self,
        closed_before: Timestamp,
        valid_to_before: Timestamp,
        unrecorded_valid_to_before: Timestamp,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Writes every mutable column of `version` (state, authorization id,
    /// sealed token (NULL unless CURRENT or PREVIOUS), times, attempts,
    /// error, claim) if its stored state is still `expected` and, with
    /// `claimer`, that claimer still holds it (compare-and-set); false if
    /// it moved or does not exist.
    async fn update_credential_version(
        &self,
        version: &CredentialVersionRecord,
        expected: VersionState,
        claimer: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// Makes the PENDING `version` (now CURRENT, with its token) stored, and
    /// in the same transaction turns every older CURRENT version of its
    /// credential PREVIOUS with `revoke_at = previous_revoke_at`; with
    /// `revoke_all_previous`, every older PREVIOUS version's `revoke_at`
    /// becomes at most `previous_revoke_at` too. False (nothing written)
    /// if the row is no longer PENDING or `claimer` (its minter) no longer
    /// holds it (a reconciler took it over).
    async fn activate_credential_version(
        &self,
        version: &CredentialVersionRecord,
        claimer: &str,
        previous_revoke_at: Timestamp,
        revoke_all_previous: bool,
    ) -> Result<bool, StoreError>;

    /// Claims version (`credential`, `version`) for `claimer` until `now +
    /// claim_for` if its state is `expected` and no live claim is held
    /// (`claimed_until` NULL or at most `now`), in one committed statement;
    /// the row as claimed, or None.
    async fn claim_credential_version(
        &self,
        credential: &str,
        version: i64,
        expected: VersionState,
        claimer: &str,
        now: Timestamp,
        claim_for: Duration,
    ) -> Result<Option<CredentialVersionRecord>, StoreError>;

    /// Records that the policy in force names exactly `present`, in one
    /// transaction: each is recorded (first seen `now`), a named one loses
    /// its `absent_since` and `retired_time` (a credential put back is
    /// managed again), and every other not yet absent or retired gets
    /// `absent_since = now`. Returns every recorded credential by name.
    async fn sync_managed_credentials(
        &self,
        present: &[String],
        now: Timestamp,
    ) -> Result<Vec<ManagedCredentialRecord>, StoreError>;

    /// Tells other replicas that `credential`'s versions changed, best
    /// effort: PostgreSQL `NOTIFY` on [`CREDENTIALS_CHANNEL`] with the name
    /// as payload; nothing on SQLite.
    async fn notify_credential_change(&self, credential: &str) -> Result<(), StoreError>;

    /// Retires `name` (`retired_time = now`) if it is absent since
    /// `absent_before` or earlier and not retired; true if it was.
    async fn retire_managed_credential(
        &self,
        name: &str,
        absent_before: Timestamp,
        now: Timestamp,
    ) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_database_errors_are_unavailable_and_the_rest_database() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        for err in [
            sqlx::Error::Io(refused),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
        ] {
            let mapped = map_sqlx(err);
            assert!(matches!(mapped, StoreError::Unavailable(_)), "{mapped:?}");
            assert_eq!(mapped.code(), ErrorCode::Unavailable);
            assert_eq!(mapped.reason(), "STORE_UNAVAILABLE");
        }
        let mapped = map_sqlx(sqlx::Error::RowNotFound);
        assert!(matches!(mapped, StoreError::Database(_)), "{mapped:?}");
        assert_eq!(mapped.code(), ErrorCode::Internal);
    }

    /// A database error carrying only a SQLSTATE, as a server would send it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "refused"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn sessions_refused_and_resources_exhausted_are_unavailable_with_a_retry_delay() {
        for code in [
            "08006", "57P01", "57P03", "3D000", "55000", "55006", "53000", "53100", "53200",
            "53300", "53400",
        ] {
            let mapped = map_sqlx(sqlx::Error::Database(Box::new(Sqlstate(code))));
            assert!(
                matches!(mapped, StoreError::Unavailable(_)),
                "{code}: {mapped:?}"
            );
            assert_eq!(mapped.reason(), "STORE_UNAVAILABLE", "{code}");
            assert_eq!(mapped.retry_after(), Some(Duration::from_secs(1)), "{code}");
        }
        for code in ["23505", "42P01", "40001", "XX000"] {
            let mapped = map_sqlx(sqlx::Error::Database(Box::new(Sqlstate(code))));
            assert!(
                matches!(mapped, StoreError::Database(_)),
                "{code}: {mapped:?}"
            );
            assert_eq!(mapped.code(), ErrorCode::Internal, "{code}");
            assert_eq!(mapped.retry_after(), None, "{code}");
        }
    }

    #[test]
    fn max_connections_is_split_so_each_kind_of_work_keeps_a_share() {
        assert_eq!(PoolShares::of(2), None);
        let split = |n| {
            let s = PoolShares::of(n).unwrap();
            assert_eq!(s.requests + s.background + s.audit, n);
            (s.requests, s.background, s.audit)
        };
        assert_eq!(split(3), (1, 1, 1));
        assert_eq!(split(10), (7, 2, 1));
        assert_eq!(split(50), (39, 10, 1));
    }
}
