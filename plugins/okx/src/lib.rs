//! Decodes the OKX API v5 public WebSocket `trades` channel into sluice records.
//!
//! # Venue format
//! A push carries the subscription it belongs to in `arg` and one or more trades in `data`:
//!
//! ```json
//! {"arg":{"channel":"trades","instId":"BTC-USDT"},
//!  "data":[{"instId":"BTC-USDT","tradeId":"130639474","px":"42219.9","sz":"0.12060306",
//!           "side":"buy","ts":"1630048897897","count":"3","source":"0","seqId":1234}]}
//! ```
//!
//! OKX documents every field of a trade as a string:
//!
//! | field     | meaning                                         | record                          |
//! |-----------|-------------------------------------------------|---------------------------------|
//! | `instId`  | instrument, e.g. `BTC-USDT`                     | `symbol_id`                     |
//! | `px`      | trade price, decimal string                     | `price_e8` (exact)              |
//! | `sz`      | trade quantity, decimal string                  | `volume_e8` (exact)             |
//! | `ts`      | trade time, ms since the epoch, digit string    | `timestamp_ms`                  |
//! | `side`    | trade direction of the **taker**, `buy`/`sell`  | `is_buy = (side == "buy")`      |
//! | `tradeId` | trade id, digit string                          | `trade_id`                      |
//!
//! `count` (how many trades OKX aggregated into this one), `source` and `seqId` are ignored; a
//! number is accepted wherever a digit string is documented. Each trade in `data` gives one record,
//! in order. Pushes of other channels (`arg.channel` other than `trades`) are ignored.
//!
//! # What produces nothing, and what is refused
//! - The text frame `pong`, OKX's answer to the client's keep-alive `ping`, pushes nothing.
//! - Events other than errors push nothing: `{"event":"subscribe","arg":{...},"connId":"..."}`,
//!   `unsubscribe`, `notice` (a service upgrade is coming) and `channel-conn-count`.
//! - `{"event":"error","code":"60012","msg":"..."}` is refused with `venue error 60012: <msg>`, so the
//!   host dead-letters it and an operator sees that a subscription failed.
//! - A malformed push is refused as a whole (no partial output) with a reason naming the trade and
//!   field: `trade 1 px: missing`, `trade 0 tradeId: expected an unsigned integer`,
//!   `trade 2 side: expected "buy" or "sell"`, `data: expected an array`, ... Negative prices or
//!   sizes are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{integer, non_negative_e8, text, unsigned};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The OKX decoder. It keeps no state.
pub struct Okx;

impl Plugin for Okx {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Okx)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        // The keep-alive answer is plain text, not JSON.
        if frame.trim_ascii() == b"pong" {
            return Ok(());
        }
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        const FRAME_KEYS: Keys<5> = Keys::new(["event", "arg", "data", "code", "msg"]);
        let [event, arg, data, code, msg] = frame.pick(&FRAME_KEYS);
        if let Some(event) = event {
            return match text("event", Some(event))?.as_ref() {
                "error" => Err(venue_error(code, msg)),
                _ => Ok(()),
            };
        }
        let channel = arg.and_then(|a| a.get("channel")).and_then(|c| c.as_str());
        if channel.as_deref() != Some("trades") {
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
    const TRADE_KEYS: Keys<6> = Keys::new(["instId", "tradeId", "px", "sz", "side", "ts"]);
    let [inst_id, trade_id, px, sz, side, ts] = trade.pick(&TRADE_KEYS);
    let inst_id = text("instId", inst_id)?;
    if inst_id.is_empty() {
        return Err("instId: empty symbol".into());
    }
    let price_e8 = non_negative_e8("px", px)?;
    let volume_e8 = non_negative_e8("sz", sz)?;
    let timestamp_ms = integer("ts", ts)?;
    let is_buy = match text("side", side)?.as_ref() {
        "buy" => true,
        "sell" => false,
        _ => return Err(r#"side: expected "buy" or "sell""#.into()),
    };
    let trade_id = unsigned("tradeId", trade_id)?;
    Ok(Record {
        symbol_id: symbol_id(&inst_id),
        price_e8,
        volume_e8,
        timestamp_ms,
        is_buy,
        trade_id,
        ..Record::default()
    })
}

/// `venue error <code>: <msg>` from an error event.
fn venue_error(code: Option<Json<'_>>, msg: Option<Json<'_>>) -> Reason {
    let code = code.and_then(|c| c.as_str().or_else(|| c.as_number_text().map(Cow::Borrowed)));
    let msg = msg.and_then(|m| m.as_str()).filter(|m| !m.is_empty()).unwrap_or(Cow::Borrowed("no message"));
    Reason::new(format!("venue error {}: {msg}", code.unwrap_or(Cow::Borrowed("?"))))
}

plugin_sdk::export!(Okx);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/okx_v5_trades.jsonl");

    fn harness() -> Harness<Okx> {
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
        // The subscribe answer, then pushes of 1, 2, 1 and 3 trades.
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1, 2, 1, 3]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        assert!(records.iter().all(|r| r.source_id == 0 && r.received_at_us == 0));
        let ids: Vec<u64> = records.iter().map(|r| r.trade_id).collect();
        assert_eq!(ids, [130_639_474, 512_003, 512_004, 4, 130_639_475, 130_639_476, 130_639_477]);
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        assert_eq!(
            h.decode_named(line(2)).unwrap(),
            [trade("BTC-USDT", 4_221_990_000_000, 12_060_306, 1_630_048_897_897, true, 130_639_474)]
        );
        assert_eq!(
            h.decode_named(line(3)).unwrap(),
            [
                trade("ETH-USDT", 301_142_000_000, 150_000_000, 1_630_048_898_001, false, 512_003),
                trade("ETH-USDT", 301_140_000_000, 25_000_000, 1_630_048_898_001, false, 512_004),
            ]
        );
        assert_eq!(
            h.decode_named(line(4)).unwrap(),
            [trade("BTC-USD-231229-35000-C", 15_250_000, 2_100_000_000, 1_681_473_269_025, false, 4)]
        );
        assert_eq!(
            h.decode_named(line(5)).unwrap(),
            [
                trade("BTC-USDT", 4_222_000_000_000, 100_000, 1_630_048_899_102, true, 130_639_475),
                trade("BTC-USDT", 4_222_010_000_000, 50_000_000, 1_630_048_899_102, true, 130_639_476),
                trade("BTC-USDT", 4_221_850_000_000, 3_000_000, 1_630_048_899_230, false, 130_639_477),
            ]
        );
    }

    #[test]
    fn numbers_are_read_where_digit_strings_are_documented() {
        let mut h = harness();
        let frame = br#"{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":9,"px":"1","sz":"2","side":"buy","ts":1630048897897}]}"#;
        assert_eq!(
            h.decode_named(frame).unwrap(),
            [trade("BTC-USDT", 100_000_000, 200_000_000, 1_630_048_897_897, true, 9)]
        );
    }

    #[test]
    fn control_frames_and_other_channels_push_nothing() {
        let mut h = harness();
        let frames = [
            "pong",
            "pong\n",
            r#"{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"accb8e21"}"#,
            r#"{"event":"unsubscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"accb8e21"}"#,
            r#"{"event":"notice","code":"64008","msg":"The connection will soon be closed for a service upgrade. Please reconnect.","connId":"a4d3ae55"}"#,
            r#"{"event":"channel-conn-count","channel":"trades","connCount":"2","connId":"abcd1234"}"#,
            r#"{"arg":{"channel":"tickers","instId":"BTC-USDT"},"data":[{"instType":"SPOT","instId":"BTC-USDT","last":"9999.99"}]}"#,
            r#"{"arg":{"channel":"books5","instId":"BTC-USDT"},"data":[{"asks":[["8476.98","415","0","13"]],"bids":[],"instId":"BTC-USDT","ts":"1597026383085"}]}"#,
            r#"{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[]}"#,
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn venue_errors_are_refused_with_their_code_and_message() {
        let mut h = harness();
        let frame = br#"{"event":"error","code":"60012","msg":"Invalid request: {\"op\": \"subscribe\", \"argss\":[{ \"channel\" : \"trades\", \"instId\" : \"BTC-USDT\"}]}","connId":"a4d3ae55"}"#;
        assert_eq!(
            h.decode(frame).unwrap_err().as_str(),
            r#"venue error 60012: Invalid request: {"op": "subscribe", "argss":[{ "channel" : "trades", "instId" : "BTC-USDT"}]}"#
        );
        let frame = br#"{"event":"error","code":"60018","msg":"Wrong URL or channel:trades,instId:NOPE-USDT doesn't exist.","connId":"a4d3ae55"}"#;
        assert_eq!(
            h.decode(frame).unwrap_err().as_str(),
            "venue error 60018: Wrong URL or channel:trades,instId:NOPE-USDT doesn't exist."
        );
        assert_eq!(h.decode(br#"{"event":"error"}"#).unwrap_err().as_str(), "venue error ?: no message");
    }

    #[test]
    fn malformed_frames_name_the_trade_and_field() {
        let mut h = harness();
        let good = r#"{"instId":"BTC-USDT","tradeId":"1","px":"1","sz":"1","side":"buy","ts":"1"}"#;
        let frame =
            |bad: &str| format!(r#"{{"arg":{{"channel":"trades","instId":"BTC-USDT"}},"data":[{good},{bad}]}}"#);
        let cases = [
            (r#"{"arg":{"channel":"trades""#.to_string(), "frame: invalid JSON at byte 26: expected ',' or '}'"),
            ("ping".into(), "frame: invalid JSON at byte 0: expected a value"),
            ("[1]".into(), "frame: expected a JSON object"),
            (r#"{"event":7}"#.into(), "event: expected a string"),
            (r#"{"arg":{"channel":"trades"}}"#.into(), "data: expected an array"),
            (r#"{"arg":{"channel":"trades"},"data":{}}"#.into(), "data: expected an array"),
            (frame("7"), "trade 1 object: expected a JSON object"),
            (frame(&good.replace(r#""px":"1","#, "")), "trade 1 px: missing"),
            (frame(&good.replace(r#""px":"1""#, r#""px":1"#)), "trade 1 px: expected a string"),
            (
                frame(&good.replace(r#""px":"1""#, r#""px":"1.2.3""#)),
                "trade 1 px: invalid character at byte 3 of decimal",
            ),
            (frame(&good.replace(r#""sz":"1""#, r#""sz":"-1""#)), "trade 1 sz: negative decimal"),
            (frame(&good.replace(r#""instId":"BTC-USDT","#, "")), "trade 1 instId: missing"),
            (frame(&good.replace("BTC-USDT", "")), "trade 1 instId: empty symbol"),
            (frame(&good.replace(r#""ts":"1""#, r#""ts":"1.5""#)), "trade 1 ts: expected an integer"),
            (frame(&good.replace(r#""side":"buy""#, r#""side":"BUY""#)), r#"trade 1 side: expected "buy" or "sell""#),
            (
                frame(&good.replace(r#""tradeId":"1""#, r#""tradeId":"-1""#)),
                "trade 1 tradeId: expected an unsigned integer",
            ),
            (frame(&good.replace(r#""tradeId":"1","#, "")), "trade 1 tradeId: missing"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
        // The good trade before the bad one is dropped with the frame.
        let out = h.decode_batch(&[frame(&good.replace("buy", "x")).as_bytes(), line(2)]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 0);
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Okx>::new(&[("instId", "BTC-USDT")]).is_err());
    }
}
