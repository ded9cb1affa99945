//! `emit = { topic = ... }`: every flush's changes go to a Kafka topic,
//! acknowledged before the flush is written. An independent consumer reads
//! the topic and checks every record it finds against the truth as of the
//! flush the record names (`wagg.flush`: the source partition and the next
//! offset written with it) — across kill -9 restarts, re-emitted records
//! included — and that each key's last record is its final state, or a
//! tombstone for a deleted key.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::broker::{Broker, ProducerOnly, free_port};
use common::wagg_process::Wagg;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{Value, json};
use wagg::tools::rng::Rng;

const PARTITIONS: u32 = 4;
const KEYS: usize = 500;
const CATCH_UP: Duration = Duration::from_secs(120);

/// A record as the test produced it: partition, offset, key, value
/// (`None`: a tombstone).
#[derive(Debug, Clone)]
struct Sent {
    partition: i32,
    offset: i64,
    key: String,
    value: Option<String>,
}

/// One record read back from the emit topic.
#[derive(Debug, Clone)]
struct Emitted {
    aggregation: String,
    key: String,
    value: Option<Value>,
    /// `wagg.flush`: (source partition, next offset).
    flush: (i32, i64),
    /// Where it is in the emit topic: (partition, offset).
    at: (i32, i64),
}

/// The truth of `count` and `latest` for `key` over the records of its
/// partition before `next`: the count and the last record (`None` if a
/// tombstone came after it, or none came).
fn truth_at(sent: &[Sent], key: &str, next: i64) -> (u64, Option<Sent>) {
    let mut count = 0;
    let mut last = None;
    for record in sent.iter().filter(|r| r.key == key && r.offset < next) {
        count += 1;
        last = record.value.as_ref().map(|_| record.clone());
    }
    (count, last)
}

fn config(broker: &str, run: usize, port: u16) -> String {
    common::single_instance_toml(
        broker,
        &format!("wagg-emit-{run}"),
        port,
        200,
        "commit_interval_ms = 100\n",
        &format!(
            r#"
[[aggregation]]
name = "count"
plugin = {count:?}
emit = {{ topic = "changes" }}

[[aggregation]]
name = "latest"
plugin = {latest:?}
emit = {{ topic = "changes" }}
"#,
            count = common::plugin("count"),
            latest = common::plugin("latest")
        ),
    )
}

/// Every record of the emit topic, in each partition's order.
fn read_emitted(broker: &Broker) -> Vec<Emitted> {
    broker
        .read_all("changes", PARTITIONS)
        .into_iter()
        .map(|record| {
            let flush = &record.headers["wagg.flush"];
            let (source, next) = flush.split_once('@').expect("partition@offset");
            let partition = source
                .strip_prefix("events/")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("wagg.flush {flush:?}"));
            Emitted {
                aggregation: record.headers["wagg.aggregation"].clone(),
                key: String::from_utf8_lossy(&record.key).into_owned(),
                value: record
                    .value
                    .map(|v| serde_json::from_slice(&v).expect("a JSON state")),
                flush: (partition, next.parse().expect("an offset")),
                at: (record.partition, record.offset),
            }
        })
        .collect()
}

/// A crash right after a flush's changes were acknowledged (before its
/// local write), two kill -9 while records flow, then tombstones for some
/// keys:
/// every emitted record equals the truth as of its flush, each key's last
/// record is its final state (a tombstone for deleted keys), and every
/// change made durable was emitted.
#[test]
fn emitted_changes_are_exact_as_of_their_flush_across_kill_9_and_end_in_the_final_state() {
    let broker = Broker::start();
    broker.create_topic("events", PARTITIONS);
    broker.create_topic("changes", PARTITIONS);
    let mut rng = Rng(0xe417_0001);
    let mut next_offset = [0i64; PARTITIONS as usize];
    let mut sent: Vec<Sent> = Vec::new();
    let mut batch = |n: usize, sent: &mut Vec<Sent>, rng: &mut Rng| {
        (0..n)
            .map(|_| {
                let k = (rng.next_u64() % KEYS as u64) as usize;
                let key = format!("k{k:04}");
                let partition = (k % PARTITIONS as usize) as i32;
                let value = json!({ "amount": rng.next_u64() % 1000 }).to_string();
                sent.push(Sent {
                    partition,
                    offset: next_offset[partition as usize],
                    key: key.clone(),
                    value: Some(value.clone()),
                });
                next_offset[partition as usize] += 1;
                (partition, key, value)
            })
            .collect::<Vec<_>>()
    };
    let up_front = batch(4_000, &mut sent, &mut rng);
    let later = batch(16_000, &mut sent, &mut rng);
    broker.produce("events", &up_front);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // First a crash right after a flush's changes were acknowledged,
    // before the flush is written: they must be emitted again.
    let mut crashed = Wagg::spawn_with_env(
        dir.path(),
        &config(&broker.address, 0, port),
        port,
        &[("WAGG_FAULT_CRASH", "flush-published")],
    );
    let exit = crashed.wait_exit(CATCH_UP).expect("the injected crash");
    assert!(
        !exit.success() && crashed.log().contains("injected crash"),
        "{}",
        crashed.log()
    );
    drop(crashed);
    // Emitted, never written: the restart applies those records again
    // and, with no record produced meanwhile, must emit those keys again
    // as of the same offsets or later ones.
    let before_the_crash = read_emitted(&broker);
    assert!(
        !before_the_crash.is_empty(),
        "nothing emitted before the crash"
    );
    let wagg = Wagg::start(dir.path(), &config(&broker.address, 1, port), port);
    wagg.wait_for(
        &BTreeMap::from([
            ("count".to_owned(), up_front.len() as u64),
            ("latest".to_owned(), up_front.len() as u64),
        ]),
        CATCH_UP,
    );
    let again = read_emitted(&broker);
    for record in &before_the_crash {
        assert!(
            again.iter().any(|r| r.at.0 == record.at.0
                && r.at.1 > record.at.1
                && r.aggregation == record.aggregation
                && r.key == record.key
                && r.flush.1 >= record.flush.1),
            "{record:?}: emitted before the crash, never again"
        );
    }
    drop(wagg);

    // Then two kill -9 while records arrive.
    let producer = {
        let address = broker.address.clone();
        std::thread::spawn(move || {
            let producer = ProducerOnly::new(&address);
            for chunk in later.chunks(400) {
                producer.produce("events", chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for run in 2..4 {
        let mut wagg = Wagg::start(dir.path(), &config(&broker.address, run, port), port);
        let started = Instant::now();
        while wagg.applied().get("count").copied().unwrap_or(0) == 0 {
            assert!(
                started.elapsed() < CATCH_UP,
                "nothing applied: {}",
                wagg.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200 + rng.next_u64() % 1_000));
        wagg.kill();
    }
    producer.join().expect("producer");

    // Tombstones for every tenth key, after everything else.
    let deleted: Vec<String> = (0..KEYS).step_by(10).map(|k| format!("k{k:04}")).collect();
    let tombstones = broker.producer();
    for key in &deleted {
        let k: usize = key[1..].parse().expect("key number");
        let partition = (k % PARTITIONS as usize) as i32;
        tombstones
            .send(
                BaseRecord::<String, ()>::to("events")
                    .partition(partition)
                    .key(key),
            )
            .expect("queue a tombstone");
        sent.push(Sent {
            partition,
            offset: next_offset[partition as usize],
            key: key.clone(),
            value: None,
        });
        next_offset[partition as usize] += 1;
    }
    tombstones
        .flush(Duration::from_secs(30))
        .expect("tombstones acknowledged");

    let wagg = Wagg::start(dir.path(), &config(&broker.address, 4, port), port);
    let total = sent.len() as u64;
    wagg.wait_for(
        &BTreeMap::from([("count".to_owned(), total), ("latest".to_owned(), total)]),
        CATCH_UP,
    );
    // Applied counts are reported once written, so every change they
    // cover was emitted (acknowledged before the write).
    let emitted = read_emitted(&broker);

    let mut checked = 0;
    let mut last: BTreeMap<(String, String), Option<Value>> = BTreeMap::new();
    for record in &emitted {
        let (count, latest) = truth_at(&sent, &record.key, record.flush.1);
        let want = match record.aggregation.as_str() {
            "count" => Some(json!({ "count": count })),
            "latest" => latest.map(|l| {
                json!({
                    "value": serde_json::from_str::<Value>(l.value.as_deref().unwrap_or("null")).unwrap_or(Value::Null),
                    "partition": l.partition,
                    "offset": l.offset,
                })
            }),
            other => panic!("unexpected aggregation {other}"),
        };
        assert_eq!(
            record.value, want,
            "{record:?}: not the state as of its flush"
        );
        checked += 1;
        last.insert(
            (record.aggregation.clone(), record.key.clone()),
            record.value.clone(),
        );
    }
    assert!(checked > 2 * KEYS, "too few changes emitted: {checked}");
    // Each key's last record is its final state, as the API answers it.
    for k in 0..KEYS {
        let key = format!("k{k:04}");
        for aggregation in ["count", "latest"] {
            let final_state = last
                .get(&(aggregation.to_owned(), key.clone()))
                .unwrap_or_else(|| panic!("{aggregation} {key}: never emitted"));
            let (status, answer) = wagg.get(&format!("/v1/aggregations/{aggregation}/keys/{key}"));
            match final_state {
                Some(state) => {
                    assert_eq!(status, 200, "{aggregation} {key}: {answer}");
                    assert_eq!(&answer["state"], state, "{aggregation} {key}");
                }
                None => {
                    assert!(
                        aggregation == "latest" && deleted.contains(&key),
                        "{aggregation} {key}: a tombstone for a key not deleted"
                    );
                    assert_eq!(status, 404, "{aggregation} {key}: {answer}");
                }
            }
        }
    }
    let (_, body) = wagg.get("/v1/aggregations");
    for info in body["aggregations"].as_array().expect("aggregations") {
        assert_eq!(
            info["emit"],
            json!({ "topic": "changes", "mode": "changes", "format": "json" }),
            "{info}"
        );
    }
    for key in &deleted {
        assert_eq!(
            last[&("latest".to_owned(), key.clone())],
            None,
            "latest {key}: deleted, so its last record is a tombstone"
        );
    }
    // Records a consumer would drop: at or below an offset already seen
    // for the key (emitted again after a crash, cut at another offset).
    let mut highest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let again = emitted
        .iter()
        .filter(|r| {
            let seen = highest.entry((&r.aggregation, &r.key)).or_insert(i64::MIN);
            let stale = r.flush.1 <= *seen;
            *seen = (*seen).max(r.flush.1);
            stale
        })
        .count();
    eprintln!(
        "emit: {checked} records checked ({} before the injected crash), {again} older than one already emitted",
        before_the_crash.len()
    );
}
