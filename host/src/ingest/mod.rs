//! Where records come from. The pipeline reads [`SourceRecord`]s from a
//! [`KafkaSource`] (a real cluster, or librdkafka's in-process mock cluster
//! for the demo): the code path is the same either way.

pub mod kafka;
mod rebalance;

pub use kafka::{KafkaSource, SourceEvent, SourceFeed};
