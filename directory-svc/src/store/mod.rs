//! Persistence of directories and users behind one trait. [`SqlStore`] implements it for
//! SQLite and PostgreSQL with the same SQL. The invariants that must hold under concurrency
//! (unique prefix and UPN, at least one Global Administrator, "only users without roles") are
//! enforced here, inside one transaction or by a unique index, never by check-then-write.

mod cached;
mod sql;

pub use cached::CachedStore;
pub use sql::SqlStore;

pub use crate::domain::ports::*;

/// A database failure, classified: unavailable (a lost connection, a pool that timed out:
/// the caller may retry) or internal. Also marks the pool's idle connections for a ping when
/// the connection was lost (`storage::db::note_failure`).
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = storage::db::note_failure(&err);
        let err = anyhow::Error::new(err).context("database");
        if unavailable {
            StoreError::Unavailable(err)
        } else {
            StoreError::Internal(err)
        }
    }
}
