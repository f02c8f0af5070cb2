//! The feed simulator: WebSocket endpoints on loopback that speak the recorded venue formats the
//! bundled decoders read, for the demo, the integration tests and load benchmarks.
//!
//! # What it serves
//! One listener, one path per venue; anything else is refused with HTTP 404 during the handshake.
//! - `/binance`: Binance Spot combined-stream `aggTrade` frames,
//!   `{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","a":..,"p":"..",..}}`. Subscribe with
//!   `{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}` (answered `{"result":null,"id":1}`),
//!   or connect to `/binance?streams=btcusdt@aggTrade/ethusdt@aggTrade`.
//! - `/coinbase`: Coinbase Exchange `match` messages. Subscribe with
//!   `{"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches"]}` (answered with a
//!   `{"type":"subscriptions",..}` listing the connection's products, then a `last_match` per
//!   product, see [Snapshots](#snapshots)).
//! - `/kraken`: Kraken v1 `[channelID,[[price,volume,time,side,orderType,""],..],"trade","XBT/USD"]`,
//!   one to three trades a frame. Subscribe with
//!   `{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"trade"}}` (answered by one
//!   `subscriptionStatus` per pair, carrying its `channelID`).
//!
//! - `/okx`: OKX v5 `{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"tradeId":"..",..}]}`,
//!   one to three trades a push. Subscribe with
//!   `{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]}` (answered by one
//!   `{"event":"subscribe","arg":{..},"connId":".."}` per argument).
//! - `/bybit`: Bybit v5 `{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":..,"data":[..]}`, one
//!   to three trades a push, spot-style digit trade ids. Subscribe with
//!   `{"op":"subscribe","args":["publicTrade.BTCUSDT"]}` (answered
//!   `{"success":true,"ret_msg":"",..,"op":"subscribe"}`).
//! - `/bitstamp`: Bitstamp v2 `{"event":"trade","channel":"live_trades_btcusd","data":{..}}`, one trade
//!   a frame. Subscribe with `{"event":"bts:subscribe","data":{"channel":"live_trades_btcusd"}}`
//!   (answered `bts:subscription_succeeded`); the symbol is the lower-case pair, `btcusd`.
//! - `/kraken-v2`: Kraken v2 `{"channel":"trade","type":"update","data":[..]}` with JSON-number
//!   prices and sizes, one to three trades a frame. Subscribe with
//!   `{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"]}}` (answered by one
//!   `{"method":"subscribe","result":{..},"success":true,..}` per symbol, then a `snapshot` per
//!   symbol unless the params say `"snapshot":false`).
//! - `/coinbase-advanced`: Coinbase Advanced Trade `market_trades` envelopes, one event of one to
//!   three trades a frame, `side` the maker's. Subscribe with
//!   `{"type":"subscribe","product_ids":["BTC-USD"],"channel":"market_trades"}` (answered with a
//!   `subscriptions` message, then a `snapshot` event per product; live events are `update`s);
//!   `"channel":"heartbeats"` subscribes to heartbeats.
//!
//! Kraken connections also get `systemStatus` on connect and `{"event":"heartbeat"}` every
//! [`FeedSimConfig::kraken_heartbeat_ms`], and `{"event":"ping"}` is answered with `pong`. The same
//! period drives Kraken v2's `{"channel":"heartbeat"}` (after a `status` message on connect) and
//! Coinbase Advanced `heartbeats` (once subscribed). Each venue's application keep-alive is answered
//! in its own words: OKX's text `ping` with `pong`, Bybit's `{"op":"ping"}` with
//! `{"success":true,"ret_msg":"pong",..,"op":"ping"}`, Kraken v2's `{"method":"ping"}` with
//! `{"method":"pong",..}` and Bitstamp's `{"event":"bts:heartbeat"}` with a `bts:heartbeat` answer.
//! A request the simulator does not understand gets the venue's error frame and the connection
//! carries on.
//!
//! # Trades
//! Each (venue, symbol) has one generator, started by its first subscription and running until the
//! simulator stops, at [`FeedSimConfig::trades_per_second`]. Every connection subscribed to a symbol
//! receives the same frames, as from a real venue, so overlapping connections see identical trade ids.
//! Ids are consecutive per symbol (Binance `a`, Coinbase `trade_id`); prices follow a random walk on
//! the symbol's tick grid (2 to 8 decimals, never below one tick); timestamps come from the real clock.
//! Everything but the timestamps follows from [`FeedSimConfig::seed`]. Trades made while nobody is
//! subscribed are lost, as on a venue, which is what a client sees as a gap after a reconnect (less
//! what a snapshot brings back, below). A connection that falls more than a few thousand frames
//! behind is dropped as a slow consumer.
//!
//! Kraken v1 carries no trade id: the simulator numbers Kraken trades 1, 2, ... internally so that
//! skips and the records below work the same way, but clients cannot see those numbers.
//!
//! # Snapshots
//! Three venues send recent trades on subscribing, as the real ones do, so a restarted client sees
//! trades again. Each feed keeps its last 50 published trades (skipped ids are never among them);
//! a subscription takes them and starts receiving live frames in one step, so the snapshot ends
//! exactly where its live trades begin. The snapshot's trades are the very trades earlier
//! subscribers got, ids, prices, sizes and times alike: a client coming back sees again the ones it
//! already has (to drop by trade id) and those made while it was away (up to 50).
//! - Kraken v2: `{"channel":"trade","type":"snapshot","data":[..]}`, oldest first, the same fields
//!   as an `update`; `"data":[]` before the symbol's first trade. The subscribe answer's
//!   `result.snapshot` says whether one was asked for.
//! - Coinbase Advanced: a `market_trades` envelope whose one event is
//!   `{"type":"snapshot","trades":[..]}`, newest first; `"trades":[]` before the first trade.
//! - Coinbase Exchange: one `{"type":"last_match",..}` per product, the newest trade with the fields
//!   and `trade_id` of its `match`; none before the first trade.
//!
//! A snapshot goes only to the connection that subscribes, once per symbol; its trades count as sent
//! in [`FeedSimHandle::sent_ids`] once written.
//!
//! # Records and faults
//! [`FeedSimHandle`] reports, per (venue, symbol), which trade ids reached at least one socket
//! ([`FeedSimHandle::sent_ids`]) and which were skipped on purpose ([`FeedSimHandle::skipped_ids`]),
//! counts connections and frames, and injects faults: dropping every connection without a close frame,
//! ignoring pings, flooding pings while reading nothing, a venue shutdown notice followed by a close,
//! a gap in the trade ids, a malformed and an oversized frame.
//!
//! ```no_run
//! # async fn demo() -> Result<(), feedsim::FeedSimError> {
//! use feedsim::{FeedSim, FeedSimConfig, Venue};
//!
//! let sim = FeedSim::start(FeedSimConfig { trades_per_second: 200.0, ..FeedSimConfig::default() }).await?;
//! let url = sim.url(Venue::Binance); // ws://127.0.0.1:PORT/binance
//! // ... connect a client to `url`, subscribe, read trades ...
//! sim.handle().skip_trades(Venue::Binance, "BTCUSDT", 5);
//! let sent = sim.handle().sent_ids(Venue::Binance, "BTCUSDT");
//! sim.shutdown().await;
//! # let _ = (url, sent); Ok(()) }
//! ```
//!
//! # Layout
//! - `venue`: the wire formats, as pure functions.
//! - `feed`: the generators and the sent/skipped records.
//! - `conn`: one connection's task, and the filter that can swallow pings.

mod conn;
mod feed;
mod ticker;
mod venue;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, warn};

pub use feed::{IdSet, SentTrade};

/// A simulated venue, one path each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Venue {
    /// `/binance`: Binance Spot combined-stream `aggTrade`.
    Binance,
    /// `/coinbase`: Coinbase Exchange `matches`.
    Coinbase,
    /// `/kraken`: Kraken WebSocket v1 `trade`.
    Kraken,
    /// `/okx`: OKX v5 public `trades`.
    Okx,
    /// `/bybit`: Bybit v5 `publicTrade.{symbol}`.
    Bybit,
    /// `/bitstamp`: Bitstamp v2 `live_trades_{pair}`.
    Bitstamp,
    /// `/kraken-v2`: Kraken WebSocket v2 `trade`.
    KrakenV2,
    /// `/coinbase-advanced`: Coinbase Advanced Trade `market_trades`.
    CoinbaseAdvanced,
}

impl Venue {
    /// Every venue, in path order.
    pub const ALL: [Venue; 8] = [
        Venue::Binance,
        Venue::Coinbase,
        Venue::Kraken,
        Venue::Okx,
        Venue::Bybit,
        Venue::Bitstamp,
        Venue::KrakenV2,
        Venue::CoinbaseAdvanced,
    ];

    /// The lowercase name, which is also the path without its slash and the name of the bundled
    /// plugin that decodes the venue's frames.
    pub fn name(self) -> &'static str {
        match self {
            Venue::Binance => "binance",
            Venue::Coinbase => "coinbase",
            Venue::Kraken => "kraken",
            Venue::Okx => "okx",
            Venue::Bybit => "bybit",
            Venue::Bitstamp => "bitstamp",
            Venue::KrakenV2 => "kraken-v2",
            Venue::CoinbaseAdvanced => "coinbase-advanced",
        }
    }

    /// The venue called `name` (`binance`, `kraken-v2`, ...), if any.
    pub fn from_name(name: &str) -> Option<Venue> {
        Venue::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The venue served at `path` (`/binance`, ...), if any.
    pub fn from_path(path: &str) -> Option<Venue> {
        path.strip_prefix('/').and_then(Venue::from_name)
    }
}

impl fmt::Display for Venue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A seed of its own for each run of `sluice demo` and `sluice feedsim`: a restarted simulator
/// numbers its trades from another random start, as a different venue session would, so a sluice
/// that remembers the ids it delivered (its data directory) takes the new ones as a new sequence,
/// never as repeats of the last run's. Tests keep the fixed default seed.
pub fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // Each RandomState is seeded from the operating system's randomness.
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// How the simulator runs. The defaults serve on a free loopback port at 10 trades per second.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeedSimConfig {
    /// Where to listen; port 0 picks a free port (see [`FeedSim::addr`]).
    pub bind: SocketAddr,
    /// Trades per second for each subscribed (venue, symbol); 0 makes no trades.
    pub trades_per_second: f64,
    /// Seeds every generator: the same seed gives the same prices, sizes and ids.
    pub seed: u64,
    /// How often Kraken connections get `{"event":"heartbeat"}` (Kraken v2 `{"channel":"heartbeat"}`,
    /// Coinbase Advanced `heartbeats` once subscribed); 0 sends none.
    pub kraken_heartbeat_ms: u64,
    /// The size of the frame [`FeedSimHandle::send_oversized_frame`] sends.
    pub oversized_frame_bytes: usize,
    /// How long after a shutdown notice a connection is closed.
    pub shutdown_notice_close_ms: u64,
    /// Keep every generated trade for [`FeedSimHandle::sent_trades`] (memory grows with the trades).
    pub record_trades: bool,
}

impl Default for FeedSimConfig {
    fn default() -> Self {
        FeedSimConfig {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            trades_per_second: 10.0,
            seed: 0x5eed,
            kraken_heartbeat_ms: 1_000,
            oversized_frame_bytes: 2 << 20,
            shutdown_notice_close_ms: 100,
            record_trades: false,
        }
    }
}

/// Why the simulator could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum FeedSimError {
    /// A config value is out of range.
    #[error("invalid feedsim config: {0}")]
    Config(String),
    /// The listening socket could not be opened.
    #[error("feedsim cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Waiting for Ctrl-C failed (no signal handler could be installed).
    #[error("feedsim cannot wait for Ctrl-C: {0}")]
    Signal(#[source] io::Error),
}

/// Counters since the simulator started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedSimStats {
    /// WebSocket handshakes completed (refused paths are not counted).
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Text frames written to sockets: trades, answers, heartbeats and injected frames.
    pub frames_sent: u64,
}

/// A running simulator. Dropping it stops every task too; [`FeedSim::shutdown`] also waits for them.
#[derive(Debug)]
pub struct FeedSim {
    addr: SocketAddr,
    handle: FeedSimHandle,
    /// Set to true to stop the accept loop, the connections and the generators.
    shutdown: watch::Sender<bool>,
    /// Every task holds a clone; once all are dropped, `finished` yields `None`.
    running: mpsc::Sender<()>,
    finished: mpsc::Receiver<()>,
}

impl FeedSim {
    /// Binds the listener and starts accepting connections on the current tokio runtime.
    ///
    /// # Errors
    /// [`FeedSimError::Config`] for a negative or non-finite rate, [`FeedSimError::Bind`] when the
    /// address cannot be bound.
    pub async fn start(config: FeedSimConfig) -> Result<FeedSim, FeedSimError> {
        if !(config.trades_per_second.is_finite() && config.trades_per_second >= 0.0) {
            return Err(FeedSimError::Config(format!(
                "trades_per_second must be a finite number >= 0, not {}",
                config.trades_per_second
            )));
        }
        let bind = |source| FeedSimError::Bind { addr: config.bind, source };
        let listener = TcpListener::bind(config.bind).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (running, finished) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            config,
            ignore_pings: Arc::new(AtomicBool::new(false)),
            flood_pings: AtomicBool::new(false),
            controls: broadcast::channel(16).0,
            drops: watch::channel(0).0,
            shutdown: shutdown_rx,
            feeds: Mutex::new(HashMap::new()),
            next_channel_id: AtomicU64::new(100),
            next_connection_id: AtomicU64::new(1),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
        });
        tokio::spawn(accept(listener, shared.clone(), running.clone()));
        Ok(FeedSim { addr, handle: FeedSimHandle { shared }, shutdown, running, finished })
    }

    /// The address it listens on (with the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WebSocket URL of `venue`, e.g. `ws://127.0.0.1:9400/binance`.
    pub fn url(&self, venue: Venue) -> String {
        format!("ws://{}/{}", self.addr, venue.name())
    }

    /// A handle for records, counters and fault injection; it stays usable after shutdown.
    pub fn handle(&self) -> FeedSimHandle {
        self.handle.clone()
    }

    /// Stops accepting, drops every connection (without a close frame), stops the generators and
    /// waits until all of those tasks have ended. Returns the final counters.
    pub async fn shutdown(self) -> FeedSimStats {
        let FeedSim { handle, shutdown, running, mut finished, .. } = self;
        let _ = shutdown.send(true);
        drop(running);
        // `None` once every task has dropped its `running` clone.
        let _ = finished.recv().await;
        handle.stats()
    }
}

/// Runs a simulator until Ctrl-C, logging its URLs and, every 10 s, its counters: what
/// `sluice feedsim` runs.
///
/// # Errors
/// As [`FeedSim::start`], or [`FeedSimError::Signal`] when Ctrl-C cannot be awaited.
pub async fn run_until_ctrl_c(config: FeedSimConfig) -> Result<FeedSimStats, FeedSimError> {
    let sim = FeedSim::start(config).await?;
    for venue in Venue::ALL {
        info!(%venue, url = %sim.url(venue), "feedsim serving");
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    let signal = loop {
        tokio::select! {
            signal = &mut ctrl_c => break signal,
            _ = report.tick() => {
                let s = sim.handle().stats();
                info!(connections_open = s.connections_open, frames_sent = s.frames_sent, "feedsim running");
            }
        }
    };
    let stats = sim.shutdown().await;
    signal.map_err(FeedSimError::Signal)?;
    info!(connections = stats.connections_accepted, frames_sent = stats.frames_sent, "feedsim stopped");
    Ok(stats)
}

/// Records, counters and fault injection for a running [`FeedSim`]; cheap to clone.
///
/// Symbols are spelled as the venue spells them in frames: `BTCUSDT`, `BTC-USD`, `XBT/USD`,
/// `BTC-USDT` (OKX), `btcusd` (Bitstamp), `BTC/USD` (Kraken v2). The
/// fault injections act on the connections open at the time of the call and return how many that
/// is.
#[derive(Clone, Debug)]
pub struct FeedSimHandle {
    shared: Arc<Shared>,
}

impl FeedSimHandle {
    /// The counters now.
    pub fn stats(&self) -> FeedSimStats {
        let s = &self.shared;
        FeedSimStats {
            connections_accepted: s.connections_accepted.load(Ordering::Relaxed),
            connections_open: s.connections_open.load(Ordering::Relaxed),
            frames_sent: s.frames_sent.load(Ordering::Relaxed),
        }
    }

    /// Drops every open connection abruptly: the TCP connection closes with no close frame.
    pub fn drop_connections(&self) -> usize {
        self.shared.drops.send_modify(|generation| *generation += 1);
        self.shared.drops.receiver_count()
    }

    /// While `ignore` is true, incoming WebSocket pings (and the venues' application pings: Kraken's
    /// `{"event":"ping"}`, OKX's `ping`, ...) get no answer; trades keep flowing. `false` resumes
    /// answering.
    pub fn set_ignore_pings(&self, ignore: bool) {
        self.shared.ignore_pings.store(ignore, Ordering::Relaxed);
    }

    /// While `flood` is true, every connection (open now or accepted later) sends WebSocket pings
    /// back to back and reads nothing, not even the pongs: a server that stopped reading, whose
    /// client's writes block once the socket buffers are full. `false` lets the connections still
    /// open serve again. Answers how many connections were open.
    pub fn set_flood_pings(&self, flood: bool) -> usize {
        self.shared.flood_pings.store(flood, Ordering::Relaxed);
        // Wakes the connections waiting for something to do.
        self.control(Control::FloodPings)
    }

    /// Sends the venue's shutdown notice on every connection, then closes each (with a close frame)
    /// [`FeedSimConfig::shutdown_notice_close_ms`] later. New connections are still accepted.
    pub fn send_shutdown_notice(&self) -> usize {
        self.control(Control::ShutdownNotice)
    }

    /// Sends one frame of invalid JSON (a trade frame cut short) on every connection.
    pub fn send_malformed_frame(&self) -> usize {
        self.control(Control::Malformed)
    }

    /// Sends one valid JSON frame of [`FeedSimConfig::oversized_frame_bytes`] bytes on every
    /// connection.
    pub fn send_oversized_frame(&self) -> usize {
        self.control(Control::Oversized)
    }

    /// Makes a gap: the next `n` trade ids of the symbol are consumed but never sent, and recorded as
    /// skipped. Works before the symbol's first subscription too.
    pub fn skip_trades(&self, venue: Venue, symbol: &str, n: u64) {
        self.shared.feed(venue, symbol).skip(n);
    }

    /// The trade ids of the symbol written to at least one socket so far, in live frames or snapshots.
    pub fn sent_ids(&self, venue: Venue, symbol: &str) -> IdSet {
        self.existing_feed(venue, symbol).map(|f| f.sent()).unwrap_or_default()
    }

    /// The trades of the symbol written to at least one socket so far, in id order; empty unless
    /// [`FeedSimConfig::record_trades`] is set.
    pub fn sent_trades(&self, venue: Venue, symbol: &str) -> Vec<SentTrade> {
        self.existing_feed(venue, symbol).map(|f| f.sent_trades()).unwrap_or_default()
    }

    /// The trade ids of the symbol skipped by [`FeedSimHandle::skip_trades`] so far.
    pub fn skipped_ids(&self, venue: Venue, symbol: &str) -> IdSet {
        self.existing_feed(venue, symbol).map(|f| f.skipped()).unwrap_or_default()
    }

    fn existing_feed(&self, venue: Venue, symbol: &str) -> Option<Arc<feed::Feed>> {
        self.shared.feeds().get(&(venue, symbol.to_owned())).cloned()
    }

    fn control(&self, control: Control) -> usize {
        self.shared.controls.send(control).unwrap_or(0)
    }
}

/// A fault injection that every connection carries out with frames of its venue.
#[derive(Clone, Copy, Debug)]
enum Control {
    ShutdownNotice,
    Malformed,
    Oversized,
    /// [`FeedSimHandle::set_flood_pings`] changed.
    FloodPings,
}

/// State shared by the accept loop, the connections, the generators and the handles.
#[derive(Debug)]
struct Shared {
    config: FeedSimConfig,
    /// Read by every connection's [`conn::PingFilter`].
    ignore_pings: Arc<AtomicBool>,
    /// Every connection floods pings and reads nothing while set.
    flood_pings: AtomicBool,
    /// Frame-sending fault injections, to every connection.
    controls: broadcast::Sender<Control>,
    /// Bumped to drop every connection; the receiver count is the number of open connections.
    drops: watch::Sender<u64>,
    /// True once the simulator stops (the sender is in [`FeedSim`]; dropping it stops tasks too).
    shutdown: watch::Receiver<bool>,
    feeds: Mutex<HashMap<(Venue, String), Arc<feed::Feed>>>,
    /// Kraken channel ids, one per pair.
    next_channel_id: AtomicU64,
    /// Kraken's `connectionID`s, and the connection ids of the venues that name theirs.
    next_connection_id: AtomicU64,
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    frames_sent: AtomicU64,
}

impl Shared {
    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<(Venue, String), Arc<feed::Feed>>> {
        // A poisoned lock only means a panic elsewhere mid-insert; the map is still usable.
        self.feeds.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The feed of (venue, symbol), created (not started) if new.
    fn feed(&self, venue: Venue, symbol: &str) -> Arc<feed::Feed> {
        self.feeds()
            .entry((venue, symbol.to_owned()))
            .or_insert_with(|| {
                let channel_id = self.next_channel_id.fetch_add(1, Ordering::Relaxed);
                Arc::new(feed::Feed::new(venue, symbol.to_owned(), channel_id, self.config.record_trades))
            })
            .clone()
    }

    /// Spawns the feed's generator unless it is already running.
    fn start_generator(&self, feed: &Arc<feed::Feed>, running: &mpsc::Sender<()>) {
        if feed.claim_start() {
            let generator = feed::Generator::new(self.config.seed, feed.venue, &feed.symbol);
            let rate = self.config.trades_per_second;
            tokio::spawn(ticker::run(feed.clone(), generator, rate, self.shutdown.clone(), running.clone()));
        }
    }

    fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Resolves once `shutdown` is true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, running: mpsc::Sender<()>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    tokio::spawn(conn::serve(shared.clone(), tcp, running.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "feedsim accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests;
