//! The domain's ports: what it needs from persistence, as a trait the store implements.
//! The store classifies its database's failures into [`StoreError`]; the domain never sees a
//! database type.

use async_trait::async_trait;

use super::model::{
    Assigned, Assignment, License, SeatsChanged, Subscription, Transferred, Upgraded,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique index refused the row (the request_id or the free trial is taken).
    #[error("unique constraint")]
    Conflict,
    /// A cancellation would leave the pool with fewer seats than assigned licences.
    #[error("licences in use")]
    LicensesInUse,
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

    /// Marks the subscription cancelled (if active) and returns it as stored now. An Office
    /// 365 subscription whose seats its pool's assigned licences need stays active:
    /// [`StoreError::LicensesInUse`].
    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError>;

    /// Moves an active or expired free trial to `offer_id` (active, no end), recording a
    /// `SUBSCRIPTION_UPDATED`, in one conditional statement. `None`: no such subscription.
    async fn upgrade(
        &self,
        id: &str,
        from_offer: &str,
        to_offer: &str,
        now: i64,
    ) -> Result<Option<Upgraded>, StoreError>;

    /// Gives an active subscription of `offer_id` the owner `new_owner` (recording a
    /// `SUBSCRIPTION_UPDATED`), in one conditional statement. `None`: no such subscription.
    async fn transfer(
        &self,
        id: &str,
        offer_id: &str,
        new_owner: &str,
        now: i64,
    ) -> Result<Option<Transferred>, StoreError>;

    /// Marks expired every active free trial whose `end_time` is at or before `now`, recording
    /// a `SUBSCRIPTION_UPDATED` for each in the same transaction; a trial is marked once,
    /// whatever the number of replicas doing this at once. How many it marked.
    async fn expire_trials(&self, now: i64) -> Result<usize, StoreError>;

    /// Sets the seats of an active per-seat subscription, and its pool's with them, unless
    /// the pool's assigned licences need more. `None`: no such subscription.
    async fn change_seats(
        &self,
        id: &str,
        seats: i32,
        now: i64,
    ) -> Result<Option<SeatsChanged>, StoreError>;

    /// Takes a seat of the pool of `assignment`'s offer and directory for its user, unless
    /// the user holds one already, the pool has none free, or billing has seen the user
    /// deleted: all decided in the one transaction that inserts.
    async fn assign(&self, assignment: &Assignment) -> Result<Assigned, StoreError>;

    /// Frees the seat `user_id` holds of `offer_id` in the directory; `None`: none held.
    async fn unassign(
        &self,
        directory_id: &str,
        user_id: &str,
        offer_id: &str,
        now: i64,
    ) -> Result<Option<Assignment>, StoreError>;

    /// The directory's pools with seats or assignments, by offer id.
    async fn licenses(&self, directory_id: &str) -> Result<Vec<License>, StoreError>;

    /// Up to `limit` assignments of the directory (only `user_id`'s, only `offer_id`'s, when
    /// given), by user then offer, after the `(user_id, offer_id)` position.
    async fn assignments(
        &self,
        directory_id: &str,
        user_id: Option<&str>,
        offer_id: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<Assignment>, StoreError>;
}
