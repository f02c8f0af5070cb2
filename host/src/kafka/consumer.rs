//! The process role's consumer: reads `sluice.events` from where the sink says it stands.
//!
//! Offsets are never committed to Kafka: the sink stores them together with the rows they produced
//! (the embedded store in the same SQLite transaction), and on start the consumer is assigned every
//! partition at the sink's offsets.

use std::time::Duration;

use plugin_sdk::wire::push_delimited;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaConfig, KafkaError};

/// A batch of consumed records: payloads length-delimited in one buffer, and where each came from.
#[derive(Debug, Default)]
pub struct Polled {
    /// The payloads, length-delimited (one allocation per batch, not per record).
    pub records: Vec<u8>,
    /// (partition, offset) of each record, in order.
    pub positions: Vec<(i32, i64)>,
}

impl Polled {
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.records.clear();
        self.positions.clear();
    }
}

/// Reads the events topic.
pub struct EventConsumer {
    inner: BaseConsumer,
    topic: String,
}

impl EventConsumer {
    /// A consumer of `config.events_topic` that never commits offsets to Kafka and reads only
    /// committed transactional data.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses a setting.
    pub fn new(config: &KafkaConfig, brokers: &str, group: &str) -> Result<Self, KafkaError> {
        let mut c = config.client_config(brokers);
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed");
        for (k, v) in &config.options {
            c.set(k, v);
        }
        let inner: BaseConsumer = c.create().map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(EventConsumer { inner, topic: config.events_topic.clone() })
    }

    /// Assigns partitions `0..partitions`, each at its stored next offset or at the beginning.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when the assignment is refused.
    pub fn assign(&self, partitions: i32, stored: &[(String, i32, i64)]) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let offset = stored
                .iter()
                .find(|(t, part, _)| *t == self.topic && *part == p)
                .map_or(Offset::Beginning, |(_, _, next)| Offset::Offset(*next));
            tpl.add_partition_offset(&self.topic, p, offset).map_err(|e| KafkaError::Config(e.to_string()))?;
        }
        self.inner.assign(&tpl).map_err(|e| KafkaError::Config(e.to_string()))
    }

    /// Polls up to `max` records into `out`, waiting at most `timeout` for the first one.
    /// Consumer errors are logged and counted by the caller through the returned error count.
    pub fn poll_into(&self, out: &mut Polled, max: usize, timeout: Duration) -> usize {
        let mut errors = 0;
        let mut wait = timeout;
        while out.positions.len() < max {
            match self.inner.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    push_delimited(&mut out.records, m.payload().unwrap_or_default());
                    out.positions.push((m.partition(), m.offset()));
                }
                Some(Err(e)) => {
                    errors += 1;
                    tracing::warn!(error = %e, "consumer error");
                }
            }
            // Only the first poll waits; the rest take what is already fetched.
            wait = Duration::ZERO;
        }
        errors
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}
