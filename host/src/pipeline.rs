//! The consumer loop: source → batcher → plugin runtime → state store.
//!
//! One thread owns the consumer, the plugin instances and the state cache.
//! Each batch is applied to every aggregation, and then all new states, the
//! counters and the next offset of every partition in the batch are written
//! in one RocksDB write batch. Records at offsets below a partition's stored
//! next offset are dropped on arrival, so a record is applied at most once
//! even when the consumer re-delivers it (after a rebalance or a seek); and
//! every record is applied at least once because offsets only advance with
//! the state that includes them.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::batcher::group_by_key;
use crate::config::{AggregationConfig, BatchConfig, OnError};
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use crate::plugin::{AfterFailure, CallError, Change, GroupInput, LoadedPlugin, PluginInstance};
use crate::record::SourceRecord;
use crate::source::{KafkaSource, PartitionEvent};
use crate::status::{AggregationCounters, Status};
use crate::store::{Slot, StateStore, StoreError};

/// Why the consumer loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "aggregation {aggregation:?} rejected the record at {position}: {message} (on_error = \"fail\": stopped without committing it)"
    )]
    RecordRejected {
        aggregation: String,
        position: String,
        message: String,
    },
    #[error("aggregation {aggregation:?}: {error}")]
    Plugin {
        aggregation: String,
        #[source]
        error: CallError,
    },
    #[error("writing state: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    DeadLetter(#[from] DeadLetterError),
}

/// One configured aggregation as the consumer loop runs it.
pub struct Aggregation {
    pub config: AggregationConfig,
    pub plugin: LoadedPlugin,
    instance: PluginInstance,
    /// Encoded store key → state (`None`: known to be absent).
    cache: LruCache<Vec<u8>, Option<Vec<u8>>>,
    counters: AggregationCounters,
}

impl Aggregation {
    pub fn new(
        config: AggregationConfig,
        plugin: LoadedPlugin,
        instance: PluginInstance,
        cache_entries: usize,
        counters: AggregationCounters,
    ) -> Self {
        Self {
            config,
            plugin,
            instance,
            cache: LruCache::new(
                NonZeroUsize::new(cache_entries.max(1)).unwrap_or(NonZeroUsize::MIN),
            ),
            counters,
        }
    }

    fn after_failure(&self) -> AfterFailure {
        match self.config.on_error {
            OnError::Fail => AfterFailure::Stop,
            OnError::Skip | OnError::DeadLetter => AfterFailure::Continue,
        }
    }
}

pub struct Pipeline {
    source: KafkaSource,
    store: Arc<StateStore>,
    status: Arc<Status>,
    aggregations: Vec<Aggregation>,
    dead_letters: Option<DeadLetterSink>,
    batch: BatchConfig,
    /// Next offset to apply per partition, for partitions this member owns.
    next_offsets: HashMap<(Arc<str>, i32), i64>,
    topic_ids: HashMap<Arc<str>, u16>,
    pending: Vec<SourceRecord>,
}

/// A state change waiting for its batch to be written.
struct CacheUpdate {
    aggregation: usize,
    store_key: Vec<u8>,
    state: Option<Vec<u8>>,
}

impl Pipeline {
    pub fn new(
        source: KafkaSource,
        store: Arc<StateStore>,
        status: Arc<Status>,
        aggregations: Vec<Aggregation>,
        dead_letters: Option<DeadLetterSink>,
        batch: BatchConfig,
    ) -> Self {
        for aggregation in &aggregations {
            status.set_counters(&aggregation.config.name, aggregation.counters);
        }
        Self {
            source,
            store,
            status,
            aggregations,
            dead_letters,
            batch,
            next_offsets: HashMap::new(),
            topic_ids: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// Consumes until `shutdown` is set (then finishes and writes the batch
    /// in flight) or a fatal error.
    pub fn run(mut self, shutdown: &AtomicBool) -> Result<(), PipelineError> {
        self.status.set_consumer_running(true);
        while !shutdown.load(Ordering::Relaxed) {
            self.fill_batch(shutdown);
            if self.pending.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.pending);
            if let Err(e) = self.process(&batch, shutdown) {
                tracing::error!(error = %e, "consumer stopped");
                self.status.set_fatal(e.to_string());
                return Err(e);
            }
        }
        self.status.set_consumer_running(false);
        tracing::info!("consumer stopped cleanly");
        Ok(())
    }

    /// Polls until the batch is full, its delay is up, or (with nothing
    /// pending) a poll comes back empty, so shutdown is noticed promptly.
    fn fill_batch(&mut self, shutdown: &AtomicBool) {
        let mut deadline: Option<Instant> = None;
        let mut received = false;
        while self.pending.len() < self.batch.max_records && !shutdown.load(Ordering::Relaxed) {
            let timeout = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(100),
            };
            if deadline.is_some() && timeout.is_zero() {
                break;
            }
            let record = self.source.poll(timeout);
            self.handle_partition_events();
            match record {
                Some(record) => {
                    received = true;
                    if self.is_new(&record) {
                        deadline.get_or_insert_with(|| Instant::now() + self.batch.max_delay());
                        self.pending.push(record);
                    }
                }
                None if deadline.is_none() => break,
                None => {}
            }
        }
        if received {
            self.status.broker_ok();
        }
    }

    fn is_new(&self, record: &SourceRecord) -> bool {
        match self
            .next_offsets
            .get(&(record.topic.clone(), record.partition))
        {
            Some(&next) => record.offset >= next,
            None => true,
        }
    }

    fn handle_partition_events(&mut self) {
        for event in self.source.take_events() {
            match event {
                PartitionEvent::Revoked(partitions) => {
                    // Records of a revoked partition are left to its next
                    // owner, which starts from the stored offset.
                    self.pending.retain(|r| {
                        !partitions
                            .iter()
                            .any(|(t, p)| **t == *r.topic && *p == r.partition)
                    });
                    for (topic, partition) in partitions {
                        self.next_offsets
                            .remove(&(Arc::from(topic.as_str()), partition));
                    }
                }
                PartitionEvent::Assigned(partitions) => match self.store.offsets() {
                    Ok(stored) => {
                        for (topic, partition) in partitions {
                            if let Some(&next) = stored.get(&(topic.clone(), partition)) {
                                self.next_offsets
                                    .insert((Arc::from(topic.as_str()), partition), next);
                            }
                        }
                    }
                    Err(e) => self
                        .status
                        .set_fatal(format!("reading stored offsets: {e}")),
                },
            }
        }
    }

    fn topic_id(&mut self, topic: &Arc<str>) -> Result<u16, StoreError> {
        if let Some(&id) = self.topic_ids.get(topic) {
            return Ok(id);
        }
        let id = self.store.topic_id(topic)?;
        self.topic_ids.insert(topic.clone(), id);
        Ok(id)
    }

    /// Applies one batch to every aggregation, delivers its dead letters,
    /// and writes the result.
    fn process(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let mut partitions: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
        for record in batch {
            let next = partitions
                .entry((record.topic.clone(), record.partition))
                .or_insert(0);
            *next = (*next).max(record.offset + 1);
        }
        let mut slots: HashMap<(Arc<str>, i32), Slot> = HashMap::new();
        for (topic, partition) in partitions.keys() {
            let topic_id = self.topic_id(topic)?;
            slots.insert(
                (topic.clone(), *partition),
                Slot {
                    topic_id,
                    partition: *partition as u32,
                },
            );
        }

        let store = self.store.clone();
        let mut write = store.batch();
        let mut cache_updates = Vec::new();
        let mut counters = Vec::with_capacity(self.aggregations.len());
        let mut letters = Vec::new();
        for (index, aggregation) in self.aggregations.iter_mut().enumerate() {
            let updated = apply_aggregation(
                index,
                aggregation,
                batch,
                &slots,
                &store,
                &mut write,
                &mut cache_updates,
                &mut letters,
            )?;
            counters.push(updated);
        }
        if !letters.is_empty() {
            // Acknowledged before the offsets move past them: at least once.
            let sink = self
                .dead_letters
                .as_ref()
                .ok_or(DeadLetterError::NotConfigured)?;
            sink.deliver(&letters, shutdown)?;
        }
        for ((topic, partition), next) in &partitions {
            let slot = slots[&(topic.clone(), *partition)];
            write.set_offset(slot.topic_id, *partition, *next);
        }
        store.write(write)?;

        // Durable: now the in-memory views may move forward.
        for update in cache_updates {
            self.aggregations[update.aggregation]
                .cache
                .put(update.store_key, update.state);
        }
        for (aggregation, counters) in self.aggregations.iter_mut().zip(counters) {
            aggregation.counters = counters;
            self.status.set_counters(&aggregation.config.name, counters);
        }
        let mut commits = Vec::with_capacity(partitions.len());
        for ((topic, partition), next) in &partitions {
            self.next_offsets.insert((topic.clone(), *partition), *next);
            self.status.set_next_offset(topic, *partition, *next);
            commits.push((&**topic, *partition, *next));
        }
        self.source.commit(&commits);
        Ok(())
    }
}

/// The group key of a record for an aggregation: the Kafka key in its
/// partition's slot, or the re-keying field in the re-keyed slot.
fn group_key<'r>(
    config: &AggregationConfig,
    record: &'r SourceRecord,
    slot: Slot,
) -> Result<(Slot, Cow<'r, [u8]>), String> {
    let Some(pointer) = &config.key else {
        return Ok((
            slot,
            Cow::Borrowed(record.key.as_deref().unwrap_or_default()),
        ));
    };
    let value = record
        .value
        .as_deref()
        .ok_or_else(|| format!("cannot re-key by `{pointer}`: the record has no value"))?;
    let json: serde_json::Value = serde_json::from_slice(value)
        .map_err(|e| format!("cannot re-key by `{pointer}`: value is not JSON: {e}"))?;
    let key = match json.pointer(pointer) {
        None | Some(serde_json::Value::Null) => {
            return Err(format!(
                "cannot re-key by `{pointer}`: the field is missing or null"
            ));
        }
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    };
    Ok((Slot::REKEYED, Cow::Owned(key)))
}

/// Runs the records of `batch` that `aggregation` consumes through its
/// plugin and stages the resulting state changes in `write` (and rejected
/// records in `letters`, under `on_error = "dead-letter"`). Returns the
/// aggregation's counters as they will be once `write` is written.
#[allow(clippy::too_many_arguments)]
fn apply_aggregation<'b>(
    index: usize,
    aggregation: &mut Aggregation,
    batch: &'b [SourceRecord],
    slots: &HashMap<(Arc<str>, i32), Slot>,
    store: &StateStore,
    write: &mut crate::store::StateBatch<'_>,
    cache_updates: &mut Vec<CacheUpdate>,
    letters: &mut Vec<DeadLetter<'b>>,
) -> Result<AggregationCounters, PipelineError> {
    let name = aggregation.config.name.clone();
    let after_failure = aggregation.after_failure();
    let mut counters = aggregation.counters;
    let mut rejected: Vec<(&'b SourceRecord, String)> = Vec::new();
    let mut keyed = Vec::new();
    for record in batch
        .iter()
        .filter(|r| aggregation.config.applies_to(&r.topic))
    {
        let slot = slots[&(record.topic.clone(), record.partition)];
        match group_key(&aggregation.config, record, slot) {
            Ok(key) => keyed.push((key, record)),
            Err(message) => rejected.push((record, message)),
        }
    }
    let considered = keyed.len() + rejected.len();
    if considered == 0 {
        return Ok(counters);
    }
    let groups = group_by_key(keyed);

    // Current states: from the cache, the rest from RocksDB in one lookup.
    let store_keys: Vec<Vec<u8>> = groups
        .iter()
        .map(|((slot, key), _)| slot.store_key(key))
        .collect();
    let mut states: Vec<Option<Vec<u8>>> = Vec::with_capacity(groups.len());
    let mut misses = Vec::new();
    for (i, store_key) in store_keys.iter().enumerate() {
        match aggregation.cache.get(store_key) {
            Some(state) => states.push(state.clone()),
            None => {
                states.push(None);
                misses.push(i);
            }
        }
    }
    if !misses.is_empty() {
        let lookups: Vec<(Slot, &[u8])> = misses
            .iter()
            .map(|&i| (groups[i].0.0, groups[i].0.1.as_ref()))
            .collect();
        for (&i, state) in misses.iter().zip(store.multi_get(&name, &lookups)?) {
            states[i] = state;
        }
    }

    let inputs: Vec<GroupInput<'_>> = groups
        .iter()
        .zip(&states)
        .map(|(((_, key), records), state)| GroupInput {
            key,
            state: state.as_deref(),
            records,
        })
        .collect();
    let outcome = aggregation
        .instance
        .apply_batch(&inputs, after_failure)
        .map_err(|error| PipelineError::Plugin {
            aggregation: name.clone(),
            error,
        })?;
    for (group, failure) in &outcome.failures {
        rejected.push((groups[*group].1[failure.index], failure.message.clone()));
    }
    if let Some((record, message)) = rejected.first()
        && aggregation.config.on_error == OnError::Fail
    {
        return Err(PipelineError::RecordRejected {
            aggregation: name,
            position: record.position(),
            message: message.clone(),
        });
    }
    for (record, message) in &rejected {
        tracing::warn!(aggregation = %name, position = %record.position(), %message, policy = ?aggregation.config.on_error, "record rejected");
    }
    if aggregation.config.on_error == OnError::DeadLetter {
        let metadata = aggregation.plugin.metadata();
        counters.records_dead_lettered += rejected.len() as u64;
        letters.extend(rejected.iter().map(|(record, message)| DeadLetter {
            aggregation: name.clone(),
            plugin: metadata.name.clone(),
            plugin_version: metadata.version.clone(),
            error: message.clone(),
            record,
        }));
    }

    for ((((slot, key), _), store_key), change) in
        groups.iter().zip(store_keys).zip(outcome.changes)
    {
        let state = match change {
            Change::Unchanged => continue,
            Change::Set(state) => {
                write.put_state(&name, *slot, key, &state)?;
                Some(state)
            }
            Change::Delete => {
                write.delete_state(&name, *slot, key)?;
                None
            }
        };
        cache_updates.push(CacheUpdate {
            aggregation: index,
            store_key,
            state,
        });
    }
    counters.records_failed += rejected.len() as u64;
    counters.records_applied += (considered - rejected.len()) as u64;
    write.set_counters(&name, &counters);
    Ok(counters)
}
