//! Persistence of directories and users behind one trait. [`SqlStore`] implements it for
//! SQLite and PostgreSQL with the same SQL. The invariants that must hold under concurrency
//! (unique prefix and UPN, at least one Global Administrator, "only users without roles") are
//! enforced here, inside one transaction or by a unique index, never by check-then-write.

mod cached;
mod changes;
mod sql;

pub use cached::CachedStore;
pub use changes::{decode as decode_change, user as user_change};
pub use sql::SqlStore;

pub use crate::domain::ports::*;

/// A change as the feed holds it: decoded once for every stream (`Err`: what did not decode).
pub type ChangeValue = Result<crate::domain::model::ChangeRecord, String>;

/// A database failure, classified by `storage::db::classify`.
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match storage::db::classify(err) {
            storage::db::Failure::Unavailable(err) => StoreError::Unavailable(err),
            storage::db::Failure::Internal(err) => StoreError::Internal(err),
        }
    }
}
