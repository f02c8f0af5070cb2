//! The sources' chains of transforms as they run: the configuration's, or the one the API edited
//! (a link added, moved in, removed, or its configuration changed), kept in
//! `<data-dir>/chains.json` so a restart (a `kill -9` too) runs the edited chain.
//!
//! - **Which wins.** A source the API edited runs the edited chain whatever the configuration file
//!   says, until `DELETE /v1/sources/{name}/chain` returns it to the file's chain; a start that
//!   finds the two different says so in its log.
//! - **State keys.** A link's committed state is stored under its source and a *state key*, not
//!   its position: a link keeps its key when links are added or removed around it (so it keeps its
//!   state), a new link gets a key never used before for its source (so it starts empty), and a
//!   removed link's key is not used again (its stored entries are dropped at the next commit). The
//!   configuration's chain, never edited, has keys 0, 1, 2, ... (its positions), as before edits
//!   existed.
//! - **Swap.** An edit bumps [`ChainBook::generation`]; the process role checks it between polls
//!   (one atomic load) and rebuilds the edited sources' chains there, so the records of one poll
//!   all meet one chain and none is dropped or run twice (rows not yet committed were made by the
//!   old chain and are committed as they are; records read again after a failed commit meet the
//!   new one, as after a version swap).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::source::config::Link;

/// One link of a running chain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookLink {
    /// The plugin.
    pub plugin: String,
    /// Its configuration (what `init` gets).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Where its state is stored (see the module docs).
    pub state_key: u32,
}

impl BookLink {
    /// The configuration as the plugin runtime takes it.
    pub fn config_pairs(&self) -> Vec<(String, String)> {
        self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What `chains.json` keeps of one source.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Kept {
    /// The edited chain; `None` after a reset: the configuration's chain, keyed from `base`.
    links: Option<Vec<BookLink>>,
    /// The configuration's chain's first state key (0 until a reset moved it past the keys used).
    #[serde(default)]
    base: u32,
    /// The next state key a new link gets; never used before.
    next_key: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct BookFile {
    sources: BTreeMap<String, Kept>,
}

/// Why an edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// No configured source has this name.
    #[error("no source named {0:?}")]
    UnknownSource(String),
    /// The position is past the chain's end.
    #[error("source {source_name:?} has {len} links; there is no link {at}")]
    NoLink {
        /// The source.
        source_name: String,
        /// Its links.
        len: usize,
        /// The position asked for.
        at: usize,
    },
    /// `chains.json` could not be read or written.
    #[error("chains: {0}")]
    Io(String),
}

/// An edit of one source's chain.
#[derive(Clone, Debug)]
pub enum Edit {
    /// `plugin` with `config` at position `at` (the end when `None`), starting with empty state.
    Insert {
        /// The plugin.
        plugin: String,
        /// Its configuration.
        config: BTreeMap<String, String>,
        /// The position; the links from there on move one down.
        at: Option<usize>,
    },
    /// The link at this position goes, with its state.
    Remove(usize),
    /// The link at `at` runs with `config`: with its state, or empty when `empty_state`.
    Configure {
        /// The position.
        at: usize,
        /// The new configuration.
        config: BTreeMap<String, String>,
        /// Start the link's state empty (it gets a new state key).
        empty_state: bool,
    },
    /// Back to the configuration's chain, every link starting empty.
    Reset,
}

/// The chains the sources run, as configured and as edited (see the module docs).
#[derive(Debug)]
pub struct ChainBook {
    path: PathBuf,
    /// Each configured source's chain in the configuration (its own or the `[process]` default).
    configured: BTreeMap<String, Vec<Link>>,
    file: Mutex<BookFile>,
    generation: AtomicU64,
}

impl ChainBook {
    /// The book of the configured sources (`configured`: each source's chain as the configuration
    /// gives it, see `Config::chains`), with the edits kept under
    /// `data_dir`. Logs each source whose edited chain overrides the configuration's.
    ///
    /// # Errors
    /// [`ChainError::Io`] when `chains.json` exists and cannot be read.
    pub fn open(data_dir: &Path, configured: BTreeMap<String, Vec<Link>>) -> Result<Self, ChainError> {
        let path = data_dir.join("chains.json");
        let file: BookFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ChainError::Io(format!("{} is not a chain file: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BookFile::default(),
            Err(e) => return Err(ChainError::Io(format!("cannot read {}: {e}", path.display()))),
        };
        for (name, kept) in &file.sources {
            let (Some(links), Some(file_chain)) = (&kept.links, configured.get(name)) else { continue };
            let same = links.len() == file_chain.len()
                && links.iter().zip(file_chain).all(|(a, b)| a.plugin == b.plugin && a.config == b.config);
            if !same {
                let edited: Vec<&str> = links.iter().map(|l| l.plugin.as_str()).collect();
                let configured: Vec<&str> = file_chain.iter().map(|l| l.plugin.as_str()).collect();
                tracing::warn!(
                    source = %name,
                    edited = %edited.join(" -> "),
                    configured = %configured.join(" -> "),
                    "the chain edited over the API overrides the configuration's for this source \
                     (DELETE /v1/sources/{{name}}/chain returns to the configuration's)"
                );
            }
        }
        Ok(ChainBook { path, configured, file: Mutex::new(file), generation: AtomicU64::new(0) })
    }

    /// Bumped by every edit: the process role rebuilds the chains that changed when it sees it move.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BookFile> {
        self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The configured sources' names.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.configured.keys().map(String::as_str)
    }

    /// The chain `source` runs, `None` for a source not configured.
    pub fn chain(&self, source: &str) -> Option<Vec<BookLink>> {
        let configured = self.configured.get(source)?;
        Some(effective(configured, self.lock().sources.get(source)))
    }

    /// The configuration's chain of `source`.
    pub fn configured(&self, source: &str) -> Option<&[Link]> {
        self.configured.get(source).map(Vec::as_slice)
    }

    /// Whether `source` runs a chain the API edited (not the configuration's).
    pub fn is_edited(&self, source: &str) -> bool {
        self.lock().sources.get(source).is_some_and(|k| k.links.is_some())
    }

    /// Applies `edit` to `source`'s chain, keeps it in `chains.json` (written to a temporary file and
    /// renamed into place) and publishes it to the process role. Returns the new chain.
    ///
    /// # Errors
    /// An unknown source, a position past the end, or the file cannot be written (then nothing
    /// changed).
    pub fn edit(&self, source: &str, edit: Edit) -> Result<Vec<BookLink>, ChainError> {
        let configured = self.configured.get(source).ok_or_else(|| ChainError::UnknownSource(source.to_owned()))?;
        let mut file = self.lock();
        let before = file.sources.get(source).cloned();
        let mut kept = before.clone().unwrap_or(Kept { links: None, base: 0, next_key: configured.len() as u32 });
        let mut links = effective(configured, Some(&kept));
        let no_link = |at: usize, len: usize| ChainError::NoLink { source_name: source.to_owned(), len, at };
        let follows_configuration = matches!(edit, Edit::Reset);
        match edit {
            Edit::Insert { plugin, config, at } => {
                let at = at.unwrap_or(links.len());
                if at > links.len() {
                    return Err(no_link(at, links.len()));
                }
                links.insert(at, BookLink { plugin, config, state_key: kept.next_key });
                kept.next_key += 1;
            }
            Edit::Remove(at) => {
                if at >= links.len() {
                    return Err(no_link(at, links.len()));
                }
                links.remove(at);
            }
            Edit::Configure { at, config, empty_state } => {
                let len = links.len();
                let link = links.get_mut(at).ok_or_else(|| no_link(at, len))?;
                link.config = config;
                if empty_state {
                    link.state_key = kept.next_key;
                    kept.next_key += 1;
                }
            }
            Edit::Reset => {
                kept.base = kept.next_key;
                kept.next_key += configured.len() as u32;
            }
        }
        kept.links = (!follows_configuration).then_some(links);
        file.sources.insert(source.to_owned(), kept);
        if let Err(e) = self.persist(&file) {
            match before {
                Some(b) => file.sources.insert(source.to_owned(), b),
                None => file.sources.remove(source),
            };
            return Err(e);
        }
        let chain = effective(configured, file.sources.get(source));
        drop(file);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(chain)
    }

    fn persist(&self, file: &BookFile) -> Result<(), ChainError> {
        let json = serde_json::to_vec_pretty(file).map_err(|e| ChainError::Io(e.to_string()))?;
        crate::plugin::registry::write_atomically(&self.path, &json)
            .map_err(|e| ChainError::Io(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// The chain a source runs: the kept edited chain, or the configuration's keyed from `base`.
fn effective(configured: &[Link], kept: Option<&Kept>) -> Vec<BookLink> {
    if let Some(links) = kept.and_then(|k| k.links.clone()) {
        return links;
    }
    let base = kept.map_or(0, |k| k.base);
    configured
        .iter()
        .enumerate()
        .map(|(i, l)| BookLink { plugin: l.plugin.clone(), config: l.config.clone(), state_key: base + i as u32 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{BTreeMap, ChainBook, Edit};
    use crate::source::config::Link;

    fn keys(book: &ChainBook) -> Vec<(String, u32)> {
        book.chain("a").unwrap().into_iter().map(|l| (l.plugin, l.state_key)).collect()
    }

    /// Each edit keeps the links' state keys (a new link a key never used, a removed link's key
    /// gone for good, a configuration change the same key unless an empty state is asked for), is
    /// kept across a reopen of the data directory, and a reset follows the configuration again
    /// under fresh keys.
    #[test]
    fn edits_keep_state_keys_and_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("sluice-chains-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = || BTreeMap::from([("a".to_owned(), vec![Link::new("min-volume"), Link::new("outlier-filter")])]);
        let book = ChainBook::open(&dir, config()).unwrap();
        let key = |p: &str, k: u32| (p.to_owned(), k);
        assert_eq!(keys(&book), [key("min-volume", 0), key("outlier-filter", 1)]);
        assert!(!book.is_edited("a"));
        let insert = |at| Edit::Insert { plugin: "vwap-band".into(), config: Default::default(), at };
        book.edit("a", insert(Some(1))).unwrap();
        book.edit("a", Edit::Remove(0)).unwrap();
        book.edit("a", insert(None)).unwrap();
        let config_of = |band: &str| [("band_pct".to_owned(), band.to_owned())].into_iter().collect();
        book.edit("a", Edit::Configure { at: 0, config: config_of("1"), empty_state: false }).unwrap();
        assert_eq!(keys(&book), [key("vwap-band", 2), key("outlier-filter", 1), key("vwap-band", 3)]);
        book.edit("a", Edit::Configure { at: 2, config: config_of("3"), empty_state: true }).unwrap();
        assert!(book.edit("a", Edit::Remove(3)).is_err() && book.edit("b", Edit::Remove(0)).is_err());
        let generation = book.generation();

        let reopened = ChainBook::open(&dir, config()).unwrap();
        let chain = reopened.chain("a").unwrap();
        assert_eq!(keys(&reopened), [key("vwap-band", 2), key("outlier-filter", 1), key("vwap-band", 4)]);
        assert_eq!(
            (chain[0].config.get("band_pct"), chain[2].config.get("band_pct")),
            (Some(&"1".into()), Some(&"3".into()))
        );
        assert!(reopened.is_edited("a"));
        reopened.edit("a", Edit::Reset).unwrap();
        assert!(reopened.generation() > 0 && generation > 0);
        assert_eq!(keys(&reopened), [key("min-volume", 5), key("outlier-filter", 6)]);
        assert!(!reopened.is_edited("a"));
        assert_eq!(keys(&ChainBook::open(&dir, config()).unwrap()), keys(&reopened), "the reset is kept too");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
