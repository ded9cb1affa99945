//! `wagg diff`: the keys whose rendered states differ between two
//! aggregations of a running instance — for running a new plugin version
//! beside the old one on the same topic before cutting over.
//!
//! Both key listings come in byte order, a page at a time, so they are
//! compared as they stream (memory stays one page per side).

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt::Write as _;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::client::{Endpoint, api_error};

/// Keys per listing request.
const PAGE: usize = 500;

/// One key found different.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub key: Vec<u8>,
    /// `None`: the aggregation has no state for the key.
    pub a: Option<Value>,
    pub b: Option<Value>,
}

/// What a comparison found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DiffSummary {
    pub compared: u64,
    pub differing: u64,
    pub only_a: u64,
    pub only_b: u64,
    /// The first differences (up to the limit asked for).
    pub first: Vec<Difference>,
}

impl DiffSummary {
    pub fn report(&self, a: &str, b: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} keys compared: {} differ ({} with different states, {} only in {a}, {} only in {b})",
            self.compared,
            self.differing,
            self.differing - self.only_a - self.only_b,
            self.only_a,
            self.only_b
        );
        for difference in &self.first {
            let show = |state: &Option<Value>| {
                state
                    .as_ref()
                    .map_or_else(|| "(absent)".to_owned(), Value::to_string)
            };
            let _ = writeln!(out, "key {}", display_key(&difference.key));
            let _ = writeln!(out, "  {a}: {}", show(&difference.a));
            let _ = writeln!(out, "  {b}: {}", show(&difference.b));
        }
        out
    }
}

fn display_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("base64:{}", STANDARD.encode(key)),
    }
}

/// Compares every key of aggregations `a` and `b`, keeping the first
/// `limit` differences.
pub fn diff(endpoint: &Endpoint, a: &str, b: &str, limit: usize) -> anyhow::Result<DiffSummary> {
    let mut left = Listing::new(endpoint, a);
    let mut right = Listing::new(endpoint, b);
    let mut summary = DiffSummary::default();
    loop {
        let order = match (left.peek()?, right.peek()?) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        let (key, sa, sb) = match order {
            Ordering::Less => {
                let (key, state) = left.next_entry()?;
                (key, Some(state), None)
            }
            Ordering::Greater => {
                let (key, state) = right.next_entry()?;
                (key, None, Some(state))
            }
            Ordering::Equal => {
                let (key, sa) = left.next_entry()?;
                let (_, sb) = right.next_entry()?;
                (key, Some(sa), Some(sb))
            }
        };
        summary.compared += 1;
        if sa == sb {
            continue;
        }
        summary.differing += 1;
        summary.only_a += u64::from(sb.is_none());
        summary.only_b += u64::from(sa.is_none());
        if summary.first.len() < limit {
            summary.first.push(Difference { key, a: sa, b: sb });
        }
    }
    Ok(summary)
}

/// An aggregation's keys and states, fetched a page at a time.
struct Listing<'e> {
    endpoint: &'e Endpoint,
    path: String,
    buffered: VecDeque<(Vec<u8>, Value)>,
    /// `after` of the next page; `None` once the last page came.
    next: Option<String>,
    started: bool,
}

impl<'e> Listing<'e> {
    fn new(endpoint: &'e Endpoint, aggregation: &str) -> Self {
        Self {
            endpoint,
            path: format!(
                "/v1/aggregations/{}/keys",
                utf8_percent_encode(aggregation, NON_ALPHANUMERIC)
            ),
            buffered: VecDeque::new(),
            next: None,
            started: false,
        }
    }

    fn peek(&mut self) -> anyhow::Result<Option<&(Vec<u8>, Value)>> {
        while self.buffered.is_empty() && (!self.started || self.next.is_some()) {
            self.fetch()?;
        }
        Ok(self.buffered.front())
    }

    /// The entry `peek` showed (call after it answered `Some`).
    fn next_entry(&mut self) -> anyhow::Result<(Vec<u8>, Value)> {
        self.peek()?;
        self.buffered
            .pop_front()
            .context("listing ended unexpectedly")
    }

    fn fetch(&mut self) -> anyhow::Result<()> {
        let mut path = format!("{}?encoding=base64&limit={PAGE}", self.path);
        if let Some(after) = &self.next {
            let _ = write!(
                path,
                "&after={}",
                utf8_percent_encode(after, NON_ALPHANUMERIC)
            );
        }
        self.started = true;
        let (status, body) = self.endpoint.get(&path)?;
        if status != 200 {
            return Err(api_error(status, &body));
        }
        if let Some(missing) = body["missing_instances"].as_array()
            && !missing.is_empty()
        {
            anyhow::bail!(
                "instances {missing:?} did not answer: the comparison would be incomplete; retry"
            );
        }
        let items = body["items"]
            .as_array()
            .context("unexpected listing answer: no `items`")?;
        for item in items {
            let key = item["key"]
                .as_str()
                .and_then(|k| STANDARD.decode(k).ok())
                .context("unexpected listing answer: a key is not base64")?;
            self.buffered.push_back((key, item["state"].clone()));
        }
        self.next = body["next"].as_str().map(str::to_owned);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_counts_each_kind_of_difference_and_shows_binary_keys_as_base64() {
        let summary = DiffSummary {
            compared: 5,
            differing: 3,
            only_a: 1,
            only_b: 1,
            first: vec![Difference {
                key: vec![0xff, 0x00],
                a: Some(serde_json::json!({"count": 1})),
                b: None,
            }],
        };
        let report = summary.report("v1", "v2");
        assert!(
            report.contains(
                "5 keys compared: 3 differ (1 with different states, 1 only in v1, 1 only in v2)"
            ),
            "{report}"
        );
        assert!(report.contains("key base64:/wA="), "{report}");
        assert!(report.contains("v2: (absent)"), "{report}");
    }
}
