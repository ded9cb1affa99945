//! Validation of a parsed config: every rule a field must meet, with the
//! field named in the message; and parse errors rewritten so that they never
//! quote a line of the file (which could hold a secret).

use std::collections::{BTreeMap, BTreeSet};

use super::aggregation::EmitMode;
use super::{AggregationConfig, ClusterConfig, Config, OnError, kafka_value};

/// A bound that catches a typo; more workers than the source has
/// partitions only leave some idle.
const MAX_APPLY_THREADS: usize = 256;

impl Config {
    // One check per rule, in the order the file reads; each is two or three
    // lines with its own message, so splitting would only scatter them.
    pub(super) fn validate(&self) -> Result<(), String> {
        let source = &self.source;
        if source.brokers.trim().is_empty() {
            return Err("`source.brokers` is empty".into());
        }
        if source.topics.is_empty() {
            return Err("`source.topics` must name at least one topic".into());
        }
        if let Some(topic) = source.topics.iter().find(|t| t.is_empty()) {
            return Err(format!(
                "`source.topics` has an empty topic name: {topic:?}"
            ));
        }
        for reserved in [
            "bootstrap.servers",
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
        ] {
            if source.kafka.contains_key(reserved) {
                return Err(format!(
                    "`source.kafka.\"{reserved}\"` is managed by wagg (use `source.brokers` / `source.group_id`; offsets live in the state store)"
                ));
            }
        }
        check_kafka_values("source.kafka", &source.kafka)?;
        check_eager_rebalancing(&source.kafka)?;
        if let Some(dead_letter) = &self.dead_letter {
            if dead_letter.topic.is_empty() {
                return Err("`dead_letter.topic` is empty".into());
            }
            if source.topics.contains(&dead_letter.topic) {
                return Err(format!(
                    "`dead_letter.topic` {:?} is also in `source.topics`: rejected records would be consumed again",
                    dead_letter.topic
                ));
            }
            if dead_letter.kafka.contains_key("bootstrap.servers") {
                return Err(
                    "`dead_letter.kafka.\"bootstrap.servers\"` is managed by wagg (the dead-letter topic lives on `source.brokers`)"
                        .into(),
                );
            }
            check_kafka_values("dead_letter.kafka", &dead_letter.kafka)?;
        }
        if self.batch.max_records == 0 {
            return Err("`batch.max_records` must be at least 1".into());
        }
        if let Some(threads) = self.apply.threads
            && !(1..=MAX_APPLY_THREADS).contains(&threads)
        {
            return Err(format!(
                "`apply.threads` must be between 1 and {MAX_APPLY_THREADS} (leave it out for one per core)"
            ));
        }
        if self.apply.ingest_nice > 19 {
            return Err("`apply.ingest_nice` must be between 0 and 19".into());
        }
        if self.plugins.memory_limit_mib == 0
            || self.plugins.call_timeout_ms == 0
            || self.plugins.max_state_bytes == 0
        {
            return Err("`plugins` limits must be positive".into());
        }
        for (field, value) in [
            ("max_page", self.http.max_page),
            ("max_concurrent_requests", self.http.max_concurrent_requests),
            ("request_timeout_ms", self.http.request_timeout_ms as usize),
            ("max_uri_bytes", self.http.max_uri_bytes),
            ("watch_buffer", self.http.watch_buffer),
        ] {
            if value == 0 {
                return Err(format!("`http.{field}` must be at least 1"));
            }
        }
        if let Some(auth) = &self.http.auth
            && auth.token_env.is_some() == auth.token_file.is_some()
        {
            return Err(
                "`http.auth` needs exactly one of `token_env` (an environment variable) or `token_file`"
                    .into(),
            );
        }
        if self.aggregations.is_empty() {
            return Err("no `[[aggregation]]` configured".into());
        }
        if let Some(cluster) = &self.cluster {
            self.validate_cluster(cluster)?;
        }
        let mut names = BTreeSet::new();
        for (i, aggregation) in self.aggregations.iter().enumerate() {
            let at = format!("`aggregation[{i}]`");
            let name = &aggregation.name;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "{at}.name {name:?} must be 1-64 characters of letters, digits, `_` or `-`"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!("{at}.name {name:?} is used twice"));
            }
            if let Some(topic) = &aggregation.topic
                && !source.topics.contains(topic)
            {
                return Err(format!(
                    "{at}.topic {topic:?} (aggregation {name:?}) is not in `source.topics`"
                ));
            }
            if aggregation.on_error_setting == Some(OnError::DeadLetter)
                && self.dead_letter.is_none()
            {
                return Err(format!(
                    "{at}.on_error = \"dead-letter\" (aggregation {name:?}) needs a `[dead_letter]` section with the topic to send rejected records to"
                ));
            }
            if let Some(key) = &aggregation.key
                && !key.starts_with('/')
            {
                return Err(format!(
                    "{at}.key {key:?} (aggregation {name:?}) must be a JSON pointer such as \"/user_id\""
                ));
            }
            check_window(aggregation).map_err(|e| format!("{at} (aggregation {name:?}): {e}"))?;
            check_emit(aggregation, &source.topics)
                .map_err(|e| format!("{at} (aggregation {name:?}): {e}"))?;
        }
        Ok(())
    }

    fn validate_cluster(&self, cluster: &ClusterConfig) -> Result<(), String> {
        let url = reqwest::Url::parse(&cluster.advertised_http).map_err(|e| {
            format!(
                "`cluster.advertised_http` {:?} is not a URL ({e}); write it as http://host:port",
                cluster.advertised_http
            )
        })?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || url.path() != "/"
            || url.query().is_some()
        {
            return Err(format!(
                "`cluster.advertised_http` {:?} must be a base URL such as http://10.0.0.5:8080 (no path)",
                cluster.advertised_http
            ));
        }
        if cluster.secret_env.is_some() && cluster.secret_file.is_some() {
            return Err(
                "`cluster` takes one of `secret_env` (an environment variable) or `secret_file`, not both"
                    .into(),
            );
        }
        if self.http.auth.is_some() && cluster.secret_env.is_none() && cluster.secret_file.is_none()
        {
            return Err(
                "`[http.auth]` in a cluster needs `cluster.secret_env` or `cluster.secret_file`: instances forward requests to each other with the cluster's secret, never with the client's token"
                    .into(),
            );
        }
        if cluster.replication_factor == 0 || cluster.replication_factor < -1 {
            return Err(
                "`cluster.replication_factor` must be -1 (broker default) or at least 1".into(),
            );
        }
        if cluster.heartbeat_ms == 0 || cluster.member_timeout_ms <= cluster.heartbeat_ms {
            return Err(
                "`cluster.heartbeat_ms` must be positive and below `cluster.member_timeout_ms`"
                    .into(),
            );
        }
        if let Some(aggregation) = self.aggregations.iter().find(|a| a.key.is_some()) {
            return Err(format!(
                "aggregation {:?} re-keys records (`key`), which a cluster cannot split by partition yet: one key's records come from every partition. Key the records by that field when producing them, or run it on a single instance",
                aggregation.name
            ));
        }
        let needed = self.changelog_record_max_bytes();
        let configured = self
            .source
            .kafka
            .get("message.max.bytes")
            .and_then(kafka_value)
            .and_then(|v| v.parse::<usize>().ok());
        if let Some(configured) = configured.filter(|c| *c < needed) {
            return Err(format!(
                "`source.kafka.\"message.max.bytes\"` is {configured}, but a changelog record can be {needed} bytes (`plugins.max_state_bytes` = {} plus {CHANGELOG_KEY_ALLOWANCE} for its key and headers): a larger state would stop consumption. Raise it to at least {needed}, or lower `plugins.max_state_bytes`",
                self.plugins.max_state_bytes
            ));
        }
        Ok(())
    }

    /// The largest changelog record this config can produce: a state at
    /// `plugins.max_state_bytes` with its key and headers. The changelog
    /// producer and the changelog topics are configured to take it.
    pub fn changelog_record_max_bytes(&self) -> usize {
        self.plugins
            .max_state_bytes
            .saturating_add(CHANGELOG_KEY_ALLOWANCE)
    }
}

/// The `emit` setting of an aggregation.
fn check_emit(aggregation: &AggregationConfig, source_topics: &[String]) -> Result<(), String> {
    let Some(emit) = &aggregation.emit else {
        return Ok(());
    };
    if emit.topic.trim().is_empty() {
        return Err("`emit.topic` is empty".into());
    }
    if source_topics.contains(&emit.topic) {
        return Err(format!(
            "`emit.topic` {:?} is also in `source.topics`: the changes would be consumed again as records",
            emit.topic
        ));
    }
    match (emit.mode, &aggregation.window) {
        (EmitMode::Final, None) => Err(
            "`emit.mode = \"final\"` applies to windowed aggregations (one record per window when it closes): add a `window`, or use mode \"changes\"".into(),
        ),
        (EmitMode::Final, Some(_)) | (EmitMode::Changes, _) => Ok(()),
    }
}

/// The `window` and `time` settings of an aggregation.
fn check_window(aggregation: &AggregationConfig) -> Result<(), String> {
    let Some(window) = &aggregation.window else {
        return match &aggregation.time {
            Some(_) => Err(
                "`time` applies only to windowed aggregations: add a `window`, or remove `time`"
                    .into(),
            ),
            None => Ok(()),
        };
    };
    window.check()?;
    if aggregation.key.is_some() {
        return Err(
            "a windowed aggregation cannot re-key records (`key`) yet: a window's stream time is kept per source partition; key the records by that field when producing them".into(),
        );
    }
    if let Some(time) = &aggregation.time
        && !time.starts_with('/')
    {
        return Err(format!(
            "`time` {time:?} must be a JSON pointer such as \"/ts\" (or left out: the Kafka record timestamp)"
        ));
    }
    Ok(())
}

/// Room for a changelog record's key (the slot and the aggregation key)
/// and headers beside the state.
pub const CHANGELOG_KEY_ALLOWANCE: usize = 64 << 10;

/// Incremental (cooperative) rebalancing hands partitions over one by one,
/// without the revoke-everything step that wagg's flush hand-shake relies
/// on: refused until it is supported.
fn check_eager_rebalancing(kafka: &BTreeMap<String, toml::Value>) -> Result<(), String> {
    let value = |name: &str| kafka.get(name).and_then(kafka_value).unwrap_or_default();
    if value("partition.assignment.strategy").contains("cooperative") {
        return Err("`source.kafka.\"partition.assignment.strategy\"` asks for cooperative rebalancing, which wagg does not support yet; use `range` or `roundrobin` (the default)".into());
    }
    if value("group.protocol").eq_ignore_ascii_case("consumer") {
        return Err("`source.kafka.\"group.protocol\" = \"consumer\"` (KIP-848) rebalances incrementally, which wagg does not support yet; remove it (the default is `classic`)".into());
    }
    Ok(())
}

fn check_kafka_values(
    section: &str,
    properties: &BTreeMap<String, toml::Value>,
) -> Result<(), String> {
    match properties.iter().find(|(_, v)| kafka_value(v).is_none()) {
        Some((name, _)) => Err(format!(
            "`{section}.\"{name}\"` must be a string, number or boolean"
        )),
        None => Ok(()),
    }
}

/// toml's own rendering quotes the offending source line, which could echo
/// a secret from `[source.kafka]`; say where the error is and which key the
/// line sets instead.
pub(super) fn describe_toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_number = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim_start().starts_with('[') => {
            format!(
                "line {line_number}, column {column} (`{}`): {message}",
                key.trim()
            )
        }
        _ => format!("line {line_number}, column {column}: {message}"),
    }
}
