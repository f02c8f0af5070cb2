//! The process role as a whole: [`ProcessRole::spawn`] builds each source's chain from the state
//! the sink committed and runs [`run_process`](super::run_process) on a thread of its own, starting
//! it again after a failure (an aborted transaction, a panic, an open breaker) from the last commit;
//! [`ProcessRole::stop`] ends it. Tests and benches start it alone, as `sluice run` does.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{Breakers, Names, Process, ProcessError, ProcessSettings, ProcessStats, restore_committed, run_process};
use crate::chain::Chain;
use crate::handoff::{Handoff, Reader};
use crate::plugin::PluginInstance;
use crate::plugin::registry::{BoundPlugin, Slot};
use crate::sink::{Committed, Sink, SinkSettings};
use crate::transform::{LinkState, Transformer};

/// How long a stop waits for the process role.
const STOP_WITHIN: Duration = Duration::from_secs(8);

/// What the process role runs with.
pub struct ProcessSetup {
    /// Where it reads.
    pub handoff: Handoff,
    /// Where it delivers.
    pub sink: SinkSettings,
    /// What the sink committed, read once at start ([`crate::sink::prepare`]).
    pub committed: Committed,
    /// The configured sources, by id; records of other ids are dead-lettered (no chain is bound
    /// to them).
    pub sources: Vec<(u32, String)>,
    /// The loaded plugins, by name.
    pub plugins: HashMap<String, Arc<Slot>>,
    /// Source and symbol names (the configured sources' names are filled in from `sources`).
    pub symbols: Arc<crate::symbols::Symbols>,
    /// Batching, breakers, health, metrics, and the chains as the API edits them (`edits`, whose
    /// book gives each source's chain).
    pub settings: ProcessSettings,
}

/// The process role, running on its thread.
pub struct ProcessRole {
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    stop: Arc<AtomicBool>,
    /// Its counters.
    pub stats: Arc<ProcessStats>,
}

/// A panic of the process role, as the error its supervisor handles like any other failure.
#[derive(Debug, thiserror::Error)]
#[error("the process role panicked: {0}")]
pub struct Panicked(String);

impl ProcessRole {
    /// Builds each source's chain (bound to its plugins' slots, each link from the state `committed`
    /// holds for it) and starts the role's thread.
    ///
    /// # Errors
    /// A chain names a plugin that is not loaded or whose `init` refuses its configuration, the
    /// committed state cannot be read, or the thread cannot start.
    pub fn spawn(setup: ProcessSetup) -> anyhow::Result<ProcessRole> {
        let stats = Arc::new(ProcessStats::default());
        let chains = build_chains(&setup, &stats)?;
        let names = Names {
            sources: setup.sources.iter().map(|(id, name)| (*id, Arc::from(name.as_str()))).collect(),
            symbols: setup.symbols.clone(),
        };
        if let Some(health) = &setup.settings.health {
            health.set("breakers", true, "all closed");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let supervisor = Supervisor { setup, names, chains, stats: stats.clone(), stop: stop.clone() };
        let thread = std::thread::Builder::new().name("sluice-process".into()).spawn(move || supervisor.run())?;
        Ok(ProcessRole { thread, stop, stats })
    }

    /// Stops the role: it finishes the batch in hand and returns. A call is bounded by its deadline
    /// and a failed batch by the link's budget, so the role stops within seconds; should it not, the
    /// stop goes on without it (what it did not commit is read again at the next start).
    ///
    /// # Errors
    /// The role's last attempt failed, or it panicked.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        match tokio::time::timeout(STOP_WITHIN, tokio::task::spawn_blocking(move || thread.join())).await {
            Ok(joined) => joined?.map_err(|_| anyhow::anyhow!("the process role panicked"))?,
            Err(_) => {
                tracing::error!(
                    within_s = STOP_WITHIN.as_secs(),
                    "the process role did not stop in time; what it did not commit is read again at the next start"
                );
                Ok(())
            }
        }
    }
}

/// Each configured source's chain, by source id: its links bound to their registry slots, each
/// starting from the state the sink committed for it.
fn build_chains(setup: &ProcessSetup, stats: &ProcessStats) -> anyhow::Result<HashMap<u32, Chain>> {
    let edits = setup.settings.edits.as_ref().context("the process role needs the chains' book")?;
    let mut chains = HashMap::new();
    for (id, source) in &setup.sources {
        let mut chain = Vec::new();
        for link in edits.book.chain(source).unwrap_or_default() {
            let key = link.state_key;
            let slot =
                setup.plugins.get(&link.plugin).with_context(|| format!("plugin {} is not loaded", link.plugin))?;
            let instance = PluginInstance::new(&slot.active(), &link.config_pairs())
                .with_context(|| format!("source {source}: plugin {}", link.plugin))?;
            let mut transformer =
                Transformer::bound(BoundPlugin::new(slot.clone(), instance)).with_budget(edits.budget);
            if let Some((format, entries)) = setup.committed.plugin_state(source, key)? {
                transformer.load_state(LinkState::committed(format, entries));
            }
            if setup.committed.shared_by_group() && transformer.state().format().is_some() {
                tracing::warn!(
                    source = %source,
                    plugin = %link.plugin,
                    group = %setup.sink.group,
                    "a stateful link with the Druid sink: run one process instance in this group (state is kept \
                     per link, not per partition)"
                );
            }
            chain.push((key, transformer));
            stats.watch_breaker(source, &link.plugin);
        }
        chains.insert(*id, Chain::keyed(*id, chain));
    }
    Ok(chains)
}

/// The role's thread: attempts of [`run_process`], each with a fresh reader and sink.
struct Supervisor {
    setup: ProcessSetup,
    names: Names,
    chains: HashMap<u32, Chain>,
    stats: Arc<ProcessStats>,
    stop: Arc<AtomicBool>,
}

impl Supervisor {
    fn run(mut self) -> anyhow::Result<()> {
        let mut pause = Duration::from_millis(200);
        let mut breakers = Breakers::default();
        // After a failure other than an open breaker a commit may have taken effect unreported: the
        // chains then start again from the sink's committed state, not from memory's.
        let mut unsure = false;
        loop {
            // A panic in the role is a failure like any other: logged, shown on /health/ready, and
            // the role starts again from the last commit (never a thread that is gone for good).
            let result = caught(|| self.attempt(&mut breakers, &mut unsure));
            if result.as_ref().is_err_and(|e| e.is::<Panicked>()) {
                self.stats.panics.fetch_add(1, Ordering::Relaxed);
            }
            match result {
                Ok(()) => return Ok(()),
                Err(e) if self.stopping() => return Err(e),
                Err(e) => {
                    let wait = self.after_failure(&e, &mut breakers, &mut pause, &mut unsure);
                    // Sleep in short steps so a stop request is not kept waiting.
                    let until = Instant::now() + wait;
                    while Instant::now() < until && !self.stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if self.stopping() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// One attempt: a reader and a sink, the chains' state read back when the last attempt may have
    /// committed unreported, then the role's loop until it stops or fails.
    fn attempt(&mut self, breakers: &mut Breakers, unsure: &mut bool) -> anyhow::Result<()> {
        let setup = &self.setup;
        let reader: Reader = setup.handoff.reader(&setup.sink.group, Some(&setup.sink.instance))?;
        let mut sink: Box<dyn Sink> = crate::sink::open(&setup.sink, &setup.handoff, &setup.committed)?;
        if *unsure {
            restore_committed(&mut self.chains, sink.as_mut(), &self.names)
                .context("reading the chains' committed state back")?;
            *unsure = false;
        }
        tracing::info!(sink = sink.name(), group = %setup.sink.group, "process role started");
        let process = Process {
            reader: &reader,
            chains: &mut self.chains,
            breakers,
            sink: sink.as_mut(),
            names: &self.names,
            settings: &setup.settings,
            stats: &self.stats,
        };
        run_process(process, &self.stop)
    }

    /// What a failed attempt means, and how long to wait before the next: at once for a due trial
    /// of a breaker, briefly for an open one (that source's records wait in the log; the others go
    /// on), else with a doubling backoff and the sink marked not ready.
    fn after_failure(
        &self,
        e: &anyhow::Error,
        breakers: &mut Breakers,
        pause: &mut Duration,
        unsure: &mut bool,
    ) -> Duration {
        match e.downcast_ref::<ProcessError>() {
            // The source is held from now on (see `run_process`): read again from the last commit at
            // once, so the other sources lose no more than that.
            Some(ProcessError::BreakerOpen { .. }) => {
                let wait = breakers.wait(Instant::now());
                tracing::warn!(error = %e, cool_down_ms = wait.as_millis() as u64, "the source's records wait in the log; the other sources go on");
                Duration::from_millis(50)
            }
            Some(ProcessError::TrialDue) => Duration::ZERO,
            None => {
                *unsure = true;
                if let Some(health) = &self.setup.settings.health {
                    health.set("sink", false, format!("{e:#}"));
                }
                if let Some(crate::handoff::LogError::RecordsDeleted { deleted, .. }) = e.downcast_ref() {
                    // Not resumed by trying again: an operator must act. Tried again (with the
                    // backoff) so that the role goes on once they have.
                    let records = deleted.iter().map(|d| (d.start - d.position).max(0) as u64).sum();
                    self.stats.deleted_unread.store(records, Ordering::Relaxed);
                    tracing::error!(
                        error = format!("{e:#}"),
                        "the process role stopped: retention deleted records it had not read"
                    );
                } else {
                    tracing::error!(error = format!("{e:#}"), "process role failed; resuming from the last commit");
                }
                *pause = (*pause * 2).min(Duration::from_secs(10));
                *pause
            }
        }
    }
}

/// Runs `attempt`, turning a panic into a [`Panicked`] error.
fn caught(attempt: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(attempt)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Panicked(message).into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic of an attempt is an error like any other, with its message: the process role's
    /// supervisor then logs it, shows it on `/health/ready` and starts the role again.
    #[test]
    fn a_panicking_attempt_is_an_error_not_a_lost_thread() {
        let e = caught(|| panic!("an index out of range")).unwrap_err();
        assert!(e.is::<Panicked>(), "{e:#}");
        assert!(e.to_string().contains("an index out of range"), "{e:#}");
        assert!(caught(|| Ok(())).is_ok());
        let plain = caught(|| Err(anyhow::anyhow!("a commit failed"))).unwrap_err();
        assert!(!plain.is::<Panicked>());
    }
}
