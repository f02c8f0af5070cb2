//! Chain edits reaching the running process role: between two polls, the chains of the sources the
//! API edited (see [`crate::chains`]) are rebuilt from the links they already run, so a kept link
//! keeps its instance and state, a new link starts empty, a removed link's state is deleted with
//! the next commit, and a link whose configuration changed gets a new instance carrying its state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::chain::Chain;
use crate::chains::{BookLink, ChainBook};
use crate::plugin::PluginInstance;
use crate::plugin::registry::{BoundPlugin, Registry};
use crate::transform::Transformer;

/// What the process role needs to follow the API's chain edits.
pub struct LiveChains {
    /// The chains as edited.
    pub book: Arc<ChainBook>,
    /// Where a new link's plugin slot comes from.
    pub registry: Arc<Registry>,
    /// `[process] link_budget_ms` for new links.
    pub budget: Duration,
    /// The book's generation the chains were last rebuilt at.
    applied: AtomicU64,
}

impl std::fmt::Debug for LiveChains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveChains").field("applied", &self.applied.load(Ordering::Relaxed)).finish()
    }
}

impl LiveChains {
    /// Follows `book`'s edits from its current generation (the chains were built from it).
    pub fn new(book: Arc<ChainBook>, registry: Arc<Registry>, budget: Duration) -> Self {
        let applied = AtomicU64::new(book.generation());
        LiveChains { book, registry, budget, applied }
    }

    /// A fresh link: an instance of its plugin's active version with its configuration, and no state.
    ///
    /// # Errors
    /// The plugin has no active version, or its `init` refuses the configuration.
    pub fn link(&self, link: &BookLink) -> anyhow::Result<Transformer> {
        let slot = self
            .registry
            .slot(&link.plugin)
            .with_context(|| format!("plugin {} has no active version", link.plugin))?;
        let instance = PluginInstance::new(&slot.active(), &link.config_pairs())
            .with_context(|| format!("plugin {}", link.plugin))?;
        Ok(Transformer::bound(BoundPlugin::new(slot, instance)).with_budget(self.budget))
    }

    /// Rebuilds the chains whose source's chain changed since the last call (one atomic load when
    /// nothing did). `names` maps source ids to names; `watch` is told each link's plugin.
    ///
    /// # Errors
    /// A new link that cannot start: the chains are left as they were and the role fails (and is
    /// started again), as a version that cannot start does.
    pub fn apply(
        &self,
        chains: &mut HashMap<u32, Chain>,
        names: &HashMap<u32, Arc<str>>,
        watch: &dyn Fn(&str, &str),
    ) -> anyhow::Result<()> {
        let generation = self.book.generation();
        if generation == self.applied.load(Ordering::Relaxed) {
            return Ok(());
        }
        for chain in chains.values_mut() {
            let Some(source) = names.get(&chain.source()) else { continue };
            let Some(wanted) = self.book.chain(source) else { continue };
            let runs = |(i, l): (usize, &BookLink)| {
                chain.keys().get(i) == Some(&l.state_key)
                    && chain
                        .links()
                        .get(i)
                        .is_some_and(|t| t.plugin().name() == l.plugin && t.config() == l.config_pairs())
            };
            if wanted.len() == chain.links().len() && wanted.iter().enumerate().all(runs) {
                continue;
            }
            // Every new instance first, so a link that cannot start leaves the chain as it was.
            let mut fresh: Vec<Option<Transformer>> = Vec::with_capacity(wanted.len());
            for link in &wanted {
                let kept = chain.keys().iter().zip(chain.links()).any(|(&k, t)| {
                    k == link.state_key && t.plugin().name() == link.plugin && t.config() == link.config_pairs()
                });
                fresh.push(if kept {
                    None
                } else {
                    Some(self.link(link).with_context(|| format!("source {source}"))?)
                });
            }
            let mut old = chain.take_links();
            let mut links = Vec::with_capacity(wanted.len());
            for (link, fresh) in wanted.iter().zip(fresh) {
                let same_key = old.iter().position(|(k, t)| *k == link.state_key && t.plugin().name() == link.plugin);
                let transformer = match (fresh, same_key.map(|i| old.remove(i))) {
                    (None, Some((_, kept))) => kept,
                    // Another configuration: the state goes on (its format is the same version's).
                    (Some(mut fresh), Some((_, before))) => {
                        fresh.load_state(before.state().clone());
                        fresh
                    }
                    (Some(fresh), None) => fresh,
                    (None, None) => unreachable!("a link kept is in the old chain"),
                };
                watch(source, &link.plugin);
                links.push((link.state_key, transformer));
            }
            for (key, removed) in old {
                chain.retire(key, removed);
            }
            chain.set_links(links);
            let plugins: Vec<&str> = wanted.iter().map(|l| l.plugin.as_str()).collect();
            tracing::info!(source = %source, chain = %plugins.join(" -> "), "the source's chain changed; its next records run through it");
        }
        self.applied.store(generation, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use plugin_sdk::{Record, Records};

    use super::LiveChains;
    use crate::chain::{Chain, Unguarded};
    use crate::chains::{BookLink, ChainBook, Edit};
    use crate::config::{Config, Link, SourceConfig};
    use crate::plugin::registry::Registry;
    use crate::plugin::{Runtime, RuntimeSettings, bundled};

    /// Between two batches an edit rebuilds the chain from the links it runs: a configuration
    /// change keeps the link's state, a link added in front starts empty while the one behind
    /// keeps its state, and a removed stateful link's state is reset for the next commit.
    #[test]
    fn edits_carry_state_to_the_links_that_stay() {
        let dir = std::env::temp_dir().join(format!("sluice-edits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = RuntimeSettings { max_instances: 16, max_memory_bytes: 64 << 20, ..RuntimeSettings::default() };
        let runtime = Arc::new(Runtime::new(settings, Arc::new(crate::symbols::Symbols::new())).unwrap());
        let registry = Arc::new(Registry::open(runtime, &dir.join("plugins"), HashMap::new(), HashMap::new()).unwrap());
        registry.deploy("vwap-band", bundled::VWAP_BAND).unwrap();
        registry.deploy("min-volume", bundled::MIN_VOLUME).unwrap();
        let mut source = SourceConfig::new("a", "ws://x", "binance");
        source.transforms = Some(vec![Link::new("vwap-band")]);
        let book =
            Arc::new(ChainBook::open(&dir, Config { sources: vec![source], ..Config::default() }.chains()).unwrap());
        let live = LiveChains::new(book.clone(), registry, std::time::Duration::from_secs(2));
        let first = BookLink { plugin: "vwap-band".into(), config: Default::default(), state_key: 0 };
        let mut chains = HashMap::from([(7, Chain::keyed(7, vec![(0, live.link(&first).unwrap())]))]);
        let names = HashMap::from([(7, Arc::from("a"))]);
        let mut records = Records::new();
        for i in 0..5 {
            records.push(&Record { symbol_id: 1, trade_id: i, price_e8: 100, volume_e8: 1, ..Record::default() });
        }
        let run = |chains: &mut HashMap<u32, Chain>| {
            let chain = chains.get_mut(&7).unwrap();
            chain.run(records.as_bytes(), &mut Unguarded).unwrap();
            chain.commit_state();
        };
        run(&mut chains);
        let state = chains[&7].links()[0].state().entries();
        assert!(!state.is_empty(), "vwap-band keeps its window");

        let band = [("band_pct".to_owned(), "7".to_owned())].into_iter().collect();
        book.edit("a", Edit::Configure { at: 0, config: band, empty_state: false }).unwrap();
        live.apply(&mut chains, &names, &|_, _| {}).unwrap();
        let link = &chains[&7].links()[0];
        assert_eq!((link.config(), link.state().entries()), (&[("band_pct".into(), "7".into())][..], state.clone()));

        let insert = Edit::Insert { plugin: "min-volume".into(), config: Default::default(), at: Some(0) };
        book.edit("a", insert).unwrap();
        live.apply(&mut chains, &names, &|_, _| {}).unwrap();
        assert_eq!(chains[&7].keys(), [1, 0]);
        assert_eq!(chains[&7].links()[1].state().entries(), state, "the link behind keeps its state");
        run(&mut chains);

        book.edit("a", Edit::Remove(1)).unwrap();
        live.apply(&mut chains, &names, &|_, _| {}).unwrap();
        assert_eq!(chains[&7].keys(), [1]);
        let (key, retired) = &chains[&7].retired()[0];
        assert_eq!((*key, retired.pending().0), (0, true), "the removed link's stored state is deleted");
        chains.get_mut(&7).unwrap().commit_state();
        assert!(chains[&7].retired().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
