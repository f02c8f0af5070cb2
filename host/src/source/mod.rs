//! WebSocket sources: one task per feed that keeps a connection alive through what venues do to
//! clients, and hands every frame, stamped with its receive time, to the decode stage.
//!
//! A source connects (at most so often per host), sends its subscribe messages, and then reads. It
//! answers pings, sends its own and treats a missing pong as a dead connection, reconnects when
//! nothing arrives for too long or a write waits too long (a venue that stops reading), reconnects at once on a venue's shutdown notice, and otherwise backs
//! off exponentially with full jitter, never giving up. Before a connection gets too old it opens the
//! next one first and closes the old one only when the new one delivers, so rotation loses nothing;
//! the overlap's duplicates are dropped downstream by trade id.
//!
//! The read loop never waits for the rest of the pipeline: frames go into a bounded queue with
//! `try_send`, and what a full queue refuses is counted per source. Nor does it wait for the venue:
//! pongs are queued for the socket (one at a time, sent as it takes them) and never awaited, and each
//! of our own writes is bounded by `write_timeout_ms`, so a venue that floods pings and never reads
//! cannot stop the timers or a shutdown.

pub mod backoff;
pub mod config;
pub mod file;
pub mod queue;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::source::config::SourceConfig;
use backoff::Backoff;
use queue::{FrameSender, Refused};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One frame as read from a venue.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The source's id.
    pub source: u32,
    /// When it was read, microseconds since the Unix epoch.
    pub received_at_us: i64,
    /// The frame's payload (text frames as their UTF-8 bytes), cut to `max_frame_bytes` (a copy of
    /// its start, so the frame read is not kept whole).
    pub bytes: Bytes,
    /// The original length when the frame was larger than `max_frame_bytes` and was cut; such a
    /// frame is dead-lettered, not decoded.
    pub oversized: Option<usize>,
    /// Read while a connection replacement reads two connections at once: the same trade may come
    /// on both, which the decode stage drops by trade id, or by content for venues without ids.
    pub overlap: bool,
    /// For a file source, the byte offset just past this frame's line: where a restart goes on once
    /// the frame is delivered. 0 for live feeds.
    pub file_offset: u64,
}

#[cfg(test)]
impl Frame {
    /// A frame of `len` bytes of source 1, for the queue's and the workers' unit tests.
    pub(crate) fn filler(len: usize) -> Frame {
        Frame {
            source: 1,
            received_at_us: 0,
            bytes: bytes::Bytes::from(vec![b'x'; len]),
            oversized: None,
            overlap: false,
            file_offset: 0,
        }
    }
}

/// Which source a message came from, and whether its connection overlaps with another.
#[derive(Clone, Copy, Debug)]
struct Origin {
    id: u32,
    overlap: bool,
}

/// Connection state of a source, as a gauge value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting (or waiting for the per-host connect limit).
    Connecting = 0,
    /// Subscribed and reading.
    Up = 1,
    /// Waiting before the next attempt.
    Backoff = 2,
    /// Stopped for good (shutdown).
    Stopped = 3,
    /// A file source that has read its whole recording: done, not down.
    Finished = 4,
}

/// Live counters of one source, updated by its task and read by metrics and the API.
#[derive(Debug, Default)]
pub struct SourceStats {
    state: AtomicU8,
    /// Connections lost and re-established (rotations not included).
    pub reconnects: AtomicU64,
    /// Rotations to a fresh connection.
    pub rotations: AtomicU64,
    /// Frames read.
    pub frames: AtomicU64,
    /// Payload bytes read.
    pub bytes: AtomicU64,
    /// Frames the full queue refused.
    pub dropped: AtomicU64,
    /// Frames larger than `max_frame_bytes` (dead-lettered, cut to that size), and connections closed
    /// for a frame beyond the hard limit.
    pub oversized: AtomicU64,
    /// Connections declared dead for a missing pong.
    pub pong_timeouts: AtomicU64,
    /// Connections dropped for being idle.
    pub idle_timeouts: AtomicU64,
    /// Connections given up because the venue stopped taking our writes: one waited longer than
    /// `write_timeout_ms`, or found the unsent buffer full.
    pub write_timeouts: AtomicU64,
    /// Shutdown notices from the venue.
    pub shutdown_notices: AtomicU64,
    /// When the last message arrived, microseconds since the Unix epoch (0: never).
    pub last_message_us: AtomicI64,
}

impl SourceStats {
    /// The current connection state.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Connecting,
            1 => State::Up,
            2 => State::Backoff,
            4 => State::Finished,
            _ => State::Stopped,
        }
    }

    pub(crate) fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

/// Spaces out connection attempts to the same host, so thousands of sources reconnecting at once do
/// not hammer a venue (which would ban us).
#[derive(Debug)]
pub struct ConnectLimiter {
    interval: Duration,
    next: Mutex<HashMap<String, Instant>>,
}

impl ConnectLimiter {
    /// At most one attempt per host every `interval`.
    pub fn new(interval: Duration) -> Self {
        ConnectLimiter { interval, next: Mutex::new(HashMap::new()) }
    }

    /// Waits until an attempt to `host` is allowed, and books it.
    pub async fn acquire(&self, host: &str) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = next.entry(host.to_owned()).or_insert(now);
            let at = (*slot).max(now);
            *slot = at + self.interval;
            at
        };
        sleep_until(at).await;
    }
}

/// Why a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The venue closed it or the stream failed: back off, then reconnect.
    Lost(String),
    /// We give up on it while it may still deliver (shutdown notice, missing pong, idle, age):
    /// open the next connection first and keep reading this one until the next one delivers.
    Replace(Replace),
    /// The pipeline is stopping, or the frame queue is gone.
    Stop,
}

/// Why a connection is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replace {
    /// The venue announced a shutdown.
    ShutdownNotice,
    /// Our ping went unanswered.
    PongTimeout,
    /// Nothing arrived for too long.
    Idle,
    /// It reached its maximum age.
    Age,
}

/// Runs one source until `shutdown` turns true. Never returns early on network trouble.
pub async fn run(
    config: Arc<SourceConfig>,
    id: u32,
    out: FrameSender,
    stats: Arc<SourceStats>,
    limiter: Arc<ConnectLimiter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let host = host_of(&config.url);
    let mut backoff = Backoff::new(
        Duration::from_millis(config.reconnect_min_ms),
        Duration::from_millis(config.reconnect_max_ms),
        u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d,
    );
    let mut current: Option<Ws> = None;
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let mut ws = match current.take() {
            Some(ws) => ws,
            None => {
                stats.set_state(State::Connecting);
                if !first {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                match connect(&config, &host, &limiter, &stats, &mut shutdown).await {
                    Ok(Some(ws)) => ws,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(source = %config.name, error = %e, "connect failed");
                        if !wait_backoff(&stats, &mut backoff, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        stats.set_state(State::Up);
        let up_since = Instant::now();
        let end = read_loop(&config, id, &mut ws, &out, &stats, &mut shutdown, up_since).await;
        if up_since.elapsed() >= Duration::from_millis(config.healthy_after_ms) {
            backoff.reset();
        }
        match end {
            End::Stop => {
                close(&mut ws).await;
                break;
            }
            End::Replace(why) => {
                let counter = replacement_counter(&stats, why);
                tracing::info!(source = %config.name, reason = ?why, "replacing the connection");
                match replace(&config, id, &host, ws, &out, &stats, &limiter, &mut shutdown).await {
                    Some(next) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        current = Some(next);
                    }
                    None if *shutdown.borrow() => break,
                    // The next connection failed and the old one is closed: back off, reconnect.
                    None => {
                        if !wait_backoff(&stats, &mut backoff, &mut shutdown).await {
                            break;
                        }
                    }
                }
            }
            End::Lost(why) => {
                tracing::warn!(source = %config.name, reason = %why, "connection lost");
                if !wait_backoff(&stats, &mut backoff, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    stats.set_state(State::Stopped);
}

/// The counter a replacement for `why` adds to once the next connection is up: a rotation for age,
/// a reconnect otherwise (a shutdown notice is also counted as such at once).
fn replacement_counter(stats: &SourceStats, why: Replace) -> &std::sync::atomic::AtomicU64 {
    match why {
        Replace::Age => &stats.rotations,
        Replace::ShutdownNotice => {
            stats.shutdown_notices.fetch_add(1, Ordering::Relaxed);
            &stats.reconnects
        }
        Replace::PongTimeout | Replace::Idle => &stats.reconnects,
    }
}

/// Starts a closing handshake, waiting at most a second: a venue that never answers it (or a dead
/// connection) must not hold the source up. Dropping the stream then closes the socket.
async fn close(ws: &mut Ws) {
    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// Resolves once shutdown is requested (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps for the next backoff delay; false when shutdown came first.
async fn wait_backoff(stats: &SourceStats, backoff: &mut Backoff, shutdown: &mut watch::Receiver<bool>) -> bool {
    stats.set_state(State::Backoff);
    let delay = backoff.next_delay();
    tokio::select! {
        _ = sleep(delay) => true,
        _ = stopped(shutdown) => false,
    }
}

/// Connects (within the per-host limit and the connect timeout) and subscribes. `Ok(None)`: shutdown.
async fn connect(
    config: &SourceConfig,
    host: &str,
    limiter: &ConnectLimiter,
    stats: &SourceStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Ws>, String> {
    let attempt = async {
        limiter.acquire(host).await;
        // The hard limit protects memory; frames between `max_frame_bytes` and it are read, counted
        // and dead-lettered without losing the connection (and the frames behind them).
        let hard = hard_frame_limit(config.max_frame_bytes);
        let ws_config = WebSocketConfig::default()
            .max_frame_size(Some(hard))
            .max_message_size(Some(hard))
            .read_buffer_size(config.read_buffer_bytes)
            // We write little (subscriptions, pings): straight to the socket, no buffer to keep,
            // and what a venue that does not read leaves unsent (pongs above all) cannot pile up.
            .write_buffer_size(0)
            .max_write_buffer_size(max_write_buffer(config));
        let connect = tokio_tungstenite::connect_async_with_config(config.url.as_str(), Some(ws_config), true);
        let (mut ws, _) = timeout(Duration::from_millis(config.connect_timeout_ms), connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        for message in &config.subscribe {
            let subscribe = Message::text(message.as_str());
            write(config, stats, &mut ws, subscribe).await.map_err(|e| format!("subscribe: {e}"))?;
        }
        tracing::debug!(source = %config.name, "connected and subscribed");
        Ok::<_, String>(ws)
    };
    tokio::select! {
        ws = attempt => ws.map(Some),
        _ = stopped(shutdown) => Ok(None),
    }
}

use crate::clock::now_us;

/// What one message meant for the read loop.
enum Read {
    /// A control message (ping, pong): nothing forwarded.
    Continue,
    /// A data frame was forwarded.
    Data,
    /// A venue shutdown notice was forwarded: this connection will be closed soon.
    Notice,
    /// The connection is over.
    End(End),
}

/// Handles one message from the venue: adds data to `batch` (handed on by [`hand_off`]), notes
/// pongs. Pings need nothing here:
/// tungstenite queues the pong as it reads the ping and sends it at the next read, as far as the
/// socket takes it, so a venue that floods pings and never reads costs one queued pong, not a
/// read loop stuck in a write.
fn on_message(
    config: &SourceConfig,
    notices: &Notices,
    from: Origin,
    msg: Option<Result<Message, tungstenite::Error>>,
    batch: &mut Vec<Frame>,
    stats: &SourceStats,
    awaiting_pong: &mut Option<Instant>,
) -> Read {
    let msg = match msg {
        None => return Read::End(End::Lost("stream ended".into())),
        Some(Err(tungstenite::Error::Capacity(e))) => {
            stats.oversized.fetch_add(1, Ordering::Relaxed);
            return Read::End(End::Lost(format!("frame too large: {e}")));
        }
        Some(Err(e)) => return Read::End(End::Lost(e.to_string())),
        Some(Ok(msg)) => msg,
    };
    let received_at_us = now_us();
    stats.last_message_us.store(received_at_us, Ordering::Relaxed);
    if config.keepalive_text.is_some() {
        // With a text keep-alive, any message shows the venue is there.
        *awaiting_pong = None;
    }
    let bytes = match msg {
        Message::Text(text) => Bytes::from(text),
        Message::Binary(bytes) => bytes,
        Message::Ping(_) => return Read::Continue,
        Message::Pong(_) => {
            *awaiting_pong = None;
            return Read::Continue;
        }
        Message::Close(frame) => {
            return Read::End(End::Lost(format!("closed by the venue: {frame:?}")));
        }
        Message::Frame(_) => return Read::Continue,
    };
    stats.frames.fetch_add(1, Ordering::Relaxed);
    stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let (bytes, oversized) = cut(bytes, config.max_frame_bytes);
    if oversized.is_some() {
        stats.oversized.fetch_add(1, Ordering::Relaxed);
    }
    let notice = oversized.is_none() && notices.any_in(&bytes);
    batch.push(Frame { source: from.id, received_at_us, bytes, oversized, overlap: from.overlap, file_offset: 0 });
    if notice { Read::Notice } else { Read::Data }
}

/// Queues the frames of `batch` as one unit (never waiting), counting what a full queue refuses;
/// false when the worker is gone (the pipeline is stopping).
fn hand_off(out: &FrameSender, stats: &SourceStats, batch: &mut Vec<Frame>) -> bool {
    match out.try_send_all(batch) {
        Ok(0) => true,
        Ok(refused) => {
            stats.dropped.fetch_add(refused, Ordering::Relaxed);
            true
        }
        Err(Refused::Closed) => false,
        Err(Refused::Full) => true,
    }
}

/// [`on_message`] for one message, handed on at once: for the overlap of a replacement, where two
/// connections are read and frames are rare enough.
#[allow(clippy::too_many_arguments)]
fn forward(
    config: &SourceConfig,
    notices: &Notices,
    from: Origin,
    msg: Option<Result<Message, tungstenite::Error>>,
    out: &FrameSender,
    stats: &SourceStats,
    awaiting_pong: &mut Option<Instant>,
    batch: &mut Vec<Frame>,
) -> Read {
    let read = on_message(config, notices, from, msg, batch, stats, awaiting_pong);
    if hand_off(out, stats, batch) { read } else { Read::End(End::Stop) }
}

/// Most messages taken from one connection per wake-up before the timers and a stop are looked at.
const READ_BURST: usize = 256;

/// The next message if the connection has one ready now (buffered, or on the socket), without
/// waiting: `None` when it has not (the task is then woken when it has).
async fn ready(ws: &mut Ws) -> Option<Option<Result<Message, tungstenite::Error>>> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match ws.poll_next_unpin(cx) {
            std::task::Poll::Ready(msg) => Some(msg),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// A frame over `max` bytes cut to its first `max` (and its original length): a copy, since a slice
/// would keep the whole frame read (up to the hard limit) alive while it waits in the queue and in
/// the dead letters.
fn cut(bytes: Bytes, max: usize) -> (Bytes, Option<usize>) {
    if bytes.len() > max { (Bytes::copy_from_slice(&bytes[..max]), Some(bytes.len())) } else { (bytes, None) }
}

/// A source's shutdown notices as searchers built once per connection, not once per frame (a
/// searcher's set-up cost more than the search on a trade's frame): memchr's SIMD search.
struct Notices(Vec<memchr::memmem::Finder<'static>>);

impl Notices {
    fn of(config: &SourceConfig) -> Self {
        Notices(
            config
                .shutdown_notices
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| memchr::memmem::Finder::new(n.as_bytes()).into_owned())
                .collect(),
        )
    }

    /// True when `frame` holds one of the notices.
    fn any_in(&self, frame: &[u8]) -> bool {
        self.0.iter().any(|f| f.find(frame).is_some())
    }
}

/// Every message the connection has ready now, from `first`, taken in one wake-up (a busy feed
/// delivers dozens per read of the socket, up to [`READ_BURST`]) into `batch`, to be queued as one
/// unit: one pass through the read loop's timers and one hand-off per read, not per frame. The end
/// of the connection when one of them ends it.
async fn read_burst(
    ws: &mut Ws,
    first: Option<Result<Message, tungstenite::Error>>,
    (config, notices, from, stats): (&SourceConfig, &Notices, Origin, &SourceStats),
    batch: &mut Vec<Frame>,
    awaiting_pong: &mut Option<Instant>,
) -> Option<End> {
    let (mut msg, mut taken) = (first, 1);
    loop {
        match on_message(config, notices, from, msg, batch, stats, awaiting_pong) {
            Read::Continue | Read::Data => {}
            Read::Notice => return Some(End::Replace(Replace::ShutdownNotice)),
            Read::End(end) => return Some(end),
        }
        if taken == READ_BURST {
            return None;
        }
        match ready(ws).await {
            Some(next) => (msg, taken) = (next, taken + 1),
            None => return None,
        }
    }
}

/// Sends a keepalive (the source's `keepalive_text`, or a WebSocket ping); a stop does not wait for
/// the write (up to `write_timeout_ms`). The end of the connection when it cannot be sent.
async fn ping(
    config: &SourceConfig,
    stats: &SourceStats,
    ws: &mut Ws,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<End> {
    let ping = match &config.keepalive_text {
        Some(text) => Message::text(text.as_str()),
        None => Message::Ping(Bytes::from_static(b"sluice")),
    };
    tokio::select! {
        sent = write(config, stats, ws, ping) => sent.err().map(|e| End::Lost(format!("could not send a ping: {e}"))),
        _ = stopped(shutdown) => Some(End::Stop),
    }
}

/// Reads one connection until it ends.
async fn read_loop(
    config: &SourceConfig,
    id: u32,
    ws: &mut Ws,
    out: &FrameSender,
    stats: &SourceStats,
    shutdown: &mut watch::Receiver<bool>,
    up_since: Instant,
) -> End {
    let rotate_at = up_since + Duration::from_millis(config.max_connection_age_ms);
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let pong_timeout = Duration::from_millis(config.pong_timeout_ms);
    let mut pings = config.ping_interval().map(|p| tokio::time::interval_at(Instant::now() + p, p));
    let mut awaiting_pong: Option<Instant> = None;
    let mut last_message = Instant::now();
    let notices = Notices::of(config);
    // The idle and age timers are set once and moved only when they fire, not made again for every
    // message (a timer made and dropped per frame costs more than reading the frame).
    let idle_timer = sleep_until(last_message + idle);
    let age_timer = sleep_until(rotate_at);
    tokio::pin!(idle_timer, age_timer);
    let from = Origin { id, overlap: false };
    let mut batch = Vec::new();
    loop {
        let pong_deadline = awaiting_pong.map(|sent| sent + pong_timeout);
        tokio::select! {
            msg = ws.next() => {
                last_message = Instant::now();
                let end = read_burst(ws, msg, (config, &notices, from, stats), &mut batch, &mut awaiting_pong).await;
                // What was read before an end is delivered all the same.
                if !hand_off(out, stats, &mut batch) {
                    return End::Stop;
                }
                if let Some(end) = end {
                    return end;
                }
            }
            _ = async { pings.as_mut().expect("guarded by the condition").tick().await }, if pings.is_some() => {
                if awaiting_pong.is_none() {
                    awaiting_pong = Some(Instant::now());
                }
                if let Some(end) = ping(config, stats, ws, shutdown).await {
                    return end;
                }
            }
            _ = async { sleep_until(pong_deadline.expect("guarded by the condition")).await }, if pong_deadline.is_some() => {
                stats.pong_timeouts.fetch_add(1, Ordering::Relaxed);
                return End::Replace(Replace::PongTimeout);
            }
            _ = &mut idle_timer => {
                // Messages came since it was set: it moves to the last one's deadline.
                let due = last_message + idle;
                if Instant::now() < due {
                    idle_timer.as_mut().reset(due);
                    continue;
                }
                stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                return End::Replace(Replace::Idle);
            }
            _ = &mut age_timer => return End::Replace(Replace::Age),
            _ = stopped(shutdown) => return End::Stop,
        }
    }
}

/// How long both connections are read after the replacement has delivered its first frame.
const OVERLAP: Duration = Duration::from_secs(1);

/// Opens the next connection while the old one keeps delivering, and closes the old one once the
/// new one has delivered a data frame (or after a grace period), so frames the old one still
/// carries are not thrown away. `None` when the new one failed.
#[allow(clippy::too_many_arguments)]
async fn replace(
    config: &SourceConfig,
    id: u32,
    host: &str,
    mut old: Ws,
    out: &FrameSender,
    stats: &SourceStats,
    limiter: &ConnectLimiter,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Ws> {
    // Keep reading the old connection while the new one connects and subscribes.
    let mut no_pong = None;
    let notices = Notices::of(config);
    let mut batch = Vec::new();
    let mut old_open = true;
    let mut new = {
        let mut stop = shutdown.clone();
        let connecting = connect(config, host, limiter, stats, &mut stop);
        tokio::pin!(connecting);
        loop {
            tokio::select! {
                result = &mut connecting => match result {
                    Ok(Some(ws)) => break ws,
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(source = %config.name, error = %e, "the replacement connection failed");
                        close(&mut old).await;
                        return None;
                    }
                },
                msg = old.next(), if old_open => {
                    if let Read::End(_) = forward(config, &notices, Origin { id, overlap: true }, msg, out, stats, &mut no_pong, &mut batch) {
                        old_open = false;
                    }
                }
            }
        }
    };
    // Overlap: read both until the new one has delivered and then for `OVERLAP` more, so whatever
    // the old one still carries (trades from before the new subscription, in flight on its socket)
    // is read; the duplicates this causes are dropped downstream by trade id. A shutdown notice on
    // either one changes nothing here: each is read until it closes or the overlap ends.
    let grace = sleep(Duration::from_secs(5));
    tokio::pin!(grace);
    let mut switch_at: Option<Instant> = None;
    let mut new_open = true;
    while new_open && (old_open || switch_at.is_none()) {
        tokio::select! {
            msg = new.next() => match forward(config, &notices, Origin { id, overlap: true }, msg, out, stats, &mut no_pong, &mut batch) {
                Read::Data | Read::Notice => {
                    switch_at.get_or_insert_with(|| Instant::now() + OVERLAP);
                }
                Read::Continue => {}
                Read::End(end) => {
                    tracing::debug!(source = %config.name, ?end, "the replacement ended during the overlap");
                    new_open = false;
                }
            },
            msg = old.next(), if old_open => {
                if let Read::End(_) = forward(config, &notices, Origin { id, overlap: true }, msg, out, stats, &mut no_pong, &mut batch) {
                    old_open = false;
                }
            }
            _ = async { sleep_until(switch_at.expect("guarded by the condition")).await }, if switch_at.is_some() => break,
            _ = &mut grace => break,
        }
    }
    match (new_open, old_open) {
        (true, true) => {
            close(&mut old).await;
            Some(new)
        }
        (true, false) => Some(new),
        // The replacement died first: carry on with the old one while it lasts.
        (false, true) => Some(old),
        (false, false) => None,
    }
}

/// Sends one message of ours, waiting at most `write_timeout_ms` for the socket to take it: a venue
/// that stops reading fills the socket's buffers, and a write waiting on it for good would hold the
/// read loop, its timers and a shutdown. A write that times out, or finds the unsent buffer full
/// (both counted), ends the connection.
async fn write(config: &SourceConfig, stats: &SourceStats, ws: &mut Ws, message: Message) -> Result<(), String> {
    let limit = Duration::from_millis(config.write_timeout_ms);
    let stalled = match timeout(limit, ws.send(message)).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(tungstenite::Error::WriteBufferFull(_))) => "the unsent buffer is full".to_owned(),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => format!("the socket took nothing for {limit:?}"),
    };
    stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
    Err(format!("{stalled}: the venue is not reading"))
}

/// What tungstenite may hold unsent for one connection: our largest message (a subscription) and
/// room for pings and pongs. Past it a write fails at once instead of buffering without end.
fn max_write_buffer(config: &SourceConfig) -> usize {
    config.subscribe.iter().map(String::len).max().unwrap_or(0) + (64 << 10)
}

/// The largest frame read at all: 16 MiB, or four times `max_frame_bytes` if that is more.
fn hard_frame_limit(max_frame_bytes: usize) -> usize {
    (16 << 20).max(max_frame_bytes.saturating_mul(4))
}

/// The `host:port` part of a URL, for the per-host connect limit.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_urls() {
        assert_eq!(host_of("wss://stream.binance.com:9443/stream?streams=a"), "stream.binance.com:9443");
        assert_eq!(host_of("ws://127.0.0.1:80"), "127.0.0.1:80");
    }

    /// A frame over `max_frame_bytes` keeps a copy of its start: the large buffer it was read into
    /// is freed, not held by the queue and the dead letter for as long as they keep the frame.
    #[test]
    fn a_cut_frame_does_not_keep_the_frame_read() {
        let (kept, len) = cut(Bytes::from(vec![b'x'; 4 << 20]), 1024);
        assert_eq!((kept.len(), len), (1024, Some(4 << 20)));
        let buffer = kept.try_into_mut().expect("the only reference");
        assert!(buffer.capacity() < 4096, "the cut frame holds {} bytes", buffer.capacity());
        let small = Bytes::from_static(b"small");
        assert_eq!(cut(small.clone(), 1024), (small, None));
    }

    #[test]
    fn notices_are_found_in_frames() {
        let config = |notices: &[&str]| SourceConfig {
            shutdown_notices: notices.iter().map(|n| n.to_string()).collect(),
            ..SourceConfig::new("s", "ws://127.0.0.1:1", "binance")
        };
        let notices = Notices::of(&config(&["serverShutdown"]));
        assert!(notices.any_in(br#"{"e":"serverShutdown"}"#));
        assert!(!notices.any_in(b"abc"));
        assert!(!Notices::of(&config(&[""])).any_in(b"abc"), "an empty notice matches nothing");
        assert!(!Notices::of(&config(&["abc"])).any_in(b"ab"));
    }

    /// A `wss://` feed goes through TLS: against a server that is not one, the attempt fails with an
    /// error (it would panic if no TLS provider were compiled in).
    #[tokio::test]
    async fn wss_connect_attempts_fail_cleanly_against_a_non_tls_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let mut config = SourceConfig::new("tls", &format!("wss://{addr}/ws"), "binance");
        config.connect_timeout_ms = 2_000;
        let limiter = ConnectLimiter::new(Duration::ZERO);
        let (_tx, mut rx) = watch::channel(false);
        let stats = SourceStats::default();
        match connect(&config, &addr.to_string(), &limiter, &stats, &mut rx).await {
            Err(e) => assert!(!e.is_empty()),
            Ok(_) => panic!("connected to a server that does not speak TLS"),
        }
    }

    /// A venue that floods pings and reads nothing fills the socket with our pongs. The read loop
    /// goes on regardless (pongs are queued, never awaited), our next ping cannot be written, and the
    /// source connects again, and again; a stop ends it within a second the whole time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_venue_that_floods_pings_and_never_reads_is_left_and_a_stop_is_honoured() {
        use feedsim::{FeedSim, FeedSimConfig, Venue};
        let sim = FeedSim::start(FeedSimConfig { trades_per_second: 50.0, ..FeedSimConfig::default() }).await.unwrap();
        sim.handle().set_flood_pings(true);
        let mut config = SourceConfig::new("flood", &sim.url(Venue::Binance), "binance");
        config.subscribe = vec![r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}"#.into()];
        config.ping_interval_ms = 200;
        config.write_timeout_ms = 300;
        config.reconnect_min_ms = 50;
        config.reconnect_max_ms = 100;
        let (tx, mut rx) = queue::channel(1024, 1 << 20);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let stats = Arc::new(SourceStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let limiter = Arc::new(ConnectLimiter::new(Duration::ZERO));
        let task = tokio::spawn(run(Arc::new(config), 1, tx, stats.clone(), limiter, stop_rx));
        let started = Instant::now();
        while stats.reconnects.load(Ordering::Relaxed) < 2 {
            assert!(started.elapsed() < Duration::from_secs(20), "stuck on a venue that does not read: {stats:?}");
            sleep(Duration::from_millis(50)).await;
        }
        stop.send(true).unwrap();
        timeout(Duration::from_secs(2), task).await.expect("a stop is honoured while the venue floods").unwrap();
        assert_eq!(stats.state(), State::Stopped);
        sim.shutdown().await;
    }

    /// A stop does not wait for a write the venue is not taking, however long `write_timeout_ms`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_does_not_wait_for_a_stalled_write() {
        use feedsim::{FeedSim, FeedSimConfig, Venue};
        let sim = FeedSim::start(FeedSimConfig::default()).await.unwrap();
        sim.handle().set_flood_pings(true);
        let mut config = SourceConfig::new("stalled", &sim.url(Venue::Binance), "binance");
        config.ping_interval_ms = 100;
        config.write_timeout_ms = 600_000;
        let (tx, mut rx) = queue::channel(1024, 1 << 20);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let stats = Arc::new(SourceStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let limiter = Arc::new(ConnectLimiter::new(Duration::ZERO));
        let task = tokio::spawn(run(Arc::new(config), 1, tx, stats.clone(), limiter, stop_rx));
        // Long enough for the socket's buffers to fill and a ping to wait on them.
        sleep(Duration::from_secs(3)).await;
        assert_eq!(stats.state(), State::Up);
        let asked = Instant::now();
        stop.send(true).unwrap();
        timeout(Duration::from_secs(3), task).await.expect("the stop waited for the write").unwrap();
        assert!(asked.elapsed() < Duration::from_millis(1_500), "stopped after {:?}", asked.elapsed());
        sim.shutdown().await;
    }

    /// Pings are answered without a write of ours: tungstenite's queued pong goes out at the next
    /// read, which the read loop makes at once.
    #[tokio::test]
    async fn pings_are_answered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (pong_tx, pong_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
            ws.send(Message::Ping(Bytes::from_static(b"are you there"))).await.unwrap();
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Pong(payload) = message {
                    let _ = pong_tx.send(payload);
                    break;
                }
            }
        });
        let mut config = SourceConfig::new("pong", &format!("ws://{addr}/"), "binance");
        config.ping_interval_ms = 0;
        let (tx, _rx) = queue::channel(16, 1 << 20);
        let (stop, stop_rx) = watch::channel(false);
        let limiter = Arc::new(ConnectLimiter::new(Duration::ZERO));
        let task = tokio::spawn(run(Arc::new(config), 1, tx, Arc::new(SourceStats::default()), limiter, stop_rx));
        let payload = timeout(Duration::from_secs(5), pong_rx).await.expect("no pong").unwrap();
        assert_eq!(&payload[..], b"are you there");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_connect_limiter_spaces_attempts_per_host() {
        let limiter = ConnectLimiter::new(Duration::from_millis(100));
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire("a:1").await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        // Another host is not held back.
        let before = Instant::now();
        limiter.acquire("b:1").await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
