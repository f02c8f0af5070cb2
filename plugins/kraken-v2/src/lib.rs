//! Decodes the Kraken WebSocket API v2 public `trade` channel into sluice records.
//!
//! # Venue format
//! v2 frames are JSON objects. A trade message names its channel and carries a list of trades,
//! several per frame (a batch need not come from one taker order); `type` is `snapshot` (the most
//! recent 50 trades, sent on subscribing) or `update`, and both share one schema:
//!
//! ```json
//! {"channel":"trade","type":"update","data":[
//!   {"symbol":"MATIC/USD","side":"sell","price":0.5117,"qty":40.0,"ord_type":"market",
//!    "trade_id":4665906,"timestamp":"2023-09-25T07:49:37.708706Z"}]}
//! ```
//!
//! | field       | meaning                                   | record                               |
//! |-------------|-------------------------------------------|--------------------------------------|
//! | `symbol`    | currency pair, e.g. `BTC/USD`             | `symbol_id`                          |
//! | `price`     | average price of the trade, JSON number   | `price_e8` (exact, from its text)    |
//! | `qty`       | size of the trade, JSON number            | `volume_e8` (exact, from its text)   |
//! | `timestamp` | RFC 3339 with µs                          | `timestamp_ms` (truncated)           |
//! | `side`      | side of the **taker** order, `buy`/`sell` | `is_buy = (side == "buy")`           |
//! | `trade_id`  | integer, a sequence number unique per book| `trade_id`                           |
//!
//! A snapshot's trades are records like an update's, with their own `trade_id`s. A client that
//! subscribes again (a restart, a reconnect) gets trades it already logged among them: the host drops
//! those by trade id and keeps the ones it missed, so the decoder need not tell them apart.
//!
//! Unlike v1, v2 writes `price` and `qty` as JSON numbers. They are read from the number's own text
//! with [`parse_e8`], never through a float, so `0.5117` is exactly `51_170_000`; a number with more
//! than eight significant decimals is refused rather than rounded. `ord_type` is ignored. v2 spells
//! symbols `BTC/USD` (v1 said `XBT/USD`); the symbol is kept as written.
//!
//! # What produces nothing, and what is refused
//! - Other channels (`heartbeat`, `status`, `book`, `ticker`, ...) push nothing.
//! - Method answers with `"success":true` (the subscribe ack) and `{"method":"pong",...}`, the answer
//!   to the client's `{"method":"ping"}`, push nothing.
//! - A method answer with `"success":false` is refused with `venue error: <error>`, so the host
//!   dead-letters it and an operator sees that a subscription failed.
//! - A malformed trade message is refused as a whole (no partial output) with a reason naming the
//!   trade and field: `trade 1 price: expected a number`, `trade 0 timestamp: timestamp is not RFC
//!   3339`, `trade 2 side: expected "buy" or "sell"`, ... Negative prices or sizes are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{required, text};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::time::rfc3339_to_ms;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, parse_e8, symbol_id};

/// The Kraken v2 decoder. It keeps no state.
pub struct KrakenV2;

impl Plugin for KrakenV2 {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(KrakenV2)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        const FRAME_KEYS: Keys<4> = Keys::new(["channel", "data", "success", "error"]);
        let [channel, data, success, error] = frame.pick(&FRAME_KEYS);
        let Some(channel) = channel else {
            return method_answer(success, error);
        };
        if text("channel", Some(channel))? != "trade" {
            return Ok(());
        }
        let data = data.filter(|d| d.kind() == Kind::Array).ok_or("data: expected an array")?;
        for (i, trade) in data.elements().enumerate() {
            out.push(&decode_trade(trade).map_err(|e| Reason::new(format!("trade {i} {e}")))?);
        }
        Ok(())
    }
}

/// One element of `data`.
fn decode_trade(trade: Json<'_>) -> Result<Record, Reason> {
    if trade.kind() != Kind::Object {
        return Err("object: expected a JSON object".into());
    }
    const TRADE_KEYS: Keys<6> = Keys::new(["symbol", "side", "price", "qty", "trade_id", "timestamp"]);
    let [symbol, side, price, qty, trade_id, timestamp] = trade.pick(&TRADE_KEYS);
    let symbol = text("symbol", symbol)?;
    if symbol.is_empty() {
        return Err("symbol: empty symbol".into());
    }
    let price_e8 = number_e8("price", price)?;
    let volume_e8 = number_e8("qty", qty)?;
    let timestamp_ms = rfc3339_to_ms(&text("timestamp", timestamp)?).map_err(|e| Reason::field("timestamp", e))?;
    let is_buy = match text("side", side)?.as_ref() {
        "buy" => true,
        "sell" => false,
        _ => return Err(r#"side: expected "buy" or "sell""#.into()),
    };
    let trade_id = required("trade_id", trade_id)?.as_u64().ok_or("trade_id: expected an unsigned integer")?;
    Ok(Record {
        symbol_id: symbol_id(&symbol),
        price_e8,
        volume_e8,
        timestamp_ms,
        is_buy,
        trade_id,
        ..Record::default()
    })
}

/// A non-negative JSON number read exactly from its text with eight implied decimals.
fn number_e8(name: &str, value: Option<Json<'_>>) -> Result<i64, Reason> {
    let number = required(name, value)?.as_number_text().ok_or_else(|| Reason::field(name, "expected a number"))?;
    match parse_e8(number) {
        Ok(v) if v >= 0 => Ok(v),
        Ok(_) => Err(Reason::field(name, "negative decimal")),
        Err(e) => Err(Reason::field(name, e)),
    }
}

/// A frame without a channel: a method answer, refused only when it reports a failure.
fn method_answer(success: Option<Json<'_>>, error: Option<Json<'_>>) -> Result<(), Reason> {
    match success.map(|s| s.as_bool()) {
        None | Some(Some(true)) => Ok(()),
        Some(Some(false)) => {
            let error = error.and_then(|e| e.as_str()).filter(|e| !e.is_empty());
            Err(Reason::new(format!("venue error: {}", error.unwrap_or(Cow::Borrowed("no message")))))
        }
        Some(None) => Err("success: expected true or false".into()),
    }
}

plugin_sdk::export!(KrakenV2);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/kraken_v2_trade.jsonl");

    fn harness() -> Harness<KrakenV2> {
        Harness::new(&[]).unwrap()
    }

    fn line(n: usize) -> &'static [u8] {
        TRADES.lines().nth(n - 1).unwrap().as_bytes()
    }

    fn trade(
        sym: &str,
        price_e8: i64,
        volume_e8: i64,
        timestamp_ms: i64,
        is_buy: bool,
        trade_id: u64,
    ) -> (String, Record) {
        (sym.into(), Record { price_e8, volume_e8, timestamp_ms, is_buy, trade_id, ..Record::default() })
    }

    #[test]
    fn every_fixture_line_decodes() {
        let mut h = harness();
        let frames: Vec<&[u8]> = TRADES.lines().map(str::as_bytes).collect();
        let out = h.decode_batch(&frames);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        // status, subscribe ack, a snapshot of 2, heartbeat, an update of 1, one of 3, pong.
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 0, 2, 0, 1, 3, 0]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        assert!(records.iter().all(|r| r.source_id == 0 && r.received_at_us == 0));
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        assert_eq!(
            h.decode_named(line(3)).unwrap(),
            [
                trade("MATIC/USD", 51_470_000, 642_346_326_000, 1_695_628_116_925, true, 4_665_846),
                trade("MATIC/USD", 51_470_000, 113_619_677_815, 1_695_628_176_925, true, 4_665_847),
            ]
        );
        assert_eq!(
            h.decode_named(line(5)).unwrap(),
            [trade("MATIC/USD", 51_170_000, 4_000_000_000, 1_695_628_177_708, false, 4_665_906)]
        );
        // An integer price and an exponent are read exactly too.
        assert_eq!(
            h.decode_named(line(6)).unwrap(),
            [
                trade("BTC/USD", 2_627_030_000_000, 38_022, 1_695_628_178_000, true, 62_511_543),
                trade("BTC/USD", 2_627_020_000_000, 150_000_000, 1_695_628_178_101, false, 62_511_544),
                trade("BTC/USD", 2_627_000_000_000, 20_000, 1_695_628_178_999, false, 62_511_545),
            ]
        );
    }

    /// A snapshot's trades decode like an update's: a trade seen in both gives the same record, with
    /// its trade id, for the host to drop as a duplicate.
    #[test]
    fn snapshot_trades_are_records_with_their_trade_ids() {
        let mut h = harness();
        let t = |id: u64, side: &str, price: &str| {
            format!(
                r#"{{"symbol":"BTC/USD","side":"{side}","price":{price},"qty":0.5,"ord_type":"limit","trade_id":{id},"timestamp":"2023-09-25T07:49:3{}.5Z"}}"#,
                id % 10
            )
        };
        let update = format!(r#"{{"channel":"trade","type":"update","data":[{}]}}"#, t(62_511_544, "sell", "26270.2"));
        let snapshot = format!(
            r#"{{"channel":"trade","type":"snapshot","data":[{},{},{}]}}"#,
            t(62_511_543, "buy", "26270.3"),
            t(62_511_544, "sell", "26270.2"),
            t(62_511_545, "buy", "26270")
        );
        let live = h.decode_named(update.as_bytes()).unwrap();
        let snap = h.decode_named(snapshot.as_bytes()).unwrap();
        assert_eq!(
            snap,
            [
                trade("BTC/USD", 2_627_030_000_000, 50_000_000, 1_695_628_173_500, true, 62_511_543),
                trade("BTC/USD", 2_627_020_000_000, 50_000_000, 1_695_628_174_500, false, 62_511_544),
                trade("BTC/USD", 2_627_000_000_000, 50_000_000, 1_695_628_175_500, true, 62_511_545),
            ]
        );
        assert_eq!(snap[1], live[0]);
        // Subscribing before the symbol's first trade: an empty snapshot.
        assert_eq!(h.decode(br#"{"channel":"trade","type":"snapshot","data":[]}"#), Ok(vec![]));
    }

    #[test]
    fn numbers_are_never_rounded_through_a_float() {
        let mut h = harness();
        // 0.1 + 0.2 style values that a float cannot hold, and the largest exact e8 volume.
        let frame = br#"{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":0.30000001,"qty":92233720368.54775807,"ord_type":"limit","trade_id":1,"timestamp":"2023-09-25T07:49:37Z"}]}"#;
        assert_eq!(
            h.decode_named(frame).unwrap(),
            [trade("BTC/USD", 30_000_001, i64::MAX, 1_695_628_177_000, true, 1)]
        );
    }

    #[test]
    fn other_channels_and_answers_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"channel":"heartbeat"}"#,
            r#"{"channel":"status","type":"update","data":[{"version":"2.0.0","system":"online","api_version":"v2","connection_id":1}]}"#,
            r#"{"method":"pong","req_id":101,"time_in":"2023-09-24T14:10:23.799685Z","time_out":"2023-09-24T14:10:23.799703Z"}"#,
            r#"{"method":"pong"}"#,
            r#"{"method":"subscribe","result":{"channel":"trade","snapshot":true,"symbol":"BTC/USD"},"success":true,"time_in":"2023-09-25T09:04:31.742599Z","time_out":"2023-09-25T09:04:31.742648Z"}"#,
            r#"{"method":"unsubscribe","result":{"channel":"trade","symbol":"BTC/USD"},"success":true}"#,
            r#"{"channel":"ticker","type":"snapshot","data":[{"symbol":"BTC/USD","bid":26270.2,"ask":26270.3,"last":26270.3}]}"#,
            r#"{"channel":"book","type":"update","data":[{"symbol":"BTC/USD","bids":[{"price":26270.2,"qty":0.5}],"asks":[],"checksum":1,"timestamp":"2023-09-25T07:49:38Z"}]}"#,
            r#"{"channel":"trade","type":"update","data":[]}"#,
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn failed_methods_are_refused_with_their_error() {
        let mut h = harness();
        let frame = br#"{"error":"Currency pair not supported","method":"subscribe","success":false,"symbol":"NOPE/USD","time_in":"2023-09-25T09:04:31.742599Z","time_out":"2023-09-25T09:04:31.742648Z"}"#;
        assert_eq!(h.decode(frame).unwrap_err().as_str(), "venue error: Currency pair not supported");
        assert_eq!(
            h.decode(br#"{"method":"subscribe","success":false}"#).unwrap_err().as_str(),
            "venue error: no message"
        );
        assert_eq!(h.decode(br#"{"success":1}"#).unwrap_err().as_str(), "success: expected true or false");
    }

    #[test]
    fn malformed_frames_name_the_trade_and_field() {
        let mut h = harness();
        let good = r#"{"symbol":"BTC/USD","side":"buy","price":1.5,"qty":2,"ord_type":"market","trade_id":7,"timestamp":"2023-09-25T07:49:37.708706Z"}"#;
        let frame = |bad: &str| format!(r#"{{"channel":"trade","type":"update","data":[{good},{bad}]}}"#);
        let cases = [
            (r#"{"channel":"trade""#.to_string(), "frame: invalid JSON at byte 18: expected ',' or '}'"),
            ("[]".into(), "frame: expected a JSON object"),
            (r#"{"channel":null}"#.into(), "channel: expected a string"),
            (r#"{"channel":"trade","data":{}}"#.into(), "data: expected an array"),
            (frame(r#""x""#), "trade 1 object: expected a JSON object"),
            (frame(&good.replace(r#""price":1.5,"#, "")), "trade 1 price: missing"),
            (frame(&good.replace(r#""price":1.5"#, r#""price":"1.5""#)), "trade 1 price: expected a number"),
            (frame(&good.replace(r#""price":1.5"#, r#""price":-1.5"#)), "trade 1 price: negative decimal"),
            (
                frame(&good.replace(r#""qty":2"#, r#""qty":0.000000001"#)),
                "trade 1 qty: decimal has more than 8 significant decimal places",
            ),
            (
                frame(&good.replace(r#""qty":2"#, r#""qty":1e300"#)),
                "trade 1 qty: decimal overflows a 64-bit fixed-point value",
            ),
            (frame(&good.replace(r#""symbol":"BTC/USD","#, "")), "trade 1 symbol: missing"),
            (frame(&good.replace("BTC/USD", "")), "trade 1 symbol: empty symbol"),
            (
                frame(&good.replace("2023-09-25T07:49:37.708706Z", "1695628177.708706")),
                "trade 1 timestamp: timestamp is not RFC 3339",
            ),
            (
                frame(&good.replace(r#""timestamp":"2023-09-25T07:49:37.708706Z""#, r#""timestamp":1"#)),
                "trade 1 timestamp: expected a string",
            ),
            (frame(&good.replace(r#""side":"buy""#, r#""side":"b""#)), r#"trade 1 side: expected "buy" or "sell""#),
            (
                frame(&good.replace(r#""trade_id":7"#, r#""trade_id":"7""#)),
                "trade 1 trade_id: expected an unsigned integer",
            ),
            (frame(&good.replace(r#""trade_id":7,"#, "")), "trade 1 trade_id: missing"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
        let out = h.decode_batch(&[frame(&good.replace("buy", "x")).as_bytes(), line(5)]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 0);
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<KrakenV2>::new(&[("symbol", "BTC/USD")]).is_err());
    }
}
