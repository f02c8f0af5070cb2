//! Transform: a batch of records through a plugin's `transform`, never losing the batch to a failing
//! call. A trap or timeout retries the batch once (on a fresh instance), then bisects it so only the
//! records that still fail are rejected, each with the error as its reason.

use plugin_sdk::wire::{Delimited, push_delimited};
use plugin_sdk::{Record, StreamDataView};

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
}

impl TransformedBatch {
    /// The plugin failed as a whole: calls failed and no record got through a working call. A batch
    /// in which retry and bisection isolated the records that fail is the plugin working.
    pub fn failed_entirely(&self) -> bool {
        self.failed_calls > 0 && self.failed_records >= self.records_in
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

/// Runs batches through one plugin, switching to a newly activated version between batches.
pub struct Transformer {
    plugin: BoundPlugin,
}

impl Transformer {
    /// A transformer over a plugin instance that is never swapped.
    pub fn new(plugin: PluginInstance) -> Self {
        Transformer { plugin: BoundPlugin::fixed(plugin) }
    }

    /// A transformer over a registry slot: each batch runs on the slot's active version (and its
    /// shadow version beside it, compared and never delivered).
    pub fn bound(plugin: BoundPlugin) -> Self {
        Transformer { plugin }
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
        // Between batches: the version activated since the last one takes over here.
        self.plugin.sync();
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
                let items: Vec<&[u8]> = Delimited::new(batch).filter_map(Result::ok).collect();
                self.plugin.code().transform_metrics().records_in.inc_by(items.len() as u64);
                out.records_in = items.len();
                self.run(&items, 0, false, &mut out)?;
            }
            Err(e) => return Err(e),
        }
        if let Some((shadow, instance)) = self.plugin.shadow() {
            let result = instance.and_then(|i| {
                // Counted by the stage, as the active version's are, so a shadow's records in and
                // out compare.
                shadow.code().transform_metrics().records_in.inc_by(out.records_in as u64);
                i.transform(batch).ok()
            });
            shadow.compare(crate::log::Stage::Transform, &out.records, result.as_ref().map(|t| t.records.as_slice()));
        }
        Ok(out)
    }

    /// One call; its output records are parsed into `parsed` (the one check of their contents: see
    /// [`TransformOutput`]). A record that does not parse fails the call as invalid output, the
    /// instance is replaced and nothing of the call is kept.
    fn call(&mut self, batch: &[u8], parsed: &mut Vec<Record>) -> Result<TransformOutput, PluginError> {
        let t = self.plugin.instance().transform(batch)?;
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
        Ok(t)
    }

    /// Runs `items` (starting at batch index `base`); on a call failure retries once if `retry`, then
    /// splits in halves, and rejects a single record that still fails.
    fn run(
        &mut self,
        items: &[&[u8]],
        base: usize,
        retry: bool,
        out: &mut TransformedBatch,
    ) -> Result<(), PluginError> {
        if items.is_empty() {
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
                    return self.run(items, base, false, out);
                }
                if items.len() == 1 {
                    out.failed_records += 1;
                    out.rejects.push(RejectedRecord { index: base, bytes: items[0].to_vec(), reason: e.to_string() });
                    return Ok(());
                }
                let mid = items.len() / 2;
                self.run(&items[..mid], base, false, out)?;
                self.run(&items[mid..], base + mid, false, out)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use plugin_sdk::wire::Delimited;
    use plugin_sdk::{Record, Records, StreamDataView};

    use super::TransformedBatch;

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
}
