//! The process role on its own: records already in `sluice.events` (the embedded broker, in this
//! process) through the `rescale` plugin (wasm) into each sink.
//!
//! 1. Throughput: how many records per second one instance drains from a pre-filled topic into the
//!    embedded store and into the Druid topic (Kafka transactions).
//! 2. Batch latency at a set input rate (10,000 and 100,000 records/s, paced by a producer thread):
//!    the adaptive batcher's p50/p99 latency from a batch's first row to its commit, embedded store.
//!
//! Run: `cargo bench -p sluice --bench process`.

#[path = "../tests/it/common/broker.rs"]
mod broker;
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use broker::EmbeddedBroker;
use common::wasm;
use plugin_sdk::{Record, Records};
use sluice::chain::Chain;
use sluice::handoff::Reader;
use sluice::kafka::consumer::EventConsumer;
use sluice::kafka::producer::EventProducer;
use sluice::kafka::{KafkaConfig, ensure_topics};
use sluice::plugin::{Limits, PluginInstance, Runtime, RuntimeSettings};
use sluice::process::{Breakers, Names, Process, ProcessSettings, ProcessStats, run_process};
use sluice::sink::Sink;
use sluice::sink::druid::{DruidSink, DruidSinkConfig};
use sluice::sink::embedded::EmbeddedStore;
use sluice::symbols::Symbols;
use sluice::transform::Transformer;

const PARTITIONS: i32 = 6;

fn record(i: u64, symbol_id: u32) -> Record {
    Record {
        source_id: 1,
        symbol_id,
        price_e8: 6_500_000_000_000 + (i % 10_000) as i64 * 1_000_000,
        volume_e8: 1_000_000 + (i * 7_919 % 50_000_000) as i64,
        timestamp_ms: 1_700_000_000_000 + i as i64,
        is_buy: i.is_multiple_of(3),
        trade_id: i,
        received_at_us: 1_700_000_000_000_000 + i as i64 * 1000,
    }
}

struct Bench {
    _broker: EmbeddedBroker,
    bootstrap: String,
    symbols: Arc<Symbols>,
    runtime: Runtime,
    dir: std::path::PathBuf,
}

impl Bench {
    fn kafka(&self, name: &str) -> KafkaConfig {
        KafkaConfig {
            events_topic: format!("events.{name}"),
            dlq_topic: format!("dlq.{name}"),
            partitions: PARTITIONS,
            // The embedded broker is one broker: one replica per partition.
            replication_factor: 1,
            min_insync_replicas: 1,
            ..KafkaConfig::default()
        }
    }

    fn produce(&self, producer: &EventProducer, from: u64, n: u64, ids: &[u32]) {
        let mut records = Records::new();
        for i in from..from + n {
            records.push(&record(i, ids[(i % ids.len() as u64) as usize]));
        }
        producer.send_records(records.as_bytes());
    }

    /// Runs the process role on `kafka` into `sink` until `done` says so; returns its counters.
    fn process(
        &self,
        kafka: &KafkaConfig,
        mut sink: Box<dyn Sink>,
        done: impl Fn(&ProcessStats) -> bool + Sync,
    ) -> (ProcessStats, Duration) {
        let code = self.runtime.compile("rescale", &wasm("rescale"), Limits::default()).expect("rescale");
        let config = [("scale".to_owned(), "1.0001".to_owned())];
        let mut transformers = HashMap::from([(
            1u32,
            Chain::new(1, vec![Transformer::new(PluginInstance::new(&code, &config).expect("init"))]),
        )]);
        let consumer = Reader::Kafka(
            EventConsumer::new(kafka, &self.bootstrap, &format!("group.{}", kafka.events_topic), Some("0"))
                .expect("consumer"),
        );
        let names = Names {
            sources: std::collections::HashMap::from([(1, Arc::from("bench"))]),
            symbols: self.symbols.clone(),
        };
        let settings = ProcessSettings { partitions: PARTITIONS, ..ProcessSettings::default() };
        let stats = ProcessStats::default();
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let mut breakers = Breakers::default();
        std::thread::scope(|s| {
            let runner = s.spawn(|| {
                run_process(
                    Process {
                        reader: &consumer,
                        chains: &mut transformers,
                        breakers: &mut breakers,
                        sink: sink.as_mut(),
                        names: &names,
                        settings: &settings,
                        stats: &stats,
                    },
                    &stop,
                )
            });
            while !done(&stats) && started.elapsed() < Duration::from_secs(300) {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            runner.join().expect("process thread").expect("process role");
        });
        let elapsed = started.elapsed();
        (stats, elapsed)
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("sluice-bench-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let broker = EmbeddedBroker::start("127.0.0.1:0", &dir.join("broker"), Duration::from_secs(3600)).expect("broker");
    let symbols = Arc::new(Symbols::new());
    let ids: Vec<u32> = (0..20).map(|i| symbols.intern(&format!("SYM{i}USDT"))).collect();
    let runtime = Runtime::new(RuntimeSettings::default(), symbols.clone()).expect("runtime");
    let bench = Bench { bootstrap: broker.bootstrap(), _broker: broker, symbols, runtime, dir: dir.clone() };
    let rt = tokio::runtime::Runtime::new().expect("tokio");

    // 1. Throughput from a pre-filled topic.
    const N: u64 = 400_000;
    for sink in ["embedded", "druid"] {
        let kafka = bench.kafka(sink);
        let druid = DruidSinkConfig { topic: format!("druid.{sink}"), ..DruidSinkConfig::default() };
        rt.block_on(ensure_topics(
            &kafka,
            &bench.bootstrap,
            &[&kafka.events_topic, &kafka.dlq_topic, &druid.topic],
            PARTITIONS,
        ))
        .expect("topics");
        let producer = EventProducer::new(&kafka, &bench.bootstrap).expect("producer");
        bench.produce(&producer, 0, N, &ids);
        producer.flush(Duration::from_secs(120)).expect("filled");
        let sink_box: Box<dyn Sink> = match sink {
            "embedded" => Box::new(
                EmbeddedStore::open(&bench.dir.join(format!("{sink}.sqlite")), Duration::from_secs(60)).expect("store"),
            ),
            _ => Box::new(
                DruidSink::new(&kafka, &bench.bootstrap, &druid, "bench-druid", Duration::from_secs(30))
                    .expect("druid"),
            ),
        };
        let (stats, elapsed) = bench.process(&kafka, sink_box, |s| s.stored.load(Ordering::Relaxed) >= N);
        let stored = stats.stored.load(Ordering::Relaxed);
        println!(
            "throughput into {sink}: {stored} records in {:.2} s = {:.0} records/s ({} batches, p50 batch latency {:?})",
            elapsed.as_secs_f64(),
            stored as f64 / elapsed.as_secs_f64(),
            stats.flushes.load(Ordering::Relaxed),
            stats.batch_latency.quantile(0.5).unwrap_or_default(),
        );
    }

    // 2. Batch latency at a steady input rate, embedded store.
    for rate in [10_000u64, 100_000] {
        let kafka = bench.kafka(&format!("rate{rate}"));
        rt.block_on(ensure_topics(&kafka, &bench.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], PARTITIONS))
            .expect("topics");
        let producer = EventProducer::new(&kafka, &bench.bootstrap).expect("producer");
        let seconds = 10;
        let total = rate * seconds;
        let produced = std::sync::atomic::AtomicU64::new(0);
        let store =
            EmbeddedStore::open(&bench.dir.join(format!("rate{rate}.sqlite")), Duration::from_secs(60)).expect("store");
        let (stats, elapsed) = std::thread::scope(|s| {
            s.spawn(|| {
                // Paced in 10 ms steps.
                let start = Instant::now();
                let step = rate / 100;
                let mut sent = 0;
                while sent < total {
                    let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                    if due > sent {
                        bench.produce(&producer, sent, due - sent, &ids);
                        sent = due;
                        produced.store(sent, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10).min(Duration::from_micros(step.max(1) * 100)));
                }
                producer.flush(Duration::from_secs(60)).expect("flushed");
            });
            bench.process(&kafka, Box::new(store), |s| s.stored.load(Ordering::Relaxed) >= total)
        });
        let q = |x| stats.batch_latency.quantile(x).unwrap_or_default().as_secs_f64() * 1000.0;
        println!(
            "input {rate} records/s for {seconds} s: stored {} in {:.1} s; batch latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} batches",
            stats.stored.load(Ordering::Relaxed),
            elapsed.as_secs_f64(),
            q(0.5),
            q(0.99),
            q(1.0),
            stats.flushes.load(Ordering::Relaxed),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
