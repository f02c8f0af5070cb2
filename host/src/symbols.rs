//! The symbol dictionary: symbol names (`BTCUSDT`, `XMR/USD`) to the compact ids records carry.
//!
//! Ids are assigned in order of first use, starting at 1 (0 means "no symbol" on the wire). Plugins
//! reach the dictionary through the `intern-symbol` host import and cache ids themselves, so lookups
//! here are rare after warm-up.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A shared, thread-safe symbol dictionary.
#[derive(Debug, Default)]
pub struct Symbols {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashMap<Arc<str>, u32>,
    /// `names[id - 1]` is the name of `id`.
    names: Vec<Arc<str>>,
}

impl Symbols {
    /// An empty dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of `name`, assigning the next one on first use.
    pub fn intern(&self, name: &str) -> u32 {
        if let Some(&id) = self.read().ids.get(name) {
            return id;
        }
        let mut inner = self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&id) = inner.ids.get(name) {
            return id;
        }
        let name: Arc<str> = name.into();
        inner.names.push(name.clone());
        let id = inner.names.len() as u32;
        inner.ids.insert(name, id);
        id
    }

    /// The name of `id`, if assigned.
    pub fn name(&self, id: u32) -> Option<Arc<str>> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.read().names.get(index).cloned()
    }

    /// How many symbols are known.
    pub fn len(&self) -> usize {
        self.read().names.len()
    }

    /// True when no symbol is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent: every write inserts into
        // both before releasing, so a poisoned lock is still safe to read.
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_dense() {
        let s = Symbols::new();
        assert_eq!(s.intern("BTCUSDT"), 1);
        assert_eq!(s.intern("XMR/USD"), 2);
        assert_eq!(s.intern("BTCUSDT"), 1);
        assert_eq!(s.name(2).as_deref(), Some("XMR/USD"));
        assert_eq!(s.name(0), None);
        assert_eq!(s.name(3), None);
        assert_eq!(s.len(), 2);
    }
}
