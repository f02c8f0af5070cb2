//! The plugin tutorial (`docs/src/plugins/tutorial.md`) walked as a new author walks it, with only
//! the `sluice` binary, cargo and the wasm target: the SDK written out of the binary, `plugin new`
//! outside the checkout, the author's rule (it refuses small trades), `cargo test`, the wasm build,
//! `plugin test --decode-with binance --expect`, the demo started from its printed configuration,
//! the upload, the rule put into the running Binance chain over the API, its rejects counted and its
//! dead letters read by symbol name, and a `kill -9` and restart that keep the chain.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::{fresh_dir, wait_until};

const TOKEN: &str = "tutorial-token";

fn sluice(args: &[&str], cwd: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).current_dir(cwd).env_remove("RUST_LOG").output();
    let out = out.unwrap();
    assert!(out.status.success(), "sluice {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn cargo(args: &[&str], crate_dir: &Path) {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .arg("--offline")
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", crate_dir.join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// A running demo, killed (`kill -9`) when dropped, so a failing assertion leaves no demo behind.
struct Demo(Child);

impl Demo {
    fn kill_9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.kill_9();
    }
}

fn demo(config: &Path, cwd: &Path) -> Demo {
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--config"])
        .arg(config)
        .args(["--rate", "400"])
        .env("SLUICE_API_TOKEN", TOKEN)
        .env_remove("RUST_LOG")
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Demo(child)
}

async fn get(http: &reqwest::Client, url: String) -> Option<serde_json::Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// The author's rule, as the template's comment says to write it: refuse what the old one dropped.
fn write_the_rule(crate_dir: &Path) {
    let lib = crate_dir.join("src/lib.rs");
    let template = std::fs::read_to_string(&lib).unwrap();
    let dropped =
        "        if record.volume_e8 >= self.min_volume_e8 {\n            out.push_view(&record);\n        }\n";
    assert!(template.contains(dropped), "the template changed:\n{template}");
    let refused = "        if record.volume_e8 < self.min_volume_e8 {\n            \
                   return Err(Reason::new(\"volume under min_volume\"));\n        }\n        out.push_view(&record);\n";
    std::fs::write(&lib, template.replace(dropped, refused)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_runs_from_plugin_new_to_a_rule_in_the_running_demo() {
    let base = fresh_dir("tutorial");

    // The SDK and a new transform, outside any checkout; the author's rule; its tests; the wasm.
    sluice(&["plugin", "sdk", "--out", "sdk"], &base);
    sluice(&["plugin", "new", "big-trades", "--transform", "--sdk", "sdk"], &base);
    let crate_dir = base.join("big-trades");
    write_the_rule(&crate_dir);
    cargo(&["test", "--quiet"], &crate_dir);
    cargo(&["build", "--release", "--target", "wasm32-wasip2", "--quiet"], &crate_dir);
    let wasm = crate_dir.join("target/wasm32-wasip2/release/big_trades.wasm");
    let wasm_arg = wasm.to_str().unwrap();
    let args = ["--frames", "frames.jsonl", "--expect", "expected.jsonl", "--strict", "--decode-with", "binance"];
    sluice(&[&["plugin", "test", wasm_arg][..], &args[..]].concat(), &crate_dir);

    // The demo from its printed configuration.
    let (feed, api) = (free_addr(), free_addr());
    let data = base.join("data");
    let printed = sluice(
        &["demo", "--print-config", "--feed-addr", &feed, "--api-addr", &api, "--data-dir", data.to_str().unwrap()],
        &base,
    );
    let config = base.join("demo.toml");
    std::fs::write(&config, printed.stdout).unwrap();
    let mut running = demo(&config, &base);
    let http = reqwest::Client::new();
    let sources = format!("http://{api}/v1/sources");
    wait_until(Duration::from_secs(120), Duration::from_millis(200), "the demo's sources", async || {
        let listed = get(&http, sources.clone()).await?;
        (listed["sources"].as_array()?.iter().filter(|s| s["state"] == "up").count() == 3).then_some(())
    })
    .await;

    // The upload, then the rule in front of the running Binance chain.
    let put = http
        .put(format!("http://{api}/v1/plugins/big-trades"))
        .bearer_auth(TOKEN)
        .body(std::fs::read(&wasm).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{}", put.text().await.unwrap());
    let link = serde_json::json!({"plugin": "big-trades", "config": {"min_volume": "1"}, "at": 0});
    let links = format!("http://{api}/v1/sources/binance/chain/links");
    let added = http.post(&links).bearer_auth(TOKEN).json(&link).send().await.unwrap();
    assert_eq!(added.status(), 200, "{}", added.text().await.unwrap());

    // Its rejects, where an operator looks, and its dead letters by symbol name.
    let counted = async || {
        let listed = get(&http, sources.clone()).await?;
        let binance = listed["sources"].as_array()?.iter().find(|s| s["name"] == "binance")?.clone();
        let first = &binance["transforms"][0];
        (first["plugin"] == "big-trades" && first["rejects"].as_u64()? > 0).then_some(binance)
    };
    let binance = wait_until(Duration::from_secs(60), Duration::from_millis(200), "the rule's rejects", counted).await;
    assert!(binance["transform_rejects"].as_u64().unwrap() >= binance["transforms"][0]["rejects"].as_u64().unwrap());
    let letters = get(&http, format!("http://{api}/v1/dead-letters?source=binance&link=big-trades&limit=20")).await;
    let letters = letters.unwrap();
    let letters = letters["dead_letters"].as_array().unwrap();
    assert!(!letters.is_empty());
    for letter in letters {
        assert_eq!(letter["reason"], "volume under min_volume", "{letter}");
        let symbol = letter["record"]["symbol"].as_str().unwrap_or_default();
        assert!(symbol.ends_with("USDT"), "a dead letter names its symbol: {letter}");
        assert!(letter["record"]["volume_e8"].as_i64().unwrap() < 100_000_000, "{letter}");
    }

    // `kill -9`, and the demo started again on its data directory still runs the rule.
    running.kill_9();
    let mut running = demo(&config, &base);
    let chain =
        wait_until(Duration::from_secs(120), Duration::from_millis(200), "the chain after the restart", async || {
            get(&http, format!("http://{api}/v1/sources/binance/chain")).await.filter(|c| c["edited"].is_boolean())
        })
        .await;
    assert_eq!(chain["edited"], true, "{chain}");
    assert_eq!(chain["links"][0]["plugin"], "big-trades", "{chain}");
    wait_until(Duration::from_secs(60), Duration::from_millis(200), "the rule's rejects after the restart", counted)
        .await;
    running.kill_9();
    let _ = std::fs::remove_dir_all(&base);
}
