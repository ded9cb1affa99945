//! The offline runner behind `wagg plugin test`: feeds JSON-lines records
//! through the real plugin runtime, batch by batch, and returns every key's
//! rendered state. No broker, no RocksDB: states live in a map.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::apply::group::group_by_key;
use crate::config::OnError;
use crate::plugin::CallError;
use crate::plugin::LoadedPlugin;
use crate::plugin::PluginInstance;
use crate::plugin::{Change, GroupInput};
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

/// States by key, in memory.
pub type StateMap = HashMap<Vec<u8>, Vec<u8>, foldhash::fast::RandomState>;

/// Applies one batch of `records`, grouped by Kafka key (null keys under the
/// empty key), to `states`; returns the rejected records with the plugin's
/// message. With [`OnError::Fail`] nothing of the batch is applied when a
/// record is rejected.
pub fn apply_chunk<'r>(
    instance: &mut PluginInstance,
    states: &mut StateMap,
    records: &'r [SourceRecord],
    on_error: OnError,
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
    let outcome = instance.apply_batch(&inputs, on_error)?;
    let failures: Vec<_> = outcome
        .failures
        .into_iter()
        .map(|(group, failure)| (groups[group].1[failure.index], failure.message))
        .collect();
    if !failures.is_empty() && !on_error.applies_the_rest() {
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
    for batch in records.chunks(batch_size.max(1)) {
        let failures = apply_chunk(instance, &mut states, batch, on_error)?;
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
    render_states(instance, states)
}

/// Every state rendered, keys in byte order.
fn render_states(
    instance: &mut PluginInstance,
    states: StateMap,
) -> anyhow::Result<BTreeMap<Vec<u8>, serde_json::Value>> {
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

/// The batch sizes every golden case runs at: batching must never change a
/// result.
pub const GOLDEN_BATCH_SIZES: [usize; 3] = [1, 3, 1000];

/// One golden case at one batch size.
#[derive(Debug)]
pub struct GoldenResult {
    pub case: PathBuf,
    pub batch_size: usize,
    /// The input was split in two halves, each aggregated on its own, and
    /// every key's two states merged (plugins that merge).
    pub merged: bool,
    /// `None` when the output matched `expected.json`.
    pub mismatch: Option<(serde_json::Value, serde_json::Value)>,
}

/// Runs every `dir/<case>/` (`input.jsonl`, `params.json`, `expected.json`)
/// through `plugin` at each of [`GOLDEN_BATCH_SIZES`].
pub fn run_golden(plugin: &LoadedPlugin, dir: &Path) -> anyhow::Result<Vec<GoldenResult>> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading golden cases in {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        // Every directory is a case: one missing a file is an error, not skipped.
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    if cases.is_empty() {
        bail!(
            "{} has no golden cases (directories with input.jsonl, params.json, expected.json)",
            dir.display()
        );
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let mut results = Vec::new();
    for case in cases {
        let params: serde_json::Value = serde_json::from_str(&read(&case.join("params.json"))?)
            .with_context(|| format!("{}/params.json", case.display()))?;
        let expected: serde_json::Value = serde_json::from_str(&read(&case.join("expected.json"))?)
            .with_context(|| format!("{}/expected.json", case.display()))?;
        let input = read(&case.join("input.jsonl"))?;
        let records = read_jsonl(input.as_bytes())
            .with_context(|| format!("{}/input.jsonl", case.display()))?;
        for batch_size in GOLDEN_BATCH_SIZES {
            let mut instance = plugin.instantiate(&params.to_string())?;
            let states = run(
                &mut instance,
                &records,
                batch_size,
                OnError::Fail,
                |_, _| {},
            )
            .with_context(|| format!("{} at batch size {batch_size}", case.display()))?;
            let got = to_json_object(states);
            let mismatch = (!json_approx_eq(&got, &expected)).then(|| (got, expected.clone()));
            results.push(GoldenResult {
                case: case.clone(),
                batch_size,
                merged: false,
                mismatch,
            });
        }
        if plugin.metadata().merges {
            let mut instance = plugin.instantiate(&params.to_string())?;
            let states = run_merged(&mut instance, &records)
                .with_context(|| format!("{} merging halves", case.display()))?;
            let got = to_json_object(states);
            let mismatch = (!json_approx_eq(&got, &expected)).then(|| (got, expected.clone()));
            results.push(GoldenResult {
                case: case.clone(),
                batch_size: GOLDEN_BATCH_SIZES[2],
                merged: true,
                mismatch,
            });
        }
    }
    Ok(results)
}

/// Aggregates the first and the second half of `records` apart and merges
/// each key's two states (`a` then `b`), the way session windows combine:
/// the result must be what aggregating them all gives. A key the second
/// half deleted stays deleted (a deletion is not a state to merge).
pub fn run_merged(
    instance: &mut PluginInstance,
    records: &[SourceRecord],
) -> anyhow::Result<BTreeMap<Vec<u8>, serde_json::Value>> {
    let (first, second) = records.split_at(records.len() / 2);
    let mut halves = [StateMap::default(), StateMap::default()];
    for (half, states) in [first, second].into_iter().zip(&mut halves) {
        for batch in half.chunks(GOLDEN_BATCH_SIZES[2]) {
            if let Some((record, message)) =
                apply_chunk(instance, states, batch, OnError::Fail)?.first()
            {
                bail!(
                    "line {}: plugin rejected the record: {message}",
                    record.offset
                );
            }
        }
    }
    let [a, mut b] = halves;
    let deleted_by_b: Vec<&[u8]> = second
        .iter()
        .map(|r| r.key.as_deref().unwrap_or_default())
        .filter(|key| !b.contains_key(*key))
        .collect();
    let mut merged = StateMap::default();
    for (key, state_a) in a {
        if deleted_by_b.contains(&key.as_slice()) {
            continue;
        }
        let state = match b.remove(&key) {
            Some(state_b) => instance
                .merge(&state_a, &state_b)
                .with_context(|| format!("merging key {:?}", String::from_utf8_lossy(&key)))?,
            None => state_a,
        };
        merged.insert(key, state);
    }
    merged.extend(b);
    render_states(instance, merged)
}

/// JSON equality with numbers compared to a relative 1e-9 (floating-point
/// aggregates may differ in the last bits with the batch size).
pub fn json_approx_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_approx_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_approx_eq(v, w)))
        }
        _ => a == b,
    }
}
