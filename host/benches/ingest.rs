//! Ingest load: how many frames per second one ingest process takes from the feed simulator through
//! the wasm decode plugin into the broker, and how much memory idle connections cost.
//!
//! Run: `cargo bench -p sluice --bench ingest`. Everything runs in this one process on loopback (the
//! simulator, sluice's ingest, the embedded broker), so the machine's cores are shared among them:
//! the numbers are a floor for ingest alone.

#[path = "../tests/it/common/broker.rs"]
mod broker;

use broker::EmbeddedBroker;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use feedsim::{FeedSim, FeedSimConfig, Venue};
use sluice::config::SourceConfig;
use sluice::ingest::{Ingest, IngestSettings};
use sluice::kafka::producer::EventProducer;
use sluice::kafka::{KafkaConfig, ensure_topics};
use sluice::plugin::registry::Slot;
use sluice::plugin::{Limits, Runtime, RuntimeSettings};
use sluice::symbols::Symbols;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn binance_source(name: &str, url: String, symbols: &[String]) -> SourceConfig {
    let params: Vec<String> = symbols.iter().map(|s| format!("\"{}@aggTrade\"", s.to_lowercase())).collect();
    let mut s = SourceConfig::new(name, &url, "binance");
    s.subscribe = vec![format!(r#"{{"method":"SUBSCRIBE","params":[{}],"id":1}}"#, params.join(","))];
    s.idle_timeout_ms = 600_000;
    s
}

async fn throughput(rate_per_symbol: f64, sources: usize, symbols_per_source: usize, seconds: u64) {
    let dir = std::env::temp_dir().join(format!("sluice-bench-ingest-{}", std::process::id()));
    let broker = EmbeddedBroker::start("127.0.0.1:0", &dir, Duration::from_secs(3600)).expect("broker");
    // The embedded broker is one broker: one replica per partition.
    let kafka = KafkaConfig { replication_factor: 1, min_insync_replicas: 1, ..KafkaConfig::default() };
    ensure_topics(&kafka, &broker.bootstrap(), &[&kafka.events_topic, &kafka.dlq_topic], 6).await.expect("topics");
    let producer =
        Arc::new(sluice::handoff::Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap()).expect("producer")));
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: rate_per_symbol, ..FeedSimConfig::default() })
        .await
        .expect("simulator");
    let rt = Runtime::new(RuntimeSettings::default(), Arc::new(Symbols::new())).expect("runtime");
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).expect("plugin");
    let plugins =
        HashMap::from([("binance".to_owned(), Slot::new(rt.compile("binance", &wasm, Limits::default()).unwrap()))]);
    let configs: Vec<_> = (0..sources)
        .map(|i| {
            let symbols: Vec<String> = (0..symbols_per_source).map(|j| format!("S{i}X{j}USDT")).collect();
            binance_source(&format!("s{i}"), sim.url(Venue::Binance), &symbols)
        })
        .collect();
    let ingest = Ingest::start(configs, &plugins, producer.clone(), IngestSettings::default()).expect("ingest");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frames = |i: &Ingest| i.sources().iter().map(|h| h.stats.frames.load(Ordering::Relaxed)).sum::<u64>();
    let dropped = |i: &Ingest| i.sources().iter().map(|h| h.stats.dropped.load(Ordering::Relaxed)).sum::<u64>();
    let (f0, d0, del0) = (frames(&ingest), dropped(&ingest), producer.stats().delivered.load(Ordering::Relaxed));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let secs = start.elapsed().as_secs_f64();
    let (f1, d1, del1) = (frames(&ingest), dropped(&ingest), producer.stats().delivered.load(Ordering::Relaxed));
    println!(
        "ingest {sources} sources x {symbols_per_source} symbols at {rate_per_symbol}/s each: {:.0} frames/s read, {:.0} records/s delivered, {} frames dropped",
        (f1 - f0) as f64 / secs,
        (del1 - del0) as f64 / secs,
        d1 - d0
    );
    ingest.stop().await;
    let _ = producer.flush(Duration::from_secs(30));
    sim.shutdown().await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn idle_memory(connections: usize) {
    let sim =
        FeedSim::start(FeedSimConfig { trades_per_second: 0.0, kraken_heartbeat_ms: 0, ..FeedSimConfig::default() })
            .await
            .expect("simulator");
    let dir = std::env::temp_dir().join(format!("sluice-bench-idle-{}", std::process::id()));
    let broker = EmbeddedBroker::start("127.0.0.1:0", &dir, Duration::from_secs(3600)).expect("broker");
    let kafka = KafkaConfig::default();
    let producer =
        Arc::new(sluice::handoff::Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap()).expect("producer")));
    let rt = Runtime::new(RuntimeSettings::default(), Arc::new(Symbols::new())).expect("runtime");
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).expect("plugin");
    let plugins =
        HashMap::from([("binance".to_owned(), Slot::new(rt.compile("binance", &wasm, Limits::default()).unwrap()))]);
    let configs: Vec<_> = (0..connections)
        .map(|i| binance_source(&format!("idle{i}"), sim.url(Venue::Binance), &[format!("IDLE{i}USDT")]))
        .collect();
    let settings = IngestSettings { connect_interval: Duration::from_micros(200), ..IngestSettings::default() };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes();
    let ingest = Ingest::start(configs, &plugins, producer, settings).expect("ingest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && sim.handle().stats().connections_open < connections as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes();
    let open = sim.handle().stats().connections_open;
    println!(
        "idle: {open} connections open; process RSS grew {:.1} MiB, {:.1} MiB per 1,000 connections (simulator's side included)",
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64,
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64 * 1000.0 / open.max(1) as f64
    );
    ingest.stop().await;
    sim.shutdown().await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    rt.block_on(async {
        throughput(2_000.0, 4, 8, 10).await;
        throughput(10_000.0, 8, 8, 10).await;
        idle_memory(1_000).await;
    });
}
