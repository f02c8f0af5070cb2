//! Rows to the Druid topic, exactly once: each batch of rows is produced in one Kafka transaction
//! together with the consumer offsets it covers (`send_offsets_to_transaction`), so a Druid supervisor
//! reading with `isolation.level=read_committed` sees every row once.
//!
//! As Kafka documents transactional consume-transform-produce:
//! - One transactional id per process instance (`sluice-druid-<group>-<instance>`), stable across
//!   restarts: `init_transactions` at start fences the previous incarnation of the instance and
//!   aborts whatever transaction it left open (say, after a `kill -9`).
//! - The offsets go with the consumer group's metadata, so the group coordinator refuses a commit
//!   from an instance that lost its partitions in a rebalance (zombie fencing across instances).
//! - Any error aborts the transaction; the caller then reads again from the last committed offsets.
//!
//! The chains' plugin state changes go to the changelog topic in the same transaction (see
//! [`super::state`]), and so do the checkpoints of their whole state (see [`super::checkpoint`]).

use std::time::Duration;

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{DruidSinkConfig, encode_row};
use crate::log::Reader;
use crate::log::kafka::consumer::EventConsumer;
use crate::log::kafka::{KafkaConfig, KafkaError, send_waiting};
use crate::proto::StreamData;
use crate::sink::{DeadLetter, Row, Sink, StateWrite};

/// The transactional writer of the Druid topic.
pub struct DruidSink {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    /// Where the transform stage's dead letters go, in the same transactions.
    dlq_topic: String,
    /// Where the chains' state changes go, in the same transactions.
    state_topic: String,
    /// One encoded row, reused.
    buf: Vec<u8>,
    timeout: Duration,
    /// Where the transactions' time went since the last report.
    phases: Phases,
    /// The Kafka settings and brokers, to read the changelog back.
    kafka: (KafkaConfig, String),
    /// The chains' whole state as committed: the changelog read back when first needed (see
    /// [`Sink::committed_state`], and the first checkpoint). With checkpoints it is kept up to date
    /// with each commit's changes; without, forgotten at the next commit. Forgotten too when a
    /// commit fails, whose outcome is then unknown.
    changelog: Option<super::state::StoredState>,
    /// Checkpoints of the state, when the process role asks for them.
    checkpoints: Option<Checkpoints>,
    /// The producer's transactional id: each checkpoint's id starts with it, so two instances'
    /// checkpoints never share one.
    transactional_id: String,
}

/// When and where the sink keeps checkpoints of the chains' state (see [`super::checkpoint`]).
#[derive(Debug)]
struct Checkpoints {
    /// The checkpoint topic.
    topic: String,
    /// At most one checkpoint per this long, taken with a commit that changed state.
    every: Duration,
    /// When the last was committed.
    last: Option<std::time::Instant>,
    /// The events topic's committed position of every partition, as [`DruidSink::changelog`]'s
    /// state goes with it: read with it, moved by each commit after.
    positions: Option<crate::log::Positions>,
    /// Checkpoints taken by this sink, for their ids.
    taken: u64,
}

/// Time spent in each phase of the transactions since the last report (logged every 10 s): handing
/// rows to the client, the offsets round trip to the group coordinator, and the commit (which waits
/// for the brokers to acknowledge every row and write the commit markers).
#[derive(Debug)]
struct Phases {
    since: std::time::Instant,
    transactions: u32,
    rows: usize,
    produce: Duration,
    offsets: Duration,
    commit: Duration,
}

impl Phases {
    fn new() -> Self {
        Phases {
            since: std::time::Instant::now(),
            transactions: 0,
            rows: 0,
            produce: Duration::ZERO,
            offsets: Duration::ZERO,
            commit: Duration::ZERO,
        }
    }

    fn report_if_due(&mut self) {
        if self.since.elapsed() < Duration::from_secs(10) || self.transactions == 0 {
            return;
        }
        let avg = |d: Duration| (d / self.transactions).as_secs_f64() * 1000.0;
        tracing::info!(
            transactions = self.transactions,
            rows = self.rows,
            produce_ms = format!("{:.1}", avg(self.produce)),
            send_offsets_ms = format!("{:.1}", avg(self.offsets)),
            commit_ms = format!("{:.1}", avg(self.commit)),
            "Druid transactions (average per transaction)"
        );
        *self = Phases::new();
    }
}

/// The transactional id of process instance `instance` in `group`.
pub fn transactional_id(group: &str, instance: &str) -> String {
    format!("sluice-druid-{group}-{instance}")
}

impl DruidSink {
    /// A transactional producer for `druid.topic`, initialised (fencing any earlier producer with the
    /// same transactional id).
    ///
    /// # Errors
    /// [`KafkaError::Config`] for a refused setting, [`KafkaError::Transaction`] when the transaction
    /// coordinator cannot be reached within `timeout`.
    pub fn new(
        kafka: &KafkaConfig,
        brokers: &str,
        druid: &DruidSinkConfig,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let linger = kafka.linger_ms.to_string();
        let mut c = kafka.client_config_with(
            brokers,
            &[
                ("compression.type", &kafka.compression),
                ("linger.ms", &linger),
                // An instance that dies mid-transaction holds back read_committed readers until its
                // transaction times out (or it restarts), so keep the timeout short; batches commit in
                // ~1 s.
                ("transaction.timeout.ms", "15000"),
            ],
        );
        // After the pass-through options, so none of them undoes exactly-once.
        c.set("transactional.id", transactional_id).set("enable.idempotence", "true").set("acks", "all");
        let producer: ThreadedProducer<DefaultProducerContext> =
            c.create().map_err(|e| KafkaError::Config(e.to_string()))?;
        producer
            .init_transactions(timeout)
            .map_err(|e| KafkaError::Transaction(format!("init_transactions as {transactional_id}: {e}")))?;
        Ok(DruidSink {
            producer,
            topic: druid.topic.clone(),
            dlq_topic: kafka.dlq_topic.clone(),
            state_topic: druid.state_topic(),
            buf: Vec::with_capacity(128),
            timeout,
            phases: Phases::new(),
            kafka: (kafka.clone(), brokers.to_owned()),
            changelog: None,
            checkpoints: None,
            transactional_id: transactional_id.to_owned(),
        })
    }

    /// Keeps a checkpoint of the chains' whole state in `topic` with the commits that change state,
    /// at most once per `every` (see [`super::checkpoint`]).
    pub fn with_checkpoints(mut self, topic: String, every: Duration) -> Self {
        self.checkpoints = Some(Checkpoints { topic, every, last: None, positions: None, taken: 0 });
        self
    }

    /// Whether this commit takes a checkpoint: it changes state, moves offsets, and the last one is
    /// old enough.
    fn checkpoint_due(&self, offsets: &[(&str, i32, i64)], state: &[StateWrite<'_>]) -> bool {
        self.checkpoints.as_ref().is_some_and(|c| {
            !state.is_empty() && !offsets.is_empty() && c.last.is_none_or(|at| at.elapsed() >= c.every)
        })
    }

    /// Brings the copy of the committed state and positions up to this commit, before it runs: read
    /// back first when a checkpoint is due and there is none (no transaction of this sink is open
    /// then, so the changelog and the group's offsets are those of its last commit), and moved by
    /// this commit's changes and offsets.
    fn follow(
        &mut self,
        offsets: &[(&str, i32, i64)],
        state: &[StateWrite<'_>],
        consumer: &EventConsumer,
        due: bool,
    ) -> Result<(), KafkaError> {
        let Some(checkpoints) = &mut self.checkpoints else {
            self.changelog = None;
            return Ok(());
        };
        if due && (self.changelog.is_none() || checkpoints.positions.is_none()) {
            let (kafka, brokers) = &self.kafka;
            self.changelog = Some(super::state::read(kafka, brokers, &self.state_topic)?);
            checkpoints.positions = Some(consumer.committed_positions(self.timeout)?);
        }
        if let (Some(changelog), Some(positions)) = (&mut self.changelog, &mut checkpoints.positions) {
            state.iter().for_each(|w| changelog.apply_write(w));
            positions.extend(offsets.iter().map(|(_, p, next)| (*p, *next)));
        } else {
            // Not both read back yet: a state without its positions is not followed.
            self.changelog = None;
        }
        Ok(())
    }

    /// A checkpoint of the state after this commit, to the checkpoint topic in the open transaction.
    fn produce_checkpoint(&mut self, events_topic: &str) -> Result<(), KafkaError> {
        use rdkafka::message::{Header, OwnedHeaders};
        let (Some(c), Some(state)) = (&mut self.checkpoints, &self.changelog) else { return Ok(()) };
        let Some(positions) = &c.positions else { return Ok(()) };
        let at_ms = crate::clock::now_ms();
        c.taken += 1;
        let id = format!("{}/{at_ms}/{}", self.transactional_id, c.taken);
        let (producer, topic) = (&self.producer, &c.topic);
        super::checkpoint::encode(state, (at_ms, events_topic, positions), |part, payload| {
            let headers =
                OwnedHeaders::new().insert(Header { key: super::checkpoint::PART_HEADER, value: Some(part.as_str()) });
            let record = BaseRecord::<str, [u8]>::to(topic).key(&id).payload(payload).headers(headers);
            send_waiting(producer, record, Duration::from_millis(1), || {})
                .map_err(|e| KafkaError::Transaction(format!("produce to {topic}: {e}")))
        })
    }

    /// The dead letters of the batch's polls, to the dead-letter topic in the same transaction (so
    /// exactly once, like the rows), with the same headers as every dead letter and the same caps
    /// (a reason or payload too large for a message would fail every retry of the transaction).
    fn dead_letter_all(&mut self, dead: &[DeadLetter<'_>]) -> Result<(), KafkaError> {
        for d in dead {
            let headers = crate::log::kafka::dead_letter_headers(d);
            let record =
                BaseRecord::<str, [u8]>::to(&self.dlq_topic).key(d.source).payload(d.kept_bytes()).headers(headers);
            send_waiting(&self.producer, record, Duration::from_millis(1), || {})
                .map_err(|e| KafkaError::Transaction(format!("produce to {}: {e}", self.dlq_topic)))?;
        }
        Ok(())
    }

    /// The chains' state changes, to the changelog topic in the same transaction: a record per changed
    /// key (a tombstone for a removed one), after a tombstone for each stored key a reset dropped.
    fn produce_state(&mut self, state: &[StateWrite<'_>]) -> Result<(), KafkaError> {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        for s in state {
            let dropped = s.dropped.iter().filter(|k| s.reset && !s.changes.contains_key(*k)).map(|k| (k, None));
            for (entry, now) in dropped.chain(s.changes.iter().map(|(k, v)| (k, v.as_deref()))) {
                key.clear();
                super::state::encode_key(s.source, s.link, entry, &mut key);
                let mut record = BaseRecord::<[u8], [u8]>::to(&self.state_topic).key(&key);
                if let Some(v) = now {
                    value.clear();
                    super::state::encode_value(s.format, v, &mut value);
                    record = record.payload(&value);
                }
                send_waiting(&self.producer, record, Duration::from_millis(1), || {})
                    .map_err(|e| KafkaError::Transaction(format!("produce to {}: {e}", self.state_topic)))?;
            }
        }
        Ok(())
    }

    fn produce_all(&mut self, rows: &[Row<'_>]) -> Result<(), KafkaError> {
        for row in rows {
            let record = StreamData {
                timestamp_ms: row.timestamp_ms,
                price_e8: row.price_e8,
                volume_e8: row.volume_e8,
                is_buy: row.is_buy,
                ..StreamData::default()
            };
            self.buf.clear();
            encode_row(&record, row.source, row.symbol, &mut self.buf);
            // Keyed by symbol: one symbol's rows stay in one partition, which keeps Druid's rollup tight.
            let record = BaseRecord::<str, [u8]>::to(&self.topic).key(row.symbol).payload(&self.buf);
            send_waiting(&self.producer, record, Duration::from_millis(1), || {})
                .map_err(|e| KafkaError::Transaction(format!("produce to {}: {e}", self.topic)))?;
        }
        Ok(())
    }

    /// Produces `rows` to the topic in one transaction of their own, with no consumer offsets: a
    /// replay's rows, whose records the live group has consumed already. Nothing of a failed call is
    /// visible to `read_committed` readers.
    ///
    /// # Errors
    /// [`KafkaError::Transaction`]; the transaction is aborted.
    pub fn commit_rows(&mut self, rows: &[Row<'_>]) -> Result<(), KafkaError> {
        let tx = |what: &str, e: rdkafka::error::KafkaError| KafkaError::Transaction(format!("{what}: {e}"));
        let result = self.producer.begin_transaction().map_err(|e| tx("begin", e)).and_then(|()| {
            self.produce_all(rows)?;
            self.producer.commit_transaction(self.timeout).map_err(|e| tx("commit", e))
        });
        if result.is_err()
            && let Err(abort) = self.producer.abort_transaction(self.timeout)
        {
            tracing::warn!(error = %abort, "aborting the Druid transaction failed");
        }
        result
    }

    fn transact(
        &mut self,
        rows: &[Row<'_>],
        offsets: &[(&str, i32, i64)],
        dead: &[DeadLetter<'_>],
        state: &[StateWrite<'_>],
        consumer: &EventConsumer,
    ) -> Result<(), KafkaError> {
        let tx = |what: &str, e: rdkafka::error::KafkaError| KafkaError::Transaction(format!("{what}: {e}"));
        let started = std::time::Instant::now();
        let due = self.checkpoint_due(offsets, state);
        self.follow(offsets, state, consumer, due)?;
        self.producer.begin_transaction().map_err(|e| tx("begin", e))?;
        self.produce_all(rows)?;
        self.dead_letter_all(dead)?;
        self.produce_state(state)?;
        if due {
            self.produce_checkpoint(offsets[0].0)?;
        }
        let produced = std::time::Instant::now();
        let mut tpl = TopicPartitionList::new();
        for &(topic, partition, next) in offsets {
            tpl.add_partition_offset(topic, partition, Offset::Offset(next))
                .map_err(|e| KafkaError::Transaction(e.to_string()))?;
        }
        let group = consumer.group_metadata()?;
        self.producer.send_offsets_to_transaction(&tpl, &group, self.timeout).map_err(|e| tx("send offsets", e))?;
        let offsets_sent = std::time::Instant::now();
        self.commit_retrying()?;
        if let (true, Some(c)) = (due, &mut self.checkpoints) {
            c.last = Some(std::time::Instant::now());
        }
        let p = &mut self.phases;
        p.transactions += 1;
        p.rows += rows.len();
        p.produce += produced - started;
        p.offsets += offsets_sent - produced;
        p.commit += offsets_sent.elapsed();
        p.report_if_due();
        Ok(())
    }
}

impl DruidSink {
    /// Commits the open transaction. A commit that timed out may have reached the coordinator: as
    /// librdkafka documents, such a (retriable) error is answered by committing again, which
    /// returns once the outcome is known, up to three times.
    fn commit_retrying(&mut self) -> Result<(), KafkaError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.producer.commit_transaction(self.timeout) {
                Ok(()) => return Ok(()),
                Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_retriable() && attempts < 3 => {
                    tracing::warn!(error = %e, attempts, "the Druid transaction's commit did not answer; committing again");
                }
                Err(e) => return Err(KafkaError::Transaction(format!("commit: {e}"))),
            }
        }
    }
}

/// The Druid sink commits offsets through the consumer group, so it reads from Kafka only.
fn kafka_reader(reader: &Reader) -> Result<&EventConsumer, KafkaError> {
    reader.kafka().ok_or_else(|| KafkaError::Config("the Druid sink needs [kafka] brokers, not the local log".into()))
}

impl Sink for DruidSink {
    fn attach(&mut self, reader: &Reader, _partitions: i32) -> anyhow::Result<()> {
        kafka_reader(reader)?.subscribe()?;
        Ok(())
    }

    fn commit(
        &mut self,
        rows: &[Row<'_>],
        offsets: &[(&str, i32, i64)],
        dead: &[DeadLetter<'_>],
        state: &[StateWrite<'_>],
        reader: &Reader,
    ) -> anyhow::Result<()> {
        if let Err(e) = self.transact(rows, offsets, dead, state, kafka_reader(reader)?) {
            // The commit may have taken effect unreported: the copy of the state is read again.
            self.changelog = None;
            if let Some(c) = &mut self.checkpoints {
                c.positions = None;
            }
            // Nothing of an aborted transaction is visible to read_committed readers.
            if let Err(abort) = self.producer.abort_transaction(self.timeout) {
                tracing::warn!(error = %abort, "aborting the Druid transaction failed");
            }
            return Err(e.into());
        }
        Ok(())
    }

    fn committed_state(
        &mut self,
        source: &str,
        link: u32,
    ) -> anyhow::Result<Option<(String, crate::sink::embedded::StateEntries)>> {
        if self.changelog.is_none() {
            let (kafka, brokers) = &self.kafka;
            self.changelog = Some(super::state::read(kafka, brokers, &self.state_topic)?);
        }
        Ok(self.changelog.as_ref().and_then(|c| c.plugin_state(source, link)))
    }

    fn name(&self) -> &'static str {
        "druid"
    }
}
