//! The real binaries as separate processes: several replicas of each service sharing one
//! PostgreSQL database per service, replica failure, and shutdown on SIGTERM.

use std::collections::HashSet;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::process::Proc;
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

async fn directory_client(
    p: &Proc,
) -> dpb::directory_service_client::DirectoryServiceClient<Channel> {
    dpb::directory_service_client::DirectoryServiceClient::new(
        Channel::from_shared(p.url())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    )
}

async fn billing_client(p: &Proc) -> BillingServiceClient<Channel> {
    BillingServiceClient::new(
        Channel::from_shared(p.url())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    )
}

fn buy(offer: &str, request_id: &str) -> bpb::CreateSubscriptionRequest {
    bpb::CreateSubscriptionRequest {
        offer_id: offer.into(),
        display_name: "replicated".into(),
        seats: if offer.starts_with("office") { 5 } else { 0 },
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn two_replicas_of_each_service_share_everything_through_postgres() {
    let Some(ddb) = TestDb::postgres().await else {
        return;
    };
    let Some(bdb) = TestDb::postgres().await else {
        return;
    };
    let mut d1 = Proc::directory(&ddb.url);
    let d2 = Proc::directory(&ddb.url);
    let directory_urls = format!("{},{}", d1.url(), d2.url());
    let b1 = Proc::billing(&bdb.url, &directory_urls);
    let b2 = Proc::billing(&bdb.url, &directory_urls);
    let mut dir1 = directory_client(&d1).await;
    let mut dir2 = directory_client(&d2).await;
    let mut bill1 = billing_client(&b1).await;
    let mut bill2 = billing_client(&b2).await;

    // A token issued by replica 1 works on replica 2.
    let tenant = sign_up(&mut dir1, "contoso").await;
    let me = dir2
        .who_am_i(authed(dpb::WhoAmIRequest {}, &tenant.token))
        .await
        .expect("replica 2 accepts replica 1's token")
        .into_inner();
    assert_eq!(me.user.expect("user").id, tenant.admin.id);

    // A role removed through replica 1 is refused on replica 2 at the next call.
    let (tricia, tricia_token) = add_user(
        &mut dir2,
        &tenant,
        "tricia",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let allowed = dir2
        .authorize(authed(
            dpb::AuthorizeRequest {
                action: dpb::Action::PurchaseSubscription as i32,
                ..Default::default()
            },
            &tricia_token,
        ))
        .await
        .expect("authorize")
        .into_inner();
    assert!(allowed.allowed);
    dir1.set_user_roles(authed(
        dpb::SetUserRolesRequest {
            user_id: tricia.id.clone(),
            roles: vec![],
        },
        &tenant.token,
    ))
    .await
    .expect("revoke on replica 1");
    let refused = dir2
        .authorize(authed(
            dpb::AuthorizeRequest {
                action: dpb::Action::PurchaseSubscription as i32,
                ..Default::default()
            },
            &tricia_token,
        ))
        .await
        .expect("authorize")
        .into_inner();
    assert!(!refused.allowed, "replica 2 sees the revocation at once");
    expect_err(
        bill2
            .create_subscription(authed(buy("azure-pay-as-you-go", ""), &tricia_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // 50 concurrent purchases with one request_id, spread over both billing replicas: one subscription.
    let rid = uuid::Uuid::new_v4().to_string();
    let calls = (0..50).map(|i| {
        let mut bill = if i % 2 == 0 {
            bill1.clone()
        } else {
            bill2.clone()
        };
        let request = authed(buy("office365-e3", &rid), &tenant.token);
        async move { bill.create_subscription(request).await }
    });
    let ids: HashSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("every identical request succeeds").into_inner().id)
        .collect();
    assert_eq!(ids.len(), 1);

    // A second free trial through the other replica is refused.
    bill1
        .create_subscription(authed(buy("azure-free-trial", ""), &tenant.token))
        .await
        .expect("first free trial on billing 1");
    expect_err(
        bill2
            .create_subscription(authed(buy("azure-free-trial", ""), &tenant.token))
            .await,
        Code::FailedPrecondition,
        "FREE_TRIAL_ALREADY_USED",
    );

    // Killing one directory replica does not fail purchases.
    d1.kill9();
    for i in 0..20 {
        let bill = if i % 2 == 0 { &mut bill1 } else { &mut bill2 };
        bill.create_subscription(authed(buy("azure-pay-as-you-go", ""), &tenant.token))
            .await
            .unwrap_or_else(|s| panic!("purchase {i} with one directory replica dead: {s:?}"));
    }
    let all = bill2
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 100,
                page_token: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.subscriptions.len(), 22);
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let db = TestDb::sqlite();
    let mut directory = Proc::directory(&db.url);
    let mut client = directory_client(&directory).await;
    sign_up(&mut client, "contoso").await;
    let status = directory.terminate();
    assert!(
        status.success(),
        "directory-svc exits 0 on SIGTERM: {status:?}"
    );

    let bdb = TestDb::sqlite();
    let mut billing = Proc::billing(&bdb.url, "http://127.0.0.1:9");
    let mut bill = billing_client(&billing).await;
    assert_eq!(
        bill.list_offers(bpb::ListOffersRequest {})
            .await
            .expect("offers")
            .into_inner()
            .offers
            .len(),
        6
    );
    let status = billing.terminate();
    assert!(
        status.success(),
        "billing-svc exits 0 on SIGTERM: {status:?}"
    );
}
