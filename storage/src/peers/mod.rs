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
//! The rules (what each notification means, what a holder does with it, how long a lease
//! lasts, when a writer stops waiting) are [`protocol`], a state machine with no I/O, tested
//! on instants of its tests' choosing; this module drives it with SQL and connections.
//!
//! Fills follow [`crate::cache::OwnedCache`]'s protocol; on top of it an invalidation from a
//! peer moves the cache's epoch like a local write does, and becoming valid after a
//! registration empties the cache and moves the epoch too, so nothing read before the
//! registration is kept.

pub mod protocol;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sqlx::AnyPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::cache::{Invalidate, Lease};

use protocol::{ACKS, Holder, INVALIDATIONS, Next, Note, SILENCE, Settle, Step};
pub use protocol::{BEAT, FORGET_AFTER, LEASE, MARGIN, SAFE_AFTER};

/// The wait before connecting again after the listening connection failed.
const RECONNECT: Duration = Duration::from_millis(200);

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
        .bind(Note::Invalidate { kind, key }.payload())
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
    /// The instant heartbeats' sending times count from.
    base: Instant,
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
                base: Instant::now(),
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
    /// [`SAFE_AFTER`], when no replica can still answer from a copy older than the write
    /// ([`Settle`]).
    pub async fn settle(&self) {
        let started = Instant::now();
        let deadline = started + SAFE_AFTER;
        match tokio::time::timeout_at(deadline.into(), self.fence(started)).await {
            Ok(Ok(Next::Done)) => {}
            Ok(Ok(_)) | Err(_) => {
                tracing::warn!("a cache holder did not acknowledge; its lease has run out by now");
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot ask the cache holders; waiting out their leases");
                tokio::time::sleep_until(deadline.into()).await;
            }
        }
        metrics::histogram!("cache_fence_seconds").record(started.elapsed().as_secs_f64());
    }

    /// Sends fences until every registered holder has acknowledged one, or [`SAFE_AFTER`]
    /// has passed since `started`: [`Next::Done`] or [`Next::WaitedOut`].
    async fn fence(&self, started: Instant) -> Result<Next, sqlx::Error> {
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
        let holders: Vec<String> = sqlx::query_scalar("SELECT holder FROM cache_holders")
            .fetch_all(&shared.pool)
            .await?;
        let mut settle = Settle::new(started, holders);
        let (acks, mut acked) = mpsc::unbounded_channel();
        let mut fences = Fences {
            waiting: &shared.waiting,
            tokens: Vec::new(),
        };
        loop {
            match settle.next(Instant::now()) {
                next @ (Next::Done | Next::WaitedOut) => return Ok(next),
                Next::Fence => {
                    fences.send(&shared.pool, &acks).await?;
                    settle.fenced(Instant::now());
                }
                Next::WaitUntil(until) => {
                    tokio::select! {
                        ack = acked.recv() => {
                            if let Some(holder) = ack {
                                settle.acknowledged(&holder);
                            }
                        }
                        () = tokio::time::sleep_until(until.into()) => {}
                    }
                }
            }
        }
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
            .bind(Note::Fence { token: &token }.payload())
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
    let mut holder = Holder::new(id.clone(), !shared.caches().is_empty(), shared.base);
    if holder.holding() {
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
        shared.lease.extend_to(holder.registered(sent));
    }
    let _beats = Beats::start(shared.url.clone(), id, shared.base);
    loop {
        let note = match tokio::time::timeout(SILENCE, listener.try_recv()).await {
            Ok(note) => note?,
            Err(_) => None,
        };
        let Some(note) = note else {
            return Ok(()); // connection lost, or silent for too long
        };
        let Some(parsed) = Note::parse(note.channel(), note.payload()) else {
            continue;
        };
        match holder.on_note(parsed) {
            Step::Ignore => {}
            Step::Deliver { token, holder } => {
                if let Some(waiter) = shared.waiting.get(token) {
                    let _ = waiter.send(holder.to_owned());
                }
            }
            Step::Invalidate { kind, key } => {
                for (k, cache) in shared.caches() {
                    if k == kind {
                        cache.invalidate(key);
                    }
                }
            }
            Step::Acknowledge { token } => {
                let ack = Note::Ack {
                    token,
                    holder: holder.id(),
                };
                bounded(
                    sqlx::query("SELECT pg_notify('cache_acks', $1)")
                        .bind(ack.payload())
                        .execute(&mut listener),
                )
                .await?;
            }
            Step::Renew { database_us, sent } => {
                let renewed = bounded(
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE cache_holders SET expires_at = $2 + $3 \
                         WHERE holder = $1 AND expires_at > {NOW_US}"
                    )))
                    .bind(holder.id())
                    .bind(database_us)
                    .bind(LEASE.as_micros() as i64)
                    .execute(&mut listener),
                )
                .await?;
                match holder.renewed(sent, renewed.rows_affected()) {
                    Some(until) => shared.lease.extend_to(until),
                    // The lease ran out (or the row is gone): register afresh, emptying the
                    // caches.
                    None => return Ok(()),
                }
            }
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

/// Sends a heartbeat every [`BEAT`] over a connection of its own (not the pool, which may be
/// busy under load); stops when dropped.
struct Beats(tokio::task::JoinHandle<()>);

impl Beats {
    fn start(url: String, id: String, base: Instant) -> Self {
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
                let prefix = protocol::beat_prefix(&id, base, Instant::now());
                let sent = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT pg_notify('cache_invalidations', $1 || CAST({NOW_US} AS TEXT))"
                )))
                .bind(prefix)
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
