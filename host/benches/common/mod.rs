//! Inputs shared by the benchmarks.
#![allow(dead_code)]

use std::sync::Arc;

use plugin_sdk::{Record, Records};
use sluice::plugin::{Runtime, RuntimeSettings};
use sluice::symbols::Symbols;
use sluice_wire::push_delimited;

pub const BATCH: usize = 1024;
pub const FRAMES: usize = 64;

pub fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_DIR"))).expect("plugins are built by build.rs")
}

pub fn runtime() -> Runtime {
    Runtime::new(RuntimeSettings::default(), Arc::new(Symbols::new())).expect("engine")
}

/// Realistic trades: prices around 65,000.00000000, varied volumes (about one in ten below the
/// filter's minimum), millisecond timestamps and increasing trade ids.
pub fn trades() -> Vec<u8> {
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

pub const RESCALE_CONFIG: [(&str, &str); 2] = [("min_volume", "1"), ("scale", "1.25")];

pub fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn aggtrade_frames() -> Vec<u8> {
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
