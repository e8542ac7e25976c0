//! SQLite store: the embedded default for one-command local runs. One
//! replica only (claims still work, but nothing coordinates processes
//! beyond SQLite's file lock). WAL journal, 5 s busy timeout, foreign keys
//! on. Times are RFC 3339 text (see `codec::time_text`); ids are UUID text.
//!
//! Every write transaction starts with a write, so it takes the write lock
//! up front and waits on the busy timeout instead of failing on a stale
//! read snapshot.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::codec::{self, opt_time_text, parse_opt_time, parse_time, time_text};
use super::{
    map_migrate, map_sqlx, ChainMacFn, CreateOutcome, IdempotencyRecord, LeaseFilter, LeaseRecord,
    PageCursor, Store, StoreError, StoredAuditRow, UpstreamCredential, Work,
};
use crate::crypto::Sealed;
use crate::domain::{AuditEvent, AuthorizationId, Identity, LeaseId, LeaseState, Organization};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for the database lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite-backed [`super::Store`].
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

// Written by hand so connection settings (which may hold a password)
// never reach a log.
impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

/// Creates the database file, if missing, readable by its owner only
/// (0600 on Unix): it holds sealed tokens and the audit trail. SQLite gives
/// its `-wal` and `-shm` files the main file's permissions.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "cannot create SQLite database {}: {e}",
            path.display()
        ))),
    }
}

impl SqliteStore {
    /// Opens `url_or_path`: a `sqlite:` URL (`sqlite://broker.db`,
    /// `sqlite:///abs/path.db`, `sqlite::memory:`) or a bare file path.
    /// Creates the file if missing, owner-only (0600). Does not migrate.
    ///
    /// Errors: `Unavailable` if the file cannot be opened or created;
    /// `Database` for a malformed URL.
    pub async fn open(url_or_path: &str) -> Result<Self, StoreError> {
        let options = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path)
                .map_err(|e| StoreError::Database(format!("invalid SQLite URL: {e}")))?
        } else {
            SqliteConnectOptions::new().filename(url_or_path)
        };
        let in_memory = url_or_path.contains(":memory:") || url_or_path.contains("mode=memory");
        let options = options
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if !in_memory {
            create_private(options.get_filename())?;
        }
        let pool = if in_memory {
            // Each connection would be its own database: keep exactly one, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await
        } else {
            SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(
                    options
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal),
                )
                .await
        }
        .map_err(|e| match e {
            // A file that cannot be opened is a deployment problem, like a
            // refused connection.
            sqlx::Error::Database(db) => {
                StoreError::Unavailable(format!("cannot open SQLite database: {}", db.message()))
            }
            other => map_sqlx(other),
        })?;
        Ok(SqliteStore { pool })
    }

    /// The underlying pool (for tests and health checks).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn get_err(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn parse_uuid(column: &str, s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("{column} {s:?}: {e}")))
}

fn lease_from_row(row: &SqliteRow) -> Result<LeaseRecord, StoreError> {
    let text = |c: &str| row.try_get::<String, _>(c).map_err(get_err);
    let opt_text = |c: &str| row.try_get::<Option<String>, _>(c).map_err(get_err);
    Ok(LeaseRecord {
        id: LeaseId::from_uuid(parse_uuid("id", &text("id")?)?),
        holder: codec::parse_holder("holder", &text("holder")?)?,
        organization: codec::parse_organization(&text("organization")?)?,
        scopes: codec::parse_scopes(&text("scopes")?)?,
        display_name: text("display_name")?,
        authorization_id: opt_text("authorization_id")?
            .map(|s| parse_uuid("authorization_id", &s).map(AuthorizationId::from_uuid))
            .transpose()?,
        sealed_token: opt_text("sealed_token")?
            .map(|s| codec::decode_sealed("sealed_token", &s))
            .transpose()?,
        state: codec::parse_state(&text("state")?)?,
        create_time: parse_time("create_time", &text("create_time")?)?,
        update_time: parse_time("update_time", &text("update_time")?)?,
        expire_time: parse_time("expire_time", &text("expire_time")?)?,
        max_expire_time: parse_time("max_expire_time", &text("max_expire_time")?)?,
        revoke_time: parse_opt_time("revoke_time", opt_text("revoke_time")?)?,
        upstream_valid_to: parse_opt_time("upstream_valid_to", opt_text("upstream_valid_to")?)?,
        attempts: row.try_get("attempts").map_err(get_err)?,
        next_attempt_time: parse_opt_time("next_attempt_time", opt_text("next_attempt_time")?)?,
        last_error: opt_text("last_error")?,
        claimed_by: opt_text("claimed_by")?,
        claimed_until: parse_opt_time("claimed_until", opt_text("claimed_until")?)?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<IdempotencyRecord, StoreError> {
    let text = |c: &str| row.try_get::<String, _>(c).map_err(get_err);
    Ok(IdempotencyRecord {
        holder: codec::parse_holder("idempotency_keys.holder", &text("holder")?)?,
        request_id: parse_uuid("request_id", &text("request_id")?)?,
        fingerprint: text("fingerprint")?,
        lease_id: LeaseId::from_uuid(parse_uuid("lease_id", &text("lease_id")?)?),
        create_time: parse_time("create_time", &text("create_time")?)?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEvent, StoreError> {
    let text = |c: &str| row.try_get::<String, _>(c).map_err(get_err);
    let opt_text = |c: &str| row.try_get::<Option<String>, _>(c).map_err(get_err);
    Ok(AuditEvent {
        id: row.try_get("id").map_err(get_err)?,
        time: parse_time("time", &text("time")?)?,
        identity: text("identity")?,
        peer: opt_text("peer")?,
        action: text("action")?,
        outcome: codec::parse_outcome(&text("outcome")?)?,
        reason: opt_text("reason")?,
        policy_rule: opt_text("policy_rule")?,
        lease_id: opt_text("lease_id")?
            .map(|s| parse_uuid("lease_id", &s).map(LeaseId::from_uuid))
            .transpose()?,
        organization: opt_text("organization")?,
        scopes: opt_text("scopes")?,
        token_fingerprint: opt_text("token_fingerprint")?,
        caller_detail: opt_text("caller_detail")?,
    })
}

/// Inserts `event` without a MAC; returns the AUTOINCREMENT id.
async fn insert_audit(
    conn: &mut sqlx::SqliteConnection,
    event: &AuditEvent,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO audit_events (time, identity, peer, action, outcome, reason, policy_rule, \
         lease_id, organization, scopes, token_fingerprint, caller_detail) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(time_text(event.time))
    .bind(&event.identity)
    .bind(&event.peer)
    .bind(&event.action)
    .bind(event.outcome.as_str())
    .bind(&event.reason)
    .bind(&event.policy_rule)
    .bind(event.lease_id.map(|l| l.to_string()))
    .bind(&event.organization)
    .bind(&event.scopes)
    .bind(&event.token_fingerprint)
    .bind(&event.caller_detail)
    .fetch_one(conn)
    .await
    .map_err(map_sqlx)
}

const INSERT_LEASE: &str = "INSERT INTO leases (id, holder, organization, scopes, display_name, \
     authorization_id, sealed_token, state, create_time, update_time, expire_time, \
     max_expire_time, revoke_time, upstream_valid_to, attempts, next_attempt_time, last_error, \
     claimed_by, claimed_until) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

async fn insert_lease(
    conn: &mut sqlx::SqliteConnection,
    lease: &LeaseRecord,
) -> Result<(), StoreError> {
    sqlx::query(INSERT_LEASE)
        .bind(lease.id.to_string())
        .bind(lease.holder.to_string())
        .bind(lease.organization.as_str())
        .bind(lease.scopes.to_upstream())
        .bind(&lease.display_name)
        .bind(lease.authorization_id.map(|a| a.to_string()))
        .bind(lease.sealed_token.as_ref().map(codec::encode_sealed))
        .bind(lease.state.as_str())
        .bind(time_text(lease.create_time))
        .bind(time_text(lease.update_time))
        .bind(time_text(lease.expire_time))
        .bind(time_text(lease.max_expire_time))
        .bind(opt_time_text(lease.revoke_time))
        .bind(opt_time_text(lease.upstream_valid_to))
        .bind(lease.attempts)
        .bind(opt_time_text(lease.next_attempt_time))
        .bind(&lease.last_error)
        .bind(&lease.claimed_by)
        .bind(opt_time_text(lease.claimed_until))
        .execute(conn)
        .await
        .map_err(map_sqlx)?;
    Ok(())
}

impl SqliteStore {
    /// `update_lease` and `update_lease_unchanged`: one compare-and-set
    /// write, also on `update_time` when `read_update_time` is given.
    async fn write_lease(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
        read_update_time: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE leases SET authorization_id = ?, sealed_token = ?, state = ?, \
             update_time = ?, expire_time = ?, max_expire_time = ?, revoke_time = ?, \
             upstream_valid_to = ?, attempts = ?, next_attempt_time = ?, last_error = ?, \
             claimed_by = ?, claimed_until = ? \
             WHERE id = ?14 AND state = ?15 AND (?16 IS NULL OR update_time = ?16)",
        )
        .bind(lease.authorization_id.map(|a| a.to_string()))
        .bind(lease.sealed_token.as_ref().map(codec::encode_sealed))
        .bind(lease.state.as_str())
        .bind(time_text(lease.update_time))
        .bind(time_text(lease.expire_time))
        .bind(time_text(lease.max_expire_time))
        .bind(opt_time_text(lease.revoke_time))
        .bind(opt_time_text(lease.upstream_valid_to))
        .bind(lease.attempts)
        .bind(opt_time_text(lease.next_attempt_time))
        .bind(&lease.last_error)
        .bind(&lease.claimed_by)
        .bind(opt_time_text(lease.claimed_until))
        .bind(lease.id.to_string())
        .bind(expected.as_str())
        .bind(read_update_time.map(time_text))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        Ok(updated == 1)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(map_migrate)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    async fn create_lease(
        &self,
        lease: &LeaseRecord,
        key: Option<&IdempotencyRecord>,
    ) -> Result<CreateOutcome, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        insert_lease(&mut tx, lease).await?;
        if let Some(key) = key {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (holder, request_id, fingerprint, lease_id, create_time) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (holder, request_id) DO NOTHING",
            )
            .bind(key.holder.to_string())
            .bind(key.request_id.to_string())
            .bind(&key.fingerprint)
            .bind(key.lease_id.to_string())
            .bind(time_text(key.create_time))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?
            .rows_affected();
            if inserted == 0 {
                // Read the winner's key inside our write transaction (no
                // other writer can interleave), then write nothing.
                let existing = sqlx::query(
                    "SELECT * FROM idempotency_keys WHERE holder = ? AND request_id = ?",
                )
                .bind(key.holder.to_string())
                .bind(key.request_id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx)?;
                let existing = key_from_row(&existing)?;
                tx.rollback().await.map_err(map_sqlx)?;
                return Ok(CreateOutcome::Existing(existing));
            }
        }
        tx.commit().await.map_err(map_sqlx)?;
        Ok(CreateOutcome::Created)
    }

    async fn replace_failed_lease(
        &self,
        lease: &LeaseRecord,
        key: &IdempotencyRecord,
        failed: LeaseId,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        insert_lease(&mut tx, lease).await?;
        let repointed = sqlx::query(
            "UPDATE idempotency_keys SET lease_id = ?, fingerprint = ? \
             WHERE holder = ? AND request_id = ? AND lease_id = ?",
        )
        .bind(lease.id.to_string())
        .bind(&key.fingerprint)
        .bind(key.holder.to_string())
        .bind(key.request_id.to_string())
        .bind(failed.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        if repointed == 1 {
            tx.commit().await.map_err(map_sqlx)?;
            Ok(true)
        } else {
            tx.rollback().await.map_err(map_sqlx)?;
            Ok(false)
        }
    }

    async fn get_lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        sqlx::query("SELECT * FROM leases WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?
            .as_ref()
            .map(lease_from_row)
            .transpose()
    }

    async fn list_leases(
        &self,
        filter: &LeaseFilter,
        after: Option<&PageCursor>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut q = QueryBuilder::<sqlx::Sqlite>::new("SELECT * FROM leases WHERE 1");
        if let Some(holder) = &filter.holder {
            q.push(" AND holder = ").push_bind(holder.to_string());
        }
        if let Some(org) = &filter.organization {
            q.push(" AND organization = ")
                .push_bind(org.as_str().to_owned());
        }
        if !filter.states.is_empty() {
            q.push(" AND state IN (");
            let mut states = q.separated(", ");
            for state in &filter.states {
                states.push_bind(state.as_str());
            }
            q.push(")");
        }
        if let Some(cursor) = after {
            let t = time_text(cursor.create_time);
            q.push(" AND (create_time < ")
                .push_bind(t.clone())
                .push(" OR (create_time = ")
                .push_bind(t)
                .push(" AND id < ")
                .push_bind(cursor.id.to_string())
                .push("))");
        }
        q.push(" ORDER BY create_time DESC, id DESC LIMIT ")
            .push_bind(i64::from(limit));
        q.build()
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?
            .iter()
            .map(lease_from_row)
            .collect()
    }

    async fn update_lease(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
    ) -> Result<bool, StoreError> {
        self.write_lease(lease, expected, None).await
    }

    async fn update_lease_unchanged(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
        read_update_time: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.write_lease(lease, expected, Some(read_update_time))
            .await
    }

    async fn get_idempotency(
        &self,
        holder: &Identity,
        request_id: Uuid,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        sqlx::query("SELECT * FROM idempotency_keys WHERE holder = ? AND request_id = ?")
            .bind(holder.to_string())
            .bind(request_id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn claim_due(
        &self,
        work: Work,
        now: DateTime<Utc>,
        claimer: &str,
        claim_for: Duration,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let claimed_until = now + codec::claim_duration(claim_for)?;
        let (due, order_by, due_bound) = match work {
            Work::Expiry => ("state = 'ACTIVE' AND expire_time <= ?1", "expire_time", now),
            Work::Revocation => (
                "state IN ('REVOKING', 'REVOKE_FAILED') \
                 AND (next_attempt_time IS NULL OR next_attempt_time <= ?1)",
                "next_attempt_time",
                now,
            ),
            Work::Reconcile { older_than } => (
                "state = 'PENDING' AND create_time < ?1",
                "create_time",
                codec::cutoff_before(now, older_than),
            ),
        };
        // One statement: SQLite runs it under its write lock, so two
        // claimers never take the same row.
        let sql = format!(
            "UPDATE leases SET claimed_by = ?2, claimed_until = ?3 WHERE id IN ( \
               SELECT id FROM leases WHERE {due} \
                 AND (claimed_until IS NULL OR claimed_until <= ?4) \
               ORDER BY {order_by}, id LIMIT ?5) \
             RETURNING *"
        );
        let mut leases = sqlx::query(&sql)
            .bind(time_text(due_bound))
            .bind(claimer)
            .bind(time_text(claimed_until))
            .bind(time_text(now))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?
            .iter()
            .map(lease_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        codec::sort_due(&mut leases, work);
        Ok(leases)
    }

    async fn release_claim(&self, id: LeaseId, claimer: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leases SET claimed_by = NULL, claimed_until = NULL \
             WHERE id = ? AND claimed_by = ?",
        )
        .bind(id.to_string())
        .bind(claimer)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn count_live_leases(&self, holder: &Identity) -> Result<u64, StoreError> {
        let [a, b, c] = codec::LIVE_STATES.map(|s| s.as_str());
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM leases WHERE holder = ? AND state IN (?, ?, ?)",
        )
        .bind(holder.to_string())
        .bind(a)
        .bind(b)
        .bind(c)
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(count as u64)
    }

    async fn count_leases_in_state(&self, state: LeaseState) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM leases WHERE state = ?")
            .bind(state.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(count as u64)
    }

    async fn claim_lease(
        &self,
        id: LeaseId,
        expected: LeaseState,
        now: DateTime<Utc>,
        claimer: &str,
        claim_for: Duration,
        unchanged_before: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE leases SET claimed_by = ?2, claimed_until = ?3 \
             WHERE id = ?1 AND (claimed_until IS NULL OR claimed_until <= ?4) \
               AND update_time < ?5 AND state = ?6",
        )
        .bind(id.to_string())
        .bind(claimer)
        .bind(time_text(now + codec::claim_duration(claim_for)?))
        .bind(time_text(now))
        .bind(time_text(unchanged_before))
        .bind(expected.as_str())
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(done.rows_affected() == 1)
    }

    async fn lease_organizations(&self) -> Result<Vec<Organization>, StoreError> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT organization FROM leases ORDER BY organization")
                .fetch_all(&self.pool)
                .await
                .map_err(map_sqlx)?;
        names.iter().map(|n| codec::parse_organization(n)).collect()
    }

    async fn claim_job(
        &self,
        name: &str,
        now: DateTime<Utc>,
        claimer: &str,
        claim_for: Duration,
        interval: Duration,
    ) -> Result<bool, StoreError> {
        // One statement under SQLite's write lock; an upsert whose WHERE
        // fails returns no row.
        let claimed: Option<String> = sqlx::query_scalar(
            "INSERT INTO background_jobs AS j (name, claimed_by, claimed_until) \
             VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE \
               SET claimed_by = excluded.claimed_by, claimed_until = excluded.claimed_until \
               WHERE (j.claimed_until IS NULL OR j.claimed_until <= ?4) \
                 AND (j.last_run_time IS NULL OR j.last_run_time <= ?5) \
             RETURNING name",
        )
        .bind(name)
        .bind(claimer)
        .bind(time_text(now + codec::claim_duration(claim_for)?))
        .bind(time_text(now))
        .bind(time_text(codec::cutoff_before(now, interval)))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(claimed.is_some())
    }

    async fn finish_job(
        &self,
        name: &str,
        claimer: &str,
        run_time: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE background_jobs \
             SET last_run_time = ?3, claimed_by = NULL, claimed_until = NULL \
             WHERE name = ?1 AND claimed_by = ?2",
        )
        .bind(name)
        .bind(claimer)
        .bind(time_text(run_time))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError> {
        insert_audit(&mut *self.pool.acquire().await.map_err(map_sqlx)?, event).await
    }

    async fn append_audit_chained(
        &self,
        event: &AuditEvent,
        mac: ChainMacFn<'_>,
    ) -> Result<(i64, String), StoreError> {
        // The insert comes first so the transaction holds the write lock
        // before it reads the previous MAC: appends from several
        // connections (or processes) are serialized by SQLite's one writer.
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let id = insert_audit(&mut tx, event).await?;
        let prev: Option<Option<String>> = sqlx::query_scalar(
            "SELECT mac FROM audit_events WHERE id < ? ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        let stored = AuditEvent {
            id,
            time: codec::micros(event.time),
            ..event.clone()
        };
        let mac = mac(prev.flatten().as_deref(), &stored);
        sqlx::query("UPDATE audit_events SET mac = ? WHERE id = ?")
            .bind(&mac)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok((id, mac))
    }

    async fn list_audit_chain(
        &self,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<StoredAuditRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_events WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter()
            .map(|row| {
                Ok(StoredAuditRow {
                    id: row.try_get("id").map_err(get_err)?,
                    event: audit_from_row(row),
                    mac: row.try_get("mac").map_err(get_err)?,
                })
            })
            .collect()
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        sqlx::query("SELECT * FROM audit_events WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    async fn put_meta_if_absent(&self, key: &str, value: &str) -> Result<String, StoreError> {
        // RETURNING on an upsert that changes nothing returns no row, so
        // write a no-op update instead and read the stored value back.
        sqlx::query_scalar(
            "INSERT INTO meta (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = meta.value RETURNING value",
        )
        .bind(key)
        .bind(value)
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)
    }

    async fn load_upstream_credential(&self) -> Result<Option<UpstreamCredential>, StoreError> {
        let row = sqlx::query("SELECT version, sealed, update_time FROM upstream_credentials")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?;
        let Some(row) = row else { return Ok(None) };
        let sealed: String = row.try_get("sealed").map_err(get_err)?;
        let update_time: String = row.try_get("update_time").map_err(get_err)?;
        Ok(Some(UpstreamCredential {
            version: row.try_get("version").map_err(get_err)?,
            sealed: codec::decode_sealed("upstream_credentials.sealed", &sealed)?,
            update_time: parse_time("upstream_credentials.update_time", &update_time)?,
        }))
    }

    async fn save_upstream_credential(
        &self,
        expected_version: Option<i64>,
        sealed: &Sealed,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let text = codec::encode_sealed(sealed);
        let written = match expected_version {
            None => sqlx::query(
                "INSERT INTO upstream_credentials (id, version, sealed, update_time) \
                 VALUES (1, 1, ?, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind(text)
            .bind(time_text(now)),
            Some(version) => sqlx::query(
                "UPDATE upstream_credentials SET version = version + 1, sealed = ?, \
                 update_time = ? WHERE id = 1 AND version = ?",
            )
            .bind(text)
            .bind(time_text(now))
            .bind(version),
        }
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        Ok(written == 1)
    }
}
