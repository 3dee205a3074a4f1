//! Starting the server: bind first (so tests can use port 0 and read the port), prepare the
//! directory client (connected lazily), open the database (claiming the SQLite file) and run
//! migrations, put the cache in front of the store where one may stand, make the routes, and
//! start the follower of the directory's changes beside them;
//! `platform::launch::Ready` serves them until a shutdown signal, draining in-flight calls.

use std::sync::Arc;

use anyhow::Context as _;
use contract::billing::v1::billing_service_server::{BillingServiceServer, SERVICE_NAME};
use contract::cursor::Cursors;
use contract::paging::PageTokens;
use platform::launch::Ready;
use storage::database::Database;
use storage::feed::Feed;
use tonic::service::Routes;

use crate::config::Config;
use crate::directory::{GrpcDirectory, GrpcDirectoryFeed};
use crate::domain::Service;
use crate::domain::follow::Follower;
use crate::store::{BillingStore, CachedStore, SqlStore};
use crate::transport::BillingApi;

/// billing-svc, as `platform::launch` starts it: `Application::build(config)` (with
/// `platform::launch::Server` in scope) binds and opens, `Ready::run_until` serves.
#[derive(Debug)]
pub struct Application;

impl platform::launch::Server for Application {
    const NAME: &'static str = "billing-svc";
    const SERVICE: &'static str = SERVICE_NAME;
    const ENV_PREFIX: &'static str = "BILLING";
    const DEFAULT_LISTEN: &'static str = "127.0.0.1:50052";
    type Cli = crate::config::Cli;
    type Config = Config;

    fn serve_flags(cli: &Self::Cli) -> &platform::launch::ServeFlags {
        &cli.serve
    }

    async fn build(config: Config) -> anyhow::Result<Ready> {
        let listener = platform::launch::bind(&config.listen).await?;
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
        let cursor_key = storage::db::secret(store.pool(), "change-cursor-key").await?;
        let feed = Feed::start(
            store.pool().clone(),
            &config.database_url,
            store.outbox(),
            crate::store::decode_change,
            config.feed,
        );
        if let Some(peers) = &database.peers {
            store = store.with_peers(peers.clone());
        }
        store
            .end_old_trials(config.free_trial_period)
            .await
            .map_err(|e| anyhow::anyhow!("cannot set the end of older trials: {e:?}"))?;
        let follower = Follower::new(
            Arc::new(store.clone()),
            Arc::new(GrpcDirectoryFeed::new(
                directory.clone(),
                config.directory_service_token_file.clone(),
            )),
            config.clock.clone(),
            config.follow,
        );
        let store: Arc<dyn BillingStore> = Arc::new(store);
        let store = database.cache_in_front(store, config.cache_entries, CachedStore::in_front);
        let service = Service::new(
            store,
            Arc::new(directory),
            PageTokens::new(&page_key),
            config.clock.clone(),
        );
        let service = Arc::new(service.with_free_trial_period(config.free_trial_period));
        let removal = service.clone();
        let retention = config.change_retention;
        feed.remove_in_background(
            move || removal.change_cutoff(retention),
            config.remove_every,
        );
        let trials = service.clone();
        let api = BillingApi::new(
            service,
            feed.clone(),
            Cursors::new(&cursor_key, SERVICE_NAME),
            config.change_retention,
            config.watch_recheck,
        );
        // Compressed requests accepted, answers compressed when the caller accepts it (and the
        // answer is large enough to gain: `platform::rpc::reply`).
        let server = platform::rpc::ENCODINGS.into_iter().fold(
            BillingServiceServer::new(api)
                .max_decoding_message_size(platform::rpc::MAX_MESSAGE_BYTES),
            |server, e| server.accept_compressed(e).send_compressed(e),
        );
        let streams = feed.clone();
        let ready = Ready::new(listener, Routes::new(server), config.serve, async move {
            feed.close();
            database.close().await;
        })?;
        // Open change streams end with UNAVAILABLE at once, rather than hold the drain up; the
        // follower stops and hands its lease over.
        let (stop_following, stopped) = tokio::sync::watch::channel(false);
        Ok(ready
            .on_stopping(move || {
                streams.close();
                let _ = stop_following.send(true);
            })
            .with_background(async move {
                tokio::join!(
                    follower.run(stopped.clone()),
                    record_trial_ends(trials, stopped)
                );
            }))
    }
}

/// Every second, records the end of the free trials whose end has come (one
/// `SUBSCRIPTION_UPDATED` each, within about a second of it), until `stop` turns true.
async fn record_trial_ends(service: Arc<Service>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(err) = service.record_trial_ends().await {
            tracing::warn!(error = %err, "cannot record the end of free trials; trying again");
        }
    }
}
