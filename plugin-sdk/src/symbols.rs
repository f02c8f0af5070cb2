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
pub(crate) fn clear_cache() {
    CACHE.with(|c| c.borrow_mut().clear());
}

#[cfg(target_arch = "wasm32")]
fn intern_in_host(name: &str) -> u32 {
    crate::bindings::sluice::plugin::host::intern_symbol(name)
}

#[cfg(not(target_arch = "wasm32"))]
fn intern_in_host(name: &str) -> u32 {
    crate::testing::intern(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_lookup_is_not_cached() {
        crate::testing::set_unavailable(true);
        assert_eq!(super::symbol_id("XMRUSDT"), 0);
        crate::testing::set_unavailable(false);
        // The dictionary is back: the next frame gets the real id, not the 0 from before.
        let id = super::symbol_id("XMRUSDT");
        assert_ne!(id, 0);
        assert_eq!(super::symbol_id("XMRUSDT"), id);
    }
}
