//! The ingest producer: decoded records to `sluice.events`, refused frames to the dead-letter topic.
//!
//! Idempotent with `acks=all`; each record's key is its source and symbol ids, so one symbol's
//! records land in one partition in order. librdkafka retries failed deliveries itself; what finally
//! fails is counted and logged, never dropped silently.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sluice_wire::{Delimited, StreamDataView};

use super::files::{FileAppenders, Piece};
use super::record_key;
use super::{KafkaConfig, KafkaError, dead_letter_headers};
use crate::handoff::Handover;
use crate::handoff::ProducerStats;
use crate::handoff::stage::{DeadLetter, Stage};

/// Routes delivery reports to [`ProducerStats`].
pub struct DeliveryCounter {
    stats: Arc<ProducerStats>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "a record could not be delivered to Kafka");
            }
        }
    }
}

/// Writes records and dead letters.
pub struct EventProducer {
    inner: ThreadedProducer<DeliveryCounter>,
    events_topic: String,
    dlq_topic: String,
    stats: Arc<ProducerStats>,
    /// The file sources' transactional appenders, once attached (see [`super::files`]).
    files: std::sync::OnceLock<FileAppenders>,
}

impl EventProducer {
    /// A producer for `brokers` with the delivery settings of `config` (idempotent, `acks=all`).
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka rejects a setting (the message names it).
    pub fn new(config: &KafkaConfig, brokers: &str) -> Result<Self, KafkaError> {
        let stats = Arc::new(ProducerStats::default());
        let (linger, batch) = (config.linger_ms.to_string(), config.batch_bytes.to_string());
        // Pass-through options win over these defaults, not over the safety settings set after them.
        let mut c = config.client_config_with(
            brokers,
            &[("compression.type", &config.compression), ("linger.ms", &linger), ("batch.size", &batch)],
        );
        c.set("acks", "all").set("enable.idempotence", "true");
        let inner = c
            .create_with_context(DeliveryCounter { stats: stats.clone() })
            .map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(EventProducer {
            inner,
            events_topic: config.events_topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            stats,
            files: std::sync::OnceLock::new(),
        })
    }

    /// The delivery counters.
    pub fn stats(&self) -> &Arc<ProducerStats> {
        &self.stats
    }

    /// Asks the cluster for its metadata: the number of brokers when it answers within `timeout`.
    ///
    /// # Errors
    /// librdkafka's reason when the cluster cannot be reached.
    pub fn reachable(&self, timeout: std::time::Duration) -> Result<usize, String> {
        use rdkafka::producer::Producer;
        self.inner.client().fetch_metadata(None, timeout).map(|m| m.brokers().len()).map_err(|e| e.to_string())
    }

    /// Sends length-delimited records, each keyed by source and symbol. Waits (briefly, repeatedly)
    /// while librdkafka's queue is full rather than dropping. Returns how many were sent.
    pub fn send_records(&self, records: &[u8]) -> usize {
        let mut n = 0;
        for item in Delimited::new(records) {
            // Records come from the decode stage, which wrote them.
            let Ok(bytes) = item else { break };
            let Ok(view) = StreamDataView::parse(bytes) else { continue };
            let key = record_key(view.source_id, view.symbol_id);
            self.send(BaseRecord::to(&self.events_topic).key(&key[..]).payload(bytes));
            n += 1;
        }
        self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Dead-letters refused input of `stage` (`decode` or `transform`) with its source, plugin,
    /// stage, reason and original length as headers, its payload cut to
    /// [`DEAD_LETTER_MAX_BYTES`](crate::handoff::stage::DEAD_LETTER_MAX_BYTES).
    pub fn send_dead_letter(&self, d: &DeadLetter<'_>) {
        let key = d.source_id.to_be_bytes();
        let record =
            BaseRecord::to(&self.dlq_topic).key(&key[..]).payload(d.kept_bytes()).headers(dead_letter_headers(d));
        self.send(record);
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        if d.stage == Stage::Transform {
            self.stats.dead_lettered_transform.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// From now on the records, dead letters and positions of the file sources `files` has go
    /// through their transactional appenders. Set once, before the sources start; a second call
    /// is refused.
    ///
    /// # Errors
    /// The appenders given back when some were attached already.
    pub fn attach_files(&self, files: FileAppenders) -> Result<(), FileAppenders> {
        self.files.set(files)
    }

    /// Hands over one pass of a decode worker: a file source's records, dead letters and position
    /// to its appender, in one transaction; the rest as they would go one by one (Kafka keeps no
    /// trade-id marks: they are read back from the events topic at start). Returns how many
    /// records were handed over.
    pub fn send_handover(&self, handover: Handover<'_>) -> usize {
        let Handover { records, dead, marks } = handover;
        let Some(files) = self.files.get() else {
            for letter in dead {
                self.send_dead_letter(letter);
            }
            return self.send_records(records);
        };
        // A file source's share of the pass, kept apart (few passes hold any).
        let mut pieces: Vec<(u32, Piece)> = Vec::new();
        let mut n = 0;
        for item in Delimited::new(records) {
            let Ok(bytes) = item else { break };
            let Ok(view) = StreamDataView::parse(bytes) else { continue };
            if files.has(view.source_id) {
                piece(&mut pieces, view.source_id).push_record(bytes);
            } else {
                let key = record_key(view.source_id, view.symbol_id);
                self.send(BaseRecord::to(&self.events_topic).key(&key[..]).payload(bytes));
                n += 1;
            }
        }
        self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
        for letter in dead {
            if files.has(letter.source_id) {
                piece(&mut pieces, letter.source_id).push_dead(letter);
            } else {
                self.send_dead_letter(letter);
            }
        }
        for mark in marks.files {
            if files.has(mark.source) {
                piece(&mut pieces, mark.source).set_mark(mark);
            }
        }
        for (source, piece) in pieces {
            n += files.send(source, piece) as usize;
        }
        n
    }

    fn send(&self, record: BaseRecord<'_, [u8], [u8]>) {
        let full = || _ = self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = super::send_waiting(&self.inner, record, Duration::from_millis(5), full) {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "a record could not be queued for Kafka");
        }
    }

    /// Waits until everything sent so far is acknowledged or failed.
    ///
    /// # Errors
    /// [`KafkaError::FlushTimeout`] with the count still in flight.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        if let Some(files) = self.files.get() {
            files.flush(timeout)?;
        }
        self.inner.flush(timeout).map_err(|_| KafkaError::FlushTimeout(self.inner.in_flight_count()))
    }

    /// Commits what the file sources' appenders hold and stops them.
    pub fn close(&self) {
        if let Some(files) = self.files.get() {
            files.close();
        }
    }
}

/// The piece of `source` in `pieces`, added when it is not there yet.
fn piece(pieces: &mut Vec<(u32, Piece)>, source: u32) -> &mut Piece {
    let at = match pieces.iter().position(|(s, _)| *s == source) {
        Some(at) => at,
        None => {
            pieces.push((source, Piece::default()));
            pieces.len() - 1
        }
    };
    &mut pieces[at].1
}
