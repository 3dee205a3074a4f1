//! [`BillingStore`] over sqlx's `Any` driver: one set of SQL for SQLite and PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use contract::batch::PointReads;
use contract::db::{Engine, HeldConnection, WriteGate};
use contract::peers::Peers;
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, AssertSqlSafe, Connection as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use super::{BillingStore, StoreError};
use crate::domain::model::{State, Subscription};
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
}

/// The kind of row the caches of subscriptions are invalidated by.
pub const SUBSCRIPTIONS: &str = "subscriptions";

/// A new subscription waiting for the next group commit.
struct Pending {
    subscription: Subscription,
    request: Option<(String, String)>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Most subscriptions one statement inserts (13 parameters each, within both engines' limits).
const MAX_BATCH: usize = 256;

/// The columns a [`Subscription`] is read from.
const SELECT_COLUMNS: &str = "id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time";

const SUBSCRIPTION_COLUMNS: &str = "id, offer_id, display_name, directory_id, owner_user_id, seats, state, \
     created_by_user_id, create_time, cancel_time, request_id, request_fingerprint, free_trial_user_id";

impl SqlStore {
    /// Wraps an open pool on `engine` and brings its schema up to date, and starts the task
    /// that group-commits purchases (it ends when the last clone of the store is dropped).
    pub async fn new(pool: AnyPool, engine: Engine) -> anyhow::Result<Self> {
        MIGRATOR.run(&pool).await?;
        let writers = WriteGate::for_engine(engine);
        writers.checkpoint_in_background(&pool);
        let (purchases, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(group_commit(pool.clone(), writers.clone(), queue));
        let reads = PointReads::start(
            pool.clone(),
            format!("SELECT {SELECT_COLUMNS} FROM subscriptions WHERE id IN"),
            |row| subscription_from_row(row).map(|s| (s.id.clone(), s)),
        );
        Ok(Self {
            pool,
            writers,
            purchases,
            reads,
            peers: None,
        })
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
        let stopped = || StoreError::Backend(sqlx::Error::PoolClosed);
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
             create_time, cancel_time, request_fingerprint FROM subscriptions \
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
        let rows = sqlx::query(
            "SELECT id, offer_id, display_name, directory_id, owner_user_id, seats, state, created_by_user_id, \
             create_time, cancel_time FROM subscriptions \
             WHERE directory_id = $1 AND ($2 = '' OR owner_user_id = $2) \
             AND (create_time > $3 OR (create_time = $3 AND id > $4)) \
             ORDER BY create_time, id LIMIT $5",
        )
        .bind(directory_id)
        .bind(owner.unwrap_or(""))
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
        let cancelled = sqlx::query(
            "UPDATE subscriptions SET state = $1, cancel_time = $2 WHERE id = $3 AND state = $4",
        )
        .bind(State::Cancelled.code())
        .bind(now)
        .bind(id)
        .bind(State::Active.code())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if let (true, Some(_)) = (cancelled, &self.peers) {
            contract::peers::announce(&mut tx, SUBSCRIPTIONS, id).await?;
        }
        tx.commit().await?;
        drop(turn);
        // Also when nothing changed: the cancellation may be another call's, committed but not
        // yet confirmed by every replica's cache.
        if let Some(peers) = &self.peers {
            peers.settle().await;
        }
        self.get(id).await
    }
}

/// The group-commit loop: takes whatever purchases are queued (at least one, at most
/// [`MAX_BATCH`]), inserts them with one `INSERT ... ON CONFLICT DO NOTHING RETURNING id`
/// (its own transaction), and tells each caller whether its row went in. A row the unique
/// indexes refused (a request_id or free trial taken, by an earlier call or a twin in the same
/// batch) is [`StoreError::Conflict`] for that caller only; any other failure fails the batch.
/// Under light load a batch is one purchase and nothing waits; under heavy load one commit
/// serves many.
async fn group_commit(pool: AnyPool, writers: WriteGate, mut queue: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // Batches follow each other closely under load: the task keeps its connection rather than
    // give it back (and have it pinged) after every commit.
    let mut held = HeldConnection::new(pool);
    while held.wait(queue.recv_many(&mut batch, MAX_BATCH)).await > 0 {
        let outcome = {
            let _turn = writers.enter().await;
            match held.get().await {
                Ok(conn) => insert_batch(conn, &batch).await,
                Err(err) => Err(err),
            }
        };
        if outcome.is_err() {
            // Not retried: the commit may have landed. The pool checks the connection.
            held.give_back();
        }
        metrics::histogram!("billing_purchase_batch_size").record(batch.len() as f64);
        match outcome {
            Ok(inserted) => {
                for pending in batch.drain(..) {
                    let result = if inserted.contains(&pending.subscription.id) {
                        Ok(())
                    } else {
                        Err(StoreError::Conflict)
                    };
                    let _ = pending.done.send(result);
                }
            }
            Err(err) => {
                for pending in batch.drain(..) {
                    let err = contract::db::copy_error(&err);
                    let _ = pending.done.send(Err(StoreError::Backend(err)));
                }
            }
        }
    }
}

/// The ids of the rows of `batch` that were inserted, in one transaction. The batch goes in
/// as statements of 256, 128, ... 2, 1 rows (37 purchases: 32 + 4 + 1), so each connection
/// caches at most nine prepared statements rather than one per batch size.
async fn insert_batch(
    conn: &mut PoolConnection<Any>,
    batch: &[Pending],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(batch.len());
    if batch.len().is_power_of_two() {
        // One statement is its own transaction.
        for row in insert_rows(batch).fetch_all(&mut **conn).await? {
            inserted.insert(row.try_get::<String, _>("id")?);
        }
        return Ok(inserted);
    }
    let mut tx = conn.begin().await?;
    let mut rest = batch;
    while !rest.is_empty() {
        let size = 1 << rest.len().ilog2();
        let (chunk, tail) = rest.split_at(size);
        for row in insert_rows(chunk).fetch_all(&mut *tx).await? {
            inserted.insert(row.try_get::<String, _>("id")?);
        }
        rest = tail;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// `INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING RETURNING id` for `chunk`.
fn insert_rows(
    chunk: &[Pending],
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut sql = format!("INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ");
    for row in 0..chunk.len() {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..13 {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * 13 + column + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for pending in chunk {
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
            .bind(s.offer.free_trial.then(|| s.created_by_user_id.clone()));
    }
    query
}
