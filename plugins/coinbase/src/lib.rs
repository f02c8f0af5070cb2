//! Decodes Coinbase Exchange WebSocket `match` and `last_match` messages (the `matches` channel) into
//! sluice records.
//!
//! # Venue format
//! One JSON object per frame, its kind in `type`:
//!
//! ```json
//! {"type":"match","trade_id":280232,"maker_order_id":"2a0d...","taker_order_id":"3c82...","side":"sell",
//!  "size":"985","price":"0.00001305","product_id":"SKL-BTC","sequence":177100030,
//!  "time":"2021-04-17T16:43:37.089723Z"}
//! ```
//!
//! `last_match` (sent once per product on subscribing: the product's most recent trade) has the same
//! fields and gives the same record as that trade's `match`, `trade_id` included. A client that
//! subscribes again (a restart, a reconnect) may have logged that trade already: the host drops it by
//! trade id, or keeps it if it was missed, so the decoder need not tell them apart.
//!
//! | field        | meaning                                  | record                               |
//! |--------------|------------------------------------------|--------------------------------------|
//! | `product_id` | product, e.g. `BAND-GBP`                 | `symbol_id`                          |
//! | `price`      | decimal string                           | `price_e8` (exact)                   |
//! | `size`       | decimal string                           | `volume_e8` (exact)                  |
//! | `time`       | RFC 3339, microseconds                   | `timestamp_ms` (truncated)           |
//! | `side`       | side of the **maker** order              | `is_buy = (side == "sell")`          |
//! | `trade_id`   | integer (a digit string is also read)    | `trade_id`                           |
//!
//! Coinbase's `side` is the resting (maker) order's side: `"sell"` means a resting sell was hit, so the
//! taker bought.
//!
//! # What produces nothing, and what is refused
//! - Every other message type (`subscriptions`, `heartbeat`, `ticker`, `l2update`, `snapshot`,
//!   `received`, `open`, `done`, `change`, `status`, ...) pushes nothing and succeeds.
//! - `{"type":"error","message":"...","reason":"..."}` is refused with
//!   `venue error: <message> (<reason>)`, so the host dead-letters it and an operator sees that, say,
//!   a subscription failed.
//! - A frame that is not a JSON object, or has no `type`, is refused.
//! - A malformed `match` is refused with a reason naming the field: `price: missing`,
//!   `size: invalid character at byte 0 of decimal`, `time: timestamp is not RFC 3339`,
//!   `side: expected "buy" or "sell"`, ... Negative prices or sizes are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{non_negative_e8, text, unsigned};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::time::rfc3339_to_ms;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The Coinbase decoder. It keeps no state.
pub struct Coinbase;

/// The members this decoder reads, found in a single pass over the message.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<Json<'a>>,
    product: Option<Json<'a>>,
    price: Option<Json<'a>>,
    size: Option<Json<'a>>,
    time: Option<Json<'a>>,
    side: Option<Json<'a>>,
    trade_id: Option<Json<'a>>,
    message: Option<Json<'a>>,
    reason: Option<Json<'a>>,
}

impl<'a> Fields<'a> {
    fn scan(object: Json<'a>) -> Self {
        const OBJECT_KEYS: Keys<9> =
            Keys::new(["type", "product_id", "price", "size", "time", "side", "trade_id", "message", "reason"]);
        let [kind, product, price, size, time, side, trade_id, message, reason] = object.pick(&OBJECT_KEYS);
        Fields { kind, product, price, size, time, side, trade_id, message, reason }
    }
}

impl Plugin for Coinbase {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Coinbase)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let frame = Json::parse(frame).map_err(|e| Reason::field("frame", e))?;
        if frame.kind() != Kind::Object {
            return Err("frame: expected a JSON object".into());
        }
        let f = Fields::scan(frame);
        match text("type", f.kind)?.as_ref() {
            "match" | "last_match" => {}
            "error" => return Err(venue_error(&f)),
            _ => return Ok(()),
        }
        let product = text("product_id", f.product)?;
        if product.is_empty() {
            return Err("product_id: empty symbol".into());
        }
        let price_e8 = non_negative_e8("price", f.price)?;
        let volume_e8 = non_negative_e8("size", f.size)?;
        let timestamp_ms = rfc3339_to_ms(&text("time", f.time)?).map_err(|e| Reason::field("time", e))?;
        // The maker's side: a resting sell was hit by a buying taker.
        let is_buy = match text("side", f.side)?.as_ref() {
            "sell" => true,
            "buy" => false,
            _ => return Err(r#"side: expected "buy" or "sell""#.into()),
        };
        let trade_id = unsigned("trade_id", f.trade_id)?;
        out.push(&Record {
            symbol_id: symbol_id(&product),
            price_e8,
            volume_e8,
            timestamp_ms,
            is_buy,
            trade_id,
            ..Record::default()
        });
        Ok(())
    }
}

fn venue_error(f: &Fields<'_>) -> Reason {
    let message = f.message.and_then(|m| m.as_str()).unwrap_or(Cow::Borrowed("no message"));
    match f.reason.and_then(|r| r.as_str()) {
        Some(reason) if !reason.is_empty() => Reason::new(format!("venue error: {message} ({reason})")),
        _ => Reason::new(format!("venue error: {message}")),
    }
}

plugin_sdk::export!(Coinbase);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const MATCHES: &str = include_str!("../tests/fixtures/coinbase_exchange_match.jsonl");

    fn harness() -> Harness<Coinbase> {
        Harness::new(&[]).unwrap()
    }

    fn line(n: usize) -> &'static str {
        MATCHES.lines().nth(n - 1).unwrap()
    }

    /// Decodes one frame that must give exactly one record; returns its symbol name and the record with
    /// the symbol id zeroed.
    fn one(h: &mut Harness<Coinbase>, frame: &str) -> (String, Record) {
        let records = h.decode(frame.as_bytes()).unwrap();
        assert_eq!(records.len(), 1, "{frame}");
        (h.symbol(records[0].symbol_id).unwrap(), Record { symbol_id: 0, ..records[0] })
    }

    fn trade(price_e8: i64, volume_e8: i64, timestamp_ms: i64, is_buy: bool, trade_id: u64) -> Record {
        Record { price_e8, volume_e8, timestamp_ms, is_buy, trade_id, ..Record::default() }
    }

    #[test]
    fn every_fixture_line_decodes_to_one_trade() {
        let mut h = harness();
        let frames: Vec<&[u8]> = MATCHES.lines().map(str::as_bytes).collect();
        assert_eq!(frames.len(), 107);
        let out = h.decode_batch(&frames);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        assert!(out.per_frame.iter().all(|f| f.len() == 1));
        let records: Vec<Record> = out.per_frame.into_iter().flatten().collect();
        // 53 lines have a sell maker (taker bought), 54 a buy maker.
        assert_eq!(records.iter().filter(|r| r.is_buy).count(), 53);
        // Ten products; SKL-USD has 53 trades.
        let skl_usd = records.iter().filter(|r| h.symbol(r.symbol_id).as_deref() == Some("SKL-USD")).count();
        assert_eq!(skl_usd, 53);
        let mut ids: Vec<u32> = records.iter().map(|r| r.symbol_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 10);
        // All on 2021-04-17 between 16:41:49 and 16:44:07 UTC.
        assert!(records.iter().all(|r| (1_618_677_709_000..1_618_677_847_000).contains(&r.timestamp_ms)));
    }

    #[test]
    fn fixture_lines_field_by_field() {
        let mut h = harness();
        // last_match, maker sell: the taker bought.
        assert_eq!(
            one(&mut h, line(1)),
            ("BAND-GBP".into(), trade(1_477_750_000, 4_000_000, 1_618_677_810_244, true, 881_613))
        );
        // last_match, maker buy: the taker sold.
        assert_eq!(
            one(&mut h, line(2)),
            ("SKL-GBP".into(), trade(57_520_000, 100_820_000_000, 1_618_677_809_571, false, 82_007))
        );
        assert_eq!(one(&mut h, line(4)), ("YFI-BTC".into(), trade(82_601_000, 700, 1_618_677_795_270, false, 889_760)));
        // The first `match`.
        assert_eq!(
            one(&mut h, line(11)),
            ("SKL-BTC".into(), trade(1_305, 98_500_000_000, 1_618_677_817_089, true, 280_232))
        );
        assert_eq!(
            one(&mut h, line(31)),
            ("NU-GBP".into(), trade(43_930_000, 80_513_100_000, 1_618_677_826_345, true, 563_679))
        );
        assert_eq!(
            one(&mut h, line(32)),
            ("SKL-BTC".into(), trade(1_305, 100_600_000_000, 1_618_677_827_750, false, 280_236))
        );
        assert_eq!(
            one(&mut h, line(96)),
            ("BAND-GBP".into(), trade(1_476_460_000, 500_000_000, 1_618_677_845_617, false, 881_614))
        );
        assert_eq!(
            one(&mut h, line(107)),
            ("SKL-USD".into(), trade(79_020_000, 1_800_000_000, 1_618_677_846_669, false, 1_568_319))
        );
    }

    /// A `last_match` is the record of the trade's `match`, trade id included, for the host to drop
    /// as a duplicate when it already has it.
    #[test]
    fn last_match_is_the_record_of_its_match() {
        let mut h = harness();
        let matched = r#"{"type":"match","trade_id":1568319,"maker_order_id":"8d275e33-4b41-4648-b135-b407f85c6897","taker_order_id":"460227d8-3765-4185-8b7f-d9ee118403a2","side":"buy","size":"18","price":"0.7902","product_id":"SKL-USD","sequence":201390101,"time":"2021-04-17T16:44:06.669312Z"}"#;
        let last = matched.replace(r#""type":"match""#, r#""type":"last_match""#);
        let want = ("SKL-USD".to_string(), trade(79_020_000, 1_800_000_000, 1_618_677_846_669, false, 1_568_319));
        assert_eq!(one(&mut h, matched), want);
        assert_eq!(one(&mut h, &last), want);
    }

    #[test]
    fn time_offsets_and_string_trade_ids() {
        let mut h = harness();
        let frame = r#"{"type":"match","trade_id":"42","side":"buy","size":"1","price":"2","product_id":"BTC-USD","time":"2021-04-17T18:43:30.9999Z"}"#;
        assert_eq!(
            one(&mut h, frame),
            ("BTC-USD".into(), trade(200_000_000, 100_000_000, 1_618_685_010_999, false, 42))
        );
        let frame = frame.replace("18:43:30.9999Z", "18:43:30.9999+02:00");
        assert_eq!(one(&mut h, &frame).1.timestamp_ms, 1_618_677_810_999);
    }

    #[test]
    fn other_message_types_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"type":"subscriptions","channels":[{"name":"matches","product_ids":["BAND-GBP","SKL-USD"]}]}"#,
            r#"{"type":"heartbeat","sequence":90,"last_trade_id":20,"product_id":"BTC-USD","time":"2014-11-07T08:19:28.464459Z"}"#,
            r#"{"type":"ticker","sequence":37475248783,"product_id":"ETH-USD","price":"1285.22","open_24h":"1310.79","best_bid":"1285.04","side":"buy","time":"2022-10-19T23:28:22.061769Z","trade_id":370843401,"last_size":"0.00344255"}"#,
            r#"{"type":"l2update","product_id":"BTC-USD","changes":[["buy","22356.270000","0.00000000"]],"time":"2022-08-04T15:25:05.010758Z"}"#,
            r#"{"type":"snapshot","product_id":"BTC-USD","bids":[["10101.10","0.45054140"]],"asks":[["10102.55","0.57753524"]]}"#,
            r#"{"type":"received","time":"2014-11-07T08:19:27.028459Z","product_id":"BTC-USD","sequence":10,"order_id":"d50ec984","size":"1.34","price":"502.1","side":"buy","order_type":"limit"}"#,
            r#"{"type":"done","time":"2014-11-07T08:19:27.028459Z","product_id":"BTC-USD","sequence":10,"price":"200.2","order_id":"d50ec984","reason":"filled","side":"sell","remaining_size":"0"}"#,
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn error_messages_are_refused_with_their_text() {
        let mut h = harness();
        let err = h
            .decode(br#"{"type":"error","message":"Failed to subscribe","reason":"GBP-USD is not a valid product"}"#)
            .unwrap_err();
        assert_eq!(err.as_str(), "venue error: Failed to subscribe (GBP-USD is not a valid product)");
        let err = h.decode(br#"{"type":"error","message":"Malformed JSON"}"#).unwrap_err();
        assert_eq!(err.as_str(), "venue error: Malformed JSON");
        assert_eq!(h.decode(br#"{"type":"error"}"#).unwrap_err().as_str(), "venue error: no message");
    }

    #[test]
    fn malformed_frames_name_the_field() {
        let mut h = harness();
        let base = r#"{"type":"match","trade_id":7,"side":"sell","size":"0.04","price":"14.7775","product_id":"BAND-GBP","time":"2021-04-17T16:43:30.244075Z"}"#;
        assert_eq!(one(&mut h, base).1, trade(1_477_750_000, 4_000_000, 1_618_677_810_244, true, 7));
        let cases = [
            ("{\"type\":\"match\",", "frame: invalid JSON at byte 16: expected a string key"),
            ("[]", "frame: expected a JSON object"),
            (r#"{"product_id":"BAND-GBP"}"#, "type: missing"),
            (&base.replace(r#""price":"14.7775","#, ""), "price: missing"),
            (&base.replace("14.7775", "14,7775"), "price: invalid character at byte 2 of decimal"),
            (&base.replace("14.7775", "-14.7775"), "price: negative decimal"),
            (&base.replace(r#""size":"0.04""#, r#""size":0.04"#), "size: expected a string"),
            (&base.replace("0.04", "0.000000001"), "size: decimal has more than 8 significant decimal places"),
            (&base.replace(r#""product_id":"BAND-GBP","#, ""), "product_id: missing"),
            (&base.replace("BAND-GBP", ""), "product_id: empty symbol"),
            (&base.replace("2021-04-17T16:43:30.244075Z", "2021-04-17T16:43:30"), "time: timestamp is not RFC 3339"),
            (
                &base.replace("2021-04-17T16:43:30.244075Z", "2021-02-30T16:43:30Z"),
                "time: timestamp field out of range",
            ),
            (&base.replace(r#""side":"sell""#, r#""side":"SELL""#), r#"side: expected "buy" or "sell""#),
            (&base.replace(r#""side":"sell","#, ""), "side: missing"),
            (&base.replace(r#""trade_id":7"#, r#""trade_id":-7"#), "trade_id: expected an unsigned integer"),
            (&base.replace(r#""trade_id":7"#, r#""trade_id":"+7""#), "trade_id: expected an unsigned integer"),
            (&base.replace(r#""trade_id":7,"#, ""), "trade_id: missing"),
        ];
        for (frame, want) in cases {
            assert_eq!(h.decode(frame.as_bytes()).unwrap_err().as_str(), want, "{frame}");
        }
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let mut h = harness();
        let frame = r#"{"type":"last_m\u0061tch","trade_id":1,"side":"s\u0065ll","size":"1","price":"1","product_id":"BAND\u002dGBP","time":"2021-04-17T16:43:30Z"}"#;
        assert_eq!(
            one(&mut h, frame),
            ("BAND-GBP".into(), trade(100_000_000, 100_000_000, 1_618_677_810_000, true, 1))
        );
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Coinbase>::new(&[("products", "BTC-USD")]).is_err());
    }
}
