//! The dead-letter sink: records a plugin rejected go to a Kafka topic, with
//! headers that say which aggregation rejected them, why, and where they came
//! from.
//!
//! Delivery is at least once: the pipeline waits for the broker to
//! acknowledge every dead letter of a batch before it writes the batch's
//! state and offsets. A crash in between re-applies the batch after the
//! restart, so the same record may be dead-lettered twice, but never lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use crate::config::Config;
use crate::record::SourceRecord;
use crate::status::Status;

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

/// A producer context that reports client errors to `Status` and collects
/// delivery failures by the index the record was sent with (the dead-letter
/// sink's letters; the cluster's changelog producer sends everything as 0).
pub(crate) struct DeliveryContext {
    /// Which producer, in log lines and on `/readyz`.
    name: &'static str,
    status: Arc<Status>,
    failures: Mutex<Vec<(usize, KafkaError)>>,
    /// Topic → partition → the offset after the last record delivered
    /// (`None`: not tracked).
    delivered: Option<Mutex<DeliveredEnds>>,
}

/// Topic → partition → the offset after the last record delivered there.
pub(crate) type DeliveredEnds = HashMap<String, HashMap<i32, i64>>;

impl DeliveryContext {
    pub(crate) fn new(name: &'static str, status: Arc<Status>) -> Self {
        Self {
            name,
            status,
            failures: Mutex::new(Vec::new()),
            delivered: None,
        }
    }

    /// Also keeps where delivered records landed (see `take_delivered`).
    pub(crate) fn tracking_offsets(mut self) -> Self {
        self.delivered = Some(Mutex::new(HashMap::new()));
        self
    }

    /// The failures reported since the last call.
    pub(crate) fn take_failures(&self) -> Vec<(usize, KafkaError)> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Where the records delivered since the last call end, per topic and
    /// partition (empty unless `tracking_offsets`).
    pub(crate) fn take_delivered(&self) -> DeliveredEnds {
        self.delivered
            .as_ref()
            .map_or_else(HashMap::new, |delivered| {
                std::mem::take(&mut *delivered.lock().unwrap_or_else(|p| p.into_inner()))
            })
    }
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, producer = self.name, "producer error");
        self.status
            .broker_error(format!("{}: {error}: {reason}", self.name));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::source::log_librdkafka(level, fac, log_message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        match result {
            Err((error, _)) => self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, error.clone())),
            Ok(message) => {
                let Some(delivered) = &self.delivered else {
                    return;
                };
                let mut delivered = delivered.lock().unwrap_or_else(|p| p.into_inner());
                let end = message.offset() + 1;
                let partitions = match delivered.get_mut(message.topic()) {
                    Some(partitions) => partitions,
                    None => delivered.entry(message.topic().to_owned()).or_default(),
                };
                let slot = partitions.entry(message.partition()).or_insert(end);
                *slot = (*slot).max(end);
            }
        }
    }
}

pub struct DeadLetterSink {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
}

/// Errors a later attempt may get past: the broker is away or slow.
pub(crate) fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageTimedOut
                | AllBrokersDown
                | BrokerTransportFailure
                | RequestTimedOut
                | NetworkException
                | LeaderNotAvailable
                | NotLeaderForPartition
                | NotEnoughReplicas
                | NotEnoughReplicasAfterAppend
                | QueueFull
                | OperationTimedOut
                | Resolve
        )
    )
}

impl DeadLetterSink {
    /// `None` when no `[dead_letter]` section is configured.
    pub fn from_config(config: &Config, status: Arc<Status>) -> anyhow::Result<Option<Self>> {
        let Some(dead_letter) = &config.dead_letter else {
            return Ok(None);
        };
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.source.brokers)
            // Retries inside librdkafka must not duplicate letters.
            .set("enable.idempotence", "true")
            // Surface an outage to the retry loop (and /readyz) after 30 s
            // rather than librdkafka's default of five minutes.
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (name, value) in config.dead_letter_properties() {
            client.set(name, value);
        }
        let producer = client
            .create_with_context(DeliveryContext::new("dead-letter producer", status))
            .context("creating the dead-letter producer (check `[dead_letter.kafka]`)")?;
        Ok(Some(Self {
            producer,
            topic: dead_letter.topic.clone(),
        }))
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
                    .status
                    .broker_error(format!("dead-letter delivery: {error}"));
                sleep_unless(shutdown, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        Ok(())
    }

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
