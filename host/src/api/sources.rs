//! `GET /v1/sources`: each source's connection state, bound plugin and version, and counters.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::ApiState;
use crate::chain::LinkRejects;
use crate::decode::DecodeStats;
use crate::source::{SourceStats, State as Connection};

/// One source as the API shows it; the counters are read live.
#[derive(Debug)]
pub struct SourceEntry {
    /// The source's name.
    pub name: String,
    /// The plugin decoding its frames.
    pub plugin: String,
    /// The plugin's registry slot, read live: its active version is the one decoding now.
    pub slot: Arc<crate::plugin::registry::Slot>,
    /// Connection counters.
    pub stats: Arc<SourceStats>,
    /// Decode counters.
    pub decode: Arc<DecodeStats>,
    /// The chain of transforms its records go through in the process role, in order, with each
    /// link's registry slot when this instance runs that role.
    pub transforms: Vec<(String, Option<Arc<crate::plugin::registry::Slot>>)>,
    /// The version the worker decoding this source actually runs (it can lag the slot's active
    /// version while a new version fails to start there).
    pub running: Arc<crate::plugin::registry::Running>,
}

/// The sources, filled in once the ingest role has started them (empty before, and in a process-only
/// instance).
#[derive(Debug, Default)]
pub struct SourceDirectory(OnceLock<Vec<SourceEntry>>, OnceLock<Arc<LinkRejects>>);

impl SourceDirectory {
    /// Publishes the sources; only the first call counts.
    pub fn set(&self, entries: Vec<SourceEntry>) {
        let _ = self.0.set(entries);
    }

    /// Publishes what the process role's links refused, once it runs; only the first call counts.
    pub fn set_link_rejects(&self, rejects: Arc<LinkRejects>) {
        let _ = self.1.set(rejects);
    }
}

#[derive(Serialize)]
struct SourceView<'a> {
    name: &'a str,
    state: &'static str,
    plugin: &'a str,
    plugin_version: String,
    /// The transforms, in order, and the version active for each (`null` in an ingest-only instance).
    transforms: Vec<LinkView>,
    /// Times a worker could not start the plugin's active version (it stays on the one it runs).
    plugin_start_failures: u64,
    reconnects: u64,
    /// Connections given up because the venue stopped taking our writes (see `SourceStats`).
    write_timeouts: u64,
    frames: u64,
    records: u64,
    /// Frames its decoder refused.
    rejects: u64,
    /// Records the links of its chain refused (`null` where this instance runs no process role).
    transform_rejects: Option<u64>,
    duplicates: u64,
    gaps: u64,
    /// Trade ids the venue sent while sluice was down (found at the first trade after a start).
    downtime_gaps: u64,
    dropped_frames: u64,
    /// Milliseconds since the last message, `null` before the first.
    last_message_age_ms: Option<u64>,
}

#[derive(Serialize)]
struct LinkView {
    plugin: String,
    version: Option<String>,
    /// Records this link refused (`null` where this instance runs no process role).
    rejects: Option<u64>,
}

/// `GET /v1/sources`.
pub(super) async fn list(State(state): State<ApiState>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let now_us = crate::clock::now_us();
    let entries = state.sources.0.get().map(Vec::as_slice).unwrap_or_default();
    let refused = state.sources.1.get();
    let views: Vec<SourceView<'_>> = entries
        .iter()
        .map(|e| {
            let last = e.stats.last_message_us.load(Relaxed);
            SourceView {
                name: &e.name,
                state: match e.stats.state() {
                    Connection::Connecting => "connecting",
                    Connection::Up => "up",
                    Connection::Backoff => "backoff",
                    Connection::Stopped => "stopped",
                    Connection::Finished => "finished",
                },
                plugin: &e.plugin,
                plugin_version: e
                    .running
                    .get()
                    .map_or_else(|| e.slot.active().version().to_owned(), |v| v.as_str().to_owned()),
                transforms: match (&state.chains, state.plugins.get()) {
                    // The chain as it runs now, edits included.
                    (Some(book), Ok(registry)) => book
                        .chain(&e.name)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|l| LinkView {
                            version: registry.slot(&l.plugin).map(|s| s.active().version().to_owned()),
                            rejects: refused.map(|r| r.of(&e.name, &l.plugin).0),
                            plugin: l.plugin,
                        })
                        .collect(),
                    _ => e
                        .transforms
                        .iter()
                        .map(|(plugin, slot)| LinkView {
                            plugin: plugin.clone(),
                            version: slot.as_ref().map(|s| s.active().version().to_owned()),
                            rejects: refused.map(|r| r.of(&e.name, plugin).0),
                        })
                        .collect(),
                },
                plugin_start_failures: e.slot.start_failures(),
                reconnects: e.stats.reconnects.load(Relaxed),
                write_timeouts: e.stats.write_timeouts.load(Relaxed),
                frames: e.stats.frames.load(Relaxed),
                records: e.decode.records.load(Relaxed),
                rejects: e.decode.rejects.load(Relaxed),
                transform_rejects: refused.map(|r| r.of(&e.name, "").1),
                duplicates: e.decode.duplicates.load(Relaxed),
                gaps: e.decode.gaps.load(Relaxed),
                downtime_gaps: e.decode.downtime_gaps.load(Relaxed),
                dropped_frames: e.stats.dropped.load(Relaxed),
                last_message_age_ms: (last > 0).then(|| u64::try_from((now_us - last).max(0) / 1000).unwrap_or(0)),
            }
        })
        .collect();
    Json(serde_json::json!({ "sources": views }))
}
