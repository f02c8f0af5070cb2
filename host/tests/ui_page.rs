//! The operator page in a real browser: `sluice run` from a TOML file (the feed simulator on loopback,
//! the local log), the page at `/` opened in headless Chromium, and what the page shows read over
//! the DevTools protocol several times from the same document, so the count it shows must be live and
//! the page must refresh itself.
//!
//! Without Chromium (Debian's `chromium` package) the test says it skipped, unless
//! `SLUICE_REQUIRE_BROWSER` is set, as CI does; then it fails.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice::feedsim::{FeedSim, FeedSimConfig, Venue};
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
const SNAPSHOT: &str = r#"JSON.stringify({
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
})"#;

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
}

impl DevTools {
    /// Evaluates `expression` in the page and returns its value; events the browser sends meanwhile
    /// are skipped.
    async fn evaluate(&mut self, expression: &str) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let params = json!({"expression": expression, "returnByValue": true});
        let call = json!({"id": id, "method": "Runtime.evaluate", "params": params});
        self.socket.send(Message::Text(call.to_string().into())).await.unwrap();
        while let Some(message) = self.socket.next().await {
            let Message::Text(text) = message.unwrap() else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] != id {
                continue;
            }
            let failed = answer.get("error").or_else(|| answer["result"].get("exceptionDetails"));
            assert!(failed.is_none(), "{expression} failed: {answer}");
            return answer["result"]["result"]["value"].clone();
        }
        panic!("the browser closed the DevTools connection");
    }

    /// What the page shows now.
    async fn snapshot(&mut self) -> Value {
        let text = tokio::time::timeout(CALL_TIMEOUT, self.evaluate(SNAPSHOT)).await.expect("the page answers in time");
        serde_json::from_str(text.as_str().unwrap()).unwrap()
    }
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
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("SLUICE_REQUIRE_BROWSER").is_none(),
            "SLUICE_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)"
        );
        // Straight to stderr: the test harness would swallow `eprintln!` from a passing test.
        let _ = writeln!(std::io::stderr(), "skipped: chromium not installed (apt-get install chromium)");
        return;
    };
    let deadline = Instant::now() + BUDGET;
    let dir = std::env::temp_dir().join(format!("sluice-ui-page-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profile")).unwrap();
    let mut cleanup = Cleanup { dir: dir.clone(), children: Vec::new() };

    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 50.0, ..FeedSimConfig::default() }).await.unwrap();
    // A free loopback port for the API (taken and released; nothing else here binds ports by number).
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{}"

[[source]]
name = "binance"
url = "{}"
plugin = "binance"
subscribe = ['{{"method":"SUBSCRIBE","params":["btcusdt@aggTrade"],"id":1}}']
"#,
            dir.join("data").display(),
            sim.url(Venue::Binance)
        ),
    )
    .unwrap();
    cleanup.spawn(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--api-addr")
            .arg(api.to_string())
            .env("RUST_LOG", "sluice=info"),
        "sluice.log",
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

    let page_url = format!("http://{api}/");
    let profile = dir.join("profile");
    cleanup.spawn(
        Command::new(&chromium)
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
        let targets = get_json(&http, &format!("http://127.0.0.1:{devtools_port}/json/list")).await.unwrap_or_default();
        let page =
            targets.as_array().into_iter().flatten().find(|t| t["type"] == "page" && t["url"] == page_url.as_str());
        if let Some(socket) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
            break socket.to_owned();
        }
        check_deadline(deadline, "the page among Chromium's targets", &targets);
        tokio::time::sleep(POLL).await;
    };
    let (socket, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(page_socket.as_str()))
        .await
        .expect("DevTools answers in time")
        .unwrap();
    let mut page = DevTools { socket, next_id: 0 };

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
        if grew && seen["series"].as_str().unwrap().contains("BTCUSDT") && seen["ready"] == "ready" && p99.is_some() {
            break seen;
        }
        check_deadline(deadline, "the count to grow, the series, readiness and latency", &seen);
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
    let (p50, p99): (f64, f64) =
        (later["p50"].as_str().unwrap().parse().unwrap(), later["p99"].as_str().unwrap().parse().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 < 10_000.0, "{later}");
    eprintln!("the page counted {first_total} records, then {}", later["total"]);
    sim.shutdown().await;
}
