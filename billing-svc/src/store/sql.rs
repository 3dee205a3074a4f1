//! [`BillingStore`] over sqlx's `Any` driver: one set of SQL for SQLite and PostgreSQL.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row as _};
use storage::batch::PointReads;
use storage::db::{Engine, HeldConnection, WriteGate};
use storage::feed::Outbox;
use storage::lease::Lease;
use storage::peers::Peers;
use tokio::sync::{mpsc, oneshot};

mod follow;
mod licences;

use super::changes;
use super::{BillingStore, StoreError};
use crate::domain::model::{
    Assigned, Assignment, ChangeKind, License, SeatsChanged, State, Subscription, Transferred,
    Upgraded,
};
use crate::domain::offers;

/// Migrations embedded in the binary, run at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    writers: WriteGate,
    purchases: mpsc::Sender<Pending>,
    /// Subscriptions by id (GetSubscription), coalesced.
    reads: PointReads<Subscription>,
    /// On PostgreSQL, the replicas whose caches a cancellation must reach before it is
    /// acknowledged.
    peers: Option<Arc<Peers>>,
    /// The change feed's outbox every write records its changes in.
    outbox: Outbox,
    /// Which replica follows the directory's change feed.
    lease: Lease,
    /// Assignments waiting for the next batch (`licences::assign_in_batches`).
    assignments: mpsc::Sender<licences::PendingAssignment>,
}

/// The kind of row the caches of subscriptions are invalidated by.
pub const SUBSCRIPTIONS: &str = "subscriptions";

/// A new subscription waiting for the next group commit.
struct Pending {
    subscription: Subscription,
    request: Option<(String, String)>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Most subscriptions one statement inserts (14 parameters each, within both engines' limits).
const MAX_BATCH: usize = 256;

/// The columns a [`Subscription`] is read from.
const SELECT_COLUMNS: &str = "id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time, end_time";

/// A page of a directory's subscriptions (index `subscriptions_by_directory`): directory,
/// then the keyset (create_time, id) to start after, then the page size.
const LIST_IN_DIRECTORY: &str = "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time, end_time FROM subscriptions \
     WHERE directory_id = $1 AND (create_time > $2 OR (create_time = $2 AND id > $3)) \
     ORDER BY create_time, id LIMIT $4";

/// A page of the subscriptions a user owns in a directory (index `subscriptions_by_owner`,
/// which holds only owned rows: `owner_user_id = $1` implies it is not NULL), so a user with
/// a few subscriptions in a large directory reads a few rows: owner, then as
/// [`LIST_IN_DIRECTORY`].
const LIST_OWNED: &str = "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time, end_time FROM subscriptions \
     WHERE owner_user_id = $1 AND directory_id = $2 \
     AND (create_time > $3 OR (create_time = $3 AND id > $4)) \
     ORDER BY create_time, id LIMIT $5";

const SUBSCRIPTION_COLUMNS: &str = "id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time, request_id, request_fingerprint, free_trial_user_id, \
     end_time";

impl SqlStore {
    /// Wraps an open pool on `engine` and brings its schema up to date, and starts the task
    /// that group-commits purchases (it ends when the last clone of the store is dropped).
    pub async fn new(pool: AnyPool, engine: Engine) -> anyhow::Result<Self> {
        MIGRATOR.run(&pool).await?;
        let writers = WriteGate::for_engine(engine);
        writers.checkpoint_in_background(&pool);
        let (purchases, queue) = mpsc::channel(4 * MAX_BATCH);
        let outbox = Outbox::new(engine);
        tokio::spawn(group_commit(
            pool.clone(),
            engine,
            writers.clone(),
            outbox.clone(),
            queue,
        ));
        let (assignments, assignment_queue) = mpsc::channel(4 * licences::MAX_ASSIGNMENTS);
        tokio::spawn(licences::assign_in_batches(
            pool.clone(),
            engine,
            writers.clone(),
            outbox.clone(),
            assignment_queue,
        ));
        let reads = PointReads::start(
            pool.clone(),
            format!("SELECT {SELECT_COLUMNS} FROM subscriptions WHERE id IN"),
            |row| subscription_from_row(row).map(|s| (s.id.clone(), s)),
        );
        Ok(Self {
            lease: Lease::new(pool.clone(), engine, "directory-follower"),
            assignments,
            pool,
            writers,
            purchases,
            reads,
            peers: None,
            outbox,
        })
    }

    /// Gives the free trials bought before trials ended (no `end_time`) their end:
    /// `create_time` + `period`. Run at start; it changes nothing once every trial has one.
    pub async fn end_old_trials(&self, period: std::time::Duration) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE subscriptions SET end_time = create_time + $1 \
             WHERE free_trial_user_id IS NOT NULL AND end_time IS NULL",
        )
        .bind(i64::try_from(period.as_micros()).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a write that changed stored subscriptions (`ids`): announces them to the peers in
    /// its transaction (PostgreSQL), records `changes`, commits, lets the writers' turn go,
    /// wakes the feed, and waits until every replica's cache has dropped them.
    async fn commit_changed(
        &self,
        mut tx: sqlx::Transaction<'_, Any>,
        turn: Option<tokio::sync::SemaphorePermit<'_>>,
        ids: &[&str],
        changes: &[storage::feed::NewChange],
    ) -> Result<(), StoreError> {
        if self.peers.is_some() {
            for id in ids {
                storage::peers::announce(&mut tx, SUBSCRIPTIONS, id).await?;
            }
        }
        self.outbox.record(&mut tx, changes).await?;
        tx.commit().await?;
        drop(turn);
        self.outbox.committed();
        if let Some(peers) = &self.peers {
            peers.settle().await;
        }
        Ok(())
    }

    /// Announces every cancellation to `peers` and waits for them before answering.
    pub fn with_peers(self, peers: Arc<Peers>) -> Self {
        Self {
            peers: Some(peers),
            ..self
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The outbox this store's writes record their changes in.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn subscription_from_row(row: &AnyRow) -> Result<Subscription, sqlx::Error> {
    let offer_id: String = row.try_get("offer_id")?;
    let state: i64 = row.try_get("state")?;
    let seats: i64 = row.try_get("seats")?;
    Ok(Subscription {
        id: row.try_get("id")?,
        offer: offers::find(&offer_id)
            .ok_or_else(|| corrupt(format!("unknown offer {offer_id}")))?,
        display_name: row.try_get("display_name")?,
        directory_id: row.try_get("directory_id")?,
        owner_user_id: row.try_get("owner_user_id")?,
        seats: i32::try_from(seats).map_err(|_| corrupt(format!("seats {seats}")))?,
        state: State::from_code(state).ok_or_else(|| corrupt(format!("state {state}")))?,
        created_by_user_id: row.try_get("created_by_user_id")?,
        create_time: row.try_get("create_time")?,
        cancel_time: row.try_get("cancel_time")?,
        end_time: row.try_get("end_time")?,
    })
}

#[async_trait]
impl BillingStore for SqlStore {
    /// Queued for the group-commit task: every purchase waiting when it is free goes into one
    /// statement and one commit, and each caller hears back after that commit.
    async fn insert(
        &self,
        subscription: &Subscription,
        request: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        let (done, outcome) = oneshot::channel();
        let pending = Pending {
            subscription: subscription.clone(),
            request: request.map(|(id, fingerprint)| (id.to_owned(), fingerprint.to_owned())),
            done,
        };
        let stopped = || StoreError::from(sqlx::Error::PoolClosed);
        self.purchases.send(pending).await.map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    async fn by_request(
        &self,
        user_id: &str,
        request_id: &str,
    ) -> Result<Option<(Subscription, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id, \
             create_time, cancel_time, end_time, request_fingerprint FROM subscriptions \
             WHERE created_by_user_id = $1 AND request_id = $2",
        )
        .bind(user_id)
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let fingerprint: Option<String> = row.try_get("request_fingerprint")?;
                Ok(Some((
                    subscription_from_row(&row)?,
                    fingerprint.unwrap_or_default(),
                )))
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        Ok(self.reads.get(id).await?)
    }

    async fn list(
        &self,
        directory_id: &str,
        owner: Option<&str>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<Subscription>, StoreError> {
        let (after_time, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let query = match owner {
            Some(owner) => sqlx::query(LIST_OWNED).bind(owner),
            None => sqlx::query(LIST_IN_DIRECTORY),
        };
        let rows = query
            .bind(directory_id)
            .bind(after_time)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(subscription_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn cancel(&self, id: &str, now: i64) -> Result<Option<Subscription>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let cancelled = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET state = $1, cancel_time = $2 WHERE id = $3 AND state <> $1 \
             RETURNING {SELECT_COLUMNS}"
        )))
        .bind(State::Cancelled.code())
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(subscription_from_row)
        .transpose()?;
        if let Some(subscription) = &cancelled {
            if subscription.offer.per_seat
                && !licences::move_seats(
                    &mut tx,
                    &subscription.directory_id,
                    subscription.offer.id,
                    -i64::from(subscription.seats),
                )
                .await?
            {
                tx.rollback().await?;
                return Err(StoreError::LicensesInUse);
            }
            if self.peers.is_some() {
                storage::peers::announce(&mut tx, SUBSCRIPTIONS, id).await?;
            }
            let change =
                changes::subscription(ChangeKind::SubscriptionCancelled, subscription, now)?;
            self.outbox.record(&mut tx, &[change]).await?;
        }
        tx.commit().await?;
        drop(turn);
        if cancelled.is_some() {
            self.outbox.committed();
        }
        // Also when nothing changed: the cancellation may be another call's, committed but not
        // yet confirmed by every replica's cache.
        if let Some(peers) = &self.peers {
            peers.settle().await;
        }
        self.get(id).await
    }

    async fn change_seats(
        &self,
        id: &str,
        seats: i32,
        now: i64,
    ) -> Result<Option<SeatsChanged>, StoreError> {
        self.set_seats(id, seats, now).await
    }

    /// One conditional `UPDATE` (a free trial not cancelled): of racing upgrades and
    /// cancellations of one trial each finds the row as the previous one left it.
    async fn upgrade(
        &self,
        id: &str,
        from_offer: &str,
        to_offer: &str,
        now: i64,
    ) -> Result<Option<Upgraded>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let upgraded = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET offer_id = $1, state = $2, end_time = NULL \
             WHERE id = $3 AND offer_id = $4 AND state <> $5 RETURNING {SELECT_COLUMNS}"
        )))
        .bind(to_offer)
        .bind(State::Active.code())
        .bind(id)
        .bind(from_offer)
        .bind(State::Cancelled.code())
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(subscription_from_row)
        .transpose()?;
        let Some(upgraded) = upgraded else {
            tx.rollback().await?;
            drop(turn);
            return Ok(self.get(id).await?.map(|current| {
                if current.offer.id == to_offer {
                    Upgraded::Already(current)
                } else {
                    Upgraded::NotConvertible
                }
            }));
        };
        let change = changes::subscription(ChangeKind::SubscriptionUpdated, &upgraded, now)?;
        self.commit_changed(tx, turn, &[id], &[change]).await?;
        Ok(Some(Upgraded::Now(upgraded)))
    }

    /// One conditional `UPDATE` (active, of the offer, owned by someone else).
    async fn transfer(
        &self,
        id: &str,
        offer_id: &str,
        new_owner: &str,
        now: i64,
    ) -> Result<Option<Transferred>, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET owner_user_id = $1 \
             WHERE id = $2 AND offer_id = $3 AND state = $4 AND owner_user_id <> $1 \
             RETURNING {SELECT_COLUMNS}"
        )))
        .bind(new_owner)
        .bind(id)
        .bind(offer_id)
        .bind(State::Active.code())
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(subscription_from_row)
        .transpose()?;
        let Some(moved) = moved else {
            tx.rollback().await?;
            drop(turn);
            return Ok(self.get(id).await?.map(|current| {
                if current.owned_by(new_owner)
                    && current.offer.id == offer_id
                    && current.state == State::Active
                {
                    Transferred::Already(current)
                } else {
                    Transferred::NotTransferable(current)
                }
            }));
        };
        let change = changes::subscription(ChangeKind::SubscriptionUpdated, &moved, now)?;
        self.commit_changed(tx, turn, &[id], &[change]).await?;
        Ok(Some(Transferred::Now(moved)))
    }

    /// One `UPDATE ... RETURNING` over the free-trial rows (the partial index of one trial
    /// per user holds exactly them): a trial it changed is one no other transaction changes
    /// again, so replicas running this at once record each end once.
    async fn expire_trials(&self, now: i64) -> Result<usize, StoreError> {
        let turn = self.writers.enter().await;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE subscriptions SET state = $1 \
             WHERE free_trial_user_id IS NOT NULL AND state = $2 AND end_time <= $3 \
             RETURNING {SELECT_COLUMNS}"
        )))
        .bind(State::Expired.code())
        .bind(State::Active.code())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let ended = rows
            .iter()
            .map(subscription_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let recorded = ended
            .iter()
            .map(|s| changes::subscription(ChangeKind::SubscriptionUpdated, s, now))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&str> = ended.iter().map(|s| s.id.as_str()).collect();
        self.commit_changed(tx, turn, &ids, &recorded).await?;
        Ok(ended.len())
    }

    async fn assign(&self, assignment: &Assignment) -> Result<Assigned, StoreError> {
        self.assign_seat(assignment).await
    }

    async fn unassign(
        &self,
        directory_id: &str,
        user_id: &str,
        offer_id: &str,
        now: i64,
    ) -> Result<Option<Assignment>, StoreError> {
        self.free_seat(directory_id, user_id, offer_id, now).await
    }

    async fn licenses(&self, directory_id: &str) -> Result<Vec<License>, StoreError> {
        self.pools(directory_id).await
    }

    async fn assignments(
        &self,
        directory_id: &str,
        user_id: Option<&str>,
        offer_id: Option<&str>,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<Assignment>, StoreError> {
        self.assignment_page(directory_id, user_id, offer_id, after, limit)
            .await
    }
}

/// The group-commit loop: takes whatever purchases are queued (at least one, at most
/// [`MAX_BATCH`]), inserts them with one `INSERT ... ON CONFLICT DO NOTHING`
/// (its own transaction), and tells each caller whether its row went in. A row the unique
/// indexes refused (a request_id or free trial taken, by an earlier call or a twin in the same
/// batch) is [`StoreError::Conflict`] for that caller only; any other failure fails the batch.
/// Under light load a batch is one purchase and nothing waits; under heavy load one commit
/// serves many (docs/decisions/purchase-group-commit.md).
async fn group_commit(
    pool: AnyPool,
    engine: Engine,
    writers: WriteGate,
    outbox: Outbox,
    mut queue: mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Batches follow each other closely under load: the task keeps its connection rather than
    // give it back (and have it pinged) after every commit.
    let mut held = HeldConnection::new(pool);
    while held.wait(queue.recv_many(&mut batch, MAX_BATCH)).await > 0 {
        let started = std::time::Instant::now();
        let outcome = {
            let _turn = writers.enter().await;
            match held.get().await {
                Ok(conn) => insert_batch(conn, engine, &outbox, &batch).await,
                Err(err) => Err(err),
            }
        };
        if outcome.is_ok() {
            outbox.committed();
        }
        if outcome.is_err() {
            // Not retried: the commit may have landed. The pool checks the connection.
            held.give_back();
        }
        metrics::histogram!("billing_purchase_batch_size").record(batch.len() as f64);
        // The writers' turn (SQLite), then the statement and its commit: how long this
        // batch's callers, and every purchase queued behind it, waited for the database.
        metrics::histogram!("billing_purchase_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(went_in) => {
                for (pending, went_in) in batch.drain(..).zip(went_in) {
                    let result = if went_in {
                        Ok(())
                    } else {
                        Err(StoreError::Conflict)
                    };
                    let _ = pending.done.send(result);
                }
            }
            Err(err) => {
                for pending in batch.drain(..) {
                    let err = storage::db::copy_error(&err);
                    let _ = pending.done.send(Err(StoreError::from(err)));
                }
            }
        }
    }
}

/// Which purchases of `batch` went in (in order), by one statement, and their
/// `SUBSCRIPTION_CREATED` changes, in one transaction: the batch takes its changes' numbers
/// with one statement, as its last before the commit.
/// The statement has [`statement_rows`] rows: the batch, then its last row repeated, which
/// conflicts with itself on the primary key and is skipped. So the connection caches at most
/// sixteen prepared statements, whatever the batch sizes.
///
/// The statement returns only its count of inserted rows, not their ids: one answer from the
/// database instead of a row per purchase. When the count falls short (a request_id or a free
/// trial was taken, which is rare), the ids are looked up; they are fresh UUIDs, so a row that
/// has one is this statement's.
async fn insert_batch(
    conn: &mut PoolConnection<Any>,
    engine: Engine,
    outbox: &Outbox,
    batch: &[Pending],
) -> Result<Vec<bool>, sqlx::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    let statement = insert_rows(batch, statement_rows(batch.len()), engine);
    let inserted = statement.execute(&mut *tx).await?.rows_affected();
    let went_in = if usize::try_from(inserted).is_ok_and(|n| n == batch.len()) {
        vec![true; batch.len()]
    } else {
        let mut went_in = Vec::with_capacity(batch.len());
        for pending in batch {
            let found = sqlx::query("SELECT 1 FROM subscriptions WHERE id = $1")
                .bind(pending.subscription.id.clone())
                .fetch_optional(&mut *tx)
                .await?;
            went_in.push(found.is_some());
        }
        went_in
    };
    let created = batch
        .iter()
        .zip(&went_in)
        .filter(|(_, went_in)| **went_in)
        .map(|(p, _)| {
            let s = &p.subscription;
            changes::subscription(ChangeKind::SubscriptionCreated, s, s.create_time)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The seats the new subscriptions bring to their pools, one statement per pool, in the
    // pools' order (see `licences`).
    let mut seats = std::collections::BTreeMap::<(&str, &str), i64>::new();
    for (pending, _) in batch.iter().zip(&went_in).filter(|(_, went_in)| **went_in) {
        let s = &pending.subscription;
        if s.offer.per_seat {
            *seats.entry((&s.directory_id, s.offer.id)).or_default() += i64::from(s.seats);
        }
    }
    for ((directory_id, offer_id), seats) in seats {
        sqlx::query(licences::ADD_POOL_SEATS)
            .bind(directory_id.to_owned())
            .bind(offer_id)
            .bind(seats)
            .execute(&mut *tx)
            .await?;
    }
    outbox.record(&mut tx, &created).await?;
    tx.commit().await?;
    Ok(went_in)
}

/// The rows of the statement that inserts `n` purchases: the smallest of 1, 2, 3, 4, 6, 8, 12,
/// 16, ... (powers of two and one and a half times them) that holds them.
fn statement_rows(n: usize) -> usize {
    let mut size = 1;
    while size < n {
        if size >= 2 && size + size / 2 >= n {
            return size + size / 2;
        }
        size *= 2;
    }
    size
}

/// `INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING` of `rows` rows: those
/// of `chunk`, then its last one repeated.
fn insert_rows(
    chunk: &[Pending],
    rows: usize,
    engine: Engine,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut query = match insert_sql(rows, engine) {
        Some(sql) => sqlx::query(sql),
        None => sqlx::query(AssertSqlSafe(build_insert_sql(rows, engine))),
    };
    let repeats = chunk
        .last()
        .into_iter()
        .cycle()
        .take(rows.saturating_sub(chunk.len()));
    for pending in chunk.iter().chain(repeats) {
        let s = &pending.subscription;
        let (request_id, fingerprint) = pending
            .request
            .as_ref()
            .map(|(id, fingerprint)| (id.clone(), fingerprint.clone()))
            .unzip();
        query = query
            .bind(s.id.clone())
            .bind(s.offer.id)
            .bind(s.display_name.clone())
            .bind(s.directory_id.clone())
            .bind(s.owner_user_id.clone())
            .bind(i64::from(s.seats))
            .bind(s.state.code())
            .bind(s.created_by_user_id.clone())
            .bind(s.create_time)
            .bind(s.cancel_time)
            .bind(request_id)
            .bind(fingerprint)
            .bind(s.offer.free_trial.then(|| s.created_by_user_id.clone()))
            .bind(s.end_time);
    }
    query
}

/// The SQL of each of the sixteen statement shapes on `engine`, written once rather than per
/// batch (a batch of 256 would otherwise format 3,328 placeholders).
fn insert_sql(rows: usize, engine: Engine) -> Option<&'static str> {
    type Shapes = std::sync::OnceLock<Vec<(usize, String)>>;
    static SQLITE: Shapes = std::sync::OnceLock::new();
    static POSTGRES: Shapes = std::sync::OnceLock::new();
    let shapes = match engine {
        Engine::Sqlite => &SQLITE,
        Engine::Postgres => &POSTGRES,
    }
    .get_or_init(|| {
        statement_shapes()
            .into_iter()
            .map(|n| (n, build_insert_sql(n, engine)))
            .collect()
    });
    shapes
        .iter()
        .find(|(n, _)| *n == rows)
        .map(|(_, sql)| sql.as_str())
}

/// Every row count [`statement_rows`] gives for a batch of 1 to [`MAX_BATCH`], in order.
fn statement_shapes() -> Vec<usize> {
    let mut shapes: Vec<usize> = (1..=MAX_BATCH).map(statement_rows).collect();
    shapes.dedup();
    shapes
}

/// `INSERT ... VALUES` of `rows` rows in `engine`'s placeholders (see
/// [`Engine::push_value_rows`]), skipping rows that conflict.
fn build_insert_sql(rows: usize, engine: Engine) -> String {
    let mut sql = format!("INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ");
    engine.push_value_rows(&mut sql, rows, 14);
    sql.push_str(" ON CONFLICT DO NOTHING");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_go_in_as_one_of_sixteen_statement_sizes() {
        let sizes: Vec<usize> = (1..=13).map(statement_rows).collect();
        assert_eq!(sizes, [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]);
        let shapes = statement_shapes();
        assert_eq!(
            shapes,
            [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
        );
        assert!((1..=MAX_BATCH).all(|n| statement_rows(n) >= n));
        for rows in shapes {
            for engine in [Engine::Sqlite, Engine::Postgres] {
                assert_eq!(
                    insert_sql(rows, engine),
                    Some(build_insert_sql(rows, engine).as_str())
                );
            }
        }
        let postgres = build_insert_sql(2, Engine::Postgres);
        assert!(postgres.contains("($15, $16,"));
        assert!(postgres.ends_with("$28) ON CONFLICT DO NOTHING"));
        let sqlite = build_insert_sql(2, Engine::Sqlite);
        assert_eq!(sqlite.matches('?').count(), 28);
        assert!(!sqlite.contains('$'));
        assert!(sqlite.ends_with("?) ON CONFLICT DO NOTHING"));
    }

    /// A purchase for [`insert_batch`] (no caller waits for its outcome).
    fn purchase(n: usize, request_id: &str) -> Pending {
        Pending {
            subscription: Subscription {
                id: uuid::Uuid::now_v7().to_string(),
                offer: offers::find("office365-e3").expect("a known offer"),
                display_name: format!("purchase {n}"),
                directory_id: "directory".into(),
                owner_user_id: None,
                seats: 1,
                state: State::Active,
                created_by_user_id: "buyer".into(),
                create_time: i64::try_from(n).unwrap_or_default(),
                cancel_time: None,
                end_time: None,
            },
            request: Some((request_id.to_owned(), "fingerprint".to_owned())),
            done: oneshot::channel().0,
        }
    }

    /// Every batch size from 1 to 13 pads its statement with repeats of its last row: each
    /// purchase goes in once, the repeats add nothing, and a row the unique index refuses
    /// (a request_id taken by the previous batch) is left out, as is its repeat when it is last.
    #[tokio::test]
    async fn a_padded_batch_inserts_each_purchase_once() {
        let (pool, dir) = sqlite_pool("pad").await;
        MIGRATOR.run(&pool).await.expect("migrates");
        let mut conn = pool.acquire().await.expect("a connection");
        let outbox = Outbox::new(Engine::Sqlite);
        let mut taken = String::new();
        let mut expected_rows = 0;
        for size in 1..=13 {
            let mut batch: Vec<Pending> = Vec::new();
            for n in 0..size {
                // The last purchase of each batch after the first reuses a request_id.
                let request_id = if size > 1 && n == size - 1 {
                    taken.clone()
                } else {
                    uuid::Uuid::new_v4().to_string()
                };
                batch.push(purchase(n, &request_id));
            }
            let went_in = insert_batch(&mut conn, Engine::Sqlite, &outbox, &batch)
                .await
                .expect("inserts");
            let fresh = if size > 1 { size - 1 } else { size };
            let mut expected = vec![true; fresh];
            expected.resize(size, false);
            assert_eq!(went_in, expected, "batch of {size}");
            // Each row holds its own purchase's values: the statement binds them in order.
            for (pending, _) in batch.iter().zip(&went_in).filter(|(_, went_in)| **went_in) {
                let (name, request_id, create_time): (String, Option<String>, i64) =
                    sqlx::query_as(
                        "SELECT display_name, request_id, create_time FROM subscriptions \
                         WHERE id = $1",
                    )
                    .bind(pending.subscription.id.clone())
                    .fetch_one(&mut *conn)
                    .await
                    .expect("reads the row back");
                assert_eq!(name, pending.subscription.display_name, "batch of {size}");
                assert_eq!(
                    request_id.as_deref(),
                    pending.request.as_ref().map(|(id, _)| id.as_str()),
                    "batch of {size}"
                );
                assert_eq!(create_time, pending.subscription.create_time);
            }
            if let Some((request_id, _)) = &batch[0].request {
                taken.clone_from(request_id);
            }
            expected_rows += fresh;
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM subscriptions")
                .fetch_one(&mut *conn)
                .await
                .expect("counts");
            assert_eq!(
                rows,
                i64::try_from(expected_rows).unwrap_or_default(),
                "batch of {size}"
            );
            // One SUBSCRIPTION_CREATED change per purchase that went in, numbered 1..N.
            let (changes, last): (i64, i64) =
                sqlx::query_as("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM changes")
                    .fetch_one(&mut *conn)
                    .await
                    .expect("counts changes");
            assert_eq!((changes, last), (rows, rows), "batch of {size}");
        }
        drop(conn);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn sqlite_pool(name: &str) -> (AnyPool, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("billing-{name}-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/b.db", dir.display());
        let pool = storage::db::connect(&url, &storage::db::PoolSettings::default())
            .await
            .expect("opens");
        (pool, dir)
    }

    /// An assignment for a user the follower has marked deleted gets nothing (its seat goes
    /// back in the same transaction), and one for a restored user goes through: the mark is
    /// read in the transaction that inserts, after the pool is locked.
    #[tokio::test]
    async fn a_user_marked_deleted_gets_no_licence() {
        use crate::domain::follow::{FollowerStore as _, UserChange, UserRef};
        let (pool, dir) = sqlite_pool("marked").await;
        let store = SqlStore::new(pool.clone(), Engine::Sqlite)
            .await
            .expect("migrates");
        sqlx::query(
            "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
             VALUES ('d', 'office365-e3', 5, 0)",
        )
        .execute(&pool)
        .await
        .expect("inserts");
        let jane = UserRef {
            user_id: "u".into(),
            directory_id: "d".into(),
        };
        let deleted = UserChange::Deleted(jane.clone());
        assert!(
            store
                .advance("", "c1", Some(&deleted), 1)
                .await
                .expect("delete")
        );
        let assignment = Assignment {
            user_id: "u".into(),
            offer: offers::find("office365-e3").expect("an offer"),
            directory_id: "d".into(),
            assign_time: 2,
        };
        let consumed = async || -> i64 {
            sqlx::query_scalar("SELECT consumed FROM license_pools")
                .fetch_one(&pool)
                .await
                .expect("reads")
        };
        assert_eq!(
            store.assign(&assignment).await.expect("assign"),
            Assigned::UserDeleted
        );
        assert_eq!(consumed().await, 0);
        let restored = UserChange::Restored(jane);
        assert!(
            store
                .advance("c1", "c2", Some(&restored), 3)
                .await
                .expect("restore")
        );
        assert_eq!(
            store.assign(&assignment).await.expect("assign"),
            Assigned::New(assignment.clone())
        );
        assert_eq!(consumed().await, 1);
        drop(store);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A purge frees what is still assigned (the user's deletion was missed, say after the
    /// cursor expired), and drops what was set aside.
    #[tokio::test]
    async fn a_purge_frees_what_is_still_assigned() {
        use crate::domain::follow::{FollowerStore as _, UserChange, UserRef};
        let (pool, dir) = sqlite_pool("purge").await;
        let store = SqlStore::new(pool.clone(), Engine::Sqlite)
            .await
            .expect("migrates");
        for sql in [
            "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
             VALUES ('d', 'office365-e3', 2, 1)",
            "INSERT INTO license_assignments (directory_id, user_id, offer_id, assign_time) \
             VALUES ('d', 'u', 'office365-e3', 1)",
        ] {
            sqlx::query(sql).execute(&pool).await.expect("inserts");
        }
        let purged = UserChange::Purged(UserRef {
            user_id: "u".into(),
            directory_id: "d".into(),
        });
        assert!(
            store
                .advance("", "c1", Some(&purged), 2)
                .await
                .expect("purge")
        );
        let (assigned, aside, consumed): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM license_assignments), \
             (SELECT COUNT(*) FROM licenses_set_aside), \
             (SELECT consumed FROM license_pools WHERE offer_id = 'office365-e3')",
        )
        .fetch_one(&pool)
        .await
        .expect("counts");
        assert_eq!((assigned, aside, consumed), (0, 0, 0));
        drop(store);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Trials bought before trials ended get theirs at start: `create_time` + the period;
    /// other subscriptions keep none, and a trial that has one keeps it.
    #[tokio::test]
    async fn older_trials_get_their_end_at_start() {
        let (pool, dir) = sqlite_pool("trials").await;
        let store = SqlStore::new(pool.clone(), Engine::Sqlite)
            .await
            .expect("migrates");
        for (id, offer, trial_user, end) in [
            ("t1", "azure-free-trial", Some("u1"), None),
            ("t2", "azure-free-trial", Some("u2"), Some(99)),
            ("p1", "azure-pay-as-you-go", None, None),
        ] {
            sqlx::query(
                "INSERT INTO subscriptions (id, offer_id, display_name, directory_id, seats, \
                 state, created_by_user_id, create_time, free_trial_user_id, end_time) \
                 VALUES ($1, $2, 'x', 'd', 0, 1, 'u', 10, $3, $4)",
            )
            .bind(id)
            .bind(offer)
            .bind(trial_user)
            .bind(end)
            .execute(&pool)
            .await
            .expect("inserts");
        }
        store
            .end_old_trials(std::time::Duration::from_micros(5))
            .await
            .expect("ends");
        let ends: Vec<(String, Option<i64>)> =
            sqlx::query_as("SELECT id, end_time FROM subscriptions ORDER BY id")
                .fetch_all(&pool)
                .await
                .expect("reads");
        let expected = [("p1", None), ("t1", Some(15)), ("t2", Some(99))]
            .map(|(id, end)| (id.to_owned(), end));
        assert_eq!(ends, expected);
        drop(store);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Migration 5 counts the pools of the subscriptions bought before licences existed:
    /// the seats of each directory's active per-seat subscriptions, by offer.
    #[tokio::test]
    async fn the_licence_migration_counts_existing_seats() {
        let (pool, dir) = sqlite_pool("pools").await;
        for migration in MIGRATOR.iter().filter(|m| m.version < 5) {
            sqlx::raw_sql(AssertSqlSafe(migration.sql.as_str().to_owned()))
                .execute(&pool)
                .await
                .expect("applies");
        }
        for (id, offer, directory, seats, state) in [
            ("s1", "office365-e3", "d1", 3, 1),
            ("s2", "office365-e3", "d1", 4, 1),
            ("s3", "office365-e3", "d1", 50, 2),
            ("s4", "office365-e3", "d2", 5, 1),
            ("s5", "office365-business-basic", "d1", 2, 1),
            ("s6", "azure-pay-as-you-go", "d1", 0, 1),
        ] {
            sqlx::query(
                "INSERT INTO subscriptions (id, offer_id, display_name, directory_id, seats, \
                 state, created_by_user_id, create_time) VALUES ($1, $2, 'x', $3, $4, $5, 'u', 1)",
            )
            .bind(id)
            .bind(offer)
            .bind(directory)
            .bind(seats)
            .bind(state)
            .execute(&pool)
            .await
            .expect("inserts");
        }
        let migration = MIGRATOR
            .iter()
            .find(|m| m.version == 5)
            .expect("migration 5");
        sqlx::raw_sql(AssertSqlSafe(migration.sql.as_str().to_owned()))
            .execute(&pool)
            .await
            .expect("applies");
        let pools: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT directory_id, offer_id, enabled, consumed FROM license_pools \
             ORDER BY directory_id, offer_id",
        )
        .fetch_all(&pool)
        .await
        .expect("reads");
        let expected = [
            ("d1", "office365-business-basic", 2, 0),
            ("d1", "office365-e3", 7, 0),
            ("d2", "office365-e3", 5, 0),
        ]
        .map(|(d, o, e, c)| (d.to_owned(), o.to_owned(), e, c));
        assert_eq!(pools, expected);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The follower's cursor moves once: a stale follower replaying a deletion after the
    /// restore that followed it (a lease that ran out while it worked) changes nothing, where
    /// applying it would take the restored user's licence away again.
    #[tokio::test]
    async fn a_cursor_moves_once() {
        use crate::domain::follow::{FollowerStore as _, UserChange, UserRef};
        let (pool, dir) = sqlite_pool("follow").await;
        let store = SqlStore::new(pool.clone(), Engine::Sqlite)
            .await
            .expect("migrates");
        for sql in [
            "INSERT INTO license_pools (directory_id, offer_id, enabled, consumed) \
             VALUES ('d', 'office365-e3', 1, 1)",
            "INSERT INTO license_assignments (directory_id, user_id, offer_id, assign_time) \
             VALUES ('d', 'u', 'office365-e3', 1)",
        ] {
            sqlx::query(sql).execute(&pool).await.expect("inserts");
        }
        let jane = UserRef {
            user_id: "u".into(),
            directory_id: "d".into(),
        };
        let deleted = UserChange::Deleted(jane.clone());
        let restored = UserChange::Restored(jane);
        assert!(
            store
                .advance("", "c1", Some(&deleted), 2)
                .await
                .expect("delete")
        );
        assert!(
            store
                .advance("c1", "c2", Some(&restored), 3)
                .await
                .expect("restore")
        );
        assert!(
            !store
                .advance("", "c1", Some(&deleted), 4)
                .await
                .expect("stale"),
            "a stale follower must not move the cursor"
        );
        assert_eq!(store.position().await.expect("position"), "c2");
        let (assigned, consumed): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM license_assignments), \
             (SELECT consumed FROM license_pools)",
        )
        .fetch_one(&pool)
        .await
        .expect("counts");
        assert_eq!((assigned, consumed), (1, 1), "the restored licence stays");
        let removals: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM changes WHERE kind = 6")
            .fetch_one(&pool)
            .await
            .expect("counts");
        assert_eq!(removals, 1);
        drop(store);
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A user's own list reads the owner index (not every subscription of the directory), and
    /// an administrator's the directory index.
    #[tokio::test]
    async fn each_list_reads_its_index() {
        let (pool, dir) = sqlite_pool("plan").await;
        MIGRATOR.run(&pool).await.expect("migrates");
        for (sql, index) in [
            (LIST_OWNED, "subscriptions_by_owner"),
            (LIST_IN_DIRECTORY, "subscriptions_by_directory"),
        ] {
            let plan: Vec<String> = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .fetch_all(&pool)
                .await
                .expect("explains")
                .iter()
                .map(|row| row.try_get::<String, _>("detail").unwrap_or_default())
                .collect();
            assert!(
                plan.iter()
                    .any(|step| step.contains(&format!("USING INDEX {index}"))),
                "{sql}: {plan:?}"
            );
        }
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Migration 3 rebuilds the table with sparse indexes: every row comes through unchanged,
    /// and the one-free-trial-per-user rule still holds (while rows without a free trial, all
    /// NULL there, do not collide).
    #[tokio::test]
    async fn the_sparse_index_migration_keeps_rows_and_rules() {
        let (pool, dir) = sqlite_pool("migrate").await;
        let apply = async |version: i64| {
            let migration = MIGRATOR
                .iter()
                .find(|m| m.version == version)
                .expect("a migration");
            sqlx::raw_sql(AssertSqlSafe(migration.sql.as_str().to_owned()))
                .execute(&pool)
                .await
                .expect("applies");
        };
        apply(1).await;
        apply(2).await;
        // id, offer, owner, creator, create_time, request_id, free trial of
        type Row = (
            &'static str,
            &'static str,
            Option<&'static str>,
            &'static str,
            i64,
        );
        let insert = async |(id, offer, owner, creator, time): Row,
                            request: Option<&str>,
                            trial: Option<&str>| {
            sqlx::query(
                "INSERT INTO subscriptions (id, offer_id, display_name, directory_id, owner_user_id, \
                 seats, state, created_by_user_id, create_time, cancel_time, request_id, \
                 request_fingerprint, free_trial_user_id) \
                 VALUES ($1, $2, 'x', 'd', $3, 1, 1, $4, $5, NULL, $6, 'f', $7)",
            )
            .bind(id)
            .bind(offer)
            .bind(owner)
            .bind(creator)
            .bind(time)
            .bind(request)
            .bind(trial)
            .execute(&pool)
            .await
        };
        type Stored = (String, Option<String>, i64, Option<String>, Option<String>);
        let read_all = async || -> Vec<Stored> {
            sqlx::query_as(
                "SELECT id, owner_user_id, create_time, request_id, free_trial_user_id \
                 FROM subscriptions ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("reads")
        };
        insert(("s1", "office365-e3", None, "u1", 10), Some("r1"), None)
            .await
            .expect("inserts");
        insert(
            ("s2", "azure-free-trial", Some("u1"), "u1", 11),
            None,
            Some("u1"),
        )
        .await
        .expect("inserts");
        insert(
            ("s3", "azure-pay-as-you-go", Some("u2"), "u2", 12),
            Some("r3"),
            None,
        )
        .await
        .expect("inserts");
        let before = read_all().await;
        apply(3).await;
        let after = read_all().await;
        assert_eq!(before.len(), 3);
        assert_eq!(before, after);
        let second_trial = insert(
            ("s4", "azure-free-trial", Some("u1"), "u1", 13),
            None,
            Some("u1"),
        )
        .await
        .expect_err("one free trial per user");
        assert!(
            storage::db::is_unique_violation(&second_trial),
            "{second_trial}"
        );
        insert(("s5", "office365-e3", None, "u1", 14), Some("r5"), None)
            .await
            .expect("another subscription without a free trial");
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
