//! `wagg bench`: the measuring instruments behind `BENCHMARKS.md`.
//!
//! - `engine`: generated records through the real batch applier (batcher →
//!   plugin runtime → RocksDB), no broker;
//! - `e2e`: a raw consumer's rate (the ceiling) against wagg's, on the same
//!   pre-produced topic;
//! - `query`: key-lookup latency at a fixed request rate while wagg ingests,
//!   and the lookup rate with ingestion stopped.
//!
//! Every mode prints a table and writes its rows as JSON.

pub mod e2e;
pub mod engine;
pub mod query;

use std::path::Path;

use serde::Serialize;

pub use crate::tools::rng::Rng;

/// The benchmark key for index `i`.
pub fn key(i: u64) -> String {
    format!("key-{i:010}")
}

/// [`key`] as bytes, without the formatting machinery (the engine benchmark
/// makes one per record and should measure the engine, not `format!`).
pub fn key_bytes(i: u64) -> Vec<u8> {
    let mut key = b"key-0000000000".to_vec();
    let mut rest = i;
    for digit in key[4..].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    if rest > 0 {
        return self::key(i).into_bytes();
    }
    key
}

/// A 100-byte JSON value with an `amount` and an `item`, as the plugins'
/// benchmark configurations read them.
pub fn value(rng: &mut Rng) -> String {
    let r = rng.next_u64();
    let mut value = format!(
        r#"{{"amount":{}.{:02},"item":"item-{:03}","pad":""#,
        r % 1000,
        (r >> 10) % 100,
        (r >> 20) % 500
    );
    while value.len() < 98 {
        value.push('x');
    }
    value.push_str("\"}");
    value
}

/// The aggregation config of a benchmarked example plugin.
pub fn aggregation_toml(name: &str, plugin: &Path) -> String {
    let params = match name {
        "stats" | "sum" => r#"params = { field = "/amount" }"#,
        "top-n" => r#"params = { n = 5, field = "/amount", item = "/item" }"#,
        "distinct" => r#"params = { field = "/item" }"#,
        _ => "",
    };
    format!("[[aggregation]]\nname = \"{name}\"\nplugin = {plugin:?}\n{params}\n")
}

/// The params [`aggregation_toml`] gives plugin `name`, as JSON.
pub fn params_json(name: &str) -> anyhow::Result<String> {
    let config: toml::Table = aggregation_toml(name, Path::new("unused.wasm")).parse()?;
    let params = config
        .get("aggregation")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.get("params"))
        .cloned()
        .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
    Ok(serde_json::to_string(&params)?)
}

/// Resident set size now and at its peak, from `/proc/self/status`.
pub fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes of all files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => dir_size(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Prints `rows` as an aligned table and, with `out`, writes them as JSON.
pub fn report<T: Serialize>(title: &str, rows: &[T], out: Option<&Path>) -> anyhow::Result<()> {
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    // Columns in field order: `Value` maps sort their keys, the serialized
    // text keeps the struct's order.
    let first = rows
        .first()
        .map(serde_json::to_string)
        .transpose()?
        .unwrap_or_default();
    let mut columns: Vec<String> = values
        .first()
        .and_then(|row| row.as_object())
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    columns.sort_by_key(|c| first.find(&format!("\"{c}\":")).unwrap_or(usize::MAX));
    let cell = |row: &serde_json::Value, column: &str| match &row[column] {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.2}"),
            _ => n.to_string(),
        },
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            values
                .iter()
                .map(|r| cell(r, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        println!("  {}", padded.join("  "));
    };
    line(columns.clone());
    for row in &values {
        line(columns.iter().map(|c| cell(row, c)).collect());
    }
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(&values)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
        println!("  (written to {})", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_100_bytes_of_json_with_the_benchmarked_fields() {
        let mut rng = Rng(7);
        for _ in 0..1000 {
            let v = value(&mut rng);
            assert_eq!(v.len(), 100, "{v}");
            let json: serde_json::Value = serde_json::from_str(&v).expect("json");
            assert!(json["amount"].is_f64() || json["amount"].is_u64(), "{v}");
            assert!(json["item"].is_string());
        }
    }

    #[test]
    fn key_bytes_match_the_formatted_key() {
        for i in [0, 7, 42, 99_999, 9_999_999_999, 10_000_000_000, u64::MAX] {
            assert_eq!(key_bytes(i), key(i).into_bytes(), "{i}");
        }
    }
}
