//! A circuit breaker for plugin calls: after a run of failed batches it stops calling the plugin for a
//! cool-down, then lets one trial batch through to find out whether the plugin works again.
//!
//! ```text
//!            failure_threshold failed batches in a row
//!   Closed ───────────────────────────────────────────▶ Open { until }
//!     ▲                                                  │ allow(now) once now >= until
//!     │ trial succeeds                                   ▼
//!     └───────────────────────────────────────────── HalfOpen ── trial fails ──▶ Open (cool-down doubled)
//! ```
//!
//! The breaker is pure: it reads no clock, so callers pass the time in and tests step it exactly. It
//! is not shared between threads; each worker that calls a plugin keeps its own.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a breaker trips and recovers; the `breaker` table of a plugin's configuration.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failed batches in a row that open the breaker (0 counts as 1).
    #[serde(default = "defaults::failure_threshold")]
    pub failure_threshold: u32,
    /// How long the breaker stays open after its first trip.
    #[serde(default = "defaults::cool_down_ms")]
    pub cool_down_ms: u64,
    /// The longest cool-down: each trip that follows a failed trial doubles it, up to this.
    #[serde(default = "defaults::max_cool_down_ms")]
    pub max_cool_down_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: defaults::failure_threshold(),
            cool_down_ms: defaults::cool_down_ms(),
            max_cool_down_ms: defaults::max_cool_down_ms(),
        }
    }
}

mod defaults {
    pub fn failure_threshold() -> u32 {
        5
    }
    pub fn cool_down_ms() -> u64 {
        5_000
    }
    pub fn max_cool_down_ms() -> u64 {
        60_000
    }
}

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures in a row are counted.
    Closed,
    /// No calls until `until`; the first [`CircuitBreaker::allow`] at or after it starts a trial.
    Open {
        /// When the cool-down ends.
        until: Instant,
    },
    /// One trial batch is out; its result closes or re-opens the breaker. No other call goes through.
    HalfOpen,
}

/// The breaker for one plugin in one worker. Report exactly one result for each batch that
/// [`CircuitBreaker::allow`] let through; a trial whose result never comes keeps it half-open.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    /// Failed batches in a row that open it (at least 1).
    threshold: u32,
    /// The cool-down of a first trip.
    cool_down: Duration,
    /// The cap on doubled cool-downs.
    max_cool_down: Duration,
    /// The current state.
    state: BreakerState,
    /// Failed batches in a row while closed.
    failures: u32,
    /// Trips since the breaker was last closed by a successful trial: the exponent of the cool-down.
    streak: u32,
    /// Trips since the breaker was made, for the metric.
    trips: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: &BreakerConfig) -> Self {
        let cool_down = Duration::from_millis(config.cool_down_ms);
        CircuitBreaker {
            threshold: config.failure_threshold.max(1),
            cool_down,
            max_cool_down: Duration::from_millis(config.max_cool_down_ms).max(cool_down),
            state: BreakerState::Closed,
            failures: 0,
            streak: 0,
            trips: 0,
        }
    }

    /// Whether a batch may be sent to the plugin at `now`. An open breaker whose cool-down has ended
    /// turns half-open and lets this one batch through as its trial; while the trial is out, nothing
    /// else goes through.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    /// A batch went through the plugin: a closed breaker forgets its failures, a half-open one closes
    /// and its cool-down returns to the first one's. A late success while open changes nothing.
    pub fn record_success(&mut self) {
        match self.state {
            BreakerState::Closed => self.failures = 0,
            BreakerState::HalfOpen => {
                self.state = BreakerState::Closed;
                self.failures = 0;
                self.streak = 0;
            }
            BreakerState::Open { .. } => {}
        }
    }

    /// A batch failed at `now`: a closed breaker counts it and opens at the threshold; a failed trial
    /// re-opens it with a doubled cool-down. A late failure while open changes nothing.
    pub fn record_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.threshold {
                    self.trip(now);
                }
            }
            BreakerState::HalfOpen => self.trip(now),
            BreakerState::Open { .. } => {}
        }
    }

    /// A batch failed at `now` after `calls` failed calls (traps, timeouts, limits, its retry and
    /// bisection included): a closed breaker counts every call and opens at the threshold, so a
    /// link that fails call after call opens it within one batch; a failed trial re-opens it.
    pub fn record_failed_calls(&mut self, now: Instant, calls: u64) {
        match self.state {
            BreakerState::Closed => {
                let calls = u32::try_from(calls.max(1)).unwrap_or(u32::MAX);
                self.failures = self.failures.saturating_add(calls);
                if self.failures >= self.threshold {
                    self.trip(now);
                }
            }
            BreakerState::HalfOpen => self.trip(now),
            BreakerState::Open { .. } => {}
        }
    }

    /// Opens the breaker at `now`, whatever it counted: a batch that ran past its time budget.
    pub fn trip_now(&mut self, now: Instant) {
        if !matches!(self.state, BreakerState::Open { .. }) {
            self.trip(now);
        }
    }

    /// The current state. An open breaker stays `Open` past its `until` until [`CircuitBreaker::allow`]
    /// is next called.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How many times the breaker has opened.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// Failed batches in a row counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// How long the next trip keeps the breaker open.
    pub fn next_cool_down(&self) -> Duration {
        let factor = 1u32.checked_shl(self.streak.min(31)).unwrap_or(u32::MAX);
        self.cool_down.checked_mul(factor).map_or(self.max_cool_down, |d| d.min(self.max_cool_down))
    }

    fn trip(&mut self, now: Instant) {
        let cool_down = self.next_cool_down();
        // An `Instant` this far ahead cannot overflow in practice; if it did, the trial comes at once.
        self.state = BreakerState::Open { until: now.checked_add(cool_down).unwrap_or(now) };
        self.streak = self.streak.saturating_add(1);
        self.failures = 0;
        self.trips += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_calls_count_one_by_one_and_a_budget_trips_at_once() {
        let t0 = Instant::now();
        let mut b = breaker(5);
        b.record_failed_calls(t0, 3);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record_failed_calls(t0, 2);
        assert!(matches!(b.state(), BreakerState::Open { .. }), "five failed calls in one batch open it");
        let mut b = breaker(5);
        b.trip_now(t0);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        assert_eq!(b.trips(), 1);
        b.trip_now(t0);
        assert_eq!(b.trips(), 1, "an open breaker is not tripped again");
    }

    const SEC: Duration = Duration::from_secs(1);

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(&BreakerConfig { failure_threshold: threshold, ..BreakerConfig::default() })
    }

    /// Fails `n` batches at `now`.
    fn fail(b: &mut CircuitBreaker, n: u32, now: Instant) {
        for _ in 0..n {
            assert!(b.allow(now));
            b.record_failure(now);
        }
    }

    #[test]
    fn stays_closed_below_the_threshold_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = breaker(3);
        fail(&mut b, 2, t0);
        assert_eq!((b.state(), b.consecutive_failures()), (BreakerState::Closed, 2));
        b.record_success();
        assert_eq!(b.consecutive_failures(), 0);
        fail(&mut b, 2, t0);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(t0));
        assert_eq!(b.trips(), 0);
    }

    #[test]
    fn opens_at_the_threshold_and_refuses_until_the_cool_down_ends() {
        let t0 = Instant::now();
        let mut b = breaker(3);
        fail(&mut b, 3, t0);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + 5 * SEC });
        assert_eq!(b.trips(), 1);
        assert!(!b.allow(t0));
        assert!(!b.allow(t0 + 5 * SEC - Duration::from_millis(1)));
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[test]
    fn half_open_lets_exactly_one_trial_through() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        fail(&mut b, 1, t0);
        assert!(b.allow(t0 + 5 * SEC));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(t0 + 5 * SEC));
        assert!(!b.allow(t0 + 60 * SEC));
    }

    #[test]
    fn a_successful_trial_closes_it_and_resets_the_cool_down() {
        let t0 = Instant::now();
        let mut b = breaker(2);
        fail(&mut b, 2, t0);
        // A failed trial doubles the next cool-down ...
        assert!(b.allow(t0 + 5 * SEC));
        b.record_failure(t0 + 5 * SEC);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + 15 * SEC });
        assert!(b.allow(t0 + 15 * SEC));
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(t0 + 15 * SEC));
        // ... a successful one brings it back to the first trip's, and the count starts again.
        assert_eq!(b.next_cool_down(), 5 * SEC);
        let t1 = t0 + 100 * SEC;
        fail(&mut b, 1, t1);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&mut b, 1, t1);
        assert_eq!(b.state(), BreakerState::Open { until: t1 + 5 * SEC });
        assert_eq!(b.trips(), 3);
    }

    #[test]
    fn failed_trials_double_the_cool_down_up_to_the_max() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        let mut now = t0;
        fail(&mut b, 1, now);
        let mut cool_downs = Vec::new();
        for _ in 0..7 {
            let BreakerState::Open { until } = b.state() else { panic!("not open: {:?}", b.state()) };
            cool_downs.push((until - now).as_secs());
            now = until;
            assert!(b.allow(now));
            b.record_failure(now);
        }
        assert_eq!(cool_downs, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(b.trips(), 8);
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        fail(&mut b, 1, t0);
        let open = b.state();
        b.record_failure(t0 + SEC);
        b.record_success();
        assert_eq!((b.state(), b.trips()), (open, 1));
    }

    #[test]
    fn a_zero_threshold_opens_on_the_first_failure() {
        let t0 = Instant::now();
        let mut b = breaker(0);
        assert!(b.allow(t0));
        b.record_failure(t0);
        assert!(!b.allow(t0));
    }

    #[test]
    fn config_has_defaults_and_refuses_unknown_fields() {
        let c: BreakerConfig = toml::from_str("").unwrap();
        assert_eq!(c, BreakerConfig { failure_threshold: 5, cool_down_ms: 5_000, max_cool_down_ms: 60_000 });
        let c: BreakerConfig = toml::from_str("failure_threshold = 2\ncool_down_ms = 100").unwrap();
        assert_eq!((c.failure_threshold, c.cool_down_ms, c.max_cool_down_ms), (2, 100, 60_000));
        let e = toml::from_str::<BreakerConfig>("cooldown_ms = 1").unwrap_err();
        assert!(e.to_string().contains("cooldown_ms"), "{e}");
    }

    #[test]
    fn a_max_below_the_first_cool_down_is_raised_to_it() {
        let t0 = Instant::now();
        let config = BreakerConfig { failure_threshold: 1, cool_down_ms: 2_000, max_cool_down_ms: 1_000 };
        let mut b = CircuitBreaker::new(&config);
        fail(&mut b, 1, t0);
        assert_eq!(b.state(), BreakerState::Open { until: t0 + 2 * SEC });
    }
}
