//! The example plugins' golden tests and the runtime's isolation guarantees,
//! all through the real host runtime and real wasm components.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::sdk_plugins::{self, LANGUAGES, cached_runtime, cached_runtime_config, sdk_plugin};
use common::{json_approx_eq, plugin, workspace_root};
use wagg::config::OnError;
use wagg::plugin::{CallError, PluginError, PluginRuntime, RuntimeConfig};
use wagg::record::SourceRecord;
use wagg::tools::author::conformance;
use wagg::tools::author::offline::{self, StateMap};

fn runtime() -> PluginRuntime {
    PluginRuntime::new(RuntimeConfig::default()).expect("runtime")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The conformance probe, built with each guest SDK, answers every ABI
/// conformance vector exactly (`wagg plugin test --conformance`).
#[test]
fn every_guest_sdk_passes_the_abi_conformance_vectors() {
    let runtime = cached_runtime();
    let mut probes = vec![("rust", plugin("conformance"))];
    for language in LANGUAGES {
        let path = sdk_plugin(language, "testing/conformance");
        probes.push((sdk_plugins::language_dir(language), path));
    }
    let vectors = conformance::VECTORS.lines().count();
    for (language, path) in probes {
        let loaded = runtime.load(&path).expect("load");
        let results =
            conformance::run_conformance(&loaded).unwrap_or_else(|e| panic!("{language}: {e:#}"));
        assert_eq!(results.len(), vectors, "{language}");
        for result in results {
            assert!(
                result.problems.is_empty(),
                "{language} probe, case {}: {:#?}",
                result.name,
                result.problems
            );
        }
    }
}

/// The Python and JavaScript SDKs pass the same vectors natively (CPython,
/// Node.js, no wasm): the quick check an SDK change can run on its own.
#[test]
fn the_python_and_javascript_sdks_pass_the_vectors_natively() {
    let root = workspace_root();
    let ok = format!(
        "{} conformance cases ok",
        conformance::VECTORS.lines().count()
    );
    for (program, script) in [
        ("python3", "guest-sdk-python/tests/check_vectors.py"),
        ("node", "guest-sdk-javascript/tests/check-vectors.mjs"),
    ] {
        let output = Command::new(program)
            .arg(root.join(script))
            .arg(&root)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains(&ok),
            "{script}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `count`, `stats` and `top-n` written in Python and in JavaScript pass
/// the Rust plugins' golden cases (the same files) at batch sizes 1, 3 and
/// 1000, and with the input's halves merged.
#[test]
fn python_and_javascript_examples_pass_the_shared_golden_cases() {
    let runtime = cached_runtime();
    for language in LANGUAGES {
        for name in ["count", "stats", "top-n"] {
            let loaded = runtime.load(&sdk_plugin(language, name)).expect("load");
            assert_eq!(loaded.metadata().name, name);
            assert!(loaded.metadata().merges, "{language:?} {name} merges");
            let golden = workspace_root().join("plugins").join(name).join("golden");
            let results = offline::run_golden(&loaded, &golden)
                .unwrap_or_else(|e| panic!("{language:?} {name}: {e:#}"));
            let sizes: Vec<usize> = results
                .iter()
                .filter(|r| !r.merged)
                .map(|r| r.batch_size)
                .collect();
            for size in offline::GOLDEN_BATCH_SIZES {
                assert!(
                    sizes.contains(&size),
                    "{language:?} {name}: no run at batch size {size}"
                );
            }
            for result in &results {
                assert!(
                    result.mismatch.is_none(),
                    "{language:?} {name}: {} at batch size {} (merged: {}): {:?}",
                    result.case.display(),
                    result.batch_size,
                    result.merged,
                    result.mismatch
                );
            }
        }
    }
}

/// A Python or JavaScript plugin that loops, allocates without bound or
/// raises is contained like a Rust one: the bad record is named, every
/// other record is applied exactly once and the plugin keeps working.
#[test]
fn python_and_javascript_plugins_are_contained() {
    for language in LANGUAGES {
        let path = sdk_plugin(language, "testing/hostile");
        let config = RuntimeConfig {
            call_timeout: Duration::from_millis(500),
            ..cached_runtime_config()
        };
        assert_isolated_in(&path, "loop", config.clone(), |m| {
            m.contains("exceeded its time budget of 500ms")
        });
        assert_isolated_in(&path, "alloc", config.clone(), |m| {
            // The refused growth becomes an exception the SDK reports as a
            // rejected record (CPython's MemoryError, SpiderMonkey's "out of
            // memory"), or a trap.
            m.contains("exceeded its memory limit of 64 MiB")
                || m == "MemoryError"
                || m == "out of memory"
        });
        assert_isolated_in(&path, "raise", config, |m| {
            m.ends_with("Error: hostile plugin raised on offset 5")
        });
    }
}

/// Every `plugins/<name>/golden/<case>/` holds `input.jsonl`, `params.json`
/// and `expected.json`. Each case runs at batch sizes 1, 3 and 1000: batching
/// must never change a result.
#[test]
fn golden_outputs_match_through_the_runtime() {
    let runtime = runtime();
    let mut cases = 0;
    for name in ["count", "sum", "stats", "latest", "top-n", "distinct"] {
        let loaded = runtime.load(&plugin(name)).expect("load");
        assert_eq!(loaded.metadata().name, name);
        assert_eq!(loaded.metadata().version, env!("CARGO_PKG_VERSION"));
        assert_eq!(loaded.metadata().state_format, 1);
        let golden = workspace_root().join("plugins").join(name).join("golden");
        let results = offline::run_golden(&loaded, &golden)
            .unwrap_or_else(|e| panic!("{}: {e:#}", golden.display()));
        assert!(!results.is_empty(), "{name} has no golden cases");
        assert!(loaded.metadata().merges, "{name} merges");
        for result in &results {
            if let Some((got, want)) = &result.mismatch {
                panic!(
                    "{} at batch size {} (halves merged: {}):\n got {got}\nwant {want}",
                    result.case.display(),
                    result.batch_size,
                    result.merged
                );
            }
        }
        let merged = results.iter().filter(|r| r.merged).count();
        assert_eq!(
            merged * offline::GOLDEN_BATCH_SIZES.len(),
            results.len() - merged
        );
        cases += merged;
    }
    assert!(cases >= 8, "only {cases} golden cases ran");
}

/// `wagg plugin test --conformance`: every case `ok` for the probe; a
/// plugin that is not the probe (count) fails with the differences named.
#[test]
fn cli_plugin_test_runs_the_conformance_vectors() {
    let run = |plugin: &Path| {
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(["plugin", "test"])
            .arg(plugin)
            .arg("--conformance")
            .output()
            .expect("run wagg")
    };
    let output = run(&plugin("conformance"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        conformance::VECTORS.lines().count(),
        "{stdout}"
    );
    let output = run(&plugin("count"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        stdout.contains("FAIL  every-field") && stdout.contains("renders {\"count\":1}"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("conformance cases fail"));
}

#[test]
fn cli_plugin_test_prints_the_golden_states() {
    for (name, case) in [("count", "basic"), ("stats", "basic"), ("top-n", "by-item")] {
        let dir = workspace_root()
            .join("plugins")
            .join(name)
            .join("golden")
            .join(case);
        let params = std::fs::read_to_string(dir.join("params.json")).expect("params");
        let output = Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(["plugin", "test"])
            .arg(plugin(name))
            .arg("--input")
            .arg(dir.join("input.jsonl"))
            .args(["--params", params.trim()])
            .output()
            .expect("run wagg");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let got: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("stdout is JSON");
        assert!(
            json_approx_eq(&got, &read_json(&dir.join("expected.json"))),
            "{name}: {got}"
        );
    }
}

#[test]
fn cli_plugin_test_names_the_bad_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"key\": \"a\", \"value\": {\"amount\": 1}}\n{\"key\": \"a\", \"value\": {\"price\": 2}}\n").expect("write");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(["plugin", "test"])
            .arg(plugin("sum"))
            .arg("--input")
            .arg(&input)
            .args(["--params", r#"{"field": "/amount"}"#])
            .args(extra)
            .output()
            .expect("run wagg")
    };
    let failed = run(&[]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("line 2: plugin rejected the record: field `/amount` is missing"),
        "{stderr}"
    );

    let skipped = run(&["--on-error", "skip"]);
    assert!(skipped.status.success());
    assert!(
        String::from_utf8_lossy(&skipped.stderr)
            .contains("line 2: skipped: field `/amount` is missing")
    );
    let got: serde_json::Value = serde_json::from_slice(&skipped.stdout).expect("JSON");
    assert_eq!(got, serde_json::json!({"a": {"sum": 1.0}}));

    std::fs::write(
        &input,
        "{\"key\": \"a\", \"value\": 1}\n{\"key\": \"a\", \"value\": oops}\n",
    )
    .expect("write");
    let malformed = run(&[]);
    assert!(!malformed.status.success());
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("line 2: not a valid record"));
}

#[test]
fn bad_params_are_rejected_with_the_parameter_named() {
    let runtime = runtime();
    let cases = [
        (
            "top-n",
            r#"{"n": 0, "field": "/s"}"#,
            "`n` must be between 1 and 1000, got 0",
        ),
        (
            "stats",
            r#"{"field": "amount"}"#,
            "`field` must be a JSON pointer",
        ),
        ("stats", r#"{}"#, "missing field `field`"),
        (
            "distinct",
            r#"{"precision": 30}"#,
            "`precision` must be between 4 and 16, got 30",
        ),
        (
            "count",
            r#"{"unexpected": 1}"#,
            "unknown field `unexpected`",
        ),
    ];
    for (name, params, expected) in cases {
        let loaded = runtime.load(&plugin(name)).expect("load");
        match loaded.instantiate(params) {
            Err(PluginError::Params { message, .. }) => {
                assert!(message.contains(expected), "{name} {params}: {message}")
            }
            Err(other) => panic!("{name} {params}: wrong error {other}"),
            Ok(_) => panic!("{name} accepted {params}"),
        }
    }
}

#[test]
fn stats_and_sum_reject_missing_and_non_numeric_fields() {
    let runtime = runtime();
    for name in ["sum", "stats"] {
        let mut instance = runtime
            .load(&plugin(name))
            .and_then(|p| p.instantiate(r#"{"field": "/amount"}"#))
            .expect("instance");
        let records = records(&[
            ("k", r#"{"amount": 1}"#),
            ("k", r#"{"amount": "7"}"#),
            ("k", r#"{}"#),
            ("k", "null"),
        ]);
        let mut states = StateMap::default();
        let failures = offline::apply_chunk(&mut instance, &mut states, &records, OnError::Skip)
            .expect("call");
        let failures: Vec<(i64, String)> =
            failures.into_iter().map(|(r, m)| (r.offset, m)).collect();
        assert_eq!(
            failures,
            vec![
                (1, "field `/amount` is not a number: a string".to_owned()),
                (2, "field `/amount` is missing".to_owned()),
                (3, "record has no value (tombstone)".to_owned()),
            ],
            "{name}"
        );
        let rendered = instance.render(&states[b"k".as_slice()]).expect("render");
        let rendered: serde_json::Value = serde_json::from_str(&rendered).expect("json");
        assert_eq!(
            rendered[if name == "sum" { "sum" } else { "mean" }],
            1.0,
            "{name}: {rendered}"
        );
    }
}

/// HyperLogLog at precision 14 has a relative standard error of 0.81 %;
/// allow three standard errors on 1,000,000 distinct values.
#[test]
fn distinct_estimates_a_million_values_within_its_error_bound() {
    let runtime = runtime();
    let mut instance = runtime
        .load(&plugin("distinct"))
        .and_then(|p| p.instantiate(r#"{"field": "/user", "precision": 14}"#))
        .expect("instance");
    let mut states = StateMap::default();
    let topic: std::sync::Arc<str> = "t".into();
    let total = 1_000_000;
    for chunk_start in (0..total).step_by(10_000) {
        let chunk: Vec<SourceRecord> = (chunk_start..chunk_start + 10_000)
            .map(|i| SourceRecord {
                topic: topic.clone(),
                offset: i as i64,
                key: Some(b"all".to_vec()),
                value: Some(format!(r#"{{"user":"user-{i}"}}"#).into_bytes()),
                ..SourceRecord::default()
            })
            .collect();
        let failures =
            offline::apply_chunk(&mut instance, &mut states, &chunk, OnError::Fail).expect("call");
        assert!(failures.is_empty());
    }
    let rendered: serde_json::Value =
        serde_json::from_str(&instance.render(&states[b"all".as_slice()]).expect("render"))
            .expect("json");
    let estimate = rendered["estimate"].as_f64().expect("estimate");
    let error = (estimate - total as f64).abs() / total as f64;
    let bound = 3.0 * 1.04 / ((1u64 << 14) as f64).sqrt();
    assert!(
        error < bound,
        "estimate {estimate} is off by {:.3} % (bound {:.3} %)",
        error * 100.0,
        bound * 100.0
    );
    assert_eq!(rendered["precision"], 14);
}

fn records(pairs: &[(&str, &str)]) -> Vec<SourceRecord> {
    let topic: std::sync::Arc<str> = "t".into();
    pairs
        .iter()
        .enumerate()
        .map(|(offset, (key, value))| SourceRecord {
            topic: topic.clone(),
            offset: offset as i64,
            key: Some(key.as_bytes().to_vec()),
            value: (*value != "null").then(|| value.as_bytes().to_vec()),
            ..SourceRecord::default()
        })
        .collect()
}

fn hostile(mode: &str, config: RuntimeConfig) -> wagg::plugin::PluginInstance {
    hostile_at(&plugin("hostile"), mode, config)
}

fn hostile_at(plugin: &Path, mode: &str, config: RuntimeConfig) -> wagg::plugin::PluginInstance {
    PluginRuntime::new(config)
        .expect("runtime")
        .load(plugin)
        .expect("load")
        .instantiate(&serde_json::json!({ "mode": mode }).to_string())
        .expect("instantiate")
}

/// Ten records over three keys with one `"bad"` record (offset 5, key b,
/// the second of its group's three records). The plugin counts records; a
/// correct host ends with a = 4, b = 2 (the bad one excluded), c = 3.
fn batch_with_one_bad_record() -> Vec<SourceRecord> {
    records(&[
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("a", "4"),
        ("c", "5"),
        ("b", "bad"),
        ("b", "7"),
        ("a", "8"),
        ("c", "9"),
        ("a", "10"),
    ])
}

fn counts(instance: &mut wagg::plugin::PluginInstance, states: &StateMap) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = states
        .iter()
        .map(|(key, state)| {
            let json: serde_json::Value =
                serde_json::from_str(&instance.render(state).expect("render")).expect("json");
            (
                String::from_utf8_lossy(key).into_owned(),
                json["count"].as_u64().expect("count"),
            )
        })
        .collect();
    out.sort();
    out
}

/// Whatever the misbehaviour, the bad record is isolated and named, every
/// other record is applied exactly once, and the instance keeps working.
fn assert_isolated(mode: &str, config: RuntimeConfig, expect_message: impl Fn(&str) -> bool) {
    assert_isolated_in(&plugin("hostile"), mode, config, expect_message);
}

fn assert_isolated_in(
    plugin: &Path,
    mode: &str,
    config: RuntimeConfig,
    expect_message: impl Fn(&str) -> bool,
) {
    let mut instance = hostile_at(plugin, mode, config);
    let records = batch_with_one_bad_record();
    let mut states = StateMap::default();
    let failures =
        offline::apply_chunk(&mut instance, &mut states, &records, OnError::Skip).expect("call");
    assert_eq!(failures.len(), 1, "{mode}: {failures:?}");
    let (record, message) = &failures[0];
    assert_eq!(record.offset, 5, "{mode}: wrong record blamed");
    assert!(
        expect_message(message),
        "{mode}: unexpected message: {message}"
    );
    assert_eq!(
        counts(&mut instance, &states),
        vec![("a".into(), 4), ("b".into(), 2), ("c".into(), 3)],
        "{mode}: other records must be applied exactly once"
    );
    // The instance still works after the failure.
    let more = records_after(&[("a", "11")]);
    assert!(
        offline::apply_chunk(&mut instance, &mut states, &more, OnError::Fail)
            .expect("call")
            .is_empty()
    );
    assert_eq!(counts(&mut instance, &states)[0], ("a".into(), 5));
}

fn records_after(pairs: &[(&str, &str)]) -> Vec<SourceRecord> {
    let mut out = records(pairs);
    for r in &mut out {
        r.offset += 100;
    }
    out
}

#[test]
fn an_infinite_loop_is_stopped_within_the_budget() {
    let budget = Duration::from_millis(200);
    let config = RuntimeConfig {
        call_timeout: budget,
        ..RuntimeConfig::default()
    };
    let mut instance = hostile("loop", config.clone());
    let started = Instant::now();
    let error = instance.apply_groups(&[]).map(|_| ()).and_then(|()| {
        let records = records(&[("k", "bad")]);
        let refs: Vec<&SourceRecord> = records.iter().collect();
        instance
            .apply_groups(&[wagg::plugin::GroupInput {
                key: b"k",
                state: None,
                records: &refs,
            }])
            .map(|_| ())
    });
    let elapsed = started.elapsed();
    assert!(
        matches!(error, Err(CallError::Timeout { budget: b, .. }) if b == budget),
        "{error:?}"
    );
    // Generous: the point is that it returns, not how precisely.
    assert!(
        elapsed < budget * 10,
        "took {elapsed:?} for a {budget:?} budget"
    );
    assert_isolated("loop", config, |m| {
        m.contains("exceeded its time budget of 200ms")
    });
}

#[test]
fn a_sleep_through_wasi_is_cut_at_once_and_never_blocks_the_host() {
    // The sleep would block inside a host call, where the call budget (an
    // epoch deadline) cannot fire: the sandbox refuses the timer instead.
    let budget = Duration::from_millis(500);
    let config = RuntimeConfig {
        call_timeout: budget,
        ..RuntimeConfig::default()
    };
    let started = Instant::now();
    assert_isolated("sleep", config, |m| {
        m.contains("trapped") && m.contains("plugins cannot wait")
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "a 10 s sleep held the host for {elapsed:?}"
    );
}

#[test]
fn clocks_and_randomness_are_the_same_in_every_call() {
    // A replay must compute what the first run did: the wall clock is
    // frozen and the WASI random source restarts from one seed at every
    // call, so a fresh instance making the same calls sees the same values.
    // (Within one instance, Rust's std derives each new `RandomState` from
    // a per-thread counter: guest state, which the host cannot reset.)
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut instance = hostile("clock", RuntimeConfig::default());
        for _ in 0..2 {
            let mut states = StateMap::default();
            let input = records(&[("k", "bad")]);
            let failures = offline::apply_chunk(&mut instance, &mut states, &input, OnError::Fail)
                .expect("call");
            assert!(failures.is_empty(), "{failures:?}");
            let rendered: serde_json::Value =
                serde_json::from_str(&instance.render(&states[b"k".as_slice()]).expect("render"))
                    .expect("json");
            let blob: Vec<u8> = serde_json::from_value(rendered["blob"].clone()).expect("bytes");
            seen.push(String::from_utf8(blob).expect("text"));
        }
    }
    assert!(seen.iter().all(|s| s.starts_with("946684800 ")), "{seen:?}");
    assert_eq!(seen[..2], seen[2..], "two fresh instances, the same calls");
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let config = RuntimeConfig {
        memory_limit_bytes: 16 << 20,
        ..RuntimeConfig::default()
    };
    assert_isolated("alloc", config, |m| {
        m.contains("exceeded its memory limit of 16 MiB")
    });
}

#[test]
fn stack_overflow_is_contained() {
    // Rust's shadow stack (in linear memory) runs out before wasm's call
    // stack does; either way the trap is contained and named.
    assert_isolated("recurse", RuntimeConfig::default(), |m| {
        m.contains("overflowed its call stack")
            || m.contains("a stack overflow in the plugin shows up this way")
    });
}

#[test]
fn a_panic_reports_the_record_and_the_panic_message() {
    assert_isolated("panic", RuntimeConfig::default(), |m| {
        m.contains("trapped") && m.contains("hostile plugin panicked on offset 5")
    });
}

#[test]
fn a_rejected_record_is_reported_without_a_trap() {
    assert_isolated("error", RuntimeConfig::default(), |m| {
        m == "hostile plugin rejected offset 5"
    });
}

#[test]
fn oversized_state_is_refused() {
    assert_isolated("huge-state", RuntimeConfig::default(), |m| {
        m.contains("returned a state of") && m.contains("over the cap of 1048576 bytes")
    });
}

#[test]
fn files_are_not_readable() {
    assert_isolated("open-file", RuntimeConfig::default(), |m| {
        m.starts_with("could not read /etc/hostname")
    });
}

#[test]
fn the_network_is_not_reachable() {
    // A real listener on loopback: the plugin must still not reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let mut instance = PluginRuntime::new(RuntimeConfig::default())
        .expect("runtime")
        .load(&plugin("hostile"))
        .expect("load")
        .instantiate(&serde_json::json!({ "mode": "connect", "address": address }).to_string())
        .expect("instantiate");
    let mut states = StateMap::default();
    let bad = records(&[("k", "bad")]);
    let failures =
        offline::apply_chunk(&mut instance, &mut states, &bad, OnError::Fail).expect("call");
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0]
            .1
            .starts_with(&format!("could not connect to {address}")),
        "{}",
        failures[0].1
    );
}

#[test]
fn the_environment_is_empty() {
    // The host has variables; the plugin must see none.
    assert!(std::env::vars().next().is_some());
    let mut instance = hostile("env", RuntimeConfig::default());
    let mut states = StateMap::default();
    let bad = records(&[("k", "bad")]);
    let failures =
        offline::apply_chunk(&mut instance, &mut states, &bad, OnError::Fail).expect("call");
    assert!(failures.is_empty());
    let rendered: serde_json::Value =
        serde_json::from_str(&instance.render(&states[b"k".as_slice()]).expect("render"))
            .expect("json");
    assert_eq!(
        rendered["blob"],
        serde_json::json!([]),
        "plugin saw environment variables: {rendered}"
    );
}

#[test]
fn compiled_plugins_are_cached_by_content_hash() {
    let cache = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..RuntimeConfig::default()
    };
    let first = PluginRuntime::new(config.clone())
        .expect("runtime")
        .load(&plugin("count"))
        .expect("load");
    let mut names: Vec<String> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    // The compiled component and its digest.
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with(first.content_hash()), "{names:?}");
    assert!(names[0].ends_with(".cwasm"), "{names:?}");
    assert_eq!(names[1], format!("{}.sha256", names[0]));
    // A second runtime loads from the cache and behaves the same.
    let second = PluginRuntime::new(config)
        .expect("runtime")
        .load(&plugin("count"))
        .expect("load");
    assert_eq!(second.metadata(), first.metadata());
    let mut instance = second.instantiate("{}").expect("instantiate");
    let mut states = StateMap::default();
    offline::apply_chunk(
        &mut instance,
        &mut states,
        &records(&[("k", "1"), ("k", "2")]),
        OnError::Fail,
    )
    .expect("call");
    assert_eq!(counts(&mut instance, &states), vec![("k".into(), 2)]);
}

#[test]
fn a_corrupted_compiled_plugin_is_compiled_again_not_loaded() {
    let cache = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..RuntimeConfig::default()
    };
    PluginRuntime::new(config.clone())
        .expect("runtime")
        .load(&plugin("count"))
        .expect("load");
    let entry = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("a cache entry");
    let good = std::fs::read(&entry).expect("read");
    // Machine code changed on disk (bit rot, or someone else's write): a
    // loader trusting the file would run it.
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    for byte in &mut bad[middle..middle + 64] {
        *byte ^= 0xff;
    }
    std::fs::write(&entry, &bad).expect("corrupt");
    let reloaded = PluginRuntime::new(config)
        .expect("runtime")
        .load(&plugin("count"))
        .expect("load");
    let mut instance = reloaded.instantiate("{}").expect("instantiate");
    let mut states = StateMap::default();
    offline::apply_chunk(
        &mut instance,
        &mut states,
        &records(&[("k", "1"), ("k", "2")]),
        OnError::Fail,
    )
    .expect("call");
    assert_eq!(counts(&mut instance, &states), vec![("k".into(), 2)]);
    // The entry was compiled and written again (not loaded as it was).
    assert!(
        std::fs::read(&entry).expect("read") == good,
        "the corrupted entry is still there"
    );
}

#[test]
fn a_file_that_is_not_a_plugin_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("junk.wasm");
    std::fs::write(&path, b"definitely not wasm").expect("write");
    let error = runtime().load(&path).expect_err("junk must not load");
    assert!(matches!(error, PluginError::NotAPlugin { .. }), "{error}");
    let missing = runtime()
        .load(&dir.path().join("missing.wasm"))
        .expect_err("missing file");
    assert!(missing.to_string().contains("missing.wasm"), "{missing}");
}

#[test]
fn check_config_loads_every_plugin_and_checks_its_params() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |params: &str| {
        format!(
            "[source]\nbrokers = \"127.0.0.1:9\"\ntopics = [\"t\"]\n\n[[aggregation]]\nname = \"spend\"\nplugin = {:?}\nparams = {params}\n",
            plugin("stats")
        )
    };
    let path = dir.path().join("wagg.toml");
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run wagg")
    };
    // `--config FILE` is the same as `FILE`, for every command that reads
    // a config.
    let check_with_flag = || {
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run wagg")
    };

    std::fs::write(&path, config(r#"{ field = "/amount" }"#)).expect("write");
    let ok = check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("aggregation \"spend\": stats"));
    assert!(check_with_flag().status.success());

    // Each error names the file, the aggregation and the field; the
    // params' own JSON (which nobody wrote) has no line and column.
    std::fs::write(&path, config("{}")).expect("write");
    let missing_field = check_with_flag();
    let stderr = String::from_utf8_lossy(&missing_field.stderr);
    assert!(!missing_field.status.success());
    assert!(
        stderr.contains("wagg.toml: `aggregation[0]`.params (aggregation \"spend\")")
            && stderr.contains("missing field `field`")
            && !stderr.contains("line 1"),
        "{stderr}"
    );
    std::fs::write(
        &path,
        config(r#"{ field = "/amount" }"#).replace(
            &format!("{:?}", plugin("stats")),
            "\"plugins/nowhere.wasm\"",
        ),
    )
    .expect("write");
    let no_plugin = check();
    let stderr = String::from_utf8_lossy(&no_plugin.stderr);
    assert!(!no_plugin.status.success());
    assert!(
        stderr.contains(
            "wagg.toml: `aggregation[0]`.plugin \"plugins/nowhere.wasm\" (aggregation \"spend\")"
        ) && stderr.contains("nowhere.wasm"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the OS error once: {stderr}"
    );

    std::fs::write(&path, config(r#"{ field = "amount" }"#)).expect("write");
    let bad = check();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("aggregation \"spend\"")
            && stderr.contains("`field` must be a JSON pointer"),
        "{stderr}"
    );

    std::fs::write(
        &path,
        config(r#"{ field = "/amount" }"#).replace("topics", "topicz"),
    )
    .expect("write");
    let unknown = check();
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(
        stderr.contains("wagg.toml") && stderr.contains("unknown field `topicz`"),
        "{stderr}"
    );
}

/// A session window merges states when a record bridges two sessions:
/// over a plugin without `merge` (a `count` built against world 0.1.0) it
/// is refused before anything runs, naming the plugin; the same window
/// over today's `count` passes.
#[test]
fn a_session_window_over_a_plugin_that_cannot_merge_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wagg.toml");
    let check = |plugin: &std::path::Path| {
        let text = format!(
            "[source]\nbrokers = \"127.0.0.1:9\"\ntopics = [\"t\"]\n\n[[aggregation]]\nname = \"visits\"\nplugin = {plugin:?}\nwindow = {{ kind = \"session\", gap = \"30m\", grace = \"1m\" }}\n"
        );
        std::fs::write(&path, text).expect("write");
        Command::new(env!("CARGO_BIN_EXE_wagg"))
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run wagg")
    };
    let old = check(&workspace_root().join("tests/fixtures/count-world-0.1.0.wasm"));
    let stderr = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success(), "{stderr}");
    assert!(
        stderr.contains("aggregation \"visits\"")
            && stderr.contains("a session window needs a plugin that merges")
            && stderr.contains("plugin \"count\" 0.1.0")
            && stderr.contains("count-world-0.1.0.wasm"),
        "{stderr}"
    );
    let merging = check(&plugin("count"));
    assert!(
        merging.status.success(),
        "{}",
        String::from_utf8_lossy(&merging.stderr)
    );
}

/// `wagg plugin new` → `build` → `test --golden` → `inspect` → a config that
/// uses it passes `check-config`: the documented path for a plugin author.
/// The crate is moved elsewhere before it is built, offline: it carries
/// its own copy of the guest SDK, not a path into this checkout.
#[test]
fn a_new_plugin_builds_and_passes_its_golden_test() {
    let work = tempfile::tempdir().expect("tempdir");
    let wagg = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(args)
            .env("CARGO_NET_OFFLINE", "true")
            .output()
            .expect("run wagg");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "wagg {args:?}:\n{stdout}\n{stderr}"
        );
        stdout
    };
    let dir = work.path().to_str().expect("utf-8 temp path");
    let created = wagg(&["plugin", "new", "spend-total", "--dir", dir]);
    assert!(created.contains("created"), "{created}");
    let manifest =
        std::fs::read_to_string(work.path().join("spend-total/Cargo.toml")).expect("manifest");
    let checkout = workspace_root().display().to_string();
    assert!(!manifest.contains(&checkout), "{manifest}");
    let crate_dir = work.path().join("elsewhere/deeper/spend-total");
    std::fs::create_dir_all(crate_dir.parent().expect("parent")).expect("mkdir");
    std::fs::rename(work.path().join("spend-total"), &crate_dir).expect("move the crate");
    // The shared wasm target dir keeps the dependencies' builds warm.
    let target = common::target_dir().join("wasm-plugins");
    let built = wagg(&[
        "plugin",
        "build",
        crate_dir.to_str().expect("utf-8"),
        "--target-dir",
        target.to_str().expect("utf-8"),
    ]);
    let wasm = built.trim().lines().last().expect("a path").to_owned();
    assert!(wasm.ends_with("spend_total.wasm"), "{built}");

    let golden = crate_dir.join("golden");
    let report = wagg(&[
        "plugin",
        "test",
        &wasm,
        "--golden",
        golden.to_str().expect("utf-8"),
    ]);
    assert_eq!(report.matches("ok ").count(), 3, "{report}");

    let inspected: serde_json::Value =
        serde_json::from_str(&wagg(&["plugin", "inspect", &wasm])).expect("inspect prints JSON");
    assert_eq!(inspected["name"], "spend-total");
    assert_eq!(inspected["state_format"], 1);
    assert_eq!(
        inspected["exports"],
        serde_json::json!([
            "merges",
            "merge",
            "migrates-from",
            "migrate",
            "metadata",
            "configure",
            "apply",
            "render"
        ]),
        "the wagg:aggregator world's exports"
    );
    assert_eq!(inspected["migrates_from"], serde_json::json!([]));
    assert_eq!(inspected["merges"], false);

    // A wrong expectation fails, naming the case.
    std::fs::write(
        golden.join("basic/expected.json"),
        r#"{"alice": {"count": 2, "total": 15.5}, "bob": {"count": 1, "total": 3.0}}"#,
    )
    .expect("write");
    let failing = Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args([
            "plugin",
            "test",
            &wasm,
            "--golden",
            golden.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run wagg");
    assert!(!failing.status.success());
    let stdout = String::from_utf8_lossy(&failing.stdout);
    assert!(
        stdout.contains("FAIL") && stdout.contains("basic"),
        "{stdout}"
    );

    let config = work.path().join("wagg.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"orders\"]\n\n[[aggregation]]\nname = \"spend\"\nplugin = {wasm:?}\nparams = {{ field = \"/amount\" }}\n"
        ),
    )
    .expect("write config");
    let checked = wagg(&["check-config", config.to_str().expect("utf-8")]);
    assert!(
        checked.contains("spend-total") && checked.contains("ok"),
        "{checked}"
    );

    // A compile error is cargo's to explain: no hint about a missing
    // target, which is installed.
    let lib = crate_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).expect("lib.rs");
    std::fs::write(&lib, source.replace("Ok(())", "Ok(()) +")).expect("break lib.rs");
    let broken = Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(["plugin", "build", crate_dir.to_str().expect("utf-8")])
        .args(["--target-dir", target.to_str().expect("utf-8")])
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("run wagg");
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success(), "{stderr}");
    assert!(
        stderr.contains("error")
            && stderr.contains("failed")
            && !stderr.contains("rustup target add"),
        "{stderr}"
    );
}

fn amount_records(amounts: &[f64]) -> Vec<SourceRecord> {
    amounts
        .iter()
        .enumerate()
        .map(|(i, amount)| SourceRecord {
            topic: "t".into(),
            partition: 0,
            offset: i as i64,
            key: Some(b"k".to_vec()),
            value: Some(format!(r#"{{"amount": {amount}}}"#).into_bytes()),
            timestamp: None,
            headers: Vec::new(),
        })
        .collect()
}

/// World 0.2.0 adds `migrates-from` and `migrate`; a plugin built against
/// 0.1.0 (a `count` component kept as a fixture, built before the change)
/// loads, applies and renders as before, migrates from nothing, and a call
/// to `migrate` is an error that says why.
#[test]
fn plugins_built_before_migrate_existed_still_load_and_say_they_cannot_migrate() {
    let old = workspace_root().join("tests/fixtures/count-world-0.1.0.wasm");
    let loaded = runtime().load(&old).expect("a 0.1.0 plugin loads");
    assert_eq!(loaded.metadata().name, "count");
    assert!(loaded.metadata().migrates_from.is_empty());
    assert!(!loaded.metadata().merges);
    assert!(!loaded.exports().iter().any(|e| e.contains("migrate")));
    let mut instance = loaded.instantiate("{}").expect("instance");
    let records = amount_records(&[1.0, 2.0, 3.0]);
    let mut states = StateMap::default();
    offline::apply_chunk(&mut instance, &mut states, &records, OnError::Fail).expect("apply");
    let state = &states[b"k".as_slice()];
    assert_eq!(instance.render(state).expect("render"), r#"{"count":3}"#);
    let refused = instance.migrate(0, state).expect_err("no migrate export");
    assert!(
        refused.to_string().contains("no `migrate` export"),
        "{refused}"
    );
}

/// `stats` 0.2.0 (state format 2, a running `sum` added) migrates the
/// states `stats` 0.1.0 wrote: the moments carry over, the sum is
/// recovered, and the migrated state goes on aggregating like a new one.
#[test]
fn a_plugin_migrates_the_state_an_older_version_wrote_and_refuses_formats_it_does_not_know() {
    let runtime = runtime();
    let v1 = runtime.load(&plugin("stats")).expect("stats");
    let v2 = runtime.load(&plugin("stats-v2")).expect("stats v2");
    assert_eq!(v2.metadata().state_format, 2);
    assert_eq!(v2.metadata().migrates_from, vec![1]);
    assert!(v1.metadata().migrates_from.is_empty());
    let params = r#"{"field": "/amount"}"#;
    let (first, later) = ([4.0, 8.0, 15.0], [16.0, 23.0, 42.0]);
    let mut states = StateMap::default();
    let mut old = v1.instantiate(params).expect("v1");
    offline::apply_chunk(
        &mut old,
        &mut states,
        &amount_records(&first),
        OnError::Fail,
    )
    .expect("apply v1");

    let mut new = v2.instantiate(params).expect("v2");
    let v1_state = states[b"k".as_slice()].clone();
    let migrated = new.migrate(1, &v1_state).expect("migrate");
    let rendered: serde_json::Value =
        serde_json::from_str(&new.render(&migrated).expect("render")).expect("json");
    let mut want = common::stats_json(&first);
    want["sum"] = serde_json::json!(27.0);
    assert!(json_approx_eq(&rendered, &want), "{rendered} != {want}");

    states.insert(b"k".to_vec(), migrated);
    offline::apply_chunk(
        &mut new,
        &mut states,
        &amount_records(&later),
        OnError::Fail,
    )
    .expect("apply v2");
    let all = [first, later].concat();
    let mut want = common::stats_json(&all);
    want["sum"] = serde_json::json!(all.iter().sum::<f64>());
    let rendered: serde_json::Value =
        serde_json::from_str(&new.render(&states[b"k".as_slice()]).expect("render")).expect("json");
    assert!(json_approx_eq(&rendered, &want), "{rendered} != {want}");

    let refused = new.migrate(7, &v1_state).expect_err("format 7 is unknown");
    assert!(
        refused
            .to_string()
            .contains("does not migrate from state format 7"),
        "{refused}"
    );
}

/// For every example plugin, aggregating records A then B equals merging
/// the state of A with the state of B (what session windows rely on), over
/// random inputs: keys, amounts, items, timestamps, tombstones.
#[test]
fn merging_the_states_of_two_halves_equals_aggregating_them_all() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let runtime = runtime();
    let cases: [(&str, &str); 8] = [
        ("count", "{}"),
        ("sum", r#"{"field": "/amount"}"#),
        ("stats", r#"{"field": "/amount"}"#),
        ("latest", "{}"),
        ("latest", r#"{"timestamp": "/ts"}"#),
        ("top-n", r#"{"n": 3, "field": "/amount", "item": "/item"}"#),
        ("top-n", r#"{"n": 2, "field": "/amount"}"#),
        ("distinct", r#"{"field": "/item", "precision": 6}"#),
    ];
    let record = (
        0u8..4,
        -50i32..50,
        0u8..6,
        0i64..20,
        prop::bool::weighted(0.05),
    );
    for (name, params) in cases {
        // A runner per case: one runner's case budget is shared by its runs.
        let mut runner = TestRunner::new(Config {
            cases: 40,
            ..Config::default()
        });
        let plugin = runtime.load(&plugin(name)).expect("load");
        let instance = std::cell::RefCell::new(plugin.instantiate(params).expect("instance"));
        runner
            .run(&prop::collection::vec(record.clone(), 0..60), |generated| {
                let records: Vec<SourceRecord> =
                    generated
                        .iter()
                        .enumerate()
                        .map(|(offset, (key, amount, item, ts, tombstone))| {
                            SourceRecord {
                        topic: "t".into(),
                        partition: 0,
                        offset: offset as i64,
                        key: Some(format!("k{key}").into_bytes()),
                        // Only `latest` accepts tombstones; with timestamps
                        // a tombstone resets the ordering, which no state
                        // carries (see `latest`'s `merge`).
                        value: (!(*tombstone && name == "latest" && params == "{}")).then(|| {
                            format!(r#"{{"amount": {amount}, "item": "i{item}", "ts": {ts}}}"#)
                                .into_bytes()
                        }),
                        timestamp: None,
                        headers: Vec::new(),
                    }
                        })
                        .collect();
                let instance = &mut *instance.borrow_mut();
                let all = offline::run(instance, &records, 1000, OnError::Fail, |_, _| {})
                    .expect("aggregate");
                let merged = offline::run_merged(instance, &records).expect("merge");
                let (all, merged) = (
                    offline::to_json_object(all),
                    offline::to_json_object(merged),
                );
                prop_assert!(
                    json_approx_eq(&all, &merged),
                    "{name} {params}: all {all} != merged halves {merged}"
                );
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name} {params}: {e}"));
    }
}
