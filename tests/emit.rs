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
/// A minute boundary (2026-01-01T00:00:00Z): event times of the final-mode test.
const T0: i64 = 1_767_225_600_000;

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

/// `mode = "final"`: one record per tumbling window when its partition's
/// stream time closes it (end + grace), with the window's exact final
/// count. Records arrive out of order (within the grace) and some late
/// (dropped); first a clean run — every window closed so far emitted
/// exactly once — then two kill -9 while records flow: every closed
/// window emitted (again, at most, after a crash), none still open, every
/// record its window's truth.
#[test]
fn final_mode_emits_each_closed_window_once_with_its_exact_count() {
    const GRACE: i64 = 10_000;
    const SIZE: i64 = 60_000;
    let broker = Broker::start();
    broker.create_topic("events", PARTITIONS);
    broker.create_topic("finals", PARTITIONS);
    let mut rng = Rng(0xf1a1_0001);
    // (partition, key, event time), in production order.
    let records: Vec<(i32, String, i64)> = (0..6_000i64)
        .map(|i| {
            let k = rng.next_u64() % 40;
            let behind = match i % 50 {
                0 => 120_000,                         // late
                _ => (rng.next_u64() % 8_000) as i64, // within the grace
            };
            (
                (k % PARTITIONS as u64) as i32,
                format!("k{k:02}"),
                T0 + i * 100 - behind,
            )
        })
        .collect();
    let produce = |records: &[(i32, String, i64)]| {
        let batch: Vec<(i32, String, String)> = records
            .iter()
            .map(|(p, k, ts)| (*p, k.clone(), json!({ "ts": ts }).to_string()))
            .collect();
        ProducerOnly::new(&broker.address).produce("events", &batch);
    };
    // The truth: each partition's stream time record by record; a record
    // counts in its window unless that had closed when it came.
    let truth = |records: &[(i32, String, i64)]| {
        let mut stream_time: BTreeMap<i32, i64> = BTreeMap::new();
        let mut counts: BTreeMap<(String, i64), u64> = BTreeMap::new();
        let mut late = 0;
        for (partition, key, ts) in records {
            let st = stream_time.entry(*partition).or_insert(*ts);
            *st = (*st).max(*ts);
            let start = ts - ts.rem_euclid(SIZE);
            if *st >= start + SIZE + GRACE {
                late += 1;
                continue;
            }
            *counts.entry((key.clone(), start)).or_default() += 1;
        }
        // Closed at the end: (key, start) → count.
        let closed: BTreeMap<(String, i64), u64> = counts
            .into_iter()
            .filter(|((key, start), _)| {
                let k: u64 = key[1..].parse().expect("key number");
                stream_time[&((k % PARTITIONS as u64) as i32)] >= start + SIZE + GRACE
            })
            .collect();
        (closed, late)
    };
    let finals = |broker: &Broker| -> Vec<((String, i64), Value)> {
        broker
            .read_all("finals", PARTITIONS)
            .into_iter()
            .map(|r| {
                let start: i64 = r.headers["wagg.window.start"].parse().expect("start");
                let end: i64 = r.headers["wagg.window.end"].parse().expect("end");
                assert_eq!(end - start, SIZE);
                assert_eq!(r.headers["wagg.aggregation"], "per_minute");
                let key = String::from_utf8_lossy(&r.key).into_owned();
                let value = serde_json::from_slice(&r.value.expect("a state")).expect("JSON");
                ((key, start), value)
            })
            .collect()
    };
    let config = |run: usize, port: u16| {
        common::single_instance_toml(
            &broker.address,
            &format!("wagg-final-{run}"),
            port,
            200,
            "commit_interval_ms = 100\n",
            &format!(
                r#"
[[aggregation]]
name = "per_minute"
plugin = {count:?}
time = "/ts"
window = {{ kind = "tumbling", size = "1m", grace = "10s", retention = "1h" }}
emit = {{ topic = "finals", mode = "final" }}
"#,
                count = common::plugin("count")
            ),
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let caught_up = |wagg: &Wagg, total: usize| {
        let started = Instant::now();
        loop {
            let (_, body) = wagg.get("/v1/aggregations");
            let a = &body["aggregations"][0];
            let seen = a["records_applied"].as_u64().unwrap_or(0)
                + a["records_late"].as_u64().unwrap_or(0);
            if seen == total as u64 {
                return;
            }
            assert!(started.elapsed() < CATCH_UP, "not caught up: {a}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A clean run, records arriving over ~2 s (a flush every 100 ms):
    // exactly once.
    let (first, rest) = records.split_at(2_000);
    let wagg = Wagg::start(dir.path(), &config(0, port), port);
    for chunk in first.chunks(100) {
        produce(chunk);
        std::thread::sleep(Duration::from_millis(100));
    }
    caught_up(&wagg, first.len());
    let (closed, _) = truth(first);
    let emitted = finals(&broker);
    let once: BTreeMap<(String, i64), Value> = emitted.iter().cloned().collect();
    assert_eq!(
        once.len(),
        emitted.len(),
        "a window emitted twice without a crash"
    );
    let want: BTreeMap<(String, i64), Value> = closed
        .iter()
        .map(|(window, count)| (window.clone(), json!({ "count": count })))
        .collect();
    assert_eq!(once, want, "the closed windows and their counts");
    assert!(want.len() >= 100, "{} windows closed", want.len());
    drop(wagg);

    // Two kill -9 while the rest arrives.
    let producer = {
        let (address, rest) = (broker.address.clone(), rest.to_vec());
        std::thread::spawn(move || {
            let producer = ProducerOnly::new(&address);
            for chunk in rest.chunks(250) {
                let batch: Vec<(i32, String, String)> = chunk
                    .iter()
                    .map(|(p, k, ts)| (*p, k.clone(), json!({ "ts": ts }).to_string()))
                    .collect();
                producer.produce("events", &batch);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for run in 1..3 {
        let mut wagg = Wagg::start(dir.path(), &config(run, port), port);
        std::thread::sleep(Duration::from_millis(700 + rng.next_u64() % 700));
        wagg.kill();
    }
    producer.join().expect("producer");
    let wagg = Wagg::start(dir.path(), &config(3, port), port);
    caught_up(&wagg, records.len());
    let (closed, late) = truth(&records);
    let emitted = finals(&broker);
    let want: BTreeMap<(String, i64), Value> = closed
        .iter()
        .map(|(window, count)| (window.clone(), json!({ "count": count })))
        .collect();
    for (window, value) in &emitted {
        assert_eq!(
            Some(value),
            want.get(window),
            "{window:?}: emitted, not its truth (or still open)"
        );
    }
    let distinct: BTreeMap<(String, i64), Value> = emitted.iter().cloned().collect();
    assert_eq!(distinct, want, "every closed window emitted");
    let (_, body) = wagg.get("/v1/aggregations");
    assert_eq!(body["aggregations"][0]["records_late"], json!(late));
    eprintln!(
        "final: {} windows closed, {} records emitted ({} again after a crash), {late} late records",
        want.len(),
        emitted.len(),
        emitted.len() - distinct.len()
    );
}
