//! A transform that doubles every price: a change anyone can see in the output, so the hot-swap
//! tests can tell from each delivered record which plugin version processed it. It takes no config
//! (so it starts wherever a decoder without config is bound) and has no decoder.

use plugin_sdk::{Config, Plugin, Reason, Record, Records, StreamDataView};

/// The plugin; it keeps no state.
pub struct DoublePrice;

impl Plugin for DoublePrice {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&[])?;
        Ok(DoublePrice)
    }

    fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        let price_e8 = trade.price_e8.checked_mul(2).ok_or("doubled price overflows")?;
        out.push(&Record { price_e8, ..trade.record() });
        Ok(())
    }
}

plugin_sdk::export!(DoublePrice);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::testing::Harness;

    #[test]
    fn doubles_prices_and_refuses_overflow() {
        let mut h = Harness::<DoublePrice>::new(&[]).unwrap();
        let trade = |price_e8| Record { symbol_id: 1, price_e8, volume_e8: 5, trade_id: 9, ..Record::default() };
        let out = h.transform(&[trade(150_000_000), trade(i64::MAX)]);
        assert_eq!(out.records, vec![trade(300_000_000)]);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].index, 1);
        assert!(Harness::<DoublePrice>::new(&[("scale", "2")]).is_err());
    }
}
