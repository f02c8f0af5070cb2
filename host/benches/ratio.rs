//! wasm against native on the same core, interleaved so machine noise hits both alike.
//!
//! Each round times a burst of wasm calls and then a burst of native calls of the same plugin code on
//! the same input; the report gives the median per-record (or per-frame) time of each and the median
//! of the per-round ratios. Run: `cargo bench -p sluice --bench ratio`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::*;
use plugin_sdk::Runner;
use sluice::plugin::{Limits, PluginInstance};

const ROUNDS: usize = 60;
const CALLS_PER_BURST: usize = 40;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `wasm` and `native` bursts alternately; returns (wasm items/s, native items/s, wasm/native).
fn interleave(items: usize, mut wasm: impl FnMut(), mut native: impl FnMut()) -> (f64, f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..CALLS_PER_BURST {
            f();
        }
        start.elapsed()
    };
    // Warm up both paths.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(500) {
        wasm();
        native();
    }
    let (mut w, mut n, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let tw = time(&mut wasm).as_secs_f64();
        let tn = time(&mut native).as_secs_f64();
        let per_burst = (items * CALLS_PER_BURST) as f64;
        w.push(per_burst / tw);
        n.push(per_burst / tn);
        ratio.push(tn / tw);
    }
    (median(w), median(n), median(ratio))
}

fn report(name: &str, unit: &str, (w, n, r): (f64, f64, f64)) {
    println!("{name}: wasm {:.2} M{unit}/s, native {:.2} M{unit}/s, wasm/native {:.0}%", w / 1e6, n / 1e6, r * 100.0);
}

fn main() {
    let rt = runtime();
    let cfg: Vec<(String, String)> = RESCALE_CONFIG.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();

    let batch = trades();
    let code = rt.compile("rescale", &wasm("rescale"), Limits::default()).expect("rescale compiles");
    let mut instance = PluginInstance::new(&code, &cfg).expect("rescale starts");
    let mut native = Runner::<rescale::Rescale>::new();
    native.init(cfg.clone()).expect("rescale init");
    let r = interleave(
        BATCH,
        || {
            black_box(instance.transform(black_box(&batch)).expect("transform").count);
        },
        || {
            native.transform(black_box(&batch));
            black_box(native.output().len());
        },
    );
    report("transform rescale, 1024-record batches", "records", r);

    // The transform stage as the process role runs it: the call, then every output record parsed
    // (which is where its contents are checked), against the native run with the same parse.
    let mut stage = sluice::transform::Transformer::new(PluginInstance::new(&code, &cfg).expect("rescale starts"));
    let mut parsed: Vec<plugin_sdk::Record> = Vec::with_capacity(BATCH);
    let r = interleave(
        BATCH,
        || {
            black_box(stage.transform(black_box(&batch)).expect("transform").parsed.len());
        },
        || {
            native.transform(black_box(&batch));
            parsed.clear();
            for item in sluice_wire::Delimited::new(native.output().as_bytes()) {
                parsed.push(plugin_sdk::StreamDataView::parse(item.expect("framed")).expect("valid").record());
            }
            black_box(parsed.len());
        },
    );
    report("  with the output parsed (the process role's transform stage)", "records", r);

    // The fixed cost of a transform call (copies, framing checks; the guest only counts records),
    // against the same native run: how much of the gap is the boundary rather than the guest's code.
    let chaos = rt.compile("chaos", &wasm("chaos"), Limits::default()).expect("chaos compiles");
    let mut pass = PluginInstance::new(&chaos, &[]).expect("chaos starts");
    let r = interleave(
        BATCH,
        || {
            black_box(pass.transform(black_box(&batch)).expect("transform").count);
        },
        || {
            native.transform(black_box(&batch));
            black_box(native.output().len());
        },
    );
    report("  boundary only (a guest that returns its input), 1024-record batches", "records", r);

    let frames = aggtrade_frames();
    let code = rt.compile("binance", &wasm("binance"), Limits::default()).expect("binance compiles");
    let mut instance = PluginInstance::new(&code, &[]).expect("binance starts");
    let mut native = Runner::<binance::Binance>::new();
    native.init(vec![]).expect("binance init");
    let r = interleave(
        FRAMES,
        || {
            black_box(instance.decode(black_box(&frames)).expect("decode").counts.len());
        },
        || {
            native.decode(black_box(&frames));
            black_box(native.output().len());
        },
    );
    report("decode binance aggTrade, 64-frame calls", "frames", r);
}
