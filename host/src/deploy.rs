//! Which plugins a configuration runs, deployed into the registry: each source's decoder in the
//! ingest role, each link of its chain in the process role (and in a replay), from the configured
//! file or the bundled build; with the instance pool sized for them.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;

use crate::chains::ChainBook;
use crate::config::Config;
use crate::plugin::registry::{Binding, Registry, Slot};
use crate::plugin::{Limits, Runtime, RuntimeSettings, bundled};
use crate::symbols::Symbols;
use crate::telemetry::Metrics;

/// Which roles `sluice run` plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Both roles in one process (the default).
    All,
    /// Sources to Kafka only.
    Ingest,
    /// Kafka through the plugins to the sink only.
    Process,
}

/// Opens the plugin registry under the data directory and deploys the plugins the sources use in
/// `role` (decoders for ingest, the links of their chains for process; the configured file or the
/// bundled plugin; a version already stored stays on the version the API last
/// activated). Compiles off the async runtime.
pub async fn open_plugins(
    config: &Config,
    role: Role,
    book: Arc<ChainBook>,
    symbols: Arc<Symbols>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<Registry>, HashMap<String, Arc<Slot>>)> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let limits: HashMap<String, Limits> =
            config.plugins.iter().map(|(name, p)| (name.clone(), Limits::from(p))).collect();
        let settings = runtime_settings(&config, role, &book, &limits);
        tracing::debug!(
            instances = settings.max_instances,
            memory_bytes = settings.max_memory_bytes,
            "plugin instance pool"
        );
        let runtime = Arc::new(Runtime::new(settings, symbols)?.with_metrics(metrics));
        // What this instance runs: each source's decoder in the ingest role, each link of its chain
        // in the process role; an upload is checked against every configuration it is bound with.
        let mut bindings: HashMap<String, Vec<Binding>> = HashMap::new();
        for s in &config.sources {
            if role != Role::Process {
                bindings
                    .entry(s.decode.clone())
                    .or_default()
                    .push(Binding { source: s.name.clone(), config: s.decode_pairs() });
            }
            if role != Role::Ingest {
                for link in book.chain(&s.name).unwrap_or_default() {
                    let binding = Binding { source: s.name.clone(), config: link.config_pairs() };
                    bindings.entry(link.plugin.clone()).or_default().push(binding);
                }
            }
        }
        let mut wanted: Vec<String> = bindings.keys().cloned().collect();
        wanted.sort_unstable();
        let registry = Arc::new(Registry::open(runtime, &config.data_dir.join("plugins"), limits, bindings)?);
        let mut slots = HashMap::new();
        for name in &wanted {
            let name = name.as_str();
            let slot = match plugin_bytes(&config, name) {
                Ok(wasm) => registry.deploy(name, &wasm).with_context(|| format!("plugin {name}"))?,
                // Uploaded over the API and put in a chain there: the version the registry keeps.
                Err(e) => registry.load(name).map_err(|_| e)?,
            };
            slots.insert(name.to_owned(), slot);
        }
        Ok((registry, slots))
    })
    .await?
}

/// The plugin instance pool this configuration needs in `role`: an instance per source's decoder
/// (a worker instantiates only the bindings of the sources it owns) and per link of each chain,
/// each of them with room for a shadow beside it and for the next version while a swap starts it,
/// plus a margin; each slot sized for the largest memory limit configured. A fixed pool would
/// refuse a start with many sources or links, or reserve far more than a small one needs.
fn runtime_settings(
    config: &Config,
    role: Role,
    book: &ChainBook,
    limits: &HashMap<String, Limits>,
) -> RuntimeSettings {
    let mut instances: u32 = 0;
    for s in &config.sources {
        if role != Role::Process {
            instances = instances.saturating_add(1);
        }
        if role != Role::Ingest {
            instances = instances.saturating_add(book.chain(&s.name).map_or(0, |c| c.len()) as u32);
        }
    }
    let memory = limits.values().map(|l| l.memory_bytes).chain([Limits::default().memory_bytes]).max();
    RuntimeSettings {
        max_instances: instances.saturating_mul(3).saturating_add(16),
        max_memory_bytes: memory.unwrap_or(Limits::default().memory_bytes),
        ..RuntimeSettings::default()
    }
}

/// The component of plugin `name`: the file `[plugins.<name>] path` names, or the bundled one.
pub(crate) fn plugin_bytes(config: &Config, name: &str) -> anyhow::Result<Vec<u8>> {
    match config.plugins.get(name).and_then(|p| p.path.as_ref()) {
        Some(path) => std::fs::read(path).with_context(|| format!("plugin {name}: cannot read {}", path.display())),
        None => Ok(bundled::by_name(name)
            .with_context(|| format!("plugin {name} is not bundled and has no path"))?
            .to_vec()),
    }
}
