//! The load generator (`loadgen`), run as its binary against real servers: every scenario
//! sets itself up through the public API and reports what it sent; an open loop keeps its
//! rate; failures are counted by status code; load goes only where it is allowed to.

use std::time::Duration;

use integration_tests::*;
use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// What a loadgen run left: its exit status, its stdout and its stderr.
struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The `--json` report, or a failure that shows what loadgen said.
    fn report(&self) -> Value {
        assert!(self.success, "loadgen failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not a JSON report ({e}): {}", self.stdout))
    }
}

async fn loadgen(args: &[&str]) -> Outcome {
    let output = tokio::process::Command::new(LOADGEN)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("loadgen runs");
    Outcome {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count: {report}"))
}

fn latency(report: &Value, key: &str) -> u64 {
    report["latency_us"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("latency {key} missing: {report}"))
}

/// Every scenario, closed loop, a fixed number of calls over two connections: each call is
/// answered OK, and the report's counts and percentiles agree with what was sent. The calls
/// that write (create-subscription) or hash (sign-in) go through the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_real_servers() {
    let db_dir = TestDb::sqlite();
    let db_bill = TestDb::sqlite();
    let directory = DirectoryServer::start(&db_dir).await;
    let billing = BillingServer::start(&db_bill, &directory).await;
    let (dir_addr, bill_addr) = (directory.addr.to_string(), billing.addr.to_string());
    for scenario in [
        "health",
        "authorize",
        "get-user",
        "list-users",
        "whoami",
        "create-subscription",
        "get-subscription",
        "list-subscriptions",
        "sign-in",
        "assign-license",
    ] {
        let report = loadgen(&[
            "--scenario",
            scenario,
            "--directory",
            &dir_addr,
            "--billing",
            &bill_addr,
            "--requests",
            "40",
            "-c",
            "4",
            "--connections",
            "2",
            "--users",
            "3",
            "--subscriptions",
            "3",
            "--json",
        ])
        .await
        .report();
        assert_eq!(report["scenario"], scenario, "{report}");
        assert_eq!(report["loop"], "closed", "{report}");
        assert_eq!(count(&report, "requests"), 40, "{scenario}: {report}");
        assert_eq!(count(&report, "ok"), 40, "{scenario}: {report}");
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "{scenario}: {report}"
        );
        let (min, p50, p99, max) = (
            latency(&report, "min"),
            latency(&report, "p50"),
            latency(&report, "p99"),
            latency(&report, "max"),
        );
        assert!(
            0 < min && min <= p50 && p50 <= p99 && p99 <= max,
            "{scenario}: {report}"
        );
        let expected = if scenario.contains("subscription") || scenario.contains("license") {
            &bill_addr
        } else {
            &dir_addr
        };
        assert_eq!(
            report["target"],
            format!("http://{expected}"),
            "{scenario}: {report}"
        );
    }
    billing.stop().await;
    directory.stop().await;
}

/// An open loop starts its calls on schedule, not as fast as answers come back: 200 calls at
/// 200/s take about a second to send, where a closed loop sends them in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_keeps_its_rate() {
    let db = TestDb::sqlite();
    let directory = DirectoryServer::start(&db).await;
    let addr = directory.addr.to_string();
    let report = loadgen(&[
        "--scenario",
        "health",
        "--directory",
        &addr,
        "--rate",
        "200",
        "--duration",
        "1",
        "-c",
        "16",
        "--json",
    ])
    .await
    .report();
    assert_eq!(report["loop"], "open", "{report}");
    // Every slot of the second was sent or reported unsent.
    assert_eq!(
        count(&report, "requests") + count(&report, "unsent"),
        200,
        "{report}"
    );
    assert!(count(&report, "requests") >= 150, "{report}");
    // The last slot is 995 ms after the first.
    let elapsed = report["elapsed_secs"].as_f64().expect("elapsed_secs");
    assert!(elapsed >= 0.99, "sent ahead of schedule: {report}");
    directory.stop().await;
}

/// Calls that fail are counted by status code, with a sample message, instead of ending the
/// run: here the server goes away two and a half seconds into a six-second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_calls_are_counted_by_status_code() {
    let db = TestDb::sqlite();
    let directory = DirectoryServer::start(&db).await;
    let addr = directory.addr.to_string();
    let run = tokio::spawn({
        let addr = addr.clone();
        async move {
            loadgen(&[
                "--scenario",
                "health",
                "--directory",
                &addr,
                "--duration",
                "6",
                "--rate",
                "500",
                "-c",
                "4",
                "--timeout-ms",
                "500",
                "--json",
            ])
            .await
        }
    });
    // Time for the load generator to start and make its first call, which must succeed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    directory.stop().await;
    let report = run.await.expect("loadgen task").report();
    let unavailable = report["errors"]["UNAVAILABLE"].as_u64().unwrap_or(0);
    assert!(unavailable > 0, "no UNAVAILABLE counted: {report}");
    assert!(count(&report, "ok") > 0, "{report}");
    // A call on the connection as the server closes it may end with another code: tonic
    // reports a stream cut by the connection's end as INTERNAL ("h2 protocol error").
    let errors = report["errors"].as_object().expect("errors");
    let failed: u64 = errors.values().map(|n| n.as_u64().unwrap_or(0)).sum();
    assert_eq!(
        count(&report, "ok") + failed,
        count(&report, "requests"),
        "every call is counted once: {report}"
    );
    assert!(
        report["error_samples"]["UNAVAILABLE"].is_string(),
        "{report}"
    );
}

/// A first call that fails ends the run at once with what the server said, rather than a
/// run of errors; load goes only to loopback addresses unless allowed; and the load itself
/// is plaintext HTTP/2 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_targets_are_refused_before_any_load() {
    let db = TestDb::sqlite();
    let directory = DirectoryServer::start(&db).await;
    let addr = directory.addr.to_string();

    let unknown = loadgen(&[
        "--scenario",
        "health",
        "--directory",
        &addr,
        "--health-service",
        "no.such.Service",
        "--requests",
        "10",
    ])
    .await;
    assert!(!unknown.success, "{}", unknown.stdout);
    assert!(
        unknown.stderr.contains("the first health call") && unknown.stderr.contains("NOT_FOUND"),
        "{}",
        unknown.stderr
    );

    let remote = loadgen(&["--scenario", "health", "--directory", "192.0.2.1:50051"]).await;
    assert!(!remote.success);
    assert!(
        remote.stderr.contains("not a loopback address"),
        "{}",
        remote.stderr
    );

    let tls = format!("https://{addr}");
    let https = loadgen(&["--scenario", "health", "--directory", &tls, "-n", "1"]).await;
    assert!(!https.success);
    assert!(https.stderr.contains("plaintext"), "{}", https.stderr);
    directory.stop().await;
}

/// `loadgen watch`: 20 streams over three connections each receive every one of 20 writes,
/// in order; and one stream replays a backlog the fixture loader wrote through the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_scenario_reaches_every_stream_and_replays_a_backlog() {
    let db = TestDb::sqlite();
    let fixtures = loadgen(&[
        "fixtures",
        "--directories",
        "1",
        "--users-per-directory",
        "1",
        "--changes",
        "3000",
        "--rows-per-transaction",
        "1000",
        "--argon2-memory-kib",
        "64",
        "--argon2-iterations",
        "1",
        "--directory-db",
        &db.url,
    ])
    .await;
    assert!(fixtures.success, "fixtures: {}", fixtures.stderr);
    let server = DirectoryServer::start(&db).await;
    let addr = server.addr.to_string();
    let live = loadgen(&[
        "watch",
        "--directory",
        &addr,
        "--streams",
        "20",
        "--streams-per-connection",
        "8",
        "--rate",
        "20",
        "--duration",
        "1",
        "--json",
    ])
    .await
    .report();
    assert_eq!(count(&live, "writes"), 20, "{live}");
    assert_eq!(count(&live, "connections"), 3, "{live}");
    assert_eq!(count(&live, "streams_complete"), 20, "{live}");
    assert_eq!(count(&live, "streams_out_of_order"), 0, "{live}");
    assert_eq!(count(&live, "deliveries"), 400, "{live}");
    let token_file = db.service_token_file();
    let replay = loadgen(&[
        "watch",
        "--directory",
        &addr,
        "--replay",
        "3000",
        "--service-token-file",
        token_file.to_str().expect("a UTF-8 path"),
        "--json",
    ])
    .await
    .report();
    assert_eq!(count(&replay, "changes"), 3000, "{replay}");
    // More than the backlog: the stream catches up, idles, and says so with a bookmark.
    let too_many = loadgen(&[
        "watch",
        "--directory",
        &addr,
        "--replay",
        "5000",
        "--service-token-file",
        token_file.to_str().expect("a UTF-8 path"),
    ])
    .await;
    assert!(!too_many.success);
}
