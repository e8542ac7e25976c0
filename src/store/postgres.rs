//! PostgreSQL store: the production backend. Several replicas may share one
//! database: migrations run under sqlx's advisory lock and background work
//! is claimed with `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::codec::{self, micros};
use super::{
    map_migrate, map_sqlx, ChainMacFn, CreateOutcome, IdempotencyRecord, LeaseFilter, LeaseRecord,
    PageCursor, Store, StoreError, StoredAuditRow, UpstreamCredential, Work,
};
use crate::crypto::Sealed;
use crate::domain::{AuditEvent, AuthorizationId, Identity, LeaseId, LeaseState, Organization};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Advisory lock key that serializes audit appends (ASCII "tbaudit1").
const AUDIT_APPEND_LOCK: i64 = 0x7462_6175_6469_7431;

/// Pool settings for [`PostgresStore::connect_with`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection (including while the server
    /// refuses connections) before failing with `Unavailable`.
    pub acquire_timeout: Duration,
}

impl Default for PostgresOptions {
    /// 10 connections, 10 s acquire timeout.
    fn default() -> Self {
        PostgresOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// PostgreSQL-backed [`super::Store`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

// Written by hand so connection settings (which may hold a password)
// never reach a log.
impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DB`) with
    /// [`PostgresOptions::default`]. Does not migrate.
    ///
    /// Errors: `Unavailable` if no connection succeeds within the acquire
    /// timeout; `Database` for a malformed URL. Neither holds the URL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`PostgresStore::connect`] with explicit pool settings.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::Database(format!("invalid PostgreSQL URL: {e}"))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(map_sqlx)?;
        Ok(PostgresStore { pool })
    }

    /// The underlying pool (for tests and health checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn lease_from_row(row: &PgRow) -> Result<LeaseRecord, StoreError> {
    let get_err = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let holder: String = row.try_get("holder").map_err(get_err)?;
    let organization: String = row.try_get("organization").map_err(get_err)?;
    let scopes: String = row.try_get("scopes").map_err(get_err)?;
    let state: String = row.try_get("state").map_err(get_err)?;
    let sealed: Option<String> = row.try_get("sealed_token").map_err(get_err)?;
    Ok(LeaseRecord {
        id: LeaseId::from_uuid(row.try_get("id").map_err(get_err)?),
        holder: codec::parse_holder("holder", &holder)?,
        organization: codec::parse_organization(&organization)?,
        scopes: codec::parse_scopes(&scopes)?,
        display_name: row.try_get("display_name").map_err(get_err)?,
        authorization_id: row
            .try_get::<Option<Uuid>, _>("authorization_id")
            .map_err(get_err)?
            .map(AuthorizationId::from_uuid),
        sealed_token: sealed
            .map(|s| codec::decode_sealed("sealed_token", &s))
            .transpose()?,
        state: codec::parse_state(&state)?,
        create_time: row.try_get("create_time").map_err(get_err)?,
        update_time: row.try_get("update_time").map_err(get_err)?,
        expire_time: row.try_get("expire_time").map_err(get_err)?,
        max_expire_time: row.try_get("max_expire_time").map_err(get_err)?,
        revoke_time: row.try_get("revoke_time").map_err(get_err)?,
        upstream_valid_to: row.try_get("upstream_valid_to").map_err(get_err)?,
        attempts: row.try_get("attempts").map_err(get_err)?,
        next_attempt_time: row.try_get("next_attempt_time").map_err(get_err)?,
        last_error: row.try_get("last_error").map_err(get_err)?,
        claimed_by: row.try_get("claimed_by").map_err(get_err)?,
        claimed_until: row.try_get("claimed_until").map_err(get_err)?,
    })
}

fn key_from_row(row: &PgRow) -> Result<IdempotencyRecord, StoreError> {
    let get_err = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let holder: String = row.try_get("holder").map_err(get_err)?;
    Ok(IdempotencyRecord {
        holder: codec::parse_holder("idempotency_keys.holder", &holder)?,
        request_id: row.try_get("request_id").map_err(get_err)?,
        fingerprint: row.try_get("fingerprint").map_err(get_err)?,
        lease_id: LeaseId::from_uuid(row.try_get("lease_id").map_err(get_err)?),
        create_time: row.try_get("create_time").map_err(get_err)?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditEvent, StoreError> {
    let get_err = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let outcome: String = row.try_get("outcome").map_err(get_err)?;
    Ok(AuditEvent {
        id: row.try_get("id").map_err(get_err)?,
        time: row.try_get("time").map_err(get_err)?,
        identity: row.try_get("identity").map_err(get_err)?,
        peer: row.try_get("peer").map_err(get_err)?,
        action: row.try_get("action").map_err(get_err)?,
        outcome: codec::parse_outcome(&outcome)?,
        reason: row.try_get("reason").map_err(get_err)?,
        policy_rule: row.try_get("policy_rule").map_err(get_err)?,
        lease_id: row
            .try_get::<Option<Uuid>, _>("lease_id")
            .map_err(get_err)?
            .map(LeaseId::from_uuid),
        organization: row.try_get("organization").map_err(get_err)?,
        scopes: row.try_get("scopes").map_err(get_err)?,
        token_fingerprint: row.try_get("token_fingerprint").map_err(get_err)?,
        caller_detail: row.try_get("caller_detail").map_err(get_err)?,
    })
}

/// Starts an audit append: a transaction holding the advisory lock that
/// serializes appends across replicas, so ids follow commit order and each
/// chained row sees the MAC of the row committed just before it.
async fn begin_audit_append(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await.map_err(map_sqlx)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_APPEND_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
    Ok(tx)
}

/// The next audit id (newest + 1, so a rolled-back append leaves no gap,
/// which an identity sequence would) and the newest row's MAC. Call under
/// the append lock.
async fn next_audit_link(
    conn: &mut sqlx::PgConnection,
) -> Result<(i64, Option<String>), StoreError> {
    let newest: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, mac FROM audit_events ORDER BY id DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_sqlx)?;
    let (id, mac) = newest.unwrap_or((0, None));
    let next = id
        .checked_add(1)
        .ok_or_else(|| StoreError::Database("audit id space exhausted".into()))?;
    Ok((next, mac))
}

async fn insert_audit(
    conn: &mut sqlx::PgConnection,
    id: i64,
    event: &AuditEvent,
    mac: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, time, identity, peer, action, outcome, reason, \
         policy_rule, lease_id, organization, scopes, token_fingerprint, mac, caller_detail) \
         OVERRIDING SYSTEM VALUE \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(id)
    .bind(micros(event.time))
    .bind(&event.identity)
    .bind(&event.peer)
    .bind(&event.action)
    .bind(event.outcome.as_str())
    .bind(&event.reason)
    .bind(&event.policy_rule)
    .bind(event.lease_id.map(|l| l.as_uuid()))
    .bind(&event.organization)
    .bind(&event.scopes)
    .bind(&event.token_fingerprint)
    .bind(mac)
    .bind(&event.caller_detail)
    .execute(conn)
    .await
    .map_err(map_sqlx)?;
    Ok(())
}

const INSERT_LEASE: &str = "INSERT INTO leases (id, holder, organization, scopes, display_name, \
     authorization_id, sealed_token, state, create_time, update_time, expire_time, \
     max_expire_time, revoke_time, upstream_valid_to, attempts, next_attempt_time, last_error, \
     claimed_by, claimed_until) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)";

async fn insert_lease(
    conn: &mut sqlx::PgConnection,
    lease: &LeaseRecord,
) -> Result<(), StoreError> {
    sqlx::query(INSERT_LEASE)
        .bind(lease.id.as_uuid())
        .bind(lease.holder.to_string())
        .bind(lease.organization.as_str())
        .bind(lease.scopes.to_upstream())
        .bind(&lease.display_name)
        .bind(lease.authorization_id.map(|a| a.as_uuid()))
        .bind(lease.sealed_token.as_ref().map(codec::encode_sealed))
        .bind(lease.state.as_str())
        .bind(micros(lease.create_time))
        .bind(micros(lease.update_time))
        .bind(micros(lease.expire_time))
        .bind(micros(lease.max_expire_time))
        .bind(lease.revoke_time.map(micros))
        .bind(lease.upstream_valid_to.map(micros))
        .bind(lease.attempts)
        .bind(lease.next_attempt_time.map(micros))
        .bind(&lease.last_error)
        .bind(&lease.claimed_by)
        .bind(lease.claimed_until.map(micros))
        .execute(conn)
        .await
        .map_err(map_sqlx)?;
    Ok(())
}

/// Where each kind of work is due, as SQL over `leases` with `$1` = now,
/// and the column it is ordered by.
fn due_condition(work: Work, now: DateTime<Utc>) -> (String, &'static str, DateTime<Utc>) {
    match work {
        Work::Expiry => (
            "state = 'ACTIVE' AND expire_time <= $1".into(),
            "expire_time",
            now,
        ),
        Work::Revocation => (
            "state IN ('REVOKING', 'REVOKE_FAILED') \
             AND (next_attempt_time IS NULL OR next_attempt_time <= $1)"
                .into(),
            "next_attempt_time",
            now,
        ),
        Work::Reconcile { older_than } => (
            "state = 'PENDING' AND create_time < $1".into(),
            "create_time",
            codec::cutoff_before(now, older_than),
        ),
    }
}

impl PostgresStore {
    /// `update_lease` and `update_lease_unchanged`: one compare-and-set
    /// write, also on `update_time` when `read_update_time` is given.
    async fn write_lease(
        &self,
        lease: &LeaseRecord,
        expected: LeaseState,
        read_update_time: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE leases SET authorization_id = $1, sealed_token = $2, state = $3, \
             update_time = $4, expire_time = $5, max_expire_time = $6, revoke_time = $7, \
             upstream_valid_to = $8, attempts = $9, next_attempt_time = $10, last_error = $11, \
             claimed_by = $12, claimed_until = $13 \
             WHERE id = $14 AND state = $15 AND ($16::timestamptz IS NULL OR update_time = $16)",
        )
        .bind(lease.authorization_id.map(|a| a.as_uuid()))
        .bind(lease.sealed_token.as_ref().map(codec::encode_sealed))
        .bind(lease.state.as_str())
        .bind(micros(lease.update_time))
        .bind(micros(lease.expire_time))
        .bind(micros(lease.max_expire_time))
        .bind(lease.revoke_time.map(micros))
        .bind(lease.upstream_valid_to.map(micros))
        .bind(lease.attempts)
        .bind(lease.next_attempt_time.map(micros))
        .bind(&lease.last_error)
        .bind(&lease.claimed_by)
        .bind(lease.claimed_until.map(micros))
        .bind(lease.id.as_uuid())
        .bind(expected.as_str())
        .bind(read_update_time.map(micros))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        Ok(updated == 1)
    }
}

#[async_trait]
impl Store for PostgresStore {
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
        let Some(key) = key else {
            let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
            insert_lease(&mut conn, lease).await?;
            return Ok(CreateOutcome::Created);
        };
        // A concurrent creator with the same key makes our key insert wait
        // for its commit, then do nothing; we roll back our lease and read
        // the winner's key. If the winner rolled back meanwhile, try again.
        for _ in 0..3 {
            let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
            insert_lease(&mut tx, lease).await?;
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (holder, request_id, fingerprint, lease_id, create_time) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (holder, request_id) DO NOTHING",
            )
            .bind(key.holder.to_string())
            .bind(key.request_id)
            .bind(&key.fingerprint)
            .bind(key.lease_id.as_uuid())
            .bind(micros(key.create_time))
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?
            .rows_affected();
            if inserted == 1 {
                tx.commit().await.map_err(map_sqlx)?;
                return Ok(CreateOutcome::Created);
            }
            tx.rollback().await.map_err(map_sqlx)?;
            if let Some(existing) = self.get_idempotency(&key.holder, key.request_id).await? {
                return Ok(CreateOutcome::Existing(existing));
            }
        }
        Err(StoreError::Database(
            "idempotency key kept conflicting without a visible row".into(),
        ))
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
            "UPDATE idempotency_keys SET lease_id = $1, fingerprint = $2 \
             WHERE holder = $3 AND request_id = $4 AND lease_id = $5",
        )
        .bind(lease.id.as_uuid())
        .bind(&key.fingerprint)
        .bind(key.holder.to_string())
        .bind(key.request_id)
        .bind(failed.as_uuid())
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
        sqlx::query("SELECT * FROM leases WHERE id = $1")
            .bind(id.as_uuid())
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
        let mut q = QueryBuilder::<sqlx::Postgres>::new("SELECT * FROM leases WHERE TRUE");
        if let Some(holder) = &filter.holder {
            q.push(" AND holder = ").push_bind(holder.to_string());
        }
        if let Some(org) = &filter.organization {
            q.push(" AND organization = ")
                .push_bind(org.as_str().to_owned());
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(LeaseState::as_str).collect();
            q.push(" AND state = ANY(").push_bind(states).push(")");
        }
        if let Some(cursor) = after {
            q.push(" AND (create_time, id) < (")
                .push_bind(micros(cursor.create_time))
                .push(", ")
                .push_bind(cursor.id.as_uuid())
                .push(")");
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
        sqlx::query("SELECT * FROM idempotency_keys WHERE holder = $1 AND request_id = $2")
            .bind(holder.to_string())
            .bind(request_id)
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
        let now = micros(now);
        let claimed_until = micros(now + codec::claim_duration(claim_for)?);
        let (due, order_by, due_bound) = due_condition(work, now);
        // One statement, committed on return: rows another replica has
        // locked are skipped, rows it has claimed are not due.
        let sql = format!(
            "UPDATE leases SET claimed_by = $2, claimed_until = $3 WHERE id IN ( \
               SELECT id FROM leases WHERE {due} \
                 AND (claimed_until IS NULL OR claimed_until <= $4) \
               ORDER BY {order_by} NULLS FIRST, id LIMIT $5 \
               FOR UPDATE SKIP LOCKED) \
             RETURNING *"
        );
        let mut leases = sqlx::query(&sql)
            .bind(due_bound)
            .bind(claimer)
            .bind(claimed_until)
            .bind(now)
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
             WHERE id = $1 AND claimed_by = $2",
        )
        .bind(id.as_uuid())
        .bind(claimer)
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn count_live_leases(&self, holder: &Identity) -> Result<u64, StoreError> {
        let live: Vec<&str> = codec::LIVE_STATES.iter().map(LeaseState::as_str).collect();
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM leases WHERE holder = $1 AND state = ANY($2)")
                .bind(holder.to_string())
                .bind(live)
                .fetch_one(&self.pool)
                .await
                .map_err(map_sqlx)?;
        Ok(count as u64)
    }

    async fn count_leases_in_state(&self, state: LeaseState) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM leases WHERE state = $1")
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
        let now = micros(now);
        let done = sqlx::query(
            "UPDATE leases SET claimed_by = $2, claimed_until = $3 \
             WHERE id = $1 AND (claimed_until IS NULL OR claimed_until <= $4) \
               AND update_time < $5 AND state = $6",
        )
        .bind(id.as_uuid())
        .bind(claimer)
        .bind(micros(now + codec::claim_duration(claim_for)?))
        .bind(now)
        .bind(micros(unchanged_before))
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
        let now = micros(now);
        // A concurrent upsert on the same name waits for this one's commit
        // and then sees the live claim, so it claims nothing.
        let claimed: Option<String> = sqlx::query_scalar(
            "INSERT INTO background_jobs AS j (name, claimed_by, claimed_until) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
               SET claimed_by = EXCLUDED.claimed_by, claimed_until = EXCLUDED.claimed_until \
               WHERE (j.claimed_until IS NULL OR j.claimed_until <= $4) \
                 AND (j.last_run_time IS NULL OR j.last_run_time <= $5) \
             RETURNING name",
        )
        .bind(name)
        .bind(claimer)
        .bind(micros(now + codec::claim_duration(claim_for)?))
        .bind(now)
        .bind(micros(codec::cutoff_before(now, interval)))
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
             SET last_run_time = $3, claimed_by = NULL, claimed_until = NULL \
             WHERE name = $1 AND claimed_by = $2",
        )
        .bind(name)
        .bind(claimer)
        .bind(micros(run_time))
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<i64, StoreError> {
        let mut tx = begin_audit_append(&self.pool).await?;
        let (id, _) = next_audit_link(&mut tx).await?;
        insert_audit(&mut tx, id, event, None).await?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(id)
    }

    async fn append_audit_chained(
        &self,
        event: &AuditEvent,
        mac: ChainMacFn<'_>,
    ) -> Result<(i64, String), StoreError> {
        let mut tx = begin_audit_append(&self.pool).await?;
        let (id, prev) = next_audit_link(&mut tx).await?;
        let stored = AuditEvent {
            id,
            time: micros(event.time),
            ..event.clone()
        };
        let mac = mac(prev.as_deref(), &stored);
        insert_audit(&mut tx, id, &stored, Some(&mac)).await?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok((id, mac))
    }

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
        rows.iter()
            .map(|row| {
                let get_err = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                Ok(StoredAuditRow {
                    id: row.try_get("id").map_err(get_err)?,
                    event: audit_from_row(row),
                    mac: row.try_get("mac").map_err(get_err)?,
                })
            })
            .collect()
    }

    async fn list_audit(&self, after_id: i64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        sqlx::query("SELECT * FROM audit_events WHERE id > $1 ORDER BY id LIMIT $2")
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
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)
    }

    async fn put_meta_if_absent(&self, key: &str, value: &str) -> Result<String, StoreError> {
        // A concurrent insert of the same key waits for the first to commit,
        // then does nothing; the read after it sees the winner's value.
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(map_sqlx)?;
        self.get_meta(key)
            .await?
            .ok_or_else(|| StoreError::Database(format!("meta key {key:?} vanished")))
    }

    async fn load_upstream_credential(&self) -> Result<Option<UpstreamCredential>, StoreError> {
        let row = sqlx::query("SELECT version, sealed, update_time FROM upstream_credentials")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_sqlx)?;
        let Some(row) = row else { return Ok(None) };
        let get_err = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        let sealed: String = row.try_get("sealed").map_err(get_err)?;
        Ok(Some(UpstreamCredential {
            version: row.try_get("version").map_err(get_err)?,
            sealed: codec::decode_sealed("upstream_credentials.sealed", &sealed)?,
            update_time: row.try_get("update_time").map_err(get_err)?,
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
                 VALUES (1, 1, $1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(text)
            .bind(micros(now)),
            Some(version) => sqlx::query(
                "UPDATE upstream_credentials SET version = version + 1, sealed = $1, \
                 update_time = $2 WHERE id = 1 AND version = $3",
            )
            .bind(text)
            .bind(micros(now))
            .bind(version),
        }
        .execute(&self.pool)
        .await
        .map_err(map_sqlx)?
        .rows_affected();
        Ok(written == 1)
    }
}
