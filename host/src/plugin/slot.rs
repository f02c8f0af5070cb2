//! Hot swap: a plugin's [`Slot`] holds its active (and shadow) version; each worker's
//! [`BoundPlugin`] syncs to it between batches with one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus::IntCounter;
use serde::Serialize;

use super::{PluginCode, PluginInstance, Runtime};

/// The version a plugin's workers run, swapped atomically between batches.
pub struct Slot {
    pub(super) active: ArcSwap<PluginCode>,
    pub(super) shadow: ArcSwapOption<Shadow>,
    /// Times a worker could not start an instance of the active version (it stayed on the one it
    /// ran and tries again after a backoff).
    pub(super) start_failures: AtomicU64,
    /// Bumped when an operator activates a version with an empty state: each link then drops its
    /// state at its next batch.
    pub(super) state_epoch: AtomicU64,
}

/// The version one worker's instance runs, as the API reports it (the slot's active version is
/// what workers switch to; this is what they have switched to).
#[derive(Debug, Default)]
pub struct Running(ArcSwapOption<String>);

impl Running {
    /// The version id, once the worker has an instance.
    pub fn get(&self) -> Option<Arc<String>> {
        self.0.load_full()
    }

    fn set(&self, version: &str) {
        if self.0.load().as_deref().map(String::as_str) != Some(version) {
            self.0.store(Some(Arc::new(version.to_owned())));
        }
    }
}

/// A version running in shadow, and how its output compared so far.
pub struct Shadow {
    pub(super) code: Arc<PluginCode>,
    pub(super) equal: IntCounter,
    pub(super) different: IntCounter,
    pub(super) batches: AtomicU64,
    pub(super) failed_calls: AtomicU64,
    /// Batches the shadow was not run on because its breaker was open.
    pub(super) skipped: AtomicU64,
    /// The same counts per stage: decode, then transform.
    pub(super) stages: [StageCounts; 2],
}

/// A shadow's own circuit breaker in each worker: one failed call (a trap, a timeout, a limit)
/// opens it, and the live path stops running the shadow until the cool-down ends (5 s, doubling
/// up to 60 s), so a shadow that hangs costs the live path one deadline per cool-down, not one per
/// batch.
const SHADOW_BREAKER: crate::breaker::BreakerConfig =
    crate::breaker::BreakerConfig { failure_threshold: 1, cool_down_ms: 5_000, max_cool_down_ms: 60_000 };

/// A shadow's comparison in one stage.
#[derive(Default)]
pub(super) struct StageCounts {
    pub(super) batches: AtomicU64,
    pub(super) equal: AtomicU64,
    pub(super) different: AtomicU64,
    pub(super) failed_calls: AtomicU64,
}

impl StageCounts {
    pub(super) fn view(&self) -> ShadowStageView {
        ShadowStageView {
            batches: self.batches.load(Ordering::Relaxed),
            records_equal: self.equal.load(Ordering::Relaxed),
            records_different: self.different.load(Ordering::Relaxed),
            failed_calls: self.failed_calls.load(Ordering::Relaxed),
        }
    }
}

impl Shadow {
    pub(super) fn new(code: Arc<PluginCode>, runtime: &Runtime) -> Self {
        let (equal, different) = match runtime.metrics() {
            Some(m) => m.shadow_records(code.name(), code.version()),
            None => {
                let c = || IntCounter::new("detached", "not exported").expect("a valid name");
                (c(), c())
            }
        };
        Shadow {
            code,
            equal,
            different,
            batches: AtomicU64::new(0),
            failed_calls: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            stages: Default::default(),
        }
    }

    /// The shadow version's code.
    pub fn code(&self) -> &Arc<PluginCode> {
        &self.code
    }

    /// Compares the shadow's output records with the active version's in `stage`, position by
    /// position, and counts the result. `shadow` is `None` when the shadow's call failed.
    pub fn compare(&self, stage: crate::handoff::Stage, active: &[u8], shadow: Option<&[u8]>) {
        use sluice_wire::Delimited;
        let per_stage = &self.stages[stage as usize];
        self.batches.fetch_add(1, Ordering::Relaxed);
        per_stage.batches.fetch_add(1, Ordering::Relaxed);
        let Some(shadow) = shadow else {
            let n = Delimited::new(active).count() as u64;
            self.failed_calls.fetch_add(1, Ordering::Relaxed);
            per_stage.failed_calls.fetch_add(1, Ordering::Relaxed);
            self.different.inc_by(n);
            per_stage.different.fetch_add(n, Ordering::Relaxed);
            return;
        };
        let (mut a, mut b) = (Delimited::new(active), Delimited::new(shadow));
        let (mut equal, mut different) = (0u64, 0u64);
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                (Some(x), Some(y)) if x.is_ok() && x == y => equal += 1,
                _ => different += 1,
            }
        }
        self.equal.inc_by(equal);
        self.different.inc_by(different);
        per_stage.equal.fetch_add(equal, Ordering::Relaxed);
        per_stage.different.fetch_add(different, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shadow = self.shadow.load();
        f.debug_struct("Slot")
            .field("active", &self.active.load().version())
            .field("shadow", &shadow.as_ref().map(|s| s.code.version().to_owned()))
            .finish()
    }
}

impl Slot {
    /// A slot running `code`, with no shadow.
    pub fn new(code: Arc<PluginCode>) -> Arc<Slot> {
        Arc::new(Slot {
            active: ArcSwap::new(code),
            shadow: ArcSwapOption::empty(),
            start_failures: AtomicU64::new(0),
            state_epoch: AtomicU64::new(0),
        })
    }

    /// How many times an operator asked for an empty state (see [`BoundPlugin::state_epoch`]).
    pub fn state_epoch(&self) -> u64 {
        self.state_epoch.load(Ordering::Acquire)
    }

    /// Times a worker could not start the active version.
    pub fn start_failures(&self) -> u64 {
        self.start_failures.load(Ordering::Relaxed)
    }

    /// The active version's code.
    pub fn active(&self) -> Arc<PluginCode> {
        self.active.load_full()
    }

    /// The shadow version, if one runs.
    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.load_full()
    }
}

/// A worker's instance of a plugin slot, with the configuration of the sources it serves. Call
/// [`sync`](Self::sync) between batches to pick up a new version.
pub struct BoundPlugin {
    pub(super) slot: Arc<Slot>,
    pub(super) instance: PluginInstance,
    pub(super) shadow: Option<(Arc<Shadow>, Option<PluginInstance>, crate::breaker::CircuitBreaker)>,
    /// A version whose instance could not start with this configuration, and when to try it again
    /// (not on every batch: the wait doubles from 1 s to 60 s).
    pub(super) refused: Option<(Arc<PluginCode>, std::time::Instant, std::time::Duration)>,
    /// The version this instance runs, for the API.
    pub(super) running: Arc<Running>,
}

impl BoundPlugin {
    /// Binds `instance` (of the slot's active version) to `slot`.
    pub fn new(slot: Arc<Slot>, instance: PluginInstance) -> Self {
        let running = Arc::new(Running::default());
        running.set(instance.code().version());
        BoundPlugin { slot, instance, shadow: None, refused: None, running }
    }

    /// The version this instance runs, updated when it switches.
    pub fn running(&self) -> Arc<Running> {
        self.running.clone()
    }

    /// An instance that is never swapped (its own slot).
    pub fn fixed(instance: PluginInstance) -> Self {
        let slot = Slot::new(instance.code().clone());
        BoundPlugin::new(slot, instance)
    }

    /// Switches to the slot's active (and shadow) version if they changed since the last batch.
    pub fn sync(&mut self) {
        let active = self.slot.active.load();
        let now = std::time::Instant::now();
        let waiting = self.refused.as_ref().is_some_and(|(r, at, _)| Arc::ptr_eq(r, &active) && now < *at);
        if !Arc::ptr_eq(&active, self.instance.code()) && !waiting {
            match PluginInstance::new(&active, self.instance.config()) {
                Ok(instance) => {
                    tracing::info!(plugin = active.name(), version = active.version(), "switched plugin version");
                    self.instance = instance;
                    self.refused = None;
                    self.running.set(active.version());
                }
                Err(error) => {
                    self.slot.start_failures.fetch_add(1, Ordering::Relaxed);
                    let wait = match &self.refused {
                        Some((r, _, wait)) if Arc::ptr_eq(r, &active) => {
                            (*wait * 2).min(std::time::Duration::from_secs(60))
                        }
                        _ => std::time::Duration::from_secs(1),
                    };
                    tracing::error!(
                        plugin = active.name(),
                        version = active.version(),
                        %error,
                        retry_in_ms = wait.as_millis() as u64,
                        "the new version does not start here; staying on {}",
                        self.instance.code().version()
                    );
                    self.refused = Some((Arc::clone(&active), now + wait, wait));
                }
            }
        }
        let shadow = self.slot.shadow.load();
        match (&*shadow, &self.shadow) {
            (None, None) => {}
            (None, Some(_)) => self.shadow = None,
            (Some(s), Some((mine, ..))) if Arc::ptr_eq(s, mine) => {}
            (Some(s), _) => {
                let instance = match PluginInstance::new(&s.code, self.instance.config()) {
                    Ok(instance) => Some(instance),
                    Err(error) => {
                        // Its batches count as failed calls (never a silent comparison of nothing).
                        tracing::warn!(plugin = s.code.name(), version = s.code.version(), %error, "the shadow version cannot start here");
                        None
                    }
                };
                self.shadow = Some((s.clone(), instance, crate::breaker::CircuitBreaker::new(&SHADOW_BREAKER)));
            }
        }
    }

    /// The instance batches run on.
    pub fn instance(&mut self) -> &mut PluginInstance {
        &mut self.instance
    }

    /// The shadow version and its instance (`None` when it could not start here), if one runs and
    /// its breaker lets this batch through (see [`SHADOW_BREAKER`]); report the call's outcome
    /// with [`shadow_outcome`](Self::shadow_outcome).
    pub fn shadow(&mut self) -> Option<(&Shadow, Option<&mut PluginInstance>)> {
        let (shadow, instance, breaker) = self.shadow.as_mut()?;
        if !breaker.allow(std::time::Instant::now()) {
            shadow.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some((&**shadow, instance.as_mut()))
    }

    /// Whether the shadow's call on the batch [`shadow`](Self::shadow) gave worked.
    pub fn shadow_outcome(&mut self, worked: bool) {
        if let Some((shadow, _, breaker)) = self.shadow.as_mut() {
            if worked {
                breaker.record_success();
            } else {
                breaker.record_failure(std::time::Instant::now());
                if !matches!(breaker.state(), crate::breaker::BreakerState::Closed) {
                    tracing::warn!(
                        plugin = shadow.code.name(),
                        version = shadow.code.version(),
                        cool_down_ms = breaker.next_cool_down().as_millis() as u64,
                        "a shadow call failed; the shadow is not run for a while, so it cannot slow the live path"
                    );
                }
            }
        }
    }

    /// The configuration the instances start with.
    pub fn config(&self) -> &[(String, String)] {
        self.instance.config()
    }

    /// The code of the active instance.
    pub fn code(&self) -> &Arc<PluginCode> {
        self.instance.code()
    }

    /// The slot's [`Slot::state_epoch`]: a link that sees it change drops its state.
    pub fn state_epoch(&self) -> u64 {
        self.slot.state_epoch()
    }

    /// The state format of the active instance's plugin (`None`: it keeps no state).
    pub fn code_format(&self) -> Option<String> {
        self.instance.state_format().map(str::to_owned)
    }
}

/// A shadow's comparison per stage.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowStages {
    /// Its `decode` calls (in the ingest role).
    pub decode: ShadowStageView,
    /// Its `transform` calls (in the process role).
    pub transform: ShadowStageView,
}

/// A shadow's comparison in one stage.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowStageView {
    /// Batches compared.
    pub batches: u64,
    /// Output records equal to the active version's.
    pub records_equal: u64,
    /// Output records that differ (or that one side lacks).
    pub records_different: u64,
    /// Shadow calls that failed.
    pub failed_calls: u64,
}
