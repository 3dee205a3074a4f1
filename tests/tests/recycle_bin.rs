//! The recycle bin (contract part two, section 1) through the real gRPC interface, on both
//! engines and on the directory's manual clock: DeleteUser as a soft delete, ListDeletedUsers,
//! RestoreUser, PurgeUser, the retention purge at its boundary, who may do what, tenant
//! isolation, races, and the License Administrator role.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::contract::directory::v1 as pb;
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use pb::Role;
use tonic::Code;
use tonic::transport::Channel;

type Dir = pb::directory_service_client::DirectoryServiceClient<Channel>;

const RETENTION: Duration = Duration::from_secs(60);
/// The manual clock's start: a whole second (token expiry is counted in seconds).
const T0: i64 = 1_800_000_000_000_000;

async fn start(db: &TestDb) -> (DirectoryServer, ManualClock) {
    let clock = ManualClock::at(T0);
    let mut config = directory_config(db);
    config.clock = Arc::new(clock.clone());
    config.deleted_user_retention = RETENTION;
    (DirectoryServer::start_with(config).await, clock)
}

async fn delete(client: &mut Dir, token: &str, id: &str) -> Result<(), tonic::Status> {
    client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: id.to_owned(),
            },
            token,
        ))
        .await
        .map(|_| ())
}

async fn restore(
    client: &mut Dir,
    token: &str,
    id: &str,
    new_upn: &str,
) -> Result<tonic::Response<pb::User>, tonic::Status> {
    client
        .restore_user(authed(
            pb::RestoreUserRequest {
                user_id: id.to_owned(),
                new_user_principal_name: new_upn.to_owned(),
            },
            token,
        ))
        .await
}

async fn purge(
    client: &mut Dir,
    token: &str,
    id: &str,
) -> Result<tonic::Response<()>, tonic::Status> {
    client
        .purge_user(authed(
            pb::PurgeUserRequest {
                user_id: id.to_owned(),
            },
            token,
        ))
        .await
}

/// Every deleted user the caller sees, page by page.
async fn deleted_users(client: &mut Dir, token: &str) -> Vec<pb::User> {
    let mut users = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_deleted_users(authed(
                pb::ListDeletedUsersRequest {
                    page_size: 2,
                    page_token: page_token.clone(),
                },
                token,
            ))
            .await
            .expect("list deleted users")
            .into_inner();
        users.extend(page.users);
        if page.next_page_token.is_empty() {
            return users;
        }
        page_token = page.next_page_token;
    }
}

fn ids(users: &[pb::User]) -> Vec<String> {
    users.iter().map(|u| u.id.clone()).collect()
}

async fn get_user(client: &mut Dir, token: &str, id: &str) -> Result<pb::User, tonic::Status> {
    client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::UserId(id.to_owned())),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn who_am_i(client: &mut Dir, token: &str) -> Result<pb::User, tonic::Status> {
    client
        .who_am_i(authed(pb::WhoAmIRequest {}, token))
        .await
        .map(|r| r.into_inner().user.unwrap_or_default())
}

async fn try_sign_in(client: &mut Dir, upn: &str) -> Result<String, tonic::Status> {
    client
        .sign_in(pb::SignInRequest {
            user_principal_name: upn.to_owned(),
            password: PASSWORD.to_owned(),
        })
        .await
        .map(|r| r.into_inner().access_token)
}

async fn authorize(
    client: &mut Dir,
    token: &str,
    action: pb::Action,
) -> Result<pb::AuthorizeResponse, tonic::Status> {
    client
        .authorize(authed(
            pb::AuthorizeRequest {
                action: action as i32,
                ..Default::default()
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn list_upns(client: &mut Dir, token: &str, role: Option<Role>) -> Vec<String> {
    client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 1000,
                role: role.map_or(0, |r| r as i32),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("list users")
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.user_principal_name)
        .collect()
}

/// The rows left in the recycle bin, read from the database itself.
async fn rows_in_bin(url: &str) -> i64 {
    use sqlx::Row as _;
    query_rows(url, "SELECT COUNT(*) AS n FROM deleted_users").await[0].get("n")
}

/// Waits (the purge task runs every second) until `rows` are left in the recycle bin.
async fn purged_down_to(url: &str, rows: i64) {
    let started = Instant::now();
    while rows_in_bin(url).await != rows {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the purge did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deleting_moves_a_user_to_the_bin_and_frees_its_upn_at_once(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[Role::BillingAdministrator]).await;
    assert!(who_am_i(&mut client, &jane_token).await.is_ok());

    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete");

    // Gone from every call at once.
    expect_err(
        client
            .get_user(authed(
                pb::GetUserRequest {
                    lookup: Some(pb::get_user_request::Lookup::UserId(jane.id.clone())),
                },
                &t.token,
            ))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    expect_err(
        client
            .get_user(authed(
                pb::GetUserRequest {
                    lookup: Some(pb::get_user_request::Lookup::UserPrincipalName(
                        jane.user_principal_name.clone(),
                    )),
                },
                &t.token,
            ))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert!(
        !list_upns(&mut client, &t.token, None)
            .await
            .contains(&jane.user_principal_name)
    );
    let refused = try_sign_in(&mut client, &jane.user_principal_name)
        .await
        .expect_err("a deleted user cannot sign in");
    assert_eq!(refused.code(), Code::Unauthenticated);
    expect_err(
        client
            .authorize(authed(
                pb::AuthorizeRequest {
                    action: pb::Action::ReadSubscriptions as i32,
                    ..Default::default()
                },
                &jane_token,
            ))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    expect_err(
        delete(&mut client, &t.token, &jane.id)
            .await
            .map(tonic::Response::new),
        Code::NotFound,
        "USER_NOT_FOUND",
    );

    // In the bin, with its times.
    let bin = deleted_users(&mut client, &t.token).await;
    assert_eq!(ids(&bin), vec![jane.id.clone()]);
    let deleted = &bin[0];
    assert_eq!(deleted.user_principal_name, jane.user_principal_name);
    assert_eq!(deleted.roles, vec![Role::BillingAdministrator as i32]);
    assert_eq!(deleted.create_time, jane.create_time);
    let at = |micros: i64| prost_types::Timestamp {
        seconds: micros / 1_000_000,
        nanos: 0,
    };
    assert_eq!(deleted.delete_time, Some(at(T0)));
    assert_eq!(
        deleted.purge_time,
        Some(at(T0 + RETENTION.as_micros() as i64))
    );

    // The UPN is free: a new Jane takes it; the old one then comes back only under another.
    let (new_jane, _) = add_user(&mut client, &t, "jane", &[]).await;
    assert_ne!(new_jane.id, jane.id);
    let taken = expect_err(
        restore(&mut client, &t.token, &jane.id, "").await,
        Code::AlreadyExists,
        "UPN_TAKEN",
    );
    assert!(
        taken.message().contains("new_user_principal_name"),
        "{taken:?}"
    );
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![jane.id.clone()]
    );
    let other_upn = format!("jane.old@{}", t.domain);
    let restored = restore(&mut client, &t.token, &jane.id, &other_upn)
        .await
        .expect("restore under a new UPN")
        .into_inner();
    assert_eq!(restored.id, jane.id);
    assert_eq!(restored.user_principal_name, other_upn);
    assert_eq!(restored.roles, jane.roles);
    assert_eq!(restored.delete_time, None);
    assert_eq!(restored.purge_time, None);
    assert!(deleted_users(&mut client, &t.token).await.is_empty());
    // Its old password, under the new name.
    let token = try_sign_in(&mut client, &other_upn)
        .await
        .expect("sign in after restore");
    assert_eq!(
        who_am_i(&mut client, &token).await.expect("whoami").id,
        jane.id
    );
}

async fn a_restore_brings_back_id_password_and_roles_but_never_old_tokens(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, first_token) = add_user(&mut client, &t, "jane", &[Role::UserAdministrator]).await;

    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete");
    clock.advance(Duration::from_secs(5));
    let restored = restore(&mut client, &t.token, &jane.id, "")
        .await
        .expect("restore")
        .into_inner();
    assert_eq!(restored, jane, "the same user: id, UPN, roles, create time");
    assert_eq!(
        get_user(&mut client, &t.token, &jane.id)
            .await
            .expect("get"),
        jane
    );
    // The token from before the deletion stays dead, however often it is tried.
    for _ in 0..3 {
        expect_err(
            client
                .who_am_i(authed(pb::WhoAmIRequest {}, &first_token))
                .await,
            Code::Unauthenticated,
            "INVALID_TOKEN",
        );
    }
    // The old password signs in again; the new token carries the old roles.
    let second_token = try_sign_in(&mut client, &jane.user_principal_name)
        .await
        .expect("sign in with the old password");
    let decision = authorize(&mut client, &second_token, pb::Action::ManageUsers)
        .await
        .expect("authorize");
    assert!(decision.allowed, "{decision:?}");
    assert!(deleted_users(&mut client, &second_token).await.is_empty());

    // A second life ends the same way: its token dies with the next deletion for good.
    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete again");
    restore(&mut client, &t.token, &jane.id, "")
        .await
        .expect("restore again");
    for token in [&first_token, &second_token] {
        expect_err(
            client.who_am_i(authed(pb::WhoAmIRequest {}, token)).await,
            Code::Unauthenticated,
            "INVALID_TOKEN",
        );
    }
    let third_token = try_sign_in(&mut client, &jane.user_principal_name)
        .await
        .expect("sign in");
    assert!(who_am_i(&mut client, &third_token).await.is_ok());

    // Only users in the bin come back.
    for id in [jane.id.clone(), uuid::Uuid::new_v4().to_string()] {
        expect_err(
            restore(&mut client, &t.token, &id, "").await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
    }
    // A new UPN follows CreateUser's rules: the directory's domain, not taken.
    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete");
    let status = expect_err(
        restore(
            &mut client,
            &t.token,
            &jane.id,
            "jane@fabrikam.onmicrosoft.com",
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["new_user_principal_name"]);
    let status = expect_err(
        restore(&mut client, &t.token, &jane.id, "not a upn").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["new_user_principal_name"]);
    expect_err(
        restore(
            &mut client,
            &t.token,
            &jane.id,
            &t.admin.user_principal_name.to_uppercase(),
        )
        .await,
        Code::AlreadyExists,
        "USER_PRINCIPAL_NAME_TAKEN",
    );
    // Refused restores changed nothing.
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![jane.id]
    );
}

async fn a_purge_is_for_good(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, _) = add_user(&mut client, &t, "jane", &[]).await;
    let (john, _) = add_user(&mut client, &t, "john", &[]).await;

    // Only deleted users are purged.
    expect_err(
        purge(&mut client, &t.token, &jane.id).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert!(get_user(&mut client, &t.token, &jane.id).await.is_ok());

    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete");
    delete(&mut client, &t.token, &john.id)
        .await
        .expect("delete");
    purge(&mut client, &t.token, &jane.id).await.expect("purge");
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![john.id]
    );
    for result in [
        restore(&mut client, &t.token, &jane.id, "")
            .await
            .map(|_| ()),
        purge(&mut client, &t.token, &jane.id).await.map(|_| ()),
        get_user(&mut client, &t.token, &jane.id).await.map(|_| ()),
    ] {
        expect_err(
            result.map(tonic::Response::new),
            Code::NotFound,
            "USER_NOT_FOUND",
        );
    }
    assert!(
        try_sign_in(&mut client, &jane.user_principal_name)
            .await
            .is_err()
    );
    assert_eq!(rows_in_bin(&db.url).await, 1);
}

async fn who_may_list_restore_and_purge(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (_, plain) = add_user(&mut client, &t, "plain", &[]).await;
    let (_, licenses) = add_user(&mut client, &t, "lic", &[Role::LicenseAdministrator]).await;
    let (_, billing) = add_user(&mut client, &t, "bill", &[Role::BillingAdministrator]).await;
    let (_, users) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;
    let (jane, _) = add_user(&mut client, &t, "jane", &[]).await;
    let (pat, _) = add_user(&mut client, &t, "pat", &[Role::PasswordAdministrator]).await;
    delete(&mut client, &t.token, &jane.id)
        .await
        .expect("delete");
    delete(&mut client, &t.token, &pat.id)
        .await
        .expect("delete");

    for token in [&plain, &licenses, &billing] {
        let list = client
            .list_deleted_users(authed(pb::ListDeletedUsersRequest::default(), token))
            .await;
        expect_err(list, Code::PermissionDenied, "USER_ADMINISTRATOR_REQUIRED");
        expect_err(
            restore(&mut client, token, &jane.id, "").await,
            Code::PermissionDenied,
            "USER_ADMINISTRATOR_REQUIRED",
        );
        expect_err(
            purge(&mut client, token, &jane.id).await,
            Code::PermissionDenied,
            "USER_ADMINISTRATOR_REQUIRED",
        );
    }
    // A User Administrator sees the bin and handles users without roles, not role holders.
    let bin: HashSet<String> = ids(&deleted_users(&mut client, &users).await)
        .into_iter()
        .collect();
    assert_eq!(bin, HashSet::from([jane.id.clone(), pat.id.clone()]));
    expect_err(
        restore(&mut client, &users, &pat.id, "").await,
        Code::PermissionDenied,
        "TARGET_HOLDS_ROLES",
    );
    expect_err(
        purge(&mut client, &users, &pat.id).await,
        Code::PermissionDenied,
        "TARGET_HOLDS_ROLES",
    );
    assert_eq!(deleted_users(&mut client, &t.token).await.len(), 2);
    restore(&mut client, &users, &jane.id, "")
        .await
        .expect("a User Administrator restores a plain user");
    delete(&mut client, &users, &jane.id).await.expect("delete");
    purge(&mut client, &users, &jane.id)
        .await
        .expect("a User Administrator purges a plain user");
    // The Global Administrator handles role holders.
    restore(&mut client, &t.token, &pat.id, "")
        .await
        .expect("restore a role holder");
}

async fn another_directorys_bin_answers_like_missing_users(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let ours = sign_up(&mut client, "contoso").await;
    let theirs = sign_up(&mut client, "fabrikam").await;
    let (jane, _) = add_user(&mut client, &ours, "jane", &[]).await;
    delete(&mut client, &ours.token, &jane.id)
        .await
        .expect("delete");

    assert!(deleted_users(&mut client, &theirs.token).await.is_empty());
    let missing = uuid::Uuid::new_v4().to_string();
    for id in [&jane.id, &missing] {
        let restored = expect_err(
            restore(&mut client, &theirs.token, id, "").await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
        let purged = expect_err(
            purge(&mut client, &theirs.token, id).await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
        assert_eq!(restored.message(), "user not found");
        assert_eq!(purged.message(), "user not found");
    }
    // Under one of their UPNs neither: the user is not theirs to see.
    let theirs_upn = format!("jane@{}", theirs.domain);
    expect_err(
        restore(&mut client, &theirs.token, &jane.id, &theirs_upn).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_eq!(
        ids(&deleted_users(&mut client, &ours.token).await),
        vec![jane.id]
    );
}

async fn the_retention_purge_at_its_boundary(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (early, _) = add_user(&mut client, &t, "early", &[]).await;
    let (late, _) = add_user(&mut client, &t, "late", &[]).await;
    delete(&mut client, &t.token, &early.id)
        .await
        .expect("delete");
    clock.advance(Duration::from_secs(30));
    delete(&mut client, &t.token, &late.id)
        .await
        .expect("delete");

    // One tick (a microsecond) before its purge time the first is still there.
    clock.advance(RETENTION - Duration::from_secs(30) - Duration::from_micros(1));
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![early.id.clone(), late.id.clone()]
    );
    // At it, gone from the list, restore and purge, whether or not the purge has run yet.
    clock.advance(Duration::from_micros(1));
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![late.id.clone()]
    );
    expect_err(
        restore(&mut client, &t.token, &early.id, "").await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    expect_err(
        purge(&mut client, &t.token, &early.id).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // The background purge removes its row, and only its.
    purged_down_to(&db.url, 1).await;
    assert_eq!(
        ids(&deleted_users(&mut client, &t.token).await),
        vec![late.id.clone()]
    );
    // The second at its own boundary.
    clock.advance(Duration::from_secs(30));
    assert!(deleted_users(&mut client, &t.token).await.is_empty());
    purged_down_to(&db.url, 0).await;
    // The UPNs stayed free throughout.
    add_user(&mut client, &t, "early", &[]).await;
}

/// On PostgreSQL the calls go to two replicas of one database, and both run the purge.
async fn racing_restores_and_purges_of_one_user_end_in_one_outcome(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let second = match backend {
        Backend::Postgres => Some(start(&db).await.0),
        Backend::Sqlite => None,
    };
    let other = match &second {
        Some(replica) => replica.client().await,
        None => client.clone(),
    };
    let t = sign_up(&mut client, "contoso").await;
    let mut outcomes = HashSet::new();
    for round in 0..6 {
        let (user, _) = add_user(&mut client, &t, &format!("racer{round}"), &[]).await;
        delete(&mut client, &t.token, &user.id)
            .await
            .expect("delete");
        let mut tasks = Vec::new();
        for i in 0..20 {
            let mut client = if i % 4 < 2 {
                client.clone()
            } else {
                other.clone()
            };
            let (token, id) = (t.token.clone(), user.id.clone());
            tasks.push(tokio::spawn(async move {
                if (i + round) % 2 == 0 {
                    (
                        "restore",
                        restore(&mut client, &token, &id, "").await.map(|_| ()),
                    )
                } else {
                    ("purge", purge(&mut client, &token, &id).await.map(|_| ()))
                }
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            let (what, result) = task.await.expect("task");
            match result {
                Ok(()) => winners.push(what),
                Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one call wins: {winners:?}");
        // Whole: restored and active, or purged and gone; never in the bin.
        let active = get_user(&mut client, &t.token, &user.id).await.is_ok();
        assert_eq!(active, winners[0] == "restore");
        assert!(deleted_users(&mut client, &t.token).await.is_empty());
        outcomes.insert(winners[0]);
    }
    assert_eq!(rows_in_bin(&db.url).await, 0);
    eprintln!("outcomes seen: {outcomes:?}");
}

async fn concurrent_deletes_and_restores_keep_a_global_administrator(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    for round in 0..8 {
        // A (the founding admin) and B are the Global Administrators; C, a third, is in the
        // bin. At once: A deletes B, B deletes A, A restores C.
        let t = sign_up(&mut client, &format!("race{round}")).await;
        let ga = [Role::GlobalAdministrator];
        let (b, b_token) = add_user(&mut client, &t, "b", &ga).await;
        let (c, _) = add_user(&mut client, &t, "c", &ga).await;
        delete(&mut client, &t.token, &c.id)
            .await
            .expect("delete c");
        let (mut c1, mut c2, mut c3) = (client.clone(), client.clone(), client.clone());
        let (x, y, z) = tokio::join!(
            delete(&mut c1, &t.token, &b.id),
            delete(&mut c2, &b_token, &t.admin.id),
            async { restore(&mut c3, &t.token, &c.id, "").await.map(|_| ()) },
        );
        for result in [x, y, z] {
            if let Err(status) = result {
                // Refused by the rule, or its caller was deleted first.
                assert!(
                    matches!(
                        status.code(),
                        Code::FailedPrecondition | Code::Unauthenticated
                    ),
                    "{status:?}"
                );
            }
        }
        // Whoever is left, the directory has an active Global Administrator.
        let mut admins = Vec::new();
        for upn in [
            &t.admin.user_principal_name,
            &b.user_principal_name,
            &c.user_principal_name,
        ] {
            if let Ok(token) = try_sign_in(&mut client, upn).await {
                admins = list_upns(&mut client, &token, Some(Role::GlobalAdministrator)).await;
                break;
            }
        }
        assert!(
            !admins.is_empty(),
            "round {round}: no Global Administrator left"
        );
    }
}

async fn the_license_administrator_role(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (lic, lic_token) = add_user(&mut client, &t, "lic", &[Role::LicenseAdministrator]).await;
    assert_eq!(lic.roles, vec![Role::LicenseAdministrator as i32]);
    let (_, users) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;
    let (_, billing) = add_user(&mut client, &t, "bill", &[Role::BillingAdministrator]).await;
    let (jane, plain) = add_user(&mut client, &t, "jane", &[]).await;

    for (token, allowed) in [
        (&t.token, true),
        (&users, true),
        (&lic_token, true),
        (&billing, false),
        (&plain, false),
    ] {
        let decision = authorize(&mut client, token, pb::Action::ManageLicenses)
            .await
            .expect("authorize");
        assert_eq!(decision.allowed, allowed, "{decision:?}");
        if allowed {
            assert!(
                decision.reason.starts_with("granted by the"),
                "{decision:?}"
            );
        } else {
            assert!(
                decision.reason.contains("License Administrator"),
                "{decision:?}"
            );
        }
    }
    // Granted and listed like every role.
    let granted = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: jane.id.clone(),
                roles: vec![Role::LicenseAdministrator as i32],
            },
            &t.token,
        ))
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(granted.roles, vec![Role::LicenseAdministrator as i32]);
    let mut holders = list_upns(&mut client, &t.token, Some(Role::LicenseAdministrator)).await;
    holders.sort();
    assert_eq!(
        holders,
        vec![jane.user_principal_name, lic.user_principal_name]
    );
    // A License Administrator manages licences, not users.
    let decision = authorize(&mut client, &lic_token, pb::Action::ManageUsers)
        .await
        .expect("authorize");
    assert!(!decision.allowed);
}

async fn pages_of_the_bin_are_ordered_and_bound_to_it(backend: Backend) {
    let db = db_or_skip!(backend);
    let (server, _clock) = start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let mut expected = Vec::new();
    // Two users once held the same UPN: ordered by UPN, then id.
    for name in ["zoe", "anna", "mike", "anna", "bob"] {
        let (user, _) = add_user(&mut client, &t, name, &[]).await;
        delete(&mut client, &t.token, &user.id)
            .await
            .expect("delete");
        expected.push((user.user_principal_name.to_lowercase(), user.id));
    }
    expected.sort();
    let listed: Vec<String> = ids(&deleted_users(&mut client, &t.token).await);
    assert_eq!(
        listed,
        expected.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
    );
    // A ListUsers page token is not one of the bin's.
    add_user(&mut client, &t, "keep", &[]).await;
    let users_page = client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 1,
                ..Default::default()
            },
            &t.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(!users_page.next_page_token.is_empty());
    let other = sign_up(&mut client, "fabrikam").await;
    let bin_page = client
        .list_deleted_users(authed(
            pb::ListDeletedUsersRequest {
                page_size: 1,
                ..Default::default()
            },
            &t.token,
        ))
        .await
        .expect("list")
        .into_inner();
    for (token, page_token) in [
        (&t.token, &users_page.next_page_token),
        (&other.token, &bin_page.next_page_token),
        (&t.token, &"garbage".to_owned()),
    ] {
        expect_err(
            client
                .list_deleted_users(authed(
                    pb::ListDeletedUsersRequest {
                        page_size: 1,
                        page_token: page_token.clone(),
                    },
                    token,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
}

on_both_backends!(
    deleting_moves_a_user_to_the_bin_and_frees_its_upn_at_once,
    a_restore_brings_back_id_password_and_roles_but_never_old_tokens,
    a_purge_is_for_good,
    who_may_list_restore_and_purge,
    another_directorys_bin_answers_like_missing_users,
    the_retention_purge_at_its_boundary,
    racing_restores_and_purges_of_one_user_end_in_one_outcome,
    concurrent_deletes_and_restores_keep_a_global_administrator,
    the_license_administrator_role,
    pages_of_the_bin_are_ordered_and_bound_to_it,
);
