use billing_svc::config::{Cli, LogFormat};
use billing_svc::{Application, Config};
use clap::Parser as _;
use platform::launch::{Launch, run};

/// jemalloc: per-thread caches without glibc's arena locks (docs/decisions/jemalloc.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    platform::launch::block_on(serve())
}

async fn serve() -> std::process::ExitCode {
    let cli = Cli::parse();
    let launch = Launch {
        name: "billing-svc",
        service: contract::billing::v1::billing_service_server::SERVICE_NAME,
        listen: &cli.listen,
        health_probe: cli.health_probe,
        json_logs: cli.log_format == LogFormat::Json,
        metrics_listen: cli.metrics_listen,
    };
    run(launch, Config::try_from(&cli), |config| async {
        let app = Application::build(config).await?;
        app.run_until(platform::rpc::shutdown_signal()).await
    })
    .await
}
