//! billing-svc and directory-svc as real gRPC servers: the seed's two scenarios end to end,
//! and every billing rule and status code of the contract.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

/// Both services on fresh databases, and a directory "contoso" whose Global Administrator is
/// Kelley, with Jane and Tricia (no roles).
struct World {
    _ddb: TestDb,
    _bdb: TestDb,
    directory: DirectoryServer,
    billing: BillingServer,
    dir: dpb::directory_service_client::DirectoryServiceClient<Channel>,
    bill: BillingServiceClient<Channel>,
    contoso: Tenant,
    jane: (dpb::User, String),
    tricia: (dpb::User, String),
}

async fn world(backend: Backend) -> Option<World> {
    let ddb = TestDb::new(backend).await?;
    let bdb = TestDb::new(backend).await?;
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let bill = billing.client().await;
    let created = dir
        .create_directory(dpb::CreateDirectoryRequest {
            display_name: "Contoso".into(),
            domain_prefix: "contoso".into(),
            admin_user_name: "kelley".into(),
            admin_display_name: "Kelley".into(),
            admin_password: PASSWORD.into(),
        })
        .await
        .expect("sign-up")
        .into_inner();
    let admin = created.admin.expect("admin");
    let directory_msg = created.directory.expect("directory");
    let token = sign_in(&mut dir, &admin.user_principal_name, PASSWORD).await;
    let contoso = Tenant {
        domain: directory_msg.initial_domain.clone(),
        directory: directory_msg,
        admin,
        token,
    };
    let jane = add_user(&mut dir, &contoso, "jane", &[]).await;
    let tricia = add_user(&mut dir, &contoso, "tricia", &[]).await;
    Some(World {
        _ddb: ddb,
        _bdb: bdb,
        directory,
        billing,
        dir,
        bill,
        contoso,
        jane,
        tricia,
    })
}

impl World {
    /// Kelley (the Global Administrator) replaces Tricia's roles.
    async fn set_tricia_roles(&mut self, roles: &[dpb::Role]) {
        self.dir
            .set_user_roles(authed(
                dpb::SetUserRolesRequest {
                    user_id: self.tricia.0.id.clone(),
                    roles: roles.iter().map(|r| *r as i32).collect(),
                },
                &self.contoso.token,
            ))
            .await
            .expect("Kelley sets Tricia's roles");
    }
}

fn buy(offer: &str, seats: i32, request_id: &str) -> bpb::CreateSubscriptionRequest {
    bpb::CreateSubscriptionRequest {
        offer_id: offer.into(),
        display_name: format!("{offer} for us"),
        seats,
        request_id: request_id.into(),
    }
}

async fn list_all(bill: &mut BillingServiceClient<Channel>, token: &str) -> Vec<bpb::Subscription> {
    let page = bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 1000,
                page_token: String::new(),
            },
            token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(page.next_page_token.is_empty());
    page.subscriptions
}

async fn scenario_1_office_365_users_buy_azure(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let users_before = w
        .dir
        .list_users(authed(dpb::ListUsersRequest::default(), &w.contoso.token))
        .await
        .expect("users")
        .into_inner()
        .users;
    assert_eq!(users_before.len(), 3);

    let sub = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &w.contoso.token))
        .await
        .expect("Kelley buys Azure")
        .into_inner();
    assert_eq!(
        sub.directory_id, w.contoso.directory.id,
        "lands in Kelley's directory"
    );
    assert_eq!(sub.owner_type, bpb::OwnerType::User as i32);
    assert_eq!(sub.owner_user_id, w.contoso.admin.id, "owned by Kelley");
    assert_eq!(sub.created_by_user_id, w.contoso.admin.id);
    assert_eq!(sub.product_family, bpb::ProductFamily::Azure as i32);
    assert_eq!(sub.state, bpb::SubscriptionState::Active as i32);
    assert_eq!(sub.seats, 0);
    assert!(sub.create_time.is_some() && sub.cancel_time.is_none());

    let users_after = w
        .dir
        .list_users(authed(dpb::ListUsersRequest::default(), &w.contoso.token))
        .await
        .expect("users")
        .into_inner()
        .users;
    assert_eq!(users_after, users_before, "the same three users");

    let got = w
        .bill
        .get_subscription(authed(
            bpb::GetSubscriptionRequest {
                subscription_id: sub.id.clone(),
            },
            &w.contoso.token,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, sub);
}

async fn scenario_2_azure_users_buy_office_365(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let azure = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &w.contoso.token))
        .await
        .expect("azure")
        .into_inner();
    let office = w
        .bill
        .create_subscription(authed(
            buy("office365-business-premium", 25, ""),
            &w.contoso.token,
        ))
        .await
        .expect("Kelley buys Office 365")
        .into_inner();
    assert_eq!(
        office.directory_id, azure.directory_id,
        "the same directory"
    );
    assert_eq!(office.owner_type, bpb::OwnerType::Directory as i32);
    assert_eq!(office.owner_user_id, "", "owned by the directory");
    assert_eq!(office.product_family, bpb::ProductFamily::Office365 as i32);
    assert_eq!(office.seats, 25);
    assert_eq!(office.created_by_user_id, w.contoso.admin.id);
    let all = list_all(&mut w.bill, &w.contoso.token).await;
    assert_eq!(
        all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![azure.id, office.id]
    );
}

async fn purchases_need_global_or_billing_administrator_as_stored_now(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let (jane, jane_token) = w.jane.clone();
    let (tricia, tricia_token) = w.tricia.clone();
    expect_err(
        w.bill
            .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &jane_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let _ = jane;

    w.set_tricia_roles(&[dpb::Role::BillingAdministrator]).await;
    let bought = w
        .bill
        .create_subscription(authed(buy("office365-e3", 10, ""), &tricia_token))
        .await
        .expect("Tricia buys")
        .into_inner();
    assert_eq!(bought.created_by_user_id, tricia.id);

    w.set_tricia_roles(&[]).await;
    expect_err(
        w.bill
            .create_subscription(authed(buy("office365-e3", 10, ""), &tricia_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_eq!(
        list_all(&mut w.bill, &w.contoso.token).await.len(),
        1,
        "nothing written when refused"
    );
}

async fn bad_purchases_are_invalid_argument_with_field_violations_and_write_nothing(
    backend: Backend,
) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let cases: Vec<(bpb::CreateSubscriptionRequest, Vec<&str>)> = vec![
        (buy("", 0, ""), vec!["offer_id"]),
        (buy("azure-enterprise", 0, ""), vec!["offer_id"]),
        (buy("azure-pay-as-you-go", 1, ""), vec!["seats"]),
        (buy("azure-free-trial", -1, ""), vec!["seats"]),
        (buy("office365-business-basic", 0, ""), vec!["seats"]),
        (buy("office365-business-standard", -5, ""), vec!["seats"]),
        (buy("office365-e3", 1_000_001, ""), vec!["seats"]),
        (buy("office365-e3", 10, "not-a-uuid"), vec!["request_id"]),
        (
            bpb::CreateSubscriptionRequest {
                display_name: "  ".into(),
                ..buy("office365-e3", 10, "")
            },
            vec!["display_name"],
        ),
        (
            bpb::CreateSubscriptionRequest {
                display_name: "x".repeat(257),
                ..buy("office365-e3", 10, "")
            },
            vec!["display_name"],
        ),
        (
            bpb::CreateSubscriptionRequest {
                display_name: "a\nb".into(),
                ..buy("office365-e3", 10, "")
            },
            vec!["display_name"],
        ),
        (
            bpb::CreateSubscriptionRequest {
                offer_id: "nope".into(),
                display_name: String::new(),
                seats: -1,
                request_id: "x".into(),
            },
            vec!["offer_id", "display_name", "seats", "request_id"],
        ),
    ];
    for (request, fields) in cases {
        let status = expect_err(
            w.bill
                .create_subscription(authed(request.clone(), &token))
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        let (_, domain, got) = details(&status);
        assert_eq!(domain, "billing-svc");
        assert_eq!(got, fields, "{request:?}");
    }
    assert!(
        list_all(&mut w.bill, &token).await.is_empty(),
        "nothing written"
    );

    // Boundaries are accepted.
    for seats in [1, 1_000_000] {
        w.bill
            .create_subscription(authed(buy("office365-e3", seats, ""), &token))
            .await
            .expect("seat boundary");
    }

    for bad_id in ["", "123", "zzzzzzzz-e89b-12d3-a456-426614174000"] {
        let status = expect_err(
            w.bill
                .get_subscription(authed(
                    bpb::GetSubscriptionRequest {
                        subscription_id: bad_id.into(),
                    },
                    &token,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, vec!["subscription_id"]);
        let status = expect_err(
            w.bill
                .cancel_subscription(authed(
                    bpb::CancelSubscriptionRequest {
                        subscription_id: bad_id.into(),
                    },
                    &token,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, vec!["subscription_id"]);
    }
    let status = expect_err(
        w.bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: -1,
                    page_token: String::new(),
                },
                &token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["page_size"]);
}

async fn request_ids_make_purchases_idempotent(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let rid = uuid::Uuid::new_v4().to_string();
    let first = w
        .bill
        .create_subscription(authed(buy("office365-e3", 5, &rid), &token))
        .await
        .expect("first")
        .into_inner();
    let again = w
        .bill
        .create_subscription(authed(buy("office365-e3", 5, &rid), &token))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again, "the retry gets the first subscription back");
    // Upper case spelling of the same UUID is the same request id.
    let upper = w
        .bill
        .create_subscription(authed(buy("office365-e3", 5, &rid.to_uppercase()), &token))
        .await
        .expect("retry in upper case")
        .into_inner();
    assert_eq!(upper.id, first.id);

    expect_err(
        w.bill
            .create_subscription(authed(buy("office365-e3", 6, &rid), &token))
            .await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    expect_err(
        w.bill
            .create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    display_name: "other".into(),
                    ..buy("office365-e3", 5, &rid)
                },
                &token,
            ))
            .await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    // Another user with the same request id is another request.
    let tricia_token = w.tricia.1.clone();
    w.set_tricia_roles(&[dpb::Role::BillingAdministrator]).await;
    let hers = w
        .bill
        .create_subscription(authed(buy("office365-e3", 5, &rid), &tricia_token))
        .await
        .expect("tricia")
        .into_inner();
    assert_ne!(hers.id, first.id);
    // Once she may no longer buy, a retry of her purchase still answers with it (it was
    // authorised when it was made), but anything else is PERMISSION_DENIED: a reused
    // request_id with other fields tells her nothing more.
    w.set_tricia_roles(&[]).await;
    let replayed = w
        .bill
        .create_subscription(authed(buy("office365-e3", 5, &rid), &tricia_token))
        .await
        .expect("her retry")
        .into_inner();
    assert_eq!(replayed.id, hers.id);
    for request in [
        buy("office365-e3", 6, &rid),
        buy("office365-e3", 5, &uuid::Uuid::new_v4().to_string()),
        buy("office365-e3", 5, ""),
    ] {
        expect_err(
            w.bill
                .create_subscription(authed(request, &tricia_token))
                .await,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }
    // Without a request id, every call is a new purchase.
    w.bill
        .create_subscription(authed(buy("office365-e3", 5, ""), &token))
        .await
        .expect("no id 1");
    w.bill
        .create_subscription(authed(buy("office365-e3", 5, ""), &token))
        .await
        .expect("no id 2");
    assert_eq!(list_all(&mut w.bill, &token).await.len(), 4);
}

async fn twenty_concurrent_identical_purchases_make_one_subscription(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let rid = uuid::Uuid::new_v4().to_string();
    let calls = (0..20).map(|_| {
        let mut bill = w.bill.clone();
        let request = authed(buy("azure-pay-as-you-go", 0, &rid), &token);
        async move { bill.create_subscription(request).await }
    });
    let results = futures::future::join_all(calls).await;
    let ids: HashSet<String> = results
        .into_iter()
        .map(|r| r.expect("every identical request succeeds").into_inner().id)
        .collect();
    assert_eq!(ids.len(), 1, "one subscription id for all");
    assert_eq!(list_all(&mut w.bill, &token).await.len(), 1);
}

/// Purchases arriving together are committed together (one statement, one commit); each
/// still gets its own outcome: new purchases succeed, twins share one subscription, a reused
/// request_id with other fields is refused, and only one free trial goes through.
async fn a_burst_of_mixed_purchases_gives_each_its_own_outcome(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let twins: Vec<String> = (0..8).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let reused = uuid::Uuid::new_v4().to_string();
    let mut calls = Vec::new();
    for (i, rid) in twins.iter().enumerate() {
        for _ in 0..2 {
            calls.push(("twin", i, authed(buy("office365-e3", 2, rid), &token)));
        }
    }
    for i in 0..8 {
        calls.push(("new", i, authed(buy("azure-pay-as-you-go", 0, ""), &token)));
    }
    for i in 0..4 {
        let request = bpb::CreateSubscriptionRequest {
            display_name: format!("trial {i}"),
            ..buy("azure-free-trial", 0, &uuid::Uuid::new_v4().to_string())
        };
        calls.push(("trial", i, authed(request, &token)));
    }
    calls.push(("reused", 0, authed(buy("office365-e3", 2, &reused), &token)));
    calls.push(("reused", 1, authed(buy("office365-e3", 3, &reused), &token)));
    let results = futures::future::join_all(calls.into_iter().map(|(kind, i, request)| {
        let mut bill = w.bill.clone();
        async move { (kind, i, bill.create_subscription(request).await) }
    }))
    .await;

    let mut twin_ids: Vec<HashSet<String>> = vec![HashSet::new(); twins.len()];
    let (mut news, mut trials, mut trial_refusals, mut reused_ok, mut reused_refused) =
        (0, 0, 0, 0, 0);
    for (kind, i, result) in results {
        match (kind, result) {
            ("twin", Ok(s)) => {
                twin_ids[i].insert(s.into_inner().id);
            }
            ("new", Ok(_)) => news += 1,
            ("trial", Ok(_)) => trials += 1,
            ("trial", Err(status)) => {
                assert_eq!(details(&status).0, "FREE_TRIAL_ALREADY_USED", "{status:?}");
                trial_refusals += 1;
            }
            ("reused", Ok(_)) => reused_ok += 1,
            ("reused", Err(status)) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                reused_refused += 1;
            }
            (kind, Err(status)) => panic!("{kind} {i} failed: {status:?}"),
            (kind, Ok(_)) => panic!("unexpected {kind}"),
        }
    }
    assert!(
        twin_ids.iter().all(|ids| ids.len() == 1),
        "each pair of twins shares one subscription: {twin_ids:?}"
    );
    assert_eq!(news, 8);
    assert_eq!((trials, trial_refusals), (1, 3));
    assert_eq!((reused_ok, reused_refused), (1, 1));
    assert_eq!(
        list_all(&mut w.bill, &token).await.len(),
        twins.len() + 8 + 1 + 1,
        "exactly one row per distinct purchase"
    );
}

async fn one_free_trial_per_user_even_when_racing(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let calls = (0..10).map(|i| {
        let mut bill = w.bill.clone();
        let request = authed(
            bpb::CreateSubscriptionRequest {
                display_name: format!("trial {i}"),
                ..buy("azure-free-trial", 0, &uuid::Uuid::new_v4().to_string())
            },
            &token,
        );
        async move { bill.create_subscription(request).await }
    });
    let results = futures::future::join_all(calls).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for status in results.into_iter().filter_map(Result::err) {
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(details(&status).0, "FREE_TRIAL_ALREADY_USED");
    }
    expect_err(
        w.bill
            .create_subscription(authed(buy("azure-free-trial", 0, ""), &token))
            .await,
        Code::FailedPrecondition,
        "FREE_TRIAL_ALREADY_USED",
    );
    // Another user still has theirs.
    let tricia_token = w.tricia.1.clone();
    w.set_tricia_roles(&[dpb::Role::GlobalAdministrator]).await;
    w.bill
        .create_subscription(authed(buy("azure-free-trial", 0, ""), &tricia_token))
        .await
        .expect("tricia's trial");
    assert_eq!(list_all(&mut w.bill, &token).await.len(), 2);
}

async fn visibility_owner_admin_other_user_and_other_directory(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let admin = w.contoso.token.clone();
    let tricia_token = w.tricia.1.clone();
    let (_, jane_token) = w.jane.clone();
    w.set_tricia_roles(&[dpb::Role::BillingAdministrator]).await;
    let kelley_azure = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &admin))
        .await
        .expect("k")
        .into_inner();
    let tricia_azure = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &tricia_token))
        .await
        .expect("t")
        .into_inner();
    let office = w
        .bill
        .create_subscription(authed(buy("office365-e3", 3, ""), &tricia_token))
        .await
        .expect("o")
        .into_inner();
    // Tricia loses the role: she still owns her Azure subscription.
    w.set_tricia_roles(&[]).await;

    let get = |id: &str| bpb::GetSubscriptionRequest {
        subscription_id: id.to_owned(),
    };
    // Admin sees all.
    for s in [&kelley_azure, &tricia_azure, &office] {
        w.bill
            .get_subscription(authed(get(&s.id), &admin))
            .await
            .expect("admin sees all");
    }
    assert_eq!(list_all(&mut w.bill, &admin).await.len(), 3);
    // The owner sees theirs, not the others.
    w.bill
        .get_subscription(authed(get(&tricia_azure.id), &tricia_token))
        .await
        .expect("owner");
    for s in [&kelley_azure, &office] {
        expect_err(
            w.bill
                .get_subscription(authed(get(&s.id), &tricia_token))
                .await,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }
    let mine = list_all(&mut w.bill, &tricia_token).await;
    assert_eq!(
        mine.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![tricia_azure.id.clone()]
    );
    // Jane owns nothing.
    assert!(list_all(&mut w.bill, &jane_token).await.is_empty());
    expect_err(
        w.bill
            .get_subscription(authed(get(&office.id), &jane_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // Another directory: exactly like a missing id.
    let other = sign_up(&mut w.dir, "fabrikam").await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (call_on, what) in [(&kelley_azure.id, "foreign"), (&missing, "missing")] {
        let status = expect_err(
            w.bill
                .get_subscription(authed(get(call_on), &other.token))
                .await,
            Code::NotFound,
            "SUBSCRIPTION_NOT_FOUND",
        );
        assert_eq!(status.message(), "subscription not found", "{what}");
        let status = expect_err(
            w.bill
                .cancel_subscription(authed(
                    bpb::CancelSubscriptionRequest {
                        subscription_id: call_on.clone(),
                    },
                    &other.token,
                ))
                .await,
            Code::NotFound,
            "SUBSCRIPTION_NOT_FOUND",
        );
        assert_eq!(status.message(), "subscription not found", "{what}");
    }
    assert!(list_all(&mut w.bill, &other.token).await.is_empty());
    // And the foreign directory's cancel attempt changed nothing.
    let still = w
        .bill
        .get_subscription(authed(get(&kelley_azure.id), &admin))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(still.state, bpb::SubscriptionState::Active as i32);
}

async fn cancel_rules_and_idempotent_cancel(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let admin = w.contoso.token.clone();
    let tricia_token = w.tricia.1.clone();
    let (_, jane_token) = w.jane.clone();
    w.set_tricia_roles(&[dpb::Role::BillingAdministrator]).await;
    let tricia_azure = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &tricia_token))
        .await
        .expect("t")
        .into_inner();
    let office = w
        .bill
        .create_subscription(authed(buy("office365-e3", 3, ""), &tricia_token))
        .await
        .expect("o")
        .into_inner();
    let kelley_azure = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &admin))
        .await
        .expect("k")
        .into_inner();
    w.set_tricia_roles(&[]).await;
    let cancel = |id: &str| bpb::CancelSubscriptionRequest {
        subscription_id: id.to_owned(),
    };

    // A plain user cannot cancel what they do not own, nor an Office 365 subscription.
    expect_err(
        w.bill
            .cancel_subscription(authed(cancel(&kelley_azure.id), &jane_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    expect_err(
        w.bill
            .cancel_subscription(authed(cancel(&office.id), &tricia_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // The owner of an Azure subscription can.
    let cancelled = w
        .bill
        .cancel_subscription(authed(cancel(&tricia_azure.id), &tricia_token))
        .await
        .expect("owner cancels")
        .into_inner();
    assert_eq!(cancelled.state, bpb::SubscriptionState::Cancelled as i32);
    assert!(cancelled.cancel_time.is_some());
    // Again: unchanged.
    let again = w
        .bill
        .cancel_subscription(authed(cancel(&tricia_azure.id), &admin))
        .await
        .expect("idempotent")
        .into_inner();
    assert_eq!(again, cancelled);
    // An admin cancels anything in the directory.
    let office_cancelled = w
        .bill
        .cancel_subscription(authed(cancel(&office.id), &admin))
        .await
        .expect("admin cancels")
        .into_inner();
    assert_eq!(
        office_cancelled.state,
        bpb::SubscriptionState::Cancelled as i32
    );
    let kelley_now = w
        .bill
        .get_subscription(authed(
            bpb::GetSubscriptionRequest {
                subscription_id: kelley_azure.id.clone(),
            },
            &admin,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        kelley_now.state,
        bpb::SubscriptionState::Active as i32,
        "refused cancels changed nothing"
    );
}

async fn list_subscriptions_pages_and_refuses_foreign_tokens(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let admin = w.contoso.token.clone();
    for i in 0..7 {
        w.bill
            .create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    display_name: format!("s{i}"),
                    ..buy("office365-e3", 1, "")
                },
                &admin,
            ))
            .await
            .expect("buy");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = w
            .bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: 3,
                    page_token: token.clone(),
                },
                &admin,
            ))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        seen.extend(page.subscriptions.into_iter().map(|s| s.display_name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>(),
        "oldest first, each once"
    );

    let first = w
        .bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 2,
                page_token: String::new(),
            },
            &admin,
        ))
        .await
        .expect("first")
        .into_inner();
    let (_, jane_token) = w.jane.clone();
    // Jane's view is another scope: the admin's token does not work for her.
    expect_err(
        w.bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: 2,
                    page_token: first.next_page_token.clone(),
                },
                &jane_token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    // A directory page token is not a billing page token.
    let users = w
        .dir
        .list_users(authed(
            dpb::ListUsersRequest {
                page_size: 1,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("users")
        .into_inner();
    for bad in [
        users.next_page_token.as_str(),
        "garbage",
        &first.next_page_token[1..],
    ] {
        expect_err(
            w.bill
                .list_subscriptions(authed(
                    bpb::ListSubscriptionsRequest {
                        page_size: 2,
                        page_token: bad.into(),
                    },
                    &admin,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
}

async fn tokens_are_checked_by_the_directory(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let offers = w
        .bill
        .list_offers(bpb::ListOffersRequest {})
        .await
        .expect("anyone lists offers")
        .into_inner()
        .offers;
    let ids: Vec<&str> = offers.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "azure-pay-as-you-go",
            "azure-free-trial",
            "office365-business-basic",
            "office365-business-standard",
            "office365-business-premium",
            "office365-e3"
        ]
    );
    for o in &offers {
        let azure = o.id.starts_with("azure");
        assert_eq!(o.per_seat, !azure);
        assert_eq!(
            o.owner_type,
            if azure {
                bpb::OwnerType::User
            } else {
                bpb::OwnerType::Directory
            } as i32
        );
        assert_eq!(
            o.product_family,
            if azure {
                bpb::ProductFamily::Azure
            } else {
                bpb::ProductFamily::Office365
            } as i32
        );
    }

    expect_err(
        w.bill
            .create_subscription(buy("azure-pay-as-you-go", 0, ""))
            .await,
        Code::Unauthenticated,
        "MISSING_TOKEN",
    );
    expect_err(
        w.bill
            .list_subscriptions(bpb::ListSubscriptionsRequest::default())
            .await,
        Code::Unauthenticated,
        "MISSING_TOKEN",
    );
    expect_err(
        w.bill
            .create_subscription(authed(
                buy("azure-pay-as-you-go", 0, ""),
                "forged.token.here",
            ))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    // A deleted user's token stops working in billing too.
    let (jane, jane_token) = w.jane.clone();
    w.dir
        .delete_user(authed(
            dpb::DeleteUserRequest { user_id: jane.id },
            &w.contoso.token,
        ))
        .await
        .expect("delete jane");
    expect_err(
        w.bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest::default(),
                &jane_token,
            ))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
}

async fn directory_down_is_unavailable_within_the_deadline_and_recovers_without_restarting_billing(
    backend: Backend,
) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let token = w.contoso.token.clone();
    let directory_addr = w.directory.addr;
    w.directory.stop().await;

    let started = Instant::now();
    let status = expect_err(
        w.bill
            .create_subscription(authed(
                buy("azure-pay-as-you-go", 0, &uuid::Uuid::new_v4().to_string()),
                &token,
            ))
            .await,
        Code::Unavailable,
        "DIRECTORY_UNAVAILABLE",
    );
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(2500),
        "answered within the 2 s directory deadline: {took:?} {status:?}"
    );

    // Restart the directory on the same address and database: billing recovers by itself.
    let mut config = directory_config(&w._ddb);
    config.listen = directory_addr.to_string();
    let directory = DirectoryServer::start_with(config).await;
    let bought = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &token))
        .await
        .expect("purchases work again")
        .into_inner();
    let all = list_all(&mut w.bill, &token).await;
    assert_eq!(
        all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![bought.id],
        "nothing was written while down"
    );
    directory.stop().await;
}

/// A TCP listener that accepts connections and never answers.
async fn black_hole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

/// Accepts HTTP/2 connections and closes each one as soon as a call arrives on it, unanswered:
/// a directory replica killed (SIGKILL) after billing wrote a call onto its connection.
async fn dies_mid_call() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut conn) = h2::server::handshake(socket).await
                    && let Some(Ok(call)) = conn.accept().await
                {
                    // The socket closes first, so no RST_STREAM goes out: a bare FIN.
                    drop(conn);
                    drop(call);
                }
            });
        }
    });
    (addr, task)
}

async fn a_hanging_directory_is_cut_off_at_the_deadline(backend: Backend) {
    let (addr, hole) = black_hole().await;
    let bdb = db_or_skip!(backend);
    let mut config = billing_config(&bdb, &format!("http://{addr}"));
    config.directory_timeout = Duration::from_millis(400);
    let billing = BillingServer::start_with(config).await;
    let mut bill = billing.client().await;

    let started = Instant::now();
    expect_err(
        bill.create_subscription(authed(
            buy("azure-pay-as-you-go", 0, ""),
            "some.token.value",
        ))
        .await,
        Code::Unavailable,
        "DIRECTORY_UNAVAILABLE",
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(1500),
        "cut at the 400 ms directory timeout: {took:?}"
    );

    // The caller's shorter deadline wins, and running out of it is the caller's
    // DEADLINE_EXCEEDED (not UNAVAILABLE, which a client would retry). Sent by hand: a gRPC
    // client would end the call at its own deadline, before billing's answer could arrive.
    use prost::Message as _;
    let started = Instant::now();
    let answer = integration_tests::raw::raw_call(
        billing.addr,
        "/billing.v1.BillingService/CreateSubscription",
        &[
            ("authorization", "Bearer some.token.value"),
            ("grpc-timeout", "150m"),
        ],
        &buy("azure-pay-as-you-go", 0, "").encode_to_vec(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status.code(), Code::DeadlineExceeded, "{answer:?}");
    assert_eq!(answer.reason().0, "DEADLINE_EXCEEDED", "{answer:?}");
    assert!(
        took < Duration::from_millis(350),
        "the caller's 150 ms deadline is honoured: {took:?}"
    );
    hole.abort();
}

async fn billing_serves_health_and_shuts_down_cleanly(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Some(w) = world(backend).await else {
        return;
    };
    let channel = Channel::from_shared(format!("http://{}", w.billing.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "billing.v1.BillingService"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32);
    }
    w.billing.stop().await;
}

async fn authentication_comes_before_validation_and_retries_survive_role_loss(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    // A bad token with bad fields: UNAUTHENTICATED, as in the directory.
    expect_err(
        w.bill
            .create_subscription(authed(buy("nope", -3, "x"), "bad.token.value"))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    for result in [
        w.bill
            .get_subscription(bpb::GetSubscriptionRequest {
                subscription_id: "x".into(),
            })
            .await
            .map(|_| ()),
        w.bill
            .cancel_subscription(bpb::CancelSubscriptionRequest {
                subscription_id: "x".into(),
            })
            .await
            .map(|_| ()),
        w.bill
            .list_subscriptions(bpb::ListSubscriptionsRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await
            .map(|_| ()),
    ] {
        let status = result.expect_err("needs a token");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(details(&status).0, "MISSING_TOKEN");
    }

    // Tricia buys as Billing Administrator, loses the role, and retries the same request: she
    // gets her first subscription back (it was authorised); a new purchase is refused.
    let tricia_token = w.tricia.1.clone();
    let admin = w.contoso.token.clone();
    w.set_tricia_roles(&[dpb::Role::BillingAdministrator]).await;
    let rid = uuid::Uuid::new_v4().to_string();
    let first = w
        .bill
        .create_subscription(authed(buy("office365-e3", 4, &rid), &tricia_token))
        .await
        .expect("first")
        .into_inner();
    w.set_tricia_roles(&[]).await;
    let retry = w
        .bill
        .create_subscription(authed(buy("office365-e3", 4, &rid), &tricia_token))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retry, first);
    expect_err(
        w.bill
            .create_subscription(authed(
                buy("office365-e3", 4, &uuid::Uuid::new_v4().to_string()),
                &tricia_token,
            ))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_eq!(list_all(&mut w.bill, &admin).await.len(), 1);
}

async fn billing_pages_default_to_fifty_and_clamp(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let admin = w.contoso.token.clone();
    for _ in 0..55 {
        w.bill
            .create_subscription(authed(buy("office365-e3", 1, ""), &admin))
            .await
            .expect("buy");
    }
    let page = w
        .bill
        .list_subscriptions(authed(bpb::ListSubscriptionsRequest::default(), &admin))
        .await
        .expect("default page")
        .into_inner();
    assert_eq!(page.subscriptions.len(), 50);
    assert!(!page.next_page_token.is_empty());
    let rest = w
        .bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 0,
                page_token: page.next_page_token,
            },
            &admin,
        ))
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(rest.subscriptions.len(), 5);
    assert!(rest.next_page_token.is_empty());
    let all = w
        .bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: i32::MAX,
                page_token: String::new(),
            },
            &admin,
        ))
        .await
        .expect("clamped")
        .into_inner();
    assert_eq!(all.subscriptions.len(), 55);
}

async fn a_hanging_directory_replica_is_routed_around(backend: Backend) {
    let Some(w) = world(backend).await else {
        return;
    };
    let (hole_addr, hole) = black_hole().await;
    let bdb = db_or_skip!(backend);
    let mut config = billing_config(&bdb, &format!("http://{hole_addr}"));
    config.directory_urls.push(w.directory.url());
    config.directory_timeout = Duration::from_millis(800);
    let billing = BillingServer::start_with(config).await;
    let mut bill = billing.client().await;
    for i in 0..6 {
        let started = Instant::now();
        bill.create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &w.contoso.token))
            .await
            .unwrap_or_else(|s| panic!("purchase {i} with a hanging replica: {s:?}"));
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "within the deadline"
        );
    }
    hole.abort();
}

async fn a_directory_replica_dying_mid_call_is_routed_around(backend: Backend) {
    let Some(w) = world(backend).await else {
        return;
    };
    let (dying_addr, dying) = dies_mid_call().await;
    let bdb = db_or_skip!(backend);
    let mut config = billing_config(&bdb, &format!("http://{dying_addr}"));
    config.directory_urls.push(w.directory.url());
    let billing = BillingServer::start_with(config).await;
    let mut bill = billing.client().await;
    for i in 0..6 {
        bill.create_subscription(authed(buy("azure-pay-as-you-go", 0, ""), &w.contoso.token))
            .await
            .unwrap_or_else(|s| panic!("purchase {i} with a replica dying mid-call: {s:?}"));
    }
    dying.abort();
}

on_both_backends!(
    scenario_1_office_365_users_buy_azure,
    scenario_2_azure_users_buy_office_365,
    purchases_need_global_or_billing_administrator_as_stored_now,
    bad_purchases_are_invalid_argument_with_field_violations_and_write_nothing,
    request_ids_make_purchases_idempotent,
    twenty_concurrent_identical_purchases_make_one_subscription,
    a_burst_of_mixed_purchases_gives_each_its_own_outcome,
    one_free_trial_per_user_even_when_racing,
    visibility_owner_admin_other_user_and_other_directory,
    cancel_rules_and_idempotent_cancel,
    list_subscriptions_pages_and_refuses_foreign_tokens,
    tokens_are_checked_by_the_directory,
    directory_down_is_unavailable_within_the_deadline_and_recovers_without_restarting_billing,
    a_hanging_directory_is_cut_off_at_the_deadline,
    billing_serves_health_and_shuts_down_cleanly,
    authentication_comes_before_validation_and_retries_survive_role_loss,
    billing_pages_default_to_fifty_and_clamp,
    a_hanging_directory_replica_is_routed_around,
    a_directory_replica_dying_mid_call_is_routed_around,
);
