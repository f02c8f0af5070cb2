//! The process role's consumer: reads `sluice.events` from where the sink says it stands.
//!
//! Offsets are never committed on their own: the sink stores them together with the rows they
//! produced. The embedded store keeps them in the same SQLite transaction and the consumer is
//! assigned every partition at those offsets ([`EventConsumer::assign`]). The Druid sink commits
//! them in the same Kafka transaction as the rows, and the consumer joins the group
//! ([`EventConsumer::subscribe`]), so several instances split the partitions; after a rebalance the
//! new owner starts at the last committed transaction.
//!
//! A position the topic no longer holds is never jumped over (`auto.offset.reset = error`): a
//! partition whose records retention deleted before they were read stops the read with
//! [`LogError::RecordsDeleted`], which names the partitions, the records lost and the way on. A
//! partition the group has committed nothing for yet is read from its start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance};
use rdkafka::message::Message;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use sluice_wire::push_delimited;

use super::{KafkaConfig, KafkaError};
use crate::handoff::error::{Deleted, LogError};
use crate::handoff::{PollOutcome, Polled};

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
    /// librdkafka's eager rebalance, with one change: a partition the group has committed no offset
    /// for is assigned at its start. (`auto.offset.reset` is `error`, so that a committed position
    /// retention deleted stops the read; without this, a new group would stop on every partition.)
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match base.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                    Ok(committed) => {
                        for e in committed.elements().iter().filter(|e| e.offset() == Offset::Invalid) {
                            let _ = tpl.set_partition_offset(e.topic(), e.partition(), Offset::Beginning);
                        }
                    }
                    // The read then stops on the partitions without an offset and starts again.
                    Err(e) => tracing::warn!(error = %e, "cannot read the group's committed offsets"),
                }
                Rebalance::Assign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            other => Rebalance::Error(rdkafka::error::KafkaError::Rebalance(other.into())),
        };
        let done = match &rebalance {
            Rebalance::Assign(tpl) => base.assign(tpl),
            _ => base.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "applying the group's assignment failed");
        }
        self.post_rebalance(base, &rebalance);
    }

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
    /// The consumer group, for the way on an error names.
    group: String,
    /// With a manual assignment: the offset each partition was assigned at, which is where the
    /// consumer stands in a partition it has handed nothing of yet.
    assigned_at: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
    /// `[kafka] skip_deleted_records`: with a manual assignment, a stored position retention
    /// deleted moves to the partition's start (logged with the records lost) instead of stopping.
    skip_deleted: bool,
}

/// The assigned partitions a consumer stands outside of: before their start, or (the first one
/// found) past their end as (partition, position, end).
struct Outside {
    deleted: Vec<Deleted>,
    ahead: Option<(i32, i64, i64)>,
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
        // Defaults `[kafka] options` may change.
        let mut c = config.client_config_with(
            brokers,
            &[
                // A fetch returns as soon as any record is there; with none it is held at the broker
                // for up to 100 ms (not polled again at once), so an idle consumer is cheap and a busy
                // one waits for nothing.
                ("fetch.min.bytes", "1"),
                ("fetch.wait.max.ms", "100"),
                // A killed instance's partitions move to the others after this long without heartbeats.
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "2000"),
                // For the lag only; parsed every five seconds, off the record path.
                ("statistics.interval.ms", "5000"),
            ],
        );
        // The safety settings, after the options so none of them is undone (and the options may not
        // name them: see `SAFETY_KEYS`).
        if let Some(instance) = instance {
            // Static membership: a restarted instance takes its partitions back at once, instead of
            // the group waiting for the old member's session to expire.
            c.set("group.instance.id", format!("sluice-{group}-{instance}"));
        }
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A position the topic no longer holds (retention deleted the records) is an error the
            // process role stops on, never a silent jump (see `poll_into`).
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            // Eager assignors: a rebalance revokes every partition and assigns them again at their
            // committed offsets, which is what dropping uncommitted rows on a rebalance relies on.
            .set("partition.assignment.strategy", "range,roundrobin");
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
            group: group.to_owned(),
            assigned_at: std::sync::Mutex::default(),
            skip_deleted: config.skip_deleted_records,
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
        let mut at = std::collections::BTreeMap::new();
        for p in 0..partitions {
            let offset = stored
                .iter()
                .find(|(t, part, _)| *t == self.topic && *part == p)
                .map_or(Offset::Beginning, |(_, _, next)| Offset::Offset(*next));
            if let Offset::Offset(next) = offset {
                at.insert(p, next);
            }
            tpl.add_partition_offset(&self.topic, p, offset).map_err(|e| KafkaError::Config(e.to_string()))?;
        }
        self.inner.assign(&tpl).map_err(|e| KafkaError::Config(e.to_string()))?;
        *self.assigned_at.lock().unwrap_or_else(|p| p.into_inner()) = at;
        Ok(())
    }

    /// [`EventConsumer::assign`] after checking each stored offset against its partition's
    /// watermarks: an offset past the partition's end is refused (the topic was recreated, and
    /// starting over would count records twice), and so is one before the partition's start
    /// (retention deleted records the store had not read), unless `[kafka] skip_deleted_records`
    /// says to go on from the start: then an ERROR names the records lost.
    ///
    /// # Errors
    /// [`LogError::OffsetAhead`], [`LogError::RecordsDeleted`], or the broker's refusal.
    pub fn assign_checked(&self, partitions: i32, stored: &[(String, i32, i64)]) -> Result<(), LogError> {
        // Every partition the topic has, not the configured count: records in the others would
        // never be read.
        let actual = self.partition_count()?;
        if actual < partitions {
            return Err(LogError::FewerPartitions { topic: self.topic.clone(), configured: partitions, actual });
        }
        let partitions = actual;
        let mut stored = stored.to_vec();
        let mut deleted = Vec::new();
        for (topic, partition, next) in stored.iter_mut().filter(|(t, p, _)| *t == self.topic && *p < partitions) {
            let (low, high) = self.inner.fetch_watermarks(topic, *partition, Duration::from_secs(10)).map_err(|e| {
                KafkaError::Config(format!("cannot read the range of {topic} partition {partition}: {e}"))
            })?;
            if *next > high {
                return Err(LogError::OffsetAhead { topic: topic.clone(), partition: *partition, store: *next, high });
            }
            if *next < low && self.skip_deleted {
                tracing::error!(
                    topic = %topic,
                    partition,
                    store = *next,
                    low,
                    records = low - *next,
                    "the topic no longer holds records the store has not read (deleted by its retention): going \
                     on from the partition's start, as --skip-deleted-records asks"
                );
                *next = low;
            } else if *next < low {
                deleted.push(Deleted { partition: *partition, position: *next, start: low });
            }
        }
        if !deleted.is_empty() {
            return Err(self.records_deleted(deleted, true));
        }
        self.assign(partitions, &stored)?;
        *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some((partitions, std::time::Instant::now()));
        Ok(())
    }

    /// The next offset the group has committed for each partition of the topic (those with none
    /// are left out).
    ///
    /// # Errors
    /// [`KafkaError::Read`] when the broker does not answer within `timeout`.
    pub fn committed_positions(&self, timeout: Duration) -> Result<crate::handoff::Positions, KafkaError> {
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

    /// The error for partitions whose records retention deleted before they were read, with the way
    /// on for how positions are kept: the store's (`manual`), or the consumer group's.
    fn records_deleted(&self, deleted: Vec<Deleted>, manual: bool) -> LogError {
        let way_out = if manual {
            "to go on from the partitions' start, accepting the loss, start once with `sluice run \
             --skip-deleted-records`"
                .to_owned()
        } else {
            format!(
                "to go on from the partitions' start, accepting the loss, stop the group's instances and move \
                 its offsets there (`kafka-consumer-groups.sh --bootstrap-server ... --group {} --topic {} \
                 --reset-offsets --to-earliest --execute`)",
                self.group, self.topic
            )
        };
        LogError::RecordsDeleted { topic: self.topic.clone(), deleted, way_out }
    }

    /// After an offset-out-of-range error (`e`): which assigned partitions the consumer stands
    /// outside of, from its positions (or, where it has handed nothing yet, the offsets it was
    /// assigned at or the group's committed ones) and the partitions' watermarks.
    fn out_of_range(&self, e: &rdkafka::error::KafkaError) -> LogError {
        let timeout = Duration::from_secs(10);
        // Assigned by hand (the embedded store's positions), or a member of the group.
        let manual = self.inner.subscription().map_or(true, |s| s.count() == 0);
        let found = (|| -> rdkafka::error::KafkaResult<Outside> {
            let assignment = self.inner.assignment()?;
            let positions = self.inner.position()?;
            let committed = if manual { None } else { Some(self.inner.committed(timeout)?) };
            let assigned_at = self.assigned_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let offset_in = |tpl: &TopicPartitionList, p: i32| match tpl.find_partition(&self.topic, p)?.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let (mut deleted, mut ahead) = (Vec::new(), None);
            for e in assignment.elements_for_topic(&self.topic) {
                let p = e.partition();
                let position = offset_in(&positions, p)
                    .or_else(|| assigned_at.get(&p).copied())
                    .or_else(|| committed.as_ref().and_then(|c| offset_in(c, p)));
                let Some(position) = position else { continue };
                let (low, high) = self.inner.fetch_watermarks(&self.topic, p, timeout)?;
                if position < low {
                    deleted.push(Deleted { partition: p, position, start: low });
                } else if position > high {
                    ahead = Some((p, position, high));
                }
            }
            Ok(Outside { deleted, ahead })
        })();
        match found {
            Ok(Outside { deleted, .. }) if !deleted.is_empty() => self.records_deleted(deleted, manual),
            Ok(Outside { ahead: Some((partition, store, high)), .. }) => {
                LogError::OffsetAhead { topic: self.topic.clone(), partition, store, high }
            }
            other => {
                let detail = match other {
                    Err(lookup) => format!(" (the positions could not be read: {lookup})"),
                    Ok(_) => String::new(),
                };
                LogError::Kafka(KafkaError::Read {
                    topic: self.topic.clone(),
                    reason: format!("{e}: a position outside a partition's range{detail}"),
                })
            }
        }
    }

    /// Polls up to `max` records into `out`, waiting at most `timeout` for the first one.
    ///
    /// # Errors
    /// [`LogError::RecordsDeleted`] when a partition no longer holds the records the consumer was
    /// to read next (retention deleted them), [`LogError::OffsetAhead`] when its position is past the
    /// partition's end. Other consumer errors are logged and counted in the outcome; librdkafka
    /// retries them.
    pub fn poll_into(&self, out: &mut Polled, max: usize, timeout: Duration) -> Result<PollOutcome, LogError> {
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
                Some(Err(e))
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
                    ) =>
                {
                    return Err(self.out_of_range(&e));
                }
                Some(Err(e)) => {
                    outcome.errors += 1;
                    tracing::warn!(error = %e, "consumer error");
                }
            }
            // Only the first poll waits; the rest take what is already fetched.
            wait = Duration::ZERO;
        }
        Ok(outcome)
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
