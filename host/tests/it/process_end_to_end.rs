//! The process role against a real Kafka-protocol broker: records in `sluice.events` go through a
//! real wasm plugin (`chaos`, trapping on one poison trade id) into the embedded SQLite store. The
//! rolled-up counts and quantity sums equal those computed independently from the records sent, the
//! poison record alone lands in the dead-letter topic, and a restarted process resumes from the
//! offsets stored with the rows without counting anything twice.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestBroker, unique_topic};
use plugin_sdk::{Record, Records, StreamDataView};
use sluice::batch::BatchConfig;
use sluice::breaker::BreakerConfig;
use sluice::chain::Chain;
use sluice::kafka::consumer::EventConsumer;
use sluice::kafka::producer::EventProducer;
use sluice::kafka::{KafkaConfig, ensure_topics};
use sluice::log::{Reader, Writer};
use sluice::pipeline::{Breakers, Names, Process, ProcessError, ProcessSettings, ProcessStats, run_process};
use sluice::plugin::{Limits, PluginInstance, Runtime, RuntimeSettings};
use sluice::sink::embedded::{EmbeddedStore, QueryConnection};
use sluice::symbols::Symbols;
use sluice::transform::Transformer;

/// Each source's chain of transforms, by source id.
fn chains<const N: usize>(links: [(u32, Vec<Transformer>); N]) -> HashMap<u32, Chain> {
    links.into_iter().map(|(id, links)| (id, Chain::new(id, links))).collect()
}

const POISON: u64 = 1_234;

/// One dead letter as the embedded store holds it.
#[derive(Debug)]
struct StoredDeadLetter {
    stage: String,
    source: String,
    plugin: String,
    reason: String,
    bytes: Vec<u8>,
}

/// The store's dead letters, oldest first (none when the table is not there yet).
fn store_dead_letters(store: &std::path::Path) -> Vec<StoredDeadLetter> {
    let conn = rusqlite::Connection::open(store).unwrap();
    let Ok(mut stmt) = conn.prepare("SELECT stage, source, plugin, reason, bytes FROM dead_letters ORDER BY id") else {
        return Vec::new();
    };
    stmt.query_map([], |r| {
        Ok(StoredDeadLetter {
            stage: r.get(0)?,
            source: r.get(1)?,
            plugin: r.get(2)?,
            reason: r.get(3)?,
            bytes: r.get(4)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}
const SYMBOLS: [&str; 3] = ["BTCUSDT", "ETHUSDT", "SOLUSDT"];

fn trade(i: u64, symbols: &Symbols) -> Record {
    Record {
        source_id: 1,
        symbol_id: symbols.intern(SYMBOLS[(i % 3) as usize]),
        price_e8: 100_00000000 + (i as i64 % 97) * 1_000_000,
        volume_e8: 1_000_000 + (i as i64 * 7_919) % 50_000_000,
        timestamp_ms: 1_700_000_000_000 + i as i64 * 150,
        is_buy: i % 5 < 3,
        trade_id: i,
        received_at_us: 0,
    }
}

/// Runs the process role until it has handled `want` records (stored or refused), then stops it.
fn process_until(
    kafka: &KafkaConfig,
    bootstrap: &str,
    store_path: &std::path::Path,
    symbols: &Arc<Symbols>,
    want: u64,
) -> ProcessStats {
    let rt = Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("chaos", &wasm, Limits::default()).unwrap();
    let poison = [("trap_on_trade_id".to_owned(), POISON.to_string())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &poison).unwrap())])]);
    let consumer = Reader::Kafka(EventConsumer::new(kafka, bootstrap, &unique_topic("group"), None).unwrap());
    let mut store = EmbeddedStore::open(store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 3, batch: BatchConfig::default(), ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut breakers = Breakers::default();
            run_process(
                Process {
                    reader: &consumer,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed) < want
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let a last batch with only offsets land, then stop.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
    });
    stats
}

#[test]
fn rollups_equal_the_records_sent_and_the_poison_record_is_dead_lettered_alone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("process");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 3)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    let send = |range: std::ops::RangeInclusive<u64>| {
        let mut records = Records::new();
        for i in range {
            records.push(&trade(i, &symbols));
        }
        producer.send_records(records.as_bytes());
        producer.flush(Duration::from_secs(20)).unwrap();
    };
    let store_path = std::env::temp_dir().join(format!("sluice-process-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);

    send(1..=3_000);
    let first = process_until(&kafka, &broker.bootstrap, &store_path, &symbols, 3_000);
    assert_eq!(first.rejected.load(Ordering::Relaxed), 1);
    assert!(first.failed_calls.load(Ordering::Relaxed) >= 2, "the poison batch was retried and bisected");

    // A restarted process resumes from the stored offsets: only the new records are added.
    send(3_001..=4_500);
    let second = process_until(&kafka, &broker.bootstrap, &store_path, &symbols, 1_500);
    assert_eq!(second.consumed.load(Ordering::Relaxed), 1_500, "the restart read old records again");
    assert_eq!(second.rejected.load(Ordering::Relaxed), 0);

    // Independently: counts and exact quantity sums per symbol and side, poison excluded.
    let mut want: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for i in (1..=4_500).filter(|&i| i != POISON) {
        let t = trade(i, &symbols);
        let side = if t.is_buy { "buy" } else { "sell" };
        let e = want.entry((SYMBOLS[(i % 3) as usize].to_owned(), side.to_owned())).or_default();
        e.0 += 1;
        e.1 += t.volume_e8;
    }
    let q = QueryConnection::open(&store_path).unwrap();
    let rows = q
        .query(
            "SELECT symbol, side, sum(events) AS n, sum(qty_sum_e8) AS q FROM rollup GROUP BY symbol, side ORDER BY symbol, side",
            100,
        )
        .unwrap();
    let got: BTreeMap<(String, String), (i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                (r["symbol"].as_str().unwrap().to_owned(), r["side"].as_str().unwrap().to_owned()),
                (r["n"].as_i64().unwrap(), r["q"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, want);

    // The poison record alone, in the store's dead letters, committed with its batch.
    let dead = store_dead_letters(&store_path);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(StreamDataView::parse(&d.bytes).unwrap().trade_id, POISON);
    assert_eq!((d.stage.as_str(), d.source.as_str()), ("transform", "binance"));
    // The plugin and the version of its code that refused the record.
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    assert_eq!(d.plugin, format!("chaos@{}", sluice::plugin::version_of(&wasm)));
    assert!(d.reason.contains("poison record"), "{}", d.reason);
    let _ = std::fs::remove_file(&store_path);
}

/// A plugin that fails on every batch trips its breaker: the role stops calling it and returns, and
/// the records of the batch that tripped it are not committed (they wait in Kafka), so a restart
/// reads them again.
#[test]
fn a_plugin_that_keeps_failing_opens_its_breaker_and_its_records_wait() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("breaker");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 1)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    // Three polls' worth of records, produced in three flushes.
    for chunk in 0..3u64 {
        let mut records = Records::new();
        for i in chunk * 100 + 1..=chunk * 100 + 100 {
            records.push(&trade(i, &symbols));
        }
        producer.send_records(records.as_bytes());
        producer.flush(Duration::from_secs(20)).unwrap();
    }
    let store_path = std::env::temp_dir().join(format!("sluice-breaker-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let runtime =
        Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = runtime.compile("chaos", &wasm, Limits::default()).unwrap();
    let mode = [("mode".to_owned(), "trap".to_owned())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &mode).unwrap())])]);
    let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None).unwrap());
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 100,
        breaker: BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let stats = ProcessStats::default();
    let mut breakers = Breakers::default();
    let stop = AtomicBool::new(false);
    // Without a breaker the role would run on; a bounded wait turns that into a failure, not a hang.
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
        });
        let result = run_process(
            Process {
                reader: &consumer,
                chains: &mut transformers,
                breakers: &mut breakers,
                sink: &mut store,
                names: &names,
                settings: &settings,
                stats: &stats,
            },
            &stop,
        );
        done.store(true, Ordering::Relaxed);
        result
    });
    let err = result.expect_err("the breaker stops the role");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
    assert_eq!(breakers.open_sources(), vec![1]);
    assert!(breakers.wait(std::time::Instant::now()) > Duration::ZERO);
    // The first failing batch was bisected and dead-lettered record by record (as for a poison
    // record); the second tripped the breaker and was not committed.
    let offsets = store.offsets(&kafka.events_topic).unwrap();
    let committed = offsets.iter().map(|(_, _, next)| *next).max().unwrap_or(0);
    assert!(committed < 300, "everything was committed: {offsets:?}");
    assert!(stats.consumed.load(Ordering::Relaxed) > committed as u64, "the tripping batch was committed");
    let _ = std::fs::remove_file(&store_path);
}

/// Dead letters are committed with the batch of their poll, so a poll abandoned because another
/// source's breaker opened commits none, and reading it again later does not write them twice.
///
/// Source 1's plugin refuses one poison record; source 2's plugin traps on everything (its breaker
/// opens on its second failing batch). The poison record sits in the poll where source 2's breaker
/// opens; the role is started again twice while source 2 still fails, then with source 2 fixed.
/// Into the embedded store, dead letters go to its table with the batch.
#[test]
fn a_poll_abandoned_for_an_open_breaker_dead_letters_nothing_twice() {
    abandoned_poll_scenario(false);
}

/// The same with the Druid sink: the dead letters go to the dead-letter topic in the batch's Kafka
/// transaction, so a read_committed reader of that topic sees each exactly once. (Druid itself is not
/// involved: the sink's contract ends at the Druid topic and the dead-letter topic.)
#[test]
fn with_the_druid_sink_dead_letters_are_committed_once_in_the_batch_transaction() {
    abandoned_poll_scenario(true);
}

/// Every committed record of `topic`, read from the start by a read_committed reader.
fn committed_payloads(bootstrap: &str, topic: &str) -> Vec<Vec<u8>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_topic("reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let (mut payloads, mut quiet) = (Vec::new(), Instant::now());
    while quiet.elapsed() < Duration::from_millis(1500) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            payloads.push(m.payload().unwrap_or_default().to_vec());
            quiet = Instant::now();
        }
    }
    payloads
}

fn abandoned_poll_scenario(druid: bool) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("breaker-dlq");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 1)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    const POISON_1: u64 = 75;
    // Two polls of 100: trades 1-50 of source 1 and 1001-1050 of source 2, then 51-100 and 1051-1100.
    for chunk in 0..2u64 {
        let mut records = Records::new();
        for i in chunk * 50 + 1..=chunk * 50 + 50 {
            records.push(&trade(i, &symbols));
            records.push(&Record { source_id: 2, ..trade(1000 + i, &symbols) });
        }
        producer.send_records(records.as_bytes());
        producer.flush(Duration::from_secs(20)).unwrap();
    }
    let store_path = std::env::temp_dir().join(format!("sluice-breaker-dlq-{druid}-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let runtime =
        Runtime::new(RuntimeSettings { max_instances: 16, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = runtime.compile("chaos", &wasm, Limits::default()).unwrap();
    let config = |k: &str, v: &str| [(k.to_owned(), v.to_owned())];
    let mut transformers = chains([
        (
            1u32,
            vec![Transformer::new(
                PluginInstance::new(&code, &config("trap_on_trade_id", &POISON_1.to_string())).unwrap(),
            )],
        ),
        (2u32, vec![Transformer::new(PluginInstance::new(&code, &config("mode", "trap")).unwrap())]),
    ]);
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let druid_config = sluice::sink::druid::DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let mut druid_sink = druid.then(|| {
        let state_topic = druid_config.state_topic();
        rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&druid_config.topic, &state_topic], 1)).unwrap();
        sluice::sink::druid::DruidSink::new(
            &kafka,
            &broker.bootstrap,
            &druid_config,
            &unique_topic("tx"),
            Duration::from_secs(20),
        )
        .unwrap()
    });
    // The Druid sink keeps its position in the consumer group: every run joins the same one.
    let group = unique_topic("group");
    let names =
        Names { sources: HashMap::from([(1, Arc::from("one")), (2, Arc::from("two"))]), symbols: symbols.clone() };
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 100,
        // Every poll is committed as soon as it went through.
        batch: BatchConfig { max_rows: 10, ..BatchConfig::default() },
        breaker: BreakerConfig { failure_threshold: 2, cool_down_ms: 50, max_cool_down_ms: 50 },
        ..ProcessSettings::default()
    };
    let stats = ProcessStats::default();
    let mut breakers = Breakers::default();
    let mut run = |transformers: &mut HashMap<u32, Chain>, breakers: &mut Breakers| {
        let group = if druid { group.clone() } else { unique_topic("group") };
        let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &group, None).unwrap());
        let sink: &mut dyn sluice::sink::Sink = match druid_sink.as_mut() {
            Some(d) => d,
            None => &mut store,
        };
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let start = Instant::now();
                while !done.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop.store(true, Ordering::Relaxed);
            });
            let result = run_process(
                Process {
                    reader: &consumer,
                    chains: transformers,
                    breakers,
                    sink,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            );
            done.store(true, Ordering::Relaxed);
            result
        })
    };
    let dead_ids = || -> Vec<u64> {
        let letters: Vec<Vec<u8>> = match druid {
            true => committed_payloads(&broker.bootstrap, &kafka.dlq_topic),
            false => store_dead_letters(&store_path).into_iter().map(|d| d.bytes).collect(),
        };
        let mut ids: Vec<u64> = letters.iter().map(|b| StreamDataView::parse(b).unwrap().trade_id).collect();
        ids.sort_unstable();
        ids
    };
    for _ in 0..3 {
        let err = run(&mut transformers, &mut breakers).expect_err("source 2's breaker stops the role");
        assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
        std::thread::sleep(Duration::from_millis(60));
    }
    // A link that fails on every record fails call after call: its breaker opens within the first
    // poll, and nothing of that poll is committed, its records neither rolled up nor dead-lettered
    // (they wait for the link to work). The poll never went through, so the poison record of
    // source 1 is not dead-lettered yet either.
    assert_eq!(dead_ids(), Vec::<u64>::new());

    // Source 2 fixed: both polls go through, and the poison record is dead-lettered once.
    transformers.insert(2, Chain::new(2, vec![Transformer::new(PluginInstance::new(&code, &[]).unwrap())]));
    let stop_after_the_poll = run(&mut transformers, &mut Breakers::default());
    assert!(stop_after_the_poll.is_ok(), "{stop_after_the_poll:?}");
    assert_eq!(dead_ids(), [POISON_1]);
    let _ = std::fs::remove_file(&store_path);
}

/// While a source's link has an open breaker, the source is held: its records stay in the log and
/// the other sources go on, their progress past the held records committed with their rows. When
/// the cool-down ends the role reads again from the last commit (`TrialDue`); with the link fixed,
/// the held records go through and the others' are not counted twice. Into the embedded store.
#[test]
fn a_held_source_waits_while_the_others_go_on() {
    held_source_scenario(false);
}

/// The same with the Druid sink: the progress goes to the changelog topic in the batch's
/// transaction. (Druid itself is not involved: the sink's contract ends at its topics.)
#[test]
fn with_the_druid_sink_a_held_source_waits_while_the_others_go_on() {
    held_source_scenario(true);
}

fn held_source_scenario(druid: bool) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("held-source");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 1)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    const POISON_1: u64 = 75;
    // Two polls of 100: trades 1-50 of source 1 and 1001-1050 of source 2, then 51-100 and 1051-1100.
    for chunk in 0..2u64 {
        let mut records = Records::new();
        for i in chunk * 50 + 1..=chunk * 50 + 50 {
            records.push(&trade(i, &symbols));
            records.push(&Record { source_id: 2, ..trade(1000 + i, &symbols) });
        }
        producer.send_records(records.as_bytes());
        producer.flush(Duration::from_secs(20)).unwrap();
    }
    let store_path = std::env::temp_dir().join(format!("sluice-held-{druid}-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let runtime =
        Runtime::new(RuntimeSettings { max_instances: 16, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = runtime.compile("chaos", &wasm, Limits::default()).unwrap();
    let config = |k: &str, v: &str| [(k.to_owned(), v.to_owned())];
    let mut transformers = chains([
        (
            1u32,
            vec![Transformer::new(
                PluginInstance::new(&code, &config("trap_on_trade_id", &POISON_1.to_string())).unwrap(),
            )],
        ),
        (2u32, vec![Transformer::new(PluginInstance::new(&code, &config("mode", "trap")).unwrap())]),
    ]);
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let druid_config = sluice::sink::druid::DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let mut druid_sink = druid.then(|| {
        let state_topic = druid_config.state_topic();
        rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&druid_config.topic, &state_topic], 1)).unwrap();
        sluice::sink::druid::DruidSink::new(
            &kafka,
            &broker.bootstrap,
            &druid_config,
            &unique_topic("tx"),
            Duration::from_secs(20),
        )
        .unwrap()
    });
    let group = unique_topic("group");
    let names =
        Names { sources: HashMap::from([(1, Arc::from("one")), (2, Arc::from("two"))]), symbols: symbols.clone() };
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 100,
        batch: BatchConfig { max_rows: 10, ..BatchConfig::default() },
        breaker: BreakerConfig { failure_threshold: 2, cool_down_ms: 1500, max_cool_down_ms: 1500 },
        ..ProcessSettings::default()
    };
    let stats = ProcessStats::default();
    let mut breakers = Breakers::default();
    // Runs the role until it returns, or for `at_most`.
    let mut run = |transformers: &mut HashMap<u32, Chain>, breakers: &mut Breakers, at_most: Duration| {
        let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &group, None).unwrap());
        let sink: &mut dyn sluice::sink::Sink = match druid_sink.as_mut() {
            Some(d) => d,
            None => &mut store,
        };
        let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
        std::thread::scope(|s| {
            s.spawn(|| {
                let start = Instant::now();
                while !done.load(Ordering::Relaxed) && start.elapsed() < at_most {
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop.store(true, Ordering::Relaxed);
            });
            let process = Process {
                reader: &consumer,
                chains: transformers,
                breakers,
                sink,
                names: &names,
                settings: &settings,
                stats: &stats,
            };
            let result = run_process(process, &stop);
            done.store(true, Ordering::Relaxed);
            result
        })
    };
    // Trade ids of the dead letters, and of the rows per source (from the store's rollup: events).
    let dead_ids = || -> Vec<u64> {
        let letters: Vec<Vec<u8>> = match druid {
            true => committed_payloads(&broker.bootstrap, &kafka.dlq_topic),
            false => store_dead_letters(&store_path).into_iter().map(|d| d.bytes).collect(),
        };
        let mut ids: Vec<u64> = letters.iter().map(|b| StreamDataView::parse(b).unwrap().trade_id).collect();
        ids.sort_unstable();
        ids
    };
    let rows = || -> BTreeMap<String, i64> {
        let mut by_source = BTreeMap::new();
        match druid {
            true => {
                use prost::Message;
                for payload in committed_payloads(&broker.bootstrap, &druid_config.topic) {
                    let row = sluice::proto::SinkRow::decode(payload.as_slice()).unwrap();
                    *by_source.entry(row.source).or_insert(0) += 1;
                }
            }
            false => {
                let q = QueryConnection::open(&store_path).unwrap();
                for row in q.query("SELECT source, sum(events) AS n FROM rollup GROUP BY source", 10).unwrap() {
                    by_source.insert(row["source"].as_str().unwrap().to_owned(), row["n"].as_i64().unwrap());
                }
            }
        }
        by_source
    };

    let err = run(&mut transformers, &mut breakers, Duration::from_secs(10)).expect_err("source 2's breaker opens");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
    // Held: source 1 goes on to the end while source 2's records wait; at the end of the cool-down
    // the role reads again from the last commit for the trial.
    let started = Instant::now();
    let err = run(&mut transformers, &mut breakers, Duration::from_secs(10)).expect_err("the trial comes due");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::TrialDue)), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(5), "the trial came after {:?}", started.elapsed());
    assert_eq!(dead_ids(), [POISON_1], "source 1's poison record, once; none of source 2's");
    assert_eq!(rows(), BTreeMap::from([("one".to_owned(), 99)]), "source 1 went on while source 2 was held");

    // Source 2 fixed: its records go through, and source 1's are not counted again.
    transformers.insert(2, Chain::new(2, vec![Transformer::new(PluginInstance::new(&code, &[]).unwrap())]));
    let stopped = run(&mut transformers, &mut breakers, Duration::from_secs(4));
    assert!(stopped.is_ok(), "{stopped:?}");
    assert_eq!(dead_ids(), [POISON_1]);
    assert_eq!(rows(), BTreeMap::from([("one".to_owned(), 99), ("two".to_owned(), 100)]));
    let _ = std::fs::remove_file(&store_path);
}

/// A store position past the end of its Kafka partition (the topic was deleted and created again)
/// is refused with both offsets; the consumer does not quietly reset to the start and roll the topic
/// up a second time.
#[test]
fn a_store_ahead_of_its_topic_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("ahead");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic], 2)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    let mut records = Records::new();
    for i in 1..=10 {
        records.push(&trade(i, &symbols));
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();
    let store_path = std::env::temp_dir().join(format!("sluice-ahead-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    // A store that had read 500 records of partition 1 of a topic that now holds at most 10.
    store.apply(&[], &[(&kafka.events_topic, 1, 500)]).unwrap();
    let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None).unwrap());
    let err = sluice::sink::Sink::attach(&mut store, &consumer, 2).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err.downcast_ref::<sluice::log::LogError>(),
            Some(sluice::log::LogError::OffsetAhead { partition: 1, store: 500, .. })
        ),
        "{text}"
    );
    assert!(text.contains("position 500") && text.contains(&kafka.events_topic), "{text}");
    // Positions within the topic attach as before.
    store.apply(&[], &[(&kafka.events_topic, 1, 0)]).unwrap();
    sluice::sink::Sink::attach(&mut store, &consumer, 2).unwrap();
    let _ = std::fs::remove_file(&store_path);
}

/// An isolated poison record never holds a breaker open: with `failure_threshold = 1`, the batch whose
/// bisection found the one trapping record still counts as the plugin working. The poison record is
/// dead-lettered, its poll is committed, and every other record reaches the store. (Read from the
/// local log, which needs no broker.)
#[test]
fn an_isolated_poison_record_is_dead_lettered_and_never_opens_the_breaker() {
    let dir = std::env::temp_dir().join(format!("sluice-poison-breaker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = sluice::log::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::log::LogConfig::default()).unwrap();
    let writer = Writer::Local(log.writer(Arc::new(sluice::kafka::producer::ProducerStats::default())).unwrap());
    let symbols = Arc::new(Symbols::new());
    let mut records = Records::new();
    for i in POISON - 50..POISON + 50 {
        records.push(&trade(i, &symbols));
    }
    writer.send_records(records.as_bytes());
    writer.flush(Duration::from_secs(10)).unwrap();

    let rt = Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("chaos", &wasm, Limits::default()).unwrap();
    let poison = [("trap_on_trade_id".to_owned(), POISON.to_string())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &poison).unwrap())])]);
    let reader = Reader::Local(log.reader().unwrap(), log.clone());
    let store_path = dir.join("store.sqlite");
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings {
        partitions: 1,
        breaker: BreakerConfig { failure_threshold: 1, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut breakers = Breakers::default();
            run_process(
                Process {
                    reader: &reader,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) < 99
            && start.elapsed() < Duration::from_secs(20)
            && !runner.is_finished()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap()
    });
    assert!(result.is_ok(), "the process role stopped: {:?}", result.err());
    assert_eq!(stats.stored.load(Ordering::Relaxed), 99);
    assert_eq!(
        store.offsets(sluice::log::local::POSITION_TOPIC).unwrap(),
        vec![(sluice::log::local::POSITION_TOPIC.to_owned(), 0, 100)]
    );
    let dead = store_dead_letters(&store_path);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(StreamDataView::parse(&dead[0].bytes).unwrap().trade_id, POISON);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record whose symbol id the dictionary does not know is dead-lettered with the reason, never
/// rolled up under an empty symbol, and the miss is not remembered: a later record of a symbol
/// named meanwhile rolls up under its name.
#[test]
fn a_record_of_an_unknown_symbol_is_dead_lettered_not_rolled_up_nameless() {
    let dir = std::env::temp_dir().join(format!("sluice-unknown-symbol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = sluice::log::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::log::LogConfig::default()).unwrap();
    let writer = Writer::Local(log.writer(Arc::new(sluice::kafka::producer::ProducerStats::default())).unwrap());
    let symbols = Arc::new(Symbols::new());
    let known = symbols.intern("BTCUSDT");
    let mut records = Records::new();
    for (i, symbol_id) in [(1, known), (2, 999), (3, known)] {
        records.push(&Record { symbol_id, ..trade(i, &symbols) });
    }
    writer.send_records(records.as_bytes());
    writer.flush(Duration::from_secs(10)).unwrap();
    let rt = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("chaos", &wasm, Limits::default()).unwrap();
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &[]).unwrap())])]);
    let reader = Reader::Local(log.reader().unwrap(), log.clone());
    let store_path = dir.join("store.sqlite");
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 1, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut breakers = Breakers::default();
            run_process(
                Process {
                    reader: &reader,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed) < 3
            && start.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
    });
    writer.flush(Duration::from_secs(10)).unwrap();
    let q = QueryConnection::open(&store_path).unwrap();
    let rows = q.query("SELECT symbol, sum(events) AS n FROM rollup GROUP BY symbol", 10).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0]["symbol"].as_str(), rows[0]["n"].as_i64()), (Some("BTCUSDT"), Some(2)));
    let letters = rusqlite::Connection::open(&store_path).unwrap();
    let (reason, bytes): (String, Vec<u8>) = letters
        .query_row("SELECT reason, bytes FROM dead_letters WHERE stage = 'transform'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(reason.contains("symbol id 999"), "{reason}");
    assert_eq!(StreamDataView::parse(&bytes).unwrap().trade_id, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded store reads every partition the events topic really has, not `[kafka] partitions`
/// of them, and a topic with fewer partitions than configured is an error naming both numbers.
#[test]
fn the_store_reads_every_partition_of_the_topic_whatever_the_config_says() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("partitions");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    // Created with 4 partitions; the process role is told 2.
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 4)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    let mut records = Records::new();
    for i in 1..=400u64 {
        // Many symbols, so every partition gets records.
        records.push(&Record { symbol_id: symbols.intern(&format!("S{}", i % 40)), ..trade(i, &symbols) });
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();
    let rt_plugins = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt_plugins.compile("chaos", &wasm, Limits::default()).unwrap();
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &[]).unwrap())])]);
    let store_path = std::env::temp_dir().join(format!("sluice-partitions-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 2, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None).unwrap());
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut breakers = Breakers::default();
            run_process(
                Process {
                    reader: &consumer,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) < 400 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
    });
    assert_eq!(stats.stored.load(Ordering::Relaxed), 400);
    let partitions: Vec<i32> = store.offsets(&kafka.events_topic).unwrap().iter().map(|o| o.1).collect();
    assert_eq!(partitions, vec![0, 1, 2, 3]);
    // Told 8, the topic has 4: refused with both numbers.
    let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None).unwrap());
    let err = sluice::sink::Sink::attach(&mut store, &consumer, 8).unwrap_err().to_string();
    assert!(err.contains('4') && err.contains('8') && err.contains(&kafka.events_topic), "{err}");
    // Creating the topics for a start told 8 refuses the existing topic the same way.
    let err = rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic], 8)).unwrap_err().to_string();
    assert!(err.contains("4 partitions") && err.contains("is 8"), "{err}");
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic], 4)).unwrap();
    let _ = std::fs::remove_file(&store_path);
}

/// Partitions added to the events topic while the store reads it are read too, from their start:
/// the consumer looks at the topic's metadata again (every 30 s; every 200 ms here).
#[test]
fn partitions_added_while_running_are_read_from_their_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("new-partitions");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &[&kafka.events_topic, &kafka.dlq_topic], 2)).unwrap();
    let symbols = Arc::new(Symbols::new());
    // Each record to the partition named.
    let producer: BaseProducer = kafka.client_config(&broker.bootstrap).create().unwrap();
    let send = |from: u64, to: u64, partitions: i32| {
        for i in from..to {
            let mut records = Records::new();
            records.push(&trade(i, &symbols));
            // One record per Kafka message, unframed, as the ingest role sends them.
            let record = plugin_sdk::wire::Delimited::new(records.as_bytes()).next().unwrap().unwrap();
            let partition = (i % partitions as u64) as i32;
            producer
                .send(BaseRecord::<(), [u8]>::to(&kafka.events_topic).partition(partition).payload(record))
                .unwrap();
        }
        producer.flush(Duration::from_secs(20)).unwrap();
    };
    send(1, 101, 2);
    let rt_plugins = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt_plugins.compile("chaos", &wasm, Limits::default()).unwrap();
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &[]).unwrap())])]);
    let store_path = std::env::temp_dir().join(format!("sluice-new-partitions-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 2, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let consumer = Reader::Kafka(
        EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None)
            .unwrap()
            .with_partition_check(Duration::from_millis(200)),
    );
    let wait_stored = |n: u64| {
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) < n && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stats.stored.load(Ordering::Relaxed)
    };
    let (before, added, after) = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut breakers = Breakers::default();
            run_process(
                Process {
                    reader: &consumer,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let before = wait_stored(100);
        // Two more partitions, and records in all four.
        let admin: AdminClient<_> = kafka.client_config(&broker.bootstrap).create().unwrap();
        let added = rt
            .block_on(admin.create_partitions(&[NewPartitions::new(&kafka.events_topic, 4)], &AdminOptions::new()))
            .map(|results| results.into_iter().all(|r| r.is_ok()));
        // The test's producer learns of them from the metadata.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let metadata = producer.client().fetch_metadata(Some(&kafka.events_topic), Duration::from_secs(5));
            if metadata.is_ok_and(|m| m.topics().first().is_some_and(|t| t.partitions().len() == 4)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        send(101, 301, 4);
        let after = wait_stored(300);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
        (before, added, after)
    });
    assert_eq!(before, 100);
    assert!(matches!(added, Ok(true)), "adding partitions: {added:?}");
    assert_eq!(after, 300, "records in the added partitions were not all stored");
    assert_eq!(stats.stored.load(Ordering::Relaxed), 300);
    // The store's positions cover the new partitions: 50 records each (ids 101..301 over four).
    let offsets: Vec<(i32, i64)> = store.offsets(&kafka.events_topic).unwrap().iter().map(|o| (o.1, o.2)).collect();
    assert_eq!(offsets.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0, 1, 2, 3], "{offsets:?}");
    assert_eq!(offsets[2].1, 50, "{offsets:?}");
    assert_eq!(offsets[3].1, 50, "{offsets:?}");
    let _ = std::fs::remove_file(&store_path);
}

/// A dead letter is written once however often its poll is read again without a crash: here the
/// sink's commit fails once (a trigger refuses the offsets), the role stops, and a second run reads
/// the same records again. The poison record's dead letter exists once (wherever dead letters are
/// kept: the store's table, or the local log's).
#[test]
fn a_failed_commit_does_not_dead_letter_a_record_twice() {
    let dir = std::env::temp_dir().join(format!("sluice-dlq-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log_path = dir.join("log.sqlite");
    let log = sluice::log::local::LocalLog::open(&log_path, &sluice::log::LogConfig::default()).unwrap();
    let writer = Writer::Local(log.writer(Arc::new(sluice::kafka::producer::ProducerStats::default())).unwrap());
    let symbols = Arc::new(Symbols::new());
    let mut records = Records::new();
    for i in POISON - 5..POISON + 5 {
        records.push(&trade(i, &symbols));
    }
    writer.send_records(records.as_bytes());
    writer.flush(Duration::from_secs(10)).unwrap();
    let rt = Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("chaos", &wasm, Limits::default()).unwrap();
    let poison = [("trap_on_trade_id".to_owned(), POISON.to_string())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &poison).unwrap())])]);
    let store_path = dir.join("store.sqlite");
    let mut store = EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap();
    let admin = rusqlite::Connection::open(&store_path).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON consumer_offsets BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
        )
        .unwrap();
    let names = Names { sources: HashMap::from([(1, Arc::from("binance"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 1, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let mut breakers = Breakers::default();
    let reader = Reader::Local(log.reader().unwrap(), log.clone());
    let failed = run_process(
        Process {
            reader: &reader,
            chains: &mut transformers,
            breakers: &mut breakers,
            sink: &mut store,
            names: &names,
            settings: &settings,
            stats: &stats,
        },
        &stop,
    );
    assert!(failed.unwrap_err().to_string().contains("disk says no"));
    admin.execute_batch("DROP TRIGGER refuse").unwrap();
    // Started again from the last commit (none): the same records, the same poison.
    let reader = Reader::Local(log.reader().unwrap(), log.clone());
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            run_process(
                Process {
                    reader: &reader,
                    chains: &mut transformers,
                    breakers: &mut breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while store_dead_letters(&store_path).is_empty() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
    });
    writer.flush(Duration::from_secs(10)).unwrap();
    let in_log: i64 = rusqlite::Connection::open(&log_path)
        .unwrap()
        .query_row("SELECT count(*) FROM dead_letters WHERE stage = 'transform'", [], |r| r.get(0))
        .unwrap();
    let in_store = store_dead_letters(&store_path).len() as i64;
    assert_eq!(in_log + in_store, 1, "{in_log} in the log, {in_store} in the store");
    let q = QueryConnection::open(&store_path).unwrap();
    assert_eq!(q.query("SELECT sum(events) AS n FROM rollup", 1).unwrap()[0]["n"], 9);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `batches` written to a new local log, one log batch each; the process role over them with `transformers`
/// until it has handled `want` (stored or refused) or stopped with an error.
fn run_local(
    dir: &std::path::Path,
    batches: &[Records],
    symbols: &Arc<Symbols>,
    transformers: &mut HashMap<u32, Chain>,
    breakers: &mut Breakers,
    settings: ProcessSettings,
    want: u64,
) -> (Result<(), anyhow::Error>, ProcessStats) {
    let log = sluice::log::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::log::LogConfig::default()).unwrap();
    let writer = Writer::Local(log.writer(Arc::new(sluice::kafka::producer::ProducerStats::default())).unwrap());
    for records in batches {
        writer.send_records(records.as_bytes());
        writer.flush(Duration::from_secs(10)).unwrap();
    }
    let reader = Reader::Local(log.reader().unwrap(), log.clone());
    let mut store = EmbeddedStore::open(&dir.join("store.sqlite"), Duration::from_secs(60)).unwrap();
    let names = Names {
        sources: HashMap::from([(1, Arc::from("chained")), (2, Arc::from("plain"))]),
        symbols: symbols.clone(),
    };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            run_process(
                Process {
                    reader: &reader,
                    chains: transformers,
                    breakers,
                    sink: &mut store,
                    names: &names,
                    settings: &settings,
                    stats: &stats,
                },
                &stop,
            )
        });
        let start = Instant::now();
        while stats.stored.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed) < want
            && start.elapsed() < Duration::from_secs(20)
            && !runner.is_finished()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap()
    });
    (result, stats)
}

/// A source's chain runs link by link on the whole batch: `rescale` (drops trades under 0.03 and
/// doubles prices), then `chaos` (traps on one poison trade id). The poison record is dead-lettered
/// alone, naming the second link and its version, with the bytes that link was given (the price
/// already doubled); what the chain kept is stored with the doubled prices. A source with an empty
/// chain stores its records as they were written, and no link runs for it.
#[test]
fn each_link_of_a_chain_runs_in_order_and_a_reject_names_its_link() {
    let dir = common::fresh_dir("chain");
    let symbols = Arc::new(Symbols::new());
    let mut records = Records::new();
    for i in 1..=600u64 {
        records.push(&Record { source_id: if i % 2 == 0 { 1 } else { 2 }, ..trade(i, &symbols) });
    }
    let rt = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let load = |file: &str, name: &str| {
        let wasm = std::fs::read(format!("{}/{file}", env!("SLUICE_PLUGIN_DIR"))).unwrap();
        (rt.compile(name, &wasm, Limits::default()).unwrap(), sluice::plugin::version_of(&wasm))
    };
    let (rescale, _) = load("rescale.wasm", "rescale");
    let (chaos, chaos_version) = load("chaos.wasm", "chaos");
    let config = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    // An even trade id with a volume of at least 0.03, so it reaches the second link.
    let poison = (1..=600u64).find(|&i| i % 2 == 0 && trade(i, &symbols).volume_e8 >= 3_000_000).unwrap();
    let mut transformers = chains([
        (
            1u32,
            vec![
                Transformer::new(
                    PluginInstance::new(&rescale, &config(&[("min_volume", "0.03"), ("scale", "2")])).unwrap(),
                ),
                Transformer::new(
                    PluginInstance::new(&chaos, &config(&[("trap_on_trade_id", &poison.to_string())])).unwrap(),
                ),
            ],
        ),
        (2u32, vec![]),
    ]);
    let kept: Vec<Record> =
        (2..=600u64).step_by(2).map(|i| trade(i, &symbols)).filter(|t| t.volume_e8 >= 3_000_000).collect();
    let plain = 300u64;
    let settings = ProcessSettings { partitions: 1, ..ProcessSettings::default() };
    let want = kept.len() as u64 + plain;
    let (result, stats) =
        run_local(&dir, &[records], &symbols, &mut transformers, &mut Breakers::default(), settings, want);
    result.unwrap();
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);

    let q = QueryConnection::open(&dir.join("store.sqlite")).unwrap();
    let rows = q
        .query("SELECT source, sum(events) AS n, max(price_max) AS p FROM rollup GROUP BY source ORDER BY source", 10)
        .unwrap();
    let got: Vec<(String, i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap().to_owned(),
                r["n"].as_i64().unwrap(),
                r["p"].as_f64().unwrap_or_else(|| panic!("{r:?}")),
            )
        })
        .collect();
    let max_price = |ts: &mut dyn Iterator<Item = Record>| ts.map(|t| t.price_e8).max().unwrap() as f64 / 1e8;
    let chained_max = max_price(&mut kept.iter().copied().filter(|t| t.trade_id != poison)) * 2.0;
    let plain_max = max_price(&mut (1..=600u64).step_by(2).map(|i| trade(i, &symbols)));
    assert_eq!(
        got,
        vec![("chained".to_owned(), kept.len() as i64 - 1, chained_max), ("plain".to_owned(), plain as i64, plain_max)]
    );
    let dead = store_dead_letters(&dir.join("store.sqlite"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].source.as_str(), dead[0].plugin.clone()), ("chained", format!("chaos@{chaos_version}")));
    let refused = StreamDataView::parse(&dead[0].bytes).unwrap();
    assert_eq!((refused.trade_id, refused.price_e8), (poison, trade(poison, &symbols).price_e8 * 2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A link that fails on every batch opens its own breaker, not its source's other links': the role
/// stops with the link's plugin named, and only that (source, link) is open.
#[test]
fn a_failing_link_opens_its_own_breaker() {
    let dir = common::fresh_dir("chain-breaker");
    let symbols = Arc::new(Symbols::new());
    let batches: Vec<Records> = (0..5u64)
        .map(|b| {
            let mut records = Records::new();
            for i in b * 10 + 1..=b * 10 + 10 {
                records.push(&trade(i, &symbols));
            }
            records
        })
        .collect();
    let rt = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let load = |file: &str, name: &str| {
        let wasm = std::fs::read(format!("{}/{file}", env!("SLUICE_PLUGIN_DIR"))).unwrap();
        rt.compile(name, &wasm, Limits::default()).unwrap()
    };
    let trap = [("mode".to_owned(), "trap".to_owned())];
    let mut transformers = chains([(
        1u32,
        vec![
            Transformer::new(PluginInstance::new(&load("rescale.wasm", "rescale"), &[]).unwrap()),
            Transformer::new(PluginInstance::new(&load("chaos.wasm", "chaos"), &trap).unwrap()),
        ],
    )]);
    let mut breakers = Breakers::default();
    // Polls of 10 records; the first failing poll is bisected and dead-lettered, the second trips.
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 10,
        breaker: BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let (result, stats) = run_local(&dir, &batches, &symbols, &mut transformers, &mut breakers, settings, 50);
    let err = result.expect_err("the breaker stops the role");
    match err.downcast_ref::<ProcessError>() {
        Some(ProcessError::BreakerOpen { source_name, plugin }) => {
            assert_eq!((source_name.as_str(), plugin.as_str()), ("chained", "chaos"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(breakers.open_links(), vec![(1, 1)]);
    // What `sluice_process_breaker_open` shows: that link open, by source and plugin name.
    assert_eq!(stats.sample().breakers, vec![("chained".to_owned(), "chaos".to_owned(), true)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every row names the source whose chain made it, whatever source id a link writes into its output
/// records. Source 1 (`chained`) runs `chaos` rewriting every record's source id to 2, source 2
/// (`plain`) runs `chaos` rewriting it to 0 (no source): every record of each is rolled up under its
/// own source, none under the other or under an empty name.
#[test]
fn every_row_names_the_source_whose_chain_made_it() {
    let dir = common::fresh_dir("chain-source");
    let symbols = Arc::new(Symbols::new());
    let mut records = Records::new();
    // 200 records of source 1, 100 of source 2.
    for i in 1..=300u64 {
        records.push(&Record { source_id: if i % 3 == 0 { 2 } else { 1 }, ..trade(i, &symbols) });
    }
    let rt = Runtime::new(RuntimeSettings::default(), symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let chaos = rt.compile("chaos", &wasm, Limits::default()).unwrap();
    let claiming = |id: &str| {
        let config = [("mode".to_owned(), "source".to_owned()), ("source_id".to_owned(), id.to_owned())];
        vec![Transformer::new(PluginInstance::new(&chaos, &config).unwrap())]
    };
    let mut transformers = chains([(1u32, claiming("2")), (2u32, claiming("0"))]);
    let settings = ProcessSettings { partitions: 1, ..ProcessSettings::default() };
    let (result, stats) =
        run_local(&dir, &[records], &symbols, &mut transformers, &mut Breakers::default(), settings, 300);
    result.unwrap();
    assert_eq!(stats.stored.load(Ordering::Relaxed), 300);

    let q = QueryConnection::open(&dir.join("store.sqlite")).unwrap();
    let rows = q.query("SELECT source, sum(events) AS n FROM rollup GROUP BY source ORDER BY source", 10).unwrap();
    let got: Vec<(String, i64)> =
        rows.iter().map(|r| (r["source"].as_str().unwrap().to_owned(), r["n"].as_i64().unwrap())).collect();
    assert_eq!(got, vec![("chained".to_owned(), 200), ("plain".to_owned(), 100)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sink that commits into the store, then reports the commit as failed once: a Druid
/// transaction whose commit timed out while the coordinator committed it.
struct CommitsThenSaysFailed {
    inner: Box<dyn sluice::sink::Sink>,
    fail_once: bool,
}

impl sluice::sink::Sink for CommitsThenSaysFailed {
    fn attach(&mut self, reader: &Reader, partitions: i32) -> anyhow::Result<()> {
        self.inner.attach(reader, partitions)
    }

    fn commit(
        &mut self,
        rows: &[sluice::sink::Row],
        offsets: &[(&str, i32, i64)],
        dead: &[sluice::sink::DeadLetter<'_>],
        state: &[sluice::sink::StateWrite<'_>],
        reader: &Reader,
    ) -> anyhow::Result<()> {
        self.inner.commit(rows, offsets, dead, state, reader)?;
        if std::mem::take(&mut self.fail_once) {
            anyhow::bail!("commit: the transaction coordinator did not answer in time");
        }
        Ok(())
    }

    fn committed_state(
        &mut self,
        source: &str,
        link: u32,
    ) -> anyhow::Result<Option<(String, sluice::sink::embedded::StateEntries)>> {
        self.inner.committed_state(source, link)
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

/// A commit reported as failed that took effect leaves memory a batch behind the position reading
/// resumes from; the role starts again from the state the sink committed
/// ([`sluice::pipeline::restore_committed`]), so a stateful link decides as in an uninterrupted
/// run. `chaos` in `mode = "count"` writes each symbol's running count into the volume: over 20
/// records of a symbol its quantities sum to 1 + 2 + ... + 20 only if no count is lost. Into the
/// embedded store, from the local log.
#[test]
fn after_a_commit_reported_failed_that_took_effect_state_resumes_from_the_store() {
    unsure_commit_scenario(false);
}

/// The same with the Druid sink, from Kafka: the state comes back from the changelog topic the
/// transaction wrote, the position from the consumer group's offsets it committed. (Druid itself is
/// not involved: the sink's contract ends at the Druid topic.)
#[test]
fn after_a_commit_reported_failed_that_took_effect_state_resumes_from_the_changelog() {
    unsure_commit_scenario(true);
}

fn unsure_commit_scenario(druid: bool) {
    let dir = common::fresh_dir(&format!("unsure-commit-{druid}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = druid.then(|| TestBroker::start("unsure-commit"));
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    let druid_config = sluice::sink::druid::DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let log = sluice::log::local::LocalLog::open(&dir.join("log.sqlite"), &sluice::log::LogConfig::default()).unwrap();
    let writer = match &broker {
        Some(b) => {
            let state_topic = druid_config.state_topic();
            let topics: [&str; 4] = [&kafka.events_topic, &kafka.dlq_topic, &druid_config.topic, &state_topic];
            rt.block_on(ensure_topics(&kafka, &b.bootstrap, &topics, 1)).unwrap();
            Writer::Kafka(EventProducer::new(&kafka, &b.bootstrap).unwrap())
        }
        None => Writer::Local(log.writer(Arc::new(sluice::kafka::producer::ProducerStats::default())).unwrap()),
    };
    let symbols = Arc::new(Symbols::new());
    let write = |range: std::ops::Range<u64>| {
        let mut records = Records::new();
        for i in range {
            records.push(&trade(i, &symbols));
        }
        writer.send_records(records.as_bytes());
        writer.flush(Duration::from_secs(10)).unwrap();
    };
    let rt_plugins =
        Runtime::new(RuntimeSettings { max_instances: 8, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt_plugins.compile("chaos", &wasm, Limits::default()).unwrap();
    let count = [("mode".to_owned(), "count".to_owned())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &count).unwrap())])]);
    let store_path = dir.join("store.sqlite");
    let inner: Box<dyn sluice::sink::Sink> = match &broker {
        Some(b) => Box::new(
            sluice::sink::druid::DruidSink::new(
                &kafka,
                &b.bootstrap,
                &druid_config,
                &unique_topic("tx"),
                Duration::from_secs(20),
            )
            .unwrap(),
        ),
        None => Box::new(EmbeddedStore::open(&store_path, Duration::from_secs(60)).unwrap()),
    };
    let mut sink = CommitsThenSaysFailed { inner, fail_once: true };
    let names = Names { sources: HashMap::from([(1, Arc::from("counted"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 1, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let stop = AtomicBool::new(false);
    let mut breakers = Breakers::default();
    // The Druid sink keeps its position in the consumer group: both runs join the same one.
    let group = unique_topic("group");
    let reader = || match &broker {
        Some(b) => Reader::Kafka(EventConsumer::new(&kafka, &b.bootstrap, &group, None).unwrap()),
        None => Reader::Local(log.reader().unwrap(), log.clone()),
    };

    // The first 30 records are committed, and the commit is reported failed.
    write(0..30);
    let first = reader();
    let process = Process {
        reader: &first,
        chains: &mut transformers,
        breakers: &mut breakers,
        sink: &mut sink,
        names: &names,
        settings: &settings,
        stats: &stats,
    };
    let failed = run_process(process, &stop);
    assert!(failed.unwrap_err().to_string().contains("did not answer"));
    drop(first);

    // Started again as the role does after a failure: from the sink's state, then the next 30.
    write(30..60);
    sluice::pipeline::restore_committed(&mut transformers, &mut sink, &names).unwrap();
    let second = reader();
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let process = Process {
                reader: &second,
                chains: &mut transformers,
                breakers: &mut breakers,
                sink: &mut sink,
                names: &names,
                settings: &settings,
                stats: &stats,
            };
            run_process(process, &stop)
        });
        let start = Instant::now();
        // The first 30 were stored by the commit reported failed, so not counted here.
        while stats.stored.load(Ordering::Relaxed) < 30 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap().unwrap();
    });
    // Records and the sum of their quantities (in units of 10^-8) per symbol.
    let mut sums: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    match &broker {
        Some(b) => {
            use prost::Message;
            for payload in committed_payloads(&b.bootstrap, &druid_config.topic) {
                let row = sluice::proto::SinkRow::decode(payload.as_slice()).unwrap();
                let sum = sums.entry(row.symbol).or_default();
                *sum = (sum.0 + 1, sum.1 + (row.qty * 1e8).round() as i64);
            }
        }
        None => {
            let q = QueryConnection::open(&store_path).unwrap();
            for row in q
                .query("SELECT symbol, sum(events) AS n, sum(qty_sum_e8) AS q FROM rollup GROUP BY symbol", 10)
                .unwrap()
            {
                sums.insert(
                    row["symbol"].as_str().unwrap().to_owned(),
                    (row["n"].as_i64().unwrap(), row["q"].as_i64().unwrap()),
                );
            }
        }
    }
    let want: BTreeMap<String, (i64, i64)> = SYMBOLS.iter().map(|s| (s.to_string(), (20, (1..=20).sum()))).collect();
    assert_eq!(sums, want, "each symbol counted 1 to 20, none lost and none twice");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A transform's reject whose reason (2 MiB) is larger than a Kafka message may be fails no Druid
/// transaction (before, every retry of the batch failed the same way, forever): the reason is cut
/// where it leaves the plugin, and the dead letter is committed with its batch.
#[test]
fn with_the_druid_sink_a_reject_reason_too_long_for_a_message_is_cut_and_committed() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = TestBroker::start("druid-long-reason");
    let kafka =
        KafkaConfig { events_topic: unique_topic("events"), dlq_topic: unique_topic("dlq"), ..common::kafka_config() };
    let druid = sluice::sink::druid::DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let state_topic = druid.state_topic();
    let topics = [kafka.events_topic.as_str(), kafka.dlq_topic.as_str(), druid.topic.as_str(), state_topic.as_str()];
    rt.block_on(ensure_topics(&kafka, &broker.bootstrap, &topics, 1)).unwrap();
    let symbols = Arc::new(Symbols::new());
    let producer = Writer::Kafka(EventProducer::new(&kafka, &broker.bootstrap).unwrap());
    let mut records = Records::new();
    for i in 1..=20 {
        records.push(&trade(i, &symbols));
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();
    let runtime =
        Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = runtime.compile("chaos", &wasm, Limits::default()).unwrap();
    let long = [("mode".to_owned(), "long-reason".to_owned())];
    let mut transformers = chains([(1u32, vec![Transformer::new(PluginInstance::new(&code, &long).unwrap())])]);
    let mut sink = sluice::sink::druid::DruidSink::new(
        &kafka,
        &broker.bootstrap,
        &druid,
        &unique_topic("tx"),
        Duration::from_secs(20),
    )
    .unwrap();
    let consumer = Reader::Kafka(EventConsumer::new(&kafka, &broker.bootstrap, &unique_topic("group"), None).unwrap());
    let names = Names { sources: HashMap::from([(1, Arc::from("one"))]), symbols: symbols.clone() };
    let settings = ProcessSettings { partitions: 1, max_poll_records: 100, ..ProcessSettings::default() };
    let stats = ProcessStats::default();
    let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed)
                && stats.rejected.load(Ordering::Relaxed) + stats.stored.load(Ordering::Relaxed) < 20
                && start.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop.store(true, Ordering::Relaxed);
        });
        let result = run_process(
            Process {
                reader: &consumer,
                chains: &mut transformers,
                breakers: &mut Breakers::default(),
                sink: &mut sink,
                names: &names,
                settings: &settings,
                stats: &stats,
            },
            &stop,
        );
        done.store(true, Ordering::Relaxed);
        result
    });
    result.expect("the batch's transaction commits");
    // The first record of each poll is refused (one poll, or a few).
    let rejected = stats.rejected.load(Ordering::Relaxed);
    assert!(rejected >= 1 && rejected + stats.stored.load(Ordering::Relaxed) == 20, "{stats:?}");
    // The first dead letter, committed, with its reason cut and saying how long it was.
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", unique_topic("reader"))
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&kafka.dlq_topic, 0, Offset::Beginning).unwrap();
    reader.assign(&tpl).unwrap();
    let start = Instant::now();
    let reason = loop {
        assert!(start.elapsed() < Duration::from_secs(20), "no dead letter in {}", kafka.dlq_topic);
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            assert_eq!(StreamDataView::parse(m.payload().unwrap()).unwrap().trade_id, 1);
            let headers = m.headers().unwrap();
            let header = headers.iter().find(|h| h.key == "sluice.reason").unwrap();
            break String::from_utf8(header.value.unwrap().to_vec()).unwrap();
        }
    };
    assert!(reason.len() <= 4096, "a reason of {} bytes", reason.len());
    assert!(reason.ends_with(&format!("[reason cut: {} bytes]", 2 << 20)), "{}", &reason[reason.len() - 40..]);
}
