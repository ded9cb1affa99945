//! Emitted changes (`emit = { topic = ... }`): after each flush, one record
//! per key whose state changed in it goes to the aggregation's emit topic,
//! produced and acknowledged before the flush is written locally.
//!
//! Delivery is at least once, in order per key: records are keyed by the
//! aggregation key (the default partitioner keeps a key on one partition),
//! a flush's records are acknowledged before the next flush is produced
//! (one flush in flight), and the producer is idempotent. A crash between
//! the acknowledgement and the local write applies the flush's records
//! again after the restart, and the same changes are emitted again, with
//! the same `wagg.flush` header: the source partition and the next offset
//! written with the flush, which identify it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::aggregation::Aggregation;
use crate::config::{EmitFormat, EmitMode};
use crate::kafka::{
    ClientProperties, DeliveryContext, PRODUCER_DEFAULTS, Unacknowledged,
    create_client_with_context, deliver_all, send_patiently,
};
use crate::ops::status::Status;
use crate::state::cache::State;
use crate::state::flush::{
    EmitRecord, FlushIds, FlushJob, FlushPublisher, PartitionCommit, PublishError,
};
use crate::state::store::{Slot, StateStore, StoreError, split_window_key};

/// Header names of emitted records.
pub mod headers {
    pub const AGGREGATION: &str = "wagg.aggregation";
    /// The flush that produced the record: `topic/partition@next-offset`
    /// of the key's source partition (re-keyed aggregations: of every
    /// partition the flush covers, comma-separated).
    pub const FLUSH: &str = "wagg.flush";
    /// Windowed aggregations: the window, ms since the Unix epoch.
    pub const WINDOW_START: &str = "wagg.window.start";
    pub const WINDOW_END: &str = "wagg.window.end";
}

/// The producer of every aggregation's emitted changes.
pub struct EmitSink {
    producer: BaseProducer<DeliveryContext>,
    shutdown: Arc<AtomicBool>,
}

impl EmitSink {
    /// A producer with the security settings of `[source.kafka]`, then
    /// `[emit.kafka]` (`client`); transient failures are retried until
    /// `shutdown`.
    pub fn new(
        client: &ClientProperties,
        status: Arc<Status>,
        shutdown: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let producer = create_client_with_context(
            &client.client_config(PRODUCER_DEFAULTS),
            DeliveryContext::new("emit producer", status),
        )
        .context("creating the producer of emitted changes (check `[emit.kafka]`)")?;
        Ok(Self { producer, shutdown })
    }

    /// Refuses to start against a broker that says a topic does not exist;
    /// an unreachable broker is only a warning (the outage may end).
    pub fn check_topics(&self, topics: &[&str], timeout: Duration) -> anyhow::Result<()> {
        for &topic in topics {
            match self.producer.client().fetch_metadata(Some(topic), timeout) {
                Ok(metadata) => {
                    let found = metadata.topics().iter().find(|t| t.name() == topic);
                    if !found.is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()) {
                        anyhow::bail!(
                            "the emit topic {topic:?} (`emit.topic`) does not exist on the broker; create it first"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(topic, %error, "cannot check the emit topic yet");
                }
            }
        }
        Ok(())
    }

    /// Produces `records` and returns once the broker has acknowledged
    /// all of them; transient failures are retried until shutdown.
    fn deliver(&self, records: &[EmitRecord]) -> Result<(), PublishError> {
        deliver_all(&self.producer, records.len(), &self.shutdown, "emit", |index| {
            self.send(&records[index], index)
        })
        .map_err(|failure| match failure {
            Unacknowledged::Permanent { index, error } => format!(
                "emit topic {:?}: {error} (not retried: fix the topic or its permissions)",
                records[index].topic
            )
            .into(),
            Unacknowledged::Interrupted { undelivered } => format!(
                "shutting down with {undelivered} emitted change(s) unacknowledged; the flush is applied and emitted again after the restart"
            )
            .into(),
        })
    }

    fn send(&self, record: &EmitRecord, index: usize) -> Result<(), Unacknowledged> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            });
        }
        let mut message = BaseRecord::with_opaque_to(&record.topic, index)
            .key(&record.key)
            .headers(headers);
        if let Some(value) = &record.value {
            message = message.payload(value);
        }
        send_patiently(&self.producer, message, &self.shutdown)
    }
}

impl FlushPublisher for EmitSink {
    fn publish_flush(
        &self,
        _store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError> {
        self.deliver(&job.emits)?;
        Ok(Vec::new())
    }
}

/// The records `aggregation` emits for the states of one flush (`states`:
/// store key → newest state, each key once): the key's rendered state (or
/// its bytes), a tombstone for a deleted key (windowed: each changed
/// window's state; deleted windows are not emitted). A state the plugin
/// cannot render is logged and not emitted (queries of it fail the same
/// way).
pub(super) fn emitted(
    aggregation: &mut Aggregation,
    states: &[(Vec<u8>, State)],
    ids: &FlushIds<'_>,
) -> Vec<EmitRecord> {
    let Some(emit) = aggregation.config.emit.clone() else {
        return Vec::new();
    };
    let topic: Arc<str> = Arc::from(emit.topic.as_str());
    let name = aggregation.config.name.clone();
    let windowed = aggregation.windowing.as_ref().map(|w| w.spec.clone());
    // One identity per slot, not per key.
    let mut flush_ids: BTreeMap<Slot, Vec<u8>> = BTreeMap::new();
    let mut records = Vec::with_capacity(states.len());
    for (store_key, state) in states {
        // A window deleted past retention, or a session merged into
        // another (whose record follows), is not a change of the key's
        // aggregate: only live windows are emitted.
        if windowed.is_some() && state.is_none() {
            continue;
        }
        let Some((slot, in_slot)) = Slot::decode(store_key) else {
            continue;
        };
        let flush_id = flush_ids
            .entry(slot)
            .or_insert_with(|| ids.of(&name, slot).into_bytes())
            .clone();
        let mut headers = vec![
            (headers::AGGREGATION, name.clone().into_bytes()),
            (headers::FLUSH, flush_id),
        ];
        let key = match &windowed {
            Some(spec) => {
                let Some(split) = split_window_key(in_slot) else {
                    continue;
                };
                let window = spec.window_at(split.start, split.session_end);
                headers.push((headers::WINDOW_START, window.start.to_string().into_bytes()));
                headers.push((headers::WINDOW_END, window.end.to_string().into_bytes()));
                split.key
            }
            None => in_slot.to_vec(),
        };
        let value = match (state, emit.format) {
            (None, _) => None,
            (Some(state), EmitFormat::State) => Some(state.clone()),
            (Some(state), EmitFormat::Json) => match aggregation.instance.render(state) {
                Ok(json) => Some(json.into_bytes()),
                Err(error) => {
                    tracing::error!(aggregation = %name, key = %String::from_utf8_lossy(&key), %error, "a changed state could not be rendered; not emitted");
                    continue;
                }
            },
        };
        records.push(EmitRecord {
            topic: topic.clone(),
            key,
            value,
            headers,
        });
    }
    records
}

/// `emit.mode = "final"`: the windows that closed since the last flush
/// (as the stream times handed on with this flush moved), with their final
/// states; none in other modes.
pub(super) fn closed_windows(
    aggregation: &mut Aggregation,
    store: &StateStore,
) -> Result<Vec<(Vec<u8>, State)>, StoreError> {
    let final_mode = aggregation
        .config
        .emit
        .as_ref()
        .is_some_and(|e| e.mode == EmitMode::Final);
    let Some(windowing) = aggregation.windowing.as_mut().filter(|_| final_mode) else {
        return Ok(Vec::new());
    };
    let mut closed = Vec::new();
    for (partition, from, to) in windowing.moving() {
        let Some(topic_id) = store.known_topic_id(&partition.0) else {
            continue;
        };
        let slot = Slot {
            topic_id,
            partition: partition.1 as u32,
        };
        let windows = windowing.closing(
            store,
            &aggregation.states,
            &aggregation.config.name,
            (&partition, slot),
            (from, to),
        )?;
        closed.extend(windows.into_iter().map(|(key, state)| (key, Some(state))));
    }
    Ok(closed)
}
