//! `sluice replay` with the real binary, beside a running `sluice run` on the same data directory.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use plugin_sdk::StreamDataView;
use sluice::feedsim::{FeedSim, FeedSimConfig, Venue};
use sluice::sink::embedded::{EmbeddedStore, QueryConnection};

mod common;

use common::{SluiceProcess, api_call, free_addr};

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
    for (_, bytes) in sluice::log::local::read_all(&log).unwrap() {
        let v = StreamDataView::parse(&bytes).unwrap();
        let bucket = v.timestamp_ms.div_euclid(60_000) * 60_000;
        let side = if v.is_buy { "buy" } else { "sell" };
        let e = out.entry((bucket, symbols[&v.symbol_id].clone(), side.to_owned())).or_insert((0, 0, i64::MIN));
        e.0 += 1;
        e.1 += v.volume_e8;
        e.2 = e.2.max(v.price_e8);
    }
    out
}

/// A running `sluice run` on the local log whose Binance source's chain is one link, `prices`,
/// doubling prices (`double_price.wasm`), fed by the simulator at `rate` trades/s; returned once
/// the store has rolled up `events` trades.
struct Live {
    sim: Option<FeedSim>,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    store: std::path::PathBuf,
    api: String,
    process: SluiceProcess,
}

fn events(t: &Buckets) -> i64 {
    t.values().map(|v| v.0).sum()
}

async fn run_live(name: &str, rate: f64, events_first: i64) -> Live {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: rate, ..FeedSimConfig::default() }).await.unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-replay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{dir}"

[process]
max_wait_ms = 100

[plugins.prices]
path = "{plugins}/double_price.wasm"

[[source]]
name = "binance"
url = "{url}"
subscribe = ['{{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","ethusdt@aggTrade"],"id":1}}']
decode = "binance"
transforms = ["prices"]
"#,
            dir = dir.display(),
            plugins = env!("SLUICE_PLUGIN_DIR"),
            url = sim.url(Venue::Binance),
        ),
    )
    .unwrap();
    let (store, log) = (dir.join("store.sqlite"), dir.join("sluice.log"));
    let api = free_addr();
    let process = SluiceProcess::run(&config, &log, &["--api-addr", &api], Some(TOKEN));
    let start = Instant::now();
    while events(&table(&store, "rollup")) < events_first {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Live { sim: Some(sim), dir, config, store, api, process }
}

/// Uploads `rescale.wasm` (configured as nothing: a pass-through) as a new version of `prices` and
/// activates it: the fixed transform.
async fn activate_the_fix(http: &reqwest::Client, api: &str) {
    let url = format!("http://{api}/v1/plugins/prices");
    let fixed = std::fs::read(format!("{}/rescale.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let (status, uploaded) = api_call(http, reqwest::Method::PUT, url.clone(), TOKEN, Some(fixed.into())).await;
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
    let (dir, config, store) = (live.dir.clone(), live.config.clone(), live.store.clone());
    let http = reqwest::Client::new();
    activate_the_fix(&http, &live.api).await;
    // The replay, while trades keep flowing into the live role.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["replay", "--config"])
                .arg(&config)
                .args(["--since", "0"])
                .env_remove("RUST_LOG")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("replayed into rollup"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    live.sim.take().unwrap().shutdown().await;
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
