//! Scale-out: instances of one consumer group share the source partitions,
//! keep each partition's state in Kafka so it can move, and route queries
//! to the partition's owner. See `docs/scale-out.md` for the design and
//! its guarantees.
//!
//! - `log`: the changelog and commit record formats and the lineage rule
//!   that decides which changelog records a restore applies;
//! - `changelog` (this module's [`Cluster`]): producing a flush's changelog
//!   and commit records (before the local write), and taking a partition
//!   over (restore from the changelog when the local state is not the
//!   partition's newest, then a claim that fences the previous owner);
//! - `membership`: who owns which partition, announced on a small topic,
//!   read by every instance for query routing;
//! - `topics`: creating the changelog, commits and members topics.

pub mod log;
pub mod membership;
pub mod standby;
pub mod topics;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{ClusterConfig, Config};
use crate::dead_letter::DeliveryContext;
use crate::status::Status;
use crate::store::{Slot, StateStore, StoreError};
use crate::writer::FlushJob;
use log::Commit;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{topic:?}: {error}")]
    Kafka { topic: String, error: KafkaError },
    #[error("{topic:?} partition {partition}: no progress reading it for {waited:?}")]
    ReadStalled {
        topic: String,
        partition: i32,
        waited: Duration,
    },
    #[error("{topic:?} partition {partition} offset {offset}: malformed commit record: {message}")]
    MalformedCommit {
        topic: String,
        partition: i32,
        offset: i64,
        message: String,
    },
    #[error(
        "a flush covers {topic:?} partition {partition}, which this instance has not taken over"
    )]
    NotOwned { topic: String, partition: i32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "stopped while the changelog was unreachable; the flush is applied again after the restart"
    )]
    Interrupted,
}

impl ClusterError {
    /// The broker did not answer in time or refused for now: nothing is
    /// known to be wrong with the data, so a later attempt may succeed.
    pub fn is_broker_trouble(&self) -> bool {
        matches!(self, Self::Kafka { .. } | Self::ReadStalled { .. })
    }
}

/// A flush's commit per partition, by `(topic id, partition)`.
pub type FlushCommits = Vec<((u16, i32), Commit)>;

/// Per partition: its newest commit, and the highest epoch seen.
type NewestCommits = HashMap<(String, i32), (Option<Commit>, u64)>;

/// The names of the topics a group's cluster keeps.
#[derive(Debug, Clone)]
pub struct ClusterTopics {
    prefix: String,
}

impl ClusterTopics {
    pub fn new(config: &Config, cluster: &ClusterConfig) -> Self {
        Self {
            prefix: cluster.topic_prefix(&config.source.group_id),
        }
    }

    pub fn changelog(&self, aggregation: &str) -> String {
        format!("{}changelog-{aggregation}", self.prefix)
    }

    pub fn commits(&self) -> String {
        format!("{}commits", self.prefix)
    }

    pub fn members(&self) -> String {
        format!("{}members", self.prefix)
    }
}

/// Errors a later attempt may get past: the dead-letter sink's, plus a
/// topic not known yet (just created, metadata not everywhere yet).
fn is_transient(error: &KafkaError) -> bool {
    crate::dead_letter::is_transient(error)
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
}

/// An aggregation as the changelog sees it.
#[derive(Debug, Clone)]
struct ChangelogAggregation {
    name: String,
    topic: Option<String>,
    changelog: String,
}

/// How long a read of a changelog partition may go without a record
/// before the restore gives up (and the partition stays unassigned).
const READ_STALL: Duration = Duration::from_secs(20);
/// Commit records read first (per source topic) when looking for a
/// partition's newest commit: the newest is almost always the last one, and
/// each record read costs a fetch on brokers that return a record batch per
/// fetch. A deposed owner would have to flush this many times after the new
/// owner's claim to hide the claim's epoch (see docs/scale-out.md).
const COMMIT_WINDOW: i64 = 4;
/// How long a take-over keeps retrying broker errors before the instance
/// gives the partitions back (see `take_over`). Well under librdkafka's
/// default `max.poll.interval.ms` (5 min): the take-over runs inside a poll.
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(120);
/// Restored states per RocksDB write batch.
const RESTORE_BATCH: usize = 10_000;

/// This instance's part of the cluster: the changelog producer, the
/// partitions it owns (with the commit each is at), and the restore.
pub struct Cluster {
    pub config: ClusterConfig,
    pub topics: ClusterTopics,
    client: ClientConfig,
    producer: BaseProducer<DeliveryContext>,
    aggregations: Vec<ChangelogAggregation>,
    /// Owned partition → the commit its state is at (the claim, then each
    /// flush's).
    owned: Mutex<HashMap<(String, i32), Commit>>,
    /// Held while producing and waiting for acknowledgements: the writer
    /// thread (flushes) and the source thread (claims) share the producer,
    /// and each must see only its own delivery failures.
    producing: Mutex<()>,
    status: Arc<Status>,
    /// Set by the membership watch when partitions stay without a live
    /// owner: the source re-joins the group (see `membership`).
    pub rejoin: AtomicBool,
    shutdown: Arc<AtomicBool>,
    /// The copies of other instances' partitions (see `standby`).
    standby: Mutex<standby::StandbyState>,
    /// Held while a standby copy is restored from the broker, and by a
    /// take-over's hand-over: the two never write one partition at once.
    standby_restoring: Mutex<()>,
}

impl Cluster {
    /// `None` without a `[cluster]` section.
    pub fn from_config(
        config: &Config,
        status: Arc<Status>,
        shutdown: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(cluster) = &config.cluster else {
            return Ok(None);
        };
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.source.brokers)
            .set_log_level(RDKafkaLogLevel::Warning);
        for (name, value) in config.connection_properties() {
            client.set(name, value);
        }
        let mut producer = client.clone();
        producer
            // Retries inside librdkafka neither duplicate nor reorder.
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000");
        let producer = producer
            .create_with_context(
                DeliveryContext::new("changelog producer", status.clone()).tracking_offsets(),
            )
            .map_err(|e| anyhow::anyhow!("creating the changelog producer: {e}"))?;
        let topics = ClusterTopics::new(config, cluster);
        let aggregations = config
            .aggregations
            .iter()
            .map(|a| ChangelogAggregation {
                name: a.name.clone(),
                topic: a.topic.clone(),
                changelog: topics.changelog(&a.name),
            })
            .collect();
        Ok(Some(Arc::new(Self {
            config: cluster.clone(),
            topics,
            client,
            producer,
            aggregations,
            owned: Mutex::new(HashMap::new()),
            producing: Mutex::new(()),
            status,
            rejoin: AtomicBool::new(false),
            shutdown,
            standby: Mutex::default(),
            standby_restoring: Mutex::new(()),
        })))
    }

    /// Stops the process (a partition could not be taken over safely).
    pub fn request_shutdown(&self) {
        self.shutdown
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A client configuration for the source brokers (security settings
    /// included), for wagg's other clients.
    pub fn client_config(&self) -> ClientConfig {
        self.client.clone()
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Commit>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops writing `partitions` (after their last flush).
    pub fn release(&self, partitions: &[(String, i32)]) {
        let mut owned = self.owned();
        let released = partitions
            .iter()
            .map(|partition| (partition.clone(), owned.remove(partition)))
            .collect();
        drop(owned);
        self.standby_release(released);
    }

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
    fn try_take_over(
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
        for (topic, partition) in partitions {
            let (commit, _) = &newest[&(topic.clone(), *partition)];
            let local = store.local_commit(topic, *partition)?;
            match commit {
                Some(commit) if local != Some((commit.epoch, commit.seq)) => {
                    to_restore.insert((topic.clone(), *partition), commit.clone());
                }
                _ => {}
            }
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
            let (commit, max_epoch) = &newest[&(topic.clone(), *partition)];
            let base = match commit {
                Some(commit) => commit.clone(),
                None => Commit {
                    next_offset: store.offset(topic, *partition)?,
                    ..Commit::empty()
                },
            };
            let mut claim = base.claim((*max_epoch).max(base.epoch) + 1);
            self.send_commit(topic, *partition, &mut claim)?;
            claims.push((topic, *partition, claim, commit.is_none()));
        }
        self.wait_acknowledged(&self.topics.commits())?;
        let mut batch = store.batch();
        for (topic, partition, claim, first_owner) in claims {
            let mut commit = claim.clone();
            if first_owner && claim.next_offset.is_some() {
                // State from before the changelog existed (a single
                // instance turned into a cluster): publish it whole, so the
                // next owner can restore it.
                commit = self.publish_snapshot(store, topic, partition, &claim)?;
            }
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

    /// Produces a flush's changelog records and then its commits, and
    /// returns once the broker has acknowledged all of them; the caller
    /// writes the flush locally (with the commits) only after that.
    /// Transient failures are retried until shutdown.
    pub fn publish_flush(
        &self,
        store: &StateStore,
        job: &FlushJob,
    ) -> Result<FlushCommits, ClusterError> {
        let mut commits: HashMap<(String, i32), Commit> = HashMap::new();
        {
            let owned = self.owned();
            for ((topic, partition), next) in &job.offsets {
                let key = (topic.to_string(), *partition);
                let current = owned.get(&key).ok_or_else(|| ClusterError::NotOwned {
                    topic: key.0.clone(),
                    partition: key.1,
                })?;
                commits.insert(key, current.next_flush(*next));
            }
        }
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
        let mut owned = self.owned();
        let mut out = Vec::with_capacity(commits.len());
        for ((topic, partition), commit) in commits {
            out.push(((store.topic_id(&topic)?, partition), commit.clone()));
            owned.insert((topic, partition), commit);
        }
        Ok(out)
    }

    fn try_publish(
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
                    Some(commit),
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

    fn produce_commit(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
    ) -> Result<(), ClusterError> {
        self.send_commit(topic, partition, commit)?;
        self.wait_acknowledged(&self.topics.commits())
    }

    /// Moves `commit`'s changelog ends past the records just delivered.
    fn record_ends(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
        delivered: &crate::dead_letter::DeliveredEnds,
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
    fn send_commit(
        &self,
        topic: &str,
        partition: i32,
        commit: &mut Commit,
    ) -> Result<(), ClusterError> {
        commit.at_ms = crate::status::now_millis();
        let value = serde_json::to_vec(commit).unwrap_or_default();
        self.send(
            &self.topics.commits(),
            partition,
            &log::commit_key(topic, partition),
            Some(&value),
            None,
        )
    }

    /// Publishes every local state of the partition as flush 1 of `claim`'s
    /// epoch.
    fn publish_snapshot(
        &self,
        store: &StateStore,
        topic: &str,
        partition: i32,
        claim: &Commit,
    ) -> Result<Commit, ClusterError> {
        let Some(next_offset) = claim.next_offset else {
            return Ok(claim.clone());
        };
        let mut commit = claim.next_flush(next_offset);
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
                    Some(&commit),
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

    fn applying_to<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a ChangelogAggregation> {
        self.aggregations
            .iter()
            .filter(move |a| a.topic.as_deref().is_none_or(|t| t == topic))
    }

    fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
        commit: Option<&Commit>,
    ) -> Result<(), ClusterError> {
        let mut record = BaseRecord::with_opaque_to(topic, 0)
            .partition(partition)
            .key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        let numbers;
        if let Some(commit) = commit {
            numbers = [
                commit.epoch.to_string(),
                commit.seq.to_string(),
                commit.next_offset.unwrap_or(-1).to_string(),
            ];
            let mut headers = OwnedHeaders::new_with_capacity(3);
            for (name, value) in [log::EPOCH_HEADER, log::SEQ_HEADER, log::OFFSET_HEADER]
                .into_iter()
                .zip(&numbers)
            {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    self.producer.poll(Duration::from_millis(20));
                }
                Err((error, _)) => {
                    return Err(ClusterError::Kafka {
                        topic: topic.to_owned(),
                        error,
                    });
                }
            }
        }
    }

    /// Waits until every record sent is acknowledged; the first failure (if
    /// any) is the error.
    fn wait_acknowledged(&self, topic: &str) -> Result<(), ClusterError> {
        while self.producer.in_flight_count() > 0 {
            let _ = self.producer.flush(Duration::from_millis(200));
        }
        let failures = self.producer.context().take_failures();
        match failures.into_iter().next() {
            None => Ok(()),
            Some((_, error)) => Err(ClusterError::Kafka {
                topic: topic.to_owned(),
                error,
            }),
        }
    }

    fn reader(&self) -> Result<BaseConsumer, ClusterError> {
        let mut config = self.client.clone();
        config
            .set("group.id", format!("{}restore", self.topics.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            // A restore reads to a known end: never wait for more data (the
            // broker would hold each fetch for `fetch.wait.max.ms`).
            .set("fetch.wait.max.ms", "10");
        config.create().map_err(|error| ClusterError::Kafka {
            topic: self.topics.commits(),
            error,
        })
    }

    /// A consumer that follows logs as they grow (no group; assigned by
    /// hand).
    fn follower(&self) -> Result<BaseConsumer, KafkaError> {
        self.client
            .clone()
            .set("group.id", format!("{}standby", self.topics.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .create()
    }

    /// Each partition's newest commit (highest epoch; the last of that
    /// epoch) and the highest epoch any commit of it names. The newest
    /// commit is near the end: a window is read first (a whole log costs a
    /// fetch per flush), the whole log only for partitions without a commit
    /// in it.
    fn newest_commits(
        &self,
        reader: &BaseConsumer,
        partitions: &[(String, i32)],
    ) -> Result<NewestCommits, ClusterError> {
        let topics = partitions
            .iter()
            .map(|(t, _)| t)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as i64;
        let mut found = self.scan_commits(reader, partitions, Some(COMMIT_WINDOW * topics))?;
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

    fn scan_commits(
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
            if !rest.is_empty() {
                return Ok(());
            }
            let malformed = |text: String| ClusterError::MalformedCommit {
                topic: commits.clone(),
                partition,
                offset: message.offset(),
                message: text,
            };
            let payload = message
                .payload()
                .ok_or_else(|| malformed("no value".into()))?;
            let commit: Commit =
                serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
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
    fn restore(
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
            let mut batch = store.batch();
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
                let Some((epoch, seq)) = flush_of(message) else {
                    return Ok(());
                };
                if !commit.accepts(epoch, seq) {
                    return Ok(());
                }
                match message.payload() {
                    Some(state) => batch.put_state(&aggregation.name, slot, key, state)?,
                    None => batch.delete_state(&aggregation.name, slot, key)?,
                }
                applied += 1;
                pending += 1;
                if pending >= RESTORE_BATCH {
                    store.write(std::mem::replace(&mut batch, store.batch()))?;
                    pending = 0;
                }
                Ok(())
            })?;
            store.write(batch)?;
        }
        let mut batch = store.batch();
        for (id, commit) in commits {
            let slot = slots[id];
            if let Some(next) = commit.next_offset {
                batch.set_offset(slot.topic_id, id.1, next);
            }
            batch.set_commit(slot.topic_id, id.1, commit.epoch, commit.seq);
        }
        store.write(batch)?;
        Ok(applied)
    }
}

/// The flush a changelog record belongs to: its epoch and sequence number
/// headers.
fn flush_of(message: &BorrowedMessage<'_>) -> Option<(u64, u64)> {
    let header = |name: &str| {
        message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| log::parse_number_header(h.value))
        })
    };
    Some((header(log::EPOCH_HEADER)?, header(log::SEQ_HEADER)?))
}

/// Reads partitions to the high watermarks they have now, all at once:
/// from their start, or only their last `window` records.
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
