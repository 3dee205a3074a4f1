//! Command-line flags (each with an environment variable) and the settings they produce.

use std::time::Duration;

use std::path::PathBuf;

use clap::Parser;
use platform::tls::ServerTls;
use storage::db::{Engine, PoolSettings, SqliteSync};

use crate::domain::AbuseLimits;
use crate::domain::passwords::Argon2Cost;

/// directory-svc: directories (tenants), users, organizational roles and sign-in over gRPC.
#[derive(Debug, Parser)]
#[command(name = "directory-svc", version, about)]
pub struct Cli {
    /// Address to listen on for gRPC: HOST:PORT (a name or an IP; port 0 picks a free port).
    #[arg(long, env = "DIRECTORY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    /// Database URL: sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "DIRECTORY_DATABASE_URL",
        default_value = "sqlite://data/directory.db"
    )]
    pub database_url: String,

    /// Largest number of open database connections.
    #[arg(long, env = "DIRECTORY_DB_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// Users and directories kept in memory by id (0: none). Only on SQLite, where this process
    /// owns the file and every write passes through it; on PostgreSQL every read goes to the
    /// database, which replicas share.
    #[arg(long, env = "DIRECTORY_CACHE_ENTRIES", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub cache_entries: u64,

    /// How long a call waits for a database connection, in seconds.
    #[arg(long, env = "DIRECTORY_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub db_acquire_timeout_secs: u64,

    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "DIRECTORY_TOKEN_TTL_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub token_ttl_secs: u64,

    /// argon2id memory cost in KiB (OWASP: 19456).
    #[arg(long, env = "DIRECTORY_ARGON2_MEMORY_KIB", default_value_t = 19_456, value_parser = clap::value_parser!(u32).range(8..=4_194_304))]
    pub argon2_memory_kib: u32,

    /// argon2id iterations (OWASP: 2).
    #[arg(long, env = "DIRECTORY_ARGON2_ITERATIONS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub argon2_iterations: u32,

    /// SQLite durability: `normal` (a commit survives a crash or kill -9 of the process) or
    /// `full` (it survives a power cut too: an fsync per commit).
    #[arg(
        long,
        env = "DIRECTORY_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "normal"
    )]
    pub sqlite_synchronous: SqliteSynchronous,

    /// How long SIGTERM waits for in-flight calls before exiting anyway, in seconds.
    #[arg(long, env = "DIRECTORY_DRAIN_SECS", default_value_t = 20)]
    pub drain_secs: u64,

    /// Calls in flight beyond this are refused at once with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "DIRECTORY_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Failed sign-ins allowed per UPN per minute (0: no limit).
    #[arg(
        long,
        env = "DIRECTORY_SIGNIN_FAILURES_PER_UPN_PER_MINUTE",
        default_value_t = 10
    )]
    pub signin_failures_per_upn_per_minute: u32,

    /// Sign-in attempts allowed per client address per minute (0: no limit).
    #[arg(
        long,
        env = "DIRECTORY_SIGNIN_PER_PEER_PER_MINUTE",
        default_value_t = 600
    )]
    pub signin_per_peer_per_minute: u32,

    /// Sign-ups (CreateDirectory) allowed per client address per minute (0: no limit).
    #[arg(
        long,
        env = "DIRECTORY_SIGNUP_PER_PEER_PER_MINUTE",
        default_value_t = 30
    )]
    pub signup_per_peer_per_minute: u32,

    /// PEM certificate chain to serve TLS with (with --tls-key); plaintext when unset.
    #[arg(long, env = "DIRECTORY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DIRECTORY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA that client certificates must chain to: mutual TLS (needs --tls-cert).
    #[arg(long, env = "DIRECTORY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Instead of serving, ask the server at --listen whether it is SERVING (gRPC health) and
    /// exit 0 if so, 1 if not: the container health check.
    #[arg(long, env = "DIRECTORY_HEALTH_PROBE")]
    pub health_probe: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT); off when unset.
    #[arg(long, env = "DIRECTORY_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Log format.
    #[arg(long, env = "DIRECTORY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteSynchronous {
    Normal,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub database_url: String,
    pub pool: PoolSettings,
    pub token_ttl: Duration,
    pub argon2: Argon2Cost,
    pub drain: Duration,
    pub tls: Option<ServerTls>,
    pub max_in_flight: usize,
    /// In-memory entries by id (SQLite only; 0: none).
    pub cache_entries: usize,
    /// What the rules read the time from: the system's clock, or a test's manual one.
    pub clock: std::sync::Arc<dyn platform::clock::Clock>,
    pub limits: AbuseLimits,
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
            drain: Duration::from_secs(20),
            tls: None,
            max_in_flight: 1024,
            cache_entries: storage::cache::DEFAULT_ENTRIES,
            clock: platform::clock::system(),
            limits: AbuseLimits::default(),
        }
    }
}

impl TryFrom<&Cli> for Config {
    type Error = anyhow::Error;

    /// Checks what flags alone cannot: the database URL's engine, the listen address's form,
    /// and that TLS files exist and make a valid identity.
    fn try_from(cli: &Cli) -> anyhow::Result<Self> {
        Engine::of(&cli.database_url)?;
        platform::launch::check_listen(&cli.listen)?;
        Ok(Self {
            listen: cli.listen.clone(),
            database_url: cli.database_url.clone(),
            pool: PoolSettings {
                max_connections: cli.db_max_connections,
                acquire_timeout: Duration::from_secs(cli.db_acquire_timeout_secs),
                sqlite_sync: match cli.sqlite_synchronous {
                    SqliteSynchronous::Normal => SqliteSync::Normal,
                    SqliteSynchronous::Full => SqliteSync::Full,
                },
            },
            token_ttl: Duration::from_secs(cli.token_ttl_secs),
            argon2: Argon2Cost {
                memory_kib: cli.argon2_memory_kib,
                iterations: cli.argon2_iterations,
                parallelism: 1,
            },
            drain: Duration::from_secs(cli.drain_secs),
            tls: ServerTls::from_files(
                cli.tls_cert.as_deref(),
                cli.tls_key.as_deref(),
                cli.tls_client_ca.as_deref(),
            )?,
            max_in_flight: cli.max_in_flight as usize,
            cache_entries: usize::try_from(cli.cache_entries)?,
            clock: platform::clock::system(),
            limits: AbuseLimits {
                signin_failures_per_upn_per_minute: cli.signin_failures_per_upn_per_minute,
                signin_per_peer_per_minute: cli.signin_per_peer_per_minute,
                signup_per_peer_per_minute: cli.signup_per_peer_per_minute,
            },
        })
    }
}
