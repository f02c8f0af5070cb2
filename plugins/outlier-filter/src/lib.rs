//! Rejects trades whose price jumps too far from the last accepted price of the same symbol: a guard
//! against bad prints and fat-finger trades. Transform only (it decodes nothing).
//!
//! For each `(source_id, symbol_id)` the plugin remembers the price of the last trade it accepted:
//! - the first trade of a symbol is accepted and becomes the reference;
//! - a later trade is accepted when its price is at most `threshold_pct` percent away from the
//!   reference (up or down, the boundary included), and then becomes the new reference;
//! - otherwise it is rejected, with a reason such as
//!   `price 123.45 is 12.23% from last accepted 110 (threshold 5%)` (the percentage is rounded up to
//!   two decimals, so it always reads above the threshold), and the reference stays where it was.
//!
//! Accepted trades pass through byte for byte. A trade with a price of zero or below is rejected
//! (`price 0 is not positive`) and never becomes a reference. The comparison is exact integer
//! arithmetic: `|price - last| * 100 > threshold_pct * last`.
//!
//! The references are the plugin's state (format `outlier-filter.last-price@1`: key
//! `(source_id, symbol_id)`, value the last accepted `price_e8`), which the host commits with each
//! batch and restores before records run again. So after a restart the next trade is judged against
//! the restored reference, and a batch that failed and runs again meets the references it met the
//! first time. Only the very first trade of a symbol is trusted: a bad first print makes the
//! following good trades look like outliers until prices come back within the threshold of it.
//!
//! # Config
//! - `threshold_pct`: positive decimal percentage, e.g. `5` or `2.5`; optional, default `10`. Zero,
//!   negative or non-decimal values fail `init`, as does any other key.

use plugin_sdk::decimal::{format_e8, format_fixed};
use plugin_sdk::{Config, Plugin, Reason, Records, State, StateStore, StreamDataView};

/// Ten percent, with eight implied decimals.
const DEFAULT_THRESHOLD_E8: i64 = 10 * E8 as i64;
const E8: u128 = 100_000_000;

/// The plugin's state: its threshold and the last accepted price per source and symbol.
pub struct OutlierFilter {
    threshold_e8: u128,
    /// `(source_id, symbol_id)` to the last accepted `price_e8` (always positive).
    last: State<(u32, u32), i64>,
}

impl Plugin for OutlierFilter {
    const STATE_FORMAT: &'static str = "outlier-filter.last-price@1";

    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&["threshold_pct"])?;
        let threshold_e8 = config.decimal_e8("threshold_pct")?.unwrap_or(DEFAULT_THRESHOLD_E8);
        let threshold_e8 = u128::try_from(threshold_e8)
            .ok()
            .filter(|&t| t > 0)
            .ok_or("config threshold_pct must be a positive percentage")?;
        Ok(OutlierFilter { threshold_e8, last: State::new() })
    }

    fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        let price = trade.price_e8;
        if price <= 0 {
            return Err(Reason::new(format!("price {} is not positive", format_e8(price))));
        }
        let key = (trade.source_id, trade.symbol_id);
        if let Some(&last) = self.last.get(&key) {
            // Both positive, so the products fit easily in u128: < 2^98 and < 2^126.
            let diff = price.abs_diff(last);
            let last_abs = last.unsigned_abs();
            if u128::from(diff) * 100 * E8 > self.threshold_e8 * u128::from(last_abs) {
                return Err(self.rejection(price, last, diff, last_abs));
            }
        }
        // Accepted (the first trade of a symbol too): the new reference.
        self.last.insert(key, price);
        out.push_view(&trade);
        Ok(())
    }

    fn state(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.last)
    }
}

impl OutlierFilter {
    fn rejection(&self, price: i64, last: i64, diff: u64, last_abs: u64) -> Reason {
        // Percentage with two decimals, rounded up.
        let pct_e2 = (u128::from(diff) * 10_000).div_ceil(u128::from(last_abs));
        Reason::new(format!(
            "price {} is {}% from last accepted {} (threshold {}%)",
            format_e8(price),
            format_fixed(pct_e2, 2),
            format_e8(last),
            format_fixed(self.threshold_e8, 8)
        ))
    }
}

plugin_sdk::export!(OutlierFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::Record;
    use plugin_sdk::testing::{Harness, Rejected};

    /// A trade of `price` (whole units, as a decimal string) on `symbol_id` from source 1.
    fn trade(symbol_id: u32, price: &str) -> Record {
        let price_e8 = plugin_sdk::parse_e8(price).unwrap();
        Record { source_id: 1, symbol_id, price_e8, volume_e8: 100_000_000, ..Record::default() }
    }

    fn filter(threshold_pct: &str) -> Harness<OutlierFilter> {
        Harness::new(&[("threshold_pct", threshold_pct)]).unwrap()
    }

    fn prices(records: &[Record]) -> Vec<i64> {
        records.iter().map(|r| r.price_e8 / 1_000_000).collect()
    }

    fn reject(index: u32, reason: &str) -> Rejected {
        Rejected { index, reason: reason.into() }
    }

    #[test]
    fn first_trade_is_accepted_and_passes_through_unchanged() {
        let mut h = filter("5");
        let t = Record {
            source_id: 3,
            symbol_id: 9,
            price_e8: 12_345_000_000,
            volume_e8: 7,
            timestamp_ms: 1_633_998_523_963,
            is_buy: true,
            trade_id: 15_683_430,
            received_at_us: 1_633_998_523_963_123,
        };
        let out = h.transform(&[t]);
        assert_eq!(out.records, vec![t]);
        assert!(out.rejects.is_empty());
    }

    #[test]
    fn within_threshold_is_accepted_and_moves_the_reference() {
        let mut h = filter("5");
        // 104 is 4% above 100; 109 is 4.8% above 104 (but 9% above 100); 103.55 is exactly 5% below.
        let out = h.transform(&[trade(1, "100"), trade(1, "104"), trade(1, "109"), trade(1, "103.55")]);
        assert_eq!(prices(&out.records), vec![10_000, 10_400, 10_900, 10_355]);
        assert!(out.rejects.is_empty());
    }

    #[test]
    fn outside_threshold_is_rejected_by_index_with_a_reason() {
        let mut h = filter("5");
        let out =
            h.transform(&[trade(1, "100"), trade(1, "104"), trade(1, "120"), trade(1, "106"), trade(1, "100.69")]);
        assert_eq!(prices(&out.records), vec![10_000, 10_400, 10_600]);
        assert_eq!(
            out.rejects,
            vec![
                // 16 / 104 = 15.3846...%, rounded up.
                reject(2, "price 120 is 15.39% from last accepted 104 (threshold 5%)"),
                // 106 is 1.9% from 104 and becomes the reference; 5.31 / 106 = 5.0094...% is over 5%.
                reject(4, "price 100.69 is 5.01% from last accepted 106 (threshold 5%)"),
            ]
        );
    }

    #[test]
    fn reason_text_for_decimal_prices() {
        let mut h = filter("5");
        let out = h.transform(&[trade(1, "110"), trade(1, "123.45")]);
        // 13.45 / 110 = 12.2272...%
        assert_eq!(out.rejects, vec![reject(1, "price 123.45 is 12.23% from last accepted 110 (threshold 5%)")]);
    }

    #[test]
    fn rejection_does_not_move_the_reference() {
        let mut h = filter("5");
        // Had 120 become the reference, 124 would pass (3.3%) and 104 would fail (13.3%).
        let out = h.transform(&[trade(1, "100"), trade(1, "120"), trade(1, "124"), trade(1, "104")]);
        assert_eq!(prices(&out.records), vec![10_000, 10_400]);
        assert_eq!(out.rejects.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out.rejects[1].reason, "price 124 is 24% from last accepted 100 (threshold 5%)");
        // The reference is kept across batches too.
        let out = h.transform(&[trade(1, "120"), trade(1, "99")]);
        assert_eq!(prices(&out.records), vec![9_900]);
        assert_eq!(out.rejects, vec![reject(0, "price 120 is 15.39% from last accepted 104 (threshold 5%)")]);
    }

    #[test]
    fn symbols_and_sources_are_independent() {
        let mut h = filter("5");
        let other_source = |r: Record| Record { source_id: 2, ..r };
        let out = h.transform(&[
            trade(1, "100"),
            trade(2, "1000"),
            other_source(trade(1, "50")),
            trade(1, "103"),
            trade(2, "1040"),
            other_source(trade(1, "52")),
            trade(2, "103"),
            other_source(trade(1, "103")),
        ]);
        assert_eq!(prices(&out.records), vec![10_000, 100_000, 5_000, 10_300, 104_000, 5_200]);
        assert_eq!(
            out.rejects,
            vec![
                reject(6, "price 103 is 90.1% from last accepted 1040 (threshold 5%)"),
                reject(7, "price 103 is 98.08% from last accepted 52 (threshold 5%)"),
            ]
        );
    }

    #[test]
    fn decimal_threshold_boundary_is_exact() {
        let mut h = filter("2.5");
        // 2.5% of 205 is 5.125: 210.125 is on the boundary (accepted), one unit more is not.
        let out = h.transform(&[trade(1, "205"), trade(1, "210.12500001"), trade(1, "210.125"), trade(1, "204.87")]);
        assert_eq!(out.records.iter().map(|r| r.price_e8).collect::<Vec<_>>(), vec![20_500_000_000, 21_012_500_000]);
        assert_eq!(
            out.rejects,
            vec![
                reject(1, "price 210.12500001 is 2.51% from last accepted 205 (threshold 2.5%)"),
                // 5.255 / 210.125 = 2.5009...%: just over.
                reject(3, "price 204.87 is 2.51% from last accepted 210.125 (threshold 2.5%)"),
            ]
        );
    }

    #[test]
    fn default_threshold_is_ten_percent() {
        let mut h = Harness::<OutlierFilter>::new(&[]).unwrap();
        let out = h.transform(&[trade(1, "100"), trade(1, "110.00000001"), trade(1, "110"), trade(1, "99")]);
        assert_eq!(
            out.records.iter().map(|r| r.price_e8).collect::<Vec<_>>(),
            vec![10_000_000_000, 11_000_000_000, 9_900_000_000]
        );
        assert_eq!(out.rejects, vec![reject(1, "price 110.00000001 is 10.01% from last accepted 100 (threshold 10%)")]);
    }

    #[test]
    fn non_positive_prices_are_rejected_and_never_a_reference() {
        let mut h = filter("5");
        let out = h.transform(&[trade(1, "0"), trade(1, "-1.5"), trade(1, "100"), trade(1, "0")]);
        assert_eq!(prices(&out.records), vec![10_000]);
        assert_eq!(
            out.rejects,
            vec![
                reject(0, "price 0 is not positive"),
                reject(1, "price -1.5 is not positive"),
                reject(3, "price 0 is not positive")
            ]
        );
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let at = |symbol_id, price_e8| Record { symbol_id, price_e8, ..Record::default() };
        let mut h = filter("92233720368.54775807");
        let out = h.transform(&[at(1, i64::MAX), at(1, 1), at(2, 1), at(2, i64::MAX)]);
        assert_eq!(out.records, vec![at(1, i64::MAX), at(1, 1), at(2, 1)]);
        assert_eq!(
            out.rejects,
            vec![reject(
                3,
                "price 92233720368.54775807 is 922337203685477580600% from last accepted 0.00000001 \
                 (threshold 92233720368.54775807%)"
            )]
        );
        let mut h = filter("0.00000001");
        let out = h.transform(&[at(1, i64::MAX), at(1, 1), at(2, 1), at(2, i64::MAX)]);
        assert_eq!(out.records, vec![at(1, i64::MAX), at(2, 1)]);
        assert_eq!(
            out.rejects,
            vec![
                reject(1, "price 0.00000001 is 100% from last accepted 92233720368.54775807 (threshold 0.00000001%)"),
                reject(
                    3,
                    "price 92233720368.54775807 is 922337203685477580600% from last accepted 0.00000001 (threshold 0.00000001%)"
                ),
            ]
        );
    }

    #[test]
    fn after_a_restart_the_next_trade_is_judged_against_the_restored_price() {
        let mut h = filter("5");
        assert!(h.transform(&[trade(1, "100"), trade(2, "50")]).rejects.is_empty());
        h.commit();
        h.restart().unwrap();
        let out = h.transform(&[trade(1, "120"), trade(2, "51")]);
        assert_eq!(prices(&out.records), vec![5_100]);
        assert_eq!(out.rejects, vec![reject(0, "price 120 is 20% from last accepted 100 (threshold 5%)")]);
        // What was never committed is gone after a restart: the first trade is trusted again.
        let mut h = filter("5");
        h.transform(&[trade(1, "100")]);
        h.restart().unwrap();
        assert!(h.transform(&[trade(1, "120")]).rejects.is_empty());
    }

    #[test]
    fn a_failed_batch_run_again_decides_as_a_clean_run() {
        let committed = |h: &mut Harness<OutlierFilter>| {
            h.transform(&[trade(1, "100")]);
            h.commit();
        };
        let batch = [trade(1, "105.5"), trade(1, "104")];
        let mut clean = filter("5");
        committed(&mut clean);
        let expected = clean.transform(&batch);
        assert_eq!(prices(&expected.records), vec![10_400]);
        assert_eq!(expected.rejects, vec![reject(0, "price 105.5 is 5.5% from last accepted 100 (threshold 5%)")]);

        let mut faulty = filter("5");
        committed(&mut faulty);
        faulty.transform(&batch); // its commit fails: the batch runs again
        faulty.rollback().unwrap();
        assert_eq!(faulty.transform(&batch), expected);
        faulty.commit();
        clean.commit();
        assert_eq!(faulty.committed(), clean.committed());

        // Run again against the state the failed run left, 105.5 would pass (1.44% from 104).
        let mut unrestored = filter("5");
        committed(&mut unrestored);
        unrestored.transform(&batch);
        assert!(unrestored.transform(&batch).rejects.is_empty());
    }

    #[test]
    fn the_state_is_the_last_price_per_source_and_symbol() {
        use plugin_sdk::state::StateCodec;
        let mut h = filter("5");
        h.transform(&[trade(7, "100"), trade(7, "200"), Record { source_id: 2, ..trade(7, "3") }]);
        h.commit();
        assert_eq!(
            h.committed(),
            vec![
                // In key order; 200 was rejected, so (1, 7) keeps 100.
                ((1u32, 7u32).to_bytes(), 10_000_000_000i64.to_bytes()),
                ((2u32, 7u32).to_bytes(), 300_000_000i64.to_bytes()),
            ]
        );
    }

    #[test]
    fn bad_config_is_refused() {
        let err = |config: &[(&str, &str)]| Harness::<OutlierFilter>::new(config).err().unwrap().to_string();
        assert_eq!(err(&[("threshold", "5")]), r#"unknown config key "threshold" (known: threshold_pct)"#);
        assert_eq!(
            err(&[("threshold_pct", "5%")]),
            r#"config threshold_pct="5%": invalid character at byte 1 of decimal"#
        );
        assert_eq!(err(&[("threshold_pct", "")]), r#"config threshold_pct="": empty decimal"#);
        assert_eq!(err(&[("threshold_pct", "0")]), "config threshold_pct must be a positive percentage");
        assert_eq!(err(&[("threshold_pct", "-5")]), "config threshold_pct must be a positive percentage");
        assert!(Harness::<OutlierFilter>::new(&[("threshold_pct", "0.000000001")]).is_err());
    }
}
