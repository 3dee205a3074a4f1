//! [`CachedStore`]: subscriptions by id from memory, for a process that owns its SQLite file
//! (see [`storage::db::Ownership`]) or holds a lease on a PostgreSQL database shared with
//! other replicas (see [`storage::peers`]), so GetSubscription costs the directory hop and no
//! read.
//!
//! Correctness rests on [`storage::cache::OwnedCache`]'s protocol: a cancellation holds the
//! write guard until it has committed (and, on PostgreSQL, until every other replica's cache
//! has dropped the subscription), so the next read sees it exactly as it would without the
//! cache. A new subscription needs no invalidation (absent rows are never cached); a change
//! of seats, an upgrade and a transfer go the way of a cancellation; a trial's end needs none (reads
//! show it from its `end_time` on), and nothing else changes a stored subscription.

use std::sync::Arc;

use async_trait::async_trait;
use storage::cache::{Invalidate, Lease, OwnedCache};
use storage::database::PeerCaches;

use super::{BillingStore, StoreError};
use crate::domain::model::{
    Assigned, Assignment, License, SeatsChanged, Subscription, Transferred, Upgraded,
};

pub struct CachedStore {
    inner: Arc<dyn BillingStore>,
    subscriptions: Arc<OwnedCache<Subscription>>,
}

impl CachedStore {
    /// Caches up to `entries` subscriptions in front of `inner`; with a `lease` (PostgreSQL),
    /// only while it is valid. Returns the store and the cache another replica's writes
    /// invalidate (`storage::database::Database::cache_in_front` registers it).
    pub fn in_front(
        inner: Arc<dyn BillingStore>,
        entries: usize,
        lease: Option<Arc<Lease>>,
    ) -> (Arc<dyn BillingStore>, PeerCaches) {
        let subscriptions = Arc::new(OwnedCache::with_lease(entries, lease));
        let caches: PeerCaches = vec![(
            super::sql::SUBSCRIPTIONS.to_owned(),
            subscriptions.clone() as Arc<dyn Invalidate>,
        )];
        (
            Arc::new(Self {
                inner,
                subscriptions,
            }),
            caches,
        )
    }
}

#[async_trait]
impl BillingStore for CachedStore {
    async fn insert(
        &self,
        subscription: &Subscription,
        request: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        self.inner.insert(subscription, request).await
    }

    async fn by_request(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> Result<Option<(Subscription, String)>, StoreError> {
        self.inner.by_request(user_id, request_id).await
    }

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        self.subscriptions
            .read_through(id, self.inner.get(id))
            .await
    }

    async fn list(
        &self,
        directory_id: &str,
        owner: Option<&str>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Subscription>, StoreError> {
        self.inner.list(directory_id, owner, after, limit).await
    }

    /// Runs to completion even if the caller stops waiting (see `OwnedCache::write_through`).
    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError> {
        let (inner, key) = (self.inner.clone(), id.to_owned());
        self.subscriptions
            .write_through(id, async move { inner.cancel(&key, now).await })
            .await
    }

    /// As `cancel`: the only other write that changes a stored subscription.
    async fn change_seats(
        &self,
        id: &str,
        seats: i32,
        now: i64,
    ) -> Result<Option<SeatsChanged>, StoreError> {
        let (inner, key) = (self.inner.clone(), id.to_owned());
        self.subscriptions
            .write_through(
                id,
                async move { inner.change_seats(&key, seats, now).await },
            )
            .await
    }

    /// As `cancel`.
    async fn upgrade(
        &self,
        id: &str,
        from_offer: &str,
        to_offer: &str,
        now: i64,
    ) -> Result<Option<Upgraded>, StoreError> {
        let (inner, key) = (self.inner.clone(), id.to_owned());
        let (from, to) = (from_offer.to_owned(), to_offer.to_owned());
        self.subscriptions
            .write_through(
                id,
                async move { inner.upgrade(&key, &from, &to, now).await },
            )
            .await
    }

    /// As `cancel`: the next read, on any replica, sees the new owner.
    async fn transfer(
        &self,
        id: &str,
        offer_id: &str,
        new_owner: &str,
        now: i64,
    ) -> Result<Option<Transferred>, StoreError> {
        let (inner, key) = (self.inner.clone(), id.to_owned());
        let (offer, owner) = (offer_id.to_owned(), new_owner.to_owned());
        self.subscriptions
            .write_through(id, async move {
                inner.transfer(&key, &offer, &owner, now).await
            })
            .await
    }

    /// Not through the cache: a cached trial reads as expired from its `end_time` on
    /// (`Subscription::as_of`), so its copy needs no invalidation for this.
    async fn expire_trials(&self, now: i64) -> Result<usize, StoreError> {
        self.inner.expire_trials(now).await
    }

    async fn assign(&self, assignment: &Assignment) -> Result<Assigned, StoreError> {
        self.inner.assign(assignment).await
    }

    async fn unassign(
        &self,
        directory_id: &str,
        user_id: &str,
        offer_id: &str,
        now: i64,
    ) -> Result<Option<Assignment>, StoreError> {
        self.inner
            .unassign(directory_id, user_id, offer_id, now)
            .await
    }

    async fn licenses(&self, directory_id: &str) -> Result<Vec<License>, StoreError> {
        self.inner.licenses(directory_id).await
    }

    async fn assignments(
        &self,
        directory_id: &str,
        user_id: Option<&str>,
        offer_id: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<Assignment>, StoreError> {
        self.inner
            .assignments(directory_id, user_id, offer_id, after, limit)
            .await
    }
}
