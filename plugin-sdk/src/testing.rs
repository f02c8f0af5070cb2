//! Run a plugin natively in `cargo test`, through the same batch loop the wasm build uses.
//!
//! The harness stands in for the host: it keeps a symbol dictionary (ids from 1 in order of first use,
//! per test thread) and frames the inputs as the host does.
//!
//! ```
//! use plugin_sdk::{testing::Harness, Config, Plugin, Reason, Records, Record};
//!
//! struct OneTrade;
//! impl Plugin for OneTrade {
//!     fn init(_: &Config) -> Result<Self, Reason> { Ok(OneTrade) }
//!     fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
//!         let symbol = std::str::from_utf8(frame).map_err(|_| "not UTF-8")?;
//!         out.push(&Record { symbol_id: plugin_sdk::symbol_id(symbol), ..Record::default() });
//!         Ok(())
//!     }
//! }
//!
//! let mut h = Harness::<OneTrade>::new(&[])?;
//! let records = h.decode(b"BTCUSDT")?;
//! assert_eq!(h.symbol(records[0].symbol_id).as_deref(), Some("BTCUSDT"));
//! # Ok::<(), Reason>(())
//! ```

use crate::wire::{Records, push_delimited};
use crate::{Plugin, Reason, Record, Runner};

/// An input the plugin refused, by its index in the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the frame or record in the batch, 0-based.
    pub index: u32,
    /// The plugin's reason.
    pub reason: String,
}

/// What a batch of frames decoded to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The records of each frame, one entry per input frame.
    pub per_frame: Vec<Vec<Record>>,
    /// The frames that were refused.
    pub rejects: Vec<Rejected>,
}

/// What a batch of records transformed to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transformed {
    /// The output records, in order.
    pub records: Vec<Record>,
    /// The input records that were refused.
    pub rejects: Vec<Rejected>,
}

/// A plugin instance under test.
pub struct Harness<P> {
    runner: Runner<P>,
    /// Reused to frame inputs.
    scratch: Vec<u8>,
}

impl<P: Plugin> Harness<P> {
    /// Initialises the plugin with `config`, starting a fresh symbol dictionary for this thread.
    ///
    /// # Errors
    /// The plugin's [`Reason`] when `init` fails.
    pub fn new(config: &[(&str, &str)]) -> Result<Self, Reason> {
        crate::symbols::native::reset();
        let mut runner = Runner::new();
        runner.init(config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())?;
        Ok(Harness { runner, scratch: Vec::new() })
    }

    /// Decodes one frame.
    ///
    /// # Errors
    /// The plugin's [`Reason`] when it refuses the frame.
    pub fn decode(&mut self, frame: &[u8]) -> Result<Vec<Record>, Reason> {
        let mut out = self.decode_batch(&[frame]);
        match out.rejects.pop() {
            Some(r) => Err(Reason::new(r.reason)),
            None => Ok(out.per_frame.pop().unwrap_or_default()),
        }
    }

    /// Decodes one frame like [`decode`](Self::decode), each record with its symbol's name and its
    /// `symbol_id` zeroed: what a test compares with the trades it expects, by name.
    ///
    /// ```
    /// # use plugin_sdk::{testing::Harness, Config, Plugin, Reason, Record, Records, symbol_id};
    /// # struct One;
    /// # impl Plugin for One {
    /// #     fn init(_: &Config) -> Result<Self, Reason> { Ok(One) }
    /// #     fn decode(&mut self, _: &[u8], out: &mut Records) -> Result<(), Reason> {
    /// #         out.push(&Record { symbol_id: symbol_id("BTCUSDT"), trade_id: 7, ..Record::default() });
    /// #         Ok(())
    /// #     }
    /// # }
    /// let mut h = Harness::<One>::new(&[])?;
    /// let named = h.decode_named(b"{}")?;
    /// assert_eq!(named, vec![("BTCUSDT".to_owned(), Record { trade_id: 7, ..Record::default() })]);
    /// # Ok::<(), Reason>(())
    /// ```
    ///
    /// # Errors
    /// The plugin's reason when it refuses the frame.
    pub fn decode_named(&mut self, frame: &[u8]) -> Result<Vec<(String, Record)>, Reason> {
        let records = self.decode(frame)?;
        Ok(records
            .into_iter()
            .map(|r| (self.symbol(r.symbol_id).unwrap_or_default(), Record { symbol_id: 0, ..r }))
            .collect())
    }

    /// Decodes a batch of frames in one call, as the host does when frames arrive quickly.
    pub fn decode_batch(&mut self, frames: &[&[u8]]) -> Decoded {
        self.scratch.clear();
        for f in frames {
            push_delimited(&mut self.scratch, f);
        }
        self.runner.decode(&self.scratch);
        let mut records = read(self.runner.output()).into_iter();
        let per_frame = self.runner.counts().iter().map(|&n| records.by_ref().take(n as usize).collect()).collect();
        Decoded { per_frame, rejects: rejected(self.runner.rejects()) }
    }

    /// Transforms a batch of records.
    pub fn transform(&mut self, records: &[Record]) -> Transformed {
        let mut input = Records::new();
        for r in records {
            input.push(r);
        }
        self.transform_bytes(input.as_bytes())
    }

    /// Transforms a batch given as length-delimited bytes, e.g. to test malformed input.
    pub fn transform_bytes(&mut self, batch: &[u8]) -> Transformed {
        self.runner.transform(batch);
        Transformed { records: read(self.runner.output()), rejects: rejected(self.runner.rejects()) }
    }

    /// The name behind a symbol id.
    pub fn symbol(&self, id: u32) -> Option<String> {
        crate::symbols::native::name(id)
    }
}

fn read(records: &Records) -> Vec<Record> {
    // The runner wrote these records itself, so they always read back.
    records.iter().filter_map(Result::ok).map(|v| v.record()).collect()
}

fn rejected(list: &[(u32, Reason)]) -> Vec<Rejected> {
    list.iter().map(|(index, reason)| Rejected { index: *index, reason: reason.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, StreamDataView};

    /// Splits frames like `SYM:price` into one record each; `!` fails after pushing one record.
    struct Toy;
    impl Plugin for Toy {
        fn init(config: &Config) -> Result<Self, Reason> {
            config.expect_only(&["ok"])?;
            Ok(Toy)
        }
        fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
            let text = std::str::from_utf8(frame).map_err(|_| "not UTF-8")?;
            for part in text.split(',').filter(|p| !p.is_empty()) {
                if part == "!" {
                    return Err("bang".into());
                }
                let (sym, price) = part.split_once(':').ok_or("no colon")?;
                let price_e8 = crate::parse_e8(price).map_err(|e| Reason::field("price", e))?;
                out.push(&Record { symbol_id: crate::symbol_id(sym), price_e8, ..Record::default() });
            }
            Ok(())
        }
        fn transform(&mut self, r: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
            if r.price_e8 < 0 {
                out.push_view(&r);
                return Err("negative price".into());
            }
            out.push(&Record { price_e8: r.price_e8 * 2, ..r.record() });
            Ok(())
        }
    }

    #[test]
    fn decode_batches_keep_frame_boundaries_and_drop_partial_output() {
        let mut h = Harness::<Toy>::new(&[]).unwrap();
        let out = h.decode_batch(&[b"A:1,B:2", b"", b"A:3,!", b"C:x"]);
        let syms: Vec<Vec<_>> =
            out.per_frame.iter().map(|f| f.iter().map(|r| h.symbol(r.symbol_id).unwrap()).collect()).collect();
        assert_eq!(syms, vec![vec!["A", "B"], vec![], vec![], vec![]]);
        assert_eq!(out.per_frame[0][1].price_e8, 200_000_000);
        assert_eq!(
            out.rejects,
            vec![
                Rejected { index: 2, reason: "bang".into() },
                Rejected { index: 3, reason: "price: invalid character at byte 0 of decimal".into() }
            ]
        );
    }

    #[test]
    fn transform_rejects_by_index_and_rolls_back() {
        let mut h = Harness::<Toy>::new(&[]).unwrap();
        let input = [
            Record { price_e8: 5, ..Record::default() },
            Record { price_e8: -1, ..Record::default() },
            Record { price_e8: 7, trade_id: 3, ..Record::default() },
        ];
        let out = h.transform(&input);
        assert_eq!(out.records.iter().map(|r| r.price_e8).collect::<Vec<_>>(), vec![10, 14]);
        assert_eq!(out.records[1].trade_id, 3);
        assert_eq!(out.rejects, vec![Rejected { index: 1, reason: "negative price".into() }]);
    }

    #[test]
    fn malformed_input_records_are_rejected_not_fatal() {
        let mut h = Harness::<Toy>::new(&[]).unwrap();
        // A valid record, a record with a bad field, then a truncated length.
        let out = h.transform_bytes(&[2, 3 << 3, 4, 1, 0, 9]);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.rejects.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out.rejects[0].reason, "record: field number 0");
    }

    #[test]
    fn bad_config_fails_init() {
        let err = Harness::<Toy>::new(&[("typo", "1")]).err().unwrap();
        assert_eq!(err.as_str(), "unknown config key \"typo\" (known: ok)");
    }

    #[test]
    fn default_methods_reject_decode_and_pass_records_through() {
        struct Nothing;
        impl Plugin for Nothing {
            fn init(_: &Config) -> Result<Self, Reason> {
                Ok(Nothing)
            }
        }
        let mut h = Harness::<Nothing>::new(&[]).unwrap();
        assert_eq!(h.decode(b"{}").unwrap_err().as_str(), crate::NO_DECODER);
        let r = Record { symbol_id: 4, price_e8: 9, is_buy: true, ..Record::default() };
        assert_eq!(h.transform(&[r, r]).records, vec![r, r]);
    }
}
