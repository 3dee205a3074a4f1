//! Starting and stopping the server: bind first (so tests can use port 0 and read the port),
//! claim the SQLite file (one process per file), open the database and run migrations, put the
//! cache in front of the store when this process owns the file, prepare the directory client
//! (connected lazily), then serve until a shutdown signal, draining in-flight calls.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use contract::billing::v1::billing_service_server::{BillingServiceServer, SERVICE_NAME};
use contract::paging::PageTokens;
use platform::rpc::ServeOptions;
use storage::database::Database;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::Config;
use crate::directory::GrpcDirectory;
use crate::domain::Service;
use crate::store::{BillingStore, CachedStore, SqlStore};
use crate::transport::BillingApi;

/// Largest request the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A bound, ready-to-serve billing-svc.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    database: Database,
    api: BillingApi,
    config: Config,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen.as_str())
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let directory = GrpcDirectory::new(
            &config.directory_urls,
            config.directory_timeout,
            config.directory_tls.as_ref(),
        )?;
        let database = Database::open(&config.database_url, &config.pool).await?;
        let mut store = SqlStore::new(database.pool.clone(), database.engine)
            .await
            .context("cannot migrate the database")?;
        let page_key = storage::db::secret(store.pool(), "page-token-key").await?;
        if let Some(peers) = &database.peers {
            store = store.with_peers(peers.clone());
        }
        // A cache when this process owns its SQLite file, or under a lease on PostgreSQL.
        let (store, caches): (Arc<dyn BillingStore>, _) =
            match database.cache_lease(config.cache_entries) {
                Some(lease) => {
                    let cached = CachedStore::new(Arc::new(store), config.cache_entries, lease);
                    let caches = cached.peer_caches();
                    (Arc::new(cached), caches)
                }
                None => (Arc::new(store), Vec::new()),
            };
        database.start_peers(caches);
        let service = Service::new(
            store,
            Arc::new(directory),
            PageTokens::new(&page_key),
            config.clock.clone(),
        );
        Ok(Self {
            listener,
            local_addr,
            database,
            api: BillingApi::new(Arc::new(service)),
            config,
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
            BillingServiceServer::new(self.api).max_decoding_message_size(MAX_MESSAGE_BYTES),
            |server, e| server.accept_compressed(e).send_compressed(e),
        );
        let options = ServeOptions {
            service_name: SERVICE_NAME,
            drain: self.config.drain,
            tls: self.config.tls.clone(),
            error_domain: crate::transport::ERROR_DOMAIN,
            max_in_flight: self.config.max_in_flight,
        };
        let served =
            platform::rpc::serve(self.listener, Routes::new(service), options, shutdown).await;
        self.database.close().await;
        served
    }
}

impl platform::launch::Server for Application {
    const NAME: &'static str = "billing-svc";
    const SERVICE: &'static str = SERVICE_NAME;
    const ENV_PREFIX: &'static str = "BILLING";
    type Cli = crate::config::Cli;
    type Config = Config;

    fn listen(cli: &Self::Cli) -> &str {
        &cli.listen
    }

    fn serve_flags(cli: &Self::Cli) -> &platform::launch::ServeFlags {
        &cli.serve
    }

    fn config(cli: &Self::Cli) -> anyhow::Result<Config> {
        Config::try_from(cli)
    }

    async fn serve(config: Config) -> anyhow::Result<()> {
        let app = Self::build(config).await?;
        app.run_until(platform::rpc::shutdown_signal()).await
    }
}
