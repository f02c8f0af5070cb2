//! Configuration: one TOML file, every field with a default that works, unit suffixes in names.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One WebSocket feed: where it is, what to send on connect, and how to keep it alive.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A unique name, used in logs, metrics and the API.
    pub name: String,
    /// `ws://` or `wss://` URL of the feed.
    pub url: String,
    /// Text messages sent after every (re)connect, e.g. the venue's subscribe request.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// The plugin that decodes this feed's frames.
    pub plugin: String,
    /// Key/value configuration handed to the plugin's `init`.
    #[serde(default)]
    pub plugin_config: BTreeMap<String, String>,
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
    /// Largest frame accepted; larger ones close the connection and are counted.
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
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
}

impl SourceConfig {
    /// A source with default settings.
    pub fn new(name: &str, url: &str, plugin: &str) -> Self {
        SourceConfig {
            name: name.into(),
            url: url.into(),
            subscribe: vec![],
            plugin: plugin.into(),
            plugin_config: BTreeMap::new(),
            ping_interval_ms: defaults::ping_interval_ms(),
            pong_timeout_ms: defaults::pong_timeout_ms(),
            keepalive_text: None,
            idle_timeout_ms: defaults::idle_timeout_ms(),
            max_connection_age_ms: defaults::max_connection_age_ms(),
            max_frame_bytes: defaults::max_frame_bytes(),
            reconnect_min_ms: defaults::reconnect_min_ms(),
            reconnect_max_ms: defaults::reconnect_max_ms(),
            healthy_after_ms: defaults::healthy_after_ms(),
            shutdown_notices: defaults::shutdown_notices(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
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
        if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) {
            return field("url", "must start with ws:// or wss://");
        }
        if self.idle_timeout_ms == 0 {
            return field("idle_timeout_ms", "must be positive");
        }
        if self.max_connection_age_ms < 1000 {
            return field("max_connection_age_ms", "must be at least 1000");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return field("reconnect_min_ms", "must be positive and at most reconnect_max_ms");
        }
        if self.max_frame_bytes < 1024 {
            return field("max_frame_bytes", "must be at least 1024");
        }
        Ok(())
    }

    /// `ping_interval_ms` as a duration, `None` when pings are off.
    pub fn ping_interval(&self) -> Option<Duration> {
        (self.ping_interval_ms > 0).then(|| Duration::from_millis(self.ping_interval_ms))
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
}

#[cfg(test)]
mod tests {
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
    fn unknown_fields_and_bad_values_name_the_field() {
        let err = toml::from_str::<File>("[[source]]\nname='a'\nurl='ws://x'\nplugin='p'\nping_ms=5\n").unwrap_err();
        assert!(err.to_string().contains("ping_ms"), "{err}");
        let mut s = SourceConfig::new("a", "http://x", "p");
        assert_eq!(s.validate().unwrap_err(), "source \"a\": url must start with ws:// or wss://");
        s.url = "ws://x".into();
        s.reconnect_max_ms = 1;
        assert!(s.validate().unwrap_err().contains("reconnect_min_ms"));
    }
}
