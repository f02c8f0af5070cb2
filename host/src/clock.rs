//! Wall-clock time as the pipeline stamps it: microseconds (and milliseconds) since the Unix epoch,
//! 0 for a clock set before 1970, saturating far in the future.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    now_us() / 1000
}

#[cfg(test)]
mod tests {
    #[test]
    fn microseconds_and_milliseconds_agree() {
        let (us, ms) = (super::now_us(), super::now_ms());
        assert!(us > 1_700_000_000_000_000, "{us}");
        assert!((ms - us / 1000).abs() < 1000, "{ms} vs {us}");
    }
}
