//! Point reads that wait at the same time share one query (`storage::batch`): the callers
//! of one query must each get their own row, never a neighbour's, across users, directories
//! and missing rows. The servers run with their caches off so that every call reads the
//! database.

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

type Dir = dpb::directory_service_client::DirectoryServiceClient<Channel>;
type Bill = bpb::billing_service_client::BillingServiceClient<Channel>;

const CALLS_PER_TASK: usize = 15;

async fn directory_without_cache(db: &TestDb) -> DirectoryServer {
    let mut config = directory_config(db);
    config.cache_entries = 0;
    DirectoryServer::start_with(config).await
}

/// A caller and what Authorize must answer them.
#[derive(Clone)]
struct Expected {
    token: String,
    user_id: String,
    directory_id: String,
    roles: Vec<i32>,
}

async fn concurrent_authorize_calls_each_get_their_own_user(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = directory_without_cache(&db).await;
    let mut dir = server.client().await;
    let mut callers = Vec::new();
    let mut deleted = Vec::new();
    for prefix in ["contoso", "fabrikam", "litware"] {
        let tenant = sign_up(&mut dir, prefix).await;
        for n in 0..5 {
            let roles: &[dpb::Role] = match n % 3 {
                0 => &[dpb::Role::BillingAdministrator],
                1 => &[],
                _ => &[dpb::Role::UserAdministrator, dpb::Role::GlobalAdministrator],
            };
            let (user, token) = add_user(&mut dir, &tenant, &format!("u{n}"), roles).await;
            callers.push(Expected {
                token,
                user_id: user.id,
                directory_id: tenant.directory.id.clone(),
                roles: user.roles,
            });
        }
        let (gone, token) = add_user(&mut dir, &tenant, "gone", &[]).await;
        dir.delete_user(authed(
            dpb::DeleteUserRequest { user_id: gone.id },
            &tenant.token,
        ))
        .await
        .expect("delete");
        deleted.push(token);
    }

    let mut tasks = Vec::new();
    for (n, caller) in callers.into_iter().enumerate() {
        for copy in 0..3 {
            let (mut dir, gone) = (
                Dir::new(server.channel().await),
                deleted[(n + copy) % deleted.len()].clone(),
            );
            let caller = caller.clone();
            tasks.push(tokio::spawn(async move {
                for call in 0..CALLS_PER_TASK {
                    // Interleave live callers with a deleted user's token in the same queries.
                    let token = if call % 4 == copy {
                        &gone
                    } else {
                        &caller.token
                    };
                    let answer = dir
                        .authorize(authed(
                            dpb::AuthorizeRequest {
                                action: dpb::Action::PurchaseSubscription as i32,
                                ..Default::default()
                            },
                            token,
                        ))
                        .await;
                    if token == &gone {
                        let err = answer.expect_err("a deleted user's token is refused");
                        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
                        continue;
                    }
                    let got = answer.expect("authorize").into_inner();
                    assert_eq!(got.user_id, caller.user_id, "another caller's user");
                    assert_eq!(got.directory_id, caller.directory_id);
                    assert_eq!(got.roles, caller.roles);
                    let may_buy = caller.roles.iter().any(|r| {
                        *r == dpb::Role::GlobalAdministrator as i32
                            || *r == dpb::Role::BillingAdministrator as i32
                    });
                    assert_eq!(got.allowed, may_buy, "{}", got.reason);
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("caller task");
    }
    server.stop().await;
}

async fn concurrent_subscription_reads_each_get_their_own_row(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let directory = directory_without_cache(&ddb).await;
    let mut config = billing_config(&bdb, &directory.url());
    config.cache_entries = 0;
    let billing = BillingServer::start_with(config).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;

    // (tenant admin token, subscription id, display name) for two subscriptions per tenant.
    let mut owned = Vec::new();
    for prefix in ["adatum", "tailspin", "wingtip"] {
        let tenant = sign_up(&mut dir, prefix).await;
        for n in 0..2 {
            let name = format!("{prefix} seats {n}");
            let bought = bill
                .create_subscription(authed(
                    bpb::CreateSubscriptionRequest {
                        offer_id: "office365-e3".into(),
                        display_name: name.clone(),
                        seats: 3 + n,
                        request_id: String::new(),
                    },
                    &tenant.token,
                ))
                .await
                .expect("buy")
                .into_inner();
            owned.push((tenant.token.clone(), bought.id, name));
        }
    }

    let mut tasks = Vec::new();
    for (n, (token, id, name)) in owned.iter().cloned().enumerate() {
        // A subscription of the next tenant: this tenant must not see it.
        let foreign = owned[(n + 2) % owned.len()].1.clone();
        for _ in 0..4 {
            let (mut bill, token, id, name, foreign) = (
                Bill::new(billing.channel().await),
                token.clone(),
                id.clone(),
                name.clone(),
                foreign.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for call in 0..CALLS_PER_TASK {
                    let (asked, own) = match call % 3 {
                        0 => (foreign.clone(), false),
                        1 => (uuid::Uuid::new_v4().to_string(), false),
                        _ => (id.clone(), true),
                    };
                    let answer = bill
                        .get_subscription(authed(
                            bpb::GetSubscriptionRequest {
                                subscription_id: asked,
                            },
                            &token,
                        ))
                        .await;
                    if own {
                        let got = answer.expect("own subscription").into_inner();
                        assert_eq!((got.id, got.display_name), (id.clone(), name.clone()));
                    } else {
                        let err = answer.expect_err("foreign or missing");
                        assert_eq!(err.code(), Code::NotFound, "{err:?}");
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("reader task");
    }
    billing.stop().await;
    directory.stop().await;
}

on_both_backends!(
    concurrent_authorize_calls_each_get_their_own_user,
    concurrent_subscription_reads_each_get_their_own_row,
);

/// The coalesced reads keep their connections between queries: when PostgreSQL drops them
/// (a restart, a failover, an administrator terminating backends), the next reads must not
/// fail for it. A statement that does meet a dropped connection is answered UNAVAILABLE.
#[tokio::test]
async fn reads_survive_the_database_dropping_their_connections() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let server = directory_without_cache(&db).await;
    let mut dir = server.client().await;
    let tenant = sign_up(&mut dir, "proseware").await;
    let authorize = async |dir: &mut Dir| {
        dir.authorize(authed(
            dpb::AuthorizeRequest {
                action: dpb::Action::PurchaseSubscription as i32,
                ..Default::default()
            },
            &tenant.token,
        ))
        .await
        .map(|r| r.into_inner().allowed)
    };
    assert!(authorize(&mut dir).await.expect("before"));

    terminate_connections_to(&db.url).await;

    // Sign-in reads through the pool, whose idle connections were dropped too: it may fail
    // once, but as a retryable UNAVAILABLE, never as an INTERNAL error.
    match dir
        .sign_in(dpb::SignInRequest {
            user_principal_name: tenant.admin.user_principal_name.clone(),
            password: PASSWORD.to_owned(),
        })
        .await
    {
        Ok(_) => {}
        Err(err) => {
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            assert_eq!(details(&err).0, "DATABASE_UNAVAILABLE");
        }
    }

    for call in 0..5 {
        let allowed = authorize(&mut dir)
            .await
            .unwrap_or_else(|err| panic!("call {call} after the connections dropped: {err:?}"));
        assert!(allowed);
    }
    server.stop().await;
}

/// The group commit keeps its connection between batches too. When PostgreSQL drops it, a
/// purchase may fail once, as a retryable UNAVAILABLE; retried with the same request id it
/// succeeds, and the directory ends up with exactly one subscription for it.
#[tokio::test]
async fn purchases_survive_the_database_dropping_their_connections() {
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
    let tenant = sign_up(&mut dir, "wingtip").await;
    let buy = |request_id: &str| {
        authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "azure-pay-as-you-go".into(),
                display_name: "after a failover".into(),
                seats: 0,
                request_id: request_id.into(),
            },
            &tenant.token,
        )
    };
    const AFTER: &str = "00000000-0000-4000-8000-000000000002";
    bill.create_subscription(buy("00000000-0000-4000-8000-000000000001"))
        .await
        .expect("before");

    terminate_connections_to(&bdb.url).await;
    let first = match bill.create_subscription(buy(AFTER)).await {
        Ok(created) => created.into_inner(),
        Err(err) => {
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            assert_eq!(details(&err).0, "DATABASE_UNAVAILABLE");
            bill.create_subscription(buy(AFTER))
                .await
                .expect("the retry")
                .into_inner()
        }
    };
    let again = bill
        .create_subscription(buy(AFTER))
        .await
        .expect("the same request again")
        .into_inner();
    assert_eq!(again.id, first.id, "one subscription per request id");
    for n in 0..5 {
        bill.create_subscription(buy(&format!("00000000-0000-4000-8000-00000000010{n}")))
            .await
            .unwrap_or_else(|err| panic!("purchase {n} after the connections dropped: {err:?}"));
    }
    let listed = bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 100,
                page_token: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("list")
        .into_inner()
        .subscriptions;
    assert_eq!(listed.len(), 7, "before, after and five later: {listed:#?}");
    billing.stop().await;
    directory.stop().await;
}
