//! Sinks: where rolled-up output goes. `embedded` is the default on one machine; Druid (through a
//! Kafka topic and a supervisor) comes next.

pub mod embedded;
