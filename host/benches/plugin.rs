//! Hot paths of the plugin runtime: `transform` on 1024-record batches and `decode` of Binance frames,
//! each through wasm and natively (the same plugin code, the same batch loop), and what a hot swap
//! costs: compiling a component, deserializing a precompiled one, instantiating it.
//!
//! Run: `cargo bench -p sluice --bench plugin`. Numbers and the machine are in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use plugin_sdk::wire::push_delimited;
use plugin_sdk::{Record, Records, Runner};
use sluice::plugin::{Limits, Runtime, RuntimeSettings};
use sluice::symbols::Symbols;

const BATCH: usize = 1024;
const FRAMES: usize = 64;

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_DIR"))).expect("plugins are built by build.rs")
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeSettings::default(), Arc::new(Symbols::new())).expect("engine")
}

/// Realistic trades: prices around 65,000.00000000, varied volumes (about one in ten below the
/// filter's minimum), millisecond timestamps and increasing trade ids.
fn trades() -> Vec<u8> {
    let mut out = Records::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..BATCH as u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(&Record {
            source_id: 3,
            symbol_id: 1 + (x % 40) as u32,
            price_e8: 6_500_000_000_000 + (x % 10_000_000_000) as i64,
            volume_e8: (x >> 20) as i64 % 1_000_000_000,
            timestamp_ms: 1_700_000_000_000 + i as i64,
            is_buy: x & 1 == 1,
            trade_id: 9_000_000_000 + i,
            received_at_us: 1_700_000_000_000_000 + i as i64 * 1000,
        });
    }
    out.take()
}

const RESCALE_CONFIG: [(&str, &str); 2] = [("min_volume", "1"), ("scale", "1.25")];

fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn transform(c: &mut Criterion) {
    let batch = trades();
    let rt = runtime();
    let mut g = c.benchmark_group("transform_1024");
    g.throughput(Throughput::Elements(BATCH as u64));
    let code = rt.compile("rescale", &wasm("rescale"), Limits::default()).unwrap();
    let mut instance = code.instantiate(&config(&RESCALE_CONFIG)).unwrap();
    g.bench_function("wasm", |b| b.iter(|| black_box(instance.transform(black_box(&batch)).unwrap().count)));
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

fn aggtrade_frames() -> Vec<u8> {
    let mut frames = Vec::new();
    for i in 0..FRAMES {
        let sym = ["BTCUSDT", "ETHUSDT", "NKNUSDT", "LRCBTC"][i % 4];
        let frame = format!(
            r#"{{"stream":"{}@aggTrade","data":{{"e":"aggTrade","E":1633998523963,"s":"{sym}","a":{},"p":"65000.{:08}","q":"0.{:08}","f":19862790,"l":19862790,"T":1633998523963,"m":{},"M":true}}}}"#,
            sym.to_lowercase(),
            15_683_430 + i,
            i * 7919 % 100_000_000,
            i * 104_729 % 100_000_000,
            i % 3 == 0
        );
        push_delimited(&mut frames, frame.as_bytes());
    }
    frames
}

fn decode(c: &mut Criterion) {
    let frames = aggtrade_frames();
    let rt = runtime();
    let mut g = c.benchmark_group("decode_binance_aggtrade_64");
    g.throughput(Throughput::Elements(FRAMES as u64));
    let code = rt.compile("binance", &wasm("binance"), Limits::default()).unwrap();
    let mut instance = code.instantiate(&[]).unwrap();
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
    let code = rt.load("binance", component, Limits::default()).unwrap();
    g.bench_function("instantiate_and_init/binance", |b| b.iter(|| code.instantiate(&[]).unwrap()));
    g.finish();
}

criterion_group!(benches, transform, decode, swap_costs);
criterion_main!(benches);
