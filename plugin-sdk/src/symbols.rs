//! Symbol ids: the host's dictionary, cached inside the plugin so a known symbol costs no host call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a: deterministic (no random seed, so no entropy import) and fast on short symbol names.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type Cache = HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    static RECENT: RefCell<Recent> = const { RefCell::new(Recent { slots: [Slot::EMPTY; Recent::SLOTS] }) };
}

/// A name of up to 16 bytes as two words and its length: equal exactly when the names are.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Short {
    lo: u64,
    hi: u64,
    len: u32,
}

impl Short {
    /// Reads the name with at most four loads (overlapping ones for lengths between the widths).
    #[inline(always)]
    fn of(name: &[u8]) -> Option<Short> {
        let word = |at: usize| name.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let half = |at: usize| name.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let len = name.len();
        let (lo, hi) = match len {
            0 | 17.. => return None,
            8.. => (word(0)?, word(len - 8)?),
            4.. => (u64::from(half(0)?) | u64::from(half(len - 4)?) << 32, 0),
            _ => (name.iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b)), 0),
        };
        Some(Short { lo, hi, len: len as u32 })
    }

    #[inline(always)]
    fn slot(&self) -> usize {
        let mixed = (self.lo ^ self.hi.rotate_left(29) ^ u64::from(self.len)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> (64 - Recent::SLOTS.trailing_zeros())) as usize
    }
}

#[derive(Clone, Copy)]
struct Slot {
    name: Short,
    id: u32,
}

impl Slot {
    const EMPTY: Slot = Slot { name: Short { lo: 0, hi: 0, len: 0 }, id: 0 };
}

/// Ids of recently named short symbols, one per slot of their hash: a frame's symbol is found with a
/// hash of two words and one compare, where the map hashes every byte and compares the strings.
struct Recent {
    slots: [Slot; Recent::SLOTS],
}

impl Recent {
    const SLOTS: usize = 256;
}

/// The id of a symbol name (e.g. `BTCUSDT`), as the host's dictionary assigns it. Every sluice
/// instance gives the same name the same id. 0 means the host's dictionary could not be reached: the
/// host refuses (dead-letters) a frame whose records carry it, and the next call asks again. Natively,
/// [`testing::Harness`](crate::testing::Harness) keeps the dictionary.
///
/// # The naming convention
/// Pass the venue's own symbol exactly as the venue writes it in its frames: `BTCUSDT` (Binance),
/// `BTC-USD` (Coinbase), `XBT/USD` (Kraken v1), `BTC-USDT` (OKX). Do not normalise it: the store and
/// Druid keep the name as given, next to the source, so a row can always be traced back to the
/// venue's own instrument, and two venues' names never collide because the source tells them
/// apart. Queries that compare instruments across venues map names there, where the mapping can
/// change without rewriting history.
///
/// ```
/// let a = plugin_sdk::symbol_id("BTCUSDT");
/// assert_eq!(plugin_sdk::symbol_id("BTCUSDT"), a);
/// assert_ne!(plugin_sdk::symbol_id("ETHUSDT"), a);
/// ```
pub fn symbol_id(name: &str) -> u32 {
    let short = Short::of(name.as_bytes());
    if let Some(short) = short {
        let slot = RECENT.with(|r| r.borrow().slots[short.slot()]);
        if slot.name == short {
            return slot.id;
        }
    }
    let id = match CACHE.with(|c| c.borrow().get(name).copied()) {
        Some(id) => id,
        None => {
            let id = intern_in_host(name);
            // 0 is the host's "dictionary unavailable": never cached, so the next frame asks again.
            if id == 0 {
                return 0;
            }
            CACHE.with(|c| c.borrow_mut().insert(name.into(), id));
            id
        }
    };
    if let Some(short) = short {
        RECENT.with(|r| r.borrow_mut().slots[short.slot()] = Slot { name: short, id });
    }
    id
}

/// Forgets cached ids (the native test dictionary was reset).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn clear_cache() {
    CACHE.with(|c| c.borrow_mut().clear());
    RECENT.with(|r| r.borrow_mut().slots = [Slot::EMPTY; Recent::SLOTS]);
}

#[cfg(target_arch = "wasm32")]
fn intern_in_host(name: &str) -> u32 {
    crate::bindings::sluice::plugin::host::intern_symbol(name)
}

#[cfg(not(target_arch = "wasm32"))]
fn intern_in_host(name: &str) -> u32 {
    native::intern(name)
}

/// The dictionary a plugin sees natively (in `cargo test`, through
/// [`testing::Harness`](crate::testing::Harness)): one per thread, ids from 1 in order of first use.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) mod native {
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Dictionary {
        ids: HashMap<String, u32>,
        names: Vec<String>,
        /// Answer 0 to every new name, as a host whose dictionary is down does (tests of the cache).
        unavailable: bool,
    }

    /// Makes this thread's test dictionary answer 0 (unavailable) or work again.
    #[cfg(test)]
    pub(crate) fn set_unavailable(unavailable: bool) {
        DICTIONARY.with(|d| d.borrow_mut().unavailable = unavailable);
    }

    thread_local! {
        static DICTIONARY: RefCell<Dictionary> = RefCell::new(Dictionary::default());
    }

    /// The test dictionary's id for `name`, assigning the next one (from 1) on first use; 0 while the
    /// dictionary is made unavailable (the host answers 0 when its dictionary cannot be reached).
    pub(crate) fn intern(name: &str) -> u32 {
        DICTIONARY.with(|d| {
            let mut d = d.borrow_mut();
            if d.unavailable {
                return 0;
            }
            if let Some(&id) = d.ids.get(name) {
                return id;
            }
            d.names.push(name.to_owned());
            let id = d.names.len() as u32;
            d.ids.insert(name.to_owned(), id);
            id
        })
    }

    /// A fresh dictionary for this thread, and no cached ids.
    pub(crate) fn reset() {
        DICTIONARY.with(|d| *d.borrow_mut() = Dictionary::default());
        super::clear_cache();
    }

    /// The name behind an id of this thread's dictionary.
    pub(crate) fn name(id: u32) -> Option<String> {
        DICTIONARY.with(|d| d.borrow().names.get(usize::try_from(id).ok()?.checked_sub(1)?).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::Short;

    #[test]
    fn short_names_are_equal_exactly_when_their_bytes_are() {
        let names: Vec<String> = (0..=17)
            .flat_map(|len| {
                let base = "ABCDEFGHIJKLMNOPQ"[..len].to_string();
                // The same length, one byte changed at each place.
                let variants: Vec<String> = (0..len)
                    .map(|i| base.chars().enumerate().map(|(j, c)| if i == j { 'x' } else { c }).collect())
                    .collect();
                std::iter::once(base).chain(variants)
            })
            .collect();
        for a in &names {
            for b in &names {
                match (Short::of(a.as_bytes()), Short::of(b.as_bytes())) {
                    (Some(x), Some(y)) => assert_eq!(x == y, a == b, "{a:?} {b:?}"),
                    (x, _) => assert!(x.is_none() == (a.is_empty() || a.len() > 16), "{a:?}"),
                }
            }
        }
    }

    #[test]
    fn names_that_share_a_slot_keep_their_own_ids() {
        super::native::reset();
        let names: Vec<String> = (0..2_000).map(|i| format!("SYM{i}USDT")).collect();
        let ids: Vec<u32> = names.iter().map(|n| super::symbol_id(n)).collect();
        // Again, in another order: every lookup that hits a slot another name took is still right.
        for (n, id) in names.iter().zip(&ids).rev() {
            assert_eq!(super::symbol_id(n), *id, "{n}");
            assert_eq!(super::native::name(*id).as_deref(), Some(n.as_str()));
        }
    }
    #[test]
    fn a_failed_lookup_is_not_cached() {
        super::native::set_unavailable(true);
        assert_eq!(super::symbol_id("XMRUSDT"), 0);
        super::native::set_unavailable(false);
        // The dictionary is back: the next frame gets the real id, not the 0 from before.
        let id = super::symbol_id("XMRUSDT");
        assert_ne!(id, 0);
        assert_eq!(super::symbol_id("XMRUSDT"), id);
    }
}
