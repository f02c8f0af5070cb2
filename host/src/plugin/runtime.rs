//! Runs plugin components: one wasmtime [`Engine`], components compiled once, an instance per worker.
//!
//! Every call is bounded: linear memory by a per-plugin cap, time by an epoch deadline, output by a
//! size cap, and the output is checked to be valid records before the host trusts it (decode output
//! here; transform output's framing here and its records where they are parsed, see
//! [`Transformed`]). A trap, a
//! timeout or a limit hit becomes a typed [`PluginError`]; the instance that failed is thrown away and
//! the next call runs on a fresh one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use plugin_sdk::wire::{Delimited, validate_batch};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginError;
use crate::symbols::Symbols;
use crate::telemetry::CallMetrics;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/plugin",
    });
}

use bindings::exports::sluice::plugin::guest;
use bindings::sluice::plugin::host;

/// The WIT world plugins implement, with its version.
pub const WORLD: &str = "sluice:plugin/plugin@0.1.0";

/// Limits applied to each call of one plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most linear memory an instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Longest a single call may run before it is interrupted.
    pub deadline: Duration,
    /// Largest output (records bytes) a single call may return.
    pub output_bytes: usize,
    /// Most symbols one instance may name: names come from untrusted frames, and each one named is
    /// kept in the dictionary for good. Past it the host answers 0 and the frame is refused.
    pub max_symbols: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(200),
            output_bytes: 16 << 20,
            max_symbols: 10_000,
        }
    }
}

/// Settings for the [`Runtime`] as a whole.
#[derive(Clone, Debug)]
pub struct RuntimeSettings {
    /// How many plugin instances may exist at once (pooling allocator slots).
    pub max_instances: u32,
    /// The largest memory cap any plugin may be given; sizes the pool's slots.
    pub max_memory_bytes: usize,
    /// How often the epoch advances; deadlines are rounded up to whole ticks.
    pub epoch_tick: Duration,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings { max_instances: 256, max_memory_bytes: 1 << 30, epoch_tick: Duration::from_millis(2) }
    }
}

/// The wasm engine and everything shared by all plugins.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    symbols: Arc<Symbols>,
    settings: RuntimeSettings,
    ticker: EpochTicker,
    /// Where plugin calls are counted; `None` counts into detached metrics.
    metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl Runtime {
    /// Creates the engine (pooling allocator, epoch interruption) and starts its epoch ticker.
    ///
    /// # Errors
    /// When wasmtime rejects the configuration (e.g. the pool cannot be reserved).
    pub fn new(settings: RuntimeSettings, symbols: Arc<Symbols>) -> Result<Self, PluginError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(settings.max_instances)
            .total_core_instances(settings.max_instances * 2)
            .total_memories(settings.max_instances)
            .total_tables(settings.max_instances * 2)
            .total_stacks(settings.max_instances)
            .max_memory_size(settings.max_memory_bytes);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .concurrency_support(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // `SLUICE_WASM_PROFILER=perfmap` (or `jitdump`) shows plugin code to `perf` by function name.
        match std::env::var("SLUICE_WASM_PROFILER").as_deref() {
            Ok("perfmap") => _ = config.profiler(wasmtime::ProfilingStrategy::PerfMap),
            Ok("jitdump") => _ = config.profiler(wasmtime::ProfilingStrategy::JitDump),
            _ => {}
        }
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let ticker = EpochTicker::start(engine.clone(), settings.epoch_tick);
        Ok(Runtime { engine, linker, symbols, settings, ticker, metrics: None })
    }

    /// Counts every plugin call into `metrics` (per plugin, version and stage).
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The metrics plugin calls are counted into, if any.
    pub fn metrics(&self) -> Option<&Arc<crate::telemetry::Metrics>> {
        self.metrics.as_ref()
    }

    /// The symbol dictionary plugins intern into.
    pub fn symbols(&self) -> &Arc<Symbols> {
        &self.symbols
    }

    /// The engine, e.g. to precompile components.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a plugin from its `.wasm` bytes and checks it implements [`WORLD`].
    ///
    /// # Errors
    /// [`PluginError::NotWasm`], [`PluginError::CoreModule`], [`PluginError::Compile`] or
    /// [`PluginError::WrongWorld`].
    pub fn compile(&self, name: &str, wasm: &[u8], limits: Limits) -> Result<Arc<PluginCode>, PluginError> {
        check_header(wasm)?;
        let component = Component::new(&self.engine, wasm).map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        self.load(name, &version_of(wasm), component, limits)
    }

    /// Loads an already compiled component (see [`Component::serialize`]) whose `.wasm` had the
    /// version [`version_of`] gives.
    ///
    /// # Errors
    /// [`PluginError::WrongWorld`] when it does not implement [`WORLD`], or [`PluginError::Limits`]
    /// when the limits exceed the runtime's.
    pub fn load(
        &self,
        name: &str,
        version: &str,
        component: Component,
        limits: Limits,
    ) -> Result<Arc<PluginCode>, PluginError> {
        if limits.memory_bytes > self.settings.max_memory_bytes {
            return Err(PluginError::Limits(format!(
                "memory cap {} exceeds the runtime's {}",
                limits.memory_bytes, self.settings.max_memory_bytes
            )));
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?;
        let ticks = limits.deadline.as_nanos().div_ceil(self.settings.epoch_tick.as_nanos().max(1)).max(1);
        let metrics = crate::telemetry::PLUGIN_STAGES.map(|stage| match &self.metrics {
            Some(m) => m.plugin_calls(name, version, stage),
            None => CallMetrics::detached(),
        });
        Ok(Arc::new(PluginCode {
            name: name.into(),
            version: version.into(),
            metrics,
            pre,
            limits,
            deadline_ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
            epoch_tick: self.settings.epoch_tick,
            symbols: self.symbols.clone(),
            engine: self.engine.clone(),
            _ticker: self.ticker.handle.clone(),
        }))
    }
}

/// Tells a core module or random bytes apart from a component before compiling.
fn check_header(wasm: &[u8]) -> Result<(), PluginError> {
    match wasm.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(PluginError::CoreModule),
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(()),
        _ => Err(PluginError::NotWasm),
    }
}

/// A compiled plugin, ready to instantiate on any worker thread.
pub struct PluginCode {
    name: Arc<str>,
    /// `sha256:` and the first 16 hex digits of the `.wasm`'s SHA-256.
    version: Arc<str>,
    /// Its calls' metrics in the decode and the transform stage.
    metrics: [CallMetrics; 2],
    pre: bindings::PluginPre<HostState>,
    limits: Limits,
    deadline_ticks: u64,
    epoch_tick: Duration,
    symbols: Arc<Symbols>,
    engine: Engine,
    /// Keeps the epoch ticker running while any plugin is alive.
    _ticker: Arc<TickerHandle>,
}

impl PluginCode {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version of its code: `sha256:` and the first 16 hex digits of the `.wasm`'s SHA-256.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The metrics of its `decode` calls.
    pub fn decode_metrics(&self) -> &CallMetrics {
        &self.metrics[0]
    }

    /// The metrics of its `transform` calls.
    pub fn transform_metrics(&self) -> &CallMetrics {
        &self.metrics[1]
    }

    /// Creates an instance and runs `init` with `config`.
    ///
    /// # Errors
    /// [`PluginError::Instantiate`] or [`PluginError::Init`] (with the plugin's reason).
    pub fn instantiate(self: &Arc<Self>, config: &[(String, String)]) -> Result<PluginInstance, PluginError> {
        let mut instance = PluginInstance { code: self.clone(), config: config.to_vec(), live: None };
        instance.live()?;
        Ok(instance)
    }
}

impl std::fmt::Debug for PluginCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCode").field("name", &self.name).field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance").field("code", &self.code).field("live", &self.live.is_some()).finish()
    }
}

/// What a `decode` call produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The records, length-delimited, in frame order.
    pub records: Vec<u8>,
    /// Records per input frame.
    pub counts: Vec<u32>,
    /// Frames the plugin refused.
    pub rejects: Vec<Reject>,
}

/// What a `transform` call produced.
///
/// The output is checked for size and framing, not for what each record holds: the process role
/// parses every record anyway (with [`plugin_sdk::StreamDataView::parse`], which refuses anything
/// that is not valid `StreamData`), so checking there costs one pass instead of two.
/// [`crate::transform::Transformer`] does that and treats a record that does not parse as
/// [`PluginError::InvalidOutput`] of the call. Whoever reads `records` must parse, never assume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transformed {
    /// The output records, length-delimited (framing checked, contents not).
    pub records: Vec<u8>,
    /// How many records `records` holds.
    pub count: usize,
    /// Input records the plugin refused.
    pub rejects: Vec<Reject>,
}

/// An input a plugin refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Index of the frame or record in the batch.
    pub index: u32,
    /// The plugin's reason.
    pub reason: String,
}

/// One plugin instance, owned by one worker. After a trap, timeout or limit hit it is rebuilt (and
/// re-initialised) on the next call.
pub struct PluginInstance {
    code: Arc<PluginCode>,
    config: Vec<(String, String)>,
    live: Option<Live>,
}

struct Live {
    store: Store<HostState>,
    plugin: bindings::Plugin,
}

impl PluginInstance {
    /// The compiled plugin this instance runs.
    pub fn code(&self) -> &Arc<PluginCode> {
        &self.code
    }

    /// The configuration its `init` was given.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// Symbol names refused for [`Limits::max_symbols`] since the last call of this, and the cap.
    pub fn take_refused_symbols(&mut self) -> (u32, u32) {
        let refused = self.live.as_mut().map_or(0, |l| std::mem::take(&mut l.store.data_mut().refused_symbols));
        (refused, self.code.limits.max_symbols)
    }

    /// Decodes length-delimited raw frames (see [`plugin_sdk::wire::push_delimited`]).
    ///
    /// # Errors
    /// A [`PluginError`] when the call traps, times out, hits a limit or returns invalid output; the
    /// instance is replaced before the next call.
    pub fn decode(&mut self, frames: &[u8]) -> Result<Decoded, PluginError> {
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

    fn decode_checked(&mut self, frames: &[u8], frame_count: usize) -> Result<Decoded, PluginError> {
        let out = self.call(|plugin, store| plugin.sluice_plugin_guest().call_decode(store, frames))?;
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
        Ok(Decoded { records: out.records, counts: out.counts, rejects: rejects(out.rejects) })
    }

    /// Transforms a batch of length-delimited `StreamData` records.
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn transform(&mut self, batch: &[u8]) -> Result<Transformed, PluginError> {
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

    fn transform_checked(&mut self, batch: &[u8]) -> Result<Transformed, PluginError> {
        let out = self.call(|plugin, store| plugin.sluice_plugin_guest().call_transform(store, batch))?;
        // Framing only: the records' contents are checked by whoever parses them, once (see
        // `Transformed`), not here and again there.
        let result = self.check_framing(&out.records).and_then(|count| {
            // Counting the inputs costs a pass over the batch, so only when there is something to check.
            if out.rejects.is_empty() {
                Ok(count)
            } else {
                check_rejects(&out.rejects, Delimited::new(batch).count()).map(|()| count)
            }
        });
        let count = self.discard_on_error(result)?;
        Ok(Transformed { records: out.records, count, rejects: rejects(out.rejects) })
    }

    /// The instance, creating and initialising it if there is none.
    fn live(&mut self) -> Result<&mut Live, PluginError> {
        if self.live.is_none() {
            let code = &self.code;
            let mut store = Store::new(&code.engine, HostState::new(code));
            store.limiter(|s| &mut s.limiter);
            store.set_epoch_deadline(code.deadline_ticks);
            // At the deadline: time the host spent in the plugin's imports (naming a new symbol
            // waits on Kafka) is given back, up to a cap; the plugin's own time is not.
            let tick = code.epoch_tick.max(Duration::from_micros(1));
            store.epoch_deadline_callback(move |mut ctx| {
                let s = ctx.data_mut();
                let owed = s.import_time.saturating_sub(s.extended);
                let give = owed.min(MAX_IMPORT_EXTENSION.saturating_sub(s.extended));
                let ticks = (give.as_nanos() / tick.as_nanos()) as u64;
                if ticks == 0 {
                    return Ok(wasmtime::UpdateDeadline::Interrupt);
                }
                s.extended += tick * ticks as u32;
                Ok(wasmtime::UpdateDeadline::Continue(ticks))
            });
            let plugin = code.pre.instantiate(&mut store).map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
            let mut live = Live { store, plugin };
            let config = self.config.clone();
            match Self::invoke(code, &mut live, |p, s| p.sluice_plugin_guest().call_init(s, &config)) {
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
        f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let code = self.code.clone();
        let live = self.live()?;
        let result = Self::invoke(&code, live, f);
        if result.is_err() {
            self.live = None;
        }
        result
    }

    /// Runs one export with a fresh deadline and turns failures into typed errors.
    fn invoke<R>(
        code: &PluginCode,
        live: &mut Live,
        f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        live.store.set_epoch_deadline(code.deadline_ticks);
        live.store.data_mut().begin_call();
        f(&live.plugin, &mut live.store).map_err(|e| classify(code, live.store.data(), e))
    }

    /// Checks output records: size cap, then that they are framed correctly; answers how many.
    fn check_framing(&self, records: &[u8]) -> Result<usize, PluginError> {
        let limit = self.code.limits.output_bytes;
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
        let limit = self.code.limits.output_bytes;
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

fn check_rejects(list: &[guest::Reject], inputs: usize) -> Result<(), PluginError> {
    match list.iter().find(|r| r.index as usize >= inputs) {
        Some(r) => Err(PluginError::InvalidOutput(format!("reject index {} out of {inputs} inputs", r.index))),
        None => Ok(()),
    }
}

fn rejects(list: Vec<guest::Reject>) -> Vec<Reject> {
    list.into_iter().map(|r| Reject { index: r.index, reason: r.reason }).collect()
}

fn classify(code: &PluginCode, state: &HostState, e: wasmtime::Error) -> PluginError {
    if state.limiter.hit {
        return PluginError::MemoryLimit { limit: code.limits.memory_bytes };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Timeout { deadline: code.limits.deadline },
        Some(trap) => {
            let panic = state.last_error.as_deref().map(|m| format!(" after {m:?}")).unwrap_or_default();
            PluginError::Trap(format!("{trap}{panic}"))
        }
        None => PluginError::Trap(format!("{e:#}")),
    }
}

/// Per-instance host state: WASI (with no capabilities), limits and the host imports' context.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    symbols: Arc<Symbols>,
    plugin: Arc<str>,
    /// Log lines left in this call; a plugin that logs per record is cut off, not the host's log.
    log_budget: u32,
    /// The last error-level line the plugin logged in this call (the SDK logs panics this way).
    last_error: Option<String>,
    /// Time this call spent in the host's imports, and how much of it the deadline was moved back.
    import_time: Duration,
    extended: Duration,
    /// Symbol ids this instance has named, up to its limit.
    named: std::collections::HashSet<u32>,
    max_symbols: u32,
    /// Names refused for the cap since [`PluginInstance::take_refused_symbols`] was last called.
    refused_symbols: u32,
}

const LOG_LINES_PER_CALL: u32 = 32;

/// The most a call's deadline is moved back for time the host spent in its imports.
const MAX_IMPORT_EXTENSION: Duration = Duration::from_secs(5);

impl HostState {
    fn new(code: &PluginCode) -> Self {
        let wasi = WasiCtx::builder()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(ZeroRandom)
            .insecure_random(ZeroRandom)
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter { limit: code.limits.memory_bytes, hit: false },
            symbols: code.symbols.clone(),
            plugin: code.name.clone(),
            log_budget: LOG_LINES_PER_CALL,
            last_error: None,
            import_time: Duration::ZERO,
            extended: Duration::ZERO,
            named: std::collections::HashSet::new(),
            max_symbols: code.limits.max_symbols,
            refused_symbols: 0,
        }
    }

    fn begin_call(&mut self) {
        self.log_budget = LOG_LINES_PER_CALL;
        self.last_error = None;
        self.limiter.hit = false;
        self.import_time = Duration::ZERO;
        self.extended = Duration::ZERO;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) {
        if level == host::Level::Error {
            self.last_error = Some(message.chars().take(512).collect());
        }
        if self.log_budget == 0 {
            return;
        }
        self.log_budget -= 1;
        let plugin = &*self.plugin;
        let message =
            if self.log_budget == 0 { format!("{message} (further lines this call dropped)") } else { message };
        match level {
            host::Level::Trace => tracing::trace!(plugin, "{message}"),
            host::Level::Debug => tracing::debug!(plugin, "{message}"),
            host::Level::Info => tracing::info!(plugin, "{message}"),
            host::Level::Warn => tracing::warn!(plugin, "{message}"),
            host::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn intern_symbol(&mut self, name: String) -> u32 {
        // The guest caches ids, so this runs once per new symbol per instance; a new name may wait
        // on the shared dictionary's topic, which must not count against the plugin's deadline.
        if self.named.len() >= self.max_symbols as usize {
            // Not named, so the dictionary does not grow; the plugin does not cache the 0 either.
            self.refused_symbols = self.refused_symbols.saturating_add(1);
            return 0;
        }
        let started = std::time::Instant::now();
        let id = self.symbols.intern(&name);
        self.import_time += started.elapsed();
        if id != 0 {
            self.named.insert(id);
        }
        id
    }
}

/// Caps linear memory and remembers whether the cap was hit, to tell a memory bomb from other traps.
struct MemoryLimiter {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!("memory limit of {} bytes reached", self.limit)));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A clock that always reads zero: plugins get no time, so replays are deterministic.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Deterministic "randomness" for the entropy imports the Rust standard library links in.
struct ZeroRandom;

impl rand::TryRng for ZeroRandom {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.fill(0);
        Ok(())
    }
}

/// Advances the engine's epoch on a timer so deadlines fire; stops when the last user is dropped.
struct EpochTicker {
    handle: Arc<TickerHandle>,
}

struct TickerHandle {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the epoch thread; plugin deadlines will not fire");
        }
        EpochTicker { handle: Arc::new(TickerHandle { stop, thread: Mutex::new(thread) }) }
    }
}

impl Drop for TickerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// A plugin's version: `sha256:` and the first 16 hex digits of its `.wasm`'s SHA-256, so the same
/// bytes always have the same version.
pub fn version_of(wasm: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(wasm);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut plugin = code.instantiate(&[]).unwrap();
        let mut frames = Vec::new();
        for (id, symbol) in [(1, "BTCUSDT"), (2, "ETHUSDT")] {
            let frame = format!(r#"{{"e":"trade","E":1,"s":"{symbol}","t":{id},"p":"1.5","q":"2","T":1,"m":false}}"#);
            plugin_sdk::wire::push_delimited(&mut frames, frame.as_bytes());
        }
        let started = std::time::Instant::now();
        let out = plugin.decode(&frames).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(600), "both symbols were new");
        assert_eq!(out.counts, [1, 1]);
        assert_eq!(code.decode_metrics().timeouts.get(), 0);
    }

    #[test]
    fn headers_are_told_apart() {
        assert!(matches!(check_header(b"\0asm\x01\0\0\0rest"), Err(PluginError::CoreModule)));
        assert!(matches!(check_header(b"\0asm\x0d\0\x01\0rest"), Ok(())));
        assert!(matches!(check_header(b"PK\x03\x04zipzip"), Err(PluginError::NotWasm)));
        assert!(matches!(check_header(b""), Err(PluginError::NotWasm)));
    }
}
