//! The process role against a real Kafka-protocol broker: records in `sluice.events` go through a
//! real wasm plugin (`chaos`, trapping on one poison trade id) into the embedded SQLite store. The
//! rolled-up counts and quantity sums equal those computed independently from the records sent, the
//! poison record alone lands in the dead-letter topic, and a restarted process resumes from the
//! offsets stored with the rows without counting anything twice.
//!
//! The role runs in the test process, on the rig of `common::role` (the hand-off, the dictionary,
//! the plugin runtime, the role's parts and when it stops).

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::role::{Role, RoleRig, chains, plugin_wasm, process, run_until};
use common::unique_topic;
use plugin_sdk::{Record, Records, StreamDataView};
use sluice::batch::BatchConfig;
use sluice::breaker::BreakerConfig;
use sluice::chain::Chain;
use sluice::handoff::Reader;
use sluice::kafka::consumer::EventConsumer;
use sluice::kafka::ensure_topics;
use sluice::plugin::PluginCode;
use sluice::process::{Breakers, Names, ProcessError, ProcessSettings, ProcessStats};
use sluice::sink::Sink;
use sluice::sink::druid::{DruidSink, DruidSinkConfig};
use sluice::sink::embedded::{EmbeddedStore, QueryConnection};
use sluice::symbols::Symbols;

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

/// The trades `ids` of source 1, as one batch.
fn trades(ids: impl IntoIterator<Item = u64>, symbols: &Symbols) -> Records {
    let mut records = Records::new();
    for i in ids {
        records.push(&trade(i, symbols));
    }
    records
}

/// Records the role handled: stored, or refused and dead-lettered.
fn handled(stats: &ProcessStats) -> u64 {
    stats.stored.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed)
}

/// One partition, the rest of the settings at their defaults.
fn one_partition() -> ProcessSettings {
    ProcessSettings { partitions: 1, ..ProcessSettings::default() }
}

/// `chaos` trapping on the poison record.
fn poison_link(rig: &RoleRig, poison: u64) -> Vec<sluice::transform::Transformer> {
    vec![rig.link("chaos", &[("trap_on_trade_id", &poison.to_string())])]
}

/// Runs the process role until it has handled `want` records (stored or refused), then stops it.
fn process_until(rig: &RoleRig, want: u64) -> ProcessStats {
    let settings = ProcessSettings { partitions: 3, batch: BatchConfig::default(), ..ProcessSettings::default() };
    let mut role = rig.role(chains([(1, poison_link(rig, POISON))]), rig.store(), &[(1, "binance")], settings);
    // Let a last batch with only offsets land, then stop.
    let (limit, settle) = (Duration::from_secs(60), Duration::from_millis(300));
    role.run_until(&rig.reader(), limit, settle, |stats| handled(stats) >= want).unwrap();
    role.stats
}

#[test]
fn rollups_equal_the_records_sent_and_the_poison_record_is_dead_lettered_alone() {
    let rig = RoleRig::kafka("process", 3);
    let send = |range: std::ops::RangeInclusive<u64>| rig.write(&trades(range, &rig.symbols));

    send(1..=3_000);
    let first = process_until(&rig, 3_000);
    assert_eq!(first.rejected.load(Ordering::Relaxed), 1);
    assert!(first.failed_calls.load(Ordering::Relaxed) >= 2, "the poison batch was retried and bisected");

    // A restarted process resumes from the stored offsets: only the new records are added.
    send(3_001..=4_500);
    let second = process_until(&rig, 1_500);
    assert_eq!(second.consumed.load(Ordering::Relaxed), 1_500, "the restart read old records again");
    assert_eq!(second.rejected.load(Ordering::Relaxed), 0);

    // Independently: counts and exact quantity sums per symbol and side, poison excluded.
    let mut want: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for i in (1..=4_500).filter(|&i| i != POISON) {
        let t = trade(i, &rig.symbols);
        let side = if t.is_buy { "buy" } else { "sell" };
        let e = want.entry((SYMBOLS[(i % 3) as usize].to_owned(), side.to_owned())).or_default();
        e.0 += 1;
        e.1 += t.volume_e8;
    }
    let q = QueryConnection::open(&rig.store_path()).unwrap();
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
    let dead = store_dead_letters(&rig.store_path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(StreamDataView::parse(&d.bytes).unwrap().trade_id, POISON);
    assert_eq!((d.stage.as_str(), d.source.as_str()), ("transform", "binance"));
    // The plugin and the version of its code that refused the record.
    assert_eq!(d.plugin, format!("chaos@{}", sluice::plugin::version_of(&plugin_wasm("chaos"))));
    assert!(d.reason.contains("poison record"), "{}", d.reason);
}

/// A plugin that fails on every batch trips its breaker: the role stops calling it and returns, and
/// the records of the batch that tripped it are not committed (they wait in Kafka), so a restart
/// reads them again.
#[test]
fn a_plugin_that_keeps_failing_opens_its_breaker_and_its_records_wait() {
    let rig = RoleRig::kafka("breaker", 1);
    // Three polls' worth of records, produced in three flushes.
    for chunk in 0..3u64 {
        rig.write(&trades(chunk * 100 + 1..=chunk * 100 + 100, &rig.symbols));
    }
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 100,
        breaker: BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let trap = chains([(1, vec![rig.link("chaos", &[("mode", "trap")])])]);
    let mut role = rig.role(trap, rig.store(), &[(1, "binance")], settings);
    // Without a breaker the role would run on; a bounded wait turns that into a failure, not a hang.
    let result = role.run_until(&rig.reader(), Duration::from_secs(60), Duration::ZERO, |_| false);
    let err = result.expect_err("the breaker stops the role");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
    assert_eq!(role.breakers.open_sources(), vec![1]);
    assert!(role.breakers.wait(std::time::Instant::now()) > Duration::ZERO);
    // The first failing batch was bisected and dead-lettered record by record (as for a poison
    // record); the second tripped the breaker and was not committed.
    let offsets = role.sink.offsets(&rig.kafka.events_topic).unwrap();
    let committed = offsets.iter().map(|(_, _, next)| *next).max().unwrap_or(0);
    assert!(committed < 300, "everything was committed: {offsets:?}");
    assert!(role.stats.consumed.load(Ordering::Relaxed) > committed as u64, "the tripping batch was committed");
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
    use rdkafka::Message;
    let consumer = common::committed_reader(bootstrap, topic, 1);
    let (mut payloads, mut quiet) = (Vec::new(), Instant::now());
    while quiet.elapsed() < Duration::from_millis(1500) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            payloads.push(m.payload().unwrap_or_default().to_vec());
            quiet = Instant::now();
        }
    }
    payloads
}

/// The poison record of source 1 in [`TwoSources`].
const POISON_1: u64 = 75;

/// Two sources in one partition, read in polls of 100: trades 1-50 of source 1 (`one`) and
/// 1001-1050 of source 2 (`two`), then 51-100 and 1051-1100. Source 1's link refuses the poison
/// record [`POISON_1`]; source 2's traps on everything until it is fixed. Into the embedded store,
/// or into the Druid sink's topics.
struct TwoSources {
    rig: RoleRig,
    chaos: Arc<PluginCode>,
    store: EmbeddedStore,
    druid: Option<(DruidSinkConfig, DruidSink)>,
    /// The Druid sink keeps its position in the consumer group: every run joins this one.
    group: String,
    names: Names,
    stats: ProcessStats,
}

impl TwoSources {
    /// The records written, and the sources' chains.
    fn new(name: &str, druid: bool) -> (Self, HashMap<u32, Chain>) {
        let rig = RoleRig::kafka(name, 1);
        for chunk in 0..2u64 {
            let mut records = Records::new();
            for i in chunk * 50 + 1..=chunk * 50 + 50 {
                records.push(&trade(i, &rig.symbols));
                records.push(&Record { source_id: 2, ..trade(1000 + i, &rig.symbols) });
            }
            rig.write(&records);
        }
        let chaos = rig.plugin("chaos");
        let transformers = chains([
            (1, vec![RoleRig::link_of(&chaos, &[("trap_on_trade_id", &POISON_1.to_string())])]),
            (2, vec![RoleRig::link_of(&chaos, &[("mode", "trap")])]),
        ]);
        let druid = druid.then(|| {
            let config = DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
            let sink = rig.druid_sink(&config);
            (config, sink)
        });
        let (store, names) = (rig.store(), rig.names(&[(1, "one"), (2, "two")]));
        let stats = ProcessStats::default();
        (TwoSources { rig, chaos, store, druid, group: unique_topic("group"), names, stats }, transformers)
    }

    /// Polls of 100 records, every poll committed as soon as it went through; a link's breaker opens
    /// on its second failing call and cools down for `cool_down_ms`.
    fn settings(cool_down_ms: u64) -> ProcessSettings {
        ProcessSettings {
            partitions: 1,
            max_poll_records: 100,
            batch: BatchConfig { max_rows: 10, ..BatchConfig::default() },
            breaker: BreakerConfig { failure_threshold: 2, cool_down_ms, max_cool_down_ms: cool_down_ms },
            ..ProcessSettings::default()
        }
    }

    /// Source 2's link fixed: it passes every record.
    fn fix_source_2(&self, transformers: &mut HashMap<u32, Chain>) {
        transformers.insert(2, Chain::new(2, vec![RoleRig::link_of(&self.chaos, &[])]));
    }

    /// Runs the role until it returns, or for `at_most`; into the embedded store each run reads in
    /// a consumer group of its own unless `same_group`.
    fn run(
        &mut self,
        transformers: &mut HashMap<u32, Chain>,
        breakers: &mut Breakers,
        settings: &ProcessSettings,
        at_most: Duration,
        same_group: bool,
    ) -> anyhow::Result<()> {
        let group = if self.druid.is_some() || same_group { self.group.clone() } else { unique_topic("group") };
        let reader = self.rig.reader_in(&group);
        let sink: &mut dyn Sink = match self.druid.as_mut() {
            Some((_, d)) => d,
            None => &mut self.store,
        };
        let role = process(&reader, transformers, breakers, sink, &self.names, settings, &self.stats);
        run_until(role, at_most, Duration::ZERO, || false)
    }

    /// Trade ids of the dead letters.
    fn dead_ids(&self) -> Vec<u64> {
        let letters: Vec<Vec<u8>> = match &self.druid {
            Some(_) => committed_payloads(self.rig.bootstrap(), &self.rig.kafka.dlq_topic),
            None => store_dead_letters(&self.rig.store_path()).into_iter().map(|d| d.bytes).collect(),
        };
        let mut ids: Vec<u64> = letters.iter().map(|b| StreamDataView::parse(b).unwrap().trade_id).collect();
        ids.sort_unstable();
        ids
    }

    /// The rows per source (from the store's rollup: events).
    fn rows(&self) -> BTreeMap<String, i64> {
        let mut by_source = BTreeMap::new();
        match &self.druid {
            Some((config, _)) => {
                use prost::Message;
                for payload in committed_payloads(self.rig.bootstrap(), &config.topic) {
                    let row = sluice::proto::SinkRow::decode(payload.as_slice()).unwrap();
                    *by_source.entry(row.source).or_insert(0) += 1;
                }
            }
            None => {
                let q = QueryConnection::open(&self.rig.store_path()).unwrap();
                for row in q.query("SELECT source, sum(events) AS n FROM rollup GROUP BY source", 10).unwrap() {
                    by_source.insert(row["source"].as_str().unwrap().to_owned(), row["n"].as_i64().unwrap());
                }
            }
        }
        by_source
    }
}

fn abandoned_poll_scenario(druid: bool) {
    let (mut two, mut transformers) = TwoSources::new("breaker-dlq", druid);
    let settings = TwoSources::settings(50);
    let mut breakers = Breakers::default();
    let at_most = Duration::from_secs(10);
    for _ in 0..3 {
        let err = two
            .run(&mut transformers, &mut breakers, &settings, at_most, false)
            .expect_err("source 2's breaker stops the role");
        assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
        std::thread::sleep(Duration::from_millis(60));
    }
    // A link that fails on every record fails call after call: its breaker opens within the first
    // poll, and nothing of that poll is committed, its records neither rolled up nor dead-lettered
    // (they wait for the link to work). The poll never went through, so the poison record of
    // source 1 is not dead-lettered yet either.
    assert_eq!(two.dead_ids(), Vec::<u64>::new());

    // Source 2 fixed: both polls go through, and the poison record is dead-lettered once.
    two.fix_source_2(&mut transformers);
    let stop_after_the_poll = two.run(&mut transformers, &mut Breakers::default(), &settings, at_most, false);
    assert!(stop_after_the_poll.is_ok(), "{stop_after_the_poll:?}");
    assert_eq!(two.dead_ids(), [POISON_1]);
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
    let (mut two, mut transformers) = TwoSources::new("held-source", druid);
    let settings = TwoSources::settings(1500);
    let mut breakers = Breakers::default();
    let at_most = Duration::from_secs(10);

    let err =
        two.run(&mut transformers, &mut breakers, &settings, at_most, true).expect_err("source 2's breaker opens");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::BreakerOpen { .. })), "{err:#}");
    // Held: source 1 goes on to the end while source 2's records wait; at the end of the cool-down
    // the role reads again from the last commit for the trial.
    let started = Instant::now();
    let err = two.run(&mut transformers, &mut breakers, &settings, at_most, true).expect_err("the trial comes due");
    assert!(matches!(err.downcast_ref::<ProcessError>(), Some(ProcessError::TrialDue)), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(5), "the trial came after {:?}", started.elapsed());
    assert_eq!(two.dead_ids(), [POISON_1], "source 1's poison record, once; none of source 2's");
    assert_eq!(two.rows(), BTreeMap::from([("one".to_owned(), 99)]), "source 1 went on while source 2 was held");

    // Source 2 fixed: its records go through, and source 1's are not counted again.
    two.fix_source_2(&mut transformers);
    let stopped = two.run(&mut transformers, &mut breakers, &settings, Duration::from_secs(4), true);
    assert!(stopped.is_ok(), "{stopped:?}");
    assert_eq!(two.dead_ids(), [POISON_1]);
    assert_eq!(two.rows(), BTreeMap::from([("one".to_owned(), 99), ("two".to_owned(), 100)]));
}

/// A store position past the end of its Kafka partition (the topic was deleted and created again)
/// is refused with both offsets; the consumer does not quietly reset to the start and roll the topic
/// up a second time.
#[test]
fn a_store_ahead_of_its_topic_is_refused() {
    let rig = RoleRig::kafka("ahead", 2);
    rig.write(&trades(1..=10, &rig.symbols));
    let events = &rig.kafka.events_topic;
    let mut store = rig.store();
    // A store that had read 500 records of partition 1 of a topic that now holds at most 10.
    store.apply(&[], &[(events, 1, 500)]).unwrap();
    let consumer = rig.reader();
    let err = Sink::attach(&mut store, &consumer, 2).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err.downcast_ref::<sluice::handoff::LogError>(),
            Some(sluice::handoff::LogError::OffsetAhead { partition: 1, store: 500, .. })
        ),
        "{text}"
    );
    assert!(text.contains("position 500") && text.contains(events.as_str()), "{text}");
    // Positions within the topic attach as before.
    store.apply(&[], &[(events, 1, 0)]).unwrap();
    Sink::attach(&mut store, &consumer, 2).unwrap();
}

/// An isolated poison record never holds a breaker open: with `failure_threshold = 1`, the batch whose
/// bisection found the one trapping record still counts as the plugin working. The poison record is
/// dead-lettered, its poll is committed, and every other record reaches the store. (Read from the
/// local log, which needs no broker.)
#[test]
fn an_isolated_poison_record_is_dead_lettered_and_never_opens_the_breaker() {
    let rig = RoleRig::local("poison-breaker");
    rig.write(&trades(POISON - 50..POISON + 50, &rig.symbols));
    let settings = ProcessSettings {
        partitions: 1,
        breaker: BreakerConfig { failure_threshold: 1, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let mut role = rig.role(chains([(1, poison_link(&rig, POISON))]), rig.store(), &[(1, "binance")], settings);
    let (limit, settle) = (Duration::from_secs(20), Duration::from_millis(100));
    let result = role.run_until(&rig.reader(), limit, settle, |stats| stats.stored.load(Ordering::Relaxed) >= 99);
    assert!(result.is_ok(), "the process role stopped: {:?}", result.err());
    assert_eq!(role.stats.stored.load(Ordering::Relaxed), 99);
    assert_eq!(
        role.sink.offsets(sluice::handoff::local::POSITION_TOPIC).unwrap(),
        vec![(sluice::handoff::local::POSITION_TOPIC.to_owned(), 0, 100)]
    );
    let dead = store_dead_letters(&rig.store_path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(StreamDataView::parse(&dead[0].bytes).unwrap().trade_id, POISON);
}

/// A record whose symbol id the dictionary does not know is dead-lettered with the reason, never
/// rolled up under an empty symbol, and the miss is not remembered: a later record of a symbol
/// named meanwhile rolls up under its name.
#[test]
fn a_record_of_an_unknown_symbol_is_dead_lettered_not_rolled_up_nameless() {
    let rig = RoleRig::local("unknown-symbol");
    let known = rig.symbols.intern("BTCUSDT");
    let mut records = Records::new();
    for (i, symbol_id) in [(1, known), (2, 999), (3, known)] {
        records.push(&Record { symbol_id, ..trade(i, &rig.symbols) });
    }
    rig.write(&records);
    let plain = chains([(1, vec![rig.link("chaos", &[])])]);
    let mut role = rig.role(plain, rig.store(), &[(1, "binance")], one_partition());
    let (limit, settle) = (Duration::from_secs(20), Duration::from_millis(100));
    role.run_until(&rig.reader(), limit, settle, |stats| handled(stats) >= 3).unwrap();
    rig.flush();
    let q = QueryConnection::open(&rig.store_path()).unwrap();
    let rows = q.query("SELECT symbol, sum(events) AS n FROM rollup GROUP BY symbol", 10).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0]["symbol"].as_str(), rows[0]["n"].as_i64()), (Some("BTCUSDT"), Some(2)));
    let letters = rusqlite::Connection::open(rig.store_path()).unwrap();
    let (reason, bytes): (String, Vec<u8>) = letters
        .query_row("SELECT reason, bytes FROM dead_letters WHERE stage = 'transform'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(reason.contains("symbol id 999"), "{reason}");
    assert_eq!(StreamDataView::parse(&bytes).unwrap().trade_id, 2);
}

/// The embedded store reads every partition the events topic really has, not `[kafka] partitions`
/// of them, and a topic with fewer partitions than configured is an error naming both numbers.
#[test]
fn the_store_reads_every_partition_of_the_topic_whatever_the_config_says() {
    // Created with 4 partitions; the process role is told 2.
    let rig = RoleRig::kafka("partitions", 4);
    let mut records = Records::new();
    for i in 1..=400u64 {
        // Many symbols, so every partition gets records.
        records.push(&Record { symbol_id: rig.symbols.intern(&format!("S{}", i % 40)), ..trade(i, &rig.symbols) });
    }
    rig.write(&records);
    let plain = chains([(1, vec![rig.link("chaos", &[])])]);
    let settings = ProcessSettings { partitions: 2, ..ProcessSettings::default() };
    let mut role = rig.role(plain, rig.store(), &[(1, "binance")], settings);
    let (limit, settle) = (Duration::from_secs(30), Duration::from_millis(300));
    role.run_until(&rig.reader(), limit, settle, |stats| stats.stored.load(Ordering::Relaxed) >= 400).unwrap();
    assert_eq!(role.stats.stored.load(Ordering::Relaxed), 400);
    let events = &rig.kafka.events_topic;
    let partitions: Vec<i32> = role.sink.offsets(events).unwrap().iter().map(|o| o.1).collect();
    assert_eq!(partitions, vec![0, 1, 2, 3]);
    // Told 8, the topic has 4: refused with both numbers.
    let err = Sink::attach(&mut role.sink, &rig.reader(), 8).unwrap_err().to_string();
    assert!(err.contains('4') && err.contains('8') && err.contains(events.as_str()), "{err}");
    // Creating the topics for a start told 8 refuses the existing topic the same way.
    let err = rig.rt.block_on(ensure_topics(&rig.kafka, rig.bootstrap(), &[events], 8)).unwrap_err().to_string();
    assert!(err.contains("4 partitions") && err.contains("is 8"), "{err}");
    rig.create_topics(&[events], 4);
}

/// Partitions added to the events topic while the store reads it are read too, from their start:
/// the consumer looks at the topic's metadata again (every 30 s; every 200 ms here).
#[test]
fn partitions_added_while_running_are_read_from_their_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let rig = RoleRig::kafka("new-partitions", 2);
    let (kafka, events) = (&rig.kafka, &rig.kafka.events_topic);
    // Each record to the partition named.
    let producer: BaseProducer = kafka.client_config(rig.bootstrap()).create().unwrap();
    let send = |from: u64, to: u64, partitions: i32| {
        for i in from..to {
            let records = trades([i], &rig.symbols);
            // One record per Kafka message, unframed, as the ingest role sends them.
            let record = sluice_wire::Delimited::new(records.as_bytes()).next().unwrap().unwrap();
            let partition = (i % partitions as u64) as i32;
            producer.send(BaseRecord::<(), [u8]>::to(events).partition(partition).payload(record)).unwrap();
        }
        producer.flush(Duration::from_secs(20)).unwrap();
    };
    send(1, 101, 2);
    let plain = chains([(1, vec![rig.link("chaos", &[])])]);
    let settings = ProcessSettings { partitions: 2, ..ProcessSettings::default() };
    let mut role = rig.role(plain, rig.store(), &[(1, "binance")], settings);
    let consumer = Reader::Kafka(
        EventConsumer::new(kafka, rig.bootstrap(), &unique_topic("group"), None)
            .unwrap()
            .with_partition_check(Duration::from_millis(200)),
    );
    let (result, (before, added, after)) = role.run_beside(&consumer, |stats| {
        let wait_stored = |n: u64| {
            let start = Instant::now();
            while stats.stored.load(Ordering::Relaxed) < n && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stats.stored.load(Ordering::Relaxed)
        };
        let before = wait_stored(100);
        // Two more partitions, and records in all four.
        let admin: AdminClient<_> = kafka.client_config(rig.bootstrap()).create().unwrap();
        let added = rig
            .rt
            .block_on(admin.create_partitions(&[NewPartitions::new(events, 4)], &AdminOptions::new()))
            .map(|results| results.into_iter().all(|r| r.is_ok()));
        // The test's producer learns of them from the metadata.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let metadata = producer.client().fetch_metadata(Some(events), Duration::from_secs(5));
            if metadata.is_ok_and(|m| m.topics().first().is_some_and(|t| t.partitions().len() == 4)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        send(101, 301, 4);
        let after = wait_stored(300);
        std::thread::sleep(Duration::from_millis(300));
        (before, added, after)
    });
    result.unwrap();
    assert_eq!(before, 100);
    assert!(matches!(added, Ok(true)), "adding partitions: {added:?}");
    assert_eq!(after, 300, "records in the added partitions were not all stored");
    assert_eq!(role.stats.stored.load(Ordering::Relaxed), 300);
    // The store's positions cover the new partitions: 50 records each (ids 101..301 over four).
    let offsets: Vec<(i32, i64)> = role.sink.offsets(events).unwrap().iter().map(|o| (o.1, o.2)).collect();
    assert_eq!(offsets.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0, 1, 2, 3], "{offsets:?}");
    assert_eq!(offsets[2].1, 50, "{offsets:?}");
    assert_eq!(offsets[3].1, 50, "{offsets:?}");
}

/// A dead letter is written once however often its poll is read again without a crash: here the
/// sink's commit fails once (a trigger refuses the offsets), the role stops, and a second run reads
/// the same records again. The poison record's dead letter exists once (wherever dead letters are
/// kept: the store's table, or the local log's).
#[test]
fn a_failed_commit_does_not_dead_letter_a_record_twice() {
    let rig = RoleRig::local("dlq-once");
    rig.write(&trades(POISON - 5..POISON + 5, &rig.symbols));
    let mut role = rig.role(chains([(1, poison_link(&rig, POISON))]), rig.store(), &[(1, "binance")], one_partition());
    let admin = rusqlite::Connection::open(rig.store_path()).unwrap();
    admin
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON consumer_offsets BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
        )
        .unwrap();
    let failed = role.run(&rig.reader());
    assert!(failed.unwrap_err().to_string().contains("disk says no"));
    admin.execute_batch("DROP TRIGGER refuse").unwrap();
    // Started again from the last commit (none): the same records, the same poison.
    let store_path = rig.store_path();
    let (limit, settle) = (Duration::from_secs(20), Duration::from_millis(200));
    role.run_until(&rig.reader(), limit, settle, |_| !store_dead_letters(&store_path).is_empty()).unwrap();
    rig.flush();
    let in_log: i64 = rusqlite::Connection::open(rig.dir.join("log.sqlite"))
        .unwrap()
        .query_row("SELECT count(*) FROM dead_letters WHERE stage = 'transform'", [], |r| r.get(0))
        .unwrap();
    let in_store = store_dead_letters(&store_path).len() as i64;
    assert_eq!(in_log + in_store, 1, "{in_log} in the log, {in_store} in the store");
    let q = QueryConnection::open(&store_path).unwrap();
    assert_eq!(q.query("SELECT sum(events) AS n FROM rollup", 1).unwrap()[0]["n"], 9);
}

/// The process role over the rig's local log with `transformers` (sources 1, `chained`, and 2,
/// `plain`) into its store, until it has handled `want` (stored or refused) or stopped with an
/// error.
fn run_local(
    rig: &RoleRig,
    transformers: HashMap<u32, Chain>,
    settings: ProcessSettings,
    want: u64,
) -> (anyhow::Result<()>, Role<EmbeddedStore>) {
    let mut role = rig.role(transformers, rig.store(), &[(1, "chained"), (2, "plain")], settings);
    let (limit, settle) = (Duration::from_secs(20), Duration::from_millis(100));
    let result = role.run_until(&rig.reader(), limit, settle, |stats| handled(stats) >= want);
    (result, role)
}

/// A source's chain runs link by link on the whole batch: `rescale` (drops trades under 0.03 and
/// doubles prices), then `chaos` (traps on one poison trade id). The poison record is dead-lettered
/// alone, naming the second link and its version, with the bytes that link was given (the price
/// already doubled); what the chain kept is stored with the doubled prices. A source with an empty
/// chain stores its records as they were written, and no link runs for it.
#[test]
fn each_link_of_a_chain_runs_in_order_and_a_reject_names_its_link() {
    let rig = RoleRig::local("chain");
    let symbols = &rig.symbols;
    let mut records = Records::new();
    for i in 1..=600u64 {
        records.push(&Record { source_id: if i % 2 == 0 { 1 } else { 2 }, ..trade(i, symbols) });
    }
    rig.write(&records);
    let chaos_version = sluice::plugin::version_of(&plugin_wasm("chaos"));
    // An even trade id with a volume of at least 0.03, so it reaches the second link.
    let poison = (1..=600u64).find(|&i| i % 2 == 0 && trade(i, symbols).volume_e8 >= 3_000_000).unwrap();
    let transformers = chains([
        (
            1,
            vec![
                rig.link("rescale", &[("min_volume", "0.03"), ("scale", "2")]),
                rig.link("chaos", &[("trap_on_trade_id", &poison.to_string())]),
            ],
        ),
        (2, vec![]),
    ]);
    let kept: Vec<Record> =
        (2..=600u64).step_by(2).map(|i| trade(i, symbols)).filter(|t| t.volume_e8 >= 3_000_000).collect();
    let plain = 300u64;
    let want = kept.len() as u64 + plain;
    let (result, role) = run_local(&rig, transformers, one_partition(), want);
    result.unwrap();
    assert_eq!(role.stats.rejected.load(Ordering::Relaxed), 1);

    let q = QueryConnection::open(&rig.store_path()).unwrap();
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
    let plain_max = max_price(&mut (1..=600u64).step_by(2).map(|i| trade(i, symbols)));
    assert_eq!(
        got,
        vec![("chained".to_owned(), kept.len() as i64 - 1, chained_max), ("plain".to_owned(), plain as i64, plain_max)]
    );
    let dead = store_dead_letters(&rig.store_path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].source.as_str(), dead[0].plugin.clone()), ("chained", format!("chaos@{chaos_version}")));
    let refused = StreamDataView::parse(&dead[0].bytes).unwrap();
    assert_eq!((refused.trade_id, refused.price_e8), (poison, trade(poison, symbols).price_e8 * 2));
}

/// A link that fails on every batch opens its own breaker, not its source's other links': the role
/// stops with the link's plugin named, and only that (source, link) is open.
#[test]
fn a_failing_link_opens_its_own_breaker() {
    let rig = RoleRig::local("chain-breaker");
    for b in 0..5u64 {
        rig.write(&trades(b * 10 + 1..=b * 10 + 10, &rig.symbols));
    }
    let transformers = chains([(1, vec![rig.link("rescale", &[]), rig.link("chaos", &[("mode", "trap")])])]);
    // Polls of 10 records; the first failing poll is bisected and dead-lettered, the second trips.
    let settings = ProcessSettings {
        partitions: 1,
        max_poll_records: 10,
        breaker: BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() },
        ..ProcessSettings::default()
    };
    let (result, role) = run_local(&rig, transformers, settings, 50);
    let err = result.expect_err("the breaker stops the role");
    match err.downcast_ref::<ProcessError>() {
        Some(ProcessError::BreakerOpen { source_name, plugin }) => {
            assert_eq!((source_name.as_str(), plugin.as_str()), ("chained", "chaos"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(role.breakers.open_links(), vec![(1, 1)]);
    // What `sluice_process_breaker_open` shows: that link open, by source and plugin name.
    assert_eq!(role.stats.sample().breakers, vec![("chained".to_owned(), "chaos".to_owned(), true)]);
}

/// Every row names the source whose chain made it, whatever source id a link writes into its output
/// records. Source 1 (`chained`) runs `chaos` rewriting every record's source id to 2, source 2
/// (`plain`) runs `chaos` rewriting it to 0 (no source): every record of each is rolled up under its
/// own source, none under the other or under an empty name.
#[test]
fn every_row_names_the_source_whose_chain_made_it() {
    let rig = RoleRig::local("chain-source");
    let mut records = Records::new();
    // 200 records of source 1, 100 of source 2.
    for i in 1..=300u64 {
        records.push(&Record { source_id: if i % 3 == 0 { 2 } else { 1 }, ..trade(i, &rig.symbols) });
    }
    rig.write(&records);
    let claiming = |id: &str| vec![rig.link("chaos", &[("mode", "source"), ("source_id", id)])];
    let transformers = chains([(1, claiming("2")), (2, claiming("0"))]);
    let (result, role) = run_local(&rig, transformers, one_partition(), 300);
    result.unwrap();
    assert_eq!(role.stats.stored.load(Ordering::Relaxed), 300);

    let q = QueryConnection::open(&rig.store_path()).unwrap();
    let rows = q.query("SELECT source, sum(events) AS n FROM rollup GROUP BY source ORDER BY source", 10).unwrap();
    let got: Vec<(String, i64)> =
        rows.iter().map(|r| (r["source"].as_str().unwrap().to_owned(), r["n"].as_i64().unwrap())).collect();
    assert_eq!(got, vec![("chained".to_owned(), 200), ("plain".to_owned(), 100)]);
}

/// A sink that commits into the store, then reports the commit as failed once: a Druid
/// transaction whose commit timed out while the coordinator committed it.
struct CommitsThenSaysFailed {
    inner: Box<dyn Sink>,
    fail_once: bool,
}

impl Sink for CommitsThenSaysFailed {
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
/// ([`sluice::process::restore_committed`]), so a stateful link decides as in an uninterrupted
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
    let rig = if druid { RoleRig::kafka("unsure-commit", 1) } else { RoleRig::local("unsure-commit") };
    let druid_config = DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let inner: Box<dyn Sink> = match druid {
        true => Box::new(rig.druid_sink(&druid_config)),
        false => Box::new(rig.store()),
    };
    let write = |range: std::ops::Range<u64>| rig.write(&trades(range, &rig.symbols));
    let count = chains([(1, vec![rig.link("chaos", &[("mode", "count")])])]);
    let sink = CommitsThenSaysFailed { inner, fail_once: true };
    let mut role = rig.role(count, sink, &[(1, "counted")], one_partition());
    // The Druid sink keeps its position in the consumer group: both runs join the same one.
    let group = unique_topic("group");

    // The first 30 records are committed, and the commit is reported failed.
    write(0..30);
    let first = rig.reader_in(&group);
    let failed = role.run(&first);
    assert!(failed.unwrap_err().to_string().contains("did not answer"));
    drop(first);

    // Started again as the role does after a failure: from the sink's state, then the next 30.
    write(30..60);
    sluice::process::restore_committed(&mut role.chains, &mut role.sink, &role.names).unwrap();
    let second = rig.reader_in(&group);
    // The first 30 were stored by the commit reported failed, so not counted here.
    let stored_30 = |stats: &ProcessStats| stats.stored.load(Ordering::Relaxed) >= 30;
    role.run_until(&second, Duration::from_secs(30), Duration::ZERO, stored_30).unwrap();
    // Records and the sum of their quantities (in units of 10^-8) per symbol.
    let mut sums: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    match druid {
        true => {
            use prost::Message;
            for payload in committed_payloads(rig.bootstrap(), &druid_config.topic) {
                let row = sluice::proto::SinkRow::decode(payload.as_slice()).unwrap();
                let sum = sums.entry(row.symbol).or_default();
                *sum = (sum.0 + 1, sum.1 + (row.qty * 1e8).round() as i64);
            }
        }
        false => {
            let q = QueryConnection::open(&rig.store_path()).unwrap();
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
}

/// A transform's reject whose reason (2 MiB) is larger than a Kafka message may be fails no Druid
/// transaction (before, every retry of the batch failed the same way, forever): the reason is cut
/// where it leaves the plugin, and the dead letter is committed with its batch.
#[test]
fn with_the_druid_sink_a_reject_reason_too_long_for_a_message_is_cut_and_committed() {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let rig = RoleRig::kafka("druid-long-reason", 1);
    let druid = DruidSinkConfig { topic: unique_topic("druid"), ..Default::default() };
    let sink = rig.druid_sink(&druid);
    rig.write(&trades(1..=20, &rig.symbols));
    let long = chains([(1, vec![rig.link("chaos", &[("mode", "long-reason")])])]);
    let settings = ProcessSettings { partitions: 1, max_poll_records: 100, ..ProcessSettings::default() };
    let mut role = rig.role(long, sink, &[(1, "one")], settings);
    let result = role.run_until(&rig.reader(), Duration::from_secs(20), Duration::ZERO, |stats| handled(stats) >= 20);
    result.expect("the batch's transaction commits");
    // The first record of each poll is refused (one poll, or a few).
    let stats = &role.stats;
    let rejected = stats.rejected.load(Ordering::Relaxed);
    assert!(rejected >= 1 && rejected + stats.stored.load(Ordering::Relaxed) == 20, "{stats:?}");
    // The first dead letter, committed, with its reason cut and saying how long it was.
    let dlq = &rig.kafka.dlq_topic;
    let reader = common::committed_reader(rig.bootstrap(), dlq, 1);
    let start = Instant::now();
    let reason = loop {
        assert!(start.elapsed() < Duration::from_secs(20), "no dead letter in {dlq}");
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
