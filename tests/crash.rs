//! kill -9 at random moments, restart, and at the end every key's state must
//! equal the truth computed here: nothing lost, nothing counted twice.
//!
//! The default (100,000 records, 5 kills) runs with the suite; the long
//! version:
//! `WAGG_CRASH_RECORDS=500000 WAGG_CRASH_KILLS=20 cargo test --release --test crash -- --nocapture`
//! (`WAGG_CRASH_SEED=N` replays a run; the seed is printed).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::broker::{Broker, free_port};
use common::wagg_process::Wagg;
use common::{json_approx_eq, stats_json};
use serde_json::{Value, json};
use wagg::tools::rng::Rng;

const PARTITIONS: u32 = 4;
const KEYS: usize = 10_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn repeated_kill_9_loses_nothing_and_counts_nothing_twice() {
    let records = env_or("WAGG_CRASH_RECORDS", 100_000) as usize;
    let kills = env_or("WAGG_CRASH_KILLS", 5);
    let seed = env_or(
        "WAGG_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1,
    );
    eprintln!(
        "crash test: {records} records, {kills} kills, seed {seed} (WAGG_CRASH_SEED={seed} replays)"
    );
    // A seeded, replayable source of kill times.
    let mut rng = Rng(seed);

    let broker = Broker::start();
    broker.create_topic("events", PARTITIONS);
    let mut truth_count: BTreeMap<String, u64> = BTreeMap::new();
    let mut truth_values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let data: Vec<(i32, String, String)> = (0..records)
        .map(|i| {
            let key = format!("k{:05}", (i * 7919) % KEYS);
            let amount = ((i * 37) % 1000) as f64 / 4.0;
            *truth_count.entry(key.clone()).or_default() += 1;
            truth_values.entry(key.clone()).or_default().push(amount);
            // A key always goes to the same partition, as with Kafka's
            // default partitioner.
            let partition = ((i * 7919) % KEYS % PARTITIONS as usize) as i32;
            (partition, key, json!({"amount": amount}).to_string())
        })
        .collect();
    broker.produce("events", &data);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // Each run joins a fresh consumer group. tansu 0.6's group coordinator
    // never hands a SIGKILLed member's partitions to anyone else when the dead
    // member expires while the group is stable (its heartbeat path prunes the
    // member without starting a new generation, and a pruned leader can stay
    // "leader" forever), so a restarted member may wait for ever; Apache Kafka
    // expires the member after `session.timeout.ms` and rebalances. The group
    // id has no bearing on what wagg applies: start offsets come from the
    // state store, and commits to the group are for monitoring only.
    let config = |run: u64| {
        format!(
            r#"
[source]
brokers = "{}"
group_id = "wagg-crash-{run}"
topics = ["events"]

[state]
dir = "state"

[http]
listen = "127.0.0.1:{port}"

[batch]
max_records = 500
max_delay_ms = 20
{}"#,
            broker.address,
            common::count_and_stats_toml()
        )
    };

    let expected_applied = common::count_and_stats_applied(records as u64);
    let mut progress = Vec::new();
    for kill in 0..kills {
        let mut wagg = Wagg::start(dir.path(), &config(kill), port);
        // Even kills land in the group join / partition assignment; odd ones
        // wait until records are being applied and land among batches and
        // their writes.
        let delay = if kill % 2 == 0 {
            rng.next_u64() % 800
        } else {
            let before = wagg.applied().get("count").copied().unwrap_or(0);
            let waiting = Instant::now();
            while wagg.applied().get("count").copied().unwrap_or(0) == before
                && before < records as u64
                && waiting.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            rng.next_u64() % 400
        };
        std::thread::sleep(Duration::from_millis(delay));
        let applied = wagg.applied();
        wagg.kill();
        for (name, n) in &applied {
            assert!(
                *n <= records as u64,
                "{name} applied {n} of {records} records before the kill"
            );
        }
        progress.push((delay, applied.get("count").copied().unwrap_or(0)));
    }
    eprintln!("crash test: (kill delay ms, records applied just before the kill): {progress:?}");

    let wagg = Wagg::start(dir.path(), &config(kills), port);
    let started = Instant::now();
    wagg.wait_for(
        &expected_applied,
        Duration::from_secs(env_or("WAGG_CRASH_CATCHUP_SECS", 300)),
    );
    eprintln!(
        "crash test: caught up {:?} after the last restart",
        started.elapsed()
    );

    let counts = wagg.all_states("count");
    assert_eq!(counts.len(), truth_count.len());
    for (key, n) in &truth_count {
        assert_eq!(
            counts.get(key),
            Some(&json!({"count": n})),
            "count of {key} (seed {seed})"
        );
    }
    let stats = wagg.all_states("stats");
    for (key, xs) in &truth_values {
        let want = stats_json(xs);
        let got = stats.get(key).unwrap_or(&Value::Null);
        assert!(
            json_approx_eq(got, &want),
            "stats of {key}: got {got}, want {want} (seed {seed})"
        );
    }
}
