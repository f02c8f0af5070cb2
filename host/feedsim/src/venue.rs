//! The venues' wire formats: trade frames, subscription requests and their answers, keep-alive
//! answers and heartbeats, and the frames the fault injections send. Pure functions over text, so
//! each format is testable alone.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::Venue;
use super::feed::{Feed, Recent, Trade, now_us};

/// What a client's text message asks for.
#[derive(Debug, PartialEq)]
pub(super) enum Request {
    /// Subscribe to trades of these symbols (venue spelling: `BTCUSDT`, `BTC-USD`, `XBT/USD`,
    /// `BTC-USDT`, `btcusd`, `BTC/USD`).
    Subscribe {
        symbols: Vec<String>,
        /// Binance's `id`, Kraken's `reqid`, Bybit's and Kraken v2's `req_id`, echoed in the answer
        /// (`null` when absent).
        id: Value,
        /// Whether to send the venue's snapshot of recent trades (Kraken v2's `snapshot` param, true
        /// unless it says false; always true elsewhere, where only some venues have one).
        snapshot: bool,
    },
    /// Coinbase Advanced's subscription to the `heartbeats` channel.
    Heartbeats,
    /// An application-level keep-alive: Kraken's `{"event":"ping"}`, OKX's text `ping`, Bybit's
    /// `{"op":"ping"}`, Kraken v2's `{"method":"ping"}`, Bitstamp's `{"event":"bts:heartbeat"}`.
    Ping { reqid: Value },
    /// Not understood: answer with this venue error frame.
    Invalid(String),
}

/// What the answers of one connection carry about it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Peer {
    /// The connection's id (Kraken's `connectionID`, OKX's `connId`, Bybit's `conn_id`).
    pub connection_id: u64,
    /// Coinbase Advanced: subscribed to `heartbeats`.
    pub heartbeats: bool,
}

/// Parses one client message in `venue`'s request format.
pub(super) fn parse_request(venue: Venue, peer: &Peer, text: &str) -> Request {
    // OKX's keep-alive is plain text, not JSON.
    if venue == Venue::Okx && text.trim() == "ping" {
        return Request::Ping { reqid: Value::Null };
    }
    let Ok(message) = serde_json::from_str::<Value>(text) else {
        return Request::Invalid(error_frame(venue, peer, &Value::Null, "Malformed request: invalid JSON"));
    };
    let result = match venue {
        Venue::Binance => parse_binance(&message),
        Venue::Coinbase => parse_coinbase(&message),
        Venue::Kraken => parse_kraken(&message),
        Venue::Okx => parse_okx(&message),
        Venue::Bybit => parse_bybit(&message),
        Venue::Bitstamp => parse_bitstamp(&message),
        Venue::KrakenV2 => parse_kraken_v2(&message),
        Venue::CoinbaseAdvanced => parse_coinbase_advanced(&message),
    };
    result.unwrap_or_else(|reason| Request::Invalid(error_frame(venue, peer, request_id(venue, &message), &reason)))
}

fn request_id(venue: Venue, message: &Value) -> &Value {
    let key = match venue {
        Venue::Kraken => "reqid",
        Venue::Bybit | Venue::KrakenV2 => "req_id",
        _ => "id",
    };
    message.get(key).unwrap_or(&Value::Null)
}
/// `{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}`
fn parse_binance(message: &Value) -> Result<Request, String> {
    if message.get("method").and_then(Value::as_str) != Some("SUBSCRIBE") {
        return Err("Invalid request: only method SUBSCRIBE is simulated".into());
    }
    let params = message.get("params").and_then(Value::as_array).ok_or("Invalid request: params must be an array")?;
    let streams: Vec<&str> =
        params.iter().map(Value::as_str).collect::<Option<_>>().ok_or("Invalid request: params must be strings")?;
    let symbols = binance_streams(streams)?;
    Ok(Request::Subscribe { symbols, id: request_id(Venue::Binance, message).clone(), snapshot: true })
}

/// Stream names (`btcusdt@aggTrade`) to symbols (`BTCUSDT`); only aggTrade streams are simulated.
pub(super) fn binance_streams<'a>(streams: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    streams
        .into_iter()
        .map(|stream| match stream.split_once('@') {
            Some((symbol, "aggTrade")) if valid_symbol(symbol) => Ok(symbol.to_ascii_uppercase()),
            _ => Err(format!("Invalid request: stream {stream:?} is not <symbol>@aggTrade")),
        })
        .collect()
}

/// `{"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches"]}`; a channel may also be
/// `{"name":"matches","product_ids":[...]}`.
fn parse_coinbase(message: &Value) -> Result<Request, String> {
    if message.get("type").and_then(Value::as_str) != Some("subscribe") {
        return Err("Type has to be subscribe".into());
    }
    let channels = message.get("channels").and_then(Value::as_array).ok_or("channels must be an array")?;
    let mut products = message.get("product_ids").map(strings).transpose()?.unwrap_or_default();
    let mut matches = false;
    for channel in channels {
        match channel {
            Value::String(name) => matches |= name == "matches",
            Value::Object(object) if object.get("name").and_then(Value::as_str) == Some("matches") => {
                matches = true;
                products.extend(object.get("product_ids").map(strings).transpose()?.unwrap_or_default());
            }
            _ => {}
        }
    }
    if !matches {
        return Err("only the matches channel is simulated".into());
    }
    if products.is_empty() {
        return Err("product_ids must not be empty".into());
    }
    check_symbols(&products)?;
    Ok(Request::Subscribe { symbols: products, id: Value::Null, snapshot: true })
}

/// `{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"trade"}}` or `{"event":"ping"}`.
fn parse_kraken(message: &Value) -> Result<Request, String> {
    let reqid = request_id(Venue::Kraken, message).clone();
    match message.get("event").and_then(Value::as_str) {
        Some("ping") => Ok(Request::Ping { reqid }),
        Some("subscribe") => {
            let name = message.pointer("/subscription/name").and_then(Value::as_str);
            if name != Some("trade") {
                return Err("Subscription name invalid".into());
            }
            let pairs = message.get("pair").map(strings).transpose()?.unwrap_or_default();
            if pairs.is_empty() {
                return Err("Pair(s) not found".into());
            }
            check_symbols(&pairs)?;
            Ok(Request::Subscribe { symbols: pairs, id: reqid, snapshot: true })
        }
        _ => Err("Unsupported event".into()),
    }
}

/// `{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]}`.
fn parse_okx(message: &Value) -> Result<Request, String> {
    if message.get("op").and_then(Value::as_str) != Some("subscribe") {
        return Err("Invalid request: only op subscribe is simulated".into());
    }
    let args = message.get("args").and_then(Value::as_array).ok_or("Invalid request: args must be an array")?;
    let symbols = args
        .iter()
        .map(|arg| match (arg.get("channel").and_then(Value::as_str), arg.get("instId").and_then(Value::as_str)) {
            (Some("trades"), Some(inst_id)) => Ok(inst_id.to_owned()),
            _ => Err(format!("Wrong URL or channel:{arg}, only trades with an instId is simulated")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if symbols.is_empty() {
        return Err("Invalid request: args must not be empty".into());
    }
    check_symbols(&symbols)?;
    Ok(Request::Subscribe { symbols, id: Value::Null, snapshot: true })
}

/// `{"op":"subscribe","args":["publicTrade.BTCUSDT"]}` or `{"op":"ping"}`.
fn parse_bybit(message: &Value) -> Result<Request, String> {
    let id = request_id(Venue::Bybit, message).clone();
    match message.get("op").and_then(Value::as_str) {
        Some("ping") => Ok(Request::Ping { reqid: id }),
        Some("subscribe") => {
            let topics = message.get("args").map(strings).transpose()?.unwrap_or_default();
            let symbols = topics
                .iter()
                .map(|t| t.strip_prefix("publicTrade.").map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("error:handler not found,topics:{}", topics.join(",")))?;
            if symbols.is_empty() {
                return Err("error:args must not be empty".into());
            }
            check_symbols(&symbols)?;
            Ok(Request::Subscribe { symbols, id, snapshot: true })
        }
        _ => Err("error:only op subscribe and ping are simulated".into()),
    }
}

/// `{"event":"bts:subscribe","data":{"channel":"live_trades_btcusd"}}` or `{"event":"bts:heartbeat"}`.
fn parse_bitstamp(message: &Value) -> Result<Request, String> {
    match message.get("event").and_then(Value::as_str) {
        Some("bts:heartbeat") => Ok(Request::Ping { reqid: Value::Null }),
        Some("bts:subscribe") => {
            let channel = message.pointer("/data/channel").and_then(Value::as_str).unwrap_or_default();
            match channel.strip_prefix("live_trades_") {
                Some(pair) if valid_symbol(pair) => {
                    Ok(Request::Subscribe { symbols: vec![pair.to_owned()], id: Value::Null, snapshot: true })
                }
                _ => Err("Bad subscription string.".into()),
            }
        }
        _ => Err("Bad event.".into()),
    }
}

/// `{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"],"snapshot":false}}` (the
/// `snapshot` param is optional) or `{"method":"ping"}`.
fn parse_kraken_v2(message: &Value) -> Result<Request, String> {
    let id = request_id(Venue::KrakenV2, message).clone();
    match message.get("method").and_then(Value::as_str) {
        Some("ping") => Ok(Request::Ping { reqid: id }),
        Some("subscribe") => {
            if message.pointer("/params/channel").and_then(Value::as_str) != Some("trade") {
                return Err("Channel not supported".into());
            }
            let symbols = message.pointer("/params/symbol").map(strings).transpose()?.unwrap_or_default();
            if symbols.is_empty() {
                return Err("Missing symbol".into());
            }
            check_symbols(&symbols)?;
            // The venue's default: the last 50 trades first.
            let snapshot = match message.pointer("/params/snapshot") {
                None => true,
                Some(value) => value.as_bool().ok_or("snapshot must be a boolean")?,
            };
            Ok(Request::Subscribe { symbols, id, snapshot })
        }
        _ => Err("Method not supported".into()),
    }
}

/// `{"type":"subscribe","product_ids":["BTC-USD"],"channel":"market_trades"}` (or `heartbeats`).
fn parse_coinbase_advanced(message: &Value) -> Result<Request, String> {
    if message.get("type").and_then(Value::as_str) != Some("subscribe") {
        return Err("Type has to be subscribe".into());
    }
    let products = message.get("product_ids").map(strings).transpose()?.unwrap_or_default();
    check_symbols(&products)?;
    match message.get("channel").and_then(Value::as_str) {
        Some("heartbeats") => Ok(Request::Heartbeats),
        Some("market_trades") if !products.is_empty() => {
            Ok(Request::Subscribe { symbols: products, id: Value::Null, snapshot: true })
        }
        Some("market_trades") => Err("product_ids must not be empty".into()),
        _ => Err("only the market_trades and heartbeats channels are simulated".into()),
    }
}

fn strings(value: &Value) -> Result<Vec<String>, String> {
    let array = value.as_array().ok_or("expected an array of strings")?;
    array.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(|| "expected an array of strings".into())).collect()
}

fn check_symbols(symbols: &[String]) -> Result<(), String> {
    match symbols.iter().find(|s| !valid_symbol(s)) {
        Some(bad) => Err(format!("invalid symbol {bad:?}")),
        None => Ok(()),
    }
}

/// Symbols are short and plain, so they never need escaping inside frames.
fn valid_symbol(symbol: &str) -> bool {
    (1..=32).contains(&symbol.len()) && symbol.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_.".contains(&b))
}

/// The venue's error answer to a request it could not serve.
fn error_frame(venue: Venue, peer: &Peer, id: &Value, message: &str) -> String {
    let now = rfc3339_micros(now_us());
    match venue {
        Venue::Binance => json!({"error": {"code": 2, "msg": message}, "id": id}),
        Venue::Coinbase => json!({"type": "error", "message": "Failed to subscribe", "reason": message}),
        Venue::Kraken if id.is_null() => json!({"event": "error", "errorMessage": message}),
        Venue::Kraken => json!({"event": "error", "errorMessage": message, "reqid": id}),
        Venue::Okx => json!({"event": "error", "code": "60012", "msg": message, "connId": conn_id(peer)}),
        Venue::Bybit => json!({
            "success": false, "ret_msg": message, "conn_id": conn_id(peer), "req_id": req_id(id), "op": "subscribe",
        }),
        Venue::Bitstamp => json!({"event": "bts:error", "channel": "", "data": {"code": null, "message": message}}),
        Venue::KrakenV2 => with_req_id(
            json!({"error": message, "method": "subscribe", "success": false, "time_in": now, "time_out": now}),
            id,
        ),
        Venue::CoinbaseAdvanced => json!({"type": "error", "message": message}),
    }
    .to_string()
}

/// The connection id as OKX and Bybit write theirs: a short hex string.
fn conn_id(peer: &Peer) -> String {
    format!("{:08x}", peer.connection_id.wrapping_mul(0x9e37_79b9) & 0xffff_ffff)
}

/// Bybit echoes `req_id` as given, and `""` when there was none.
fn req_id(id: &Value) -> Value {
    if id.is_null() { json!("") } else { id.clone() }
}

/// Adds Kraken v2's `req_id` when the request had one.
fn with_req_id(mut answer: Value, id: &Value) -> Value {
    if !id.is_null() {
        answer["req_id"] = id.clone();
    }
    answer
}

/// The answers to a subscription: `new` are the feeds just subscribed, `all` every symbol the
/// connection is subscribed to now (Coinbase lists them all); `snapshot` is whether a snapshot was
/// asked for (Kraken v2 says so in its answer).
pub(super) fn subscribe_acks(
    venue: Venue,
    peer: &Peer,
    id: &Value,
    snapshot: bool,
    new: &[&Feed],
    all: &[String],
) -> Vec<String> {
    let now = rfc3339_micros(now_us());
    let one_per_feed =
        |ack: &dyn Fn(&Feed) -> Value| -> Vec<String> { new.iter().map(|feed| ack(feed).to_string()).collect() };
    match venue {
        Venue::Binance => vec![json!({"result": null, "id": id}).to_string()],
        Venue::Coinbase => {
            vec![json!({"type": "subscriptions", "channels": [{"name": "matches", "product_ids": all}]}).to_string()]
        }
        Venue::Kraken => one_per_feed(&|feed| {
            let mut ack = json!({
                "channelID": feed.channel_id,
                "channelName": "trade",
                "event": "subscriptionStatus",
                "pair": feed.symbol,
                "status": "subscribed",
                "subscription": {"name": "trade"},
            });
            if !id.is_null() {
                ack["reqid"] = id.clone();
            }
            ack
        }),
        Venue::Okx => one_per_feed(
            &|feed| json!({"event": "subscribe", "arg": {"channel": "trades", "instId": feed.symbol}, "connId": conn_id(peer)}),
        ),
        Venue::Bybit => vec![
            json!({"success": true, "ret_msg": "", "conn_id": conn_id(peer), "req_id": req_id(id), "op": "subscribe"})
                .to_string(),
        ],
        Venue::Bitstamp => one_per_feed(
            &|feed| json!({"event": "bts:subscription_succeeded", "channel": format!("live_trades_{}", feed.symbol), "data": {}}),
        ),
        Venue::KrakenV2 => one_per_feed(&|feed| {
            with_req_id(
                json!({
                    "method": "subscribe",
                    "result": {"channel": "trade", "snapshot": snapshot, "symbol": feed.symbol},
                    "success": true,
                    "time_in": now,
                    "time_out": now,
                }),
                id,
            )
        }),
        Venue::CoinbaseAdvanced => vec![coinbase_advanced_subscriptions(peer, all)],
    }
}

/// Coinbase Advanced's `subscriptions` message: every channel and product of the connection.
pub(super) fn coinbase_advanced_subscriptions(peer: &Peer, products: &[String]) -> String {
    let mut subscriptions = json!({});
    if !products.is_empty() {
        subscriptions["market_trades"] = json!(products);
    }
    if peer.heartbeats {
        subscriptions["heartbeats"] = json!(["heartbeats"]);
    }
    json!({
        "channel": "subscriptions",
        "client_id": "",
        "timestamp": rfc3339_micros(now_us()),
        "sequence_num": 0,
        "events": [{"subscriptions": subscriptions}],
    })
    .to_string()
}

/// The answer to the venue's application-level ping.
pub(super) fn pong(venue: Venue, peer: &Peer, reqid: &Value) -> String {
    let now = rfc3339_micros(now_us());
    match venue {
        Venue::Kraken if reqid.is_null() => json!({"event": "pong"}).to_string(),
        Venue::Kraken => json!({"event": "pong", "reqid": reqid}).to_string(),
        Venue::Okx => "pong".into(),
        Venue::Bybit => json!({
            "success": true, "ret_msg": "pong", "conn_id": conn_id(peer), "req_id": req_id(reqid), "op": "ping",
        })
        .to_string(),
        Venue::Bitstamp => json!({"event": "bts:heartbeat", "channel": "", "data": {"status": "success"}}).to_string(),
        Venue::KrakenV2 => with_req_id(json!({"method": "pong", "time_in": now, "time_out": now}), reqid).to_string(),
        // These venues' requests never parse as a ping.
        Venue::Binance | Venue::Coinbase | Venue::CoinbaseAdvanced => String::new(),
    }
}

/// What the venue sends first on every connection, if anything.
pub(super) fn greeting(venue: Venue, peer: &Peer) -> Option<String> {
    let id = peer.connection_id;
    match venue {
        Venue::Kraken => Some(
            json!({"connectionID": id, "event": "systemStatus", "status": "online", "version": "1.9.0"}).to_string(),
        ),
        Venue::KrakenV2 => Some(
            json!({
                "channel": "status",
                "type": "update",
                "data": [{"api_version": "v2", "connection_id": id, "system": "online", "version": "2.0.0"}],
            })
            .to_string(),
        ),
        _ => None,
    }
}

/// The venue's periodic heartbeat, the `n`th of the connection; `None` for venues that send none
/// (or, on Coinbase Advanced, until the connection subscribes to `heartbeats`).
pub(super) fn heartbeat(venue: Venue, peer: &Peer, n: u64) -> Option<String> {
    match venue {
        Venue::Kraken => Some(r#"{"event":"heartbeat"}"#.into()),
        Venue::KrakenV2 => Some(r#"{"channel":"heartbeat"}"#.into()),
        Venue::CoinbaseAdvanced if peer.heartbeats => {
            let now = rfc3339_micros(now_us());
            Some(
                json!({
                    "channel": "heartbeats",
                    "client_id": "",
                    "timestamp": now,
                    "sequence_num": n,
                    "events": [{"current_time": now, "heartbeat_counter": n}],
                })
                .to_string(),
            )
        }
        _ => None,
    }
}

/// The venue's notice that the server is going away.
pub(super) fn shutdown_notice(venue: Venue, peer: &Peer, now_ms: u64) -> String {
    match venue {
        Venue::Binance => format!(r#"{{"e":"serverShutdown","E":{now_ms}}}"#),
        Venue::Coinbase | Venue::CoinbaseAdvanced => {
            r#"{"type":"error","message":"server shutting down for maintenance"}"#.into()
        }
        Venue::Kraken => r#"{"event":"systemStatus","status":"maintenance"}"#.into(),
        Venue::Okx => json!({
            "event": "notice",
            "code": "64008",
            "msg": "The connection will soon be closed for a service upgrade. Please reconnect.",
            "connId": conn_id(peer),
        })
        .to_string(),
        // Bybit documents no notice; the simulator's own, in Bybit's answer shape.
        Venue::Bybit => r#"{"op":"notice","ret_msg":"server shutting down for maintenance"}"#.into(),
        Venue::Bitstamp => r#"{"event":"bts:request_reconnect","channel":"","data":""}"#.into(),
        Venue::KrakenV2 => {
            r#"{"channel":"status","type":"update","data":[{"api_version":"v2","system":"maintenance","version":"2.0.0"}]}"#
                .into()
        }
    }
}

/// A trade frame cut short: valid UTF-8, invalid JSON.
pub(super) fn malformed_frame(venue: Venue) -> &'static str {
    match venue {
        Venue::Binance => r#"{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":17000000"#,
        Venue::Coinbase => r#"{"type":"match","trade_id":12,"price":"1.0"#,
        Venue::Kraken => r#"[42,[["1.00000","0.5","1700000000.1"#,
        Venue::Okx => r#"{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","px":"1"#,
        Venue::Bybit => r#"{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":17000000"#,
        Venue::Bitstamp => r#"{"event":"trade","channel":"live_trades_btcusd","data":{"id":1,"price_str":"1"#,
        Venue::KrakenV2 => r#"{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","price":1.0"#,
        Venue::CoinbaseAdvanced => r#"{"channel":"market_trades","events":[{"type":"update","trades":[{"trade"#,
    }
}

/// A valid JSON frame of exactly `size` bytes (or the smallest such frame, if `size` is smaller),
/// of a kind the venue's decoder ignores.
pub(super) fn oversized_frame(venue: Venue, size: usize) -> String {
    let (head, tail) = match venue {
        Venue::Binance => (r#"{"stream":"feedsim@oversized","data":{"e":"oversized","pad":""#, r#""}}"#),
        Venue::Coinbase | Venue::Kraken | Venue::Okx | Venue::Bitstamp => (r#"{"event":"oversized","pad":""#, r#""}"#),
        Venue::Bybit => (r#"{"op":"oversized","pad":""#, r#""}"#),
        Venue::KrakenV2 | Venue::CoinbaseAdvanced => (r#"{"channel":"oversized","pad":""#, r#""}"#),
    };
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut frame = String::with_capacity(head.len() + pad + tail.len());
    frame.push_str(head);
    frame.extend(std::iter::repeat_n('x', pad));
    frame.push_str(tail);
    frame
}

/// What the venue sends a new subscriber of `feed` before its live trades, built from the feed's
/// `recent` trades (the same ones earlier subscribers got), and the trades it carries; `None` if the
/// venue sends nothing:
/// - Kraken v2: one `{"channel":"trade","type":"snapshot","data":[..]}`, oldest first, `data` empty
///   when there are no trades yet.
/// - Coinbase Advanced: one `market_trades` envelope with a `snapshot` event, newest first, `trades`
///   empty when there are no trades yet.
/// - Coinbase Exchange: a `last_match` of the most recent trade, nothing when there is none.
pub(super) fn snapshot<'r>(feed: &Feed, recent: &'r Recent) -> Option<(String, &'r [Trade])> {
    let (trades, decimals) = (recent.trades.as_slice(), recent.decimals);
    let mut out = String::with_capacity(96 + 200 * trades.len());
    let symbol = feed.symbol.as_str();
    // Writing to a String cannot fail.
    let _ = match feed.venue {
        Venue::KrakenV2 => kraken_v2_trades(&mut out, "snapshot", symbol, decimals, trades),
        Venue::CoinbaseAdvanced => {
            let newest_first: Vec<Trade> = trades.iter().rev().cloned().collect();
            coinbase_advanced_trades(&mut out, "snapshot", now_us(), symbol, decimals, &newest_first)
        }
        Venue::Coinbase => {
            let (newest, _) = trades.split_last()?;
            let _ = coinbase_trade(&mut out, "last_match", symbol, decimals, newest);
            return Some((out, std::slice::from_ref(newest)));
        }
        Venue::Binance | Venue::Kraken | Venue::Okx | Venue::Bybit | Venue::Bitstamp => return None,
    };
    Some((out, trades))
}

/// Renders one frame carrying `trades` (one trade on Binance, Coinbase and Bitstamp, one to three
/// elsewhere) of `feed`, whose prices have `decimals` tick decimals.
pub(super) fn trade_frame(feed: &Feed, decimals: u32, trades: &[Trade]) -> String {
    let mut out = String::with_capacity(96 + 200 * trades.len());
    let symbol = feed.symbol.as_str();
    // Writing to a String cannot fail.
    let _ = match feed.venue {
        Venue::Binance => trades.iter().try_for_each(|t| binance_trade(&mut out, symbol, t)),
        Venue::Coinbase => trades.iter().try_for_each(|t| coinbase_trade(&mut out, "match", symbol, decimals, t)),
        Venue::Kraken => kraken_trades(&mut out, feed, decimals, trades),
        Venue::Okx => okx_trades(&mut out, symbol, decimals, trades),
        Venue::Bybit => bybit_trades(&mut out, symbol, decimals, trades),
        Venue::Bitstamp => trades.iter().try_for_each(|t| bitstamp_trade(&mut out, symbol, decimals, t)),
        Venue::KrakenV2 => kraken_v2_trades(&mut out, "update", symbol, decimals, trades),
        Venue::CoinbaseAdvanced => {
            let time_us = trades.last().map_or(0, |t| t.time_us);
            coinbase_advanced_trades(&mut out, "update", time_us, symbol, decimals, trades)
        }
    };
    out
}

/// `{"arg":{..},"data":[{"instId","tradeId","px","sz","side","ts","count","source","seqId"},..]}`
fn okx_trades(out: &mut String, symbol: &str, decimals: u32, trades: &[Trade]) -> std::fmt::Result {
    write!(out, r#"{{"arg":{{"channel":"trades","instId":"{symbol}"}},"data":["#)?;
    for (i, t) in trades.iter().enumerate() {
        write!(
            out,
            concat!(
                r#"{comma}{{"instId":"{symbol}","tradeId":"{id}","px":"{price}","sz":"{size}","side":"{side}","#,
                r#""ts":"{ms}","count":"1","source":"0","seqId":{seq}}}"#,
            ),
            comma = if i == 0 { "" } else { "," },
            symbol = symbol,
            id = t.id,
            price = fixed(t.price_e8, decimals),
            size = fixed(t.size_e8, 8),
            side = if t.taker_buys { "buy" } else { "sell" },
            ms = t.time_us / 1_000,
            seq = t.sequence,
        )?;
    }
    out.push_str("]}");
    Ok(())
}

/// `{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":..,"data":[{"T","s","S","v","p","L","i","BT"},..]}`
fn bybit_trades(out: &mut String, symbol: &str, decimals: u32, trades: &[Trade]) -> std::fmt::Result {
    let ts = trades.last().map_or(0, |t| t.time_us / 1_000);
    write!(out, r#"{{"topic":"publicTrade.{symbol}","type":"snapshot","ts":{ts},"data":["#)?;
    for (i, t) in trades.iter().enumerate() {
        write!(
            out,
            r#"{comma}{{"T":{ms},"s":"{symbol}","S":"{side}","v":"{size}","p":"{price}","L":"{tick}","i":"{id}","BT":false}}"#,
            comma = if i == 0 { "" } else { "," },
            ms = t.time_us / 1_000,
            symbol = symbol,
            side = if t.taker_buys { "Buy" } else { "Sell" },
            size = fixed(t.size_e8, 8),
            price = fixed(t.price_e8, decimals),
            tick = if t.taker_buys { "PlusTick" } else { "MinusTick" },
            id = t.id,
        )?;
    }
    out.push_str("]}");
    Ok(())
}

/// `{"event":"trade","channel":"live_trades_btcusd","data":{..}}`; Bitstamp repeats the decimals as
/// JSON numbers beside the exact `_str` forms.
fn bitstamp_trade(out: &mut String, pair: &str, decimals: u32, t: &Trade) -> std::fmt::Result {
    let (price, amount) = (fixed(t.price_e8, decimals), fixed(t.size_e8, 8));
    write!(
        out,
        concat!(
            r#"{{"data":{{"id":{id},"timestamp":"{secs}","amount":{amount},"amount_str":"{amount}","#,
            r#""price":{price},"price_str":"{price}","type":{kind},"microtimestamp":"{micros}","#,
            r#""buy_order_id":{buy},"sell_order_id":{sell}}},"channel":"live_trades_{pair}","event":"trade"}}"#,
        ),
        id = t.id,
        secs = t.time_us / 1_000_000,
        amount = amount,
        price = price,
        kind = if t.taker_buys { 0 } else { 1 },
        micros = t.time_us,
        buy = (t.taker_order as u64) >> 14,
        sell = (t.maker_order as u64) >> 14,
        pair = pair,
    )
}

/// `{"channel":"trade","type":"update","data":[{"symbol","side","price","qty","ord_type","trade_id","timestamp"},..]}`
/// with `price` and `qty` as JSON numbers; `kind` is `update` or `snapshot`, which share the schema.
fn kraken_v2_trades(out: &mut String, kind: &str, symbol: &str, decimals: u32, trades: &[Trade]) -> std::fmt::Result {
    write!(out, r#"{{"channel":"trade","type":"{kind}","data":["#)?;
    for (i, t) in trades.iter().enumerate() {
        write!(
            out,
            concat!(
                r#"{comma}{{"symbol":"{symbol}","side":"{side}","price":{price},"qty":{qty},"#,
                r#""ord_type":"{kind}","trade_id":{id},"timestamp":"{time}"}}"#,
            ),
            comma = if i == 0 { "" } else { "," },
            symbol = symbol,
            side = if t.taker_buys { "buy" } else { "sell" },
            price = fixed(t.price_e8, decimals),
            qty = fixed(t.size_e8, 8),
            kind = if t.market_order { "market" } else { "limit" },
            id = t.id,
            time = rfc3339_micros(t.time_us),
        )?;
    }
    out.push_str("]}");
    Ok(())
}

/// One `market_trades` envelope sent at `time_us` with one event of `kind` (`update` or `snapshot`);
/// `side` is the maker's. `sequence_num` is the highest trade sequence in it, so it never goes back.
fn coinbase_advanced_trades(
    out: &mut String,
    kind: &str,
    time_us: u64,
    symbol: &str,
    decimals: u32,
    trades: &[Trade],
) -> std::fmt::Result {
    let sequence = trades.iter().map(|t| t.sequence).max().unwrap_or(0);
    write!(
        out,
        r#"{{"channel":"market_trades","client_id":"","timestamp":"{}","sequence_num":{sequence},"events":[{{"type":"{kind}","trades":["#,
        rfc3339_micros(time_us),
    )?;
    for (i, t) in trades.iter().enumerate() {
        write!(
            out,
            r#"{comma}{{"trade_id":"{id}","product_id":"{symbol}","price":"{price}","size":"{size}","side":"{side}","time":"{time}"}}"#,
            comma = if i == 0 { "" } else { "," },
            id = t.id,
            symbol = symbol,
            price = fixed(t.price_e8, decimals),
            size = fixed(t.size_e8, 8),
            // The maker's side: a buying taker hit a resting sell.
            side = if t.taker_buys { "SELL" } else { "BUY" },
            time = rfc3339_micros(t.time_us),
        )?;
    }
    out.push_str("]}]}");
    Ok(())
}

fn binance_trade(out: &mut String, symbol: &str, t: &Trade) -> std::fmt::Result {
    let trade_ms = t.time_us / 1_000;
    let event_ms = trade_ms + t.sequence % 3;
    write!(
        out,
        concat!(
            r#"{{"stream":"{stream}@aggTrade","data":{{"e":"aggTrade","E":{event_ms},"s":"{symbol}","a":{id},"#,
            r#""p":"{price}","q":"{qty}","f":{first},"l":{last},"T":{trade_ms},"m":{maker},"M":true}}}}"#,
        ),
        stream = symbol.to_ascii_lowercase(),
        symbol = symbol,
        event_ms = event_ms,
        trade_ms = trade_ms,
        id = t.id,
        price = fixed(t.price_e8, 8),
        qty = fixed(t.size_e8, 8),
        first = t.first_trade,
        last = t.last_trade,
        maker = !t.taker_buys,
    )
}

/// A `match`, or with `kind` `last_match` the same trade again for a new subscriber.
fn coinbase_trade(out: &mut String, kind: &str, symbol: &str, decimals: u32, t: &Trade) -> std::fmt::Result {
    write!(
        out,
        concat!(
            r#"{{"type":"{kind}","trade_id":{id},"maker_order_id":"{maker}","taker_order_id":"{taker}","#,
            r#""side":"{side}","size":"{size}","price":"{price}","product_id":"{symbol}","#,
            r#""sequence":{seq},"time":"{time}"}}"#,
        ),
        kind = kind,
        id = t.id,
        maker = uuid(t.maker_order),
        taker = uuid(t.taker_order),
        // Coinbase's side is the maker's: a buying taker hit a resting sell.
        side = if t.taker_buys { "sell" } else { "buy" },
        size = fixed(t.size_e8, 8),
        price = fixed(t.price_e8, decimals),
        symbol = symbol,
        seq = t.sequence,
        time = rfc3339_micros(t.time_us),
    )
}

fn kraken_trades(out: &mut String, feed: &Feed, decimals: u32, trades: &[Trade]) -> std::fmt::Result {
    write!(out, "[{},[", feed.channel_id)?;
    for (i, t) in trades.iter().enumerate() {
        write!(
            out,
            r#"{comma}["{price}","{volume}","{secs}.{micros:06}","{side}","{kind}",""]"#,
            comma = if i == 0 { "" } else { "," },
            price = fixed(t.price_e8, decimals.max(5)),
            volume = fixed(t.size_e8, 8),
            secs = t.time_us / 1_000_000,
            micros = t.time_us % 1_000_000,
            side = if t.taker_buys { "b" } else { "s" },
            kind = if t.market_order { "m" } else { "l" },
        )?;
    }
    write!(out, r#"],"trade","{}"]"#, feed.symbol)
}

/// A non-negative 1e-8 fixed-point value with `decimals` (≤ 8) decimals; digits beyond are dropped.
fn fixed(value_e8: i64, decimals: u32) -> String {
    let value = value_e8.unsigned_abs();
    let whole = value / 100_000_000;
    let fraction = (value % 100_000_000) / 10u64.pow(8 - decimals.min(8));
    format!("{whole}.{fraction:0width$}", width = decimals as usize)
}

fn uuid(v: u128) -> String {
    let h = format!("{v:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// `2021-04-17T16:43:37.089723Z` from microseconds since the Unix epoch.
pub(super) fn rfc3339_micros(time_us: u64) -> String {
    let secs = time_us / 1_000_000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        day_secs / 3_600,
        day_secs % 3_600 / 60,
        day_secs % 60,
        time_us % 1_000_000
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, as the host's `clock` has it; the simulator depends on no part of
/// the host).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::super::feed::Generator;
    use super::*;
    use plugin_sdk::testing::Harness;

    #[test]
    fn rfc3339_with_microseconds() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(1_618_678_417_089_723), "2021-04-17T16:53:37.089723Z");
        assert_eq!(rfc3339_micros(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(rfc3339_micros(4_107_542_399_999_999), "2100-02-28T23:59:59.999999Z");
    }

    #[test]
    fn fixed_point_and_uuid_text() {
        assert_eq!(fixed(3_700_001_000_000, 8), "37000.01000000");
        assert_eq!(fixed(3_700_001_000_000, 2), "37000.01");
        assert_eq!(fixed(1_305, 8), "0.00001305");
        assert_eq!(fixed(35_404_000_000, 5), "354.04000");
        assert_eq!(uuid(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef), "01234567-89ab-cdef-0123-456789abcdef");
    }

    /// `text` as a request from connection 7 on `venue`.
    fn request(venue: Venue, text: &str) -> Request {
        parse_request(venue, &Peer { connection_id: 7, heartbeats: false }, text)
    }

    /// A subscription to `symbols` with the request id `id` and a snapshot.
    fn subscribe(symbols: &[&str], id: Value) -> Request {
        Request::Subscribe { symbols: symbols.iter().map(|s| s.to_string()).collect(), id, snapshot: true }
    }

    #[test]
    fn subscriptions_of_each_venue() {
        assert_eq!(
            request(Venue::Binance, r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","ethbtc@aggTrade"],"id":7}"#),
            subscribe(&["BTCUSDT", "ETHBTC"], json!(7))
        );
        assert_eq!(
            request(
                Venue::Coinbase,
                r#"{"type":"subscribe","product_ids":["BTC-USD"],
                    "channels":["heartbeat",{"name":"matches","product_ids":["ETH-USD"]}]}"#
            ),
            subscribe(&["BTC-USD", "ETH-USD"], Value::Null)
        );
        assert_eq!(
            request(
                Venue::Kraken,
                r#"{"event":"subscribe","reqid":3,"pair":["XBT/USD"],"subscription":{"name":"trade"}}"#
            ),
            subscribe(&["XBT/USD"], json!(3))
        );
        assert_eq!(
            request(
                Venue::Okx,
                r#"{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"},{"channel":"trades","instId":"ETH-USDT"}]}"#
            ),
            subscribe(&["BTC-USDT", "ETH-USDT"], Value::Null)
        );
        assert_eq!(
            request(Venue::Bybit, r#"{"req_id":"a1","op":"subscribe","args":["publicTrade.BTCUSDT"]}"#),
            subscribe(&["BTCUSDT"], json!("a1"))
        );
        assert_eq!(
            request(Venue::Bitstamp, r#"{"event":"bts:subscribe","data":{"channel":"live_trades_btcusd"}}"#),
            subscribe(&["btcusd"], Value::Null)
        );
        assert_eq!(
            request(
                Venue::KrakenV2,
                r#"{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD","ETH/USD"]},"req_id":4}"#
            ),
            subscribe(&["BTC/USD", "ETH/USD"], json!(4))
        );
        assert_eq!(
            request(
                Venue::KrakenV2,
                r#"{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"],"snapshot":false}}"#
            ),
            Request::Subscribe { symbols: vec!["BTC/USD".into()], id: Value::Null, snapshot: false }
        );
        assert_eq!(
            request(
                Venue::CoinbaseAdvanced,
                r#"{"type":"subscribe","product_ids":["BTC-USD"],"channel":"market_trades"}"#
            ),
            subscribe(&["BTC-USD"], Value::Null)
        );
        assert_eq!(
            request(
                Venue::CoinbaseAdvanced,
                r#"{"type":"subscribe","product_ids":["BTC-USD"],"channel":"heartbeats"}"#
            ),
            Request::Heartbeats
        );
    }

    #[test]
    fn keepalives_of_each_venue() {
        assert_eq!(request(Venue::Kraken, r#"{"event":"ping","reqid":9}"#), Request::Ping { reqid: json!(9) });
        assert_eq!(request(Venue::Okx, "ping"), Request::Ping { reqid: Value::Null });
        assert_eq!(request(Venue::Bybit, r#"{"op":"ping"}"#), Request::Ping { reqid: Value::Null });
        assert_eq!(request(Venue::Bitstamp, r#"{"event":"bts:heartbeat"}"#), Request::Ping { reqid: Value::Null });
        assert_eq!(request(Venue::KrakenV2, r#"{"method":"ping","req_id":5}"#), Request::Ping { reqid: json!(5) });
    }

    #[test]
    fn other_requests_are_answered_with_each_venues_error() {
        let invalid = [
            (Venue::Binance, "not json"),
            (Venue::Binance, r#"{"method":"SUBSCRIBE","params":["btcusdt@depth"],"id":1}"#),
            (Venue::Binance, r#"{"method":"SUBSCRIBE","params":["bad\"sym@aggTrade"],"id":1}"#),
            (Venue::Binance, r#"{"method":"LIST_SUBSCRIPTIONS","id":1}"#),
            (Venue::Coinbase, r#"{"type":"subscribe","product_ids":["BTC-USD"],"channels":["ticker"]}"#),
            (Venue::Coinbase, r#"{"type":"subscribe","channels":["matches"]}"#),
            (Venue::Kraken, r#"{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"book"}}"#),
            (Venue::Kraken, r#"[1,2,3]"#),
            (Venue::Okx, r#"{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}"#),
            (Venue::Okx, r#"{"op":"subscribe","args":[]}"#),
            (Venue::Okx, r#"{"op":"login"}"#),
            (Venue::Bybit, r#"{"op":"subscribe","args":["orderbook.50.BTCUSDT"]}"#),
            (Venue::Bybit, r#"{"op":"unsubscribe","args":["publicTrade.BTCUSDT"]}"#),
            (Venue::Bitstamp, r#"{"event":"bts:subscribe","data":{"channel":"order_book_btcusd"}}"#),
            (Venue::Bitstamp, r#"{"event":"subscribe"}"#),
            (Venue::KrakenV2, r#"{"method":"subscribe","params":{"channel":"book","symbol":["BTC/USD"]}}"#),
            (Venue::KrakenV2, r#"{"method":"subscribe","params":{"channel":"trade"}}"#),
            (
                Venue::KrakenV2,
                r#"{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"],"snapshot":"no"}}"#,
            ),
            (Venue::CoinbaseAdvanced, r#"{"type":"subscribe","product_ids":["BTC-USD"],"channel":"level2"}"#),
            (Venue::CoinbaseAdvanced, r#"{"type":"subscribe","channel":"market_trades"}"#),
        ];
        for (venue, text) in invalid {
            let Request::Invalid(answer) = request(venue, text) else { panic!("{venue:?} accepted {text}") };
            let answer: Value = serde_json::from_str(&answer).unwrap();
            let is_error = answer.get("error").is_some()
                || answer["type"] == "error"
                || answer["event"] == "error"
                || answer["event"] == "bts:error"
                || answer["success"] == false;
            assert!(is_error, "{answer}");
        }
    }

    /// Each newer venue's subscribe answers, pongs, heartbeats and injected frames are ones its
    /// real decoder accepts without a record (or, for a malformed frame, refuses).
    #[test]
    fn control_frames_of_the_newer_venues_decode_to_nothing() {
        let peer = Peer { connection_id: 3, heartbeats: true };
        let feed = |venue, symbol: &str| Feed::new(venue, symbol.into(), 0, false);
        fn check<P: plugin_sdk::Plugin>(venue: Venue, peer: &Peer, feed: &Feed, ping: Option<&Value>) {
            let mut h = Harness::<P>::new(&[]).unwrap();
            let all = std::slice::from_ref(&feed.symbol);
            let mut frames = subscribe_acks(venue, peer, &json!(1), true, &[feed], all);
            frames.extend(subscribe_acks(venue, peer, &json!(2), false, &[feed], all));
            frames.extend(ping.map(|id| pong(venue, peer, id)));
            frames.extend(greeting(venue, peer));
            frames.extend(heartbeat(venue, peer, 1));
            frames.push(oversized_frame(venue, 10_000));
            for frame in &frames {
                assert_eq!(h.decode(frame.as_bytes()), Ok(vec![]), "{venue}: {frame}");
            }
            assert!(h.decode(malformed_frame(venue).as_bytes()).is_err(), "{venue}");
            let Request::Invalid(error) = parse_request(venue, peer, "{}") else { panic!("{venue} accepted {{}}") };
            assert!(h.decode(error.as_bytes()).unwrap_err().as_str().starts_with("venue error"), "{venue}: {error}");
        }
        check::<okx::Okx>(Venue::Okx, &peer, &feed(Venue::Okx, "BTC-USDT"), Some(&Value::Null));
        check::<bybit::Bybit>(Venue::Bybit, &peer, &feed(Venue::Bybit, "BTCUSDT"), Some(&json!("x")));
        check::<bitstamp::Bitstamp>(Venue::Bitstamp, &peer, &feed(Venue::Bitstamp, "btcusd"), Some(&Value::Null));
        check::<kraken_v2::KrakenV2>(Venue::KrakenV2, &peer, &feed(Venue::KrakenV2, "BTC/USD"), Some(&json!(9)));
        check::<coinbase_advanced::CoinbaseAdvanced>(
            Venue::CoinbaseAdvanced,
            &peer,
            &feed(Venue::CoinbaseAdvanced, "BTC-USD"),
            None,
        );
        assert_eq!(pong(Venue::Okx, &peer, &Value::Null), "pong");
        assert_eq!(heartbeat(Venue::CoinbaseAdvanced, &Peer::default(), 0), None);
    }

    /// The simulator's trade frames of each newer venue decode with its real plugin, field for
    /// field, several trades a frame where the venue batches them.
    #[test]
    fn trade_frames_of_the_newer_venues_decode_with_their_plugins() {
        fn check<P: plugin_sdk::Plugin>(venue: Venue, symbol: &str) {
            let feed = Feed::new(venue, symbol.into(), 0, false);
            let mut generator = Generator::new(11, venue, symbol);
            let mut harness = Harness::<P>::new(&[]).unwrap();
            let mut batched = false;
            for n in 0..200u64 {
                let burst = generator.burst(venue);
                let trades: Vec<Trade> =
                    (0..burst).map(|k| generator.trade(1_700_000_000_123_456 + 1_000 * (n * 3 + k))).collect();
                batched |= trades.len() > 1;
                let frame = trade_frame(&feed, generator.decimals, &trades);
                let records = harness.decode(frame.as_bytes()).unwrap_or_else(|e| panic!("{venue}: {e}: {frame}"));
                assert_eq!(records.len(), trades.len(), "{frame}");
                for (r, t) in records.iter().zip(&trades) {
                    assert_eq!(harness.symbol(r.symbol_id).as_deref(), Some(symbol));
                    assert_eq!((r.price_e8, r.volume_e8, r.is_buy), (t.price_e8, t.size_e8, t.taker_buys), "{frame}");
                    assert_eq!(r.timestamp_ms, (t.time_us / 1_000) as i64);
                    assert_eq!(r.trade_id, t.id);
                }
            }
            // Bitstamp sends one trade a frame; the others batch some.
            assert_eq!(batched, venue != Venue::Bitstamp, "{venue}");
        }
        check::<okx::Okx>(Venue::Okx, "BTC-USDT");
        check::<bybit::Bybit>(Venue::Bybit, "ETHUSDT");
        check::<bitstamp::Bitstamp>(Venue::Bitstamp, "btcusd");
        check::<kraken_v2::KrakenV2>(Venue::KrakenV2, "BTC/USD");
        check::<coinbase_advanced::CoinbaseAdvanced>(Venue::CoinbaseAdvanced, "SOL-USD");
    }

    /// The snapshots decode with the venues' real plugins into the very records the same trades gave
    /// in live frames (ids, prices, sizes, sides, times), so the host drops those it already logged
    /// by trade id; Kraken v2's oldest first, Coinbase Advanced's newest first, and Coinbase's
    /// `last_match` only the newest trade.
    #[test]
    fn snapshots_decode_to_the_records_of_the_same_live_trades() {
        fn check<P: plugin_sdk::Plugin>(venue: Venue, symbol: &str) {
            let feed = Feed::new(venue, symbol.into(), 0, false);
            let mut generator = Generator::new(5, venue, symbol);
            let mut harness = Harness::<P>::new(&[]).unwrap();
            let trades: Vec<Trade> = (0..80).map(|n| generator.trade(1_700_000_000_123_456 + 1_000 * n)).collect();
            let mut live = std::collections::HashMap::new();
            for t in &trades {
                let frame = trade_frame(&feed, generator.decimals, std::slice::from_ref(t));
                for r in harness.decode(frame.as_bytes()).unwrap() {
                    live.insert(r.trade_id, r);
                }
            }
            let empty = Recent { trades: Vec::new(), decimals: generator.decimals };
            match snapshot(&feed, &empty) {
                Some((frame, carried)) => {
                    assert!(carried.is_empty() && venue != Venue::Coinbase, "{venue}: {frame}");
                    assert_eq!(harness.decode(frame.as_bytes()), Ok(vec![]), "{venue}: {frame}");
                }
                None => assert_eq!(venue, Venue::Coinbase),
            }
            let recent = Recent { trades: trades[30..].to_vec(), decimals: generator.decimals };
            let (frame, carried) = snapshot(&feed, &recent).unwrap();
            let mut want: Vec<u64> = carried.iter().map(|t| t.id).collect();
            match venue {
                Venue::Coinbase => assert_eq!(want, [trades[79].id]),
                _ => assert_eq!(want, (trades[30].id..=trades[79].id).collect::<Vec<_>>()),
            }
            if venue == Venue::CoinbaseAdvanced {
                want.reverse();
            }
            let records = harness.decode(frame.as_bytes()).unwrap_or_else(|e| panic!("{venue}: {e}: {frame}"));
            assert_eq!(records.iter().map(|r| r.trade_id).collect::<Vec<_>>(), want, "{frame}");
            for r in &records {
                assert_eq!(Some(r), live.get(&r.trade_id), "{venue}");
            }
        }
        check::<kraken_v2::KrakenV2>(Venue::KrakenV2, "BTC/USD");
        check::<coinbase_advanced::CoinbaseAdvanced>(Venue::CoinbaseAdvanced, "ETH-USD");
        check::<coinbase::Coinbase>(Venue::Coinbase, "SOL-USD");
        let feed = Feed::new(Venue::Binance, "BTCUSDT".into(), 0, false);
        let recent = Recent { trades: vec![Generator::new(1, Venue::Binance, "BTCUSDT").trade(1)], decimals: 2 };
        assert_eq!(snapshot(&feed, &recent), None, "Binance sends no snapshot");
    }

    #[test]
    fn oversized_frames_are_exactly_the_size_asked_and_valid_json() {
        for venue in Venue::ALL {
            let frame = oversized_frame(venue, 100_000);
            assert_eq!(frame.len(), 100_000);
            serde_json::from_str::<Value>(&frame).unwrap();
            assert!(serde_json::from_str::<Value>(malformed_frame(venue)).is_err());
        }
    }

    /// The simulator's Binance frames decode with the real Binance plugin, field for field.
    #[test]
    fn binance_frames_decode_with_the_binance_plugin() {
        let feed = Feed::new(Venue::Binance, "BTCUSDT".into(), 0, false);
        let mut generator = Generator::new(3, Venue::Binance, "BTCUSDT");
        let mut harness = Harness::<binance::Binance>::new(&[]).unwrap();
        for _ in 0..200 {
            let trade = generator.trade(1_700_000_000_123_456);
            let frame = trade_frame(&feed, generator.decimals, std::slice::from_ref(&trade));
            let records = harness.decode(frame.as_bytes()).unwrap();
            assert_eq!(records.len(), 1, "{frame}");
            let r = records[0];
            assert_eq!(harness.symbol(r.symbol_id).as_deref(), Some("BTCUSDT"));
            assert_eq!((r.trade_id, r.price_e8, r.volume_e8), (trade.id, trade.price_e8, trade.size_e8));
            assert_eq!((r.timestamp_ms, r.is_buy), (1_700_000_000_123, trade.taker_buys));
        }
    }
}
