//! WatchChanges on billing-svc (contract part two, section 2), through the gRPC interface on
//! both engines: purchases (group-committed) and cancellations reach every stream once, in
//! cursor order, as committed (on PostgreSQL through two billing replicas); who may watch,
//! decided by the directory and asked again while the stream is open; cursors of one service
//! refused by the other; streams ended at once when billing stops.

use std::time::Duration;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::feed::{assert_ended, changes, end_of, next, seq};
use integration_tests::*;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

struct World {
    _ddb: TestDb,
    bdb: TestDb,
    directory: DirectoryServer,
    billing: BillingServer,
    dir: dpb::directory_service_client::DirectoryServiceClient<Channel>,
    bill: BillingServiceClient<Channel>,
}

async fn world(backend: Backend, recheck: Duration) -> Option<World> {
    let ddb = TestDb::new(backend).await?;
    let bdb = TestDb::new(backend).await?;
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, recheck).await;
    let dir = directory.client().await;
    let bill = billing.client().await;
    Some(World {
        _ddb: ddb,
        bdb,
        directory,
        billing,
        dir,
        bill,
    })
}

async fn start_billing(
    db: &TestDb,
    directory: &DirectoryServer,
    recheck: Duration,
) -> BillingServer {
    let mut config = billing_config(db, &directory.url());
    config.watch_recheck = recheck;
    BillingServer::start_with(config).await
}

fn buy(offer: &str, seats: i32, name: &str) -> bpb::CreateSubscriptionRequest {
    bpb::CreateSubscriptionRequest {
        offer_id: offer.into(),
        display_name: name.into(),
        seats,
        request_id: String::new(),
    }
}

async fn watch(
    bill: &mut BillingServiceClient<Channel>,
    token: &str,
    start_after: &str,
    start_at_now: bool,
) -> Result<Streaming<bpb::Change>, tonic::Status> {
    bill.watch_changes(authed(
        bpb::WatchChangesRequest {
            start_after: start_after.into(),
            start_at_now,
        },
        token,
    ))
    .await
    .map(tonic::Response::into_inner)
}

/// The committed changes of billing, in order: (seq, kind, subscription id).
async fn committed(url: &str) -> Vec<(i64, i32, String)> {
    use sqlx::Row as _;
    query_rows(url, "SELECT seq, kind, resource FROM changes ORDER BY seq")
        .await
        .iter()
        .map(|r| {
            let resource: serde_json::Value =
                serde_json::from_str(&r.get::<String, _>("resource")).expect("JSON");
            (
                r.get("seq"),
                i32::try_from(r.get::<i64, _>("kind")).expect("kind"),
                resource["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn delivered(changes: &[bpb::Change]) -> Vec<(i64, i32, String)> {
    changes
        .iter()
        .map(|c| {
            let id = match &c.resource {
                Some(bpb::change::Resource::Subscription(s)) => s.id.clone(),
                Some(bpb::change::Resource::LicenseAssignment(a)) => a.user_id.clone(),
                None => String::new(),
            };
            (seq(&c.cursor), c.r#type, id)
        })
        .collect()
}

on_both_backends!(
    purchases_and_cancellations_reach_every_stream_once_in_order,
    only_global_and_billing_administrators_watch_their_own_directory,
    a_stream_ends_when_the_directory_takes_the_right_away,
    a_cursor_of_one_service_is_refused_by_the_other,
    billing_streams_end_at_once_when_billing_stops,
);

async fn purchases_and_cancellations_reach_every_stream_once_in_order(backend: Backend) {
    let Some(mut w) = world(backend, Duration::from_secs(5)).await else {
        return;
    };
    let second = match backend {
        Backend::Postgres => {
            Some(start_billing(&w.bdb, &w.directory, Duration::from_secs(5)).await)
        }
        Backend::Sqlite => None,
    };
    let other = match &second {
        Some(replica) => replica.client().await,
        None => w.bill.clone(),
    };
    let contoso = sign_up(&mut w.dir, "contoso").await;
    let fabrikam = sign_up(&mut w.dir, "fabrikam").await;
    let mut ours = watch(&mut w.bill, &contoso.token, "", false)
        .await
        .expect("watch");
    let mut theirs = watch(&mut other.clone(), &fabrikam.token, "", false)
        .await
        .expect("watch");
    // 24 purchases at once through both replicas (group commits of several), then cancels.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut bill = if i % 2 == 0 {
            w.bill.clone()
        } else {
            other.clone()
        };
        let token = if i % 3 == 0 {
            fabrikam.token.clone()
        } else {
            contoso.token.clone()
        };
        tasks.push(tokio::spawn(async move {
            bill.create_subscription(authed(buy("office365-e3", 5, &format!("p{i}")), &token))
                .await
                .expect("purchase")
                .into_inner()
        }));
    }
    let mut bought = Vec::new();
    for task in tasks {
        bought.push(task.await.expect("purchase task"));
    }
    let contoso_id = contoso.directory.id.clone();
    let cancelled = bought
        .iter()
        .find(|s| s.directory_id == contoso_id)
        .expect("one of ours")
        .clone();
    let done = w
        .bill
        .cancel_subscription(authed(
            bpb::CancelSubscriptionRequest {
                subscription_id: cancelled.id.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(done.state, bpb::SubscriptionState::Cancelled as i32);
    // A repeated cancel returns it unchanged and records nothing.
    w.bill
        .cancel_subscription(authed(
            bpb::CancelSubscriptionRequest {
                subscription_id: cancelled.id.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect("cancel again");

    let rows = committed(&w.bdb.url).await;
    assert_eq!(
        rows.len(),
        25,
        "24 purchases and one cancellation: {rows:?}"
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.0, i as i64 + 1, "numbers without a hole");
    }
    let directory_of = |id: &str| {
        bought
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.directory_id.clone())
            .unwrap_or_default()
    };
    let ours_expected: Vec<_> = rows
        .iter()
        .filter(|r| directory_of(&r.2) == contoso_id)
        .cloned()
        .collect();
    let theirs_expected: Vec<_> = rows
        .iter()
        .filter(|r| directory_of(&r.2) != contoso_id)
        .cloned()
        .collect();
    let got = changes(&mut ours, ours_expected.len()).await;
    assert_eq!(delivered(&got), ours_expected);
    let last = got.last().expect("the cancellation");
    assert_eq!(last.r#type, bpb::ChangeType::SubscriptionCancelled as i32);
    let Some(bpb::change::Resource::Subscription(s)) = &last.resource else {
        panic!("a subscription: {last:?}");
    };
    assert_eq!(
        (s.id.as_str(), s.state),
        (
            cancelled.id.as_str(),
            bpb::SubscriptionState::Cancelled as i32
        )
    );
    assert!(
        got[..got.len() - 1]
            .iter()
            .all(|c| c.r#type == bpb::ChangeType::SubscriptionCreated as i32)
    );
    let got = changes(&mut theirs, theirs_expected.len()).await;
    assert_eq!(delivered(&got), theirs_expected);
    assert!(got.iter().all(|c| c.directory_id == fabrikam.directory.id));
}

async fn only_global_and_billing_administrators_watch_their_own_directory(backend: Backend) {
    let Some(mut w) = world(backend, Duration::from_secs(5)).await else {
        return;
    };
    let contoso = sign_up(&mut w.dir, "contoso").await;
    let (_, billing_admin) = add_user(
        &mut w.dir,
        &contoso,
        "tricia",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let (_, plain) = add_user(&mut w.dir, &contoso, "jane", &[]).await;
    let (_, user_admin) =
        add_user(&mut w.dir, &contoso, "uma", &[dpb::Role::UserAdministrator]).await;
    let mut stream = watch(&mut w.bill, &billing_admin, "", true)
        .await
        .expect("a Billing Administrator watches");
    assert_eq!(
        next(&mut stream).await.r#type,
        bpb::ChangeType::Bookmark as i32
    );
    for token in [&plain, &user_admin] {
        let status = watch(&mut w.bill, token, "", false)
            .await
            .expect_err("not allowed");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status = w
        .bill
        .watch_changes(bpb::WatchChangesRequest::default())
        .await
        .expect_err("no token");
    assert_ended(&status, Code::Unauthenticated, "MISSING_TOKEN");
    // Unauthenticated before a bad cursor, a bad cursor before permission.
    let status = watch(&mut w.bill, "not-a-token", "x", true)
        .await
        .expect_err("bad token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = watch(&mut w.bill, &plain, "x", false)
        .await
        .expect_err("bad cursor");
    assert_ended(&status, Code::InvalidArgument, "INVALID_CURSOR");
    // Another directory's purchase never reaches our stream; ours does.
    let fabrikam = sign_up(&mut w.dir, "fabrikam").await;
    w.bill
        .create_subscription(authed(
            buy("azure-pay-as-you-go", 0, "theirs"),
            &fabrikam.token,
        ))
        .await
        .expect("their purchase");
    let ours = w
        .bill
        .create_subscription(authed(
            buy("azure-pay-as-you-go", 0, "ours"),
            &contoso.token,
        ))
        .await
        .expect("our purchase")
        .into_inner();
    let got = changes(&mut stream, 1).await;
    assert!(
        matches!(&got[0].resource, Some(bpb::change::Resource::Subscription(s)) if s.id == ours.id)
    );
    assert_eq!(got[0].directory_id, contoso.directory.id);
    assert_eq!(
        seq(&got[0].cursor),
        2,
        "after their change, which it did not see"
    );
}

async fn a_stream_ends_when_the_directory_takes_the_right_away(backend: Backend) {
    let Some(mut w) = world(backend, Duration::from_millis(200)).await else {
        return;
    };
    let contoso = sign_up(&mut w.dir, "contoso").await;
    let (tricia, tricia_token) = add_user(
        &mut w.dir,
        &contoso,
        "tricia",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let (bob, bob_token) = add_user(
        &mut w.dir,
        &contoso,
        "bob",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let mut tricias = watch(&mut w.bill, &tricia_token, "", true)
        .await
        .expect("watch");
    let mut bobs = watch(&mut w.bill, &bob_token, "", true)
        .await
        .expect("watch");
    let mut admins = watch(&mut w.bill, &contoso.token, "", true)
        .await
        .expect("watch");
    for stream in [&mut tricias, &mut bobs, &mut admins] {
        next(stream).await;
    }
    w.dir
        .set_user_roles(authed(
            dpb::SetUserRolesRequest {
                user_id: tricia.id.clone(),
                roles: vec![],
            },
            &contoso.token,
        ))
        .await
        .expect("demote");
    assert_eq!(end_of(&mut tricias).await.code(), Code::PermissionDenied);
    w.dir
        .delete_user(authed(
            dpb::DeleteUserRequest {
                user_id: bob.id.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect("delete");
    assert_ended(
        &end_of(&mut bobs).await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    // The admin's stream goes on.
    let bought = w
        .bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, "a"), &contoso.token))
        .await
        .expect("purchase")
        .into_inner();
    let got = changes(&mut admins, 1).await;
    assert!(
        matches!(&got[0].resource, Some(bpb::change::Resource::Subscription(s)) if s.id == bought.id)
    );
}

async fn a_cursor_of_one_service_is_refused_by_the_other(backend: Backend) {
    let Some(mut w) = world(backend, Duration::from_secs(5)).await else {
        return;
    };
    let contoso = sign_up(&mut w.dir, "contoso").await;
    w.bill
        .create_subscription(authed(buy("azure-pay-as-you-go", 0, "a"), &contoso.token))
        .await
        .expect("purchase");
    let mut billing_stream = watch(&mut w.bill, &contoso.token, "", false)
        .await
        .expect("watch");
    let billing_cursor = next(&mut billing_stream).await.cursor;
    let mut directory_stream = w
        .dir
        .watch_changes(authed(dpb::WatchChangesRequest::default(), &contoso.token))
        .await
        .expect("watch")
        .into_inner();
    let directory_cursor = directory_stream
        .message()
        .await
        .expect("a change")
        .expect("a change")
        .cursor;
    // Both name change 1 of their own feed; neither opens on the other service.
    assert_eq!(seq(&billing_cursor), 1);
    assert_eq!(seq(&directory_cursor), 1);
    let status = watch(&mut w.bill, &contoso.token, &directory_cursor, false)
        .await
        .expect_err("a directory cursor on billing");
    assert_ended(&status, Code::InvalidArgument, "INVALID_CURSOR");
    let status = w
        .dir
        .watch_changes(authed(
            dpb::WatchChangesRequest {
                start_after: billing_cursor.clone(),
                start_at_now: false,
            },
            &contoso.token,
        ))
        .await
        .expect_err("a billing cursor on the directory");
    assert_ended(&status, Code::InvalidArgument, "INVALID_CURSOR");
    // Its own cursor resumes.
    watch(&mut w.bill, &contoso.token, &billing_cursor, false)
        .await
        .expect("its own cursor");
}

async fn billing_streams_end_at_once_when_billing_stops(backend: Backend) {
    let Some(mut w) = world(backend, Duration::from_secs(5)).await else {
        return;
    };
    let contoso = sign_up(&mut w.dir, "contoso").await;
    let mut stream = watch(&mut w.bill, &contoso.token, "", true)
        .await
        .expect("watch");
    next(&mut stream).await;
    let stopping = tokio::spawn(w.billing.stop());
    assert_ended(
        &end_of(&mut stream).await,
        Code::Unavailable,
        "SHUTTING_DOWN",
    );
    tokio::time::timeout(Duration::from_secs(4), stopping)
        .await
        .expect("billing stops without waiting for the drain time")
        .expect("stopped");
}
