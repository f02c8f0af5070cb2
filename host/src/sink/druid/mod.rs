//! The Druid sink. Druid has no push API: its Kafka supervisor pulls rows from a topic. So the sink writes
//! each trade to the Druid topic as a protobuf [`SinkRow`](crate::proto::SinkRow) ([`row`]), and keeps a
//! supervisor spec applied through the Overlord ([`overlord`]) that tells Druid how to read and roll those
//! rows up. The spec is generated from `[sink.druid]` ([`config`]) and checked offline first ([`spec`]); it
//! carries the protobuf descriptor inline, so Druid decodes rows with exactly the schema sluice writes.
//! The chains' plugin state goes to a compacted changelog topic in the transactions that carry the rows
//! ([`state`]), and checkpoints of the whole state, where a replay of a stateful chain starts from, to a
//! topic of their own in the same transactions ([`checkpoint`]).

pub mod checkpoint;
pub mod config;
pub mod delivery;
pub mod overlord;
pub mod row;
pub mod spec;
pub mod state;
pub mod supervisor;

pub use config::{DruidSinkConfig, Granularity, MetricConfig, MetricKind};
pub use delivery::{DruidSink, MAX_TRANSACTIONS_IN_FLIGHT, nth_transactional_id, transactional_id};
pub use overlord::{BasicAuth, OverlordClient, OverlordError, SupervisorHealth, SupervisorStatus};
pub use row::encode_row;
pub use spec::{
    ReindexTask, SpecError, SupervisorId, SupervisorSpec, reindex_task, replay_datasource, replay_range,
    replay_supervisor_spec, replay_topic, supervisor_spec, validate,
};
pub use supervisor::keep_supervisor;

/// The protobuf message Druid decodes from the topic, by its full name.
pub const SINK_ROW_MESSAGE: &str = "sluice.v1.SinkRow";
