//! The embedded store: rollups in SQLite (WAL mode) in the data directory, with the consumer offsets
//! written in the same transaction as the rows they produced, so a restart resumes exactly where the
//! store stands: nothing lost, nothing counted twice.
//!
//! The transform stage's dead letters go to the table `dead_letters` with their batch, and are kept
//! for their age and under their bytes ([`DeadLetterPolicy`]), checked at most once a minute.
//!
//! Rollup semantics follow the Druid spec sluice generates: rows are grouped per query-granularity
//! bucket and dimensions (source, symbol, side), with `events` (count), `qty_sum` and `notional_sum`
//! (double sums), `price_min`/`price_max`, and `price_first`/`price_last` by trade time. `qty_sum_e8`
//! repeats the quantity sum exactly, in fixed point.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("embedded store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A query that would change the store.
    #[error("only read-only queries are allowed")]
    NotReadOnly,
    /// A replay table name that is not allowed.
    #[error("replay table name {0:?}: use 1 to 40 of a-z, 0-9 and _")]
    BadName(String),
    /// The answer would be larger than a query may return.
    #[error(
        "the answer is larger than {limit} bytes (one value at most {value_limit} bytes); select fewer rows or columns"
    )]
    TooLarge {
        /// The budget of one answer.
        limit: usize,
        /// The largest single value.
        value_limit: usize,
    },
}

/// The most bytes one query answers with (values as text, numbers as 8), so the query slots bound
/// the memory queries can take.
pub const ANSWER_BYTES: usize = 8 << 20;
/// The largest string or blob SQLite makes on a query connection; a larger one fails inside SQLite,
/// before it is allocated.
pub const VALUE_BYTES: usize = 1 << 20;

/// One trade as the sinks see it: names resolved, values in fixed point. The one row type of the
/// process role, the sinks and replay: names are shared (`Arc<str>`), so a row costs no allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Trade time, ms since the epoch.
    pub timestamp_ms: i64,
    /// The source's name.
    pub source: std::sync::Arc<str>,
    /// The symbol as the venue writes it.
    pub symbol: std::sync::Arc<str>,
    /// True when the taker bought.
    pub is_buy: bool,
    /// Price, e8.
    pub price_e8: i64,
    /// Quantity, e8.
    pub volume_e8: i64,
    /// When the host read the frame it came from, microseconds since the Unix epoch (0: unknown,
    /// as for a replayed record), for the receive-to-commit latency.
    pub received_at_us: i64,
}

/// The next offset to read, per topic partition.
pub type Offsets = Vec<(String, i32, i64)>;

pub use crate::handoff::Positions;

/// The committed positions of `topic`'s partitions.
fn positions_of(conn: &Connection, topic: &str) -> Result<Positions, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT partition, next_offset FROM consumer_offsets WHERE topic = ?1")?;
    let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The store.
pub struct EmbeddedStore {
    conn: Connection,
    granularity_ms: i64,
    /// The upsert into the rollup table this store writes (`rollup`, or a replay's table).
    upsert: String,
    /// State checkpoints, when the process role asked for them, and when the last was taken.
    checkpoints: Option<(CheckpointPolicy, Option<std::time::Instant>)>,
    /// How long and how many bytes of dead letters are kept, and when they were last pruned.
    dead_letters: Option<(DeadLetterPolicy, Option<std::time::Instant>)>,
}

/// How the store keeps its dead letters: at most `max_bytes`, none older than `keep`.
#[derive(Clone, Copy, Debug)]
pub struct DeadLetterPolicy {
    /// Dead letters older than this are deleted.
    pub keep: Duration,
    /// The most bytes of dead letters kept, oldest deleted first.
    pub max_bytes: u64,
}

/// How often the store applies its [`DeadLetterPolicy`].
const DEAD_LETTER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The prefix of the tables a replay writes (`sluice replay --into NAME` writes `replay_NAME`).
pub const REPLAY_PREFIX: &str = "replay_";

/// Checks a replay table's name: 1 to 40 of `a-z`, `0-9` and `_`.
///
/// # Errors
/// A message saying what is allowed.
pub fn check_replay_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(format!("replay table name {name:?}: use 1 to 40 of a-z, 0-9 and _"))
    }
}

/// An aggregate of rows sharing a bucket and dimensions, before it is merged into the table.
#[derive(Clone, Debug)]
struct Agg {
    events: i64,
    qty_sum: f64,
    qty_sum_e8: i64,
    notional_sum: f64,
    price_min: f64,
    price_max: f64,
    price_first: f64,
    first_ms: i64,
    price_last: f64,
    last_ms: i64,
}

/// A link's state entries as the store keeps them: (key, value).
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollup (
    bucket_ms    INTEGER NOT NULL,
    source       TEXT    NOT NULL,
    symbol       TEXT    NOT NULL,
    side         TEXT    NOT NULL,
    events       INTEGER NOT NULL,
    qty_sum      REAL    NOT NULL,
    qty_sum_e8   INTEGER NOT NULL,
    notional_sum REAL    NOT NULL,
    price_min    REAL    NOT NULL,
    price_max    REAL    NOT NULL,
    price_first  REAL    NOT NULL,
    first_ms     INTEGER NOT NULL,
    price_last   REAL    NOT NULL,
    last_ms      INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, source, symbol, side)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumer_offsets (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plugin_state (
    source TEXT    NOT NULL,
    link   INTEGER NOT NULL,
    format TEXT    NOT NULL,
    key    BLOB    NOT NULL,
    value  BLOB    NOT NULL,
    PRIMARY KEY (source, link, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_checkpoints (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms     INTEGER NOT NULL,
    topic     TEXT    NOT NULL,
    positions TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint_state (
    checkpoint INTEGER NOT NULL,
    source     TEXT    NOT NULL,
    link       INTEGER NOT NULL,
    format     TEXT    NOT NULL,
    key        BLOB    NOT NULL,
    value      BLOB    NOT NULL,
    PRIMARY KEY (checkpoint, source, link, key)
) WITHOUT ROWID;
";

/// A copy of every link's committed state with the positions it belongs to: where a replay of a
/// stateful chain starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// When it was taken, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The next offset of each partition, as committed with the state.
    pub positions: Positions,
    /// Every stateful link's entries.
    pub entries: Vec<CheckpointEntry>,
}

/// One entry of a [`Checkpoint`]: (source, link, format, key, value).
pub type CheckpointEntry = (String, u32, String, Vec<u8>, Vec<u8>);

/// When the store takes state checkpoints, and how long it keeps them.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// At most one checkpoint per this long, taken with a commit that changed state.
    pub every: Duration,
    /// Checkpoints older than this are deleted, but for the newest of them.
    pub keep: Duration,
}

const UPSERT: &str = "
INSERT INTO rollup (bucket_ms, source, symbol, side, events, qty_sum, qty_sum_e8, notional_sum,
                    price_min, price_max, price_first, first_ms, price_last, last_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
ON CONFLICT (bucket_ms, source, symbol, side) DO UPDATE SET
    events       = events + excluded.events,
    qty_sum      = qty_sum + excluded.qty_sum,
    qty_sum_e8   = qty_sum_e8 + excluded.qty_sum_e8,
    notional_sum = notional_sum + excluded.notional_sum,
    price_min    = min(price_min, excluded.price_min),
    price_max    = max(price_max, excluded.price_max),
    price_first  = CASE WHEN excluded.first_ms < first_ms THEN excluded.price_first ELSE price_first END,
    first_ms     = min(first_ms, excluded.first_ms),
    price_last   = CASE WHEN excluded.last_ms >= last_ms THEN excluded.price_last ELSE price_last END,
    last_ms      = max(last_ms, excluded.last_ms)
";

impl EmbeddedStore {
    /// Opens (or creates) the store at `path` with rollup buckets of `granularity`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] when the file cannot be opened or the schema created.
    pub fn open(path: &Path, granularity: Duration) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        crate::handoff::dead_letters::create(&conn)?;
        let granularity_ms = i64::try_from(granularity.as_millis()).unwrap_or(i64::MAX).max(1);
        Ok(EmbeddedStore { conn, granularity_ms, upsert: UPSERT.to_owned(), checkpoints: None, dead_letters: None })
    }

    /// Keeps the dead letters by `policy`: applied with the first commit, then at most once a
    /// minute, in the commit's transaction.
    pub fn with_dead_letter_retention(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letters = Some((policy, None));
        self
    }

    /// Takes a checkpoint of every link's state with the commits that change state, at most once
    /// per `policy.every` (see [`Checkpoint`]).
    pub fn with_checkpoints(mut self, policy: CheckpointPolicy) -> Self {
        self.checkpoints = Some((policy, None));
        self
    }

    /// The newest checkpoint of `topic` that can start a replay whose first records are at `first`
    /// on a hand-off holding each partition from `held` (see
    /// [`checkpoint_fits`](crate::sink::replay::checkpoint_fits)).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn checkpoint_before(
        &self,
        topic: &str,
        first: &Positions,
        held: &Positions,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, at_ms, positions FROM state_checkpoints WHERE topic = ?1 ORDER BY id DESC")?;
        let mut rows = stmt.query([topic])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let positions: Positions = serde_json::from_str(&row.get::<_, String>(2)?).unwrap_or_default();
            if crate::sink::replay::checkpoint_fits(&positions, first, held) {
                let mut entries = self.conn.prepare(
                    "SELECT source, link, format, key, value FROM checkpoint_state WHERE checkpoint = ?1 \
                     ORDER BY source, link, key",
                )?;
                let entries = entries
                    .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Some(Checkpoint { at_ms: row.get(1)?, positions, entries }));
            }
        }
        Ok(None)
    }

    /// The positions of the oldest checkpoint of `topic` the hand-off, holding each partition from
    /// `held`, can still replay from (see [`checkpoint_held`](crate::sink::replay::checkpoint_held)),
    /// if any.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn oldest_checkpoint(&self, topic: &str, held: &Positions) -> Result<Option<Positions>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT positions FROM state_checkpoints WHERE topic = ?1 ORDER BY id")?;
        let mut rows = stmt.query([topic])?;
        while let Some(row) = rows.next()? {
            let positions: Positions = serde_json::from_str(&row.get::<_, String>(0)?).unwrap_or_default();
            if crate::sink::replay::checkpoint_held(&positions, held) {
                return Ok(Some(positions));
            }
        }
        Ok(None)
    }

    /// Opens the store at `path` to write rollups into the replay table `replay_<name>` (the
    /// `rollup` table's columns), made empty first: the live `rollup` is not written.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; a bad name is [`StoreError::NotReadOnly`]'s sibling, refused before
    /// anything is opened (see [`check_replay_name`]).
    pub fn open_replay(path: &Path, granularity: Duration, name: &str) -> Result<Self, StoreError> {
        check_replay_name(name).map_err(|_| StoreError::BadName(name.to_owned()))?;
        let mut store = EmbeddedStore::open(path, granularity)?;
        let table = format!("{REPLAY_PREFIX}{name}");
        let schema = SCHEMA.split("CREATE TABLE IF NOT EXISTS consumer_offsets").next().unwrap_or_default();
        store.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {table}; {}",
            schema.replacen("CREATE TABLE IF NOT EXISTS rollup", &format!("CREATE TABLE {table}"), 1)
        ))?;
        store.upsert = UPSERT.replacen("INSERT INTO rollup", &format!("INSERT INTO {table}"), 1);
        Ok(store)
    }

    /// Rolls `rows` up into the table this store writes, in one transaction, with no offsets.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; the transaction is rolled back.
    pub fn roll_up(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        self.apply_with(rows, &[], &[])
    }

    /// Replaces the `rollup` buckets from `since_ms` (inclusive) to `until_ms` (exclusive, `None`:
    /// all later ones) with those of this replay's table, in one transaction that holds the store's
    /// write lock, so the live role commits nothing in between: `tail(positions)` is given the live
    /// position of every partition of `topic` the live rows cover (the next offset they do not
    /// cover yet; a partition absent has no live rows) and returns the rows of the records between
    /// what the replay has read and those positions, which are rolled up with the rest first. Every
    /// record then counts once: below its partition's position through the replay, from it on
    /// through the live role. The replay table is dropped with the swap. Returns the positions.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], or `tail`'s error; nothing changes then.
    pub fn swap_into_rollup<E: From<StoreError>>(
        &mut self,
        table: &str,
        range: (i64, Option<i64>),
        topic: &str,
        tail: impl FnOnce(&Positions) -> Result<Vec<Row>, E>,
    ) -> Result<Positions, E> {
        let tx =
            self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(StoreError::from)?;
        let positions = positions_of(&tx, topic)?;
        let rows = tail(&positions)?;
        upsert_rows(&tx, &self.upsert, self.granularity_ms, &rows)?;
        let (since_ms, until_ms) = range;
        let until = until_ms.unwrap_or(i64::MAX);
        tx.execute("DELETE FROM rollup WHERE bucket_ms >= ?1 AND bucket_ms < ?2", params![since_ms, until])
            .map_err(StoreError::from)?;
        tx.execute_batch(&format!("INSERT INTO rollup SELECT * FROM {table}; DROP TABLE {table};"))
            .map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(positions)
    }

    /// The live position of every partition of `topic` the committed rows cover: the next offset
    /// they do not cover yet.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn live_positions(&self, topic: &str) -> Result<Positions, StoreError> {
        positions_of(&self.conn, topic)
    }

    /// Drops the replay table `replay_<name>`; false when there was none.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], or a bad name.
    pub fn drop_replay(path: &Path, name: &str) -> Result<bool, StoreError> {
        check_replay_name(name).map_err(|_| StoreError::BadName(name.to_owned()))?;
        let conn = Connection::open(path)?;
        let table = format!("{REPLAY_PREFIX}{name}");
        let exists: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [&table],
            |r| r.get(0),
        )?;
        if exists {
            conn.execute_batch(&format!("DROP TABLE {table}"))?;
        }
        Ok(exists)
    }

    /// The replay tables in the store at `path`, by name (without the prefix), with their rows.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn replay_tables(path: &Path) -> Result<Vec<(String, i64)>, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'replay\\_%' ESCAPE '\\' ORDER BY name",
        )?;
        let names: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for table in names {
            let rows: i64 = conn.query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| r.get(0))?;
            out.push((table.trim_start_matches(REPLAY_PREFIX).to_owned(), rows));
        }
        Ok(out)
    }

    /// Rolls `rows` up into the store and records `offsets` as consumed, in one transaction: either
    /// both land or neither does.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; the transaction is rolled back.
    pub fn apply(&mut self, rows: &[Row], offsets: &[(&str, i32, i64)]) -> Result<(), StoreError> {
        self.apply_with(rows, offsets, &[])
    }

    /// [`apply`](Self::apply), with the transform stage's dead letters of the same polls written to
    /// the table `dead_letters` in the same transaction.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; the transaction is rolled back.
    pub fn apply_with(
        &mut self,
        rows: &[Row],
        offsets: &[(&str, i32, i64)],
        dead: &[super::DeadLetter<'_>],
    ) -> Result<(), StoreError> {
        self.apply_state(rows, offsets, dead, &[])
    }

    /// [`apply_with`](Self::apply_with), and the chains' state changes in the same transaction.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`]; the transaction is rolled back.
    pub fn apply_state(
        &mut self,
        rows: &[Row],
        offsets: &[(&str, i32, i64)],
        dead: &[super::DeadLetter<'_>],
        state: &[super::StateWrite<'_>],
    ) -> Result<(), StoreError> {
        let checkpoint = match &self.checkpoints {
            Some((policy, last)) if !state.is_empty() && !offsets.is_empty() => {
                last.is_none_or(|at| at.elapsed() >= policy.every).then_some(*policy)
            }
            _ => None,
        };
        let tx = self.conn.transaction()?;
        {
            for s in state {
                if s.reset {
                    tx.prepare_cached("DELETE FROM plugin_state WHERE source = ?1 AND link = ?2")?
                        .execute(params![s.source, s.link])?;
                }
                let mut put = tx.prepare_cached(
                    "INSERT INTO plugin_state (source, link, format, key, value) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (source, link, key) DO UPDATE SET format = excluded.format, value = excluded.value",
                )?;
                let mut remove =
                    tx.prepare_cached("DELETE FROM plugin_state WHERE source = ?1 AND link = ?2 AND key = ?3")?;
                for (key, value) in s.changes {
                    match value {
                        Some(v) => put.execute(params![s.source, s.link, s.format, key, v])?,
                        None => remove.execute(params![s.source, s.link, key])?,
                    };
                }
            }
            upsert_rows(&tx, &self.upsert, self.granularity_ms, rows)?;
            let mut offset = tx.prepare_cached(
                "INSERT INTO consumer_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            )?;
            for (topic, partition, next) in offsets {
                offset.execute(params![topic, partition, next])?;
            }
            let at_ms = crate::clock::now_ms();
            for d in dead {
                crate::handoff::dead_letters::insert(&tx, at_ms, d, d.bytes.len())?;
            }
        }
        if let Some(policy) = checkpoint {
            take_checkpoint(&tx, offsets, policy)?;
        }
        let prune_dead = match &self.dead_letters {
            Some((policy, last)) => last.is_none_or(|at| at.elapsed() >= DEAD_LETTER_PRUNE_INTERVAL).then_some(*policy),
            None => None,
        };
        if let Some(policy) = prune_dead {
            let cutoff_ms = crate::clock::now_ms() - i64::try_from(policy.keep.as_millis()).unwrap_or(i64::MAX);
            let now = crate::handoff::dead_letters::size(&tx)?;
            crate::handoff::dead_letters::prune(&tx, cutoff_ms, now, policy.max_bytes)?;
        }
        tx.commit()?;
        if prune_dead.is_some()
            && let Some((_, last)) = &mut self.dead_letters
        {
            *last = Some(std::time::Instant::now());
        }
        if checkpoint.is_some()
            && let Some((_, last)) = &mut self.checkpoints
        {
            *last = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// The committed state of link `link` of `source`'s chain: its format and entries (`None` when
    /// the link has none).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn plugin_state(&self, source: &str, link: u32) -> Result<Option<(String, StateEntries)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT format, key, value FROM plugin_state WHERE source = ?1 AND link = ?2 ORDER BY key")?;
        let mut format = None;
        let mut entries = Vec::new();
        let mut rows = stmt.query(params![source, link])?;
        while let Some(row) = rows.next()? {
            format.get_or_insert(row.get::<_, String>(0)?);
            entries.push((row.get(1)?, row.get(2)?));
        }
        Ok(format.map(|f| (f, entries)))
    }

    /// The next offset to read per partition of `topic`, as last committed with the rows.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn offsets(&self, topic: &str) -> Result<Offsets, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE topic = ?1 ORDER BY partition",
        )?;
        let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Copies every link's committed state (inside `tx`, after this commit's changes) as a checkpoint
/// at the committed positions of `offsets`' topic (after this commit's), and deletes the checkpoints older than `policy.keep` but for the newest of them
/// (a replay of the oldest range the log still holds starts from it).
fn take_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    offsets: &[(&str, i32, i64)],
    policy: CheckpointPolicy,
) -> Result<(), StoreError> {
    let now = crate::clock::now_ms();
    // Every partition's committed position, not only those this commit moved: the state holds the
    // records of all of them up to there (a partition read before a restart, say).
    let topic = offsets[0].0;
    let positions = serde_json::to_string(&positions_of(tx, topic)?).unwrap_or_default();
    tx.prepare_cached("INSERT INTO state_checkpoints (at_ms, topic, positions) VALUES (?1, ?2, ?3)")?
        .execute(params![now, topic, positions])?;
    let id = tx.last_insert_rowid();
    tx.prepare_cached("INSERT INTO checkpoint_state SELECT ?1, source, link, format, key, value FROM plugin_state")?
        .execute([id])?;
    let cutoff = now - i64::try_from(policy.keep.as_millis()).unwrap_or(i64::MAX);
    let oldest_kept = "(SELECT coalesce(max(id), 0) FROM state_checkpoints WHERE at_ms < ?1)";
    tx.prepare_cached(&format!("DELETE FROM checkpoint_state WHERE checkpoint < {oldest_kept}"))?.execute([cutoff])?;
    tx.prepare_cached(&format!("DELETE FROM state_checkpoints WHERE id < {oldest_kept}"))?.execute([cutoff])?;
    Ok(())
}

/// Rolls `rows` up into buckets of `granularity_ms` and upserts them with `upsert`, inside `tx`.
fn upsert_rows(
    tx: &rusqlite::Transaction<'_>,
    upsert: &str,
    granularity_ms: i64,
    rows: &[Row],
) -> Result<(), StoreError> {
    // Every row is hashed here: a fast hash, not SipHash. Its keys are symbol names the dictionary
    // admitted (at most `max_symbols` per plugin), so a batch has few groups whatever the names.
    let mut groups: HashMap<(i64, &str, &str, bool), Agg, rustc_hash::FxBuildHasher> = HashMap::default();
    for r in rows {
        let bucket = r.timestamp_ms.div_euclid(granularity_ms) * granularity_ms;
        let price = r.price_e8 as f64 / 1e8;
        let qty = r.volume_e8 as f64 / 1e8;
        let agg = groups.entry((bucket, &*r.source, &*r.symbol, r.is_buy)).or_insert(Agg {
            events: 0,
            qty_sum: 0.0,
            qty_sum_e8: 0,
            notional_sum: 0.0,
            price_min: price,
            price_max: price,
            price_first: price,
            first_ms: r.timestamp_ms,
            price_last: price,
            last_ms: r.timestamp_ms,
        });
        agg.events += 1;
        agg.qty_sum += qty;
        agg.qty_sum_e8 = agg.qty_sum_e8.saturating_add(r.volume_e8);
        agg.notional_sum += price * qty;
        agg.price_min = agg.price_min.min(price);
        agg.price_max = agg.price_max.max(price);
        if r.timestamp_ms < agg.first_ms {
            (agg.first_ms, agg.price_first) = (r.timestamp_ms, price);
        }
        if r.timestamp_ms >= agg.last_ms {
            (agg.last_ms, agg.price_last) = (r.timestamp_ms, price);
        }
    }
    let mut upsert = tx.prepare_cached(upsert)?;
    for ((bucket, source, symbol, is_buy), a) in &groups {
        upsert.execute(params![
            bucket,
            source,
            symbol,
            if *is_buy { "buy" } else { "sell" },
            a.events,
            a.qty_sum,
            a.qty_sum_e8,
            a.notional_sum,
            a.price_min,
            a.price_max,
            a.price_first,
            a.first_ms,
            a.price_last,
            a.last_ms
        ])?;
    }
    Ok(())
}

/// The next offset per partition of `topic` the store at `path` has committed, read without writing
/// (for `/v1/log`).
///
/// # Errors
/// [`StoreError::Sqlite`] when the file cannot be read.
pub fn stored_offsets(path: &Path, topic: &str) -> Result<Offsets, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let mut stmt =
        conn.prepare("SELECT topic, partition, next_offset FROM consumer_offsets WHERE topic = ?1 ORDER BY partition")?;
    let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The rows and bytes of the dead letters in the store at `path`, read without writing (for
/// `/v1/log`).
///
/// # Errors
/// [`StoreError::Sqlite`] when the file cannot be read.
pub fn stored_dead_letters(path: &Path) -> Result<crate::handoff::dead_letters::TableSize, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    Ok(crate::handoff::dead_letters::size(&conn)?)
}

/// A page of the dead letters in the store at `path`, newest first, read without writing (for
/// `/v1/dead-letters`).
///
/// # Errors
/// [`StoreError::Sqlite`] when the file cannot be read.
pub fn read_dead_letters(
    path: &Path,
    of: crate::handoff::dead_letters::PageOf<'_>,
) -> Result<Vec<crate::handoff::dead_letters::StoredDeadLetter>, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(crate::handoff::dead_letters::page(&conn, of)?)
}

/// Answers read-only SQL over the store as JSON rows, through its own read-only connection.
pub struct QueryConnection {
    conn: Connection,
}

/// The answer to a query, shaped as a table: rows keep the statement's column order, and duplicate
/// column names (`SELECT 1 AS a, 2 AS a`) survive, which a JSON object per row could not keep.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct QueryResult {
    /// Column names, in the statement's order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column: integers and text as they are, reals as JSON numbers
    /// (NaN and infinities as `null`), blobs as their length in bytes.
    pub rows: Vec<Vec<serde_json::Value>>,
    /// True when the statement had more rows than the limit let through.
    pub truncated: bool,
}

impl QueryConnection {
    /// Opens the store at `path` read-only. ATTACH is refused on this connection, so its queries
    /// read the store and no other database file.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] when it does not exist or cannot be opened.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, VALUE_BYTES as i32)?;
        Ok(QueryConnection { conn })
    }

    /// A handle that stops this connection's running statement from another thread; the statement
    /// then fails with SQLite's `SQLITE_INTERRUPT`. Used to bound how long a query may run.
    pub fn interrupt_handle(&self) -> rusqlite::InterruptHandle {
        self.conn.get_interrupt_handle()
    }

    /// Runs one read-only statement and returns at most `limit` rows, each a JSON object with the
    /// columns in the statement's order (a later duplicate column name replaces an earlier one).
    ///
    /// # Errors
    /// As [`QueryConnection::query_table`].
    pub fn query(
        &self,
        sql: &str,
        limit: usize,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, StoreError> {
        let table = self.query_table(sql, limit)?;
        let columns = table.columns;
        Ok(table.rows.into_iter().map(|row| columns.iter().cloned().zip(row).collect()).collect())
    }

    /// Runs one read-only statement and returns at most `limit` rows as a table, saying whether more
    /// rows were left unread.
    ///
    /// # Errors
    /// [`StoreError::NotReadOnly`] for anything that would write (checked by SQLite on the prepared
    /// statement, and refused by the read-only connection anyway), or the SQL error (more than one
    /// statement is an error too).
    pub fn query_table(&self, sql: &str, limit: usize) -> Result<QueryResult, StoreError> {
        use rusqlite::types::ValueRef;
        let mut stmt = self.conn.prepare(sql)?;
        if !stmt.readonly() {
            return Err(StoreError::NotReadOnly);
        }
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let mut rows = stmt.query([])?;
        let mut out = QueryResult { columns, rows: Vec::new(), truncated: false };
        let too_large = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::TooBig) => StoreError::TooLarge { limit: ANSWER_BYTES, value_limit: VALUE_BYTES },
            _ => StoreError::Sqlite(e),
        };
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(too_large)? {
            if out.rows.len() >= limit {
                out.truncated = true;
                break;
            }
            let mut values = Vec::with_capacity(out.columns.len());
            for i in 0..out.columns.len() {
                values.push(match row.get_ref(i)? {
                    ValueRef::Null => serde_json::Value::Null,
                    ValueRef::Integer(n) => n.into(),
                    ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into),
                    ValueRef::Text(t) => {
                        bytes += t.len();
                        if bytes > ANSWER_BYTES {
                            return Err(StoreError::TooLarge { limit: ANSWER_BYTES, value_limit: VALUE_BYTES });
                        }
                        String::from_utf8_lossy(t).into_owned().into()
                    }
                    ValueRef::Blob(b) => b.len().into(),
                });
                bytes += 8;
            }
            if bytes > ANSWER_BYTES {
                return Err(StoreError::TooLarge { limit: ANSWER_BYTES, value_limit: VALUE_BYTES });
            }
            out.rows.push(values);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("sluice-store-{}-{name}.db", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn trade(ts: i64, symbol: &str, is_buy: bool, price: i64, qty: i64) -> Row {
        let (source, symbol) = ("binance".into(), symbol.into());
        Row { timestamp_ms: ts, source, symbol, is_buy, price_e8: price, volume_e8: qty, received_at_us: 0 }
    }

    /// The store's dead letters are kept under their bytes and for their age (before, never
    /// pruned); a store written before the caps gets the columns they need.
    #[test]
    fn dead_letters_are_kept_under_their_bytes_and_for_their_age() {
        use crate::handoff::{DeadLetter, Stage};
        let path = temp("dead-letters");
        // A table as it was before the caps, with a row in it.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, \
             stage TEXT NOT NULL, source TEXT NOT NULL, plugin TEXT NOT NULL, reason TEXT NOT NULL, bytes BLOB NOT NULL); \
             INSERT INTO dead_letters (at_ms, stage, source, plugin, reason, bytes) VALUES (1, 'transform', 's', 'p', 'old', x'0102');",
        )
        .unwrap();
        drop(old);
        let keep_all = DeadLetterPolicy { keep: Duration::from_secs(3600), max_bytes: 20_000 };
        let mut store =
            EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap().with_dead_letter_retention(keep_all);
        let old = crate::handoff::dead_letters::size(&store.conn).unwrap();
        assert_eq!((old.rows, old.bytes), (1, 2 + 3 + 1 + 1));
        let payload = vec![7u8; 990];
        let reasons: Vec<String> = (0..50).map(|i| format!("r{i:08}")).collect();
        let dead: Vec<DeadLetter<'_>> = reasons
            .iter()
            .map(|reason| DeadLetter {
                stage: Stage::Transform,
                source_id: 1,
                source: "s",
                plugin: "",
                reason,
                bytes: &payload,
            })
            .collect();
        store.apply_with(&[], &[("t", 0, 1)], &dead).unwrap();
        // 50 of 1,000 bytes, and the old row (older than an hour): what is left fits in 20,000,
        // newest kept.
        let size = crate::handoff::dead_letters::size(&store.conn).unwrap();
        assert_eq!((size.rows, size.bytes), (20, 20_000));
        let first: String = store.conn.query_row("SELECT min(reason) FROM dead_letters", [], |r| r.get(0)).unwrap();
        assert_eq!(first, "r00000030");
        // Kept for no time at all: the next pass (a new store, so it runs at its first commit) deletes
        // every older one.
        drop(store);
        std::thread::sleep(Duration::from_millis(5));
        let keep_none = DeadLetterPolicy { keep: Duration::ZERO, max_bytes: 20_000 };
        let mut store =
            EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap().with_dead_letter_retention(keep_none);
        store.apply_with(&[], &[("t", 0, 2)], &[]).unwrap();
        assert_eq!(crate::handoff::dead_letters::size(&store.conn).unwrap().rows, 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn rollups_match_druid_semantics_across_batches() {
        let path = temp("rollup");
        let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
        // Minute 0: three buys over two batches, out of time order; one sell. Minute 1: one buy.
        store
            .apply(
                &[
                    trade(30_000, "BTCUSDT", true, 100_00000000, 1_00000000),
                    trade(59_999, "BTCUSDT", false, 90_00000000, 2_00000000),
                ],
                &[("t", 0, 2)],
            )
            .unwrap();
        store
            .apply(
                &[
                    trade(10_000, "BTCUSDT", true, 110_00000000, 50000000),
                    trade(40_000, "BTCUSDT", true, 105_00000000, 25000000),
                    trade(60_000, "BTCUSDT", true, 120_00000000, 1),
                ],
                &[("t", 0, 5)],
            )
            .unwrap();
        let q = QueryConnection::open(&path).unwrap();
        let rows = q
            .query(
                "SELECT bucket_ms, side, events, qty_sum, qty_sum_e8, notional_sum, price_min, price_max, price_first, price_last
                 FROM rollup ORDER BY bucket_ms, side",
                100,
            )
            .unwrap();
        assert_eq!(rows.len(), 3);
        let buy0 = &rows[0];
        assert_eq!(buy0["bucket_ms"], 0);
        assert_eq!(buy0["side"], "buy");
        assert_eq!(buy0["events"], 3);
        assert_eq!(buy0["qty_sum_e8"], 1_75000000i64);
        assert_eq!(buy0["qty_sum"], 1.75);
        assert_eq!(buy0["notional_sum"], 100.0 + 55.0 + 26.25);
        assert_eq!((buy0["price_min"].clone(), buy0["price_max"].clone()), (100.0.into(), 110.0.into()));
        // First and last by trade time, not by arrival.
        assert_eq!((buy0["price_first"].clone(), buy0["price_last"].clone()), (110.0.into(), 105.0.into()));
        assert_eq!(rows[1]["side"], "sell");
        assert_eq!(rows[2]["bucket_ms"], 60_000);
        assert_eq!(store.offsets("t").unwrap(), vec![("t".to_string(), 0, 5)]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn offsets_commit_with_the_rows_or_not_at_all() {
        let path = temp("atomic");
        let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
        store.apply(&[trade(1, "A", true, 1, 1)], &[("t", 0, 1)]).unwrap();
        // Make the next transaction fail after the upserts: an offsets row that violates a constraint.
        store.conn.execute_batch("CREATE TRIGGER no_big BEFORE UPDATE ON consumer_offsets WHEN NEW.next_offset > 100 BEGIN SELECT RAISE(ABORT, 'boom'); END;").unwrap();
        assert!(store.apply(&[trade(2, "A", true, 1, 1)], &[("t", 0, 101)]).is_err());
        let q = QueryConnection::open(&path).unwrap();
        assert_eq!(q.query("SELECT events FROM rollup", 10).unwrap()[0]["events"], 1);
        assert_eq!(store.offsets("t").unwrap(), vec![("t".to_string(), 0, 1)]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn checkpoints_copy_the_state_with_its_position_and_the_newest_before_a_position_is_found() {
        let path = temp("checkpoints");
        let policy = CheckpointPolicy { every: Duration::ZERO, keep: Duration::from_secs(3600) };
        let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap().with_checkpoints(policy);
        let changes = |v: u8| std::collections::BTreeMap::from([(vec![1], Some(vec![v]))]);
        for (position, value) in [(10, 1u8), (20, 2), (30, 3)] {
            let c = changes(value);
            let none = Default::default();
            let write = crate::sink::StateWrite {
                source: "s",
                link: 0,
                format: "f@1",
                reset: false,
                dropped: &none,
                changes: &c,
            };
            store.apply_state(&[], &[("t", 0, position)], &[], &[write]).unwrap();
        }
        // A commit that changes no state takes no checkpoint.
        store.apply_state(&[], &[("t", 0, 40)], &[], &[]).unwrap();
        let held = |p| Positions::from([(0, p)]);
        let at = |p| {
            let found = store.checkpoint_before("t", &Positions::from([(0, p)]), &held(0)).unwrap();
            found.map(|c| (c.positions[&0], c.entries[0].4.clone()))
        };
        assert_eq!(at(25), Some((20, vec![2])));
        assert_eq!(at(45), Some((30, vec![3])));
        assert_eq!(at(9), None);
        // One the log no longer holds the records after is passed over.
        let found = store.checkpoint_before("t", &Positions::from([(0, 25)]), &held(15)).unwrap();
        assert_eq!(found.map(|c| c.positions[&0]), Some(20));
        assert_eq!(store.checkpoint_before("t", &Positions::from([(0, 15)]), &held(15)).unwrap(), None);
        assert_eq!(store.oldest_checkpoint("t", &held(0)).unwrap(), Some(held(10)));
        assert_eq!(store.oldest_checkpoint("t", &held(15)).unwrap(), Some(held(20)));
        assert_eq!(store.oldest_checkpoint("t", &held(31)).unwrap(), None);
        // A commit that moves partition 1 alone: the checkpoint names partition 0's committed
        // position too, which the state holds the records up to.
        let (c, none) = (changes(4), Default::default());
        let write =
            crate::sink::StateWrite { source: "s", link: 0, format: "f@1", reset: false, dropped: &none, changes: &c };
        store.apply_state(&[], &[("t", 1, 5)], &[], &[write]).unwrap();
        let found = store.checkpoint_before("t", &Positions::from([(0, 50), (1, 5)]), &held(0)).unwrap().unwrap();
        assert_eq!((found.positions, found.entries[0].4.clone()), (Positions::from([(0, 40), (1, 5)]), vec![4]));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn queries_are_read_only() {
        let path = temp("readonly");
        let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
        store.apply(&[trade(1, "A", true, 1, 1)], &[]).unwrap();
        let q = QueryConnection::open(&path).unwrap();
        for sql in [
            "DELETE FROM rollup",
            "UPDATE rollup SET events = 0",
            "DROP TABLE rollup",
            "INSERT INTO consumer_offsets VALUES ('x', 0, 0)",
        ] {
            assert!(matches!(q.query(sql, 10), Err(StoreError::NotReadOnly)), "{sql}");
        }
        assert!(matches!(q.query("SELEC nonsense", 10), Err(StoreError::Sqlite(_))));
        assert_eq!(q.query("SELECT count(*) AS n FROM rollup", 10).unwrap()[0]["n"], 1);
        assert_eq!(q.query("SELECT * FROM rollup", 0).unwrap().len(), 0);
        // Columns keep the statement's order.
        let row = q.query("SELECT 1 AS z, 2 AS a", 1).unwrap().remove(0);
        assert_eq!(row.keys().collect::<Vec<_>>(), ["z", "a"]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn tables_keep_columns_and_say_when_rows_were_cut() {
        let path = temp("table");
        let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
        store.apply(&[trade(1, "A", true, 1, 1), trade(2, "B", true, 1, 1), trade(3, "C", true, 1, 1)], &[]).unwrap();
        let q = QueryConnection::open(&path).unwrap();
        let sql = "SELECT symbol, events AS a, 'x' AS a FROM rollup ORDER BY symbol";
        let all = q.query_table(sql, 3).unwrap();
        assert_eq!(all.columns, ["symbol", "a", "a"]);
        assert_eq!(all.rows[2], [serde_json::json!("C"), 1.into(), "x".into()]);
        assert!(!all.truncated);
        let cut = q.query_table(sql, 2).unwrap();
        assert_eq!((cut.rows.len(), cut.truncated), (2, true));
        let none = q.query_table(sql, 0).unwrap();
        assert_eq!((none.rows.len(), none.truncated), (0, true));
        let empty = q.query_table("SELECT * FROM rollup WHERE 0", 0).unwrap();
        assert_eq!((empty.columns.len(), empty.truncated), (14, false));
        // One statement only, and no other database file can be attached.
        assert!(matches!(q.query_table("SELECT 1; SELECT 2", 10), Err(StoreError::Sqlite(_))));
        let other = temp("table-other");
        drop(EmbeddedStore::open(&other, Duration::from_secs(60)).unwrap());
        let attach = format!("ATTACH DATABASE '{}' AS other", other.display());
        assert!(matches!(q.query_table(&attach, 10), Err(StoreError::Sqlite(_))));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&other);
    }
}
