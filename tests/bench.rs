//! Smoke runs of the three `wagg bench` modes as BENCHMARKS.md runs them,
//! scaled down: each completes and reports sane, non-zero numbers. No
//! absolute timing is asserted (machines are noisy).

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn plugins_dir() -> &'static Path {
    common::plugin("count")
        .parent()
        .map(|p| Box::leak(p.to_owned().into_boxed_path()) as &Path)
        .expect("plugins dir")
}

fn bench(args: &[&str], out: &Path) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_wagg"))
        .arg("bench")
        .args(args)
        .arg("--plugins-dir")
        .arg(plugins_dir())
        .arg("--out")
        .arg(out)
        .output()
        .expect("run wagg bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wagg bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    let text = std::fs::read_to_string(out).expect("results file");
    serde_json::from_str(&text).expect("results are JSON")
}

fn number(row: &Value, field: &str) -> f64 {
    row[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {row}"))
}

#[test]
fn engine_mode_reports_every_plugin_and_key_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = bench(
        &[
            "engine",
            "--plugins",
            "count,stats,top-n",
            "--keys",
            "100,5000",
            "--records",
            "20000",
        ],
        &dir.path().join("engine.json"),
    );
    assert_eq!(rows.len(), 6);
    for row in &rows {
        assert_eq!(number(row, "records"), 20000.0, "{row}");
        assert!(number(row, "records_per_sec") > 0.0, "{row}");
        assert!(number(row, "mib_per_sec") > 0.0, "{row}");
        assert!(number(row, "peak_rss_mib") > 0.0, "{row}");
        assert!(number(row, "rocksdb_mib") > 0.0, "{row}");
    }
}

#[test]
fn e2e_and_query_modes_measure_the_ceiling_wagg_and_lookups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("e2e.json");
    let rows = bench(
        &[
            "query",
            "--records",
            "30000",
            "--keys",
            "1000",
            "--partitions",
            "4",
            "--rate",
            "200",
            "--max-rate-seconds",
            "1",
        ],
        &out,
    );
    let row = &rows[0];
    assert_eq!(number(row, "records"), 30000.0);
    for field in ["produce_rate", "raw_rate", "wagg_rate", "wagg_over_raw"] {
        assert!(number(row, field) > 0.0, "{field}: {row}");
    }
    let text = std::fs::read_to_string(out.with_extension("query.json")).expect("query results");
    let lookups: Vec<Value> = serde_json::from_str(&text).expect("JSON");
    assert_eq!(lookups.len(), 2);
    for phase in &lookups {
        assert!(number(phase, "requests") > 0.0, "{phase}");
        assert_eq!(number(phase, "errors"), 0.0, "{phase}");
        assert!(
            number(phase, "p99_ms") >= number(phase, "p50_ms"),
            "{phase}"
        );
    }
}
