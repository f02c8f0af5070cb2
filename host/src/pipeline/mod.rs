//! The one place that wires the stages together: [`start`] brings up the API, the hand-off (the
//! local log, or Kafka with its topics), the symbol dictionary, the plugin registry, the ingest role
//! ([`crate::ingest`]), the process role ([`crate::process`]) with its sink, and the metrics that
//! mirror them; [`run`] keeps them running until its shutdown signal. The stages own their loops;
//! nothing here asks which hand-off or sink it got.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::api::{ApiState, Health};
use crate::chains::ChainBook;
use crate::config::Config;
use crate::datadir::{DataDirLock, Hold};
pub use crate::deploy::Role;
use crate::deploy::open_plugins;
use crate::handoff::{Handoff, HandoffSettings, Writer};
use crate::ingest::{Ingest, IngestSettings, SourceHandle};
use crate::plugin::registry::Slot;
use crate::process::{ProcessRole, ProcessSettings, ProcessSetup};
use crate::sink::SinkSettings;
use crate::symbols::Symbols;
use crate::telemetry::Metrics;

/// The roles, running.
pub struct Running {
    pub(crate) ingest: Option<Ingest>,
    pub(crate) producer: Arc<Writer>,
    pub(crate) process: Option<ProcessRole>,
    pub(crate) handoff: Handoff,
    /// The embedded store, when this instance delivers to it.
    pub(crate) store_path: Option<PathBuf>,
    /// Where the HTTP API listens.
    pub(crate) api_addr: std::net::SocketAddr,
    /// Stops the API server, the health checks and the watchers.
    pub(crate) api_stop: tokio::sync::watch::Sender<bool>,
    pub(crate) api_task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The data directory's lock, held as long as the roles run (released when this is dropped,
    /// or by the kernel when the process ends).
    pub(crate) _data_dir: DataDirLock,
}

/// The API and what it shows, up before the roles so an operator can watch readiness while the rest
/// starts.
struct Api {
    state: ApiState,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    directory: Arc<crate::api::SourceDirectory>,
    plugins: Arc<crate::api::PluginDirectory>,
    addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Api {
    /// Listens on `[api] bind` and serves; chain edits and replays wherever this instance runs the
    /// chains and delivers to a sink.
    async fn start(config: &Config, role: Role, book: &Arc<ChainBook>, store: Option<PathBuf>) -> anyhow::Result<Api> {
        // What must report before the instance is ready, declared before the API answers: an empty
        // registry would read as ready while the rest starts. The hand-off's own check is declared
        // once it is open.
        let health = Arc::new(Health::new());
        health.expect("plugins");
        if role != Role::Ingest {
            health.expect("sink");
            health.expect("breakers");
        }
        let listener = tokio::net::TcpListener::bind(config.api.bind)
            .await
            .with_context(|| format!("cannot listen on {} for the HTTP API ([api] bind)", config.api.bind))?;
        let addr = listener.local_addr()?;
        let (stop, _) = tokio::sync::watch::channel(false);
        let directory = Arc::new(crate::api::SourceDirectory::default());
        let plugins = Arc::new(crate::api::PluginDirectory::default());
        let metrics = Arc::new(Metrics::new());
        let mut state = ApiState::new(&config.api, store, health.clone())
            .with_sources(directory.clone())
            .with_plugins(plugins.clone())
            .with_metrics(metrics.clone());
        if role != Role::Ingest {
            state = state.with_chains(book.clone());
            let config = Arc::new(config.clone());
            state.replays().set_starter(Arc::new(move |spec, progress, stop| {
                let config = config.clone();
                Box::pin(async move {
                    crate::replay::replay(&config, &spec, progress, stop).await.map_err(|e| format!("{e:#}"))
                })
            }));
        }
        let router = crate::api::router(state.clone());
        let mut stopped = stop.subscribe();
        let connections = crate::api::Connections::new(&config.api, metrics.clone());
        let task = tokio::spawn(crate::api::serve(listener, router, connections, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        tracing::info!(addr = %addr, "HTTP API listening");
        Ok(Api { state, health, metrics, directory, plugins, addr, stop, task })
    }
}

/// Where the process role delivers, from `[sink]` and `[process]` (the overlap counter is set once
/// the metrics exist).
fn sink_settings(config: &Config) -> SinkSettings {
    SinkSettings {
        druid: config.sink.druid.clone(),
        store_path: config.data_dir.join("store.sqlite"),
        group: config.process.group.clone(),
        instance: config.process.instance().to_owned(),
        checkpoint_every: Duration::from_millis(config.process.checkpoint_interval_ms),
        dead_letters: crate::sink::embedded::DeadLetterPolicy {
            keep: Duration::from_millis(config.local_log.dead_letter_retention_ms),
            max_bytes: config.local_log.dead_letter_max_bytes,
        },
        overlapped: None,
    }
}

/// Starts the roles asked for: the API, the hand-off, the shared symbol dictionary, the plugins, the
/// sources (ingest), and the process role that runs each source's records through its chain into
/// the sink.
pub async fn start(config: &Config, role: Role) -> anyhow::Result<Running> {
    check(config, role)?;
    // The data directory first: a second process on it is refused before it touches anything (or
    // takes the first one's API address). Roles run apart share it with each other.
    let hold = if role == Role::All { Hold::Alone } else { Hold::Shared };
    let data_dir = DataDirLock::acquire(&config.data_dir, hold)?;
    // The chains each source runs: the configuration's, or as the API edited them.
    let book = Arc::new(ChainBook::open(&config.data_dir, config.chains())?);
    let mut sink = (role != Role::Ingest).then(|| sink_settings(config));
    let store_path = sink.as_ref().and_then(|s| s.store().map(PathBuf::from));
    let api = Api::start(config, role, &book, store_path.clone()).await?;
    if let Some(sink) = &mut sink {
        sink.overlapped = Some(api.metrics.druid_transactions_overlapped_total.clone());
    }
    let handoff = crate::handoff::open(HandoffSettings {
        kafka: &config.kafka,
        local_log: &config.local_log,
        data_dir: &config.data_dir,
    })
    .await?;
    api.health.expect(handoff.health_check());
    // What the sink committed, before anything is appended: a store ahead of its local log stops
    // the start here.
    let committed = match &sink {
        Some(sink) => Some(prepare_sink(config, sink, &handoff).await?),
        None => None,
    };
    let producer = {
        let handoff = handoff.clone();
        Arc::new(tokio::task::spawn_blocking(move || handoff.writer()).await??)
    };
    tokio::spawn(handoff.clone().watch(producer.clone(), api.health.clone(), api.stop.subscribe()));
    let symbols = Arc::new(Symbols::open(&handoff).await.context("symbol dictionary")?);
    show_handoff(&api, &handoff, &producer, &symbols, sink.as_ref(), &config.process.group)?;
    let source_ids = source_ids(config, &symbols).await?;
    let (registry, plugins) = open_plugins(config, role, book.clone(), symbols.clone(), api.metrics.clone()).await?;
    api.plugins.set(registry.clone());
    let mut names: Vec<&str> = plugins.keys().map(String::as_str).collect();
    names.sort_unstable();
    api.health.set("plugins", true, format!("loaded: {}", names.join(", ")));
    let ingest = match role {
        Role::Process => None,
        _ => Some(start_ingest(config, &api, &handoff, &producer, &source_ids, &plugins, &book).await?),
    };
    let process = match (sink, committed) {
        (Some(sink), Some(committed)) => {
            crate::sink::supervise(&sink, &handoff, api.health.clone(), api.metrics.clone(), api.stop.subscribe())?;
            let budget = Duration::from_millis(config.process.link_budget_ms.max(1));
            let edits = Arc::new(crate::process::edits::LiveChains::new(book, registry, budget));
            let setup = ProcessSetup {
                handoff: handoff.clone(),
                sink,
                committed,
                sources: source_ids.iter().zip(&config.sources).map(|(id, s)| (*id, s.name.clone())).collect(),
                plugins,
                symbols,
                settings: process_settings(config, &api, edits),
            };
            Some(start_process(&api, setup)?)
        }
        _ => None,
    };
    let Api { addr: api_addr, stop: api_stop, task: api_task, .. } = api;
    Ok(Running { ingest, producer, process, handoff, store_path, api_addr, api_stop, api_task, _data_dir: data_dir })
}

/// What no stage can check alone: the Druid sink's instance name, the API's token, and a role run
/// apart without the Kafka cluster the other role would share.
fn check(config: &Config, role: Role) -> anyhow::Result<()> {
    if role != Role::Ingest {
        config.check_druid_instance().map_err(anyhow::Error::msg)?;
    }
    if config.api.read_token && config.api.token.is_none() {
        bail!("[api] read_token needs the token: set SLUICE_API_TOKEN");
    }
    if role != Role::All && config.kafka.brokers.trim().is_empty() {
        bail!("running one role on its own needs [kafka] brokers, which the other role shares");
    }
    Ok(())
}

/// Gets the sink ready and reads what it committed (see [`crate::sink::prepare`]).
async fn prepare_sink(
    config: &Config,
    sink: &SinkSettings,
    handoff: &Handoff,
) -> anyhow::Result<crate::sink::Committed> {
    let kept = handoff.records_kept_for(&config.local_log).await;
    crate::sink::prepare(sink, handoff, config.local_log.resume_past_lost_tail, kept).await
}

/// The process role's settings from `[process]` and `[kafka]`, reporting to the API's health checks
/// and metrics, following the API's chain edits.
fn process_settings(config: &Config, api: &Api, edits: Arc<crate::process::edits::LiveChains>) -> ProcessSettings {
    ProcessSettings {
        partitions: config.kafka.partitions,
        batch: crate::batch::BatchConfig::from(&config.process),
        health: Some(api.health.clone()),
        metrics: Some(api.metrics.clone()),
        edits: Some(edits),
        ..ProcessSettings::default()
    }
}

/// Spawns the process role, its link rejects shown in the API and its counters in the metrics.
fn start_process(api: &Api, setup: ProcessSetup) -> anyhow::Result<ProcessRole> {
    let process = ProcessRole::spawn(setup)?;
    let stats = process.stats.clone();
    api.directory.set_link_rejects(stats.link_rejects.clone());
    api.metrics.on_scrape(move |m| m.mirror_process(&stats.sample()));
    Ok(process)
}

/// What the API and the metrics read from the hand-off: `GET /v1/log` (with the store's offsets and
/// dead letters when the sink is the store), the dead letters' names and topic, the writer's and
/// the local log's counters.
fn show_handoff(
    api: &Api,
    handoff: &Handoff,
    producer: &Arc<Writer>,
    symbols: &Arc<Symbols>,
    sink: Option<&SinkSettings>,
    group: &str,
) -> anyhow::Result<()> {
    let store = sink.and_then(|s| s.store()).map(PathBuf::from);
    let offsets = store.clone().map(|path| -> crate::handoff::StoreOffsets {
        Box::new(move |topic: &str| {
            if !path.exists() {
                return Ok(HashMap::new());
            }
            let stored = crate::sink::embedded::stored_offsets(&path, topic).map_err(|e| e.to_string())?;
            Ok(stored.into_iter().map(|(_, p, o)| (p, o)).collect())
        })
    });
    let probe = handoff.probe(group, offsets)?;
    api.state.set_log(Arc::new(move || {
        let mut status = probe()?;
        status.store_dead_letters =
            store.as_deref().filter(|p| p.exists()).and_then(|p| crate::sink::embedded::stored_dead_letters(p).ok());
        Ok(status)
    }));
    let _ = api.state.dead_letter_source().symbols.set(symbols.clone());
    if let Some(topic) = handoff.dead_letter_topic() {
        let _ = api.state.dead_letter_source().topic.set(topic.to_owned());
    }
    let producer_stats = producer.stats().clone();
    api.metrics.on_scrape(move |m| m.mirror_producer(&producer_stats.sample()));
    let handoff = handoff.clone();
    api.metrics.on_scrape(move |m| {
        if let Some(sample) = handoff.sample() {
            m.mirror_log(&sample);
        }
    });
    Ok(())
}

/// Source ids, stable per name (kept in the symbol dictionary): records in the log keep meaning the
/// same source across restarts and config edits.
async fn source_ids(config: &Config, symbols: &Arc<Symbols>) -> anyhow::Result<Vec<u32>> {
    let (dictionary, names) = (symbols.clone(), config.sources.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    tokio::task::spawn_blocking(move || names.iter().map(|n| dictionary.source_id(n)).collect::<Result<Vec<_>, _>>())
        .await?
        .context("source ids")
}

/// The ingest role: the sources from what the hand-off kept of them, shown in the API and mirrored
/// into the metrics.
async fn start_ingest(
    config: &Config,
    api: &Api,
    handoff: &Handoff,
    producer: &Arc<Writer>,
    source_ids: &[u32],
    plugins: &HashMap<String, Arc<Slot>>,
    book: &ChainBook,
) -> anyhow::Result<Ingest> {
    let settings = IngestSettings::from(&config.ingest);
    let files: Vec<(u32, String)> = source_ids
        .iter()
        .zip(&config.sources)
        .filter(|(_, s)| s.kind == crate::config::SourceKind::File)
        .map(|(id, s)| (*id, s.name.clone()))
        .collect();
    let marks = handoff.restore_marks(files, producer, &config.data_dir).await?;
    let ingest =
        Ingest::start_with_ids(config.sources.clone(), source_ids, plugins, producer.clone(), settings, &marks)?;
    let entry = |h: &SourceHandle| crate::api::SourceEntry {
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
    };
    api.directory.set(ingest.sources().iter().map(entry).collect());
    let sources: Vec<_> =
        ingest.sources().iter().map(|h| (h.config.name.clone(), h.stats.clone(), h.decode.clone())).collect();
    api.metrics.on_scrape(move |m| {
        let now_us = crate::clock::now_us();
        for (name, stats, decode) in &sources {
            m.mirror_source(name, &decode.sample(stats), now_us);
        }
    });
    Ok(ingest)
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

    /// Stops the roles: the sources first, then what they handed over is delivered (the hand-off
    /// drained into the process role), then the process role and the API. Returns the records
    /// delivered to the hand-off.
    ///
    /// # Errors
    /// The writer could not deliver what it holds, or the process role's last attempt failed.
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
            // A held source's records stay in the log: nothing to wait for then.
            self.handoff.drain(process.stats.held_sources.load(Ordering::Relaxed) > 0).await;
            process.stop().await?;
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

    /// While the rest starts (the hand-off, the plugins, the sink), `/health/ready` is not ready:
    /// the checks that must report are declared before the API answers, so its registry is never
    /// empty (an empty one reads as ready).
    #[tokio::test]
    async fn the_api_is_not_ready_before_the_roles_have_reported() {
        let dir = std::env::temp_dir().join(format!("sluice-pipeline-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = Config { data_dir: dir.clone(), ..Config::default() };
        config.api.bind = "127.0.0.1:0".parse().unwrap();
        let book = Arc::new(ChainBook::open(&dir, config.chains()).unwrap());
        for (role, checks) in [(Role::All, 3), (Role::Ingest, 1)] {
            let api = Api::start(&config, role, &book, None).await.unwrap();
            let readiness = api.health.snapshot();
            assert!(!readiness.ready, "{role:?}: {readiness:?}");
            assert_eq!(readiness.checks.len(), checks, "{role:?}: {readiness:?}");
            let _ = api.stop.send(true);
            api.task.await.unwrap().unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
