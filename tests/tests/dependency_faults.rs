//! billing-svc when the directory is slow or hangs: answers within its deadline, and neither
//! tasks nor memory pile up while it waits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::process::Proc;
use integration_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to `upstream` that holds every chunk coming back for `delay`.
async fn slow_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Accepts connections and never answers.
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

fn purchase(token: &str) -> tonic::Request<bpb::CreateSubscriptionRequest> {
    authed(
        bpb::CreateSubscriptionRequest {
            offer_id: "azure-pay-as-you-go".into(),
            display_name: "slow".into(),
            seats: 0,
            request_id: String::new(),
        },
        token,
    )
}

async fn a_slow_directory_is_waited_for_within_the_deadline_and_cut_beyond_it(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let mut dir = directory.client().await;
    let tenant = sign_up(&mut dir, "contoso").await;

    // Answers slowed by 300 ms per chunk: slow, but inside billing's 2 s budget.
    let slow = slow_proxy(directory.addr, Duration::from_millis(300)).await;
    let bdb = db_or_skip!(backend);
    let billing = BillingServer::start_with(billing_config(&bdb, &format!("http://{slow}"))).await;
    let mut bill = billing.client().await;
    let started = Instant::now();
    bill.create_subscription(purchase(&tenant.token))
        .await
        .expect("a slow directory still answers in time");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the answer did pass through the slow proxy"
    );

    // Answers slowed by 3 s: beyond the budget, cut at 2 s with nothing written.
    let slower = slow_proxy(directory.addr, Duration::from_secs(3)).await;
    let bdb2 = db_or_skip!(backend);
    let billing2 =
        BillingServer::start_with(billing_config(&bdb2, &format!("http://{slower}"))).await;
    let mut bill2 = billing2.client().await;
    let started = Instant::now();
    expect_err(
        bill2.create_subscription(purchase(&tenant.token)).await,
        tonic::Code::Unavailable,
        "DIRECTORY_UNAVAILABLE",
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(2600),
        "cut at the 2 s deadline: {took:?}"
    );
    let listed = bill2
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest::default(),
            &tenant.token,
        ))
        .await;
    // The listing needs the directory too: also refused, and billing2's database is empty.
    assert!(listed.is_err());
}

#[tokio::test]
async fn a_hanging_directory_piles_up_neither_calls_nor_memory() {
    let hole = black_hole().await;
    let bdb = TestDb::sqlite();
    let billing = Proc::start(
        "billing-svc",
        &[
            "--database-url",
            &bdb.url,
            "--directory-url",
            &format!("http://{hole}"),
            "--directory-timeout-ms",
            "500",
        ],
        &[],
    );
    let channel = tonic::transport::Channel::from_shared(billing.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let bill = BillingServiceClient::new(channel);
    let wave = |n: usize| {
        let calls = (0..n).map(|_| {
            let mut bill = bill.clone();
            async move { bill.create_subscription(purchase("a.b.c")).await }
        });
        futures::future::join_all(calls)
    };
    // Warm up, then measure two more waves of 300 calls each.
    let _ = wave(300).await;
    let after_first = billing.rss_kib();
    for _ in 0..2 {
        let started = Instant::now();
        let results = wave(300).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "every call ends at its deadline, not later"
        );
        for result in results {
            let status = result.expect_err("the directory never answers");
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
    }
    let after_third = billing.rss_kib();
    assert!(after_first > 0 && after_third > 0);
    assert!(
        after_third < after_first + 8 * 1024,
        "memory does not grow wave after wave: {after_first} KiB then {after_third} KiB"
    );
}

on_both_backends!(a_slow_directory_is_waited_for_within_the_deadline_and_cut_beyond_it);
