//! The plugin runtime against real components built from `plugins/`: the venue decoders, and the
//! `chaos` plugin that loops, hoards memory, traps and returns bad output on request. Every failure
//! must come back as its typed error within the deadline, and the host must carry on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plugin_sdk::{Record, Records};
use sluice::plugin::{Limits, PluginCode, PluginError, PluginInstance, Runtime, RuntimeSettings};
use sluice::symbols::Symbols;
use sluice_wire::{Delimited, StreamDataView, push_delimited};

fn plugin_wasm(name: &str) -> Vec<u8> {
    let path = format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn runtime() -> Runtime {
    let settings = RuntimeSettings { max_instances: 16, max_memory_bytes: 256 << 20, ..RuntimeSettings::default() };
    Runtime::new(settings, Arc::new(Symbols::new())).expect("engine starts")
}

/// Limits for tests about everything but time: a deadline generous enough for a loaded machine.
fn limits() -> Limits {
    Limits { memory_bytes: 32 << 20, deadline: Duration::from_secs(5), output_bytes: 1 << 20, ..Limits::default() }
}

fn chaos(rt: &Runtime, limits: Limits) -> Arc<PluginCode> {
    rt.compile("chaos", &plugin_wasm("chaos"), limits).expect("chaos compiles")
}

fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn batch(records: &[Record]) -> Vec<u8> {
    let mut out = Records::new();
    for r in records {
        out.push(r);
    }
    out.take()
}

fn trades(n: u64) -> Vec<Record> {
    (1..=n)
        .map(|i| Record { symbol_id: 1, price_e8: 100 + i as i64, volume_e8: 5, trade_id: i, ..Record::default() })
        .collect()
}

fn read(records: &[u8]) -> Vec<Record> {
    Delimited::new(records).map(|r| StreamDataView::parse(r.unwrap()).unwrap().record()).collect()
}

#[test]
fn decodes_binance_frames_with_the_host_dictionary() {
    let rt = runtime();
    let code = rt.compile("binance", &plugin_wasm("binance"), limits()).unwrap();
    let mut instance = PluginInstance::new(&code, &[]).unwrap();
    let mut frames = Vec::new();
    for line in include_str!("../../fixtures/feeds/binance_combined_aggtrade.jsonl").lines() {
        push_delimited(&mut frames, line.as_bytes());
    }
    push_delimited(&mut frames, br#"{"result":null,"id":1}"#);
    push_delimited(&mut frames, b"not json");
    let out = instance.decode(&frames).unwrap();
    assert_eq!(out.counts, vec![1, 1, 0, 0]);
    assert_eq!(out.rejects.len(), 1);
    assert_eq!(out.rejects[0].index, 3);
    let records = read(&out.records);
    assert_eq!(rt.symbols().name(records[0].symbol_id).as_deref(), Some("NKNUSDT"));
    assert_eq!(rt.symbols().name(records[1].symbol_id).as_deref(), Some("LRCBTC"));
    assert_eq!((records[1].price_e8, records[1].volume_e8, records[1].trade_id), (638, 17_700_000_000, 9_213_679));
}

#[test]
fn transform_runs_on_batches_and_keeps_state_between_calls() {
    let rt = runtime();
    let code = rt.compile("outlier-filter", &plugin_wasm("outlier_filter"), limits()).unwrap();
    let mut instance = PluginInstance::new(&code, &config(&[("threshold_pct", "5")])).unwrap();
    let first = instance.transform(&batch(&[Record { symbol_id: 1, price_e8: 100_000, ..Record::default() }])).unwrap();
    assert_eq!(first.count, 1);
    // The reference price from the first call must still be there in the second.
    let second = instance
        .transform(&batch(&[
            Record { symbol_id: 1, price_e8: 120_000, trade_id: 1, ..Record::default() },
            Record { symbol_id: 1, price_e8: 104_000, trade_id: 2, ..Record::default() },
        ]))
        .unwrap();
    assert_eq!(second.count, 1);
    assert_eq!(read(&second.records)[0].trade_id, 2);
    assert_eq!(second.rejects.len(), 1);
    assert_eq!(second.rejects[0].index, 0);
}

#[test]
fn an_infinite_loop_times_out_within_the_deadline_and_the_host_carries_on() {
    let rt = runtime();
    let code = chaos(&rt, Limits { deadline: Duration::from_millis(100), ..limits() });
    let mut looping = PluginInstance::new(&code, &config(&[("mode", "loop")])).unwrap();
    for _ in 0..2 {
        let start = Instant::now();
        let err = looping.transform(&batch(&trades(3))).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, PluginError::Timeout { deadline } if deadline == Duration::from_millis(100)), "{err}");
        // The deadline plus scheduling slack on a busy machine, far below "never".
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
    // Another instance of the same engine is unaffected.
    let mut fine = PluginInstance::new(&code, &[]).unwrap();
    assert_eq!(fine.transform(&batch(&trades(4))).unwrap().count, 4);
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    let rt = runtime();
    let mut bomb = PluginInstance::new(&chaos(&rt, limits()), &config(&[("mode", "memory")])).unwrap();
    let start = Instant::now();
    let err = bomb.transform(&batch(&trades(1))).unwrap_err();
    assert!(matches!(err, PluginError::MemoryLimit { limit } if limit == 32 << 20), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_trap_is_typed_and_carries_the_panic_message() {
    let rt = runtime();
    let mut trap = PluginInstance::new(&chaos(&rt, limits()), &config(&[("mode", "trap")])).unwrap();
    let err = trap.decode(&[3, b'a', b'b', b'c']).unwrap_err();
    match err {
        PluginError::Trap(msg) => assert!(msg.contains("chaos plugin asked to trap"), "{msg}"),
        other => panic!("expected a trap, got {other}"),
    }
}

#[test]
fn a_poison_record_traps_and_the_replacement_instance_serves_the_next_batch() {
    let rt = runtime();
    let mut plugin = PluginInstance::new(&chaos(&rt, limits()), &config(&[("trap_on_trade_id", "2")])).unwrap();
    let err = plugin.transform(&batch(&trades(3))).unwrap_err();
    assert!(matches!(&err, PluginError::Trap(m) if m.contains("poison record: trade id 2")), "{err}");
    let clean = [trades(3)[0], trades(3)[2]];
    let out = plugin.transform(&batch(&clean)).unwrap();
    assert_eq!(read(&out.records), clean);
}

#[test]
fn oversized_output_is_refused() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    let mut big = PluginInstance::new(&code, &config(&[("mode", "oversize"), ("oversize_bytes", "2000000")])).unwrap();
    let err = big.transform(&batch(&trades(1))).unwrap_err();
    assert!(matches!(err, PluginError::OutputTooLarge { len: 2_000_000, limit } if limit == 1 << 20), "{err}");
}

#[test]
fn invalid_output_bytes_and_inconsistent_counts_are_refused() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    for (mode, call_decode, expect) in [
        ("garbage", false, "output record 0: record is truncated"),
        ("garbage", true, "output record 0: record is truncated"),
        ("bad-counts", true, "counts add up to 2, but 0 records were returned"),
        ("bad-reject", true, "reject index 2 out of 2 inputs"),
        ("bad-reject", false, "reject index 2 out of 2 inputs"),
        // One input refused twice would be dead-lettered twice.
        ("dup-reject", true, "reject index 0 given twice"),
        ("dup-reject", false, "reject index 0 given twice"),
    ] {
        let mut p = PluginInstance::new(&code, &config(&[("mode", mode)])).unwrap();
        let err = if call_decode {
            p.decode(&[1, b'a', 1, b'b']).unwrap_err()
        } else {
            p.transform(&batch(&trades(2))).unwrap_err()
        };
        match err {
            PluginError::InvalidOutput(msg) => assert_eq!(msg, expect, "{mode}"),
            other => panic!("{mode}: expected invalid output, got {other}"),
        }
    }
}

/// A reason of 2 MiB (over what a Kafka message or transaction takes) is cut where it leaves the
/// plugin, to at most 4 KiB that say how long it was; the reject itself stands.
#[test]
fn a_reason_too_long_is_cut_where_it_leaves_the_plugin() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    let mut p = PluginInstance::new(&code, &config(&[("mode", "long-reason")])).unwrap();
    let decoded = p.decode(&[1, b'a', 1, b'b']).unwrap();
    let transformed = p.transform(&batch(&trades(3))).unwrap();
    assert_eq!(read(&transformed.records), trades(3)[1..]);
    for rejects in [decoded.rejects, transformed.rejects] {
        assert_eq!(rejects.len(), 1);
        let reject = &rejects[0];
        assert_eq!(reject.index, 0);
        assert!(reject.reason.len() <= sluice::handoff::stage::REASON_MAX_BYTES, "{} bytes", reject.reason.len());
        assert!(reject.reason.starts_with("rrrr"), "{}", &reject.reason[..16]);
        assert!(reject.reason.ends_with(&format!("[reason cut: {} bytes]", 2 << 20)), "{}", &reject.reason[4000..]);
    }
}

/// Output records that are framed correctly but are not `StreamData` are caught where they are parsed:
/// the transformer fails the call as invalid output, retries it, bisects it, and refuses every record
/// with the reason; nothing of the bad output is passed on.
#[test]
fn well_framed_invalid_records_fail_the_call_where_they_are_parsed() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    let mut t =
        sluice::transform::Transformer::new(PluginInstance::new(&code, &config(&[("mode", "bad-record")])).unwrap());
    let out = t.transform(&batch(&trades(4))).unwrap();
    assert!(out.parsed.is_empty() && out.records.is_empty() && out.count == 0, "{out:?}");
    assert_eq!(out.rejects.len(), 4);
    for (i, r) in out.rejects.iter().enumerate() {
        assert_eq!(r.index, i);
        assert!(r.reason.starts_with("plugin returned invalid output: output record 0:"), "{}", r.reason);
    }
    // One call for the batch, its retry, then the halves and quarters.
    assert_eq!(out.failed_calls, 1 + 1 + 2 + 4);
    assert_eq!(code.transform_metrics().limit_errors.get(), out.failed_calls);
    // A plugin whose output parses passes it through, parsed.
    let mut t = sluice::transform::Transformer::new(PluginInstance::new(&code, &config(&[])).unwrap());
    let out = t.transform(&batch(&trades(3))).unwrap();
    assert_eq!((out.count, out.parsed.len(), out.rejects.len(), out.failed_calls), (3, 3, 0, 0));
    assert_eq!(out.parsed, trades(3));
}

#[test]
fn init_errors_are_reported_with_the_plugin_reason() {
    let rt = runtime();
    let err = PluginInstance::new(&chaos(&rt, limits()), &config(&[("init_error", "no such market")])).unwrap_err();
    assert!(matches!(&err, PluginError::Init(m) if m == "no such market"), "{err}");
    let code = rt.compile("outlier-filter", &plugin_wasm("outlier_filter"), limits()).unwrap();
    let err = PluginInstance::new(&code, &config(&[("threshold", "5")])).unwrap_err();
    assert!(matches!(&err, PluginError::Init(m) if m.contains("threshold")), "{err}");
}

#[test]
fn what_is_not_a_sluice_plugin_is_refused_with_the_reason() {
    let rt = runtime();
    let check = |bytes: &[u8]| rt.compile("x", bytes, limits()).expect_err("refused");
    assert!(matches!(check(b"hello world, not wasm"), PluginError::NotWasm));
    assert!(matches!(check(b"\0asm\x01\0\0\0"), PluginError::CoreModule));
    // The empty component is valid wasm but exports nothing.
    let err = check(b"\0asm\x0d\0\x01\0");
    assert!(matches!(&err, PluginError::WrongWorld(m) if m.contains("sluice:plugin/guest@0.2.0")), "{err}");
    // A truncated component does not compile.
    let mut cut = plugin_wasm("rescale");
    cut.truncate(cut.len() / 2);
    assert!(matches!(check(&cut), PluginError::Compile(_)));
}

#[test]
fn limits_beyond_the_runtime_are_refused() {
    let rt = runtime();
    let too_big = Limits { memory_bytes: 1 << 40, ..limits() };
    let err = rt.compile("rescale", &plugin_wasm("rescale"), too_big).unwrap_err();
    assert!(matches!(err, PluginError::Limits(_)), "{err}");
}

#[test]
fn wasm_and_native_runs_agree_and_repeat_exactly() {
    // Same input, same output, whatever the time: the transform is a pure function of its input,
    // and rescale's output matches a native run of the same plugin exactly.
    let rt = runtime();
    let code = rt.compile("rescale", &plugin_wasm("rescale"), limits()).unwrap();
    let cfg = [("scale", "2"), ("min_volume", "0.00000005")];
    let mut wasm = PluginInstance::new(&code, &config(&cfg)).unwrap();
    let input = trades(50);
    let a = wasm.transform(&batch(&input)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let b = wasm.transform(&batch(&input)).unwrap();
    assert_eq!(a, b);
    let mut native = plugin_sdk::testing::Harness::<rescale::Rescale>::new(&cfg).unwrap();
    assert_eq!(read(&a.records), native.transform(&input).records);
}

/// Plugins run deterministically: through wasm a plugin that reads the wall clock, the monotonic
/// clock and the standard library's random hash keys gets time zero and zero entropy, so replaying
/// the same batch through the same version gives the same output. (`chaos` in `clock` mode writes
/// what it read into each record: the wall clock in ms as the timestamp, the monotonic clock as the
/// price and a hash under fresh random keys as the volume.) With the host's real clock and entropy
/// this would fail.
#[test]
fn a_plugin_reading_the_clock_and_randomness_gets_zero_time_and_zero_entropy() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    let input = batch(&[Record {
        source_id: 1,
        symbol_id: 1,
        trade_id: 9,
        timestamp_ms: 1_700_000_000_000,
        ..Record::default()
    }]);
    let read = |instance: &mut sluice::plugin::PluginInstance| {
        let out = instance.transform(&input).unwrap();
        let item = Delimited::new(&out.records).next().unwrap().unwrap();
        let v = StreamDataView::parse(item).unwrap();
        (v.timestamp_ms, v.price_e8, v.volume_e8)
    };
    let mut first = PluginInstance::new(&code, &config(&[("mode", "clock")])).unwrap();
    let (wall_ms, monotonic, hashed) = read(&mut first);
    assert_eq!(wall_ms, 0, "the wall clock is frozen at the epoch");
    assert_eq!(monotonic, 0, "the monotonic clock is frozen");
    // A fresh instance reads the same hash, and so on call after call (the standard library moves
    // its keys on by one per map, from the same zero seed): the random keys carried no entropy.
    let again = read(&mut first);
    let mut second = PluginInstance::new(&code, &config(&[("mode", "clock")])).unwrap();
    assert_eq!(read(&mut second), (0, 0, hashed));
    assert_eq!(read(&mut second), again);
}

/// Every crate in `plugins/` is built to a component (no list to keep): a folder added there reaches
/// the plugin directory, and loads.
#[test]
fn every_crate_in_plugins_is_built_and_loads() {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let rt = runtime();
    let mut seen = 0;
    for entry in std::fs::read_dir(&plugins).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("Cargo.toml").exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().replace('-', "_");
        let wasm = plugin_wasm(&name);
        assert!(wasm.starts_with(b"\0asm"), "{name}.wasm is not WebAssembly");
        // `other-world` is a component of another world on purpose: refused, but as a component.
        match rt.compile(&name, &wasm, limits()) {
            Ok(_) => {}
            Err(e) => assert_eq!(name, "other_world", "{name}: {e}"),
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} plugin crates found in {}", plugins.display());
}

/// A component built against world 0.1 (before plugin state) still loads and runs, as stateless.
#[test]
fn a_plugin_of_world_0_1_still_loads_and_keeps_no_state() {
    let rt = runtime();
    let old = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/plugins/rescale-0.1.wasm")).unwrap();
    let code = rt.compile("rescale", &old, limits()).unwrap();
    assert_eq!(code.world(), sluice::plugin::WORLD_V1);
    let mut instance = PluginInstance::new(&code, &[]).unwrap();
    assert_eq!(instance.state_format(), None);
    let now = rt.compile("rescale", &plugin_wasm("rescale"), limits()).unwrap();
    assert_eq!(now.world(), sluice::plugin::WORLD);
    let mut current = PluginInstance::new(&now, &[]).unwrap();
    // Both versions decide alike on the same batch.
    let input = batch(&trades(20));
    let (a, b) = (instance.transform(&input).unwrap(), current.transform(&input).unwrap());
    assert!(a.count > 0);
    assert_eq!(a.records, b.records);
}

/// Transform state across the contract: a stateful link's changes reach the host once per call,
/// a fresh instance restored from them goes on where the last one stopped, and a failed call
/// (a trap on a poison record) leaves no change behind.
#[test]
fn a_stateful_links_changes_restore_a_fresh_instance_and_a_failed_call_leaves_none() {
    let rt = runtime();
    let code = chaos(&rt, limits());
    let mut first = PluginInstance::new(&code, &config(&[("mode", "count"), ("trap_on_trade_id", "99")])).unwrap();
    assert_eq!(first.state_format(), Some("chaos.count@1"));
    let volumes = |out: &[u8]| read(out).iter().map(|r| r.volume_e8).collect::<Vec<_>>();
    assert_eq!(volumes(&first.transform(&batch(&trades(3))).unwrap().records), [1, 2, 3]);
    let changes = first.take_state_changes().unwrap();
    assert_eq!(changes, [(1u32.to_le_bytes().to_vec(), Some(3u64.to_le_bytes().to_vec()))]);
    assert!(first.take_state_changes().unwrap().is_empty(), "changes are handed over once");
    // A failed call: its instance is gone, and the next one needs the state first.
    let mut poisoned = trades(2);
    poisoned[1].trade_id = 99;
    assert!(first.transform(&batch(&poisoned)).is_err());
    assert!(first.needs_state());
    first.restore_state(&[(1u32.to_le_bytes().to_vec(), 3u64.to_le_bytes().to_vec())]).unwrap();
    assert_eq!(volumes(&first.transform(&batch(&trades(2))).unwrap().records), [4, 5]);
    // A stateless plugin is never asked.
    let plain = PluginInstance::new(&code, &[]).unwrap();
    assert!(plain.state_format().is_none() && !plain.needs_state());
}
