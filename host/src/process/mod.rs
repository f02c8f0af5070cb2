//! The process role: [`run_process`] reads the hand-off from the position the sink holds, runs each
//! source's records through its chain of transforms, batches the rows and commits them to the sink
//! together with the positions they came from; [`ProcessRole`] runs it on its own thread and starts
//! it again after a failure; [`edits`] applies the API's chain edits between polls.

pub mod edits;
mod role;

pub use role::{Panicked, ProcessRole, ProcessSetup};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::batch::{BatchConfig, Batcher, FlushReason};
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::chain::{Chain, Hooks};
use crate::handoff::Polled;
use crate::handoff::{Reader, Stage};
use crate::plugin::{PluginCode, PluginError};
use crate::sink::{Row, Sink};
use crate::telemetry::health::Health;
use crate::transform::TransformedBatch;

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
    /// The API's chain edits, applied between polls (none: the chains stay as built).
    pub edits: Option<Arc<edits::LiveChains>>,
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
            edits: None,
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
    /// A held source's breaker has cooled down: read again from the last commit, the source's
    /// records included, as its trial.
    #[error("the circuit breaker of a source's link lets a trial through; reading again from the last commit")]
    TrialDue,
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

    /// Sources held at `now`: a link of theirs has an open breaker still cooling down. Their
    /// records are left in the log (the commits stop short of them) while the other sources go on.
    pub fn held_sources(&self, now: std::time::Instant) -> std::collections::BTreeSet<u32> {
        self.by_link
            .iter()
            .filter(|(_, b)| matches!(b.state(), BreakerState::Open { until } if until > now))
            .map(|(l, _)| l.0)
            .collect()
    }

    /// True when a source of `held` has a link whose cool-down is over: its trial is due.
    pub fn trial_due(&self, held: &std::collections::BTreeSet<u32>, now: std::time::Instant) -> bool {
        self.by_link
            .iter()
            .any(|(l, b)| held.contains(&l.0) && matches!(b.state(), BreakerState::Open { until } if until <= now))
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
    /// Times the role panicked (and was started again from the last commit).
    pub panics: AtomicU64,
    /// Sources held now (a link's breaker open): their records wait in the log.
    pub held_sources: AtomicU64,
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
    /// Records between the role's position and the start of partitions that no longer hold them
    /// (retention deleted them unread), as last found when the role stopped on them; 0 once it
    /// commits again.
    pub deleted_unread: AtomicU64,
    /// Records in the assigned partitions not read yet (from the consumer's statistics).
    pub consumer_lag: std::sync::atomic::AtomicI64,
    /// Latency of recent batches: first row batched to the sink's commit finished.
    pub batch_latency: LatencyWindow,
    /// Each committed row's receive-to-commit latency since the last [`LatencyRecorder::take`]
    /// (for the load tool; updated once per batch).
    pub receive_to_commit: LatencyRecorder,
    /// Each sink commit's duration since the last [`LatencyRecorder::take`] (for the load tool).
    pub sink_commit: LatencyRecorder,
    /// Each link's breaker, by (source name, plugin): whether it is not closed. Written when a
    /// breaker changes state (rarely), read at a scrape.
    pub breakers_open: std::sync::Mutex<BTreeMap<(String, String), bool>>,
    /// Records each link of each source refused, counted when their batch commits.
    pub link_rejects: Arc<crate::chain::LinkRejects>,
}

impl ProcessStats {
    /// Lists a link's breaker as closed, so its gauge has a series from the start.
    pub fn watch_breaker(&self, source: &str, plugin: &str) {
        self.link_rejects.watch(source, plugin);
        let mut open = self.breakers_open.lock().unwrap_or_else(|p| p.into_inner());
        open.entry((source.to_owned(), plugin.to_owned())).or_insert(false);
    }

    fn breaker_changed(&self, names: &Names, source: u32, plugin: &str, open: bool) {
        let source = names.sources.get(&source).map(|s| s.to_string()).unwrap_or_else(|| source.to_string());
        self.breakers_open.lock().unwrap_or_else(|p| p.into_inner()).insert((source, plugin.to_owned()), open);
    }

    /// The counters for a scrape.
    pub fn sample(&self) -> crate::telemetry::ProcessSample {
        crate::telemetry::ProcessSample {
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            rebalances: self.rebalances.load(Ordering::Relaxed),
            deleted_unread: self.deleted_unread.load(Ordering::Relaxed),
            lag: self.consumer_lag.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            breakers: self
                .breakers_open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((source, plugin), open)| (source.clone(), plugin.clone(), *open))
                .collect(),
            link_rejects: self.link_rejects.counts(),
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
    fn record_rows(&self, now_us: i64, rows: &[Row]) {
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
    /// The name of each source, by id (a map: ids come from the dictionary and can be large).
    pub sources: HashMap<u32, Arc<str>>,
    /// The dictionary the ingest role interned into.
    pub symbols: Arc<crate::symbols::Symbols>,
}

/// What the process role runs with: where it reads, each source's chain of transforms (by source id),
/// the breakers (kept across restarts of the role), where it commits, the names rows carry, its
/// settings and its counters.
pub struct Process<'a> {
    /// The hand-off it reads (Kafka or the local log).
    pub reader: &'a Reader,
    /// Each source's chain, by source id.
    pub chains: &'a mut HashMap<u32, Chain>,
    /// The links' circuit breakers.
    pub breakers: &'a mut Breakers,
    /// Where rows, offsets and dead letters are committed.
    pub sink: &'a mut dyn Sink,
    /// Source and symbol names.
    pub names: &'a Names,
    /// Batching, breakers, health and metrics.
    pub settings: &'a ProcessSettings,
    /// Its counters.
    pub stats: &'a ProcessStats,
}

/// The link index under which a source's progress past a held source's records is committed with
/// the chains' state (see [`Holding`]).
pub const PROGRESS_LINK: u32 = u32::MAX;
/// The state format of those progress entries: key the partition (i32, big-endian), value the
/// offset (i64, big-endian) below which the source's records are done.
const PROGRESS_FORMAT: &str = "sluice.progress@1";

/// Sources held while a link of theirs has an open breaker: their records stay in the log (each
/// commit's position stops at the first of them in its partition) while the other sources go on.
/// How far the others got past that position is committed with the batch as progress entries; a
/// later reading from the position skips their records below it, so nothing is counted twice and
/// nothing of the held source is lost or dead-lettered. When the breaker's cool-down ends, the role
/// reads again from the last commit with the source's records as the trial
/// ([`ProcessError::TrialDue`]).
#[derive(Debug, Default)]
struct Holding {
    /// Sources whose records are left in the log for now.
    held: std::collections::BTreeSet<u32>,
    /// Per partition, the first offset of a held source's record read in this run.
    from: BTreeMap<i32, i64>,
    /// (source, partition): the offset below which the source's records were done by an earlier run.
    done: HashMap<(u32, i32), i64>,
}

impl Holding {
    /// Whether the record of `source` at (`partition`, `offset`) goes through its chain now.
    #[inline]
    fn takes(&mut self, source: u32, partition: i32, offset: i64) -> bool {
        if !self.held.is_empty() && self.held.contains(&source) {
            let from = self.from.entry(partition).or_insert(offset);
            *from = (*from).min(offset);
            return false;
        }
        self.done.is_empty() || self.done.get(&(source, partition)).is_none_or(|&done| offset >= done)
    }

    /// The position to commit for `partition` when reading got to `next`.
    fn position(&self, partition: i32, next: i64) -> i64 {
        self.from.get(&partition).map_or(next, |&from| from.min(next))
    }

    /// The progress entries of each source not held, for the partitions where reading is past a
    /// held source's first record.
    fn progress(&self, chains: &HashMap<u32, Chain>, next: &BTreeMap<i32, i64>) -> Vec<(u32, StateChanges)> {
        if self.from.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &source in chains.keys().filter(|s| !self.held.contains(s)) {
            let changes: StateChanges = self
                .from
                .iter()
                .filter_map(|(p, &from)| next.get(p).filter(|&&n| n > from).map(|n| (*p, *n)))
                .map(|(p, n)| (p.to_be_bytes().to_vec(), Some(n.to_be_bytes().to_vec())))
                .collect();
            if !changes.is_empty() {
                out.push((source, changes));
            }
        }
        out
    }
}

/// Changed keys with their value now, as a [`crate::sink::StateWrite`] carries them.
type StateChanges = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Each source's progress entries as `sink` committed them (see [`Holding`]).
fn committed_progress(
    sink: &mut dyn Sink,
    chains: &HashMap<u32, Chain>,
    names: &Names,
) -> anyhow::Result<HashMap<(u32, i32), i64>> {
    let mut done = HashMap::new();
    for &source in chains.keys() {
        let Some(name) = names.sources.get(&source) else { continue };
        let Some((_, entries)) = sink.committed_state(name, PROGRESS_LINK)? else { continue };
        for (key, value) in entries {
            if let (Ok(p), Ok(o)) = (<[u8; 4]>::try_from(key.as_slice()), <[u8; 8]>::try_from(value.as_slice())) {
                done.insert((source, i32::from_be_bytes(p)), i64::from_be_bytes(o));
            }
        }
    }
    Ok(done)
}

/// Sources whose breaker is still cooling down are held; the others skip what an earlier run did
/// past a held source's records (their progress as the sink committed it).
fn holding_at_start(
    breakers: &Breakers,
    sink: &mut dyn Sink,
    chains: &HashMap<u32, Chain>,
    names: &Names,
    settings: &ProcessSettings,
    stats: &ProcessStats,
) -> anyhow::Result<Holding> {
    let holding = Holding {
        held: breakers.held_sources(std::time::Instant::now()),
        done: committed_progress(sink, chains, names)?,
        ..Holding::default()
    };
    stats.held_sources.store(holding.held.len() as u64, Ordering::Relaxed);
    if !holding.held.is_empty() {
        let held: Vec<&str> = holding.held.iter().filter_map(|s| names.sources.get(s).map(|n| &**n)).collect();
        tracing::warn!(
            sources = %held.join(", "),
            "a link's breaker is open: these sources' records wait in the log while the others go on"
        );
        if let Some(health) = &settings.health {
            health.set("breakers", false, format!("open: the records of {} wait in the log", held.join(", ")));
        }
    }
    Ok(holding)
}

/// The process role, run on the calling thread until `stop` is set: consume, run each source's records
/// through its chain, batch, and commit rows together with the offsets they cover to the sink (the
/// embedded store in one SQLite transaction, the Druid topic in one Kafka transaction). Refused
/// records are committed with their batch as dead letters.
///
/// # Errors
/// A sink or plugin failure that stops the role; nothing past the last committed batch is lost and
/// nothing before it is redone, since offsets are only committed with the rows. Start again with a
/// new consumer to resume.
pub fn run_process(process: Process<'_>, stop: &std::sync::atomic::AtomicBool) -> Result<(), anyhow::Error> {
    let Process { reader: consumer, chains, breakers, sink, names, settings, stats } = process;
    let topic = consumer.topic().to_owned();
    let env = Env { names, stats, settings, topic: &topic };
    // Reading resumes from the sink's committed position: the chains from their committed state.
    abandon(chains);
    sink.attach(consumer, settings.partitions)?;
    // Attached at its committed position: a sink with nothing to do yet is ready.
    if let Some(health) = &settings.health {
        health.set("sink", true, format!("{} sink attached", sink.name()));
    }
    let holding = holding_at_start(breakers, sink, chains, names, settings, stats)?;
    let most_in_flight = sink.max_in_flight().max(1);
    let mut round = Round {
        sink,
        consumer,
        env,
        live: Transforming { chains, breakers, names, settings, stats, symbol_names: HashMap::default() },
        holding,
        batcher: Batcher::new(settings.batch),
        polled: Polled::default(),
        pending: Vec::new(),
        dead: Vec::new(),
        next_offsets: BTreeMap::new(),
        by_source: BTreeMap::new(),
        unflushed: false,
        in_flight: InFlight::default(),
        most_in_flight,
    };
    // Every way out (a stop, a trial, an error) waits for the batches in flight, so a role that
    // starts again after it reads from a position no commit moves any more.
    let result = round.run(stop);
    // A failure to commit comes first: the role must then start from the sink's committed state.
    match round.settle(0) {
        Err(e) => Err(e),
        Ok(()) => result,
    }
}

/// One attempt of the role's loop: what it reads with and commits to, and what it holds between
/// polls.
struct Round<'a> {
    sink: &'a mut dyn Sink,
    consumer: &'a Reader,
    env: Env<'a>,
    live: Transforming<'a>,
    /// Sources held by an open breaker, and the others' progress past them.
    holding: Holding,
    batcher: Batcher,
    polled: Polled,
    /// Rows waiting for the store, and the dead letters of the polls they came from (committed with
    /// them, so exactly once).
    pending: Vec<Row>,
    dead: Vec<DeadLetter>,
    /// The next offset per partition the pending rows cover.
    next_offsets: BTreeMap<i32, i64>,
    /// Per-source input buffers, reused.
    by_source: BTreeMap<u32, Vec<u8>>,
    /// Records read since the last flush (their offsets are not stored yet).
    unflushed: bool,
    /// Batches handed to the sink and not committed yet.
    in_flight: InFlight,
    /// The most batches the sink takes in flight.
    most_in_flight: usize,
}

impl Round<'_> {
    /// Polls until `stop` is set; a clean stop stores what was transformed, so a restart does not
    /// redo it.
    fn run(&mut self, stop: &std::sync::atomic::AtomicBool) -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            self.step()?;
        }
        if self.unflushed {
            self.flush("stop")?;
        }
        Ok(())
    }

    /// One poll: a held source's trial when due, the API's chain edits, the records through the
    /// chains, and a flush when the batch is due.
    ///
    /// # Errors
    /// [`ProcessError::TrialDue`] (after committing what the other sources did), or a failure.
    fn step(&mut self) -> anyhow::Result<()> {
        let (names, settings, stats) = (self.env.names, self.env.settings, self.env.stats);
        if !self.holding.held.is_empty() && self.live.breakers.trial_due(&self.holding.held, std::time::Instant::now())
        {
            // Commit what the others did, then read again from there with the held records.
            if self.unflushed {
                self.flush("trial")?;
            }
            return Err(ProcessError::TrialDue.into());
        }
        if let Some(edits) = &settings.edits {
            // Between polls: the rows so far came from the old chains, this poll's meet the new.
            edits.apply(self.live.chains, &names.sources, &|source, plugin| stats.watch_breaker(source, plugin))?;
        }
        let added = self.read()?;
        let now = tokio::time::Instant::now();
        let mut due = self.batcher.add(added, added * 48, now).or(self.batcher.due(now));
        // More is already waiting behind a full poll: read it into this batch first (the next poll
        // does not wait, the deadline having passed), up to the batch's cap.
        let full = self.polled.positions.len() >= settings.max_poll_records;
        if matches!(due, Some(FlushReason::Ready | FlushReason::Linger))
            && full
            && self.batcher.rows() < self.batcher.max_rows()
        {
            due = None;
        }
        self.unflushed |= !self.polled.positions.is_empty();
        // Offsets move even when a poll produced no rows (all refused), so commit them too.
        let offsets_only = self.pending.is_empty() && (!self.polled.positions.is_empty() || !self.dead.is_empty());
        if (due.is_some() || offsets_only) && self.in_flight.batches.len() >= self.most_in_flight {
            // Every transaction is taken: wait for the oldest to commit; then, once a deadline has
            // passed, read what came meanwhile into this batch before it goes.
            self.settle(self.most_in_flight - 1)?;
            if matches!(due, Some(FlushReason::Ready | FlushReason::Linger)) {
                return Ok(());
            }
        }
        if due.is_some() || offsets_only {
            self.flush(due.map_or("offsets", FlushReason::as_str))?;
            if let Some(health) = &settings.health {
                health.set("sink", true, format!("{} sink committed", self.sink.name()));
                if self.holding.held.is_empty() {
                    health.set("breakers", true, "all closed");
                }
            }
        }
        Ok(())
    }

    /// Polls the reader (waiting no longer than the batch's deadline, and briefly while a commit is
    /// in flight), settles what the sink committed meanwhile, and runs the records through the
    /// chains. Returns how many rows were added.
    fn read(&mut self) -> anyhow::Result<usize> {
        let (settings, stats) = (self.env.settings, self.env.stats);
        self.polled.clear();
        let wait = self
            .batcher
            .deadline()
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        // A commit in flight is counted within a couple of milliseconds of its end.
        let wait = if self.in_flight.batches.is_empty() { wait } else { wait.min(Duration::from_millis(2)) };
        let outcome = self.consumer.poll_into(&mut self.polled, settings.max_poll_records, wait)?;
        // Batches the sink committed meanwhile count now (their latency), not at the next flush.
        self.settle(usize::MAX)?;
        if outcome.rebalanced {
            // Rows of the old assignment are not committed; their partitions' owners read them again.
            stats.rebalances.fetch_add(1, Ordering::Relaxed);
            self.pending.clear();
            self.dead.clear();
            self.next_offsets.clear();
            abandon(self.live.chains);
            self.batcher.take();
            self.unflushed = false;
        }
        stats.consumed.fetch_add(self.polled.positions.len() as u64, Ordering::Relaxed);
        stats.consumer_lag.store(self.consumer.lag(), Ordering::Relaxed);
        route(&self.polled, &mut self.by_source, &mut self.next_offsets, &mut self.holding);
        // A poll abandoned (an open breaker, a failed call or commit) is read again, and its dead
        // letters go with that reading, never twice.
        self.live.poll(&self.by_source, &mut self.pending, &mut self.dead)
    }

    /// Hands the pending rows, their dead letters, the chains' state changes and the offsets to the
    /// sink (see [`flush`]).
    fn flush(&mut self, reason: &'static str) -> anyhow::Result<()> {
        let batch = Batch {
            pending: &mut self.pending,
            dead: &mut self.dead,
            chains: self.live.chains,
            next_offsets: &self.next_offsets,
            holding: &self.holding,
            in_flight: &mut self.in_flight,
        };
        flush(self.sink, self.consumer, &mut self.batcher, batch, self.env, reason)?;
        self.unflushed = false;
        Ok(())
    }

    /// Waits until at most `keep` batches are in flight (see [`settle`]).
    fn settle(&mut self, keep: usize) -> anyhow::Result<()> {
        settle(self.sink, self.consumer, &mut self.batcher, self.env, &mut self.in_flight, keep)
    }
}

/// Splits a poll's records by source into `by_source` (each buffer emptied first), and moves
/// `next_offsets` past them; the records `holding` does not take now are left out.
fn route(
    polled: &Polled,
    by_source: &mut BTreeMap<u32, Vec<u8>>,
    next_offsets: &mut BTreeMap<i32, i64>,
    holding: &mut Holding,
) {
    for buf in by_source.values_mut() {
        buf.clear();
    }
    for (item, &(partition, offset)) in sluice_wire::Delimited::new(&polled.records).zip(&polled.positions) {
        next_offsets.insert(partition, offset + 1);
        let Ok(bytes) = item else { continue };
        let source = plugin_sdk::StreamDataView::parse(bytes).map(|v| v.source_id).unwrap_or(0);
        if !holding.takes(source, partition, offset) {
            continue;
        }
        sluice_wire::push_delimited(by_source.entry(source).or_default(), bytes);
    }
}

/// Starts every stateful link from the state `sink` committed with its position (see
/// [`Sink::committed_state`]), not from what memory holds: after a commit that failed without
/// saying whether it took effect (a Druid transaction whose commit timed out while the coordinator
/// committed it), memory may be a batch behind the position reading resumes from. A link whose
/// stored state is of another format starts empty, as at a start.
///
/// # Errors
/// When the sink's state cannot be read.
pub fn restore_committed(chains: &mut HashMap<u32, Chain>, sink: &mut dyn Sink, names: &Names) -> anyhow::Result<()> {
    for chain in chains.values_mut() {
        let Some(source) = names.sources.get(&chain.source()).cloned() else { continue };
        let keys = chain.keys().to_vec();
        for (&key, link) in keys.iter().zip(chain.links_mut()) {
            let Some(running) = link.state().format().map(str::to_owned) else { continue };
            let (format, entries) = sink.committed_state(&source, key)?.unwrap_or((running, Vec::new()));
            link.load_state(crate::transform::LinkState::committed(format, entries));
        }
    }
    Ok(())
}

/// Drops every link's state changes since the last commit: their records will be read again.
fn abandon(chains: &mut HashMap<u32, Chain>) {
    for chain in chains.values_mut() {
        chain.abandon();
    }
}

/// What turns a poll's records into rows: each source's chain with its breakers, and the names
/// rows carry.
struct Transforming<'a> {
    chains: &'a mut HashMap<u32, Chain>,
    breakers: &'a mut Breakers,
    names: &'a Names,
    settings: &'a ProcessSettings,
    stats: &'a ProcessStats,
    /// Symbol names by id, so the shared dictionary is consulted once per symbol, not per record;
    /// looked up for every record, so with a fast hash (ids come from the dictionary: nothing to
    /// flood).
    symbol_names: HashMap<u32, Arc<str>, rustc_hash::FxBuildHasher>,
}

impl Transforming<'_> {
    /// Each source's records of a poll through its chain: rows to `pending`, and the records refused
    /// (by a link, for an unknown source or symbol) to `dead`. Returns how many rows were added.
    ///
    /// # Errors
    /// A link whose breaker is open, or that cannot run at all: nothing of the poll is committed then.
    fn poll(
        &mut self,
        by_source: &BTreeMap<u32, Vec<u8>>,
        pending: &mut Vec<Row>,
        dead: &mut Vec<DeadLetter>,
    ) -> anyhow::Result<usize> {
        let mut added = 0;
        for (&source, input) in by_source.iter().filter(|(_, input)| !input.is_empty()) {
            let Some(chain) = self.chains.get_mut(&source) else {
                for item in sluice_wire::Delimited::new(input).filter_map(Result::ok) {
                    let reason = "no configured source has this id".into();
                    dead.push(DeadLetter { source, plugin: String::new(), bytes: item.to_vec(), reason });
                }
                continue;
            };
            let mut guard = Guard::new(source, self.breakers, self.names, self.settings, self.stats);
            let out = chain.run(input, &mut guard)?;
            for r in out.rejects {
                dead.push(DeadLetter { source, plugin: r.plugin, bytes: r.bytes, reason: r.reason });
            }
            // Every row names the source whose chain made it.
            let source_name = self.names.sources.get(&source).cloned().unwrap_or_else(|| Arc::from(""));
            for v in &out.parsed {
                let Some(symbol) = self.symbol(v.symbol_id) else {
                    let mut one = plugin_sdk::Records::new();
                    one.push(v);
                    let bytes = sluice_wire::Delimited::new(one.as_bytes())
                        .next()
                        .and_then(Result::ok)
                        .unwrap_or_default()
                        .to_vec();
                    let reason = format!("symbol id {} is not in the symbol dictionary", v.symbol_id);
                    dead.push(DeadLetter { source, plugin: out.last.clone(), bytes, reason });
                    continue;
                };
                pending.push(Row {
                    source: source_name.clone(),
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
        Ok(added)
    }

    /// A symbol's name: cached once known; a miss is asked again next time, never remembered.
    fn symbol(&mut self, id: u32) -> Option<Arc<str>> {
        if let Some(name) = self.symbol_names.get(&id) {
            return Some(name.clone());
        }
        let name = self.names.symbols.name(id)?;
        Some(self.symbol_names.entry(id).or_insert(name).clone())
    }
}

/// The live role around each link of a source's chain: its circuit breaker (a link that keeps
/// failing stops the poll, its records wait in the log) and the role's counters.
struct Guard<'a> {
    source: u32,
    breakers: &'a mut Breakers,
    names: &'a Names,
    settings: &'a ProcessSettings,
    stats: &'a ProcessStats,
    /// Whether the link's breaker was closed before the call, and when the call started.
    was_closed: bool,
    now: std::time::Instant,
}

impl<'a> Guard<'a> {
    fn new(
        source: u32,
        breakers: &'a mut Breakers,
        names: &'a Names,
        settings: &'a ProcessSettings,
        stats: &'a ProcessStats,
    ) -> Self {
        Guard { source, breakers, names, settings, stats, was_closed: true, now: std::time::Instant::now() }
    }

    fn breaker_open(&self, plugin: &str) -> anyhow::Error {
        let (names, source) = (self.names, self.source);
        self.stats.breaker_changed(names, source, plugin, true);
        let source_name = names.sources.get(&source).map(|s| s.to_string()).unwrap_or_else(|| source.to_string());
        if let Some(health) = &self.settings.health {
            health.set("breakers", false, format!("open for plugin {plugin} of source {source_name}"));
        }
        ProcessError::BreakerOpen { source_name, plugin: plugin.to_owned() }.into()
    }
}

impl Hooks for Guard<'_> {
    type Error = anyhow::Error;

    fn before(&mut self, link: usize, plugin: &PluginCode, _input: &[u8]) -> anyhow::Result<()> {
        let breaker = self.breakers.get((self.source, link), &self.settings.breaker);
        self.was_closed = breaker.state() == BreakerState::Closed;
        self.now = std::time::Instant::now();
        if !breaker.allow(self.now) {
            return Err(self.breaker_open(plugin.name()));
        }
        Ok(())
    }

    fn after(
        &mut self,
        link: usize,
        plugin: &PluginCode,
        outcome: Result<&TransformedBatch, &PluginError>,
    ) -> anyhow::Result<()> {
        let (now, stats) = (self.now, self.stats);
        let breaker = self.breakers.get((self.source, link), &self.settings.breaker);
        let out = match outcome {
            // Isolated failures (retry and bisection found the records that fail) are the plugin
            // working: those records are dead-lettered and the poll is committed.
            Ok(out) if !out.failed_entirely() => {
                breaker.record_success();
                out
            }
            Ok(out) => {
                // Every failed call counts (a link that fails call after call opens its breaker
                // within one batch); a batch that ran past its time budget opens it at once.
                if out.over_budget {
                    breaker.trip_now(now);
                } else {
                    breaker.record_failed_calls(now, out.failed_calls);
                }
                if !breaker.allow(now) {
                    // Nothing of this poll is committed: its records wait in the log.
                    stats.failed_calls.fetch_add(out.failed_calls, Ordering::Relaxed);
                    return Err(self.breaker_open(plugin.name()));
                }
                out
            }
            Err(_) => {
                breaker.record_failure(now);
                return Ok(());
            }
        };
        stats.failed_calls.fetch_add(out.failed_calls, Ordering::Relaxed);
        if self.was_closed != (breaker.state() == BreakerState::Closed) {
            stats.breaker_changed(self.names, self.source, plugin.name(), !self.was_closed);
        }
        Ok(())
    }
}

/// What a flush reads besides the batch: names, counters, settings and the offsets' topic.
#[derive(Clone, Copy)]
struct Env<'a> {
    names: &'a Names,
    stats: &'a ProcessStats,
    settings: &'a ProcessSettings,
    /// The topic (or the local log's name) the offsets are of.
    topic: &'a str,
}

/// Hands the pending rows and the offsets they cover to the sink in one transaction, then settles
/// what the sink has committed meanwhile (see [`settle`]).
fn flush(
    sink: &mut dyn Sink,
    consumer: &Reader,
    batcher: &mut Batcher,
    batch: Batch<'_>,
    env: Env<'_>,
    reason: &'static str,
) -> Result<(), anyhow::Error> {
    let Env { names, stats, settings, topic } = env;
    let Batch { pending, dead, chains, next_offsets, holding, in_flight } = batch;
    let taken = batcher.take();
    // Past a held source's first record, a partition's position stops there (see `Holding`).
    let offsets: Vec<(&str, i32, i64)> =
        next_offsets.iter().map(|(p, o)| (topic, *p, holding.position(*p, *o))).collect();
    let started = std::time::Instant::now();
    let letters: Vec<crate::sink::DeadLetter<'_>> = dead
        .iter()
        .map(|d| crate::sink::DeadLetter {
            stage: Stage::Transform,
            source_id: d.source,
            source: names.sources.get(&d.source).map(|s| &**s).unwrap_or(""),
            plugin: &d.plugin,
            reason: &d.reason,
            bytes: &d.bytes,
        })
        .collect();
    // Each stateful link's changes since the last commit, in the same transaction.
    let mut state = state_writes(chains, names);
    let wrote_state = !state.is_empty();
    // How far the sources not held got past a held one's records, with the same commit.
    let progress = holding.progress(chains, next_offsets);
    static NONE_DROPPED: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
    for (source, changes) in &progress {
        state.push(crate::sink::StateWrite {
            source: names.sources.get(source).map(|s| &**s).unwrap_or(""),
            link: PROGRESS_LINK,
            format: PROGRESS_FORMAT,
            reset: false,
            dropped: &NONE_DROPPED,
            changes,
        });
    }
    sink.commit(pending, &offsets, &letters, &state, consumer)?;
    drop(state);
    // Handed over: the next commit carries only later changes. Should this one fail, the role reads
    // again from the sink's committed state, not from memory's.
    if wrote_state {
        chains.values_mut().for_each(Chain::commit_state);
        if let Some(m) = &settings.metrics {
            observe_state(m, chains, names);
        }
    }
    stats.rejected.fetch_add(letters.len() as u64, Ordering::Relaxed);
    count_rejects(&stats.link_rejects, &letters);
    drop(letters);
    dead.clear();
    let offsets = offsets.iter().map(|&(_, p, o)| (p, o)).collect();
    let rows = std::mem::replace(pending, in_flight.spare.pop().unwrap_or_default());
    let opened_at = taken.map(|t| t.opened_at);
    in_flight.batches.push_back(Committing { rows, offsets, started, opened_at, reason });
    settle(sink, consumer, batcher, env, in_flight, usize::MAX)
}

/// A batch handed to the sink and not known to be committed yet.
struct Committing {
    rows: Vec<Row>,
    /// (partition, next offset) it commits.
    offsets: Vec<(i32, i64)>,
    /// When it was handed over.
    started: std::time::Instant,
    /// When its first row was batched.
    opened_at: Option<tokio::time::Instant>,
    /// Why it was closed.
    reason: &'static str,
}

/// The batches handed to the sink, oldest first, and row buffers to reuse.
#[derive(Default)]
struct InFlight {
    batches: std::collections::VecDeque<Committing>,
    spare: Vec<Vec<Row>>,
}

/// Waits until at most `keep` batches are in flight, and counts those the sink has committed since
/// the last call: their rows stored, their latency, their offsets moved.
///
/// # Errors
/// A handed-over batch failed to commit: it and those after it are not committed.
fn settle(
    sink: &mut dyn Sink,
    consumer: &Reader,
    batcher: &mut Batcher,
    env: Env<'_>,
    in_flight: &mut InFlight,
    keep: usize,
) -> anyhow::Result<()> {
    if in_flight.batches.is_empty() {
        return Ok(());
    }
    let left = sink.settle(keep)?;
    let Env { stats, settings, topic, .. } = env;
    while in_flight.batches.len() > left {
        let Some(Committing { mut rows, offsets, started, opened_at, reason }) = in_flight.batches.pop_front() else {
            break;
        };
        let offsets: Vec<(&str, i32, i64)> = offsets.iter().map(|&(p, o)| (topic, p, o)).collect();
        consumer.committed(&offsets);
        let commit_time = started.elapsed();
        batcher.flushed(tokio::time::Instant::now());
        if let Some(opened_at) = opened_at {
            stats.batch_latency.record(opened_at.elapsed());
        }
        let now_us = crate::clock::now_us();
        stats.receive_to_commit.record_rows(now_us, &rows);
        stats.sink_commit.record(commit_time);
        if let Some(m) = &settings.metrics {
            observe_commit(&m.process, sink.name(), commit_time, reason, &rows, now_us);
        }
        stats.stored.fetch_add(rows.len() as u64, Ordering::Relaxed);
        stats.deleted_unread.store(0, Ordering::Relaxed);
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        rows.clear();
        in_flight.spare.push(rows);
    }
    Ok(())
}

/// Each stateful link's changes since the last commit, as the sink writes them.
fn state_writes<'a>(chains: &'a HashMap<u32, Chain>, names: &'a Names) -> Vec<crate::sink::StateWrite<'a>> {
    let mut writes = Vec::new();
    for (id, chain) in chains {
        let source = names.sources.get(id).map(|s| &**s).unwrap_or("");
        let links = chain.keys().iter().zip(chain.links().iter().map(|t| t.state()));
        let retired = chain.retired().iter().map(|(key, state)| (key, state));
        for (&link, state) in links.chain(retired).filter(|(_, state)| state.is_dirty()) {
            let (reset, changes) = state.pending();
            let format = state.format().unwrap_or("");
            let dropped = state.dropped();
            writes.push(crate::sink::StateWrite { source, link, format, reset, dropped, changes });
        }
    }
    writes
}

/// Each stateful link's committed state size, after a commit that wrote state.
fn observe_state(m: &crate::telemetry::Metrics, chains: &HashMap<u32, Chain>, names: &Names) {
    for (id, chain) in chains {
        let source = names.sources.get(id).map(|s| &**s).unwrap_or("");
        for t in chain.links().iter().filter(|t| t.state().format().is_some()) {
            let bytes = i64::try_from(t.state().bytes()).unwrap_or(i64::MAX);
            m.process.state_bytes.with_label_values(&[source, t.plugin().name()]).set(bytes);
        }
    }
}

/// Once per batch: its size, why it closed, the commit's time, and each row's end-to-end latency
/// (gathered in thread-local histograms and merged into the shared ones once).
fn observe_commit(
    m: &crate::telemetry::ProcessMetrics,
    sink: &str,
    commit_time: Duration,
    reason: &str,
    rows: &[Row],
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

/// What one flush commits: the pending rows, the dead letters of their polls, and the offsets.
struct Batch<'a> {
    pending: &'a mut Vec<Row>,
    dead: &'a mut Vec<DeadLetter>,
    /// The chains whose state changes commit with the rows.
    chains: &'a mut HashMap<u32, Chain>,
    next_offsets: &'a BTreeMap<i32, i64>,
    /// Where commits stop for held sources, and the others' progress past them.
    holding: &'a Holding,
    /// The batches handed over before it.
    in_flight: &'a mut InFlight,
}

/// Counts committed dead letters per source and link: once per run of letters of the same source
/// and link (a batch's letters come source by source, link by link), not per letter.
fn count_rejects(counts: &crate::chain::LinkRejects, letters: &[crate::sink::DeadLetter<'_>]) {
    let mut rest = letters;
    while let Some(first) = rest.first() {
        let run = rest.iter().take_while(|l| l.source == first.source && l.plugin == first.plugin).count();
        counts.add(first.source, first.plugin, run as u64);
        rest = &rest[run..];
    }
}

/// A record the transform stage refused, waiting for its batch's commit to be dead-lettered.
struct DeadLetter {
    source: u32,
    /// `name@version` of the plugin that refused it (empty when no plugin is bound).
    plugin: String,
    bytes: Vec<u8>,
    reason: String,
}
