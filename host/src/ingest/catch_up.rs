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
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{create_client, read_headers};
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

/// The consumer that re-reads partitions (created on first use).
pub(super) struct CatchUpReader {
    config: ClientConfig,
    consumer: Option<BaseConsumer>,
    topic_names: HashMap<String, Arc<str>>,
    /// Partitions being re-read → their live offset.
    live: HashMap<(Arc<str>, i32), i64>,
    /// Partitions being re-read → the next offset to read (to re-assign
    /// the rest when one starts or stops: a consumer outside a group
    /// cannot change its assignment incrementally).
    next: HashMap<(Arc<str>, i32), i64>,
    last_position_check: Instant,
}

/// How often the re-reader's positions are compared with the live offsets
/// when no record says so (a live offset at the end of the partition).
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

    /// Starts or stops re-reading a partition. A partition with nothing to
    /// re-read has reached its live offset at once.
    pub(super) fn change(&mut self, change: CatchUpChange) -> anyhow::Result<Option<Reached>> {
        match change {
            CatchUpChange::Start {
                topic,
                partition,
                from,
                live,
            } => {
                let topic = self.topic(&topic);
                if from >= live {
                    return Ok(Some(Reached {
                        topic,
                        partition,
                        at: live,
                    }));
                }
                if self.consumer.is_none() {
                    self.consumer = Some(
                        create_client(&self.config)
                            .map_err(|e| anyhow::anyhow!("creating the catch-up consumer: {e}"))?,
                    );
                }
                tracing::info!(%topic, partition, from, live, "re-reading the partition for the aggregations catching up on it");
                self.live.insert((topic.clone(), partition), live);
                self.next.insert((topic, partition), from);
                self.reassign()?;
                Ok(None)
            }
            CatchUpChange::Stop { topic, partition } => {
                let topic = self.topic(&topic);
                self.stop(&topic, partition);
                Ok(None)
            }
        }
    }

    fn stop(&mut self, topic: &Arc<str>, partition: i32) {
        if self.live.remove(&(topic.clone(), partition)).is_some() {
            self.next.remove(&(topic.clone(), partition));
            self.reassign_or_log();
        }
    }

    /// Assigns the partitions being re-read, each at its next offset.
    fn reassign(&self) -> anyhow::Result<()> {
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| anyhow::anyhow!("assigning the partitions to re-read: {e}"))
    }

    fn reassign_or_log(&self) {
        if let Err(e) = self.reassign() {
            tracing::error!(error = %e, "re-reading for the aggregations catching up");
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
        let mut end_of_partition = false;
        let mut wait = timeout;
        while records.len() < max_records && !self.live.is_empty() {
            let message = match consumer.poll(wait) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    end_of_partition = true;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "catch-up consume error");
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
                records.push(SourceRecord {
                    topic,
                    partition,
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    timestamp: message.timestamp().to_millis(),
                    headers: read_headers(&message),
                });
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
        if !reached.is_empty() {
            for done in &reached {
                self.next.remove(&(done.topic.clone(), done.partition));
            }
            self.reassign_or_log();
        }
        if end_of_partition || self.last_position_check.elapsed() >= POSITION_CHECK {
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
                self.stop(&topic, partition);
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

/// The source's shared name of a topic.
fn interned(names: &HashMap<String, Arc<str>>, name: &str) -> Arc<str> {
    names.get(name).cloned().unwrap_or_else(|| Arc::from(name))
}
