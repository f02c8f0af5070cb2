//! `[[source]]`: one feed's table of the configuration file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One WebSocket feed: where it is, what to send on connect, and how to keep it alive.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A unique name, used in logs, metrics and the API.
    pub name: String,
    /// Where frames come from: a venue's WebSocket (`websocket`, the default) or a recorded file of
    /// raw frames, one per line (`file`), replayed through the same decode path.
    #[serde(default)]
    pub kind: SourceKind,
    /// `ws://` or `wss://` URL of the feed (WebSocket sources).
    #[serde(default)]
    pub url: String,
    /// The recorded frames, one raw frame per line (file sources).
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
    /// Frames per second a file source replays at; 0 (the default) is as fast as decode takes them.
    #[serde(default)]
    pub rate: f64,
    /// What a file source does when the recording at `path` is not the one it was reading before a
    /// restart (its first 64 KiB differ, or it is shorter than the position reached): `refuse` (the
    /// default) stops the start with an error, `reread` reads the new recording from its start.
    #[serde(default)]
    pub if_changed: IfChanged,
    /// Text messages sent after every (re)connect, e.g. the venue's subscribe request.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// The plugin that decodes this feed's frames (the ingest role's one link).
    #[serde(alias = "plugin")]
    pub decode: String,
    /// Key/value configuration handed to the decode plugin's `init`.
    #[serde(default, alias = "plugin_config")]
    pub decode_config: BTreeMap<String, String>,
    /// The transforms the process role applies to this source's records, in order; absent, the
    /// `[process] transforms` default chain applies (`transforms = []` is none at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transforms: Option<Vec<Link>>,
    /// How often to ping the venue; 0 disables our pings.
    #[serde(default = "defaults::ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// A connection whose pong does not arrive within this long is dead.
    #[serde(default = "defaults::pong_timeout_ms")]
    pub pong_timeout_ms: u64,
    /// Send this text instead of a WebSocket ping (some venues want e.g. `ping`); any frame then
    /// counts as the answer.
    #[serde(default)]
    pub keepalive_text: Option<String>,
    /// Reconnect when no message at all arrived for this long.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Rotate the connection (new one first, then close the old) before it gets this old; venues
    /// cut connections at 24 h.
    #[serde(default = "defaults::max_connection_age_ms")]
    pub max_connection_age_ms: u64,
    /// Largest frame (or recording line) decoded: a larger one is cut to this size, counted and
    /// dead-lettered; a WebSocket frame past four times this (at least 16 MiB) closes the connection.
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Socket read buffer per connection: larger reads fewer times under load, smaller keeps
    /// thousands of quiet connections cheap.
    #[serde(default = "defaults::read_buffer_bytes")]
    pub read_buffer_bytes: usize,
    /// First reconnect delay ceiling; it doubles per failure up to `reconnect_max_ms`.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay ceiling.
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// A connection up this long resets the backoff.
    #[serde(default = "defaults::healthy_after_ms")]
    pub healthy_after_ms: u64,
    /// Substrings that mark a venue's shutdown notice: the source reconnects at once, without backoff.
    #[serde(default = "defaults::shutdown_notices")]
    pub shutdown_notices: Vec<String>,
    /// How long a connection attempt (TCP, TLS, handshake) may take.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long one write (a subscribe message, a ping) may wait for the socket: a venue that stops
    /// reading fills the buffers, and the connection is given up rather than waited on.
    #[serde(default = "defaults::write_timeout_ms")]
    pub write_timeout_ms: u64,
}

/// What a file source does with a recording that changed under its path.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IfChanged {
    /// Refuse to start, naming the source and what differs.
    #[default]
    Refuse,
    /// Read the new recording from its first line.
    Reread,
}

/// Where a source's frames come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A venue's WebSocket feed.
    #[default]
    Websocket,
    /// A recorded `.jsonl` of raw frames, replayed once.
    File,
}

impl SourceConfig {
    /// A source with default settings.
    pub fn new(name: &str, url: &str, plugin: &str) -> Self {
        SourceConfig {
            name: name.into(),
            kind: SourceKind::Websocket,
            url: url.into(),
            path: None,
            rate: 0.0,
            if_changed: IfChanged::Refuse,
            subscribe: vec![],
            decode: plugin.into(),
            decode_config: BTreeMap::new(),
            transforms: None,
            ping_interval_ms: defaults::ping_interval_ms(),
            pong_timeout_ms: defaults::pong_timeout_ms(),
            keepalive_text: None,
            idle_timeout_ms: defaults::idle_timeout_ms(),
            max_connection_age_ms: defaults::max_connection_age_ms(),
            max_frame_bytes: defaults::max_frame_bytes(),
            read_buffer_bytes: defaults::read_buffer_bytes(),
            reconnect_min_ms: defaults::reconnect_min_ms(),
            reconnect_max_ms: defaults::reconnect_max_ms(),
            healthy_after_ms: defaults::healthy_after_ms(),
            shutdown_notices: defaults::shutdown_notices(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            write_timeout_ms: defaults::write_timeout_ms(),
        }
    }

    /// Checks values a TOML type cannot: the URL scheme and that timeouts make sense.
    ///
    /// # Errors
    /// A message naming the source and the field.
    pub fn validate(&self) -> Result<(), String> {
        let field = |f: &str, why: &str| Err(format!("source {:?}: {f} {why}", self.name));
        if self.name.is_empty() {
            return Err("source name must not be empty".into());
        }
        match self.kind {
            SourceKind::Websocket if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) => {
                return field("url", "must start with ws:// or wss://");
            }
            SourceKind::File if self.path.is_none() => return field("path", "is needed by a file source"),
            SourceKind::File if !self.url.is_empty() => return field("url", "is for WebSocket sources, not files"),
            _ => {}
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return field("rate", "must be 0 (as fast as possible) or a positive number of frames per second");
        }
        if self.idle_timeout_ms == 0 {
            return field("idle_timeout_ms", "must be positive");
        }
        if self.write_timeout_ms == 0 {
            return field("write_timeout_ms", "must be positive");
        }
        if self.connect_timeout_ms == 0 {
            return field("connect_timeout_ms", "must be positive: every connection attempt would time out at once");
        }
        if self.pong_timeout_ms == 0 {
            return field(
                "pong_timeout_ms",
                "must be positive: every connection would be declared dead at its first ping",
            );
        }
        if self.max_connection_age_ms < 1000 {
            return field("max_connection_age_ms", "must be at least 1000");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return field("reconnect_min_ms", "must be positive and at most reconnect_max_ms");
        }
        if self.read_buffer_bytes < 1024 {
            return field("read_buffer_bytes", "must be at least 1024");
        }
        if self.max_frame_bytes < 1024 {
            return field("max_frame_bytes", "must be at least 1024");
        }
        Ok(())
    }

    /// `decode_config` as the plugin runtime takes it.
    pub fn decode_pairs(&self) -> Vec<(String, String)> {
        self.decode_config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// `ping_interval_ms` as a duration, `None` when pings are off.
    pub fn ping_interval(&self) -> Option<Duration> {
        (self.ping_interval_ms > 0).then(|| Duration::from_millis(self.ping_interval_ms))
    }
}

/// One link of a transform chain: a plugin and the configuration its `init` gets. Written as a
/// table, `{ plugin = "min-volume", config = { min_volume = "0.5" } }`, or as the plugin's name alone
/// when it needs no configuration: `"outlier-filter"`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Link {
    /// The plugin (configured under `[plugins]`, or bundled).
    pub plugin: String,
    /// Key/value configuration handed to the plugin's `init`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl Link {
    /// A link to `plugin` with no configuration.
    pub fn new(plugin: &str) -> Self {
        Link { plugin: plugin.into(), config: BTreeMap::new() }
    }

    /// The configuration as the plugin runtime takes it.
    pub fn config_pairs(&self) -> Vec<(String, String)> {
        self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<'de> Deserialize<'de> for Link {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            plugin: String,
            #[serde(default)]
            config: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a plugin name, or a table { plugin = \"...\", config = { ... } }")]
        enum Spelled {
            Name(String),
            Table(Table),
        }
        Ok(match Spelled::deserialize(deserializer)? {
            Spelled::Name(plugin) => Link { plugin, config: BTreeMap::new() },
            Spelled::Table(Table { plugin, config }) => Link { plugin, config },
        })
    }
}

mod defaults {
    pub fn ping_interval_ms() -> u64 {
        15_000
    }
    pub fn pong_timeout_ms() -> u64 {
        10_000
    }
    pub fn idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn max_connection_age_ms() -> u64 {
        23 * 3600 * 1000
    }
    pub fn max_frame_bytes() -> usize {
        1 << 20
    }
    pub fn read_buffer_bytes() -> usize {
        16 * 1024
    }
    pub fn reconnect_min_ms() -> u64 {
        250
    }
    pub fn reconnect_max_ms() -> u64 {
        30_000
    }
    pub fn healthy_after_ms() -> u64 {
        60_000
    }
    pub fn shutdown_notices() -> Vec<String> {
        vec!["serverShutdown".into(), "\"maintenance\"".into(), "server shutting down".into()]
    }
    pub fn connect_timeout_ms() -> u64 {
        10_000
    }
    pub fn write_timeout_ms() -> u64 {
        5_000
    }
}
