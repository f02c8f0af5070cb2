//! `sluice replay` with the real binary, beside a running `sluice run` on the same data directory.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use feedsim::{FeedSim, FeedSimConfig, Venue};
use plugin_sdk::StreamDataView;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice::sink::embedded::{EmbeddedStore, QueryConnection};

use crate::common;

use common::config::{self, BINANCE_BTC_ETH, ConfigToml, Source};
use common::{SluiceProcess, TestBroker, api_call, free_addr, read_topic, unique_topic};

const TOKEN: &str = "replay-test-token";

/// (bucket, symbol, side) -> (events, quantity e8, highest price e8).
type Buckets = BTreeMap<(i64, String, String), (i64, i64, i64)>;

fn table(store: &std::path::Path, table: &str) -> Buckets {
    let Ok(q) = QueryConnection::open(store) else { return Buckets::new() };
    let sql = format!("SELECT bucket_ms, symbol, side, events, qty_sum_e8, price_max FROM {table}");
    q.query(&sql, 10_000)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let key = (
                r["bucket_ms"].as_i64().unwrap(),
                r["symbol"].as_str().unwrap().to_owned(),
                r["side"].as_str().unwrap().to_owned(),
            );
            let price = (r["price_max"].as_f64().unwrap() * 1e8).round() as i64;
            (key, (r["events"].as_i64().unwrap(), r["qty_sum_e8"].as_i64().unwrap(), price))
        })
        .collect()
}

/// The log's records rolled up here, independently of sluice: what a fresh run of a pass-through
/// chain over the same records gives, per minute bucket.
fn expected_from_log(dir: &std::path::Path) -> Buckets {
    let log = dir.join("log.sqlite");
    let names = rusqlite::Connection::open(&log).unwrap();
    let mut stmt = names.prepare("SELECT id, name FROM symbols").unwrap();
    let symbols: BTreeMap<u32, String> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    let mut out = Buckets::new();
    for (_, bytes) in sluice::handoff::local::read_all(&log).unwrap() {
        roll_up(&mut out, &bytes, &symbols);
    }
    out
}

/// The record `bytes` rolled up into `buckets` by minute, symbol (named by `symbols`) and side.
fn roll_up(buckets: &mut Buckets, bytes: &[u8], symbols: &BTreeMap<u32, String>) {
    let v = StreamDataView::parse(bytes).unwrap();
    let bucket = v.timestamp_ms.div_euclid(60_000) * 60_000;
    let side = if v.is_buy { "buy" } else { "sell" };
    let e = buckets.entry((bucket, symbols[&v.symbol_id].clone(), side.to_owned())).or_insert((0, 0, i64::MIN));
    e.0 += 1;
    e.1 += v.volume_e8;
    e.2 = e.2.max(v.price_e8);
}

/// A running `sluice run` whose Binance source's chain is one link, `prices`, doubling prices
/// (`double_price.wasm`), fed by the simulator at `rate` trades/s: on the local log, or on the
/// hand-off and sink `handoff` configures (`[kafka]`, `[sink.druid]`).
struct Live {
    sim: Option<FeedSim>,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    store: std::path::PathBuf,
    /// The child's log.
    log: std::path::PathBuf,
    api: String,
    process: SluiceProcess,
}

fn events(t: &Buckets) -> i64 {
    t.values().map(|v| v.0).sum()
}

/// A running `sluice run` on the local log, returned once the store has rolled up `events_first`
/// trades.
async fn run_live(name: &str, rate: f64, events_first: i64) -> Live {
    let live = start_live(name, rate, |config| config).await;
    live.wait_for_rollup(events_first).await;
    live
}

/// The live instance: Binance on the simulator at `rate` trades a second through `prices` (the
/// doubling plugin), its configuration finished by `handoff` (a `[kafka]` table, a sink).
async fn start_live(name: &str, rate: f64, handoff: impl FnOnce(ConfigToml) -> ConfigToml) -> Live {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: rate, ..FeedSimConfig::default() }).await.unwrap();
    let dir = common::fresh_dir(&format!("replay-{name}"));
    let config = ConfigToml::new(&dir)
        .process("max_wait_ms", 100)
        .process("group", unique_topic("replay-group"))
        .process("instance", "a")
        .plugin("prices", "double_price.wasm")
        .source(Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC_ETH).decode("binance").link("prices", &[]));
    let config = handoff(config).save();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let api = free_addr();
    let process = SluiceProcess::run(&config, &log, &["--api-addr", &api], Some(TOKEN));
    Live { sim: Some(sim), dir, config, store, log, api, process }
}

impl Live {
    /// Waits until the store has rolled up `n` trades (a start compiles every plugin, which a busy
    /// machine can take a minute over).
    async fn wait_for_rollup(&self, n: i64) {
        let start = Instant::now();
        while events(&table(&self.store, "rollup")) < n {
            assert!(start.elapsed() < Duration::from_secs(180), "{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `sluice replay --config <config> <args>`.
    fn replay(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["replay", "--config"])
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

/// Uploads `rescale.wasm` (configured as nothing: a pass-through) as a new version of `prices` and
/// activates it: the fixed transform.
async fn activate_the_fix(http: &reqwest::Client, api: &str) {
    let url = format!("http://{api}/v1/plugins/prices");
    let fixed = std::fs::read(format!("{}/rescale.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let put = format!("{url}?replace=true");
    let (status, uploaded) = api_call(http, reqwest::Method::PUT, put, TOKEN, Some(fixed.into())).await;
    assert_eq!(status, 201, "{uploaded}");
    let body = serde_json::json!({ "version": uploaded["version"] }).to_string();
    let (status, view) =
        api_call(http, reqwest::Method::POST, format!("{url}/activate"), TOKEN, Some(body.into())).await;
    assert_eq!(status, 200, "{view}");
}

/// A transform that doubles prices runs live; a pass-through version of the same link is uploaded
/// and activated; `sluice replay --since 0 --into fixed` (while the live instance still runs)
/// rebuilds every bucket through the chain as it is now into `replay_fixed`. That table equals a
/// fresh roll-up of the log's records without doubling, bucket by bucket (events, exact quantities,
/// highest price); the live `rollup` is not touched (equal before and after, its prices doubled).
/// The same replay as a job of the running instance (`POST /v1/replay`, its progress on
/// `GET /v1/replay/{id}`) gives the same table. A range after every trade replays nothing, and the
/// replay tables are listed and dropped over the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_its_own_table_uses_the_current_versions_and_leaves_live_rows_alone() {
    let mut live = run_live("table", 200.0, 300).await;
    let (dir, config, store, api) = (live.dir.clone(), live.config.clone(), live.store.clone(), live.api.clone());
    // The venue stops; the live store catches up with the log and stays as it is.
    live.sim.take().unwrap().shutdown().await;
    let expected = expected_from_log(&dir);
    let start = Instant::now();
    while events(&table(&store, "rollup")) < events(&expected) && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected = expected_from_log(&dir);
    let live_before = table(&store, "rollup");
    assert_eq!(events(&live_before), events(&expected));
    // Live prices are doubled.
    for (key, (_, _, price)) in &live_before {
        assert_eq!(*price, expected[key].2 * 2, "{key:?}");
    }

    // The fix: a pass-through version of the link, uploaded and activated on the running instance.
    let http = reqwest::Client::new();
    activate_the_fix(&http, &api).await;

    let replay = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["replay", "--config"])
            .arg(&config)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = replay(&["--since", "0", "--into", "fixed"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("replayed into replay_fixed"), "{stdout}");
    assert_eq!(table(&store, "replay_fixed"), expected, "{stdout}");
    assert_eq!(table(&store, "rollup"), live_before, "the live rows changed");

    // A range after every trade: an empty table. A bad name and a reversed range are refused.
    let last = expected.keys().map(|k| k.0).max().unwrap() + 120_000;
    let out = replay(&["--since", &last.to_string(), "--into", "later"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table(&store, "replay_later").is_empty());
    let out = replay(&["--since", "0", "--into", "Bad-Name"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("replay table name"));
    let out = replay(&["--since", "2026-12-01T10:00:00Z", "--until", "2026-12-01T09:00:00Z", "--into", "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--until must be later"));

    // The same as a job of the running instance: POST /v1/replay, then its progress to the end.
    let jobs = format!("http://{api}/v1/replay");
    let body = serde_json::json!({ "since": "1970-01-01T00:00:00Z", "into": "api" }).to_string();
    assert_eq!(http.post(&jobs).body(body.clone()).send().await.unwrap().status().as_u16(), 401);
    let (status, bad) =
        api_call(&http, reqwest::Method::POST, jobs.clone(), TOKEN, Some(r#"{"since":"yesterday"}"#.into())).await;
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("bad_request")), "{bad}");
    let (status, job) = api_call(&http, reqwest::Method::POST, jobs.clone(), TOKEN, Some(body.into())).await;
    assert_eq!(status, 202, "{job}");
    let job_url = format!("{jobs}/{}", job["id"]);
    let start = Instant::now();
    let done = loop {
        let (status, view) = api_call(&http, reqwest::Method::GET, job_url.clone(), TOKEN, None).await;
        assert_eq!(status, 200, "{view}");
        if view["state"] != "running" {
            break view;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((done["state"].as_str(), done["table"].as_str()), (Some("done"), Some("replay_api")), "{done}");
    assert_eq!(done["rows"].as_i64(), Some(events(&expected)), "{done}");
    assert_eq!(table(&store, "replay_api"), expected);
    let (status, _) = api_call(&http, reqwest::Method::GET, format!("{jobs}/999"), TOKEN, None).await;
    assert_eq!(status, 404);
    assert!(EmbeddedStore::drop_replay(&store, "api").unwrap());

    // Listed and dropped over the API (dropping needs the token).
    let tables_url = format!("http://{api}/v1/replay/tables");
    let (status, listed) = api_call(&http, reqwest::Method::GET, tables_url.clone(), TOKEN, None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["tables"],
        serde_json::json!([
            { "name": "fixed", "table": "replay_fixed", "rows": expected.len() },
            { "name": "later", "table": "replay_later", "rows": 0 }
        ])
    );
    let later = format!("{tables_url}/later");
    let unauthorized = http.delete(&later).send().await.unwrap().status().as_u16();
    assert_eq!(unauthorized, 401);
    let (status, dropped) = api_call(&http, reqwest::Method::DELETE, later.clone(), TOKEN, None).await;
    assert_eq!((status, &dropped["dropped"]), (200, &serde_json::json!("later")), "{dropped}");
    let (status, _) = api_call(&http, reqwest::Method::DELETE, later, TOKEN, None).await;
    assert_eq!(status, 404);
    assert_eq!(EmbeddedStore::replay_tables(&store).unwrap(), vec![("fixed".to_owned(), expected.len() as i64)]);
    live.process.interrupt();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replay into `rollup` itself while the live role goes on committing: a doubling transform runs
/// live, a pass-through version is activated, and `sluice replay --since 0` rebuilds every bucket
/// while trades keep arriving. The replay catches up with the live position and swaps the range in
/// under the store's write lock, rolling up the records below the live position itself; the live
/// role rolls up the rest. Once the venue stops and the live role has caught up, `rollup` equals a
/// fresh roll-up of every record in the log without doubling, bucket by bucket (events, exact
/// quantities, highest price): nothing was counted twice or left out around the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_rollup_counts_live_records_arriving_during_it_once() {
    let mut live = run_live("rollup", 500.0, 500).await;
    let (dir, store) = (live.dir.clone(), live.store.clone());
    let http = reqwest::Client::new();
    activate_the_fix(&http, &live.api).await;
    // The replay, while trades keep flowing into the live role.
    let stdout = replay_into_rollup(&mut live).await;
    let start = Instant::now();
    while events(&table(&store, "rollup")) < events(&expected_from_log(&dir))
        && start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = expected_from_log(&dir);
    assert!(events(&expected) > 1_000, "only {} trades", events(&expected));
    assert_eq!(table(&store, "rollup"), expected, "{stdout}");
    // The staging table went with the swap.
    assert!(EmbeddedStore::replay_tables(&store).unwrap().is_empty());
    live.process.interrupt();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replay into `rollup` with a configuration that does not name the sources whose records are in
/// the range is refused before anything is deleted: it could not rebuild their buckets. The refusal
/// names the sources and says to add them; every bucket of `rollup` is as it was, and no staging
/// table is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_rollup_without_the_ranges_sources_is_refused_and_deletes_nothing() {
    let mut live = run_live("unnamed", 200.0, 300).await;
    let (dir, store) = (live.dir.clone(), live.store.clone());
    // The venue stops; the live store catches up with the log and stays as it is.
    live.sim.take().unwrap().shutdown().await;
    let start = Instant::now();
    while events(&table(&store, "rollup")) < events(&expected_from_log(&dir))
        && start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = table(&store, "rollup");
    assert_eq!(events(&before), events(&expected_from_log(&dir)));
    // The same data directory, but the one source is named differently: its records are in the log.
    let other = dir.join("other.toml");
    let text = std::fs::read_to_string(&live.config).unwrap();
    std::fs::write(&other, text.replacen("name = \"binance\"", "name = \"elsewhere\"", 1)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["replay", "--config"])
        .arg(&other)
        .args(["--since", "0"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("binance") && stderr.contains("add them"), "{stderr}");
    assert_eq!(table(&store, "rollup"), before, "a refused replay changed buckets");
    assert!(EmbeddedStore::replay_tables(&store).unwrap().is_empty());
    live.process.interrupt();
    let _ = std::fs::remove_dir_all(&dir);
}

// Replay from Kafka: the same, with the events topic of a real Kafka-protocol broker as the
// hand-off.

/// Partitions of the test's events topic.
const PARTITIONS: i32 = 3;

/// The test's topics on the broker, named for this run.
struct Topics {
    bootstrap: String,
    names: config::Topics,
}

impl std::ops::Deref for Topics {
    type Target = config::Topics;

    fn deref(&self) -> &config::Topics {
        &self.names
    }
}

impl Topics {
    fn new(broker: &TestBroker) -> Self {
        Topics { bootstrap: broker.bootstrap.clone(), names: config::Topics::unique() }
    }

    /// `config` with the `[kafka]` table for them.
    fn kafka(&self, config: ConfigToml) -> ConfigToml {
        config.kafka(&self.bootstrap, &self.names, PARTITIONS.into())
    }

    fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique_topic("replay-test-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap()
    }

    /// Records in `topic` (the sum of its partitions' high watermarks).
    fn len(&self, topic: &str, partitions: i32) -> usize {
        let consumer = self.consumer();
        (0..partitions).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1).sum::<i64>()
            as usize
    }

    /// The events topic's records rolled up here, independently of sluice (symbol names from the
    /// dictionary topic, whose record at offset n names id n + 1): what a fresh run of a
    /// pass-through chain over the same records gives, per minute bucket.
    fn expected(&self) -> Buckets {
        let names = read_topic(&self.bootstrap, &self.symbols, 1, self.len(&self.symbols, 1), Duration::from_secs(30));
        let names: BTreeMap<u32, String> = names
            .iter()
            .enumerate()
            .map(|(i, m)| (i as u32 + 1, String::from_utf8(m.payload.clone()).unwrap()))
            .collect();
        let want = self.len(&self.events, PARTITIONS);
        let records = read_topic(&self.bootstrap, &self.events, PARTITIONS, want, Duration::from_secs(60));
        assert_eq!(records.len(), want, "the events topic was not read whole");
        let mut out = Buckets::new();
        for m in &records {
            roll_up(&mut out, &m.payload, &names);
        }
        out
    }

    /// The offsets `group` has committed for the events topic, by partition (none for the embedded
    /// store's live role, which keeps them in the store).
    fn committed(&self, group: &str) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(&self.events, p);
        }
        let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        got.elements()
            .iter()
            .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
            .collect()
    }
}

/// Starts a replay job `{"since": 0, "into": into}` on the instance at `api` and cancels it at
/// once; returns the job's final view.
async fn cancelled_job(http: &reqwest::Client, api: &str, into: &str) -> serde_json::Value {
    let jobs = format!("http://{api}/v1/replay");
    let body = serde_json::json!({ "since": 0, "into": into }).to_string();
    let (status, job) = api_call(http, reqwest::Method::POST, jobs.clone(), TOKEN, Some(body.into())).await;
    assert_eq!(status, 202, "{job}");
    let job_url = format!("{jobs}/{}", job["id"]);
    let (status, _) = api_call(http, reqwest::Method::DELETE, job_url.clone(), TOKEN, None).await;
    assert_eq!(status, 202);
    let start = Instant::now();
    loop {
        let (_, view) = api_call(http, reqwest::Method::GET, job_url.clone(), TOKEN, None).await;
        if view["state"] != "running" {
            return view;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `sluice replay --since 0` on `live`'s configuration into `rollup` while trades flow, which must
/// succeed and say so; then the venue stops, 1.5 s later. What the replay printed.
async fn replay_into_rollup(live: &mut Live) -> String {
    let config = live.config.clone();
    let replay = move || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["replay", "--config"])
            .arg(&config)
            .args(["--since", "0"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = tokio::task::spawn_blocking(replay).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("replayed into rollup"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    live.sim.take().unwrap().shutdown().await;
    stdout.into_owned()
}

fn group_of(config: &std::path::Path) -> String {
    sluice::config::Config::load(config).unwrap().process.group
}

fn only(t: &Buckets, keep: impl Fn(i64) -> bool) -> Buckets {
    t.iter().filter(|(k, _)| keep(k.0)).map(|(k, v)| (k.clone(), *v)).collect()
}

/// Replay from Kafka with the embedded store. A doubling transform runs live on the events topic of
/// a real Kafka-protocol broker; the pass-through version is activated; `sluice replay --since 0`
/// runs while trades keep arriving, reading the topic with a consumer of its own and swapping the
/// range into `rollup` at the live position the store commits per partition. Once the venue stops
/// and the live role has caught up, `rollup` equals a fresh roll-up of the topic's records bucket by
/// bucket (events, exact quantities, highest price): live records arriving during the replay are
/// counted once. The live group's offsets are untouched. Then, with the venue stopped: `--into`
/// a table of its own equals the same, alone or for a time window (found in the topic by
/// offsets-for-times), and so does a job of the running instance; once retention deleted records of
/// a partition, a range before them is refused with the earliest replayable time, and a range from
/// that time replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_kafka_rebuilds_the_range_exactly_while_the_live_role_goes_on() {
    let broker = TestBroker::start("replay-kafka");
    let topics = Topics::new(&broker);
    let mut live = start_live("kafka", 500.0, |config| topics.kafka(config)).await;
    live.wait_for_rollup(500).await;
    let (config, store) = (live.config.clone(), live.store.clone());
    let group = group_of(&config);
    let http = reqwest::Client::new();
    activate_the_fix(&http, &live.api).await;
    // Into `rollup`, while trades keep flowing into the live role.
    let stdout = replay_into_rollup(&mut live).await;
    let start = Instant::now();
    while events(&table(&store, "rollup")) < topics.len(&topics.events, PARTITIONS) as i64
        && start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = topics.expected();
    assert!(events(&expected) > 1_000, "only {} trades", events(&expected));
    assert_eq!(table(&store, "rollup"), expected, "{stdout}\n{}", live.log_text());
    assert!(EmbeddedStore::replay_tables(&store).unwrap().is_empty());
    // The live role's positions are the store's, and no group committed anything for it.
    let positions = sluice::sink::embedded::stored_offsets(&store, &topics.events).unwrap();
    assert_eq!(positions.iter().map(|p| p.2).sum::<i64>(), topics.len(&topics.events, PARTITIONS) as i64);
    assert!(topics.committed(&group).is_empty(), "{:?}", topics.committed(&group));

    // Into tables of their own: the whole topic, the last minute bucket on, and before it.
    let out = live.replay(&["--since", "0", "--into", "fixed"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(table(&store, "replay_fixed"), expected);
    assert_eq!(table(&store, "rollup"), expected);
    let last = expected.keys().map(|k| k.0).max().unwrap();
    let out = live.replay(&["--since", &(last + 1).to_string(), "--into", "recent"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(table(&store, "replay_recent"), only(&expected, |b| b >= last));
    let out = live.replay(&["--since", "0", "--until", &last.to_string(), "--into", "early"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(table(&store, "replay_early"), only(&expected, |b| b < last));

    // The same as a job of the running instance.
    let jobs = format!("http://{}/v1/replay", live.api);
    let body = serde_json::json!({ "since": 0, "into": "api" }).to_string();
    let (status, job) = api_call(&http, reqwest::Method::POST, jobs.clone(), TOKEN, Some(body.into())).await;
    assert_eq!(status, 202, "{job}");
    let job_url = format!("{jobs}/{}", job["id"]);
    let start = Instant::now();
    let done = loop {
        let (_, view) = api_call(&http, reqwest::Method::GET, job_url.clone(), TOKEN, None).await;
        if view["state"] != "running" {
            break view;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((done["state"].as_str(), done["table"].as_str()), (Some("done"), Some("replay_api")), "{done}");
    assert_eq!(table(&store, "replay_api"), expected);
    assert!(topics.committed(&group).is_empty());
    // Cancelled: no table is left.
    let view = cancelled_job(&http, &live.api, "cancelled").await;
    assert_eq!(view["state"], "failed", "{view}");
    assert!(view["error"].as_str().unwrap_or_default().contains("stopped"), "{view}");
    assert!(!EmbeddedStore::replay_tables(&store).unwrap().iter().any(|(name, _)| name == "cancelled"));

    // Retention deletes the first half of the fullest partition.
    let consumer = topics.consumer();
    let (partition, high) = (0..PARTITIONS)
        .map(|p| (p, consumer.fetch_watermarks(&topics.events, p, Duration::from_secs(10)).unwrap().1))
        .max_by_key(|(_, high)| *high)
        .unwrap();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &topics.bootstrap).create().unwrap();
    let mut cut = TopicPartitionList::new();
    cut.add_partition_offset(&topics.events, partition, Offset::Offset(high / 2)).unwrap();
    admin.delete_records(&cut, &AdminOptions::new()).await.unwrap();
    let out = live.replay(&["--since", "0", "--into", "gone"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("partition {partition} below offset {}", high / 2)), "{stderr}");
    let earliest: i64 = stderr
        .split("the earliest replayable time is ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(table(&store, "replay_gone").is_empty(), "a refused replay left a table");
    let out = live.replay(&["--since", &earliest.to_string(), "--into", "held"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Whole buckets from the first after any trade the deleted records can hold: the first record
    // held's receive time plus the clock skew margin, so none of them is missing there.
    assert_eq!(earliest % 60_000, 0, "{stderr}");
    assert_eq!(table(&store, "replay_held"), only(&expected, |b| b >= earliest));
    live.process.interrupt();
    let _ = std::fs::remove_dir_all(&live.dir);
}

/// The rows a `read_committed` reader of `topic` (all partitions) sees up to each partition's end,
/// decoded with the descriptor `spec` carries into the JSON Druid would read.
fn druid_rows(bootstrap: &str, topic: &str, spec: &serde_json::Value) -> Vec<serde_json::Value> {
    let decoder = &spec["spec"]["ioConfig"]["inputFormat"]["protoBytesDecoder"];
    let descriptor =
        base64::engine::general_purpose::STANDARD.decode(decoder["descriptorString"].as_str().unwrap()).unwrap();
    let pool = prost_reflect::DescriptorPool::decode(descriptor.as_slice()).unwrap();
    let message = pool.get_message_by_name(decoder["protoMessageType"].as_str().unwrap()).unwrap();
    let consumer = common::committed_reader_to_end(bootstrap, topic, PARTITIONS);
    let mut rows = Vec::new();
    let mut ended = std::collections::BTreeSet::new();
    let start = Instant::now();
    while ended.len() < PARTITIONS as usize && start.elapsed() < Duration::from_secs(30) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let bytes = m.payload().unwrap_or_default();
                let row = prost_reflect::DynamicMessage::decode(message.clone(), bytes).unwrap();
                rows.push(serde_json::to_value(&row).unwrap());
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            _ => {}
        }
    }
    rows
}

/// Druid rows rolled up as `Buckets` (per minute, symbol and side: rows, exact quantity, highest price).
fn druid_buckets(rows: &[serde_json::Value]) -> Buckets {
    let mut out = Buckets::new();
    for r in rows {
        let ts: i64 = r["timestampMs"].as_str().unwrap().parse().unwrap();
        let key = (
            ts.div_euclid(60_000) * 60_000,
            r["symbol"].as_str().unwrap().to_owned(),
            r["side"].as_str().unwrap().to_owned(),
        );
        let e8 = |field: &str| (r[field].as_f64().unwrap_or(0.0) * 1e8).round() as i64;
        let e = out.entry(key).or_insert((0, 0, i64::MIN));
        e.0 += 1;
        e.1 += e8("qty");
        e.2 = e.2.max(e8("price"));
    }
    out
}

/// Replay from Kafka with the Druid sink. A doubling transform runs live into the Druid topic; the
/// pass-through version is activated; `sluice replay --since 0 --into fixed` writes the rows again,
/// in transactions, to a topic of its own, `<topic>.replay.fixed`, and says what to run on the Druid
/// side. That topic, read as Druid reads it (`read_committed`, decoded with nothing but the
/// descriptor of the spec `sluice druid spec ... separate --name fixed` writes, which points at it),
/// equals a fresh roll-up of the events topic's records bucket by bucket, while the live Druid topic
/// does not; the live group's committed offsets are untouched. A second replay under the same name
/// is refused and leaves the topic as it was, and a replay with no name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_the_druid_sink_writes_a_topic_of_its_own_for_the_generated_spec() {
    let broker = TestBroker::start("replay-druid");
    let topics = Topics::new(&broker);
    let druid_topic = unique_topic("druid");
    // An Overlord nobody answers at: the sink keeps trying to apply its spec; rows flow regardless.
    let handoff = |config: ConfigToml| {
        topics.kafka(config).druid(&format!("http://{}", free_addr()), &druid_topic).set(
            "sink.druid",
            "datasource",
            "trades",
        )
    };
    let mut live = start_live("druid", 300.0, handoff).await;
    let group = group_of(&live.config);
    let live_spec = {
        let cfg = sluice::config::Config::load(&live.config).unwrap();
        sluice::sink::druid::supervisor_spec(
            cfg.sink.druid.as_ref().unwrap(),
            sluice::proto::DESCRIPTOR_SET,
            &topics.bootstrap,
        )
        .unwrap()
        .into_json()
    };
    let start = Instant::now();
    while druid_rows(&topics.bootstrap, &druid_topic, &live_spec).len() < 300 {
        assert!(start.elapsed() < Duration::from_secs(90), "{}", live.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let http = reqwest::Client::new();
    activate_the_fix(&http, &live.api).await;
    live.sim.take().unwrap().shutdown().await;
    let start = Instant::now();
    let live_rows = loop {
        let rows = druid_rows(&topics.bootstrap, &druid_topic, &live_spec);
        if rows.len() >= topics.len(&topics.events, PARTITIONS) || start.elapsed() > Duration::from_secs(30) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let expected = topics.expected();
    assert_eq!(live_rows.len() as i64, events(&expected), "{}", live.log_text());
    let committed = topics.committed(&group);
    assert!(!committed.is_empty());

    let out = live.replay(&["--since", "0"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--into NAME"));
    let out = live.replay(&["--since", "0", "--into", "fixed"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let replay_topic = format!("{druid_topic}.replay.fixed");
    assert!(stdout.contains(&format!("replayed into topic {replay_topic}")), "{stdout}");
    assert!(stdout.contains("sluice druid spec --config") && stdout.contains("separate --name fixed"), "{stdout}");
    assert!(stdout.contains("reindex --name fixed"), "{stdout}");

    // The datasource of its own reads that topic with the spec sluice generates for it.
    let spec = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["druid", "spec", "--config"])
        .arg(&live.config)
        .args(["separate", "--name", "fixed"])
        .output()
        .unwrap();
    assert!(spec.status.success(), "{}", String::from_utf8_lossy(&spec.stderr));
    let spec: serde_json::Value = serde_json::from_slice(&spec.stdout).unwrap();
    assert_eq!(spec["spec"]["ioConfig"]["topic"], replay_topic.as_str());
    assert_eq!(spec["spec"]["dataSchema"]["dataSource"], "trades_replay_fixed");
    let replayed = druid_rows(&topics.bootstrap, &replay_topic, &spec);
    assert_eq!(druid_buckets(&replayed), expected);
    assert_ne!(druid_buckets(&live_rows), expected, "the live rows were never doubled");
    assert_eq!(topics.committed(&group), committed, "the replay moved the live group's offsets");

    // A replay job cancelled: its topic goes.
    let view = cancelled_job(&http, &live.api, "cancelled").await;
    assert_eq!(view["state"], "failed", "{view}");
    assert!(view["error"].as_str().unwrap_or_default().contains("stopped"), "{view}");
    let metadata = topics.consumer().fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let names: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    assert!(names.contains(&replay_topic.as_str()), "{names:?}");
    assert!(!names.contains(&format!("{druid_topic}.replay.cancelled").as_str()), "{names:?}");

    // The same name again: refused, the topic kept.
    let out = live.replay(&["--since", "0", "--into", "fixed"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("already holds"), "{stderr}");
    assert_eq!(druid_rows(&topics.bootstrap, &replay_topic, &spec).len(), replayed.len());
    live.process.interrupt();
    let _ = std::fs::remove_dir_all(&live.dir);
}

/// The replay's reader of a topic, against a real broker: offsets-for-times finds, per partition, the
/// first record produced at or after a time (the end where there is none); a read stops at the
/// offsets it is given and at each partition's end, in batches of at most the size asked for, and
/// moves its positions past what it handed over; the first record at an offset is found per
/// partition; and it never commits for any group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_range_reader_finds_records_by_time_and_reads_between_offsets() {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use sluice::handoff::Positions;
    use sluice::handoff::kafka::range::RangeReader;
    let broker = TestBroker::start("replay-range");
    let kafka = common::kafka_config();
    let topic = unique_topic("range");
    sluice::handoff::kafka::ensure_topics(&kafka, &broker.bootstrap, &[&topic], 2).await.unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    // Partition p gets records "p:i" produced at times base + 1_000 * i, i = 0..10. The base is
    // recent: a broker deletes records older than its retention (a week by default) at any moment,
    // and times from 1970 were deleted between the produce and the first read.
    let base = sluice::clock::now_ms() - 600_000;
    for p in 0..2 {
        for i in 0..10i64 {
            let payload = format!("{p}:{i}");
            let record = BaseRecord::<(), str>::to(&topic).partition(p).payload(&payload).timestamp(base + 1_000 * i);
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let text = |records: &[&[u8]]| records.iter().map(|r| String::from_utf8(r.to_vec()).unwrap()).collect::<Vec<_>>();
    let (bootstrap, t) = (broker.bootstrap.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        let reader = RangeReader::new(&kafka, &bootstrap, &t).unwrap();
        assert_eq!(reader.partitions().unwrap(), [0, 1]);
        assert_eq!(reader.watermarks().unwrap(), BTreeMap::from([(0, (0, 10)), (1, (0, 10))]));
        assert_eq!(reader.offsets_for_time(base + 4_500).unwrap(), Positions::from([(0, 5), (1, 5)]));
        assert_eq!(reader.offsets_for_time(base + 4_000).unwrap(), Positions::from([(0, 4), (1, 4)]));
        assert_eq!(reader.offsets_for_time(0).unwrap(), Positions::from([(0, 0), (1, 0)]));
        assert_eq!(reader.offsets_for_time(base + 99_000).unwrap(), Positions::from([(0, 10), (1, 10)]));
        let first = reader.first_records(&Positions::from([(0, 3), (1, 9)])).unwrap();
        assert_eq!((first[&0].as_slice(), first[&1].as_slice()), (&b"0:3"[..], &b"1:9"[..]));
        // Partition 0 from 2 up to 6, partition 1 from 7 up to the end (past it: stops there);
        // batches of at most 3.
        let stop = AtomicBool::new(false);
        let mut from = Positions::from([(0, 2), (1, 7)]);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let done = reader
            .read(&mut from, &Positions::from([(0, 6), (1, 50)]), 3, &stop, |records| {
                sizes.push(records.len());
                got.extend(text(records));
                Ok::<_, sluice::handoff::kafka::KafkaError>(())
            })
            .unwrap();
        assert!(done);
        got.sort();
        assert_eq!(got, ["0:2", "0:3", "0:4", "0:5", "1:7", "1:8", "1:9"]);
        assert!(sizes.iter().all(|n| *n <= 3), "{sizes:?}");
        assert_eq!(from, Positions::from([(0, 6), (1, 10)]));
        // Read on from there: partition 0 up to 8 only (partition 1 is at its end, and absent from `to`).
        let mut got = Vec::new();
        reader
            .read(&mut from, &Positions::from([(0, 8)]), 100, &stop, |records| {
                got.extend(text(records));
                Ok::<_, sluice::handoff::kafka::KafkaError>(())
            })
            .unwrap();
        assert_eq!(got, ["0:6", "0:7"]);
        assert_eq!(from, Positions::from([(0, 8), (1, 10)]));
        // Stopped: false, and the positions stay.
        stop.store(true, Ordering::Relaxed);
        let stopped = reader.read(&mut from, &Positions::from([(0, 10)]), 100, &stop, |_| {
            Ok::<_, sluice::handoff::kafka::KafkaError>(())
        });
        assert!(!stopped.unwrap());
        assert_eq!(from[&0], 8);
    })
    .await
    .unwrap();
}

/// Trades of three symbols, one per partition of the events topic, written straight to the topic
/// as the ingest role writes them but with message times of their own: a trade every 200 ms over
/// 20 minutes (6 000 of them), produced with its trade time. So a range from minute 12 is found
/// mid-stream in every partition (its first record by message time, less the five minutes' clock
/// skew margin, is that of minute 7: offset 700 of each partition).
struct Trades {
    /// The first trade's time: a whole minute, 40 minutes ago.
    base: i64,
    /// The source's and the symbols' ids in the dictionary topic.
    source: u32,
    symbols: [u32; 3],
}

const TRADES: i64 = 6_000;
const EVENTS_RETENTION_MS: &str = "172800000";
const TRADE_EVERY_MS: i64 = 200;

impl Trades {
    async fn new(topics: &Topics) -> Self {
        let kafka =
            sluice::handoff::kafka::KafkaConfig { symbols_topic: topics.symbols.clone(), ..common::kafka_config() };
        // Kept for two days: the Druid sink's checkpoint topic takes the same retention.
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &topics.bootstrap).create().unwrap();
        let events = NewTopic::new(&topics.events, PARTITIONS, TopicReplication::Fixed(1))
            .set("retention.ms", EVENTS_RETENTION_MS);
        for created in admin.create_topics(&[events], &AdminOptions::new()).await.unwrap() {
            created.unwrap();
        }
        sluice::handoff::kafka::ensure_symbols_topic(&kafka, &topics.bootstrap).await.unwrap();
        let (bootstrap, dictionary) = (topics.bootstrap.clone(), topics.symbols.clone());
        let (source, symbols) = tokio::task::spawn_blocking(move || {
            let names =
                sluice::symbols::Symbols::shared(&kafka, &bootstrap, &dictionary, Duration::from_secs(30)).unwrap();
            let symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"].map(|s| names.intern(s));
            (names.source_id("recorded").unwrap(), symbols)
        })
        .await
        .unwrap();
        let now = sluice::clock::now_ms() - 40 * 60_000;
        Trades { base: now - now.rem_euclid(60_000), source, symbols }
    }

    /// Trade `i`'s time.
    fn time(&self, i: i64) -> i64 {
        self.base + i * TRADE_EVERY_MS
    }

    /// Produces trades `from..to`, trade `i` to partition `i % 3` with message time `time(i)`.
    fn produce(&self, bootstrap: &str, topic: &str, from: i64, to: i64) {
        use prost::Message as _;
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", bootstrap).set("acks", "all").create().unwrap();
        for i in from..to {
            let t = self.time(i);
            let record = sluice::proto::StreamData {
                source_id: self.source,
                symbol_id: self.symbols[(i % 3) as usize],
                // Prices that now and then jump by more than 1%: outlier-filter's decisions depend
                // on the last price it accepted.
                price_e8: (30_000 + (i * 7_919) % 2_000) * 100_000_000,
                volume_e8: 1_000_000,
                timestamp_ms: t,
                is_buy: i % 2 == 0,
                trade_id: i as u64 + 1,
                received_at_us: t * 1_000,
            };
            let payload = record.encode_to_vec();
            let key = format!("{}/{}", record.source_id, record.symbol_id);
            let message = BaseRecord::to(topic).partition((i % 3) as i32).key(&key).payload(&payload).timestamp(t);
            producer.send(message).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }
}

/// A Druid topic's rows as a `read_committed` reader sees them (decoded as `sluice.v1.SinkRow`):
/// (time, symbol, side, price e8, quantity e8), sorted.
fn sink_rows(bootstrap: &str, topic: &str) -> Vec<(i64, String, String, i64, i64)> {
    use prost::Message as _;
    let consumer = common::committed_reader_to_end(bootstrap, topic, PARTITIONS);
    let (mut rows, mut ended, start) = (Vec::new(), std::collections::BTreeSet::new(), Instant::now());
    while ended.len() < PARTITIONS as usize {
        assert!(start.elapsed() < Duration::from_secs(30), "{topic} was not read to its end");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let row = sluice::proto::SinkRow::decode(m.payload().unwrap_or_default()).unwrap();
                let e8 = |v: f64| (v * 1e8).round() as i64;
                rows.push((row.timestamp_ms, row.symbol, row.side, e8(row.price), e8(row.qty)));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            _ => {}
        }
    }
    rows.sort();
    rows
}

/// What a replay of stateful chains is compared on: the store's buckets, or the Druid topic's rows.
#[derive(Debug, PartialEq)]
enum Output {
    Buckets(Buckets),
    Rows(Vec<(i64, String, String, i64, i64)>),
}

impl Output {
    /// What of it is at or after `since`.
    fn since(&self, since: i64) -> Output {
        match self {
            Output::Buckets(b) => Output::Buckets(only(b, |t| t >= since)),
            Output::Rows(rows) => Output::Rows(rows.iter().filter(|r| r.0 >= since).cloned().collect()),
        }
    }

    /// The trades in it.
    fn trades(&self) -> i64 {
        match self {
            Output::Buckets(b) => events(b),
            Output::Rows(rows) => rows.len() as i64,
        }
    }
}

/// A process role running a stateful chain over [`Trades`] on Kafka, into the embedded store or
/// (`druid`) the Druid sink, then replays of ranges that start mid-stream, with the real binary.
///
/// The chain is `chaos` in `count` mode (each symbol's records numbered 1, 2, 3, ... as their
/// quantity, state format `chaos.count@1`) and `outlier-filter` (each price judged against the last
/// one it accepted). The trades are produced in ten parts, each read and committed by the live
/// role before the next, so the sink keeps checkpoints of the chains' state all along the stream.
/// A replay from minute 12 starts from the newest checkpoint at or before its first records: its
/// output equals the live output of the range exactly (chains started empty there would count
/// from 1 again, and judge the first price against nothing). Then retention deletes the first
/// records of every partition, up to just below the range's first ones, so that no checkpoint
/// left fits the range: the replay is refused with the earliest replayable time, and a replay
/// from that time equals the live output from there.
async fn a_stateful_replay_from_kafka_equals_the_live_output(name: &str, druid: bool) {
    let broker = TestBroker::start(name);
    let topics = Topics::new(&broker);
    let trades = Trades::new(&topics).await;
    let dir = common::fresh_dir(&format!("replay-{name}"));
    let druid_topic = unique_topic("druid");
    let group = unique_topic("replay-group");
    std::fs::write(dir.join("none.jsonl"), "").unwrap();
    let source = Source::file("recorded", &dir.join("none.jsonl"))
        .decode("binance")
        .link("chaos", &[("mode", "count")])
        .link("outlier-filter", &[("threshold_pct", "1")]);
    let mut config = ConfigToml::new(&dir)
        .process("max_wait_ms", 50)
        .process("group", group.as_str())
        .process("instance", "a")
        .process("checkpoint_interval_ms", 100)
        .plugin("chaos", "chaos.wasm")
        .source(source);
    config = topics.kafka(config);
    if druid {
        // An Overlord nobody answers at: the sink keeps trying to apply its spec; rows flow regardless.
        config = config.druid(&format!("http://{}", free_addr()), &druid_topic).set(
            "sink.druid",
            "segment_granularity",
            "MINUTE",
        );
    }
    let config = config.save();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let mut live = SluiceProcess::run(&config, &log, &["--role", "process", "--api-addr", &free_addr()], None);
    // Where the live role stands: the store's committed positions, or the group's with Druid.
    let committed = || -> i64 {
        if druid {
            topics.committed(&group).values().sum()
        } else if store.exists() {
            sluice::sink::embedded::stored_offsets(&store, &topics.events).unwrap_or_default().iter().map(|p| p.2).sum()
        } else {
            0
        }
    };
    for part in 0..10 {
        let (from, to) = (part * TRADES / 10, (part + 1) * TRADES / 10);
        let (t, bootstrap, events) = (&trades, topics.bootstrap.clone(), topics.events.clone());
        t.produce(&bootstrap, &events, from, to);
        let start = Instant::now();
        while committed() < to {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(start.elapsed() < Duration::from_secs(90), "{} of {to} committed:\n{text}", committed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The next part's first commit is past the checkpoint interval: it takes a checkpoint.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    live.interrupt();
    let output = |into: Option<&str>| match (druid, into) {
        (false, into) => Output::Buckets(table(&store, &into.map_or("rollup".into(), |n| format!("replay_{n}")))),
        (true, None) => Output::Rows(sink_rows(&topics.bootstrap, &druid_topic)),
        (true, Some(n)) => Output::Rows(sink_rows(&topics.bootstrap, &format!("{druid_topic}.replay.{n}"))),
    };
    let live_output = output(None);
    let replay = |since: i64, into: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["replay", "--config"])
            .arg(&config)
            .args(["--since", &since.to_string(), "--into", into])
            .env("RUST_LOG", "sluice=info")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // From minute 12: a checkpoint at or before offset 700 of every partition.
    let since = trades.base + 12 * 60_000;
    let (ok, stderr) = replay(since, "mid");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("replay starts the chains from a checkpoint"), "{stderr}");
    let want = live_output.since(since);
    // outlier-filter refused some of the range's 2 400 trades.
    assert!((100..2_400).contains(&want.trades()), "{want:?}");
    assert_eq!(output(Some("mid")), want, "the replayed range vs the live output\n{stderr}");

    if druid {
        // The checkpoint topic keeps its records as long as the events topic does, whatever their size.
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &topics.bootstrap).create().unwrap();
        let topic = format!("{druid_topic}.checkpoints");
        let described = admin.describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new()).await;
        let described = described.unwrap().remove(0).unwrap();
        let value = |key: &str| described.get(key).and_then(|e| e.value.clone()).unwrap_or_default();
        assert_eq!(value("retention.ms"), EVENTS_RETENTION_MS);
        assert_eq!((value("retention.bytes").as_str(), value("cleanup.policy").as_str()), ("-1", "delete"));
    }
    // The checkpoints the sink kept: the events topic's positions, and the counting link's state
    // (symbol id -> records counted).
    type Kept = Vec<(BTreeMap<i32, i64>, BTreeMap<u32, i64>)>;
    let counts = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> BTreeMap<u32, i64> {
        let number = |b: &[u8], n: usize| b.iter().take(n).rev().fold(0i64, |v, d| v << 8 | i64::from(*d));
        entries.iter().map(|(k, v)| (number(k, 4) as u32, number(v, 8))).collect()
    };
    let kept: Kept = if druid {
        let kafka = common::kafka_config();
        let (bootstrap, events) = (topics.bootstrap.clone(), topics.events.clone());
        let topic = format!("{druid_topic}.checkpoints");
        tokio::task::spawn_blocking(move || {
            use sluice::sink::druid::checkpoint;
            let reader = sluice::handoff::kafka::range::RangeReader::new(&kafka, &bootstrap, &topic).unwrap();
            let listed = checkpoint::list(&reader).unwrap();
            let ours = listed.iter().filter(|c| c.topic == events);
            ours.map(|c| {
                let entries = checkpoint::load(&reader, c).unwrap().entries;
                let link0 = entries.into_iter().filter(|e| e.0 == "recorded" && e.1 == 0).map(|e| (e.3, e.4));
                (c.positions.clone(), counts(link0.collect()))
            })
            .collect()
        })
        .await
        .unwrap()
    } else {
        let conn = rusqlite::Connection::open(&store).unwrap();
        let mut stmt = conn.prepare("SELECT id, positions FROM state_checkpoints ORDER BY id").unwrap();
        let rows: Vec<(i64, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        let mut entries = conn
            .prepare(
                "SELECT key, value FROM checkpoint_state WHERE checkpoint = ?1 AND source = 'recorded' AND link = 0",
            )
            .unwrap();
        rows.into_iter()
            .map(|(id, positions)| {
                let link0 = entries.query_map([id], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap);
                (serde_json::from_str(&positions).unwrap(), counts(link0.collect()))
            })
            .collect()
    };
    // Each holds the state its positions imply: partition p holds symbol p's records only, so the
    // link has counted as many of them as the position says.
    for (positions, counted) in &kept {
        for (p, symbol) in trades.symbols.iter().enumerate() {
            let at = positions.get(&(p as i32)).copied().unwrap_or(0);
            assert_eq!(counted.get(symbol).copied().unwrap_or(0), at, "{positions:?} {counted:?}");
        }
    }
    let kept: Vec<BTreeMap<i32, i64>> = kept.into_iter().map(|(positions, _)| positions).collect();
    assert!(kept.len() >= 10, "{kept:?}");
    // Retention deletes every partition below `700 - k`, k the smallest that leaves no checkpoint
    // between there and the range's first record (700): none fits the range any more, while the
    // records held still start before it (the retention check alone lets the range through).
    let first = 700;
    let k = (1..100)
        .find(|k| {
            !kept
                .iter()
                .any(|c| (0..PARTITIONS).all(|p| (first - k..=first).contains(&c.get(&p).copied().unwrap_or(0))))
        })
        .unwrap();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &topics.bootstrap).create().unwrap();
    let mut cut = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        cut.add_partition_offset(&topics.events, p, Offset::Offset(first - k)).unwrap();
    }
    admin.delete_records(&cut, &AdminOptions::new()).await.unwrap();
    let (ok, stderr) = replay(since, "gone");
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("no checkpoint of the chains' state is at or before the range's first record"), "{stderr}");
    let earliest: i64 = stderr
        .split("the earliest replayable time is ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(earliest > since && earliest % 60_000 == 0, "{earliest}: {stderr}");
    assert!(earliest < trades.time(TRADES), "{earliest}: {stderr}");
    let (ok, stderr) = replay(earliest, "late");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("replay starts the chains from a checkpoint"), "{stderr}");
    assert_eq!(output(Some("late")), live_output.since(earliest), "the replay from the earliest time\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kafka hand-off, embedded store: see [`a_stateful_replay_from_kafka_equals_the_live_output`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_replay_from_kafka_into_the_store_starts_from_a_checkpoint() {
    a_stateful_replay_from_kafka_equals_the_live_output("stateful-kafka", false).await;
}

/// Kafka hand-off, Druid sink: see [`a_stateful_replay_from_kafka_equals_the_live_output`]. The
/// checkpoints are the sink's checkpoint topic's, written in its transactions; the live output is
/// the Druid topic's rows as a `read_committed` reader sees them, the replay's its replay topic's.
/// Druid itself cannot run here: the contract ends at the Druid topic, which is what Druid reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_replay_from_kafka_into_a_druid_topic_starts_from_a_checkpoint() {
    a_stateful_replay_from_kafka_equals_the_live_output("stateful-druid", true).await;
}
