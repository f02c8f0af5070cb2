//! A stretch of a topic read again, apart from the live consumers: what a replay reads the events
//! topic with.
//!
//! Its consumer has a group id of its own and is assigned partitions by hand; it never commits and
//! never joins the live group, so the live role's offsets stay as they are. It reads committed data
//! only (`read_committed`), as the live role does, and stops at the end of each partition or at the
//! offsets it is given. An offset retention deleted under it is an error, never a silent jump.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use sluice_wire::{Delimited, push_delimited};

use super::{KafkaConfig, KafkaError};
use crate::handoff::Positions;

/// A reader of some partitions of one topic between given offsets.
pub struct RangeReader {
    consumer: BaseConsumer,
    topic: String,
    /// How long one metadata or offsets request may take.
    timeout: Duration,
    /// How long a read may go without a record or the end of a partition before it gives up.
    stall: Duration,
}

impl RangeReader {
    /// A reader of `topic` with a consumer group of its own (`sluice-replay-<pid>-<nanos>`).
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses a setting.
    pub fn new(config: &KafkaConfig, brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut c = config.client_config(brokers);
        // Set after the pass-through options, so none of them makes this reader commit or read
        // uncommitted records.
        c.set("group.id", format!("sluice-replay-{}-{nanos}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error");
        let consumer = c.create().map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(RangeReader {
            consumer,
            topic: topic.to_owned(),
            timeout: Duration::from_secs(10),
            stall: Duration::from_secs(30),
        })
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn error(&self, reason: impl std::fmt::Display) -> KafkaError {
        KafkaError::Read { topic: self.topic.clone(), reason: reason.to_string() }
    }

    /// The topic's partitions, from the cluster's metadata.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the metadata cannot be read or the topic does not exist.
    pub fn partitions(&self) -> Result<Vec<i32>, KafkaError> {
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), self.timeout).map_err(|e| self.error(e))?;
        let topic = metadata.topics().iter().find(|t| t.name() == self.topic);
        let mut partitions: Vec<i32> =
            topic.map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        if partitions.is_empty() {
            return Err(self.error("the topic does not exist"));
        }
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Each partition's first offset still held and next offset to be written (low and high
    /// watermarks).
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the broker does not answer.
    pub fn watermarks(&self) -> Result<BTreeMap<i32, (i64, i64)>, KafkaError> {
        let mut out = BTreeMap::new();
        for p in self.partitions()? {
            let marks = self
                .consumer
                .fetch_watermarks(&self.topic, p, self.timeout)
                .map_err(|e| self.error(format_args!("the range of partition {p}: {e}")))?;
            out.insert(p, marks);
        }
        Ok(out)
    }

    /// Each partition's first offset whose message time (when ingest produced it) is at or after
    /// `ms`, by the broker's offsets-for-times lookup; the partition's end where there is none.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the broker does not answer.
    pub fn offsets_for_time(&self, ms: i64) -> Result<Positions, KafkaError> {
        let marks = self.watermarks()?;
        let mut tpl = TopicPartitionList::new();
        for p in marks.keys() {
            // Negative times are Kafka's special values (-1 the end, -2 the start): 0 is the start.
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(ms.max(0))).map_err(|e| self.error(e))?;
        }
        let found = self.consumer.offsets_for_times(tpl, self.timeout).map_err(|e| self.error(e))?;
        let mut out = Positions::new();
        for e in found.elements() {
            if let Err(err) = e.error() {
                return Err(self.error(format_args!("offsets for time {ms} of partition {}: {err}", e.partition())));
            }
            let (low, high) = marks.get(&e.partition()).copied().unwrap_or_default();
            let offset = match e.offset() {
                Offset::Offset(o) => o.clamp(low, high),
                _ => high,
            };
            out.insert(e.partition(), offset);
        }
        Ok(out)
    }

    /// The payload of the first record at or after each of `at`'s offsets; a partition that ends
    /// there has none.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the records cannot be read.
    pub fn first_records(&self, at: &Positions) -> Result<BTreeMap<i32, Vec<u8>>, KafkaError> {
        self.first_at(at, |m| m.payload().unwrap_or_default().to_vec())
    }

    /// The message time (when it was produced, ms since the epoch) of the first record at or after
    /// each of `at`'s offsets; a partition that ends there, or whose record has no time, has none.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the records cannot be read.
    pub fn message_times(&self, at: &Positions) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let times = self.first_at(at, |m| m.timestamp().to_millis())?;
        Ok(times.into_iter().filter_map(|(p, t)| Some((p, t?))).collect())
    }

    /// What `take` makes of the first record at or after each of `at`'s offsets.
    fn first_at<T>(
        &self,
        at: &Positions,
        take: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
    ) -> Result<BTreeMap<i32, T>, KafkaError> {
        let mut out = BTreeMap::new();
        let mut active: BTreeSet<i32> = at.keys().copied().collect();
        self.assign(at, &active)?;
        let mut last = Instant::now();
        while !active.is_empty() {
            match self.consumer.poll(Duration::from_millis(100)) {
                None if last.elapsed() > self.stall => {
                    return Err(self.error(format_args!("no record of partitions {active:?} for {:?}", self.stall)));
                }
                None => {}
                Some(Err(RdError::PartitionEOF(p))) => {
                    active.remove(&p);
                    last = Instant::now();
                }
                Some(Err(e)) => self.check(&e)?,
                Some(Ok(m)) => {
                    if active.remove(&m.partition()) {
                        out.insert(m.partition(), take(&m));
                    }
                    last = Instant::now();
                }
            }
        }
        let _ = self.consumer.unassign();
        Ok(out)
    }

    /// Reads every partition `p` of `to` from `from[p]` up to `to[p]` (exclusive; a partition
    /// `from` lacks is not read), or to its end if that comes first, handing the records to `each`
    /// in batches of at most `batch` records, and moving `from` past each batch `each` took. Returns
    /// false when `stop` was set before the end (then `from` stands after the last batch taken).
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the records cannot be read (retention deleted them under the reader,
    /// or nothing arrives for 30 s), or `each`'s error.
    pub fn read<E: From<KafkaError>>(
        &self,
        from: &mut Positions,
        to: &Positions,
        batch: usize,
        stop: &AtomicBool,
        mut each: impl FnMut(&[&[u8]]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let start = from.clone();
        let mut records = Vec::new();
        let mut count = 0;
        // Where `from` moves once `each` has taken the records buffered.
        let mut pending = Positions::new();
        let mut flush = |records: &mut Vec<u8>, count: &mut usize, pending: &mut Positions| -> Result<(), E> {
            if *count > 0 {
                let views: Vec<&[u8]> = Delimited::new(records).filter_map(Result::ok).collect();
                each(&views)?;
            }
            from.append(pending);
            records.clear();
            *count = 0;
            Ok(())
        };
        let done = self.scan::<E>(&start, to, stop, |m| {
            push_delimited(&mut records, m.payload().unwrap_or_default());
            count += 1;
            pending.insert(m.partition(), m.offset() + 1);
            if count >= batch {
                flush(&mut records, &mut count, &mut pending)?;
            }
            Ok(())
        })?;
        if done {
            flush(&mut records, &mut count, &mut pending)?;
        }
        Ok(done)
    }

    /// Reads every partition from its first record held to its end as of the call, handing each
    /// record's key and payload (`None` for a tombstone) to `each` in each partition's order: what a
    /// compacted changelog is restored from.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the topic cannot be read (see [`read`](Self::read)).
    pub fn read_keyed(&self, mut each: impl FnMut(&[u8], Option<&[u8]>)) -> Result<(), KafkaError> {
        let marks = self.watermarks()?;
        let from: Positions = marks.iter().map(|(p, (low, _))| (*p, *low)).collect();
        let to: Positions = marks.iter().map(|(p, (_, high))| (*p, *high)).collect();
        self.scan::<KafkaError>(&from, &to, &AtomicBool::new(false), |m| {
            each(m.key().unwrap_or_default(), m.payload());
            Ok(())
        })?;
        Ok(())
    }

    /// Hands `each` every record (with its partition, offset, key and headers) of every partition
    /// `p` of `to` from `from[p]` up to `to[p]` (exclusive; a partition `from` lacks is not read),
    /// or to its end if that comes first.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the records cannot be read (see [`read`](Self::read)), or `each`'s.
    pub fn read_messages(
        &self,
        from: &Positions,
        to: &Positions,
        each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), KafkaError>,
    ) -> Result<(), KafkaError> {
        self.scan::<KafkaError>(from, to, &AtomicBool::new(false), each)?;
        Ok(())
    }

    /// Hands `each` every record of every partition `p` of `to` from `from[p]` up to `to[p]`
    /// (exclusive; a partition `from` lacks is not read), or to its end if that comes first. Returns
    /// false when `stop` was set before the end.
    fn scan<E: From<KafkaError>>(
        &self,
        from: &Positions,
        to: &Positions,
        stop: &AtomicBool,
        mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut active: BTreeSet<i32> =
            to.iter().filter(|(p, end)| from.get(p).is_some_and(|f| f < end)).map(|(p, _)| *p).collect();
        if active.is_empty() {
            return Ok(true);
        }
        self.assign(from, &active)?;
        let mut last = Instant::now();
        let done = loop {
            if active.is_empty() {
                break true;
            }
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                None if last.elapsed() > self.stall => {
                    let reason = format!("no record of partitions {active:?} for {:?}", self.stall);
                    return Err(self.error(reason).into());
                }
                None => {}
                // At the end: records the range may still name past it are written after it started.
                Some(Err(RdError::PartitionEOF(p))) => {
                    active.remove(&p);
                    last = Instant::now();
                }
                Some(Err(e)) => self.check(&e)?,
                Some(Ok(m)) => {
                    let (p, offset) = (m.partition(), m.offset());
                    if !active.contains(&p) {
                        continue;
                    }
                    last = Instant::now();
                    let end = to.get(&p).copied().unwrap_or(offset);
                    // Records past the end of a partition done are fetched on, and dropped.
                    if offset >= end {
                        active.remove(&p);
                        continue;
                    }
                    if offset + 1 >= end {
                        active.remove(&p);
                    }
                    each(&m)?;
                }
            }
        };
        let _ = self.consumer.unassign();
        Ok(done)
    }

    /// The trade-id marks the last `per_partition` records of each partition leave (see
    /// [`Marks::from_records`]): what the ingest role restores at start on Kafka. A record's
    /// (source, symbol) lives in one partition, so each symbol's ids are read in the order they
    /// were written; a symbol with no record in those tails starts afresh.
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the topic cannot be read.
    pub fn trade_marks(&self, per_partition: i64) -> Result<crate::handoff::Marks, KafkaError> {
        let mut from = Positions::new();
        let mut to = Positions::new();
        for (p, (low, high)) in self.watermarks()? {
            from.insert(p, (high - per_partition).max(low));
            to.insert(p, high);
        }
        let mut seen = Vec::new();
        self.read::<KafkaError>(&mut from, &to, 4096, &AtomicBool::new(false), |records| {
            for r in records {
                if let Ok(v) = plugin_sdk::StreamDataView::parse(r) {
                    seen.push((v.source_id, v.symbol_id, v.trade_id));
                }
            }
            Ok(())
        })?;
        Ok(crate::handoff::Marks::from_records(seen))
    }

    /// Assigns `partitions`, each at its offset in `at`.
    fn assign(&self, at: &Positions, partitions: &BTreeSet<i32>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let offset = at.get(p).copied().unwrap_or(0);
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(offset)).map_err(|e| self.error(e))?;
        }
        // Partitions done are never paused: a partition paused, unassigned and assigned again at an
        // offset was reported by librdkafka as having no offset (`AutoOffsetReset`).
        self.consumer.assign(&tpl).map_err(|e| self.error(e))
    }

    /// A consumer error: an offset out of range (retention deleted records under the reader) stops
    /// the read; anything else is logged, and librdkafka retries it.
    fn check(&self, e: &RdError) -> Result<(), KafkaError> {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => Err(self.error(
                format_args!("{e}: the topic's retention deleted records while they were read; replay a later range"),
            )),
            _ => {
                tracing::warn!(topic = %self.topic, error = %e, "consumer error while replaying; retrying");
                Ok(())
            }
        }
    }
}
