//! Hostile callers: sign-in and sign-up throttling that slows only the abuser, load shedding
//! instead of unbounded queues, and oversized messages.

use std::time::{Duration, Instant};

use integration_tests::contract::directory::v1 as pb;
use integration_tests::*;
use tonic::Code;
use tonic_types::StatusExt as _;

fn sign_in_req(upn: &str, password: &str) -> pb::SignInRequest {
    pb::SignInRequest {
        user_principal_name: upn.into(),
        password: password.into(),
    }
}

fn retry_after(status: &tonic::Status) -> Duration {
    status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay")
}

/// A directory whose UPNs may fail to sign in five times a minute, a client, and a tenant.
async fn five_failures_a_minute(
    db: &TestDb,
) -> (
    DirectoryServer,
    pb::directory_service_client::DirectoryServiceClient<tonic::transport::Channel>,
    Tenant,
) {
    let mut config = directory_config(db);
    config.limits.signin_failures_per_upn_per_minute = 5;
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    (server, client, t)
}

async fn failed_sign_ins_throttle_that_upn_only(backend: Backend) {
    let db = db_or_skip!(backend);
    let (_server, mut client, t) = five_failures_a_minute(&db).await;
    let (jane, _) = add_user(&mut client, &t, "jane", &[]).await;

    for _ in 0..5 {
        expect_err(
            client
                .sign_in(sign_in_req(&jane.user_principal_name, "Wr0ng-guess"))
                .await,
            Code::Unauthenticated,
            "INVALID_CREDENTIALS",
        );
    }
    // The sixth attempt is refused before the password is even checked, the right one too.
    for password in ["Wr0ng-guess", PASSWORD] {
        let status = expect_err(
            client
                .sign_in(sign_in_req(&jane.user_principal_name, password))
                .await,
            Code::ResourceExhausted,
            "RATE_LIMITED",
        );
        let wait = retry_after(&status);
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(!status.message().contains(password));
    }
    // Unknown UPNs are throttled the same way: throttling does not reveal who exists.
    for _ in 0..5 {
        let _ = client
            .sign_in(sign_in_req("ghost@contoso.onmicrosoft.com", "Wr0ng-guess"))
            .await;
    }
    expect_err(
        client
            .sign_in(sign_in_req("ghost@contoso.onmicrosoft.com", "Wr0ng-guess"))
            .await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
    // Everyone else signs in as usual, and at once.
    let started = Instant::now();
    sign_in(&mut client, &t.admin.user_principal_name, PASSWORD).await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Guesses sent all at once get no more password checks than guesses sent one by one: each
/// check holds one of the UPN's failures while it runs, so a burst cannot slip past a bucket
/// with tokens left before any of its guesses has failed.
async fn concurrent_guesses_share_the_upns_failure_budget(backend: Backend) {
    let db = db_or_skip!(backend);
    let (_server, mut client, t) = five_failures_a_minute(&db).await;
    let upn = t.admin.user_principal_name.clone();
    let guesses = (0..40).map(|i| {
        let mut client = client.clone();
        let upn = upn.clone();
        async move {
            client
                .sign_in(sign_in_req(&upn, &format!("Wr0ng-guess-{i}")))
                .await
        }
    });
    let results = futures::future::join_all(guesses).await;
    let mut checked = 0;
    let mut throttled = 0;
    for result in &results {
        let status = result.as_ref().expect_err("every guess is wrong");
        match integration_tests::details(status).0.as_str() {
            "INVALID_CREDENTIALS" => checked += 1,
            "RATE_LIMITED" => throttled += 1,
            other => panic!("unexpected {other}: {status:?}"),
        }
    }
    // Five a minute: the five the bucket holds, and at most one refilled meanwhile.
    assert!((5..=6).contains(&checked), "{checked} passwords checked");
    assert_eq!(checked + throttled, 40);
    // A correct password is throttled like any other attempt while the budget is spent...
    expect_err(
        client.sign_in(sign_in_req(&upn, PASSWORD)).await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
    // ...and a success does not spend it: after ten, the five failures are all still there.
    let other = sign_up(&mut client, "fabrikam").await;
    let upn = other.admin.user_principal_name;
    for _ in 0..10 {
        sign_in(&mut client, &upn, PASSWORD).await;
    }
    for _ in 0..5 {
        expect_err(
            client.sign_in(sign_in_req(&upn, "Wr0ng-guess")).await,
            Code::Unauthenticated,
            "INVALID_CREDENTIALS",
        );
    }
    expect_err(
        client.sign_in(sign_in_req(&upn, "Wr0ng-guess")).await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
}

async fn sign_in_and_sign_up_are_throttled_per_peer(backend: Backend) {
    let db = db_or_skip!(backend);
    let mut config = directory_config(&db);
    config.limits.signin_per_peer_per_minute = 8;
    config.limits.signup_per_peer_per_minute = 3;
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await; // one sign-up, one sign-in
    for i in 1..3 {
        client
            .create_directory(pb::CreateDirectoryRequest {
                display_name: "More".into(),
                domain_prefix: format!("more{i}"),
                admin_user_name: "admin".into(),
                admin_display_name: "Admin".into(),
                admin_password: PASSWORD.into(),
            })
            .await
            .expect("within the sign-up limit");
    }
    let status = expect_err(
        client
            .create_directory(pb::CreateDirectoryRequest {
                display_name: "Flood".into(),
                domain_prefix: "flood".into(),
                admin_user_name: "admin".into(),
                admin_display_name: "Admin".into(),
                admin_password: PASSWORD.into(),
            })
            .await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
    assert!(retry_after(&status) > Duration::ZERO);
    // Nothing was written by the refused sign-up.
    let taken = client
        .sign_in(sign_in_req("admin@flood.onmicrosoft.com", PASSWORD))
        .await;
    assert!(taken.is_err());

    let mut refused = 0;
    for _ in 0..12 {
        if let Err(status) = client
            .sign_in(sign_in_req(&t.admin.user_principal_name, PASSWORD))
            .await
        {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            refused += 1;
        }
    }
    assert!(
        refused >= 4,
        "a peer over its sign-in budget is refused ({refused} of 12)"
    );
    // Calls that are not sign-ins are not slowed: the token still works at once.
    client
        .who_am_i(authed(pb::WhoAmIRequest {}, &t.token))
        .await
        .expect("other calls go on");
}

async fn overload_is_shed_at_once_instead_of_queued(backend: Backend) {
    let db = db_or_skip!(backend);
    let mut config = directory_config(&db);
    config.serve.max_in_flight = 2;
    // Expensive hashing, so sign-ins stay in flight long enough to pile up.
    config.argon2 = directory_svc::domain::passwords::Argon2Cost {
        memory_kib: 32 * 1024,
        iterations: 4,
        parallelism: 1,
    };
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let calls = (0..24).map(|_| {
        let mut client = client.clone();
        let upn = t.admin.user_principal_name.clone();
        async move {
            let started = Instant::now();
            let result = client.sign_in(sign_in_req(&upn, PASSWORD)).await;
            (result, started.elapsed())
        }
    });
    let results = futures::future::join_all(calls).await;
    let shed: Vec<_> = results
        .iter()
        .filter(|(r, _)| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .collect();
    let served = results.iter().filter(|(r, _)| r.is_ok()).count();
    assert!(served >= 2, "some calls are served ({served})");
    assert!(!shed.is_empty(), "calls beyond the limit are shed");
    for (result, took) in &shed {
        let status = result.as_ref().expect_err("shed");
        assert_eq!(integration_tests::details(status).0, "OVERLOADED");
        assert!(status.get_error_details().retry_info().is_some());
        assert!(
            *took < Duration::from_millis(500),
            "shed quickly, not after queueing: {took:?}"
        );
    }
    // Health still answers while the server sheds.
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
}

async fn oversized_messages_are_resource_exhausted(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let huge = pb::CreateUserRequest {
        user_principal_name: "big@contoso.onmicrosoft.com".into(),
        display_name: "x".repeat(10 * 1024 * 1024),
        password: PASSWORD.into(),
        roles: vec![],
    };
    let status = expect_err(
        client.create_user(authed(huge, &t.token)).await,
        Code::ResourceExhausted,
        "MESSAGE_TOO_LARGE",
    );
    assert!(status.message().len() < 200);
    // The server keeps serving.
    client
        .who_am_i(authed(pb::WhoAmIRequest {}, &t.token))
        .await
        .expect("still serving");
}

on_both_backends!(
    failed_sign_ins_throttle_that_upn_only,
    concurrent_guesses_share_the_upns_failure_budget,
    sign_in_and_sign_up_are_throttled_per_peer,
    overload_is_shed_at_once_instead_of_queued,
    oversized_messages_are_resource_exhausted,
);
