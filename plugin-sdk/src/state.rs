//! State a transform keeps across batches (a last price, a window, a candle), which the host commits
//! with the records and positions it belongs to.
//!
//! A plugin keeps its state in a [`State`], a map it uses like a `BTreeMap`, declares the format of
//! that state in [`Plugin::STATE_FORMAT`](crate::Plugin::STATE_FORMAT) and hands the container to the
//! host through [`Plugin::state`](crate::Plugin::state). The container remembers which keys changed;
//! after each batch the host takes those changes once (no call per record) and commits them in the
//! same transaction as the batch's output. Whenever records run again (a retry after a trap, a failed
//! commit, a restart) the host first restores the committed entries, so the rule meets the state it
//! met the first time and its output is a function of the records alone.
//!
//! ```
//! use plugin_sdk::{Config, Plugin, Reason, Records, State, StateStore, StreamDataView};
//!
//! /// Passes only trades that trade higher than the symbol's previous one.
//! pub struct Upticks { last: State<u32, i64> }
//!
//! impl Plugin for Upticks {
//!     const STATE_FORMAT: &'static str = "upticks.last-price@1";
//!     fn init(_: &Config) -> Result<Self, Reason> { Ok(Upticks { last: State::new() }) }
//!     fn state(&mut self) -> Option<&mut dyn StateStore> { Some(&mut self.last) }
//!     fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
//!         let previous = self.last.insert(trade.symbol_id, trade.price_e8);
//!         if previous.is_some_and(|p| trade.price_e8 > p) {
//!             out.push_view(&trade);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # use plugin_sdk::{testing::Harness, Record};
//! let mut h = Harness::<Upticks>::new(&[])?;
//! h.transform(&[Record { price_e8: 5, ..Record::default() }]);
//! h.commit();
//! h.restart()?; // a fresh instance, restored from what was committed
//! let out = h.transform(&[Record { price_e8: 6, ..Record::default() }]);
//! assert_eq!(out.records.len(), 1);
//! # Ok::<(), Reason>(())
//! ```
//!
//! Keys and values cross to the host as bytes through [`StateCodec`]. An entry that does not decode
//! on restore (a plugin that changed its encoding without changing its format) is skipped: the rest
//! are restored and [`StateStore::restore`] reports how many were skipped, which the wasm build logs
//! at error level and [`testing::Harness`](crate::testing::Harness) returns as an error. It never
//! panics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sluice_wire::{read_varint, write_varint};

/// Entries as they cross to the host: key and value bytes.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Changed entries as they cross to the host: each key with its new value, or `None` when removed.
pub type Changes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Why state bytes could not be read back.
///
/// ```
/// use plugin_sdk::state::{StateCodec, StateError};
/// let err: StateError = <u32 as StateCodec>::from_bytes(&[1, 2]).unwrap_err();
/// assert_eq!(err.to_string(), "truncated");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateError(String);

impl StateError {
    /// An error with `message`, for a [`StateCodec`] of a plugin's own type.
    pub fn new(message: impl Into<String>) -> Self {
        StateError(message.into())
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateError {}

/// How a key or a value of a [`State`] is written as bytes and read back.
///
/// Implemented for `u32`, `u64`, `i32`, `i64`, `f64`, `bool`, `String`, `Vec<u8>` and tuples of two or
/// three of those. Integers are fixed-width big-endian (signed ones with the sign bit flipped), so
/// integer keys sort as bytes as they sort as numbers; strings and byte vectors carry a varint length.
/// A plugin's own type implements it by writing its fields in order:
///
/// ```
/// use plugin_sdk::state::{StateCodec, StateError};
///
/// #[derive(Debug, PartialEq)]
/// struct Window { sum_e8: i64, count: u32 }
///
/// impl StateCodec for Window {
///     fn encode(&self, out: &mut Vec<u8>) {
///         (self.sum_e8, self.count).encode(out);
///     }
///     fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
///         let (sum_e8, count) = StateCodec::decode(input)?;
///         Ok(Window { sum_e8, count })
///     }
/// }
///
/// let w = Window { sum_e8: -5, count: 2 };
/// assert_eq!(Window::from_bytes(&w.to_bytes()), Ok(w));
/// ```
pub trait StateCodec: Sized {
    /// Appends the bytes of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads a value from the front of `input` and advances `input` past it.
    ///
    /// # Errors
    /// A [`StateError`] when the bytes are too short or not a value of this type.
    fn decode(input: &mut &[u8]) -> Result<Self, StateError>;

    /// The bytes of `self`.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Reads a value that takes exactly `bytes`.
    ///
    /// # Errors
    /// A [`StateError`] when the bytes do not decode, or bytes are left over.
    fn from_bytes(mut bytes: &[u8]) -> Result<Self, StateError> {
        let value = Self::decode(&mut bytes)?;
        if !bytes.is_empty() {
            return Err(StateError::new(format!("{} bytes left over", bytes.len())));
        }
        Ok(value)
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], StateError> {
    if input.len() < n {
        return Err(StateError::new("truncated"));
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

fn take_array<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], StateError> {
    let mut a = [0u8; N];
    a.copy_from_slice(take(input, N)?);
    Ok(a)
}

macro_rules! codec_int {
    ($($t:ty => $flip:expr),*) => {$(
        impl StateCodec for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&(*self ^ $flip).to_be_bytes());
            }
            fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
                Ok(<$t>::from_be_bytes(take_array(input)?) ^ $flip)
            }
        }
    )*};
}
codec_int!(u32 => 0, u64 => 0, i32 => i32::MIN, i64 => i64::MIN);

impl StateCodec for f64 {
    fn encode(&self, out: &mut Vec<u8>) {
        self.to_bits().encode(out);
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        u64::decode(input).map(f64::from_bits)
    }
}

impl StateCodec for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        match take(input, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(StateError::new(format!("bool byte {b}"))),
        }
    }
}

impl StateCodec for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        write_varint(out, self.len() as u64);
        out.extend_from_slice(self);
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        let mut pos = 0;
        let len = read_varint(input, &mut pos).map_err(|e| StateError::new(format!("length: {e}")))?;
        *input = &input[pos..];
        let len = usize::try_from(len).map_err(|_| StateError::new("truncated"))?;
        Ok(take(input, len)?.to_vec())
    }
}

impl StateCodec for String {
    fn encode(&self, out: &mut Vec<u8>) {
        write_varint(out, self.len() as u64);
        out.extend_from_slice(self.as_bytes());
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        String::from_utf8(Vec::decode(input)?).map_err(|_| StateError::new("string is not UTF-8"))
    }
}

impl<A: StateCodec, B: StateCodec> StateCodec for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        Ok((A::decode(input)?, B::decode(input)?))
    }
}

impl<A: StateCodec, B: StateCodec, C: StateCodec> StateCodec for (A, B, C) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
        self.2.encode(out);
    }
    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        Ok((A::decode(input)?, B::decode(input)?, C::decode(input)?))
    }
}

/// What the host calls on a plugin's state: restore it from committed entries, take what changed.
///
/// [`State`] implements it; a plugin returns its `State` from
/// [`Plugin::state`](crate::Plugin::state) and never calls these itself.
///
/// ```
/// use plugin_sdk::{State, StateStore};
/// let mut s = State::<u32, i64>::new();
/// s.insert(1, 100);
/// let changes = s.take_changes();
/// assert_eq!(changes.len(), 1);
/// assert!(s.take_changes().is_empty()); // taken
/// s.restore(vec![(changes[0].0.clone(), changes[0].1.clone().unwrap())])?;
/// assert_eq!(s.get(&1), Some(&100));
/// # Ok::<(), plugin_sdk::state::StateError>(())
/// ```
pub trait StateStore {
    /// Replaces the whole state with `entries`; nothing counts as changed afterwards.
    ///
    /// # Errors
    /// A [`StateError`] when entries did not decode: they are skipped, the others restored.
    fn restore(&mut self, entries: Entries) -> Result<(), StateError>;

    /// The entries changed since the last `take_changes` or `restore`, each key with its value now
    /// or `None` when it was removed, in key order.
    fn take_changes(&mut self) -> Changes;
}

/// A map a plugin keeps across batches, which remembers the keys changed since the host last took
/// the changes. Use it like a `BTreeMap` (ordered, no random seed); see the [module](self) for how a
/// plugin hands it to the host.
///
/// ```
/// use plugin_sdk::State;
/// let mut last: State<(u32, u32), i64> = State::new();
/// last.insert((1, 7), 100);
/// *last.get_or_insert_with((1, 8), || 0) += 5;
/// assert_eq!(last.get(&(1, 8)), Some(&5));
/// assert_eq!(last.remove(&(1, 7)), Some(100));
/// assert_eq!(last.len(), 1);
/// ```
pub struct State<K, V> {
    /// The state itself.
    entries: BTreeMap<K, V>,
    /// Keys inserted, modified or removed since the changes were last taken or the state restored.
    changed: BTreeSet<K>,
}

impl<K, V> Default for State<K, V> {
    fn default() -> Self {
        State { entries: BTreeMap::new(), changed: BTreeSet::new() }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for State<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(&self.entries).finish()
    }
}

impl<K: Ord + Clone, V> State<K, V> {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The value of `key` to change in place; the key counts as changed whether or not it is.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let value = self.entries.get_mut(key)?;
        if !self.changed.contains(key) {
            self.changed.insert(key.clone());
        }
        Some(value)
    }

    /// The value of `key`, inserting `default()` first when there is none: the way to update a
    /// value in place (`*state.get_or_insert_with(k, || 0) += 1`). The key counts as changed.
    pub fn get_or_insert_with(&mut self, key: K, default: impl FnOnce() -> V) -> &mut V {
        if !self.changed.contains(&key) {
            self.changed.insert(key.clone());
        }
        self.entries.entry(key).or_insert_with(default)
    }

    /// Sets the value of `key`, returning the previous one.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if !self.changed.contains(&key) {
            self.changed.insert(key.clone());
        }
        self.entries.insert(key, value)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let value = self.entries.remove(key)?;
        if !self.changed.contains(key) {
            self.changed.insert(key.clone());
        }
        Some(value)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }
}

impl<K: Ord + Clone + StateCodec, V: StateCodec> StateStore for State<K, V> {
    fn restore(&mut self, entries: Entries) -> Result<(), StateError> {
        self.entries.clear();
        self.changed.clear();
        let total = entries.len();
        let mut skipped = 0;
        let mut first = None;
        for (key, value) in entries {
            match K::from_bytes(&key).and_then(|k| Ok((k, V::from_bytes(&value)?))) {
                Ok((k, v)) => {
                    self.entries.insert(k, v);
                }
                Err(e) => {
                    skipped += 1;
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(StateError::new(format!(
                "{skipped} of {total} state entries did not decode and were skipped (first: {e})"
            ))),
        }
    }

    fn take_changes(&mut self) -> Changes {
        let changed = std::mem::take(&mut self.changed);
        changed.into_iter().map(|k| (k.to_bytes(), self.entries.get(&k).map(StateCodec::to_bytes))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: StateCodec + PartialEq + fmt::Debug>(v: T) {
        assert_eq!(T::from_bytes(&v.to_bytes()), Ok(v));
    }

    #[test]
    fn every_codec_round_trips() {
        round_trip(0u32);
        round_trip(u32::MAX);
        round_trip(u64::MAX);
        round_trip(i32::MIN);
        round_trip(-1i64);
        round_trip(i64::MAX);
        round_trip(-0.5f64);
        round_trip(f64::INFINITY);
        round_trip(true);
        round_trip(String::from("BTCUSDT"));
        round_trip(vec![0u8; 300]);
        round_trip((7u32, String::from("é")));
        round_trip((1u32, 2u32, -3i64));
        round_trip((vec![1u8], false, 2.5f64));
    }

    #[test]
    fn integer_keys_sort_as_bytes_as_they_sort_as_numbers() {
        let values = [i64::MIN, -2, -1, 0, 1, i64::MAX];
        let bytes: Vec<Vec<u8>> = values.iter().map(StateCodec::to_bytes).collect();
        assert!(bytes.windows(2).all(|w| w[0] < w[1]));
        assert!((1u32, 5u32).to_bytes() < (2u32, 0u32).to_bytes());
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert_eq!(u64::from_bytes(&[0; 7]).unwrap_err().to_string(), "truncated");
        assert_eq!(u32::from_bytes(&[0; 5]).unwrap_err().to_string(), "1 bytes left over");
        assert_eq!(bool::from_bytes(&[2]).unwrap_err().to_string(), "bool byte 2");
        assert_eq!(String::from_bytes(&[1, 0xff]).unwrap_err().to_string(), "string is not UTF-8");
        assert_eq!(Vec::<u8>::from_bytes(&[5, 1]).unwrap_err().to_string(), "truncated");
        assert!(Vec::<u8>::from_bytes(&[0xff; 11]).is_err());
    }

    #[test]
    fn changes_name_each_changed_key_once_with_its_value_now() {
        let mut s = State::<u32, i64>::new();
        s.insert(2, 20);
        s.insert(1, 10);
        s.insert(2, 21);
        s.insert(3, 30);
        s.remove(&3);
        assert_eq!(s.remove(&9), None);
        let changes = s.take_changes();
        assert_eq!(
            changes,
            vec![
                (1u32.to_bytes(), Some(10i64.to_bytes())),
                (2u32.to_bytes(), Some(21i64.to_bytes())),
                (3u32.to_bytes(), None)
            ]
        );
        assert!(s.take_changes().is_empty());
        // Reading does not change; get_mut, get_or_insert_with and remove do.
        assert_eq!(s.get(&1), Some(&10));
        *s.get_mut(&2).unwrap() += 1;
        *s.get_or_insert_with(4, || 0) += 4;
        s.remove(&1);
        assert_eq!(s.get_mut(&8), None);
        let keys: Vec<Vec<u8>> = s.take_changes().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![1u32.to_bytes(), 2u32.to_bytes(), 4u32.to_bytes()]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(&2, &22), (&4, &4)]);
    }

    #[test]
    fn restore_replaces_everything_and_forgets_changes() {
        let mut s = State::<String, u64>::new();
        s.insert("old".into(), 1);
        s.restore(vec![("a".to_string().to_bytes(), 5u64.to_bytes())]).unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(&"a".to_string(), &5)]);
        assert!(s.take_changes().is_empty());
    }

    #[test]
    fn restore_skips_entries_that_do_not_decode_and_says_so() {
        let mut s = State::<u32, i64>::new();
        let err = s
            .restore(vec![
                (1u32.to_bytes(), 10i64.to_bytes()),
                (vec![1], 11i64.to_bytes()),
                (3u32.to_bytes(), vec![0; 9]),
            ])
            .unwrap_err();
        assert_eq!(err.to_string(), "2 of 3 state entries did not decode and were skipped (first: truncated)");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(&1, &10)]);
    }
}
