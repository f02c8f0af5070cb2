//! One client connection: the WebSocket handshake (routing by path), subscriptions, trade delivery
//! and the fault injections; and [`PingFilter`], which lets the simulator ignore pings on demand.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, Interval};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, info, warn};

use super::feed::{Feed, Frame, Recent, now_us};
use super::venue::{self, Request as ClientRequest};
use super::{Control, Shared, Venue, stopped};

/// Client messages are small subscription requests; anything bigger is refused by tungstenite.
const MAX_CLIENT_MESSAGE_BYTES: usize = 64 << 10;
/// Bytes collected before a write reaches the socket (a flush sends whatever is collected).
const WRITE_BUFFER_BYTES: usize = 32 * 1024;

/// Most trade frames written to one connection before a flush.
const TRADE_BURST: usize = 64;

/// How long a client may take to send its HTTP upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Frames of one subscribed feed as they reach this connection; `Err(n)`: `n` frames were missed
/// because the connection fell behind.
type Delivery = (Arc<Feed>, Result<Arc<Frame>, u64>);

/// Why a connection ends (the reason is only logged).
#[derive(Debug)]
struct Stop(&'static str);

const DROPPED: &str = "dropped on purpose";
const SHUT_DOWN: &str = "simulator shut down";

/// Serves one accepted TCP connection until it closes, is dropped on purpose, or the simulator stops.
pub(super) async fn serve(shared: Arc<Shared>, tcp: TcpStream, running: mpsc::Sender<()>) {
    // Frames are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let stream = PingFilter { inner: tcp, ignore: shared.ignore_pings.clone(), scanner: None };
    let mut route = None;
    // The callback's signature is tungstenite's, large error response included.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| match Venue::from_path(request.uri().path()) {
        Some(venue) => {
            route = Some((venue, request.uri().query().map(str::to_owned)));
            Ok(response)
        }
        None => {
            let mut refusal = ErrorResponse::new(Some(unknown_path()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    // Clients send little (subscriptions, pings): a small read buffer keeps thousands of connections
    // cheap. Writes collect up to a burst of trade frames and go out in one `send` at the flush (with
    // a write buffer of 0, every frame was its own system call: a fifth of the machine at 200,000
    // trades/s).
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE_BYTES))
        .read_buffer_size(4 * 1024)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    // A client that connects and says nothing must not hold up shutdown.
    let mut shutdown = shared.shutdown.clone();
    let mut ws = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match handshake {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                debug!(error = %e, "feedsim handshake failed");
                return;
            }
            Err(_) => {
                debug!("feedsim handshake timed out");
                return;
            }
        },
        _ = stopped(&mut shutdown) => return,
    };
    // The callback accepted the handshake, so it set the route.
    let Some((venue, query)) = route else { return };
    // From here on the client speaks WebSocket frames, which the filter can follow.
    ws.get_mut().scanner = Some(FrameScanner::default());
    shared.connections_accepted.fetch_add(1, Ordering::Relaxed);
    shared.connections_open.fetch_add(1, Ordering::Relaxed);
    let peer = venue::Peer { connection_id: shared.next_connection_id(), heartbeats: false };
    let connection = Connection {
        venue,
        peer,
        heartbeats_sent: 0,
        ws,
        subscribed: Vec::new(),
        trades: SelectAll::new(),
        controls: shared.controls.subscribe(),
        drops: shared.drops.subscribe(),
        shutdown: shared.shutdown.clone(),
        closing_at: None,
        running,
        shared: shared.clone(),
    };
    let initial = binance_query_streams(venue, query.as_deref());
    let stop = connection.run(initial).await;
    shared.connections_open.fetch_sub(1, Ordering::Relaxed);
    debug!(%venue, reason = stop.0, "feedsim connection ended");
}

/// The refusal of a path no venue is served at, naming the ones that are.
fn unknown_path() -> String {
    let paths: Vec<String> = Venue::ALL.iter().map(|v| format!("/{v}")).collect();
    format!("unknown path: use one of {}", paths.join(", "))
}

/// `/binance?streams=btcusdt@aggTrade/ethusdt@aggTrade` subscribes at connect, like Binance's
/// combined-stream URL.
fn binance_query_streams(venue: Venue, query: Option<&str>) -> Vec<String> {
    let streams = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("streams="));
    match (venue, streams) {
        (Venue::Binance, Some(streams)) => venue::binance_streams(streams.split('/')).unwrap_or_else(|e| {
            info!(error = %e, "feedsim ignored the streams in a Binance URL");
            Vec::new()
        }),
        _ => Vec::new(),
    }
}

struct Connection {
    venue: Venue,
    /// What this connection's answers say about it (its id, its Coinbase Advanced heartbeats).
    peer: venue::Peer,
    /// Heartbeats sent so far (Coinbase Advanced numbers them).
    heartbeats_sent: u64,
    ws: WebSocketStream<PingFilter>,
    /// Symbols subscribed, in order (Coinbase's acknowledgement lists them all).
    subscribed: Vec<String>,
    /// Every subscribed feed's frames, merged.
    trades: SelectAll<BoxStream<'static, Delivery>>,
    /// Fault injections that send frames.
    controls: broadcast::Receiver<Control>,
    /// Changes when every connection must drop abruptly.
    drops: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// Set by a shutdown notice: when to close.
    closing_at: Option<Instant>,
    /// Held (and cloned into generators this connection starts) so shutdown can wait for the tasks.
    running: mpsc::Sender<()>,
    shared: Arc<Shared>,
}

enum Event {
    Message(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Trade(Delivery),
    Control(Result<Control, RecvError>),
    Heartbeat,
    Close,
}

impl Connection {
    async fn run(mut self, initial: Vec<String>) -> Stop {
        let stop = self.serve(initial).await;
        if matches!(stop.0, DROPPED | SHUT_DOWN) {
            self.hang_up().await;
        }
        stop
    }

    /// Ends the TCP connection without a WebSocket close frame, the way a venue's server does when it
    /// goes away: a FIN after everything already written, then whatever the client still sends is
    /// read and discarded for a moment, so the kernel does not answer it with a reset (which would
    /// make the client's kernel throw away frames it has not read yet).
    async fn hang_up(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.ws.get_mut().shutdown().await;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(CLOSE_WAIT, drain).await;
    }

    async fn serve(&mut self, initial: Vec<String>) -> Stop {
        if let Some(greeting) = venue::greeting(self.venue, &self.peer)
            && let Err(stop) = self.send(greeting.into()).await
        {
            return stop;
        }
        self.subscribe(&initial);
        let heartbeat_ms = self.shared.config.kraken_heartbeat_ms;
        let beats = matches!(self.venue, Venue::Kraken | Venue::KrakenV2 | Venue::CoinbaseAdvanced);
        let mut heartbeat = (beats && heartbeat_ms > 0).then(|| {
            let period = Duration::from_millis(heartbeat_ms);
            tokio::time::interval_at(Instant::now() + period, period)
        });
        loop {
            if self.shared.flood_pings.load(Ordering::Relaxed)
                && let Err(stop) = self.flood_pings().await
            {
                return stop;
            }
            let close = tokio::time::sleep_until(self.closing_at.unwrap_or_else(Instant::now));
            let closing = self.closing_at.is_some();
            let event = tokio::select! {
                message = self.ws.next() => Event::Message(message),
                Some(delivery) = self.trades.next(), if !self.trades.is_empty() => Event::Trade(delivery),
                control = self.controls.recv() => Event::Control(control),
                _ = self.drops.changed() => return Stop(DROPPED),
                _ = stopped(&mut self.shutdown) => return Stop(SHUT_DOWN),
                _ = tick(&mut heartbeat) => Event::Heartbeat,
                _ = close, if closing => Event::Close,
            };
            if let Err(stop) = self.handle(event).await {
                return stop;
            }
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), Stop> {
        match event {
            Event::Message(None) => Err(Stop("client closed")),
            Event::Message(Some(Err(e))) => {
                debug!(error = %e, "feedsim connection read failed");
                Err(Stop("read failed"))
            }
            Event::Message(Some(Ok(Message::Text(text)))) => self.request(&text).await,
            Event::Message(Some(Ok(Message::Binary(bytes)))) => self.request(&String::from_utf8_lossy(&bytes)).await,
            // tungstenite answers pings and close frames itself (pings unless filtered out).
            Event::Message(Some(Ok(_))) => Ok(()),
            Event::Trade(delivery) => self.send_trades(delivery).await,
            Event::Control(Ok(control)) => self.control(control).await,
            Event::Control(Err(RecvError::Lagged(_))) => Ok(()),
            Event::Control(Err(RecvError::Closed)) => Err(Stop("simulator gone")),
            Event::Heartbeat => match venue::heartbeat(self.venue, &self.peer, self.heartbeats_sent) {
                Some(beat) => {
                    self.heartbeats_sent += 1;
                    self.send(beat.into()).await
                }
                None => Ok(()),
            },
            Event::Close => {
                let frame = CloseFrame { code: CloseCode::Away, reason: "server shutting down".into() };
                // Let the client answer the close frame, then drop the socket either way.
                let close = async {
                    if self.ws.close(Some(frame)).await.is_ok() {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    }
                };
                let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
                Err(Stop("closed after a shutdown notice"))
            }
        }
    }

    async fn control(&mut self, control: Control) -> Result<(), Stop> {
        let text = match control {
            Control::ShutdownNotice => {
                let close_in = Duration::from_millis(self.shared.config.shutdown_notice_close_ms);
                self.closing_at.get_or_insert(Instant::now() + close_in);
                venue::shutdown_notice(self.venue, &self.peer, now_us() / 1_000)
            }
            Control::Malformed => venue::malformed_frame(self.venue).to_owned(),
            Control::Oversized => venue::oversized_frame(self.venue, self.shared.config.oversized_frame_bytes),
            // Taken up at the top of the serving loop.
            Control::FloodPings => return Ok(()),
        };
        self.send(text.into()).await
    }

    /// Answers one client message; a message that is not understood gets the venue's error frame.
    async fn request(&mut self, text: &str) -> Result<(), Stop> {
        match venue::parse_request(self.venue, &self.peer, text) {
            ClientRequest::Subscribe { symbols, id, snapshot } => {
                let subscribed = self.subscribe(&symbols);
                let feeds: Vec<&Feed> = subscribed.iter().map(|(feed, _)| feed.as_ref()).collect();
                for ack in venue::subscribe_acks(self.venue, &self.peer, &id, snapshot, &feeds, &self.subscribed) {
                    self.send(ack.into()).await?;
                }
                if snapshot {
                    for (feed, recent) in &subscribed {
                        self.send_snapshot(feed, recent.as_ref()).await?;
                    }
                }
                Ok(())
            }
            ClientRequest::Heartbeats => {
                self.peer.heartbeats = true;
                let ack = venue::coinbase_advanced_subscriptions(&self.peer, &self.subscribed);
                self.send(ack.into()).await
            }
            ClientRequest::Ping { reqid } if !self.shared.ignore_pings.load(Ordering::Relaxed) => {
                self.send(venue::pong(self.venue, &self.peer, &reqid).into()).await
            }
            ClientRequest::Ping { .. } => Ok(()),
            ClientRequest::Invalid(answer) => {
                let excerpt: String = text.chars().take(200).collect();
                info!(venue = %self.venue, message = %excerpt, "feedsim refused a client message");
                self.send(answer.into()).await
            }
        }
    }

    /// Subscribes to `symbols` (once each), starting their generators; returns their feeds, each with
    /// the trades it published before this subscription if the subscription is new.
    fn subscribe(&mut self, symbols: &[String]) -> Vec<(Arc<Feed>, Option<Recent>)> {
        let mut feeds = Vec::with_capacity(symbols.len());
        for symbol in symbols {
            let feed = self.shared.feed(self.venue, symbol);
            let mut recent = None;
            if !self.subscribed.contains(symbol) {
                self.shared.start_generator(&feed, &self.running);
                let (frames, trades) = feed.subscribe();
                self.trades.push(deliveries(feed.clone(), frames));
                self.subscribed.push(symbol.clone());
                recent = Some(trades);
            }
            feeds.push((feed, recent));
        }
        feeds
    }

    /// Sends the venue's snapshot of a feed just subscribed, if it has one; its trades count as sent.
    async fn send_snapshot(&mut self, feed: &Feed, recent: Option<&Recent>) -> Result<(), Stop> {
        let Some(recent) = recent else { return Ok(()) };
        let Some((text, carried)) = venue::snapshot(feed, recent) else { return Ok(()) };
        self.send(text.into()).await?;
        feed.record_sent_trades(carried);
        Ok(())
    }

    /// Sends a trade frame and the ones already waiting behind it (up to [`TRADE_BURST`]) with one
    /// flush, so a busy feed costs one write per burst rather than one per frame. They count as sent
    /// once the flush has gone through.
    async fn send_trades(&mut self, first: Delivery) -> Result<(), Stop> {
        let mut fed: Vec<(Arc<Feed>, Arc<Frame>)> = Vec::new();
        let mut next = Some(first);
        while let Some((feed, item)) = next.take() {
            let frame = match item {
                Ok(frame) => frame,
                Err(missed) => {
                    warn!(venue = %feed.venue, symbol = %feed.symbol, missed, "feedsim client too slow, dropping it");
                    return Err(Stop("client too slow"));
                }
            };
            let message = Message::Text(frame.text.clone());
            tokio::select! {
                done = self.ws.feed(message) => done.map_err(|e| {
                    debug!(error = %e, "feedsim connection write failed");
                    Stop("write failed")
                })?,
                _ = self.drops.changed() => return Err(Stop(DROPPED)),
                _ = stopped(&mut self.shutdown) => return Err(Stop(SHUT_DOWN)),
            }
            fed.push((feed, frame));
            if fed.len() < TRADE_BURST {
                next = self.trades.next().now_or_never().flatten();
            }
        }
        tokio::select! {
            done = self.ws.flush() => done.map_err(|e| {
                debug!(error = %e, "feedsim connection write failed");
                Stop("write failed")
            })?,
            _ = self.drops.changed() => return Err(Stop(DROPPED)),
            _ = stopped(&mut self.shutdown) => return Err(Stop(SHUT_DOWN)),
        }
        self.shared.frames_sent.fetch_add(fed.len() as u64, Ordering::Relaxed);
        for (feed, frame) in fed {
            feed.record_sent(frame.ids.clone());
        }
        Ok(())
    }

    /// Sends one text frame; gives up if the connection is dropped or the simulator stops meanwhile
    /// (a client that does not read must not keep the fault injections from working).
    /// While the flood is on: pings back to back and nothing read, not even the client's pongs, so
    /// they fill the socket buffers until the client's writes block (a server that stopped reading).
    async fn flood_pings(&mut self) -> Result<(), Stop> {
        let ping = bytes::Bytes::from_static(&[b'p'; 125]);
        while self.shared.flood_pings.load(Ordering::Relaxed) {
            tokio::select! {
                sent = self.ws.send(Message::Ping(ping.clone())) => if let Err(e) = sent {
                    debug!(error = %e, "feedsim connection write failed");
                    return Err(Stop("write failed"));
                },
                _ = self.drops.changed() => return Err(Stop(DROPPED)),
                _ = stopped(&mut self.shutdown) => return Err(Stop(SHUT_DOWN)),
            }
        }
        Ok(())
    }

    async fn send(&mut self, text: Utf8Bytes) -> Result<(), Stop> {
        tokio::select! {
            sent = self.ws.send(Message::Text(text)) => match sent {
                Ok(()) => {
                    self.shared.frames_sent.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    debug!(error = %e, "feedsim connection write failed");
                    Err(Stop("write failed"))
                }
            },
            _ = self.drops.changed() => Err(Stop(DROPPED)),
            _ = stopped(&mut self.shutdown) => Err(Stop(SHUT_DOWN)),
        }
    }
}

/// A feed's frames as a stream; it ends only when the feed itself is gone.
fn deliveries(feed: Arc<Feed>, frames: broadcast::Receiver<Arc<Frame>>) -> BoxStream<'static, Delivery> {
    stream::unfold((feed, frames), |(feed, mut frames)| async move {
        let item = match frames.recv().await {
            Ok(frame) => Ok(frame),
            Err(RecvError::Lagged(missed)) => Err(missed),
            Err(RecvError::Closed) => return None,
        };
        Some(((feed.clone(), item), (feed, frames)))
    })
    .boxed()
}

/// The next tick of an optional interval; never, if there is none.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The server side of a connection's TCP stream. Once the handshake is done it follows the client's
/// WebSocket frame headers, and while `ignore` is set it removes incoming Ping frames before
/// tungstenite sees them, so no Pong goes back: tungstenite always answers the pings it reads.
pub(super) struct PingFilter {
    inner: TcpStream,
    /// The simulator's "stop answering pings" switch, read at each frame start.
    ignore: Arc<AtomicBool>,
    /// `None` during the HTTP handshake, which is passed through untouched.
    scanner: Option<FrameScanner>,
}

impl AsyncRead for PingFilter {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let Some(scanner) = this.scanner.as_mut() else { return Poll::Ready(Ok(())) };
            if buf.filled().len() == before {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
            let kept = scanner.filter(&mut buf.filled_mut()[before..], this.ignore.load(Ordering::Relaxed));
            buf.set_filled(before + kept);
            // Returning no bytes would read as end of stream: read again if everything was a ping.
            if kept > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for PingFilter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Follows WebSocket frame boundaries in a byte stream (RFC 6455 §5.2) by reading headers only.
#[derive(Debug, Default)]
struct FrameScanner {
    state: Scan,
    /// Whether the current frame is being removed.
    dropping: bool,
}

#[derive(Clone, Copy, Debug, Default)]
enum Scan {
    /// The first header byte (FIN, opcode) is next.
    #[default]
    Start,
    /// The second (MASK bit, 7-bit length) is next.
    Length,
    /// Inside a 16- or 64-bit extended length.
    Extended { left: u8, len: u64, masked: bool },
    /// Inside the 4-byte masking key.
    Mask { left: u8, len: u64 },
    /// Inside the payload.
    Payload { left: u64 },
}

impl FrameScanner {
    const PING: u8 = 0x9;

    /// Removes whole Ping frames from `bytes` if `drop_pings`, moving the kept bytes to the front;
    /// returns how many were kept. A frame is kept or dropped according to `drop_pings` at its start.
    fn filter(&mut self, bytes: &mut [u8], drop_pings: bool) -> usize {
        let (mut read, mut kept) = (0, 0);
        while read < bytes.len() {
            if let Scan::Payload { left } = self.state {
                let n = left.min((bytes.len() - read) as u64);
                let end = read + n as usize;
                if !self.dropping {
                    bytes.copy_within(read..end, kept);
                    kept += end - read;
                }
                read = end;
                self.state = if n == left { Scan::Start } else { Scan::Payload { left: left - n } };
                continue;
            }
            let byte = bytes[read];
            read += 1;
            self.state = match self.state {
                Scan::Start => {
                    self.dropping = drop_pings && byte & 0x0F == Self::PING;
                    Scan::Length
                }
                Scan::Length => {
                    let masked = byte & 0x80 != 0;
                    match byte & 0x7F {
                        126 => Scan::Extended { left: 2, len: 0, masked },
                        127 => Scan::Extended { left: 8, len: 0, masked },
                        len => after_length(u64::from(len), masked),
                    }
                }
                Scan::Extended { left, len, masked } => {
                    let len = len << 8 | u64::from(byte);
                    if left == 1 { after_length(len, masked) } else { Scan::Extended { left: left - 1, len, masked } }
                }
                Scan::Mask { left: 1, len } => payload(len),
                Scan::Mask { left, len } => Scan::Mask { left: left - 1, len },
                // Handled above.
                Scan::Payload { left } => Scan::Payload { left },
            };
            if !self.dropping {
                bytes[kept] = byte;
                kept += 1;
            }
        }
        kept
    }
}

fn after_length(len: u64, masked: bool) -> Scan {
    if masked { Scan::Mask { left: 4, len } } else { payload(len) }
}

fn payload(len: u64) -> Scan {
    if len == 0 { Scan::Start } else { Scan::Payload { left: len } }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: FIN + opcode, then the length forms RFC 6455 uses.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=65535 => {
                out.push(0x80 | 126);
                out.extend((n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend((n as u64).to_be_bytes());
            }
        }
        out.extend([1, 2, 3, 4]);
        out.extend(payload);
        out
    }

    #[test]
    fn scanner_drops_whole_pings_only_when_asked_at_any_split() {
        let text = frame(0x1, br#"{"method":"SUBSCRIBE"}"#);
        let big = frame(0x2, &vec![7; 70_000]);
        let medium = frame(0x1, &vec![b'a'; 300]);
        let ping = frame(FrameScanner::PING, b"are you there");
        let empty_ping = frame(FrameScanner::PING, b"");
        let stream = [&text[..], &ping, &big, &empty_ping, &medium, &ping].concat();
        let without_pings = [&text[..], &big, &medium].concat();
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            for (drop_pings, want) in [(true, &without_pings), (false, &stream)] {
                let mut scanner = FrameScanner::default();
                let mut out = Vec::new();
                for piece in stream.chunks(chunk) {
                    let mut piece = piece.to_vec();
                    let kept = scanner.filter(&mut piece, drop_pings);
                    out.extend_from_slice(&piece[..kept]);
                }
                assert!(out == *want, "chunk {chunk}, drop {drop_pings}");
            }
        }
    }
}
