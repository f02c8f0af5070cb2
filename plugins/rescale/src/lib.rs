//! Drops trades below a minimum volume and multiplies the remaining prices by an exact decimal factor
//! (say, a currency conversion or a contract multiplier).
//!
//! Config:
//! - `min_volume`: decimal, trades with a smaller volume are dropped (default `0`, keep all).
//! - `scale`: decimal factor applied to prices (default `1`). A price that would overflow is rejected.

use plugin_sdk::decimal::mul_div;
use plugin_sdk::{Config, Plugin, Reason, Record, Records, StreamDataView};

const ONE_E8: i64 = 100_000_000;

fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The plugin's state: its two settings, the scale as a reduced fraction.
pub struct Rescale {
    min_volume_e8: i64,
    numerator: i64,
    denominator: i64,
}

impl Plugin for Rescale {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&["min_volume", "scale"])?;
        let scale_e8 = config.decimal_e8("scale")?.unwrap_or(ONE_E8);
        if scale_e8 <= 0 {
            return Err("config scale must be positive".into());
        }
        let divisor = gcd(scale_e8, ONE_E8);
        Ok(Rescale {
            min_volume_e8: config.decimal_e8("min_volume")?.unwrap_or(0),
            numerator: scale_e8 / divisor,
            denominator: ONE_E8 / divisor,
        })
    }

    #[inline]
    fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        if trade.volume_e8 < self.min_volume_e8 {
            return Ok(());
        }
        let price_e8 = mul_div(trade.price_e8, self.numerator, self.denominator).ok_or("rescaled price overflows")?;
        out.push(&Record { price_e8, ..trade.record() });
        Ok(())
    }
}

plugin_sdk::export!(Rescale);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    fn trade(price_e8: i64, volume_e8: i64) -> Record {
        Record { symbol_id: 1, price_e8, volume_e8, trade_id: 7, ..Record::default() }
    }

    #[test]
    fn filters_and_rescales_exactly() {
        let mut h = Harness::<Rescale>::new(&[("min_volume", "0.5"), ("scale", "0.25")]).unwrap();
        let out = h.transform(&[trade(400_000_000, 50_000_000), trade(400_000_000, 49_999_999), trade(3, 60_000_000)]);
        assert_eq!(out.records, vec![trade(100_000_000, 50_000_000), trade(0, 60_000_000)]);
        assert!(out.rejects.is_empty());
    }

    #[test]
    fn large_products_are_exact_through_the_wide_path() {
        // 9e17 * 3 overflows i64 before the division by 2.
        let mut h = Harness::<Rescale>::new(&[("scale", "1.5")]).unwrap();
        let out = h.transform(&[trade(900_000_000_000_000_000, 1)]);
        assert_eq!(out.records[0].price_e8, 1_350_000_000_000_000_000);
    }

    #[test]
    fn overflow_is_rejected() {
        let mut h = Harness::<Rescale>::new(&[("scale", "1000")]).unwrap();
        let out = h.transform(&[trade(i64::MAX / 10, 1)]);
        assert!(out.records.is_empty());
        assert_eq!(out.rejects[0].reason, "rescaled price overflows");
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Harness::<Rescale>::new(&[("scale", "-1")]).is_err());
        assert!(Harness::<Rescale>::new(&[("scale", "abc")]).is_err());
        assert!(Harness::<Rescale>::new(&[("scael", "1")]).is_err());
    }
}
