//! The HTTP API over a real listener: the router served by `serve` on loopback port 0, spoken to with
//! an HTTP client, queries answered from a real embedded store file.

use crate::common;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;

use sluice::api::{ApiConfig, ApiState, Connections, Health, PluginDirectory, Secret, router, serve};
use sluice::plugin::registry::{Binding, BoundPlugin, Registry};
use sluice::plugin::{PluginInstance, Runtime, RuntimeSettings, bundled, version_of};
use sluice::sink::embedded::{EmbeddedStore, Row};
use sluice::symbols::Symbols;
use sluice::telemetry::Metrics;
use tokio::sync::oneshot;

/// A running API server.
struct Server {
    base: String,
    client: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config: &ApiConfig, store: Option<PathBuf>, health: Arc<Health>) -> Self {
        Server::serve(ApiState::new(config, store, health)).await
    }

    async fn serve(state: ApiState) -> Self {
        Server::serve_with(state, Connections::new(&ApiConfig::default(), Arc::default())).await
    }

    async fn serve_with(state: ApiState, limits: Connections) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        Server { base, client, stop, task }
    }

    async fn get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let response = self.client.get(format!("{}{path_and_query}", self.base)).send().await.unwrap();
        let status = response.status();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(content_type.as_deref(), Some("application/json"), "{path_and_query}");
        (status, response.json().await.unwrap())
    }

    async fn query(&self, sql: &str, limit: Option<usize>) -> (StatusCode, Value) {
        let mut params = vec![("sql", sql.to_owned())];
        params.extend(limit.map(|l| ("limit", l.to_string())));
        let query = encode_query(&params);
        self.get(&format!("/v1/query?{query}")).await
    }

    /// Stops the server and checks that `serve` returns, although the client still holds a pooled
    /// connection.
    async fn stop(self) {
        let _ = self.stop.send(());
        let served = tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("serve returns on shutdown");
        served.unwrap().unwrap();
    }
}

/// `k=v&...`, percent-encoded.
fn encode_query(params: &[(&str, String)]) -> String {
    let url = reqwest::Url::parse_with_params("http://x/", params).unwrap();
    url.query().unwrap_or_default().to_owned()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an API error: {body}"))
}

fn temp_store(name: &str) -> PathBuf {
    let dir = common::fresh_dir(&format!("api-{name}"));
    dir.join("store.db")
}

fn trade(ts: i64, symbol: &str, is_buy: bool, price_e8: i64, volume_e8: i64) -> Row {
    let (source, symbol) = ("binance".into(), symbol.into());
    Row { timestamp_ms: ts, source, symbol, is_buy, price_e8, volume_e8, received_at_us: 0 }
}

/// A store with one minute of three symbols: BTCUSDT (two buys), ETHUSDT (a sell), SOLUSDT (a buy).
fn filled_store(name: &str) -> (PathBuf, EmbeddedStore) {
    let path = temp_store(name);
    let mut store = EmbeddedStore::open(&path, Duration::from_secs(60)).unwrap();
    store
        .apply(
            &[
                trade(1_000, "BTCUSDT", true, 100_00000000, 1_00000000),
                trade(2_000, "BTCUSDT", true, 102_50000000, 50000000),
                trade(3_000, "ETHUSDT", false, 3000_00000000, 2_00000000),
                trade(4_000, "SOLUSDT", true, 150_00000000, 10_00000000),
            ],
            &[("sluice.events", 0, 4)],
        )
        .unwrap();
    (path, store)
}

#[tokio::test]
async fn liveness_answers_while_serving() {
    let server = Server::start(&ApiConfig::default(), None, Arc::new(Health::new())).await;
    assert_eq!(server.get("/health/live").await, (StatusCode::OK, json!({"status": "live"})));
    server.stop().await;
}

#[tokio::test]
async fn the_operator_page_is_one_self_contained_html_file() {
    let server = Server::start(&ApiConfig::default(), None, Arc::new(Health::new())).await;
    let response = server.client.get(format!("{}/", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert_eq!(content_type, "text/html; charset=utf-8");
    let page = response.text().await.unwrap();
    assert!(page.starts_with("<!doctype html>"), "{page}");
    // The elements the script fills, and every element it looks up, are in the markup.
    let mut ids: Vec<&str> = page.split("$(\"").skip(1).filter_map(|s| s.split('"').next()).collect();
    ids.extend(["ready", "checks", "records-total", "records-rate", "sources", "plugins", "series"]);
    for id in ids {
        assert!(page.contains(&format!("id=\"{id}\"")), "no element with id {id}");
    }
    // It reads the JSON routes, and loads nothing from anywhere else.
    for route in ["\"/health/ready\"", "\"/v1/sources\"", "\"/v1/plugins\"", "\"/v1/query?"] {
        assert!(page.contains(route), "the page does not fetch {route}");
    }
    // (The SVG namespace is an identifier for `createElementNS`, not an address anything loads.)
    let scanned = page.replace("\"http://www.w3.org/2000/svg\"", "\"\"");
    for external in ["src=", "href=", "http:", "https:", "@import", "url("] {
        assert!(!scanned.contains(external), "the page loads something from elsewhere: {external}");
    }
    // Data reaches the DOM as text, never as markup.
    assert!(!page.contains("innerHTML"));
    server.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_checks() {
    let health = Arc::new(Health::new());
    health.expect("kafka");
    let server = Server::start(&ApiConfig::default(), None, health.clone()).await;

    let (status, body) = server.get("/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, json!({"ready": false, "checks": {"kafka": {"ok": false, "detail": "not reported yet"}}}));

    health.set("kafka", true, "3 brokers");
    health.set("sink", true, "embedded store open");
    let (status, body) = server.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ready"], true);
    assert_eq!(body["checks"]["kafka"], json!({"ok": true, "detail": "3 brokers"}));

    // Set from another thread, as a component would.
    let h = health.clone();
    std::thread::spawn(move || h.set("sink", false, "disk full")).join().unwrap();
    let (status, body) = server.get("/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert_eq!(body["checks"]["sink"], json!({"ok": false, "detail": "disk full"}));
    assert_eq!(body["checks"]["kafka"]["ok"], true);
    server.stop().await;
}

#[tokio::test]
async fn query_answers_rows_in_column_order() {
    let (path, store) = filled_store("rows");
    let server = Server::start(&ApiConfig::default(), Some(path.clone()), Arc::new(Health::new())).await;
    let sql = "SELECT symbol, side, events, qty_sum_e8, price_min, price_max, bucket_ms FROM rollup ORDER BY symbol";
    let expected = json!({
        "columns": ["symbol", "side", "events", "qty_sum_e8", "price_min", "price_max", "bucket_ms"],
        "rows": [
            ["BTCUSDT", "buy", 2, 1_50000000, 100.0, 102.5, 0],
            ["ETHUSDT", "sell", 1, 2_00000000, 3000.0, 3000.0, 0],
            ["SOLUSDT", "buy", 1, 10_00000000, 150.0, 150.0, 0],
        ],
        "truncated": false,
    });
    // While the writer has the store open (WAL), and after it has closed it.
    assert_eq!(server.query(sql, None).await, (StatusCode::OK, expected.clone()));
    drop(store);
    assert_eq!(server.query(sql, None).await, (StatusCode::OK, expected));

    // Columns in the statement's order, whatever the table's.
    let (_, body) = server.query("SELECT events AS z, symbol AS a FROM rollup WHERE symbol = 'SOLUSDT'", None).await;
    assert_eq!(body["columns"], json!(["z", "a"]));
    assert_eq!(body["rows"], json!([[1, "SOLUSDT"]]));
    server.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn query_refuses_writes_and_reports_bad_sql() {
    let (path, _store) = filled_store("refuse");
    let server = Server::start(&ApiConfig::default(), Some(path.clone()), Arc::new(Health::new())).await;
    for sql in ["DELETE FROM rollup", "UPDATE rollup SET events = 0", "DROP TABLE rollup", "CREATE TABLE t (x)"] {
        let (status, body) = server.query(sql, None).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "read_only"), "{sql}: {body}");
    }
    let (_, body) = server.query("SELECT count(*) FROM rollup", None).await;
    assert_eq!(body["rows"], json!([[3]]), "nothing was written");

    let (status, body) = server.query("SELEC 1", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_sql"));
    assert!(body["error"]["message"].as_str().unwrap().contains("syntax error"), "{body}");
    let (status, body) = server.query("SELECT * FROM nowhere", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_sql"));
    assert!(body["error"]["message"].as_str().unwrap().contains("no such table: nowhere"), "{body}");
    let (status, body) = server.query("SELECT 1; DELETE FROM rollup", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_sql"));
    server.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn query_limits_rows_and_says_when_it_cut() {
    let (path, _store) = filled_store("limit");
    let config = ApiConfig { query_default_limit: 2, query_max_limit: 5, ..ApiConfig::default() };
    let server = Server::start(&config, Some(path.clone()), Arc::new(Health::new())).await;
    let sql = "SELECT symbol FROM rollup ORDER BY symbol";
    let (_, body) = server.query(sql, None).await;
    assert_eq!((body["rows"].clone(), body["truncated"].clone()), (json!([["BTCUSDT"], ["ETHUSDT"]]), json!(true)));
    let (_, body) = server.query(sql, Some(1)).await;
    assert_eq!((body["rows"].as_array().unwrap().len(), body["truncated"].clone()), (1, json!(true)));
    let (_, body) = server.query(sql, Some(3)).await;
    assert_eq!((body["rows"].as_array().unwrap().len(), body["truncated"].clone()), (3, json!(false)));
    let (_, body) = server.query(sql, Some(0)).await;
    assert_eq!((body["rows"].clone(), body["truncated"].clone()), (json!([]), json!(true)));

    let (status, body) = server.query(sql, Some(6)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"));
    assert!(body["error"]["message"].as_str().unwrap().contains("maximum of 5"), "{body}");
    // Malformed query strings get the JSON error too, not the framework's plain text.
    for bad in
        ["/v1/query?sql=SELECT%201&limit=many", "/v1/query?sql=SELECT%201&limit=-1", "/v1/query", "/v1/query?sql="]
    {
        let (status, body) = server.get(bad).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{bad}: {body}");
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn query_without_a_store_is_404_and_a_missing_file_503() {
    let server = Server::start(&ApiConfig::default(), None, Arc::new(Health::new())).await;
    let (status, body) = server.query("SELECT 1", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "no_store"));
    server.stop().await;

    let missing = temp_store("missing");
    let server = Server::start(&ApiConfig::default(), Some(missing.clone()), Arc::new(Health::new())).await;
    let (status, body) = server.query("SELECT 1", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    assert!(!missing.exists(), "a query never creates the store");
    server.stop().await;
    let _ = std::fs::remove_dir_all(missing.parent().unwrap());
}

#[tokio::test]
async fn a_runaway_query_is_stopped_at_its_deadline_and_frees_its_slot() {
    let (path, _store) = filled_store("timeout");
    let config = ApiConfig { query_timeout_ms: 300, query_concurrency: 1, ..ApiConfig::default() };
    let server = Server::start(&config, Some(path.clone()), Arc::new(Health::new())).await;
    let endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n";
    let started = Instant::now();
    let (status, body) = server.query(endless, None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::GATEWAY_TIMEOUT, "query_timeout"));
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // The one slot is free again: the statement was interrupted, not left running.
    let (status, body) = server.query("SELECT count(*) FROM rollup", None).await;
    assert_eq!((status, body["rows"].clone()), (StatusCode::OK, json!([[3]])));
    server.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// This process's resident memory, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split(' ').nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// Answers are bounded in bytes, not only in rows: a query that makes huge values is refused with
/// 422 `result_too_large`, and the process's memory stays bounded with every query slot busy with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_with_a_huge_answer_is_refused_and_memory_stays_bounded() {
    let (path, _store) = filled_store("huge");
    let config = ApiConfig { query_concurrency: 4, ..ApiConfig::default() };
    let server = Arc::new(Server::start(&config, Some(path.clone()), Arc::new(Health::new())).await);
    // 20 rows of 10 MB each, and one value of 100 MB.
    let many = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20) \
                SELECT hex(zeroblob(5000000)) AS big FROM n";
    let one = "SELECT hex(zeroblob(50000000)) AS big";
    let before = rss_bytes();
    let mut answers = Vec::new();
    for sql in [many, one, many, one] {
        let server = server.clone();
        answers.push(tokio::spawn(async move { server.query(sql, Some(1000)).await }));
    }
    for answer in answers {
        let (status, body) = answer.await.unwrap();
        assert_eq!((status, error_code(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "result_too_large"), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("bytes"), "{body}");
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 150 << 20, "memory grew by {} MiB", grown >> 20);
    // Ordinary answers still come back.
    let (status, body) = server.query("SELECT count(*) FROM rollup", None).await;
    assert_eq!((status, body["rows"].clone()), (StatusCode::OK, json!([[3]])));
    Arc::into_inner(server).unwrap().stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_large_bodies_answer_json() {
    let config = ApiConfig { max_body_bytes: 1024, ..ApiConfig::default() };
    let server = Server::start(&config, None, Arc::new(Health::new())).await;
    let (status, body) = server.get("/v2/nothing").await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    assert!(body["error"]["message"].as_str().unwrap().contains("/v2/nothing"));

    let response = server.client.post(format!("{}/health/live", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = response.headers().get("allow").unwrap().to_str().unwrap().to_owned();
    assert!(allow.contains("GET"), "{allow}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "method_not_allowed");

    let response = server.client.put(format!("{}/v1/query", server.base)).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "payload_too_large");
    // Under the limit, the same request reaches routing.
    let response = server.client.put(format!("{}/v1/query", server.base)).body(vec![b'x'; 512]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    server.stop().await;
}

/// A registry under a fresh directory, with the bundled `binance` plugin deployed and `rescale` bound
/// to a source whose config sets `scale`; served by an API that takes `token` (if any).
struct PluginServer {
    server: Server,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    worker: sluice::decode::Decoder,
    /// The trade id of the next test frame (the decoder drops repeated ids).
    next_trade: u64,
    dir: PathBuf,
}

impl PluginServer {
    async fn start(name: &str, token: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-api-plugins-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let metrics = Arc::new(Metrics::new());
        let settings = RuntimeSettings { max_instances: 16, max_memory_bytes: 64 << 20, ..RuntimeSettings::default() };
        let runtime = Arc::new(Runtime::new(settings, Arc::new(Symbols::new())).unwrap().with_metrics(metrics.clone()));
        let bindings = HashMap::from([
            ("binance".to_owned(), vec![Binding { source: "feed".into(), config: vec![] }]),
            (
                "rescale".to_owned(),
                vec![Binding { source: "scaled".into(), config: vec![("scale".into(), "2".into())] }],
            ),
        ]);
        let registry = Arc::new(Registry::open(runtime, &dir, HashMap::new(), bindings).unwrap());
        let slot = registry.deploy("binance", bundled::BINANCE).unwrap();
        let worker = sluice::decode::Decoder::bound(BoundPlugin::new(
            slot.clone(),
            PluginInstance::new(&slot.active(), &[]).unwrap(),
        ));
        let directory = Arc::new(PluginDirectory::default());
        directory.set(registry.clone());
        let config =
            ApiConfig { max_body_bytes: 1 << 20, token: token.map(|t| Secret(t.to_owned())), ..ApiConfig::default() };
        let state =
            ApiState::new(&config, None, Arc::new(Health::new())).with_plugins(directory).with_metrics(metrics.clone());
        PluginServer { server: Server::serve(state).await, registry, metrics, worker, next_trade: 1, dir }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = self.server.client.request(method, format!("{}{path}", self.server.base)).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(response.headers().get("www-authenticate").unwrap(), "Bearer");
        }
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A `PUT` of a plugin whose headers declare `length` bytes, with the token and no body sent;
    /// answers the status and the JSON body.
    async fn raw_put_declaring(&self, length: usize) -> (u16, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.server.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT /v1/plugins/binance HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
             content-length: {length}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// The bundled binance version is active, alone, and still decodes a trade.
    fn assert_untouched(&mut self) {
        let view = self.registry.get("binance").unwrap();
        assert_eq!(view.active.as_deref(), Some(version_of(bundled::BINANCE).as_str()));
        assert_eq!(view.versions.len(), 1, "{view:?}");
        assert_eq!(self.decode_one(), 1);
    }

    /// Decodes one new Binance trade on the worker; answers the records it gave.
    fn decode_one(&mut self) -> usize {
        self.next_trade += 1;
        let text =
            format!(r#"{{"e":"trade","E":1,"s":"BTCUSDT","t":{},"p":"1.5","q":"2","T":1,"m":false}}"#, self.next_trade);
        let frame = sluice::source::Frame {
            source: 1,
            received_at_us: 1,
            bytes: text.into(),
            oversized: None,
            overlap: false,
            file_offset: 0,
        };
        self.worker.decode(&[frame]).unwrap().records.len()
    }
}

const TOKEN: &str = "s3cret-token";

/// A `wasi:cli/command` component (host/tests/plugins/other-world), built by build.rs with the plugins.
fn other_world() -> Vec<u8> {
    std::fs::read(format!("{}/other_world.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap()
}

/// Every hostile upload gets its documented status and JSON error, stores nothing, and leaves the
/// active version serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_uploads_are_refused_and_the_active_version_keeps_serving() {
    use reqwest::Method;
    let mut p = PluginServer::start("hostile", Some(TOKEN)).await;
    let put = |name: &str| format!("/v1/plugins/{name}");
    // (plugin name, token, body, status, error code, part of the message)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, StatusCode, &'a str, &'a str);
    let cases: Vec<Case<'_>> = vec![
        // Refused before the body is read, so the body is small: a client still writing a large one
        // when the 401 and the close arrive sees a broken pipe instead of the answer. (With the token
        // this body would be a 422: the token is checked first.)
        ("binance", None, b"\0asm\x0d\0\x01\0".to_vec(), StatusCode::UNAUTHORIZED, "unauthorized", "Bearer"),
        (
            "binance",
            Some("wrong"),
            b"\0asm\x0d\0\x01\0".to_vec(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "not valid",
        ),
        (
            "binance",
            Some(TOKEN),
            b"MZ\x90\0 not wasm".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "not a WebAssembly",
        ),
        (
            "binance",
            Some(TOKEN),
            b"\0asm\x01\0\0\0".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "core wasm module",
        ),
        // An empty component: valid, but it implements nothing of our world.
        (
            "binance",
            Some(TOKEN),
            b"\0asm\x0d\0\x01\0".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "sluice:plugin/plugin@0.1.0",
        ),
        // A real component of another world: a WASI command.
        (
            "binance",
            Some(TOKEN),
            other_world(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "not a sluice plugin",
        ),
        (
            "binance",
            Some(TOKEN),
            b"\0asm\x0d\0\x01\0\x07\xff".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "compile",
        ),
        ("binance", Some(TOKEN), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin", "empty"),
        // outlier-filter's init does not know the bound source's `scale` key.
        (
            "rescale",
            Some(TOKEN),
            bundled::OUTLIER_FILTER.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "plugin_init_failed",
            "scaled",
        ),
        (
            "Bad..Name",
            Some(TOKEN),
            b"\0asm\x0d\0\x01\0".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid plugin name",
        ),
    ];
    for (name, token, body, status, code, message) in cases {
        let (got, body) = p.send(Method::PUT, &put(name), token, body).await;
        assert_eq!((got, error_code(&body)), (status, code), "{name} {token:?}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{text:?} lacks {message:?}");
        p.assert_untouched();
    }
    // Oversized: refused on the declared length, before a byte of the body is read. (Sent by hand:
    // an HTTP client still writing a large body when the 413 and the close arrive sees a broken pipe.)
    let (status, body) = p.raw_put_declaring(2 << 20).await;
    assert_eq!((status, error_code(&body)), (413, "payload_too_large"), "{body}");
    p.assert_untouched();
    assert!(p.registry.get("rescale").is_err(), "a refused plugin was created");
    // Nothing but the deployed version's blob is stored.
    assert_eq!(std::fs::read_dir(p.dir.join("blobs")).unwrap().count(), 1);
    // Mutations without the token never reach the registry; reads need none.
    for (method, path) in [
        (Method::POST, "/v1/plugins/binance/activate"),
        (Method::POST, "/v1/plugins/binance/rollback"),
        (Method::POST, "/v1/plugins/binance/promote"),
        (Method::DELETE, "/v1/plugins/binance/versions/sha256:0000000000000000"),
    ] {
        let (status, body) = p.send(method, path, None, vec![]).await;
        assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{path}");
    }
    let (status, _) = p.send(Method::GET, "/v1/plugins", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    // The refusals were counted by route and status.
    let metrics = p.metrics.render();
    for line in [
        r#"sluice_http_requests_total{method="PUT",route="/v1/plugins/{name}",status="401"} 2"#,
        r#"sluice_http_requests_total{method="PUT",route="/v1/plugins/{name}",status="413"} 1"#,
        r#"sluice_http_requests_total{method="PUT",route="/v1/plugins/{name}",status="400"} 1"#,
        r#"sluice_http_requests_total{method="PUT",route="/v1/plugins/{name}",status="422"} 7"#,
        r#"sluice_http_requests_total{method="GET",route="/v1/plugins",status="200"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line} in:\n{metrics}");
    }
    p.server.stop().await;
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// Without a configured token every change is refused, with a message that says how to allow them.
#[tokio::test]
async fn without_a_token_changes_are_refused() {
    let mut p = PluginServer::start("no-token", None).await;
    let (status, body) =
        p.send(reqwest::Method::PUT, "/v1/plugins/binance", Some("anything"), bundled::KRAKEN.to_vec()).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert!(body["error"]["message"].as_str().unwrap().contains("SLUICE_API_TOKEN"), "{body}");
    p.assert_untouched();
    p.server.stop().await;
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// Activating or shadowing a plugin that no source of the process runs is refused with 409 and a
/// reason, instead of answering 200 with nothing active and nothing shadowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_or_shadowing_a_plugin_no_source_uses_is_a_conflict() {
    use reqwest::Method;
    let p = PluginServer::start("unbound", Some(TOKEN)).await;
    let (status, up) = p.send(Method::PUT, "/v1/plugins/loner", Some(TOKEN), bundled::KRAKEN.to_vec()).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    let body = serde_json::to_vec(&json!({ "version": up["version"] })).unwrap();
    for path in ["/v1/plugins/loner/activate", "/v1/plugins/loner/activate?mode=shadow"] {
        let (status, answer) = p.send(Method::POST, path, Some(TOKEN), body.clone()).await;
        assert_eq!((status, error_code(&answer)), (StatusCode::CONFLICT, "conflict"), "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("no source") && message.contains("loner"), "{message}");
    }
    // Unknown plugins stay 404.
    let (status, _) = p.send(Method::POST, "/v1/plugins/nobody/activate", Some(TOKEN), body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Upload, idempotent re-upload, activate, shadow, promote, roll back and delete through HTTP, with
/// the state each call leaves checked through `GET` and on a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_uploaded_activated_shadowed_rolled_back_and_deleted() {
    use reqwest::Method;
    let mut p = PluginServer::start("lifecycle", Some(TOKEN)).await;
    let v1 = version_of(bundled::BINANCE);
    // Kraken's decoder is another rule than binance: taken under its name only when told to.
    let (status, body) = p.send(Method::PUT, "/v1/plugins/binance", Some(TOKEN), bundled::KRAKEN.to_vec()).await;
    assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, "not_same_rule"), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"kraken\"") && message.contains("?replace=true"), "{message}");
    let (status, listed) = p.send(Method::GET, "/v1/plugins/binance", None, vec![]).await;
    assert_eq!((status, listed["versions"].as_array().unwrap().len()), (StatusCode::OK, 1), "nothing stored: {listed}");
    let (status, body) =
        p.send(Method::PUT, "/v1/plugins/binance?replace=maybe", Some(TOKEN), bundled::KRAKEN.to_vec()).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
    let (status, up) =
        p.send(Method::PUT, "/v1/plugins/binance?replace=true", Some(TOKEN), bundled::KRAKEN.to_vec()).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    let v2 = up["version"].as_str().unwrap().to_owned();
    assert_eq!(v2, version_of(bundled::KRAKEN));
    assert_eq!(up["size_bytes"], bundled::KRAKEN.len());
    assert_eq!(up["digest"].as_str().unwrap().len(), 64);
    assert_eq!(up["created"], true);
    let (status, again) =
        p.send(Method::PUT, "/v1/plugins/binance?replace=true", Some(TOKEN), bundled::KRAKEN.to_vec()).await;
    assert_eq!((status, again["version"].clone(), again["created"].clone()), (StatusCode::OK, json!(v2), json!(false)));

    let activate = |version: &str| serde_json::to_vec(&json!({ "version": version })).unwrap();
    let (status, body) =
        p.send(Method::POST, "/v1/plugins/binance/activate?mode=bogus", Some(TOKEN), activate(&v2)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
    let (status, body) = p.send(Method::POST, "/v1/plugins/binance/activate", Some(TOKEN), b"{}".to_vec()).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
    let (status, body) =
        p.send(Method::POST, "/v1/plugins/binance/activate", Some(TOKEN), activate("sha256:0123456789abcdef")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_plugin"), "{body}");
    let (status, body) = p.send(Method::POST, "/v1/plugins/binance/promote", Some(TOKEN), vec![]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");

    // Shadow: v2 runs beside v1 on the worker's next batch, compared, and the output stays v1's.
    let (status, view) =
        p.send(Method::POST, "/v1/plugins/binance/activate?mode=shadow", Some(TOKEN), activate(&v2)).await;
    assert_eq!(
        (status, view["active"].clone(), view["shadow"]["version"].clone()),
        (StatusCode::OK, json!(v1), json!(v2))
    );
    p.assert_untouched_but_shadowed(&v2);

    let (status, view) = p.send(Method::POST, "/v1/plugins/binance/promote", Some(TOKEN), vec![]).await;
    assert_eq!((status, view["active"].clone(), view["previous"].clone()), (StatusCode::OK, json!(v2), json!(v1)));
    assert_eq!(view["shadow"], Value::Null);
    let (status, body) =
        p.send(Method::DELETE, &format!("/v1/plugins/binance/versions/{v2}"), Some(TOKEN), vec![]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, view) = p.send(Method::GET, "/v1/plugins/binance", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let active: Vec<&Value> = view["versions"].as_array().unwrap().iter().filter(|v| v["active"] == true).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["version"], v2.as_str());
    assert!(view["activated_at_ms"].as_i64().unwrap() > 0);

    let (status, view) = p.send(Method::POST, "/v1/plugins/binance/rollback", Some(TOKEN), vec![]).await;
    assert_eq!((status, view["active"].clone(), view["previous"].clone()), (StatusCode::OK, json!(v1), Value::Null));
    let (status, body) = p.send(Method::POST, "/v1/plugins/binance/rollback", Some(TOKEN), vec![]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, _) = p.send(Method::DELETE, &format!("/v1/plugins/binance/versions/{v2}"), Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) =
        p.send(Method::DELETE, &format!("/v1/plugins/binance/versions/{v2}"), Some(TOKEN), vec![]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_plugin"), "{body}");
    let (status, list) = p.send(Method::GET, "/v1/plugins", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
    assert_eq!(list["plugins"][0]["versions"].as_array().unwrap().len(), 1);
    p.assert_untouched();
    p.server.stop().await;
    let _ = std::fs::remove_dir_all(&p.dir);
}

impl PluginServer {
    /// A batch on the worker still delivers v1's output while `shadow` runs beside it and is compared.
    fn assert_untouched_but_shadowed(&mut self, shadow: &str) {
        assert_eq!(self.decode_one(), 1);
        let view = self.registry.get("binance").unwrap();
        let compared = view.shadow.unwrap();
        assert_eq!(compared.version, shadow);
        assert_eq!((compared.batches, compared.records_equal, compared.records_different), (1, 0, 1));
    }
}

/// A body sent without a declared length (chunked) is read up to the limit and then refused with the
/// same JSON 413 as a declared one.
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_with_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ApiConfig { max_body_bytes: 1024, token: Some(Secret(TOKEN.into())), ..ApiConfig::default() };
    let server = Server::serve(ApiState::new(&config, None, Arc::new(Health::new()))).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let chunk = vec![b'x'; 2048];
    let mut request = format!(
        "PUT /v1/plugins/binance HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        chunk.len()
    )
    .into_bytes();
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(error_code(&body), "payload_too_large");
    server.stop().await;
}

/// A raw connection to `server` that has sent `bytes` and sends nothing more.
async fn stalled(server: &Server, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads until the server closes `stream` (an error counts as closed); false if it is still open
/// after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A header that does not arrive whole within `header_read_timeout_ms` closes its connection, and so
/// does a connection that sends nothing; both are counted.
#[tokio::test]
async fn a_header_that_does_not_arrive_in_time_closes_the_connection() {
    let config = ApiConfig { header_read_timeout_ms: 300, ..ApiConfig::default() };
    let metrics = Arc::new(Metrics::new());
    let state = ApiState::new(&config, None, Arc::new(Health::new())).with_metrics(metrics.clone());
    let server = Server::serve_with(state, Connections::new(&config, metrics.clone())).await;
    let mut partial = stalled(&server, b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ").await;
    let mut silent = stalled(&server, b"").await;
    assert!(closed_within(&mut partial, Duration::from_secs(5)).await, "a partial header kept its connection");
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await, "a silent connection stayed open");
    assert_eq!(metrics.http_header_timeouts_total.get(), 2);
    // A whole request is answered as ever.
    assert_eq!(server.get("/health/live").await.0, StatusCode::OK);
    server.stop().await;
}

/// A request whose body does not arrive within `request_timeout_ms` is answered 408.
#[tokio::test]
async fn a_request_not_answered_in_time_is_408() {
    use tokio::io::AsyncReadExt;
    let config = ApiConfig { request_timeout_ms: 300, token: Some(Secret(TOKEN.into())), ..ApiConfig::default() };
    let server = Server::start(&config, None, Arc::new(Health::new())).await;
    let head = format!(
        "PUT /v1/plugins/binance HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: 1000\r\n\
         connection: close\r\n\r\nonly the start of the body"
    );
    let mut stream = stalled(&server, head.as_bytes()).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(error_code(&body), "request_timeout");
    server.stop().await;
}

/// At `max_connections` nothing more is served until a connection closes: a client waits in the
/// backlog, and is answered as soon as a slot frees.
#[tokio::test]
async fn connections_over_the_cap_wait_for_a_slot() {
    let config = ApiConfig { max_connections: 2, ..ApiConfig::default() };
    let server = Server::serve_with(
        ApiState::new(&config, None, Arc::new(Health::new())),
        Connections::new(&config, Arc::default()),
    )
    .await;
    let first = stalled(&server, b"GET /health/live HTTP/1.1\r\n").await;
    let _second = stalled(&server, b"GET /health/live HTTP/1.1\r\n").await;
    let url = format!("{}/health/live", server.base);
    let waiting = tokio::spawn(reqwest::Client::new().get(url.clone()).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third connection was served over the cap of 2");
    drop(first);
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("served once a slot freed");
    assert_eq!(answered.unwrap().unwrap().status(), StatusCode::OK);
    server.stop().await;
}

/// With `read_token`, reads need the token too, but for the health checks and the page's HTML.
#[tokio::test]
async fn with_read_token_reads_need_the_token() {
    let config = ApiConfig { read_token: true, token: Some(Secret(TOKEN.into())), ..ApiConfig::default() };
    let (store, _) = filled_store("read-token");
    let server = Server::start(&config, Some(store), Arc::new(Health::new())).await;
    let get = |path: &str, token: Option<&str>| {
        let mut request = server.client.get(format!("{}{path}", server.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status() }
    };
    for path in ["/v1/query?sql=SELECT%201", "/v1/sources", "/v1/plugins", "/v1/log", "/metrics", "/v1/replay/tables"] {
        assert_eq!(get(path, None).await, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(get(path, Some("wrong")).await, StatusCode::UNAUTHORIZED, "{path}");
        assert_ne!(get(path, Some(TOKEN)).await, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(get("/v1/query?sql=SELECT%201", Some(TOKEN)).await, StatusCode::OK);
    for path in ["/health/live", "/health/ready", "/"] {
        assert_ne!(get(path, None).await, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Without it (the default), reads are open as before.
    let open = Server::start(&ApiConfig::default(), None, Arc::new(Health::new())).await;
    assert_eq!(open.client.get(format!("{}/v1/sources", open.base)).send().await.unwrap().status(), StatusCode::OK);
    open.stop().await;
    server.stop().await;
}

/// `/v1/dead-letters` reads the store's dead letters newest first, each record decoded with its
/// symbol's name and the link and version that refused it; it filters by source and link, pages
/// with `before`, shows a payload that is not a whole record as hex, and refuses a bad `limit`.
#[tokio::test]
async fn dead_letters_are_read_decoded_newest_first_and_paged() {
    let (path, store) = filled_store("dead-letters");
    drop(store);
    let symbols = Arc::new(Symbols::new());
    let btc = symbols.intern("BTCUSDT");
    let record = |trade_id: u64, price_e8: i64| {
        let mut one = plugin_sdk::Records::new();
        one.push(&plugin_sdk::Record {
            source_id: 7,
            symbol_id: btc,
            price_e8,
            volume_e8: 25_000_000,
            timestamp_ms: 1_700_000_000_000 + trade_id as i64,
            is_buy: trade_id.is_multiple_of(2),
            trade_id,
            received_at_us: 5,
        });
        sluice_wire::Delimited::new(one.as_bytes()).next().unwrap().unwrap().to_vec()
    };
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        // `length` 0: the payload is whole.
        let insert = |source: &str, plugin: &str, reason: &str, bytes: &[u8], length: usize| {
            let length = if length == 0 { bytes.len() } else { length };
            conn.execute(
                "INSERT INTO dead_letters (at_ms, stage, source, plugin, reason, length, size, bytes) \
                 VALUES (1000, 'transform', ?1, ?2, ?3, ?4, 0, ?5)",
                rusqlite::params![source, plugin, reason, length as i64, bytes],
            )
            .unwrap();
        };
        insert("binance", "outlier-filter@sha256:aaaa", "too far", &record(1, 100_00000000), 0);
        insert("binance", "vwap-band@sha256:bbbb", "off the band", &record(2, 101_50000000), 0);
        insert("kraken", "outlier-filter@sha256:aaaa", "too far", &record(3, 99_00000000), 0);
        // A payload kept cut: not shown as a record.
        insert("binance", "outlier-filter@sha256:aaaa", "cut", &[0x08, 0x07, 0x10], 600_000);
    }
    let state = ApiState::new(&ApiConfig::default(), Some(path.clone()), Arc::new(Health::new()));
    let _ = state.dead_letter_source().symbols.set(symbols.clone());
    let server = Server::serve(state).await;

    let (status, body) = server.get("/v1/dead-letters").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let letters = body["dead_letters"].as_array().unwrap();
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["cut", "too far", "off the band", "too far"], "newest first: {body}");
    assert_eq!(letters[0]["record"], Value::Null, "{body}");
    assert_eq!(letters[0]["bytes_hex"], "080710", "{body}");
    assert_eq!(letters[0]["length"], 600_000, "{body}");
    let vwap = &letters[2];
    assert_eq!(
        (&vwap["source"], &vwap["link"], &vwap["version"]),
        (&json!("binance"), &json!("vwap-band"), &json!("sha256:bbbb"))
    );
    let r = &vwap["record"];
    assert_eq!(r["symbol"], "BTCUSDT", "{body}");
    assert_eq!((r["symbol_id"].as_u64(), r["trade_id"].as_u64()), (Some(u64::from(btc)), Some(2)), "{body}");
    assert_eq!((r["price"].as_str(), r["volume"].as_str()), (Some("101.5"), Some("0.25")), "{body}");
    assert_eq!((r["price_e8"].as_i64(), r["timestamp_ms"].as_i64()), (Some(101_50000000), Some(1_700_000_000_002)));
    assert_eq!((r["is_buy"].as_bool(), r["source_id"].as_u64()), (Some(true), Some(7)), "{body}");
    assert!(vwap.get("bytes_hex").is_none(), "{body}");
    assert_eq!(body["next_before"], Value::Null, "one page holds them all: {body}");

    // Filters: a source, a link (any version of it), both.
    let trade_ids = |body: &Value| -> Vec<u64> {
        body["dead_letters"].as_array().unwrap().iter().filter_map(|l| l["record"]["trade_id"].as_u64()).collect()
    };
    let (_, body) = server.get("/v1/dead-letters?source=kraken").await;
    assert_eq!(trade_ids(&body), [3], "{body}");
    let (_, body) = server.get("/v1/dead-letters?link=outlier-filter").await;
    assert_eq!(body["dead_letters"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(trade_ids(&body), [3, 1], "{body}");
    let (_, body) = server.get("/v1/dead-letters?link=outlier&source=binance").await;
    assert_eq!(body["dead_letters"].as_array().unwrap().len(), 0, "a link is matched by its whole name: {body}");

    // Pages: two, then the rest from `next_before`, nothing twice.
    let (_, first) = server.get("/v1/dead-letters?limit=2").await;
    assert_eq!(first["dead_letters"].as_array().unwrap().len(), 2, "{first}");
    let before = first["next_before"].as_i64().unwrap_or_else(|| panic!("a next page: {first}"));
    let (_, second) = server.get(&format!("/v1/dead-letters?limit=2&before={before}")).await;
    assert_eq!(trade_ids(&second), [2, 1], "{second}");
    assert_eq!(second["next_before"], Value::Null, "{second}");

    for bad in ["limit=0", "limit=100000", "before=yesterday"] {
        let (status, body) = server.get(&format!("/v1/dead-letters?{bad}")).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{bad}: {body}");
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Without a store here (the Druid sink), `/v1/dead-letters` says where the dead letters are.
#[tokio::test]
async fn dead_letters_without_a_store_name_the_topic_they_are_in() {
    let state = ApiState::new(&ApiConfig::default(), None, Arc::new(Health::new()));
    let _ = state.dead_letter_source().topic.set("sluice.dlq".to_owned());
    let server = Server::serve(state).await;
    let (status, body) = server.get("/v1/dead-letters").await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "dead_letters_elsewhere"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("Kafka topic sluice.dlq"), "{body}");
    server.stop().await;
}
