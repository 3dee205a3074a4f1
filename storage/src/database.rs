//! A service's database for as long as it serves: the pool, its engine, this process's claim
//! on its SQLite file, the pool's metrics, and on PostgreSQL this process's part in keeping
//! the replicas' caches exact ([`Peers`]). Both services open and close it the same way.

use std::sync::Arc;

use sqlx::AnyPool;

use crate::cache::{Invalidate, Lease};
use crate::db::{Engine, Ownership, PoolSettings};
use crate::peers::Peers;

/// A cache's parts that another replica's writes invalidate, by the kind of row they hold.
pub type PeerCaches = Vec<(String, Arc<dyn Invalidate>)>;

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

    /// Puts a cache of `entries` in front of `store` where one may stand, and starts the peer
    /// protocol (PostgreSQL) for the caches a peer's write invalidates. A cache stands when
    /// this process owns its SQLite file (every write passes through it; no lease) or on
    /// PostgreSQL (it answers while its lease holds); `cache` builds it from the store, the
    /// entries and the lease, and names its caches. Without a cache this process still fences
    /// its own writes on PostgreSQL.
    pub fn cache_in_front<S: ?Sized>(
        &self,
        store: Arc<S>,
        entries: usize,
        cache: impl FnOnce(Arc<S>, usize, Option<Arc<Lease>>) -> (Arc<S>, PeerCaches),
    ) -> Arc<S> {
        let lease = self.peers.as_ref().map(|peers| peers.lease());
        let caching = entries > 0 && (self.ownership.is_some() || lease.is_some());
        let (store, caches) = if caching {
            cache(store, entries, lease)
        } else {
            (store, Vec::new())
        };
        if let Some(peers) = &self.peers {
            peers.start(caches);
        }
        store
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
