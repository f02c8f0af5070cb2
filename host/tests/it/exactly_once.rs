//! Exactly-once delivery through disturbances, end to end with the real binary: the feed simulator on
//! loopback → `sluice run --role ingest` → a real Kafka-protocol broker → `sluice run --role process`
//! → the sink. The disturbances: the process role killed with SIGKILL in the middle of the stream and
//! started again; a second instance joining and leaving the group; plugin versions uploaded,
//! shadowed, promoted and rolled back over the HTTP API while trades flow. The trades the simulator
//! sent (recorded by the simulator itself, not by sluice) are then compared with what reached the
//! sink.
//!
//! - Embedded store: rolled-up counts and exact quantity sums per symbol and side equal those computed
//!   from the sent trades.
//! - Druid: a `read_committed` consumer of the Druid topic (as Druid's Kafka supervisor reads it) sees
//!   every trade exactly once, and the rows decode with the descriptor the generated supervisor spec
//!   carries into the columns Druid would see. Druid itself cannot run here; the topic is what it
//!   reads, under the isolation level its spec sets.

use crate::common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::config::{ConfigToml, Source, Topics};
use common::{TestBroker, free_addr, unique_topic, with_custom_section};
use feedsim::{FeedSim, SentTrade, Venue};
use prost_reflect::{DescriptorPool, DynamicMessage};
use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, Producer};
use sluice::sink::embedded::QueryConnection;

const SYMBOLS: [&str; 2] = ["BTCUSDT", "ETHUSDT"];
const PARTITIONS: i32 = 3;
/// The API token the children are started with.
const TOKEN: &str = "test-token-5b1c";

/// A `sluice run --role <role>` child.
type Role = common::SluiceProcess;

fn start_role(config: &std::path::Path, role: &str, log: &std::path::Path) -> Role {
    start_role_with(config, role, log, &[])
}

fn start_role_with(config: &std::path::Path, role: &str, log: &std::path::Path, extra: &[&str]) -> Role {
    Role::run(config, log, &[&["--role", role], extra].concat(), Some(TOKEN))
}

struct Setup {
    broker: TestBroker,
    sim: Option<FeedSim>,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

/// The source's chain as most tests run it: `rescale`, passing everything.
fn rescale(source: Source) -> Source {
    source.link("rescale", &[])
}

/// A broker, the simulator and a configuration of Binance through `chain`, finished by `more` (a
/// sink, plugins).
async fn setup(name: &str, chain: impl FnOnce(Source) -> Source, more: impl FnOnce(ConfigToml) -> ConfigToml) -> Setup {
    let broker = TestBroker::start(name);
    let sim = common::recording_sim(150.0).await;
    let dir = common::fresh_dir(name);
    let params: Vec<String> = SYMBOLS.iter().map(|s| format!("\"{}@aggTrade\"", s.to_lowercase())).collect();
    let subscribe = format!(r#"{{"method":"SUBSCRIBE","params":[{}],"id":1}}"#, params.join(","));
    let mut config = ConfigToml::new(&dir)
        .api_bind("127.0.0.1:0")
        .kafka(&broker.bootstrap, &Topics::unique(), PARTITIONS.into())
        .process("group", unique_topic("group"))
        .process("instance", "a")
        .process("max_wait_ms", 200)
        .source(chain(Source::ws("binance", &sim.url(Venue::Binance), &subscribe).decode("binance")));
    // librdkafka's own debug contexts (e.g. `cgrp,eos`) in the children's log, when asked for.
    if let Ok(debug) = std::env::var("SLUICE_TEST_KAFKA_DEBUG") {
        config = config.set("kafka.options", "debug", debug);
    }
    let config = more(config).save();
    let log = dir.join("sluice.log");
    Setup { broker, sim: Some(sim), dir, config, log }
}

/// [`run_with_kill`] with the committed rows of `druid_topic` as the progress; then waits until the
/// topic holds a row for every trade sent (90 s at most) and a second more, and stops the process
/// role cleanly. The trades sent per symbol.
async fn run_with_kill_into_druid(s: &mut Setup, druid_topic: &str) -> BTreeMap<&'static str, Vec<SentTrade>> {
    let counter = std::sync::Mutex::new(CommittedCount::new(&s.broker.bootstrap, druid_topic));
    let (mut process, sent) = run_with_kill(s, || counter.lock().unwrap().update()).await;
    let total: usize = sent.values().map(Vec::len).sum();
    assert!(total > 500, "only {total} trades sent");
    wait_committed(|| counter.lock().unwrap().update(), &sent).await;
    process.interrupt();
    sent
}

/// Waits until `committed` counts a row for every trade `sent` (90 s at most), then a second more:
/// time for a row delivered twice to show.
async fn wait_committed(mut committed: impl FnMut() -> u64, sent: &BTreeMap<&'static str, Vec<SentTrade>>) {
    let total: usize = sent.values().map(Vec::len).sum();
    let start = Instant::now();
    while (committed() as usize) < total && start.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

/// Runs ingest and process, kills the process role with SIGKILL once `progress` reports some output,
/// restarts it, then stops the simulator and ingest cleanly. Returns the still running process role
/// and the trades sent per symbol.
async fn run_with_kill(s: &mut Setup, progress: impl Fn() -> u64) -> (Role, BTreeMap<&'static str, Vec<SentTrade>>) {
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    let mut process = start_role(&s.config, "process", &s.log);
    let start = Instant::now();
    while progress() < 200 {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(90), "no output before the kill:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    process.kill_9();
    // Trades keep flowing into Kafka while the process role is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let process = start_role(&s.config, "process", &s.log);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sent = stop_feed(s, &mut ingest).await;
    (process, sent)
}

/// Stops the venue first, so ingest reads every trade it sent, then stops ingest cleanly; returns the
/// trades the simulator sent, per symbol.
async fn stop_feed(s: &mut Setup, ingest: &mut Role) -> BTreeMap<&'static str, Vec<SentTrade>> {
    let sim = s.sim.take().unwrap();
    let handle = sim.handle();
    sim.shutdown().await;
    let sent = SYMBOLS.iter().map(|&sym| (sym, handle.sent_trades(Venue::Binance, sym))).collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ingest.interrupt();
    sent
}

fn want_rollup(sent: &BTreeMap<&'static str, Vec<SentTrade>>) -> BTreeMap<(String, String), (i64, i64)> {
    let mut want = BTreeMap::new();
    for (symbol, trades) in sent {
        for t in trades {
            let side = if t.taker_buys { "buy" } else { "sell" };
            let e: &mut (i64, i64) = want.entry((symbol.to_string(), side.to_owned())).or_default();
            e.0 += 1;
            e.1 += t.size_e8;
        }
    }
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_counts_every_trade_once_across_a_kill_9() {
    let mut s = setup("kill-embedded", rescale, |config| config).await;
    let store = s.dir.join("store.sqlite");
    let rolled_up = |store: &std::path::Path| -> BTreeMap<(String, String), (i64, i64)> {
        let sums = common::rollup_sums(store, &["symbol", "side"]).into_iter();
        sums.map(|(key, sums)| ((key[0].clone(), key[1].clone()), sums)).collect()
    };
    let count = |m: &BTreeMap<(String, String), (i64, i64)>| m.values().map(|v| v.0 as u64).sum::<u64>();
    let (mut process, sent) = run_with_kill(&mut s, || count(&rolled_up(&store))).await;
    let want = want_rollup(&sent);
    let total = count(&want);
    assert!(total > 500, "only {total} trades sent");
    let start = Instant::now();
    while count(&rolled_up(&store)) < total && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Anything counted twice would show up by now as well.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    process.interrupt();
    let got = rolled_up(&store);
    assert_eq!(got, want, "rolled up vs sent\n{}", std::fs::read_to_string(&s.log).unwrap_or_default());
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.matches("role=Process").count() >= 2, "the process role did not restart:\n{log}");
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Every message of `topic` a `read_committed` consumer can see, decoded with the descriptor in the
/// generated supervisor spec into the JSON Druid would see.
fn druid_rows(bootstrap: &str, topic: &str, message: &prost_reflect::MessageDescriptor) -> Vec<serde_json::Value> {
    let consumer = read_committed(bootstrap, topic);
    let mut rows = Vec::new();
    let mut quiet = Instant::now();
    let start = Instant::now();
    while quiet.elapsed() < Duration::from_secs(2) && start.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let row = DynamicMessage::decode(message.clone(), m.payload().unwrap_or_default()).unwrap();
            rows.push(serde_json::to_value(&row).unwrap());
            quiet = Instant::now();
        }
    }
    rows
}

/// An Overlord on loopback that keeps every supervisor spec POSTed to it and reports the supervisor
/// running, with the answers Druid documents for these calls
/// (https://druid.apache.org/docs/latest/api-reference/supervisor-api).
async fn overlord() -> (String, Arc<Mutex<Vec<(String, serde_json::Value)>>>) {
    use axum::extract::{RawQuery, State};
    use axum::routing::{get, post};
    let posted: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/druid/indexer/v1/supervisor",
            post(|State(p): State<Arc<Mutex<Vec<_>>>>, RawQuery(q): RawQuery, body: axum::body::Bytes| async move {
                let spec: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let id = spec["spec"]["dataSchema"]["dataSource"].clone();
                p.lock().unwrap().push((q.unwrap_or_default(), spec));
                axum::Json(serde_json::json!({ "id": id }))
            }),
        )
        .route(
            "/druid/indexer/v1/supervisor/{id}/status",
            get(|axum::extract::Path(id): axum::extract::Path<String>| async move {
                axum::Json(serde_json::json!({
                    "id": id,
                    "payload": { "dataSource": id, "state": "RUNNING", "detailedState": "RUNNING", "healthy": true }
                }))
            }),
        )
        .route(
            "/druid/indexer/v1/supervisor/{id}/health",
            get(|| async { axum::Json(serde_json::json!({ "healthy": true })) }),
        )
        .with_state(posted.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, posted)
}

/// What the posted specs were, as the loopback Overlord kept them: (query string, spec).
type Posted = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A setup whose sink is Druid: a fresh Druid topic and a loopback Overlord.
async fn druid_setup(name: &str) -> (Setup, String, Posted) {
    druid_setup_with(name, rescale, |config| config).await
}

/// [`druid_setup`] with the source's `chain`, the configuration finished by `more`.
async fn druid_setup_with(
    name: &str,
    chain: impl FnOnce(Source) -> Source,
    more: impl FnOnce(ConfigToml) -> ConfigToml,
) -> (Setup, String, Posted) {
    let druid_topic = unique_topic("druid");
    let (overlord_url, posted) = overlord().await;
    let sink =
        |config: ConfigToml| more(config).druid(&overlord_url, &druid_topic).set("sink.druid", "datasource", "trades");
    (setup(name, chain, sink).await, druid_topic, posted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn druid_topic_holds_every_trade_exactly_once_across_a_kill_9() {
    let (mut s, druid_topic, posted) = druid_setup("kill-druid").await;
    // The spec sluice generates for this config; the process role posts the same one (checked below).
    let (spec, message) = generated_spec(&s);
    let columns: Vec<String> = std::iter::once(spec["spec"]["dataSchema"]["timestampSpec"]["column"].clone())
        .chain(spec["spec"]["dataSchema"]["dimensionsSpec"]["dimensions"].as_array().unwrap().iter().cloned())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();

    let bootstrap = s.broker.bootstrap.clone();
    let sent = run_with_kill_into_druid(&mut s, &druid_topic).await;
    // A process role with its API on a known port: the supervisor's health reaches /metrics and
    // /health/ready.
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut watched = start_role_with(&s.config, "process", &s.log, &["--api-addr", &api.to_string()]);
    let http = reqwest::Client::new();
    let (mut metrics, mut ready) = (String::new(), serde_json::Value::Null);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = http.get(format!("http://{api}/metrics")).send().await {
            metrics = r.text().await.unwrap_or_default();
        }
        if let Ok(r) = http.get(format!("http://{api}/health/ready")).send().await {
            ready = r.json().await.unwrap_or_default();
        }
        if metrics.lines().any(|l| l == "sluice_druid_supervisor_healthy 1") && ready["checks"]["druid"]["ok"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metrics.lines().any(|l| l == "sluice_druid_supervisor_healthy 1"), "{metrics}");
    assert_eq!(ready["checks"]["druid"]["ok"], true, "{ready}");
    watched.interrupt();
    // Each start of the process role applied its supervisor spec through the Overlord: this spec,
    // so the descriptor the rows are read with below is the one Druid was given.
    let applied = posted.lock().unwrap().clone();
    assert!(applied.len() >= 2, "{} specs posted for two starts", applied.len());
    for (query, posted_spec) in &applied {
        assert_eq!(query, "skipRestartIfUnmodified=true");
        assert_eq!(posted_spec, &spec);
    }
    assert_eq!(spec["spec"]["ioConfig"]["topic"], druid_topic.as_str());
    assert_eq!(spec["spec"]["ioConfig"]["consumerProperties"]["isolation.level"], "read_committed");

    let rows = druid_rows(&bootstrap, &druid_topic, &message);
    // Every row carries the spec's timestamp column and dimensions, by the names Druid sees.
    for row in &rows {
        for column in &columns {
            assert!(row.get(column).is_some(), "row {row} lacks column {column}");
        }
    }
    assert_exactly_once(&rows, &sent);
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.matches("role=Process").count() >= 2, "the process role did not restart:\n{log}");
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Two Druid transactions in flight at once (`transactions_in_flight = 2`): the process role begins
/// a transaction while the one before it is still committing (the role's own counter of such
/// transactions, read from `/metrics`, moves), is killed with SIGKILL mid-stream with transactions
/// in flight, and started again: the Druid topic still holds every trade exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_druid_transactions_stay_exactly_once_across_a_kill_9() {
    let (mut s, druid_topic, _posted) = druid_setup("overlap-druid").await;
    let config = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, config.replace("[sink.druid]\n", "[sink.druid]\ntransactions_in_flight = 2\n")).unwrap();
    let bootstrap = s.broker.bootstrap.clone();
    let mut counter = CommittedCount::new(&bootstrap, &druid_topic);
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    let api = common::free_addr();
    let mut process = start_role_with(&s.config, "process", &s.log, &["--api-addr", &api]);
    let http = reqwest::Client::new();
    let (mut overlapped, start) = (0.0, Instant::now());
    while (overlapped < 3.0 || counter.update() < 200) && start.elapsed() < Duration::from_secs(90) {
        if let Ok(r) = http.get(format!("http://{api}/metrics")).send().await {
            overlapped = metric(&r.text().await.unwrap_or_default(), "sluice_druid_transactions_overlapped_total");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert!(overlapped >= 3.0, "{overlapped} transactions began while another was committing:\n{log}");
    process.kill_9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut process = start_role(&s.config, "process", &s.log);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let sent = stop_feed(&mut s, &mut ingest).await;
    wait_committed(|| counter.update(), &sent).await;
    process.interrupt();
    let (_, message) = generated_spec(&s);
    assert_exactly_once(&druid_rows(&bootstrap, &druid_topic, &message), &sent);
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// A stateful chain with the Druid sink, the process role killed with SIGKILL mid-stream and started
/// again: the `chaos` link in `count` mode numbers each symbol's records 1, 2, 3, ... as its state
/// (written into each row's quantity). Its state goes to the changelog topic in the transactions
/// that carry the rows, and the restarted role restores it before its first record: so per symbol,
/// the Druid topic's committed rows carry 1..=n once each, n the trades sent. A count restarted from
/// 1 after the kill, or a count applied twice, would show as a repeated number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn druid_sink_commits_a_stateful_links_state_across_a_kill_9() {
    let counting = |source: Source| source.link("chaos", &[("mode", "count")]);
    let (mut s, druid_topic, _posted) =
        druid_setup_with("state-druid", counting, |config| config.plugin("chaos", "chaos.wasm")).await;
    let (_, message) = generated_spec(&s);
    let bootstrap = s.broker.bootstrap.clone();
    let sent = run_with_kill_into_druid(&mut s, &druid_topic).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.matches("role=Process").count() >= 2, "the process role did not restart:\n{log}");

    let mut counts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in druid_rows(&bootstrap, &druid_topic, &message) {
        let count = (row["qty"].as_f64().unwrap() * 1e8).round() as i64;
        counts.entry(row["symbol"].as_str().unwrap().to_owned()).or_default().push(count);
    }
    for (symbol, trades) in &sent {
        let mut got = counts.remove(*symbol).unwrap_or_default();
        got.sort_unstable();
        let want: Vec<i64> = (1..=trades.len() as i64).collect();
        assert_eq!(got, want, "{symbol}: the counting link's numbers in the Druid topic\n{log}");
    }
    assert!(counts.is_empty(), "rows of symbols never sent: {:?}", counts.keys());
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The rows read from the Druid topic, as a multiset, equal the trades the simulator sent: each one
/// exactly once, with its symbol, time, side, price and quantity.
fn assert_exactly_once(rows: &[serde_json::Value], sent: &BTreeMap<&'static str, Vec<SentTrade>>) {
    let key = |symbol: &str, ms: i64, side: &str, price: f64, qty: f64| {
        format!("{symbol} {ms} {side} {:.8} {:.8}", price, qty)
    };
    let mut want: Vec<String> = sent
        .iter()
        .flat_map(|(symbol, trades)| {
            trades.iter().map(move |t| {
                let side = if t.taker_buys { "buy" } else { "sell" };
                key(symbol, (t.time_us / 1000) as i64, side, t.price_e8 as f64 / 1e8, t.size_e8 as f64 / 1e8)
            })
        })
        .collect();
    let mut got: Vec<String> = rows
        .iter()
        .map(|r| {
            let ms = match &r["timestampMs"] {
                serde_json::Value::String(s) => s.parse().unwrap(),
                v => v.as_i64().unwrap(),
            };
            key(
                r["symbol"].as_str().unwrap(),
                ms,
                r["side"].as_str().unwrap(),
                r["price"].as_f64().unwrap(),
                r["qty"].as_f64().unwrap(),
            )
        })
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len(), "rows in the Druid topic vs trades sent");
    assert_eq!(got, want);
}

/// Counts what a `read_committed` reader of `topic` has seen, reading on from where it stopped.
struct CommittedCount {
    consumer: BaseConsumer,
    seen: u64,
}

impl CommittedCount {
    fn new(bootstrap: &str, topic: &str) -> Self {
        CommittedCount { consumer: read_committed(bootstrap, topic), seen: 0 }
    }

    /// Reads for at most a second and returns the total seen.
    fn update(&mut self) -> u64 {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => self.seen += 1,
                Some(Err(_)) => {}
                None => break,
            }
        }
        self.seen
    }
}

/// Two process instances in one group (Druid sink) split the events topic's partitions: the second
/// joins mid-stream (a rebalance), is then killed with SIGKILL and restarted under its instance name,
/// which takes its place in the group back. The Druid topic still holds every trade exactly once.
///
/// (A dead instance is replaced by restarting it with the same `[process] instance`: it is a static
/// member of the group. Its partitions moving to the survivors instead needs the broker to expire the
/// dead member's session, which the broker these tests run against does not do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_process_instances_share_partitions_through_rebalances() {
    let (mut s, druid_topic, _posted) = druid_setup("group-druid").await;
    let second = s.dir.join("second.toml");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&second, text.replacen("instance = \"a\"", "instance = \"b\"", 1)).unwrap();
    let (_, message) = generated_spec(&s);
    let assignments = |log: &std::path::Path| -> Vec<String> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().filter(|l| l.contains("partitions assigned")).map(str::to_owned).collect()
    };

    let bootstrap = s.broker.bootstrap.clone();
    let mut counter = CommittedCount::new(&bootstrap, &druid_topic);
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    let mut first = start_role(&s.config, "process", &s.log);
    let start = Instant::now();
    while counter.update() < 200 {
        assert!(start.elapsed() < Duration::from_secs(90), "no output from the first instance");
    }
    let mut second_role = start_role(&second, "process", &s.log);
    // Wait for the split: an assignment of only some of the partitions.
    let start = Instant::now();
    while !assignments(&s.log).iter().any(|l| !l.contains("[0, 1, 2]")) {
        assert!(start.elapsed() < Duration::from_secs(90), "never split: {:#?}", assignments(&s.log));
        counter.update();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    second_role.kill_9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut second_role = start_role(&second, "process", &s.log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = stop_feed(&mut s, &mut ingest).await;
    wait_committed(|| counter.update(), &sent).await;
    second_role.interrupt();
    first.interrupt();
    let rows = druid_rows(&bootstrap, &druid_topic, &message);
    assert_exactly_once(&rows, &sent);
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The supervisor spec sluice generates for the test's configuration, and the row message found by
/// the name the spec gives in the descriptor the spec carries (as Druid would find it).
fn generated_spec(s: &Setup) -> (serde_json::Value, prost_reflect::MessageDescriptor) {
    let cfg = sluice::config::Config::load(&s.config).unwrap();
    let druid = cfg.sink.druid.as_ref().unwrap();
    let spec = sluice::sink::druid::supervisor_spec(druid, sluice::proto::DESCRIPTOR_SET, &s.broker.bootstrap)
        .unwrap()
        .into_json();
    let decoder = &spec["spec"]["ioConfig"]["inputFormat"]["protoBytesDecoder"];
    let descriptor =
        base64::engine::general_purpose::STANDARD.decode(decoder["descriptorString"].as_str().unwrap()).unwrap();
    let pool = DescriptorPool::decode(descriptor.as_slice()).unwrap();
    let message = pool.get_message_by_name(decoder["protoMessageType"].as_str().unwrap()).unwrap();
    (spec, message)
}

/// A reader of every partition of `topic` from the start, seeing committed data only (as Druid's
/// supervisor reads with the generated spec).
fn read_committed(bootstrap: &str, topic: &str) -> BaseConsumer {
    common::committed_reader(bootstrap, topic, PARTITIONS)
}

/// A JSON call to a child's API with the token; answers (status, body).
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<reqwest::Body>,
) -> (u16, serde_json::Value) {
    common::api_call(http, method, url, TOKEN, body).await
}

/// Hot swap under load. While the simulator drives trades at a steady rate:
/// - the ingest role's `binance` decoder is replaced by a rebuilt copy (same behaviour, new version);
/// - the process role gets `double-price` as a new version of its chain's one link, `rescale`
///   (configured to pass everything): first in shadow (its output compared, nothing of it
///   delivered), then promoted, then rolled back.
///
/// Every trade the simulator sent reaches the Druid topic exactly once; each row shows by its price
/// which version processed it (the sent price, or twice it under `double-price`), and per symbol, in
/// trade order, the versions run old → new → old: each batch ran wholly on the version active when
/// it started. The time from the promote call to the new version's first call is printed (it goes
/// into BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_versions_swap_under_load_with_every_trade_delivered_once() {
    let (mut s, druid_topic, _posted) = druid_setup("hot-swap").await;
    let (_, message) = generated_spec(&s);
    let (ingest_api, process_api) = (free_addr(), free_addr());
    let mut ingest = start_role_with(&s.config, "ingest", &s.log, &["--api-addr", &ingest_api]);
    let mut process = start_role_with(&s.config, "process", &s.log, &["--api-addr", &process_api]);
    let bootstrap = s.broker.bootstrap.clone();
    let mut counter = CommittedCount::new(&bootstrap, &druid_topic);
    let http = reqwest::Client::new();
    let log = || std::fs::read_to_string(&s.log).unwrap_or_default();
    let wait_rows = |counter: &mut CommittedCount, more: u64| {
        let want = counter.seen + more;
        let start = Instant::now();
        while counter.update() < want {
            assert!(start.elapsed() < Duration::from_secs(90), "stuck at {} rows:\n{}", counter.seen, log());
        }
    };
    wait_rows(&mut counter, 300);
    let v1 = sluice::plugin::version_of(sluice::plugin::bundled::BINANCE);

    // Ingest: a rebuilt decoder, uploaded and activated.
    let rebuilt = with_custom_section(sluice::plugin::bundled::BINANCE, "build");
    let (status, uploaded) =
        call(&http, reqwest::Method::PUT, format!("http://{ingest_api}/v1/plugins/binance"), Some(rebuilt.into()))
            .await;
    assert_eq!(status, 201, "{uploaded}");
    let rebuilt_version = uploaded["version"].as_str().unwrap().to_owned();
    assert_ne!(rebuilt_version, v1);
    // The process role's one link, `rescale` (configured as a pass-through), is what it swaps.
    let link_v1 = sluice::plugin::version_of(sluice::plugin::bundled::RESCALE);
    let activate = |api: &str, plugin: &str, version: &str, mode: &str| {
        let url = format!("http://{api}/v1/plugins/{plugin}/activate{mode}");
        let body = serde_json::json!({ "version": version }).to_string();
        call(&http, reqwest::Method::POST, url, Some(body.into()))
    };
    let (status, view) = activate(&ingest_api, "binance", &rebuilt_version, "").await;
    assert_eq!((status, view["active"].as_str()), (200, Some(rebuilt_version.as_str())), "{view}");

    // Process: double-price in shadow first.
    let doubled = std::fs::read(format!("{}/double_price.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let (status, uploaded) = call(
        &http,
        reqwest::Method::PUT,
        format!("http://{process_api}/v1/plugins/rescale?replace=true"),
        Some(doubled.into()),
    )
    .await;
    assert_eq!(status, 201, "{uploaded}");
    let v2 = uploaded["version"].as_str().unwrap().to_owned();
    let (status, view) = activate(&process_api, "rescale", &v2, "?mode=shadow").await;
    assert_eq!((status, view["shadow"]["version"].as_str()), (200, Some(v2.as_str())), "{view}");
    let start = Instant::now();
    let shadow = loop {
        let (_, view) =
            call(&http, reqwest::Method::GET, format!("http://{process_api}/v1/plugins/rescale"), None).await;
        if view["shadow"]["records_different"].as_u64().unwrap_or(0) >= 50 {
            break view["shadow"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the shadow compared nothing: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every doubled price differs from the active version's output.
    assert_eq!(shadow["records_equal"], 0, "{shadow}");
    wait_rows(&mut counter, 200);

    // Promote, and time the first batch on the new version (its transform calls on /metrics).
    let calls_of = |metrics: &str, version: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("sluice_plugin_calls_total{"))
            .filter(|l| l.contains(&format!("version=\"{version}\"")) && l.contains("stage=\"transform\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let metrics_url = format!("http://{process_api}/metrics");
    let before = calls_of(&http.get(&metrics_url).send().await.unwrap().text().await.unwrap(), &v2);
    let promoted_at = Instant::now();
    let (status, view) =
        call(&http, reqwest::Method::POST, format!("http://{process_api}/v1/plugins/rescale/promote"), None).await;
    assert_eq!((status, view["active"].as_str()), (200, Some(v2.as_str())), "{view}");
    loop {
        let text = http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
        if calls_of(&text, &v2) > before {
            break;
        }
        assert!(promoted_at.elapsed() < Duration::from_secs(10), "no batch ran on {v2}:\n{text}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!("promote call -> first transform call on the new version: {:?}", promoted_at.elapsed());
    wait_rows(&mut counter, 300);

    let (status, view) =
        call(&http, reqwest::Method::POST, format!("http://{process_api}/v1/plugins/rescale/rollback"), None).await;
    assert_eq!((status, view["active"].as_str()), (200, Some(link_v1.as_str())), "{view}");
    wait_rows(&mut counter, 300);

    // The ingest role decoded on the rebuilt version, and says so.
    let (_, sources) = call(&http, reqwest::Method::GET, format!("http://{ingest_api}/v1/sources"), None).await;
    assert_eq!(sources["sources"][0]["plugin_version"], rebuilt_version.as_str(), "{sources}");
    let (_, view) = call(&http, reqwest::Method::GET, format!("http://{ingest_api}/v1/plugins/binance"), None).await;
    let decoded_on = |version: &str| {
        view["versions"].as_array().unwrap().iter().find(|v| v["version"] == version).unwrap()["records_out"]
            .as_u64()
            .unwrap()
    };
    assert!(decoded_on(&rebuilt_version) > 0 && decoded_on(&v1) > 0, "{view}");

    // Stop the venue and ingest, then wait for the process role to deliver.
    let sent = stop_feed(&mut s, &mut ingest).await;
    let total: u64 = sent.values().map(|t| t.len() as u64).sum();
    // Wait while rows keep arriving (this machine may be running other tests), up to 30 s without any.
    let (mut seen, mut last_progress) = (counter.update(), Instant::now());
    while seen < total && last_progress.elapsed() < Duration::from_secs(30) {
        let now = counter.update();
        if now > seen {
            (seen, last_progress) = (now, Instant::now());
        }
    }
    process.interrupt();

    // Match each row to the trade it came from by symbol, time, side and quantity; its price says
    // which version transformed it.
    // (symbol, trade time ms, side, quantity e8) -> [(trade id, sent price e8)]
    type TradeKey = (String, i64, String, i64);
    let mut by_key: BTreeMap<TradeKey, Vec<(u64, i64)>> = BTreeMap::new();
    for (symbol, trades) in &sent {
        for t in trades {
            let side = if t.taker_buys { "buy" } else { "sell" };
            let key = (symbol.to_string(), (t.time_us / 1000) as i64, side.to_owned(), t.size_e8);
            by_key.entry(key).or_default().push((t.id, t.price_e8));
        }
    }
    let rows = druid_rows(&bootstrap, &druid_topic, &message);
    assert_eq!(rows.len() as u64, total, "rows in the Druid topic vs trades sent ({seen} counted while waiting)");
    let e8 = |v: &serde_json::Value| (v.as_f64().unwrap() * 1e8).round() as i64;
    let mut versions: BTreeMap<String, Vec<(u64, bool)>> = BTreeMap::new();
    for r in &rows {
        let ms = match &r["timestampMs"] {
            serde_json::Value::String(s) => s.parse().unwrap(),
            v => v.as_i64().unwrap(),
        };
        let symbol = r["symbol"].as_str().unwrap().to_owned();
        let key = (symbol.clone(), ms, r["side"].as_str().unwrap().to_owned(), e8(&r["qty"]));
        let candidates = by_key.get_mut(&key).unwrap_or_else(|| panic!("row {r} matches no sent trade"));
        let price = e8(&r["price"]);
        let at = candidates
            .iter()
            .position(|&(_, p)| p == price || p * 2 == price)
            .unwrap_or_else(|| panic!("row {r} has neither the sent price nor twice it: {candidates:?}"));
        let (id, sent_price) = candidates.swap_remove(at);
        versions.entry(symbol).or_default().push((id, price != sent_price));
    }
    assert!(by_key.values().all(Vec::is_empty), "trades that reached no row");
    // Per symbol in trade order: old version, then the new one, then the old one again.
    let mut segments = [0usize; 3];
    for (symbol, mut seen) in versions {
        seen.sort_unstable();
        let mut phase = 0;
        for (id, doubled) in seen {
            phase = match (phase, doubled) {
                (0, false) | (2, false) => phase,
                (0, true) | (1, true) => 1,
                (1, false) => 2,
                _ => panic!("{symbol}: trade {id} ran on the new version after the rollback"),
            };
            segments[phase] += 1;
        }
    }
    assert!(segments.iter().all(|&n| n > 0), "rows before, during and after the swap: {segments:?}");
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// `kill -9` of the ingest role on the Kafka path, mid-stream, then a restart. Whatever reached the
/// events topic (acknowledged or not when the role died) reaches the embedded store once, and the
/// topic holds no trade twice: the restarted role's new connections bring new trades only, and
/// what was lost while it was down is the venue's trades nobody read (counted as gaps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_of_the_ingest_role_loses_nothing_that_reached_kafka_and_duplicates_nothing() {
    let mut s = setup("kill-ingest", rescale, |config| config).await;
    let store = s.dir.join("store.sqlite");
    let text = std::fs::read_to_string(&s.config).unwrap();
    let events = text
        .lines()
        .find_map(|l| l.strip_prefix("events_topic = \""))
        .map(|l| l.trim_end_matches('"').to_owned())
        .unwrap();
    let stored = |store: &std::path::Path| -> BTreeMap<String, i64> {
        let Ok(q) = QueryConnection::open(store) else { return BTreeMap::new() };
        q.query("SELECT symbol, sum(events) AS n FROM rollup GROUP BY symbol", 100)
            .unwrap_or_default()
            .iter()
            .map(|r| (r["symbol"].as_str().unwrap_or_default().to_owned(), r["n"].as_i64().unwrap_or(0)))
            .collect()
    };
    let total = |m: &BTreeMap<String, i64>| m.values().sum::<i64>();
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    let process_api = free_addr();
    let mut process = start_role_with(&s.config, "process", &s.log, &["--api-addr", &process_api]);
    let start = Instant::now();
    while total(&stored(&store)) < 200 {
        assert!(start.elapsed() < Duration::from_secs(90), "no output:\n{}", std::fs::read_to_string(&s.log).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingest.kill_9();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let at_kill = total(&stored(&store));
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    // The restarted role delivers again before the venue stops.
    let start = Instant::now();
    while total(&stored(&store)) < at_kill + 300 {
        assert!(start.elapsed() < Duration::from_secs(90), "no output after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = stop_feed(&mut s, &mut ingest).await;
    // Everything in the topic, read back, and the store caught up with it.
    let records = common::read_topic(&s.broker.bootstrap, &events, PARTITIONS, usize::MAX, Duration::from_secs(5));
    let start = Instant::now();
    while total(&stored(&store)) < records.len() as i64 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // GET /v1/log on the Kafka path: each partition's watermarks and the store's position in it.
    let http = reqwest::Client::new();
    let log: serde_json::Value =
        http.get(format!("http://{process_api}/v1/log")).send().await.unwrap().json().await.unwrap();
    assert_eq!(log["mode"], "kafka", "{log}");
    let parts = log["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), PARTITIONS as usize, "{log}");
    let sum = |k: &str| parts.iter().map(|p| p[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!(
        (sum("start"), sum("end"), sum("committed"), sum("lag")),
        (0, records.len() as i64, records.len() as i64, 0),
        "{log}"
    );
    process.interrupt();
    let mut ids = std::collections::BTreeSet::new();
    for m in &records {
        let v = plugin_sdk::StreamDataView::parse(&m.payload).unwrap();
        assert!(
            ids.insert((v.symbol_id, v.trade_id)),
            "trade {} of symbol {} is in the topic twice",
            v.trade_id,
            v.symbol_id
        );
    }
    let sent_total: usize = sent.values().map(Vec::len).sum();
    assert!(records.len() > 500 && records.len() <= sent_total, "{} in the topic of {sent_total} sent", records.len());
    assert_eq!(total(&stored(&store)), records.len() as i64, "{}", std::fs::read_to_string(&s.log).unwrap());
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.matches("role=Ingest").count() >= 2, "the ingest role did not restart:\n{log}");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The value of an unlabelled (or first) series of `name` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The broker stopped for 30 s while both roles run (its processes frozen with SIGSTOP, then
/// continued). Both roles recover by themselves: every record the sources decoded was delivered
/// to Kafka or counted as failed, and the store rolls up exactly what the topic holds. The broker is
/// a noida-db server of the test's own (`noida-db` on the PATH, as CI installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_for_30_s_loses_nothing_counted() {
    let mut s = setup("broker-stop", rescale, |config| config).await;
    let broker_dir = s.dir.join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let port = free_addr().rsplit(':').next().unwrap().to_owned();
    let mut broker = Command::new("noida-db")
        .args(["start", "--only", "kafka", "--host", "127.0.0.1", "--kafka-port", &port, "--data-dir"])
        .arg(&broker_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("noida-db on the PATH (python3 -m pip install noida-db==0.2.3)");
    let bootstrap = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(&bootstrap).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "the broker did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text: String = text
        .lines()
        .map(|l| if l.starts_with("brokers = ") { format!("brokers = \"{bootstrap}\"\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&s.config, text).unwrap();
    let events = std::fs::read_to_string(&s.config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("events_topic = \"").map(|l| l.trim_end_matches('"').to_owned()))
        .unwrap();
    let store = s.dir.join("store.sqlite");
    let stored = || -> i64 {
        QueryConnection::open(&store)
            .ok()
            .and_then(|q| q.query("SELECT sum(events) AS n FROM rollup", 1).ok())
            .and_then(|rows| rows.first().and_then(|r| r["n"].as_i64()))
            .unwrap_or(0)
    };
    let ingest_api = free_addr();
    let mut ingest = start_role_with(&s.config, "ingest", &s.log, &["--api-addr", &ingest_api]);
    let mut process = start_role(&s.config, "process", &s.log);
    let start = Instant::now();
    while stored() < 200 {
        assert!(start.elapsed() < Duration::from_secs(90), "no output:\n{}", std::fs::read_to_string(&s.log).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freeze = |signal: &str| {
        assert!(Command::new("pkill").args([signal, "-f"]).arg(&broker_dir).status().unwrap().success());
    };
    freeze("-STOP");
    tokio::time::sleep(Duration::from_secs(30)).await;
    freeze("-CONT");
    let at_resume = stored();
    let start = Instant::now();
    while stored() < at_resume + 300 {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no recovery:\n{}",
            std::fs::read_to_string(&s.log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The venue stops; ingest delivers what it holds; the counters are read before it stops.
    let sim = s.sim.take().unwrap();
    sim.shutdown().await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let http = reqwest::Client::new();
    let metrics = http.get(format!("http://{ingest_api}/metrics")).send().await.unwrap().text().await.unwrap();
    ingest.interrupt();
    let decoded = metric(&metrics, "sluice_decode_records_total");
    let delivered = metric(&metrics, "sluice_kafka_records_delivered_total");
    let failed = metric(&metrics, "sluice_kafka_delivery_errors_total");
    assert!(decoded > 1000.0, "{metrics}");
    assert_eq!(delivered + failed, decoded, "decoded {decoded}, delivered {delivered}, failed {failed}");
    let records = common::read_topic(&bootstrap, &events, PARTITIONS, usize::MAX, Duration::from_secs(5));
    assert_eq!(records.len() as f64, delivered, "the topic vs what Kafka acknowledged");
    let start = Instant::now();
    while stored() < records.len() as i64 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    process.interrupt();
    assert_eq!(stored(), records.len() as i64, "{}", std::fs::read_to_string(&s.log).unwrap());
    let _ = Command::new("pkill").arg("-f").arg(&broker_dir).status();
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The Druid sink's transactions failing for 30 s: a producer under the process role's own
/// transactional id (a zombie instance with the same name, as the broker sees it) initialises again
/// and again, and each time the broker fences the role's producer, so the role's transactions fail
/// and are aborted; the role resumes from its last commit with a new producer, which is fenced in
/// turn. Once the zombie stops, the role catches up. The Druid topic then holds every trade the
/// venue sent exactly once: nothing of an aborted transaction is visible, nothing is lost. (A
/// `read_committed` reader attached across the fencing stalls on the broker these tests run
/// against, a noida-db server; progress is counted with new readers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn druid_transactions_failing_for_30_s_lose_nothing_and_repeat_nothing() {
    let (mut s, druid_topic, _posted) = druid_setup("druid-fenced").await;
    let bootstrap = s.broker.bootstrap.clone();
    let config = std::fs::read_to_string(&s.config).unwrap();
    let group =
        config.lines().find_map(|l| l.strip_prefix("group = \"").map(|l| l.trim_end_matches('"').to_owned())).unwrap();
    let instance = config
        .lines()
        .find_map(|l| l.strip_prefix("instance = \"").map(|l| l.trim_end_matches('"').to_owned()))
        .unwrap();
    let transactional_id = sluice::sink::druid::transactional_id(&group, &instance);
    let mut ingest = start_role(&s.config, "ingest", &s.log);
    let mut process = start_role(&s.config, "process", &s.log);
    let mut counter = CommittedCount::new(&bootstrap, &druid_topic);
    let log = || std::fs::read_to_string(&s.log).unwrap_or_default();
    let start = Instant::now();
    while counter.update() < 200 {
        assert!(start.elapsed() < Duration::from_secs(90), "no output:\n{}", log());
    }
    let failures = |text: &str| text.matches("process role failed").count();
    let failed_before = failures(&log());
    // The zombie: 30 s of init_transactions under the role's id, every 200 ms.
    let zombie = {
        let (bootstrap, id) = (bootstrap.clone(), transactional_id.clone());
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let mut inits = 0;
            while start.elapsed() < Duration::from_secs(30) {
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("transactional.id", &id)
                    .create()
                    .unwrap();
                if producer.init_transactions(Duration::from_secs(5)).is_ok() {
                    inits += 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            inits
        })
    };
    let inits = zombie.await.unwrap();
    assert!(inits > 10, "the zombie initialised only {inits} times");
    let fenced = failures(&log()) - failed_before;
    assert!(fenced >= 3, "the role's transactions did not fail ({fenced} failures):\n{}", log());
    // Counted by new readers from here on: on the broker these tests run against, a read_committed
    // reader that was attached while the zombie fenced the role's transactions stops advancing (a
    // new reader sees every committed row).
    let committed_now = || {
        let mut reader = CommittedCount::new(&bootstrap, &druid_topic);
        let mut seen = reader.update();
        // Until a whole second brings nothing new (the first polls wait for the assignment).
        for _ in 0..30 {
            let now = reader.update();
            if now == seen && now > 0 {
                break;
            }
            seen = now;
        }
        seen
    };
    let at_resume = committed_now();
    let start = Instant::now();
    while committed_now() < at_resume + 300 {
        assert!(start.elapsed() < Duration::from_secs(90), "no recovery:\n{}", log());
    }
    let sent = stop_feed(&mut s, &mut ingest).await;
    let total: u64 = sent.values().map(|t| t.len() as u64).sum();
    let (mut seen, mut last_progress) = (committed_now(), Instant::now());
    while seen < total && last_progress.elapsed() < Duration::from_secs(30) {
        let now = committed_now();
        if now > seen {
            (seen, last_progress) = (now, Instant::now());
        }
    }
    process.interrupt();
    let (_, message) = generated_spec(&s);
    assert_exactly_once(&druid_rows(&bootstrap, &druid_topic, &message), &sent);
    drop(s.broker);
    let _ = std::fs::remove_dir_all(&s.dir);
}
