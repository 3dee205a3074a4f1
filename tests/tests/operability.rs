//! What operators rely on: Prometheus metrics, structured logs with one request id and trace
//! across both services, and no secrets in logs.

use std::time::Duration;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::process::Proc;
use integration_tests::*;
use tonic::transport::Channel;

/// The value of the first sample line that starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn channel(p: &Proc) -> Channel {
    Channel::from_shared(p.url())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test]
async fn metrics_logs_request_ids_and_traces() {
    let ddb = TestDb::sqlite();
    let bdb = TestDb::sqlite();
    let (dport, bport) = (free_port(), free_port());
    let directory = Proc::start(
        "directory-svc",
        &[
            "--database-url",
            &ddb.url,
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
            "--metrics-listen",
            &format!("127.0.0.1:{dport}"),
        ],
        &[],
    );
    let billing = Proc::start(
        "billing-svc",
        &[
            "--database-url",
            &bdb.url,
            "--directory-url",
            &directory.url(),
            "--metrics-listen",
            &format!("127.0.0.1:{bport}"),
        ],
        &[],
    );
    let mut dir =
        dpb::directory_service_client::DirectoryServiceClient::new(channel(&directory).await);
    let mut bill = BillingServiceClient::new(channel(&billing).await);
    let tenant = sign_up(&mut dir, "contoso").await;
    let _ = dir.who_am_i(dpb::WhoAmIRequest {}).await; // an UNAUTHENTICATED call

    // One purchase, one request id and one trace, in both services' logs.
    let mut request = authed(
        bpb::CreateSubscriptionRequest {
            offer_id: "office365-e3".into(),
            display_name: "traced".into(),
            seats: 3,
            request_id: String::new(),
        },
        &tenant.token,
    );
    request
        .metadata_mut()
        .insert("x-request-id", "purchase-42".parse().expect("ascii"));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("ascii"),
    );
    let answer = bill.create_subscription(request).await.expect("purchase");
    assert_eq!(
        answer
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("purchase-42")
    );

    // Metrics: RPCs by method and code, latency histograms, in-flight, pool, directory client.
    let d = scrape(dport);
    assert!(
        sample(&d, "grpc_server_handled_total{method=\"/directory.v1.DirectoryService/CreateDirectory\",code=\"OK\"}").unwrap_or(0.0) >= 1.0,
        "{d}"
    );
    assert!(sample(&d, "grpc_server_handled_total{method=\"/directory.v1.DirectoryService/WhoAmI\",code=\"UNAUTHENTICATED\"}").unwrap_or(0.0) >= 1.0, "{d}");
    assert!(sample(&d, "grpc_server_handled_total{method=\"/directory.v1.DirectoryService/Authorize\",code=\"OK\"}").unwrap_or(0.0) >= 1.0, "{d}");
    assert!(d.contains("grpc_server_handling_seconds_bucket{method=\"/directory.v1.DirectoryService/SignIn\",le=\"0.005\"}"), "{d}");
    assert!(d.contains("grpc_server_in_flight"), "{d}");
    let b = scrape(bport);
    assert!(sample(&b, "grpc_server_handled_total{method=\"/billing.v1.BillingService/CreateSubscription\",code=\"OK\"}").unwrap_or(0.0) >= 1.0, "{b}");
    assert!(
        sample(&b, "directory_client_requests_total{code=\"OK\"}").unwrap_or(0.0) >= 1.0,
        "{b}"
    );
    assert!(b.contains("directory_client_request_seconds_bucket"), "{b}");
    assert!(
        sample(&b, "billing_purchase_commit_seconds_count").unwrap_or(0.0) >= 1.0,
        "{b}"
    );
    // The pool gauges are read every 2 s: wait for the first reading.
    let started = std::time::Instant::now();
    let mut b = scrape(bport);
    while sample(&b, "db_pool_max_connections").is_none() && started.elapsed().as_secs() < 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b = scrape(bport);
    }
    assert!(
        sample(&b, "db_pool_max_connections").unwrap_or(0.0) >= 1.0,
        "{b}"
    );
    assert!(b.contains("db_pool_connections{state=\"idle\"}"), "{b}");

    // Logs: JSON lines; the purchase's span carries the caller's request id, trace id and
    // directory in billing and in the directory's Authorize (lines reach the log in batches:
    // wait for them, a few seconds at most).
    let billing_line = logged(&billing, "/billing.v1.BillingService/CreateSubscription").await;
    let directory_line = logged(&directory, "/directory.v1.DirectoryService/Authorize").await;
    for line in [&billing_line, &directory_line] {
        assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
        assert_eq!(
            line["span"]["directory_id"],
            tenant.directory.id.as_str(),
            "{line}"
        );
        assert_eq!(line["span"]["code"], "OK", "{line}");
        assert!(line["span"]["latency_us"].is_number(), "{line}");
    }

    // Never a password or a token in the logs.
    for line in directory.logs().iter().chain(billing.logs().iter()) {
        assert!(!line.contains(PASSWORD), "password in log: {line}");
        assert!(!line.contains(&tenant.token), "token in log: {line}");
    }
}

/// The "rpc finished" line of `method` for the call with request id `purchase-42` in `p`'s
/// log, once it is there.
async fn logged(p: &Proc, method: &str) -> serde_json::Value {
    let ours = |v: &&serde_json::Value| {
        v["span"]["method"] == method && v["span"]["request_id"] == "purchase-42"
    };
    let lines = p.finished_calls(|l| l.iter().any(|v| ours(&v))).await;
    lines
        .iter()
        .find(ours)
        .cloned()
        .unwrap_or_else(|| panic!("no finished {method} with the request id in {lines:#?}"))
}

/// A log sink that stops reading (a stalled collector, a full pipe) does not stall the
/// service: its lines wait for the log writer's thread, and none is lost once the sink reads
/// again. When each call wrote its own line, the calls after the first pipe-full of lines
/// (about 64 KiB) hung with the runtime's threads blocked in `write`.
#[tokio::test]
async fn a_stalled_log_sink_does_not_stall_the_service() {
    let db = TestDb::sqlite();
    let directory = Proc::directory(&db.url);
    let mut dir =
        dpb::directory_service_client::DirectoryServiceClient::new(channel(&directory).await);
    directory.stall_logs(true);
    // Each call logs a JSON line of about 400 bytes: 2,000 of them are ten pipes full.
    const CALLS: usize = 2_000;
    for i in 0..CALLS {
        let mut request = tonic::Request::new(dpb::WhoAmIRequest {});
        request.set_timeout(Duration::from_secs(5));
        request.metadata_mut().insert(
            "x-request-id",
            format!("stalled-{i}").parse().expect("ascii"),
        );
        let refused = tokio::time::timeout(Duration::from_secs(10), dir.who_am_i(request))
            .await
            .unwrap_or_else(|_| panic!("call {i} hung while the log sink was stalled"))
            .expect_err("no token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "call {i}");
    }
    directory.stall_logs(false);
    let logged = || -> std::collections::HashSet<String> {
        directory
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["span"]["request_id"].as_str().map(str::to_owned))
            .filter(|id| id.starts_with("stalled-"))
            .collect()
    };
    for _ in 0..100 {
        if logged().len() == CALLS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        logged().len(),
        CALLS,
        "every call's line reaches the sink once it reads again"
    );
}
