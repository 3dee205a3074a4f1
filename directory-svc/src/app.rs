//! Starting and stopping the server: bind first (so tests can use port 0 and read the port),
//! claim the SQLite file (one process per file), open the database and run migrations, put
//! the cache in front of the store when this process owns the file, then serve until a
//! shutdown signal, draining in-flight calls.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use contract::directory::v1::directory_service_server::{DirectoryServiceServer, SERVICE_NAME};
use contract::paging::PageTokens;
use platform::rpc::ServeOptions;
use storage::db::{Engine, Ownership};
use storage::peers::Peers;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::Config;
use crate::domain::Service;
use crate::domain::passwords::Passwords;
use crate::domain::tokens::Tokens;
use crate::store::{CachedStore, DirectoryStore, SqlStore};
use crate::transport::DirectoryApi;

/// Largest request the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A bound, ready-to-serve directory-svc.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    pool: sqlx::AnyPool,
    api: DirectoryApi,
    config: Config,
    /// This process's claim on its SQLite file, held while it serves.
    ownership: Option<Ownership>,
    /// On PostgreSQL, this process's part in keeping the replicas' caches exact.
    peers: Option<Arc<Peers>>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let ownership = Ownership::claim(&config.database_url)?;
        let engine = Engine::of(&config.database_url)?;
        let pool = storage::db::connect(&config.database_url, &config.pool).await?;
        let mut store = SqlStore::new(pool, engine)
            .await
            .context("cannot migrate the database")?;
        let token_key = storage::db::secret(store.pool(), "access-token-key").await?;
        let page_key = storage::db::secret(store.pool(), "page-token-key").await?;
        let pool = store.pool().clone();
        let peers = (engine == Engine::Postgres)
            .then(|| Arc::new(Peers::new(&config.database_url, pool.clone())));
        if let Some(peers) = &peers {
            store = store.with_peers(peers.clone());
        }
        // A cache when this process owns its SQLite file, or under a lease on PostgreSQL.
        let lease = peers.as_ref().map(|peers| peers.lease());
        let caching = config.cache_entries > 0 && (ownership.is_some() || lease.is_some());
        let (store, caches): (Arc<dyn DirectoryStore>, _) = if caching {
            let cached = CachedStore::new(Arc::new(store), config.cache_entries, lease);
            let caches = cached.peer_caches();
            (Arc::new(cached), caches)
        } else {
            (Arc::new(store), Vec::new())
        };
        if let Some(peers) = &peers {
            peers.start(caches);
        }
        let service = Service::new(
            store,
            Passwords::new(config.argon2)?,
            Tokens::new(&token_key, config.token_ttl),
            PageTokens::new(&page_key),
            config.limits,
            config.clock.clone(),
        );
        Ok(Self {
            listener,
            local_addr,
            pool,
            api: DirectoryApi::new(Arc::new(service)),
            config,
            ownership,
            peers,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops accepting and
    /// drains in-flight calls (at most the configured drain time).
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        // Compressed requests accepted, answers compressed when the caller accepts it (and the
        // answer is large enough to gain: `platform::rpc::reply`).
        let service = platform::rpc::ENCODINGS.into_iter().fold(
            DirectoryServiceServer::new(self.api).max_decoding_message_size(MAX_MESSAGE_BYTES),
            |server, e| server.accept_compressed(e).send_compressed(e),
        );
        let options = ServeOptions {
            service_name: SERVICE_NAME,
            drain: self.config.drain,
            tls: self.config.tls.clone(),
            error_domain: crate::transport::ERROR_DOMAIN,
            max_in_flight: self.config.max_in_flight,
        };
        let pool_metrics = storage::db::watch_pool(self.pool);
        let served =
            platform::rpc::serve(self.listener, Routes::new(service), options, shutdown).await;
        pool_metrics.abort();
        if let Some(peers) = &self.peers {
            peers.withdraw().await;
        }
        drop(self.ownership);
        served
    }
}
