//! Creating the cluster's topics: a changelog per aggregation and the
//! commits topic, each with as many partitions as the largest source topic
//! (a source partition's records go to the same-numbered partition), and
//! the one-partition members topic. All compacted.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::create_client;

use super::Cluster;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a metadata read that timed out is tried at start (a
/// busy broker can take longer than one timeout).
const METADATA_ATTEMPTS: u32 = 4;

/// [`partition_count`], tried again while the broker does not answer in
/// time or refuses for now.
fn partition_count_patiently<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> KafkaResult<Option<i32>> {
    let mut attempt = 1;
    loop {
        match partition_count(client, topic, METADATA_TIMEOUT) {
            Err(error) if attempt < METADATA_ATTEMPTS && crate::kafka::is_transient(&error) => {
                tracing::warn!(%error, topic, attempt, "reading a topic's metadata failed; trying again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A topic's partition count as the broker reports it (`None`: no such
/// topic, or none of its partitions known yet).
pub(super) fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> KafkaResult<Option<i32>> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// Creates the missing cluster topics and checks the existing ones; returns
/// the partition count of every source topic.
// Long on purpose: create, then check each kind of topic against what
// it must be; every check has its own message naming the fix.
pub fn ensure_topics(
    cluster: &Cluster,
    source_topics: &[String],
) -> anyhow::Result<BTreeMap<String, i32>> {
    let admin: AdminClient<DefaultClientContext> =
        create_client(&cluster.client_config()).context("creating the Kafka admin client")?;
    let partitions_of = |topic: &str| -> anyhow::Result<Option<i32>> {
        partition_count_patiently(admin.inner(), topic)
            .with_context(|| format!("reading the metadata of {topic:?}"))
    };
    let mut sources = BTreeMap::new();
    for topic in source_topics {
        let Some(count) = partitions_of(topic)? else {
            bail!(
                "source topic {topic:?} does not exist; a cluster needs it to size its changelog topics"
            );
        };
        sources.insert(topic.clone(), count);
    }
    let partitions = sources.values().copied().max().unwrap_or(1);
    let mut wanted: Vec<(String, i32)> = cluster
        .aggregations
        .iter()
        .map(|a| (a.changelog.clone(), partitions))
        .collect();
    wanted.push((cluster.topics.commits(), partitions));
    wanted.push((cluster.topics.members(), 1));

    let lag = cluster.config.min_compaction_lag_ms.to_string();
    let record_max_bytes = cluster.topics.record_max_bytes.to_string();
    let mut missing = Vec::new();
    for (name, count) in &wanted {
        match partitions_of(name)? {
            Some(existing) if existing >= *count => {}
            Some(existing) => bail!(
                "topic {name:?} has {existing} partitions; wagg needs {count} (one per source partition). Add partitions to it or choose another `cluster.topic_prefix`"
            ),
            None => missing.push(
                NewTopic::new(
                    name,
                    *count,
                    TopicReplication::Fixed(cluster.config.replication_factor),
                )
                .set("cleanup.policy", "compact")
                .set("min.compaction.lag.ms", &lag)
                .set("max.message.bytes", &record_max_bytes),
            ),
        }
    }
    if missing.is_empty() {
        return Ok(sources);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for topic creation")?;
    let results = runtime
        .block_on(admin.create_topics(
            &missing,
            &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)),
        ))
        .context("creating the cluster topics")?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = name, "created cluster topic"),
            // Another instance created it first.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name:?}: {code}"),
        }
    }
    // Creation is asynchronous on some brokers: wait until each is visible.
    for (name, _) in &wanted {
        let mut attempts = 0;
        while partitions_of(name)?.is_none() {
            attempts += 1;
            if attempts > 50 {
                bail!("topic {name:?} was created but does not show in the metadata");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(sources)
}
