//! Licences (contract part two, section 3) through the gRPC interface on both engines: who
//! may assign, remove, list and change seats, with every code; the pool invariant
//! (`consumed <= enabled`) under concurrent assignments, seat changes and cancellations,
//! checked in the database after each round; and each change on billing's feed.

use std::collections::BTreeMap;
use std::sync::Arc;

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::feed::{changes, next};
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const E3: &str = "office365-e3";
const BASIC: &str = "office365-business-basic";

/// Both services on fresh databases and the directory "contoso": Kelley (Global
/// Administrator), Lisa (License Administrator), Bill (Billing Administrator), Ursula (User
/// Administrator), Jane and Tricia (no roles).
struct World {
    _ddb: TestDb,
    bdb: TestDb,
    _directory: DirectoryServer,
    _billing: BillingServer,
    dir: dpb::directory_service_client::DirectoryServiceClient<Channel>,
    bill: BillingServiceClient<Channel>,
    contoso: Tenant,
    lisa: (dpb::User, String),
    bill_admin: (dpb::User, String),
    ursula: (dpb::User, String),
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
    let contoso = sign_up(&mut dir, "contoso").await;
    let lisa = add_user(
        &mut dir,
        &contoso,
        "lisa",
        &[dpb::Role::LicenseAdministrator],
    )
    .await;
    let bill_admin = add_user(
        &mut dir,
        &contoso,
        "bill",
        &[dpb::Role::BillingAdministrator],
    )
    .await;
    let ursula = add_user(
        &mut dir,
        &contoso,
        "ursula",
        &[dpb::Role::UserAdministrator],
    )
    .await;
    let jane = add_user(&mut dir, &contoso, "jane", &[]).await;
    let tricia = add_user(&mut dir, &contoso, "tricia", &[]).await;
    Some(World {
        _ddb: ddb,
        bdb,
        _directory: directory,
        _billing: billing,
        dir,
        bill,
        contoso,
        lisa,
        bill_admin,
        ursula,
        jane,
        tricia,
    })
}

async fn buy(
    bill: &mut BillingServiceClient<Channel>,
    token: &str,
    offer: &str,
    seats: i32,
) -> bpb::Subscription {
    bill.create_subscription(authed(
        bpb::CreateSubscriptionRequest {
            offer_id: offer.into(),
            display_name: format!("{offer} seats"),
            seats,
            request_id: String::new(),
        },
        token,
    ))
    .await
    .expect("purchase")
    .into_inner()
}

fn assign(user_id: &str, offer: &str, token: &str) -> tonic::Request<bpb::AssignLicenseRequest> {
    authed(
        bpb::AssignLicenseRequest {
            user_id: user_id.into(),
            offer_id: offer.into(),
        },
        token,
    )
}

fn remove(user_id: &str, offer: &str, token: &str) -> tonic::Request<bpb::RemoveLicenseRequest> {
    authed(
        bpb::RemoveLicenseRequest {
            user_id: user_id.into(),
            offer_id: offer.into(),
        },
        token,
    )
}

fn seats(id: &str, seats: i32, token: &str) -> tonic::Request<bpb::ChangeSeatsRequest> {
    authed(
        bpb::ChangeSeatsRequest {
            subscription_id: id.into(),
            seats,
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

/// The directory's pools as ListLicenses shows them: (offer, enabled, consumed).
async fn pools(bill: &mut BillingServiceClient<Channel>, token: &str) -> Vec<(String, i32, i32)> {
    bill.list_licenses(authed(bpb::ListLicensesRequest {}, token))
        .await
        .expect("ListLicenses")
        .into_inner()
        .licenses
        .into_iter()
        .map(|l| (l.offer_id, l.enabled_units, l.consumed_units))
        .collect()
}

fn list(
    page_size: i32,
    page_token: &str,
    user_id: &str,
    offer_id: &str,
    token: &str,
) -> tonic::Request<bpb::ListLicenseAssignmentsRequest> {
    authed(
        bpb::ListLicenseAssignmentsRequest {
            page_size,
            page_token: page_token.into(),
            user_id: user_id.into(),
            offer_id: offer_id.into(),
        },
        token,
    )
}

/// Every assignment `token` may see (with the filters), page by page: (user, offer).
async fn assignments(
    bill: &mut BillingServiceClient<Channel>,
    token: &str,
    user_id: &str,
    offer_id: &str,
) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = bill
            .list_license_assignments(list(1, &page_token, user_id, offer_id, token))
            .await
            .expect("ListLicenseAssignments")
            .into_inner();
        all.extend(
            page.assignments
                .into_iter()
                .map(|a| (a.user_id, a.offer_id)),
        );
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// What the database holds, read behind billing's back: for each pool, (enabled, consumed,
/// assignments counted, seats of active subscriptions summed).
async fn stored_pools(url: &str) -> BTreeMap<(String, String), (i64, i64, i64, i64)> {
    use sqlx::Row as _;
    let rows = query_rows(
        url,
        "SELECT p.directory_id, p.offer_id, p.enabled, p.consumed, \
         (SELECT COUNT(*) FROM license_assignments a \
          WHERE a.directory_id = p.directory_id AND a.offer_id = p.offer_id) AS assigned, \
         (SELECT CAST(COALESCE(SUM(s.seats), 0) AS BIGINT) FROM subscriptions s \
          WHERE s.directory_id = p.directory_id AND s.offer_id = p.offer_id AND s.state = 1) \
          AS bought \
         FROM license_pools p",
    )
    .await;
    rows.iter()
        .map(|r| {
            (
                (r.get("directory_id"), r.get("offer_id")),
                (
                    r.get("enabled"),
                    r.get("consumed"),
                    r.get("assigned"),
                    r.get("bought"),
                ),
            )
        })
        .collect()
}

/// Every pool as the invariant wants it: never more assigned than enabled, and both counts
/// exactly what the rows they count say.
#[track_caller]
fn assert_pools_hold(pools: &BTreeMap<(String, String), (i64, i64, i64, i64)>) {
    for (pool, (enabled, consumed, assigned, bought)) in pools {
        assert!(
            consumed <= enabled,
            "{pool:?}: {consumed} licences on {enabled} seats"
        );
        assert_eq!(consumed, assigned, "{pool:?}: consumed counts assignments");
        assert_eq!(enabled, bought, "{pool:?}: enabled counts active seats");
    }
}

async fn assign_remove_and_list_follow_the_rules(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    let (jane, jane_token) = w.jane.clone();
    let (tricia, tricia_token) = w.tricia.clone();
    let lisa = w.lisa.1.clone();
    assert_eq!(pools(&mut w.bill, &jane_token).await, vec![]);

    // Nothing bought yet: no seat.
    expect_err(
        w.bill.assign_license(assign(&jane.id, E3, &lisa)).await,
        Code::FailedPrecondition,
        "NO_AVAILABLE_LICENSES",
    );
    buy(&mut w.bill, &kelley, E3, 2).await;
    buy(&mut w.bill, &kelley, "azure-pay-as-you-go", 0).await;
    assert_eq!(
        pools(&mut w.bill, &jane_token).await,
        vec![(E3.to_owned(), 2, 0)]
    );

    // Who: Global, User and License Administrators; not a Billing Administrator nor a user.
    for token in [&w.bill_admin.1, &tricia_token] {
        expect_err(
            w.bill.assign_license(assign(&jane.id, E3, token)).await,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }
    let first = w
        .bill
        .assign_license(assign(&jane.id, E3, &lisa))
        .await
        .expect("Lisa assigns Jane a licence")
        .into_inner();
    assert_eq!(
        (
            first.user_id.as_str(),
            first.offer_id.as_str(),
            first.directory_id.as_str()
        ),
        (jane.id.as_str(), E3, w.contoso.directory.id.as_str())
    );
    // Again, by another administrator: the same assignment, no second seat.
    let again = w
        .bill
        .assign_license(assign(&jane.id, E3, &w.ursula.1))
        .await
        .expect("Ursula assigns it again")
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(
        pools(&mut w.bill, &jane_token).await,
        vec![(E3.to_owned(), 2, 1)]
    );

    // Bad fields, each named; a bad token still answers first.
    for (user_id, offer, field) in [
        ("not-a-uuid", E3, "user_id"),
        (jane.id.as_str(), "azure-pay-as-you-go", "offer_id"),
        (jane.id.as_str(), "office365-e5", "offer_id"),
        (jane.id.as_str(), "", "offer_id"),
    ] {
        let status = expect_err(
            w.bill.assign_license(assign(user_id, offer, &lisa)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, vec![field.to_owned()], "{status:?}");
        expect_err(
            w.bill.remove_license(remove(user_id, offer, &lisa)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }
    expect_err(
        w.bill
            .assign_license(assign("not-a-uuid", E3, "not-a-token"))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );

    // A user of another directory answers exactly like an unknown one.
    let fabrikam = sign_up(&mut w.dir, "fabrikam").await;
    let foreign = expect_err(
        w.bill
            .assign_license(assign(&fabrikam.admin.id, E3, &lisa))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let unknown = expect_err(
        w.bill
            .assign_license(assign(&uuid::Uuid::new_v4().to_string(), E3, &lisa))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_eq!(foreign.message(), unknown.message());

    // The last seat, then none; a licence held already still comes back as it is.
    w.bill
        .assign_license(assign(&tricia.id, E3, &kelley))
        .await
        .expect("Kelley assigns Tricia the last seat");
    let held = w
        .bill
        .assign_license(assign(&jane.id, E3, &lisa))
        .await
        .expect("Jane's licence, held already, on a full pool")
        .into_inner();
    assert_eq!(held, first);
    expect_err(
        w.bill
            .assign_license(assign(&w.contoso.admin.id, E3, &lisa))
            .await,
        Code::FailedPrecondition,
        "NO_AVAILABLE_LICENSES",
    );
    expect_err(
        w.bill.assign_license(assign(&jane.id, BASIC, &lisa)).await,
        Code::FailedPrecondition,
        "NO_AVAILABLE_LICENSES",
    );

    // Lists: administrators (Billing too) see the directory's, by user then offer; users
    // their own; a filter on another user finds nothing for a user.
    let mut everyone = vec![
        (jane.id.clone(), E3.to_owned()),
        (tricia.id.clone(), E3.to_owned()),
    ];
    everyone.sort();
    for token in [&kelley, &lisa, &w.bill_admin.1, &w.ursula.1] {
        assert_eq!(assignments(&mut w.bill, token, "", "").await, everyone);
        assert_eq!(assignments(&mut w.bill, token, "", E3).await, everyone);
        assert_eq!(assignments(&mut w.bill, token, "", BASIC).await, vec![]);
        assert_eq!(
            assignments(&mut w.bill, token, &tricia.id, "").await,
            vec![(tricia.id.clone(), E3.to_owned())]
        );
    }
    assert_eq!(
        assignments(&mut w.bill, &jane_token, "", "").await,
        vec![(jane.id.clone(), E3.to_owned())]
    );
    assert_eq!(
        assignments(&mut w.bill, &jane_token, &tricia.id, "").await,
        vec![]
    );
    assert_eq!(
        assignments(&mut w.bill, &jane_token, &jane.id, E3).await,
        vec![(jane.id.clone(), E3.to_owned())]
    );
    // Fabrikam sees none of Contoso's.
    assert_eq!(
        assignments(&mut w.bill, &fabrikam.token, "", "").await,
        vec![]
    );
    assert_eq!(pools(&mut w.bill, &fabrikam.token).await, vec![]);
    // A page token is bound to its filters.
    let first_page = w
        .bill
        .list_license_assignments(list(1, "", "", "", &kelley))
        .await
        .expect("first page")
        .into_inner();
    assert!(!first_page.next_page_token.is_empty());
    expect_err(
        w.bill
            .list_license_assignments(list(1, &first_page.next_page_token, "", E3, &kelley))
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    expect_err(
        w.bill
            .list_license_assignments(list(1, "", "nope", "", &kelley))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    // Removal: the same callers; not assigned is NOT_FOUND.
    expect_err(
        w.bill
            .remove_license(remove(&tricia.id, E3, &jane_token))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    w.bill
        .remove_license(remove(&tricia.id, E3, &lisa))
        .await
        .expect("Lisa frees Tricia's seat");
    expect_err(
        w.bill.remove_license(remove(&tricia.id, E3, &lisa)).await,
        Code::NotFound,
        "LICENSE_NOT_FOUND",
    );
    assert_eq!(
        pools(&mut w.bill, &jane_token).await,
        vec![(E3.to_owned(), 2, 1)]
    );

    // A user the directory deleted is no longer an active user.
    w.dir
        .delete_user(authed(
            dpb::DeleteUserRequest {
                user_id: tricia.id.clone(),
            },
            &kelley,
        ))
        .await
        .expect("Kelley deletes Tricia");
    expect_err(
        w.bill.assign_license(assign(&tricia.id, E3, &lisa)).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_pools_hold(&stored_pools(&w.bdb.url).await);
}

async fn seat_changes_and_cancellations_keep_the_pool(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    let lisa = w.lisa.1.clone();
    let small = buy(&mut w.bill, &kelley, E3, 3).await;
    let azure = buy(&mut w.bill, &kelley, "azure-pay-as-you-go", 0).await;
    for user in [&w.jane.0.id, &w.tricia.0.id] {
        w.bill
            .assign_license(assign(user, E3, &lisa))
            .await
            .expect("assigns");
    }

    // Who and what: Global or Billing Administrators; seats 1..=1,000,000; an active
    // Office 365 subscription of the caller's directory.
    for token in [&lisa, &w.jane.1] {
        expect_err(
            w.bill.change_seats(seats(&small.id, 5, token)).await,
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    }
    for bad in [0, -1, 1_000_001] {
        let status = expect_err(
            w.bill.change_seats(seats(&small.id, bad, &kelley)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, vec!["seats".to_owned()]);
    }
    expect_err(
        w.bill.change_seats(seats(&azure.id, 5, &kelley)).await,
        Code::FailedPrecondition,
        "SUBSCRIPTION_NOT_PER_SEAT",
    );
    expect_err(
        w.bill
            .change_seats(seats(&uuid::Uuid::new_v4().to_string(), 5, &kelley))
            .await,
        Code::NotFound,
        "SUBSCRIPTION_NOT_FOUND",
    );
    let fabrikam = sign_up(&mut w.dir, "fabrikam").await;
    expect_err(
        w.bill
            .change_seats(seats(&small.id, 5, &fabrikam.token))
            .await,
        Code::NotFound,
        "SUBSCRIPTION_NOT_FOUND",
    );

    // Fewer seats than the two licences need: refused, nothing changed.
    expect_err(
        w.bill.change_seats(seats(&small.id, 1, &kelley)).await,
        Code::FailedPrecondition,
        "LICENSES_IN_USE",
    );
    assert_eq!(
        pools(&mut w.bill, &kelley).await,
        vec![(E3.to_owned(), 3, 2)]
    );
    let two = w
        .bill
        .change_seats(seats(&small.id, 2, &w.bill_admin.1))
        .await
        .expect("Bill sets two seats")
        .into_inner();
    assert_eq!(two.seats, 2);
    let read = w
        .bill
        .get_subscription(authed(
            bpb::GetSubscriptionRequest {
                subscription_id: small.id.clone(),
            },
            &kelley,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read, two, "a read after the change sees it");
    let same = w
        .bill
        .change_seats(seats(&small.id, 2, &kelley))
        .await
        .expect("the same count")
        .into_inner();
    assert_eq!(same, two);

    // A second subscription of the offer joins the pool; cancelling either is refused while
    // the other's seats cannot hold the licences.
    let big = buy(&mut w.bill, &kelley, E3, 5).await;
    assert_eq!(
        pools(&mut w.bill, &kelley).await,
        vec![(E3.to_owned(), 7, 2)]
    );
    w.bill
        .cancel_subscription(cancel(&small.id, &kelley))
        .await
        .expect("the big one holds both licences");
    expect_err(
        w.bill.change_seats(seats(&small.id, 4, &kelley)).await,
        Code::FailedPrecondition,
        "SUBSCRIPTION_NOT_ACTIVE",
    );
    expect_err(
        w.bill.change_seats(seats(&big.id, 1, &kelley)).await,
        Code::FailedPrecondition,
        "LICENSES_IN_USE",
    );
    expect_err(
        w.bill.cancel_subscription(cancel(&big.id, &kelley)).await,
        Code::FailedPrecondition,
        "LICENSES_IN_USE",
    );
    let still = w
        .bill
        .get_subscription(authed(
            bpb::GetSubscriptionRequest {
                subscription_id: big.id.clone(),
            },
            &kelley,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(still.state, bpb::SubscriptionState::Active as i32);
    for user in [&w.jane.0.id, &w.tricia.0.id] {
        w.bill
            .remove_license(remove(user, E3, &lisa))
            .await
            .expect("frees");
    }
    w.bill
        .cancel_subscription(cancel(&big.id, &kelley))
        .await
        .expect("nothing assigned any more");
    assert_eq!(pools(&mut w.bill, &kelley).await, vec![]);
    assert_pools_hold(&stored_pools(&w.bdb.url).await);
}

/// Creates `n` users (no roles) in the tenant: their ids.
async fn users(
    dir: &mut dpb::directory_service_client::DirectoryServiceClient<Channel>,
    tenant: &Tenant,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let user = dir
            .create_user(authed(
                dpb::CreateUserRequest {
                    user_principal_name: format!("user{i}@{}", tenant.domain),
                    display_name: format!("User {i}"),
                    password: PASSWORD.into(),
                    roles: vec![],
                },
                &tenant.token,
            ))
            .await
            .expect("create user")
            .into_inner();
        ids.push(user.id);
    }
    ids
}

async fn a_hundred_assignments_on_ten_seats_make_ten(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    buy(&mut w.bill, &kelley, E3, 10).await;
    let ids = users(&mut w.dir, &w.contoso, 100).await;
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let mut bill = w.bill.clone();
            let token = kelley.clone();
            tokio::spawn(async move { bill.assign_license(assign(&id, E3, &token)).await })
        })
        .collect();
    let (mut won, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => won += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(details(&status).0, "NO_AVAILABLE_LICENSES");
                refused += 1;
            }
        }
    }
    assert_eq!((won, refused), (10, 90));
    assert_eq!(
        pools(&mut w.bill, &kelley).await,
        vec![(E3.to_owned(), 10, 10)]
    );
    let stored = stored_pools(&w.bdb.url).await;
    assert_pools_hold(&stored);
    assert_eq!(stored.values().map(|p| p.2).sum::<i64>(), 10);
}

/// The same assignment sent twenty times at once (one batch or several): one seat, one
/// assignment, the same answer for every call.
async fn twenty_identical_assignments_take_one_seat(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    buy(&mut w.bill, &kelley, E3, 5).await;
    let jane = w.jane.0.id.clone();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut bill = w.bill.clone();
            let (token, jane) = (kelley.clone(), jane.clone());
            tokio::spawn(async move { bill.assign_license(assign(&jane, E3, &token)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task").expect("assigned").into_inner());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(
        pools(&mut w.bill, &kelley).await,
        vec![(E3.to_owned(), 5, 1)]
    );
    assert_pools_hold(&stored_pools(&w.bdb.url).await);
}

/// 30 tasks race assignments, removals, seat changes, purchases and cancellations on one pool
/// for several rounds; after each, the database holds the invariant.
async fn racing_seat_changes_cancellations_and_assignments_never_overrun(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    let ids = Arc::new(users(&mut w.dir, &w.contoso, 20).await);
    let mut subscriptions = Vec::new();
    for _ in 0..3 {
        subscriptions.push(buy(&mut w.bill, &kelley, E3, 2).await.id);
    }
    let subscriptions = Arc::new(std::sync::Mutex::new(subscriptions));
    let mut outcomes = BTreeMap::<String, usize>::new();
    for round in 0..5u64 {
        let tasks: Vec<_> = (0..30u64)
            .map(|task| {
                let mut bill = w.bill.clone();
                let token = kelley.clone();
                let ids = ids.clone();
                let subscriptions = subscriptions.clone();
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    // A cheap deterministic spread of operations and targets.
                    let mut x = round * 7919 + task * 104_729 + 1;
                    for _ in 0..6 {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        let pick = (x >> 33) as usize;
                        let user = &ids[(pick / 10) % ids.len()];
                        let subscription = {
                            let all = subscriptions.lock().expect("lock");
                            all[(pick / 7) % all.len()].clone()
                        };
                        let result = match pick % 10 {
                            0..=3 | 9 => bill
                                .assign_license(assign(user, E3, &token))
                                .await
                                .map(|_| ()),
                            4 => bill
                                .remove_license(remove(user, E3, &token))
                                .await
                                .map(|_| ()),
                            5 | 6 => bill
                                .change_seats(seats(
                                    &subscription,
                                    1 + (pick / 3 % 3) as i32,
                                    &token,
                                ))
                                .await
                                .map(|_| ()),
                            7 => bill
                                .cancel_subscription(cancel(&subscription, &token))
                                .await
                                .map(|_| ()),
                            _ => {
                                let bought = buy(&mut bill, &token, E3, 1).await;
                                subscriptions.lock().expect("lock").push(bought.id);
                                Ok(())
                            }
                        };
                        outcomes.push(match result {
                            Ok(()) => "OK".to_owned(),
                            Err(status) => {
                                assert!(
                                    matches!(
                                        status.code(),
                                        Code::FailedPrecondition | Code::NotFound
                                    ),
                                    "{status:?}"
                                );
                                details(&status).0
                            }
                        });
                    }
                    outcomes
                })
            })
            .collect();
        for task in tasks {
            for outcome in task.await.expect("task") {
                *outcomes.entry(outcome).or_default() += 1;
            }
        }
        assert_pools_hold(&stored_pools(&w.bdb.url).await);
    }
    // The race met every refusal it is about, and also let calls through.
    for reason in ["OK", "NO_AVAILABLE_LICENSES", "LICENSES_IN_USE"] {
        assert!(
            outcomes.contains_key(reason),
            "{reason} never met: {outcomes:?}"
        );
    }
}

async fn every_licence_change_shows_on_the_feed(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let kelley = w.contoso.token.clone();
    let mut stream = w
        .bill
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
    let bought = buy(&mut w.bill, &kelley, E3, 2).await;
    let jane = w.jane.0.id.clone();
    w.bill
        .assign_license(assign(&jane, E3, &kelley))
        .await
        .expect("assign");
    w.bill
        .assign_license(assign(&jane, E3, &kelley))
        .await
        .expect("again: nothing recorded");
    w.bill
        .change_seats(seats(&bought.id, 3, &kelley))
        .await
        .expect("seats");
    w.bill
        .change_seats(seats(&bought.id, 3, &kelley))
        .await
        .expect("the same: nothing recorded");
    w.bill
        .remove_license(remove(&jane, E3, &kelley))
        .await
        .expect("remove");
    let got = changes(&mut stream, 4).await;
    let kinds: Vec<i32> = got.iter().map(|c| c.r#type).collect();
    assert_eq!(
        kinds,
        [
            bpb::ChangeType::SubscriptionCreated as i32,
            bpb::ChangeType::LicenseAssigned as i32,
            bpb::ChangeType::SubscriptionUpdated as i32,
            bpb::ChangeType::LicenseRemoved as i32,
        ]
    );
    for change in &got {
        assert_eq!(change.directory_id, w.contoso.directory.id);
    }
    let Some(bpb::change::Resource::LicenseAssignment(assigned)) = &got[1].resource else {
        panic!("an assignment: {:?}", got[1]);
    };
    assert_eq!(
        (assigned.user_id.as_str(), assigned.offer_id.as_str()),
        (jane.as_str(), E3)
    );
    let Some(bpb::change::Resource::Subscription(updated)) = &got[2].resource else {
        panic!("a subscription: {:?}", got[2]);
    };
    assert_eq!(
        (updated.id.as_str(), updated.seats),
        (bought.id.as_str(), 3)
    );
    let Some(bpb::change::Resource::LicenseAssignment(removed)) = &got[3].resource else {
        panic!("an assignment: {:?}", got[3]);
    };
    assert_eq!(
        removed, assigned,
        "a removal shows the assignment as it last was"
    );
}

/// Without a token every licence RPC answers UNAUTHENTICATED (`MISSING_TOKEN`), also with bad
/// fields, and changes nothing.
async fn every_licence_rpc_needs_a_token(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    buy(&mut w.bill, &w.contoso.token, E3, 1).await;
    let jane = w.jane.0.id.clone();
    let b = &mut w.bill;
    let results = vec![
        b.assign_license(bpb::AssignLicenseRequest {
            user_id: jane.clone(),
            offer_id: E3.into(),
        })
        .await
        .map(|_| ()),
        b.assign_license(bpb::AssignLicenseRequest::default())
            .await
            .map(|_| ()),
        b.remove_license(bpb::RemoveLicenseRequest {
            user_id: jane.clone(),
            offer_id: E3.into(),
        })
        .await
        .map(|_| ()),
        b.list_licenses(bpb::ListLicensesRequest {})
            .await
            .map(|_| ()),
        b.list_license_assignments(bpb::ListLicenseAssignmentsRequest::default())
            .await
            .map(|_| ()),
        b.change_seats(bpb::ChangeSeatsRequest {
            subscription_id: uuid::Uuid::new_v4().to_string(),
            seats: 0,
        })
        .await
        .map(|_| ()),
    ];
    for result in results {
        let status = result.expect_err("needs a token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(details(&status).0, "MISSING_TOKEN");
    }
    assert_eq!(
        pools(&mut w.bill, &w.contoso.token).await,
        vec![(E3.to_owned(), 1, 0)]
    );
}

on_both_backends!(
    every_licence_rpc_needs_a_token,
    assign_remove_and_list_follow_the_rules,
    seat_changes_and_cancellations_keep_the_pool,
    a_hundred_assignments_on_ten_seats_make_ten,
    twenty_identical_assignments_take_one_seat,
    racing_seat_changes_cancellations_and_assignments_never_overrun,
    every_licence_change_shows_on_the_feed,
);
