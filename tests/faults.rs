//! Faults, end to end against the real broker and binary: poison records
//! (dead-letter and fail policies), a broker outage, storage faults and
//! shutdown deadlines. Each test asserts exact final states.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::broker::{Broker, free_port};
use common::wagg_process::Wagg;
use common::{json_approx_eq, plugin, stats_json};
use rdkafka::ClientConfig;
use serde_json::{Value, json};

const CATCH_UP: Duration = Duration::from_secs(120);

fn config(broker: &Broker, http_port: u16, extra: &str, aggregations: &str) -> String {
    common::single_instance_toml(
        &broker.address,
        "wagg-faults",
        http_port,
        200,
        extra,
        aggregations,
    )
}

/// `(partition, key, value)`: `n` records over `keys` keys and 2
/// partitions; the values of records whose index `poison` picks are not
/// JSON, so `stats` rejects them.
fn events(n: usize, keys: usize, poison: impl Fn(usize) -> bool) -> Vec<(i32, String, String)> {
    (0..n)
        .map(|i| {
            let k = (i * 7) % keys;
            let value = if poison(i) {
                "bad".to_owned()
            } else {
                json!({ "amount": (i % 100) as f64 / 2.0 }).to_string()
            };
            ((k % 2) as i32, format!("k{k:03}"), value)
        })
        .collect()
}

fn amount(value: &str) -> Option<f64> {
    serde_json::from_str::<Value>(value)
        .ok()
        .and_then(|v| v["amount"].as_f64())
}

fn assert_exact(wagg: &Wagg, data: &[(i32, String, String)]) {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut amounts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (_, key, value) in data {
        *counts.entry(key).or_default() += 1;
        if let Some(x) = amount(value) {
            amounts.entry(key).or_default().push(x);
        }
    }
    let got = wagg.all_states("count");
    assert_eq!(got.len(), counts.len(), "count: number of keys");
    for (key, n) in counts {
        assert_eq!(got.get(key), Some(&json!({ "count": n })), "count of {key}");
    }
    let got = wagg.all_states("stats");
    for (key, xs) in amounts {
        let want = stats_json(&xs);
        let have = got.get(key).unwrap_or(&Value::Null);
        assert!(
            json_approx_eq(have, &want),
            "stats of {key}: {have} != {want}"
        );
    }
}

/// `wagg run` with `aggregations` and `[dead_letter]` on topic
/// `dead-letters`.
fn start_dead_lettering(
    broker: &Broker,
    dir: &tempfile::TempDir,
    port: u16,
    aggregations: &str,
) -> Wagg {
    let extra = "[dead_letter]\ntopic = \"dead-letters\"\n";
    Wagg::start(dir.path(), &config(broker, port, extra, aggregations), port)
}

/// One dead letter as the test reads it back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Letter {
    aggregation: String,
    source_partition: i32,
    source_offset: i64,
    key: String,
    value: String,
    error: String,
    plugin: String,
    timestamp: Option<i64>,
    /// Every header, `wagg.*` included.
    headers: BTreeMap<String, String>,
}

/// Reads `want` dead letters (or fails after 30 s).
fn read_dead_letters(broker: &Broker, topic: &str, want: usize) -> Vec<Letter> {
    let started = Instant::now();
    let records = loop {
        let records = broker.read_all(topic, 1);
        if records.len() >= want {
            break records;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} of {want} dead letters arrived",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    records
        .into_iter()
        .map(|record| {
            let header = |name: &str| record.headers.get(name).cloned().unwrap_or_default();
            assert_eq!(header("wagg.source.topic"), "events");
            Letter {
                aggregation: header("wagg.aggregation"),
                source_partition: header("wagg.source.partition").parse().unwrap_or(-1),
                source_offset: header("wagg.source.offset").parse().unwrap_or(-1),
                key: String::from_utf8_lossy(&record.key).into_owned(),
                value: String::from_utf8_lossy(&record.value.clone().unwrap_or_default())
                    .into_owned(),
                error: header("wagg.error"),
                plugin: format!(
                    "{} {}",
                    header("wagg.plugin"),
                    header("wagg.plugin.version")
                ),
                timestamp: record.timestamp,
                headers: record.headers.clone(),
            }
        })
        .collect()
}

/// Where each produced record landed: `(partition, offset)` by index,
/// counting per partition as the broker assigns offsets.
fn positions(data: &[(i32, String, String)]) -> Vec<(i32, i64)> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    data.iter()
        .map(|(p, _, _)| {
            let offset = next.entry(*p).or_default();
            *offset += 1;
            (*p, *offset - 1)
        })
        .collect()
}

#[test]
fn poison_records_go_to_the_dead_letter_topic_and_the_rest_is_applied_once() {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    broker.create_topic("dead-letters", 1);
    let poison = |i: usize| i % 97 == 13;
    let data = events(3000, 40, poison);
    broker.produce("events", &data);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // Beside the well-behaved plugins: one that panics and one that
    // allocates without bound on the poison records.
    let aggregations = format!(
        "{}\n[[aggregation]]\nname = \"trap\"\nplugin = {:?}\nparams = {{ mode = \"panic\" }}\n\n[[aggregation]]\nname = \"hog\"\nplugin = {:?}\nparams = {{ mode = \"alloc\" }}\n\n[[aggregation]]\nname = \"skipper\"\nplugin = {:?}\nparams = {{ field = \"/amount\" }}\non_error = \"skip\"\n",
        common::count_and_stats_toml(),
        plugin("hostile"),
        plugin("hostile"),
        plugin("stats")
    );
    let wagg = start_dead_lettering(&broker, &dir, port, &aggregations);
    let bad: Vec<usize> = (0..data.len()).filter(|&i| poison(i)).collect();
    let total = data.len() as u64;
    let good = total - bad.len() as u64;
    wagg.wait_for(
        &[
            ("count".to_owned(), total),
            ("stats".to_owned(), good),
            ("trap".to_owned(), good),
            ("hog".to_owned(), good),
            ("skipper".to_owned(), good),
        ]
        .into(),
        CATCH_UP,
    );
    assert_exact(&wagg, &data);
    // The trapping plugin's state counts exactly the records it did not
    // trap on: each trap was isolated to its record.
    let mut trap_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, key, value) in &data {
        if value != "bad" {
            *trap_counts.entry(key).or_default() += 1;
        }
    }
    for name in ["trap", "hog"] {
        for (key, state) in wagg.all_states(name) {
            assert_eq!(
                state["count"],
                json!(trap_counts[key.as_str()]),
                "{name} {key}"
            );
        }
    }

    let (_, listing) = wagg.get("/v1/aggregations");
    let by_name: BTreeMap<String, Value> = listing["aggregations"]
        .as_array()
        .expect("list")
        .iter()
        .map(|a| (a["name"].as_str().unwrap_or_default().to_owned(), a.clone()))
        .collect();
    for name in ["stats", "trap", "hog"] {
        assert_eq!(by_name[name]["on_error"], "dead-letter");
        assert_eq!(by_name[name]["records_failed"], json!(bad.len()));
        assert_eq!(by_name[name]["records_dead_lettered"], json!(bad.len()));
    }
    assert_eq!(by_name["count"]["records_failed"], json!(0));
    assert_eq!(by_name["skipper"]["on_error"], "skip");
    assert_eq!(by_name["skipper"]["records_failed"], json!(bad.len()));
    assert_eq!(by_name["skipper"]["records_dead_lettered"], json!(0));
    assert_eq!(wagg.all_states("skipper"), wagg.all_states("stats"));

    let letters = read_dead_letters(&broker, "dead-letters", 3 * bad.len());
    let at = positions(&data);
    let mut want: BTreeSet<(String, i32, i64, String)> = BTreeSet::new();
    for &i in &bad {
        for aggregation in ["stats", "trap", "hog"] {
            want.insert((aggregation.to_owned(), at[i].0, at[i].1, data[i].1.clone()));
        }
    }
    let got: BTreeSet<(String, i32, i64, String)> = letters
        .iter()
        .map(|l| {
            (
                l.aggregation.clone(),
                l.source_partition,
                l.source_offset,
                l.key.clone(),
            )
        })
        .collect();
    assert_eq!(got, want, "dead letters name each rejected record once");
    assert_eq!(letters.len(), want.len(), "no duplicates without a crash");
    for letter in &letters {
        assert_eq!(letter.value, "bad", "{letter:?}");
        match letter.aggregation.as_str() {
            "stats" => {
                assert!(letter.plugin.starts_with("stats "), "{letter:?}");
                assert!(!letter.error.is_empty(), "{letter:?}");
            }
            "trap" => {
                assert!(letter.plugin.starts_with("hostile "), "{letter:?}");
                assert!(letter.error.contains("panicked"), "{letter:?}");
            }
            _ => {
                assert!(letter.plugin.starts_with("hostile "), "{letter:?}");
                assert!(letter.error.contains("memory"), "{letter:?}");
            }
        }
    }
    let (code, ready) = wagg.get("/readyz");
    assert_eq!(code, 200, "{ready}");
}

#[test]
fn a_dead_letter_keeps_the_records_headers_and_timestamp_and_an_oversize_one_is_cut_to_fit() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let broker = Broker::start();
    broker.create_topic("events", 1);
    broker.create_topic("dead-letters", 1);
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer");
    let big = format!("not json {}", "x".repeat(1_500_000));
    let records = [
        ("k-small", "not json".to_owned(), 1_600_000_000_123_i64),
        ("k-big", big.clone(), 1_600_000_000_456),
        (
            "k-good",
            json!({ "amount": 2.5 }).to_string(),
            1_600_000_000_789,
        ),
    ];
    for (key, value, timestamp) in &records {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "trace-id",
                value: Some(&format!("trace-{key}")),
            })
            .insert(Header {
                key: "empty",
                value: None::<&str>,
            });
        producer
            .send(
                BaseRecord::to("events")
                    .partition(0)
                    .key(*key)
                    .payload(value)
                    .timestamp(*timestamp)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let aggregations = format!(
        "[[aggregation]]\nname = \"stats\"\nplugin = {:?}\nparams = {{ field = \"/amount\" }}\n",
        plugin("stats")
    );
    let wagg = start_dead_lettering(&broker, &dir, port, &aggregations);
    wagg.wait_for(&[("stats".to_owned(), 1)].into(), CATCH_UP);
    let mut letters = read_dead_letters(&broker, "dead-letters", 2);
    letters.sort_by_key(|l| l.source_offset);
    for (letter, (key, value, timestamp)) in letters.iter().zip(&records) {
        assert_eq!(letter.key, *key);
        assert_eq!(
            letter.timestamp,
            Some(*timestamp),
            "{key}: timestamp carried over"
        );
        assert_eq!(
            letter.headers.get("trace-id").map(String::as_str),
            Some(format!("trace-{key}").as_str()),
            "{key}: the record's headers carried over"
        );
        assert!(
            letter.headers.contains_key("empty"),
            "{key}: a null header too"
        );
        if *key == "k-small" {
            assert_eq!(letter.value, *value);
            assert!(!letter.headers.contains_key("wagg.truncated"));
        }
    }
    // The big one did not fit the producer's `message.max.bytes` (1 MB by
    // default): cut, and saying so, rather than stopping consumption.
    let cut = &letters[1];
    assert_eq!(
        cut.headers.get("wagg.truncated").map(String::as_str),
        Some(big.len().to_string().as_str())
    );
    assert!(
        cut.value.len() < 1_000_000 && cut.value.len() > 500_000,
        "{}",
        cut.value.len()
    );
    assert!(big.starts_with(&cut.value));
    let (code, ready) = wagg.get("/readyz");
    assert_eq!(code, 200, "{ready}");
}

#[test]
fn on_error_fail_stops_before_the_bad_record_and_says_where() {
    let broker = Broker::start();
    broker.create_topic("events", 1);
    broker.create_topic("dead-letters", 1);
    // One partition: records 0..500 are good, 500 is bad, then 500 more.
    let data: Vec<(i32, String, String)> = events(1001, 10, |i| i == 500)
        .into_iter()
        .map(|(_, k, v)| (0, k, v))
        .collect();
    broker.produce("events", &data);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // `stats` stops on the bad record; `count` accepts it; `stats_dl` sends
    // it to the dead-letter topic before the stop. Whatever each did with
    // the failing batch, none of it may be written.
    let aggregations = format!(
        "{}on_error = \"fail\"\n\n[[aggregation]]\nname = \"stats_dl\"\nplugin = {:?}\nparams = {{ field = \"/amount\" }}\non_error = \"dead-letter\"\n",
        common::count_and_stats_toml(),
        plugin("stats")
    );
    let wagg = start_dead_lettering(&broker, &dir, port, &aggregations);
    let started = Instant::now();
    let reasons = loop {
        let (code, body) = wagg.get("/readyz");
        if code == 503 && body["reasons"].to_string().contains("rejected") {
            break body["reasons"].to_string();
        }
        assert!(started.elapsed() < CATCH_UP, "never stopped: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reasons.contains("events/0@500"), "{reasons}");
    assert!(
        wagg.log().contains("events/0@500"),
        "the log names the record"
    );
    std::thread::sleep(Duration::from_millis(500));
    // Where it stopped: the start of the batch holding the bad record,
    // which is at most the bad record's offset.
    let (_, listing) = wagg.get("/v1/aggregations");
    let aggregations = listing["aggregations"].as_array().expect("list");
    let next = aggregations[0]["partitions"][0]["next_offset"]
        .as_i64()
        .unwrap_or(0) as usize;
    assert!(next <= 500, "offset {next} moved past the bad record");
    // Every aggregation holds exactly the records before it: no part of the
    // failing batch, whatever the aggregation's own policy did with it.
    for aggregation in aggregations {
        assert_eq!(
            aggregation["records_applied"].as_u64(),
            Some(next as u64),
            "{}: records applied vs the stored offset {next}",
            aggregation["name"]
        );
        assert_eq!(
            aggregation["records_failed"].as_u64(),
            Some(0),
            "{aggregation}"
        );
    }
    assert_exact(&wagg, &data[..next]);
    let dl: BTreeMap<String, Value> = wagg.all_states("stats_dl");
    assert_eq!(
        dl,
        wagg.all_states("stats"),
        "stats_dl == stats before the stop"
    );
    // Still serving what it has.
    let (code, _) = wagg.get("/v1/aggregations/stats/keys?limit=1");
    assert_eq!(code, 200);
}

fn wait_for_readiness(wagg: &Wagg, ready: bool, reason: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (code, body) = wagg.get("/readyz");
        let matches = if ready {
            code == 200
        } else {
            code == 503 && body["reasons"].to_string().contains(reason)
        };
        if matches {
            return body;
        }
        assert!(
            started.elapsed() < within,
            "/readyz never became {} ({reason}): {body}",
            if ready { "ready" } else { "unready" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_broker_outage_is_reported_and_survived_exactly() {
    let mut broker = Broker::start();
    broker.create_topic("events", 2);
    let mut data = events(20_000, 200, |_| false);
    broker.produce("events", &data);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // A credential in the passthrough section must never be logged, not
    // even while the client reports errors during the outage.
    let secret = "s3cret-that-must-never-be-logged";
    let wagg = Wagg::start(
        dir.path(),
        &config(
            &broker,
            port,
            &format!("[source.kafka]\n\"sasl.password\" = \"{secret}\"\n"),
            &common::count_and_stats_toml(),
        ),
        port,
    );
    wagg.wait_for(
        &common::count_and_stats_applied(data.len() as u64),
        CATCH_UP,
    );
    wait_for_readiness(&wagg, true, "", Duration::from_secs(30));

    broker.stop();
    let down = Instant::now();
    let logged_before = wagg.log().lines().count();
    let report = wait_for_readiness(&wagg, false, "broker", Duration::from_secs(15));
    eprintln!("during the outage /readyz says {report}");
    // Queries keep being answered from the state store.
    let (code, _) = wagg.get("/v1/aggregations/count/keys/k007");
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_secs(12).saturating_sub(down.elapsed()));
    wait_for_readiness(&wagg, false, "broker", Duration::from_secs(1));
    // Every client says the broker is down, many times a second: alike
    // lines are logged once per 10 s, with how many were left out.
    let outage_lines: Vec<String> = wagg
        .log()
        .lines()
        .skip(logged_before)
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .map(str::to_owned)
        .collect();
    assert!(
        outage_lines.len() <= 40,
        "{} warnings in {:?} of outage:\n{}",
        outage_lines.len(),
        down.elapsed(),
        outage_lines.join("\n")
    );
    eprintln!(
        "{} warning lines in {:?} of outage",
        outage_lines.len(),
        down.elapsed()
    );
    broker.restart();
    eprintln!("broker down for {:?}", down.elapsed());

    let more: Vec<(i32, String, String)> = events(40_000, 200, |_| false).split_off(20_000);
    broker.produce("events", &more);
    data.extend(more);
    wagg.wait_for(
        &common::count_and_stats_applied(data.len() as u64),
        CATCH_UP,
    );
    assert_exact(&wagg, &data);
    wait_for_readiness(&wagg, true, "", Duration::from_secs(30));
    let log = wagg.log();
    assert!(log.contains("broker"), "the outage is in the log");
    assert!(!log.contains(secret), "the log leaked a credential");
}

#[test]
fn a_full_disk_stops_consumption_without_partial_state_and_a_restart_is_exact() {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    let mut data = events(5_000, 500, |_| false);
    broker.produce("events", &data);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // A write per batch, so the write-ahead log grows steadily.
    let config = config(
        &broker,
        port,
        "commit_interval_ms = 0\n",
        &common::count_and_stats_toml(),
    );
    let mut wagg = Wagg::start(dir.path(), &config, port);
    wagg.wait_for(
        &common::count_and_stats_applied(data.len() as u64),
        CATCH_UP,
    );

    // A second process on the same state directory is refused.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(["run", "--config"])
        .arg(dir.path().join("wagg.toml"))
        .output()
        .expect("run a second wagg");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        stderr.contains("in use by another wagg process"),
        "{stderr}"
    );
    assert!(wagg.terminate().success());

    // Restart where no file may grow past 1 MiB: RocksDB's write-ahead log
    // hits the limit after a few batches, as on a full disk.
    let more: Vec<(i32, String, String)> = events(60_000, 500, |_| false).split_off(5_000);
    broker.produce("events", &more);
    let mut wagg = Wagg::start_with_file_size_limit(dir.path(), &config, port, 1 << 20);
    let report = wait_for_readiness(&wagg, false, "writing state", CATCH_UP);
    eprintln!("with a full disk /readyz says {report}");
    let (code, health) = wagg.get("/healthz");
    assert_eq!(
        (code, health["status"].as_str()),
        (503, Some("failed")),
        "{health}"
    );
    // Stopped: nothing moves any more, and what is there is still served.
    let before = wagg.applied();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(wagg.applied(), before);
    assert!(before["count"] < (data.len() + more.len()) as u64);
    let (code, _) = wagg.get("/v1/aggregations/count/keys/k007");
    assert_eq!(code, 200);
    let stopped = Instant::now();
    let status = wagg.terminate();
    assert!(!status.success(), "a stopped consumer exits non-zero");
    assert!(stopped.elapsed() < Duration::from_secs(10));

    // Space is back: the restart resumes from the last complete batch.
    data.extend(more);
    let wagg = Wagg::start(dir.path(), &config, port);
    wagg.wait_for(
        &common::count_and_stats_applied(data.len() as u64),
        CATCH_UP,
    );
    assert_exact(&wagg, &data);
}

#[test]
fn shutdown_finishes_within_the_deadline_even_with_the_broker_gone() {
    let mut broker = Broker::start();
    broker.create_topic("events", 2);
    let data = events(10_000, 100, |_| false);
    broker.produce("events", &data);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = config(
        &broker,
        port,
        "[shutdown]\ndeadline_ms = 3000\n",
        &common::count_and_stats_toml(),
    );
    let applied = common::count_and_stats_applied(data.len() as u64);

    // With the broker up: SIGTERM mid-ingest exits 0 well within it.
    let mut wagg = Wagg::start(dir.path(), &config, port);
    let asked = Instant::now();
    let status = wagg.terminate();
    eprintln!("SIGTERM → exit {status} in {:?}", asked.elapsed());
    assert!(status.success());
    assert!(asked.elapsed() < Duration::from_secs(3));

    let mut wagg = Wagg::start(dir.path(), &config, port);
    wagg.wait_for(&applied, CATCH_UP);
    broker.stop();
    wait_for_readiness(&wagg, false, "broker", Duration::from_secs(15));
    let asked = Instant::now();
    let status = wagg.terminate();
    eprintln!(
        "broker down: SIGTERM → exit {status} in {:?}",
        asked.elapsed()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "deadline not enforced"
    );
    broker.restart();
    let wagg = Wagg::start(dir.path(), &config, port);
    wagg.wait_for(&applied, CATCH_UP);
    assert_exact(&wagg, &data);
    drop(wagg);

    // A plugin call that will not end before the deadline (a loop with a
    // one-minute budget): the deadline ends the process, with status 1.
    broker.produce("events", &[(0, "k000".into(), "bad".into())]);
    let stuck_dir = tempfile::tempdir().expect("tempdir");
    let stuck = format!(
        "[plugins]\ncall_timeout_ms = 60000\n[shutdown]\ndeadline_ms = 3000\n[[aggregation]]\nname = \"stuck\"\nplugin = {:?}\nparams = {{ mode = \"loop\" }}\n",
        plugin("hostile")
    );
    // Its own group: tansu would keep the killed member above in the old one.
    // Every batch written at once, so progress shows until the stuck call.
    let stuck = self::config(&broker, port, "commit_interval_ms = 0\n", &stuck)
        .replace("wagg-faults", "wagg-stuck");
    let mut wagg = Wagg::start(stuck_dir.path(), &stuck, port);
    let started = Instant::now();
    let mut last = (0, Instant::now());
    // Stuck: some records applied, then no progress for 1.5 s.
    loop {
        let applied = wagg.applied()["stuck"];
        if applied != last.0 {
            last = (applied, Instant::now());
        } else if applied > 0 && last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "never got stuck on the looping record"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let status = wagg.terminate();
    let took = asked.elapsed();
    eprintln!("stuck plugin: SIGTERM → exit {status} in {took:?}");
    assert_eq!(status.code(), Some(1), "log:\n{}", wagg.log());
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "{took:?}; log:\n{}",
        wagg.log()
    );
    assert!(wagg.log().contains("shutdown deadline passed"));
}

/// A windowed aggregation on the Kafka record timestamp (no `time`), with
/// `on_error = "dead-letter"`: records that come after their window closed
/// are counted as late, not applied, and sent to the dead-letter topic
/// with `wagg.error` saying "late"; the others are in their windows.
#[test]
fn late_records_of_a_windowed_aggregation_go_to_the_dead_letter_topic() {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let broker = Broker::start();
    broker.create_topic("events", 1);
    broker.create_topic("dead-letters", 1);
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()
        .expect("producer");
    let minute = 60_000i64;
    let t = 1_600_000_000_000 - 1_600_000_000_000 % minute;
    // (key, timestamp, late?): stream time reaches t + 61 s with the
    // second record, which closes the window [t, t + 1 min) (no grace).
    let records = [
        ("k-a", t, false),
        ("k-a", t + 61_000, false),
        ("k-a", t + 1_000, true),
        ("k-b", t + 30_000, true),
        ("k-b", t + 90_000, false),
    ];
    for (key, timestamp, _) in &records {
        producer
            .send(
                BaseRecord::to("events")
                    .partition(0)
                    .key(*key)
                    .payload("{}")
                    .timestamp(*timestamp),
            )
            .map_err(|(e, _)| e)
            .expect("produce");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let aggregations = format!(
        "[[aggregation]]\nname = \"per_minute\"\nplugin = {:?}\nwindow = {{ kind = \"tumbling\", size = \"1m\" }}\n",
        plugin("count")
    );
    let wagg = start_dead_lettering(&broker, &dir, port, &aggregations);
    wagg.wait_for(&[("per_minute".to_owned(), 3)].into(), CATCH_UP);
    let mut letters = read_dead_letters(&broker, "dead-letters", 2);
    letters.sort_by_key(|l| l.source_offset);
    let late: Vec<(i64, String)> = letters
        .iter()
        .map(|l| (l.source_offset, l.key.clone()))
        .collect();
    assert_eq!(late, vec![(2, "k-a".to_owned()), (3, "k-b".to_owned())]);
    for letter in &letters {
        assert!(letter.error.starts_with("late"), "{letter:?}");
        assert_eq!(letter.aggregation, "per_minute");
    }
    let (_, body) = wagg.get("/v1/aggregations");
    let info = &body["aggregations"][0];
    assert_eq!(info["records_late"], json!(2));
    assert_eq!(info["records_dead_lettered"], json!(2));
    assert_eq!(info["records_failed"], json!(0));
    assert_eq!(info["partitions"][0]["stream_time"], json!(t + 90_000));
    let windows = |key: &str| {
        let (status, answer) = wagg.get(&format!("/v1/aggregations/per_minute/keys/{key}"));
        assert_eq!(status, 200, "{answer}");
        answer["windows"]
            .as_array()
            .expect("windows")
            .iter()
            .map(|w| {
                (
                    w["start"].as_i64().unwrap(),
                    w["state"]["count"].as_u64().unwrap(),
                    w["closed"].as_bool().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(windows("k-a"), vec![(t, 1, true), (t + minute, 1, false)]);
    assert_eq!(windows("k-b"), vec![(t + minute, 1, false)]);
}

/// No broker reachable from the start: every client says so many times a
/// second (160 warning lines in 8 s before alike lines were limited);
/// alike lines are logged once per 10 s, and `/readyz` says why.
#[test]
fn an_unreachable_broker_is_reported_in_a_few_log_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let nobody = format!("127.0.0.1:{}", free_port());
    let wagg = Wagg::start(
        dir.path(),
        &common::single_instance_toml(&nobody, "flood", port, 100, "", &common::count_toml()),
        port,
    );
    let started = Instant::now();
    wait_for_readiness(&wagg, false, "broker", Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(8).saturating_sub(started.elapsed()));
    let log = wagg.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(
        warnings.len() <= 20,
        "{} warning lines in {:?}:\n{}",
        warnings.len(),
        started.elapsed(),
        warnings.join("\n")
    );
    eprintln!(
        "{} warning lines in {:?} without a broker",
        warnings.len(),
        started.elapsed()
    );
}
