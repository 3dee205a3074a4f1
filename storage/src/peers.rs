//! Exact invalidation of in-memory caches across replicas that share one PostgreSQL database.
//!
//! On SQLite one process owns the file, so its own writes are all a cache must see
//! ([`crate::cache`]). On PostgreSQL any replica may change a cached row, so a replica keeps a
//! cache only while it holds a *lease*, and a write that changes a cached row is acknowledged
//! only once every lease holder has dropped the old row, or its lease has run out:
//!
//! - **Holding.** A replica with a cache opens one `LISTEN` connection, then registers a row
//!   in `cache_holders` (a fresh id and an expiry, by the database's clock) over it. The cache
//!   answers only while the lease is valid by this process's clock, which ends before the row
//!   expires. A heartbeat notification, sent every [`BEAT`] over a connection of its own,
//!   carries when it was sent (by both clocks); when it comes back through the listening
//!   connection the lease is renewed *from that sending time*, and only if the row has not
//!   expired. So a renewal proves the connection delivers, and a holder lagging behind its
//!   notifications holds no lease past what it had handled when the heartbeat was sent. A
//!   holder whose row expired (or is gone) registers afresh, which empties its cache.
//! - **Writing.** The write's transaction calls `pg_notify('cache_invalidations',
//!   'inval:<kind>:<key>')` ([`announce`]), so the notification exists if and only if the
//!   write committed. After the commit the writer reads the holders, sends a fence
//!   (`fence:<token>`) and waits until each has acknowledged it on `cache_acks` (sending
//!   another fence after a second of silence, in case an acknowledgement was lost with its
//!   own listening connection), but never longer than [`SAFE_AFTER`]: by then no holder can
//!   still hold a lease covering a copy older than the write (see [`Peers::settle`]).
//!   PostgreSQL delivers notifications in commit order, and a holder handles them in order,
//!   so one that acknowledges a fence has dropped the row. A call that finds its change
//!   already made (a cancelled subscription, a missing user) fences too before it answers:
//!   the change may be another call's, not yet confirmed. Rows that expired more than
//!   [`FORGET_AFTER`] ago are deleted by writers.
//! - **Losing the connection** (a restart, a terminated backend, a network cut, or a listening
//!   connection silent for a lease): the holder empties its cache and stops answering from it
//!   at once, deletes its row and registers again.
//!
//! Assumed about clocks: a holder's lease and a writer's wait are measured by each process's
//! monotonic clock, whose rates must agree within the slack of [`SAFE_AFTER`], and which must
//! not stop while the rest of the world goes on (a suspended machine or a paused VM holding a
//! cache must not resume and answer before its listener has caught up); the database's clock
//! decides when a row has expired, for renewals and for forgetting the rows of replicas gone,
//! and must not step forward by more than `FORGET_AFTER - LEASE` (27 s).
//!
//! Fills follow [`crate::cache::OwnedCache`]'s protocol; on top of it an invalidation from a
//! peer moves the cache's epoch like a local write does, and becoming valid after a
//! registration empties the cache and moves the epoch too, so nothing read before the
//! registration is kept.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sqlx::AnyPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::cache::{Invalidate, Lease};

/// How long a registration or renewal holds, by the database's clock.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long before the database's expiry this process stops answering from its cache.
pub const MARGIN: Duration = Duration::from_millis(500);
/// How often a holder sends itself a heartbeat (each one renews the lease).
pub const BEAT: Duration = Duration::from_millis(500);
/// How long a writer waits for acknowledgements before it sends another fence.
const REFENCE: Duration = Duration::from_secs(1);
/// How long after a commit no lease can still cover a copy older than it (see
/// [`Peers::settle`]), with some slack for clocks running at slightly different rates.
pub const SAFE_AFTER: Duration = Duration::from_millis(2700);
const _: () = assert!(SAFE_AFTER.as_millis() > LEASE.as_millis() - MARGIN.as_millis());
/// How long after its expiry a holder's row is deleted by writers (until then a writer waits
/// [`SAFE_AFTER`] for a holder that died without withdrawing).
pub const FORGET_AFTER: Duration = Duration::from_secs(30);
/// The wait before connecting again after the listening connection failed.
const RECONNECT: Duration = Duration::from_millis(200);

const INVALIDATIONS: &str = "cache_invalidations";
const ACKS: &str = "cache_acks";

/// The database's clock in microseconds since the epoch.
const NOW_US: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";

/// Within a write's transaction (PostgreSQL): announces that the row `key` of `kind`
/// changes. PostgreSQL delivers the announcement to the holders if and only if the
/// transaction commits; then call [`Peers::settle`].
pub async fn announce(
    conn: &mut sqlx::AnyConnection,
    kind: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify('cache_invalidations', $1)")
        .bind(format!("inval:{kind}:{key}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// This process's part in the protocol: acknowledgements for its writers, and (when it keeps
/// a cache) its lease and the caches a peer's write invalidates. Stops when dropped.
pub struct Peers {
    shared: Arc<Shared>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    pool: AnyPool,
    url: String,
    lease: Arc<Lease>,
    caches: std::sync::OnceLock<Vec<(String, Arc<dyn Invalidate>)>>,
    /// Writers waiting for acknowledgements of their fence, by token.
    waiting: DashMap<String, mpsc::UnboundedSender<String>>,
    /// The registered holder id, while registered.
    holder: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn caches(&self) -> &[(String, Arc<dyn Invalidate>)] {
        self.caches.get().map_or(&[], Vec::as_slice)
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("lease_valid", &self.shared.lease.is_valid())
            .finish_non_exhaustive()
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

impl Peers {
    /// The protocol for the PostgreSQL database at `url`, whose pool is `pool`; nothing runs
    /// until [`Peers::start`].
    pub fn new(url: &str, pool: AnyPool) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                url: url.to_owned(),
                lease: Arc::new(Lease::new()),
                caches: std::sync::OnceLock::new(),
                waiting: DashMap::new(),
                holder: std::sync::Mutex::new(None),
            }),
            task: std::sync::Mutex::new(None),
        }
    }

    /// The lease this process's caches must check (valid only while registered).
    pub fn lease(&self) -> Arc<Lease> {
        self.shared.lease.clone()
    }

    /// Starts listening. With `caches` (kind, cache; built on [`Peers::lease`]), this process
    /// holds a lease for them; without, it only fences its own writes. Later calls do nothing.
    pub fn start(&self, caches: Vec<(String, Arc<dyn Invalidate>)>) {
        if self.shared.caches.set(caches).is_err() {
            return;
        }
        if let Ok(mut task) = self.task.lock() {
            *task = Some(tokio::spawn(listen(self.shared.clone())));
        }
    }

    fn stop_listening(&self) {
        if let Some(task) = self.task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }

    /// After the commit of a write that [`announce`]d invalidations: returns once every replica
    /// holding a cache has acknowledged a fence sent after it, and in any case after
    /// [`SAFE_AFTER`]. By then no replica can still answer from a copy older than the write:
    /// a lease only grows from a heartbeat, and lasts until that heartbeat's sending time plus
    /// `LEASE - MARGIN`; a heartbeat committed after the write reached its holder after the
    /// announcement (notifications arrive in commit order), so a holder that has not handled
    /// the announcement holds at most a lease from a heartbeat sent before the commit.
    pub async fn settle(&self) {
        let started = Instant::now();
        let deadline = started + SAFE_AFTER;
        match tokio::time::timeout_at(deadline.into(), self.fence()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot ask the cache holders; waiting out their leases");
                tokio::time::sleep_until(deadline.into()).await;
            }
            Err(_) => {
                tracing::warn!("a cache holder did not acknowledge; its lease has run out by now");
            }
        }
        metrics::histogram!("cache_fence_seconds").record(started.elapsed().as_secs_f64());
    }

    /// Sends a fence and waits until every registered holder has acknowledged it (bounded by
    /// [`Peers::settle`]).
    async fn fence(&self) -> Result<(), sqlx::Error> {
        let shared = &self.shared;
        // Rows that expired long ago belong to replicas that are gone (or have registered
        // afresh); the rest are waited for, whatever their expiry says. Only a forward step of
        // the database's clock by more than FORGET_AFTER - LEASE could mistake a live row for
        // one of those.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM cache_holders WHERE expires_at <= {NOW_US} - $1"
        )))
        .bind(FORGET_AFTER.as_micros() as i64)
        .execute(&shared.pool)
        .await?;
        let mut pending: HashSet<String> = sqlx::query_scalar("SELECT holder FROM cache_holders")
            .fetch_all(&shared.pool)
            .await?
            .into_iter()
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let (acks, mut acked) = mpsc::unbounded_channel();
        let mut fences = Fences {
            waiting: &shared.waiting,
            tokens: Vec::new(),
        };
        fences.send(&shared.pool, &acks).await?;
        let mut last_fence = Instant::now();
        while !pending.is_empty() {
            tokio::select! {
                ack = acked.recv() => {
                    if let Some(holder) = ack {
                        pending.remove(&holder);
                    }
                }
                () = tokio::time::sleep_until((last_fence + REFENCE).into()) => {
                    // An acknowledgement may have been lost with this process's own listening
                    // connection: ask again (any fence acknowledged will do, each comes after
                    // the announcement).
                    fences.send(&shared.pool, &acks).await?;
                    last_fence = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Stops answering from the cache and withdraws the registration, so writers need not
    /// wait for this process's lease to run out (on shutdown).
    pub async fn withdraw(&self) {
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.shared.lease.revoke();
        let holder = self.shared.holder.lock().ok().and_then(|mut h| h.take());
        if let Some(holder) = holder {
            let _ = sqlx::query("DELETE FROM cache_holders WHERE holder = $1")
                .bind(holder)
                .execute(&self.shared.pool)
                .await;
        }
    }
}

/// The fences one writer sent; their tokens leave the waiting map when it is dropped.
struct Fences<'a> {
    waiting: &'a DashMap<String, mpsc::UnboundedSender<String>>,
    tokens: Vec<String>,
}

impl Fences<'_> {
    /// Sends a fence whose acknowledgements go to `acks`.
    async fn send(
        &mut self,
        pool: &AnyPool,
        acks: &mpsc::UnboundedSender<String>,
    ) -> Result<(), sqlx::Error> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.waiting.insert(token.clone(), acks.clone());
        self.tokens.push(token.clone());
        sqlx::query("SELECT pg_notify('cache_invalidations', $1)")
            .bind(format!("fence:{token}"))
            .execute(pool)
            .await?;
        Ok(())
    }
}

impl Drop for Fences<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.waiting.remove(token);
        }
    }
}

/// The listening task: connects, registers (if holding), handles notifications in order;
/// after any failure empties the caches and starts over.
async fn listen(shared: Arc<Shared>) {
    loop {
        let outcome = session(&shared).await;
        // Whatever happened, notifications may have been missed from here on.
        shared.lease.revoke();
        for (_, cache) in shared.caches() {
            cache.clear();
        }
        let old = shared.holder.lock().ok().and_then(|mut h| h.take());
        if let Some(old) = old {
            let _ = sqlx::query("DELETE FROM cache_holders WHERE holder = $1")
                .bind(old)
                .execute(&shared.pool)
                .await;
        }
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "cache invalidation listener failed; reconnecting");
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// One connection's life: returns when it is lost or fails.
async fn session(shared: &Arc<Shared>) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect(&shared.url).await?;
    listener.eager_reconnect(false);
    listener.listen_all([INVALIDATIONS, ACKS]).await?;
    // Holders register under a fresh id; a process without a cache beats under one too, so
    // that its listener hears something at least every BEAT.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let holder = if shared.caches().is_empty() {
        None
    } else {
        // Known before the row exists, so that whoever stops this task deletes it.
        if let Ok(mut slot) = shared.holder.lock() {
            *slot = Some(id.clone());
        }
        let sent = Instant::now();
        bounded(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO cache_holders (holder, expires_at) VALUES ($1, {NOW_US} + $2)"
            )))
            .bind(&id)
            .bind(LEASE.as_micros() as i64)
            .execute(&mut listener),
        )
        .await?;
        // Nothing read before the registration may be kept.
        for (_, cache) in shared.caches() {
            cache.clear();
        }
        shared.lease.extend_to(sent + LEASE - MARGIN);
        Some(id.as_str())
    };
    let _beats = Beats::start(shared.url.clone(), id.clone());
    loop {
        // Silence longer than a lease means a connection that died without a word (a cut
        // network): our own heartbeats would have come back through it.
        let note = match tokio::time::timeout(LEASE, listener.try_recv()).await {
            Ok(note) => note?,
            Err(_) => None,
        };
        let Some(note) = note else {
            return Ok(()); // connection lost
        };
        let payload = note.payload();
        if note.channel() == ACKS {
            if let Some((token, from)) = payload.split_once(' ')
                && let Some(waiter) = shared.waiting.get(token)
            {
                let _ = waiter.send(from.to_owned());
            }
            continue;
        }
        let Some(holder) = holder else {
            continue;
        };
        if let Some(rest) = payload.strip_prefix("inval:") {
            if let Some((kind, key)) = rest.split_once(':') {
                for (k, cache) in shared.caches() {
                    if k == kind {
                        cache.invalidate(key);
                    }
                }
            }
        } else if let Some(token) = payload.strip_prefix("fence:") {
            // Everything committed before the fence was handled above: acknowledge it.
            bounded(
                sqlx::query("SELECT pg_notify('cache_acks', $1)")
                    .bind(format!("{token} {holder}"))
                    .execute(&mut listener),
            )
            .await?;
        } else if let Some(beat) = payload.strip_prefix("beat:")
            && let Some(beat) = Beat::parse(beat)
            && beat.id == holder
        {
            // Renewed from when the heartbeat was *sent*: a holder that lags behind its
            // notifications holds no lease past what it had handled by then.
            let renewed = bounded(
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE cache_holders SET expires_at = $2 + $3 \
                     WHERE holder = $1 AND expires_at > {NOW_US}"
                )))
                .bind(holder)
                .bind(beat.database_us)
                .bind(LEASE.as_micros() as i64)
                .execute(&mut listener),
            )
            .await?;
            if renewed.rows_affected() != 1 {
                // The lease ran out (or the row is gone): register afresh, emptying the cache.
                return Ok(());
            }
            shared.lease.extend_to(beat.sent + LEASE - MARGIN);
        }
    }
}

/// A statement on the listening connection, given no longer than its silence may last: a
/// connection cut without a word would otherwise hold it until TCP gives up.
async fn bounded<T>(
    statement: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(LEASE, statement).await.map_err(|_| {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the listening connection stopped answering",
        ))
    })?
}

/// A heartbeat as it comes back: `beat:<id>:<sent, ns after the lease's base>:<database
/// clock at sending, us>`.
struct Beat<'a> {
    id: &'a str,
    sent: Instant,
    database_us: i64,
}

impl<'a> Beat<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let mut parts = text.split(':');
        let id = parts.next()?;
        let sent_ns: u64 = parts.next()?.parse().ok()?;
        let database_us: i64 = parts.next()?.parse().ok()?;
        Some(Self {
            id,
            sent: BASE.get().copied()? + Duration::from_nanos(sent_ns),
            database_us,
        })
    }
}

/// The instant heartbeats measure their sending time from.
static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Sends a heartbeat every [`BEAT`] over a connection of its own (not the pool, which may be
/// busy under load); stops when dropped.
struct Beats(tokio::task::JoinHandle<()>);

impl Beats {
    fn start(url: String, id: String) -> Self {
        let base = *BASE.get_or_init(Instant::now);
        Self(tokio::spawn(async move {
            let mut conn: Option<sqlx::PgConnection> = None;
            let mut every = tokio::time::interval(BEAT);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if conn.is_none() {
                    match <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                        Ok(c) => conn = Some(c),
                        Err(err) => {
                            tracing::debug!(error = %err, "cache heartbeat cannot connect");
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let sent = base.elapsed().as_nanos() as u64;
                let sent = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT pg_notify('cache_invalidations', $1 || CAST({NOW_US} AS TEXT))"
                )))
                .bind(format!("beat:{id}:{sent}:"))
                .execute(&mut *c)
                .await;
                if let Err(err) = sent {
                    tracing::debug!(error = %err, "cache heartbeat failed");
                    conn = None;
                }
            }
        }))
    }
}

impl Drop for Beats {
    fn drop(&mut self) {
        self.0.abort();
    }
}
