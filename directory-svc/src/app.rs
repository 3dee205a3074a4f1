//! Starting the server: bind first (so tests can use port 0 and read the port), open the
//! database (claiming the SQLite file) and run migrations, put the cache in front of the
//! store where one may stand, and make the routes; `platform::launch::Ready` serves them until
//! a shutdown signal, draining in-flight calls.

use std::sync::Arc;

use anyhow::Context as _;
use contract::cursor::Cursors;
use contract::directory::v1::directory_service_server::{DirectoryServiceServer, SERVICE_NAME};
use contract::paging::PageTokens;
use platform::launch::Ready;
use storage::database::Database;
use storage::feed::Feed;
use tonic::service::Routes;

use crate::config::Config;
use crate::domain::Service;
use crate::domain::passwords::Passwords;
use crate::domain::tokens::Tokens;
use crate::domain::watch::Watching;
use crate::store::{CachedStore, DirectoryStore, SqlStore};
use crate::transport::DirectoryApi;

/// directory-svc, as `platform::launch` starts it: `Application::build(config)` (with
/// `platform::launch::Server` in scope) binds and opens, `Ready::run_until` serves.
#[derive(Debug)]
pub struct Application;

impl platform::launch::Server for Application {
    const NAME: &'static str = "directory-svc";
    const SERVICE: &'static str = SERVICE_NAME;
    const ENV_PREFIX: &'static str = "DIRECTORY";
    const DEFAULT_LISTEN: &'static str = "127.0.0.1:50051";
    type Cli = crate::config::Cli;
    type Config = Config;

    fn serve_flags(cli: &Self::Cli) -> &platform::launch::ServeFlags {
        &cli.serve
    }

    async fn build(config: Config) -> anyhow::Result<Ready> {
        let listener = platform::launch::bind(&config.listen).await?;
        let database = Database::open(&config.database_url, &config.pool).await?;
        let mut store = SqlStore::new(database.pool.clone(), database.engine)
            .await
            .context("cannot migrate the database")?;
        let token_key = storage::db::secret(store.pool(), "access-token-key").await?;
        let page_key = storage::db::secret(store.pool(), "page-token-key").await?;
        if let Some(peers) = &database.peers {
            store = store.with_peers(peers.clone());
        }
        let cursor_key = storage::db::secret(store.pool(), "change-cursor-key").await?;
        let service_token = storage::service_token::load_or_create(&config.service_token_file)
            .context("cannot read or create the service token file")?;
        let feed = Feed::start(
            store.pool().clone(),
            &config.database_url,
            store.outbox(),
            crate::store::decode_change,
            config.feed,
        );
        let store: Arc<dyn DirectoryStore> = Arc::new(store);
        let store = database.cache_in_front(store, config.cache_entries, CachedStore::in_front);
        let service = Service::new(
            store,
            Passwords::new(config.argon2)?,
            Tokens::new(&token_key, config.token_ttl),
            PageTokens::new(&page_key),
            config.limits,
            config.clock.clone(),
            config.deleted_user_retention,
        )
        .with_watching(Watching::new(Some(&service_token), config.change_retention));
        let service = Arc::new(service);
        let purge = service.purge_in_background(config.purge_every);
        let removal = service.clone();
        feed.remove_in_background(move || removal.change_cutoff(), config.purge_every);
        let api = DirectoryApi::new(
            service,
            feed.clone(),
            Cursors::new(&cursor_key, SERVICE_NAME),
        );
        // Compressed requests accepted, answers compressed when the caller accepts it (and the
        // answer is large enough to gain: `platform::rpc::reply`).
        let server = platform::rpc::ENCODINGS.into_iter().fold(
            DirectoryServiceServer::new(api)
                .max_decoding_message_size(platform::rpc::MAX_MESSAGE_BYTES),
            |server, e| server.accept_compressed(e).send_compressed(e),
        );
        let streams = feed.clone();
        let ready = Ready::new(listener, Routes::new(server), config.serve, async move {
            purge.abort();
            feed.close();
            database.close().await;
        })?;
        // Open change streams end with UNAVAILABLE at once, rather than hold the drain up.
        Ok(ready.on_stopping(move || streams.close()))
    }
}
