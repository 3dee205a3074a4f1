//! directory-svc through its real gRPC interface: every RPC's success path and every rule and
//! status code of the contract's directory table and calling conventions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::contract::directory::v1 as pb;
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use pb::Role;
use tonic::Code;

fn create_user_req(upn: &str, roles: &[Role]) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        user_principal_name: upn.to_owned(),
        display_name: "Someone".to_owned(),
        password: PASSWORD.to_owned(),
        roles: roles.iter().map(|r| *r as i32).collect(),
    }
}

async fn all_upns(
    client: &mut pb::directory_service_client::DirectoryServiceClient<tonic::transport::Channel>,
    token: &str,
) -> Vec<String> {
    let page = client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 1000,
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(page.next_page_token.is_empty());
    page.users
        .into_iter()
        .map(|u| u.user_principal_name)
        .collect()
}

async fn sign_up_creates_the_directory_and_its_global_administrator(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;

    let created = client
        .create_directory(pb::CreateDirectoryRequest {
            display_name: "  Contoso Ltd ".into(),
            domain_prefix: "Contoso".into(),
            admin_user_name: "Kelley".into(),
            admin_display_name: "Kelley Wall".into(),
            admin_password: PASSWORD.into(),
        })
        .await
        .expect("sign-up")
        .into_inner();
    let directory = created.directory.expect("directory");
    let admin = created.admin.expect("admin");
    assert_eq!(directory.display_name, "Contoso Ltd");
    assert_eq!(directory.initial_domain, "contoso.onmicrosoft.com");
    assert!(uuid::Uuid::parse_str(&directory.id).is_ok());
    assert!(directory.create_time.is_some());
    assert_eq!(admin.user_principal_name, "Kelley@contoso.onmicrosoft.com");
    assert_eq!(admin.directory_id, directory.id);
    assert_eq!(admin.roles, vec![Role::GlobalAdministrator as i32]);

    // Sign-in is case-insensitive on the UPN.
    let signed = client
        .sign_in(pb::SignInRequest {
            user_principal_name: "KELLEY@CONTOSO.onmicrosoft.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("sign-in")
        .into_inner();
    let expire = signed.expire_time.expect("expire_time").seconds;
    let now = (contract::time::now_micros() / 1_000_000) as i64;
    assert!(
        (now + 3500..=now + 3700).contains(&expire),
        "token lives one hour"
    );
    assert_eq!(signed.user.expect("user").id, admin.id);

    let me = client
        .who_am_i(authed(pb::WhoAmIRequest {}, &signed.access_token))
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(me.user.expect("user").id, admin.id);
    assert_eq!(me.directory.expect("directory"), directory);

    let got = client
        .get_directory(authed(
            pb::GetDirectoryRequest {
                directory_id: directory.id.clone(),
            },
            &signed.access_token,
        ))
        .await
        .expect("get directory")
        .into_inner();
    assert_eq!(got, directory);
}

async fn a_taken_prefix_in_any_letter_case_is_already_exists(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    sign_up(&mut client, "fabrikam").await;
    let again = client
        .create_directory(pb::CreateDirectoryRequest {
            display_name: "Other".into(),
            domain_prefix: "FabriKAM".into(),
            admin_user_name: "someone".into(),
            admin_display_name: "Someone".into(),
            admin_password: PASSWORD.into(),
        })
        .await;
    expect_err(again, Code::AlreadyExists, "DOMAIN_PREFIX_TAKEN");
}

async fn concurrent_sign_ups_for_one_prefix_have_exactly_one_winner(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let client = server.client().await;
    let attempts = (0..8).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .create_directory(pb::CreateDirectoryRequest {
                    display_name: format!("Race {i}"),
                    domain_prefix: if i % 2 == 0 {
                        "race".into()
                    } else {
                        "RACE".into()
                    },
                    admin_user_name: format!("admin{i}"),
                    admin_display_name: "Admin".into(),
                    admin_password: PASSWORD.into(),
                })
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "exactly one sign-up wins: {results:?}");
    for r in results.into_iter().filter_map(Result::err) {
        assert_eq!(r.code(), Code::AlreadyExists);
    }
}

async fn sign_up_validates_every_field_and_names_each_bad_one(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let status = expect_err(
        client
            .create_directory(pb::CreateDirectoryRequest {
                display_name: "  ".into(),
                domain_prefix: "a".into(),
                admin_user_name: ".kelley".into(),
                admin_display_name: "bad\u{1}name".into(),
                admin_password: "weakpassw0rd".into(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let (_, domain, fields) = details(&status);
    assert_eq!(domain, "directory-svc");
    assert_eq!(
        fields,
        vec![
            "display_name",
            "domain_prefix",
            "admin_user_name",
            "admin_display_name",
            "admin_password"
        ]
    );
    assert!(
        !format!("{status:?}").contains("weakpassw0rd"),
        "the message names the field, never echoes the password"
    );
    assert!(!format!("{status:?}").contains("bad\u{1}name"));

    for (prefix, ok) in [
        ("ab", true),
        (&"z".repeat(32)[..], true),
        (&"z".repeat(33)[..], false),
        ("a-b", false),
        ("ab.c", false),
    ] {
        let result = client
            .create_directory(pb::CreateDirectoryRequest {
                display_name: "X".into(),
                domain_prefix: prefix.into(),
                admin_user_name: "admin".into(),
                admin_display_name: "Admin".into(),
                admin_password: PASSWORD.into(),
            })
            .await;
        assert_eq!(result.is_ok(), ok, "prefix {prefix:?}: {result:?}");
    }
    // Nothing was written by the refused calls: the prefix is still free.
    let fine = client
        .create_directory(pb::CreateDirectoryRequest {
            display_name: "A".into(),
            domain_prefix: "aa".into(),
            admin_user_name: "admin".into(),
            admin_display_name: "Admin".into(),
            admin_password: PASSWORD.into(),
        })
        .await;
    assert!(fine.is_ok(), "{fine:?}");
}

async fn unknown_user_and_wrong_password_are_indistinguishable(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;

    let wrong_password = client
        .sign_in(pb::SignInRequest {
            user_principal_name: tenant.admin.user_principal_name.clone(),
            password: "Wr0ng-Password".into(),
        })
        .await
        .expect_err("wrong password");
    let unknown_user = client
        .sign_in(pb::SignInRequest {
            user_principal_name: "nobody@contoso.onmicrosoft.com".into(),
            password: "Wr0ng-Password".into(),
        })
        .await
        .expect_err("unknown user");
    assert_eq!(wrong_password.code(), Code::Unauthenticated);
    assert_eq!(wrong_password.code(), unknown_user.code());
    assert_eq!(wrong_password.message(), unknown_user.message());
    assert_eq!(details(&wrong_password), details(&unknown_user));
    assert!(!wrong_password.message().contains("Wr0ng"));

    let empty = client
        .sign_in(pb::SignInRequest {
            user_principal_name: String::new(),
            password: String::new(),
        })
        .await;
    let status = expect_err(empty, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(details(&status).2, vec!["user_principal_name", "password"]);
}

async fn calls_without_a_valid_token_are_unauthenticated(backend: Backend) {
    let db = db_or_skip!(backend);
    let mut config = directory_config(&db);
    config.token_ttl = Duration::from_secs(60);
    let clock = ManualClock::at(1_800_000_000_000_000); // a whole second: expiry is to the second
    config.clock = Arc::new(clock.clone());
    let server = DirectoryServer::start_with(config).await;
    let mut client = server.client().await;
    let tenant = sign_up(&mut client, "contoso").await;

    let missing = client.who_am_i(pb::WhoAmIRequest {}).await;
    expect_err(missing, Code::Unauthenticated, "MISSING_TOKEN");

    let mut basic = tonic::Request::new(pb::WhoAmIRequest {});
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {}", tenant.token).parse().expect("ascii"),
    );
    expect_err(
        client.who_am_i(basic).await,
        Code::Unauthenticated,
        "MISSING_TOKEN",
    );

    let mut tampered = tenant.token.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for bad in ["garbage", "a.b.c", tampered.as_str()] {
        let status = expect_err(
            client.who_am_i(authed(pb::WhoAmIRequest {}, bad)).await,
            Code::Unauthenticated,
            "INVALID_TOKEN",
        );
        assert!(!status.message().contains(bad));
    }

    // Authorize needs a token too.
    expect_err(
        client
            .authorize(pb::AuthorizeRequest {
                action: pb::Action::ReadSubscriptions as i32,
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "MISSING_TOKEN",
    );

    // Expired: valid until its 60 s are up, to the second, and not after (the manual clock).
    clock.advance(Duration::from_secs(59));
    assert!(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &tenant.token))
            .await
            .is_ok()
    );
    clock.advance(Duration::from_secs(1));
    expect_err(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &tenant.token))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
}

async fn create_user_validates_fields_and_writes_nothing_when_refused(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;

    let cases: Vec<(pb::CreateUserRequest, Vec<&str>)> = vec![
        (
            create_user_req("no-at-sign", &[]),
            vec!["user_principal_name"],
        ),
        (
            create_user_req(".dot@contoso.onmicrosoft.com", &[]),
            vec!["user_principal_name"],
        ),
        (
            create_user_req("dot.@contoso.onmicrosoft.com", &[]),
            vec!["user_principal_name"],
        ),
        (
            create_user_req("sp ace@contoso.onmicrosoft.com", &[]),
            vec!["user_principal_name"],
        ),
        (
            create_user_req(&format!("{}@contoso.onmicrosoft.com", "a".repeat(65)), &[]),
            vec!["user_principal_name"],
        ),
        (
            create_user_req("jane@fabrikam.onmicrosoft.com", &[]),
            vec!["user_principal_name"],
        ),
        (
            pb::CreateUserRequest {
                password: "alllowercase".into(),
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["password"],
        ),
        (
            pb::CreateUserRequest {
                password: "Sh0rt!".into(),
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["password"],
        ),
        (
            pb::CreateUserRequest {
                display_name: " ".into(),
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["display_name"],
        ),
        (
            pb::CreateUserRequest {
                display_name: "x".repeat(257),
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["display_name"],
        ),
        (
            pb::CreateUserRequest {
                display_name: "tab\there".into(),
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["display_name"],
        ),
        (
            pb::CreateUserRequest {
                roles: vec![0],
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["roles[0]"],
        ),
        (
            pb::CreateUserRequest {
                roles: vec![1, 99],
                ..create_user_req("jane@contoso.onmicrosoft.com", &[])
            },
            vec!["roles[1]"],
        ),
        (
            pb::CreateUserRequest {
                user_principal_name: String::new(),
                display_name: String::new(),
                password: String::new(),
                roles: vec![],
            },
            vec!["user_principal_name", "display_name", "password"],
        ),
    ];
    for (request, expected) in cases {
        let status = expect_err(
            client.create_user(authed(request.clone(), &t.token)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, expected, "request {request:?}");
        if !request.password.is_empty() {
            assert!(
                !format!("{status:?}").contains(&request.password),
                "the password is never echoed: {status:?}"
            );
        }
    }
    assert_eq!(
        all_upns(&mut client, &t.token).await,
        vec![t.admin.user_principal_name.clone()]
    );

    // The boundary values are accepted.
    let long_local = "a".repeat(64);
    let ok = client
        .create_user(authed(
            pb::CreateUserRequest {
                display_name: "é".repeat(256),
                ..create_user_req(&format!("{long_local}@contoso.onmicrosoft.com"), &[])
            },
            &t.token,
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let special = client
        .create_user(authed(
            create_user_req("o'neil.x-y_z!#^~@Contoso.OnMicrosoft.com", &[]),
            &t.token,
        ))
        .await
        .expect("special characters")
        .into_inner();
    assert_eq!(
        special.user_principal_name,
        "o'neil.x-y_z!#^~@contoso.onmicrosoft.com"
    );
}

async fn a_upn_taken_in_another_letter_case_is_already_exists(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    add_user(&mut client, &t, "jane", &[]).await;
    let again = client
        .create_user(authed(
            create_user_req("JANE@contoso.onmicrosoft.com", &[]),
            &t.token,
        ))
        .await;
    expect_err(again, Code::AlreadyExists, "USER_PRINCIPAL_NAME_TAKEN");
    let admin_again = client
        .create_user(authed(
            create_user_req("ADMIN@contoso.onmicrosoft.com", &[]),
            &t.token,
        ))
        .await;
    expect_err(
        admin_again,
        Code::AlreadyExists,
        "USER_PRINCIPAL_NAME_TAKEN",
    );
}

async fn only_global_and_user_administrators_create_users_and_only_global_grants_roles(
    backend: Backend,
) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (_, plain) = add_user(&mut client, &t, "jane", &[]).await;
    let (_, user_admin) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;
    let (_, billing) = add_user(&mut client, &t, "tricia", &[Role::BillingAdministrator]).await;

    for token in [&plain, &billing] {
        expect_err(
            client
                .create_user(authed(
                    create_user_req("x@contoso.onmicrosoft.com", &[]),
                    token,
                ))
                .await,
            Code::PermissionDenied,
            "USER_ADMINISTRATOR_REQUIRED",
        );
    }
    let made = client
        .create_user(authed(
            create_user_req("ua-made@contoso.onmicrosoft.com", &[]),
            &user_admin,
        ))
        .await
        .expect("user admin creates a plain user")
        .into_inner();
    assert!(made.roles.is_empty());
    expect_err(
        client
            .create_user(authed(
                create_user_req("x@contoso.onmicrosoft.com", &[Role::BillingAdministrator]),
                &user_admin,
            ))
            .await,
        Code::PermissionDenied,
        "GLOBAL_ADMINISTRATOR_REQUIRED",
    );
    let granted = client
        .create_user(authed(
            create_user_req(
                "x@contoso.onmicrosoft.com",
                &[
                    Role::ServiceAdministrator,
                    Role::BillingAdministrator,
                    Role::BillingAdministrator,
                ],
            ),
            &t.token,
        ))
        .await
        .expect("global admin grants roles")
        .into_inner();
    assert_eq!(
        granted.roles,
        vec![
            Role::BillingAdministrator as i32,
            Role::ServiceAdministrator as i32
        ]
    );
}

/// Names in scripts that need the zero-width non-joiner (Persian) and emoji joined by the
/// zero-width joiner are stored and read back as sent; only characters that reorder or hide
/// text are refused.
async fn display_names_keep_joiners_and_refuse_reordering(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let create = |upn: &str, display_name: &str| {
        authed(
            pb::CreateUserRequest {
                user_principal_name: format!("{upn}@{}", t.domain),
                display_name: display_name.to_owned(),
                password: PASSWORD.to_owned(),
                roles: vec![],
            },
            &t.token,
        )
    };
    for (upn, name) in [
        (
            "maryam",
            "\u{645}\u{631}\u{6CC}\u{645} \u{645}\u{6CC}\u{200C}\u{62E}\u{648}\u{627}\u{647}",
        ),
        ("dev", "Dev \u{1F469}\u{200D}\u{1F4BB}"),
    ] {
        let user = client
            .create_user(create(upn, name))
            .await
            .unwrap_or_else(|e| panic!("{upn}: {e:?}"))
            .into_inner();
        assert_eq!(user.display_name, name);
    }
    let status = expect_err(
        client
            .create_user(create("bob", "Bob\u{202E}gnp.exe"))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["display_name"]);
}

async fn get_user_by_id_and_upn_within_the_directory(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;

    use pb::get_user_request::Lookup;
    let by_id = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserId(t.admin.id.clone())),
            },
            &jane_token,
        ))
        .await
        .expect("by id")
        .into_inner();
    assert_eq!(by_id, t.admin);
    let by_upn = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserPrincipalName(
                    "JANE@CONTOSO.ONMICROSOFT.COM".into(),
                )),
            },
            &t.token,
        ))
        .await
        .expect("by upn")
        .into_inner();
    assert_eq!(by_upn, jane);

    let status = expect_err(
        client
            .get_user(authed(pb::GetUserRequest { lookup: None }, &t.token))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["lookup"]);
    let status = expect_err(
        client
            .get_user(authed(
                pb::GetUserRequest {
                    lookup: Some(Lookup::UserId("not-a-uuid".into())),
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["user_id"]);
}

async fn ids_of_another_directory_answer_exactly_like_missing_ids(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let contoso = sign_up(&mut client, "contoso").await;
    let fabrikam = sign_up(&mut client, "fabrikam").await;
    let (fab_user, _) = add_user(&mut client, &fabrikam, "bob", &[]).await;
    let missing = uuid::Uuid::new_v4().to_string();

    use pb::get_user_request::Lookup;
    let compare = |a: tonic::Status, b: tonic::Status| {
        assert_eq!(a.code(), Code::NotFound);
        assert_eq!(a.code(), b.code());
        assert_eq!(a.message(), b.message());
        assert_eq!(details(&a), details(&b));
    };

    let foreign = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserId(fab_user.id.clone())),
            },
            &contoso.token,
        ))
        .await
        .expect_err("foreign user");
    let absent = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserId(missing.clone())),
            },
            &contoso.token,
        ))
        .await
        .expect_err("missing user");
    compare(foreign, absent);

    let foreign = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserPrincipalName(
                    fab_user.user_principal_name.clone(),
                )),
            },
            &contoso.token,
        ))
        .await
        .expect_err("foreign upn");
    let absent = client
        .get_user(authed(
            pb::GetUserRequest {
                lookup: Some(Lookup::UserPrincipalName(
                    "nobody@fabrikam.onmicrosoft.com".into(),
                )),
            },
            &contoso.token,
        ))
        .await
        .expect_err("missing upn");
    compare(foreign, absent);

    let foreign = client
        .get_directory(authed(
            pb::GetDirectoryRequest {
                directory_id: fabrikam.directory.id.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect_err("foreign directory");
    let absent = client
        .get_directory(authed(
            pb::GetDirectoryRequest {
                directory_id: missing.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect_err("missing directory");
    compare(foreign, absent);

    let foreign = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: fab_user.id.clone(),
                roles: vec![],
            },
            &contoso.token,
        ))
        .await
        .expect_err("foreign set roles");
    let absent = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: missing.clone(),
                roles: vec![],
            },
            &contoso.token,
        ))
        .await
        .expect_err("missing set roles");
    compare(foreign, absent);

    let foreign = client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: fab_user.id.clone(),
            },
            &contoso.token,
        ))
        .await
        .expect_err("foreign delete");
    let absent = client
        .delete_user(authed(
            pb::DeleteUserRequest { user_id: missing },
            &contoso.token,
        ))
        .await
        .expect_err("missing delete");
    compare(foreign, absent);

    // The foreign user is untouched, and the lists never cross.
    let upns = all_upns(&mut client, &contoso.token).await;
    assert_eq!(upns, vec![contoso.admin.user_principal_name.clone()]);
    let upns = all_upns(&mut client, &fabrikam.token).await;
    assert!(upns.contains(&fab_user.user_principal_name));
}

async fn paging_ten_users_by_three_gives_four_pages_with_each_user_once(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    for i in 0..9 {
        let roles: &[Role] = if i % 3 == 0 {
            &[Role::BillingAdministrator]
        } else {
            &[]
        };
        client
            .create_user(authed(
                create_user_req(&format!("User{i:02}@contoso.onmicrosoft.com"), roles),
                &t.token,
            ))
            .await
            .expect("create");
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_users(authed(
                pb::ListUsersRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    role: 0,
                },
                &t.token,
            ))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 3);
        seen.extend(page.users.into_iter().map(|u| u.user_principal_name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 4);
    assert_eq!(seen.len(), 10);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        10,
        "each user once"
    );
    let mut sorted = seen.clone();
    sorted.sort_by_key(|u| u.to_lowercase());
    assert_eq!(seen, sorted, "ordered by UPN");

    // The role filter.
    let billing = client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 0,
                page_token: String::new(),
                role: Role::BillingAdministrator as i32,
            },
            &t.token,
        ))
        .await
        .expect("filtered")
        .into_inner();
    assert_eq!(billing.users.len(), 3);
    assert!(
        billing
            .users
            .iter()
            .all(|u| u.roles == vec![Role::BillingAdministrator as i32])
    );

    // A token used with another filter, tampered, or from another directory.
    let first = client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 2,
                ..Default::default()
            },
            &t.token,
        ))
        .await
        .expect("first page")
        .into_inner();
    let token = first.next_page_token;
    let status = expect_err(
        client
            .list_users(authed(
                pb::ListUsersRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    role: Role::GlobalAdministrator as i32,
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_eq!(details(&status).2, vec!["page_token"]);
    let mut tampered = token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for bad in [tampered.as_str(), "garbage", "x.y"] {
        expect_err(
            client
                .list_users(authed(
                    pb::ListUsersRequest {
                        page_size: 2,
                        page_token: bad.into(),
                        role: 0,
                    },
                    &t.token,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
    let other = sign_up(&mut client, "fabrikam").await;
    expect_err(
        client
            .list_users(authed(
                pb::ListUsersRequest {
                    page_size: 2,
                    page_token: token,
                    role: 0,
                },
                &other.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );

    // Page sizes: negative refused, huge clamped, unknown role filter refused.
    let status = expect_err(
        client
            .list_users(authed(
                pb::ListUsersRequest {
                    page_size: -1,
                    ..Default::default()
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["page_size"]);
    let all = client
        .list_users(authed(
            pb::ListUsersRequest {
                page_size: 1_000_000,
                ..Default::default()
            },
            &t.token,
        ))
        .await
        .expect("clamped")
        .into_inner();
    assert_eq!(all.users.len(), 10);
    let status = expect_err(
        client
            .list_users(authed(
                pb::ListUsersRequest {
                    role: 42,
                    ..Default::default()
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["role"]);
}

async fn default_page_size_is_fifty(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    for i in 0..55 {
        client
            .create_user(authed(
                create_user_req(&format!("u{i}@contoso.onmicrosoft.com"), &[]),
                &t.token,
            ))
            .await
            .expect("create");
    }
    let page = client
        .list_users(authed(pb::ListUsersRequest::default(), &t.token))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.users.len(), 50);
    assert!(!page.next_page_token.is_empty());
}

async fn set_user_roles_rules(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;
    let (_, ua_token) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;

    for token in [&jane_token, &ua_token] {
        expect_err(
            client
                .set_user_roles(authed(
                    pb::SetUserRolesRequest {
                        user_id: jane.id.clone(),
                        roles: vec![Role::BillingAdministrator as i32],
                    },
                    token,
                ))
                .await,
            Code::PermissionDenied,
            "GLOBAL_ADMINISTRATOR_REQUIRED",
        );
    }

    let updated = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: jane.id.clone(),
                roles: vec![
                    Role::GlobalAdministrator as i32,
                    Role::BillingAdministrator as i32,
                ],
            },
            &t.token,
        ))
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(
        updated.roles,
        vec![
            Role::GlobalAdministrator as i32,
            Role::BillingAdministrator as i32
        ]
    );

    // Replaces the set.
    let updated = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: jane.id.clone(),
                roles: vec![Role::BillingAdministrator as i32],
            },
            &t.token,
        ))
        .await
        .expect("replace")
        .into_inner();
    assert_eq!(updated.roles, vec![Role::BillingAdministrator as i32]);

    // A Global Administrator cannot drop the role from themself, even with another one around.
    client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: jane.id.clone(),
                roles: vec![Role::GlobalAdministrator as i32],
            },
            &t.token,
        ))
        .await
        .expect("second global admin");
    expect_err(
        client
            .set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: t.admin.id.clone(),
                    roles: vec![Role::BillingAdministrator as i32],
                },
                &t.token,
            ))
            .await,
        Code::FailedPrecondition,
        "SELF_DEMOTION",
    );
    // But another Global Administrator may remove it, while one remains.
    let demoted = client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: t.admin.id.clone(),
                roles: vec![],
            },
            &jane_token,
        ))
        .await
        .expect("jane demotes the admin")
        .into_inner();
    assert!(demoted.roles.is_empty());
    // The demoted admin's next call is refused: roles are read as stored now.
    expect_err(
        client
            .set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: jane.id.clone(),
                    roles: vec![],
                },
                &t.token,
            ))
            .await,
        Code::PermissionDenied,
        "GLOBAL_ADMINISTRATOR_REQUIRED",
    );

    let status = expect_err(
        client
            .set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: jane.id.clone(),
                    roles: vec![0],
                },
                &jane_token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["roles[0]"]);
}

async fn delete_user_rules_and_deleted_tokens_stop_working(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;
    let (tricia, _) = add_user(&mut client, &t, "tricia", &[Role::BillingAdministrator]).await;
    let (_, ua_token) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;

    expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: tricia.id.clone(),
                },
                &jane_token,
            ))
            .await,
        Code::PermissionDenied,
        "USER_ADMINISTRATOR_REQUIRED",
    );
    expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: tricia.id.clone(),
                },
                &ua_token,
            ))
            .await,
        Code::PermissionDenied,
        "TARGET_HOLDS_ROLES",
    );
    expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: t.admin.id.clone(),
                },
                &ua_token,
            ))
            .await,
        Code::PermissionDenied,
        "TARGET_HOLDS_ROLES",
    );

    assert!(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &jane_token))
            .await
            .is_ok()
    );
    client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: jane.id.clone(),
            },
            &ua_token,
        ))
        .await
        .expect("user admin deletes a plain user");
    expect_err(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &jane_token))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
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
    // Gone for everyone, and deleting again is NOT_FOUND.
    expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: jane.id.clone(),
                },
                &t.token,
            ))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // A re-created user with the same UPN is a new user; the old token stays dead.
    add_user(&mut client, &t, "jane", &[]).await;
    expect_err(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &jane_token))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );

    // The last Global Administrator cannot be deleted, not even by themself.
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
    assert!(
        client
            .who_am_i(authed(pb::WhoAmIRequest {}, &t.token))
            .await
            .is_ok()
    );
    // With a second one, the global admin may delete a role holder.
    client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: tricia.id.clone(),
            },
            &t.token,
        ))
        .await
        .expect("global admin deletes a role holder");
    let status = expect_err(
        client
            .delete_user(authed(
                pb::DeleteUserRequest {
                    user_id: "x".into(),
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["user_id"]);
}

async fn concurrent_demotions_never_leave_a_directory_without_a_global_administrator(
    backend: Backend,
) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (b, b_token) = add_user(&mut client, &t, "bea", &[Role::GlobalAdministrator]).await;
    // Each deletes the other at the same time: at most one can succeed.
    let mut c1 = client.clone();
    let mut c2 = client.clone();
    let (r1, r2) = tokio::join!(
        c1.delete_user(authed(
            pb::DeleteUserRequest {
                user_id: b.id.clone()
            },
            &t.token
        )),
        c2.delete_user(authed(
            pb::DeleteUserRequest {
                user_id: t.admin.id.clone()
            },
            &b_token
        )),
    );
    assert!(
        r1.is_ok() != r2.is_ok() || (r1.is_err() && r2.is_err()),
        "{r1:?} {r2:?}"
    );
    let survivor = if r1.is_ok() { &t.token } else { &b_token };
    let admins = client
        .list_users(authed(
            pb::ListUsersRequest {
                role: Role::GlobalAdministrator as i32,
                ..Default::default()
            },
            survivor,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(admins.users.len(), 1);
}

async fn authorize_decides_from_roles_as_stored_now(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;
    let (tricia, tricia_token) =
        add_user(&mut client, &t, "tricia", &[Role::BillingAdministrator]).await;
    let (_, uma_token) = add_user(&mut client, &t, "uma", &[Role::UserAdministrator]).await;

    use pb::Action::*;
    let matrix = [
        (&t.token, [true, true, true, true]),
        (&tricia_token, [true, true, true, false]),
        (&uma_token, [false, false, true, true]),
        (&jane_token, [false, false, true, false]),
    ];
    for (token, expected) in matrix {
        for (action, allowed) in [
            PurchaseSubscription,
            ManageSubscriptions,
            ReadSubscriptions,
            ManageUsers,
        ]
        .into_iter()
        .zip(expected)
        {
            let answer = client
                .authorize(authed(
                    pb::AuthorizeRequest {
                        action: action as i32,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .expect("authorize")
                .into_inner();
            assert_eq!(answer.allowed, allowed, "{action:?} {answer:?}");
            assert_eq!(answer.directory_id, t.directory.id);
            assert!(!answer.reason.is_empty());
        }
    }
    let answer = client
        .authorize(authed(
            pb::AuthorizeRequest {
                action: PurchaseSubscription as i32,
                ..Default::default()
            },
            &jane_token,
        ))
        .await
        .expect("authorize")
        .into_inner();
    assert_eq!(answer.user_id, jane.id);
    assert!(answer.roles.is_empty());

    // Revoking Tricia's role takes effect on her next call with the same token.
    client
        .set_user_roles(authed(
            pb::SetUserRolesRequest {
                user_id: tricia.id.clone(),
                roles: vec![],
            },
            &t.token,
        ))
        .await
        .expect("revoke");
    let answer = client
        .authorize(authed(
            pb::AuthorizeRequest {
                action: PurchaseSubscription as i32,
                ..Default::default()
            },
            &tricia_token,
        ))
        .await
        .expect("authorize")
        .into_inner();
    assert!(!answer.allowed);
    assert!(answer.roles.is_empty());

    for action in [0, 77] {
        let status = expect_err(
            client
                .authorize(authed(
                    pb::AuthorizeRequest {
                        action,
                        ..Default::default()
                    },
                    &t.token,
                ))
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(details(&status).2, vec!["action"]);
    }
}

/// Authorize's subject: whether a user is an active user of the caller's directory, answered
/// the same way for a deleted user, a user of another directory and an unknown id; and who
/// may read every licence assignment.
async fn authorize_tells_whether_its_subject_is_an_active_user(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let other = sign_up(&mut client, "fabrikam").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;
    let (tricia, _) = add_user(&mut client, &t, "tricia", &[]).await;
    client
        .delete_user(authed(
            pb::DeleteUserRequest {
                user_id: tricia.id.clone(),
            },
            &t.token,
        ))
        .await
        .expect("delete Tricia");
    let asker = client.clone();
    let ask = async |token: &str, action: pb::Action, subject: &str| {
        asker
            .clone()
            .authorize(authed(
                pb::AuthorizeRequest {
                    action: action as i32,
                    subject_user_id: subject.to_owned(),
                },
                token,
            ))
            .await
    };
    for (subject, active) in [
        (jane.id.as_str(), true),
        (t.admin.id.as_str(), true),
        (tricia.id.as_str(), false),
        (other.admin.id.as_str(), false),
        ("00000000-0000-4000-8000-000000000000", false),
        ("", false),
    ] {
        let answer = ask(&t.token, pb::Action::ManageLicenses, subject)
            .await
            .expect("authorize")
            .into_inner();
        assert_eq!(answer.subject_active, active, "{subject:?}");
        assert!(answer.allowed);
        // A caller refused the action gets the same answer about the subject.
        let answer = ask(&jane_token, pb::Action::ManageLicenses, subject)
            .await
            .expect("authorize")
            .into_inner();
        assert_eq!(answer.subject_active, active, "{subject:?}");
        assert!(!answer.allowed);
    }
    let status = expect_err(
        ask(&t.token, pb::Action::ManageLicenses, "jane").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["subject_user_id".to_owned()]);
    let (_, billing_token) = add_user(&mut client, &t, "bill", &[Role::BillingAdministrator]).await;
    let (_, license_token) = add_user(&mut client, &t, "lisa", &[Role::LicenseAdministrator]).await;
    for (token, reads, manages) in [
        (&t.token, true, true),
        (&billing_token, true, false),
        (&license_token, true, true),
        (&jane_token, false, false),
    ] {
        for (action, allowed) in [
            (pb::Action::ReadLicenses, reads),
            (pb::Action::ManageLicenses, manages),
        ] {
            let answer = ask(token, action, "")
                .await
                .expect("authorize")
                .into_inner();
            assert_eq!(answer.allowed, allowed, "{action:?} {answer:?}");
        }
    }
}

async fn a_restart_keeps_directories_users_and_valid_tokens(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let (jane, jane_token) = add_user(&mut client, &t, "jane", &[]).await;
    server.stop().await;

    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let me = client
        .who_am_i(authed(pb::WhoAmIRequest {}, &jane_token))
        .await
        .expect("the token issued before the restart still works")
        .into_inner();
    assert_eq!(me.user.expect("user"), jane);
    assert_eq!(me.directory.expect("directory"), t.directory);
    sign_in(&mut client, &jane.user_principal_name, PASSWORD).await;
    assert_eq!(all_upns(&mut client, &t.token).await.len(), 2);
}

async fn health_and_reflection_are_served(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "directory.v1.DirectoryService"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }

    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            )),
        },
    ]);
    let mut answers = reflection
        .server_reflection_info(requests)
        .await
        .expect("reflection")
        .into_inner();
    let first = answers.message().await.expect("stream").expect("answer");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"directory.v1.DirectoryService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    let second = answers.message().await.expect("stream").expect("answer");
    assert!(
        matches!(
            second.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "google.rpc.BadRequest is resolvable: {second:?}"
    );
}

async fn request_ids_are_echoed_or_generated(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let mut request = tonic::Request::new(pb::SignInRequest {
        user_principal_name: "a@b.c".into(),
        password: "x".into(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-123".parse().expect("ascii"));
    let status = client.sign_in(request).await.expect_err("bad credentials");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-123")
    );
    let answer = client
        .create_directory(pb::CreateDirectoryRequest::default())
        .await
        .expect_err("invalid");
    let generated = answer
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated:?}");
}

async fn password_rules_at_their_boundaries(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    let cases = [
        ("Abcdef1!", true),  // 8 characters, four classes
        ("Abcde1!", false),  // 7
        ("abcdefg1", false), // two classes
        ("abcdefg!1", true), // lower, symbol, digit
        ("ABCDEFG!a", true), // upper, symbol, lower
        ("Abcdefgh", false), // two classes
        ("Abcdefg٣", true),  // a non-ASCII digit counts as a digit
        ("abc defG", true),  // a space is a symbol
    ];
    for (i, (password, ok)) in cases.into_iter().enumerate() {
        let result = client
            .create_user(authed(
                pb::CreateUserRequest {
                    password: password.into(),
                    ..create_user_req(&format!("p{i}@contoso.onmicrosoft.com"), &[])
                },
                &t.token,
            ))
            .await;
        assert_eq!(result.is_ok(), ok, "{password:?}: {result:?}");
        if let Err(status) = result {
            assert_eq!(details(&status).2, vec!["password"]);
            assert!(!format!("{status:?}").contains(password), "never echoed");
        }
    }
    let long_ok = format!("Aa1{}", "x".repeat(253));
    let long_bad = format!("Aa1{}", "x".repeat(254));
    for (password, ok) in [(long_ok, true), (long_bad, false)] {
        let result = client
            .create_user(authed(
                pb::CreateUserRequest {
                    password: password.clone(),
                    ..create_user_req(
                        &format!("len{}@contoso.onmicrosoft.com", password.len()),
                        &[],
                    )
                },
                &t.token,
            ))
            .await;
        assert_eq!(result.is_ok(), ok, "length {}", password.chars().count());
    }
}

async fn upn_length_and_id_rules_through_the_api(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    // A 24-character domain: contosocontosocontoso1.onmicrosoft.com is 38; local parts up to
    // 64 fit under 113 in total, so probe the total with the longest allowed prefix.
    let prefix = "c".repeat(32); // 32 + ".onmicrosoft.com" (16) = 48, the longest domain
    let t = sign_up(&mut client, &prefix).await;
    let domain = t.domain.clone();
    assert_eq!(domain.len(), 48);
    let local = "a".repeat(64); // 64 + 1 + 48 = 113: the longest UPN
    let ok = client
        .create_user(authed(
            create_user_req(&format!("{local}@{domain}"), &[]),
            &t.token,
        ))
        .await
        .expect("113 characters")
        .into_inner();
    assert_eq!(ok.user_principal_name.len(), 113);
    let status = expect_err(
        client
            .create_user(authed(
                create_user_req(&format!("{local}a@{domain}"), &[]),
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["user_principal_name"]);

    let status = expect_err(
        client
            .get_directory(authed(
                pb::GetDirectoryRequest {
                    directory_id: "nope".into(),
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["directory_id"]);

    // A role list of absurd length is one violation, not thousands.
    let status = expect_err(
        client
            .set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: t.admin.id.clone(),
                    roles: vec![1; 5000],
                },
                &t.token,
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(details(&status).2, vec!["roles"]);
}

async fn every_authenticated_rpc_needs_a_token(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut c = server.client().await;
    let t = sign_up(&mut c, "contoso").await;
    let id = t.admin.id.clone();
    let results = vec![
        c.who_am_i(pb::WhoAmIRequest {}).await.map(|_| ()),
        c.get_directory(pb::GetDirectoryRequest {
            directory_id: t.directory.id.clone(),
        })
        .await
        .map(|_| ()),
        c.create_user(create_user_req("x@contoso.onmicrosoft.com", &[]))
            .await
            .map(|_| ()),
        c.get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::UserId(id.clone())),
        })
        .await
        .map(|_| ()),
        c.list_users(pb::ListUsersRequest::default())
            .await
            .map(|_| ()),
        c.set_user_roles(pb::SetUserRolesRequest {
            user_id: id.clone(),
            roles: vec![],
        })
        .await
        .map(|_| ()),
        c.delete_user(pb::DeleteUserRequest {
            user_id: id.clone(),
        })
        .await
        .map(|_| ()),
        c.list_deleted_users(pb::ListDeletedUsersRequest::default())
            .await
            .map(|_| ()),
        c.restore_user(pb::RestoreUserRequest {
            user_id: id.clone(),
            new_user_principal_name: String::new(),
        })
        .await
        .map(|_| ()),
        c.purge_user(pb::PurgeUserRequest {
            user_id: id.clone(),
        })
        .await
        .map(|_| ()),
        c.authorize(pb::AuthorizeRequest {
            action: 1,
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for result in results {
        let status = result.expect_err("needs a token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(details(&status).0, "MISSING_TOKEN");
    }
    // A bad token wins over bad fields: authentication comes first.
    expect_err(
        c.create_user(authed(create_user_req("not a upn", &[]), "bad.token.here"))
            .await,
        Code::Unauthenticated,
        "INVALID_TOKEN",
    );
    // Nothing was changed by the refused calls.
    assert_eq!(all_upns(&mut c, &t.token).await.len(), 1);
}

async fn mutual_demotion_leaves_exactly_one_global_administrator(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut client = server.client().await;
    let t = sign_up(&mut client, "contoso").await;
    for round in 0..10 {
        let (b, b_token) = add_user(
            &mut client,
            &t,
            &format!("bea{round}"),
            &[Role::GlobalAdministrator],
        )
        .await;
        // The admin (a survivor of earlier rounds) and Bea demote each other at the same time.
        let admins = client
            .list_users(authed(
                pb::ListUsersRequest {
                    role: Role::GlobalAdministrator as i32,
                    ..Default::default()
                },
                &t.token,
            ))
            .await
            .ok()
            .map(|r| r.into_inner().users);
        let (a_id, a_token) = match admins {
            Some(users) if users.iter().any(|u| u.id == t.admin.id) => {
                (t.admin.id.clone(), t.token.clone())
            }
            _ => break,
        };
        let mut c1 = client.clone();
        let mut c2 = client.clone();
        let (r1, r2) = tokio::join!(
            c1.set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: b.id.clone(),
                    roles: vec![]
                },
                &a_token
            )),
            c2.set_user_roles(authed(
                pb::SetUserRolesRequest {
                    user_id: a_id.clone(),
                    roles: vec![]
                },
                &b_token
            )),
        );
        assert!(
            r1.is_ok() != r2.is_ok(),
            "exactly one demotion wins: {r1:?} {r2:?}"
        );
        let admin_won = r1.is_ok();
        let loser = r1.err().or(r2.err()).expect("one failed");
        // The loser is no longer a Global Administrator when its write is decided.
        assert_eq!(loser.code(), Code::PermissionDenied, "{loser:?}");
        let survivor = if admin_won {
            a_token.clone()
        } else {
            b_token.clone()
        };
        let admins = client
            .list_users(authed(
                pb::ListUsersRequest {
                    role: Role::GlobalAdministrator as i32,
                    ..Default::default()
                },
                &survivor,
            ))
            .await
            .expect("list")
            .into_inner()
            .users;
        assert_eq!(admins.len(), 1, "round {round}: {admins:?}");
        if admins[0].id != t.admin.id {
            break;
        }
    }
}

async fn listen_accepts_host_names(backend: Backend) {
    let db = db_or_skip!(backend);
    let mut config = directory_config(&db);
    config.listen = "localhost:0".into();
    let server = DirectoryServer::start_with(config).await;
    assert!(server.addr.ip().is_loopback());
    let mut client = server.client().await;
    sign_up(&mut client, "contoso").await;
}

on_both_backends!(
    display_names_keep_joiners_and_refuse_reordering,
    sign_up_creates_the_directory_and_its_global_administrator,
    a_taken_prefix_in_any_letter_case_is_already_exists,
    concurrent_sign_ups_for_one_prefix_have_exactly_one_winner,
    sign_up_validates_every_field_and_names_each_bad_one,
    unknown_user_and_wrong_password_are_indistinguishable,
    calls_without_a_valid_token_are_unauthenticated,
    create_user_validates_fields_and_writes_nothing_when_refused,
    a_upn_taken_in_another_letter_case_is_already_exists,
    only_global_and_user_administrators_create_users_and_only_global_grants_roles,
    get_user_by_id_and_upn_within_the_directory,
    ids_of_another_directory_answer_exactly_like_missing_ids,
    paging_ten_users_by_three_gives_four_pages_with_each_user_once,
    default_page_size_is_fifty,
    set_user_roles_rules,
    delete_user_rules_and_deleted_tokens_stop_working,
    concurrent_demotions_never_leave_a_directory_without_a_global_administrator,
    authorize_decides_from_roles_as_stored_now,
    authorize_tells_whether_its_subject_is_an_active_user,
    a_restart_keeps_directories_users_and_valid_tokens,
    health_and_reflection_are_served,
    request_ids_are_echoed_or_generated,
    password_rules_at_their_boundaries,
    upn_length_and_id_rules_through_the_api,
    every_authenticated_rpc_needs_a_token,
    mutual_demotion_leaves_exactly_one_global_administrator,
    listen_accepts_host_names,
);
