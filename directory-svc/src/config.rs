//! Command-line flags (each with an environment variable) and the settings they produce.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use contract::directory::v1::directory_service_server::SERVICE_NAME;
use platform::launch::ServeFlags;
use platform::rpc::ServeOptions;
use storage::db::{DatabaseFlags, Engine, PoolSettings};
use storage::feed::{FeedFlags, FeedSettings};

use crate::domain::AbuseLimits;
use crate::domain::passwords::Argon2Cost;
use crate::transport::ERROR_DOMAIN;

/// directory-svc: directories (tenants), users, organizational roles and sign-in over gRPC.
/// Every flag can also be set by an environment variable, `DIRECTORY_` and its name
/// (`--db-max-connections`: `DIRECTORY_DB_MAX_CONNECTIONS`).
#[derive(Debug, Parser)]
#[command(name = "directory-svc", version, about)]
pub struct Cli {
    /// Database URL: sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
    #[arg(long, default_value = "sqlite://data/directory.db")]
    pub database_url: String,

    #[command(flatten)]
    pub database: DatabaseFlags,

    #[command(flatten)]
    pub serve: ServeFlags,

    /// Lifetime of access tokens, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub token_ttl_secs: u64,

    /// argon2id memory cost in KiB (OWASP: 19456).
    #[arg(long, default_value_t = 19_456, value_parser = clap::value_parser!(u32).range(8..=4_194_304))]
    pub argon2_memory_kib: u32,

    /// argon2id iterations (OWASP: 2).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub argon2_iterations: u32,

    /// Failed sign-ins allowed per UPN per minute (0: no limit).
    #[arg(long, default_value_t = 10)]
    pub signin_failures_per_upn_per_minute: u32,

    /// Sign-in attempts allowed per client address per minute (0: no limit).
    #[arg(long, default_value_t = 600)]
    pub signin_per_peer_per_minute: u32,

    /// Sign-ups (CreateDirectory) allowed per client address per minute (0: no limit).
    #[arg(long, default_value_t = 30)]
    pub signup_per_peer_per_minute: u32,

    /// How long a deleted user stays restorable before it is purged for good (30d, 12h, 90s).
    #[arg(long, default_value = "30d", value_parser = platform::launch::human_duration)]
    pub deleted_user_retention: Duration,

    /// The service token's file: trusted services present its token to follow every
    /// directory's changes (WatchChanges). Created (64 hex characters, mode 0600) when absent;
    /// never replaced. Replicas share one file, or are each given the same one.
    #[arg(long, default_value = "data/service-token")]
    pub service_token_file: PathBuf,

    #[command(flatten)]
    pub feed: FeedFlags,
}

/// The contract's default retention of deleted users.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Deleted users are purged within this of their `purge_time` (the contract: 2 s).
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub database_url: String,
    pub pool: PoolSettings,
    pub token_ttl: Duration,
    pub argon2: Argon2Cost,
    /// Drain time, TLS, calls in flight.
    pub serve: ServeOptions,
    /// In-memory entries by id (SQLite only; 0: none).
    pub cache_entries: usize,
    /// What the rules read the time from: the system's clock, or a test's manual one.
    pub clock: std::sync::Arc<dyn platform::clock::Clock>,
    pub limits: AbuseLimits,
    /// How long a deleted user stays restorable.
    pub deleted_user_retention: Duration,
    /// How often the purge of deleted users past their retention runs (real time; which are
    /// due is read from `clock`).
    pub purge_every: Duration,
    /// The service token's file (created when absent).
    pub service_token_file: PathBuf,
    /// How long changes are kept for WatchChanges.
    pub change_retention: Duration,
    /// Change streams: bookmarks, the stall limit, the queue, the limit of open streams.
    pub feed: FeedSettings,
}

impl Config {
    /// Settings for `database_url` with every other value at its default.
    pub fn new(listen: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            listen: listen.into(),
            database_url: database_url.into(),
            pool: PoolSettings::default(),
            token_ttl: Duration::from_secs(3600),
            argon2: Argon2Cost::default(),
            serve: ServeOptions::new(SERVICE_NAME, ERROR_DOMAIN),
            cache_entries: storage::cache::DEFAULT_ENTRIES,
            clock: platform::clock::system(),
            limits: AbuseLimits::default(),
            deleted_user_retention: DEFAULT_RETENTION,
            purge_every: PURGE_EVERY,
            service_token_file: PathBuf::from("data/service-token"),
            change_retention: storage::feed::DEFAULT_RETENTION,
            feed: FeedSettings::default(),
        }
    }
}

impl TryFrom<&Cli> for Config {
    type Error = anyhow::Error;

    /// Checks what flags alone cannot: the database URL's engine, the listen address's form,
    /// and that TLS files exist and make a valid identity.
    fn try_from(cli: &Cli) -> anyhow::Result<Self> {
        Engine::of(&cli.database_url)?;
        Ok(Self {
            listen: cli.serve.listen.clone(),
            database_url: cli.database_url.clone(),
            pool: cli.database.pool(),
            token_ttl: Duration::from_secs(cli.token_ttl_secs),
            argon2: Argon2Cost {
                memory_kib: cli.argon2_memory_kib,
                iterations: cli.argon2_iterations,
                parallelism: 1,
            },
            serve: cli.serve.options(SERVICE_NAME, ERROR_DOMAIN)?,
            cache_entries: cli.database.cache_entries()?,
            clock: platform::clock::system(),
            limits: AbuseLimits {
                signin_failures_per_upn_per_minute: cli.signin_failures_per_upn_per_minute,
                signin_per_peer_per_minute: cli.signin_per_peer_per_minute,
                signup_per_peer_per_minute: cli.signup_per_peer_per_minute,
            },
            deleted_user_retention: cli.deleted_user_retention,
            purge_every: PURGE_EVERY,
            service_token_file: cli.service_token_file.clone(),
            change_retention: cli.feed.change_retention,
            feed: cli.feed.settings()?,
        })
    }
}
