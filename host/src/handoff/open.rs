//! The hand-off, opened: [`open`] gives a [`Handoff`], the one value the roles, the API and the
//! sinks hold whichever hand-off is configured (a Kafka cluster, or the local log in the data
//! directory). What differs between the two stays in here: the writer and the reader, the health
//! check, what a start restores, the status `GET /v1/log` shows and how a stop drains.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::kafka::consumer::EventConsumer;
use super::kafka::producer::EventProducer;
use super::kafka::{KafkaConfig, ensure_symbols_topic, ensure_topics};
use super::local::LocalLog;
use super::{LocalLogConfig, LogError, LogStatus, Marks, PartitionStatus, ProducerStats, Reader, Writer};
use crate::telemetry::health::Health;

/// What [`open`] needs from the configuration.
pub struct HandoffSettings<'a> {
    /// `[kafka]`: the hand-off is Kafka when its `brokers` is set.
    pub kafka: &'a KafkaConfig,
    /// `[local_log]`: the local log's settings otherwise.
    pub local_log: &'a LocalLogConfig,
    /// The data directory, which holds the local log (`log.sqlite`).
    pub data_dir: &'a Path,
}

/// The hand-off between the roles, open.
#[derive(Clone)]
pub struct Handoff(Kind);

#[derive(Clone)]
enum Kind {
    /// A Kafka cluster: its settings and bootstrap servers.
    Kafka { config: Box<KafkaConfig>, brokers: String },
    /// The local log, open.
    Local(LocalLog),
}

/// Opens the hand-off `settings` configure: on Kafka, after making sure the events, dead-letter
/// and symbols topics exist; otherwise the local log in the data directory. Blocking work runs off
/// the async runtime.
///
/// # Errors
/// The local log cannot be opened, or Kafka's topics cannot be created or checked.
pub async fn open(settings: HandoffSettings<'_>) -> anyhow::Result<Handoff> {
    let kafka = settings.kafka;
    if kafka.brokers.trim().is_empty() {
        let (path, config) = (settings.data_dir.join("log.sqlite"), settings.local_log.clone());
        let log = tokio::task::spawn_blocking(move || LocalLog::open(&path, &config)).await??;
        return Ok(Handoff(Kind::Local(log)));
    }
    let brokers = kafka.brokers.clone();
    ensure_topics(kafka, &brokers, &[&kafka.events_topic, &kafka.dlq_topic], kafka.partitions).await?;
    ensure_symbols_topic(kafka, &brokers).await?;
    Ok(Handoff(Kind::Kafka { config: Box::new(kafka.clone()), brokers }))
}

/// How many records at the end of each partition of the events topic a start on Kafka reads to
/// recover each symbol's recent trade ids.
const TAIL_RECORDS: i64 = 65_536;

impl Handoff {
    /// The local log, open, for tests and tools that append to it or read it directly.
    pub fn local(log: LocalLog) -> Self {
        Handoff(Kind::Local(log))
    }

    /// The Kafka cluster's bootstrap servers, for what only runs on Kafka (the Druid sink, the
    /// shared symbol dictionary); `None` on the local log.
    pub fn brokers(&self) -> Option<&str> {
        match &self.0 {
            Kind::Kafka { brokers, .. } => Some(brokers),
            Kind::Local(_) => None,
        }
    }

    /// The Kafka cluster's settings and bootstrap servers, for what only runs on Kafka (the Druid
    /// sink and its topics); `None` on the local log.
    pub fn kafka(&self) -> Option<(&KafkaConfig, &str)> {
        match &self.0 {
            Kind::Kafka { config, brokers } => Some((config, brokers)),
            Kind::Local(_) => None,
        }
    }

    /// The local log, for what only it has (its own symbol table, its sizes); `None` on Kafka.
    pub fn local_log(&self) -> Option<&LocalLog> {
        match &self.0 {
            Kind::Local(log) => Some(log),
            Kind::Kafka { .. } => None,
        }
    }

    /// The local log's sizes and counters for a scrape; `None` on Kafka (whose producer counts).
    pub fn sample(&self) -> Option<crate::telemetry::LogSample> {
        self.local_log().map(LocalLog::sample)
    }

    /// The name of its `/health/ready` check: `kafka` or `log`.
    pub fn health_check(&self) -> &'static str {
        match &self.0 {
            Kind::Kafka { .. } => "kafka",
            Kind::Local(_) => "log",
        }
    }

    /// Where ingest appends: a Kafka producer, or the local log's appender.
    ///
    /// # Errors
    /// The producer cannot be created, or the appender cannot open the log.
    pub fn writer(&self) -> Result<Writer, LogError> {
        Ok(match &self.0 {
            Kind::Kafka { config, brokers } => Writer::Kafka(EventProducer::new(config, brokers)?),
            Kind::Local(log) => Writer::Local(log.writer(Arc::new(ProducerStats::default()))?),
        })
    }

    /// Where the process role reads: a consumer of the events topic in `group` (`instance` its
    /// static membership), or a reader of the local log.
    ///
    /// # Errors
    /// The consumer cannot be created, or the log cannot be read.
    pub fn reader(&self, group: &str, instance: Option<&str>) -> Result<Reader, LogError> {
        Ok(match &self.0 {
            Kind::Kafka { config, brokers } => Reader::Kafka(EventConsumer::new(config, brokers, group, instance)?),
            Kind::Local(log) => Reader::Local(log.reader()?, log.clone()),
        })
    }

    /// The Kafka topic ingest's dead letters go to; on the local log they stay in the log file.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        match &self.0 {
            Kind::Kafka { config, .. } => Some(&config.dlq_topic),
            Kind::Local(_) => None,
        }
    }

    /// How long the hand-off keeps records: the events topic's retention, or `[local_log]
    /// retention_ms`. A sink keeps its state checkpoints as long, since a replay can only start
    /// from a checkpoint whose records are still there.
    pub async fn records_kept_for(&self, local: &LocalLogConfig) -> Duration {
        let fallback = Duration::from_millis(local.retention_ms);
        let Kind::Kafka { config, brokers } = &self.0 else { return fallback };
        let events = &config.events_topic;
        match super::kafka::topic_retention_ms(config, brokers, events).await {
            Ok(ms) => u64::try_from(ms).map_or(Duration::MAX, Duration::from_millis),
            Err(e) => {
                tracing::warn!(topic = %events, error = %e, "the events topic's retention is unknown; state checkpoints are kept for [local_log] retention_ms");
                fallback
            }
        }
    }

    /// Keeps `health`'s check ([`health_check`](Self::health_check)) until `stop`: on Kafka, that the
    /// cluster answers (every 5 s); on the local log, that it commits (not ready while it refuses
    /// new records, a full disk say).
    pub async fn watch(self, writer: Arc<Writer>, health: Arc<Health>, stop: tokio::sync::watch::Receiver<bool>) {
        match self.0 {
            Kind::Kafka { .. } => watch_kafka(writer, health, stop).await,
            Kind::Local(log) => watch_local_log(log, health, stop).await,
        }
    }

    /// What ingest kept with the batches it delivered: from the local log's tables, or, on Kafka,
    /// the trade ids at the tail of the events topic and the file sources' (`files`: id and name)
    /// positions in the files topic. On Kafka each file source's appender is opened first (settling
    /// what a previous run left open) and attached to `writer`, so its records and position commit
    /// together from here on.
    ///
    /// # Errors
    /// What was kept cannot be read, or the file sources' producers cannot be opened.
    pub async fn restore_marks(
        &self,
        files: Vec<(u32, String)>,
        writer: &Arc<Writer>,
        data_dir: &Path,
    ) -> anyhow::Result<Marks> {
        if let (Kind::Kafka { config, brokers }, false) = (&self.0, files.is_empty()) {
            super::kafka::ensure_changelog_topic(config, brokers, &config.files_topic).await?;
        }
        let (handoff, writer, data_dir) = (self.clone(), writer.clone(), data_dir.to_owned());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let marks = match &handoff.0 {
                Kind::Local(log) => log.marks()?,
                Kind::Kafka { config, brokers } => kafka_marks(config, brokers, &files, &writer, &data_dir)?,
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

    /// Waits, as a stop begins, for the process role to take in what was just handed over: on the
    /// local log until it has read the log's end (at most 10 s; not while the log refuses records,
    /// its disk likely the store's too, nor while a source is `held`, whose records stay in the log),
    /// on Kafka 500 ms.
    pub async fn drain(&self, held: bool) {
        match &self.0 {
            Kind::Local(log) if !held => {
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while log.status().lag > 0 && log.refusing().is_none() && std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Kind::Local(_) => {}
            Kind::Kafka { .. } => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    /// What `GET /v1/log` reads: the local log's own positions, or each partition's watermarks and
    /// the sink's committed offsets on Kafka: `store` gives the embedded store's (by partition, of
    /// a topic), else the offsets `group` committed (the Druid sink's).
    ///
    /// # Errors
    /// The Kafka client for the probe cannot be created.
    pub fn probe(&self, group: &str, store: Option<StoreOffsets>) -> anyhow::Result<Probe> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: (BaseConsumer, String) = match &self.0 {
            Kind::Local(log) => {
                let log = log.clone();
                let local = move || LogStatus {
                    mode: "local",
                    partitions: vec![log.status()],
                    local: Some(log.sizes()),
                    store_dead_letters: None,
                };
                return Ok(Box::new(move || Ok(local())) as Probe);
            }
            Kind::Kafka { config, brokers } => {
                let mut c = config.client_config(brokers);
                c.set("group.id", group).set("enable.auto.commit", "false");
                (c.create().context("a Kafka client for /v1/log")?, config.events_topic.clone())
            }
        };
        Ok(Box::new(move || {
            let (consumer, topic) = &consumer;
            let timeout = Duration::from_secs(5);
            let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
            let count = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
            let committed: HashMap<i32, i64> = match &store {
                Some(store) => store(topic)?,
                None => {
                    let mut tpl = rdkafka::TopicPartitionList::new();
                    for p in 0..count {
                        tpl.add_partition(topic, p);
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
                let (start, end) = consumer.fetch_watermarks(topic, p, timeout).map_err(|e| e.to_string())?;
                let committed = committed.get(&p).copied().unwrap_or(start);
                partitions.push(PartitionStatus { partition: p, start, end, committed, lag: (end - committed).max(0) });
            }
            Ok(LogStatus { mode: "kafka", partitions, local: None, store_dead_letters: None })
        }))
    }
}

/// What [`Handoff::probe`] gives: called for each `GET /v1/log`.
pub type Probe = Box<dyn Fn() -> Result<LogStatus, String> + Send + Sync>;

/// A sink's committed offsets of a topic, by partition (empty before its first commit).
pub type StoreOffsets = Box<dyn Fn(&str) -> Result<HashMap<i32, i64>, String> + Send + Sync>;

impl std::fmt::Display for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::Kafka { brokers, .. } => write!(f, "Kafka at {brokers}"),
            Kind::Local(log) => write!(f, "the local log {}", log.path().display()),
        }
    }
}

/// [`Handoff::restore_marks`] on Kafka: the file sources' appenders first (opening them settles a
/// transaction a killed run left open, which read_committed readers of the topics would otherwise
/// wait behind), their positions, then the trade ids at the tail of the events topic.
fn kafka_marks(
    kafka: &KafkaConfig,
    brokers: &str,
    files: &[(u32, String)],
    writer: &Writer,
    data_dir: &Path,
) -> anyhow::Result<Marks> {
    let mut files_marks = Vec::new();
    if let (false, Writer::Kafka(p)) = (files.is_empty(), writer) {
        use super::kafka::files::{FileAppenders, next_generation, read_marks};
        let timeout = Duration::from_secs(30);
        let generation = next_generation(kafka, brokers, files, data_dir, timeout)
            .context("settling what the file sources' last transactions left open")?;
        let ids = files.iter().map(|(id, name)| (name.clone(), *id)).collect();
        files_marks = read_marks(kafka, brokers, &ids)
            .with_context(|| format!("reading the file sources' positions from {}", kafka.files_topic))?;
        let appenders = FileAppenders::open(kafka, brokers, files, generation, p.stats().clone(), timeout)
            .context("opening the file sources' transactional producers")?;
        if p.attach_files(appenders).is_err() {
            bail!("the file sources' appenders were attached twice");
        }
    }
    let topic = &kafka.events_topic;
    let mut marks = super::kafka::range::RangeReader::new(kafka, brokers, topic)?
        .trade_marks(TAIL_RECORDS)
        .with_context(|| format!("reading the tail of {topic} for the trade ids already delivered"))?;
    marks.files = files_marks;
    Ok(marks)
}

/// Checks every few seconds that the Kafka cluster answers, for `/health/ready`.
async fn watch_kafka(writer: Arc<Writer>, health: Arc<Health>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let w = writer.clone();
        let reachable = move || match &*w {
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
