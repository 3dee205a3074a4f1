//! The fixture loader: fills the services' own databases directly (batched multi-row INSERTs
//! in transactions, through sqlx's `Any` driver as the services use), writing rows exactly as
//! directory-svc and billing-svc would, so a million users load in minutes rather than hours.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use argon2::password_hash::PasswordHasher as _;
use argon2::{Algorithm, Argon2, Params, Version};
use clap::Args;
use futures::{StreamExt as _, TryStreamExt as _};
use sqlx::{AnyPool, AssertSqlSafe};
use storage::db::{Engine, PoolSettings};

use billing_svc::domain::model::State;
use billing_svc::domain::offers;
use directory_svc::domain::passwords::Argon2Cost;
use directory_svc::domain::types::{DomainPrefix, Role, RoleSet};

/// Bind parameters one statement may carry on both engines (SQLite's default limit is 32766;
/// PostgreSQL's 65535).
const MAX_PARAMS: usize = 32_766;
const USER_COLUMNS: usize = 8;
const SUBSCRIPTION_COLUMNS: usize = 13;
const DIRECTORY_COLUMNS: usize = 6;
/// Fixture subscriptions alternate between these: Office 365 (owned by the directory, per
/// seat) and Azure (owned by the admin who bought it).
const OFFICE_OFFER: &str = "office365-e3";
const AZURE_OFFER: &str = "azure-pay-as-you-go";

/// `loadgen fixtures`: bulk-load directories, users and subscriptions.
#[derive(Debug, Args)]
pub struct FixtureArgs {
    /// Directories to create: `<prefix>0` .. `<prefix>N-1`.onmicrosoft.com.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub directories: u32,
    /// Users per directory, the Global Administrator `admin@...` included; the others are
    /// `user1@...`, `user2@...` holding no role.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub users_per_directory: u32,
    /// Subscriptions per directory, bought by its admin: even ones office365-e3 (owned by the
    /// directory), odd ones azure-pay-as-you-go (owned by the admin). Needs --billing-db.
    #[arg(long, default_value_t = 0)]
    pub subscriptions_per_directory: u32,
    /// Changes to add to the directory's change feed after the users: the first directory's
    /// admin's USER_ROLES_CHANGED, recorded through directory-svc's own outbox code, as a
    /// backlog to replay (`loadgen watch --replay`).
    #[arg(long, default_value_t = 0)]
    pub changes: u64,
    /// directory-svc's database (`sqlite://PATH` or `postgres://...`).
    #[arg(long)]
    pub directory_db: String,
    /// billing-svc's database.
    #[arg(long)]
    pub billing_db: Option<String>,
    /// Domain prefix of the directories (a-z 0-9; the directory number is appended, the whole
    /// at most 32 characters); default `fx` and 6 random hex digits.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Every fixture user's password (one argon2id hash is computed and stored for all).
    #[arg(long, default_value = "Corr3ct-Horse-1")]
    pub password: String,
    /// argon2id memory cost of that hash (KiB). A stored hash keeps its own cost: signing in
    /// as a fixture user costs this, whatever the service's flags. Default: the service's.
    #[arg(long, default_value_t = Argon2Cost::default().memory_kib)]
    pub argon2_memory_kib: u32,
    /// argon2id iterations of that hash. Default: the service's.
    #[arg(long, default_value_t = Argon2Cost::default().iterations)]
    pub argon2_iterations: u32,
    /// Rows per INSERT statement (capped so a statement has at most 32766 parameters).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_rows: u32,
    /// Rows per transaction.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rows_per_transaction: u32,
    /// Transactions run at once on PostgreSQL (SQLite has one writer: always 1 there).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
}

/// One fixture directory.
struct Dir {
    index: u32,
    id: String,
    prefix: String,
    domain: String,
    admin_id: String,
}

/// A range of rows of one directory, loaded in one transaction.
#[derive(Clone, Copy)]
struct Chunk {
    dir: usize,
    from: u32,
    to: u32,
}

fn chunks(dirs: usize, per_dir: u32, per_tx: u32) -> Vec<Chunk> {
    let mut out = Vec::new();
    for dir in 0..dirs {
        let mut from = 0;
        while from < per_dir {
            let to = from.saturating_add(per_tx).min(per_dir);
            out.push(Chunk { dir, from, to });
            from = to;
        }
    }
    out
}

/// `INSERT INTO <head> VALUES (..), ..` of `rows` rows of `cols` columns, in `engine`'s
/// placeholders (see [`Engine::push_value_rows`]).
fn insert_sql(engine: Engine, head: &str, cols: usize, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {head} VALUES ");
    engine.push_value_rows(&mut sql, rows, cols);
    sql
}

/// The services' tables must exist: bring the schema up to date with the services' own
/// embedded migrations (what each service runs when it starts).
async fn open(url: &str, what: &str, jobs: u32) -> anyhow::Result<AnyPool> {
    let settings = PoolSettings {
        max_connections: jobs.max(PoolSettings::default().max_connections),
        acquire_timeout: Duration::from_secs(60),
        ..PoolSettings::default()
    };
    storage::db::connect(url, &settings)
        .await
        .with_context(|| format!("cannot open the {what} database"))
}

fn hash_password(password: &str, memory_kib: u32, iterations: u32) -> anyhow::Result<String> {
    let params = Params::new(memory_kib, iterations, 1, None)
        .map_err(|e| anyhow::anyhow!("invalid argon2 cost: {e}"))?;
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    Ok(hash.to_string())
}

/// An open service database.
struct Db {
    pool: AnyPool,
    engine: Engine,
    /// Transactions to run at once.
    jobs: usize,
    /// The loader's claim on an SQLite file: a service running on it (which caches rows it
    /// believes only it writes) makes the load refuse to start.
    _ownership: Option<storage::db::Ownership>,
}

impl Db {
    async fn open(url: &str, what: &str, jobs: u32) -> anyhow::Result<Self> {
        let engine = Engine::of(url)?;
        let ownership = storage::db::Ownership::claim(url)
            .with_context(|| format!("stop the {what} service before loading its database"))?;
        Ok(Self {
            _ownership: ownership,
            pool: open(url, what, jobs).await?,
            engine,
            jobs: match engine {
                Engine::Sqlite => 1,
                Engine::Postgres => usize::try_from(jobs).unwrap_or(1),
            },
        })
    }

    /// PostgreSQL plans with statistics: gather them now rather than when autovacuum does.
    /// SQLite: fold the whole WAL into the database file (the service's background
    /// checkpoint cannot finish while the loader keeps writing), leaving a compact file.
    async fn analyze(&self, tables: &'static str) -> anyhow::Result<()> {
        let sql = match self.engine {
            Engine::Postgres => format!("ANALYZE {tables}"),
            Engine::Sqlite => "PRAGMA wal_checkpoint(TRUNCATE)".to_owned(),
        };
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(&self.pool)
            .await
            .with_context(|| sql)?;
        Ok(())
    }
}

/// Prints progress on stderr every few seconds until dropped.
struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(what: &'static str, done: Arc<AtomicU64>, total: u64) -> Self {
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let rate = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
                eprintln!("fixtures: {what} {n}/{total} ({rate:.0} rows/s)");
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn load(args: FixtureArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let subscriptions = args.subscriptions_per_directory;
    let billing_db = match (&args.billing_db, subscriptions) {
        (_, 0) => None,
        (Some(url), _) => Some(url.clone()),
        (None, _) => bail!("--subscriptions-per-directory needs --billing-db"),
    };
    let base = match &args.prefix {
        Some(prefix) => prefix.to_ascii_lowercase(),
        None => {
            let hex = uuid::Uuid::new_v4().simple().to_string();
            format!("fx{}", hex.get(..6).unwrap_or(&hex))
        }
    };
    let batch_rows = usize::try_from(args.batch_rows).unwrap_or(1000);

    // Directories, each named and checked as sign-up would.
    let now = contract::time::now_micros();
    let mut dirs = Vec::new();
    for index in 0..args.directories {
        let prefix = DomainPrefix::parse("prefix", &format!("{base}{index}")).map_err(|v| {
            anyhow::anyhow!(
                "--prefix {base}: the domain prefix {base}{index} {}",
                v.description
            )
        })?;
        dirs.push(Dir {
            index,
            id: uuid::Uuid::new_v4().to_string(),
            prefix: prefix.as_str().to_owned(),
            domain: prefix.initial_domain(),
            admin_id: uuid::Uuid::new_v4().to_string(),
        });
    }
    let dirs = Arc::new(dirs);

    let password_hash = Arc::new(hash_password(
        &args.password,
        args.argon2_memory_kib,
        args.argon2_iterations,
    )?);

    let directory = Db::open(&args.directory_db, "directory", args.jobs).await?;
    directory_svc::store::SqlStore::new(directory.pool.clone(), directory.engine)
        .await
        .context(
            "cannot bring the directory database's schema up to date (is it directory-svc's?)",
        )?;
    let billing = match &billing_db {
        Some(url) => {
            let db = Db::open(url, "billing", args.jobs).await?;
            billing_svc::store::SqlStore::new(db.pool.clone(), db.engine)
                .await
                .context(
                    "cannot bring the billing database's schema up to date (is it billing-svc's?)",
                )?;
            Some(db)
        }
        None => None,
    };

    // 1. The directories (users refer to them).
    let phase = Instant::now();
    insert_directories(&directory.pool, directory.engine, &dirs, batch_rows, now).await?;
    let directories_secs = phase.elapsed().as_secs_f64();

    // 2. The users, in chunks of one transaction each.
    let phase = Instant::now();
    let total_users = u64::from(args.directories) * u64::from(args.users_per_directory);
    let done = Arc::new(AtomicU64::new(0));
    {
        let _progress = Progress::start("users", done.clone(), total_users);
        let rows = batch_rows.min(MAX_PARAMS / USER_COLUMNS);
        futures::stream::iter(chunks(
            dirs.len(),
            args.users_per_directory,
            args.rows_per_transaction,
        ))
        .map(|chunk| {
            insert_users(
                &directory.pool,
                directory.engine,
                dirs.clone(),
                chunk,
                password_hash.clone(),
                rows,
                done.clone(),
            )
        })
        .buffer_unordered(directory.jobs)
        .try_collect::<Vec<()>>()
        .await?;
    }
    let users_secs = phase.elapsed().as_secs_f64();

    // 3. The subscriptions.
    let phase = Instant::now();
    let total_subscriptions = u64::from(args.directories) * u64::from(subscriptions);
    if let Some(billing) = &billing {
        let done = Arc::new(AtomicU64::new(0));
        let _progress = Progress::start("subscriptions", done.clone(), total_subscriptions);
        let rows = batch_rows.min(MAX_PARAMS / SUBSCRIPTION_COLUMNS);
        futures::stream::iter(chunks(dirs.len(), subscriptions, args.rows_per_transaction))
            .map(|chunk| {
                insert_subscriptions(
                    &billing.pool,
                    billing.engine,
                    dirs.clone(),
                    chunk,
                    rows,
                    now,
                    done.clone(),
                )
            })
            .buffer_unordered(billing.jobs)
            .try_collect::<Vec<()>>()
            .await?;
        // The licence pools the purchases made: the seats of each directory's active
        // subscriptions of each per-seat offer, as billing-svc counts them.
        sqlx::query(
            "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
             SELECT directory_id, offer_id, CAST(SUM(seats) AS BIGINT), 0 FROM subscriptions \
             WHERE state = 1 AND seats > 0 GROUP BY directory_id, offer_id \
             ON CONFLICT (directory_id, offer_id) DO UPDATE SET enabled = excluded.enabled",
        )
        .execute(&billing.pool)
        .await
        .context("cannot count the licence pools")?;
    }
    let subscriptions_secs = phase.elapsed().as_secs_f64();

    // 4. The change feed's backlog.
    let phase = Instant::now();
    if args.changes > 0 {
        insert_changes(
            &directory.pool,
            directory.engine,
            &dirs,
            args.changes,
            args.rows_per_transaction,
            now,
        )
        .await?;
        println!(
            "  {} changes in {:.2} s",
            args.changes,
            phase.elapsed().as_secs_f64()
        );
    }

    directory.analyze("directories, users").await?;
    directory.pool.close().await;
    if let Some(billing) = billing {
        billing.analyze("subscriptions").await?;
        billing.pool.close().await;
    }

    let total = started.elapsed().as_secs_f64();
    let first = dirs.first().map(|d| d.domain.as_str()).unwrap_or_default();
    let last = dirs.last().map(|d| d.domain.as_str()).unwrap_or_default();
    println!(
        "loaded {} directories, {total_users} users, {total_subscriptions} subscriptions in {total:.2} s",
        dirs.len()
    );
    println!(
        "  directories {directories_secs:.2} s; users {users_secs:.2} s ({:.0} rows/s); subscriptions {subscriptions_secs:.2} s ({:.0} rows/s)",
        total_users as f64 / users_secs.max(1e-9),
        total_subscriptions as f64 / subscriptions_secs.max(1e-9),
    );
    println!("  domains {first} .. {last}");
    println!(
        "  sign in as admin@{first} (Global Administrator){} with password {:?}",
        if args.users_per_directory > 1 {
            format!(" or user1@{first}")
        } else {
            String::new()
        },
        args.password
    );
    Ok(())
}

async fn insert_directories(
    pool: &AnyPool,
    engine: Engine,
    dirs: &[Dir],
    batch_rows: usize,
    now: i64,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await.context("cannot begin a transaction")?;
    for batch in dirs.chunks(batch_rows.clamp(1, MAX_PARAMS / DIRECTORY_COLUMNS)) {
        let sql = insert_sql(
            engine,
            "directories (id, display_name, domain_prefix, initial_domain, create_time, lock_version)",
            DIRECTORY_COLUMNS,
            batch.len(),
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for dir in batch {
            query = query
                .bind(dir.id.as_str())
                .bind(format!("Fixture {}", dir.index))
                .bind(dir.prefix.as_str())
                .bind(dir.domain.as_str())
                .bind(now)
                .bind(0_i64);
        }
        query.execute(&mut *tx).await.map_err(|e| {
            if storage::db::is_unique_violation(&e) {
                anyhow::anyhow!(
                    "a domain prefix {}.. is taken already: pick another --prefix",
                    batch.first().map(|d| d.prefix.as_str()).unwrap_or_default()
                )
            } else {
                anyhow::Error::new(e).context("cannot insert directories")
            }
        })?;
    }
    tx.commit().await.context("cannot commit the directories")?;
    Ok(())
}

/// One user row, as directory-svc's store writes it.
struct UserRow {
    id: String,
    upn: String,
    upn_key: String,
    display_name: String,
    roles: i64,
    create_time: i64,
}

fn user_row(dir: &Dir, n: u32) -> UserRow {
    let (id, local, display_name, roles) = if n == 0 {
        (
            dir.admin_id.clone(),
            "admin".to_owned(),
            format!("Admin {}", dir.index),
            RoleSet::of([Role::GlobalAdministrator]).bits(),
        )
    } else {
        (
            uuid::Uuid::new_v4().to_string(),
            format!("user{n}"),
            format!("User {n}"),
            RoleSet::EMPTY.bits(),
        )
    };
    let upn = format!("{local}@{}", dir.domain);
    UserRow {
        id,
        upn_key: upn.to_ascii_lowercase(),
        upn,
        display_name,
        roles,
        create_time: contract::time::now_micros(),
    }
}

async fn insert_users(
    pool: &AnyPool,
    engine: Engine,
    dirs: Arc<Vec<Dir>>,
    chunk: Chunk,
    password_hash: Arc<String>,
    batch_rows: usize,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let dir = dirs.get(chunk.dir).context("no such directory")?;
    let mut tx = pool.begin().await.context("cannot begin a transaction")?;
    let numbers: Vec<u32> = (chunk.from..chunk.to).collect();
    let full_sql: Arc<str> = insert_sql(
        engine,
        "users (id, directory_id, upn, upn_key, display_name, password_hash, roles, create_time)",
        USER_COLUMNS,
        batch_rows,
    )
    .into();
    for batch in numbers.chunks(batch_rows.max(1)) {
        let rows: Vec<UserRow> = batch.iter().map(|&n| user_row(dir, n)).collect();
        let sql: Arc<str> = if rows.len() == batch_rows {
            full_sql.clone()
        } else {
            insert_sql(
                engine,
                "users (id, directory_id, upn, upn_key, display_name, password_hash, roles, create_time)",
                USER_COLUMNS,
                rows.len(),
            )
            .into()
        };
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in &rows {
            query = query
                .bind(row.id.as_str())
                .bind(dir.id.as_str())
                .bind(row.upn.as_str())
                .bind(row.upn_key.as_str())
                .bind(row.display_name.as_str())
                .bind(password_hash.as_str())
                .bind(row.roles)
                .bind(row.create_time);
        }
        query.execute(&mut *tx).await.with_context(|| {
            format!(
                "cannot insert users {}..{} of {}",
                batch.first().copied().unwrap_or_default(),
                batch.last().copied().unwrap_or_default(),
                dir.domain
            )
        })?;
        done.fetch_add(u64::try_from(rows.len()).unwrap_or(0), Ordering::Relaxed);
    }
    tx.commit()
        .await
        .with_context(|| format!("cannot commit users of {}", dir.domain))?;
    Ok(())
}

/// One subscription row, as billing-svc's store writes a purchase made without a request_id.
struct SubscriptionRow {
    id: String,
    offer_id: &'static str,
    display_name: String,
    owner_user_id: Option<String>,
    seats: i64,
    create_time: i64,
}

fn subscription_row(dir: &Dir, n: u32, base_time: i64) -> anyhow::Result<SubscriptionRow> {
    let azure = n % 2 == 1;
    let offer = offers::find(if azure { AZURE_OFFER } else { OFFICE_OFFER })
        .context("the offer is not in billing's catalogue")?;
    Ok(SubscriptionRow {
        id: uuid::Uuid::new_v4().to_string(),
        offer_id: offer.id,
        display_name: format!("Fixture {} {n}", offer.display_name),
        owner_user_id: azure.then(|| dir.admin_id.clone()),
        seats: if offer.per_seat {
            1 + i64::from(n % 100)
        } else {
            0
        },
        // Distinct, in purchase order, as one admin buying one after another would leave them.
        create_time: base_time + i64::from(n),
    })
}

async fn insert_subscriptions(
    pool: &AnyPool,
    engine: Engine,
    dirs: Arc<Vec<Dir>>,
    chunk: Chunk,
    batch_rows: usize,
    base_time: i64,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    const HEAD: &str = "subscriptions (id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
         created_by_user_id, create_time, cancel_time, request_id, request_fingerprint, free_trial_user_id)";
    let dir = dirs.get(chunk.dir).context("no such directory")?;
    let mut tx = pool.begin().await.context("cannot begin a transaction")?;
    let numbers: Vec<u32> = (chunk.from..chunk.to).collect();
    for batch in numbers.chunks(batch_rows.max(1)) {
        let rows = batch
            .iter()
            .map(|&n| subscription_row(dir, n, base_time))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut query = sqlx::query(AssertSqlSafe(insert_sql(
            engine,
            HEAD,
            SUBSCRIPTION_COLUMNS,
            rows.len(),
        )));
        for row in &rows {
            query = query
                .bind(row.id.as_str())
                .bind(row.offer_id)
                .bind(row.display_name.as_str())
                .bind(dir.id.as_str())
                .bind(row.owner_user_id.as_deref())
                .bind(row.seats)
                .bind(State::Active.code())
                .bind(dir.admin_id.as_str())
                .bind(row.create_time)
                .bind(None::<i64>)
                .bind(None::<&str>)
                .bind(None::<&str>)
                .bind(None::<&str>);
        }
        query
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot insert subscriptions of {}", dir.domain))?;
        done.fetch_add(u64::try_from(rows.len()).unwrap_or(0), Ordering::Relaxed);
    }
    tx.commit()
        .await
        .with_context(|| format!("cannot commit subscriptions of {}", dir.domain))?;
    Ok(())
}

/// `count` USER_ROLES_CHANGED changes of the first directory's admin, through the outbox
/// directory-svc writes them with, `per_tx` to a transaction.
async fn insert_changes(
    pool: &AnyPool,
    engine: Engine,
    dirs: &[Dir],
    count: u64,
    per_tx: u32,
    now: i64,
) -> anyhow::Result<()> {
    let dir = dirs.first().context("no directory")?;
    let admin = directory_svc::domain::model::User {
        id: dir.admin_id.clone(),
        directory_id: dir.id.clone(),
        upn: format!("admin@{}", dir.domain),
        display_name: "Admin".to_owned(),
        roles: RoleSet::of([Role::GlobalAdministrator]),
        create_time: now,
        token_generation: 0,
    };
    let change = directory_svc::store::user_change(
        directory_svc::domain::model::ChangeKind::UserRolesChanged,
        &admin,
        now,
    )?;
    let outbox = storage::feed::Outbox::new(engine);
    let mut left = count;
    while left > 0 {
        let n = left.min(u64::from(per_tx.max(1)));
        let batch = vec![change.clone(); usize::try_from(n).unwrap_or(1)];
        let mut tx = pool.begin().await?;
        outbox.record(&mut tx, &batch).await?;
        tx.commit().await?;
        left -= n;
    }
    Ok(())
}
