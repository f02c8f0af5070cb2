//! `[sink.druid]`: where the Overlord is, which topic Druid reads, and how rows roll up.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment variable that overrides [`DruidSinkConfig::password`], so the secret can stay out of the file.
pub const PASSWORD_ENV: &str = "SLUICE_DRUID_PASSWORD";

/// `[sink.druid]`: the Druid sink's settings. Every field has a default, so an empty table rolls trades up
/// per minute into the datasource `sluice_trades` through an Overlord on `localhost:8081`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DruidSinkConfig {
    /// The Overlord (or a Router in front of it), e.g. `https://druid.example.com:8281`.
    #[serde(default = "defaults::overlord_url")]
    pub overlord_url: String,
    /// Basic-auth user for the Overlord API; no `Authorization` header is sent without one.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password; [`PASSWORD_ENV`] overrides it.
    #[serde(default)]
    pub password: Option<Password>,
    /// The Kafka topic sluice writes sink rows to and Druid's supervisor reads.
    #[serde(default = "defaults::topic")]
    pub topic: String,
    /// The compacted changelog topic the chains' plugin state is committed to, in the transactions
    /// that carry the rows; `<topic>.state` by default (see [`crate::sink::druid::state`]).
    #[serde(default)]
    pub state_topic: Option<String>,
    /// The topic checkpoints of the chains' whole state are kept in, with the events topic's
    /// positions they belong to: where a replay of a stateful chain starts from;
    /// `<topic>.checkpoints` by default (see [`crate::sink::druid::checkpoint`]).
    #[serde(default)]
    pub checkpoint_topic: Option<String>,
    /// The Druid datasource (and supervisor id).
    #[serde(default = "defaults::datasource")]
    pub datasource: String,
    /// The sink row's field (by JSON name) that holds the row time, in milliseconds since the epoch.
    #[serde(default = "defaults::timestamp_column")]
    pub timestamp_column: String,
    /// How much time one segment covers.
    #[serde(default = "defaults::segment_granularity")]
    pub segment_granularity: Granularity,
    /// The rollup bucket: rows with equal dimensions inside one bucket become one Druid row.
    #[serde(default = "defaults::query_granularity")]
    pub query_granularity: Granularity,
    /// Whether Druid rolls rows up at ingestion.
    #[serde(default = "defaults::rollup")]
    pub rollup: bool,
    /// Druid drops rows older than the task start minus this ISO-8601 period (e.g. `PT1H`); none by default.
    #[serde(default)]
    pub late_message_rejection_period: Option<String>,
    /// Druid drops rows newer than the task end plus this ISO-8601 period; none by default.
    #[serde(default)]
    pub early_message_rejection_period: Option<String>,
    /// Ingestion tasks reading the topic at once (at most the topic's partitions do work).
    #[serde(default = "defaults::one")]
    pub task_count: u32,
    /// Copies of each task, on different workers, for availability.
    #[serde(default = "defaults::one")]
    pub replicas: u32,
    /// How long a task reads before it publishes its segments, as an ISO-8601 period.
    #[serde(default = "defaults::task_duration")]
    pub task_duration: String,
    /// Whether a new supervisor starts at the topic's earliest offset (no rows written before it started are
    /// skipped) rather than its latest.
    #[serde(default = "defaults::use_earliest_offset")]
    pub use_earliest_offset: bool,
    /// The Kafka brokers as Druid's workers reach them; defaults to the brokers sluice itself uses.
    #[serde(default)]
    pub bootstrap_servers: Option<String>,
    /// Further Kafka consumer properties for Druid's tasks (e.g. `security.protocol`). `bootstrap.servers`
    /// and `isolation.level` are set by sluice and may not appear here. Secrets among them print as
    /// `***` (see [`crate::handoff::kafka::is_secret`]).
    #[serde(default, serialize_with = "crate::handoff::kafka::serialize_options")]
    pub consumer_options: BTreeMap<String, String>,
    /// The string dimensions, by sink-row field JSON name; each becomes a Druid column of the same name.
    #[serde(default = "defaults::dimensions")]
    pub dimensions: Vec<String>,
    /// The rollup metrics.
    #[serde(default = "defaults::metrics")]
    pub metrics: Vec<MetricConfig>,
    /// How long one Overlord request may take.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Requests per Overlord call before giving up on a leaderless or unreachable Overlord.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First pause between those attempts; it doubles per attempt up to ten times this.
    #[serde(default = "defaults::retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// How often the supervisor's status and health are polled.
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Transactions the sink keeps in flight at once, from 1 to
    /// [`MAX_TRANSACTIONS_IN_FLIGHT`](crate::sink::druid::delivery::MAX_TRANSACTIONS_IN_FLIGHT):
    /// the next batch is produced while the previous one commits (see
    /// [`crate::sink::druid::delivery`]).
    #[serde(default = "defaults::transactions_in_flight")]
    pub transactions_in_flight: u32,
}

impl Default for DruidSinkConfig {
    fn default() -> Self {
        DruidSinkConfig {
            overlord_url: defaults::overlord_url(),
            username: None,
            password: None,
            topic: defaults::topic(),
            state_topic: None,
            checkpoint_topic: None,
            datasource: defaults::datasource(),
            timestamp_column: defaults::timestamp_column(),
            segment_granularity: defaults::segment_granularity(),
            query_granularity: defaults::query_granularity(),
            rollup: defaults::rollup(),
            late_message_rejection_period: None,
            early_message_rejection_period: None,
            task_count: defaults::one(),
            replicas: defaults::one(),
            task_duration: defaults::task_duration(),
            use_earliest_offset: defaults::use_earliest_offset(),
            bootstrap_servers: None,
            consumer_options: BTreeMap::new(),
            dimensions: defaults::dimensions(),
            metrics: defaults::metrics(),
            request_timeout_ms: defaults::request_timeout_ms(),
            max_attempts: defaults::max_attempts(),
            retry_backoff_ms: defaults::retry_backoff_ms(),
            poll_interval_ms: defaults::poll_interval_ms(),
            transactions_in_flight: defaults::transactions_in_flight(),
        }
    }
}

impl DruidSinkConfig {
    /// The basic-auth password: [`PASSWORD_ENV`] when set, else the file's.
    pub fn resolved_password(&self) -> Option<String> {
        std::env::var(PASSWORD_ENV).ok().or_else(|| self.password.as_ref().map(|p| p.0.clone()))
    }

    /// The plugin state's changelog topic: `state_topic`, else `<topic>.state`.
    pub fn state_topic(&self) -> String {
        self.state_topic.clone().unwrap_or_else(|| format!("{}.state", self.topic))
    }

    /// The state checkpoints' topic: `checkpoint_topic`, else `<topic>.checkpoints`.
    pub fn checkpoint_topic(&self) -> String {
        self.checkpoint_topic.clone().unwrap_or_else(|| format!("{}.checkpoints", self.topic))
    }

    /// `request_timeout_ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `poll_interval_ms` as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// A secret that never shows in logs or in the effective configuration `check-config` prints.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Password {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A Druid granularity, spelled as Druid spells it (`MINUTE`, `HOUR`, ...).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Granularity {
    /// No truncation (query granularity only: every millisecond is its own bucket).
    None,
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// Five minutes.
    FiveMinute,
    /// Ten minutes.
    TenMinute,
    /// Fifteen minutes.
    FifteenMinute,
    /// Thirty minutes.
    ThirtyMinute,
    /// One hour.
    Hour,
    /// Six hours.
    SixHour,
    /// Eight hours.
    EightHour,
    /// One day.
    Day,
    /// One week.
    Week,
    /// One month.
    Month,
    /// One quarter.
    Quarter,
    /// One year.
    Year,
    /// Everything in one bucket.
    All,
}

impl Granularity {
    /// The name Druid's granularitySpec expects.
    pub fn as_druid(self) -> &'static str {
        match self {
            Granularity::None => "NONE",
            Granularity::Second => "SECOND",
            Granularity::Minute => "MINUTE",
            Granularity::FiveMinute => "FIVE_MINUTE",
            Granularity::TenMinute => "TEN_MINUTE",
            Granularity::FifteenMinute => "FIFTEEN_MINUTE",
            Granularity::ThirtyMinute => "THIRTY_MINUTE",
            Granularity::Hour => "HOUR",
            Granularity::SixHour => "SIX_HOUR",
            Granularity::EightHour => "EIGHT_HOUR",
            Granularity::Day => "DAY",
            Granularity::Week => "WEEK",
            Granularity::Month => "MONTH",
            Granularity::Quarter => "QUARTER",
            Granularity::Year => "YEAR",
            Granularity::All => "ALL",
        }
    }

    /// The start of the bucket holding `ms` (UTC, as Druid's uniform granularities bucket time:
    /// weeks start on Monday, months, quarters and years on the calendar); `None` for `NONE` and
    /// `ALL`, which have no bounded buckets.
    pub fn floor_ms(self, ms: i64) -> Option<i64> {
        Some(match self.buckets()? {
            Buckets::Fixed(size) => ms.div_euclid(size) * size,
            // 1970-01-01 was a Thursday: Mondays fall 3 days before a multiple of 7 days from it.
            Buckets::Weeks => (ms + 3 * DAY_MS).div_euclid(7 * DAY_MS) * 7 * DAY_MS - 3 * DAY_MS,
            Buckets::Months(n) => {
                let (year, month, _) = crate::clock::civil_from_days(ms.div_euclid(DAY_MS));
                crate::clock::days_from_civil(year, (month - 1) / n * n + 1, 1) * DAY_MS
            }
        })
    }

    /// `ms` when it starts a bucket, else the start of the bucket after the one holding it; `None`
    /// for `NONE` and `ALL`.
    pub fn ceil_ms(self, ms: i64) -> Option<i64> {
        let start = self.floor_ms(ms)?;
        if start == ms {
            return Some(ms);
        }
        Some(match self.buckets()? {
            Buckets::Fixed(size) => start + size,
            Buckets::Weeks => start + 7 * DAY_MS,
            Buckets::Months(n) => {
                let (year, month, _) = crate::clock::civil_from_days(start.div_euclid(DAY_MS));
                let next = month + n;
                let (year, month) = if next > 12 { (year + 1, next - 12) } else { (year, next) };
                crate::clock::days_from_civil(year, month, 1) * DAY_MS
            }
        })
    }

    fn buckets(self) -> Option<Buckets> {
        const HOUR_MS: i64 = 3_600_000;
        Some(match self {
            Granularity::None | Granularity::All => return None,
            Granularity::Second => Buckets::Fixed(1_000),
            Granularity::Minute => Buckets::Fixed(60_000),
            Granularity::FiveMinute => Buckets::Fixed(300_000),
            Granularity::TenMinute => Buckets::Fixed(600_000),
            Granularity::FifteenMinute => Buckets::Fixed(900_000),
            Granularity::ThirtyMinute => Buckets::Fixed(1_800_000),
            Granularity::Hour => Buckets::Fixed(HOUR_MS),
            Granularity::SixHour => Buckets::Fixed(6 * HOUR_MS),
            Granularity::EightHour => Buckets::Fixed(8 * HOUR_MS),
            Granularity::Day => Buckets::Fixed(DAY_MS),
            Granularity::Week => Buckets::Weeks,
            Granularity::Month => Buckets::Months(1),
            Granularity::Quarter => Buckets::Months(3),
            Granularity::Year => Buckets::Months(12),
        })
    }
}

const DAY_MS: i64 = 86_400_000;

/// How a granularity cuts time.
enum Buckets {
    /// Buckets of this many milliseconds from the epoch.
    Fixed(i64),
    /// Weeks from Monday.
    Weeks,
    /// Calendar months in groups of this many from January.
    Months(u32),
}

/// One rollup metric: `{ name = "qty_sum", kind = "doubleSum", field = "qty" }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    /// The Druid column the metric is stored in.
    pub name: String,
    /// The aggregator.
    pub kind: MetricKind,
    /// The sink-row field (by JSON name) it aggregates; none for `count`.
    #[serde(default)]
    pub field: Option<String>,
}

impl MetricConfig {
    /// A metric over `field`.
    pub fn new(name: &str, kind: MetricKind, field: &str) -> Self {
        MetricConfig { name: name.into(), kind, field: Some(field.into()) }
    }

    /// A `count` metric.
    pub fn count(name: &str) -> Self {
        MetricConfig { name: name.into(), kind: MetricKind::Count, field: None }
    }
}

/// The ingestion-time aggregators sluice generates, named as Druid's `type` names them.
///
/// `doubleFirst`/`doubleLast` take the value at the earliest/latest row time (`__time`), like the embedded
/// store's `price_first`/`price_last`. Older Druid releases accept numeric first/last only in queries; for
/// such a cluster, drop those two metrics from the configuration.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MetricKind {
    /// Rows rolled into the Druid row; takes no field.
    Count,
    /// Sum of an integer field.
    LongSum,
    /// Sum of a numeric field.
    DoubleSum,
    /// Smallest value of a numeric field.
    DoubleMin,
    /// Largest value of a numeric field.
    DoubleMax,
    /// Value of a numeric field at the earliest row time.
    DoubleFirst,
    /// Value of a numeric field at the latest row time.
    DoubleLast,
}

impl MetricKind {
    /// The aggregator's `type` in a Druid metricsSpec.
    pub fn as_druid(self) -> &'static str {
        match self {
            MetricKind::Count => "count",
            MetricKind::LongSum => "longSum",
            MetricKind::DoubleSum => "doubleSum",
            MetricKind::DoubleMin => "doubleMin",
            MetricKind::DoubleMax => "doubleMax",
            MetricKind::DoubleFirst => "doubleFirst",
            MetricKind::DoubleLast => "doubleLast",
        }
    }

    /// Whether the aggregator reads a field (all but `count`).
    pub fn takes_field(self) -> bool {
        self != MetricKind::Count
    }
}

mod defaults {
    use super::{Granularity, MetricConfig, MetricKind};

    pub fn overlord_url() -> String {
        "http://localhost:8081".into()
    }
    pub fn topic() -> String {
        "sluice.druid".into()
    }
    pub fn datasource() -> String {
        "sluice_trades".into()
    }
    pub fn timestamp_column() -> String {
        "timestampMs".into()
    }
    pub fn segment_granularity() -> Granularity {
        Granularity::Hour
    }
    pub fn query_granularity() -> Granularity {
        Granularity::Minute
    }
    pub fn rollup() -> bool {
        true
    }
    pub fn one() -> u32 {
        1
    }
    pub fn transactions_in_flight() -> u32 {
        2
    }
    pub fn task_duration() -> String {
        "PT1H".into()
    }
    pub fn use_earliest_offset() -> bool {
        true
    }
    pub fn dimensions() -> Vec<String> {
        vec!["source".into(), "symbol".into(), "side".into()]
    }
    pub fn metrics() -> Vec<MetricConfig> {
        vec![
            MetricConfig::count("events"),
            MetricConfig::new("qty_sum", MetricKind::DoubleSum, "qty"),
            MetricConfig::new("notional_sum", MetricKind::DoubleSum, "notional"),
            MetricConfig::new("price_min", MetricKind::DoubleMin, "price"),
            MetricConfig::new("price_max", MetricKind::DoubleMax, "price"),
            MetricConfig::new("price_first", MetricKind::DoubleFirst, "price"),
            MetricConfig::new("price_last", MetricKind::DoubleLast, "price"),
        ]
    }
    pub fn request_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn retry_backoff_ms() -> u64 {
        500
    }
    pub fn poll_interval_ms() -> u64 {
        30_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_gets_the_documented_defaults() {
        let cfg: DruidSinkConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, DruidSinkConfig::default());
        assert_eq!(cfg.topic, "sluice.druid");
        assert_eq!(cfg.segment_granularity, Granularity::Hour);
        assert_eq!(cfg.query_granularity, Granularity::Minute);
        assert!(cfg.rollup);
        assert_eq!(cfg.dimensions, ["source", "symbol", "side"]);
        assert_eq!(
            (cfg.state_topic(), cfg.checkpoint_topic()),
            ("sluice.druid.state".into(), "sluice.druid.checkpoints".into())
        );
        let kinds: Vec<_> = cfg.metrics.iter().map(|m| (m.name.as_str(), m.kind.as_druid())).collect();
        assert_eq!(
            kinds,
            [
                ("events", "count"),
                ("qty_sum", "doubleSum"),
                ("notional_sum", "doubleSum"),
                ("price_min", "doubleMin"),
                ("price_max", "doubleMax"),
                ("price_first", "doubleFirst"),
                ("price_last", "doubleLast"),
            ]
        );
    }

    #[test]
    fn a_full_table_parses_and_unknown_keys_are_refused() {
        let cfg: DruidSinkConfig = toml::from_str(
            r#"
            overlord_url = "https://overlord:8281"
            username = "sluice"
            password = "hunter2"
            datasource = "ticks_1m"
            segment_granularity = "DAY"
            query_granularity = "FIVE_MINUTE"
            late_message_rejection_period = "PT6H"
            bootstrap_servers = "kafka-1:9092"
            consumer_options = { "security.protocol" = "SSL" }
            dimensions = ["symbol"]
            metrics = [{ name = "n", kind = "count" }, { name = "v", kind = "longSum", field = "qty" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.segment_granularity.as_druid(), "DAY");
        assert_eq!(cfg.query_granularity.as_druid(), "FIVE_MINUTE");
        assert_eq!(cfg.metrics[1], MetricConfig::new("v", MetricKind::LongSum, "qty"));
        assert_eq!(cfg.password, Some(Password("hunter2".into())));
        let named: DruidSinkConfig = toml::from_str("checkpoint_topic = \"ticks.cp\"").unwrap();
        assert_eq!(named.checkpoint_topic(), "ticks.cp");

        let err = toml::from_str::<DruidSinkConfig>("datasorce = \"x\"").unwrap_err().to_string();
        assert!(err.contains("datasorce"), "{err}");
        let err = toml::from_str::<DruidSinkConfig>("metrics = [{ name = \"x\", kind = \"doubleAvg\" }]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("doubleAvg"), "{err}");
    }

    #[test]
    fn buckets_start_where_druids_do() {
        let ms = |s: &str| plugin_sdk::time::rfc3339_to_ms(s).unwrap();
        let t = ms("2026-12-02T14:37:12.5Z"); // a Wednesday
        let cases = [
            (Granularity::Second, "2026-12-02T14:37:12Z", "2026-12-02T14:37:13Z"),
            (Granularity::Minute, "2026-12-02T14:37:00Z", "2026-12-02T14:38:00Z"),
            (Granularity::FifteenMinute, "2026-12-02T14:30:00Z", "2026-12-02T14:45:00Z"),
            (Granularity::Hour, "2026-12-02T14:00:00Z", "2026-12-02T15:00:00Z"),
            (Granularity::SixHour, "2026-12-02T12:00:00Z", "2026-12-02T18:00:00Z"),
            (Granularity::EightHour, "2026-12-02T08:00:00Z", "2026-12-02T16:00:00Z"),
            (Granularity::Day, "2026-12-02T00:00:00Z", "2026-12-03T00:00:00Z"),
            (Granularity::Week, "2026-11-30T00:00:00Z", "2026-12-07T00:00:00Z"),
            (Granularity::Month, "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            (Granularity::Quarter, "2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            (Granularity::Year, "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ];
        for (g, floor, ceil) in cases {
            assert_eq!(g.floor_ms(t), Some(ms(floor)), "{g:?}");
            assert_eq!(g.ceil_ms(t), Some(ms(ceil)), "{g:?}");
            // A bucket's start is its own floor and ceiling.
            assert_eq!((g.floor_ms(ms(floor)), g.ceil_ms(ms(floor))), (Some(ms(floor)), Some(ms(floor))), "{g:?}");
        }
        assert_eq!(Granularity::Week.floor_ms(0), Some(ms("1969-12-29T00:00:00Z")));
        assert_eq!(Granularity::Quarter.ceil_ms(ms("2027-02-28T23:00:00Z")), Some(ms("2027-04-01T00:00:00Z")));
        assert_eq!(Granularity::Hour.floor_ms(-1), Some(-3_600_000));
        assert_eq!((Granularity::None.floor_ms(t), Granularity::All.ceil_ms(t)), (None, None));
    }

    #[test]
    fn the_password_never_prints() {
        let mut cfg = DruidSinkConfig { password: Some(Password("hunter2".into())), ..Default::default() };
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(!toml::to_string(&cfg).unwrap().contains("hunter2"));
        // Nor does a secret among the options handed to Druid's consumers.
        cfg.consumer_options
            .insert("sasl.jaas.config".into(), "PlainLoginModule required password=\"hunter2\";".into());
        cfg.consumer_options.insert("security.protocol".into(), "SASL_SSL".into());
        let printed = toml::to_string(&cfg).unwrap();
        assert!(!printed.contains("hunter2") && printed.contains("\"sasl.jaas.config\" = \"***\""), "{printed}");
        assert!(printed.contains("SASL_SSL"), "{printed}");
    }
}
