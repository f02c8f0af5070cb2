//! Transform: a batch of records through a plugin's `transform`, never losing the batch to a failing
//! call. A trap or timeout retries the batch once (on a fresh instance), then bisects it so only the
//! records that still fail are rejected, each with the error as its reason.

use plugin_sdk::wire::{Delimited, push_delimited};

use crate::plugin::{PluginError, PluginInstance};

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
    /// Output records, length-delimited (the runtime validated them).
    pub records: Vec<u8>,
    /// How many output records.
    pub count: usize,
    /// Refused input records.
    pub rejects: Vec<RejectedRecord>,
    /// Failed calls (traps, timeouts, limits) on the way, retries and bisection included.
    pub failed_calls: u64,
}

/// Runs batches through one plugin instance.
pub struct Transformer {
    plugin: PluginInstance,
}

impl Transformer {
    /// A transformer over a plugin instance.
    pub fn new(plugin: PluginInstance) -> Self {
        Transformer { plugin }
    }

    /// The plugin it runs.
    pub fn plugin(&self) -> &crate::plugin::PluginCode {
        self.plugin.code()
    }

    /// Transforms a length-delimited batch. Only a plugin that cannot be instantiated at all makes
    /// this fail; then nothing of the batch is consumed.
    ///
    /// # Errors
    /// [`PluginError`] that is not a failure of a single call (the plugin cannot run).
    pub fn transform(&mut self, batch: &[u8]) -> Result<TransformedBatch, PluginError> {
        let mut out = TransformedBatch::default();
        let items: Vec<&[u8]> = Delimited::new(batch).filter_map(Result::ok).collect();
        self.run(&items, 0, true, &mut out)?;
        Ok(out)
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
        match self.plugin.transform(&buf) {
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
