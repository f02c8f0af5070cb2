//! The symbol dictionary: symbol names (`BTCUSDT`, `XMR/USD`) to the compact ids records carry.
//!
//! Ids are assigned in order of first use, starting at 1 (0 means "no symbol" on the wire). Plugins
//! reach the dictionary through the `intern-symbol` host import and cache ids themselves, so lookups
//! here are rare after warm-up.
//!
//! [`Symbols::open`] keeps the dictionary in a file in the data directory (one JSON string per line,
//! line `n` naming id `n`), so a restarted process gives every symbol the id it had before and the
//! records already in Kafka keep meaning the same thing.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

/// A shared, thread-safe symbol dictionary.
#[derive(Debug, Default)]
pub struct Symbols {
    inner: RwLock<Inner>,
    /// Where new names are appended, when the dictionary is kept in a file.
    log: Option<Mutex<std::fs::File>>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashMap<Arc<str>, u32>,
    /// `names[id - 1]` is the name of `id`.
    names: Vec<Arc<str>>,
}

impl Symbols {
    /// An empty dictionary kept in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// The dictionary kept in the file at `path`: loads the names already there and appends new
    /// ones. A last line cut short by a crash is dropped (its symbol gets an id again on next use).
    ///
    /// # Errors
    /// When the file cannot be read or opened for appending, or a complete line is not a name.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut inner = Inner::default();
        let mut good_len = 0u64;
        if path.exists() {
            let file = std::fs::File::open(path)?;
            for line in io::BufReader::new(file).split(b'\n') {
                let line = line?;
                let Ok(name) = serde_json::from_slice::<String>(&line) else {
                    break;
                };
                good_len += line.len() as u64 + 1;
                let name: Arc<str> = name.into();
                inner.names.push(name.clone());
                inner.ids.insert(name, inner.names.len() as u32);
            }
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        if file.metadata()?.len() > good_len {
            file.set_len(good_len)?;
        }
        Ok(Symbols { inner: RwLock::new(inner), log: Some(Mutex::new(file)) })
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
        if let Some(log) = &self.log {
            // serde_json writes any string as one line: newlines inside it are escaped.
            let line = serde_json::to_string(name).unwrap_or_default() + "\n";
            let written = log
                .lock()
                .map_err(|_| io::Error::other("lock poisoned"))
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                tracing::error!(symbol = name, error = %e, "could not save a new symbol; ids may change at restart");
            }
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

    #[test]
    fn a_reopened_dictionary_keeps_every_id() {
        let path = std::env::temp_dir().join(format!("sluice-symbols-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let s = Symbols::open(&path).unwrap();
            assert_eq!(s.intern("BTCUSDT"), 1);
            assert_eq!(s.intern("odd\nname \"quoted\""), 2);
            assert_eq!(s.intern("XMR/USD"), 3);
        }
        // A crash in the middle of writing a fourth name.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"\"ETH").unwrap();
        let s = Symbols::open(&path).unwrap();
        assert_eq!(s.intern("XMR/USD"), 3);
        assert_eq!(s.name(2).as_deref(), Some("odd\nname \"quoted\""));
        assert_eq!(s.intern("ETHUSDT"), 4);
        drop(s);
        let s = Symbols::open(&path).unwrap();
        assert_eq!(s.name(4).as_deref(), Some("ETHUSDT"));
        assert_eq!(s.len(), 4);
        let _ = std::fs::remove_file(&path);
    }
}
