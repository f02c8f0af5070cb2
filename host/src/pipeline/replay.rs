//! Replay: the local log's records of a time range, again through each source's chain as it is now
//! (the versions the registry has active), rolled up into a table of their own, `replay_<NAME>`, in
//! the embedded store. Live rows are never written, so a replay can run beside `sluice run` on the
//! same data directory, and the two tables compare bucket by bucket with `/v1/query`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use plugin_sdk::wire::{Delimited, StreamDataView, push_delimited};

use super::{Role, open_plugins};
use crate::config::Config;
use crate::plugin::PluginInstance;
use crate::sink::Row;
use crate::sink::embedded::{EmbeddedStore, OwnedRow, REPLAY_PREFIX};
pub use crate::sink::replay::{ReplayProgress, ReplaySpec, ReplaySummary, check_range};
use crate::symbols::Symbols;
use crate::transform::Transformer;

/// Replays `spec` on the local log of `config`'s data directory until done or `stop` is set (then
/// the partial table is dropped and this fails).
///
/// # Errors
/// A configuration on Kafka (only the local log is replayed), a missing log, a range the log no
/// longer holds, a plugin that cannot start, a store that cannot be written, or a stop.
pub async fn replay(
    config: &Config,
    spec: &ReplaySpec,
    progress: Arc<ReplayProgress>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ReplaySummary> {
    if !config.kafka.brokers.trim().is_empty() {
        bail!("sluice replay reads the local log; this configuration hands records over through Kafka");
    }
    if let Some(into) = &spec.into {
        crate::sink::embedded::check_replay_name(into).map_err(anyhow::Error::msg)?;
    }
    let log = config.data_dir.join("log.sqlite");
    let store = config.data_dir.join("store.sqlite");
    if !log.is_file() {
        bail!("no local log at {}: nothing to replay", log.display());
    }
    let symbols = Arc::new(Symbols::local(&log).context("symbol dictionary")?);
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let (_registry, slots) = open_plugins(config, Role::Process, symbols.clone(), metrics).await?;
    let mut chains: HashMap<u32, Vec<Transformer>> = HashMap::new();
    let mut sources: HashMap<u32, Arc<str>> = HashMap::new();
    for source in &config.sources {
        let id = symbols.source_id(&source.name).context("source ids")?;
        let mut chain = Vec::new();
        for link in config.chain(source) {
            let slot = slots.get(&link.plugin).with_context(|| format!("plugin {} is not loaded", link.plugin))?;
            let instance = PluginInstance::new(&slot.active(), &link.config_pairs())
                .with_context(|| format!("source {}: plugin {}", source.name, link.plugin))?;
            chain.push(Transformer::new(instance));
        }
        chains.insert(id, chain);
        sources.insert(id, Arc::from(source.name.as_str()));
    }
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || run(&log, &store, &spec, &mut chains, &sources, &symbols, &progress, &stop))
        .await?
}

/// Rollup buckets are whole minutes; a replay covers whole buckets.
const BUCKET_MS: i64 = 60_000;

/// The replay's loop over the log's batches.
#[allow(clippy::too_many_arguments)]
fn run(
    log: &std::path::Path,
    store_path: &std::path::Path,
    spec: &ReplaySpec,
    chains: &mut HashMap<u32, Vec<Transformer>>,
    sources: &HashMap<u32, Arc<str>>,
    symbols: &Symbols,
    progress: &ReplayProgress,
    stop: &AtomicBool,
) -> anyhow::Result<ReplaySummary> {
    // The first record the log holds, for the retention check.
    let mut first_time = None;
    let first_offset = crate::log::local::read_batches(log, 0, |_, records| {
        first_time = Delimited::new(records)
            .find_map(|r| r.ok().and_then(|b| StreamDataView::parse(b).ok()))
            .map(|v| v.timestamp_ms);
        false
    })?;
    check_range(first_offset, first_time, spec.since_ms).map_err(anyhow::Error::msg)?;
    // Whole buckets: the one `since` falls in, up to the one `until` falls in (or past it when it is
    // a bucket's start).
    let since = spec.since_ms.div_euclid(BUCKET_MS) * BUCKET_MS;
    let until =
        spec.until_ms.map(|u| u.div_euclid(BUCKET_MS) * BUCKET_MS + if u % BUCKET_MS == 0 { 0 } else { BUCKET_MS });
    let staging = spec.into.clone().unwrap_or_else(|| format!("staging_{}", std::process::id()));
    let mut store = EmbeddedStore::open_replay(store_path, Duration::from_secs(60), &staging)?;
    let table = format!("{REPLAY_PREFIX}{staging}");
    let mut replayer = Replayer {
        chains,
        sources,
        symbols,
        progress,
        names: HashMap::new(),
        in_range: Box::new(move |t| {
            let bucket = t.div_euclid(BUCKET_MS) * BUCKET_MS;
            bucket >= since && until.is_none_or(|u| bucket < u)
        }),
    };
    let outcome = (|| -> anyhow::Result<String> {
        match &spec.into {
            Some(_) => {
                replayer.pass(log, 0, None, stop, &mut |rows| Ok(store.roll_up(&as_rows(&rows))?))?;
                Ok(table.clone())
            }
            None => {
                // Catch up with the live position, then swap under the store's write lock with the
                // last stretch read inside it.
                let mut next = 0;
                loop {
                    let target = store.live_position()?;
                    if target - next < 5_000 && next > 0 {
                        break;
                    }
                    next = replayer
                        .pass(log, next, Some(target), stop, &mut |rows| Ok(store.roll_up(&as_rows(&rows))?))?;
                    if target == 0 {
                        break;
                    }
                }
                store.swap_into_rollup(&table, since, until, |position| {
                    let mut tail = Vec::new();
                    replayer.pass(log, next, Some(position), stop, &mut |rows| {
                        tail.extend(rows);
                        Ok(())
                    })?;
                    Ok::<_, anyhow::Error>(tail)
                })?;
                Ok("rollup".to_owned())
            }
        }
    })();
    drop(store);
    let written = match outcome {
        Ok(written) => written,
        Err(e) => {
            let _ = EmbeddedStore::drop_replay(store_path, &staging);
            return Err(e);
        }
    };
    let buckets = buckets_in(store_path, &written, since, until)?;
    Ok(ReplaySummary {
        table: written,
        read: progress.read.load(Ordering::Relaxed),
        in_range: progress.in_range.load(Ordering::Relaxed),
        rows: progress.rows.load(Ordering::Relaxed),
        refused: progress.refused.load(Ordering::Relaxed),
        buckets,
    })
}

fn as_rows(rows: &[OwnedRow]) -> Vec<Row<'_>> {
    rows.iter().map(OwnedRow::as_row).collect()
}

/// Buckets of `table` in the replayed range.
fn buckets_in(store: &std::path::Path, table: &str, since: i64, until: Option<i64>) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let n: i64 = conn.query_row(
        &format!("SELECT count(*) FROM {table} WHERE bucket_ms >= ?1 AND bucket_ms < ?2"),
        [since, until.unwrap_or(i64::MAX)],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What a replay pass carries from batch to batch.
struct Replayer<'a> {
    chains: &'a mut HashMap<u32, Vec<Transformer>>,
    sources: &'a HashMap<u32, Arc<str>>,
    symbols: &'a Symbols,
    progress: &'a ReplayProgress,
    names: HashMap<u32, Arc<str>>,
    in_range: Box<dyn Fn(i64) -> bool>,
}

impl Replayer<'_> {
    /// The log's records from offset `from` up to `to` (exclusive; `None`: the end) through the
    /// chains, each log batch's rows handed to `out`. Returns the next offset not read.
    fn pass(
        &mut self,
        log: &std::path::Path,
        from: i64,
        to: Option<i64>,
        stop: &AtomicBool,
        out: &mut dyn FnMut(Vec<OwnedRow>) -> anyhow::Result<()>,
    ) -> anyhow::Result<i64> {
        let mut by_source: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        let mut next = from;
        let mut failure: Option<anyhow::Error> = None;
        crate::log::local::read_batches(log, from, |base, records| {
            if stop.load(Ordering::Relaxed) {
                failure = Some(anyhow::anyhow!("the replay was stopped"));
                return false;
            }
            for buf in by_source.values_mut() {
                buf.clear();
            }
            let mut read = 0;
            for (i, item) in Delimited::new(records).enumerate() {
                let offset = base + i as i64;
                if offset < from {
                    continue;
                }
                if to.is_some_and(|to| offset >= to) {
                    break;
                }
                next = offset + 1;
                read += 1;
                let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
                if (self.in_range)(view.timestamp_ms) {
                    self.progress.in_range.fetch_add(1, Ordering::Relaxed);
                    push_delimited(by_source.entry(view.source_id).or_default(), view.as_bytes());
                }
            }
            self.progress.read.fetch_add(read, Ordering::Relaxed);
            let rows =
                replay_batch(&by_source, self.chains, self.sources, self.symbols, &mut self.names, self.progress).map(
                    |rows| {
                        rows.into_iter()
                            .map(|(source, symbol, v)| OwnedRow {
                                timestamp_ms: v.timestamp_ms,
                                source,
                                symbol,
                                is_buy: v.is_buy,
                                price_e8: v.price_e8,
                                volume_e8: v.volume_e8,
                            })
                            .collect::<Vec<_>>()
                    },
                );
            match rows.and_then(|rows| {
                let n = rows.len() as u64;
                out(rows).map(|()| n)
            }) {
                Ok(n) => {
                    self.progress.rows.fetch_add(n, Ordering::Relaxed);
                    to.is_none_or(|to| next < to)
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(next),
        }
    }
}

/// A record with its source's and its symbol's names.
type NamedRecord = (Arc<str>, Arc<str>, plugin_sdk::Record);

/// One log batch's in-range records, per source, through its chain; the rows with their names.
fn replay_batch(
    by_source: &BTreeMap<u32, Vec<u8>>,
    chains: &mut HashMap<u32, Vec<Transformer>>,
    sources: &HashMap<u32, Arc<str>>,
    symbols: &Symbols,
    names: &mut HashMap<u32, Arc<str>>,
    progress: &ReplayProgress,
) -> anyhow::Result<Vec<NamedRecord>> {
    let mut rows = Vec::new();
    for (source, input) in by_source.iter().filter(|(_, b)| !b.is_empty()) {
        // Records of a source the configuration no longer has are left out, as the live run does.
        let (Some(chain), Some(source_name)) = (chains.get_mut(source), sources.get(source)) else { continue };
        let mut batch = input.clone();
        let mut parsed: Vec<plugin_sdk::Record> = Delimited::new(input)
            .filter_map(|item| item.and_then(StreamDataView::parse).ok())
            .map(|v| v.record())
            .collect();
        for link in chain.iter_mut() {
            let out = link.transform(&batch).map_err(|e| anyhow::anyhow!("source {source_name}: {e}"))?;
            progress.refused.fetch_add(out.rejects.len() as u64, Ordering::Relaxed);
            parsed = out.parsed;
            batch = out.records;
        }
        for record in parsed {
            let symbol = match names.get(&record.symbol_id) {
                Some(name) => name.clone(),
                None => match symbols.name(record.symbol_id) {
                    Some(name) => names.entry(record.symbol_id).or_insert(name).clone(),
                    None => {
                        progress.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
            };
            rows.push((source_name.clone(), symbol, record));
        }
    }
    Ok(rows)
}
