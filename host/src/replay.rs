//! Replay: the records of a time range read again from the hand-off (the local log, or the events
//! topic on Kafka) through each source's chain as it is now (the versions the registry has active),
//! into the sink again:
//!
//! - the embedded store: a table of its own, `replay_<NAME>`, beside the live rows; or the range's
//!   rollup buckets replaced exactly, while the live role goes on committing (see
//!   [`EmbeddedStore::swap_into_rollup`]);
//! - the Druid sink: a topic of its own, `<topic>.replay.<NAME>`, written in transactions as the sink
//!   writes its topic, for a Druid datasource of its own or a reindex of the live one (the specs
//!   are [`crate::sink::druid::spec`]'s).
//!
//! The reading is the hand-off's ([`crate::handoff::local::read_batches`],
//! [`RangeReader`]); what is done with each batch of records is the same whatever was read.
//!
//! A stateful chain decides each record on the state the records before it left, so its replay
//! starts from a checkpoint of the chains' state (the store's `state_checkpoints`, or the Druid
//! sink's checkpoint topic, [`crate::sink::druid::checkpoint`]) at or before the range's first record
//! in every partition: it runs the records from there through the chains and writes the rows of the
//! range only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_wire::{Delimited, StreamDataView, push_delimited};

use crate::chain::{Chain, Unguarded};
use crate::config::Config;
use crate::deploy::{Role, open_plugins};
use crate::handoff::Positions;
use crate::handoff::kafka::range::RangeReader;
use crate::plugin::PluginInstance;
use crate::plugin::registry::Slot;
use crate::sink::Row;
use crate::sink::druid::{DruidSink, DruidSinkConfig};
use crate::sink::embedded::{EmbeddedStore, REPLAY_PREFIX};
pub use crate::sink::replay::{CLOCK_SKEW_MS, ReplayProgress, ReplaySpec, ReplaySummary, Written, check_range};
use crate::sink::replay::{HeldFrom, check_topic_range, deleted_until};
use crate::symbols::Symbols;
use crate::transform::Transformer;

/// Rollup buckets of the embedded store are whole minutes; a replay into it covers whole buckets.
const BUCKET_MS: i64 = 60_000;
/// Most records of the events topic handed to the chains at once.
const BATCH_RECORDS: usize = 8_192;
/// The replay swaps into `rollup` once it is fewer than this many records behind the live position:
/// the rest is read while the swap holds the store's write lock, so that stays short.
const SWAP_BEHIND: i64 = 5_000;

/// Replays `spec` for `config` until done or `stop` is set (then the partial table, or the partial
/// replay topic, is dropped and this fails).
///
/// # Errors
/// A missing log, a range the log or the topic no longer holds, a Druid replay without a name or
/// onto a topic that already holds records, a plugin that cannot start, a store or topic that
/// cannot be written, or a stop.
pub async fn replay(
    config: &Config,
    spec: &ReplaySpec,
    progress: Arc<ReplayProgress>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ReplaySummary> {
    if let Some(into) = &spec.into {
        crate::sink::embedded::check_replay_name(into).map_err(anyhow::Error::msg)?;
    }
    let brokers = config.kafka.brokers.trim().to_owned();
    let log = config.data_dir.join("log.sqlite");
    let symbols = if brokers.is_empty() {
        if !log.is_file() {
            bail!("no local log at {}: nothing to replay", log.display());
        }
        Arc::new(Symbols::local(&log).context("symbol dictionary")?)
    } else {
        let (kafka, b) = (config.kafka.clone(), brokers.clone());
        let shared = move || Symbols::shared(&kafka, &b, &kafka.symbols_topic, Duration::from_secs(30));
        Arc::new(tokio::task::spawn_blocking(shared).await?.context("symbol dictionary")?)
    };
    let target = target(config, spec, &brokers).await?;
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    // The chains as the live role runs them: the configuration's, or as the API edited them.
    let book = Arc::new(crate::chains::ChainBook::open(&config.data_dir, config.chains())?);
    let (_registry, slots) = open_plugins(config, Role::Process, book.clone(), symbols.clone(), metrics).await?;
    let (chains, sources) = chains(config, &book, &slots, &symbols)?;
    // The range in whole buckets: the store's minutes, or Druid's segments.
    let whole: Box<dyn Fn(i64) -> i64 + Send> = match config.sink.druid.clone() {
        Some(druid) => Box::new(move |t| crate::sink::druid::replay_range(&druid, t, Some(t)).1.unwrap_or(t)),
        None => Box::new(|t: i64| t.div_euclid(BUCKET_MS) * BUCKET_MS + if t % BUCKET_MS == 0 { 0 } else { BUCKET_MS }),
    };
    let range = match &config.sink.druid {
        Some(druid) => crate::sink::druid::replay_range(druid, spec.since_ms, spec.until_ms),
        None => (spec.since_ms.div_euclid(BUCKET_MS) * BUCKET_MS, spec.until_ms.map(&whole)),
    };
    // A stateful chain decides each record on the state the records before it left: it reads from
    // a checkpoint of the state at or before the range and runs everything from there.
    let stateful = chains.values().any(|c| c.links().iter().any(|t| t.state().format().is_some()));
    let input = if brokers.is_empty() {
        Input::Local(log)
    } else {
        Input::Kafka(RangeReader::new(&config.kafka, &brokers, &config.kafka.events_topic)?)
    };
    let replayed_topic = match &target {
        Target::Topic { druid, .. } => Some(druid.topic.clone()),
        Target::Store { .. } => None,
    };
    let job = Job {
        reading: Reading {
            input,
            replayer: Replayer {
                chains,
                sources,
                symbols,
                progress,
                names: HashMap::new(),
                range,
                by_source: BTreeMap::new(),
                left_out: BTreeMap::new(),
                stateful,
            },
            stop,
        },
        target,
        kafka: (config.kafka.clone(), brokers.clone()),
        whole,
    };
    let outcome = tokio::task::spawn_blocking(move || job.run()).await?;
    if let (Err(_), Some(topic)) = (&outcome, replayed_topic) {
        // A partial replay topic would be ingested as if it were whole: it goes, as a partial table does.
        if let Err(e) = crate::handoff::kafka::delete_topic(&config.kafka, &brokers, &topic).await {
            tracing::warn!(topic = %topic, error = %e, "the partial replay topic could not be deleted; delete it by hand");
        }
    }
    outcome
}

/// Where the replay's rows go: the store (a table of its own, or `rollup`), or a replay topic of its
/// own for the Druid sink (created, and refused when it already holds records).
async fn target(config: &Config, spec: &ReplaySpec, brokers: &str) -> anyhow::Result<Target> {
    Ok(match (&config.sink.druid, &spec.into) {
        (None, into) => Target::Store { path: config.data_dir.join("store.sqlite"), into: into.clone() },
        (Some(_), _) if brokers.is_empty() => bail!("sink.druid needs [kafka] brokers"),
        (Some(_), None) => {
            bail!("with the Druid sink a replay writes its rows to a topic of its own: name it with --into NAME")
        }
        (Some(druid), Some(name)) => {
            let topic = crate::sink::druid::replay_topic(druid, name);
            crate::handoff::kafka::ensure_topics(&config.kafka, brokers, &[&topic], config.kafka.partitions).await?;
            refuse_written(config, brokers, &topic).await?;
            let checkpoints = druid.checkpoint_topic();
            let mut druid = druid.clone();
            druid.topic = topic;
            let transactional_id = format!("sluice-druid-replay-{}-{name}", config.process.group);
            Target::Topic { druid: Box::new(druid), transactional_id, checkpoints }
        }
    })
}

/// Each configured source's chain, instantiated from the versions the registry has active, and its
/// name, by source id.
type Chains = (HashMap<u32, Chain>, HashMap<u32, Arc<str>>);

fn chains(
    config: &Config,
    book: &crate::chains::ChainBook,
    slots: &HashMap<String, Arc<Slot>>,
    symbols: &Symbols,
) -> anyhow::Result<Chains> {
    let mut chains: HashMap<u32, Chain> = HashMap::new();
    let mut sources: HashMap<u32, Arc<str>> = HashMap::new();
    for source in &config.sources {
        let id = symbols.source_id(&source.name).context("source ids")?;
        let mut chain = Vec::new();
        for link in book.chain(&source.name).unwrap_or_default() {
            let slot = slots.get(&link.plugin).with_context(|| format!("plugin {} is not loaded", link.plugin))?;
            let instance = PluginInstance::new(&slot.active(), &link.config_pairs())
                .with_context(|| format!("source {}: plugin {}", source.name, link.plugin))?;
            chain.push((link.state_key, Transformer::new(instance)));
        }
        chains.insert(id, Chain::keyed(id, chain));
        sources.insert(id, Arc::from(source.name.as_str()));
    }
    Ok((chains, sources))
}

/// A Druid replay never appends to a topic that already holds records: the datasource read from it
/// would count them twice.
async fn refuse_written(config: &Config, brokers: &str, topic: &str) -> anyhow::Result<()> {
    let (kafka, brokers, topic) = (config.kafka.clone(), brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let marks = RangeReader::new(&kafka, &brokers, &topic)?.watermarks()?;
        let held: i64 = marks.values().map(|(low, high)| high - low).sum();
        if marks.values().any(|(_, high)| *high > 0) {
            bail!(
                "the topic {topic} already holds {held} records of an earlier replay: name this one differently, or \
                 delete the topic (and the Druid datasource built from it) first"
            );
        }
        Ok(())
    })
    .await?
}

/// Where the replay reads.
enum Input {
    /// The local log at this path: one partition, 0.
    Local(PathBuf),
    /// The events topic, through a reader of its own.
    Kafka(RangeReader),
}

impl Input {
    /// Where each partition is read from for a range starting at `since_ms`, after checking that
    /// the hand-off still holds it: `whole(t)` is the first start of a range (whole buckets) that
    /// holds no trade before `t`, the earliest time a replay may start from when no deleted record
    /// can have a trade at or after `t` (see [`deleted_until`]).
    fn start(&self, since_ms: i64, whole: &dyn Fn(i64) -> i64) -> anyhow::Result<Positions> {
        match self {
            Input::Local(log) => {
                // The first batch the log holds, for the retention check: what was deleted was
                // received before it.
                let mut until = None;
                let first_offset = crate::handoff::local::read_batches(log, 0, |_, records| {
                    until = deleted_until(Delimited::new(records).filter_map(Result::ok));
                    false
                })?;
                check_range(first_offset, until.map(whole), since_ms).map_err(anyhow::Error::msg)?;
                Ok(Positions::from([(0, 0)]))
            }
            Input::Kafka(reader) => {
                let marks = reader.watermarks()?;
                let trimmed: Positions = marks
                    .iter()
                    .filter(|(_, (low, high))| *low > 0 && low < high)
                    .map(|(p, (low, _))| (*p, *low))
                    .collect();
                let firsts = reader.first_records(&trimmed)?;
                let held: Vec<HeldFrom> = marks
                    .iter()
                    .map(|(p, (low, _))| HeldFrom {
                        partition: *p,
                        offset: *low,
                        first_time_ms: firsts.get(p).and_then(|b| deleted_until([b.as_slice()])).map(whole),
                    })
                    .collect();
                check_topic_range(reader.topic(), &held, since_ms).map_err(anyhow::Error::msg)?;
                let from = since_ms.saturating_sub(CLOCK_SKEW_MS);
                if from <= 0 {
                    return Ok(marks.iter().map(|(p, (low, _))| (*p, *low)).collect());
                }
                Ok(reader.offsets_for_time(from)?)
            }
        }
    }

    /// The end of every partition as it is now (the local log: wherever it ends when read).
    fn end(&self) -> anyhow::Result<Positions> {
        match self {
            Input::Local(_) => Ok(Positions::from([(0, i64::MAX)])),
            Input::Kafka(reader) => Ok(reader.watermarks()?.into_iter().map(|(p, (_, high))| (p, high)).collect()),
        }
    }

    /// The name the store keeps the live position of this hand-off under.
    fn position_topic(&self) -> &str {
        match self {
            Input::Local(_) => crate::handoff::local::POSITION_TOPIC,
            Input::Kafka(reader) => reader.topic(),
        }
    }

    /// Reads every partition `p` of `to` from `from[p]` up to `to[p]` (exclusive), handing batches
    /// of records to `each` and moving `from` past each batch taken. False when `stop` was set.
    fn pass(
        &self,
        from: &mut Positions,
        to: &Positions,
        stop: &AtomicBool,
        each: &mut dyn FnMut(&[&[u8]]) -> anyhow::Result<()>,
    ) -> anyhow::Result<bool> {
        let log = match self {
            Input::Kafka(reader) => return reader.read(from, to, BATCH_RECORDS, stop, each),
            Input::Local(log) => log,
        };
        let (Some(&start), Some(&end)) = (from.get(&0), to.get(&0)) else { return Ok(true) };
        if start >= end {
            return Ok(true);
        }
        let (mut next, mut failure, mut stopped) = (start, None, false);
        crate::handoff::local::read_batches(log, start, |base, records| {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                return false;
            }
            let mut batch = Vec::new();
            let mut after = next;
            for (i, item) in Delimited::new(records).enumerate() {
                let offset = base + i as i64;
                if offset < start {
                    continue;
                }
                if offset >= end {
                    break;
                }
                after = offset + 1;
                if let Ok(bytes) = item {
                    batch.push(bytes);
                }
            }
            if let Err(e) = each(&batch) {
                failure = Some(e);
                return false;
            }
            next = after;
            next < end
        })?;
        from.insert(0, next);
        match failure {
            Some(e) => Err(e),
            None => Ok(!stopped),
        }
    }
}

/// Where the replay's rows go.
enum Target {
    /// The embedded store at `path`: into `replay_<into>`, or into `rollup` when `None`.
    Store { path: PathBuf, into: Option<String> },
    /// A Druid replay topic (`druid.topic`), written by a transactional producer of this id; the
    /// live sink's checkpoints of the chains' state are in the topic `checkpoints`.
    Topic { druid: Box<DruidSinkConfig>, transactional_id: String, checkpoints: String },
}

impl Target {
    /// Where the live sink keeps its checkpoints of the chains' state.
    fn checkpoints(&self) -> Checkpoints {
        match self {
            Target::Store { path, .. } => Checkpoints::Store(path.clone()),
            Target::Topic { checkpoints, .. } => Checkpoints::Topic(checkpoints.clone()),
        }
    }
}

/// Where the live sink keeps its checkpoints of the chains' state.
enum Checkpoints {
    /// The embedded store at this path (`state_checkpoints`).
    Store(PathBuf),
    /// The Druid sink's checkpoint topic.
    Topic(String),
}

/// The reading side of a replay: the hand-off, what each batch goes through, and the stop flag.
struct Reading {
    input: Input,
    replayer: Replayer,
    stop: Arc<AtomicBool>,
}

impl Reading {
    /// The records from `from` up to `to` through the chains, each batch's rows handed to `out`.
    ///
    /// # Errors
    /// What reading, a chain or `out` failed with; a stop.
    fn pass(
        &mut self,
        from: &mut Positions,
        to: &Positions,
        out: &mut dyn FnMut(Vec<Row>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let replayer = &mut self.replayer;
        let finished = self.input.pass(from, to, &self.stop, &mut |records| {
            let rows = replayer.rows(records)?;
            let n = rows.len() as u64;
            out(rows)?;
            replayer.progress.rows.fetch_add(n, Ordering::Relaxed);
            Ok(())
        })?;
        if !finished {
            bail!("the replay was stopped");
        }
        Ok(())
    }
}

impl Reading {
    /// Where a replay of stateful chains reads from: the newest checkpoint of the chains' state at
    /// or before the range's first record in every partition that the hand-off still holds the
    /// records after (the chains start from its state, see
    /// [`checkpoint_fits`](crate::sink::replay::checkpoint_fits)), or the hand-off's first records
    /// when it still holds every partition from offset 0 (the state started empty there). `start`
    /// is where [`Input::start`] found the range.
    ///
    /// # Errors
    /// No checkpoint is old enough and the hand-off no longer starts at 0: refused, with the
    /// earliest time a replay can start from.
    fn start_from_checkpoint(
        &mut self,
        checkpoints: &Checkpoints,
        kafka: (&crate::handoff::kafka::KafkaConfig, &str),
        start: Positions,
        whole: &dyn Fn(i64) -> i64,
    ) -> anyhow::Result<Positions> {
        match (&self.input, checkpoints) {
            (Input::Local(_), Checkpoints::Store(store)) => self.start_on_the_local_log(store, start, whole),
            (Input::Kafka(_), _) => self.start_on_kafka(checkpoints, kafka, start, whole),
            (Input::Local(_), Checkpoints::Topic(_)) => bail!("the Druid sink needs [kafka] brokers"),
        }
    }

    /// [`start_from_checkpoint`](Self::start_from_checkpoint) on the local log: the range's first
    /// record is the first whose trade time is in it.
    fn start_on_the_local_log(
        &mut self,
        store: &std::path::Path,
        start: Positions,
        whole: &dyn Fn(i64) -> i64,
    ) -> anyhow::Result<Positions> {
        let Input::Local(log) = &self.input else { return Ok(start) };
        let since = self.replayer.range.0;
        // The log's first offset, and the first (offset, trade time) that `wanted` takes.
        type Found = (Option<i64>, Option<(i64, i64)>);
        let time_at = |wanted: &dyn Fn(i64, i64) -> bool| -> anyhow::Result<Found> {
            let mut found = None;
            let first = crate::handoff::local::read_batches(log, 0, |base, records| {
                for (i, item) in Delimited::new(records).enumerate() {
                    if let Ok(v) = item.and_then(StreamDataView::parse)
                        && wanted(base + i as i64, v.timestamp_ms)
                    {
                        found = Some((base + i as i64, v.timestamp_ms));
                        return false;
                    }
                }
                true
            })?;
            Ok((first, found))
        };
        let (log_first, in_range) = time_at(&|_, t| t >= since)?;
        let Some((first, _)) = in_range else { return Ok(start) };
        let store = EmbeddedStore::open(store, Duration::from_secs(60))?;
        let topic = crate::handoff::local::POSITION_TOPIC;
        let held = Positions::from([(0, log_first.unwrap_or(0))]);
        if let Some(checkpoint) = store.checkpoint_before(topic, &Positions::from([(0, first)]), &held)? {
            return Ok(self.load_checkpoint(&checkpoint, &start));
        }
        if log_first.unwrap_or(0) == 0 {
            return Ok(Positions::from([(0, 0)]));
        }
        let earliest = match store.oldest_checkpoint(topic, &held)? {
            Some(positions) => {
                let position = positions.get(&0).copied().unwrap_or(0);
                time_at(&|offset, _| offset >= position)?.1.map(|(_, t)| whole(t))
            }
            None => None,
        };
        bail!(crate::sink::replay::no_checkpoint(&format!("offset {first}"), earliest))
    }

    /// [`start_from_checkpoint`](Self::start_from_checkpoint) on Kafka: the range's first record in
    /// each partition is where `start` is (found by the time the records were produced).
    fn start_on_kafka(
        &mut self,
        checkpoints: &Checkpoints,
        (kafka, brokers): (&crate::handoff::kafka::KafkaConfig, &str),
        start: Positions,
        whole: &dyn Fn(i64) -> i64,
    ) -> anyhow::Result<Positions> {
        let Input::Kafka(reader) = &self.input else { return Ok(start) };
        let marks = reader.watermarks()?;
        if start.iter().all(|(p, at)| marks.get(p).is_none_or(|(_, high)| at >= high)) {
            // Nothing in the range: every partition starts at its end.
            return Ok(start);
        }
        let held: Positions = marks.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let topic = reader.topic();
        // The newest checkpoint that fits, and the positions of the oldest still held.
        let (found, oldest) = match checkpoints {
            Checkpoints::Store(path) => {
                let store = EmbeddedStore::open(path, Duration::from_secs(60))?;
                (store.checkpoint_before(topic, &start, &held)?, store.oldest_checkpoint(topic, &held)?)
            }
            Checkpoints::Topic(name) => {
                use crate::sink::druid::checkpoint;
                let kept = RangeReader::new(kafka, brokers, name)?;
                let listed: Vec<checkpoint::Listed> =
                    checkpoint::list(&kept)?.into_iter().filter(|c| c.topic == topic).collect();
                let fits =
                    listed.iter().rev().find(|c| crate::sink::replay::checkpoint_fits(&c.positions, &start, &held));
                let oldest = listed.iter().find(|c| crate::sink::replay::checkpoint_held(&c.positions, &held));
                (fits.map(|c| checkpoint::load(&kept, c)).transpose()?, oldest.map(|c| c.positions.clone()))
            }
        };
        if let Some(checkpoint) = found {
            return Ok(self.load_checkpoint(&checkpoint, &start));
        }
        if held.values().all(|low| *low == 0) {
            return Ok(held);
        }
        // A replay from the oldest checkpoint held needs a range whose first records (by the time
        // they were produced, less the clock skew margin) come after every record before it.
        let earliest = match oldest {
            Some(positions) => {
                let before: Positions = positions
                    .iter()
                    .filter(|(p, at)| held.get(p).is_some_and(|low| *at > low))
                    .map(|(p, at)| (*p, at - 1))
                    .collect();
                let times = reader.message_times(&before)?;
                times.values().max().map(|t| whole(t.saturating_add(1 + CLOCK_SKEW_MS)))
            }
            None => None,
        };
        let first: Vec<String> = start.iter().map(|(p, at)| format!("partition {p} offset {at}")).collect();
        bail!(crate::sink::replay::no_checkpoint(&format!("topic {topic}: {}", first.join(", ")), earliest))
    }

    /// Starts every chain's stateful links from `checkpoint` and answers where reading starts: at
    /// its positions, in every partition of `start` (0 in those it does not name).
    fn load_checkpoint(&mut self, checkpoint: &crate::sink::embedded::Checkpoint, start: &Positions) -> Positions {
        for chain in self.replayer.chains.values_mut() {
            let Some(source) = self.replayer.sources.get(&chain.source()).cloned() else { continue };
            let keys = chain.keys().to_vec();
            for (&key, link) in keys.iter().zip(chain.links_mut()) {
                let of_link = || checkpoint.entries.iter().filter(|e| *e.0 == *source && e.1 == key);
                let entries: Vec<(Vec<u8>, Vec<u8>)> = of_link().map(|e| (e.3.clone(), e.4.clone())).collect();
                if let Some(format) = of_link().next().map(|e| e.2.clone()) {
                    link.load_state(crate::transform::LinkState::committed(format, entries));
                }
            }
        }
        let from: Positions = start.keys().map(|p| (*p, checkpoint.positions.get(p).copied().unwrap_or(0))).collect();
        tracing::info!(
            positions = ?from,
            taken_at_ms = checkpoint.at_ms,
            "replay starts the chains from a checkpoint of their state"
        );
        from
    }
}

/// A replay, ready to run on a blocking thread.
struct Job {
    reading: Reading,
    target: Target,
    /// The Kafka settings and brokers (for the Druid replay topic's producer).
    kafka: (crate::handoff::kafka::KafkaConfig, String),
    /// A time rounded up to the start of the range's next whole bucket (unless it starts one).
    whole: Box<dyn Fn(i64) -> i64 + Send>,
}

impl Job {
    fn run(self) -> anyhow::Result<ReplaySummary> {
        let Job { mut reading, target, kafka: (kafka, brokers), whole } = self;
        let range = reading.replayer.range;
        let mut start = reading.input.start(range.0, &*whole)?;
        if reading.replayer.stateful {
            start = reading.start_from_checkpoint(&target.checkpoints(), (&kafka, &brokers), start, &*whole)?;
        }
        let (written, buckets) = match target {
            Target::Store { path, into } => {
                let written = into_store(&mut reading, &path, into.as_deref(), start)?;
                let buckets = buckets_in(&path, &written, range)?;
                (Written::Table(written), buckets)
            }
            Target::Topic { druid, transactional_id, .. } => {
                let mut sink = DruidSink::new(&kafka, &brokers, &druid, &transactional_id, Duration::from_secs(30))?;
                let (mut next, end) = (start, reading.input.end()?);
                reading.pass(&mut next, &end, &mut |rows| Ok(sink.commit_rows(&rows)?))?;
                (Written::Topic(druid.topic), 0)
            }
        };
        let unnamed = reading.replayer.unnamed_sources();
        if !unnamed.is_empty() {
            tracing::warn!(
                sources = %unnamed.join(", "),
                "records of sources this configuration does not name were left out of the replay"
            );
        }
        let p = &reading.replayer.progress;
        Ok(ReplaySummary {
            written,
            read: p.read.load(Ordering::Relaxed),
            in_range: p.in_range.load(Ordering::Relaxed),
            rows: p.rows.load(Ordering::Relaxed),
            refused: p.refused.load(Ordering::Relaxed),
            buckets,
            range,
        })
    }
}

/// Into the store at `path`: into `replay_<into>` from `start` to the hand-off's end as the replay
/// starts; or, without `into`, into a staging table caught up with the live position and swapped
/// into `rollup`. Returns the table written; on failure the staging table is dropped.
fn into_store(
    reading: &mut Reading,
    path: &std::path::Path,
    into: Option<&str>,
    start: Positions,
) -> anyhow::Result<String> {
    let range = reading.replayer.range;
    let staging = into.map_or_else(|| format!("staging_{}", std::process::id()), str::to_owned);
    let mut store = EmbeddedStore::open_replay(path, Duration::from_secs(60), &staging)?;
    let table = format!("{REPLAY_PREFIX}{staging}");
    let outcome = (|| -> anyhow::Result<String> {
        let mut next = start;
        if into.is_some() {
            let end = reading.input.end()?;
            reading.pass(&mut next, &end, &mut |rows| Ok(store.roll_up(&rows)?))?;
            return Ok(table.clone());
        }
        // Catch up with the live position, then swap under the store's write lock with the last
        // stretch read inside it.
        let topic = reading.input.position_topic().to_owned();
        loop {
            let target = store.live_positions(&topic)?;
            // A partition the live role reads but the replay did not know of is read from its start.
            for p in target.keys() {
                next.entry(*p).or_insert(0);
            }
            let behind: i64 = target.iter().map(|(p, to)| (to - next.get(p).copied().unwrap_or(*to)).max(0)).sum();
            if behind < SWAP_BEHIND {
                break;
            }
            reading.pass(&mut next, &target, &mut |rows| Ok(store.roll_up(&rows)?))?;
        }
        // The swap deletes the range's buckets of every source: refused, before and inside it (the
        // last stretch read there), when records of a source this replay cannot rebuild were read.
        reading.replayer.refuse_unnamed()?;
        store.swap_into_rollup(&table, range, &topic, |positions| {
            let mut tail = Vec::new();
            for p in positions.keys() {
                next.entry(*p).or_insert(0);
            }
            reading.pass(&mut next, positions, &mut |rows| {
                tail.extend(rows);
                Ok(())
            })?;
            reading.replayer.refuse_unnamed()?;
            Ok::<_, anyhow::Error>(tail)
        })?;
        Ok("rollup".to_owned())
    })();
    drop(store);
    outcome.inspect_err(|_| {
        let _ = EmbeddedStore::drop_replay(path, &staging);
    })
}

/// Buckets of `table` in the replayed range.
fn buckets_in(store: &std::path::Path, table: &str, range: (i64, Option<i64>)) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let n: i64 = conn.query_row(
        &format!("SELECT count(*) FROM {table} WHERE bucket_ms >= ?1 AND bucket_ms < ?2"),
        [range.0, range.1.unwrap_or(i64::MAX)],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What each batch of records read goes through, whatever it was read from: the range's records,
/// per source, through the source's chain, and the rows with their names.
struct Replayer {
    chains: HashMap<u32, Chain>,
    sources: HashMap<u32, Arc<str>>,
    symbols: Arc<Symbols>,
    progress: Arc<ReplayProgress>,
    /// Symbol names by id, so the dictionary is asked once per symbol.
    names: HashMap<u32, Arc<str>>,
    /// Trade times replayed: from the first, up to the last (exclusive; `None`: no end).
    range: (i64, Option<i64>),
    /// Per-source input buffers, reused.
    by_source: BTreeMap<u32, Vec<u8>>,
    /// Records in the range of sources the configuration does not name, by source id: left out,
    /// so a replay into `rollup` is refused (it would delete their buckets and rebuild nothing).
    left_out: BTreeMap<u32, u64>,
    /// Some link keeps state: every record read goes through the chains (those before the range
    /// only move the state), and the rows and refusals in the range are kept.
    stateful: bool,
}

impl Replayer {
    /// The rows of one batch of records (those in the range, through their source's chain).
    fn rows(&mut self, records: &[&[u8]]) -> anyhow::Result<Vec<Row>> {
        for buf in self.by_source.values_mut() {
            buf.clear();
        }
        let (since, until) = self.range;
        let mut in_range = 0;
        for bytes in records {
            let Ok(view) = StreamDataView::parse(bytes) else { continue };
            let inside = view.timestamp_ms >= since && until.is_none_or(|u| view.timestamp_ms < u);
            if inside {
                in_range += 1;
                if !self.chains.contains_key(&view.source_id) {
                    *self.left_out.entry(view.source_id).or_default() += 1;
                    continue;
                }
            }
            if inside || (self.stateful && self.chains.contains_key(&view.source_id)) {
                push_delimited(self.by_source.entry(view.source_id).or_default(), view.as_bytes());
            }
        }
        self.progress.read.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.progress.in_range.fetch_add(in_range, Ordering::Relaxed);
        replay_batch(
            &self.by_source,
            &mut self.chains,
            &self.sources,
            &self.symbols,
            &mut self.names,
            (&self.progress, self.stateful.then_some(self.range)),
        )
    }

    /// The sources the configuration does not name whose records were in the range so far, each
    /// as `name (id N, M records)`; records of ids that are no source's in the dictionary are not
    /// among them (the live role never rolled them up: it dead-letters them).
    fn unnamed_sources(&self) -> Vec<String> {
        self.left_out
            .iter()
            .filter_map(|(id, n)| self.symbols.source_name(*id).map(|name| format!("{name} (id {id}, {n} records)")))
            .collect()
    }

    /// Refuses a replay into `rollup` that met records of sources it cannot rebuild: replacing the
    /// range's buckets would delete theirs.
    ///
    /// # Errors
    /// A message naming those sources.
    fn refuse_unnamed(&self) -> anyhow::Result<()> {
        let unnamed = self.unnamed_sources();
        if unnamed.is_empty() {
            return Ok(());
        }
        bail!(
            "the range holds records of sources this configuration does not name: {}. Replacing the range's \
             buckets of rollup would delete theirs without rebuilding them, so nothing was changed: add them to \
             the configuration ([[source]] with their chains), or replay --into a table of its own",
            unnamed.join(", ")
        )
    }
}

/// One batch's records, per source, through its chain; the rows with their names. With `keep`
/// (stateful chains, given every record), only the rows and refusals of that time range count.
fn replay_batch(
    by_source: &BTreeMap<u32, Vec<u8>>,
    chains: &mut HashMap<u32, Chain>,
    sources: &HashMap<u32, Arc<str>>,
    symbols: &Symbols,
    names: &mut HashMap<u32, Arc<str>>,
    (progress, keep): (&ReplayProgress, Option<(i64, Option<i64>)>),
) -> anyhow::Result<Vec<Row>> {
    let inside = |t: i64| keep.is_none_or(|(since, until)| t >= since && until.is_none_or(|u| t < u));
    let mut rows = Vec::new();
    for (source, input) in by_source.iter().filter(|(_, b)| !b.is_empty()) {
        // Records of a source the configuration no longer has are left out, as the live run does.
        let (Some(chain), Some(source_name)) = (chains.get_mut(source), sources.get(source)) else { continue };
        let out = chain.run(input, &mut Unguarded).map_err(|e| anyhow::anyhow!("source {source_name}: {e}"))?;
        let refused = out
            .rejects
            .iter()
            .filter(|r| StreamDataView::parse(&r.bytes).map_or(true, |v| inside(v.timestamp_ms)))
            .count();
        progress.refused.fetch_add(refused as u64, Ordering::Relaxed);
        for record in out.parsed.into_iter().filter(|r| inside(r.timestamp_ms)) {
            let symbol = match names.get(&record.symbol_id) {
                Some(name) => name.clone(),
                None => match symbols.name(record.symbol_id) {
                    Some(name) => names.entry(record.symbol_id).or_insert(name).clone(),
                    None => {
                        progress.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
            };
            rows.push(Row {
                timestamp_ms: record.timestamp_ms,
                source: source_name.clone(),
                symbol,
                is_buy: record.is_buy,
                price_e8: record.price_e8,
                volume_e8: record.volume_e8,
                // A replayed row's latency is not the live path's: it is not recorded.
                received_at_us: 0,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use plugin_sdk::{Record, Records};

    use super::{BUCKET_MS, Input};
    use crate::handoff::LocalLogConfig;
    use crate::handoff::ProducerStats;
    use crate::handoff::local::LocalLog;

    fn whole(t: i64) -> i64 {
        t.div_euclid(BUCKET_MS) * BUCKET_MS + if t % BUCKET_MS == 0 { 0 } else { BUCKET_MS }
    }

    /// A file backfill appends old trades after newer ones, so the first record the log still holds
    /// says nothing of the trade times retention deleted: live trades of the last ten minutes were
    /// deleted, and the first batch held is a backfill of yesterday's trades, received after them.
    /// A range from yesterday, or from the deleted trades' minutes, would replace buckets the log
    /// cannot rebuild: refused. A range from the earliest time the refusal names replays.
    #[test]
    fn retention_is_judged_by_what_was_deleted_not_by_the_first_trade_time_held() {
        let dir = std::env::temp_dir().join(format!("sluice-replay-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sqlite");
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
        let now = crate::clock::now_ms();
        let (live, backfill) = (now - 600_000, now - 86_400_000);
        let batch = |first_trade_ms: i64, received_ms: i64| {
            let mut records = Records::new();
            for i in 0..100 {
                let t = first_trade_ms + i * 1_000;
                records.push(&Record {
                    source_id: 1,
                    symbol_id: 2,
                    timestamp_ms: t,
                    received_at_us: received_ms.max(t) * 1_000,
                    trade_id: i as u64,
                    ..Record::default()
                });
            }
            records
        };
        // Live trades received as they happened, then the backfill, received now.
        writer.send_records(batch(live, 0).as_bytes());
        writer.flush(Duration::from_secs(10)).unwrap();
        writer.send_records(batch(backfill, now).as_bytes());
        writer.flush(Duration::from_secs(10)).unwrap();
        drop(writer);
        // Retention deleted the live batch (offsets 0..100).
        let conn = rusqlite::Connection::open(&path).unwrap();
        assert_eq!(conn.execute("DELETE FROM batches WHERE base = 0", []).unwrap(), 1);
        drop(conn);

        let input = Input::Local(path.clone());
        for since in [backfill, live, live + 300_000] {
            let err = input.start(since, &whole).expect_err("a range retention deleted trades of").to_string();
            assert!(err.contains("before offset 100"), "{err}");
        }
        let err = input.start(live, &whole).unwrap_err().to_string();
        let earliest: i64 = err
            .split("the earliest replayable time is ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{err}"));
        assert!(earliest > live + 99_000, "{err}");
        assert!(input.start(earliest, &whole).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
