//! The symbol dictionary: symbol names (`BTCUSDT`, `XMR/USD`) to the compact ids records carry.
//!
//! Every instance must agree on the ids without coordinating, so the dictionary's source of truth is a
//! single-partition Kafka topic (`sluice.symbols`, kept forever, never compacted): a symbol's id is one
//! plus the offset of the first record that names it. Every instance reading the topic resolves every
//! name identically, whoever wrote it first and however many instances raced to write it. 0 means
//! "no symbol" on the wire.
//!
//! With the local log (no Kafka brokers), the dictionary is the `symbols` table of the log's SQLite
//! file instead: a symbol's id is its row id, given once and never changed, and a restart reads every
//! name back with the id it had ([`Symbols::local`]).
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

use crate::handoff::kafka::{KafkaConfig, KafkaError};

/// What a source's name is kept under in the dictionary: no venue symbol starts with it.
const SOURCE_PREFIX: &str = "\u{1}source:";

/// A shared, thread-safe symbol dictionary.
pub struct Symbols {
    inner: RwLock<Inner>,
    /// What keeps the dictionary beyond this process.
    backing: Backing,
    /// How long naming a new symbol takes in tests that stand in for a slow dictionary.
    #[cfg(test)]
    pub(crate) slow: Option<std::time::Duration>,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols")
            .field("len", &self.len())
            .field("kept", &!matches!(self.backing, Backing::Memory))
            .finish()
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

/// Where names are kept.
enum Backing {
    /// Nowhere: this process only.
    Memory,
    /// The dictionary topic.
    Topic(Mutex<TopicLog>),
    /// The local log's `symbols` table.
    Local(Mutex<rusqlite::Connection>),
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

pub use crate::handoff::kafka::SYMBOLS_TOPIC;

impl Symbols {
    /// An empty dictionary kept in memory only; ids are assigned in order of first use from 1.
    pub fn new() -> Self {
        Symbols {
            inner: RwLock::new(Inner::default()),
            backing: Backing::Memory,
            #[cfg(test)]
            slow: None,
        }
    }

    /// The dictionary kept in `topic` (one partition, created beforehand; see
    /// [`kafka::ensure_symbols_topic`](crate::handoff::kafka::ensure_symbols_topic)): reads every name already
    /// there, so ids given out by any instance are known before the first record is handled. Reading
    /// takes as long as the topic's size needs; `timeout` bounds each wait for the broker (a read
    /// that makes no progress for that long fails), not the whole read.
    ///
    /// # Errors
    /// When a client cannot be created, or reading the topic makes no progress for `timeout`.
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
            backing: Backing::Topic(Mutex::new(log)),
            #[cfg(test)]
            slow: None,
        };
        symbols.catch_up()?;
        Ok(symbols)
    }

    /// The dictionary `handoff` keeps: the local log's `symbols` table, or the shared symbols topic
    /// on Kafka ([`shared`](Self::shared), with a 30 s wait per read). Reads off the async runtime.
    ///
    /// # Errors
    /// As [`shared`](Self::shared) and [`local`](Self::local).
    pub async fn open(handoff: &crate::handoff::Handoff) -> Result<Self, KafkaError> {
        let handoff = handoff.clone();
        let read = tokio::task::spawn_blocking(move || match (handoff.kafka(), handoff.local_log()) {
            (Some((config, brokers)), _) => {
                Symbols::shared(config, brokers, &config.symbols_topic, Duration::from_secs(30))
            }
            (None, Some(log)) => Symbols::local(log.path()),
            (None, None) => Err(KafkaError::Symbols("the hand-off is neither Kafka nor the local log".into())),
        });
        read.await.map_err(|e| KafkaError::Symbols(e.to_string()))?
    }

    /// The dictionary kept in the `symbols` table of the local log at `path` (created by
    /// [`LocalLog::open`](crate::handoff::local::LocalLog::open)): reads every name already there.
    ///
    /// # Errors
    /// When the file cannot be opened or read.
    pub fn local(path: &std::path::Path) -> Result<Self, KafkaError> {
        let err = |e: rusqlite::Error| KafkaError::Symbols(format!("{}: {e}", path.display()));
        let conn = rusqlite::Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        let symbols = Symbols {
            inner: RwLock::new(Inner::default()),
            backing: Backing::Local(Mutex::new(conn)),
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
        let log = match &self.backing {
            Backing::Memory => {
                let mut inner = self.write();
                if let Some(&id) = inner.ids.get(name) {
                    return id;
                }
                let id = inner.names.len() as u32 + 1;
                inner.learn(name, id);
                return id;
            }
            Backing::Local(conn) => {
                let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                return match local_intern(&conn, name) {
                    Ok(id) => {
                        self.write().learn(name, id);
                        id
                    }
                    Err(e) => {
                        tracing::error!(symbol = name, error = %e, "symbol dictionary unavailable");
                        0
                    }
                };
            }
            Backing::Topic(log) => log,
        };
        let started = Instant::now();
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let waited = started.elapsed();
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
        tracing::debug!(
            symbol = name,
            waited_ms = waited.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "symbol named in the dictionary topic"
        );
        result.unwrap_or_else(|e| {
            tracing::error!(symbol = name, error = %e, "symbol dictionary unavailable");
            0
        })
    }

    /// The id `name` has, if this dictionary knows it already; never adds it.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.read().ids.get(name).copied()
    }

    /// The stable id of source `name`: kept in the same dictionary as the symbols (under a name no
    /// venue symbol can have), so records in the log keep meaning the same source whatever the order
    /// of the configuration, and every instance agrees on it.
    ///
    /// # Errors
    /// [`KafkaError::Symbols`] when the dictionary cannot be reached.
    pub fn source_id(&self, name: &str) -> Result<u32, KafkaError> {
        match self.intern(&format!("{SOURCE_PREFIX}{name}")) {
            0 => Err(KafkaError::Symbols(format!("cannot give source {name:?} an id"))),
            id => Ok(id),
        }
    }

    /// The name of the source [`Symbols::source_id`] gave `id`; `None` when `id` is not a source's.
    pub fn source_name(&self, id: u32) -> Option<String> {
        self.name(id)?.strip_prefix(SOURCE_PREFIX).map(str::to_owned)
    }

    /// The name of `id`, if assigned. An unknown id reads the topic's tail once (another instance may
    /// have just assigned it).
    pub fn name(&self, id: u32) -> Option<Arc<str>> {
        if let Some(name) = self.read().names.get(&id) {
            return Some(name.clone());
        }
        if id == 0 || matches!(self.backing, Backing::Memory) {
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
        match &self.backing {
            Backing::Topic(log) => self.read_to_end(&mut log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
            Backing::Local(conn) => {
                let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let known = self.read().names.keys().copied().max().unwrap_or(0);
                let mut stmt = conn
                    .prepare_cached("SELECT id, name FROM symbols WHERE id > ?1 ORDER BY id")
                    .map_err(|e| KafkaError::Symbols(e.to_string()))?;
                let rows = stmt
                    .query_map([known], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?)))
                    .map_err(|e| KafkaError::Symbols(e.to_string()))?;
                for row in rows {
                    let (id, name) = row.map_err(|e| KafkaError::Symbols(e.to_string()))?;
                    self.write().learn(&name, id);
                }
                Ok(())
            }
            Backing::Memory => Ok(()),
        }
    }

    /// Reads the topic up to its current end, learning every name. However long the topic, it
    /// fails only when no record arrives for `log.timeout`: a dictionary that grew large is read to
    /// its end rather than refused for taking longer than a fixed time.
    fn read_to_end(&self, log: &mut TopicLog) -> Result<(), KafkaError> {
        let (_, high) = log
            .consumer
            .fetch_watermarks(&log.topic, 0, log.timeout)
            .map_err(|e| KafkaError::Symbols(format!("cannot read the end of {}: {e}", log.topic)))?;
        let mut progress_at = Instant::now();
        while log.next < high {
            let left = (progress_at + log.timeout).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::Symbols(format!(
                    "reading {} made no progress for {:?} at offset {} of {high}",
                    log.topic, log.timeout, log.next
                )));
            }
            match log.consumer.poll(left.min(Duration::from_millis(200))) {
                None => {}
                Some(Err(e)) => return Err(KafkaError::Symbols(format!("reading {}: {e}", log.topic))),
                Some(Ok(m)) => {
                    progress_at = Instant::now();
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

/// The id of `name` in the local `symbols` table, adding it when new (an id, once given, stays).
fn local_intern(conn: &rusqlite::Connection, name: &str) -> rusqlite::Result<u32> {
    conn.prepare_cached("INSERT INTO symbols (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?.execute([name])?;
    conn.prepare_cached("SELECT id FROM symbols WHERE name = ?1")?.query_row([name], |r| r.get(0))
}

impl TopicLog {
    /// Writes `name` and waits until the broker has it.
    fn append(&mut self, name: &str) -> Result<(), KafkaError> {
        self.producer
            .send(BaseRecord::<(), str>::to(&self.topic).payload(name))
            .map_err(|(e, _)| KafkaError::Symbols(format!("cannot write {name} to {}: {e}", self.topic)))?;
        // Wait for the delivery report, serving the producer's events as they come. (`flush` polls
        // in steps of 100 ms once the record is not delivered on its first look, so every new
        // symbol cost 100 ms while a decode worker waited and its sources' queues filled.) A failed
        // delivery is noticed by the read that follows: the name is not there.
        let deadline = Instant::now() + self.timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(KafkaError::Symbols(format!(
                    "cannot write {name} to {}: not delivered in {:?}",
                    self.topic, self.timeout
                )));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        Ok(())
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

    #[test]
    fn a_source_is_named_back_from_its_id_and_a_symbol_is_no_source() {
        let s = Symbols::new();
        let btc = s.intern("BTCUSDT");
        let binance = s.source_id("binance").unwrap();
        assert_eq!(s.source_name(binance).as_deref(), Some("binance"));
        assert_eq!(s.source_name(btc), None);
        assert_eq!(s.source_name(binance + 1), None);
    }

    /// A dictionary that takes longer to read than the timeout still opens while the read makes
    /// progress: the timeout is for a broker that stops answering, not for a topic that grew (a
    /// start that had to read the whole topic within it failed for good once the topic was large
    /// enough, and no instance could start). Against librdkafka's mock cluster, with a round trip
    /// of 100 ms and one batch of ten names per fetch, reading 300 names takes three seconds.
    #[test]
    fn a_large_dictionary_is_read_to_its_end_however_long_it_takes() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{DefaultProducerContext, ThreadedProducer};
        let cluster = MockCluster::new(1).unwrap();
        let topic = "sluice.symbols";
        cluster.create_topic(topic, 1, 1).unwrap();
        let kafka = KafkaConfig::default();
        let bootstrap = cluster.bootstrap_servers();
        let producer: ThreadedProducer<DefaultProducerContext> =
            kafka.client_config(&bootstrap).set("batch.num.messages", "10").set("linger.ms", "50").create().unwrap();
        let names = 300;
        for i in 0..names {
            let name = format!("SYMBOL{i:03}/USD");
            producer.send(BaseRecord::<(), str>::to(topic).payload(&name)).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        cluster.broker_round_trip_time(-1, Duration::from_millis(100)).unwrap();
        let mut slow = kafka.clone();
        slow.options.insert("fetch.message.max.bytes".into(), "1".into());
        let timeout = Duration::from_secs(1);
        let started = Instant::now();
        let symbols = Symbols::shared(&slow, &bootstrap, topic, timeout).unwrap();
        let took = started.elapsed();
        assert_eq!(symbols.len(), names);
        assert_eq!(symbols.id("SYMBOL000/USD"), Some(1));
        assert!(took > 2 * timeout, "the read took only {took:?}: nothing shows it may outlast the timeout");
    }

    #[test]
    fn local_ids_are_given_once_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("sluice-symbols-local-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("log.sqlite");
        drop(crate::handoff::local::LocalLog::open(&path, &crate::handoff::LocalLogConfig::default()).unwrap());
        let first = Symbols::local(&path).unwrap();
        let other = Symbols::local(&path).unwrap();
        let btc = first.intern("BTCUSDT");
        // A second dictionary on the same file (another thread's connection) agrees.
        assert_eq!(other.intern("BTCUSDT"), btc);
        let eth = other.intern("ETHUSDT");
        assert_ne!(eth, btc);
        assert_eq!(first.name(eth).as_deref(), Some("ETHUSDT"));
        drop((first, other));
        let again = Symbols::local(&path).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!((again.intern("ETHUSDT"), again.intern("BTCUSDT")), (eth, btc));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
