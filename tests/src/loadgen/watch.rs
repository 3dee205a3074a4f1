//! `loadgen watch`: the change feed under load, through the public gRPC API.
//!
//! Live (the default): signs up a fresh directory, opens `--streams` WatchChanges streams as
//! its Global Administrator (at now), then makes `--rate` writes a second for `--duration`
//! seconds (SetUserRoles on one user, alternating its roles: one change each, no password
//! hashing). Every stream must receive every change, in order; the report gives how many
//! did, and the delivery latency from the start of each write's call (an upper bound of the
//! time from its commit) to each stream's receipt.
//!
//! Replay (`--replay N`): one stream from the oldest change kept, with the service token
//! (all directories), reads N changes; the report gives changes per second.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use contract::directory::v1 as dpb;
use contract::directory::v1::directory_service_client::DirectoryServiceClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use super::scenario::{authed, bearer, connect, random_prefix, setup_call, sign_in};

/// `loadgen watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// directory-svc.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub directory: String,
    /// Streams open at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub streams: u32,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub streams_per_connection: u32,
    /// Writes (changes) per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of writes.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Replay: read this many changes from the oldest kept on one stream, with the service
    /// token, and report the rate.
    #[arg(long)]
    pub replay: Option<u64>,
    /// The service token file (replay).
    #[arg(long, default_value = "data/service-token")]
    pub service_token_file: PathBuf,
    /// The password of the directory signed up.
    #[arg(long, default_value = "Corr3ct-Horse-1")]
    pub password: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn url(target: &str) -> String {
    if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    match args.replay {
        Some(n) => replay(&args, n).await,
        None => live(&args).await,
    }
}

async fn replay(args: &WatchArgs, n: u64) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&args.service_token_file)
        .with_context(|| format!("cannot read {}", args.service_token_file.display()))?;
    let token = bearer(token.trim())?;
    let mut client = DirectoryServiceClient::new(connect(&url(&args.directory)).await?)
        .max_decoding_message_size(usize::MAX);
    let started = Instant::now();
    let mut stream = client
        .watch_changes(authed(dpb::WatchChangesRequest::default(), &token))
        .await
        .context("WatchChanges")?
        .into_inner();
    let mut received = 0u64;
    while received < n {
        match stream.message().await.context("the stream failed")? {
            Some(change) if change.r#type != dpb::ChangeType::Bookmark as i32 => received += 1,
            Some(_) => bail!("a bookmark after {received} changes: fewer than {n} are kept"),
            None => bail!("the stream ended after {received} changes"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = received as f64 / secs;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"mode": "replay", "changes": received, "seconds": secs, "changes_per_second": rate})
        );
    } else {
        println!("replayed {received} changes in {secs:.2} s: {rate:.0} changes/s");
    }
    Ok(())
}

/// What every stream saw.
struct Seen {
    received: u64,
    in_order: bool,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

async fn live(args: &WatchArgs) -> anyhow::Result<()> {
    ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "--rate and --duration must be more than 0"
    );
    let target = url(&args.directory);
    let mut directory = DirectoryServiceClient::new(connect(&target).await?);
    let prefix = random_prefix();
    let created = setup_call(
        "CreateDirectory (sign-up)",
        directory.create_directory(dpb::CreateDirectoryRequest {
            display_name: format!("loadgen {prefix}"),
            domain_prefix: prefix.clone(),
            admin_user_name: "admin".to_owned(),
            admin_display_name: "Loadgen Admin".to_owned(),
            admin_password: args.password.clone(),
        }),
    )
    .await?;
    let admin = created.admin.context("sign-up answered no admin")?;
    let token = sign_in(&mut directory, &admin.user_principal_name, &args.password).await?;
    let domain = admin
        .user_principal_name
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default();
    let target_user = setup_call(
        "CreateUser",
        directory.create_user(authed(
            dpb::CreateUserRequest {
                user_principal_name: format!("watched@{domain}"),
                display_name: "Watched".to_owned(),
                password: args.password.clone(),
                roles: vec![],
            },
            &token,
        )),
    )
    .await?;

    // The streams, each at now: the first message of each is its bookmark.
    let per = args.streams_per_connection.max(1);
    let connections = args.streams.div_ceil(per);
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..connections {
        channels.push(connect(&target).await?);
    }
    let writes = (args.rate * args.duration).round().max(1.0) as u64;
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut readers = Vec::new();
    let mut seen_by = Vec::new();
    for i in 0..args.streams {
        let channel = channels[(i / per) as usize].clone();
        let mut client = DirectoryServiceClient::new(channel);
        let mut stream = client
            .watch_changes(authed(
                dpb::WatchChangesRequest {
                    start_after: String::new(),
                    start_at_now: true,
                },
                &token,
            ))
            .await
            .with_context(|| format!("WatchChanges (stream {i})"))?
            .into_inner();
        match stream.message().await {
            Ok(Some(first)) if first.r#type == dpb::ChangeType::Bookmark as i32 => {}
            other => bail!("stream {i}: a bookmark should come first, got {other:?}"),
        }
        let seen = Arc::new(Mutex::new(Seen {
            received: 0,
            in_order: true,
            latency_us: new_histogram(),
            first_error: None,
        }));
        seen_by.push(seen.clone());
        let sent = sent.clone();
        readers.push(tokio::spawn(async move {
            // The cursor's number (its first 8 bytes, big-endian): the tool reads that much
            // of the format to check the order.
            let mut last = -1i64;
            loop {
                let change = match stream.message().await {
                    Ok(Some(change)) => change,
                    Ok(None) => return,
                    Err(status) => {
                        if let Ok(mut seen) = seen.lock() {
                            seen.first_error =
                                Some(format!("{:?}: {}", status.code(), status.message()));
                        }
                        return;
                    }
                };
                if change.r#type == dpb::ChangeType::Bookmark as i32 {
                    continue;
                }
                let now = Instant::now();
                let Ok(mut seen) = seen.lock() else { return };
                let at = sent
                    .lock()
                    .ok()
                    .and_then(|s| s.get(seen.received as usize).copied());
                if let Some(at) = at {
                    let _ = seen
                        .latency_us
                        .record(now.saturating_duration_since(at).as_micros() as u64);
                }
                let number = cursor_number(&change.cursor);
                if number <= last {
                    seen.in_order = false;
                }
                last = number;
                seen.received += 1;
                if seen.received >= writes {
                    return;
                }
            }
        }));
    }

    // The writes, at the rate, open loop.
    let every = Duration::from_secs_f64(1.0 / args.rate);
    let mut tick = tokio::time::interval(every);
    let mut write_errors = 0u64;
    let started = Instant::now();
    for k in 0..writes {
        tick.tick().await;
        let roles = if k % 2 == 0 {
            vec![dpb::Role::LicenseAdministrator as i32]
        } else {
            vec![]
        };
        if let Ok(mut s) = sent.lock() {
            s.push(Instant::now());
        }
        let done = directory
            .set_user_roles(authed(
                dpb::SetUserRolesRequest {
                    user_id: target_user.id.clone(),
                    roles,
                },
                &token,
            ))
            .await;
        if done.is_err() {
            write_errors += 1;
        }
    }
    let write_secs = started.elapsed().as_secs_f64();
    // Every stream has until 5 s after the last write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for reader in &mut readers {
        let _ = tokio::time::timeout_at(deadline, reader).await;
    }
    for reader in &readers {
        reader.abort();
    }
    let mut all = new_histogram();
    let (mut complete, mut out_of_order) = (0u64, 0u64);
    let mut errors = Vec::new();
    for seen in &seen_by {
        let Ok(seen) = seen.lock() else { continue };
        let _ = all.add(&seen.latency_us);
        complete += u64::from(seen.received == writes - write_errors);
        out_of_order += u64::from(!seen.in_order);
        errors.extend(seen.first_error.clone());
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "live",
                "streams": args.streams,
                "connections": connections,
                "writes": writes,
                "write_errors": write_errors,
                "write_seconds": write_secs,
                "streams_complete": complete,
                "streams_out_of_order": out_of_order,
                "stream_errors": errors,
                "deliveries": all.len(),
                "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": all.max() as f64 / 1000.0},
            })
        );
    } else {
        println!(
            "{} streams on {connections} connections, {writes} writes in {write_secs:.1} s ({write_errors} failed)",
            args.streams
        );
        println!(
            "  streams with every change: {complete}/{}; out of order: {out_of_order}; ended early: {}",
            args.streams,
            errors.len()
        );
        println!(
            "  delivery latency (write start -> receipt) over {} deliveries: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            all.len(),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            all.max() as f64 / 1000.0
        );
    }
    ensure!(
        complete == u64::from(args.streams) && out_of_order == 0,
        "not every stream received every change in order"
    );
    Ok(())
}

/// The change number a cursor carries (-1 when it does not decode).
fn cursor_number(cursor: &str) -> i64 {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|raw| Some(i64::from_be_bytes(raw.get(..8)?.try_into().ok()?)))
        .unwrap_or(-1)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are allowed"))
}
