//! Drops trades smaller than a configured volume; the rest pass through byte for byte. Transform
//! only (it decodes nothing): the book's plugin tutorial, and a link of the demo's Binance chain.
//!
//! # Config
//! - `min_volume`: decimal, in the symbol's base unit; trades with a smaller `volume_e8` are
//!   dropped (not refused: a filter's drop is no error). Optional, default `0` (keep all). A
//!   negative or non-decimal value fails `init`, as does any other key.

use plugin_sdk::{Config, Plugin, Reason, Records, StreamDataView};

/// The plugin's state: the smallest volume kept.
pub struct MinVolume {
    min_volume_e8: i64,
}

impl Plugin for MinVolume {
    fn init(config: &Config) -> Result<Self, Reason> {
        config.expect_only(&["min_volume"])?; // a typo in the config fails loading
        let min_volume_e8 = config.decimal_e8("min_volume")?.unwrap_or(0);
        if min_volume_e8 < 0 {
            return Err("config min_volume must not be negative".into());
        }
        Ok(MinVolume { min_volume_e8 })
    }

    fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        if trade.volume_e8 >= self.min_volume_e8 {
            out.push_view(&trade); // passes the record through byte for byte
        }
        Ok(())
    }
}

plugin_sdk::export!(MinVolume);

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_sdk::{Record, testing::Harness};

    #[test]
    fn drops_small_trades_and_keeps_the_boundary() {
        let mut h = Harness::<MinVolume>::new(&[("min_volume", "0.5")]).unwrap();
        let small = Record { volume_e8: 49_999_999, trade_id: 1, ..Record::default() };
        let boundary = Record { volume_e8: 50_000_000, trade_id: 2, ..Record::default() };
        let big = Record { volume_e8: 70_000_000, trade_id: 3, ..Record::default() };
        let out = h.transform(&[small, boundary, big]);
        assert_eq!(out.records, vec![boundary, big]);
        assert!(out.rejects.is_empty());
    }

    #[test]
    fn keeps_everything_by_default() {
        let mut h = Harness::<MinVolume>::new(&[]).unwrap();
        let dust = Record { volume_e8: 1, ..Record::default() };
        assert_eq!(h.transform(&[dust]).records, vec![dust]);
    }

    #[test]
    fn bad_config_fails_init() {
        assert!(Harness::<MinVolume>::new(&[("min_volume", "-1")]).is_err());
        assert!(Harness::<MinVolume>::new(&[("min_volume", "lots")]).is_err());
        assert!(Harness::<MinVolume>::new(&[("min_volum", "1")]).is_err());
    }
}
