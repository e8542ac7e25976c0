//! Audit chain tests: a store plus raw SQL access to the same database, as
//! an attacker with write access to the database (but not the chain key)
//! would have.

use std::sync::Arc;

use sqlx::{Connection, PgConnection, SqliteConnection};
use token_broker::store::{self, Store};

use super::db::{self, DbGuard};

/// A migrated store and a way to tamper with its rows behind its back.
pub struct AuditDb {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// The database URL, for more stores (replicas) or raw connections.
    pub url: String,
    /// True for PostgreSQL, false for SQLite.
    pub postgres: bool,
    _guard: DbGuard,
}

impl AuditDb {
    /// A fresh migrated PostgreSQL database.
    pub async fn postgres() -> AuditDb {
        let (store, guard) = db::postgres_store().await;
        let DbGuard::Postgres(ref test_db) = guard else {
            unreachable!("postgres_store returns a PostgreSQL guard")
        };
        AuditDb {
            store,
            url: test_db.url.clone(),
            postgres: true,
            _guard: guard,
        }
    }

    /// A fresh migrated SQLite file.
    pub async fn sqlite() -> AuditDb {
        let (store, guard) = db::sqlite_store().await;
        let DbGuard::Sqlite(ref dir) = guard else {
            unreachable!("sqlite_store returns a SQLite guard")
        };
        AuditDb {
            store,
            url: db::sqlite_url(dir),
            postgres: false,
            _guard: guard,
        }
    }

    /// Another store over the same database, as another replica would open.
    pub async fn another_store(&self) -> Arc<dyn Store> {
        store::open(&self.url)
            .await
            .expect("open the same database again")
    }

    /// Runs `sql` (one or more statements) on a connection of its own,
    /// outside the store.
    pub async fn exec(&self, sql: &str) {
        if self.postgres {
            let mut conn = PgConnection::connect(&self.url).await.expect("connect");
            sqlx::raw_sql(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let _ = conn.close().await;
        } else {
            let mut conn = SqliteConnection::connect(&self.url).await.expect("connect");
            sqlx::raw_sql(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let _ = conn.close().await;
        }
    }

    /// Reads one text column of one row, outside the store.
    pub async fn text(&self, id: i64, column: &str) -> Option<String> {
        let sql = format!("SELECT {column} FROM audit_events WHERE id = {id}");
        if self.postgres {
            let mut conn = PgConnection::connect(&self.url).await.expect("connect");
            sqlx::query_scalar(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("read")
        } else {
            let mut conn = SqliteConnection::connect(&self.url).await.expect("connect");
            sqlx::query_scalar(&sql)
                .fetch_one(&mut conn)
                .await
                .expect("read")
        }
    }

    /// One integer a PostgreSQL query answers, outside the store.
    pub async fn scalar(&self, sql: &str) -> i64 {
        assert!(self.postgres, "scalar is for PostgreSQL");
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query_scalar(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A SQL expression for `time` moved one year back.
    pub fn earlier_time(&self) -> &'static str {
        if self.postgres {
            "time - interval '1 year'"
        } else {
            "replace(time, '2026-', '2025-')"
        }
    }

    /// Swaps everything but the id between rows `a` and `b`.
    pub async fn swap_rows(&self, a: i64, b: i64) {
        if self.postgres {
            // The FROM side reads the rows as they were before the update.
            self.exec(&format!(
                "UPDATE audit_events x SET time = y.time, identity = y.identity, peer = y.peer, \
                 action = y.action, outcome = y.outcome, reason = y.reason, \
                 policy_rule = y.policy_rule, lease_id = y.lease_id, \
                 organization = y.organization, scopes = y.scopes, \
                 token_fingerprint = y.token_fingerprint, mac = y.mac \
                 FROM audit_events y WHERE (x.id, y.id) IN (({a}, {b}), ({b}, {a}))"
            ))
            .await;
        } else {
            self.exec(&format!(
                "UPDATE audit_events SET id = -1 WHERE id = {a}; \
                 UPDATE audit_events SET id = {a} WHERE id = {b}; \
                 UPDATE audit_events SET id = {b} WHERE id = -1;"
            ))
            .await;
        }
    }
}

impl AuditDb {
    /// Makes the database refuse (`true`) or accept again (`false`) new
    /// audit rows, as a full disk or a revoked grant would.
    pub async fn refuse_appends(&self, refuse: bool) {
        let sql = match (self.postgres, refuse) {
            (true, true) => {
                "ALTER TABLE audit_events ADD CONSTRAINT refuse_new_rows \
                 CHECK (action <> action) NOT VALID"
            }
            (true, false) => "ALTER TABLE audit_events DROP CONSTRAINT refuse_new_rows",
            (false, true) => {
                "CREATE TRIGGER refuse_new_rows BEFORE INSERT ON audit_events \
                 BEGIN SELECT RAISE(ABORT, 'no more audit rows'); END"
            }
            (false, false) => "DROP TRIGGER refuse_new_rows",
        };
        self.exec(sql).await;
    }
}
