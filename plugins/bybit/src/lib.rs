//! Decodes the Bybit v5 public WebSocket `publicTrade.{symbol}` topic into sluice records.
//!
//! # Venue format
//! A push names its topic and carries one or more trades in `data`, sorted by matching time
//! (Bybit batches up to 1024 trades into one message):
//!
//! ```json
//! {"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1672304486868,
//!  "data":[{"T":1672304486865,"s":"BTCUSDT","S":"Buy","v":"0.001","p":"16578.50",
//!           "L":"PlusTick","i":"20f43950-d8dd-5b31-9112-a178eb6023af","BT":false}]}
//! ```
//!
//! | field | meaning                                            | record                          |
//! |-------|----------------------------------------------------|---------------------------------|
//! | `s`   | symbol name, e.g. `BTCUSDT`                        | `symbol_id`                     |
//! | `p`   | executed price, decimal string                     | `price_e8` (exact)              |
//! | `v`   | quantity, decimal string                           | `volume_e8` (exact)             |
//! | `T`   | time the order was filled, ms since the epoch      | `timestamp_ms` (not `ts`)       |
//! | `S`   | side of the **taker**, `Buy` or `Sell`             | `is_buy = (S == "Buy")`         |
//! | `i`   | trade id, a string                                 | `trade_id` when it is digits    |
//!
//! Spot writes `i` as digits, which become `trade_id`; derivatives write a UUID, which does not fit
//! the record's 64-bit id, so `trade_id` is 0 there. `L` (tick direction), `BT` (block trade) and the
//! option-only fields (`mP`, `iP`, `mIv`, `iv`) are ignored. Each trade in `data` gives one record,
//! in order. Other topics (`orderbook.*`, `tickers.*`, ...) are ignored.
//!
//! # What produces nothing, and what is refused
//! - Operation answers with `"success":true` push nothing: the subscribe ack
//!   (`{"success":true,"ret_msg":"","conn_id":"...","op":"subscribe"}`) and the answer to the
//!   client's `{"op":"ping"}` (`{"success":true,"ret_msg":"pong",...,"op":"ping"}`, or
//!   `{"op":"pong","args":[...],"conn_id":"..."}` on some endpoints).
//! - An operation answer with `"success":false` is refused with `venue error: <ret_msg>`, so the host
//!   dead-letters it and an operator sees that, say, a subscription named an unknown topic.
//! - A malformed push is refused as a whole (no partial output) with a reason naming the trade and
//!   field: `trade 0 p: missing`, `trade 1 S: expected "Buy" or "Sell"`, `data: expected an array`,
//!   ... Negative prices or quantities are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{non_negative_e8, required, text};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The Bybit decoder. It keeps no state.
pub struct Bybit;

impl Plugin for Bybit {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Bybit)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        const FRAME_KEYS: Keys<4> = Keys::new(["topic", "data", "success", "ret_msg"]);
        let [topic, data, success, ret_msg] = frame.pick(&FRAME_KEYS);
        let Some(topic) = topic else {
            return operation_answer(success, ret_msg);
        };
        if !text("topic", Some(topic))?.starts_with("publicTrade.") {
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
    const TRADE_KEYS: Keys<6> = Keys::new(["T", "s", "S", "v", "p", "i"]);
    let [time, symbol, side, qty, price, id] = trade.pick(&TRADE_KEYS);
    let symbol = text("s", symbol)?;
    if symbol.is_empty() {
        return Err("s: empty symbol".into());
    }
    let price_e8 = non_negative_e8("p", price)?;
    let volume_e8 = non_negative_e8("v", qty)?;
    let timestamp_ms = required("T", time)?.as_i64().ok_or("T: expected an integer")?;
    let is_buy = match text("S", side)?.as_ref() {
        "Buy" => true,
        "Sell" => false,
        _ => return Err(r#"S: expected "Buy" or "Sell""#.into()),
    };
    let id = text("i", id)?;
    // Spot ids are digits; derivatives send a UUID, which no 64-bit id can hold.
    let trade_id = id.parse::<u64>().unwrap_or(0);
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

/// A frame without a topic: an operation answer, refused only when it reports a failure.
fn operation_answer(success: Option<Json<'_>>, ret_msg: Option<Json<'_>>) -> Result<(), Reason> {
    match success.map(|s| s.as_bool()) {
        None | Some(Some(true)) => Ok(()),
        Some(Some(false)) => {
            let msg = ret_msg.and_then(|m| m.as_str()).filter(|m| !m.is_empty());
            Err(Reason::new(format!("venue error: {}", msg.unwrap_or(Cow::Borrowed("no message")))))
        }
        Some(None) => Err("success: expected true or false".into()),
    }
}

plugin_sdk::export!(Bybit);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/bybit_v5_public_trade.jsonl");

    fn harness() -> Harness<Bybit> {
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
        // The subscribe ack, a push of 1, one of 2, a pong, one of 3.
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1, 2, 0, 3]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        let sides: Vec<bool> = records.iter().map(|r| r.is_buy).collect();
        assert_eq!(sides, [true, false, true, true, false, false]);
        assert!(records.iter().all(|r| r.source_id == 0 && r.received_at_us == 0));
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        // A UUID trade id (derivatives) gives trade_id 0; T, not ts, is the trade time.
        assert_eq!(
            h.decode_named(line(2)).unwrap(),
            [trade("BTCUSDT", 1_657_850_000_000, 100_000, 1_672_304_486_865, true, 0)]
        );
        // Digit ids (spot) are kept.
        assert_eq!(
            h.decode_named(line(3)).unwrap(),
            [
                trade("ETHUSDT", 120_107_000_000, 25_000_000, 1_672_304_486_990, false, 2_290_000_000_036_455_162),
                trade("ETHUSDT", 120_110_000_000, 150_000_000, 1_672_304_486_995, true, 2_290_000_000_036_455_163),
            ]
        );
        assert_eq!(
            h.decode_named(line(5)).unwrap(),
            [
                trade("BTCUSDT", 1_703_250_000_000, 200_000, 1_671_181_689_021, true, 0),
                trade("BTCUSDT", 1_703_200_000_000, 1_000_000, 1_671_181_689_021, false, 0),
                trade("BTCUSDT", 1_703_199_000_000, 50_000_000, 1_671_181_689_022, false, 0),
            ]
        );
    }

    #[test]
    fn answers_and_other_topics_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"success":true,"ret_msg":"","conn_id":"d5phu6rboasumi7uds7g-223s","req_id":"100001","op":"subscribe"}"#,
            r#"{"success":true,"ret_msg":"pong","conn_id":"0970e817-426e-429a-a679-ff7f55e0b16a","op":"ping"}"#,
            r#"{"req_id":"100001","op":"pong","args":["1675418560633"],"conn_id":"cfcb4ocsvfriu23r3er0-1b"}"#,
            r#"{"topic":"orderbook.50.BTCUSDT","type":"snapshot","ts":1672304484978,"data":{"s":"BTCUSDT","b":[["16493.50","0.006"]],"a":[],"u":18521288,"seq":7961638724},"cts":1672304484976}"#,
            r#"{"topic":"tickers.BTCUSDT","type":"snapshot","ts":1673853746003,"cs":2588407389,"data":{"symbol":"BTCUSDT","lastPrice":"21109.77"}}"#,
            r#"{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1672304486868,"data":[]}"#,
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn failed_operations_are_refused_with_their_message() {
        let mut h = harness();
        let frame = br#"{"success":false,"ret_msg":"error:handler not found,topic:publicTrade.NOPE","conn_id":"2324d924-aa4d-45b0-a858-7b8be29ab52b","req_id":"","op":"subscribe"}"#;
        assert_eq!(
            h.decode(frame).unwrap_err().as_str(),
            "venue error: error:handler not found,topic:publicTrade.NOPE"
        );
        assert_eq!(h.decode(br#"{"success":false,"op":"subscribe"}"#).unwrap_err().as_str(), "venue error: no message");
        assert_eq!(h.decode(br#"{"success":"no"}"#).unwrap_err().as_str(), "success: expected true or false");
    }

    #[test]
    fn malformed_frames_name_the_trade_and_field() {
        let mut h = harness();
        let good = r#"{"T":1,"s":"BTCUSDT","S":"Buy","v":"1","p":"1","i":"7","BT":false}"#;
        let frame =
            |bad: &str| format!(r#"{{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":1,"data":[{good},{bad}]}}"#);
        let cases = [
            (r#"{"topic":"publicTrade.BTCUSDT""#.to_string(), "frame: invalid JSON at byte 30: expected ',' or '}'"),
            ("[]".into(), "frame: expected a JSON object"),
            (r#"{"topic":1}"#.into(), "topic: expected a string"),
            (r#"{"topic":"publicTrade.BTCUSDT"}"#.into(), "data: expected an array"),
            (frame("[]"), "trade 1 object: expected a JSON object"),
            (frame(&good.replace(r#""p":"1","#, "")), "trade 1 p: missing"),
            (frame(&good.replace(r#""p":"1""#, r#""p":"x""#)), "trade 1 p: invalid character at byte 0 of decimal"),
            (frame(&good.replace(r#""v":"1""#, r#""v":"-0.5""#)), "trade 1 v: negative decimal"),
            (frame(&good.replace(r#""v":"1""#, r#""v":1"#)), "trade 1 v: expected a string"),
            (frame(&good.replace(r#""s":"BTCUSDT","#, "")), "trade 1 s: missing"),
            (frame(&good.replace("BTCUSDT", "")), "trade 1 s: empty symbol"),
            (frame(&good.replace(r#""T":1"#, r#""T":"1""#)), "trade 1 T: expected an integer"),
            (frame(&good.replace(r#""S":"Buy""#, r#""S":"buy""#)), r#"trade 1 S: expected "Buy" or "Sell""#),
            (frame(&good.replace(r#""i":"7","#, "")), "trade 1 i: missing"),
            (frame(&good.replace(r#""i":"7""#, r#""i":7"#)), "trade 1 i: expected a string"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
        let out = h.decode_batch(&[frame(&good.replace("Buy", "x")).as_bytes(), line(2)]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 0);
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Bybit>::new(&[("category", "spot")]).is_err());
    }
}
