//! Faults stay small, with the real binary: one bad part of the pipeline costs the rest at most a
//! few seconds, loses nothing, and never keeps a stop from completing. Each test plays one fault
//! against `sluice run` and checks what the book's Faults chapter (docs/src/operating/faults.md) says sluice does about it,
//! and what shows it.
//!
//! - [`disk`]: the data directory's filesystem fills up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
mod disk;

use common::SluiceProcess;
use common::api_get as get;
use common::config::{BINANCE_BTC, COINBASE_ETH, ConfigToml, Source};
use feedsim::{FeedSim, FeedSimConfig, Venue};

fn temp_dir(name: &str) -> PathBuf {
    common::fresh_dir(&format!("faults-{name}"))
}

/// The events the store rolled up per source, and its dead letters per source.
fn stored(store: &Path) -> (std::collections::BTreeMap<String, i64>, std::collections::BTreeMap<String, i64>) {
    let Ok(conn) = rusqlite::Connection::open(store) else { return Default::default() };
    let count = |sql: &str| -> std::collections::BTreeMap<String, i64> {
        let Ok(mut stmt) = conn.prepare(sql) else { return Default::default() };
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).unwrap().map(Result::unwrap).collect()
    };
    (
        count("SELECT source, sum(events) FROM rollup GROUP BY source"),
        count("SELECT source, count(*) FROM dead_letters GROUP BY source"),
    )
}

/// A link that hangs on every call (`chaos` in `loop` mode: each call runs to the plugin's deadline)
/// is in Binance's chain; Coinbase has no chain. Retry and bisection of a failed batch stop at the
/// link's time budget, every failed call counts toward the breaker, so it opens within the first
/// batch; Binance is then held (its records wait in the log, not dead-lettered) while Coinbase's
/// are rolled up as they come. A SIGTERM ends the run within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_link_holds_its_source_and_the_others_go_on() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 200.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp_dir("hanging");
    let api = common::free_addr();
    let binance = Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC).decode("binance");
    let coinbase = Source::ws("coinbase", &sim.url(Venue::Coinbase), COINBASE_ETH).decode("coinbase");
    let config = ConfigToml::new(&dir)
        .api_bind(&api)
        .process("max_wait_ms", 50)
        .plugin("chaos", "chaos.wasm")
        .source(binance.link("chaos", &[("mode", "loop")]))
        .source(coinbase)
        .save();
    let log = dir.join("sluice.log");
    let store = dir.join("store.sqlite");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let records = |sources: &serde_json::Value, name: &str| {
        sources["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["records"].as_i64())
    };
    // Running for a while: both sources deliver to the log.
    let started = Instant::now();
    loop {
        let sources = get(&api, "/v1/sources").await;
        if records(&sources, "binance").unwrap_or(0) > 500 && records(&sources, "coinbase").unwrap_or(0) > 2_000 {
            break;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "the sources deliver too little:\n{sources}\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Coinbase is rolled up as it comes: what the log had two seconds ago is in the store now.
    let coinbase_logged = records(&get(&api, "/v1/sources").await, "coinbase").unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rolled, dead) = stored(&store);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let coinbase = rolled.get("coinbase").copied().unwrap_or(0);
    assert!(coinbase >= coinbase_logged, "coinbase: {coinbase} rolled up of {coinbase_logged} logged\n{text}");
    assert_eq!(rolled.get("binance"), None, "binance's link never works: nothing of it is rolled up\n{text}");
    // Before the breaker first opens, a batch of one record whose call and retry fail is taken for a
    // poison record and dead-lettered: two failed calls each, so at most two of them (the threshold
    // is five failed calls). After that every batch of the link's waits.
    let binance_dead = dead.get("binance").copied().unwrap_or(0);
    assert!(binance_dead <= 2, "{binance_dead} of binance's records dead-lettered; they wait in the log\n{text}");
    let health = get(&api, "/health/ready").await;
    assert_eq!(health["checks"]["breakers"]["ok"], false, "{health}");
    assert!(text.contains("these sources' records wait in the log"), "{text}");

    // A stop is honoured within seconds, whatever the link does.
    let mut child = run.0.take().unwrap();
    let asked = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(asked.elapsed() < Duration::from_secs(10), "no exit 10 s after SIGTERM\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The plugin instance pool is sized from the configuration: 150 sources, each with a chain of
/// two links, need more instances than a fixed pool of 256 held (300 links in the process role
/// alone), and the run starts and delivers every source's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sources_with_chains_start_and_deliver() {
    let dir = temp_dir("many");
    let recording = dir.join("trades.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            format!(
                r#"{{"stream":"btcusdt@aggTrade","data":{{"e":"aggTrade","E":1700000000{i:03},"s":"BTCUSDT","a":{id},"p":"100.0","q":"1.0","f":{id},"l":{id},"T":1700000000{i:03},"m":false,"M":true}}}}"#,
                id = 1000 + i
            )
        })
        .collect();
    std::fs::write(&recording, format!("{}\n", lines.join("\n"))).unwrap();
    let api = common::free_addr();
    let mut config = ConfigToml::new(&dir).api_bind(&api).process("max_wait_ms", 50);
    const SOURCES: usize = 150;
    for i in 0..SOURCES {
        let source = Source::file(&format!("recording-{i}"), &recording)
            .decode("binance")
            .link("outlier-filter", &[])
            .link("min-volume", &[("min_volume", "0.5")]);
        config = config.source(source);
    }
    let config = config.save();
    let log = dir.join("sluice.log");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let started = Instant::now();
    loop {
        let (rolled, _) = stored(&dir.join("store.sqlite"));
        if rolled.len() == SOURCES && rolled.values().all(|n| *n == 3) {
            break;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains("ERROR"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(90), "{} sources rolled up:\n{text}", rolled.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.interrupt();
    let _ = std::fs::remove_dir_all(dir);
}
