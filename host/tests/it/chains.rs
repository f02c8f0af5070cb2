//! A source's chain in the real binary: `sluice run` on the local log with the demo's Binance rules,
//! `binance` then `min-volume` then `outlier-filter`, fed by the feed simulator on loopback, and one
//! link swapped through the HTTP API while trades flow.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use feedsim::Venue;
use plugin_sdk::StreamDataView;
use sluice::plugin::bundled;

use crate::common;

use common::config::{ConfigToml, Source};
use common::{SluiceProcess, api_call, free_addr, with_custom_section};

const TOKEN: &str = "chain-test-token";
const SYMBOLS: [&str; 2] = ["ETHUSDT", "SOLUSDT"];
/// `min-volume`'s threshold, in base units and e8.
const MIN_VOLUME: &str = "1";
const MIN_VOLUME_E8: i64 = 100_000_000;

/// Events and exact quantity sums per symbol.
type PerSymbol = BTreeMap<String, (i64, i64)>;

fn stored(store: &std::path::Path) -> PerSymbol {
    common::rollup_sums(store, &["symbol"]).into_iter().map(|(mut key, sums)| (key.remove(0), sums)).collect()
}

/// The store's dead letters as (plugin, symbol, volume e8), symbols named with the log's dictionary.
fn dead_letters(dir: &std::path::Path) -> Vec<(String, String, i64)> {
    let Ok(store) = rusqlite::Connection::open(dir.join("store.sqlite")) else { return Vec::new() };
    let Ok(mut stmt) = store.prepare("SELECT plugin, bytes FROM dead_letters WHERE stage = 'transform'") else {
        return Vec::new();
    };
    let letters: Vec<(String, Vec<u8>)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    let log = rusqlite::Connection::open(dir.join("log.sqlite")).unwrap();
    let mut names = log.prepare("SELECT id, name FROM symbols").unwrap();
    let symbols: BTreeMap<u32, String> =
        names.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    letters
        .into_iter()
        .map(|(plugin, bytes)| {
            let v = StreamDataView::parse(&bytes).unwrap();
            (plugin, symbols.get(&v.symbol_id).cloned().unwrap_or_default(), v.volume_e8)
        })
        .collect()
}

fn total(m: &PerSymbol) -> i64 {
    m.values().map(|v| v.0).sum()
}

/// Waits until the store rolled up `more` events beyond what it holds now.
async fn wait_rows(store: &std::path::Path, log: &std::path::Path, more: i64) {
    let want = total(&stored(store)) + more;
    let start = Instant::now();
    while total(&stored(store)) < want {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(60), "stuck below {want} rows:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Swapping one link under load changes only that link, and loses and repeats nothing. While the
/// simulator drives Binance trades, a rebuilt `min-volume` (other bytes, same behaviour) is
/// uploaded and activated:
/// - the decoder and `outlier-filter` stay on their versions; `min-volume` moves to the new one,
///   and both of its versions ran batches (the swap happened mid-stream);
/// - `GET /v1/sources` shows the chain with each link's active version;
/// - every trade the venue sent with at least `min_volume` is, exactly once, either rolled up or
///   dead-lettered by `outlier-filter` (naming its version): per symbol, the store's event count and
///   exact quantity sum plus the dead letters' equal those of the trades sent, filtered
///   independently here; smaller trades were dropped by the first link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_one_link_under_load_changes_only_that_link_and_loses_and_repeats_nothing() {
    let sim = common::recording_sim(300.0).await;
    let dir = common::fresh_dir("chains");
    let params: Vec<String> = SYMBOLS.iter().map(|s| format!("\"{}@aggTrade\"", s.to_lowercase())).collect();
    let subscribe = format!(r#"{{"method":"SUBSCRIBE","params":[{}],"id":1}}"#, params.join(","));
    let source = Source::ws("binance", &sim.url(Venue::Binance), &subscribe)
        .decode("binance")
        .link("min-volume", &[("min_volume", MIN_VOLUME)])
        .link("outlier-filter", &[("threshold_pct", "5")]);
    let config = ConfigToml::new(&dir).process("max_wait_ms", 100).source(source).save();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let api = free_addr();
    let mut run = SluiceProcess::run(&config, &log, &["--api-addr", &api], Some(TOKEN));
    let http = reqwest::Client::new();
    let get = |path: &str| api_call(&http, reqwest::Method::GET, format!("http://{api}{path}"), TOKEN, None);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_rows(&store, &log, 50).await;
    let active = |view: &serde_json::Value| view["active"].as_str().unwrap_or_default().to_owned();
    let binance = active(&get("/v1/plugins/binance").await.1);
    let outlier = active(&get("/v1/plugins/outlier-filter").await.1);
    let old = active(&get("/v1/plugins/min-volume").await.1);
    assert_eq!(old, sluice::plugin::version_of(bundled::MIN_VOLUME));

    // The swap: a rebuilt min-volume, uploaded and activated under load.
    let rebuilt = with_custom_section(bundled::MIN_VOLUME, "chain");
    let url = format!("http://{api}/v1/plugins/min-volume");
    let (status, uploaded) = api_call(&http, reqwest::Method::PUT, url.clone(), TOKEN, Some(rebuilt.into())).await;
    assert_eq!(status, 201, "{uploaded}");
    let new = uploaded["version"].as_str().unwrap().to_owned();
    let body = serde_json::json!({ "version": new }).to_string();
    let (status, view) =
        api_call(&http, reqwest::Method::POST, format!("{url}/activate"), TOKEN, Some(body.into())).await;
    assert_eq!((status, active(&view)), (200, new.clone()), "{view}");
    wait_rows(&store, &log, 50).await;

    // The venue stops; everything it sent is read, transformed and committed.
    let handle = sim.handle();
    sim.shutdown().await;
    let sent: BTreeMap<&str, Vec<feedsim::SentTrade>> =
        SYMBOLS.iter().map(|s| (*s, handle.sent_trades(Venue::Binance, s))).collect();
    let mut want = PerSymbol::new();
    for (symbol, trades) in &sent {
        for t in trades.iter().filter(|t| t.size_e8 >= MIN_VOLUME_E8) {
            let e = want.entry(symbol.to_string()).or_default();
            e.0 += 1;
            e.1 += t.size_e8;
        }
    }
    let sent_total: usize = sent.values().map(Vec::len).sum();
    assert!(total(&want) > 0 && (total(&want) as usize) < sent_total, "the filter must keep some, drop some");
    let outcome = || {
        let mut got = stored(&store);
        for (_, symbol, volume) in dead_letters(&dir) {
            let e = got.entry(symbol).or_default();
            e.0 += 1;
            e.1 += volume;
        }
        got
    };
    let start = Instant::now();
    while total(&outcome()) < total(&want) && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outcome(), want, "stored + dead-lettered vs sent at or above min_volume\n{}", text());
    for (plugin, symbol, _) in dead_letters(&dir) {
        assert_eq!(plugin, format!("outlier-filter@{outlier}"), "a dead letter of {symbol} names another link");
    }

    // Only the swapped link changed, and both of its versions ran.
    assert_eq!(active(&get("/v1/plugins/binance").await.1), binance);
    assert_eq!(active(&get("/v1/plugins/outlier-filter").await.1), outlier);
    let (_, view) = get("/v1/plugins/min-volume").await;
    assert_eq!(active(&view), new);
    let records_in = |version: &str| {
        view["versions"].as_array().unwrap().iter().find(|v| v["version"] == version).unwrap()["records_in"]
            .as_u64()
            .unwrap()
    };
    assert!(records_in(&old) > 0 && records_in(&new) > 0, "{view}");
    let (_, sources) = get("/v1/sources").await;
    assert_eq!(
        sources["sources"][0]["transforms"],
        serde_json::json!([
            { "plugin": "min-volume", "version": new, "rejects": 0 },
            { "plugin": "outlier-filter", "version": outlier, "rejects": 0 }
        ]),
        "{sources}"
    );
    run.interrupt();
    let _ = std::fs::remove_dir_all(&dir);
}
