//! Replay: the local log's records of a time range, again through each source's chain as it is now
//! (the versions the registry has active), rolled up into a table of their own, `replay_<NAME>`, in
//! the embedded store. Live rows are never written, so a replay can run beside `sluice run` on the
//! same data directory, and the two tables compare bucket by bucket with `/v1/query`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use plugin_sdk::wire::{Delimited, StreamDataView, push_delimited};

use super::{Role, open_plugins};
use crate::config::Config;
use crate::sink::Row;
use crate::sink::embedded::{EmbeddedStore, REPLAY_PREFIX};
use crate::symbols::Symbols;
use crate::transform::Transformer;

/// What to replay: trades with `since_ms <= timestamp_ms < until_ms`, into `replay_<into>`.
#[derive(Clone, Debug)]
pub struct ReplaySpec {
    /// The first trade time replayed, ms since the epoch.
    pub since_ms: i64,
    /// Trades at or after this time are left out; `None` replays to the log's end.
    pub until_ms: Option<i64>,
    /// The table's name without its `replay_` prefix.
    pub into: String,
}

/// A replay's counts, updated once per log batch, readable while it runs.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    /// Records read from the log.
    pub read: AtomicU64,
    /// Of those, records in the range, handed to the chains.
    pub in_range: AtomicU64,
    /// Rows the chains gave and the replay rolled up.
    pub rows: AtomicU64,
    /// Records a link refused (not dead-lettered again: the live run did that).
    pub refused: AtomicU64,
}

/// How a replay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplaySummary {
    /// The table written, with its prefix.
    pub table: String,
    /// Records read, in range, rolled up and refused.
    pub read: u64,
    /// Records in the range.
    pub in_range: u64,
    /// Rows rolled up.
    pub rows: u64,
    /// Records refused by a link.
    pub refused: u64,
    /// Rollup buckets (bucket, source, symbol, side) in the table.
    pub buckets: u64,
}

/// Why the range cannot be replayed: the log deleted records (its first offset is above 0) and the
/// first one it still holds is later than `since_ms`.
///
/// # Errors
/// A message naming the earliest replayable time.
pub fn check_range(first_offset: Option<i64>, first_time_ms: Option<i64>, since_ms: i64) -> Result<(), String> {
    match (first_offset, first_time_ms) {
        (Some(first), Some(earliest)) if first > 0 && since_ms < earliest => Err(format!(
            "the local log no longer holds trades from {since_ms} (ms since the epoch): its retention deleted \
             the records before offset {first}; the earliest replayable time is {earliest}"
        )),
        _ => Ok(()),
    }
}

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
    crate::sink::embedded::check_replay_name(&spec.into).map_err(anyhow::Error::msg)?;
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
            let instance = slot
                .active()
                .instantiate(&link.config_pairs())
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
    let first_offset = crate::log::local::read_batches(log, |_, records| {
        first_time = Delimited::new(records)
            .find_map(|r| r.ok().and_then(|b| StreamDataView::parse(b).ok()))
            .map(|v| v.timestamp_ms);
        false
    })?;
    check_range(first_offset, first_time, spec.since_ms).map_err(anyhow::Error::msg)?;
    let mut store = EmbeddedStore::open_replay(store_path, Duration::from_secs(60), &spec.into)?;
    let table = format!("{REPLAY_PREFIX}{}", spec.into);
    let in_range = |t: i64| t >= spec.since_ms && spec.until_ms.is_none_or(|until| t < until);
    let mut by_source: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut names: HashMap<u32, Arc<str>> = HashMap::new();
    let mut failure: Option<anyhow::Error> = None;
    crate::log::local::read_batches(log, |_, records| {
        if stop.load(Ordering::Relaxed) {
            failure = Some(anyhow::anyhow!("the replay was stopped"));
            return false;
        }
        for buf in by_source.values_mut() {
            buf.clear();
        }
        let mut read = 0;
        for item in Delimited::new(records) {
            read += 1;
            let Ok(view) = item.and_then(StreamDataView::parse) else { continue };
            if in_range(view.timestamp_ms) {
                progress.in_range.fetch_add(1, Ordering::Relaxed);
                push_delimited(by_source.entry(view.source_id).or_default(), view.as_bytes());
            }
        }
        progress.read.fetch_add(read, Ordering::Relaxed);
        match replay_batch(&by_source, chains, sources, symbols, &mut names, progress) {
            Ok(rows) => {
                let rows: Vec<Row<'_>> = rows
                    .iter()
                    .map(|(source, symbol, v)| Row {
                        timestamp_ms: v.timestamp_ms,
                        source,
                        symbol,
                        is_buy: v.is_buy,
                        price_e8: v.price_e8,
                        volume_e8: v.volume_e8,
                    })
                    .collect();
                if let Err(e) = store.roll_up(&rows) {
                    failure = Some(e.into());
                    return false;
                }
                progress.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failure {
        drop(store);
        let _ = EmbeddedStore::drop_replay(store_path, &spec.into);
        return Err(e);
    }
    drop(store);
    let buckets = EmbeddedStore::replay_tables(store_path)?
        .into_iter()
        .find(|(name, _)| *name == spec.into)
        .map_or(0, |(_, rows)| u64::try_from(rows).unwrap_or(0));
    Ok(ReplaySummary {
        table,
        read: progress.read.load(Ordering::Relaxed),
        in_range: progress.in_range.load(Ordering::Relaxed),
        rows: progress.rows.load(Ordering::Relaxed),
        refused: progress.refused.load(Ordering::Relaxed),
        buckets,
    })
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

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn a_range_the_log_no_longer_holds_is_refused_with_the_earliest_time() {
        // Nothing deleted: any start is fine, even before the first record.
        assert!(check_range(Some(0), Some(1_000), 0).is_ok());
        assert!(check_range(None, None, 0).is_ok());
        // Retention deleted the first 500 records: from the first one still held, and later.
        assert!(check_range(Some(500), Some(1_000), 1_000).is_ok());
        let err = check_range(Some(500), Some(1_000), 999).unwrap_err();
        assert!(err.contains("earliest replayable time is 1000") && err.contains("offset 500"), "{err}");
    }
}
