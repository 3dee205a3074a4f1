//! The change feeds' machinery, the same for both services: the outbox a write records its
//! changes in, one reader per process that fans new changes out in memory to every open
//! stream, each stream's own driver (backlog from the database, then live), and the removal
//! of changes past the retention.
//!
//! The schema is each service's `changes` table and its one-row `change_sequence` counter.
//! A write takes its changes' numbers with `UPDATE change_sequence SET last = last + n`, the
//! last statements before its commit: the row stays locked until the commit, so writes commit
//! in number order on every engine and with any number of replicas, and a reader that sees
//! `last = N` can read every change up to N. Numbers have no holes (a rolled-back write gives
//! its numbers back), so a stream can tell a change that is gone from one that never was.
//!
//! It knows no wire type and no service's rules: a service decodes its rows (`Decode`), and
//! gives each stream a [`Rule`] that may end it; the ends the contract names are its
//! refusals (`contract::refusal::Refusal`), which every service's error carries.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use sqlx::{AnyPool, Row as _};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio::time::Instant;

use contract::cursor::StartAt;
use contract::refusal::Refusal;

use crate::db::Engine;

/// The PostgreSQL channel a commit with changes notifies (named in `Outbox::record`'s
/// statement too).
const CHANNEL: &str = "changes";
/// Changes one INSERT writes (5 parameters each).
const INSERT_ROWS: usize = 100;
/// Rows read per statement, by the reader and by a stream's backlog.
const PAGE: i64 = 512;
/// Batches the reader keeps for streams that have not taken them yet; a stream further
/// behind reads from the database instead.
const BATCHES: usize = 64;
/// How often the reader looks without being told (a lost notification, another process's
/// commit on a database without notifications).
const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// One change to record.
#[derive(Debug, Clone)]
pub struct NewChange {
    /// Microseconds since the epoch, by the service's clock.
    pub time: i64,
    /// The service's change type.
    pub kind: i64,
    pub directory_id: String,
    /// The resource as the service encodes it (never a secret).
    pub resource: String,
}

/// Where writes record their changes, and how the feed hears of their commits.
#[derive(Debug, Clone)]
pub struct Outbox {
    engine: Engine,
    wake: Arc<tokio::sync::Notify>,
}

impl Outbox {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            wake: Arc::default(),
        }
    }

    /// Records `changes`, in this order, within `tx`: call it as the transaction's last
    /// statements before its commit, since taking the numbers holds `change_sequence`'s row
    /// until then. One number-taking statement for all of them, and one INSERT per 100
    /// changes. On PostgreSQL the commit also notifies every replica's reader.
    pub async fn record(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        changes: &[NewChange],
    ) -> Result<(), sqlx::Error> {
        let Ok(count) = i64::try_from(changes.len()) else {
            return Err(sqlx::Error::Protocol("too many changes".into()));
        };
        if count == 0 {
            return Ok(());
        }
        let numbers = match self.engine {
            Engine::Sqlite => {
                "UPDATE change_sequence SET last = last + $1 WHERE id = 1 RETURNING last"
            }
            // The notification rides on the same statement (delivered at commit, once per
            // transaction and channel): one round trip fewer for every write.
            Engine::Postgres => {
                "UPDATE change_sequence SET last = last + $1 WHERE id = 1 \
                 RETURNING last, (SELECT 1 FROM pg_notify('changes', '')) AS notified"
            }
        };
        let last: i64 = sqlx::query_scalar(numbers)
            .bind(count)
            .fetch_one(&mut **tx)
            .await?;
        let mut seq = last - count;
        for chunk in changes.chunks(INSERT_ROWS) {
            let mut sql = String::from(
                "INSERT INTO changes (seq, change_time, directory_id, kind, resource) VALUES ",
            );
            self.engine.push_value_rows(&mut sql, chunk.len(), 5);
            let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
            for change in chunk {
                seq += 1;
                insert = insert
                    .bind(seq)
                    .bind(change.time)
                    .bind(change.directory_id.clone())
                    .bind(change.kind)
                    .bind(change.resource.clone());
            }
            insert.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Tells this process's reader that a write with changes committed.
    pub fn committed(&self) {
        self.wake.notify_one();
    }
}

/// Turns a stored change (its kind and resource) into the service's own value, once per
/// change for all streams.
pub type Decode<T> = fn(kind: i64, resource: &str) -> T;

/// A committed change.
#[derive(Debug)]
pub struct Entry<T> {
    /// Its number: the feed's order.
    pub seq: i64,
    /// Microseconds since the Unix epoch.
    pub time: i64,
    pub directory_id: String,
    pub value: T,
}

/// Consecutive changes `after + 1 ..= upto` as the reader read them (those of every
/// directory; numbers without an entry are none).
struct Batch<T> {
    after: i64,
    upto: i64,
    entries: Vec<Arc<Entry<T>>>,
}

/// What a stream sends.
#[derive(Debug)]
pub enum Event<T> {
    Change(Arc<Entry<T>>),
    /// No change: the stream's position (every change up to it was delivered or was not
    /// the stream's).
    Bookmark(i64),
}

/// Why a stream ended.
#[derive(Debug)]
pub enum End<E> {
    /// The changes after the stream's position were removed (retention).
    Expired,
    /// The reader did not take a change for longer than the stall limit.
    TooSlow,
    /// The server is stopping.
    Closing,
    /// The database failed.
    Failed(sqlx::Error),
    /// The stream's rule ended it.
    Rule(E),
}

impl<E: From<Refusal>> End<E> {
    /// The service's error for this end: the contract's refusal of each (`CURSOR_EXPIRED`,
    /// `CONSUMER_TOO_SLOW`, `SHUTTING_DOWN`), the rule's own error, or `database`'s for a
    /// failed statement.
    pub fn into_error(self, database: impl FnOnce(sqlx::Error) -> E) -> E {
        match self {
            End::Expired => Refusal::CursorExpired.into(),
            End::TooSlow => Refusal::ConsumerTooSlow.into(),
            End::Closing => Refusal::ShuttingDown.into(),
            End::Failed(err) => database(err),
            End::Rule(err) => err,
        }
    }
}

/// What may end a stream besides the feed: a service's checks of its watcher.
pub trait Rule<T>: Send + 'static {
    type Error: Send + 'static;
    /// Before `entry` is delivered: `Err` ends the stream instead.
    fn admit(&mut self, entry: &Entry<T>) -> Result<(), Self::Error>;
    /// At least once a second on an open stream.
    fn tick(&mut self) -> Result<(), Self::Error>;
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the oldest change still kept.
    Oldest,
    /// After the newest change.
    Now,
    /// After the change (or bookmark) numbered so.
    After(i64),
}

/// Where a WatchChanges request starts (`contract::cursor::StartAt`), whether a bookmark
/// comes first, and the time of its cursor (to check against the retention).
pub fn begin(start: StartAt) -> (Start, bool, Option<i64>) {
    match start {
        StartAt::Oldest => (Start::Oldest, false, None),
        StartAt::Now => (Start::Now, true, None),
        StartAt::After(position) => (Start::After(position.seq), false, Some(position.time)),
    }
}

/// The feed's settings.
#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// An idle stream sends a bookmark at least this often.
    pub bookmark_every: Duration,
    /// A stream whose reader leaves its queue full this long is ended (`End::TooSlow`).
    pub stall_limit: Duration,
    /// Events a stream holds for its reader beyond what HTTP/2 flow control lets through.
    pub queue: usize,
    /// Streams open at once; more are refused.
    pub max_streams: usize,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            bookmark_every: Duration::from_secs(10),
            stall_limit: Duration::from_secs(30),
            queue: 64,
            max_streams: 4096,
        }
    }
}

/// The change feed's flags, the same in both services.
#[derive(Debug, Clone, clap::Args)]
pub struct FeedFlags {
    /// How long changes are kept for WatchChanges; older cursors get OUT_OF_RANGE (7d, 12h).
    #[arg(long, default_value = "7d", value_parser = platform::launch::human_duration)]
    pub change_retention: Duration,

    /// Change streams open at once on this server; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watch_streams: u32,

    /// A change stream whose reader takes nothing for this long ends with ABORTED
    /// (CONSUMER_TOO_SLOW).
    #[arg(long, default_value = "30s", value_parser = platform::launch::human_duration)]
    pub watch_stall_limit: Duration,

    /// How often an idle change stream gets a bookmark (at most 10s).
    #[arg(long, default_value = "10s", value_parser = platform::launch::human_duration)]
    pub watch_bookmark_interval: Duration,
}

/// The contract's default retention of changes.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl FeedFlags {
    pub fn settings(&self) -> anyhow::Result<FeedSettings> {
        anyhow::ensure!(
            self.watch_bookmark_interval <= Duration::from_secs(10),
            "--watch-bookmark-interval must be at most 10s"
        );
        Ok(FeedSettings {
            bookmark_every: self.watch_bookmark_interval,
            stall_limit: self.watch_stall_limit,
            max_streams: self.max_watch_streams as usize,
            ..FeedSettings::default()
        })
    }
}

/// A stream could not be opened.
#[derive(Debug)]
pub enum OpenError {
    TooManyStreams,
    Closing,
    Failed(sqlx::Error),
}

impl OpenError {
    /// The service's error: `TOO_MANY_STREAMS`, `SHUTTING_DOWN`, or `database`'s.
    pub fn into_error<E: From<Refusal>>(self, database: impl FnOnce(sqlx::Error) -> E) -> E {
        match self {
            OpenError::TooManyStreams => Refusal::TooManyStreams.into(),
            OpenError::Closing => Refusal::ShuttingDown.into(),
            OpenError::Failed(err) => database(err),
        }
    }
}

/// A service's change feed in this process.
pub struct Feed<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Feed<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Feed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

struct Shared<T> {
    pool: AnyPool,
    decode: Decode<T>,
    batches: broadcast::Sender<Arc<Batch<T>>>,
    closing: watch::Sender<bool>,
    streams: Arc<Semaphore>,
    settings: FeedSettings,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl<T: Send + Sync + 'static> Feed<T> {
    /// Starts this process's reader of the feed: woken by `outbox`'s commits, by PostgreSQL's
    /// notifications of every replica's commits (a `LISTEN` connection to `url`), and twice a
    /// second regardless.
    pub fn start(
        pool: AnyPool,
        url: &str,
        outbox: &Outbox,
        decode: Decode<T>,
        settings: FeedSettings,
    ) -> Self {
        let (batches, _) = broadcast::channel(BATCHES);
        let shared = Arc::new(Shared {
            pool,
            decode,
            batches,
            closing: watch::Sender::new(false),
            streams: Arc::new(Semaphore::new(settings.max_streams)),
            settings,
            tasks: Mutex::default(),
        });
        let mut tasks = vec![tokio::spawn(follow(shared.clone(), outbox.wake.clone()))];
        if outbox.engine == Engine::Postgres {
            tasks.push(tokio::spawn(listen(url.to_owned(), outbox.wake.clone())));
        }
        if let Ok(mut slot) = shared.tasks.lock() {
            slot.extend(tasks);
        }
        Self { shared }
    }

    /// Removes, every `every`, the changes older than `cutoff()` (microseconds since the
    /// epoch), oldest first and only up to the first one that is not: a stream reading
    /// within the retention never finds a change after its position gone.
    pub fn remove_in_background(&self, cutoff: impl Fn() -> i64 + Send + 'static, every: Duration) {
        let pool = self.shared.pool.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = remove_before(&pool, cutoff()).await {
                    crate::db::note_failure(&err);
                    tracing::warn!(error = %err, "cannot remove old changes");
                }
            }
        });
        if let Ok(mut slot) = self.shared.tasks.lock() {
            slot.push(task);
        }
    }

    /// Ends every stream with `End::Closing` at once and stops the reader.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }

    /// The number of the newest committed change (0 when there is none).
    pub async fn head(&self) -> Result<i64, sqlx::Error> {
        head(&self.shared.pool).await
    }

    /// Opens a stream from `start`, of `directory`'s changes or (`None`) of all, with a
    /// bookmark first when `bookmark_first`, ended early by `rule`.
    pub async fn watch<R: Rule<T>>(
        &self,
        start: Start,
        directory: Option<String>,
        bookmark_first: bool,
        rule: R,
    ) -> Result<Watch<T, R::Error>, OpenError> {
        if *self.shared.closing.borrow() {
            return Err(OpenError::Closing);
        }
        let permit = self
            .shared
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| OpenError::TooManyStreams)?;
        // Subscribed before the backlog is read, so no batch falls between the two.
        let batches = self.shared.batches.subscribe();
        let position = match start {
            Start::After(seq) => seq,
            Start::Now => head(&self.shared.pool).await.map_err(OpenError::Failed)?,
            Start::Oldest => match oldest(&self.shared.pool).await {
                Ok(Some(oldest)) => oldest - 1,
                Ok(None) => head(&self.shared.pool).await.map_err(OpenError::Failed)?,
                Err(err) => return Err(OpenError::Failed(err)),
            },
        };
        let (tx, rx) = mpsc::channel(self.shared.settings.queue.max(1));
        let end = Arc::new(Mutex::new(None));
        let stream = Stream {
            shared: self.shared.clone(),
            position,
            directory,
            rule,
            tx,
            batches,
            last_sent: Instant::now(),
        };
        let slot = end.clone();
        tokio::spawn(async move {
            let _permit: OwnedSemaphorePermit = permit;
            let ended = stream.run(bookmark_first).await;
            if let (Some(ended), Ok(mut slot)) = (ended, slot.lock()) {
                *slot = Some(ended);
            }
            // The sender drops here, which wakes the reader to see the end.
        });
        Ok(Watch {
            rx,
            end,
            done: false,
        })
    }
}

/// One stream's driver: the backlog from the database, then the reader's batches.
struct Stream<T, R: Rule<T>> {
    shared: Arc<Shared<T>>,
    /// Every change up to here was delivered or was not this stream's.
    position: i64,
    directory: Option<String>,
    rule: R,
    tx: mpsc::Sender<Event<T>>,
    batches: broadcast::Receiver<Arc<Batch<T>>>,
    last_sent: Instant,
}

/// Why a step stopped the stream: an end to tell the reader, or (`None`) the reader is gone.
type Stop<E> = Option<End<E>>;

impl<T: Send + Sync + 'static, R: Rule<T>> Stream<T, R> {
    async fn run(mut self, bookmark_first: bool) -> Stop<R::Error> {
        let result = self.steps(bookmark_first).await;
        match result {
            Ok(()) => None,
            Err(stop) => stop,
        }
    }

    async fn steps(&mut self, bookmark_first: bool) -> Result<(), Stop<R::Error>> {
        if bookmark_first {
            self.send(Event::Bookmark(self.position)).await?;
        }
        let tick_every = (self.shared.settings.bookmark_every / 2).min(Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = self.shared.closing.subscribe();
        loop {
            self.catch_up().await?;
            // Live: the reader's batches, until one shows a hole (this stream fell behind).
            loop {
                tokio::select! {
                    biased;
                    () = stopped(&mut closing) => return Err(Some(End::Closing)),
                    () = self.tx.closed() => return Err(None),
                    batch = self.batches.recv() => match batch {
                        Ok(batch) => {
                            if batch.upto <= self.position {
                                continue;
                            }
                            if batch.after > self.position {
                                break;
                            }
                            for entry in &batch.entries {
                                if entry.seq > self.position && self.wants(entry) {
                                    self.deliver(entry.clone()).await?;
                                }
                            }
                            self.position = batch.upto;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            return Err(Some(End::Closing));
                        }
                    },
                    _ = tick.tick() => {
                        self.rule.tick().map_err(|e| Some(End::Rule(e)))?;
                        if self.last_sent.elapsed() + tick_every >= self.shared.settings.bookmark_every {
                            self.send(Event::Bookmark(self.position)).await?;
                        }
                    }
                }
            }
        }
    }

    fn closing(&self) -> bool {
        *self.shared.closing.borrow()
    }

    fn wants(&self, entry: &Entry<T>) -> bool {
        self.directory
            .as_deref()
            .is_none_or(|d| d == entry.directory_id)
    }

    /// Reads from the database every change after the position up to the newest committed.
    async fn catch_up(&mut self) -> Result<(), Stop<R::Error>> {
        let failed = |e| Some(End::Failed(e));
        let pool = self.shared.pool.clone();
        let head = head(&pool).await.map_err(failed)?;
        while self.position < head {
            if self.closing() {
                return Err(Some(End::Closing));
            }
            let rows = read(
                &pool,
                self.position,
                head,
                self.directory.as_deref(),
                self.shared.decode,
            )
            .await
            .map_err(failed)?;
            // Read after the page: a removal that reached past the position before or
            // while the page was read shows here (removal takes the oldest first).
            let oldest = oldest(&pool).await.map_err(failed)?;
            if oldest.is_none_or(|o| o > self.position + 1) {
                return Err(Some(End::Expired));
            }
            let full = rows.len() as i64 >= PAGE;
            let last = rows.last().map(|e| e.seq);
            for entry in rows {
                self.deliver(Arc::new(entry)).await?;
            }
            self.position = match (full, last) {
                (true, Some(last)) => last,
                _ => head,
            };
        }
        Ok(())
    }

    async fn deliver(&mut self, entry: Arc<Entry<T>>) -> Result<(), Stop<R::Error>> {
        self.rule.admit(&entry).map_err(|e| Some(End::Rule(e)))?;
        let seq = entry.seq;
        self.send(Event::Change(entry)).await?;
        self.position = seq;
        Ok(())
    }

    async fn send(&mut self, event: Event<T>) -> Result<(), Stop<R::Error>> {
        let mut closing = self.shared.closing.subscribe();
        let sent = tokio::select! {
            biased;
            () = stopped(&mut closing) => return Err(Some(End::Closing)),
            sent = self.tx.send_timeout(event, self.shared.settings.stall_limit) => sent,
        };
        match sent {
            Ok(()) => {
                self.last_sent = Instant::now();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(_)) => Err(Some(End::TooSlow)),
            Err(SendTimeoutError::Closed(_)) => Err(None),
        }
    }
}

/// A stream as its reader sees it: events, then at most one end, which comes before any
/// event still queued.
pub struct Watch<T, E> {
    rx: mpsc::Receiver<Event<T>>,
    end: Arc<Mutex<Option<End<E>>>>,
    done: bool,
}

impl<T, E> Watch<T, E> {
    fn take_end(&self) -> Option<End<E>> {
        self.end.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl<T, E> futures::Stream for Watch<T, E> {
    type Item = Result<Event<T>, End<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(end) = self.take_end() {
            self.done = true;
            return Poll::Ready(Some(Err(end)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(self.take_end().map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The reader: after each wake, reads the changes committed since the last and sends them to
/// the streams as one or more batches. With no stream open it reads nothing.
async fn follow<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, wake: Arc<tokio::sync::Notify>) {
    let mut position = None;
    let mut closing = shared.closing.subscribe();
    loop {
        if let Err(err) = read_new(&shared, &mut position).await {
            crate::db::note_failure(&err);
            tracing::warn!(error = %err, "change feed: cannot read new changes");
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(FALLBACK_POLL) => {}
            () = stopped(&mut closing) => return,
        }
    }
}

async fn read_new<T>(shared: &Shared<T>, position: &mut Option<i64>) -> Result<(), sqlx::Error> {
    // No stream: nothing to read, not even the head (a write costs the feed nothing then).
    // A stream that opens catches up from the database by itself, then takes the batches
    // from wherever the reader starts again.
    if shared.batches.receiver_count() == 0 {
        *position = None;
        return Ok(());
    }
    let head = head(&shared.pool).await?;
    let Some(mut at) = *position else {
        // Where the reader starts again. A stream behind it learns so from this empty batch
        // (it starts after the stream's position) and reads up to here from the database.
        let _ = shared.batches.send(Arc::new(Batch {
            after: head,
            upto: head,
            entries: Vec::new(),
        }));
        *position = Some(head);
        return Ok(());
    };
    while at < head {
        let entries = read(&shared.pool, at, head, None, shared.decode).await?;
        let upto = match entries.last() {
            Some(last) if entries.len() as i64 >= PAGE => last.seq,
            _ => head,
        };
        let batch = Batch {
            after: at,
            upto,
            entries: entries.into_iter().map(Arc::new).collect(),
        };
        // No receiver left: nobody to tell.
        let _ = shared.batches.send(Arc::new(batch));
        at = upto;
        *position = Some(at);
    }
    Ok(())
}

/// Returns once the feed is closing.
async fn stopped(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// Wakes the reader on every replica's commit with changes (PostgreSQL).
async fn listen(url: String, wake: Arc<tokio::sync::Notify>) {
    loop {
        let outcome: Result<(), sqlx::Error> = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(CHANNEL).await?;
            // Whatever committed while this connection was down.
            wake.notify_one();
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
        }
        .await;
        let err = outcome.err().map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(error = %err, "change feed: notification listener lost; reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn head(pool: &AnyPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT last FROM change_sequence WHERE id = 1")
        .fetch_one(pool)
        .await
}

async fn oldest(pool: &AnyPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT MIN(seq) FROM changes")
        .fetch_one(pool)
        .await
}

/// Up to a page of changes in `after + 1 ..= upto`, of `directory` or of all.
async fn read<T>(
    pool: &AnyPool,
    after: i64,
    upto: i64,
    directory: Option<&str>,
    decode: Decode<T>,
) -> Result<Vec<Entry<T>>, sqlx::Error> {
    let rows = match directory {
        None => {
            sqlx::query(
                "SELECT seq, change_time, directory_id, kind, resource FROM changes \
                 WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            )
            .bind(after)
            .bind(upto)
            .bind(PAGE)
            .fetch_all(pool)
            .await?
        }
        Some(directory) => {
            sqlx::query(
                "SELECT seq, change_time, directory_id, kind, resource FROM changes \
                 WHERE directory_id = $4 AND seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            )
            .bind(after)
            .bind(upto)
            .bind(PAGE)
            .bind(directory)
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter()
        .map(|row| {
            let kind: i64 = row.try_get(3)?;
            let resource: String = row.try_get(4)?;
            Ok(Entry {
                seq: row.try_get(0)?,
                time: row.try_get(1)?,
                directory_id: row.try_get(2)?,
                value: decode(kind, &resource),
            })
        })
        .collect()
}

/// Removes the changes older than `cutoff`, from the oldest up to the first that is not.
pub async fn remove_before(pool: &AnyPool, cutoff: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM changes WHERE seq < COALESCE(\
           (SELECT seq FROM changes WHERE change_time >= $1 ORDER BY seq LIMIT 1), \
           (SELECT last + 1 FROM change_sequence WHERE id = 1))",
    )
    .bind(cutoff)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
