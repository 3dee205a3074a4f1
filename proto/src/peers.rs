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
//!   holder whose row expired or was revoked registers afresh, which empties its cache.
//! - **Writing.** The write's transaction calls `pg_notify('cache_invalidations',
//!   'inval:<kind>:<key>')` ([`announce`]), so the notification exists if and only if the
//!   write committed. After the commit the writer deletes expired rows (under their row locks,
//!   so a renewal in flight either lands first or finds no row), reads the holders, sends a
//!   fence (`fence:<token>`) and waits until each has acknowledged it on `cache_acks`, or its
//!   row has expired (deleted the same way when due). After a second without an answer it
//!   sends another fence (an acknowledgement may have been lost with its own listening
//!   connection); after [`REVOKE_AFTER`] it deletes the silent holders' rows and waits one
//!   [`LEASE`], by which time their own clocks have ended their leases. PostgreSQL delivers
//!   notifications in commit order, and a holder handles them in order, so one that
//!   acknowledges a fence has dropped the row. A call that finds its change already made
//!   (a cancelled subscription, a missing user) fences too before it answers: the change may
//!   be another call's, not yet confirmed.
//! - **Losing the connection** (a restart, a terminated backend, a network cut, or a listening
//!   connection silent for a lease): the holder empties its cache and stops answering from it
//!   at once, deletes its row and registers again.
//!
//! Assumed: the database's wall clock does not step forward by more than [`MARGIN`] (NTP slews
//! it); a step would let a writer take a live lease for expired.
//!
//! Fills follow [`crate::cache::OwnedCache`]'s protocol; on top of it an invalidation from a
//! peer moves the cache's epoch like a local write does, and becoming valid after a
//! registration empties the cache and moves the epoch too, so nothing read before the
//! registration is kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use sqlx::postgres::PgListener;
use sqlx::{AnyPool, Row as _};
use tokio::sync::mpsc;

/// How long a registration or renewal holds, by the database's clock.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long before the database's expiry this process stops answering from its cache.
pub const MARGIN: Duration = Duration::from_millis(500);
/// How often a holder sends itself a heartbeat (each one renews the lease).
pub const BEAT: Duration = Duration::from_millis(500);
/// How long a writer waits for acknowledgements before it sends another fence.
const REFENCE: Duration = Duration::from_secs(1);
/// How long a writer waits for acknowledgements before it revokes the silent holders' leases.
pub const REVOKE_AFTER: Duration = Duration::from_millis(2500);
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

/// Something holding copies of rows that a peer's write can make stale.
pub trait Invalidate: Send + Sync {
    /// Drops the row `key` and refuses fills read before now.
    fn invalidate(&self, key: &str);
    /// Drops every row and refuses fills read before now.
    fn clear(&self);
}

/// Whether this process may answer from its cache now (its lease is valid).
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Nanoseconds after `base` until which the lease is valid (0: not valid).
    valid_until: AtomicU64,
}

impl Lease {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            valid_until: AtomicU64::new(0),
        }
    }

    pub fn is_valid(&self) -> bool {
        let now = self.base.elapsed().as_nanos() as u64;
        now < self.valid_until.load(Ordering::Acquire)
    }

    fn extend_to(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.valid_until.store(nanos, Ordering::Release);
    }

    fn revoke(&self) {
        self.valid_until.store(0, Ordering::Release);
    }
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
    /// holds a lease for them; without, it only fences its own writes. Once only.
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
    /// holding a cache has handled them or lost its lease. If the holders cannot be asked
    /// (the database unreachable right after the commit), waits out a lease instead: by then
    /// every holder has either handled the announcement or stopped answering.
    pub async fn settle(&self) {
        if let Err(err) = self.fence().await {
            tracing::warn!(error = %err, "cannot confirm cache invalidations; waiting out the lease");
            tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
        }
    }

    /// Call after committing a write that [`announce`]d invalidations: returns once every
    /// replica that holds a cache has handled them, or lost its lease.
    pub async fn fence(&self) -> Result<(), sqlx::Error> {
        let shared = &self.shared;
        // Expired rows go first, each under its row lock: a renewal in flight either commits
        // first (the row stays and is waited for below) or then finds no row (its holder
        // registers afresh, emptying its cache).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM cache_holders WHERE expires_at <= {NOW_US}"
        )))
        .execute(&shared.pool)
        .await?;
        let holders = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT holder, expires_at - {NOW_US} AS left_us FROM cache_holders"
        )))
        .fetch_all(&shared.pool)
        .await?;
        if holders.is_empty() {
            return Ok(());
        }
        let mut pending = HashMap::with_capacity(holders.len());
        for row in &holders {
            let holder: String = row.try_get("holder")?;
            let left_us: i64 = row.try_get("left_us")?;
            pending.insert(holder, expiry_in(left_us));
        }
        let (acks, mut acked) = mpsc::unbounded_channel();
        let mut fences = Fences {
            waiting: &shared.waiting,
            tokens: Vec::new(),
        };
        fences.send(&shared.pool, &acks).await?;
        let started = Instant::now();
        let mut last_fence = started;
        while !pending.is_empty() {
            let soonest = pending.values().min().copied().unwrap_or_else(Instant::now);
            let wake = soonest
                .min(last_fence + REFENCE)
                .min(started + REVOKE_AFTER);
            tokio::select! {
                ack = acked.recv() => {
                    if let Some(holder) = ack {
                        pending.remove(&holder);
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    if started.elapsed() >= REVOKE_AFTER {
                        self.revoke(pending.keys()).await?;
                        break;
                    }
                    self.expire_due(&mut pending).await?;
                    if last_fence.elapsed() >= REFENCE && !pending.is_empty() {
                        // An acknowledgement may have been lost with this process's own
                        // listening connection: ask again (any fence acknowledged will do,
                        // each comes after the announcement).
                        fences.send(&shared.pool, &acks).await?;
                        last_fence = Instant::now();
                    }
                }
            }
        }
        metrics::histogram!("cache_fence_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Holders of `pending` whose lease should have run out by now: deleted if it has (under
    /// the row lock, so a renewal cannot slip in), else waited for until their new expiry.
    async fn expire_due(&self, pending: &mut HashMap<String, Instant>) -> Result<(), sqlx::Error> {
        let now = Instant::now();
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for holder in due {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM cache_holders WHERE holder = $1 AND expires_at <= {NOW_US}"
            )))
            .bind(&holder)
            .execute(&self.shared.pool)
            .await?;
            let left: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT expires_at - {NOW_US} FROM cache_holders WHERE holder = $1"
            )))
            .bind(&holder)
            .fetch_optional(&self.shared.pool)
            .await?;
            match left {
                // Renewed meanwhile: its acknowledgement is coming, or its lease runs out.
                Some(left_us) => {
                    pending.insert(holder, expiry_in(left_us));
                }
                None => {
                    pending.remove(&holder);
                }
            }
        }
        Ok(())
    }

    /// Takes the leases of holders that stay silent (a hung process, or acknowledgements that
    /// cannot reach this one), then waits until their own clocks have ended them: a holder's
    /// lease never reaches past [`LEASE`] from now, and without its row it cannot renew (it
    /// registers afresh, emptying its cache).
    async fn revoke(&self, holders: impl Iterator<Item = &String>) -> Result<(), sqlx::Error> {
        for holder in holders {
            tracing::warn!(%holder, "a cache holder did not acknowledge; revoking its lease");
            sqlx::query("DELETE FROM cache_holders WHERE holder = $1")
                .bind(holder)
                .execute(&self.shared.pool)
                .await?;
        }
        tokio::time::sleep(LEASE).await;
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

/// When a lease with `left_us` microseconds left runs out, with a millisecond to spare.
fn expiry_in(left_us: i64) -> Instant {
    let left = Duration::from_micros(u64::try_from(left_us).unwrap_or(0));
    Instant::now() + left + Duration::from_millis(1)
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
        let sent = Instant::now();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO cache_holders (holder, expires_at) VALUES ($1, {NOW_US} + $2)"
        )))
        .bind(&id)
        .bind(LEASE.as_micros() as i64)
        .execute(&mut listener)
        .await?;
        if let Ok(mut slot) = shared.holder.lock() {
            *slot = Some(id.clone());
        }
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
            sqlx::query("SELECT pg_notify('cache_acks', $1)")
                .bind(format!("{token} {holder}"))
                .execute(&mut listener)
                .await?;
        } else if let Some(beat) = payload.strip_prefix("beat:")
            && let Some(beat) = Beat::parse(beat)
            && beat.id == holder
        {
            // Renewed from when the heartbeat was *sent*: a holder that lags behind its
            // notifications holds no lease past what it had handled by then.
            let renewed = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE cache_holders SET expires_at = $2 + $3 \
                 WHERE holder = $1 AND expires_at > {NOW_US}"
            )))
            .bind(holder)
            .bind(beat.database_us)
            .bind(LEASE.as_micros() as i64)
            .execute(&mut listener)
            .await?;
            if renewed.rows_affected() != 1 {
                // The lease ran out or was revoked: register afresh (emptying the cache).
                return Ok(());
            }
            shared.lease.extend_to(beat.sent + LEASE - MARGIN);
        }
    }
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
