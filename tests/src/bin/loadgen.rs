//! `loadgen`: the project's own load generator for directory-svc and billing-svc (in the
//! spirit of ghz), and a fixture loader that fills their databases directly.
//!
//! ```sh
//! loadgen --scenario get-user --concurrency 64 --duration 10
//! loadgen --scenario sign-in --rate 50 --duration 10 --json
//! loadgen fixtures --directories 1000 --users-per-directory 1000 --subscriptions-per-directory 10 \
//!     --directory-db postgres://postgres@127.0.0.1:5432/directory \
//!     --billing-db postgres://postgres@127.0.0.1:5432/billing
//! ```

#[path = "../loadgen/mod.rs"]
mod loadgen;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::{Args, Parser, Subcommand};

use loadgen::fixtures::FixtureArgs;
use loadgen::report::{Report, code_name};
use loadgen::runner::{Plan, Stop};
use loadgen::scenario::{self, Conn, Scenario, Service, SetupOptions};

/// Load generator for directory-svc and billing-svc, and fixture loader.
///
/// Without a subcommand (or with `run`): sets up what the scenario needs through the public
/// gRPC API (signs up a fresh directory with a random domain prefix, creates a few users,
/// signs in, creates subscriptions to read), then sends the scenario's call for --duration
/// seconds (or --requests calls) and reports requests/s, latency percentiles and errors by
/// gRPC status code. Only loopback targets unless --allow-remote.
///
/// `fixtures`: fills the services' databases directly (see `loadgen fixtures --help`).
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario (the same as giving no subcommand).
    Run(RunArgs),
    /// Bulk-load directories, users and subscriptions straight into the services' databases.
    ///
    /// Writes rows exactly as the services would (same tables, ids, lower-cased UPN keys, role
    /// bit masks, microsecond times, a real argon2id hash shared by all users, so every
    /// fixture user can sign in), with batched multi-row INSERTs in transactions through
    /// sqlx's Any driver; SQLite and PostgreSQL both work. The schema is brought up to date
    /// with the services' own embedded migrations first (as each service does when it
    /// starts); running each service once on its database beforehand works just as well.
    /// Stop the services, or at least expect SQLite writes to wait for the loader, while it
    /// runs. Prints how long the load took.
    Fixtures(FixtureArgs),
    /// Put load on the change feed: N streams and writes at a rate (delivery latency, every
    /// change on every stream), or the replay of a long backlog on one stream.
    Watch(loadgen::watch::WatchArgs),
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// What to call.
    #[arg(long, value_enum, required = true)]
    scenario: Option<Scenario>,
    /// Where to send the load (host:port or URL). Default: --directory for directory
    /// scenarios and health, --billing for billing ones.
    #[arg(long)]
    target: Option<String>,
    /// directory-svc, for directory scenarios and for any setup (sign-up, sign-in).
    #[arg(long, default_value = "127.0.0.1:50051")]
    directory: String,
    /// billing-svc, for billing scenarios.
    #[arg(long, default_value = "127.0.0.1:50052")]
    billing: String,
    /// Calls in flight at once (workers). With --rate, the most in flight.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// HTTP/2 connections to the target; calls are spread over them round-robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// Seconds to measure (after --warmup). Default 10 unless --requests is given.
    #[arg(long, short = 'z', conflicts_with = "requests")]
    duration: Option<f64>,
    /// Measured calls to send (after --warmup), instead of --duration.
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Seconds of calls sent first and not measured.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Open loop: start calls at this fixed rate (per second), whether or not earlier ones
    /// have answered (up to --concurrency in flight); latency counts from each call's
    /// scheduled start, so queueing is measured, not omitted. Default: closed loop.
    #[arg(long, short = 'r')]
    rate: Option<f64>,
    /// Deadline of each call, in milliseconds (a call past it counts as DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Print one JSON object instead of the table (setup messages are not printed).
    #[arg(long)]
    json: bool,
    /// Setup: users to create besides the admin (get-user, list-users, sign-in,
    /// assign-license); with --user, how many of the directory's users assign-license licenses.
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Setup: subscriptions to create for get-subscription and list-subscriptions.
    #[arg(long, default_value_t = 10)]
    subscriptions: usize,
    /// page_size of list-users and list-subscriptions.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(0..))]
    page_size: i32,
    /// Sign in as this existing user (e.g. a fixture admin, `admin@<prefix>0.onmicrosoft.com`)
    /// instead of signing up a fresh directory; reads what their directory already has.
    #[arg(long)]
    user: Option<String>,
    /// Password of the setup's users, or of --user.
    #[arg(long, default_value = "Corr3ct-Horse-1")]
    password: String,
    /// health: the service name to check ("" is the whole server).
    #[arg(long, default_value = "")]
    health_service: String,
    /// Allow targets that are not loopback addresses.
    #[arg(long)]
    allow_remote: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = cli.threads {
        builder.worker_threads(threads.max(1));
    }
    let result = builder
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async move {
                match cli.command {
                    Some(Command::Fixtures(args)) => loadgen::fixtures::load(args).await,
                    Some(Command::Watch(args)) => loadgen::watch::run(args).await,
                    Some(Command::Run(args)) => run(args).await,
                    None => run(cli.run).await,
                }
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .with_context(|| format!("{flag} must be a number of seconds >= 0, not {secs}"))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let scenario = args.scenario.context("--scenario is required")?;
    let stop = match (args.requests, args.duration) {
        (Some(n), _) => Stop::Requests(n),
        (None, duration) => {
            let duration = seconds("--duration", duration.unwrap_or(10.0))?;
            ensure!(!duration.is_zero(), "--duration must be above 0");
            Stop::After(duration)
        }
    };
    if let Some(rate) = args.rate {
        ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a number of requests per second above 0"
        );
    }
    let plan = Plan {
        concurrency: usize::try_from(args.concurrency).context("--concurrency is too large")?,
        warmup: seconds("--warmup", args.warmup)?,
        stop,
        rate: args.rate,
    };
    let timeout = Duration::from_millis(args.timeout_ms);

    let service = scenario.service();
    let target = args.target.as_deref();
    let directory_url = scenario::url(match service {
        Service::Directory => target.unwrap_or(&args.directory),
        Service::Billing => &args.directory,
    });
    let billing_url = scenario::url(match service {
        Service::Billing => target.unwrap_or(&args.billing),
        Service::Directory => &args.billing,
    });
    let target_url = match service {
        Service::Directory => directory_url.clone(),
        Service::Billing => billing_url.clone(),
    };
    scenario::check_loopback(&target_url, args.allow_remote)?;
    if scenario != Scenario::Health {
        scenario::check_loopback(&directory_url, args.allow_remote)?;
    }

    let verbose = !args.json;
    let workload = scenario::prepare(
        scenario,
        &SetupOptions {
            directory_url,
            billing_url,
            users: args.users,
            subscriptions: args.subscriptions,
            existing_user: args.user.clone(),
            password: args.password.clone(),
            page_size: args.page_size,
            health_service: args.health_service.clone(),
            timeout,
            verbose,
        },
    )
    .await?;

    let connections = usize::try_from(args.connections).context("--connections is too large")?;
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::new(&target_url)?);
    }
    // One call first: a wrong target or a broken setup fails here, not as a run of errors.
    let first = conns.first_mut().context("no connection")?;
    if let Err(status) = workload.call(first, 0).await {
        anyhow::bail!(
            "the first {} call to {target_url} failed: {} {}",
            workload.scenario().name(),
            code_name(status.code()),
            status.message()
        );
    }
    if verbose {
        eprintln!(
            "running {} against {target_url}: {} ...",
            scenario.name(),
            match (plan.rate, plan.stop) {
                (Some(rate), _) => format!("open loop at {rate}/s"),
                (None, _) => format!("closed loop, concurrency {}", plan.concurrency),
            }
        );
    }

    let workload = Arc::new(workload);
    let stats = loadgen::runner::run(workload.clone(), conns, plan).await?;
    let report = Report {
        scenario: scenario.name(),
        target: &target_url,
        connections,
        plan,
        stats: &stats,
        setup: &workload.setup,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(())
}
