//! [`CachedStore`]: subscriptions by id from memory, for a process that owns its SQLite file
//! (see [`contract::db::Ownership`]), so GetSubscription costs the directory hop and no read.
//!
//! Correctness rests on [`contract::cache::OwnedCache`]'s protocol: a cancellation holds the
//! write guard until it has committed, so the next read sees it exactly as it would without
//! the cache. A new subscription needs no invalidation (absent rows are never cached), and
//! nothing else changes a stored subscription.

use std::sync::Arc;

use async_trait::async_trait;
use contract::cache::OwnedCache;

use super::{BillingStore, StoreError};
use crate::domain::model::Subscription;

pub struct CachedStore {
    inner: Arc<dyn BillingStore>,
    subscriptions: Arc<OwnedCache<Subscription>>,
}

impl CachedStore {
    /// Caches up to `entries` subscriptions in front of `inner`.
    pub fn new(inner: Arc<dyn BillingStore>, entries: usize) -> Self {
        Self {
            inner,
            subscriptions: Arc::new(OwnedCache::new(entries)),
        }
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
        if let Some(hit) = self.subscriptions.get(id) {
            return Ok(Some(hit));
        }
        let ticket = self.subscriptions.ticket();
        let found = self.inner.get(id).await?;
        if let Some(subscription) = &found {
            self.subscriptions.fill(id, subscription.clone(), ticket);
        }
        Ok(found)
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

    /// Runs to completion in its own task, holding the write guard until the update has
    /// committed or failed, even if the caller stops waiting.
    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError> {
        let (inner, subscriptions, id) = (
            self.inner.clone(),
            self.subscriptions.clone(),
            id.to_owned(),
        );
        let task = tokio::spawn(async move {
            let _writing = subscriptions.write(&id);
            inner.cancel(&id, now).await
        });
        match task.await {
            Ok(result) => result,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}
