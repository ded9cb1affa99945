//! Where records come from. The pipeline reads [`SourceRecord`]s from a
//! [`KafkaSource`] (a real cluster, or librdkafka's in-process mock cluster
//! for the demo): the code path is the same either way.

mod catch_up;
pub mod kafka;
mod rebalance;

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use crate::record::SourceRecord;

pub use kafka::KafkaSource;

/// What the source thread hands to the pipeline, in order.
#[derive(Debug)]
pub enum SourceEvent {
    /// Up to `batch.max_records` records in arrival order (each
    /// partition's in offset order).
    Records(Vec<SourceRecord>),
    /// Records of owned partitions read again for the aggregations catching
    /// up on them (each partition's in offset order, all below the
    /// partition's live offset).
    CatchUp(Vec<SourceRecord>),
    /// The re-reading of a partition reached its live offset `at`: its
    /// aggregations catching up have been handed every record before it.
    CaughtUp {
        topic: Arc<str>,
        partition: i32,
        at: i64,
    },
    /// Partitions now owned; their records follow this event.
    Assigned(Vec<(String, i32)>),
    /// Partitions taken away. The consumer holds the rebalance until `done`
    /// is dropped: by then everything applied from them must be written.
    Revoked {
        partitions: Vec<(String, i32)>,
        done: mpsc::Sender<()>,
    },
    /// Consumption cannot go on without skipping or re-reading stored
    /// progress (an offset out of range); the reason, for the operator.
    Failed(String),
}

/// What the pipeline reads its events from and reports back to: the Kafka
/// source thread ([`SourceFeed`]), or a script in tests.
pub trait EventFeed: Send {
    /// The next event; `Err(Disconnected)` when the source is gone.
    fn recv_timeout(&self, timeout: Duration) -> Result<SourceEvent, RecvTimeoutError>;

    /// Has an owned partition re-read from `from` up to (at least) `live`
    /// for aggregations that start catching up on it now.
    fn start_catch_up(&self, topic: &str, partition: i32, from: i64, live: i64);

    /// Tells the group how far this member got (monitoring only).
    fn commit(&self, offsets: &[(&str, i32, i64)]);

    /// Stops the source. Called once, when nothing more will be applied
    /// and what was applied is written.
    fn close(self: Box<Self>);
}
