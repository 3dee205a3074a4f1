//! Crash safety with the real binaries: a write-heavy workload runs while the service under
//! test is killed with SIGKILL (no drain, no cleanup) at random moments and restarted on the
//! same database, on a new port. Every call that got no answer is retried until it is
//! answered (purchases with the same request_id), and afterwards every acknowledged write is
//! there exactly once, whole.
//!
//! The kill moments come from a seed printed at the start of each test; set `CRASH_SEED` to
//! replay one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::process::Proc;
use integration_tests::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

type DirectoryClient = dpb::directory_service_client::DirectoryServiceClient<Channel>;

/// Purchases in the billing test.
const PURCHASES: usize = 1000;
/// Users created in the directory test.
const USERS: usize = 300;
/// Concurrent callers.
const WORKERS: usize = 16;
/// The workload must be done by then (each test stays under a minute).
const WORKLOAD_BUDGET: Duration = Duration::from_secs(45);

/// SplitMix64: a small deterministic generator, so a failing run can be replayed by its seed.
struct Rng(u64);

impl Rng {
    /// Seeded from `CRASH_SEED`, or from the clock (printed, to replay a failure).
    fn from_env(test: &str) -> Self {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: CRASH_SEED={seed}");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// The address of the service's current incarnation: a restart publishes its new port here
/// and callers reconnect when they see the generation change.
#[derive(Clone)]
struct Target(Arc<RwLock<(u64, String)>>);

impl Target {
    fn new(url: String) -> Self {
        Self(Arc::new(RwLock::new((0, url))))
    }

    fn get(&self) -> (u64, String) {
        self.0.read().expect("target lock").clone()
    }

    fn set(&self, url: String) {
        let mut current = self.0.write().expect("target lock");
        *current = (current.0 + 1, url);
    }
}

/// A channel that connects on first use and reconnects by itself; calls to a dead address
/// fail fast with UNAVAILABLE.
fn lazy_channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .expect("valid url")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// Whether `status` means the call got no answer from the service (so it may not have
/// happened, or happened unseen) and must be retried: a transport failure (no ErrorInfo from
/// the service), UNAVAILABLE, or RESOURCE_EXHAUSTED (a call shed before any work).
fn unanswered(status: &Status, service: &str) -> bool {
    let (_, domain, _) = details(status);
    domain != service || matches!(status.code(), Code::Unavailable | Code::ResourceExhausted)
}

/// directory-svc as [`Proc::directory`] starts it, but without the per-address sign-in limit:
/// the test signs in every user it created from one address.
fn directory_proc(database_url: &str) -> Proc {
    Proc::start(
        "directory-svc",
        &[
            "--database-url",
            database_url,
            "--argon2-memory-kib",
            "64",
            "--argon2-iterations",
            "1",
        ],
        &[("DIRECTORY_SIGNIN_PER_PEER_PER_MINUTE", "0")],
    )
}

/// What the workload saw.
#[derive(Default)]
struct Counters {
    acked: AtomicUsize,
    retries: AtomicUsize,
    done: AtomicBool,
}

/// Kills the service `kills` times at random moments of the workload (after a random number
/// of acknowledged calls, so each kill lands while calls are in flight), keeps it down for a
/// random while, and restarts it on the same database. Returns the last incarnation and how
/// many kills happened.
async fn chaos(
    mut proc: Proc,
    start: impl Fn() -> Proc + Send + Sync + Clone + 'static,
    target: Target,
    counters: Arc<Counters>,
    total: usize,
    kills: usize,
    rng: &mut Rng,
) -> (Proc, usize) {
    // Kill points spread over the workload: one in each of `kills` equal slices of 10%..85%.
    let span = (total * 75 / 100 / kills) as u64;
    let thresholds: Vec<usize> = (0..kills as u64)
        .map(|k| (total as u64 / 10 + k * span + rng.range(0, span)) as usize)
        .collect();
    let mut done = 0;
    for threshold in thresholds {
        while counters.acked.load(Ordering::Acquire) < threshold {
            if counters.done.load(Ordering::Acquire) {
                return (proc, done);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.range(0, 20_000))).await;
        let downtime = Duration::from_millis(rng.range(0, 300));
        let start = start.clone();
        proc = tokio::task::spawn_blocking(move || {
            proc.kill9();
            std::thread::sleep(downtime);
            start()
        })
        .await
        .expect("restart the service");
        target.set(proc.url());
        done += 1;
    }
    (proc, done)
}

/// Waits for every worker, then tells [`chaos`] the workload is over.
async fn join_workers<T>(
    workers: Vec<tokio::task::JoinHandle<T>>,
    counters: Arc<Counters>,
) -> Vec<T> {
    let mut results = Vec::with_capacity(workers.len());
    for worker in workers {
        results.push(worker.await.expect("worker task"));
    }
    counters.done.store(true, Ordering::Release);
    results
}

fn purchase(i: usize, request_id: &str) -> bpb::CreateSubscriptionRequest {
    let (offer, seats) = match i % 3 {
        0 => ("azure-pay-as-you-go", 0),
        1 => ("office365-e3", (i % 50 + 1) as i32),
        _ => ("office365-business-basic", (i % 7 + 1) as i32),
    };
    bpb::CreateSubscriptionRequest {
        offer_id: offer.into(),
        display_name: format!("crash {i:04}"),
        seats,
        request_id: request_id.into(),
    }
}

/// One purchasing worker: takes the next request index until all are done, and retries each
/// unanswered call with the same request_id (reconnecting after a restart) until answered.
/// Returns every (index, subscription) it saw acknowledged, or what went wrong.
async fn purchase_worker(
    target: Target,
    token: Arc<String>,
    request_ids: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    deadline: Instant,
) -> Result<Vec<(usize, bpb::Subscription)>, String> {
    let (mut generation, url) = target.get();
    let mut client = BillingServiceClient::new(lazy_channel(&url));
    let mut acked = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::AcqRel);
        if i >= PURCHASES {
            return Ok(acked);
        }
        let request = purchase(i, &request_ids[i]);
        loop {
            if Instant::now() > deadline {
                return Err(format!("purchase {i} still unanswered at the deadline"));
            }
            let (now, url) = target.get();
            if now != generation {
                generation = now;
                client = BillingServiceClient::new(lazy_channel(&url));
            }
            match client
                .create_subscription(authed(request.clone(), &token))
                .await
            {
                Ok(answer) => {
                    acked.push((i, answer.into_inner()));
                    counters.acked.fetch_add(1, Ordering::AcqRel);
                    break;
                }
                Err(status) if unanswered(&status, "billing-svc") => {
                    counters.retries.fetch_add(1, Ordering::AcqRel);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => return Err(format!("purchase {i} was refused: {status:?}")),
            }
        }
    }
}

async fn billing_survives_sigkill_without_losing_or_duplicating_purchases(backend: Backend) {
    // The binaries are built once per test run, before the clock starts.
    integration_tests::process::binary("directory-svc");
    let started = Instant::now();
    let ddb = db_or_skip!(backend);
    let bdb = db_or_skip!(backend);
    let mut rng = Rng::from_env("billing crash");
    let directory = Proc::directory(&ddb.url);
    let billing = Proc::billing(&bdb.url, &directory.url());
    let mut dir = DirectoryClient::new(lazy_channel(&directory.url()));
    let tenant = sign_up(&mut dir, "crashbilling").await;

    let target = Target::new(billing.url());
    let counters = Arc::new(Counters::default());
    let request_ids: Arc<Vec<String>> = Arc::new(
        (0..PURCHASES)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect(),
    );
    let token = Arc::new(tenant.token.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let workload = Instant::now();
    let deadline = workload + WORKLOAD_BUDGET;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            tokio::spawn(purchase_worker(
                target.clone(),
                token.clone(),
                request_ids.clone(),
                next.clone(),
                counters.clone(),
                deadline,
            ))
        })
        .collect();
    let start = {
        let (db, directory_url) = (bdb.url.clone(), directory.url());
        move || Proc::billing(&db, &directory_url)
    };
    let ((billing, kills), results) = tokio::join!(
        chaos(
            billing,
            start,
            target.clone(),
            counters.clone(),
            PURCHASES,
            4,
            &mut rng,
        ),
        join_workers(workers, counters.clone()),
    );
    let mut acked: HashMap<usize, Vec<bpb::Subscription>> = HashMap::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(seen) => {
                for (i, sub) in seen {
                    acked.entry(i).or_default().push(sub);
                }
            }
            Err(why) => failures.push(why),
        }
    }
    let retries = counters.retries.load(Ordering::Acquire);
    eprintln!(
        "billing crash ({backend:?}): {kills} kills, {retries} retried calls, workload {:?}",
        workload.elapsed()
    );
    assert!(failures.is_empty(), "workers failed: {failures:#?}");
    assert_eq!(kills, 4, "billing was killed four times mid-workload");
    assert!(retries > 0, "the kills interrupted calls");
    assert_eq!(acked.len(), PURCHASES, "every purchase was acknowledged");

    // From here on, talk to the last incarnation only.
    let mut bill = BillingServiceClient::new(lazy_channel(&billing.url()));

    // Every acknowledged subscription exists, exactly as acknowledged.
    let ids: Vec<(usize, bpb::Subscription)> = acked
        .iter()
        .map(|(i, subs)| (*i, subs[0].clone()))
        .collect();
    let gets = futures::stream::iter(ids.clone())
        .map(|(i, sub)| {
            let mut bill = bill.clone();
            let token = tenant.token.clone();
            async move {
                let got = bill
                    .get_subscription(authed(
                        bpb::GetSubscriptionRequest {
                            subscription_id: sub.id.clone(),
                        },
                        &token,
                    ))
                    .await;
                (i, sub, got)
            }
        })
        .buffer_unordered(WORKERS)
        .collect::<Vec<_>>()
        .await;
    for (i, sub, got) in gets {
        let got = got
            .unwrap_or_else(|s| panic!("acknowledged purchase {i} ({}) is missing: {s:?}", sub.id))
            .into_inner();
        assert_eq!(got, sub, "purchase {i} reads back as acknowledged");
    }

    // Exactly one subscription per request_id, 1,000 in all, every field whole.
    let listed = list_subscriptions(&mut bill, &tenant.token).await;
    let distinct: HashSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(distinct.len(), listed.len(), "no subscription listed twice");
    assert_eq!(
        listed.len(),
        PURCHASES,
        "one subscription per request_id, none lost and none doubled"
    );
    let mut by_request: HashMap<usize, &bpb::Subscription> = HashMap::new();
    for sub in &listed {
        let i: usize = sub
            .display_name
            .strip_prefix("crash ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected display name in {sub:?}"));
        assert!(
            by_request.insert(i, sub).is_none(),
            "request {i} created two subscriptions"
        );
        let asked = purchase(i, &request_ids[i]);
        let azure = asked.offer_id.starts_with("azure");
        assert!(uuid::Uuid::parse_str(&sub.id).is_ok(), "{sub:?}");
        assert_eq!(sub.offer_id, asked.offer_id, "{sub:?}");
        assert_eq!(sub.seats, asked.seats, "{sub:?}");
        assert_eq!(sub.directory_id, tenant.directory.id, "{sub:?}");
        assert_eq!(sub.created_by_user_id, tenant.admin.id, "{sub:?}");
        assert_eq!(sub.state, bpb::SubscriptionState::Active as i32, "{sub:?}");
        assert!(sub.create_time.is_some(), "{sub:?}");
        assert!(sub.cancel_time.is_none(), "{sub:?}");
        if azure {
            assert_eq!(sub.product_family, bpb::ProductFamily::Azure as i32);
            assert_eq!(sub.owner_type, bpb::OwnerType::User as i32);
            assert_eq!(sub.owner_user_id, tenant.admin.id);
        } else {
            assert_eq!(sub.product_family, bpb::ProductFamily::Office365 as i32);
            assert_eq!(sub.owner_type, bpb::OwnerType::Directory as i32);
            assert_eq!(sub.owner_user_id, "");
        }
    }
    for (i, subs) in &acked {
        for sub in subs {
            assert_eq!(
                by_request[i].id, sub.id,
                "every answer for request {i} names the one stored subscription"
            );
        }
    }

    // A retry now, long after the crashes, still answers with the first subscription.
    let replays = futures::stream::iter(0..PURCHASES)
        .map(|i| {
            let mut bill = bill.clone();
            let request = authed(purchase(i, &request_ids[i]), &tenant.token);
            async move { (i, bill.create_subscription(request).await) }
        })
        .buffer_unordered(WORKERS)
        .collect::<Vec<_>>()
        .await;
    for (i, replay) in replays {
        let replay = replay
            .unwrap_or_else(|s| panic!("replay of request {i}: {s:?}"))
            .into_inner();
        assert_eq!(&replay, by_request[&i], "replay of request {i}");
    }
    assert_eq!(
        list_subscriptions(&mut bill, &tenant.token).await.len(),
        PURCHASES
    );
    drop(directory);
    eprintln!("billing crash ({backend:?}) took {:?}", started.elapsed());
}

/// Every subscription the caller may see, reading pages of 250.
async fn list_subscriptions(
    bill: &mut BillingServiceClient<Channel>,
    token: &str,
) -> Vec<bpb::Subscription> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    for _ in 0..100 {
        let page = bill
            .list_subscriptions(authed(
                bpb::ListSubscriptionsRequest {
                    page_size: 250,
                    page_token: page_token.clone(),
                },
                token,
            ))
            .await
            .expect("list subscriptions")
            .into_inner();
        all.extend(page.subscriptions);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
    panic!("ListSubscriptions never reached its last page");
}

/// Every user of the caller's directory, reading pages of 100.
async fn list_users(dir: &mut DirectoryClient, token: &str) -> Vec<dpb::User> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    for _ in 0..100 {
        let page = dir
            .list_users(authed(
                dpb::ListUsersRequest {
                    page_size: 100,
                    page_token: page_token.clone(),
                    role: 0,
                },
                token,
            ))
            .await
            .expect("list users")
            .into_inner();
        all.extend(page.users);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
    panic!("ListUsers never reached its last page");
}

fn new_user(i: usize, domain: &str) -> dpb::CreateUserRequest {
    dpb::CreateUserRequest {
        user_principal_name: format!("crash{i:03}@{domain}"),
        display_name: format!("Crash {i}"),
        password: PASSWORD.into(),
        roles: if i.is_multiple_of(7) {
            vec![dpb::Role::BillingAdministrator as i32]
        } else {
            vec![]
        },
    }
}

/// How a CreateUser was acknowledged.
enum Created {
    /// The call answered the new user.
    User(dpb::User),
    /// A retry of an unanswered call found the name taken: the first call created it.
    AlreadyExisted,
}

/// One user-creating worker, as [`purchase_worker`].
async fn create_user_worker(
    target: Target,
    token: Arc<String>,
    domain: Arc<String>,
    next: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    deadline: Instant,
) -> Result<Vec<(usize, Created)>, String> {
    let (mut generation, url) = target.get();
    let mut client = DirectoryClient::new(lazy_channel(&url));
    let mut acked = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::AcqRel);
        if i >= USERS {
            return Ok(acked);
        }
        let request = new_user(i, &domain);
        let mut retried = false;
        loop {
            if Instant::now() > deadline {
                return Err(format!("user {i} still unanswered at the deadline"));
            }
            let (now, url) = target.get();
            if now != generation {
                generation = now;
                client = DirectoryClient::new(lazy_channel(&url));
            }
            match client.create_user(authed(request.clone(), &token)).await {
                Ok(answer) => {
                    acked.push((i, Created::User(answer.into_inner())));
                    break;
                }
                Err(status) if retried && status.code() == Code::AlreadyExists => {
                    acked.push((i, Created::AlreadyExisted));
                    break;
                }
                Err(status) if unanswered(&status, "directory-svc") => {
                    retried = true;
                    counters.retries.fetch_add(1, Ordering::AcqRel);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => return Err(format!("user {i} was refused: {status:?}")),
            }
        }
        counters.acked.fetch_add(1, Ordering::AcqRel);
    }
}

async fn directory_survives_sigkill_without_losing_acknowledged_users(backend: Backend) {
    // The binaries are built once per test run, before the clock starts.
    integration_tests::process::binary("directory-svc");
    let started = Instant::now();
    let ddb = db_or_skip!(backend);
    let mut rng = Rng::from_env("directory crash");
    let directory = directory_proc(&ddb.url);
    let mut dir = DirectoryClient::new(lazy_channel(&directory.url()));
    let tenant = sign_up(&mut dir, "crashdirectory").await;

    let target = Target::new(directory.url());
    let counters = Arc::new(Counters::default());
    let token = Arc::new(tenant.token.clone());
    let domain = Arc::new(tenant.domain.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let workload = Instant::now();
    let deadline = workload + WORKLOAD_BUDGET;
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            tokio::spawn(create_user_worker(
                target.clone(),
                token.clone(),
                domain.clone(),
                next.clone(),
                counters.clone(),
                deadline,
            ))
        })
        .collect();
    let start = {
        let db = ddb.url.clone();
        move || directory_proc(&db)
    };
    let ((directory, kills), results) = tokio::join!(
        chaos(
            directory,
            start,
            target.clone(),
            counters.clone(),
            USERS,
            3,
            &mut rng,
        ),
        join_workers(workers, counters.clone()),
    );
    let mut acked: HashMap<usize, Created> = HashMap::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(seen) => acked.extend(seen),
            Err(why) => failures.push(why),
        }
    }
    let retries = counters.retries.load(Ordering::Acquire);
    let found_taken = acked
        .values()
        .filter(|c| matches!(c, Created::AlreadyExisted))
        .count();
    eprintln!(
        "directory crash ({backend:?}): {kills} kills, {retries} retried calls, \
         {found_taken} retries found their user already created, workload {:?}",
        workload.elapsed()
    );
    assert!(failures.is_empty(), "workers failed: {failures:#?}");
    assert_eq!(
        kills, 3,
        "directory-svc was killed three times mid-workload"
    );
    assert!(retries > 0, "the kills interrupted calls");
    assert_eq!(acked.len(), USERS, "every creation was acknowledged");

    // The token issued before the crashes still works: the signing key is in the database.
    let mut dir = DirectoryClient::new(lazy_channel(&directory.url()));
    let users = list_users(&mut dir, &tenant.token).await;
    assert_eq!(users.len(), USERS + 1, "the admin and every created user");
    let by_upn: HashMap<String, &dpb::User> = users
        .iter()
        .map(|u| (u.user_principal_name.to_ascii_lowercase(), u))
        .collect();
    assert_eq!(by_upn.len(), users.len(), "no UPN listed twice");
    for i in 0..USERS {
        let asked = new_user(i, &tenant.domain);
        let stored = by_upn
            .get(&asked.user_principal_name.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("acknowledged user {i} is missing"));
        assert!(uuid::Uuid::parse_str(&stored.id).is_ok(), "{stored:?}");
        assert_eq!(stored.directory_id, tenant.directory.id, "{stored:?}");
        assert_eq!(stored.display_name, asked.display_name, "{stored:?}");
        assert_eq!(stored.roles, asked.roles, "{stored:?}");
        assert!(stored.create_time.is_some(), "{stored:?}");
        if let Some(Created::User(answered)) = acked.get(&i) {
            assert_eq!(*stored, answered, "user {i} reads back as acknowledged");
        }
    }

    // Every acknowledged user can sign in with the password it was created with.
    let sign_ins = futures::stream::iter(0..USERS)
        .map(|i| {
            let mut dir = dir.clone();
            let upn = new_user(i, &tenant.domain).user_principal_name;
            async move {
                let result = dir
                    .sign_in(dpb::SignInRequest {
                        user_principal_name: upn.clone(),
                        password: PASSWORD.into(),
                    })
                    .await;
                (upn, result)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (upn, result) in sign_ins {
        let signed = result
            .unwrap_or_else(|s| panic!("{upn} cannot sign in: {s:?}"))
            .into_inner();
        assert_eq!(
            signed
                .user
                .expect("user")
                .user_principal_name
                .to_lowercase(),
            upn.to_lowercase()
        );
        assert!(!signed.access_token.is_empty());
    }
    eprintln!("directory crash ({backend:?}) took {:?}", started.elapsed());
}

on_both_backends!(
    billing_survives_sigkill_without_losing_or_duplicating_purchases,
    directory_survives_sigkill_without_losing_acknowledged_users,
);
