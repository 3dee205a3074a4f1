//! What both binaries' `main` do ([`main`]): the flags they share ([`ServeFlags`]), each with
//! an environment variable named after the binary ([`parse_flags`]), the health-probe mode,
//! configuration errors (exit 2), logging, metrics, serving, and the exit code.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::rpc::ServeOptions;
use crate::tls::ServerTls;

/// What a binary tells [`main`].
pub trait Server {
    /// The binary's name, for messages (`directory-svc`).
    const NAME: &'static str;
    /// The full gRPC service name, for the health probe.
    const SERVICE: &'static str;
    /// What its flags' environment variables start with (`DIRECTORY`: `DIRECTORY_LISTEN`).
    const ENV_PREFIX: &'static str;
    /// `--listen`'s default.
    const DEFAULT_LISTEN: &'static str;
    type Cli: clap::Parser;
    /// Made from the flags, checking what they alone cannot.
    type Config: for<'a> TryFrom<&'a Self::Cli, Error = anyhow::Error>;
    /// The flags of [`ServeFlags`] within [`Self::Cli`].
    fn serve_flags(cli: &Self::Cli) -> &ServeFlags;
    /// Binds the listener first (so that port 0 can be read back), then opens what the server
    /// needs and makes its routes.
    fn build(config: Self::Config) -> impl Future<Output = anyhow::Result<Ready>>;
}

/// A binary's whole `main`: parses its flags, then [`run`]s it on the runtime [`block_on`]
/// builds, serving until SIGTERM or Ctrl-C.
pub fn main<S: Server>() -> ExitCode {
    let cli = parse_flags::<S::Cli>(S::ENV_PREFIX, S::DEFAULT_LISTEN);
    block_on(run::<S>(&cli))
}

/// Binds `listen` (HOST:PORT).
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

/// A server bound to its address with its routes, ready to serve.
pub struct Ready {
    listener: TcpListener,
    local_addr: SocketAddr,
    routes: Routes,
    options: ServeOptions,
    close: Pin<Box<dyn Future<Output = ()> + Send>>,
    stopping: Option<Box<dyn FnOnce() + Send>>,
    background: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("local_addr", &self.local_addr)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Ready {
    /// `routes` served on `listener`; `close` runs once serving has ended (the database's
    /// close: withdraw from the peers, release the SQLite file).
    pub fn new(
        listener: TcpListener,
        routes: Routes,
        options: ServeOptions,
        close: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            local_addr: listener.local_addr()?,
            listener,
            routes,
            options,
            close: Box::pin(close),
            stopping: None,
            background: None,
        })
    }

    /// `stopping` runs as soon as the shutdown signal arrives, before in-flight calls are
    /// drained: what would hold the drain up (open streams) ends there.
    pub fn on_stopping(self, stopping: impl FnOnce() + Send + 'static) -> Self {
        Self {
            stopping: Some(Box::new(stopping)),
            ..self
        }
    }

    /// `work` runs beside the server, polled by the same task (so it ends with the server,
    /// also when the server is dropped rather than stopped): a job that must stop when its
    /// `stopping` signal comes, since serving ends only once it has returned, and before
    /// `close`.
    pub fn with_background(self, work: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            background: Some(Box::pin(work)),
            ..self
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops accepting and
    /// drains in-flight calls (at most the configured drain time), then closes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let stopping = self.stopping;
        let shutdown = async move {
            shutdown.await;
            if let Some(stopping) = stopping {
                stopping();
            }
        };
        let serve = crate::rpc::serve(self.listener, self.routes, self.options, shutdown);
        let served = match self.background {
            Some(background) => tokio::join!(serve, background).0,
            None => serve.await,
        };
        self.close.await;
        served
    }
}

/// Parses the command line; each long flag can also be given by the environment variable
/// `PREFIX_FLAG` (`--db-max-connections` for directory-svc: `DIRECTORY_DB_MAX_CONNECTIONS`),
/// which `--help` shows; `--listen` defaults to `default_listen`. Exits as clap does on a bad
/// flag (2) or on `--help`.
fn parse_flags<C: clap::Parser>(prefix: &str, default_listen: &'static str) -> C {
    let command = C::command().mut_args(|arg| {
        let env = arg
            .get_long()
            .filter(|_| arg.get_env().is_none())
            .filter(|long| !matches!(*long, "help" | "version"))
            .map(|long| format!("{prefix}_{}", long.replace('-', "_").to_uppercase()));
        match env {
            Some(env) => arg.env(env),
            None => arg,
        }
    });
    let command = command.mut_arg("listen", |arg| {
        arg.default_value(default_listen).required(false)
    });
    C::from_arg_matches(&command.get_matches()).unwrap_or_else(|err| err.exit())
}

/// The flags of serving that both binaries have.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeFlags {
    /// Address to listen on for gRPC: HOST:PORT (a name or an IP; port 0 picks a free port).
    #[arg(long)]
    pub listen: String,

    /// How long SIGTERM waits for in-flight calls before exiting anyway, in seconds.
    #[arg(long, default_value_t = 20)]
    pub drain_secs: u64,

    /// Calls in flight beyond this are refused at once with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// PEM certificate chain to serve TLS with (with --tls-key); plaintext when unset.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,

    /// PEM CA that client certificates must chain to: mutual TLS (needs --tls-cert).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,

    /// Instead of serving, ask the server at --listen whether it is SERVING (gRPC health) and
    /// exit 0 if so, 1 if not: the container health check.
    #[arg(long)]
    pub health_probe: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT); off when unset.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeFlags {
    /// How the server runs, from these flags: `--listen` must be HOST:PORT, and the files
    /// named must exist and make a valid TLS identity.
    pub fn options(
        &self,
        service_name: &'static str,
        error_domain: &'static str,
    ) -> anyhow::Result<ServeOptions> {
        check_listen(&self.listen)?;
        Ok(ServeOptions {
            drain: Duration::from_secs(self.drain_secs),
            tls: ServerTls::from_files(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_client_ca.as_deref(),
            )?,
            max_in_flight: self.max_in_flight as usize,
            ..ServeOptions::new(service_name, error_domain)
        })
    }
}

/// A flag's duration as people write it (`30d`, `2s`, `1h 30m`), more than zero: the value
/// parser of the services' retention and period flags.
pub fn human_duration(raw: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw)
        .map_err(|e| format!("{e} (a duration such as 30d, 12h, 90s)"))?;
    if duration.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(duration)
}

/// Exit code for an invalid configuration (as clap uses for bad flags).
const EXIT_CONFIG: u8 = 2;

/// How the runtime both services run on is built: tokio's multi-threaded scheduler, one
/// worker per CPU, without the "LIFO slot". With it, a task woken or spawned by a running task
/// (a call's task woken by its connection's task, and back) goes into the worker's one-task
/// slot, runs next on that worker, and no idle worker is woken for it or may take it: it waits
/// for whatever its worker runs first. Without it, the task goes to the worker's queue, an
/// idle worker is woken, and it takes the task. Measured on two cores
/// (docs/decisions/tokio-lifo-slot.md; three pairs on SQLite): health 63,000-68,000 ->
/// 74,000-84,000 req/s at concurrency 64, both services' CPU per purchase 7-9% lower (four
/// pairs), p99 at the same rate unchanged.
///
/// Needs `--cfg tokio_unstable` (`.cargo/config.toml`, which lists what overrides it); built
/// without it, the runtime keeps the slot, which changes speed, not behaviour, and the unit
/// test below fails.
fn runtime() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

/// A binary's `main`: runs `serve` on the runtime `runtime` builds and exits with its code
/// (1 if the runtime cannot start).
fn block_on(serve: impl Future<Output = ExitCode>) -> ExitCode {
    match runtime().build() {
        Ok(runtime) => runtime.block_on(serve),
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a binary: with `--health-probe` only probes; otherwise an invalid configuration exits
/// 2 with its message, and the server serves until shutdown (exit 0) or failure (exit 1).
async fn run<S: Server>(cli: &S::Cli) -> ExitCode {
    let flags = S::serve_flags(cli);
    if flags.health_probe {
        return match probe(&flags.listen, S::SERVICE).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("{}: {} is not serving", S::NAME, S::SERVICE);
                ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("{}: health probe failed: {err:#}", S::NAME);
                ExitCode::FAILURE
            }
        };
    }
    let config = match S::Config::try_from(cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}: invalid configuration: {err:#}", S::NAME);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log = crate::telemetry::init_tracing(flags.log_format == LogFormat::Json);
    let running = async {
        if let Some(addr) = flags.metrics_listen {
            crate::metrics::install(addr)?;
        }
        log.report_drops();
        let ready = S::build(config).await?;
        ready.run_until(crate::rpc::shutdown_signal()).await
    };
    match running.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "{} stopped with an error",
                S::NAME
            );
            ExitCode::FAILURE
        }
    }
}

/// `--listen` must be HOST:PORT with a numeric port.
fn check_listen(listen: &str) -> anyhow::Result<()> {
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--listen {listen:?} must be HOST:PORT"))?;
    anyhow::ensure!(!host.is_empty(), "--listen {listen:?} has no host");
    port.parse::<u16>()
        .map_err(|_| anyhow::anyhow!("--listen {listen:?} has no valid port"))?;
    Ok(())
}

/// Asks the server listening on `listen` (as given to `--listen`; a wildcard host means this
/// machine) whether `service` is SERVING, within two seconds. For container health checks.
async fn probe(listen: &str, service: &str) -> anyhow::Result<bool> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--listen must be HOST:PORT"))?;
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "[::]" => "[::1]",
        other => other,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2));
    let mut client = HealthClient::new(endpoint.connect().await?);
    let answer = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    Ok(answer.status == ServingStatus::Serving as i32)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn an_idle_worker_takes_a_task_that_a_busy_one_woke() {
        // With tokio's LIFO slot, the task spawned below (spawning from a worker takes the
        // same path as waking) waits in the busy worker's slot, where no other worker may take
        // it and for which none is woken, until the spawning task gives the worker back: it
        // does not here, so the test fails after 3 s. Without the slot it goes to the worker's
        // queue, and the idle worker takes it. (Should a tokio release make the slot's task
        // stealable, this passes without the flag too; Cargo.lock pins tokio.)
        let runtime = super::runtime().worker_threads(2).build().expect("runtime");
        let taken = runtime.block_on(async {
            tokio::spawn(async {
                let (ran, runs) = std::sync::mpsc::channel();
                tokio::spawn(async move {
                    let _ = ran.send(());
                });
                // Hold this worker (a blocking wait, as a long poll would).
                runs.recv_timeout(Duration::from_secs(3)).is_ok()
            })
            .await
        });
        assert!(
            taken.expect("spawned task"),
            "the woken task waited for its worker (built without --cfg tokio_unstable?)"
        );
    }
}
