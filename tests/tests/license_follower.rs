//! Billing follows the directory's change feed (contract part two, section 3): a deleted
//! user's licences are freed within 5 s, a restored user gets back those that still have a
//! free seat, a purged user's are dropped; a delete while billing is stopped is applied once
//! when it starts; and with two billing replicas on PostgreSQL, the follower killed with
//! SIGKILL mid-stream, every effect happens exactly once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::process::Proc;
use integration_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const E3: &str = "office365-e3";
const BASIC: &str = "office365-business-basic";

/// How long the contract gives billing to free a deleted user's licences.
const WITHIN: Duration = Duration::from_secs(5);

type Dir = dpb::directory_service_client::DirectoryServiceClient<Channel>;
type Bill = BillingServiceClient<Channel>;

async fn buy(bill: &mut Bill, token: &str, offer: &str, seats: i32) -> bpb::Subscription {
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

async fn assign(bill: &mut Bill, token: &str, user_id: &str, offer: &str) {
    bill.assign_license(authed(
        bpb::AssignLicenseRequest {
            user_id: user_id.into(),
            offer_id: offer.into(),
        },
        token,
    ))
    .await
    .expect("assign");
}

async fn delete(dir: &mut Dir, token: &str, user_id: &str) {
    dir.delete_user(authed(
        dpb::DeleteUserRequest {
            user_id: user_id.into(),
        },
        token,
    ))
    .await
    .expect("delete user");
}

/// The offers `user_id` holds, as ListLicenseAssignments shows them to `token`.
async fn held(bill: &mut Bill, token: &str, user_id: &str) -> Vec<String> {
    bill.list_license_assignments(authed(
        bpb::ListLicenseAssignmentsRequest {
            page_size: 100,
            page_token: String::new(),
            user_id: user_id.into(),
            offer_id: String::new(),
        },
        token,
    ))
    .await
    .expect("list assignments")
    .into_inner()
    .assignments
    .into_iter()
    .map(|a| a.offer_id)
    .collect()
}

/// The directory's pools: offer -> (enabled, consumed).
async fn pools(bill: &mut Bill, token: &str) -> BTreeMap<String, (i32, i32)> {
    bill.list_licenses(authed(bpb::ListLicensesRequest {}, token))
        .await
        .expect("ListLicenses")
        .into_inner()
        .licenses
        .into_iter()
        .map(|l| (l.offer_id, (l.enabled_units, l.consumed_units)))
        .collect()
}

/// Polls `check` until it holds, failing after `limit`: how long it took.
async fn within<F: AsyncFnMut() -> bool>(limit: Duration, what: &str, mut check: F) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times billing recorded each (change type, user) of licences, read from its
/// changes table.
async fn recorded(url: &str) -> BTreeMap<(i64, String), usize> {
    use sqlx::Row as _;
    let mut counts = BTreeMap::new();
    for row in query_rows(
        url,
        "SELECT kind, resource FROM changes WHERE kind IN (5, 6)",
    )
    .await
    {
        let resource: serde_json::Value =
            serde_json::from_str(&row.get::<String, _>("resource")).expect("JSON");
        let user = resource["user_id"].as_str().unwrap_or_default().to_owned();
        *counts.entry((row.get("kind"), user)).or_default() += 1;
    }
    counts
}

const ASSIGNED: i64 = 5;
const REMOVED: i64 = 6;

async fn a_deleted_users_licences_are_freed_and_a_restore_gives_back_what_fits(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (jane, _) = add_user(&mut dir, &contoso, "jane", &[]).await;
    let (tricia, _) = add_user(&mut dir, &contoso, "tricia", &[]).await;
    buy(&mut bill, &kelley, E3, 2).await;
    buy(&mut bill, &kelley, BASIC, 1).await;
    assign(&mut bill, &kelley, &jane.id, E3).await;
    assign(&mut bill, &kelley, &jane.id, BASIC).await;
    assign(&mut bill, &kelley, &tricia.id, E3).await;

    delete(&mut dir, &kelley, &jane.id).await;
    let took = within(WITHIN, "Jane's seats freed", async || {
        pools(&mut bill, &kelley).await
            == BTreeMap::from([(BASIC.to_owned(), (1, 0)), (E3.to_owned(), (2, 1))])
    })
    .await;
    eprintln!("freed {took:?} after the delete");
    assert_eq!(
        held(&mut bill, &kelley, &jane.id).await,
        Vec::<String>::new()
    );
    expect_err(
        bill.assign_license(authed(
            bpb::AssignLicenseRequest {
                user_id: jane.id.clone(),
                offer_id: E3.into(),
            },
            &kelley,
        ))
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );

    // Kelley takes the E3 seat Jane had; the Basic one stays free.
    assign(&mut bill, &kelley, &contoso.admin.id, E3).await;
    dir.restore_user(authed(
        dpb::RestoreUserRequest {
            user_id: jane.id.clone(),
            new_user_principal_name: String::new(),
        },
        &kelley,
    ))
    .await
    .expect("restore Jane");
    within(WITHIN, "Jane's Basic licence back", async || {
        held(&mut bill, &kelley, &jane.id).await == vec![BASIC.to_owned()]
    })
    .await;
    assert_eq!(
        pools(&mut bill, &kelley).await,
        BTreeMap::from([(BASIC.to_owned(), (1, 1)), (E3.to_owned(), (2, 2))])
    );

    // Deleted and purged: what was set aside goes with the user.
    delete(&mut dir, &kelley, &jane.id).await;
    dir.purge_user(authed(
        dpb::PurgeUserRequest {
            user_id: jane.id.clone(),
        },
        &kelley,
    ))
    .await
    .expect("purge Jane");
    within(WITHIN, "Jane's set-aside licences dropped", async || {
        query_rows(&bdb.url, "SELECT user_id FROM licenses_set_aside")
            .await
            .is_empty()
            && pools(&mut bill, &kelley).await[BASIC] == (1, 0)
    })
    .await;
    let counts = recorded(&bdb.url).await;
    assert_eq!(
        counts[&(REMOVED, jane.id.clone())],
        3,
        "E3 and Basic, then Basic"
    );
    assert_eq!(
        counts[&(ASSIGNED, jane.id.clone())],
        3,
        "two by Kelley, one by the restore"
    );
}

async fn a_delete_while_billing_is_stopped_is_applied_once_when_it_starts(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (jane, _) = add_user(&mut dir, &contoso, "jane", &[]).await;
    let (tricia, _) = add_user(&mut dir, &contoso, "tricia", &[]).await;
    buy(&mut bill, &kelley, E3, 2).await;
    assign(&mut bill, &kelley, &jane.id, E3).await;
    assign(&mut bill, &kelley, &tricia.id, E3).await;
    // The follower has passed everything so far (the assignment's user was created before).
    within(WITHIN, "the follower caught up", async || {
        !query_rows(
            &bdb.url,
            "SELECT last_cursor FROM directory_follower WHERE last_cursor <> ''",
        )
        .await
        .is_empty()
    })
    .await;

    billing.stop().await;
    delete(&mut dir, &kelley, &jane.id).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut bill = billing.client().await;
    within(WITHIN, "Jane's seat freed after the start", async || {
        pools(&mut bill, &kelley).await[E3] == (2, 1)
    })
    .await;

    // Started again: the deletion is behind the stored cursor. A later deletion freed proves
    // the follower passed it again without applying it twice.
    billing.stop().await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut bill = billing.client().await;
    delete(&mut dir, &kelley, &tricia.id).await;
    within(WITHIN, "Tricia's seat freed", async || {
        pools(&mut bill, &kelley).await[E3] == (2, 0)
    })
    .await;
    let counts = recorded(&bdb.url).await;
    assert_eq!(counts[&(REMOVED, jane.id.clone())], 1);
    assert_eq!(counts[&(REMOVED, tricia.id.clone())], 1);
}

/// Billing starts while the directory is down (after a deletion billing has not seen): the
/// follower keeps trying, and frees the seat once the directory is back.
async fn a_directory_outage_delays_the_effect_and_loses_nothing(backend: Backend) {
    let Some(ddb) = TestDb::new(backend).await else {
        return;
    };
    let Some(bdb) = TestDb::new(backend).await else {
        return;
    };
    let mut directory_config = directory_config(&ddb);
    directory_config.listen = format!("127.0.0.1:{}", free_port());
    let directory = DirectoryServer::start_with(directory_config.clone()).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let (jane, _) = add_user(&mut dir, &contoso, "jane", &[]).await;
    buy(&mut bill, &kelley, E3, 1).await;
    assign(&mut bill, &kelley, &jane.id, E3).await;

    billing.stop().await;
    delete(&mut dir, &kelley, &jane.id).await;
    drop(dir);
    let token_file = directory.service_token_file();
    directory.stop().await;
    let mut config = billing_config(&bdb, &format!("http://{}", directory_config.listen));
    config.directory_service_token_file = token_file;
    let billing = BillingServer::start_with(config).await;
    let mut bill = billing.client().await;
    // The directory is down: the follower cannot read its changes (and AssignLicense, which
    // needs the directory, is unavailable), so the seat is still taken.
    let status = bill
        .list_licenses(authed(bpb::ListLicensesRequest {}, &kelley))
        .await
        .expect_err("the directory is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        query_rows(&bdb.url, "SELECT consumed FROM license_pools")
            .await
            .iter()
            .map(|r| sqlx::Row::get::<i64, _>(r, "consumed"))
            .collect::<Vec<_>>(),
        vec![1]
    );
    let _directory = DirectoryServer::start_with(directory_config).await;
    within(
        WITHIN,
        "Jane's seat freed once the directory is back",
        async || pools(&mut bill, &kelley).await[E3] == (1, 0),
    )
    .await;
    assert_eq!(recorded(&bdb.url).await[&(REMOVED, jane.id.clone())], 1);
}

on_both_backends!(
    a_deleted_users_licences_are_freed_and_a_restore_gives_back_what_fits,
    a_delete_while_billing_is_stopped_is_applied_once_when_it_starts,
    a_directory_outage_delays_the_effect_and_loses_nothing,
);

/// Two billing processes on one PostgreSQL database follow one directory: one follows, and
/// when it is killed with SIGKILL while deletions stream in, the other takes over; every
/// deletion frees its user's seat exactly once.
#[tokio::test]
async fn two_replicas_the_follower_killed_mid_stream_every_effect_once() {
    let Some(ddb) = TestDb::postgres().await else {
        return;
    };
    let Some(bdb) = TestDb::postgres().await else {
        return;
    };
    let token_file = ddb.service_token_file();
    let token_file = token_file.to_str().expect("a UTF-8 path");
    let directory = Proc::start(
        "directory-svc",
        &[
            "--database-url",
            &ddb.url,
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
            "--service-token-file",
            token_file,
            "--signup-per-peer-per-minute",
            "0",
        ],
        &[],
    );
    let billing = |_: usize| {
        Proc::start(
            "billing-svc",
            &[
                "--database-url",
                &bdb.url,
                "--directory-url",
                &directory.url(),
                "--directory-service-token-file",
                token_file,
            ],
            &[],
        )
    };
    let mut replicas = [billing(0), billing(1)];
    let mut dir = Dir::connect(directory.url()).await.expect("connects");
    let contoso = sign_up(&mut dir, "contoso").await;
    let kelley = contoso.token.clone();
    let mut bill = Bill::connect(replicas[0].url()).await.expect("connects");
    const USERS: usize = 30;
    buy(&mut bill, &kelley, E3, USERS as i32).await;
    let mut users = Vec::new();
    for i in 0..USERS {
        let (user, _) = add_user(&mut dir, &contoso, &format!("user{i}"), &[]).await;
        assign(&mut bill, &kelley, &user.id, E3).await;
        users.push(user.id);
    }
    // Which replica follows.
    let follows = |p: &Proc| {
        p.logs()
            .iter()
            .any(|l| l.contains("following the directory's changes"))
    };
    within(Duration::from_secs(10), "a replica follows", async || {
        replicas.iter().any(follows)
    })
    .await;
    let follower = usize::from(!follows(&replicas[0]));
    assert!(follows(&replicas[follower]));
    assert!(!follows(&replicas[1 - follower]), "one follower at a time");

    // Deletions stream in; a third of the way, the follower dies.
    for (i, user) in users.iter().enumerate() {
        delete(&mut dir, &kelley, user).await;
        if i == USERS / 3 {
            replicas[follower].kill9();
        }
    }
    let survivor = Bill::connect(replicas[1 - follower].url()).await;
    let mut survivor = survivor.expect("connects");
    let took = within(Duration::from_secs(15), "every seat freed", async || {
        pools(&mut survivor, &kelley).await[E3] == (USERS as i32, 0)
    })
    .await;
    eprintln!("all freed {took:?} after the last delete");
    assert!(
        follows(&replicas[1 - follower]),
        "the other replica took over"
    );
    let counts = recorded(&bdb.url).await;
    for user in &users {
        assert_eq!(counts.get(&(REMOVED, user.clone())), Some(&1), "{user}");
        assert_eq!(counts.get(&(ASSIGNED, user.clone())), Some(&1), "{user}");
    }
    let set_aside = query_rows(&bdb.url, "SELECT user_id FROM licenses_set_aside").await;
    assert_eq!(set_aside.len(), USERS);
}
