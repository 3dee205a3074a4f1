//! Licences in the database. The pool invariant (`consumed <= enabled`, per directory and
//! offer) is the database's: a `CHECK` on `license_pools` refuses any row that breaks it, and
//! every write moves a pool's counts with one conditional `UPDATE` (`... WHERE consumed <
//! enabled`) that the database evaluates on the row as it is once locked, so concurrent
//! writers on any number of replicas cannot both take the last seat.
//!
//! Locks are taken in one order by every transaction, so none waits on another in a circle
//! (PostgreSQL; SQLite has one writer): a subscription's row, then pool rows (by directory
//! and offer), then assignment rows (inserted or deleted), then the change sequence (the
//! outbox, last). A user's deletion mark (`deleted_license_users`) is written only by the
//! follower and read by an assignment after it has locked its pool: see `follow`.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row as _, Transaction};
use storage::db::{Engine, HeldConnection, WriteGate};
use storage::feed::Outbox;
use tokio::sync::{mpsc, oneshot};

use super::super::changes;
use super::{SqlStore, corrupt};
use crate::domain::model::{Assigned, Assignment, ChangeKind, License, SeatsChanged, State};
use crate::domain::offers;
use crate::store::StoreError;

/// Takes a seat, if one is free.
pub(super) const TAKE_SEAT: &str = "UPDATE license_pools SET consumed = consumed + 1 \
     WHERE directory_id = $1 AND offer_id = $2 AND consumed < enabled";

/// Takes `$3` seats, if that many are free.
const TAKE_SEATS: &str = "UPDATE license_pools SET consumed = consumed + $3 \
     WHERE directory_id = $1 AND offer_id = $2 AND consumed + $3 <= enabled";

/// Locks a pool's row, changing nothing.
const LOCK_POOL: &str = "UPDATE license_pools SET consumed = consumed \
     WHERE directory_id = $1 AND offer_id = $2";

/// Gives a seat back.
pub(super) const FREE_SEAT: &str = "UPDATE license_pools SET consumed = consumed - 1 \
     WHERE directory_id = $1 AND offer_id = $2";

/// Adds `$3` seats (negative: removes them), unless the assigned licences need them.
const MOVE_SEATS: &str = "UPDATE license_pools SET enabled = enabled + $3 \
     WHERE directory_id = $1 AND offer_id = $2 AND consumed <= enabled + $3";

/// Adds seats a purchase brought, creating the pool with the directory's first purchase of
/// the offer.
pub(super) const ADD_POOL_SEATS: &str = "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
     VALUES ($1, $2, $3, 0) ON CONFLICT (directory_id, offer_id) \
     DO UPDATE SET enabled = license_pools.enabled + excluded.enabled";

/// Pages of a directory's assignments, by user then offer (the primary key's order; for one
/// offer, the key's range read with the other offers' rows skipped).
const LIST_ALL: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND (user_id > $2 OR (user_id = $2 AND offer_id > $3)) \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_USER: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND user_id = $2 AND offer_id > $3 \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_OFFER: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND offer_id = $2 AND user_id > $3 \
     ORDER BY user_id, offer_id LIMIT $4";
const LIST_ONE: &str = "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
     WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3 AND offer_id > $4 LIMIT $5";

pub(super) fn assignment_from_row(row: &AnyRow) -> Result<Assignment, sqlx::Error> {
    let offer_id: String = row.try_get("offer_id")?;
    Ok(Assignment {
        user_id: row.try_get("user_id")?,
        offer: offers::find(&offer_id)
            .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
        directory_id: row.try_get("directory_id")?,
        assign_time: row.try_get("assign_time")?,
    })
}

/// Ends a transaction that changed nothing it should keep.
async fn undo<T>(tx: Transaction<'_, Any>, outcome: T) -> Result<T, StoreError> {
    tx.rollback().await?;
    Ok(outcome)
}

impl SqlStore {
    pub(super) async fn free_seat(
        &self,
        directory_id: &str,
        user_id: &str,
        offer_id: &str,
        now: i64,
    ) -> Result<Option<Assignment>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        // The pool first (this module's lock order), then the assignment.
        sqlx::query(LOCK_POOL)
            .bind(directory_id)
            .bind(offer_id)
            .execute(&mut *tx)
            .await?;
        let removed = sqlx::query(
            "DELETE FROM license_assignments \
             WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3 \
             RETURNING directory_id, user_id, offer_id, assign_time",
        )
        .bind(directory_id)
        .bind(user_id)
        .bind(offer_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(removed) = removed.as_ref().map(assignment_from_row).transpose()? else {
            return undo(tx, None).await;
        };
        sqlx::query(FREE_SEAT)
            .bind(directory_id)
            .bind(offer_id)
            .execute(&mut *tx)
            .await?;
        let change = changes::assignment(ChangeKind::LicenseRemoved, &removed, now)?;
        self.outbox.record(&mut tx, &[change]).await?;
        tx.commit().await?;
        drop(turn);
        self.outbox.committed();
        Ok(Some(removed))
    }

    pub(super) async fn pools(&self, directory_id: &str) -> Result<Vec<License>, StoreError> {
        let rows = sqlx::query(
            "SELECT offer_id, enabled, consumed FROM license_pools \
             WHERE directory_id = $1 AND (enabled > 0 OR consumed > 0) ORDER BY offer_id",
        )
        .bind(directory_id)
        .fetch_all(&self.pool)
        .await?;
        let license = |row: &AnyRow| -> Result<License, sqlx::Error> {
            let offer_id: String = row.try_get("offer_id")?;
            Ok(License {
                offer: offers::find(&offer_id)
                    .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
                enabled: row.try_get("enabled")?,
                consumed: row.try_get("consumed")?,
            })
        };
        Ok(rows.iter().map(license).collect::<Result<_, _>>()?)
    }

    pub(super) async fn assignment_page(
        &self,
        directory_id: &str,
        user_id: Option<&str>,
        offer_id: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<Assignment>, StoreError> {
        let (after_user, after_offer) = after.unwrap_or_default();
        let query = match (user_id, offer_id) {
            (None, None) => sqlx::query(LIST_ALL)
                .bind(directory_id)
                .bind(after_user)
                .bind(after_offer),
            (Some(user), None) => sqlx::query(LIST_USER)
                .bind(directory_id)
                .bind(user.to_owned())
                .bind(after_offer),
            (None, Some(offer)) => sqlx::query(LIST_OFFER)
                .bind(directory_id)
                .bind(offer.to_owned())
                .bind(after_user),
            (Some(user), Some(offer)) => sqlx::query(LIST_ONE)
                .bind(directory_id)
                .bind(user.to_owned())
                .bind(offer.to_owned())
                .bind(after_offer),
        };
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(assignment_from_row)
            .collect::<Result<_, _>>()?)
    }

    pub(super) async fn set_seats(
        &self,
        id: &str,
        seats: i32,
        now: i64,
    ) -> Result<Option<SeatsChanged>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        // Locks the row and reads it as committed now (PostgreSQL re-reads a row another
        // transaction changed while this one waited for it).
        let current = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET seats = seats WHERE id = $1 RETURNING {}",
            super::SELECT_COLUMNS
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(super::subscription_from_row)
        .transpose()?;
        let Some(current) = current else {
            return undo(tx, None).await;
        };
        if current.state != State::Active {
            return undo(tx, Some(SeatsChanged::NotActive)).await;
        }
        if !crate::domain::licences::licensable(current.offer) {
            return undo(tx, Some(SeatsChanged::NotPerSeat)).await;
        }
        if current.seats == seats {
            return undo(tx, Some(SeatsChanged::Unchanged(current))).await;
        }
        let delta = i64::from(seats) - i64::from(current.seats);
        if !move_seats(&mut tx, &current.directory_id, current.offer.id, delta).await? {
            return undo(tx, Some(SeatsChanged::InUse)).await;
        }
        sqlx::query("UPDATE subscriptions SET seats = $1 WHERE id = $2")
            .bind(i64::from(seats))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let changed = crate::domain::model::Subscription { seats, ..current };
        let change = changes::subscription(ChangeKind::SubscriptionUpdated, &changed, now)?;
        self.commit_changed(tx, turn, &[id], &[change]).await?;
        Ok(Some(SeatsChanged::Changed(changed)))
    }
}

/// Moves a pool's seats by `delta` (in a transaction that locked the subscription they come
/// from or go to): `false` when the pool's assigned licences need more than it would keep.
pub(super) async fn move_seats(
    tx: &mut Transaction<'_, Any>,
    directory_id: &str,
    offer_id: &str,
    delta: i64,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(MOVE_SEATS)
        .bind(directory_id)
        .bind(offer_id)
        .bind(delta)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(moved == 1)
}

/// An assignment waiting for the next batch.
pub(super) struct PendingAssignment {
    pub(super) assignment: Assignment,
    pub(super) done: oneshot::Sender<Result<Assigned, StoreError>>,
}

/// Most assignments one batch takes.
pub(super) const MAX_ASSIGNMENTS: usize = 256;

impl SqlStore {
    /// Queued for the assignment task: every assignment waiting when it is free is decided
    /// in one transaction with a handful of statements, whatever their number, and each
    /// caller hears back after its commit.
    pub(super) async fn assign_seat(&self, a: &Assignment) -> Result<Assigned, StoreError> {
        let (done, outcome) = oneshot::channel();
        let pending = PendingAssignment {
            assignment: a.clone(),
            done,
        };
        let stopped = || StoreError::from(sqlx::Error::PoolClosed);
        self.assignments
            .send(pending)
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// The assignment loop: takes whatever assignments are queued (at least one, at most
/// [`MAX_ASSIGNMENTS`]), decides and writes them in one transaction ([`assign_batch`]), and
/// answers each caller. A failed batch fails its callers (not retried: the commit may have
/// landed; an assignment is idempotent, so the caller may retry).
pub(super) async fn assign_in_batches(
    pool: AnyPool,
    engine: Engine,
    writers: WriteGate,
    outbox: Outbox,
    mut queue: mpsc::Receiver<PendingAssignment>,
) {
    let mut batch = Vec::with_capacity(MAX_ASSIGNMENTS);
    let mut held = HeldConnection::new(pool);
    while held
        .wait(queue.recv_many(&mut batch, MAX_ASSIGNMENTS))
        .await
        > 0
    {
        let started = std::time::Instant::now();
        let outcome = {
            let _turn = writers.enter().await;
            match held.get().await {
                Ok(conn) => assign_batch(conn, engine, &outbox, &batch).await,
                Err(err) => Err(err),
            }
        };
        metrics::histogram!("billing_assignment_batch_size").record(batch.len() as f64);
        metrics::histogram!("billing_assignment_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| matches!(o, Assigned::New(_))) {
                    outbox.committed();
                }
                for (pending, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = pending.done.send(Ok(outcome));
                }
            }
            Err(err) => {
                held.give_back();
                for pending in batch.drain(..) {
                    let err = storage::db::copy_error(&err);
                    let _ = pending.done.send(Err(StoreError::from(err)));
                }
            }
        }
    }
}

type Key<'a> = (&'a str, &'a str, &'a str);

fn key(a: &Assignment) -> Key<'_> {
    (a.directory_id.as_str(), a.user_id.as_str(), a.offer.id)
}

/// `head VALUES` of `rows` rows of `cols` placeholders, then `tail`.
fn values_sql(engine: Engine, head: &str, rows: usize, cols: usize, tail: &str) -> String {
    let mut sql = format!("{head} VALUES ");
    engine.push_value_rows(&mut sql, rows, cols);
    sql.push_str(tail);
    sql
}

/// `$first, ..., $first + count - 1` (or `?, ...` on SQLite): an `IN` list.
fn placeholders(engine: Engine, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| match engine {
            Engine::Sqlite => "?".to_owned(),
            Engine::Postgres => format!("${n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decides and writes a batch of assignments in one transaction, in the lock order of this
/// module: each pool's seats first, as many as it has free for the assignments asking
/// (one conditional `UPDATE` per pool, by directory and offer); then, with the pools
/// locked, the assignments in one insert that skips those held already and those of users
/// the follower has marked deleted (the statement's snapshot is taken after the locks, so it
/// sees any deletion that held them first: see `follow`). Seats taken beyond what went in go
/// back, and rows beyond the seats taken are deleted again, last come first (both rare). The
/// outcome of each assignment, in the batch's order; the same assignment twice is new once and
/// held after.
async fn assign_batch(
    conn: &mut PoolConnection<Any>,
    engine: Engine,
    outbox: &Outbox,
    batch: &[PendingAssignment],
) -> Result<Vec<Assigned>, sqlx::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;

    // Each assignment once, by pool.
    let mut seen: HashSet<Key<'_>> = HashSet::new();
    let candidates: Vec<&Assignment> = batch
        .iter()
        .map(|p| &p.assignment)
        .filter(|a| seen.insert(key(a)))
        .collect();
    let mut by_pool: BTreeMap<(&str, &str), Vec<&Assignment>> = BTreeMap::new();
    for a in &candidates {
        by_pool
            .entry((a.directory_id.as_str(), a.offer.id))
            .or_default()
            .push(a);
    }
    let mut seats: HashMap<(&str, &str), usize> = HashMap::new();
    for (&pool, assignments) in &by_pool {
        let taken = take_seats(&mut tx, pool.0, pool.1, assignments.len()).await?;
        seats.insert(pool, taken);
    }

    // The assignments of pools with seats: inserted unless held or marked deleted.
    let asking: Vec<&Assignment> = candidates
        .iter()
        .copied()
        .filter(|a| seats.get(&(a.directory_id.as_str(), a.offer.id)) > Some(&0))
        .collect();
    let mut inserted: HashSet<(String, String, String)> = HashSet::new();
    if let Some(last) = asking.last() {
        // One of sixteen shapes, so the statement stays prepared: the batch, then its last
        // row repeated (it conflicts with itself and is skipped).
        let rows = super::statement_rows(asking.len());
        let sql = format!(
            "{} ON CONFLICT DO NOTHING RETURNING directory_id, user_id, offer_id",
            values_sql(
                engine,
                "INSERT INTO license_assignments (directory_id, user_id, offer_id, assign_time) \
                 SELECT column1, column2, column3, column4 FROM (",
                rows,
                4,
                ") AS v WHERE NOT EXISTS \
                 (SELECT 1 FROM deleted_license_users d WHERE d.user_id = v.column2)",
            )
        );
        let repeats = std::iter::repeat_n(last, rows - asking.len());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for a in asking.iter().chain(repeats) {
            query = query
                .bind(a.directory_id.as_str())
                .bind(a.user_id.as_str())
                .bind(a.offer.id)
                .bind(a.assign_time);
        }
        for row in query.fetch_all(&mut *tx).await? {
            inserted.insert((
                row.try_get("directory_id")?,
                row.try_get("user_id")?,
                row.try_get("offer_id")?,
            ));
        }
    }
    let went_in = |a: &Assignment| {
        inserted.contains(&(
            a.directory_id.clone(),
            a.user_id.clone(),
            a.offer.id.to_owned(),
        ))
    };

    // Each pool: rows beyond its seats out again; seats beyond its rows back.
    let mut kept: HashSet<Key<'_>> = HashSet::new();
    for (pool, assignments) in &by_pool {
        let taken = seats.get(pool).copied().unwrap_or(0);
        let rows: Vec<&&Assignment> = assignments.iter().filter(|a| went_in(a)).collect();
        for a in rows.iter().skip(taken) {
            sqlx::query(
                "DELETE FROM license_assignments \
                 WHERE directory_id = $1 AND user_id = $2 AND offer_id = $3",
            )
            .bind(a.directory_id.as_str())
            .bind(a.user_id.as_str())
            .bind(a.offer.id)
            .execute(&mut *tx)
            .await?;
        }
        kept.extend(rows.iter().take(taken).map(|a| key(a)));
        let unused = taken.saturating_sub(rows.len());
        if unused > 0 {
            sqlx::query(
                "UPDATE license_pools SET consumed = consumed - $3 \
                 WHERE directory_id = $1 AND offer_id = $2",
            )
            .bind(pool.0)
            .bind(pool.1)
            .bind(i64::try_from(unused).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
    }

    // Why the others did not go in (rare): held already, the user marked deleted, or no seat.
    // Read for every assignment that did not go in, also those of a pool without a free seat
    // (a licence held already is returned as it is, even when the pool is full).
    let missed: Vec<&Assignment> = candidates.iter().copied().filter(|a| !went_in(a)).collect();
    let mut held: HashMap<Key<'_>, Assignment> = HashMap::new();
    let mut deleted: HashSet<String> = HashSet::new();
    if !missed.is_empty() {
        let directories: Vec<&str> = missed
            .iter()
            .map(|a| a.directory_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let users: Vec<&str> = missed
            .iter()
            .map(|a| a.user_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // The primary key's prefix: the batch's directories, then its users.
        let sql = format!(
            "SELECT directory_id, user_id, offer_id, assign_time FROM license_assignments \
             WHERE directory_id IN ({}) AND user_id IN ({})",
            placeholders(engine, 1, directories.len()),
            placeholders(engine, directories.len() + 1, users.len()),
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for directory in &directories {
            query = query.bind(*directory);
        }
        for user in &users {
            query = query.bind(*user);
        }
        let wanted: HashMap<Key<'_>, &Assignment> = missed.iter().map(|a| (key(a), *a)).collect();
        for row in query.fetch_all(&mut *tx).await? {
            let stored = assignment_from_row(&row)?;
            if let Some(a) = wanted.get(&key(&stored)) {
                held.insert(key(a), stored);
            }
        }
        let sql = format!(
            "SELECT user_id FROM deleted_license_users WHERE user_id IN ({})",
            placeholders(engine, 1, users.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for user in &users {
            query = query.bind(*user);
        }
        for row in query.fetch_all(&mut *tx).await? {
            deleted.insert(row.try_get("user_id")?);
        }
    }

    let changes = candidates
        .iter()
        .filter(|a| kept.contains(&key(a)))
        .map(|a| changes::assignment(ChangeKind::LicenseAssigned, a, a.assign_time))
        .collect::<Result<Vec<_>, _>>()?;
    if changes.is_empty() {
        tx.rollback().await?;
    } else {
        outbox.record(&mut tx, &changes).await?;
        tx.commit().await?;
    }

    // Each outcome by its own assignment: held, new (or the same as the batch's first), the
    // user marked deleted, or no seat.
    let firsts: HashMap<Key<'_>, &Assignment> = candidates.iter().map(|a| (key(a), *a)).collect();
    Ok(batch
        .iter()
        .map(|pending| {
            let a = &pending.assignment;
            if let Some(stored) = held.get(&key(a)) {
                return Assigned::Held(stored.clone());
            }
            match firsts.get(&key(a)) {
                Some(first) if kept.contains(&key(first)) => {
                    if std::ptr::eq(*first, a) {
                        Assigned::New(a.clone())
                    } else {
                        Assigned::Held((*first).clone())
                    }
                }
                _ if deleted.contains(&a.user_id) => Assigned::UserDeleted,
                _ => Assigned::NoSeat,
            }
        })
        .collect())
}

/// Takes up to `wanted` seats of a pool: as many as it has free. The count is checked by
/// the `UPDATE` itself on the locked row; the read in between only picks the next count to
/// try (another replica may take or free seats meanwhile).
async fn take_seats(
    tx: &mut Transaction<'_, Any>,
    directory_id: &str,
    offer_id: &str,
    wanted: usize,
) -> Result<usize, sqlx::Error> {
    let mut count = wanted;
    while count > 0 {
        let took = sqlx::query(TAKE_SEATS)
            .bind(directory_id)
            .bind(offer_id)
            .bind(i64::try_from(count).unwrap_or(i64::MAX))
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if took == 1 {
            return Ok(count);
        }
        let free: Option<i64> = sqlx::query_scalar(
            "SELECT enabled - consumed FROM license_pools WHERE directory_id = $1 AND offer_id = $2",
        )
        .bind(directory_id)
        .bind(offer_id)
        .fetch_optional(&mut **tx)
        .await?;
        count = wanted.min(usize::try_from(free.unwrap_or(0)).unwrap_or(0));
    }
    Ok(0)
}
