//! The Kafka clients against a real Kafka-protocol broker (noida-db, external in CI or embedded): the
//! ingest producer (records arrive keyed by source and symbol, one symbol's records in one partition
//! in order, and dead letters carry their source, plugin and reason as headers with the original
//! bytes), the topics sluice creates, and the process role's consumer (its lag, and records
//! retention deleted before it read them).

use crate::common;

use std::time::Duration;

use common::{TestBroker, read_topic, unique_topic};
use plugin_sdk::{Record, Records, StreamDataView};
use sluice::handoff::{DeadLetter, Stage};
use sluice::kafka::producer::EventProducer;
use sluice::kafka::record_key;
use sluice::kafka::{KafkaConfig, ensure_topics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_dead_letters_reach_the_broker() {
    let broker = TestBroker::start("producer");
    let config = KafkaConfig {
        events_topic: unique_topic("events"),
        dlq_topic: unique_topic("dlq"),
        partitions: 3,
        ..common::kafka_config()
    };
    ensure_topics(&config, &broker.bootstrap, &[&config.events_topic, &config.dlq_topic], 3).await.unwrap();
    // Creating an existing topic again is fine.
    ensure_topics(&config, &broker.bootstrap, &[&config.events_topic], 3).await.unwrap();

    let producer = EventProducer::new(&config, &broker.bootstrap).unwrap();
    let mut records = Records::new();
    for i in 1..=300u64 {
        records.push(&Record {
            source_id: 1,
            symbol_id: 1 + (i % 3) as u32,
            trade_id: i,
            price_e8: 5,
            ..Record::default()
        });
    }
    assert_eq!(producer.send_records(records.as_bytes()), 300);
    producer.send_dead_letter(&DeadLetter {
        stage: Stage::Decode,
        source_id: 1,
        source: "binance-main",
        plugin: "binance",
        reason: "frame: invalid JSON",
        bytes: b"{not json",
    });
    producer.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(producer.stats().delivered.load(std::sync::atomic::Ordering::Relaxed), 301);

    let read = read_topic(&broker.bootstrap, &config.events_topic, 3, 300, Duration::from_secs(20));
    assert_eq!(read.len(), 300);
    let mut partition_of = std::collections::HashMap::new();
    let mut last_id = std::collections::HashMap::new();
    for m in &read {
        let r = StreamDataView::parse(&m.payload).unwrap();
        assert_eq!(m.key, record_key(r.source_id, r.symbol_id));
        // A symbol stays in one partition, and its ids arrive in order.
        assert_eq!(*partition_of.entry(r.symbol_id).or_insert(m.partition), m.partition);
        let last = last_id.entry(r.symbol_id).or_insert(0);
        assert!(r.trade_id > *last);
        *last = r.trade_id;
    }
    let dlq = read_topic(&broker.bootstrap, &config.dlq_topic, 3, 1, Duration::from_secs(20));
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, b"{not json");
    let header = |k: &str| dlq[0].headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    assert_eq!(header("sluice.source").as_deref(), Some("binance-main"));
    assert_eq!(header("sluice.plugin").as_deref(), Some("binance"));
    assert_eq!(header("sluice.reason").as_deref(), Some("frame: invalid JSON"));
}

/// A dead letter larger than a Kafka message may be (a frame cut to `max_frame_bytes`, 1 MiB, with a
/// reason of 1.5 MiB) still reaches the dead-letter topic (before, the client refused it and the very
/// frames an operator needs to see were missing): its payload cut to 512 KiB with the original length
/// in `sluice.length`, its reason to 4 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_a_message_is_cut_and_keeps_its_length() {
    let broker = TestBroker::start("producer-large-dead");
    let config = KafkaConfig { dlq_topic: unique_topic("dlq"), partitions: 1, ..common::kafka_config() };
    ensure_topics(&config, &broker.bootstrap, &[&config.dlq_topic], 1).await.unwrap();
    let producer = EventProducer::new(&config, &broker.bootstrap).unwrap();
    let frame: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let reason = "frame of 3000000 bytes exceeds max_frame_bytes; ".repeat(32_000);
    producer.send_dead_letter(&DeadLetter {
        stage: Stage::Decode,
        source_id: 7,
        source: "binance-main",
        plugin: "binance",
        reason: &reason,
        bytes: &frame,
    });
    producer.flush(Duration::from_secs(20)).unwrap();
    let stats = producer.stats();
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 0, "the dead letter was refused");
    let dlq = read_topic(&broker.bootstrap, &config.dlq_topic, 1, 1, Duration::from_secs(20));
    assert_eq!(dlq.len(), 1, "the dead letter is missing from the topic");
    assert_eq!(dlq[0].payload, frame[..512 << 10]);
    let header = |k: &str| dlq[0].headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(header("sluice.length"), (1 << 20).to_string());
    let kept = header("sluice.reason");
    assert!(kept.len() <= 4096 && reason.starts_with(&kept), "a reason of {} bytes", kept.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_codecs_work_and_bad_options_are_refused_by_name() {
    let broker = TestBroker::start("producer-options");
    for codec in ["zstd", "lz4", "gzip", "snappy", "none"] {
        let config =
            KafkaConfig { events_topic: unique_topic(codec), compression: codec.into(), ..common::kafka_config() };
        ensure_topics(&config, &broker.bootstrap, &[&config.events_topic], 1).await.unwrap();
        let producer = EventProducer::new(&config, &broker.bootstrap).unwrap_or_else(|e| panic!("{codec}: {e}"));
        let mut records = Records::new();
        records.push(&Record { source_id: 1, symbol_id: 1, trade_id: 7, ..Record::default() });
        producer.send_records(records.as_bytes());
        producer.flush(Duration::from_secs(20)).unwrap();
        let read = read_topic(&broker.bootstrap, &config.events_topic, 1, 1, Duration::from_secs(20));
        assert_eq!(StreamDataView::parse(&read[0].payload).unwrap().trade_id, 7, "{codec}");
    }
    let mut config = common::kafka_config();
    config.options.insert("no.such.property".into(), "1".into());
    let err = EventProducer::new(&config, &broker.bootstrap).err().expect("refused");
    assert!(err.to_string().contains("no.such.property"), "{err}");
}

/// The process role's consumer reports its lag from librdkafka's statistics: the records of its
/// partitions it has not read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_reports_how_many_records_it_has_not_read() {
    let broker = TestBroker::start("lag");
    let mut config = KafkaConfig { events_topic: unique_topic("events"), partitions: 1, ..common::kafka_config() };
    config.options.insert("statistics.interval.ms".into(), "100".into());
    ensure_topics(&config, &broker.bootstrap, &[&config.events_topic], 1).await.unwrap();
    let producer = EventProducer::new(&config, &broker.bootstrap).unwrap();
    let mut records = Records::new();
    for i in 1..=200u64 {
        records.push(&Record { source_id: 1, symbol_id: 1, trade_id: i, ..Record::default() });
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();

    let consumer = sluice::kafka::consumer::EventConsumer::new(&config, &broker.bootstrap, "lag", None).unwrap();
    consumer.assign(1, &[]).unwrap();
    let mut polled = sluice::handoff::Polled::default();
    let start = std::time::Instant::now();
    while polled.positions.len() < 50 && start.elapsed() < Duration::from_secs(20) {
        // `max` bounds the batch's total size: the batch grows to 50.
        consumer.poll_into(&mut polled, 50, Duration::from_millis(100)).unwrap();
    }
    assert_eq!(polled.positions.len(), 50);
    // librdkafka prefetches, but what it has handed the application is what counts: 150 left. The
    // statistics made meanwhile are delivered from inside the next poll (which takes one record).
    std::thread::sleep(Duration::from_millis(400));
    consumer.poll_into(&mut polled, 51, Duration::from_secs(5)).unwrap();
    assert!((149..=150).contains(&consumer.lag()), "lag {}", consumer.lag());
    while polled.positions.len() < 200 && start.elapsed() < Duration::from_secs(20) {
        consumer.poll_into(&mut polled, 200, Duration::from_millis(100)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    consumer.poll_into(&mut polled, 201, Duration::from_millis(200)).unwrap();
    assert_eq!((polled.positions.len(), consumer.lag()), (200, 0));
}

/// Topics are created with `[kafka] replication_factor` and `min_insync_replicas`, and a cluster with
/// fewer brokers than the factor (the test broker is one) is refused with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_get_the_configured_replication_and_a_small_cluster_is_refused() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let broker = TestBroker::start("replication");
    // The defaults are a real cluster's: 3 replicas, 2 in sync.
    let config = KafkaConfig { events_topic: unique_topic("events"), ..KafkaConfig::default() };
    let err = ensure_topics(&config, &broker.bootstrap, &[&config.events_topic], 1).await.unwrap_err().to_string();
    assert!(err.contains("1 broker(s)") && err.contains("replication_factor is 3"), "{err}");
    let err = sluice::kafka::ensure_symbols_topic(&config, &broker.bootstrap).await.unwrap_err().to_string();
    assert!(err.contains("replication_factor is 3"), "{err}");

    // One replica, and a min.insync.replicas the broker keeps with the topic.
    let config = KafkaConfig { min_insync_replicas: 2, ..common::kafka_config() };
    let topic = unique_topic("events");
    ensure_topics(&config, &broker.bootstrap, &[&topic], 1).await.unwrap();
    let admin: AdminClient<_> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    let described = admin.describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new()).await.unwrap();
    let entries = &described[0].as_ref().unwrap().entries;
    let min_insync = entries.iter().find(|e| e.name == "min.insync.replicas").and_then(|e| e.value.clone());
    assert_eq!(min_insync.as_deref(), Some("2"), "{entries:?}");
}

/// Records retention deleted before the process role's consumer read them stop the read, whether
/// its position was stored (the embedded store assigns it) or is the group's committed offset (the
/// Druid sink's group): never a silent jump to the partition's start. `--skip-deleted-records`
/// moves a stored position to the start. A partition the group has committed nothing for is read
/// from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_read_stop_the_consumer() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    use sluice::handoff::LogError;
    use sluice::handoff::Polled;
    use sluice::kafka::consumer::EventConsumer;

    let broker = TestBroker::start("deleted");
    let config = KafkaConfig { events_topic: unique_topic("events"), partitions: 1, ..common::kafka_config() };
    let topic = config.events_topic.clone();
    ensure_topics(&config, &broker.bootstrap, &[&topic], 1).await.unwrap();
    let producer = EventProducer::new(&config, &broker.bootstrap).unwrap();
    let mut records = Records::new();
    for i in 1..=10u64 {
        records.push(&Record { source_id: 1, symbol_id: 1, trade_id: i, ..Record::default() });
    }
    producer.send_records(records.as_bytes());
    producer.flush(Duration::from_secs(20)).unwrap();
    // A group that never committed reads from the start.
    let group = unique_topic("group");
    let consumer = EventConsumer::new(&config, &broker.bootstrap, &group, None).unwrap();
    consumer.subscribe().unwrap();
    let read = |consumer: &EventConsumer, want: usize| {
        let mut polled = Polled::default();
        let start = std::time::Instant::now();
        while polled.positions.len() < want && start.elapsed() < Duration::from_secs(20) {
            consumer.poll_into(&mut polled, want, Duration::from_millis(100))?;
        }
        Ok::<_, LogError>(polled.positions)
    };
    assert_eq!(read(&consumer, 10).unwrap().first(), Some(&(0, 0)));
    drop(consumer);

    // Retention deletes the first five records.
    let admin: AdminClient<_> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    let mut cut = TopicPartitionList::new();
    cut.add_partition_offset(&topic, 0, Offset::Offset(5)).unwrap();
    admin.delete_records(&cut, &AdminOptions::new()).await.unwrap();
    let stored = [(topic.clone(), 0, 2)];
    let deleted = |e: LogError| -> Vec<(i32, i64, i64)> {
        match e {
            LogError::RecordsDeleted { deleted, .. } => {
                deleted.iter().map(|d| (d.partition, d.position, d.start)).collect()
            }
            other => panic!("{other}"),
        }
    };

    // A stored position retention overtook is refused at assignment, naming the way on ...
    let consumer = EventConsumer::new(&config, &broker.bootstrap, &unique_topic("g"), None).unwrap();
    let err = consumer.assign_checked(1, &stored).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("deleted 3 records") && message.contains("--skip-deleted-records"), "{message}");
    assert_eq!(deleted(err), vec![(0, 2, 5)]);
    // ... and while reading: the fetch finds it gone, and the read stops.
    consumer.assign(1, &stored).unwrap();
    let err = read(&consumer, 8).unwrap_err();
    assert!(err.to_string().contains("--skip-deleted-records"), "{err}");
    assert_eq!(deleted(err), vec![(0, 2, 5)]);
    drop(consumer);

    // The group's committed offset likewise.
    let committer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(&topic, 0, Offset::Offset(2)).unwrap();
    committer.commit(&at, CommitMode::Sync).unwrap();
    drop(committer);
    let consumer = EventConsumer::new(&config, &broker.bootstrap, &group, None).unwrap();
    consumer.subscribe().unwrap();
    let err = read(&consumer, 8).unwrap_err();
    assert!(err.to_string().contains("--reset-offsets --to-earliest"), "{err}");
    assert_eq!(deleted(err), vec![(0, 2, 5)]);
    drop(consumer);

    // Told to skip them, a stored position goes on from the partition's start.
    let skip = KafkaConfig { skip_deleted_records: true, ..config.clone() };
    let consumer = EventConsumer::new(&skip, &broker.bootstrap, &unique_topic("g"), None).unwrap();
    consumer.assign_checked(1, &stored).unwrap();
    let positions = read(&consumer, 5).unwrap();
    assert_eq!(positions.iter().map(|p| p.1).collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
}
