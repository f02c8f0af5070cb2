//! Decodes the Coinbase Advanced Trade WebSocket `market_trades` channel into sluice records.
//!
//! # Venue format
//! Every Advanced Trade message shares one envelope: the `channel`, a `timestamp`, a
//! `sequence_num` and a list of `events`. A `market_trades` event is a `snapshot` (sent on
//! subscribing) or an `update` (trades collected over the last 250 ms), each with its trades:
//!
//! ```json
//! {"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:19:35.39625135Z",
//!  "sequence_num":0,"events":[{"type":"snapshot","trades":[
//!    {"trade_id":"000000000","product_id":"ETH-USD","price":"1260.01","size":"0.3","side":"BUY",
//!     "time":"2019-08-14T20:42:27.265Z"}]}]}
//! ```
//!
//! | field        | meaning                                 | record                               |
//! |--------------|-----------------------------------------|--------------------------------------|
//! | `product_id` | product, e.g. `BTC-USD`                 | `symbol_id`                          |
//! | `price`      | decimal string                          | `price_e8` (exact)                   |
//! | `size`       | decimal string                          | `volume_e8` (exact)                  |
//! | `time`       | RFC 3339, up to ns                      | `timestamp_ms` (truncated)           |
//! | `side`       | side of the **maker** order, `BUY`/`SELL`| `is_buy = (side == "SELL")`         |
//! | `trade_id`   | digit string                            | `trade_id`                           |
//!
//! Like Coinbase Exchange's `match` (see the `coinbase` plugin), the `side` of a market trade is the
//! resting (maker) order's side: `SELL` means a resting sell was hit, so the taker bought. The record
//! keeps the taker's side, as every sluice decoder does. Every trade of every event gives one record,
//! in order; the envelope's `timestamp` (when the message was sent) is not the trade time.
//!
//! A `snapshot` event's trades (the most recent ones, newest first) are records like an `update`'s,
//! with their own `trade_id`s. A client that subscribes again (a restart, a reconnect) gets trades it
//! already logged among them: the host drops those by trade id and keeps the ones it missed, so the
//! decoder need not tell them apart.
//!
//! # What produces nothing, and what is refused
//! - Other channels push nothing: `subscriptions` (the answer to a subscribe), `heartbeats`
//!   (`{"channel":"heartbeats",...,"events":[{"current_time":"...","heartbeat_counter":"3049"}]}`),
//!   `ticker`, `l2_data`, `candles`, `status`, ...
//! - `{"type":"error","message":"..."}` is refused with `venue error: <message>`, so the host
//!   dead-letters it and an operator sees that, say, a subscription failed.
//! - A malformed `market_trades` message is refused as a whole (no partial output) with a reason
//!   naming the event, trade and field: `event 0 trade 1 price: missing`,
//!   `event 1 trade 0 side: expected "BUY" or "SELL"`, `events: expected an array`, ... Negative
//!   prices or sizes are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{non_negative_e8, text, unsigned};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::time::rfc3339_to_ms;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The Coinbase Advanced Trade decoder. It keeps no state.
pub struct CoinbaseAdvanced;

impl Plugin for CoinbaseAdvanced {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(CoinbaseAdvanced)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        const FRAME_KEYS: Keys<4> = Keys::new(["channel", "events", "type", "message"]);
        let [channel, events, kind, message] = frame.pick(&FRAME_KEYS);
        let Some(channel) = channel else {
            return match kind.and_then(|k| k.as_str()).as_deref() {
                Some("error") => {
                    let message = message.and_then(|m| m.as_str()).filter(|m| !m.is_empty());
                    Err(Reason::new(format!("venue error: {}", message.unwrap_or(Cow::Borrowed("no message")))))
                }
                _ => Ok(()),
            };
        };
        if text("channel", Some(channel))? != "market_trades" {
            return Ok(());
        }
        let events = events.filter(|e| e.kind() == Kind::Array).ok_or("events: expected an array")?;
        for (e, event) in events.elements().enumerate() {
            let trades = event.get("trades").filter(|t| t.kind() == Kind::Array);
            let trades = trades.ok_or_else(|| Reason::new(format!("event {e} trades: expected an array")))?;
            for (i, trade) in trades.elements().enumerate() {
                out.push(&decode_trade(trade).map_err(|r| Reason::new(format!("event {e} trade {i} {r}")))?);
            }
        }
        Ok(())
    }
}

/// One element of an event's `trades`.
fn decode_trade(trade: Json<'_>) -> Result<Record, Reason> {
    if trade.kind() != Kind::Object {
        return Err("object: expected a JSON object".into());
    }
    const TRADE_KEYS: Keys<6> = Keys::new(["trade_id", "product_id", "price", "size", "side", "time"]);
    let [trade_id, product, price, size, side, time] = trade.pick(&TRADE_KEYS);
    let product = text("product_id", product)?;
    if product.is_empty() {
        return Err("product_id: empty symbol".into());
    }
    let price_e8 = non_negative_e8("price", price)?;
    let volume_e8 = non_negative_e8("size", size)?;
    let timestamp_ms = rfc3339_to_ms(&text("time", time)?).map_err(|e| Reason::field("time", e))?;
    // The maker's side: a resting sell was hit by a buying taker.
    let is_buy = match text("side", side)?.as_ref() {
        "SELL" => true,
        "BUY" => false,
        _ => return Err(r#"side: expected "BUY" or "SELL""#.into()),
    };
    let trade_id = unsigned("trade_id", trade_id)?;
    Ok(Record {
        symbol_id: symbol_id(&product),
        price_e8,
        volume_e8,
        timestamp_ms,
        is_buy,
        trade_id,
        ..Record::default()
    })
}

plugin_sdk::export!(CoinbaseAdvanced);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const TRADES: &str = include_str!("../tests/fixtures/coinbase_advanced_market_trades.jsonl");

    fn harness() -> Harness<CoinbaseAdvanced> {
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
        // subscriptions, a snapshot of 2, a heartbeat, two update events of 1 and 2.
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 2, 0, 3]);
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        assert!(records.iter().all(|r| r.source_id == 0 && r.received_at_us == 0));
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        // Maker BUY: the taker sold. Maker SELL: the taker bought.
        assert_eq!(
            h.decode_named(line(2)).unwrap(),
            [
                trade("ETH-USD", 126_001_000_000, 30_000_000, 1_565_815_347_265, false, 0),
                trade("ETH-USD", 126_002_000_000, 125_000_000, 1_565_815_347_812, true, 1),
            ]
        );
        // Trades of every event, in order; `time`, not the envelope's timestamp.
        assert_eq!(
            h.decode_named(line(4)).unwrap(),
            [
                trade("BTC-USD", 3_041_257_000_000, 151_000, 1_687_552_286_998, true, 572_853_125),
                trade("BTC-USD", 3_041_250_000_000, 2_000_000, 1_687_552_286_999, false, 572_853_126),
                trade("ETH-USD", 187_480_000_000, 300_000_000, 1_687_552_286_999, true, 119_004_411),
            ]
        );
    }

    /// A snapshot event's trades decode like an update's, in the event's order (newest first): a
    /// trade seen in both gives the same record, with its trade id, for the host to drop as a
    /// duplicate.
    #[test]
    fn snapshot_trades_are_records_with_their_trade_ids() {
        let mut h = harness();
        let t = |id: u64, side: &str, price: &str| {
            format!(
                r#"{{"trade_id":"{id}","product_id":"BTC-USD","price":"{price}","size":"0.02","side":"{side}","time":"2023-06-23T20:31:2{}.5Z"}}"#,
                id % 10
            )
        };
        let envelope = |kind: &str, trades: &[String]| {
            format!(
                r#"{{"channel":"market_trades","client_id":"","timestamp":"2023-06-23T20:31:30Z","sequence_num":4,"events":[{{"type":"{kind}","trades":[{}]}}]}}"#,
                trades.join(",")
            )
        };
        let update = envelope("update", &[t(572_853_126, "BUY", "30412.5")]);
        let snapshot = envelope(
            "snapshot",
            &[t(572_853_127, "SELL", "30412.6"), t(572_853_126, "BUY", "30412.5"), t(572_853_125, "SELL", "30412.57")],
        );
        let live = h.decode_named(update.as_bytes()).unwrap();
        let snap = h.decode_named(snapshot.as_bytes()).unwrap();
        assert_eq!(
            snap,
            [
                trade("BTC-USD", 3_041_260_000_000, 2_000_000, 1_687_552_287_500, true, 572_853_127),
                trade("BTC-USD", 3_041_250_000_000, 2_000_000, 1_687_552_286_500, false, 572_853_126),
                trade("BTC-USD", 3_041_257_000_000, 2_000_000, 1_687_552_285_500, true, 572_853_125),
            ]
        );
        assert_eq!(snap[1], live[0]);
        // Subscribing before the product's first trade: an empty snapshot.
        assert_eq!(h.decode(envelope("snapshot", &[]).as_bytes()), Ok(vec![]));
    }

    #[test]
    fn other_channels_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"channel":"subscriptions","client_id":"","timestamp":"2023-02-09T20:19:35.30372018Z","sequence_num":0,"events":[{"subscriptions":{"market_trades":["BTC-USD"]}}]}"#,
            r#"{"channel":"heartbeats","client_id":"","timestamp":"2023-06-23T20:31:26.122969572Z","sequence_num":0,"events":[{"current_time":"2023-06-23 20:31:56.121961769 +0000 UTC m=+91717.525857105","heartbeat_counter":"3049"}]}"#,
            r#"{"channel":"ticker","client_id":"","timestamp":"2022-10-19T23:28:22.061769Z","sequence_num":0,"events":[{"type":"snapshot","tickers":[{"type":"ticker","product_id":"BTC-USD","price":"21932.98"}]}]}"#,
            r#"{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":0,"events":[{"type":"snapshot","product_id":"BTC-USD","updates":[{"side":"bid","event_time":"1970-01-01T00:00:00Z","price_level":"21921.73","new_quantity":"0.06317902"}]}]}"#,
            r#"{"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:19:35.39625135Z","sequence_num":1,"events":[]}"#,
            r#"{"type":"subscriptions"}"#,
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn venue_errors_are_refused_with_their_message() {
        let mut h = harness();
        assert_eq!(
            h.decode(br#"{"type":"error","message":"failure to subscribe"}"#).unwrap_err().as_str(),
            "venue error: failure to subscribe"
        );
        assert_eq!(h.decode(br#"{"type":"error"}"#).unwrap_err().as_str(), "venue error: no message");
    }

    #[test]
    fn malformed_frames_name_the_event_trade_and_field() {
        let mut h = harness();
        let good = r#"{"trade_id":"1","product_id":"BTC-USD","price":"1","size":"1","side":"BUY","time":"2023-06-23T20:31:26.998741Z"}"#;
        let frame = |bad: &str| {
            format!(
                r#"{{"channel":"market_trades","events":[{{"type":"update","trades":[{good}]}},{{"type":"update","trades":[{good},{bad}]}}]}}"#
            )
        };
        let cases = [
            (r#"{"channel":"market_trades""#.to_string(), "frame: invalid JSON at byte 26: expected ',' or '}'"),
            ("[]".into(), "frame: expected a JSON object"),
            (r#"{"channel":7}"#.into(), "channel: expected a string"),
            (r#"{"channel":"market_trades"}"#.into(), "events: expected an array"),
            (r#"{"channel":"market_trades","events":[{"type":"update"}]}"#.into(), "event 0 trades: expected an array"),
            (frame("1"), "event 1 trade 1 object: expected a JSON object"),
            (frame(&good.replace(r#""price":"1","#, "")), "event 1 trade 1 price: missing"),
            (frame(&good.replace(r#""price":"1""#, r#""price":1"#)), "event 1 trade 1 price: expected a string"),
            (frame(&good.replace(r#""size":"1""#, r#""size":"-1""#)), "event 1 trade 1 size: negative decimal"),
            (frame(&good.replace(r#""size":"1""#, r#""size":"""#)), "event 1 trade 1 size: empty decimal"),
            (frame(&good.replace(r#""product_id":"BTC-USD","#, "")), "event 1 trade 1 product_id: missing"),
            (frame(&good.replace("BTC-USD", "")), "event 1 trade 1 product_id: empty symbol"),
            (
                frame(&good.replace("2023-06-23T20:31:26.998741Z", "2023-06-23 20:31")),
                "event 1 trade 1 time: timestamp is not RFC 3339",
            ),
            (
                frame(&good.replace(r#""side":"BUY""#, r#""side":"buy""#)),
                r#"event 1 trade 1 side: expected "BUY" or "SELL""#,
            ),
            (
                frame(&good.replace(r#""trade_id":"1""#, r#""trade_id":"abc""#)),
                "event 1 trade 1 trade_id: expected an unsigned integer",
            ),
            (frame(&good.replace(r#""trade_id":"1","#, "")), "event 1 trade 1 trade_id: missing"),
        ];
        for (f, want) in cases {
            assert_eq!(h.decode(f.as_bytes()).unwrap_err().as_str(), want, "{f}");
        }
        let out = h.decode_batch(&[frame(&good.replace("BUY", "x")).as_bytes(), line(2)]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 0);
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<CoinbaseAdvanced>::new(&[("product_ids", "BTC-USD")]).is_err());
    }
}
