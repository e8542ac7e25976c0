//! SQLite store (embedded default; single replica). TODO(store helper).

/// SQLite-backed [`super::Store`].
pub struct SqliteStore;
