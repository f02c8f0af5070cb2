//! sluice: WebSocket market-data feeds to Kafka, through sandboxed wasm plugins, to Druid.
//!
//! # Layout
//! The modules follow the data flow:
//! - [`source`]: WebSocket feeds, one task each: keep-alive, reconnects, rotation.
//! - [`decode`]: frames through the source's plugin; duplicates dropped and gaps counted by trade id.
//! - [`kafka`]: the producer, consumer and topics of the Kafka hand-off.
//! - [`log`]: the hand-off between the roles: Kafka, or the local log on one machine.
//! - [`proto`]: the `StreamData` record and the Druid sink row, generated from `proto/` by prost.
//! - [`symbols`]: symbol names to the ids records carry.
//! - [`plugin`]: the wasm runtime that runs plugins' `decode` and `transform`.
//! - [`pipeline`]: the only place that wires the stages together.
//! - [`transform`]: batches through a plugin's `transform`, with retry and bisection.
//! - [`breaker`]: the circuit breaker that stops calling a plugin that keeps failing.
//! - [`batch`]: the adaptive batcher in front of the sinks.
//! - [`sink`]: where rolled-up output lands: the embedded SQLite store, or Druid through a Kafka topic.
//! - [`api`]: the HTTP API: health, readiness and read-only queries over the embedded store.
//! - [`telemetry`]: every metric, for `/metrics`.
//! - [`config`]: the TOML configuration.
//! - [`cli`]: the command line, including `sluice plugin test`.

pub mod api;
pub mod batch;
pub mod breaker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decode;
pub mod feedsim;
pub mod log;
/// The Kafka hand-off; it lives in [`log`] (re-exported here).
pub use log::kafka;
pub mod pipeline;
pub mod plugin;
pub mod proto;
pub mod scaffold;
pub mod sink;
pub mod source;
pub mod symbols;
pub mod telemetry;
pub mod transform;
