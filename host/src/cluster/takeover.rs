//! Taking partitions over: make each partition's local state its newest
//! committed state (restoring it from the changelog unless it already is),
//! then claim the partition with a new epoch, which fences the previous
//! owner. Runs in the rebalance callback, before any record of the
//! partitions is applied.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::log::{self, Commit};
use super::{Cluster, ClusterError, mark_of};
use crate::state::store::{Slot, StateStore};

/// Per partition: its newest commit, and the highest epoch seen.
type NewestCommits = HashMap<(String, i32), (Option<Commit>, u64)>;

/// How long a read of a changelog partition may go without a record
/// before the restore gives up (and the partition stays unassigned).
const READ_STALL: Duration = Duration::from_secs(20);
/// Commit records read first (per source topic) when looking for a
/// partition's newest commit: the newest is almost always the last one, and
/// each record read costs a fetch on brokers that return a record batch per
/// fetch. A deposed owner would have to flush this many times after the new
/// owner's claim to hide the claim's epoch (see docs/scale-out.md).
pub(super) const COMMIT_WINDOW: i64 = 4;
/// The commit records to read per commits partition for `partitions`:
/// [`COMMIT_WINDOW`] per source topic (partition `p` of the commits topic
/// holds partition `p` of every source topic).
pub(super) fn commit_window(partitions: &[(String, i32)]) -> i64 {
    let topics = partitions
        .iter()
        .map(|(t, _)| t)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as i64;
    COMMIT_WINDOW * topics.max(1)
}

/// How long a take-over keeps retrying broker errors before the instance
/// gives the partitions back (see `take_over`). Well under librdkafka's
/// default `max.poll.interval.ms` (5 min): the take-over runs inside a poll.
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(120);
/// Restored states per RocksDB write batch.
const RESTORE_BATCH: usize = 10_000;

impl Cluster {
    /// Makes the local state of each partition its newest committed state
    /// (restoring it from the changelog when it is not), then claims the
    /// partition with a new epoch. Runs before any record of the
    /// partitions is applied. Broker errors are retried for
    /// `TAKE_OVER_PATIENCE`; an error still standing after that is returned
    /// and [`ClusterError::is_broker_trouble`] tells the caller it may give
    /// the partitions back and try again later rather than stop.
    pub fn take_over(
        &self,
        store: &StateStore,
        partitions: &[(String, i32)],
    ) -> Result<(), ClusterError> {
        // A standby copy becomes the owner's state: no more changelog
        // records go into it from the standby side.
        self.standby_hand_over(store, partitions);
        let started = Instant::now();
        let mut attempt = 1u32;
        let mut backoff = Duration::from_millis(500);
        loop {
            // A fresh reader each attempt: a stalled one may keep waiting
            // on a request the broker never answers.
            match self
                .reader()
                .and_then(|reader| self.try_take_over(&reader, store, partitions))
            {
                Ok(()) => return Ok(()),
                Err(error)
                    if error.is_broker_trouble()
                        && started.elapsed() + backoff < TAKE_OVER_PATIENCE
                        && !self.shutdown.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    tracing::warn!(%error, attempt, "taking partitions over failed; retrying");
                    self.status
                        .broker_error(format!("taking partitions over: {error}"));
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// All partitions at once: every read covers all of them, so a fetch
    /// brings a batch of each (brokers may return one batch per partition
    /// per fetch).
    // Long on purpose: claim, read the newest commits, restore, in one
    // ordered sequence whose invariants docs/guarantees.md states.
    pub(super) fn try_take_over(
        &self,
        reader: &BaseConsumer,
        store: &StateStore,
        partitions: &[(String, i32)],
    ) -> Result<(), ClusterError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let newest = self.newest_commits(reader, partitions)?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "read the newest commits"
        );
        let mut to_restore = HashMap::new();
        // Per partition, the committed state it takes (`None`: no owner
        // before; the local store's state, if any, is published).
        let mut bases = HashMap::new();
        for (topic, partition) in partitions {
            let id = (topic.clone(), *partition);
            let local = store.local_commit(topic, *partition)?;
            let base = match &newest[&id].0 {
                Some(commit) if commit.snapshot_pending => {
                    self.unfinished_snapshot(store, topic, *partition, local)?
                }
                other => other.clone(),
            };
            if let Some(commit) = &base
                && local != Some(commit.position())
            {
                to_restore.insert(id.clone(), commit.clone());
            }
            bases.insert(id, base);
        }
        if !to_restore.is_empty() {
            let restored = self.restore(reader, store, &to_restore)?;
            let elapsed = started.elapsed();
            tracing::info!(
                partitions = ?to_restore.keys().collect::<Vec<_>>(),
                records = restored,
                seconds = elapsed.as_secs_f64(),
                records_per_second = (restored as f64 / elapsed.as_secs_f64().max(1e-6)) as u64,
                "restored partitions from the changelog"
            );
            self.status
                .metrics()
                .restored_records
                .inc_by(restored as u64);
        }
        let _producing = self.producing.lock().unwrap_or_else(|p| p.into_inner());
        let mut claims = Vec::new();
        for (topic, partition) in partitions {
            let id = (topic.clone(), *partition);
            let (_, max_epoch) = &newest[&id];
            let base = &bases[&id];
            let mut claim = match base {
                Some(commit) => commit.clone(),
                // A single instance's store becoming a cluster's: its own
                // offset and stream times.
                None => Commit {
                    next_offset: store.offset(topic, *partition)?,
                    stream_times: store.stream_times_of(topic, *partition)?,
                    ..Commit::empty()
                },
            };
            // Epochs are at most `MAX_EPOCH` (checked on reading), so this
            // cannot wrap.
            let epoch = (*max_epoch).max(claim.epoch).saturating_add(1);
            claim = claim.claim(epoch);
            // Where each aggregation stands is the store's now (restored,
            // or this instance's own, with aggregations added here).
            for (aggregation, own) in &self.catch_ups_here(store, topic, *partition)? {
                match own {
                    Some(own) => claim.catch_up.insert(aggregation.clone(), *own),
                    None => claim.catch_up.remove(aggregation),
                };
            }
            claim.aggregations = Some(self.described(topic));
            // State from before the changelog existed (a single instance
            // turned into a cluster) exists only here until it is
            // published: the claim says so, so that a crash before the
            // snapshot's commit cannot make anyone resume without it.
            let snapshot = base.is_none() && claim.next_offset.is_some();
            claim.snapshot_pending = snapshot;
            self.send_commit(topic, *partition, &mut claim)?;
            claims.push((topic, *partition, claim, snapshot));
        }
        self.wait_acknowledged(&self.topics.commits())?;
        crate::fault_injection::crash_point("after-claim");
        let mut batch = store.begin_write();
        for (topic, partition, claim, snapshot) in claims {
            let commit = if snapshot {
                self.publish_snapshot(store, topic, partition, &claim)?
            } else {
                claim
            };
            batch.set_commit(store.topic_id(topic)?, partition, commit.epoch, commit.seq);
            self.owned().insert((topic.clone(), partition), commit);
        }
        store.write(batch)?;
        tracing::info!(
            ?partitions,
            restored = to_restore.len(),
            seconds = started.elapsed().as_secs_f64(),
            "took the partitions over"
        );
        Ok(())
    }

    /// Each configured aggregation of the partition with its own next
    /// offset in the store (`None`: at the partition's offset).
    fn catch_ups_here(
        &self,
        store: &StateStore,
        topic: &str,
        partition: i32,
    ) -> Result<Vec<(String, Option<i64>)>, ClusterError> {
        let stored = store.catch_ups(topic, partition)?;
        Ok(self
            .applying_to(topic)
            .map(|a| (a.name.clone(), stored.get(&a.name).copied()))
            .collect())
    }

    /// The state to take over when the newest commit is a first owner's
    /// claim whose snapshot was never committed (the owner stopped between
    /// the two). The store that holds that state (its own offsets, no
    /// commit yet) publishes it again under a new epoch (`None`); any other
    /// instance has no way to the state and starts the partition from
    /// nothing, from `source.start_from`, rather than resume at the claim's
    /// offset without the state before it.
    fn unfinished_snapshot(
        &self,
        store: &StateStore,
        topic: &str,
        partition: i32,
        local: Option<(u64, u64)>,
    ) -> Result<Option<Commit>, ClusterError> {
        if local.is_none() && store.offset(topic, partition)?.is_some() {
            tracing::warn!(
                topic,
                partition,
                "the previous attempt to publish this store's state to the changelog did not finish; publishing it again"
            );
            return Ok(None);
        }
        tracing::error!(
            topic,
            partition,
            "the partition's state was being published from a single instance's store that stopped before it finished, and this instance does not have that store: rebuilding the partition's state from `source.start_from` (records the topic no longer holds are not in it)"
        );
        Ok(Some(Commit::empty()))
    }

    /// Each partition's newest commit (highest epoch; the last of that
    /// epoch) and the highest epoch any commit of it names. The newest
    /// commit is near the end: a window is read first (a whole log costs a
    /// fetch per flush), the whole log only for partitions without a commit
    /// in it.
    pub(super) fn newest_commits(
        &self,
        reader: &BaseConsumer,
        partitions: &[(String, i32)],
    ) -> Result<NewestCommits, ClusterError> {
        let mut found = self.scan_commits(reader, partitions, Some(commit_window(partitions)))?;
        let missing: Vec<(String, i32)> = partitions
            .iter()
            .filter(|p| found.get(*p).is_none_or(|(c, _)| c.is_none()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            found.extend(self.scan_commits(reader, &missing, None)?);
        }
        Ok(found)
    }

    pub(super) fn scan_commits(
        &self,
        reader: &BaseConsumer,
        partitions: &[(String, i32)],
        window: Option<i64>,
    ) -> Result<NewestCommits, ClusterError> {
        let commits = self.topics.commits();
        let mut found: NewestCommits = partitions.iter().map(|p| (p.clone(), (None, 0))).collect();
        let mut numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        numbers.sort_unstable();
        numbers.dedup();
        let reads: Vec<(&str, i32)> = numbers.iter().map(|p| (commits.as_str(), *p)).collect();
        read_to_end(reader, &reads, window, |message| {
            let Some((topic, partition, rest)) = message.key().and_then(log::decode_changelog_key)
            else {
                return Ok(());
            };
            let Some((newest, max_epoch)) = found.get_mut(&(topic.to_owned(), partition)) else {
                return Ok(());
            };
            if !log::is_commit_key_rest(rest) {
                return Ok(());
            }
            let commit = match log::parse_commit(message.payload()) {
                Ok(commit) => commit,
                Err(reason) => {
                    // Loud, but not fatal: one bad record (corrupt, or
                    // written by whoever can write the topic) must not stop
                    // every take-over of the partition.
                    tracing::error!(
                        topic = %commits,
                        partition,
                        offset = message.offset(),
                        %reason,
                        "ignoring a malformed commit record; the partition's state is chosen without it"
                    );
                    return Ok(());
                }
            };
            *max_epoch = (*max_epoch).max(commit.epoch);
            if newest.as_ref().is_none_or(|n| commit.epoch >= n.epoch) {
                *newest = Some(commit);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Replaces each partition's local state with the changelog records its
    /// commit accepts; returns how many records were applied.
    // One read of the changelogs with the commit filter applied per record;
    // the filter and the read share their positions.
    pub(super) fn restore(
        &self,
        reader: &BaseConsumer,
        store: &StateStore,
        commits: &HashMap<(String, i32), Commit>,
    ) -> Result<usize, ClusterError> {
        let mut slots = HashMap::new();
        for (topic, partition) in commits.keys() {
            let slot = Slot {
                topic_id: store.topic_id(topic)?,
                partition: *partition as u32,
            };
            let names: Vec<&str> = self.applying_to(topic).map(|a| a.name.as_str()).collect();
            store.clear_slot(&names, slot)?;
            slots.insert((topic.clone(), *partition), slot);
        }
        let mut applied = 0;
        for aggregation in &self.aggregations {
            let mut numbers: Vec<i32> = commits
                .keys()
                .filter(|(topic, _)| aggregation.topic.as_deref().is_none_or(|t| t == topic))
                .map(|(_, p)| *p)
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            if numbers.is_empty() {
                continue;
            }
            let reads: Vec<(&str, i32)> = numbers
                .iter()
                .map(|p| (aggregation.changelog.as_str(), *p))
                .collect();
            let mut batch = store.begin_write();
            let mut pending = 0;
            read_to_end(reader, &reads, None, |message| {
                let Some((topic, partition, key)) =
                    message.key().and_then(log::decode_changelog_key)
                else {
                    return Ok(());
                };
                let id = (topic.to_owned(), partition);
                let (Some(commit), Some(&slot)) = (commits.get(&id), slots.get(&id)) else {
                    return Ok(());
                };
                if aggregation.topic.as_deref().is_some_and(|t| t != topic) {
                    return Ok(());
                }
                let Some(mark) = mark_of(message) else {
                    return Ok(());
                };
                if !commit.accepts(mark.epoch, mark.seq) {
                    return Ok(());
                }
                match message.payload() {
                    Some(state) => {
                        let state = aggregation.state_here(mark.format, state)?;
                        batch.put_state(&aggregation.name, slot, key, &state)?
                    }
                    None => batch.delete_state(&aggregation.name, slot, key)?,
                }
                applied += 1;
                pending += 1;
                if pending >= RESTORE_BATCH {
                    store.write(std::mem::replace(&mut batch, store.begin_write()))?;
                    pending = 0;
                }
                Ok(())
            })?;
            store.write(batch)?;
        }
        let mut batch = store.begin_write();
        for (id, commit) in commits {
            self.write_progress(&mut batch, &id.0, slots[id], commit);
        }
        store.write(batch)?;
        Ok(applied)
    }
}

/// Reads partitions to the high watermarks they have now, all at once:
/// from their start, or only their last `window` records.
// One consumer loop with its stop conditions (end, window, timeout)
// together: they interact, and apart they are harder to check.
fn read_to_end(
    reader: &BaseConsumer,
    partitions: &[(&str, i32)],
    window: Option<i64>,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), ClusterError>,
) -> Result<(), ClusterError> {
    let mut assignment = TopicPartitionList::new();
    // (topic, partition) → the last offset to read.
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for &(topic, partition) in partitions {
        let kafka = |error| ClusterError::Kafka {
            topic: topic.to_owned(),
            error,
        };
        let (low, high) = reader
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(kafka)?;
        if high <= low {
            continue;
        }
        let start = match window {
            Some(window) => Offset::Offset(low.max(high - window)),
            None => Offset::Beginning,
        };
        assignment
            .add_partition_offset(topic, partition, start)
            .map_err(kafka)?;
        remaining.insert((topic.to_owned(), partition), high - 1);
    }
    if remaining.is_empty() {
        return Ok(());
    }
    let assign_error = |error| ClusterError::Kafka {
        topic: partitions
            .first()
            .map_or_else(String::new, |p| p.0.to_owned()),
        error,
    };
    reader.assign(&assignment).map_err(assign_error)?;
    let mut last_progress = Instant::now();
    let reading = Instant::now();
    let (mut polls, mut empty, mut records) = (0u64, 0u64, 0u64);
    tracing::debug!(?partitions, "reading to the end");
    while !remaining.is_empty() {
        polls += 1;
        match reader.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                records += 1;
                last_progress = Instant::now();
                let id = (message.topic().to_owned(), message.partition());
                let Some(&last) = remaining.get(&id) else {
                    continue;
                };
                let offset = message.offset();
                each(&message)?;
                if offset >= last {
                    remaining.remove(&id);
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "reading for a take-over");
            }
            None => empty += 1,
        }
        if last_progress.elapsed() > READ_STALL {
            let ((topic, partition), _) = remaining.into_iter().next().unwrap_or_default();
            return Err(ClusterError::ReadStalled {
                topic,
                partition,
                waited: READ_STALL,
            });
        }
    }
    reader.unassign().map_err(assign_error)?;
    tracing::debug!(
        polls,
        empty,
        records,
        seconds = reading.elapsed().as_secs_f64(),
        "read to the end"
    );
    Ok(())
}
