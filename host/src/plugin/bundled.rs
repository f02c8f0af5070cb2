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
/// Drops trades below a minimum volume.
pub const MIN_VOLUME: &[u8] = plugin!("min_volume.wasm");
/// Rejects trades too far from the last accepted price of their symbol.
pub const OUTLIER_FILTER: &[u8] = plugin!("outlier_filter.wasm");
/// Drops small trades and rescales prices.
pub const RESCALE: &[u8] = plugin!("rescale.wasm");

/// The bundled plugins by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "binance" => Some(BINANCE),
        "coinbase" => Some(COINBASE),
        "kraken" => Some(KRAKEN),
        "min-volume" => Some(MIN_VOLUME),
        "outlier-filter" => Some(OUTLIER_FILTER),
        "rescale" => Some(RESCALE),
        _ => None,
    }
}

/// The names [`by_name`] knows.
pub fn names() -> &'static [&'static str] {
    &["binance", "coinbase", "kraken", "min-volume", "outlier-filter", "rescale"]
}
