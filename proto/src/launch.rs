//! What both binaries' `main` do: the health-probe mode, configuration errors (exit 2),
//! logging, metrics, serving, and the exit code. TLS files are read here too.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Exit code for an invalid configuration (as clap uses for bad flags).
pub const EXIT_CONFIG: u8 = 2;

/// The process-level settings every binary has.
#[derive(Debug)]
pub struct Launch<'a> {
    /// The binary's name, for messages.
    pub name: &'static str,
    /// The full gRPC service name, for the health probe.
    pub service: &'static str,
    /// `--listen`, for the health probe.
    pub listen: &'a str,
    pub health_probe: bool,
    pub json_logs: bool,
    pub metrics_listen: Option<SocketAddr>,
}

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
pub fn block_on(serve: impl Future<Output = ExitCode>) -> ExitCode {
    match runtime().build() {
        Ok(runtime) => runtime.block_on(serve),
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a binary: with `--health-probe` only probes; otherwise an invalid `config` exits 2
/// with its message, and `serve` runs until shutdown (exit 0) or failure (exit 1).
pub async fn run<C, F>(
    launch: Launch<'_>,
    config: anyhow::Result<C>,
    serve: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    if launch.health_probe {
        return match crate::rpc::probe(launch.listen, launch.service).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("{}: {} is not serving", launch.name, launch.service);
                ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("{}: health probe failed: {err:#}", launch.name);
                ExitCode::FAILURE
            }
        };
    }
    let config = match config {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}: invalid configuration: {err:#}", launch.name);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log = crate::rpc::init_tracing(launch.json_logs);
    let running = async {
        if let Some(addr) = launch.metrics_listen {
            crate::metrics::install(addr)?;
        }
        log.report_drops();
        serve(config).await
    };
    match running.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "{} stopped with an error",
                launch.name
            );
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&bytes).contains("-----BEGIN"),
        "the {what} {} is not PEM",
        path.display()
    );
    Ok(bytes)
}

/// The server side of TLS: our certificate chain and key, and for mutual TLS the CA that
/// client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From `--tls-cert`, `--tls-key`, `--tls-client-ca`: none (plaintext), or cert and key
    /// together, optionally with a client CA.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> anyhow::Result<Option<Self>> {
        let tls = match (cert, key) {
            (None, None) => {
                anyhow::ensure!(
                    client_ca.is_none(),
                    "--tls-client-ca needs --tls-cert and --tls-key"
                );
                return Ok(None);
            }
            (Some(cert), Some(key)) => Self {
                cert_pem: read(cert, "TLS certificate")?,
                key_pem: read(key, "TLS key")?,
                client_ca_pem: client_ca.map(|p| read(p, "client CA")).transpose()?,
            },
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        tonic::transport::Server::builder()
            .tls_config(tls.config())
            .context("the TLS certificate and key do not make a valid server identity")?;
        Ok(Some(tls))
    }

    pub fn config(&self) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// The client side of TLS: the CA to trust, and for mutual TLS our certificate and key.
#[derive(Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("custom_ca", &self.ca_pem.is_some())
            .field("mutual", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// From `--directory-ca`, `--directory-client-cert`, `--directory-client-key`.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            _ => anyhow::bail!("--directory-client-cert and --directory-client-key go together"),
        };
        Ok(Self {
            ca_pem: ca.map(|p| read(p, "directory CA")).transpose()?,
            identity,
        })
    }

    pub fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

/// `--listen` must be HOST:PORT with a numeric port.
pub fn check_listen(listen: &str) -> anyhow::Result<()> {
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--listen {listen:?} must be HOST:PORT"))?;
    anyhow::ensure!(!host.is_empty(), "--listen {listen:?} has no host");
    port.parse::<u16>()
        .map_err(|_| anyhow::anyhow!("--listen {listen:?} has no valid port"))?;
    Ok(())
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
