//! `[[aggregation]]`: a plugin, its parameters and failure policy, and
//! `[plugin]`: the sandbox limits every plugin runs under.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What to do when a plugin rejects (or traps on) a record: the one
/// failure policy of `[[aggregation]].on_error`, the plugin runtime and
/// `wagg plugin test --on-error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Stop consuming; nothing of the failing batch is written.
    #[default]
    Fail,
    /// Log and count the record, and apply the rest.
    Skip,
    /// Send the record to the dead-letter topic, and apply the rest.
    /// (Not offered by `wagg plugin test`, which has no topic.)
    #[value(skip)]
    DeadLetter,
}

impl OnError {
    /// Whether the records after a rejected one are applied (as if it had
    /// not been there); with `Fail` they are left unapplied and the caller
    /// stops.
    pub fn applies_the_rest(self) -> bool {
        self != Self::Fail
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationConfig {
    /// Used in URLs and as the state store's column family.
    pub name: String,
    /// The plugin component, relative to the config file.
    pub plugin: PathBuf,
    /// The topic to aggregate; all configured topics when absent.
    pub topic: Option<String>,
    /// Re-key records by this JSON pointer into the value; default: the
    /// record's Kafka key.
    pub key: Option<String>,
    /// As written in the file; `on_error` is what applies.
    #[serde(rename = "on_error", default)]
    pub(super) on_error_setting: Option<OnError>,
    /// `on_error` if set, else `dead-letter` when `[dead_letter]` is
    /// configured, else `fail`. Resolved when the file is parsed.
    #[serde(skip)]
    pub on_error: OnError,
    /// Passed to the plugin's `configure` as JSON.
    #[serde(default)]
    pub params: toml::Table,
    /// Aggregate per time window of each key instead of over all time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<super::window::WindowConfig>,
    /// Where a windowed aggregation reads a record's event time: a JSON
    /// pointer into the value (epoch ms or RFC 3339); default: the Kafka
    /// record timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Produce the aggregation's changes to a Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitConfig>,
}

/// `emit = { topic = ..., mode = ..., format = ... }`: an aggregation's
/// changes, produced to a topic before each flush is written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmitConfig {
    /// The topic the changes go to. It must exist and must not be a source
    /// topic.
    pub topic: String,
    #[serde(default)]
    pub mode: EmitMode,
    #[serde(default)]
    pub format: EmitFormat,
}

/// Which changes are emitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmitMode {
    /// After each flush, one record per key whose state changed in it.
    #[default]
    Changes,
    /// Windowed aggregations: one record per window, when it closes.
    Final,
}

/// What an emitted record's value holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EmitFormat {
    /// The state as the plugin renders it (JSON).
    #[default]
    Json,
    /// The plugin's state bytes.
    State,
}

impl AggregationConfig {
    pub fn params_json(&self) -> String {
        serde_json::to_string(&self.params).unwrap_or_else(|_| "{}".into())
    }

    pub fn applies_to(&self, topic: &str) -> bool {
        self.topic.as_deref().is_none_or(|t| t == topic)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    #[serde(default = "default_memory_mib")]
    pub memory_limit_mib: usize,
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    #[serde(default = "default_max_state_bytes")]
    pub max_state_bytes: usize,
}

fn default_memory_mib() -> usize {
    64
}
fn default_call_timeout_ms() -> u64 {
    1000
}
fn default_max_state_bytes() -> usize {
    1 << 20
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_limit_mib: default_memory_mib(),
            call_timeout_ms: default_call_timeout_ms(),
            max_state_bytes: default_max_state_bytes(),
        }
    }
}
