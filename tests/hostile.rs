//! Hostile or careless input on one instance, end to end against the real
//! broker and binary: records a producer can send that rdkafka's safe API
//! cannot read, and internal threads that die.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::broker::{Broker, free_port};
use common::wagg_process::Wagg;
use common::{count_and_stats_applied, count_and_stats_toml, json_approx_eq, plugin, stats_json};
use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::json;

const CATCH_UP: Duration = Duration::from_secs(120);
/// A header name no `&str` can hold.
const POISON_NAME: &[u8] = b"bad-\xff\xfe-name";

fn config(broker: &Broker, http_port: u16, aggregations: &str) -> String {
    common::single_instance_toml(
        &broker.address,
        "wagg-hostile",
        http_port,
        100,
        "",
        aggregations,
    )
}

/// `(partition, key, value)` records with amounts.
fn events(range: std::ops::Range<usize>) -> Vec<(i32, String, String)> {
    range
        .map(|i| {
            let k = (i * 7) % 30;
            let value = json!({ "amount": (i % 50) as f64 }).to_string();
            ((k % 2) as i32, format!("k{k:02}"), value)
        })
        .collect()
}

/// Headers with a valid one and one whose name is not UTF-8. rdkafka's
/// safe API takes names as `&str`, so the second goes through librdkafka's
/// C API, which takes a name with a length: any bytes, as any producer in
/// any language can send.
fn poison_headers() -> OwnedHeaders {
    let headers = OwnedHeaders::new().insert(Header {
        key: "fine",
        value: Some("yes"),
    });
    let raw = headers.as_borrowed() as *const BorrowedHeaders as *mut rd::rd_kafka_headers_t;
    let value = b"v";
    // SAFETY: `raw` is the live header list `headers` owns (rdkafka's own
    // `as_borrowed` makes the same cast); librdkafka copies name and value.
    let err = unsafe {
        rd::rd_kafka_header_add(
            raw,
            POISON_NAME.as_ptr().cast(),
            POISON_NAME.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}

fn produce_poison(broker: &Broker, partition: i32, key: &str, value: &str) {
    let producer = broker.producer();
    producer
        .send(
            BaseRecord::to("events")
                .partition(partition)
                .key(key)
                .payload(value)
                .headers(poison_headers()),
        )
        .map_err(|(e, _)| e)
        .expect("produce the poison record");
    producer.flush(Duration::from_secs(30)).expect("flush");
}

fn assert_exact(wagg: &Wagg, data: &[(i32, String, String)]) {
    let mut amounts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (_, key, value) in data {
        let value: serde_json::Value = serde_json::from_str(value).expect("json");
        amounts
            .entry(key)
            .or_default()
            .push(value["amount"].as_f64().expect("amount"));
    }
    let counts = wagg.all_states("count");
    let stats = wagg.all_states("stats");
    assert_eq!(counts.len(), amounts.len());
    for (key, xs) in &amounts {
        assert_eq!(counts[*key], json!({ "count": xs.len() }), "count of {key}");
        assert!(
            json_approx_eq(&stats[*key], &stats_json(xs)),
            "stats of {key}: {} != {}",
            stats[*key],
            stats_json(xs)
        );
    }
}

#[test]
fn a_header_name_that_is_not_utf8_is_read_lossily_and_consumption_goes_on() {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    let mut data = events(0..1500);
    broker.produce("events", &data);
    let poison_value = json!({ "amount": 7.0 }).to_string();
    produce_poison(&broker, 1, "k-poison", &poison_value);
    data.push((1, "k-poison".to_owned(), poison_value));
    let after = events(1500..3000);
    broker.produce("events", &after);
    data.extend(after);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let aggregations = format!(
        "{}\n[[aggregation]]\nname = \"headers\"\nplugin = {:?}\nparams = {{ mode = \"headers\" }}\n",
        count_and_stats_toml(),
        plugin("hostile")
    );
    let config = config(&broker, port, &aggregations);
    let total = data.len() as u64;
    let mut expected = count_and_stats_applied(total);
    expected.insert("headers".to_owned(), total);

    let mut wagg = Wagg::start(dir.path(), &config, port);
    wagg.wait_for(&expected, CATCH_UP);
    assert_exact(&wagg, &data);
    // The plugin saw both names; the bad bytes as U+FFFD.
    let (status, body) = wagg.get("/v1/aggregations/headers/keys/k-poison");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["state"]["names"],
        json!(["fine", String::from_utf8_lossy(POISON_NAME)]),
        "{body}"
    );

    // A restart resumes after the record instead of tripping on it again.
    assert!(
        wagg.terminate().success(),
        "clean stop; log:\n{}",
        wagg.log()
    );
    let wagg = Wagg::start(dir.path(), &config, port);
    let (_, health) = wagg.get("/healthz");
    assert_eq!(health["status"], "ok", "{health}");
    wagg.wait_for(&expected, CATCH_UP);
    assert_exact(&wagg, &data);
}

/// Starts wagg with `WAGG_FAULT_PANIC=<thread>` and returns it with how it
/// exited (or `None` if it was still running after `timeout`).
fn run_until_thread_dies(thread: &str) -> (Wagg, Option<std::process::ExitStatus>) {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    broker.produce("events", &events(0..500));
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let port = free_port();
    let mut wagg = Wagg::start_with_env(
        &dir,
        &config(&broker, port, &count_and_stats_toml()),
        port,
        &[("WAGG_FAULT_PANIC", thread)],
    );
    let exited = wagg.wait_exit(Duration::from_secs(30));
    (wagg, exited)
}

#[test]
fn a_dead_internal_thread_stops_the_process_with_an_error() {
    for thread in ["wagg-source", "wagg-writer"] {
        let (wagg, exited) = run_until_thread_dies(thread);
        let log = wagg.log();
        let status = exited.unwrap_or_else(|| {
            panic!("{thread} died but wagg kept running (a silent stall); log:\n{log}")
        });
        assert!(!status.success(), "{thread}: exit status {status}");
        assert!(
            log.contains(&format!("thread {thread} panicked")),
            "{thread}: the reason is not logged:\n{log}"
        );
        let _ = std::fs::remove_dir_all(&wagg.dir);
    }
}

#[test]
fn a_stored_offset_the_broker_no_longer_has_stops_consumption_instead_of_skipping() {
    let broker = Broker::start();
    broker.create_topic("events", 2);
    let data = events(0..600);
    broker.produce("events", &data);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = config(&broker, port, &count_and_stats_toml()).replace(
        "topics = [\"events\"]",
        "topics = [\"events\"]\nstart_from = \"latest\"",
    );
    let old_address = broker.address.clone();
    // `latest` applies to partitions with no stored offset: a first start
    // reads nothing, so the records come after it.
    let mut wagg = Wagg::start(dir.path(), &config, port);
    std::thread::sleep(Duration::from_secs(5));
    let mut more = events(600..1200);
    broker.produce("events", &more);
    wagg.wait_for(&count_and_stats_applied(600), CATCH_UP);
    let before = wagg.all_states("count");
    assert!(wagg.terminate().success(), "log:\n{}", wagg.log());

    // The topic is re-created (here: on a new broker, as after a cluster
    // migration) with fewer records than the stored offsets.
    drop(broker);
    let broker = Broker::start();
    broker.create_topic("events", 2);
    more.truncate(100);
    broker.produce("events", &more);
    let config = config.replace(&old_address, &broker.address);

    let wagg = Wagg::start(dir.path(), &config, port);
    let started = std::time::Instant::now();
    let reason = loop {
        let (status, health) = wagg.get("/healthz");
        if status == 503 {
            break health["reason"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no failure reported; log:\n{}",
            wagg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(reason.contains("stored next offset"), "{reason}");
    assert!(reason.contains("events/"), "{reason}");
    // Nothing was skipped or applied twice: the states are as they were.
    assert_eq!(wagg.all_states("count"), before);
}

#[test]
fn an_instance_that_owns_nothing_says_so_on_readyz_and_rejoins() {
    // Two instances in one group, one partition: one of them owns nothing.
    // It must not call itself ready (a load balancer would send it queries
    // it cannot answer), and must keep re-joining: a member that died
    // without leaving may hold the partition (Apache Kafka expires it after
    // `session.timeout.ms`; some brokers never do).
    let broker = Broker::start();
    broker.create_topic("events", 1);
    let mut data: Vec<_> = events(0..300)
        .into_iter()
        .map(|(_, k, v)| (0, k, v))
        .collect();
    broker.produce("events", &data);
    let session = "[source.kafka]\n\"session.timeout.ms\" = 6000\n";
    let start = |dir: &std::path::Path| {
        let port = free_port();
        let config = config(
            &broker,
            port,
            &format!("{session}{}", count_and_stats_toml()),
        );
        Wagg::start(dir, &config, port)
    };
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = start(dir_a.path());
    a.wait_for(&count_and_stats_applied(300), CATCH_UP);
    let b = start(dir_b.path());
    // Whichever owns the partition after the rebalance, the other is idle.
    let started = std::time::Instant::now();
    let (mut owner, idle) = loop {
        let ready = |w: &Wagg| w.get("/readyz");
        let ((status_a, body_a), (status_b, body_b)) = (ready(&a), ready(&b));
        if status_b == 503 && body_b["reasons"].to_string().contains("owns none") {
            break (a, b);
        }
        if status_a == 503 && body_a["reasons"].to_string().contains("owns none") {
            break (b, a);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no idle instance reported it: {body_a} / {body_b}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // The owner dies; the idle one ends up with the partition and reads it
    // whole (its own store has no offsets for it yet).
    owner.kill();
    let more: Vec<_> = events(300..600)
        .into_iter()
        .map(|(_, k, v)| (0, k, v))
        .collect();
    broker.produce("events", &more);
    data.extend(more);
    idle.wait_for(&count_and_stats_applied(600), CATCH_UP);
    assert_exact(&idle, &data);
    let (status, readiness) = idle.get("/readyz");
    assert_eq!(status, 200, "{readiness}; log:\n{}", idle.log());
}
