//! The consumer loop: source → batcher → plugin runtime → state store.
//!
//! The consumer thread owns the plugin instances and the state cache; it
//! takes batches from the source thread (see `source::kafka`). Each batch
//! is applied to every aggregation in memory; every
//! `batch.commit_interval_ms` (and when idle, on revocation, on shutdown)
//! all new states, the counters and the next offset of every partition they
//! cover are written in one RocksDB write batch — by the `writer` thread,
//! while this one goes on applying (it waits only to revoke, to stop, and
//! before handing over the next write). Records at offsets below a
//! partition's next offset are dropped on arrival, so a record is applied at
//! most once even when the consumer re-delivers it (after a rebalance or a
//! seek); and every record is applied at least once because offsets only
//! advance with the state that includes them.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use crate::batcher::group_by_key;
use crate::cluster::Cluster;
use crate::config::{AggregationConfig, BatchConfig, OnError};
use crate::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use crate::metrics::{AggregationLabel, CacheLabel, Metrics};
use crate::partition_map::PartitionMap;
use crate::plugin::{AfterFailure, CallError, Change, GroupInput, LoadedPlugin, PluginInstance};
use crate::record::SourceRecord;
use crate::source::{SourceEvent, SourceFeed};
use crate::state_cache::{State, StateCache};
use crate::status::{AggregationCounters, Status};
use crate::store::{Slot, StateStore, StoreError};
use crate::writer::{FlushJob, FlushedAggregation, StateWriter, WriteError};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

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
    #[error("writing state: {0}")]
    Write(#[from] WriteError),
    #[error("{0}")]
    DeadLetter(#[from] DeadLetterError),
    #[error("the Kafka source thread stopped unexpectedly")]
    SourceGone,
}

/// One configured aggregation as the consumer loop runs it.
pub struct Aggregation {
    pub config: AggregationConfig,
    pub plugin: LoadedPlugin,
    instance: PluginInstance,
    /// Encoded store key → newest state: the applied but unwritten ones and
    /// a bounded number of written ones.
    states: StateCache,
    /// Including what is applied but not yet written (the written ones are
    /// what the last flush reported to `Status`).
    applied: AggregationCounters,
    instruments: Instruments,
}

/// An aggregation's metrics, looked up once (not per batch).
#[derive(Debug, Clone)]
struct Instruments {
    plugin_call_seconds: Histogram,
    hits: Counter,
    misses: Counter,
}

impl Default for Instruments {
    /// Detached: counts into instruments no registry reads.
    fn default() -> Self {
        Self {
            plugin_call_seconds: Histogram::new(std::iter::empty()),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }
}

impl Instruments {
    fn new(metrics: &Metrics, aggregation: &str) -> Self {
        let lookups = |result| {
            metrics
                .state_lookups
                .get_or_create(&CacheLabel {
                    aggregation: aggregation.to_owned(),
                    result,
                })
                .clone()
        };
        Self {
            plugin_call_seconds: metrics
                .plugin_call_seconds
                .get_or_create(&AggregationLabel {
                    aggregation: aggregation.to_owned(),
                })
                .clone(),
            hits: lookups("hit"),
            misses: lookups("miss"),
        }
    }
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
            states: StateCache::new(cache_entries),
            applied: counters,
            // Attached to the registry by `BatchApplier::new`.
            instruments: Instruments::default(),
        }
    }

    fn after_failure(&self) -> AfterFailure {
        match self.config.on_error {
            OnError::Fail => AfterFailure::Stop,
            OnError::Skip | OnError::DeadLetter => AfterFailure::Continue,
        }
    }
}

/// Applies batches of records to every aggregation and writes the results:
/// the part of the consumer loop that does not know where records come
/// from (Kafka here; generated records in `wagg bench engine`).
///
/// Applied effects are kept in memory and written by [`BatchApplier::flush`]
/// (every `batch.commit_interval_ms`, when too many states are waiting, on
/// revocation and on shutdown): all waiting states, the counters and the
/// next offset of every partition they cover, in one RocksDB write batch. A
/// key updated by many batches between two flushes is written once; a crash
/// loses the unwritten effects together with their offsets, so the records
/// are applied again after the restart — exactly once either way.
pub struct BatchApplier {
    store: Arc<StateStore>,
    writer: StateWriter,
    /// What the write in flight (if any) makes durable besides states.
    in_flight: Option<InFlight>,
    status: Arc<Status>,
    aggregations: Vec<Aggregation>,
    dead_letters: Option<DeadLetterSink>,
    topic_ids: HashMap<Arc<str>, u16>,
    /// Next offset per partition of the applied but unwritten effects.
    unwritten: BatchOffsets,
    /// When the oldest unwritten effect was applied.
    unwritten_since: Option<Instant>,
    commit_interval: Duration,
    /// Flush once this many states (over all aggregations) are waiting.
    max_dirty: usize,
}

/// The next offset of each partition a written batch covered.
pub type BatchOffsets = BTreeMap<(Arc<str>, i32), i64>;

/// The offsets and counters of the write in flight (its states are in
/// flight in each aggregation's [`StateCache`]).
struct InFlight {
    offsets: BatchOffsets,
    counters: Vec<AggregationCounters>,
}

pub struct Pipeline {
    source: SourceFeed,
    applier: BatchApplier,
    status: Arc<Status>,
    /// Next offset to apply per partition, for partitions this member owns.
    next_offsets: PartitionMap<i64>,
}

/// How long the consumer waits for a batch before treating the source as
/// idle (and writing what it applied).
const IDLE_AFTER: Duration = Duration::from_millis(100);

/// A state change waiting for its batch to be written.
struct CacheUpdate {
    aggregation: usize,
    store_key: Vec<u8>,
    state: State,
}

impl Pipeline {
    pub fn new(source: SourceFeed, applier: BatchApplier, status: Arc<Status>) -> Self {
        Self {
            source,
            applier,
            status,
            next_offsets: PartitionMap::default(),
        }
    }

    /// Consumes until `shutdown` is set (then finishes and writes the batch
    /// in flight) or a fatal error.
    pub fn run(mut self, shutdown: &AtomicBool) -> Result<(), PipelineError> {
        self.status.set_consumer_running(true);
        let result = self.consume(shutdown);
        // Whatever stopped the loop, effects of whole batches are written
        // (a failing batch left none behind)...
        let flushed = self.flush();
        // ...before the source lets go of its partitions.
        self.source.close();
        let result = match (result, flushed) {
            (Err(e), Err(flush)) => {
                tracing::error!(error = %flush, "writing the applied batches failed too");
                Err(e)
            }
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        };
        match &result {
            Ok(()) => {
                self.status.set_consumer_running(false);
                tracing::info!("consumer stopped cleanly");
            }
            Err(e) => {
                tracing::error!(error = %e, "consumer stopped");
                self.status.set_fatal(e.to_string());
            }
        }
        result
    }

    fn consume(&mut self, shutdown: &AtomicBool) -> Result<(), PipelineError> {
        while !shutdown.load(Ordering::Relaxed) {
            let written = self.applier.poll_flush()?;
            self.commit(&written);
            match self.source.recv_timeout(IDLE_AFTER) {
                Ok(SourceEvent::Records(mut batch)) => {
                    self.drop_redelivered(&mut batch);
                    if !batch.is_empty() {
                        self.process(&batch, shutdown)?;
                    }
                    if self.applier.flush_due() {
                        let written = self.applier.start_flush()?;
                        self.commit(&written);
                    }
                }
                Ok(SourceEvent::Assigned(partitions)) => self.assigned(partitions)?,
                Ok(SourceEvent::Revoked { partitions, done }) => {
                    // What was applied from these partitions is written
                    // before their next owner reads the stored offsets.
                    self.flush()?;
                    for (topic, partition) in &partitions {
                        self.next_offsets.remove(topic, *partition);
                    }
                    self.applier.forget_partitions(&partitions);
                    drop(done);
                }
                // Idle (caught up, or no partitions): write what waits.
                Err(RecvTimeoutError::Timeout) => self.flush()?,
                Err(RecvTimeoutError::Disconnected) => return Err(PipelineError::SourceGone),
            }
        }
        Ok(())
    }

    /// Writes the applied effects and waits for them to be durable.
    fn flush(&mut self) -> Result<(), PipelineError> {
        let written = self.applier.flush()?;
        self.commit(&written);
        Ok(())
    }

    /// Lets the group know how far this member got (monitoring only: start
    /// offsets come from the state store).
    fn commit(&self, written: &BatchOffsets) {
        if !written.is_empty() {
            let commits: Vec<(&str, i32, i64)> = written
                .iter()
                .map(|((topic, partition), next)| (&**topic, *partition, *next))
                .collect();
            self.source.commit(&commits);
        }
    }

    /// Drops records below their partition's next offset: applied
    /// already, delivered again after a rebalance or a seek.
    fn drop_redelivered(&mut self, batch: &mut Vec<SourceRecord>) {
        let before = batch.len();
        let next_offsets = &mut self.next_offsets;
        batch.retain(
            |record| match next_offsets.get(&record.topic, record.partition) {
                Some(next) => record.offset >= next,
                None => true,
            },
        );
        let redelivered = (before - batch.len()) as u64;
        if redelivered > 0 {
            self.status
                .metrics()
                .records_redelivered
                .inc_by(redelivered);
        }
    }

    /// Starts newly assigned partitions from their stored offsets.
    fn assigned(&mut self, partitions: Vec<(String, i32)>) -> Result<(), PipelineError> {
        let stored = self.applier.store.offsets()?;
        for (topic, partition) in partitions {
            if let Some(&next) = stored.get(&(topic.clone(), partition)) {
                self.next_offsets
                    .insert(Arc::from(topic.as_str()), partition, next);
            }
        }
        Ok(())
    }

    /// Applies one batch; its records are from now on dropped if delivered
    /// again.
    fn process(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let partitions = self.applier.apply(batch, shutdown)?;
        for ((topic, partition), next) in partitions {
            self.next_offsets.insert(topic, partition, next);
        }
        Ok(())
    }
}

impl BatchApplier {
    pub fn new(
        store: Arc<StateStore>,
        status: Arc<Status>,
        mut aggregations: Vec<Aggregation>,
        dead_letters: Option<DeadLetterSink>,
        batch: &BatchConfig,
        cluster: Option<Arc<Cluster>>,
    ) -> std::io::Result<Self> {
        for aggregation in &mut aggregations {
            status.set_counters(&aggregation.config.name, aggregation.applied);
            aggregation.instruments = Instruments::new(status.metrics(), &aggregation.config.name);
        }
        Ok(Self {
            writer: StateWriter::spawn(store.clone(), status.metrics().clone(), cluster)?,
            in_flight: None,
            store,
            status,
            aggregations,
            dead_letters,
            topic_ids: HashMap::new(),
            unwritten: BatchOffsets::new(),
            unwritten_since: None,
            commit_interval: batch.commit_interval(),
            max_dirty: batch.max_unwritten_states.max(1),
        })
    }

    /// Drops cached states of partitions this instance no longer owns.
    pub fn forget_partitions(&mut self, partitions: &[(String, i32)]) {
        for (topic, partition) in partitions {
            let Some(topic_id) = self.store.known_topic_id(topic) else {
                continue;
            };
            let prefix = Slot {
                topic_id,
                partition: *partition as u32,
            }
            .store_key(&[]);
            for aggregation in &mut self.aggregations {
                aggregation.states.forget_clean(&prefix);
            }
        }
    }

    /// Whether a flush is due: the oldest unwritten effect is older than
    /// the commit interval, or too many states are waiting.
    pub fn flush_due(&self) -> bool {
        self.unwritten_since
            .is_some_and(|since| since.elapsed() >= self.commit_interval)
            || self
                .aggregations
                .iter()
                .map(|a| a.states.dirty_len())
                .sum::<usize>()
                >= self.max_dirty
    }

    /// Writes every applied effect not yet written — states, counters and
    /// offsets in one write batch — and waits for it; returns the offsets
    /// made durable (empty when there was nothing to write).
    pub fn flush(&mut self) -> Result<BatchOffsets, PipelineError> {
        let mut written = self.start_flush()?;
        written.append(&mut self.wait_for_write()?);
        Ok(written)
    }

    /// Hands every applied effect not yet written to the writer thread,
    /// after waiting for the write before it (if still running). Returns
    /// the offsets made durable meanwhile.
    pub fn start_flush(&mut self) -> Result<BatchOffsets, PipelineError> {
        let written = self.wait_for_write()?;
        if self.unwritten.is_empty() {
            return Ok(written);
        }
        let job = FlushJob {
            aggregations: self
                .aggregations
                .iter_mut()
                .map(|aggregation| FlushedAggregation {
                    name: aggregation.config.name.clone(),
                    states: aggregation.states.take_dirty(),
                    counters: aggregation.applied,
                })
                .collect(),
            offsets: self.unwritten.clone(),
        };
        self.in_flight = Some(InFlight {
            offsets: std::mem::take(&mut self.unwritten),
            counters: job.aggregations.iter().map(|a| a.counters).collect(),
        });
        self.unwritten_since = None;
        if let Err(e) = self.writer.submit(job) {
            self.take_back_in_flight();
            return Err(e.into());
        }
        Ok(written)
    }

    /// The offsets of the write in flight if it has completed (without
    /// waiting for it).
    pub fn poll_flush(&mut self) -> Result<BatchOffsets, PipelineError> {
        if self.in_flight.is_none() {
            return Ok(BatchOffsets::new());
        }
        match self.writer.try_result() {
            None => Ok(BatchOffsets::new()),
            Some(result) => self.complete_write(result),
        }
    }

    fn wait_for_write(&mut self) -> Result<BatchOffsets, PipelineError> {
        if self.in_flight.is_none() {
            return Ok(BatchOffsets::new());
        }
        let result = self.writer.wait();
        self.complete_write(result)
    }

    fn complete_write(
        &mut self,
        result: Result<(), WriteError>,
    ) -> Result<BatchOffsets, PipelineError> {
        if let Err(e) = result {
            // Kept for another attempt (at shutdown): nothing later may be
            // written without these states.
            self.take_back_in_flight();
            return Err(e.into());
        }
        let Some(written) = self.in_flight.take() else {
            return Ok(BatchOffsets::new());
        };
        // Durable: now the views may move forward.
        for (aggregation, counters) in self.aggregations.iter_mut().zip(written.counters) {
            aggregation.states.write_completed();
            self.status.set_counters(&aggregation.config.name, counters);
        }
        for ((topic, partition), next) in &written.offsets {
            self.status.set_next_offset(topic, *partition, *next);
        }
        Ok(written.offsets)
    }

    /// Returns a failed (or never started) write's effects to the unwritten
    /// ones; what was applied since is newer and wins.
    fn take_back_in_flight(&mut self) {
        let Some(failed) = self.in_flight.take() else {
            return;
        };
        for aggregation in &mut self.aggregations {
            aggregation.states.write_failed();
        }
        for (partition, next) in failed.offsets {
            let entry = self.unwritten.entry(partition).or_insert(next);
            *entry = (*entry).max(next);
        }
        self.unwritten_since.get_or_insert_with(Instant::now);
    }

    /// Applies one batch to every aggregation (in memory, until the next
    /// [`BatchApplier::flush`]) and delivers its dead letters; returns the
    /// next offset of every partition in the batch. Nothing of a batch that
    /// fails is kept.
    pub fn apply(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<BatchOffsets, PipelineError> {
        let started = Instant::now();
        let mut partitions = BatchOffsets::new();
        // Records come in runs per partition: one map update per run.
        for run in batch.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
            let last = run.iter().map(|r| r.offset).max().unwrap_or_default();
            let next = partitions
                .entry((run[0].topic.clone(), run[0].partition))
                .or_insert(0);
            *next = (*next).max(last + 1);
        }
        let mut slots = PartitionMap::default();
        for (topic, partition) in partitions.keys() {
            let topic_id = cached_topic_id(&self.store, &mut self.topic_ids, topic)?;
            slots.insert(
                topic.clone(),
                *partition,
                Slot {
                    topic_id,
                    partition: *partition as u32,
                },
            );
        }

        let store = self.store.clone();
        let mut cache_updates = Vec::new();
        let mut counters = Vec::with_capacity(self.aggregations.len());
        let mut letters = Vec::new();
        for (index, aggregation) in self.aggregations.iter_mut().enumerate() {
            let updated = apply_aggregation(
                index,
                aggregation,
                batch,
                &mut slots,
                &store,
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
        // The whole batch succeeded: its effects join the unwritten ones.
        for update in cache_updates {
            self.aggregations[update.aggregation]
                .states
                .set(update.store_key, update.state);
        }
        for (aggregation, counters) in self.aggregations.iter_mut().zip(counters) {
            aggregation.applied = counters;
            aggregation.states.evict_if_over();
        }
        for (partition, next) in &partitions {
            self.unwritten.insert(partition.clone(), *next);
        }
        self.unwritten_since.get_or_insert_with(Instant::now);
        let metrics = self.status.metrics();
        metrics.batch_records.observe(batch.len() as f64);
        metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(partitions)
    }
}

/// A topic's id in the store, asked of RocksDB once per topic.
fn cached_topic_id(
    store: &StateStore,
    ids: &mut HashMap<Arc<str>, u16>,
    topic: &Arc<str>,
) -> Result<u16, StoreError> {
    if let Some(&id) = ids.get(topic) {
        return Ok(id);
    }
    let id = store.topic_id(topic)?;
    ids.insert(topic.clone(), id);
    Ok(id)
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
    slots: &mut PartitionMap<Slot>,
    store: &StateStore,
    cache_updates: &mut Vec<CacheUpdate>,
    letters: &mut Vec<DeadLetter<'b>>,
) -> Result<AggregationCounters, PipelineError> {
    let name = aggregation.config.name.clone();
    let after_failure = aggregation.after_failure();
    let mut counters = aggregation.applied;
    let mut rejected: Vec<(&'b SourceRecord, String)> = Vec::new();
    let mut keyed = Vec::new();
    for record in batch
        .iter()
        .filter(|r| aggregation.config.applies_to(&r.topic))
    {
        let Some(slot) = slots.get(&record.topic, record.partition) else {
            // Every record's partition was put in `slots` above.
            continue;
        };
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

    // Current states: from the cache, the rest from RocksDB in one lookup
    // (and into the cache, so the inputs can borrow them all from there).
    let store_keys: Vec<Vec<u8>> = groups
        .iter()
        .map(|((slot, key), _)| slot.store_key(key))
        .collect();
    let misses: Vec<usize> = (0..groups.len())
        .filter(|&i| aggregation.states.get(&store_keys[i]).is_none())
        .collect();
    if !misses.is_empty() {
        let lookups: Vec<(Slot, &[u8])> = misses
            .iter()
            .map(|&i| (groups[i].0.0, groups[i].0.1.as_ref()))
            .collect();
        for (&i, state) in misses.iter().zip(store.multi_get(&name, &lookups)?) {
            aggregation
                .states
                .insert_loaded(store_keys[i].clone(), state);
        }
    }

    let cached = &aggregation.states;
    let inputs: Vec<GroupInput<'_>> = groups
        .iter()
        .zip(&store_keys)
        .map(|(((_, key), records), store_key)| GroupInput {
            key,
            state: cached.peek(store_key).and_then(|state| state.as_deref()),
            records,
        })
        .collect();
    let hits = groups.len() - misses.len();
    aggregation.instruments.hits.inc_by(hits as u64);
    aggregation.instruments.misses.inc_by(misses.len() as u64);
    let call_started = Instant::now();
    let outcome = aggregation
        .instance
        .apply_batch(&inputs, after_failure)
        .map_err(|error| PipelineError::Plugin {
            aggregation: name.clone(),
            error,
        })?;
    aggregation
        .instruments
        .plugin_call_seconds
        .observe(call_started.elapsed().as_secs_f64());
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

    for (store_key, change) in store_keys.into_iter().zip(outcome.changes) {
        let state = match change {
            Change::Unchanged => continue,
            Change::Set(state) => Some(state),
            Change::Delete => None,
        };
        cache_updates.push(CacheUpdate {
            aggregation: index,
            store_key,
            state,
        });
    }
    counters.records_failed += rejected.len() as u64;
    counters.records_applied += (considered - rejected.len()) as u64;
    Ok(counters)
}
