//! Runs plugin components: one wasmtime [`Engine`] with its epoch ticker, components compiled once
//! into [`PluginCode`], each instance in a store of its own (the calls are in `instance`).
//!
//! Every call is bounded: linear memory by a per-plugin cap, time by an epoch deadline (both set
//! here, on each new store), output by a size cap (checked where the call returns).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::error::PluginError;
use super::world::{Guest, HostState, PluginPre, SymbolQuota, bindings, bindings_v1};
use crate::symbols::Symbols;
use crate::telemetry::CallMetrics;

/// Limits applied to each call of one plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most linear memory an instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Longest a single call may run before it is interrupted.
    pub deadline: Duration,
    /// Largest output (records bytes) a single call may return.
    pub output_bytes: usize,
    /// Most symbols the plugin's version may name in this process, all its instances together (a
    /// rebuilt instance does not start afresh): names come from untrusted frames, and each one named
    /// is kept in the dictionary for good. Past it the host answers 0 and the frame is refused.
    pub max_symbols: u32,
    /// Longest symbol name the host names, in bytes; a longer one is answered 0 and its frame
    /// refused.
    pub max_symbol_bytes: usize,
    /// Most bytes of state (keys and values) one link may keep committed and pending.
    pub state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(200),
            output_bytes: 16 << 20,
            max_symbols: 10_000,
            max_symbol_bytes: 64,
            state_bytes: 16 << 20,
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
        bindings_v1::Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)
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

    /// Compiles a plugin from its `.wasm` bytes and checks it implements [`WORLD`](super::world::WORLD).
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
    /// [`PluginError::WrongWorld`] when it does not implement [`WORLD`](super::world::WORLD), or [`PluginError::Limits`]
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
        let pre = PluginPre::new(pre).map_err(|e| PluginError::WrongWorld(format!("{e:#}")))?;
        let ticks = limits.deadline.as_nanos().div_ceil(self.settings.epoch_tick.as_nanos().max(1)).max(1);
        let metrics = crate::telemetry::PLUGIN_STAGES.map(|stage| match &self.metrics {
            Some(m) => m.plugin_calls(name, version, stage),
            None => CallMetrics::detached(),
        });
        let refused = match &self.metrics {
            Some(m) => m.symbols_refused(name, version),
            None => crate::telemetry::detached_counters(),
        };
        Ok(Arc::new(PluginCode {
            name: name.into(),
            version: version.into(),
            metrics,
            pre,
            limits,
            deadline_ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
            epoch_tick: self.settings.epoch_tick,
            symbols: self.symbols.clone(),
            quota: Arc::new(SymbolQuota::new(limits.max_symbols, limits.max_symbol_bytes, refused)),
            engine: self.engine.clone(),
            _ticker: self.ticker.handle.clone(),
            state_format: std::sync::OnceLock::new(),
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

/// A compiled plugin, ready to instantiate (`PluginInstance::new`) on any worker thread.
pub struct PluginCode {
    name: Arc<str>,
    /// `sha256:` and the first 16 hex digits of the `.wasm`'s SHA-256.
    version: Arc<str>,
    /// Its calls' metrics in the decode and the transform stage.
    metrics: [CallMetrics; 2],
    pre: PluginPre,
    limits: Limits,
    deadline_ticks: u64,
    epoch_tick: Duration,
    symbols: Arc<Symbols>,
    /// The symbols this version may name, across all its instances and their rebuilds.
    quota: Arc<SymbolQuota>,
    engine: Engine,
    /// Keeps the epoch ticker running while any plugin is alive.
    _ticker: Arc<TickerHandle>,
    /// The state format its instances declare (`None` inside: stateless), once one has started.
    state_format: std::sync::OnceLock<Option<String>>,
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

    /// The WIT world the component implements ([`WORLD`](super::world::WORLD), or the earlier
    /// [`WORLD_V1`](super::world::WORLD_V1), whose plugins keep no state).
    pub fn world(&self) -> &'static str {
        self.pre.world()
    }

    /// The state format its instances declare: `Some(None)` for a stateless plugin, `None` while
    /// no instance has started.
    pub fn state_format(&self) -> Option<Option<&str>> {
        self.state_format.get().map(Option::as_deref)
    }

    /// Records the state format an instance declared (the first one's counts).
    pub(super) fn record_state_format(&self, format: Option<&str>) {
        let _ = self.state_format.set(format.map(str::to_owned));
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

    /// A fresh instance of the component in a store of its own, under the memory cap and the epoch
    /// deadline; its `init` has not run.
    ///
    /// # Errors
    /// [`PluginError::Instantiate`].
    pub(super) fn fresh_instance(&self) -> Result<(Store<HostState>, Guest), PluginError> {
        let state =
            HostState::new(self.name.clone(), self.symbols.clone(), self.limits.memory_bytes, self.quota.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s.limiter());
        store.set_epoch_deadline(self.deadline_ticks);
        let tick = self.epoch_tick.max(Duration::from_micros(1));
        store.epoch_deadline_callback(move |mut ctx| Ok(ctx.data_mut().at_deadline(tick)));
        let plugin = self.pre.instantiate(&mut store).map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        Ok((store, plugin))
    }

    /// How many epoch ticks a call may run: its deadline, rounded up to whole ticks.
    pub(super) fn deadline_ticks(&self) -> u64 {
        self.deadline_ticks
    }
}

impl std::fmt::Debug for PluginCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCode").field("name", &self.name).field("limits", &self.limits).finish_non_exhaustive()
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

    #[test]
    fn headers_are_told_apart() {
        assert!(matches!(check_header(b"\0asm\x01\0\0\0rest"), Err(PluginError::CoreModule)));
        assert!(matches!(check_header(b"\0asm\x0d\0\x01\0rest"), Ok(())));
        assert!(matches!(check_header(b"PK\x03\x04zipzip"), Err(PluginError::NotWasm)));
        assert!(matches!(check_header(b""), Err(PluginError::NotWasm)));
    }
}
