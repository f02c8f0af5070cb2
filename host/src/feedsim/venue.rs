//! The three venues' wire formats: trade frames, subscription requests and their answers, and the
//! frames the fault injections send. Pure functions over text, so each format is testable alone.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::Venue;
use super::feed::{Feed, Trade};

/// What a client's text message asks for.
#[derive(Debug, PartialEq)]
pub(super) enum Request {
    /// Subscribe to trades of these symbols (venue spelling: `BTCUSDT`, `BTC-USD`, `XBT/USD`).
    Subscribe {
        symbols: Vec<String>,
        /// Binance's `id` or Kraken's `reqid`, echoed in the answer (`null` when absent).
        id: Value,
    },
    /// Kraken's application-level `{"event":"ping"}`.
    Ping { reqid: Value },
    /// Not understood: answer with this venue error frame.
    Invalid(String),
}

/// Parses one client message in `venue`'s request format.
pub(super) fn parse_request(venue: Venue, text: &str) -> Request {
    let Ok(message) = serde_json::from_str::<Value>(text) else {
        return Request::Invalid(error_frame(venue, &Value::Null, "Malformed request: invalid JSON"));
    };
    let result = match venue {
        Venue::Binance => parse_binance(&message),
        Venue::Coinbase => parse_coinbase(&message),
        Venue::Kraken => parse_kraken(&message),
    };
    result.unwrap_or_else(|reason| Request::Invalid(error_frame(venue, request_id(venue, &message), &reason)))
}

fn request_id(venue: Venue, message: &Value) -> &Value {
    let key = if venue == Venue::Kraken { "reqid" } else { "id" };
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
    Ok(Request::Subscribe { symbols, id: request_id(Venue::Binance, message).clone() })
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
    Ok(Request::Subscribe { symbols: products, id: Value::Null })
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
            Ok(Request::Subscribe { symbols: pairs, id: reqid })
        }
        _ => Err("Unsupported event".into()),
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
fn error_frame(venue: Venue, id: &Value, message: &str) -> String {
    match venue {
        Venue::Binance => json!({"error": {"code": 2, "msg": message}, "id": id}),
        Venue::Coinbase => json!({"type": "error", "message": "Failed to subscribe", "reason": message}),
        Venue::Kraken if id.is_null() => json!({"event": "error", "errorMessage": message}),
        Venue::Kraken => json!({"event": "error", "errorMessage": message, "reqid": id}),
    }
    .to_string()
}

/// The answers to a subscription: `new` are the feeds just subscribed, `all` every symbol the
/// connection is subscribed to now (Coinbase lists them all).
pub(super) fn subscribe_acks(venue: Venue, id: &Value, new: &[&Feed], all: &[String]) -> Vec<String> {
    match venue {
        Venue::Binance => vec![json!({"result": null, "id": id}).to_string()],
        Venue::Coinbase => {
            vec![json!({"type": "subscriptions", "channels": [{"name": "matches", "product_ids": all}]}).to_string()]
        }
        Venue::Kraken => new
            .iter()
            .map(|feed| {
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
                ack.to_string()
            })
            .collect(),
    }
}

/// Kraken's answer to `{"event":"ping"}`.
pub(super) fn kraken_pong(reqid: &Value) -> String {
    if reqid.is_null() { json!({"event": "pong"}) } else { json!({"event": "pong", "reqid": reqid}) }.to_string()
}

/// What Kraken sends first on every connection.
pub(super) fn kraken_system_status(connection_id: u64) -> String {
    json!({"connectionID": connection_id, "event": "systemStatus", "status": "online", "version": "1.9.0"}).to_string()
}

pub(super) const KRAKEN_HEARTBEAT: &str = r#"{"event":"heartbeat"}"#;

/// The venue's notice that the server is going away.
pub(super) fn shutdown_notice(venue: Venue, now_ms: u64) -> String {
    match venue {
        Venue::Binance => format!(r#"{{"e":"serverShutdown","E":{now_ms}}}"#),
        Venue::Coinbase => r#"{"type":"error","message":"server shutting down for maintenance"}"#.into(),
        Venue::Kraken => r#"{"event":"systemStatus","status":"maintenance"}"#.into(),
    }
}

/// A trade frame cut short: valid UTF-8, invalid JSON.
pub(super) fn malformed_frame(venue: Venue) -> &'static str {
    match venue {
        Venue::Binance => r#"{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":17000000"#,
        Venue::Coinbase => r#"{"type":"match","trade_id":12,"price":"1.0"#,
        Venue::Kraken => r#"[42,[["1.00000","0.5","1700000000.1"#,
    }
}

/// A valid JSON frame of exactly `size` bytes (or the smallest such frame, if `size` is smaller),
/// of a kind the venue's decoder ignores.
pub(super) fn oversized_frame(venue: Venue, size: usize) -> String {
    let (head, tail) = match venue {
        Venue::Binance => (r#"{"stream":"feedsim@oversized","data":{"e":"oversized","pad":""#, r#""}}"#),
        Venue::Coinbase => (r#"{"type":"oversized","pad":""#, r#""}"#),
        Venue::Kraken => (r#"{"event":"oversized","pad":""#, r#""}"#),
    };
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut frame = String::with_capacity(head.len() + pad + tail.len());
    frame.push_str(head);
    frame.extend(std::iter::repeat_n('x', pad));
    frame.push_str(tail);
    frame
}

/// Renders one frame carrying `trades` (one trade except on Kraken) of `feed`, whose prices have
/// `decimals` tick decimals.
pub(super) fn trade_frame(feed: &Feed, decimals: u32, trades: &[Trade]) -> String {
    let mut out = String::with_capacity(64 + 160 * trades.len());
    // Writing to a String cannot fail.
    let _ = match feed.venue {
        Venue::Binance => trades.iter().try_for_each(|t| binance_trade(&mut out, &feed.symbol, t)),
        Venue::Coinbase => trades.iter().try_for_each(|t| coinbase_trade(&mut out, &feed.symbol, decimals, t)),
        Venue::Kraken => kraken_trades(&mut out, feed, decimals, trades),
    };
    out
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

fn coinbase_trade(out: &mut String, symbol: &str, decimals: u32, t: &Trade) -> std::fmt::Result {
    write!(
        out,
        concat!(
            r#"{{"type":"match","trade_id":{id},"maker_order_id":"{maker}","taker_order_id":"{taker}","#,
            r#""side":"{side}","size":"{size}","price":"{price}","product_id":"{symbol}","#,
            r#""sequence":{seq},"time":"{time}"}}"#,
        ),
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

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
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

    #[test]
    fn requests_of_each_venue() {
        let sub = |venue, text: &str| parse_request(venue, text);
        assert_eq!(
            sub(Venue::Binance, r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","ethbtc@aggTrade"],"id":7}"#),
            Request::Subscribe { symbols: vec!["BTCUSDT".into(), "ETHBTC".into()], id: json!(7) }
        );
        assert_eq!(
            sub(
                Venue::Coinbase,
                r#"{"type":"subscribe","product_ids":["BTC-USD"],
                    "channels":["heartbeat",{"name":"matches","product_ids":["ETH-USD"]}]}"#
            ),
            Request::Subscribe { symbols: vec!["BTC-USD".into(), "ETH-USD".into()], id: Value::Null }
        );
        assert_eq!(
            sub(Venue::Kraken, r#"{"event":"subscribe","reqid":3,"pair":["XBT/USD"],"subscription":{"name":"trade"}}"#),
            Request::Subscribe { symbols: vec!["XBT/USD".into()], id: json!(3) }
        );
        assert_eq!(sub(Venue::Kraken, r#"{"event":"ping","reqid":9}"#), Request::Ping { reqid: json!(9) });
        let invalid = [
            (Venue::Binance, "not json"),
            (Venue::Binance, r#"{"method":"SUBSCRIBE","params":["btcusdt@depth"],"id":1}"#),
            (Venue::Binance, r#"{"method":"SUBSCRIBE","params":["bad\"sym@aggTrade"],"id":1}"#),
            (Venue::Binance, r#"{"method":"LIST_SUBSCRIPTIONS","id":1}"#),
            (Venue::Coinbase, r#"{"type":"subscribe","product_ids":["BTC-USD"],"channels":["ticker"]}"#),
            (Venue::Coinbase, r#"{"type":"subscribe","channels":["matches"]}"#),
            (Venue::Kraken, r#"{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"book"}}"#),
            (Venue::Kraken, r#"[1,2,3]"#),
        ];
        for (venue, text) in invalid {
            let Request::Invalid(answer) = sub(venue, text) else { panic!("{venue:?} accepted {text}") };
            let answer: Value = serde_json::from_str(&answer).unwrap();
            let is_error = answer.get("error").is_some() || answer["type"] == "error" || answer["event"] == "error";
            assert!(is_error, "{answer}");
        }
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
