//! Standby replicas: warm copies of partitions other instances own, kept by
//! following their changelogs, so that a failover finds the state already
//! local and a lookup can be answered while the owner is down.
//!
//! Which instances keep a copy of a partition is decided by every instance
//! alike from the membership table (rendezvous hashing over the live
//! instances other than the owner), so copies stay put while instances come
//! and go. A copy advances one commit at a time: changelog records are held
//! back until a commit that accepts them arrives and the changelog has been
//! read up to that commit's `ends`; then the records and the commit go to
//! RocksDB in one write, exactly as a restore would leave them. The local
//! commit therefore always describes the copy, and a take-over of a
//! partition whose copy is at the newest commit restores nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::log::{self, Commit};
use super::membership::Membership;
use super::takeover::COMMIT_WINDOW;
use super::{Cluster, ClusterError, RecordMark, mark_of};
use crate::state::store::{Slot, StateStore};

/// How often the set of copies is re-planned from the membership table.
const PLAN_EVERY: Duration = Duration::from_secs(1);

/// The standby side of [`Cluster`].
#[derive(Default)]
pub(super) struct StandbyState {
    followed: HashMap<(String, i32), Follow>,
    /// Partitions this instance owns or is taking over: never followed.
    excluded: HashSet<(String, i32)>,
    /// (Log topic, partition) → the next offset the reader will return.
    positions: HashMap<(String, i32), i64>,
    /// The followed set changed since the reader was assigned.
    reassign: bool,
    /// The commits local states of partitions neither owned nor followed
    /// are at (given up by this instance as owner or as standby): a copy
    /// that starts from one of them only reads what came after it.
    left: HashMap<(String, i32), Commit>,
}

/// A copy of one source partition.
struct Follow {
    /// The commit the local state is at.
    applied: Commit,
    /// The newest commit read that is ahead of `applied`.
    target: Option<Commit>,
    /// Changelog records read past `applied.ends`, in offset order.
    pending: Vec<Pending>,
}

impl Follow {
    fn at(applied: Commit) -> Self {
        Follow {
            applied,
            target: None,
            pending: Vec::new(),
        }
    }
}

struct Pending {
    aggregation: usize,
    offset: i64,
    key: Vec<u8>,
    state: Option<Vec<u8>>,
    mark: RecordMark,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Advanced {
    /// Not yet: no newer commit, or its records are not all read.
    No,
    /// The target's records were applied.
    Applied,
    /// The copy has records the target does not accept: it must be
    /// restored.
    Diverged,
}

/// What a standby copy is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyCopy {
    /// The source offset the copy reaches.
    pub next_offset: Option<i64>,
    /// When the owner wrote the commit the copy is at (ms since the epoch;
    /// 0 before the first commit the copy applied).
    pub at_ms: i64,
}

impl Cluster {
    fn standby(&self) -> std::sync::MutexGuard<'_, StandbyState> {
        self.standby.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy of a partition this instance keeps, if any.
    pub fn standby_copy(&self, topic: &str, partition: i32) -> Option<StandbyCopy> {
        self.standby()
            .followed
            .get(&(topic.to_owned(), partition))
            .map(|follow| StandbyCopy {
                next_offset: follow.applied.next_offset,
                at_ms: follow.applied.at_ms,
            })
    }

    /// The partitions this instance keeps copies of.
    pub fn standby_partitions(&self) -> BTreeSet<(String, i32)> {
        self.standby().followed.keys().cloned().collect()
    }

    /// Before a take-over: brings each copy of `partitions` to the newest
    /// commit it can, then stops following them (the owner writes them
    /// from now on). Waits for a copy being restored.
    pub(super) fn standby_hand_over(&self, store: &StateStore, partitions: &[(String, i32)]) {
        let _restoring = self
            .standby_restoring
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut state = self.standby();
        for partition in partitions {
            state.excluded.insert(partition.clone());
            state.left.remove(partition);
            let Some(mut follow) = state.followed.remove(partition) else {
                continue;
            };
            state.reassign = true;
            if let Err(e) = self.advance(store, &state.positions, partition, &mut follow) {
                // The take-over restores what the copy lacks.
                tracing::warn!(error = %e, ?partition, "bringing the standby copy up to date failed");
            }
        }
    }

    /// After a revocation: the partitions may be followed again, from the
    /// commits the owner left them at.
    pub(super) fn standby_release(&self, released: Vec<((String, i32), Option<Commit>)>) {
        let mut state = self.standby();
        for (partition, commit) in released {
            state.excluded.remove(&partition);
            if let Some(commit) = commit {
                state.left.insert(partition, commit);
            }
        }
    }

    /// Follows `wanted` (minus excluded partitions) from now on: drops the
    /// copies no longer wanted (their local state stays, described by its
    /// commit) and brings new ones to their partition's newest commit. The
    /// broker reads happen without the state lock (queries and
    /// announcements read it), under `standby_restoring`, which a take-over
    /// waits for.
    // Long on purpose: drop, then add, under one lock discipline
    // (described above) that would be harder to see split up.
    fn plan(
        &self,
        store: &StateStore,
        wanted: &BTreeSet<(String, i32)>,
    ) -> Result<(), ClusterError> {
        let _restoring = self
            .standby_restoring
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut new = Vec::new();
        {
            let mut state = self.standby();
            let state = &mut *state;
            let dropped: Vec<(String, i32)> = state
                .followed
                .keys()
                .filter(|partition| !wanted.contains(*partition))
                .cloned()
                .collect();
            for partition in dropped {
                if let Some(follow) = state.followed.remove(&partition) {
                    state.left.insert(partition, follow.applied);
                    state.reassign = true;
                }
            }
            for partition in wanted {
                if !state.followed.contains_key(partition) && !state.excluded.contains(partition) {
                    new.push((partition.clone(), state.left.get(partition).cloned()));
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        let partitions: Vec<(String, i32)> = new.iter().map(|(p, _)| p.clone()).collect();
        let reader = self.reader()?;
        let newest = self.newest_commits(&reader, &partitions)?;
        let mut to_restore = HashMap::new();
        let mut synced = Vec::new();
        for (partition, left) in new {
            // A partition nobody has claimed yet has nothing to copy.
            let Some((Some(commit), _)) = newest.get(&partition) else {
                continue;
            };
            let local = store.local_commit(&partition.0, partition.1)?;
            let follow = match left {
                _ if local == Some(commit.position()) => Follow::at(commit.clone()),
                // The local state is an ancestor of the newest: read on
                // from where it ends.
                Some(left) if local == Some(left.position()) && commit.extends(&left) => Follow {
                    target: Some(commit.clone()),
                    ..Follow::at(left)
                },
                _ => {
                    to_restore.insert(partition.clone(), commit.clone());
                    Follow::at(commit.clone())
                }
            };
            synced.push((partition, follow));
        }
        if !to_restore.is_empty() {
            let restored = self.restore(&reader, store, &to_restore)?;
            self.status
                .metrics()
                .standby_records
                .inc_by(restored as u64);
        }
        if !synced.is_empty() {
            tracing::info!(
                partitions = ?synced.iter().map(|(p, _)| p).collect::<Vec<_>>(),
                restored = to_restore.len(),
                "keeping standby copies"
            );
        }
        let mut state = self.standby();
        for (partition, follow) in synced {
            // No take-over ran meanwhile: it waits for `standby_restoring`.
            state.left.remove(&partition);
            state.followed.insert(partition, follow);
            state.reassign = true;
        }
        Ok(())
    }

    /// Points `reader` at the commits and changelogs of the followed
    /// partitions, from where their copies are; records held back are
    /// dropped (they are read again).
    fn assign_reader(&self, reader: &BaseConsumer) -> Result<(), ClusterError> {
        let mut state = self.standby();
        state.reassign = false;
        let commits = self.topics.commits();
        let topics = state
            .followed
            .keys()
            .map(|(t, _)| t)
            .collect::<BTreeSet<_>>()
            .len() as i64;
        // (Log topic, partition) → where to start.
        let mut starts: HashMap<(String, i32), Offset> = HashMap::new();
        let mut positions = HashMap::new();
        for ((topic, partition), follow) in &mut state.followed {
            follow.pending.clear();
            starts.insert(
                (commits.clone(), *partition),
                Offset::OffsetTail(COMMIT_WINDOW * topics.max(1)),
            );
            for aggregation in self.applying_to(topic) {
                let end = follow
                    .applied
                    .ends
                    .get(&aggregation.name)
                    .copied()
                    .unwrap_or(0);
                let id = (aggregation.changelog.clone(), *partition);
                let start: &mut i64 = positions.entry(id.clone()).or_insert(end);
                *start = (*start).min(end);
                starts.insert(id, Offset::Offset(*start));
            }
        }
        state.positions = positions;
        let mut assignment = TopicPartitionList::new();
        for ((topic, partition), offset) in starts {
            assignment
                .add_partition_offset(&topic, partition, offset)
                .map_err(|error| ClusterError::Kafka {
                    topic: topic.clone(),
                    error,
                })?;
        }
        reader
            .assign(&assignment)
            .map_err(|error| ClusterError::Kafka {
                topic: commits,
                error,
            })
    }

    /// One record of a followed commits or changelog partition.
    // One match over the kinds of record a standby follows.
    fn receive(
        &self,
        store: &StateStore,
        message: &BorrowedMessage<'_>,
    ) -> Result<(), ClusterError> {
        let mut state = self.standby();
        let state = &mut *state;
        let log_topic = message.topic();
        let Some((topic, partition, key)) = message.key().and_then(log::decode_changelog_key)
        else {
            return Ok(());
        };
        let id = (topic.to_owned(), partition);
        if log_topic == self.topics.commits() {
            let Some(follow) = state.followed.get_mut(&id) else {
                return Ok(());
            };
            let commit = match log::parse_commit(message.payload()) {
                Ok(commit) => commit,
                Err(reason) => {
                    tracing::warn!(
                        offset = message.offset(),
                        %reason,
                        "ignoring a malformed commit record"
                    );
                    return Ok(());
                }
            };
            let ahead = |c: &Commit| commit.position() > c.position();
            if ahead(&follow.applied) && follow.target.as_ref().is_none_or(ahead) {
                follow.target = Some(commit);
            }
        } else if let Some(index) = self
            .aggregations
            .iter()
            .position(|a| a.changelog == log_topic)
        {
            state.positions.insert(
                (log_topic.to_owned(), message.partition()),
                message.offset() + 1,
            );
            let aggregation = &self.aggregations[index];
            let Some(follow) = state.followed.get_mut(&id) else {
                return Ok(());
            };
            let copied_up_to = follow.applied.ends.get(&aggregation.name).copied();
            if aggregation.topic.as_deref().is_some_and(|t| t != topic)
                || copied_up_to.is_some_and(|end| message.offset() < end)
            {
                return Ok(());
            }
            let Some(mark) = mark_of(message) else {
                return Ok(());
            };
            follow.pending.push(Pending {
                aggregation: index,
                offset: message.offset(),
                key: key.to_vec(),
                state: message.payload().map(<[u8]>::to_vec),
                mark,
            });
        } else {
            return Ok(());
        }
        if let Some(mut follow) = state.followed.remove(&id) {
            match self.advance(store, &state.positions, &id, &mut follow)? {
                // Followed again (restored) at the next plan.
                Advanced::Diverged => state.reassign = true,
                Advanced::No | Advanced::Applied => {
                    state.followed.insert(id, follow);
                }
            }
        }
        Ok(())
    }

    /// Applies `follow`'s target once the changelog has been read up to
    /// it.
    // Applies one target: write, then bookkeeping, under one lock.
    fn advance(
        &self,
        store: &StateStore,
        positions: &HashMap<(String, i32), i64>,
        (topic, partition): &(String, i32),
        follow: &mut Follow,
    ) -> Result<Advanced, ClusterError> {
        let Some(target) = &follow.target else {
            return Ok(Advanced::No);
        };
        let read_up_to_target = self.applying_to(topic).all(|aggregation| {
            let end = target.ends.get(&aggregation.name).copied().unwrap_or(0);
            let read = positions
                .get(&(aggregation.changelog.clone(), *partition))
                .copied()
                .unwrap_or(0);
            read >= end
        });
        if !read_up_to_target {
            return Ok(Advanced::No);
        }
        let target = follow.target.take().unwrap_or_else(Commit::empty);
        let slot = Slot {
            topic_id: store.topic_id(topic)?,
            partition: *partition as u32,
        };
        if !target.extends(&follow.applied) {
            // The copy took a deposed owner's flush that the new owner's
            // state does not have: it must be restored (by `plan`, which
            // reads the broker without holding the state lock).
            tracing::info!(topic, partition, "standby copy diverged; restoring it");
            return Ok(Advanced::Diverged);
        }
        let mut batch = store.begin_write();
        let mut applied = 0u64;
        let mut kept = Vec::new();
        for record in std::mem::take(&mut follow.pending) {
            let aggregation = &self.aggregations[record.aggregation];
            let end = target.ends.get(&aggregation.name).copied().unwrap_or(0);
            if record.offset >= end {
                kept.push(record);
                continue;
            }
            if !target.accepts(record.mark.epoch, record.mark.seq) {
                continue;
            }
            match &record.state {
                Some(state) => {
                    let state = aggregation.state_here(record.mark.format, state)?;
                    batch.put_state(&aggregation.name, slot, &record.key, &state)?
                }
                None => batch.delete_state(&aggregation.name, slot, &record.key)?,
            }
            applied += 1;
        }
        self.write_progress(&mut batch, topic, slot, &target);
        store.write(batch)?;
        follow.pending = kept;
        follow.applied = target;
        self.status.metrics().standby_records.inc_by(applied);
        Ok(Advanced::Applied)
    }
}

/// Starts the `wagg-standby` thread, which keeps this instance's copies
/// (`None` when `cluster.standby_replicas` is 0); it stops once `shutdown`
/// is set.
pub fn start(
    cluster: Arc<Cluster>,
    membership: Arc<Membership>,
    store: Arc<StateStore>,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let replicas = cluster.config.standby_replicas as usize;
    if replicas == 0 {
        return Ok(None);
    }
    let reader = cluster
        .follower()
        .context("creating the standby changelog reader")?;
    let handle = std::thread::Builder::new()
        .name("wagg-standby".into())
        .spawn(move || {
            let mut last_plan: Option<Instant> = None;
            while !shutdown.load(Ordering::Relaxed) {
                crate::fault_injection::fault_point("wagg-standby");
                if last_plan.is_none_or(|at| at.elapsed() >= PLAN_EVERY) {
                    last_plan = Some(Instant::now());
                    let current = cluster.standby_partitions();
                    let wanted = membership.standby_targets(replicas, &current);
                    if let Err(e) = cluster.plan(&store, &wanted) {
                        tracing::warn!(error = %e, "updating the standby copies failed; retrying in 5 s");
                        // `elapsed` of an instant ahead is zero: 5 s to go.
                        last_plan = Some(Instant::now() + Duration::from_secs(4));
                    }
                    let reassign = cluster.standby().reassign;
                    if reassign && let Err(e) = cluster.assign_reader(&reader) {
                        tracing::warn!(error = %e, "following the standby partitions failed");
                    }
                }
                match reader.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => {
                        if let Err(e) = cluster.receive(&store, &message) {
                            tracing::warn!(error = %e, "applying to a standby copy failed");
                            // Read it all again from the copies' commits.
                            cluster.standby().reassign = true;
                            last_plan = None;
                        }
                    }
                    Some(Err(error)) => tracing::debug!(%error, "reading for the standby copies"),
                    None => {}
                }
            }
        })
        .context("starting the standby thread")?;
    Ok(Some(handle))
}
