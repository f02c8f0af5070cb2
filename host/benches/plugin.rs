//! Hot paths of the plugin runtime: `transform` on 1024-record batches and `decode` of Binance frames,
//! each through wasm and natively (the same plugin code, the same batch loop), and what a hot swap
//! costs: compiling a component, deserializing a precompiled one, instantiating it.
//!
//! Run: `cargo bench -p sluice --bench plugin`. Numbers and the machine are in BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use plugin_sdk::Runner;
use sluice::plugin::{Limits, PluginInstance};
use sluice::transform::Transformer;

mod common;
use common::*;

fn transform(c: &mut Criterion) {
    let batch = trades();
    let rt = runtime();
    let mut g = c.benchmark_group("transform_1024");
    g.throughput(Throughput::Elements(BATCH as u64));
    let code = rt.compile("rescale", &wasm("rescale"), Limits::default()).unwrap();
    let mut instance = PluginInstance::new(&code, &config(&RESCALE_CONFIG)).unwrap();
    g.bench_function("wasm", |b| b.iter(|| black_box(instance.transform(black_box(&batch)).unwrap().count)));
    // The fixed cost of a call: copy in, copy out, framing checks, no work in the guest.
    let chaos = rt.compile("chaos", &wasm("chaos"), Limits::default()).unwrap();
    let mut pass = PluginInstance::new(&chaos, &[]).unwrap();
    g.bench_function("wasm_passthrough_floor", |b| {
        b.iter(|| black_box(pass.transform(black_box(&batch)).unwrap().count))
    });
    let mut native = Runner::<rescale::Rescale>::new();
    native.init(config(&RESCALE_CONFIG)).unwrap();
    g.bench_function("native", |b| {
        b.iter(|| {
            native.transform(black_box(&batch));
            black_box(native.output().len())
        })
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let frames = aggtrade_frames();
    let rt = runtime();
    let mut g = c.benchmark_group("decode_binance_aggtrade_64");
    g.throughput(Throughput::Elements(FRAMES as u64));
    let code = rt.compile("binance", &wasm("binance"), Limits::default()).unwrap();
    let mut instance = PluginInstance::new(&code, &[]).unwrap();
    g.bench_function("wasm", |b| b.iter(|| black_box(instance.decode(black_box(&frames)).unwrap().counts.len())));
    let mut native = Runner::<binance::Binance>::new();
    native.init(vec![]).unwrap();
    g.bench_function("native", |b| {
        b.iter(|| {
            native.decode(black_box(&frames));
            black_box(native.output().len())
        })
    });
    g.finish();
}

fn swap_costs(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("plugin_load");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for name in ["binance", "rescale"] {
        let bytes = wasm(name);
        g.bench_with_input(
            BenchmarkId::new("compile", format!("{name}_{}KB", bytes.len() / 1024)),
            &bytes,
            |b, bytes| b.iter(|| rt.compile(name, bytes, Limits::default()).unwrap()),
        );
    }
    let bytes = wasm("binance");
    let component = wasmtime::component::Component::new(rt.engine(), &bytes).unwrap();
    let serialized = component.serialize().unwrap();
    g.sample_size(50).measurement_time(Duration::from_secs(4));
    g.bench_function("deserialize_precompiled/binance", |b| {
        b.iter(|| {
            // SAFETY: the bytes were produced by `serialize` on this engine a moment ago.
            unsafe { wasmtime::component::Component::deserialize(rt.engine(), &serialized).unwrap() }
        })
    });
    let code = rt.load("binance", &sluice::plugin::version_of(&wasm("binance")), component, Limits::default()).unwrap();
    g.bench_function("instantiate_and_init/binance", |b| b.iter(|| PluginInstance::new(&code, &[]).unwrap()));
    g.finish();
}

/// What state costs a transform through the host's path (`Transformer`, as the process role calls
/// it): the same stateless plugin built against world 0.1 (before state) and 0.2, and
/// `outlier-filter` keeping its last price per symbol as state, its changes taken after each call
/// and committed.
fn state(c: &mut Criterion) {
    let batch = trades();
    let rt = runtime();
    let mut g = c.benchmark_group("transform_state_1024");
    g.throughput(Throughput::Elements(BATCH as u64));
    let old = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/plugins/rescale-0.1.wasm")).unwrap();
    for (name, bytes) in [("rescale_world_0_1", old), ("rescale_world_0_2", wasm("rescale"))] {
        let code = rt.compile("rescale", &bytes, Limits::default()).unwrap();
        let mut t = Transformer::new(PluginInstance::new(&code, &config(&RESCALE_CONFIG)).unwrap());
        g.bench_function(name, |b| b.iter(|| black_box(t.transform(black_box(&batch)).unwrap().count)));
    }
    let code = rt.compile("outlier-filter", &wasm("outlier_filter"), Limits::default()).unwrap();
    let mut t = Transformer::new(PluginInstance::new(&code, &config(&[("threshold_pct", "50")])).unwrap());
    g.bench_function("outlier_filter_with_state", |b| {
        b.iter(|| {
            let n = t.transform(black_box(&batch)).unwrap().count;
            t.state_mut().commit();
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, transform, decode, swap_costs, state);
criterion_main!(benches);
