//! Ingest end to end: the feed simulator serves Binance, Coinbase and Kraken on loopback; sluice's
//! sources connect, get cut off, stop getting pongs, get a venue shutdown notice, rotate, and receive
//! malformed and oversized frames; the decoded records go through the real wasm plugins to a real
//! Kafka-protocol broker. Reading the topic back, every trade id the simulator sent is there exactly
//! once, and the ids it skipped (and those sent while a source was away) are counted as gaps.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{TestBroker, read_topic, unique_topic};
use feedsim::{FeedSim, FeedSimConfig, Venue};
use plugin_sdk::StreamDataView;
use sluice::config::SourceConfig;
use sluice::ingest::{Ingest, IngestSettings};
use sluice::kafka::producer::EventProducer;
use sluice::kafka::{KafkaConfig, ensure_topics};
use sluice::plugin::registry::Slot;
use sluice::plugin::{Limits, Runtime, RuntimeSettings};
use sluice::symbols::Symbols;

/// The symbols whose trade ids are checked, with the source each is served to.
fn tracked() -> [(&'static str, Venue, &'static str); 4] {
    [
        ("binance", Venue::Binance, "BTCUSDT"),
        ("binance", Venue::Binance, "ETHUSDT"),
        ("coinbase", Venue::Coinbase, "BTC-USD"),
        ("binance-rotating", Venue::Binance, "SOLUSDT"),
    ]
}

fn dead_lettered(handles: &[(String, u32, Arc<sluice::source::SourceStats>, Arc<sluice::ingest::DecodeStats>)]) -> u64 {
    handles.iter().map(|h| h.3.rejects.load(Ordering::Relaxed)).sum()
}

fn source(name: &str, url: String, plugin: &str, subscribe: &str) -> SourceConfig {
    let mut s = SourceConfig::new(name, &url, plugin);
    s.subscribe = vec![subscribe.to_owned()];
    s.ping_interval_ms = 200;
    s.pong_timeout_ms = 400;
    s.idle_timeout_ms = 5_000;
    s.reconnect_min_ms = 20;
    s.reconnect_max_ms = 200;
    s.max_frame_bytes = 64 * 1024;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sent_trade_arrives_once_through_faults() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "sluice=info".into()))
        .try_init();
    let broker = TestBroker::start("ingest");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 3).await.unwrap();
    let producer = Arc::new(sluice::handoff::Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap()));

    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 100.0, ..FeedSimConfig::default() }).await.unwrap();
    let control = sim.handle();

    let symbols = Arc::new(Symbols::new());
    let rt =
        Runtime::new(RuntimeSettings { max_instances: 32, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let mut plugins = HashMap::new();
    for name in ["binance", "coinbase", "kraken"] {
        let wasm = std::fs::read(format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
        plugins.insert(name.to_owned(), Slot::new(rt.compile(name, &wasm, Limits::default()).unwrap()));
    }
    // Each symbol is served to exactly one source, so "sent" means sent to that source.
    let mut rotating = source(
        "binance-rotating",
        sim.url(Venue::Binance),
        "binance",
        r#"{"method":"SUBSCRIBE","params":["solusdt@aggTrade"],"id":2}"#,
    );
    rotating.max_connection_age_ms = 1_000;
    let sources = vec![
        source(
            "binance",
            sim.url(Venue::Binance),
            "binance",
            r#"{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","ethusdt@aggTrade"],"id":1}"#,
        ),
        source(
            "coinbase",
            sim.url(Venue::Coinbase),
            "coinbase",
            r#"{"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches"]}"#,
        ),
        source(
            "kraken",
            sim.url(Venue::Kraken),
            "kraken",
            r#"{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"trade"}}"#,
        ),
        rotating,
    ];
    let ingest = Ingest::start(sources, &plugins, producer.clone(), IngestSettings::default()).unwrap();

    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    pause(700).await;
    control.skip_trades(Venue::Binance, "BTCUSDT", 5);
    control.skip_trades(Venue::Coinbase, "BTC-USD", 3);
    pause(300).await;
    assert!(control.drop_connections() >= 4);
    pause(700).await;
    control.set_ignore_pings(true);
    pause(900).await;
    control.set_ignore_pings(false);
    pause(500).await;
    assert!(control.send_shutdown_notice() >= 1);
    pause(600).await;
    assert!(control.send_malformed_frame() >= 1);
    pause(300).await;
    assert!(control.send_oversized_frame() >= 1);
    pause(1_000).await;

    // What was sent up to now must all arrive; a frame written in the instant the simulator shuts
    // down may be cut off with its connection, so later ids are only checked for duplicates.
    let sent_before: HashMap<&str, BTreeSet<u64>> =
        tracked().iter().map(|(_, v, s)| (*s, control.sent_ids(*v, s).ranges().flatten().collect())).collect();
    // The simulator stops first, so everything it wrote is read before the sources stop reading.
    sim.shutdown().await;
    pause(500).await;
    let handles: Vec<_> =
        ingest.sources().iter().map(|h| (h.config.name.clone(), h.id, h.stats.clone(), h.decode.clone())).collect();
    ingest.stop().await;
    producer.flush(Duration::from_secs(30)).unwrap();
    let stats_of = |name: &str| handles.iter().find(|h| h.0 == name).unwrap();
    for (name, _, s, d) in &handles {
        eprintln!(
            "{name}: frames {} dropped {} reconnects {} rotations {} records {} rejects {} duplicates {} gaps {}",
            s.frames.load(Ordering::Relaxed),
            s.dropped.load(Ordering::Relaxed),
            s.reconnects.load(Ordering::Relaxed),
            s.rotations.load(Ordering::Relaxed),
            d.records.load(Ordering::Relaxed),
            d.rejects.load(Ordering::Relaxed),
            d.duplicates.load(Ordering::Relaxed),
            d.gaps.load(Ordering::Relaxed),
        );
    }

    // What the simulator sent, per (source name, venue symbol, symbol as decoded).
    // Everything the decode stage passed on must be in the topic, no more and no less.
    let decoded: u64 = handles.iter().map(|h| h.3.records.load(Ordering::Relaxed)).sum();
    let read = read_topic(&broker.bootstrap, &kafka.events_topic, 3, decoded as usize, Duration::from_secs(30));
    assert_eq!(read.len() as u64, decoded);
    assert_eq!(producer.stats().delivered.load(Ordering::Relaxed), decoded + dead_lettered(&handles));

    let mut received: BTreeMap<(u32, u32), Vec<u64>> = BTreeMap::new();
    for m in &read {
        let r = StreamDataView::parse(&m.payload).unwrap();
        received.entry((r.source_id, r.symbol_id)).or_default().push(r.trade_id);
    }
    for (name, venue, symbol) in tracked() {
        let (_, id, _, _) = stats_of(name);
        let symbol_id = symbols.intern(symbol);
        let got = received.get(&(*id, symbol_id)).cloned().unwrap_or_default();
        let unique: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "{name} {symbol}: duplicates in the topic");
        let sent = control.sent_ids(venue, symbol);
        assert!(sent.len() > 50, "{name} {symbol}: only {} trades sent", sent.len());
        let sent_set: BTreeSet<u64> = sent.ranges().flatten().collect();
        assert!(unique.is_subset(&sent_set), "{name} {symbol}: ids in the topic that were never sent");
        let missing: Vec<_> = sent_before[symbol].difference(&unique).collect();
        assert!(missing.is_empty(), "{name} {symbol}: sent but not in the topic: {missing:?}");
        // Every hole between the first and last id received is a counted gap.
        let holes = unique.last().unwrap() - unique.first().unwrap() + 1 - unique.len() as u64;
        let skipped = control.skipped_ids(venue, symbol);
        assert!(skipped.ranges().flatten().all(|id| !unique.contains(&id)));
        if symbol == "BTCUSDT" || symbol == "BTC-USD" {
            assert!(holes >= skipped.len() && skipped.len() >= 3, "{symbol}: {holes} holes, {} skipped", skipped.len());
        }
    }
    // Gaps are counted per source: the binance source's holes across both of its symbols.
    let holes_of = |name: &str, syms: &[&str]| -> u64 {
        let (_, id, _, _) = stats_of(name);
        syms.iter()
            .map(|s| {
                let ids: BTreeSet<u64> =
                    received.get(&(*id, symbols.intern(s))).map(|v| v.iter().copied().collect()).unwrap_or_default();
                ids.last().unwrap() - ids.first().unwrap() + 1 - ids.len() as u64
            })
            .sum()
    };
    for (name, syms) in [("binance", &["BTCUSDT", "ETHUSDT"][..]), ("coinbase", &["BTC-USD"][..])] {
        let (_, _, _, decode) = stats_of(name);
        assert_eq!(decode.gaps.load(Ordering::Relaxed), holes_of(name, syms), "{name}: gap count");
        // And per symbol.
        let by_symbol = decode.gaps_by_symbol.lock().unwrap().clone();
        for sym in syms {
            let counted = by_symbol.get(&symbols.intern(sym)).copied().unwrap_or(0);
            assert_eq!(counted, holes_of(name, &[sym]), "{name} {sym}: gap count");
        }
    }

    // The faults happened and were counted.
    let (_, kraken_id, kraken_stats, _) = stats_of("kraken");
    assert!(received.keys().any(|(s, _)| s == kraken_id), "no kraken records");
    assert!(kraken_stats.reconnects.load(Ordering::Relaxed) >= 2);
    let total = |f: fn(&sluice::source::SourceStats) -> u64| handles.iter().map(|h| f(&h.2)).sum::<u64>();
    assert!(total(|s| s.pong_timeouts.load(Ordering::Relaxed)) >= 1, "no pong timeout");
    assert!(total(|s| s.shutdown_notices.load(Ordering::Relaxed)) >= 1, "no shutdown notice");
    assert!(total(|s| s.oversized.load(Ordering::Relaxed)) >= 1, "no oversized frame");
    assert!(stats_of("binance-rotating").2.rotations.load(Ordering::Relaxed) >= 2, "no rotation");
    let rejects: u64 = handles.iter().map(|h| h.3.rejects.load(Ordering::Relaxed)).sum();
    assert!(rejects >= 3, "malformed frames were not refused: {rejects}");
    let dlq = read_topic(&broker.bootstrap, &kafka.dlq_topic, 3, rejects as usize, Duration::from_secs(10));
    assert_eq!(dlq.len() as u64, rejects);
    assert_eq!(producer.stats().failed.load(Ordering::Relaxed), 0);
}

/// Kraken v1 trades carry no id, and a connection replacement reads two connections for a while:
/// the overlap's copies are recognised by their content. With Kraken's connection rotating every
/// second, the records decoded equal the trades the venue sent, one for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kraken_trades_without_ids_are_not_duplicated_by_rotations() {
    let dir = std::env::temp_dir().join(format!("sluice-kraken-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log =
        sluice::handoff::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::handoff::LocalLogConfig::default())
            .unwrap();
    let writer = Arc::new(sluice::handoff::Writer::Local(
        log.writer(Arc::new(sluice::handoff::ProducerStats::default())).unwrap(),
    ));
    let sim = common::recording_sim(100.0).await;
    let symbols = Arc::new(Symbols::new());
    let rt =
        Runtime::new(RuntimeSettings { max_instances: 16, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/kraken.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let plugins =
        HashMap::from([("kraken".to_owned(), Slot::new(rt.compile("kraken", &wasm, Limits::default()).unwrap()))]);
    let mut kraken = source(
        "kraken",
        sim.url(Venue::Kraken),
        "kraken",
        r#"{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"trade"}}"#,
    );
    kraken.max_connection_age_ms = 1_000;
    let ingest = Ingest::start(vec![kraken], &plugins, writer.clone(), IngestSettings::default()).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let rotations = ingest.sources()[0].stats.rotations.load(std::sync::atomic::Ordering::Relaxed);
    let handle = sim.handle();
    sim.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ingest.stop().await;
    writer.flush(Duration::from_secs(10)).unwrap();
    let sent = handle.sent_trades(Venue::Kraken, "XBT/USD").len();
    let decoded = sluice::handoff::local::read_all(&dir.join("log.sqlite")).unwrap().len();
    assert!(rotations >= 2, "only {rotations} rotations");
    assert!(sent > 300, "only {sent} trades sent");
    assert_eq!(decoded, sent, "{decoded} records decoded from {sent} trades over {rotations} rotations");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A local log in a fresh directory `name`, and its writer.
fn local_log(name: &str) -> (std::path::PathBuf, Arc<sluice::handoff::Writer>) {
    let dir = common::fresh_dir(name);
    let log =
        sluice::handoff::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::handoff::LocalLogConfig::default())
            .unwrap();
    let writer = Arc::new(sluice::handoff::Writer::Local(
        log.writer(Arc::new(sluice::handoff::ProducerStats::default())).unwrap(),
    ));
    (dir, writer)
}

/// A Binance aggTrade frame of trade `id`, with `pad` as a field the decoder skips.
fn aggtrade_line(id: u64, pad: &str) -> String {
    format!(
        r#"{{"e":"aggTrade","E":1,"s":"BTCUSDT","a":{id},"p":"1.5","q":"2","f":1,"l":1,"T":1700000000000,"m":false,"M":true,"pad":"{pad}"}}"#
    ) + "\n"
}

/// A file source named `name` replaying `path` through the Binance decoder.
fn recording(name: &str, path: std::path::PathBuf) -> SourceConfig {
    let mut source = SourceConfig::new(name, "", "binance");
    source.kind = sluice::config::SourceKind::File;
    source.path = Some(path);
    source
}

/// Waits until `decode` counts `frames` frames decoded or refused.
async fn decoded(decode: &sluice::ingest::DecodeStats, frames: u64) {
    let started = std::time::Instant::now();
    while decode.records.load(Ordering::Relaxed) + decode.rejects.load(Ordering::Relaxed) < frames {
        assert!(started.elapsed() < Duration::from_secs(60), "only {decode:?} after a minute");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backlog of large frames (a recording read as fast as decode takes it) is decoded in calls that
/// fit the decoder's memory: `max_bytes_per_call` bounds a call, not only `max_frames_per_call`, so
/// no call hits the memory cap (to be retried frame by frame on fresh instances) and every frame
/// decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_frames_is_decoded_in_calls_that_fit_the_plugin() {
    let (dir, writer) = local_log("large-frames");
    // 300 trades of 100 KB each: 30 MB, where the decoder has 8 MiB.
    let pad = "x".repeat(100_000);
    let path = dir.join("large.jsonl");
    std::fs::write(&path, (1..=300).map(|id| aggtrade_line(id, &pad)).collect::<String>()).unwrap();
    let rt = Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, Arc::new(Symbols::new()))
        .unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits { memory_bytes: 8 << 20, ..Limits::default() }).unwrap();
    let plugins = HashMap::from([("binance".to_owned(), Slot::new(code.clone()))]);
    let settings = IngestSettings { workers: 1, max_bytes_per_call: 1 << 20, ..IngestSettings::default() };
    let ingest = Ingest::start(vec![recording("large", path)], &plugins, writer.clone(), settings).unwrap();
    let decode = ingest.sources()[0].decode.clone();
    decoded(&decode, 300).await;
    ingest.stop().await;
    let metrics = code.decode_metrics();
    assert_eq!((decode.records.load(Ordering::Relaxed), decode.rejects.load(Ordering::Relaxed)), (300, 0));
    assert_eq!(metrics.errors(), 0, "{} calls hit a limit", metrics.limit_errors.get());
    assert!(metrics.calls.get() >= 30, "{} calls for 30 MB", metrics.calls.get());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Source ids come from the symbol dictionary, so a source added after a flood of names has a large
/// one. The decode workers keep their per-source tables by id, so a source with id 4,000,000,000
/// costs what any other does (tables sized by the largest id would need tens of gigabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_a_huge_id_costs_what_any_other_does() {
    let (dir, writer) = local_log("huge-id");
    let path = dir.join("trades.jsonl");
    std::fs::write(&path, (1..=3).map(|id| aggtrade_line(id, "")).collect::<String>()).unwrap();
    let rt = Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, Arc::new(Symbols::new()))
        .unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let plugins =
        HashMap::from([("binance".to_owned(), Slot::new(rt.compile("binance", &wasm, Limits::default()).unwrap()))]);
    let id = 4_000_000_000;
    let marks = sluice::handoff::marks::Marks::default();
    let ingest = Ingest::start_with_ids(
        vec![recording("late", path)],
        &[id],
        &plugins,
        writer.clone(),
        IngestSettings { workers: 2, ..IngestSettings::default() },
        &marks,
    )
    .unwrap();
    decoded(&ingest.sources()[0].decode.clone(), 3).await;
    ingest.stop().await;
    writer.flush(Duration::from_secs(10)).unwrap();
    let records = sluice::handoff::local::read_all(&dir.join("log.sqlite")).unwrap();
    let sources: Vec<u32> = records.iter().map(|(_, r)| StreamDataView::parse(r).unwrap().source_id).collect();
    assert_eq!(sources, [id; 3]);
    let _ = std::fs::remove_dir_all(&dir);
}
