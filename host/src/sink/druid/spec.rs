//! The Kafka supervisor spec Druid ingests the sink topic with, generated from `[sink.druid]` and checked
//! offline first, so that a spec the Overlord would refuse (or worse, accept and ingest wrongly) never leaves
//! the process.
//!
//! The spec's shape follows Druid's Kafka ingestion docs: `dataSchema` (timestampSpec in millis, string
//! dimensions, metricsSpec, a uniform granularitySpec), `ioConfig` (the topic, the protobuf input format with
//! the descriptor set inline, `isolation.level=read_committed` so only committed transactions are read) and
//! a Kafka `tuningConfig`.

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use super::SINK_ROW_MESSAGE;
use super::config::DruidSinkConfig;

/// The column Druid keeps the row time in; no dimension or metric may take its name.
const TIME_COLUMN: &str = "__time";

/// Consumer properties sluice sets itself and a configuration may not override.
const RESERVED_CONSUMER_PROPERTIES: [&str; 2] = ["bootstrap.servers", "isolation.level"];

/// Why a `[sink.druid]` configuration cannot become a supervisor spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The datasource name breaks one of Druid's rules for ids.
    #[error("datasource {name:?}: {rule}")]
    Datasource {
        /// The name as configured.
        name: String,
        /// The rule it breaks.
        rule: DatasourceRule,
    },
    /// The topic is not a legal Kafka topic name.
    #[error("topic {topic:?}: {reason}")]
    Topic {
        /// The topic as configured.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A dimension or metric has an empty name.
    #[error("a {role} has an empty name")]
    EmptyName {
        /// `dimension` or `metric`.
        role: &'static str,
    },
    /// A dimension or metric is named `__time`, the column Druid keeps the row time in.
    #[error("{name:?} is Druid's time column and cannot be a dimension or metric")]
    ReservedName {
        /// The name.
        name: String,
    },
    /// The same dimension is listed twice.
    #[error("dimension {name:?} is listed twice")]
    DuplicateDimension {
        /// The name.
        name: String,
    },
    /// Two metrics share a name.
    #[error("metric {name:?} is defined twice")]
    DuplicateMetric {
        /// The name.
        name: String,
    },
    /// A metric would write the column a dimension already is.
    #[error("metric {name:?} has the name of a dimension")]
    MetricShadowsDimension {
        /// The name.
        name: String,
    },
    /// A column the spec reads is not a field of the sink row.
    #[error(
        "{role} reads {column:?}, which is not a field of {SINK_ROW_MESSAGE} (fields go by their JSON names: {known})"
    )]
    UnknownColumn {
        /// What reads it: `timestamp`, `dimension` or `metric <name>`.
        role: String,
        /// The column.
        column: String,
        /// The fields there are, comma-separated.
        known: String,
    },
    /// A metric other than `count` lacks its field.
    #[error("metric {metric:?} ({kind}) needs a field")]
    MissingMetricField {
        /// The metric.
        metric: String,
        /// Its aggregator.
        kind: &'static str,
    },
    /// A `count` metric names a field it would ignore.
    #[error("metric {metric:?} is a count and takes no field")]
    UnexpectedMetricField {
        /// The metric.
        metric: String,
    },
    /// A numeric aggregator over a field that is not a number.
    #[error("metric {metric:?} ({kind}) needs a numeric field, and {field:?} is not one")]
    NotNumeric {
        /// The metric.
        metric: String,
        /// Its aggregator.
        kind: &'static str,
        /// The field.
        field: String,
    },
    /// The timestamp column is not an integer field (milliseconds since the epoch).
    #[error("timestamp column {column:?} is not an integer field")]
    TimestampNotInteger {
        /// The column.
        column: String,
    },
    /// A setting that must be an ISO-8601 period (`PT10M`, `P1D`) is not one.
    #[error("{setting} = {value:?} is not an ISO-8601 period such as PT1H")]
    Period {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: String,
    },
    /// A count that must be at least one is zero.
    #[error("{setting} must be at least 1")]
    Zero {
        /// The setting.
        setting: &'static str,
    },
    /// A count is above the most it may be.
    #[error("{setting} may be at most {max}")]
    TooMany {
        /// The setting.
        setting: &'static str,
        /// The most it may be.
        max: u32,
    },
    /// `consumer_options` tries to set a property sluice owns.
    #[error("consumer_options may not set {key:?}: sluice sets it")]
    ReservedConsumerProperty {
        /// The property.
        key: String,
    },
    /// Neither `bootstrap_servers` nor sluice's own brokers say where Kafka is.
    #[error("no Kafka bootstrap servers for Druid: set [sink.druid] bootstrap_servers")]
    NoBootstrapServers,
    /// The descriptor set is not a protobuf `FileDescriptorSet`.
    #[error("the descriptor set does not decode: {0}")]
    Descriptor(String),
    /// The descriptor set lacks the sink row message.
    #[error("the descriptor set has no message {0}")]
    MessageNotFound(&'static str),
    /// A replay's name is not one a replay topic and datasource can be named after.
    #[error("{0}")]
    ReplayName(String),
    /// A reindex covers whole segments, and this segment granularity has no bounded ones.
    #[error("segment_granularity {0} has no bounded segments to reindex; use HOUR, DAY or another bounded one")]
    UnboundedSegments(&'static str),
    /// A reindex interval that ends where (or before) it starts.
    #[error("the reindex interval is empty: until ({until} ms) must be later than since ({since} ms)")]
    EmptyInterval {
        /// Its start, ms since the epoch.
        since: i64,
        /// Its end, ms since the epoch.
        until: i64,
    },
}

/// The rules Druid applies to datasource names (and other ids), in the order Druid checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasourceRule {
    /// The name is empty.
    Empty,
    /// The name starts with `.`.
    LeadingDot,
    /// The name contains `/`.
    Slash,
    /// The name contains whitespace other than a plain space (tab, newline, ...).
    Whitespace,
    /// The name contains a character Druid refuses (control characters, characters outside the basic
    /// multilingual plane, private-use characters); the UTF-16 code unit and its position, as Druid reports
    /// them.
    IllegalCharacter {
        /// The UTF-16 code unit.
        unit: u16,
        /// Its index among the name's UTF-16 code units.
        position: usize,
    },
}

impl fmt::Display for DatasourceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasourceRule::Empty => f.write_str("must not be empty"),
            DatasourceRule::LeadingDot => f.write_str("cannot start with '.'"),
            DatasourceRule::Slash => f.write_str("cannot contain '/'"),
            DatasourceRule::Whitespace => f.write_str("contains whitespace other than a space"),
            DatasourceRule::IllegalCharacter { unit, position } => {
                write!(f, "contains illegal character #{unit} at position {position}")
            }
        }
    }
}

/// A supervisor's id. For a Kafka supervisor Druid uses the datasource name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SupervisorId(pub String);

impl fmt::Display for SupervisorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A supervisor spec that passed [`validate`]. Only [`supervisor_spec`] makes one, so whatever reaches the
/// Overlord has been checked.
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorSpec {
    id: SupervisorId,
    json: Value,
}

impl SupervisorSpec {
    /// The id Druid will give the supervisor.
    pub fn id(&self) -> &SupervisorId {
        &self.id
    }

    /// The spec as the Overlord receives it.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The spec as JSON, consuming it.
    pub fn into_json(self) -> Value {
        self.json
    }
}

/// Checks `cfg` and generates the Kafka supervisor spec for it.
///
/// `descriptor_set` is the encoded `FileDescriptorSet` that holds [`SINK_ROW_MESSAGE`] (in sluice,
/// [`crate::proto::DESCRIPTOR_SET`]); it travels inline in the spec, base64-encoded. `brokers` are sluice's
/// Kafka brokers, used as Druid's bootstrap servers unless `cfg.bootstrap_servers` says otherwise.
///
/// # Errors
/// Whatever [`validate`] finds.
pub fn supervisor_spec(
    cfg: &DruidSinkConfig,
    descriptor_set: &[u8],
    brokers: &str,
) -> Result<SupervisorSpec, SpecError> {
    validate(cfg, descriptor_set, brokers)?;
    let bootstrap = bootstrap_servers(cfg, brokers).unwrap_or_default();

    let metrics = metrics_spec(cfg);
    let io = io_config(cfg, descriptor_set, bootstrap);
    let json = json!({
        "type": "kafka",
        "spec": {
            "dataSchema": {
                "dataSource": cfg.datasource,
                "timestampSpec": { "column": cfg.timestamp_column, "format": "millis" },
                "dimensionsSpec": { "dimensions": cfg.dimensions },
                "metricsSpec": metrics,
                "granularitySpec": {
                    "type": "uniform",
                    "segmentGranularity": cfg.segment_granularity.as_druid(),
                    "queryGranularity": cfg.query_granularity.as_druid(),
                    "rollup": cfg.rollup,
                },
            },
            "ioConfig": io,
            "tuningConfig": {
                "type": "kafka",
                "logParseExceptions": true,
                "maxSavedParseExceptions": 100,
            },
        },
        "suspended": false,
    });
    Ok(SupervisorSpec { id: SupervisorId(cfg.datasource.clone()), json })
}

/// The spec's `metricsSpec`: one aggregator per configured metric.
fn metrics_spec(cfg: &DruidSinkConfig) -> Vec<Value> {
    cfg.metrics
        .iter()
        .map(|m| {
            let mut o = Map::new();
            o.insert("type".into(), m.kind.as_druid().into());
            o.insert("name".into(), m.name.clone().into());
            if let Some(field) = &m.field {
                o.insert("fieldName".into(), field.clone().into());
            }
            Value::Object(o)
        })
        .collect()
}

/// The spec's `ioConfig`: the topic, the rows' protobuf format with the descriptor inline, and a
/// consumer that reads only committed transactions.
fn io_config(cfg: &DruidSinkConfig, descriptor_set: &[u8], bootstrap: &str) -> Value {
    let mut consumer = Map::new();
    consumer.insert("bootstrap.servers".into(), bootstrap.into());
    consumer.insert("isolation.level".into(), "read_committed".into());
    for (k, v) in &cfg.consumer_options {
        consumer.insert(k.clone(), v.clone().into());
    }

    let mut io = json!({
        "type": "kafka",
        "topic": cfg.topic,
        "inputFormat": {
            "type": "protobuf",
            "protoBytesDecoder": {
                "type": "inline",
                "descriptorString": base64::engine::general_purpose::STANDARD.encode(descriptor_set),
                "protoMessageType": SINK_ROW_MESSAGE,
            },
        },
        "consumerProperties": consumer,
        "taskCount": cfg.task_count,
        "replicas": cfg.replicas,
        "taskDuration": cfg.task_duration,
        "useEarliestOffset": cfg.use_earliest_offset,
    });
    if let Some(io) = io.as_object_mut() {
        if let Some(p) = &cfg.late_message_rejection_period {
            io.insert("lateMessageRejectionPeriod".into(), p.clone().into());
        }
        if let Some(p) = &cfg.early_message_rejection_period {
            io.insert("earlyMessageRejectionPeriod".into(), p.clone().into());
        }
    }
    io
}

/// The topic a replay named `name` writes its rows to: `<topic>.replay.<name>`.
pub fn replay_topic(cfg: &DruidSinkConfig, name: &str) -> String {
    format!("{}.replay.{name}", cfg.topic)
}

/// The datasource a replay named `name` is ingested into: `<datasource>_replay_<name>`.
pub fn replay_datasource(cfg: &DruidSinkConfig, name: &str) -> String {
    format!("{}_replay_{name}", cfg.datasource)
}

/// The trade times a replay with the Druid sink covers: `[since, until)` widened to whole segments
/// (`segment_granularity`), since Druid overwrites whole segments and a reindex of the range must
/// carry every row of each (the query granularity's buckets when the segments are unbounded,
/// `ALL`). `until` `None` has no end.
pub fn replay_range(cfg: &DruidSinkConfig, since_ms: i64, until_ms: Option<i64>) -> (i64, Option<i64>) {
    let g = if cfg.segment_granularity.floor_ms(since_ms).is_some() {
        cfg.segment_granularity
    } else {
        cfg.query_granularity
    };
    (g.floor_ms(since_ms).unwrap_or(since_ms), until_ms.map(|u| g.ceil_ms(u).unwrap_or(u)))
}

/// The Kafka supervisor spec of the datasource a replay named `name` is ingested into: the live spec
/// (generated by [`supervisor_spec`] from the same `cfg`: dimensions, metrics, granularities, the
/// descriptor, the consumer properties) for [`replay_datasource`] reading [`replay_topic`] from its
/// start, with no late or early message rejection (replayed rows are old on purpose).
///
/// # Errors
/// A name a replay cannot have ([`SpecError::ReplayName`]), or what [`validate`] finds.
pub fn replay_supervisor_spec(
    cfg: &DruidSinkConfig,
    descriptor_set: &[u8],
    brokers: &str,
    name: &str,
) -> Result<SupervisorSpec, SpecError> {
    crate::sink::embedded::check_replay_name(name).map_err(SpecError::ReplayName)?;
    let replay = DruidSinkConfig {
        datasource: replay_datasource(cfg, name),
        topic: replay_topic(cfg, name),
        use_earliest_offset: true,
        late_message_rejection_period: None,
        early_message_rejection_period: None,
        ..cfg.clone()
    };
    supervisor_spec(&replay, descriptor_set, brokers)
}

/// A native batch task that passed its checks: only [`reindex_task`] makes one.
#[derive(Clone, Debug, PartialEq)]
pub struct ReindexTask {
    interval: (i64, i64),
    json: Value,
}

impl ReindexTask {
    /// The interval it overwrites, ms since the epoch (start inclusive, end exclusive).
    pub fn interval(&self) -> (i64, i64) {
        self.interval
    }

    /// The task as the Overlord's `/druid/indexer/v1/task` receives it.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The task as JSON, consuming it.
    pub fn into_json(self) -> Value {
        self.json
    }
}

/// The `index_parallel` task that overwrites the live datasource over `[since, until)` (widened to
/// whole segments, as [`replay_range`] widens the replay) with the rows of the replay named
/// `name`, read from its datasource ([`replay_datasource`], filled by
/// [`replay_supervisor_spec`]'s supervisor) with Druid's `druid` input source.
///
/// The live spec's dimensions and granularities; each metric as its combining form over the
/// replay datasource's column of the same name (a `count` becomes the `longSum` of the counts);
/// `__time` as the timestamp; `granularitySpec.intervals` the interval, so only it is locked and
/// written; `appendToExisting: false` so the segments written replace the interval's, and
/// `dropExisting: true` so a segment the replay has no rows for is dropped too.
///
/// # Errors
/// What [`replay_supervisor_spec`] refuses, an empty interval, or segments with no bounds (`ALL`).
pub fn reindex_task(
    cfg: &DruidSinkConfig,
    descriptor_set: &[u8],
    brokers: &str,
    name: &str,
    since_ms: i64,
    until_ms: i64,
) -> Result<ReindexTask, SpecError> {
    let replay = replay_supervisor_spec(cfg, descriptor_set, brokers, name)?;
    let g = cfg.segment_granularity;
    let (Some(start), Some(end)) = (g.floor_ms(since_ms), g.ceil_ms(until_ms)) else {
        return Err(SpecError::UnboundedSegments(g.as_druid()));
    };
    if until_ms <= since_ms {
        return Err(SpecError::EmptyInterval { since: since_ms, until: until_ms });
    }
    let interval = format!("{}/{}", crate::clock::rfc3339_ms(start), crate::clock::rfc3339_ms(end));
    let metrics: Vec<Value> = cfg
        .metrics
        .iter()
        .map(|m| {
            let kind = match m.kind {
                super::MetricKind::Count => "longSum",
                other => other.as_druid(),
            };
            json!({ "type": kind, "name": m.name, "fieldName": m.name })
        })
        .collect();
    let json = json!({
        "type": "index_parallel",
        "spec": {
            "dataSchema": {
                "dataSource": cfg.datasource,
                "timestampSpec": { "column": TIME_COLUMN, "format": "millis" },
                "dimensionsSpec": { "dimensions": cfg.dimensions },
                "metricsSpec": metrics,
                "granularitySpec": {
                    "type": "uniform",
                    "segmentGranularity": g.as_druid(),
                    "queryGranularity": cfg.query_granularity.as_druid(),
                    "rollup": cfg.rollup,
                    "intervals": [interval],
                },
            },
            "ioConfig": {
                "type": "index_parallel",
                "inputSource": {
                    "type": "druid",
                    "dataSource": replay.id().0,
                    "interval": interval,
                },
                "appendToExisting": false,
                "dropExisting": true,
            },
            "tuningConfig": {
                "type": "index_parallel",
                "partitionsSpec": { "type": "dynamic" },
                "maxNumConcurrentSubTasks": cfg.task_count.max(2),
                "logParseExceptions": true,
                "maxSavedParseExceptions": 100,
            },
        },
    });
    Ok(ReindexTask { interval: (start, end), json })
}

/// Checks `cfg` against Druid's rules and the sink row's fields in `descriptor_set`, without any network.
///
/// # Errors
/// The first problem found, as a [`SpecError`]: datasource and topic names, empty, reserved or duplicate
/// dimension and metric names, a metric named like a dimension, a timestamp, dimension or metric column that
/// is not a sink-row field (or has the wrong type), malformed periods, zero task counts, reserved consumer
/// properties, missing bootstrap servers, and a descriptor set without the sink row.
pub fn validate(cfg: &DruidSinkConfig, descriptor_set: &[u8], brokers: &str) -> Result<(), SpecError> {
    if let Err(rule) = check_datasource(&cfg.datasource) {
        return Err(SpecError::Datasource { name: cfg.datasource.clone(), rule });
    }
    check_topic(&cfg.topic)?;
    check_columns(cfg)?;
    check_row_fields(cfg, descriptor_set)?;
    check_settings(cfg, brokers)
}

/// The dimension and metric names (valid, each once, no metric named like a dimension) and whether
/// each metric has a field exactly when its kind reads one.
fn check_columns(cfg: &DruidSinkConfig) -> Result<(), SpecError> {
    let mut dimensions = BTreeSet::new();
    for d in &cfg.dimensions {
        check_column_name(d, "dimension")?;
        if !dimensions.insert(d.as_str()) {
            return Err(SpecError::DuplicateDimension { name: d.clone() });
        }
    }
    let mut metrics = BTreeSet::new();
    for m in &cfg.metrics {
        check_column_name(&m.name, "metric")?;
        if !metrics.insert(m.name.as_str()) {
            return Err(SpecError::DuplicateMetric { name: m.name.clone() });
        }
        if dimensions.contains(m.name.as_str()) {
            return Err(SpecError::MetricShadowsDimension { name: m.name.clone() });
        }
        match (m.kind.takes_field(), &m.field) {
            (true, None) => {
                return Err(SpecError::MissingMetricField { metric: m.name.clone(), kind: m.kind.as_druid() });
            }
            (false, Some(_)) => return Err(SpecError::UnexpectedMetricField { metric: m.name.clone() }),
            _ => {}
        }
    }
    Ok(())
}

/// The timestamp, dimension and metric columns against the sink row's fields in `descriptor_set`:
/// each one there, the timestamp an integer and every metric's field a number.
fn check_row_fields(cfg: &DruidSinkConfig, descriptor_set: &[u8]) -> Result<(), SpecError> {
    let row = sink_row_fields(descriptor_set)?;
    let timestamp = row.lookup("timestamp", &cfg.timestamp_column)?;
    if !is_integer(timestamp) {
        return Err(SpecError::TimestampNotInteger { column: cfg.timestamp_column.clone() });
    }
    for d in &cfg.dimensions {
        row.lookup("dimension", d)?;
    }
    for m in &cfg.metrics {
        if let Some(field) = &m.field {
            let ty = row.lookup(&format!("metric {}", m.name), field)?;
            if !is_numeric(ty) {
                return Err(SpecError::NotNumeric {
                    metric: m.name.clone(),
                    kind: m.kind.as_druid(),
                    field: field.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The other settings: ISO periods, counts above zero (and transactions in flight within the
/// delivery's bound), no consumer property sluice sets itself, and some bootstrap servers.
fn check_settings(cfg: &DruidSinkConfig, brokers: &str) -> Result<(), SpecError> {
    let periods = [
        ("task_duration", Some(&cfg.task_duration)),
        ("late_message_rejection_period", cfg.late_message_rejection_period.as_ref()),
        ("early_message_rejection_period", cfg.early_message_rejection_period.as_ref()),
    ];
    for (setting, value) in periods {
        if let Some(v) = value.filter(|v| !is_iso_period(v)) {
            return Err(SpecError::Period { setting, value: v.clone() });
        }
    }
    if cfg.task_count == 0 {
        return Err(SpecError::Zero { setting: "task_count" });
    }
    if cfg.replicas == 0 {
        return Err(SpecError::Zero { setting: "replicas" });
    }
    if cfg.transactions_in_flight == 0 {
        return Err(SpecError::Zero { setting: "transactions_in_flight" });
    }
    let max = super::delivery::MAX_TRANSACTIONS_IN_FLIGHT as u32;
    if cfg.transactions_in_flight > max {
        return Err(SpecError::TooMany { setting: "transactions_in_flight", max });
    }
    if let Some(key) = cfg.consumer_options.keys().find(|k| RESERVED_CONSUMER_PROPERTIES.contains(&k.as_str())) {
        return Err(SpecError::ReservedConsumerProperty { key: key.clone() });
    }
    if bootstrap_servers(cfg, brokers).is_none() {
        return Err(SpecError::NoBootstrapServers);
    }
    Ok(())
}

/// The brokers Druid's tasks connect to, if any are known.
fn bootstrap_servers<'a>(cfg: &'a DruidSinkConfig, brokers: &'a str) -> Option<&'a str> {
    let servers = cfg.bootstrap_servers.as_deref().unwrap_or(brokers).trim();
    (!servers.is_empty()).then_some(servers)
}

/// Druid's id rules (`IdUtils.validateId`), which datasource names must pass. Druid works on UTF-16 code
/// units, so this does too: any character outside the basic multilingual plane is refused.
fn check_datasource(name: &str) -> Result<(), DatasourceRule> {
    if name.is_empty() {
        return Err(DatasourceRule::Empty);
    }
    if name.starts_with('.') {
        return Err(DatasourceRule::LeadingDot);
    }
    if name.contains('/') {
        return Err(DatasourceRule::Slash);
    }
    // Java's `\s` without UNICODE_CHARACTER_CLASS: tab, newline, vertical tab, form feed, carriage return.
    if name.chars().any(|c| matches!(c, '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')) {
        return Err(DatasourceRule::Whitespace);
    }
    for (position, unit) in name.encode_utf16().enumerate() {
        let illegal = (unit > 0 && unit < 31)
            || (unit > 127 && unit < 159)
            || (unit > 0xd800 && unit < 0xf8ff)
            || (unit > 0xfff0 && unit < 0xffff);
        if illegal {
            return Err(DatasourceRule::IllegalCharacter { unit, position });
        }
    }
    Ok(())
}

/// Kafka's topic name rules: 1 to 249 characters from `[a-zA-Z0-9._-]`, and not `.` or `..`.
fn check_topic(topic: &str) -> Result<(), SpecError> {
    let reason = if topic.is_empty() {
        Some("must not be empty")
    } else if topic == "." || topic == ".." {
        Some("cannot be '.' or '..'")
    } else if topic.len() > 249 {
        Some("is longer than 249 characters")
    } else if !topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        Some("may only contain ASCII letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SpecError::Topic { topic: topic.into(), reason }),
        None => Ok(()),
    }
}

fn check_column_name(name: &str, role: &'static str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(SpecError::EmptyName { role });
    }
    if name == TIME_COLUMN {
        return Err(SpecError::ReservedName { name: name.into() });
    }
    Ok(())
}

/// Whether `s` is an ISO-8601 period as Joda-Time (Druid) reads it: `P`, then years, months, weeks and days,
/// then optionally `T` and hours, minutes and (possibly fractional) seconds, each an unsigned number with its
/// letter, in that order, at least one of them.
pub fn is_iso_period(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('P') else { return false };
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let Some(date_parts) = period_parts(date, &['Y', 'M', 'W', 'D'], false) else { return false };
    let time_parts = match time {
        None => 0,
        Some(t) => match period_parts(t, &['H', 'M', 'S'], true) {
            Some(n) if n > 0 => n,
            _ => return false,
        },
    };
    date_parts + time_parts > 0
}

/// Counts the `<number><letter>` parts of `s` when the letters appear in `order` with none repeated; only the
/// seconds part may carry a fraction. `None` when `s` does not have that form.
fn period_parts(s: &str, order: &[char], seconds_last: bool) -> Option<usize> {
    let mut parts = 0;
    let mut next = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            digits.push(c);
            continue;
        }
        let at = order[next..].iter().position(|&l| l == c)? + next;
        let is_seconds = seconds_last && at == order.len() - 1;
        let valid = match digits.split_once('.') {
            None => !digits.is_empty(),
            Some((whole, frac)) => is_seconds && !whole.is_empty() && !frac.is_empty() && !frac.contains('.'),
        };
        if !valid {
            return None;
        }
        digits.clear();
        parts += 1;
        next = at + 1;
    }
    digits.is_empty().then_some(parts)
}

/// The sink row's fields, by JSON name, with their protobuf types.
struct RowFields(Vec<(String, Type)>);

impl RowFields {
    fn lookup(&self, role: &str, column: &str) -> Result<Type, SpecError> {
        match self.0.iter().find(|(name, _)| name == column) {
            Some((_, ty)) => Ok(*ty),
            None => Err(SpecError::UnknownColumn {
                role: role.into(),
                column: column.into(),
                known: self.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

fn sink_row_fields(descriptor_set: &[u8]) -> Result<RowFields, SpecError> {
    let set = FileDescriptorSet::decode(descriptor_set).map_err(|e| SpecError::Descriptor(e.to_string()))?;
    let message = find_message(&set, SINK_ROW_MESSAGE).ok_or(SpecError::MessageNotFound(SINK_ROW_MESSAGE))?;
    let fields = message
        .field
        .iter()
        .map(|f| {
            let name = f.json_name.clone().unwrap_or_else(|| json_name(f.name()));
            (name, f.r#type())
        })
        .collect();
    Ok(RowFields(fields))
}

/// Finds a top-level message by its full name (`package.Message`).
fn find_message<'a>(set: &'a FileDescriptorSet, full_name: &str) -> Option<&'a DescriptorProto> {
    set.file.iter().find_map(|file| {
        let local = match file.package() {
            "" => full_name,
            package => full_name.strip_prefix(package)?.strip_prefix('.')?,
        };
        file.message_type.iter().find(|m| m.name() == local)
    })
}

/// protoc's default JSON name: underscores dropped, the letter after each one upper-cased.
fn json_name(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn is_integer(ty: Type) -> bool {
    matches!(
        ty,
        Type::Int64
            | Type::Uint64
            | Type::Int32
            | Type::Uint32
            | Type::Sint32
            | Type::Sint64
            | Type::Fixed32
            | Type::Fixed64
            | Type::Sfixed32
            | Type::Sfixed64
    )
}

fn is_numeric(ty: Type) -> bool {
    is_integer(ty) || matches!(ty, Type::Double | Type::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DESCRIPTOR_SET;
    use crate::sink::druid::config::{MetricConfig, MetricKind};

    const BROKERS: &str = "kafka-1:9092,kafka-2:9092";

    fn spec(cfg: &DruidSinkConfig) -> Value {
        supervisor_spec(cfg, DESCRIPTOR_SET, BROKERS).unwrap().into_json()
    }

    fn refused(change: impl FnOnce(&mut DruidSinkConfig)) -> SpecError {
        let mut cfg = DruidSinkConfig::default();
        change(&mut cfg);
        let err = supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS).unwrap_err();
        assert_eq!(validate(&cfg, DESCRIPTOR_SET, BROKERS).unwrap_err(), err);
        err
    }

    #[test]
    fn the_default_spec_has_the_reference_shape() {
        let s = spec(&DruidSinkConfig::default());
        assert_eq!(s["type"], "kafka");
        assert_eq!(s["suspended"], false);
        let schema = &s["spec"]["dataSchema"];
        assert_eq!(schema["dataSource"], "sluice_trades");
        assert_eq!(schema["timestampSpec"], json!({ "column": "timestampMs", "format": "millis" }));
        assert_eq!(schema["dimensionsSpec"]["dimensions"], json!(["source", "symbol", "side"]));
        assert_eq!(
            schema["granularitySpec"],
            json!({ "type": "uniform", "segmentGranularity": "HOUR", "queryGranularity": "MINUTE", "rollup": true })
        );
        let metrics = schema["metricsSpec"].as_array().unwrap();
        assert_eq!(metrics[0], json!({ "type": "count", "name": "events" }));
        assert_eq!(metrics[1], json!({ "type": "doubleSum", "name": "qty_sum", "fieldName": "qty" }));
        assert_eq!(metrics[2], json!({ "type": "doubleSum", "name": "notional_sum", "fieldName": "notional" }));
        assert_eq!(metrics[3], json!({ "type": "doubleMin", "name": "price_min", "fieldName": "price" }));
        assert_eq!(metrics[4], json!({ "type": "doubleMax", "name": "price_max", "fieldName": "price" }));
        assert_eq!(metrics[5], json!({ "type": "doubleFirst", "name": "price_first", "fieldName": "price" }));
        assert_eq!(metrics[6], json!({ "type": "doubleLast", "name": "price_last", "fieldName": "price" }));
        assert_eq!(metrics.len(), 7);

        let io = &s["spec"]["ioConfig"];
        assert_eq!(io["type"], "kafka");
        assert_eq!(io["topic"], "sluice.druid");
        assert_eq!(io["inputFormat"]["type"], "protobuf");
        let decoder = &io["inputFormat"]["protoBytesDecoder"];
        assert_eq!(decoder["type"], "inline");
        assert_eq!(decoder["protoMessageType"], "sluice.v1.SinkRow");
        let descriptor =
            base64::engine::general_purpose::STANDARD.decode(decoder["descriptorString"].as_str().unwrap());
        assert_eq!(descriptor.unwrap(), DESCRIPTOR_SET);
        assert_eq!(
            io["consumerProperties"],
            json!({ "bootstrap.servers": BROKERS, "isolation.level": "read_committed" })
        );
        assert_eq!(io["taskCount"], 1);
        assert_eq!(io["replicas"], 1);
        assert_eq!(io["taskDuration"], "PT1H");
        assert_eq!(io["useEarliestOffset"], true);
        assert!(io.get("lateMessageRejectionPeriod").is_none());
        assert!(io.get("earlyMessageRejectionPeriod").is_none());
        assert_eq!(s["spec"]["tuningConfig"]["type"], "kafka");
    }

    #[test]
    fn settings_reach_the_spec() {
        let mut cfg = DruidSinkConfig {
            datasource: "ticks 1m".into(),
            rollup: false,
            late_message_rejection_period: Some("PT6H".into()),
            early_message_rejection_period: Some("PT2H".into()),
            task_count: 3,
            bootstrap_servers: Some("druid-side:9092".into()),
            ..Default::default()
        };
        cfg.consumer_options.insert("security.protocol".into(), "SSL".into());
        let s = spec(&cfg);
        assert_eq!(s["spec"]["dataSchema"]["dataSource"], "ticks 1m");
        assert_eq!(s["spec"]["dataSchema"]["granularitySpec"]["rollup"], false);
        let io = &s["spec"]["ioConfig"];
        assert_eq!(io["lateMessageRejectionPeriod"], "PT6H");
        assert_eq!(io["earlyMessageRejectionPeriod"], "PT2H");
        assert_eq!(io["taskCount"], 3);
        assert_eq!(io["consumerProperties"]["bootstrap.servers"], "druid-side:9092");
        assert_eq!(io["consumerProperties"]["security.protocol"], "SSL");
        assert_eq!(io["consumerProperties"]["isolation.level"], "read_committed");
        assert_eq!(supervisor_spec(&cfg, DESCRIPTOR_SET, "").unwrap().id(), &SupervisorId("ticks 1m".into()));
    }

    #[test]
    fn datasource_names_follow_druids_rules() {
        let rule = |name: &str| match refused(|c| c.datasource = name.into()) {
            SpecError::Datasource { rule, .. } => rule,
            other => panic!("{other:?}"),
        };
        assert_eq!(rule(""), DatasourceRule::Empty);
        assert_eq!(rule(".hidden"), DatasourceRule::LeadingDot);
        assert_eq!(rule("a/b"), DatasourceRule::Slash);
        assert_eq!(rule("a\tb"), DatasourceRule::Whitespace);
        assert_eq!(rule("a\nb"), DatasourceRule::Whitespace);
        assert_eq!(rule("a\u{7}b"), DatasourceRule::IllegalCharacter { unit: 7, position: 1 });
        assert_eq!(rule("ab\u{85}"), DatasourceRule::IllegalCharacter { unit: 0x85, position: 2 });
        assert_eq!(rule("x\u{1F600}"), DatasourceRule::IllegalCharacter { unit: 0xd83d, position: 1 });
        assert_eq!(rule("\u{E000}"), DatasourceRule::IllegalCharacter { unit: 0xe000, position: 0 });
        for fine in ["ticks", "ticks 1m", "a.b-c_d", "données", "価格"] {
            assert_eq!(check_datasource(fine), Ok(()), "{fine}");
        }
    }

    #[test]
    fn each_rule_has_its_error() {
        assert!(matches!(refused(|c| c.topic = String::new()), SpecError::Topic { .. }));
        assert!(matches!(refused(|c| c.topic = "a topic".into()), SpecError::Topic { .. }));
        assert!(matches!(refused(|c| c.topic = "..".into()), SpecError::Topic { .. }));
        assert_eq!(refused(|c| c.dimensions.push(String::new())), SpecError::EmptyName { role: "dimension" });
        assert_eq!(refused(|c| c.metrics.push(MetricConfig::count(""))), SpecError::EmptyName { role: "metric" });
        assert_eq!(refused(|c| c.dimensions.push("__time".into())), SpecError::ReservedName { name: "__time".into() });
        assert_eq!(
            refused(|c| c.dimensions.push("symbol".into())),
            SpecError::DuplicateDimension { name: "symbol".into() }
        );
        assert_eq!(
            refused(|c| c.metrics.push(MetricConfig::count("events"))),
            SpecError::DuplicateMetric { name: "events".into() }
        );
        assert_eq!(
            refused(|c| c.metrics.push(MetricConfig::new("side", MetricKind::DoubleMax, "price"))),
            SpecError::MetricShadowsDimension { name: "side".into() }
        );
        assert!(matches!(
            refused(|c| c.dimensions.push("venue".into())),
            SpecError::UnknownColumn { ref role, ref column, .. } if role == "dimension" && column == "venue"
        ));
        // Druid reads fields by JSON name, so the proto name of a two-word field is not a column.
        assert!(matches!(
            refused(|c| c.timestamp_column = "timestamp_ms".into()),
            SpecError::UnknownColumn { ref role, ref column, .. } if role == "timestamp" && column == "timestamp_ms"
        ));
        assert!(matches!(
            refused(|c| c.metrics.push(MetricConfig::new("vol", MetricKind::DoubleSum, "volume"))),
            SpecError::UnknownColumn { ref role, .. } if role == "metric vol"
        ));
        assert_eq!(
            refused(|c| c.metrics.push(MetricConfig { name: "s".into(), kind: MetricKind::DoubleSum, field: None })),
            SpecError::MissingMetricField { metric: "s".into(), kind: "doubleSum" }
        );
        assert_eq!(
            refused(|c| c.metrics.push(MetricConfig { field: Some("qty".into()), ..MetricConfig::count("n") })),
            SpecError::UnexpectedMetricField { metric: "n".into() }
        );
        assert_eq!(
            refused(|c| c.metrics.push(MetricConfig::new("m", MetricKind::DoubleMax, "symbol"))),
            SpecError::NotNumeric { metric: "m".into(), kind: "doubleMax", field: "symbol".into() }
        );
        assert_eq!(
            refused(|c| c.timestamp_column = "price".into()),
            SpecError::TimestampNotInteger { column: "price".into() }
        );
        assert_eq!(
            refused(|c| c.late_message_rejection_period = Some("6 hours".into())),
            SpecError::Period { setting: "late_message_rejection_period", value: "6 hours".into() }
        );
        assert_eq!(
            refused(|c| c.early_message_rejection_period = Some("PT".into())),
            SpecError::Period { setting: "early_message_rejection_period", value: "PT".into() }
        );
        assert_eq!(
            refused(|c| c.task_duration = "1h".into()),
            SpecError::Period { setting: "task_duration", value: "1h".into() }
        );
        assert_eq!(refused(|c| c.task_count = 0), SpecError::Zero { setting: "task_count" });
        assert_eq!(refused(|c| c.transactions_in_flight = 0), SpecError::Zero { setting: "transactions_in_flight" });
        assert_eq!(
            refused(|c| c.transactions_in_flight = 5),
            SpecError::TooMany { setting: "transactions_in_flight", max: 4 }
        );
        assert_eq!(refused(|c| c.replicas = 0), SpecError::Zero { setting: "replicas" });
        assert_eq!(
            refused(|c| {
                c.consumer_options.insert("isolation.level".into(), "read_uncommitted".into());
            }),
            SpecError::ReservedConsumerProperty { key: "isolation.level".into() }
        );
        let cfg = DruidSinkConfig::default();
        assert_eq!(validate(&cfg, DESCRIPTOR_SET, " "), Err(SpecError::NoBootstrapServers));
        assert!(matches!(validate(&cfg, b"\xff\xff", BROKERS), Err(SpecError::Descriptor(_))));
        let without_row = FileDescriptorSet::default().encode_to_vec();
        assert_eq!(validate(&cfg, &without_row, BROKERS), Err(SpecError::MessageNotFound(SINK_ROW_MESSAGE)));
    }

    #[test]
    fn periods_are_read_like_joda_does() {
        for ok in ["PT1H", "PT10M", "P1D", "P2W", "P1Y2M3DT4H5M6S", "PT0.5S", "PT30S", "P1DT12H"] {
            assert!(is_iso_period(ok), "{ok}");
        }
        for bad in ["", "P", "PT", "1H", "PT1D", "PTH", "P1H", "PT1M1H", "PT1.5M", "PT1..5S", "pt1h", "PT1H "] {
            assert!(!is_iso_period(bad), "{bad}");
        }
    }

    #[test]
    fn json_names_follow_protoc() {
        assert_eq!(json_name("timestamp_ms"), "timestampMs");
        assert_eq!(json_name("price"), "price");
        assert_eq!(json_name("received_at_us"), "receivedAtUs");
    }

    fn ms(s: &str) -> i64 {
        plugin_sdk::time::rfc3339_to_ms(s).unwrap()
    }

    #[test]
    fn a_replays_supervisor_is_the_live_one_on_its_own_topic_and_datasource_from_the_start() {
        let cfg = DruidSinkConfig {
            late_message_rejection_period: Some("PT6H".into()),
            early_message_rejection_period: Some("PT2H".into()),
            use_earliest_offset: false,
            ..DruidSinkConfig::default()
        };
        let replay = replay_supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS, "fix_1").unwrap();
        assert_eq!(replay.id(), &SupervisorId("sluice_trades_replay_fix_1".into()));
        let mut want = spec(&cfg);
        want["spec"]["dataSchema"]["dataSource"] = "sluice_trades_replay_fix_1".into();
        let io = want["spec"]["ioConfig"].as_object_mut().unwrap();
        io.insert("topic".into(), "sluice.druid.replay.fix_1".into());
        io.insert("useEarliestOffset".into(), true.into());
        io.remove("lateMessageRejectionPeriod");
        io.remove("earlyMessageRejectionPeriod");
        // Everything else, the descriptor, dimensions, metrics and consumer properties included, is the
        // live spec's.
        assert_eq!(replay.json(), &want);
        assert_eq!(replay_topic(&cfg, "fix_1"), "sluice.druid.replay.fix_1");
        // A name a replay table could not have is refused, as is what the live spec refuses.
        assert!(matches!(
            replay_supervisor_spec(&cfg, DESCRIPTOR_SET, BROKERS, "Fix/1"),
            Err(SpecError::ReplayName(_))
        ));
        let bad = DruidSinkConfig { task_count: 0, ..cfg };
        assert_eq!(
            replay_supervisor_spec(&bad, DESCRIPTOR_SET, BROKERS, "x").unwrap_err(),
            SpecError::Zero { setting: "task_count" }
        );
    }

    #[test]
    fn the_reindex_task_overwrites_whole_segments_of_the_live_datasource_from_the_replays() {
        let cfg = DruidSinkConfig::default();
        let task =
            reindex_task(&cfg, DESCRIPTOR_SET, BROKERS, "fix", ms("2026-12-01T14:37:00Z"), ms("2026-12-01T15:05:00Z"))
                .unwrap();
        // Hours: the segments holding the range, whole.
        assert_eq!(task.interval(), (ms("2026-12-01T14:00:00Z"), ms("2026-12-01T16:00:00Z")));
        let t = task.json();
        assert_eq!(t["type"], "index_parallel");
        let interval = "2026-12-01T14:00:00.000Z/2026-12-01T16:00:00.000Z";
        let schema = &t["spec"]["dataSchema"];
        assert_eq!(schema["dataSource"], "sluice_trades");
        assert_eq!(schema["timestampSpec"], json!({ "column": "__time", "format": "millis" }));
        assert_eq!(schema["dimensionsSpec"]["dimensions"], json!(["source", "symbol", "side"]));
        assert_eq!(
            schema["granularitySpec"],
            json!({
                "type": "uniform",
                "segmentGranularity": "HOUR",
                "queryGranularity": "MINUTE",
                "rollup": true,
                "intervals": [interval],
            })
        );
        // Each metric folds the replay datasource's column of its name; counts are summed.
        assert_eq!(
            schema["metricsSpec"],
            json!([
                { "type": "longSum", "name": "events", "fieldName": "events" },
                { "type": "doubleSum", "name": "qty_sum", "fieldName": "qty_sum" },
                { "type": "doubleSum", "name": "notional_sum", "fieldName": "notional_sum" },
                { "type": "doubleMin", "name": "price_min", "fieldName": "price_min" },
                { "type": "doubleMax", "name": "price_max", "fieldName": "price_max" },
                { "type": "doubleFirst", "name": "price_first", "fieldName": "price_first" },
                { "type": "doubleLast", "name": "price_last", "fieldName": "price_last" },
            ])
        );
        assert_eq!(
            t["spec"]["ioConfig"],
            json!({
                "type": "index_parallel",
                "inputSource": { "type": "druid", "dataSource": "sluice_trades_replay_fix", "interval": interval },
                "appendToExisting": false,
                "dropExisting": true,
            })
        );
        assert_eq!(t["spec"]["tuningConfig"]["type"], "index_parallel");
        assert_eq!(t["spec"]["tuningConfig"]["partitionsSpec"], json!({ "type": "dynamic" }));
        // A range already on segment bounds stays as it is; the widening is the replay's own.
        let day = DruidSinkConfig { segment_granularity: super::super::Granularity::Day, ..DruidSinkConfig::default() };
        let (since, until) = (ms("2026-12-01T00:00:00Z"), ms("2026-12-03T00:00:00Z"));
        assert_eq!(
            reindex_task(&day, DESCRIPTOR_SET, BROKERS, "fix", since, until).unwrap().interval(),
            (since, until)
        );
        assert_eq!(replay_range(&day, since + 1, Some(until - 1)), (since, Some(until)));
        assert_eq!(replay_range(&cfg, ms("2026-12-01T14:37:00Z"), None), (ms("2026-12-01T14:00:00Z"), None));
    }

    #[test]
    fn a_reindex_that_cannot_be_bounded_is_refused() {
        let cfg = DruidSinkConfig::default();
        let (since, until) = (ms("2026-12-01T14:00:00Z"), ms("2026-12-01T15:00:00Z"));
        assert_eq!(
            reindex_task(&cfg, DESCRIPTOR_SET, BROKERS, "fix", until, since).unwrap_err(),
            SpecError::EmptyInterval { since: until, until: since }
        );
        let all = DruidSinkConfig { segment_granularity: super::super::Granularity::All, ..DruidSinkConfig::default() };
        assert_eq!(
            reindex_task(&all, DESCRIPTOR_SET, BROKERS, "fix", since, until).unwrap_err(),
            SpecError::UnboundedSegments("ALL")
        );
        // With unbounded segments a replay still covers whole query-granularity buckets.
        assert_eq!(replay_range(&all, since + 61_000, Some(until + 1)), (since + 60_000, Some(until + 60_000)));
        assert!(matches!(reindex_task(&cfg, DESCRIPTOR_SET, BROKERS, "", since, until), Err(SpecError::ReplayName(_))));
    }
}
