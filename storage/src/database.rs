//! A service's database for as long as it serves: the pool, its engine, this process's claim
//! on its SQLite file, the pool's metrics, and on PostgreSQL this process's part in keeping
//! the replicas' caches exact ([`Peers`]). Both services open and close it the same way.

use std::sync::Arc;

use sqlx::AnyPool;

use crate::cache::{Invalidate, Lease};
use crate::db::{Engine, Ownership, PoolSettings};
use crate::peers::Peers;

pub struct Database {
    pub pool: AnyPool,
    pub engine: Engine,
    /// This process's claim on its SQLite file, held while it serves.
    ownership: Option<Ownership>,
    /// On PostgreSQL, this process's part in keeping the replicas' caches exact.
    pub peers: Option<Arc<Peers>>,
    pool_metrics: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("engine", &self.engine)
            .field("owned", &self.ownership.is_some())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Claims the SQLite file (one process per file), then connects. The service's store
    /// brings the schema up to date.
    pub async fn open(url: &str, settings: &PoolSettings) -> anyhow::Result<Self> {
        let ownership = Ownership::claim(url)?;
        let engine = Engine::of(url)?;
        let pool = crate::db::connect(url, settings).await?;
        let peers = (engine == Engine::Postgres).then(|| Arc::new(Peers::new(url, pool.clone())));
        Ok(Self {
            pool_metrics: crate::db::watch_pool(pool.clone()),
            pool,
            engine,
            ownership,
            peers,
        })
    }

    /// Whether a cache of `entries` may stand in front of the store, and under which lease:
    /// `Some(None)` when this process owns its SQLite file (every write passes through it),
    /// `Some(Some(lease))` on PostgreSQL (the cache answers while the lease holds), `None`
    /// for no cache.
    pub fn cache_lease(&self, entries: usize) -> Option<Option<Arc<Lease>>> {
        let lease = self.peers.as_ref().map(|peers| peers.lease());
        (entries > 0 && (self.ownership.is_some() || lease.is_some())).then_some(lease)
    }

    /// Starts the peer protocol (PostgreSQL) for `caches`, the ones a peer's write
    /// invalidates (empty: this process only fences its own writes).
    pub fn start_peers(&self, caches: Vec<(String, Arc<dyn Invalidate>)>) {
        if let Some(peers) = &self.peers {
            peers.start(caches);
        }
    }

    /// After serving: withdraws from the peer protocol (writers need not wait out this
    /// process's lease) and releases the SQLite file.
    pub async fn close(self) {
        self.pool_metrics.abort();
        if let Some(peers) = &self.peers {
            peers.withdraw().await;
        }
        drop(self.ownership);
    }
}
