//! A `sluice.toml` built in code, table by table: the tests state the settings they are about and
//! the builder writes valid TOML (quoting, escaping, the single test broker's replication), instead
//! of each test formatting a TOML string of its own.
//!
//! `ConfigToml::new(&dir).api_bind(&api).process("max_wait_ms", 50).source(Source::file("recorded",
//! &path).decode("binance")).save()` writes `<dir>/sluice.toml` with `data_dir = "<dir>"`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::unique_topic;

/// Subscriptions the simulator's venues answer, as a `[[source]]`'s `subscribe` message.
pub const BINANCE_BTC: &str = r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}"#;
pub const BINANCE_BTC_ETH: &str = r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","ethusdt@aggTrade"],"id":1}"#;
pub const COINBASE_BTC: &str = r#"{"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches"]}"#;
pub const COINBASE_ETH: &str = r#"{"type":"subscribe","product_ids":["ETH-USD"],"channels":["matches"]}"#;
pub const COINBASE_ADVANCED_BTC: &str = r#"{"type":"subscribe","product_ids":["BTC-USD"],"channel":"market_trades"}"#;
pub const KRAKEN_XBT: &str = r#"{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"trade"}}"#;
pub const KRAKEN_V2_BTC: &str = r#"{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"]}}"#;

/// A configuration file being built; [`ConfigToml::save`] writes it.
#[derive(Clone, Debug)]
pub struct ConfigToml {
    data_dir: PathBuf,
    table: Table,
}

impl ConfigToml {
    /// A configuration keeping its state in `data_dir`, every other setting at its default.
    pub fn new(data_dir: &Path) -> Self {
        let mut table = Table::new();
        table.insert("data_dir".into(), data_dir.display().to_string().into());
        ConfigToml { data_dir: data_dir.to_owned(), table }
    }

    /// `key = value` in the table at the dotted path `table` (`"process"`, `"sink.druid"`,
    /// `"plugins.binance"`), created when missing.
    pub fn set(mut self, table: &str, key: &str, value: impl Into<Value>) -> Self {
        let mut at = &mut self.table;
        for name in table.split('.') {
            at = at
                .entry(name)
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name} is not a table"));
        }
        at.insert(key.into(), value.into());
        self
    }

    /// `[api] bind`: where the API listens.
    pub fn api_bind(self, addr: &str) -> Self {
        self.set("api", "bind", addr)
    }

    /// `key = value` under `[process]`.
    pub fn process(self, key: &str, value: impl Into<Value>) -> Self {
        self.set("process", key, value)
    }

    /// `[plugins.<name>] path`: the test plugin built as `<file>` in the plugin directory.
    pub fn plugin(self, name: &str, file: &str) -> Self {
        self.set(&format!("plugins.{name}"), "path", format!("{}/{file}", env!("SLUICE_PLUGIN_DIR")))
    }

    /// `[kafka]`: the broker at `brokers`, `topics`, the events topic's `partitions`, and one
    /// replica per partition (the test broker is a single broker).
    pub fn kafka(self, brokers: &str, topics: &Topics, partitions: i64) -> Self {
        self.set("kafka", "brokers", brokers)
            .set("kafka", "events_topic", topics.events.as_str())
            .set("kafka", "dlq_topic", topics.dlq.as_str())
            .set("kafka", "symbols_topic", topics.symbols.as_str())
            .set("kafka", "files_topic", topics.files.as_str())
            .set("kafka", "partitions", partitions)
            .set("kafka", "replication_factor", 1)
            .set("kafka", "min_insync_replicas", 1)
    }

    /// `[sink.druid]`: rows to the Druid topic `topic`, the supervisor spec to the Overlord at
    /// `overlord_url`.
    pub fn druid(self, overlord_url: &str, topic: &str) -> Self {
        self.set("sink.druid", "overlord_url", overlord_url).set("sink.druid", "topic", topic)
    }

    /// One more `[[source]]`.
    pub fn source(mut self, source: Source) -> Self {
        let sources = self.table.entry("source").or_insert_with(|| Value::Array(Vec::new()));
        sources.as_array_mut().expect("source is an array of tables").push(Value::Table(source.0));
        self
    }

    /// Writes it to `<data_dir>/sluice.toml` and returns that path.
    pub fn save(&self) -> PathBuf {
        self.save_as(&self.data_dir.join("sluice.toml"))
    }

    /// Writes it to `path` and returns that path.
    pub fn save_as(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_string()).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path.to_owned()
    }
}

impl std::fmt::Display for ConfigToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&toml::to_string(&self.table).map_err(|_| std::fmt::Error)?)
    }
}

/// Topic names for one test's `[kafka]` table, unique per run (see [`unique_topic`]) so tests
/// sharing an external broker do not see each other's records.
#[derive(Clone, Debug)]
pub struct Topics {
    pub events: String,
    pub dlq: String,
    pub symbols: String,
    pub files: String,
}

impl Topics {
    pub fn unique() -> Self {
        Topics {
            events: unique_topic("events"),
            dlq: unique_topic("dlq"),
            symbols: unique_topic("symbols"),
            files: unique_topic("files"),
        }
    }
}

/// One `[[source]]` table.
#[derive(Clone, Debug)]
pub struct Source(Table);

impl Source {
    /// A WebSocket source on `url` that sends `subscribe` once connected.
    pub fn ws(name: &str, url: &str, subscribe: &str) -> Self {
        Source(Table::new()).set("name", name).set("url", url).set("subscribe", vec![subscribe])
    }

    /// A file source replaying the recording at `path`.
    pub fn file(name: &str, path: &Path) -> Self {
        Source(Table::new()).set("name", name).set("kind", "file").set("path", path.display().to_string())
    }

    /// `decode`: the decoding plugin.
    pub fn decode(self, plugin: &str) -> Self {
        self.set("decode", plugin)
    }

    /// Any other field.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// One more link of its chain: `plugin` with `config` (written as the plugin's name alone when
    /// `config` is empty).
    pub fn link(mut self, plugin: &str, config: &[(&str, &str)]) -> Self {
        let link = if config.is_empty() {
            Value::from(plugin)
        } else {
            let config: Table = config.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
            let mut link = Table::new();
            link.insert("plugin".into(), plugin.into());
            link.insert("config".into(), config.into());
            link.into()
        };
        let links = self.0.entry("transforms").or_insert_with(|| Value::Array(Vec::new()));
        links.as_array_mut().expect("transforms is an array").push(link);
        self
    }
}
