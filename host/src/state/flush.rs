//! What one flush makes durable together, and the hook through which it is
//! published elsewhere first (the cluster's changelog) — so the state layer
//! never needs to know about the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cache::State;
use super::store::{AggregationCounters, StateStore};

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

/// Publishes a flush before it is written locally (in cluster mode, the
/// changelog and commit records). Called on the writer thread, one flush at
/// a time; the flush is written only once this returns `Ok`, with the
/// commits it returns.
pub trait FlushPublisher: Send + Sync {
    fn publish_flush(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError>;
}
