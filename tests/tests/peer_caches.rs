//! Caches on PostgreSQL, where several replicas share one database (`storage::peers`): a
//! change made through one replica applies to the very next call on every other replica,
//! even while that replica keeps answering (and refilling its cache) from the same rows; a
//! replica that loses its connection to the database stops answering from memory; and a
//! writer waits for a replica that does not acknowledge until that replica's lease has run
//! out.

use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::*;
use sqlx::Connection as _;
use tonic::Code;
use tonic::transport::Channel;

type Dir = dpb::directory_service_client::DirectoryServiceClient<Channel>;

const ROUNDS: usize = 30;

async fn authorize(dir: &mut Dir, token: &str) -> Result<dpb::AuthorizeResponse, tonic::Status> {
    dir.authorize(authed(
        dpb::AuthorizeRequest {
            action: dpb::Action::PurchaseSubscription as i32,
            ..Default::default()
        },
        token,
    ))
    .await
    .map(|r| r.into_inner())
}

async fn whoami_name(dir: &mut Dir, token: &str) -> String {
    dir.who_am_i(authed(dpb::WhoAmIRequest {}, token))
        .await
        .expect("whoami")
        .into_inner()
        .user
        .expect("user")
        .display_name
}

async fn sql(url: &str, statement: &str) -> u64 {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to the test database");
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut conn)
        .await
        .expect("statement")
        .rows_affected()
}

/// Waits until `holders` replicas have registered their leases (a replica registers in the
/// background once it has started; until then it answers from the database).
async fn leases_held(url: &str, holders: i64) {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to the test database");
    let started = Instant::now();
    loop {
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_holders")
            .fetch_one(&mut conn)
            .await
            .expect("count holders");
        if held >= holders {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{held} of {holders} replicas registered after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `call` until it answers anything but UNAVAILABLE (a replica whose pooled connections
/// were just dropped may answer UNAVAILABLE once per call path).
macro_rules! through_unavailable {
    ($call:expr) => {{
        let mut attempts = 0;
        loop {
            match $call {
                Err(err) if err.code() == Code::Unavailable && attempts < 10 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other,
            }
        }
    }};
}

#[tokio::test]
async fn a_role_change_on_one_replica_applies_to_the_next_call_on_another() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = DirectoryServer::start(&db).await;
    let b = DirectoryServer::start(&db).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let tenant = sign_up(&mut on_a, "adatum").await;
    let (buyer, token) = add_user(&mut on_a, &tenant, "buyer", &[]).await;
    leases_held(&db.url, 2).await;

    // B answers from memory: a change made behind the services' back is not seen there...
    assert_eq!(whoami_name(&mut on_b, &token).await, "buyer");
    let changed = sql(
        &db.url,
        &format!(
            "UPDATE users SET display_name = 'renamed by hand' WHERE id = '{}'",
            buyer.id
        ),
    )
    .await;
    assert_eq!(changed, 1);
    assert_eq!(
        whoami_name(&mut on_b, &token).await,
        "buyer",
        "B reads the user from its cache"
    );

    // ...while every change made through a replica reaches B before it is acknowledged, even
    // with readers on B refilling its cache all along.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (mut dir, token) = (on_b.clone(), token.clone());
            tokio::spawn(async move {
                for _ in 0..200 {
                    let _ = authorize(&mut dir, &token).await;
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        let billing_admin = round % 2 == 0;
        let roles = if billing_admin {
            vec![dpb::Role::BillingAdministrator as i32]
        } else {
            vec![]
        };
        on_a.set_user_roles(authed(
            dpb::SetUserRolesRequest {
                user_id: buyer.id.clone(),
                roles: roles.clone(),
            },
            &tenant.token,
        ))
        .await
        .expect("A sets the buyer's roles");
        let decision = authorize(&mut on_b, &token).await.expect("authorize on B");
        assert_eq!(
            decision.allowed, billing_admin,
            "round {round}: B decided from roles older than A's acknowledged change"
        );
        assert_eq!(decision.roles, roles, "round {round}");
    }
    for reader in readers {
        reader.await.expect("reader");
    }
    assert_eq!(
        whoami_name(&mut on_b, &token).await,
        "renamed by hand",
        "the role changes made B read the row again"
    );

    // A deletion through A: the token fails on B at once.
    on_a.delete_user(authed(
        dpb::DeleteUserRequest {
            user_id: buyer.id.clone(),
        },
        &tenant.token,
    ))
    .await
    .expect("A deletes the buyer");
    let err = authorize(&mut on_b, &token)
        .await
        .expect_err("a deleted user's token fails on B");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn deletes_and_restores_on_one_replica_apply_to_the_next_call_on_another() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = DirectoryServer::start(&db).await;
    let b = DirectoryServer::start(&db).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let tenant = sign_up(&mut on_a, "adatum").await;
    let (user, first) = add_user(
        &mut on_a,
        &tenant,
        "jane",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    leases_held(&db.url, 2).await;
    let get = |id: String| dpb::GetUserRequest {
        lookup: Some(dpb::get_user_request::Lookup::UserId(id)),
    };
    let mut token = first.clone();
    for round in 0..ROUNDS / 3 {
        // Readers on B keep the user in its cache while A deletes and restores.
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (mut dir, token, admin, id) = (
                    on_b.clone(),
                    token.clone(),
                    tenant.token.clone(),
                    user.id.clone(),
                );
                tokio::spawn(async move {
                    for _ in 0..30 {
                        let _ = authorize(&mut dir, &token).await;
                        let _ = dir.get_user(authed(get(id.clone()), &admin)).await;
                    }
                })
            })
            .collect();
        assert!(
            authorize(&mut on_b, &token)
                .await
                .expect("authorize")
                .allowed
        );
        on_a.delete_user(authed(
            dpb::DeleteUserRequest {
                user_id: user.id.clone(),
            },
            &tenant.token,
        ))
        .await
        .expect("A deletes");
        let err = authorize(&mut on_b, &token)
            .await
            .expect_err("the deleted user's token fails on B at once");
        assert_eq!(err.code(), Code::Unauthenticated, "round {round}: {err:?}");
        let err = on_b
            .get_user(authed(get(user.id.clone()), &tenant.token))
            .await
            .expect_err("B no longer finds the user");
        assert_eq!(err.code(), Code::NotFound, "round {round}: {err:?}");

        on_a.restore_user(authed(
            dpb::RestoreUserRequest {
                user_id: user.id.clone(),
                new_user_principal_name: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("A restores");
        // B finds the user at once, with its roles; no token from before works there.
        let found = on_b
            .get_user(authed(get(user.id.clone()), &tenant.token))
            .await
            .expect("B finds the restored user")
            .into_inner();
        assert_eq!(found.roles, vec![dpb::Role::BillingAdministrator as i32]);
        for old in [&first, &token] {
            let err = authorize(&mut on_b, old)
                .await
                .expect_err("a token from before a deletion fails on B");
            assert_eq!(err.code(), Code::Unauthenticated, "round {round}: {err:?}");
        }
        token = sign_in(&mut on_b, &user.user_principal_name, PASSWORD).await;
        assert!(
            authorize(&mut on_b, &token)
                .await
                .expect("authorize")
                .allowed
        );
        for reader in readers {
            reader.await.expect("reader");
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_cancellation_on_one_replica_applies_to_the_next_read_on_another() {
    let Some(ddb) = TestDb::postgres().await else {
        return;
    };
    let Some(bdb) = TestDb::postgres().await else {
        return;
    };
    let directory = DirectoryServer::start(&ddb).await;
    let a = BillingServer::start(&bdb, &directory).await;
    let b = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let tenant = sign_up(&mut dir, "margie").await;
    for round in 0..ROUNDS / 3 {
        let bought = on_a
            .create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    offer_id: "office365-e3".into(),
                    display_name: format!("seats {round}"),
                    seats: 1,
                    request_id: String::new(),
                },
                &tenant.token,
            ))
            .await
            .expect("buy")
            .into_inner();
        let get = |id: &str| {
            authed(
                bpb::GetSubscriptionRequest {
                    subscription_id: id.to_owned(),
                },
                &tenant.token,
            )
        };
        for _ in 0..3 {
            let seen = on_b.get_subscription(get(&bought.id)).await.expect("get");
            assert_eq!(
                seen.into_inner().state,
                bpb::SubscriptionState::Active as i32
            );
        }
        on_a.cancel_subscription(authed(
            bpb::CancelSubscriptionRequest {
                subscription_id: bought.id.clone(),
            },
            &tenant.token,
        ))
        .await
        .expect("A cancels");
        let seen = on_b
            .get_subscription(get(&bought.id))
            .await
            .expect("get on B")
            .into_inner();
        assert_eq!(
            seen.state,
            bpb::SubscriptionState::Cancelled as i32,
            "round {round}: B answered from before A's acknowledged cancellation"
        );
    }
    a.stop().await;
    b.stop().await;
    directory.stop().await;
}

/// When PostgreSQL drops every connection (a restart, a failover), the replicas' caches go
/// with them: B must not answer a role change made through A with the roles it held before.
#[tokio::test]
async fn a_replica_that_loses_its_connection_stops_answering_from_memory() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = DirectoryServer::start(&db).await;
    let b = DirectoryServer::start(&db).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let tenant = sign_up(&mut on_a, "lucerne").await;
    let (buyer, token) = add_user(
        &mut on_a,
        &tenant,
        "buyer",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    assert!(authorize(&mut on_b, &token).await.expect("warm B").allowed);

    terminate_connections_to(&db.url).await;
    // A removes the role while B is reconnecting: B missed the announcement, so it must not
    // keep the copy it held before it lost its connection.
    through_unavailable!(
        on_a.set_user_roles(authed(
            dpb::SetUserRolesRequest {
                user_id: buyer.id.clone(),
                roles: vec![],
            },
            &tenant.token,
        ))
        .await
    )
    .expect("A removes the buyer's role");
    let decision = through_unavailable!(authorize(&mut on_b, &token).await).expect("authorize");
    assert!(
        !decision.allowed,
        "B answered from the copy it held before it lost its connection"
    );
    a.stop().await;
    b.stop().await;
}

/// A replica that holds a lease but never acknowledges (here: a row no process renews) holds a
/// writer back until its lease runs out, never less.
#[tokio::test]
async fn a_writer_waits_out_a_holder_that_does_not_acknowledge() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = DirectoryServer::start(&db).await;
    let mut on_a = a.client().await;
    let tenant = sign_up(&mut on_a, "wideworld").await;
    let (buyer, _) = add_user(&mut on_a, &tenant, "buyer", &[]).await;
    let inserted = sql(
        &db.url,
        "INSERT INTO cache_holders (holder, expires_at) VALUES ('silent', \
         CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) + 1500000)",
    )
    .await;
    assert_eq!(inserted, 1);
    let started = Instant::now();
    on_a.set_user_roles(authed(
        dpb::SetUserRolesRequest {
            user_id: buyer.id.clone(),
            roles: vec![dpb::Role::BillingAdministrator as i32],
        },
        &tenant.token,
    ))
    .await
    .expect("the change is acknowledged once the silent lease ran out");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1300),
        "acknowledged after {waited:?}, before the silent holder's lease ran out"
    );
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    a.stop().await;
}

/// A holder row that keeps being renewed but never acknowledges (acknowledgements lost on the
/// way) cannot hold writers for ever: they stop waiting once no lease can still cover the old
/// row (`storage::peers::SAFE_AFTER` after the commit), never before.
#[tokio::test]
async fn a_writer_stops_waiting_for_a_silent_holder_once_no_lease_can_cover_the_old_row() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = DirectoryServer::start(&db).await;
    let mut on_a = a.client().await;
    let tenant = sign_up(&mut on_a, "trey").await;
    let (buyer, _) = add_user(&mut on_a, &tenant, "buyer", &[]).await;
    let renew = "UPDATE cache_holders SET expires_at = \
                 CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) + 3000000 \
                 WHERE holder = 'zombie'";
    sql(
        &db.url,
        "INSERT INTO cache_holders (holder, expires_at) VALUES ('zombie', \
         CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) + 3000000)",
    )
    .await;
    let zombie = tokio::spawn({
        let url = db.url.clone();
        async move {
            loop {
                sql(&url, renew).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let started = Instant::now();
    let change = on_a.set_user_roles(authed(
        dpb::SetUserRolesRequest {
            user_id: buyer.id.clone(),
            roles: vec![dpb::Role::BillingAdministrator as i32],
        },
        &tenant.token,
    ));
    tokio::time::timeout(Duration::from_secs(15), change)
        .await
        .expect("the writer must not wait for ever")
        .expect("acknowledged once no lease can cover the old row");
    let waited = started.elapsed();
    zombie.abort();
    assert!(
        waited >= Duration::from_millis(2500),
        "acknowledged after {waited:?}, while a lease could still cover the old row"
    );
    assert!(waited < Duration::from_secs(6), "waited {waited:?}");
    a.stop().await;
}

/// A cancellation repeated while the first is still waiting for the replicas' caches must not
/// answer before them: it would tell its caller "cancelled" while a replica still serves the
/// subscription as active.
#[tokio::test]
async fn a_repeated_cancellation_waits_for_the_holders_too() {
    let Some(ddb) = TestDb::postgres().await else {
        return;
    };
    let Some(bdb) = TestDb::postgres().await else {
        return;
    };
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let tenant = sign_up(&mut dir, "coho").await;
    let bought = bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "azure-pay-as-you-go".into(),
                display_name: "twice cancelled".into(),
                seats: 0,
                request_id: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("buy")
        .into_inner();
    sql(
        &bdb.url,
        "INSERT INTO cache_holders (holder, expires_at) VALUES ('silent', \
         CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) + 2000000)",
    )
    .await;
    let cancel = || {
        authed(
            bpb::CancelSubscriptionRequest {
                subscription_id: bought.id.clone(),
            },
            &tenant.token,
        )
    };
    let first = tokio::spawn({
        let (mut bill, request) = (bill.clone(), cancel());
        async move { bill.cancel_subscription(request).await }
    });
    // Wait until the first cancellation has committed (it then waits for the silent holder).
    let committed = format!(
        "UPDATE subscriptions SET cancel_time = cancel_time WHERE id = '{}' \
         AND cancel_time IS NOT NULL",
        bought.id
    );
    while sql(&bdb.url, &committed).await == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let again = bill
        .cancel_subscription(cancel())
        .await
        .expect("the repeated cancellation")
        .into_inner();
    let waited = started.elapsed();
    assert_eq!(again.state, bpb::SubscriptionState::Cancelled as i32);
    assert!(
        waited >= Duration::from_millis(700),
        "answered after {waited:?}, while the silent holder's lease still ran"
    );
    first.await.expect("first").expect("the first cancellation");
    billing.stop().await;
    directory.stop().await;
}
