//! A full disk: `sluice run` on the local log, its data directory on a small filesystem of its own
//! (a tmpfs), fed by the feed simulator, while another file fills the filesystem. It must not crash,
//! must refuse and count what it cannot commit (`sluice_log_refused_records_total`, and
//! `/health/ready`'s `log` check), must go on by itself when space returns, and must stop within
//! seconds on SIGTERM while the disk is full.
//!
//! While the disk is full the store is also kept from committing (a trigger refuses its position's
//! update), as a store on a full disk is when its rollup must grow: otherwise the log would make
//! room from what the store goes on reading, and refuse only now and then.

use std::process::Command;
use std::time::{Duration, Instant};

use feedsim::{FeedSim, FeedSimConfig, Venue};

use crate::common::config::{BINANCE_BTC_ETH, ConfigToml, Source};
use crate::common::{SluiceProcess, SmallDisk, free_addr};

/// A series' value in a `/metrics` answer (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// GET `url` (a status of 0 with the error when it does not answer within 10 s).
async fn get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    match client.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls `probe` every 100 ms until it returns true; fails with the log's tail after `limit`.
async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    log: &std::path::Path,
    mut probe: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !probe().await {
        if start.elapsed() > limit {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            panic!(
                "{what}: not within {limit:?}; the log's last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_refused_counted_and_survived_and_a_stop_works() {
    let Some(disk) = SmallDisk::mount("faults-full", 48 << 20) else { return };
    let sim = FeedSim::start(FeedSimConfig { trades_per_second: 2000.0, ..FeedSimConfig::default() }).await.unwrap();
    let dir = crate::common::fresh_dir("faults-disk");
    let api = free_addr();
    // The configuration beside the test's log; the data directory on the small disk.
    let config = ConfigToml::new(&disk.dir)
        .api_bind(&api)
        .set("log", "reserve_bytes", 1048576)
        .process("max_wait_ms", 50)
        .source(Source::ws("binance", &sim.url(Venue::Binance), BINANCE_BTC_ETH).set("plugin", "binance"))
        .save_as(&dir.join("sluice.toml"));
    let log = dir.join("sluice.log");
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    let (metrics_url, ready_url) = (format!("http://{api}/metrics"), format!("http://{api}/health/ready"));
    let scrape = || async { get(&metrics_url).await.1 };
    let refused = |text: &str| metric(text, r#"sluice_log_refused_records_total{reason="disk_full"}"#);
    let delivered = |text: &str| metric(text, "sluice_kafka_records_delivered_total");
    let stored = |text: &str| metric(text, "sluice_process_rows_committed_total");
    let refusing = || async {
        let (status, ready) = get(&ready_url).await;
        let checks: serde_json::Value = serde_json::from_str(&ready).unwrap_or_default();
        let detail = checks["checks"]["log"]["detail"].as_str().unwrap_or_default().to_owned();
        status == 503 && checks["checks"]["log"]["ok"] == false && detail.contains("disk_full")
    };
    wait_until("rows stored", Duration::from_secs(60), &log, || async { stored(&scrape().await) > 100.0 }).await;
    let store = rusqlite::Connection::open(disk.dir.join("store.sqlite")).unwrap();
    store.busy_timeout(Duration::from_secs(10)).unwrap();
    let stick = || {
        store
            .execute_batch(
                "CREATE TRIGGER stuck BEFORE UPDATE ON consumer_offsets BEGIN SELECT RAISE(ABORT, 'the store is stuck'); END;",
            )
            .unwrap()
    };
    let unstick = || store.execute_batch("DROP TRIGGER stuck").unwrap();

    // The disk fills: once the log has used its reserve, new records are refused and counted,
    // readiness says why, and nothing crashes.
    stick();
    let filler = disk.fill("filler");
    wait_until("records refused for a full disk", Duration::from_secs(60), &log, || async {
        refused(&scrape().await) > 100.0
    })
    .await;
    wait_until("/health/ready saying the log refuses for a full disk", Duration::from_secs(10), &log, refusing).await;
    // GET /v1/log says so too, with what the log holds against its cap.
    let status: serde_json::Value = serde_json::from_str(&get(&format!("http://{api}/v1/log")).await.1).unwrap();
    let local = &status["local"];
    assert_eq!(local["refusing"], "disk_full", "{status}");
    assert_eq!(local["max_bytes"], 4u64 << 30, "{status}");
    assert!(local["records_bytes"].as_u64().unwrap() > 0, "{status}");
    // The source's name and two symbols.
    assert!(local["symbols"]["rows"].as_u64().unwrap() >= 3, "{status}");
    assert!(status["store_dead_letters"]["rows"].is_u64(), "{status}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(run.0.as_mut().unwrap().try_wait().unwrap().is_none(), "sluice ended while the disk was full");

    // Space returns: it goes on by itself, and refuses nothing more.
    std::fs::remove_file(&filler).unwrap();
    unstick();
    let text = scrape().await;
    let (was_delivered, was_stored) = (delivered(&text), stored(&text));
    wait_until("delivering and storing again", Duration::from_secs(30), &log, || async {
        let text = scrape().await;
        delivered(&text) > was_delivered + 1000.0 && stored(&text) > was_stored + 1000.0
    })
    .await;
    wait_until("ready again", Duration::from_secs(30), &log, || async { get(&ready_url).await.0 == 200 }).await;
    let settled = refused(&scrape().await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(refused(&scrape().await), settled, "records refused after space returned");

    // Full again, then SIGTERM while the log refuses: the stop finishes within seconds, cleanly.
    stick();
    let filler = disk.fill("filler");
    wait_until("refusing again", Duration::from_secs(60), &log, refusing).await;
    let mut child = run.0.take().unwrap();
    let stopping = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!(
                "SIGTERM did not stop sluice within 15 s while the disk was full:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("stopped {:?} after SIGTERM while the disk was full", stopping.elapsed());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("cannot append to the local log"), "the full disk was not reported:\n{text}");

    // And it starts again on what it left, once there is room.
    std::fs::remove_file(&filler).unwrap();
    unstick();
    let mut run = SluiceProcess::run(&config, &log, &[], None);
    wait_until("rows stored after a restart", Duration::from_secs(60), &log, || async {
        stored(&scrape().await) > 100.0
    })
    .await;
    run.interrupt();
    sim.shutdown().await;
    drop((store, disk));
    let _ = std::fs::remove_dir_all(&dir);
}
