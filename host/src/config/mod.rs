//! The TOML configuration file: parsing, defaults and validation.
//!
//! Every error names the file and the field. Values under `[source.kafka]`
//! are passed to librdkafka untouched and never printed: they may hold
//! credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod aggregation;
mod cluster;
mod http;
mod window;

pub use aggregation::{AggregationConfig, EmitConfig, EmitFormat, EmitMode, OnError, PluginLimits};
pub use cluster::{ClusterConfig, Forwarding, KeyPartitioner};
pub use http::{AuthConfig, AuthScope, HttpConfig};
pub use window::{Span, Window, WindowConfig};

/// A configuration problem, with the file and field it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub apply: ApplyConfig,
    #[serde(default)]
    pub plugins: PluginLimits,
    /// Where records that a plugin rejects go, for aggregations whose
    /// `on_error` is `dead-letter` (the default when this is set).
    pub dead_letter: Option<DeadLetterConfig>,
    /// The producer of the aggregations' `emit`ted changes.
    #[serde(default)]
    pub emit: EmitSection,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Several instances sharing the source topics (changelogs, query
    /// routing); absent: a single instance.
    pub cluster: Option<ClusterConfig>,
    #[serde(rename = "aggregation", default)]
    pub aggregations: Vec<AggregationConfig>,
    /// Directory of the config file; plugin paths are relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was loaded from (what a reload reads again).
    #[serde(skip)]
    pub path: Option<PathBuf>,
    /// How often progress is logged without a terminal (`wagg run
    /// --progress-interval-secs`; not a file setting).
    #[serde(skip)]
    pub progress_interval: Option<std::time::Duration>,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    pub topics: Vec<String>,
    /// Where to start in a partition wagg has no stored offset for.
    #[serde(default)]
    pub start_from: StartFrom,
    /// librdkafka client properties, passed through as they are.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `kafka` may hold SASL passwords and the like: show only its keys.
        f.debug_struct("SourceConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("start_from", &self.start_from)
            .field("kafka", &self.kafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn default_group_id() -> String {
    "wagg".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The RocksDB directory (relative to the config file).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// States kept in memory in front of RocksDB.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// RocksDB block cache, MiB.
    #[serde(default = "default_block_cache_mib")]
    pub block_cache_mib: usize,
    /// fsync the write-ahead log on every batch: survives power loss, not
    /// only process crashes, at a cost in throughput.
    #[serde(default)]
    pub sync_writes: bool,
}

fn default_state_dir() -> PathBuf {
    "wagg-state".into()
}
fn default_cache_entries() -> usize {
    200_000
}
fn default_block_cache_mib() -> usize {
    64
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
            cache_entries: default_cache_entries(),
            block_cache_mib: default_block_cache_mib(),
            sync_writes: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Records per batch at most.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// How long a batch may wait to fill up, milliseconds.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// How often applied batches are written to the state store (states,
    /// counters and offsets together), milliseconds. Queries see the state
    /// as of the last write; a crash re-applies at most this much.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Write earlier when this many changed states are waiting (bounds the
    /// memory they take).
    #[serde(default = "default_max_unwritten_states")]
    pub max_unwritten_states: usize,
}

fn default_commit_interval_ms() -> u64 {
    1000
}
fn default_max_unwritten_states() -> usize {
    200_000
}

fn default_max_records() -> usize {
    1000
}
fn default_max_delay_ms() -> u64 {
    100
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_delay_ms: default_max_delay_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            max_unwritten_states: default_max_unwritten_states(),
        }
    }
}

/// How batches are applied.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Workers applying a batch in parallel, each to the partitions it
    /// owns with its own plugin instances and cache shard (absent: one per
    /// core).
    pub threads: Option<usize>,
    /// How much lower (in nice steps, 0-19) the threads that ingest run
    /// than the ones that answer queries (see `ops::scheduling`).
    #[serde(default = "default_ingest_nice")]
    pub ingest_nice: u8,
}

fn default_ingest_nice() -> u8 {
    10
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            threads: None,
            ingest_nice: default_ingest_nice(),
        }
    }
}

impl ApplyConfig {
    /// The number of apply workers: as configured, else one per core.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

impl BatchConfig {
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay_ms)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long the batch in flight may take to be
    /// written before the process exits anyway (with status 1; the state is
    /// consistent up to the last written batch either way).
    #[serde(default = "default_shutdown_deadline_ms")]
    pub deadline_ms: u64,
}

fn default_shutdown_deadline_ms() -> u64 {
    10_000
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            deadline_ms: default_shutdown_deadline_ms(),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic rejected records are produced to. It must exist.
    pub topic: String,
    /// librdkafka producer properties for the dead-letter producer, on top
    /// of the `security.*`, `sasl.*` and `ssl.*` ones of `[source.kafka]`.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
}

/// `[emit]`: settings of the producer every aggregation's `emit` goes
/// through.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmitSection {
    /// librdkafka producer properties, on top of the `security.*`,
    /// `sasl.*` and `ssl.*` ones of `[source.kafka]`.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
}

impl fmt::Debug for EmitSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmitSection")
            .field("kafka", &self.kafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Debug for DeadLetterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterConfig")
            .field("topic", &self.topic)
            .field("kafka", &self.kafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        let mut config = Self::parse(&text, &file, &base_dir)?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_owned(),
            message,
        };
        let mut config: Config =
            toml::from_str(text).map_err(|e| error(describe_toml_error(&e, text)))?;
        config.base_dir = base_dir.to_owned();
        config.validate().map_err(error)?;
        let default_on_error = match config.dead_letter {
            Some(_) => OnError::DeadLetter,
            None => OnError::Fail,
        };
        for aggregation in &mut config.aggregations {
            aggregation.on_error = aggregation.on_error_setting.unwrap_or(default_on_error);
        }
        Ok(config)
    }

    /// Where a setting of an aggregation is, for messages, in the shape
    /// of the validation errors: ``wagg.toml: `aggregation[0]`.params
    /// (aggregation "spend")``.
    pub fn locate(&self, aggregation: &str, field: &str) -> String {
        let file = self
            .path
            .as_deref()
            .map_or_else(|| "the config".to_owned(), |p| p.display().to_string());
        match self.aggregations.iter().position(|a| a.name == aggregation) {
            Some(index) => {
                format!("{file}: `aggregation[{index}]`.{field} (aggregation {aggregation:?})")
            }
            None => format!("{file}: aggregation {aggregation:?}, {field}"),
        }
    }

    pub fn plugin_path(&self, aggregation: &AggregationConfig) -> PathBuf {
        self.base_dir.join(&aggregation.plugin)
    }

    /// The bearer token `[http.auth]` points to, if auth is configured.
    pub fn http_token(&self) -> Result<Option<String>, String> {
        let Some(auth) = &self.http.auth else {
            return Ok(None);
        };
        self.read_secret(
            ("http.auth.token_env", auth.token_env.as_deref()),
            ("http.auth.token_file", auth.token_file.as_deref()),
            16,
            "`http.auth`: the token must be at least 16 characters (use a random one)",
        )
    }

    /// The cluster's shared secret, if `[cluster]` names one.
    pub fn cluster_secret(&self) -> Result<Option<String>, String> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        self.read_secret(
            ("cluster.secret_env", cluster.secret_env.as_deref()),
            ("cluster.secret_file", cluster.secret_file.as_deref()),
            32,
            "`cluster`: the secret must be at least 32 characters (use a random one, the same on every instance)",
        )
    }

    /// A secret from the environment variable or the file (relative to the
    /// config) the two `(field, value)` pairs name, trimmed, of at least
    /// `min_len` characters (else `too_short`, which never quotes it).
    fn read_secret(
        &self,
        (env_field, env): (&str, Option<&str>),
        (file_field, file): (&str, Option<&Path>),
        min_len: usize,
        too_short: &str,
    ) -> Result<Option<String>, String> {
        let secret = match (env, file) {
            (Some(name), _) => std::env::var(name).map_err(|_| {
                format!("`{env_field}`: environment variable {name} is not set (or not UTF-8)")
            })?,
            (None, Some(file)) => {
                let path = self.base_dir.join(file);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("`{file_field}`: cannot read {}: {e}", path.display()))?
            }
            (None, None) => return Ok(None),
        };
        let secret = secret.trim();
        if secret.len() < min_len {
            return Err(too_short.into());
        }
        Ok(Some(secret.to_owned()))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.base_dir.join(&self.state.dir)
    }

    /// Where compiled plugins are cached.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.state_dir().join("compiled-plugins")
    }

    /// Properties of the dead-letter producer: the security settings of
    /// `[source.kafka]` (the same cluster, the same credentials), then
    /// `[dead_letter.kafka]`.
    pub fn dead_letter_properties(&self) -> Vec<(&str, String)> {
        let inherited = self.connection_properties();
        let own = self.dead_letter.iter().flat_map(|d| {
            d.kafka
                .iter()
                .filter_map(|(k, v)| kafka_value(v).map(|v| (k.as_str(), v)))
        });
        inherited.chain(own).collect()
    }

    /// Properties of the producer of emitted changes: the security
    /// settings of `[source.kafka]`, then `[emit.kafka]`.
    pub fn emit_properties(&self) -> Vec<(&str, String)> {
        let own = self
            .emit
            .kafka
            .iter()
            .filter_map(|(k, v)| kafka_value(v).map(|v| (k.as_str(), v)));
        self.connection_properties().chain(own).collect()
    }

    /// The topics aggregations emit to, each once.
    pub fn emit_topics(&self) -> Vec<&str> {
        let mut topics: Vec<&str> = self
            .aggregations
            .iter()
            .filter_map(|a| a.emit.as_ref().map(|e| e.topic.as_str()))
            .collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }

    /// The `[source.kafka]` properties every client of the source brokers
    /// needs (security, SASL, TLS, client id), for wagg's other clients.
    pub fn connection_properties(&self) -> impl Iterator<Item = (&str, String)> {
        self.kafka_properties().filter(|(name, _)| {
            ["security.", "sasl.", "ssl.", "client.id"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
    }

    /// The consumer group's session timeout (librdkafka's default unless
    /// `[source.kafka]` sets one).
    pub fn session_timeout(&self) -> Duration {
        self.source.session_timeout()
    }

    /// `[source.kafka]` as librdkafka properties.
    pub fn kafka_properties(&self) -> impl Iterator<Item = (&str, String)> {
        self.source
            .kafka
            .iter()
            .filter_map(|(k, v)| kafka_value(v).map(|v| (k.as_str(), v)))
    }
}

impl SourceConfig {
    /// The consumer group's session timeout (librdkafka's default unless
    /// `[source.kafka]` sets one).
    pub fn session_timeout(&self) -> Duration {
        self.kafka
            .get("session.timeout.ms")
            .and_then(kafka_value)
            .and_then(|value| value.parse().ok())
            .map_or(Duration::from_secs(45), Duration::from_millis)
    }
}

/// A `[*.kafka]` value as librdkafka takes it (strings, numbers, booleans).
fn kafka_value(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
mod validate;

use validate::describe_toml_error;
