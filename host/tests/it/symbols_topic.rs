//! The shared symbol dictionary on a real Kafka-protocol broker: instances that never talk to each
//! other give every name the same id, whoever wrote it first, including names they race to add.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestBroker, unique_topic};
use sluice::kafka::{KafkaConfig, ensure_symbols_topic};
use sluice::symbols::Symbols;

#[test]
fn instances_agree_on_every_id_without_coordinating() {
    let broker = TestBroker::start("symbols");
    let kafka = KafkaConfig { symbols_topic: unique_topic("symbols"), ..common::kafka_config() };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(ensure_symbols_topic(&kafka, &broker.bootstrap)).unwrap();
    let open =
        || Arc::new(Symbols::shared(&kafka, &broker.bootstrap, &kafka.symbols_topic, Duration::from_secs(20)).unwrap());

    let a = open();
    let b = open();
    let btc = a.intern("BTCUSDT");
    assert_ne!(btc, 0);
    // B learns A's id from the topic, both by name and by id.
    assert_eq!(b.intern("BTCUSDT"), btc);
    let eth = a.intern("ETH-USD");
    assert_eq!(b.name(eth).as_deref(), Some("ETH-USD"));

    // Both race to add the same new names from several threads: one id each, the same everywhere.
    let names: Vec<String> = (0..20).map(|i| format!("SYM{i}/USD")).collect();
    let ids: Vec<Vec<u32>> = std::thread::scope(|s| {
        let workers: Vec<_> = [&a, &b, &a, &b]
            .into_iter()
            .enumerate()
            .map(|(k, d)| {
                let names = &names;
                s.spawn(move || {
                    // Different orders, so the writers really interleave.
                    let mut order: Vec<usize> = (0..names.len()).collect();
                    if k % 2 == 1 {
                        order.reverse();
                    }
                    let mut ids = vec![0; names.len()];
                    for i in order {
                        ids[i] = d.intern(&names[i]);
                    }
                    ids
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for other in &ids[1..] {
        assert_eq!(other, &ids[0]);
    }
    let mut distinct = ids[0].clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), names.len(), "two names share an id: {:?}", ids[0]);
    assert!(!distinct.contains(&0));

    // A late instance (a restart) reads every id there is.
    let c = open();
    for (name, id) in names.iter().zip(&ids[0]) {
        assert_eq!(c.name(*id).as_deref(), Some(name.as_str()));
        assert_eq!(c.intern(name), *id);
    }
    assert_eq!(c.intern("BTCUSDT"), btc);
}

/// A decode worker waits while a new name goes into the dictionary, and its sources' queues fill
/// meanwhile: at start-up every symbol is new. Naming one must cost about a broker round trip, not a
/// client's polling interval (it took 100 ms each, which dropped ~25,000 frames in the first second
/// at 100,000 trades/s).
#[test]
fn a_new_name_costs_a_round_trip_not_a_polling_interval() {
    let broker = TestBroker::start("symbols-fast");
    let kafka = KafkaConfig { symbols_topic: unique_topic("symbols-fast"), ..common::kafka_config() };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(ensure_symbols_topic(&kafka, &broker.bootstrap)).unwrap();
    let symbols = Symbols::shared(&kafka, &broker.bootstrap, &kafka.symbols_topic, Duration::from_secs(20)).unwrap();
    // The first write also sets up the idempotent producer.
    assert_ne!(symbols.intern("WARMUP"), 0);
    let mut took: Vec<Duration> = (0..9)
        .map(|i| {
            let started = Instant::now();
            assert_ne!(symbols.intern(&format!("NEW{i}USDT")), 0);
            started.elapsed()
        })
        .collect();
    took.sort();
    let median = took[took.len() / 2];
    assert!(median < Duration::from_millis(40), "naming a new symbol took {median:?} (median; all: {took:?})");
}
