//! Command-line flags (each with an environment variable) and the settings they produce.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use contract::billing::v1::billing_service_server::SERVICE_NAME;
use platform::launch::ServeFlags;
use platform::rpc::ServeOptions;
use platform::tls::ClientTls;
use storage::db::{DatabaseFlags, Engine, PoolSettings};
use storage::feed::{FeedFlags, FeedSettings};

use crate::domain::follow::FollowSettings;
use crate::transport::ERROR_DOMAIN;

/// billing-svc: the offer catalogue and subscriptions, authorised by directory-svc over gRPC.
/// Every flag can also be set by an environment variable, `BILLING_` and its name
/// (`--directory-url`: `BILLING_DIRECTORY_URL`).
#[derive(Debug, Parser)]
#[command(name = "billing-svc", version, about)]
pub struct Cli {
    /// Database URL: sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
    #[arg(long, default_value = "sqlite://data/billing.db")]
    pub database_url: String,

    #[command(flatten)]
    pub database: DatabaseFlags,

    #[command(flatten)]
    pub serve: ServeFlags,

    /// directory-svc endpoint(s), comma-separated: http://HOST:PORT[,http://HOST:PORT...].
    #[arg(long, default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    pub directory_url: Vec<String>,

    /// Deadline of each call to directory-svc, in milliseconds (a caller's shorter deadline wins).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub directory_timeout_ms: u64,

    /// PEM CA to trust for https:// directory URLs.
    #[arg(long)]
    pub directory_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS to the directory (with --directory-client-key).
    #[arg(long)]
    pub directory_client_cert: Option<PathBuf>,

    /// PEM private key of --directory-client-cert.
    #[arg(long)]
    pub directory_client_key: Option<PathBuf>,

    /// The directory's service token (the file directory-svc creates with
    /// --service-token-file): billing follows the directory's changes with it, to free the
    /// licences of deleted users. While it is absent billing serves anyway and looks again
    /// every second.
    #[arg(long, default_value = "data/service-token")]
    pub directory_service_token_file: PathBuf,

    /// How long an azure-free-trial subscription lasts before it expires (unless upgraded):
    /// `30d`, `12h`, `90s`.
    #[arg(long, default_value = "30d", value_parser = platform::launch::human_duration)]
    pub free_trial_period: Duration,

    #[command(flatten)]
    pub feed: FeedFlags,
}

/// How often an open change stream asks the directory again whether its watcher may still
/// watch.
const WATCH_RECHECK: Duration = Duration::from_secs(5);
/// How often changes past the retention are removed.
const REMOVE_EVERY: Duration = Duration::from_secs(1);

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub database_url: String,
    pub directory_urls: Vec<String>,
    pub directory_timeout: Duration,
    pub pool: PoolSettings,
    /// Drain time, TLS, calls in flight.
    pub serve: ServeOptions,
    /// TLS towards the directory (for https:// URLs).
    pub directory_tls: Option<ClientTls>,
    /// In-memory entries by id (SQLite only; 0: none).
    pub cache_entries: usize,
    /// What the rules read the time from: the system's clock, or a test's manual one.
    pub clock: std::sync::Arc<dyn platform::clock::Clock>,
    /// How long changes are kept for WatchChanges.
    pub change_retention: Duration,
    /// Change streams: bookmarks, the stall limit, the queue, the limit of open streams.
    pub feed: FeedSettings,
    /// How often an open stream's watcher is authorised again.
    pub watch_recheck: Duration,
    /// How often changes past the retention are removed (real time; which are due is read
    /// from `clock`).
    pub remove_every: Duration,
    /// The directory's service token, for following its changes.
    pub directory_service_token_file: PathBuf,
    /// The directory follower's lease and pace.
    pub follow: FollowSettings,
    /// How long a free trial lasts.
    pub free_trial_period: Duration,
}

impl Config {
    /// Settings with every value but these at its default.
    pub fn new(
        listen: impl Into<String>,
        database_url: impl Into<String>,
        directory_url: impl Into<String>,
    ) -> Self {
        Self {
            listen: listen.into(),
            database_url: database_url.into(),
            directory_urls: vec![directory_url.into()],
            directory_timeout: Duration::from_secs(2),
            pool: PoolSettings::default(),
            serve: ServeOptions::new(SERVICE_NAME, ERROR_DOMAIN),
            directory_tls: None,
            cache_entries: storage::cache::DEFAULT_ENTRIES,
            clock: platform::clock::system(),
            change_retention: storage::feed::DEFAULT_RETENTION,
            feed: FeedSettings::default(),
            watch_recheck: WATCH_RECHECK,
            remove_every: REMOVE_EVERY,
            directory_service_token_file: PathBuf::from("data/service-token"),
            follow: FollowSettings::default(),
            free_trial_period: crate::domain::DEFAULT_FREE_TRIAL_PERIOD,
        }
    }
}

impl TryFrom<&Cli> for Config {
    type Error = anyhow::Error;

    /// Checks what flags alone cannot: the database URL's engine, the listen address's form,
    /// the directory URLs, and that TLS files exist and make valid identities.
    fn try_from(cli: &Cli) -> anyhow::Result<Self> {
        Engine::of(&cli.database_url)?;
        let directory_urls: Vec<String> = cli
            .directory_url
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        anyhow::ensure!(
            !directory_urls.is_empty(),
            "--directory-url needs at least one URL"
        );
        let mut https = 0;
        for url in &directory_urls {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("--directory-url {url:?} is not a URL: {e}"))?;
            match uri.scheme_str() {
                Some("https") => https += 1,
                Some("http") => {}
                _ => anyhow::bail!("--directory-url {url:?} must start with http:// or https://"),
            }
            anyhow::ensure!(uri.host().is_some(), "--directory-url {url:?} has no host");
        }
        let client_tls = ClientTls::from_files(
            cli.directory_ca.as_deref(),
            cli.directory_client_cert.as_deref(),
            cli.directory_client_key.as_deref(),
        )?;
        let directory_tls = match https {
            0 => {
                anyhow::ensure!(
                    client_tls.ca_pem.is_none() && client_tls.identity.is_none(),
                    "--directory-ca and --directory-client-* need https:// directory URLs"
                );
                None
            }
            n if n == directory_urls.len() => {
                anyhow::ensure!(
                    client_tls.ca_pem.is_some(),
                    "https:// directory URLs need --directory-ca"
                );
                Some(client_tls)
            }
            _ => anyhow::bail!("directory URLs must be all http:// or all https://"),
        };
        Ok(Self {
            listen: cli.serve.listen.clone(),
            database_url: cli.database_url.clone(),
            directory_urls,
            directory_timeout: Duration::from_millis(cli.directory_timeout_ms),
            pool: cli.database.pool(),
            serve: cli.serve.options(SERVICE_NAME, ERROR_DOMAIN)?,
            directory_tls,
            cache_entries: cli.database.cache_entries()?,
            clock: platform::clock::system(),
            change_retention: cli.feed.change_retention,
            feed: cli.feed.settings()?,
            watch_recheck: WATCH_RECHECK,
            remove_every: REMOVE_EVERY,
            directory_service_token_file: cli.directory_service_token_file.clone(),
            follow: FollowSettings::default(),
            free_trial_period: cli.free_trial_period,
        })
    }
}
