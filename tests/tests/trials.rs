//! Trials, upgrades and transfers (contract part two, section 4), on billing's manual clock
//! and both engines: `end_time` on every free trial, EXPIRED in Get and List from that
//! microsecond on, one `SUBSCRIPTION_UPDATED` on the feed when it ends (also when nobody reads
//! it; once with two replicas on PostgreSQL), the one-free-trial rule still holding after;
//! upgrades that keep the subscription; transfers to a colleague, visibility following the
//! owner at once, and nothing written while the directory is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::feed::{changes, next};
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const TRIAL: &str = "azure-free-trial";
const PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);
const UPDATED: i64 = 3;

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

async fn start_billing(
    db: &TestDb,
    directory: &DirectoryServer,
    clock: &ManualClock,
) -> BillingServer {
    let mut config = billing_config_following(db, directory);
    config.clock = Arc::new(clock.clone());
    BillingServer::start_with(config).await
}

async fn buy(
    bill: &mut BillingServiceClient<Channel>,
    token: &str,
    offer: &str,
) -> Result<bpb::Subscription, tonic::Status> {
    bill.create_subscription(authed(
        bpb::CreateSubscriptionRequest {
            offer_id: offer.into(),
            display_name: format!("{offer} for us"),
            seats: 0,
            request_id: String::new(),
        },
        token,
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn get(bill: &mut BillingServiceClient<Channel>, token: &str, id: &str) -> bpb::Subscription {
    bill.get_subscription(authed(
        bpb::GetSubscriptionRequest {
            subscription_id: id.into(),
        },
        token,
    ))
    .await
    .expect("get")
    .into_inner()
}

async fn listed_state(bill: &mut BillingServiceClient<Channel>, token: &str, id: &str) -> i32 {
    bill.list_subscriptions(authed(
        bpb::ListSubscriptionsRequest {
            page_size: 100,
            page_token: String::new(),
        },
        token,
    ))
    .await
    .expect("list")
    .into_inner()
    .subscriptions
    .into_iter()
    .find(|s| s.id == id)
    .map(|s| s.state)
    .expect("listed")
}

/// How many SUBSCRIPTION_UPDATED changes billing recorded for `id`.
async fn updates_of(url: &str, id: &str) -> usize {
    use sqlx::Row as _;
    query_rows(url, "SELECT kind, resource FROM changes")
        .await
        .iter()
        .filter(|row| {
            row.get::<i64, _>("kind") == UPDATED
                && serde_json::from_str::<serde_json::Value>(&row.get::<String, _>("resource"))
                    .is_ok_and(|r| r["id"] == id)
        })
        .count()
}

async fn a_trial_expires_at_its_end_time(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let t0 = now_micros();
    let clock = ManualClock::at(t0);
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();

    let trial = buy(&mut bill, &kelley, TRIAL).await.expect("a trial");
    let end = t0 + i64::try_from(PERIOD.as_micros()).expect("fits");
    let end_time = trial.end_time.expect("a trial has an end");
    assert_eq!(
        end_time.seconds * 1_000_000 + i64::from(end_time.nanos) / 1000,
        end
    );
    assert_eq!(trial.state, bpb::SubscriptionState::Active as i32);
    let paid = buy(&mut bill, &kelley, "azure-pay-as-you-go")
        .await
        .expect("pay as you go");
    assert_eq!(paid.end_time, None);

    let mut stream = bill
        .watch_changes(authed(
            bpb::WatchChangesRequest {
                start_after: String::new(),
                start_at_now: true,
            },
            &kelley,
        ))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        next(&mut stream).await.r#type,
        bpb::ChangeType::Bookmark as i32
    );

    // A microsecond before its end: active; at it: expired, in Get and List alike.
    clock.advance(PERIOD - Duration::from_micros(1));
    assert_eq!(
        get(&mut bill, &kelley, &trial.id).await.state,
        bpb::SubscriptionState::Active as i32
    );
    clock.advance(Duration::from_micros(1));
    let expired = get(&mut bill, &kelley, &trial.id).await;
    assert_eq!(expired.state, bpb::SubscriptionState::Expired as i32);
    assert_eq!(
        listed_state(&mut bill, &kelley, &trial.id).await,
        bpb::SubscriptionState::Expired as i32
    );
    assert_eq!(
        get(&mut bill, &kelley, &paid.id).await.state,
        bpb::SubscriptionState::Active as i32
    );

    // One change when it ends, within 2 s of the clock reaching it.
    let started = Instant::now();
    let ended = changes(&mut stream, 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ended[0].r#type, bpb::ChangeType::SubscriptionUpdated as i32);
    let Some(bpb::change::Resource::Subscription(s)) = &ended[0].resource else {
        panic!("a subscription: {:?}", ended[0]);
    };
    assert_eq!(
        (s.id.as_str(), s.state),
        (trial.id.as_str(), bpb::SubscriptionState::Expired as i32)
    );
    assert_eq!(updates_of(&bdb.url, &trial.id).await, 1);

    // The one free trial stays used; an expired trial can still be cancelled.
    let again = buy(&mut bill, &kelley, TRIAL).await;
    assert_eq!(
        again.expect_err("one free trial per user").code(),
        Code::FailedPrecondition
    );
    let cancelled = bill
        .cancel_subscription(authed(
            bpb::CancelSubscriptionRequest {
                subscription_id: trial.id.clone(),
            },
            &kelley,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, bpb::SubscriptionState::Cancelled as i32);
}

fn upgrade(id: &str, offer: &str, token: &str) -> tonic::Request<bpb::UpgradeSubscriptionRequest> {
    authed(
        bpb::UpgradeSubscriptionRequest {
            subscription_id: id.into(),
            offer_id: offer.into(),
        },
        token,
    )
}

fn cancel(id: &str, token: &str) -> tonic::Request<bpb::CancelSubscriptionRequest> {
    authed(
        bpb::CancelSubscriptionRequest {
            subscription_id: id.into(),
        },
        token,
    )
}

const PAYG: &str = "azure-pay-as-you-go";

async fn an_upgrade_keeps_the_subscription(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let clock = ManualClock::at(now_micros());
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (bill_admin, bill_token) = add_user(
        &mut dir,
        &contoso,
        "bill",
        &[integration_tests::contract::directory::v1::Role::BillingAdministrator],
    )
    .await;
    let (_, jane) = add_user(&mut dir, &contoso, "jane", &[]).await;

    // Kelley's trial, upgraded while active: the same id, owner and directory.
    let trial = buy(&mut bill, &kelley, TRIAL).await.expect("a trial");
    expect_err(
        bill.upgrade_subscription(upgrade(&trial.id, PAYG, &jane))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let upgraded = bill
        .upgrade_subscription(upgrade(&trial.id, PAYG, &kelley))
        .await
        .expect("upgrade")
        .into_inner();
    assert_eq!(
        (
            upgraded.id.as_str(),
            upgraded.owner_user_id.as_str(),
            upgraded.directory_id.as_str(),
            upgraded.offer_id.as_str(),
            upgraded.state,
            upgraded.end_time
        ),
        (
            trial.id.as_str(),
            contoso.admin.id.as_str(),
            contoso.directory.id.as_str(),
            PAYG,
            bpb::SubscriptionState::Active as i32,
            None
        )
    );
    let again = bill
        .upgrade_subscription(upgrade(&trial.id, PAYG, &kelley))
        .await
        .expect("the same again")
        .into_inner();
    assert_eq!(again, upgraded);
    assert_eq!(get(&mut bill, &kelley, &trial.id).await, upgraded);
    assert_eq!(updates_of(&bdb.url, &trial.id).await, 1);
    // The one free trial stays used.
    assert_eq!(
        buy(&mut bill, &kelley, TRIAL)
            .await
            .expect_err("one free trial")
            .code(),
        Code::FailedPrecondition
    );

    // Bill's trial, upgraded once it has expired (by its owner).
    let expiring = buy(&mut bill, &bill_token, TRIAL).await.expect("a trial");
    assert_eq!(expiring.owner_user_id, bill_admin.id);
    clock.advance(PERIOD);
    assert_eq!(
        get(&mut bill, &kelley, &expiring.id).await.state,
        bpb::SubscriptionState::Expired as i32
    );
    let revived = bill
        .upgrade_subscription(upgrade(&expiring.id, PAYG, &bill_token))
        .await
        .expect("upgrade an expired trial")
        .into_inner();
    assert_eq!(
        (revived.id.as_str(), revived.state, revived.end_time),
        (
            expiring.id.as_str(),
            bpb::SubscriptionState::Active as i32,
            None
        )
    );

    // Refusals.
    let status = expect_err(
        bill.upgrade_subscription(upgrade(&trial.id, "azure-ultra", &kelley))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["offer_id".to_owned()]);
    expect_err(
        bill.upgrade_subscription(upgrade(&trial.id, "office365-e3", &kelley))
            .await,
        Code::FailedPrecondition,
        "UPGRADE_NOT_ALLOWED",
    );
    let office = bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "office365-e3".into(),
                display_name: "E3".into(),
                seats: 2,
                request_id: String::new(),
            },
            &kelley,
        ))
        .await
        .expect("buy E3")
        .into_inner();
    expect_err(
        bill.upgrade_subscription(upgrade(&office.id, PAYG, &kelley))
            .await,
        Code::FailedPrecondition,
        "UPGRADE_NOT_ALLOWED",
    );
    let (_, tricia) = add_user(
        &mut dir,
        &contoso,
        "tricia",
        &[integration_tests::contract::directory::v1::Role::BillingAdministrator],
    )
    .await;
    let dropped = buy(&mut bill, &tricia, TRIAL).await.expect("a trial");
    bill.cancel_subscription(cancel(&dropped.id, &tricia))
        .await
        .expect("cancel");
    expect_err(
        bill.upgrade_subscription(upgrade(&dropped.id, PAYG, &tricia))
            .await,
        Code::FailedPrecondition,
        "UPGRADE_NOT_ALLOWED",
    );
    // The one free trial stays used after a cancellation too.
    assert_eq!(
        buy(&mut bill, &tricia, TRIAL)
            .await
            .expect_err("one free trial")
            .code(),
        Code::FailedPrecondition
    );
    let fabrikam = sign_up(&mut dir, "fabrikam").await;
    expect_err(
        bill.upgrade_subscription(upgrade(&trial.id, PAYG, &fabrikam.token))
            .await,
        Code::NotFound,
        "SUBSCRIPTION_NOT_FOUND",
    );
}

/// Upgrades and cancellations of one trial racing from 20 tasks end in one consistent
/// state: cancelled, with exactly the changes of the calls that succeeded.
async fn racing_upgrades_and_cancellations_end_in_one_state(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let clock = ManualClock::at(now_micros());
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let trial = buy(&mut bill, &kelley, TRIAL).await.expect("a trial");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mut bill = bill.clone();
            let (id, token) = (trial.id.clone(), kelley.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    bill.upgrade_subscription(upgrade(&id, PAYG, &token))
                        .await
                        .map(|r| ("upgrade", r.into_inner()))
                } else {
                    bill.cancel_subscription(cancel(&id, &token))
                        .await
                        .map(|r| ("cancel", r.into_inner()))
                }
            })
        })
        .collect();
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(details(&status).0, "UPGRADE_NOT_ALLOWED");
            }
        }
    }
    let last = get(&mut bill, &kelley, &trial.id).await;
    assert_eq!(last.state, bpb::SubscriptionState::Cancelled as i32);
    use sqlx::Row as _;
    let kinds: Vec<i64> = query_rows(&bdb.url, "SELECT kind, resource FROM changes ORDER BY seq")
        .await
        .iter()
        .filter(|row| {
            serde_json::from_str::<serde_json::Value>(&row.get::<String, _>("resource"))
                .is_ok_and(|r| r["id"] == trial.id.as_str())
        })
        .map(|row| row.get("kind"))
        .collect();
    // Created; upgraded at most once, and only before the one cancellation.
    let expected: &[i64] = if last.offer_id == PAYG {
        &[2, 3, 4]
    } else {
        &[2, 4]
    };
    assert_eq!(kinds, expected, "{last:?}");
}

fn transfer(
    id: &str,
    owner: &str,
    token: &str,
) -> tonic::Request<bpb::TransferSubscriptionRequest> {
    authed(
        bpb::TransferSubscriptionRequest {
            subscription_id: id.into(),
            new_owner_user_id: owner.into(),
        },
        token,
    )
}

async fn a_transfer_hands_the_subscription_to_a_colleague(backend: Backend) {
    use integration_tests::contract::directory::v1 as dpb;
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let clock = ManualClock::at(now_micros());
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (tricia, tricia_token) = add_user(
        &mut dir,
        &contoso,
        "tricia",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let (jane, jane_token) = add_user(&mut dir, &contoso, "jane", &[]).await;
    let (uma, _) = add_user(&mut dir, &contoso, "uma", &[]).await;

    // Tricia buys Azure, then loses her role: as its owner she still may hand it on.
    let azure = buy(&mut bill, &tricia_token, PAYG).await.expect("Azure");
    dir.set_user_roles(authed(
        dpb::SetUserRolesRequest {
            user_id: tricia.id.clone(),
            roles: vec![],
        },
        &kelley,
    ))
    .await
    .expect("Tricia loses her role");
    expect_err(
        bill.transfer_subscription(transfer(&azure.id, &jane.id, &jane_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let moved = bill
        .transfer_subscription(transfer(&azure.id, &jane.id, &tricia_token))
        .await
        .expect("Tricia hands it to Jane")
        .into_inner();
    assert_eq!(
        (moved.id.as_str(), moved.owner_user_id.as_str()),
        (azure.id.as_str(), jane.id.as_str())
    );
    // Visibility follows at once: Tricia no longer sees it, Jane does.
    expect_err(
        bill.get_subscription(authed(
            bpb::GetSubscriptionRequest {
                subscription_id: azure.id.clone(),
            },
            &tricia_token,
        ))
        .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let listed = |token: String| {
        let mut bill = bill.clone();
        async move {
            bill.list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: 100,
                    page_token: String::new(),
                },
                &token,
            ))
            .await
            .expect("list")
            .into_inner()
            .subscriptions
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
        }
    };
    assert!(!listed(tricia_token.clone()).await.contains(&azure.id));
    assert!(listed(jane_token.clone()).await.contains(&azure.id));
    assert_eq!(get(&mut bill, &jane_token, &azure.id).await, moved);
    // To the current owner: unchanged, nothing recorded.
    let same = bill
        .transfer_subscription(transfer(&azure.id, &jane.id, &kelley))
        .await
        .expect("to the owner it has")
        .into_inner();
    assert_eq!(same, moved);
    assert_eq!(updates_of(&bdb.url, &azure.id).await, 1);

    // Refusals: a user of another directory answers like an unknown one; Office 365 belongs
    // to the directory; trials and cancelled subscriptions stay where they are.
    let fabrikam = sign_up(&mut dir, "fabrikam").await;
    let foreign = expect_err(
        bill.transfer_subscription(transfer(&azure.id, &fabrikam.admin.id, &kelley))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let unknown = expect_err(
        bill.transfer_subscription(transfer(
            &azure.id,
            &uuid::Uuid::new_v4().to_string(),
            &kelley,
        ))
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_eq!(foreign.message(), unknown.message());
    let office = bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "office365-e3".into(),
                display_name: "E3".into(),
                seats: 1,
                request_id: String::new(),
            },
            &kelley,
        ))
        .await
        .expect("E3")
        .into_inner();
    expect_err(
        bill.transfer_subscription(transfer(&office.id, &uma.id, &kelley))
            .await,
        Code::FailedPrecondition,
        "DIRECTORY_OWNED",
    );
    let trial = buy(&mut bill, &kelley, TRIAL).await.expect("a trial");
    expect_err(
        bill.transfer_subscription(transfer(&trial.id, &uma.id, &kelley))
            .await,
        Code::FailedPrecondition,
        "TRANSFER_NOT_ALLOWED",
    );
    let status = expect_err(
        bill.transfer_subscription(transfer(&azure.id, "uma", &kelley))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["new_owner_user_id".to_owned()]);
    bill.cancel_subscription(cancel(&azure.id, &kelley))
        .await
        .expect("cancel");
    expect_err(
        bill.transfer_subscription(transfer(&azure.id, &uma.id, &kelley))
            .await,
        Code::FailedPrecondition,
        "TRANSFER_NOT_ALLOWED",
    );
}

/// A transfer while the directory does not answer is refused and writes nothing.
async fn a_transfer_while_the_directory_is_down_writes_nothing(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let clock = ManualClock::at(now_micros());
    let directory = DirectoryServer::start(&ddb).await;
    let billing = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (jane, _) = add_user(&mut dir, &contoso, "jane", &[]).await;
    let azure = buy(&mut bill, &kelley, PAYG).await.expect("Azure");
    drop(dir);
    directory.stop().await;
    let mut request = transfer(&azure.id, &jane.id, &kelley);
    request.set_timeout(Duration::from_secs(3));
    let status = bill
        .transfer_subscription(request)
        .await
        .expect_err("the directory is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    use sqlx::Row as _;
    let owners: Vec<String> = query_rows(
        &bdb.url,
        &format!(
            "SELECT owner_user_id FROM subscriptions WHERE id = '{}'",
            azure.id
        ),
    )
    .await
    .iter()
    .map(|row| row.get("owner_user_id"))
    .collect();
    assert_eq!(owners, vec![contoso.admin.id.clone()]);
    assert_eq!(updates_of(&bdb.url, &azure.id).await, 0);
}

on_both_backends!(
    a_trial_expires_at_its_end_time,
    a_transfer_hands_the_subscription_to_a_colleague,
    a_transfer_while_the_directory_is_down_writes_nothing,
    an_upgrade_keeps_the_subscription,
    racing_upgrades_and_cancellations_end_in_one_state,
);

/// Two billing replicas on one PostgreSQL database, both recording trial ends: each end is
/// recorded once, also when nobody reads the trial.
#[tokio::test]
async fn two_replicas_record_a_trials_end_once() {
    let Some(ddb) = TestDb::postgres().await else {
        return;
    };
    let Some(bdb) = TestDb::postgres().await else {
        return;
    };
    let clock = ManualClock::at(now_micros());
    let directory = DirectoryServer::start(&ddb).await;
    let a = start_billing(&bdb, &directory, &clock).await;
    let _b = start_billing(&bdb, &directory, &clock).await;
    let mut dir = directory.client().await;
    let mut bill = a.client().await;
    let mut ids = Vec::new();
    for prefix in ["contoso", "fabrikam", "northwind"] {
        let tenant = sign_up(&mut dir, prefix).await;
        ids.push(
            buy(&mut bill, &tenant.token, TRIAL)
                .await
                .expect("a trial")
                .id,
        );
    }
    clock.advance(PERIOD);
    let started = Instant::now();
    for id in &ids {
        while updates_of(&bdb.url, id).await == 0 {
            assert!(started.elapsed() < Duration::from_secs(3), "not recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Both replicas have had a turn since.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in &ids {
        assert_eq!(updates_of(&bdb.url, id).await, 1, "{id}");
    }
}
