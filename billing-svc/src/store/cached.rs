//! [`CachedStore`]: subscriptions by id from memory, for a process that owns its SQLite file
//! (see [`storage::db::Ownership`]) or holds a lease on a PostgreSQL database shared with
//! other replicas (see [`storage::peers`]), so GetSubscription costs the directory hop and no
//! read.
//!
//! Correctness rests on [`storage::cache::OwnedCache`]'s protocol: a cancellation holds the
//! write guard until it has committed (and, on PostgreSQL, until every other replica's cache
//! has dropped the subscription), so the next read sees it exactly as it would without the
//! cache. A new subscription needs no invalidation (absent rows are never cached), and
//! nothing else changes a stored subscription.

use std::sync::Arc;

use async_trait::async_trait;
use storage::cache::{Invalidate, Lease, OwnedCache};

use super::{BillingStore, StoreError};
use crate::domain::model::Subscription;

pub struct CachedStore {
    inner: Arc<dyn BillingStore>,
    subscriptions: Arc<OwnedCache<Subscription>>,
}

impl CachedStore {
    /// Caches up to `entries` subscriptions in front of `inner`; with a `lease` (PostgreSQL),
    /// only while it is valid: register [`CachedStore::peer_caches`] with the peers that hold
    /// it.
    pub fn new(inner: Arc<dyn BillingStore>, entries: usize, lease: Option<Arc<Lease>>) -> Self {
        Self {
            inner,
            subscriptions: Arc::new(OwnedCache::with_lease(entries, lease)),
        }
    }

    /// The caches another replica's writes invalidate, by kind.
    pub fn peer_caches(&self) -> Vec<(String, Arc<dyn Invalidate>)> {
        vec![(
            super::sql::SUBSCRIPTIONS.to_owned(),
            self.subscriptions.clone() as Arc<dyn Invalidate>,
        )]
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
}
