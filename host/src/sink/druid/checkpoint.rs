//! State checkpoints with the Druid sink: where a replay of a stateful chain starts from.
//!
//! The changelog ([`super::state`]) is compacted: it keeps each key's latest record, so it holds the
//! state as it is now and nothing a replay of an earlier range could start from. So the sink also
//! keeps checkpoints of the chains' whole state in a topic of their own (`[sink.druid]
//! checkpoint_topic`, `<topic>.checkpoints` by default), each with the events topic's positions it
//! belongs to, as the embedded store keeps them in `state_checkpoints`.
//!
//! - **When.** At most once per `[process] checkpoint_interval_ms`, with a commit that changed state,
//!   inside that commit's Kafka transaction: a `read_committed` reader sees a checkpoint whole, with
//!   the rows, the changelog records and the consumer offsets it goes with, or nothing of it.
//! - **What.** Every stateful link's whole committed state after the transaction, and every
//!   partition's committed position of the events topic after it (the group's committed offsets,
//!   not only those this transaction moved: the state holds the records of every partition up to
//!   there). The sink is handed only each commit's changes, so it keeps a copy of the whole state:
//!   the changelog read back (once, before the first checkpoint) with each commit's changes applied
//!   after, and read again after a commit whose outcome it could not tell. That copy costs as much
//!   memory as the chains' own state (each link's at most `[plugins.<name>] state_bytes`).
//! - **The topic.** One partition, `cleanup.policy=delete`, and the events topic's time retention
//!   (`retention.ms`, no size limit): a checkpoint is kept as long as the records after it are.
//!   Created at start beside the changelog.
//!
//! One checkpoint is one or more records, all keyed by the checkpoint's id (UTF-8, unique per
//! checkpoint: the sink's transactional id, the time and a count), with a header
//! [`PART_HEADER`] saying which part each is:
//! - `entries`: a run of entries, each the changelog key (source name length-prefixed, the link's
//!   index, the entry's key) and the changelog value (the state format length-prefixed, the entry's
//!   value) of [`super::state`], each of the two prefixed with its length (u32, big-endian). A
//!   record holds entries up to [`ENTRIES_BYTES`] (an entry larger than that alone), so no record
//!   comes near Kafka's default limit of 1 MB.
//! - `end`, the last: JSON, `{"at_ms": 1700000000000, "topic": "sluice.events", "positions":
//!   {"0": 1234, "1": 987}, "entries": 2, "records": 1}`: when it was taken (ms since the epoch),
//!   the events topic, the next offset of each of its partitions, and how many entries and
//!   `entries` records came before it.
//!
//! A replay ([`list`], then [`load`]) takes only checkpoints whose `end` record it read after all
//! their `entries` records. Like the changelog, checkpoints assume one process instance per group.

use std::collections::BTreeMap;

use rdkafka::message::{Headers, Message};
use serde::{Deserialize, Serialize};

use super::state::StoredState;
use crate::handoff::Positions;
use crate::handoff::kafka::KafkaError;
use crate::handoff::kafka::range::RangeReader;
use crate::sink::embedded::{Checkpoint, CheckpointEntry};

/// The header naming a record's part of its checkpoint: [`Part::Entries`] or [`Part::End`].
pub const PART_HEADER: &str = "sluice.checkpoint";

/// Most bytes of entries one `entries` record holds (but for a single larger entry).
pub const ENTRIES_BYTES: usize = 256 << 10;

/// A record's part of its checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// A run of entries.
    Entries,
    /// The last record: when, and the positions.
    End,
}

impl Part {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Entries => "entries",
            Part::End => "end",
        }
    }

    fn parse(value: &[u8]) -> Option<Part> {
        match value {
            b"entries" => Some(Part::Entries),
            b"end" => Some(Part::End),
            _ => None,
        }
    }
}

/// The `end` record's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct End {
    at_ms: i64,
    topic: String,
    positions: Positions,
    entries: u64,
    records: u64,
}

/// Encodes a checkpoint of `state` taken at `at_ms` with the positions `positions` of `topic`: hands
/// each record's part and payload to `emit`, in order, the `end` record last.
///
/// # Errors
/// What `emit` fails with.
pub fn encode<E>(
    state: &StoredState,
    (at_ms, topic, positions): (i64, &str, &Positions),
    mut emit: impl FnMut(Part, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let (mut chunk, mut key, mut value) = (Vec::new(), Vec::new(), Vec::new());
    let (mut entries, mut records) = (0u64, 0u64);
    for (source, link, entry, format, v) in state.entries() {
        key.clear();
        super::state::encode_key(source, link, entry, &mut key);
        value.clear();
        super::state::encode_value(format, v, &mut value);
        if !chunk.is_empty() && chunk.len() + 8 + key.len() + value.len() > ENTRIES_BYTES {
            emit(Part::Entries, &chunk)?;
            records += 1;
            chunk.clear();
        }
        put_prefixed(&key, &mut chunk);
        put_prefixed(&value, &mut chunk);
        entries += 1;
    }
    if !chunk.is_empty() {
        emit(Part::Entries, &chunk)?;
        records += 1;
    }
    let end = End { at_ms, topic: topic.to_owned(), positions: positions.clone(), entries, records };
    // A struct of numbers and strings always serialises.
    emit(Part::End, &serde_json::to_vec(&end).unwrap_or_default())
}

fn put_prefixed(bytes: &[u8], out: &mut Vec<u8>) {
    // Entries are bounded by a link's state limit, far below 4 GiB.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The entries of an `entries` record; `None` when it is not in that encoding.
fn decode_entries(mut bytes: &[u8], out: &mut Vec<CheckpointEntry>) -> Option<()> {
    let take = |bytes: &mut &[u8]| -> Option<Vec<u8>> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        let (item, rest) = (rest.len() >= len).then(|| rest.split_at(len))?;
        *bytes = rest;
        Some(item.to_vec())
    };
    while !bytes.is_empty() {
        let (key, value) = (take(&mut bytes)?, take(&mut bytes)?);
        let (source, link, entry) = super::state::decode_key(&key)?;
        let (format, value) = super::state::decode_value(&value)?;
        out.push((source.to_owned(), link, format.to_owned(), entry.to_vec(), value.to_vec()));
    }
    Some(())
}

/// A checkpoint the topic holds whole: what its `end` record says, and where its records are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its id (the records' key).
    pub id: Vec<u8>,
    /// When it was taken, ms since the epoch.
    pub at_ms: i64,
    /// The events topic its positions are of.
    pub topic: String,
    /// The next offset of each partition of that topic, as committed with the state.
    pub positions: Positions,
    /// The offset of its first record.
    first: i64,
    /// The offset of its `end` record.
    end: i64,
}

/// Checkpoints as their records are read, in offset order.
#[derive(Debug, Default)]
struct Index {
    /// Checkpoints whose `end` record was read after all their `entries` records.
    listed: Vec<Listed>,
    /// Checkpoints whose `end` record is not read yet: their first offset and `entries` records.
    open: BTreeMap<Vec<u8>, (i64, u64)>,
}

impl Index {
    fn push(&mut self, offset: i64, id: &[u8], part: Option<Part>, payload: &[u8]) {
        match part {
            Some(Part::Entries) => self.open.entry(id.to_vec()).or_insert((offset, 0)).1 += 1,
            Some(Part::End) => {
                let (first, records) = self.open.remove(id).unwrap_or((offset, 0));
                match serde_json::from_slice::<End>(payload) {
                    Ok(end) if end.records == records => self.listed.push(Listed {
                        id: id.to_vec(),
                        at_ms: end.at_ms,
                        topic: end.topic,
                        positions: end.positions,
                        first,
                        end: offset,
                    }),
                    Ok(end) => tracing::warn!(
                        offset,
                        records,
                        expected = end.records,
                        "a checkpoint missing records is passed over"
                    ),
                    Err(e) => tracing::warn!(offset, error = %e, "a checkpoint's end record is not in its encoding"),
                }
            }
            None => tracing::warn!(offset, "a record that is no part of a checkpoint is passed over"),
        }
    }
}

/// The part a record's header names.
fn part_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Part> {
    let headers = m.headers()?;
    headers.iter().find(|h| h.key == PART_HEADER).and_then(|h| Part::parse(h.value?))
}

/// Every checkpoint `reader`'s topic holds whole, oldest first.
///
/// # Errors
/// [`KafkaError::Read`] when the topic cannot be read.
pub fn list(reader: &RangeReader) -> Result<Vec<Listed>, KafkaError> {
    let marks = reader.watermarks()?;
    let from: Positions = marks.iter().map(|(p, (low, _))| (*p, *low)).collect();
    let to: Positions = marks.iter().map(|(p, (_, high))| (*p, *high)).collect();
    let mut index = Index::default();
    reader.read_messages(&from, &to, |m| {
        index.push(m.offset(), m.key().unwrap_or_default(), part_of(m), m.payload().unwrap_or_default());
        Ok(())
    })?;
    Ok(index.listed)
}

/// The state of a checkpoint [`list`] found.
///
/// # Errors
/// [`KafkaError::Read`] when its records cannot be read (retention deleted them since, say) or are
/// not in their encoding.
pub fn load(reader: &RangeReader, listed: &Listed) -> Result<Checkpoint, KafkaError> {
    let mut entries = Vec::new();
    let malformed = || KafkaError::Read {
        topic: reader.topic().to_owned(),
        reason: format!("the checkpoint at offset {} is not in its encoding", listed.end),
    };
    let mut bad = false;
    reader.read_messages(&Positions::from([(0, listed.first)]), &Positions::from([(0, listed.end)]), |m| {
        if m.key() == Some(listed.id.as_slice()) && part_of(m) == Some(Part::Entries) {
            bad |= decode_entries(m.payload().unwrap_or_default(), &mut entries).is_none();
        }
        Ok(())
    })?;
    if bad {
        return Err(malformed());
    }
    Ok(Checkpoint { at_ms: listed.at_ms, positions: listed.positions.clone(), entries })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::StateWrite;

    fn state(links: &[(&str, u32, usize, usize)]) -> StoredState {
        let mut state = StoredState::default();
        let none = Default::default();
        for &(source, link, n, size) in links {
            let changes = (0..n).map(|i| (format!("k{i:05}").into_bytes(), Some(vec![i as u8; size]))).collect();
            state.apply_write(&StateWrite {
                source,
                link,
                format: "f@1",
                reset: false,
                dropped: &none,
                changes: &changes,
            });
        }
        state
    }

    /// Encodes, then reads back through an index as a reader of the topic would.
    fn round_trip(state: &StoredState, positions: &Positions) -> (Vec<(Part, usize)>, Listed, Vec<CheckpointEntry>) {
        let mut records = Vec::new();
        encode(state, (1_700_000_000_000, "events", positions), |part, payload| {
            records.push((part, payload.to_vec()));
            Ok::<_, ()>(())
        })
        .unwrap();
        let mut index = Index::default();
        // Another checkpoint's records interleaved (a second instance's): told apart by the id.
        index.push(0, b"other", Some(Part::Entries), b"");
        for (offset, (part, payload)) in records.iter().enumerate() {
            index.push(offset as i64 + 1, b"cp", Some(*part), payload);
        }
        assert_eq!(index.listed.len(), 1);
        let listed = index.listed.remove(0);
        let mut entries = Vec::new();
        for (part, payload) in &records {
            if *part == Part::Entries {
                decode_entries(payload, &mut entries).unwrap();
            }
        }
        (records.iter().map(|(p, b)| (*p, b.len())).collect(), listed, entries)
    }

    #[test]
    fn a_checkpoint_reads_back_as_the_state_and_positions_it_was_taken_with() {
        let positions = Positions::from([(0, 12), (1, 0), (2, 7)]);
        let small = state(&[("binance", 0, 3, 8), ("binance", 2, 1, 1), ("kraken", 0, 2, 0)]);
        let (parts, listed, entries) = round_trip(&small, &positions);
        assert_eq!(parts.iter().map(|p| p.0).collect::<Vec<_>>(), [Part::Entries, Part::End]);
        assert_eq!((listed.at_ms, listed.topic.as_str(), &listed.positions), (1_700_000_000_000, "events", &positions));
        assert_eq!((listed.first, listed.end), (1, 2));
        let want: Vec<CheckpointEntry> =
            small.entries().map(|(s, l, k, f, v)| (s.to_owned(), l, f.to_owned(), k.to_vec(), v.to_vec())).collect();
        assert_eq!(entries.len(), 6);
        assert_eq!(entries, want);
        // No state at all: the end record alone.
        let (parts, listed, entries) = round_trip(&StoredState::default(), &positions);
        assert_eq!((parts.len(), listed.positions, entries.len()), (1, positions, 0));
    }

    #[test]
    fn a_large_state_is_split_into_records_well_under_a_megabyte() {
        // 3 000 entries of 1 KiB and one of 600 KiB: about 3.6 MB of state.
        let big = state(&[("binance", 0, 3_000, 1_024), ("binance", 1, 1, 600 << 10)]);
        let (parts, _, entries) = round_trip(&big, &Positions::from([(0, 1)]));
        assert_eq!(entries.len(), 3_001);
        assert!(parts.len() > 13, "{} records", parts.len());
        // The single larger entry alone, the rest within the limit.
        assert!(parts.iter().all(|(_, len)| *len <= ENTRIES_BYTES || *len < (600 << 10) + 64), "{parts:?}");
        assert_eq!(parts.iter().filter(|(_, len)| *len > ENTRIES_BYTES).count(), 1);
    }

    #[test]
    fn a_checkpoint_missing_records_or_in_another_encoding_is_passed_over() {
        let end = |records: u64| {
            let end = End { at_ms: 1, topic: "t".into(), positions: Positions::from([(0, 5)]), entries: 1, records };
            serde_json::to_vec(&end).unwrap()
        };
        let mut index = Index::default();
        // Its first entries record was deleted by retention: one of two left.
        index.push(10, b"a", Some(Part::Entries), b"");
        index.push(11, b"a", Some(Part::End), &end(2));
        index.push(12, b"b", Some(Part::End), b"{not json");
        index.push(13, b"c", None, b"");
        index.push(14, b"d", Some(Part::Entries), b"");
        index.push(15, b"d", Some(Part::End), &end(1));
        assert_eq!(
            index.listed.iter().map(|l| (l.id.as_slice(), l.first, l.end)).collect::<Vec<_>>(),
            [(&b"d"[..], 14, 15)]
        );
        let mut out = Vec::new();
        assert!(decode_entries(&[0, 0, 0, 9, 1], &mut out).is_none());
    }
}
