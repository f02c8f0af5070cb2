//! `sluice check-config`, `sluice run --config` and `sluice demo --venues` as an operator uses them:
//! the real binary, a TOML file, the feed simulator on loopback, and the local log (no brokers
//! configured).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use feedsim::{FeedSim, FeedSimConfig, Venue};

use crate::common::config::{BINANCE_BTC, ConfigToml, Source};

const TOKEN: &str = "cli-run-token";

/// `command` (sluice itself, or a shell that execs it) given `run --config <path>`, its stdout
/// dropped and its stderr piped to the test.
fn spawn_run(command: &mut Command, path: &std::path::Path) -> std::process::Child {
    command.args(["run", "--config"]).arg(path).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Runs `sluice <args>`, which must succeed and say `says` on stdout; what it printed there.
fn succeeds_saying(args: &[&str], says: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(says), "{stdout}");
    stdout
}

/// Every metric the book's table (`docs/src/operating/metrics.md`) lists is exported with exactly the listed labels and type, and
/// nothing is exported that the table does not list; no series is labelled by symbol.
fn assert_metrics_match_the_readme(metrics: &str) {
    let table =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/operating/metrics.md")).unwrap();
    let mut listed = std::collections::BTreeMap::new();
    for row in table.lines().skip_while(|l| !l.starts_with("| `sluice_")).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let name = cells[0].trim_matches('`').to_owned();
        // Label names are the backticked words before the parenthesised list of values, if any.
        let labels: std::collections::BTreeSet<String> = cells[2]
            .split('(')
            .next()
            .unwrap_or_default()
            .split(',')
            .filter_map(|l| l.trim().strip_prefix('`')?.strip_suffix('`').map(str::to_owned))
            .collect();
        listed.insert(name, (cells[1].to_owned(), labels));
    }
    assert!(listed.len() >= 30, "the book lists only {} metrics", listed.len());
    // name -> (type, label sets seen)
    let mut exported: std::collections::BTreeMap<String, (String, Vec<std::collections::BTreeSet<String>>)> =
        std::collections::BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.entry(name.to_owned()).or_default().0 = kind.to_owned();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| exported.get(*base).is_some_and(|e| e.0 == "histogram"))
            })
            .unwrap_or(name);
        let names: std::collections::BTreeSet<String> = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| l.split('=').next().unwrap().to_owned())
            .filter(|l| l != "le")
            .collect();
        assert!(!names.contains("symbol"), "a symbol label: {line}");
        exported.entry(family.to_owned()).or_default().1.push(names);
    }
    for (name, (kind, labels)) in &listed {
        let (got_kind, sets) = exported.get(name).unwrap_or_else(|| panic!("{name} is not exported:\n{metrics}"));
        assert_eq!(got_kind, kind, "{name}");
        assert!(!sets.is_empty(), "{name} has no series:\n{metrics}");
        assert!(sets.iter().all(|s| s == labels), "{name}: labels {sets:?}, the book says {labels:?}");
    }
    for name in exported.keys().filter(|n| n.starts_with("sluice_")) {
        assert!(listed.contains_key(name), "{name} is exported but not listed in the book");
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sluice-cli-run-{}-{name}", std::process::id()))
}

#[test]
fn check_config_prints_the_effective_config_and_names_bad_fields() {
    let path = temp("check.toml");
    std::fs::write(&path, "[[source]]\nname = \"b\"\nurl = \"wss://x\"\nplugin = \"binance\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for default in ["events_topic = \"sluice.events\"", "ping_interval_ms = 15000", "compression = \"lz4\""] {
        assert!(text.contains(default), "missing {default} in:\n{text}");
    }

    std::fs::write(&path, "[[source]]\nname = \"b\"\nurl = \"wss://x\"\nplugin = \"binance\"\npong_ms = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pong_ms"));

    std::fs::write(&path, "[[source]]\nname = \"b\"\nurl = \"wss://x\"\nplugin = \"nope\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin \"nope\""));

    // The Druid supervisor spec is checked offline with the rest.
    let druid = "[kafka]\nbrokers = \"k:9092\"\n[sink.druid]\ndatasource = \"a/b\"\n";
    std::fs::write(&path, druid).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sink.druid") && err.contains("a/b"), "{err}");
    std::fs::write(&path, druid.replace("a/b", "trades")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("timestamp_column = \"timestampMs\""));

    // Secrets among the client options print as `***`, as the Druid password does.
    let secrets = "[kafka]\nbrokers = \"k:9092\"\noptions = { \"sasl.password\" = \"hunter2\", \
                   \"ssl.key.password\" = \"hunter3\", \"security.protocol\" = \"sasl_ssl\" }\n[sink.druid]\n\
                   password = \"hunter4\"\nconsumer_options = { \"sasl.jaas.config\" = \"password='hunter5';\" }\n";
    std::fs::write(&path, secrets).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter"), "a secret printed:\n{text}");
    for line in
        ["\"sasl.password\" = \"***\"", "\"ssl.key.password\" = \"***\"", "\"security.protocol\" = \"sasl_ssl\""]
    {
        assert!(text.contains(line), "missing {line} in:\n{text}");
    }
    let _ = std::fs::remove_file(&path);
}

/// Two process instances left on the default `[process] instance` with the Druid sink would share
/// one transactional id and fence each other in a loop: `sluice run` refuses to start the process
/// role without a name, before it touches Kafka.
#[test]
fn run_refuses_the_druid_sink_without_a_named_instance() {
    let (path, dir) = (temp("druid-instance.toml"), temp("druid-instance-data"));
    let text = format!(
        "data_dir = \"{}\"\n[api]\nbind = \"127.0.0.1:0\"\n[kafka]\nbrokers = \"127.0.0.1:9\"\n[sink.druid]\n",
        dir.display()
    );
    std::fs::write(&path, &text).unwrap();
    let mut child = spawn_run(&mut Command::new(env!("CARGO_BIN_EXE_sluice")), &path);
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("[sink.druid] needs [process] instance"), "{stderr}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ingests_from_a_config_file_until_interrupted() {
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 50.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = temp("data");
    let path = temp("run.toml");
    // A free loopback port for the API (taken and released; nothing else here binds ports by number).
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let source = Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC)
        .set("plugin", "binance")
        .link("outlier-filter", &[]);
    ConfigToml::new(&dir).api_bind(&api.to_string()).source(source).save_as(&path);
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "sluice=info")
        .env("SLUICE_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Wait until the simulator has sent it a good number of trades, then interrupt it.
    let start = Instant::now();
    while sim.handle().sent_ids(Venue::Binance, "BTCUSDT").len() < 60 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The API answers while it runs: ready once Kafka, the plugin and the sink have reported, and the
    // rolled-up series can be queried over HTTP.
    let http = reqwest::Client::new();
    let mut ready = serde_json::Value::Null;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = http.get(format!("http://{api}/health/ready")).send().await {
            let ok = r.status() == 200;
            ready = r.json().await.unwrap();
            if ok {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ready["ready"], true, "{ready}");
    for check in ["log", "plugins", "sink", "breakers"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{check}: {ready}");
    }
    let answer: serde_json::Value = http
        .get(format!("http://{api}/v1/query"))
        .query(&[("sql", "SELECT symbol, sum(events) AS n FROM rollup GROUP BY symbol")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["columns"], serde_json::json!(["symbol", "n"]), "{answer}");
    assert_eq!(answer["rows"][0][0], "BTCUSDT", "{answer}");
    assert!(answer["rows"][0][1].as_u64().unwrap() > 0, "{answer}");
    // The source, its plugin and the version of its code, with live counters.
    let listed: serde_json::Value =
        http.get(format!("http://{api}/v1/sources")).send().await.unwrap().json().await.unwrap();
    let source = &listed["sources"][0];
    assert_eq!(source["name"], "binance", "{listed}");
    assert_eq!(source["state"], "up", "{listed}");
    assert_eq!(source["plugin"], "binance", "{listed}");
    assert_eq!(source["plugin_version"], sluice::plugin::version_of(sluice::plugin::bundled::BINANCE), "{listed}");
    assert!(source["frames"].as_u64().unwrap() > 0 && source["records"].as_u64().unwrap() > 0, "{listed}");
    assert!(source["last_message_age_ms"].as_u64().unwrap() < 10_000, "{listed}");
    assert_eq!(source["gaps"], 0, "{listed}");
    // A version in shadow beside the decoder, so every plugin metric has a series.
    let uploaded: serde_json::Value = http
        .put(format!("http://{api}/v1/plugins/binance?replace=true"))
        .bearer_auth(TOKEN)
        .body(sluice::plugin::bundled::KRAKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let shadow = uploaded["version"].as_str().unwrap_or_else(|| panic!("{uploaded}"));
    let response = http
        .post(format!("http://{api}/v1/plugins/binance/activate?mode=shadow"))
        .bearer_auth(TOKEN)
        .body(format!(r#"{{"version":"{shadow}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let start = Instant::now();
    let metrics = loop {
        let text = http.get(format!("http://{api}/metrics")).send().await.unwrap().text().await.unwrap();
        if text.contains("sluice_plugin_shadow_records_total{") || start.elapsed() > Duration::from_secs(20) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_metrics_match_the_readme(&metrics);
    // The hand-off's positions: the local log, one partition, the store's position within it.
    let log: serde_json::Value = http.get(format!("http://{api}/v1/log")).send().await.unwrap().json().await.unwrap();
    assert_eq!(log["mode"], "local", "{log}");
    let p = &log["partitions"][0];
    let (start, end, committed) =
        (p["start"].as_i64().unwrap(), p["end"].as_i64().unwrap(), p["committed"].as_i64().unwrap());
    assert!(start == 0 && end >= 60 && committed > 0 && committed <= end, "{log}");
    assert_eq!(p["lag"].as_i64().unwrap(), end - committed, "{log}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("running") && log.contains("role=All"), "{log}");
    let delivered: u64 = log
        .lines()
        .find(|l| l.contains("stopped"))
        .and_then(|l| l.split("delivered=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no delivered count in:\n{log}"));
    assert!(delivered >= 50, "{delivered} delivered\n{log}");
    // Every record delivered to the local log was rolled up before the clean stop ended, once.
    assert_eq!(sluice::handoff::local::read_all(&dir.join("log.sqlite")).unwrap().len() as u64, delivered);
    let q = sluice::sink::embedded::QueryConnection::open(&dir.join("store.sqlite")).unwrap();
    let rolled =
        q.query("SELECT sum(events) AS n FROM rollup WHERE symbol = 'BTCUSDT'", 1).unwrap()[0]["n"].as_u64().unwrap();
    assert_eq!(rolled, delivered, "rolled up vs delivered");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
}

/// `sluice demo --venues` with all eight venues: each venue's source subscribes in its own words and
/// keeps its connection alive its own way, its real wasm decoder reads the simulator's frames, and
/// the store ends up with rolled-up rows for every symbol of every venue, none refused.
#[test]
fn demo_with_every_venue_rolls_up_every_venues_symbols() {
    let dir = temp("demo-venues");
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let venues = "binance,coinbase,kraken,okx,bybit,bitstamp,kraken-v2,coinbase-advanced";
    let api = api.to_string();
    let demo = ["demo", "--seconds", "6", "--rate", "20", "--venues", venues, "--api-addr", &api];
    let data_dir = ["--feed-addr", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()];
    let stdout = succeeds_saying(&[&demo[..], &data_dir[..]].concat(), "8 simulated venues");
    let q = sluice::sink::embedded::QueryConnection::open(&dir.join("store.sqlite")).unwrap();
    let rows = q.query("SELECT source, symbol, sum(events) AS n FROM rollup GROUP BY source, symbol", 100).unwrap();
    let rolled: std::collections::BTreeMap<(String, String), u64> = rows
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap().to_owned();
            ((text("source"), text("symbol")), r["n"].as_u64().unwrap())
        })
        .collect();
    let expected = [
        ("binance", &["BTCUSDT", "ETHUSDT", "SOLUSDT"][..]),
        ("coinbase", &["BTC-USD", "ETH-USD"]),
        ("kraken", &["XBT/USD", "ETH/USD"]),
        ("okx", &["BTC-USDT", "ETH-USDT", "SOL-USDT"]),
        ("bybit", &["BTCUSDT", "ETHUSDT", "SOLUSDT"]),
        ("bitstamp", &["btcusd", "ethusd"]),
        ("kraken-v2", &["BTC/USD", "ETH/USD"]),
        ("coinbase-advanced", &["BTC-USD", "ETH-USD", "SOL-USD"]),
    ];
    for (source, symbols) in expected {
        for symbol in symbols {
            let n = rolled.get(&(source.to_owned(), symbol.to_string())).copied().unwrap_or(0);
            assert!(n > 0, "no rows for {source} {symbol}: {rolled:?}\n{stdout}");
        }
    }
    assert_eq!(rolled.len(), expected.iter().map(|(_, s)| s.len()).sum::<usize>(), "{rolled:?}");
    // The last progress line: nothing refused, every source up.
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with(char::is_numeric)).unwrap_or_default();
    let cells: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(cells.get(5), Some(&"0"), "rejects in: {last}\n{stdout}");
    assert_eq!(cells.get(6), Some(&"0"), "rule rejects in: {last}\n{stdout}");
    assert_eq!(cells.get(8), Some(&"8/8"), "sources up in: {last}\n{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_refuses_an_unknown_venue_and_names_the_known_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["demo", "--venues", "binance,nope"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"unknown venue "nope""#), "{err}");
    for known in ["binance", "okx", "bybit", "bitstamp", "kraken-v2", "coinbase-advanced"] {
        assert!(err.contains(known), "{known} missing from: {err}");
    }
}

/// `[logging] format = "json"` makes every log line one JSON object (level, target, fields with the
/// message); `--log-format text` on the command line wins over the file.
#[test]
fn logs_are_json_lines_when_the_config_asks_and_the_flag_wins() {
    let dir = temp("json-logs");
    let path = temp("json-logs.toml");
    std::fs::write(
        &path,
        format!("data_dir = \"{}\"\n\n[api]\nbind = \"127.0.0.1:0\"\n\n[logging]\nformat = \"json\"\n", dir.display()),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .args(extra)
            .env("RUST_LOG", "sluice=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Until it says it is running: the log lines come before and with that one.
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    let json = run(&[]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let running =
        lines.iter().find(|l| l["fields"]["message"] == "running").unwrap_or_else(|| panic!("no running line: {json}"));
    assert_eq!(
        (running["level"].as_str(), running["fields"]["role"].as_str()),
        (Some("INFO"), Some("All")),
        "{running}"
    );
    assert!(running["timestamp"].is_string() && running["target"].is_string(), "{running}");
    let text = run(&["--log-format", "text"]);
    assert!(text.lines().any(|l| l.contains("running") && l.contains("role=All")), "{text}");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
}

/// `sluice demo` run twice on one data directory: the second run's simulator is a new venue
/// session (a fresh seed, so other trade ids), and the sluice that remembers the first run's ids
/// rolls the new trades up rather than dropping them as repeats.
#[test]
fn a_demo_run_again_on_its_data_directory_rolls_up_the_new_trades() {
    let dir = temp("demo-again");
    let events = || -> i64 {
        let q = sluice::sink::embedded::QueryConnection::open(&dir.join("store.sqlite")).unwrap();
        q.query("SELECT sum(events) AS n FROM rollup", 1).unwrap()[0]["n"].as_i64().unwrap_or(0)
    };
    let mut counts = Vec::new();
    for _ in 0..2 {
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["demo", "--seconds", "4", "--rate", "50", "--venues", "binance", "--api-addr", &api.to_string()])
            .args(["--feed-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        counts.push(events());
    }
    assert!(counts[0] > 100, "the first run rolled up {} trades", counts[0]);
    assert!(counts[1] > counts[0] + 100, "the second run added {} trades", counts[1] - counts[0]);
}

/// `sluice bench --apart` runs the simulator as a process of its own and reports its CPU beside
/// sluice's, with sluice's microseconds of CPU per trade: the summary line has a number in each.
#[test]
fn bench_apart_reports_the_simulators_cpu_beside_sluices() {
    let bench = ["bench", "--apart", "--feeds", "3", "--rate", "600", "--seconds", "4", "--warmup", "1"];
    let stdout = succeeds_saying(&bench, "the simulator runs in a process of its own");
    let header = stdout.lines().find(|l| l.contains("offered/s")).unwrap();
    assert!(header.split_whitespace().rev().take(4).eq(["µs/trade", "sim%", "MB", "rss"]), "{header}");
    // The summary line's last four columns: cpu%, rss MB, sim%, µs/trade.
    let all: Vec<f64> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .unwrap()
        .split_whitespace()
        .rev()
        .take(4)
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect();
    let (per_trade, sim, cpu) = (all[0], all[1], all[3]);
    assert!(sim > 0.0, "the simulator's CPU: {stdout}");
    assert!(per_trade > 0.0 && per_trade.is_finite(), "µs per trade: {stdout}");
    assert!(cpu > 0.0, "{stdout}");
}

/// Slowloris against the real binary: with its open files limited to 128, 150 connections each
/// sending a header byte by byte would take every descriptor (and keep them, with no header
/// timeout); with `[api] max_connections` under the limit and a header-read timeout, they are cut
/// and `/metrics` still answers within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_keep_metrics_from_answering() {
    use tokio::io::AsyncWriteExt;
    let (path, dir) = (temp("slowloris.toml"), temp("slowloris-data"));
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[api]\nbind = \"{api}\"\nmax_connections = 64\nheader_read_timeout_ms = 1000\n",
            dir.display()
        ),
    )
    .unwrap();
    // `exec` keeps the pid: the child is sluice itself, with the lower limit.
    let mut shell = Command::new("sh");
    shell.arg("-c").arg("ulimit -n 128 && exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_sluice"));
    let mut child = spawn_run(&mut shell, &path);
    // No pooled connection: each request below is a new connection, as a scrape after the attack is.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(6)).pool_max_idle_per_host(0).build().unwrap();
    let metrics = format!("http://{api}/metrics");
    // Started: every file it opens at start is open.
    let start = Instant::now();
    while !http.get(format!("http://{api}/health/ready")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut slow = Vec::new();
    for _ in 0..150 {
        let Ok(mut stream) = tokio::net::TcpStream::connect(api).await else { continue };
        slow.push(tokio::spawn(async move {
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n").await;
            for byte in b"x-slow: ".iter().cycle() {
                if stream.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    assert!(slow.len() > 128, "only {} connections", slow.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let answer = http.get(&metrics).send().await;
    let took = asked.elapsed();
    for task in &slow {
        task.abort();
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let text = answer.unwrap_or_else(|e| panic!("/metrics did not answer: {e}\n{log}")).text().await.unwrap();
    assert!(took < Duration::from_secs(6), "/metrics took {took:?}");
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("sluice_http_header_timeouts_total") >= 64.0, "{text}");
    assert!(value("sluice_http_open_connections") <= 64.0, "{text}");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rule's rejects where an operator looks: `sluice run` on a recording whose chain refuses most
/// trades (`outlier-filter` with a tiny threshold). `/v1/sources` counts them for the source and
/// for the link, `/metrics` has them by source and link, and they equal the dead letters the store
/// committed; `/v1/dead-letters` shows each of them decoded, with the symbol's name from the local
/// log's dictionary and the link's name and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_rejects_are_counted_per_source_and_link_and_read_decoded() {
    let dir = temp("rejects-data");
    let path = temp("rejects.toml");
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let recording = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/feeds/binance_us_combined_aggtrade.jsonl");
    let source = Source::file("recorded", std::path::Path::new(recording))
        .decode("binance")
        .link("min-volume", &[])
        .link("outlier-filter", &[("threshold_pct", "0.001")]);
    ConfigToml::new(&dir).api_bind(&api.to_string()).source(source).save_as(&path);
    let child = spawn_run(Command::new(env!("CARGO_BIN_EXE_sluice")).env("RUST_LOG", "sluice=info"), &path);
    let pid = child.id().to_string();
    let http = reqwest::Client::new();
    let get = |route: &str| {
        let (http, url) = (http.clone(), format!("http://{api}{route}"));
        async move { http.get(url).send().await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    // The recording is read once; wait until the store has committed all of it.
    let stored = || -> Option<(u64, u64)> {
        let q = sluice::sink::embedded::QueryConnection::open(&dir.join("store.sqlite")).ok()?;
        let rows = q.query("SELECT sum(events) AS n FROM rollup", 1).ok()?[0]["n"].as_u64().unwrap_or(0);
        let dead = q.query("SELECT count(*) AS n FROM dead_letters", 1).ok()?[0]["n"].as_u64()?;
        Some((rows, dead))
    };
    let start = Instant::now();
    let sources = loop {
        let listed = get("/v1/sources").await;
        let done = listed.as_ref().is_some_and(|l| l["sources"][0]["state"] == "finished");
        if let (true, Some((rows, dead))) = (done, stored())
            && rows + dead == listed.as_ref().unwrap()["sources"][0]["records"].as_u64().unwrap()
        {
            break listed.unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "not all stored: {listed:?} {:?}", stored());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, dead) = stored().unwrap();
    assert!(dead >= 5, "the rule refused only {dead} trades");
    let source = &sources["sources"][0];
    assert_eq!(source["rejects"], 0, "the decoder refused nothing: {sources}");
    assert_eq!(source["transform_rejects"], dead, "{sources}");
    assert_eq!(source["transforms"][0]["rejects"], 0, "min-volume refuses nothing: {sources}");
    assert_eq!(source["transforms"][1]["rejects"], dead, "{sources}");
    let metrics = http.get(format!("http://{api}/metrics")).send().await.unwrap().text().await.unwrap();
    for (link, n) in [("min-volume", 0), ("outlier-filter", dead)] {
        let series = format!(r#"sluice_process_rejects_total{{link="{link}",source="recorded"}} {n}"#);
        assert!(metrics.lines().any(|l| l == series), "no {series} in:\n{metrics}");
    }

    let page = get(&format!("/v1/dead-letters?source=recorded&link=outlier-filter&limit={dead}")).await.unwrap();
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len() as u64, dead, "{page}");
    let version = sluice::plugin::version_of(sluice::plugin::bundled::OUTLIER_FILTER);
    let mut trade_ids = Vec::new();
    for l in letters {
        assert_eq!(
            (&l["source"], &l["link"], &l["version"]),
            (&"recorded".into(), &"outlier-filter".into(), &version.clone().into()),
            "{l}"
        );
        assert!(l["reason"].as_str().unwrap().contains("from last accepted"), "{l}");
        assert_eq!(l["record"]["symbol"], "OMGBUSD", "{l}");
        trade_ids.push(l["record"]["trade_id"].as_u64().unwrap());
    }
    // Newest first: the recording's trade ids rise, so the dead letters' fall.
    assert!(trade_ids.windows(2).all(|w| w[0] > w[1]), "{trade_ids:?}");
    // The `counts` line a stop logs has them too, apart from the frames the decoder refused.
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let counts = log.lines().rfind(|l| l.contains(" counts ")).unwrap_or_else(|| panic!("no counts line:\n{log}"));
    assert!(counts.contains(&format!("transform_rejects={dead} ")), "{counts}");
    assert!(counts.contains(" rejects=0 "), "{counts}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
}

/// `sluice demo --print-config` writes a file from which `sluice demo --config` runs the same demo:
/// the file read back prints the same configuration (the one the demo runs, sources, subscribe
/// messages and the Binance chain included), and the demo run from it starts its simulator where
/// the sources look for it, so every venue's trades are rolled up.
#[test]
fn the_demo_runs_from_its_printed_configuration() {
    let dir = temp("demo-config");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (feed, api) = (free(), free());
    let data = dir.join("data");
    let print = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["demo", "--print-config", "--feed-addr", &feed, "--api-addr", &api, "--data-dir"])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = print(&[]);
    assert!(printed.contains("[[source.transforms]]") && printed.contains("\"outlier-filter\""), "{printed}");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("demo.toml");
    std::fs::write(&file, &printed).unwrap();
    let file_arg = file.to_str().unwrap();
    assert_eq!(print(&["--config", file_arg]), printed, "the demo from the file is the default demo");
    let check = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config", file_arg]).output().unwrap();
    assert!(check.status.success(), "a valid `sluice run` configuration: {}", String::from_utf8_lossy(&check.stderr));
    let demo = ["demo", "--config", file_arg, "--seconds", "5", "--rate", "20"];
    succeeds_saying(&demo, "3 simulated venues (binance, coinbase, kraken)");
    let q = sluice::sink::embedded::QueryConnection::open(&data.join("store.sqlite")).unwrap();
    let rows = q.query("SELECT DISTINCT source FROM rollup ORDER BY source", 10).unwrap();
    let sources: Vec<&str> = rows.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["binance", "coinbase", "kraken"]);
    let _ = std::fs::remove_dir_all(&dir);
}
