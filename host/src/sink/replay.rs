//! What a replay is asked for, how far it got and how it ended: plain values shared by the replay
//! (in [`crate::pipeline::replay`]), the command line and the API's replay jobs.

use std::sync::atomic::AtomicU64;

/// What to replay: the rollup buckets (whole minutes) from the one holding `since_ms` to the one
/// holding `until_ms`.
#[derive(Clone, Debug)]
pub struct ReplaySpec {
    /// The first trade time replayed, ms since the epoch.
    pub since_ms: i64,
    /// Trades at or after this time are left out; `None` replays to the log's end.
    pub until_ms: Option<i64>,
    /// Into `replay_<into>` (made anew) beside the live rows; `None` replaces the range's buckets of
    /// `rollup` itself, exactly, while the live role goes on committing.
    pub into: Option<String>,
}

/// A replay's counts, updated once per log batch, readable while it runs.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    /// Records read from the log.
    pub read: AtomicU64,
    /// Of those, records in the range, handed to the chains.
    pub in_range: AtomicU64,
    /// Rows the chains gave and the replay rolled up.
    pub rows: AtomicU64,
    /// Records a link refused (not dead-lettered again: the live run did that).
    pub refused: AtomicU64,
}

/// How a replay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySummary {
    /// The table written: `replay_<NAME>`, or `rollup`.
    pub table: String,
    /// Records read, in range, rolled up and refused.
    pub read: u64,
    /// Records in the range.
    pub in_range: u64,
    /// Rows rolled up.
    pub rows: u64,
    /// Records refused by a link.
    pub refused: u64,
    /// Rollup buckets (bucket, source, symbol, side) of the range in the table.
    pub buckets: u64,
}

/// Why the range cannot be replayed: the log deleted records (its first offset is above 0) and the
/// first one it still holds is later than `since_ms`.
///
/// # Errors
/// A message naming the earliest replayable time.
pub fn check_range(first_offset: Option<i64>, first_time_ms: Option<i64>, since_ms: i64) -> Result<(), String> {
    match (first_offset, first_time_ms) {
        (Some(first), Some(earliest)) if first > 0 && since_ms < earliest => Err(format!(
            "the local log no longer holds trades from {since_ms} (ms since the epoch): its retention deleted \
             the records before offset {first}; the earliest replayable time is {earliest}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn a_range_the_log_no_longer_holds_is_refused_with_the_earliest_time() {
        // Nothing deleted: any start is fine, even before the first record.
        assert!(check_range(Some(0), Some(1_000), 0).is_ok());
        assert!(check_range(None, None, 0).is_ok());
        // Retention deleted the first 500 records: from the first one still held, and later.
        assert!(check_range(Some(500), Some(1_000), 1_000).is_ok());
        let err = check_range(Some(500), Some(1_000), 999).unwrap_err();
        assert!(err.contains("earliest replayable time is 1000") && err.contains("offset 500"), "{err}");
    }
}
