//! The batch loop between the host's calls and a [`Plugin`]'s per-frame and per-record methods.
//!
//! The same code runs inside the wasm component and under [`testing::Harness`](crate::testing::Harness),
//! so a plugin's native tests exercise exactly what the host will run.

use crate::state::{Changes, Entries};
use crate::{Config, Plugin, Reason};
use sluice_wire::{Delimited, Records, StreamDataView};

/// Runs a plugin over batches. Exported for [`export!`](crate::export) and benchmarks; plugin authors
/// use [`testing::Harness`](crate::testing::Harness) instead.
pub struct Runner<P> {
    /// `None` until `init` succeeds; calls before that reject everything.
    plugin: Option<P>,
    /// Output of the last call, reused between calls.
    out: Records,
    /// Records per frame of the last `decode`.
    counts: Vec<u32>,
    /// Rejected inputs of the last call, by index.
    rejects: Vec<(u32, Reason)>,
}

impl<P: Plugin> Default for Runner<P> {
    fn default() -> Self {
        Self::new()
    }
}

const NOT_INITIALISED: &str = "plugin is not initialised";

impl<P: Plugin> Runner<P> {
    /// A runner with no plugin yet.
    pub fn new() -> Self {
        Runner { plugin: None, out: Records::new(), counts: Vec::new(), rejects: Vec::new() }
    }

    /// Builds the plugin from its configuration, replacing any earlier one.
    ///
    /// # Errors
    /// The plugin's [`Reason`] when its `init` fails.
    /// Fails too when the plugin's [`STATE_FORMAT`](Plugin::STATE_FORMAT) is not `name@version`, or
    /// is set without a [`state`](Plugin::state) (or the other way round).
    pub fn init(&mut self, config: Vec<(String, String)>) -> Result<(), Reason> {
        let mut plugin = P::init(&Config::new(config))?;
        let format = P::STATE_FORMAT;
        match (format.is_empty(), plugin.state().is_some()) {
            (true, false) => {}
            (false, true) if format.split_once('@').is_some_and(|(n, v)| !n.is_empty() && !v.is_empty()) => {}
            (false, true) => return Err(Reason::new(format!("STATE_FORMAT {format:?} is not name@version"))),
            (true, true) => return Err("state() returns a state but STATE_FORMAT is empty".into()),
            (false, false) => return Err(Reason::new(format!("STATE_FORMAT is {format:?} but state() returns None"))),
        }
        self.plugin = Some(plugin);
        Ok(())
    }

    /// Replaces the plugin's state with committed `entries`; nothing counts as changed afterwards.
    /// A stateless plugin ignores them.
    ///
    /// # Errors
    /// A [`Reason`] when the plugin is not initialised, or when entries did not decode (they are
    /// skipped and the others restored).
    pub fn restore(&mut self, entries: Entries) -> Result<(), Reason> {
        let plugin = self.plugin.as_mut().ok_or(NOT_INITIALISED)?;
        match plugin.state() {
            Some(state) => Ok(state.restore(entries)?),
            None => Ok(()),
        }
    }

    /// The state entries changed since the last `take_changes` or `restore` (none for a stateless or
    /// uninitialised plugin).
    pub fn take_changes(&mut self) -> Changes {
        self.plugin.as_mut().and_then(Plugin::state).map(|s| s.take_changes()).unwrap_or_default()
    }

    /// Decodes length-delimited `frames`; read the result with [`output`](Self::output),
    /// [`counts`](Self::counts) and [`rejects`](Self::rejects).
    pub fn decode(&mut self, frames: &[u8]) {
        self.out.clear();
        self.counts.clear();
        self.rejects.clear();
        for (index, frame) in Delimited::new(frames).enumerate() {
            let index = index as u32;
            let Some(plugin) = self.plugin.as_mut() else {
                self.counts.push(0);
                self.rejects.push((index, Reason::from(NOT_INITIALISED)));
                continue;
            };
            let mark = self.out.mark();
            let result =
                frame.map_err(|e| Reason::field("frame framing", e)).and_then(|f| plugin.decode(f, &mut self.out));
            match result {
                Ok(()) => self.counts.push((self.out.len() - mark.1) as u32),
                Err(reason) => {
                    self.out.rollback(mark);
                    self.counts.push(0);
                    self.rejects.push((index, reason));
                }
            }
        }
    }

    /// Transforms a batch of length-delimited records; read the result with [`output`](Self::output)
    /// and [`rejects`](Self::rejects).
    pub fn transform(&mut self, batch: &[u8]) {
        self.out.clear();
        self.counts.clear();
        self.rejects.clear();
        let Some(plugin) = self.plugin.as_mut() else {
            let n = Delimited::new(batch).count() as u32;
            self.rejects.extend((0..n).map(|index| (index, Reason::from(NOT_INITIALISED))));
            return;
        };
        let (out, rejects) = (&mut self.out, &mut self.rejects);
        out.reserve(batch.len());
        for (index, item) in Delimited::new(batch).enumerate() {
            let index = index as u32;
            match item.and_then(StreamDataView::parse) {
                Ok(view) => {
                    let mark = out.mark();
                    if let Err(reason) = plugin.transform(view, out) {
                        out.rollback(mark);
                        rejects.push((index, reason));
                    }
                }
                Err(e) => rejects.push((index, Reason::field("record", e))),
            }
        }
    }

    /// The records the last call wrote.
    pub fn output(&self) -> &Records {
        &self.out
    }

    /// Records per frame of the last `decode`.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Inputs the last call rejected, by index.
    pub fn rejects(&self) -> &[(u32, Reason)] {
        &self.rejects
    }

    /// Takes the last `decode`'s records, counts and rejects.
    pub fn take_decoded(&mut self) -> (Vec<u8>, Vec<u32>, Vec<(u32, Reason)>) {
        (self.out.take(), std::mem::take(&mut self.counts), std::mem::take(&mut self.rejects))
    }

    /// Takes the last `transform`'s records and rejects.
    pub fn take_transformed(&mut self) -> (Vec<u8>, Vec<(u32, Reason)>) {
        (self.out.take(), std::mem::take(&mut self.rejects))
    }
}
