//! Sink rows: a trade as Druid reads it from the Druid topic, encoded as `sluice.v1.SinkRow` straight into a
//! reused buffer.
//!
//! The generated [`SinkRow`](crate::proto::SinkRow) owns its strings, so building one per trade would
//! allocate twice per record; [`encode_row`] writes the same bytes from borrowed names instead (a test holds
//! it to prost's encoding of the generated message).

use sluice_wire::write_varint;

use crate::proto::StreamData;

/// Field numbers of `sluice.v1.SinkRow` in `proto/sluice.proto`.
mod field {
    pub const TIMESTAMP_MS: u8 = 1;
    pub const SOURCE: u8 = 2;
    pub const SYMBOL: u8 = 3;
    pub const SIDE: u8 = 4;
    pub const PRICE: u8 = 5;
    pub const QTY: u8 = 6;
    pub const NOTIONAL: u8 = 7;
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// Fixed-point e8 to a float: `150_000_000` is `1.5`.
#[inline]
pub fn e8_to_f64(value: i64) -> f64 {
    value as f64 / 1e8
}

/// Appends `record` as a `sluice.v1.SinkRow` to `out`, with the source and symbol names it refers to.
///
/// Price and quantity become floats (`price_e8 / 10^8`), the notional is their product, and the side is
/// `buy` or `sell`, matching the embedded store's rollup. Fields equal to their default are left out, as
/// protobuf does. Nothing is allocated but what `out` needs to grow: clear and reuse it between rows.
pub fn encode_row(record: &StreamData, source: &str, symbol: &str, out: &mut Vec<u8>) {
    let price = e8_to_f64(record.price_e8);
    let qty = e8_to_f64(record.volume_e8);
    let side = if record.is_buy { "buy" } else { "sell" };
    if record.timestamp_ms != 0 {
        out.push((field::TIMESTAMP_MS << 3) | VARINT);
        // int64 goes on the wire as its two's-complement bits.
        write_varint(out, record.timestamp_ms as u64);
    }
    put_str(out, field::SOURCE, source);
    put_str(out, field::SYMBOL, symbol);
    put_str(out, field::SIDE, side);
    put_f64(out, field::PRICE, price);
    put_f64(out, field::QTY, qty);
    put_f64(out, field::NOTIONAL, price * qty);
}

fn put_str(out: &mut Vec<u8>, field: u8, value: &str) {
    if !value.is_empty() {
        out.push((field << 3) | LEN);
        write_varint(out, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }
}

fn put_f64(out: &mut Vec<u8>, field: u8, value: f64) {
    if value != 0.0 {
        out.push((field << 3) | FIXED64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::proto::SinkRow;

    fn trade(timestamp_ms: i64, price_e8: i64, volume_e8: i64, is_buy: bool) -> StreamData {
        StreamData { timestamp_ms, price_e8, volume_e8, is_buy, source_id: 3, symbol_id: 9, ..Default::default() }
    }

    #[test]
    fn rows_are_the_bytes_prost_writes_for_sink_row() {
        let cases = [
            (trade(1_700_000_000_123, 6_512_345_000_000, 1_500_000, true), "binance", "BTCUSDT"),
            (trade(-5, 1, 1, false), "kraken", "XBT/USD"),
            (trade(0, 0, 0, true), "", ""),
            (trade(i64::MAX, i64::MIN, -250_000_000, false), "coinbase", "ÉTH-€"),
        ];
        let mut out = Vec::new();
        for (record, source, symbol) in &cases {
            out.clear();
            encode_row(record, source, symbol, &mut out);
            let price = record.price_e8 as f64 / 1e8;
            let qty = record.volume_e8 as f64 / 1e8;
            let expected = SinkRow {
                timestamp_ms: record.timestamp_ms,
                source: source.to_string(),
                symbol: symbol.to_string(),
                side: if record.is_buy { "buy" } else { "sell" }.into(),
                price,
                qty,
                notional: price * qty,
            };
            assert_eq!(out, expected.encode_to_vec(), "{record:?}");
            assert_eq!(SinkRow::decode(out.as_slice()).unwrap(), expected);
        }
    }

    #[test]
    fn fixed_point_becomes_the_decimal_it_stands_for() {
        let mut out = Vec::new();
        encode_row(&trade(1, 6_512_345_000_000, 150_000_000, false), "s", "y", &mut out);
        let row = SinkRow::decode(out.as_slice()).unwrap();
        assert_eq!(row.price, 65_123.45);
        assert_eq!(row.qty, 1.5);
        assert_eq!(row.notional, 65_123.45 * 1.5);
        assert_eq!(row.side, "sell");
    }

    #[test]
    fn the_buffer_is_appended_to_and_reused() {
        let mut out = Vec::with_capacity(256);
        let first = out.as_ptr();
        for i in 0..100 {
            out.clear();
            encode_row(&trade(i, 100, 100, true), "binance", "BTCUSDT", &mut out);
        }
        assert_eq!(out.as_ptr(), first, "a row fits in the buffer, so it never reallocates");
        let one = out.clone();
        encode_row(&trade(99, 100, 100, true), "binance", "BTCUSDT", &mut out);
        assert_eq!(out.len(), 2 * one.len());
    }
}
