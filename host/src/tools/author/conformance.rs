//! The ABI conformance runner behind `wagg plugin test --conformance`: runs
//! the vectors in `abi/conformance/vectors.jsonl` (generated from the
//! reference encoder, see `abi/tests/conformance.rs`) against a component
//! built from the conformance probe (`plugins/testing/conformance`, in any
//! language) through the real plugin runtime, and lists every difference.
//!
//! States are compared by what they render, not by their bytes: each SDK
//! encodes states its own way. The bytes a step returns are carried into
//! the later steps that ask for them, as the host would.

use std::collections::HashMap;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;
use wagg_abi::{BatchEncoder, Headers, Record, ResultDecoder, StateChange};

use crate::plugin::{LoadedPlugin, PluginInstance};

/// The vectors, one case per line.
pub const VECTORS: &str = include_str!("../../../../abi/conformance/vectors.jsonl");

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    about: String,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
struct Step {
    /// The encoded batch, for steps that carry no state from an earlier one.
    batch_hex: Option<String>,
    groups: Vec<GroupSpec>,
    expect: Vec<Expect>,
}

#[derive(Debug, Deserialize)]
struct GroupSpec {
    key: String,
    state: Value,
    records: Vec<RecordSpec>,
}

#[derive(Debug, Deserialize)]
struct RecordSpec {
    key: Option<String>,
    value: Option<String>,
    timestamp: Option<i64>,
    partition: i32,
    offset: i64,
    headers: Vec<(String, Option<String>)>,
}

#[derive(Debug, Deserialize)]
struct Expect {
    change: String,
    render: Option<Value>,
    failure: Option<ExpectFailure>,
}

#[derive(Debug, Deserialize)]
struct ExpectFailure {
    index: u32,
    message: Option<String>,
    message_prefix: Option<String>,
}

/// One case's outcome: empty `problems` means it passed.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub about: String,
    pub problems: Vec<String>,
}

/// Runs every vector against `plugin` (built from the conformance probe).
pub fn run_conformance(plugin: &LoadedPlugin) -> anyhow::Result<Vec<CaseResult>> {
    let mut results = Vec::new();
    for (number, line) in VECTORS.lines().enumerate() {
        let case: Case = serde_json::from_str(line)
            .with_context(|| format!("conformance vector {} is malformed", number + 1))?;
        let mut instance = plugin.instantiate("{}")?;
        let problems = run_case(&mut instance, &case)?;
        results.push(CaseResult {
            name: case.name,
            about: case.about,
            problems,
        });
    }
    Ok(results)
}

fn run_case(instance: &mut PluginInstance, case: &Case) -> anyhow::Result<Vec<String>> {
    let mut carried: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut problems = Vec::new();
    for (index, step) in case.steps.iter().enumerate() {
        let at = |what: String| format!("step {}: {what}", index + 1);
        let batch = encode(&step.groups, &carried)?;
        if let Some(hex) = &step.batch_hex
            && *hex != hex::encode(&batch)
        {
            bail!(
                "step {} of `{}`: the host's encoder no longer writes the vector's batch; regenerate the vectors",
                index + 1,
                case.name
            );
        }
        let output = match instance.apply_raw(&batch) {
            Ok(output) => output,
            Err(e) => {
                problems.push(at(format!("apply failed: {e}")));
                return Ok(problems);
            }
        };
        let found = check_step(instance, step, &output, &mut carried);
        problems.extend(found.into_iter().map(at));
    }
    Ok(problems)
}

/// The step's batch, with carried states filled in.
fn encode(groups: &[GroupSpec], carried: &HashMap<Vec<u8>, Vec<u8>>) -> anyhow::Result<Vec<u8>> {
    let mut encoder = BatchEncoder::new();
    for group in groups {
        let key = from_hex(&group.key)?;
        let state = match &group.state {
            Value::String(s) if s == "absent" => None,
            Value::String(s) if s == "carried" => Some(
                carried
                    .get(&key)
                    .cloned()
                    .context("a vector carries a state the plugin never returned")?,
            ),
            other => Some(from_hex(
                other["hex"]
                    .as_str()
                    .context("a group's state is malformed")?,
            )?),
        };
        encoder.begin_group(&key, state.as_deref());
        for record in &group.records {
            let key = record.key.as_deref().map(from_hex).transpose()?;
            let value = record.value.as_deref().map(from_hex).transpose()?;
            let headers = record
                .headers
                .iter()
                .map(|(name, value)| {
                    Ok((name.as_str(), value.as_deref().map(from_hex).transpose()?))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            encoder.push_record_with_headers(
                &Record {
                    key: key.as_deref(),
                    value: value.as_deref(),
                    timestamp: record.timestamp,
                    partition: record.partition,
                    offset: record.offset,
                    headers: Headers::EMPTY,
                },
                headers
                    .iter()
                    .map(|(name, value)| (*name, value.as_deref())),
            );
        }
    }
    Ok(encoder.finish().to_vec())
}

/// Every difference between `output` and the step's expectations.
fn check_step(
    instance: &mut PluginInstance,
    step: &Step,
    output: &[u8],
    carried: &mut HashMap<Vec<u8>, Vec<u8>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut decoder = match ResultDecoder::new(output) {
        Ok(decoder) => decoder,
        Err(e) => return vec![format!("the result could not be decoded: {e}")],
    };
    if decoder.group_count() as usize != step.expect.len() {
        problems.push(format!(
            "{} group results for {} groups",
            decoder.group_count(),
            step.expect.len()
        ));
        return problems;
    }
    for (group, expect) in step.groups.iter().zip(&step.expect) {
        let group_label = format!("group {:?}", group.key);
        let result = match decoder.next_group() {
            Some(Ok(result)) => result,
            Some(Err(e)) => {
                problems.push(format!(
                    "{group_label}: the result could not be decoded: {e}"
                ));
                return problems;
            }
            None => break,
        };
        let key = from_hex(&group.key).unwrap_or_default();
        let (change, state) = match result.change {
            StateChange::Unchanged => ("unchanged", None),
            StateChange::Set(state) => ("set", Some(state)),
            StateChange::Delete => ("delete", None),
        };
        if change != expect.change {
            problems.push(format!(
                "{group_label}: change is {change}, expected {}",
                expect.change
            ));
        }
        if let (Some(state), Some(want)) = (state, &expect.render) {
            match render(instance, state) {
                Ok(got) if got == *want => {}
                Ok(got) => problems.push(format!("{group_label}: renders {got}, expected {want}")),
                Err(e) => problems.push(format!("{group_label}: {e:#}")),
            }
        }
        match state {
            Some(state) => {
                carried.insert(key, state.to_vec());
            }
            None if change == "delete" => {
                carried.remove(&key);
            }
            None => {}
        }
        let got = result
            .failure
            .map(|f| (f.index, String::from_utf8_lossy(f.message).into_owned()));
        if let Some(problem) = failure_problem(got, expect.failure.as_ref()) {
            problems.push(format!("{group_label}: {problem}"));
        }
    }
    problems
}

fn render(instance: &mut PluginInstance, state: &[u8]) -> anyhow::Result<Value> {
    let json = instance.render(state).context("render failed")?;
    serde_json::from_str(&json).with_context(|| format!("render returned invalid JSON: {json}"))
}

fn failure_problem(got: Option<(u32, String)>, want: Option<&ExpectFailure>) -> Option<String> {
    match (got, want) {
        (None, None) => None,
        (Some((index, message)), None) => Some(format!(
            "record {index} failed ({message}), expected no failure"
        )),
        (None, Some(want)) => Some(format!(
            "no failure, expected record {} to fail",
            want.index
        )),
        (Some((index, message)), Some(want)) => {
            let message_ok = match (&want.message, &want.message_prefix) {
                (Some(exact), _) => message == *exact,
                (None, Some(prefix)) => message.starts_with(prefix.as_str()),
                (None, None) => true,
            };
            (index != want.index || !message_ok).then(|| {
                format!(
                    "record {index} failed with {message:?}, expected record {} with {:?}",
                    want.index,
                    want.message.as_ref().or(want.message_prefix.as_ref())
                )
            })
        }
    }
}

fn from_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(text).context("invalid hex in a conformance vector")
}
