//! The control plane's two latencies that operators feel:
//!
//! 1. Upload: `PUT /v1/plugins/{name}` over loopback HTTP until the 201 answer, with everything it
//!    does: read the body, compile the component (Cranelift), run `init` with the bound source's
//!    config, write the blob and the index (fsync'd, renamed into place). Each upload goes to a fresh
//!    registry, so nothing is cached. The bundled plugins (77-107 KB) are measured, plus the file
//!    named by `SLUICE_BENCH_LARGE_PLUGIN`, if set (BENCHMARKS.md builds a ~200 KB one).
//! 2. Activate to first batch: `Registry::activate` of another stored version, then a worker's
//!    `sync` and its first `transform` call on that version, for a 1024-record batch — the time from
//!    the activate call to the first batch having run on the new version, minus the wait for the
//!    next batch to arrive (the process role polls at most every 100 ms; the end-to-end test measures
//!    that too).
//!
//! Run: `cargo bench -p sluice --bench registry`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{runtime, trades, wasm};
use criterion::{Criterion, criterion_group, criterion_main};
use sluice::api::{ApiConfig, ApiState, Connections, Health, PluginDirectory, Secret, router, serve};
use sluice::plugin::PluginInstance;
use sluice::plugin::registry::{Binding, BoundPlugin, Mode, Registry};
use sluice::transform::Transformer;

const TOKEN: &str = "bench";

fn temp_dir(label: &str, i: u64) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sluice-bench-registry-{}-{label}-{i}", std::process::id()))
}

/// A registry (binding `name` to one source with no config) under `dir`, served on loopback.
async fn server(dir: &std::path::Path, name: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let bindings = HashMap::from([(name.to_owned(), vec![Binding { source: "feed".into(), config: vec![] }])]);
    let registry = Arc::new(Registry::open(Arc::new(runtime()), dir, HashMap::new(), bindings).expect("registry"));
    let directory = Arc::new(PluginDirectory::default());
    directory.set(registry);
    let config = ApiConfig { token: Some(Secret(TOKEN.into())), ..ApiConfig::default() };
    let app = router(ApiState::new(&config, None, Arc::new(Health::new())).with_plugins(directory));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, Connections::new(&config, Arc::default()), async {
        let _ = stopped.await;
    }));
    (base, stop)
}

fn upload(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let http = reqwest::Client::new();
    let mut plugins: Vec<(String, Vec<u8>)> =
        ["binance", "coinbase", "kraken", "rescale"].iter().map(|n| (n.to_string(), wasm(n))).collect();
    if let Ok(path) = std::env::var("SLUICE_BENCH_LARGE_PLUGIN") {
        plugins.push(("large".into(), std::fs::read(&path).expect("SLUICE_BENCH_LARGE_PLUGIN is readable")));
    }
    let mut group = c.benchmark_group("upload");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, bytes) in &plugins {
        let label = format!("{name}_{}KB", bytes.len() / 1000);
        group.bench_function(&label, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        let dir = temp_dir(&label, i);
                        let _ = std::fs::remove_dir_all(&dir);
                        let (base, stop) = server(&dir, "p").await;
                        let started = Instant::now();
                        let response = http
                            .put(format!("{base}/v1/plugins/p"))
                            .bearer_auth(TOKEN)
                            .body(bytes.clone())
                            .send()
                            .await
                            .expect("request");
                        total += started.elapsed();
                        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap_or_default());
                        let _ = stop.send(());
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

fn activate_to_first_batch(c: &mut Criterion) {
    let dir = temp_dir("activate", 0);
    let _ = std::fs::remove_dir_all(&dir);
    let registry = Registry::open(Arc::new(runtime()), &dir, HashMap::new(), HashMap::new()).expect("registry");
    let slot = registry.deploy("p", &wasm("rescale")).expect("deploy");
    let versions =
        [slot.active().version().to_owned(), registry.upload("p", &wasm("double_price")).expect("upload").version];
    let mut worker =
        Transformer::bound(BoundPlugin::new(slot.clone(), PluginInstance::new(&slot.active(), &[]).expect("init")));
    let batch = trades();
    let mut next = 1;
    c.bench_function("activate_to_first_batch", |b| {
        b.iter(|| {
            registry.activate("p", &versions[next], Mode::Active).expect("activate");
            let out = worker.transform(&batch).expect("transform");
            assert_eq!(worker.plugin().version(), versions[next]);
            next = 1 - next;
            out.count
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, upload, activate_to_first_batch);
criterion_main!(benches);
