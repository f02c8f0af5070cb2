//! The `dead_letters` table, the same wherever it is kept: decode dead letters in the local log,
//! transform dead letters in the embedded store (committed with their batch).
//!
//! A row keeps the payload and the reason as capped ([`DeadLetter::kept_bytes`],
//! [`DeadLetter::kept_reason`]), the payload's original `length`, and its `size` in bytes (kept
//! payload, reason and names), which retention bounds ([`prune`]): rows older than a cutoff go, then
//! the oldest until the table is under its bytes. The index on `(at_ms, id, size)` lets both, and
//! [`size`], read the index alone, never the payloads.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::DeadLetter;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms     INTEGER NOT NULL,
    stage     TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    plugin    TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    length    INTEGER NOT NULL DEFAULT 0,
    size      INTEGER NOT NULL DEFAULT 0,
    bytes     BLOB    NOT NULL
);
";

/// Rows and bytes of a table, as `GET /v1/log` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TableSize {
    /// Rows.
    pub rows: u64,
    /// Bytes they keep (for dead letters, their `size` column; for symbols, the names).
    pub bytes: u64,
}

/// Creates the table, or brings one written before the caps up to date: the `length` and `size`
/// columns (filled from the rows), and the index retention reads.
///
/// # Errors
/// SQLite's.
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let has_size: bool =
        conn.query_row("SELECT count(*) > 0 FROM pragma_table_info('dead_letters') WHERE name = 'size'", [], |r| {
            r.get(0)
        })?;
    if !has_size {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE dead_letters ADD COLUMN length INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE dead_letters ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
             UPDATE dead_letters SET length = length(bytes), size = length(bytes) + length(CAST(reason AS BLOB))
                 + length(CAST(source AS BLOB)) + length(CAST(plugin AS BLOB));
             COMMIT;",
        )?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS dead_letters_age ON dead_letters (at_ms, id, size);
         DROP INDEX IF EXISTS dead_letters_at;",
    )
}

/// Inserts `letter` as dead at `at_ms`, capped, with `length` as its payload's original length
/// (the letter may have been capped already). Returns the bytes the row keeps.
///
/// # Errors
/// SQLite's.
pub(crate) fn insert(conn: &Connection, at_ms: i64, letter: &DeadLetter<'_>, length: usize) -> rusqlite::Result<u64> {
    let size = letter.kept_size() as u64;
    conn.prepare_cached(
        "INSERT INTO dead_letters (at_ms, stage, source, plugin, reason, length, size, bytes) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        at_ms,
        letter.stage.as_str(),
        letter.source,
        letter.plugin,
        letter.kept_reason(),
        length as i64,
        size as i64,
        letter.kept_bytes()
    ])?;
    Ok(size)
}

/// The table's rows and bytes.
///
/// # Errors
/// SQLite's.
pub fn size(conn: &Connection) -> rusqlite::Result<TableSize> {
    conn.query_row("SELECT count(*), coalesce(sum(size), 0) FROM dead_letters", [], |r| {
        Ok(TableSize { rows: r.get::<_, i64>(0)?.max(0) as u64, bytes: r.get::<_, i64>(1)?.max(0) as u64 })
    })
}

/// Deletes the rows older than `cutoff_ms`, then the oldest until the table (`now`, as it stands)
/// keeps at most `max_bytes`. Returns what was deleted.
///
/// # Errors
/// SQLite's.
pub(crate) fn prune(conn: &Connection, cutoff_ms: i64, now: TableSize, max_bytes: u64) -> rusqlite::Result<TableSize> {
    let size_of = |r: &rusqlite::Row<'_>| -> rusqlite::Result<TableSize> {
        Ok(TableSize { rows: r.get::<_, i64>(0)?.max(0) as u64, bytes: r.get::<_, i64>(1)?.max(0) as u64 })
    };
    let mut gone = conn
        .prepare_cached("SELECT count(*), coalesce(sum(size), 0) FROM dead_letters WHERE at_ms < ?1")?
        .query_row([cutoff_ms], size_of)?;
    if gone.rows > 0 {
        conn.prepare_cached("DELETE FROM dead_letters WHERE at_ms < ?1")?.execute([cutoff_ms])?;
    }
    let mut over = now.bytes.saturating_sub(gone.bytes).saturating_sub(max_bytes);
    if over == 0 {
        return Ok(gone);
    }
    // The oldest first, along the index: the last row that has to go.
    let mut last = None;
    {
        let mut oldest = conn.prepare_cached("SELECT at_ms, id, size FROM dead_letters ORDER BY at_ms, id")?;
        let mut rows = oldest.query([])?;
        while over > 0 {
            let Some(row) = rows.next()? else { break };
            let (at_ms, id, size): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let size = size.max(0) as u64;
            over = over.saturating_sub(size);
            gone = TableSize { rows: gone.rows + 1, bytes: gone.bytes + size };
            last = Some((at_ms, id));
        }
    }
    if let Some((at_ms, id)) = last {
        conn.prepare_cached("DELETE FROM dead_letters WHERE at_ms < ?1 OR (at_ms = ?1 AND id <= ?2)")?
            .execute(params![at_ms, id])?;
    }
    Ok(gone)
}

/// A dead letter as the table keeps it, for the dead-letter view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDeadLetter {
    /// The row's id: larger is newer.
    pub id: i64,
    /// When it was committed, in Unix milliseconds.
    pub at_ms: i64,
    /// The stage that refused it (`decode`, `transform`).
    pub stage: String,
    /// The source's name.
    pub source: String,
    /// The plugin that refused it, `name@version` (empty when none is bound).
    pub plugin: String,
    /// Why.
    pub reason: String,
    /// The payload's original length (it may be cut).
    pub length: u64,
    /// The payload as kept.
    pub bytes: Vec<u8>,
}

/// Which dead letters [`page`] reads: newest first, of one source and one link (a plugin's name, any
/// version) if given, with ids below `before` if given, at most `limit`.
#[derive(Clone, Copy, Debug)]
pub struct PageOf<'a> {
    /// Only this source's.
    pub source: Option<&'a str>,
    /// Only those this plugin refused, whichever its version.
    pub link: Option<&'a str>,
    /// Only rows older than this id (the `next_before` of the page before).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// One page of dead letters, newest first (along the primary key: no sort).
///
/// # Errors
/// SQLite's.
pub fn page(conn: &Connection, of: PageOf<'_>) -> rusqlite::Result<Vec<StoredDeadLetter>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, stage, source, plugin, reason, length, bytes FROM dead_letters \
         WHERE (?1 IS NULL OR source = ?1) \
           AND (?2 IS NULL OR plugin = ?2 OR substr(plugin, 1, length(?2) + 1) = ?2 || '@') \
           AND id < coalesce(?3, 9223372036854775807) \
         ORDER BY id DESC LIMIT ?4",
    )?;
    let limit = i64::try_from(of.limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![of.source, of.link, of.before, limit], |r| {
        Ok(StoredDeadLetter {
            id: r.get(0)?,
            at_ms: r.get(1)?,
            stage: r.get(2)?,
            source: r.get(3)?,
            plugin: r.get(4)?,
            reason: r.get(5)?,
            length: r.get::<_, i64>(6)?.max(0) as u64,
            bytes: r.get(7)?,
        })
    })?;
    rows.collect()
}
