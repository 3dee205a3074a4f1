//! The in-memory caches change nothing a caller can see: a role change, a deletion, a restore
//! or a cancellation applies to the very next call even while other calls keep reading (and
//! refilling the cache with) the same rows, on SQLite (where the process owns the file) and on
//! PostgreSQL (where the replica holds a lease; `peer_caches.rs` covers several replicas). And
//! one process owns an SQLite file: a second server on the same file refuses to start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::platform::launch::Server as _;
use integration_tests::*;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

type Dir = dpb::directory_service_client::DirectoryServiceClient<Channel>;

const ROUNDS: usize = 60;
const READERS: usize = 6;

/// `READERS` tasks calling a read in a loop until stopped.
struct Readers {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Readers {
    fn start<F, Fut>(read: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let tasks = (0..READERS)
            .map(|_| {
                let (stop, calls, read) = (stop.clone(), calls.clone(), read.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        read().await;
                        calls.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self { stop, calls, tasks }
    }

    /// Waits until the readers have made a few calls (and so filled the cache).
    async fn running(&self) {
        while self.calls.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
    }

    /// Stops the readers; the number of calls they made.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("reader");
        }
        self.calls.load(Ordering::SeqCst)
    }
}

fn get_subscription(id: &str, token: &str) -> tonic::Request<bpb::GetSubscriptionRequest> {
    authed(
        bpb::GetSubscriptionRequest {
            subscription_id: id.to_owned(),
        },
        token,
    )
}

async fn authorize(dir: &mut Dir, token: &str) -> Result<dpb::AuthorizeResponse, tonic::Status> {
    dir.authorize(authed(
        dpb::AuthorizeRequest {
            action: dpb::Action::PurchaseSubscription as i32,
            ..Default::default()
        },
        token,
    ))
    .await
    .map(|r| r.into_inner())
}

async fn role_changes_apply_to_the_next_call_under_concurrent_reads(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut dir = server.client().await;
    let tenant = sign_up(&mut dir, "fabrikam").await;
    let (buyer, token) = add_user(&mut dir, &tenant, "buyer", &[]).await;

    let readers = Readers::start({
        let (channel, token) = (server.channel().await, token.clone());
        move || {
            let (mut dir, token) = (Dir::new(channel.clone()), token.clone());
            async move {
                authorize(&mut dir, &token)
                    .await
                    .expect("reader authorizes");
            }
        }
    });

    for round in 0..ROUNDS {
        let billing_admin = round % 2 == 0;
        let roles = if billing_admin {
            vec![dpb::Role::BillingAdministrator as i32]
        } else {
            vec![]
        };
        dir.set_user_roles(authed(
            dpb::SetUserRolesRequest {
                user_id: buyer.id.clone(),
                roles: roles.clone(),
            },
            &tenant.token,
        ))
        .await
        .expect("the admin sets the buyer's roles");
        let decision = authorize(&mut dir, &token).await.expect("authorize");
        assert_eq!(
            decision.allowed, billing_admin,
            "round {round}: Authorize decided from roles older than the acknowledged change"
        );
        assert_eq!(decision.roles, roles, "round {round}");
        let me = dir
            .who_am_i(authed(dpb::WhoAmIRequest {}, &token))
            .await
            .expect("whoami")
            .into_inner();
        assert_eq!(me.user.expect("user").roles, roles, "round {round}");
    }
    assert!(
        readers.stop().await > ROUNDS as u64,
        "the readers must overlap the writes"
    );
}

async fn a_deleted_users_token_fails_at_once_under_concurrent_reads(backend: Backend) {
    let db = db_or_skip!(backend);
    let server = DirectoryServer::start(&db).await;
    let mut dir = server.client().await;
    let tenant = sign_up(&mut dir, "northwind").await;

    for round in 0..ROUNDS / 4 {
        let (user, token) = add_user(&mut dir, &tenant, &format!("temp{round}"), &[]).await;
        authorize(&mut dir, &token)
            .await
            .expect("a live user's token");
        let readers = Readers::start({
            let (channel, token) = (server.channel().await, token.clone());
            move || {
                let (mut dir, token) = (Dir::new(channel.clone()), token.clone());
                async move {
                    // Before the deletion: allowed=false (no role); after: UNAUTHENTICATED.
                    let _ = authorize(&mut dir, &token).await;
                }
            }
        });
        readers.running().await;
        dir.delete_user(authed(
            dpb::DeleteUserRequest {
                user_id: user.id.clone(),
            },
            &tenant.token,
        ))
        .await
        .expect("the admin deletes the user");
        let err = authorize(&mut dir, &token)
            .await
            .expect_err("a deleted user's token stops working at once");
        assert_eq!(err.code(), Code::Unauthenticated, "round {round}: {err:?}");
        // Restored while the readers go on: back at once, and the old token stays dead.
        dir.restore_user(authed(
            dpb::RestoreUserRequest {
                user_id: user.id.clone(),
                new_user_principal_name: String::new(),
            },
            &tenant.token,
        ))
        .await
        .expect("the admin restores the user");
        let err = authorize(&mut dir, &token)
            .await
            .expect_err("a token from before the deletion stays dead");
        assert_eq!(err.code(), Code::Unauthenticated, "round {round}: {err:?}");
        let fresh = sign_in(&mut dir, &user.user_principal_name, PASSWORD).await;
        let decision = authorize(&mut dir, &fresh)
            .await
            .expect("the restored user's new token");
        assert_eq!(decision.user_id, user.id, "round {round}");
        readers.stop().await;
        let err = authorize(&mut dir, &token)
            .await
            .expect_err("still refused");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}

async fn a_cancellation_applies_to_the_next_read_under_concurrent_reads(backend: Backend) {
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let mut bill = billing.client().await;
    let tenant = sign_up(&mut dir, "tailspin").await;

    for round in 0..ROUNDS / 4 {
        let bought = bill
            .create_subscription(authed(
                bpb::CreateSubscriptionRequest {
                    offer_id: "office365-e3".into(),
                    display_name: format!("seats {round}"),
                    seats: 1,
                    request_id: String::new(),
                },
                &tenant.token,
            ))
            .await
            .expect("purchase")
            .into_inner();
        let readers = Readers::start({
            let (channel, token, id) = (
                billing.channel().await,
                tenant.token.clone(),
                bought.id.clone(),
            );
            move || {
                let mut bill = BillingServiceClient::new(channel.clone());
                let request = get_subscription(&id, &token);
                async move {
                    bill.get_subscription(request).await.expect("reader gets");
                }
            }
        });
        readers.running().await;
        let cancelled = bill
            .cancel_subscription(authed(
                bpb::CancelSubscriptionRequest {
                    subscription_id: bought.id.clone(),
                },
                &tenant.token,
            ))
            .await
            .expect("cancel")
            .into_inner();
        assert_eq!(cancelled.state, bpb::SubscriptionState::Cancelled as i32);
        let read = bill
            .get_subscription(get_subscription(&bought.id, &tenant.token))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            read.state,
            bpb::SubscriptionState::Cancelled as i32,
            "round {round}: GetSubscription returned the subscription as it was before the acknowledged cancellation"
        );
        assert_eq!(read.cancel_time, cancelled.cancel_time);
        readers.stop().await;
    }
}

on_both_backends!(
    role_changes_apply_to_the_next_call_under_concurrent_reads,
    a_deleted_users_token_fails_at_once_under_concurrent_reads,
    a_cancellation_applies_to_the_next_read_under_concurrent_reads,
);

#[tokio::test]
async fn one_process_owns_an_sqlite_file() {
    let ddb = TestDb::sqlite();
    let bdb = TestDb::sqlite();
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;

    let refused = directory_svc::Application::build(directory_config(&ddb))
        .await
        .expect_err("a second directory-svc on the same file refuses to start");
    assert!(
        format!("{refused:#}").contains("another process is using the database"),
        "{refused:#}"
    );
    let refused = billing_svc::Application::build(billing_config(&bdb, &directory.url()))
        .await
        .expect_err("a second billing-svc on the same file refuses to start");
    assert!(
        format!("{refused:#}").contains("another process is using the database"),
        "{refused:#}"
    );

    // Stopping the owner releases the file.
    billing.stop().await;
    directory.stop().await;
    let directory = DirectoryServer::start(&ddb).await;
    let mut dir = directory.client().await;
    let tenant = sign_up(&mut dir, "contoso").await;
    authorize(&mut dir, &tenant.token)
        .await
        .expect("the restarted owner serves");
}
