//! What standard gRPC clients send and expect at the wire: compressed requests and answers,
//! a deadline (`grpc-timeout`) that passes on the server, and the framework's own refusals
//! (unknown method, unsupported encoding), each with ErrorInfo naming its real cause.
//!
//! Raw HTTP/2 (the `h2` crate, no gRPC client) is used where a client library would hide what
//! the server sent: tonic's and grpcio's clients run their own timer for a deadline and
//! report their own status when it fires first.

use std::time::Duration;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::process::Proc;
use integration_tests::raw::{framed, raw_call, raw_call_with_body};
use integration_tests::*;
use prost::Message as _;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_types::StatusExt as _;

const SIGN_IN: &str = "/directory.v1.DirectoryService/SignIn";
const WHO_AM_I: &str = "/directory.v1.DirectoryService/WhoAmI";
const LIST_USERS: &str = "/directory.v1.DirectoryService/ListUsers";
const CREATE_SUBSCRIPTION: &str = "/billing.v1.BillingService/CreateSubscription";

/// Every encoding tonic implements, both ways, on both services.
async fn compressed_calls_work_in_every_encoding(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    for encoding in [
        CompressionEncoding::Gzip,
        CompressionEncoding::Deflate,
        CompressionEncoding::Zstd,
    ] {
        let mut dir = directory
            .client()
            .await
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let mut bill = billing
            .client()
            .await
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let tenant = sign_up(&mut dir, &format!("zip{encoding}")).await;
        let me = dir
            .who_am_i(authed(dpb::WhoAmIRequest {}, &tenant.token))
            .await
            .unwrap_or_else(|s| panic!("{encoding}: WhoAmI {s:?}"))
            .into_inner();
        assert_eq!(me.user.map(|u| u.id), Some(tenant.admin.id.clone()));
        let bought = bill
            .create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    offer_id: "office365-e3".into(),
                    display_name: format!("compressed with {encoding}"),
                    seats: 5,
                    request_id: String::new(),
                },
                &tenant.token,
            ))
            .await
            .unwrap_or_else(|s| panic!("{encoding}: CreateSubscription {s:?}"))
            .into_inner();
        let read = bill
            .get_subscription(authed(
                bpb::GetSubscriptionRequest {
                    subscription_id: bought.id.clone(),
                },
                &tenant.token,
            ))
            .await
            .unwrap_or_else(|s| panic!("{encoding}: GetSubscription {s:?}"))
            .into_inner();
        assert_eq!(read, bought, "{encoding}");
    }
}

/// Answers are compressed for a caller that accepts it when they are at least 1 KiB, and sent
/// as they are below that; a compressed answer decodes to the same message.
async fn large_answers_are_compressed_and_small_ones_not(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let mut dir = directory.client().await;
    let tenant = sign_up(&mut dir, "zipped").await;
    for i in 0..30 {
        add_user(&mut dir, &tenant, &format!("user{i:02}"), &[]).await;
    }
    let gzip = [("grpc-accept-encoding", "gzip")];
    let list = dpb::ListUsersRequest {
        page_size: 100,
        ..Default::default()
    }
    .encode_to_vec();
    let bearer = format!("Bearer {}", tenant.token);
    let with_token = |extra: &[(&'static str, &'static str)]| {
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend_from_slice(extra);
        headers
    };

    let large = raw_call(directory.addr, LIST_USERS, &with_token(&gzip), &list).await;
    assert_eq!(large.status.code(), Code::Ok, "{large:?}");
    assert_eq!(
        large.headers.get("grpc-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    assert_eq!(large.compressed_flag(), 1, "a 30-user page is compressed");
    let plain = raw_call(directory.addr, LIST_USERS, &with_token(&[]), &list).await;
    assert_eq!(
        plain.compressed_flag(),
        0,
        "not compressed unless asked for"
    );
    let unzipped = {
        use std::io::Read as _;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&large.data[5..])
            .read_to_end(&mut out)
            .expect("gzip");
        out
    };
    assert!(
        plain.data.len() - 5 >= 1024,
        "the page is over the threshold"
    );
    assert_eq!(unzipped, plain.data[5..], "the same page either way");

    let small = raw_call(directory.addr, WHO_AM_I, &with_token(&gzip), &[]).await;
    assert_eq!(small.status.code(), Code::Ok, "{small:?}");
    assert!(small.data.len() - 5 < 1024);
    assert_eq!(small.compressed_flag(), 0, "a small answer goes as it is");
}

/// The framework's own refusals keep their cause: which method, which encoding.
async fn framework_refusals_name_their_cause(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    for (addr, domain, known, unknown) in [
        (
            directory.addr,
            "directory-svc",
            SIGN_IN,
            "/directory.v1.DirectoryService/NoSuchMethod",
        ),
        (
            billing.addr,
            "billing-svc",
            CREATE_SUBSCRIPTION,
            "/no.such.Service/Method",
        ),
    ] {
        let missing = raw_call(addr, unknown, &[], &[]).await;
        assert_eq!(missing.status.code(), Code::Unimplemented, "{missing:?}");
        assert_eq!(missing.reason(), ("METHOD_NOT_FOUND".into(), domain.into()));
        assert!(missing.status.message().contains(unknown), "{missing:?}");

        let brotli = raw_call(addr, known, &[("grpc-encoding", "br")], &[]).await;
        assert_eq!(brotli.status.code(), Code::Unimplemented, "{brotli:?}");
        assert_eq!(
            brotli.reason(),
            ("UNSUPPORTED_ENCODING".into(), domain.into())
        );
        let message = brotli.status.message();
        assert!(
            message.contains("`br`") && message.contains("gzip"),
            "{message}"
        );
        assert!(
            brotli.headers.contains_key("grpc-accept-encoding"),
            "the answer lists the encodings accepted: {brotli:?}"
        );

        // A gzip bomb: 64 MiB of zeros in about 64 KiB. Inflating stops at the 1 MiB limit.
        let bomb = {
            use std::io::Write as _;
            let mut zip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            for _ in 0..64 {
                zip.write_all(&[0u8; 1 << 20]).expect("gzip");
            }
            zip.finish().expect("gzip")
        };
        let inflated = raw_call_with_body(
            addr,
            known,
            &[("grpc-encoding", "gzip")],
            framed(true, &bomb),
        )
        .await;
        assert_eq!(
            inflated.status.code(),
            Code::ResourceExhausted,
            "{inflated:?}"
        );
        assert_eq!(
            inflated.reason(),
            ("MESSAGE_TOO_LARGE".into(), domain.into())
        );

        let garbage = raw_call(addr, known, &[], b"\xff\xff\xff").await;
        assert_eq!(garbage.status.code(), Code::InvalidArgument, "{garbage:?}");
        assert_eq!(
            garbage.reason(),
            ("MALFORMED_MESSAGE".into(), domain.into())
        );
        assert!(
            garbage.status.message().contains("decode"),
            "the decoder's words are kept: {garbage:?}"
        );
    }
}

/// A deadline that passes on the server ends DEADLINE_EXCEEDED with ErrorInfo (never tonic's
/// CANCELLED "Timeout expired"), and the call is logged and counted like any other.
#[tokio::test]
async fn a_deadline_passing_on_the_server_is_deadline_exceeded_logged_and_counted() {
    let db = TestDb::sqlite();
    let metrics_port = free_port();
    // Argon2 at its production cost: a sign-in takes tens of milliseconds, so a deadline of a
    // few passes while it runs.
    let directory = Proc::start(
        "directory-svc",
        &[
            "--database-url",
            &db.url,
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--signin-per-peer-per-minute",
            "0",
            "--signup-per-peer-per-minute",
            "0",
        ],
        &[],
    );
    let channel = tonic::transport::Channel::from_shared(directory.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut dir = dpb::directory_service_client::DirectoryServiceClient::new(channel);
    let tenant = sign_up(&mut dir, "hurried").await;
    let sign_in = dpb::SignInRequest {
        user_principal_name: tenant.admin.user_principal_name.clone(),
        password: PASSWORD.into(),
    }
    .encode_to_vec();

    let mut wrong = Vec::new();
    for timeout in ["1n", "3m"] {
        for _ in 0..20 {
            let answer = raw_call(
                directory.addr,
                SIGN_IN,
                &[("grpc-timeout", timeout)],
                &sign_in,
            )
            .await;
            let (reason, domain) = answer.reason();
            if answer.status.code() != Code::DeadlineExceeded
                || reason != "DEADLINE_EXCEEDED"
                || domain != "directory-svc"
            {
                wrong.push(format!("{timeout}: {:?}", answer.status));
            }
        }
    }
    assert!(wrong.is_empty(), "{} of 40 off: {wrong:#?}", wrong.len());

    // Counted: 40 DEADLINE_EXCEEDED sign-ins, none CANCELLED.
    let metrics = scrape(metrics_port);
    let count = |code: &str| {
        let series = format!("grpc_server_handled_total{{method=\"{SIGN_IN}\",code=\"{code}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("DEADLINE_EXCEEDED"), 40.0, "{metrics}");
    assert_eq!(count("CANCELLED"), 0.0, "{metrics}");

    // Logged: each with its method and code, as every call is. (Lines reach the log in
    // batches: wait for them, a few seconds at most.)
    let expired = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|v| v["span"]["method"] == SIGN_IN && v["span"]["code"] == "DEADLINE_EXCEEDED")
            .count()
    };
    let lines = directory.finished_calls(|l| expired(l) >= 40).await;
    assert_eq!(expired(&lines), 40, "every expired call has its log line");
}

/// Billing spends the time the caller gives it: a few milliseconds are enough for a read, a
/// deadline that cannot be met is DEADLINE_EXCEEDED (not UNAVAILABLE, which a client would
/// retry), and nothing is written.
async fn billing_uses_the_callers_whole_budget(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let tenant = sign_up(&mut dir, "hasty").await;
    let bought = bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "office365-e3".into(),
                display_name: "read fast".into(),
                seats: 1,
                request_id: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("purchase")
        .into_inner();

    // A read of a millisecond or two, under budgets of 5 to 50 ms.
    let mut outcomes = std::collections::BTreeMap::<(u64, String), usize>::new();
    for budget_ms in [5, 8, 50] {
        for _ in 0..20 {
            let mut request = authed(
                bpb::GetSubscriptionRequest {
                    subscription_id: bought.id.clone(),
                },
                &tenant.token,
            );
            request.set_timeout(Duration::from_millis(budget_ms));
            let outcome = match bill.get_subscription(request).await {
                Ok(_) => "OK".to_owned(),
                Err(status) => format!("{:?} {}", status.code(), details(&status).0),
            };
            *outcomes.entry((budget_ms, outcome)).or_default() += 1;
        }
    }
    let ok = |budget_ms: u64| {
        outcomes
            .get(&(budget_ms, "OK".to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert!(
        outcomes.keys().all(|(_, o)| !o.starts_with("Unavailable")),
        "never UNAVAILABLE for the caller's own short deadline: {outcomes:?}"
    );
    // Unloaded, nearly all do; the suite runs tests side by side on two cores, so one is
    // enough to show the budget is the caller's (the margin used to leave nothing of 5 ms).
    assert!(ok(5) >= 1, "a 5 ms read can succeed: {outcomes:?}");
    assert_eq!(ok(50), 20, "every 50 ms read succeeds: {outcomes:?}");

    // A microsecond: the caller's deadline is gone before the directory can answer.
    let purchase = bpb::CreateSubscriptionRequest {
        offer_id: "azure-pay-as-you-go".into(),
        display_name: "too late".into(),
        seats: 0,
        request_id: String::new(),
    }
    .encode_to_vec();
    let bearer = format!("Bearer {}", tenant.token);
    for _ in 0..5 {
        let late = raw_call(
            billing.addr,
            CREATE_SUBSCRIPTION,
            &[("authorization", &bearer), ("grpc-timeout", "1u")],
            &purchase,
        )
        .await;
        assert_eq!(late.status.code(), Code::DeadlineExceeded, "{late:?}");
        assert_eq!(
            late.reason(),
            ("DEADLINE_EXCEEDED".into(), "billing-svc".into())
        );
        assert!(late.status.get_error_details().error_info().is_some());
    }
    let listed = bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest::default(),
            &tenant.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.subscriptions.len(),
        1,
        "nothing bought past its deadline"
    );
}

on_both_backends!(
    compressed_calls_work_in_every_encoding,
    large_answers_are_compressed_and_small_ones_not,
    framework_refusals_name_their_cause,
    billing_uses_the_callers_whole_budget,
);
