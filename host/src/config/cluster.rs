//! `[cluster]`: scale-out over several instances of one group.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Scale-out: the instances of one `source.group_id` share the partitions,
/// keep each partition's state in changelog topics, and route queries to
/// the instance that owns a key (docs/scale-out.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The base URL other instances and clients reach this instance's HTTP
    /// API at, e.g. `http://10.0.0.5:8080`; also its identity in the group.
    pub advertised_http: String,
    /// Prefix of the topics wagg keeps for the group:
    /// `<prefix>changelog-<aggregation>`, `<prefix>commits` and
    /// `<prefix>members`. Default: `<source.group_id>-`.
    pub topic_prefix: Option<String>,
    /// Replication factor of those topics when wagg creates them; -1 uses
    /// the broker's default.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// How long a changelog record stays uncompacted (the topics'
    /// `min.compaction.lag.ms`); see docs/scale-out.md for why it matters.
    #[serde(default = "default_min_compaction_lag_ms")]
    pub min_compaction_lag_ms: u64,
    /// A lookup of a key another instance owns is proxied to it (`proxy`)
    /// or answered with a 307 redirect to it (`redirect`).
    #[serde(default)]
    pub forward: Forwarding,
    /// How many instances besides the owner keep a warm copy of each
    /// partition (following its changelog), for fast failover and for
    /// lookups while the owner is down.
    #[serde(default)]
    pub standby_replicas: u32,
    /// How often this instance announces itself and its partitions.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// An instance not heard from for this long is taken for dead by the
    /// query routing.
    #[serde(default = "default_member_timeout_ms")]
    pub member_timeout_ms: u64,
    /// How the producers of the source topics choose partitions for keyed
    /// records, so a key can be routed to its partition's owner.
    #[serde(default)]
    pub key_partitioner: KeyPartitioner,
    /// Name of an environment variable holding the cluster's shared secret
    /// (at least 32 characters, the same on every instance): it
    /// authenticates member announcements and the requests instances
    /// forward to each other. Needed with `[http.auth]`.
    pub secret_env: Option<String>,
    /// A file holding the secret instead (surrounding whitespace ignored);
    /// relative to the config file.
    pub secret_file: Option<std::path::PathBuf>,
}

fn default_replication_factor() -> i32 {
    -1
}
fn default_min_compaction_lag_ms() -> u64 {
    3_600_000
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_member_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    #[default]
    Proxy,
    Redirect,
}

/// The key → partition function of the source topics' producers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPartitioner {
    /// The Java client's default (and librdkafka's `murmur2_random`).
    #[default]
    Murmur2,
    /// librdkafka's default `consistent_random` (CRC-32).
    Crc32,
}

impl ClusterConfig {
    pub fn topic_prefix(&self, group_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("{group_id}-"))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn member_timeout(&self) -> Duration {
        Duration::from_millis(self.member_timeout_ms)
    }
}
