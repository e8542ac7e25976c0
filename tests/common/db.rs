//! Test databases: a fresh PostgreSQL database per test (through
//! `DATABASE_URL`) and a SQLite file in a temporary directory.
//!
//! PostgreSQL must be reachable: a test never skips silently. Each test
//! database is named `tb_test_<unix seconds>_<random>`; [`TestDatabase`]
//! drops its database when dropped, and the first test of each process drops
//! leftovers (from killed runs) older than an hour.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use token_broker::store::{self, Store};

/// Used when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

const PREFIX: &str = "tb_test_";
const LEFTOVER_AGE_SECS: u64 = 3600;
static SWEPT: AtomicBool = AtomicBool::new(false);

/// The server to create test databases on: `DATABASE_URL` or the default.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with any password replaced, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable DATABASE_URL>".to_owned(),
    }
}

/// `admin_url` pointing at database `name`.
fn url_for(admin_url: &str, name: &str) -> String {
    let mut u = url::Url::parse(admin_url).unwrap_or_else(|e| {
        panic!("DATABASE_URL is not a URL ({e}); expected postgres://USER@HOST:PORT/DB")
    });
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// Connects to the admin database or panics saying how to provide one.
async fn admin_connection(admin_url: &str) -> PgConnection {
    let attempt = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(admin_url));
    match attempt.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "PostgreSQL is not reachable at {} ({e}). The integration tests need a real \
             PostgreSQL server: start one, or point the tests at yours with \
             DATABASE_URL=postgres://USER@HOST:PORT/DB (see README).",
            redacted(admin_url)
        ),
        Err(_) => panic!(
            "PostgreSQL at {} did not answer within 10 s. The integration tests need a real \
             PostgreSQL server: start one, or point the tests at yours with \
             DATABASE_URL=postgres://USER@HOST:PORT/DB (see README).",
            redacted(admin_url)
        ),
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Drops `tb_test_*` databases created more than an hour ago (killed runs).
async fn drop_leftovers(conn: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tb\\_test\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    let cutoff = unix_secs().saturating_sub(LEFTOVER_AGE_SECS);
    for name in names {
        let created = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|t| t < cutoff) {
            // Another process may be dropping it too: ignore failures.
            let _ = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                .execute(&mut *conn)
                .await;
        }
    }
}

/// A fresh PostgreSQL database, dropped (with its connections) on drop.
pub struct TestDatabase {
    /// `postgres://.../tb_test_...`.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database on the `DATABASE_URL` server.
    /// Panics with instructions if the server is unreachable.
    pub async fn create() -> TestDatabase {
        let admin_url = admin_url();
        let mut conn = admin_connection(&admin_url).await;
        if !SWEPT.swap(true, Ordering::SeqCst) {
            drop_leftovers(&mut conn).await;
        }
        let name = format!(
            "{PREFIX}{}_{}",
            unix_secs(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        // CREATE DATABASE fails while another session is copying template1
        // at the same moment; a short retry rides that out.
        let mut last_error = None;
        for _ in 0..10 {
            match sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
                .execute(&mut conn)
                .await
            {
                Ok(_) => {
                    last_error = None;
                    break;
                }
                Err(e) => {
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Some(e) = last_error {
            panic!("cannot create test database {name}: {e}");
        }
        let _ = conn.close().await;
        TestDatabase {
            url: url_for(&admin_url, &name),
            name,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        // Drop may run inside a runtime: do the async work on a thread of
        // its own and wait for it.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            runtime.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                            .execute(&mut conn)
                            .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// Makes a fresh database `tb_test_<random>` on the `DATABASE_URL` server
/// (default `postgres://postgres@127.0.0.1:5432/postgres`) and returns its
/// URL. Nothing drops it until the hourly leftover sweep: prefer
/// [`TestDatabase::create`], which drops it at the end of the test.
/// Panics, saying how to provide a server, if none is reachable.
pub async fn postgres_url() -> String {
    let db = TestDatabase::create().await;
    let url = db.url.clone();
    std::mem::forget(db);
    url
}

/// A SQLite URL for a new file inside `dir` (the file does not exist yet).
pub fn sqlite_url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("broker.db").display())
}

/// Keeps a test's database alive; drops it when dropped.
pub enum DbGuard {
    /// A PostgreSQL test database.
    Postgres(TestDatabase),
    /// The directory holding a SQLite file.
    Sqlite(TempDir),
}

/// A migrated PostgreSQL store on a fresh database, and its guard.
pub async fn postgres_store() -> (Arc<dyn Store>, DbGuard) {
    let db = TestDatabase::create().await;
    let store = store::open(&db.url).await.expect("open the test database");
    store.migrate().await.expect("migrate the test database");
    (store, DbGuard::Postgres(db))
}

/// A migrated SQLite store in a fresh temporary directory, and its guard.
pub async fn sqlite_store() -> (Arc<dyn Store>, DbGuard) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = store::open(&sqlite_url(&dir))
        .await
        .expect("open the SQLite store");
    store.migrate().await.expect("migrate the SQLite store");
    (store, DbGuard::Sqlite(dir))
}
