//! A plugin that misbehaves on purpose, so the host's limits can be tested against a real component.
//!
//! It implements the WIT exports directly (not through `plugin_sdk::Plugin`), because some of its
//! failures, such as returning bytes that are not records, are ones the SDK makes impossible.
//!
//! Config:
//! - `mode`: what `decode` and `transform` do:
//!   `pass` (default: transform passes records through, decode yields nothing), `loop` (never return),
//!   `memory` (allocate until memory runs out), `trap` (panic), `oversize` (return `oversize_bytes`
//!   of empty records, default 32 MiB), `garbage` (return bytes that are not records),
//!   `bad-counts` (decode claims more records than it returns), `bad-reject` (reject an index past the
//!   end of the batch), `dup-reject` (reject the first input twice), `long-reason` (reject the first
//!   input with a reason of `reason_bytes` bytes, default 2 MiB, and pass the rest through),
//!   `bad-record` (well-framed output records that are not `StreamData`: field number 0).
//!   `clock` (transform writes what the guest reads of the world into each record: the wall clock in
//!   ms as `timestamp_ms`, the monotonic clock's nanoseconds since the instance started as
//!   `price_e8`, and a hash under the standard library's fresh random keys as `volume_e8`).
//!   `source` (transform passes records through with `source_id` set to the `source_id` key,
//!   default 0: a link claiming another source's records, or none).
//! - `trap_on_trade_id`: transform panics when a batch holds a record with this trade id (a poison
//!   record), and otherwise passes records through.
//! - `source_id`: the source id `mode = "source"` writes into every output record.
//! - `mode = "count"` keeps state (format `chaos.count@1`): the number of records it has passed per
//!   symbol, written into each record as its `volume_e8` (1, 2, 3, ... per symbol). A count lost or
//!   applied twice, at a restart, a trap or a poll read again, changes the sums downstream.
//! - `init_error`: init fails with this text.

#[cfg(target_arch = "wasm32")]
mod guest {
    use std::cell::RefCell;

    use plugin_sdk::__private::{Decoded, Guest, Reject, StateGuest, Transformed};
    use sluice_wire::{Delimited, StreamDataView};

    #[derive(Default)]
    struct Settings {
        mode: String,
        trap_on_trade_id: Option<u64>,
        oversize_bytes: usize,
        reason_bytes: usize,
        source_id: u32,
    }

    thread_local! {
        static SETTINGS: RefCell<Settings> = RefCell::new(Settings::default());
        /// `mode = "count"`: records passed per symbol, and the symbols changed since `changes`.
        static COUNTS: RefCell<(std::collections::BTreeMap<u32, u64>, std::collections::BTreeSet<u32>)> =
            RefCell::new(Default::default());
    }

    /// Each record of `batch` with its symbol's running count as its volume.
    fn counted(batch: &[u8]) -> Vec<u8> {
        let mut out = plugin_sdk::Records::new();
        COUNTS.with(|c| {
            let (counts, changed) = &mut *c.borrow_mut();
            for item in Delimited::new(batch) {
                let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
                let n = counts.entry(view.symbol_id).or_insert(0);
                *n += 1;
                changed.insert(view.symbol_id);
                out.push(&plugin_sdk::Record { volume_e8: *n as i64, ..view.record() });
            }
        });
        out.as_bytes().to_vec()
    }

    struct Chaos;

    /// The rejects of the modes that refuse inputs wrongly or at length: `bad-reject` (an index past
    /// the `n` inputs), `dup-reject` (the first input twice), `long-reason` (the first input, with a
    /// reason of `reason_bytes`).
    fn odd_rejects(mode: &str, n: u32) -> Vec<Reject> {
        match mode {
            "bad-reject" => vec![Reject { index: n, reason: "past the end".into() }],
            "dup-reject" if n > 0 => {
                vec![Reject { index: 0, reason: "once".into() }, Reject { index: 0, reason: "twice".into() }]
            }
            "long-reason" if n > 0 => {
                let len = SETTINGS.with(|s| s.borrow().reason_bytes);
                vec![Reject { index: 0, reason: "r".repeat(len) }]
            }
            _ => vec![],
        }
    }

    fn misbehave(mode: &str, input_len: usize) -> Option<Vec<u8>> {
        match mode {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(3));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("chaos plugin asked to trap"),
            "oversize" => SETTINGS.with(|s| Some(vec![0u8; s.borrow().oversize_bytes])),
            // A length prefix that promises more bytes than follow.
            "garbage" => Some(vec![0x05, 0xff, 0xff]),
            _ => {
                let _ = input_len;
                None
            }
        }
    }

    /// Each record of `batch` with what the guest reads of the clock and of randomness in it.
    fn world_readings(batch: &[u8]) -> Vec<u8> {
        use std::hash::{BuildHasher, Hasher};
        thread_local! {
            static STARTED: std::time::Instant = std::time::Instant::now();
        }
        let mut out = plugin_sdk::Records::new();
        for item in Delimited::new(batch) {
            let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
            let wall_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(-1, |d| d.as_millis() as i64);
            let monotonic = STARTED.with(|s| s.elapsed().as_nanos() as i64);
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(42);
            let hashed = (hasher.finish() >> 1) as i64;
            out.push(&plugin_sdk::Record {
                timestamp_ms: wall_ms,
                price_e8: monotonic,
                volume_e8: hashed,
                ..view.record()
            });
        }
        out.as_bytes().to_vec()
    }

    /// Each record of `batch` with `source_id` written into it.
    fn claimed(batch: &[u8], source_id: u32) -> Vec<u8> {
        let mut out = plugin_sdk::Records::new();
        for item in Delimited::new(batch) {
            let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
            out.push(&plugin_sdk::Record { source_id, ..view.record() });
        }
        out.as_bytes().to_vec()
    }

    impl Guest for Chaos {
        fn init(config: Vec<(String, String)>) -> Result<(), String> {
            plugin_sdk::__private::install_panic_hook();
            let mut s = Settings {
                mode: "pass".into(),
                oversize_bytes: 32 << 20,
                reason_bytes: 2 << 20,
                ..Settings::default()
            };
            for (k, v) in config {
                match k.as_str() {
                    "mode" => s.mode = v,
                    "trap_on_trade_id" => {
                        s.trap_on_trade_id = Some(v.parse().map_err(|e| format!("trap_on_trade_id: {e}"))?)
                    }
                    "oversize_bytes" => s.oversize_bytes = v.parse().map_err(|e| format!("oversize_bytes: {e}"))?,
                    "reason_bytes" => s.reason_bytes = v.parse().map_err(|e| format!("reason_bytes: {e}"))?,
                    "source_id" => s.source_id = v.parse().map_err(|e| format!("source_id: {e}"))?,
                    "init_error" => return Err(v),
                    other => return Err(format!("unknown config key {other:?}")),
                }
            }
            SETTINGS.with(|cell| *cell.borrow_mut() = s);
            Ok(())
        }

        fn decode(frames: Vec<u8>) -> Decoded {
            let mode = SETTINGS.with(|s| s.borrow().mode.clone());
            let n = Delimited::new(&frames).count() as u32;
            if let Some(records) = misbehave(&mode, frames.len()) {
                return Decoded { records, counts: vec![0; n as usize], rejects: vec![] };
            }
            match mode.as_str() {
                "bad-counts" => Decoded { records: vec![], counts: vec![1; n as usize], rejects: vec![] },
                _ => Decoded { records: vec![], counts: vec![0; n as usize], rejects: odd_rejects(&mode, n) },
            }
        }

        fn transform(batch: Vec<u8>) -> Transformed {
            let (mode, poison) = SETTINGS.with(|s| (s.borrow().mode.clone(), s.borrow().trap_on_trade_id));
            if let Some(records) = misbehave(&mode, batch.len()) {
                return Transformed { records, rejects: vec![] };
            }
            if let Some(poison) = poison {
                for item in Delimited::new(&batch) {
                    if item.and_then(StreamDataView::parse).is_ok_and(|v| v.trade_id == poison) {
                        panic!("poison record: trade id {poison}");
                    }
                }
            }
            let n = Delimited::new(&batch).count() as u32;
            if mode == "clock" {
                return Transformed { records: world_readings(&batch), rejects: vec![] };
            }
            if mode == "count" {
                return Transformed { records: counted(&batch), rejects: vec![] };
            }
            if mode == "source" {
                return Transformed {
                    records: claimed(&batch, SETTINGS.with(|s| s.borrow().source_id)),
                    rejects: vec![],
                };
            }
            if mode == "bad-record" {
                return Transformed { records: [2u8, 0, 0].repeat(n as usize), rejects: vec![] };
            }
            let rejects = odd_rejects(&mode, n);
            if mode == "long-reason" && n > 0 {
                // The first record is refused; the rest pass.
                let mut rest = Delimited::new(&batch);
                rest.next();
                let mut records = Vec::new();
                for item in rest.flatten() {
                    sluice_wire::push_delimited(&mut records, item);
                }
                return Transformed { records, rejects };
            }
            Transformed { records: batch, rejects }
        }
    }

    /// Keeps state only in `mode = "count"`; otherwise the host never calls `restore` or `changes`.
    impl StateGuest for Chaos {
        fn format() -> String {
            let counting = SETTINGS.with(|s| s.borrow().mode == "count");
            if counting { "chaos.count@1".into() } else { String::new() }
        }
        fn restore(entries: Vec<(Vec<u8>, Vec<u8>)>) {
            COUNTS.with(|c| {
                let (counts, changed) = &mut *c.borrow_mut();
                counts.clear();
                changed.clear();
                for (k, v) in entries {
                    if let (Ok(k), Ok(v)) = (<[u8; 4]>::try_from(k.as_slice()), <[u8; 8]>::try_from(v.as_slice())) {
                        counts.insert(u32::from_le_bytes(k), u64::from_le_bytes(v));
                    }
                }
            });
        }
        fn changes() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
            COUNTS.with(|c| {
                let (counts, changed) = &mut *c.borrow_mut();
                std::mem::take(changed)
                    .into_iter()
                    .map(|k| (k.to_le_bytes().to_vec(), counts.get(&k).map(|v| v.to_le_bytes().to_vec())))
                    .collect()
            })
        }
    }

    plugin_sdk::bindings::__export_sluice_plugin!(Chaos with_types_in plugin_sdk::bindings);
}
