//! Opening a service's own database: embedded SQLite (the default) or PostgreSQL, through
//! sqlx's `Any` driver so both run the same queries and the same migrations.
//!
//! SQL written for both engines uses `$n` placeholders (SQLite accepts them), BIGINT for
//! integers and times, TEXT for ids and strings, and no engine-only syntax.

use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, ConnectOptions as _, Connection as _, Executor as _};

/// Which engine a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn of(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            anyhow::bail!("database URL must start with sqlite:// or postgres://")
        }
    }

    /// Appends the `VALUES` list of a multi-row INSERT: `rows` tuples of `cols` placeholders.
    ///
    /// On PostgreSQL they are numbered (`($1, $2), ($3, $4)`). On SQLite they are anonymous
    /// (`(?, ?), (?, ?)`, bound in order): before binding each parameter, sqlx asks SQLite for
    /// its name, which SQLite finds by walking the list of named parameters from the first, so
    /// `$1 ... $n` cost n²/2 steps per execution (346,000 for a batch of 64 purchases, 832
    /// parameters). In billing's closed-loop purchases that was over a quarter of the SQLite
    /// thread's time (docs/decisions/sqlite-anonymous-placeholders.md).
    pub fn push_value_rows(self, sql: &mut String, rows: usize, cols: usize) {
        use std::fmt::Write as _;
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for col in 0..cols {
                if col > 0 {
                    sql.push_str(", ");
                }
                match self {
                    Self::Sqlite => sql.push('?'),
                    Self::Postgres => {
                        let _ = write!(sql, "${}", row * cols + col + 1);
                    }
                }
            }
            sql.push(')');
        }
    }
}

/// How SQLite makes a commit durable (WAL mode either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SqliteSync {
    /// fsync the WAL at checkpoints only: a commit survives a crash or kill -9 of the process
    /// (it is in the OS's page cache), not a power cut. SQLite's recommended setting for WAL.
    #[default]
    Normal,
    /// fsync the WAL on every commit: survives a power cut too, at a write-latency cost.
    Full,
}

/// A pooled connection idle this long is pinged before it is used.
pub(crate) const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// A pooled connection that a background task keeps between its statements.
///
/// Every connection sqlx's pool takes back is pinged first (one more round trip per
/// statement: a network hop on PostgreSQL, a wake of the connection's worker thread on
/// SQLite). A task that runs statements back to back keeps one instead: it is pinged only
/// after a second without use (as the pool does with its own idle connections),
/// given back after a failure (the pool tests it on the way back) and when the pool starts
/// closing (see [`HeldConnection::wait`]). Measured: docs/decisions/pool-pings.md.
#[derive(Debug)]
pub struct HeldConnection {
    pool: AnyPool,
    held: Option<(PoolConnection<Any>, Instant)>,
}

impl HeldConnection {
    /// Holds nothing until the first [`HeldConnection::get`].
    pub fn new(pool: AnyPool) -> Self {
        Self { pool, held: None }
    }

    /// The kept connection (pinged first if it sat idle), or a new one from the pool.
    pub async fn get(&mut self) -> Result<&mut PoolConnection<Any>, sqlx::Error> {
        if let Some((conn, used)) = &mut self.held
            && needs_ping(used.elapsed())
            && conn.ping().await.is_err()
        {
            self.held = None;
        }
        let kept = match self.held.take() {
            Some(kept) => kept,
            None => (self.pool.acquire().await?, Instant::now()),
        };
        let (conn, used) = self.held.insert(kept);
        *used = Instant::now();
        Ok(conn)
    }

    /// A connection from the pool that answers a ping, in place of the kept one: after one
    /// connection failed, the others the pool holds may have been dropped by the database too.
    pub async fn get_live(&mut self) -> Result<&mut PoolConnection<Any>, sqlx::Error> {
        self.held = None;
        let mut failure = sqlx::Error::PoolTimedOut;
        for _ in 0..=self.pool.options().get_max_connections() {
            let mut conn = self.pool.acquire().await?;
            match conn.ping().await {
                Ok(()) => {
                    let (conn, _) = self.held.insert((conn, Instant::now()));
                    return Ok(conn);
                }
                Err(err) => {
                    conn.close_on_drop();
                    failure = err;
                }
            }
        }
        Err(failure)
    }

    /// Gives the kept connection back (after a statement failed on it: it may be broken, or
    /// hold a transaction to roll back; the pool's check on the way back deals with both).
    pub fn give_back(&mut self) {
        self.held = None;
    }

    /// Waits for `next`, giving the kept connection back if the pool starts closing meanwhile
    /// (a closing pool waits for every connection it lent).
    pub async fn wait<F: Future>(&mut self, next: F) -> F::Output {
        let mut next = std::pin::pin!(next);
        if self.held.is_some() {
            tokio::select! {
                out = &mut next => return out,
                () = self.pool.close_event() => self.held = None,
            }
        }
        next.await
    }
}

/// The database flags both binaries have (their environment variables are named by
/// `platform::launch::parse_flags`).
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseFlags {
    /// Largest number of open database connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// How long a call waits for a database connection, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub db_acquire_timeout_secs: u64,

    /// SQLite durability: `normal` (a commit survives a crash or kill -9 of the process) or
    /// `full` (it survives a power cut too: an fsync per commit).
    #[arg(long, value_enum, default_value = "normal")]
    pub sqlite_synchronous: SqliteSync,

    /// Rows kept in memory by id (0: none). On SQLite when this process owns the file, so
    /// that every write passes through it; on PostgreSQL under a lease that writers of other
    /// replicas wait on (`storage::peers`).
    #[arg(long, default_value_t = crate::cache::DEFAULT_ENTRIES as u64, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub cache_entries: u64,
}

impl DatabaseFlags {
    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.db_max_connections,
            acquire_timeout: Duration::from_secs(self.db_acquire_timeout_secs),
            sqlite_sync: self.sqlite_synchronous,
        }
    }

    pub fn cache_entries(&self) -> anyhow::Result<usize> {
        Ok(usize::try_from(self.cache_entries)?)
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub sqlite_sync: SqliteSync,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            sqlite_sync: SqliteSync::Normal,
        }
    }
}

/// SQLite has one writer at a time. Writers queue here, in the process, instead of spinning
/// in SQLite's busy handler (which sleeps in steps up to 100 ms); on PostgreSQL the gate is
/// open.
#[derive(Debug, Clone)]
pub struct WriteGate(Option<std::sync::Arc<tokio::sync::Semaphore>>);

impl WriteGate {
    pub fn for_engine(engine: Engine) -> Self {
        Self(
            (engine == Engine::Sqlite).then(|| std::sync::Arc::new(tokio::sync::Semaphore::new(1))),
        )
    }

    /// On SQLite, starts the task that checkpoints the WAL of `pool` off the write path (the
    /// pool's connections have SQLite's automatic checkpoint off); it ends when the pool
    /// closes.
    ///
    /// SQLite's automatic checkpoint runs inside the commit that crosses 1,000 WAL pages, so
    /// that commit, and every write queued behind it, waits while megabytes of pages are
    /// copied. Here, every 25 ms, a PASSIVE checkpoint copies the WAL without
    /// blocking anyone. Once the WAL is 16,384 frames (64 MiB) long, the database file is
    /// synced (still without blocking anyone), then, holding the writers' turn for a moment, a
    /// second checkpoint copies and syncs the few pages written meanwhile. The checkpoint is
    /// then complete, so the next write starts the WAL over and it stays bounded (a checkpoint
    /// that writers keep overtaking never completes, and the WAL would grow without bound).
    pub fn checkpoint_in_background(&self, pool: &AnyPool) {
        if self.0.is_some() {
            tokio::spawn(checkpoint_wal(
                pool.clone(),
                self.clone(),
                RESTART_WAL_AT_FRAMES,
            ));
        }
    }

    /// Waits for the turn to write; hold the permit until the transaction ends.
    pub async fn enter(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.0 {
            Some(gate) => gate.acquire().await.ok(),
            None => None,
        }
    }
}

/// How often the SQLite WAL is copied back into the database file.
///
/// A passive checkpoint first syncs the WAL. Under load the INSERT's thread waits in the
/// kernel's `pwrite` to the WAL for blocks under I/O (up to 6 ms at 100 ms), and the less each
/// sync has to write, the shorter such waits. Shorter also means more checkpoints that
/// complete, and after each the next commit starts the WAL over and syncs its header; on a
/// virtio disk 25 ms came out ahead. Purchases' p99 on SQLite, 25 against 100 ms, ten
/// interleaved pairs each: 4.36 against 6.17 ms at 9,333/s, 2.13 against 2.51 ms at 3,500/s;
/// 1 s and 300 ms were far worse (the WAL reached [`RESTART_WAL_AT_FRAMES`] between
/// checkpoints); docs/decisions/sqlite-wal-checkpointer.md.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(25);

/// The WAL length (in pages: 64 MiB of 4 KiB pages) from which the checkpointer holds the
/// writers back for a moment so that the WAL starts over; shorter, it just keeps growing.
/// Under a sustained purchase load the WAL grows by about 50 MiB a second, and the held
/// pass (two `fsync`s) takes 2-3 ms, sometimes 10-25: at 4 MiB every pass was a held one, and
/// about one purchase in forty waited for it. At 64 MiB a held pass comes about once a second
/// (purchases' p99 at 3,700/s open loop on SQLite, paired runs, 6 + 6 + 8 pairs: medians
/// 7.4 -> 5.8, 7.7 -> 6.1 and 8.4 -> 6.5 ms; docs/decisions/sqlite-wal-checkpointer.md).
/// Without sustained writes the passive pass catches up and the WAL starts over on its own,
/// long before this.
const RESTART_WAL_AT_FRAMES: i64 = 16_384;

async fn checkpoint_wal(pool: AnyPool, writers: WriteGate, restart_at_frames: i64) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The WAL's length in frames, as the checkpoint left it.
    let checkpoint = async |pool: &AnyPool, phase: &'static str| {
        let started = std::time::Instant::now();
        let done = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(pool)
            .await;
        metrics::histogram!("sqlite_checkpoint_seconds", "phase" => phase)
            .record(started.elapsed().as_secs_f64());
        done.map(|(_busy, frames, _copied)| frames)
    };
    let database = database_file(&pool).await;
    while !pool.is_closed() {
        every.tick().await;
        let mut done = match checkpoint(&pool, "passive").await {
            // Short enough: let it grow rather than make the writers wait.
            Ok(frames) if frames < restart_at_frames => continue,
            other => other.map(drop),
        };
        if done.is_ok()
            && let Some(file) = &database
        {
            // A checkpoint that completes syncs the database file. Sync what this one wrote
            // now, before the writers wait, so the second one only syncs its few pages.
            let file = file.clone();
            done = tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .unwrap_or_else(|join| Err(std::io::Error::other(join)))
                .map_err(sqlx::Error::Io);
        }
        if done.is_ok() {
            let _turn = writers.enter().await;
            done = checkpoint(&pool, "gated").await.map(drop);
        }
        if let Err(err) = done
            && !pool.is_closed()
        {
            tracing::warn!(error = %err, "WAL checkpoint failed");
        }
    }
}

/// The main database file of the SQLite pool, opened for syncing (`None` if it cannot be).
async fn database_file(pool: &AnyPool) -> Option<std::sync::Arc<std::fs::File>> {
    let rows = sqlx::query("PRAGMA database_list")
        .fetch_all(pool)
        .await
        .ok()?;
    let path: String = rows.iter().find_map(|row| {
        use sqlx::Row as _;
        let name: String = row.try_get("name").ok()?;
        (name == "main").then(|| row.try_get("file").ok()).flatten()
    })?;
    match std::fs::File::open(&path) {
        Ok(file) => Some(std::sync::Arc::new(file)),
        Err(err) => {
            tracing::warn!(error = %err, path, "cannot open the database file to sync it");
            None
        }
    }
}

/// Opens the pool, creating the database on first start (an SQLite file and its folder, or
/// a PostgreSQL database), with WAL on SQLite and the configured synchronous mode, so an
/// acknowledged write survives a crash of the process.
pub async fn connect(url: &str, settings: &PoolSettings) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let engine = Engine::of(url)?;
    let url = match engine {
        Engine::Sqlite => sqlite_url(url)?,
        Engine::Postgres => {
            create_postgres_database(url).await?;
            url.to_owned()
        }
    };
    let options = AnyConnectOptions::from_str(&url)
        .context("database URL is not valid")?
        .disable_statement_logging();

    if engine == Engine::Sqlite {
        // The journal mode is a property of the file: set it once, before the pool opens.
        let mut conn = options
            .connect()
            .await
            .context("cannot open the SQLite database")?;
        conn.execute("PRAGMA journal_mode = WAL")
            .await
            .context("cannot switch SQLite to WAL")?;
    }

    let pragmas = match settings.sqlite_sync {
        SqliteSync::Normal => {
            "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
             PRAGMA wal_autocheckpoint = 0;"
        }
        SqliteSync::Full => {
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
             PRAGMA wal_autocheckpoint = 0;"
        }
    };
    AnyPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // sqlx pings every connection when it returns to the pool (and closes it if that
        // fails); pinging again before each use would cost one more round trip per statement.
        // A connection idle for a while, or since another was lost, is pinged before use, so
        // one a PostgreSQL restart broke while it sat in the pool is replaced instead of
        // failing a caller (docs/decisions/pool-pings.md).
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if !needs_ping(meta.idle_for) {
                    return Ok(true);
                }
                Ok(conn.ping().await.is_ok())
            })
        })
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if engine == Engine::Sqlite {
                    conn.execute(pragmas).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .context("cannot connect to the database")
}

/// Creates the PostgreSQL database the URL names if it does not exist yet. Two replicas
/// starting at once may both try: the loser finds it created.
async fn create_postgres_database(url: &str) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase as _;
    if sqlx::Any::database_exists(url)
        .await
        .context("cannot reach PostgreSQL")?
    {
        return Ok(());
    }
    if let Err(err) = sqlx::Any::create_database(url).await
        && !sqlx::Any::database_exists(url).await.unwrap_or(false)
    {
        return Err(anyhow::Error::new(err).context("cannot create the database"));
    }
    tracing::info!("created the database");
    Ok(())
}

/// This process's exclusive claim on an SQLite database: an advisory lock on `PATH.lock`,
/// held until the value drops (or the process dies, when the kernel releases it). A second
/// service process, or the fixture loader, started on the same file refuses to start. That
/// makes the process the only writer of the file, which the in-memory caches of
/// [`crate::cache`] rely on, and it keeps the in-process [`WriteGate`] the only queue of
/// writers.
#[derive(Debug)]
pub struct Ownership {
    _lock: std::fs::File,
    path: std::path::PathBuf,
}

impl Ownership {
    /// Claims the SQLite file `url` names; `None` on PostgreSQL, where replicas share the
    /// database by design.
    pub fn claim(url: &str) -> anyhow::Result<Option<Self>> {
        if Engine::of(url)? != Engine::Sqlite {
            return Ok(None);
        }
        let url = sqlite_url(url)?;
        let rest = url.strip_prefix("sqlite://").unwrap_or(&url);
        let path = rest.split_once('?').map_or(rest, |(path, _)| path);
        // One lock per file, however the URL spells its path (relative, `./`, `..`, a
        // symlink): the path with its folder (and the file, once it exists) resolved.
        let mut lock_path = real_path(Path::new(path)).into_os_string();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self {
                _lock: file,
                path: lock_path,
            })),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another process is using the database {path} (it holds {}); \
                 an SQLite database belongs to one process: stop it, or use PostgreSQL to run replicas",
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(err)) => {
                Err(anyhow::Error::new(err).context(format!("cannot lock {}", lock_path.display())))
            }
        }
    }

    pub fn lock_path(&self) -> &Path {
        &self.path
    }
}

/// `path` with symlinks, `.` and `..` resolved: the file's own if it exists, else its folder's
/// (which [`sqlite_url`] created) joined with its name.
fn real_path(path: &Path) -> std::path::PathBuf {
    // A symlink to a file not created yet: create it (an empty file is an empty SQLite
    // database), so the link resolves to the name another process would give.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(folder), path.file_name()) {
        (Ok(folder), Some(name)) => folder.join(name),
        _ => path.to_path_buf(),
    }
}

/// `sqlite://PATH`: creates PATH's folder and asks SQLite to create the file.
fn sqlite_url(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    anyhow::ensure!(
        !path.is_empty(),
        "sqlite URL needs a file path: sqlite://PATH"
    );
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    }
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    if !params.iter().any(|p| p.starts_with("mode=")) {
        params.push("mode=rwc");
    }
    Ok(format!("sqlite://{path}?{}", params.join("&")))
}

/// Now, in microseconds since the Unix epoch: when a secret was created (for people reading
/// the table; nothing reads it back).
fn created_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
}

/// The named secret kept in the `secrets` table, created (32 random bytes) by the first
/// process that asks; every replica on the same database reads the same bytes.
pub async fn secret(pool: &AnyPool, name: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut fresh = [0u8; 32];
    getrandom::fill(&mut fresh).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    sqlx::query(
        "INSERT INTO secrets (name, secret, create_time) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(engine.encode(fresh))
    .bind(created_micros())
    .execute(pool)
    .await
    .context("cannot store the secret")?;
    let stored: String = sqlx::query_scalar("SELECT secret FROM secrets WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .context("cannot read the secret")?;
    engine
        .decode(stored)
        .context("the stored secret is not base64")
}

/// When a statement last failed because the database dropped or refused its connection, in
/// milliseconds since [`process_clock_ms`]'s start (0: never).
static CONNECTION_LOST_MS: AtomicU64 = AtomicU64::new(0);

fn process_clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Whether a pooled connection that has sat idle for `idle_for` must be pinged before use:
/// after [`IDLE_BEFORE_PING`], or when a connection was lost since it went idle (a database
/// restart or failover drops all of them at once; pinging spares the next callers from
/// finding that out one failed call per pooled connection).
fn needs_ping(idle_for: Duration) -> bool {
    if idle_for >= IDLE_BEFORE_PING {
        return true;
    }
    let lost = CONNECTION_LOST_MS.load(Ordering::Relaxed);
    let idle_since = process_clock_ms().saturating_sub(idle_for.as_millis() as u64);
    // Millisecond clock: a loss in the same millisecond counts as after.
    lost != 0 && lost + 1 >= idle_since
}

/// A failed statement as a service reports it: the database out of reach right now (the
/// caller may retry) or a failure a retry will not mend, with the error as its source.
#[derive(Debug)]
pub enum Failure {
    Unavailable(anyhow::Error),
    Internal(anyhow::Error),
}

/// Classifies `err` for a service's store (through [`note_failure`], so a lost connection
/// also marks the pool's idle connections for a ping).
pub fn classify(err: sqlx::Error) -> Failure {
    let unavailable = note_failure(&err);
    let err = anyhow::Error::new(err).context("database");
    if unavailable {
        Failure::Unavailable(err)
    } else {
        Failure::Internal(err)
    }
}

/// Classifies a failed statement for the caller: `true` when the database is unavailable
/// right now (the caller may retry; see [`is_unavailable`]). Such a failure also marks every
/// connection idle in the pool as suspect, so each is pinged before its next use.
pub fn note_failure(err: &sqlx::Error) -> bool {
    let unavailable = is_unavailable(err);
    if unavailable {
        CONNECTION_LOST_MS.store(process_clock_ms().max(1), Ordering::Relaxed);
    }
    unavailable
}

/// Whether `err` means the database cannot be reached right now (the caller may retry), as
/// opposed to a failure of the statement itself.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        // PostgreSQL's SQLSTATE classes 08 (connection exception) and 57P (the server is
        // shutting down, restarting, or terminated this backend).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// A stand-in for `err` to give each of several callers whose work shared one failed
/// statement: it keeps whether the database was unavailable (and the message), which is all
/// a caller acts on.
pub fn copy_error(err: &sqlx::Error) -> sqlx::Error {
    if is_unavailable(err) {
        sqlx::Error::Io(std::io::Error::other(err.to_string()))
    } else {
        sqlx::Error::Protocol(format!("a shared statement failed: {err}"))
    }
}

/// Whether `err` is a unique-constraint violation (on either engine).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Publishes the pool's size every few seconds until the returned task is aborted.
pub fn watch_pool(pool: sqlx::AnyPool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let size = f64::from(pool.size());
            let idle = pool.num_idle() as f64;
            metrics::gauge!("db_pool_connections", "state" => "idle").set(idle);
            metrics::gauge!("db_pool_connections", "state" => "in_use").set((size - idle).max(0.0));
            metrics::gauge!("db_pool_max_connections")
                .set(f64::from(pool.options().get_max_connections()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_rows_are_numbered_on_postgres_and_anonymous_on_sqlite() {
        let mut postgres = String::new();
        Engine::Postgres.push_value_rows(&mut postgres, 2, 3);
        assert_eq!(postgres, "($1, $2, $3), ($4, $5, $6)");
        let mut sqlite = String::from("VALUES ");
        Engine::Sqlite.push_value_rows(&mut sqlite, 2, 3);
        assert_eq!(sqlite, "VALUES (?, ?, ?), (?, ?, ?)");
    }

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = std::env::temp_dir().join(format!("contract-db-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/x.db", dir.display());
        let out = sqlite_url(&url).expect("valid url");
        assert!(out.ends_with("x.db?mode=rwc"), "{out}");
        assert!(dir.exists());
        let _ = std::fs::remove_dir_all(dir);
        assert_eq!(
            sqlite_url("sqlite://a.db?mode=ro").expect("valid url"),
            "sqlite://a.db?mode=ro"
        );
        assert!(Engine::of("mysql://x").is_err());
    }

    /// SQLite's own checkpoint is off on the pool's connections: without the background
    /// checkpointer, these commits would leave a WAL of tens of MiB.
    /// Commits 3 KB rows, at least `commits` of them and for at least 500 ms, on a pool whose
    /// WAL `checkpointer` looks after; the WAL's length once the checkpointer has had three
    /// more passes, and the commits made.
    async fn wal_after_constant_writes(
        commits: usize,
        checkpointer: impl FnOnce(&AnyPool, &WriteGate),
    ) -> (u64, usize) {
        let dir = std::env::temp_dir().join(format!("contract-wal-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/w.db", dir.display());
        let pool = connect(&url, &PoolSettings::default())
            .await
            .expect("opens");
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .execute(&pool)
            .await
            .expect("table");
        let gate = WriteGate::for_engine(Engine::Sqlite);
        checkpointer(&pool, &gate);
        let body = "x".repeat(3000);
        let started = std::time::Instant::now();
        let mut made = 0;
        while made < commits || started.elapsed() < Duration::from_millis(500) {
            let _turn = gate.enter().await;
            sqlx::query("INSERT INTO t (body) VALUES ($1)")
                .bind(&body)
                .execute(&pool)
                .await
                .expect("insert");
            made += 1;
        }
        tokio::time::sleep(CHECKPOINT_EVERY * 3).await;
        let wal = std::fs::metadata(dir.join("w.db-wal")).map_or(0, |m| m.len());
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
        (wal, made)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_checkpoint_keeps_the_wal_small_under_constant_writes() {
        // The production threshold (64 MiB) replaced by a 1,024-page one (4 MiB), so that
        // these commits cross it many times. Each commit appends its pages (a 4 KiB page of
        // the row, and the b-tree pages it touches): without the checkpointer these commits
        // leave a WAL of about 75 MB.
        let (wal, commits) = wal_after_constant_writes(6000, |pool, gate| {
            tokio::spawn(checkpoint_wal(pool.clone(), gate.clone(), 1024));
        })
        .await;
        assert!(
            wal < 32 * 1024 * 1024,
            "the WAL grew to {wal} bytes over {commits} commits"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_production_checkpointer_bounds_the_wal_at_its_threshold() {
        // About 225 MB of WAL without the checkpointer; with it, at most the threshold and
        // what the commits add while a pass runs. The commits here come as fast as they can,
        // and on a loaded two-core machine a pass can wait for a core while they do: 64 MiB
        // of margin (a CI run measured 101.5 MB against a margin of 32 MiB), still far below
        // the unbounded WAL.
        let (wal, commits) = wal_after_constant_writes(18_000, |pool, gate| {
            gate.checkpoint_in_background(pool);
        })
        .await;
        let bound = RESTART_WAL_AT_FRAMES as u64 * 4096 + 64 * 1024 * 1024;
        assert!(
            wal < bound,
            "the WAL grew to {wal} bytes (bound {bound}) over {commits} commits"
        );
    }

    #[test]
    fn one_process_owns_an_sqlite_file() {
        let dir = std::env::temp_dir().join(format!("contract-own-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/x.db", dir.display());
        let first = Ownership::claim(&url)
            .expect("first claim")
            .expect("sqlite");
        let second = Ownership::claim(&url).expect_err("the file is taken");
        assert!(
            second
                .to_string()
                .contains("another process is using the database"),
            "{second}"
        );
        // The same file through a detour, and through a symlink to the file itself.
        std::fs::create_dir_all(dir.join("sub")).expect("sub folder");
        let mut others = vec![format!("sqlite://{}/./sub/../x.db", dir.display())];
        #[cfg(unix)]
        {
            std::fs::write(dir.join("x.db"), b"").expect("the file");
            std::os::unix::fs::symlink(dir.join("x.db"), dir.join("alias.db")).expect("symlink");
            others.push(format!("sqlite://{}/alias.db", dir.display()));
        }
        for other in others {
            let refused = Ownership::claim(&other).expect_err("the same file");
            assert!(
                refused.to_string().contains("another process"),
                "{other}: {refused}"
            );
        }
        drop(first);
        let again = Ownership::claim(&url).expect("free again").expect("sqlite");
        assert!(again.lock_path().ends_with("x.db.lock"));
        assert!(
            Ownership::claim("postgres://h/db")
                .expect("no claim needed")
                .is_none()
        );
        drop(again);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A symlink whose target does not exist yet names the target's lock, not its own: the
    /// process given the target's own path is refused.
    #[cfg(unix)]
    #[test]
    fn a_dangling_symlink_claims_its_target() {
        let dir = std::env::temp_dir().join(format!("contract-link-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("folder");
        std::os::unix::fs::symlink(dir.join("real.db"), dir.join("link.db")).expect("symlink");
        let through_link = Ownership::claim(&format!("sqlite://{}/link.db", dir.display()))
            .expect("claim")
            .expect("sqlite");
        let refused = Ownership::claim(&format!("sqlite://{}/real.db", dir.display()))
            .expect_err("the same file");
        assert!(refused.to_string().contains("another process"), "{refused}");
        drop(through_link);
        let _ = std::fs::remove_dir_all(dir);
    }
}
