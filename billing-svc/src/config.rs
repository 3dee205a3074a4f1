//! Command-line flags (each with an environment variable) and the settings they produce.

use std::time::Duration;

use std::path::PathBuf;

use clap::Parser;
use platform::tls::{ClientTls, ServerTls};
use storage::db::{Engine, PoolSettings, SqliteSync};

/// billing-svc: the offer catalogue and subscriptions, authorised by directory-svc over gRPC.
#[derive(Debug, Parser)]
#[command(name = "billing-svc", version, about)]
pub struct Cli {
    /// Address to listen on for gRPC: HOST:PORT (a name or an IP; port 0 picks a free port).
    #[arg(long, env = "BILLING_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,

    /// Database URL: sqlite://PATH (created on first start) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "BILLING_DATABASE_URL",
        default_value = "sqlite://data/billing.db"
    )]
    pub database_url: String,

    /// directory-svc endpoint(s), comma-separated: http://HOST:PORT[,http://HOST:PORT...].
    #[arg(
        long,
        env = "BILLING_DIRECTORY_URL",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    pub directory_url: Vec<String>,

    /// Deadline of each call to directory-svc, in milliseconds (a caller's shorter deadline wins).
    #[arg(long, env = "BILLING_DIRECTORY_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub directory_timeout_ms: u64,

    /// Largest number of open database connections.
    #[arg(long, env = "BILLING_DB_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// Subscriptions kept in memory by id (0: none). Only on SQLite, where this process
    /// owns the file and every write passes through it; on PostgreSQL every read goes to the
    /// database, which replicas share.
    #[arg(long, env = "BILLING_CACHE_ENTRIES", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub cache_entries: u64,

    /// How long a call waits for a database connection, in seconds.
    #[arg(long, env = "BILLING_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub db_acquire_timeout_secs: u64,

    /// SQLite durability: `normal` (a commit survives a crash or kill -9 of the process) or
    /// `full` (it survives a power cut too: an fsync per commit).
    #[arg(
        long,
        env = "BILLING_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "normal"
    )]
    pub sqlite_synchronous: SqliteSynchronous,

    /// How long SIGTERM waits for in-flight calls before exiting anyway, in seconds.
    #[arg(long, env = "BILLING_DRAIN_SECS", default_value_t = 20)]
    pub drain_secs: u64,

    /// Calls in flight beyond this are refused at once with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "BILLING_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// PEM certificate chain to serve TLS with (with --tls-key); plaintext when unset.
    #[arg(long, env = "BILLING_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "BILLING_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA that client certificates must chain to: mutual TLS (needs --tls-cert).
    #[arg(long, env = "BILLING_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM CA to trust for https:// directory URLs.
    #[arg(long, env = "BILLING_DIRECTORY_CA")]
    pub directory_ca: Option<PathBuf>,

    /// PEM client certificate for mutual TLS to the directory (with --directory-client-key).
    #[arg(long, env = "BILLING_DIRECTORY_CLIENT_CERT")]
    pub directory_client_cert: Option<PathBuf>,

    /// PEM private key of --directory-client-cert.
    #[arg(long, env = "BILLING_DIRECTORY_CLIENT_KEY")]
    pub directory_client_key: Option<PathBuf>,

    /// Instead of serving, ask the server at --listen whether it is SERVING (gRPC health) and
    /// exit 0 if so, 1 if not: the container health check.
    #[arg(long, env = "BILLING_HEALTH_PROBE")]
    pub health_probe: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT); off when unset.
    #[arg(long, env = "BILLING_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Log format.
    #[arg(long, env = "BILLING_LOG_FORMAT", value_enum, default_value = "text")]
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
    pub directory_urls: Vec<String>,
    pub directory_timeout: Duration,
    pub pool: PoolSettings,
    pub drain: Duration,
    pub tls: Option<ServerTls>,
    /// TLS towards the directory (for https:// URLs).
    pub directory_tls: Option<ClientTls>,
    pub max_in_flight: usize,
    /// In-memory entries by id (SQLite only; 0: none).
    pub cache_entries: usize,
    /// What the rules read the time from: the system's clock, or a test's manual one.
    pub clock: std::sync::Arc<dyn platform::clock::Clock>,
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
            drain: Duration::from_secs(20),
            tls: None,
            directory_tls: None,
            max_in_flight: 1024,
            cache_entries: storage::cache::DEFAULT_ENTRIES,
            clock: platform::clock::system(),
        }
    }
}

impl TryFrom<&Cli> for Config {
    type Error = anyhow::Error;

    /// Checks what flags alone cannot: the database URL's engine, the listen address's form,
    /// the directory URLs, and that TLS files exist and make valid identities.
    fn try_from(cli: &Cli) -> anyhow::Result<Self> {
        Engine::of(&cli.database_url)?;
        platform::launch::check_listen(&cli.listen)?;
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
            listen: cli.listen.clone(),
            database_url: cli.database_url.clone(),
            directory_urls,
            directory_timeout: Duration::from_millis(cli.directory_timeout_ms),
            pool: PoolSettings {
                max_connections: cli.db_max_connections,
                acquire_timeout: Duration::from_secs(cli.db_acquire_timeout_secs),
                sqlite_sync: match cli.sqlite_synchronous {
                    SqliteSynchronous::Normal => SqliteSync::Normal,
                    SqliteSynchronous::Full => SqliteSync::Full,
                },
            },
            drain: Duration::from_secs(cli.drain_secs),
            tls: ServerTls::from_files(
                cli.tls_cert.as_deref(),
                cli.tls_key.as_deref(),
                cli.tls_client_ca.as_deref(),
            )?,
            directory_tls,
            max_in_flight: cli.max_in_flight as usize,
            cache_entries: usize::try_from(cli.cache_entries)?,
            clock: platform::clock::system(),
        })
    }
}
