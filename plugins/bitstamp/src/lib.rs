//! Decodes the Bitstamp WebSocket API v2 `live_trades_{pair}` channels into sluice records.
//!
//! # Venue format
//! One JSON object per frame, its kind in `event`; a `trade` event carries one trade in `data`:
//!
//! ```json
//! {"event":"trade","channel":"live_trades_btcusd",
//!  "data":{"id":202476289,"timestamp":"1630048897","amount":0.0405,"amount_str":"0.04050000",
//!          "price":48839.67,"price_str":"48839.67","type":0,"microtimestamp":"1630048897897123",
//!          "buy_order_id":1395224563097600,"sell_order_id":1395224512327680}}
//! ```
//!
//! | field            | meaning                                    | record                            |
//! |------------------|--------------------------------------------|-----------------------------------|
//! | `channel`        | `live_trades_` + the pair, e.g. `btcusd`   | `symbol_id` of the pair (`btcusd`)|
//! | `price_str`      | price, decimal string                      | `price_e8` (exact)                |
//! | `amount_str`     | amount, decimal string                     | `volume_e8` (exact)               |
//! | `microtimestamp` | trade time, µs since the epoch, digit string| `timestamp_ms` (truncated)       |
//! | `type`           | trade type, `0` buy or `1` sell            | `is_buy = (type == 0)`            |
//! | `id`             | trade id                                   | `trade_id`                        |
//!
//! Bitstamp's `type` is the side of the order that triggered the trade (the taker). `price` and
//! `amount` repeat the decimals as JSON numbers, which a float may already have rounded, so the exact
//! `_str` forms are read instead. `timestamp` (whole seconds) and the order ids are ignored. The pair
//! is written in lower case, as Bitstamp writes it in the channel name.
//!
//! # What produces nothing, and what is refused
//! - Every other event pushes nothing: `bts:subscription_succeeded`, `bts:unsubscription_succeeded`,
//!   `bts:heartbeat` (the answer to the client's heartbeat), `bts:request_reconnect` (the server
//!   asks the client to reconnect; the source reconnects when the server then closes the connection),
//!   and the events of other channels (`data`, `order_created`, ...).
//! - `{"event":"bts:error","channel":"","data":{"code":null,"message":"..."}}` is refused with
//!   `venue error: <message>`, so the host dead-letters it and an operator sees that a subscription
//!   failed.
//! - A malformed `trade` is refused with a reason naming the field: `price_str: missing`,
//!   `microtimestamp: expected an unsigned integer`, `type: expected 0 or 1`,
//!   `channel: expected live_trades_<pair>`, ... Negative prices or amounts are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{non_negative_e8, required, text, unsigned};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::time::micros_to_ms;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The Bitstamp decoder. It keeps no state.
pub struct Bitstamp;

impl Plugin for Bitstamp {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Bitstamp)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        const FRAME_KEYS: Keys<3> = Keys::new(["event", "channel", "data"]);
        let [event, channel, data] = frame.pick(&FRAME_KEYS);
        match text("event", event)?.as_ref() {
            "trade" => {}
            "bts:error" => return Err(venue_error(data)),
            _ => return Ok(()),
        }
        let channel = text("channel", channel)?;
        let pair = match channel.strip_prefix("live_trades_") {
            Some(pair) if !pair.is_empty() => pair,
            _ => return Err("channel: expected live_trades_<pair>".into()),
        };
        let data = data.filter(|d| d.kind() == Kind::Object).ok_or("data: expected an object")?;
        const DATA_KEYS: Keys<5> = Keys::new(["id", "price_str", "amount_str", "type", "microtimestamp"]);
        let [id, price, amount, kind, micros] = data.pick(&DATA_KEYS);
        let price_e8 = non_negative_e8("price_str", price)?;
        let volume_e8 = non_negative_e8("amount_str", amount)?;
        let micros = i64::try_from(unsigned("microtimestamp", micros)?)
            .map_err(|_| Reason::field("microtimestamp", "out of range"))?;
        let is_buy = match required("type", kind)?.as_u64() {
            Some(0) => true,
            Some(1) => false,
            _ => return Err("type: expected 0 or 1".into()),
        };
        let trade_id = unsigned("id", id)?;
        out.push(&Record {
            symbol_id: symbol_id(pair),
            price_e8,
            volume_e8,
            timestamp_ms: micros_to_ms(micros),
            is_buy,
            trade_id,
            ..Record::default()
        });
        Ok(())
    }
}

/// `venue error: <message>` from a `bts:error` event's `data`.
fn venue_error(data: Option<Json<'_>>) -> Reason {
    let message = data.and_then(|d| d.get("message")).and_then(|m| m.as_str()).filter(|m| !m.is_empty());
    Reason::new(format!("venue error: {}", message.unwrap_or(Cow::Borrowed("no message"))))
}

plugin_sdk::export!(Bitstamp);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/bitstamp_v2_live_trades.jsonl");

    fn harness() -> Harness<Bitstamp> {
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
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1, 1, 0, 1]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        assert!(records.iter().all(|r| r.source_id == 0 && r.received_at_us == 0));
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        // type 0: a buy; microtimestamp truncated to ms.
        assert_eq!(
            h.decode_named(line(2)).unwrap(),
            [trade("btcusd", 4_883_967_000_000, 4_050_000, 1_630_048_897_897, true, 202_476_289)]
        );
        assert_eq!(
            h.decode_named(line(3)).unwrap(),
            [trade("btcusd", 4_883_810_000_000, 120_000_000, 1_630_048_898_004, false, 202_476_290)]
        );
        assert_eq!(
            h.decode_named(line(5)).unwrap(),
            [trade("etheur", 320_150_000_000, 350_000_000, 1_630_048_899_000, false, 14_826_733)]
        );
    }

    #[test]
    fn the_exact_strings_win_over_the_float_copies() {
        let mut h = harness();
        let frame = br#"{"event":"trade","channel":"live_trades_btcusd","data":{"id":1,"amount":0.1,"amount_str":"0.10000001","price":1.0,"price_str":"0.99999999","type":0,"microtimestamp":"999"}}"#;
        assert_eq!(h.decode_named(frame).unwrap(), [trade("btcusd", 99_999_999, 10_000_001, 0, true, 1)]);
    }

    #[test]
    fn other_events_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"event":"bts:subscription_succeeded","channel":"live_trades_btcusd","data":{}}"#,
            r#"{"event":"bts:unsubscription_succeeded","channel":"live_trades_btcusd","data":{}}"#,
            r#"{"event":"bts:heartbeat","channel":"","data":{"status":"success"}}"#,
            r#"{"event":"bts:request_reconnect","channel":"","data":""}"#,
            r#"{"data":{"timestamp":"1630048897","microtimestamp":"1630048897897123","bids":[["48830.00","0.5"]],"asks":[]},"channel":"order_book_btcusd","event":"data"}"#,
            r#"{"data":{"id":1395224563097600,"amount":0.1,"amount_str":"0.1","price":1,"price_str":"1","order_type":0,"datetime":"1630048897","microtimestamp":"1630048897897123"},"channel":"live_orders_btcusd","event":"order_created"}"#,
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn venue_errors_are_refused_with_their_message() {
        let mut h = harness();
        let frame = br#"{"event":"bts:error","channel":"","data":{"code":null,"message":"Bad subscription string."}}"#;
        assert_eq!(h.decode(frame).unwrap_err().as_str(), "venue error: Bad subscription string.");
        assert_eq!(h.decode(br#"{"event":"bts:error"}"#).unwrap_err().as_str(), "venue error: no message");
    }

    #[test]
    fn malformed_frames_name_the_field() {
        let mut h = harness();
        let good = r#"{"event":"trade","channel":"live_trades_btcusd","data":{"id":1,"amount_str":"1","price_str":"1","type":0,"microtimestamp":"1000"}}"#;
        assert_eq!(h.decode(good.as_bytes()).unwrap().len(), 1);
        let cases = [
            (r#"{"event":"trade""#.to_string(), "frame: invalid JSON at byte 16: expected ',' or '}'"),
            ("[]".into(), "frame: expected a JSON object"),
            ("{}".into(), "event: missing"),
            (good.replace(r#""channel":"live_trades_btcusd","#, ""), "channel: missing"),
            (good.replace("live_trades_btcusd", "live_trades_"), "channel: expected live_trades_<pair>"),
            (good.replace("live_trades_btcusd", "live_orders_btcusd"), "channel: expected live_trades_<pair>"),
            (good.replace(r#""data":{"#, r#""data":[{"#).replace("}}", "}]}"), "data: expected an object"),
            (good.replace(r#""price_str":"1","#, ""), "price_str: missing"),
            (good.replace(r#""price_str":"1""#, r#""price_str":1"#), "price_str: expected a string"),
            (good.replace(r#""amount_str":"1""#, r#""amount_str":"-1""#), "amount_str: negative decimal"),
            (
                good.replace(r#""amount_str":"1""#, r#""amount_str":"1,5""#),
                "amount_str: invalid character at byte 1 of decimal",
            ),
            (
                good.replace(r#""microtimestamp":"1000""#, r#""microtimestamp":"1.5""#),
                "microtimestamp: expected an unsigned integer",
            ),
            (
                good.replace(r#""microtimestamp":"1000""#, r#""microtimestamp":"18446744073709551615""#),
                "microtimestamp: out of range",
            ),
            (good.replace(r#""type":0"#, r#""type":2"#), "type: expected 0 or 1"),
            (good.replace(r#""type":0"#, r#""type":"0""#), "type: expected 0 or 1"),
            (good.replace(r#""type":0,"#, ""), "type: missing"),
            (good.replace(r#""id":1,"#, ""), "id: missing"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Bitstamp>::new(&[("pair", "btcusd")]).is_err());
    }
}
