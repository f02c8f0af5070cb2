//! Configuration: one TOML file, every field with a default that works, unit suffixes in names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::handoff::kafka::KafkaConfig;
pub use crate::source::config::{Link, SourceConfig, SourceKind};

/// Tables renamed since an earlier release: (former name, name now). The former name is still read,
/// with a warning. `[log]` became `[local_log]`, so it cannot be taken for `[logging]`.
pub const RENAMED: &[(&str, &str)] = &[("log", "local_log")];

/// The whole configuration file (`sluice run --config sluice.toml`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where sluice keeps its state (the local log, the embedded store, stored plugins).
    #[serde(default = "defaults::data_dir")]
    pub data_dir: std::path::PathBuf,
    /// The Kafka cluster and topics.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// `[local_log]`: the local log between the roles, used when no Kafka brokers are configured
    /// (read from `[log]` too, its name before, with a warning).
    #[serde(default)]
    pub local_log: crate::handoff::LocalLogConfig,
    /// The ingest role's tuning.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The HTTP API (health, queries); on loopback by default.
    #[serde(default)]
    pub api: crate::api::ApiConfig,
    /// The process role's settings.
    #[serde(default)]
    pub process: ProcessConfig,
    /// Where the process role delivers: `[sink.druid]`, or the embedded store when absent.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// The feeds.
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    /// How sluice writes its own log lines (not the local log: that is `[local_log]`).
    #[serde(default)]
    pub logging: LoggingConfig,
}

/// `[logging]`: the format of sluice's log lines on stderr (which lines, `RUST_LOG` decides).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` (the default) for people, `json` (one object per line) for log collectors.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`).
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: defaults::data_dir(),
            kafka: KafkaConfig::default(),
            local_log: crate::handoff::LocalLogConfig::default(),
            ingest: IngestConfig::default(),
            api: crate::api::ApiConfig::default(),
            process: ProcessConfig::default(),
            sink: SinkConfig::default(),
            plugins: BTreeMap::new(),
            sources: Vec::new(),
            logging: LoggingConfig::default(),
        }
    }
}

/// `[ingest]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Decode worker threads.
    #[serde(default = "defaults::workers")]
    pub workers: usize,
    /// Frames each worker's queue holds before sources drop (and count) them.
    #[serde(default = "defaults::queue_frames")]
    pub queue_frames: usize,
    /// Bytes of frames each worker's queue holds before sources drop (and count) them: the bound
    /// that holds when frames are large.
    #[serde(default = "defaults::queue_bytes")]
    pub queue_bytes: usize,
    /// Most frames decoded in one plugin call.
    #[serde(default = "defaults::max_frames_per_call")]
    pub max_frames_per_call: usize,
    /// Most bytes of frames decoded in one plugin call (a larger frame goes alone): keep it well
    /// under the decoders' `memory_bytes`, which must hold the frames, their records and the rest.
    #[serde(default = "defaults::max_bytes_per_call")]
    pub max_bytes_per_call: usize,
    /// Minimum spacing of connection attempts to one host.
    #[serde(default = "defaults::connect_interval_ms")]
    pub connect_interval_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            workers: defaults::workers(),
            queue_frames: defaults::queue_frames(),
            queue_bytes: defaults::queue_bytes(),
            max_frames_per_call: defaults::max_frames_per_call(),
            max_bytes_per_call: defaults::max_bytes_per_call(),
            connect_interval_ms: defaults::connect_interval_ms(),
        }
    }
}

/// `[process]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// The consumer group process instances share. With the Druid sink, instances in one group split
    /// the events topic's partitions; the embedded store is one machine's, so its instance reads all.
    #[serde(default = "defaults::group")]
    pub group: String,
    /// This instance's name, stable across restarts: the Druid sink's transactional id is derived from
    /// it, so a restarted instance fences its previous incarnation and aborts what it left open.
    /// Unset it is `"0"` ([`ProcessConfig::instance`]); with the Druid sink it must be set, one name
    /// per instance of the group (see [`Config::check_druid_instance`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Most rows in one batch to the sink.
    #[serde(default = "defaults::max_batch_rows")]
    pub max_batch_rows: usize,
    /// The longest a row may wait for its batch: an upper bound, never aimed at (batches are flushed
    /// as soon as the sink is free).
    #[serde(default = "defaults::max_wait_ms")]
    pub max_wait_ms: u64,
    /// How long rows reaching an idle sink wait for more before their batch is flushed.
    #[serde(default = "defaults::linger_us")]
    pub linger_us: u64,
    /// The default chain: the transforms applied to the records of every source that names none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<Link>,
    /// How often the sink keeps a checkpoint of the chains' state with its position (at most; only
    /// when state changed), in the embedded store or the Druid sink's checkpoint topic: where
    /// `sluice replay` of a stateful chain starts from.
    #[serde(default = "defaults::checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// How long the retry and bisection of one failed batch may take per link before the batch is
    /// given up and the link's breaker opens (its source's records then wait in the log while the
    /// other sources go on).
    #[serde(default = "defaults::link_budget_ms")]
    pub link_budget_ms: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            group: defaults::group(),
            instance: None,
            max_batch_rows: defaults::max_batch_rows(),
            max_wait_ms: defaults::max_wait_ms(),
            linger_us: defaults::linger_us(),
            transforms: Vec::new(),
            checkpoint_interval_ms: defaults::checkpoint_interval_ms(),
            link_budget_ms: defaults::link_budget_ms(),
        }
    }
}

impl ProcessConfig {
    /// [`ProcessConfig::instance`] as set, or `"0"`.
    pub fn instance(&self) -> &str {
        self.instance.as_deref().unwrap_or("0")
    }
}

impl From<&ProcessConfig> for crate::batch::BatchConfig {
    fn from(p: &ProcessConfig) -> Self {
        crate::batch::BatchConfig {
            max_rows: p.max_batch_rows,
            max_wait: std::time::Duration::from_millis(p.max_wait_ms),
            linger: std::time::Duration::from_micros(p.linger_us),
            ..crate::batch::BatchConfig::default()
        }
    }
}

impl From<&PluginConfig> for crate::plugin::Limits {
    fn from(p: &PluginConfig) -> Self {
        crate::plugin::Limits {
            memory_bytes: p.memory_bytes,
            deadline: std::time::Duration::from_millis(p.deadline_ms),
            output_bytes: p.output_bytes,
            max_symbols: p.max_symbols,
            max_symbol_bytes: p.max_symbol_bytes,
            state_bytes: p.state_bytes,
        }
    }
}

/// `[sink]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Deliver to Druid through the Druid topic and a Kafka supervisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub druid: Option<crate::sink::druid::DruidSinkConfig>,
}

/// `[plugins.<name>]`: where a plugin's `.wasm` is and the limits its calls run under.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path to the component; omit to use the bundled plugin of the same name.
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
    /// Linear-memory cap per instance.
    #[serde(default = "defaults::plugin_memory_bytes")]
    pub memory_bytes: usize,
    /// Deadline per call.
    #[serde(default = "defaults::plugin_deadline_ms")]
    pub deadline_ms: u64,
    /// Largest output per call.
    #[serde(default = "defaults::plugin_output_bytes")]
    pub output_bytes: usize,
    /// Most symbols the plugin may name in this process, all its instances together (frames are
    /// untrusted, and every name named is kept in the dictionary for good); a frame past it is
    /// dead-lettered with the reason.
    #[serde(default = "defaults::plugin_max_symbols")]
    pub max_symbols: u32,
    /// Longest symbol name the plugin may name, in bytes; a frame naming a longer one is
    /// dead-lettered with the reason.
    #[serde(default = "defaults::plugin_max_symbol_bytes")]
    pub max_symbol_bytes: usize,
    /// Most bytes of state (keys and values) one link of the plugin may keep; past it the link's
    /// calls fail with a typed error and its breaker opens.
    #[serde(default = "defaults::plugin_state_bytes")]
    pub state_bytes: usize,
}

impl PluginConfig {
    /// Checks the limits: each must leave room for a call to succeed.
    ///
    /// # Errors
    /// The field and why, e.g. `output_bytes must be positive: ...`.
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("memory_bytes", self.memory_bytes == 0, "no instance could start"),
            ("deadline_ms", self.deadline_ms == 0, "every call would time out"),
            ("output_bytes", self.output_bytes == 0, "every call that returns a record would fail"),
            ("max_symbols", self.max_symbols == 0, "every frame naming a symbol would be dead-lettered"),
        ];
        match zero.into_iter().find(|(_, is_zero, _)| *is_zero) {
            Some((key, _, why)) => Err(format!("{key} must be positive: {why}")),
            None => Ok(()),
        }
    }
}

impl Config {
    /// The transforms `source`'s records go through, in order: its own chain, or the `[process]`
    /// default when it names none.
    pub fn chain<'a>(&'a self, source: &'a SourceConfig) -> &'a [Link] {
        source.transforms.as_deref().unwrap_or(&self.process.transforms)
    }

    /// Each source's chain as configured ([`chain`](Self::chain)), by source name: what the
    /// [`ChainBook`](crate::chains::ChainBook) starts from.
    pub fn chains(&self) -> std::collections::BTreeMap<String, Vec<Link>> {
        self.sources.iter().map(|s| (s.name.clone(), self.chain(s).to_vec())).collect()
    }

    fn check_plugin(&self, name: &str) -> Result<(), String> {
        if self.plugins.contains_key(name) || crate::plugin::bundled::names().contains(&name) {
            Ok(())
        } else {
            Err(format!("plugin {name:?} is neither configured under [plugins] nor bundled"))
        }
    }

    /// Checks, before a process role with the Druid sink starts, that `[process] instance` was set:
    /// two instances left on the default name would share one transactional id and fence each
    /// other's transactions in a loop, each start aborting the other's work.
    ///
    /// # Errors
    /// A message naming the key and the group, when the Druid sink is configured and the instance is
    /// not named.
    pub fn check_druid_instance(&self) -> Result<(), String> {
        if self.sink.druid.is_some() && self.process.instance.is_none() {
            return Err(format!(
                "[sink.druid] needs [process] instance: name each process instance of group {:?} (e.g. \
                 instance = \"a\"), stable across its restarts and different from the others'; its Kafka \
                 transactional id is derived from it, and two instances on one name fence each other's \
                 transactions in a loop",
                self.process.group
            ));
        }
        if let (Some(_), Some(instance)) = (&self.sink.druid, &self.process.instance)
            && instance.contains('#')
        {
            return Err(format!(
                "[process] instance {instance:?} may not contain '#': the Druid sink's further producers' \
                 transactional ids add #1, #2, ... to the instance's, which must not be another instance's"
            ));
        }
        Ok(())
    }

    /// Reads and checks a configuration file.
    ///
    /// # Errors
    /// A message naming the file and the field (TOML errors carry the line and column).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config = Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Parses a configuration's text, reading a table under its former name (see [`RENAMED`]) as
    /// the new one, with a warning.
    ///
    /// # Errors
    /// The TOML error (with line and column), or a table given under both names.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for (old, new) in RENAMED {
            let Some(value) = table.remove(*old) else { continue };
            if table.contains_key(*new) {
                return Err(format!(
                    "[{old}] and [{new}] are the same table (its former and its new name): keep [{new}]"
                ));
            }
            tracing::warn!(
                "the configuration's [{old}] table is now called [{new}]; [{old}] is read as [{new}] for now"
            );
            table.insert((*new).to_owned(), value);
        }
        Config::deserialize(table).map_err(|e| e.to_string())
    }

    /// Checks what types cannot: unique source names, known plugins, sane values.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for s in &self.sources {
            s.validate()?;
            if !names.insert(&s.name) {
                return Err(format!("source name {:?} is used twice", s.name));
            }
            self.check_plugin(&s.decode).map_err(|e| format!("source {:?}: decode {e}", s.name))?;
            for (i, link) in s.transforms.iter().flatten().enumerate() {
                self.check_plugin(&link.plugin).map_err(|e| format!("source {:?}: transforms[{i}] {e}", s.name))?;
            }
        }
        for (i, link) in self.process.transforms.iter().enumerate() {
            self.check_plugin(&link.plugin).map_err(|e| format!("process: transforms[{i}] {e}"))?;
        }
        for (name, plugin) in &self.plugins {
            plugin.validate().map_err(|e| format!("plugins.{name}.{e}"))?;
        }
        let i = &self.ingest;
        if [i.workers, i.queue_frames, i.queue_bytes, i.max_frames_per_call, i.max_bytes_per_call].contains(&0) {
            return Err(
                "ingest: workers, queue_frames, queue_bytes, max_frames_per_call and max_bytes_per_call must be positive"
                    .into(),
            );
        }
        if i.queue_bytes > u32::MAX as usize {
            return Err("ingest: queue_bytes must be at most 4 GiB".into());
        }
        self.kafka.validate()?;
        self.api.validate()?;
        self.local_log.validate()?;
        if self.sink.druid.is_some() && self.kafka.brokers.trim().is_empty() {
            return Err("sink.druid needs [kafka] brokers: Druid reads its rows from a Kafka topic".into());
        }
        if let Some(druid) = &self.sink.druid {
            crate::sink::druid::validate(druid, crate::proto::DESCRIPTOR_SET, &self.kafka.brokers)
                .map_err(|e| format!("sink.druid: {e}"))?;
        }
        if self.process.group.is_empty() || self.process.instance().is_empty() {
            return Err("process: group and instance must not be empty".into());
        }
        if self.process.max_batch_rows == 0 || self.process.max_wait_ms == 0 {
            return Err("process: max_batch_rows and max_wait_ms must be positive".into());
        }
        Ok(())
    }
}

pub(crate) mod defaults {
    pub fn group() -> String {
        "sluice-process".into()
    }
    pub fn max_batch_rows() -> usize {
        100_000
    }
    pub fn linger_us() -> u64 {
        1000
    }
    pub fn max_wait_ms() -> u64 {
        1000
    }
    pub fn data_dir() -> std::path::PathBuf {
        "./sluice-data".into()
    }
    pub fn workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
    pub fn queue_frames() -> usize {
        16_384
    }
    pub fn max_frames_per_call() -> usize {
        256
    }
    pub fn queue_bytes() -> usize {
        64 << 20
    }
    pub fn max_bytes_per_call() -> usize {
        4 << 20
    }
    pub fn connect_interval_ms() -> u64 {
        20
    }
    pub fn plugin_memory_bytes() -> usize {
        64 << 20
    }
    pub fn plugin_deadline_ms() -> u64 {
        200
    }
    pub fn checkpoint_interval_ms() -> u64 {
        60_000
    }
    pub fn link_budget_ms() -> u64 {
        2_000
    }
    pub fn plugin_state_bytes() -> usize {
        16 << 20
    }
    pub fn plugin_max_symbols() -> u32 {
        10_000
    }
    pub fn plugin_max_symbol_bytes() -> usize {
        64
    }
    pub fn plugin_output_bytes() -> usize {
        16 << 20
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        source: Vec<SourceConfig>,
    }

    #[test]
    fn a_minimal_source_gets_working_defaults() {
        let file: File = toml::from_str(
            r#"
            [[source]]
            name = "binance"
            url = "wss://stream.binance.com:9443/stream"
            plugin = "binance"
            subscribe = ['{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}']
            "#,
        )
        .unwrap();
        let s = &file.source[0];
        assert_eq!(s.ping_interval(), Some(Duration::from_secs(15)));
        assert_eq!(s.max_connection_age_ms, 23 * 3600 * 1000);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_whole_file_with_defaults_and_its_errors() {
        let config: Config = toml::from_str(
            r#"
            [kafka]
            brokers = "127.0.0.1:9092"
            options = { "security.protocol" = "plaintext" }

            [plugins.mine]
            path = "my.wasm"
            deadline_ms = 50

            [[source]]
            name = "a"
            url = "wss://x"
            plugin = "binance"

            [[source]]
            name = "b"
            url = "ws://y"
            plugin = "mine"
            "#,
        )
        .unwrap();
        assert!(config.validate().is_ok());
        assert_eq!(config.kafka.events_topic, "sluice.events");
        assert_eq!(config.plugins["mine"].memory_bytes, 64 << 20);
        let mut dup = config.clone();
        dup.sources[1].name = "a".into();
        assert_eq!(dup.validate().unwrap_err(), "source name \"a\" is used twice");
        let mut unknown = config.clone();
        unknown.sources[1].decode = "nope".into();
        assert!(unknown.validate().unwrap_err().contains("plugin \"nope\""));
        let err = toml::from_str::<Config>("[kafka]\nbroker = 'x'\n").unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let err = toml::from_str::<File>("[[source]]\nname='a'\nurl='ws://x'\nplugin='p'\nping_ms=5\n").unwrap_err();
        assert!(err.to_string().contains("ping_ms"), "{err}");
        let mut s = SourceConfig::new("a", "http://x", "p");
        assert_eq!(s.validate().unwrap_err(), "source \"a\": url must start with ws:// or wss://");
        s.url = "ws://x".into();
        s.reconnect_max_ms = 1;
        assert!(s.validate().unwrap_err().contains("reconnect_min_ms"));
    }

    /// `[log]`, the local log's table before it was renamed `[local_log]`, is still read, as the
    /// same table; given under both names it is refused rather than one silently winning.
    #[test]
    fn a_table_under_its_former_name_is_read_as_the_new_one() {
        let old = Config::parse("[log]\nretention_bytes = 123\n").unwrap();
        assert_eq!(old.local_log.retention_bytes, 123);
        assert_eq!(old, Config::parse("[local_log]\nretention_bytes = 123\n").unwrap());
        let both = Config::parse("[log]\nretention_bytes = 1\n[local_log]\nretention_bytes = 2\n").unwrap_err();
        assert!(both.contains("[log] and [local_log]"), "{both}");
        // A field the table does not have is still refused under the former name.
        assert!(Config::parse("[log]\nretention = 1\n").unwrap_err().contains("unknown field"));
    }

    /// A field set to zero where zero cannot work is refused, naming the field.
    #[test]
    fn zeros_that_cannot_work_are_refused_by_name() {
        let base = "[[source]]\nname = 'a'\nurl = 'ws://x'\nplugin = 'mine'\n";
        let plugin = "[plugins.mine]\npath = 'my.wasm'\n";
        let load = |source_extra: &str, rest: &str| {
            let config: Config = toml::from_str(&format!("{rest}\n{base}{source_extra}\n{plugin}")).unwrap();
            config.validate()
        };
        load("", "").unwrap();
        for (source_extra, rest, key) in [
            ("connect_timeout_ms = 0", "", "source \"a\": connect_timeout_ms"),
            ("pong_timeout_ms = 0", "", "source \"a\": pong_timeout_ms"),
            ("", "[local_log]\nmax_bytes = 0\nretention_bytes = 0", "local_log.max_bytes"),
        ] {
            let err = load(source_extra, rest).unwrap_err();
            assert!(err.starts_with(key) && err.contains("must be positive"), "{key}: {err}");
        }
        for key in ["max_symbols", "output_bytes", "deadline_ms", "memory_bytes"] {
            let config: Config = toml::from_str(&format!("{base}{plugin}{key} = 0\n")).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.starts_with(&format!("plugins.mine.{key} must be positive")), "{err}");
        }
    }

    #[test]
    fn the_druid_sink_needs_each_instance_named() {
        let text = "[kafka]\nbrokers = 'k:9092'\n[sink.druid]\n";
        let config: Config = toml::from_str(text).unwrap();
        // A valid configuration (check-config and `druid spec` take it) ...
        config.validate().unwrap();
        // ... that a process role does not start with.
        let err = config.check_druid_instance().unwrap_err();
        assert!(err.starts_with("[sink.druid] needs [process] instance"), "{err}");
        let named: Config = toml::from_str(&format!("{text}[process]\ninstance = 'a'\n")).unwrap();
        named.check_druid_instance().unwrap();
        assert_eq!(named.process.instance(), "a");
        // "a#1" would be the transactional id of instance "a"'s second producer.
        let clash: Config = toml::from_str(&format!("{text}[process]\ninstance = 'a#1'\n")).unwrap();
        assert!(clash.check_druid_instance().unwrap_err().contains("may not contain '#'"));
        // Without the Druid sink the default name is fine.
        let config: Config = toml::from_str("[kafka]\nbrokers = 'k:9092'\n").unwrap();
        config.check_druid_instance().unwrap();
        assert_eq!(config.process.instance(), "0");
    }

    #[test]
    fn a_file_source_needs_a_path_and_no_url() {
        let file: File =
            toml::from_str("[[source]]\nname='r'\nkind='file'\npath='frames.jsonl'\nrate=50\nplugin='p'\n").unwrap();
        let s = &file.source[0];
        assert_eq!((s.kind, s.rate), (SourceKind::File, 50.0));
        s.validate().unwrap();
        let mut bad = s.clone();
        bad.path = None;
        assert_eq!(bad.validate().unwrap_err(), "source \"r\": path is needed by a file source");
        let mut bad = s.clone();
        bad.url = "ws://x".into();
        assert!(bad.validate().unwrap_err().contains("url is for WebSocket sources"));
        let mut bad = s.clone();
        bad.rate = -1.0;
        assert!(bad.validate().unwrap_err().contains("rate"));
        assert!(toml::from_str::<File>("[[source]]\nname='r'\nkind='tape'\nplugin='p'\n").is_err());
    }

    #[test]
    fn a_source_names_a_decoder_and_a_chain_or_gets_the_default_one() {
        let config: Config = toml::from_str(
            r#"
            [process]
            transforms = ["outlier-filter"]

            [[source]]
            name = "chained"
            url = "ws://x"
            decode = "binance"
            decode_config = {}
            transforms = [{ plugin = "rescale", config = { scale = "2" } }, "outlier-filter"]

            [[source]]
            name = "default"
            url = "ws://y"
            plugin = "kraken"

            [[source]]
            name = "none"
            url = "ws://z"
            decode = "coinbase"
            transforms = []
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        let chains: Vec<Vec<&str>> =
            config.sources.iter().map(|s| config.chain(s).iter().map(|l| l.plugin.as_str()).collect()).collect();
        assert_eq!(chains, [vec!["rescale", "outlier-filter"], vec!["outlier-filter"], vec![]]);
        assert_eq!(config.chain(&config.sources[0])[0].config_pairs(), [("scale".to_owned(), "2".to_owned())]);
        // The old spelling `plugin` still names the decoder.
        assert_eq!(config.sources[1].decode, "kraken");
        // What `check-config` prints reads back the same.
        let printed = toml::to_string_pretty(&config).unwrap();
        assert_eq!(toml::from_str::<Config>(&printed).unwrap(), config);

        let mut unknown = config.clone();
        unknown.sources[0].transforms.as_mut().unwrap()[1].plugin = "nope".into();
        assert_eq!(
            unknown.validate().unwrap_err(),
            "source \"chained\": transforms[1] plugin \"nope\" is neither configured under [plugins] nor bundled"
        );
        let mut unknown = config.clone();
        unknown.process.transforms[0].plugin = "nope".into();
        assert!(unknown.validate().unwrap_err().starts_with("process: transforms[0] plugin \"nope\""));
        let err = toml::from_str::<Config>("[process]\ntransforms = [{ plugin = 'a', with = {} }]\n").unwrap_err();
        assert!(err.to_string().contains("a plugin name, or a table"), "{err}");
    }
}
