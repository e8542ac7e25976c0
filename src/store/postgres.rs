//! PostgreSQL store. TODO(store helper).

/// PostgreSQL-backed [`super::Store`].
pub struct PostgresStore;
