//! `sluice replay`: a time range of the hand-off (the local log, or the events topic on Kafka)
//! through the sources' chains as they are now, into the embedded store (a table of its own, or
//! `rollup` itself) or, with the Druid sink, into a topic of its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::config::Config;
use crate::replay::{ReplayProgress, ReplaySpec, Written, replay};

/// Arguments of `sluice replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The configuration file (its data directory, sources, chains and plugins).
    #[arg(long)]
    pub config: PathBuf,
    /// The first trade time replayed: RFC 3339 (`2026-12-01T14:00:00Z`) or milliseconds since the
    /// epoch.
    #[arg(long, value_parser = parse_time)]
    pub since: i64,
    /// Trades at or after this time are left out (default: to the log's end).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Roll up into the table `replay_NAME` of the embedded store (made anew) beside the live rows;
    /// without it, the range's buckets of `rollup` itself are replaced, while the live role goes on.
    /// With the Druid sink (where it is needed), the rows go to the topic `<topic>.replay.NAME`.
    #[arg(long, value_name = "NAME")]
    pub into: Option<String>,
}

/// A time as RFC 3339 or as milliseconds since the epoch.
pub(super) fn parse_time(s: &str) -> Result<i64, String> {
    s.parse::<i64>().or_else(|_| {
        plugin_sdk::time::rfc3339_to_ms(s)
            .map_err(|e| format!("{s:?} is neither RFC 3339 (2026-12-01T14:00:00Z) nor milliseconds: {e}"))
    })
}

/// `sluice replay`: progress once a second, a summary at the end; Ctrl-C stops it and drops the
/// partial table.
pub(super) async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
    if let Some(until) = args.until
        && until <= args.since
    {
        anyhow::bail!("--until must be later than --since");
    }
    let spec = ReplaySpec { since_ms: args.since, until_ms: args.until, into: args.into.clone() };
    let (progress, stop) = (Arc::new(ReplayProgress::default()), Arc::new(AtomicBool::new(false)));
    let job = {
        let (config, spec, progress, stop) = (config.clone(), spec.clone(), progress.clone(), stop.clone());
        tokio::spawn(async move { replay(&config, &spec, progress, stop).await })
    };
    tokio::pin!(job);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let summary = loop {
        tokio::select! {
            done = &mut job => break done.context("the replay task")??,
            _ = tick.tick() => {
                let read = progress.read.load(Ordering::Relaxed);
                println!(
                    "replay: {read} records read, {} in range, {} rows, {} refused, {:.0} records/s",
                    progress.in_range.load(Ordering::Relaxed),
                    progress.rows.load(Ordering::Relaxed),
                    progress.refused.load(Ordering::Relaxed),
                    read as f64 / started.elapsed().as_secs_f64()
                );
            }
            _ = tokio::signal::ctrl_c() => {
                stop.store(true, Ordering::Relaxed);
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let (from, to) = summary.range;
    println!(
        "replayed into {} (trades from {}{}): {} records read, {} in range, {} rows in {} buckets, {} refused, \
         in {seconds:.1} s ({:.0} records/s)",
        summary.written,
        crate::clock::rfc3339_ms(from),
        to.map(|t| format!(" to {}", crate::clock::rfc3339_ms(t))).unwrap_or_default(),
        summary.read,
        summary.in_range,
        summary.rows,
        summary.buckets,
        summary.refused,
        summary.read as f64 / seconds.max(1e-9),
    );
    match (&summary.written, &spec.into) {
        (Written::Table(table), _) if table != "rollup" => {
            println!("compare with /v1/query?sql=SELECT * FROM {table} EXCEPT SELECT * FROM rollup");
        }
        (Written::Topic(_), Some(name)) => {
            let config = args.config.display();
            println!(
                "on the Druid side (the book, Operating sluice, Replay):\n  a datasource of its own: sluice druid spec --config {config} \
                 separate --name {name}\n  then to overwrite the live datasource with it: sluice druid spec --config \
                 {config} reindex --name {name} --since {from}{}",
                to.map(|t| format!(" --until {t}")).unwrap_or_else(|| " --until <end>".into())
            );
        }
        _ => {}
    }
    Ok(())
}
