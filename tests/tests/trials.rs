//! Free trials end (contract part two, section 4), on billing's manual clock and both
//! engines: `end_time` on every free trial, EXPIRED in Get and List from that microsecond on,
//! one `SUBSCRIPTION_UPDATED` on the feed when it ends (also when nobody reads it; once with
//! two replicas on PostgreSQL), and the one-free-trial rule still holding after.

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

on_both_backends!(a_trial_expires_at_its_end_time);

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
