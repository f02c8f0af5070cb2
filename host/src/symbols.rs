//! The symbol dictionary: symbol names (`BTCUSDT`, `XMR/USD`) to the compact ids records carry.
//!
//! Every instance must agree on the ids without coordinating, so the dictionary's source of truth is a
//! single-partition Kafka topic (`sluice.symbols`, kept forever, never compacted): a symbol's id is one
//! plus the offset of the first record that names it. Every instance reading the topic resolves every
//! name identically, whoever wrote it first and however many instances raced to write it. 0 means
//! "no symbol" on the wire.
//!
//! Plugins reach the dictionary through the `intern-symbol` host import and cache ids themselves, so
//! lookups here are rare after warm-up; a miss costs a produce and a read of the topic's tail.
//! [`Symbols::new`] is an in-memory dictionary for tests and one-off tools (`sluice plugin test`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{KafkaConfig, KafkaError};

/// A shared, thread-safe symbol dictionary.
pub struct Symbols {
    inner: RwLock<Inner>,
    /// The topic behind the dictionary; `None` for an in-memory one.
    log: Option<Mutex<TopicLog>>,
    /// How long naming a new symbol takes in tests that stand in for a slow dictionary.
    #[cfg(test)]
    pub(crate) slow: Option<std::time::Duration>,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols").field("len", &self.len()).field("shared", &self.log.is_some()).finish()
    }
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashMap<Arc<str>, u32>,
    names: HashMap<u32, Arc<str>>,
}

impl Inner {
    /// Records that `id` names `name`, unless the name already has an (earlier) id.
    fn learn(&mut self, name: &str, id: u32) {
        if !self.ids.contains_key(name) {
            let name: Arc<str> = name.into();
            self.ids.insert(name.clone(), id);
            self.names.insert(id, name);
        }
    }
}

/// The dictionary topic: a producer to add names and a consumer that reads the log in order.
struct TopicLog {
    producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    consumer: BaseConsumer,
    topic: String,
    /// The next offset to read.
    next: i64,
    timeout: Duration,
}

/// The topic holding the dictionary by default.
pub const SYMBOLS_TOPIC: &str = "sluice.symbols";

impl Symbols {
    /// An empty dictionary kept in memory only; ids are assigned in order of first use from 1.
    pub fn new() -> Self {
        Symbols {
            inner: RwLock::new(Inner::default()),
            log: None,
            #[cfg(test)]
            slow: None,
        }
    }

    /// The dictionary kept in `topic` (one partition, created beforehand; see
    /// [`kafka::ensure_symbols_topic`](crate::kafka::ensure_symbols_topic)): reads every name already
    /// there, so ids given out by any instance are known before the first record is handled.
    ///
    /// # Errors
    /// When a client cannot be created or the topic cannot be read within `timeout`.
    pub fn shared(config: &KafkaConfig, brokers: &str, topic: &str, timeout: Duration) -> Result<Self, KafkaError> {
        let mut p = config.client_config(brokers);
        p.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "0");
        let producer = p.create().map_err(|e| KafkaError::Config(e.to_string()))?;
        let mut c = config.client_config(brokers);
        c.set("group.id", "sluice-symbols")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer = c.create().map_err(|e| KafkaError::Config(e.to_string()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).map_err(|e| KafkaError::Config(e.to_string()))?;
        consumer.assign(&tpl).map_err(|e| KafkaError::Config(e.to_string()))?;
        let log = TopicLog { producer, consumer, topic: topic.to_owned(), next: 0, timeout };
        let symbols = Symbols {
            inner: RwLock::new(Inner::default()),
            log: Some(Mutex::new(log)),
            #[cfg(test)]
            slow: None,
        };
        symbols.catch_up()?;
        Ok(symbols)
    }

    /// The id of `name`, adding it to the dictionary on first use. 0 when the dictionary cannot be
    /// reached (logged); the record then carries no symbol rather than a wrong one.
    pub fn intern(&self, name: &str) -> u32 {
        if let Some(&id) = self.read().ids.get(name) {
            return id;
        }
        #[cfg(test)]
        if let Some(delay) = self.slow {
            std::thread::sleep(delay);
        }
        let Some(log) = &self.log else {
            let mut inner = self.write();
            if let Some(&id) = inner.ids.get(name) {
                return id;
            }
            let id = inner.names.len() as u32 + 1;
            inner.learn(name, id);
            return id;
        };
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = (|| {
            // Another instance (or thread) may have named it since this one last read.
            self.read_to_end(&mut log)?;
            if let Some(&id) = self.read().ids.get(name) {
                return Ok(id);
            }
            log.append(name)?;
            self.read_to_end(&mut log)?;
            self.read()
                .ids
                .get(name)
                .copied()
                .ok_or_else(|| KafkaError::Symbols(format!("{name} was written but not read back")))
        })();
        result.unwrap_or_else(|e| {
            tracing::error!(symbol = name, error = %e, "symbol dictionary unavailable");
            0
        })
    }

    /// The name of `id`, if assigned. An unknown id reads the topic's tail once (another instance may
    /// have just assigned it).
    pub fn name(&self, id: u32) -> Option<Arc<str>> {
        if let Some(name) = self.read().names.get(&id) {
            return Some(name.clone());
        }
        if id == 0 || self.log.is_none() {
            return None;
        }
        if let Err(e) = self.catch_up() {
            tracing::warn!(id, error = %e, "symbol dictionary unavailable");
        }
        self.read().names.get(&id).cloned()
    }

    /// How many symbols are known.
    pub fn len(&self) -> usize {
        self.read().names.len()
    }

    /// True when no symbol is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn catch_up(&self) -> Result<(), KafkaError> {
        match &self.log {
            Some(log) => self.read_to_end(&mut log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
            None => Ok(()),
        }
    }

    /// Reads the topic up to its current end, learning every name.
    fn read_to_end(&self, log: &mut TopicLog) -> Result<(), KafkaError> {
        let deadline = Instant::now() + log.timeout;
        let (_, high) = log
            .consumer
            .fetch_watermarks(&log.topic, 0, log.timeout)
            .map_err(|e| KafkaError::Symbols(format!("cannot read the end of {}: {e}", log.topic)))?;
        while log.next < high {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::Symbols(format!("timed out reading {} at offset {}", log.topic, log.next)));
            }
            match log.consumer.poll(left.min(Duration::from_millis(200))) {
                None => {}
                Some(Err(e)) => return Err(KafkaError::Symbols(format!("reading {}: {e}", log.topic))),
                Some(Ok(m)) => {
                    let offset = m.offset();
                    log.next = offset + 1;
                    let Some(name) = m.payload().and_then(|p| std::str::from_utf8(p).ok()) else {
                        tracing::warn!(offset, topic = %log.topic, "a symbol record that is not UTF-8; skipped");
                        continue;
                    };
                    let Ok(id) = u32::try_from(offset + 1) else {
                        return Err(KafkaError::Symbols(format!("{} is past the last usable id", log.topic)));
                    };
                    self.write().learn(name, id);
                }
            }
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // Every write inserts into both maps before releasing, so a poisoned lock is still safe to read.
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TopicLog {
    /// Writes `name` and waits until the broker has it.
    fn append(&mut self, name: &str) -> Result<(), KafkaError> {
        self.producer
            .send(BaseRecord::<(), str>::to(&self.topic).payload(name))
            .map_err(|(e, _)| KafkaError::Symbols(format!("cannot write {name} to {}: {e}", self.topic)))?;
        self.producer
            .flush(self.timeout)
            .map_err(|e| KafkaError::Symbols(format!("cannot write {name} to {}: {e}", self.topic)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_dense_in_memory() {
        let s = Symbols::new();
        assert_eq!(s.intern("BTCUSDT"), 1);
        assert_eq!(s.intern("XMR/USD"), 2);
        assert_eq!(s.intern("BTCUSDT"), 1);
        assert_eq!(s.name(2).as_deref(), Some("XMR/USD"));
        assert_eq!(s.name(0), None);
        assert_eq!(s.name(3), None);
        assert_eq!(s.len(), 2);
    }
}
