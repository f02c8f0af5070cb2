//! sluice: WebSocket market-data feeds to Kafka, through sandboxed wasm plugins, to Druid.
//!
//! # Layout
//! The modules follow the data flow, and imports run one way, from the bottom of this list up:
//! - [`clock`], [`telemetry`] (every metric, and the health checks), [`batch`], [`breaker`],
//!   [`proto`] (the `StreamData` record and the Druid row, generated from `proto/` by prost).
//! - [`handoff`]: the hand-off between the roles: the local log on one machine, or Kafka
//!   ([`handoff::kafka`], also at [`kafka`]); dead letters and the stage that refused them.
//! - [`symbols`]: symbol names to the ids records carry, shared through the log.
//! - [`source`]: the feeds (WebSocket, or a recorded file), one task each, and their `[[source]]`
//!   table.
//! - [`plugin`]: the wasm runtime, the registry of versions and the hot-swap slots.
//! - [`decode`] and [`transform`]: frames through a source's decoder; records through one link,
//!   with retry, bisection and the link's state.
//! - [`chain`]: a source's links in order, the one runner the process role, replay and
//!   `sluice plugin test` share (rejects naming their link, source stamping); [`chains`]: the
//!   chain each source runs, as configured or as edited over the API (kept in the data directory).
//! - [`sink`]: where rows land: the embedded SQLite store, or Druid through a Kafka topic.
//! - [`api`]: the HTTP API: health, sources, plugins, queries, metrics, the page.
//! - [`config`]: the TOML configuration, one table per stage; [`datadir`]: the lock that makes one
//!   process the owner of a data directory.
//! - [`deploy`]: the plugins a configuration runs, deployed into the registry.
//! - [`ingest`] and [`process`]: the two roles, each owning its loop with a handle that starts it
//!   alone ([`ingest::Ingest::start`], [`process::ProcessRole::spawn`]).
//! - [`replay`]: a time range read again from the hand-off through the chains into the sink, as a
//!   job beside the live roles.
//! - [`pipeline`]: the only place that wires the stages together ([`pipeline::start`],
//!   [`pipeline::run`]).
//! - [`cli`]: the command line, including `sluice plugin new|test`, `demo`, `bench`, `replay` and
//!   `druid spec`;
//!   [`scaffold`] is what `plugin new` writes. The venue simulator they run is a crate of its own
//!   (`host/feedsim`, `feedsim`).

pub mod api;
pub mod batch;
pub mod breaker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod decode;
pub mod deploy;
pub mod handoff;
pub mod ingest;
/// The Kafka hand-off; it lives in [`handoff`] (re-exported here).
pub use handoff::kafka;
pub mod pipeline;
pub mod plugin;
pub mod process;
pub mod proto;
pub mod replay;
pub mod scaffold;
pub mod sink;
pub mod source;
pub mod symbols;
pub mod telemetry;
pub mod transform;

/// After [`transform`]: it runs a source's links, each a [`transform::Transformer`].
pub mod chain;
pub mod chains;
