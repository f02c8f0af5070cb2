//! The local log: the hand-off between the ingest and process roles on one machine, in SQLite (WAL
//! mode) at `<data-dir>/log.sqlite`.
//!
//! - **Appending.** Decode workers hand their batches of length-delimited `StreamData` records to one
//!   appender thread ([`LocalWriter`]), which commits everything that arrived while its previous
//!   transaction ran as one row of `batches` (group commit). A record is *delivered* when its row has
//!   committed. Offsets count records from 0: a row holds records `base .. base + count`.
//! - **Reading.** The process role reads rows in offset order ([`LocalReader`]) from its store's
//!   position on. It sleeps on a condition variable that the appender signals after each commit, so
//!   it costs nothing while idle and wakes within a scheduler tick of a commit.
//! - **Position.** The store commits the next offset in the same transaction as the rollups, so a
//!   crash at any moment loses nothing delivered and counts nothing twice. A store position past the
//!   log's end (a deleted log, a disk restored from an older backup) is refused with both positions
//!   ([`LogError::StoreAhead`]); it never restarts from the beginning.
//! - **Retention.** Rows older than `retention_ms` or beyond `retention_bytes` are deleted once the
//!   store has committed past them. Only when the log reaches `max_bytes` are uncommitted rows deleted,
//!   oldest first; their records are counted as dropped and logged at ERROR.
//! - **Dead letters and symbols** live in the same file (`dead_letters`, `symbols`) and count in
//!   `max_bytes` with the records. Dead letters are deleted past `dead_letter_retention_ms` and
//!   beyond `dead_letter_max_bytes`, oldest first; symbols never are (an id, once given, stays).
//! - **A full disk.** A commit SQLite refuses (`SQLITE_FULL`, an I/O error) is held in memory and
//!   tried again, at most a second apart; before each try the log gives up its disk reserve (see
//!   [`LocalLogConfig::reserve_bytes`]) and deletes every batch the store has read. Meanwhile new records
//!   and dead letters are refused at once, counted by reason ([`LocalLog::refused`]), so decode
//!   workers never wait on the disk; [`LocalLog::refusing`] says why while it lasts. The first commit
//!   that goes through ends it. A close gives the held batch a few seconds, then counts it refused.
//! - **Marks** (see [`marks`](super::marks)): each source's recent trade ids per symbol
//!   (`trade_marks`) and each file source's position (`file_marks`), written in the transaction of
//!   the batch that moved them, so after any crash they describe exactly what the log holds.
//!
//! `synchronous = FULL` (the default) syncs every commit: a record counted delivered survives a
//! power cut, and the store (which only reads committed rows) can never be ahead of the log.
//! `synchronous = "normal"` keeps every committed row through a crash of the process (`kill -9`),
//! but a power cut can lose the last commits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use sluice_wire::Delimited;

use super::dead_letters::{self, TableSize};
use super::marks::{FileIdentity, FileMark, Marks, TradeMark};
use super::{DeadLetter, Handover, LocalLogConfig, LocalSizes, LogError, PartitionStatus, Stage};
use crate::handoff::{PollOutcome, Polled, ProducerStats};

/// The name the store keeps the local log's position under (never a Kafka topic's name, so a store
/// moved between modes cannot mistake one position for the other).
pub const POSITION_TOPIC: &str = "sluice.local-log";

/// Most bytes of records in one row; a busy appender splits what it drained into rows of this size.
const MAX_ROW_BYTES: usize = 1 << 20;
/// Messages the appender's queue holds before decode workers wait.
const QUEUE_MESSAGES: usize = 1024;
/// Most bytes (records and dead letters) the appender takes into one transaction: what it holds in
/// memory while a commit fails, and what must fit on the disk for it to go through.
const MAX_COMMIT_BYTES: usize = 8 * MAX_ROW_BYTES;
/// How often the appender applies retention.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a commit that failed.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a close keeps trying to commit the batch it holds before counting it refused.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    base        INTEGER PRIMARY KEY,
    count       INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    appended_ms INTEGER NOT NULL,
    records     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS log_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS symbols (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT    NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS trade_marks (
    source INTEGER NOT NULL,
    symbol INTEGER NOT NULL,
    last   INTEGER NOT NULL,
    seen   BLOB    NOT NULL,
    PRIMARY KEY (source, symbol)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_marks (
    source      INTEGER PRIMARY KEY,
    path        TEXT    NOT NULL,
    head_len    INTEGER NOT NULL,
    head_sha256 BLOB    NOT NULL,
    offset      INTEGER NOT NULL
) WITHOUT ROWID;
";

/// State the appender, the reader and the API share.
#[derive(Debug)]
struct Shared {
    /// The next offset to be appended: every record below it is committed. Guarded so the reader can
    /// wait on `appended` for it to move.
    end: Mutex<i64>,
    appended: Condvar,
    /// The first offset still in the log.
    start: AtomicI64,
    /// The store's committed position (the next offset it will read); retention never deletes
    /// records at or past it unless the log is full.
    committed: AtomicI64,
    /// Bytes of records the log holds.
    bytes: AtomicU64,
    /// Records deleted before the store committed them (the log reached `max_bytes`).
    dropped: AtomicU64,
    /// Why new records are refused while the last commit failed: a [`Refusal`] as its index + 1,
    /// 0 while commits go through.
    refusing: AtomicU8,
    /// Records refused, by [`Refusal`] index.
    refused_records: [AtomicU64; 2],
    /// Dead letters refused, by [`Refusal`] index.
    refused_dead_letters: [AtomicU64; 2],
    /// The dead letters and symbols the file holds: they count in `max_bytes` with the records.
    tables: Mutex<Tables>,
}

/// The tables beside the batches that count in `max_bytes`.
#[derive(Clone, Copy, Debug, Default)]
struct Tables {
    dead_letters: TableSize,
    symbols: TableSize,
    /// The highest symbol id counted in `symbols` (names are added by the dictionary, not here).
    symbols_to: i64,
}

/// Why the local log refuses new records: its last commit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// SQLite said the disk is full (`SQLITE_FULL`).
    DiskFull,
    /// Any other refusal of a write: an I/O error, permissions, a lock held too long.
    WriteError,
}

impl Refusal {
    /// Both, in index order.
    pub const ALL: [Refusal; 2] = [Refusal::DiskFull, Refusal::WriteError];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::DiskFull => "disk_full",
            Refusal::WriteError => "write_error",
        }
    }

    fn of(e: &rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Refusal::DiskFull,
            _ => Refusal::WriteError,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Shared {
    fn end(&self) -> i64 {
        *self.end.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Each update writes whole values, so a poisoned lock still holds consistent counts.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refusing(&self) -> Option<Refusal> {
        match self.refusing.load(Ordering::Relaxed) {
            0 => None,
            n => Refusal::ALL.get(usize::from(n) - 1).copied(),
        }
    }

    fn set_refusing(&self, refusal: Option<Refusal>) {
        self.refusing.store(refusal.map_or(0, |r| r.index() as u8 + 1), Ordering::Relaxed);
    }

    /// Counts `records` records and `dead_letters` dead letters refused for `why`.
    fn refuse(&self, why: Refusal, records: u64, dead_letters: u64) {
        self.refused_records[why.index()].fetch_add(records, Ordering::Relaxed);
        self.refused_dead_letters[why.index()].fetch_add(dead_letters, Ordering::Relaxed);
    }
}

/// The local log, opened: hands out its writer, its reader and its status.
#[derive(Clone, Debug)]
pub struct LocalLog {
    path: PathBuf,
    config: LocalLogConfig,
    shared: Arc<Shared>,
}

/// Opens a connection to the log file with the settings every connection uses.
fn connect(path: &Path, config: &LocalLogConfig) -> Result<Connection, LogError> {
    let conn = Connection::open(path).map_err(|e| LogError::open(path, e))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(|e| LogError::open(path, e))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| LogError::open(path, e))?;
    conn.pragma_update(None, "synchronous", config.synchronous.as_str()).map_err(|e| LogError::open(path, e))?;
    // Checkpoints give the WAL's space back instead of letting it grow to the largest burst.
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20).map_err(|e| LogError::open(path, e))?;
    Ok(conn)
}

impl LocalLog {
    /// Opens (or creates) the log at `path` and reads where it starts and ends.
    ///
    /// # Errors
    /// [`LogError::Sqlite`] when the file cannot be opened or is not a sluice log.
    pub fn open(path: &Path, config: &LocalLogConfig) -> Result<Self, LogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| LogError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = connect(path, config)?;
        conn.execute_batch(SCHEMA).map_err(|e| LogError::open(path, e))?;
        dead_letters::create(&conn).map_err(|e| LogError::open(path, e))?;
        let mut tables = Tables {
            dead_letters: dead_letters::size(&conn).map_err(|e| LogError::open(path, e))?,
            ..Tables::default()
        };
        count_symbols(&conn, &mut tables).map_err(|e| LogError::open(path, e))?;
        let (start, end, bytes) = conn
            .query_row(
                "SELECT (SELECT min(base) FROM batches), (SELECT max(base + count) FROM batches), \
                 (SELECT coalesce(sum(size), 0) FROM batches)",
                [],
                |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, i64>(2)?)),
            )
            .map_err(|e| LogError::open(path, e))?;
        // The end survives retention deleting every row: it is also kept in log_meta.
        let kept_end: Option<i64> = conn
            .query_row("SELECT value FROM log_meta WHERE key = 'end'", [], |r| r.get(0))
            .optional()
            .map_err(|e| LogError::open(path, e))?;
        let end = end.unwrap_or(0).max(kept_end.unwrap_or(0));
        let start = start.unwrap_or(end);
        let shared = Arc::new(Shared {
            end: Mutex::new(end),
            appended: Condvar::new(),
            start: AtomicI64::new(start),
            committed: AtomicI64::new(0),
            bytes: AtomicU64::new(bytes.max(0) as u64),
            dropped: AtomicU64::new(0),
            refusing: AtomicU8::new(0),
            refused_records: Default::default(),
            refused_dead_letters: Default::default(),
            tables: Mutex::new(tables),
        });
        Ok(LocalLog { path: path.to_owned(), config: config.clone(), shared })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks a store's committed position against the log and, when it fits, remembers it as the
    /// position retention must not delete past.
    ///
    /// # Errors
    /// [`LogError::StoreAhead`] when the store has read past the log's end: the log was deleted or
    /// replaced by an older copy, and reading from its start would count records twice.
    pub fn check_position(&self, store_next: Option<i64>) -> Result<(), LogError> {
        let end = self.shared.end();
        let next = store_next.unwrap_or(0);
        if next > end {
            return Err(LogError::StoreAhead { store: next, log_end: end, log: self.path.clone() });
        }
        self.shared.committed.fetch_max(next, Ordering::SeqCst);
        Ok(())
    }

    /// Moves the log's end up to `next`, the position of a store that counted records this log lost
    /// (its last commits, in a power cut with `synchronous = normal`): appending goes on from there, so
    /// the store and the log agree again and nothing is counted twice. Does nothing when `next` is
    /// not past the end.
    ///
    /// # Errors
    /// [`LogError::Sqlite`] when the new end cannot be written.
    pub fn resume_at(&self, next: i64) -> Result<(), LogError> {
        let mut end = self.shared.end.lock().unwrap_or_else(|p| p.into_inner());
        if next <= *end {
            return Ok(());
        }
        let conn = connect(&self.path, &self.config)?;
        conn.execute(
            "INSERT INTO log_meta (key, value) VALUES ('end', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [next],
        )
        .map_err(LogError::Sqlite)?;
        tracing::warn!(lost = next - *end, from = *end, to = next, log = %self.path.display(), "the local log lost its last records; the store had counted them, appending goes on from its position");
        *end = next;
        if self.shared.start.load(Ordering::SeqCst) > next {
            self.shared.start.store(next, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Starts the appender thread and returns the writer that feeds it. `stats` counts as the Kafka
    /// producer's do: `sent` when handed over, `delivered` when committed.
    ///
    /// # Errors
    /// [`LogError`] when the appender's connection cannot be opened or its thread started.
    pub fn writer(&self, stats: Arc<ProducerStats>) -> Result<LocalWriter, LogError> {
        let conn = connect(&self.path, &self.config)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_MESSAGES);
        let appender = Appender {
            conn,
            shared: self.shared.clone(),
            config: self.config.clone(),
            stats: stats.clone(),
            last_prune: Instant::now(),
            path: self.path.clone(),
            failing: None,
            reserve: Reserve::new(&self.path, self.config.reserve_bytes),
        };
        let thread = std::thread::Builder::new()
            .name("sluice-log-append".into())
            .spawn(move || appender.run(rx))
            .map_err(|e| LogError::Io(format!("cannot start the log appender: {e}")))?;
        Ok(LocalWriter {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
            shared: self.shared.clone(),
        })
    }

    /// A reader positioned at the start of the log; [`LocalReader::seek`] moves it.
    ///
    /// # Errors
    /// [`LogError::Sqlite`] when the file cannot be opened.
    pub fn reader(&self) -> Result<LocalReader, LogError> {
        let conn = connect(&self.path, &self.config)?;
        let next = self.shared.start.load(Ordering::SeqCst);
        Ok(LocalReader { inner: Mutex::new(ReaderState { conn, next }), shared: self.shared.clone() })
    }

    /// Start, end and the store's position, as `GET /v1/log` shows them (one partition, 0).
    pub fn status(&self) -> PartitionStatus {
        let end = self.shared.end();
        let committed = self.shared.committed.load(Ordering::SeqCst);
        PartitionStatus {
            partition: 0,
            start: self.shared.start.load(Ordering::SeqCst),
            end,
            committed,
            lag: (end - committed).max(0),
        }
    }

    /// Bytes of records the log holds.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// What the log holds against `max_bytes`, and whether it refuses, as `GET /v1/log` shows it.
    pub fn sizes(&self) -> LocalSizes {
        let tables = *self.shared.tables();
        LocalSizes {
            records_bytes: self.bytes(),
            dead_letters: tables.dead_letters,
            symbols: tables.symbols,
            max_bytes: self.config.max_bytes,
            refusing: self.refusing().map(Refusal::as_str),
        }
    }

    /// Records deleted before the store committed them, since this process started.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Why the log refuses new records, while its last commit failed (`None` while commits go
    /// through).
    pub fn refusing(&self) -> Option<Refusal> {
        self.shared.refusing()
    }

    /// What `/metrics` shows of the log: its positions, size, losses and refusals (every reason,
    /// 0 included, so the series exist before the first refusal).
    pub fn sample(&self) -> crate::telemetry::LogSample {
        let s = self.status();
        let tables = *self.shared.tables();
        crate::telemetry::LogSample {
            start: s.start,
            end: s.end,
            committed: s.committed,
            bytes: self.bytes(),
            dead_letter_bytes: tables.dead_letters.bytes,
            symbol_bytes: tables.symbols.bytes,
            dropped: self.dropped(),
            refused: Refusal::ALL.iter().map(|&why| (why.as_str(), self.refused(why).0, self.refused(why).1)).collect(),
        }
    }

    /// Records and dead letters refused for `why` since this process started.
    pub fn refused(&self, why: Refusal) -> (u64, u64) {
        let i = why.index();
        (
            self.shared.refused_records[i].load(Ordering::Relaxed),
            self.shared.refused_dead_letters[i].load(Ordering::Relaxed),
        )
    }

    /// What ingest kept with the batches committed so far: every (source, symbol)'s recent trade
    /// ids and every file source's position.
    ///
    /// # Errors
    /// [`LogError::Sqlite`] when the tables cannot be read.
    pub fn marks(&self) -> Result<Marks, LogError> {
        let conn = connect(&self.path, &self.config)?;
        let mut marks = Marks::default();
        let mut stmt = conn
            .prepare("SELECT source, symbol, last, seen FROM trade_marks ORDER BY source, symbol")
            .map_err(LogError::Sqlite)?;
        let mut rows = stmt.query([]).map_err(LogError::Sqlite)?;
        while let Some(row) = rows.next().map_err(LogError::Sqlite)? {
            let seen: Vec<u8> = row.get(3).map_err(LogError::Sqlite)?;
            let Some(seen) = TradeMark::seen_from_bytes(&seen) else {
                return Err(LogError::Io(format!("{}: a trade mark of the wrong size", self.path.display())));
            };
            marks.trades.push(TradeMark {
                source: row.get(0).map_err(LogError::Sqlite)?,
                symbol: row.get(1).map_err(LogError::Sqlite)?,
                last: row.get::<_, i64>(2).map_err(LogError::Sqlite)? as u64,
                seen,
            });
        }
        let mut stmt = conn
            .prepare("SELECT source, path, head_len, head_sha256, offset FROM file_marks ORDER BY source")
            .map_err(LogError::Sqlite)?;
        let mut rows = stmt.query([]).map_err(LogError::Sqlite)?;
        while let Some(row) = rows.next().map_err(LogError::Sqlite)? {
            let sha: Vec<u8> = row.get(3).map_err(LogError::Sqlite)?;
            let head_sha256 = <[u8; 32]>::try_from(sha.as_slice())
                .map_err(|_| LogError::Io(format!("{}: a file mark of the wrong size", self.path.display())))?;
            marks.files.push(FileMark {
                source: row.get(0).map_err(LogError::Sqlite)?,
                identity: FileIdentity {
                    path: row.get(1).map_err(LogError::Sqlite)?,
                    head_len: row.get::<_, i64>(2).map_err(LogError::Sqlite)? as u64,
                    head_sha256,
                },
                offset: row.get::<_, i64>(4).map_err(LogError::Sqlite)? as u64,
            });
        }
        Ok(marks)
    }
}

/// Adds the symbols named since `tables` last counted them.
fn count_symbols(conn: &Connection, tables: &mut Tables) -> rusqlite::Result<()> {
    let (rows, bytes, to): (i64, i64, i64) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(CAST(name AS BLOB))), 0), coalesce(max(id), ?1) FROM symbols \
             WHERE id > ?1",
        )?
        .query_row([tables.symbols_to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    tables.symbols.rows += rows.max(0) as u64;
    tables.symbols.bytes += bytes.max(0) as u64;
    tables.symbols_to = to;
    Ok(())
}

/// A dead letter on its way to the `dead_letters` table, already capped (see
/// [`DeadLetter::kept_bytes`]).
struct DeadRow {
    at_ms: i64,
    stage: Stage,
    source_id: u32,
    source: String,
    plugin: String,
    reason: String,
    bytes: Vec<u8>,
    /// The payload's length before the cap.
    length: usize,
}

impl DeadRow {
    fn letter(&self) -> DeadLetter<'_> {
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

enum Message {
    /// Records, the dead letters of the same frames, and the marks they move: one transaction.
    Batch(Vec<u8>, Vec<DeadRow>, Marks),
    Dead(DeadRow),
    /// Answered once everything sent before it has committed, or at once with why while the log
    /// refuses.
    Flush(std::sync::mpsc::Sender<Result<(), Refusal>>),
}

/// Hands records and dead letters to the appender thread. Cheap to share between decode workers.
pub struct LocalWriter {
    /// `None` once closed.
    tx: Mutex<Option<SyncSender<Message>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<ProducerStats>,
    /// Whether the log refuses, and where refusals are counted.
    shared: Arc<Shared>,
}

impl LocalWriter {
    fn send(&self, message: Message) {
        // The sender is cloned out so a full queue is waited on without holding the lock.
        let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("the local log is closed; a batch could not be appended");
            return;
        };
        let message = match tx.try_send(message) {
            Ok(()) => return,
            Err(TrySendError::Full(m)) => {
                self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
                m
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("the local log's appender stopped; a batch could not be appended");
                return;
            }
        };
        if tx.send(message).is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("the local log's appender stopped; a batch could not be appended");
        }
    }

    /// The delivery counters.
    pub fn stats(&self) -> &Arc<ProducerStats> {
        &self.stats
    }

    /// Appends length-delimited records (one copy, one message per batch). Returns how many.
    pub fn send_records(&self, records: &[u8]) -> usize {
        self.send_handover(Handover { records, ..Handover::default() })
    }

    /// Appends records, dead letters and marks, to be committed in one transaction. Returns how many
    /// records. While the log refuses (see [`LocalLog::refusing`]) they are counted refused at once,
    /// and their marks dropped.
    pub fn send_handover(&self, handover: Handover<'_>) -> usize {
        let Handover { records, dead, marks } = handover;
        let n = Delimited::new(records).take_while(Result::is_ok).count();
        if n == 0 && dead.is_empty() && marks.is_empty() {
            return 0;
        }
        self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(why) = self.shared.refusing() {
            self.shared.refuse(why, n as u64, dead.len() as u64);
            return n;
        }
        let dead = dead.iter().map(dead_row).collect();
        self.send(Message::Batch(records.to_vec(), dead, marks));
        n
    }

    /// Appends a dead letter of `stage` (refused, counted, while the log refuses).
    pub fn send_dead_letter(&self, d: &crate::handoff::DeadLetter<'_>) {
        if let Some(why) = self.shared.refusing() {
            self.shared.refuse(why, 0, 1);
            return;
        }
        self.send(Message::Dead(dead_row(d)));
    }

    /// Waits until everything sent so far has committed.
    ///
    /// # Errors
    /// [`LogError::FlushTimeout`] when it has not within `timeout`; [`LogError::Refusing`] at once
    /// while the log cannot commit.
    pub fn flush(&self, timeout: Duration) -> Result<(), LogError> {
        let (ack, done) = std::sync::mpsc::channel();
        self.send(Message::Flush(ack));
        match done.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(LogError::Refusing(why.as_str())),
            Err(_) => Err(LogError::FlushTimeout(timeout)),
        }
    }

    /// Commits what is queued and stops the appender.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// A dead letter as the table keeps it: capped.
fn dead_row(d: &DeadLetter<'_>) -> DeadRow {
    DeadRow {
        at_ms: crate::clock::now_ms(),
        stage: d.stage,
        source_id: d.source_id,
        source: d.source.to_owned(),
        plugin: d.plugin.to_owned(),
        reason: d.kept_reason().to_owned(),
        bytes: d.kept_bytes().to_vec(),
        length: d.bytes.len(),
    }
}

/// Marks waiting for the appender's next commit: the newest per key.
#[derive(Default)]
struct PendingMarks {
    trades: std::collections::HashMap<(u32, u32), TradeMark>,
    files: std::collections::HashMap<u32, FileMark>,
}

impl PendingMarks {
    fn add(&mut self, marks: Marks) {
        for t in marks.trades {
            self.trades.insert((t.source, t.symbol), t);
        }
        for f in marks.files {
            self.files.insert(f.source, f);
        }
    }

    fn is_empty(&self) -> bool {
        self.trades.is_empty() && self.files.is_empty()
    }

    fn clear(&mut self) {
        self.trades.clear();
        self.files.clear();
    }
}

/// What the appender commits next, in one transaction.
#[derive(Default)]
struct Pending {
    /// Rows of length-delimited records, each with its record count.
    rows: Vec<(Vec<u8>, i64)>,
    dead: Vec<DeadRow>,
    marks: PendingMarks,
    /// Bytes of the records and the dead letters' payloads.
    bytes: usize,
}

impl Pending {
    /// Adds a decode worker's batch: its records to the last row while it stays under
    /// [`MAX_ROW_BYTES`], else to a new one.
    fn add(&mut self, records: Vec<u8>, mut dead: Vec<DeadRow>, marks: Marks) {
        let n = Delimited::new(&records).take_while(Result::is_ok).count() as i64;
        self.bytes += records.len();
        match self.rows.last_mut() {
            Some((row, count)) if row.len() + records.len() <= MAX_ROW_BYTES => {
                row.extend_from_slice(&records);
                *count += n;
            }
            _ => self.rows.push((records, n)),
        }
        self.bytes += dead.iter().map(|d| d.bytes.len()).sum::<usize>();
        self.dead.append(&mut dead);
        self.marks.add(marks);
    }

    fn add_dead(&mut self, dead: DeadRow) {
        self.bytes += dead.bytes.len();
        self.dead.push(dead);
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.dead.is_empty() && self.marks.is_empty()
    }

    fn records(&self) -> u64 {
        self.rows.iter().map(|(_, n)| *n as u64).sum()
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.dead.clear();
        self.marks.clear();
        self.bytes = 0;
    }
}

/// What a commit added.
struct Committed {
    /// The log's new end.
    end: i64,
    records: u64,
    /// Bytes of records.
    bytes: u64,
    /// Bytes of dead letters.
    dead_bytes: u64,
}

/// A commit that failed, and when to try it again.
struct Failing {
    why: Refusal,
    since: Instant,
    /// The wait after the next failure: doubled each time, up to [`RETRY_MAX`].
    pause: Duration,
    next_try: Instant,
}

struct Appender {
    conn: Connection,
    shared: Arc<Shared>,
    config: LocalLogConfig,
    stats: Arc<ProducerStats>,
    last_prune: Instant,
    path: PathBuf,
    /// Set while the last commit failed: its batch is held and new records are refused.
    failing: Option<Failing>,
    /// The disk space held back for a full disk.
    reserve: Reserve,
}

impl Appender {
    fn run(mut self, rx: Receiver<Message>) {
        self.reserve.take();
        let mut pending = Pending::default();
        let mut acks = Vec::new();
        loop {
            let next_try = self.failing.as_ref().map(|f| f.next_try);
            if next_try.is_some_and(|at| Instant::now() >= at) {
                let _ = self.retry(&mut pending);
                continue;
            }
            // Wakes at least once per prune interval so retention runs on an idle log too, and in
            // time for the next try of a failed commit.
            let wait = next_try.map_or(PRUNE_INTERVAL, |at| at.saturating_duration_since(Instant::now()));
            let first = match rx.recv_timeout(wait) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    if self.failing.is_none() {
                        self.maybe_prune();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Some(why) = self.failing.as_ref().map(|f| f.why) {
                self.refuse(first, why);
                continue;
            }
            let mut next = Some(first);
            // Everything that arrived while the last commit ran goes into this one.
            let mut queued = 0usize;
            while let Some(message) = next.take() {
                match message {
                    Message::Batch(records, letters, moved) => {
                        pending.add(records, letters, moved);
                        queued += 1;
                    }
                    Message::Dead(d) => {
                        pending.add_dead(d);
                        queued += 1;
                    }
                    Message::Flush(ack) => acks.push(ack),
                }
                if queued < QUEUE_MESSAGES && pending.bytes < MAX_COMMIT_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            // A failed commit is tried once more at once, after making room, before a flush hears of it.
            let committed = self.commit(&mut pending) || self.retry(&mut pending);
            let answer = match self.failing.as_ref().map(|f| f.why) {
                Some(why) if !committed => Err(why),
                _ => Ok(()),
            };
            for ack in acks.drain(..) {
                let _ = ack.send(answer);
            }
            self.maybe_prune();
        }
        // Closed: what was handed over has been committed above, unless a commit is failing.
        self.close(&mut pending);
        self.prune();
    }

    /// What arrives while a commit fails is refused and counted; a flush is answered at once.
    fn refuse(&self, message: Message, why: Refusal) {
        match message {
            Message::Batch(records, dead, _) => {
                let n = Delimited::new(&records).take_while(Result::is_ok).count() as u64;
                self.shared.refuse(why, n, dead.len() as u64);
            }
            Message::Dead(_) => self.shared.refuse(why, 0, 1),
            Message::Flush(ack) => {
                let _ = ack.send(Err(why));
            }
        }
    }

    /// Commits `pending`; true when it went through. When it does not, the batch stays pending, the
    /// log refuses new records, and [`Appender::retry`] tries again.
    fn commit(&mut self, pending: &mut Pending) -> bool {
        if pending.is_empty() {
            return true;
        }
        match self.try_commit(pending) {
            Ok(Committed { end, records, bytes, dead_bytes }) => {
                self.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
                let mut tables = self.shared.tables();
                tables.dead_letters.rows += pending.dead.len() as u64;
                tables.dead_letters.bytes += dead_bytes;
                drop(tables);
                *self.shared.end.lock().unwrap_or_else(|p| p.into_inner()) = end;
                self.shared.appended.notify_all();
                self.stats.delivered.fetch_add(records, Ordering::Relaxed);
                let transform = pending.dead.iter().filter(|d| d.stage == Stage::Transform).count();
                self.stats.dead_lettered.fetch_add(pending.dead.len() as u64, Ordering::Relaxed);
                self.stats.dead_lettered_transform.fetch_add(transform as u64, Ordering::Relaxed);
                pending.clear();
                if let Some(failed) = self.failing.take() {
                    self.shared.set_refusing(None);
                    tracing::info!(
                        after_ms = failed.since.elapsed().as_millis() as u64,
                        log = %self.path.display(),
                        "the local log commits again; what was handed over meanwhile was refused (sluice_log_refused_records_total)"
                    );
                }
                true
            }
            Err(e) => {
                let why = Refusal::of(&e);
                let now = Instant::now();
                match &mut self.failing {
                    Some(f) => {
                        f.why = why;
                        f.next_try = now + f.pause;
                        f.pause = (f.pause * 2).min(RETRY_MAX);
                        tracing::debug!(error = %e, "the local log still cannot commit");
                    }
                    None => {
                        tracing::error!(
                            error = %e,
                            reason = why.as_str(),
                            records = pending.records(),
                            log = %self.path.display(),
                            "cannot append to the local log; holding the batch and refusing new records until it commits"
                        );
                        let pause = Duration::from_millis(50);
                        self.failing = Some(Failing { why, since: now, pause, next_try: now + pause });
                    }
                }
                self.shared.set_refusing(Some(why));
                false
            }
        }
    }

    /// Tries a failed commit again, after making room: the reserve goes first, then every batch the
    /// store has read. True when it went through.
    fn retry(&mut self, pending: &mut Pending) -> bool {
        if self.reserve.release() {
            tracing::warn!(bytes = self.config.reserve_bytes, log = %self.path.display(), "the local log gave up its disk reserve to make room");
        }
        self.prune_with(true);
        self.commit(pending)
    }

    /// At a close while a commit fails: more tries for up to [`CLOSE_GRACE`], then the batch held
    /// is counted refused (lost).
    fn close(&mut self, pending: &mut Pending) {
        let until = Instant::now() + CLOSE_GRACE;
        while let Some((next_try, why)) = self.failing.as_ref().map(|f| (f.next_try, f.why)) {
            if next_try > until {
                let (records, dead_letters) = (pending.records(), pending.dead.len());
                self.shared.refuse(why, records, dead_letters as u64);
                tracing::error!(
                    records,
                    dead_letters,
                    reason = why.as_str(),
                    log = %self.path.display(),
                    "the local log could not commit its last batch before stopping: it is lost (counted refused)"
                );
                pending.clear();
                self.failing = None;
                break;
            }
            std::thread::sleep(next_try.saturating_duration_since(Instant::now()));
            let _ = self.retry(pending);
        }
    }

    /// Commits `pending` in one transaction.
    fn try_commit(&mut self, pending: &Pending) -> rusqlite::Result<Committed> {
        let Pending { rows, dead, marks, .. } = pending;
        let mut end = self.shared.end();
        let now_ms = crate::clock::now_ms();
        let (mut records, mut bytes, mut dead_bytes) = (0u64, 0u64, 0u64);
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO batches (base, count, size, appended_ms, records) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (row, count) in rows {
                if *count == 0 {
                    continue;
                }
                insert.execute(params![end, count, row.len() as i64, now_ms, row])?;
                end += count;
                records += *count as u64;
                bytes += row.len() as u64;
            }
            tx.prepare_cached(
                "INSERT INTO log_meta (key, value) VALUES ('end', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([end])?;
            for d in dead {
                dead_bytes += dead_letters::insert(&tx, d.at_ms, &d.letter(), d.length)?;
            }
            let mut trade = tx.prepare_cached(
                "INSERT INTO trade_marks (source, symbol, last, seen) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (source, symbol) DO UPDATE SET last = excluded.last, seen = excluded.seen",
            )?;
            for m in marks.trades.values() {
                trade.execute(params![m.source, m.symbol, m.last as i64, m.seen_bytes()])?;
            }
            let mut file = tx.prepare_cached(
                "INSERT INTO file_marks (source, path, head_len, head_sha256, offset) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (source) DO UPDATE SET path = excluded.path, head_len = excluded.head_len, \
                 head_sha256 = excluded.head_sha256, offset = excluded.offset",
            )?;
            for m in marks.files.values() {
                let id = &m.identity;
                file.execute(params![m.source, id.path, id.head_len as i64, &id.head_sha256[..], m.offset as i64])?;
            }
        }
        tx.commit()?;
        Ok(Committed { end, records, bytes, dead_bytes })
    }

    fn maybe_prune(&mut self) {
        if self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.prune();
            self.reserve.take();
        }
    }

    /// Applies retention; failures are logged and tried again at the next interval.
    fn prune(&mut self) {
        self.prune_with(false);
    }

    /// Applies retention; under `pressure` (a commit failed) every batch the store has read goes,
    /// whatever its age, and the WAL is checkpointed so the next commit can reuse its space.
    fn prune_with(&mut self, pressure: bool) {
        self.last_prune = Instant::now();
        match self.try_prune(pressure) {
            Ok(()) if pressure => {
                // A checkpoint the disk refuses leaves the WAL as it was; the next try tries again.
                let _ = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
            Ok(()) => {}
            Err(e) if pressure => {
                tracing::debug!(error = %e, "the local log could not delete read batches to make room")
            }
            Err(e) => {
                tracing::warn!(error = %e, log = %self.path.display(), "local log retention failed; will retry")
            }
        }
    }

    /// Every query here walks the primary key from the log's start and touches only the rows it
    /// deletes (plus one), so its cost does not grow with the log.
    fn try_prune(&mut self, pressure: bool) -> rusqlite::Result<()> {
        let committed = self.shared.committed.load(Ordering::SeqCst);
        let cutoff_ms = crate::clock::now_ms() - i64::try_from(self.config.retention_ms).unwrap_or(i64::MAX);
        let tx = self.conn.transaction()?;
        // Rows are appended in offset order with rising times: the first row young enough to keep
        // bounds the aged ones, and the store's position bounds the committed ones.
        let young: Option<i64> = if pressure {
            None
        } else {
            tx.prepare_cached("SELECT base FROM batches WHERE appended_ms >= ?1 ORDER BY base LIMIT 1")?
                .query_row([cutoff_ms], |r| r.get(0))
                .optional()?
        };
        let below = young.unwrap_or(i64::MAX).min(committed);
        let (aged, aged_bytes): (i64, i64) = tx
            .prepare_cached(
                "SELECT count(*), coalesce(sum(size), 0) FROM batches WHERE base < ?1 AND base + count <= ?2",
            )?
            .query_row(params![below, committed], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if aged > 0 {
            tx.prepare_cached("DELETE FROM batches WHERE base < ?1 AND base + count <= ?2")?
                .execute(params![below, committed])?;
        }
        let mut bytes = self.shared.bytes.load(Ordering::Relaxed).saturating_sub(aged_bytes as u64);
        // Dead letters by their own age and bytes, and never past what max_bytes leaves them; then
        // the batches get what the dead letters and symbols leave of max_bytes.
        let mut tables = *self.shared.tables();
        count_symbols(&tx, &mut tables)?;
        let dead_cutoff_ms =
            crate::clock::now_ms() - i64::try_from(self.config.dead_letter_retention_ms).unwrap_or(i64::MAX);
        let dead_max =
            self.config.dead_letter_max_bytes.min(self.config.max_bytes.saturating_sub(tables.symbols.bytes));
        let dead_gone = dead_letters::prune(&tx, dead_cutoff_ms, tables.dead_letters, dead_max)?;
        tables.dead_letters.rows = tables.dead_letters.rows.saturating_sub(dead_gone.rows);
        tables.dead_letters.bytes = tables.dead_letters.bytes.saturating_sub(dead_gone.bytes);
        let max_bytes =
            self.config.max_bytes.saturating_sub(tables.dead_letters.bytes).saturating_sub(tables.symbols.bytes);
        // Oldest first while over the size: committed rows down to retention_bytes, any row down to
        // what max_bytes leaves them.
        let mut dropped = 0i64;
        let mut dropped_rows = 0i64;
        while bytes > self.config.retention_bytes.min(max_bytes) {
            let Some((base, count, size)) = tx
                .prepare_cached("SELECT base, count, size FROM batches ORDER BY base LIMIT 1")?
                .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                .optional()?
            else {
                break;
            };
            let uncommitted = (base + count - committed.max(base)).clamp(0, count);
            if uncommitted > 0 && bytes <= max_bytes {
                break;
            }
            tx.prepare_cached("DELETE FROM batches WHERE base = ?1")?.execute([base])?;
            bytes = bytes.saturating_sub(size as u64);
            dropped += uncommitted;
            dropped_rows += i64::from(uncommitted > 0);
        }
        let start: Option<i64> = tx.prepare_cached("SELECT min(base) FROM batches")?.query_row([], |r| r.get(0))?;
        tx.commit()?;
        *self.shared.tables() = tables;
        self.shared.bytes.store(bytes, Ordering::Relaxed);
        self.shared.start.store(start.unwrap_or_else(|| self.shared.end()), Ordering::SeqCst);
        if dropped > 0 {
            self.shared.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::error!(
                records = dropped,
                batches = dropped_rows,
                max_bytes = self.config.max_bytes,
                committed,
                "the local log is full: deleted records the store has not read yet"
            );
        }
        if aged > 0 || dead_gone.rows > 0 {
            tracing::debug!(batches = aged, dead_letters = dead_gone.rows, "local log retention");
        }
        Ok(())
    }
}

/// Disk space held back for a full disk (see [`LocalLogConfig::reserve_bytes`]): a file of that many
/// bytes beside the log (`log.sqlite-reserve`), deleted when a commit fails so that the deletes and
/// the checkpoint that make room can be written, and written again once the disk has twice as much
/// free.
struct Reserve {
    path: PathBuf,
    bytes: u64,
    /// Whether the file is there, whole.
    held: bool,
}

impl Reserve {
    fn new(log: &Path, bytes: u64) -> Self {
        let mut path = log.as_os_str().to_owned();
        path.push("-reserve");
        let path = PathBuf::from(path);
        let held = bytes > 0 && std::fs::metadata(&path).is_ok_and(|m| m.len() >= bytes);
        if bytes == 0 {
            let _ = std::fs::remove_file(&path);
        }
        Reserve { path, bytes, held }
    }

    /// Writes the file when it is not there and the disk has twice its size free (so taking it back
    /// never fills the disk).
    fn take(&mut self) {
        if self.held || self.bytes == 0 {
            return;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let Ok(fs) = rustix::fs::statvfs(dir) else { return };
        if fs.f_bavail.saturating_mul(fs.f_frsize) < self.bytes.saturating_mul(2) {
            return;
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&self.path)?;
            let chunk = vec![0u8; 1 << 20];
            let mut left = self.bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                file.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            file.sync_all()
        };
        match write() {
            Ok(()) => self.held = true,
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                tracing::debug!(error = %e, "cannot write the local log's disk reserve");
            }
        }
    }

    /// Deletes the file; true when it was there.
    fn release(&mut self) -> bool {
        std::mem::take(&mut self.held) && std::fs::remove_file(&self.path).is_ok()
    }
}

struct ReaderState {
    conn: Connection,
    /// The next offset to hand out.
    next: i64,
}

/// Reads the log in offset order for the process role.
pub struct LocalReader {
    inner: Mutex<ReaderState>,
    shared: Arc<Shared>,
}

impl LocalReader {
    /// Moves to `next` (the store's position), after checking it against the log.
    ///
    /// # Errors
    /// [`LogError::StoreAhead`] when `next` is past the log's end.
    pub fn seek(&self, next: Option<i64>, log: &Path) -> Result<(), LogError> {
        let end = self.shared.end();
        let start = self.shared.start.load(Ordering::SeqCst);
        let next = next.unwrap_or(start);
        if next > end {
            return Err(LogError::StoreAhead { store: next, log_end: end, log: log.to_owned() });
        }
        if next < start {
            tracing::error!(
                store = next,
                log_start = start,
                records = start - next,
                "the local log no longer holds records the store has not read (deleted when the log was full)"
            );
        }
        self.shared.committed.fetch_max(next, Ordering::SeqCst);
        self.lock().next = next.max(start);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReaderState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads whole rows into `out` until it holds at least `max` records or the log's end, waiting at
    /// most `timeout` for the first one.
    ///
    /// # Errors
    /// [`LogError::Sqlite`] when the file cannot be read.
    pub fn poll_into(&self, out: &mut Polled, max: usize, timeout: Duration) -> Result<PollOutcome, LogError> {
        let mut state = self.lock();
        {
            let end = self.shared.end.lock().unwrap_or_else(|p| p.into_inner());
            if *end <= state.next {
                let _ = self
                    .shared
                    .appended
                    .wait_timeout_while(end, timeout, |end| *end <= state.next)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        let ReaderState { conn, next } = &mut *state;
        let mut stmt = conn
            .prepare_cached(
                "SELECT base, count, records FROM batches \
                 WHERE base >= (SELECT coalesce(max(base), 0) FROM batches WHERE base <= ?1) \
                 ORDER BY base LIMIT 64",
            )
            .map_err(LogError::Sqlite)?;
        let mut rows = stmt.query([*next]).map_err(LogError::Sqlite)?;
        while let Some(row) = rows.next().map_err(LogError::Sqlite)? {
            let base: i64 = row.get(0).map_err(LogError::Sqlite)?;
            let count: i64 = row.get(1).map_err(LogError::Sqlite)?;
            if base + count <= *next {
                continue;
            }
            let records =
                row.get_ref(2).map_err(LogError::Sqlite)?.as_blob().map_err(|e| LogError::Sqlite(e.into()))?;
            if base > *next {
                // Deleted before they were read (the log was full); counted when they were deleted.
                *next = base;
            }
            let skip = (*next - base) as usize;
            if skip == 0 {
                out.records.extend_from_slice(records);
                out.positions.extend((base..base + count).map(|o| (0, o)));
            } else {
                for (i, item) in Delimited::new(records).enumerate().skip(skip) {
                    let Ok(bytes) = item else { break };
                    sluice_wire::push_delimited(&mut out.records, bytes);
                    out.positions.push((0, base + i as i64));
                }
            }
            *next = base + count;
            if out.positions.len() >= max {
                break;
            }
        }
        Ok(PollOutcome::default())
    }

    /// Records between the reader and the log's end.
    pub fn lag(&self) -> i64 {
        (self.shared.end() - self.lock().next).max(0)
    }

    /// Tells retention the store has committed everything below `next`.
    pub fn committed(&self, next: i64) {
        self.shared.committed.fetch_max(next, Ordering::SeqCst);
    }
}

/// The log at `path`, batch by batch in offset order from the batch holding `from`, read-only (a
/// writer may be appending): `visit(base, records)` gets each batch's first offset and its length-delimited records, until it
/// returns false. Returns the first offset the log holds (`None` when it is empty): above 0, records
/// before it were deleted.
///
/// # Errors
/// [`LogError::Sqlite`] when the file cannot be read.
pub fn read_batches(
    path: &Path,
    from: i64,
    mut visit: impl FnMut(i64, &[u8]) -> bool,
) -> Result<Option<i64>, LogError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| LogError::open(path, e))?;
    let first: Option<i64> =
        conn.query_row("SELECT min(base) FROM batches", [], |r| r.get(0)).map_err(LogError::Sqlite)?;
    let mut stmt = conn
        .prepare("SELECT base, records FROM batches WHERE base + count > ?1 ORDER BY base")
        .map_err(LogError::Sqlite)?;
    let mut rows = stmt.query([from]).map_err(LogError::Sqlite)?;
    while let Some(row) = rows.next().map_err(LogError::Sqlite)? {
        let base: i64 = row.get(0).map_err(LogError::Sqlite)?;
        let records = row.get_ref(1).map_err(LogError::Sqlite)?.as_blob().map_err(|e| LogError::Sqlite(e.into()))?;
        if !visit(base, records) {
            break;
        }
    }
    Ok(first)
}

/// Every record the log at `path` holds, with its offset, in order (for tools and tests).
///
/// # Errors
/// [`LogError::Sqlite`] when the file cannot be read.
pub fn read_all(path: &Path) -> Result<Vec<(i64, Vec<u8>)>, LogError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| LogError::open(path, e))?;
    let mut stmt = conn.prepare("SELECT base, records FROM batches ORDER BY base").map_err(LogError::Sqlite)?;
    let mut rows = stmt.query([]).map_err(LogError::Sqlite)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(LogError::Sqlite)? {
        let base: i64 = row.get(0).map_err(LogError::Sqlite)?;
        let records: Vec<u8> = row.get(1).map_err(LogError::Sqlite)?;
        for (i, item) in Delimited::new(&records).enumerate() {
            let Ok(bytes) = item else { break };
            out.push((base + i as i64, bytes.to_vec()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_wire::push_delimited;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("log.sqlite")
    }

    fn batch(from: u8, n: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for i in from..from + n {
            push_delimited(&mut out, &[i; 40]);
        }
        out
    }

    #[test]
    fn records_read_back_in_order_across_a_reopen() {
        let path = temp("order");
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let stats = Arc::new(ProducerStats::default());
        let writer = log.writer(stats.clone()).unwrap();
        assert_eq!(writer.send_records(&batch(0, 3)), 3);
        assert_eq!(writer.send_records(&batch(3, 2)), 2);
        writer.flush(Duration::from_secs(5)).unwrap();
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 5);
        let reader = log.reader().unwrap();
        reader.seek(Some(1), log.path()).unwrap();
        let mut polled = Polled::default();
        reader.poll_into(&mut polled, 100, Duration::from_millis(10)).unwrap();
        assert_eq!(polled.positions, (1..5).map(|o| (0, o)).collect::<Vec<_>>());
        let firsts: Vec<u8> = Delimited::new(&polled.records).map(|r| r.unwrap()[0]).collect();
        assert_eq!(firsts, [1, 2, 3, 4]);
        writer.close();
        drop((writer, reader, log));
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        assert_eq!(log.status().end, 5);
        assert_eq!(read_all(&path).unwrap().len(), 5);
    }

    #[test]
    fn marks_commit_with_their_batch_and_read_back_after_a_reopen() {
        let path = temp("marks");
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
        let file = |offset| FileMark {
            source: 3,
            identity: FileIdentity { path: "/rec.jsonl".into(), head_len: 10, head_sha256: [7; 32] },
            offset,
        };
        let letter = crate::handoff::DeadLetter {
            stage: Stage::Decode,
            source_id: 3,
            source: "rec",
            plugin: "binance",
            reason: "bad",
            bytes: b"x",
        };
        let first = Marks { trades: Marks::from_records([(3, 1, 10), (3, 2, 20)]).trades, files: vec![file(100)] };
        assert_eq!(writer.send_handover(Handover { records: &batch(0, 2), dead: &[letter], marks: first }), 2);
        // A later batch moves one symbol and the file on; the other symbol keeps its mark.
        let second = Marks { trades: Marks::from_records([(3, 2, 20), (3, 2, 25)]).trades, files: vec![file(250)] };
        writer.send_handover(Handover { records: &batch(2, 1), dead: &[], marks: second });
        writer.flush(Duration::from_secs(5)).unwrap();
        writer.close();
        drop((writer, log));
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let marks = log.marks().unwrap();
        let lasts: Vec<(u32, u32, u64)> = marks.trades.iter().map(|m| (m.source, m.symbol, m.last)).collect();
        assert_eq!(lasts, [(3, 1, 10), (3, 2, 25)]);
        assert!(marks.trades[1].was_seen(20) && marks.trades[1].was_seen(25) && !marks.trades[1].was_seen(21));
        assert_eq!(marks.files, [file(250)]);
        assert_eq!(read_all(&path).unwrap().len(), 3);
        let conn = Connection::open(&path).unwrap();
        let letters: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0)).unwrap();
        assert_eq!(letters, 1);
    }

    #[test]
    fn a_reader_wakes_on_a_commit_without_polling() {
        let path = temp("wake");
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
        let reader = log.reader().unwrap();
        reader.seek(None, log.path()).unwrap();
        let waiting = std::thread::spawn(move || {
            let mut polled = Polled::default();
            let started = Instant::now();
            reader.poll_into(&mut polled, 100, Duration::from_secs(10)).unwrap();
            (polled.positions.len(), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        let sent = Instant::now();
        writer.send_records(&batch(0, 4));
        let (n, waited) = waiting.join().unwrap();
        assert_eq!(n, 4);
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
        assert!(sent.elapsed() < Duration::from_secs(1), "{:?} from append to read", sent.elapsed());
    }

    #[test]
    fn a_store_ahead_of_its_log_is_refused_with_both_positions() {
        let path = temp("ahead");
        let log = LocalLog::open(&path, &LocalLogConfig::default()).unwrap();
        let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
        writer.send_records(&batch(0, 3));
        writer.flush(Duration::from_secs(5)).unwrap();
        assert!(log.check_position(Some(3)).is_ok());
        let err = log.check_position(Some(10)).unwrap_err();
        assert!(matches!(err, LogError::StoreAhead { store: 10, log_end: 3, .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("10") && text.contains('3') && text.contains("log.sqlite"), "{text}");
        let reader = log.reader().unwrap();
        assert!(matches!(reader.seek(Some(4), log.path()), Err(LogError::StoreAhead { store: 4, log_end: 3, .. })));
    }

    #[test]
    fn retention_deletes_committed_batches_and_keeps_uncommitted_ones() {
        let path = temp("retention");
        // Every batch is past its age at once; only the store's position holds them.
        let config = LocalLogConfig { retention_ms: 0, ..LocalLogConfig::default() };
        let log = LocalLog::open(&path, &config).unwrap();
        let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
        for i in 0..4 {
            writer.send_records(&batch(i * 10, 10));
            writer.flush(Duration::from_secs(5)).unwrap();
        }
        log.check_position(Some(20)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let mut appender = Appender {
            conn: connect(&path, &config).unwrap(),
            shared: log.shared.clone(),
            config: config.clone(),
            stats: Arc::new(ProducerStats::default()),
            last_prune: Instant::now(),
            path: path.clone(),
            failing: None,
            reserve: Reserve::new(&path, 0),
        };
        appender.prune();
        let left: Vec<i64> = read_all(&path).unwrap().into_iter().map(|(o, _)| o).collect();
        assert_eq!(left, (20..40).collect::<Vec<_>>());
        assert_eq!(log.status().start, 20);
        assert_eq!(log.dropped(), 0);
        // Over max_bytes, the oldest uncommitted batch goes too, counted.
        appender.config =
            LocalLogConfig { retention_ms: 0, retention_bytes: 0, max_bytes: 500, ..LocalLogConfig::default() };
        appender.prune();
        let left: Vec<i64> = read_all(&path).unwrap().into_iter().map(|(o, _)| o).collect();
        assert_eq!(left, (30..40).collect::<Vec<_>>());
        assert_eq!(log.dropped(), 10);
        // The end survives even when every row is gone.
        appender.config.max_bytes = 0;
        appender.prune();
        drop(appender);
        writer.close();
        assert_eq!(LocalLog::open(&path, &config).unwrap().status().end, 40);
    }
}
