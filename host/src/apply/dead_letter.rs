//! The dead-letter sink: records a plugin rejected go to a Kafka topic, with
//! headers that say which aggregation rejected them, why, and where they came
//! from.
//!
//! Delivery is at least once: the pipeline waits for the broker to
//! acknowledge every dead letter of a batch before it writes the batch's
//! state and offsets. A crash in between re-applies the batch after the
//! restart, so the same record may be dead-lettered twice, but never lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::DeadLetterConfig;
use crate::kafka::{ClientProperties, DeliveryContext, PRODUCER_DEFAULTS, is_transient};
use crate::ops::status::Status;
use crate::record::SourceRecord;

/// Header names on every dead letter.
pub mod headers {
    pub const AGGREGATION: &str = "wagg.aggregation";
    pub const PLUGIN: &str = "wagg.plugin";
    pub const PLUGIN_VERSION: &str = "wagg.plugin.version";
    pub const ERROR: &str = "wagg.error";
    pub const SOURCE_TOPIC: &str = "wagg.source.topic";
    pub const SOURCE_PARTITION: &str = "wagg.source.partition";
    pub const SOURCE_OFFSET: &str = "wagg.source.offset";
}

/// A record one aggregation rejected.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub aggregation: String,
    pub plugin: String,
    pub plugin_version: String,
    pub error: String,
    pub record: &'a SourceRecord,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter topic {topic:?}: {error} (not retried: fix the topic or its permissions)")]
    Permanent { topic: String, error: KafkaError },
    #[error(
        "shutting down with {undelivered} dead letter(s) unacknowledged; their batch is applied again after the restart"
    )]
    Interrupted { undelivered: usize },
    #[error("on_error = \"dead-letter\" but no `[dead_letter]` topic is configured")]
    NotConfigured,
}

pub struct DeadLetterSink {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
}

impl DeadLetterSink {
    /// A producer to `[dead_letter].topic`; `client` holds the security
    /// settings of `[source.kafka]` (the same cluster, the same
    /// credentials), then `[dead_letter.kafka]`.
    pub fn new(
        config: &DeadLetterConfig,
        client: &ClientProperties,
        status: Arc<Status>,
    ) -> anyhow::Result<Self> {
        let producer = client
            .client_config(PRODUCER_DEFAULTS)
            .create_with_context(DeliveryContext::new("dead-letter producer", status))
            .context("creating the dead-letter producer (check `[dead_letter.kafka]`)")?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Refuses to start against a broker that says the topic does not
    /// exist; an unreachable broker is only a warning (the outage may end).
    pub fn check_topic(&self, timeout: Duration) -> anyhow::Result<()> {
        match self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
        {
            Ok(metadata) => {
                let topic = metadata.topics().iter().find(|t| t.name() == self.topic);
                match topic {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                    _ => anyhow::bail!(
                        "the dead-letter topic {:?} (`dead_letter.topic`) does not exist on the broker; create it first",
                        self.topic
                    ),
                }
            }
            Err(error) => {
                tracing::warn!(topic = %self.topic, %error, "cannot check the dead-letter topic yet");
                Ok(())
            }
        }
    }

    /// Sends every letter and returns once the broker has acknowledged all
    /// of them. Transient failures are retried until `shutdown`.
    pub fn deliver(
        &self,
        letters: &[DeadLetter<'_>],
        shutdown: &AtomicBool,
    ) -> Result<(), DeadLetterError> {
        let mut pending: Vec<usize> = (0..letters.len()).collect();
        let mut backoff = Duration::from_millis(200);
        while !pending.is_empty() {
            for &index in &pending {
                self.send(&letters[index], index, shutdown)?;
            }
            while self.producer.in_flight_count() > 0 {
                if shutdown.load(Ordering::Relaxed) {
                    return Err(DeadLetterError::Interrupted {
                        undelivered: self.producer.in_flight_count().max(0) as usize,
                    });
                }
                // Flush returns early once everything is acknowledged.
                let _ = self.producer.flush(Duration::from_millis(200));
            }
            let failures = self.producer.context().take_failures();
            if let Some((_, error)) = failures.iter().find(|(_, e)| !is_transient(e)) {
                return Err(DeadLetterError::Permanent {
                    topic: self.topic.clone(),
                    error: error.clone(),
                });
            }
            pending = failures.iter().map(|(index, _)| *index).collect();
            if let Some((_, error)) = failures.first() {
                tracing::warn!(%error, undelivered = pending.len(), "dead letters not delivered; retrying");
                self.producer
                    .context()
                    .status()
                    .broker_error(format!("dead-letter delivery: {error}"));
                sleep_unless(shutdown, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        Ok(())
    }

    // The record, its headers (the failure's context) and the retry on
    // a full queue; building headers inline keeps their names in one place.
    fn send(
        &self,
        letter: &DeadLetter<'_>,
        index: usize,
        shutdown: &AtomicBool,
    ) -> Result<(), DeadLetterError> {
        let record = letter.record;
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 7);
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_ref(),
            });
        }
        for (key, value) in [
            (headers::AGGREGATION, letter.aggregation.as_str()),
            (headers::PLUGIN, letter.plugin.as_str()),
            (headers::PLUGIN_VERSION, letter.plugin_version.as_str()),
            (headers::ERROR, letter.error.as_str()),
            (headers::SOURCE_TOPIC, &record.topic),
            (headers::SOURCE_PARTITION, &partition),
            (headers::SOURCE_OFFSET, &offset),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut message = BaseRecord::with_opaque_to(&self.topic, index).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        if let Some(value) = &record.value {
            message = message.payload(value);
        }
        if let Some(timestamp) = record.timestamp {
            message = message.timestamp(timestamp);
        }
        loop {
            match self.producer.send(message) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    if shutdown.load(Ordering::Relaxed) {
                        return Err(DeadLetterError::Interrupted {
                            undelivered: self.producer.in_flight_count().max(0) as usize + 1,
                        });
                    }
                    message = returned;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((error, _)) => {
                    return Err(DeadLetterError::Permanent {
                        topic: self.topic.clone(),
                        error,
                    });
                }
            }
        }
    }
}

fn sleep_unless(shutdown: &AtomicBool, duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
