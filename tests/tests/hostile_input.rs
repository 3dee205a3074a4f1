//! Hostile input against both services: every field rule of the contract broken one field at
//! a time, oversized repeated fields and messages, bytes that are not gRPC (or not even
//! HTTP/2), hand-made broken protobuf, and forged, expired and revoked tokens. Every bad
//! request is refused with the contract's status, writes nothing, never panics the server,
//! and the server keeps serving.

use std::net::SocketAddr;
use std::sync::{Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::platform::clock::ManualClock;
use integration_tests::*;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::{ErrorDetail, StatusExt as _};

type DirectoryClient = dpb::directory_service_client::DirectoryServiceClient<Channel>;
type Reply<T> = Result<tonic::Response<T>, Status>;

const DIRECTORY: &str = "directory-svc";
const BILLING: &str = "billing-svc";

// ---------------------------------------------------------------------------------------
// Panics inside the servers (they run in this process) are recorded here: a panic whose
// location is not test code is a server bug, even when tokio contains it to one connection.

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static WATCH: Once = Once::new();

fn watch_panics() {
    WATCH.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_tests && let Ok(mut panics) = PANICS.lock() {
                panics.push(info.to_string());
            }
            default(info);
        }));
    });
}

#[track_caller]
fn assert_no_server_panic() {
    let panics = PANICS.lock().map(|p| p.clone()).unwrap_or_default();
    assert!(panics.is_empty(), "a server panicked: {panics:#?}");
}

// ---------------------------------------------------------------------------------------
// The world: both services, two directories, a plain user and two subscriptions.

struct World {
    _ddb: TestDb,
    _bdb: TestDb,
    directory: DirectoryServer,
    billing: BillingServer,
    dir: DirectoryClient,
    bill: BillingServiceClient<Channel>,
    contoso: Tenant,
    fabrikam: Tenant,
    jane: dpb::User,
}

async fn world(backend: Backend) -> Option<World> {
    watch_panics();
    let ddb = TestDb::new(backend).await?;
    let bdb = TestDb::new(backend).await?;
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let contoso = sign_up(&mut dir, "contoso").await;
    let fabrikam = sign_up(&mut dir, "fabrikam").await;
    let (jane, _) = add_user(&mut dir, &contoso, "jane", &[]).await;
    add_user(&mut dir, &fabrikam, "bob", &[]).await;
    for tenant in [&contoso, &fabrikam] {
        for seats in [3, 4] {
            bill.create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    offer_id: "office365-e3".into(),
                    display_name: "Existing".into(),
                    seats,
                    request_id: String::new(),
                },
                &tenant.token,
            ))
            .await
            .expect("existing subscription");
        }
    }
    Some(World {
        _ddb: ddb,
        _bdb: bdb,
        directory,
        billing,
        dir,
        bill,
        contoso,
        fabrikam,
        jane,
    })
}

impl World {
    async fn users(&mut self, tenant: &Tenant) -> Vec<dpb::User> {
        let page = self
            .dir
            .list_users(authed(
                dpb::ListUsersRequest {
                    page_size: 1000,
                    ..Default::default()
                },
                &tenant.token,
            ))
            .await
            .expect("list users")
            .into_inner();
        assert!(page.next_page_token.is_empty());
        page.users
    }

    async fn subscriptions(&mut self, tenant: &Tenant) -> Vec<bpb::Subscription> {
        let page = self
            .bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: 1000,
                    page_token: String::new(),
                },
                &tenant.token,
            ))
            .await
            .expect("list subscriptions")
            .into_inner();
        assert!(page.next_page_token.is_empty());
        page.subscriptions
    }

    /// Everything both services store that a refused call could have touched.
    async fn snapshot(&mut self) -> Snapshot {
        let (contoso, fabrikam) = (clone_tenant(&self.contoso), clone_tenant(&self.fabrikam));
        Snapshot {
            users: [self.users(&contoso).await, self.users(&fabrikam).await],
            subscriptions: [
                self.subscriptions(&contoso).await,
                self.subscriptions(&fabrikam).await,
            ],
        }
    }

    /// A normal call to each service still succeeds.
    async fn still_serving(&mut self) {
        self.dir
            .who_am_i(authed(dpb::WhoAmIRequest {}, &self.contoso.token))
            .await
            .expect("directory-svc still serves");
        let offers = self
            .bill
            .list_offers(bpb::ListOffersRequest {})
            .await
            .expect("billing-svc still serves")
            .into_inner();
        assert_eq!(offers.offers.len(), 6);
        self.bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest::default(),
                &self.contoso.token,
            ))
            .await
            .expect("billing-svc still authorises through the directory");
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    users: [Vec<dpb::User>; 2],
    subscriptions: [Vec<bpb::Subscription>; 2],
}

fn clone_tenant(t: &Tenant) -> Tenant {
    Tenant {
        directory: t.directory.clone(),
        admin: t.admin.clone(),
        token: t.token.clone(),
        domain: t.domain.clone(),
    }
}

/// Asserts `result` is INVALID_ARGUMENT from `service` whose BadRequest names exactly
/// `field`, and that nothing in it echoes any of `secrets`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    case: &str,
    result: Reply<T>,
    field: &str,
    service: &str,
    secrets: &[&str],
) {
    let status = match result {
        Ok(answer) => panic!("{case}: accepted: {answer:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{case}: wrong code: {status:?}"
    );
    let (reason, domain, fields) = details(&status);
    assert_eq!(domain, service, "{case}: ErrorInfo.domain in {status:?}");
    assert!(
        !reason.is_empty()
            && reason
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
        "{case}: ErrorInfo.reason must be SCREAMING_SNAKE: {status:?}"
    );
    assert_eq!(
        fields,
        vec![field.to_owned()],
        "{case}: the BadRequest must name exactly the bad field: {status:?}"
    );
    let shown = format!("{status:?} {:?}", status.get_error_details());
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        assert!(
            !shown.contains(secret),
            "{case}: the answer echoes a secret: {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bad values, one list per contract rule.

fn bad_display_names() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("only spaces", "    ".into()),
        ("257 characters", "x".repeat(257)),
        (
            "257 characters inside spaces",
            format!("  {}  ", "é".repeat(257)),
        ),
        ("NUL", "a\0b".into()),
        ("BEL", "bell\u{7}".into()),
        ("ANSI escape", "red \u{1b}[31m".into()),
        ("newline", "two\nlines".into()),
        ("trailing CR LF", "name\r\n".into()),
        ("leading control", "\u{1}name".into()),
        ("tab", "a\tb".into()),
        ("DEL", "del\u{7f}".into()),
        ("C1 control", "next\u{85}line".into()),
        ("right-to-left override", "Bob\u{202E}gnp.exe".into()),
        ("zero-width space", "Bo\u{200B}b".into()),
    ]
}

/// UPNs that are not of the form the contract allows (whatever directory they name).
fn malformed_upns(domain: &str) -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("no @", "jane".into()),
        ("nothing before @", format!("@{domain}")),
        ("nothing after @", "jane@".into()),
        ("leading period", format!(".jane@{domain}")),
        ("trailing period", format!("jane.@{domain}")),
        ("space", format!("ja ne@{domain}")),
        ("double quote", format!("ja\"ne@{domain}")),
        ("comma", format!("ja,ne@{domain}")),
        ("parentheses", format!("ja(ne)@{domain}")),
        ("non-ASCII letter", format!("jané@{domain}")),
        ("two @", format!("ja@ne@{domain}")),
        ("NUL", format!("ja\0ne@{domain}")),
        ("trailing newline", format!("jane@{domain}\n")),
        (
            "65-character local part",
            format!("{}@{domain}", "a".repeat(65)),
        ),
        (
            "49-character domain",
            format!("jane@{}.onmicrosoft.com", "d".repeat(33)),
        ),
        (
            "114 characters",
            format!("{}@{}.onmicrosoft.com", "a".repeat(64), "d".repeat(33)),
        ),
        ("1,000 characters", format!("{}@{domain}", "a".repeat(990))),
    ]
}

fn bad_passwords() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("7 characters", "Ab1!xyz".into()),
        ("257 characters", format!("Aa1!{}", "x".repeat(253))),
        ("lower case only", "alllowercase".into()),
        ("lower case and digits", "lowercase123".into()),
        ("upper case and symbols", "UPPER-CASE!!".into()),
        ("digits and symbols", "12345678!!".into()),
        ("lower and upper case", "PasswordPassword".into()),
    ]
}

fn bad_domain_prefixes() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("1 character", "a".into()),
        ("33 characters", "z".repeat(33)),
        ("hyphen", "con-toso".into()),
        ("period", "contoso.com".into()),
        ("underscore", "contoso_1".into()),
        ("space", "con toso".into()),
        ("leading space", " contoso".into()),
        ("non-ASCII letter", "cöntoso".into()),
        ("full-width letters", "ｃｏｎｔｏｓｏ".into()),
        ("NUL", "contoso\0".into()),
    ]
}

fn bad_user_names() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("leading period", ".kelley".into()),
        ("trailing period", "kelley.".into()),
        ("space", "kel ley".into()),
        ("@", "kel@ley".into()),
        ("non-ASCII letter", "kelléy".into()),
        ("double quote", "kel\"ley".into()),
        ("65 characters", "k".repeat(65)),
    ]
}

fn bad_ids() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("a word", "not-a-uuid".into()),
        (
            "UUID without hyphens",
            "123e4567e89b12d3a456426614174000".into(),
        ),
        (
            "UUID in braces",
            "{123e4567-e89b-12d3-a456-426614174000}".into(),
        ),
        (
            "UUID URN",
            "urn:uuid:123e4567-e89b-12d3-a456-426614174000".into(),
        ),
        (
            "leading space",
            " 123e4567-e89b-12d3-a456-426614174000".into(),
        ),
        (
            "trailing newline",
            "123e4567-e89b-12d3-a456-426614174000\n".into(),
        ),
        (
            "not hexadecimal",
            "123e4567-e89b-12d3-a456-42661417400g".into(),
        ),
        (
            "one digit too many",
            "123e4567-e89b-12d3-a456-4266141740000".into(),
        ),
        ("SQL", "' OR '1'='1".into()),
        ("path", "../../etc/passwd".into()),
        ("10,000 characters", "9".repeat(10_000)),
    ]
}

/// Role lists with one bad entry, and the path of that entry.
fn bad_role_lists() -> Vec<(&'static str, Vec<i32>, &'static str)> {
    vec![
        ("ROLE_UNSPECIFIED", vec![0], "roles[0]"),
        ("unknown number", vec![99], "roles[0]"),
        ("negative number", vec![-1], "roles[0]"),
        ("i32::MAX", vec![i32::MAX], "roles[0]"),
        ("ROLE_UNSPECIFIED after a role", vec![2, 0], "roles[1]"),
        ("unknown after roles", vec![1, 3, 7], "roles[2]"),
    ]
}

/// Flips one character in the middle of `token`.
fn tamper(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii token")
}

/// The next_page_token of the caller's first page of one user.
async fn users_page_token(dir: &mut DirectoryClient, token: &str) -> String {
    let next = dir
        .list_users(authed(
            dpb::ListUsersRequest {
                page_size: 1,
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("first page of users")
        .into_inner()
        .next_page_token;
    assert!(!next.is_empty(), "a second page of users exists");
    next
}

/// The next_page_token of the caller's first page of one subscription.
async fn subscriptions_page_token(bill: &mut BillingServiceClient<Channel>, token: &str) -> String {
    let next = bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest {
                page_size: 1,
                page_token: String::new(),
            },
            token,
        ))
        .await
        .expect("first page of subscriptions")
        .into_inner()
        .next_page_token;
    assert!(!next.is_empty(), "a second page of subscriptions exists");
    next
}

// ---------------------------------------------------------------------------------------
// directory-svc: every RPC, every field rule.

async fn directory_refuses_every_bad_field_and_writes_nothing(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let before = w.snapshot().await;
    let token = w.contoso.token.clone();
    let domain = w.contoso.domain.clone();

    // CreateDirectory: each field bad in turn; the others are good and name a fresh prefix,
    // which must still be free afterwards.
    let mut fresh_prefixes = Vec::new();
    let mut sign_up_req = |n: usize| {
        let prefix = format!("hostile{n}");
        fresh_prefixes.push(prefix.clone());
        dpb::CreateDirectoryRequest {
            display_name: "Hostile".into(),
            domain_prefix: prefix,
            admin_user_name: "admin".into(),
            admin_display_name: "Admin".into(),
            admin_password: PASSWORD.into(),
        }
    };
    let mut n = 0;
    let mut cases: Vec<(String, dpb::CreateDirectoryRequest, &str)> = Vec::new();
    for (label, bad) in bad_display_names() {
        n += 1;
        cases.push((
            format!("CreateDirectory display_name {label}"),
            dpb::CreateDirectoryRequest {
                display_name: bad.clone(),
                ..sign_up_req(n)
            },
            "display_name",
        ));
        n += 1;
        cases.push((
            format!("CreateDirectory admin_display_name {label}"),
            dpb::CreateDirectoryRequest {
                admin_display_name: bad,
                ..sign_up_req(n)
            },
            "admin_display_name",
        ));
    }
    for (label, bad) in bad_domain_prefixes() {
        n += 1;
        let mut request = sign_up_req(n);
        request.domain_prefix = bad;
        cases.push((
            format!("CreateDirectory domain_prefix {label}"),
            request,
            "domain_prefix",
        ));
    }
    for (label, bad) in bad_user_names() {
        n += 1;
        cases.push((
            format!("CreateDirectory admin_user_name {label}"),
            dpb::CreateDirectoryRequest {
                admin_user_name: bad,
                ..sign_up_req(n)
            },
            "admin_user_name",
        ));
    }
    for (label, bad) in bad_passwords() {
        n += 1;
        cases.push((
            format!("CreateDirectory admin_password {label}"),
            dpb::CreateDirectoryRequest {
                admin_password: bad,
                ..sign_up_req(n)
            },
            "admin_password",
        ));
    }
    for (case, request, field) in cases {
        let secret = request.admin_password.clone();
        let result = w.dir.create_directory(request).await;
        assert_invalid(&case, result, field, DIRECTORY, &[&secret]);
    }

    // SignIn checks the shape of the UPN and the password's length.
    for (label, bad) in malformed_upns(&domain) {
        let result = w
            .dir
            .sign_in(dpb::SignInRequest {
                user_principal_name: bad,
                password: PASSWORD.into(),
            })
            .await;
        assert_invalid(
            &format!("SignIn user_principal_name {label}"),
            result,
            "user_principal_name",
            DIRECTORY,
            &[PASSWORD],
        );
    }
    for (label, bad) in [
        ("empty", String::new()),
        ("257 characters", format!("Aa1!{}", "x".repeat(253))),
    ] {
        let result = w
            .dir
            .sign_in(dpb::SignInRequest {
                user_principal_name: w.contoso.admin.user_principal_name.clone(),
                password: bad.clone(),
            })
            .await;
        assert_invalid(
            &format!("SignIn password {label}"),
            result,
            "password",
            DIRECTORY,
            &[&bad],
        );
    }

    // GetDirectory.
    for (label, bad) in bad_ids() {
        let result = w
            .dir
            .get_directory(authed(
                dpb::GetDirectoryRequest { directory_id: bad },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("GetDirectory directory_id {label}"),
            result,
            "directory_id",
            DIRECTORY,
            &[],
        );
    }

    // CreateUser: every field.
    let user = |upn: String| dpb::CreateUserRequest {
        user_principal_name: upn,
        display_name: "Hostile".into(),
        password: PASSWORD.into(),
        roles: vec![],
    };
    let good_upn = format!("hostile@{domain}");
    let mut cases: Vec<(String, dpb::CreateUserRequest, &str)> = Vec::new();
    let mut upns = malformed_upns(&domain);
    upns.push((
        "another directory's domain",
        format!("hostile@{}", w.fabrikam.domain),
    ));
    upns.push(("a domain of no directory", "hostile@example.com".into()));
    upns.push(("a bare prefix as domain", "hostile@contoso".into()));
    for (label, bad) in upns {
        cases.push((
            format!("CreateUser user_principal_name {label}"),
            user(bad),
            "user_principal_name",
        ));
    }
    for (label, bad) in bad_display_names() {
        cases.push((
            format!("CreateUser display_name {label}"),
            dpb::CreateUserRequest {
                display_name: bad,
                ..user(good_upn.clone())
            },
            "display_name",
        ));
    }
    for (label, bad) in bad_passwords() {
        cases.push((
            format!("CreateUser password {label}"),
            dpb::CreateUserRequest {
                password: bad,
                ..user(good_upn.clone())
            },
            "password",
        ));
    }
    for (label, roles, field) in bad_role_lists() {
        cases.push((
            format!("CreateUser roles {label}"),
            dpb::CreateUserRequest {
                roles,
                ..user(good_upn.clone())
            },
            field,
        ));
    }
    for (case, request, field) in cases {
        let secret = request.password.clone();
        let result = w.dir.create_user(authed(request, &token)).await;
        assert_invalid(&case, result, field, DIRECTORY, &[&secret]);
    }

    // GetUser: the oneof unset, and each arm malformed.
    use dpb::get_user_request::Lookup;
    let result = w
        .dir
        .get_user(authed(dpb::GetUserRequest { lookup: None }, &token))
        .await;
    assert_invalid("GetUser lookup unset", result, "lookup", DIRECTORY, &[]);
    for (label, bad) in bad_ids() {
        let result = w
            .dir
            .get_user(authed(
                dpb::GetUserRequest {
                    lookup: Some(Lookup::UserId(bad)),
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("GetUser user_id {label}"),
            result,
            "user_id",
            DIRECTORY,
            &[],
        );
    }
    for (label, bad) in malformed_upns(&domain) {
        let result = w
            .dir
            .get_user(authed(
                dpb::GetUserRequest {
                    lookup: Some(Lookup::UserPrincipalName(bad)),
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("GetUser user_principal_name {label}"),
            result,
            "user_principal_name",
            DIRECTORY,
            &[],
        );
    }

    // ListUsers: page_size, role, and page tokens that are garbage, tampered, for another
    // filter, another directory or another list.
    let list = |page_size: i32, page_token: &str, role: i32| dpb::ListUsersRequest {
        page_size,
        page_token: page_token.to_owned(),
        role,
    };
    let contoso_token = users_page_token(&mut w.dir, &token).await;
    let fabrikam_token = users_page_token(&mut w.dir, &w.fabrikam.token).await;
    let subscriptions_token = subscriptions_page_token(&mut w.bill, &token).await;
    for (label, page_size) in [("-1", -1), ("i32::MIN", i32::MIN)] {
        let result = w
            .dir
            .list_users(authed(list(page_size, "", 0), &token))
            .await;
        assert_invalid(
            &format!("ListUsers page_size {label}"),
            result,
            "page_size",
            DIRECTORY,
            &[],
        );
    }
    for (label, role) in [("unknown", 99), ("negative", -1), ("i32::MAX", i32::MAX)] {
        let result = w.dir.list_users(authed(list(10, "", role), &token)).await;
        assert_invalid(
            &format!("ListUsers role {label}"),
            result,
            "role",
            DIRECTORY,
            &[],
        );
    }
    let page_tokens: Vec<(&str, String, i32)> = vec![
        ("garbage", "garbage".into(), 0),
        ("not base64", "!!!***".into(), 0),
        ("base64 of JSON", "eyJhZnRlciI6ImEifQ".into(), 0),
        ("5,000 characters", "A".repeat(5000), 0),
        ("tampered", tamper(&contoso_token), 0),
        (
            "used with another role filter",
            contoso_token.clone(),
            dpb::Role::GlobalAdministrator as i32,
        ),
        ("from another directory", fabrikam_token.clone(), 0),
        ("from ListSubscriptions", subscriptions_token.clone(), 0),
    ];
    for (label, page_token, role) in page_tokens {
        let result = w
            .dir
            .list_users(authed(list(1, &page_token, role), &token))
            .await;
        assert_invalid(
            &format!("ListUsers page_token {label}"),
            result,
            "page_token",
            DIRECTORY,
            &[],
        );
    }
    // The genuine token still works.
    w.dir
        .list_users(authed(list(1, &contoso_token, 0), &token))
        .await
        .expect("the genuine page token");

    // SetUserRoles.
    for (label, bad) in bad_ids() {
        let result = w
            .dir
            .set_user_roles(authed(
                dpb::SetUserRolesRequest {
                    user_id: bad,
                    roles: vec![dpb::Role::BillingAdministrator as i32],
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("SetUserRoles user_id {label}"),
            result,
            "user_id",
            DIRECTORY,
            &[],
        );
    }
    for (label, roles, field) in bad_role_lists() {
        let result = w
            .dir
            .set_user_roles(authed(
                dpb::SetUserRolesRequest {
                    user_id: w.jane.id.clone(),
                    roles,
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("SetUserRoles roles {label}"),
            result,
            field,
            DIRECTORY,
            &[],
        );
    }

    // DeleteUser.
    for (label, bad) in bad_ids() {
        let result = w
            .dir
            .delete_user(authed(dpb::DeleteUserRequest { user_id: bad }, &token))
            .await;
        assert_invalid(
            &format!("DeleteUser user_id {label}"),
            result,
            "user_id",
            DIRECTORY,
            &[],
        );
    }

    // ListDeletedUsers: page_size, and page tokens of another list or directory.
    let deleted = |page_size: i32, page_token: &str| dpb::ListDeletedUsersRequest {
        page_size,
        page_token: page_token.to_owned(),
    };
    for (label, page_size) in [("-1", -1), ("i32::MIN", i32::MIN)] {
        let result = w
            .dir
            .list_deleted_users(authed(deleted(page_size, ""), &token))
            .await;
        assert_invalid(
            &format!("ListDeletedUsers page_size {label}"),
            result,
            "page_size",
            DIRECTORY,
            &[],
        );
    }
    for (label, page_token) in [
        ("garbage", "garbage".to_owned()),
        ("5,000 characters", "A".repeat(5000)),
        ("from ListUsers", contoso_token.clone()),
        (
            "from ListUsers of another directory",
            fabrikam_token.clone(),
        ),
        ("from ListSubscriptions", subscriptions_token.clone()),
    ] {
        let result = w
            .dir
            .list_deleted_users(authed(deleted(1, &page_token), &token))
            .await;
        assert_invalid(
            &format!("ListDeletedUsers page_token {label}"),
            result,
            "page_token",
            DIRECTORY,
            &[],
        );
    }

    // RestoreUser and PurgeUser: ids, and new UPNs that break CreateUser's rules.
    for (label, bad) in bad_ids() {
        let result = w
            .dir
            .restore_user(authed(
                dpb::RestoreUserRequest {
                    user_id: bad.clone(),
                    new_user_principal_name: String::new(),
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("RestoreUser user_id {label}"),
            result,
            "user_id",
            DIRECTORY,
            &[],
        );
        let result = w
            .dir
            .purge_user(authed(dpb::PurgeUserRequest { user_id: bad }, &token))
            .await;
        assert_invalid(
            &format!("PurgeUser user_id {label}"),
            result,
            "user_id",
            DIRECTORY,
            &[],
        );
    }
    // (An empty one means the old UPN.)
    for (label, bad) in malformed_upns(&domain)
        .into_iter()
        .filter(|(_, upn)| !upn.is_empty())
    {
        let result = w
            .dir
            .restore_user(authed(
                dpb::RestoreUserRequest {
                    user_id: w.jane.id.clone(),
                    new_user_principal_name: bad,
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("RestoreUser new_user_principal_name {label}"),
            result,
            "new_user_principal_name",
            DIRECTORY,
            &[],
        );
    }

    // Authorize: unspecified and unknown actions.
    for (label, action) in [
        ("ACTION_UNSPECIFIED", 0),
        ("unknown", 99),
        ("negative", -7),
        ("i32::MIN", i32::MIN),
    ] {
        let result = w
            .dir
            .authorize(authed(
                dpb::AuthorizeRequest {
                    action,
                    ..Default::default()
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("Authorize action {label}"),
            result,
            "action",
            DIRECTORY,
            &[],
        );
    }

    // Nothing was written: the same users with the same roles, and every prefix the refused
    // sign-ups named is still free.
    assert_eq!(w.snapshot().await, before, "refused calls wrote nothing");
    for prefix in fresh_prefixes {
        w.dir
            .create_directory(dpb::CreateDirectoryRequest {
                display_name: "Now for real".into(),
                domain_prefix: prefix.clone(),
                admin_user_name: "admin".into(),
                admin_display_name: "Admin".into(),
                admin_password: PASSWORD.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("prefix {prefix} was taken by a refused sign-up: {s:?}"));
    }
    w.still_serving().await;
    assert_no_server_panic();
}

// ---------------------------------------------------------------------------------------
// billing-svc: every RPC, every field rule.

async fn billing_refuses_every_bad_field_and_writes_nothing(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let before = w.snapshot().await;
    let token = w.contoso.token.clone();
    let buy = |offer: &str, seats: i32| bpb::CreateSubscriptionRequest {
        offer_id: offer.into(),
        display_name: "Hostile".into(),
        seats,
        request_id: uuid::Uuid::new_v4().to_string(),
    };

    let mut cases: Vec<(String, bpb::CreateSubscriptionRequest, &str)> = Vec::new();
    for (label, bad) in [
        ("empty", ""),
        ("unknown", "office365-e5"),
        ("a family name", "azure"),
        ("leading space", " azure-pay-as-you-go"),
        ("trailing NUL", "azure-pay-as-you-go\0"),
        ("SQL", "' OR '1'='1"),
    ] {
        cases.push((
            format!("CreateSubscription offer_id {label}"),
            bpb::CreateSubscriptionRequest {
                offer_id: bad.into(),
                ..buy("office365-e3", 5)
            },
            "offer_id",
        ));
    }
    for (label, bad) in bad_display_names() {
        cases.push((
            format!("CreateSubscription display_name {label}"),
            bpb::CreateSubscriptionRequest {
                display_name: bad,
                ..buy("office365-e3", 5)
            },
            "display_name",
        ));
    }
    // Seats: 0 for Azure offers, 1..=1,000,000 for the per-seat Office 365 offers.
    for offer in ["azure-pay-as-you-go", "azure-free-trial"] {
        for seats in [1, -1, 5, i32::MAX, i32::MIN] {
            cases.push((
                format!("CreateSubscription {offer} seats {seats}"),
                buy(offer, seats),
                "seats",
            ));
        }
    }
    for offer in [
        "office365-business-basic",
        "office365-business-standard",
        "office365-business-premium",
        "office365-e3",
    ] {
        for seats in [0, -1, 1_000_001, i32::MAX, i32::MIN] {
            cases.push((
                format!("CreateSubscription {offer} seats {seats}"),
                buy(offer, seats),
                "seats",
            ));
        }
    }
    for (label, bad) in bad_ids().into_iter().filter(|(label, _)| *label != "empty") {
        cases.push((
            format!("CreateSubscription request_id {label}"),
            bpb::CreateSubscriptionRequest {
                request_id: bad,
                ..buy("office365-e3", 5)
            },
            "request_id",
        ));
    }
    for (case, request, field) in cases {
        let result = w.bill.create_subscription(authed(request, &token)).await;
        assert_invalid(&case, result, field, BILLING, &[]);
    }

    // GetSubscription and CancelSubscription.
    for (label, bad) in bad_ids() {
        let result = w
            .bill
            .get_subscription(authed(
                bpb::GetSubscriptionRequest {
                    subscription_id: bad.clone(),
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("GetSubscription subscription_id {label}"),
            result,
            "subscription_id",
            BILLING,
            &[],
        );
        let result = w
            .bill
            .cancel_subscription(authed(
                bpb::CancelSubscriptionRequest {
                    subscription_id: bad,
                },
                &token,
            ))
            .await;
        assert_invalid(
            &format!("CancelSubscription subscription_id {label}"),
            result,
            "subscription_id",
            BILLING,
            &[],
        );
    }

    // ListSubscriptions.
    let list = |page_size: i32, page_token: &str| bpb::ListSubscriptionsRequest {
        page_size,
        page_token: page_token.to_owned(),
    };
    let contoso_token = subscriptions_page_token(&mut w.bill, &token).await;
    let fabrikam_token = subscriptions_page_token(&mut w.bill, &w.fabrikam.token).await;
    let users_token = users_page_token(&mut w.dir, &token).await;
    for (label, page_size) in [("-1", -1), ("i32::MIN", i32::MIN)] {
        let result = w
            .bill
            .list_subscriptions(authed(list(page_size, ""), &token))
            .await;
        assert_invalid(
            &format!("ListSubscriptions page_size {label}"),
            result,
            "page_size",
            BILLING,
            &[],
        );
    }
    for (label, page_token) in [
        ("garbage", "garbage".to_owned()),
        ("not base64", "!!!***".to_owned()),
        ("5,000 characters", "A".repeat(5000)),
        ("tampered", tamper(&contoso_token)),
        ("from another directory", fabrikam_token),
        ("from ListUsers", users_token),
    ] {
        let result = w
            .bill
            .list_subscriptions(authed(list(1, &page_token), &token))
            .await;
        assert_invalid(
            &format!("ListSubscriptions page_token {label}"),
            result,
            "page_token",
            BILLING,
            &[],
        );
    }
    w.bill
        .list_subscriptions(authed(list(1, &contoso_token), &token))
        .await
        .expect("the genuine page token");

    // Nothing was written; in particular the refused free trials did not use up the trial.
    assert_eq!(w.snapshot().await, before, "refused calls wrote nothing");
    w.bill
        .create_subscription(authed(buy("azure-free-trial", 0), &token))
        .await
        .expect("the free trial is still available");
    w.still_serving().await;
    assert_no_server_panic();
}

// ---------------------------------------------------------------------------------------
// Oversized repeated fields and messages.

async fn thousands_of_roles_are_a_clear_invalid_argument(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let before = w.snapshot().await;
    let token = w.contoso.token.clone();
    let upn = format!("many@{}", w.contoso.domain);
    for (label, roles) in [
        (
            "5,000 valid roles",
            vec![dpb::Role::BillingAdministrator as i32; 5000],
        ),
        ("5,000 ROLE_UNSPECIFIED", vec![0; 5000]),
        ("5,000 unknown roles", vec![99; 5000]),
        ("100,000 roles", (0..100_000).map(|i| i % 7).collect()),
    ] {
        for (rpc, result) in [
            (
                "CreateUser",
                w.dir
                    .create_user(authed(
                        dpb::CreateUserRequest {
                            user_principal_name: upn.clone(),
                            display_name: "Many".into(),
                            password: PASSWORD.into(),
                            roles: roles.clone(),
                        },
                        &token,
                    ))
                    .await
                    .map(|_| ()),
            ),
            (
                "SetUserRoles",
                w.dir
                    .set_user_roles(authed(
                        dpb::SetUserRolesRequest {
                            user_id: w.jane.id.clone(),
                            roles: roles.clone(),
                        },
                        &token,
                    ))
                    .await
                    .map(|_| ()),
            ),
        ] {
            let status = result.expect_err(&format!("{rpc} with {label} must be refused"));
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{rpc} {label}: {status:?}"
            );
            let (_, domain, fields) = details(&status);
            assert_eq!(domain, DIRECTORY);
            assert!(
                !fields.is_empty() && fields.len() <= 16,
                "{rpc} {label}: a few violations, not one per entry: {fields:?}"
            );
            assert!(
                fields.iter().all(|f| f.starts_with("roles")),
                "{rpc} {label}: the violations name the roles field: {fields:?}"
            );
            assert!(
                status.message().len() < 4096,
                "{rpc} {label}: a short message, got {} bytes",
                status.message().len()
            );
            w.still_serving().await;
        }
    }
    assert_eq!(w.snapshot().await, before, "refused calls wrote nothing");
    assert_no_server_panic();
}

/// A CreateUser and a CreateSubscription whose display_name alone is 10 MiB.
async fn send_10_mib_messages(w: &mut World) -> [Status; 2] {
    let huge = "x".repeat(10 * 1024 * 1024);
    let user = w
        .dir
        .create_user(authed(
            dpb::CreateUserRequest {
                user_principal_name: format!("huge@{}", w.contoso.domain),
                display_name: huge.clone(),
                password: PASSWORD.into(),
                roles: vec![],
            },
            &w.contoso.token,
        ))
        .await
        .expect_err("a 10 MiB CreateUser must fail");
    let subscription = w
        .bill
        .create_subscription(authed(
            bpb::CreateSubscriptionRequest {
                offer_id: "office365-e3".into(),
                display_name: huge,
                seats: 1,
                request_id: String::new(),
            },
            &w.contoso.token,
        ))
        .await
        .expect_err("a 10 MiB CreateSubscription must fail");
    [user, subscription]
}

async fn a_10_mib_message_fails_and_the_server_keeps_serving(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let before = w.snapshot().await;
    for _ in 0..3 {
        let statuses = send_10_mib_messages(&mut w).await;
        for status in statuses {
            assert_ne!(status.code(), Code::Ok);
            assert!(
                status.message().len() < 4096,
                "the message does not echo the request: {} bytes",
                status.message().len()
            );
        }
        w.still_serving().await;
    }
    assert_eq!(w.snapshot().await, before, "refused calls wrote nothing");
    assert_no_server_panic();
}

/// The contract's code for a message over the size limit is RESOURCE_EXHAUSTED.
async fn a_10_mib_message_is_resource_exhausted(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let [user, subscription] = send_10_mib_messages(&mut w).await;
    assert_eq!(user.code(), Code::ResourceExhausted, "CreateUser: {user:?}");
    assert_eq!(
        subscription.code(),
        Code::ResourceExhausted,
        "CreateSubscription: {subscription:?}"
    );
    assert_eq!(details(&user).1, DIRECTORY, "with an ErrorInfo: {user:?}");
    assert_eq!(
        details(&subscription).1,
        BILLING,
        "with an ErrorInfo: {subscription:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Garbage on the wire.

/// Sends `bytes` on a fresh TCP connection and returns once the server has closed it (or
/// after 10 s, which fails the test: a garbage connection must not be kept open).
async fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // The server may close before reading everything: a failed write is fine.
    let _ = tcp.write_all(bytes).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{addr} kept a connection open after garbage {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn pseudo_random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// The protobuf tag of `field` with `wire_type`, as a varint.
fn tag(field: u32, wire_type: u32) -> Vec<u8> {
    varint(u64::from(field << 3 | wire_type))
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A length-delimited field (a string) with raw bytes.
fn string_field(field: u32, value: &[u8]) -> Vec<u8> {
    let mut out = tag(field, 2);
    out.extend(varint(value.len() as u64));
    out.extend_from_slice(value);
    out
}

/// One gRPC length-prefixed message, uncompressed.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend((message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// What a raw gRPC call over HTTP/2 got back.
#[derive(Debug)]
enum Raw {
    /// A grpc-status (in the headers of a trailers-only answer, or in the trailers), its
    /// message, its grpc-status-details-bin, and the response messages' bytes.
    Status(i32, String, Option<String>, Vec<u8>),
    /// The stream or connection was reset or closed without a status.
    Closed(String),
}

/// Opens an HTTP/2 connection (h2 client, no tonic) to `addr`.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Sends one gRPC request with `body` (already framed, or deliberately not) to `path`.
async fn h2_call(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Raw {
    let ready = match client.clone().ready().await {
        Ok(ready) => ready,
        Err(err) => return Raw::Closed(format!("connection not ready: {err}")),
    };
    *client = ready;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(()).expect("request");
    let (response, mut stream) = match client.send_request(request, false) {
        Ok(sent) => sent,
        Err(err) => return Raw::Closed(format!("send_request: {err}")),
    };
    if let Err(err) = stream.send_data(Bytes::from(body), true) {
        return Raw::Closed(format!("send_data: {err}"));
    }
    let answer = async {
        let response = match response.await {
            Ok(response) => response,
            Err(err) => return Raw::Closed(format!("response: {err}")),
        };
        let (head, mut body) = response.into_parts();
        let status_of = |headers: &http::HeaderMap| {
            headers.get("grpc-status").map(|code| {
                let code = code
                    .to_str()
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(-1);
                let text = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|m| m.to_str().ok())
                        .map(str::to_owned)
                };
                (
                    code,
                    text("grpc-message").unwrap_or_default(),
                    text("grpc-status-details-bin"),
                )
            })
        };
        if let Some((code, message, details)) = status_of(&head.headers) {
            return Raw::Status(code, message, details, Vec::new());
        }
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(chunk) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    data.extend_from_slice(&chunk);
                }
                Err(err) => return Raw::Closed(format!("body: {err}")),
            }
        }
        match body.trailers().await {
            Ok(Some(trailers)) => match status_of(&trailers) {
                Some((code, message, details)) => Raw::Status(code, message, details, data),
                None => Raw::Closed("trailers without grpc-status".into()),
            },
            Ok(None) => Raw::Closed("no trailers".into()),
            Err(err) => Raw::Closed(format!("trailers: {err}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer within 10 s"))
}

/// The protobuf messages of a response body (each length-prefixed).
fn first_message(data: &[u8]) -> &[u8] {
    assert!(data.len() >= 5 && data[0] == 0, "one uncompressed message");
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    &data[5..5 + len]
}

/// Bodies that are not one valid message of `string_field_number`'s message type: broken
/// framing, broken protobuf, invalid UTF-8 in a string field.
fn broken_bodies(string_field_number: u32) -> Vec<(&'static str, Vec<u8>)> {
    let mut length_longer_than_body = vec![0, 0, 0, 0, 100];
    length_longer_than_body.extend(string_field(string_field_number, b"abc"));
    let mut four_gib = vec![0, 0xff, 0xff, 0xff, 0xff];
    four_gib.extend_from_slice(b"short");
    let mut compressed_without_encoding = grpc_frame(&string_field(string_field_number, b"abc"));
    compressed_without_encoding[0] = 1;
    let mut bad_flag = grpc_frame(&string_field(string_field_number, b"abc"));
    bad_flag[0] = 0x7f;
    let mut trailing_garbage = grpc_frame(&string_field(string_field_number, b"abc"));
    trailing_garbage.extend_from_slice(&[0xde, 0xad]);
    let mut utf8_in_the_middle = string_field(string_field_number, b"ok \xe2\x28\xa1 no");
    utf8_in_the_middle.extend(string_field(string_field_number + 1, b"fine"));
    vec![
        ("empty body", vec![]),
        ("three bytes of a prefix", vec![0, 0, 0]),
        ("length longer than the body", length_longer_than_body),
        ("length of 4 GiB", four_gib),
        (
            "compressed flag, no grpc-encoding",
            compressed_without_encoding,
        ),
        ("flag byte 0x7f", bad_flag),
        ("garbage after the message", trailing_garbage),
        ("varint overflow", grpc_frame(&[0xff; 11])),
        ("wire type 7", grpc_frame(&[0x0f, 0x01])),
        ("field number 0", grpc_frame(&[0x02, 0x01, b'a'])),
        (
            "string length beyond the message",
            grpc_frame(&[0x0a, 0x64, b'a', b'b']),
        ),
        ("unterminated group", grpc_frame(&[0x0b, 0x0a, 0x01, b'a'])),
        (
            "a string field sent as a varint",
            grpc_frame(&[(string_field_number << 3) as u8, 0x01]),
        ),
        (
            "invalid UTF-8 in a string field",
            grpc_frame(&string_field(string_field_number, &[0xc3, 0x28])),
        ),
        (
            "a lone surrogate in a string field",
            grpc_frame(&string_field(string_field_number, b"\xed\xa0\x80")),
        ),
        ("invalid UTF-8 mid-message", grpc_frame(&utf8_in_the_middle)),
        ("random bytes", grpc_frame(&pseudo_random_bytes(512, 7))),
    ]
}

/// Sends every broken body to `path` (each on a fresh connection), expects an error status
/// or a closed stream, then a valid `good` message on the same connection, which must be OK.
/// Returns what each broken body got.
async fn broken_bodies_then_a_good_call(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    string_field_number: u32,
    good: impl Fn() -> Vec<u8>,
) -> Vec<(&'static str, Raw)> {
    let mut answers = Vec::new();
    for (label, body) in broken_bodies(string_field_number) {
        let mut client = h2_connect(addr).await;
        let answer = h2_call(&mut client, addr, path, token, body).await;
        match &answer {
            Raw::Status(code, message, _, _) => {
                assert_ne!(*code, 0, "{path} {label}: accepted: {answer:?}");
                assert!(
                    !message.contains("panicked") && message.len() < 4096,
                    "{path} {label}: {answer:?}"
                );
            }
            Raw::Closed(why) => eprintln!("{path} {label}: stream closed: {why}"),
        }
        // The connection (or a new one, if the server closed it) still serves.
        let mut again = h2_call(&mut client, addr, path, token, grpc_frame(&good())).await;
        if matches!(again, Raw::Closed(_)) {
            let mut fresh = h2_connect(addr).await;
            again = h2_call(&mut fresh, addr, path, token, grpc_frame(&good())).await;
        }
        assert!(
            matches!(again, Raw::Status(0, _, _, _)),
            "{path} after {label}: a good call must succeed: {again:?} (first answer {answer:?})"
        );
        answers.push((label, answer));
    }
    answers
}

/// A valid hand-encoded CreateDirectoryRequest, with a prefix of its own.
fn good_sign_up() -> Vec<u8> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut message = string_field(1, b"Raw");
    message.extend(string_field(2, format!("raw{}", &id[..12]).as_bytes()));
    message.extend(string_field(3, b"admin"));
    message.extend(string_field(4, b"Admin"));
    message.extend(string_field(5, PASSWORD.as_bytes()));
    message
}

/// A valid hand-encoded CreateSubscriptionRequest: two seats of Office 365 E3.
fn good_purchase() -> Vec<u8> {
    let mut message = string_field(1, b"office365-e3");
    message.extend(string_field(2, b"Raw"));
    message.extend(tag(3, 0));
    message.extend(varint(2));
    message
}

const CREATE_DIRECTORY: &str = "/directory.v1.DirectoryService/CreateDirectory";
const GET_USER: &str = "/directory.v1.DirectoryService/GetUser";
const CREATE_SUBSCRIPTION: &str = "/billing.v1.BillingService/CreateSubscription";

/// Every broken body against a public and an authenticated directory RPC and a purchase,
/// each followed by a good call; what each broken body got, by path.
async fn raw_broken_calls(w: &World) -> Vec<(&'static str, &'static str, Raw)> {
    let token = Some(w.contoso.token.as_str());
    let upn = w.contoso.admin.user_principal_name.clone();
    let mut all = Vec::new();
    let answers =
        broken_bodies_then_a_good_call(w.directory.addr, CREATE_DIRECTORY, None, 1, good_sign_up)
            .await;
    all.extend(answers.into_iter().map(|(l, r)| (CREATE_DIRECTORY, l, r)));
    // The body is refused whether or not the call needs a token.
    let answers = broken_bodies_then_a_good_call(w.directory.addr, GET_USER, token, 2, || {
        string_field(2, upn.as_bytes())
    })
    .await;
    all.extend(answers.into_iter().map(|(l, r)| (GET_USER, l, r)));
    let answers = broken_bodies_then_a_good_call(
        w.billing.addr,
        CREATE_SUBSCRIPTION,
        token,
        1,
        good_purchase,
    )
    .await;
    all.extend(
        answers
            .into_iter()
            .map(|(l, r)| (CREATE_SUBSCRIPTION, l, r)),
    );
    all
}

async fn garbage_on_the_wire_is_refused_without_harm(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    let addrs = [w.directory.addr, w.billing.addr];

    // Bytes that are not HTTP/2.
    for addr in addrs {
        send_raw(addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        send_raw(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await;
        send_raw(addr, &pseudo_random_bytes(64 * 1024, 42)).await;
        let mut bad_frame = PREFACE.to_vec();
        bad_frame.extend_from_slice(&[0xff; 64]);
        send_raw(addr, &bad_frame).await;
        let mut huge_frame = PREFACE.to_vec();
        huge_frame.extend_from_slice(&[0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00]);
        huge_frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01]);
        huge_frame.extend_from_slice(&pseudo_random_bytes(1024, 3));
        send_raw(addr, &huge_frame).await;
        let mut half_preface = TcpStream::connect(addr).await.expect("connect");
        let _ = half_preface.write_all(&PREFACE[..10]).await;
        drop(half_preface);
    }
    w.still_serving().await;

    // A hand-encoded valid CreateDirectory first, to show the raw path works.
    let mut client = h2_connect(w.directory.addr).await;
    let answer = h2_call(
        &mut client,
        w.directory.addr,
        CREATE_DIRECTORY,
        None,
        grpc_frame(&good_sign_up()),
    )
    .await;
    let Raw::Status(0, _, _, data) = answer else {
        panic!("a valid hand-encoded CreateDirectory failed: {answer:?}");
    };
    let created = dpb::CreateDirectoryResponse::decode(first_message(&data))
        .expect("a CreateDirectoryResponse");
    assert!(
        created
            .directory
            .expect("directory")
            .initial_domain
            .starts_with("raw")
    );

    raw_broken_calls(&w).await;

    // Methods and services that do not exist, with a well-formed message.
    for (addr, path) in [
        (
            w.directory.addr,
            "/directory.v1.DirectoryService/DropEverything",
        ),
        (w.directory.addr, "/billing.v1.BillingService/ListOffers"),
        (
            w.billing.addr,
            "/billing.v1.BillingService/../../etc/passwd",
        ),
        (w.billing.addr, "/"),
    ] {
        let mut client = h2_connect(addr).await;
        let answer = h2_call(&mut client, addr, path, None, grpc_frame(&[])).await;
        assert!(
            !matches!(answer, Raw::Status(0, _, _, _)),
            "{path} on {addr}: {answer:?}"
        );
    }

    // Nothing the broken calls carried was stored: only the good ones.
    let subscriptions = w.subscriptions(&clone_tenant(&w.contoso)).await;
    assert!(
        subscriptions
            .iter()
            .filter(|s| s.display_name == "Raw")
            .all(|s| s.seats == 2 && s.offer_id == "office365-e3"),
        "only the good purchases were stored: {subscriptions:?}"
    );
    w.still_serving().await;
    assert_no_server_panic();
}

/// The contract: every error carries a google.rpc.ErrorInfo naming the service, and a
/// request the server cannot decode is the caller's fault (INVALID_ARGUMENT; one over the
/// size limit RESOURCE_EXHAUSTED), not INTERNAL.
async fn undecodable_requests_answer_the_contract_status(backend: Backend) {
    let Some(w) = world(backend).await else {
        return;
    };
    let mut wrong = Vec::new();
    for (path, label, raw) in raw_broken_calls(&w).await {
        let Raw::Status(code, message, status_details, _) = &raw else {
            continue;
        };
        let status = match status_details {
            Some(encoded) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(encoded.trim_end_matches('='))
                    .expect("grpc-status-details-bin is base64");
                Status::with_details(Code::from(*code), message.clone(), Bytes::from(bytes))
            }
            None => Status::new(Code::from(*code), message.clone()),
        };
        let (reason, domain, _) = details(&status);
        let service = if path.starts_with("/billing") {
            BILLING
        } else {
            DIRECTORY
        };
        let expected = if label == "length of 4 GiB" {
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        };
        // INVALID_ARGUMENT also carries BadRequest; a string that is not UTF-8 names its field.
        let violations = status
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        // A bad string names its field; GetUser's is an arm of the `lookup` oneof, which the
        // decoder does not tell apart, so the violation is the message's as a whole.
        let names_a_field =
            label.contains("UTF-8") || label.contains("surrogate") || label.contains("as a varint");
        let field = match path {
            CREATE_DIRECTORY => "display_name",
            CREATE_SUBSCRIPTION => "offer_id",
            _ => "",
        };
        let bad_request_ok = match expected {
            Code::InvalidArgument if names_a_field => {
                violations.len() == 1 && violations[0].field == field
            }
            Code::InvalidArgument => violations.len() == 1,
            _ => violations.is_empty(),
        };
        if status.code() != expected || domain != service || reason.is_empty() || !bad_request_ok {
            wrong.push(format!(
                "{path} {label}: {:?} {:?} (ErrorInfo reason {reason:?} domain {domain:?}, \
                 BadRequest {violations:?})",
                status.code(),
                status.message()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} answers off contract: {wrong:#?}",
        wrong.len()
    );
}

// ---------------------------------------------------------------------------------------
// Tokens.

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .expect("base64url")
}

/// Forged tokens, made from `genuine` (the token of a user without roles) to pass for
/// `victim` (a Global Administrator of the same directory) or for `stranger` (one of another
/// directory), each `(user id, directory id)`. The layout is directory-svc's (tokens.rs):
/// version, user, directory, expiry, the user's token generation, then the tag over them.
fn forged_tokens(
    genuine: &str,
    victim: (&str, &str),
    stranger: (&str, &str),
) -> Vec<(&'static str, String)> {
    let raw = unb64(genuine);
    assert_eq!(raw.len(), 61, "a compact access token: {genuine}");
    let id = |text: &str| *uuid::Uuid::parse_str(text).expect("a UUID").as_bytes();
    let with = |changes: &[(std::ops::Range<usize>, &[u8])]| {
        let mut forged = raw.clone();
        for (range, bytes) in changes {
            forged[range.clone()].copy_from_slice(bytes);
        }
        b64(&forged)
    };
    let now = contract::time::now_micros() / 1_000_000;
    let next_year = (now + 366 * 86_400).to_be_bytes();
    // JWTs with no signature, naming the victim (what tokens of other services look like).
    let claims = format!(
        r#"{{"iss":"directory-svc","sub":"{}","tid":"{}","iat":{now},"exp":{}}}"#,
        victim.0,
        victim.1,
        now + 600
    );
    let none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(claims.as_bytes());
    // The victim's ids and a valid expiry, issued by directory-svc's own token code under a
    // key that is not this one's: what another deployment (or a guessed key) would issue.
    let other_key = *uuid::Uuid::new_v4().as_bytes();
    let (foreign, _) =
        directory_svc::domain::tokens::Tokens::new(&other_key, Duration::from_secs(600))
            .issue(
                &directory_svc::domain::tokens::TokenSubject {
                    user_id: victim.0.to_owned(),
                    directory_id: victim.1.to_owned(),
                    generation: 0,
                },
                contract::time::now_micros(),
            )
            .expect("issues");
    vec![
        (
            "the victim's ids and a valid expiry under another key's tag",
            foreign,
        ),
        (
            "another user under the genuine tag",
            with(&[(1..17, &id(victim.0))]),
        ),
        (
            "another tenant's user and directory under the genuine tag",
            with(&[(1..17, &id(stranger.0)), (17..33, &id(stranger.1))]),
        ),
        (
            "a later expiry under the genuine tag",
            with(&[(33..41, &next_year)]),
        ),
        (
            "another token generation under the genuine tag (from before a deletion)",
            with(&[(41..45, &[0, 0, 0, 1])]),
        ),
        ("another format version", with(&[(0..1, &[1])])),
        ("tag zeroed", with(&[(45..61, &[0; 16])])),
        ("tag removed", b64(&raw[..45])),
        ("tag cut to 64 bits", b64(&raw[..53])),
        ("a JWT with alg none", format!("{none}.{payload}.")),
        (
            "a JWT with alg none, no third part",
            format!("{none}.{payload}"),
        ),
        ("tampered", tamper(genuine)),
    ]
}

fn garbage_tokens() -> Vec<(&'static str, String)> {
    vec![
        ("a word", "garbage".into()),
        ("three dots", "a.b.c".into()),
        ("empty JSON parts", format!("{0}.{0}.{0}", b64(b"{}"))),
        ("only dots", "....".into()),
        ("8 KiB", "A".repeat(8192)),
        ("with a space inside", "abc def".into()),
        ("Bearer twice", "Bearer abc".into()),
    ]
}

/// The answer's message and every detail, which must be the same for every invalid token.
fn generic_answer(case: &str, status: &Status, service: &str, token: &str) -> String {
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "{case}: invalid tokens are UNAUTHENTICATED: {status:?}"
    );
    let details = status.get_error_details_vec();
    assert_eq!(
        details.len(),
        1,
        "{case}: only an ErrorInfo, nothing that says why: {details:?}"
    );
    let ErrorDetail::ErrorInfo(info) = &details[0] else {
        panic!("{case}: only an ErrorInfo: {details:?}");
    };
    assert_eq!(info.domain, service, "{case}");
    assert!(
        info.metadata.is_empty(),
        "{case}: ErrorInfo metadata says why: {info:?}"
    );
    for piece in token.split(['.', ' ']).filter(|p| p.len() >= 8) {
        assert!(
            !status.message().contains(piece),
            "{case}: the message echoes the token: {status:?}"
        );
    }
    format!("{} | {}", status.message(), info.reason)
}

/// Each distinct answer to an invalid token, and the cases that got it.
type Answers = std::collections::BTreeMap<String, Vec<String>>;

fn record(answers: &mut Answers, case: String, status: Status, service: &str, token: &str) {
    let answer = generic_answer(&case, &status, service, token);
    answers.entry(answer).or_default().push(case);
}

async fn every_invalid_token_is_unauthenticated_with_one_generic_answer(backend: Backend) {
    let Some(mut w) = world(backend).await else {
        return;
    };
    // Another directory-svc, with its own signing key.
    let Some(other_db) = TestDb::new(backend).await else {
        return;
    };
    let other = DirectoryServer::start(&other_db).await;
    let mut other_dir = other.client().await;
    let stranger = sign_up(&mut other_dir, "contoso").await;
    // A directory-svc whose tokens live one second, and a billing-svc in front of it.
    let Some(short_db) = TestDb::new(backend).await else {
        return;
    };
    let Some(short_bdb) = TestDb::new(backend).await else {
        return;
    };
    let mut config = directory_config(&short_db);
    config.token_ttl = Duration::from_secs(60);
    let clock = ManualClock::at(1_800_000_000_000_000); // a whole second: expiry is to the second
    config.clock = std::sync::Arc::new(clock.clone());
    let short = DirectoryServer::start_with(config).await;
    let short_billing = BillingServer::start(&short_bdb, &short).await;
    let mut short_dir = short.client().await;
    let mut short_bill = short_billing.client().await;

    // A deleted user's token.
    let (gone, gone_token) = add_user(&mut w.dir, &w.contoso, "gone", &[]).await;
    w.dir
        .who_am_i(authed(dpb::WhoAmIRequest {}, &gone_token))
        .await
        .expect("works before the deletion");
    w.dir
        .delete_user(authed(
            dpb::DeleteUserRequest {
                user_id: gone.id.clone(),
            },
            &w.contoso.token,
        ))
        .await
        .expect("delete");

    let mut tokens: Vec<(String, String)> = vec![
        (
            "signed by another directory-svc (same UPN)".into(),
            stranger.token.clone(),
        ),
        ("of a deleted user".into(), gone_token.clone()),
    ];
    let (_, plain_token) = add_user(&mut w.dir, &w.contoso, "plain", &[]).await;
    for (label, token) in forged_tokens(
        &plain_token,
        (&w.contoso.admin.id, &w.contoso.directory.id),
        (&w.fabrikam.admin.id, &w.fabrikam.directory.id),
    ) {
        tokens.push((format!("forged: {label}"), token));
    }
    for (label, token) in garbage_tokens() {
        tokens.push((format!("garbage: {label}"), token));
    }

    // directory-svc: one answer for all of them, on every RPC that needs a token.
    let mut answers = Answers::new();
    for (label, token) in &tokens {
        let dir = &mut w.dir;
        let results: Vec<(&str, Status)> = vec![
            (
                "WhoAmI",
                dir.who_am_i(authed(dpb::WhoAmIRequest {}, token))
                    .await
                    .expect_err("refused"),
            ),
            (
                "GetDirectory",
                dir.get_directory(authed(
                    dpb::GetDirectoryRequest {
                        directory_id: w.contoso.directory.id.clone(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "CreateUser",
                dir.create_user(authed(dpb::CreateUserRequest::default(), token))
                    .await
                    .expect_err("refused"),
            ),
            (
                "GetUser",
                dir.get_user(authed(
                    dpb::GetUserRequest {
                        lookup: Some(dpb::get_user_request::Lookup::UserId(
                            w.contoso.admin.id.clone(),
                        )),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "ListUsers",
                dir.list_users(authed(dpb::ListUsersRequest::default(), token))
                    .await
                    .expect_err("refused"),
            ),
            (
                "SetUserRoles",
                dir.set_user_roles(authed(
                    dpb::SetUserRolesRequest {
                        user_id: w.jane.id.clone(),
                        roles: vec![1],
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "DeleteUser",
                dir.delete_user(authed(
                    dpb::DeleteUserRequest {
                        user_id: w.jane.id.clone(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "ListDeletedUsers",
                dir.list_deleted_users(authed(dpb::ListDeletedUsersRequest::default(), token))
                    .await
                    .expect_err("refused"),
            ),
            (
                "RestoreUser",
                dir.restore_user(authed(
                    dpb::RestoreUserRequest {
                        user_id: w.jane.id.clone(),
                        new_user_principal_name: String::new(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "PurgeUser",
                dir.purge_user(authed(
                    dpb::PurgeUserRequest {
                        user_id: w.jane.id.clone(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "Authorize",
                dir.authorize(authed(
                    dpb::AuthorizeRequest {
                        action: dpb::Action::PurchaseSubscription as i32,
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
        ];
        for (rpc, status) in results {
            record(
                &mut answers,
                format!("{rpc} with a token {label}"),
                status,
                DIRECTORY,
                token,
            );
        }
    }
    // The expired token, once its 60 s are up on the directory's manual clock.
    let expiring = sign_up(&mut short_dir, "contoso").await;
    short_dir
        .who_am_i(authed(dpb::WhoAmIRequest {}, &expiring.token))
        .await
        .expect("works before it expires");
    short_bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest::default(),
            &expiring.token,
        ))
        .await
        .expect("billing accepts it before it expires");
    clock.advance(Duration::from_secs(60));
    let status = short_dir
        .who_am_i(authed(dpb::WhoAmIRequest {}, &expiring.token))
        .await
        .expect_err("expired");
    record(
        &mut answers,
        "WhoAmI with an expired token".into(),
        status,
        DIRECTORY,
        &expiring.token,
    );
    assert_eq!(
        answers.len(),
        1,
        "every invalid token gets the same message, reason and details: {answers:#?}"
    );

    // billing-svc: the same, whatever the directory found wrong with the token.
    let mut answers = Answers::new();
    let some_id = uuid::Uuid::new_v4().to_string();
    for (label, token) in &tokens {
        let bill = &mut w.bill;
        let results: Vec<(&str, Status)> = vec![
            (
                "CreateSubscription",
                bill.create_subscription(authed(
                    bpb::CreateSubscriptionRequest {
                        offer_id: "azure-pay-as-you-go".into(),
                        display_name: "Forged".into(),
                        seats: 0,
                        request_id: String::new(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "GetSubscription",
                bill.get_subscription(authed(
                    bpb::GetSubscriptionRequest {
                        subscription_id: some_id.clone(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
            (
                "ListSubscriptions",
                bill.list_subscriptions(authed(bpb::ListSubscriptionsRequest::default(), token))
                    .await
                    .expect_err("refused"),
            ),
            (
                "CancelSubscription",
                bill.cancel_subscription(authed(
                    bpb::CancelSubscriptionRequest {
                        subscription_id: some_id.clone(),
                    },
                    token,
                ))
                .await
                .expect_err("refused"),
            ),
        ];
        for (rpc, status) in results {
            record(
                &mut answers,
                format!("{rpc} with a token {label}"),
                status,
                BILLING,
                token,
            );
        }
    }
    let status = short_bill
        .list_subscriptions(authed(
            bpb::ListSubscriptionsRequest::default(),
            &expiring.token,
        ))
        .await
        .expect_err("expired");
    record(
        &mut answers,
        "ListSubscriptions with an expired token".into(),
        status,
        BILLING,
        &expiring.token,
    );
    assert_eq!(
        answers.len(),
        1,
        "every invalid token gets the same message, reason and details: {answers:#?}"
    );

    // No token at all is UNAUTHENTICATED too, on both services.
    let status = w
        .dir
        .who_am_i(dpb::WhoAmIRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = w
        .bill
        .list_subscriptions(bpb::ListSubscriptionsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // None of the forged calls wrote anything: jane is still there, with no roles.
    let users = w.users(&clone_tenant(&w.contoso)).await;
    let jane = users
        .iter()
        .find(|u| u.id == w.jane.id)
        .expect("jane was not deleted by a forged token");
    assert!(
        jane.roles.is_empty(),
        "no role was granted by a forged token"
    );
    let subscriptions = w.subscriptions(&clone_tenant(&w.contoso)).await;
    assert!(
        subscriptions.iter().all(|s| s.display_name != "Forged"),
        "no purchase with a forged token"
    );
    w.still_serving().await;
    assert_no_server_panic();
}

on_both_backends!(
    directory_refuses_every_bad_field_and_writes_nothing,
    billing_refuses_every_bad_field_and_writes_nothing,
    thousands_of_roles_are_a_clear_invalid_argument,
    a_10_mib_message_fails_and_the_server_keeps_serving,
    garbage_on_the_wire_is_refused_without_harm,
    every_invalid_token_is_unauthenticated_with_one_generic_answer,
    a_10_mib_message_is_resource_exhausted,
    undecodable_requests_answer_the_contract_status,
);
