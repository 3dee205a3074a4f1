//! WatchChanges on directory-svc (contract part two, section 2), through the gRPC interface on
//! both engines: every committed change exactly once, in cursor order, with no gap (also
//! while 8 writers commit, and on PostgreSQL across two replicas); resuming from cursors
//! after a restart; bookmarks and `start_at_now`; expired, forged and conflicting starts; the
//! tenant scope and the service token; and each way a stream ends, with its code.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::contract::directory::v1 as pb;
use integration_tests::feed::{WAIT, assert_ended, changes, end_of, next, seq};
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use pb::Role;
use pb::directory_service_client::DirectoryServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const T0: i64 = 1_800_000_000_000_000;

fn config(db: &TestDb, clock: &ManualClock) -> directory_svc::Config {
    let mut config = directory_config(db);
    config.clock = Arc::new(clock.clone());
    config.change_retention = Duration::from_secs(3600);
    // Longer than the retention, so that tokens outlive what the tests wait on the clock.
    config.token_ttl = Duration::from_secs(86_400);
    config
}

async fn start(db: &TestDb, clock: &ManualClock) -> DirectoryServer {
    DirectoryServer::start_with(config(db, clock)).await
}

fn service_token(db: &TestDb) -> String {
    std::fs::read_to_string(db.service_token_file())
        .expect("the service token file exists")
        .trim()
        .to_owned()
}

async fn watch(
    client: &mut DirectoryServiceClient<Channel>,
    token: &str,
    start_after: &str,
    start_at_now: bool,
) -> Result<Streaming<pb::Change>, tonic::Status> {
    client
        .watch_changes(authed(
            pb::WatchChangesRequest {
                start_after: start_after.to_owned(),
                start_at_now,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The committed changes, in order: (seq, directory, kind, resource id).
async fn committed(url: &str) -> Vec<(i64, String, i32, String)> {
    use sqlx::Row as _;
    query_rows(
        url,
        "SELECT seq, directory_id, kind, resource FROM changes ORDER BY seq",
    )
    .await
    .iter()
    .map(|r| {
        let resource: serde_json::Value =
            serde_json::from_str(&r.get::<String, _>("resource")).expect("JSON");
        (
            r.get("seq"),
            r.get("directory_id"),
            i32::try_from(r.get::<i64, _>("kind")).expect("kind"),
            resource["id"].as_str().unwrap_or_default().to_owned(),
        )
    })
    .collect()
}

fn delivered(changes: &[pb::Change]) -> Vec<(i64, String, i32, String)> {
    changes
        .iter()
        .map(|c| {
            let id = match &c.resource {
                Some(pb::change::Resource::User(u)) => u.id.clone(),
                Some(pb::change::Resource::Directory(d)) => d.id.clone(),
                None => String::new(),
            };
            (seq(&c.cursor), c.directory_id.clone(), c.r#type, id)
        })
        .collect()
}

async fn create_user(
    client: &mut DirectoryServiceClient<Channel>,
    tenant: &Tenant,
    name: &str,
) -> pb::User {
    client
        .create_user(authed(
            pb::CreateUserRequest {
                user_principal_name: format!("{name}@{}", tenant.domain),
                display_name: name.to_owned(),
                password: PASSWORD.to_owned(),
                roles: vec![],
            },
            &tenant.token,
        ))
        .await
        .expect("create user")
        .into_inner()
}

async fn set_roles(
    client: &mut DirectoryServiceClient<Channel>,
    token: &str,
    user_id: &str,
    roles: &[Role],
) {
    client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: user_id.to_owned(),
                roles: roles.iter().map(|r| *r as i32).collect(),
            },
            token,
        ))
        .await
        .expect("set roles");
}

async fn delete_user(client: &mut DirectoryServiceClient<Channel>, token: &str, user_id: &str) {
    client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: user_id.to_owned(),
            },
            token,
        ))
        .await
        .expect("delete user");
}

on_both_backends!(
    a_global_administrator_follows_their_directory_from_the_oldest_change,
    eight_writers_and_four_streams_every_change_exactly_once_in_order,
    resuming_from_every_tenth_cursor_after_a_restart_gives_the_rest,
    bookmarks_come_first_for_start_at_now_and_while_idle,
    expired_forged_and_conflicting_starts_are_refused,
    old_changes_are_removed_without_breaking_a_stream_in_the_window,
    a_stream_sees_only_its_own_directory_and_only_admins_may_watch,
    the_service_token_sees_every_directory_and_nothing_else,
    a_stream_ends_when_its_token_expires,
    a_stream_ends_when_its_user_is_deleted_or_loses_the_role,
    a_reader_that_stops_reading_is_ended_and_others_are_not_held_up,
    open_streams_end_at_once_when_the_server_stops,
    streams_beyond_the_limit_are_refused,
);

async fn a_global_administrator_follows_their_directory_from_the_oldest_change(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut stream = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let first = changes(&mut stream, 2).await;
    assert_eq!(first[0].r#type, pb::ChangeType::DirectoryCreated as i32);
    assert_eq!(
        first[0].change_time,
        Some(prost_types::Timestamp {
            seconds: T0 / 1_000_000,
            nanos: 0
        })
    );
    assert!(
        matches!(&first[0].resource, Some(pb::change::Resource::Directory(d)) if d.id == tenant.directory.id)
    );
    assert_eq!(first[1].r#type, pb::ChangeType::UserCreated as i32);
    assert!(
        matches!(&first[1].resource, Some(pb::change::Resource::User(u)) if u.id == tenant.admin.id)
    );
    assert!(first.iter().all(|c| c.directory_id == tenant.directory.id));

    // Then live: each write's change as it commits, the resource as it is after it.
    clock.advance(Duration::from_secs(5));
    let jane = create_user(&mut client, &tenant, "jane").await;
    set_roles(
        &mut client,
        &tenant.token,
        &jane.id,
        &[Role::BillingAdministrator],
    )
    .await;
    delete_user(&mut client, &tenant.token, &jane.id).await;
    let live = changes(&mut stream, 3).await;
    let types: Vec<i32> = live.iter().map(|c| c.r#type).collect();
    assert_eq!(
        types,
        [
            pb::ChangeType::UserCreated as i32,
            pb::ChangeType::UserRolesChanged as i32,
            pb::ChangeType::UserDeleted as i32
        ]
    );
    let Some(pb::change::Resource::User(roles_changed)) = &live[1].resource else {
        panic!("a user: {:?}", live[1]);
    };
    assert_eq!(roles_changed.roles, [Role::BillingAdministrator as i32]);
    let Some(pb::change::Resource::User(deleted)) = &live[2].resource else {
        panic!("a user: {:?}", live[2]);
    };
    assert!(deleted.delete_time.is_some() && deleted.purge_time.is_some());
    // Cursors rise with the changes, and a change's cursor is the same on every stream.
    let all: Vec<i64> = first.iter().chain(&live).map(|c| seq(&c.cursor)).collect();
    assert_eq!(all, [1, 2, 3, 4, 5]);
    let mut again = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let replay = changes(&mut again, 5).await;
    let cursors: Vec<&str> = first
        .iter()
        .chain(&live)
        .map(|c| c.cursor.as_str())
        .collect();
    assert_eq!(
        replay.iter().map(|c| c.cursor.as_str()).collect::<Vec<_>>(),
        cursors
    );
    // Nothing secret in any change.
    for change in first.iter().chain(&live) {
        let text = format!("{change:?}");
        for secret in [PASSWORD, &tenant.token, "argon2", "password_hash"] {
            assert!(!text.contains(secret), "a change holds {secret:?}: {text}");
        }
    }
}

async fn eight_writers_and_four_streams_every_change_exactly_once_in_order(backend: Backend) {
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
    let token = service_token(&db);
    // Four streams from the start, two on each replica, opened before the writers begin.
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut c = if i % 2 == 0 {
            client.clone()
        } else {
            other.clone()
        };
        streams.push(watch(&mut c, &token, "", false).await.expect("watch"));
    }
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let mut client = if writer % 2 == 0 {
            client.clone()
        } else {
            other.clone()
        };
        let (token, domain) = (
            tenants[writer % 2].token.clone(),
            tenants[writer % 2].domain.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut writes = 0;
            for i in 0..8 {
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
                if i % 2 == 0 {
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
                }
            }
            writes
        }));
    }
    let mut writes = 4; // the sign-ups'
    for task in tasks {
        writes += task.await.expect("writer");
    }
    let rows = committed(&db.url).await;
    assert_eq!(rows.len(), writes);
    for (i, stream) in streams.iter_mut().enumerate() {
        let got = changes(stream, writes).await;
        assert_eq!(
            delivered(&got),
            rows,
            "stream {i}: not the committed changes in order"
        );
    }
    drop(second);
}

async fn resuming_from_every_tenth_cursor_after_a_restart_gives_the_rest(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    for i in 0..18 {
        let user = create_user(&mut client, &tenant, &format!("u{i}")).await;
        if i % 3 == 0 {
            set_roles(
                &mut client,
                &tenant.token,
                &user.id,
                &[Role::UserAdministrator],
            )
            .await;
        }
    }
    let total = committed(&db.url).await.len();
    let mut stream = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let all = changes(&mut stream, total).await;
    drop(stream);
    server.stop().await;

    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    for from in (0..all.len()).step_by(10) {
        let mut resumed = watch(&mut client, &tenant.token, &all[from].cursor, false)
            .await
            .expect("resume");
        let rest = changes(&mut resumed, all.len() - from - 1).await;
        assert_eq!(
            delivered(&rest),
            delivered(&all[from + 1..]),
            "after change {from}"
        );
    }
    // And the resumed stream goes on live after the restart.
    let mut resumed = watch(
        &mut client,
        &tenant.token,
        &all[all.len() - 1].cursor,
        false,
    )
    .await
    .expect("resume");
    let late = create_user(&mut client, &tenant, "late").await;
    let got = changes(&mut resumed, 1).await;
    assert!(matches!(&got[0].resource, Some(pb::change::Resource::User(u)) if u.id == late.id));
    assert_eq!(seq(&got[0].cursor), total as i64 + 1);
}

async fn bookmarks_come_first_for_start_at_now_and_while_idle(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.feed.bookmark_every = Duration::from_millis(300);
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut stream = watch(&mut client, &tenant.token, "", true)
        .await
        .expect("watch");
    let first = next(&mut stream).await;
    assert_eq!(first.r#type, pb::ChangeType::Bookmark as i32);
    assert_eq!(seq(&first.cursor), 2, "after the newest change");
    assert!(first.resource.is_none() && first.directory_id.is_empty());
    assert_eq!(
        first.change_time,
        Some(prost_types::Timestamp {
            seconds: T0 / 1_000_000,
            nanos: 0
        })
    );
    // Idle: more bookmarks, at the same position.
    let idle = next(&mut stream).await;
    assert_eq!(idle.r#type, pb::ChangeType::Bookmark as i32);
    assert_eq!(seq(&idle.cursor), 2);
    // A change, then a bookmark at it; a bookmark's cursor resumes after it.
    let jane = create_user(&mut client, &tenant, "jane").await;
    let change = changes(&mut stream, 1).await.remove(0);
    assert!(matches!(&change.resource, Some(pb::change::Resource::User(u)) if u.id == jane.id));
    let mut mark = next(&mut stream).await;
    while mark.r#type != pb::ChangeType::Bookmark as i32 {
        mark = next(&mut stream).await;
    }
    assert_eq!(seq(&mark.cursor), 3);
    let bob = create_user(&mut client, &tenant, "bob").await;
    let mut resumed = watch(&mut client, &tenant.token, &mark.cursor, false)
        .await
        .expect("resume from a bookmark");
    let after = changes(&mut resumed, 1).await;
    assert!(matches!(&after[0].resource, Some(pb::change::Resource::User(u)) if u.id == bob.id));
    // Without start_at_now, no bookmark comes first.
    let mut from_oldest = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    assert_eq!(
        next(&mut from_oldest).await.r#type,
        pb::ChangeType::DirectoryCreated as i32
    );
}

async fn expired_forged_and_conflicting_starts_are_refused(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut stream = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let first = next(&mut stream).await;
    drop(stream);

    let bad = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let (reason, _, fields) = details(&status);
        assert_eq!(reason, "INVALID_CURSOR");
        assert_eq!(fields, ["start_after"]);
    };
    bad(watch(&mut client, &tenant.token, &first.cursor, true)
        .await
        .expect_err("both set"));
    for forged in [
        "not-a-cursor".to_owned(),
        format!("{}A", &first.cursor[..first.cursor.len() - 1]),
        format!("B{}", &first.cursor[1..]),
        first.cursor.to_uppercase(),
    ] {
        if forged != first.cursor {
            bad(watch(&mut client, &tenant.token, &forged, false)
                .await
                .expect_err("forged"));
        }
    }
    // A genuine cursor as old as the retention, and a microsecond older.
    clock.advance(Duration::from_secs(3600));
    let mut at_edge = watch(&mut client, &tenant.token, &first.cursor, false)
        .await
        .expect("a cursor exactly the retention old");
    assert_eq!(
        next(&mut at_edge).await.r#type,
        pb::ChangeType::UserCreated as i32
    );
    clock.advance(Duration::from_micros(1));
    let status = watch(&mut client, &tenant.token, &first.cursor, false)
        .await
        .expect_err("expired");
    assert_ended(&status, Code::OutOfRange, "CURSOR_EXPIRED");
}

async fn old_changes_are_removed_without_breaking_a_stream_in_the_window(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.purge_every = Duration::from_millis(50);
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await; // changes 1, 2 at T0
    clock.advance(Duration::from_secs(1800));
    let jane = create_user(&mut client, &tenant, "jane").await; // 3 at T0 + 30 min
    let mut stream = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let read = changes(&mut stream, 2).await;
    // A bookmark at jane's change, at T0 + 30 min: inside the window to the end of the test.
    let mut at_now = watch(&mut client, &tenant.token, "", true)
        .await
        .expect("watch");
    let mark = next(&mut at_now).await;
    assert_eq!(seq(&mark.cursor), 3);
    drop(at_now);
    // The first two pass the retention; the stream is past them, reading within the window.
    clock.advance(Duration::from_secs(1800) + Duration::from_micros(1));
    for _ in 0..400 {
        if committed(&db.url).await.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let kept = committed(&db.url).await;
    assert_eq!(
        kept.len(),
        1,
        "only the change within the retention is kept"
    );
    assert_eq!(kept[0].3, jane.id);
    let third = changes(&mut stream, 1).await;
    assert!(matches!(&third[0].resource, Some(pb::change::Resource::User(u)) if u.id == jane.id));
    let bob = create_user(&mut client, &tenant, "bob").await;
    let fourth = changes(&mut stream, 1).await;
    assert!(matches!(&fourth[0].resource, Some(pb::change::Resource::User(u)) if u.id == bob.id));
    // A stream from the oldest change still kept starts at jane's.
    let mut fresh = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    assert_eq!(seq(&next(&mut fresh).await.cursor), 3);
    // The removed changes' cursors are past the retention.
    let status = watch(&mut client, &tenant.token, &read[0].cursor, false)
        .await
        .expect_err("expired");
    assert_ended(&status, Code::OutOfRange, "CURSOR_EXPIRED");
    // A cursor inside the window whose following changes are gone (removed from the oldest,
    // as the task removes them, here by hand past it) ends the stream with CURSOR_EXPIRED
    // instead of skipping them.
    query_rows(&db.url, "DELETE FROM changes WHERE seq <= 4").await;
    let mut after_mark = watch(&mut client, &tenant.token, &mark.cursor, false)
        .await
        .expect("a cursor within the retention");
    assert_ended(
        &end_of(&mut after_mark).await,
        Code::OutOfRange,
        "CURSOR_EXPIRED",
    );
}

async fn a_stream_sees_only_its_own_directory_and_only_admins_may_watch(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let ours = sign_up(&mut client, "contoso").await;
    let theirs = sign_up(&mut client, "fabrikam").await;
    let mut their_stream = watch(&mut client, &theirs.token, "", false)
        .await
        .expect("watch");
    for i in 0..5 {
        create_user(&mut client, &ours, &format!("u{i}")).await;
    }
    let last = create_user(&mut client, &theirs, "last").await;
    // Their stream: their two sign-up changes, then their user; none of ours in between.
    let got = changes(&mut their_stream, 3).await;
    assert!(
        got.iter().all(|c| c.directory_id == theirs.directory.id),
        "{got:?}"
    );
    assert!(matches!(&got[2].resource, Some(pb::change::Resource::User(u)) if u.id == last.id));
    // A cursor of our stream does not open our changes to them either.
    let mut our_stream = watch(&mut client, &ours.token, "", false)
        .await
        .expect("watch");
    let our_first = next(&mut our_stream).await;
    let mut theirs_from_ours = watch(&mut client, &theirs.token, &our_first.cursor, false)
        .await
        .expect("watch");
    let got = changes(&mut theirs_from_ours, 2).await;
    assert!(
        got.iter().all(|c| c.directory_id == theirs.directory.id),
        "{got:?}"
    );

    // Others than a Global Administrator: PERMISSION_DENIED; no token: UNAUTHENTICATED.
    for role in [
        vec![],
        vec![Role::UserAdministrator],
        vec![Role::BillingAdministrator],
    ] {
        let name = format!(
            "r{}",
            role.len() * 10 + role.first().map_or(0, |r| *r as usize)
        );
        let (_, token) = add_user(&mut client, &ours, &name, &role).await;
        let status = watch(&mut client, &token, "", false)
            .await
            .expect_err("not an admin");
        assert_ended(
            &status,
            Code::PermissionDenied,
            "GLOBAL_ADMINISTRATOR_REQUIRED",
        );
    }
    let status = client
        .watch_changes(pb::WatchChangesRequest::default())
        .await
        .expect_err("no token");
    assert_ended(&status, Code::Unauthenticated, "MISSING_TOKEN");
}

async fn the_service_token_sees_every_directory_and_nothing_else(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    // Created at start: 64 lowercase hex characters and a newline, mode 0600.
    let text = std::fs::read_to_string(db.service_token_file()).expect("token file");
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    assert!(
        text[..64]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(db.service_token_file())
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let token = service_token(&db);
    let mut client = server.client().await;
    let a = sign_up(&mut client, "contoso").await;
    let b = sign_up(&mut client, "fabrikam").await;
    let mut stream = watch(&mut client, &token, "", false).await.expect("watch");
    let got = changes(&mut stream, 4).await;
    let directories: Vec<&str> = got.iter().map(|c| c.directory_id.as_str()).collect();
    assert_eq!(
        directories,
        [
            &a.directory.id,
            &a.directory.id,
            &b.directory.id,
            &b.directory.id
        ]
    );
    // Any other call with it: UNAUTHENTICATED, as for any token that is not a user's.
    expect_err(
        client.who_am_i(authed(pb::WhoAmIRequest {}, &token)).await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    expect_err(
        client
            .list_users(authed(pb::ListUsersRequest::default(), &token))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    expect_err(
        client
            .authorize(authed(
                pb::AuthorizeRequest {
                    action: pb::Action::ManageUsers as i32,
                    ..Default::default()
                },
                &token,
            ))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    // A wrong service token (one character changed) is no token at all.
    let mut wrong = token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).expect("ascii");
    let status = watch(&mut client, &wrong, "", false)
        .await
        .expect_err("wrong service token");
    assert_ended(&status, Code::Unauthenticated, "INVALID_TOKEN");
    // A restart reads the same file: the token stays good.
    drop(stream);
    server.stop().await;
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    assert_eq!(service_token(&db), token);
    let mut stream = watch(&mut client, &token, "", false).await.expect("watch");
    assert_eq!(changes(&mut stream, 4).await.len(), 4);
}

async fn a_stream_ends_when_its_token_expires(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.token_ttl = Duration::from_secs(3600);
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut stream = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    changes(&mut stream, 2).await;
    // Tokens live an hour from the next whole second; at their expiry the stream ends.
    clock.advance(Duration::from_secs(3599));
    create_user(&mut client, &tenant, "jane").await;
    changes(&mut stream, 1).await;
    clock.advance(Duration::from_secs(1));
    assert_ended(
        &end_of(&mut stream).await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
}

async fn a_stream_ends_when_its_user_is_deleted_or_loses_the_role(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let server = start(&db, &clock).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) =
        add_user(&mut client, &tenant, "jane", &[Role::GlobalAdministrator]).await;
    let (bob, bob_token) =
        add_user(&mut client, &tenant, "bob", &[Role::GlobalAdministrator]).await;
    let mut janes = watch(&mut client, &jane_token, "", true)
        .await
        .expect("watch");
    let mut bobs = watch(&mut client, &bob_token, "", true)
        .await
        .expect("watch");
    next(&mut janes).await;
    next(&mut bobs).await;
    // Bob keeps another role but loses Global Administrator: PERMISSION_DENIED, and the
    // change that took it away is not delivered to him.
    set_roles(
        &mut client,
        &tenant.token,
        &bob.id,
        &[Role::UserAdministrator],
    )
    .await;
    let status = end_of(&mut bobs).await;
    assert_ended(
        &status,
        Code::PermissionDenied,
        "GLOBAL_ADMINISTRATOR_REQUIRED",
    );
    // Jane sees Bob's change, then is deleted: UNAUTHENTICATED.
    let seen = changes(&mut janes, 1).await;
    assert!(matches!(&seen[0].resource, Some(pb::change::Resource::User(u)) if u.id == bob.id));
    delete_user(&mut client, &tenant.token, &jane.id).await;
    let status = end_of(&mut janes).await;
    assert_ended(&status, Code::Unauthenticated, "INVALID_TOKEN");
    // Another user's role change ends nothing: the admin's stream goes on.
    let mut admins = watch(&mut client, &tenant.token, "", true)
        .await
        .expect("watch");
    next(&mut admins).await;
    set_roles(&mut client, &tenant.token, &bob.id, &[]).await;
    let seen = changes(&mut admins, 1).await;
    assert_eq!(seen[0].r#type, pb::ChangeType::UserRolesChanged as i32);
    // History does not end a stream: Bob, made Global Administrator again, replays his own
    // demotion from the oldest change and keeps reading.
    set_roles(
        &mut client,
        &tenant.token,
        &bob.id,
        &[Role::GlobalAdministrator],
    )
    .await;
    let bob_token = sign_in(&mut client, &bob.user_principal_name, PASSWORD).await;
    let mut replay = watch(&mut client, &bob_token, "", false)
        .await
        .expect("watch");
    let total = committed(&db.url).await.len();
    assert_eq!(changes(&mut replay, total).await.len(), total);
}

async fn a_reader_that_stops_reading_is_ended_and_others_are_not_held_up(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.feed.stall_limit = Duration::from_millis(500);
    config.feed.queue = 8;
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    create_user(&mut client, &tenant, "jane").await;
    // A backlog larger than HTTP/2 lets through unread: 6,000 copies of jane's change,
    // written as the outbox writes them (numbers without a hole).
    let copies = 6000;
    let sql = format!(
        "INSERT INTO changes (seq, change_time, directory_id, kind, resource) \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {copies}) \
         SELECT 3 + n.i, c.change_time, c.directory_id, c.kind, c.resource \
         FROM n, changes c WHERE c.seq = 3"
    );
    query_rows(&db.url, &sql).await;
    query_rows(
        &db.url,
        &format!("UPDATE change_sequence SET last = last + {copies} WHERE id = 1"),
    )
    .await;
    // The slow reader: a small HTTP/2 window, one message read, then nothing for a while.
    let slow_channel = Channel::from_shared(server.url())
        .expect("url")
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut slow_client = DirectoryServiceClient::new(slow_channel);
    let mut slow = watch(&mut slow_client, &tenant.token, "", false)
        .await
        .expect("watch");
    next(&mut slow).await;
    // Meanwhile another stream reads everything, and goes on live.
    let mut reader = watch(&mut client, &tenant.token, "", false)
        .await
        .expect("watch");
    let total = copies + 3;
    assert_eq!(changes(&mut reader, total).await.len(), total);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = create_user(&mut client, &tenant, "late").await;
    let got = changes(&mut reader, 1).await;
    assert!(matches!(&got[0].resource, Some(pb::change::Resource::User(u)) if u.id == late.id));
    // The slow reader, reading again, gets what was in flight and then ABORTED.
    let mut received = 1;
    let status = loop {
        match tokio::time::timeout(WAIT, slow.message()).await {
            Ok(Ok(Some(_))) => received += 1,
            Ok(Ok(None)) => panic!("ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the slow stream did not end"),
        }
    };
    assert_ended(&status, Code::Aborted, "CONSUMER_TOO_SLOW");
    assert!(
        received < total,
        "the slow stream got everything: {received}"
    );
}

async fn open_streams_end_at_once_when_the_server_stops(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.serve.drain = Duration::from_secs(30);
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = watch(&mut client, &tenant.token, "", true)
            .await
            .expect("watch");
        next(&mut stream).await;
        streams.push(stream);
    }
    let stopping = tokio::spawn(server.stop());
    for stream in &mut streams {
        assert_ended(&end_of(stream).await, Code::Unavailable, "SHUTTING_DOWN");
    }
    // The streams did not hold the drain up (it would have waited 30 s).
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops without waiting for the drain time")
        .expect("stopped");
}

async fn streams_beyond_the_limit_are_refused(backend: Backend) {
    let db = db_or_skip!(backend);
    let clock = ManualClock::at(T0);
    let mut config = config(&db, &clock);
    config.feed.max_streams = 2;
    config.serve.max_in_flight = 1;
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;
    let mut first = watch(&mut client, &tenant.token, "", true)
        .await
        .expect("watch");
    let second = watch(&mut client, &tenant.token, "", true)
        .await
        .expect("watch");
    next(&mut first).await;
    // Open streams do not count as calls in flight (the limit here is 1).
    client
        .who_am_i(authed(pb::WhoAmIRequest {}, &tenant.token))
        .await
        .expect("a call besides two open streams");
    let status = watch(&mut client, &tenant.token, "", true)
        .await
        .expect_err("a third stream");
    assert_ended(&status, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    // A closed stream frees its place.
    drop(second);
    let mut third = None;
    for _ in 0..100 {
        match watch(&mut client, &tenant.token, "", true).await {
            Ok(stream) => {
                third = Some(stream);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut third = third.expect("a place is free again");
    assert_eq!(
        next(&mut third).await.r#type,
        pb::ChangeType::Bookmark as i32
    );
}

/// On PostgreSQL: a stream on one replica keeps delivering, in order and without a gap, the
/// changes another replica commits, also across that replica's restart.
#[tokio::test]
async fn postgres_a_stream_stays_open_across_a_restart_of_another_replica() {
    let db = db_or_skip!(Backend::Postgres);
    let clock = ManualClock::at(T0);
    let reader = start(&db, &clock).await;
    let writer = start(&db, &clock).await;
    let mut on_writer = writer.client().await;
    let tenant = sign_up(&mut on_writer, "contoso").await;
    let mut stream = watch(&mut reader.client().await, &service_token(&db), "", false)
        .await
        .expect("watch");
    for i in 0..10 {
        create_user(&mut on_writer, &tenant, &format!("before{i}")).await;
    }
    let first = changes(&mut stream, 12).await;
    writer.stop().await;
    let writer = start(&db, &clock).await;
    let mut on_writer = writer.client().await;
    for i in 0..10 {
        create_user(&mut on_writer, &tenant, &format!("after{i}")).await;
    }
    let second = changes(&mut stream, 10).await;
    let all: Vec<pb::Change> = first.into_iter().chain(second).collect();
    assert_eq!(delivered(&all), committed(&db.url).await);
}
