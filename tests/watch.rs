//! Live subscriptions (server-sent events) against the real binary and
//! broker: a key's watch and a prefix's change stream see every flush that
//! changed their keys, in order, each event equal to the truth as of the
//! flush its `id` names, ending in the exact final state (or `event:
//! delete`); a subscriber that stops reading is cut with `event: lagged`
//! without holding ingestion back; 1,000 watchers on the demo.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::broker::{Broker, free_port};
use common::wagg_process::Wagg;
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{Value, json};

const PARTITIONS: i32 = 2;
const KEYS: usize = 50;
const CATCH_UP: Duration = Duration::from_secs(120);
/// Event time of the first record; each next one is half a second later.
const T0: i64 = 1_767_225_600_000;

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    /// `event:` (`message` when absent).
    kind: String,
    id: Option<String>,
    data: Value,
}

impl SseEvent {
    /// The (partition, next offset) of `id: events/P@N`.
    fn flush(&self) -> (i32, i64) {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("no id: {self:?}"));
        let (source, next) = id.split_once('@').expect("partition@offset");
        let partition = source
            .strip_prefix("events/")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("id {id:?}"));
        (partition, next.parse().expect("an offset"))
    }
}

/// Parses a `text/event-stream` body, handing each event to `each` until
/// it returns false or the stream ends.
fn read_events(reader: impl BufRead, mut each: impl FnMut(SseEvent) -> bool) {
    let (mut kind, mut id, mut data) = (None::<String>, None::<String>, String::new());
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.is_empty() {
            if kind.is_some() || !data.is_empty() {
                let event = SseEvent {
                    kind: kind.take().unwrap_or_else(|| "message".to_owned()),
                    id: id.take(),
                    data: serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data {data:?}: {e}")),
                };
                data.clear();
                if !each(event) {
                    return;
                }
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
    }
}

/// Opens a stream and reads its events on a thread, into the channel.
fn subscribe(base: &str, path: &str) -> mpsc::Receiver<SseEvent> {
    let url = format!("{base}{path}");
    let response = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .expect("client")
        .get(&url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status(), 200, "GET {url}");
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "GET {url}"
    );
    let (events, received) = mpsc::channel();
    std::thread::spawn(move || read_events(BufReader::new(response), |e| events.send(e).is_ok()));
    received
}

/// Every event that arrives until none has for `quiet`.
fn drain(events: &mpsc::Receiver<SseEvent>, quiet: Duration) -> Vec<SseEvent> {
    let mut all = Vec::new();
    while let Ok(event) = events.recv_timeout(quiet) {
        all.push(event);
    }
    all
}

/// A produced record: partition, offset, key, event time (`None`: a
/// tombstone).
#[derive(Debug, Clone)]
struct Sent {
    partition: i32,
    offset: i64,
    key: String,
    ts: Option<i64>,
}

/// `http` holds lines of `[http]`.
fn config(broker: &str, port: u16, http: &str) -> String {
    common::single_instance_toml(
        broker,
        "wagg-watch",
        port,
        100,
        "commit_interval_ms = 100\n",
        &format!(
            r#"
[[aggregation]]
name = "count"
plugin = {count:?}

[[aggregation]]
name = "latest"
plugin = {latest:?}

[[aggregation]]
name = "per_minute"
plugin = {count:?}
time = "/ts"
window = {{ kind = "tumbling", size = "1m" }}
# Tombstones have no event time.
on_error = "skip"
"#,
            count = common::plugin("count"),
            latest = common::plugin("latest")
        ),
    )
    .replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"127.0.0.1:{port}\"\n{http}"),
    )
}

/// Watches opened before the first record: `count`, `latest` and the
/// windowed `per_minute` of one key, and `count`'s changes under a prefix.
/// 3,000 records arrive over ~3 s (a flush every 100 ms), then a tombstone
/// of the watched key. Each event equals the truth as of its flush; the
/// streams end in the final state, a deletion for `latest`.
#[test]
fn watched_keys_see_each_flush_in_order_as_of_its_offset_ending_in_the_final_state() {
    let broker = Broker::start();
    broker.create_topic("events", PARTITIONS as u32);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut wagg = Wagg::start(
        dir.path(),
        &config(&broker.address, port, "max_watchers = 4"),
        port,
    );
    let base = format!("http://127.0.0.1:{port}");
    let watched = "k07";
    let count_watch = subscribe(
        &base,
        &format!("/v1/aggregations/count/keys/{watched}/watch"),
    );
    let latest_watch = subscribe(
        &base,
        &format!("/v1/aggregations/latest/keys/{watched}/watch"),
    );
    let window_watch = subscribe(
        &base,
        &format!("/v1/aggregations/per_minute/keys/{watched}/watch"),
    );
    let changes = subscribe(&base, "/v1/aggregations/count/changes?prefix=k0");
    let (status, refused) = wagg.get("/v1/aggregations/count/changes");
    assert_eq!(
        status, 503,
        "a fifth watch over `http.max_watchers`: {refused}"
    );
    assert_eq!(refused["error"]["code"], "too_many_watchers", "{refused}");

    let mut sent: Vec<Sent> = Vec::new();
    let mut next_offset = [0i64; PARTITIONS as usize];
    let mut record = |key: String, ts: Option<i64>, sent: &mut Vec<Sent>| {
        let k: usize = key[1..].parse().expect("a key number");
        let partition = (k % PARTITIONS as usize) as i32;
        sent.push(Sent {
            partition,
            offset: next_offset[partition as usize],
            key,
            ts,
        });
        next_offset[partition as usize] += 1;
    };
    let mut rng = wagg::tools::rng::Rng(0x5e5e_0001);
    for chunk in 0..40 {
        let mut records = Vec::new();
        for i in 0..75 {
            let key = format!("k{:02}", rng.next_u64() % KEYS as u64);
            let ts = T0 + (chunk * 75 + i) * 500;
            record(key.clone(), Some(ts), &mut sent);
            let last = sent.last().expect("just sent");
            records.push((last.partition, key, json!({ "ts": ts }).to_string()));
        }
        broker.produce("events", &records);
        std::thread::sleep(Duration::from_millis(60));
    }
    record(watched.to_owned(), None, &mut sent);
    let tombstone = sent.last().expect("the tombstone").clone();
    let producer = broker.producer();
    producer
        .send(
            BaseRecord::<str, ()>::to("events")
                .partition(tombstone.partition)
                .key(watched),
        )
        .expect("queue the tombstone");
    producer
        .flush(Duration::from_secs(30))
        .expect("tombstone acknowledged");
    let total = sent.len() as u64;
    wagg.wait_for(
        &BTreeMap::from([
            ("count".to_owned(), total),
            ("latest".to_owned(), total),
            ("per_minute".to_owned(), total - 1),
        ]),
        CATCH_UP,
    );
    let quiet = Duration::from_secs(2);

    // The key's records of its partition before `next`.
    let before = |key: &str, partition: i32, next: i64| -> Vec<&Sent> {
        sent.iter()
            .filter(|r| r.key == key && r.partition == partition && r.offset < next)
            .collect()
    };

    // `count`: absent, then strictly growing counts, each the truth at
    // its flush, ending in the final count.
    let events = drain(&count_watch, quiet);
    assert_eq!(events[0].kind, "absent", "{:?}", events[0]);
    assert_eq!(events[0].data, json!({ "key": watched }));
    let mut last_flush = (0, 0);
    for event in &events[1..] {
        assert_eq!(event.kind, "message", "{event:?}");
        let flush = event.flush();
        assert!(
            flush.1 > last_flush.1,
            "out of order: {event:?} after {last_flush:?}"
        );
        last_flush = flush;
        let want = before(watched, flush.0, flush.1).len();
        assert_eq!(
            event.data,
            json!({ "key": watched, "state": { "count": want } }),
            "{event:?}"
        );
    }
    let (_, answer) = wagg.get(&format!("/v1/aggregations/count/keys/{watched}"));
    let truth = sent.iter().filter(|r| r.key == watched).count();
    assert_eq!(answer["state"]["count"], json!(truth));
    assert_eq!(
        events.last().map(|e| e.data.clone()),
        Some(answer),
        "the last event is the final state"
    );
    assert!(events.len() > 10, "too few flushes seen: {events:?}");

    // `latest`: the last record as of each flush; a deletion at the end.
    let events = drain(&latest_watch, quiet);
    assert_eq!(events[0].kind, "absent");
    for event in &events[1..events.len() - 1] {
        let flush = event.flush();
        let last = *before(watched, flush.0, flush.1).last().expect("a record");
        assert_eq!(
            event.data["state"],
            json!({
                "value": { "ts": last.ts },
                "partition": last.partition,
                "offset": last.offset,
            }),
            "{event:?}"
        );
    }
    let deleted = events.last().expect("events");
    assert_eq!(deleted.kind, "delete", "{deleted:?}");
    assert_eq!(deleted.data, json!({ "key": watched }));
    assert_eq!(deleted.flush(), (tombstone.partition, tombstone.offset + 1));
    let (status, _) = wagg.get(&format!("/v1/aggregations/latest/keys/{watched}"));
    assert_eq!(status, 404);

    // `per_minute`: each event is the changed window as of its flush; the
    // last event of each window is its final state.
    let events = drain(&window_watch, quiet);
    assert_eq!(events[0].kind, "absent");
    let mut last_of_window: BTreeMap<i64, Value> = BTreeMap::new();
    for event in &events[1..] {
        let flush = event.flush();
        let windows = event.data["windows"].as_array().expect("windows");
        assert_eq!(windows.len(), 1, "one changed window per event: {event:?}");
        let window = &windows[0];
        let (start, end) = (
            window["start"].as_i64().expect("start"),
            window["end"].as_i64().expect("end"),
        );
        assert_eq!(end - start, 60_000);
        let want = before(watched, flush.0, flush.1)
            .iter()
            .filter(|r| r.ts.is_some_and(|ts| (start..end).contains(&ts)))
            .count();
        assert_eq!(window["state"], json!({ "count": want }), "{event:?}");
        last_of_window.insert(start, window["state"].clone());
    }
    let (_, answer) = wagg.get(&format!("/v1/aggregations/per_minute/keys/{watched}"));
    let final_windows: BTreeMap<i64, Value> = answer["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| (w["start"].as_i64().expect("start"), w["state"].clone()))
        .collect();
    assert_eq!(last_of_window, final_windows);
    assert!(final_windows.len() >= 3, "{final_windows:?}");

    // `count`'s changes under `k0`: only those keys, each event the truth
    // at its flush, the last of each key its final count.
    let events = drain(&changes, quiet);
    let mut last_of_key: BTreeMap<String, Value> = BTreeMap::new();
    for event in &events {
        assert_eq!(event.kind, "message", "{event:?}");
        let key = event.data["key"].as_str().expect("key").to_owned();
        assert!(key.starts_with("k0"), "{event:?}");
        let flush = event.flush();
        let want = before(&key, flush.0, flush.1).len();
        assert_eq!(event.data["state"], json!({ "count": want }), "{event:?}");
        last_of_key.insert(key, event.data["state"].clone());
    }
    let final_counts: BTreeMap<String, Value> = wagg
        .all_states("count")
        .into_iter()
        .filter(|(key, _)| key.starts_with("k0"))
        .collect();
    assert_eq!(last_of_key, final_counts);
    assert_eq!(final_counts.len(), 10);

    // Shutdown ends every stream, and the process exits cleanly.
    let exit = wagg.terminate();
    assert!(exit.success(), "{exit:?}: {}", wagg.log());
    for stream in [&count_watch, &latest_watch, &window_watch, &changes] {
        assert_eq!(
            stream.recv_timeout(Duration::from_secs(5)).err(),
            Some(mpsc::RecvTimeoutError::Disconnected),
            "a stream still open after shutdown"
        );
    }
    eprintln!(
        "watch: {} changes under k0 checked, {} windows",
        events.len(),
        final_windows.len()
    );
}

/// Two subscribers of every change, one reading, one not: ingestion goes
/// on to the end while the second sleeps (exact states served); the
/// reader sees every key's final state, and the sleeper's stream, once
/// read, ends with `event: lagged` after far fewer changes than were made.
#[test]
fn a_subscriber_that_stops_reading_is_cut_with_lagged_and_does_not_hold_ingestion_back() {
    let broker = Broker::start();
    broker.create_topic("events", PARTITIONS as u32);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let wagg = Wagg::start(
        dir.path(),
        &config(&broker.address, port, "watch_buffer = 16"),
        port,
    );
    let mut sleeper = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        sleeper,
        "GET /v1/aggregations/count/changes HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("request");
    let base = format!("http://127.0.0.1:{port}");
    let reader = subscribe(&base, "/v1/aggregations/count/changes");
    let started = Instant::now();
    while wagg.metrics().get("wagg_watchers") != Some(&2.0) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            wagg.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reads as it goes, so its channel stays short.
    let read = std::thread::spawn(move || drain(&reader, Duration::from_secs(5)));

    // ~60 flushes of ~1,500 changed keys each, ≈ 200 bytes an event: far
    // more than the sleeper's socket buffers hold.
    let keys = 5_000u64;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut rng = wagg::tools::rng::Rng(0x51ee_0001);
    let mut produced = 0u64;
    for _ in 0..120 {
        let records: Vec<(i32, String, String)> = (0..1_000)
            .map(|_| {
                let k = rng.next_u64() % keys;
                let key = format!("key-{k:05}-{}", "x".repeat(100));
                *counts.entry(key.clone()).or_default() += 1;
                ((k % 2) as i32, key, json!({ "ts": T0 }).to_string())
            })
            .collect();
        produced += records.len() as u64;
        broker.produce("events", &records);
        std::thread::sleep(Duration::from_millis(50));
    }
    wagg.wait_for(
        &BTreeMap::from([
            ("count".to_owned(), produced),
            ("latest".to_owned(), produced),
            ("per_minute".to_owned(), produced),
        ]),
        CATCH_UP,
    );
    // Every change applied and served while the sleeper read nothing.
    let served = wagg.all_states("count");
    assert_eq!(served.len(), counts.len());
    for (key, state) in &served {
        assert_eq!(state, &json!({ "count": counts[key] }), "{key}");
    }

    let mut body = Vec::new();
    sleeper
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    sleeper
        .read_to_end(&mut body)
        .expect("the stream ends by itself");
    let text = String::from_utf8_lossy(&body);
    let received = text.matches("\ndata: {\"key\"").count();
    let tail = &text[text.len().saturating_sub(400)..];
    assert!(
        tail.contains("event: lagged"),
        "the stream ended with {tail:?}"
    );

    let events = read.join().expect("reader");
    let mut last_of_key: BTreeMap<String, Value> = BTreeMap::new();
    for event in &events {
        assert_eq!(event.kind, "message", "the reader was cut: {event:?}");
        last_of_key.insert(
            event.data["key"].as_str().expect("key").to_owned(),
            event.data["state"].clone(),
        );
    }
    assert_eq!(last_of_key, served, "the reader's last event of each key");
    assert!(
        received < events.len() / 2,
        "{received} of {} changes were kept for a subscriber that read nothing",
        events.len()
    );
    assert_eq!(wagg.metrics().get("wagg_watch_lagged_total"), Some(&1.0));
    eprintln!(
        "lagged after {received} of {} changes ({} bytes read)",
        events.len(),
        body.len()
    );
}

/// 1,000 watchers (10 on each of 100 keys) on the demo for 10 s: each
/// sees its key's state first, then changes with growing counts; the
/// delivery latency (flush written → event handed to the connection) is
/// read from `wagg_watch_delivery_seconds` and reported.
#[test]
fn a_thousand_watchers_on_the_demo_each_follow_their_key() {
    const WATCHERS: usize = 1_000;
    let demo = common::demo::Demo::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let seen: Vec<(usize, Vec<u64>)> = runtime.block_on(async {
        let client = reqwest::Client::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(15);
        let watchers: Vec<_> = (0..WATCHERS)
            .map(|i| {
                let url = format!(
                    "{}/v1/aggregations/purchases_per_user/keys/user-{:04}/watch",
                    demo.base,
                    i % 100 + 1
                );
                let client = client.clone();
                tokio::spawn(async move { follow(&client, &url, until).await })
            })
            .collect();
        let mut seen = Vec::new();
        for watcher in watchers {
            seen.push(watcher.await.expect("a watcher task"));
        }
        seen
    });
    let mut changes = 0;
    for (i, (first, counts)) in seen.iter().enumerate() {
        assert_eq!(*first, 1, "watcher {i}: no first state");
        assert!(!counts.is_empty(), "watcher {i} saw no change in 10 s");
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "watcher {i}: counts not growing: {counts:?}"
        );
        changes += counts.len();
    }
    let metrics = demo_metrics(&demo.base);
    let (p50, p99, delivered) = quantiles(&metrics, "wagg_watch_delivery_seconds");
    assert!(delivered >= changes as f64, "{delivered} < {changes}");
    eprintln!(
        "{WATCHERS} watchers: {changes} change events in 10 s; delivery (flush written → event) p50 ≤ {:.1} ms, p99 ≤ {:.1} ms over {delivered} events",
        p50 * 1e3,
        p99 * 1e3
    );
}

/// Reads one watch until `until`: (first-state events, each change's count).
async fn follow(
    client: &reqwest::Client,
    url: &str,
    until: tokio::time::Instant,
) -> (usize, Vec<u64>) {
    // 1,000 handshakes at once exceed `http.max_concurrent_requests`: the
    // excess is shed with 503 and Retry-After, and retried, as a client
    // should.
    let mut tries = 0;
    let mut response = loop {
        let response = client.get(url).send().await.expect("watch");
        if response.status() != 503 || tries == 20 {
            break response;
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(response.status(), 200, "{url}");
    let (mut text, mut first, mut counts) = (String::new(), 0, Vec::new());
    // Started: from now on, 10 s of changes.
    let until = until.min(tokio::time::Instant::now() + Duration::from_secs(10));
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(until, response.chunk()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some((event, rest)) = text.split_once("\n\n") {
            let data = event.lines().find_map(|l| l.strip_prefix("data: "));
            let count = data
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .and_then(|v| v["state"]["count"].as_u64());
            let has_id = event.lines().any(|l| l.starts_with("id: "));
            match (has_id, count) {
                // The state, or `event: absent`.
                (false, _) if data.is_some() => first += 1,
                (true, Some(count)) => counts.push(count),
                _ => {}
            }
            text = rest.to_owned();
        }
    }
    (first, counts)
}

fn demo_metrics(base: &str) -> BTreeMap<String, f64> {
    let text = reqwest::blocking::get(format!("{base}/metrics"))
        .and_then(|r| r.text())
        .expect("metrics");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Upper bounds of the p50 and p99 of a histogram (its buckets' `le`), and
/// its count.
fn quantiles(metrics: &BTreeMap<String, f64>, name: &str) -> (f64, f64, f64) {
    let mut buckets: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|(series, count)| {
            let le = series
                .strip_prefix(&format!("{name}_bucket{{le=\""))?
                .strip_suffix("\"}")?;
            Some((le.parse().ok()?, *count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map_or(f64::INFINITY, |b| b.0)
    };
    (at(0.5), at(0.99), total)
}
