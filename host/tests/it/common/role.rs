//! The process role run inside the test, over a real hand-off (a local log, or the events topic of
//! a real Kafka-protocol broker) with real plugin components: [`RoleRig`] owns the hand-off, the
//! symbol dictionary and the plugin runtime; [`Role`] owns what the role runs with (chains,
//! breakers, sink, names, settings, counters) and runs it until a condition holds, then stops it.
//! A test states only its records, its chains, its sink and when to stop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plugin_sdk::Records;
use sluice::chain::Chain;
use sluice::handoff::ProducerStats;
use sluice::handoff::local::LocalLog;
use sluice::handoff::{LocalLogConfig, Reader, Writer};
use sluice::kafka::consumer::EventConsumer;
use sluice::kafka::producer::EventProducer;
use sluice::kafka::{KafkaConfig, ensure_topics};
use sluice::plugin::{Limits, PluginCode, PluginInstance, Runtime, RuntimeSettings};
use sluice::process::{Breakers, Names, Process, ProcessSettings, ProcessStats, run_process};
use sluice::sink::Sink;
use sluice::sink::druid::{DruidSink, DruidSinkConfig};
use sluice::sink::embedded::EmbeddedStore;
use sluice::symbols::Symbols;
use sluice::transform::Transformer;

use super::{TestBroker, fresh_dir, unique_topic};

/// One test's hand-off, dictionary and plugin runtime.
pub struct RoleRig {
    /// The test's own directory: the local log and the embedded store live here.
    pub dir: PathBuf,
    /// The dictionary the records are interned into and the rows are named from.
    pub symbols: Arc<Symbols>,
    /// `[kafka]` with this test's own events and dead-letter topics.
    pub kafka: KafkaConfig,
    /// For the broker's admin calls.
    pub rt: tokio::runtime::Runtime,
    broker: Option<TestBroker>,
    local: Option<LocalLog>,
    writer: Writer,
    plugins: Runtime,
}

impl RoleRig {
    /// On a new local log, `<dir>/log.sqlite`.
    pub fn local(name: &str) -> Self {
        let dir = fresh_dir(&format!("role-{name}"));
        let log = LocalLog::open(&dir.join("log.sqlite"), &LocalLogConfig::default()).unwrap();
        let writer = Writer::Local(log.writer(Arc::new(ProducerStats::default())).unwrap());
        Self::with(dir, test_kafka(), None, Some(log), writer)
    }

    /// On the test broker, with this test's events and dead-letter topics created with
    /// `partitions` partitions each.
    pub fn kafka(name: &str, partitions: i32) -> Self {
        let dir = fresh_dir(&format!("role-{name}"));
        let (broker, kafka) = (TestBroker::start(name), test_kafka());
        let writer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
        let rig = Self::with(dir, kafka, Some(broker), None, writer);
        rig.create_topics(&[&rig.kafka.events_topic, &rig.kafka.dlq_topic], partitions);
        rig
    }

    fn with(
        dir: PathBuf,
        kafka: KafkaConfig,
        broker: Option<TestBroker>,
        local: Option<LocalLog>,
        writer: Writer,
    ) -> Self {
        let symbols = Arc::new(Symbols::new());
        let settings = RuntimeSettings { max_instances: 16, ..RuntimeSettings::default() };
        RoleRig {
            dir,
            plugins: Runtime::new(settings, symbols.clone()).unwrap(),
            symbols,
            kafka,
            rt: tokio::runtime::Runtime::new().unwrap(),
            broker,
            local,
            writer,
        }
    }

    /// The broker's `host:port` (a Kafka rig only).
    pub fn bootstrap(&self) -> &str {
        &self.broker.as_ref().expect("a rig on Kafka").bootstrap
    }

    /// Creates `topics` on the broker with `partitions` partitions each.
    pub fn create_topics(&self, topics: &[&str], partitions: i32) {
        self.rt.block_on(ensure_topics(&self.kafka, self.bootstrap(), topics, partitions)).unwrap();
    }

    /// Writes `records` to the hand-off as one batch and waits until it is acknowledged.
    pub fn write(&self, records: &Records) {
        self.writer.send_records(records.as_bytes());
        self.writer.flush(Duration::from_secs(20)).unwrap();
    }

    /// Waits until everything written (dead letters included) is acknowledged.
    pub fn flush(&self) {
        self.writer.flush(Duration::from_secs(20)).unwrap();
    }

    /// A new reader of the hand-off; on Kafka a member of the consumer group `group`.
    pub fn reader_in(&self, group: &str) -> Reader {
        match &self.local {
            Some(log) => Reader::Local(log.reader().unwrap(), log.clone()),
            None => Reader::Kafka(EventConsumer::new(&self.kafka, self.bootstrap(), group, None).unwrap()),
        }
    }

    /// A new reader of the hand-off, in a consumer group of its own on Kafka.
    pub fn reader(&self) -> Reader {
        self.reader_in(&unique_topic("group"))
    }

    /// The embedded store's file, `<dir>/store.sqlite`.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join("store.sqlite")
    }

    /// The embedded store, opened (created on first use).
    pub fn store(&self) -> EmbeddedStore {
        EmbeddedStore::open(&self.store_path(), Duration::from_secs(60)).unwrap()
    }

    /// The Druid sink writing `druid`'s topic and state topic (both created) in transactions of
    /// its own.
    pub fn druid_sink(&self, druid: &DruidSinkConfig) -> DruidSink {
        self.create_topics(&[&druid.topic, &druid.state_topic()], 1);
        DruidSink::new(&self.kafka, self.bootstrap(), druid, &unique_topic("tx"), Duration::from_secs(20)).unwrap()
    }

    /// The test plugin `<name>.wasm`, compiled under `name`.
    pub fn plugin(&self, name: &str) -> Arc<PluginCode> {
        self.plugins.compile(name, &plugin_wasm(name), Limits::default()).unwrap()
    }

    /// A link running `code` with `config`.
    pub fn link_of(code: &Arc<PluginCode>, config: &[(&str, &str)]) -> Transformer {
        let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Transformer::new(PluginInstance::new(code, &config).unwrap())
    }

    /// A link running the test plugin `<name>.wasm` with `config`.
    pub fn link(&self, name: &str, config: &[(&str, &str)]) -> Transformer {
        Self::link_of(&self.plugin(name), config)
    }

    /// The process role with `chains` into `sink`, naming `sources` by id, with `settings`; its
    /// breakers all closed and its counters at zero.
    pub fn role<S: Sink>(
        &self,
        chains: HashMap<u32, Chain>,
        sink: S,
        sources: &[(u32, &str)],
        settings: ProcessSettings,
    ) -> Role<S> {
        Role {
            chains,
            breakers: Breakers::default(),
            sink,
            names: self.names(sources),
            settings,
            stats: ProcessStats::default(),
        }
    }

    /// The names rows carry: `sources` by id, and the rig's dictionary.
    pub fn names(&self, sources: &[(u32, &str)]) -> Names {
        Names {
            sources: sources.iter().map(|(id, name)| (*id, Arc::from(*name))).collect(),
            symbols: self.symbols.clone(),
        }
    }
}

impl Drop for RoleRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `[kafka]` for the test broker with topics of this test's own.
fn test_kafka() -> KafkaConfig {
    KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..super::kafka_config() }
}

/// The bytes of the test plugin `<name>.wasm`.
pub fn plugin_wasm(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap()
}

/// Each source's chain of links, by source id.
pub fn chains<const N: usize>(links: [(u32, Vec<Transformer>); N]) -> HashMap<u32, Chain> {
    links.into_iter().map(|(id, links)| (id, Chain::new(id, links))).collect()
}

/// What the process role runs with, kept across its runs as the host keeps it across restarts of
/// the role; each run is handed the reader it reads.
pub struct Role<S> {
    pub chains: HashMap<u32, Chain>,
    pub breakers: Breakers,
    pub sink: S,
    pub names: Names,
    pub settings: ProcessSettings,
    pub stats: ProcessStats,
}

impl<S: Sink> Role<S> {
    /// Runs the role over `reader` until it returns (nothing stops it).
    pub fn run(&mut self, reader: &Reader) -> anyhow::Result<()> {
        run_process(self.process(reader), &AtomicBool::new(false))
    }

    /// [`run_until`] with this role, `done` looking at its counters.
    pub fn run_until(
        &mut self,
        reader: &Reader,
        limit: Duration,
        settle: Duration,
        done: impl Fn(&ProcessStats) -> bool + Sync,
    ) -> anyhow::Result<()> {
        let Role { chains, breakers, sink, names, settings, stats } = self;
        run_until(process(reader, chains, breakers, sink, names, settings, stats), limit, settle, || done(stats))
    }

    /// [`run_beside`] with this role, `watch` handed its counters.
    pub fn run_beside<T: Send>(
        &mut self,
        reader: &Reader,
        watch: impl FnOnce(&ProcessStats) -> T + Send,
    ) -> (anyhow::Result<()>, T) {
        let Role { chains, breakers, sink, names, settings, stats } = self;
        let stats: &ProcessStats = stats;
        run_beside(process(reader, chains, breakers, sink, names, settings, stats), |_| watch(stats))
    }

    fn process<'a>(&'a mut self, reader: &'a Reader) -> Process<'a> {
        let Role { chains, breakers, sink, names, settings, stats } = self;
        process(reader, chains, breakers, sink, names, settings, stats)
    }
}

/// The process role over its parts (the form `run_process` takes them).
pub fn process<'a>(
    reader: &'a Reader,
    chains: &'a mut HashMap<u32, Chain>,
    breakers: &'a mut Breakers,
    sink: &'a mut dyn Sink,
    names: &'a Names,
    settings: &'a ProcessSettings,
    stats: &'a ProcessStats,
) -> Process<'a> {
    Process { reader, chains, breakers, sink, names, settings, stats }
}

/// Runs the role on this thread while `watch` runs beside it, handed a flag set once the role
/// returned; when `watch` returns the role is told to stop. Answers what each returned.
pub fn run_beside<T: Send>(
    process: Process<'_>,
    watch: impl FnOnce(&AtomicBool) -> T + Send,
) -> (anyhow::Result<()>, T) {
    let (stop, returned) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let out = watch(&returned);
            stop.store(true, Ordering::Relaxed);
            out
        });
        let result = run_process(process, &stop);
        returned.store(true, Ordering::Relaxed);
        (result, watcher.join().unwrap())
    })
}

/// Runs the role until `done` holds (then for `settle` more, so a last commit lands), until it
/// returns, or for `limit` at most; stops it and answers what it returned. Not reaching `done` is
/// no failure here: the test's assertions on what was stored say what went missing.
pub fn run_until(
    process: Process<'_>,
    limit: Duration,
    settle: Duration,
    done: impl Fn() -> bool + Sync,
) -> anyhow::Result<()> {
    run_beside(process, |returned| {
        let start = Instant::now();
        while !done() && !returned.load(Ordering::Relaxed) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !returned.load(Ordering::Relaxed) {
            std::thread::sleep(settle);
        }
    })
    .0
}
