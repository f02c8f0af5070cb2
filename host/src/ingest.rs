//! The ingest role: each source task reads its feed and `try_send`s frames into the queue of the
//! decode worker that owns the source (`source id % workers`, so one worker sees all of a source's
//! frames and its trade-id state), bounded in frames and in bytes. A worker drains what is queued
//! (up to `max_frames_per_call` frames and `max_bytes_per_call` bytes), decodes it with one plugin
//! call per plugin binding, and hands the records to the hand-off writer (Kafka, or the local log);
//! refused frames are dead-lettered.
//!
//! What a worker hands over for one drained queue goes as one [`Handover`]: the records, the dead
//! letters of the same frames, and the marks they move (each symbol's recent trade ids, each file
//! source's position). On the local log they commit together, and a start restores the decoders'
//! trade ids and the file sources' positions from them ([`Ingest::start_with_ids`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{SourceConfig, SourceKind};
pub use crate::decode::DecodeStats;
use crate::decode::{Decoder, RejectedFrame};
use crate::handoff::marks::{FileIdentity, FileMark, Marks};
use crate::handoff::{DeadLetter, Handover, Stage, Writer};
use crate::plugin::registry::{BoundPlugin, Slot};
use crate::plugin::{PluginError, PluginInstance};
use crate::source::queue::{self, FrameReceiver};
use crate::source::{self, ConnectLimiter, Frame, SourceStats};

/// Tuning of the ingest role.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// Decode worker threads.
    pub workers: usize,
    /// Frames each worker's queue holds before sources start dropping (and counting) them.
    pub queue_frames: usize,
    /// Bytes of frames each worker's queue holds before sources start dropping them.
    pub queue_bytes: usize,
    /// Most frames decoded in one plugin call.
    pub max_frames_per_call: usize,
    /// Most bytes of frames decoded in one plugin call (a larger frame goes alone).
    pub max_bytes_per_call: usize,
    /// Minimum spacing of connection attempts to one host.
    pub connect_interval: Duration,
}

impl From<&crate::config::IngestConfig> for IngestSettings {
    fn from(c: &crate::config::IngestConfig) -> Self {
        IngestSettings {
            workers: c.workers,
            queue_frames: c.queue_frames,
            queue_bytes: c.queue_bytes,
            max_frames_per_call: c.max_frames_per_call,
            max_bytes_per_call: c.max_bytes_per_call,
            connect_interval: Duration::from_millis(c.connect_interval_ms),
        }
    }
}

impl Default for IngestSettings {
    fn default() -> Self {
        // The `[ingest]` table's defaults (one worker per core).
        IngestSettings::from(&crate::config::IngestConfig::default())
    }
}

/// A running source, as the API and metrics see it.
pub struct SourceHandle {
    /// Its configuration.
    pub config: Arc<SourceConfig>,
    /// Its id (records carry it as `source_id`).
    pub id: u32,
    /// Connection counters.
    pub stats: Arc<SourceStats>,
    /// Decode counters.
    pub decode: Arc<DecodeStats>,
    /// The plugin version the worker decoding this source runs.
    pub running: Arc<crate::plugin::registry::Running>,
}

/// Why ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A source names a plugin that is not loaded.
    #[error("source {source_name:?} uses plugin {plugin:?}, which is not loaded")]
    UnknownPlugin {
        /// The source.
        source_name: String,
        /// The plugin it names.
        plugin: String,
    },
    /// A source's configuration is invalid.
    #[error("{0}")]
    Source(String),
    /// A file source's recording cannot be read, or changed since it was read.
    #[error(transparent)]
    File(#[from] source::file::FileError),
    /// A plugin could not start with a source's configuration.
    #[error("plugin {plugin:?} for source {source_name:?}: {error}")]
    Plugin {
        /// The source.
        source_name: String,
        /// The plugin.
        plugin: String,
        /// What failed.
        error: PluginError,
    },
}

/// The running ingest role.
pub struct Ingest {
    sources: Vec<SourceHandle>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

/// One (plugin, plugin config) pair: sources sharing it share a plugin instance per worker.
#[derive(Clone)]
struct DecoderBinding {
    plugin: Arc<Slot>,
    config: Vec<(String, String)>,
}

/// What [`Ingest::start_with_ids`] settles before anything runs: the decoder bindings, which one
/// each source uses, and where each file source starts.
struct Plan {
    /// Distinct (plugin, plugin config) pairs.
    bindings: Vec<DecoderBinding>,
    /// The binding of each source, by its index.
    binding_of: Vec<usize>,
    /// Where each file source resumes (`None` for a WebSocket source), by its index.
    file_starts: Vec<Option<source::file::FileStart>>,
    /// Decode worker threads.
    workers: usize,
}

impl Plan {
    /// Checks every source, binds each to its decoder's (plugin, config) pair, and finds where each
    /// file source resumes from what the hand-off kept.
    fn new(
        sources: &[SourceConfig],
        ids: &[u32],
        plugins: &HashMap<String, Arc<Slot>>,
        marks: &Marks,
        workers: usize,
    ) -> Result<Self, IngestError> {
        let mut bindings: Vec<DecoderBinding> = Vec::new();
        let mut binding_of: Vec<usize> = Vec::new();
        let mut index: BTreeMap<(String, Vec<(String, String)>), usize> = BTreeMap::new();
        for s in sources {
            s.validate().map_err(IngestError::Source)?;
            let plugin = plugins
                .get(&s.decode)
                .ok_or_else(|| IngestError::UnknownPlugin { source_name: s.name.clone(), plugin: s.decode.clone() })?;
            let config = s.decode_pairs();
            let next = bindings.len();
            let b = *index.entry((s.decode.clone(), config.clone())).or_insert(next);
            if b == next {
                bindings.push(DecoderBinding { plugin: plugin.clone(), config });
            }
            binding_of.push(b);
        }
        let mut file_starts = Vec::with_capacity(sources.len());
        for (s, id) in sources.iter().zip(ids) {
            file_starts.push(match s.kind {
                SourceKind::File => Some(source::file::resume(s, marks.files.iter().find(|m| m.source == *id))?),
                SourceKind::Websocket => None,
            });
        }
        Ok(Plan { bindings, binding_of, file_starts, workers })
    }

    /// Each worker's own instance of each binding its sources use (a worker owns the sources whose
    /// id modulo the workers is its index), each starting from its sources' recent trade ids; every
    /// one is checked to start before anything runs.
    fn decoders(
        &self,
        sources: &[SourceConfig],
        ids: &[u32],
        marks: &Marks,
    ) -> Result<Vec<HashMap<usize, Decoder>>, IngestError> {
        let (workers, binding_of) = (self.workers, &self.binding_of);
        let mut decoders = Vec::new();
        for w in 0..workers {
            let mut mine = HashMap::new();
            let used = |b: usize| ids.iter().zip(binding_of).any(|(id, &x)| x == b && *id as usize % workers == w);
            for (b, binding) in self.bindings.iter().enumerate().filter(|(b, _)| used(*b)) {
                let code = binding.plugin.active();
                let instance = PluginInstance::new(&code, &binding.config).map_err(|error| {
                    let source = binding_of.iter().position(|&x| x == b).map(|i| sources[i].name.clone());
                    IngestError::Plugin {
                        source_name: source.unwrap_or_default(),
                        plugin: code.name().to_owned(),
                        error,
                    }
                })?;
                let mut decoder = Decoder::bound(BoundPlugin::new(binding.plugin.clone(), instance));
                // The trade ids of the sources this binding decodes on this worker.
                decoder.restore(marks.trades.iter().filter(|m| {
                    ids.iter()
                        .position(|id| *id == m.source)
                        .is_some_and(|i| binding_of[i] == b && m.source as usize % workers == w)
                }));
                mine.insert(b, decoder);
            }
            decoders.push(mine);
        }
        Ok(decoders)
    }

    /// Starts a decode thread per worker with its queue; returns the queues' senders (by worker)
    /// and the threads.
    fn spawn_workers(
        &self,
        decoders: Vec<HashMap<usize, Decoder>>,
        handles: &[SourceHandle],
        producer: &Arc<Writer>,
        settings: &IngestSettings,
    ) -> Result<(Vec<queue::FrameSender>, Vec<JoinHandle<()>>), IngestError> {
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (w, decoders) in decoders.into_iter().enumerate() {
            let (tx, rx) = queue::channel(settings.queue_frames, settings.queue_bytes);
            senders.push(tx);
            // The sources this worker decodes, by id.
            let sources = handles
                .iter()
                .enumerate()
                .filter(|(_, h)| h.id as usize % self.workers == w)
                .map(|(i, h)| {
                    let known = Known {
                        binding: self.binding_of[i],
                        name: h.config.name.clone(),
                        plugin: h.config.decode.clone(),
                        stats: h.decode.clone(),
                        file: self.file_starts[i].as_ref().map(|f| f.identity.clone()),
                    };
                    (h.id, known)
                })
                .collect();
            let ctx = WorkerContext {
                sources,
                producer: producer.clone(),
                max_frames: settings.max_frames_per_call.max(1),
                max_bytes: settings.max_bytes_per_call.max(1),
            };
            let thread = std::thread::Builder::new()
                .name(format!("sluice-decode-{w}"))
                .spawn(move || decode_worker(rx, decoders, ctx))
                .map_err(|e| IngestError::Source(format!("cannot start a decode thread: {e}")))?;
            threads.push(thread);
        }
        Ok((senders, threads))
    }
}

impl Ingest {
    /// Starts every source and the decode workers. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`IngestError`] for an invalid source, an unknown plugin or a plugin whose `init` refuses a
    /// source's configuration; nothing is left running then. Each plugin runs from its registry
    /// [`Slot`], so a version activated later takes over between batches.
    pub fn start(
        sources: Vec<SourceConfig>,
        plugins: &HashMap<String, Arc<Slot>>,
        producer: Arc<Writer>,
        settings: IngestSettings,
    ) -> Result<Self, IngestError> {
        let ids: Vec<u32> = (1..=sources.len() as u32).collect();
        Ingest::start_with_ids(sources, &ids, plugins, producer, settings, &Marks::default())
    }

    /// [`start`](Self::start) with each source's id given (`ids[i]` for `sources[i]`, non-zero and
    /// distinct): the ids records carry, stable per source name across restarts and config edits
    /// (see [`Symbols::source_id`](crate::symbols::Symbols::source_id)), and what the hand-off kept
    /// (`marks`): each decoder starts from its sources' recent trade ids, so what an earlier run
    /// delivered is recognised, and each file source from its position.
    ///
    /// # Errors
    /// As [`start`](Self::start), for ids that are 0 or repeated, and for a file source whose
    /// recording cannot be read or changed since it was read ([`IngestError::File`]).
    pub fn start_with_ids(
        sources: Vec<SourceConfig>,
        ids: &[u32],
        plugins: &HashMap<String, Arc<Slot>>,
        producer: Arc<Writer>,
        settings: IngestSettings,
        marks: &Marks,
    ) -> Result<Self, IngestError> {
        let workers = settings.workers.max(1);
        let distinct: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
        if ids.len() != sources.len() || distinct.len() != ids.len() || distinct.contains(&0) {
            return Err(IngestError::Source(format!("source ids {ids:?} are not one distinct non-zero id per source")));
        }
        let plan = Plan::new(&sources, ids, plugins, marks, workers)?;
        let decoders = plan.decoders(&sources, ids, marks)?;
        let (stop, stop_rx) = watch::channel(false);
        let handles: Vec<SourceHandle> = sources
            .into_iter()
            .enumerate()
            .map(|(i, config)| {
                let id = ids[i];
                // The worker that owns this source, and its decoder of the source's binding.
                let running = decoders[id as usize % workers][&plan.binding_of[i]].running();
                SourceHandle {
                    config: Arc::new(config),
                    id,
                    stats: Arc::new(SourceStats::default()),
                    decode: Arc::new(DecodeStats::default()),
                    running,
                }
            })
            .collect();
        let (senders, workers) = plan.spawn_workers(decoders, &handles, &producer, &settings)?;
        let limiter = Arc::new(ConnectLimiter::new(settings.connect_interval));
        let tasks = handles
            .iter()
            .zip(&plan.file_starts)
            .map(|(h, file)| {
                let out = senders[h.id as usize % senders.len()].clone();
                let (config, stats, stop) = (h.config.clone(), h.stats.clone(), stop_rx.clone());
                match h.config.kind {
                    SourceKind::File => tokio::spawn(source::file::replay(
                        config,
                        h.id,
                        file.as_ref().map_or(0, |f| f.offset),
                        out,
                        stats,
                        stop,
                    )),
                    SourceKind::Websocket => tokio::spawn(source::run(config, h.id, out, stats, limiter.clone(), stop)),
                }
            })
            .collect();
        Ok(Ingest { sources: handles, stop, tasks, workers })
    }

    /// The running sources.
    pub fn sources(&self) -> &[SourceHandle] {
        &self.sources
    }

    /// Stops the sources, lets the workers decode what is queued, and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // The sources' senders are gone now, so each worker drains its queue and ends.
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
    }
}

struct WorkerContext {
    /// The sources this worker decodes, by id: a map, since ids come from the symbol dictionary and
    /// can be large (a table sized by the largest id could take gigabytes).
    sources: HashMap<u32, Known>,
    producer: Arc<Writer>,
    max_frames: usize,
    max_bytes: usize,
}

/// What a decode worker knows of one of its sources.
struct Known {
    /// The decoder binding that decodes it.
    binding: usize,
    /// Its name and its decode plugin's, for dead letters.
    name: String,
    plugin: String,
    stats: Arc<DecodeStats>,
    /// A file source's recording, named in its position marks.
    file: Option<FileIdentity>,
}

impl WorkerContext {
    fn stats(&self, source: u32) -> Option<&DecodeStats> {
        self.sources.get(&source).map(|k| &*k.stats)
    }

    fn binding(&self, source: u32) -> Option<usize> {
        self.sources.get(&source).map(|k| k.binding)
    }
}

/// What one drained queue hands over: records, refused frames and the marks they move.
#[derive(Default)]
struct Outgoing {
    records: Vec<u8>,
    rejects: Vec<RejectedFrame>,
    marks: Marks,
}

impl Outgoing {
    /// Refuses a frame, counted for its source.
    fn reject(&mut self, frame: &Frame, reason: String, ctx: &WorkerContext) {
        self.rejects.push(RejectedFrame { source: frame.source, bytes: frame.bytes.clone(), reason });
        if let Some(s) = ctx.stats(frame.source) {
            s.rejects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands everything over in one piece and starts empty again.
    fn send(&mut self, ctx: &WorkerContext) {
        let letters: Vec<DeadLetter<'_>> = self
            .rejects
            .iter()
            .map(|r| {
                let (source, plugin) =
                    ctx.sources.get(&r.source).map_or(("", ""), |k| (k.name.as_str(), k.plugin.as_str()));
                DeadLetter {
                    stage: Stage::Decode,
                    source_id: r.source,
                    source,
                    plugin,
                    reason: &r.reason,
                    bytes: &r.bytes,
                }
            })
            .collect();
        let marks = std::mem::take(&mut self.marks);
        ctx.producer.send_handover(Handover { records: &self.records, dead: &letters, marks });
        drop(letters);
        self.records.clear();
        self.rejects.clear();
    }
}

/// Takes the next batch off the queue into `batch`: the frame `carry` kept (or the next one, waiting
/// for it), then what is queued, up to `max_frames` frames and `max_bytes` bytes (at least one
/// frame). A frame that would pass `max_bytes` is kept in `carry` for the next batch. False once the
/// queue is closed and empty.
fn next_batch(
    rx: &mut FrameReceiver,
    carry: &mut Option<Frame>,
    batch: &mut Vec<Frame>,
    max_frames: usize,
    max_bytes: usize,
) -> bool {
    batch.clear();
    let Some(first) = carry.take().or_else(|| rx.blocking_recv()) else { return false };
    let mut bytes = first.bytes.len();
    batch.push(first);
    while batch.len() < max_frames {
        let Some(next) = rx.try_recv() else { break };
        bytes += next.bytes.len();
        if bytes > max_bytes {
            *carry = Some(next);
            break;
        }
        batch.push(next);
    }
    true
}

fn decode_worker(mut rx: FrameReceiver, mut decoders: HashMap<usize, Decoder>, ctx: WorkerContext) {
    let mut queued: Vec<Frame> = Vec::with_capacity(ctx.max_frames);
    let mut group: Vec<Frame> = Vec::with_capacity(ctx.max_frames);
    let mut carry = None;
    let mut out = Outgoing::default();
    while next_batch(&mut rx, &mut carry, &mut queued, ctx.max_frames, ctx.max_bytes) {
        // The furthest line of each file source this pass delivers (as records or dead letters).
        for f in queued.iter().filter(|f| f.file_offset > 0) {
            let Some(identity) = ctx.sources.get(&f.source).and_then(|k| k.file.as_ref()) else { continue };
            match out.marks.files.iter_mut().find(|m| m.source == f.source) {
                Some(m) => m.offset = m.offset.max(f.file_offset),
                None => out.marks.files.push(FileMark {
                    source: f.source,
                    identity: identity.clone(),
                    offset: f.file_offset,
                }),
            }
        }
        // Frames over the size limit are dead-lettered as they are, never decoded.
        queued.retain(|f| match f.oversized {
            None => true,
            Some(len) => {
                let reason =
                    format!("frame of {len} bytes exceeds max_frame_bytes (kept: the first {} bytes)", f.bytes.len());
                out.reject(f, reason, &ctx);
                false
            }
        });
        // One call per binding, frames in arrival order within it.
        let mut bindings: Vec<usize> = queued.iter().filter_map(|f| ctx.binding(f.source)).collect();
        bindings.sort_unstable();
        bindings.dedup();
        for b in bindings {
            group.clear();
            group.extend(queued.iter().filter(|f| ctx.binding(f.source) == Some(b)).cloned());
            if let Some(decoder) = decoders.get_mut(&b) {
                // A panic here must not end the worker silently (its sources would stop for good):
                // the group's frames are dead-lettered with the panic's message, logged at ERROR,
                // and the worker goes on with the next frames.
                let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    decode_group(decoder, &group, &mut out, &ctx);
                }));
                if let Err(panic) = decoded {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(frames = group.len(), panic = %message, "a decode worker panicked; its frames are dead-lettered");
                    for f in &group {
                        out.reject(f, format!("the decode worker panicked: {message}"), &ctx);
                    }
                }
                decoder.take_marks(&mut out.marks.trades);
            }
        }
        out.send(&ctx);
    }
}

/// Decodes one group into `out`; if the call fails (trap, timeout, limit), decodes frame by frame so
/// only the frames that fail are dead-lettered, with the error as the reason.
fn decode_group(decoder: &mut Decoder, frames: &[Frame], out: &mut Outgoing, ctx: &WorkerContext) {
    match decoder.decode(frames) {
        Ok(decoded) => {
            out.records.extend_from_slice(decoded.records.as_bytes());
            out.rejects.extend(decoded.rejects);
            for &(source, symbol) in &decoded.gap_changes {
                if let Some(s) = ctx.stats(source)
                    && let Ok(mut by_symbol) = s.gaps_by_symbol.lock()
                {
                    by_symbol.insert(symbol, decoder.trade_ids().gaps(source, symbol));
                }
            }
            // One update per source present in the batch, not per record.
            for (source, c) in &decoded.per_source {
                if let Some(s) = ctx.stats(*source) {
                    s.records.fetch_add(c.records, Ordering::Relaxed);
                    s.rejects.fetch_add(c.rejects, Ordering::Relaxed);
                    s.duplicates.fetch_add(c.duplicates, Ordering::Relaxed);
                    s.gaps.fetch_add(c.gaps, Ordering::Relaxed);
                    s.resets.fetch_add(c.resets, Ordering::Relaxed);
                    s.gaps.fetch_sub(c.late.min(s.gaps.load(Ordering::Relaxed)), Ordering::Relaxed);
                    s.downtime_gaps.fetch_add(c.downtime_gaps, Ordering::Relaxed);
                    let late = c.downtime_late.min(s.downtime_gaps.load(Ordering::Relaxed));
                    s.downtime_gaps.fetch_sub(late, Ordering::Relaxed);
                }
            }
        }
        Err(e) if frames.len() > 1 => {
            tracing::warn!(error = %e, frames = frames.len(), "decode call failed; retrying frame by frame");
            for f in frames {
                decode_group(decoder, std::slice::from_ref(f), out, ctx);
            }
        }
        Err(e) => {
            if let Some(f) = frames.first() {
                out.reject(f, e.to_string(), ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Frame {
        Frame::filler(len)
    }

    /// A backlog of large frames is decoded in calls of at most `max_bytes_per_call` (one frame
    /// when a single frame is larger), not `max_frames_per_call` frames whatever their size: 256
    /// frames of 1 MiB exceed a plugin's 64 MiB.
    #[test]
    fn a_batch_is_bounded_in_bytes_as_well_as_frames() {
        let (tx, mut rx) = queue::channel(1024, 1 << 30);
        for len in [1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 6 << 20, 100, 100, 100] {
            tx.try_send(frame(len)).unwrap();
        }
        drop(tx);
        let (mut carry, mut batch, mut sizes) = (None, Vec::new(), Vec::new());
        while next_batch(&mut rx, &mut carry, &mut batch, 2, 4 << 20) {
            sizes.push(batch.iter().map(|f| f.bytes.len() >> 10).collect::<Vec<_>>());
        }
        let mib = 1 << 10;
        let want: [&[usize]; 6] = [&[mib, mib], &[mib, mib], &[mib], &[6 * mib], &[0, 0], &[0]];
        assert_eq!(sizes, want.map(<[usize]>::to_vec));
    }
}
