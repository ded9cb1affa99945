//! What one flush makes durable together, and the hook through which it is
//! published elsewhere first (the cluster's changelog) — so the state layer
//! never needs to know about the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cache::State;
use super::store::{AggregationCounters, Slot, StateStore};

/// The next offset of each partition a flush covers.
pub type FlushOffsets = BTreeMap<(Arc<str>, i32), i64>;

/// The own next offset of aggregations catching up on a partition
/// (`None`: caught up, it follows the partition's offset again), by
/// (topic, partition, aggregation).
pub type CatchUpOffsets = BTreeMap<(Arc<str>, i32, String), Option<i64>>;

/// Stream times of a windowed aggregation: ((topic, partition), time).
pub type StreamTimes = Vec<((Arc<str>, i32), i64)>;

/// Everything one flush makes durable together.
#[derive(Debug)]
pub struct FlushJob {
    pub aggregations: Vec<FlushedAggregation>,
    /// The next offset of every partition the live records cover.
    pub offsets: FlushOffsets,
    /// The progress of aggregations catching up (see
    /// `state::store::catch_up`).
    pub catch_up: CatchUpOffsets,
    /// The aggregations' changes to produce before the flush is written
    /// (`emit`).
    pub emits: Vec<EmitRecord>,
}

/// A record to produce before its flush is written: a change of an
/// aggregation that emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitRecord {
    pub topic: Arc<str>,
    pub key: Vec<u8>,
    /// `None`: a tombstone (the key was deleted).
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

#[derive(Debug)]
pub struct FlushedAggregation {
    pub name: String,
    /// Encoded store key → newest state (`None`: deleted), each key once.
    pub states: Vec<(Vec<u8>, State)>,
    /// The aggregation's totals including these states.
    pub counters: AggregationCounters,
    /// Windowed: the stream times that moved, per (topic, partition).
    pub stream_times: StreamTimes,
    /// Whether the store keys are window keys.
    pub windowed: bool,
}

/// A partition's commit (its owner's epoch and the flush's sequence number
/// in it), written with the flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCommit {
    pub topic_id: u16,
    pub partition: i32,
    pub epoch: u64,
    pub seq: u64,
}

/// An error of a [`FlushPublisher`], kept whole for the log.
pub type PublishError = Box<dyn std::error::Error + Send + Sync>;

/// Publishes a flush before it is written locally (emitted changes; in
/// cluster mode, the changelog and commit records), and hears when it was
/// written (the change feed). Called on the writer thread, one flush at
/// a time; the flush is written only once this returns `Ok`, with the
/// commits it returns.
pub trait FlushPublisher: Send + Sync {
    fn publish_flush(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError>;

    /// Told once the flush is durable (the change feed's moment).
    fn written(&self, _store: &StateStore, _job: &FlushJob) {}
}

/// Several publishers, one after the other (the flush is written once all
/// of them succeeded); their commits together.
pub struct PublisherChain(pub Vec<Arc<dyn FlushPublisher>>);

impl FlushPublisher for PublisherChain {
    fn publish_flush(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError> {
        let mut commits = Vec::new();
        for publisher in &self.0 {
            commits.append(&mut publisher.publish_flush(store, job)?);
        }
        Ok(commits)
    }

    fn written(&self, store: &StateStore, job: &FlushJob) {
        for publisher in &self.0 {
            publisher.written(store, job);
        }
    }
}

/// The `wagg.flush` identity of each slot's changes in one flush.
pub struct FlushIds<'a> {
    store: &'a StateStore,
    offsets: &'a FlushOffsets,
    catch_up: &'a CatchUpOffsets,
}

impl<'a> FlushIds<'a> {
    pub fn new(
        store: &'a StateStore,
        offsets: &'a FlushOffsets,
        catch_up: &'a CatchUpOffsets,
    ) -> Self {
        Self {
            store,
            offsets,
            catch_up,
        }
    }

    /// `topic/partition@next` for a partition's slot (the aggregation's own
    /// next offset where it is catching up); every partition of the flush
    /// for the re-keyed slot.
    pub fn of(&self, aggregation: &str, slot: Slot) -> String {
        if slot == Slot::REKEYED {
            return self
                .offsets
                .iter()
                .map(|((topic, partition), next)| format!("{topic}/{partition}@{next}"))
                .collect::<Vec<_>>()
                .join(",");
        }
        let topic = self
            .store
            .topic_name(slot.topic_id)
            .unwrap_or_else(|| format!("#{}", slot.topic_id));
        let partition = slot.partition as i32;
        let key = (Arc::<str>::from(topic.as_str()), partition);
        let own = self
            .catch_up
            .get(&(key.0.clone(), partition, aggregation.to_owned()))
            .copied()
            .flatten();
        match own.or_else(|| self.offsets.get(&key).copied()) {
            Some(next) => format!("{topic}/{partition}@{next}"),
            None => format!("{topic}/{partition}"),
        }
    }
}
