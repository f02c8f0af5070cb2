//! The embedded default end to end, with the real binary: `sluice run` on the local log (no Kafka
//! brokers), fed by the feed simulator on loopback, killed with SIGKILL three times in one stream and
//! started again on the same data directory each time, then stopped cleanly. What the log holds is
//! then compared with what the store rolled up, and with what the simulator sent.
//!
//! Also: a store whose log is gone is refused with both positions, and the idle demo costs almost no
//! CPU.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use feedsim::{FeedSim, FeedSimConfig, Venue};
use plugin_sdk::StreamDataView;
use sluice::sink::embedded::QueryConnection;

use crate::common;

use common::SluiceProcess;
use common::config::{BINANCE_BTC, BINANCE_BTC_ETH, COINBASE_BTC, ConfigToml, KRAKEN_XBT, Source};

fn temp_dir(name: &str) -> std::path::PathBuf {
    common::fresh_dir(&format!("local-log-{name}"))
}

fn write_config(dir: &std::path::Path, sim: &FeedSim) -> std::path::PathBuf {
    // `plugin` names the decoder (the key `decode` replaced; both are read).
    ConfigToml::new(dir)
        .api_bind("127.0.0.1:0")
        .process("max_wait_ms", 100)
        .source(Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC_ETH).set("plugin", "binance"))
        .source(Source::ws("coinbase", &sim.url(Venue::Coinbase), COINBASE_BTC).set("plugin", "coinbase"))
        .save()
}

/// Rolled-up events and exact quantity sums per (source, symbol).
fn rolled_up(store: &std::path::Path) -> BTreeMap<(String, String), (i64, i64)> {
    let sums = common::rollup_sums(store, &["source", "symbol"]).into_iter();
    sums.map(|(key, sums)| ((key[0].clone(), key[1].clone()), sums)).collect()
}

fn total(m: &BTreeMap<(String, String), (i64, i64)>) -> i64 {
    m.values().map(|v| v.0).sum()
}

/// Events and exact quantity sums per (source, symbol).
type PerSymbol = BTreeMap<(String, String), (i64, i64)>;

/// The local log's symbol dictionary.
fn log_symbols(log: &std::path::Path) -> BTreeMap<u32, String> {
    let names = rusqlite::Connection::open(log).unwrap();
    let mut stmt = names.prepare("SELECT id, name FROM symbols").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Every record the log holds, and their count and exact quantity sum per (source, symbol), named
/// with the log's own dictionary (source ids are positions in the config).
fn logged(log: &std::path::Path) -> (Vec<(i64, Vec<u8>)>, PerSymbol) {
    let records = sluice::handoff::local::read_all(log).unwrap();
    let symbols = log_symbols(log);
    let sources = ["binance", "coinbase"];
    let mut per = PerSymbol::new();
    for (offset, bytes) in &records {
        let v = StreamDataView::parse(bytes).unwrap_or_else(|e| panic!("record {offset}: {e}"));
        let e = per.entry((sources[v.source_id as usize - 1].to_owned(), symbols[&v.symbol_id].clone())).or_default();
        e.0 += 1;
        e.1 += v.volume_e8;
    }
    (records, per)
}

/// The store's committed position in the local log.
fn store_position(store: &std::path::Path) -> Option<i64> {
    let q = QueryConnection::open(store).ok()?;
    let rows = q.query("SELECT next_offset FROM consumer_offsets WHERE topic = 'sluice.local-log'", 1).ok()?;
    rows.first()?["next_offset"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_every_logged_record_once_across_three_kill_9s() {
    let sim = common::recording_sim(120.0).await;
    let dir = temp_dir("kill");
    let config = write_config(&dir, &sim);
    let (store, log_file, log) = (dir.join("store.sqlite"), dir.join("log.sqlite"), dir.join("sluice.log"));
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    // Kills at different moments of the stream: each after the store has moved on by a different
    // amount, so they land in the middle of reads, transforms and commits.
    for (kill, wait_for) in [(1, 150), (2, 330), (3, 410)] {
        let before = total(&rolled_up(&store));
        let start = Instant::now();
        while total(&rolled_up(&store)) < before + wait_for {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(start.elapsed() < Duration::from_secs(90), "no progress before kill {kill}:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run.kill_9();
        run = SluiceProcess::run(&config, &log, &[], None);
    }
    // The stream goes on for a while after the last restart, then the venue stops, so the last
    // incarnation reads and rolls up everything it was sent.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let handle = sim.handle();
    sim.shutdown().await;
    let sent: BTreeMap<String, feedsim::IdSet> =
        [(Venue::Binance, "BTCUSDT"), (Venue::Binance, "ETHUSDT"), (Venue::Coinbase, "BTC-USD")]
            .iter()
            .map(|(venue, symbol)| (symbol.to_string(), handle.sent_ids(*venue, symbol)))
            .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("role=All").count(), 4, "four starts:\n{text}");

    // What the log holds, read with its own symbol dictionary; source ids are config positions.
    let (records, logged) = logged(&log_file);
    let offsets: Vec<i64> = records.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..records.len() as i64).collect::<Vec<_>>(), "the log's offsets have holes");
    let symbols = log_symbols(&log_file);
    let mut ids = BTreeSet::new();
    for (_, bytes) in &records {
        let v = StreamDataView::parse(bytes).unwrap();
        let symbol = symbols[&v.symbol_id].clone();
        assert!(ids.insert((symbol.clone(), v.trade_id)), "trade {symbol} {} is in the log twice", v.trade_id);
        assert!(sent[&symbol].contains(v.trade_id), "trade {symbol} {} was never sent", v.trade_id);
    }
    assert!(records.len() > 850, "only {} records logged", records.len());
    // Every record the log holds is rolled up exactly once, per source and symbol, and the store's
    // position is the log's end.
    assert_eq!(rolled_up(&store), logged, "rolled up vs logged\n{text}");
    assert_eq!(store_position(&store), Some(records.len() as i64));

    // A store whose log is gone is refused, naming both positions, and nothing is rolled up again.
    for f in ["log.sqlite", "log.sqlite-wal", "log.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["run", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let want = format!("the store's position {} is ahead of the end 0 of the local log", records.len());
    assert!(err.contains(&want), "{err}");
    assert_eq!(rolled_up(&store), logged);
    let _ = std::fs::remove_dir_all(&dir);
}

/// utime + stime of `pid`, in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it are space-separated.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn the_idle_demo_costs_under_a_tenth_of_a_core() {
    let dir = temp_dir("idle");
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--rate", "0", "--feed-addr", "127.0.0.1:0", "--api-addr", &api.to_string(), "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = SluiceProcess(Some(child));
    let pid = child.0.as_ref().unwrap().id();
    // Started: the API answers and all three sources are connected.
    let start = Instant::now();
    loop {
        let up = std::net::TcpStream::connect(api).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.1 200")
        });
        if up {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the demo did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(30));
    let (elapsed, used) = (t0.elapsed().as_secs_f64(), (cpu_ticks(pid) - c0) as f64 / ticks_per_second);
    let share = used / elapsed;
    child.interrupt();
    eprintln!("the idle demo used {:.2} % of a core over {elapsed:.0} s", share * 100.0);
    assert!(share < 0.10, "the idle demo used {:.1} % of a core over {elapsed:.0} s", share * 100.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sink failing for 30 s: the store's commits are refused (a trigger on its offsets table)
/// while the stream flows; the process role keeps retrying from its last commit, and once the
/// store takes commits again it catches up. Nothing is lost and nothing is counted twice: the store
/// equals the log, per source and symbol, and its position is the log's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_failing_for_30_s_loses_nothing_and_catches_up() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 100.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp_dir("sink-down");
    let config = write_config(&dir, &sim);
    let (store, log_file, log) = (dir.join("store.sqlite"), dir.join("log.sqlite"), dir.join("sluice.log"));
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let start = Instant::now();
    while total(&rolled_up(&store)) < 100 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress:\n{}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down = common::StoreDown::start(&store, "the disk is gone");
    let stuck = store_position(&store);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(store_position(&store), stuck, "a commit went through while the sink was down");
    down.restore();
    // Caught up: the position reaches the log's end while the stream goes on.
    let start = Instant::now();
    loop {
        let end = sluice::handoff::local::read_all(&log_file).unwrap().len() as i64;
        if store_position(&store).is_some_and(|p| p + 200 >= end) && store_position(&store) > stuck {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "did not catch up:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sim.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    run.interrupt();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the disk is gone"), "the failure was not reported:\n{text}");
    let (records, logged) = logged(&log_file);
    assert!(records.len() > 5_000, "only {} records", records.len());
    assert_eq!(rolled_up(&store), logged, "rolled up vs logged\n{text}");
    assert_eq!(store_position(&store), Some(records.len() as i64));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Source ids are stable per source name: a second run on the same data directory with the sources
/// reordered (and one added in front) stamps each source's records with the id it had, so records
/// already in the log keep meaning the same source. Every source id in the log carries the symbols
/// of one venue only, and the store rolls each venue's symbols up under its own source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ids_survive_a_reordered_config() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 50.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp_dir("source-ids");
    let (store, log_file, log) = (dir.join("store.sqlite"), dir.join("log.sqlite"), dir.join("sluice.log"));
    let source =
        |name: &str, venue: Venue, subscribe: &str| Source::ws(name, &sim.url(venue), subscribe).set("plugin", name);
    let binance = source("binance", Venue::Binance, BINANCE_BTC);
    let coinbase = source("coinbase", Venue::Coinbase, COINBASE_BTC);
    let kraken = source("kraken", Venue::Kraken, KRAKEN_XBT);
    for (run, sources) in [(1, vec![&binance, &coinbase]), (2, vec![&kraken, &coinbase, &binance])] {
        let config =
            sources.into_iter().fold(ConfigToml::new(&dir).api_bind("127.0.0.1:0"), |c, s| c.source(s.clone()));
        let config = config.save();
        let before = total(&rolled_up(&store));
        let mut child = SluiceProcess::run(&config, &log, &[], None);
        let start = Instant::now();
        while total(&rolled_up(&store)) < before + 150
            || (run == 2 && !rolled_up(&store).keys().any(|k| k.0 == "kraken"))
        {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "run {run}:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        child.interrupt();
    }
    sim.shutdown().await;
    // Each source id in the log carries one venue's symbols.
    let symbols = log_symbols(&log_file);
    let mut by_id: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (_, bytes) in sluice::handoff::local::read_all(&log_file).unwrap() {
        let v = StreamDataView::parse(&bytes).unwrap();
        by_id.entry(v.source_id).or_default().insert(symbols[&v.symbol_id].clone());
    }
    assert_eq!(by_id.len(), 3, "{by_id:?}");
    for (id, names) in &by_id {
        assert_eq!(names.len(), 1, "source id {id} carries {names:?}");
    }
    // And the store agrees: each venue's symbol under its own source.
    let pairs: BTreeSet<(String, String)> = rolled_up(&store).into_keys().collect();
    let want: BTreeSet<(String, String)> = [("binance", "BTCUSDT"), ("coinbase", "BTC-USD"), ("kraken", "XBT/USD")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(pairs, want);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `kind = "file"` source replays a recording through the same decode path as a live feed: every
/// trade of the recorded Binance frames reaches the store once, with the exact quantities the
/// frames carry (read here independently of the plugin), also when paced at a set rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_file_replays_through_decode_into_the_store() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/feeds/binance_us_combined_aggtrade.jsonl");
    let text = std::fs::read_to_string(&fixture).unwrap();
    // symbol -> (trades, quantity e8), from the frames themselves.
    let mut want: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let d = &v["data"];
        let q = d["q"].as_str().unwrap();
        let (int, frac) = q.split_once('.').unwrap_or((q, ""));
        let e8 = int.parse::<i64>().unwrap() * 100_000_000 + format!("{frac:0<8}")[..8].parse::<i64>().unwrap();
        for source in ["fast", "paced"] {
            let e = want.entry((source.to_owned(), d["s"].as_str().unwrap().to_owned())).or_default();
            e.0 += 1;
            e.1 += e8;
        }
    }
    let dir = temp_dir("replay");
    let config = ConfigToml::new(&dir)
        .api_bind("127.0.0.1:0")
        .process("max_wait_ms", 100)
        .source(Source::file("fast", &fixture).set("plugin", "binance"))
        .source(Source::file("paced", &fixture).set("rate", 20).set("plugin", "binance"))
        .save();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let started = Instant::now();
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let want_total = total(&want);
    while total(&rolled_up(&store)) < want_total && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing more comes: the files are replayed once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.interrupt();
    let got = rolled_up(&store);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(got, want, "rolled up vs the recorded frames\n{log_text}");
    assert!(log_text.contains("replay finished"), "{log_text}");
}

/// Waits until the store at `store` has committed a position past `position` (`log`: the child's).
async fn commits_past(store: &std::path::Path, log: &std::path::Path, position: i64) {
    let start = Instant::now();
    while store_position(store).is_none_or(|p| p <= position) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(60), "no commit past {position}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to `limit` for `child` to exit; kills it and answers `None` if it does not.
fn exit_within(mut child: std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// One process owns a data directory. While a `sluice run` commits on the local log, a second
/// `sluice run` and a `sluice demo` on the same directory are refused, exiting non-zero with the
/// owner's PID; the owner is unharmed and goes on committing. `sluice replay` runs beside it. The
/// lock goes with its owner, also through kill -9: a new `run` then starts and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_directory_is_refused_and_the_owner_goes_on() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 100.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp_dir("lock");
    let config = write_config(&dir, &sim);
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let commits_past = |position: i64| commits_past(&store, &log, position);
    let mut owner = SluiceProcess::run(&config, &log, &[], None);
    let pid = owner.0.as_ref().unwrap().id();
    commits_past(0).await;

    let second = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("second.log")).unwrap())
        .spawn()
        .unwrap();
    let status = exit_within(second, Duration::from_secs(20)).expect("a second run on the data directory ran on");
    let err = std::fs::read_to_string(dir.join("second.log")).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains(&format!("PID {pid}")), "{err}");
    let demo = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--seconds", "5", "--feed-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("demo.log")).unwrap())
        .spawn()
        .unwrap();
    let status = exit_within(demo, Duration::from_secs(20)).expect("a demo on the data directory ran on");
    let err = std::fs::read_to_string(dir.join("demo.log")).unwrap();
    assert!(!status.success() && err.contains(&format!("PID {pid}")), "{status}: {err}");

    // The owner is unharmed: still running, and committing.
    assert!(owner.0.as_mut().unwrap().try_wait().unwrap().is_none(), "the owner stopped:\n{}", text());
    commits_past(store_position(&store).unwrap()).await;
    // A replay runs beside it on purpose.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["replay", "--config"])
        .arg(&config)
        .args(["--since", "0", "--into", "beside"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Killed with SIGKILL, the owner leaves no lock behind.
    owner.kill_9();
    let before = store_position(&store).unwrap();
    let mut next = SluiceProcess::run(&config, &log, &[], None);
    commits_past(before).await;
    next.interrupt();
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn bulky_records(seed: u64, records: usize, bytes: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..records {
        let record: Vec<u8> = (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        sluice_wire::push_delimited(&mut out, &record);
    }
    out
}

/// A full disk never wedges the local log (a tmpfs of its own, filled by another file). Before, its
/// appender retried a commit forever: retention never ran, decode workers waited on it, and a stop
/// never finished. Now:
/// - with batches the store has read, the log makes room by itself (its reserve, then those batches)
///   and commits;
/// - with none, it holds its batch and refuses what comes next at once, counted by reason, and a
///   flush says so instead of waiting;
/// - it commits again by itself when space returns;
/// - a close while the disk is full finishes within seconds, counting the batch it held as refused;
/// - every record handed over is delivered or counted refused, and the log holds exactly those
///   delivered.
#[test]
fn a_full_disk_refuses_and_counts_records_and_the_log_recovers_by_itself() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;

    use sluice::handoff::ProducerStats;
    use sluice::handoff::local::{LocalLog, Refusal};
    use sluice::handoff::{DeadLetter, Handover, LocalLogConfig, LogError, Stage};

    let Some(disk) = common::SmallDisk::mount("full-log", 24 << 20) else { return };
    let (done, outcome) = std::sync::mpsc::channel::<()>();
    // In a thread of its own, so a wedged log fails the test instead of hanging it.
    let disk = Arc::new(disk);
    let scenario = std::thread::spawn({
        let disk = disk.clone();
        move || {
            let path = disk.dir.join("log.sqlite");
            let config = LocalLogConfig { reserve_bytes: 2 << 20, ..LocalLogConfig::default() };
            let log = LocalLog::open(&path, &config).unwrap();
            let stats = Arc::new(ProducerStats::default());
            let writer = log.writer(stats.clone()).unwrap();
            let batch = bulky_records(1, 10, 10_000);
            for _ in 0..20 {
                writer.send_records(&batch);
            }
            writer.flush(Duration::from_secs(5)).unwrap();
            // The store has read all of it.
            let read = log.status().end;
            log.check_position(Some(read)).unwrap();

            let filler = disk.fill("filler");
            writer.send_records(&batch);
            writer.flush(Duration::from_secs(10)).expect("room made from the batches the store has read");
            assert_eq!(log.status().start, read, "the batches the store has read were deleted to make room");
            assert_eq!(log.refusing(), None);

            // Nothing more to delete: what comes is refused at once, and counted.
            let started = Instant::now();
            for _ in 0..300 {
                writer.send_records(&batch);
            }
            let letter = DeadLetter {
                stage: Stage::Decode,
                source_id: 1,
                source: "s",
                plugin: "p",
                reason: "bad frame",
                bytes: b"{",
            };
            assert!(started.elapsed() < Duration::from_secs(20), "handing over took {:?}", started.elapsed());
            // The flush is answered as soon as the commits before it have failed.
            let asked = Instant::now();
            assert!(matches!(writer.flush(Duration::from_secs(30)), Err(LogError::Refusing("disk_full"))));
            assert!(asked.elapsed() < Duration::from_secs(5), "a flush waited {:?}", asked.elapsed());
            assert_eq!(log.refusing(), Some(Refusal::DiskFull));
            writer.send_handover(Handover { records: &batch, dead: &[letter], ..Handover::default() });
            // What the log holds while it fails is bounded (8 MiB); the rest was refused.
            let (records, dead_letters) = log.refused(Refusal::DiskFull);
            assert!(
                records >= 100 * 10 && dead_letters == 1,
                "refused: {records} records, {dead_letters} dead letters"
            );

            // Space returns: the log commits again by itself.
            std::fs::remove_file(&filler).unwrap();
            let until = Instant::now() + Duration::from_secs(15);
            while log.refusing().is_some() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(log.refusing(), None, "the log did not recover when space returned");
            let delivered = stats.delivered.load(Relaxed);
            writer.send_records(&batch);
            writer.flush(Duration::from_secs(10)).unwrap();
            assert_eq!(stats.delivered.load(Relaxed), delivered + 10);

            // Full again, then closed: the close does not wait on the disk.
            let filler = disk.fill("filler");
            for _ in 0..100 {
                if log.refusing().is_some() {
                    break;
                }
                writer.send_records(&batch);
                let _ = writer.flush(Duration::from_secs(10));
            }
            assert_eq!(log.refusing(), Some(Refusal::DiskFull));
            writer.send_records(&batch);
            let closing = Instant::now();
            writer.close();
            assert!(closing.elapsed() < Duration::from_secs(10), "the close took {:?}", closing.elapsed());

            // Every record handed over was delivered or refused; the log holds the delivered ones.
            let refused: u64 = Refusal::ALL.iter().map(|&why| log.refused(why).0).sum();
            let (sent, delivered) = (stats.sent.load(Relaxed), stats.delivered.load(Relaxed));
            assert_eq!(sent, delivered + refused, "sent {sent}, delivered {delivered}, refused {refused}");
            std::fs::remove_file(&filler).unwrap();
            drop((writer, log));
            let log = LocalLog::open(&path, &config).unwrap();
            assert_eq!(log.status().end as u64, delivered);
            let _ = done.send(());
        }
    });
    match outcome.recv_timeout(Duration::from_secs(120)) {
        Ok(()) => scenario.join().unwrap(),
        // The scenario panicked: its message.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(scenario.join().unwrap_err()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the local log wedged on a full disk"),
    }
}

/// The log's dead letters and its symbol dictionary count in `[log] max_bytes` with the records
/// (before, neither did, and dead letters grew without bound): past it the oldest dead letters go,
/// and a dead letter keeps at most 512 KiB of its payload, with the original length.
#[test]
fn dead_letters_and_symbols_count_in_the_logs_cap() {
    use std::sync::Arc;

    use sluice::handoff::ProducerStats;
    use sluice::handoff::local::LocalLog;
    use sluice::handoff::{DeadLetter, LocalLogConfig, Stage};
    use sluice::symbols::Symbols;

    let dir = temp_dir("dead-cap");
    let path = dir.join("log.sqlite");
    let config = LocalLogConfig { max_bytes: 1 << 20, retention_bytes: 0, ..LocalLogConfig::default() };
    let log = LocalLog::open(&path, &config).unwrap();
    // 200 KB of symbol names.
    let symbols = Symbols::local(&path).unwrap();
    for i in 0..2000 {
        symbols.intern(&format!("{i:0>100}"));
    }
    let writer = log.writer(Arc::new(ProducerStats::default())).unwrap();
    let frame = vec![b'{'; 50_000];
    let reasons: Vec<String> = (0..40).map(|i| format!("letter {i}")).collect();
    for reason in &reasons {
        let letter = DeadLetter { stage: Stage::Decode, source_id: 1, source: "s", plugin: "p", reason, bytes: &frame };
        writer.send_dead_letter(&letter);
    }
    let cut = vec![b'x'; 1 << 20];
    let big = DeadLetter { stage: Stage::Decode, source_id: 1, source: "s", plugin: "p", reason: "cut", bytes: &cut };
    writer.send_dead_letter(&big);
    writer.flush(Duration::from_secs(5)).unwrap();
    // Retention runs at least once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let dead: i64 = conn
        .query_row("SELECT coalesce(sum(length(bytes) + length(reason) + length(source) + length(plugin)), 0) FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    let names: i64 = conn.query_row("SELECT sum(length(name)) FROM symbols", [], |r| r.get(0)).unwrap();
    assert!(names >= 200_000, "{names}");
    assert!(
        (dead + names) as u64 <= config.max_bytes,
        "dead letters {dead} and symbols {names} over {}",
        config.max_bytes
    );
    // The newest stay, the oldest went.
    let kept: Vec<String> = conn
        .prepare("SELECT reason FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kept.last().map(String::as_str), Some("cut"));
    assert!(!kept.contains(&reasons[0]), "{kept:?}");
    // The large one keeps 512 KiB and says how long it was.
    let (length, bytes): (i64, i64) = conn
        .query_row("SELECT length, length(bytes) FROM dead_letters WHERE reason = 'cut'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((length, bytes), (1 << 20, 512 << 10));
    // What GET /v1/log shows of them.
    let sizes = log.sizes();
    let (rows, size): (i64, i64) =
        conn.query_row("SELECT count(*), sum(size) FROM dead_letters", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((sizes.dead_letters.rows, sizes.dead_letters.bytes), (rows as u64, size as u64));
    assert_eq!((sizes.symbols.rows, sizes.symbols.bytes), (2000, 200_000));
    assert_eq!(sizes.max_bytes, 1 << 20);
    drop((writer, log));
    let _ = std::fs::remove_dir_all(&dir);
}
