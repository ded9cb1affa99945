//! The Kafka consumer: a consumer-group member whose partitions start at the
//! offsets stored in the state store (the source of truth), never at the
//! group's committed offsets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, StartFrom};
use crate::record::SourceRecord;
use crate::status::Status;
use crate::store::StateStore;

/// A partition assignment change, reported to the pipeline after the
/// consumer has applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionEvent {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

pub struct SourceContext {
    store: Arc<StateStore>,
    status: Arc<Status>,
    start_from: StartFrom,
    events: Mutex<Vec<PartitionEvent>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1 is librdkafka's internal UA partition; -1001 is "unknown".
                if *partition >= 0 && p.hi_offset >= 0 {
                    self.status
                        .set_high_watermark(topic, *partition, p.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        self.status.broker_error(format!("{error}: {reason}"));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }
}

/// librdkafka's log lines, through `tracing` at the matching level.
pub fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", fac, "{log_message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
        _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = match self.store.offsets() {
                    Ok(offsets) => offsets,
                    Err(e) => {
                        // Without stored offsets we cannot start safely.
                        self.status
                            .set_fatal(format!("reading stored offsets: {e}"));
                        return;
                    }
                };
                for (topic, partition) in &partitions {
                    let offset = match (stored.get(&(topic.clone(), *partition)), self.start_from) {
                        (Some(&next), _) => Offset::Offset(next),
                        (None, StartFrom::Earliest) => Offset::Beginning,
                        (None, StartFrom::Latest) => Offset::End,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(topic, partition, error = %e, "cannot set start offset");
                    }
                    self.status.set_assigned(topic, *partition, true);
                    if let Some(&next) = stored.get(&(topic.clone(), *partition)) {
                        self.status.set_next_offset(topic, *partition, next);
                    }
                }
                tracing::info!(
                    ?partitions,
                    "partitions assigned; starting at stored offsets"
                );
                if let Err(e) = consumer.assign(tpl) {
                    self.status.set_fatal(format!("assigning partitions: {e}"));
                    return;
                }
                self.push(PartitionEvent::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                for (topic, partition) in &partitions {
                    self.status.set_assigned(topic, *partition, false);
                }
                self.push(PartitionEvent::Revoked(partitions));
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

impl SourceContext {
    fn push(&self, event: PartitionEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    topic_names: HashMap<String, Arc<str>>,
}

impl KafkaSource {
    pub fn new(
        config: &Config,
        store: Arc<StateStore>,
        status: Arc<Status>,
    ) -> anyhow::Result<Self> {
        let source = &config.source;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &source.brokers)
            .set("group.id", &source.group_id)
            // Offsets live in the state store, written with the state.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match source.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set("statistics.interval.ms", "1000")
            .set("enable.partition.eof", "false")
            // When wagg is slower than the fetcher (catching up on a
            // backlog), librdkafka pauses a partition whose queue is full
            // for this long; its 1 s default starved the consumer once the
            // queue drained (114 k → 338 k records/s end to end, see
            // BENCHMARKS.md). Overridable in `[source.kafka]`.
            .set("fetch.queue.backoff.ms", "10")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (name, value) in config.kafka_properties() {
            client.set(name, value);
        }
        let context = SourceContext {
            store,
            status,
            start_from: source.start_from,
            events: Mutex::new(Vec::new()),
        };
        // Errors from librdkafka name the property but never echo its value.
        let consumer: BaseConsumer<SourceContext> = client
            .create_with_context(context)
            .context("creating the Kafka consumer (check `source` and `[source.kafka]`)")?;
        let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        Ok(Self {
            consumer,
            topic_names: source
                .topics
                .iter()
                .map(|t| (t.clone(), Arc::<str>::from(t.as_str())))
                .collect(),
        })
    }

    /// The next record, or `None` when none arrived within `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Option<SourceRecord> {
        match self.consumer.poll(timeout)? {
            Ok(message) => {
                let topic = match self.topic_names.get(message.topic()) {
                    Some(topic) => topic.clone(),
                    None => Arc::from(message.topic()),
                };
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                Some(SourceRecord {
                    topic,
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    timestamp: message.timestamp().to_millis(),
                    headers,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                self.consumer.context().status.broker_error(e.to_string());
                None
            }
        }
    }

    /// Assignment changes since the last call.
    pub fn take_events(&self) -> Vec<PartitionEvent> {
        std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Tells the group how far this member got, for monitoring tools; the
    /// state store stays the source of truth.
    pub fn commit(&self, offsets: &[(&str, i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::debug!(error = %e, "cannot build commit list");
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit to the broker failed (monitoring only)");
        }
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.consumer.context().status
    }
}
