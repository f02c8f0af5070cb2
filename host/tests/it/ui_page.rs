//! The operator page in a real browser: `sluice run` from a TOML file (the feed simulator on loopback,
//! the local log), the page at `/` opened in headless Chromium, and what the page shows read over
//! the DevTools protocol several times from the same document, so the count it shows must be live and
//! the page must refresh itself. The charts of the last 15 minutes must have points, gain points
//! from one refresh to the next and show a value under the pointer; a configuration of 300 sources
//! that never connect must give a summarised, paginated sources table and no script error.
//!
//! Without Chromium (Debian's `chromium` package) the test says it skipped, unless
//! `SLUICE_REQUIRE_BROWSER` is set, as CI does; then it fails.

use crate::common;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use feedsim::{FeedSim, FeedSimConfig, Venue};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long the test waits, all conditions together, from start to the last observation.
const BUDGET: Duration = Duration::from_secs(50);

/// How long one request to the browser may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a condition is checked again while waiting.
const POLL: Duration = Duration::from_millis(250);

/// Headless, as root, on a machine with no network: without the background-networking flags Chromium
/// keeps dialling Google services and its connections are refused.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
];

/// What the page shows, read in one evaluation so the parts belong to the same moment (a part is
/// missing while the document is still loading). `origin` is the document's time origin: it changes
/// when the page is loaded again.
const SNAPSHOT: &str = r##"JSON.stringify({
    origin: performance.timeOrigin,
    total: document.getElementById("records-total")?.textContent,
    ready: document.getElementById("ready")?.textContent,
    sources: document.getElementById("sources")?.textContent,
    plugins: document.getElementById("plugins")?.textContent,
    series: document.getElementById("series")?.textContent,
    lag: document.getElementById("log-lag")?.textContent,
    p50: document.getElementById("p50")?.textContent,
    p99: document.getElementById("p99")?.textContent,
    log: document.getElementById("log")?.textContent,
    error: document.getElementById("error")?.textContent,
    summary: document.getElementById("sources-summary")?.textContent,
    pageAt: document.getElementById("page-at")?.textContent,
    sourceRows: document.querySelectorAll("#sources tbody tr").length,
    // Each chart's `data-points`: the points (or candles) it draws; the candle charts' summed.
    charts: [...document.querySelectorAll("svg[data-chart]")].reduce((seen, svg) => {
        seen[svg.dataset.chart] = (seen[svg.dataset.chart] || 0) + Number(svg.dataset.points);
        return seen;
    }, {}),
})"##;

/// Moves the pointer over the right end of the records chart and returns what its readout says.
const HOVER: &str = r##"(() => {
    const svg = document.querySelector("#chart-records svg");
    const area = svg.querySelector("rect");
    const box = svg.getBoundingClientRect();
    area.dispatchEvent(new MouseEvent("mousemove",
        { clientX: box.left + box.width * 0.98, clientY: box.top + box.height / 2, bubbles: true }));
    return document.getElementById("readout-records").textContent;
})()"##;

/// Points the lag chart (one per refresh) and the records chart (one per refresh after the first)
/// must reach: more than a short buffer would keep.
const HISTORY_POINTS: u64 = 6;

/// The charts whose `data-points` must be positive once the page has refreshed a few times.
const CHARTS: [&str; 5] = ["chart-records", "chart-losses", "chart-lag", "chart-latency", "candles"];

/// `/usr/bin/chromium`, or `chromium` on the `PATH`.
fn chromium() -> Option<PathBuf> {
    let debian = Path::new("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|p| p.is_file())
}

/// The processes and files the test made, killed and removed however the test ends.
struct Cleanup {
    /// Holds the config, the data directory, the browser profile and the logs.
    dir: PathBuf,
    /// Each leads a process group of its own, so Chromium's helper processes go with it.
    children: Vec<Child>,
}

impl Cleanup {
    fn spawn(&mut self, command: &mut Command, log: &str) {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        self.children.push(child);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The browser first, then the server it talks to.
        for child in self.children.iter_mut().rev() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for (log, lines) in [("sluice.log", 40), ("chromium.log", 20)] {
                let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                eprintln!("--- last lines of {log}:");
                tail.iter().rev().for_each(|line| eprintln!("{line}"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DevTools protocol connection to one page.
struct DevTools {
    /// The page's own WebSocket endpoint (not the browser's), so evaluations run in its document.
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// Each call carries a new id; the answer with the same id is the call's.
    next_id: u64,
    /// Exceptions the page's scripts threw and did not catch (`Runtime.exceptionThrown`), since
    /// `Runtime.enable`.
    exceptions: Vec<Value>,
}

impl DevTools {
    /// Connects to the page's endpoint and has the browser report uncaught exceptions.
    async fn connect(endpoint: &str) -> DevTools {
        let (socket, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(endpoint))
            .await
            .expect("DevTools answers in time")
            .unwrap();
        let mut page = DevTools { socket, next_id: 0, exceptions: Vec::new() };
        tokio::time::timeout(CALL_TIMEOUT, page.call("Runtime.enable", json!({})))
            .await
            .expect("Runtime.enable answers");
        page
    }

    /// Sends one call and returns its answer; events the browser sends meanwhile are skipped, except
    /// exceptions, which are kept.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({"id": id, "method": method, "params": params});
        self.socket.send(Message::Text(call.to_string().into())).await.unwrap();
        while let Some(message) = self.socket.next().await {
            let Message::Text(text) = message.unwrap() else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["method"] == "Runtime.exceptionThrown" {
                self.exceptions.push(answer["params"]["exceptionDetails"].clone());
            }
            if answer["id"] == id {
                return answer;
            }
        }
        panic!("the browser closed the DevTools connection");
    }

    /// Evaluates `expression` in the page and returns its value; events the browser sends meanwhile
    /// are skipped.
    async fn evaluate(&mut self, expression: &str) -> Value {
        let answer = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        let failed = answer.get("error").or_else(|| answer["result"].get("exceptionDetails"));
        assert!(failed.is_none(), "{expression} failed: {answer}");
        answer["result"]["result"]["value"].clone()
    }

    /// What the page shows now.
    async fn snapshot(&mut self) -> Value {
        let text = tokio::time::timeout(CALL_TIMEOUT, self.evaluate(SNAPSHOT)).await.expect("the page answers in time");
        assert!(self.exceptions.is_empty(), "the page threw: {:?}", self.exceptions);
        serde_json::from_str(text.as_str().unwrap()).unwrap()
    }
}

/// The number of points a chart of `snapshot` draws (0 when it is not there).
fn points(snapshot: &Value, chart: &str) -> u64 {
    snapshot["charts"][chart].as_u64().unwrap_or(0)
}

/// Starts `sluice run` on `config` (a TOML body; `data_dir` is added) with its API on a free
/// loopback port, and returns the port.
fn start_sluice(cleanup: &mut Cleanup, config: &str) -> std::net::SocketAddr {
    // A free loopback port for the API (taken and released; nothing else here binds ports by number).
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let path = cleanup.dir.join("sluice.toml");
    std::fs::write(&path, format!("data_dir = \"{}\"\n{config}", cleanup.dir.join("data").display())).unwrap();
    cleanup.spawn(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .arg("--api-addr")
            .arg(api.to_string())
            .env("RUST_LOG", "sluice=info"),
        "sluice.log",
    );
    api
}

/// Opens `http://{api}/` in headless Chromium and connects to the page over DevTools.
async fn open_page(
    cleanup: &mut Cleanup,
    chromium: &Path,
    http: &reqwest::Client,
    api: std::net::SocketAddr,
    deadline: Instant,
) -> DevTools {
    let page_url = format!("http://{api}/");
    let profile = cleanup.dir.join("profile");
    std::fs::create_dir_all(&profile).unwrap();
    cleanup.spawn(
        Command::new(chromium)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&page_url),
        "chromium.log",
    );
    // With port 0, Chromium writes the port it chose to the profile directory.
    let port_file = profile.join("DevToolsActivePort");
    let devtools_port = loop {
        let text = std::fs::read_to_string(&port_file).unwrap_or_default();
        if let Some(port) = text.lines().next().and_then(|l| l.trim().parse::<u16>().ok()) {
            break port;
        }
        check_deadline(deadline, "Chromium's DevTools port", &port_file.display());
        tokio::time::sleep(POLL).await;
    };
    let page_socket = loop {
        let targets = get_json(http, &format!("http://127.0.0.1:{devtools_port}/json/list")).await.unwrap_or_default();
        let page =
            targets.as_array().into_iter().flatten().find(|t| t["type"] == "page" && t["url"] == page_url.as_str());
        if let Some(socket) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
            break socket.to_owned();
        }
        check_deadline(deadline, "the page among Chromium's targets", &targets);
        tokio::time::sleep(POLL).await;
    };
    DevTools::connect(&page_socket).await
}

/// A fresh directory for one test's files, removed with its processes when `Cleanup` drops.
fn test_dir(name: &str) -> Cleanup {
    let dir = common::fresh_dir(&format!("ui-page-{name}"));
    Cleanup { dir, children: Vec::new() }
}

/// Chromium, or `None` (and a note) when it is missing and not required.
fn browser_or_skip() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        assert!(
            std::env::var_os("SLUICE_REQUIRE_BROWSER").is_none(),
            "SLUICE_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)"
        );
        // Straight to stderr: the test harness would swallow `eprintln!` from a passing test.
        let _ = writeln!(std::io::stderr(), "skipped: chromium not installed (apt-get install chromium)");
    }
    found
}

/// The JSON at `url`, if it answers with JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// The summed decoded-record count of every source, as `/v1/sources` reports it.
async fn records_total(http: &reqwest::Client, api: std::net::SocketAddr) -> Option<u64> {
    let listed = get_json(http, &format!("http://{api}/v1/sources")).await?;
    Some(listed["sources"].as_array()?.iter().filter_map(|s| s["records"].as_u64()).sum())
}

/// The count the page shows, if it is an integer.
fn shown_total(snapshot: &Value) -> Option<u64> {
    snapshot["total"].as_str()?.parse().ok()
}

/// Panics with `what` and the last thing seen once `deadline` has passed.
fn check_deadline(deadline: Instant, what: &str, seen: &dyn std::fmt::Display) {
    assert!(Instant::now() < deadline, "timed out waiting for {what}; last seen: {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_live_record_count_in_a_browser() {
    let Some(chromium) = browser_or_skip() else { return };
    let deadline = Instant::now() + BUDGET;
    let mut cleanup = test_dir("live");

    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 50.0, ..FeedSimConfig::default() }).await.unwrap();
    let api = start_sluice(
        &mut cleanup,
        &format!(
            r#"
[[source]]
name = "binance"
url = "{}"
plugin = "binance"
subscribe = ['{{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}}']
"#,
            sim.url(Venue::Binance)
        ),
    );

    // Records flow before the browser comes in.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    loop {
        let total = records_total(&http, api).await;
        if total.is_some_and(|n| n > 0) {
            break;
        }
        check_deadline(deadline, "records in /v1/sources", &format!("{total:?}"));
        tokio::time::sleep(POLL).await;
    }

    let mut page = open_page(&mut cleanup, &chromium, &http, api, deadline).await;

    // The page has fetched the sources and shows their summed record count, no more than the API
    // reports afterwards.
    let first = loop {
        let seen = page.snapshot().await;
        if shown_total(&seen).is_some_and(|n| n > 0) {
            break seen;
        }
        check_deadline(deadline, "a record count on the page", &seen);
        tokio::time::sleep(POLL).await;
    };
    let first_total = shown_total(&first).unwrap();
    let api_total = records_total(&http, api).await.unwrap();
    assert!(first_total <= api_total, "the page shows {first_total}, the API {api_total}");

    // Left alone, the same document fetches again: the count grows, the store's series arrive, and the
    // process reports ready.
    let later = loop {
        let seen = page.snapshot().await;
        let grew = shown_total(&seen).is_some_and(|n| n > first_total);
        // p99 receive to commit, from /metrics, over the rows committed since the last refresh.
        let p99 = seen["p99"].as_str().and_then(|p| p.parse::<f64>().ok());
        let charted = CHARTS.iter().all(|chart| points(&seen, chart) > 0);
        if grew
            && seen["series"].as_str().unwrap().contains("BTCUSDT")
            && seen["ready"] == "ready"
            && p99.is_some()
            && charted
        {
            break seen;
        }
        check_deadline(deadline, "the count to grow, the series, readiness, latency and the charts' points", &seen);
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(later["origin"], first["origin"], "the page was loaded again instead of refreshing itself");
    let sources = later["sources"].as_str().unwrap();
    assert!(sources.contains("binance") && sources.contains("up"), "{later}");
    // `/v1/plugins` answered, or the page said it could not.
    assert_ne!(later["plugins"], "loading", "{later}");
    // The local log's lag is a number, and the log line names the mode and the committed offset.
    assert!(later["lag"].as_str().unwrap().parse::<u64>().is_ok(), "{later}");
    assert!(later["log"].as_str().unwrap().starts_with("local log: 1 partition(s)"), "{later}");
    // And what the log holds against its cap: records, dead letters and symbols, and the store's
    // dead letters.
    for part in [" of records, ", " dead letters (", " symbols (", " of max 4.0 GiB", "the store's dead letters: "] {
        assert!(later["log"].as_str().unwrap().contains(part), "no {part:?} in {later}");
    }
    let (p50, p99): (f64, f64) =
        (later["p50"].as_str().unwrap().parse().unwrap(), later["p99"].as_str().unwrap().parse().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 < 10_000.0, "{later}");
    assert_eq!(later["error"], "", "{later}");

    // The charts keep the page's history: later refreshes draw more points in each time chart, one
    // per refresh, until there are several minutes of them.
    let grown = loop {
        let seen = page.snapshot().await;
        let more = CHARTS[..4].iter().all(|chart| points(&seen, chart) > points(&later, chart));
        if more && points(&seen, "chart-lag") >= HISTORY_POINTS && points(&seen, "chart-records") >= HISTORY_POINTS - 1
        {
            break seen;
        }
        check_deadline(deadline, "the charts to gain points", &seen);
        tokio::time::sleep(POLL).await;
    };
    assert!(points(&grown, "candles") > 0, "{grown}");
    // The pointer over the chart's right end reads the newest rates.
    let readout = tokio::time::timeout(CALL_TIMEOUT, page.evaluate(HOVER)).await.expect("the page answers in time");
    let readout = readout.as_str().unwrap();
    assert!(readout.contains("decoded ") && readout.contains("/s"), "{readout}");
    assert!(page.exceptions.is_empty(), "the page threw: {:?}", page.exceptions);
    eprintln!("the page counted {first_total} records, then {}; charts {}", later["total"], grown["charts"]);
    sim.shutdown().await;
}

/// How many sources the many-sources test configures.
const MANY_SOURCES: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_summarises_and_pages_many_sources() {
    let Some(chromium) = browser_or_skip() else { return };
    let deadline = Instant::now() + BUDGET;
    let mut cleanup = test_dir("many");
    // A port nobody listens on: every source keeps trying to connect, backing off.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let sources: String = (0..MANY_SOURCES)
        .map(|i| format!("[[source]]\nname = \"venue-{i:03}\"\nurl = \"ws://{closed}/\"\nplugin = \"binance\"\n\n"))
        .collect();
    let api = start_sluice(&mut cleanup, &sources);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    loop {
        let listed = get_json(&http, &format!("http://{api}/v1/sources")).await;
        if listed.as_ref().and_then(|l| l["sources"].as_array()).is_some_and(|s| s.len() == MANY_SOURCES) {
            break;
        }
        check_deadline(deadline, "the sources in /v1/sources", &format!("{listed:?}"));
        tokio::time::sleep(POLL).await;
    }
    let mut page = open_page(&mut cleanup, &chromium, &http, api, deadline).await;

    // Every source is counted in the summary, one page of 50 is shown, and the time charts draw
    // (the lag and latency charts have points even with nothing flowing).
    let first = loop {
        let seen = page.snapshot().await;
        let summary = seen["summary"].as_str().unwrap_or_default();
        if summary.starts_with(&format!("{MANY_SOURCES} source(s): ")) && points(&seen, "chart-lag") > 1 {
            break seen;
        }
        check_deadline(deadline, "the sources' summary and the charts", &seen);
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(first["sourceRows"], 50, "{first}");
    assert_eq!(first["pageAt"], "page 1 of 6 (300 shown)", "{first}");
    assert!(!first["summary"].as_str().unwrap().contains(" up"), "no source can be up: {first}");
    // The next page, then a filter: the table follows at once, between refreshes.
    let paged = page
        .evaluate(r##"document.getElementById("page-next").click(); document.querySelector("#sources tbody tr td").textContent"##)
        .await;
    assert_eq!(paged, "venue-050");
    let filtered = page
        .evaluate(
            r#"const f = document.getElementById("source-filter"); f.value = "venue-29";
               f.dispatchEvent(new Event("input")); document.getElementById("page-at").textContent"#,
        )
        .await;
    assert_eq!(filtered, "page 1 of 1 (10 shown)");
    // Later refreshes keep the filter and grow the history; nothing threw.
    let later = loop {
        let seen = page.snapshot().await;
        if points(&seen, "chart-lag") > points(&first, "chart-lag") {
            break seen;
        }
        check_deadline(deadline, "another refresh", &seen);
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(later["sourceRows"], 10, "{later}");
    assert_eq!(later["error"], "", "{later}");
}

/// The page's dead letters and the sources' transform rejects: a recording whose chain refuses most
/// trades shows, in the browser, each refused trade decoded (symbol name, price, the link and its
/// version, the reason), newest first, 20 a page with an "older" page behind it, and the sources
/// table counts the rule's rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_dead_letters_decoded_and_the_rules_rejects() {
    let Some(chromium) = browser_or_skip() else { return };
    let deadline = Instant::now() + BUDGET;
    let mut cleanup = test_dir("dead-letters");
    let recording = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/feeds/binance_us_combined_aggtrade.jsonl");
    let api = start_sluice(
        &mut cleanup,
        &format!(
            r#"
[[source]]
name = "recorded"
kind = "file"
path = "{recording}"
decode = "binance"
transforms = [{{ plugin = "outlier-filter", config = {{ threshold_pct = "0.001" }} }}]
"#
        ),
    );
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let refused = loop {
        let listed = get_json(&http, &format!("http://{api}/v1/sources")).await;
        let source = listed.as_ref().map(|l| l["sources"][0].clone()).unwrap_or_default();
        let page = get_json(&http, &format!("http://{api}/v1/dead-letters?limit=1000")).await;
        let letters = page.as_ref().and_then(|p| p["dead_letters"].as_array().map(Vec::len)).unwrap_or(0) as u64;
        if source["state"] == "finished" && letters > 0 && source["transform_rejects"] == letters {
            break letters;
        }
        check_deadline(deadline, "the rule's rejects in /v1/sources and /v1/dead-letters", &format!("{listed:?}"));
        tokio::time::sleep(POLL).await;
    };
    let mut page = open_page(&mut cleanup, &chromium, &http, api, deadline).await;
    const DEAD: &str = r##"JSON.stringify({
        rows: [...document.querySelectorAll("#dead-letters tbody tr")].map((tr) => [...tr.cells].map((c) => c.textContent)),
        headers: [...document.querySelectorAll("#sources thead th")].map((th) => th.textContent),
        source: [...(document.querySelector("#sources tbody tr")?.cells || [])].map((c) => c.textContent),
        older: document.getElementById("dead-older")?.disabled,
        error: document.getElementById("error")?.textContent,
    })"##;
    let seen = loop {
        let seen: Value = serde_json::from_str(page.evaluate(DEAD).await.as_str().unwrap_or("{}")).unwrap_or_default();
        if seen["rows"].as_array().is_some_and(|r| !r.is_empty())
            && seen["source"].as_array().is_some_and(|c| !c.is_empty())
        {
            break seen;
        }
        check_deadline(deadline, "the dead letters on the page", &seen);
        tokio::time::sleep(POLL).await;
    };
    let rows = seen["rows"].as_array().unwrap();
    assert_eq!(rows.len() as u64, refused.min(20), "{seen}");
    let version = sluice::plugin::version_of(sluice::plugin::bundled::OUTLIER_FILTER);
    for row in rows {
        let cells: Vec<&str> = row.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(cells[1..4], ["recorded", &format!("outlier-filter@{version}"), "OMGBUSD"], "{seen}");
        assert!(cells[4].parse::<f64>().is_ok_and(|p| p > 10.0 && p < 20.0), "a price: {seen}");
        assert!(cells[9].contains("from last accepted"), "{seen}");
    }
    let trade_ids: Vec<u64> = rows.iter().map(|r| r[7].as_str().unwrap().parse().unwrap()).collect();
    assert!(trade_ids.windows(2).all(|w| w[0] > w[1]), "newest first: {trade_ids:?}");
    assert_eq!(seen["older"], refused <= 20, "an older page exactly when there are more: {seen}");
    let headers: Vec<&str> = seen["headers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    let at = headers.iter().position(|h| *h == "transform rejects").unwrap_or_else(|| panic!("{seen}"));
    assert_eq!(seen["source"][at], refused.to_string(), "{seen}");
    assert_eq!(seen["error"], "", "{seen}");
}
