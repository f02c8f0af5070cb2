//! Sinks: where rolled-up output goes. `embedded` is the default on one machine; `druid` writes rows to a
//! Kafka topic that a Druid supervisor ingests.

pub mod druid;
pub mod embedded;
