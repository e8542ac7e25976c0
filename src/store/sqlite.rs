//! SQLite store: the embedded default for one-command local runs. One
//! replica only (claims still work, but nothing coordinates processes
//! beyond SQLite's file lock). WAL journal, 5 s busy timeout, foreign keys
//! on. Times are RFC 3339 text (see `Timestamp::to_text`); ids are UUID text.
//!
//! Every write transaction starts with a write (or `BEGIN IMMEDIATE`), so
//! it takes the write lock up front and waits on the busy timeout instead
//! of failing on a stale read snapshot.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::Transaction;

use super::sql::{Dialect, SqlStore};
use super::{map_migrate, map_sqlx, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for the database lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite-backed [`super::Store`].
pub type SqliteStore = SqlStore<Sqlite>;

/// Pool settings for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// Most connections the pool opens (an in-memory database: always 1).
    /// Reads run side by side; writes take SQLite's one write lock in turn.
    pub max_connections: u32,
    /// How long a call waits for a connection of the pool before failing
    /// with `Unavailable` (then the busy timeout applies to the write lock).
    pub acquire_timeout: Duration,
}

impl Default for SqliteOptions {
    /// 8 connections, 10 s acquire timeout.
    fn default() -> Self {
        SqliteOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether `url_or_path` names an in-memory database, which lives only as
/// long as its one connection.
pub(super) fn is_in_memory(url_or_path: &str) -> bool {
    url_or_path.contains(":memory:") || url_or_path.contains("mode=memory")
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

impl SqlStore<Sqlite> {
    /// Opens `url_or_path`: a `sqlite:` URL (`sqlite://broker.db`,
    /// `sqlite:///abs/path.db`, `sqlite::memory:`) or a bare file path.
    /// Creates the file if missing, owner-only (0600). Does not migrate.
    ///
    /// Errors: `Unavailable` if the file cannot be opened or created;
    /// `Database` for a malformed URL.
    pub async fn open(url_or_path: &str) -> Result<Self, StoreError> {
        Self::open_with(url_or_path, SqliteOptions::default()).await
    }

    /// [`SqliteStore::open`] with explicit pool settings.
    pub async fn open_with(url_or_path: &str, pool: SqliteOptions) -> Result<Self, StoreError> {
        let options = if url_or_path.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url_or_path)
                .map_err(|e| StoreError::Database(format!("invalid SQLite URL: {e}")))?
        } else {
            SqliteConnectOptions::new().filename(url_or_path)
        };
        let in_memory = is_in_memory(url_or_path);
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
                .acquire_timeout(pool.acquire_timeout)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await
        } else {
            SqlitePoolOptions::new()
                .max_connections(pool.max_connections)
                .acquire_timeout(pool.acquire_timeout)
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
        Ok(SqlStore { pool })
    }
}

impl Dialect for Sqlite {
    const STORE_NAME: &'static str = "SqliteStore";
    const DB_SYSTEM: &'static str = "sqlite";
    const CLAIM_LOCK: &'static str = "";
    const SERIALIZE_AUDIT_APPEND: Option<&'static str> = None;
    const AUDIT_INSERT_ID: &'static str = "";
    const LAST_AUDIT_ID: &'static str =
        "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'), 0)";
    const LATE_AUDIT_ROWS: &'static str = "INDEXED BY audit_events_late_time_idx";
    const NOTIFY_CREDENTIALS: Option<&'static str> = None;
    const SEALED_KEY_ID: &'static str =
        "substr(sealed_token, 4, instr(substr(sealed_token, 4), ':') - 1)";

    async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
        MIGRATOR.run(pool).await.map_err(map_migrate)
    }

    async fn pending_migrations(pool: &SqlitePool) -> Result<Vec<i64>, StoreError> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
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

    /// A transaction that takes SQLite's one write lock up front, so
    /// appends from several connections (or processes) are serialized.
    async fn begin_audit_append(
        pool: &SqlitePool,
    ) -> Result<Transaction<'static, Sqlite>, StoreError> {
        pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_sqlx)
    }

    const SERIALIZE_HOLDER: Option<&'static str> = None;

    /// Takes the one write lock up front, like an audit append: a deferred
    /// transaction would count under a read snapshot another writer can
    /// outdate before the insert.
    async fn begin_quota_create(
        pool: &SqlitePool,
    ) -> Result<Transaction<'static, Sqlite>, StoreError> {
        pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_sqlx)
    }
}
