//! The decode stage with the real Binance plugin: records are stamped with the source and receive
//! time, a rotation's overlapping frames are dropped as duplicates, skipped trade ids are counted as
//! gaps, and refused frames are kept whole with the plugin's reason.

use std::sync::Arc;

use bytes::Bytes;
use plugin_sdk::wire::{Delimited, StreamDataView};
use sluice::decode::Decoder;
use sluice::plugin::{Limits, PluginInstance, Runtime, RuntimeSettings};
use sluice::source::Frame;
use sluice::symbols::Symbols;

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
    drop(sluice::log::local::LocalLog::open(&path, &sluice::log::LogConfig::default()).unwrap());
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

/// Symbol names come from untrusted frames: a plugin instance names at most `max_symbols` of them.
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
