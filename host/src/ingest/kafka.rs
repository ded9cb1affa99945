//! The Kafka consumer: a consumer-group member whose partitions start at the
//! offsets stored in the state store (the source of truth), never at the
//! group's committed offsets.
//!
//! It polls on its own thread (`wagg-source`) and hands batches to the
//! pipeline over a bounded channel, so librdkafka's per-message work and
//! the copies into [`SourceRecord`]s run beside the plugin calls instead of
//! between them. Assignment changes travel through the same channel, in
//! order with the batches; a revocation waits — inside librdkafka's
//! rebalance callback, so before the group can hand the partitions on — until
//! the pipeline has written everything it applied from them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::SourceEvent;
use super::catch_up::{CatchUpChange, CatchUpReader};
use super::rebalance::SourceContext;
use crate::cluster::Cluster;
use crate::config::{BatchConfig, SourceConfig};
use crate::kafka::{ClientProperties, create_client_with_context, read_headers};
use crate::ops::status::Status;
use crate::record::SourceRecord;
use crate::state::store::StateStore;

/// How long the source waits for re-read records when no live ones came.
const CATCH_UP_WAIT: Duration = Duration::from_millis(20);

/// Batches handed over but not yet taken by the pipeline: enough to keep
/// both threads busy, few enough to bound memory.
const QUEUED_BATCHES: usize = 4;

/// The consumer before its thread starts.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<SourceContext>>,
    catch_up: CatchUpReader,
    topic_names: HashMap<String, Arc<str>>,
    events: Receiver<SourceEvent>,
    session_timeout: Duration,
}

impl KafkaSource {
    /// A consumer-group member of `source.group_id`; `client` holds the
    /// brokers and `[source.kafka]`.
    pub fn new(
        source: &SourceConfig,
        client: &ClientProperties,
        store: Arc<StateStore>,
        status: Arc<Status>,
        cluster: Option<Arc<Cluster>>,
    ) -> anyhow::Result<Self> {
        let catch_up_client = client;
        let client = client.client_config(&[
            ("group.id", source.group_id.as_str()),
            // Offsets live in the state store, written with the state.
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            // Every partition starts at an explicit offset (stored, or the
            // beginning or end for a new one), and a stored offset the
            // broker no longer has stops consumption at assignment
            // (`rebalance::out_of_range`). Should a fetch still be refused
            // as out of range (some brokers do it spuriously), going back
            // to the earliest record is the safe reset: records below the
            // stored offset are dropped on arrival, so nothing is applied
            // twice, and nothing is skipped (`latest` would skip; `error`
            // would stop consumption for good on a spurious refusal).
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "1000"),
            ("enable.partition.eof", "false"),
            // When wagg is slower than the fetcher (catching up on a
            // backlog), librdkafka pauses a partition whose queue is full
            // for this long; its 1 s default starved the consumer once the
            // queue drained (114 k → 338 k records/s end to end, see
            // BENCHMARKS.md). Overridable in `[source.kafka]`.
            ("fetch.queue.backoff.ms", "10"),
        ]);
        let catch_up_group = format!("{}-catch-up", source.group_id);
        let catch_up_client = catch_up_client.client_config(&[
            // Assigned by hand (see `catch_up`): it never joins this group
            // nor commits to it, but librdkafka assigns only with one.
            ("group.id", catch_up_group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("fetch.queue.backoff.ms", "10"),
        ]);
        let (events, received) = mpsc::sync_channel(QUEUED_BATCHES);
        let context = SourceContext {
            failure: Mutex::new(None),
            store,
            status,
            start_from: source.start_from,
            events,
            revoked: Mutex::new(Vec::new()),
            revocation_pending: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            cluster,
            catch_up_changes: Mutex::new(Vec::new()),
        };
        // Errors from librdkafka name the property but never echo its value.
        let consumer: BaseConsumer<SourceContext> = create_client_with_context(&client, context)
            .context("creating the Kafka consumer (check `source` and `[source.kafka]`)")?;
        let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        let topic_names: HashMap<String, Arc<str>> = source
            .topics
            .iter()
            .map(|t| (t.clone(), Arc::<str>::from(t.as_str())))
            .collect();
        Ok(Self {
            consumer: Arc::new(consumer),
            catch_up: CatchUpReader::new(catch_up_client, topic_names.clone()),
            topic_names,
            events: received,
            session_timeout: source.session_timeout(),
        })
    }

    /// Starts polling on the `wagg-source` thread.
    pub fn start(self, batch: &BatchConfig) -> std::io::Result<SourceFeed> {
        let Self {
            consumer,
            catch_up,
            topic_names,
            events,
            session_timeout,
        } = self;
        let poller = Poller {
            consumer: consumer.clone(),
            catch_up,
            topic_names,
            max_records: batch.max_records.max(1),
            max_delay: batch.max_delay(),
            idle: IdleWatch::new(session_timeout),
        };
        let thread = std::thread::Builder::new()
            .name("wagg-source".into())
            .spawn(move || poller.run())?;
        Ok(SourceFeed {
            consumer,
            events,
            thread: Some(thread),
        })
    }
}

/// The polling side, owned by the source thread.
struct Poller {
    consumer: Arc<BaseConsumer<SourceContext>>,
    catch_up: CatchUpReader,
    topic_names: HashMap<String, Arc<str>>,
    max_records: usize,
    max_delay: Duration,
    idle: IdleWatch,
}

/// Notices an instance that owns no partition of topics that have some,
/// for longer than the group's session timeout: a member that died without
/// leaving may still hold them (Apache Kafka expires it after the session
/// timeout; some brokers never do). The instance then says so on `/readyz`
/// and re-joins the group to have the partitions reassigned, at growing
/// intervals (a member can also own nothing legitimately: more members
/// than partitions).
struct IdleWatch {
    session_timeout: Duration,
    idle_since: Option<Instant>,
    next_rejoin: Option<Instant>,
    backoff: Duration,
    last_check: Instant,
}

/// The longest wait between two re-joins of an idle instance.
const MAX_REJOIN_BACKOFF: Duration = Duration::from_secs(600);

impl IdleWatch {
    fn new(session_timeout: Duration) -> Self {
        Self {
            session_timeout,
            idle_since: None,
            next_rejoin: None,
            backoff: session_timeout,
            last_check: Instant::now(),
        }
    }
}

impl Poller {
    fn run(mut self) {
        let consumer = self.consumer.clone();
        let context = consumer.context();
        while !context.stopped.load(Ordering::Acquire) {
            if let Some(cluster) = &context.cluster
                && cluster.rejoin.swap(false, Ordering::AcqRel)
            {
                self.rejoin();
            }
            if context.cluster.is_none() && self.idle_too_long() {
                self.rejoin();
            }
            let batch = self.fill_batch(&context.stopped);
            if !batch.is_empty() {
                crate::fault_injection::fault_point("wagg-source");
            }
            self.catch_up.live_moved(&batch);
            let idle = batch.is_empty();
            if !batch.is_empty() && context.events.send(SourceEvent::Records(batch)).is_err() {
                break;
            }
            if self.catch_up(idle).is_err() {
                break;
            }
            if let Some(reason) = context.take_failure() {
                let _ = context.events.send(SourceEvent::Failed(reason));
                break;
            }
        }
    }

    /// Raises the live offset of each partition to start re-reading to
    /// the group consumer's position there: every record below it has been
    /// handed on as live (the records of the last poll included, even when
    /// the partition was assigned in that poll), so none of them is missed
    /// by the aggregations starting to catch up.
    fn raise_to_handed_on(&self, changes: &mut [CatchUpChange]) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for change in changes {
            if let CatchUpChange::Start {
                topic,
                partition,
                live,
                ..
            } = change
                && let Some(element) = positions.find_partition(topic, *partition)
                && let Offset::Offset(position) = element.offset()
            {
                *live = (*live).max(position);
            }
        }
    }

    /// Starts and stops re-reading partitions as the last poll's
    /// rebalances said, then hands on a batch of re-read records (waiting a
    /// little for one when the live records are `idle`). `Err`: the
    /// pipeline is gone.
    fn catch_up(&mut self, idle: bool) -> Result<(), ()> {
        let context = self.consumer.context();
        let mut changes = context.take_catch_up_changes();
        let mut reached = Vec::new();
        if !changes.is_empty() {
            self.raise_to_handed_on(&mut changes);
            match self.catch_up.apply(changes) {
                Ok(done) => reached = done,
                Err(e) => context.fail(format!("{e:#}")),
            }
        }
        if !self.catch_up.is_idle() {
            let wait = if idle { CATCH_UP_WAIT } else { Duration::ZERO };
            let (records, done) = self.catch_up.read(self.max_records, wait);
            if !records.is_empty() {
                context
                    .status
                    .metrics()
                    .records_consumed
                    .inc_by(records.len() as u64);
                context
                    .events
                    .send(SourceEvent::CatchUp(records))
                    .map_err(drop)?;
            }
            reached.extend(done);
        }
        for done in reached {
            let event = SourceEvent::CaughtUp {
                topic: done.topic,
                partition: done.partition,
                at: done.at,
            };
            context.events.send(event).map_err(drop)?;
        }
        Ok(())
    }

    /// Whether this (single) instance has owned nothing for too long while
    /// its topics have partitions, and should re-join now. Checked once a
    /// second; keeps `/readyz` told.
    fn idle_too_long(&mut self) -> bool {
        let watch = &mut self.idle;
        if watch.last_check.elapsed() < Duration::from_secs(1) {
            return false;
        }
        watch.last_check = Instant::now();
        let status = &self.consumer.context().status;
        if status.partitions().iter().any(|p| p.assigned) {
            if watch.idle_since.take().is_some() {
                status.set_idle(None);
            }
            watch.next_rejoin = None;
            watch.backoff = watch.session_timeout;
            return false;
        }
        let since = *watch.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < watch.session_timeout {
            return false;
        }
        let partitions = self.source_partitions();
        if partitions == 0 {
            return false;
        }
        let watch = &mut self.idle;
        status.set_idle(Some(format!(
            "owns none of the {partitions} partitions of its topics for {}s (longer than the group's session timeout); re-joining the group",
            since.elapsed().as_secs()
        )));
        let now = Instant::now();
        if watch.next_rejoin.is_some_and(|at| now < at) {
            return false;
        }
        tracing::warn!(
            partitions,
            "this instance has owned no partitions for longer than the session timeout (a member that died may still hold them); re-joining the group"
        );
        watch.next_rejoin = Some(now + watch.backoff);
        watch.backoff = (watch.backoff * 2).min(MAX_REJOIN_BACKOFF);
        true
    }

    /// How many partitions the source topics have (0 if unknown).
    fn source_partitions(&self) -> usize {
        let Ok(metadata) = self.consumer.fetch_metadata(None, Duration::from_secs(5)) else {
            return 0;
        };
        metadata
            .topics()
            .iter()
            .filter(|t| self.topic_names.contains_key(t.name()))
            .map(|t| t.partitions().len())
            .sum()
    }

    /// Leaves the group and joins it again (see `cluster::membership`).
    fn rejoin(&self) {
        let topics: Vec<&str> = self.topic_names.keys().map(String::as_str).collect();
        self.consumer.unsubscribe();
        if let Err(e) = self.consumer.subscribe(&topics) {
            tracing::error!(error = %e, "re-subscribing failed");
            self.consumer
                .context()
                .status
                .set_fatal(format!("re-joining the consumer group: {e}"));
        }
    }

    /// Polls until the batch is full, its delay is up, or (with nothing
    /// gathered yet) a poll comes back empty, so a stop is noticed
    /// promptly.
    fn fill_batch(&self, stop: &AtomicBool) -> Vec<SourceRecord> {
        let context = self.consumer.context();
        let mut batch = Vec::with_capacity(self.max_records);
        let mut deadline: Option<Instant> = None;
        let mut polls = 0u32;
        while batch.len() < self.max_records && !stop.load(Ordering::Relaxed) {
            // Records already fetched are taken without reading the clock
            // (a clock read per record was 5 % of the consumer thread); the
            // deadline is checked every 64 polls and before waiting.
            polls = polls.wrapping_add(1);
            let mut record = if deadline.is_some() && !polls.is_multiple_of(64) {
                self.poll(Duration::ZERO)
            } else {
                None
            };
            if record.is_none() {
                let timeout = match deadline {
                    Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                    None => Duration::from_millis(100),
                };
                if deadline.is_some() && timeout.is_zero() {
                    break;
                }
                record = self.poll(timeout);
            }
            let got_one = record.is_some();
            if let Some(record) = record {
                deadline.get_or_insert_with(|| Instant::now() + self.max_delay);
                batch.push(record);
            }
            // After the push: the poll that ran a revocation may return a
            // record of a revoked partition too.
            let revoked = context.take_revoked();
            if !revoked.is_empty() {
                batch.retain(|r: &SourceRecord| {
                    !revoked
                        .iter()
                        .any(|(t, p)| **t == *r.topic && *p == r.partition)
                });
            }
            if !got_one && deadline.is_none() {
                break;
            }
        }
        if !batch.is_empty() {
            context
                .status
                .metrics()
                .records_consumed
                .inc_by(batch.len() as u64);
            context.status.broker_ok();
        }
        batch
    }

    /// The next record, or `None` when none arrived within `timeout`.
    fn poll(&self, timeout: Duration) -> Option<SourceRecord> {
        match self.consumer.poll(timeout)? {
            Ok(message) => Some(record_of(
                &message,
                interned(&self.topic_names, message.topic()),
            )),
            Err(e) => {
                if let Some(repeated) = crate::kafka::REPEATS.admit(&format!("consume error {e}")) {
                    tracing::warn!(error = %e, repeated, "consume error");
                }
                self.consumer.context().status.broker_error(e.to_string());
                None
            }
        }
    }
}

/// The source's shared name of a topic.
pub(super) fn interned(names: &HashMap<String, Arc<str>>, name: &str) -> Arc<str> {
    names.get(name).cloned().unwrap_or_else(|| Arc::from(name))
}

/// A consumed message as the pipeline takes it.
pub(super) fn record_of(message: &BorrowedMessage<'_>, topic: Arc<str>) -> SourceRecord {
    SourceRecord {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        timestamp: message.timestamp().to_millis(),
        headers: read_headers(message),
    }
}

/// The pipeline's end of the source thread.
pub struct SourceFeed {
    consumer: Arc<BaseConsumer<SourceContext>>,
    events: Receiver<SourceEvent>,
    thread: Option<JoinHandle<()>>,
}

impl super::EventFeed for SourceFeed {
    /// (The channel's sender lives in the consumer's context, which this
    /// feed shares, so a dead thread does not close the channel: a thread
    /// that panicked would otherwise look like an idle topic for ever.)
    fn recv_timeout(&self, timeout: Duration) -> Result<SourceEvent, RecvTimeoutError> {
        match self.events.recv_timeout(timeout) {
            Err(RecvTimeoutError::Timeout)
                if self.thread.as_ref().is_none_or(JoinHandle::is_finished) =>
            {
                Err(RecvTimeoutError::Disconnected)
            }
            other => other,
        }
    }

    /// The source thread raises `live` to what it has handed on since.
    fn start_catch_up(&self, topic: &str, partition: i32, from: i64, live: i64) {
        self.consumer
            .context()
            .start_reading_again(topic, partition, from, live);
    }

    /// The state store stays the source of truth; this is for monitoring
    /// tools.
    fn commit(&self, offsets: &[(&str, i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::debug!(error = %e, "cannot build commit list");
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit to the broker failed (monitoring only)");
        }
    }

    /// Batches still queued are dropped (their records are read again from
    /// the stored offsets next time).
    fn close(mut self: Box<Self>) {
        self.stop();
    }
}

impl SourceFeed {
    fn stop(&mut self) {
        self.consumer
            .context()
            .stopped
            .store(true, Ordering::Release);
        // Drain, so the thread is never stuck handing over a batch or
        // waiting for a revocation to be acknowledged.
        while let Some(thread) = &self.thread {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(event) => drop(event),
                Err(RecvTimeoutError::Timeout) if !thread.is_finished() => {}
                Err(_) => {
                    if let Some(thread) = self.thread.take() {
                        let _ = thread.join();
                    }
                }
            }
        }
    }
}

impl Drop for SourceFeed {
    fn drop(&mut self) {
        self.stop();
    }
}
