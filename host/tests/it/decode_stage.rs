//! The decode stage with the real Binance plugin: records are stamped with the source and receive
//! time, a rotation's overlapping frames are dropped as duplicates, skipped trade ids are counted as
//! gaps, and refused frames are kept whole with the plugin's reason.

use std::sync::Arc;

use bytes::Bytes;
use sluice::decode::Decoder;
use sluice::plugin::{Limits, PluginInstance, Runtime, RuntimeSettings};
use sluice::source::Frame;
use sluice::symbols::Symbols;
use sluice_wire::{Delimited, StreamDataView};

fn aggtrade(symbol: &str, id: u64) -> String {
    format!(
        r#"{{"stream":"{}@aggTrade","data":{{"e":"aggTrade","E":1,"s":"{symbol}","a":{id},"p":"1.5","q":"2","f":1,"l":1,"T":1700000000000,"m":false,"M":true}}}}"#,
        symbol.to_lowercase()
    )
}

fn frame(source: u32, at: i64, text: &str) -> Frame {
    Frame {
        source,
        received_at_us: at,
        bytes: Bytes::from(text.to_owned()),
        oversized: None,
        overlap: false,
        file_offset: 0,
    }
}

#[test]
fn stamps_dedupes_counts_gaps_and_keeps_rejects() {
    let rt = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, Arc::new(Symbols::new()))
        .unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits::default()).unwrap();
    let mut decoder = Decoder::new(PluginInstance::new(&code, &[]).unwrap());

    let first = [frame(7, 100, &aggtrade("BTCUSDT", 1)), frame(7, 101, &aggtrade("BTCUSDT", 2))];
    let out = decoder.decode(&first).unwrap();
    let records: Vec<_> =
        Delimited::new(out.records.as_bytes()).map(|r| StreamDataView::parse(r.unwrap()).unwrap().record()).collect();
    assert_eq!(
        records.iter().map(|r| (r.source_id, r.received_at_us, r.trade_id)).collect::<Vec<_>>(),
        vec![(7, 100, 1), (7, 101, 2)]
    );

    // A rotation overlap repeats id 2; id 3 and 4 never arrive; a bad frame is refused.
    let second = [
        frame(7, 102, &aggtrade("BTCUSDT", 2)),
        frame(7, 103, &aggtrade("BTCUSDT", 5)),
        frame(7, 104, r#"{"stream":"x","data":{"e":"aggTrade","s":"BTCUSDT","p":"bad"}}"#),
        frame(7, 105, &aggtrade("ETHUSDT", 2)),
    ];
    let out = decoder.decode(&second).unwrap();
    let ids: Vec<_> =
        Delimited::new(out.records.as_bytes()).map(|r| StreamDataView::parse(r.unwrap()).unwrap().trade_id).collect();
    assert_eq!(ids, vec![5, 2]);
    let c = out.total();
    assert_eq!((c.records, c.rejects, c.duplicates, c.gaps), (2, 1, 1, 2));
    assert_eq!(out.per_source.len(), 1);
    assert_eq!(out.rejects.len(), 1);
    assert_eq!(out.rejects[0].source, 7);
    assert!(out.rejects[0].bytes.starts_with(br#"{"stream":"x""#));
    assert!(out.rejects[0].reason.starts_with("p:"), "{}", out.rejects[0].reason);
    let btc = rt.symbols().intern("BTCUSDT");
    assert_eq!(decoder.trade_ids().gaps(7, btc), 2);
}

/// A symbol the dictionary cannot name is never decoded under id 0 (where it would share trade-id
/// state with every other failed symbol and roll up under an empty name): its frame is refused with
/// the reason, and once the dictionary answers again the same symbol decodes normally.
#[test]
fn a_frame_whose_symbol_cannot_be_named_is_refused_and_the_next_one_asks_again() {
    let dir = std::env::temp_dir().join(format!("sluice-decode-symbols-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("log.sqlite");
    drop(sluice::handoff::local::LocalLog::open(&path, &sluice::handoff::LocalLogConfig::default()).unwrap());
    let symbols = Arc::new(Symbols::local(&path).unwrap());
    let rt = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits::default()).unwrap();
    let mut decoder = Decoder::new(PluginInstance::new(&code, &[]).unwrap());
    // The dictionary's table goes away: every new name fails.
    let admin = rusqlite::Connection::open(&path).unwrap();
    admin.execute_batch("ALTER TABLE symbols RENAME TO symbols_away").unwrap();
    let out = decoder.decode(&[frame(1, 1, &aggtrade("BTCUSDT", 1)), frame(1, 2, &aggtrade("ETHUSDT", 1))]).unwrap();
    assert_eq!(out.records.as_bytes().len(), 0, "records under symbol 0");
    assert_eq!(out.rejects.len(), 2);
    assert!(out.rejects.iter().all(|r| r.reason.contains("symbol")), "{:?}", out.rejects);
    assert_eq!(out.total().rejects, 2);
    // Back: the same symbols decode, with real ids.
    admin.execute_batch("ALTER TABLE symbols_away RENAME TO symbols").unwrap();
    let out = decoder.decode(&[frame(1, 3, &aggtrade("BTCUSDT", 2)), frame(1, 4, &aggtrade("ETHUSDT", 2))]).unwrap();
    let ids: Vec<u32> =
        Delimited::new(out.records.as_bytes()).map(|r| StreamDataView::parse(r.unwrap()).unwrap().symbol_id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|&id| id != 0) && ids[0] != ids[1], "{ids:?}");
    assert_eq!(symbols.name(ids[0]).as_deref(), Some("BTCUSDT"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Symbol names come from untrusted frames: a plugin version names at most `max_symbols` of them.
/// A frame that would pass the cap is refused with the reason (and counted), and the dictionary does
/// not grow with it; symbols named before keep decoding.
#[test]
fn a_frame_past_the_symbol_cap_is_refused_and_the_dictionary_does_not_grow() {
    let symbols = Arc::new(Symbols::new());
    let rt = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits { max_symbols: 2, ..Limits::default() }).unwrap();
    let mut decoder = Decoder::new(PluginInstance::new(&code, &[]).unwrap());
    let frames: Vec<Frame> = ["AAAUSDT", "BBBUSDT", "CCCUSDT", "AAAUSDT", "DDDUSDT"]
        .iter()
        .enumerate()
        .map(|(i, s)| frame(1, i as i64, &aggtrade(s, i as u64 + 1)))
        .collect();
    let out = decoder.decode(&frames).unwrap();
    let names: Vec<String> = Delimited::new(out.records.as_bytes())
        .map(|r| symbols.name(StreamDataView::parse(r.unwrap()).unwrap().symbol_id).unwrap().to_string())
        .collect();
    assert_eq!(names, ["AAAUSDT", "BBBUSDT", "AAAUSDT"]);
    assert_eq!(out.rejects.len(), 2);
    assert!(
        out.rejects.iter().all(|r| r.reason.contains("max_symbols") && r.reason.contains('2')),
        "{:?}",
        out.rejects
    );
    assert_eq!(out.total().rejects, 2);
    assert_eq!(symbols.len(), 2, "the dictionary grew past the cap");
}

/// The quota is the plugin version's, not an instance's: an instance rebuilt after a failure (which
/// a hostile feed can cause at will) and another worker's instance go on counting against the same
/// quota, while every name named before keeps its id on any of them.
#[test]
fn the_symbol_quota_survives_a_rebuilt_instance_and_is_shared_by_every_instance() {
    let symbols = Arc::new(Symbols::new());
    let rt = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, symbols.clone()).unwrap();
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits { max_symbols: 2, ..Limits::default() }).unwrap();
    let decode = |plugin: &mut PluginInstance, names: &[&str]| -> Vec<u32> {
        let mut frames = Vec::new();
        for (i, name) in names.iter().enumerate() {
            sluice_wire::push_delimited(&mut frames, aggtrade(name, i as u64 + 1).as_bytes());
        }
        let out = plugin.decode(&frames).unwrap();
        Delimited::new(&out.records).map(|r| StreamDataView::parse(r.unwrap()).unwrap().symbol_id).collect()
    };
    let mut first = PluginInstance::new(&code, &[]).unwrap();
    let named = decode(&mut first, &["AAAUSDT", "BBBUSDT"]);
    assert!(named.iter().all(|&id| id != 0), "{named:?}");
    // What a failed call does: the instance is thrown away, the next call gets a fresh one.
    first.discard();
    assert_eq!(decode(&mut first, &["CCCUSDT", "AAAUSDT", "BBBUSDT"]), [0, named[0], named[1]]);
    assert_eq!(first.take_refused_symbols().over_quota, 1);
    // Another worker's instance of the same version: the same quota.
    let mut second = PluginInstance::new(&code, &[]).unwrap();
    assert_eq!(decode(&mut second, &["DDDUSDT", "BBBUSDT"]), [0, named[1]]);
    assert_eq!(symbols.len(), 2, "the dictionary grew past the quota");
}

/// A name longer than `max_symbol_bytes` is refused whatever the quota (a feed that names a fresh
/// 900 KB symbol in every frame would otherwise fill the guest's heap and the dictionary): its frame
/// is dead-lettered with the reason, the refusal counted per plugin version, and the dictionary does
/// not grow; other frames of the batch decode.
#[test]
fn a_symbol_name_over_the_length_cap_is_refused_and_counted() {
    let symbols = Arc::new(Symbols::new());
    let metrics = Arc::new(sluice::telemetry::Metrics::new());
    let rt = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() }, symbols.clone())
        .unwrap()
        .with_metrics(metrics.clone());
    let wasm = std::fs::read(format!("{}/binance.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
    let code = rt.compile("binance", &wasm, Limits::default()).unwrap();
    let mut decoder = Decoder::new(PluginInstance::new(&code, &[]).unwrap());
    let huge = "X".repeat(900_000);
    let frames: Vec<Frame> = (0..3)
        .map(|i| frame(1, i, &aggtrade(&format!("{huge}{i}"), i as u64 + 1)))
        .chain([frame(1, 3, &aggtrade("BTCUSDT", 10)), frame(1, 4, &aggtrade(&"Y".repeat(65), 11))])
        .collect();
    let out = decoder.decode(&frames).unwrap();
    assert_eq!(out.total().records, 1);
    assert_eq!(out.rejects.len(), 4);
    assert!(
        out.rejects.iter().all(|r| r.reason.contains("longer than 64 bytes") && r.reason.contains("max_symbol_bytes")),
        "{:?}",
        out.rejects.iter().map(|r| &r.reason).collect::<Vec<_>>()
    );
    assert_eq!(symbols.len(), 1, "only BTCUSDT is named");
    let text = metrics.render();
    let series = format!(
        "sluice_plugin_symbols_refused_total{{plugin=\"binance\",reason=\"too_long\",version=\"{}\"}} 4",
        code.version()
    );
    assert!(text.contains(&series), "{series} not in:\n{text}");
}
