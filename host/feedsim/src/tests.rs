//! The simulator against real WebSocket clients on loopback.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::*;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single expected message may take.
const WAIT: Duration = Duration::from_secs(2);

fn config() -> FeedSimConfig {
    FeedSimConfig { trades_per_second: 200.0, kraken_heartbeat_ms: 0, ..FeedSimConfig::default() }
}

async fn start() -> FeedSim {
    FeedSim::start(config()).await.unwrap()
}

async fn connect(sim: &FeedSim, venue: Venue) -> Client {
    connect_async(sim.url(venue)).await.unwrap().0
}

/// The next message of any kind; `None` when the stream ends or fails.
async fn next_message(ws: &mut Client) -> Option<Message> {
    match tokio::time::timeout(WAIT, ws.next()).await.expect("no message within 2 s") {
        Some(Ok(message)) => Some(message),
        Some(Err(_)) | None => None,
    }
}

/// The next text frame, skipping control frames.
async fn next_text(ws: &mut Client) -> String {
    loop {
        match next_message(ws).await.expect("stream ended") {
            Message::Text(text) => return text.to_string(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

async fn next_json(ws: &mut Client) -> Value {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn is_trade(venue: Venue, frame: &Value) -> bool {
    match venue {
        Venue::Binance => frame["data"]["e"] == "aggTrade",
        Venue::Coinbase => frame["type"] == "match" || frame["type"] == "last_match",
        Venue::Kraken => frame.is_array(),
        Venue::Okx => frame["arg"]["channel"] == "trades" && frame["data"].is_array(),
        Venue::Bybit => frame["topic"].as_str().is_some_and(|t| t.starts_with("publicTrade.")),
        Venue::Bitstamp => frame["event"] == "trade",
        Venue::KrakenV2 => frame["channel"] == "trade",
        Venue::CoinbaseAdvanced => frame["channel"] == "market_trades",
    }
}

/// The next trade frame, skipping answers, heartbeats and status messages.
async fn next_trade(ws: &mut Client, venue: Venue) -> Value {
    loop {
        let frame = next_json(ws).await;
        if is_trade(venue, &frame) {
            return frame;
        }
    }
}

/// Whether a trade frame is the snapshot sent on subscribing (Coinbase Exchange's `last_match`).
fn is_snapshot(venue: Venue, frame: &Value) -> bool {
    match venue {
        Venue::KrakenV2 => frame["type"] == "snapshot",
        Venue::CoinbaseAdvanced => frame["events"][0]["type"] == "snapshot",
        Venue::Coinbase => frame["type"] == "last_match",
        _ => false,
    }
}

/// The trades of a Kraken v2, Coinbase Advanced or Coinbase Exchange trade frame, in frame order.
fn frame_trades(venue: Venue, frame: &Value) -> Vec<Value> {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_else(|| panic!("no trades in {frame}"));
    match venue {
        Venue::KrakenV2 => list(&frame["data"]),
        Venue::CoinbaseAdvanced => list(&frame["events"]).iter().flat_map(|e| list(&e["trades"])).collect(),
        Venue::Coinbase => vec![frame.clone()],
        other => panic!("{other} is not in this test"),
    }
}

/// The trade id of one trade of [`frame_trades`].
fn id_of(venue: Venue, trade: &Value) -> u64 {
    match venue {
        Venue::CoinbaseAdvanced => trade["trade_id"].as_str().and_then(|id| id.parse().ok()),
        _ => trade["trade_id"].as_u64(),
    }
    .unwrap_or_else(|| panic!("no trade id in {trade}"))
}

/// The trade id of a Binance or Coinbase trade frame.
fn trade_id(venue: Venue, frame: &Value) -> u64 {
    let id = match venue {
        Venue::Binance => &frame["data"]["a"],
        _ => &frame["trade_id"],
    };
    id.as_u64().unwrap_or_else(|| panic!("no trade id in {frame}"))
}

fn subscribe_request(venue: Venue, symbol: &str) -> String {
    match venue {
        Venue::Binance => {
            json!({"method": "SUBSCRIBE", "params": [format!("{}@aggTrade", symbol.to_lowercase())], "id": 7})
        }
        Venue::Coinbase => json!({"type": "subscribe", "product_ids": [symbol], "channels": ["matches"]}),
        Venue::Kraken => json!({"event": "subscribe", "pair": [symbol], "subscription": {"name": "trade"}}),
        Venue::Okx => json!({"op": "subscribe", "args": [{"channel": "trades", "instId": symbol}]}),
        Venue::Bybit => json!({"op": "subscribe", "args": [format!("publicTrade.{symbol}")], "req_id": "r1"}),
        Venue::Bitstamp => json!({"event": "bts:subscribe", "data": {"channel": format!("live_trades_{symbol}")}}),
        Venue::KrakenV2 => {
            json!({"method": "subscribe", "params": {"channel": "trade", "symbol": [symbol]}, "req_id": 3})
        }
        Venue::CoinbaseAdvanced => json!({"type": "subscribe", "product_ids": [symbol], "channel": "market_trades"}),
    }
    .to_string()
}

/// Subscribes and returns the acknowledgement (Kraken's `systemStatus` is skipped).
async fn subscribe(ws: &mut Client, venue: Venue, symbol: &str) -> Value {
    ws.send(Message::text(subscribe_request(venue, symbol))).await.unwrap();
    loop {
        let frame = next_json(ws).await;
        let greeting = (venue == Venue::Kraken && frame["event"] == "systemStatus")
            || (venue == Venue::KrakenV2 && frame["channel"] == "status");
        if !greeting {
            return frame;
        }
    }
}

/// Reads until the stream ends; returns every message and whether a close frame was among them.
async fn drain(ws: &mut Client) -> (Vec<Message>, bool) {
    let mut messages = Vec::new();
    while let Some(message) = next_message(ws).await {
        messages.push(message);
    }
    let closed = messages.iter().any(|m| matches!(m, Message::Close(_)));
    (messages, closed)
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A positive decimal string with exactly `decimals` decimals (any, if `None`).
fn assert_decimal(text: &Value, decimals: Option<usize>) {
    let s = text.as_str().unwrap_or_else(|| panic!("not a string: {text}"));
    let (whole, fraction) = s.split_once('.').unwrap_or_else(|| panic!("no point: {s}"));
    assert!(!whole.is_empty() && whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()), "{s}");
    if let Some(decimals) = decimals {
        assert_eq!(fraction.len(), decimals, "{s}");
    }
    assert!(s.parse::<f64>().unwrap() > 0.0, "{s}");
}

#[tokio::test]
async fn binance_ack_and_consecutive_agg_trades() {
    let sim = start().await;
    let mut ws = connect(&sim, Venue::Binance).await;
    assert_eq!(subscribe(&mut ws, Venue::Binance, "BTCUSDT").await, json!({"result": null, "id": 7}));
    let mut previous: Option<Value> = None;
    for _ in 0..20 {
        let frame = next_trade(&mut ws, Venue::Binance).await;
        assert_eq!(frame["stream"], "btcusdt@aggTrade");
        let d = &frame["data"];
        assert_eq!((&d["e"], &d["s"], &d["M"]), (&json!("aggTrade"), &json!("BTCUSDT"), &json!(true)), "{frame}");
        assert_decimal(&d["p"], Some(8));
        assert_decimal(&d["q"], Some(8));
        assert!(d["m"].is_boolean());
        let (trade_ms, event_ms) = (d["T"].as_u64().unwrap(), d["E"].as_u64().unwrap());
        assert!(event_ms >= trade_ms && trade_ms.abs_diff(now_ms()) < 5_000, "{frame}");
        let (first, last) = (d["f"].as_u64().unwrap(), d["l"].as_u64().unwrap());
        assert!(first <= last);
        if let Some(p) = previous {
            assert_eq!(d["a"].as_u64().unwrap(), p["data"]["a"].as_u64().unwrap() + 1);
            assert_eq!(first, p["data"]["l"].as_u64().unwrap() + 1);
        }
        previous = Some(frame);
    }
    // The combined-stream URL subscribes without a request.
    let url = format!("{}?streams=ethusdt@aggTrade", sim.url(Venue::Binance));
    let (mut ws, _) = connect_async(url).await.unwrap();
    assert_eq!(next_trade(&mut ws, Venue::Binance).await["data"]["s"], "ETHUSDT");
    sim.shutdown().await;
}

#[tokio::test]
async fn coinbase_ack_and_consecutive_matches() {
    let sim = start().await;
    let mut ws = connect(&sim, Venue::Coinbase).await;
    let ack = subscribe(&mut ws, Venue::Coinbase, "BTC-USD").await;
    assert_eq!(ack, json!({"type": "subscriptions", "channels": [{"name": "matches", "product_ids": ["BTC-USD"]}]}));
    let mut previous: Option<Value> = None;
    for _ in 0..20 {
        let m = next_trade(&mut ws, Venue::Coinbase).await;
        assert_eq!(m["product_id"], "BTC-USD");
        assert!(m["side"] == "buy" || m["side"] == "sell", "{m}");
        assert_decimal(&m["size"], Some(8));
        assert_decimal(&m["price"], None);
        for order in [&m["maker_order_id"], &m["taker_order_id"]] {
            let order = order.as_str().unwrap();
            assert_eq!(order.len(), 36);
            assert_eq!(order.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        }
        // 2021-04-17T16:43:37.089723Z, and today.
        let time = m["time"].as_str().unwrap();
        assert_eq!(time.len(), 27, "{time}");
        assert!(time.ends_with('Z') && &time[10..11] == "T" && &time[19..20] == ".", "{time}");
        assert_eq!(&time[..10], &venue::rfc3339_micros(now_ms() * 1_000)[..10]);
        if let Some(p) = previous {
            assert_eq!(trade_id(Venue::Coinbase, &m), trade_id(Venue::Coinbase, &p) + 1);
            assert!(m["sequence"].as_u64().unwrap() > p["sequence"].as_u64().unwrap());
        }
        previous = Some(m);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn kraken_status_ack_trades_and_heartbeats() {
    let sim = FeedSim::start(FeedSimConfig { kraken_heartbeat_ms: 50, ..config() }).await.unwrap();
    let mut ws = connect(&sim, Venue::Kraken).await;
    let status = next_json(&mut ws).await;
    assert_eq!((&status["event"], &status["status"]), (&json!("systemStatus"), &json!("online")));
    let ack = subscribe(&mut ws, Venue::Kraken, "XBT/USD").await;
    assert_eq!(
        (&ack["event"], &ack["status"], &ack["pair"]),
        (&json!("subscriptionStatus"), &json!("subscribed"), &json!("XBT/USD"))
    );
    let channel_id = ack["channelID"].as_u64().unwrap();
    let (mut trades, mut multi, mut heartbeats) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline || heartbeats == 0 || multi == 0 {
        let frame = next_json(&mut ws).await;
        if frame == json!({"event": "heartbeat"}) {
            heartbeats += 1;
            continue;
        }
        let items = frame.as_array().unwrap_or_else(|| panic!("{frame}"));
        assert_eq!(items.len(), 4);
        assert_eq!((items[0].as_u64(), &items[2], &items[3]), (Some(channel_id), &json!("trade"), &json!("XBT/USD")));
        let batch = items[1].as_array().unwrap();
        assert!((1..=3).contains(&batch.len()), "{frame}");
        multi += usize::from(batch.len() > 1);
        for t in batch {
            let t = t.as_array().unwrap();
            assert_eq!(t.len(), 6);
            assert_decimal(&t[0], None);
            assert_decimal(&t[1], Some(8));
            let time = t[2].as_str().unwrap();
            let (secs, micros) = time.split_once('.').unwrap();
            assert_eq!(micros.len(), 6, "{time}");
            assert!(secs.parse::<u64>().unwrap().abs_diff(now_ms() / 1_000) < 5, "{time}");
            assert!(t[3] == "b" || t[3] == "s");
            assert!(t[4] == "l" || t[4] == "m");
            assert_eq!(t[5], "");
            trades += 1;
        }
    }
    assert!(trades >= 50, "{trades} trades in 500 ms at 200/s");
    // Kraken has no trade ids on the wire, but the record counts what went out.
    drop(ws);
    eventually("the connection to close", || sim.handle().stats().connections_open == 0).await;
    assert!(sim.handle().sent_ids(Venue::Kraken, "XBT/USD").len() >= trades);
    sim.shutdown().await;
}

#[tokio::test]
async fn overlapping_connections_see_identical_trades_of_their_symbols_only() {
    let sim = start().await;
    let mut a = connect(&sim, Venue::Binance).await;
    let mut b = connect(&sim, Venue::Binance).await;
    let mut other = connect(&sim, Venue::Binance).await;
    subscribe(&mut a, Venue::Binance, "BTCUSDT").await;
    subscribe(&mut b, Venue::Binance, "BTCUSDT").await;
    subscribe(&mut other, Venue::Binance, "ETHUSDT").await;
    let mut frames_a = HashMap::new();
    for _ in 0..60 {
        let frame = next_trade(&mut a, Venue::Binance).await;
        assert_eq!(frame["data"]["s"], "BTCUSDT");
        frames_a.insert(trade_id(Venue::Binance, &frame), frame);
    }
    let mut ids_b = Vec::new();
    for _ in 0..30 {
        let frame = next_trade(&mut b, Venue::Binance).await;
        let id = trade_id(Venue::Binance, &frame);
        // The very same trade: id, price, size, times.
        assert_eq!(frames_a.get(&id), Some(&frame), "b got a trade a did not");
        ids_b.push(id);
    }
    assert!(ids_b.windows(2).all(|w| w[1] == w[0] + 1), "{ids_b:?}");
    for _ in 0..10 {
        assert_eq!(next_trade(&mut other, Venue::Binance).await["data"]["s"], "ETHUSDT");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn skipping_trades_makes_exactly_that_gap_and_records_it() {
    let sim = start().await;
    let handle = sim.handle();
    for (venue, symbol) in [(Venue::Binance, "BTCUSDT"), (Venue::Coinbase, "ETH-USD")] {
        let mut ws = connect(&sim, venue).await;
        subscribe(&mut ws, venue, symbol).await;
        let mut previous = trade_id(venue, &next_trade(&mut ws, venue).await);
        handle.skip_trades(venue, symbol, 7);
        let mut gaps = Vec::new();
        for _ in 0..40 {
            let id = trade_id(venue, &next_trade(&mut ws, venue).await);
            if id != previous + 1 {
                gaps.push(previous + 1..=id - 1);
            }
            previous = id;
        }
        assert_eq!(gaps.len(), 1, "{venue}: {gaps:?}");
        assert_eq!(gaps[0].clone().count(), 7);
        assert_eq!(handle.skipped_ids(venue, symbol).ranges().collect::<Vec<_>>(), gaps);
        assert!(gaps[0].clone().all(|id| !handle.sent_ids(venue, symbol).contains(id)));
    }
    // A skip before anyone subscribes takes the first ids.
    handle.skip_trades(Venue::Binance, "SOLUSDT", 3);
    let mut ws = connect(&sim, Venue::Binance).await;
    subscribe(&mut ws, Venue::Binance, "SOLUSDT").await;
    let first = trade_id(Venue::Binance, &next_trade(&mut ws, Venue::Binance).await);
    assert_eq!(handle.skipped_ids(Venue::Binance, "SOLUSDT").ranges().collect::<Vec<_>>(), [first - 3..=first - 1]);
    sim.shutdown().await;
}

#[tokio::test]
async fn dropping_connections_ends_client_streams_without_a_close_frame() {
    let sim = start().await;
    let handle = sim.handle();
    let mut clients = Vec::new();
    for venue in [Venue::Binance, Venue::Kraken] {
        let mut ws = connect(&sim, venue).await;
        subscribe(&mut ws, venue, if venue == Venue::Binance { "BTCUSDT" } else { "XBT/USD" }).await;
        next_trade(&mut ws, venue).await;
        clients.push(ws);
    }
    assert_eq!(handle.stats().connections_open, 2);
    assert_eq!(handle.drop_connections(), 2);
    for ws in &mut clients {
        let (_, closed) = drain(ws).await;
        assert!(!closed, "a close frame was sent");
    }
    eventually("no open connections", || handle.stats().connections_open == 0).await;
    // The simulator keeps serving: a new connection works.
    let mut ws = connect(&sim, Venue::Binance).await;
    subscribe(&mut ws, Venue::Binance, "BTCUSDT").await;
    next_trade(&mut ws, Venue::Binance).await;
    assert_eq!(handle.stats().connections_accepted, 3);
    sim.shutdown().await;
}

/// Sends a ping and reports whether its pong came back within `within`; text frames are skipped.
async fn pong_within(ws: &mut Client, payload: &'static [u8], within: Duration) -> bool {
    ws.send(Message::Ping(payload.into())).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(Some(Ok(Message::Pong(p)))) => {
                assert_eq!(&p[..], payload, "a pong for an ignored ping came back");
                return true;
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn ignoring_pings_withholds_pongs_and_keeps_trades_flowing() {
    let sim = start().await;
    let handle = sim.handle();
    let mut ws = connect(&sim, Venue::Binance).await;
    subscribe(&mut ws, Venue::Binance, "BTCUSDT").await;
    assert!(pong_within(&mut ws, b"first", WAIT).await);
    handle.set_ignore_pings(true);
    assert!(!pong_within(&mut ws, b"ignored", Duration::from_millis(300)).await);
    // Trades still arrive while pings are ignored.
    next_trade(&mut ws, Venue::Binance).await;
    handle.set_ignore_pings(false);
    assert!(pong_within(&mut ws, b"again", WAIT).await);
    next_trade(&mut ws, Venue::Binance).await;

    // Kraken's application-level ping follows the same switch.
    let mut ws = connect(&sim, Venue::Kraken).await;
    next_json(&mut ws).await; // systemStatus
    ws.send(Message::text(r#"{"event":"ping","reqid":42}"#)).await.unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"event": "pong", "reqid": 42}));
    handle.set_ignore_pings(true);
    ws.send(Message::text(r#"{"event":"ping","reqid":43}"#)).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), ws.next()).await.is_err(), "answered while ignoring");
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_notice_arrives_then_the_connection_closes() {
    let sim = start().await;
    let symbols = [(Venue::Binance, "BTCUSDT"), (Venue::Coinbase, "BTC-USD"), (Venue::Kraken, "XBT/USD")];
    let mut clients = Vec::new();
    for (venue, symbol) in symbols {
        let mut ws = connect(&sim, venue).await;
        subscribe(&mut ws, venue, symbol).await;
        next_trade(&mut ws, venue).await;
        clients.push((venue, ws));
    }
    assert_eq!(sim.handle().send_shutdown_notice(), 3);
    for (venue, ws) in &mut clients {
        let notice = loop {
            let frame = next_json(ws).await;
            if !is_trade(*venue, &frame) {
                break frame;
            }
        };
        let received = Instant::now();
        match venue {
            Venue::Binance => {
                assert_eq!(notice["e"], "serverShutdown");
                assert!(notice["E"].as_u64().unwrap().abs_diff(now_ms()) < 5_000);
            }
            Venue::Coinbase => {
                assert_eq!(notice, json!({"type": "error", "message": "server shutting down for maintenance"}))
            }
            Venue::Kraken => assert_eq!(notice, json!({"event": "systemStatus", "status": "maintenance"})),
            other => panic!("{other} is not in this test"),
        }
        let (messages, closed) = drain(ws).await;
        assert!(closed, "{venue}: no close frame");
        let close = messages.iter().find_map(|m| match m {
            Message::Close(frame) => frame.clone(),
            _ => None,
        });
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
        // The earlier clients' waits count against the later ones, so only the first is timed.
        if *venue == Venue::Binance {
            assert!(received.elapsed() >= Duration::from_millis(50), "closed too soon");
        }
    }
    eventually("no open connections", || sim.handle().stats().connections_open == 0).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_and_oversized_frames_arrive_on_every_connection() {
    let sim = start().await;
    let mut clients = Vec::new();
    for venue in Venue::ALL {
        clients.push(connect(&sim, venue).await);
    }
    let n = Venue::ALL.len();
    eventually("a connection per venue", || sim.handle().stats().connections_open == n as u64).await;
    assert_eq!(sim.handle().send_malformed_frame(), n);
    assert_eq!(sim.handle().send_oversized_frame(), n);
    for ws in &mut clients {
        let (mut malformed, mut oversized) = (false, false);
        while !(malformed && oversized) {
            let text = next_text(ws).await;
            match serde_json::from_str::<Value>(&text) {
                Err(_) => malformed = true,
                Ok(_) if text.len() == 2 << 20 => oversized = true,
                Ok(_) => {} // Kraken's systemStatus, Kraken v2's status
            }
        }
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_are_refused_with_404() {
    let sim = start().await;
    for path in ["/nasdaq", "/", "/binance/extra", "/Binance"] {
        match connect_async(format!("ws://{}{path}", sim.addr())).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 404, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    assert_eq!(sim.handle().stats().connections_accepted, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_sent_record_and_frame_count_match_what_clients_received() {
    let sim = start().await;
    let handle = sim.handle();
    let mut clients = Vec::new();
    for (venue, symbol) in [(Venue::Binance, "BTCUSDT"), (Venue::Coinbase, "BTC-USD")] {
        let mut ws = connect(&sim, venue).await;
        ws.send(Message::text(subscribe_request(venue, symbol))).await.unwrap();
        clients.push((venue, symbol, ws, IdSet::new(), 0));
    }
    // Read a while, then drop: everything written before the drop still arrives, then the streams end.
    for (venue, _, ws, ids, frames) in &mut clients {
        while ids.len() < 20 {
            let frame = next_json(ws).await;
            *frames += 1;
            if is_trade(*venue, &frame) {
                ids.insert(trade_id(*venue, &frame));
            }
        }
    }
    handle.drop_connections();
    let mut total_frames = 0;
    for (venue, symbol, mut ws, mut ids, frames) in clients {
        let (messages, _) = drain(&mut ws).await;
        for message in &messages {
            let Message::Text(text) = message else { continue };
            let frame: Value = serde_json::from_str(text).unwrap();
            if is_trade(venue, &frame) {
                ids.insert(trade_id(venue, &frame));
            }
        }
        total_frames += frames + messages.iter().filter(|m| m.is_text()).count() as u64;
        assert_eq!(handle.sent_ids(venue, symbol), ids, "{venue}");
        assert_eq!(ids.ranges().count(), 1, "{venue}: {ids:?}");
    }
    eventually("no open connections", || handle.stats().connections_open == 0).await;
    assert_eq!(handle.stats().frames_sent, total_frames);
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_client_messages_get_venue_errors_and_the_connection_carries_on() {
    let sim = start().await;
    let mut ws = connect(&sim, Venue::Binance).await;
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"]["code"], 2);
    ws.send(Message::text(r#"{"method":"SUBSCRIBE","params":["btcusdt@depth"],"id":5}"#)).await.unwrap();
    let answer = next_json(&mut ws).await;
    assert_eq!((answer["error"]["code"].as_u64(), &answer["id"]), (Some(2), &json!(5)), "{answer}");
    ws.send(Message::binary(&b"\xff\xfe"[..])).await.unwrap();
    assert!(next_json(&mut ws).await.get("error").is_some());
    assert_eq!(subscribe(&mut ws, Venue::Binance, "BTCUSDT").await, json!({"result": null, "id": 7}));
    next_trade(&mut ws, Venue::Binance).await;

    let mut ws = connect(&sim, Venue::Coinbase).await;
    ws.send(Message::text(r#"{"type":"subscribe","channels":["ticker"],"product_ids":["BTC-USD"]}"#)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "error");
    subscribe(&mut ws, Venue::Coinbase, "BTC-USD").await;
    next_trade(&mut ws, Venue::Coinbase).await;

    let mut ws = connect(&sim, Venue::Kraken).await;
    next_json(&mut ws).await; // systemStatus
    ws.send(Message::text("[1,2]")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["event"], "error");
    subscribe(&mut ws, Venue::Kraken, "XBT/USD").await;
    next_trade(&mut ws, Venue::Kraken).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_connections_and_stops_listening() {
    let sim = start().await;
    let addr = sim.addr();
    let mut ws = connect(&sim, Venue::Coinbase).await;
    subscribe(&mut ws, Venue::Coinbase, "BTC-USD").await;
    next_trade(&mut ws, Venue::Coinbase).await;
    // A client that connected but never sent its upgrade request does not hold shutdown up.
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // for the accept loop to take it
    let stats = tokio::time::timeout(WAIT, sim.shutdown()).await.expect("shutdown hung");
    assert_eq!((stats.connections_accepted, stats.connections_open), (1, 0));
    drain(&mut ws).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn bad_config_is_refused() {
    for rate in [-1.0, f64::NAN, f64::INFINITY] {
        let config = FeedSimConfig { trades_per_second: rate, ..config() };
        assert!(matches!(FeedSim::start(config).await, Err(FeedSimError::Config(_))));
    }
    let taken = start().await;
    let config = FeedSimConfig { bind: taken.addr(), ..config() };
    assert!(matches!(FeedSim::start(config).await, Err(FeedSimError::Bind { .. })));
    taken.shutdown().await;
}

/// Each newer venue: its subscribe answer, trades of the symbol with consecutive ids, and its
/// application keep-alive answered in its own words.
#[tokio::test]
async fn newer_venues_ack_send_trades_and_answer_their_keepalives() {
    let sim = start().await;
    let cases = [
        (Venue::Okx, "BTC-USDT", "ping"),
        (Venue::Bybit, "BTCUSDT", r#"{"op":"ping","req_id":"p1"}"#),
        (Venue::Bitstamp, "btcusd", r#"{"event":"bts:heartbeat"}"#),
        (Venue::KrakenV2, "BTC/USD", r#"{"method":"ping","req_id":42}"#),
    ];
    for (venue, symbol, ping) in cases {
        let mut ws = connect(&sim, venue).await;
        let ack = subscribe(&mut ws, venue, symbol).await;
        assert_newer_ack(venue, symbol, &ack);
        if venue == Venue::KrakenV2 {
            // The symbol's first subscription: nothing traded yet, an empty snapshot.
            let snapshot = next_trade(&mut ws, venue).await;
            assert_eq!(snapshot, json!({"channel": "trade", "type": "snapshot", "data": []}));
            assert_eq!(ack["result"]["snapshot"], true, "{ack}");
        }
        let first = newer_trade_ids(venue, &next_trade(&mut ws, venue).await);
        let second = newer_trade_ids(venue, &next_trade(&mut ws, venue).await);
        assert_eq!(second[0], first.last().unwrap() + 1, "{venue}");
        ws.send(Message::text(ping)).await.unwrap();
        assert_newer_pong(venue, &next_answer(&mut ws, venue).await);
    }
    sim.shutdown().await;
}

/// The subscribe answer of OKX, Bybit, Bitstamp or Kraken v2 to the request of [`subscribe`].
fn assert_newer_ack(venue: Venue, symbol: &str, ack: &Value) {
    match venue {
        Venue::Okx => {
            assert_eq!(ack["event"], "subscribe", "{ack}");
            assert_eq!(ack["arg"], json!({"channel": "trades", "instId": symbol}));
            assert!(ack["connId"].is_string(), "{ack}");
        }
        Venue::Bybit => {
            assert_eq!((&ack["success"], &ack["op"], &ack["req_id"]), (&json!(true), &json!("subscribe"), &json!("r1")))
        }
        Venue::Bitstamp => assert_eq!(
            ack,
            &json!({"event": "bts:subscription_succeeded", "channel": "live_trades_btcusd", "data": {}})
        ),
        _ => {
            assert_eq!(
                (&ack["method"], &ack["success"], &ack["req_id"]),
                (&json!("subscribe"), &json!(true), &json!(3))
            );
            assert_eq!(ack["result"]["symbol"], symbol);
        }
    }
}

/// The trade ids of an OKX, Bybit, Bitstamp or Kraken v2 trade frame, in frame order.
fn newer_trade_ids(venue: Venue, frame: &Value) -> Vec<u64> {
    let trades = match venue {
        Venue::Bitstamp => vec![frame["data"].clone()],
        _ => frame["data"].as_array().unwrap().clone(),
    };
    let id = |t: &Value| match venue {
        Venue::Okx => t["tradeId"].as_str().unwrap().parse().unwrap(),
        Venue::Bybit => t["i"].as_str().unwrap().parse().unwrap(),
        Venue::Bitstamp => t["id"].as_u64().unwrap(),
        _ => t["trade_id"].as_u64().unwrap(),
    };
    trades.iter().map(id).collect()
}

/// The next frame that is not a trade: OKX's plain `pong` as `null`, any other as JSON.
async fn next_answer(ws: &mut Client, venue: Venue) -> Value {
    loop {
        let text = next_text(ws).await;
        if venue == Venue::Okx && text == "pong" {
            return Value::Null;
        }
        let frame: Value = serde_json::from_str(&text).unwrap();
        if !is_trade(venue, &frame) {
            return frame;
        }
    }
}

/// The keep-alive answer of OKX, Bybit, Bitstamp or Kraken v2 to the pings of
/// [`newer_venues_ack_send_trades_and_answer_their_keepalives`].
fn assert_newer_pong(venue: Venue, pong: &Value) {
    match venue {
        Venue::Okx => assert_eq!(pong, &Value::Null),
        Venue::Bybit => {
            assert_eq!(
                (&pong["success"], &pong["ret_msg"], &pong["op"]),
                (&json!(true), &json!("pong"), &json!("ping"))
            );
            assert_eq!(pong["req_id"], "p1");
        }
        Venue::Bitstamp => {
            assert_eq!(pong, &json!({"event": "bts:heartbeat", "channel": "", "data": {"status": "success"}}))
        }
        _ => assert_eq!((&pong["method"], &pong["req_id"]), (&json!("pong"), &json!(42)), "{pong}"),
    }
}

/// Coinbase Advanced: `market_trades` envelopes with the maker's side, and `heartbeats` only once
/// subscribed to them; Kraken v2 greets with `status` and beats `{"channel":"heartbeat"}`.
#[tokio::test]
async fn coinbase_advanced_heartbeats_on_request_and_kraken_v2_heartbeats() {
    let sim = FeedSim::start(FeedSimConfig { kraken_heartbeat_ms: 20, ..config() }).await.unwrap();
    let mut ws = connect(&sim, Venue::CoinbaseAdvanced).await;
    let ack = subscribe(&mut ws, Venue::CoinbaseAdvanced, "ETH-USD").await;
    assert_eq!(ack["channel"], "subscriptions", "{ack}");
    assert_eq!(ack["events"][0]["subscriptions"], json!({"market_trades": ["ETH-USD"]}));
    // The product's first subscription: nothing traded yet, an empty snapshot.
    let snapshot = next_json(&mut ws).await;
    assert_eq!(snapshot["channel"], "market_trades", "{snapshot}");
    assert_eq!(snapshot["events"], json!([{"type": "snapshot", "trades": []}]));
    for _ in 0..20 {
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["channel"], "market_trades", "a heartbeat before subscribing to them: {frame}");
        assert_eq!(frame["events"][0]["type"], "update", "{frame}");
        let trade = &frame["events"][0]["trades"][0];
        assert!(trade["side"] == "BUY" || trade["side"] == "SELL", "{frame}");
        assert_eq!(trade["product_id"], "ETH-USD");
    }
    let heartbeats = json!({"type": "subscribe", "product_ids": ["ETH-USD"], "channel": "heartbeats"});
    ws.send(Message::text(heartbeats.to_string())).await.unwrap();
    let beat = loop {
        let frame = next_json(&mut ws).await;
        if frame["channel"] == "heartbeats" {
            break frame;
        }
    };
    assert!(beat["events"][0]["heartbeat_counter"].is_u64(), "{beat}");

    let mut ws = connect(&sim, Venue::KrakenV2).await;
    let status = next_json(&mut ws).await;
    assert_eq!((&status["channel"], &status["data"][0]["system"]), (&json!("status"), &json!("online")), "{status}");
    assert_eq!(next_json(&mut ws).await, json!({"channel": "heartbeat"}));
    sim.shutdown().await;
}

/// The venues that send recent trades on subscribing, and a symbol of each.
const SNAPSHOT_VENUES: [(Venue, &str); 3] =
    [(Venue::KrakenV2, "BTC/USD"), (Venue::CoinbaseAdvanced, "ETH-USD"), (Venue::Coinbase, "BTC-USD")];

/// Reads `ws`'s live trades (no snapshot) into `seen`, by id, until it holds `until`.
async fn read_live_until(ws: &mut Client, venue: Venue, seen: &mut BTreeMap<u64, Value>, until: u64) {
    while seen.last_key_value().is_none_or(|(&last, _)| last < until) {
        let frame = next_trade(ws, venue).await;
        assert!(!is_snapshot(venue, &frame), "a second snapshot: {frame}");
        seen.extend(frame_trades(venue, &frame).into_iter().map(|t| (id_of(venue, &t), t)));
    }
}

/// Subscribes the first client of a feed, which gets an empty snapshot (Coinbase Exchange: no
/// `last_match`) as nothing has traded yet; returns the live trades read after it, by id.
async fn subscribe_first(ws: &mut Client, venue: Venue, symbol: &str) -> BTreeMap<u64, Value> {
    subscribe(ws, venue, symbol).await;
    let first = next_trade(ws, venue).await;
    let mut seen = BTreeMap::new();
    if venue == Venue::Coinbase {
        assert!(!is_snapshot(venue, &first), "{first}");
        seen.insert(id_of(venue, &first), first);
    } else {
        assert!(is_snapshot(venue, &first) && frame_trades(venue, &first).is_empty(), "{venue}: {first}");
        read_live_until(ws, venue, &mut seen, 0).await;
    }
    seen
}

/// A second subscriber to a running feed first gets the snapshot: exactly the most recent trades the
/// first subscriber already received, field for field and with their ids (Kraken v2 oldest first,
/// Coinbase Advanced newest first, Coinbase Exchange the newest alone as `last_match`), then the
/// live trades that follow them.
#[tokio::test]
async fn a_second_subscriber_first_gets_the_most_recent_trades_the_first_received() {
    let sim = start().await;
    for (venue, symbol) in SNAPSHOT_VENUES {
        let mut a = connect(&sim, venue).await;
        let mut seen = subscribe_first(&mut a, venue, symbol).await;
        let oldest = *seen.first_key_value().unwrap().0;
        read_live_until(&mut a, venue, &mut seen, oldest + feed::RECENT_TRADES as u64 + 20).await;

        let mut b = connect(&sim, venue).await;
        subscribe(&mut b, venue, symbol).await;
        let snapshot = next_trade(&mut b, venue).await;
        assert!(is_snapshot(venue, &snapshot), "{venue}: {snapshot}");
        let trades = frame_trades(venue, &snapshot);
        let mut ids: Vec<u64> = trades.iter().map(|t| id_of(venue, t)).collect();
        if venue == Venue::CoinbaseAdvanced {
            ids.reverse();
        }
        let want_len = if venue == Venue::Coinbase { 1 } else { feed::RECENT_TRADES };
        assert_eq!(ids.len(), want_len, "{venue}: {snapshot}");
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{venue}: {ids:?}");
        let newest = *ids.last().unwrap();
        // `a` may not have read as far yet; then what it had received up to the snapshot's newest.
        read_live_until(&mut a, venue, &mut seen, newest).await;
        let received: Vec<u64> = seen.keys().copied().filter(|&id| id <= newest).collect();
        assert!(received.windows(2).all(|w| w[1] == w[0] + 1), "{venue}: {received:?}");
        assert_eq!(ids, received[received.len() - want_len..], "{venue}");
        for trade in &trades {
            let mut want = seen[&id_of(venue, trade)].clone();
            if venue == Venue::Coinbase {
                want["type"] = json!("last_match");
            }
            assert_eq!(trade, &want, "{venue}");
        }
        // Then the live trades, from the one after the snapshot's newest.
        let next = next_trade(&mut b, venue).await;
        assert!(!is_snapshot(venue, &next), "{venue}: {next}");
        assert_eq!(id_of(venue, &frame_trades(venue, &next)[0]), newest + 1, "{venue}: {next}");
        let sent = sim.handle().sent_ids(venue, symbol);
        assert!(ids.iter().all(|&id| sent.contains(id)), "{venue}");
    }
    sim.shutdown().await;
}

/// A client back after a while gets, in the snapshot, trades it already had and the trades made
/// while it was away, which then count as sent.
#[tokio::test]
async fn a_returning_client_recovers_trades_made_while_it_was_away() {
    // 100 trades/s: 50 trades take 500 ms, so a short absence leaves an overlap.
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 100.0, ..config() }).await.unwrap();
    let handle = sim.handle();
    for (venue, symbol) in SNAPSHOT_VENUES {
        let mut ws = connect(&sim, venue).await;
        let mut seen = subscribe_first(&mut ws, venue, symbol).await;
        let oldest = *seen.first_key_value().unwrap().0;
        read_live_until(&mut ws, venue, &mut seen, oldest + 10).await;
        drop(ws);
        eventually("the connection to close", || handle.stats().connections_open == 0).await;
        let sent_before = handle.sent_ids(venue, symbol);
        let last_sent = sent_before.ranges().last().map(|r| *r.end()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut ws = connect(&sim, venue).await;
        subscribe(&mut ws, venue, symbol).await;
        let snapshot = next_trade(&mut ws, venue).await;
        assert!(is_snapshot(venue, &snapshot), "{venue}: {snapshot}");
        let ids: IdSet = frame_trades(venue, &snapshot).iter().map(|t| id_of(venue, t)).collect();
        let (first, newest) = ids.ranges().next().map(|r| r.into_inner()).unwrap();
        assert_eq!(ids.ranges().count(), 1, "{venue}: {ids:?}");
        // Trades made while nobody was subscribed, never sent until now.
        assert!(newest > last_sent && !sent_before.contains(newest), "{venue}: {ids:?} after {last_sent}");
        if venue != Venue::Coinbase {
            // And trades the client already had, which it drops by id.
            assert!(first <= last_sent, "{venue}: {ids:?} after {last_sent}");
        }
        eventually("the snapshot to count as sent", || {
            let sent = handle.sent_ids(venue, symbol);
            (first..=newest).all(|id| sent.contains(id))
        })
        .await;
        drop(ws);
        eventually("the connection to close", || handle.stats().connections_open == 0).await;
    }
    sim.shutdown().await;
}

/// Kraken v2's `"snapshot": false` gets no snapshot, and its answer says so.
#[tokio::test]
async fn kraken_v2_sends_no_snapshot_when_asked_not_to() {
    let sim = start().await;
    let mut a = connect(&sim, Venue::KrakenV2).await;
    let mut seen = subscribe_first(&mut a, Venue::KrakenV2, "ETH/USD").await;
    let oldest = *seen.first_key_value().unwrap().0;
    read_live_until(&mut a, Venue::KrakenV2, &mut seen, oldest + 20).await;

    let mut b = connect(&sim, Venue::KrakenV2).await;
    let request =
        json!({"method": "subscribe", "params": {"channel": "trade", "symbol": ["ETH/USD"], "snapshot": false}});
    b.send(Message::text(request.to_string())).await.unwrap();
    let ack = loop {
        let frame = next_json(&mut b).await;
        if frame["channel"] != "status" {
            break frame;
        }
    };
    assert_eq!((&ack["method"], &ack["success"]), (&json!("subscribe"), &json!(true)), "{ack}");
    assert_eq!(ack["result"]["snapshot"], false, "{ack}");
    for _ in 0..5 {
        let frame = next_trade(&mut b, Venue::KrakenV2).await;
        assert_eq!(frame["type"], "update", "{frame}");
    }
    sim.shutdown().await;
}
