//! The sandbox a plugin runs in: the WIT world's bindings, the host state each instance's store
//! holds (the `host` imports, WASI with no capabilities, the memory cap), and the WASI shims that
//! keep plugins deterministic (a clock that reads zero, randomness that is all zeros).

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::symbols::Symbols;

/// The world plugins built with the SDK implement: guest and state.
pub(super) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/plugin@0.2.0",
    });
}

/// The world before state (`wit/deps/plugin-0.1`): such plugins still load, as stateless.
pub(super) mod bindings_v1 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/plugin@0.1.0",
    });
}

use bindings::sluice::plugin0_2_0::host;

/// The WIT world plugins implement, with its version.
pub const WORLD: &str = "sluice:plugin/plugin@0.2.0";

/// The earlier world the host still loads (its plugins keep no state).
pub const WORLD_V1: &str = "sluice:plugin/plugin@0.1.0";

/// Per-instance host state: WASI (with no capabilities), limits and the host imports' context.
pub(super) struct HostState {
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
    /// What the plugin's version may name: shared by all its instances, so a rebuilt instance
    /// does not start a new quota.
    quota: Arc<SymbolQuota>,
    /// Names refused since [`HostState::take_refused_symbols`] was last called.
    refused_symbols: RefusedSymbols,
}

/// Symbol names a plugin asked for and the host answered 0, by why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusedSymbols {
    /// Names longer than [`Limits::max_symbol_bytes`](super::Limits::max_symbol_bytes).
    pub too_long: u32,
    /// New names past [`Limits::max_symbols`](super::Limits::max_symbols).
    pub over_quota: u32,
}

/// The symbols one plugin version may name, shared by all its instances (every worker's, and each
/// one that replaces an instance that failed): names come from untrusted frames, every name named
/// stays in the dictionary for good, and a quota per instance would start afresh at each rebuild,
/// which a hostile feed can cause at will.
#[derive(Debug)]
pub(super) struct SymbolQuota {
    /// Most distinct symbols the version may name.
    max_symbols: u32,
    /// Longest name, in bytes.
    max_symbol_bytes: usize,
    /// The ids named so far (at most `max_symbols`).
    named: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Refusals for a name over `max_symbol_bytes`, and for a new name past `max_symbols`.
    refused: [prometheus::IntCounter; 2],
}

impl SymbolQuota {
    /// A quota of `max_symbols` names of at most `max_symbol_bytes` each, its refusals counted in
    /// `refused` (too long, over the quota).
    pub(super) fn new(max_symbols: u32, max_symbol_bytes: usize, refused: [prometheus::IntCounter; 2]) -> Self {
        SymbolQuota { max_symbols, max_symbol_bytes, named: Default::default(), refused }
    }

    /// The id of `name` from `symbols`, or why it is refused. A name named before is answered even
    /// when the quota is spent (a rebuilt instance asks again for the names it had).
    fn intern(&self, symbols: &Symbols, name: &str) -> Result<u32, Refusal> {
        if name.len() > self.max_symbol_bytes {
            self.refused[0].inc();
            return Err(Refusal::TooLong);
        }
        // Held while naming, so concurrent workers cannot pass the quota together.
        let mut named = self.named.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if named.len() >= self.max_symbols as usize {
            return match symbols.id(name).filter(|id| named.contains(id)) {
                Some(id) => Ok(id),
                None => {
                    self.refused[1].inc();
                    Err(Refusal::OverQuota)
                }
            };
        }
        let id = symbols.intern(name);
        if id != 0 {
            named.insert(id);
        }
        Ok(id)
    }
}

/// Why [`SymbolQuota::intern`] answered no id.
enum Refusal {
    TooLong,
    OverQuota,
}

const LOG_LINES_PER_CALL: u32 = 32;

/// The most a call's deadline is moved back for time the host spent in its imports.
const MAX_IMPORT_EXTENSION: Duration = Duration::from_secs(5);

impl HostState {
    /// The state of a new instance of `plugin`: its memory capped at `memory_bytes`, the symbols it
    /// names into `symbols` counted against its version's `quota`.
    pub(super) fn new(plugin: Arc<str>, symbols: Arc<Symbols>, memory_bytes: usize, quota: Arc<SymbolQuota>) -> Self {
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
            limiter: MemoryLimiter { limit: memory_bytes, hit: false },
            symbols,
            plugin,
            log_budget: LOG_LINES_PER_CALL,
            last_error: None,
            import_time: Duration::ZERO,
            extended: Duration::ZERO,
            quota,
            refused_symbols: RefusedSymbols::default(),
        }
    }

    /// Starts a call afresh: its log budget, last error, memory flag and import time.
    pub(super) fn begin_call(&mut self) {
        self.log_budget = LOG_LINES_PER_CALL;
        self.last_error = None;
        self.limiter.hit = false;
        self.import_time = Duration::ZERO;
        self.extended = Duration::ZERO;
    }

    /// The memory cap, for the store to enforce.
    pub(super) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limiter
    }

    /// Whether this call tried to grow memory past the cap.
    pub(super) fn memory_limit_hit(&self) -> bool {
        self.limiter.hit
    }

    /// The last error-level line the plugin logged in this call.
    pub(super) fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Symbol names refused since the last call of this.
    pub(super) fn take_refused_symbols(&mut self) -> RefusedSymbols {
        std::mem::take(&mut self.refused_symbols)
    }

    /// At the deadline: time the host spent in the plugin's imports (naming a new symbol waits on
    /// Kafka) is given back in whole `tick`s, up to a cap; the plugin's own time is not.
    pub(super) fn at_deadline(&mut self, tick: Duration) -> UpdateDeadline {
        let owed = self.import_time.saturating_sub(self.extended);
        let give = owed.min(MAX_IMPORT_EXTENSION.saturating_sub(self.extended));
        let ticks = (give.as_nanos() / tick.as_nanos()) as u64;
        if ticks == 0 {
            return UpdateDeadline::Interrupt;
        }
        self.extended += tick * ticks as u32;
        UpdateDeadline::Continue(ticks)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings_v1::sluice::plugin0_1_0::host::Host for HostState {
    fn log(&mut self, level: bindings_v1::sluice::plugin0_1_0::host::Level, message: String) {
        use bindings_v1::sluice::plugin0_1_0::host::Level as V1;
        let level = match level {
            V1::Trace => host::Level::Trace,
            V1::Debug => host::Level::Debug,
            V1::Info => host::Level::Info,
            V1::Warn => host::Level::Warn,
            V1::Error => host::Level::Error,
        };
        host::Host::log(self, level, message);
    }

    fn intern_symbol(&mut self, name: String) -> u32 {
        host::Host::intern_symbol(self, name)
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
        let started = std::time::Instant::now();
        let id = self.quota.intern(&self.symbols, &name);
        self.import_time += started.elapsed();
        // A refused name is not named, so the dictionary does not grow; the plugin does not cache
        // the 0 either (nor keep the name).
        let refused = &mut self.refused_symbols;
        match id {
            Ok(id) => id,
            Err(Refusal::TooLong) => {
                refused.too_long = refused.too_long.saturating_add(1);
                0
            }
            Err(Refusal::OverQuota) => {
                refused.over_quota = refused.over_quota.saturating_add(1);
                0
            }
        }
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

/// A component checked against one of the worlds, ready to instantiate.
pub(super) enum PluginPre {
    /// The current world (guest and state).
    V2(bindings::PluginPre<HostState>),
    /// The world before state.
    V1(bindings_v1::PluginPre<HostState>),
}

impl PluginPre {
    /// Checks `pre` against the current world, then the earlier one.
    ///
    /// # Errors
    /// The current world's complaint when neither fits.
    pub(super) fn new(pre: wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<Self> {
        match bindings::PluginPre::new(pre.clone()) {
            Ok(v2) => Ok(PluginPre::V2(v2)),
            Err(e) => bindings_v1::PluginPre::new(pre).map(PluginPre::V1).map_err(|_| e),
        }
    }

    /// Instantiates the component in `store`.
    pub(super) fn instantiate(&self, store: &mut wasmtime::Store<HostState>) -> wasmtime::Result<Guest> {
        Ok(match self {
            PluginPre::V2(pre) => Guest::V2(pre.instantiate(store)?),
            PluginPre::V1(pre) => Guest::V1(pre.instantiate(store)?),
        })
    }

    /// The world the component implements.
    pub(super) fn world(&self) -> &'static str {
        match self {
            PluginPre::V2(_) => WORLD,
            PluginPre::V1(_) => WORLD_V1,
        }
    }
}

/// A plugin instance's exports, whichever world it implements.
pub(super) enum Guest {
    /// The current world.
    V2(bindings::Plugin),
    /// The world before state.
    V1(bindings_v1::Plugin),
}

/// What `decode` returned, in the host's own types.
pub(super) struct RawDecoded {
    pub(super) records: Vec<u8>,
    pub(super) counts: Vec<u32>,
    pub(super) rejects: Vec<(u32, String)>,
}

/// What `transform` returned, in the host's own types.
pub(super) struct RawTransformed {
    pub(super) records: Vec<u8>,
    pub(super) rejects: Vec<(u32, String)>,
}

type Store<'a> = &'a mut wasmtime::Store<HostState>;

/// State entries changed by a call: each key with its new value, or `None` when removed.
pub type StateChanges = Vec<(Vec<u8>, Option<Vec<u8>>)>;

impl Guest {
    pub(super) fn init(&self, store: Store<'_>, config: &[(String, String)]) -> wasmtime::Result<Result<(), String>> {
        match self {
            Guest::V2(p) => p.sluice_plugin0_2_0_guest().call_init(store, config),
            Guest::V1(p) => p.sluice_plugin0_1_0_guest().call_init(store, config),
        }
    }

    pub(super) fn decode(&self, store: Store<'_>, frames: &[u8]) -> wasmtime::Result<RawDecoded> {
        Ok(match self {
            Guest::V2(p) => {
                let d = p.sluice_plugin0_2_0_guest().call_decode(store, frames)?;
                RawDecoded {
                    records: d.records,
                    counts: d.counts,
                    rejects: d.rejects.into_iter().map(|r| (r.index, r.reason)).collect(),
                }
            }
            Guest::V1(p) => {
                let d = p.sluice_plugin0_1_0_guest().call_decode(store, frames)?;
                RawDecoded {
                    records: d.records,
                    counts: d.counts,
                    rejects: d.rejects.into_iter().map(|r| (r.index, r.reason)).collect(),
                }
            }
        })
    }

    pub(super) fn transform(&self, store: Store<'_>, batch: &[u8]) -> wasmtime::Result<RawTransformed> {
        Ok(match self {
            Guest::V2(p) => {
                let t = p.sluice_plugin0_2_0_guest().call_transform(store, batch)?;
                RawTransformed {
                    records: t.records,
                    rejects: t.rejects.into_iter().map(|r| (r.index, r.reason)).collect(),
                }
            }
            Guest::V1(p) => {
                let t = p.sluice_plugin0_1_0_guest().call_transform(store, batch)?;
                RawTransformed {
                    records: t.records,
                    rejects: t.rejects.into_iter().map(|r| (r.index, r.reason)).collect(),
                }
            }
        })
    }

    /// The plugin's state format; empty for a stateless plugin and for the earlier world.
    pub(super) fn state_format(&self, store: Store<'_>) -> wasmtime::Result<String> {
        match self {
            Guest::V2(p) => p.sluice_plugin0_2_0_state().call_format(store),
            Guest::V1(_) => Ok(String::new()),
        }
    }

    pub(super) fn restore(&self, store: Store<'_>, entries: &[(Vec<u8>, Vec<u8>)]) -> wasmtime::Result<()> {
        match self {
            Guest::V2(p) => p.sluice_plugin0_2_0_state().call_restore(store, entries),
            Guest::V1(_) => Ok(()),
        }
    }

    pub(super) fn changes(&self, store: Store<'_>) -> wasmtime::Result<StateChanges> {
        match self {
            Guest::V2(p) => p.sluice_plugin0_2_0_state().call_changes(store),
            Guest::V1(_) => Ok(Vec::new()),
        }
    }
}
