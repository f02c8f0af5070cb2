//! Restarts count nothing twice, with the real binary on the local log: a recording replayed by a
//! file source and killed with SIGKILL three times during its run ends with the same store and the
//! same dead letters as a run straight through, is not read again once finished, and is refused
//! when it changes under its path.
//!
//! Its chain is stateful: `chaos` in `count` mode numbers each symbol's records (1, 2, 3, ... as
//! their volume) and traps on a poison record, then `outlier-filter` judges each price against the
//! last one it accepted. A state lost or applied twice at a kill, a trap's retry and bisection, or
//! a poll read again changes the volumes and the outlier decisions, so the store is compared with
//! what the recording alone implies as well as with the run straight through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common;

use common::SluiceProcess;
use common::api_get as get;
use common::config::{COINBASE_ADVANCED_BTC, COINBASE_ETH, ConfigToml, KRAKEN_V2_BTC, KRAKEN_XBT, Source, Topics};

fn temp_dir(name: &str) -> PathBuf {
    common::fresh_dir(&format!("restarts-{name}"))
}

/// The trade id the `chaos` link traps on: its record is dead-lettered by the process role.
const POISON: u64 = 5_000_777;

/// A Binance combined-stream recording of `n` lines: two symbols, trade times spread over several
/// minutes; every 997th line cut short (a decode dead letter) and every 1,500th line a repeat of the
/// trade before it (a duplicate trade id).
fn recording(path: &Path, n: u64) {
    let mut text = String::new();
    let mut last = String::new();
    for i in 0..n {
        if i % 997 == 996 {
            text.push_str("{\"stream\":\"btcusdt@aggTrade\",\"data\":{\"e\":\"aggTrade\"\n");
            continue;
        }
        if i % 1500 == 1499 {
            text.push_str(&last);
            continue;
        }
        let (stream, symbol) = if i % 3 == 0 { ("ethusdt", "ETHUSDT") } else { ("btcusdt", "BTCUSDT") };
        let id = 5_000_000 + i;
        let t = 1_700_000_000_000 + i * 41;
        let price = 30_000 + (i * 7919) % 500;
        let qty = 1 + (i * 104_729) % 900;
        last = format!(
            "{{\"stream\":\"{stream}@aggTrade\",\"data\":{{\"e\":\"aggTrade\",\"E\":{t},\"s\":\"{symbol}\",\"a\":{id},\
             \"p\":\"{price}.{:02}\",\"q\":\"0.{qty:03}\",\"f\":{id},\"l\":{id},\"T\":{t},\"m\":{},\"M\":true}}}}\n",
            i % 100,
            i % 2 == 0
        );
        text.push_str(&last);
    }
    std::fs::write(path, text).unwrap();
}

/// The recording at `recording` replayed at `rate` lines a second (0: as fast as it goes) through
/// the stateful chain, with the API on `api`.
fn config(dir: &Path, recording: &Path, rate: u32, api: &str) -> ConfigToml {
    let source = Source::file("recorded", recording)
        .set("rate", rate)
        .decode("binance")
        .link("chaos", &[("mode", "count"), ("trap_on_trade_id", &POISON.to_string())])
        .link("outlier-filter", &[("threshold_pct", "1")]);
    ConfigToml::new(dir)
        .api_bind(api)
        .process("max_wait_ms", 50)
        .process("checkpoint_interval_ms", 100)
        .plugin("chaos", "chaos.wasm")
        .source(source)
}

/// A fresh data directory `dir` holding a recording of `lines` lines, `file`, and the configuration
/// `config` replaying it at `rate` through the stateful chain (`more` adds to it: a `[kafka]`
/// table), the API on `api`; the instance's `store` and `log` (its log lines) there.
struct Recorded {
    dir: PathBuf,
    file: PathBuf,
    api: String,
    config: PathBuf,
    store: PathBuf,
    log: PathBuf,
}

fn recorded(name: &str, lines: u64, rate: u32, more: impl FnOnce(ConfigToml) -> ConfigToml) -> Recorded {
    let dir = temp_dir(name);
    let file = dir.join("trades.jsonl");
    recording(&file, lines);
    let api = common::free_addr();
    let config = more(config(&dir, &file, rate, &api)).save();
    Recorded { store: dir.join("store.sqlite"), log: dir.join("sluice.log"), dir, file, api, config }
}

/// `sluice run` on `config`, which must refuse to start; what it said.
fn refused_start(config: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    err
}

/// Runs `sluice run <extra...>` on `config` until the recording is finished and read, then stops
/// it cleanly.
async fn run_to_the_end(config: &Path, api: &str, log: &Path, extra: &[&str]) {
    let mut run = SluiceProcess::run(config, log, extra, None);
    wait_finished(api, log).await;
    run.interrupt();
}

/// The store's rollup, bucket by bucket, in its exact columns (events, the e8 quantity sum, the
/// prices and their times); the floating sums are left out, as their last bits depend on how rows
/// were batched (the e8 sum is the quantity exactly).
fn rollup(store: &Path) -> BTreeMap<String, String> {
    let Ok(conn) = rusqlite::Connection::open(store) else { return BTreeMap::new() };
    let Ok(mut stmt) = conn.prepare(
        "SELECT bucket_ms, source, symbol, side, events, qty_sum_e8, price_min, price_max, price_first, first_ms, \
         price_last, last_ms FROM rollup",
    ) else {
        return BTreeMap::new();
    };
    stmt.query_map([], |r| {
        let key = format!(
            "{} {} {} {}",
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?
        );
        let value = format!(
            "events {} qty_e8 {} min {} max {} first {}@{} last {}@{}",
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, f64>(6)?,
            r.get::<_, f64>(7)?,
            r.get::<_, f64>(8)?,
            r.get::<_, i64>(9)?,
            r.get::<_, f64>(10)?,
            r.get::<_, i64>(11)?,
        );
        Ok((key, value))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Waits until the store has rolled up at least `at_least` events (60 s at most).
async fn wait_events(store: &Path, at_least: i64, log: &Path) {
    let started = Instant::now();
    while events(store) < at_least {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "fewer than {at_least} events rolled up:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn events(store: &Path) -> i64 {
    rollup(store).values().map(|v| v.split(' ').nth(1).unwrap().parse::<i64>().unwrap()).sum()
}

/// The dead letters of a SQLite file (the log's: decode; the store's: transform), as sorted
/// (stage, source, plugin, reason, content): a frame as it was read, a record as its fields without
/// the receive time (which no two runs share).
fn dead_letters(file: &Path) -> Vec<(String, String, String, String, String)> {
    let conn = rusqlite::Connection::open(file).unwrap();
    let mut stmt = conn.prepare("SELECT stage, source, plugin, reason, bytes FROM dead_letters").unwrap();
    let content = |stage: &str, bytes: Vec<u8>| match stage {
        "transform" => {
            let record = plugin_sdk::StreamDataView::parse(&bytes).unwrap().record();
            format!("{:?}", plugin_sdk::Record { received_at_us: 0, ..record })
        }
        _ => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let mut out: Vec<_> = stmt
        .query_map([], |r| {
            let stage: String = r.get(0)?;
            let bytes: Vec<u8> = r.get(4)?;
            Ok((stage.clone(), r.get(1)?, r.get(2)?, r.get(3)?, content(&stage, bytes)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    out.sort();
    out
}

/// Waits until the source shows as finished and the store has read the whole log.
async fn wait_finished(api: &str, log: &Path) {
    wait_finished_but(api, log, 0).await
}

/// [`wait_finished`], with each partition's lag allowed up to `slack`: on Kafka a file source
/// writes in transactions, and the commit marker that ends the last one takes the partition's last
/// offset, which no consumer is handed (so the store's position stops one short of it).
async fn wait_finished_but(api: &str, log: &Path, slack: i64) {
    let started = Instant::now();
    loop {
        let sources = get(api, "/v1/sources").await;
        let state = sources["sources"][0]["state"].as_str().unwrap_or_default().to_owned();
        let partitions = get(api, "/v1/log").await["partitions"].as_array().cloned().unwrap_or_default();
        let lag = partitions
            .iter()
            .map(|p| p["lag"].as_i64().map(|lag| if lag <= slack { 0 } else { lag }))
            .sum::<Option<i64>>()
            .filter(|_| !partitions.is_empty());
        if state == "finished" && lag == Some(0) {
            return;
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(120), "not finished (state {state}, lag {lag:?}):\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a run straight through leaves: the rollup, the decode and the transform dead letters.
struct Straight {
    rollup: BTreeMap<String, String>,
    decode: Vec<(String, String, String, String, String)>,
    transform: Vec<(String, String, String, String, String)>,
}

/// The recording of `lines` lines run straight through on a fresh data directory, checked against
/// what the recording alone implies.
async fn straight_through(name: &str, lines: u64) -> Straight {
    let Recorded { dir: straight, api, config, .. } = recorded(name, lines, 0, |c| c);
    run_to_the_end(&config, &api, &straight.join("sluice.log"), &[]).await;
    let want = Straight {
        rollup: rollup(&straight.join("store.sqlite")),
        decode: dead_letters(&straight.join("log.sqlite")),
        transform: dead_letters(&straight.join("store.sqlite")),
    };
    assert_eq!(want.decode.len(), 12, "the cut lines are dead-lettered by decode");
    let by = |plugin: &str| want.transform.iter().filter(|d| d.2.starts_with(plugin)).count();
    assert_eq!(by("chaos@"), 1, "the poison record is dead-lettered by its link");
    assert!(by("outlier-filter@") > 100, "outlier-filter rejected {} trades", by("outlier-filter@"));
    // Each symbol's records numbered 1..=n by the counting link, in log order, the poison left
    // out: what reaches the store and the outlier dead letters adds up to n(n+1)/2 per symbol.
    let trades = lines - 12 - 8;
    let eth = (0..lines).filter(|i| i % 997 != 996 && i % 1500 != 1499 && i % 3 == 0).count() as i64 - 1;
    let btc = trades as i64 - 1 - eth;
    let rolled: i64 = want.rollup.values().map(|v| v.split(' ').nth(3).unwrap().parse::<i64>().unwrap()).sum();
    let outliers: i64 = want
        .transform
        .iter()
        .filter(|d| d.2.starts_with("outlier-filter@"))
        .map(|d| d.4.split("volume_e8: ").nth(1).unwrap().split(',').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(rolled + outliers, eth * (eth + 1) / 2 + btc * (btc + 1) / 2, "the counting link's state");
    let _ = std::fs::remove_dir_all(straight);
    want
}

/// The recording of `lines` lines run straight through (see [`straight_through`]), then the same
/// recording as `name` at `rate`, started with `token` and running until `events` are rolled up.
async fn straight_then_running(
    name: &str,
    lines: u64,
    rate: u32,
    token: Option<&str>,
    events: i64,
) -> (Straight, Recorded, SluiceProcess) {
    let want = straight_through(&format!("straight-{name}"), lines).await;
    let recorded = recorded(name, lines, rate, |c| c);
    let run = SluiceProcess::run(&recorded.config, &recorded.log, &[], token);
    wait_events(&recorded.store, events, &recorded.log).await;
    (want, recorded, run)
}

/// The contract of a restart, end to end: a recording killed three times mid-run equals a run
/// straight through, bucket by bucket and dead letter by dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_source_killed_three_times_equals_a_run_straight_through() {
    let lines = 12_000;
    let Straight { rollup: want, decode: want_decode, transform: want_transform } =
        straight_through("straight", lines).await;

    // Paced at 4,000 lines/s (3 s), killed with SIGKILL three times at different points.
    let Recorded { dir: killed, file, api, config, store, log } = recorded("killed", lines, 4000, |c| c);
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    for more in [1_500, 2_200, 2_900] {
        wait_events(&store, events(&store) + more, &log).await;
        run.kill_9();
        run = SluiceProcess::run(&config, &log, &[], None);
    }
    wait_finished(&api, &log).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("role=All").count(), 4, "four starts:\n{text}");
    assert_eq!(rollup(&store), want, "the store after three kills vs straight through\n{text}");
    assert_eq!(dead_letters(&killed.join("log.sqlite")), want_decode, "decode dead letters");
    assert_eq!(dead_letters(&store), want_transform, "transform dead letters");

    // Finished: a restart reads nothing again and says so at once.
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    wait_finished(&api, &log).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.interrupt();
    assert_eq!(rollup(&store), want, "a finished recording was read again");

    // Another recording under the same path is refused, naming the source, and changes nothing.
    recording(&file, 100);
    let err = refused_start(&config);
    assert!(err.contains("source \"recorded\"") && err.contains("changed since it was read"), "{err}");
    assert_eq!(rollup(&store), want);
    let _ = std::fs::remove_dir_all(killed);
}

/// On Kafka the same contract: each file source's records, decode dead letters and position commit
/// in one transaction of its own, and a restart reads the position back from the files topic. The
/// recording killed three times equals the local run straight through, bucket by bucket, and the
/// dead-letter topic holds each cut line once (read again from its start, a recording would
/// dead-letter them again: they carry no trade id to recognise them by).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_file_source_killed_three_times_equals_a_run_straight_through() {
    let lines = 12_000;
    let Straight { rollup: want, decode: want_decode, transform: want_transform } =
        straight_through("kafka-straight", lines).await;
    let broker = common::TestBroker::start("restart-files");
    let topics = Topics::unique();
    let dlq = &topics.dlq;
    let Recorded { dir: killed, api, config, store, log, .. } =
        recorded("kafka-killed", lines, 4000, |c| c.kafka(&broker.bootstrap, &topics, 2));
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    for more in [1_500, 2_200, 2_900] {
        wait_events(&store, events(&store) + more, &log).await;
        run.kill_9();
        run = SluiceProcess::run(&config, &log, &[], None);
    }
    wait_finished_but(&api, &log, 1).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("role=All").count(), 4, "four starts:\n{text}");
    assert_eq!(rollup(&store), want, "the store after three kills vs straight through\n{text}");
    assert_eq!(dead_letters(&store), want_transform, "transform dead letters");
    let header = |m: &common::ReadMessage, key: &str| {
        m.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
    };
    let letters = common::read_topic(&broker.bootstrap, dlq, 2, want_decode.len() + 1, Duration::from_secs(5));
    let mut decode: Vec<_> = letters
        .iter()
        .map(|m| {
            let field = |key| header(m, key);
            let content = String::from_utf8_lossy(&m.payload).into_owned();
            (field("sluice.stage"), field("sluice.source"), field("sluice.plugin"), field("sluice.reason"), content)
        })
        .collect();
    decode.sort();
    assert_eq!(decode, want_decode, "decode dead letters on the dead-letter topic");

    // Finished: a restart reads nothing again.
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    wait_finished_but(&api, &log, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.interrupt();
    assert_eq!(rollup(&store), want, "a finished recording was read again");
    let _ = std::fs::remove_dir_all(killed);
}

/// A config of four venues on the simulator, each with one symbol: three that send trade ids and a
/// snapshot on subscribing (Kraken v2 its last 50 trades, Coinbase Advanced a `market_trades`
/// snapshot, Coinbase Exchange a `last_match`), and Kraken v1, which sends neither.
fn venues_config(dir: &Path, sim: &feedsim::FeedSim, api: &str) -> PathBuf {
    use feedsim::Venue;
    ConfigToml::new(dir)
        .api_bind(api)
        .process("max_wait_ms", 50)
        .source(Source::ws("kraken-v2", &sim.url(Venue::KrakenV2), KRAKEN_V2_BTC).decode("kraken-v2"))
        .source(
            Source::ws("coinbase-advanced", &sim.url(Venue::CoinbaseAdvanced), COINBASE_ADVANCED_BTC)
                .decode("coinbase-advanced"),
        )
        .source(Source::ws("coinbase", &sim.url(Venue::Coinbase), COINBASE_ETH).decode("coinbase"))
        .source(Source::ws("kraken", &sim.url(Venue::Kraken), KRAKEN_XBT).decode("kraken"))
        .save()
}

/// Waits until every source of this incarnation has decoded more than `records` records, and returns
/// each one's `downtime_gaps` then.
async fn wait_records(api: &str, log: &Path, records: u64) -> BTreeMap<String, u64> {
    let started = Instant::now();
    loop {
        let sources = get(api, "/v1/sources").await;
        let list = sources["sources"].as_array().cloned().unwrap_or_default();
        if list.len() == 4 && list.iter().all(|s| s["records"].as_u64().unwrap_or(0) > records) {
            return list
                .iter()
                .map(|s| (s["name"].as_str().unwrap().to_owned(), s["downtime_gaps"].as_u64().unwrap()))
                .collect();
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "sources did not read:\n{sources}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarts against venues that repeat recent trades on subscribing: after a `kill -9` and after a
/// clean stop, every trade id is in the log once, and the trades sent while sluice was down that
/// no snapshot brought back are exactly the ones counted as downtime gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn venue_snapshots_after_restarts_log_each_trade_once_and_count_the_downtime() {
    use feedsim::Venue;
    let sim = common::recording_sim(80.0).await;
    let dir = temp_dir("venues");
    let api = common::free_addr();
    let config = venues_config(&dir, &sim, &api);
    let log = dir.join("sluice.log");
    // Each restart's downtime gaps, as counted once its snapshot was read.
    let mut downtime: Vec<BTreeMap<String, u64>> = Vec::new();
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    wait_records(&api, &log, 20).await;
    // Down for 1.5 s (about 120 trades a feed, more than a snapshot holds) after a kill, then after
    // a clean stop.
    for clean in [false, true] {
        if clean {
            run.interrupt();
        } else {
            run.kill_9();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        run = SluiceProcess::run(&config, &log, &[], None);
        downtime.push(wait_records(&api, &log, 20).await);
    }
    let handle = sim.handle();
    sim.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The last incarnation's count as it ends (late trades would have taken theirs back off).
    downtime[1] = wait_records(&api, &log, 0).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();

    let records = sluice::handoff::local::read_all(&dir.join("log.sqlite")).unwrap();
    let mut ids: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (_, bytes) in &records {
        let v = plugin_sdk::StreamDataView::parse(bytes).unwrap();
        ids.entry(v.source_id).or_default().push(v.trade_id);
    }
    // Source ids are the sources' positions in a fresh data directory's config.
    let feeds = [
        ("kraken-v2", Venue::KrakenV2, "BTC/USD"),
        ("coinbase-advanced", Venue::CoinbaseAdvanced, "BTC-USD"),
        ("coinbase", Venue::Coinbase, "ETH-USD"),
    ];
    for (i, (name, venue, symbol)) in feeds.iter().enumerate() {
        let mut logged = ids.remove(&(i as u32 + 1)).unwrap_or_default();
        let count = logged.len() as u64;
        logged.sort_unstable();
        logged.dedup();
        assert_eq!(logged.len() as u64, count, "{name}: a trade id is in the log twice\n{text}");
        let sent = handle.sent_ids(*venue, symbol);
        assert!(logged.iter().all(|id| sent.contains(*id)), "{name}: a logged trade was never sent");
        let holes = logged.last().unwrap() - logged[0] + 1 - count;
        let counted: u64 = downtime.iter().map(|d| d[*name]).sum();
        assert!(holes > 0, "{name}: nothing was missed while down: the test proves nothing");
        assert_eq!(holes, counted, "{name}: ids missing from the log vs downtime gaps counted\n{text}");
    }
    // Kraken v1 has no trade ids: nothing can be recognised or counted, and nothing is repeated
    // either (the venue sends no snapshot): at most what was sent is logged.
    let kraken = ids.remove(&4).unwrap_or_default().len() as u64;
    assert!(kraken > 0 && kraken <= handle.sent_ids(Venue::Kraken, "XBT/USD").len(), "kraken v1: {kraken} logged");
    let _ = std::fs::remove_dir_all(dir);
}

/// A replay of a range that starts mid-stream, with the stateful chain, equals the live buckets of
/// that range exactly: it starts from the newest checkpoint of the chains' state at or before the
/// range and runs the records from there without writing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_mid_stream_with_the_stateful_chain_equals_the_live_buckets() {
    let Recorded { dir, api, config, .. } = recorded("replay-state", 12_000, 4000, |c| c);
    run_to_the_end(&config, &api, &dir.join("sluice.log"), &[]).await;
    let store = dir.join("store.sqlite");
    let live = rollup(&store);
    // The recording's trades span eight minutes from this time: start the range in the middle.
    let since = 1_700_000_000_000i64 + 240_000;
    let since = since - since.rem_euclid(60_000);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["replay", "--config"])
        .arg(&config)
        .args(["--since", &since.to_string(), "--into", "mid"])
        .env("RUST_LOG", "sluice=info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("replay starts the chains from a checkpoint"), "{err}");
    let conn = rusqlite::Connection::open(&store).unwrap();
    let replayed: i64 = conn.query_row("SELECT count(*) FROM replay_mid", [], |r| r.get(0)).unwrap();
    let want: BTreeMap<String, String> =
        live.into_iter().filter(|(k, _)| k.split(' ').next().unwrap().parse::<i64>().unwrap() >= since).collect();
    assert_eq!(replayed as usize, want.len(), "buckets replayed vs live in the range");
    // The replay table has the rollup's columns: read it the same way.
    conn.execute_batch("ALTER TABLE rollup RENAME TO rollup_live; ALTER TABLE replay_mid RENAME TO rollup;").unwrap();
    let got = rollup(&store);
    assert_eq!(got, want, "the replayed range vs the live buckets");
    let _ = std::fs::remove_dir_all(dir);
}

/// A hot swap of the counting link to a version with the same state format, in the middle of a
/// run with the real binary: the API answers that the state continues, and no reference is lost
/// at the swap (a count restarted at 1 would change every later volume and outlier decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_of_the_same_state_format_loses_no_reference() {
    let (lines, token) = (12_000, "swap-token");
    // Paced so the upload and activation (a compile, slow on a loaded machine) land in the first half.
    let (want, Recorded { dir, api, store, log, .. }, mut run) =
        straight_then_running("swap", lines, 500, Some(token), 1_000).await;
    let chaos = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let rebuilt = common::with_custom_section(&chaos, "swap");
    let http = reqwest::Client::new();
    let url = format!("http://{api}/v1/plugins/chaos");
    let (status, body) = common::api_call(&http, reqwest::Method::PUT, url.clone(), token, Some(rebuilt.into())).await;
    assert_eq!(status, 201, "{body}");
    let version = body["version"].as_str().unwrap().to_owned();
    let activate = serde_json::json!({ "version": version }).to_string();
    let (status, body) =
        common::api_call(&http, reqwest::Method::POST, format!("{url}/activate"), token, Some(activate.into())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"]["state"], "continues", "{body}");
    assert_eq!(body["state"]["format"], "chaos.count@1", "{body}");
    assert!(events(&store) < (lines as i64) / 2, "the swap came too late to show anything");
    wait_finished(&api, &log).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("switched plugin version"), "{text}");
    let got = rollup(&store);
    let differ: Vec<String> = want
        .rollup
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {v} vs {:?}", got.get(k)))
        .collect();
    assert!(differ.is_empty(), "the store across the swap vs straight through:\n{}\n{text}", differ.join("\n"));
    assert_eq!(dead_letters(&store), want.transform, "transform dead letters");
    let _ = std::fs::remove_dir_all(dir);
}

/// A store that refuses every commit for 10 s in the middle of a run: the process role reads the
/// same polls again and again, its stateful chain starting each time from the committed state, and
/// the result equals a run straight through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_chain_through_a_store_failing_for_10_s_equals_a_run_straight_through() {
    let (want, Recorded { dir, api, store, log, .. }, mut run) =
        straight_then_running("sink-down", 12_000, 4000, None, 1_500).await;
    let down = common::StoreDown::start(&store, "the disk is gone");
    let stuck = events(&store);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(events(&store), stuck, "a commit went through while the store was down");
    down.restore();
    wait_finished(&api, &log).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the disk is gone"), "the failure was not reported:\n{text}");
    assert_eq!(rollup(&store), want.rollup, "the store after 10 s of failed commits vs straight through");
    assert_eq!(dead_letters(&dir.join("log.sqlite")), want.decode, "decode dead letters");
    assert_eq!(dead_letters(&store), want.transform, "transform dead letters");
    let _ = std::fs::remove_dir_all(dir);
}

/// A log that lost its last commits (a power cut with `synchronous = "normal"`, played here by
/// putting back an older copy of the log) leaves the store ahead of it: the start is refused with
/// the way out, and `--resume-past-lost-log-tail` goes on from the store's position, keeping every
/// row the store counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_tail_is_refused_then_resumed_past_it_on_request() {
    let Recorded { dir, file, api, config, log, .. } = recorded("lost-tail", 2_000, 0, |c| c);
    run_to_the_end(&config, &api, &log, &[]).await;
    let saved = dir.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    for f in ["log.sqlite", "log.sqlite-wal", "log.sqlite-shm"] {
        let _ = std::fs::copy(dir.join(f), saved.join(f));
    }
    // The recording grows; its new lines reach the log and the store.
    let mut more = std::fs::read_to_string(&file).unwrap();
    recording(&dir.join("more.jsonl"), 4_000);
    let longer = std::fs::read_to_string(dir.join("more.jsonl")).unwrap();
    more.push_str(&longer[more.len()..]);
    std::fs::write(&file, more).unwrap();
    run_to_the_end(&config, &api, &log, &[]).await;
    let counted = rollup(&dir.join("store.sqlite"));
    // The log loses what it committed since the copy.
    for f in ["log.sqlite", "log.sqlite-wal", "log.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
        let _ = std::fs::copy(saved.join(f), dir.join(f));
    }
    let err = refused_start(&config);
    assert!(err.contains("--resume-past-lost-log-tail"), "{err}");
    let mut run = SluiceProcess::run(&config, &log, &["--resume-past-lost-log-tail"], None);
    wait_finished(&api, &log).await;
    let status = get(&api, "/v1/log").await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the local log lost its last records"), "{text}");
    // Nothing the store counted is lost, and the log goes on past the store's old position.
    let after = rollup(&dir.join("store.sqlite"));
    for (bucket, row) in &counted {
        let events = |v: &str| v.split(' ').nth(1).unwrap().parse::<i64>().unwrap();
        assert!(after.get(bucket).is_some_and(|a| events(a) >= events(row)), "bucket {bucket} lost rows");
    }
    let partition = &status["partitions"][0];
    assert_eq!(partition["lag"], 0, "{status}");
    let _ = std::fs::remove_dir_all(dir);
}

/// On Kafka the trade ids already delivered are read back from the tail of the events topic at
/// start: after a `kill -9`, what Kraken v2's snapshot repeats is recognised, the topic holds every
/// trade id once, and the ids it lacks are exactly the ones counted as sent while sluice was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_restart_knows_from_the_topics_tail_what_was_delivered() {
    use feedsim::Venue;
    let broker = common::TestBroker::start("restart-tail");
    let sim = common::recording_sim(80.0).await;
    let dir = temp_dir("kafka-tail");
    let api = common::free_addr();
    let topics = Topics::unique();
    let events = &topics.events;
    let config = ConfigToml::new(&dir)
        .api_bind(&api)
        .kafka(&broker.bootstrap, &topics, 2)
        .process("group", common::unique_topic("group"))
        .process("max_wait_ms", 50)
        .source(Source::ws("kraken-v2", &sim.url(Venue::KrakenV2), KRAKEN_V2_BTC).decode("kraken-v2"))
        .save();
    let log = dir.join("sluice.log");
    let source = |sources: &serde_json::Value, key: &str| sources["sources"][0][key].as_u64().unwrap_or(0);
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let started = Instant::now();
    while source(&get(&api, "/v1/sources").await, "records") < 30 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "no records:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the producer's acknowledgements settle, then kill it; the snapshot after the restart
    // repeats the last 50 trades, most of them in the topic already.
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.kill_9();
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let started = Instant::now();
    let sources = loop {
        let sources = get(&api, "/v1/sources").await;
        if source(&sources, "records") > 10 {
            break sources;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "no records after the restart:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    run.interrupt();
    sim.shutdown().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let messages = common::read_topic(&broker.bootstrap, events, 2, usize::MAX, Duration::from_secs(10));
    let mut ids: Vec<u64> =
        messages.iter().map(|m| plugin_sdk::StreamDataView::parse(&m.payload).unwrap().trade_id).collect();
    let count = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert!(count > 40, "only {count} records in the topic");
    assert_eq!(ids.len(), count, "a trade id is in the topic twice\n{text}");
    // The ids the topic lacks are exactly those the restart counted as sent while it was down: it
    // knew where the topic stood (a start that did not would count none, and log the snapshot's
    // trades again when it overlaps).
    let holes = ids.last().unwrap() - ids[0] + 1 - count as u64;
    let downtime = source(&sources, "downtime_gaps");
    assert!(holes > 0, "nothing was missed while down: the test proves nothing");
    assert_eq!(downtime, holes, "downtime gaps vs ids missing from the topic: {sources}\n{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// On Kafka, records the topic's retention deleted before the process role read them (here while
/// it was stopped) stop the role rather than being jumped over: it keeps running, tries again,
/// and says why in `/health/ready` and `/metrics`; `--skip-deleted-records` goes on from the
/// partition's start and says what was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_records_deleted_unread_stop_the_process_role_until_skipped() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let broker = common::TestBroker::start("restart-deleted");
    let topics = Topics::unique();
    let events_topic = &topics.events;
    let Recorded { dir, api, config, .. } =
        recorded("kafka-deleted", 1_000, 0, |c| c.kafka(&broker.bootstrap, &topics, 1));
    let log = dir.join("sluice.log");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    // Every record of the recording in the topic (999: one line is cut short) and in the store.
    let started = Instant::now();
    let committed = loop {
        let partition = get(&api, "/v1/log").await["partitions"][0].clone();
        let (end, committed) = (partition["end"].as_i64().unwrap_or(0), partition["committed"].as_i64().unwrap_or(0));
        if end >= 999 && committed >= end - 1 {
            break committed;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "{partition}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    run.interrupt();

    // While it is stopped, ten more records arrive and retention deletes the first five of them.
    let kafka_config = sluice::config::Config::load(&config).unwrap().kafka;
    let producer = sluice::kafka::producer::EventProducer::new(&kafka_config, &broker.bootstrap).unwrap();
    let mut records = plugin_sdk::Records::new();
    for i in 1..=10u64 {
        records.push(&plugin_sdk::Record { source_id: 1, symbol_id: 1, trade_id: 9_000_000 + i, ..Default::default() });
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    let mut cut = rdkafka::TopicPartitionList::new();
    cut.add_partition_offset(events_topic, 0, rdkafka::Offset::Offset(committed + 5)).unwrap();
    admin.delete_records(&cut, &AdminOptions::new()).await.unwrap();

    // The role stops on them, and keeps saying why.
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let started = Instant::now();
    let sink = loop {
        let ready = get(&api, "/health/ready").await;
        let sink = ready["checks"]["sink"]["detail"].as_str().unwrap_or_default().to_owned();
        if sink.contains("deleted 5 records") {
            break sink;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(60), "{ready}\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(sink.contains("--skip-deleted-records"), "{sink}");
    let metrics = reqwest::get(format!("http://{api}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "sluice_process_deleted_unread_records 5"), "{metrics}");
    // It tries again (with its backoff), and stays stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(&api, "/v1/log").await["partitions"][0]["committed"].as_i64(), Some(committed));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.matches("retention deleted records it had not read").count() >= 2, "{text}");
    run.interrupt();

    // Told to, it goes on from the partition's start.
    let mut run = SluiceProcess::run(&config, &log, &["--skip-deleted-records"], None);
    wait_finished_but(&api, &log, 1).await;
    let status = get(&api, "/v1/log").await;
    let metrics = reqwest::get(format!("http://{api}/metrics")).await.unwrap().text().await.unwrap();
    run.interrupt();
    assert!(status["partitions"][0]["committed"].as_i64().unwrap() >= committed + 10, "{status}");
    assert!(metrics.lines().any(|l| l == "sluice_process_deleted_unread_records 0"), "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("as --skip-deleted-records asks"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A chain edited over the API while a recording runs, then `sluice run` killed with SIGKILL and
/// started again on the same configuration. The chain is `chaos` counting each symbol's records
/// (1, 2, 3, ... as their volume, kept as committed state); a doubling plugin, uploaded under a
/// name of its own (which no source uses yet, so activating it is a conflict), is put in front of
/// it over the API mid-stream:
/// - every trade is rolled up once: the events equal the trades, and the counting link's volumes
///   add up to n(n+1)/2 per symbol, so it kept its state through the edit and the kill;
/// - the edit took effect mid-stream (prices before it are the recording's, after it doubled);
/// - the restart runs the edited chain from `<data-dir>/chains.json`, over the file's, and says so;
/// - a link whose `init` refuses a configuration is refused with 422, removing a link and
///   returning to the file's chain answer the chain as it then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_added_over_the_api_runs_from_the_next_poll_and_survives_a_kill() {
    let dir = temp_dir("chain-edit");
    let file = dir.join("trades.jsonl");
    let lines = 9_000;
    recording(&file, lines);
    let api = common::free_addr();
    let source = Source::file("recorded", &file).set("rate", 500).decode("binance").link("chaos", &[("mode", "count")]);
    let config = ConfigToml::new(&dir)
        .api_bind(&api)
        .process("max_wait_ms", 50)
        .plugin("chaos", "chaos.wasm")
        .source(source)
        .save();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let token = "chain-token";
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<String>| {
        common::api_call(&http, method, format!("http://{api}{path}"), token, body.map(Into::into))
    };
    let mut run = SluiceProcess::run(&config, &log, &[], Some(token));
    wait_events(&store, 1_500, &log).await;

    let doubler = std::fs::read(format!("{}/double_price.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let (status, up) = common::api_call(
        &http,
        reqwest::Method::PUT,
        format!("http://{api}/v1/plugins/doubler"),
        token,
        Some(doubler.into()),
    )
    .await;
    assert_eq!(status, 201, "{up}");
    let activate = serde_json::json!({ "version": up["version"] }).to_string();
    let (status, body) = call(reqwest::Method::POST, "/v1/plugins/doubler/activate", Some(activate)).await;
    assert_eq!(status, 409, "no source uses it yet: {body}");
    let bad = r#"{"plugin": "doubler", "config": {"factor": "3"}, "at": 0}"#.to_owned();
    let (status, body) = call(reqwest::Method::POST, "/v1/sources/recorded/chain/links", Some(bad)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("plugin_init_failed")), "{body}");
    let unknown = r#"{"plugin": "doubler"}"#.to_owned();
    let (status, body) = call(reqwest::Method::POST, "/v1/sources/nobody/chain/links", Some(unknown)).await;
    assert_eq!(status, 404, "{body}");
    let add = r#"{"plugin": "doubler", "at": 0}"#.to_owned();
    let (status, chain) = call(reqwest::Method::POST, "/v1/sources/recorded/chain/links", Some(add)).await;
    assert_eq!(status, 200, "{chain}");
    let links = |chain: &serde_json::Value| -> Vec<(String, u64)> {
        let links = chain["links"].as_array().cloned().unwrap_or_default();
        links.iter().map(|l| (l["plugin"].as_str().unwrap().to_owned(), l["state_key"].as_u64().unwrap())).collect()
    };
    let edited = vec![("doubler".to_owned(), 1), ("chaos".to_owned(), 0)];
    assert_eq!((links(&chain), chain["edited"].as_bool()), (edited.clone(), Some(true)), "{chain}");
    let at_edit = events(&store);
    wait_events(&store, at_edit + 1_500, &log).await;
    run.kill_9();

    let mut run = SluiceProcess::run(&config, &log, &[], Some(token));
    wait_finished(&api, &log).await;
    let (_, chain) = call(reqwest::Method::GET, "/v1/sources/recorded/chain", None).await;
    assert_eq!(links(&chain), edited, "the restart runs the edited chain: {chain}");
    let listed = get(&api, "/v1/sources").await;
    assert_eq!(listed["sources"][0]["transforms"][0]["plugin"], "doubler", "{listed}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the chain edited over the API overrides the configuration's"), "{text}");

    // Every trade once, counted by a link that kept its state through the edit and the kill.
    let traded = || (0..lines).filter(|i| i % 997 != 996 && i % 1500 != 1499);
    let (trades, eth) = (traded().count() as i64, traded().filter(|i| i % 3 == 0).count() as i64);
    let btc = trades - eth;
    let rows = rollup(&store);
    let field = |v: &String, i: usize| v.split(' ').nth(i).unwrap().parse::<f64>().unwrap();
    assert_eq!(events(&store), trades, "each trade rolled up once");
    let counted: f64 = rows.values().map(|v| field(v, 3)).sum();
    assert_eq!(counted as i64, eth * (eth + 1) / 2 + btc * (btc + 1) / 2, "the counting link's state");
    let min = rows.values().map(|v| field(v, 5)).fold(f64::MAX, f64::min);
    let max = rows.values().map(|v| field(v, 7)).fold(0.0, f64::max);
    assert!(min < 31_000.0 && max > 59_000.0, "recorded prices before the edit, doubled after: {min} .. {max}");

    let (status, chain) = call(reqwest::Method::DELETE, "/v1/sources/recorded/chain/links/0", None).await;
    assert_eq!((status, links(&chain)), (200, vec![("chaos".to_owned(), 0)]), "{chain}");
    let (status, chain) = call(reqwest::Method::DELETE, "/v1/sources/recorded/chain/links/5", None).await;
    assert_eq!(status, 400, "{chain}");
    let (status, chain) = call(reqwest::Method::DELETE, "/v1/sources/recorded/chain", None).await;
    assert_eq!((status, chain["edited"].as_bool()), (200, Some(false)), "{chain}");
    assert_eq!(links(&chain), vec![("chaos".to_owned(), 2)], "the file's chain, its state started afresh");
    run.interrupt();
    let _ = std::fs::remove_dir_all(&dir);
}
