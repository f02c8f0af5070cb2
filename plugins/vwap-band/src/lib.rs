//! Rejects trades priced more than `band_pct` percent away from the volume-weighted average price
//! (VWAP) of the last accepted trades of the same symbol: a steadier guard than a comparison with the
//! last price alone, since one odd print moves a VWAP little. Transform only (it decodes nothing).
//!
//! For each `(source_id, symbol_id)` the plugin keeps a window of the last `window_trades` accepted
//! trades (price and volume):
//! - the first trade of a symbol is accepted and starts the window;
//! - a later trade is accepted when its price is at most `band_pct` percent away from the window's
//!   VWAP (up or down, the boundary included), and then joins the window, the oldest trade leaving
//!   a full window;
//! - otherwise it is rejected, with a reason such as
//!   `price 105.5 is 5.5% from VWAP 100 of the last 3 trades (band 2%)` (the percentage is rounded
//!   up to two decimals, so it always reads above the band), and the window stays as it was.
//!
//! Accepted trades pass through byte for byte. The VWAP is `Σ price × volume / Σ volume` in exact
//! integers, rounded half up to eight decimals; the comparison is `|price - vwap| * 100 > band_pct *
//! vwap`, exactly. A trade with a price or a volume of zero or below is rejected (`price 0 is not
//! positive`, `volume -1 is not positive`), as is one whose price × volume is too large to average
//! (above 2^116 in units of 10^-16, far beyond any real trade); none of those joins a window.
//!
//! The windows are the plugin's state, format `vwap-band.window@1`: key `(source_id, symbol_id)`,
//! value the window's trades oldest first. The host commits them with each batch and restores them
//! before records run again, so after a restart the next trade is judged against the restored
//! window, and a batch that failed and runs again meets the windows it met the first time. A
//! restored window longer than `window_trades` (the setting was lowered) is cut to its newest trades.
//!
//! # Config
//! - `band_pct`: positive decimal percentage, e.g. `2` or `0.5`; optional, default `2`.
//! - `window_trades`: how many accepted trades the VWAP covers, 1 to 1000; optional, default `20`.
//!
//! Anything else, or a value out of range, fails `init`.

use std::collections::VecDeque;

use plugin_sdk::decimal::{format_e8, format_fixed};
use plugin_sdk::state::{StateCodec, StateError};
use plugin_sdk::{Config, Plugin, Reason, Records, State, StateStore, StreamDataView};

const E8: u128 = 100_000_000;
/// Two percent, with eight implied decimals.
const DEFAULT_BAND_E8: i64 = 2 * E8 as i64;
const DEFAULT_WINDOW: usize = 20;
const MAX_WINDOW: usize = 1000;
/// The largest price × volume (in units of 10^-16) a window takes: with at most 1000 < 2^10 trades
/// the window's sums stay below 2^126, so they never overflow a `u128`.
const MAX_NOTIONAL_E16: u128 = 1 << 116;

/// The plugin's settings and its windows.
pub struct VwapBand {
    band_e8: u128,
    window: usize,
    /// `(source_id, symbol_id)` to the last accepted trades, oldest first.
    windows: State<(u32, u32), Window>,
}

/// The last accepted trades of a symbol, oldest first: `(price_e8, volume_e8)`, both positive and
/// their product at most [`MAX_NOTIONAL_E16`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window(VecDeque<(i64, i64)>);

impl Window {
    /// The VWAP with eight decimals, rounded half up; `None` for an empty window.
    fn vwap_e8(&self) -> Option<u128> {
        let (mut notional, mut volume) = (0u128, 0u128);
        for &(price, vol) in &self.0 {
            notional += u128::from(price.unsigned_abs()) * u128::from(vol.unsigned_abs());
            volume += u128::from(vol.unsigned_abs());
        }
        (volume > 0).then(|| (notional + volume / 2) / volume)
    }
}

/// A count, then each trade's price and volume.
impl StateCodec for Window {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.0.len() as u32).encode(out);
        for trade in &self.0 {
            trade.encode(out);
        }
    }

    fn decode(input: &mut &[u8]) -> Result<Self, StateError> {
        let n = u32::decode(input)? as usize;
        // Each trade takes 16 bytes: a count the input cannot hold is refused before allocating.
        if n > input.len() / 16 {
            return Err(StateError::new(format!("window of {n} trades in {} bytes", input.len())));
        }
        (0..n).map(|_| <(i64, i64)>::decode(input)).collect::<Result<_, _>>().map(Window)
    }
}

impl Plugin for VwapBand {
    const STATE_FORMAT: &'static str = "vwap-band.window@1";

    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&["band_pct", "window_trades"])?;
        let band_e8 = config.decimal_e8("band_pct")?.unwrap_or(DEFAULT_BAND_E8);
        let band_e8 =
            u128::try_from(band_e8).ok().filter(|&b| b > 0).ok_or("config band_pct must be a positive percentage")?;
        let window = config.parse::<usize>("window_trades")?.unwrap_or(DEFAULT_WINDOW);
        if !(1..=MAX_WINDOW).contains(&window) {
            return Err(Reason::new(format!("config window_trades must be 1 to {MAX_WINDOW}")));
        }
        Ok(VwapBand { band_e8, window, windows: State::new() })
    }

    fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        let (price, volume) = (trade.price_e8, trade.volume_e8);
        if price <= 0 {
            return Err(Reason::new(format!("price {} is not positive", format_e8(price))));
        }
        if volume <= 0 {
            return Err(Reason::new(format!("volume {} is not positive", format_e8(volume))));
        }
        if u128::from(price.unsigned_abs()) * u128::from(volume.unsigned_abs()) > MAX_NOTIONAL_E16 {
            return Err(Reason::new(format!(
                "price {} × volume {} is too large to average",
                format_e8(price),
                format_e8(volume)
            )));
        }
        let key = (trade.source_id, trade.symbol_id);
        if let Some(window) = self.windows.get(&key) {
            // Cut to the configured length first: a restored window may be longer.
            let skip = window.0.len().saturating_sub(self.window);
            let recent = Window(window.0.iter().skip(skip).copied().collect());
            if let Some(vwap) = recent.vwap_e8() {
                // diff < 2^63, so diff * 100 * E8 < 2^97; band and vwap < 2^63 each.
                let diff = u128::from(price.unsigned_abs()).abs_diff(vwap);
                if diff * 100 * E8 > self.band_e8 * vwap {
                    return Err(self.rejection(price, vwap, diff, recent.0.len()));
                }
            }
        }
        let window = self.windows.get_or_insert_with(key, Window::default);
        window.0.push_back((price, volume));
        while window.0.len() > self.window {
            window.0.pop_front();
        }
        out.push_view(&trade);
        Ok(())
    }

    fn state(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.windows)
    }
}

impl VwapBand {
    fn rejection(&self, price: i64, vwap: u128, diff: u128, trades: usize) -> Reason {
        // Percentage with two decimals, rounded up.
        let pct_e2 = (diff * 10_000).div_ceil(vwap);
        Reason::new(format!(
            "price {} is {}% from VWAP {} of the last {trades} trade{} (band {}%)",
            format_e8(price),
            format_fixed(pct_e2, 2),
            format_fixed(vwap, 8),
            if trades == 1 { "" } else { "s" },
            format_fixed(self.band_e8, 8)
        ))
    }
}

plugin_sdk::export!(VwapBand);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::Record;
    use plugin_sdk::testing::{Harness, Rejected};

    /// A trade on `symbol_id` from source 1 at `price` for `volume` (decimal strings).
    fn trade(symbol_id: u32, price: &str, volume: &str) -> Record {
        let price_e8 = plugin_sdk::parse_e8(price).unwrap();
        let volume_e8 = plugin_sdk::parse_e8(volume).unwrap();
        Record { source_id: 1, symbol_id, price_e8, volume_e8, ..Record::default() }
    }

    /// A trade of volume 1.
    fn at(price: &str) -> Record {
        trade(1, price, "1")
    }

    fn band(config: &[(&str, &str)]) -> Harness<VwapBand> {
        Harness::new(config).unwrap()
    }

    /// Prices in hundredths.
    fn prices(out: &plugin_sdk::testing::Transformed) -> Vec<i64> {
        out.records.iter().map(|r| r.price_e8 / 1_000_000).collect()
    }

    fn reject(index: u32, reason: &str) -> Rejected {
        Rejected { index, reason: reason.into() }
    }

    #[test]
    fn trades_within_the_band_of_the_vwap_pass_through_unchanged() {
        let mut h = band(&[]);
        let t = Record { trade_id: 9, timestamp_ms: 5, is_buy: true, received_at_us: 7, ..trade(3, "100", "2") };
        let u = Record { trade_id: 10, ..trade(3, "102", "1") };
        let out = h.transform(&[t, u]);
        assert_eq!(out.records, vec![t, u]);
        assert!(out.rejects.is_empty());
    }

    #[test]
    fn the_vwap_weighs_prices_by_volume() {
        let mut h = band(&[("band_pct", "2")]);
        // VWAP of 100 × 3 and 101 × 1 is 100.25 (the plain mean, 100.5): 102.255 is exactly 2% above
        // it, 102.26 is not (it would be within 2% of the plain mean).
        let out = h.transform(&[
            trade(1, "100", "3"),
            trade(1, "101", "1"),
            trade(1, "102.26", "1"),
            trade(1, "102.255", "0.5"),
        ]);
        assert_eq!(prices(&out), vec![10_000, 10_100, 10_225]);
        assert_eq!(
            out.rejects,
            vec![reject(2, "price 102.26 is 2.01% from VWAP 100.25 of the last 2 trades (band 2%)")]
        );
    }

    #[test]
    fn the_window_keeps_the_last_accepted_trades_only() {
        let mut h = band(&[("band_pct", "5"), ("window_trades", "2")]);
        // 100, 104 → VWAP 102; 120 rejected (not in the window); 106 → window [104, 106] → 105.
        // 99.7 is 5.05% below 105 (rejected); with 100 still in the window it would pass.
        let out = h.transform(&[at("100"), at("104"), at("120"), at("106"), at("99.7")]);
        assert_eq!(prices(&out), vec![10_000, 10_400, 10_600]);
        assert_eq!(
            out.rejects,
            vec![
                reject(2, "price 120 is 17.65% from VWAP 102 of the last 2 trades (band 5%)"),
                reject(4, "price 99.7 is 5.05% from VWAP 105 of the last 2 trades (band 5%)"),
            ]
        );
    }

    #[test]
    fn symbols_and_sources_have_their_own_windows() {
        let mut h = band(&[]);
        let other_source = |r: Record| Record { source_id: 2, ..r };
        let out =
            h.transform(&[at("100"), trade(2, "50", "1"), other_source(at("200")), at("101"), trade(2, "101", "1")]);
        assert_eq!(prices(&out), vec![10_000, 5_000, 20_000, 10_100]);
        assert_eq!(out.rejects, vec![reject(4, "price 101 is 102% from VWAP 50 of the last 1 trade (band 2%)")]);
    }

    #[test]
    fn after_a_restart_the_next_trade_is_judged_against_the_restored_window() {
        let mut h = band(&[]);
        h.transform(&[at("100"), at("101")]);
        h.commit();
        h.restart().unwrap();
        let out = h.transform(&[at("110"), at("100.5")]);
        assert_eq!(prices(&out), vec![10_050]);
        assert_eq!(out.rejects, vec![reject(0, "price 110 is 9.46% from VWAP 100.5 of the last 2 trades (band 2%)")]);
    }

    #[test]
    fn a_failed_batch_run_again_decides_as_a_clean_run() {
        let start = |h: &mut Harness<VwapBand>| {
            h.transform(&[at("100"), at("100")]);
            h.commit();
        };
        // Against VWAP 100, 102.5 is out and 101.9 in; after 101.9 and 102.1 joined, 102.5 would pass.
        let batch = [at("102.5"), at("101.9"), at("102.1")];
        let mut clean = band(&[]);
        start(&mut clean);
        let expected = clean.transform(&batch);
        assert_eq!(prices(&expected), vec![10_190, 10_210]);
        assert_eq!(
            expected.rejects,
            vec![reject(0, "price 102.5 is 2.5% from VWAP 100 of the last 2 trades (band 2%)")]
        );

        let mut faulty = band(&[]);
        start(&mut faulty);
        faulty.transform(&batch);
        faulty.rollback().unwrap();
        assert_eq!(faulty.transform(&batch), expected);
        faulty.commit();
        clean.commit();
        assert_eq!(faulty.committed(), clean.committed());

        // Without the rollback the run again would decide otherwise.
        let mut unrestored = band(&[]);
        start(&mut unrestored);
        unrestored.transform(&batch);
        assert_ne!(unrestored.transform(&batch), expected);
    }

    #[test]
    fn a_restored_window_longer_than_configured_is_cut_to_its_newest_trades() {
        let mut h = band(&[("window_trades", "3")]);
        h.transform(&[at("90"), at("91"), at("92")]);
        h.commit();
        let mut h = h.swap::<VwapBand>(&[("window_trades", "1")]).unwrap();
        // Against 92 alone, 90.1 is 2.07% away; against all three (91) it would be within 1%.
        let out = h.transform(&[at("90.1")]);
        assert_eq!(out.rejects, vec![reject(0, "price 90.1 is 2.07% from VWAP 92 of the last 1 trade (band 2%)")]);
    }

    #[test]
    fn bad_trades_are_rejected_and_never_join_a_window() {
        let mut h = band(&[]);
        let big = Record { price_e8: i64::MAX, volume_e8: i64::MAX, ..at("1") };
        let out = h.transform(&[at("0"), trade(1, "100", "0"), trade(1, "100", "-1"), big, at("100"), at("-5")]);
        assert_eq!(prices(&out), vec![10_000]);
        assert_eq!(
            out.rejects,
            vec![
                reject(0, "price 0 is not positive"),
                reject(1, "volume 0 is not positive"),
                reject(2, "volume -1 is not positive"),
                reject(3, "price 92233720368.54775807 × volume 92233720368.54775807 is too large to average"),
                reject(5, "price -5 is not positive"),
            ]
        );
    }

    #[test]
    fn the_largest_windows_do_not_overflow() {
        let mut h = band(&[("window_trades", "1000"), ("band_pct", "92233720368.54775807")]);
        // Price × volume just under the cap, a thousand times.
        let price_e8 = 1i64 << 62;
        let big = Record { price_e8, volume_e8: 1 << 54, ..at("1") };
        let out = h.transform(&vec![big; 1000]);
        assert_eq!(out.records.len(), 1000);
        let out = h.transform(&[Record { price_e8: 1, ..big }]);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    }

    #[test]
    fn a_window_round_trips_and_bad_bytes_are_refused() {
        let w = Window(VecDeque::from([(1, 2), (i64::MAX, 3)]));
        assert_eq!(Window::from_bytes(&w.to_bytes()), Ok(w));
        assert_eq!(Window::from_bytes(&[0, 0, 0, 9, 1]).unwrap_err().to_string(), "window of 9 trades in 1 bytes");
        assert_eq!(Window::from_bytes(&[0xff; 4]).unwrap_err().to_string(), "window of 4294967295 trades in 0 bytes");
    }

    #[test]
    fn bad_config_is_refused() {
        let err = |config: &[(&str, &str)]| Harness::<VwapBand>::new(config).err().unwrap().to_string();
        assert_eq!(err(&[("band", "5")]), r#"unknown config key "band" (known: band_pct, window_trades)"#);
        assert_eq!(err(&[("band_pct", "0")]), "config band_pct must be a positive percentage");
        assert_eq!(err(&[("band_pct", "-1")]), "config band_pct must be a positive percentage");
        assert_eq!(err(&[("band_pct", "x")]), r#"config band_pct="x": invalid character at byte 0 of decimal"#);
        assert_eq!(err(&[("window_trades", "0")]), "config window_trades must be 1 to 1000");
        assert_eq!(err(&[("window_trades", "1001")]), "config window_trades must be 1 to 1000");
        assert_eq!(err(&[("window_trades", "ten")]), r#"config window_trades="ten": invalid digit found in string"#);
    }
}
