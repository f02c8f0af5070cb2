//! Decodes the Kraken WebSocket API v1 public `trade` channel into sluice records.
//!
//! # Venue format
//! Channel data arrives as a JSON array, `[channelID, payload, channelName, pair]`; for `trade` the
//! payload is a list of trades, several per frame:
//!
//! ```json
//! [993,[["354.04000000","0.28245396","1618678150.826417","s","m",""],
//!       ["353.81000000","1.71754604","1618678150.827816","s","m",""]],"trade","XMR/USD"]
//! ```
//!
//! Each trade is `[price, volume, time, side, orderType, misc]`:
//!
//! | element  | meaning                                | record                                   |
//! |----------|----------------------------------------|------------------------------------------|
//! | `price`  | decimal string                         | `price_e8` (exact)                       |
//! | `volume` | decimal string                         | `volume_e8` (exact)                      |
//! | `time`   | seconds since the epoch, decimal string| `timestamp_ms` (truncated)               |
//! | `side`   | taker side, `"b"` buy or `"s"` sell    | `is_buy = (side == "b")`                 |
//!
//! `orderType` (`"l"`/`"m"`) and `misc` are ignored; only the first four elements are required. The
//! pair, e.g. `XMR/USD`, is the symbol exactly as written. Kraken v1 sends no trade id, so `trade_id`
//! is 0. Each trade in a frame gives one record, in order.
//!
//! # What produces nothing, and what is refused
//! - Object frames (`{"event":"heartbeat"}`, `systemStatus`, `subscriptionStatus` with status
//!   `subscribed`/`unsubscribed`, `pong`) and arrays of other channels (`ticker`, `ohlc-*`, `spread`,
//!   `book-*`, ...) push nothing and succeed.
//! - Venue errors, `{"event":"subscriptionStatus","status":"error","errorMessage":"..."}` and
//!   `{"event":"error","errorMessage":"..."}`, are refused with `venue error: <errorMessage>`, so the
//!   host dead-letters them and an operator sees that a subscription failed.
//! - A frame that is neither an array nor an object is refused.
//! - A malformed trade frame is refused as a whole (no partial output) with a reason naming the trade
//!   and field: `trade 1 price: invalid character at byte 0 of decimal`, `trade 0 side: expected "b"
//!   or "s"`, `pair: missing`, ... Negative prices or volumes are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;
use std::fmt;

use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::time::decimal_seconds_to_ms;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, parse_e8, symbol_id};

/// The Kraken decoder. It keeps no state.
pub struct Kraken;

impl Plugin for Kraken {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Kraken)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        match frame.kind() {
            Kind::Array => decode_channel(frame, out),
            Kind::Object => event(frame),
            _ => Err("frame: expected a JSON array or object".into()),
        }
    }
}

/// `[channelID, payload, channelName, pair]`: decodes `trade`, ignores other channels.
fn decode_channel(frame: Json<'_>, out: &mut Records) -> Result<(), Reason> {
    let mut items = frame.elements();
    let (_channel_id, payload, name) = (items.next(), items.next(), items.next());
    // Book frames carrying both sides have a second payload here, an object: not a trade.
    if !name.is_some_and(|n| is_str(n, "trade")) {
        return Ok(());
    }
    let pair = plugin_sdk::field::text("pair", items.next())?;
    if pair.is_empty() {
        return Err("pair: empty symbol".into());
    }
    if items.next().is_some() {
        return Err("frame: trade message has more than 4 elements".into());
    }
    let payload = payload.filter(|p| p.kind() == Kind::Array).ok_or("trades: expected an array")?;
    let symbol_id = symbol_id(&pair);
    for (i, trade) in payload.elements().enumerate() {
        out.push(&decode_trade(trade, i, symbol_id)?);
    }
    Ok(())
}

/// One `[price, volume, time, side, orderType, misc]`, the `i`th of its frame.
fn decode_trade(trade: Json<'_>, i: usize, symbol_id: u32) -> Result<Record, Reason> {
    let error = |field: &str, e: &dyn fmt::Display| Reason::new(format!("trade {i} {field}: {e}"));
    if trade.kind() != Kind::Array {
        return Err(Reason::new(format!("trade {i}: expected an array")));
    }
    let mut elements = trade.elements();
    let mut next = |field: &str| {
        let value = elements.next().ok_or_else(|| error(field, &"missing"))?;
        value.as_str().ok_or_else(|| error(field, &"expected a string"))
    };
    let decimal = |field: &str, text: &str| match parse_e8(text) {
        Ok(v) if v >= 0 => Ok(v),
        Ok(_) => Err(error(field, &"negative decimal")),
        Err(e) => Err(error(field, &e)),
    };
    let price_e8 = decimal("price", &next("price")?)?;
    let volume_e8 = decimal("volume", &next("volume")?)?;
    let timestamp_ms = decimal_seconds_to_ms(&next("time")?).map_err(|e| error("time", &e))?;
    let is_buy = match next("side")?.as_ref() {
        "b" => true,
        "s" => false,
        _ => return Err(error("side", &r#"expected "b" or "s""#)),
    };
    Ok(Record { symbol_id, price_e8, volume_e8, timestamp_ms, is_buy, ..Record::default() })
}

/// Object frames: events. Only errors are refused.
fn event(frame: Json<'_>) -> Result<(), Reason> {
    const FRAME_KEYS: Keys<3> = Keys::new(["event", "status", "errorMessage"]);
    let [event, status, message] = frame.pick(&FRAME_KEYS);
    let is_error = event.is_some_and(|e| is_str(e, "error")) || status.is_some_and(|s| is_str(s, "error"));
    if !is_error {
        return Ok(());
    }
    let message = message.and_then(|m| m.as_str()).unwrap_or(Cow::Borrowed("no message"));
    Err(Reason::new(format!("venue error: {message}")))
}

/// True when `value` is the string `expected` (escapes resolved).
fn is_str(value: Json<'_>, expected: &str) -> bool {
    value.as_str().is_some_and(|s| s == expected)
}

plugin_sdk::export!(Kraken);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/kraken_v1_trade.jsonl");

    fn harness() -> Harness<Kraken> {
        Harness::new(&[]).unwrap()
    }

    fn line(n: usize) -> &'static [u8] {
        TRADES.lines().nth(n - 1).unwrap().as_bytes()
    }

    fn trade(sym: &str, price_e8: i64, volume_e8: i64, timestamp_ms: i64, is_buy: bool) -> (String, Record) {
        (sym.into(), Record { price_e8, volume_e8, timestamp_ms, is_buy, ..Record::default() })
    }

    #[test]
    fn every_fixture_line_decodes() {
        let mut h = harness();
        let frames: Vec<&[u8]> = TRADES.lines().map(str::as_bytes).collect();
        assert_eq!(frames.len(), 8);
        let out = h.decode_batch(&frames);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        // Lines 4 and 5 carry two trades each.
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1, 2, 2, 1, 1, 1]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        assert_eq!(records.len(), 10);
        let syms: Vec<String> = records.iter().map(|r| h.symbol(r.symbol_id).unwrap()).collect();
        assert_eq!(syms.iter().filter(|s| *s == "XMR/USD").count(), 4);
        assert_eq!(syms.iter().filter(|s| *s == "SC/EUR").count(), 6);
        let sides: Vec<bool> = records.iter().map(|r| r.is_buy).collect();
        assert_eq!(sides, [false, true, false, false, false, true, true, true, false, true]);
        assert!(records.iter().all(|r| r.trade_id == 0 && r.source_id == 0 && r.received_at_us == 0));
    }

    #[test]
    fn single_trade_lines_field_by_field() {
        let mut h = harness();
        assert_eq!(
            h.decode_named(line(1)).unwrap(),
            [trade("XMR/USD", 35_411_000_000, 89_594_024, 1_618_678_142_557, false)]
        );
        assert_eq!(
            h.decode_named(line(2)).unwrap(),
            [trade("XMR/USD", 35_455_000_000, 125_690_315, 1_618_678_145_715, true)]
        );
        assert_eq!(
            h.decode_named(line(3)).unwrap(),
            [trade("SC/EUR", 4_299_000, 1_597_971_727_919, 1_618_678_145_920, false)]
        );
        assert_eq!(
            h.decode_named(line(7)).unwrap(),
            [trade("SC/EUR", 4_296_000, 500_000_000_000, 1_618_678_157_946, false)]
        );
        assert_eq!(
            h.decode_named(line(8)).unwrap(),
            [trade("SC/EUR", 4_304_000, 2_000_000_000_000, 1_618_678_158_135, true)]
        );
    }

    #[test]
    fn multi_trade_lines_keep_order() {
        let mut h = harness();
        assert_eq!(
            h.decode_named(line(4)).unwrap(),
            [
                trade("XMR/USD", 35_404_000_000, 28_245_396, 1_618_678_150_826, false),
                trade("XMR/USD", 35_381_000_000, 171_754_604, 1_618_678_150_827, false),
            ]
        );
        assert_eq!(
            h.decode_named(line(5)).unwrap(),
            [
                trade("SC/EUR", 4_298_000, 850_000_000_000, 1_618_678_155_718, true),
                trade("SC/EUR", 4_300_000, 238_316_665_529, 1_618_678_155_720, true),
            ]
        );
    }

    #[test]
    fn edge_shapes_of_trade_frames() {
        let mut h = harness();
        // No trades; whole seconds; only the four required elements; an escaped pair.
        assert_eq!(h.decode_named(br#"[1,[],"trade","XBT/USD"]"#).unwrap(), []);
        let frame = br#"[1,[["1","2","1618678142","b"]],"trade","XBT\/USD"]"#;
        assert_eq!(
            h.decode_named(frame).unwrap(),
            [trade("XBT/USD", 100_000_000, 200_000_000, 1_618_678_142_000, true)]
        );
    }

    #[test]
    fn events_and_other_channels_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"event":"heartbeat"}"#,
            r#"{"connectionID":8628615390848610000,"event":"systemStatus","status":"online","version":"1.0.0"}"#,
            r#"{"channelID":993,"channelName":"trade","event":"subscriptionStatus","pair":"XMR/USD","status":"subscribed","subscription":{"name":"trade"}}"#,
            r#"{"channelID":993,"channelName":"trade","event":"subscriptionStatus","pair":"XMR/USD","status":"unsubscribed","subscription":{"name":"trade"}}"#,
            r#"{"event":"pong","reqid":42}"#,
            r#"[340,{"a":["5525.40000",1,"1.000"],"b":["5525.10000",1,"1.000"],"c":["5525.10000","0.00398963"]},"ticker","XBT/USD"]"#,
            r#"[42,["1542057314.748456","1542057360.435743","3586.70000","3586.70000","3586.60000","3586.60000","3586.68894","0.03373000",2],"ohlc-5","XBT/USD"]"#,
            r#"[0,["5698.40000","5700.00000","1542057299.545897","1.01234567","0.98765432"],"spread","XBT/USD"]"#,
            r#"[1234,{"a":[["5541.30000","2.50700000","1534614248.456738"]]},{"b":[["5541.20000","1.52900000","1534614248.765567"]]},"book-10","XBT/USD"]"#,
            r#"[1234,{"as":[["5541.30000","2.50700000","1534614248.123678"]],"bs":[["5541.20000","1.52900000","1534614248.765567"]]},"book-100","XBT/USD"]"#,
            "[]",
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn venue_errors_are_refused_with_their_message() {
        let mut h = harness();
        let frame = br#"{"errorMessage":"Currency pair not in ISO 4217-A3 format foobar","event":"subscriptionStatus","pair":"foobar","status":"error","subscription":{"name":"trade"}}"#;
        assert_eq!(
            h.decode(frame).unwrap_err().as_str(),
            "venue error: Currency pair not in ISO 4217-A3 format foobar"
        );
        let frame = br#"{"errorMessage":"Malformed request","event":"error"}"#;
        assert_eq!(h.decode(frame).unwrap_err().as_str(), "venue error: Malformed request");
        assert_eq!(h.decode(br#"{"event":"error"}"#).unwrap_err().as_str(), "venue error: no message");
    }

    #[test]
    fn malformed_frames_name_the_trade_and_field() {
        let mut h = harness();
        let good = r#"["354.11000000","0.89594024","1618678142.557535","s","l",""]"#;
        let frame = |trades: &str| format!(r#"[993,[{good},{trades}],"trade","XMR/USD"]"#);
        let cases = [
            (r#"[993,[["354.11""#.to_string(), "frame: invalid JSON at byte 15: expected ',' or ']'"),
            ("42".into(), "frame: expected a JSON array or object"),
            (r#"[993,[],"trade"]"#.into(), "pair: missing"),
            (r#"[993,[],"trade",7]"#.into(), "pair: expected a string"),
            (r#"[993,[],"trade",""]"#.into(), "pair: empty symbol"),
            (r#"[993,[],"trade","XMR/USD",1]"#.into(), "frame: trade message has more than 4 elements"),
            (r#"[993,{},"trade","XMR/USD"]"#.into(), "trades: expected an array"),
            (frame(r#""354.11""#), "trade 1: expected an array"),
            (frame(r#"["x","1","1","b"]"#), "trade 1 price: invalid character at byte 0 of decimal"),
            (frame(r#"["-1","1","1","b"]"#), "trade 1 price: negative decimal"),
            (frame(r#"[1,"1","1","b"]"#), "trade 1 price: expected a string"),
            (
                frame(r#"["1","0.000000001","1","b"]"#),
                "trade 1 volume: decimal has more than 8 significant decimal places",
            ),
            (frame(r#"["1","1","2021-04-17","b"]"#), "trade 1 time: timestamp is not decimal seconds"),
            (frame(r#"["1","1","1","buy"]"#), r#"trade 1 side: expected "b" or "s""#),
            (frame(r#"["1","1","1"]"#), "trade 1 side: missing"),
            (frame("[]"), "trade 1 price: missing"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
        // The good trade before the bad one is dropped with the frame.
        let out = h.decode_batch(&[frame(r#"["1","1","1","x"]"#).as_bytes(), line(1)]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 0);
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Kraken>::new(&[("pairs", "XBT/USD")]).is_err());
    }
}
