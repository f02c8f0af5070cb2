//! sluice: WebSocket market-data feeds to Kafka, through sandboxed wasm plugins, to Druid.
//!
//! # Layout
//! The modules follow the data flow:
//! - [`proto`]: the `StreamData` record, generated from `proto/` by prost.
//! - [`symbols`]: symbol names to the ids records carry.
//! - [`plugin`]: the wasm runtime that runs plugins' `decode` and `transform`.
//! - [`cli`]: the command line, including `sluice plugin test`.

pub mod cli;
pub mod plugin;
pub mod proto;
pub mod symbols;
