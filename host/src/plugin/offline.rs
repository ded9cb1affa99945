//! The offline runner behind `wagg plugin test`: feeds JSON-lines records
//! through the real plugin runtime, batch by batch, and returns every key's
//! rendered state. No broker, no RocksDB: states live in a map.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::batch::{AfterFailure, Change, GroupInput};
use super::error::CallError;
use super::instance::PluginInstance;
use crate::batcher::group_by_key;
use crate::record::SourceRecord;

/// One input line: `{"key": "...", "value": ...}` plus optional fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    #[serde(default)]
    key: Option<String>,
    /// A JSON string is taken as the raw value text; any other JSON value is
    /// passed as its JSON text; `null` (or no value) is a tombstone.
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    headers: BTreeMap<String, Option<String>>,
}

/// Reads JSON-lines records. Each record's offset is its 1-based line
/// number, so plugin errors point at the line. Blank lines are skipped.
pub fn read_jsonl(input: impl BufRead) -> anyhow::Result<Vec<SourceRecord>> {
    let topic: Arc<str> = Arc::from("input");
    let mut records = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("line {number}: cannot read input"))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: InputLine = serde_json::from_str(&line)
            .with_context(|| format!("line {number}: not a valid record"))?;
        let value = match parsed.value {
            serde_json::Value::Null => None,
            serde_json::Value::String(text) => Some(text.into_bytes()),
            other => Some(other.to_string().into_bytes()),
        };
        records.push(SourceRecord {
            topic: topic.clone(),
            partition: parsed.partition.unwrap_or(0),
            offset: number as i64,
            key: parsed.key.map(String::into_bytes),
            value,
            timestamp: parsed.timestamp,
            headers: parsed
                .headers
                .into_iter()
                .map(|(name, value)| (name, value.map(String::into_bytes)))
                .collect(),
        });
    }
    Ok(records)
}

/// How the runner treats records the plugin rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop with an error naming the line.
    Fail,
    /// Report the line on stderr and go on without it.
    Skip,
}

/// States by key, in memory.
pub type StateMap = HashMap<Vec<u8>, Vec<u8>, foldhash::fast::RandomState>;

/// Applies one batch of `records`, grouped by Kafka key (null keys under the
/// empty key), to `states`; returns the rejected records with the plugin's
/// message. With [`AfterFailure::Stop`] nothing of the batch is applied when
/// a record is rejected.
pub fn apply_chunk<'r>(
    instance: &mut PluginInstance,
    states: &mut StateMap,
    records: &'r [SourceRecord],
    after_failure: AfterFailure,
) -> Result<Vec<(&'r SourceRecord, String)>, CallError> {
    let groups = group_by_key(
        records
            .iter()
            .map(|r| (r.key.as_deref().unwrap_or_default(), r)),
    );
    let inputs: Vec<GroupInput<'_>> = groups
        .iter()
        .map(|(key, records)| GroupInput {
            key,
            state: states.get(*key).map(Vec::as_slice),
            records,
        })
        .collect();
    let outcome = instance.apply_batch(&inputs, after_failure)?;
    let failures: Vec<_> = outcome
        .failures
        .into_iter()
        .map(|(group, failure)| (groups[group].1[failure.index], failure.message))
        .collect();
    if !failures.is_empty() && after_failure == AfterFailure::Stop {
        return Ok(failures);
    }
    for ((key, _), change) in groups.iter().zip(outcome.changes) {
        match change {
            Change::Unchanged => {}
            Change::Set(state) => match states.get_mut(*key) {
                Some(slot) => *slot = state,
                None => {
                    states.insert(key.to_vec(), state);
                }
            },
            Change::Delete => {
                states.remove(*key);
            }
        }
    }
    Ok(failures)
}

/// Runs `records` through `instance` in batches of `batch_size` and returns
/// each key's rendered state, keys in byte order.
pub fn run(
    instance: &mut PluginInstance,
    records: &[SourceRecord],
    batch_size: usize,
    on_error: OnError,
    mut report: impl FnMut(&SourceRecord, &str),
) -> anyhow::Result<BTreeMap<Vec<u8>, serde_json::Value>> {
    let mut states = StateMap::default();
    let after_failure = match on_error {
        OnError::Fail => AfterFailure::Stop,
        OnError::Skip => AfterFailure::Continue,
    };
    for batch in records.chunks(batch_size.max(1)) {
        let failures = apply_chunk(instance, &mut states, batch, after_failure)?;
        if let (OnError::Fail, Some((record, message))) = (on_error, failures.first()) {
            bail!(
                "line {}: plugin rejected the record: {message}",
                record.offset
            );
        }
        for (record, message) in failures {
            report(record, &message);
        }
    }
    let mut rendered = BTreeMap::new();
    for (key, state) in states {
        let json = instance
            .render(&state)
            .with_context(|| format!("rendering key {:?}", String::from_utf8_lossy(&key)))?;
        let value: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("plugin rendered invalid JSON: {json}"))?;
        rendered.insert(key, value);
    }
    Ok(rendered)
}

/// The rendered states as one JSON object keyed by the (lossy UTF-8) key.
pub fn to_json_object(states: BTreeMap<Vec<u8>, serde_json::Value>) -> serde_json::Value {
    serde_json::Value::Object(
        states
            .into_iter()
            .map(|(key, value)| (String::from_utf8_lossy(&key).into_owned(), value))
            .collect(),
    )
}
