//! The flush state machine: when the applied effects are handed to the
//! writer thread, and what moves forward once a write is durable.
//!
//! Effects wait in memory (each aggregation's [`StateCache`] holds its
//! dirty states, this holds their partitions' next offsets) until a flush:
//! every `batch.commit_interval_ms`, when too many states are waiting, when
//! idle, on revocation and on shutdown. A flush hands all waiting states,
//! the counters and the offsets to the writer as one [`FlushJob`] and the
//! consumer goes on applying; at most one job is in flight. Caches, status
//! and broker commits move forward only after the write succeeded; a failed
//! write's effects return to the waiting ones (what was applied since is
//! newer and wins), so nothing later is ever written without them.
//!
//! [`StateCache`]: crate::state::cache::StateCache

use std::time::{Duration, Instant};

use super::aggregation::Aggregation;
use super::emit::{closed_windows, emitted};
use crate::config::BatchConfig;
use crate::config::EmitMode;
use crate::ops::status::{AggregationCounters, Status};
use crate::state::cache::State;
use crate::state::flush::{
    CatchUpOffsets, FlushIds, FlushJob, FlushOffsets, FlushedAggregation, StreamTimes,
};
use crate::state::store::StateStore;
use crate::state::writer::{StateWriter, WriteError};

pub(super) struct Flusher {
    writer: StateWriter,
    /// What the write in flight (if any) makes durable besides states.
    in_flight: Option<InFlight>,
    /// Next offset per partition of the applied but unwritten effects.
    unwritten: FlushOffsets,
    /// Progress of aggregations catching up, applied but unwritten.
    unwritten_catch_up: CatchUpOffsets,
    /// When the oldest unwritten effect was applied.
    unwritten_since: Option<Instant>,
    commit_interval: Duration,
    /// Flush once this many states (over all aggregations) are waiting.
    max_dirty: usize,
}

/// The offsets and counters of the write in flight (its states are in
/// flight in each aggregation's `StateCache`).
struct InFlight {
    offsets: FlushOffsets,
    catch_up: CatchUpOffsets,
    counters: Vec<AggregationCounters>,
    stream_times: Vec<StreamTimes>,
    /// Per aggregation, the last states of expired windows the job emits
    /// (emitted again with the next flush if this one fails).
    emit_expired: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Flusher {
    pub(super) fn new(writer: StateWriter, batch: &BatchConfig) -> Self {
        Self {
            writer,
            in_flight: None,
            unwritten: FlushOffsets::new(),
            unwritten_catch_up: CatchUpOffsets::new(),
            unwritten_since: None,
            commit_interval: batch.commit_interval(),
            max_dirty: batch.max_unwritten_states.max(1),
        }
    }

    /// A batch reaching these next offsets was applied (its states are
    /// dirty in the caches).
    pub(super) fn applied(&mut self, partitions: &FlushOffsets) {
        for (partition, next) in partitions {
            self.unwritten.insert(partition.clone(), *next);
        }
        self.unwritten_since.get_or_insert_with(Instant::now);
    }

    /// Aggregations catching up reached these offsets (`None`: caught up).
    pub(super) fn caught_up_to(&mut self, progress: CatchUpOffsets) {
        if progress.is_empty() {
            return;
        }
        self.unwritten_catch_up.extend(progress);
        self.unwritten_since.get_or_insert_with(Instant::now);
    }

    /// Whether a flush is due: the oldest unwritten effect is older than
    /// the commit interval, or too many states are waiting.
    pub(super) fn due(&self, aggregations: &[Aggregation]) -> bool {
        self.unwritten_since
            .is_some_and(|since| since.elapsed() >= self.commit_interval)
            || aggregations
                .iter()
                .map(|a| a.states.dirty_len())
                .sum::<usize>()
                >= self.max_dirty
    }

    /// Hands every applied effect not yet written to the writer thread,
    /// after waiting for the write before it (if still running). Returns
    /// the offsets made durable meanwhile.
    pub(super) fn start(
        &mut self,
        aggregations: &mut [Aggregation],
        status: &Status,
        store: &StateStore,
    ) -> Result<FlushOffsets, WriteError> {
        let written = self.wait(aggregations, status)?;
        if self.unwritten.is_empty() && self.unwritten_catch_up.is_empty() {
            return Ok(written);
        }
        let ids = FlushIds::new(store, &self.unwritten, &self.unwritten_catch_up);
        let mut emits = Vec::new();
        let mut emit_expired = Vec::with_capacity(aggregations.len());
        let mut flushed = Vec::with_capacity(aggregations.len());
        // First, as it can fail: before any state goes in flight.
        let closed = aggregations
            .iter_mut()
            .map(|aggregation| closed_windows(aggregation, store))
            .collect::<Result<Vec<_>, _>>()?;
        for (aggregation, closed) in aggregations.iter_mut().zip(closed) {
            let states = aggregation.states.take_dirty();
            let last_states = std::mem::take(&mut aggregation.emit_expired);
            let expired: Vec<(Vec<u8>, State)> = last_states
                .iter()
                .map(|(key, state)| (key.clone(), Some(state.clone())))
                .collect();
            emits.append(&mut emitted(aggregation, &expired, &ids));
            emit_expired.push(last_states);
            let changes = match aggregation.config.emit.as_ref().map(|e| e.mode) {
                Some(EmitMode::Final) => &closed,
                _ => &states,
            };
            emits.append(&mut emitted(aggregation, changes, &ids));
            flushed.push(FlushedAggregation {
                name: aggregation.config.name.clone(),
                states,
                counters: aggregation.applied,
                stream_times: aggregation
                    .windowing
                    .as_mut()
                    .map(|w| w.take_unwritten())
                    .unwrap_or_default(),
                windowed: aggregation.windowing.is_some(),
            });
        }
        let job = FlushJob {
            aggregations: flushed,
            offsets: self.unwritten.clone(),
            catch_up: self.unwritten_catch_up.clone(),
            emits,
        };
        self.in_flight = Some(InFlight {
            offsets: std::mem::take(&mut self.unwritten),
            catch_up: std::mem::take(&mut self.unwritten_catch_up),
            counters: job.aggregations.iter().map(|a| a.counters).collect(),
            stream_times: job
                .aggregations
                .iter()
                .map(|a| a.stream_times.clone())
                .collect(),
            emit_expired,
        });
        self.unwritten_since = None;
        if let Err(e) = self.writer.submit(job) {
            self.take_back_in_flight(aggregations);
            return Err(e);
        }
        Ok(written)
    }

    /// The offsets of the write in flight if it has completed (without
    /// waiting for it).
    pub(super) fn poll(
        &mut self,
        aggregations: &mut [Aggregation],
        status: &Status,
    ) -> Result<FlushOffsets, WriteError> {
        let result = self.in_flight.is_some().then(|| self.writer.try_result());
        self.complete_if_done(result.flatten(), aggregations, status)
    }

    /// Waits for the write in flight (if any); returns the offsets it made
    /// durable.
    pub(super) fn wait(
        &mut self,
        aggregations: &mut [Aggregation],
        status: &Status,
    ) -> Result<FlushOffsets, WriteError> {
        let result = self.in_flight.is_some().then(|| self.writer.wait());
        self.complete_if_done(result, aggregations, status)
    }

    /// Completes the write in flight if `result` is its outcome (`None`:
    /// nothing in flight, or not done yet).
    fn complete_if_done(
        &mut self,
        result: Option<Result<(), WriteError>>,
        aggregations: &mut [Aggregation],
        status: &Status,
    ) -> Result<FlushOffsets, WriteError> {
        match result {
            None => Ok(FlushOffsets::new()),
            Some(result) => self.complete(result, aggregations, status),
        }
    }

    fn complete(
        &mut self,
        result: Result<(), WriteError>,
        aggregations: &mut [Aggregation],
        status: &Status,
    ) -> Result<FlushOffsets, WriteError> {
        if let Err(e) = result {
            // Kept for another attempt (at shutdown): nothing later may be
            // written without these states.
            self.take_back_in_flight(aggregations);
            return Err(e);
        }
        let Some(written) = self.in_flight.take() else {
            return Ok(FlushOffsets::new());
        };
        // Durable: now the views may move forward.
        for ((aggregation, counters), stream_times) in aggregations
            .iter_mut()
            .zip(written.counters)
            .zip(written.stream_times)
        {
            aggregation.states.write_completed();
            status.set_counters(&aggregation.config.name, counters);
            for ((topic, partition), time) in stream_times {
                status.set_stream_time(&aggregation.config.name, &topic, partition, time);
            }
        }
        for ((topic, partition), next) in &written.offsets {
            status.set_next_offset(topic, *partition, *next);
        }
        for ((topic, partition, aggregation), next) in written.catch_up {
            status.set_catch_up(&aggregation, &topic, partition, next);
        }
        Ok(written.offsets)
    }

    /// Returns a failed (or never started) write's effects to the unwritten
    /// ones; what was applied since is newer and wins.
    fn take_back_in_flight(&mut self, aggregations: &mut [Aggregation]) {
        let Some(failed) = self.in_flight.take() else {
            return;
        };
        for ((aggregation, stream_times), mut expired) in aggregations
            .iter_mut()
            .zip(&failed.stream_times)
            .zip(failed.emit_expired)
        {
            expired.append(&mut aggregation.emit_expired);
            aggregation.emit_expired = expired;
            aggregation.states.write_failed();
            if let Some(windowing) = &mut aggregation.windowing {
                windowing.unwritten_again(stream_times);
            }
        }
        for (partition, next) in failed.offsets {
            let entry = self.unwritten.entry(partition).or_insert(next);
            *entry = (*entry).max(next);
        }
        for (key, next) in failed.catch_up {
            self.unwritten_catch_up.entry(key).or_insert(next);
        }
        self.unwritten_since.get_or_insert_with(Instant::now);
    }
}
