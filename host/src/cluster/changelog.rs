//! Publishing flushes: a flush's states go to the changelog topics and
//! then its commit records to the commits topic, acknowledged before the
//! state writer writes the flush locally (see `state::writer`).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use rdkafka::producer::Producer;

use super::log::{self, Commit};
use super::{Cluster, ClusterError, changelog_headers, is_transient};
use crate::kafka::DeliveredEnds;
use crate::state::flush::{FlushJob, FlushPublisher, PartitionCommit, PublishError};
use crate::state::store::{Slot, StateStore};

impl FlushPublisher for Cluster {
    /// Produces a flush's changelog records and then its commits, and
    /// returns once the broker has acknowledged all of them; the writer
    /// writes the flush locally (with the commits) only after that.
    /// Transient failures are retried until shutdown.
    fn publish_flush(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError> {
        Ok(self.publish(store, job)?)
    }
}

/// The flush's commit of a partition: the one made already, or (a
/// partition whose live offset did not move: only an aggregation catching
/// up on it, or a stream time) the next after the one it is at (`owned`).
fn commit_of<'c>(
    commits: &'c mut HashMap<(String, i32), Commit>,
    owned: &HashMap<(String, i32), Commit>,
    topic: &str,
    partition: i32,
) -> Result<&'c mut Commit, ClusterError> {
    Ok(match commits.entry((topic.to_owned(), partition)) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => {
            let at = owned
                .get(entry.key())
                .ok_or_else(|| ClusterError::NotOwned {
                    topic: topic.to_owned(),
                    partition,
                })?;
            entry.insert(at.next_flush(at.next_offset))
        }
    })
}

impl Cluster {
    pub(super) fn publish(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, ClusterError> {
        self.check_not_deposed()?;
        let mut commits = self.next_commits(job)?;
        let mut backoff = Duration::from_millis(200);
        loop {
            let producing = self.producing.lock().unwrap_or_else(|p| p.into_inner());
            let published = self.try_publish(store, job, &mut commits);
            drop(producing);
            match published {
                Ok(()) => break,
                Err(ClusterError::Kafka { error, topic }) if is_transient(&error) => {
                    tracing::warn!(%error, topic, "changelog not acknowledged; retrying the flush");
                    self.status
                        .broker_error(format!("changelog {topic}: {error}"));
                    if self.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(ClusterError::Interrupted);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        self.fence(&commits)?;
        let mut owned = self.owned();
        let mut out = Vec::with_capacity(commits.len());
        for ((topic, partition), commit) in commits {
            out.push(PartitionCommit {
                topic_id: store.topic_id(&topic)?,
                partition,
                epoch: commit.epoch,
                seq: commit.seq,
            });
            owned.insert((topic, partition), commit);
        }
        Ok(out)
    }

    /// The commit of the flush for every partition it covers: those whose
    /// live offsets moved and those whose aggregations catching up moved.
    fn next_commits(&self, job: &FlushJob) -> Result<HashMap<(String, i32), Commit>, ClusterError> {
        let owned = self.owned();
        let current = |key: &(String, i32)| {
            owned.get(key).ok_or_else(|| ClusterError::NotOwned {
                topic: key.0.clone(),
                partition: key.1,
            })
        };
        let mut commits: HashMap<(String, i32), Commit> = HashMap::new();
        for ((topic, partition), next) in &job.offsets {
            let key = (topic.to_string(), *partition);
            let commit = current(&key)?.next_flush(Some(*next));
            commits.insert(key, commit);
        }
        for ((topic, partition, aggregation), own) in &job.catch_up {
            let commit = commit_of(&mut commits, &owned, topic, *partition)?;
            match own {
                Some(own) => commit.catch_up.insert(aggregation.clone(), *own),
                None => commit.catch_up.remove(aggregation),
            };
        }
        for aggregation in &job.aggregations {
            for ((topic, partition), time) in &aggregation.stream_times {
                let commit = commit_of(&mut commits, &owned, topic, *partition)?;
                commit.stream_times.insert(aggregation.name.clone(), *time);
            }
        }
        for ((topic, _), commit) in commits.iter_mut() {
            commit.aggregations = Some(self.described(topic));
        }
        Ok(commits)
    }

    pub(super) fn try_publish(
        &self,
        store: &StateStore,
        job: &FlushJob,
        commits: &mut HashMap<(String, i32), Commit>,
    ) -> Result<(), ClusterError> {
        // Deliveries of an earlier, failed attempt do not count.
        self.producer.context().take_delivered();
        let mut names: HashMap<u16, String> = HashMap::new();
        let mut sent = 0u64;
        for aggregation in &job.aggregations {
            let changelog = self.topics.changelog(&aggregation.name);
            let format = self.state_format_of(&aggregation.name);
            for (store_key, state) in &aggregation.states {
                let Some((slot, key)) = Slot::decode(store_key) else {
                    continue;
                };
                let topic = match names.get(&slot.topic_id) {
                    Some(name) => name,
                    None => {
                        let name = store.topic_name(slot.topic_id).unwrap_or_default();
                        names.entry(slot.topic_id).or_insert(name)
                    }
                };
                let partition = slot.partition as i32;
                let Some(commit) = commits.get(&(topic.clone(), partition)) else {
                    return Err(ClusterError::NotOwned {
                        topic: topic.clone(),
                        partition,
                    });
                };
                self.send(
                    &changelog,
                    partition,
                    &log::changelog_key(topic, partition, key),
                    state.as_deref(),
                    Some(changelog_headers(commit, state.as_ref().and(format))),
                )?;
                sent += 1;
            }
        }
        self.wait_acknowledged(&self.topics.changelog("*"))?;
        self.status.metrics().changelog_records.inc_by(sent);
        let delivered = self.producer.context().take_delivered();
        for ((topic, partition), commit) in commits.iter_mut() {
            self.record_ends(topic, *partition, commit, &delivered);
            self.send_commit(topic, *partition, commit)?;
        }
        self.wait_acknowledged(&self.topics.commits())
    }

    pub(super) fn produce_commit(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
    ) -> Result<(), ClusterError> {
        self.send_commit(topic, partition, commit)?;
        self.wait_acknowledged(&self.topics.commits())
    }

    /// Moves `commit`'s changelog ends past the records just delivered.
    pub(super) fn record_ends(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
        delivered: &DeliveredEnds,
    ) {
        for aggregation in self.applying_to(topic) {
            if let Some(&end) = delivered
                .get(&aggregation.changelog)
                .and_then(|partitions| partitions.get(&partition))
            {
                let known = commit.ends.entry(aggregation.name.clone()).or_insert(end);
                *known = (*known).max(end);
            }
        }
    }

    /// Sends a commit record, stamped with the time.
    pub(super) fn send_commit(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
    ) -> Result<(), ClusterError> {
        commit.at_ms = crate::ops::status::now_millis();
        let value = serde_json::to_vec(commit).unwrap_or_default();
        self.send(
            &self.topics.commits(),
            partition,
            &log::commit_key(topic, partition, commit.epoch),
            Some(&value),
            None,
        )
    }

    /// Publishes every local state of the partition as flush 1 of `claim`'s
    /// epoch.
    pub(super) fn publish_snapshot(
        &self,
        store: &StateStore,
        topic: &str,
        partition: i32,
        claim: &Commit,
    ) -> Result<Commit, ClusterError> {
        let Some(next_offset) = claim.next_offset else {
            return Ok(claim.clone());
        };
        let mut commit = claim.next_flush(Some(next_offset));
        self.producer.context().take_delivered();
        let slot = Slot {
            topic_id: store.topic_id(topic)?,
            partition: partition as u32,
        };
        let mut states = 0u64;
        for aggregation in self.applying_to(topic) {
            let mut result = Ok(());
            store.scan_slot(&aggregation.name, slot, &mut |key, state| {
                states += 1;
                result = self.send(
                    &aggregation.changelog,
                    partition,
                    &log::changelog_key(topic, partition, key),
                    Some(state),
                    Some(changelog_headers(
                        &commit,
                        Some(aggregation.migrator.state_format()),
                    )),
                );
                result.is_ok()
            })?;
            result?;
        }
        self.wait_acknowledged(&self.topics.changelog("*"))?;
        let delivered = self.producer.context().take_delivered();
        self.record_ends(topic, partition, &mut commit, &delivered);
        self.produce_commit(topic, partition, &mut commit)?;
        tracing::info!(
            topic,
            partition,
            states,
            "published the local state to the changelog (first owner)"
        );
        Ok(commit)
    }
}
