//! What a replay is asked for, how far it got and how it ended: plain values shared by the replay
//! (in [`crate::replay`]), the command line and the API's replay jobs; and the check that
//! the hand-off still holds the range.

use std::sync::atomic::AtomicU64;

use sluice_wire::StreamDataView;

use crate::handoff::Positions;

/// How much later than the host received a trade its venue may have stamped it (a venue whose
/// clock runs ahead of the host's). The events topic is read this much earlier than a range (Kafka
/// finds records by the time ingest produced them), and the hand-off's retention is judged with it.
pub const CLOCK_SKEW_MS: i64 = 5 * 60_000;

/// What to replay: the rollup buckets (whole minutes) from the one holding `since_ms` to the one
/// holding `until_ms`.
#[derive(Clone, Debug)]
pub struct ReplaySpec {
    /// The first trade time replayed, ms since the epoch.
    pub since_ms: i64,
    /// Trades at or after this time are left out; `None` replays to the log's end.
    pub until_ms: Option<i64>,
    /// Into `replay_<into>` (made anew) beside the live rows; `None` replaces the range's buckets of
    /// `rollup` itself, exactly, while the live role goes on committing. With the Druid sink, the
    /// name of the topic the rows go to (`<topic>.replay.<into>`), which it needs.
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

/// Where a replay's rows went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// A table of the embedded store: `replay_<NAME>`, or `rollup`.
    Table(String),
    /// A Kafka topic (the Druid sink's replay topic, `<topic>.replay.<NAME>`).
    Topic(String),
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Written::Table(table) => f.write_str(table),
            Written::Topic(topic) => write!(f, "topic {topic}"),
        }
    }
}

/// How a replay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Where the rows went.
    pub written: Written,
    /// Records read, in range, rolled up and refused.
    pub read: u64,
    /// Records in the range.
    pub in_range: u64,
    /// Rows rolled up.
    pub rows: u64,
    /// Records refused by a link.
    pub refused: u64,
    /// Rollup buckets (bucket, source, symbol, side) of the range in the table (0 for a topic).
    pub buckets: u64,
    /// The trade times replayed: from the first, to the last (exclusive; `None`: no end), after
    /// widening the range asked for to whole buckets.
    pub range: (i64, Option<i64>),
}

/// The first trade time no record the hand-off deleted can have, judged from the first records it
/// still holds (`first_held`, each record's bytes). Trade times are not in the log's order (a file
/// source appends a backfill's old trades after newer ones, so the first record held may be older
/// than those deleted), but receive times are: every deleted record was received before these
/// were, and its venue stamped it at most [`CLOCK_SKEW_MS`] later than it was received. A record
/// without a receive time counts with its trade time (the log's order is all there is to go by).
/// `None` when no record parses.
pub fn deleted_until<'a>(first_held: impl IntoIterator<Item = &'a [u8]>) -> Option<i64> {
    first_held
        .into_iter()
        .filter_map(|bytes| StreamDataView::parse(bytes).ok())
        .map(|v| match v.received_at_us {
            0 => v.timestamp_ms,
            us => us.div_euclid(1_000).saturating_add(CLOCK_SKEW_MS),
        })
        .max()
        .map(|latest| latest.saturating_add(1))
}

/// Why the range cannot be replayed: the log deleted records (its first offset is above 0) and
/// `since_ms` is before `first_time_ms`, the earliest time a replay may start from: the
/// [`deleted_until`] of the first records it still holds, rounded up to a whole bucket of the
/// replay, so that no bucket replayed misses records.
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

/// One partition of a Kafka topic as the replay found it: the first offset it still holds, and the
/// earliest time a replay may start from given the record there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldFrom {
    /// The partition.
    pub partition: i32,
    /// Its low watermark: the first offset retention has not deleted.
    pub offset: i64,
    /// The earliest time a replay may start from given the record at that offset: its
    /// [`deleted_until`], rounded up to a whole bucket of the replay (`None` when the partition is
    /// empty).
    pub first_time_ms: Option<i64>,
}

/// Why the range cannot be replayed from a Kafka topic: a partition's retention deleted records (its
/// low watermark is above 0) and `since_ms` is before its earliest time a replay may start from.
///
/// # Errors
/// A message naming the topic, the partitions and the earliest replayable time (the latest of those
/// partitions' first trade times).
pub fn check_topic_range(topic: &str, partitions: &[HeldFrom], since_ms: i64) -> Result<(), String> {
    let short: Vec<&HeldFrom> =
        partitions.iter().filter(|p| p.offset > 0 && p.first_time_ms.is_some_and(|first| since_ms < first)).collect();
    let Some(earliest) = short.iter().filter_map(|p| p.first_time_ms).max() else { return Ok(()) };
    let deleted: Vec<String> =
        short.iter().map(|p| format!("partition {} below offset {}", p.partition, p.offset)).collect();
    Err(format!(
        "the topic {topic} no longer holds trades from {since_ms} (ms since the epoch): its retention deleted \
         records ({}); the earliest replayable time is {earliest} ({})",
        deleted.join(", "),
        crate::clock::rfc3339_ms(earliest)
    ))
}

/// Whether a checkpoint of the chains' state taken at `positions` (the next offset of each
/// partition, as committed with that state) can start a replay whose first records are at `first`,
/// on a hand-off that still holds each partition from `held`: in every partition of `first` it is
/// at or before the first record, and not before the first record still held (reading from there
/// must run every record the state has not seen). A partition the checkpoint does not name is at
/// 0: its state holds none of that partition's records.
pub fn checkpoint_fits(positions: &Positions, first: &Positions, held: &Positions) -> bool {
    first.iter().all(|(p, first)| {
        let at = positions.get(p).copied().unwrap_or(0);
        at <= *first && at >= held.get(p).copied().unwrap_or(0)
    })
}

/// Whether the hand-off, holding each partition from `held`, still holds every record after a
/// checkpoint taken at `positions` (see [`checkpoint_fits`]): a replay of a later range can start
/// from it.
pub fn checkpoint_held(positions: &Positions, held: &Positions) -> bool {
    held.iter().all(|(p, from)| positions.get(p).copied().unwrap_or(0) >= *from)
}

/// Why a replay of stateful chains is refused: no checkpoint of their state is at or before the
/// range's first records (`first`, described) and the hand-off no longer holds every record before
/// them, so the state cannot be rebuilt. `earliest` is the earliest time a replay can start from
/// (given the oldest checkpoint still held), `None` when there is no such checkpoint.
pub fn no_checkpoint(first: &str, earliest: Option<i64>) -> String {
    format!(
        "no checkpoint of the chains' state is at or before the range's first record ({first}), and the hand-off \
         no longer holds the records before it, so the stateful links cannot be replayed as they ran; {}",
        earliest.map_or_else(
            || "no range can be replayed until a checkpoint is taken ([process] checkpoint_interval_ms)".to_owned(),
            |t| format!("the earliest replayable time is {t} ({})", crate::clock::rfc3339_ms(t))
        )
    )
}

#[cfg(test)]
mod tests {
    use plugin_sdk::{Record, Records};

    use super::{
        CLOCK_SKEW_MS, HeldFrom, check_range, check_topic_range, checkpoint_fits, checkpoint_held, deleted_until,
        no_checkpoint,
    };
    use crate::handoff::Positions;

    fn record(timestamp_ms: i64, received_at_us: i64) -> Vec<u8> {
        let mut one = Records::new();
        one.push(&Record { timestamp_ms, received_at_us, ..Record::default() });
        one.as_bytes()[1..].to_vec()
    }

    #[test]
    fn what_was_deleted_is_bounded_by_the_receive_times_held_not_by_their_trade_times() {
        // A backfill's trade from long ago, received at 10 000 s: everything deleted was received
        // before, and traded at most the clock skew after it was received.
        let backfill = record(1_000, 10_000_000_000);
        assert_eq!(deleted_until([backfill.as_slice()]), Some(10_000_000 + CLOCK_SKEW_MS + 1));
        // The latest of several; a record without a receive time counts with its trade time.
        let live = record(10_000_100, 10_000_200_000);
        let bare = record(20_000_000, 0);
        assert_eq!(deleted_until([backfill.as_slice(), live.as_slice()]), Some(10_000_200 + CLOCK_SKEW_MS + 1));
        assert_eq!(deleted_until([live.as_slice(), bare.as_slice()]), Some(20_000_001));
        assert_eq!(deleted_until([&[0xff_u8][..]]), None);
        assert_eq!(deleted_until(std::iter::empty()), None);
        // So a range from the backfill's trade time is refused, though that is the first trade held.
        let until = deleted_until([backfill.as_slice()]);
        assert!(check_range(Some(100), until, 1_000).is_err());
        assert!(check_range(Some(100), until, 10_000_000).is_err());
        assert!(check_range(Some(100), until, 10_000_000 + CLOCK_SKEW_MS + 1).is_ok());
    }

    #[test]
    fn a_range_a_topic_no_longer_holds_is_refused_with_the_earliest_time() {
        let held = |partition, offset, first| HeldFrom { partition, offset, first_time_ms: first };
        // Nothing deleted, or an empty partition: any start.
        assert!(check_topic_range("t", &[held(0, 0, Some(5_000)), held(1, 0, None)], 0).is_ok());
        assert!(check_topic_range("t", &[held(0, 7, None)], 0).is_ok());
        // Partition 1 deleted records before trade time 2000, partition 2 before 3000.
        let partitions = [held(0, 0, Some(1_000)), held(1, 40, Some(2_000)), held(2, 9, Some(3_000))];
        assert!(check_topic_range("t", &partitions, 3_000).is_ok());
        let err = check_topic_range("t", &partitions, 1_500).unwrap_err();
        assert!(err.contains("the earliest replayable time is 3000 (1970-01-01T00:00:03.000Z)"), "{err}");
        assert!(err.contains("partition 1 below offset 40, partition 2 below offset 9"), "{err}");
        let err = check_topic_range("t", &partitions, 2_500).unwrap_err();
        assert!(err.contains("is 3000") && !err.contains("partition 1"), "{err}");
    }

    #[test]
    fn a_checkpoint_fits_a_range_when_it_is_at_or_before_its_first_record_in_every_partition_still_held() {
        let at = |a: i64, b: i64| Positions::from([(0, a), (1, b)]);
        let (first, all_held) = (at(100, 50), at(0, 0));
        assert!(checkpoint_fits(&at(100, 50), &first, &all_held));
        assert!(checkpoint_fits(&at(10, 0), &first, &all_held));
        // Past the first record in one partition: its state has seen records of the range.
        assert!(!checkpoint_fits(&at(10, 51), &first, &all_held));
        // Retention deleted records after it in one partition: they cannot be run again.
        assert!(!checkpoint_fits(&at(10, 20), &first, &at(0, 21)));
        assert!(checkpoint_fits(&at(10, 21), &first, &at(0, 21)));
        // A partition it does not name is at 0: its state holds none of it.
        let one = Positions::from([(0, 10)]);
        assert!(checkpoint_fits(&one, &first, &all_held));
        assert!(!checkpoint_fits(&one, &first, &at(0, 5)));
        // Held: a later range can start from it.
        assert!(checkpoint_held(&at(10, 21), &at(10, 21)));
        assert!(!checkpoint_held(&at(10, 21), &at(11, 0)));
        assert!(!checkpoint_held(&one, &at(0, 5)));
    }

    #[test]
    fn a_refusal_for_want_of_a_checkpoint_names_the_earliest_replayable_time() {
        let err = no_checkpoint("offset 7", Some(60_000));
        assert!(err.contains("(offset 7)"), "{err}");
        assert!(err.contains("the earliest replayable time is 60000 (1970-01-01T00:01:00.000Z)"), "{err}");
        let err = no_checkpoint("offset 7", None);
        assert!(err.contains("until a checkpoint is taken ([process] checkpoint_interval_ms)"), "{err}");
    }

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
