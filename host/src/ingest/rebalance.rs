//! The consumer's context: where librdkafka's callbacks land (client
//! errors, statistics, the log) and, above all, the rebalance hand-shake —
//! an assignment starts every partition at its stored offset (after a
//! take-over in a cluster, and only if the broker still has it), and a
//! revocation waits until the pipeline has written what it applied from
//! the partitions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::SourceEvent;
use super::catch_up::CatchUpChange;
use crate::cluster::Cluster;
use crate::config::StartFrom;
use crate::ops::status::Status;
use crate::state::store::StateStore;

pub struct SourceContext {
    /// Why consumption must stop, once it must (see `SourceEvent::Failed`).
    pub(super) failure: Mutex<Option<String>>,
    pub(super) store: Arc<StateStore>,
    pub(super) status: Arc<Status>,
    pub(super) start_from: StartFrom,
    pub(super) events: SyncSender<SourceEvent>,
    /// Partitions revoked during the last poll: records of theirs still in
    /// the batch being filled are dropped (their next owner re-reads them).
    pub(super) revoked: Mutex<Vec<(String, i32)>>,
    /// Whether `revoked` has entries: read after every poll, so the mutex
    /// is only taken when a revocation happened.
    pub(super) revocation_pending: AtomicBool,
    /// Set once the pipeline has stopped applying (and written what it
    /// applied): revocations from then on need no hand-shake, and the
    /// source thread ends.
    pub(super) stopped: AtomicBool,
    /// Cluster mode: partitions are taken over (restored, claimed) before
    /// they are assigned, and released after they are revoked.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// Partitions to start or stop re-reading for aggregations catching up
    /// (taken by the poller after each poll).
    pub(super) catch_up_changes: Mutex<Vec<CatchUpChange>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1 is librdkafka's internal UA partition; -1001 is "unknown".
                if *partition >= 0 && p.hi_offset >= 0 {
                    self.status
                        .set_high_watermark(topic, *partition, p.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(repeated) = crate::kafka::REPEATS.admit(&format!("client {error} {reason}")) {
            tracing::warn!(%error, reason, repeated, "kafka client error");
        }
        self.status.broker_error(format!("{error}: {reason}"));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::log_librdkafka(level, fac, log_message);
    }
}

impl ConsumerContext for SourceContext {
    // Long on purpose: one librdkafka callback whose steps (revoke: flush
    // hand-shake; assign: restore, seek, resume) must run in this order on
    // the consumer thread; ARCHITECTURE.md describes the hand-shake.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(cluster) = &self.cluster
                    && let Err(e) = cluster.take_over(&self.store, &partitions)
                {
                    // Applying records on top of a state that is not the
                    // partition's newest would break exactly-once: never
                    // assign them without a take-over.
                    if e.is_broker_trouble() {
                        // The broker is struggling: leave the partitions
                        // unassigned (they answer 503 meanwhile) and re-join
                        // the group for a new assignment and a new attempt.
                        tracing::error!(error = %e, ?partitions, "cannot take the partitions over yet; re-joining the group to try again");
                        self.status
                            .broker_error(format!("taking over partitions {partitions:?}: {e}"));
                        if let Err(e) = consumer.assign(&TopicPartitionList::new()) {
                            tracing::error!(error = %e, "clearing the assignment failed");
                        }
                        cluster.rejoin.store(true, Ordering::Release);
                    } else {
                        tracing::error!(error = %e, ?partitions, "cannot take the partitions over");
                        self.status
                            .set_fatal(format!("taking over partitions {partitions:?}: {e}"));
                        cluster.request_shutdown();
                    }
                    return;
                }
                let stored = match self.store.offsets() {
                    Ok(offsets) => offsets,
                    Err(e) => {
                        // Without stored offsets we cannot start safely.
                        self.status
                            .set_fatal(format!("reading stored offsets: {e}"));
                        return;
                    }
                };
                if let Some(reason) = out_of_range(consumer, &partitions, &stored) {
                    // Assigning would jump (or wait for ever, on brokers
                    // that do not report the range): stop instead.
                    self.status.set_fatal(reason.clone());
                    self.fail(reason);
                    return;
                }
                for (topic, partition) in &partitions {
                    let offset = match (stored.get(&(topic.clone(), *partition)), self.start_from) {
                        (Some(&next), _) => Offset::Offset(next),
                        (None, StartFrom::Earliest) => Offset::Beginning,
                        (None, StartFrom::Latest) => Offset::End,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(topic, partition, error = %e, "cannot set start offset");
                    }
                    self.status.set_assigned(topic, *partition, true);
                    if let Some(&next) = stored.get(&(topic.clone(), *partition)) {
                        self.status.set_next_offset(topic, *partition, next);
                        self.start_catch_up(topic, *partition, next);
                    }
                }
                tracing::info!(
                    ?partitions,
                    "partitions assigned; starting at stored offsets"
                );
                if let Err(e) = consumer.assign(tpl) {
                    self.status.set_fatal(format!("assigning partitions: {e}"));
                    return;
                }
                if !partitions.is_empty() {
                    // No longer idle (see `IdleWatch`), as of now.
                    self.status.set_idle(None);
                }
                // Fails only once the pipeline is gone; nothing to tell then.
                let _ = self.events.send(SourceEvent::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                for (topic, partition) in &partitions {
                    self.status.set_assigned(topic, *partition, false);
                }
                self.revoked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(partitions.iter().cloned());
                self.revocation_pending.store(true, Ordering::Release);
                if !self.stopped.load(Ordering::Acquire) {
                    let (done, written) = mpsc::channel();
                    if self
                        .events
                        .send(SourceEvent::Revoked {
                            partitions: partitions.clone(),
                            done,
                        })
                        .is_ok()
                    {
                        // Returns when the pipeline has written (or failed
                        // and dropped the event: a crash, as far as
                        // exactly-once is concerned).
                        let _ = written.recv();
                    }
                }
                self.catch_up_changes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(
                        partitions
                            .iter()
                            .map(|(topic, partition)| CatchUpChange::Stop {
                                topic: topic.clone(),
                                partition: *partition,
                            }),
                    );
                if let Some(cluster) = &self.cluster {
                    cluster.release(&partitions);
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

impl SourceContext {
    /// Stops consumption for `reason` (the pipeline hears it next).
    pub(super) fn fail(&self, reason: String) {
        tracing::error!(%reason, "cannot go on consuming");
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(reason);
    }

    /// Has the partition re-read if aggregations are catching up on it
    /// (behind its stored offset `live`).
    fn start_catch_up(&self, topic: &str, partition: i32, live: i64) {
        match self.store.catch_ups(topic, partition) {
            Ok(entries) => {
                if let Some(&from) = entries.values().min() {
                    self.start_reading_again(topic, partition, from, live);
                }
            }
            Err(e) => self.fail(format!(
                "reading the catch-up progress of {topic}/{partition}: {e}"
            )),
        }
    }

    /// Has the re-reader read `topic`/`partition` from `from` up to (at
    /// least) `live`.
    pub(super) fn start_reading_again(&self, topic: &str, partition: i32, from: i64, live: i64) {
        self.catch_up_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(CatchUpChange::Start {
                topic: topic.to_owned(),
                partition,
                from,
                live,
            });
    }

    pub(super) fn take_catch_up_changes(&self) -> Vec<CatchUpChange> {
        std::mem::take(
            &mut *self
                .catch_up_changes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    pub(super) fn take_failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub(super) fn take_revoked(&self) -> Vec<(String, i32)> {
        if !self.revocation_pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.revocation_pending.store(false, Ordering::Release);
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The partitions whose stored next offset lies outside the records the
/// broker holds, as an error for the operator (`None`: all are inside, or
/// the broker could not say; its fetch errors are the backstop then).
pub(super) fn out_of_range(
    consumer: &BaseConsumer<SourceContext>,
    partitions: &[(String, i32)],
    stored: &BTreeMap<(String, i32), i64>,
) -> Option<String> {
    let mut outside = Vec::new();
    // One budget for all partitions: a slow broker must not hold the
    // rebalance for a timeout per partition.
    let deadline = std::time::Instant::now() + WATERMARK_TIMEOUT;
    for (topic, partition) in partitions {
        let Some(&next) = stored.get(&(topic.clone(), *partition)) else {
            continue;
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            tracing::warn!(
                "the broker is slow to report watermarks; not checking the remaining stored offsets"
            );
            break;
        }
        match consumer.fetch_watermarks(topic, *partition, left) {
            Ok((low, high)) if next < low || next > high => outside.push(format!(
                "{topic}/{partition}: stored next offset {next}, the broker holds offsets {low}..{high}"
            )),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(topic, partition, %error, "cannot check the stored offset against the broker");
            }
        }
    }
    (!outside.is_empty()).then(|| out_of_range_reason(&outside.join("; ")))
}

/// How long the check may take, for all partitions together.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(10);

fn out_of_range_reason(which: &str) -> String {
    format!(
        "the broker does not have the records at the stored offsets ({which}): the topic was deleted and re-created, truncated, or its records expired. wagg never skips or re-reads stored progress on its own; to start over, stop wagg and use a new `state.dir`"
    )
}
