//! The chain: one source's records through each of its transforms in order, the one runner the
//! live process role, replay and `sluice plugin test` share, so a record meets the same links, the
//! same state and the same rejects wherever it runs.
//!
//! Each link runs on the whole batch the link before it left ([`Transformer::transform`], with its
//! retry, bisection and state); its records are the source's whatever source id it wrote
//! ([`TransformedBatch::stamp_source`]); a record it refuses is a [`Reject`] naming the link
//! (`name@version`) with the bytes that link was given. What surrounds a link (the live role's
//! circuit breaker, `plugin test`'s refusal of failed calls) is the caller's, through [`Hooks`].

use plugin_sdk::{Record, StreamDataView};
use sluice_wire::Delimited;

use crate::plugin::{PluginCode, PluginError};
use crate::transform::{TransformedBatch, Transformer};

/// A source's transforms, in order, with the source id their output is stamped with.
pub struct Chain {
    /// The source whose records run here: every link's output carries its id.
    source: u32,
    links: Vec<Transformer>,
    /// Each link's state key, where the store keeps its state (see [`crate::chains`]).
    keys: Vec<u32>,
    /// The state of links an edit removed, reset, with their keys: the next commit deletes their
    /// stored entries.
    retired: Vec<(u32, crate::transform::LinkState)>,
}

/// A record a link refused, waiting to be dead-lettered or reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The link's position in the chain (0 is the first transform).
    pub link: usize,
    /// The link's plugin, `name@version`.
    pub plugin: String,
    /// The record's index in the batch the link was given.
    pub index: usize,
    /// The record as the link was given it.
    pub bytes: Vec<u8>,
    /// The plugin's reason, or the failed call's error.
    pub reason: String,
}

/// What a batch became after the whole chain.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// The last link's records, length-delimited and stamped with the chain's source.
    pub records: Vec<u8>,
    /// The same records, parsed.
    pub parsed: Vec<Record>,
    /// What each link refused, in link order.
    pub rejects: Vec<Reject>,
    /// `name@version` of the last link (empty for a chain of no links).
    pub last: String,
}

/// A link that could not run at all (its plugin cannot be instantiated): nothing of the batch is
/// consumed.
#[derive(Debug, thiserror::Error)]
#[error("{plugin} (link {link}): {error}")]
pub struct LinkError {
    /// The link's position in the chain.
    pub link: usize,
    /// The link's plugin, `name@version`.
    pub plugin: String,
    /// Why it could not run.
    #[source]
    pub error: PluginError,
}

/// What a caller does around each link: whether it may run, and what its outcome means beyond the
/// records (a breaker's verdict, a failure reported rather than isolated). Either may stop the chain.
pub trait Hooks {
    /// What stops the chain; a link that cannot run converts into it.
    type Error: From<LinkError>;

    /// Before link `link` (running `plugin`) is called with `input` (length-delimited records).
    ///
    /// # Errors
    /// The link may not run now; the chain stops.
    fn before(&mut self, link: usize, plugin: &PluginCode, input: &[u8]) -> Result<(), Self::Error> {
        let _ = (link, plugin, input);
        Ok(())
    }

    /// After link `link` ran, with its batch or the error that kept it from running.
    ///
    /// # Errors
    /// The outcome stops the chain; after a failed link it stops in any case.
    fn after(
        &mut self,
        link: usize,
        plugin: &PluginCode,
        outcome: Result<&TransformedBatch, &PluginError>,
    ) -> Result<(), Self::Error> {
        let _ = (link, plugin, outcome);
        Ok(())
    }
}

/// No hooks: every link runs, failed calls are isolated into rejects (replay).
pub struct Unguarded;

impl Hooks for Unguarded {
    type Error = LinkError;
}

impl Chain {
    /// The chain of `links` of source `source`, their state keys their positions.
    pub fn new(source: u32, links: Vec<Transformer>) -> Self {
        let keys = (0..links.len() as u32).collect();
        Chain { source, links, keys, retired: Vec::new() }
    }

    /// The chain of `links` of source `source`, each with its state key.
    pub fn keyed(source: u32, links: Vec<(u32, Transformer)>) -> Self {
        let (keys, links) = links.into_iter().unzip();
        Chain { source, links, keys, retired: Vec::new() }
    }

    /// The state key of link `link` (its position in a chain never edited).
    pub fn key(&self, link: usize) -> u32 {
        self.keys.get(link).copied().unwrap_or(link as u32)
    }

    /// Each link's state key, in order.
    pub fn keys(&self) -> &[u32] {
        &self.keys
    }

    /// Takes the links out, each with its state key, to rebuild the chain after an edit.
    pub fn take_links(&mut self) -> Vec<(u32, Transformer)> {
        let keys = std::mem::take(&mut self.keys);
        keys.into_iter().zip(std::mem::take(&mut self.links)).collect()
    }

    /// Runs `links` from the next batch on.
    pub fn set_links(&mut self, links: Vec<(u32, Transformer)>) {
        (self.keys, self.links) = links.into_iter().unzip();
    }

    /// `link`, removed by an edit: its stored state is deleted with the next commit.
    pub fn retire(&mut self, key: u32, link: Transformer) {
        let mut state = link.state().clone();
        if let Some(format) = state.format().map(str::to_owned) {
            state.reset(Some(format));
            self.retired.push((key, state));
        }
    }

    /// The states of removed links the next commit deletes.
    pub fn retired(&self) -> &[(u32, crate::transform::LinkState)] {
        &self.retired
    }

    /// The source whose chain this is.
    pub fn source(&self) -> u32 {
        self.source
    }

    /// The links, in order (their state, their plugins).
    pub fn links(&self) -> &[Transformer] {
        &self.links
    }

    /// The links, to load or commit their state.
    pub fn links_mut(&mut self) -> &mut [Transformer] {
        &mut self.links
    }

    /// The store committed every link's pending state changes: they are the committed state now.
    pub fn commit_state(&mut self) {
        for link in self.links.iter_mut().filter(|t| t.state().is_dirty()) {
            link.state_mut().commit();
        }
        self.retired.clear();
    }

    /// Drops every link's state changes since the last commit: their records will be read again.
    pub fn abandon(&mut self) {
        for link in &mut self.links {
            link.abandon();
        }
    }

    /// Runs a length-delimited batch of this source's records through every link in order: each
    /// link's output is the next link's input; once a link leaves nothing, the links after it are
    /// not called. With no links the records pass as they are.
    ///
    /// # Errors
    /// What `hooks` stopped the chain with, or a link that could not run at all: nothing of the
    /// batch is consumed then (the state the links changed is the caller's to abandon).
    pub fn run<H: Hooks>(&mut self, input: &[u8], hooks: &mut H) -> Result<ChainOutput, H::Error> {
        let mut out = ChainOutput::default();
        if self.links.is_empty() {
            out.parsed = Delimited::new(input)
                .filter_map(|item| item.and_then(StreamDataView::parse).ok())
                .map(|view| view.record())
                .collect();
            out.records = input.to_vec();
            return Ok(out);
        }
        let mut carried: Option<Vec<u8>> = None;
        for (link, t) in self.links.iter_mut().enumerate() {
            let batch = carried.as_deref().unwrap_or(input);
            if batch.is_empty() {
                // An earlier link filtered everything out: the rest has nothing to do.
                out.parsed.clear();
                break;
            }
            hooks.before(link, t.plugin(), batch)?;
            let mut done = match t.transform(batch) {
                Ok(done) => done,
                Err(error) => {
                    hooks.after(link, t.plugin(), Err(&error))?;
                    return Err(LinkError { link, plugin: label(t.plugin()), error }.into());
                }
            };
            hooks.after(link, t.plugin(), Ok(&done))?;
            let plugin = label(t.plugin());
            out.rejects.extend(std::mem::take(&mut done.rejects).into_iter().map(|r| Reject {
                link,
                plugin: plugin.clone(),
                index: r.index,
                bytes: r.bytes,
                reason: r.reason,
            }));
            // The link's records are this source's, whatever source id it wrote: the next link and
            // the rows see this source.
            done.stamp_source(self.source);
            out.parsed = done.parsed;
            carried = Some(done.records);
        }
        out.records = carried.unwrap_or_default();
        out.last = self.links.last().map(|t| label(t.plugin())).unwrap_or_default();
        Ok(out)
    }
}

/// Records each link of each source's chain refused (dead-lettered) since this process started, by
/// source name and link (the plugin's name), counted when the batch that carries them commits: the
/// live role's per-source and per-link reject counts (`/v1/sources`, the `counts` log line,
/// `sluice_process_rejects_total`). Like the other counts there it starts at 0 with the process;
/// the dead letters themselves are in the store for good.
#[derive(Debug, Default)]
pub struct LinkRejects(std::sync::Mutex<Vec<(String, String, u64)>>);

impl LinkRejects {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists a link at 0, so its series exists from the start.
    pub fn watch(&self, source: &str, link: &str) {
        self.add(source, link, 0);
    }

    /// Counts `n` more refused by `link` (a plugin's name, or its `name@version`) of `source`.
    pub fn add(&self, source: &str, link: &str, n: u64) {
        let link = link.split_once('@').map_or(link, |(name, _)| name);
        let mut counts = self.lock();
        match counts.iter_mut().find(|(s, l, _)| s == source && l == link) {
            Some((_, _, count)) => *count += n,
            None => counts.push((source.to_owned(), link.to_owned(), n)),
        }
    }

    /// Every (source, link, count), in the order they were first seen.
    pub fn counts(&self) -> Vec<(String, String, u64)> {
        self.lock().clone()
    }

    /// What `link` of `source` refused, and all links of `source` together.
    pub fn of(&self, source: &str, link: &str) -> (u64, u64) {
        self.lock()
            .iter()
            .filter(|(s, _, _)| s == source)
            .fold((0, 0), |(one, all), (_, l, n)| (if l == link { one + n } else { one }, all + n))
    }
}

/// A link's plugin as rejects and dead letters name it: `name@version`.
pub fn label(plugin: &PluginCode) -> String {
    format!("{}@{}", plugin.name(), plugin.version())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use plugin_sdk::{Record, Records};
    use sluice_wire::Delimited;

    use super::{Chain, Hooks, LinkError, Unguarded};
    use crate::plugin::{Limits, PluginCode, PluginInstance, Runtime, RuntimeSettings, bundled};
    use crate::transform::Transformer;

    fn link(runtime: &Runtime, name: &str, wasm: &[u8], config: &[(&str, &str)]) -> Transformer {
        let code = runtime.compile(name, wasm, Limits::default()).unwrap();
        let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Transformer::new(PluginInstance::new(&code, &config).unwrap())
    }

    /// Trades of source 0 (as another source's link might write them), one per (price, volume).
    fn trades(trades: &[(i64, i64)]) -> Vec<u8> {
        let mut records = Records::new();
        for (i, &(price, volume)) in trades.iter().enumerate() {
            let (price_e8, volume_e8) = (price * 100_000_000, volume * 10_000_000);
            records.push(&Record { symbol_id: 1, trade_id: i as u64, price_e8, volume_e8, ..Record::default() });
        }
        records.as_bytes().to_vec()
    }

    /// `min-volume` then `outlier-filter`: the small trade is dropped by the first link, the outlier
    /// refused by the second, named with its version and with the bytes it was given (its index
    /// among what the first link left); the rest are the chain's source's.
    #[test]
    fn links_run_in_order_and_a_reject_names_its_link_with_what_it_was_given() {
        let runtime = Runtime::new(RuntimeSettings::default(), Arc::new(crate::symbols::Symbols::new())).unwrap();
        let links = vec![
            link(&runtime, "min-volume", bundled::MIN_VOLUME, &[("min_volume", "1")]),
            link(&runtime, "outlier-filter", bundled::OUTLIER_FILTER, &[("threshold_pct", "5")]),
        ];
        let mut chain = Chain::new(7, links);
        // (price, volume in tenths)
        let input = trades(&[(100, 20), (100, 5), (150, 20), (101, 20)]);
        let out = chain.run(&input, &mut Unguarded).unwrap();
        assert_eq!(out.parsed.iter().map(|r| r.trade_id).collect::<Vec<_>>(), [0, 3]);
        assert!(out.parsed.iter().all(|r| r.source_id == 7));
        assert_eq!(out.rejects.len(), 1, "{:?}", out.rejects);
        let reject = &out.rejects[0];
        let version = crate::plugin::version_of(bundled::OUTLIER_FILTER);
        assert_eq!((reject.link, reject.plugin.as_str(), reject.index), (1, &*format!("outlier-filter@{version}"), 1));
        // The first link's output, stamped with the chain's source, is what the second was given.
        let given = plugin_sdk::StreamDataView::parse(Delimited::new(&input).nth(2).unwrap().unwrap()).unwrap();
        let mut stamped = Records::new();
        stamped.push(&Record { source_id: 7, ..given.record() });
        let stamped = Delimited::new(stamped.as_bytes()).next().unwrap().unwrap().to_vec();
        assert_eq!(reject.bytes, stamped, "the outlier as the second link was given it");
        assert_eq!(out.last, format!("outlier-filter@{version}"));
        // No links: the records pass as they are.
        let out = Chain::new(7, Vec::new()).run(&input, &mut Unguarded).unwrap();
        assert_eq!((out.records, out.parsed.len(), out.last.as_str()), (input, 4, ""));
    }

    /// Refuses link 1; notes each link it was asked about.
    struct Refuse(Vec<usize>);

    #[derive(Debug)]
    struct Refused(String);

    impl From<LinkError> for Refused {
        fn from(e: LinkError) -> Self {
            Refused(e.to_string())
        }
    }

    impl Hooks for Refuse {
        type Error = Refused;
        fn before(&mut self, link: usize, plugin: &PluginCode, _input: &[u8]) -> Result<(), Refused> {
            self.0.push(link);
            if link == 1 { Err(Refused(format!("{} may not run", plugin.name()))) } else { Ok(()) }
        }
    }

    /// Hooks that refuse the second link stop the chain before it runs, after the first ran.
    #[test]
    fn hooks_may_stop_the_chain_before_a_link() {
        let runtime = Runtime::new(RuntimeSettings::default(), Arc::new(crate::symbols::Symbols::new())).unwrap();
        let links = vec![
            link(&runtime, "min-volume", bundled::MIN_VOLUME, &[]),
            link(&runtime, "outlier-filter", bundled::OUTLIER_FILTER, &[]),
        ];
        let mut hooks = Refuse(Vec::new());
        let err = Chain::new(1, links).run(&trades(&[(100, 20)]), &mut hooks).unwrap_err();
        assert_eq!((err.0.as_str(), hooks.0.as_slice()), ("outlier-filter may not run", &[0, 1][..]));
    }
}
