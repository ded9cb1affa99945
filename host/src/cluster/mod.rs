//! Scale-out: instances of one consumer group share the source partitions,
//! keep each partition's state in Kafka so it can move, and route queries
//! to the partition's owner. See `docs/scale-out.md` for the design and
//! its guarantees.
//!
//! - this module: [`Cluster`], this instance's part of the cluster (the
//!   changelog producer, the partitions it owns and the commit each is
//!   at), and the Kafka reads and writes the parts below share;
//! - `log`: the changelog and commit record formats and the lineage rule
//!   that decides which changelog records a restore applies;
//! - `changelog`: publishing a flush's changelog and commit records
//!   (before the local write);
//! - `takeover`: taking a partition over (restore from the changelog when
//!   the local state is not the partition's newest, then a claim that
//!   fences the previous owner);
//! - `standby`: standby copies of other instances' partitions;
//! - `membership`: who owns which partition, announced on a small topic,
//!   read by every instance for query routing;
//! - `partitioner`: which partition a key belongs to;
//! - `topics`: creating the changelog, commits and members topics.

mod changelog;
mod fence;
pub mod log;
pub mod membership;
pub mod partitioner;
pub mod secret;
pub mod standby;
mod takeover;
pub mod topics;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::{AggregationConfig, ClusterConfig, StartFrom};
use crate::kafka::{
    ClientError, ClientProperties, DeliveryContext, PRODUCER_DEFAULTS, create_client,
    create_client_with_context, read_headers,
};
use crate::ops::status::Status;
use crate::state::store::{Slot, StateMigrator, StateWrite, StoreError};
use log::Commit;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{topic:?}: {error}")]
    Kafka { topic: String, error: KafkaError },
    #[error("creating a client for {topic:?}: {error}")]
    Client { topic: String, error: ClientError },
    #[error("{topic:?} partition {partition}: no progress reading it for {waited:?}")]
    ReadStalled {
        topic: String,
        partition: i32,
        waited: Duration,
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
    #[error(
        "{topic:?} partition {partition} was taken over by another instance (its epoch {newer} is above this instance's {epoch}) while this instance was not heard from, e.g. paused past `session.timeout.ms`: stopping so that this instance writes nothing more for it; restart it to re-join the group"
    )]
    Deposed {
        topic: String,
        partition: i32,
        epoch: u64,
        newer: u64,
    },
    #[error("this instance was deposed by a newer owner and publishes nothing more")]
    Fenced,
    #[error(
        "aggregation {aggregation:?}: the changelog {changelog:?} holds states of format {found}, written by an instance with another version of the plugin, and this instance's plugin (format {here}) cannot read them: {reason}. Run the same plugin on every instance (upgrade this one: its plugin migrates the older formats)"
    )]
    Format {
        aggregation: String,
        changelog: String,
        found: u32,
        here: u32,
        reason: String,
    },
}

impl ClusterError {
    /// The broker did not answer in time or refused for now: nothing is
    /// known to be wrong with the data, so a later attempt may succeed.
    pub fn is_broker_trouble(&self) -> bool {
        matches!(self, Self::Kafka { .. } | Self::ReadStalled { .. })
    }
}

/// The names of the topics a group's cluster keeps.
#[derive(Debug, Clone)]
pub struct ClusterTopics {
    prefix: String,
    /// The largest record the changelog producer sends and the topics
    /// created here accept (`Config::changelog_record_max_bytes`).
    pub record_max_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_RECORD_MAX_BYTES: usize = 1_000_000;

impl ClusterTopics {
    /// The topics of `group_id`'s cluster.
    pub fn new(cluster: &ClusterConfig, group_id: &str) -> Self {
        Self {
            prefix: cluster.topic_prefix(group_id),
            record_max_bytes: DEFAULT_RECORD_MAX_BYTES,
        }
    }

    /// Records up to `bytes` (a state at its cap, with key and headers).
    pub fn with_record_max_bytes(mut self, bytes: usize) -> Self {
        self.record_max_bytes = bytes;
        self
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

/// Errors a later attempt may get past: any client's, plus a topic not
/// known yet (just created, metadata not everywhere yet).
fn is_transient(error: &KafkaError) -> bool {
    crate::kafka::is_transient(error)
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
}

/// An aggregation as the changelog sees it.
#[derive(Clone)]
struct ChangelogAggregation {
    name: String,
    topic: Option<String>,
    changelog: String,
    /// Its plugin's migration of states of other formats (and the format
    /// its states are in here).
    migrator: Arc<dyn StateMigrator>,
}

impl ChangelogAggregation {
    /// A changelog record's state (`format`: its format header) in the
    /// format this instance's plugin reads, migrated if it is another.
    fn state_here<'a>(
        &self,
        format: Option<u32>,
        state: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, ClusterError> {
        let here = self.migrator.state_format();
        match format {
            None => Ok(Cow::Borrowed(state)),
            Some(format) if format == here => Ok(Cow::Borrowed(state)),
            Some(format) => self
                .migrator
                .migrate(format, state)
                .map(Cow::Owned)
                .map_err(|reason| ClusterError::Format {
                    aggregation: self.name.clone(),
                    changelog: self.changelog.clone(),
                    found: format,
                    here,
                    reason,
                }),
        }
    }
}

/// What a changelog record's headers say: the flush it belongs to and the
/// state format of its state.
#[derive(Debug, Clone, Copy)]
struct RecordMark {
    epoch: u64,
    seq: u64,
    format: Option<u32>,
}

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
    /// The reader of the commits topic after each flush (see `fence`),
    /// kept between flushes; `None` until the first, or after an error.
    fence_reader: Mutex<Option<BaseConsumer>>,
    /// The shared secret that authenticates announcements and forwarded
    /// requests (`cluster.secret_env` / `secret_file`), if set.
    pub secret: Option<Arc<secret::ClusterSecret>>,
    /// Set once a newer owner deposed this instance: no flush is published
    /// after that (not even the one written on the way out).
    deposed: AtomicBool,
    /// Where an aggregation new to a consumed partition starts
    /// (`source.start_from`: 0, or `None` with the others).
    new_from: Option<i64>,
}

impl Cluster {
    /// This instance's part of the cluster `config` describes, for the
    /// `aggregations` (each with its plugin's migration of other state
    /// formats); `client` holds the brokers and `[source.kafka]`'s connection
    /// settings.
    // A constructor: each argument is a distinct part the cluster is made of.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &ClusterConfig,
        topics: ClusterTopics,
        aggregations: &[(AggregationConfig, Arc<dyn StateMigrator>)],
        start_from: StartFrom,
        client: &ClientProperties,
        status: Arc<Status>,
        shutdown: Arc<AtomicBool>,
        secret: Option<Arc<secret::ClusterSecret>>,
    ) -> anyhow::Result<Arc<Self>> {
        let record_max_bytes = topics.record_max_bytes.to_string();
        let mut producer_settings = PRODUCER_DEFAULTS.to_vec();
        producer_settings.push(("queue.buffering.max.messages", "1000000"));
        // A state at `plugins.max_state_bytes` must fit (the config checks
        // that `[source.kafka]` does not lower this).
        producer_settings.push(("message.max.bytes", &record_max_bytes));
        let producer = create_client_with_context(
            &client.client_config(&producer_settings),
            DeliveryContext::new("changelog producer", status.clone()).tracking_offsets(),
        )
        .map_err(|e| anyhow::anyhow!("creating the changelog producer: {e}"))?;
        let aggregations = aggregations
            .iter()
            .map(|(a, migrator)| ChangelogAggregation {
                name: a.name.clone(),
                topic: a.topic.clone(),
                changelog: topics.changelog(&a.name),
                migrator: migrator.clone(),
            })
            .collect();
        Ok(Arc::new(Self {
            config: config.clone(),
            topics,
            client: client.client_config(&[]),
            producer,
            aggregations,
            owned: Mutex::new(HashMap::new()),
            producing: Mutex::new(()),
            status,
            rejoin: AtomicBool::new(false),
            shutdown,
            standby: Mutex::default(),
            standby_restoring: Mutex::new(()),
            fence_reader: Mutex::new(None),
            deposed: AtomicBool::new(false),
            secret,
            new_from: match start_from {
                StartFrom::Earliest => Some(0),
                StartFrom::Latest => None,
            },
        }))
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

    /// Writes the progress `commit` records for a partition: its offset,
    /// where each aggregation catching up on it stands, and the commit.
    fn write_progress(&self, batch: &mut StateWrite<'_>, topic: &str, slot: Slot, commit: &Commit) {
        let partition = slot.partition as i32;
        if let Some(next) = commit.next_offset {
            batch.set_offset(slot.topic_id, partition, next);
        }
        for aggregation in self.applying_to(topic) {
            let own = commit.catch_up_of(&aggregation.name, self.new_from);
            batch.set_catch_up(slot.topic_id, partition, &aggregation.name, own);
            let stream_time = commit.stream_times.get(&aggregation.name).copied();
            batch.set_stream_time(slot.topic_id, partition, &aggregation.name, stream_time);
        }
        batch.set_commit(slot.topic_id, partition, commit.epoch, commit.seq);
    }

    /// The configured aggregations of a topic's partitions, as a commit
    /// names the ones it describes.
    fn described(&self, topic: &str) -> BTreeSet<String> {
        self.applying_to(topic).map(|a| a.name.clone()).collect()
    }

    /// The state format `aggregation`'s states are written in here
    /// (`None`: not an aggregation this instance runs).
    fn state_format_of(&self, aggregation: &str) -> Option<u32> {
        self.aggregations
            .iter()
            .find(|a| a.name == aggregation)
            .map(|a| a.migrator.state_format())
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
        headers: Option<OwnedHeaders>,
    ) -> Result<(), ClusterError> {
        let mut record = BaseRecord::with_opaque_to(topic, 0)
            .partition(partition)
            .key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        if let Some(headers) = headers {
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
        create_client(&config).map_err(|error| ClusterError::Client {
            topic: self.topics.commits(),
            error,
        })
    }

    /// A consumer that follows logs as they grow (no group; assigned by
    /// hand).
    fn follower(&self) -> Result<BaseConsumer, ClientError> {
        create_client(
            self.client
                .clone()
                .set("group.id", format!("{}standby", self.topics.prefix))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .set("auto.offset.reset", "earliest"),
        )
    }
}

/// The headers of a changelog record of flush `commit` (with a state of
/// `format`; `None` for a deletion).
fn changelog_headers(commit: &Commit, format: Option<u32>) -> OwnedHeaders {
    let numbers = [
        (log::EPOCH_HEADER, Some(commit.epoch.to_string())),
        (log::SEQ_HEADER, Some(commit.seq.to_string())),
        (
            log::OFFSET_HEADER,
            Some(commit.next_offset.unwrap_or(-1).to_string()),
        ),
        (log::FORMAT_HEADER, format.map(|f| f.to_string())),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(numbers.len());
    for (name, value) in &numbers {
        if let Some(value) = value {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
    }
    headers
}

/// What a changelog record's headers say (`None` without a flush).
fn mark_of(message: &BorrowedMessage<'_>) -> Option<RecordMark> {
    // Read without rdkafka's `Headers::iter`, which panics on a name that
    // is not UTF-8: whoever can write the topic could stop this instance.
    let headers = read_headers(message);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, value)| log::parse_number_header(value.as_deref()))
    };
    Some(RecordMark {
        epoch: header(log::EPOCH_HEADER)?,
        seq: header(log::SEQ_HEADER)?,
        format: header(log::FORMAT_HEADER).and_then(|f| u32::try_from(f).ok()),
    })
}
