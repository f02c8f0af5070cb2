//! Every metric sluice exports, named in one place: `sluice_<subsystem>_<name>_<unit>`, counters end
//! in `_total`, and labels are bounded (never a symbol). `GET /metrics` renders them in Prometheus'
//! text format.

pub mod health;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The registry and the metrics in it.
pub struct Metrics {
    registry: Registry,
    /// 1 while Druid reports the supervisor healthy, else 0.
    pub druid_supervisor_healthy: IntGauge,
    /// Druid's aggregate lag behind the Druid topic, in messages (from the supervisor's status).
    pub druid_supervisor_lag_messages: IntGauge,
    /// Failed Overlord calls (apply or poll) since start.
    pub druid_overlord_errors_total: prometheus::IntCounter,
    /// Druid transactions begun while an earlier one of the instance was still committing.
    pub druid_transactions_overlapped_total: IntCounter,
    /// Per plugin, version and stage (`decode`, `transform`).
    plugin: PluginVecs,
    /// HTTP requests by matched route, method and status.
    pub http_requests_total: IntCounterVec,
    /// How long HTTP requests took, by matched route, method and status.
    pub http_request_duration_seconds: HistogramVec,
    /// HTTP connections open (at most `[api] max_connections`).
    pub http_open_connections: IntGauge,
    /// HTTP connections closed because a request's header did not arrive in time (or an idle
    /// keep-alive connection sent none).
    pub http_header_timeouts_total: IntCounter,
    /// The process role's batches, commits and end-to-end latency.
    pub process: ProcessMetrics,
    /// Counters kept as atomics by their owners (sources, decode, producer, process role), copied in
    /// when `/metrics` is scraped, so the hot paths never touch the registry.
    pub(crate) mirrored: Mirrored,
    refreshers: std::sync::Mutex<Vec<Refresher>>,
}

type Refresher = Box<dyn Fn(&Metrics) + Send + Sync>;

/// What the process role observes directly, once per batch.
pub struct ProcessMetrics {
    /// Rows per committed batch.
    pub batch_rows: Histogram,
    /// Batches committed, by why the batch was closed (`rows`, `bytes`, `wait`, `offsets`, `stop`).
    pub flushes_total: IntCounterVec,
    /// How long the sink's commit took (rows and offsets in one transaction), by sink.
    pub sink_commit_duration_seconds: HistogramVec,
    /// Exchange trade time to sink commit, per row.
    pub exchange_to_commit_seconds: Histogram,
    /// Host receive time to sink commit, per row.
    pub receive_to_commit_seconds: Histogram,
    /// Bytes of committed state of each stateful link, by source and plugin (set at each commit
    /// that changes it).
    pub state_bytes: IntGaugeVec,
}

/// Metrics whose values live in atomics elsewhere; see [`Metrics::on_scrape`].
pub(crate) struct Mirrored {
    pub(crate) source_frames: IntCounterVec,
    pub(crate) source_dropped: IntCounterVec,
    pub(crate) source_reconnects: IntCounterVec,
    pub(crate) source_write_timeouts: IntCounterVec,
    pub(crate) source_up: IntGaugeVec,
    pub(crate) source_finished: IntGaugeVec,
    pub(crate) source_last_message_age: prometheus::GaugeVec,
    pub(crate) decode_records: IntCounterVec,
    pub(crate) decode_rejects: IntCounterVec,
    pub(crate) decode_duplicates: IntCounterVec,
    pub(crate) decode_resets: IntCounterVec,
    pub(crate) decode_gaps: IntGaugeVec,
    pub(crate) decode_downtime_gaps: IntGaugeVec,
    pub(crate) kafka_sent: IntCounter,
    pub(crate) kafka_delivered: IntCounter,
    pub(crate) kafka_failed: IntCounter,
    pub(crate) kafka_queue_full: IntCounter,
    pub(crate) dlq_records: IntCounterVec,
    pub(crate) process_consumed: IntCounter,
    pub(crate) process_committed: IntCounter,
    pub(crate) process_rebalances: IntCounter,
    pub(crate) process_lag: IntGauge,
    pub(crate) process_deleted_unread: IntGauge,
    pub(crate) process_breaker_open: IntGaugeVec,
    pub(crate) process_link_rejects: IntCounterVec,
    pub(crate) log_start: IntGauge,
    pub(crate) log_end: IntGauge,
    pub(crate) log_committed: IntGauge,
    pub(crate) log_lag: IntGauge,
    pub(crate) log_size: IntGauge,
    pub(crate) log_dead_letter_bytes: IntGauge,
    pub(crate) log_symbol_bytes: IntGauge,
    pub(crate) log_dropped: IntCounter,
    pub(crate) log_refused_records: IntCounterVec,
    pub(crate) log_refused_dead_letters: IntCounterVec,
}

/// Sets a mirrored counter to `value` (counters only move up; a smaller value is ignored).
pub(crate) fn mirror(counter: &IntCounter, value: u64) {
    counter.inc_by(value.saturating_sub(counter.get()));
}

/// The plugin metrics, labelled `plugin`, `version` and `stage`.
struct PluginVecs {
    calls: IntCounterVec,
    records_in: IntCounterVec,
    records_out: IntCounterVec,
    rejects: IntCounterVec,
    traps: IntCounterVec,
    timeouts: IntCounterVec,
    limit_errors: IntCounterVec,
    duration: HistogramVec,
    shadow_records: IntCounterVec,
    symbols_refused: IntCounterVec,
}

/// Why a plugin's symbol name was refused, as the `reason` label spells it: longer than
/// `max_symbol_bytes`, or new past `max_symbols`.
pub const SYMBOL_REFUSALS: [&str; 2] = ["too_long", "over_quota"];

/// Counters that count but are exported nowhere, one per [`SYMBOL_REFUSALS`] reason.
pub fn detached_counters() -> [IntCounter; 2] {
    SYMBOL_REFUSALS.map(|_| IntCounter::new("detached", "not exported").expect("a valid metric name"))
}

/// The stages a plugin's exports run in, as the `stage` label spells them.
pub const PLUGIN_STAGES: [&str; 2] = ["decode", "transform"];

/// Buckets of the plugin call duration histogram, in seconds: 50 µs to 1 s.
/// Buckets of every latency histogram: 0.5 ms to 10 s, fine between 1 and 100 ms, where the
/// pipeline's targets are (P99 under 5 ms at a low rate, under 20 ms at 100,000 trades/s).
const LATENCY_SECONDS: [f64; 25] = [
    5e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-2, 1.25e-2, 1.5e-2, 2e-2, 2.5e-2, 3e-2, 4e-2, 5e-2, 6e-2, 8e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Plugin calls: the latency buckets, and finer ones below them (a call takes microseconds).
const CALL_SECONDS: [f64; 28] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-2, 1.25e-2, 1.5e-2, 2e-2, 2.5e-2, 3e-2,
    4e-2, 5e-2, 6e-2, 8e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One plugin version's metrics in one stage, resolved once when the version is loaded, so a call
/// updates them without looking labels up.
#[derive(Clone, Debug)]
pub struct CallMetrics {
    /// Calls made.
    pub calls: IntCounter,
    /// Frames (decode) or records (transform) handed to the plugin.
    pub records_in: IntCounter,
    /// Records the plugin returned.
    pub records_out: IntCounter,
    /// Inputs the plugin refused.
    pub rejects: IntCounter,
    /// Calls that trapped.
    pub traps: IntCounter,
    /// Calls interrupted at their deadline.
    pub timeouts: IntCounter,
    /// Calls that hit the memory or output cap, or returned invalid output.
    pub limit_errors: IntCounter,
    /// How long calls took.
    pub duration: Histogram,
}

impl CallMetrics {
    /// Metrics that count but are exported nowhere (a runtime without a registry, e.g. in
    /// `sluice plugin test`).
    pub fn detached() -> Self {
        let counter = || IntCounter::new("detached", "not exported").expect("a valid metric name");
        CallMetrics {
            calls: counter(),
            records_in: counter(),
            records_out: counter(),
            rejects: counter(),
            traps: counter(),
            timeouts: counter(),
            limit_errors: counter(),
            duration: Histogram::with_opts(HistogramOpts::new("detached", "not exported").buckets(CALL_SECONDS.into()))
                .expect("valid buckets"),
        }
    }

    /// Counts a failed call by its kind.
    pub fn failed(&self, failure: CallFailure) {
        match failure {
            CallFailure::Trap => self.traps.inc(),
            CallFailure::Timeout => self.timeouts.inc(),
            CallFailure::Limit => self.limit_errors.inc(),
        }
    }

    /// Traps, timeouts and limit hits together.
    pub fn errors(&self) -> u64 {
        self.traps.get() + self.timeouts.get() + self.limit_errors.get()
    }
}

/// How a plugin call failed, as its metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallFailure {
    /// The guest trapped.
    Trap,
    /// The call ran past its deadline.
    Timeout,
    /// A limit was hit: memory, output size, or output that is not valid.
    Limit,
}

/// One source's counters at a scrape: its connection's and its decode stage's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSample {
    /// Frames read.
    pub frames: u64,
    /// Frames a full queue refused.
    pub dropped: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Connections given up because the venue stopped taking our writes.
    pub write_timeouts: u64,
    /// Whether a connection is up.
    pub up: bool,
    /// Whether a file source has delivered its whole recording.
    pub finished: bool,
    /// When the last message arrived, µs since the epoch (0: never).
    pub last_message_us: i64,
    /// Records decoded.
    pub records: u64,
    /// Frames refused.
    pub rejects: u64,
    /// Duplicate trades dropped.
    pub duplicates: u64,
    /// Trade-id sequences restarted.
    pub resets: u64,
    /// Trade ids missing.
    pub gaps: u64,
    /// Trade ids sent while sluice was down.
    pub downtime_gaps: u64,
}

/// The hand-off writer's counters at a scrape (the Kafka producer's or the local log's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerSample {
    /// Records handed over.
    pub sent: u64,
    /// Records acknowledged.
    pub delivered: u64,
    /// Records that finally failed.
    pub failed: u64,
    /// Times a full queue was waited on.
    pub queue_full_waits: u64,
    /// Dead letters written, of every stage.
    pub dead_lettered: u64,
    /// Of those, the transform stage's.
    pub dead_lettered_transform: u64,
}

/// The local log at a scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogSample {
    /// The first offset it holds.
    pub start: i64,
    /// The next offset it will append.
    pub end: i64,
    /// The store's committed position.
    pub committed: i64,
    /// Bytes of records it holds.
    pub bytes: u64,
    /// Bytes of the dead letters it holds.
    pub dead_letter_bytes: u64,
    /// Bytes of the symbol names it holds.
    pub symbol_bytes: u64,
    /// Records deleted before the store read them.
    pub dropped: u64,
    /// Records and dead letters refused while it could not commit, by the `reason` label value.
    pub refused: Vec<(&'static str, u64, u64)>,
}

/// The process role's counters at a scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessSample {
    /// Records read from the hand-off.
    pub consumed: u64,
    /// Rows committed to the sink.
    pub stored: u64,
    /// Consumer group rebalances.
    pub rebalances: u64,
    /// Records retention deleted before the role read them, while it is stopped on them.
    pub deleted_unread: u64,
    /// Records not read yet.
    pub lag: i64,
    /// Records dead-lettered by the transform stage.
    pub rejected: u64,
    /// Each link's breaker: (source, plugin, not closed).
    pub breakers: Vec<(String, String, bool)>,
    /// Records each link refused: (source, link's plugin, count; the link is empty for records
    /// refused before any link, say of an unknown source).
    pub link_rejects: Vec<(String, String, u64)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let healthy = IntGauge::new(
            "sluice_druid_supervisor_healthy",
            "1 while Druid reports the Kafka supervisor healthy, else 0",
        )
        .expect("a valid metric name");
        let lag = IntGauge::new(
            "sluice_druid_supervisor_lag_messages",
            "Druid's aggregate lag behind the Druid topic, in messages",
        )
        .expect("a valid metric name");
        let errors = prometheus::IntCounter::new(
            "sluice_druid_overlord_errors_total",
            "Overlord calls (applying the spec, polling the supervisor) that failed",
        )
        .expect("a valid metric name");
        let overlapped = IntCounter::new(
            "sluice_druid_transactions_overlapped_total",
            "Druid sink transactions begun while an earlier one was still committing",
        )
        .expect("a valid metric name");
        let labels = ["plugin", "version", "stage"];
        let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &labels).expect("valid");
        let plugin = PluginVecs {
            calls: counter("sluice_plugin_calls_total", "Calls into a plugin's decode or transform export"),
            records_in: counter(
                "sluice_plugin_records_in_total",
                "Frames (decode) or records (transform) handed to a plugin",
            ),
            records_out: counter("sluice_plugin_records_out_total", "Records a plugin returned"),
            rejects: counter("sluice_plugin_rejects_total", "Inputs a plugin refused (dead-lettered)"),
            traps: counter("sluice_plugin_traps_total", "Plugin calls that trapped"),
            timeouts: counter("sluice_plugin_timeouts_total", "Plugin calls interrupted at their deadline"),
            limit_errors: counter(
                "sluice_plugin_limit_errors_total",
                "Plugin calls that hit the memory or output cap or returned invalid records",
            ),
            duration: HistogramVec::new(
                HistogramOpts::new("sluice_plugin_call_duration_seconds", "How long a plugin call took")
                    .buckets(CALL_SECONDS.into()),
                &labels,
            )
            .expect("valid"),
            shadow_records: IntCounterVec::new(
                Opts::new(
                    "sluice_plugin_shadow_records_total",
                    "Output records of a shadow version compared with the active version's, by result",
                ),
                &["plugin", "version", "result"],
            )
            .expect("valid"),
            symbols_refused: IntCounterVec::new(
                Opts::new(
                    "sluice_plugin_symbols_refused_total",
                    "Symbol names a plugin version asked the dictionary for and was refused, by reason",
                ),
                &["plugin", "version", "reason"],
            )
            .expect("valid"),
        };
        let route_labels = ["route", "method", "status"];
        let http_requests_total = IntCounterVec::new(
            Opts::new("sluice_http_requests_total", "HTTP requests answered, by matched route, method and status"),
            &route_labels,
        )
        .expect("valid");
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new("sluice_http_request_duration_seconds", "How long HTTP requests took to answer")
                .buckets(LATENCY_SECONDS.into()),
            &route_labels,
        )
        .expect("valid");
        let http_open_connections =
            IntGauge::new("sluice_http_open_connections", "HTTP connections open (at most [api] max_connections)")
                .expect("valid");
        let http_header_timeouts_total = IntCounter::new(
            "sluice_http_header_timeouts_total",
            "HTTP connections closed because a request's header did not arrive within [api] header_read_timeout_ms",
        )
        .expect("valid");
        let latency = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_SECONDS.into())).expect("valid")
        };
        let process = ProcessMetrics {
            batch_rows: Histogram::with_opts(
                HistogramOpts::new("sluice_process_batch_rows", "Rows per batch committed to the sink")
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid")),
            )
            .expect("valid"),
            flushes_total: IntCounterVec::new(
                Opts::new("sluice_process_flushes_total", "Batches committed to the sink, by why they were closed"),
                &["reason"],
            )
            .expect("valid"),
            sink_commit_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "sluice_sink_commit_duration_seconds",
                    "How long a sink commit (rows and offsets in one transaction) took",
                )
                .buckets(LATENCY_SECONDS.into()),
                &["sink"],
            )
            .expect("valid"),
            exchange_to_commit_seconds: latency(
                "sluice_pipeline_exchange_to_commit_seconds",
                "From the exchange's trade time to the row's commit in the sink",
            ),
            receive_to_commit_seconds: latency(
                "sluice_pipeline_receive_to_commit_seconds",
                "From the host reading the frame to the row's commit in the sink",
            ),
            state_bytes: IntGaugeVec::new(
                Opts::new(
                    "sluice_process_state_bytes",
                    "Bytes (keys and values) of a stateful link's state as last committed, by source and plugin",
                ),
                &["source", "plugin"],
            )
            .expect("valid"),
        };
        let by_source = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["source"]).expect("valid");
        let gauge_by_source =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["source"]).expect("valid");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid");
        let mirrored = Mirrored {
            source_frames: by_source("sluice_source_frames_received_total", "WebSocket frames read from a source"),
            source_dropped: by_source(
                "sluice_source_frames_dropped_total",
                "Frames dropped because the decode queue was full",
            ),
            source_reconnects: by_source("sluice_source_reconnects_total", "Reconnections of a source"),
            source_write_timeouts: by_source(
                "sluice_source_write_timeouts_total",
                "Connections given up because the venue stopped taking our writes (it does not read)",
            ),
            source_up: gauge_by_source("sluice_source_up", "1 while the source's connection is up, else 0"),
            source_finished: gauge_by_source(
                "sluice_source_finished",
                "1 once a file source has delivered its whole recording (it is done, not down), else 0",
            ),
            source_last_message_age: prometheus::GaugeVec::new(
                Opts::new("sluice_source_last_message_age_seconds", "Time since the source's last frame"),
                &["source"],
            )
            .expect("valid"),
            decode_records: by_source("sluice_decode_records_total", "Records decoded from a source's frames"),
            decode_rejects: by_source(
                "sluice_decode_rejects_total",
                "Frames the decoder refused (dead-lettered), oversized ones included",
            ),
            decode_resets: by_source(
                "sluice_decode_trade_id_resets_total",
                "Trade-id sequences started again: an id too far from the last one to be a gap or a replay",
            ),
            decode_duplicates: by_source(
                "sluice_decode_duplicates_total",
                "Records dropped as repeats of a trade id already seen",
            ),
            decode_gaps: gauge_by_source("sluice_decode_trade_id_gaps", "Trade ids missing in a source's sequences"),
            decode_downtime_gaps: gauge_by_source(
                "sluice_decode_downtime_trade_id_gaps",
                "Trade ids the venue sent while sluice was down, found missing at each symbol's first trade after a start",
            ),
            kafka_sent: counter("sluice_kafka_records_sent_total", "Records handed to the Kafka producer"),
            kafka_delivered: counter("sluice_kafka_records_delivered_total", "Records the brokers acknowledged"),
            kafka_failed: counter(
                "sluice_kafka_delivery_errors_total",
                "Records that failed delivery after the producer's retries",
            ),
            kafka_queue_full: counter(
                "sluice_kafka_queue_full_waits_total",
                "Times a send waited because the producer's queue was full",
            ),
            dlq_records: IntCounterVec::new(
                Opts::new("sluice_dlq_records_total", "Records sent to the dead-letter topic, by stage"),
                &["stage"],
            )
            .expect("valid"),
            process_consumed: counter("sluice_process_records_consumed_total", "Records read from the events topic"),
            process_committed: counter("sluice_process_rows_committed_total", "Rows committed to the sink"),
            process_rebalances: counter("sluice_process_rebalances_total", "Consumer group rebalances seen"),
            process_lag: IntGauge::new(
                "sluice_process_consumer_lag_messages",
                "Records in the events topic's assigned partitions not read yet",
            )
            .expect("valid"),
            process_deleted_unread: gauge(
                "sluice_process_deleted_unread_records",
                "Records of the events topic retention deleted before the process role read them; the role \
                 stops on them (0 once it commits again)",
            ),
            process_breaker_open: IntGaugeVec::new(
                Opts::new(
                    "sluice_process_breaker_open",
                    "1 while the circuit breaker of a link of a source's chain is not closed, else 0",
                ),
                &["source", "plugin"],
            )
            .expect("valid"),
            process_link_rejects: IntCounterVec::new(
                Opts::new(
                    "sluice_process_rejects_total",
                    "Records a link of a source's chain refused (dead-lettered), counted when their batch commits",
                ),
                &["source", "link"],
            )
            .expect("valid"),
            log_start: gauge("sluice_log_start_offset", "The first offset the local log holds"),
            log_end: gauge("sluice_log_end_offset", "The next offset the local log will append"),
            log_committed: gauge("sluice_log_committed_offset", "The store's committed position in the local log"),
            log_lag: gauge("sluice_log_lag_records", "Records in the local log the store has not committed yet"),
            log_size: gauge("sluice_log_size_bytes", "Bytes of records the local log holds"),
            log_dead_letter_bytes: gauge(
                "sluice_log_dead_letter_bytes",
                "Bytes of the dead letters the local log holds (counted in [local_log] max_bytes)",
            ),
            log_symbol_bytes: gauge(
                "sluice_log_symbol_bytes",
                "Bytes of the symbol names the local log holds (counted in [local_log] max_bytes)",
            ),
            log_dropped: counter(
                "sluice_log_dropped_records_total",
                "Records the local log deleted before the store read them (the log reached max_bytes)",
            ),
            log_refused_records: IntCounterVec::new(
                Opts::new(
                    "sluice_log_refused_records_total",
                    "Records the local log refused because it could not commit, by reason (disk_full, write_error)",
                ),
                &["reason"],
            )
            .expect("valid"),
            log_refused_dead_letters: IntCounterVec::new(
                Opts::new(
                    "sluice_log_refused_dead_letters_total",
                    "Decode dead letters the local log refused because it could not commit, by reason",
                ),
                &["reason"],
            )
            .expect("valid"),
        };
        for m in [
            Box::new(http_requests_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_request_duration_seconds.clone()),
            Box::new(http_open_connections.clone()),
            Box::new(http_header_timeouts_total.clone()),
            Box::new(process.batch_rows.clone()),
            Box::new(process.flushes_total.clone()),
            Box::new(process.sink_commit_duration_seconds.clone()),
            Box::new(process.exchange_to_commit_seconds.clone()),
            Box::new(process.receive_to_commit_seconds.clone()),
            Box::new(process.state_bytes.clone()),
            Box::new(mirrored.source_frames.clone()),
            Box::new(mirrored.source_dropped.clone()),
            Box::new(mirrored.source_reconnects.clone()),
            Box::new(mirrored.source_write_timeouts.clone()),
            Box::new(mirrored.source_up.clone()),
            Box::new(mirrored.source_finished.clone()),
            Box::new(mirrored.source_last_message_age.clone()),
            Box::new(mirrored.decode_records.clone()),
            Box::new(mirrored.decode_rejects.clone()),
            Box::new(mirrored.decode_duplicates.clone()),
            Box::new(mirrored.decode_resets.clone()),
            Box::new(mirrored.decode_gaps.clone()),
            Box::new(mirrored.decode_downtime_gaps.clone()),
            Box::new(mirrored.kafka_sent.clone()),
            Box::new(mirrored.kafka_delivered.clone()),
            Box::new(mirrored.kafka_failed.clone()),
            Box::new(mirrored.kafka_queue_full.clone()),
            Box::new(mirrored.dlq_records.clone()),
            Box::new(mirrored.process_consumed.clone()),
            Box::new(mirrored.process_committed.clone()),
            Box::new(mirrored.process_rebalances.clone()),
            Box::new(mirrored.process_lag.clone()),
            Box::new(mirrored.process_deleted_unread.clone()),
            Box::new(mirrored.process_breaker_open.clone()),
            Box::new(mirrored.process_link_rejects.clone()),
            Box::new(mirrored.log_start.clone()),
            Box::new(mirrored.log_end.clone()),
            Box::new(mirrored.log_committed.clone()),
            Box::new(mirrored.log_lag.clone()),
            Box::new(mirrored.log_size.clone()),
            Box::new(mirrored.log_dead_letter_bytes.clone()),
            Box::new(mirrored.log_symbol_bytes.clone()),
            Box::new(mirrored.log_dropped.clone()),
            Box::new(mirrored.log_refused_records.clone()),
            Box::new(mirrored.log_refused_dead_letters.clone()),
        ] {
            registry.register(m).expect("each metric is registered once");
        }
        for m in [
            Box::new(healthy.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lag.clone()),
            Box::new(errors.clone()),
            Box::new(overlapped.clone()),
            Box::new(plugin.calls.clone()),
            Box::new(plugin.records_in.clone()),
            Box::new(plugin.records_out.clone()),
            Box::new(plugin.rejects.clone()),
            Box::new(plugin.traps.clone()),
            Box::new(plugin.timeouts.clone()),
            Box::new(plugin.limit_errors.clone()),
            Box::new(plugin.duration.clone()),
            Box::new(plugin.shadow_records.clone()),
            Box::new(plugin.symbols_refused.clone()),
        ] {
            registry.register(m).expect("each metric is registered once");
        }
        Metrics {
            registry,
            druid_supervisor_healthy: healthy,
            druid_supervisor_lag_messages: lag,
            druid_overlord_errors_total: errors,
            druid_transactions_overlapped_total: overlapped,
            plugin,
            http_requests_total,
            http_request_duration_seconds,
            http_open_connections,
            http_header_timeouts_total,
            process,
            mirrored,
            refreshers: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Copies one source's connection and decode counters in.
    pub fn mirror_source(&self, name: &str, s: &SourceSample, now_us: i64) {
        let m = &self.mirrored;
        let labels = [name];
        mirror(&m.source_frames.with_label_values(&labels), s.frames);
        mirror(&m.source_dropped.with_label_values(&labels), s.dropped);
        mirror(&m.source_reconnects.with_label_values(&labels), s.reconnects);
        mirror(&m.source_write_timeouts.with_label_values(&labels), s.write_timeouts);
        m.source_up.with_label_values(&labels).set(i64::from(s.up));
        m.source_finished.with_label_values(&labels).set(i64::from(s.finished));
        if s.last_message_us > 0 {
            m.source_last_message_age.with_label_values(&labels).set((now_us - s.last_message_us).max(0) as f64 / 1e6);
        }
        mirror(&m.decode_records.with_label_values(&labels), s.records);
        mirror(&m.decode_rejects.with_label_values(&labels), s.rejects);
        mirror(&m.decode_duplicates.with_label_values(&labels), s.duplicates);
        mirror(&m.decode_resets.with_label_values(&labels), s.resets);
        m.decode_gaps.with_label_values(&labels).set(i64::try_from(s.gaps).unwrap_or(i64::MAX));
        m.decode_downtime_gaps.with_label_values(&labels).set(i64::try_from(s.downtime_gaps).unwrap_or(i64::MAX));
    }

    /// Copies the local log's state in: its start and end offsets, the store's committed offset,
    /// its sizes in bytes, the records it deleted unread and what it refused.
    pub fn mirror_log(&self, s: &LogSample) {
        let m = &self.mirrored;
        m.log_start.set(s.start);
        m.log_end.set(s.end);
        m.log_committed.set(s.committed);
        m.log_lag.set((s.end - s.committed).max(0));
        m.log_size.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        m.log_dead_letter_bytes.set(i64::try_from(s.dead_letter_bytes).unwrap_or(i64::MAX));
        m.log_symbol_bytes.set(i64::try_from(s.symbol_bytes).unwrap_or(i64::MAX));
        mirror(&m.log_dropped, s.dropped);
        for &(reason, records, dead_letters) in &s.refused {
            mirror(&m.log_refused_records.with_label_values(&[reason]), records);
            mirror(&m.log_refused_dead_letters.with_label_values(&[reason]), dead_letters);
        }
    }

    /// Copies the hand-off's delivery counters in (dead letters included): the Kafka producer's, or
    /// the local log appender's, which count the same way.
    pub fn mirror_producer(&self, s: &ProducerSample) {
        let m = &self.mirrored;
        mirror(&m.kafka_sent, s.sent);
        mirror(&m.kafka_delivered, s.delivered);
        mirror(&m.kafka_failed, s.failed);
        mirror(&m.kafka_queue_full, s.queue_full_waits);
        // Transform dead letters are committed with their batch by the sink (see mirror_process).
        mirror(
            &m.dlq_records.with_label_values(&["decode"]),
            s.dead_lettered.saturating_sub(s.dead_lettered_transform),
        );
    }

    /// Copies the process role's counters in.
    pub fn mirror_process(&self, s: &ProcessSample) {
        let m = &self.mirrored;
        mirror(&m.process_consumed, s.consumed);
        mirror(&m.process_committed, s.stored);
        mirror(&m.process_rebalances, s.rebalances);
        m.process_lag.set(s.lag);
        m.process_deleted_unread.set(i64::try_from(s.deleted_unread).unwrap_or(i64::MAX));
        for (source, plugin, open) in &s.breakers {
            m.process_breaker_open.with_label_values(&[source, plugin]).set(i64::from(*open));
        }
        for (source, link, count) in &s.link_rejects {
            let link = if link.is_empty() { "none" } else { link };
            mirror(&m.process_link_rejects.with_label_values(&[source, link]), *count);
        }
        // Dead letters of the transform stage, counted when the batch that carries them commits.
        mirror(&m.dlq_records.with_label_values(&["transform"]), s.rejected);
    }

    /// Runs `refresh` before every scrape, to copy counters kept elsewhere into the registry.
    pub fn on_scrape(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(refresh));
    }

    /// The metrics of one plugin version in one stage (see [`PLUGIN_STAGES`]).
    pub fn plugin_calls(&self, plugin: &str, version: &str, stage: &str) -> CallMetrics {
        let v = &self.plugin;
        let labels = [plugin, version, stage];
        CallMetrics {
            calls: v.calls.with_label_values(&labels),
            records_in: v.records_in.with_label_values(&labels),
            records_out: v.records_out.with_label_values(&labels),
            rejects: v.rejects.with_label_values(&labels),
            traps: v.traps.with_label_values(&labels),
            timeouts: v.timeouts.with_label_values(&labels),
            limit_errors: v.limit_errors.with_label_values(&labels),
            duration: v.duration.with_label_values(&labels),
        }
    }

    /// The shadow comparison counters of a plugin version: (records equal, records different).
    pub fn shadow_records(&self, plugin: &str, version: &str) -> (IntCounter, IntCounter) {
        let v = &self.plugin.shadow_records;
        (v.with_label_values(&[plugin, version, "equal"]), v.with_label_values(&[plugin, version, "different"]))
    }

    /// The symbol refusal counters of a plugin version, one per [`SYMBOL_REFUSALS`] reason.
    pub fn symbols_refused(&self, plugin: &str, version: &str) -> [IntCounter; 2] {
        SYMBOL_REFUSALS.map(|reason| self.plugin.symbols_refused.with_label_values(&[plugin, version, reason]))
    }

    /// Drops a deleted plugin version's series, so versions come and go without labels piling up.
    pub fn forget_plugin_version(&self, plugin: &str, version: &str) {
        let v = &self.plugin;
        for stage in PLUGIN_STAGES {
            let labels = [plugin, version, stage];
            for vec in [&v.calls, &v.records_in, &v.records_out, &v.rejects, &v.traps, &v.timeouts, &v.limit_errors] {
                let _ = vec.remove_label_values(&labels);
            }
            let _ = v.duration.remove_label_values(&labels);
        }
        for result in ["equal", "different"] {
            let _ = v.shadow_records.remove_label_values(&[plugin, version, result]);
        }
        for reason in SYMBOL_REFUSALS {
            let _ = v.symbols_refused.remove_label_values(&[plugin, version, reason]);
        }
    }

    /// Everything, in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        for refresh in self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            refresh(self);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a collector error would leave that metric out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_by_its_name() {
        let m = Metrics::new();
        m.druid_supervisor_healthy.set(1);
        m.druid_supervisor_lag_messages.set(42);
        m.druid_overlord_errors_total.inc();
        let text = m.render();
        for line in [
            "sluice_druid_supervisor_healthy 1",
            "sluice_druid_supervisor_lag_messages 42",
            "sluice_druid_overlord_errors_total 1",
            "# TYPE sluice_druid_overlord_errors_total counter",
            "# TYPE sluice_druid_supervisor_healthy gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
