//! The host's integration tests, one binary (each linking wasmtime, librdkafka and SQLite took
//! a link of its own when every file was a binary): one module per area, and `common`, the rig they
//! share (a Kafka-protocol broker, a live `sluice` process, temporary directories, waiting).
//!
//! `cargo test -p sluice --test it -- MODULE::` runs one area, e.g. `-- restarts::`.

mod common;

mod api;
mod chains;
mod cli_run;
mod decode_stage;
mod docs;
mod druid_contract;
mod exactly_once;
mod faults;
mod faults_ingest;
mod ingest_end_to_end;
mod kafka_producer;
mod local_log;
mod plugin_runtime;
mod plugin_test_cli;
mod process_end_to_end;
mod replay;
mod restarts;
mod symbols_topic;
mod tutorial;
mod ui_page;
