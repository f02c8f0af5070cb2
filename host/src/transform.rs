//! Transform: a batch of records through a plugin's `transform`, never losing the batch to a failing
//! call. A trap or timeout retries the batch once (on a fresh instance), then bisects it so only the
//! records that still fail are rejected, each with the error as its reason.
//!
//! A stateful plugin's state ([`LinkState`]) is kept here as the store committed it plus what the
//! calls since changed. Every call starts from it: a fresh instance (the first, one that replaced a
//! failed call's, a newly activated version of the same state format) is handed the state before
//! its first call, and a call that failed leaves no change behind. So a retry and each step of a
//! bisection meet the state the records before them left, as in a run where nothing failed; the
//! process role drops what was not committed when it reads a poll again ([`Transformer::abandon`]).

use std::collections::BTreeMap;

use plugin_sdk::{Record, StreamDataView};
use sluice_wire::{Delimited, push_delimited};

use crate::plugin::registry::BoundPlugin;
use crate::plugin::{PluginError, PluginInstance, TransformOutput};

/// An input record the transform refused, with why; kept whole for the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRecord {
    /// Index in the batch given to [`Transformer::transform`].
    pub index: usize,
    /// The record's bytes.
    pub bytes: Vec<u8>,
    /// The plugin's reason, or the call's error.
    pub reason: String,
}

/// What a batch became.
#[derive(Debug, Default)]
pub struct TransformedBatch {
    /// Output records, length-delimited; every one parsed into `parsed`.
    pub records: Vec<u8>,
    /// The output records, parsed (and so checked to be valid `StreamData`), in order.
    pub parsed: Vec<Record>,
    /// How many output records.
    pub count: usize,
    /// Refused input records.
    pub rejects: Vec<RejectedRecord>,
    /// Failed calls (traps, timeouts, limits) on the way, retries and bisection included.
    pub failed_calls: u64,
    /// Records refused because every call that held them failed (bisected down to the record).
    pub failed_records: usize,
    /// Records in the batch.
    pub records_in: usize,
    /// The first failed call's error: for a caller that stops at a failure rather than dead-letter
    /// the records retry and bisection isolated (`sluice plugin test`).
    pub first_failure: Option<PluginError>,
    /// Retry and bisection ran past the link's time budget and were given up: the batch counts as
    /// failed entirely, whatever was isolated before.
    pub over_budget: bool,
}

impl TransformedBatch {
    /// The plugin failed as a whole: calls failed and no record got through a working call. A batch
    /// in which retry and bisection isolated the records that fail is the plugin working.
    pub fn failed_entirely(&self) -> bool {
        self.over_budget || (self.failed_calls > 0 && self.failed_records >= self.records_in)
    }

    /// Writes `source_id` into every output record, as decode stamps the records it makes: a link
    /// runs in one source's chain, and whatever source id it wrote, its records are that source's.
    /// The records are written again only when a link changed an id.
    pub fn stamp_source(&mut self, source_id: u32) {
        if self.parsed.iter().all(|r| r.source_id == source_id) {
            return;
        }
        let mut records = plugin_sdk::Records::new();
        for r in &mut self.parsed {
            r.source_id = source_id;
            records.push(r);
        }
        self.records = records.as_bytes().to_vec();
    }
}

/// A link's state as the host keeps it: the entries the store committed, the entries as the calls
/// since left them, and what changed in between (what the next commit writes).
#[derive(Clone, Debug, Default)]
pub struct LinkState {
    /// The state format of the entries (`name@version`); `None` while no stateful version ran.
    format: Option<String>,
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
    current: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Keys changed since the last commit, with their value now (`None`: removed).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The committed entries no longer count (a version of another format took over, or an empty
    /// start was asked for): the next commit deletes the link's stored entries first.
    reset: bool,
    /// The keys of the committed entries a reset dropped: a store that deletes entries one by one (a
    /// changelog) deletes these.
    dropped: std::collections::BTreeSet<Vec<u8>>,
    /// Bytes of keys and values in `current`.
    bytes: usize,
}

impl LinkState {
    /// The state a store committed: `entries` in `format`.
    pub fn committed(format: String, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        let committed: BTreeMap<Vec<u8>, Vec<u8>> = entries.into_iter().collect();
        let bytes = committed.iter().map(|(k, v)| k.len() + v.len()).sum();
        LinkState { format: Some(format), current: committed.clone(), committed, bytes, ..LinkState::default() }
    }

    /// The format of the entries.
    pub fn format(&self) -> Option<&str> {
        self.format.as_deref()
    }

    /// Bytes of keys and values the state holds now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The entries as the last successful call left them.
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.current.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// What the next commit writes: whether to delete the stored entries first, and the changed keys.
    pub fn pending(&self) -> (bool, &BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        (self.reset, &self.pending)
    }

    /// The keys of the stored entries the next commit deletes because of a reset (see
    /// [`pending`](Self::pending)).
    pub fn dropped(&self) -> &std::collections::BTreeSet<Vec<u8>> {
        &self.dropped
    }

    /// True when a commit has something of this link's to write.
    pub fn is_dirty(&self) -> bool {
        self.reset || !self.pending.is_empty()
    }

    /// Starts empty in `format`, dropping the committed entries at the next commit.
    pub fn reset(&mut self, format: Option<String>) {
        let mut dropped = std::mem::take(&mut self.dropped);
        dropped.extend(std::mem::take(&mut self.committed).into_keys());
        *self = LinkState { format, reset: true, dropped, ..LinkState::default() };
    }

    /// The size the state would have with `changes` applied.
    fn bytes_after(&self, changes: &crate::plugin::StateChanges) -> usize {
        // Each key comes once in a call's changes (its value as the call left it).
        let mut bytes = self.bytes;
        for (key, value) in changes {
            if let Some(old) = self.current.get(key) {
                bytes = bytes.saturating_sub(key.len() + old.len());
            }
            if let Some(v) = value {
                bytes += key.len() + v.len();
            }
        }
        bytes
    }

    fn apply(&mut self, changes: crate::plugin::StateChanges) {
        for (key, value) in changes {
            let old = match &value {
                Some(v) => {
                    self.bytes += key.len() + v.len();
                    self.current.insert(key.clone(), v.clone())
                }
                None => self.current.remove(&key),
            };
            if let Some(old) = old {
                self.bytes = self.bytes.saturating_sub(key.len() + old.len());
            }
            self.pending.insert(key, value);
        }
    }

    /// The store committed `pending`: it is the committed state now.
    pub fn commit(&mut self) {
        if self.reset {
            self.committed.clear();
            self.dropped.clear();
            self.reset = false;
        }
        for (key, value) in std::mem::take(&mut self.pending) {
            match value {
                Some(v) => self.committed.insert(key, v),
                None => self.committed.remove(&key),
            };
        }
    }

    /// What was not committed is dropped: the records it came from will be read again.
    fn abandon(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.clear();
        self.current = self.committed.clone();
        self.bytes = self.current.iter().map(|(k, v)| k.len() + v.len()).sum();
    }
}

/// How long the retry and bisection of one failed batch may take by default.
pub const DEFAULT_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs batches through one plugin, switching to a newly activated version between batches.
pub struct Transformer {
    plugin: BoundPlugin,
    /// How long the retry and bisection of one failed batch may take before the batch is given up.
    budget: std::time::Duration,
    state: LinkState,
    /// The slot's state epoch this link's state belongs to (an operator's empty start bumps it).
    epoch: u64,
}

impl Transformer {
    /// A transformer over a plugin instance that is never swapped.
    pub fn new(plugin: PluginInstance) -> Self {
        Transformer::bound(BoundPlugin::fixed(plugin))
    }

    /// A transformer over a registry slot: each batch runs on the slot's active version (and its
    /// shadow version beside it, compared and never delivered).
    pub fn bound(plugin: BoundPlugin) -> Self {
        let format = plugin.code_format();
        let epoch = plugin.state_epoch();
        Transformer { plugin, budget: DEFAULT_BUDGET, state: LinkState { format, ..LinkState::default() }, epoch }
    }

    /// Gives up retrying and bisecting a failed batch after `budget` (the default is
    /// [`DEFAULT_BUDGET`]): a link whose every call times out costs its source that long per
    /// batch, not a call per record.
    pub fn with_budget(mut self, budget: std::time::Duration) -> Self {
        self.budget = budget;
        self
    }

    /// Starts from the state a store committed for this link: kept when its format is the running
    /// version's, dropped (at the next commit) otherwise.
    pub fn load_state(&mut self, state: LinkState) {
        let running = self.plugin.code_format();
        if state.format.is_some() && state.format == running {
            self.state = state;
        } else {
            if state.format.is_some() {
                tracing::warn!(plugin = self.plugin.code().name(), stored = ?state.format, running = ?running, "the stored state is of another format; the link starts empty");
            }
            // The stored entries' keys go with the reset, for a store that deletes them one by one.
            self.state = state;
            self.state.reset(running);
        }
        self.plugin.instance().discard();
    }

    /// The link's state.
    pub fn state(&self) -> &LinkState {
        &self.state
    }

    /// The link's state, to mark it committed after the store wrote it.
    pub fn state_mut(&mut self) -> &mut LinkState {
        &mut self.state
    }

    /// Drops what changed since the last commit: the records it came from are read again, and the
    /// next call starts from the committed state.
    pub fn abandon(&mut self) {
        if self.plugin.instance().state_format().is_some() && !self.state.pending.is_empty() {
            self.state.abandon();
            self.plugin.instance().discard();
        }
    }

    /// The configuration the link's plugin runs with.
    pub fn config(&self) -> &[(String, String)] {
        self.plugin.config()
    }

    /// The plugin version the last batch ran on (the one the next batch starts from).
    pub fn plugin(&self) -> &crate::plugin::PluginCode {
        self.plugin.code()
    }

    /// Transforms a length-delimited batch. Only a plugin that cannot be instantiated at all makes
    /// this fail; then nothing of the batch is consumed.
    ///
    /// # Errors
    /// [`PluginError`] that is not a failure of a single call (the plugin cannot run).
    pub fn transform(&mut self, batch: &[u8]) -> Result<TransformedBatch, PluginError> {
        // Between batches: the version activated since the last one takes over here, with the state
        // when it keeps the same format, empty otherwise.
        let before = std::sync::Arc::as_ptr(self.plugin.code());
        self.plugin.sync();
        let epoch = self.plugin.state_epoch();
        if !std::ptr::eq(before, std::sync::Arc::as_ptr(self.plugin.code())) || epoch != self.epoch {
            let format = self.plugin.code_format();
            if epoch != self.epoch {
                tracing::info!(
                    plugin = self.plugin.code().name(),
                    "an empty state was asked for; the link's state starts empty"
                );
                self.state.reset(format);
                self.plugin.instance().discard();
                self.epoch = epoch;
            } else if format != self.state.format {
                tracing::info!(plugin = self.plugin.code().name(), from = ?self.state.format, to = ?format, "the new version keeps another state format; its state starts empty");
                self.state.reset(format);
            }
        }
        let mut out = TransformedBatch::default();
        // The batch goes in as it is; it is split into records only if the call fails.
        match self.call(batch, &mut out.parsed) {
            Ok(t) => {
                let count = Delimited::new(batch).count();
                self.plugin.code().transform_metrics().records_in.inc_by(count as u64);
                out.records_in = count;
                out.records = t.records;
                out.count = t.count;
                if !t.rejects.is_empty() {
                    let items: Vec<&[u8]> = Delimited::new(batch).filter_map(Result::ok).collect();
                    out.rejects = t
                        .rejects
                        .into_iter()
                        .map(|r| RejectedRecord {
                            index: r.index as usize,
                            bytes: items.get(r.index as usize).map(|b| b.to_vec()).unwrap_or_default(),
                            reason: r.reason,
                        })
                        .collect();
                }
            }
            Err(e) if e.is_call_failure() => {
                out.failed_calls += 1;
                out.first_failure = Some(e);
                let items: Vec<&[u8]> = Delimited::new(batch).filter_map(Result::ok).collect();
                self.plugin.code().transform_metrics().records_in.inc_by(items.len() as u64);
                out.records_in = items.len();
                let deadline = std::time::Instant::now() + self.budget;
                self.run(&items, 0, false, deadline, &mut out)?;
            }
            Err(e) => return Err(e),
        }
        let state = &self.state;
        if let Some((shadow, instance)) = self.plugin.shadow() {
            let result = instance.and_then(|i| {
                // Counted by the stage, as the active version's are, so a shadow's records in and
                // out compare.
                shadow.code().transform_metrics().records_in.inc_by(out.records_in as u64);
                // A shadow runs on a copy of the state: handed it when it starts, its changes
                // never kept.
                if i.needs_state() && i.state_format() == state.format() {
                    i.restore_state(&state.entries()).ok()?;
                }
                let t = i.transform(batch).ok();
                let _ = i.take_state_changes();
                t
            });
            shadow.compare(
                crate::handoff::Stage::Transform,
                &out.records,
                result.as_ref().map(|t| t.records.as_slice()),
            );
            let worked = result.is_some();
            self.plugin.shadow_outcome(worked);
        }
        Ok(out)
    }

    /// One call; its output records are parsed into `parsed` (the one check of their contents: see
    /// [`TransformOutput`]). A record that does not parse fails the call as invalid output, the
    /// instance is replaced and nothing of the call is kept.
    fn call(&mut self, batch: &[u8], parsed: &mut Vec<Record>) -> Result<TransformOutput, PluginError> {
        let instance = self.plugin.instance();
        if instance.needs_state() {
            instance.restore_state(&self.state.entries())?;
        }
        let t = instance.transform(batch)?;
        let mark = parsed.len();
        parsed.reserve(t.count);
        for (i, item) in Delimited::new(&t.records).enumerate() {
            match item.and_then(StreamDataView::parse) {
                Ok(view) => parsed.push(view.record()),
                Err(e) => {
                    parsed.truncate(mark);
                    self.plugin.instance().discard();
                    self.plugin.code().transform_metrics().limit_errors.inc();
                    return Err(PluginError::InvalidOutput(format!("output record {i}: {e}")));
                }
            }
        }
        // The call's state changes, kept only once the whole call succeeded.
        let instance = self.plugin.instance();
        if instance.state_format().is_some() {
            let changes = match instance.take_state_changes() {
                Ok(changes) => changes,
                Err(e) => {
                    parsed.truncate(mark);
                    return Err(e);
                }
            };
            let limit = self.plugin.code().limits().state_bytes;
            let len = self.state.bytes_after(&changes);
            if len > limit {
                parsed.truncate(mark);
                self.plugin.instance().discard();
                self.plugin.code().transform_metrics().limit_errors.inc();
                return Err(PluginError::StateTooLarge { len, limit });
            }
            self.state.apply(changes);
        }
        Ok(t)
    }

    /// Runs `items` (starting at batch index `base`); on a call failure retries once if `retry`, then
    /// splits in halves, and rejects a single record that still fails.
    fn run(
        &mut self,
        items: &[&[u8]],
        base: usize,
        retry: bool,
        deadline: std::time::Instant,
        out: &mut TransformedBatch,
    ) -> Result<(), PluginError> {
        if items.is_empty() || out.over_budget {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                plugin = self.plugin.code().name(),
                failed_calls = out.failed_calls,
                "retry and bisection ran past the link's time budget; the batch is given up"
            );
            out.over_budget = true;
            return Ok(());
        }
        let mut buf = Vec::new();
        for item in items {
            push_delimited(&mut buf, item);
        }
        match self.call(&buf, &mut out.parsed) {
            Ok(t) => {
                out.records.extend_from_slice(&t.records);
                out.count += t.count;
                for r in t.rejects {
                    let i = r.index as usize;
                    out.rejects.push(RejectedRecord {
                        index: base + i,
                        bytes: items.get(i).map(|b| b.to_vec()).unwrap_or_default(),
                        reason: r.reason,
                    });
                }
                Ok(())
            }
            Err(e) if e.is_call_failure() => {
                out.failed_calls += 1;
                if retry {
                    return self.run(items, base, false, deadline, out);
                }
                if items.len() == 1 {
                    out.failed_records += 1;
                    out.rejects.push(RejectedRecord { index: base, bytes: items[0].to_vec(), reason: e.to_string() });
                    out.first_failure.get_or_insert(e);
                    return Ok(());
                }
                out.first_failure.get_or_insert(e);
                let mid = items.len() / 2;
                self.run(&items[..mid], base, false, deadline, out)?;
                self.run(&items[mid..], base + mid, false, deadline, out)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use plugin_sdk::{Record, Records, StreamDataView};
    use sluice_wire::Delimited;

    use super::{LinkState, TransformedBatch};

    #[test]
    fn stamping_writes_the_chains_source_into_every_record() {
        let mut written = Records::new();
        let parsed: Vec<Record> = [2u32, 0, 1]
            .iter()
            .enumerate()
            .map(|(i, &source_id)| Record { source_id, trade_id: i as u64, ..Record::default() })
            .collect();
        for r in &parsed {
            written.push(r);
        }
        let mut out = TransformedBatch { records: written.as_bytes().to_vec(), parsed, ..TransformedBatch::default() };
        out.stamp_source(1);
        let read: Vec<(u32, u64)> = Delimited::new(&out.records)
            .map(|item| item.and_then(StreamDataView::parse).map(|v| (v.source_id, v.trade_id)).unwrap())
            .collect();
        assert_eq!(read, [(1, 0), (1, 1), (1, 2)]);
        assert!(out.parsed.iter().all(|r| r.source_id == 1));
    }

    /// A reset names the stored keys it drops (for a changelog's tombstones) until a commit wrote it;
    /// a second reset before that keeps naming them.
    #[test]
    fn a_reset_names_the_stored_keys_until_committed() {
        let entries = vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())];
        let mut state = LinkState::committed("f@1".into(), entries);
        assert!(state.dropped().is_empty());
        state.reset(Some("g@1".into()));
        state.reset(Some("h@1".into()));
        let keys: Vec<&[u8]> = state.dropped().iter().map(Vec::as_slice).collect();
        assert_eq!(keys, [b"a", b"b"]);
        assert!(state.pending().0);
        state.commit();
        assert!(state.dropped().is_empty() && !state.pending().0);
    }
}
