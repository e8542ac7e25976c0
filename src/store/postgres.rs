//! PostgreSQL store: the production backend. Several replicas may share one
//! database: migrations run under sqlx's advisory lock and background work
//! is claimed with `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::Transaction;

use super::sql::{Dialect, SqlStore};
use super::{map_migrate, map_sqlx, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Pool settings for [`PostgresStore::connect_with`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a call waits for a connection (including while the server
    /// refuses connections) before failing with `Unavailable`.
    pub acquire_timeout: Duration,
    /// `application_name` of every connection, so `pg_stat_activity` shows
    /// whose they are.
    pub application_name: String,
}

impl Default for PostgresOptions {
    /// 10 connections, 10 s acquire timeout, `application_name`
    /// `token-broker`.
    fn default() -> Self {
        PostgresOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            application_name: "token-broker".to_owned(),
        }
    }
}

/// PostgreSQL-backed [`super::Store`].
pub type PostgresStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
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
        let connect = connect.application_name(&options.application_name);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(map_sqlx)?;
        Ok(SqlStore { pool })
    }
}

impl Dialect for Postgres {
    const STORE_NAME: &'static str = "PostgresStore";
    const DB_SYSTEM: &'static str = "postgresql";
    const CLAIM_LOCK: &'static str = "FOR UPDATE SKIP LOCKED";
    const AUDIT_INSERT_ID: &'static str = "OVERRIDING SYSTEM VALUE";
    /// The greater of the newest row's id and the highest id ever
    /// written (migration 0010), so an id is never reused.
    const LAST_AUDIT_ID: &'static str =
        "GREATEST(COALESCE((SELECT max(id) FROM audit_events), 0), \
         COALESCE((SELECT id FROM audit_id_high), 0))";
    /// The advisory lock that serializes appends across replicas; its key
    /// is ASCII "tbaudit1" (0x7462_6175_6469_7431), the key every release
    /// has used, so old and new replicas exclude each other.
    const SERIALIZE_AUDIT_APPEND: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(8386372612940985393)");
    const LATE_AUDIT_ROWS: &'static str = "";
    const SEALED_KEY_ID: &'static str = "split_part(sealed_token, ':', 2)";
    const NOTIFY_CREDENTIALS: Option<&'static str> =
        Some("SELECT pg_notify('token_broker_credentials', $1)");

    async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
        MIGRATOR.run(pool).await.map_err(map_migrate)
    }

    async fn pending_migrations(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await
            .map_err(map_sqlx)?;
        let applied: Vec<i64> = if exists {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await
                .map_err(map_sqlx)?
        } else {
            Vec::new()
        };
        Ok(super::pending_versions(&MIGRATOR, &applied))
    }

    /// A plain transaction: the advisory lock is taken later
    /// ([`Dialect::SERIALIZE_AUDIT_APPEND`]).
    async fn begin_audit_append(
        pool: &PgPool,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        pool.begin().await.map_err(map_sqlx)
    }

    /// The two-key advisory lock space, first key ASCII "tbqu" (quota), so
    /// it never meets the audit lock's single bigint key; second key the
    /// holder's hash (two holders sharing a hash only wait for each other).
    const SERIALIZE_HOLDER: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(1952608629, hashtext($1))");

    async fn begin_quota_create(
        pool: &PgPool,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        pool.begin().await.map_err(map_sqlx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_append_lock_key_is_the_one_every_release_used() {
        let key = i64::from_be_bytes(*b"tbaudit1");
        assert_eq!(key, 0x7462_6175_6469_7431);
        assert_eq!(
            <Postgres as Dialect>::SERIALIZE_AUDIT_APPEND,
            Some(format!("SELECT pg_advisory_xact_lock({key})").as_str())
        );
    }
}
