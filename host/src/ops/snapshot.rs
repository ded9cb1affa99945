//! The scrape-time part of `/metrics`: the totals [`Status`](super::status::Status)
//! and the store already keep (applied/failed/dead-lettered counters, lag
//! per partition, store size), encoded when scraped rather than updated
//! per record.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::metrics::AggregationLabel;
use super::status::{AggregationCounters, PartitionProgress};

/// What the scrape reads from `Status` and the store at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub aggregations: Vec<(String, AggregationCounters, u64)>,
    pub partitions: Vec<PartitionProgress>,
    /// Records between the live offsets and those of aggregations catching
    /// up, per aggregation (absent: current).
    pub catch_up_lag: std::collections::BTreeMap<String, i64>,
    /// Keys migrated so far, per aggregation migrating its stored state to
    /// a new state format (absent: not migrating).
    pub migrated_keys: std::collections::BTreeMap<String, u64>,
    pub store_bytes: u64,
    pub ready: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    topic: String,
    partition: i32,
}

impl Collector for Snapshot {
    // A list of metric families, each a few declarative lines.
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Pick = fn(&AggregationCounters) -> u64;
        let totals: [(&str, &str, Pick); 5] = [
            (
                "records_applied",
                "Records applied to the aggregation's state (written, as of the last state write)",
                |c| c.records_applied,
            ),
            (
                "records_failed",
                "Records the aggregation's plugin rejected or trapped on",
                |c| c.records_failed,
            ),
            (
                "records_dead_lettered",
                "Rejected records delivered to the dead-letter topic",
                |c| c.records_dead_lettered,
            ),
            (
                "records_late",
                "Records of a windowed aggregation that arrived after all their windows had closed (not applied)",
                |c| c.records_late,
            ),
            (
                "records_dropped",
                "Records not aggregated by rule: no Kafka key (null key) in an aggregation keyed by it",
                |c| c.records_dropped,
            ),
        ];
        for (name, help, pick) in totals {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for (aggregation, counters, _) in &self.aggregations {
                let label = AggregationLabel {
                    aggregation: aggregation.clone(),
                };
                ConstCounter::new(pick(counters)).encode(family.encode_family(&label)?)?;
            }
        }
        type PickGauge = fn(&Snapshot, &str, u64) -> i64;
        let per_aggregation: [(&str, &str, PickGauge); 4] = [
            (
                "state_keys",
                "States stored per aggregation: keys (one per key and window for windowed aggregations), exact",
                |_, _, estimate| estimate as i64,
            ),
            (
                "aggregation_catch_up_lag",
                "Records an aggregation added (or reset) after its partitions were consumed has still to apply before it is current (0: current)",
                |s, name, _| s.catch_up_lag.get(name).copied().unwrap_or(0),
            ),
            (
                "aggregation_migrating",
                "1 while an aggregation migrates its stored state to its plugin's new state format (it applies records again, catching up, once done)",
                |s, name, _| i64::from(s.migrated_keys.contains_key(name)),
            ),
            (
                "aggregation_migrated_keys",
                "Keys migrated so far by the state migration in progress (0: none)",
                |s, name, _| s.migrated_keys.get(name).map_or(0, |&keys| keys as i64),
            ),
        ];
        for (name, help, pick) in per_aggregation {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (aggregation, _, estimate) in &self.aggregations {
                let label = AggregationLabel {
                    aggregation: aggregation.clone(),
                };
                ConstGauge::new(pick(self, aggregation, *estimate))
                    .encode(family.encode_family(&label)?)?;
            }
        }
        type PickPartition = fn(&PartitionProgress) -> Option<i64>;
        let per_partition: [(&str, &str, PickPartition); 3] = [
            (
                "consumer_lag",
                "Records between the broker's high watermark and the next offset to apply",
                |p| p.lag,
            ),
            (
                "partition_next_offset",
                "Next offset to apply (everything before is in the written state)",
                |p| p.next_offset,
            ),
            (
                "partition_assigned",
                "1 while this instance owns the partition",
                |p| Some(i64::from(p.assigned)),
            ),
        ];
        for (name, help, pick) in per_partition {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for progress in &self.partitions {
                if let Some(value) = pick(progress) {
                    let label = PartitionLabel {
                        topic: progress.topic.clone(),
                        partition: progress.partition,
                    };
                    ConstGauge::new(value).encode(family.encode_family(&label)?)?;
                }
            }
        }
        let store = ConstGauge::new(self.store_bytes as i64);
        store.encode(encoder.encode_descriptor(
            "state_store_bytes",
            "RocksDB size: live SST files plus memtables",
            None,
            store.metric_type(),
        )?)?;
        let ready = ConstGauge::new(i64::from(self.ready));
        ready.encode(encoder.encode_descriptor(
            "ready",
            "1 when /readyz would answer 200",
            None,
            ready.metric_type(),
        )?)?;
        Ok(())
    }
}
