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
    if let Some(id) = CACHE.with(|c| c.borrow().get(name).copied()) {
        return id;
    }
    let id = intern_in_host(name);
    // 0 is the host's "dictionary unavailable": never cached, so the next frame asks again.
    if id != 0 {
        CACHE.with(|c| c.borrow_mut().insert(name.into(), id));
    }
    id
}

/// Forgets cached ids (the native test dictionary was reset).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn clear_cache() {
    CACHE.with(|c| c.borrow_mut().clear());
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
