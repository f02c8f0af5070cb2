//! The shared symbol dictionary on a real Kafka-protocol broker: instances that never talk to each
//! other give every name the same id, whoever wrote it first, including names they race to add.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestBroker, unique_topic};
use sluice::kafka::{KafkaConfig, ensure_symbols_topic};
use sluice::symbols::Symbols;

#[test]
fn instances_agree_on_every_id_without_coordinating() {
    let broker = TestBroker::start("symbols");
    let kafka = KafkaConfig { symbols_topic: unique_topic("symbols"), ..KafkaConfig::default() };
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
