//! Sinks: where rolled-up output goes. The [`embedded`] store is the default on one machine; the
//! [`druid`] sink writes rows to the Druid topic that a Druid Kafka supervisor ingests.
//!
//! Either way a batch of rows and the consumer offsets it covers are committed in one atomic step
//! ([`Sink::commit`]), which is what makes delivery exactly once.

pub mod druid;
pub mod embedded;
mod open;
pub mod replay;

pub use open::{Committed, SinkSettings, open, prepare, supervise};

pub use embedded::Row;

/// A record a transform refused (or that no plugin could take), committed with the batch its poll
/// belongs to: so it is dead-lettered exactly once, however often a failed batch is read again.
pub use crate::handoff::DeadLetter;

use crate::handoff::Reader;

/// One link's state changes, committed with the rows of the same polls (see
/// [`crate::transform::LinkState`]).
#[derive(Clone, Copy, Debug)]
pub struct StateWrite<'a> {
    /// The source whose chain the link is in.
    pub source: &'a str,
    /// The link's position in the chain, from 0.
    pub link: u32,
    /// The state format of the entries.
    pub format: &'a str,
    /// Delete the link's stored entries before writing `changes`.
    pub reset: bool,
    /// With `reset`: the keys of the stored entries, for a sink that deletes them one by one.
    pub dropped: &'a std::collections::BTreeSet<Vec<u8>>,
    /// Changed keys with their value now (`None`: removed).
    pub changes: &'a std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// A destination for the process role's rows.
pub trait Sink: Send {
    /// Positions `reader` where this sink's committed state says reading resumes.
    ///
    /// # Errors
    /// When the stored offsets cannot be read or the consumer refuses the assignment.
    fn attach(&mut self, reader: &Reader, partitions: i32) -> anyhow::Result<()>;

    /// Writes `rows`, the dead letters of the same polls, the chains' state changes and the offsets
    /// they cover (`(topic, partition, next offset)`) all or nothing. A sink that keeps transactions
    /// in flight ([`Sink::max_in_flight`] above 1) may return once the write is handed over: it is
    /// committed when [`Sink::settle`] says so, after every write handed over before it.
    ///
    /// # Errors
    /// When the write fails; nothing of it is visible then, and the caller must read the rows again
    /// from the last committed offsets.
    fn commit(
        &mut self,
        rows: &[Row],
        offsets: &[(&str, i32, i64)],
        dead: &[DeadLetter<'_>],
        state: &[StateWrite<'_>],
        reader: &Reader,
    ) -> anyhow::Result<()>;

    /// The state of link `link` of `source`'s chain as this sink committed it with its position: its
    /// format and entries, `None` when it holds none. After a commit whose outcome the sink could not
    /// report (a timeout while the broker committed), the state in memory may be behind the
    /// committed position: this is what the records after it start from.
    ///
    /// # Errors
    /// When the stored state cannot be read.
    fn committed_state(&mut self, source: &str, link: u32) -> anyhow::Result<Option<(String, embedded::StateEntries)>>;

    /// How many writes handed over by [`Sink::commit`] are not committed yet, after waiting until at
    /// most `keep` are. Writes commit in the order they were handed over.
    ///
    /// # Errors
    /// When a handed-over write failed: neither it nor any after it is committed, and the caller must
    /// read again from the last committed offsets (the writes before it are committed, and were
    /// reported as such by an earlier call).
    fn settle(&mut self, keep: usize) -> anyhow::Result<usize> {
        let _ = keep;
        Ok(0)
    }

    /// The most writes this sink has in flight at once: a further [`Sink::commit`] waits for the
    /// oldest to commit.
    fn max_in_flight(&self) -> usize {
        1
    }

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

impl Sink for embedded::EmbeddedStore {
    fn attach(&mut self, reader: &Reader, partitions: i32) -> anyhow::Result<()> {
        reader.assign(partitions, &self.offsets(reader.topic())?)?;
        Ok(())
    }

    fn commit(
        &mut self,
        rows: &[Row],
        offsets: &[(&str, i32, i64)],
        dead: &[DeadLetter<'_>],
        state: &[StateWrite<'_>],
        _reader: &Reader,
    ) -> anyhow::Result<()> {
        self.apply_state(rows, offsets, dead, state)?;
        Ok(())
    }

    fn committed_state(&mut self, source: &str, link: u32) -> anyhow::Result<Option<(String, embedded::StateEntries)>> {
        Ok(self.plugin_state(source, link)?)
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}
