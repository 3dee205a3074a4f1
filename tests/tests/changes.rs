//! The directory's change outbox (contract part two, section 2), read from the database itself:
//! every write through the gRPC interface records its change in its own transaction, in
//! order, with cursor numbers that have no hole (also while writers race, and on PostgreSQL
//! with two replicas writing); a refused write, or one that changes nothing, records nothing;
//! no change holds a password, a hash or a token. On the manual clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::contract::directory::v1 as pb;
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use pb::Role;
use serde_json::Value;
use tonic::Code;

const T0: i64 = 1_800_000_000_000_000;
const RETENTION: Duration = Duration::from_secs(60);

// The directory.v1.ChangeType values.
const DIRECTORY_CREATED: i64 = 2;
const USER_CREATED: i64 = 3;
const USER_ROLES_CHANGED: i64 = 4;
const USER_DELETED: i64 = 5;
const USER_RESTORED: i64 = 6;
const USER_PURGED: i64 = 7;

async fn start(db: &TestDb, clock: &ManualClock) -> DirectoryServer {
    let mut config = directory_config(db);
    config.clock = Arc::new(clock.clone());
    config.deleted_user_retention = RETENTION;
    DirectoryServer::start_with(config).await
}

/// A recorded change: its number, time, directory, kind and resource.
#[derive(Debug, Clone)]
struct Row {
    seq: i64,
    time: i64,
    directory_id: String,
    kind: i64,
    resource: Value,
}

/// Every change recorded, in cursor order.
async fn recorded(url: &str) -> Vec<Row> {
    use sqlx::Row as _;
    let rows = query_rows(
        url,
        "SELECT seq, change_time, directory_id, kind, resource FROM changes ORDER BY seq",
    )
    .await;
    rows.iter()
        .map(|r| {
            let resource: String = r.get("resource");
            for secret in [PASSWORD, "argon2", "password", "token"] {
                assert!(
                    !resource.contains(secret),
                    "a change holds {secret:?}: {resource}"
                );
            }
            Row {
                seq: r.get("seq"),
                time: r.get("change_time"),
                directory_id: r.get("directory_id"),
                kind: r.get("kind"),
                resource: serde_json::from_str(&resource).expect("JSON"),
            }
        })
        .collect()
}

/// The numbers are 1, 2, 3... with no hole and no repeat.
fn assert_contiguous(rows: &[Row]) {
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row.seq,
            i as i64 + 1,
            "cursor numbers with a hole: {rows:#?}"
        );
    }
}

fn kinds(rows: &[Row]) -> Vec<i64> {
    rows.iter().map(|r| r.kind).collect()
}

async fn every_write_records_its_change_and_nothing_else_does(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;

    let t = sign_up(&mut client, "contoso").await;
    let rows = recorded(&db.url).await;
    assert_eq!(kinds(&rows), vec![DIRECTORY_CREATED, USER_CREATED]);
    assert_eq!(rows[0].resource["id"], t.directory.id.as_str());
    assert_eq!(
        rows[0].resource["initial_domain"],
        "contoso.onmicrosoft.com"
    );
    assert_eq!(rows[1].resource["id"], t.admin.id.as_str());
    assert!(
        rows.iter()
            .all(|r| r.directory_id == t.directory.id && r.time == T0)
    );

    clock.advance(Duration::from_secs(1));
    let (jane, _) = add_user(&mut client, &t, "jane", &[]).await;
    let set = |roles: Vec<i32>| pb::SetUserRolesRequest {
        user_id: jane.id.clone(),
        roles,
    };
    let billing = vec![Role::BillingAdministrator as i32];
    client
        .set_user_roles(authed(set(billing.clone()), &t.token))
        .await
        .expect("grant");
    // The same roles again, and refused writes: nothing recorded.
    client
        .set_user_roles(authed(set(billing.clone()), &t.token))
        .await
        .expect("the same roles");
    expect_err(
        client
            .create_user(authed(
                pb::CreateUserRequest {
                    user_principal_name: jane.user_principal_name.clone(),
                    display_name: "Jane again".into(),
                    password: PASSWORD.into(),
                    roles: vec![],
                },
                &t.token,
            ))
            .await,
        Code::AlreadyExists,
        "USER_PRINCIPAL_NAME_TAKEN",
    );
    expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: t.admin.id.clone(),
                },
                &t.token,
            ))
            .await,
        Code::FailedPrecondition,
        "LAST_GLOBAL_ADMINISTRATOR",
    );
    let rows = recorded(&db.url).await;
    assert_eq!(
        kinds(&rows[2..]),
        vec![USER_CREATED, USER_ROLES_CHANGED],
        "{rows:#?}"
    );
    assert_eq!(rows[3].resource["roles"], 1 << 2, "{rows:#?}");

    // Delete, restore, delete, purge: each recorded with the user as it is after it.
    clock.advance(Duration::from_secs(1));
    let delete = pb::DeleteUserRequest {
        user_id: jane.id.clone(),
    };
    client
        .delete_user(authed(delete.clone(), &t.token))
        .await
        .expect("delete");
    client
        .restore_user(authed(
            pb::RestoreUserRequest {
                user_id: jane.id.clone(),
                new_user_principal_name: String::new(),
            },
            &t.token,
        ))
        .await
        .expect("restore");
    client
        .delete_user(authed(delete, &t.token))
        .await
        .expect("delete again");
    client
        .purge_user(authed(
            pb::PurgeUserRequest {
                user_id: jane.id.clone(),
            },
            &t.token,
        ))
        .await
        .expect("purge");
    let rows = recorded(&db.url).await;
    assert_eq!(
        kinds(&rows[4..]),
        vec![USER_DELETED, USER_RESTORED, USER_DELETED, USER_PURGED]
    );
    let deleted = &rows[4].resource;
    assert_eq!(deleted["id"], jane.id.as_str());
    assert_eq!(deleted["delete_time"], T0 + 2_000_000);
    assert_eq!(
        deleted["purge_time"],
        T0 + 2_000_000 + RETENTION.as_micros() as i64
    );
    assert!(rows[5].resource.get("delete_time").is_none(), "{rows:#?}");
    assert_eq!(rows[7].resource["id"], jane.id.as_str());
    assert!(rows[7].resource.get("purge_time").is_some());
    assert_contiguous(&rows);
}

async fn the_retention_purge_records_each_purge(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let (user, _) = add_user(&mut client, &t, name, &[]).await;
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: user.id.clone(),
                },
                &t.token,
            ))
            .await
            .expect("delete");
        ids.push(user.id);
    }
    clock.advance(RETENTION);
    let started = Instant::now();
    let rows = loop {
        let rows = recorded(&db.url).await;
        if rows.iter().filter(|r| r.kind == USER_PURGED).count() == 3 {
            break rows;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the purge did not record its changes: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let purged: Vec<&str> = rows
        .iter()
        .filter(|r| r.kind == USER_PURGED)
        .map(|r| r.resource["id"].as_str().unwrap_or_default())
        .collect();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut sorted = purged.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "each purged once");
    assert_contiguous(&rows);
}

/// Writers race in two directories (on PostgreSQL through two replicas): every successful
/// write has exactly one change, and the numbers have no hole.
async fn racing_writers_leave_no_hole_and_no_lost_change(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let second = match backend {
        Backend::Postgres => Some(start(&db, &clock).await),
        Backend::Sqlite => None,
    };
    let mut client = server.client().await;
    let other = match &second {
        Some(replica) => replica.client().await,
        None => client.clone(),
    };
    let tenants = [
        sign_up(&mut client, "contoso").await,
        sign_up(&mut client, "fabrikam").await,
    ];
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let mut client = if writer % 2 == 0 {
            client.clone()
        } else {
            other.clone()
        };
        let tenant = &tenants[writer % 2];
        let (token, domain) = (tenant.token.clone(), tenant.domain.clone());
        tasks.push(tokio::spawn(async move {
            let mut writes = 0;
            for i in 0..6 {
                let created = client
                    .create_user(authed(
                        pb::CreateUserRequest {
                            user_principal_name: format!("w{writer}u{i}@{domain}"),
                            display_name: "Writer".into(),
                            password: PASSWORD.into(),
                            roles: vec![],
                        },
                        &token,
                    ))
                    .await
                    .expect("create")
                    .into_inner();
                writes += 1;
                client
                    .set_user_roles(authed(
                        pb::SetUserRolesRequest {
                            user_id: created.id.clone(),
                            roles: vec![Role::LicenseAdministrator as i32],
                        },
                        &token,
                    ))
                    .await
                    .expect("grant");
                writes += 1;
                if i % 2 == 0 {
                    client
                        .delete_user(authed(
                            pb::DeleteUserRequest {
                                user_id: created.id,
                            },
                            &token,
                        ))
                        .await
                        .expect("delete");
                    writes += 1;
                }
            }
            writes
        }));
    }
    let mut writes = 4; // the two sign-ups' changes
    for task in tasks {
        writes += task.await.expect("writer");
    }
    let rows = recorded(&db.url).await;
    assert_eq!(rows.len(), writes, "one change per write");
    assert_contiguous(&rows);
    // Per user, its changes in the order its writes were made.
    for row in rows.iter().filter(|r| r.kind == USER_DELETED) {
        let id = &row.resource["id"];
        let of_user: Vec<i64> = rows
            .iter()
            .filter(|r| &r.resource["id"] == id)
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            of_user,
            vec![USER_CREATED, USER_ROLES_CHANGED, USER_DELETED]
        );
    }
}

on_both_backends!(
    every_write_records_its_change_and_nothing_else_does,
    the_retention_purge_records_each_purge,
    racing_writers_leave_no_hole_and_no_lost_change,
);
