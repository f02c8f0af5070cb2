//! Hostile feeds stay small, with the real binary: a venue that floods pings and reads nothing, and
//! a feed that names a fresh symbol in every frame, cost sluice a reconnect and some dead letters,
//! never its memory, its dictionary or a clean stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::common;

use common::SluiceProcess;
use common::api_get as get;
use common::config::{BINANCE_BTC, ConfigToml, Source};
use feedsim::{FeedSim, FeedSimConfig, Venue};

fn temp_dir(name: &str) -> PathBuf {
    common::fresh_dir(&format!("faults-ingest-{name}"))
}

async fn metrics(api: &str) -> String {
    match reqwest::get(format!("http://{api}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the series of `name` whose labels contain `label` (e.g. `reason="too_long"`).
fn series(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A counter of the one source in `/v1/sources`.
fn counter(sources: &serde_json::Value, field: &str) -> i64 {
    sources["sources"][0][field].as_i64().unwrap_or(0)
}

/// Polls `check` every 100 ms until it holds, failing with `what` (and the log) after `limit`.
async fn until<F: std::future::Future<Output = bool>>(limit: Duration, log: &Path, what: &str, check: impl Fn() -> F) {
    let started = Instant::now();
    while !check().await {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(started.elapsed() < limit, "{what} within {limit:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGINT, and the clean exit within `limit`.
async fn interrupt_within(mut child: Child, limit: Duration, log: &Path) {
    let asked = Instant::now();
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if asked.elapsed() > limit {
            let _ = child.kill();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("no exit {limit:?} after SIGINT\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

/// A venue that floods pings and reads nothing, not even the pongs: once the socket's buffers are
/// full, sluice's next ping cannot be written within `write_timeout_ms`, and the source gives the
/// connection up and connects again (counted in `write_timeouts` and `reconnects`), again and again
/// while the flood lasts. When it ends, trades flow again. A SIGINT in the middle of a flood ends
/// the run within seconds (a read loop stuck writing a pong used to hold the stop for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_venue_that_floods_pings_and_never_reads_is_reconnected_and_a_stop_works() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 100.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp_dir("ping-flood");
    let api = common::free_addr();
    let source = Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC)
        .decode("binance")
        .set("ping_interval_ms", 500)
        .set("write_timeout_ms", 1000)
        .set("reconnect_min_ms", 100)
        .set("reconnect_max_ms", 500);
    let config = ConfigToml::new(&dir).api_bind(&api).source(source).save();
    let log = dir.join("sluice.log");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let api = api.as_str();
    let records = move || async move { counter(&get(api, "/v1/sources").await, "records") };
    until(Duration::from_secs(60), &log, "trades decoded", || async { records().await > 50 }).await;

    sim.handle().set_flood_pings(true);
    until(Duration::from_secs(30), &log, "two connections given up for writes that could not finish", || async {
        let sources = get(api, "/v1/sources").await;
        counter(&sources, "write_timeouts") >= 2 && counter(&sources, "reconnects") >= 2
    })
    .await;

    // The flood ends: trades flow again on the next connection.
    sim.handle().set_flood_pings(false);
    let before = records().await;
    until(Duration::from_secs(30), &log, "trades after the flood", || async { records().await > before + 50 }).await;

    // A stop in the middle of a flood is honoured within seconds.
    sim.handle().set_flood_pings(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    interrupt_within(run.0.take().unwrap(), Duration::from_secs(5), &log).await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A feed that names a fresh symbol in every frame, some of them 900 KB long: the quota
/// (`max_symbols`, here 100, for the plugin version whatever its instances do) and the length cap
/// (`max_symbol_bytes`, 64) hold, so the dictionary keeps at most 100 short names; every refused
/// frame is dead-lettered and counted by reason; the decoder's memory never fills (no call hits a
/// limit), and the known symbol's trades are all rolled up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_symbol_names_leaves_memory_and_the_dictionary_bounded() {
    let dir = temp_dir("symbol-flood");
    let api = common::free_addr();
    let trade = |id: usize, symbol: &str| {
        format!(
            r#"{{"e":"aggTrade","E":1,"s":"{symbol}","a":{id},"p":"1.5","q":"2","f":1,"l":1,"T":1700000000000,"m":false,"M":true}}"#
        ) + "\n"
    };
    // BTCUSDT first (named within the quota), then a fresh name in every frame: 80 of 900 KB, then
    // 3,000 short ones with a BTCUSDT trade after every tenth.
    let (fresh, huge, btc) = (3_000, 80, 500);
    let mut recording: String = (1..=200).map(|id| trade(id, "BTCUSDT")).collect();
    let padding = "Z".repeat(900_000);
    for i in 0..huge {
        recording += &trade(1, &format!("{padding}{i}"));
    }
    for i in 0..fresh {
        recording += &trade(1, &format!("FRESH{i:05}USDT"));
        if i % 10 == 0 {
            recording += &trade(201 + i / 10, "BTCUSDT");
        }
    }
    let path = dir.join("flood.jsonl");
    std::fs::write(&path, recording).unwrap();
    let config = ConfigToml::new(&dir)
        .api_bind(&api)
        .process("max_wait_ms", 50)
        .set("plugins.binance", "max_symbols", 100)
        .source(Source::file("flood", &path).decode("binance"))
        .save();
    let log = dir.join("sluice.log");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let api = api.as_str();
    let frames = (200 + fresh + huge + (btc - 200)) as i64;
    until(Duration::from_secs(120), &log, "every frame decoded or dead-lettered", || async {
        let sources = get(api, "/v1/sources").await;
        sources["sources"][0]["state"] == "finished"
            && counter(&sources, "records") + counter(&sources, "rejects") == frames
    })
    .await;
    let sources = get(api, "/v1/sources").await;
    let text = metrics(api).await;
    let pid = run.0.as_ref().unwrap().id();
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap()))
        .unwrap();
    // BTCUSDT, then 99 fresh names: the rest are refused.
    let (named, refused_frames) = ((btc + 99) as i64, (fresh + huge - 99) as i64);
    assert_eq!((counter(&sources, "records"), counter(&sources, "rejects")), (named, refused_frames));
    // Each refused name counts once per time it is asked for: once, or again when a call that timed
    // out on a busy machine is retried frame by frame.
    let refused = |reason: &str| {
        series(&text, "sluice_plugin_symbols_refused_total", &format!("reason=\"{reason}\"")).unwrap_or(0.0) as usize
    };
    assert!(refused("too_long") >= huge && refused("over_quota") >= fresh - 99, "{text}");
    let limit_errors = series(&text, "sluice_plugin_limit_errors_total", "stage=\"decode\"");
    assert_eq!(limit_errors, Some(0.0), "the decoder's memory filled up:\n{text}");
    // About 150 MB here (the queue holds up to 64 MiB of the large frames).
    assert!(peak < 384 * 1024, "the process peaked at {peak} kB");

    interrupt_within(run.0.take().unwrap(), Duration::from_secs(10), &log).await;
    let conn = rusqlite::Connection::open(dir.join("log.sqlite")).unwrap();
    let (names, longest, bytes): (i64, i64, i64) = conn
        .query_row(
            "SELECT count(*), max(length(name)), sum(length(name)) FROM symbols WHERE name NOT LIKE '%source:%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(names, 100, "the dictionary holds {names} names ({bytes} bytes, the longest {longest})");
    assert!(longest <= 64, "a name of {longest} bytes is in the dictionary");
    let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0)).unwrap();
    assert_eq!(dead, refused_frames);
    let store = rusqlite::Connection::open(dir.join("store.sqlite")).unwrap();
    let sql = "SELECT coalesce(sum(events), 0) FROM rollup WHERE symbol = 'BTCUSDT'";
    let events: i64 = store.query_row(sql, [], |r| r.get(0)).unwrap();
    assert_eq!(events, btc as i64, "BTCUSDT's trades are all rolled up");
    let _ = std::fs::remove_dir_all(dir);
}
