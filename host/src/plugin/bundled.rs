//! The example plugins from `plugins/`, built to wasm at compile time and bundled into the binary, so
//! `sluice demo` runs anywhere with nothing else installed.

macro_rules! plugin {
    ($file:literal) => {
        include_bytes!(concat!(env!("SLUICE_PLUGIN_DIR"), "/", $file))
    };
}

/// The Binance decoder (aggTrade and trade, raw and combined streams).
pub const BINANCE: &[u8] = plugin!("binance.wasm");
/// The Coinbase Exchange decoder (match and last_match).
pub const COINBASE: &[u8] = plugin!("coinbase.wasm");
/// The Kraken v1 trade decoder.
pub const KRAKEN: &[u8] = plugin!("kraken.wasm");
/// The OKX v5 public `trades` decoder.
pub const OKX: &[u8] = plugin!("okx.wasm");
/// The Bybit v5 `publicTrade.{symbol}` decoder.
pub const BYBIT: &[u8] = plugin!("bybit.wasm");
/// The Bitstamp v2 `live_trades_{pair}` decoder.
pub const BITSTAMP: &[u8] = plugin!("bitstamp.wasm");
/// The Kraken WebSocket v2 `trade` decoder.
pub const KRAKEN_V2: &[u8] = plugin!("kraken_v2.wasm");
/// The Coinbase Advanced Trade `market_trades` decoder.
pub const COINBASE_ADVANCED: &[u8] = plugin!("coinbase_advanced.wasm");
/// Drops trades below a minimum volume.
pub const MIN_VOLUME: &[u8] = plugin!("min_volume.wasm");
/// Rejects trades too far from the last accepted price of their symbol.
pub const OUTLIER_FILTER: &[u8] = plugin!("outlier_filter.wasm");
/// Drops small trades and rescales prices.
pub const RESCALE: &[u8] = plugin!("rescale.wasm");
/// Rejects trades too far from the VWAP of their symbol's last trades (stateful).
pub const VWAP_BAND: &[u8] = plugin!("vwap_band.wasm");

/// The bundled plugins by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "binance" => Some(BINANCE),
        "coinbase" => Some(COINBASE),
        "kraken" => Some(KRAKEN),
        "okx" => Some(OKX),
        "bybit" => Some(BYBIT),
        "bitstamp" => Some(BITSTAMP),
        "kraken-v2" => Some(KRAKEN_V2),
        "coinbase-advanced" => Some(COINBASE_ADVANCED),
        "min-volume" => Some(MIN_VOLUME),
        "outlier-filter" => Some(OUTLIER_FILTER),
        "rescale" => Some(RESCALE),
        "vwap-band" => Some(VWAP_BAND),
        _ => None,
    }
}

/// The names [`by_name`] knows.
pub fn names() -> &'static [&'static str] {
    &[
        "binance",
        "coinbase",
        "kraken",
        "okx",
        "bybit",
        "bitstamp",
        "kraken-v2",
        "coinbase-advanced",
        "min-volume",
        "outlier-filter",
        "rescale",
        "vwap-band",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_bundled_component() {
        for name in names() {
            let wasm = by_name(name).unwrap_or_else(|| panic!("{name} is listed but not bundled"));
            assert!(wasm.starts_with(b"\0asm"), "{name} is not WebAssembly");
        }
        assert_eq!(by_name("kraken-v2"), Some(KRAKEN_V2));
        assert_eq!(by_name("nope"), None);
    }
}
