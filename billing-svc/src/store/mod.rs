//! Persistence of subscriptions behind one trait. [`SqlStore`] implements it for SQLite and
//! PostgreSQL with the same SQL. "One subscription per request_id" and "one free trial per
//! user" are unique indexes: concurrent requests cannot both win.

mod cached;
mod changes;
mod sql;

pub use cached::CachedStore;
pub use changes::decode as decode_change;
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
