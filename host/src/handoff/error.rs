//! Why the hand-off failed, whichever is behind it.

use std::path::PathBuf;
use std::time::Duration;

use crate::handoff::kafka::KafkaError;

/// Why the hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// SQLite refused.
    #[error("local log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The log file cannot be opened.
    #[error("local log {path}: {error}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        error: rusqlite::Error,
    },
    /// A file or thread could not be set up.
    #[error("local log: {0}")]
    Io(String),
    /// The store has read past the end of the log it is attached to.
    #[error(
        "the store's position {store} is ahead of the end {log_end} of the local log {log}: the log was deleted \
         or restored from an older copy, or lost its last commits in a power cut with [local_log] synchronous = \
         \"normal\"; reading it from the start would count records twice. Restore the matching log, or, when \
         the log only lost its tail (the store already counted those records), start once with \
         `sluice run --resume-past-lost-log-tail` to go on appending from the store's position"
    )]
    StoreAhead {
        /// The store's next offset.
        store: i64,
        /// The log's next offset.
        log_end: i64,
        /// The log file.
        log: PathBuf,
    },
    /// A committed Kafka offset outside the partition's range.
    #[error(
        "the store's position {store} in {topic} partition {partition} is ahead of the partition's end {high}: \
         the topic was deleted or recreated; reading it from the start would count records twice"
    )]
    OffsetAhead {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The store's next offset.
        store: i64,
        /// The partition's high watermark.
        high: i64,
    },
    /// The topic's retention deleted records before the process role read them: its position in a
    /// partition is before the partition's start. The role stops rather than jump over them.
    #[error(
        "the process role's position in {topic} is before the start of {}: the topic's retention deleted \
         {} records before they were read. sluice stops rather than skip them; {way_out}, and raise the \
         topic's retention.ms so it does not happen again",
        deleted_ranges(deleted), deleted.iter().map(|d| d.start - d.position).sum::<i64>()
    )]
    RecordsDeleted {
        /// The topic.
        topic: String,
        /// Each partition the role stands before the start of.
        deleted: Vec<Deleted>,
        /// What an operator does to go on from the partitions' start, accepting the loss.
        way_out: String,
    },
    /// The topic has fewer partitions than configured.
    #[error(
        "{topic} has {actual} partitions but [kafka] partitions is {configured}: create the topic with \
         {configured} or set partitions to {actual}"
    )]
    FewerPartitions {
        /// The topic.
        topic: String,
        /// `[kafka] partitions`.
        configured: i32,
        /// What the cluster says.
        actual: i32,
    },
    /// The local log cannot commit (a full disk, say): it holds its last batch and refuses new
    /// records, counted, until it can.
    #[error("the local log cannot commit ({0}): it refuses new records until it can")]
    Refusing(&'static str),
    /// Appends had not committed in time.
    #[error("the local log had not committed everything within {0:?}")]
    FlushTimeout(Duration),
    /// Kafka refused.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// Records of one partition deleted before they were read: from the reader's `position` up to the
/// partition's `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The partition.
    pub partition: i32,
    /// The next offset the reader was to read.
    pub position: i64,
    /// The first offset the partition still holds.
    pub start: i64,
}

fn deleted_ranges(deleted: &[Deleted]) -> String {
    let ranges: Vec<String> = deleted
        .iter()
        .map(|d| format!("partition {} (position {}, start {})", d.partition, d.position, d.start))
        .collect();
    ranges.join(", ")
}

impl LogError {
    pub(crate) fn open(path: &std::path::Path, error: rusqlite::Error) -> Self {
        LogError::Open { path: path.to_owned(), error }
    }
}
