//! Coalesced point reads: reads of rows by key that wait at the same time share one query.
//!
//! Every authenticated call reads its caller by id, and billing reads a subscription by id
//! for every GetSubscription. Under load most of the cost of such a read is not the lookup
//! but the round trip around it (and on PostgreSQL the ping sqlx sends when the connection
//! returns to the pool). [`PointReads`] queues the keys callers ask for; a few worker tasks
//! each take everything queued (up to [`MAX_KEYS`]) and read it with one
//! `... WHERE key IN (...)` statement. Under light load a query carries one key and nothing
//! waits; under heavy load one query serves dozens of callers.
//!
//! Freshness is that of a direct read: a key is taken off the queue before the query that
//! answers it starts, so the query sees every write committed before the caller asked. Unlike
//! a cache, this needs no invalidation, so it is used on both engines, with replicas too.
//! Queries run in the workers' own tasks, so a caller that goes away never cancels one; that
//! is also why each worker keeps one pooled connection, sparing the ping sqlx sends each time
//! a connection goes back to the pool (one more round trip per query); see
//! [`crate::db::HeldConnection`]. Measured: docs/decisions/coalesced-point-reads.md.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::db::HeldConnection;

/// Most keys one query reads.
pub const MAX_KEYS: usize = 64;

/// Reads waiting for a worker, beyond which callers wait to enqueue.
const QUEUE: usize = 4096;

type Answer<V> = Result<Option<V>, sqlx::Error>;

struct Waiting<V> {
    key: String,
    reply: oneshot::Sender<Answer<V>>,
}

/// The queue of point reads of one kind of row, and the workers that answer it. The workers
/// end when the last clone is dropped.
pub struct PointReads<V> {
    queue: mpsc::Sender<Waiting<V>>,
}

impl<V> Clone for PointReads<V> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<V> std::fmt::Debug for PointReads<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointReads")
            .field("queued", &(QUEUE - self.queue.capacity()))
            .finish()
    }
}

/// Makes a row's `(key, value)` from a result row.
pub type RowReader<V> = fn(&AnyRow) -> Result<(String, V), sqlx::Error>;

impl<V: Clone + Send + 'static> PointReads<V> {
    /// Starts the workers (two, fewer on a small pool) answering reads on `pool` with
    /// `{head} ($1, ...)` (padded to a power of two keys, so each connection prepares at most
    /// seven statements) and `row` for each result row.
    pub fn start(pool: AnyPool, head: String, row: RowReader<V>) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(waiting));
        let statements = Arc::new(Statements::new(&head));
        for _ in 0..workers_for(&pool) {
            tokio::spawn(work(waiting.clone(), pool.clone(), statements.clone(), row));
        }
        Self { queue }
    }

    /// The row `key`, read by the next query to start.
    pub async fn get(&self, key: &str) -> Answer<V> {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            key: key.to_owned(),
            reply,
        };
        self.queue
            .send(waiting)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

/// One worker: takes what is queued, reads it, answers each caller.
async fn work<V: Clone>(
    waiting: Arc<Mutex<mpsc::Receiver<Waiting<V>>>>,
    pool: AnyPool,
    statements: Arc<Statements>,
    row: RowReader<V>,
) {
    let mut batch = Vec::with_capacity(MAX_KEYS);
    let mut held = HeldConnection::new(pool);
    loop {
        // One worker at a time waits on the queue; the others are reading meanwhile.
        let next = async { waiting.lock().await.recv_many(&mut batch, MAX_KEYS).await };
        if held.wait(next).await == 0 {
            return;
        }
        batch.retain(|w: &Waiting<V>| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut keys: Vec<String> = batch.iter().map(|w| w.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        metrics::histogram!("db_point_read_batch_size").record(batch.len() as f64);
        match read(&mut held, &statements, row, &keys).await {
            Ok(rows) => {
                let found: HashMap<String, V> = rows.into_iter().collect();
                for w in batch.drain(..) {
                    let _ = w.reply.send(Ok(found.get(&w.key).cloned()));
                }
            }
            Err(err) => {
                held.give_back();
                for w in batch.drain(..) {
                    let _ = w.reply.send(Err(crate::db::copy_error(&err)));
                }
            }
        }
    }
}

/// Reads `keys` on the held connection. One the database may have dropped since (a restart,
/// a terminated backend): if the query fails on it, the read is made once more on a fresh
/// connection that answers a ping (reads are safe to repeat).
async fn read<V>(
    held: &mut HeldConnection,
    statements: &Statements,
    row: RowReader<V>,
    keys: &[String],
) -> Result<Vec<(String, V)>, sqlx::Error> {
    let rows = match statements
        .query(keys)
        .fetch_all(&mut **held.get().await?)
        .await
    {
        Ok(rows) => rows,
        Err(_) => {
            let conn = held.get_live().await?;
            statements.query(keys).fetch_all(&mut **conn).await?
        }
    };
    rows.iter().map(row).collect()
}

/// The statements of one kind of point read, `{head} ($1, ..., $n)` for n = 1, 2, 4 ...
/// [`MAX_KEYS`], written once: queries take one of these seven shapes, so each connection
/// prepares at most seven statements. `head` is SQL text of the caller's (never input),
/// ending in `IN`.
struct Statements {
    head: String,
    by_size: Vec<Arc<str>>,
}

impl Statements {
    fn new(head: &str) -> Self {
        let by_size = (0..=MAX_KEYS.ilog2())
            .map(|power| Self::text(head, 1 << power).into())
            .collect();
        Self {
            head: head.to_owned(),
            by_size,
        }
    }

    fn text(head: &str, size: usize) -> String {
        let placeholders = (1..=size)
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{head} ({placeholders})")
    }

    /// The statement for `keys` with them bound, padded to a power of two by repeating the
    /// last key.
    fn query(&self, keys: &[String]) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        use sqlx::SqlSafeStr as _;
        let size = keys.len().max(1).next_power_of_two();
        let sql = match self.by_size.get(size.ilog2() as usize) {
            Some(sql) => sqlx::AssertSqlSafe(sql.clone()).into_sql_str(),
            // More keys than a batch takes: never from `work`, but correct all the same.
            None => sqlx::AssertSqlSafe(Self::text(&self.head, size)).into_sql_str(),
        };
        let mut query = sqlx::query(sql);
        let padding = keys.last().into_iter().cycle().take(size - keys.len());
        for key in keys.iter().chain(padding) {
            query = query.bind(key.clone());
        }
        query
    }
}

/// Workers for one kind of point read on `pool`: two, so that with a database across a
/// network one query can be in flight while the other worker takes the next batch. (On this
/// repository's 2-core benchmark machine, with PostgreSQL local, one worker coalesced about
/// eight reads per query at concurrency 64 and two or four about six.) Never more than a
/// quarter of the pool, so writes always find connections.
fn workers_for(pool: &AnyPool) -> usize {
    (pool.options().get_max_connections() as usize / 4).clamp(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_padded_to_a_power_of_two() {
        use sqlx::Execute as _;
        let statements = Statements::new("SELECT id FROM t WHERE id IN");
        let keys = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let query = statements.query(&keys);
        assert_eq!(query.sql(), "SELECT id FROM t WHERE id IN ($1, $2, $3, $4)");
        let query = statements.query(&keys[..1]);
        assert_eq!(query.sql(), "SELECT id FROM t WHERE id IN ($1)");
        let many: Vec<String> = (0..MAX_KEYS + 1).map(|n| n.to_string()).collect();
        let placeholders = statements.query(&many).sql().as_str().matches('$').count();
        assert_eq!(placeholders, 2 * MAX_KEYS);
    }

    async fn table_of(rows: usize) -> (AnyPool, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("contract-batch-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/b.db", dir.display());
        let pool = crate::db::connect(&url, &crate::db::PoolSettings::default())
            .await
            .expect("opens");
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT NOT NULL)")
            .execute(&pool)
            .await
            .expect("table");
        for n in 0..rows {
            sqlx::query("INSERT INTO t (id, v) VALUES ($1, $2)")
                .bind(format!("k{n}"))
                .bind(format!("row {n}"))
                .execute(&pool)
                .await
                .expect("row");
        }
        (pool, dir)
    }

    fn value(row: &AnyRow) -> Result<(String, String), sqlx::Error> {
        use sqlx::Row as _;
        Ok((row.try_get("id")?, row.try_get("v")?))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_each_get_their_own_row() {
        let (pool, dir) = table_of(40).await;
        let reads = PointReads::start(
            pool.clone(),
            "SELECT id, v FROM t WHERE id IN".into(),
            value,
        );
        let mut tasks = Vec::new();
        for n in 0..400 {
            let reads = reads.clone();
            tasks.push(tokio::spawn(async move {
                // Every tenth read asks for a row that does not exist.
                let key = format!("k{}", if n % 10 == 0 { 1000 + n } else { n % 37 });
                (n, reads.get(&key).await)
            }));
        }
        for task in tasks {
            let (n, got) = task.await.expect("task");
            let got = got.expect("read");
            if n % 10 == 0 {
                assert_eq!(got, None);
            } else {
                assert_eq!(got, Some(format!("row {}", n % 37)));
            }
        }
        pool.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_failed_query_fails_its_reads_and_the_worker_carries_on() {
        let (pool, dir) = table_of(1).await;
        let broken = PointReads::start(
            pool.clone(),
            "SELECT id, v FROM nowhere WHERE id IN".into(),
            value,
        );
        let err = broken.get("k0").await.expect_err("no such table");
        assert!(!crate::db::is_unavailable(&err), "{err}");
        let err = broken.get("k0").await.expect_err("still no such table");
        assert!(!crate::db::is_unavailable(&err), "{err}");

        let reads = PointReads::start(
            pool.clone(),
            "SELECT id, v FROM t WHERE id IN".into(),
            value,
        );
        assert_eq!(
            reads.get("k0").await.expect("read"),
            Some("row 0".to_owned())
        );
        pool.close().await;
        let err = reads.get("k0").await.expect_err("pool closed");
        assert!(crate::db::is_unavailable(&err), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
