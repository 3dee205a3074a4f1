//! The log writer: a thread of its own writes the service's log lines to stderr in batches.
//!
//! Every call logs a line, and a `write` to a log file can block for milliseconds while the
//! file system commits its journal (seen at 5 ms under a purchase load, with the database
//! syncing beside it), stalling every call queued on that runtime thread. So the thread that
//! logs only appends the line to a shared buffer. The writer thread takes the whole buffer
//! at once and writes it with one `write_all`, at most every [`FLUSH_EVERY`]: a line waits
//! that long at most (plus the write before it).
//!
//! Nothing wakes the writer per line. A writer woken for each line (tracing-appender's,
//! which this replaced) cost each call a thread wake-up and a `write` of its own: about 10 µs
//! of CPU per line at 6,000 purchases per second, a tenth of all the CPU a purchase took
//! (docs/decisions/log-writer.md). Here the writer sleeps [`FLUSH_EVERY`] between batches
//! while lines keep coming, and waits for the next line when none came.
//!
//! If the sink stalls (a collector that stopped reading, a full pipe), lines collect up to
//! [`BUFFER_LIMIT`] bytes besides the batch the writer is stuck writing; past that, lines are
//! dropped rather than wait for the sink, and counted ([`LogGuard::dropped`], reported by
//! [`LogGuard::report_drops`]).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The longest a line waits in the buffer while the writer gathers the lines that follow it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// Bytes of lines that may wait for the writer, besides the batch it is writing; past this,
/// lines are dropped (about 20,000 lines of 400 bytes).
pub const BUFFER_LIMIT: usize = 8 * 1024 * 1024;

/// How long dropping the [`LogGuard`] waits for the writer to write what is buffered.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Capacity the writer keeps between batches; a larger buffer (after a burst) is shrunk.
const KEEP_CAPACITY: usize = 256 * 1024;

struct Shared {
    state: Mutex<State>,
    /// Signalled when the first line goes into an empty buffer the writer waits on, and at
    /// exit.
    wake: Condvar,
    dropped: AtomicUsize,
    limit: usize,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// The writer waits on `wake` for a line.
    waiting: bool,
    closing: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic cannot happen while the lock is held (appends and swaps only), but if one
        // did, the buffer is still whole lines.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, line: &[u8]) {
        let mut state = self.state();
        let needed = state.lines.len() + line.len();
        if needed > self.limit {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if needed > state.lines.capacity() {
            // Doubling, but never past the limit.
            let capacity = (state.lines.capacity() * 2).clamp(needed, self.limit);
            let more = capacity - state.lines.len();
            state.lines.reserve_exact(more);
        }
        state.lines.extend_from_slice(line);
        let wake = std::mem::take(&mut state.waiting);
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Where `tracing_subscriber::fmt` writes: each event is formatted into a line first and
/// written with one `write_all`, which appends it to the buffer whole (or drops it whole).
#[derive(Clone)]
pub struct LogSink(Arc<Shared>);

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").finish_non_exhaustive()
    }
}

/// One line's writer, borrowed from the [`LogSink`].
#[derive(Debug)]
pub struct LineWriter<'a>(&'a LogSink);

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

/// Starts the writer thread (`log-writer`) writing to `out`, with a buffer of at most
/// `limit` bytes. Returns where lines go and the guard that keeps the writer.
pub fn start(out: impl Write + Send + 'static, limit: usize) -> (LogSink, LogGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        dropped: AtomicUsize::new(0),
        limit,
    });
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let writer = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            write_batches(&writer, out);
            drop(done);
        });
    if let Err(err) = spawned {
        // Without the thread, lines collect up to the limit and are then dropped (counted).
        eprintln!("could not start the log writer thread: {err}");
    }
    (
        LogSink(shared.clone()),
        LogGuard {
            shared,
            finished: Some(finished),
        },
    )
}

/// The writer thread: waits for a line, gathers for [`FLUSH_EVERY`], writes everything
/// buffered with one `write_all`, and again; at exit, writes what is left and returns.
fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.state();
        while state.lines.is_empty() && !state.closing {
            state.waiting = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !state.closing {
            drop(state);
            std::thread::sleep(FLUSH_EVERY);
            state = shared.state();
        }
        std::mem::swap(&mut state.lines, &mut batch);
        let closing = state.closing;
        drop(state);
        // A failed write (the sink is gone) loses what of this batch it did not write, which
        // may end in half a line; the next batch is tried anew.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch.shrink_to(KEEP_CAPACITY);
        }
        if closing && shared.state().lines.is_empty() {
            return;
        }
    }
}

/// Keeps the log writer thread. Dropping it writes the lines still buffered, waiting for
/// that at most a second, so a sink stalled at exit loses the last lines.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    shared: Arc<Shared>,
    /// Disconnected when the writer thread returns.
    finished: Option<std::sync::mpsc::Receiver<()>>,
}

impl LogGuard {
    /// Lines dropped so far because the buffer was full.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Starts the task that reports dropped lines, each second: as the
    /// `log_lines_dropped_total` counter and as a warning line. While the buffer is still full
    /// that warning is dropped too; it does not count as one of the service's lines (the
    /// counter does not grow by itself while a stalled sink sees no calls), and it is tried
    /// again each second, with the lines dropped since, until one gets through. Call inside
    /// the tokio runtime; the task ends with the runtime.
    pub fn report_drops(&self) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut report = DropReport::default();
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let new = report.pass(
                    || shared.dropped.load(Ordering::Relaxed),
                    |lines| tracing::warn!(lines, "the log writer fell behind: lines dropped"),
                );
                if new > 0 {
                    metrics::counter!("log_lines_dropped_total").increment(new as u64);
                }
            }
        });
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.state().closing = true;
        self.shared.wake.notify_one();
        if let Some(finished) = self.finished.take() {
            let _ = finished.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// What the drop-reporting task keeps between its passes.
#[derive(Debug, Default)]
struct DropReport {
    /// Drops counted so far, the task's own dropped warnings included.
    seen: usize,
    /// The service's drops that no warning that got through has told.
    untold: usize,
}

impl DropReport {
    /// One pass: `count` reads the drop counter, `warn` logs the warning for `lines` dropped.
    /// Returns the service's lines dropped since the last pass.
    fn pass(&mut self, count: impl Fn() -> usize, warn: impl FnOnce(usize)) -> usize {
        let now = count();
        let new = now.saturating_sub(self.seen);
        self.untold += new;
        self.seen = self.seen.max(now);
        if self.untold > 0 {
            warn(self.untold);
            if count() > self.seen {
                // The warning itself was dropped (or so we count one of the drops since).
                self.seen += 1;
            } else {
                self.untold = 0;
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A sink that keeps what it is given and can be held shut, as a collector that stopped
    /// reading.
    #[derive(Clone, Default)]
    struct Collector {
        got: Arc<Mutex<Vec<u8>>>,
        /// Writes begun (a held sink blocks them), and writes done.
        begun: Arc<AtomicUsize>,
        writes: Arc<AtomicUsize>,
        shut: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Collector {
        fn hold(&self, shut: bool) {
            *self.shut.0.lock().expect("lock") = shut;
            self.shut.1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.got.lock().expect("lock").clone()).expect("utf-8")
        }

        /// Waits until `n` writes have begun.
        fn begun(&self, n: usize) {
            let until = Instant::now() + Duration::from_secs(5);
            while self.begun.load(Ordering::Relaxed) < n && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(self.begun.load(Ordering::Relaxed) >= n, "no write began");
        }

        fn wait_for(&self, lines: usize) -> String {
            let until = Instant::now() + Duration::from_secs(5);
            while self.text().lines().count() < lines && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.text()
        }
    }

    impl Write for Collector {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.begun.fetch_add(1, Ordering::Relaxed);
            let (shut, opened) = &*self.shut;
            let mut shut = shut.lock().expect("lock");
            while *shut {
                shut = opened.wait(shut).expect("lock");
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.got.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer over a held sink, stuck writing its first line (`first`), with room for
    /// `limit` bytes besides.
    fn stuck(limit: usize) -> (Collector, LogSink, LogGuard) {
        let out = Collector::default();
        out.hold(true);
        let (sink, guard) = start(out.clone(), limit);
        log(&sink, "first\n");
        out.begun(1);
        (out, sink, guard)
    }

    fn log(sink: &LogSink, line: &str) {
        use tracing_subscriber::fmt::MakeWriter as _;
        sink.make_writer()
            .write_all(line.as_bytes())
            .expect("never fails");
    }

    #[test]
    fn lines_arrive_whole_in_order_and_in_few_writes() {
        let out = Collector::default();
        let (sink, _guard) = start(out.clone(), BUFFER_LIMIT);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log(
                            &sink,
                            &format!("thread {t} line {i:03} {}\n", "x".repeat(100)),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("logging thread");
        }
        let text = out.wait_for(2000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000);
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            assert_eq!(own.len(), 500, "thread {t}");
            for (i, line) in own.iter().enumerate() {
                assert_eq!(*line, format!("thread {t} line {i:03} {}", "x".repeat(100)));
            }
        }
        let writes = out.writes.load(Ordering::Relaxed);
        assert!(writes < 100, "2000 lines took {writes} writes");
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_lines_past_the_limit_and_gets_the_rest() {
        // Room for ten lines of 9 bytes besides the first, which the writer is stuck writing.
        let (out, sink, guard) = stuck(90);
        for i in 1..=25 {
            log(&sink, &format!("line {i:03}\n"));
        }
        assert_eq!(guard.dropped(), 15, "lines 11 to 25 do not fit");
        out.hold(false);
        let text = out.wait_for(11);
        let expected: String = (1..=10).map(|i| format!("line {i:03}\n")).collect();
        assert_eq!(text, format!("first\n{expected}"));
        // Room again.
        log(&sink, "line 026\n");
        assert!(out.wait_for(12).ends_with("line 010\nline 026\n"));
        assert_eq!(guard.dropped(), 15);
    }

    #[test]
    fn a_waiting_writer_is_woken_by_the_next_line() {
        let out = Collector::default();
        let (sink, _guard) = start(out.clone(), BUFFER_LIMIT);
        let until = Instant::now() + Duration::from_secs(5);
        while !sink.0.state().waiting && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(sink.0.state().waiting, "the writer waits for a line");
        log(&sink, "wake up\n");
        assert_eq!(out.wait_for(1), "wake up\n");
    }

    #[test]
    fn a_full_buffer_never_grows_past_the_limit() {
        let (out, sink, guard) = stuck(1000);
        for _ in 0..200 {
            log(&sink, "0123456789\n");
        }
        let state = sink.0.state();
        assert_eq!(state.lines.len(), 990, "90 lines of 11 bytes");
        assert!(state.lines.capacity() <= 1000, "{}", state.lines.capacity());
        drop(state);
        assert_eq!(guard.dropped(), 110);
        out.hold(false);
    }

    #[test]
    fn dropping_the_guard_writes_what_is_buffered() {
        let out = Collector::default();
        let (sink, guard) = start(out.clone(), BUFFER_LIMIT);
        for i in 0..100 {
            log(&sink, &format!("line {i}\n"));
        }
        drop(guard);
        assert_eq!(
            out.text().lines().count(),
            100,
            "written before the drop returns"
        );
    }

    #[test]
    fn dropping_the_guard_waits_at_most_a_second_for_a_stalled_sink() {
        let (out, _sink, guard) = stuck(BUFFER_LIMIT);
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_AT_EXIT / 2 && waited < FLUSH_AT_EXIT * 3,
            "{waited:?}"
        );
        out.hold(false);
    }

    #[test]
    fn a_stalled_sink_is_warned_of_once_it_reads_and_its_own_warnings_are_not_counted() {
        use std::cell::Cell;
        let dropped = Cell::new(0);
        let told = Cell::new(Vec::new());
        let mut report = DropReport::default();
        // The sink is stalled: 5 of the service's lines dropped, then each warning too.
        dropped.set(5);
        let stalled = |lines| {
            let mut t = told.take();
            t.push((lines, false));
            told.set(t);
            dropped.set(dropped.get() + 1);
        };
        assert_eq!(report.pass(|| dropped.get(), stalled), 5);
        for _ in 0..10 {
            assert_eq!(
                report.pass(|| dropped.get(), stalled),
                0,
                "own drops not counted"
            );
        }
        // It reads again: the next warning gets through with the five lines, then silence.
        let through = |lines| {
            let mut t = told.take();
            t.push((lines, true));
            told.set(t);
        };
        assert_eq!(report.pass(|| dropped.get(), through), 0);
        assert_eq!(report.pass(|| dropped.get(), through), 0);
        let told = told.take();
        assert_eq!(told.len(), 12, "{told:?}");
        assert!(
            told[..11]
                .iter()
                .all(|&(lines, got_through)| lines == 5 && !got_through)
        );
        assert_eq!(told[11], (5, true));
        // Three more of the service's lines dropped, the warning gets through.
        dropped.set(dropped.get() + 3);
        let mut last = 0;
        assert_eq!(report.pass(|| dropped.get(), |lines| last = lines), 3);
        assert_eq!(last, 3);
    }
}
