//! Applying one batch to every aggregation: records → group keys → states
//! (cache, then RocksDB) → one plugin call per aggregation → staged states,
//! rejected records routed by `on_error`. Nothing of a batch that fails is
//! kept; a batch that succeeds joins the unwritten effects the
//! [`Flusher`](super::flusher::Flusher) writes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::PipelineError;
use super::aggregation::{Aggregation, Feed, Instruments, Keying};
use super::dead_letter::{DeadLetter, DeadLetterError, DeadLetterSink};
use super::flusher::Flusher;
use super::group::{GroupItems, GroupKey, group_by_key, group_key};
use super::partition_map::PartitionMap;
use super::session::{self, Arrival, StoredSession};
use super::window::{Partition, WindowedBatch, Windowing};
use crate::config::{AggregationConfig, BatchConfig, EmitMode, OnError};
use crate::ops::status::{AggregationCounters, Status};
use crate::plugin::{BatchOutcome, Change, GroupInput, PluginInstance};
use crate::record::SourceRecord;
use crate::state::cache::{CacheShard, State, StateCache, shard_of};
use crate::state::flush::{CatchUpOffsets, FlushOffsets, FlushPublisher};
use crate::state::store::{
    AggregationMeta, InlineKey, Slot, StateStore, StoreError, session_key, split_window_key,
    window_prefix,
};
use crate::state::writer::{StateWriter, WriteInstruments};

/// Applies batches of records to every aggregation and writes the results:
/// the part of the consumer loop that does not know where records come
/// from (Kafka here; generated records in `wagg bench engine`).
///
/// Applied effects are kept in memory and written by [`BatchApplier::flush`]
/// (see [`Flusher`] for when): all waiting states, the counters and the
/// next offset of every partition they cover, in one RocksDB write batch. A
/// key updated by many batches between two flushes is written once; a crash
/// loses the unwritten effects together with their offsets, so the records
/// are applied again after the restart — exactly once either way.
pub struct BatchApplier {
    pub(super) store: Arc<StateStore>,
    status: Arc<Status>,
    aggregations: Vec<Aggregation>,
    dead_letters: Option<DeadLetterSink>,
    topic_ids: HashMap<Arc<str>, u16>,
    flusher: Flusher,
    /// The apply workers besides the consumer thread (started with the
    /// first aggregation split across workers).
    workers: Option<rayon::ThreadPool>,
    /// What applying a record has cost lately (ns of thread time, a moving
    /// average): whether a batch is worth handing to the workers.
    cost_per_record_ns: f64,
}

/// State changes waiting for their batch to succeed: (store key, state).
type Changes = Vec<(InlineKey, State)>;

/// What one batch did to one aggregation, kept until the whole batch has
/// succeeded.
struct Staged<'b> {
    /// The state changes of each cache shard.
    changes: Vec<Changes>,
    counters: AggregationCounters,
    letters: Vec<DeadLetter<'b>>,
    windowed: WindowedBatch,
}

impl BatchApplier {
    /// Starts the writer thread. With a `publisher` (the cluster), every
    /// flush is published before it is written locally.
    pub fn new(
        store: Arc<StateStore>,
        status: Arc<Status>,
        mut aggregations: Vec<Aggregation>,
        dead_letters: Option<DeadLetterSink>,
        batch: &BatchConfig,
        publisher: Option<Arc<dyn FlushPublisher>>,
    ) -> std::io::Result<Self> {
        for aggregation in &mut aggregations {
            status.set_counters(&aggregation.config.name, aggregation.applied);
            aggregation.instruments = Instruments::new(status.metrics(), &aggregation.config.name);
            aggregation.report_stream_times(&status);
        }
        let metrics = status.metrics();
        let instruments = WriteInstruments {
            write_seconds: metrics.write_seconds.clone(),
            write_states: metrics.write_states.clone(),
        };
        let writer = StateWriter::spawn(store.clone(), instruments, publisher)?;
        Ok(Self {
            store,
            status,
            aggregations,
            dead_letters,
            topic_ids: HashMap::new(),
            flusher: Flusher::new(writer, batch),
            workers: None,
            cost_per_record_ns: INITIAL_COST_PER_RECORD_NS,
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
                if let Some(windowing) = &mut aggregation.windowing {
                    windowing.sessions.forget_prefix(&prefix);
                }
                let key = (Arc::<str>::from(topic.as_str()), *partition);
                if aggregation.catch_up.remove(&key).is_some() {
                    self.status
                        .set_catch_up(&aggregation.config.name, topic, *partition, None);
                }
            }
        }
    }

    /// Reads the windowed aggregations' stream times on `partitions` from
    /// the store again (a take-over may have restored them).
    pub(super) fn reload_stream_times(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<(), StoreError> {
        for (topic, partition) in partitions {
            let stored = self.store.stream_times_of(topic, *partition)?;
            for aggregation in &mut self.aggregations {
                if let Some(windowing) = &mut aggregation.windowing {
                    let time = stored.get(&aggregation.config.name).copied();
                    windowing.load((Arc::from(topic.as_str()), *partition), time);
                    if let Some(time) = time {
                        self.status.set_stream_time(
                            &aggregation.config.name,
                            topic,
                            *partition,
                            time,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The aggregation called `name`.
    pub(super) fn aggregation_mut(&mut self, name: &str) -> Option<&mut Aggregation> {
        self.aggregations.iter_mut().find(|a| a.config.name == name)
    }

    /// The first aggregation migrating its stored states, if any.
    pub(super) fn migrating_mut(&mut self) -> Option<&mut Aggregation> {
        self.aggregations.iter_mut().find(|a| a.migrating.is_some())
    }

    /// The names of the aggregations applied.
    pub(super) fn names(&self) -> Vec<String> {
        self.aggregations
            .iter()
            .map(|a| a.config.name.clone())
            .collect()
    }

    /// Starts applying an aggregation (registered in the store already),
    /// with the counters the store holds for it.
    pub(super) fn add(&mut self, mut aggregation: Aggregation) -> Result<(), StoreError> {
        let name = aggregation.config.name.clone();
        aggregation.applied = self.store.counters(&name)?;
        aggregation.restore_stream_times(&self.store)?;
        aggregation.report_stream_times(&self.status);
        aggregation.instruments = Instruments::new(self.status.metrics(), &name);
        self.status.set_counters(&name, aggregation.applied);
        self.aggregations.push(aggregation);
        Ok(())
    }

    /// Puts `aggregation` in the place of the one of the same name, which
    /// hands it its states, counters and catch-up progress. Call with
    /// nothing unwritten (after [`BatchApplier::flush`]).
    pub(super) fn replace(&mut self, mut aggregation: Aggregation) {
        if let Some(old) = self.aggregation_mut(&aggregation.config.name) {
            aggregation.take_over(old);
            *old = aggregation;
        }
    }

    /// Has an aggregation migrate its stored states (recorded in `meta`)
    /// before it applies records again: what it cached (the old format)
    /// and where it was catching up (it resumes from the migration's
    /// record) are dropped. Call with nothing unwritten.
    pub(super) fn pause_to_migrate(&mut self, name: &str, meta: AggregationMeta) {
        let Some(aggregation) = self.aggregations.iter_mut().find(|a| a.config.name == name) else {
            return;
        };
        aggregation.states.clear();
        stop_catching_up(aggregation, &self.status);
        aggregation.migrate_first(meta);
    }

    /// Stops applying an aggregation. Call with nothing unwritten.
    pub(super) fn remove(&mut self, name: &str) {
        self.aggregations.retain(|a| a.config.name != name);
        self.status.remove_aggregation(name);
        self.status.metrics().forget_aggregation(name);
    }

    /// Forgets an aggregation's states and counters (cleared in the store
    /// by the caller) and where it was catching up. Call with nothing
    /// unwritten.
    pub(super) fn reset(&mut self, name: &str) {
        let Some(aggregation) = self.aggregations.iter_mut().find(|a| a.config.name == name) else {
            return;
        };
        aggregation.states.clear();
        if let Some(windowing) = &mut aggregation.windowing {
            windowing.clear();
        }
        aggregation.applied = AggregationCounters::default();
        // Cleared states: nothing left to migrate (the store ended it).
        aggregation.migrating = None;
        self.status.set_counters(name, aggregation.applied);
        stop_catching_up(aggregation, &self.status);
    }

    /// Whether a flush is due (see [`Flusher`]).
    pub fn flush_due(&self) -> bool {
        self.flusher.due(&self.aggregations)
    }

    /// Writes every applied effect not yet written — states, counters and
    /// offsets in one write batch — and waits for it; returns the offsets
    /// made durable (empty when there was nothing to write).
    pub fn flush(&mut self) -> Result<FlushOffsets, PipelineError> {
        let mut written = self.start_flush()?;
        written.append(&mut self.flusher.wait(&mut self.aggregations, &self.status)?);
        Ok(written)
    }

    /// Hands every applied effect not yet written to the writer thread,
    /// after waiting for the write before it (if still running). Returns
    /// the offsets made durable meanwhile.
    pub fn start_flush(&mut self) -> Result<FlushOffsets, PipelineError> {
        Ok(self
            .flusher
            .start(&mut self.aggregations, &self.status, &self.store)?)
    }

    /// The offsets of the write in flight if it has completed (without
    /// waiting for it).
    pub fn poll_flush(&mut self) -> Result<FlushOffsets, PipelineError> {
        Ok(self.flusher.poll(&mut self.aggregations, &self.status)?)
    }

    /// Applies one batch to every aggregation (in memory, until the next
    /// [`BatchApplier::flush`]) and delivers its dead letters; returns the
    /// next offset of every partition in the batch. Nothing of a batch that
    /// fails is kept.
    pub fn apply(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<FlushOffsets, PipelineError> {
        self.apply_feed(batch, Feed::Live, shutdown)
    }

    /// Applies records read again for the aggregations catching up on
    /// their partitions (each from its own next offset), like
    /// [`BatchApplier::apply`]; the partitions' live offsets stay.
    pub fn apply_catch_up(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let partitions = self.apply_feed(batch, Feed::CatchUp, shutdown)?;
        let mut progress = CatchUpOffsets::new();
        for aggregation in &mut self.aggregations {
            for ((topic, partition), next) in &partitions {
                if let Some(own) = aggregation.catch_up.get_mut(&(topic.clone(), *partition)) {
                    *own = (*own).max(*next);
                    let key = (topic.clone(), *partition, aggregation.config.name.clone());
                    progress.insert(key, Some(*own));
                }
            }
        }
        self.flusher.caught_up_to(progress);
        Ok(())
    }

    /// Aggregations start catching up on a partition this instance now
    /// owns, from their stored next offsets.
    pub fn start_catch_up(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        from: &BTreeMap<String, i64>,
    ) {
        for aggregation in &mut self.aggregations {
            if let Some(&next) = from.get(&aggregation.config.name) {
                aggregation
                    .catch_up
                    .insert((topic.clone(), partition), next);
                self.status
                    .set_catch_up(&aggregation.config.name, topic, partition, Some(next));
            }
        }
    }

    /// The aggregations catching up on a partition have applied every
    /// record before `at`; where that reaches the partition's live offset
    /// (`live`), they follow the live records from now on (written with
    /// the next flush).
    pub fn catch_up_reached(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        at: i64,
        live: Option<i64>,
    ) {
        let mut progress = CatchUpOffsets::new();
        for aggregation in &mut self.aggregations {
            let key = (topic.clone(), partition);
            if !aggregation.catch_up.contains_key(&key) {
                continue;
            }
            if live.is_some_and(|live| at < live) {
                // The reader stopped short of the live records: keep the
                // aggregation apart (it is retried at the next assignment).
                tracing::error!(aggregation = %aggregation.config.name, %topic, partition, at, ?live, "catch-up stopped before the live offset");
                continue;
            }
            aggregation.catch_up.remove(&key);
            tracing::info!(aggregation = %aggregation.config.name, %topic, partition, at, "caught up: following the live records");
            progress.insert(
                (topic.clone(), partition, aggregation.config.name.clone()),
                None,
            );
        }
        self.flusher.caught_up_to(progress);
    }

    fn apply_feed(
        &mut self,
        batch: &[SourceRecord],
        feed: Feed,
        shutdown: &AtomicBool,
    ) -> Result<FlushOffsets, PipelineError> {
        let started = Instant::now();
        self.start_workers()?;
        let partitions = next_offsets(batch);
        let mut slots = self.slots(&partitions)?;
        let mut changes = Vec::with_capacity(self.aggregations.len());
        let mut counters = Vec::with_capacity(self.aggregations.len());
        let mut windowed = Vec::with_capacity(self.aggregations.len());
        let mut letters = Vec::new();
        let parallel = self.cost_per_record_ns * batch.len() as f64 >= PARALLEL_FROM_NS;
        let workers = self.workers.as_ref().filter(|_| parallel);
        let threads = workers.map_or(1, |w| w.current_num_threads() + 1);
        for aggregation in &mut self.aggregations {
            let mut staged =
                apply_aggregation(aggregation, feed, batch, &mut slots, (&self.store, workers))?;
            changes.push(staged.changes);
            counters.push(staged.counters);
            windowed.push(staged.windowed);
            letters.append(&mut staged.letters);
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
        set_states(&mut self.aggregations, changes, workers);
        for ((aggregation, counters), windowed) in
            self.aggregations.iter_mut().zip(counters).zip(windowed)
        {
            aggregation.applied = counters;
            if let Some(windowing) = &mut aggregation.windowing {
                let moved: Vec<Partition> = windowed.stream_times.keys().cloned().collect();
                windowing.keep(windowed);
                delete_expired_windows(aggregation, &moved, &mut slots, &self.store)?;
            }
            aggregation.states.evict_if_over();
        }
        if feed == Feed::Live {
            self.flusher.applied(&partitions);
        }
        let elapsed = started.elapsed();
        if !batch.is_empty() {
            // Wall time × threads: the work, as if done on one thread.
            let cost = elapsed.as_nanos() as f64 * threads as f64 / batch.len() as f64;
            self.cost_per_record_ns = 0.9 * self.cost_per_record_ns + 0.1 * cost;
        }
        let metrics = self.status.metrics();
        metrics.batch_records.observe(batch.len() as f64);
        metrics.batch_seconds.observe(elapsed.as_secs_f64());
        Ok(partitions)
    }

    /// Starts the worker threads the split aggregations need (the
    /// consumer thread is one of them), once.
    fn start_workers(&mut self) -> Result<(), PipelineError> {
        let wanted = self
            .aggregations
            .iter()
            .map(|a| a.siblings.len())
            .max()
            .unwrap_or(0);
        if wanted == 0 || self.workers.is_some() {
            return Ok(());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(wanted)
            .thread_name(|i| format!("wagg-apply-{}", i + 1))
            .build()
            .map_err(|e| PipelineError::Workers(e.to_string()))?;
        self.workers = Some(pool);
        Ok(())
    }

    /// The store slot of every partition in the batch.
    fn slots(&mut self, partitions: &FlushOffsets) -> Result<PartitionMap<Slot>, StoreError> {
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
        Ok(slots)
    }
}

/// Forgets where an aggregation was catching up (its state was cleared,
/// or it migrates first), in `status` too.
fn stop_catching_up(aggregation: &mut Aggregation, status: &Status) {
    for (topic, partition) in std::mem::take(&mut aggregation.catch_up).into_keys() {
        status.set_catch_up(&aggregation.config.name, &topic, partition, None);
    }
}

/// The next offset of every partition in `batch`.
fn next_offsets(batch: &[SourceRecord]) -> FlushOffsets {
    let mut partitions = FlushOffsets::new();
    // Records come in runs per partition: one map update per run.
    for run in batch.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
        let last = run.iter().map(|r| r.offset).max().unwrap_or_default();
        let next = partitions
            .entry((run[0].topic.clone(), run[0].partition))
            .or_insert(0);
        *next = (*next).max(last + 1);
    }
    partitions
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

/// Runs the records of `batch` that `aggregation` consumes through its
/// plugin and returns the resulting state changes and the aggregation's
/// counters as they will be once the batch is written (and its dead
/// letters, under `on_error = "dead-letter"`).
fn apply_aggregation<'b>(
    aggregation: &mut Aggregation,
    feed: Feed,
    batch: &'b [SourceRecord],
    slots: &mut PartitionMap<Slot>,
    (store, workers): (&StateStore, Option<&rayon::ThreadPool>),
) -> Result<Staged<'b>, PipelineError> {
    if aggregation.windowing.is_none() {
        return apply_plain(aggregation, feed, batch, slots, (store, workers));
    }
    let mut changes = Vec::new();
    let mut stage = |change| changes.push(change);
    let mut counters = aggregation.applied;
    let Keyed {
        mut keyed,
        mut rejected,
        mut late,
        null_keys,
        mut windowed,
        considered,
        arrivals,
    } = key_records(&aggregation.keying(), feed, batch.iter(), slots);
    counters.records_dropped += null_keys as u64;
    let considered = considered - null_keys;
    let mut sessions = plan_sessions(aggregation, store, arrivals, &mut windowed)?;
    keyed.append(&mut sessions.keyed);
    late.append(&mut sessions.late);
    counters.records_late += late.len() as u64;
    let mut letters = late_letters(aggregation, &late);
    if keyed.is_empty() && rejected.is_empty() {
        counters.records_dead_lettered += letters.len() as u64;
        counters.records_applied += (considered - late.len()) as u64;
        return Ok(Staged {
            changes: vec![changes],
            counters,
            letters,
            windowed,
        });
    }
    let groups = group_by_key(keyed);
    let store_keys = load_states(
        aggregation.states.shard_mut(0),
        (&aggregation.config.name, &aggregation.instruments),
        &groups,
        &sessions.merged,
        store,
    )?;
    let plugin_keys: Vec<Cow<'_, [u8]>> = groups
        .iter()
        .map(|((_, key), _)| plugin_key(aggregation, key))
        .collect();
    let cached = &aggregation.states;
    let inputs: Vec<GroupInput<'_>> = groups
        .iter()
        .zip(&store_keys)
        .zip(&plugin_keys)
        .map(|(((_, records), store_key), key)| GroupInput {
            key,
            state: match sessions.merged.get(store_key.as_slice()) {
                Some(merged) => merged.as_deref(),
                None => cached.peek(store_key).and_then(|state| state.as_deref()),
            },
            records,
        })
        .collect();
    let outcome = call_plugin(
        &mut aggregation.instance,
        &aggregation.config,
        &aggregation.instruments,
        &inputs,
    )?;
    for (group, failure) in &outcome.failures {
        rejected.push((groups[*group].1[failure.index], failure.message.clone()));
    }
    if aggregation.windowing.is_some() {
        // A record in several windows is rejected once.
        let mut seen = HashSet::new();
        rejected.retain(|(record, _)| seen.insert(std::ptr::from_ref(*record)));
    }
    letters.extend(route_rejected(aggregation, &rejected)?);
    // Sessions left without a state (every record rejected, or deleted by
    // the plugin) are not stored: the session index must not have them.
    let mut stateless = HashSet::new();
    let sessions_windowed = aggregation
        .windowing
        .as_ref()
        .is_some_and(|w| w.spec.is_session());
    for (store_key, change) in store_keys.into_iter().zip(outcome.changes) {
        let merged = sessions.merged.remove(store_key.as_slice());
        // The key moves into the staged write; only a session left without
        // a state keeps a copy (rare), so no allocation per group.
        match change {
            // A session made of others is a new key: its state is written
            // even if the records left it as merged.
            Change::Unchanged => match merged {
                Some(Some(state)) => stage((store_key, Some(state))),
                Some(None) if sessions_windowed => {
                    stateless.insert(store_key);
                }
                Some(None) => {}
                None => {
                    let has_state = matches!(aggregation.states.peek(&store_key), Some(Some(_)));
                    if sessions_windowed && !has_state {
                        stateless.insert(store_key);
                    }
                }
            },
            Change::Set(state) => stage((store_key, Some(state))),
            Change::Delete => {
                if sessions_windowed {
                    stateless.insert(store_key.clone());
                }
                stage((store_key, None));
            }
        }
    }
    if !stateless.is_empty() {
        for (slot_key, sessions) in &mut windowed.sessions {
            let slot = &slot_key[..Slot::LEN];
            sessions.retain(|s| !stateless.contains([slot, &s.key].concat().as_slice()));
        }
    }
    for store_key in sessions.absorbed {
        stage((InlineKey::from_vec(store_key), None));
    }
    counters.records_dead_lettered += letters.len() as u64;
    counters.records_failed += rejected.len() as u64;
    counters.records_applied += (considered - rejected.len() - late.len()) as u64;
    Ok(Staged {
        changes: vec![changes],
        counters,
        letters,
        windowed,
    })
}

/// A batch whose work is estimated below this (ns: its records times the
/// recent cost per record) is applied by the workers' shards one after the
/// other on the consumer thread: handing a shard to another thread costs
/// 10-15 µs and a wake-up. Measured on two cores with 1,000-record
/// batches: `count` at 1,000 keys (≈ 0.3 ms of work) lost 13 % in
/// parallel, `stats` (≈ 0.65 ms) gained 17 %.
const PARALLEL_FROM_NS: f64 = 400_000.0;

/// The cost per record assumed before any is measured (a small plugin).
const INITIAL_COST_PER_RECORD_NS: f64 = 1_000.0;

/// What one worker's records did to a plain aggregation.
struct ShardOutcome<'b> {
    changes: Changes,
    rejected: Rejected<'b>,
    considered: usize,
    null_keys: usize,
}

/// [`apply_aggregation`] for an aggregation without windows: each worker
/// applies the records of its partitions with its own plugin instance and
/// cache shard (in parallel when the aggregation is split across
/// workers); their outcomes are then joined in worker order, as one batch.
fn apply_plain<'b>(
    aggregation: &mut Aggregation,
    feed: Feed,
    batch: &'b [SourceRecord],
    slots: &mut PartitionMap<Slot>,
    (store, workers): (&StateStore, Option<&rayon::ThreadPool>),
) -> Result<Staged<'b>, PipelineError> {
    let Aggregation {
        config,
        instance,
        siblings,
        states,
        catch_up,
        migrating,
        instruments,
        ..
    } = aggregation;
    let keying = Keying {
        config,
        catch_up,
        migrating: migrating.is_some(),
        windowing: None,
    };
    let shards = states.shard_count();
    let mut jobs = std::iter::once(instance)
        .chain(siblings.iter_mut())
        .zip(states.shards_mut())
        .enumerate();
    let mut outcomes: Vec<Option<Result<ShardOutcome<'b>, PipelineError>>> =
        (0..shards).map(|_| None).collect();
    let shared = (&keying, &*instruments, store);
    match workers {
        Some(workers) if shards > 1 => workers.in_place_scope(|scope| {
            let mut jobs = jobs.by_ref().zip(outcomes.iter_mut());
            let first = jobs.next();
            for ((index, (instance, cache)), outcome) in jobs {
                let mut slots = slots.clone();
                scope.spawn(move |_| {
                    let records = batch.iter().filter(move |r| in_shard(r, index, shards));
                    *outcome = Some(apply_shard(
                        shared, instance, cache, records, feed, &mut slots,
                    ));
                });
            }
            // The consumer thread is the first worker.
            if let Some(((_, (instance, cache)), outcome)) = first {
                let records = batch.iter().filter(|r| in_shard(r, 0, shards));
                *outcome = Some(apply_shard(shared, instance, cache, records, feed, slots));
            }
        }),
        _ => {
            for ((index, (instance, cache)), outcome) in jobs.by_ref().zip(outcomes.iter_mut()) {
                let records = batch.iter().filter(|r| in_shard(r, index, shards));
                *outcome = Some(apply_shard(shared, instance, cache, records, feed, slots));
            }
        }
    }
    let mut counters = aggregation.applied;
    let mut rejected = Vec::new();
    let mut considered = 0;
    let mut changes = Vec::with_capacity(shards);
    for outcome in outcomes.into_iter().flatten() {
        let mut outcome = outcome?;
        rejected.append(&mut outcome.rejected);
        considered += outcome.considered - outcome.null_keys;
        counters.records_dropped += outcome.null_keys as u64;
        changes.push(outcome.changes);
    }
    let letters = route_rejected(aggregation, &rejected)?;
    counters.records_dead_lettered += letters.len() as u64;
    counters.records_failed += rejected.len() as u64;
    counters.records_applied += (considered - rejected.len()) as u64;
    Ok(Staged {
        changes,
        counters,
        letters,
        windowed: WindowedBatch::default(),
    })
}

/// Puts a successful batch's state changes into the aggregations' caches:
/// each worker sets those of its own shard of every aggregation.
fn set_states(
    aggregations: &mut [Aggregation],
    changes: Vec<Vec<Changes>>,
    workers: Option<&rayon::ThreadPool>,
) {
    let mut by_shard: Vec<Vec<(&mut CacheShard, Changes)>> = Vec::new();
    for (aggregation, changes) in aggregations.iter_mut().zip(changes) {
        for (index, (shard, changes)) in aggregation
            .states
            .shards_mut()
            .iter_mut()
            .zip(changes)
            .enumerate()
        {
            if by_shard.len() <= index {
                by_shard.push(Vec::new());
            }
            by_shard[index].push((shard, changes));
        }
    }
    let set = |jobs: Vec<(&mut CacheShard, Changes)>| {
        for (shard, changes) in jobs {
            for (key, state) in changes {
                shard.set(&key, state);
            }
        }
    };
    match workers {
        Some(workers) if by_shard.len() > 1 => workers.in_place_scope(|scope| {
            let mut jobs = by_shard.into_iter();
            let first = jobs.next();
            for job in jobs {
                scope.spawn(move |_| set(job));
            }
            first.into_iter().for_each(set);
        }),
        _ => by_shard.into_iter().for_each(set),
    }
}

/// Whether a record is the `index`th of `shards` workers' to apply.
fn in_shard(record: &SourceRecord, index: usize, shards: usize) -> bool {
    shards == 1 || shard_of(record.partition as u32, shards) == index
}

/// One worker's part of [`apply_plain`]: its records grouped by key, their
/// states from its cache shard (misses from RocksDB), one plugin call.
fn apply_shard<'b>(
    (keying, instruments, store): (&Keying<'_>, &Instruments, &StateStore),
    instance: &mut PluginInstance,
    cache: &mut CacheShard,
    records: impl Iterator<Item = &'b SourceRecord>,
    feed: Feed,
    slots: &mut PartitionMap<Slot>,
) -> Result<ShardOutcome<'b>, PipelineError> {
    let Keyed {
        keyed,
        mut rejected,
        null_keys,
        considered,
        ..
    } = key_records(keying, feed, records, slots);
    let mut outcome = ShardOutcome {
        changes: Vec::new(),
        rejected: Vec::new(),
        considered,
        null_keys,
    };
    if keyed.is_empty() {
        outcome.rejected = rejected;
        return Ok(outcome);
    }
    let config = keying.config;
    let groups = group_by_key(keyed);
    let store_keys = load_states(
        cache,
        (&config.name, instruments),
        &groups,
        &HashMap::new(),
        store,
    )?;
    let inputs: Vec<GroupInput<'_>> = groups
        .iter()
        .zip(&store_keys)
        .map(|(((_, key), records), store_key)| GroupInput {
            key,
            state: cache.peek(store_key).and_then(|state| state.as_deref()),
            records,
        })
        .collect();
    let result = call_plugin(instance, config, instruments, &inputs)?;
    drop(inputs);
    for (group, failure) in result.failures {
        rejected.push((groups[group].1[failure.index], failure.message));
    }
    outcome.rejected = rejected;
    outcome.changes.reserve(store_keys.len());
    for (store_key, change) in store_keys.into_iter().zip(result.changes) {
        match change {
            Change::Unchanged => {}
            Change::Set(state) => outcome.changes.push((store_key, Some(state))),
            Change::Delete => outcome.changes.push((store_key, None)),
        }
    }
    Ok(outcome)
}

/// One plugin call for `inputs`, timed.
fn call_plugin(
    instance: &mut PluginInstance,
    config: &AggregationConfig,
    instruments: &Instruments,
    inputs: &[GroupInput<'_>],
) -> Result<BatchOutcome, PipelineError> {
    let started = Instant::now();
    let outcome = instance
        .apply_batch(inputs, config.on_error)
        .map_err(|error| PipelineError::Plugin {
            aggregation: config.name.clone(),
            error,
        })?;
    instruments
        .plugin_call_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(outcome)
}

type Rejected<'b> = Vec<(&'b SourceRecord, String)>;

/// The records of a batch an aggregation consumes, sorted out.
struct Keyed<'b> {
    /// Each record with its group key (windowed: once per open window).
    keyed: Vec<(GroupKey<'b>, &'b SourceRecord)>,
    /// Records without a group key (a re-keying field or an event time
    /// missing).
    rejected: Rejected<'b>,
    /// Windowed: records whose windows had all closed.
    late: Vec<&'b SourceRecord>,
    /// Records without a Kafka key in an aggregation keyed by it: not
    /// aggregated (as Kafka Streams), counted in `records_dropped`.
    null_keys: usize,
    windowed: WindowedBatch,
    /// How many records the aggregation consumes in the batch.
    considered: usize,
    /// Session windows: the records of each key, placed by
    /// [`plan_sessions`].
    arrivals: Vec<(GroupKey<'b>, GroupItems<Arrival<&'b SourceRecord>>)>,
}

/// The group key of each record the aggregation consumes, and the records
/// that have none.
fn key_records<'b>(
    aggregation: &Keying<'_>,
    feed: Feed,
    records: impl Iterator<Item = &'b SourceRecord>,
    slots: &mut PartitionMap<Slot>,
) -> Keyed<'b> {
    let mut out = Keyed {
        keyed: Vec::new(),
        rejected: Vec::new(),
        late: Vec::new(),
        null_keys: 0,
        windowed: WindowedBatch::default(),
        considered: 0,
        arrivals: Vec::new(),
    };
    let mut arrivals = Vec::new();
    for record in records.filter(|r| aggregation.takes(feed, r)) {
        out.considered += 1;
        let Some(slot) = slots.get(&record.topic, record.partition) else {
            // Every record's partition has a slot (`BatchApplier::slots`).
            continue;
        };
        if record.key.is_none() && aggregation.config.key.is_none() {
            out.null_keys += 1;
            continue;
        }
        let key = match group_key(aggregation.config, record, slot) {
            Ok(key) => key,
            Err(message) => {
                out.rejected.push((record, message));
                continue;
            }
        };
        let Some(windowing) = aggregation.windowing else {
            out.keyed.push((key, record));
            continue;
        };
        if windowing.spec.is_session() {
            match windowing.advance(&mut out.windowed, record) {
                Ok((time, stream_time)) => arrivals.push((
                    key,
                    Arrival {
                        record,
                        time,
                        stream_time,
                    },
                )),
                Err(message) => out.rejected.push((record, message)),
            }
            continue;
        }
        match windowing.place(&mut out.windowed, record, key.0, &key.1) {
            Ok(windows) if windows.is_empty() => out.late.push(record),
            Ok(windows) => out.keyed.extend(windows.into_iter().map(|w| (w, record))),
            Err(message) => out.rejected.push((record, message)),
        }
    }
    out.arrivals = group_by_key(arrivals);
    out
}

/// What the records of a batch do to a session-windowed aggregation's
/// sessions.
#[derive(Default)]
struct SessionBatch<'b> {
    /// Each record with the key of the session it is in.
    keyed: Vec<(GroupKey<'b>, &'b SourceRecord)>,
    /// Records whose session had closed.
    late: Vec<&'b SourceRecord>,
    /// Store key → the state a session made of stored ones starts from
    /// (their states merged); sessions updated in place are not here.
    merged: HashMap<Vec<u8>, State>,
    /// Store keys of the stored sessions that became part of another.
    absorbed: Vec<Vec<u8>>,
}

/// The most sessions of one key read to place its records (retention
/// over gap bounds how many there can be).
const MAX_SESSIONS_PER_KEY: usize = 1_000_000;

/// Places each key's records in its sessions (see `apply::session`):
/// takes the key's sessions from the index (else the store and the
/// cache's unwritten ones), plans, and merges the states of stored
/// sessions that become one with the plugin's `merge`.
fn plan_sessions<'b>(
    aggregation: &mut Aggregation,
    store: &StateStore,
    arrivals: Vec<(GroupKey<'b>, GroupItems<Arrival<&'b SourceRecord>>)>,
    windowed: &mut WindowedBatch,
) -> Result<SessionBatch<'b>, PipelineError> {
    let mut out = SessionBatch::default();
    let Some(windowing) = &aggregation.windowing else {
        return Ok(out);
    };
    let spec = windowing.spec.clone();
    for ((slot, key), arrivals) in arrivals {
        let slot_key = slot.store_key(&key);
        let indexed = aggregation
            .windowing
            .as_ref()
            .and_then(|w| w.sessions.get(&slot_key))
            .map(<[StoredSession]>::to_vec);
        let stored = match indexed {
            Some(stored) => stored,
            None => stored_sessions(aggregation, store, slot, &key)?,
        };
        let plan = session::plan(&spec, stored.clone(), &arrivals);
        out.late.extend(plan.late);
        let absorbed: Vec<&StoredSession> =
            plan.sessions.iter().flat_map(|s| &s.absorbed).collect();
        let mut after: Vec<StoredSession> = stored
            .iter()
            .filter(|s| !absorbed.contains(s))
            .cloned()
            .collect();
        for planned in &plan.sessions {
            if let Some(first) = planned.records.first() {
                windowed.opened(first, planned.window.end);
            }
            let in_slot = session_key(&key, planned.window.start, planned.window.end);
            if !planned.in_place() {
                let mut states = Vec::with_capacity(planned.absorbed.len());
                for session in &planned.absorbed {
                    states.extend(session_state(aggregation, store, slot, &session.key)?);
                }
                let merged = merge_states(aggregation, &mut states.into_iter())?;
                out.merged.insert(slot.store_key(&in_slot), merged);
                out.absorbed
                    .extend(planned.absorbed.iter().map(|s| slot.store_key(&s.key)));
            }
            after.push(StoredSession {
                key: in_slot.clone(),
                window: planned.window,
            });
            let group = (slot, Cow::<[u8]>::Owned(in_slot));
            out.keyed.extend(
                planned
                    .records
                    .iter()
                    .map(|&record| (group.clone(), record)),
            );
        }
        after.sort_by_key(|s| s.window.start);
        windowed.sessions.push((slot_key, after));
    }
    Ok(out)
}

/// The sessions of `key` in `slot`: the cache's unwritten changes over
/// what RocksDB holds, in start order.
fn stored_sessions(
    aggregation: &Aggregation,
    store: &StateStore,
    slot: Slot,
    key: &[u8],
) -> Result<Vec<StoredSession>, StoreError> {
    let Some(windowing) = &aggregation.windowing else {
        return Ok(Vec::new());
    };
    let cache = &aggregation.states;
    let name = &aggregation.config.name;
    let mut found: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (_, in_slot, _) in store.windows_of_key(name, Some(slot), key, MAX_SESSIONS_PER_KEY)? {
        // A deletion not yet written hides it.
        if !matches!(cache.peek(&slot.store_key(&in_slot)), Some(None)) {
            found.insert(in_slot);
        }
    }
    for store_key in cache.unwritten_keys(&slot.store_key(&window_prefix(key))) {
        found.insert(store_key[Slot::LEN..].to_vec());
    }
    Ok(found
        .into_iter()
        .filter_map(|in_slot| {
            let split = split_window_key(&in_slot)?;
            let window = windowing.spec.window_at(split.start, split.session_end);
            Some(StoredSession {
                key: in_slot,
                window,
            })
        })
        .collect())
}

/// The newest state of a stored session (`None`: it has none).
fn session_state(
    aggregation: &mut Aggregation,
    store: &StateStore,
    slot: Slot,
    in_slot: &[u8],
) -> Result<State, StoreError> {
    if let Some(state) = aggregation.states.get(&slot.store_key(in_slot)) {
        return Ok(state.clone());
    }
    Ok(store
        .multi_get(&aggregation.config.name, &[(slot, in_slot)])?
        .into_iter()
        .next()
        .flatten())
}

/// The plugin's `merge` of `states` in order (`None`: there were none).
fn merge_states(
    aggregation: &mut Aggregation,
    states: &mut dyn Iterator<Item = Vec<u8>>,
) -> Result<State, PipelineError> {
    let Some(mut merged) = states.next() else {
        return Ok(None);
    };
    for next in states {
        merged = aggregation
            .instance
            .merge(&merged, &next)
            .map_err(|error| PipelineError::Plugin {
                aggregation: aggregation.config.name.clone(),
                error,
            })?;
    }
    Ok(Some(merged))
}

/// The key the plugin sees for a group: the aggregation key, without the
/// window of a windowed aggregation.
fn plugin_key<'k>(aggregation: &Aggregation, key: &'k [u8]) -> Cow<'k, [u8]> {
    match &aggregation.windowing {
        Some(_) => split_window_key(key).map_or(Cow::Borrowed(key), |split| Cow::Owned(split.key)),
        None => Cow::Borrowed(key),
    }
}

/// The dead letters of late records (`on_error = "dead-letter"`; else
/// they are only counted). Late records never stop consumption.
fn late_letters<'b>(aggregation: &Aggregation, late: &[&'b SourceRecord]) -> Vec<DeadLetter<'b>> {
    if aggregation.config.on_error != OnError::DeadLetter {
        return Vec::new();
    }
    let metadata = aggregation.plugin.metadata();
    let error = match &aggregation.windowing {
        Some(windowing) if windowing.spec.is_session() => {
            "late: the record's session had closed (stream time passed the session's last record + gap + grace)"
        }
        _ => {
            "late: every window of the record's event time had closed (stream time passed window end + grace)"
        }
    };
    late.iter()
        .map(|record| DeadLetter {
            aggregation: aggregation.config.name.clone(),
            plugin: metadata.name.clone(),
            plugin_version: metadata.version.clone(),
            error: error.into(),
            record,
        })
        .collect()
}

/// Stages the deletion of the windows past retention on the partitions
/// whose stream time moved (see `Windowing::sweep`).
fn delete_expired_windows(
    aggregation: &mut Aggregation,
    moved: &[Partition],
    slots: &mut PartitionMap<Slot>,
    store: &StateStore,
) -> Result<(), StoreError> {
    let Some(windowing) = &mut aggregation.windowing else {
        return Ok(());
    };
    for partition in moved {
        let Some(slot) = slots.get(&partition.0, partition.1) else {
            continue;
        };
        let swept = windowing.sweep(
            store,
            &aggregation.states,
            &aggregation.config.name,
            partition,
            slot,
        )?;
        if let Some(expired) = swept {
            for store_key in expired {
                if let Some(last) = unemitted_last_state(
                    aggregation.config.emit.as_ref().map(|e| e.mode),
                    windowing,
                    &aggregation.states,
                    store,
                    (&aggregation.config.name, partition, slot),
                    &store_key,
                )? {
                    aggregation.emit_expired.push((store_key.clone(), last));
                }
                aggregation.states.set(&store_key, None);
            }
        }
    }
    Ok(())
}

/// The last state of a window being deleted past retention that its
/// aggregation has yet to emit: in `changes` mode, one changed since the
/// last flush (a burst of old records opens and expires windows between
/// two flushes); in `final` mode, one that had not closed as of the last
/// flush (it closes and expires in this one).
fn unemitted_last_state(
    mode: Option<EmitMode>,
    windowing: &Windowing,
    states: &StateCache,
    store: &StateStore,
    (aggregation, partition, slot): (&str, &Partition, Slot),
    store_key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    match mode {
        None => Ok(None),
        Some(EmitMode::Changes) => Ok(states
            .is_dirty(store_key)
            .then(|| states.peek(store_key).cloned().flatten())
            .flatten()),
        Some(EmitMode::Final) => {
            let in_slot = &store_key[slot.store_key(&[]).len()..];
            let Some(split) = split_window_key(in_slot) else {
                return Ok(None);
            };
            let window = windowing.spec.window_at(split.start, split.session_end);
            if windowing.closed_as_written(partition, window) {
                return Ok(None);
            }
            match states.peek(store_key) {
                Some(cached) => Ok(cached.clone()),
                None => store.get(aggregation, slot, in_slot),
            }
        }
    }
}

/// Makes every group's current state peekable in the aggregation's cache:
/// cached ones as they are, the rest from RocksDB in one lookup — except
/// the groups whose state is `starting` (new sessions). Returns the
/// groups' store keys.
fn load_states(
    cache: &mut CacheShard,
    (name, instruments): (&str, &Instruments),
    groups: &[(GroupKey<'_>, GroupItems<&SourceRecord>)],
    starting: &HashMap<Vec<u8>, State>,
    store: &StateStore,
) -> Result<Vec<InlineKey>, StoreError> {
    let store_keys: Vec<InlineKey> = groups
        .iter()
        .map(|((slot, key), _)| slot.inline_key(key))
        .collect();
    let misses: Vec<usize> = (0..groups.len())
        .filter(|&i| {
            !starting.contains_key(store_keys[i].as_slice()) && cache.get(&store_keys[i]).is_none()
        })
        .collect();
    if !misses.is_empty() {
        let lookups: Vec<(Slot, &[u8])> = misses
            .iter()
            .map(|&i| (groups[i].0.0, groups[i].0.1.as_ref()))
            .collect();
        for (&i, state) in misses.iter().zip(store.multi_get(name, &lookups)?) {
            cache.insert_loaded(&store_keys[i], state);
        }
    }
    let hits = groups.len() - misses.len();
    instruments.hits.inc_by(hits as u64);
    instruments.misses.inc_by(misses.len() as u64);
    Ok(store_keys)
}

/// Applies the aggregation's `on_error` to its rejected records: stop
/// (`fail`), or log them and return their dead letters (none for `skip`).
fn route_rejected<'b>(
    aggregation: &Aggregation,
    rejected: &Rejected<'b>,
) -> Result<Vec<DeadLetter<'b>>, PipelineError> {
    let name = &aggregation.config.name;
    let on_error = aggregation.config.on_error;
    if let Some((record, message)) = rejected.first()
        && on_error == OnError::Fail
    {
        return Err(PipelineError::RecordRejected {
            aggregation: name.clone(),
            position: record.position(),
            message: message.clone(),
        });
    }
    for (record, message) in rejected {
        tracing::warn!(aggregation = %name, position = %record.position(), %message, policy = ?on_error, "record rejected");
    }
    if on_error != OnError::DeadLetter {
        return Ok(Vec::new());
    }
    let metadata = aggregation.plugin.metadata();
    Ok(rejected
        .iter()
        .map(|(record, message)| DeadLetter {
            aggregation: name.clone(),
            plugin: metadata.name.clone(),
            plugin_version: metadata.version.clone(),
            error: message.clone(),
            record,
        })
        .collect())
}
