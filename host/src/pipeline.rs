//! The one place that wires the stages together.
//!
//! Ingest: each source task reads its feed and `try_send`s frames into the bounded queue of the decode
//! worker that owns the source (`source id % workers`, so one worker sees all of a source's frames
//! and its trade-id state). A worker drains what is queued (up to `max_frames_per_call`), decodes it
//! with one plugin call per plugin binding, and hands the records to the hand-off writer (Kafka, or the local log); refused
//! frames are dead-lettered.
//!
//! Process: [`run_process`] reads the events topic from the offsets the store holds, runs each
//! source's records through its chain of transforms, batches the rows adaptively and writes them to the embedded store
//! together with the offsets they came from.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::batch::{BatchConfig, Batcher, FlushReason};
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::config::{SourceConfig, SourceKind};
pub use crate::decode::DecodeStats;
use crate::decode::{Decoder, RejectedFrame};
use crate::log::kafka::consumer::Polled;
use crate::log::{Reader, Stage, Writer};
use crate::plugin::PluginError;
use crate::plugin::registry::{BoundPlugin, Slot};
use crate::sink::{Row, Sink};
use crate::source::{self, ConnectLimiter, Frame, SourceStats};
use crate::telemetry::health::Health;
use crate::transform::Transformer;

/// Tuning of the ingest role.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// Decode worker threads.
    pub workers: usize,
    /// Frames each worker's queue holds before sources start dropping (and counting) them.
    pub queue_frames: usize,
    /// Most frames decoded in one plugin call.
    pub max_frames_per_call: usize,
    /// Minimum spacing of connection attempts to one host.
    pub connect_interval: Duration,
}

impl From<&crate::config::IngestConfig> for IngestSettings {
    fn from(c: &crate::config::IngestConfig) -> Self {
        IngestSettings {
            workers: c.workers,
            queue_frames: c.queue_frames,
            max_frames_per_call: c.max_frames_per_call,
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
struct Binding {
    plugin: Arc<Slot>,
    config: Vec<(String, String)>,
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
        Ingest::start_with_ids(sources, &ids, plugins, producer, settings)
    }

    /// [`start`](Self::start) with each source's id given (`ids[i]` for `sources[i]`, non-zero and
    /// distinct): the ids records carry, stable per source name across restarts and config edits
    /// (see [`Symbols::source_id`](crate::symbols::Symbols::source_id)).
    ///
    /// # Errors
    /// As [`start`](Self::start), and for ids that are 0 or repeated.
    pub fn start_with_ids(
        sources: Vec<SourceConfig>,
        ids: &[u32],
        plugins: &HashMap<String, Arc<Slot>>,
        producer: Arc<Writer>,
        settings: IngestSettings,
    ) -> Result<Self, IngestError> {
        let workers = settings.workers.max(1);
        let distinct: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
        if ids.len() != sources.len() || distinct.len() != ids.len() || distinct.contains(&0) {
            return Err(IngestError::Source(format!("source ids {ids:?} are not one distinct non-zero id per source")));
        }
        // Bindings, and which binding each source uses.
        let mut bindings: Vec<Binding> = Vec::new();
        let mut binding_of: Vec<usize> = Vec::new();
        let mut index: BTreeMap<(String, Vec<(String, String)>), usize> = BTreeMap::new();
        for s in &sources {
            s.validate().map_err(IngestError::Source)?;
            let plugin = plugins
                .get(&s.decode)
                .ok_or_else(|| IngestError::UnknownPlugin { source_name: s.name.clone(), plugin: s.decode.clone() })?;
            let config = s.decode_pairs();
            let next = bindings.len();
            let b = *index.entry((s.decode.clone(), config.clone())).or_insert(next);
            if b == next {
                bindings.push(Binding { plugin: plugin.clone(), config });
            }
            binding_of.push(b);
        }
        // Every worker gets its own instance of each binding; check each starts before anything runs.
        let mut decoders: Vec<HashMap<usize, Decoder>> = Vec::new();
        for _ in 0..workers {
            let mut mine = HashMap::new();
            for (b, binding) in bindings.iter().enumerate() {
                let code = binding.plugin.active();
                let instance = code.instantiate(&binding.config).map_err(|error| {
                    let source = binding_of.iter().position(|&x| x == b).map(|i| sources[i].name.clone());
                    IngestError::Plugin {
                        source_name: source.unwrap_or_default(),
                        plugin: code.name().to_owned(),
                        error,
                    }
                })?;
                mine.insert(b, Decoder::bound(BoundPlugin::new(binding.plugin.clone(), instance)));
            }
            decoders.push(mine);
        }

        let (stop, stop_rx) = watch::channel(false);
        let handles: Vec<SourceHandle> = sources
            .into_iter()
            .enumerate()
            .map(|(i, config)| {
                let id = ids[i];
                // The worker that owns this source, and its decoder of the source's binding.
                let running = decoders[id as usize % workers][&binding_of[i]].running();
                SourceHandle {
                    config: Arc::new(config),
                    id,
                    stats: Arc::new(SourceStats::default()),
                    decode: Arc::new(DecodeStats::default()),
                    running,
                }
            })
            .collect();
        let limiter = Arc::new(ConnectLimiter::new(settings.connect_interval));
        let mut senders = Vec::new();
        let mut worker_threads = Vec::new();
        for (w, decoders) in decoders.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Frame>(settings.queue_frames);
            senders.push(tx);
            // Tables indexed by `slot(id)`; ids of sources not configured here are holes.
            let size = ids.iter().copied().max().unwrap_or(0) as usize;
            let mut by_id_binding = vec![None; size];
            let mut by_id_names = vec![(String::new(), String::new()); size];
            let mut by_id_stats: Vec<Arc<DecodeStats>> = (0..size).map(|_| Arc::default()).collect();
            for (i, h) in handles.iter().enumerate() {
                by_id_binding[slot(h.id)] = Some(binding_of[i]);
                by_id_names[slot(h.id)] = (h.config.name.clone(), h.config.decode.clone());
                by_id_stats[slot(h.id)] = h.decode.clone();
            }
            let ctx = WorkerContext {
                binding_of: by_id_binding,
                names: by_id_names,
                decode_stats: by_id_stats,
                producer: producer.clone(),
                max_frames: settings.max_frames_per_call.max(1),
            };
            let thread = std::thread::Builder::new()
                .name(format!("sluice-decode-{w}"))
                .spawn(move || decode_worker(rx, decoders, ctx))
                .map_err(|e| IngestError::Source(format!("cannot start a decode thread: {e}")))?;
            worker_threads.push(thread);
        }
        let tasks = handles
            .iter()
            .map(|h| {
                let out = senders[h.id as usize % workers].clone();
                match h.config.kind {
                    SourceKind::File => tokio::spawn(source::file::replay(
                        h.config.clone(),
                        h.id,
                        out,
                        h.stats.clone(),
                        stop_rx.clone(),
                    )),
                    SourceKind::Websocket => tokio::spawn(source::run(
                        h.config.clone(),
                        h.id,
                        out,
                        h.stats.clone(),
                        limiter.clone(),
                        stop_rx.clone(),
                    )),
                }
            })
            .collect();
        Ok(Ingest { sources: handles, stop, tasks, workers: worker_threads })
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
    /// Binding index of source `id` at `slot(id)` (`None` for ids no source here has).
    binding_of: Vec<Option<usize>>,
    /// (source name, plugin name) of source `id - 1`.
    names: Vec<(String, String)>,
    decode_stats: Vec<Arc<DecodeStats>>,
    producer: Arc<Writer>,
    max_frames: usize,
}

fn decode_worker(mut rx: mpsc::Receiver<Frame>, mut decoders: HashMap<usize, Decoder>, ctx: WorkerContext) {
    let mut queued: Vec<Frame> = Vec::with_capacity(ctx.max_frames);
    let mut group: Vec<Frame> = Vec::with_capacity(ctx.max_frames);
    while let Some(first) = rx.blocking_recv() {
        queued.clear();
        queued.push(first);
        while queued.len() < ctx.max_frames {
            match rx.try_recv() {
                Ok(f) => queued.push(f),
                Err(_) => break,
            }
        }
        // Frames over the size limit are dead-lettered as they are, never decoded.
        queued.retain(|f| match f.oversized {
            None => true,
            Some(len) => {
                let reason =
                    format!("frame of {len} bytes exceeds max_frame_bytes (kept: the first {} bytes)", f.bytes.len());
                dead_letter(&RejectedFrame { source: f.source, bytes: f.bytes.clone(), reason }, &ctx);
                if let Some(s) = ctx.decode_stats.get(slot(f.source)) {
                    s.rejects.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        });
        // One call per binding, frames in arrival order within it.
        let mut bindings: Vec<usize> =
            queued.iter().filter_map(|f| ctx.binding_of.get(slot(f.source)).copied().flatten()).collect();
        bindings.sort_unstable();
        bindings.dedup();
        for b in bindings {
            group.clear();
            group.extend(queued.iter().filter(|f| ctx.binding_of.get(slot(f.source)) == Some(&Some(b))).cloned());
            if let Some(decoder) = decoders.get_mut(&b) {
                // A panic here must not end the worker silently (its sources would stop for good):
                // the group's frames are dead-lettered with the panic's message, logged at ERROR,
                // and the worker goes on with the next frames.
                let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    decode_group(decoder, &group, &ctx);
                }));
                if let Err(panic) = decoded {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(frames = group.len(), panic = %message, "a decode worker panicked; its frames are dead-lettered");
                    for f in &group {
                        let reason = format!("the decode worker panicked: {message}");
                        dead_letter(&RejectedFrame { source: f.source, bytes: f.bytes.clone(), reason }, &ctx);
                        if let Some(s) = ctx.decode_stats.get(slot(f.source)) {
                            s.rejects.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// Decodes one group; if the call fails (trap, timeout, limit), decodes frame by frame so only the
/// frames that fail are dead-lettered, with the error as the reason.
fn decode_group(decoder: &mut Decoder, frames: &[Frame], ctx: &WorkerContext) {
    match decoder.decode(frames) {
        Ok(out) => {
            ctx.producer.send_records(out.records.as_bytes());
            for r in &out.rejects {
                dead_letter(r, ctx);
            }
            for &(source, symbol) in &out.gap_changes {
                if let Some(s) = ctx.decode_stats.get(slot(source))
                    && let Ok(mut by_symbol) = s.gaps_by_symbol.lock()
                {
                    by_symbol.insert(symbol, decoder.trade_ids().gaps(source, symbol));
                }
            }
            // One update per source present in the batch, not per record.
            for (source, c) in &out.per_source {
                if let Some(s) = ctx.decode_stats.get(slot(*source)) {
                    s.records.fetch_add(c.records, Ordering::Relaxed);
                    s.rejects.fetch_add(c.rejects, Ordering::Relaxed);
                    s.duplicates.fetch_add(c.duplicates, Ordering::Relaxed);
                    s.gaps.fetch_add(c.gaps, Ordering::Relaxed);
                    s.resets.fetch_add(c.resets, Ordering::Relaxed);
                    s.gaps.fetch_sub(c.late.min(s.gaps.load(Ordering::Relaxed)), Ordering::Relaxed);
                }
            }
        }
        Err(e) if frames.len() > 1 => {
            tracing::warn!(error = %e, frames = frames.len(), "decode call failed; retrying frame by frame");
            for f in frames {
                decode_group(decoder, std::slice::from_ref(f), ctx);
            }
        }
        Err(e) => {
            if let Some(f) = frames.first() {
                let reject = RejectedFrame { source: f.source, bytes: f.bytes.clone(), reason: e.to_string() };
                dead_letter(&reject, ctx);
                if let Some(s) = ctx.decode_stats.get(slot(f.source)) {
                    s.rejects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn dead_letter(reject: &RejectedFrame, ctx: &WorkerContext) {
    let (source, plugin) =
        ctx.names.get(slot(reject.source)).map(|(s, p)| (s.as_str(), p.as_str())).unwrap_or(("", ""));
    ctx.producer.send_dead_letter(&crate::log::DeadLetter {
        stage: Stage::Decode,
        source_id: reject.source,
        source,
        plugin,
        reason: &reject.reason,
        bytes: &reject.bytes,
    });
}

/// Index of source `id` in the per-source tables (ids start at 1; 0 maps past the end).
fn slot(id: u32) -> usize {
    (id as usize).wrapping_sub(1)
}

/// Settings of the process role.
#[derive(Clone, Debug)]
pub struct ProcessSettings {
    /// Partitions of the events topic (all are assigned to this instance).
    pub partitions: i32,
    /// Most records read per poll.
    pub max_poll_records: usize,
    /// The batcher in front of the store.
    pub batch: BatchConfig,
    /// When a plugin's batches keep failing, stop calling it for a while (records wait in the log).
    pub breaker: BreakerConfig,
    /// Where the role reports the sink's and the breakers' state for `/health/ready`.
    pub health: Option<Arc<Health>>,
    /// Where batch sizes, flush reasons, commit times and end-to-end latency go.
    pub metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        ProcessSettings {
            partitions: 6,
            max_poll_records: 4096,
            batch: BatchConfig::default(),
            breaker: BreakerConfig::default(),
            health: None,
            metrics: None,
        }
    }
}

/// Why the process role stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A link of a source's chain kept failing: its breaker opened. Nothing of the batch was
    /// committed; resume (from the last commit) once [`Breakers::wait`] says the breaker lets a trial
    /// batch through.
    #[error("plugin {plugin} of source {source_name} keeps failing; its circuit breaker is open")]
    BreakerOpen {
        /// The source whose chain failed.
        source_name: String,
        /// The plugin of the link that failed.
        plugin: String,
    },
}

/// The circuit breakers of the links of the sources' chains, one per (source, link), kept across
/// restarts of the process role.
#[derive(Debug, Default)]
pub struct Breakers {
    by_link: HashMap<(u32, usize), CircuitBreaker>,
}

impl Breakers {
    fn get(&mut self, link: (u32, usize), config: &BreakerConfig) -> &mut CircuitBreaker {
        self.by_link.entry(link).or_insert_with(|| CircuitBreaker::new(config))
    }

    /// How long until every open breaker lets a trial batch through.
    pub fn wait(&self, now: std::time::Instant) -> Duration {
        self.by_link
            .values()
            .filter_map(|b| match b.state() {
                BreakerState::Open { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Sources with a link whose breaker is not closed.
    pub fn open_sources(&self) -> Vec<u32> {
        let mut open: Vec<u32> =
            self.by_link.iter().filter(|(_, b)| b.state() != BreakerState::Closed).map(|(l, _)| l.0).collect();
        open.sort_unstable();
        open.dedup();
        open
    }

    /// (source, link index) of each link whose breaker is not closed.
    pub fn open_links(&self) -> Vec<(u32, usize)> {
        let mut open: Vec<(u32, usize)> =
            self.by_link.iter().filter(|(_, b)| b.state() != BreakerState::Closed).map(|(l, _)| *l).collect();
        open.sort_unstable();
        open
    }
}

/// Counters of the process role.
#[derive(Debug, Default)]
pub struct ProcessStats {
    /// Records read from the hand-off (Kafka or the local log).
    pub consumed: AtomicU64,
    /// Rows written to the store.
    pub stored: AtomicU64,
    /// Records the transform refused (dead-lettered).
    pub rejected: AtomicU64,
    /// Failed plugin calls (each retried or bisected).
    pub failed_calls: AtomicU64,
    /// Batches flushed to the store.
    pub flushes: AtomicU64,
    /// Consumer group rebalances seen.
    pub rebalances: AtomicU64,
    /// Records in the assigned partitions not read yet (from the consumer's statistics).
    pub consumer_lag: std::sync::atomic::AtomicI64,
    /// Latency of recent batches: first row batched to the sink's commit finished.
    pub batch_latency: LatencyWindow,
    /// Each committed row's receive-to-commit latency since the last [`LatencyRecorder::take`]
    /// (for the load tool; updated once per batch).
    pub receive_to_commit: LatencyRecorder,
    /// Each sink commit's duration since the last [`LatencyRecorder::take`] (for the load tool).
    pub sink_commit: LatencyRecorder,
}

impl ProcessStats {
    /// The counters for a scrape.
    pub fn sample(&self) -> crate::telemetry::ProcessSample {
        crate::telemetry::ProcessSample {
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            rebalances: self.rebalances.load(Ordering::Relaxed),
            lag: self.consumer_lag.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Row latencies in microseconds, in an HDR histogram (1 % resolution from 1 µs to an hour), filled
/// once per batch under its lock.
#[derive(Debug)]
pub struct LatencyRecorder(std::sync::Mutex<hdrhistogram::Histogram<u64>>);

impl Default for LatencyRecorder {
    fn default() -> Self {
        // The bounds and precision are constants hdrhistogram accepts.
        LatencyRecorder(std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds"),
        ))
    }
}

impl LatencyRecorder {
    /// Records `now_us - received_at_us` for each row that has a receive time.
    fn record_rows(&self, now_us: i64, rows: &[PendingRow]) {
        let mut h = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for row in rows.iter().filter(|r| r.received_at_us > 0) {
            h.saturating_record((now_us - row.received_at_us).max(1) as u64);
        }
    }

    /// Records one duration.
    fn record(&self, d: Duration) {
        let mut h = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        h.saturating_record((d.as_micros() as u64).max(1));
    }

    /// What was recorded since the last call, emptied.
    pub fn take(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let out = h.clone();
        h.reset();
        out
    }
}

/// The most recent batch latencies (a bounded window, updated once per batch).
#[derive(Debug, Default)]
pub struct LatencyWindow {
    recent: std::sync::Mutex<std::collections::VecDeque<Duration>>,
}

impl LatencyWindow {
    const KEEP: usize = 4096;

    /// Adds one batch's latency.
    pub fn record(&self, latency: Duration) {
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.len() == Self::KEEP {
            recent.pop_front();
        }
        recent.push_back(latency);
    }

    /// The `q` quantile (0.0 to 1.0) of the window, if it holds anything.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut all: Vec<Duration> =
            self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().copied().collect();
        all.sort_unstable();
        let last = all.len().checked_sub(1)?;
        all.get(((last as f64) * q.clamp(0.0, 1.0)).round() as usize).copied()
    }
}

/// What the process role needs to name things: source names by id and the symbol dictionary.
pub struct Names {
    /// `sources[id - 1]` is the name of source `id`.
    pub sources: Vec<Arc<str>>,
    /// The dictionary the ingest role interned into.
    pub symbols: Arc<crate::symbols::Symbols>,
}

/// The process role, run on the calling thread until `stop` is set: consume, run each source's records
/// through its chain of transforms (`transformers`, by source id, links in order), batch, and commit rows together with the offsets they cover to `sink` (the embedded store
/// in one SQLite transaction, the Druid topic in one Kafka transaction). Refused records go to the
/// dead-letter topic through `dlq`.
///
/// # Errors
/// A sink or plugin failure that stops the role; nothing past the last committed batch is lost and
/// nothing before it is redone, since offsets are only committed with the rows. Start again with a
/// new consumer to resume.
#[allow(clippy::too_many_arguments)]
pub fn run_process(
    consumer: &Reader,
    transformers: &mut HashMap<u32, Vec<Transformer>>,
    breakers: &mut Breakers,
    sink: &mut dyn Sink,
    names: &Names,
    settings: &ProcessSettings,
    stats: &ProcessStats,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), anyhow::Error> {
    let topic = consumer.topic().to_owned();
    sink.attach(consumer, settings.partitions)?;
    // Attached at its committed position: a sink with nothing to do yet is ready.
    if let Some(health) = &settings.health {
        health.set("sink", true, format!("{} sink attached", sink.name()));
    }
    // Symbol names by id, so the shared dictionary is consulted once per symbol, not per record.
    let mut symbol_names: HashMap<u32, Arc<str>> = HashMap::new();
    let mut batcher = Batcher::new(settings.batch);
    let mut polled = Polled::default();
    // Rows waiting for the store, and the next offset per partition they cover.
    let mut pending: Vec<PendingRow> = Vec::new();
    let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    // Per-source input buffers, reused.
    let mut by_source: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    // Records read since the last flush (their offsets are not stored yet).
    let mut unflushed = false;
    let mut dead: Vec<DeadLetter> = Vec::new();
    // Dead letters of the polls the pending rows came from: committed with them, so exactly once.
    let mut pending_dead: Vec<DeadLetter> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        polled.clear();
        let wait = batcher
            .deadline()
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let outcome = consumer.poll_into(&mut polled, settings.max_poll_records, wait)?;
        if outcome.rebalanced {
            // Rows of the old assignment are not committed; their partitions' owners read them again.
            stats.rebalances.fetch_add(1, Ordering::Relaxed);
            pending.clear();
            pending_dead.clear();
            next_offsets.clear();
            batcher.take();
            unflushed = false;
        }
        stats.consumed.fetch_add(polled.positions.len() as u64, Ordering::Relaxed);
        stats.consumer_lag.store(consumer.lag(), Ordering::Relaxed);
        for buf in by_source.values_mut() {
            buf.clear();
        }
        for (item, &(partition, offset)) in plugin_sdk::wire::Delimited::new(&polled.records).zip(&polled.positions) {
            next_offsets.insert(partition, offset + 1);
            let Ok(bytes) = item else { continue };
            let source = plugin_sdk::StreamDataView::parse(bytes).map(|v| v.source_id).unwrap_or(0);
            plugin_sdk::wire::push_delimited(by_source.entry(source).or_default(), bytes);
        }
        let mut added = 0;
        // Dead letters of this poll, kept once every source's batch went through, and committed with
        // the batch: a poll abandoned (an open breaker, a failed call or commit) is read again, and
        // its dead letters go with that reading, never twice.
        dead.clear();
        for (source, input) in &by_source {
            if input.is_empty() {
                continue;
            }
            let Some(chain) = transformers.get_mut(source) else {
                for item in plugin_sdk::wire::Delimited::new(input).filter_map(Result::ok) {
                    dead.push(DeadLetter {
                        source: *source,
                        plugin: String::new(),
                        bytes: item.to_vec(),
                        reason: "no configured source has this id".into(),
                    });
                }
                continue;
            };
            let mut ctx = ChainContext { breakers, names, settings, stats, dead: &mut dead };
            let (parsed, last) = run_chain(*source, chain, input, &mut ctx)?;
            for v in &parsed {
                // Names are cached once known; a miss is asked again next time, never remembered.
                let symbol = match symbol_names.get(&v.symbol_id) {
                    Some(name) => name.clone(),
                    None => match names.symbols.name(v.symbol_id) {
                        Some(name) => symbol_names.entry(v.symbol_id).or_insert(name).clone(),
                        None => {
                            let mut one = plugin_sdk::Records::new();
                            one.push(v);
                            let bytes = plugin_sdk::wire::Delimited::new(one.as_bytes())
                                .next()
                                .and_then(Result::ok)
                                .unwrap_or_default()
                                .to_vec();
                            dead.push(DeadLetter {
                                source: *source,
                                plugin: last.clone(),
                                bytes,
                                reason: format!("symbol id {} is not in the symbol dictionary", v.symbol_id),
                            });
                            continue;
                        }
                    },
                };
                pending.push(PendingRow {
                    source: names.sources.get(slot(v.source_id)).cloned().unwrap_or_else(|| Arc::from("")),
                    symbol,
                    timestamp_ms: v.timestamp_ms,
                    is_buy: v.is_buy,
                    price_e8: v.price_e8,
                    volume_e8: v.volume_e8,
                    received_at_us: v.received_at_us,
                });
                added += 1;
            }
        }
        pending_dead.append(&mut dead);
        let now = tokio::time::Instant::now();
        let mut due = batcher.add(added, added * 48, now).or(batcher.due(now));
        // More is already waiting behind a full poll: read it into this batch first (the next poll
        // does not wait, the deadline having passed), up to the batch's cap.
        let full = polled.positions.len() >= settings.max_poll_records;
        if matches!(due, Some(FlushReason::Ready | FlushReason::Linger)) && full && batcher.rows() < batcher.max_rows()
        {
            due = None;
        }
        unflushed |= !polled.positions.is_empty();
        // Offsets move even when a poll produced no rows (all refused), so commit them too.
        let offsets_only = pending.is_empty() && (!polled.positions.is_empty() || !pending_dead.is_empty());
        if due.is_some() || offsets_only {
            let reason = due.map_or("offsets", FlushReason::as_str);
            let batch =
                Batch { pending: &mut pending, dead: &mut pending_dead, next_offsets: &next_offsets, topic: &topic };
            flush(sink, consumer, &mut batcher, batch, names, stats, settings, reason)?;
            unflushed = false;
            if let Some(health) = &settings.health {
                health.set("sink", true, format!("{} sink committed", sink.name()));
                health.set("breakers", true, "all closed");
            }
        }
    }
    // A clean stop stores what was transformed, so a restart does not redo it.
    if unflushed {
        let batch =
            Batch { pending: &mut pending, dead: &mut pending_dead, next_offsets: &next_offsets, topic: &topic };
        flush(sink, consumer, &mut batcher, batch, names, stats, settings, "stop")?;
    }
    Ok(())
}

fn breaker_open(source: u32, plugin: &str, names: &Names, settings: &ProcessSettings) -> anyhow::Error {
    let source_name = names.sources.get(slot(source)).map(|s| s.to_string()).unwrap_or_else(|| source.to_string());
    if let Some(health) = &settings.health {
        health.set("breakers", false, format!("open for plugin {plugin} of source {source_name}"));
    }
    ProcessError::BreakerOpen { source_name, plugin: plugin.to_owned() }.into()
}

/// What a source's chain needs from the role around it.
struct ChainContext<'a> {
    breakers: &'a mut Breakers,
    names: &'a Names,
    settings: &'a ProcessSettings,
    stats: &'a ProcessStats,
    /// Where refused records go, each naming the link (`name@version`) that refused it.
    dead: &'a mut Vec<DeadLetter>,
}

/// One source's records of a poll through its chain, link by link on the whole batch: each link's
/// output is the next link's input, and a record a link refuses is dead-lettered naming that link.
/// Returns the last link's records, parsed, and the `name@version` of that link (empty for a source
/// with no transforms, whose records pass as the ingest role wrote them).
///
/// # Errors
/// A link whose breaker is open, or that cannot run at all: nothing of the poll is committed then.
fn run_chain(
    source: u32,
    chain: &mut [Transformer],
    input: &[u8],
    ctx: &mut ChainContext<'_>,
) -> Result<(Vec<plugin_sdk::Record>, String), anyhow::Error> {
    if chain.is_empty() {
        // Each record was parsed when it was routed to its source, so none is skipped here.
        let records = plugin_sdk::wire::Delimited::new(input)
            .filter_map(|item| item.and_then(plugin_sdk::StreamDataView::parse).ok())
            .map(|view| view.record())
            .collect();
        return Ok((records, String::new()));
    }
    let mut carried: Option<Vec<u8>> = None;
    let mut parsed = Vec::new();
    let mut last = String::new();
    for (link, t) in chain.iter_mut().enumerate() {
        let batch = carried.as_deref().unwrap_or(input);
        if batch.is_empty() {
            // An earlier link filtered everything out: the rest has nothing to do.
            parsed.clear();
            break;
        }
        let breaker = ctx.breakers.get((source, link), &ctx.settings.breaker);
        let now = std::time::Instant::now();
        if !breaker.allow(now) {
            return Err(breaker_open(source, t.plugin().name(), ctx.names, ctx.settings));
        }
        let out = match t.transform(batch) {
            // Isolated failures (retry and bisection found the records that fail) are the plugin
            // working: those records are dead-lettered and the poll is committed.
            Ok(out) if !out.failed_entirely() => {
                breaker.record_success();
                out
            }
            Ok(out) => {
                breaker.record_failure(now);
                if !breaker.allow(now) {
                    // Nothing of this poll is committed: its records wait in the log.
                    ctx.stats.failed_calls.fetch_add(out.failed_calls, Ordering::Relaxed);
                    return Err(breaker_open(source, t.plugin().name(), ctx.names, ctx.settings));
                }
                out
            }
            Err(e) => {
                breaker.record_failure(now);
                return Err(e.into());
            }
        };
        ctx.stats.failed_calls.fetch_add(out.failed_calls, Ordering::Relaxed);
        last = format!("{}@{}", t.plugin().name(), t.plugin().version());
        for r in out.rejects {
            ctx.dead.push(DeadLetter { source, plugin: last.clone(), bytes: r.bytes, reason: r.reason });
        }
        parsed = out.parsed;
        carried = Some(out.records);
    }
    Ok((parsed, last))
}

/// Commits the pending rows and the offsets they cover in one transaction.
#[allow(clippy::too_many_arguments)]
fn flush(
    sink: &mut dyn Sink,
    consumer: &Reader,
    batcher: &mut Batcher,
    batch: Batch<'_>,
    names: &Names,
    stats: &ProcessStats,
    settings: &ProcessSettings,
    reason: &str,
) -> Result<(), anyhow::Error> {
    let Batch { pending, dead, next_offsets, topic } = batch;
    let taken = batcher.take();
    let rows: Vec<Row<'_>> = pending
        .iter()
        .map(|p| Row {
            timestamp_ms: p.timestamp_ms,
            source: &p.source,
            symbol: &p.symbol,
            is_buy: p.is_buy,
            price_e8: p.price_e8,
            volume_e8: p.volume_e8,
        })
        .collect();
    let offsets: Vec<(&str, i32, i64)> = next_offsets.iter().map(|(p, o)| (topic, *p, *o)).collect();
    let started = std::time::Instant::now();
    let letters: Vec<crate::sink::DeadLetter<'_>> = dead
        .iter()
        .map(|d| crate::sink::DeadLetter {
            stage: Stage::Transform,
            source_id: d.source,
            source: names.sources.get(slot(d.source)).map(|s| &**s).unwrap_or(""),
            plugin: &d.plugin,
            reason: &d.reason,
            bytes: &d.bytes,
        })
        .collect();
    sink.commit(&rows, &offsets, &letters, consumer)?;
    stats.rejected.fetch_add(letters.len() as u64, Ordering::Relaxed);
    drop(letters);
    dead.clear();
    consumer.committed(&offsets);
    let commit_time = started.elapsed();
    batcher.flushed(tokio::time::Instant::now());
    if let Some(taken) = taken {
        stats.batch_latency.record(taken.opened_at.elapsed());
    }
    let now_us = crate::clock::now_us();
    stats.receive_to_commit.record_rows(now_us, pending);
    stats.sink_commit.record(commit_time);
    if let Some(m) = &settings.metrics {
        observe_commit(&m.process, sink.name(), commit_time, reason, pending, now_us);
    }
    stats.stored.fetch_add(rows.len() as u64, Ordering::Relaxed);
    stats.flushes.fetch_add(1, Ordering::Relaxed);
    drop(rows);
    pending.clear();
    Ok(())
}

/// Once per batch: its size, why it closed, the commit's time, and each row's end-to-end latency
/// (gathered in thread-local histograms and merged into the shared ones once).
fn observe_commit(
    m: &crate::telemetry::ProcessMetrics,
    sink: &str,
    commit_time: Duration,
    reason: &str,
    rows: &[PendingRow],
    now_us: i64,
) {
    m.batch_rows.observe(rows.len() as f64);
    m.flushes_total.with_label_values(&[reason]).inc();
    m.sink_commit_duration_seconds.with_label_values(&[sink]).observe(commit_time.as_secs_f64());
    let (exchange, receive) = (m.exchange_to_commit_seconds.local(), m.receive_to_commit_seconds.local());
    for row in rows {
        exchange.observe((now_us - row.timestamp_ms.saturating_mul(1000)).max(0) as f64 / 1e6);
        if row.received_at_us > 0 {
            receive.observe((now_us - row.received_at_us).max(0) as f64 / 1e6);
        }
    }
    exchange.flush();
    receive.flush();
}

/// A transformed row waiting for the store.
struct PendingRow {
    /// When the host read the frame it came from, microseconds since the Unix epoch.
    received_at_us: i64,
    source: Arc<str>,
    symbol: Arc<str>,
    timestamp_ms: i64,
    is_buy: bool,
    price_e8: i64,
    volume_e8: i64,
}

/// What one flush commits: the pending rows, the dead letters of their polls, and the offsets.
struct Batch<'a> {
    pending: &'a mut Vec<PendingRow>,
    dead: &'a mut Vec<DeadLetter>,
    next_offsets: &'a BTreeMap<i32, i64>,
    topic: &'a str,
}

/// A record the transform stage refused, waiting for its batch's commit to be dead-lettered.
struct DeadLetter {
    source: u32,
    /// `name@version` of the plugin that refused it (empty when no plugin is bound).
    plugin: String,
    bytes: Vec<u8>,
    reason: String,
}
