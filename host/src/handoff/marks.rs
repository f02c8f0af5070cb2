//! What the ingest role remembers about what it has delivered, kept with the records it belongs to:
//! the recent trade ids of each (source, symbol) and each file source's place in its recording.
//!
//! On the local log a batch's marks commit in the same SQLite transaction as its records and dead
//! letters, so after a restart (clean or `kill -9`) they say exactly what the log holds: a venue's
//! subscribe snapshot, a rotation's overlap or a recording read again counts nothing twice, and
//! trades the venue sent while sluice was down are found missing. On Kafka the trade ids are read
//! back from the tail of the events topic at start ([`Marks::from_records`]), and each file
//! source's position commits in a Kafka transaction with its records
//! ([`crate::handoff::kafka::files`]).

/// How many ids below the newest one a (source, symbol) remembers one by one: older ids are taken as
/// seen. A late arrival within it fills a hole; one beyond it is a duplicate.
pub const TRADE_WINDOW: u64 = 4096;

/// Words of a [`TradeMark`]'s bitmap.
pub const WINDOW_WORDS: usize = (TRADE_WINDOW / 64) as usize;

/// The recent trade ids of one (source, symbol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TradeMark {
    /// The source id.
    pub source: u32,
    /// The symbol id.
    pub symbol: u32,
    /// The newest trade id delivered.
    pub last: u64,
    /// Bit `id % TRADE_WINDOW` is set for each id within the window below `last` that was delivered.
    pub seen: Box<[u64; WINDOW_WORDS]>,
}

/// How a file source's recording is recognised: its path and the SHA-256 of its first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// The path as configured.
    pub path: String,
    /// How many bytes from the start the hash covers (64 KiB, or the whole file when shorter).
    pub head_len: u64,
    /// SHA-256 of those bytes.
    pub head_sha256: [u8; 32],
}

/// Where a file source is in its recording: every line before `offset` is delivered (as records or
/// dead letters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMark {
    /// The source id.
    pub source: u32,
    /// The recording.
    pub identity: FileIdentity,
    /// The byte offset of the next line not yet delivered.
    pub offset: u64,
}

/// The marks of one hand-over, or all of them as restored at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// Trade-id windows changed (or, restored, all of them).
    pub trades: Vec<TradeMark>,
    /// File positions moved (or, restored, all of them).
    pub files: Vec<FileMark>,
}

impl Marks {
    /// True when there is nothing to keep.
    pub fn is_empty(&self) -> bool {
        self.trades.is_empty() && self.files.is_empty()
    }

    /// Folds `newer` in: a key in both keeps `newer`'s value.
    pub fn merge(&mut self, newer: Marks) {
        for t in newer.trades {
            match self.trades.iter_mut().find(|m| (m.source, m.symbol) == (t.source, t.symbol)) {
                Some(m) => *m = t,
                None => self.trades.push(t),
            }
        }
        for f in newer.files {
            match self.files.iter_mut().find(|m| m.source == f.source) {
                Some(m) => *m = f,
                None => self.files.push(f),
            }
        }
    }

    /// The trade-id windows that records `(source, symbol, trade_id)`, in the order they were
    /// delivered, leave behind (ids 0, which venues without ids carry, are skipped).
    pub fn from_records(records: impl IntoIterator<Item = (u32, u32, u64)>) -> Marks {
        let mut by_key: std::collections::HashMap<(u32, u32), TradeMark> = std::collections::HashMap::new();
        for (source, symbol, id) in records {
            if id == 0 {
                continue;
            }
            let mark = by_key.entry((source, symbol)).or_insert_with(|| TradeMark {
                source,
                symbol,
                last: id,
                seen: Box::new([0; WINDOW_WORDS]),
            });
            mark.add(id);
        }
        let mut trades: Vec<TradeMark> = by_key.into_values().collect();
        trades.sort_by_key(|m| (m.source, m.symbol));
        Marks { trades, files: Vec::new() }
    }
}

impl TradeMark {
    /// The bitmap position of `id`.
    pub fn bit(id: u64) -> (usize, u64) {
        let i = id % TRADE_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// True when `id` (within the window below `last`) was delivered.
    pub fn was_seen(&self, id: u64) -> bool {
        let (w, b) = Self::bit(id);
        self.seen[w] & b != 0
    }

    /// Marks `id` delivered, moving `last` up to it when it is newer (forgetting what slides out).
    pub fn add(&mut self, id: u64) {
        if id > self.last {
            if id - self.last >= TRADE_WINDOW {
                self.seen.fill(0);
            } else {
                for skipped in self.last + 1..=id {
                    let (w, b) = Self::bit(skipped);
                    self.seen[w] &= !b;
                }
            }
            self.last = id;
        }
        if self.last - id < TRADE_WINDOW {
            let (w, b) = Self::bit(id);
            self.seen[w] |= b;
        }
    }

    /// The bitmap as bytes (little-endian words), as the log stores it.
    pub fn seen_bytes(&self) -> Vec<u8> {
        self.seen.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The bitmap from [`seen_bytes`](Self::seen_bytes); `None` when the length is wrong.
    pub fn seen_from_bytes(bytes: &[u8]) -> Option<Box<[u64; WINDOW_WORDS]>> {
        if bytes.len() != WINDOW_WORDS * 8 {
            return None;
        }
        let mut seen = Box::new([0u64; WINDOW_WORDS]);
        for (w, chunk) in seen.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *w = u64::from_le_bytes(word);
        }
        Some(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_leave_the_window_they_filled() {
        let marks = Marks::from_records([(1, 2, 10), (1, 2, 12), (1, 2, 11), (1, 3, 5), (1, 2, 0), (2, 2, 7)]);
        assert_eq!(marks.trades.len(), 3);
        let m = &marks.trades[0];
        assert_eq!((m.source, m.symbol, m.last), (1, 2, 12));
        assert!(m.was_seen(10) && m.was_seen(11) && m.was_seen(12) && !m.was_seen(9));
        let back = TradeMark::seen_from_bytes(&m.seen_bytes()).unwrap();
        assert_eq!(back, m.seen);
        assert!(TradeMark::seen_from_bytes(&[0; 7]).is_none());
        // An id older than the window is not recorded one by one (it counts as seen by age).
        let mut far = TradeMark { source: 1, symbol: 1, last: 10_000, seen: Box::new([0; WINDOW_WORDS]) };
        far.add(10_000 - TRADE_WINDOW);
        assert_eq!(far.seen.iter().map(|w| w.count_ones()).sum::<u32>(), 0);
    }

    #[test]
    fn a_merge_keeps_the_newer_value_per_key() {
        let mut a = Marks::from_records([(1, 1, 5), (1, 2, 6)]);
        let b = Marks::from_records([(1, 2, 9)]);
        a.merge(b);
        let lasts: Vec<u64> = a.trades.iter().map(|m| m.last).collect();
        assert_eq!(lasts, [5, 9]);
    }
}
