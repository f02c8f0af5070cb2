//! Kafka: the producer ingest writes with, the consumer process reads with, and the topics they share
//! (the hand-off when `[kafka] brokers` is set; see [`crate::handoff`]).

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
    /// (see [`crate::handoff`]).
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
    /// Replicas of each partition of the topics sluice creates (the symbol dictionary included):
    /// 3 by default, for a real cluster; a cluster with fewer brokers is refused when a topic is
    /// created. A single broker (a test or development one) needs 1.
    #[serde(default = "defaults::replication_factor")]
    pub replication_factor: i16,
    /// `min.insync.replicas` of the topics sluice creates: with `acks=all`, a write is acknowledged
    /// once this many replicas have it (2 by default; at most `replication_factor`).
    #[serde(default = "defaults::min_insync_replicas")]
    pub min_insync_replicas: i16,
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
    /// Any other librdkafka property, passed through as is (e.g. `security.protocol`). Secrets among
    /// them (see [`is_secret`]) print as `***`.
    #[serde(default, serialize_with = "serialize_options")]
    pub options: BTreeMap<String, String>,
    /// For this run (`sluice run --skip-deleted-records`, never from the file): where the embedded
    /// store's position in the events topic is before a partition's start (retention deleted records
    /// it had not read), go on from the start, logging the records lost, instead of refusing.
    #[serde(skip)]
    pub skip_deleted_records: bool,
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
            replication_factor: defaults::replication_factor(),
            min_insync_replicas: defaults::min_insync_replicas(),
            compression: defaults::compression(),
            linger_ms: defaults::linger_ms(),
            batch_bytes: defaults::batch_bytes(),
            options: BTreeMap::new(),
            skip_deleted_records: false,
        }
    }
}

/// The client properties the delivery contract rests on, with why: sluice sets them on the clients
/// that need them, after `[kafka] options`, and [`KafkaConfig::validate`] refuses options that name
/// them (aliases included), so no option can undo exactly-once or make a skip silent.
pub const SAFETY_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set [kafka] brokers instead"),
    ("metadata.broker.list", "set [kafka] brokers instead"),
    ("group.id", "the process role's group is [process] group"),
    ("group.instance.id", "derived from [process] group and instance"),
    ("enable.auto.commit", "offsets are committed only with the rows they produced"),
    ("auto.commit.enable", "offsets are committed only with the rows they produced"),
    ("enable.auto.offset.store", "offsets are committed only with the rows they produced"),
    ("auto.offset.reset", "a position the topic no longer holds stops the process role instead of a silent jump"),
    ("isolation.level", "only committed transactions are read"),
    ("partition.assignment.strategy", "eager assignors: a rebalance drops the rows of revoked partitions"),
    ("enable.idempotence", "records are written idempotently"),
    ("acks", "records are acknowledged by all in-sync replicas (acks=all)"),
    ("request.required.acks", "records are acknowledged by all in-sync replicas (acks=all)"),
    ("transactional.id", "derived from [process] group and instance, or from the file source"),
];

impl KafkaConfig {
    /// A librdkafka client config with the brokers and the pass-through options.
    pub fn client_config(&self, brokers: &str) -> ClientConfig {
        self.client_config_with(brokers, &[])
    }

    /// A librdkafka client config with the brokers, then `defaults`, then the pass-through options
    /// (which may change the defaults). The caller sets its safety settings after this, so they win.
    pub fn client_config_with(&self, brokers: &str, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// Checks what types cannot: positive partitions, a replication the topics can have, and no
    /// pass-through option that would override a safety setting ([`SAFETY_KEYS`]).
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.partitions <= 0 {
            return Err("kafka.partitions must be positive".into());
        }
        if self.replication_factor < 1 {
            return Err("kafka.replication_factor must be at least 1".into());
        }
        if self.min_insync_replicas < 1 || i32::from(self.min_insync_replicas) > i32::from(self.replication_factor) {
            return Err(format!(
                "kafka.min_insync_replicas ({}) must be between 1 and kafka.replication_factor ({})",
                self.min_insync_replicas, self.replication_factor
            ));
        }
        for key in self.options.keys() {
            if let Some((_, why)) = SAFETY_KEYS.iter().find(|(k, _)| k.eq_ignore_ascii_case(key.trim())) {
                return Err(format!(
                    "kafka.options: {key:?} is set by sluice ({why}) and may not be overridden; remove it"
                ));
            }
        }
        Ok(())
    }
}

/// Whether a client property holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, a JAAS line with its password, a private key): such values
/// print as `***` wherever a configuration is printed (`sluice check-config`).
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "sasl.oauthbearer.config", "ssl.key.pem"].iter().any(|s| key.contains(s))
}

/// Serializes client properties with the values of secrets (see [`is_secret`]) as `***`.
pub(crate) fn serialize_options<S: serde::Serializer>(
    options: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(options.iter().map(|(k, v)| (k, if is_secret(k) { "***" } else { v.as_str() })))
}

/// The headers every dead letter carries on the dead-letter topic: its source, plugin, stage,
/// reason (as kept: see [`DeadLetter::kept_reason`](crate::handoff::DeadLetter::kept_reason)) and the
/// payload's original length in bytes (`sluice.length`: the payload itself is cut to
/// [`DEAD_LETTER_MAX_BYTES`](crate::handoff::stage::DEAD_LETTER_MAX_BYTES)).
pub fn dead_letter_headers(d: &crate::handoff::DeadLetter<'_>) -> rdkafka::message::OwnedHeaders {
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
    pub fn replication_factor() -> i16 {
        3
    }
    pub fn min_insync_replicas() -> i16 {
        2
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

/// Creates `topics` with `partitions` each, `[kafka] replication_factor` replicas and
/// `min_insync_replicas`; topics that already exist are fine.
///
/// # Errors
/// [`KafkaError`] when the admin client cannot be created or the broker refuses (a cluster with
/// fewer brokers than the replication factor, say).
pub async fn ensure_topics(
    config: &KafkaConfig,
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let min_insync = config.min_insync_replicas.to_string();
    let new: Vec<_> = topics.iter().map(|t| new_topic(config, t, partitions, &min_insync)).collect();
    create_topics(config, brokers, &new, partitions).await
}

/// A topic to create with the configured replication.
fn new_topic<'a>(config: &KafkaConfig, name: &'a str, partitions: i32, min_insync: &'a str) -> NewTopic<'a> {
    NewTopic::new(name, partitions, TopicReplication::Fixed(i32::from(config.replication_factor)))
        .set("min.insync.replicas", min_insync)
}

/// Creates the symbol dictionary topic when it does not exist: one partition (ids are offsets, so
/// there must be one order), kept forever and never compacted (compaction would keep a name's last
/// record, and ids are its first).
///
/// # Errors
/// [`KafkaError::CreateTopic`] when the broker refuses.
pub async fn ensure_symbols_topic(config: &KafkaConfig, brokers: &str) -> Result<(), KafkaError> {
    let min_insync = config.min_insync_replicas.to_string();
    let topic = new_topic(config, &config.symbols_topic, 1, &min_insync)
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
    let min_insync = config.min_insync_replicas.to_string();
    let topic = new_topic(config, topic, 1, &min_insync).set("cleanup.policy", "compact");
    create_topics(config, brokers, &[topic], 1).await
}

/// Creates a checkpoint topic (see [`crate::sink::druid::checkpoint`]) when it does not exist: one
/// partition (checkpoints in the order they were taken), `cleanup.policy=delete`, and the time
/// retention of the events topic `events` as the broker reports it (Kafka's default of a week when
/// it reports none) with no size limit, so a checkpoint is kept as long as the records after it are.
///
/// # Errors
/// [`KafkaError::CreateTopic`] when the broker refuses.
pub async fn ensure_checkpoint_topic(
    config: &KafkaConfig,
    brokers: &str,
    topic: &str,
    events: &str,
) -> Result<(), KafkaError> {
    let retention_ms = topic_retention_ms(config, brokers, events).await.unwrap_or_else(|e| {
        tracing::warn!(topic = %events, error = %e, "the events topic's retention is unknown; checkpoints keep Kafka's default of a week");
        DEFAULT_RETENTION_MS
    });
    let retention = retention_ms.to_string();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", &retention)
        .set("retention.bytes", "-1");
    create_topics(config, brokers, &[new], 1).await
}

/// Kafka's default `retention.ms`: a week.
const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3_600_000;

/// The `retention.ms` of `topic` as the broker reports it (-1: kept forever).
///
/// # Errors
/// [`KafkaError::Config`] when the admin client cannot be created, [`KafkaError::Read`] when the
/// broker does not describe the topic or reports no `retention.ms`.
pub async fn topic_retention_ms(config: &KafkaConfig, brokers: &str, topic: &str) -> Result<i64, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> =
        config.client_config(brokers).create().map_err(|e| KafkaError::Config(e.to_string()))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let unknown = |reason: String| KafkaError::Read { topic: topic.to_owned(), reason };
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| unknown(format!("describing its configuration: {e}")))?;
    let resource = described
        .into_iter()
        .next()
        .ok_or_else(|| unknown("no configuration".into()))?
        .map_err(|code| unknown(format!("describing its configuration: {code}")))?;
    let value = resource.get("retention.ms").and_then(|e| e.value.clone());
    value.and_then(|v| v.parse().ok()).ok_or_else(|| unknown("no retention.ms".into()))
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
            Err((topic, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                let count = admin.inner().fetch_metadata(None, Duration::from_secs(10)).map(|m| m.brokers().len());
                let cluster = count.map_or_else(|_| "fewer brokers".to_owned(), |n| format!("{n} broker(s)"));
                return Err(KafkaError::CreateTopic {
                    reason: format!(
                        "the cluster has {cluster} but [kafka] replication_factor is {}: set replication_factor \
                         (and min_insync_replicas) to what the cluster can hold; a single broker needs 1 for both",
                        config.replication_factor
                    ),
                    topic,
                });
            }
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, reason: code.to_string() }),
        }
    }
    Ok(())
}

/// The message key of a record: source id and symbol id, big-endian.
pub fn record_key(source_id: u32, symbol_id: u32) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&source_id.to_be_bytes());
    key[4..].copy_from_slice(&symbol_id.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_option(key: &str, value: &str) -> KafkaConfig {
        let mut config = KafkaConfig::default();
        config.options.insert(key.into(), value.into());
        config
    }

    #[test]
    fn options_may_not_undo_the_safety_settings() {
        for (key, value) in [
            ("enable.auto.commit", "true"),
            ("isolation.level", "read_uncommitted"),
            ("auto.offset.reset", "earliest"),
            ("acks", "1"),
            ("Request.Required.Acks", "1"),
            ("enable.idempotence", "false"),
            ("transactional.id", "mine"),
            ("group.id", "other"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ] {
            let err = with_option(key, value).validate().unwrap_err();
            assert!(err.starts_with(&format!("kafka.options: {key:?} is set by sluice")), "{err}");
        }
        // Anything else passes through.
        with_option("security.protocol", "sasl_ssl").validate().unwrap();
        with_option("message.timeout.ms", "60000").validate().unwrap();
        // Defaults are what the options may change: they come before them.
        let c = with_option("linger.ms", "5").client_config_with("b:9092", &[("linger.ms", "1")]);
        assert_eq!(c.get("linger.ms"), Some("5"));
    }

    #[test]
    fn replication_defaults_to_a_real_clusters_and_is_checked() {
        let c: KafkaConfig = toml::from_str("brokers = 'b:9092'").unwrap();
        assert_eq!((c.replication_factor, c.min_insync_replicas), (3, 2));
        c.validate().unwrap();
        let one: KafkaConfig = toml::from_str("replication_factor = 1\nmin_insync_replicas = 1").unwrap();
        one.validate().unwrap();
        let err = KafkaConfig { replication_factor: 1, ..KafkaConfig::default() }.validate().unwrap_err();
        assert_eq!(err, "kafka.min_insync_replicas (2) must be between 1 and kafka.replication_factor (1)");
        let err = KafkaConfig { replication_factor: 0, ..KafkaConfig::default() }.validate().unwrap_err();
        assert!(err.starts_with("kafka.replication_factor"), "{err}");
    }

    #[test]
    fn secrets_among_the_options_never_print() {
        let mut config = with_option("sasl.password", "hunter2");
        config.options.insert("sasl.oauthbearer.client.secret".into(), "hunter3".into());
        config.options.insert("security.protocol".into(), "sasl_ssl".into());
        let printed = toml::to_string(&config).unwrap();
        assert!(!printed.contains("hunter"), "{printed}");
        assert!(printed.contains("\"sasl.password\" = \"***\"") && printed.contains("sasl_ssl"), "{printed}");
    }
}
