//! Kafka: the producer ingest writes with, the consumer process reads with, and the topics they share
//! (the hand-off when `[kafka] brokers` is set; see [`crate::log`]).

pub mod consumer;
pub mod files;
pub mod producer;
pub mod range;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

/// Why talking to Kafka failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client could not be created from the configuration.
    #[error("kafka client configuration: {0}")]
    Config(String),
    /// Creating a topic failed.
    #[error("creating topic {topic}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// What the broker said.
        reason: String,
    },
    /// A flush did not complete in time; the count of messages still in flight.
    #[error("{0} messages were still unacknowledged at the flush deadline")]
    FlushTimeout(i32),
    /// The symbol dictionary topic could not be read or written.
    #[error("symbol dictionary: {0}")]
    Symbols(String),
    /// A Kafka transaction failed (and was aborted, or the producer was fenced).
    #[error("kafka transaction: {0}")]
    Transaction(String),
    /// A topic could not be read (its metadata, its offsets or its records).
    #[error("reading {topic}: {reason}")]
    Read {
        /// The topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
}

/// `[kafka]`: where the broker is and how topics are written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers (`host:port,...`); empty hands records over through the local log instead
    /// (see [`crate::log`]).
    #[serde(default)]
    pub brokers: String,
    /// The topic decoded records go to.
    #[serde(default = "defaults::events_topic")]
    pub events_topic: String,
    /// The dead-letter topic: refused frames and records, with the reason.
    #[serde(default = "defaults::dlq_topic")]
    pub dlq_topic: String,
    /// The symbol dictionary: one partition, kept forever (see [`crate::symbols`]).
    #[serde(default = "defaults::symbols_topic")]
    pub symbols_topic: String,
    /// Each file source's position in its recording, committed with its records (compacted; see
    /// [`files`]).
    #[serde(default = "defaults::files_topic")]
    pub files_topic: String,
    /// Partitions for topics sluice creates.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// `lz4`, `zstd`, `snappy`, `gzip` or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: String,
    /// How long the producer waits to fill a batch: short, since batches also fill while the previous
    /// one is in flight.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Largest producer batch in bytes.
    #[serde(default = "defaults::batch_bytes")]
    pub batch_bytes: u64,
    /// Any other librdkafka property, passed through as is (e.g. `security.protocol`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            events_topic: defaults::events_topic(),
            dlq_topic: defaults::dlq_topic(),
            symbols_topic: defaults::symbols_topic(),
            files_topic: defaults::files_topic(),
            partitions: defaults::partitions(),
            compression: defaults::compression(),
            linger_ms: defaults::linger_ms(),
            batch_bytes: defaults::batch_bytes(),
            options: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// A librdkafka client config with the brokers and the pass-through options.
    pub fn client_config(&self, brokers: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }
}

/// The headers every dead letter carries on the dead-letter topic: its source, plugin, stage,
/// reason (as kept: see [`DeadLetter::kept_reason`](crate::log::DeadLetter::kept_reason)) and the
/// payload's original length in bytes (`sluice.length`: the payload itself is cut to
/// [`DEAD_LETTER_MAX_BYTES`](crate::log::stage::DEAD_LETTER_MAX_BYTES)).
pub fn dead_letter_headers(d: &crate::log::DeadLetter<'_>) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let length = d.bytes.len().to_string();
    OwnedHeaders::new()
        .insert(Header { key: "sluice.source", value: Some(d.source) })
        .insert(Header { key: "sluice.plugin", value: Some(d.plugin) })
        .insert(Header { key: "sluice.stage", value: Some(d.stage.as_str()) })
        .insert(Header { key: "sluice.reason", value: Some(d.kept_reason()) })
        .insert(Header { key: "sluice.length", value: Some(length.as_str()) })
}

/// Hands `record` to librdkafka; while its queue is full, calls `on_full`, waits `pause` and tries
/// again. Any other refusal is returned.
///
/// # Errors
/// librdkafka's error for a record it will not queue.
pub fn send_waiting<'a, K, P, C>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'a, K, P, C::DeliveryOpaque>,
    pause: Duration,
    mut on_full: impl FnMut(),
) -> Result<(), rdkafka::error::KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: rdkafka::producer::ProducerContext + 'static,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                on_full();
                std::thread::sleep(pause);
                record = back;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The symbol dictionary's default topic (see [`crate::symbols`]).
pub const SYMBOLS_TOPIC: &str = "sluice.symbols";

mod defaults {
    pub fn events_topic() -> String {
        "sluice.events".into()
    }
    pub fn dlq_topic() -> String {
        "sluice.dlq".into()
    }
    pub fn symbols_topic() -> String {
        super::SYMBOLS_TOPIC.into()
    }
    pub fn files_topic() -> String {
        "sluice.files".into()
    }
    pub fn partitions() -> i32 {
        6
    }
    pub fn compression() -> String {
        "lz4".into()
    }
    pub fn linger_ms() -> u64 {
        1
    }
    pub fn batch_bytes() -> u64 {
        1 << 20
    }
}

/// Creates `topics` with `partitions` each; topics that already exist are fine.
///
/// # Errors
/// [`KafkaError`] when the admin client cannot be created or the broker refuses.
pub async fn ensure_topics(
    config: &KafkaConfig,
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let new: Vec<_> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    create_topics(config, brokers, &new, partitions).await
}

/// Creates the symbol dictionary topic when it does not exist: one partition (ids are offsets, so
/// there must be one order), kept forever and never compacted (compaction would keep a name's last
/// record, and ids are its first).
///
/// # Errors
/// [`KafkaError::CreateTopic`] when the broker refuses.
pub async fn ensure_symbols_topic(config: &KafkaConfig, brokers: &str) -> Result<(), KafkaError> {
    let topic = NewTopic::new(&config.symbols_topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1");
    create_topics(config, brokers, &[topic], 1).await
}

/// Creates a changelog topic when it does not exist: one partition (a restore reads it whole, in one
/// order) with `cleanup.policy=compact`, so the broker keeps each key's last record and drops keys
/// whose last record is a tombstone. A broker that ignores topic configs keeps every record; a
/// restore reads the same state either way.
///
/// # Errors
/// [`KafkaError::CreateTopic`] when the broker refuses.
pub async fn ensure_changelog_topic(config: &KafkaConfig, brokers: &str, topic: &str) -> Result<(), KafkaError> {
    let topic = NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    create_topics(config, brokers, &[topic], 1).await
}

/// Deletes `topic` (a replay's partial topic, say); one that does not exist is fine.
///
/// # Errors
/// [`KafkaError::Config`] when the admin client cannot be created, [`KafkaError::Read`] with what
/// the broker said when it refuses.
pub async fn delete_topic(config: &KafkaConfig, brokers: &str, topic: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client_config(brokers).create().map_err(|e| KafkaError::Config(e.to_string()))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let refused =
        |reason: String| KafkaError::Read { topic: topic.to_owned(), reason: format!("deleting it: {reason}") };
    for result in admin.delete_topics(&[topic], &opts).await.map_err(|e| refused(e.to_string()))? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(refused(code.to_string())),
        }
    }
    Ok(())
}

/// Creates `new`; a topic that already exists must have at least `partitions` partitions.
async fn create_topics(
    config: &KafkaConfig,
    brokers: &str,
    new: &[NewTopic<'_>],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        config.client_config(brokers).create().map_err(|e| KafkaError::Config(e.to_string()))?;
    let names = || new.iter().map(|t| t.name).collect::<Vec<_>>().join(",");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new, &opts)
        .await
        .map_err(|e| KafkaError::CreateTopic { topic: names(), reason: e.to_string() })?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if partitions <= 1 => {}
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                // An existing topic must have at least the partitions configured.
                let metadata = admin
                    .inner()
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .map_err(|e| KafkaError::CreateTopic { topic: topic.clone(), reason: e.to_string() })?;
                let actual = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
                if actual < partitions {
                    return Err(KafkaError::CreateTopic {
                        reason: format!(
                            "it exists with {actual} partitions but [kafka] partitions is {partitions}: create it \
                             with {partitions} or set partitions to {actual}"
                        ),
                        topic,
                    });
                }
            }
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, reason: code.to_string() }),
        }
    }
    Ok(())
}
