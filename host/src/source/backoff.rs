//! Reconnect delays: exponential backoff with full jitter, capped, never giving up, and reset after a
//! connection has stayed healthy for a while.

use std::time::Duration;

/// Backoff state for one source.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// The ceiling of the first delay.
    min: Duration,
    /// The largest ceiling any delay can have.
    max: Duration,
    /// Failures since the last healthy period; each doubles the ceiling.
    attempt: u32,
    /// State of the xorshift generator for the jitter (seeded per source so sources spread out).
    rng: u64,
}

impl Backoff {
    /// A backoff whose delays grow from `min` to at most `max`; `seed` spreads sources apart.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff { min, max: max.max(min), attempt: 0, rng: seed | 1 }
    }

    /// The delay before the next attempt: uniform in `[0, min(max, min * 2^attempt)]` ("full
    /// jitter"), so many clients cut off at once do not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { self.rng % (nanos + 1) })
    }

    /// The current ceiling, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// Forgets past failures: the connection has been healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let mut ceilings = vec![];
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        for _ in 0..1000 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays_over_the_whole_range() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 42);
        let delays: Vec<_> = (0..2000).map(|_| b.next_delay().as_millis()).collect();
        assert!(delays.iter().all(|&d| d <= 1000));
        // Full jitter: roughly uniform, so both the bottom and the top tenth are hit.
        assert!(delays.iter().any(|&d| d < 100));
        assert!(delays.iter().any(|&d| d > 900));
        let mean = delays.iter().sum::<u128>() as f64 / delays.len() as f64;
        assert!((400.0..600.0).contains(&mean), "mean {mean}");
    }

    #[test]
    fn different_seeds_give_different_delays() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 2);
        let da: Vec<_> = (0..10).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_ne!(da, db);
    }
}
