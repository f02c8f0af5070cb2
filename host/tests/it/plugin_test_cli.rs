//! `sluice plugin test`, run as the real binary on the real plugin components.
//!
//! - Each recorded venue fixture in `fixtures/feeds/` goes through its decoder, and the printed records
//!   must equal the records this file derives on its own from the venue's documented semantics (with
//!   its own decimal and timestamp conversions, not the SDK's): every field, in order, with exactly
//!   the eight documented keys in their documented order, the requested source id, and one symbol id
//!   per symbol.
//! - Frames the decoder refuses are reported on stderr as JSON with their 1-based line, while the
//!   good frames still produce records and the run succeeds; blank lines and frames that carry no
//!   trade produce nothing.
//! - A transform-only plugin (`outlier_filter`) runs on records decoded by `--decode-with`, and its
//!   rejects are reported with their 0-based record index.
//! - A plugin or frames file that cannot be read, bytes that are not a plugin component, a failing
//!   `init` and a malformed `--config` make the command fail with a message naming the problem.

use crate::common;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// The keys of a printed record, in the order they are printed.
const RECORD_KEYS: [&str; 8] =
    ["source_id", "symbol", "symbol_id", "price_e8", "volume_e8", "timestamp_ms", "is_buy", "trade_id"];

// ---------------------------------------------------------------------------------------------------
// Running the binary

fn plugin(name: &str) -> PathBuf {
    let path = Path::new(env!("SLUICE_PLUGIN_DIR")).join(format!("{name}.wasm"));
    assert!(path.is_file(), "plugin {} was not built", path.display());
    path
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("feeds").join(name)
}

/// The arguments of a command, each anything that reads as an OS string (`&str`, a path).
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        [$(std::ffi::OsString::from(AsRef::<OsStr>::as_ref(&$arg))),*]
    };
}

/// Runs `sluice plugin test <args>`.
fn plugin_test<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "test"])
        .args(args)
        // Keep log lines out of stderr, which the tests read.
        .env_remove("RUST_LOG")
        .output()
        .expect("run the sluice binary")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("output is UTF-8")
}

/// Asserts the run succeeded and returns its stdout lines other than state entries (the records) and
/// its stderr lines other than the summary, warnings and state lines (the rejects), checking the
/// summary against what was printed.
fn succeeded(out: &Output) -> (Vec<&str>, Vec<&str>) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let stdout: Vec<&str> = stdout.lines().filter(|l| !l.starts_with(r#"{"link""#)).collect();
    let stderr: Vec<&str> = stderr.lines().collect();
    let summary = summary(&stderr);
    assert_eq!(summary["records"], stdout.len(), "{summary}");
    let rejects: Vec<&str> = stderr
        .into_iter()
        .filter(|l| !l.starts_with(r#"{"summary""#) && !l.starts_with("warning:") && !l.starts_with("state of "))
        .collect();
    assert_eq!(summary["rejects"], rejects.len(), "{summary}");
    (stdout, rejects)
}

/// The counts of the summary line on stderr.
fn summary(stderr: &[&str]) -> serde_json::Value {
    let line = stderr.iter().find(|l| l.starts_with(r#"{"summary""#)).expect("a summary line on stderr");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["summary"].clone()
}

/// A Binance combined-stream aggTrade frame of BTCUSDT: trade `trade_id` at `price` for `qty`.
fn btc_frame(trade_id: u64, price: &str, qty: &str) -> String {
    format!(
        r#"{{"stream":"btcusdt@aggTrade","data":{{"e":"aggTrade","E":1700000000{trade_id:03},"s":"BTCUSDT","a":{trade_id},"p":"{price}","q":"{qty}","f":{trade_id},"l":{trade_id},"T":1700000000{trade_id:03},"m":false,"M":true}}}}"#
    )
}

/// `lines` as the frames file of `test`, a frame a line.
fn frames_file(test: &str, lines: &[impl AsRef<str>]) -> TempFile {
    let lines: Vec<&str> = lines.iter().map(AsRef::as_ref).collect();
    TempFile::new(test, "frames.jsonl", format!("{}\n", lines.join("\n")).as_bytes())
}

/// `sluice plugin test` of the test plugin `name` on `frames` decoded by `binance`, with `more`
/// arguments.
fn on_binance_frames(name: &str, frames: &TempFile, more: &[&str]) -> Output {
    let decoded = args![plugin(name), "--frames", frames.path(), "--decode-with", plugin("binance")];
    plugin_test(decoded.into_iter().chain(more.iter().map(OsString::from)))
}

/// A file under the temp folder, unique to this process and test, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(test: &str, name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("sluice-plugin-test-cli-{}-{test}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempFile(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------------
// Reading the output

/// A record as printed, without `source_id` and `symbol_id` (checked separately), or as expected.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Trade {
    symbol: String,
    price_e8: i64,
    volume_e8: i64,
    timestamp_ms: i64,
    is_buy: bool,
    trade_id: u64,
}

/// The keys of a JSON object in the order they appear in the text (`serde_json::Value` sorts them).
struct KeyOrder(Vec<String>);

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(KeyOrder(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

fn key_order(line: &str) -> Vec<String> {
    serde_json::from_str::<KeyOrder>(line).unwrap_or_else(|e| panic!("not a JSON object: {e}: {line}")).0
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {e}: {line}"))
}

/// One printed record line: checks its keys, their order and their types; returns
/// `(source_id, symbol_id, trade)`.
fn record_line(line: &str) -> (u64, u64, Trade) {
    assert_eq!(key_order(line), RECORD_KEYS, "keys of {line}");
    let v = parse(line);
    let int = |key: &str| v[key].as_i64().unwrap_or_else(|| panic!("{key} is not an integer in {line}"));
    let uint = |key: &str| v[key].as_u64().unwrap_or_else(|| panic!("{key} is not an unsigned integer in {line}"));
    let trade = Trade {
        symbol: v["symbol"].as_str().unwrap_or_else(|| panic!("symbol is not a string in {line}")).to_owned(),
        price_e8: int("price_e8"),
        volume_e8: int("volume_e8"),
        timestamp_ms: int("timestamp_ms"),
        is_buy: v["is_buy"].as_bool().unwrap_or_else(|| panic!("is_buy is not a boolean in {line}")),
        trade_id: uint("trade_id"),
    };
    (uint("source_id"), uint("symbol_id"), trade)
}

/// Reads all printed records; checks every one carries `source_id` and that symbol ids map one to one
/// onto symbol names.
fn records(lines: &[&str], source_id: u64) -> Vec<Trade> {
    let mut ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut trades = Vec::new();
    for line in lines {
        let (source, symbol_id, trade) = record_line(line);
        assert_eq!(source, source_id, "source_id of {line}");
        let id = *ids.entry(trade.symbol.clone()).or_insert(symbol_id);
        assert_eq!(symbol_id, id, "{} printed with two symbol ids: {line}", trade.symbol);
        trades.push(trade);
    }
    let mut distinct: Vec<u64> = ids.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "different symbols share a symbol id: {ids:?}");
    trades
}

/// One printed reject line: `(key, number, reason)` where key is `frame` or `index`. A record's
/// reject (`index`) carries the record too, as records are printed; a frame's does not.
fn reject_line(line: &str) -> (String, u64, String) {
    let keys = key_order(line);
    assert!(keys[0] == "frame" || keys[0] == "index", "reject position key in {line}");
    let rest: Vec<&str> = keys[1..].iter().map(String::as_str).filter(|k| *k != "link").collect();
    let want: &[&str] = if keys[0] == "index" { &["reason", "record"] } else { &["reason"] };
    assert_eq!(rest, want, "{line}");
    let v = parse(line);
    let at = v[&keys[0]].as_u64().unwrap_or_else(|| panic!("{} is not a number in {line}", keys[0]));
    let reason = v["reason"].as_str().unwrap_or_else(|| panic!("reason is not a string in {line}")).to_owned();
    assert!(!reason.trim().is_empty(), "empty reason in {line}");
    (keys[0].clone(), at, reason)
}

// ---------------------------------------------------------------------------------------------------
// Independent conversions, from the venue documentation

/// A non-negative decimal string (`"0.35280000"`, `"70"`) as an integer with eight implied decimals.
/// The fixtures never carry more than eight significant decimals; that is asserted.
fn e8(s: &str) -> i64 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(!int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()), "integer part of {s:?}");
    assert!(frac.bytes().all(|b| b.is_ascii_digit()), "fraction of {s:?}");
    let significant = frac.trim_end_matches('0');
    assert!(significant.len() <= 8, "{s:?} has more than 8 significant decimals");
    let frac = format!("{significant:0<8}");
    let int: i64 = int.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    let frac: i64 = frac.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    int * 100_000_000 + frac
}

/// The first three digits of a fraction of a second, zero-padded: milliseconds, truncated.
fn frac_ms(frac: &str) -> i64 {
    assert!(frac.bytes().all(|b| b.is_ascii_digit()), "fraction {frac:?}");
    let ms: String = frac.chars().chain("000".chars()).take(3).collect();
    ms.parse().expect("three digits")
}

/// Days from 1970-01-01 to a proleptic Gregorian date, by the host's calendar (not the SDK's, whose
/// parsing is what these references check).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let part = |v: i64| u32::try_from(v).unwrap_or_else(|_| panic!("{y}-{m}-{d}"));
    sluice::clock::days_from_civil(y, part(m), part(d))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as milliseconds since the epoch, truncated. The fixtures are all
/// in UTC (`Z`); that is asserted.
fn rfc3339_utc_ms(s: &str) -> i64 {
    let body = s.strip_suffix('Z').unwrap_or_else(|| panic!("{s:?} is not UTC"));
    let (date, time) = body.split_once('T').unwrap_or_else(|| panic!("{s:?} has no T"));
    let num = |part: &str| -> i64 { part.parse().unwrap_or_else(|e| panic!("{s:?}: {part:?}: {e}")) };
    let date: Vec<i64> = date.split('-').map(num).collect();
    let (time, frac) = time.split_once('.').unwrap_or((time, ""));
    let time: Vec<i64> = time.split(':').map(num).collect();
    assert_eq!((date.len(), time.len()), (3, 3), "{s:?}");
    let days = days_from_civil(date[0], date[1], date[2]);
    ((days * 24 + time[0]) * 60 + time[1]) * 60_000 + time[2] * 1000 + frac_ms(frac)
}

/// Seconds since the epoch as a decimal string (`"1618678142.557535"`) as milliseconds, floored.
fn decimal_seconds_ms(s: &str) -> i64 {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    assert!(secs >= 0, "{s:?}");
    secs * 1000 + frac_ms(frac)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

/// Binance combined stream, `{"stream":"<symbol>@aggTrade","data":{aggTrade event}}`.
fn binance_expected(line: &str) -> Vec<Trade> {
    let frame = parse(line);
    let data = &frame["data"];
    assert_eq!(data["e"], "aggTrade", "{line}");
    let symbol = str_of(data, "s");
    assert_eq!(str_of(&frame, "stream"), format!("{}@aggTrade", symbol.to_lowercase()), "{line}");
    vec![Trade {
        symbol: symbol.to_owned(),
        price_e8: e8(str_of(data, "p")),
        volume_e8: e8(str_of(data, "q")),
        // T, the trade time, not E, the event time.
        timestamp_ms: data["T"].as_i64().expect("T"),
        // m: the buyer was the maker, so the taker sold.
        is_buy: !data["m"].as_bool().expect("m"),
        trade_id: data["a"].as_u64().expect("a"),
    }]
}

/// Coinbase Exchange `match` / `last_match`.
fn coinbase_expected(line: &str) -> Vec<Trade> {
    let m = parse(line);
    let kind = str_of(&m, "type");
    assert!(kind == "match" || kind == "last_match", "{line}");
    // `side` is the maker's side: a resting sell was lifted by a buying taker.
    let is_buy = match str_of(&m, "side") {
        "sell" => true,
        "buy" => false,
        other => panic!("side {other:?} in {line}"),
    };
    vec![Trade {
        symbol: str_of(&m, "product_id").to_owned(),
        price_e8: e8(str_of(&m, "price")),
        volume_e8: e8(str_of(&m, "size")),
        timestamp_ms: rfc3339_utc_ms(str_of(&m, "time")),
        is_buy,
        trade_id: m["trade_id"].as_u64().expect("trade_id"),
    }]
}

/// Kraken v1 `[channelID, [[price, volume, time, side, orderType, misc], ...], "trade", pair]`.
fn kraken_expected(line: &str) -> Vec<Trade> {
    let frame = parse(line);
    let parts = frame.as_array().unwrap_or_else(|| panic!("not an array: {line}"));
    assert_eq!(parts.len(), 4, "{line}");
    assert_eq!(parts[2], "trade", "{line}");
    let pair = parts[3].as_str().expect("pair");
    let trades = parts[1].as_array().expect("trades");
    assert!(!trades.is_empty(), "{line}");
    trades
        .iter()
        .map(|t| {
            let field = |i: usize| t[i].as_str().unwrap_or_else(|| panic!("element {i} of {t}"));
            let is_buy = match field(3) {
                "b" => true,
                "s" => false,
                other => panic!("side {other:?} in {line}"),
            };
            Trade {
                symbol: pair.to_owned(),
                price_e8: e8(field(0)),
                volume_e8: e8(field(1)),
                timestamp_ms: decimal_seconds_ms(field(2)),
                is_buy,
                // Kraken v1 sends no trade id.
                trade_id: 0,
            }
        })
        .collect()
}

/// Runs `plugin` on a fixture with source id 7 and compares every record with `expected`.
fn check_fixture(plugin_name: &str, fixture_name: &str, expected: fn(&str) -> Vec<Trade>) {
    let path = fixture(fixture_name);
    let frames = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want: Vec<Trade> = frames.lines().filter(|l| !l.trim().is_empty()).flat_map(expected).collect();
    assert!(!want.is_empty(), "{fixture_name} has no trades");

    let plugin_path = plugin(plugin_name);
    let out = plugin_test(args![plugin_path, "--frames", path, "--source-id", "7"]);
    let (stdout, stderr) = succeeded(&out);
    assert!(stderr.is_empty(), "{fixture_name}: unexpected stderr:\n{}", stderr.join("\n"));
    let got = records(&stdout, 7);
    assert_eq!(got.len(), want.len(), "{fixture_name}: number of records");
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "{fixture_name}: record {i}, printed as {}", stdout[i]);
    }
}

// ---------------------------------------------------------------------------------------------------
// 1. Venue fixtures

#[test]
fn binance_combined_fixture_matches_the_venue_semantics() {
    check_fixture("binance", "binance_combined_aggtrade.jsonl", binance_expected);
}

#[test]
fn binance_us_combined_fixture_matches_the_venue_semantics() {
    check_fixture("binance", "binance_us_combined_aggtrade.jsonl", binance_expected);
}

#[test]
fn coinbase_match_fixture_matches_the_venue_semantics() {
    check_fixture("coinbase", "coinbase_exchange_match.jsonl", coinbase_expected);
}

#[test]
fn kraken_trade_fixture_matches_the_venue_semantics() {
    check_fixture("kraken", "kraken_v1_trade.jsonl", kraken_expected);
}

#[test]
fn independent_conversions_agree_with_hand_computed_values() {
    assert_eq!(e8("0.35280000"), 35_280_000);
    assert_eq!(e8("0.00000638"), 638);
    assert_eq!(e8("70"), 7_000_000_000);
    assert_eq!(e8("14.7775"), 1_477_750_000);
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    // 2021-04-17T16:43:30Z is 1618677810 seconds after the epoch.
    assert_eq!(rfc3339_utc_ms("2021-04-17T16:43:30.244075Z"), 1_618_677_810_244);
    assert_eq!(rfc3339_utc_ms("2021-04-17T16:43:30Z"), 1_618_677_810_000);
    assert_eq!(decimal_seconds_ms("1618678142.557535"), 1_618_678_142_557);
    assert_eq!(decimal_seconds_ms("1618678142.5"), 1_618_678_142_500);
    assert_eq!(decimal_seconds_ms("1618678142"), 1_618_678_142_000);
}

// ---------------------------------------------------------------------------------------------------
// 2. Rejected frames

#[test]
fn rejected_frames_are_reported_with_their_line_and_the_rest_still_decodes() {
    let good = r#"{"stream":"nknusdt@aggTrade","data":{"e":"aggTrade","E":1633998523963,"s":"NKNUSDT","a":15683430,"p":"0.35280000","q":"58.00000000","f":19862790,"l":19862790,"T":1633998523963,"m":false,"M":true}}"#;
    let bad_price = good.replace(r#""p":"0.35280000""#, r#""p":"1.2.3""#);
    assert_ne!(bad_price, good);
    let lines = [good, "", "not json", r#"{"result":null,"id":1}"#, &bad_price];
    let frames = frames_file("rejects", &lines);

    let out = plugin_test(args![plugin("binance"), "--frames", frames.path()]);
    let (stdout, stderr) = succeeded(&out);
    assert_eq!(records(&stdout, 0), binance_expected(good), "stdout:\n{}", stdout.join("\n"));

    // The blank line is no frame and the subscription ack carries no trade: neither is a reject.
    let rejects: Vec<(String, u64, String)> = stderr.iter().map(|l| reject_line(l)).collect();
    assert_eq!(rejects.len(), 2, "stderr:\n{}", stderr.join("\n"));
    assert_eq!((rejects[0].0.as_str(), rejects[0].1), ("frame", 3), "{}", stderr[0]);
    assert_eq!((rejects[1].0.as_str(), rejects[1].1), ("frame", 5), "{}", stderr[1]);
    assert!(rejects[1].2.starts_with("p:"), "the bad price reason names p: {}", stderr[1]);
}

/// `--expect` compares the records with a golden file: the same output passes, one changed field
/// fails naming the record and showing both lines.
#[test]
fn expect_compares_with_a_golden_file_and_shows_the_first_difference() {
    let frames_path = fixture("binance_combined_aggtrade.jsonl");
    let run =
        |expect: &std::path::Path| plugin_test(args![plugin("binance"), "--frames", frames_path, "--expect", expect]);
    let first = plugin_test(args![plugin("binance"), "--frames", frames_path]);
    let (stdout, _) = succeeded(&first);
    assert!(stdout.len() >= 2);
    let golden = TempFile::new("expect", "expected.jsonl", format!("{}\n", stdout.join("\n")).as_bytes());
    succeeded(&run(golden.path()));

    let mut changed: Vec<String> = stdout.iter().map(|l| l.to_string()).collect();
    changed[1] = changed[1].replace(r#""trade_id":"#, r#""trade_id":9"#);
    assert_ne!(changed[1], stdout[1]);
    let golden = TempFile::new("expect-changed", "expected.jsonl", format!("{}\n", changed.join("\n")).as_bytes());
    let out = run(golden.path());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("at record 1 (line 2)"), "{err}");
    assert!(err.contains(&changed[1]) && err.contains(stdout[1]), "{err}");

    // A golden file with a record more than the output: the missing one is named.
    let longer =
        TempFile::new("expect-longer", "expected.jsonl", format!("{}\n{}\n", stdout.join("\n"), stdout[0]).as_bytes());
    let out = run(longer.path());
    assert!(text(&out.stderr).contains("nothing (the output ends here)"), "{}", text(&out.stderr));
}

/// A decoder given frames it does not understand prints nothing: a warning says so, and `--strict`
/// makes it a failure with its own exit status.
#[test]
fn frames_that_give_no_record_are_warned_about_and_fail_with_strict() {
    // OKX v5 trades: the Binance decoder reads no event in them.
    let okx = r#"{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"130639474","px":"42219.9","sz":"0.12060306","side":"buy","ts":"1630048897897"}]}"#;
    let frames = TempFile::new("strict", "frames.jsonl", format!("{okx}\n{okx}\n").as_bytes());
    let args = |strict: bool| {
        let mut a = vec![plugin("binance").into_os_string(), "--frames".into(), frames.path().as_os_str().to_owned()];
        if strict {
            a.push("--strict".into());
        }
        a
    };
    let out = plugin_test(args(false));
    let (stdout, _) = succeeded(&out);
    assert!(stdout.is_empty());
    let stderr: Vec<&str> = text(&out.stderr).lines().collect();
    assert_eq!(summary(&stderr)["frames_without_records"], 2);
    assert!(stderr.iter().any(|l| l.starts_with("warning: 2 of 2 frames gave no record")), "{stderr:?}");

    let out = plugin_test(args(true));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("2 of 2 frames gave no record"), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------------------
// 3. Transform-only plugin

#[test]
fn transform_only_plugin_runs_on_frames_decoded_by_another() {
    let lines = [
        btc_frame(101, "100.00000000", "1.00000000"),
        btc_frame(102, "150.00000000", "1.00000000"),
        btc_frame(103, "100.50000000", "1.00000000"),
    ];
    let frames = frames_file("transform", &lines);

    let out = on_binance_frames("outlier_filter", &frames, &["--config", "threshold_pct=1"]);
    let (stdout, stderr) = succeeded(&out);
    let want: Vec<Trade> = [&lines[0], &lines[2]].into_iter().flat_map(|l| binance_expected(l)).collect();
    let got = records(&stdout, 0);
    assert_eq!(got, want, "stdout:\n{}", stdout.join("\n"));
    assert_eq!(got.iter().map(|t| t.trade_id).collect::<Vec<_>>(), [101, 103]);

    assert_eq!(stderr.len(), 1, "stderr:\n{}", stderr.join("\n"));
    let (key, at, _) = reject_line(stderr[0]);
    assert_eq!((key.as_str(), at), ("index", 1), "{}", stderr[0]);
    assert!(stderr[0].contains(r#""index":1"#), "{}", stderr[0]);
    // The refused record itself, printed as records are: the trade at 150.
    // As printed (key order included): the reject's last member.
    let refused = stderr[0].split_once(r#""record":"#).and_then(|(_, r)| r.strip_suffix('}')).unwrap();
    assert_eq!(key_order(refused), RECORD_KEYS, "{refused}");
    let (_, _, trade) = record_line(refused);
    assert_eq!(trade, binance_expected(&lines[1])[0], "{refused}");
}

/// As the host does, the records a transform returns are its source's: a link that writes another
/// source id (`chaos` in mode `source`) is printed with the `--source-id` the decoder's records got.
#[test]
fn a_transforms_records_keep_the_source_id_the_host_stamps() {
    let lines = [btc_frame(201, "100.00000000", "1.00000000"), btc_frame(202, "100.00000000", "1.00000000")];
    let frames = frames_file("stamp", &lines);
    let stamped = ["--source-id", "3", "--config", "mode=source", "--config", "source_id=9"];
    let out = on_binance_frames("chaos", &frames, &stamped);
    let (stdout, _) = succeeded(&out);
    let want: Vec<Trade> = lines.iter().flat_map(|l| binance_expected(l)).collect();
    assert_eq!(records(&stdout, 3), want, "stdout:\n{}", stdout.join("\n"));
}

/// `--then` runs a chain: the decoder, the plugin, then each link in order, with its own config; a
/// link's rejects name it.
#[test]
fn then_runs_a_chain_of_transforms_in_order() {
    // 102 is an outlier (refused by the first link), 103 is small (dropped by rescale's min_volume).
    let lines = [
        btc_frame(101, "100.00000000", "2.0"),
        btc_frame(102, "150.00000000", "2.0"),
        btc_frame(103, "100.50000000", "0.5"),
    ];
    let frames = frames_file("chain", &lines);
    let rescale = format!("{},min_volume=1,scale=2", plugin("rescale").display());
    let out = on_binance_frames("outlier_filter", &frames, &["--config", "threshold_pct=1", "--then", &rescale]);
    let (stdout, stderr) = succeeded(&out);
    let got = records(&stdout, 0);
    // Only 101 is left, its price doubled by the second link.
    assert_eq!(got.iter().map(|t| (t.trade_id, t.price_e8)).collect::<Vec<_>>(), [(101, 200_00000000)], "{stdout:?}");
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(!stderr[0].contains("\"link\""), "the first transform's reject names no link: {}", stderr[0]);
    // The same chain written as links alone, `--decode-with A --then B --then C`: the same records;
    // the outlier's reject now names its link.
    let outlier = format!("{},threshold_pct=1", plugin("outlier_filter").display());
    let out = plugin_test(args![
        "--frames",
        frames.path(),
        "--decode-with",
        plugin("binance"),
        "--then",
        outlier,
        "--then",
        rescale
    ]);
    let (links_stdout, links_stderr) = succeeded(&out);
    assert_eq!(links_stdout, stdout);
    assert_eq!(links_stderr.len(), 1, "{links_stderr:?}");
    assert!(links_stderr[0].contains("outlier_filter"), "{}", links_stderr[0]);
    // A link that refuses names itself.
    let strict = format!("{},min_volume=1,scale=-1", plugin("rescale").display());
    let out = on_binance_frames("outlier_filter", &frames, &["--then", &strict]);
    assert!(!out.status.success(), "a negative scale must not start");
    assert!(text(&out.stderr).contains("rescale"), "{}", text(&out.stderr));
}

/// `--source NAME --from sluice.toml` runs that source's chain as configured: its decoder with its
/// `decode_config`, then its transforms in order with their configs (bundled plugins, or a
/// `[plugins]` path); a source naming no transforms gets the `[process]` default chain. A link's
/// rejects name it.
#[test]
fn a_sources_chain_runs_from_the_config_file() {
    // 102 is small (dropped by min-volume), 103 an outlier (refused by outlier-filter).
    let lines = [
        btc_frame(101, "100.00000000", "2.0"),
        btc_frame(102, "100.10000000", "0.5"),
        btc_frame(103, "150.00000000", "2.0"),
    ];
    let frames = frames_file("from-config", &lines);
    let config = format!(
        r#"
[plugins.doubling]
path = "{rescale}"

[process]
transforms = [{{ plugin = "doubling", config = {{ scale = "2" }} }}]

[[source]]
name = "chained"
url = "ws://127.0.0.1:1"
decode = "binance"
transforms = [{{ plugin = "min-volume", config = {{ min_volume = "1" }} }}, {{ plugin = "outlier-filter", config = {{ threshold_pct = "5" }} }}]

[[source]]
name = "default"
url = "ws://127.0.0.1:1"
decode = "binance"
"#,
        rescale = plugin("rescale").display()
    );
    let config = TempFile::new("from-config", "sluice.toml", config.as_bytes());
    let run = |source: &str| plugin_test(args!["--from", config.path(), "--source", source, "--frames", frames.path()]);
    let out = run("chained");
    let (stdout, stderr) = succeeded(&out);
    let got = records(&stdout, 0);
    assert_eq!(got.iter().map(|t| (t.trade_id, t.price_e8)).collect::<Vec<_>>(), [(101, 100_00000000)], "{stdout:?}");
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(stderr[0].contains(r#""link":"outlier-filter""#), "{}", stderr[0]);
    // The default chain doubles every price.
    let out = run("default");
    let (stdout, _) = succeeded(&out);
    let got = records(&stdout, 0);
    let prices: Vec<(u64, i64)> = got.iter().map(|t| (t.trade_id, t.price_e8)).collect();
    assert_eq!(prices, [(101, 200_00000000), (102, 200_20000000), (103, 300_00000000)]);
    // An unknown source is a clear error; a positional plugin cannot be given with it.
    failed_saying(&run("nope"), &["no source named \"nope\""]);
    let out = plugin_test(args![
        plugin("binance"),
        "--from",
        config.path(),
        "--source",
        "chained",
        "--frames",
        frames.path()
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
}

/// A stateful link's state after the run: a line per link on stderr, its entries with `--show-state`
/// (after the records) and in the `--state-out` file; `--state-in` starts the link from such a file,
/// as a restart starts it from the store. `outlier-filter` keeps the last accepted price per
/// (source, symbol), encoded as the SDK's `StateCodec` encodes `(u32, u32)` and `i64`: a state that
/// says the last accepted price was 200 refuses the first trade, at 100, that a fresh run accepts.
#[test]
fn state_is_shown_written_and_read_back() {
    use plugin_sdk::state::StateCodec;
    let lines = [btc_frame(101, "100.00000000", "1.00000000"), btc_frame(102, "100.50000000", "1.00000000")];
    let frames = frames_file("state", &lines);
    let state_out = TempFile::new("state", "state-out.jsonl", b"");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let encoded = |v: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        v(&mut out);
        hex(&out)
    };
    let outlier = plugin("outlier_filter");
    let run = |extra: &[&OsStr]| {
        let more: Vec<&str> = extra.iter().map(|a| a.to_str().unwrap()).collect();
        on_binance_frames("outlier_filter", &frames, &[&["--config", "threshold_pct=1"], &more[..]].concat())
    };

    // A fresh run accepts both trades and ends with 100.5 as the reference of the one symbol.
    let out = run(&["--show-state".as_ref(), "--state-out".as_ref(), state_out.path().as_os_str()]);
    let (records_out, rejects) = succeeded(&out);
    let got = records(&records_out, 0);
    assert_eq!(got.iter().map(|t| t.trade_id).collect::<Vec<_>>(), [101, 102], "{records_out:?}");
    assert!(rejects.is_empty(), "{rejects:?}");
    let stdout: Vec<&str> = text(&out.stdout).lines().collect();
    assert_eq!(stdout.len(), 3, "two records, then one state entry: {stdout:?}");
    let symbol_id = parse(stdout[0])["symbol_id"].as_u64().unwrap() as u32;
    let key = encoded(&|out| (0u32, symbol_id).encode(out));
    let entry = parse(stdout[2]);
    assert_eq!(entry["link"], 0, "{entry}");
    assert_eq!(entry["key"], key.as_str(), "{entry}");
    assert_eq!(entry["value"], encoded(&|out| 100_50000000i64.encode(out)).as_str(), "{entry}");
    let stderr = text(&out.stderr);
    let name = outlier.display().to_string();
    let state_line = format!("state of {name}@outlier-filter.last-price@1: 1 entries, 16 bytes");
    assert!(stderr.lines().any(|l| l == state_line), "{stderr}");
    let written = std::fs::read_to_string(state_out.path()).unwrap();
    assert_eq!(written.lines().collect::<Vec<_>>(), [stdout[2]], "--state-out writes what --show-state shows");
    // Without --show-state, stdout holds the records alone.
    assert_eq!(text(&run(&[]).stdout).lines().count(), 2);

    // Started from a state whose last accepted price is 200, the first trade is 50% away: refused.
    let far =
        format!("{{\"link\":0,\"key\":\"{key}\",\"value\":\"{}\"}}\n", encoded(&|out| 200_00000000i64.encode(out)));
    let state_in = TempFile::new("state", "state-in.jsonl", far.as_bytes());
    let out = run(&["--state-in".as_ref(), state_in.path().as_os_str(), "--show-state".as_ref()]);
    let (records_out, rejects) = succeeded(&out);
    assert!(records_out.is_empty(), "{records_out:?}");
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    let (kind, at, reason) = reject_line(rejects[0]);
    assert_eq!((kind.as_str(), at), ("index", 0), "{}", rejects[0]);
    assert!(reason.contains("from last accepted 200 "), "{reason}");
    // The reference stays where the state file put it.
    assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), [far.trim_end()]);

    // A state file that does not parse, or names several links, is refused.
    let bad = TempFile::new("state", "bad.jsonl", b"{\"link\":0,\"key\":\"zz\",\"value\":\"00\"}\n");
    failed_saying(&run(&["--state-in".as_ref(), bad.path().as_os_str()]), &["bad.jsonl line 1", "not hex"]);
    let beyond = TempFile::new("state", "beyond.jsonl", far.replace("\"link\":0", "\"link\":1").as_bytes());
    failed_saying(
        &run(&["--state-in".as_ref(), beyond.path().as_os_str()]),
        &["holds state of link 1, and the chain has 1 links"],
    );

    // A chain of two stateful links starts each from its own lines: the first link's reference is
    // 100 (both trades pass it), the second's 200 (both are refused there).
    let near = far.replace(&encoded(&|out| 200_00000000i64.encode(out)), &encoded(&|out| 100_00000000i64.encode(out)));
    let two = format!("{near}{}", far.replace("\"link\":0", "\"link\":1"));
    let two = TempFile::new("state", "two.jsonl", two.as_bytes());
    let second = format!("{},threshold_pct=1", outlier.display());
    let out = run(&[
        "--then".as_ref(),
        second.as_ref(),
        "--state-in".as_ref(),
        two.path().as_os_str(),
        "--show-state".as_ref(),
    ]);
    let (records_out, rejects) = succeeded(&out);
    assert!(records_out.is_empty(), "{records_out:?}");
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    let shown: Vec<serde_json::Value> = text(&out.stdout).lines().map(parse).collect();
    let reference = |link: u64| {
        shown.iter().find(|e| e["link"] == link).map(|e| e["value"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(reference(0), Some(encoded(&|out| 100_50000000i64.encode(out))), "{shown:?}");
    assert_eq!(reference(1), Some(encoded(&|out| 200_00000000i64.encode(out))), "{shown:?}");
}

// ---------------------------------------------------------------------------------------------------
// 4. Failures

/// Asserts the run failed, printed no records, and said every one of `needles` on stderr.
fn failed_saying(out: &Output, needles: &[&str]) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "expected failure\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.is_empty(), "no records on failure, got:\n{stdout}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr does not mention {needle:?}:\n{stderr}");
    }
}

/// Outside a checkout (a temp dir as the working directory, no `.wasm` paths), the bundled plugins
/// are named: `outlier-filter` transforming what `binance` decodes, then `--then min-volume`, give
/// what the same components by path give. A file of that name wins over the bundled plugin; a name
/// that is neither a file nor bundled fails, listing the bundled ones.
#[test]
fn bundled_plugins_are_addressable_by_name_outside_a_checkout() {
    let cwd = common::fresh_dir("plugin-by-name");
    let frames = fixture("binance_us_combined_aggtrade.jsonl");
    let run = |plugin: &OsStr, decode_with: &OsStr, then: &OsStr| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["plugin", "test"])
            .arg(plugin)
            .arg("--frames")
            .arg(&frames)
            .arg("--decode-with")
            .arg(decode_with)
            .args(["--config", "threshold_pct=0.05", "--then"])
            .arg(then)
            .env_remove("RUST_LOG")
            .current_dir(&cwd)
            .output()
            .unwrap()
    };
    let by_path = run(
        plugin("outlier_filter").as_os_str(),
        plugin("binance").as_os_str(),
        format!("{},min_volume=50", plugin("min_volume").display()).as_ref(),
    );
    let by_name = run("outlier-filter".as_ref(), "binance".as_ref(), "min-volume,min_volume=50".as_ref());
    let (want, _) = succeeded(&by_path);
    let (got, rejects) = succeeded(&by_name);
    assert!(!want.is_empty() && !rejects.is_empty(), "records and rejects both: {want:?} {rejects:?}");
    assert_eq!(got, want);

    // A file named like a bundled plugin wins: here, not a component.
    std::fs::write(cwd.join("binance"), b"not wasm").unwrap();
    let out = run("outlier-filter".as_ref(), "binance".as_ref(), "min-volume".as_ref());
    failed_saying(&out, &["cannot load plugin binance"]);
    let out = run("outlier-filter".as_ref(), "no-such-plugin".as_ref(), "min-volume".as_ref());
    failed_saying(&out, &["cannot read plugin no-such-plugin", "no bundled plugin has that name", "vwap-band"]);
    let help = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["plugin", "test", "--help"]).output().unwrap();
    assert!(text(&help.stdout).contains("a file of that name wins"), "{}", text(&help.stdout));
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn missing_plugin_file_fails() {
    let frames = TempFile::new("missing_plugin", "frames.jsonl", b"{}\n");
    let missing =
        std::env::temp_dir().join(format!("sluice-plugin-test-cli-{}-no-such-plugin.wasm", std::process::id()));
    let out = plugin_test(args![missing, "--frames", frames.path()]);
    failed_saying(&out, &["cannot read plugin", &missing.display().to_string()]);
}

#[test]
fn missing_frames_file_fails() {
    let missing =
        std::env::temp_dir().join(format!("sluice-plugin-test-cli-{}-no-such-frames.jsonl", std::process::id()));
    let out = plugin_test(args![plugin("binance"), "--frames", missing]);
    failed_saying(&out, &["cannot read frames", &missing.display().to_string()]);
}

#[test]
fn text_file_as_plugin_fails() {
    let frames = TempFile::new("text_plugin", "frames.jsonl", b"{}\n");
    let not_wasm = TempFile::new("text_plugin", "plugin.wasm", b"this is not a wasm file, just some text\n");
    let out = plugin_test(args![not_wasm.path(), "--frames", frames.path()]);
    failed_saying(&out, &["cannot load plugin", &not_wasm.path().display().to_string(), "not a WebAssembly binary"]);
}

#[test]
fn core_module_as_plugin_fails() {
    let frames = TempFile::new("core_module", "frames.jsonl", b"{}\n");
    let core = TempFile::new("core_module", "plugin.wasm", b"\0asm\x01\0\0\0");
    let out = plugin_test(args![core.path(), "--frames", frames.path()]);
    failed_saying(&out, &["cannot load plugin", "core wasm module, not a component"]);
}

#[test]
fn failing_init_fails_with_the_plugins_message() {
    let frames = TempFile::new("init_error", "frames.jsonl", b"{}\n");
    let out = plugin_test(args![plugin("chaos"), "--frames", frames.path(), "--config", "init_error=boom"]);
    failed_saying(&out, &["init failed", "boom"]);
}

#[test]
fn unknown_config_key_fails() {
    let frames = TempFile::new("unknown_key", "frames.jsonl", b"{}\n");
    let out = plugin_test(args![plugin("binance"), "--frames", frames.path(), "--config", "nope=1"]);
    failed_saying(&out, &["init failed", "nope"]);
}

#[test]
fn config_argument_without_equals_fails() {
    let frames = TempFile::new("bad_config_arg", "frames.jsonl", b"{}\n");
    let out = plugin_test(args![plugin("binance"), "--frames", frames.path(), "--config", "nope"]);
    failed_saying(&out, &["--config", "KEY=VALUE", "nope"]);
}

#[test]
fn output_records_that_are_not_stream_data_fail_the_run() {
    let line = r#"{"e":"trade","E":1,"s":"BTCUSDT","t":7,"p":"1.5","q":"2","T":1,"m":false}"#;
    let frames = TempFile::new("bad_record", "frames.jsonl", format!("{line}\n").as_bytes());
    let out = on_binance_frames("chaos", &frames, &["--config", "mode=bad-record"]);
    failed_saying(&out, &["transforming records 0..0", "plugin returned invalid output: output record 0"]);
}

// ---------------------------------------------------------------------------------------------------
// 5. `sluice plugin new` (its output is built, tested and compared with its golden file in
//    `.ci/out-of-tree-plugin`, against the packaged SDK)

fn plugin_new(args: &[&OsStr], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(["plugin", "new"]).args(args).current_dir(cwd).output().unwrap()
}

#[test]
fn plugin_new_writes_a_crate_in_a_checkout_or_outside_and_refuses_what_it_cannot_do() {
    let base = std::env::temp_dir().join(format!("sluice-plugin-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // A checkout-shaped folder: the crate goes to plugins/<name>, a workspace member using ../../plugin-sdk.
    let checkout = base.join("checkout");
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk").canonicalize().unwrap();
    std::fs::create_dir_all(checkout.join("plugins")).unwrap();
    std::fs::create_dir_all(checkout.join("wit")).unwrap();
    std::fs::create_dir_all(checkout.join("plugin-sdk")).unwrap();
    std::fs::copy(sdk.join("Cargo.toml"), checkout.join("plugin-sdk/Cargo.toml")).unwrap();
    let out = plugin_new(&["my-venue".as_ref(), "--decode".as_ref()], &checkout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let crate_dir = checkout.join("plugins/my-venue");
    for file in ["Cargo.toml", "src/lib.rs", "frames.jsonl", "expected.jsonl", "README.md"] {
        assert!(crate_dir.join(file).is_file(), "{file} missing");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"plugin-sdk = { path = "../../plugin-sdk" }"#), "{manifest}");
    assert!(!manifest.contains("[workspace]"), "a member must not declare its own workspace:\n{manifest}");
    let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
    assert!(lib.contains("pub struct MyVenue;") && lib.contains("plugin_sdk::export!(MyVenue);"), "{lib}");
    assert!(std::fs::read_to_string(crate_dir.join("README.md")).unwrap().contains("--profile plugin"));

    // Outside a checkout: its own workspace with release settings, the SDK by --sdk.
    let outside = base.join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let out = plugin_new(&["filter".as_ref(), "--transform".as_ref(), "--sdk".as_ref(), sdk.as_os_str()], &outside);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest = std::fs::read_to_string(outside.join("filter/Cargo.toml")).unwrap();
    assert!(manifest.contains("[workspace]") && manifest.contains("lto = true"), "{manifest}");
    let lib = std::fs::read_to_string(outside.join("filter/src/lib.rs")).unwrap();
    assert!(lib.contains("fn transform("), "{lib}");

    // Refused, with a reason: an existing folder, a bad name, no kind, no SDK to be found.
    let refused = |args: &[&OsStr], cwd: &Path, needle: &str| {
        let out = plugin_new(args, cwd);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(needle), "{needle:?} not in {}", text(&out.stderr));
    };
    refused(
        &["filter".as_ref(), "--transform".as_ref(), "--sdk".as_ref(), sdk.as_os_str()],
        &outside,
        "already exists",
    );
    refused(
        &["Bad_Name".as_ref(), "--decode".as_ref(), "--sdk".as_ref(), sdk.as_os_str()],
        &outside,
        "invalid plugin name",
    );
    refused(&["x".as_ref()], &outside, "--decode");
    refused(&["x".as_ref(), "--decode".as_ref()], &outside, "pass --sdk");
    let _ = std::fs::remove_dir_all(&base);
}

/// `RUST_LOG=debug` makes the engine's compile threads write log lines to stderr while the command
/// runs: they must not wait for a lock the command holds. The bundled decoder on its recorded
/// frames finishes (well within a minute) and prints its records.
#[test]
fn debug_logging_does_not_hang_a_plugin_test() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "test"])
        .arg(plugin("binance"))
        .arg("--frames")
        .arg(fixture("binance_combined_aggtrade.jsonl"))
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes so neither fills while we wait.
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`RUST_LOG=debug sluice plugin test` still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "{stderr}");
    assert!(stdout.lines().count() > 0, "no records printed");
    assert!(stderr.contains("DEBUG"), "debug log lines were written: {}", &stderr[..stderr.len().min(500)]);
}

/// A plugin's author's first day with only the binary: in a folder outside any checkout, `plugin
/// new` without `--sdk` says how to get the SDK; `plugin sdk --out` writes it; the crate `plugin
/// new --sdk` makes passes its own `cargo test` and builds to wasm (offline, from cargo's cache);
/// and the component, run with the bundled decoder by name, matches its expected output.
#[test]
fn plugin_sdk_writes_an_sdk_a_new_plugin_builds_against_outside_a_checkout() {
    let base = common::fresh_dir("plugin-sdk");
    let out = plugin_new(&["rule".as_ref(), "--transform".as_ref()], &base);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("sluice plugin sdk --out DIR"), "{}", text(&out.stderr));

    let sdk = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "sdk", "--out", "sdk"])
        .current_dir(&base)
        .output()
        .unwrap();
    assert!(sdk.status.success(), "{}", text(&sdk.stderr));
    assert!(text(&sdk.stdout).contains("--sdk"), "{}", text(&sdk.stdout));
    let wit = std::fs::read(base.join("sdk/wit/sluice.wit")).unwrap();
    assert_eq!(wit, std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/sluice.wit")).unwrap());
    let out = plugin_new(&["rule".as_ref(), "--transform".as_ref(), "--sdk".as_ref(), "sdk".as_ref()], &base);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let crate_dir = base.join("rule");
    let readme = std::fs::read_to_string(crate_dir.join("README.md")).unwrap();
    assert!(readme.contains("--decode-with binance"), "the bundled decoder by name:\n{readme}");
    let cargo = |args: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(args)
            .arg("--offline")
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", crate_dir.join("target"))
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        assert!(out.status.success(), "cargo {args:?}:\n{}", text(&out.stderr));
    };
    cargo(&["test", "--quiet"]);
    cargo(&["build", "--release", "--target", "wasm32-wasip2", "--quiet"]);
    let wasm = crate_dir.join("target/wasm32-wasip2/release/rule.wasm");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "test"])
        .arg(&wasm)
        .args(["--frames", "frames.jsonl", "--expect", "expected.jsonl", "--strict", "--decode-with", "binance"])
        .env_remove("RUST_LOG")
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    let (records, _) = succeeded(&out);
    assert!(!records.is_empty());
    let _ = std::fs::remove_dir_all(&base);
}
