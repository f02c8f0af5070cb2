//! Decode: raw frames through a source's plugin into stamped records, with the venue's trade ids
//! used to drop duplicates (a rotation's overlap, a venue's replay after reconnect) and to count gaps.

use std::collections::HashMap;

use plugin_sdk::wire::{Delimited, StreamDataView, push_delimited};
use plugin_sdk::{Record, Records};

use crate::plugin::{PluginError, PluginInstance};
use crate::source::Frame;

/// What [`TradeIds::observe`] decided about a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Newer than anything seen for its symbol; `gap` ids were skipped since the last one.
    New {
        /// How many consecutive ids are missing before this one.
        gap: u64,
    },
    /// Not newer than the last id seen for its symbol: a duplicate.
    Duplicate,
    /// The venue sends no trade ids (0), so nothing can be said.
    Untracked,
}

/// The last trade id per (source, symbol).
#[derive(Debug, Default)]
pub struct TradeIds {
    last: HashMap<(u32, u32), u64>,
    /// Missing ids per (source, symbol), for the API (symbols never become metric labels).
    gaps: HashMap<(u32, u32), u64>,
}

impl TradeIds {
    /// Records `trade_id` for the symbol and says whether it is new, a duplicate or untracked.
    pub fn observe(&mut self, source: u32, symbol: u32, trade_id: u64) -> Seen {
        if trade_id == 0 {
            return Seen::Untracked;
        }
        let last = self.last.entry((source, symbol)).or_insert(0);
        if *last == 0 {
            *last = trade_id;
            return Seen::New { gap: 0 };
        }
        if trade_id <= *last {
            return Seen::Duplicate;
        }
        let gap = trade_id - *last - 1;
        *last = trade_id;
        if gap > 0 {
            *self.gaps.entry((source, symbol)).or_insert(0) += gap;
        }
        Seen::New { gap }
    }

    /// Missing trade ids seen so far for a source's symbol.
    pub fn gaps(&self, source: u32, symbol: u32) -> u64 {
        self.gaps.get(&(source, symbol)).copied().unwrap_or(0)
    }
}

/// A frame the plugin refused, with its reason, kept whole for the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedFrame {
    /// The frame.
    pub source: u32,
    /// Its bytes.
    pub bytes: bytes::Bytes,
    /// The plugin's reason.
    pub reason: String,
}

/// The result of decoding a batch of frames.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    /// New records, stamped with `source_id` and `received_at_us`, length-delimited.
    pub records: Records,
    /// Frames the plugin refused.
    pub rejects: Vec<RejectedFrame>,
    /// Records dropped as duplicates of ones already seen.
    pub duplicates: u64,
    /// Trade ids found missing in this batch.
    pub gaps: u64,
}

/// Decodes frames of the sources bound to one plugin instance.
pub struct Decoder {
    plugin: PluginInstance,
    ids: TradeIds,
    /// Reused to frame the inputs.
    frames: Vec<u8>,
}

impl Decoder {
    /// A decoder over a plugin instance.
    pub fn new(plugin: PluginInstance) -> Self {
        Decoder { plugin, ids: TradeIds::default(), frames: Vec::new() }
    }

    /// The trade-id tracker (for gap counts).
    pub fn trade_ids(&self) -> &TradeIds {
        &self.ids
    }

    /// Decodes `frames` in one plugin call.
    ///
    /// # Errors
    /// The plugin's [`PluginError`] when the call fails; nothing of the batch is returned then.
    pub fn decode(&mut self, frames: &[Frame]) -> Result<DecodedBatch, PluginError> {
        self.frames.clear();
        for f in frames {
            push_delimited(&mut self.frames, &f.bytes);
        }
        let decoded = self.plugin.decode(&self.frames)?;
        let mut out = DecodedBatch::default();
        let mut records = Delimited::new(&decoded.records);
        for (frame, &count) in frames.iter().zip(&decoded.counts) {
            for item in records.by_ref().take(count as usize) {
                // The runtime validated the plugin's output before returning it.
                let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
                let record = Record { source_id: frame.source, received_at_us: frame.received_at_us, ..view.record() };
                match self.ids.observe(record.source_id, record.symbol_id, record.trade_id) {
                    Seen::Duplicate => out.duplicates += 1,
                    Seen::New { gap } => {
                        out.gaps += gap;
                        out.records.push(&record);
                    }
                    Seen::Untracked => out.records.push(&record),
                }
            }
        }
        for reject in decoded.rejects {
            if let Some(frame) = frames.get(reject.index as usize) {
                out.rejects.push(RejectedFrame {
                    source: frame.source,
                    bytes: frame.bytes.clone(),
                    reason: reject.reason,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_dropped_and_gaps_counted_per_symbol() {
        let mut ids = TradeIds::default();
        assert_eq!(ids.observe(1, 1, 10), Seen::New { gap: 0 });
        assert_eq!(ids.observe(1, 1, 11), Seen::New { gap: 0 });
        assert_eq!(ids.observe(1, 1, 11), Seen::Duplicate);
        assert_eq!(ids.observe(1, 1, 9), Seen::Duplicate);
        assert_eq!(ids.observe(1, 1, 15), Seen::New { gap: 3 });
        // Another symbol, and the same symbol on another source, are separate sequences.
        assert_eq!(ids.observe(1, 2, 100), Seen::New { gap: 0 });
        assert_eq!(ids.observe(2, 1, 3), Seen::New { gap: 0 });
        assert_eq!(ids.observe(1, 1, 0), Seen::Untracked);
        assert_eq!(ids.gaps(1, 1), 3);
        assert_eq!(ids.gaps(1, 2), 0);
    }
}
