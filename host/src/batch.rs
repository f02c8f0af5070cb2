//! The batcher in front of the sinks: latency first, throughput from group commit.
//!
//! A batch is flushed as soon as the sink is free. Rows that arrived while the previous commit ran
//! are flushed at once (`ready`): they have waited for the sink already. Rows that arrive at an
//! idle sink wait at most `linger` (about a millisecond) for company, so a trickle is committed
//! almost row by row and a burst is not split into a commit per row. `max_rows` and `max_bytes` cap
//! a batch; `max_wait` is an upper bound that is never aimed at.
//!
//! Batches therefore grow only when commits are the bottleneck: while one commit runs, the next batch
//! fills with what arrives meanwhile, so at a rate the sink manages only in large batches the batches
//! become large by themselves, and at a low rate they stay small and immediate.
//!
//! The batcher is pure: it is told the time (`tokio::time::Instant`, so tests run on paused time) and
//! decides; the pipeline owns the rows and the timer.

use std::time::Duration;

use tokio::time::Instant;

/// Bounds of the batcher.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchConfig {
    /// Most rows in one batch.
    pub max_rows: usize,
    /// Flush when this many bytes wait, whatever the row count.
    pub max_bytes: usize,
    /// How long rows that reach an idle sink wait for more before they are flushed.
    pub linger: Duration,
    /// No row waits longer than this before its batch is due (an upper bound for `linger`).
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: 100_000,
            max_bytes: 16 << 20,
            linger: Duration::from_millis(1),
            max_wait: Duration::from_secs(1),
        }
    }
}

/// Why a batch was flushed (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// It reached `max_rows`.
    Rows,
    /// It reached `max_bytes`.
    Bytes,
    /// Its rows arrived while the previous commit ran: flushed as soon as the sink was free.
    Ready,
    /// Its rows reached an idle sink and lingered for more.
    Linger,
}

impl FlushReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Rows => "rows",
            FlushReason::Bytes => "bytes",
            FlushReason::Ready => "ready",
            FlushReason::Linger => "linger",
        }
    }
}

/// A batch handed over by [`Batcher::take`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Rows in it.
    pub rows: usize,
    /// Bytes in it.
    pub bytes: usize,
    /// When its first row arrived.
    pub opened_at: Instant,
}

/// The batcher's state.
#[derive(Clone, Debug)]
pub struct Batcher {
    config: BatchConfig,
    rows: usize,
    bytes: usize,
    opened_at: Option<Instant>,
    /// The waiting batch opened within `linger` of the last commit's end: its rows arrived while the
    /// sink was busy.
    ready: bool,
    /// When the last commit finished.
    last_flush: Option<Instant>,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(config: BatchConfig) -> Self {
        let config = BatchConfig { max_rows: config.max_rows.max(1), max_bytes: config.max_bytes.max(1), ..config };
        Batcher { config, rows: 0, bytes: 0, opened_at: None, ready: false, last_flush: None }
    }

    /// Adds rows that arrived at `now`; says whether a cap makes the batch due at once.
    pub fn add(&mut self, rows: usize, bytes: usize, now: Instant) -> Option<FlushReason> {
        if rows == 0 && bytes == 0 {
            return None;
        }
        if self.opened_at.is_none() {
            self.opened_at = Some(now);
            self.ready = self.last_flush.is_some_and(|t| now.saturating_duration_since(t) <= self.config.linger);
        }
        self.rows += rows;
        self.bytes += bytes;
        if self.bytes >= self.config.max_bytes {
            Some(FlushReason::Bytes)
        } else if self.rows >= self.config.max_rows {
            Some(FlushReason::Rows)
        } else {
            None
        }
    }

    /// When the waiting batch is due (`None` when nothing waits): at once for rows that waited for
    /// the sink, after `linger` for rows that found it idle.
    pub fn deadline(&self) -> Option<Instant> {
        let opened_at = self.opened_at?;
        Some(if self.ready { opened_at } else { opened_at + self.config.linger.min(self.config.max_wait) })
    }

    /// Whether the waiting batch is due at `now`, and why.
    pub fn due(&self, now: Instant) -> Option<FlushReason> {
        let due = self.deadline().is_some_and(|d| now >= d);
        due.then_some(if self.ready { FlushReason::Ready } else { FlushReason::Linger })
    }

    /// Hands over the waiting batch (if any) and starts a new one.
    pub fn take(&mut self) -> Option<Taken> {
        let opened_at = self.opened_at.take()?;
        let taken = Taken { rows: self.rows, bytes: self.bytes, opened_at };
        self.rows = 0;
        self.bytes = 0;
        self.ready = false;
        Some(taken)
    }

    /// Tells the batcher the sink finished a commit at `at`: rows arriving until `linger` after it
    /// have waited for the sink.
    pub fn flushed(&mut self, at: Instant) {
        self.last_flush = Some(at);
    }

    /// Rows waiting.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The most rows a batch takes.
    pub fn max_rows(&self) -> usize {
        self.config.max_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a simulated run saw: each batch's rows, each row's latency (arrival to commit end), and
    /// the rows still waiting at the end.
    struct Run {
        batches: Vec<usize>,
        latencies: Vec<Duration>,
        left: usize,
    }

    impl Run {
        fn quantile(&self, q: f64) -> Duration {
            let mut all = self.latencies.clone();
            all.sort();
            all[((all.len() - 1) as f64 * q) as usize]
        }
        fn median_batch(&self) -> usize {
            let mut rows = self.batches.clone();
            rows.sort();
            rows[rows.len() / 2]
        }
    }

    /// Rows arrive one every `1/rate` s for `seconds`; the sink takes `base + rows * per_row` per
    /// batch and rows keep arriving meanwhile (the loop polls after each commit, as the process role
    /// does). Time advances in 10 µs steps.
    fn simulate(rate: u64, base: Duration, per_row: Duration, seconds: u64) -> Run {
        let step = Duration::from_micros(10);
        let mut b = Batcher::new(BatchConfig::default());
        let start = Instant::now();
        let mut now = start;
        let end = start + Duration::from_secs(seconds);
        let mut arrivals = std::collections::VecDeque::new();
        let mut next_arrival = start;
        let gap = Duration::from_nanos(1_000_000_000 / rate);
        let mut busy_until: Option<(Instant, usize)> = None;
        let mut run = Run { batches: Vec::new(), latencies: Vec::new(), left: 0 };
        let mut pending: Vec<Instant> = Vec::new();
        while now < end {
            now += step;
            if let Some((until, rows)) = busy_until
                && now >= until
            {
                let committed: Vec<Instant> = pending.drain(..rows).collect();
                run.latencies.extend(committed.iter().map(|t| until - *t));
                run.batches.push(rows);
                b.flushed(until);
                busy_until = None;
            }
            while next_arrival <= now {
                arrivals.push_back(next_arrival);
                next_arrival += gap;
            }
            // The sink is free: what arrived is read and added, then flushed if due.
            if busy_until.is_none() {
                let n = arrivals.len();
                if n > 0 {
                    pending.extend(arrivals.drain(..));
                    b.add(n, n * 48, now);
                }
                if let Some(_reason) = b.due(now) {
                    let taken = b.take().unwrap();
                    busy_until = Some((now + base + per_row * taken.rows as u32, taken.rows));
                }
            }
        }
        run.left = pending.len() + arrivals.len();
        run
    }

    #[test]
    fn at_a_low_rate_rows_are_committed_within_a_few_milliseconds() {
        // 1,000 rows/s into a sink that takes 1 ms a commit.
        let run = simulate(1_000, Duration::from_millis(1), Duration::from_micros(2), 5);
        let p99 = run.quantile(0.99);
        assert!(p99 <= Duration::from_millis(3), "p99 {p99:?}");
        assert!(run.median_batch() <= 2, "batches of {} rows at a trickle", run.median_batch());
        assert!(run.left <= 2, "{} rows left behind", run.left);
    }

    #[test]
    fn batches_grow_until_the_sink_keeps_up_at_a_rate_it_manages_only_in_large_batches() {
        // 200,000 rows/s into a sink with 5 ms per commit: commits of a row each would manage 200
        // rows/s. Batches of what arrives during the previous commit keep up.
        let run = simulate(200_000, Duration::from_millis(5), Duration::from_micros(2), 5);
        assert!(run.median_batch() > 1_000, "median batch {} rows", run.median_batch());
        // Nothing piles up: at the end no more waits than about one commit's worth of arrivals.
        assert!(run.left < 5_000, "{} rows left behind", run.left);
        let p99 = run.quantile(0.99);
        assert!(p99 < Duration::from_millis(30), "p99 {p99:?}");
        // And the same batcher stays immediate at a low rate on the same sink.
        let slow = simulate(2_000, Duration::from_millis(5), Duration::from_micros(2), 5);
        assert!(slow.quantile(0.99) < Duration::from_millis(12), "p99 {:?}", slow.quantile(0.99));
        assert!(run.median_batch() > 50 * slow.median_batch());
    }

    #[test]
    fn caps_flush_at_once_and_empty_batches_are_not_taken() {
        let mut b = Batcher::new(BatchConfig { max_bytes: 100, max_rows: 1_000, ..BatchConfig::default() });
        let t = Instant::now();
        assert_eq!(b.take(), None);
        assert_eq!(b.deadline(), None);
        assert_eq!(b.add(0, 0, t), None);
        assert_eq!(b.add(1, 60, t), None);
        assert_eq!(b.add(1, 60, t), Some(FlushReason::Bytes));
        assert_eq!(b.take().map(|x| (x.rows, x.bytes)), Some((2, 120)));
        assert_eq!(b.rows(), 0);
        assert_eq!(b.add(1_000, 10, t), Some(FlushReason::Rows));
    }

    #[test]
    fn rows_that_waited_for_the_sink_are_due_at_once_and_others_linger() {
        let config = BatchConfig { linger: Duration::from_millis(2), ..BatchConfig::default() };
        let mut b = Batcher::new(config);
        let t = Instant::now();
        // Nothing was committed yet: an idle sink, so the rows linger.
        b.add(1, 10, t);
        assert_eq!(b.due(t), None);
        assert_eq!(b.due(t + Duration::from_millis(2)), Some(FlushReason::Linger));
        b.take();
        b.flushed(t + Duration::from_millis(10));
        // Rows read right after a commit arrived during it.
        b.add(5, 50, t + Duration::from_millis(10));
        assert_eq!(b.due(t + Duration::from_millis(10)), Some(FlushReason::Ready));
        b.take();
        b.flushed(t + Duration::from_millis(11));
        // Rows long after the last commit found the sink idle.
        b.add(1, 10, t + Duration::from_millis(100));
        assert_eq!(b.due(t + Duration::from_millis(100)), None);
        // max_wait bounds the linger.
        let mut capped =
            Batcher::new(BatchConfig { linger: Duration::from_secs(5), max_wait: Duration::from_millis(3), ..config });
        capped.add(1, 1, t);
        assert_eq!(capped.deadline(), Some(t + Duration::from_millis(3)));
    }

    /// The timer side on paused tokio time: a task that sleeps until the deadline flushes a lone
    /// row after the linger, not before.
    #[tokio::test(start_paused = true)]
    async fn the_linger_deadline_fires_on_time() {
        let mut b = Batcher::new(BatchConfig::default());
        let start = Instant::now();
        assert_eq!(b.add(1, 10, start), None);
        let deadline = b.deadline().unwrap();
        assert_eq!(deadline - start, Duration::from_millis(1));
        tokio::time::sleep_until(deadline).await;
        assert_eq!(b.due(Instant::now()), Some(FlushReason::Linger));
        assert_eq!(b.take().unwrap().rows, 1);
        assert_eq!(Instant::now() - start, Duration::from_millis(1));
    }
}
