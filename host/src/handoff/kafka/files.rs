//! File sources on Kafka: a recording's records, its decode dead letters and its position go in
//! one Kafka transaction, so the position a restart reads back says exactly what the topics hold.
//!
//! On the local log a [`FileMark`] commits in the SQLite transaction of its records. On Kafka the
//! ingest producer is idempotent but not transactional: records of one pass land in several
//! partitions independently, and a `kill -9` can leave any subset of them delivered. So each file
//! source gets an appender of its own ([`FileAppenders`]): a thread with a transactional producer
//! (`transactional.id` = `sluice-file-<events topic>-<source>`) that writes, per transaction:
//! - the source's records to the events topic, keyed as every record is;
//! - its decode dead letters to the dead-letter topic, with the usual headers;
//! - its newest position to the files topic (`[kafka] files_topic`, `sluice.files` by default,
//!   compacted): key the source's name, value the mark as JSON (`path`, `head_len`,
//!   `head_sha256` in hex, `offset`).
//!
//! A `read_committed` reader (the process role, Druid) sees a transaction whole or not at all.
//!
//! **A generation per start.** The transactional id ends in a generation number, kept in the data
//! directory (`files.generation`). A start first initialises the ids of the generation the last
//! start used, which fences that incarnation and aborts the transaction it left open (say, at a
//! `kill -9`), then writes the next generation to the file and writes under it. So a start's
//! transactions come from a producer id of their own, never the one whose transaction was just
//! aborted: a `read_committed` consumer that fetched an aborted transaction together with a later,
//! still open one of the same producer id was seen to skip that producer's records for good.
//! Then the files topic is read back ([`read_marks`]) and each file source resumes from the line
//! after the last committed one. So a restart, clean or `kill -9`, reads no line twice and skips
//! none, whether its records carry trade ids or not.
//!
//! A transaction that fails is aborted and written again from the same pieces, with a growing
//! pause; while it fails the appender takes no more pieces, so the source waits (its queue fills)
//! rather than anything being dropped. A producer fenced by another process reading the same
//! source stops the appender with an error.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};
use sluice_wire::{Delimited, StreamDataView, push_delimited};

use super::range::RangeReader;
use super::{KafkaConfig, KafkaError, dead_letter_headers, record_key, send_waiting};
use crate::handoff::ProducerStats;
use crate::handoff::marks::{FileIdentity, FileMark};
use crate::handoff::stage::{DeadLetter, Stage};

/// Pieces an appender holds while a transaction fails before it takes no more.
const MAX_PENDING: usize = 64;
/// Pieces queued for an appender before the decode worker waits.
const QUEUE: usize = 64;

/// The transactional id of file source `source` writing to `events_topic` in `generation`.
pub fn transactional_id(events_topic: &str, source: &str, generation: u64) -> String {
    format!("sluice-file-{events_topic}-{source}-{generation}")
}

/// The file in the data directory that names the generation the last start wrote under.
pub const GENERATION_FILE: &str = "files.generation";

/// A transactional producer for `transactional_id`, initialised.
fn transactional_producer(
    config: &KafkaConfig,
    brokers: &str,
    transactional_id: &str,
    timeout: Duration,
) -> Result<ThreadedProducer<DefaultProducerContext>, KafkaError> {
    let linger = config.linger_ms.to_string();
    let mut c = config.client_config_with(
        brokers,
        &[("compression.type", &config.compression), ("linger.ms", &linger), ("transaction.timeout.ms", "15000")],
    );
    // After the pass-through options, so none of them undoes exactly-once.
    c.set("transactional.id", transactional_id).set("enable.idempotence", "true").set("acks", "all");
    let producer: ThreadedProducer<DefaultProducerContext> =
        c.create().map_err(|e| KafkaError::Config(e.to_string()))?;
    producer
        .init_transactions(timeout)
        .map_err(|e| KafkaError::Transaction(format!("init_transactions as {transactional_id}: {e}")))?;
    Ok(producer)
}

/// Settles what the last start's generation left open (named in `data_dir`'s
/// [`GENERATION_FILE`]) and writes the next generation there, durably, before anything is written
/// under it. Returns the new generation.
///
/// # Errors
/// [`KafkaError`] when an old producer cannot be initialised, or the file cannot be written.
pub fn next_generation(
    config: &KafkaConfig,
    brokers: &str,
    sources: &[(u32, String)],
    data_dir: &std::path::Path,
    timeout: Duration,
) -> Result<u64, KafkaError> {
    let path = data_dir.join(GENERATION_FILE);
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().parse::<u64>().map_err(|_| {
            KafkaError::Config(format!("{} does not hold a generation number: {text:?}", path.display()))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(KafkaError::Config(format!("cannot read {}: {e}", path.display()))),
    };
    if let Some(previous) = previous {
        for (_, name) in sources {
            drop(transactional_producer(
                config,
                brokers,
                &transactional_id(&config.events_topic, name, previous),
                timeout,
            )?);
        }
    }
    let next = previous.map_or(0, |g| g + 1);
    let write = || -> std::io::Result<()> {
        let staged = path.with_extension("generation.new");
        let mut file = std::fs::File::create(&staged)?;
        std::io::Write::write_all(&mut file, format!("{next}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staged, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|e| KafkaError::Config(format!("cannot write {}: {e}", path.display())))?;
    Ok(next)
}

/// A refused frame, owned, waiting for its transaction.
#[derive(Debug)]
struct OwnedDeadLetter {
    stage: Stage,
    source_id: u32,
    source: String,
    plugin: String,
    reason: String,
    bytes: Vec<u8>,
}

impl OwnedDeadLetter {
    fn of(d: &DeadLetter<'_>) -> Self {
        OwnedDeadLetter {
            stage: d.stage,
            source_id: d.source_id,
            source: d.source.to_owned(),
            plugin: d.plugin.to_owned(),
            reason: d.reason.to_owned(),
            bytes: d.bytes.to_vec(),
        }
    }

    fn borrow(&self) -> DeadLetter<'_> {
        DeadLetter {
            stage: self.stage,
            source_id: self.source_id,
            source: &self.source,
            plugin: &self.plugin,
            reason: &self.reason,
            bytes: &self.bytes,
        }
    }
}

/// What one pass of a decode worker hands over for one file source.
#[derive(Debug, Default)]
pub struct Piece {
    /// Length-delimited records.
    records: Vec<u8>,
    /// How many records `records` holds.
    count: u64,
    dead: Vec<OwnedDeadLetter>,
    /// The source's position after these lines.
    mark: Option<FileMark>,
}

impl Piece {
    /// Adds one record (its encoded bytes).
    pub fn push_record(&mut self, bytes: &[u8]) {
        push_delimited(&mut self.records, bytes);
        self.count += 1;
    }

    /// Adds one dead letter.
    pub fn push_dead(&mut self, d: &DeadLetter<'_>) {
        self.dead.push(OwnedDeadLetter::of(d));
    }

    /// Sets the position (the furthest wins).
    pub fn set_mark(&mut self, mark: FileMark) {
        match &mut self.mark {
            Some(m) if m.identity == mark.identity => m.offset = m.offset.max(mark.offset),
            _ => self.mark = Some(mark),
        }
    }
}

enum Message {
    Piece(Piece),
    Flush(std::sync::mpsc::Sender<()>),
}

/// One file source's appender thread.
struct FileAppender {
    /// `None` once closed.
    tx: Mutex<Option<SyncSender<Message>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Every file source's appender, by source id.
pub struct FileAppenders {
    by_source: HashMap<u32, FileAppender>,
    stats: Arc<ProducerStats>,
}

/// The files topic's value: a [`FileMark`] without its source id (the key names the source).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct StoredMark {
    path: String,
    head_len: u64,
    head_sha256: String,
    offset: u64,
}

impl StoredMark {
    fn of(mark: &FileMark) -> Self {
        StoredMark {
            path: mark.identity.path.clone(),
            head_len: mark.identity.head_len,
            head_sha256: mark.identity.head_sha256.iter().map(|b| format!("{b:02x}")).collect(),
            offset: mark.offset,
        }
    }

    fn mark(&self, source: u32) -> Option<FileMark> {
        let hex = self.head_sha256.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut sha = [0u8; 32];
        for (i, byte) in sha.iter_mut().enumerate() {
            let digits = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
            *byte = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(FileMark {
            source,
            identity: FileIdentity { path: self.path.clone(), head_len: self.head_len, head_sha256: sha },
            offset: self.offset,
        })
    }
}

/// Where an appender writes.
#[derive(Clone)]
struct Topics {
    events: String,
    dlq: String,
    files: String,
}

impl FileAppenders {
    /// An appender for each of `sources` (id, name), each with its transactional producer of
    /// `generation` (see [`next_generation`]) initialised. Blocks.
    ///
    /// # Errors
    /// [`KafkaError`] when a producer cannot be created or initialised within `timeout`.
    pub fn open(
        config: &KafkaConfig,
        brokers: &str,
        sources: &[(u32, String)],
        generation: u64,
        stats: Arc<ProducerStats>,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let topics = Topics {
            events: config.events_topic.clone(),
            dlq: config.dlq_topic.clone(),
            files: config.files_topic.clone(),
        };
        let mut by_source = HashMap::new();
        for (id, name) in sources {
            let producer = transactional_producer(
                config,
                brokers,
                &transactional_id(&config.events_topic, name, generation),
                timeout,
            )?;
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let appender =
                Appender { producer, topics: topics.clone(), source: name.clone(), stats: stats.clone(), timeout };
            let thread = std::thread::Builder::new()
                .name(format!("sluice-file-{id}"))
                .spawn(move || appender.run(rx))
                .map_err(|e| KafkaError::Config(format!("cannot start the appender of {name}: {e}")))?;
            by_source.insert(*id, FileAppender { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) });
        }
        Ok(FileAppenders { by_source, stats })
    }

    /// True when `source` is a file source with an appender.
    pub fn has(&self, source: u32) -> bool {
        self.by_source.contains_key(&source)
    }

    /// Queues `piece` for `source`'s next transaction, waiting while its queue is full. Returns how
    /// many records it held.
    pub fn send(&self, source: u32, piece: Piece) -> u64 {
        let n = piece.count;
        let Some(appender) = self.by_source.get(&source) else { return 0 };
        self.stats.sent.fetch_add(n, Ordering::Relaxed);
        self.stats.dead_lettered.fetch_add(piece.dead.len() as u64, Ordering::Relaxed);
        if !appender.send(Message::Piece(piece), &self.stats) {
            self.stats.failed.fetch_add(n, Ordering::Relaxed);
            tracing::error!(source, records = n, "the file source's appender stopped; its records were not written");
        }
        n
    }

    /// Waits until every piece queued so far is committed (or `timeout` passed).
    ///
    /// # Errors
    /// [`KafkaError::FlushTimeout`] when an appender did not get there in time.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = std::time::Instant::now() + timeout;
        for appender in self.by_source.values() {
            let (ack, done) = std::sync::mpsc::channel();
            if !appender.send(Message::Flush(ack), &self.stats) {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            done.recv_timeout(left).map_err(|_| KafkaError::FlushTimeout(0))?;
        }
        Ok(())
    }

    /// Commits what is queued and stops every appender.
    pub fn close(&self) {
        for appender in self.by_source.values() {
            drop(appender.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
            if let Some(thread) = appender.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for FileAppenders {
    fn drop(&mut self) {
        self.close();
    }
}

impl FileAppender {
    /// Hands `message` to the thread, waiting while its queue is full; false when it has stopped.
    fn send(&self, message: Message, stats: &ProducerStats) -> bool {
        let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return false };
        match tx.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(m)) => {
                stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
                tx.send(m).is_ok()
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// The thread's side of one appender.
struct Appender {
    producer: ThreadedProducer<DefaultProducerContext>,
    topics: Topics,
    source: String,
    stats: Arc<ProducerStats>,
    timeout: Duration,
}

impl Appender {
    fn run(self, rx: Receiver<Message>) {
        let mut pending: Vec<Piece> = Vec::new();
        let mut flushes: Vec<std::sync::mpsc::Sender<()>> = Vec::new();
        let mut pause = Duration::from_millis(100);
        let mut open = true;
        while open || !pending.is_empty() {
            if pending.is_empty() && flushes.is_empty() {
                match rx.recv() {
                    Ok(m) => take(m, &mut pending, &mut flushes),
                    Err(_) => break,
                }
            }
            // Everything queued behind it goes in the same transaction, unless a failing one
            // already holds enough: then the source waits.
            while open && pending.len() < MAX_PENDING {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut pending, &mut flushes),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            if !pending.is_empty() {
                match self.transact(&pending) {
                    Ok(()) => {
                        let n: u64 = pending.iter().map(|p| p.count).sum();
                        self.stats.delivered.fetch_add(n, Ordering::Relaxed);
                        pending.clear();
                        pause = Duration::from_millis(100);
                    }
                    Err(Outcome::Fenced(e)) => {
                        let n: u64 = pending.iter().map(|p| p.count).sum();
                        self.stats.failed.fetch_add(n, Ordering::Relaxed);
                        tracing::error!(
                            source = %self.source,
                            error = %e,
                            "another process writes this file source (its producer was fenced); this one stops \
                             writing it"
                        );
                        return;
                    }
                    Err(Outcome::Retry(e)) => {
                        if let Err(abort) = self.producer.abort_transaction(self.timeout) {
                            tracing::warn!(source = %self.source, error = %abort, "aborting the file transaction failed");
                        }
                        tracing::warn!(
                            source = %self.source,
                            error = %e,
                            pause_ms = pause.as_millis() as u64,
                            "a file source's transaction failed; writing it again"
                        );
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }

    /// One transaction: the pieces' records and dead letters, then the newest position.
    fn transact(&self, pieces: &[Piece]) -> Result<(), Outcome> {
        let fail = |what: &str, e: rdkafka::error::KafkaError| {
            let fenced = matches!(&e, rdkafka::error::KafkaError::Transaction(t) if t.is_fatal());
            let message = format!("{what}: {e}");
            if fenced { Outcome::Fenced(message) } else { Outcome::Retry(message) }
        };
        self.producer.begin_transaction().map_err(|e| fail("begin", e))?;
        let send = |record: BaseRecord<'_, [u8], [u8]>| {
            send_waiting(&self.producer, record, Duration::from_millis(1), || {}).map_err(|e| fail("produce", e))
        };
        let mut mark: Option<&FileMark> = None;
        for piece in pieces {
            for bytes in Delimited::new(&piece.records).flatten() {
                let Ok(view) = StreamDataView::parse(bytes) else { continue };
                let key = record_key(view.source_id, view.symbol_id);
                send(BaseRecord::to(&self.topics.events).key(&key[..]).payload(bytes))?;
            }
            for d in &piece.dead {
                let d = d.borrow();
                let key = d.source_id.to_be_bytes();
                send(
                    BaseRecord::to(&self.topics.dlq)
                        .key(&key[..])
                        .payload(d.kept_bytes())
                        .headers(dead_letter_headers(&d)),
                )?;
            }
            if let Some(m) = &piece.mark
                && mark.is_none_or(|old| old.identity != m.identity || old.offset <= m.offset)
            {
                mark = Some(m);
            }
        }
        if let Some(m) = mark {
            let value = serde_json::to_vec(&StoredMark::of(m)).map_err(|e| Outcome::Retry(e.to_string()))?;
            send(BaseRecord::to(&self.topics.files).key(self.source.as_bytes()).payload(&value))?;
        }
        self.producer.commit_transaction(self.timeout).map_err(|e| fail("commit", e))
    }
}

enum Outcome {
    /// Abort, wait and write the same pieces again.
    Retry(String),
    /// Another producer took this transactional id over.
    Fenced(String),
}

fn take(message: Message, pending: &mut Vec<Piece>, flushes: &mut Vec<std::sync::mpsc::Sender<()>>) {
    match message {
        Message::Piece(p) => pending.push(p),
        Message::Flush(ack) => flushes.push(ack),
    }
}

/// Each file source's committed position, read from the files topic (whole, `read_committed`):
/// `ids` maps the configured sources' names to their ids; a mark of a source no longer configured
/// is left out. Read after [`FileAppenders::open`], which settles what a previous run left open.
///
/// # Errors
/// [`KafkaError::Read`] when the topic cannot be read.
pub fn read_marks(
    config: &KafkaConfig,
    brokers: &str,
    ids: &HashMap<String, u32>,
) -> Result<Vec<FileMark>, KafkaError> {
    let reader = RangeReader::new(config, brokers, &config.files_topic)?;
    let mut last: HashMap<u32, Option<FileMark>> = HashMap::new();
    let mut malformed = 0u64;
    reader.read_keyed(|key, payload| {
        let Some(&id) = std::str::from_utf8(key).ok().and_then(|name| ids.get(name)) else { return };
        let mark = payload.filter(|p| !p.is_empty()).and_then(|p| serde_json::from_slice::<StoredMark>(p).ok());
        match (payload.filter(|p| !p.is_empty()), mark) {
            (Some(_), None) => malformed += 1,
            (_, mark) => {
                last.insert(id, mark.and_then(|m| m.mark(id)));
            }
        }
    })?;
    if malformed > 0 {
        tracing::warn!(topic = %config.files_topic, records = malformed, "file positions not in their encoding were skipped");
    }
    let mut marks: Vec<FileMark> = last.into_values().flatten().collect();
    marks.sort_by_key(|m| m.source);
    Ok(marks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_mark_reads_back_as_the_mark_it_was() {
        let mark = FileMark {
            source: 3,
            identity: FileIdentity { path: "/data/trades.jsonl".into(), head_len: 65_536, head_sha256: [0xab; 32] },
            offset: 12_345,
        };
        let stored = serde_json::to_vec(&StoredMark::of(&mark)).unwrap();
        let back: StoredMark = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back.mark(3), Some(mark));
        let short = StoredMark { head_sha256: "abc".into(), ..back };
        assert_eq!(short.mark(3), None, "a hash that is not 32 bytes of hex is no mark");
    }

    #[test]
    fn a_piece_keeps_the_furthest_position_of_its_recording() {
        let identity = FileIdentity { path: "a".into(), head_len: 1, head_sha256: [0; 32] };
        let mut piece = Piece::default();
        piece.set_mark(FileMark { source: 1, identity: identity.clone(), offset: 10 });
        piece.set_mark(FileMark { source: 1, identity: identity.clone(), offset: 4 });
        assert_eq!(piece.mark.as_ref().map(|m| m.offset), Some(10));
        piece.push_record(b"x");
        piece.push_record(b"y");
        assert_eq!(piece.count, 2);
    }
}
