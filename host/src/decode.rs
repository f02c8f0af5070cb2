//! Decode: raw frames through a source's plugin into stamped records, with the venue's trade ids
//! used to drop duplicates (a rotation's overlap, a venue's replay after reconnect) and to count gaps.

use std::collections::HashMap;

/// Maps keyed by (source, symbol) ids, looked up for every record: a fast non-cryptographic hash
/// (the ids come from the dictionary, not from the venue, so nothing here can be flooded).
type IdMap<V> = HashMap<(u32, u32), V, rustc_hash::FxBuildHasher>;

use plugin_sdk::{Record, Records};
use sluice_wire::{Delimited, StreamDataView, push_delimited};

use crate::handoff::marks::{TRADE_WINDOW, TradeMark, WINDOW_WORDS};
use crate::plugin::registry::BoundPlugin;
use crate::plugin::{PluginError, PluginInstance};
use crate::source::Frame;

/// What the decode stage counts per source.
#[derive(Debug, Default)]
pub struct DecodeStats {
    /// Records decoded and sent on.
    pub records: std::sync::atomic::AtomicU64,
    /// Frames the plugin refused (dead-lettered).
    pub rejects: std::sync::atomic::AtomicU64,
    /// Records dropped as duplicates by trade id.
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Trade ids missing so far (a late arrival that fills a hole takes it back off).
    pub gaps: std::sync::atomic::AtomicU64,
    /// Trade-id sequences started again: an id too far from the last one to be a gap or a replay.
    pub resets: std::sync::atomic::AtomicU64,
    /// Trade ids the venue sent while sluice was down, found missing at each symbol's first new id
    /// after a start (a late arrival, say in the venue's snapshot, takes it back off).
    pub downtime_gaps: std::sync::atomic::AtomicU64,
    /// The same, per symbol id: symbols never become metric labels, so the API reads them here.
    /// Locked once per batch that changes a gap, never per record.
    pub gaps_by_symbol: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
}

impl DecodeStats {
    /// The source's counters for a scrape: its connection's (`connection`) and these.
    pub fn sample(&self, connection: &crate::source::SourceStats) -> crate::telemetry::SourceSample {
        use std::sync::atomic::Ordering::Relaxed;
        crate::telemetry::SourceSample {
            frames: connection.frames.load(Relaxed),
            dropped: connection.dropped.load(Relaxed),
            reconnects: connection.reconnects.load(Relaxed),
            write_timeouts: connection.write_timeouts.load(Relaxed),
            up: connection.state() == crate::source::State::Up,
            finished: connection.state() == crate::source::State::Finished,
            last_message_us: connection.last_message_us.load(Relaxed),
            records: self.records.load(Relaxed),
            rejects: self.rejects.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            resets: self.resets.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            downtime_gaps: self.downtime_gaps.load(Relaxed),
        }
    }
}

/// What [`TradeIds::observe`] decided about a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Newer than anything seen for its symbol; `gap` ids were skipped since the last one.
    New {
        /// How many consecutive ids are missing before this one.
        gap: u64,
    },
    /// The first new id after a restart restored the symbol's ids from the log: `gap` ids were
    /// sent by the venue while sluice was down (or its connection was not yet up).
    Resumed {
        /// How many consecutive ids are missing before this one.
        gap: u64,
    },
    /// Older than the newest id but not seen before: it arrived late (say, on the other
    /// connection during a rotation, or in a venue's snapshot after a restart) and fills a hole
    /// counted earlier.
    Late {
        /// The hole was one a restart found ([`Seen::Resumed`]), not a venue's.
        downtime: bool,
    },
    /// Seen before: a duplicate.
    Duplicate,
    /// The venue sends no trade ids (0), so nothing can be said.
    Untracked,
    /// So far from the newest id (more than [`RESET_DISTANCE`] either way) that it cannot be a gap
    /// or a replay: the venue restarted its numbering, or sent one corrupt id. A new sequence
    /// starts here.
    Reset,
}

/// An id this far from the newest one (either way) starts a new sequence instead of counting as
/// that many gaps or as a duplicate.
pub const RESET_DISTANCE: u64 = 1_000_000;

/// How far back (in ids) late arrivals are recognised; older ones count as duplicates.
const WINDOW: u64 = TRADE_WINDOW;

/// The ids seen recently for one symbol.
#[derive(Clone, Debug)]
struct Recent {
    /// The newest id and the window below it: what the log keeps for this symbol.
    mark: TradeMark,
    /// Restored from the log at start, and no newer id seen since: the next new id's gap is the
    /// downtime's.
    restored: bool,
    /// The ids (exclusive bounds) found missing at the first new id after a restore: a late arrival
    /// within them fills a downtime hole.
    downtime: Option<(u64, u64)>,
    /// Changed since the last [`TradeIds::take_marks`].
    dirty: bool,
}

impl Recent {
    fn starting_at(source: u32, symbol: u32, id: u64) -> Self {
        let mut mark = TradeMark { source, symbol, last: id, seen: Box::new([0; WINDOW_WORDS]) };
        mark.add(id);
        Recent { mark, restored: false, downtime: None, dirty: true }
    }
}

/// Recent trade ids per (source, symbol): drops duplicates and counts gaps, tolerating the
/// reordering two overlapping connections cause. Restored from the log at start
/// ([`restore`](Self::restore)), it also recognises what an earlier run delivered.
#[derive(Debug, Default)]
pub struct TradeIds {
    recent: IdMap<Recent>,
    /// Ids currently missing per (source, symbol), for the API (symbols never become metric labels).
    gaps: IdMap<u64>,
    /// Ids found missing at the first new id after a restart, per (source, symbol).
    downtime: IdMap<u64>,
    /// Keys whose window changed since the last [`take_marks`](Self::take_marks).
    dirty: Vec<(u32, u32)>,
}

impl TradeIds {
    /// Starts from what the log kept: each symbol's newest id and window, so a restart recognises
    /// what was delivered before it and counts what the venue sent meanwhile as downtime.
    pub fn restore<'a>(&mut self, marks: impl IntoIterator<Item = &'a TradeMark>) {
        for m in marks {
            self.recent
                .insert((m.source, m.symbol), Recent { mark: m.clone(), restored: true, downtime: None, dirty: false });
        }
    }

    /// Records `trade_id` for the symbol and says whether it is new, late, a duplicate or untracked.
    pub fn observe(&mut self, source: u32, symbol: u32, trade_id: u64) -> Seen {
        if trade_id == 0 {
            return Seen::Untracked;
        }
        let key = (source, symbol);
        let Some(r) = self.recent.get_mut(&key) else {
            self.recent.insert(key, Recent::starting_at(source, symbol, trade_id));
            self.dirty.push(key);
            return Seen::New { gap: 0 };
        };
        if !std::mem::replace(&mut r.dirty, true) {
            self.dirty.push(key);
        }
        let last = r.mark.last;
        if trade_id.abs_diff(last) > RESET_DISTANCE {
            *r = Recent::starting_at(source, symbol, trade_id);
            return Seen::Reset;
        }
        if trade_id > last {
            let gap = trade_id - last - 1;
            r.mark.add(trade_id);
            if std::mem::take(&mut r.restored) {
                if gap > 0 {
                    r.downtime = Some((last, trade_id));
                    let g = self.downtime.entry(key).or_insert(0);
                    *g = g.saturating_add(gap);
                }
                return Seen::Resumed { gap };
            }
            if gap > 0 {
                let g = self.gaps.entry(key).or_insert(0);
                *g = g.saturating_add(gap);
            }
            return Seen::New { gap };
        }
        if last - trade_id >= WINDOW || r.mark.was_seen(trade_id) {
            return Seen::Duplicate;
        }
        r.mark.add(trade_id);
        let downtime = r.downtime.is_some_and(|(after, before)| after < trade_id && trade_id < before);
        let holes = if downtime { &mut self.downtime } else { &mut self.gaps };
        if let Some(g) = holes.get_mut(&key) {
            *g = g.saturating_sub(1);
        }
        Seen::Late { downtime }
    }

    /// Trade ids currently missing for a source's symbol.
    pub fn gaps(&self, source: u32, symbol: u32) -> u64 {
        self.gaps.get(&(source, symbol)).copied().unwrap_or(0)
    }

    /// Trade ids a restart found missing for a source's symbol (sent while sluice was down), less
    /// those that arrived late since.
    pub fn downtime_gaps(&self, source: u32, symbol: u32) -> u64 {
        self.downtime.get(&(source, symbol)).copied().unwrap_or(0)
    }

    /// Appends the windows changed since the last call to `out`: what the log keeps with the batch
    /// that changed them. One copy per symbol changed, never per record.
    pub fn take_marks(&mut self, out: &mut Vec<TradeMark>) {
        for key in self.dirty.drain(..) {
            if let Some(r) = self.recent.get_mut(&key) {
                r.dirty = false;
                out.push(r.mark.clone());
            }
        }
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

/// Counts of one source within a decoded batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCounts {
    /// Records kept.
    pub records: u64,
    /// Frames refused.
    pub rejects: u64,
    /// Records dropped as duplicates of ones already seen.
    pub duplicates: u64,
    /// Trade ids found missing.
    pub gaps: u64,
    /// Late records that filled a hole counted before (take them off the gaps).
    pub late: u64,
    /// Trade-id sequences started again ([`Seen::Reset`]).
    pub resets: u64,
    /// Trade ids found missing at a symbol's first new id after a start ([`Seen::Resumed`]).
    pub downtime_gaps: u64,
    /// Late records that filled one of those (take them off).
    pub downtime_late: u64,
}

/// The result of decoding a batch of frames.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    /// New records, stamped with `source_id` and `received_at_us`, length-delimited.
    pub records: Records,
    /// Frames the plugin refused.
    pub rejects: Vec<RejectedFrame>,
    /// Counts per source id present in the batch (a batch holds few sources: a list, not a map).
    pub per_source: Vec<(u32, SourceCounts)>,
    /// (source, symbol) pairs whose gap count changed in this batch.
    pub gap_changes: Vec<(u32, u32)>,
}

impl DecodedBatch {
    /// The counts of `source`, created on first use.
    fn counts(&mut self, source: u32) -> &mut SourceCounts {
        let i = match self.per_source.iter().position(|(s, _)| *s == source) {
            Some(i) => i,
            None => {
                self.per_source.push((source, SourceCounts::default()));
                self.per_source.len() - 1
            }
        };
        &mut self.per_source[i].1
    }

    /// The counts of all sources added up.
    pub fn total(&self) -> SourceCounts {
        self.per_source.iter().fold(SourceCounts::default(), |a, (_, c)| SourceCounts {
            records: a.records + c.records,
            rejects: a.rejects + c.rejects,
            duplicates: a.duplicates + c.duplicates,
            gaps: a.gaps + c.gaps,
            late: a.late + c.late,
            resets: a.resets + c.resets,
            downtime_gaps: a.downtime_gaps + c.downtime_gaps,
            downtime_late: a.downtime_late + c.downtime_late,
        })
    }
}

/// How long an overlap's id-less records are remembered for: the overlap lasts a second after the
/// new connection delivers, and a replacement connects first.
const OVERLAP_MEMORY_US: i64 = 10_000_000;

/// The contents of id-less records read during connection overlaps, per (source, symbol): a record
/// the other connection already delivered is a duplicate. Only overlap frames are looked at, so two
/// genuinely identical trades on one connection both count.
#[derive(Debug, Default)]
struct OverlapContents {
    recent: IdMap<std::collections::VecDeque<(u64, i64)>>,
}

impl OverlapContents {
    /// True when the same content was seen during the overlap already; remembers it otherwise.
    fn seen(&mut self, r: &Record) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (r.price_e8, r.volume_e8, r.timestamp_ms, r.is_buy).hash(&mut h);
        let key = h.finish();
        let recent = self.recent.entry((r.source_id, r.symbol_id)).or_default();
        while recent.front().is_some_and(|(_, at)| r.received_at_us - at > OVERLAP_MEMORY_US) {
            recent.pop_front();
        }
        if let Some(i) = recent.iter().position(|(k, _)| *k == key) {
            // Each copy stands for one delivery on the other connection: matched once.
            recent.remove(i);
            return true;
        }
        recent.push_back((key, r.received_at_us));
        false
    }
}

/// Decodes frames of the sources bound to one plugin instance.
pub struct Decoder {
    plugin: BoundPlugin,
    ids: TradeIds,
    overlaps: OverlapContents,
    /// Reused to frame the inputs.
    frames: Vec<u8>,
    /// Reused for one frame's records.
    parsed: Vec<Record>,
}

impl Decoder {
    /// A decoder over a plugin instance that is never swapped.
    pub fn new(plugin: PluginInstance) -> Self {
        Decoder::bound(BoundPlugin::fixed(plugin))
    }

    /// A decoder over a registry slot: each batch runs on the slot's active version (and its shadow
    /// version beside it, compared and never delivered).
    pub fn bound(plugin: BoundPlugin) -> Self {
        Decoder {
            plugin,
            ids: TradeIds::default(),
            overlaps: OverlapContents::default(),
            frames: Vec::new(),
            parsed: Vec::new(),
        }
    }

    /// The version this decoder's instance runs, for the API.
    pub fn running(&self) -> std::sync::Arc<crate::plugin::registry::Running> {
        self.plugin.running()
    }

    /// The trade-id tracker (for gap counts).
    pub fn trade_ids(&self) -> &TradeIds {
        &self.ids
    }

    /// Starts the trade-id tracker from what the log kept (see [`TradeIds::restore`]).
    pub fn restore<'a>(&mut self, marks: impl IntoIterator<Item = &'a TradeMark>) {
        self.ids.restore(marks);
    }

    /// The trade-id windows changed since the last call, for the log to keep with the records that
    /// changed them.
    pub fn take_marks(&mut self, out: &mut Vec<TradeMark>) {
        self.ids.take_marks(out);
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
        // Between batches: the version activated since the last one takes over here.
        self.plugin.sync();
        let decoded = self.plugin.instance().decode(&self.frames)?;
        if let Some((shadow, instance)) = self.plugin.shadow() {
            let result = instance.and_then(|i| i.decode(&self.frames).ok());
            shadow.compare(
                crate::handoff::Stage::Decode,
                &decoded.records,
                result.as_ref().map(|d| d.records.as_slice()),
            );
            self.plugin.shadow_outcome(result.is_some());
        }
        // Names the host refused are answered 0 as well: say why (per call; a call's refusals
        // cannot be told apart by frame).
        let refused = self.plugin.instance().take_refused_symbols();
        // Worded only when a frame needs it: most calls refuse nothing.
        let mut reason: Option<String> = None;
        let mut out = DecodedBatch::default();
        let mut records = Delimited::new(&decoded.records);
        for (frame, &count) in frames.iter().zip(&decoded.counts) {
            // The frame's records, parsed once.
            self.parsed.clear();
            let mut unnamed = false;
            for item in records.by_ref().take(count as usize) {
                // The runtime validated the plugin's output before returning it.
                let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
                unnamed |= view.symbol_id == 0;
                self.parsed.push(view.record());
            }
            // A record without a symbol id: the dictionary could not name its symbol (the plugin
            // does not cache that, so the next frame asks again). Refused, never decoded under 0.
            if unnamed {
                out.counts(frame.source).rejects += 1;
                out.rejects.push(RejectedFrame {
                    source: frame.source,
                    bytes: frame.bytes.clone(),
                    reason: reason.get_or_insert_with(|| unnamed_reason(refused, self.plugin.code())).clone(),
                });
                continue;
            }
            track(&mut self.ids, &mut self.overlaps, &self.parsed, frame, &mut out);
        }
        for reject in decoded.rejects {
            if let Some(frame) = frames.get(reject.index as usize) {
                out.counts(frame.source).rejects += 1;
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

/// Counts each of a frame's `parsed` records against its symbol's trade-id window (a duplicate,
/// a gap, a reset, a late record) and keeps those that are not duplicates in `out`. During an
/// overlap of two connections a record without a venue id is known by its content.
fn track(ids: &mut TradeIds, overlaps: &mut OverlapContents, parsed: &[Record], frame: &Frame, out: &mut DecodedBatch) {
    for parsed in parsed {
        let record = Record { source_id: frame.source, received_at_us: frame.received_at_us, ..*parsed };
        let mut seen = ids.observe(record.source_id, record.symbol_id, record.trade_id);
        // No venue id: during an overlap, the other connection's copy is known by content.
        if seen == Seen::Untracked && frame.overlap && overlaps.seen(&record) {
            seen = Seen::Duplicate;
        }
        if matches!(seen, Seen::New { gap: 1.. } | Seen::Resumed { gap: 1.. } | Seen::Late { .. }) {
            let key = (record.source_id, record.symbol_id);
            if !out.gap_changes.contains(&key) {
                out.gap_changes.push(key);
            }
        }
        let counts = out.counts(frame.source);
        match seen {
            Seen::Duplicate => counts.duplicates += 1,
            Seen::New { gap } => counts.gaps = counts.gaps.saturating_add(gap),
            Seen::Reset => counts.resets += 1,
            Seen::Resumed { gap } => counts.downtime_gaps = counts.downtime_gaps.saturating_add(gap),
            Seen::Late { downtime: false } => counts.late += 1,
            Seen::Late { downtime: true } => counts.downtime_late += 1,
            Seen::Untracked => {}
        }
        if seen != Seen::Duplicate {
            counts.records += 1;
            out.records.push(&record);
        }
    }
}

/// Why a frame whose record carries no symbol id was refused, given the names the host refused in
/// the call.
fn unnamed_reason(refused: crate::plugin::RefusedSymbols, code: &crate::plugin::PluginCode) -> String {
    let (name, limits) = (code.name(), code.limits());
    let too_long = format!(
        "a record names a symbol longer than {} bytes ([plugins.{name}] max_symbol_bytes)",
        limits.max_symbol_bytes
    );
    let over_quota = format!(
        "a record names a new symbol past the plugin's quota of {} symbols ([plugins.{name}] max_symbols)",
        limits.max_symbols
    );
    match (refused.too_long > 0, refused.over_quota > 0) {
        (true, false) => too_long,
        (false, true) => over_quota,
        (true, true) => format!("{too_long}, or {}", over_quota.trim_start_matches("a record names ")),
        (false, false) => "a record names no symbol: the symbol dictionary could not be reached".to_owned(),
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
        assert_eq!(ids.observe(1, 1, 10), Seen::Duplicate);
        assert_eq!(ids.observe(1, 1, 15), Seen::New { gap: 3 });
        // Another symbol, and the same symbol on another source, are separate sequences.
        assert_eq!(ids.observe(1, 2, 100), Seen::New { gap: 0 });
        assert_eq!(ids.observe(2, 1, 3), Seen::New { gap: 0 });
        assert_eq!(ids.observe(1, 1, 0), Seen::Untracked);
        assert_eq!(ids.gaps(1, 1), 3);
        assert_eq!(ids.gaps(1, 2), 0);
    }

    #[test]
    fn late_arrivals_fill_holes_once() {
        let mut ids = TradeIds::default();
        ids.observe(1, 1, 100);
        // The new connection delivers 103 before the old one's 101 and 102 are read.
        assert_eq!(ids.observe(1, 1, 103), Seen::New { gap: 2 });
        assert_eq!(ids.observe(1, 1, 101), Seen::Late { downtime: false });
        assert_eq!(ids.observe(1, 1, 102), Seen::Late { downtime: false });
        assert_eq!(ids.observe(1, 1, 102), Seen::Duplicate);
        assert_eq!(ids.observe(1, 1, 103), Seen::Duplicate);
        assert_eq!(ids.gaps(1, 1), 0);
        // Far beyond the window: what falls out of it counts as seen.
        assert_eq!(ids.observe(1, 1, 103 + 2 * WINDOW), Seen::New { gap: 2 * WINDOW - 1 });
        assert_eq!(ids.observe(1, 1, 104), Seen::Duplicate);
        assert_eq!(ids.observe(1, 1, 103 + 2 * WINDOW - 5), Seen::Late { downtime: false });
        // Slots reused after the window slides are cleared, not stale.
        let mut ids = TradeIds::default();
        for id in 1..=10 * WINDOW {
            assert_eq!(ids.observe(2, 2, id), Seen::New { gap: 0 });
        }
        assert_eq!(ids.observe(2, 2, 10 * WINDOW + 2), Seen::New { gap: 1 });
        assert_eq!(ids.observe(2, 2, 10 * WINDOW + 1), Seen::Late { downtime: false });
    }

    #[test]
    fn a_restored_window_drops_what_was_delivered_and_counts_the_downtime() {
        // A run delivers 1..=100 of symbol 7 with 50 missing, and keeps its marks.
        let mut before = TradeIds::default();
        for id in (1..=100).filter(|id| *id != 50) {
            before.observe(1, 7, id);
        }
        let mut marks = Vec::new();
        before.take_marks(&mut marks);
        assert_eq!(marks.len(), 1);
        before.take_marks(&mut marks);
        assert_eq!(marks.len(), 1, "nothing changed since: no mark");
        // The next run starts from them. The venue's snapshot repeats 91..=100 newest first, then
        // trades resume at 106: 101..=105 were sent while sluice was down.
        let mut after = TradeIds::default();
        after.restore(&marks);
        for id in (91..=100).rev() {
            assert_eq!(after.observe(1, 7, id), Seen::Duplicate, "id {id}");
        }
        assert_eq!(after.observe(1, 7, 106), Seen::Resumed { gap: 5 });
        assert_eq!((after.gaps(1, 7), after.downtime_gaps(1, 7)), (0, 5));
        // A snapshot older than the resumed trade fills downtime holes, not venue gaps.
        assert_eq!(after.observe(1, 7, 104), Seen::Late { downtime: true });
        assert_eq!(after.downtime_gaps(1, 7), 4);
        // The hole the earlier run found is the venue's: filling it is not downtime.
        assert_eq!(after.observe(1, 7, 50), Seen::Late { downtime: false });
        assert_eq!(after.observe(1, 7, 107), Seen::New { gap: 0 });
        assert_eq!(after.observe(1, 7, 109), Seen::New { gap: 1 });
        assert_eq!(after.gaps(1, 7), 1);
        // Another symbol has no mark: it starts afresh, counting nothing.
        assert_eq!(after.observe(1, 8, 5_000), Seen::New { gap: 0 });
        let mut changed = Vec::new();
        after.take_marks(&mut changed);
        let keys: Vec<(u32, u32, u64)> = changed.iter().map(|m| (m.source, m.symbol, m.last)).collect();
        assert_eq!(keys, [(1, 7, 109), (1, 8, 5_000)]);
    }

    #[test]
    fn an_id_far_outside_the_window_starts_a_new_sequence() {
        let mut ids = TradeIds::default();
        ids.observe(1, 1, 1_000);
        // One corrupt, huge id: counted as a reset, not as billions of gaps.
        assert_eq!(ids.observe(1, 1, u64::MAX - 7), Seen::Reset);
        assert_eq!(ids.gaps(1, 1), 0);
        // The venue's real ids go on; they start a sequence again rather than being duplicates.
        assert_eq!(ids.observe(1, 1, 1_001), Seen::Reset);
        assert_eq!(ids.observe(1, 1, 1_002), Seen::New { gap: 0 });
        assert_eq!(ids.observe(1, 1, 1_002), Seen::Duplicate);
        // Two huge jumps in a row do not overflow the gap count (a debug build would panic).
        assert_eq!(ids.observe(1, 1, u64::MAX / 2), Seen::Reset);
        assert_eq!(ids.observe(1, 1, u64::MAX), Seen::Reset);
        // A venue that restarts its numbering from 1.
        let mut ids = TradeIds::default();
        ids.observe(2, 1, 50_000_000);
        assert_eq!(ids.observe(2, 1, 1), Seen::Reset);
        assert_eq!(ids.observe(2, 1, 2), Seen::New { gap: 0 });
        // A jump within the reset distance is still a gap, and an old id within it a duplicate.
        assert_eq!(ids.observe(2, 1, 2 + RESET_DISTANCE), Seen::New { gap: RESET_DISTANCE - 1 });
        assert_eq!(ids.observe(2, 1, 3), Seen::Duplicate);
    }
}
