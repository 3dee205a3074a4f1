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
//! Queries run in the workers' own tasks, so a caller that goes away never cancels one.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

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

impl<V: Clone + Send + 'static> PointReads<V> {
    /// Starts `workers` tasks answering reads with `load`, which is given distinct keys (at
    /// most [`MAX_KEYS`]) and returns the rows found, each with its key.
    pub fn start<L, F>(workers: usize, load: L) -> Self
    where
        L: Fn(Vec<String>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Vec<(String, V)>, sqlx::Error>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(waiting));
        let load = Arc::new(load);
        for _ in 0..workers.max(1) {
            tokio::spawn(work(waiting.clone(), load.clone()));
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
async fn work<V, L, F>(waiting: Arc<Mutex<mpsc::Receiver<Waiting<V>>>>, load: Arc<L>)
where
    V: Clone,
    L: Fn(Vec<String>) -> F,
    F: Future<Output = Result<Vec<(String, V)>, sqlx::Error>>,
{
    let mut batch = Vec::with_capacity(MAX_KEYS);
    loop {
        // One worker at a time waits on the queue; the others are reading meanwhile.
        let taken = waiting.lock().await.recv_many(&mut batch, MAX_KEYS).await;
        if taken == 0 {
            return;
        }
        batch.retain(|w: &Waiting<V>| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut keys: Vec<String> = batch.iter().map(|w| w.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        metrics::histogram!("db_point_read_batch_size").record(keys.len() as f64);
        match load(keys).await {
            Ok(rows) => {
                let found: HashMap<String, V> = rows.into_iter().collect();
                for w in batch.drain(..) {
                    let _ = w.reply.send(Ok(found.get(&w.key).cloned()));
                }
            }
            Err(err) => {
                for w in batch.drain(..) {
                    let _ = w.reply.send(Err(crate::db::copy_error(&err)));
                }
            }
        }
    }
}

/// `{head} ($1, $2, ...)` with `keys` bound, padded to a power of two by repeating the last
/// key: queries take one of a handful of shapes (1, 2, 4 ... [`MAX_KEYS`] keys), so each
/// connection prepares at most seven statements. `head` is SQL text of the caller's (never
/// input), ending in `IN`.
pub fn select_in(
    head: &str,
    mut keys: Vec<String>,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let size = keys.len().max(1).next_power_of_two();
    if let Some(last) = keys.last().cloned() {
        keys.resize(size, last);
    }
    let placeholders = (1..=keys.len())
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(format!("{head} ({placeholders})")));
    for key in keys {
        query = query.bind(key);
    }
    query
}

/// Workers for reads on `pool`: half of its connections, so writes always find one free.
pub fn workers_for(pool: &sqlx::AnyPool) -> usize {
    (pool.options().get_max_connections() as usize / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn keys_are_padded_to_a_power_of_two() {
        use sqlx::Execute as _;
        let keys = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let query = select_in("SELECT id FROM t WHERE id IN", keys);
        assert_eq!(query.sql(), "SELECT id FROM t WHERE id IN ($1, $2, $3, $4)");
        let query = select_in("SELECT id FROM t WHERE id IN", vec!["a".to_owned()]);
        assert_eq!(query.sql(), "SELECT id FROM t WHERE id IN ($1)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_queries_and_get_their_own_rows() {
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        let reads = PointReads::start(1, move |keys: Vec<String>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(keys
                    .into_iter()
                    .filter(|k| k != "missing")
                    .map(|k| (k.clone(), format!("row {k}")))
                    .collect())
            }
        });
        let mut tasks = Vec::new();
        for n in 0..200 {
            let reads = reads.clone();
            tasks.push(tokio::spawn(async move {
                let key = if n % 10 == 0 {
                    "missing".to_owned()
                } else {
                    format!("k{}", n % 37)
                };
                (key.clone(), reads.get(&key).await)
            }));
        }
        for task in tasks {
            let (key, got) = task.await.expect("task");
            let got = got.expect("read");
            if key == "missing" {
                assert_eq!(got, None);
            } else {
                assert_eq!(got, Some(format!("row {key}")));
            }
        }
        let queries = queries.load(Ordering::SeqCst);
        assert!(queries < 50, "200 reads took {queries} queries");
    }

    #[tokio::test]
    async fn a_failed_query_fails_each_of_its_reads() {
        let reads: PointReads<String> =
            PointReads::start(2, |_keys| async { Err(sqlx::Error::PoolTimedOut) });
        let err = reads.get("x").await.expect_err("fails");
        assert!(crate::db::is_unavailable(&err), "{err}");
    }
}
