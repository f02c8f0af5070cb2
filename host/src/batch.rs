//! The adaptive batcher: when to hand the rows waiting for the sink over in one batch.
//!
//! A batch is flushed when it reaches its target row count, the byte limit, or its wait budget,
//! whichever comes first. The target adapts between `min_rows` and `max_rows`: after every flush the
//! batcher re-estimates the arrival rate and the sink's time per batch, and sets the target to the rows
//! that arrive within the wait budget, so that wait plus sink time stays under `target_latency`. At a
//! low rate batches stay small and leave early; at a high rate they grow, which is what lets the sink
//! keep up.
//!
//! The batcher is pure: it is told the time (`tokio::time::Instant`, so tests run on paused time) and
//! decides; the pipeline owns the rows and the timer.

use std::time::Duration;

use tokio::time::Instant;

/// Bounds and goals of the batcher.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchConfig {
    /// The smallest target a batch adapts down to.
    pub min_rows: usize,
    /// The largest target a batch adapts up to.
    pub max_rows: usize,
    /// Flush when this many bytes wait, whatever the row count.
    pub max_bytes: usize,
    /// No row waits longer than this before its batch is flushed.
    pub max_wait: Duration,
    /// The goal for a batch's latency: its first row arriving to the sink finishing with it.
    pub target_latency: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            min_rows: 64,
            max_rows: 100_000,
            max_bytes: 16 << 20,
            max_wait: Duration::from_secs(1),
            target_latency: Duration::from_millis(500),
        }
    }
}

/// Why a batch was flushed (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// It reached its target row count.
    Rows,
    /// It reached the byte limit.
    Bytes,
    /// Its wait budget ran out.
    Wait,
}

impl FlushReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Rows => "rows",
            FlushReason::Bytes => "bytes",
            FlushReason::Wait => "wait",
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
    /// The current target row count.
    target_rows: usize,
    rows: usize,
    bytes: usize,
    opened_at: Option<Instant>,
    /// Arrival rate in rows per second (moving average over batches; 0 until measured).
    rate: f64,
    /// The sink's time per batch (moving average).
    sink: Duration,
}

/// Weight of the newest sample in the moving averages.
const SMOOTHING: f64 = 0.3;
/// Aim below the target latency, leaving room for the estimates to be wrong.
const HEADROOM: f64 = 0.8;

impl Batcher {
    /// A batcher starting at `min_rows`.
    pub fn new(config: BatchConfig) -> Self {
        let min_rows = config.min_rows.max(1);
        let config = BatchConfig { min_rows, max_rows: config.max_rows.max(min_rows), ..config };
        Batcher { config, target_rows: min_rows, rows: 0, bytes: 0, opened_at: None, rate: 0.0, sink: Duration::ZERO }
    }

    /// Adds rows that arrived at `now`; says whether the batch must be flushed now.
    pub fn add(&mut self, rows: usize, bytes: usize, now: Instant) -> Option<FlushReason> {
        if rows == 0 && bytes == 0 {
            return None;
        }
        self.opened_at.get_or_insert(now);
        self.rows += rows;
        self.bytes += bytes;
        if self.bytes >= self.config.max_bytes {
            Some(FlushReason::Bytes)
        } else if self.rows >= self.target_rows {
            Some(FlushReason::Rows)
        } else {
            None
        }
    }

    /// When the waiting batch must be flushed at the latest (`None` when nothing waits).
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|t| t + self.wait_budget())
    }

    /// True when the waiting batch's wait budget has run out.
    pub fn is_due(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// Hands over the waiting batch (if any) and starts a new one.
    pub fn take(&mut self, now: Instant) -> Option<Taken> {
        let opened_at = self.opened_at.take()?;
        let taken = Taken { rows: self.rows, bytes: self.bytes, opened_at };
        let filled = now.saturating_duration_since(opened_at).max(Duration::from_millis(1));
        let rate = taken.rows as f64 / filled.as_secs_f64();
        self.rate = if self.rate == 0.0 { rate } else { self.rate + SMOOTHING * (rate - self.rate) };
        self.rows = 0;
        self.bytes = 0;
        Some(taken)
    }

    /// Tells the batcher how long the sink took with the last batch; re-targets the row count.
    pub fn flushed(&mut self, sink_time: Duration) {
        self.sink = if self.sink.is_zero() {
            sink_time
        } else {
            self.sink.mul_f64(1.0 - SMOOTHING) + sink_time.mul_f64(SMOOTHING)
        };
        let rows = self.rate * self.wait_budget().as_secs_f64();
        self.target_rows = (rows as usize).clamp(self.config.min_rows, self.config.max_rows);
    }

    /// The current target row count.
    pub fn target_rows(&self) -> usize {
        self.target_rows
    }

    /// Rows waiting.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// How long a batch may fill: what is left of the target latency after the sink's share, within
    /// `max_wait`, and at least a millisecond.
    fn wait_budget(&self) -> Duration {
        self.config
            .target_latency
            .mul_f64(HEADROOM)
            .saturating_sub(self.sink)
            .min(self.config.max_wait)
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a batcher with `rate` rows per second arriving every millisecond for `seconds`, a sink
    /// that takes `sink_base + rows * sink_per_row` per batch (rows keep arriving meanwhile), and
    /// returns each batch's (rows, latency, reason) after a warm-up second.
    fn simulate(
        rate: u64,
        sink_base: Duration,
        sink_per_row: Duration,
        seconds: u64,
    ) -> (Vec<(usize, Duration, FlushReason)>, usize) {
        let mut b = Batcher::new(BatchConfig::default());
        let start = Instant::now();
        let mut now = start;
        let mut sink_busy_until = start;
        let mut in_sink: Option<(Taken, FlushReason, Duration)> = None;
        let mut out = Vec::new();
        let per_ms = rate / 1000;
        for _ in 0..seconds * 1000 {
            now += Duration::from_millis(1);
            if let Some((taken, reason, sink_time)) = in_sink
                && now >= sink_busy_until
            {
                b.flushed(sink_time);
                if now - start > Duration::from_secs(1) {
                    out.push((taken.rows, sink_busy_until - taken.opened_at, reason));
                }
                in_sink = None;
            }
            let due = b.add(per_ms as usize, per_ms as usize * 40, now).or(b.is_due(now).then_some(FlushReason::Wait));
            if let (Some(reason), None) = (due, in_sink) {
                let taken = b.take(now).unwrap();
                let sink_time = sink_base + sink_per_row * taken.rows as u32;
                sink_busy_until = now + sink_time;
                in_sink = Some((taken, reason, sink_time));
            }
        }
        (out, b.target_rows())
    }

    #[test]
    fn latency_stays_under_target_at_ten_and_a_hundred_thousand_rows_per_second() {
        let target = BatchConfig::default().target_latency;
        let (slow, slow_target) = simulate(10_000, Duration::from_millis(20), Duration::from_micros(5), 10);
        let (fast, fast_target) = simulate(100_000, Duration::from_millis(20), Duration::from_micros(5), 10);
        // The target follows the rate: about what arrives in the wait budget.
        assert!((1_000..=4_000).contains(&slow_target), "{slow_target}");
        assert!((10_000..=40_000).contains(&fast_target), "{fast_target}");
        for (name, batches) in [("10K/s", &slow), ("100K/s", &fast)] {
            assert!(batches.len() > 10, "{name}: {} batches", batches.len());
            let worst = batches.iter().map(|b| b.1).max().unwrap();
            assert!(worst <= target, "{name}: worst latency {worst:?}");
        }
        // Faster arrivals make bigger batches, which is how the sink keeps up.
        let median = |v: &Vec<(usize, Duration, FlushReason)>| {
            let mut rows: Vec<_> = v.iter().map(|b| b.0).collect();
            rows.sort();
            rows[rows.len() / 2]
        };
        assert!(median(&fast) > 5 * median(&slow), "{} vs {}", median(&fast), median(&slow));
        // Rows processed: nothing lost, the sink keeps up (no batch bigger than what arrives in the
        // latency target).
        assert!(fast.iter().all(|b| b.0 <= 100_000 / 2));
    }

    #[test]
    fn a_trickle_is_flushed_by_the_wait_budget_and_targets_stay_in_bounds() {
        let (trickle, _) = simulate(1_000, Duration::from_millis(5), Duration::ZERO, 5);
        assert!(trickle.iter().all(|b| b.2 == FlushReason::Wait || b.0 >= BatchConfig::default().min_rows));
        let mut b = Batcher::new(BatchConfig { min_rows: 10, max_rows: 20, ..BatchConfig::default() });
        let t = Instant::now();
        b.add(1_000_000, 0, t);
        b.take(t + Duration::from_millis(1));
        b.flushed(Duration::ZERO);
        assert_eq!(b.target_rows(), 20);
        // The rate estimate is a moving average: it takes a number of slow batches to come down.
        for _ in 0..100 {
            b.add(1, 0, t);
            b.take(t + Duration::from_secs(100));
            b.flushed(Duration::ZERO);
        }
        assert_eq!(b.target_rows(), 10);
    }

    #[test]
    fn bytes_flush_before_rows_and_empty_batches_are_not_taken() {
        let mut b = Batcher::new(BatchConfig { max_bytes: 100, min_rows: 1_000, ..BatchConfig::default() });
        let t = Instant::now();
        assert_eq!(b.take(t), None);
        assert_eq!(b.deadline(), None);
        assert_eq!(b.add(1, 60, t), None);
        assert_eq!(b.add(1, 60, t), Some(FlushReason::Bytes));
        assert_eq!(b.take(t).map(|x| (x.rows, x.bytes)), Some((2, 120)));
        assert_eq!(b.rows(), 0);
    }

    /// The timer side on paused tokio time: a task that sleeps until the deadline flushes a lone
    /// row after the wait budget, not before.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_fires_on_time() {
        let config = BatchConfig { target_latency: Duration::from_millis(100), ..BatchConfig::default() };
        let mut b = Batcher::new(config);
        let start = Instant::now();
        assert_eq!(b.add(1, 10, start), None);
        let deadline = b.deadline().unwrap();
        assert_eq!(deadline - start, Duration::from_millis(80));
        tokio::time::sleep_until(deadline).await;
        assert!(b.is_due(Instant::now()));
        assert_eq!(b.take(Instant::now()).unwrap().rows, 1);
        assert_eq!(Instant::now() - start, Duration::from_millis(80));
    }
}
