use billing_svc::config::{Cli, LogFormat};
use billing_svc::{Application, Config};
use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.health_probe {
        let service = contract::billing::v1::billing_service_server::SERVICE_NAME;
        return match contract::rpc::probe(&cli.listen, service).await {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("{service} is not serving");
                std::process::ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("health probe failed: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    contract::rpc::init_tracing(cli.log_format == LogFormat::Json);
    let run = async {
        if let Some(addr) = cli.metrics_listen {
            contract::metrics::install(addr)?;
        }
        let app = Application::build(Config::from(&cli)).await?;
        app.run_until(contract::rpc::shutdown_signal()).await
    };
    match run.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "billing-svc stopped with an error"
            );
            std::process::ExitCode::FAILURE
        }
    }
}
