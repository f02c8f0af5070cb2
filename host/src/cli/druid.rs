//! `sluice druid spec`: the JSON an operator hands Druid's Overlord, generated from `[sink.druid]`
//! by the code that builds the spec `sluice run` applies: that spec itself, the supervisor of a
//! replay's datasource, and the task that overwrites the live datasource with a replay.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::replay::parse_time;
use crate::config::Config;
use crate::proto::DESCRIPTOR_SET;
use crate::sink::druid::{reindex_task, replay_datasource, replay_supervisor_spec, replay_topic, supervisor_spec};

/// Arguments of `sluice druid spec`.
#[derive(Debug, Args)]
pub struct DruidSpecArgs {
    /// The configuration file (its `[sink.druid]` and `[kafka]`).
    #[arg(long)]
    pub config: PathBuf,
    /// Write the JSON here instead of to stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Which JSON.
    #[command(subcommand)]
    pub kind: SpecKind,
}

/// The JSON `sluice druid spec` writes.
#[derive(Debug, Subcommand)]
pub enum SpecKind {
    /// The Kafka supervisor spec `sluice run` applies for the live datasource.
    Live,
    /// The Kafka supervisor spec of a replay's own datasource, `<datasource>_replay_NAME`, reading the
    /// topic `sluice replay --into NAME` wrote (`<topic>.replay.NAME`) from its start.
    Separate {
        /// The replay's name (`--into NAME`).
        #[arg(long)]
        name: String,
    },
    /// The `index_parallel` task that overwrites the live datasource over `[since, until)`, widened
    /// to whole segments, with the rows of the replay's datasource (filled by `separate`'s spec).
    Reindex {
        /// The replay's name (`--into NAME`).
        #[arg(long)]
        name: String,
        /// The start of the range the replay covered: RFC 3339 or milliseconds since the epoch.
        #[arg(long, value_parser = parse_time)]
        since: i64,
        /// The end of that range.
        #[arg(long, value_parser = parse_time)]
        until: i64,
    },
}

/// Writes the JSON asked for, and on stderr where it goes.
pub(super) fn spec(args: &DruidSpecArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config).map_err(anyhow::Error::msg)?;
    let druid =
        config.sink.druid.as_ref().with_context(|| {
            format!("{} has no [sink.druid]: there is no Druid spec to write", args.config.display())
        })?;
    let brokers = &config.kafka.brokers;
    let overlord = druid.overlord_url.trim_end_matches('/');
    let (json, next) = match &args.kind {
        SpecKind::Live => (
            supervisor_spec(druid, DESCRIPTOR_SET, brokers)?.into_json(),
            format!("the spec sluice run applies: POST it to {overlord}/druid/indexer/v1/supervisor"),
        ),
        SpecKind::Separate { name } => (
            replay_supervisor_spec(druid, DESCRIPTOR_SET, brokers, name)?.into_json(),
            format!(
                "POST it to {overlord}/druid/indexer/v1/supervisor: it ingests the topic {} into the datasource {}",
                replay_topic(druid, name),
                replay_datasource(druid, name)
            ),
        ),
        SpecKind::Reindex { name, since, until } => {
            let task = reindex_task(druid, DESCRIPTOR_SET, brokers, name, *since, *until)?;
            let (from, to) = task.interval();
            let next = format!(
                "once the datasource {} holds the whole replay (its supervisor suspended, so its segments are \
                 published), POST it to {overlord}/druid/indexer/v1/task: it overwrites {} from {} to {}",
                replay_datasource(druid, name),
                druid.datasource,
                crate::clock::rfc3339_ms(from),
                crate::clock::rfc3339_ms(to)
            );
            (task.into_json(), next)
        }
    };
    let text = serde_json::to_string_pretty(&json)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n")).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => writeln!(std::io::stdout(), "{text}")?,
    }
    eprintln!("{next}");
    Ok(())
}
