//! What the load generator calls, and the setup each scenario needs, done through the public
//! gRPC API only (sign-up, sign-in, CreateUser, CreateSubscription), as a caller would.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use contract::billing::v1 as bpb;
use contract::billing::v1::billing_service_client::BillingServiceClient;
use contract::directory::v1 as dpb;
use contract::directory::v1::directory_service_client::DirectoryServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::report::code_name;

/// The offer create-subscription buys (per seat, owned by the directory).
const OFFER: &str = "office365-e3";
/// How long one setup call may take (sign-up and CreateUser hash a password).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after a call's deadline loadgen's own timer gives up on it.
const DEADLINE_SLACK: Duration = Duration::from_millis(100);

/// One kind of call to put load on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// grpc.health.v1.Health/Check on the target: the baseline (no auth, no database).
    Health,
    /// directory Authorize(ACTION_PURCHASE_SUBSCRIPTION) as a Global Administrator.
    Authorize,
    /// directory GetUser by id, round-robin over the setup's users.
    GetUser,
    /// directory ListUsers, first page of --page-size (default 100).
    ListUsers,
    /// directory WhoAmI.
    Whoami,
    /// billing CreateSubscription: office365-e3, 1 seat, a fresh request_id per call.
    CreateSubscription,
    /// billing GetSubscription, round-robin over the setup's subscriptions.
    GetSubscription,
    /// billing ListSubscriptions, first page of --page-size.
    ListSubscriptions,
    /// directory SignIn, round-robin over the setup's users (argon2-bound).
    SignIn,
    /// billing AssignLicense (which asks the directory whether the user is active, in the
    /// same Authorize call): the setup's users in turn, each of the four Office 365 offers in
    /// turn, on pools of 1,000,000 seats bought by the setup, so each of the first
    /// 4 x --users calls assigns a new licence (later ones find it held).
    AssignLicense,
}

/// The offers assign-license hands out, in turn.
const LICENSED_OFFERS: [&str; 4] = [
    "office365-e3",
    "office365-business-basic",
    "office365-business-standard",
    "office365-business-premium",
];

/// Which service a scenario puts load on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Directory,
    Billing,
}

impl Scenario {
    pub fn service(self) -> Service {
        match self {
            Scenario::CreateSubscription
            | Scenario::GetSubscription
            | Scenario::ListSubscriptions
            | Scenario::AssignLicense => Service::Billing,
            Scenario::Health
            | Scenario::Authorize
            | Scenario::GetUser
            | Scenario::ListUsers
            | Scenario::Whoami
            | Scenario::SignIn => Service::Directory,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Health => "health",
            Scenario::Authorize => "authorize",
            Scenario::GetUser => "get-user",
            Scenario::ListUsers => "list-users",
            Scenario::Whoami => "whoami",
            Scenario::CreateSubscription => "create-subscription",
            Scenario::GetSubscription => "get-subscription",
            Scenario::ListSubscriptions => "list-subscriptions",
            Scenario::SignIn => "sign-in",
            Scenario::AssignLicense => "assign-license",
        }
    }

    /// Whether the setup creates users for this scenario (to read or to sign in as).
    fn needs_users(self) -> bool {
        matches!(
            self,
            Scenario::GetUser | Scenario::ListUsers | Scenario::SignIn | Scenario::AssignLicense
        )
    }

    /// Whether the setup creates subscriptions for this scenario (to read).
    fn needs_subscriptions(self) -> bool {
        matches!(
            self,
            Scenario::GetSubscription | Scenario::ListSubscriptions
        )
    }
}

/// `host:port` as an `http://` URL; a URL with a scheme is kept as given.
pub fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Refuses a URL whose host is not on this machine (loopback), unless allowed: load is only
/// ever sent to servers one runs oneself.
pub fn check_loopback(url: &str, allow_remote: bool) -> anyhow::Result<()> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .with_context(|| format!("{url} is not a valid address"))?;
    let host = uri
        .host()
        .with_context(|| format!("{url} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        bail!("{url} is not a loopback address; pass --allow-remote to send load to another host");
    }
    Ok(())
}

/// A new HTTP/2 connection to `url` for the setup calls (each call makes its own connection).
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{url} is not a valid address"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// The clients of one HTTP/2 connection, the one the load goes over: tonic's `Channel`, with
/// the settings billing uses towards the directory ([`platform::client`]), as our users'
/// harnesses call us.
#[derive(Clone)]
pub struct Conn {
    health: HealthClient<Channel>,
    directory: DirectoryServiceClient<Channel>,
    billing: BillingServiceClient<Channel>,
}

impl Conn {
    /// Clients of a new connection to `url` (`http://`; connected on the first call).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        if !url.starts_with("http://") {
            bail!("{url}: the load generator speaks plaintext HTTP/2 only (http://)");
        }
        let endpoint = platform::client::endpoint(url, Duration::from_secs(5), None)?;
        let channel = platform::client::lazy_channel(&endpoint);
        Ok(Self {
            health: HealthClient::new(channel.clone()),
            directory: DirectoryServiceClient::new(channel.clone()),
            billing: BillingServiceClient::new(channel),
        })
    }
}

/// What the setup needs to know.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// directory-svc (sign-up, sign-in, users).
    pub directory_url: String,
    /// billing-svc (subscriptions to read).
    pub billing_url: String,
    /// Users to create besides the admin.
    pub users: usize,
    /// Subscriptions to create for get-subscription and list-subscriptions.
    pub subscriptions: usize,
    /// Sign in as this existing user instead of signing up a fresh directory.
    pub existing_user: Option<String>,
    pub password: String,
    pub page_size: i32,
    pub health_service: String,
    /// Deadline of one measured call.
    pub timeout: Duration,
    /// Print what the setup does on stderr.
    pub verbose: bool,
}

/// A scenario ready to run: the token and the ids its calls use.
#[derive(Debug)]
pub struct Workload {
    scenario: Scenario,
    bearer: Option<AsciiMetadataValue>,
    user_ids: Vec<String>,
    upns: Vec<String>,
    password: String,
    subscription_ids: Vec<String>,
    page_size: i32,
    health_service: String,
    timeout: Duration,
    /// What the setup made or used, for the report.
    pub setup: serde_json::Value,
}

/// The reply of a setup call, or an error naming the call.
pub async fn setup_call<T>(
    what: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(SETUP_TIMEOUT, call).await {
        Err(_) => bail!(
            "setup: {what} got no answer within {} s",
            SETUP_TIMEOUT.as_secs()
        ),
        Ok(Err(status)) => bail!(
            "setup: {what} failed: {} {}",
            code_name(status.code()),
            status.message()
        ),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

pub fn bearer(token: &str) -> anyhow::Result<AsciiMetadataValue> {
    format!("Bearer {token}")
        .parse()
        .context("the access token is not valid metadata")
}

pub fn authed<T>(message: T, bearer: &AsciiMetadataValue) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    request
}

/// A random domain prefix: `lg` and 14 hex digits (a-z 0-9, 16 characters).
pub fn random_prefix() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("lg{}", hex.get(..14).unwrap_or(&hex))
}

pub async fn sign_in(
    directory: &mut DirectoryServiceClient<Channel>,
    upn: &str,
    password: &str,
) -> anyhow::Result<AsciiMetadataValue> {
    let signed_in = setup_call(
        &format!("SignIn as {upn}"),
        directory.sign_in(dpb::SignInRequest {
            user_principal_name: upn.to_owned(),
            password: password.to_owned(),
        }),
    )
    .await?;
    bearer(&signed_in.access_token)
}

/// Signs up or signs in, and creates what `scenario` reads.
pub async fn prepare(scenario: Scenario, options: &SetupOptions) -> anyhow::Result<Workload> {
    let mut workload = Workload {
        scenario,
        bearer: None,
        user_ids: Vec::new(),
        upns: Vec::new(),
        password: options.password.clone(),
        subscription_ids: Vec::new(),
        page_size: options.page_size,
        health_service: options.health_service.clone(),
        timeout: options.timeout,
        setup: serde_json::json!({}),
    };
    if scenario == Scenario::Health {
        return Ok(workload);
    }
    let say = |line: String| {
        if options.verbose {
            eprintln!("setup: {line}");
        }
    };
    let mut directory = DirectoryServiceClient::new(connect(&options.directory_url).await?);

    let token = match &options.existing_user {
        Some(upn) => {
            say(format!("signing in as {upn}"));
            let token = sign_in(&mut directory, upn, &options.password).await?;
            workload.upns.push(upn.clone());
            if scenario == Scenario::GetUser {
                workload.user_ids = list_user_ids(&mut directory, &token, 100).await?;
            }
            if scenario == Scenario::AssignLicense {
                say(format!("listing up to {} users", options.users.max(1)));
                workload.user_ids =
                    list_user_ids(&mut directory, &token, options.users.max(1)).await?;
            }
            workload.setup = serde_json::json!({ "user": upn });
            token
        }
        None => {
            let prefix = random_prefix();
            say(format!("signing up {prefix}.onmicrosoft.com"));
            let created = setup_call(
                "CreateDirectory (sign-up)",
                directory.create_directory(dpb::CreateDirectoryRequest {
                    display_name: format!("loadgen {prefix}"),
                    domain_prefix: prefix.clone(),
                    admin_user_name: "admin".to_owned(),
                    admin_display_name: "Loadgen Admin".to_owned(),
                    admin_password: options.password.clone(),
                }),
            )
            .await?;
            let domain = created
                .directory
                .map(|d| d.initial_domain)
                .context("setup: CreateDirectory answered no directory")?;
            let admin = created
                .admin
                .context("setup: CreateDirectory answered no admin")?;
            let token = sign_in(
                &mut directory,
                &admin.user_principal_name,
                &options.password,
            )
            .await?;
            workload.user_ids.push(admin.id);
            workload.upns.push(admin.user_principal_name);
            if scenario.needs_users() {
                say(format!("creating {} users", options.users));
                for i in 1..=options.users {
                    let upn = format!("user{i}@{domain}");
                    let user = setup_call(
                        &format!("CreateUser {upn}"),
                        directory.create_user(authed(
                            dpb::CreateUserRequest {
                                user_principal_name: upn.clone(),
                                display_name: format!("Load User {i}"),
                                password: options.password.clone(),
                                roles: Vec::new(),
                            },
                            &token,
                        )),
                    )
                    .await?;
                    workload.user_ids.push(user.id);
                    workload.upns.push(upn);
                }
            }
            workload.setup = serde_json::json!({
                "domain": domain,
                "admin": workload.upns.first(),
                "users": workload.upns.len(),
            });
            token
        }
    };

    if scenario.needs_subscriptions() {
        let mut billing = BillingServiceClient::new(connect(&options.billing_url).await?);
        if options.existing_user.is_some() {
            let page = setup_call(
                "ListSubscriptions",
                billing.list_subscriptions(authed(
                    bpb::ListSubscriptionsRequest {
                        page_size: 100,
                        page_token: String::new(),
                    },
                    &token,
                )),
            )
            .await?;
            workload.subscription_ids = page.subscriptions.into_iter().map(|s| s.id).collect();
        }
        let wanted = options.subscriptions.max(1);
        if workload.subscription_ids.is_empty() {
            say(format!("creating {wanted} subscriptions"));
            for i in 1..=wanted {
                let created = setup_call(
                    "CreateSubscription",
                    billing.create_subscription(authed(
                        bpb::CreateSubscriptionRequest {
                            offer_id: OFFER.to_owned(),
                            display_name: format!("loadgen setup {i}"),
                            seats: 1,
                            request_id: uuid::Uuid::new_v4().to_string(),
                        },
                        &token,
                    )),
                )
                .await?;
                workload.subscription_ids.push(created.id);
            }
        }
        if let Some(setup) = workload.setup.as_object_mut() {
            setup.insert(
                "subscriptions".to_owned(),
                workload.subscription_ids.len().into(),
            );
        }
    }
    if scenario == Scenario::AssignLicense {
        let mut billing = BillingServiceClient::new(connect(&options.billing_url).await?);
        say("buying 1,000,000 seats of each Office 365 offer".to_owned());
        for offer in LICENSED_OFFERS {
            setup_call(
                "CreateSubscription",
                billing.create_subscription(authed(
                    bpb::CreateSubscriptionRequest {
                        offer_id: offer.to_owned(),
                        display_name: format!("loadgen licences of {offer}"),
                        seats: 1_000_000,
                        request_id: uuid::Uuid::new_v4().to_string(),
                    },
                    &token,
                )),
            )
            .await?;
        }
        if let Some(setup) = workload.setup.as_object_mut() {
            setup.insert("licensed_users".to_owned(), workload.user_ids.len().into());
        }
    }
    workload.bearer = Some(token);
    Ok(workload)
}

/// The ids of up to `wanted` users of the caller's directory, in ListUsers' order.
async fn list_user_ids(
    directory: &mut DirectoryServiceClient<Channel>,
    token: &AsciiMetadataValue,
    wanted: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    while ids.len() < wanted {
        let page = setup_call(
            "ListUsers",
            directory.list_users(authed(
                dpb::ListUsersRequest {
                    page_size: 1000,
                    page_token,
                    role: 0,
                },
                token,
            )),
        )
        .await?;
        ids.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    ids.truncate(wanted);
    Ok(ids)
}

/// The `seq`-th item, round-robin.
fn pick(items: &[String], seq: u64) -> Result<String, Status> {
    let len = u64::try_from(items.len()).unwrap_or(u64::MAX);
    if len == 0 {
        return Err(Status::internal(
            "loadgen: the setup made nothing to call with",
        ));
    }
    let index = usize::try_from(seq % len).unwrap_or_default();
    items
        .get(index)
        .cloned()
        .ok_or_else(|| Status::internal("loadgen: index out of range"))
}

impl Workload {
    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// One call of the scenario, the `seq`-th of the run, within the call timeout.
    /// The deadline travels as `grpc-timeout` (the server enforces it, and billing's call to
    /// the directory sees it). The connection does not enforce it on this side, so a local
    /// timer `DEADLINE_SLACK` later is the load generator's own: a call that gets no answer
    /// is recorded as DEADLINE_EXCEEDED at --timeout-ms plus 100 ms.
    pub async fn call(&self, conn: &mut Conn, seq: u64) -> Result<(), Status> {
        // The servers answer a deadline that passes as DEADLINE_EXCEEDED themselves.
        match tokio::time::timeout(self.timeout + DEADLINE_SLACK, self.send(conn, seq)).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(
                "no answer within --timeout-ms (loadgen's timer)",
            )),
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
    }

    async fn send(&self, conn: &mut Conn, seq: u64) -> Result<(), Status> {
        match self.scenario {
            Scenario::Health => {
                let answer = conn
                    .health
                    .check(self.request(HealthCheckRequest {
                        service: self.health_service.clone(),
                    }))
                    .await?
                    .into_inner();
                if answer.status == ServingStatus::Serving as i32 {
                    Ok(())
                } else {
                    Err(Status::unavailable(format!(
                        "health: serving status {}",
                        answer.status
                    )))
                }
            }
            Scenario::Authorize => conn
                .directory
                .authorize(self.request(dpb::AuthorizeRequest {
                    action: dpb::Action::PurchaseSubscription as i32,
                    ..Default::default()
                }))
                .await
                .map(drop),
            Scenario::GetUser => {
                let id = pick(&self.user_ids, seq)?;
                conn.directory
                    .get_user(self.request(dpb::GetUserRequest {
                        lookup: Some(dpb::get_user_request::Lookup::UserId(id)),
                    }))
                    .await
                    .map(drop)
            }
            Scenario::ListUsers => conn
                .directory
                .list_users(self.request(dpb::ListUsersRequest {
                    page_size: self.page_size,
                    page_token: String::new(),
                    role: 0,
                }))
                .await
                .map(drop),
            Scenario::Whoami => conn
                .directory
                .who_am_i(self.request(dpb::WhoAmIRequest {}))
                .await
                .map(drop),
            Scenario::CreateSubscription => conn
                .billing
                .create_subscription(self.request(bpb::CreateSubscriptionRequest {
                    offer_id: OFFER.to_owned(),
                    display_name: "loadgen".to_owned(),
                    seats: 1,
                    request_id: uuid::Uuid::new_v4().to_string(),
                }))
                .await
                .map(drop),
            Scenario::GetSubscription => {
                let id = pick(&self.subscription_ids, seq)?;
                conn.billing
                    .get_subscription(self.request(bpb::GetSubscriptionRequest {
                        subscription_id: id,
                    }))
                    .await
                    .map(drop)
            }
            Scenario::ListSubscriptions => conn
                .billing
                .list_subscriptions(self.request(bpb::ListSubscriptionsRequest {
                    page_size: self.page_size,
                    page_token: String::new(),
                }))
                .await
                .map(drop),
            Scenario::AssignLicense => {
                let user_id = pick(&self.user_ids, seq)?;
                let round = seq / u64::try_from(self.user_ids.len()).unwrap_or(1).max(1);
                let offer = LICENSED_OFFERS[usize::try_from(round % 4).unwrap_or_default()];
                conn.billing
                    .assign_license(self.request(bpb::AssignLicenseRequest {
                        user_id,
                        offer_id: offer.to_owned(),
                    }))
                    .await
                    .map(drop)
            }
            Scenario::SignIn => {
                let upn = pick(&self.upns, seq)?;
                let mut request = Request::new(dpb::SignInRequest {
                    user_principal_name: upn,
                    password: self.password.clone(),
                });
                request.set_timeout(self.timeout);
                conn.directory.sign_in(request).await.map(drop)
            }
        }
    }
}
