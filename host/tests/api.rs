//! The HTTP API over a real listener: the router served by `serve` on loopback port 0, spoken to with
//! an HTTP client, queries answered from a real embedded store file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice::api::{ApiConfig, ApiState, Health, router, serve};
use sluice::sink::embedded::{EmbeddedStore, Row};
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(ApiState::new(config, store, health));
        let task = tokio::spawn(serve(listener, app, async {
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
    let dir = std::env::temp_dir().join(format!("sluice-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("store.db")
}

fn trade<'a>(ts: i64, symbol: &'a str, is_buy: bool, price_e8: i64, volume_e8: i64) -> Row<'a> {
    Row { timestamp_ms: ts, source: "binance", symbol, is_buy, price_e8, volume_e8 }
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
    for external in ["src=", "href=", "http:", "https:", "@import"] {
        assert!(!page.contains(external), "the page loads something from elsewhere: {external}");
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
