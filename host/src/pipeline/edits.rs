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
