//! Decodes Binance Spot WebSocket trade events (`aggTrade` and `trade`) into sluice records.
//!
//! # Venue format
//! Frames arrive either raw, as sent on `/ws/<stream>`:
//!
//! ```json
//! {"e":"aggTrade","E":1633998523963,"s":"NKNUSDT","a":15683430,"p":"0.35280000","q":"58.00000000",
//!  "f":19862790,"l":19862790,"T":1633998523963,"m":false,"M":true}
//! ```
//!
//! or wrapped by a combined stream (`/stream?streams=...`) as `{"stream":"nknusdt@aggTrade","data":{...}}`.
//! Binance US sends the same shapes.
//!
//! | field | meaning                        | record                                   |
//! |-------|--------------------------------|------------------------------------------|
//! | `e`   | event type                     | `aggTrade` and `trade` are decoded       |
//! | `s`   | symbol, e.g. `NKNUSDT`         | `symbol_id`                              |
//! | `p`   | price, decimal string          | `price_e8` (exact)                       |
//! | `q`   | quantity, decimal string       | `volume_e8` (exact)                      |
//! | `T`   | trade time, ms since the epoch | `timestamp_ms` (not `E`, the event time) |
//! | `m`   | is the buyer the market maker? | `is_buy = !m` (the taker bought)         |
//! | `a`   | aggregate trade id (`aggTrade`)| `trade_id`                               |
//! | `t`   | trade id (`trade`)             | `trade_id`                               |
//!
//! In a `trade` event `a` is the seller's order id (older payloads), so it is never read there.
//!
//! # What produces nothing, and what is refused
//! - Frames that carry no trade push nothing and succeed: subscription responses such as
//!   `{"result":null,"id":1}`, other event types (`depthUpdate`, `24hrTicker`, `kline`, ...) and
//!   array payloads (`!ticker@arr`, raw or combined).
//! - Venue error responses (`{"error":{"code":2,"msg":"..."},"id":1}` or `{"code":1,"msg":"..."}`) are
//!   refused with `venue error <code>: <msg>`, so the host dead-letters them and an operator sees that a
//!   subscription failed.
//! - A malformed trade event is refused with a reason naming the field: `frame: invalid JSON ...`,
//!   `p: missing`, `q: invalid character at byte 3 of decimal`, `m: expected true or false`, ...
//!   Negative prices or quantities are refused too.
//!
//! # Config
//! None: any config key fails `init`.

use std::borrow::Cow;

use plugin_sdk::field::{non_negative_e8, required, text};
use plugin_sdk::json::{Json, Keys, Kind};
use plugin_sdk::{Config, Plugin, Reason, Record, Records, symbol_id};

/// The Binance decoder. It keeps no state.
pub struct Binance;

/// The members of one event object this decoder cares about, found in a single pass.
#[derive(Default)]
struct Fields<'a> {
    event: Option<Json<'a>>,
    symbol: Option<Json<'a>>,
    price: Option<Json<'a>>,
    quantity: Option<Json<'a>>,
    trade_time: Option<Json<'a>>,
    buyer_is_maker: Option<Json<'a>>,
    agg_id: Option<Json<'a>>,
    trade_id: Option<Json<'a>>,
    // Envelope and response members.
    data: Option<Json<'a>>,
    error: Option<Json<'a>>,
    code: Option<Json<'a>>,
    msg: Option<Json<'a>>,
}

/// The names [`Fields`] reads, in its order; a combined-stream envelope's event is its `data`.
const EVENT: Keys<12> =
    Keys::new(["e", "s", "p", "q", "T", "m", "a", "t", "data", "error", "code", "msg"]).with_inner("data");

impl<'a> Fields<'a> {
    fn new(members: [Option<Json<'a>>; 12]) -> Self {
        let [event, symbol, price, quantity, trade_time, buyer_is_maker, agg_id, trade_id, data, error, code, msg] =
            members;
        Fields { event, symbol, price, quantity, trade_time, buyer_is_maker, agg_id, trade_id, data, error, code, msg }
    }
}

impl Plugin for Binance {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(Binance)
    }

    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        // One pass checks the frame and reads the fields, of the root and of an envelope's `data`.
        let picked = Json::parse_pick(frame, &EVENT).map_err(|e| Reason::field("frame", e))?;
        match picked.document.kind() {
            Kind::Object => {}
            // `!ticker@arr` and friends: never trades.
            Kind::Array => return Ok(()),
            _ => return Err("frame: expected a JSON object".into()),
        }
        let top = match picked.document.members().next() {
            // A combined-stream envelope (`stream` comes first): only its `data` matters.
            Some((key, _)) if key.plain() == Some(b"stream") => {
                Fields { data: Fields::new(picked.root).data, ..Fields::default() }
            }
            _ => Fields::new(picked.root),
        };
        let event = match (top.data, picked.inner) {
            // A combined-stream envelope: the event is its `data`.
            (Some(_), Some(inner)) => Fields::new(inner),
            (Some(_), None) => return Ok(()),
            (None, _) => top,
        };
        let Some(kind) = event.event else {
            return venue_error(&event);
        };
        let id_field = match kind.as_raw_str() {
            Some("aggTrade") => ("a", event.agg_id),
            Some("trade") => ("t", event.trade_id),
            Some(_) => return Ok(()),
            None => match kind.as_str() {
                // An escaped event name: compare the unescaped text.
                Some(name) if name == "aggTrade" => ("a", event.agg_id),
                Some(name) if name == "trade" => ("t", event.trade_id),
                Some(_) => return Ok(()),
                None => return Err("e: expected a string".into()),
            },
        };
        let symbol = text("s", event.symbol)?;
        if symbol.is_empty() {
            return Err("s: empty symbol".into());
        }
        let price_e8 = non_negative_e8("p", event.price)?;
        let volume_e8 = non_negative_e8("q", event.quantity)?;
        let timestamp_ms = required("T", event.trade_time)?.as_i64().ok_or("T: expected an integer")?;
        let buyer_is_maker = required("m", event.buyer_is_maker)?.as_bool().ok_or("m: expected true or false")?;
        let trade_id = required(id_field.0, id_field.1)?
            .as_u64()
            .ok_or_else(|| Reason::field(id_field.0, "expected an unsigned integer"))?;
        out.push(&Record {
            symbol_id: symbol_id(&symbol),
            price_e8,
            volume_e8,
            timestamp_ms,
            is_buy: !buyer_is_maker,
            trade_id,
            ..Record::default()
        });
        Ok(())
    }
}

/// Refuses a venue error response; anything else without an event type pushes nothing.
fn venue_error(fields: &Fields<'_>) -> Result<(), Reason> {
    let (code, msg) = match fields.error {
        Some(error) if error.kind() == Kind::Object => (error.get("code"), error.get("msg")),
        Some(error) if !error.is_null() => (None, Some(error)),
        _ if fields.msg.is_some() => (fields.code, fields.msg),
        _ => return Ok(()),
    };
    let code = code.and_then(|c| c.as_number_text()).unwrap_or("?");
    let msg = msg.and_then(|m| m.as_str()).unwrap_or(Cow::Borrowed("no message"));
    Err(Reason::new(format!("venue error {code}: {msg}")))
}

plugin_sdk::export!(Binance);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    const COMBINED: &str = include_str!("../tests/fixtures/binance_combined_aggtrade.jsonl");
    const US_COMBINED: &str = include_str!("../tests/fixtures/binance_us_combined_aggtrade.jsonl");

    fn harness() -> Harness<Binance> {
        Harness::new(&[]).unwrap()
    }

    /// Decodes one frame that must give exactly one record; returns it with its symbol name.
    fn one(h: &mut Harness<Binance>, frame: &str) -> (String, Record) {
        let records = h.decode(frame.as_bytes()).unwrap();
        assert_eq!(records.len(), 1, "{frame}");
        (h.symbol(records[0].symbol_id).unwrap(), records[0])
    }

    fn trade(price_e8: i64, volume_e8: i64, timestamp_ms: i64, is_buy: bool, trade_id: u64) -> Record {
        Record { price_e8, volume_e8, timestamp_ms, is_buy, trade_id, ..Record::default() }
    }

    /// The record without its symbol id (compared by name instead).
    fn unsymbolled(r: Record) -> Record {
        Record { symbol_id: 0, ..r }
    }

    #[test]
    fn every_fixture_line_decodes_to_one_trade() {
        let mut h = harness();
        let lines: Vec<&str> = COMBINED.lines().chain(US_COMBINED.lines()).collect();
        assert_eq!(lines.len(), 13);
        let frames: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        let out = h.decode_batch(&frames);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![1; 13]);
        // Aggregate ids 425085..=425095 on Binance US, in order.
        let us_ids: Vec<u64> = out.per_frame[2..].iter().map(|f| f[0].trade_id).collect();
        assert_eq!(us_ids, (425_085..=425_095).collect::<Vec<u64>>());
        // m is false on the first two US lines only.
        let buys: Vec<bool> = out.per_frame[2..].iter().map(|f| f[0].is_buy).collect();
        assert_eq!(buys, [[true; 2].as_slice(), &[false; 9]].concat());
        for r in out.per_frame.iter().flatten() {
            assert_eq!((r.source_id, r.received_at_us), (0, 0));
        }
    }

    #[test]
    fn combined_fixture_lines_field_by_field() {
        let mut h = harness();
        let lines: Vec<&str> = COMBINED.lines().collect();
        let (sym, r) = one(&mut h, lines[0]);
        assert_eq!(sym, "NKNUSDT");
        assert_eq!(unsymbolled(r), trade(35_280_000, 5_800_000_000, 1_633_998_523_963, true, 15_683_430));
        let (sym, r) = one(&mut h, lines[1]);
        assert_eq!(sym, "LRCBTC");
        assert_eq!(unsymbolled(r), trade(638, 17_700_000_000, 1_633_998_534_486, true, 9_213_679));
    }

    #[test]
    fn us_fixture_lines_field_by_field() {
        let mut h = harness();
        let lines: Vec<&str> = US_COMBINED.lines().collect();
        // Line 1: T (…467) differs from E (…468); the trade time is T.
        let (sym, r) = one(&mut h, lines[0]);
        assert_eq!(sym, "OMGBUSD");
        assert_eq!(unsymbolled(r), trade(1_380_480_000, 210_000_000, 1_633_998_288_467, true, 425_085));
        let (_, r) = one(&mut h, lines[1]);
        assert_eq!(unsymbolled(r), trade(1_380_760_000, 10_582_000_000, 1_633_998_288_467, true, 425_086));
        // Line 3: m is true, the buyer was the maker, so the taker sold.
        let (_, r) = one(&mut h, lines[2]);
        assert_eq!(unsymbolled(r), trade(1_380_040_000, 3_011_000_000, 1_633_998_289_097, false, 425_087));
        let (_, r) = one(&mut h, lines[7]);
        assert_eq!(unsymbolled(r), trade(1_377_690_000, 11_000_000_000, 1_633_998_291_914, false, 425_092));
        let (sym, r) = one(&mut h, lines[10]);
        assert_eq!(sym, "OMGBUSD");
        assert_eq!(unsymbolled(r), trade(1_376_040_000, 1_000_000_000, 1_633_998_301_807, false, 425_095));
    }

    #[test]
    fn raw_agg_trade_event() {
        let mut h = harness();
        let frame = r#"{"e":"aggTrade","E":123456789,"s":"BNBBTC","a":12345,"p":"0.001","q":"100","f":100,"l":105,"T":123456785,"m":true,"M":true}"#;
        let (sym, r) = one(&mut h, frame);
        assert_eq!(sym, "BNBBTC");
        assert_eq!(unsymbolled(r), trade(100_000, 10_000_000_000, 123_456_785, false, 12_345));
    }

    #[test]
    fn trade_events_raw_and_combined_use_t_as_the_id() {
        let mut h = harness();
        // Older payloads carry the buyer (b) and seller (a) order ids too; the trade id is t.
        let raw = r#"{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","b":88,"a":50,"T":1672515782134,"m":true,"M":true}"#;
        let (sym, r) = one(&mut h, raw);
        assert_eq!(sym, "BNBBTC");
        assert_eq!(unsymbolled(r), trade(100_000, 10_000_000_000, 1_672_515_782_134, false, 12_345));

        let combined = r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1700000000001,"s":"BTCUSDT","t":3200000001,"p":"37000.01000000","q":"0.00050000","T":1700000000000,"m":false,"M":true}}"#;
        let (sym, r) = one(&mut h, combined);
        assert_eq!(sym, "BTCUSDT");
        assert_eq!(unsymbolled(r), trade(3_700_001_000_000, 50_000, 1_700_000_000_000, true, 3_200_000_001));
    }

    #[test]
    fn same_symbol_same_id_and_escaped_strings() {
        let mut h = harness();
        let a = one(&mut h, COMBINED.lines().next().unwrap()).1;
        let escaped = r#"{"e":"aggTr\u0061de","s":"NKN\u0055SDT","a":1,"p":"0.3528","q":"1","T":5,"m":false}"#;
        let b = one(&mut h, escaped).1;
        assert_eq!(a.symbol_id, b.symbol_id);
        assert_eq!(b.price_e8, 35_280_000);
    }

    #[test]
    fn non_trade_frames_push_nothing() {
        let mut h = harness();
        let frames = [
            r#"{"result":null,"id":1}"#,
            r#"{"result":["btcusdt@aggTrade","btcusdt@depth"],"id":3}"#,
            r#"{"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","c":"0.0025","Q":"10"}"#,
            r#"{"stream":"bnbbtc@depth","data":{"e":"depthUpdate","E":1672515782136,"s":"BNBBTC","U":157,"u":160,"b":[["0.0024","10"]],"a":[["0.0026","100"]]}}"#,
            r#"{"lastUpdateId":160,"bids":[["0.0024","10"]],"asks":[["0.0026","100"]]}"#,
            r#"[{"e":"24hrMiniTicker","E":1672515782136,"s":"BNBBTC","c":"0.0025"}]"#,
            r#"{"stream":"!miniTicker@arr","data":[{"e":"24hrMiniTicker","s":"BNBBTC","c":"0.0025"}]}"#,
            r#"{"e":"kline","E":1672515782136,"s":"BNBBTC","k":{"t":1672515780000,"s":"BNBBTC","i":"1m"}}"#,
            "{}",
        ];
        for f in frames {
            assert_eq!(h.decode(f.as_bytes()), Ok(vec![]), "{f}");
        }
    }

    #[test]
    fn venue_errors_are_refused_with_their_message() {
        let mut h = harness();
        let err = h.decode(br#"{"error":{"code":2,"msg":"Invalid request: unknown variant"},"id":1}"#).unwrap_err();
        assert_eq!(err.as_str(), "venue error 2: Invalid request: unknown variant");
        let err = h.decode(br#"{"code":1,"msg":"Invalid value type: expected Boolean"}"#).unwrap_err();
        assert_eq!(err.as_str(), "venue error 1: Invalid value type: expected Boolean");
        // A null error is a success response.
        assert_eq!(h.decode(br#"{"result":null,"error":null,"id":4}"#), Ok(vec![]));
    }

    #[test]
    fn malformed_frames_name_the_field() {
        let mut h = harness();
        let base = r#"{"e":"aggTrade","s":"BNBBTC","a":7,"p":"0.001","q":"100","T":5,"m":true}"#;
        assert_eq!(h.decode(base.as_bytes()).unwrap().len(), 1);
        let cases = [
            (r#"{"e":"aggTrade","s":"BNBBTC""#, "frame: invalid JSON at byte 28: expected ',' or '}'"),
            ("", "frame: invalid JSON at byte 0: expected a value"),
            ("42", "frame: expected a JSON object"),
            (&base.replace(r#""p":"0.001","#, ""), "p: missing"),
            (&base.replace("0.001", "1.2.3"), "p: invalid character at byte 3 of decimal"),
            (&base.replace("0.001", "0.000000001"), "p: decimal has more than 8 significant decimal places"),
            (&base.replace(r#""p":"0.001""#, r#""p":0.001"#), "p: expected a string"),
            (&base.replace(r#""q":"100""#, r#""q":"-100""#), "q: negative decimal"),
            (&base.replace(r#""q":"100""#, r#""q":"""#), "q: empty decimal"),
            (&base.replace(r#""s":"BNBBTC","#, ""), "s: missing"),
            (&base.replace("BNBBTC", ""), "s: empty symbol"),
            (&base.replace(r#""T":5"#, r#""T":"5""#), "T: expected an integer"),
            (&base.replace(r#""m":true"#, r#""m":1"#), "m: expected true or false"),
            (&base.replace(r#""a":7,"#, ""), "a: missing"),
            (&base.replace(r#""a":7"#, r#""a":-7"#), "a: expected an unsigned integer"),
            (&base.replace(r#""e":"aggTrade""#, r#""e":"trade""#), "t: missing"),
            (&base.replace(r#""e":"aggTrade""#, r#""e":1"#), "e: expected a string"),
        ];
        for (frame, want) in cases {
            assert_eq!(h.decode(frame.as_bytes()).unwrap_err().as_str(), want, "{frame}");
        }
        // A combined envelope around a bad event is refused the same way.
        let bad = r#"{"stream":"x@aggTrade","data":{"e":"aggTrade","s":"X","a":1,"p":"1","q":"x","T":1,"m":true}}"#;
        assert_eq!(h.decode(bad.as_bytes()).unwrap_err().as_str(), "q: invalid character at byte 0 of decimal");
        // Bytes that are not UTF-8 inside a string.
        assert!(
            h.decode(b"{\"e\":\"aggTrade\",\"s\":\"\xff\"}").unwrap_err().as_str().starts_with("frame: invalid JSON")
        );
    }

    #[test]
    fn a_bad_frame_in_a_batch_does_not_affect_the_others() {
        let mut h = harness();
        let lines: Vec<&str> = COMBINED.lines().collect();
        let out = h.decode_batch(&[lines[0].as_bytes(), b"{", br#"{"result":null,"id":1}"#, lines[1].as_bytes()]);
        assert_eq!(out.per_frame.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 0, 0, 1]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 1);
        assert_eq!(out.rejects[0].reason, "frame: invalid JSON at byte 1: expected a string key");
    }

    #[test]
    fn config_keys_are_refused() {
        assert!(Harness::<Binance>::new(&[("symbols", "BTCUSDT")]).is_err());
    }
}
