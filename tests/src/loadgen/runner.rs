//! The load loop: `concurrency` workers sending calls over `connections` HTTP/2 connections,
//! in a closed loop (each worker sends its next call when the last one answers) or an open
//! loop (calls scheduled at a fixed rate, latency counted from the scheduled start).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use super::scenario::{Conn, Workload};

/// The largest latency the histograms tell apart (larger ones count as this): one hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Histograms are shared by workers in at most this many shards (each ~180 KiB).
const MAX_SHARDS: usize = 64;
/// An open-loop call starting later than this after its slot counts as behind schedule.
const LATE: Duration = Duration::from_millis(1);

/// When the measured part of a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this long (calls in flight then still complete and count).
    After(Duration),
    /// After this many measured calls.
    Requests(u64),
}

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Calls in flight at most (workers).
    pub concurrency: usize,
    /// Calls during this first stretch are sent but not measured.
    pub warmup: Duration,
    pub stop: Stop,
    /// Open loop at this many calls per second; `None`: closed loop.
    pub rate: Option<f64>,
}

/// What a run measured.
#[derive(Debug)]
pub struct Stats {
    /// Latency of every measured call (answered OK or not), in microseconds.
    pub latency: Histogram<u64>,
    pub ok: u64,
    /// Failed calls by gRPC status code, with the first message seen.
    pub errors: BTreeMap<i32, (u64, String)>,
    /// Calls sent during the warmup, not measured.
    pub warmup_requests: u64,
    /// Open loop: measured calls that started more than 1 ms after their slot because every
    /// worker was busy (the concurrency cap was reached).
    pub behind_schedule: u64,
    /// Open loop with --duration: calls scheduled in the measured window that were never sent
    /// because every worker was still busy when it ended (not in the latency figures).
    pub unsent: u64,
    /// From the end of the warmup to the last measured answer.
    pub elapsed: Duration,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .map_err(|e| anyhow::anyhow!("cannot create a histogram: {e}"))?,
            ok: 0,
            errors: BTreeMap::new(),
            warmup_requests: 0,
            behind_schedule: 0,
            unsent: 0,
            elapsed: Duration::ZERO,
        })
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.errors.values().map(|(n, _)| n).sum::<u64>()
    }

    fn merge(&mut self, other: &Stats) -> anyhow::Result<()> {
        self.latency
            .add(&other.latency)
            .map_err(|e| anyhow::anyhow!("cannot merge histograms: {e}"))?;
        self.ok += other.ok;
        for (code, (count, sample)) in &other.errors {
            let entry = self
                .errors
                .entry(*code)
                .or_insert_with(|| (0, sample.clone()));
            entry.0 += count;
        }
        self.warmup_requests += other.warmup_requests;
        self.behind_schedule += other.behind_schedule;
        Ok(())
    }

    fn record(&mut self, latency: Duration, result: Result<(), tonic::Status>) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
        match result {
            Ok(()) => self.ok += 1,
            Err(status) => {
                let entry = self
                    .errors
                    .entry(status.code() as i32)
                    .or_insert_with(|| (0, status.message().to_owned()));
                entry.0 += 1;
            }
        }
    }
}

/// State all workers share.
struct Shared {
    workload: Arc<Workload>,
    plan: Plan,
    /// The sequence number of the next call: picks its connection, its slot (open loop) and
    /// the item it reads.
    seq: AtomicU64,
    /// Measured calls claimed so far (for `Stop::Requests`).
    claimed: AtomicU64,
    start: Instant,
    measure_from: Instant,
    shards: Vec<Mutex<Stats>>,
    /// Microseconds after `measure_from` of the last measured answer.
    last_answer_us: AtomicU64,
}

/// Runs `workload` as `plan` says over `conns` (one per HTTP/2 connection).
pub async fn run(workload: Arc<Workload>, conns: Vec<Conn>, plan: Plan) -> anyhow::Result<Stats> {
    anyhow::ensure!(!conns.is_empty(), "no connection to send on");
    let concurrency = plan.concurrency.max(1);
    let shards = (0..concurrency.min(MAX_SHARDS))
        .map(|_| Stats::new().map(Mutex::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        workload,
        plan,
        seq: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        start,
        measure_from: start + plan.warmup,
        shards,
        last_answer_us: AtomicU64::new(0),
    });
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        workers.spawn(work(shared.clone(), conns.clone(), worker));
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a load worker failed")?;
    }
    let mut total = Stats::new()?;
    for shard in &shared.shards {
        total.merge(&shard.lock().unwrap_or_else(PoisonError::into_inner))?;
    }
    total.elapsed = Duration::from_micros(shared.last_answer_us.load(Ordering::Relaxed));
    if let (Some(rate), Stop::After(duration)) = (plan.rate, plan.stop) {
        let scheduled = slots_before(plan.warmup + duration, rate)
            .saturating_sub(slots_before(plan.warmup, rate));
        total.unsent = scheduled.saturating_sub(total.requests());
    }
    Ok(total)
}

/// When the `seq`-th call of an open loop is due, after the start.
fn slot_offset(seq: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(seq as f64 / rate)
}

/// How many open-loop slots are due before `offset`.
fn slots_before(offset: Duration, rate: f64) -> u64 {
    let mut n = (offset.as_secs_f64() * rate).ceil() as u64;
    while n > 0 && slot_offset(n - 1, rate) >= offset {
        n -= 1;
    }
    while slot_offset(n, rate) < offset {
        n += 1;
    }
    n
}

/// One worker: claims the next call, sends it, records it, until the plan says stop.
async fn work(shared: Arc<Shared>, mut conns: Vec<Conn>, worker: usize) {
    let plan = shared.plan;
    let shard = worker % shared.shards.len().max(1);
    let connections = u64::try_from(conns.len()).unwrap_or(1).max(1);
    let end = match plan.stop {
        Stop::After(duration) => Some(shared.measure_from + duration),
        Stop::Requests(_) => None,
    };
    loop {
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        // When this call is due: its slot in an open loop, now in a closed one.
        let slot = plan.rate.map(|rate| shared.start + slot_offset(seq, rate));
        let due = slot.unwrap_or_else(Instant::now);
        let measured = due >= shared.measure_from;
        if measured {
            if end.is_some_and(|end| due >= end) {
                break;
            }
            if let Stop::Requests(n) = plan.stop
                && shared.claimed.fetch_add(1, Ordering::Relaxed) >= n
            {
                break;
            }
        }
        // Open loop: a worker that is early waits for the slot, and its latency counts from
        // when it actually sends (the timer's lateness is ours, not the server's); one that is
        // late (every worker was busy) counts from the slot, so queueing behind slow answers
        // is measured instead of omitted.
        let mut late = false;
        let sent = match slot {
            Some(slot) => {
                let now = Instant::now();
                // Past the end of the run, slots still waiting for a worker are not sent.
                if end.is_some_and(|end| now >= end) {
                    break;
                }
                if now < slot {
                    tokio::time::sleep_until(slot.into()).await;
                    Instant::now()
                } else {
                    late = now.duration_since(slot) > LATE;
                    slot
                }
            }
            None => due,
        };
        let index = usize::try_from(seq % connections).unwrap_or_default();
        let Some(conn) = conns.get_mut(index) else {
            break;
        };
        let result = shared.workload.call(conn, seq).await;
        let answered = Instant::now();
        let Some(stats) = shared.shards.get(shard) else {
            break;
        };
        let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
        if measured {
            stats.record(answered.duration_since(sent), result);
            stats.behind_schedule += u64::from(late);
            let after = answered.saturating_duration_since(shared.measure_from);
            shared.last_answer_us.fetch_max(
                u64::try_from(after.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        } else {
            stats.warmup_requests += 1;
        }
    }
}
