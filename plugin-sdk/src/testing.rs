//! Run a plugin natively in `cargo test`, through the same batch loop the wasm build uses.
//!
//! The harness stands in for the host: it keeps a symbol dictionary (ids from 1 in order of first use,
//! per test thread) and frames the inputs as the host does. For a plugin that keeps [`State`](crate::State)
//! it also keeps the committed state, and does what the host does with it: [`commit`](Harness::commit)
//! after a batch, [`rollback`](Harness::rollback) after a failed one, [`restart`](Harness::restart),
//! and [`swap`](Harness::swap) to a new version.
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

use std::collections::BTreeMap;

use crate::{Plugin, Reason, Record, Runner};
use sluice_wire::{Records, push_delimited};

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
    /// The configuration, for a restart.
    config: Vec<(String, String)>,
    /// The state as the host committed it: what a restart or a rollback restores.
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl<P: Plugin> Harness<P> {
    /// Initialises the plugin with `config`, starting a fresh symbol dictionary for this thread.
    ///
    /// # Errors
    /// The plugin's [`Reason`] when `init` fails.
    pub fn new(config: &[(&str, &str)]) -> Result<Self, Reason> {
        crate::symbols::native::reset();
        let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut runner = Runner::new();
        runner.init(config.clone())?;
        Ok(Harness { runner, scratch: Vec::new(), config, committed: BTreeMap::new() })
    }

    /// Commits the state changed since the last commit, as the host does with a batch's output.
    /// Without it, a [`restart`](Self::restart) or [`rollback`](Self::rollback) forgets them.
    pub fn commit(&mut self) {
        for (key, value) in self.runner.take_changes() {
            match value {
                Some(value) => self.committed.insert(key, value),
                None => self.committed.remove(&key),
            };
        }
    }

    /// Replaces the instance with a fresh one (same configuration, same symbol dictionary) restored
    /// from the committed state, as after a host restart or a trap.
    ///
    /// # Errors
    /// The plugin's [`Reason`] when `init` fails, or when committed entries do not decode.
    pub fn restart(&mut self) -> Result<(), Reason> {
        let mut runner = Runner::new();
        runner.init(self.config.clone())?;
        self.runner = runner;
        self.runner.restore(self.committed())
    }

    /// Discards the state changed since the last commit and restores the committed state on the
    /// same instance, as the host does when a batch fails before it is committed, so its records run
    /// again against the state they met the first time.
    ///
    /// ```
    /// # use plugin_sdk::{testing::Harness, Config, Plugin, Reason, Record, Records, State, StateStore, StreamDataView};
    /// /// Numbers each symbol's trades from 1, in `trade_id`.
    /// struct Count { seen: State<u32, u64> }
    /// impl Plugin for Count {
    ///     const STATE_FORMAT: &'static str = "count@1";
    ///     fn init(_: &Config) -> Result<Self, Reason> { Ok(Count { seen: State::new() }) }
    ///     fn state(&mut self) -> Option<&mut dyn StateStore> { Some(&mut self.seen) }
    ///     fn transform(&mut self, r: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
    ///         let n = self.seen.get_or_insert_with(r.symbol_id, || 0);
    ///         *n += 1;
    ///         out.push(&Record { trade_id: *n, ..r.record() });
    ///         Ok(())
    ///     }
    /// }
    /// let mut h = Harness::<Count>::new(&[])?;
    /// let batch = [Record::default(), Record::default()];
    /// let clean = h.transform(&batch);
    /// h.rollback()?; // the batch failed before its commit: it runs again
    /// assert_eq!(h.transform(&batch), clean);
    /// # Ok::<(), Reason>(())
    /// ```
    ///
    /// # Errors
    /// A [`Reason`] when committed entries do not decode.
    pub fn rollback(&mut self) -> Result<(), Reason> {
        self.runner.restore(self.committed())
    }

    /// Swaps to version `Q` of the plugin with `config`, as an activation does: `Q` goes on from the
    /// committed state when it declares the same [`STATE_FORMAT`](Plugin::STATE_FORMAT), and starts
    /// empty otherwise.
    ///
    /// # Errors
    /// `Q`'s [`Reason`] when `init` fails, or when committed entries do not decode.
    pub fn swap<Q: Plugin>(self, config: &[(&str, &str)]) -> Result<Harness<Q>, Reason> {
        let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut runner = Runner::new();
        runner.init(config.clone())?;
        let committed = if Q::STATE_FORMAT == P::STATE_FORMAT { self.committed } else { BTreeMap::new() };
        let mut next = Harness { runner, scratch: self.scratch, config, committed };
        next.runner.restore(next.committed())?;
        Ok(next)
    }

    /// The committed state entries, key and value bytes in key order.
    pub fn committed(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.committed.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
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
    use crate::state::StateCodec;
    use crate::{Config, State, StateStore, StreamDataView};

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

    /// Numbers each symbol's trades from 1 in `trade_id`; rejects a negative price without counting it.
    struct Count {
        seen: State<u32, u64>,
    }
    impl Plugin for Count {
        const STATE_FORMAT: &'static str = "count@1";
        fn init(_: &Config) -> Result<Self, Reason> {
            Ok(Count { seen: State::new() })
        }
        fn state(&mut self) -> Option<&mut dyn StateStore> {
            Some(&mut self.seen)
        }
        fn transform(&mut self, r: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
            if r.price_e8 < 0 {
                return Err("negative price".into());
            }
            let n = self.seen.get_or_insert_with(r.symbol_id, || 0);
            *n += 1;
            out.push(&Record { trade_id: *n, ..r.record() });
            Ok(())
        }
    }

    fn on(symbol_id: u32) -> Record {
        Record { symbol_id, ..Record::default() }
    }

    fn ids(out: &Transformed) -> Vec<u64> {
        out.records.iter().map(|r| r.trade_id).collect()
    }

    #[test]
    fn a_restart_goes_on_from_the_committed_state_only() {
        let mut h = Harness::<Count>::new(&[]).unwrap();
        assert_eq!(ids(&h.transform(&[on(1), on(2), on(1)])), vec![1, 1, 2]);
        h.commit();
        assert_eq!(h.committed(), vec![(1u32.to_bytes(), 2u64.to_bytes()), (2u32.to_bytes(), 1u64.to_bytes())]);
        // Counted but never committed: a restart forgets it.
        assert_eq!(ids(&h.transform(&[on(1)])), vec![3]);
        h.restart().unwrap();
        assert_eq!(ids(&h.transform(&[on(1), on(2), on(3)])), vec![3, 2, 1]);
        // A restart with nothing committed since is the same instance state as before it.
        h.commit();
        h.restart().unwrap();
        assert_eq!(ids(&h.transform(&[on(3)])), vec![2]);
    }

    #[test]
    fn a_failed_batch_rolled_back_runs_again_as_it_did_the_first_time() {
        let mut clean = Harness::<Count>::new(&[]).unwrap();
        let mut faulty = Harness::<Count>::new(&[]).unwrap();
        let first = [on(1), on(2)];
        let second = [on(1), Record { price_e8: -1, ..on(1) }, on(2), on(1)];
        for h in [&mut clean, &mut faulty] {
            h.transform(&first);
            h.commit();
        }
        let expected = clean.transform(&second);
        clean.commit();
        // The faulty run's batch fails after the plugin ran it (a trap elsewhere, a failed commit).
        faulty.transform(&second);
        faulty.rollback().unwrap();
        assert_eq!(faulty.transform(&second), expected);
        assert_eq!(ids(&expected), vec![2, 2, 3]);
        assert_eq!(expected.rejects, vec![Rejected { index: 1, reason: "negative price".into() }]);
        faulty.commit();
        assert_eq!(faulty.committed(), clean.committed());
    }

    #[test]
    fn a_swap_keeps_the_state_only_for_the_same_format() {
        struct CountV2(Count);
        impl Plugin for CountV2 {
            const STATE_FORMAT: &'static str = "count@1";
            fn init(c: &Config) -> Result<Self, Reason> {
                Count::init(c).map(CountV2)
            }
            fn state(&mut self) -> Option<&mut dyn StateStore> {
                self.0.state()
            }
            fn transform(&mut self, r: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
                self.0.transform(r, out)
            }
        }
        struct CountV3(Count);
        impl Plugin for CountV3 {
            const STATE_FORMAT: &'static str = "count@2";
            fn init(c: &Config) -> Result<Self, Reason> {
                Count::init(c).map(CountV3)
            }
            fn state(&mut self) -> Option<&mut dyn StateStore> {
                self.0.state()
            }
            fn transform(&mut self, r: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
                self.0.transform(r, out)
            }
        }
        let mut h = Harness::<Count>::new(&[]).unwrap();
        h.transform(&[on(1), on(1)]);
        h.commit();
        let mut v2 = h.swap::<CountV2>(&[]).unwrap();
        assert_eq!(ids(&v2.transform(&[on(1)])), vec![3]);
        v2.commit();
        let mut v3 = v2.swap::<CountV3>(&[]).unwrap();
        assert_eq!(ids(&v3.transform(&[on(1)])), vec![1]);
    }

    #[test]
    fn state_that_does_not_decode_is_skipped_and_reported() {
        /// Same format as `Count`, another encoding: the mistake a format version prevents.
        struct Renamed {
            seen: State<String, u64>,
        }
        impl Plugin for Renamed {
            const STATE_FORMAT: &'static str = "count@1";
            fn init(_: &Config) -> Result<Self, Reason> {
                Ok(Renamed { seen: State::new() })
            }
            fn state(&mut self) -> Option<&mut dyn StateStore> {
                Some(&mut self.seen)
            }
        }
        let mut h = Harness::<Count>::new(&[]).unwrap();
        h.transform(&[on(1), on(2)]);
        h.commit();
        let err = h.swap::<Renamed>(&[]).err().unwrap();
        assert_eq!(err.as_str(), "2 of 2 state entries did not decode and were skipped (first: 3 bytes left over)");
    }

    #[test]
    fn the_state_declaration_is_checked_at_init() {
        struct Declared<const FORMAT: u8>(State<u32, u32>);
        impl<const FORMAT: u8> Plugin for Declared<FORMAT> {
            const STATE_FORMAT: &'static str = match FORMAT {
                0 => "",
                1 => "no-version",
                _ => "declared@1",
            };
            fn init(_: &Config) -> Result<Self, Reason> {
                Ok(Declared(State::new()))
            }
            fn state(&mut self) -> Option<&mut dyn StateStore> {
                Some(&mut self.0)
            }
        }
        struct Undeclared;
        impl Plugin for Undeclared {
            const STATE_FORMAT: &'static str = "undeclared@1";
            fn init(_: &Config) -> Result<Self, Reason> {
                Ok(Undeclared)
            }
        }
        let err = |r: Result<(), Reason>| r.unwrap_err().to_string();
        assert_eq!(
            err(Harness::<Declared<0>>::new(&[]).map(drop)),
            "state() returns a state but STATE_FORMAT is empty"
        );
        assert_eq!(err(Harness::<Declared<1>>::new(&[]).map(drop)), "STATE_FORMAT \"no-version\" is not name@version");
        assert!(Harness::<Declared<2>>::new(&[]).is_ok());
        assert_eq!(
            err(Harness::<Undeclared>::new(&[]).map(drop)),
            "STATE_FORMAT is \"undeclared@1\" but state() returns None"
        );
    }

    #[test]
    fn a_stateless_plugin_commits_nothing_and_restarts_fresh() {
        let mut h = Harness::<Toy>::new(&[]).unwrap();
        h.transform(&[Record { price_e8: 1, ..Record::default() }]);
        h.commit();
        assert!(h.committed().is_empty());
        h.restart().unwrap();
        h.rollback().unwrap();
        assert_eq!(h.transform(&[Record { price_e8: 1, ..Record::default() }]).records[0].price_e8, 2);
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
