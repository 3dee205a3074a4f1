//! Test harness: starts the real servers on random loopback ports with fresh databases and
//! hands out generated gRPC clients, the way callers use the services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use contract::directory::v1 as dpb;
use contract::directory::v1::directory_service_client::DirectoryServiceClient;
use platform::launch::Server as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use contract;
pub use platform;
pub use storage;

pub mod feed;
pub mod process;
pub mod raw;

/// The database engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on: `TEST_POSTGRES_URL`, by default
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Terminates every connection other sessions hold to the PostgreSQL database at `url`.
pub async fn terminate_connections_to(url: &str) {
    let name = url.rsplit('/').next().expect("database name").to_owned();
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .expect("admin connection");
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .expect("terminate the service's connections");
    assert!(!terminated.is_empty(), "the services hold connections");
}

/// Whether PostgreSQL tests must run (CI=true): then an unreachable server fails the test
/// instead of skipping it.
fn postgres_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// GET http://127.0.0.1:port/metrics, as a scraper would.
pub fn scrape(port: u16) -> String {
    for _ in 0..50 {
        use std::io::{Read as _, Write as _};
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let request = format!(
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut body = String::new();
                let _ = stream.read_to_string(&mut body);
                if body.starts_with("HTTP/1.1 200") {
                    return body;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no metrics on port {port}");
}

/// A fresh database for one test, removed when dropped.
/// The rows `query` returns from the test database at `url` (SQLite or PostgreSQL), read
/// behind the services' back to check what they stored.
pub async fn query_rows(url: &str, query: &str) -> Vec<sqlx::any::AnyRow> {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .expect("connect to the test database");
    sqlx::query(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

fn test_dir() -> PathBuf {
    std::env::temp_dir().join(format!("svc-test-{}", uuid::Uuid::new_v4()))
}

pub struct TestDb {
    pub url: String,
    /// A folder of the test's own (for SQLite, the database's; for both, the service token).
    dir: PathBuf,
    postgres_name: Option<String>,
}

impl TestDb {
    /// A new SQLite file in a folder of its own (the folder does not exist yet: the service
    /// must create it).
    pub fn sqlite() -> Self {
        let dir = test_dir();
        Self {
            url: format!("sqlite://{}/nested/db.sqlite", dir.display()),
            dir,
            postgres_name: None,
        }
    }

    /// The service token file the test's directory-svc creates and its billing-svc reads.
    pub fn service_token_file(&self) -> PathBuf {
        self.dir.join("service-token")
    }

    /// A new PostgreSQL database, or `None` when PostgreSQL is unreachable and not required.
    pub async fn postgres() -> Option<Self> {
        use sqlx::Connection as _;
        let admin = postgres_admin_url();
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(err) if !postgres_required() => {
                eprintln!(
                    "skipping: PostgreSQL unreachable at {admin} ({err}); set TEST_POSTGRES_URL"
                );
                return None;
            }
            Err(err) => {
                panic!("PostgreSQL is required (CI=true) but unreachable at {admin}: {err}")
            }
        };
        let name = format!("svc_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Some(Self {
            url: format!("{base}/{name}"),
            dir: test_dir(),
            postgres_name: Some(name),
        })
    }

    /// A fresh database on `backend` (`None`: PostgreSQL skipped).
    pub async fn new(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => Some(Self::sqlite()),
            Backend::Postgres => Self::postgres().await,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(name) = self.postgres_name.take() {
            // Drop runs inside the test's runtime: drop the database from a thread of its own.
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    use sqlx::Connection as _;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs each named `async fn(Backend)` as two tests, `sqlite::NAME` and `postgres::NAME`.
/// PostgreSQL tests skip when the server is unreachable, unless CI=true.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A fresh database on `backend`, or return from the test (PostgreSQL skipped).
#[macro_export]
macro_rules! db_or_skip {
    ($backend:expr) => {
        match $crate::TestDb::new($backend).await {
            Some(db) => db,
            None => return,
        }
    };
}

/// A server running on a task of this process, stopped (as SIGTERM would) by [`Self::stop`]
/// and aborted when dropped.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn spawn<F>(addr: SocketAddr, run_until: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        Self {
            addr,
            stop: Some(stop),
            task: Some(tokio::spawn(run_until(stopped))),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("connects")
    }

    /// Stops the server as SIGTERM would, and waits for it to exit cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A running directory-svc.
pub struct DirectoryServer(Running, PathBuf);

impl std::ops::Deref for DirectoryServer {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.0
    }
}

/// Cheap settings for tests: argon2 at its minimum cost.
pub fn directory_config(db: &TestDb) -> directory_svc::Config {
    let mut config = directory_svc::Config::new("127.0.0.1:0", db.url.clone());
    config.argon2 = directory_svc::domain::passwords::Argon2Cost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    config.serve.drain = Duration::from_secs(5);
    config.service_token_file = db.service_token_file();
    // Tests make many calls from one address; the abuse limits have tests of their own.
    config.limits = directory_svc::domain::AbuseLimits {
        signin_failures_per_upn_per_minute: 0,
        signin_per_peer_per_minute: 0,
        signup_per_peer_per_minute: 0,
    };
    config
}

impl DirectoryServer {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(directory_config(db)).await
    }

    pub async fn start_with(config: directory_svc::Config) -> Self {
        let token_file = config.service_token_file.clone();
        let app = directory_svc::Application::build(config)
            .await
            .expect("directory-svc starts");
        let running = Running::spawn(app.local_addr(), |stopped| {
            app.run_until(async {
                let _ = stopped.await;
            })
        });
        Self(running, token_file)
    }

    /// The service token file it created (or found): billing-svc follows its changes with it.
    pub fn service_token_file(&self) -> PathBuf {
        self.1.clone()
    }

    pub async fn client(&self) -> DirectoryServiceClient<Channel> {
        DirectoryServiceClient::new(self.channel().await)
    }

    /// Stops the server as SIGTERM would, and waits for it to exit cleanly.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// A password meeting the rules.
pub const PASSWORD: &str = "Corr3ct-Horse";

/// A signed-up directory and its admin's token.
pub struct Tenant {
    pub directory: dpb::Directory,
    pub admin: dpb::User,
    pub token: String,
    pub domain: String,
}

/// Signs up a directory with prefix `prefix` and admin `admin`, and signs the admin in.
pub async fn sign_up(client: &mut DirectoryServiceClient<Channel>, prefix: &str) -> Tenant {
    let created = client
        .create_directory(dpb::CreateDirectoryRequest {
            display_name: format!("{prefix} Ltd"),
            domain_prefix: prefix.to_owned(),
            admin_user_name: "admin".to_owned(),
            admin_display_name: "Admin".to_owned(),
            admin_password: PASSWORD.to_owned(),
        })
        .await
        .expect("sign-up")
        .into_inner();
    let directory = created.directory.expect("directory");
    let admin = created.admin.expect("admin");
    let token = sign_in(client, &admin.user_principal_name, PASSWORD).await;
    Tenant {
        domain: directory.initial_domain.clone(),
        directory,
        admin,
        token,
    }
}

pub async fn sign_in(
    client: &mut DirectoryServiceClient<Channel>,
    upn: &str,
    password: &str,
) -> String {
    client
        .sign_in(dpb::SignInRequest {
            user_principal_name: upn.to_owned(),
            password: password.to_owned(),
        })
        .await
        .expect("sign-in")
        .into_inner()
        .access_token
}

/// Creates `name@<tenant domain>` with `roles` as the tenant's admin, and signs them in.
pub async fn add_user(
    client: &mut DirectoryServiceClient<Channel>,
    tenant: &Tenant,
    name: &str,
    roles: &[dpb::Role],
) -> (dpb::User, String) {
    let upn = format!("{name}@{}", tenant.domain);
    let user = client
        .create_user(authed(
            dpb::CreateUserRequest {
                user_principal_name: upn.clone(),
                display_name: name.to_owned(),
                password: PASSWORD.to_owned(),
                roles: roles.iter().map(|r| *r as i32).collect(),
            },
            &tenant.token,
        ))
        .await
        .expect("create user")
        .into_inner();
    let token = sign_in(client, &upn, PASSWORD).await;
    (user, token)
}

/// The status's ErrorInfo reason and domain, and its BadRequest field names.
pub fn details(status: &tonic::Status) -> (String, String, Vec<String>) {
    use tonic_types::StatusExt as _;
    let details = status.get_error_details();
    let (reason, domain) = details
        .error_info()
        .map(|i| (i.reason.clone(), i.domain.clone()))
        .unwrap_or_default();
    let fields = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    (reason, domain, fields)
}

/// Asserts `result` failed with `code` and ErrorInfo `reason`; returns the status.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    reason: &str,
) -> tonic::Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let (got_reason, domain, _) = details(&status);
    assert_eq!(got_reason, reason, "unexpected reason in {status:?}");
    assert!(
        domain == "directory-svc" || domain == "billing-svc",
        "ErrorInfo.domain must name the service: {status:?}"
    );
    status
}

/// A running billing-svc.
pub struct BillingServer(Running);

impl std::ops::Deref for BillingServer {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.0
    }
}

/// Test settings for billing-svc talking to `directory_url`. It follows no directory's
/// changes (its service token file is one nobody creates) unless the test says whose:
/// [`BillingServer::start`] follows its directory's.
pub fn billing_config(db: &TestDb, directory_url: &str) -> billing_svc::Config {
    let mut config = billing_svc::Config::new("127.0.0.1:0", db.url.clone(), directory_url);
    config.serve.drain = Duration::from_secs(5);
    config.directory_service_token_file = db.dir.join("no-service-token");
    config
}

/// [`billing_config`] following `directory`'s changes.
pub fn billing_config_following(db: &TestDb, directory: &DirectoryServer) -> billing_svc::Config {
    let mut config = billing_config(db, &directory.url());
    config.directory_service_token_file = directory.service_token_file();
    config
}

impl BillingServer {
    /// billing-svc on `db`, authorised by `directory` and following its changes.
    pub async fn start(db: &TestDb, directory: &DirectoryServer) -> Self {
        Self::start_with(billing_config_following(db, directory)).await
    }

    pub async fn start_with(config: billing_svc::Config) -> Self {
        let app = billing_svc::Application::build(config)
            .await
            .expect("billing-svc starts");
        Self(Running::spawn(app.local_addr(), |stopped| {
            app.run_until(async {
                let _ = stopped.await;
            })
        }))
    }

    pub async fn client(&self) -> BillingServiceClient<Channel> {
        BillingServiceClient::new(self.channel().await)
    }

    /// Stops the server as SIGTERM would, and waits for it to exit cleanly.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

pub use contract::billing::v1::billing_service_client::BillingServiceClient;
