//! Re-reading partitions for aggregations that are catching up (added to,
//! or reset on, a store that has consumed the partitions already).
//!
//! The source thread owns one more consumer, outside the group, assigned
//! by hand to the partitions that have such aggregations, from the lowest
//! of their own next offsets. It hands the pipeline every record below the
//! partition's *live offset* — the next record the group consumer hands on
//! for it — and, once it reaches that offset, says so and lets the
//! partition go: from then on those aggregations take the live records. The
//! pipeline applies re-read records only to the aggregations catching up
//! (each from its own offset) and live records only to the others, so the
//! aggregations that are current go on live meanwhile.
//!
//! Both kinds of record reach the pipeline through the same channel, in
//! the order the source thread handed them on: when the pipeline hears that
//! a partition's re-reading reached offset `at`, it has applied every live
//! record below `at` to the current aggregations and every re-read one to
//! those catching up — so the hand-over neither skips nor repeats a record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::kafka::{interned, record_of};
use crate::kafka::create_client;
use crate::record::SourceRecord;

/// What the rebalance callback tells the re-reader.
#[derive(Debug)]
pub(super) enum CatchUpChange {
    /// The partition is now owned, and some of its aggregations are behind
    /// its live offset `live`: re-read it from `from`.
    Start {
        topic: String,
        partition: i32,
        from: i64,
        live: i64,
    },
    /// The partition is no longer owned.
    Stop { topic: String, partition: i32 },
}

/// A partition's re-reading reached its live offset.
#[derive(Debug)]
pub(super) struct Reached {
    pub topic: Arc<str>,
    pub partition: i32,
    pub at: i64,
}

/// The consumer that re-reads partitions (a new one whenever the partitions
/// to re-read change; none while there are none).
pub(super) struct CatchUpReader {
    config: ClientConfig,
    consumer: Option<BaseConsumer>,
    topic_names: HashMap<String, Arc<str>>,
    /// Partitions being re-read → their live offset.
    live: HashMap<(Arc<str>, i32), i64>,
    /// Partitions being re-read → the next offset to read (where the next
    /// consumer starts them when the partitions change).
    next: HashMap<(Arc<str>, i32), i64>,
    last_position_check: Instant,
}

/// How often the re-reader's positions are compared with the live offsets
/// when no record says so (a live offset at the end of the partition, where
/// no record comes).
const POSITION_CHECK: Duration = Duration::from_millis(500);

impl CatchUpReader {
    pub(super) fn new(config: ClientConfig, topic_names: HashMap<String, Arc<str>>) -> Self {
        Self {
            config,
            consumer: None,
            topic_names,
            live: HashMap::new(),
            next: HashMap::new(),
            last_position_check: Instant::now(),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.live.is_empty()
    }

    fn topic(&self, name: &str) -> Arc<str> {
        interned(&self.topic_names, name)
    }

    /// Starts and stops re-reading partitions, then assigns them once.
    /// Partitions with nothing to re-read have reached their live
    /// offset at once.
    pub(super) fn apply(&mut self, changes: Vec<CatchUpChange>) -> anyhow::Result<Vec<Reached>> {
        let mut reached = Vec::new();
        let mut changed = false;
        for change in changes {
            match change {
                CatchUpChange::Start {
                    topic,
                    partition,
                    from,
                    live,
                } => {
                    let key = (self.topic(&topic), partition);
                    // Already being re-read (for another aggregation): from
                    // the lower offset to the higher live one; its `Reached`
                    // is the one every aggregation there waits for.
                    let being_read = self.live.contains_key(&key);
                    let live = self.live.get(&key).map_or(live, |&l| l.max(live));
                    let from = self.next.get(&key).map_or(from, |&n| n.min(from));
                    if !being_read && from >= live {
                        reached.push(Reached {
                            topic: key.0,
                            partition,
                            at: live,
                        });
                        continue;
                    }
                    tracing::info!(topic = %key.0, partition, from, live, "re-reading the partition for the aggregations catching up on it");
                    self.live.insert(key.clone(), live);
                    self.next.insert(key, from);
                    changed = true;
                }
                CatchUpChange::Stop { topic, partition } => {
                    let key = (self.topic(&topic), partition);
                    self.next.remove(&key);
                    changed |= self.live.remove(&key).is_some();
                }
            }
        }
        if changed {
            self.assign()?;
        }
        Ok(reached)
    }

    /// Assigns the partitions being re-read, each at its next offset, to a
    /// new consumer. A consumer is assigned once and never changes its
    /// assignment: librdkafka (2.12 to 2.15, issue #5573) can queue two
    /// stops for one partition when an assignment changes while an earlier
    /// change is still stopping partitions, and then aborts the process on
    /// an assertion — seen here with a few assignments in a row.
    fn assign(&mut self) -> anyhow::Result<()> {
        self.consumer = None;
        if self.next.is_empty() {
            return Ok(());
        }
        let consumer: BaseConsumer = create_client(&self.config)
            .map_err(|e| anyhow::anyhow!("creating the catch-up consumer: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| anyhow::anyhow!("assigning the partitions to re-read: {e}"))?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Lets go of a partition whose re-reading is done: paused, not
    /// unassigned (see `assign`); the next consumer leaves it out.
    fn let_go(&mut self, topic: &Arc<str>, partition: i32) {
        self.live.remove(&(topic.clone(), partition));
        self.next.remove(&(topic.clone(), partition));
        if let Some(consumer) = &self.consumer {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::debug!(%topic, partition, error = %e, "pausing a re-read partition");
            }
        }
    }

    /// The live records handed on so far reach these offsets.
    pub(super) fn live_moved(&mut self, batch: &[SourceRecord]) {
        if self.live.is_empty() {
            return;
        }
        for run in batch.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
            if let Some(live) = self.live.get_mut(&(run[0].topic.clone(), run[0].partition)) {
                let last = run.iter().map(|r| r.offset).max().unwrap_or(*live - 1);
                *live = (*live).max(last + 1);
            }
        }
    }

    /// Up to `max_records` re-read records below their partitions' live
    /// offsets, waiting at most `timeout` for the first, and the partitions
    /// whose re-reading reached the live offset (let go of).
    pub(super) fn read(
        &mut self,
        max_records: usize,
        timeout: Duration,
    ) -> (Vec<SourceRecord>, Vec<Reached>) {
        let mut records = Vec::new();
        let mut reached = Vec::new();
        let Some(consumer) = &self.consumer else {
            return (records, reached);
        };
        let mut wait = timeout;
        while records.len() < max_records && !self.live.is_empty() {
            let message = match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    let line = format!("catch-up consume error {e}");
                    if let Some(repeated) = crate::kafka::REPEATS.admit(&line) {
                        tracing::warn!(error = %e, repeated, "catch-up consume error");
                    }
                    break;
                }
                Some(Ok(message)) => message,
            };
            wait = Duration::ZERO;
            let topic = interned(&self.topic_names, message.topic());
            let partition = message.partition();
            let Some(&live) = self.live.get(&(topic.clone(), partition)) else {
                continue; // let go of already
            };
            if message.offset() < live {
                self.next
                    .insert((topic.clone(), partition), message.offset() + 1);
                records.push(record_of(&message, topic));
            } else {
                // Let go of below, once the poll loop is done with the
                // consumer.
                self.live.remove(&(topic.clone(), partition));
                reached.push(Reached {
                    topic,
                    partition,
                    at: live,
                });
            }
        }
        for done in &reached {
            self.let_go(&done.topic, done.partition);
        }
        if self.last_position_check.elapsed() >= POSITION_CHECK {
            reached.extend(self.at_live_offset());
        }
        (records, reached)
    }

    /// Partitions whose re-reading position reached the live offset (read
    /// to the end of the partition, where no record says so); let go of.
    fn at_live_offset(&mut self) -> Vec<Reached> {
        self.last_position_check = Instant::now();
        let Some(positions) = self.consumer.as_ref().and_then(|c| c.position().ok()) else {
            return Vec::new();
        };
        let mut reached = Vec::new();
        for element in positions.elements() {
            let topic = self.topic(element.topic());
            let partition = element.partition();
            let (Offset::Offset(position), Some(&live)) =
                (element.offset(), self.live.get(&(topic.clone(), partition)))
            else {
                continue;
            };
            if position >= live {
                self.let_go(&topic, partition);
                reached.push(Reached {
                    topic,
                    partition,
                    at: live,
                });
            }
        }
        reached
    }
}
