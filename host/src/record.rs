//! The record type that flows from sources through the batcher to plugins.

/// One consumed record, owned. Sources (Kafka, the offline runner, the
/// benchmark generator) produce these; plugins see them through the ABI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceRecord {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl SourceRecord {
    pub(crate) fn as_abi(&self) -> wagg_abi::Record<'_> {
        wagg_abi::Record {
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            timestamp: self.timestamp,
            partition: self.partition,
            offset: self.offset,
            headers: wagg_abi::Headers::EMPTY,
        }
    }

    /// `topic/partition@offset`, for messages.
    pub fn position(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }
}
