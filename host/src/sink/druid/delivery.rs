//! Rows to the Druid topic, exactly once: each batch of rows is produced in one Kafka transaction
//! together with the consumer offsets it covers (`send_offsets_to_transaction`), so a Druid supervisor
//! reading with `isolation.level=read_committed` sees every row once.
//!
//! As Kafka documents transactional consume-transform-produce:
//! - Transactional ids per process instance (`sluice-druid-<group>-<instance>`, then `…-<instance>#1`
//!   and on for the further producers, see [`nth_transactional_id`]), stable across restarts:
//!   `init_transactions` at start fences the previous incarnation of the instance and aborts
//!   whatever transaction it left open (say, after a `kill -9`).
//! - The offsets go with the consumer group's metadata, so the group coordinator refuses a commit
//!   from an instance that lost its partitions in a rebalance (zombie fencing across instances).
//! - Any error aborts the transaction; the caller then reads again from the last committed offsets.
//!
//! The chains' plugin state changes go to the changelog topic in the same transaction (see
//! [`super::state`]), and so do the checkpoints of their whole state (see [`super::checkpoint`]).
//!
//! **Transactions in flight.** A producer has one transaction open at a time, so the sink keeps
//! `[sink.druid] transactions_in_flight` producers and takes them in turn: the next batch is
//! produced, with its offsets sent, while the previous one commits. The commits themselves run in
//! order on one committer thread, each only after the one before it committed: so the committed
//! transactions are always a prefix of those handed over, and every committed offset covers only
//! committed rows, whichever partitions the transactions share. A commit that fails aborts the
//! transactions after it unsent (their offsets would skip its rows). A transaction that writes state
//! (a changelog or progress entry, a checkpoint) first waits for every earlier one to commit, so a
//! key's changelog records stand in the order they were made and the copy of the committed state
//! ([`Sink::committed_state`]) is read with no transaction of the sink open.
//!
//! What that means at each disturbance:
//! - **kill -9**: the transactions in flight are open or commit-requested. A restart initialises
//!   every transactional id the instance may have used (up to [`MAX_TRANSACTIONS_IN_FLIGHT`]),
//!   which aborts the open ones and waits for the commit-requested ones to finish; as commits are
//!   only requested in order, what survives is a prefix, and reading resumes from its offsets.
//! - **A failed commit or a restart of the role**: the sink is dropped after its queued commits
//!   settled; the role reads again from the committed offsets and the chains start from the
//!   committed state (the committed prefix's), never from memory.
//! - **A trap** is the chain's business (retried, bisected, dead-lettered within the batch): the
//!   batch reaches the sink whole, as before.
//! - **A swap** happens between batches; the state a new version takes over is the chain's in
//!   memory, which the transactions carry in order.
//! - **A replay** writes to a topic of its own through [`DruidSink::commit_rows`], one transaction
//!   at a time on the first producer, with no offsets.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{DruidSinkConfig, encode_row};
use crate::handoff::Reader;
use crate::handoff::kafka::consumer::EventConsumer;
use crate::handoff::kafka::{KafkaConfig, KafkaError, send_waiting};
use crate::proto::StreamData;
use crate::sink::{DeadLetter, Row, Sink, StateWrite};

/// The most transactions a sink keeps in flight, and so the transactional ids a start fences.
pub const MAX_TRANSACTIONS_IN_FLIGHT: usize = 4;

/// A transactional producer, shared with the committer thread.
type TxProducer = Arc<ThreadedProducer<DefaultProducerContext>>;

/// The transactional writer of the Druid topic.
pub struct DruidSink {
    /// The producers taken in turn, one open transaction each at most.
    producers: Vec<TxProducer>,
    /// The producer of the next transaction.
    next: usize,
    /// Commits the handed-over transactions in order.
    committer: Committer,
    /// Transactions begun while an earlier one was still committing, when the role counts them.
    overlapped: Option<prometheus::IntCounter>,
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
    positions: Option<crate::handoff::Positions>,
    /// Checkpoints taken by this sink, for their ids.
    taken: u64,
}

/// Time spent in each phase of the transactions since the last report (logged every 10 s): handing
/// rows to the client, the offsets round trip to the group coordinator, and the commit (which waits
/// for the brokers to acknowledge every row and write the commit markers; on the committer thread,
/// from the request to the answer, so it includes waiting for the commit before it).
#[derive(Debug)]
struct Phases {
    since: std::time::Instant,
    transactions: u32,
    /// Transactions begun while an earlier one was committing.
    overlapped: u32,
    /// Commits that finished.
    commits: u32,
    rows: usize,
    produce: Duration,
    offsets: Duration,
    commit: Duration,
    /// Of `commit`: waiting for the commits before, the rows' acknowledgements, the request.
    commit_parts: [Duration; 3],
}

impl Phases {
    fn new() -> Self {
        Phases {
            since: std::time::Instant::now(),
            transactions: 0,
            overlapped: 0,
            commits: 0,
            rows: 0,
            produce: Duration::ZERO,
            offsets: Duration::ZERO,
            commit: Duration::ZERO,
            commit_parts: [Duration::ZERO; 3],
        }
    }

    fn report_if_due(&mut self) {
        if self.since.elapsed() < Duration::from_secs(10) || self.transactions == 0 {
            return;
        }
        let avg = |d: Duration, n: u32| (d / n.max(1)).as_secs_f64() * 1000.0;
        tracing::info!(
            transactions = self.transactions,
            overlapped = self.overlapped,
            rows = self.rows,
            produce_ms = format!("{:.1}", avg(self.produce, self.transactions)),
            send_offsets_ms = format!("{:.1}", avg(self.offsets, self.transactions)),
            commit_ms = format!("{:.1}", avg(self.commit, self.commits)),
            commit_queued_ms = format!("{:.1}", avg(self.commit_parts[0], self.commits)),
            commit_acks_ms = format!("{:.1}", avg(self.commit_parts[1], self.commits)),
            commit_request_ms = format!("{:.1}", avg(self.commit_parts[2], self.commits)),
            "Druid transactions (average per transaction)"
        );
        *self = Phases::new();
    }
}

/// The transactional id of process instance `instance` in `group` (its first producer's).
pub fn transactional_id(group: &str, instance: &str) -> String {
    format!("sluice-druid-{group}-{instance}")
}

/// The transactional id of producer `i` of the instance whose first producer's id is `first`:
/// `first` itself, then `first#1`, `first#2`, ... (an instance name holds no `#`, so no other
/// instance's id is one of these).
pub fn nth_transactional_id(first: &str, i: usize) -> String {
    if i == 0 { first.to_owned() } else { format!("{first}#{i}") }
}

/// A transactional producer for `transactional_id`, initialised: fencing any earlier producer with
/// the same id, and settling the transaction it left (aborted when open, finished when its commit
/// was requested).
fn transactional_producer(
    kafka: &KafkaConfig,
    brokers: &str,
    transactional_id: &str,
    timeout: Duration,
) -> Result<TxProducer, KafkaError> {
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
    Ok(Arc::new(producer))
}

/// Fences every transactional id of the instance whose first id is `transactional_id` beyond its
/// first `in_use` (which its sink initialises itself): a previous incarnation may have run with
/// more producers, and a transaction of theirs left open would hold back `read_committed` readers,
/// and one whose commit was requested must finish before the committed offsets are read.
///
/// # Errors
/// [`KafkaError`] when a producer cannot be initialised.
pub fn fence_unused(
    kafka: &KafkaConfig,
    brokers: &str,
    first_id: &str,
    in_use: usize,
    timeout: Duration,
) -> Result<(), KafkaError> {
    for i in in_use.max(1)..MAX_TRANSACTIONS_IN_FLIGHT {
        drop(transactional_producer(kafka, brokers, &nth_transactional_id(first_id, i), timeout)?);
    }
    Ok(())
}

/// What the committer thread is asked: commit this producer's open transaction.
struct Job {
    producer: TxProducer,
    /// When the transaction was handed over.
    handed_at: std::time::Instant,
}

/// What it answers, in the order of the jobs.
struct Done {
    result: Result<(), String>,
    /// From the hand-over to the answer.
    took: Duration,
    /// Of that: waiting for the commits before it, the rows' acknowledgements, and the commit
    /// request itself (`EndTxn` and its markers).
    parts: [Duration; 3],
}

/// The committer thread and the transactions handed to it and not yet settled.
struct Committer {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The producer of each handed-over transaction not settled yet, oldest first.
    queue: VecDeque<usize>,
    /// Why a handed-over commit failed (it and those after it are not committed).
    failed: Option<String>,
}

impl Committer {
    fn start(timeout: Duration) -> Result<Self, KafkaError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sluice-druid-commit".into())
            .spawn(move || {
                let mut failed = false;
                for job in rx {
                    let begun = std::time::Instant::now();
                    let mut acked = begun;
                    let result = if failed {
                        Err("an earlier transaction failed to commit".to_owned())
                    } else {
                        // The rows' acknowledgements apart from the commit request, for the phase
                        // report (a flush that fails leaves the commit to report why).
                        let _ = job.producer.flush(timeout);
                        acked = std::time::Instant::now();
                        commit_retrying(&job.producer, timeout).map_err(|e| e.to_string())
                    };
                    let parts = [begun - job.handed_at, acked - begun, acked.elapsed()];
                    if result.is_err() {
                        failed = true;
                        if let Err(abort) = job.producer.abort_transaction(timeout) {
                            tracing::warn!(error = %abort, "aborting the Druid transaction failed");
                        }
                    }
                    if tx.send(Done { result, took: job.handed_at.elapsed(), parts }).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| KafkaError::Transaction(format!("starting the committer thread: {e}")))?;
        Ok(Committer { jobs: Some(jobs), done, thread: Some(thread), queue: VecDeque::new(), failed: None })
    }

    fn hand_over(&mut self, index: usize, producer: &TxProducer) -> Result<(), KafkaError> {
        let job = Job { producer: producer.clone(), handed_at: std::time::Instant::now() };
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(KafkaError::Transaction("the committer thread is gone".into()));
        }
        self.queue.push_back(index);
        Ok(())
    }

    /// Settles answered commits, waiting until at most `keep` are in flight; returns how many are.
    /// A failure is reported once every commit before it was: as the count still including it
    /// when this call settled others, as the error at the next call.
    fn settle(&mut self, keep: usize, phases: &mut Phases) -> Result<usize, KafkaError> {
        let mut settled = 0;
        while self.failed.is_none() && !self.queue.is_empty() {
            let done = if self.queue.len() > keep {
                self.done.recv().map_err(|_| "the committer thread is gone".to_owned())
            } else {
                match self.done.try_recv() {
                    Ok(done) => Ok(done),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => Err("the committer thread is gone".to_owned()),
                }
            };
            match done.and_then(|d| d.result.map(|()| (d.took, d.parts))) {
                Ok((took, parts)) => {
                    self.queue.pop_front();
                    settled += 1;
                    phases.commits += 1;
                    phases.commit += took;
                    for (sum, part) in phases.commit_parts.iter_mut().zip(parts) {
                        *sum += part;
                    }
                }
                Err(e) => self.failed = Some(e),
            }
        }
        match &self.failed {
            Some(e) if settled == 0 => Err(KafkaError::Transaction(format!("commit: {e}"))),
            _ => Ok(self.queue.len()),
        }
    }
}

impl Drop for Committer {
    /// Lets the handed-over commits finish (in order, as ever) before the producers go.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the Druid committer thread panicked");
        }
    }
}

/// Commits `producer`'s open transaction. A commit that timed out may have reached the coordinator:
/// as librdkafka documents, such a (retriable) error is answered by committing again, which returns
/// once the outcome is known, up to three times.
fn commit_retrying(producer: &TxProducer, timeout: Duration) -> Result<(), KafkaError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match producer.commit_transaction(timeout) {
            Ok(()) => return Ok(()),
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_retriable() && attempts < 3 => {
                tracing::warn!(error = %e, attempts, "the Druid transaction's commit did not answer; committing again");
            }
            Err(e) => return Err(KafkaError::Transaction(format!("commit: {e}"))),
        }
    }
}

impl DruidSink {
    /// `druid.transactions_in_flight` transactional producers for `druid.topic`, initialised (fencing
    /// any earlier producer with the same transactional ids: `transactional_id`, then `#1`, `#2`, ...).
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
        let count = (druid.transactions_in_flight as usize).clamp(1, MAX_TRANSACTIONS_IN_FLIGHT);
        let producers = (0..count)
            .map(|i| transactional_producer(kafka, brokers, &nth_transactional_id(transactional_id, i), timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DruidSink {
            producers,
            next: 0,
            committer: Committer::start(timeout)?,
            overlapped: None,
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

    /// Counts in `counter` the transactions begun while an earlier one was still committing.
    pub fn with_overlap_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.overlapped = Some(counter);
        self
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
        let (producer, topic) = (&self.producers[self.next], &c.topic);
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
            let headers = crate::handoff::kafka::dead_letter_headers(d);
            let record =
                BaseRecord::<str, [u8]>::to(&self.dlq_topic).key(d.source).payload(d.kept_bytes()).headers(headers);
            send_waiting(&self.producers[self.next], record, Duration::from_millis(1), || {})
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
                send_waiting(&self.producers[self.next], record, Duration::from_millis(1), || {})
                    .map_err(|e| KafkaError::Transaction(format!("produce to {}: {e}", self.state_topic)))?;
            }
        }
        Ok(())
    }

    fn produce_all(&mut self, rows: &[Row]) -> Result<(), KafkaError> {
        for row in rows {
            let record = StreamData {
                timestamp_ms: row.timestamp_ms,
                price_e8: row.price_e8,
                volume_e8: row.volume_e8,
                is_buy: row.is_buy,
                ..StreamData::default()
            };
            self.buf.clear();
            encode_row(&record, &row.source, &row.symbol, &mut self.buf);
            // Keyed by symbol: one symbol's rows stay in one partition, which keeps Druid's rollup tight.
            let record = BaseRecord::<str, [u8]>::to(&self.topic).key(&*row.symbol).payload(&self.buf);
            send_waiting(&self.producers[self.next], record, Duration::from_millis(1), || {})
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
    pub fn commit_rows(&mut self, rows: &[Row]) -> Result<(), KafkaError> {
        let tx = |what: &str, e: rdkafka::error::KafkaError| KafkaError::Transaction(format!("{what}: {e}"));
        self.committer.settle(0, &mut self.phases)?;
        let producer = self.producers[self.next].clone();
        let result = producer.begin_transaction().map_err(|e| tx("begin", e)).and_then(|()| {
            self.produce_all(rows)?;
            producer.commit_transaction(self.timeout).map_err(|e| tx("commit", e))
        });
        if result.is_err()
            && let Err(abort) = producer.abort_transaction(self.timeout)
        {
            tracing::warn!(error = %abort, "aborting the Druid transaction failed");
        }
        result
    }

    /// Builds a transaction on the next producer (once its previous transaction settled) and hands
    /// it to the committer: rows, dead letters, then (after every earlier transaction committed)
    /// state and checkpoint, then the offsets.
    fn transact(
        &mut self,
        rows: &[Row],
        offsets: &[(&str, i32, i64)],
        dead: &[DeadLetter<'_>],
        state: &[StateWrite<'_>],
        consumer: &EventConsumer,
    ) -> Result<(), KafkaError> {
        let tx = |what: &str, e: rdkafka::error::KafkaError| KafkaError::Transaction(format!("{what}: {e}"));
        let started = std::time::Instant::now();
        // Round robin: with every producer busy, the oldest transaction is this producer's.
        self.committer.settle(self.producers.len() - 1, &mut self.phases)?;
        if !self.committer.queue.is_empty() {
            self.phases.overlapped += 1;
            if let Some(c) = &self.overlapped {
                c.inc();
            }
        }
        let producer = self.producers[self.next].clone();
        producer.begin_transaction().map_err(|e| tx("begin", e))?;
        self.produce_all(rows)?;
        self.dead_letter_all(dead)?;
        let due = self.checkpoint_due(offsets, state);
        if !state.is_empty() || due {
            // Changelog records in the order they were made; the copy read back with no
            // transaction of this sink open.
            self.committer.settle(0, &mut self.phases)?;
        }
        self.follow(offsets, state, consumer, due)?;
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
        producer.send_offsets_to_transaction(&tpl, &group, self.timeout).map_err(|e| tx("send offsets", e))?;
        let offsets_sent = std::time::Instant::now();
        self.committer.hand_over(self.next, &producer)?;
        self.next = (self.next + 1) % self.producers.len();
        if let (true, Some(c)) = (due, &mut self.checkpoints) {
            c.last = Some(std::time::Instant::now());
        }
        let p = &mut self.phases;
        p.transactions += 1;
        p.rows += rows.len();
        p.produce += produced - started;
        p.offsets += offsets_sent - produced;
        p.report_if_due();
        Ok(())
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
        rows: &[Row],
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
            // Nothing of an aborted transaction is visible to read_committed readers. (A failure
            // reported by the committer left no transaction open on this producer: the abort then
            // has nothing to do.)
            if let Err(abort) = self.producers[self.next].abort_transaction(self.timeout) {
                tracing::debug!(error = %abort, "aborting the Druid transaction failed");
            }
            return Err(e.into());
        }
        Ok(())
    }

    fn settle(&mut self, keep: usize) -> anyhow::Result<usize> {
        let in_flight = self.committer.settle(keep, &mut self.phases).inspect_err(|_| {
            self.changelog = None;
            if let Some(c) = &mut self.checkpoints {
                c.positions = None;
            }
        })?;
        Ok(in_flight)
    }

    fn max_in_flight(&self) -> usize {
        self.producers.len()
    }

    fn committed_state(
        &mut self,
        source: &str,
        link: u32,
    ) -> anyhow::Result<Option<(String, crate::sink::embedded::StateEntries)>> {
        if self.changelog.is_none() {
            // Read with no transaction of this sink in flight (its state is that of its commits).
            self.committer.settle(0, &mut self.phases)?;
            let (kafka, brokers) = &self.kafka;
            self.changelog = Some(super::state::read(kafka, brokers, &self.state_topic)?);
        }
        Ok(self.changelog.as_ref().and_then(|c| c.plugin_state(source, link)))
    }

    fn name(&self) -> &'static str {
        "druid"
    }
}
