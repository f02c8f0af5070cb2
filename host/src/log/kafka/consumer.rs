//! The process role's consumer: reads `sluice.events` from where the sink says it stands.
//!
//! Offsets are never committed on their own: the sink stores them together with the rows they
//! produced. The embedded store keeps them in the same SQLite transaction and the consumer is
//! assigned every partition at those offsets ([`EventConsumer::assign`]). The Druid sink commits
//! them in the same Kafka transaction as the rows, and the consumer joins the group
//! ([`EventConsumer::subscribe`]), so several instances split the partitions; after a rebalance the
//! new owner starts at the last committed transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use plugin_sdk::wire::push_delimited;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaConfig, KafkaError};

/// A batch of consumed records: payloads length-delimited in one buffer, and where each came from.
#[derive(Debug, Default)]
pub struct Polled {
    /// The payloads, length-delimited (one allocation per batch, not per record).
    pub records: Vec<u8>,
    /// (partition, offset) of each record, in order.
    pub positions: Vec<(i32, i64)>,
}

impl Polled {
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.records.clear();
        self.positions.clear();
    }
}

/// What one [`EventConsumer::poll_into`] saw besides records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    /// Consumer errors (logged).
    pub errors: usize,
    /// The group's assignment changed during the poll. The records polled before the change were
    /// dropped from the batch; rows the caller holds for the old assignment must be dropped too
    /// (their offsets were not committed, so their partitions' new owner reads them again).
    pub rebalanced: bool,
}

/// Notes rebalances, which librdkafka reports from inside `poll`, and the consumer's lag from its
/// periodic statistics.
#[derive(Default)]
pub struct RebalanceFlag(Arc<AtomicBool>, Arc<AtomicI64>);

impl ClientContext for RebalanceFlag {
    /// Every `statistics.interval.ms`: the records of the assigned partitions not yet read, summed
    /// (last stable offset minus the next offset to hand to the application).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(id, p)| **id >= 0 && p.app_offset >= 0 && p.ls_offset >= 0)
            .map(|(_, p)| (p.ls_offset - p.app_offset).max(0))
            .sum();
        self.1.store(lag, Ordering::Relaxed);
    }
}

impl ConsumerContext for RebalanceFlag {
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Revoke(tpl) => tracing::info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
        }
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Reads the events topic.
pub struct EventConsumer {
    inner: BaseConsumer<RebalanceFlag>,
    rebalanced: Arc<AtomicBool>,
    lag: Arc<AtomicI64>,
    topic: String,
    /// With a manual assignment (the embedded store): the partitions assigned, and when the topic's
    /// metadata was last read to follow partitions added since.
    assigned: std::sync::Mutex<Option<(i32, std::time::Instant)>>,
    /// How often that is ([`PARTITION_CHECK`] unless changed).
    partition_check: Duration,
}

/// How often a manually assigned consumer looks for partitions added to its topic.
const PARTITION_CHECK: Duration = Duration::from_secs(30);

impl EventConsumer {
    /// A consumer of `config.events_topic` that never commits offsets on its own and reads only
    /// committed transactional data. `instance`, stable across restarts, makes it a static member of
    /// `group`.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when librdkafka refuses a setting.
    pub fn new(config: &KafkaConfig, brokers: &str, group: &str, instance: Option<&str>) -> Result<Self, KafkaError> {
        let mut c = config.client_config(brokers);
        if let Some(instance) = instance {
            // Static membership: a restarted instance takes its partitions back at once, instead of
            // the group waiting for the old member's session to expire.
            c.set("group.instance.id", format!("sluice-{group}-{instance}"));
        }
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // Eager assignors: a rebalance revokes every partition and assigns them again at their
            // committed offsets, which is what dropping uncommitted rows on a rebalance relies on.
            .set("partition.assignment.strategy", "range,roundrobin")
            // A killed instance's partitions move to the others after this long without heartbeats.
            // A fetch returns as soon as any record is there; with none it is held at the broker for up
            // to 100 ms (not polled again at once), so an idle consumer is cheap and a busy one waits
            // for nothing.
            .set("fetch.min.bytes", "1")
            .set("fetch.wait.max.ms", "100")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000");
        for (k, v) in &config.options {
            c.set(k, v);
        }
        if !config.options.contains_key("statistics.interval.ms") {
            // For the lag only; parsed every five seconds, off the record path.
            c.set("statistics.interval.ms", "5000");
        }
        let flag = RebalanceFlag::default();
        let (rebalanced, lag) = (flag.0.clone(), flag.1.clone());
        let inner = c.create_with_context(flag).map_err(|e| KafkaError::Config(e.to_string()))?;
        Ok(EventConsumer {
            inner,
            rebalanced,
            lag,
            topic: config.events_topic.clone(),
            assigned: std::sync::Mutex::new(None),
            partition_check: PARTITION_CHECK,
        })
    }

    /// Looks for partitions added to the topic this often instead of every `PARTITION_CHECK`.
    pub fn with_partition_check(mut self, every: Duration) -> Self {
        self.partition_check = every;
        self
    }

    /// Joins the consumer group: partitions are split among the group's instances and each starts at
    /// its last committed offset.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when the subscription is refused.
    pub fn subscribe(&self) -> Result<(), KafkaError> {
        self.inner.subscribe(&[&self.topic]).map_err(|e| KafkaError::Config(e.to_string()))
    }

    /// The group's metadata, which a transactional producer sends with the offsets it commits so the
    /// group can fence an instance that lost its partitions.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when the consumer is not in a group.
    pub fn group_metadata(&self) -> Result<ConsumerGroupMetadata, KafkaError> {
        self.inner.group_metadata().ok_or_else(|| KafkaError::Config("the consumer has no group metadata".into()))
    }

    /// Assigns partitions `0..partitions`, each at its stored next offset or at the beginning.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when the assignment is refused.
    pub fn assign(&self, partitions: i32, stored: &[(String, i32, i64)]) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let offset = stored
                .iter()
                .find(|(t, part, _)| *t == self.topic && *part == p)
                .map_or(Offset::Beginning, |(_, _, next)| Offset::Offset(*next));
            tpl.add_partition_offset(&self.topic, p, offset).map_err(|e| KafkaError::Config(e.to_string()))?;
        }
        self.inner.assign(&tpl).map_err(|e| KafkaError::Config(e.to_string()))
    }

    /// [`EventConsumer::assign`] after checking each stored offset against its partition's
    /// watermarks: an offset past the partition's end is refused (the topic was recreated, and
    /// starting over would count records twice); one before the partition's start reads from the
    /// start, with an ERROR naming the records retention deleted unread.
    ///
    /// # Errors
    /// [`LogError::OffsetAhead`](crate::log::error::LogError::OffsetAhead), or the broker's refusal.
    pub fn assign_checked(
        &self,
        partitions: i32,
        stored: &[(String, i32, i64)],
    ) -> Result<(), crate::log::error::LogError> {
        use crate::log::error::LogError;
        // Every partition the topic has, not the configured count: records in the others would
        // never be read.
        let actual = self.partition_count()?;
        if actual < partitions {
            return Err(LogError::FewerPartitions { topic: self.topic.clone(), configured: partitions, actual });
        }
        let partitions = actual;
        for (topic, partition, next) in stored.iter().filter(|(t, p, _)| *t == self.topic && *p < partitions) {
            let (low, high) = self.inner.fetch_watermarks(topic, *partition, Duration::from_secs(10)).map_err(|e| {
                KafkaError::Config(format!("cannot read the range of {topic} partition {partition}: {e}"))
            })?;
            if *next > high {
                return Err(LogError::OffsetAhead { topic: topic.clone(), partition: *partition, store: *next, high });
            }
            if *next < low {
                tracing::error!(
                    topic = %topic,
                    partition,
                    store = *next,
                    low,
                    records = low - *next,
                    "the topic no longer holds records the store has not read (deleted by its retention)"
                );
            }
        }
        self.assign(partitions, stored)?;
        *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some((partitions, std::time::Instant::now()));
        Ok(())
    }

    /// The next offset the group has committed for each partition of the topic (those with none
    /// are left out).
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the broker does not answer within `timeout`.
    pub fn committed_positions(&self, timeout: Duration) -> Result<crate::log::Positions, KafkaError> {
        let failed = |e: rdkafka::error::KafkaError| KafkaError::Read {
            topic: self.topic.clone(),
            reason: format!("the group's committed offsets: {e}"),
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partition_count()? {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.inner.committed_offsets(tpl, timeout).map_err(failed)?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
            .collect())
    }

    /// The number of partitions the topic has, from the cluster's metadata.
    fn partition_count(&self) -> Result<i32, KafkaError> {
        let metadata = self
            .inner
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| KafkaError::Config(format!("cannot read the metadata of {}: {e}", self.topic)))?;
        let topic = metadata.topics().iter().find(|t| t.name() == self.topic);
        Ok(topic.map_or(0, |t| t.partitions().len()) as i32)
    }

    /// With a manual assignment, every [`PARTITION_CHECK`]: partitions added to the topic since are
    /// assigned too, from their start.
    fn follow_new_partitions(&self) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        let Some((count, checked)) = assigned.as_mut() else { return };
        if checked.elapsed() < self.partition_check {
            return;
        }
        *checked = std::time::Instant::now();
        let actual = match self.partition_count() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for new partitions; will retry");
                return;
            }
        };
        if actual <= *count {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in *count..actual {
            if tpl.add_partition_offset(&self.topic, p, Offset::Beginning).is_err() {
                return;
            }
        }
        match self.inner.incremental_assign(&tpl) {
            Ok(()) => {
                tracing::info!(topic = %self.topic, from = *count, to = actual, "partitions added to the topic are read too");
                *count = actual;
            }
            Err(e) => tracing::warn!(error = %e, "cannot assign the partitions added to the topic; will retry"),
        }
    }

    /// Polls up to `max` records into `out`, waiting at most `timeout` for the first one.
    pub fn poll_into(&self, out: &mut Polled, max: usize, timeout: Duration) -> PollOutcome {
        self.follow_new_partitions();
        let mut outcome = PollOutcome::default();
        let mut wait = timeout;
        while out.positions.len() < max {
            let polled = self.inner.poll(wait);
            if self.rebalanced.swap(false, Ordering::SeqCst) {
                // Whatever was read before belongs to the old assignment.
                out.clear();
                outcome.rebalanced = true;
            }
            match polled {
                None => break,
                Some(Ok(m)) => {
                    push_delimited(&mut out.records, m.payload().unwrap_or_default());
                    out.positions.push((m.partition(), m.offset()));
                }
                Some(Err(e)) => {
                    outcome.errors += 1;
                    tracing::warn!(error = %e, "consumer error");
                }
            }
            // Only the first poll waits; the rest take what is already fetched.
            wait = Duration::ZERO;
        }
        outcome
    }

    /// Records in the assigned partitions not read yet, as of the last statistics (every five
    /// seconds; 0 before the first).
    pub fn lag(&self) -> i64 {
        self.lag.load(Ordering::Relaxed)
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}
