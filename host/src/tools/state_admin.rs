//! `wagg reset` and `wagg state drop`: changes to one aggregation's stored
//! state, made while wagg is stopped (RocksDB's lock refuses a second
//! process on the state directory, so a running instance is never changed
//! under its feet).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::app::open_store;
use crate::apply::StartAt;
use crate::config::{AggregationConfig, Config};
use crate::kafka::{ClientProperties, create_client};
use crate::state::store::StateStore;

/// Where a reset aggregation starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first record the broker still holds.
    Earliest,
    /// Where the other aggregations are (the stored offsets): from now on.
    Latest,
    /// The first record at or after this time (ms since the Unix epoch),
    /// as the broker's offsets-for-times answers.
    Time(i64),
}

impl FromStr for ResetTo {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            time => chrono::DateTime::parse_from_rfc3339(time)
                .map(|t| ResetTo::Time(t.timestamp_millis()))
                .map_err(|e| {
                    format!(
                        "expected `earliest`, `latest` or an RFC 3339 time such as 2026-11-29T12:00:00Z, got {time:?} ({e})"
                    )
                }),
        }
    }
}

impl ResetTo {
    /// As `--to` takes it.
    pub fn as_arg(&self) -> String {
        match self {
            ResetTo::Earliest => "earliest".into(),
            ResetTo::Latest => "latest".into(),
            ResetTo::Time(ms) => chrono::DateTime::from_timestamp_millis(*ms)
                .map_or_else(|| ms.to_string(), |time| time.to_rfc3339()),
        }
    }
}

impl fmt::Display for ResetTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetTo::Earliest => f.write_str("the earliest record"),
            ResetTo::Latest => f.write_str("the stored offsets"),
            ResetTo::Time(ms) => match chrono::DateTime::from_timestamp_millis(*ms) {
                Some(time) => write!(f, "{}", time.to_rfc3339()),
                None => write!(f, "{ms} ms"),
            },
        }
    }
}

/// Clears an aggregation's state and has it catch up from `to` the next
/// time wagg runs, while the other aggregations go on where they are.
pub fn reset(config: &Config, aggregation: &str, to: ResetTo) -> anyhow::Result<String> {
    let configured = configured(config, aggregation)?;
    if config.cluster.is_some() {
        bail!(
            "`wagg reset` changes one instance's store, but in cluster mode the aggregation's state also lives in its changelog and on the other instances: it is not supported there yet. To rebuild it, rename the aggregation in every instance's config (a new name catches up from `source.start_from`)"
        );
    }
    let store = open_store(config)?;
    let consumed = consumed_by(&store, configured)?;
    let start = start_at(config, &consumed, to)?.entries(&consumed);
    store.reset_aggregation(aggregation, &start)?;
    Ok(format!(
        "reset {aggregation:?}: its state is cleared; the next `wagg run` rebuilds it from {to} on {} of the {} partitions consumed so far (the others start with the other aggregations), while the other aggregations go on where they are",
        start.len(),
        consumed.len()
    ))
}

/// The partitions the store has consumed (with their stored next offsets)
/// that an aggregation applies to.
pub fn consumed_by(
    store: &StateStore,
    aggregation: &AggregationConfig,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    Ok(store.consumed(|topic| aggregation.applies_to(topic))?)
}

/// Where a reset to `to` starts, on the `consumed` partitions (a time is
/// asked of the broker).
pub fn start_at(
    config: &Config,
    consumed: &BTreeMap<(String, i32), i64>,
    to: ResetTo,
) -> anyhow::Result<StartAt> {
    Ok(match to {
        ResetTo::Earliest => StartAt::Beginning,
        ResetTo::Latest => StartAt::Here,
        ResetTo::Time(ms) => StartAt::Offsets(offsets_at(config, consumed, ms)?),
    })
}

/// Deletes what the store holds of an aggregation no longer in the config.
pub fn drop_state(config: &Config, aggregation: &str) -> anyhow::Result<String> {
    if config.aggregations.iter().any(|a| a.name == aggregation) {
        bail!(
            "aggregation {aggregation:?} is still in the config: remove its [[aggregation]] table first (wagg would start it again from scratch otherwise), or use `wagg reset` to rebuild it"
        );
    }
    let store = open_store(config)?;
    if !store.drop_aggregation(aggregation)? {
        let stored = store.stored_aggregations();
        bail!(
            "the store in {} holds no state of aggregation {aggregation:?} (it holds: {stored:?})",
            store.dir().display()
        );
    }
    Ok(format!(
        "dropped the stored state of aggregation {aggregation:?} from {}",
        store.dir().display()
    ))
}

fn configured<'c>(config: &'c Config, aggregation: &str) -> anyhow::Result<&'c AggregationConfig> {
    config
        .aggregations
        .iter()
        .find(|a| a.name == aggregation)
        .ok_or_else(|| {
            let names: Vec<&str> = config
                .aggregations
                .iter()
                .map(|a| a.name.as_str())
                .collect();
            anyhow::anyhow!("no aggregation {aggregation:?} in the config (configured: {names:?})")
        })
}

/// The first offset at or after `ms` of each consumed partition (none
/// where no record is that recent yet: it starts with the others there).
fn offsets_at(
    config: &Config,
    consumed: &BTreeMap<(String, i32), i64>,
    ms: i64,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let client = ClientProperties::new(&config.source.brokers, config.connection_properties())
        .client_config(&[("group.id", "wagg-reset"), ("enable.auto.commit", "false")]);
    let consumer: BaseConsumer = create_client(&client).context("creating a Kafka client")?;
    let mut query = TopicPartitionList::new();
    for (topic, partition) in consumed.keys() {
        query.add_partition_offset(topic, *partition, Offset::Offset(ms))?;
    }
    let found = consumer
        .offsets_for_times(query, Duration::from_secs(30))
        .with_context(|| {
            format!(
                "asking {} for the offsets at {ms} ms",
                config.source.brokers
            )
        })?;
    let mut start = BTreeMap::new();
    for element in found.elements() {
        if let Some(error) = element.error().err() {
            bail!(
                "the broker cannot say which offset of {}/{} is at that time: {error}",
                element.topic(),
                element.partition()
            );
        }
        // `End`: no record at or after that time yet.
        if let Offset::Offset(offset) = element.offset() {
            start.insert((element.topic().to_owned(), element.partition()), offset);
        }
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("earliest".parse(), Ok(ResetTo::Earliest));
        assert_eq!("latest".parse(), Ok(ResetTo::Latest));
        assert_eq!(
            "2026-11-29T12:00:00Z".parse(),
            Ok(ResetTo::Time(1_795_953_600_000))
        );
        assert_eq!(
            "2026-11-29T13:00:00+01:00".parse(),
            Ok(ResetTo::Time(1_795_953_600_000))
        );
        let error = "yesterday".parse::<ResetTo>().unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
    }
}
