//! Live status shared by the consumer loop (writer) and the HTTP API
//! (reader). Cheap to read; never blocks the consumer for long.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::ops::metrics::Metrics;

#[derive(Debug, Default)]
pub struct Status {
    inner: RwLock<Inner>,
    metrics: Metrics,
}

#[derive(Debug, Default)]
struct Inner {
    consumer_running: bool,
    fatal: Option<String>,
    broker_error: Option<(String, Instant)>,
    /// Why this instance consumes nothing although it should (it owns no
    /// partition of topics that have some).
    idle: Option<String>,
    aggregations: BTreeMap<String, AggregationCounters>,
    partitions: BTreeMap<(String, i32), PartitionProgress>,
    /// Own next offsets of aggregations catching up: (aggregation, topic,
    /// partition) → next offset.
    catch_up: BTreeMap<(String, String, i32), i64>,
    /// (aggregation, topic, partition) → stream time, as written.
    stream_times: BTreeMap<(String, String, i32), i64>,
}

pub use crate::state::store::AggregationCounters;

#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// Next offset wagg will apply (everything before is in the state).
    pub next_offset: Option<i64>,
    /// The broker's high watermark, as last reported.
    pub high_watermark: Option<i64>,
    /// `high_watermark - next_offset`, when both are known.
    pub lag: Option<i64>,
    /// Whether this instance owns the partition.
    pub assigned: bool,
    /// Cluster mode: the address of the instance that owns it (`null`
    /// while it has no live owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Cluster mode: the source offset this instance's standby copy of the
    /// partition reaches (absent when it keeps none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_offset: Option<i64>,
    /// In an aggregation's list: the aggregation is catching up on this
    /// partition (it was added, or reset, after the partition was
    /// consumed); `next_offset` and `lag` are then its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catching_up: bool,
    /// In a windowed aggregation's list: the partition's stream time (the
    /// largest event time seen, ms since the epoch), as last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_time: Option<i64>,
}

/// Why the instance is not ready, if it is not.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
}

/// A broker error older than this no longer counts as an outage.
const BROKER_ERROR_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl Status {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The Prometheus instruments (lock-free; see `metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn set_consumer_running(&self, running: bool) {
        self.write().consumer_running = running;
    }

    pub fn set_fatal(&self, message: String) {
        let mut inner = self.write();
        inner.fatal = Some(message);
        inner.consumer_running = false;
    }

    /// Sets (or clears) why this instance consumes nothing; it shows on
    /// `/readyz` as a reason not to be ready.
    pub fn set_idle(&self, reason: Option<String>) {
        self.write().idle = reason;
    }

    pub fn fatal(&self) -> Option<String> {
        self.read().fatal.clone()
    }

    pub fn broker_error(&self, message: String) {
        self.write().broker_error = Some((message, Instant::now()));
    }

    pub fn broker_ok(&self) {
        let mut inner = self.write();
        if inner.broker_error.is_some() {
            inner.broker_error = None;
        }
    }

    pub fn set_counters(&self, aggregation: &str, counters: AggregationCounters) {
        self.write()
            .aggregations
            .insert(aggregation.to_owned(), counters);
    }

    /// Forgets an aggregation no longer applied (a reload removed it).
    pub fn remove_aggregation(&self, aggregation: &str) {
        let mut inner = self.write();
        inner.aggregations.remove(aggregation);
        inner.catch_up.retain(|(name, _, _), _| name != aggregation);
        inner
            .stream_times
            .retain(|(name, _, _), _| name != aggregation);
    }

    pub fn counters(&self, aggregation: &str) -> AggregationCounters {
        self.read()
            .aggregations
            .get(aggregation)
            .copied()
            .unwrap_or_default()
    }

    fn partition<'a>(
        inner: &'a mut Inner,
        topic: &str,
        partition: i32,
    ) -> &'a mut PartitionProgress {
        inner
            .partitions
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| PartitionProgress {
                topic: topic.to_owned(),
                partition,
                ..PartitionProgress::default()
            })
    }

    pub fn set_next_offset(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut inner = self.write();
        let progress = Self::partition(&mut inner, topic, partition);
        progress.next_offset = Some(next_offset);
        progress.update_lag();
    }

    pub fn set_high_watermark(&self, topic: &str, partition: i32, high_watermark: i64) {
        let mut inner = self.write();
        let progress = Self::partition(&mut inner, topic, partition);
        progress.high_watermark = Some(high_watermark);
        progress.update_lag();
    }

    pub fn set_assigned(&self, topic: &str, partition: i32, assigned: bool) {
        Self::partition(&mut self.write(), topic, partition).assigned = assigned;
    }

    pub fn partitions(&self) -> Vec<PartitionProgress> {
        self.read().partitions.values().cloned().collect()
    }

    /// Sets an aggregation's own next offset on a partition while it
    /// catches up (`None`: it follows the partition, or the partition is
    /// not this instance's any more).
    pub fn set_catch_up(&self, aggregation: &str, topic: &str, partition: i32, next: Option<i64>) {
        let key = (aggregation.to_owned(), topic.to_owned(), partition);
        let mut inner = self.write();
        match next {
            Some(next) => inner.catch_up.insert(key, next),
            None => inner.catch_up.remove(&key),
        };
    }

    /// A windowed aggregation's stream time on a partition, as written.
    pub fn set_stream_time(&self, aggregation: &str, topic: &str, partition: i32, time: i64) {
        let key = (aggregation.to_owned(), topic.to_owned(), partition);
        self.write().stream_times.insert(key, time);
    }

    /// A windowed aggregation's stream time on a partition, as written.
    pub fn stream_time(&self, aggregation: &str, topic: &str, partition: i32) -> Option<i64> {
        let key = (aggregation.to_owned(), topic.to_owned(), partition);
        self.read().stream_times.get(&key).copied()
    }

    /// An aggregation's view of the partitions: the shared progress, with
    /// its own offsets and lag where it is catching up.
    pub fn partitions_of(
        &self,
        aggregation: &str,
        mut partitions: Vec<PartitionProgress>,
    ) -> Vec<PartitionProgress> {
        let inner = self.read();
        for progress in &mut partitions {
            let key = (
                aggregation.to_owned(),
                progress.topic.clone(),
                progress.partition,
            );
            if let Some(&next) = inner.catch_up.get(&key) {
                progress.catching_up = true;
                progress.next_offset = Some(next);
                progress.lag = progress.high_watermark.map(|high| (high - next).max(0));
            }
            progress.stream_time = inner.stream_times.get(&key).copied();
        }
        partitions
    }

    /// How far behind its partitions' live offsets each aggregation that
    /// is catching up is, in records (for `/metrics`).
    pub fn catch_up_lags(&self) -> BTreeMap<String, i64> {
        let inner = self.read();
        let mut lags = BTreeMap::new();
        for ((aggregation, topic, partition), next) in &inner.catch_up {
            let high = inner
                .partitions
                .get(&(topic.clone(), *partition))
                .and_then(|p| p.high_watermark.or(p.next_offset))
                .unwrap_or(*next);
            *lags.entry(aggregation.clone()).or_insert(0) += (high - next).max(0);
        }
        lags
    }

    pub fn readiness(&self) -> Readiness {
        let inner = self.read();
        let mut reasons = Vec::new();
        if let Some(fatal) = &inner.fatal {
            reasons.push(format!("consumer stopped: {fatal}"));
        } else if !inner.consumer_running {
            reasons.push("consumer not running".to_owned());
        }
        if let Some((message, at)) = &inner.broker_error
            && at.elapsed() < BROKER_ERROR_WINDOW
        {
            reasons.push(format!("broker unreachable: {message}"));
        }
        if let Some(idle) = &inner.idle {
            reasons.push(idle.clone());
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }
}

impl PartitionProgress {
    fn update_lag(&mut self) {
        // librdkafka reports high watermarks once a second: one older than
        // what was already applied is stale, and the applied offset is a
        // truer lower bound (the dashboard showed high < next otherwise).
        if let (Some(high), Some(next)) = (self.high_watermark, self.next_offset)
            && high < next
        {
            self.high_watermark = Some(next);
        }
        self.lag = match (self.high_watermark, self.next_offset) {
            (Some(high), Some(next)) => Some(high - next),
            _ => None,
        };
    }
}

/// Milliseconds since the Unix epoch, for reports.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_high_watermark_never_shows_below_the_applied_offset() {
        let status = Status::default();
        status.set_high_watermark("t", 0, 100);
        status.set_next_offset("t", 0, 40);
        assert_eq!(status.partitions()[0].lag, Some(60));
        // Applied past the last reported watermark (reported once a second).
        status.set_next_offset("t", 0, 130);
        let progress = &status.partitions()[0];
        assert_eq!(
            (progress.high_watermark, progress.lag),
            (Some(130), Some(0))
        );
        status.set_high_watermark("t", 0, 150);
        assert_eq!(status.partitions()[0].lag, Some(20));
    }
}
