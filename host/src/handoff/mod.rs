//! The hand-off between the ingest and process roles: Kafka when `[kafka] brokers` is set, the
//! [`local`] log in the data directory otherwise.
//!
//! [`Writer`] is what ingest appends with (records and dead letters); [`Reader`] is what the process
//! role reads with. Both count and report in the same terms whichever is behind them: a record is
//! *sent* when handed over and *delivered* when Kafka acknowledged it or its local batch committed.

pub mod dead_letters;
pub mod error;
pub mod kafka;
pub mod local;
pub mod marks;
mod open;
pub mod stage;

pub use error::LogError;
pub use marks::Marks;
pub use open::{Handoff, HandoffSettings, Probe, StoreOffsets, open};
pub use stage::{DeadLetter, Stage};

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The next offset to read of each partition of one topic (the local log is partition 0 of
/// [`local::POSITION_TOPIC`]), by partition.
pub type Positions = std::collections::BTreeMap<i32, i64>;

use crate::handoff::kafka::consumer::EventConsumer;
use crate::handoff::kafka::producer::EventProducer;

/// `[local_log]`: the local log's durability and retention (used when no Kafka brokers are
/// configured).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalLogConfig {
    /// Batches older than this are deleted once the store has committed past them.
    #[serde(default = "defaults::retention_ms")]
    pub retention_ms: u64,
    /// Committed batches beyond this many bytes are deleted, oldest first.
    #[serde(default = "defaults::retention_bytes")]
    pub retention_bytes: u64,
    /// The hard cap on the whole file: batches, dead letters and symbols together. Past it the
    /// oldest batches go even when the store has not read them (counted in
    /// `sluice_log_dropped_records_total` and logged at ERROR).
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: u64,
    /// Dead letters older than this are deleted: the log's (decode) and the store's (transform).
    #[serde(default = "defaults::dead_letter_retention_ms")]
    pub dead_letter_retention_ms: u64,
    /// The most bytes of dead letters kept, oldest deleted first: in the log, and in the store.
    #[serde(default = "defaults::dead_letter_max_bytes")]
    pub dead_letter_max_bytes: u64,
    /// Disk space the log holds back in a file beside it (`log.sqlite-reserve`) for a full disk:
    /// given up when a commit finds the disk full, so retention has room to delete the batches the
    /// store has read (SQLite writes to delete) and the log can commit again; taken back once the
    /// disk has twice this free. 0: no reserve.
    #[serde(default = "defaults::reserve_bytes")]
    pub reserve_bytes: u64,
    /// SQLite's `synchronous` for the log: `full` (the default) syncs every commit, so a record
    /// counted delivered survives a power cut; `normal` survives a crash of the process only.
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Set for one start by `sluice run --resume-past-lost-log-tail`: a store ahead of its log is
    /// taken to mean the log lost its last commits, and appending goes on from the store's position.
    #[serde(skip)]
    pub resume_past_lost_tail: bool,
}

/// SQLite's `synchronous` setting.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Committed batches survive a crash of the process (`kill -9`); a power cut can lose the
    /// last commits (see `sluice run --resume-past-lost-log-tail`).
    Normal,
    /// Committed batches survive a power cut too (the default: measured at under a tenth more CPU
    /// and no added latency at 100,000 and 200,000 trades/s, BENCHMARKS.md).
    #[default]
    Full,
}

impl Synchronous {
    fn as_str(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl Default for LocalLogConfig {
    fn default() -> Self {
        LocalLogConfig {
            retention_ms: defaults::retention_ms(),
            retention_bytes: defaults::retention_bytes(),
            max_bytes: defaults::max_bytes(),
            dead_letter_retention_ms: defaults::dead_letter_retention_ms(),
            dead_letter_max_bytes: defaults::dead_letter_max_bytes(),
            reserve_bytes: defaults::reserve_bytes(),
            synchronous: Synchronous::default(),
            resume_past_lost_tail: false,
        }
    }
}

impl LocalLogConfig {
    /// Checks what types cannot.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 {
            return Err(
                "local_log.max_bytes must be positive: a log capped at 0 bytes would delete every record unread".into(),
            );
        }
        if self.max_bytes < self.retention_bytes.saturating_add(self.dead_letter_max_bytes) {
            return Err(format!(
                "local_log.max_bytes ({}) must be at least local_log.retention_bytes ({}) and local_log.dead_letter_max_bytes ({}) together",
                self.max_bytes, self.retention_bytes, self.dead_letter_max_bytes
            ));
        }
        Ok(())
    }
}

mod defaults {
    pub fn retention_ms() -> u64 {
        24 * 3600 * 1000
    }
    pub fn retention_bytes() -> u64 {
        1 << 30
    }
    pub fn max_bytes() -> u64 {
        4 << 30
    }
    pub fn dead_letter_retention_ms() -> u64 {
        7 * 24 * 3600 * 1000
    }
    pub fn dead_letter_max_bytes() -> u64 {
        256 << 20
    }
    pub fn reserve_bytes() -> u64 {
        16 << 20
    }
}

/// One partition of the hand-off, as `GET /v1/log` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    /// The partition (0 for the local log).
    pub partition: i32,
    /// The first offset the log holds.
    pub start: i64,
    /// The next offset to be written.
    pub end: i64,
    /// The sink's committed position (the next offset it reads).
    pub committed: i64,
    /// `end - committed`.
    pub lag: i64,
}

/// The whole hand-off, as `GET /v1/log` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogStatus {
    /// `local` or `kafka`.
    pub mode: &'static str,
    /// Every partition.
    pub partitions: Vec<PartitionStatus>,
    /// The local log's size against its cap, and whether it refuses (absent on Kafka).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSizes>,
    /// The embedded store's dead letters (absent without a store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_dead_letters: Option<dead_letters::TableSize>,
}

/// What the local log holds, against `[local_log] max_bytes`, which bounds the three together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalSizes {
    /// Bytes of records.
    pub records_bytes: u64,
    /// The decode dead letters it keeps.
    pub dead_letters: dead_letters::TableSize,
    /// The symbol dictionary (bytes of the names).
    pub symbols: dead_letters::TableSize,
    /// `[local_log] max_bytes`.
    pub max_bytes: u64,
    /// Why it refuses new records (`disk_full`, `write_error`), while it does.
    pub refusing: Option<&'static str>,
}

/// What one pass of a decode worker hands over: records, the dead letters of the same frames, and
/// the marks (trade ids, file positions) they move.
#[derive(Debug, Default)]
pub struct Handover<'a> {
    /// Length-delimited `StreamData` records.
    pub records: &'a [u8],
    /// Frames refused.
    pub dead: &'a [DeadLetter<'a>],
    /// What the records and dead letters move: committed with them.
    pub marks: Marks,
}

/// Delivery counters of a [`Writer`]: from Kafka's delivery reports, or the local log's commits.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Records handed over.
    pub sent: AtomicU64,
    /// Records delivered: acknowledged by the broker, or committed to the local log.
    pub delivered: AtomicU64,
    /// Records that finally failed (after Kafka's retries, or a refused local commit).
    pub failed: AtomicU64,
    /// Dead-lettered frames handed over.
    pub dead_lettered: AtomicU64,
    /// Of those, records refused by a transform (the rest were refused in decode).
    pub dead_lettered_transform: AtomicU64,
    /// Times a send waited because the producer's queue was full.
    pub queue_full_waits: AtomicU64,
}

impl ProducerStats {
    /// The counters for a scrape.
    pub fn sample(&self) -> crate::telemetry::ProducerSample {
        use std::sync::atomic::Ordering::Relaxed;
        crate::telemetry::ProducerSample {
            sent: self.sent.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            failed: self.failed.load(Relaxed),
            queue_full_waits: self.queue_full_waits.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            dead_lettered_transform: self.dead_lettered_transform.load(Relaxed),
        }
    }
}

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

/// What one [`Reader::poll_into`] saw besides records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    /// Consumer errors (logged).
    pub errors: usize,
    /// The group's assignment changed during the poll. The records polled before the change were
    /// dropped from the batch; rows the caller holds for the old assignment must be dropped too
    /// (their offsets were not committed, so their partitions' new owner reads them again).
    pub rebalanced: bool,
}

/// Where ingest appends.
pub enum Writer {
    /// The Kafka producer.
    Kafka(EventProducer),
    /// The local log's appender.
    Local(local::LocalWriter),
}

impl Writer {
    /// The delivery counters.
    pub fn stats(&self) -> &std::sync::Arc<ProducerStats> {
        match self {
            Writer::Kafka(p) => p.stats(),
            Writer::Local(w) => w.stats(),
        }
    }

    /// Appends length-delimited records; returns how many were handed over.
    pub fn send_records(&self, records: &[u8]) -> usize {
        match self {
            Writer::Kafka(p) => p.send_records(records),
            Writer::Local(w) => w.send_records(records),
        }
    }

    /// Hands over one pass of a decode worker. On the local log its records, dead letters and marks
    /// commit in one transaction, so the marks always say what the log holds. On Kafka a file
    /// source's share commits in a transaction of its own with its position (see
    /// [`kafka::files`]); the rest goes as it would one by one (trade ids are read back from the
    /// events topic at start). Returns how many records were handed over.
    pub fn send_handover(&self, handover: Handover<'_>) -> usize {
        match self {
            Writer::Kafka(p) => p.send_handover(handover),
            Writer::Local(w) => w.send_handover(handover),
        }
    }

    /// Dead-letters refused input.
    pub fn send_dead_letter(&self, letter: &DeadLetter<'_>) {
        match self {
            Writer::Kafka(p) => p.send_dead_letter(letter),
            Writer::Local(w) => w.send_dead_letter(letter),
        }
    }

    /// Waits until everything handed over is delivered.
    ///
    /// # Errors
    /// When that has not happened within `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), LogError> {
        match self {
            Writer::Kafka(p) => Ok(p.flush(timeout)?),
            Writer::Local(w) => w.flush(timeout),
        }
    }

    /// Commits what is queued and stops the writing threads: the local log's appender, or the
    /// file sources' appenders on Kafka.
    pub fn close(&self) {
        match self {
            Writer::Local(w) => w.close(),
            Writer::Kafka(p) => p.close(),
        }
    }
}

/// Where the process role reads.
pub enum Reader {
    /// A Kafka consumer of the events topic.
    Kafka(EventConsumer),
    /// The local log.
    Local(local::LocalReader, local::LocalLog),
}

impl Reader {
    /// The name positions are stored under: the events topic, or [`local::POSITION_TOPIC`].
    pub fn topic(&self) -> &str {
        match self {
            Reader::Kafka(c) => c.topic(),
            Reader::Local(..) => local::POSITION_TOPIC,
        }
    }

    /// Reads up to about `max` records into `out`, waiting at most `timeout` for the first.
    ///
    /// # Errors
    /// When the local log cannot be read, or a Kafka partition no longer holds the records to read
    /// next (other Kafka errors are logged and counted in the outcome).
    pub fn poll_into(&self, out: &mut Polled, max: usize, timeout: Duration) -> Result<PollOutcome, LogError> {
        match self {
            Reader::Kafka(c) => c.poll_into(out, max, timeout),
            Reader::Local(r, _) => r.poll_into(out, max, timeout),
        }
    }

    /// Records not read yet.
    pub fn lag(&self) -> i64 {
        match self {
            Reader::Kafka(c) => c.lag(),
            Reader::Local(r, _) => r.lag(),
        }
    }

    /// Positions the reader at a store's committed offsets (`(topic, partition, next)`), reading all
    /// of `partitions` for Kafka.
    ///
    /// # Errors
    /// A position past the end of the log ([`LogError::StoreAhead`], [`LogError::OffsetAhead`]), or
    /// an assignment the consumer refuses.
    pub fn assign(&self, partitions: i32, stored: &[(String, i32, i64)]) -> Result<(), LogError> {
        match self {
            Reader::Kafka(c) => c.assign_checked(partitions, stored),
            Reader::Local(r, log) => {
                let next = stored.iter().find(|(t, p, _)| t == local::POSITION_TOPIC && *p == 0).map(|s| s.2);
                r.seek(next, log.path())
            }
        }
    }

    /// Called after the sink committed `offsets`, so the local log's retention may delete below them.
    pub fn committed(&self, offsets: &[(&str, i32, i64)]) {
        if let Reader::Local(r, _) = self {
            for (_, _, next) in offsets {
                r.committed(*next);
            }
        }
    }

    /// The Kafka consumer, for sinks that commit through its group (Druid).
    pub fn kafka(&self) -> Option<&EventConsumer> {
        match self {
            Reader::Kafka(c) => Some(c),
            Reader::Local(..) => None,
        }
    }
}
