//! A read-through cache of rows that only this process writes, invalidated exactly
//! (docs/decisions/caches.md).
//!
//! It is only correct when every write to the cached rows goes through this process: the
//! services enable it on SQLite, where [`crate::db::Ownership`] makes the process the file's
//! only user, and never on PostgreSQL, where replicas share the database.
//!
//! The protocol (readers never see a value older than the last acknowledged write):
//! - a reader that misses takes a [`Ticket`] *before* it reads the database, and [`fill`]s
//!   the row only if no write began or ended since (the ticket's epoch is still current and no
//!   write is in progress), checked under the map's shard lock;
//! - a writer holds a [`WriteGuard`] across its whole database write: taking it marks a write
//!   in progress, moves the epoch and removes the key; dropping it (after the commit, or after
//!   an error) moves the epoch again and removes the key again before the write is
//!   acknowledged. A fill that read the old row either sees the moved epoch and gives up, or
//!   holds the shard lock first, so the guard's removal comes after it.
//!
//! Writers must let their write finish even if the caller goes away, so the guard never drops
//! before the commit lands: [`OwnedCache::write_through`] runs the write in its own task.
//! [`OwnedCache::read_through`] is the reader's side.
//!
//! [`fill`]: OwnedCache::fill

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Entries kept by default.
pub const DEFAULT_ENTRIES: usize = 50_000;

#[derive(Debug)]
pub struct OwnedCache<V> {
    map: DashMap<String, V>,
    epoch: AtomicU64,
    writing: AtomicUsize,
    capacity: usize,
    /// On PostgreSQL, the lease without which the cache neither answers nor fills
    /// ([`crate::peers`]); on SQLite none (the process owns the file).
    lease: Option<Arc<Lease>>,
}

/// The cache's epoch when a reader began reading the database.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Ticket(u64);

impl<V: Clone> OwnedCache<V> {
    /// A cache of at most `capacity` entries (when full, it starts over empty), for a process
    /// that owns its database.
    pub fn new(capacity: usize) -> Self {
        Self::with_lease(capacity, None)
    }

    /// The same, answering only while `lease` (if any) is valid: a database shared with other
    /// replicas, see [`crate::peers`].
    pub fn with_lease(capacity: usize, lease: Option<Arc<Lease>>) -> Self {
        Self {
            map: DashMap::new(),
            epoch: AtomicU64::new(0),
            writing: AtomicUsize::new(0),
            capacity: capacity.max(1),
            lease,
        }
    }

    fn usable(&self) -> bool {
        self.lease.as_ref().is_none_or(|lease| lease.is_valid())
    }

    pub fn get(&self, key: &str) -> Option<V> {
        let hit = if self.usable() {
            self.map.get(key).map(|v| v.value().clone())
        } else {
            None
        };
        metrics::counter!("cache_lookups_total", "hit" => if hit.is_some() { "true" } else { "false" })
            .increment(1);
        hit
    }

    /// Take before reading the row from the database.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.epoch.load(Ordering::SeqCst))
    }

    /// Keeps `value` (as read from the database after `ticket`) unless a write began or
    /// ended since, or one is in progress.
    pub fn fill(&self, key: &str, value: V, ticket: Ticket) {
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        if let Entry::Vacant(slot) = self.map.entry(key.to_owned())
            && self.usable()
            && self.writing.load(Ordering::SeqCst) == 0
            && self.epoch.load(Ordering::SeqCst) == ticket.0
        {
            slot.insert(value);
        }
    }

    /// The row `key` from memory, or from `load` (a future not yet started: it runs after the
    /// ticket is taken), kept if no write interfered.
    pub async fn read_through<E>(
        &self,
        key: &str,
        load: impl Future<Output = Result<Option<V>, E>>,
    ) -> Result<Option<V>, E> {
        if let Some(hit) = self.get(key) {
            return Ok(Some(hit));
        }
        let ticket = self.ticket();
        let found = load.await?;
        if let Some(value) = &found {
            self.fill(key, value.clone(), ticket);
        }
        Ok(found)
    }

    /// Runs `write` (a write of the row `key`) to completion in its own task, holding the
    /// write guard until it has committed or failed, even if the caller stops waiting.
    pub async fn write_through<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        key: &str,
        write: impl Future<Output = T> + Send + 'static,
    ) -> T
    where
        V: Send + Sync + 'static,
    {
        let (cache, key) = (self.clone(), key.to_owned());
        let task = tokio::spawn(async move {
            let _writing = cache.write(&key);
            write.await
        });
        match task.await {
            Ok(result) => result,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    /// Hold across a write of the row `key`, until the write has committed or failed.
    pub fn write(&self, key: &str) -> WriteGuard<'_, V> {
        self.writing.fetch_add(1, Ordering::SeqCst);
        self.invalidate(key);
        WriteGuard {
            cache: self,
            key: key.to_owned(),
        }
    }

    fn invalidate(&self, key: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.map.remove(key);
    }

    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl<V: Clone + Send + Sync> Invalidate for OwnedCache<V> {
    fn invalidate(&self, key: &str) {
        OwnedCache::invalidate(self, key);
    }

    fn clear(&self) {
        OwnedCache::clear(self);
    }
}

/// A write in progress; see [`OwnedCache::write`].
#[derive(Debug)]
pub struct WriteGuard<'a, V: Clone> {
    cache: &'a OwnedCache<V>,
    key: String,
}

impl<V: Clone> Drop for WriteGuard<'_, V> {
    fn drop(&mut self) {
        self.cache.invalidate(&self.key);
        self.cache.writing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Something holding copies of rows that a peer's write can make stale.
pub trait Invalidate: Send + Sync {
    /// Drops the row `key` and refuses fills read before now.
    fn invalidate(&self, key: &str);
    /// Drops every row and refuses fills read before now.
    fn clear(&self);
}

/// Whether this process may answer from its cache now: on PostgreSQL, while its lease in the
/// peer protocol ([`crate::peers`]) is valid, which that protocol extends and revokes.
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Nanoseconds after `base` until which the lease is valid (0: not valid).
    valid_until: AtomicU64,
}

impl Lease {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            valid_until: AtomicU64::new(0),
        }
    }

    pub fn is_valid(&self) -> bool {
        let now = self.base.elapsed().as_nanos() as u64;
        now < self.valid_until.load(Ordering::Acquire)
    }

    pub(crate) fn extend_to(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.valid_until.store(nanos, Ordering::Release);
    }

    pub(crate) fn revoke(&self) {
        self.valid_until.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_hits() {
        let cache = OwnedCache::new(10);
        assert_eq!(cache.get("a"), None::<u32>);
        let t = cache.ticket();
        cache.fill("a", 1, t);
        assert_eq!(cache.get("a"), Some(1));
    }

    #[test]
    fn a_write_removes_the_row_and_refuses_fills_read_before_or_during_it() {
        let cache = OwnedCache::new(10);
        cache.fill("a", 1, cache.ticket());
        let before = cache.ticket();
        let guard = cache.write("a");
        assert_eq!(cache.get("a"), None, "removed when the write begins");
        let during = cache.ticket();
        cache.fill("a", 1, during);
        assert_eq!(cache.get("a"), None, "no fill while a write is in progress");
        drop(guard);
        cache.fill("a", 1, before);
        cache.fill("a", 1, during);
        assert_eq!(
            cache.get("a"),
            None,
            "a row read before the write ended is stale"
        );
        let after = cache.ticket();
        cache.fill("a", 2, after);
        assert_eq!(cache.get("a"), Some(2));
    }

    #[test]
    fn a_write_to_another_row_also_refuses_concurrent_fills() {
        // The epoch is global: conservative, and writes of cached rows are rare.
        let cache = OwnedCache::new(10);
        let t = cache.ticket();
        drop(cache.write("b"));
        cache.fill("a", 1, t);
        assert_eq!(cache.get("a"), None);
    }

    #[test]
    fn stays_within_capacity() {
        let cache = OwnedCache::new(3);
        for i in 0..10 {
            cache.fill(&i.to_string(), i, cache.ticket());
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.get("9"), Some(9));
    }

    #[test]
    fn racing_fills_never_outlive_a_write() {
        // Readers fill the value they read from a "database" while writers change it; after
        // every acknowledged write, the cache holds nothing older.
        use std::sync::Arc;
        use std::sync::atomic::AtomicU64;
        let cache = Arc::new(OwnedCache::new(10));
        let db = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (cache, db, stop) = (cache.clone(), db.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if cache.get("k").is_none() {
                            let t = cache.ticket();
                            let v = db.load(Ordering::SeqCst);
                            std::thread::yield_now();
                            cache.fill("k", v, t);
                        }
                    }
                })
            })
            .collect();
        for v in 1..=2_000u64 {
            {
                let _g = cache.write("k");
                db.store(v, Ordering::SeqCst);
            }
            if let Some(seen) = cache.get("k") {
                assert_eq!(seen, v, "stale value after write {v}");
            }
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().expect("reader");
        }
    }
}
