//! Records/s of the `count` and `stats` plugins through the real runtime
//! (grouping, encoding, the wasm call, decoding, state write-back) at batch
//! sizes 1, 100 and 1000, next to the same aggregations in native Rust.
//!
//! 10,000 distinct keys, 100-byte JSON values. Run with
//! `cargo bench --bench plugin_runtime`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wagg::config::OnError;
use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::record::SourceRecord;
use wagg::tools::author::offline::{self, StateMap};

const KEYS: usize = 10_000;
const RECORDS: usize = 20_000;

fn plugins() -> std::collections::BTreeMap<String, PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let exe = std::env::current_exe().expect("bench binary");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<bench>");
    wagg::tools::author::build::build_example_plugins(root, &target.join("wasm-plugins"), false)
        .expect("build plugins")
}

/// Deterministic records: keys spread over `KEYS`, values padded to 100 bytes.
fn records() -> Vec<SourceRecord> {
    let topic: Arc<str> = "bench".into();
    (0..RECORDS)
        .map(|i| {
            let key = format!("user-{:05}", (i * 7919) % KEYS);
            let mut value = format!(
                r#"{{"user":"{key}","amount":{}.{:02},"item":"sku-{}","pad":""#,
                i % 500,
                i % 100,
                i % 97
            );
            while value.len() < 98 {
                value.push('x');
            }
            value.push_str("\"}");
            SourceRecord {
                topic: topic.clone(),
                partition: (i % 4) as i32,
                offset: i as i64,
                key: Some(key.into_bytes()),
                value: Some(value.into_bytes()),
                ..SourceRecord::default()
            }
        })
        .collect()
}

#[derive(Default)]
struct NativeStats {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    m2: f64,
}

fn native_count(states: &mut HashMap<Vec<u8>, u64>, records: &[SourceRecord]) {
    for record in records {
        let key = record.key.as_deref().unwrap_or_default();
        match states.get_mut(key) {
            Some(count) => *count += 1,
            None => {
                states.insert(key.to_vec(), 1);
            }
        }
    }
}

fn native_stats(states: &mut HashMap<Vec<u8>, NativeStats>, records: &[SourceRecord]) {
    for record in records {
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().unwrap_or_default()).expect("json");
        let x = value
            .pointer("/amount")
            .and_then(|v| v.as_f64())
            .expect("amount");
        let key = record.key.as_deref().unwrap_or_default();
        if !states.contains_key(key) {
            states.insert(key.to_vec(), NativeStats::default());
        }
        let s = states.get_mut(key).expect("inserted");
        if s.count == 0 {
            (s.min, s.max) = (x, x);
        } else {
            (s.min, s.max) = (s.min.min(x), s.max.max(x));
        }
        s.count += 1;
        let delta = x - s.mean;
        s.mean += delta / s.count as f64;
        s.m2 += delta * (x - s.mean);
    }
}

fn bench(c: &mut Criterion) {
    let plugins = plugins();
    let runtime = PluginRuntime::new(RuntimeConfig::default()).expect("runtime");
    let records = records();
    let mut group = c.benchmark_group("plugin_runtime");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);

    for (name, params) in [("count", "{}"), ("stats", r#"{"field":"/amount"}"#)] {
        let loaded = runtime
            .load(&plugins[&format!("wagg-plugin-{name}")])
            .expect("load");
        for batch in [1usize, 100, 1000] {
            let mut instance = loaded.instantiate(params).expect("instantiate");
            let mut states = StateMap::default();
            group.bench_function(BenchmarkId::new(format!("{name}/wasm"), batch), |b| {
                b.iter(|| {
                    for chunk in records.chunks(batch) {
                        offline::apply_chunk(&mut instance, &mut states, chunk, OnError::Fail)
                            .expect("apply");
                    }
                })
            });
        }
    }
    for batch in [1usize, 100, 1000] {
        let mut states = HashMap::new();
        group.bench_function(BenchmarkId::new("count/native", batch), |b| {
            b.iter(|| {
                records
                    .chunks(batch)
                    .for_each(|chunk| native_count(&mut states, chunk))
            })
        });
        let mut states = HashMap::new();
        group.bench_function(BenchmarkId::new("stats/native", batch), |b| {
            b.iter(|| {
                records
                    .chunks(batch)
                    .for_each(|chunk| native_stats(&mut states, chunk))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
