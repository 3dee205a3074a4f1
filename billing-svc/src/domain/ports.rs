//! The domain's ports: what it needs from persistence, as a trait the store implements.
//! The store classifies its database's failures into [`StoreError`]; the domain never sees a
//! database type.

use async_trait::async_trait;

use super::model::Subscription;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique index refused the row (the request_id or the free trial is taken).
    #[error("unique constraint")]
    Conflict,
    /// The database cannot be reached right now (retryable).
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The database failed in a way a retry will not mend.
    #[error("database failure")]
    Internal(#[source] anyhow::Error),
}

#[async_trait]
pub trait BillingStore: Send + Sync + 'static {
    /// Stores a new subscription, with its `(request_id, fingerprint)` when the caller sent one.
    async fn insert(
        &self,
        subscription: &Subscription,
        request: Option<(&str, &str)>,
    ) -> Result<(), StoreError>;

    /// The subscription `user_id` created with `request_id`, and that request's fingerprint.
    async fn by_request(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> Result<Option<(Subscription, String)>, StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError>;

    /// Up to `limit` subscriptions of the directory (only `owner`'s when given), oldest first,
    /// after the `(create_time, id)` position.
    async fn list(
        &self,
        directory_id: &str,
        owner: Option<&str>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Subscription>, StoreError>;

    /// Marks the subscription cancelled (if active) and returns it as stored now.
    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError>;
}
