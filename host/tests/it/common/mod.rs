//! Helpers shared by the integration tests: a Kafka-protocol broker and a topic reader, a live
//! `sluice` process, a configuration builder ([`config`]) and the process role run in the test
//! ([`role`]).
//!
//! Tests use the broker named by `SLUICE_TEST_BROKERS` (CI starts a real noida-db server and sets
//! it); without it they start noida-db's broker in process (a dev-dependency), on a free loopback port.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
pub mod broker;
pub mod config;
pub mod role;

use broker::EmbeddedBroker;

/// A fresh, empty directory for one test, `sluice-<name>-<pid>-<n>` under the system's temporary
/// directory: unique within the test binary (whose tests share a process id) and across runs.
pub fn fresh_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sluice-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Polls `check` every `every` until it answers `Some`, for at most `limit`; panics naming `what`
/// when it never does.
pub async fn wait_until<T>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(every).await;
    }
}

/// A broker for one test: external (from the environment) or embedded.
pub struct TestBroker {
    pub bootstrap: String,
    _embedded: Option<EmbeddedBroker>,
    dir: Option<PathBuf>,
}

impl TestBroker {
    pub fn start(test: &str) -> Self {
        if let Ok(b) = std::env::var("SLUICE_TEST_BROKERS")
            && !b.is_empty()
        {
            return TestBroker { bootstrap: b, _embedded: None, dir: None };
        }
        let dir = fresh_dir(&format!("test-{test}"));
        let broker = EmbeddedBroker::start("127.0.0.1:0", &dir, Duration::from_secs(3600)).expect("embedded broker");
        TestBroker { bootstrap: broker.bootstrap(), _embedded: Some(broker), dir: Some(dir) }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `[kafka]` settings for the test broker, which is a single broker: one replica per partition
/// (the defaults, 3 and 2, are a real cluster's).
pub fn kafka_config() -> sluice::kafka::KafkaConfig {
    sluice::kafka::KafkaConfig {
        replication_factor: 1,
        min_insync_replicas: 1,
        ..sluice::kafka::KafkaConfig::default()
    }
}

/// The same lines for a `[kafka]` table of a configuration file.
pub const SINGLE_BROKER: &str = "replication_factor = 1\nmin_insync_replicas = 1\n";

/// A unique topic name per test run, so tests sharing an external broker do not see each other.
pub fn unique_topic(base: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{base}.{}.{nanos}", std::process::id())
}

/// One message as read back.
#[derive(Debug, Clone)]
pub struct ReadMessage {
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A reader of `topic`'s partitions `0..partitions` from their start, in a consumer group of its own,
/// that sees committed records only (as Druid's supervisor reads them).
pub fn committed_reader(bootstrap: &str, topic: &str, partitions: i32) -> BaseConsumer {
    reader_with(bootstrap, topic, partitions, &[])
}

/// [`committed_reader`], which also reports each partition's end as `KafkaError::PartitionEOF`.
pub fn committed_reader_to_end(bootstrap: &str, topic: &str, partitions: i32) -> BaseConsumer {
    reader_with(bootstrap, topic, partitions, &[("enable.partition.eof", "true")])
}

fn reader_with(bootstrap: &str, topic: &str, partitions: i32, settings: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_topic("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Reads every partition of `topic` from the beginning until `want` messages arrived or `deadline`
/// passed, and returns what it read.
pub fn read_topic(bootstrap: &str, topic: &str, partitions: i32, want: usize, deadline: Duration) -> Vec<ReadMessage> {
    let consumer = committed_reader(bootstrap, topic, partitions);
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < want && start.elapsed() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(ReadMessage {
                partition: m.partition(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// A `sluice run --config <config>` child writing its log to `log`, killed with SIGKILL if the test
/// ends without stopping it.
pub struct SluiceProcess(pub Option<Child>);

impl SluiceProcess {
    /// Starts `sluice run --config <config> <extra...>`, with `token` as `SLUICE_API_TOKEN`.
    pub fn run(config: &Path, log: &Path, extra: &[&str], token: Option<&str>) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.args(["run", "--config"]).arg(config).args(extra).env("RUST_LOG", "sluice=info");
        if let Some(token) = token {
            command.env("SLUICE_API_TOKEN", token);
        }
        SluiceProcess(Some(command.stdout(Stdio::null()).stderr(log).spawn().unwrap()))
    }

    /// SIGKILL: no flush, no clean stop, an open transaction left behind.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGINT, and waits for the clean stop.
    pub fn interrupt(&mut self) {
        if let Some(mut child) = self.0.take() {
            assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
            let status = child.wait().unwrap();
            assert!(status.success(), "{status}");
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Makes the embedded store at `store` refuse every commit (a trigger on its positions, raising
/// `message`) until [`StoreDown::restore`]: a sink that is down.
pub struct StoreDown(rusqlite::Connection);

impl StoreDown {
    pub fn start(store: &Path, message: &str) -> Self {
        let admin = rusqlite::Connection::open(store).unwrap();
        admin.busy_timeout(Duration::from_secs(10)).unwrap();
        admin
            .execute_batch(&format!(
                "CREATE TRIGGER down BEFORE UPDATE ON consumer_offsets BEGIN SELECT RAISE(ABORT, '{message}'); END;"
            ))
            .unwrap();
        StoreDown(admin)
    }

    pub fn restore(self) {
        self.0.execute_batch("DROP TRIGGER down").unwrap();
    }
}

/// The feed simulator at `rate` trades a second per feed, keeping every trade it sent (for tests
/// that compare what arrived with what was sent).
pub async fn recording_sim(rate: f64) -> feedsim::FeedSim {
    let config = feedsim::FeedSimConfig { trades_per_second: rate, record_trades: true, ..Default::default() };
    feedsim::FeedSim::start(config).await.unwrap()
}

/// Events and exact quantity sums (`qty_sum_e8`) of the embedded store's rollup per value of the
/// columns `by` (nothing while the store is not there yet).
pub fn rollup_sums(store: &Path, by: &[&str]) -> std::collections::BTreeMap<Vec<String>, (i64, i64)> {
    let Ok(q) = sluice::sink::embedded::QueryConnection::open(store) else { return Default::default() };
    let columns = by.join(", ");
    let sql = format!("SELECT {columns}, sum(events) AS n, sum(qty_sum_e8) AS q FROM rollup GROUP BY {columns}");
    q.query(&sql, 10_000)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let key = by.iter().map(|c| r[*c].as_str().unwrap_or_default().to_owned()).collect();
            (key, (r["n"].as_i64().unwrap_or(0), r["q"].as_i64().unwrap_or(0)))
        })
        .collect()
}

/// A loopback address nothing listens on yet.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// `GET http://<api><path>` as JSON: `null` while nothing answers there (an instance starting or
/// stopped) or when the body is not JSON.
pub async fn api_get(api: &str, path: &str) -> serde_json::Value {
    match reqwest::get(format!("http://{api}{path}")).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// A JSON call to a child's API with `token`; answers (status, body).
pub async fn api_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let mut request = http.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// The same component with a custom section appended: other bytes (another version), same behaviour.
pub fn with_custom_section(wasm: &[u8], note: &str) -> Vec<u8> {
    let mut out = wasm.to_vec();
    let mut payload = vec![note.len() as u8];
    payload.extend_from_slice(note.as_bytes());
    payload.extend_from_slice(b"rebuilt");
    out.push(0); // custom section id
    out.push(payload.len() as u8);
    out.extend_from_slice(&payload);
    out
}

/// A small filesystem of its own for one test: a tmpfs of `bytes` mounted on a new directory, so
/// the test can fill it without touching the machine's disk. Unmounted when dropped.
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    /// Mounts it (root only). `None`, saying the test is skipped and why, where mounting is
    /// impossible (CI runs as root, so there it always runs).
    pub fn mount(name: &str, bytes: u64) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("sluice-small-disk-{name}-{}", std::process::id()));
        let _ = Command::new("umount").arg("-l").arg(&dir).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::piped())
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(SmallDisk { dir }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs of {bytes} bytes at {} (this test needs root): {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount (this test needs root and mount): {e}");
                None
            }
        }
    }

    /// Writes the file `name` until the filesystem refuses more, and returns its path: the disk is
    /// full until it is removed.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        for chunk in [1 << 16, 1 << 12] {
            while file.write_all(&vec![0x5a; chunk]).is_ok() {}
        }
        let _ = file.sync_all();
        path
    }

    /// Bytes free on the filesystem, as `df` reports them.
    pub fn free_bytes(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.dir).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a process of the test may still hold a file open there.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
