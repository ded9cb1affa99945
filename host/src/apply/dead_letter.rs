//! The dead-letter sink: records a plugin rejected go to a Kafka topic, with
//! headers that say which aggregation rejected them, why, and where they came
//! from.
//!
//! Delivery is at least once: the pipeline waits for the broker to
//! acknowledge every dead letter of a batch before it writes the batch's
//! state and offsets. A crash in between re-applies the batch after the
//! restart, so the same record may be dead-lettered twice, but never lost.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::DeadLetterConfig;
use crate::kafka::{
    ClientProperties, DeliveryContext, PRODUCER_DEFAULTS, Unacknowledged,
    create_client_with_context, deliver_all, send_patiently,
};
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
    /// Set when the letter would not fit the producer's
    /// `message.max.bytes`: the original value's length in bytes (the
    /// value is cut to fit; the record's own headers are dropped too if
    /// they alone do not fit).
    pub const TRUNCATED: &str = "wagg.truncated";
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room kept for the record framing librdkafka counts beside key, value
/// and headers.
const FRAMING_BYTES: usize = 1024;

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
    /// The largest letter the producer accepts (`message.max.bytes`).
    max_letter_bytes: usize,
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
        let client_config = client.client_config(PRODUCER_DEFAULTS);
        let max_letter_bytes = client_config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let producer = create_client_with_context(
            &client_config,
            DeliveryContext::new("dead-letter producer", status),
        )
        .context("creating the dead-letter producer (check `[dead_letter.kafka]`)")?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
            max_letter_bytes,
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
        deliver_all(
            &self.producer,
            letters.len(),
            shutdown,
            "dead-letter delivery",
            |index| self.send(&letters[index], index, shutdown),
        )
        .map_err(|failure| match failure {
            Unacknowledged::Permanent { error, .. } => DeadLetterError::Permanent {
                topic: self.topic.clone(),
                error,
            },
            Unacknowledged::Interrupted { undelivered } => {
                DeadLetterError::Interrupted { undelivered }
            }
        })
    }

    // The record, its headers (the failure's context) and the retry on
    // a full queue; building headers inline keeps their names in one place.
    fn send(
        &self,
        letter: &DeadLetter<'_>,
        index: usize,
        shutdown: &AtomicBool,
    ) -> Result<(), Unacknowledged> {
        let record = letter.record;
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let context = [
            (headers::AGGREGATION, letter.aggregation.as_str()),
            (headers::PLUGIN, letter.plugin.as_str()),
            (headers::PLUGIN_VERSION, letter.plugin_version.as_str()),
            (headers::ERROR, letter.error.as_str()),
            (headers::SOURCE_TOPIC, &record.topic),
            (headers::SOURCE_PARTITION, &partition),
            (headers::SOURCE_OFFSET, &offset),
        ];
        let fit = fit_letter(record, &context, self.max_letter_bytes);
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + context.len() + 1);
        let own_headers = if fit.keep_headers {
            &record.headers[..]
        } else {
            &[]
        };
        for (key, value) in own_headers {
            headers = headers.insert(Header {
                key,
                value: value.as_ref(),
            });
        }
        let truncated = fit.truncated_from.map(|len| len.to_string());
        let truncated = truncated.as_deref().map(|len| (headers::TRUNCATED, len));
        for (key, value) in context.into_iter().chain(truncated) {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut message = BaseRecord::with_opaque_to(&self.topic, index).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        if let Some(value) = fit.value {
            message = message.payload(value);
        }
        if let Some(timestamp) = record.timestamp {
            message = message.timestamp(timestamp);
        }
        send_patiently(&self.producer, message, shutdown)
    }
}

/// What of a rejected record goes into its letter.
struct Fit<'r> {
    value: Option<&'r [u8]>,
    keep_headers: bool,
    /// The original value's length, when it was cut.
    truncated_from: Option<usize>,
}

/// Cuts a letter to `max_bytes` (key, value and headers, as librdkafka
/// counts them): first the value, then the record's own headers. A letter
/// that does not fit would fail to produce and stop consumption.
fn fit_letter<'r>(record: &'r SourceRecord, context: &[(&str, &str)], max_bytes: usize) -> Fit<'r> {
    let header_bytes = |headers: &mut dyn Iterator<Item = (usize, usize)>| -> usize {
        headers.map(|(name, value)| name + value).sum()
    };
    let own = header_bytes(
        &mut record
            .headers
            .iter()
            .map(|(n, v)| (n.len(), v.as_ref().map_or(0, Vec::len))),
    );
    let ours = header_bytes(&mut context.iter().map(|(n, v)| (n.len(), v.len())));
    // Room for the `wagg.truncated` header itself.
    let fixed = record.key.as_ref().map_or(0, Vec::len) + ours + FRAMING_BYTES + 64;
    let value = record.value.as_deref();
    let value_len = value.map_or(0, <[u8]>::len);
    if fixed + own + value_len <= max_bytes {
        return Fit {
            value,
            keep_headers: true,
            truncated_from: None,
        };
    }
    let keep_headers = fixed + own <= max_bytes;
    let room = max_bytes.saturating_sub(fixed + if keep_headers { own } else { 0 });
    Fit {
        value: value.map(|v| &v[..v.len().min(room)]),
        keep_headers,
        truncated_from: Some(value_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: usize, value: usize, header: usize) -> SourceRecord {
        SourceRecord {
            topic: "events".into(),
            key: Some(vec![b'k'; key]),
            value: Some(vec![b'v'; value]),
            headers: vec![("h".to_owned(), Some(vec![b'h'; header]))],
            ..SourceRecord::default()
        }
    }

    fn letter_bytes(record: &SourceRecord, context: &[(&str, &str)], fit: &Fit<'_>) -> usize {
        let own: usize = if fit.keep_headers {
            record
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.as_ref().map_or(0, Vec::len))
                .sum()
        } else {
            0
        };
        let ours: usize = context.iter().map(|(n, v)| n.len() + v.len()).sum();
        let truncated = fit
            .truncated_from
            .map_or(0, |n| headers::TRUNCATED.len() + n.to_string().len());
        record.key.as_ref().map_or(0, Vec::len)
            + fit.value.map_or(0, <[u8]>::len)
            + own
            + ours
            + truncated
    }

    #[test]
    fn a_letter_that_fits_is_sent_whole_and_a_larger_one_is_cut_to_fit() {
        let context = [(headers::ERROR, "boom"), (headers::SOURCE_TOPIC, "events")];
        let max = 100_000;
        let small = record(10, 1_000, 10);
        let fit = fit_letter(&small, &context, max);
        assert_eq!(fit.value.map(<[u8]>::len), Some(1_000));
        assert!(fit.keep_headers && fit.truncated_from.is_none());

        let big = record(10, 5_000_000, 10);
        let fit = fit_letter(&big, &context, max);
        assert_eq!(fit.truncated_from, Some(5_000_000));
        assert!(fit.keep_headers);
        assert!(letter_bytes(&big, &context, &fit) + FRAMING_BYTES <= max);
        assert!(
            fit.value.map_or(0, <[u8]>::len) > max / 2,
            "cut no more than needed"
        );

        // Headers alone over the limit: they go too.
        let noisy = record(10, 1_000, 200_000);
        let fit = fit_letter(&noisy, &context, max);
        assert!(!fit.keep_headers);
        assert_eq!(fit.value.map(<[u8]>::len), Some(1_000));
        assert!(letter_bytes(&noisy, &context, &fit) + FRAMING_BYTES <= max);
    }
}
