//! Plugin instances and their calls: `init`, `decode` and `transform` run on one worker's instance,
//! and their output is checked to be valid records before the host trusts it (decode output here;
//! transform output's framing here and its records where they are parsed, see
//! [`TransformOutput`]). A trap, a timeout or a limit hit becomes a typed [`PluginError`]; the
//! instance that failed is thrown away and the next call runs on a fresh one.

use std::sync::Arc;

use sluice_wire::{Delimited, validate_batch};
use wasmtime::{Store, Trap};

use super::error::PluginError;
use super::runtime::PluginCode;
use super::world::{Guest, HostState, StateChanges};

/// What a `decode` call produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeOutput {
    /// The records, length-delimited, in frame order.
    pub records: Vec<u8>,
    /// Records per input frame.
    pub counts: Vec<u32>,
    /// Frames the plugin refused.
    pub rejects: Vec<PluginReject>,
}

/// What a `transform` call produced.
///
/// The output is checked for size and framing, not for what each record holds: the process role
/// parses every record anyway (with [`plugin_sdk::StreamDataView::parse`], which refuses anything
/// that is not valid `StreamData`), so checking there costs one pass instead of two.
/// [`crate::transform::Transformer`] does that and treats a record that does not parse as
/// [`PluginError::InvalidOutput`] of the call. Whoever reads `records` must parse, never assume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransformOutput {
    /// The output records, length-delimited (framing checked, contents not).
    pub records: Vec<u8>,
    /// How many records `records` holds.
    pub count: usize,
    /// Input records the plugin refused.
    pub rejects: Vec<PluginReject>,
}

/// An input a plugin refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginReject {
    /// Index of the frame or record in the batch.
    pub index: u32,
    /// The plugin's reason, cut to [`REASON_MAX_BYTES`](crate::handoff::stage::REASON_MAX_BYTES) (saying
    /// how long it was) when longer.
    pub reason: String,
}

/// One plugin instance, owned by one worker. After a trap, timeout or limit hit it is rebuilt (and
/// re-initialised) on the next call.
pub struct PluginInstance {
    code: Arc<PluginCode>,
    config: Vec<(String, String)>,
    live: Option<Live>,
    /// The state format `init` declared (`None`: the plugin keeps no state).
    state_format: Option<String>,
}

struct Live {
    store: Store<HostState>,
    plugin: Guest,
    /// A stateful plugin's state was handed to this instance ([`PluginInstance::restore_state`]).
    restored: bool,
}

/// How many times a call's deadline an instance's `init` may take.
const INIT_DEADLINE_FACTOR: u64 = 10;

impl PluginInstance {
    /// Creates an instance of `code` and runs `init` with `config`.
    ///
    /// # Errors
    /// [`PluginError::Instantiate`] or [`PluginError::Init`] (with the plugin's reason).
    pub fn new(code: &Arc<PluginCode>, config: &[(String, String)]) -> Result<Self, PluginError> {
        let mut instance =
            PluginInstance { code: code.clone(), config: config.to_vec(), live: None, state_format: None };
        instance.live()?;
        let format = instance.call(|plugin, store| plugin.state_format(store))?;
        instance.state_format = (!format.is_empty()).then_some(format);
        code.record_state_format(instance.state_format.as_deref());
        Ok(instance)
    }

    /// The format of the state the plugin keeps (`name@version`), or `None` for a stateless plugin.
    pub fn state_format(&self) -> Option<&str> {
        self.state_format.as_deref()
    }

    /// True when a stateful plugin's instance has not been handed its state yet: a fresh one, or
    /// the one that replaced an instance that failed.
    pub fn needs_state(&self) -> bool {
        self.state_format.is_some() && !self.live.as_ref().is_some_and(|l| l.restored)
    }

    /// Replaces the plugin's state with `entries` (on a fresh instance if the last one failed).
    ///
    /// # Errors
    /// As [`transform`](Self::transform); the instance is replaced before the next call.
    pub fn restore_state(&mut self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), PluginError> {
        if self.state_format.is_none() {
            return Ok(());
        }
        self.call(|plugin, store| plugin.restore(store, entries))?;
        if let Some(live) = &mut self.live {
            live.restored = true;
        }
        Ok(())
    }

    /// The state entries changed since the last call of this or [`restore_state`](Self::restore_state).
    ///
    /// # Errors
    /// As [`transform`](Self::transform).
    pub fn take_state_changes(&mut self) -> Result<StateChanges, PluginError> {
        if self.state_format.is_none() {
            return Ok(Vec::new());
        }
        self.call(|plugin, store| plugin.changes(store))
    }

    /// The compiled plugin this instance runs.
    pub fn code(&self) -> &Arc<PluginCode> {
        &self.code
    }

    /// The configuration its `init` was given.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// Symbol names refused since the last call of this, by why (too long, past the quota of
    /// [`Limits`](super::runtime::Limits)).
    pub fn take_refused_symbols(&mut self) -> super::RefusedSymbols {
        self.live.as_mut().map_or_else(Default::default, |l| l.store.data_mut().take_refused_symbols())
    }

    /// Decodes length-delimited raw frames (see [`sluice_wire::push_delimited`]).
    ///
    /// # Errors
    /// A [`PluginError`] when the call traps, times out, hits a limit or returns invalid output; the
    /// instance is replaced before the next call.
    pub fn decode(&mut self, frames: &[u8]) -> Result<DecodeOutput, PluginError> {
        let started = std::time::Instant::now();
        let frame_count = Delimited::new(frames).count();
        let code = self.code.clone();
        let metrics = code.decode_metrics();
        metrics.records_in.inc_by(frame_count as u64);
        let result = self.decode_checked(frames, frame_count);
        metrics.calls.inc();
        metrics.duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(d) => {
                metrics.records_out.inc_by(d.counts.iter().map(|&c| u64::from(c)).sum());
                metrics.rejects.inc_by(d.rejects.len() as u64);
            }
            Err(e) => {
                if let Some(failure) = e.failure() {
                    metrics.failed(failure)
                }
            }
        }
        result
    }

    fn decode_checked(&mut self, frames: &[u8], frame_count: usize) -> Result<DecodeOutput, PluginError> {
        let out = self.call(|plugin, store| plugin.decode(store, frames))?;
        let result = self.check_output(&out.records).and_then(|n| {
            if out.counts.len() != frame_count {
                return Err(PluginError::InvalidOutput(format!(
                    "{} record counts for {frame_count} frames",
                    out.counts.len()
                )));
            }
            let claimed: u64 = out.counts.iter().map(|&c| u64::from(c)).sum();
            if claimed != n as u64 {
                return Err(PluginError::InvalidOutput(format!(
                    "counts add up to {claimed}, but {n} records were returned"
                )));
            }
            check_rejects(&out.rejects, frame_count)
        });
        self.discard_on_error(result)?;
        Ok(DecodeOutput { records: out.records, counts: out.counts, rejects: rejects(out.rejects) })
    }

    /// Transforms a batch of length-delimited `StreamData` records.
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn transform(&mut self, batch: &[u8]) -> Result<TransformOutput, PluginError> {
        let started = std::time::Instant::now();
        let result = self.transform_checked(batch);
        let metrics = self.code.transform_metrics();
        metrics.calls.inc();
        metrics.duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(t) => {
                metrics.records_out.inc_by(t.count as u64);
                metrics.rejects.inc_by(t.rejects.len() as u64);
            }
            Err(e) => {
                if let Some(failure) = e.failure() {
                    metrics.failed(failure)
                }
            }
        }
        result
    }

    fn transform_checked(&mut self, batch: &[u8]) -> Result<TransformOutput, PluginError> {
        let out = self.call(|plugin, store| plugin.transform(store, batch))?;
        // Framing only: the records' contents are checked by whoever parses them, once (see
        // `TransformOutput`), not here and again there.
        let result = self.check_framing(&out.records).and_then(|count| {
            // Counting the inputs costs a pass over the batch, so only when there is something to check.
            if out.rejects.is_empty() {
                Ok(count)
            } else {
                check_rejects(&out.rejects, Delimited::new(batch).count()).map(|()| count)
            }
        });
        let count = self.discard_on_error(result)?;
        Ok(TransformOutput { records: out.records, count, rejects: rejects(out.rejects) })
    }

    /// The instance, creating and initialising it if there is none.
    fn live(&mut self) -> Result<&mut Live, PluginError> {
        if self.live.is_none() {
            let code = &self.code;
            let (store, plugin) = code.fresh_instance()?;
            let mut live = Live { store, plugin, restored: false };
            let config = self.config.clone();
            // `init` runs once per instance and may build tables: ten times a call's deadline, so a
            // start on a busy machine is not refused for an init that ran a little long.
            let ticks = code.deadline_ticks().saturating_mul(INIT_DEADLINE_FACTOR);
            match Self::invoke(code, &mut live, ticks, |p, s| p.init(s, &config)) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(PluginError::Init(reason)),
                Err(e) => return Err(e),
            }
            self.live = Some(live);
        }
        // Set just above when it was empty.
        Ok(self.live.as_mut().expect("instance is live"))
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let code = self.code.clone();
        let live = self.live()?;
        let result = Self::invoke(&code, live, code.deadline_ticks(), f);
        if result.is_err() {
            self.live = None;
        }
        result
    }

    /// Runs one export with a fresh deadline and turns failures into typed errors.
    fn invoke<R>(
        code: &PluginCode,
        live: &mut Live,
        ticks: u64,
        f: impl FnOnce(&Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        live.store.set_epoch_deadline(ticks);
        live.store.data_mut().begin_call();
        f(&live.plugin, &mut live.store).map_err(|e| classify(code, live.store.data(), e))
    }

    /// Checks output records: size cap, then that they are framed correctly; answers how many.
    fn check_framing(&self, records: &[u8]) -> Result<usize, PluginError> {
        let limit = self.code.limits().output_bytes;
        if records.len() > limit {
            return Err(PluginError::OutputTooLarge { len: records.len(), limit });
        }
        let mut n = 0;
        for item in Delimited::new(records) {
            item.map_err(|e| PluginError::InvalidOutput(format!("output record {n}: {e}")))?;
            n += 1;
        }
        Ok(n)
    }

    /// Throws the instance away (after output its caller found invalid); the next call gets a fresh
    /// one.
    pub fn discard(&mut self) {
        self.live = None;
    }

    /// Checks output records: size cap, then that every record is valid `StreamData`.
    fn check_output(&self, records: &[u8]) -> Result<usize, PluginError> {
        let limit = self.code.limits().output_bytes;
        if records.len() > limit {
            return Err(PluginError::OutputTooLarge { len: records.len(), limit });
        }
        validate_batch(records).map_err(|(i, e)| PluginError::InvalidOutput(format!("output record {i}: {e}")))
    }

    fn discard_on_error<T>(&mut self, result: Result<T, PluginError>) -> Result<T, PluginError> {
        if result.is_err() {
            self.live = None;
        }
        result
    }
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance").field("code", &self.code).field("live", &self.live.is_some()).finish()
    }
}

/// Each reject must name an input of the call, once: an index past the inputs, or one named twice
/// (which would dead-letter one input many times), is invalid output.
fn check_rejects(list: &[(u32, String)], inputs: usize) -> Result<(), PluginError> {
    let mut named = vec![false; inputs];
    for &(index, _) in list {
        match named.get_mut(index as usize) {
            None => return Err(PluginError::InvalidOutput(format!("reject index {index} out of {inputs} inputs"))),
            Some(true) => return Err(PluginError::InvalidOutput(format!("reject index {index} given twice"))),
            Some(seen) => *seen = true,
        }
    }
    Ok(())
}

/// The rejects, each reason cut to [`REASON_MAX_BYTES`](crate::handoff::stage::REASON_MAX_BYTES).
fn rejects(list: Vec<(u32, String)>) -> Vec<PluginReject> {
    list.into_iter()
        .map(|(index, reason)| PluginReject { index, reason: crate::handoff::stage::cap_reason(reason) })
        .collect()
}

fn classify(code: &PluginCode, state: &HostState, e: wasmtime::Error) -> PluginError {
    if state.memory_limit_hit() {
        return PluginError::MemoryLimit { limit: code.limits().memory_bytes };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Timeout { deadline: code.limits().deadline },
        Some(trap) => {
            let panic = state.last_error().map(|m| format!(" after {m:?}")).unwrap_or_default();
            PluginError::Trap(format!("{trap}{panic}"))
        }
        None => PluginError::Trap(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plugin::runtime::{Limits, Runtime, RuntimeSettings};
    use crate::symbols::Symbols;

    /// Naming a new symbol may wait on the shared dictionary's topic; that wait is the host's, and
    /// does not make the plugin's call time out.
    #[test]
    fn time_in_the_host_imports_does_not_count_against_the_deadline() {
        let mut symbols = Symbols::new();
        symbols.slow = Some(Duration::from_millis(300));
        let settings = RuntimeSettings { max_instances: 4, max_memory_bytes: 64 << 20, ..RuntimeSettings::default() };
        let runtime = Runtime::new(settings, Arc::new(symbols)).unwrap();
        let limits = Limits { deadline: Duration::from_millis(50), ..Limits::default() };
        let code = runtime.compile("binance", crate::plugin::bundled::BINANCE, limits).unwrap();
        let mut plugin = PluginInstance::new(&code, &[]).unwrap();
        let mut frames = Vec::new();
        for (id, symbol) in [(1, "BTCUSDT"), (2, "ETHUSDT")] {
            let frame = format!(r#"{{"e":"trade","E":1,"s":"{symbol}","t":{id},"p":"1.5","q":"2","T":1,"m":false}}"#);
            sluice_wire::push_delimited(&mut frames, frame.as_bytes());
        }
        let started = std::time::Instant::now();
        let out = plugin.decode(&frames).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(600), "both symbols were new");
        assert_eq!(out.counts, [1, 1]);
        assert_eq!(code.decode_metrics().timeouts.get(), 0);
    }
}
