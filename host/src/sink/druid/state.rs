//! Plugin state with the Druid sink: a compacted changelog topic (`[sink.druid] state_topic`,
//! `<topic>.state` by default), written in the Kafka transaction that carries the rows, the dead
//! letters and the consumer offsets of the same polls, and read back at start before the first
//! record. So a `read_committed` reader of the changelog sees exactly the state that goes with the
//! committed offsets; an aborted transaction leaves no change of it visible.
//!
//! One record per entry of a link's state:
//! - key: the source's name, length-prefixed (u32, big-endian), the link's index in the chain
//!   (u32, big-endian), then the entry's own key (the rest);
//! - value: the state format, length-prefixed (u32, big-endian), then the entry's value (the rest);
//!   a removed entry is a tombstone (no payload), which compaction eventually drops. A link whose
//!   stored entries no longer count (a version of another format took over) writes a tombstone for
//!   each key it had ([`StateWrite::dropped`](crate::sink::StateWrite::dropped)).
//!
//! With several transactions in flight (see [`super::delivery`]), one that carries state changes
//! waits for every earlier one to commit before it writes them: the records of a key stand in the
//! changelog in the order they were made, and a `read_committed` reader folds them into the state
//! of the committed transactions, which are always a prefix of those produced. (The records of a
//! source are keyed by source and symbol, so they spread over the events topic's partitions:
//! producers split by partition would split a source's state between them.)
//!
//! A restore ([`restore`]) reads the whole topic up to its end as of the start and keeps each key's
//! last record. Being compacted, the changelog holds only the state as it is now: checkpoints of
//! earlier states, for replays, are kept apart ([`super::checkpoint`]).
//!
//! **One process instance per group.** State is kept per (source, link), not per partition of the
//! events topic, while a source's records are spread over partitions by symbol. With several
//! instances in one group, each restores the whole changelog and then sees only its partitions'
//! records, and a partition that moves to another instance in a rebalance does not take its state
//! with it: the instances' states overlap and go stale. Stateful links with the Druid sink assume
//! one process instance per group; the process role says so in a warning at start.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::handoff::kafka::range::RangeReader;
use crate::handoff::kafka::{KafkaConfig, KafkaError};
use crate::sink::StateWrite;
use crate::sink::druid::{DruidSink, DruidSinkConfig};
use crate::sink::embedded::StateEntries;

/// Appends the changelog key of entry `key` of link `link` of `source`'s chain to `out`.
pub fn encode_key(source: &str, link: u32, key: &[u8], out: &mut Vec<u8>) {
    put_prefixed(source.as_bytes(), out);
    out.extend_from_slice(&link.to_be_bytes());
    out.extend_from_slice(key);
}

/// A changelog key's source, link and entry key; `None` when the bytes are no such key.
pub fn decode_key(bytes: &[u8]) -> Option<(&str, u32, &[u8])> {
    let (source, rest) = take_prefixed(bytes)?;
    let (link, key) = rest.split_first_chunk::<4>()?;
    Some((std::str::from_utf8(source).ok()?, u32::from_be_bytes(*link), key))
}

/// Appends the changelog value of an entry (`value` in state format `format`) to `out`.
pub fn encode_value(format: &str, value: &[u8], out: &mut Vec<u8>) {
    put_prefixed(format.as_bytes(), out);
    out.extend_from_slice(value);
}

/// A changelog value's format and entry value; `None` when the bytes are no such value.
pub fn decode_value(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (format, value) = take_prefixed(bytes)?;
    Some((std::str::from_utf8(format).ok()?, value))
}

fn put_prefixed(bytes: &[u8], out: &mut Vec<u8>) {
    // Source names and state formats are short; a length past u32 cannot come from a config.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A link's entries: key → (format, value).
type Entries = BTreeMap<Vec<u8>, (String, Vec<u8>)>;

/// The changelog folded: each link's entries as the last record of each key left them.
#[derive(Debug, Default)]
pub struct StoredState {
    links: BTreeMap<(String, u32), Entries>,
    /// Records whose key or value is not in the changelog's encoding (skipped).
    malformed: u64,
}

impl StoredState {
    /// Applies one changelog record: a value replaces the key's entry, a tombstone (`None`, or an
    /// empty payload from a broker that does not keep nulls) removes it.
    pub fn apply(&mut self, key: &[u8], payload: Option<&[u8]>) {
        let Some((source, link, entry)) = decode_key(key) else {
            self.malformed += 1;
            return;
        };
        let id = (source.to_owned(), link);
        match payload.filter(|p| !p.is_empty()) {
            None => {
                if let Some(entries) = self.links.get_mut(&id) {
                    entries.remove(entry);
                    if entries.is_empty() {
                        self.links.remove(&id);
                    }
                }
            }
            Some(payload) => {
                let Some((format, value)) = decode_value(payload) else {
                    self.malformed += 1;
                    return;
                };
                self.links.entry(id).or_default().insert(entry.to_vec(), (format.to_owned(), value.to_vec()));
            }
        }
    }

    /// Applies one link's committed changes as the changelog records them: a reset drops the
    /// link's entries, then each change replaces or removes its key.
    pub fn apply_write(&mut self, write: &StateWrite<'_>) {
        let id = (write.source.to_owned(), write.link);
        if write.reset {
            self.links.remove(&id);
        }
        let entries = self.links.entry(id).or_default();
        for (key, value) in write.changes {
            match value {
                Some(v) => entries.insert(key.clone(), (write.format.to_owned(), v.clone())),
                None => entries.remove(key),
            };
        }
        self.links.retain(|_, entries| !entries.is_empty());
    }

    /// Every entry of every link: (source, link, entry key, format, value), by source, link and key.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u32, &[u8], &str, &[u8])> {
        self.links.iter().flat_map(|((source, link), entries)| {
            entries.iter().map(move |(key, (format, value))| {
                (source.as_str(), *link, key.as_slice(), format.as_str(), value.as_slice())
            })
        })
    }

    /// Records skipped because they are not in the changelog's encoding.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// The state of link `link` of `source`'s chain: its format and entries (`None` when it has
    /// none). Entries of another format than the first one's cannot be there while every reset
    /// writes its tombstones; any that are are left out, with a warning.
    pub fn plugin_state(&self, source: &str, link: u32) -> Option<(String, StateEntries)> {
        let entries = self.links.get(&(source.to_owned(), link))?;
        let format = entries.values().next()?.0.clone();
        let kept: Vec<(Vec<u8>, Vec<u8>)> =
            entries.iter().filter(|(_, (f, _))| *f == format).map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        if kept.len() < entries.len() {
            tracing::warn!(
                source,
                link,
                format,
                dropped = entries.len() - kept.len(),
                "stored state entries of another format are left out"
            );
        }
        Some((format, kept))
    }
}

/// Reads the changelog `druid.state_topic()` whole (`read_committed`, up to its end as of the call)
/// and folds it. The instance's previous incarnation is fenced first, under `transactional_id`:
/// `init_transactions` returns once the transaction it left open is committed or aborted, so every
/// state change that went with the committed offsets is read. Blocks.
///
/// # Errors
/// [`KafkaError`] when the producer cannot be initialised or the topic cannot be read.
pub fn restore(
    kafka: &KafkaConfig,
    brokers: &str,
    druid: &DruidSinkConfig,
    transactional_id: &str,
    timeout: Duration,
) -> Result<StoredState, KafkaError> {
    drop(DruidSink::new(kafka, brokers, druid, transactional_id, timeout)?);
    read(kafka, brokers, &druid.state_topic())
}

/// Reads the changelog `topic` whole (`read_committed`, up to its end as of the call) and folds it,
/// without fencing anyone: for the instance's own producer, once `init_transactions` has settled
/// what its previous incarnation left open.
///
/// # Errors
/// [`KafkaError`] when the topic cannot be read.
pub fn read(kafka: &KafkaConfig, brokers: &str, topic: &str) -> Result<StoredState, KafkaError> {
    let reader = RangeReader::new(kafka, brokers, topic)?;
    let mut state = StoredState::default();
    reader.read_keyed(|key, payload| state.apply(key, payload))?;
    if state.malformed > 0 {
        tracing::warn!(
            topic = reader.topic(),
            records = state.malformed,
            "changelog records not in its encoding were skipped"
        );
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, link: u32, entry: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(source, link, entry, &mut out);
        out
    }

    fn value(format: &str, v: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_value(format, v, &mut out);
        out
    }

    #[test]
    fn keys_and_values_decode_to_what_was_encoded() {
        assert_eq!(decode_key(&key("binance", 2, b"BTC")), Some(("binance", 2, &b"BTC"[..])));
        assert_eq!(decode_key(&key("", 0, b"")), Some(("", 0, &b""[..])));
        assert_eq!(decode_value(&value("chaos.count@1", b"\x00\x07")), Some(("chaos.count@1", &b"\x00\x07"[..])));
        assert_eq!(decode_value(&value("f@1", b"")), Some(("f@1", &b""[..])));
        // Truncated: no such key or value.
        assert_eq!(decode_key(&key("binance", 2, b"")[..9]), None);
        assert_eq!(decode_value(&[0, 0, 0, 9, b'x']), None);
    }

    #[test]
    fn a_source_name_cannot_pass_for_another_sources_key() {
        // Unprefixed, source "ab" with key "" and source "a" with key "b" could be the same bytes.
        assert_ne!(key("ab", 0, b""), key("a", 0, b"b"));
        let bytes = key("a/b", 7, b"k");
        assert_eq!(decode_key(&bytes), Some(("a/b", 7, &b"k"[..])));
    }

    #[test]
    fn the_fold_keeps_each_keys_last_record_and_tombstones_delete() {
        let mut s = StoredState::default();
        s.apply(&key("src", 0, b"a"), Some(&value("f@1", b"1")));
        s.apply(&key("src", 0, b"b"), Some(&value("f@1", b"2")));
        s.apply(&key("src", 0, b"a"), Some(&value("f@1", b"3")));
        s.apply(&key("src", 0, b"b"), None);
        s.apply(&key("src", 1, b"x"), Some(&value("g@2", b"9")));
        s.apply(&key("src", 1, b"x"), Some(&[]));
        s.apply(&key("other", 0, b"a"), Some(&value("f@1", b"5")));
        s.apply(b"\x00\x00", Some(&value("f@1", b"5")));
        s.apply(&key("src", 0, b"c"), Some(b"\x00\x00\x00\x09"));
        assert_eq!(s.plugin_state("src", 0), Some(("f@1".to_owned(), vec![(b"a".to_vec(), b"3".to_vec())])));
        assert_eq!(s.plugin_state("src", 1), None, "every key removed");
        assert_eq!(s.plugin_state("other", 0), Some(("f@1".to_owned(), vec![(b"a".to_vec(), b"5".to_vec())])));
        assert_eq!(s.plugin_state("nowhere", 0), None);
        assert_eq!(s.malformed(), 2);
    }

    #[test]
    fn committed_writes_fold_as_their_changelog_records_do() {
        let (mut by_writes, mut by_records) = (StoredState::default(), StoredState::default());
        let none = Default::default();
        let write = |link, reset, changes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>, s: &mut StoredState| {
            s.apply_write(&StateWrite { source: "src", link, format: "f@1", reset, dropped: &none, changes });
        };
        let first = BTreeMap::from([(b"a".to_vec(), Some(b"1".to_vec())), (b"b".to_vec(), Some(b"2".to_vec()))]);
        write(0, false, &first, &mut by_writes);
        write(1, false, &first, &mut by_writes);
        let second = BTreeMap::from([(b"a".to_vec(), None), (b"c".to_vec(), Some(b"3".to_vec()))]);
        write(0, false, &second, &mut by_writes);
        // A reset keeps only what it writes; one writing nothing leaves the link without state.
        write(1, true, &BTreeMap::new(), &mut by_writes);
        for (k, v) in [("a", Some("1")), ("b", Some("2")), ("a", None), ("c", Some("3"))] {
            by_records.apply(&key("src", 0, k.as_bytes()), v.map(|v| value("f@1", v.as_bytes())).as_deref());
        }
        assert_eq!(by_writes.plugin_state("src", 0), by_records.plugin_state("src", 0));
        assert_eq!(by_writes.plugin_state("src", 1), None);
        let all: Vec<_> = by_writes.entries().map(|(s, l, k, f, v)| (s, l, k.to_vec(), f, v.to_vec())).collect();
        assert_eq!(
            all,
            [("src", 0, b"b".to_vec(), "f@1", b"2".to_vec()), ("src", 0, b"c".to_vec(), "f@1", b"3".to_vec())]
        );
    }
}
