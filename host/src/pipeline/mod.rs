//! The one place that wires the stages together: [`start`] brings up the API, the hand-off (the local
//! log, or Kafka with its topics), the symbol dictionary, the plugin registry, the ingest role's
//! sources and decode workers, the process role's chains and sink, and the metrics that mirror
//! them; [`run`] keeps them running until its shutdown signal.

pub mod edits;
mod ingest;
mod process;
pub mod replay;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
pub use ingest::*;
pub use process::*;

use crate::api::{ApiState, Health};
use crate::chains::ChainBook;
use crate::config::Config;
use crate::datadir::{DataDirLock, Hold};
use crate::handoff::ProducerStats;
use crate::handoff::kafka::consumer::EventConsumer;
use crate::handoff::kafka::producer::EventProducer;
use crate::handoff::kafka::{ensure_changelog_topic, ensure_checkpoint_topic, ensure_symbols_topic, ensure_topics};
use crate::handoff::local::{LocalLog, POSITION_TOPIC};
use crate::handoff::{LogStatus, PartitionStatus, Reader, Writer};
use crate::plugin::registry::{Binding, BoundPlugin, Registry, Slot};
use crate::plugin::{Limits, PluginInstance, Runtime, RuntimeSettings, bundled};
use crate::sink::Sink;
use crate::sink::druid::{DruidSink, transactional_id};
use crate::sink::embedded::EmbeddedStore;
use crate::symbols::Symbols;
use crate::transform::Transformer;
use edits::LiveChains;

/// Which roles `sluice run` plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Both roles in one process (the default).
    All,
    /// Sources to Kafka only.
    Ingest,
    /// Kafka through the plugins to the sink only.
    Process,
}

/// The hand-off between the roles: a Kafka cluster, or the local log in the data directory.
#[derive(Clone)]
pub(crate) enum Handoff {
    /// Bootstrap servers.
    Kafka(String),
    /// The local log, open.
    Local(LocalLog),
}

impl std::fmt::Display for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handoff::Kafka(brokers) => write!(f, "Kafka at {brokers}"),
            Handoff::Local(log) => write!(f, "the local log {}", log.path().display()),
        }
    }
}

/// The roles, running.
pub struct Running {
    pub(crate) ingest: Option<Ingest>,
    pub(crate) producer: Arc<Writer>,
    pub(crate) process: Option<ProcessRole>,
    pub(crate) handoff: Handoff,
    /// Where the HTTP API listens.
    pub(crate) api_addr: std::net::SocketAddr,
    /// Stops the API server and the health checks.
    pub(crate) api_stop: tokio::sync::watch::Sender<bool>,
    pub(crate) api_task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The data directory's lock, held as long as the roles run (released when this is dropped,
    /// or by the kernel when the process ends).
    pub(crate) _data_dir: DataDirLock,
}

/// The process role's thread, its stop flag and counters.
pub(crate) struct ProcessRole {
    pub(crate) thread: std::thread::JoinHandle<anyhow::Result<()>>,
    pub(crate) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) stats: Arc<ProcessStats>,
    /// The embedded store, when that is the sink.
    pub(crate) store_path: Option<PathBuf>,
}

/// Opens the plugin registry under the data directory and deploys the plugins the sources use in
/// `role` (decoders for ingest, the links of their chains for process; the configured file or the
/// bundled plugin; a version already stored stays on the version the API last
/// activated). Compiles off the async runtime.
async fn open_plugins(
    config: &Config,
    role: Role,
    book: Arc<ChainBook>,
    symbols: Arc<Symbols>,
    metrics: Arc<crate::telemetry::Metrics>,
) -> anyhow::Result<(Arc<Registry>, HashMap<String, Arc<Slot>>)> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let limits: HashMap<String, Limits> =
            config.plugins.iter().map(|(name, p)| (name.clone(), Limits::from(p))).collect();
        let settings = runtime_settings(&config, role, &book, &limits);
        tracing::debug!(
            instances = settings.max_instances,
            memory_bytes = settings.max_memory_bytes,
            "plugin instance pool"
        );
        let runtime = Arc::new(Runtime::new(settings, symbols)?.with_metrics(metrics));
        // What this instance runs: each source's decoder in the ingest role, each link of its chain
        // in the process role; an upload is checked against every configuration it is bound with.
        let mut bindings: HashMap<String, Vec<Binding>> = HashMap::new();
        for s in &config.sources {
            if role != Role::Process {
                bindings
                    .entry(s.decode.clone())
                    .or_default()
                    .push(Binding { source: s.name.clone(), config: s.decode_pairs() });
            }
            if role != Role::Ingest {
                for link in book.chain(&s.name).unwrap_or_default() {
                    let binding = Binding { source: s.name.clone(), config: link.config_pairs() };
                    bindings.entry(link.plugin.clone()).or_default().push(binding);
                }
            }
        }
        let mut wanted: Vec<String> = bindings.keys().cloned().collect();
        wanted.sort_unstable();
        let registry = Arc::new(Registry::open(runtime, &config.data_dir.join("plugins"), limits, bindings)?);
        let mut slots = HashMap::new();
        for name in &wanted {
            let name = name.as_str();
            let slot = match plugin_bytes(&config, name) {
                Ok(wasm) => registry.deploy(name, &wasm).with_context(|| format!("plugin {name}"))?,
                // Uploaded over the API and put in a chain there: the version the registry keeps.
                Err(e) => registry.load(name).map_err(|_| e)?,
            };
            slots.insert(name.to_owned(), slot);
        }
        Ok((registry, slots))
    })
    .await?
}

/// The plugin instance pool this configuration needs in `role`: an instance per source's decoder
/// (a worker instantiates only the bindings of the sources it owns) and per link of each chain,
/// each of them with room for a shadow beside it and for the next version while a swap starts it,
/// plus a margin; each slot sized for the largest memory limit configured. A fixed pool would
/// refuse a start with many sources or links, or reserve far more than a small one needs.
fn runtime_settings(
    config: &Config,
    role: Role,
    book: &ChainBook,
    limits: &HashMap<String, Limits>,
) -> RuntimeSettings {
    let mut instances: u32 = 0;
    for s in &config.sources {
        if role != Role::Process {
            instances = instances.saturating_add(1);
        }
        if role != Role::Ingest {
            instances = instances.saturating_add(book.chain(&s.name).map_or(0, |c| c.len()) as u32);
        }
    }
    let memory = limits.values().map(|l| l.memory_bytes).chain([Limits::default().memory_bytes]).max();
    RuntimeSettings {
        max_instances: instances.saturating_mul(3).saturating_add(16),
        max_memory_bytes: memory.unwrap_or(Limits::default().memory_bytes),
        ..RuntimeSettings::default()
    }
}

/// The component of plugin `name`: the file `[plugins.<name>] path` names, or the bundled one.
pub(crate) fn plugin_bytes(config: &Config, name: &str) -> anyhow::Result<Vec<u8>> {
    match config.plugins.get(name).and_then(|p| p.path.as_ref()) {
        Some(path) => std::fs::read(path).with_context(|| format!("plugin {name}: cannot read {}", path.display())),
        None => Ok(bundled::by_name(name)
            .with_context(|| format!("plugin {name} is not bundled and has no path"))?
            .to_vec()),
    }
}

/// Starts the roles asked for: the broker (embedded unless configured), the topics, the shared symbol
/// dictionary, the plugins, the sources (ingest), and the consumer that transforms each source's
/// records with its plugin and delivers them to the sink (process).
pub async fn start(config: &Config, role: Role) -> anyhow::Result<Running> {
    if role != Role::Ingest {
        config.check_druid_instance().map_err(anyhow::Error::msg)?;
    }
    if config.api.read_token && config.api.token.is_none() {
        bail!("[api] read_token needs the token: set SLUICE_API_TOKEN");
    }
    // The data directory first: a second process on it is refused before it touches anything (or
    // takes the first one's API address). Roles run apart share it with each other.
    let hold = if role == Role::All { Hold::Alone } else { Hold::Shared };
    let data_dir = DataDirLock::acquire(&config.data_dir, hold)?;
    // The chains each source runs: the configuration's, or as the API edited them.
    let book = Arc::new(ChainBook::open(&config.data_dir, config.chains())?);
    // Then the API, so an operator can watch readiness while the rest starts.
    let health = Arc::new(Health::new());
    health.expect(if config.kafka.brokers.trim().is_empty() { "log" } else { "kafka" });
    health.expect("plugins");
    if role != Role::Ingest {
        health.expect("sink");
        health.expect("breakers");
    }
    let store_path =
        (role != Role::Ingest && config.sink.druid.is_none()).then(|| config.data_dir.join("store.sqlite"));
    let listener = tokio::net::TcpListener::bind(config.api.bind)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API ([api] bind)", config.api.bind))?;
    let api_addr = listener.local_addr()?;
    let (api_stop, _) = tokio::sync::watch::channel(false);
    let directory = Arc::new(crate::api::SourceDirectory::default());
    let plugin_api = Arc::new(crate::api::PluginDirectory::default());
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let api_state = ApiState::new(&config.api, store_path.clone(), health.clone())
        .with_sources(directory.clone())
        .with_plugins(plugin_api.clone())
        .with_metrics(metrics.clone());
    // Chain edits where this instance runs the chains.
    let api_state = if role != Role::Ingest { api_state.with_chains(book.clone()) } else { api_state };
    // Replays over HTTP wherever this instance delivers to a sink: the store, or the Druid topic.
    if role != Role::Ingest {
        let config = Arc::new(config.clone());
        api_state.replays().set_starter(Arc::new(move |spec, progress, stop| {
            let config = config.clone();
            Box::pin(async move { replay::replay(&config, &spec, progress, stop).await.map_err(|e| format!("{e:#}")) })
        }));
    }
    let router = crate::api::router(api_state.clone());
    let mut api_stopped = api_stop.subscribe();
    let connections = crate::api::Connections::new(&config.api, metrics.clone());
    let api_task = tokio::spawn(crate::api::serve(listener, router, connections, async move {
        let _ = api_stopped.wait_for(|s| *s).await;
    }));
    tracing::info!(addr = %api_addr, "HTTP API listening");

    let kafka = &config.kafka;
    let (handoff, symbols, producer) = if kafka.brokers.trim().is_empty() {
        if role != Role::All {
            bail!("running one role on its own needs [kafka] brokers, which the other role shares");
        }
        let (handoff, symbols, producer) = open_local_log(config, store_path.as_deref()).await?;
        if let Handoff::Local(log) = &handoff {
            tokio::spawn(watch_local_log(log.clone(), health.clone(), api_stop.subscribe()));
        }
        (handoff, symbols, producer)
    } else {
        let brokers = kafka.brokers.clone();
        ensure_topics(kafka, &brokers, &[&kafka.events_topic, &kafka.dlq_topic], kafka.partitions).await?;
        ensure_symbols_topic(kafka, &brokers).await?;
        if let Some(druid) = &config.sink.druid {
            ensure_topics(kafka, &brokers, &[&druid.topic], kafka.partitions).await?;
            ensure_changelog_topic(kafka, &brokers, &druid.state_topic()).await?;
            ensure_checkpoint_topic(kafka, &brokers, &druid.checkpoint_topic(), &kafka.events_topic).await?;
        }
        let (k, b) = (kafka.clone(), brokers.clone());
        let symbols = Arc::new(
            tokio::task::spawn_blocking(move || Symbols::shared(&k, &b, &k.symbols_topic, Duration::from_secs(30)))
                .await?
                .context("symbol dictionary")?,
        );
        let producer = Arc::new(Writer::Kafka(EventProducer::new(kafka, &brokers)?));
        tokio::spawn(watch_kafka(producer.clone(), health.clone(), api_stop.subscribe()));
        (Handoff::Kafka(brokers), symbols, producer)
    };
    api_state.set_log(log_probe(config, &handoff, store_path.clone())?);
    let _ = api_state.dead_letter_source().symbols.set(symbols.clone());
    if matches!(handoff, Handoff::Kafka(_)) {
        let _ = api_state.dead_letter_source().topic.set(kafka.dlq_topic.clone());
    }
    // Source ids, stable per name (kept in the symbol dictionary): records in the log keep meaning
    // the same source across restarts and config edits.
    let source_ids: Vec<u32> = {
        let (dictionary, names) = (symbols.clone(), config.sources.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
        tokio::task::spawn_blocking(move || {
            names.iter().map(|n| dictionary.source_id(n)).collect::<Result<Vec<_>, _>>()
        })
        .await?
        .context("source ids")?
    };
    let (registry, plugins) = open_plugins(config, role, book.clone(), symbols.clone(), metrics.clone()).await?;
    plugin_api.set(registry.clone());
    let mut names: Vec<&str> = plugins.keys().map(String::as_str).collect();
    names.sort_unstable();
    health.set("plugins", true, format!("loaded: {}", names.join(", ")));
    let producer_stats = producer.stats().clone();
    metrics.on_scrape(move |m| m.mirror_producer(&producer_stats.sample()));
    if let Handoff::Local(log) = &handoff {
        let log = log.clone();
        metrics.on_scrape(move |m| m.mirror_log(&log.sample()));
    }
    let ingest = if role != Role::Process {
        let settings = IngestSettings::from(&config.ingest);
        let marks = restore_marks(config, &handoff, &source_ids, &producer).await?;
        let ingest =
            Ingest::start_with_ids(config.sources.clone(), &source_ids, &plugins, producer.clone(), settings, &marks)?;
        directory.set(
            ingest
                .sources()
                .iter()
                .map(|h| crate::api::SourceEntry {
                    name: h.config.name.clone(),
                    plugin: h.config.decode.clone(),
                    slot: plugins[&h.config.decode].clone(),
                    transforms: book
                        .chain(&h.config.name)
                        .unwrap_or_default()
                        .iter()
                        .map(|l| (l.plugin.clone(), plugins.get(&l.plugin).cloned()))
                        .collect(),
                    stats: h.stats.clone(),
                    decode: h.decode.clone(),
                    running: h.running.clone(),
                })
                .collect(),
        );
        let sources: Vec<_> =
            ingest.sources().iter().map(|h| (h.config.name.clone(), h.stats.clone(), h.decode.clone())).collect();
        metrics.on_scrape(move |m| {
            let now_us = crate::clock::now_us();
            for (name, stats, decode) in &sources {
                m.mirror_source(name, &decode.sample(stats), now_us);
            }
        });
        Some(ingest)
    } else {
        None
    };
    if let (Some(druid), true, Handoff::Kafka(brokers)) = (&config.sink.druid, role != Role::Ingest, &handoff) {
        // A spec that does not pass the offline checks stops the start; it is never posted.
        crate::sink::druid::supervisor_spec(druid, crate::proto::DESCRIPTOR_SET, brokers)
            .context("[sink.druid] does not make a valid supervisor spec")?;
        health.expect("druid");
        tokio::spawn(keep_druid_supervisor(
            druid.clone(),
            brokers.clone(),
            health.clone(),
            metrics.clone(),
            api_stop.subscribe(),
        ));
    }
    let process = if role != Role::Ingest {
        let process = start_process(
            config,
            &source_ids,
            &handoff,
            &plugins,
            Shared { symbols, health, metrics: metrics.clone() },
            store_path,
            Arc::new(LiveChains::new(book, registry, Duration::from_millis(config.process.link_budget_ms.max(1)))),
        )
        .await?;
        let stats = process.stats.clone();
        directory.set_link_rejects(stats.link_rejects.clone());
        metrics.on_scrape(move |m| m.mirror_process(&stats.sample()));
        Some(process)
    } else {
        None
    };
    Ok(Running { ingest, producer, process, handoff, api_addr, api_stop, api_task, _data_dir: data_dir })
}

/// A panic of the process role, as the error its supervisor handles like any other failure.
#[derive(Debug, thiserror::Error)]
#[error("the process role panicked: {0}")]
pub struct Panicked(String);

/// Runs `attempt`, turning a panic into a [`Panicked`] error.
fn caught(attempt: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(attempt)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Panicked(message).into())
    })
}

/// How long a stop waits for the process role.
const STOP_PROCESS_WITHIN: Duration = Duration::from_secs(8);

/// How many records at the end of each partition of the events topic a start on Kafka reads to
/// recover each symbol's recent trade ids.
const TAIL_RECORDS: i64 = 65_536;

/// What ingest kept with the batches it delivered: from the local log's tables, or, on Kafka, the
/// trade ids at the tail of the events topic and the file sources' positions in the files topic.
/// On Kafka each file source's appender is opened first (settling what a previous run left open)
/// and attached to `producer`, so its records and position commit together from here on.
async fn restore_marks(
    config: &Config,
    handoff: &Handoff,
    source_ids: &[u32],
    producer: &Arc<Writer>,
) -> anyhow::Result<crate::handoff::Marks> {
    let (handoff, kafka) = (handoff.clone(), config.kafka.clone());
    let files: Vec<(u32, String)> = source_ids
        .iter()
        .zip(&config.sources)
        .filter(|(_, s)| s.kind == crate::config::SourceKind::File)
        .map(|(id, s)| (*id, s.name.clone()))
        .collect();
    if let (Handoff::Kafka(brokers), false) = (&handoff, files.is_empty()) {
        crate::handoff::kafka::ensure_changelog_topic(&kafka, brokers, &kafka.files_topic).await?;
    }
    let (producer, data_dir) = (producer.clone(), config.data_dir.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let marks = match &handoff {
            Handoff::Local(log) => log.marks()?,
            Handoff::Kafka(brokers) => {
                // The appenders first: opening them settles a transaction a killed run left open,
                // which read_committed readers of the topics would otherwise wait behind.
                let mut files_marks = Vec::new();
                if let (false, Writer::Kafka(p)) = (files.is_empty(), &*producer) {
                    use crate::handoff::kafka::files::{FileAppenders, next_generation, read_marks};
                    let timeout = Duration::from_secs(30);
                    let generation = next_generation(&kafka, brokers, &files, &data_dir, timeout)
                        .context("settling what the file sources' last transactions left open")?;
                    let ids = files.iter().map(|(id, name)| (name.clone(), *id)).collect();
                    files_marks = read_marks(&kafka, brokers, &ids)
                        .with_context(|| format!("reading the file sources' positions from {}", kafka.files_topic))?;
                    let appenders =
                        FileAppenders::open(&kafka, brokers, &files, generation, p.stats().clone(), timeout)
                            .context("opening the file sources' transactional producers")?;
                    if p.attach_files(appenders).is_err() {
                        bail!("the file sources' appenders were attached twice");
                    }
                }
                let topic = &kafka.events_topic;
                let mut marks = crate::handoff::kafka::range::RangeReader::new(&kafka, brokers, topic)?
                    .trade_marks(TAIL_RECORDS)
                    .with_context(|| format!("reading the tail of {topic} for the trade ids already delivered"))?;
                marks.files = files_marks;
                marks
            }
        };
        tracing::info!(
            symbols = marks.trades.len(),
            files = marks.files.len(),
            "restored what ingest delivered before"
        );
        Ok(marks)
    })
    .await?
}

/// Opens the local log in the data directory, checks the store's position against it (a store
/// ahead of its log stops the start), and opens the symbol dictionary and the appender on it.
async fn open_local_log(config: &Config, store: Option<&Path>) -> anyhow::Result<(Handoff, Arc<Symbols>, Arc<Writer>)> {
    let (path, log_config, store) =
        (config.data_dir.join("log.sqlite"), config.local_log.clone(), store.map(Path::to_owned));
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let log = LocalLog::open(&path, &log_config)?;
        if let Some(store) = store {
            let offsets = EmbeddedStore::open(&store, Duration::from_secs(60))?.offsets(POSITION_TOPIC)?;
            let position = offsets.iter().find(|o| o.1 == 0).map(|o| o.2);
            match log.check_position(position) {
                Err(crate::handoff::LogError::StoreAhead { store, .. }) if log_config.resume_past_lost_tail => {
                    log.resume_at(store)?;
                    log.check_position(position)?;
                }
                checked => checked?,
            }
        }
        let symbols = Arc::new(Symbols::local(log.path()).context("symbol dictionary")?);
        let writer = Arc::new(Writer::Local(log.writer(Arc::new(ProducerStats::default()))?));
        Ok((Handoff::Local(log), symbols, writer))
    })
    .await?
}

/// What `GET /v1/log` reads: the local log's own positions, or each partition's watermarks and the
/// sink's committed offsets (the store's, or the consumer group's for Druid) on Kafka.
fn log_probe(config: &Config, handoff: &Handoff, store: Option<PathBuf>) -> anyhow::Result<crate::api::LogProbe> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    // The store's dead letters, when there is a store to read.
    let store_dead_letters = |store: &Option<PathBuf>| {
        store.as_deref().filter(|p| p.exists()).and_then(|p| crate::sink::embedded::stored_dead_letters(p).ok())
    };
    let brokers = match handoff {
        Handoff::Local(log) => {
            let log = log.clone();
            return Ok(Arc::new(move || {
                Ok(LogStatus {
                    mode: "local",
                    partitions: vec![log.status()],
                    local: Some(log.sizes()),
                    store_dead_letters: store_dead_letters(&store),
                })
            }));
        }
        Handoff::Kafka(brokers) => brokers,
    };
    let mut c = config.kafka.client_config(brokers);
    c.set("group.id", &config.process.group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().context("a Kafka client for /v1/log")?;
    let topic = config.kafka.events_topic.clone();
    Ok(Arc::new(move || {
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).map_err(|e| e.to_string())?;
        let count = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        let committed: HashMap<i32, i64> = match &store {
            Some(path) if path.exists() => crate::sink::embedded::stored_offsets(path, &topic)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(_, p, o)| (p, o))
                .collect(),
            Some(_) => HashMap::new(),
            None => {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..count {
                    tpl.add_partition(&topic, p);
                }
                let got = consumer.committed_offsets(tpl, timeout).map_err(|e| e.to_string())?;
                got.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
                    .collect()
            }
        };
        let mut partitions = Vec::new();
        for p in 0..count {
            let (start, end) = consumer.fetch_watermarks(&topic, p, timeout).map_err(|e| e.to_string())?;
            let committed = committed.get(&p).copied().unwrap_or(start);
            partitions.push(PartitionStatus { partition: p, start, end, committed, lag: (end - committed).max(0) });
        }
        Ok(LogStatus { mode: "kafka", partitions, local: None, store_dead_letters: store_dead_letters(&store) })
    }))
}

/// Applies the Druid supervisor spec through the Overlord (again after failures) and then polls the
/// supervisor's status and health, for `/health/ready`.
async fn keep_druid_supervisor(
    druid: crate::sink::druid::DruidSinkConfig,
    brokers: String,
    health: Arc<Health>,
    metrics: Arc<crate::telemetry::Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match crate::sink::druid::OverlordClient::from_config(&druid) {
        Ok(client) => client,
        Err(e) => {
            health.set("druid", false, format!("{e}"));
            return;
        }
    };
    let mut id = None;
    loop {
        let pause = match &id {
            None => match client.apply(&druid, crate::proto::DESCRIPTOR_SET, &brokers).await {
                Ok(applied) => {
                    tracing::info!(supervisor = %applied, "Druid supervisor spec applied");
                    health.set("druid", false, "spec applied; waiting for the supervisor's first status");
                    id = Some(applied);
                    Duration::ZERO
                }
                Err(e) => {
                    metrics.druid_overlord_errors_total.inc();
                    tracing::warn!(error = %e, "applying the Druid supervisor spec failed; will retry");
                    health.set("druid", false, format!("applying the supervisor spec: {e}"));
                    if e.is_retriable() { Duration::from_secs(5) } else { Duration::from_secs(60) }
                }
            },
            Some(supervisor) => {
                let polled = client.poll_once(supervisor).await;
                metrics.druid_supervisor_healthy.set(i64::from(polled.as_ref().is_ok_and(|p| p.healthy)));
                match &polled {
                    Ok(poll) => metrics.druid_supervisor_lag_messages.set(poll.status.aggregate_lag.unwrap_or(0)),
                    Err(_) => metrics.druid_overlord_errors_total.inc(),
                }
                match polled {
                    Ok(poll) => {
                        health.set("druid", poll.healthy, format!("supervisor {supervisor}: {}", poll.status.state))
                    }
                    Err(e) => health.set("druid", false, format!("supervisor {supervisor}: {e}")),
                }
                druid.poll_interval()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Checks every few seconds that the Kafka cluster answers, for `/health/ready`.
async fn watch_kafka(producer: Arc<Writer>, health: Arc<Health>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let p = producer.clone();
        let reachable = move || match &*p {
            Writer::Kafka(p) => p.reachable(Duration::from_secs(5)),
            Writer::Local(_) => Ok(0),
        };
        match tokio::task::spawn_blocking(reachable).await {
            Ok(Ok(brokers)) => health.set("kafka", true, format!("{brokers} broker(s) answering")),
            Ok(Err(e)) => health.set("kafka", false, e),
            Err(e) => health.set("kafka", false, e.to_string()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Keeps `/health/ready`'s `log` check: not ready while the local log refuses new records (its
/// commits fail: a full disk, say), ready again once it commits.
async fn watch_local_log(log: LocalLog, health: Arc<Health>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last = None;
    loop {
        let refusing = log.refusing();
        if last != Some(refusing) {
            match refusing {
                None => health.set("log", true, format!("local log at {}", log.path().display())),
                Some(why) => health.set(
                    "log",
                    false,
                    format!(
                        "the local log at {} cannot commit ({}): new records are refused and counted in \
                         sluice_log_refused_records_total until it can",
                        log.path().display(),
                        why.as_str()
                    ),
                ),
            }
            last = Some(refusing);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// What the roles share: the symbol dictionary, the health checks and the metrics.
struct Shared {
    symbols: Arc<Symbols>,
    health: Arc<Health>,
    metrics: Arc<crate::telemetry::Metrics>,
}

/// Each configured source's chain, by source id: its links bound to their registry slots, each
/// starting from the state the store committed for it.
fn live_chains(
    config: &Config,
    source_ids: &[u32],
    book: &ChainBook,
    plugins: &HashMap<String, Arc<Slot>>,
    store_path: Option<&Path>,
    changelog: Option<&crate::sink::druid::state::StoredState>,
    stats: &ProcessStats,
) -> anyhow::Result<HashMap<u32, crate::chain::Chain>> {
    let mut chains = HashMap::new();
    // The chains' state as the store committed it with its position, or as the Druid sink's
    // changelog holds it with the group's offsets.
    let store = match store_path {
        Some(path) => Some(EmbeddedStore::open(path, Duration::from_secs(60))?),
        None => None,
    };
    for (&id, source) in source_ids.iter().zip(&config.sources) {
        let mut chain = Vec::new();
        for link in book.chain(&source.name).unwrap_or_default() {
            let i = link.state_key;
            let slot = plugins.get(&link.plugin).with_context(|| format!("plugin {} is not loaded", link.plugin))?;
            let instance = PluginInstance::new(&slot.active(), &link.config_pairs())
                .with_context(|| format!("source {}: plugin {}", source.name, link.plugin))?;
            let mut transformer = Transformer::bound(BoundPlugin::new(slot.clone(), instance))
                .with_budget(Duration::from_millis(config.process.link_budget_ms.max(1)));
            let stored = match (&store, changelog) {
                (Some(store), _) => store.plugin_state(&source.name, i)?,
                (None, Some(changelog)) => changelog.plugin_state(&source.name, i),
                (None, None) => None,
            };
            if let Some((format, entries)) = stored {
                transformer.load_state(crate::transform::LinkState::committed(format, entries));
            }
            if changelog.is_some() && transformer.state().format().is_some() {
                tracing::warn!(
                    source = %source.name,
                    plugin = %link.plugin,
                    group = %config.process.group,
                    "a stateful link with the Druid sink: run one process instance in this group (state is kept \
                     per link, not per partition)"
                );
            }
            chain.push((i, transformer));
            stats.watch_breaker(&source.name, &link.plugin);
        }
        chains.insert(id, crate::chain::Chain::keyed(id, chain));
    }
    Ok(chains)
}

/// The process role on its own thread: each source's records through its plugin's transform, into
/// the configured sink. A failure (say, an aborted transaction) restarts the role from the last
/// committed offsets after a pause.
async fn start_process(
    config: &Config,
    source_ids: &[u32],
    handoff: &Handoff,
    plugins: &HashMap<String, Arc<Slot>>,
    shared: Shared,
    store_path: Option<PathBuf>,
    edits: Arc<LiveChains>,
) -> anyhow::Result<ProcessRole> {
    let Shared { symbols, health, metrics } = shared;
    // Source ids as the ingest role stamps them (stable per name, from the dictionary).
    let stats = Arc::new(ProcessStats::default());
    let changelog = match (&config.sink.druid, handoff) {
        (Some(druid), Handoff::Kafka(brokers)) => {
            let (kafka, brokers, druid) = (config.kafka.clone(), brokers.clone(), druid.clone());
            let id = transactional_id(&config.process.group, config.process.instance());
            let timeout = Duration::from_secs(30);
            let read = tokio::task::spawn_blocking(move || {
                // A previous incarnation may have run with more producers: their transactions are
                // settled before the changelog and the offsets are read.
                let in_use = druid.transactions_in_flight as usize;
                crate::sink::druid::delivery::fence_unused(&kafka, &brokers, &id, in_use, timeout)?;
                crate::sink::druid::state::restore(&kafka, &brokers, &druid, &id, timeout)
            });
            Some(read.await?.context("restoring plugin state from the Druid sink's changelog")?)
        }
        _ => None,
    };
    let mut transformers =
        live_chains(config, source_ids, &edits.book, plugins, store_path.as_deref(), changelog.as_ref(), &stats)?;
    // The configured sources' names by id; records of other ids are dead-lettered (no plugin is
    // bound to them).
    let sources = source_ids.iter().zip(&config.sources).map(|(&id, s)| (id, Arc::from(s.name.as_str()))).collect();
    let names = Names { sources, symbols };
    health.set("breakers", true, "all closed");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let overlapped = metrics.druid_transactions_overlapped_total.clone();
    let settings = ProcessSettings {
        partitions: config.kafka.partitions,
        batch: crate::batch::BatchConfig::from(&config.process),
        health: Some(health),
        metrics: Some(metrics),
        edits: Some(edits),
        ..ProcessSettings::default()
    };
    // The store keeps its state checkpoints as long as the hand-off keeps the records after them:
    // the local log's retention, or the events topic's.
    let checkpoints_kept = match (handoff, &store_path) {
        (Handoff::Kafka(brokers), Some(_)) => {
            let events = &config.kafka.events_topic;
            match crate::handoff::kafka::topic_retention_ms(&config.kafka, brokers, events).await {
                Ok(ms) => u64::try_from(ms).map_or(Duration::MAX, Duration::from_millis),
                Err(e) => {
                    tracing::warn!(topic = %events, error = %e, "the events topic's retention is unknown; state checkpoints are kept for [local_log] retention_ms");
                    Duration::from_millis(config.local_log.retention_ms)
                }
            }
        }
        _ => Duration::from_millis(config.local_log.retention_ms),
    };
    let (config, handoff, path) = (config.clone(), handoff.clone(), store_path.clone());
    let (stop_flag, counters) = (stop.clone(), stats.clone());
    let thread = std::thread::Builder::new().name("sluice-process".into()).spawn(move || -> anyhow::Result<()> {
        let mut pause = Duration::from_millis(200);
        let mut breakers = Breakers::default();
        // After a failure other than an open breaker a commit may have taken effect unreported: the
        // chains then start again from the sink's committed state, not from memory's.
        let mut unsure = false;
        loop {
            // A panic in the role is a failure like any other: logged, shown on /health/ready, and
            // the role starts again from the last commit (never a thread that is gone for good).
            let result = caught(|| -> anyhow::Result<()> {
                let consumer = match &handoff {
                    Handoff::Kafka(brokers) => Reader::Kafka(EventConsumer::new(
                        &config.kafka,
                        brokers,
                        &config.process.group,
                        Some(config.process.instance()),
                    )?),
                    Handoff::Local(log) => Reader::Local(log.reader()?, log.clone()),
                };
                let mut sink: Box<dyn Sink> = match (&config.sink.druid, &path, &handoff) {
                    (Some(druid), _, Handoff::Kafka(brokers)) => Box::new(
                        DruidSink::new(
                            &config.kafka,
                            brokers,
                            druid,
                            &transactional_id(&config.process.group, config.process.instance()),
                            Duration::from_secs(30),
                        )?
                        .with_checkpoints(
                            druid.checkpoint_topic(),
                            Duration::from_millis(config.process.checkpoint_interval_ms),
                        )
                        .with_overlap_counter(overlapped.clone()),
                    ),
                    (None, Some(path), _) => {
                        let store = EmbeddedStore::open(path, Duration::from_secs(60))?
                            .with_checkpoints(crate::sink::embedded::CheckpointPolicy {
                                every: Duration::from_millis(config.process.checkpoint_interval_ms),
                                keep: checkpoints_kept,
                            })
                            .with_dead_letter_retention(crate::sink::embedded::DeadLetterPolicy {
                                keep: Duration::from_millis(config.local_log.dead_letter_retention_ms),
                                max_bytes: config.local_log.dead_letter_max_bytes,
                            });
                        Box::new(store)
                    }
                    _ => {
                        bail!("no sink: the Druid sink needs [kafka] brokers, and the embedded store a data directory")
                    }
                };
                if unsure {
                    restore_committed(&mut transformers, sink.as_mut(), &names)
                        .context("reading the chains' committed state back")?;
                    unsure = false;
                }
                tracing::info!(sink = sink.name(), group = %config.process.group, "process role started");
                run_process(
                    Process {
                        reader: &consumer,
                        chains: &mut transformers,
                        breakers: &mut breakers,
                        sink: sink.as_mut(),
                        names: &names,
                        settings: &settings,
                        stats: &counters,
                    },
                    &stop_flag,
                )
            });
            if result.as_ref().is_err_and(|e| e.is::<Panicked>()) {
                counters.panics.fetch_add(1, Ordering::Relaxed);
            }
            let stopping = || stop_flag.load(Ordering::Relaxed);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if stopping() => return Err(e),
                Err(e) => {
                    let wait = match e.downcast_ref::<ProcessError>() {
                        // The source is held from now on (see `run_process`): read again from the
                        // last commit at once, so the other sources lose no more than that.
                        Some(ProcessError::BreakerOpen { .. }) => {
                            let wait = breakers.wait(std::time::Instant::now());
                            tracing::warn!(error = %e, cool_down_ms = wait.as_millis() as u64, "the source's records wait in the log; the other sources go on");
                            Duration::from_millis(50)
                        }
                        Some(ProcessError::TrialDue) => Duration::ZERO,
                        None => {
                            unsure = true;
                            if let Some(health) = &settings.health {
                                health.set("sink", false, format!("{e:#}"));
                            }
                            if let Some(crate::handoff::LogError::RecordsDeleted { deleted, .. }) = e.downcast_ref() {
                                // Not resumed by trying again: an operator must act. Tried again (with
                                // the backoff) so that the role goes on once they have.
                                let records = deleted.iter().map(|d| (d.start - d.position).max(0) as u64).sum();
                                counters.deleted_unread.store(records, Ordering::Relaxed);
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    "the process role stopped: retention deleted records it had not read"
                                );
                            } else {
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    "process role failed; resuming from the last commit"
                                );
                            }
                            pause = (pause * 2).min(Duration::from_secs(10));
                            pause
                        }
                    };
                    // Sleep in short steps so a stop request is not kept waiting.
                    let until = std::time::Instant::now() + wait;
                    while std::time::Instant::now() < until && !stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if stopping() {
                        return Ok(());
                    }
                }
            }
        }
    })?;
    Ok(ProcessRole { thread, stop, stats, store_path })
}

impl Running {
    /// Frames read, frames dropped (queue full), records decoded, records delivered, frames refused,
    /// ids missing, sources up.
    pub fn counts(&self) -> [u64; 7] {
        let Some(ingest) = &self.ingest else { return [0; 7] };
        let sum = |f: &dyn Fn(&SourceHandle) -> u64| ingest.sources().iter().map(f).sum::<u64>();
        [
            sum(&|h| h.stats.frames.load(Ordering::Relaxed)),
            sum(&|h| h.stats.dropped.load(Ordering::Relaxed)),
            sum(&|h| h.decode.records.load(Ordering::Relaxed)),
            self.producer.stats().delivered.load(Ordering::Relaxed),
            sum(&|h| h.decode.rejects.load(Ordering::Relaxed)),
            sum(&|h| h.decode.gaps.load(Ordering::Relaxed)),
            ingest.sources().iter().filter(|h| h.stats.state() == crate::source::State::Up).count() as u64,
        ]
    }

    /// Records the process role's transforms refused (dead-lettered) since the start, counted when
    /// their batch committed.
    pub fn transform_rejects(&self) -> u64 {
        self.process.as_ref().map_or(0, |p| p.stats.rejected.load(Ordering::Relaxed))
    }

    /// Rows the process role has committed to its sink.
    pub fn stored(&self) -> u64 {
        self.process.as_ref().map_or(0, |p| p.stats.stored.load(Ordering::Relaxed))
    }

    pub async fn stop(self) -> anyhow::Result<u64> {
        if let Some(ingest) = self.ingest {
            ingest.stop().await;
        }
        match self.producer.flush(Duration::from_secs(30)) {
            // Counted and logged where it was refused; the stop goes on.
            Err(crate::handoff::LogError::Refusing(why)) => {
                tracing::error!(reason = why, "stopping while the local log refuses records")
            }
            flushed => flushed?,
        }
        if let Some(process) = self.process {
            // Give the process role a moment to deliver what was just handed over, then stop it: on
            // the local log until it has committed the log's end (at most 10 s; not at all while the
            // log refuses: its disk is likely the store's too, and what the log holds waits for the
            // next start), on Kafka 500 ms.
            match &self.handoff {
                // A held source's records stay in the log: nothing to wait for then.
                Handoff::Local(log) if process.stats.held_sources.load(Ordering::Relaxed) == 0 => {
                    let until = std::time::Instant::now() + Duration::from_secs(10);
                    while log.status().lag > 0 && log.refusing().is_none() && std::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Handoff::Local(_) => {}
                Handoff::Kafka(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
            process.stop.store(true, Ordering::Relaxed);
            let thread = process.thread;
            // A call is bounded by its deadline and a failed batch by the link's budget, so the role
            // stops within seconds; should it not, the stop goes on without it (what it did not
            // commit is read again at the next start).
            match tokio::time::timeout(STOP_PROCESS_WITHIN, tokio::task::spawn_blocking(move || thread.join())).await {
                Ok(joined) => joined?.map_err(|_| anyhow::anyhow!("the process role panicked"))??,
                Err(_) => tracing::error!(
                    within_s = STOP_PROCESS_WITHIN.as_secs(),
                    "the process role did not stop in time; what it did not commit is read again at the next start"
                ),
            }
        }
        let _ = self.api_stop.send(true);
        if let Err(e) = self.api_task.await? {
            tracing::warn!(error = %e, "the HTTP API stopped with an error");
        }
        self.producer.close();
        Ok(self.producer.stats().delivered.load(Ordering::Relaxed))
    }
}

/// Runs the roles asked for until `shutdown` completes, logging counts every ten seconds, then stops
/// them cleanly (sources first, then what they handed over is delivered). Returns the records
/// delivered to the hand-off.
///
/// # Errors
/// What keeps a role from starting, or from stopping cleanly.
pub async fn run(config: &Config, role: Role, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<u64> {
    let running = start(config, role).await?;
    tracing::info!(
        ?role,
        sources = config.sources.len(),
        handoff = %running.handoff,
        api = %running.api_addr,
        "running"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => log_counts(&running),
            _ = &mut shutdown => break,
        }
    }
    // The counts once more, as the stop begins: what the run did since the last line.
    log_counts(&running);
    running.stop().await
}

/// The `counts` line: totals since the process started.
fn log_counts(running: &Running) {
    let [frames, dropped, records, delivered, rejects, gaps, up] = running.counts();
    let (stored, transform_rejects) = (running.stored(), running.transform_rejects());
    tracing::info!(
        frames,
        dropped,
        records,
        delivered,
        rejects,
        transform_rejects,
        gaps,
        sources_up = up,
        stored,
        "counts"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic of an attempt is an error like any other, with its message: the process role's
    /// supervisor then logs it, shows it on `/health/ready` and starts the role again.
    #[test]
    fn a_panicking_attempt_is_an_error_not_a_lost_thread() {
        let e = caught(|| panic!("an index out of range")).unwrap_err();
        assert!(e.is::<Panicked>(), "{e:#}");
        assert!(e.to_string().contains("an index out of range"), "{e:#}");
        assert!(caught(|| Ok(())).is_ok());
        let plain = caught(|| Err(anyhow::anyhow!("a commit failed"))).unwrap_err();
        assert!(!plain.is::<Panicked>());
    }
}
