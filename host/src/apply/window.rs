//! Windowed aggregations on the consumer thread: which windows a record
//! goes to, which records are late, each partition's stream time, and the
//! deletion of windows past retention (see `config::window` for the
//! arithmetic and `state::store::windowed` for the keys).
//!
//! A windowed aggregation keeps one state per key *and window*, under a
//! window key (`state::store::windowed`) in the record's partition slot;
//! the plugin sees the plain key and knows nothing of windows. Stream time
//! (the largest event time seen, per partition) moves record by record, so
//! whether a record is late depends only on the records before it in its
//! partition — the same after a crash and a replay. Stream times are
//! written with the states and offsets of the same flush; expired windows
//! are deleted by staging deletes, so the deletes travel the same way
//! (one write, the changelog). A partition is scanned for expired windows
//! only once retention reaches the oldest window end it may hold.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Window, WindowConfig};
use crate::record::SourceRecord;
use crate::state::cache::StateCache;
use crate::state::store::{Slot, StateStore, StoreError, split_window_key, window_key};

use super::group::GroupKey;
use super::session::{SessionIndex, StoredSession};

/// A partition: (topic, partition).
pub(super) type Partition = (Arc<str>, i32);

/// A window's store key and state.
pub(super) type StoredWindow = (Vec<u8>, Vec<u8>);

/// A windowed aggregation's window spec and stream times.
#[derive(Debug)]
pub(super) struct Windowing {
    pub(super) spec: WindowConfig,
    /// JSON pointer of the event time (`time`); the Kafka timestamp when
    /// `None`.
    time: Option<String>,
    /// Stream time per partition, applied records included.
    stream_times: HashMap<Partition, i64>,
    /// The stream times as last handed to the writer.
    written: HashMap<Partition, i64>,
    /// Per partition, the earliest end of a window that may still be
    /// stored (the last sweep's oldest survivor, or a window opened since):
    /// no sweep is needed before retention reaches it. In memory: after a
    /// restart, the first batch of a partition sweeps to learn it.
    oldest_end: HashMap<Partition, i64>,
    /// `emit.mode = "final"`: per partition, the earliest end of a window
    /// that may still be open (the last closing scan's earliest open one,
    /// or a window opened since): no window closes before stream time
    /// passes it. Unknown after a restart: the first flush scans.
    open_end: HashMap<Partition, i64>,
    /// Session windows: recently used keys' sessions.
    pub(super) sessions: SessionIndex,
}

/// What one batch does to a windowed aggregation, before it is kept.
#[derive(Default)]
pub(super) struct WindowedBatch {
    /// Stream times the batch moved.
    pub(super) stream_times: HashMap<Partition, i64>,
    /// The earliest end of the windows the batch opened, per partition.
    oldest_end: HashMap<Partition, i64>,
    /// Session windows: the sessions of each key the batch placed records
    /// of (`slot ‖ key` → all its sessions after the batch).
    pub(super) sessions: Vec<(Vec<u8>, Vec<StoredSession>)>,
}

impl WindowedBatch {
    /// The batch writes a window ending at `end` in `record`'s partition.
    pub(super) fn opened(&mut self, record: &SourceRecord, end: i64) {
        let partition = (record.topic.clone(), record.partition);
        let oldest = self.oldest_end.entry(partition).or_insert(end);
        *oldest = (*oldest).min(end);
    }
}

impl Windowing {
    /// No stream times yet; session windows index the sessions of up to
    /// `session_keys` keys.
    pub(super) fn new(spec: WindowConfig, time: Option<String>, session_keys: usize) -> Self {
        Self {
            spec,
            time,
            written: HashMap::new(),
            stream_times: HashMap::new(),
            oldest_end: HashMap::new(),
            open_end: HashMap::new(),
            sessions: SessionIndex::new(session_keys),
        }
    }

    /// Starts over from the stream times the store holds.
    pub(super) fn restore(&mut self, stored: impl IntoIterator<Item = (Partition, i64)>) {
        self.stream_times = stored.into_iter().collect();
        self.written = self.stream_times.clone();
        self.oldest_end.clear();
        self.open_end.clear();
        self.sessions.clear();
    }

    /// Every partition's stream time.
    pub(super) fn stream_times(&self) -> impl Iterator<Item = (&Partition, &i64)> {
        self.stream_times.iter()
    }

    /// A partition's stream time, with the batch's moves.
    fn stream_time(&self, batch: &WindowedBatch, partition: &Partition) -> Option<i64> {
        batch
            .stream_times
            .get(partition)
            .or_else(|| self.stream_times.get(partition))
            .copied()
    }

    /// Moves the stream time of `record`'s partition to its event time if
    /// later: `(event time, stream time)`. `Err`: it has no usable event
    /// time.
    pub(super) fn advance(
        &self,
        batch: &mut WindowedBatch,
        record: &SourceRecord,
    ) -> Result<(i64, i64), String> {
        let time = record.event_time(self.time.as_deref())?;
        let partition = (record.topic.clone(), record.partition);
        let stream_time = self
            .stream_time(batch, &partition)
            .map_or(time, |t| t.max(time));
        batch.stream_times.insert(partition, stream_time);
        Ok((time, stream_time))
    }

    /// The group keys of `record` (key `key` in `slot`) for a tumbling or
    /// hopping window: one per window it belongs to that is still open.
    /// `Ok(empty)`: the record is late. `Err`: it has no usable event time.
    pub(super) fn place<'r>(
        &self,
        batch: &mut WindowedBatch,
        record: &'r SourceRecord,
        slot: Slot,
        key: &[u8],
    ) -> Result<Vec<GroupKey<'r>>, String> {
        let (time, stream_time) = self.advance(batch, record)?;
        let open: Vec<Window> = self
            .spec
            .windows_of(time)
            .into_iter()
            .filter(|window| !self.spec.closed(*window, stream_time))
            .collect();
        if let Some(first) = open.first() {
            batch.opened(record, first.end);
        }
        Ok(open
            .into_iter()
            .map(|window| (slot, Cow::Owned(window_key(key, window.start))))
            .collect())
    }

    /// Sets a partition's stream time as stored (`None`: none yet).
    pub(super) fn load(&mut self, partition: Partition, stored: Option<i64>) {
        self.oldest_end.remove(&partition);
        self.open_end.remove(&partition);
        match stored {
            Some(time) => {
                self.stream_times.insert(partition.clone(), time);
                self.written.insert(partition, time);
            }
            None => {
                self.stream_times.remove(&partition);
                self.written.remove(&partition);
            }
        }
    }

    /// Keeps the stream times of a batch that succeeded.
    pub(super) fn keep(&mut self, batch: WindowedBatch) {
        self.stream_times.extend(batch.stream_times);
        for (slot_key, sessions) in batch.sessions {
            self.sessions.set(slot_key, sessions);
        }
        for (partition, end) in batch.oldest_end {
            // Unknown (not swept or scanned since the start): stays
            // unknown.
            for known in [&mut self.oldest_end, &mut self.open_end] {
                if let Some(oldest) = known.get_mut(&partition) {
                    *oldest = (*oldest).min(end);
                }
            }
        }
    }

    /// The partitions whose stream time moved since the last flush: their
    /// stream time as last handed on (`None`: never) and now.
    pub(super) fn moving(&self) -> Vec<(Partition, Option<i64>, i64)> {
        self.stream_times
            .iter()
            .filter(|(partition, time)| self.written.get(*partition) != Some(*time))
            .map(|(partition, &time)| {
                (
                    partition.clone(),
                    self.written.get(partition).copied(),
                    time,
                )
            })
            .collect()
    }

    /// Whether `window` of `partition` had closed at the stream time last
    /// handed on (so a flush already emitted it, in final mode).
    pub(super) fn closed_as_written(&self, partition: &Partition, window: Window) -> bool {
        self.written
            .get(partition)
            .is_some_and(|&time| self.spec.closed(window, time))
    }

    /// The stream times moved since the last flush, marked as handed on.
    pub(super) fn take_unwritten(&mut self) -> Vec<(Partition, i64)> {
        let moved: Vec<(Partition, i64)> = self
            .stream_times
            .iter()
            .filter(|(partition, time)| self.written.get(*partition) != Some(*time))
            .map(|(partition, time)| (partition.clone(), *time))
            .collect();
        self.written.extend(moved.iter().cloned());
        moved
    }

    /// A write of these stream times failed: they are written again with
    /// the next flush.
    pub(super) fn unwritten_again(&mut self, failed: &[(Partition, i64)]) {
        for (partition, _) in failed {
            self.written.remove(partition);
        }
    }

    /// Forgets every stream time (the aggregation was reset).
    pub(super) fn clear(&mut self) {
        self.sessions.clear();
        self.stream_times.clear();
        self.written.clear();
        self.oldest_end.clear();
        self.open_end.clear();
    }

    /// `emit.mode = "final"`: the windows of a partition that closed while
    /// its stream time moved from `from` (as last handed on; `None`: never)
    /// to `to` — stored ones and `cache`'s unwritten ones — with their
    /// states (deleted ones left out), in key order. No scan before `to`
    /// reaches the earliest end of a window that may be open.
    pub(super) fn closing(
        &mut self,
        store: &StateStore,
        cache: &StateCache,
        aggregation: &str,
        (partition, slot): (&Partition, Slot),
        (from, to): (Option<i64>, i64),
    ) -> Result<Vec<StoredWindow>, StoreError> {
        let spec = &self.spec;
        if let Some(&end) = self.open_end.get(partition)
            && !spec.closed(Window { start: end, end }, to)
        {
            return Ok(Vec::new());
        }
        let slot_prefix = slot.store_key(&[]);
        let mut closing: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
        let mut open_end = i64::MAX;
        let mut sort = |store_key: Vec<u8>, stored: Option<&[u8]>| {
            let Some(split) = split_window_key(&store_key[slot_prefix.len()..]) else {
                return;
            };
            let window = spec.window_at(split.start, split.session_end);
            if !spec.closed(window, to) {
                open_end = open_end.min(window.end);
            } else if !from.is_some_and(|from| spec.closed(window, from)) {
                closing.insert(store_key, stored.map(<[u8]>::to_vec));
            }
        };
        store.scan_slot(aggregation, slot, &mut |key, value| {
            sort(slot.store_key(key), Some(value));
            true
        })?;
        for store_key in cache.unwritten_keys(&slot_prefix) {
            sort(store_key, None);
        }
        self.open_end.insert(partition.clone(), open_end);
        // The newest state: the cache's (applied, maybe unwritten) first.
        Ok(closing
            .into_iter()
            .filter_map(|(store_key, stored)| {
                let state = match cache.peek(&store_key) {
                    Some(cached) => cached.clone()?,
                    None => stored?,
                };
                Some((store_key, state))
            })
            .collect())
    }

    /// The store keys of the partition's windows past retention at its
    /// stream time — stored ones, and `cache`'s not yet written — once
    /// retention has reached the oldest window that may be there (`None`
    /// before that). Deleting them is up to the caller.
    pub(super) fn sweep(
        &mut self,
        store: &StateStore,
        cache: &StateCache,
        aggregation: &str,
        partition: &Partition,
        slot: Slot,
    ) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        let Some(&stream_time) = self.stream_times.get(partition) else {
            return Ok(None);
        };
        let cutoff = stream_time.saturating_sub(self.spec.retention().millis());
        if self
            .oldest_end
            .get(partition)
            .is_some_and(|&oldest| oldest > cutoff)
        {
            return Ok(None);
        }
        let slot_prefix = slot.store_key(&[]);
        let mut expired = Vec::new();
        let mut oldest_kept = i64::MAX;
        let mut sort = |store_key: Vec<u8>| {
            let Some(split) = split_window_key(&store_key[slot_prefix.len()..]) else {
                return;
            };
            let window = self.spec.window_at(split.start, split.session_end);
            if self.spec.expired(window, stream_time) {
                let mut slot_key = slot_prefix.clone();
                slot_key.extend_from_slice(&split.key);
                self.sessions.forget(&slot_key);
                expired.push(store_key);
            } else {
                oldest_kept = oldest_kept.min(window.end);
            }
        };
        store.scan_slot(aggregation, slot, &mut |key, _| {
            sort(slot.store_key(key));
            true
        })?;
        // Windows made since the last write are not on disk yet.
        for store_key in cache.unwritten_keys(&slot_prefix) {
            sort(store_key);
        }
        self.oldest_end.insert(partition.clone(), oldest_kept);
        Ok(Some(expired))
    }
}
