//! The sink, opened: [`prepare`] once at start (the Druid sink's topics and the state it committed,
//! or the embedded store checked against the local log), then [`open`] for each attempt of the
//! process role. The rest of the code holds a `Box<dyn Sink>` and a [`Committed`] and never asks
//! which sink it got.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::Sink;
use super::druid::state::StoredState;
use super::druid::{DruidSink, DruidSinkConfig, transactional_id};
use super::embedded::{CheckpointPolicy, DeadLetterPolicy, EmbeddedStore, StateEntries};
use crate::handoff::Handoff;
use crate::handoff::local::POSITION_TOPIC;

/// How long opening a sink or reading what it committed waits on the broker.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The embedded store's time buckets are read with this granularity when only its state and
/// positions are needed.
const STORE_GRANULARITY: Duration = Duration::from_secs(60);

/// Where the process role delivers, as configured.
#[derive(Clone)]
pub struct SinkSettings {
    /// `[sink.druid]`; the embedded store when `None`.
    pub druid: Option<DruidSinkConfig>,
    /// The embedded store's file (in the data directory).
    pub store_path: PathBuf,
    /// The process role's consumer group (the Druid sink's transactional ids derive from it).
    pub group: String,
    /// This process instance within the group.
    pub instance: String,
    /// At most one state checkpoint per this long.
    pub checkpoint_every: Duration,
    /// The embedded store's dead-letter retention.
    pub dead_letters: DeadLetterPolicy,
    /// Counts the Druid sink's commits that overlapped another in flight.
    pub overlapped: Option<prometheus::IntCounter>,
}

impl SinkSettings {
    /// The embedded store's file, when that is the sink.
    pub fn store(&self) -> Option<&std::path::Path> {
        self.druid.is_none().then_some(self.store_path.as_path())
    }
}

/// The chains' state as the sink committed it with its position, read once at start.
pub enum Committed {
    /// The embedded store's state table (and its checkpoints kept this long).
    Store(Box<EmbeddedStore>, Duration),
    /// The Druid sink's changelog, as it stood at its last committed offsets.
    Changelog(StoredState),
}

impl Committed {
    /// The committed state of link `link` of `source`'s chain: its format and entries.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn plugin_state(&self, source: &str, link: u32) -> anyhow::Result<Option<(String, StateEntries)>> {
        Ok(match self {
            Committed::Store(store, _) => store.plugin_state(source, link)?,
            Committed::Changelog(changelog) => changelog.plugin_state(source, link),
        })
    }

    /// Whether state is kept per link for the whole group (the Druid sink's changelog) rather than
    /// with this instance's store: a stateful link then needs one process instance in the group.
    pub fn shared_by_group(&self) -> bool {
        matches!(self, Committed::Changelog(_))
    }
}

/// Gets the sink ready before the process role's first attempt and reads what it committed: for
/// the Druid sink (which needs Kafka) its topics, the producers of a previous incarnation with more
/// transactions in flight fenced, and the changelog; for the embedded store, its position checked
/// against the local log's (a store ahead of its log stops the start, unless `[local_log]
/// resume_past_lost_tail` lets the log go on from the store's position). `checkpoints_kept`: how
/// long the embedded store keeps its state checkpoints.
///
/// # Errors
/// The Druid sink without Kafka, its topics or changelog cannot be read, the store cannot be
/// opened, or it is ahead of its log.
pub async fn prepare(
    settings: &SinkSettings,
    handoff: &Handoff,
    resume_past_lost_tail: bool,
    checkpoints_kept: Duration,
) -> anyhow::Result<Committed> {
    let Some(druid) = &settings.druid else {
        let (path, handoff) = (settings.store_path.clone(), handoff.clone());
        let store = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = EmbeddedStore::open(&path, STORE_GRANULARITY)?;
            if let Some(log) = handoff.local_log() {
                let position = store.offsets(POSITION_TOPIC)?.iter().find(|o| o.1 == 0).map(|o| o.2);
                match log.check_position(position) {
                    Err(crate::handoff::LogError::StoreAhead { store, .. }) if resume_past_lost_tail => {
                        log.resume_at(store)?;
                        log.check_position(position)?;
                    }
                    checked => checked?,
                }
            }
            Ok(store)
        });
        return Ok(Committed::Store(Box::new(store.await??), checkpoints_kept));
    };
    let Some((kafka, brokers)) = handoff.kafka() else {
        bail!("the Druid sink needs [kafka] brokers: it delivers through a Kafka topic");
    };
    use crate::handoff::kafka::{ensure_changelog_topic, ensure_checkpoint_topic, ensure_topics};
    ensure_topics(kafka, brokers, &[&druid.topic], kafka.partitions).await?;
    ensure_changelog_topic(kafka, brokers, &druid.state_topic()).await?;
    ensure_checkpoint_topic(kafka, brokers, &druid.checkpoint_topic(), &kafka.events_topic).await?;
    let (kafka, brokers, druid) = (kafka.clone(), brokers.to_owned(), druid.clone());
    let id = transactional_id(&settings.group, &settings.instance);
    let read = tokio::task::spawn_blocking(move || {
        // A previous incarnation may have run with more producers: their transactions are settled
        // before the changelog and the offsets are read.
        let in_use = druid.transactions_in_flight as usize;
        super::druid::delivery::fence_unused(&kafka, &brokers, &id, in_use, TIMEOUT)?;
        super::druid::state::restore(&kafka, &brokers, &druid, &id, TIMEOUT)
    });
    let changelog = read.await?.context("restoring plugin state from the Druid sink's changelog")?;
    Ok(Committed::Changelog(changelog))
}

/// Opens the sink for one attempt of the process role.
///
/// # Errors
/// The store cannot be opened, or the Druid sink's producers cannot start their transactions.
pub fn open(settings: &SinkSettings, handoff: &Handoff, committed: &Committed) -> anyhow::Result<Box<dyn Sink>> {
    match (&settings.druid, handoff.kafka(), committed) {
        (Some(druid), Some((kafka, brokers)), _) => {
            let id = transactional_id(&settings.group, &settings.instance);
            let sink = DruidSink::new(kafka, brokers, druid, &id, TIMEOUT)?
                .with_checkpoints(druid.checkpoint_topic(), settings.checkpoint_every);
            Ok(Box::new(match &settings.overlapped {
                Some(counter) => sink.with_overlap_counter(counter.clone()),
                None => sink,
            }))
        }
        (None, _, Committed::Store(_, keep)) => {
            let store = EmbeddedStore::open(&settings.store_path, STORE_GRANULARITY)?
                .with_checkpoints(CheckpointPolicy { every: settings.checkpoint_every, keep: *keep })
                .with_dead_letter_retention(settings.dead_letters);
            Ok(Box::new(store))
        }
        _ => bail!("no sink: the Druid sink needs [kafka] brokers, and the embedded store a data directory"),
    }
}

/// With the Druid sink: checks its supervisor spec offline (one that does not pass stops the start;
/// it is never posted) and keeps it applied through the Overlord until `stop`, with a `druid`
/// check on `/health/ready`. Nothing to do for the embedded store.
///
/// # Errors
/// The spec does not pass the offline checks.
pub fn supervise(
    settings: &SinkSettings,
    handoff: &Handoff,
    health: std::sync::Arc<crate::telemetry::health::Health>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (Some(druid), Some((_, brokers))) = (&settings.druid, handoff.kafka()) else { return Ok(()) };
    super::druid::supervisor_spec(druid, crate::proto::DESCRIPTOR_SET, brokers)
        .context("[sink.druid] does not make a valid supervisor spec")?;
    health.expect("druid");
    tokio::spawn(super::druid::keep_supervisor(druid.clone(), brokers.to_owned(), health, metrics, stop));
    Ok(())
}
