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
    compare(Listing::new(endpoint, a), Listing::new(endpoint, b), limit)
}

type Entry = (Vec<u8>, Value);

/// Compares two listings in key order (a key may come more than once:
/// once per partition that has it; the n-th of each side are compared).
fn compare(
    a: impl Iterator<Item = anyhow::Result<Entry>>,
    b: impl Iterator<Item = anyhow::Result<Entry>>,
    limit: usize,
) -> anyhow::Result<DiffSummary> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut summary = DiffSummary::default();
    loop {
        let order = match (peek_key(&mut a)?, peek_key(&mut b)?) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(ka), Some(kb)) => ka.cmp(&kb),
        };
        let (key, sa, sb) = match order {
            Ordering::Less => {
                let (key, state) = take_next(&mut a)?;
                (key, Some(state), None)
            }
            Ordering::Greater => {
                let (key, state) = take_next(&mut b)?;
                (key, None, Some(state))
            }
            Ordering::Equal => {
                let (key, sa) = take_next(&mut a)?;
                let (_, sb) = take_next(&mut b)?;
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

/// The entry `peek_key` showed.
fn take_next(
    side: &mut std::iter::Peekable<impl Iterator<Item = anyhow::Result<Entry>>>,
) -> anyhow::Result<Entry> {
    side.next().context("listing ended unexpectedly")?
}

/// The next key of a listing; a failed fetch is the error.
fn peek_key(
    side: &mut std::iter::Peekable<impl Iterator<Item = anyhow::Result<Entry>>>,
) -> anyhow::Result<Option<Vec<u8>>> {
    match side.peek() {
        None => Ok(None),
        Some(Ok((key, _))) => Ok(Some(key.clone())),
        Some(Err(_)) => match side.next() {
            Some(Err(e)) => Err(e),
            _ => Ok(None),
        },
    }
}

/// An aggregation's keys and states, fetched a page at a time.
struct Listing<'e> {
    endpoint: &'e Endpoint,
    path: String,
    buffered: VecDeque<Entry>,
    /// `after` of the next page; `None` once the last page came.
    next: Option<String>,
    started: bool,
}

impl Iterator for Listing<'_> {
    type Item = anyhow::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.buffered.is_empty() && (!self.started || self.next.is_some()) {
            if let Err(e) = self.fetch() {
                self.next = None;
                return Some(Err(e));
            }
        }
        self.buffered.pop_front().map(Ok)
    }
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

    fn listing(entries: &[(&str, i64)]) -> impl Iterator<Item = anyhow::Result<Entry>> {
        entries
            .iter()
            .map(|(key, n)| Ok((key.as_bytes().to_vec(), serde_json::json!({ "n": n }))))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn listings_are_merged_by_key_with_repeated_keys_compared_in_turn() {
        // "k" comes twice (two partitions); "a" and "b" only left, "z"
        // only right.
        let left = listing(&[("a", 1), ("b", 1), ("k", 1), ("k", 2), ("m", 5)]);
        let right = listing(&[("k", 1), ("k", 3), ("m", 5), ("z", 9)]);
        let summary = compare(left, right, 10).expect("compares");
        assert_eq!(summary.compared, 6);
        assert_eq!(
            (summary.differing, summary.only_a, summary.only_b),
            (4, 2, 1)
        );
        let keys: Vec<&[u8]> = summary.first.iter().map(|d| d.key.as_slice()).collect();
        assert_eq!(keys, [b"a".as_slice(), b"b", b"k", b"z"]);
        let limited = compare(listing(&[("a", 1), ("b", 1)]), listing(&[]), 1).expect("compares");
        assert_eq!((limited.differing, limited.first.len()), (2, 1));
    }

    #[test]
    fn a_failed_page_fails_the_comparison() {
        let failing = vec![Err(anyhow::anyhow!("HTTP 502"))].into_iter();
        let error = compare(listing(&[("a", 1)]), failing, 10).expect_err("must fail");
        assert!(error.to_string().contains("502"), "{error}");
    }

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
