//! `wagg query`, `wagg lag`, `wagg reload` and `wagg reset --url`: a small
//! blocking client of a running instance's HTTP API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::Value;

use crate::ops::status::PartitionProgress;
use crate::serve::openapi::ReloadReport;

/// Where a running instance answers, and how to authenticate.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub token: Option<String>,
}

impl Endpoint {
    pub(crate) fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::GET, path, None, Duration::from_secs(10))
    }

    /// POSTs `body` (JSON) to an admin endpoint, which may take a while (a
    /// reload compiles new plugins).
    fn post(&self, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, body, Duration::from_secs(300))
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()?;
        let mut request = client.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .with_context(|| format!("{method} {url} (is wagg running there? see --url)"))?;
        let status = response.status().as_u16();
        let body = response
            .json()
            .with_context(|| format!("{method} {url}: the answer is not JSON"))?;
        Ok((status, body))
    }
}

/// Has the instance re-read its config file; what changed, for a person.
pub fn reload(endpoint: &Endpoint) -> anyhow::Result<String> {
    let report: ReloadReport = match endpoint.post("/v1/admin/reload", None)? {
        (200, body) => serde_json::from_value(body).context("unexpected reload answer")?,
        (status, body) => return Err(api_error(status, &body)),
    };
    if !report.changed() {
        return Ok("reloaded: nothing changed\n".into());
    }
    let mut out = String::from("reloaded:\n");
    for name in &report.added {
        let _ = writeln!(out, "  added     {name} (catching up)");
    }
    for update in &report.updated {
        let _ = writeln!(
            out,
            "  updated   {}: {}",
            update.name,
            update.changes.join("; ")
        );
    }
    for name in &report.removed {
        let _ = writeln!(
            out,
            "  removed   {name} (state kept until `wagg state drop`)"
        );
    }
    for name in &report.unchanged {
        let _ = writeln!(out, "  unchanged {name}");
    }
    Ok(out)
}

/// Has the instance reset an aggregation while it runs.
pub fn reset(endpoint: &Endpoint, aggregation: &str, to: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({ "aggregation": aggregation, "to": to });
    match endpoint.post("/v1/admin/reset", Some(&body))? {
        (200, body) => Ok(body["message"].as_str().unwrap_or_default().to_owned()),
        (status, body) => Err(api_error(status, &body)),
    }
}

pub(crate) fn api_error(status: u16, body: &Value) -> anyhow::Error {
    match body["error"]["message"].as_str() {
        Some(message) => anyhow::anyhow!("{message} (HTTP {status})"),
        None => anyhow::anyhow!("HTTP {status}: {body}"),
    }
}

/// A key's state as the aggregation's plugin renders it.
pub fn query(endpoint: &Endpoint, aggregation: &str, key: &str) -> anyhow::Result<Value> {
    let path = format!(
        "/v1/aggregations/{}/keys/{}",
        utf8_percent_encode(aggregation, NON_ALPHANUMERIC),
        utf8_percent_encode(key, NON_ALPHANUMERIC)
    );
    match endpoint.get(&path)? {
        (200, body) => Ok(body["state"].clone()),
        (status, body) => Err(api_error(status, &body)),
    }
}

#[derive(Debug, Deserialize)]
struct Aggregations {
    aggregations: Vec<AggregationSummary>,
}

#[derive(Debug, Deserialize)]
struct AggregationSummary {
    name: String,
    records_applied: u64,
    partitions: Vec<PartitionProgress>,
    /// Present while its stored state migrates to a new state format.
    #[serde(default)]
    migration: Option<MigrationSummary>,
}

#[derive(Debug, Deserialize)]
struct MigrationSummary {
    from_format: u32,
    to_format: u32,
    keys_migrated: u64,
    keys_estimate: u64,
}

/// Per-partition progress and per-aggregation totals, as a table.
pub fn lag(endpoint: &Endpoint) -> anyhow::Result<String> {
    let (status, body) = endpoint.get("/v1/aggregations")?;
    if status != 200 {
        return Err(api_error(status, &body));
    }
    let summary: Aggregations =
        serde_json::from_value(body).context("unexpected /v1/aggregations answer")?;
    Ok(lag_table(&summary.aggregations))
}

fn lag_table(aggregations: &[AggregationSummary]) -> String {
    // Partitions are shared by the aggregations reading the same topic
    // (those catching up on one show their own offsets: below).
    let mut partitions: BTreeMap<(String, i32), &PartitionProgress> = BTreeMap::new();
    for aggregation in aggregations {
        for progress in aggregation.partitions.iter().filter(|p| !p.catching_up) {
            partitions.insert((progress.topic.clone(), progress.partition), progress);
        }
    }
    let show = |value: Option<i64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    // A cluster member also says who owns each partition.
    let clustered = partitions.values().any(|p| p.owner.is_some());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<24} {:>9} {:>12} {:>14} {:>10} {:>8}",
        "TOPIC", "PARTITION", "NEXT OFFSET", "HIGH WATERMARK", "LAG", "ASSIGNED"
    );
    let _ = writeln!(out, "{}", if clustered { "  OWNER" } else { "" });
    for progress in partitions.values() {
        let _ = write!(
            out,
            "{:<24} {:>9} {:>12} {:>14} {:>10} {:>8}",
            progress.topic,
            progress.partition,
            show(progress.next_offset),
            show(progress.high_watermark),
            show(progress.lag),
            if progress.assigned { "yes" } else { "no" }
        );
        if clustered {
            let _ = write!(out, "  {}", progress.owner.as_deref().unwrap_or("-"));
        }
        let _ = writeln!(out);
    }
    let total: i64 = partitions.values().filter_map(|p| p.lag).sum();
    let _ = writeln!(out, "total lag: {total}");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>16}  CATCHING UP",
        "AGGREGATION", "RECORDS APPLIED"
    );
    for aggregation in aggregations {
        let behind: Vec<&PartitionProgress> = aggregation
            .partitions
            .iter()
            .filter(|p| p.catching_up)
            .collect();
        let catching_up = if let Some(m) = &aggregation.migration {
            format!(
                "migrating state format {} → {}: {} of ~{} keys, then catching up",
                m.from_format, m.to_format, m.keys_migrated, m.keys_estimate
            )
        } else if behind.is_empty() {
            "-".to_owned()
        } else {
            let lag: i64 = behind.iter().filter_map(|p| p.lag).sum();
            format!("{} partition(s), {lag} records behind", behind.len())
        };
        let _ = writeln!(
            out,
            "{:<24} {:>16}  {catching_up}",
            aggregation.name, aggregation.records_applied
        );
    }
    out
}

/// Checks the URL is http(s) before any request.
pub fn parse_url(url: &str) -> anyhow::Result<String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("--url must start with http:// or https://, got {url:?}");
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_table_lists_each_partition_once_and_totals_the_lag() {
        let progress = |partition, next, high| PartitionProgress {
            owner: None,
            standby_offset: None,
            topic: "orders".into(),
            partition,
            next_offset: Some(next),
            high_watermark: Some(high),
            lag: Some(high - next),
            assigned: true,
            catching_up: false,
            stream_time: None,
        };
        let summaries = vec![
            AggregationSummary {
                name: "count".into(),
                records_applied: 30,
                partitions: vec![progress(0, 10, 15), progress(1, 20, 20)],
                migration: None,
            },
            AggregationSummary {
                name: "stats".into(),
                records_applied: 30,
                partitions: vec![progress(0, 10, 15), progress(1, 20, 20)],
                migration: Some(MigrationSummary {
                    from_format: 1,
                    to_format: 2,
                    keys_migrated: 3000,
                    keys_estimate: 5000,
                }),
            },
            AggregationSummary {
                name: "added".into(),
                records_applied: 4,
                partitions: vec![
                    PartitionProgress {
                        catching_up: true,
                        ..progress(0, 2, 15)
                    },
                    progress(1, 20, 20),
                ],
                migration: None,
            },
        ];
        let table = lag_table(&summaries);
        assert_eq!(table.matches("orders").count(), 2, "{table}");
        assert!(table.contains("total lag: 5"), "{table}");
        assert!(
            table.contains("1 partition(s), 13 records behind"),
            "{table}"
        );
        assert!(
            table.contains("migrating state format 1 → 2: 3000 of ~5000 keys"),
            "{table}"
        );
        assert!(
            table.contains("count") && table.contains("stats"),
            "{table}"
        );
    }
}
