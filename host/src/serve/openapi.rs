//! The bodies the HTTP API answers with, as the OpenAPI document describes
//! them (`api_doc` assembles the document from these and the handlers'
//! `#[utoipa::path]` attributes).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::OnError;
use crate::ops::status::PartitionProgress;

// One type per body: the handlers answer with these, and the OpenAPI
// document describes them, so the two cannot drift apart.

/// `{"error": {"code": ..., "message": ...}}`, with every non-2xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unknown_aggregation`,
    /// `unknown_key`, `no_route`, `unauthorized`, `overloaded`, `refused`
    /// and `unavailable` (admin requests), ...
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `failed` once consumption stopped for good.
    pub status: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AggregationList {
    pub aggregations: Vec<AggregationInfo>,
    /// Cluster mode: this instance's address (`null` on a single instance).
    pub instance: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AggregationInfo {
    pub name: String,
    pub plugin: PluginInfo,
    /// The topic it reads (all configured topics when absent).
    pub topic: Option<String>,
    /// The JSON pointer it re-keys by (the Kafka key when absent).
    pub key: Option<String>,
    /// Windowed aggregations: the window spec as configured (`kind`,
    /// `size`, `advance`, `grace`, `retention` as duration texts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub window: Option<crate::config::WindowConfig>,
    /// Windowed aggregations: the JSON pointer of the event time (the
    /// Kafka timestamp when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Where its changes are emitted (`topic`, `mode`, `format`), if
    /// anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub emit: Option<crate::config::EmitConfig>,
    /// `fail`, `skip` or `dead-letter`.
    #[schema(value_type = String)]
    pub on_error: OnError,
    /// States stored on this instance, exactly: keys, or one per key and
    /// window for a windowed aggregation (counted in the same write as
    /// the states; in a cluster, its partitions' and its standby copies').
    pub keys: u64,
    /// Present while the stored state is being migrated to the plugin's
    /// new state format (queries answer in the new format meanwhile; the
    /// aggregation applies records again, catching up, once it is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
    pub records_applied: u64,
    pub records_failed: u64,
    pub records_dead_lettered: u64,
    /// Windowed aggregations: records that came after all their windows
    /// had closed (not applied).
    pub records_late: u64,
    /// Records not aggregated by rule: without a Kafka key (null key) in
    /// an aggregation keyed by it (not in `records_failed`).
    pub records_dropped: u64,
    pub partitions: Vec<PartitionProgress>,
}

/// How far an aggregation's state migration is.
#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationProgress {
    /// The state format being migrated from.
    pub from_format: u32,
    /// The plugin that wrote the old states ("stats 0.1.0").
    pub from_plugin: String,
    /// The plugin's state format, being migrated to.
    pub to_format: u32,
    pub keys_migrated: u64,
    /// RocksDB's estimate of the keys to migrate, when it started.
    pub keys_estimate: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub state_format: u32,
    pub sha256: String,
}

/// One key's state, as its aggregation's plugin renders it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyState {
    /// The key: UTF-8 text, or base64 with `encoding=base64`.
    pub key: String,
    /// Any JSON value (its shape is the plugin's).
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// One key's windows (a windowed aggregation's answer to a key lookup).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyWindows {
    /// The key: UTF-8 text, or base64 with `encoding=base64`.
    pub key: String,
    /// Its retained windows (in the range asked), in start order.
    pub windows: Vec<WindowState>,
}

/// One window of a key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WindowState {
    /// Window start, ms since the Unix epoch (inclusive); a session's
    /// first record's time.
    pub start: i64,
    /// Window end, ms since the Unix epoch (exclusive); a session's last
    /// record's time (inclusive).
    pub end: i64,
    /// Whether the window takes no more records: its partition's stream
    /// time has passed `end` + grace (sessions: `end` + gap + grace).
    pub closed: bool,
    /// The state, as the plugin renders it.
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// How keys are written in paths, query parameters and answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Utf8,
    Base64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyPage {
    pub items: Vec<KeyState>,
    /// Pass as `after` for the next page; absent on the last one.
    pub next: Option<String>,
    /// Cluster: the instances that did not answer in time; their keys are
    /// missing from this page (absent when every instance answered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_instances: Vec<String>,
}

/// What a reload changed (`POST /v1/admin/reload`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReloadReport {
    /// Aggregations started (each catches up on the records consumed so
    /// far, from `source.start_from`).
    pub added: Vec<String>,
    /// Aggregations no longer applied nor served; their stored state is
    /// kept until `wagg state drop`.
    pub removed: Vec<String>,
    /// Aggregations changed in place, from the next batch on.
    pub updated: Vec<AggregationUpdate>,
    /// Aggregations left as they were.
    pub unchanged: Vec<String>,
}

impl ReloadReport {
    /// Whether the reload changed anything.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty())
    }
}

/// One aggregation a reload changed in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AggregationUpdate {
    pub name: String,
    /// What changed, e.g. `plugin count 0.1.0 (sha256 1a2b3c4d…) → count
    /// 0.1.0 (sha256 5e6f7a8b…)`, `params`, `on_error`.
    pub changes: Vec<String>,
}

/// `POST /v1/admin/reset`'s body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The aggregation to rebuild.
    pub aggregation: String,
    /// `earliest`, `latest` or an RFC 3339 time (the broker's
    /// offsets-for-times says where that is).
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResetAnswer {
    pub aggregation: String,
    /// What happened, for a person.
    pub message: String,
}
