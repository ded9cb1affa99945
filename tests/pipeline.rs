//! End to end: a real broker (tansu), the real `wagg` binary, real RocksDB.
//! Every key's state is compared with an expectation computed here,
//! independently of wagg's code.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::broker::{Broker, free_port};
use common::sdk_plugins::{self, LANGUAGES, sdk_plugin};
use common::wagg_process::Wagg;
use common::{json_approx_eq, plugin, stats_json};
use serde_json::{Value, json};

const PARTITIONS: u32 = 4;
const CATCH_UP: Duration = Duration::from_secs(180);

/// FNV-1a: a fixed key → partition mapping, so each key lives in one
/// partition as with Kafka's default partitioner.
fn partition_of(key: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % PARTITIONS) as i32
}

#[derive(Debug, Clone)]
struct Purchase {
    user: String,
    item: String,
    amount: f64,
}

/// `count` purchases over `keys` users (every user appears), starting at
/// sequence number `from`.
fn purchases(from: usize, count: usize, keys: usize) -> Vec<Purchase> {
    (from..from + count)
        .map(|i| Purchase {
            user: format!("user-{:05}", (i * 7919) % keys),
            item: format!("item-{}", (i * 31 + i / 7) % 50),
            amount: ((i * 37) % 10_000) as f64 / 100.0,
        })
        .collect()
}

fn records(purchases: &[Purchase]) -> Vec<(i32, String, String)> {
    purchases
        .iter()
        .map(|p| {
            let value = json!({"user": p.user, "item": p.item, "amount": p.amount}).to_string();
            (partition_of(&p.user), p.user.clone(), value)
        })
        .collect()
}

fn expected_counts(purchases: &[Purchase]) -> BTreeMap<String, Value> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for p in purchases {
        *counts.entry(p.user.clone()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, c)| (k, json!({"count": c})))
        .collect()
}

fn expected_stats(purchases: &[Purchase]) -> BTreeMap<String, Value> {
    let mut amounts: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for p in purchases {
        amounts.entry(p.user.clone()).or_default().push(p.amount);
    }
    amounts
        .into_iter()
        .map(|(k, xs)| (k, stats_json(&xs)))
        .collect()
}

/// Best 3 items per user by their highest amount; ties by item name.
fn expected_top3(purchases: &[Purchase]) -> BTreeMap<String, Value> {
    let mut best: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for p in purchases {
        let score = best
            .entry(p.user.clone())
            .or_default()
            .entry(p.item.clone())
            .or_insert(f64::MIN);
        *score = score.max(p.amount);
    }
    best.into_iter()
        .map(|(user, items)| {
            let mut items: Vec<(String, f64)> = items.into_iter().collect();
            items.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            items.truncate(3);
            let top: Vec<Value> = items
                .iter()
                .map(|(item, score)| json!({"item": item, "score": score}))
                .collect();
            (user, json!({"top": top}))
        })
        .collect()
}

fn assert_states(wagg: &Wagg, aggregation: &str, expected: &BTreeMap<String, Value>) {
    let got = wagg.all_states(aggregation);
    assert_eq!(got.len(), expected.len(), "{aggregation}: key count");
    let mut mismatches = 0;
    for (key, want) in expected {
        match got.get(key) {
            Some(state) if json_approx_eq(state, want) => {}
            other => {
                mismatches += 1;
                if mismatches <= 5 {
                    eprintln!("{aggregation} {key}: got {other:?}, want {want}");
                }
            }
        }
    }
    assert_eq!(mismatches, 0, "{aggregation}: {mismatches} keys differ");
}

struct Setup {
    broker: Broker,
    dir: tempfile::TempDir,
    http_port: u16,
}

impl Setup {
    fn new(topics: &[&str]) -> Setup {
        let broker = Broker::start();
        for topic in topics {
            broker.create_topic(topic, PARTITIONS);
        }
        Setup {
            broker,
            dir: tempfile::tempdir().expect("tempdir"),
            http_port: free_port(),
        }
    }

    fn config(&self, topics: &[&str], aggregations: &str) -> String {
        format!(
            r#"
[source]
brokers = "{}"
group_id = "wagg-test"
topics = {topics:?}

[state]
dir = "state"

[http]
listen = "127.0.0.1:{}"

# Two apply workers, whatever the machine (see `apply.threads`).
[apply]
threads = 2

[batch]
max_records = 1000
max_delay_ms = 50
{aggregations}"#,
            self.broker.address, self.http_port
        )
    }

    fn start(&self, config: &str) -> Wagg {
        Wagg::start(self.dir.path(), config, self.http_port)
    }
}

fn purchase_aggregations() -> String {
    format!(
        r#"{}
[[aggregation]]
name = "top"
plugin = {:?}
params = {{ n = 3, field = "/amount", item = "/item" }}
"#,
        common::count_and_stats_toml(),
        plugin("top-n")
    )
}

fn all_applied(total: u64) -> BTreeMap<String, u64> {
    ["count", "stats", "top"]
        .into_iter()
        .map(|n| (n.to_owned(), total))
        .collect()
}

fn assert_purchase_states(wagg: &Wagg, purchases: &[Purchase]) {
    assert_states(wagg, "count", &expected_counts(purchases));
    assert_states(wagg, "stats", &expected_stats(purchases));
    assert_states(wagg, "top", &expected_top3(purchases));
}

#[test]
fn every_key_is_exact_for_three_aggregations_at_once() {
    let setup = Setup::new(&["purchases"]);
    let data = purchases(0, 200_000, 10_000);
    setup.broker.produce("purchases", &records(&data));
    let wagg = setup.start(&setup.config(&["purchases"], &purchase_aggregations()));
    wagg.wait_for(&all_applied(200_000), CATCH_UP);
    assert_purchase_states(&wagg, &data);

    // The metrics agree with what was just checked key by key.
    let metrics = wagg.metrics();
    for aggregation in ["count", "stats", "top"] {
        let series = |name: &str| format!("wagg_{name}{{aggregation=\"{aggregation}\"}}");
        assert_eq!(metrics[&series("records_applied_total")], 200_000.0);
        assert_eq!(metrics[&series("records_failed_total")], 0.0);
        // Exact, though every key was updated ~20 times (RocksDB's own
        // estimate counted each version: 60-100x the truth).
        assert_eq!(
            metrics[&series("state_keys")],
            expected_counts(&data).len() as f64,
            "{aggregation}"
        );
        assert!(metrics[&series("plugin_call_seconds_count")] > 0.0);
    }
    assert!(metrics["wagg_records_consumed_total"] >= 200_000.0);
    assert_eq!(metrics["wagg_batch_records_sum"], 200_000.0);
    let next_offsets: f64 = (0..PARTITIONS)
        .map(|p| {
            metrics[&format!("wagg_partition_next_offset{{topic=\"purchases\",partition=\"{p}\"}}")]
        })
        .sum();
    assert_eq!(next_offsets, 200_000.0);
    assert!(metrics["wagg_state_store_bytes"] > 0.0);
    assert_eq!(metrics["wagg_ready"], 1.0);
    assert!(
        metrics[r#"wagg_http_requests_total{route="/v1/aggregations/{name}/keys",status="200"}"#]
            >= 30.0,
        "the listing pages above are counted by route pattern, not by path"
    );

    // Progress was logged while catching up, then that it caught up.
    let log = wagg.log();
    let progress = log
        .lines()
        .find(|line| line.contains("progress:"))
        .unwrap_or_else(|| panic!("no progress line in the log:\n{log}"));
    assert!(
        progress.contains("records") && progress.contains("lag"),
        "{progress}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !wagg.log().contains("caught up") {
        assert!(
            std::time::Instant::now() < deadline,
            "no `caught up` line:\n{}",
            wagg.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The CLI client answers the same, and reports the lag.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_wagg"))
            .args(args)
            .args(["--url", &wagg.http])
            .output()
            .expect("run wagg");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (key, want) in expected_counts(&data).iter().take(20) {
        let (ok, stdout, stderr) = cli(&["query", "count", key]);
        assert!(ok, "{stderr}");
        let got: Value = serde_json::from_str(&stdout).expect("query prints JSON");
        assert_eq!(&got, want, "wagg query count {key}");
    }
    let (ok, _, stderr) = cli(&["query", "count", "no-such-key"]);
    assert!(!ok);
    assert!(
        stderr.contains("has no key") && stderr.contains("404"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = cli(&["lag"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("purchases "))
            .count(),
        PARTITIONS as usize,
        "{stdout}"
    );
    assert!(stdout.contains("total lag: 0"), "{stdout}");

    let (status, body) = wagg.get("/v1/aggregations");
    assert_eq!(status, 200);
    let count = &body["aggregations"][0];
    assert_eq!(count["plugin"]["name"], "count");
    assert_eq!(count["keys"], json!(expected_counts(&data).len()));
    let partitions = count["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), PARTITIONS as usize);
    let next_offsets: i64 = partitions
        .iter()
        .map(|p| p["next_offset"].as_i64().expect("offset"))
        .sum();
    assert_eq!(next_offsets, 200_000, "stored offsets cover every record");
    assert_eq!(wagg.get("/readyz").0, 200);
}

/// `count` and `stats` written in Python and in JavaScript run inside
/// `wagg run` beside the Rust ones, on one topic: every key of every one
/// equals the expectation computed here.
#[test]
fn python_and_javascript_plugins_run_beside_rust_with_exact_states() {
    let setup = Setup::new(&["purchases"]);
    let data = purchases(0, 20_000, 1_000);
    setup.broker.produce("purchases", &records(&data));
    let mut aggregations = common::count_and_stats_toml();
    for language in LANGUAGES {
        let name = sdk_plugins::language_dir(language);
        aggregations.push_str(&format!(
            "\n[[aggregation]]\nname = \"count-{name}\"\nplugin = {:?}\n\n[[aggregation]]\nname = \"stats-{name}\"\nplugin = {:?}\nparams = {{ field = \"/amount\" }}\n",
            sdk_plugin(language, "count"),
            sdk_plugin(language, "stats"),
        ));
    }
    let wagg = setup.start(&setup.config(&["purchases"], &aggregations));
    let names = [
        "count",
        "stats",
        "count-python",
        "stats-python",
        "count-javascript",
        "stats-javascript",
    ];
    let applied = names
        .iter()
        .map(|n| ((*n).to_owned(), data.len() as u64))
        .collect();
    wagg.wait_for(&applied, CATCH_UP);
    for name in names {
        let expected = if name.starts_with("count") {
            expected_counts(&data)
        } else {
            expected_stats(&data)
        };
        assert_states(&wagg, name, &expected);
    }
    let metrics = wagg.metrics();
    for name in names {
        assert_eq!(
            metrics[&format!("wagg_records_failed_total{{aggregation=\"{name}\"}}")],
            0.0,
            "{name}"
        );
    }
}

#[test]
fn queries_are_answered_while_ingesting_and_counts_never_go_backwards() {
    let setup = Setup::new(&["purchases"]);
    let wagg = setup.start(&setup.config(&["purchases"], &purchase_aggregations()));
    let data = purchases(0, 150_000, 10_000);
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let records = records(&data);
        let producing = producing.clone();
        let address = setup.broker.address.clone();
        std::thread::spawn(move || {
            let broker = common::broker::ProducerOnly::new(&address);
            for chunk in records.chunks(5_000) {
                broker.produce("purchases", chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
            producing.store(false, Ordering::SeqCst);
        })
    };
    let watched: Vec<String> = (0..20).map(|i| format!("user-{i:05}")).collect();
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut answered_while_ingesting = 0;
    let mut queries = 0;
    while producing.load(Ordering::SeqCst) {
        for key in &watched {
            let started = std::time::Instant::now();
            let (status, body) = wagg.get(&format!("/v1/aggregations/count/keys/{key}"));
            queries += 1;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "a query took {:?}",
                started.elapsed()
            );
            match status {
                200 => {
                    let count = body["state"]["count"].as_u64().expect("count");
                    let previous = last_seen.insert(key.clone(), count).unwrap_or(0);
                    assert!(
                        count >= previous,
                        "{key}: count went back from {previous} to {count}"
                    );
                    answered_while_ingesting += 1;
                }
                404 => assert!(
                    !last_seen.contains_key(key),
                    "{key} disappeared after being seen"
                ),
                other => panic!("unexpected status {other}: {body}"),
            }
        }
    }
    producer.join().expect("producer thread");
    assert!(
        answered_while_ingesting > 20,
        "only {answered_while_ingesting} of {queries} queries found state during ingestion"
    );
    wagg.wait_for(&all_applied(150_000), CATCH_UP);
    assert_purchase_states(&wagg, &data);
}

#[test]
fn a_clean_stop_mid_stream_and_restart_is_exact() {
    let setup = Setup::new(&["purchases"]);
    let config = setup.config(&["purchases"], &purchase_aggregations());
    let first = purchases(0, 100_000, 10_000);
    let second = purchases(100_000, 100_000, 10_000);
    setup.broker.produce("purchases", &records(&first));
    let mut wagg = setup.start(&config);
    // Keep producing while wagg consumes, and stop it in the middle.
    let producer = {
        let records = records(&second);
        let address = setup.broker.address.clone();
        std::thread::spawn(move || {
            let broker = common::broker::ProducerOnly::new(&address);
            for chunk in records.chunks(10_000) {
                broker.produce("purchases", chunk);
            }
        })
    };
    let started = std::time::Instant::now();
    while wagg.applied().get("count").copied().unwrap_or(0) < 50_000 {
        assert!(
            started.elapsed() < CATCH_UP,
            "no progress; log:\n{}",
            wagg.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = wagg.terminate();
    assert!(status.success(), "wagg exited with {status} on SIGTERM");
    producer.join().expect("producer");
    drop(wagg);

    let wagg = setup.start(&config);
    let before_restart = wagg.applied();
    assert!(
        before_restart
            .values()
            .all(|n| (50_000..200_000).contains(n)),
        "the stop was not mid-stream: {before_restart:?}"
    );
    wagg.wait_for(&all_applied(200_000), CATCH_UP);
    let all: Vec<Purchase> = first.into_iter().chain(second).collect();
    assert_purchase_states(&wagg, &all);
}

#[test]
fn two_aggregations_over_two_topics_run_in_one_process() {
    let setup = Setup::new(&["clicks", "orders"]);
    let clicks = purchases(0, 20_000, 1_000);
    let orders = purchases(500_000, 30_000, 2_000);
    setup.broker.produce("clicks", &records(&clicks));
    setup.broker.produce("orders", &records(&orders));
    let aggregations = format!(
        r#"
[[aggregation]]
name = "clicks_per_user"
plugin = {:?}
topic = "clicks"

[[aggregation]]
name = "order_value_per_item"
plugin = {:?}
topic = "orders"
key = "/item"
params = {{ field = "/amount" }}
"#,
        plugin("count"),
        plugin("sum"),
    );
    // Records without a Kafka key on every partition of both topics: not
    // aggregated by the Kafka key (dropped, counted), re-keyed by `/item`
    // like any other.
    let keyless = purchases(900_000, 40, 10);
    let producer = setup.broker.producer();
    for (i, purchase) in keyless.iter().enumerate() {
        let value =
            json!({"user": purchase.user, "item": purchase.item, "amount": purchase.amount})
                .to_string();
        for topic in ["clicks", "orders"] {
            producer
                .send(
                    rdkafka::producer::BaseRecord::<(), String>::to(topic)
                        .partition((i % PARTITIONS as usize) as i32)
                        .payload(&value),
                )
                .expect("queue a record without a key");
        }
    }
    rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(30))
        .expect("keyless records acknowledged");
    let wagg = setup.start(&setup.config(&["clicks", "orders"], &aggregations));
    wagg.wait_for(
        &BTreeMap::from([
            ("clicks_per_user".to_owned(), 20_000),
            ("order_value_per_item".to_owned(), 30_040),
        ]),
        CATCH_UP,
    );
    assert_states(&wagg, "clicks_per_user", &expected_counts(&clicks));
    let (_, body) = wagg.get("/v1/aggregations");
    let dropped: BTreeMap<&str, u64> = body["aggregations"]
        .as_array()
        .expect("aggregations")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().expect("name"),
                a["records_dropped"].as_u64().expect("records_dropped"),
            )
        })
        .collect();
    assert_eq!(
        dropped,
        BTreeMap::from([("clicks_per_user", 40), ("order_value_per_item", 0)])
    );
    assert_eq!(
        wagg.metrics()[r#"wagg_records_dropped_total{aggregation="clicks_per_user"}"#],
        40.0
    );
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for order in orders.iter().chain(&keyless) {
        *sums.entry(order.item.clone()).or_default() += order.amount;
    }
    let sums = sums
        .into_iter()
        .map(|(k, s)| (k, json!({"sum": s})))
        .collect();
    assert_states(&wagg, "order_value_per_item", &sums);
}

#[test]
fn http_errors_are_json_with_the_right_status() {
    let setup = Setup::new(&["purchases"]);
    setup
        .broker
        .produce("purchases", &records(&purchases(0, 100, 10)));
    let wagg = setup.start(&setup.config(&["purchases"], &purchase_aggregations()));
    wagg.wait_for(&all_applied(100), CATCH_UP);
    let cases: &[(&str, u16, &str)] = &[
        ("/v1/aggregations/nope/keys/x", 404, "unknown_aggregation"),
        (
            "/v1/aggregations/count/keys/no-such-user",
            404,
            "unknown_key",
        ),
        ("/v1/aggregations/count/keys/%FF%FE", 400, "bad_request"),
        (
            "/v1/aggregations/count/keys/x?encoding=rot13",
            400,
            "bad_request",
        ),
        (
            "/v1/aggregations/count/keys/!!!?encoding=base64",
            400,
            "bad_request",
        ),
        ("/v1/aggregations/count/keys?limit=0", 400, "bad_request"),
        ("/v1/aggregations/count/keys?limit=abc", 400, "bad_request"),
        ("/v1/aggregations/count/keys?bogus=1", 400, "bad_request"),
        ("/nowhere", 404, "no_route"),
    ];
    for (path, status, code) in cases {
        let (got, body) = wagg.get(path);
        assert_eq!(got, *status, "{path}: {body}");
        assert_eq!(body["error"]["code"], *code, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}: {body}"
        );
    }
    // The same key, by UTF-8 and by base64.
    let (status, by_text) = wagg.get("/v1/aggregations/count/keys/user-00001");
    assert_eq!(status, 200, "{by_text}");
    let (status, by_base64) =
        wagg.get("/v1/aggregations/count/keys/dXNlci0wMDAwMQ==?encoding=base64");
    assert_eq!(status, 200);
    assert_eq!(by_text["state"], by_base64["state"]);
    // Limits are capped, not refused.
    let (status, page) = wagg.get("/v1/aggregations/count/keys?limit=1000000");
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(10));
}

/// Each aggregation's partitions still catching up, from `/v1/aggregations`.
fn catching_up(wagg: &Wagg) -> BTreeMap<String, usize> {
    let (_, body) = wagg.get("/v1/aggregations");
    body["aggregations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let behind = a["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["catching_up"] == true)
                .count();
            (a["name"].as_str().unwrap_or_default().to_owned(), behind)
        })
        .collect()
}

/// Watches aggregations catch up until every one has applied `applied`
/// and none is behind: meanwhile `count` must have had every live record
/// while `behind` was still catching up, and each `count` lookup on the way
/// is answered and never above the truth of `all`.
fn watch_catch_up(
    wagg: &Wagg,
    all: &[Purchase],
    behind_one: &str,
    applied_at_end: &BTreeMap<String, u64>,
) {
    let truth = expected_counts(all);
    let live_total = all.len() as u64;
    let started = std::time::Instant::now();
    let mut seen_live_while_behind = false;
    loop {
        let behind = catching_up(wagg);
        let applied = wagg.applied();
        if behind.get(behind_one).copied().unwrap_or(0) > 0 && applied["count"] == live_total {
            seen_live_while_behind = true;
        }
        for key in ["user-00001", "user-01000", "user-01999"] {
            let (status, body) = wagg.get(&format!("/v1/aggregations/count/keys/{key}"));
            assert_eq!(status, 200, "{key} while catching up: {body}");
            assert!(
                body["state"]["count"].as_u64() <= truth[key]["count"].as_u64(),
                "{key}: {body} above the truth"
            );
        }
        if behind.values().all(|n| *n == 0) && applied == *applied_at_end {
            break;
        }
        assert!(
            started.elapsed() < CATCH_UP,
            "not caught up: {applied:?}, catching up: {behind:?}; log:\n{}",
            wagg.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen_live_while_behind,
        "`count` never had every live record while `{behind_one}` was still catching up; log:\n{}",
        wagg.log()
    );
}

#[test]
fn an_aggregation_added_to_a_running_deployment_catches_up_while_the_others_stay_live() {
    let setup = Setup::new(&["purchases"]);
    let count_only = setup.config(&["purchases"], &common::count_toml());
    let first = purchases(0, 100_000, 5_000);
    setup.broker.produce("purchases", &records(&first));
    let mut wagg = setup.start(&count_only);
    wagg.wait_for(&[("count".to_owned(), 100_000)].into(), CATCH_UP);
    assert!(wagg.terminate().success());
    drop(wagg);

    // More records arrive while it is down; then `stats` and `top` are
    // added to the config and the process restarts on the same state.
    let second = purchases(100_000, 20_000, 5_000);
    setup.broker.produce("purchases", &records(&second));
    let config = setup.config(&["purchases"], &purchase_aggregations());
    let wagg = setup.start(&config);

    // While the new ones catch up, `count` goes on live: it takes the
    // records that arrive meanwhile, and every lookup of it is answered.
    let third = purchases(120_000, 20_000, 5_000);
    setup.broker.produce("purchases", &records(&third));
    let all: Vec<Purchase> = first.iter().chain(&second).chain(&third).cloned().collect();
    watch_catch_up(&wagg, &all, "stats", &all_applied(140_000));
    // The new aggregations hold the topic's whole history; the old one
    // took each record once.
    assert_purchase_states(&wagg, &all);
    let metrics = wagg.metrics();
    assert_eq!(
        metrics.get("wagg_aggregation_catch_up_lag{aggregation=\"stats\"}"),
        Some(&0.0),
        "{metrics:?}"
    );
}

/// Runs `wagg <args>` against the config in `dir` (written there first).
fn wagg_command(dir: &std::path::Path, config: &str, args: &[&str]) -> (bool, String) {
    let path = dir.join("wagg.toml");
    std::fs::write(&path, config).expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run wagg");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Waits until every aggregation has applied what `expected` says and none
/// is catching up any more.
fn wait_current(wagg: &Wagg, expected: &BTreeMap<String, u64>) {
    wagg.wait_for(expected, CATCH_UP);
    let started = std::time::Instant::now();
    while catching_up(wagg).values().any(|n| *n > 0) {
        assert!(started.elapsed() < CATCH_UP, "still catching up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reset_rebuilds_one_aggregation_from_a_time_or_the_beginning_and_drop_deletes_a_removed_one() {
    let setup = Setup::new(&["purchases"]);
    let config = setup.config(&["purchases"], &common::count_and_stats_toml());
    let dir = setup.dir.path();
    // Records before and after a moment `since` (their timestamps are
    // their produce times).
    let before = purchases(0, 10_000, 2_000);
    let after = purchases(10_000, 10_000, 2_000);
    setup.broker.produce("purchases", &records(&before));
    std::thread::sleep(Duration::from_millis(1500));
    let since = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    setup.broker.produce("purchases", &records(&after));
    let mut wagg = setup.start(&config);
    wait_current(&wagg, &common::count_and_stats_applied(20_000));

    // A running instance's store is never changed under its feet.
    let (ok, output) = wagg_command(
        dir,
        &config,
        &["reset", "--aggregation", "stats", "--to", "earliest"],
    );
    assert!(!ok && output.contains("lock"), "{output}");
    assert!(wagg.terminate().success());
    drop(wagg);

    // `stats` from `since` on: exactly the records after it, plus the ones
    // arriving meanwhile; `count` undisturbed.
    let since_text = chrono::DateTime::<chrono::Utc>::from(since)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (ok, output) = wagg_command(
        dir,
        &config,
        &["reset", "--aggregation", "stats", "--to", &since_text],
    );
    assert!(ok, "{output}");
    assert!(output.contains("on 4 of the 4 partitions"), "{output}");
    let later = purchases(20_000, 5_000, 2_000);
    let wagg = setup.start(&config);
    setup.broker.produce("purchases", &records(&later));
    wait_current(
        &wagg,
        &[("count".to_owned(), 25_000), ("stats".to_owned(), 15_000)].into(),
    );
    let everything: Vec<Purchase> = before.iter().chain(&after).chain(&later).cloned().collect();
    let since_then: Vec<Purchase> = after.iter().chain(&later).cloned().collect();
    assert_states(&wagg, "count", &expected_counts(&everything));
    assert_states(&wagg, "stats", &expected_stats(&since_then));
    let mut wagg = wagg;
    assert!(wagg.terminate().success());
    drop(wagg);

    // From the beginning: the whole history again.
    let (ok, output) = wagg_command(
        dir,
        &config,
        &["reset", "--aggregation", "stats", "--to", "earliest"],
    );
    assert!(ok, "{output}");
    let mut wagg = setup.start(&config);
    wait_current(&wagg, &common::count_and_stats_applied(25_000));
    assert_states(&wagg, "count", &expected_counts(&everything));
    assert_states(&wagg, "stats", &expected_stats(&everything));
    assert!(wagg.terminate().success());
    drop(wagg);

    // Removed from the config for a while, then added back: it misses
    // what was consumed meanwhile, so it starts over (and is exact).
    let count_only = setup.config(&["purchases"], &common::count_toml());
    let meanwhile = purchases(25_000, 3_000, 2_000);
    let mut wagg = setup.start(&count_only);
    setup.broker.produce("purchases", &records(&meanwhile));
    wait_current(&wagg, &[("count".to_owned(), 28_000)].into());
    assert!(wagg.terminate().success());
    drop(wagg);
    let everything: Vec<Purchase> = everything.into_iter().chain(meanwhile).collect();
    let mut wagg = setup.start(&config);
    wait_current(&wagg, &common::count_and_stats_applied(28_000));
    assert_states(&wagg, "count", &expected_counts(&everything));
    assert_states(&wagg, "stats", &expected_stats(&everything));
    assert!(wagg.terminate().success());
    drop(wagg);

    // Removed from the config, its state stays until dropped.
    let (ok, output) = wagg_command(dir, &config, &["state", "drop", "--aggregation", "stats"]);
    assert!(!ok && output.contains("still in the config"), "{output}");
    let (ok, output) = wagg_command(
        dir,
        &count_only,
        &["state", "drop", "--aggregation", "stats"],
    );
    assert!(ok && output.contains("dropped"), "{output}");
    let (ok, output) = wagg_command(
        dir,
        &count_only,
        &["state", "drop", "--aggregation", "stats"],
    );
    assert!(!ok && output.contains("holds no state"), "{output}");
    let wagg = setup.start(&count_only);
    wait_current(&wagg, &[("count".to_owned(), 28_000)].into());
    assert_states(&wagg, "count", &expected_counts(&everything));
}

#[test]
fn kill_9_in_the_middle_of_a_catch_up_loses_nothing_and_counts_nothing_twice() {
    let setup = Setup::new(&["purchases"]);
    // A fresh group per run: tansu never hands a SIGKILLed member's
    // partitions on (see tests/crash.rs); start offsets come from the store.
    // Writes five times a second, so that several kills land between
    // writes of the catch-up.
    let in_group = |config: &str, run: usize| {
        config
            .replace(
                "group_id = \"wagg-test\"",
                &format!("group_id = \"wagg-test-{run}\""),
            )
            .replace(
                "max_delay_ms = 50",
                "max_delay_ms = 50\ncommit_interval_ms = 200",
            )
    };
    let count_only = setup.config(&["purchases"], &common::count_toml());
    let first = purchases(0, 150_000, 5_000);
    setup.broker.produce("purchases", &records(&first));
    let mut wagg = setup.start(&in_group(&count_only, 0));
    wagg.wait_for(&[("count".to_owned(), 150_000)].into(), CATCH_UP);
    assert!(wagg.terminate().success());
    drop(wagg);

    // `stats` is added; wagg is killed while it catches up, after each
    // time some of its progress was written.
    let config = setup.config(&["purchases"], &common::count_and_stats_toml());
    let mut kills = 0;
    let mut written = 0;
    for run in 1..=4 {
        let mut wagg = setup.start(&in_group(&config, run));
        let started = std::time::Instant::now();
        loop {
            let applied = wagg.applied().get("stats").copied().unwrap_or(0);
            let behind = catching_up(&wagg).get("stats").copied().unwrap_or(0);
            // Caught up (once it owns its partitions: before, nothing is
            // catching up either).
            let (_, body) = wagg.get("/v1/aggregations");
            let owns = body["aggregations"][0]["partitions"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["assigned"] == true));
            if (owns && behind == 0) || started.elapsed() > CATCH_UP {
                break;
            }
            if applied > written {
                written = applied;
                wagg.kill();
                kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(wagg);
    }
    assert!(
        kills >= 2,
        "only {kills} kill(s) landed while `stats` was catching up"
    );
    let second = purchases(150_000, 10_000, 5_000);
    let wagg = setup.start(&in_group(&config, 5));
    setup.broker.produce("purchases", &records(&second));
    wait_current(&wagg, &common::count_and_stats_applied(160_000));
    let all: Vec<Purchase> = first.iter().chain(&second).cloned().collect();
    assert_states(&wagg, "count", &expected_counts(&all));
    assert_states(&wagg, "stats", &expected_stats(&all));
    eprintln!(
        "catch-up kills: {kills} while catching up (last written progress: {written} records)"
    );
}

/// Produces `purchases` to the topic from another thread, `chunk` at a
/// time with a `pause` after each.
fn produce_in_background(
    setup: &Setup,
    purchases: &[Purchase],
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let chunks: Vec<Vec<(i32, String, String)>> = purchases.chunks(chunk).map(records).collect();
    let producer = common::broker::ProducerOnly::new(&setup.broker.address);
    std::thread::spawn(move || {
        for chunk in chunks {
            producer.produce("purchases", &chunk);
            std::thread::sleep(pause);
        }
    })
}

/// `count`, `stats` and `top`, plus `count2` (the count plugin again, to
/// compare with `wagg diff`).
fn reloaded_aggregations(with_top: bool) -> String {
    let mut tables = format!(
        "{}\n[[aggregation]]\nname = \"count2\"\nplugin = {:?}\n",
        common::count_and_stats_toml(),
        plugin("count")
    );
    if with_top {
        tables.push_str(&format!(
            "\n[[aggregation]]\nname = \"top\"\nplugin = {:?}\nparams = {{ n = 3, field = \"/amount\", item = \"/item\" }}\n",
            plugin("top-n")
        ));
    }
    tables
}

fn applied_by(names: &[&str], total: u64) -> BTreeMap<String, u64> {
    names.iter().map(|n| ((*n).to_owned(), total)).collect()
}

#[test]
fn a_live_reload_adds_removes_and_refuses_while_queries_stay_answered_and_a_live_reset_rebuilds() {
    let setup = Setup::new(&["purchases"]);
    let first = purchases(0, 150_000, 2_000);
    setup.broker.produce("purchases", &records(&first));
    let wagg = setup.start(&setup.config(&["purchases"], &common::count_toml()));
    wagg.wait_for(&applied_by(&["count"], 150_000), CATCH_UP);

    // SIGHUP with three aggregations added: they catch up on the history
    // while `count` goes on live with the records that keep coming across
    // the reload.
    let second = purchases(150_000, 30_000, 2_000);
    let producer = produce_in_background(&setup, &second, 3_000, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(200));
    let with_top = setup.config(&["purchases"], &reloaded_aggregations(true));
    wagg.rewrite_config(&with_top);
    wagg.signal("HUP");
    producer.join().expect("producer");
    let mut all: Vec<Purchase> = first.iter().chain(&second).cloned().collect();
    let four = ["count", "stats", "count2", "top"];
    watch_catch_up(&wagg, &all, "stats", &applied_by(&four, 180_000));
    assert_purchase_states(&wagg, &all);
    assert_states(&wagg, "count2", &expected_counts(&all));
    assert!(wagg.log().contains("reload done"), "{}", wagg.log());

    // A config that fails `check-config` is refused with its error; one
    // that changes more than the aggregations too; nothing changes.
    let bad_params = with_top.replace("params = { field = \"/amount\" }", "params = {}");
    assert_ne!(bad_params, with_top);
    wagg.rewrite_config(&bad_params);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(
        !ok && output.contains("field") && output.contains("422"),
        "{output}"
    );
    wagg.rewrite_config(&with_top.replace("max_records = 1000", "max_records = 999"));
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(!ok && output.contains("[batch]"), "{output}");
    let rekeyed = with_top.replace("name = \"stats\"", "name = \"stats\"\nkey = \"/item\"");
    assert_ne!(rekeyed, with_top);
    wagg.rewrite_config(&rekeyed);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(
        !ok && output.contains("cannot change `topic`, `key`"),
        "{output}"
    );
    let windowed = with_top.replace(
        "name = \"stats\"",
        "name = \"stats\"\nwindow = { kind = \"tumbling\", size = \"1m\" }",
    );
    assert_ne!(windowed, with_top);
    wagg.rewrite_config(&windowed);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(!ok && output.contains("`window` or `time`"), "{output}");
    wagg.rewrite_config(&with_top);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(ok && output.contains("nothing changed"), "{output}");
    assert_eq!(wagg.applied(), applied_by(&four, 180_000));

    // Removed: no longer applied nor served (its stored state stays).
    let without_top = setup.config(&["purchases"], &reloaded_aggregations(false));
    wagg.rewrite_config(&without_top);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(ok && output.contains("removed   top"), "{output}");
    let (status, _) = wagg.get("/v1/aggregations/top/keys/user-00001");
    assert_eq!(status, 404);
    let series_of_top: Vec<String> = wagg
        .metrics()
        .into_keys()
        .filter(|series| series.contains("aggregation=\"top\""))
        .collect();
    assert!(series_of_top.is_empty(), "{series_of_top:?}");
    let third = purchases(180_000, 5_000, 2_000);
    setup.broker.produce("purchases", &records(&third));
    all.extend(third);
    wagg.wait_for(
        &applied_by(&["count", "stats", "count2"], 185_000),
        CATCH_UP,
    );

    // Added back it starts over (it missed `third`), and `stats` is reset
    // to the beginning online while records keep coming.
    wagg.rewrite_config(&with_top);
    let (ok, output) = wagg.cli(&["reload"]);
    assert!(ok && output.contains("added     top"), "{output}");
    let (ok, output) = wagg.cli(&["reset", "--aggregation", "stats", "--to", "earliest"]);
    assert!(ok && output.contains("reset \"stats\""), "{output}");
    let fourth = purchases(185_000, 5_000, 2_000);
    setup.broker.produce("purchases", &records(&fourth));
    all.extend(fourth);
    watch_catch_up(&wagg, &all, "top", &applied_by(&four, 190_000));
    assert_purchase_states(&wagg, &all);
    let (status, body) = wagg.post(
        "/v1/admin/reset",
        &json!({"aggregation": "nope", "to": "earliest"}),
    );
    assert_eq!(status, 404, "{body}");

    // `wagg diff`: the two counts agree; count and stats differ on every
    // key.
    let (ok, output) = wagg.cli(&["diff", "count", "count2"]);
    assert!(
        ok && output.contains("2000 keys compared: 0 differ"),
        "{output}"
    );
    let (ok, output) = wagg.cli(&["diff", "count", "stats", "--limit", "2"]);
    assert!(
        !ok && output.contains("2000 keys compared: 2000 differ"),
        "{output}"
    );
    assert_eq!(output.matches("key \"user-").count(), 2, "{output}");
}

/// A copy of a plugin with a custom section appended: another build (its
/// content hash differs) that behaves the same.
fn rebuilt(plugin_path: &std::path::Path, dir: &std::path::Path, tag: &str) -> std::path::PathBuf {
    let mut bytes = std::fs::read(plugin_path).expect("plugin");
    let name = b"wagg-test-build";
    let payload = tag.as_bytes();
    let contents = 1 + name.len() + payload.len();
    assert!(contents < 128 && name.len() < 128, "one-byte LEB128 sizes");
    bytes.extend([0u8, contents as u8, name.len() as u8]);
    bytes.extend(name);
    bytes.extend(payload);
    let path = dir.join(format!("count-{tag}.wasm"));
    std::fs::write(&path, bytes).expect("write plugin");
    path
}

#[test]
fn a_plugin_swapped_by_reload_under_load_loses_and_repeats_nothing_and_new_params_apply_from_the_next_batch()
 {
    let setup = Setup::new(&["purchases"]);
    let builds = [
        plugin("count"),
        rebuilt(&plugin("count"), setup.dir.path(), "b"),
    ];
    let config_with = |build: &std::path::Path, field: &str| {
        setup.config(
            &["purchases"],
            &format!(
                "[[aggregation]]\nname = \"count\"\nplugin = {build:?}\n\n[[aggregation]]\nname = \"stats\"\nplugin = {:?}\nparams = {{ field = \"{field}\" }}\n",
                plugin("stats")
            ),
        )
    };
    let wagg = setup.start(&config_with(&builds[0], "/amount"));
    // Records keep coming while the plugin is swapped back and forth.
    let load = purchases(0, 40_000, 2_000);
    let producer = produce_in_background(&setup, &load, 2_000, Duration::from_millis(100));
    for swap in 1..=6 {
        wagg.rewrite_config(&config_with(&builds[swap % 2], "/amount"));
        let (status, report) = wagg.post("/v1/admin/reload", &json!(null));
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["updated"][0]["name"], "count", "{report}");
        assert!(
            report["updated"][0]["changes"][0]
                .as_str()
                .is_some_and(|c| c.starts_with("plugin count")),
            "{report}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    producer.join().expect("producer");
    wagg.wait_for(&common::count_and_stats_applied(40_000), CATCH_UP);
    assert_states(&wagg, "count", &expected_counts(&load));
    assert_states(&wagg, "stats", &expected_stats(&load));

    // New params from the next batch: the records after the reload are
    // measured by a field of their own, `/tax`.
    wagg.rewrite_config(&config_with(&builds[0], "/tax"));
    let (status, report) = wagg.post("/v1/admin/reload", &json!(null));
    assert_eq!(status, 200, "{report}");
    let stats_update = report["updated"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == "stats"))
        .cloned();
    assert_eq!(
        stats_update.map(|u| u["changes"].clone()),
        Some(json!(["params"])),
        "{report}"
    );
    let taxed: Vec<(i32, String, String)> = purchases(40_000, 4_000, 2_000)
        .iter()
        .map(|p| {
            let value = json!({"user": p.user, "amount": p.amount, "tax": p.amount / 10.0});
            (partition_of(&p.user), p.user.clone(), value.to_string())
        })
        .collect();
    setup.broker.produce("purchases", &taxed);
    wagg.wait_for(&common::count_and_stats_applied(44_000), CATCH_UP);
    let mut measured: Vec<Purchase> = load.clone();
    measured.extend(
        purchases(40_000, 4_000, 2_000)
            .into_iter()
            .map(|p| Purchase {
                amount: p.amount / 10.0,
                ..p
            }),
    );
    assert_states(&wagg, "stats", &expected_stats(&measured));
    assert_states(&wagg, "count", &expected_counts(&measured));
}

/// `stats` version 2 (state format 2, with `sum`) under the name `stats`,
/// beside `count`.
fn count_and_stats_v2() -> String {
    common::count_and_stats_toml().replace(
        &format!("{:?}", plugin("stats")),
        &format!("{:?}", plugin("stats-v2")),
    )
}

/// What `stats` 0.2.0 renders: the moments and the sum.
fn expected_stats_v2(purchases: &[Purchase]) -> BTreeMap<String, Value> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for p in purchases {
        *sums.entry(p.user.clone()).or_default() += p.amount;
    }
    expected_stats(purchases)
        .into_iter()
        .map(|(user, mut stats)| {
            stats["sum"] = json!(sums[&user]);
            (user, stats)
        })
        .collect()
}

/// The `migration` object of an aggregation in `/v1/aggregations`.
fn migration_of(wagg: &Wagg, name: &str) -> Value {
    let (_, body) = wagg.get("/v1/aggregations");
    body["aggregations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == name)
        .map_or(Value::Null, |a| a["migration"].clone())
}

/// Test (c) of the plugin lifecycle: `stats` is upgraded to a version
/// with another state format that migrates from the old one, while
/// records keep arriving. The first start after the upgrade dies (as
/// abruptly as kill -9) right after the first chunk of migrated keys is
/// written; the next one resumes the migration from there (its progress
/// never starts over), answers every `stats` lookup in the new format
/// meanwhile, keeps `count` live, then catches `stats` up on what arrived
/// during the migration: every key exact, no record lost or applied
/// twice.
#[test]
fn a_state_format_change_migrates_every_key_under_ingestion_and_survives_a_crash_mid_migration() {
    let setup = Setup::new(&["purchases"]);
    let in_group = |config: &str, run: usize| {
        // A fresh group per run: tansu never hands a crashed member's
        // partitions on (see tests/crash.rs); offsets come from the store.
        config.replace(
            "group_id = \"wagg-test\"",
            &format!("group_id = \"wagg-migrate-{run}\""),
        )
    };
    let keys = 5_000;
    let first = purchases(0, 60_000, keys);
    setup.broker.produce("purchases", &records(&first));
    let v1 = setup.config(&["purchases"], &common::count_and_stats_toml());
    let mut wagg = setup.start(&in_group(&v1, 0));
    wagg.wait_for(&common::count_and_stats_applied(60_000), CATCH_UP);
    assert!(wagg.terminate().success());
    drop(wagg);

    // The upgrade, with records arriving from now on.
    let second = purchases(60_000, 30_000, keys);
    let producing = produce_in_background(&setup, &second, 1_000, Duration::from_millis(100));
    let v2 = setup.config(&["purchases"], &count_and_stats_v2());
    let mut crashed = Wagg::start_with_env(
        setup.dir.path(),
        &in_group(&v2, 1),
        setup.http_port,
        // The delay lets the HTTP server come up before the crash.
        &[
            ("WAGG_FAULT_CRASH", "migration-chunk"),
            ("WAGG_FAULT_DELAY", "migration-chunk:3000"),
        ],
    );
    let exit = crashed.wait_exit(CATCH_UP).expect("the injected crash");
    assert!(!exit.success());
    assert!(
        crashed.log().contains("injected crash"),
        "{}",
        crashed.log()
    );
    drop(crashed);

    // Going back to the old plugin now is refused, naming both formats.
    let (ok, output) = wagg_command(setup.dir.path(), &in_group(&v1, 2), &["run"]);
    assert!(
        !ok,
        "the old plugin ran over a half-migrated state: {output}"
    );
    assert!(
        output.contains("being migrated to state format 2") && output.contains("format 1"),
        "{output}"
    );

    let wagg = Wagg::start_with_env(
        setup.dir.path(),
        &in_group(&v2, 3),
        setup.http_port,
        &[("WAGG_FAULT_DELAY", "migration-chunk:300")],
    );
    let all: Vec<Purchase> = first.iter().chain(&second).cloned().collect();
    let counts = expected_counts(&all);
    let started = std::time::Instant::now();
    let mut progress = Vec::new();
    loop {
        let migration = migration_of(&wagg, "stats");
        let Some(done) = migration["keys_migrated"].as_u64() else {
            if !progress.is_empty() {
                break; // done
            }
            assert!(
                started.elapsed() < CATCH_UP,
                "no migration seen: {}",
                wagg.log()
            );
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        assert_eq!(migration["from_format"], 1, "{migration}");
        assert_eq!(migration["to_format"], 2, "{migration}");
        progress.push(done);
        // Keys on both sides of the cursor answer in the new format, and
        // `count` stays live.
        for key in ["user-00000", "user-02500", "user-04999"] {
            let (status, body) = wagg.get(&format!("/v1/aggregations/stats/keys/{key}"));
            assert_eq!(status, 200, "{key} while migrating: {body}");
            assert!(body["state"]["sum"].is_number(), "{key}: {body}");
            assert!(body["state"]["count"].as_u64() <= counts[key]["count"].as_u64());
        }
        let page = wagg.get("/v1/aggregations/stats/keys?limit=1000").1;
        let items = page["items"].as_array().expect("items");
        assert!(
            items.iter().all(|i| i["state"]["sum"].is_number()),
            "{page}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        progress[0] >= 1_000,
        "the migration resumed after the chunk written before the crash, not from the start: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    producing.join().expect("producer");
    wait_current(&wagg, &common::count_and_stats_applied(90_000));
    assert_states(&wagg, "count", &counts);
    assert_states(&wagg, "stats", &expected_stats_v2(&all));
    let (_, body) = wagg.get("/v1/aggregations");
    let stats = body["aggregations"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "stats"))
        .expect("stats");
    assert_eq!(stats["plugin"]["state_format"], 2);
    assert!(stats.get("migration").is_none(), "{stats}");
    eprintln!("migration progress seen: {progress:?}");
}

/// The same upgrade by a live reload: `stats` migrates (its counters and
/// states carry over) while `count` goes on live and records keep
/// arriving; a reload back to the old format while the migration runs, or
/// to a plugin that cannot read the stored format, is refused with both
/// formats named; afterwards every key is exact.
#[test]
fn a_reload_to_a_plugin_of_a_new_state_format_migrates_live_and_loses_nothing() {
    let setup = Setup::new(&["purchases"]);
    let keys = 4_000;
    let first = purchases(0, 40_000, keys);
    setup.broker.produce("purchases", &records(&first));
    let v1 = setup.config(&["purchases"], &common::count_and_stats_toml());
    let mut wagg = Wagg::start_with_env(
        setup.dir.path(),
        &v1,
        setup.http_port,
        &[("WAGG_FAULT_DELAY", "migration-chunk:250")],
    );
    wagg.wait_for(&common::count_and_stats_applied(40_000), CATCH_UP);

    let second = purchases(40_000, 20_000, keys);
    let producing = produce_in_background(&setup, &second, 1_000, Duration::from_millis(100));
    wagg.rewrite_config(&setup.config(&["purchases"], &count_and_stats_v2()));
    let (ok, report) = wagg.cli(&["reload"]);
    assert!(ok, "{report}");
    assert!(report.contains("state format 1 → 2"), "{report}");
    // Migrating now (a chunk every 250 ms): going back is refused.
    assert!(migration_of(&wagg, "stats")["keys_migrated"].is_u64());
    let migrating = "wagg_aggregation_migrating{aggregation=\"stats\"}";
    assert_eq!(wagg.metrics().get(migrating), Some(&1.0));
    wagg.rewrite_config(&v1);
    let (status, refused) = wagg.post("/v1/admin/reload", &json!(null));
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.to_string().contains("still being migrated"),
        "{refused}"
    );
    wagg.rewrite_config(&setup.config(&["purchases"], &count_and_stats_v2()));

    let all: Vec<Purchase> = first.iter().chain(&second).cloned().collect();
    let started = std::time::Instant::now();
    while migration_of(&wagg, "stats").is_object() {
        let (status, body) = wagg.get("/v1/aggregations/stats/keys/user-03999");
        assert_eq!(status, 200, "{body}");
        assert!(body["state"]["sum"].is_number(), "{body}");
        assert!(started.elapsed() < CATCH_UP, "migration not done");
        std::thread::sleep(Duration::from_millis(50));
    }
    producing.join().expect("producer");
    wait_current(&wagg, &common::count_and_stats_applied(60_000));
    assert_states(&wagg, "count", &expected_counts(&all));
    assert_states(&wagg, "stats", &expected_stats_v2(&all));
    assert_eq!(wagg.metrics().get(migrating), Some(&0.0));
    // The old plugin cannot read format 2.
    wagg.rewrite_config(&v1);
    let (status, refused) = wagg.post("/v1/admin/reload", &json!(null));
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused
            .to_string()
            .contains("does not migrate from that format"),
        "{refused}"
    );
    assert!(wagg.terminate().success());
}

/// Measurement, not a check (run by hand: `cargo test --release --test
/// pipeline migration_rate -- --ignored --nocapture`): how fast a restart
/// migrates 100,000 `stats` keys to format 2 (BENCHMARKS.md).
#[test]
#[ignore]
fn migration_rate() {
    let setup = Setup::new(&["purchases"]);
    let keys = 100_000;
    let data = purchases(0, 200_000, keys);
    setup.broker.produce("purchases", &records(&data));
    let v1 = setup.config(&["purchases"], &common::count_and_stats_toml());
    let mut wagg = setup.start(&v1);
    wagg.wait_for(&common::count_and_stats_applied(200_000), CATCH_UP);
    assert!(wagg.terminate().success());
    drop(wagg);
    let started = std::time::Instant::now();
    let wagg = setup.start(&setup.config(&["purchases"], &count_and_stats_v2()));
    while !wagg.log().contains("state migrated") {
        assert!(started.elapsed() < CATCH_UP, "{}", wagg.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = wagg
        .log()
        .lines()
        .find(|l| l.contains("state migrated"))
        .map(str::to_owned)
        .unwrap_or_default();
    eprintln!("migration of {keys} keys: {line}");
    assert_states(&wagg, "stats", &expected_stats_v2(&data));
}

/// One windowed aggregation as the test computes it: per (key, window
/// start) the count, per partition the stream time, and the late records.
struct WindowTruth {
    size: i64,
    advance: i64,
    grace: i64,
    counts: BTreeMap<(String, i64), u64>,
    stream_times: BTreeMap<i32, i64>,
    late: u64,
    applied: u64,
}

impl WindowTruth {
    fn new(size: i64, advance: i64, grace: i64) -> Self {
        WindowTruth {
            size,
            advance,
            grace,
            counts: BTreeMap::new(),
            stream_times: BTreeMap::new(),
            late: 0,
            applied: 0,
        }
    }

    /// A record of `partition` (in offset order): stream time moves to it,
    /// then it counts in every window covering it that is still open.
    fn add(&mut self, partition: i32, key: &str, time: i64) {
        let stream_time = self.stream_times.entry(partition).or_insert(time);
        *stream_time = (*stream_time).max(time);
        let stream_time = *stream_time;
        let mut open = 0;
        let mut start = time - time.rem_euclid(self.advance);
        while start + self.size > time {
            if stream_time < start + self.size + self.grace {
                *self.counts.entry((key.to_owned(), start)).or_default() += 1;
                open += 1;
            }
            start -= self.advance;
        }
        if open == 0 {
            self.late += 1;
        } else {
            self.applied += 1;
        }
    }
}

/// Three windowed `count`s over `/ts`: minute windows (10 s grace, 10 min
/// retention), five-minute windows every minute (30 s grace) and sessions
/// (5 s gap, 10 s grace, 10 min retention).
fn windowed_counts() -> String {
    format!(
        r#"
[[aggregation]]
name = "per_minute"
plugin = {count:?}
time = "/ts"
window = {{ kind = "tumbling", size = "1m", grace = "10s", retention = "10m" }}

[[aggregation]]
name = "five_minutes"
plugin = {count:?}
time = "/ts"
window = {{ kind = "hopping", size = "5m", advance = "1m", grace = "30s" }}

[[aggregation]]
name = "sessions"
plugin = {count:?}
time = "/ts"
window = {{ kind = "session", gap = "5s", grace = "10s", retention = "10m" }}
"#,
        count = plugin("count")
    )
}

/// The start of the test's event times: an hour boundary.
const T0: i64 = 1_700_000_040_000 - 1_700_000_040_000 % 3_600_000;

/// `n` records of 12 keys on 2 partitions, half a second of event time
/// apart, up to 20 s out of order, and every 40th 3 minutes behind (late
/// for the minute windows, not always for the five-minute ones).
fn click_records(n: i64, seed: u64) -> Vec<(i32, String, String)> {
    let mut rng = wagg::tools::rng::Rng(seed);
    (0..n)
        .map(|i| {
            let key = format!("user-{}", rng.next_u64() % 12);
            let jitter = (rng.next_u64() % 25_000) as i64 - 20_000;
            let behind = if i % 40 == 39 { 180_000 } else { 0 };
            let ts = T0 + i * 500 + jitter - behind;
            (click_partition(&key), key, json!({ "ts": ts }).to_string())
        })
        .collect()
}

fn click_partition(key: &str) -> i32 {
    (key.len() as i32 + key.as_bytes()[key.len() - 1] as i32) % 2
}

/// The truth of both windowed aggregations over `records`.
fn window_truths(records: &[(i32, String, String)]) -> (WindowTruth, WindowTruth) {
    let mut tumbling = WindowTruth::new(60_000, 60_000, 10_000);
    let mut hopping = WindowTruth::new(300_000, 60_000, 30_000);
    for (partition, key, value) in records {
        let ts = serde_json::from_str::<Value>(value).unwrap()["ts"]
            .as_i64()
            .unwrap();
        tumbling.add(*partition, key, ts);
        hopping.add(*partition, key, ts);
    }
    (tumbling, hopping)
}

/// The minute windows' retention.
const RETENTION: i64 = 600_000;

/// Checks both aggregations' counters, stream times and every key's
/// windows against the truth: exact counts and `closed` flags; the minute
/// windows ending before stream time − retention − one window deleted,
/// the ones after it kept. Returns how many minute windows had to go.
fn assert_windows_exact(wagg: &Wagg, tumbling: &WindowTruth, hopping: &WindowTruth) -> usize {
    let (_, body) = wagg.get("/v1/aggregations");
    let mut stored = BTreeMap::new();
    for (name, truth) in [("per_minute", tumbling), ("five_minutes", hopping)] {
        let info = body["aggregations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap();
        assert_eq!(info["records_late"], json!(truth.late), "{name}");
        assert_eq!(info["records_applied"], json!(truth.applied), "{name}");
        let kind = if name == "per_minute" {
            "tumbling"
        } else {
            "hopping"
        };
        assert_eq!(info["window"]["kind"], json!(kind));
        let stream_times: BTreeMap<i32, i64> = info["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| Some((p["partition"].as_i64()? as i32, p["stream_time"].as_i64()?)))
            .collect();
        assert_eq!(stream_times, truth.stream_times, "{name}");
        stored.insert(name, info["keys"].as_u64().expect("keys"));
    }
    for (name, truth) in [("per_minute", tumbling), ("five_minutes", hopping)] {
        let mut windows = 0;
        for key in (0..12).map(|k| format!("user-{k}")) {
            let (status, answer) = wagg.get(&format!("/v1/aggregations/{name}/keys/{key}"));
            assert_eq!(status, 200, "{name} {key}: {answer}");
            assert_eq!(answer["key"], json!(key));
            let stream_time = truth.stream_times[&click_partition(&key)];
            let got: BTreeMap<i64, (u64, bool)> = answer["windows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| {
                    let (start, end) = (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap());
                    assert_eq!(end - start, truth.size);
                    (
                        start,
                        (
                            w["state"]["count"].as_u64().unwrap(),
                            w["closed"].as_bool().unwrap(),
                        ),
                    )
                })
                .collect();
            let starts: Vec<i64> = got.keys().copied().collect();
            assert!(
                starts.windows(2).all(|w| w[0] < w[1]),
                "{name} {key}: not in start order"
            );
            for ((_, start), count) in truth
                .counts
                .range((key.clone(), i64::MIN)..=(key.clone(), i64::MAX))
            {
                let end = start + truth.size;
                let closed = stream_time >= end + truth.grace;
                let kept = name == "five_minutes" || end > stream_time - RETENTION;
                let surely_deleted =
                    name == "per_minute" && end <= stream_time - RETENTION - 60_000;
                match got.get(start) {
                    Some(answered) => {
                        assert!(
                            !surely_deleted,
                            "{name} {key} window {start}: kept past retention"
                        );
                        assert_eq!(*answered, (*count, closed), "{name} {key} window {start}");
                    }
                    None => assert!(!kept, "{name} {key} window {start} missing"),
                }
            }
            assert!(
                got.keys()
                    .all(|start| truth.counts.contains_key(&(key.clone(), *start))),
                "{name} {key}: windows without records"
            );
            windows += got.len() as u64;
        }
        // One state per key and window, retention's deletions included.
        assert_eq!(stored[name], windows, "{name}: `keys`");
    }
    tumbling
        .counts
        .keys()
        .filter(|(key, start)| {
            start + 60_000 <= tumbling.stream_times[&click_partition(key)] - RETENTION - 60_000
        })
        .count()
}

/// What `wait_for` expects of the three windowed aggregations over
/// `records`.
fn windows_applied(records: &[(i32, String, String)]) -> BTreeMap<String, u64> {
    let (tumbling, hopping) = window_truths(records);
    BTreeMap::from([
        ("per_minute".to_owned(), tumbling.applied),
        ("five_minutes".to_owned(), hopping.applied),
        ("sessions".to_owned(), click_sessions(records).applied),
    ])
}

/// The truth of the `sessions` aggregation over click records.
fn click_sessions(records: &[(i32, String, String)]) -> SessionTruth {
    let mut truth = SessionTruth::new(5_000, 10_000);
    for (partition, key, value) in records {
        let ts = serde_json::from_str::<Value>(value).unwrap()["ts"]
            .as_i64()
            .unwrap();
        truth.add(*partition, key, ts, 0);
    }
    truth
}

#[test]
fn tumbling_and_hopping_windows_are_exact_with_late_records_counted_and_old_windows_deleted() {
    let setup = Setup::new(&["clicks"]);
    let records = click_records(3_000, 0x3171_d0e5);
    let (tumbling, hopping) = window_truths(&records);
    assert!(
        tumbling.late > 20 && hopping.late < tumbling.late,
        "{} {}",
        tumbling.late,
        hopping.late
    );

    // The minute windows also emit their changes.
    setup.broker.create_topic("minute-changes", PARTITIONS);
    let aggregations = windowed_counts().replacen(
        "name = \"per_minute\"\n",
        "name = \"per_minute\"\nemit = { topic = \"minute-changes\" }\n",
        1,
    );
    // In two halves, the first written before the second arrives, so the
    // sweeps find old windows on disk to delete.
    let wagg = setup.start(&setup.config(&["clicks"], &aggregations));
    let (first, second) = records.split_at(1_500);
    setup.broker.produce("clicks", first);
    wagg.wait_for(&windows_applied(first), CATCH_UP);
    setup.broker.produce("clicks", second);
    wagg.wait_for(&windows_applied(&records), CATCH_UP);

    let deleted = assert_windows_exact(&wagg, &tumbling, &hopping);
    assert!(deleted > 50, "the test should delete windows ({deleted})");
    // Each window's last emitted record is its final count (windows
    // deleted past retention included: they were emitted while alive; a
    // deletion emits nothing).
    let mut emitted: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for record in setup.broker.read_all("minute-changes", PARTITIONS) {
        let start: i64 = record.headers["wagg.window.start"].parse().unwrap();
        let end: i64 = record.headers["wagg.window.end"].parse().unwrap();
        assert_eq!(end - start, 60_000, "{:?}", record.headers);
        let state: Value = serde_json::from_slice(&record.value.expect("no tombstones")).unwrap();
        let key = String::from_utf8(record.key).unwrap();
        emitted.insert((key, start), state["count"].as_u64().unwrap());
    }
    assert_eq!(
        emitted, tumbling.counts,
        "last emitted count of every minute window"
    );
    let sessions = click_sessions(&records);
    assert!(
        sessions.bridges > 20 && sessions.late > 20,
        "{} {}",
        sessions.bridges,
        sessions.late
    );
    let deleted = assert_sessions_exact(&wagg, &sessions, "sessions", None);
    assert!(deleted > 50, "the test should delete sessions ({deleted})");

    // A range: the windows overlapping it only.
    let from = T0 + 600_000;
    let to = T0 + 720_000;
    let (status, answer) = wagg.get(&format!(
        "/v1/aggregations/five_minutes/keys/user-3/windows?from={from}&to={to}"
    ));
    assert_eq!(status, 200, "{answer}");
    let starts: Vec<i64> = answer["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["start"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = hopping
        .counts
        .keys()
        .filter(|(key, start)| key == "user-3" && *start < to && start + 300_000 > from)
        .map(|(_, start)| *start)
        .collect();
    assert_eq!(starts, expected);
    // Listings show each key once, with its windows.
    let (_, page) = wagg.get("/v1/aggregations/five_minutes/keys?limit=5");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{page}");
    assert_eq!(items[0]["key"], json!("user-0"));
    assert!(
        items[0]["state"]["windows"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    );
    let (_, page) = wagg.get(&format!(
        "/v1/aggregations/five_minutes/keys?limit=100&after={}",
        page["next"].as_str().unwrap()
    ));
    assert_eq!(page["items"].as_array().unwrap().len(), 7, "{page}");
}

/// kill -9 while windowed records flow (windows closing, late records
/// sorted out, old windows deleted), three times: after the last restart
/// every window, counter and stream time is exactly what one clean run
/// gives — the stream times and deletes are written with the offsets.
#[test]
fn windows_stay_exact_across_kill_9_during_window_closes_and_deletes() {
    let setup = Setup::new(&["clicks"]);
    let records = click_records(8_000, 0x3171_d0e6);
    let (tumbling, hopping) = window_truths(&records);
    let address = setup.broker.address.clone();
    let to_produce = records.clone();
    let producer = std::thread::spawn(move || {
        let producer = common::broker::ProducerOnly::new(&address);
        for chunk in to_produce.chunks(100) {
            producer.produce("clicks", chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let config = setup.config(&["clicks"], &windowed_counts());
    // A commit every 100 ms: many writes of stream times and deletes for
    // the kills to fall between.
    let config = config.replace(
        "max_delay_ms = 50",
        "max_delay_ms = 50\ncommit_interval_ms = 100",
    );
    let mut rng = wagg::tools::rng::Rng(0x6b11_1009);
    for kill in 0..3 {
        // tansu never expires a SIGKILLed member: each start joins anew.
        let config = config.replace("wagg-test", &format!("wagg-test-{kill}"));
        let mut wagg = setup.start(&config);
        let started = std::time::Instant::now();
        while wagg.applied().get("per_minute").copied().unwrap_or(0) == 0 {
            assert!(
                started.elapsed() < CATCH_UP,
                "nothing applied: {}",
                wagg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 1_200));
        wagg.kill();
    }
    producer.join().expect("producer");
    let mut wagg = setup.start(&config.replace("wagg-test", "wagg-test-3"));
    wagg.wait_for(&windows_applied(&records), CATCH_UP);
    let deleted = assert_windows_exact(&wagg, &tumbling, &hopping);
    assert!(deleted > 100, "the test should delete windows ({deleted})");
    let deleted = assert_sessions_exact(&wagg, &click_sessions(&records), "sessions", None);
    assert!(deleted > 100, "the test should delete sessions ({deleted})");

    // Stopped with everything written, then 40 records 3 minutes behind
    // each partition's stream time: late for the minute windows only if
    // the stream times came back from the store.
    assert!(wagg.terminate().success());
    drop(wagg);
    let mut all = records.clone();
    for i in 0..40 {
        let key = format!("user-{}", i % 12);
        let partition = click_partition(&key);
        let ts = tumbling.stream_times[&partition] - 180_000 + i;
        all.push((partition, key, json!({ "ts": ts }).to_string()));
    }
    let (tumbling, hopping) = window_truths(&all);
    assert!(tumbling.late >= 40, "{}", tumbling.late);
    let wagg = setup.start(&config.replace("wagg-test", "wagg-test-4"));
    setup.broker.produce("clicks", &all[records.len()..]);
    wagg.wait_for(&windows_applied(&all), CATCH_UP);
    assert_windows_exact(&wagg, &tumbling, &hopping);
    let sessions = click_sessions(&all);
    assert!(sessions.late >= click_sessions(&records).late + 40);
    assert_sessions_exact(&wagg, &sessions, "sessions", None);
}

/// Session windows as the test computes them, record by record in each
/// partition's order (Kafka Streams' rules): per key its sessions
/// `(start, end)` with their records' amounts.
struct SessionTruth {
    gap: i64,
    grace: i64,
    sessions: BTreeMap<String, Vec<(i64, i64, Vec<i64>)>>,
    stream_times: BTreeMap<i32, i64>,
    late: u64,
    applied: u64,
    /// Records that joined two or more sessions into one.
    bridges: u64,
}

impl SessionTruth {
    fn new(gap: i64, grace: i64) -> Self {
        SessionTruth {
            gap,
            grace,
            sessions: BTreeMap::new(),
            stream_times: BTreeMap::new(),
            late: 0,
            applied: 0,
            bridges: 0,
        }
    }

    /// A record joins every session of its key within `gap` of it; it is
    /// late if the session it would make has closed (stream time > end +
    /// gap + grace).
    fn add(&mut self, partition: i32, key: &str, time: i64, amount: i64) {
        let stream_time = self.stream_times.entry(partition).or_insert(time);
        *stream_time = (*stream_time).max(time);
        let stream_time = *stream_time;
        let sessions = self.sessions.entry(key.to_owned()).or_default();
        let (joining, rest): (Vec<_>, Vec<_>) = sessions
            .drain(..)
            .partition(|(start, end, _)| *end >= time - self.gap && *start <= time + self.gap);
        let start = joining.iter().map(|s| s.0).fold(time, i64::min);
        let end = joining.iter().map(|s| s.1).fold(time, i64::max);
        *sessions = rest;
        if stream_time > end + self.gap + self.grace {
            self.late += 1;
            sessions.extend(joining);
            return;
        }
        if joining.len() >= 2 {
            self.bridges += 1;
        }
        let mut amounts: Vec<i64> = joining.into_iter().flat_map(|s| s.2).collect();
        amounts.push(amount);
        sessions.push((start, end, amounts));
        sessions.sort();
        self.applied += 1;
    }
}

/// `n` records of 8 keys on 2 partitions, 400 ms of event time apart;
/// each key is quiet for 90 s every 270 s (so its sessions, gap 1 min,
/// end); every 25th record lands in the middle of the quiet time its key
/// just had — between two sessions, within the gap of both: it merges
/// them — and every 40th is 5 minutes behind (late).
fn visit_records(n: i64, seed: u64) -> Vec<(i32, String, String)> {
    const PHASE: i64 = 90_000;
    let quiet = |k: i64, at: i64| ((at - T0).div_euclid(PHASE) + k) % 3 == 0;
    let mut rng = wagg::tools::rng::Rng(seed);
    let mut out = Vec::new();
    for i in 0..n {
        let base = T0 + i * 400;
        let amount = (rng.next_u64() % 100) as i64;
        let (k, ts) = if i % 25 == 24 {
            // A key whose quiet time ended 10–60 s ago: its middle.
            let Some(k) = (0..8).find(|&k| {
                let ended = base - (base - T0).rem_euclid(PHASE);
                quiet(k, ended - 1)
                    && !quiet(k, base)
                    && base - ended >= 10_000
                    && base - ended <= 60_000
            }) else {
                continue;
            };
            let ended = base - (base - T0).rem_euclid(PHASE);
            (k, ended - PHASE / 2)
        } else {
            let active: Vec<i64> = (0..8).filter(|&k| !quiet(k, base)).collect();
            let k = active[(rng.next_u64() % active.len() as u64) as usize];
            let behind = if i % 40 == 39 { 300_000 } else { 0 };
            (k, base - (rng.next_u64() % 5_000) as i64 - behind)
        };
        let key = format!("visitor-{k}");
        let value = json!({ "ts": ts, "amount": amount }).to_string();
        out.push((click_partition(&key), key, value));
    }
    out
}

fn session_truth(records: &[(i32, String, String)]) -> SessionTruth {
    let mut truth = SessionTruth::new(60_000, 30_000);
    for (partition, key, value) in records {
        let value: Value = serde_json::from_str(value).unwrap();
        let (ts, amount) = (
            value["ts"].as_i64().unwrap(),
            value["amount"].as_i64().unwrap(),
        );
        truth.add(*partition, key, ts, amount);
    }
    truth
}

/// Session retention in the test (`retention = "10m"`).
const SESSION_RETENTION: i64 = 600_000;

/// Checks a session-windowed `count` (and `stats` over `/amount`) against
/// the truth: counters and every key's sessions — bounds, states,
/// `closed` — with the sessions past retention deleted. Returns how many
/// were.
fn assert_sessions_exact(
    wagg: &Wagg,
    truth: &SessionTruth,
    counts: &str,
    stats: Option<&str>,
) -> usize {
    let names: Vec<&str> = std::iter::once(counts).chain(stats).collect();
    let (_, body) = wagg.get("/v1/aggregations");
    for &name in &names {
        let info = body["aggregations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap();
        assert_eq!(info["window"]["kind"], json!("session"));
        assert_eq!(info["records_late"], json!(truth.late), "{name}");
        assert_eq!(info["records_applied"], json!(truth.applied), "{name}");
    }
    let mut deleted = 0;
    for (key, sessions) in &truth.sessions {
        let stream_time = truth.stream_times[&click_partition(key)];
        let mut expected_counts = BTreeMap::new();
        let mut expected_stats = BTreeMap::new();
        for (start, end, amounts) in sessions {
            if *end < stream_time - SESSION_RETENTION {
                deleted += 1;
                continue;
            }
            let closed = stream_time > end + truth.gap + truth.grace;
            let n = amounts.len() as f64;
            let mean = amounts.iter().sum::<i64>() as f64 / n;
            let variance = amounts
                .iter()
                .map(|a| (*a as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            expected_counts.insert((*start, *end), (json!({ "count": amounts.len() }), closed));
            let stats = json!({
                "count": amounts.len(),
                "min": *amounts.iter().min().unwrap() as f64,
                "max": *amounts.iter().max().unwrap() as f64,
                "mean": mean,
                "variance": variance,
            });
            expected_stats.insert((*start, *end), (stats, closed));
        }
        let checks = std::iter::once((counts, &expected_counts))
            .chain(stats.map(|name| (name, &expected_stats)));
        for (name, expected) in checks {
            let (status, answer) = wagg.get(&format!("/v1/aggregations/{name}/keys/{key}"));
            assert_eq!(status, 200, "{name} {key}: {answer}");
            let got: Vec<((i64, i64), (Value, bool))> = answer["windows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| {
                    let bounds = (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap());
                    (bounds, (w["state"].clone(), w["closed"].as_bool().unwrap()))
                })
                .collect();
            let bounds: Vec<(i64, i64)> = got.iter().map(|(b, _)| *b).collect();
            let want: Vec<(i64, i64)> = expected.keys().copied().collect();
            assert_eq!(bounds, want, "{name} {key}: sessions");
            for (bounds, (state, closed)) in got {
                let (want_state, want_closed) = &expected[&bounds];
                assert!(
                    json_approx_eq(&state, want_state),
                    "{name} {key} {bounds:?}: {state} ≠ {want_state}"
                );
                assert_eq!(closed, *want_closed, "{name} {key} {bounds:?}: closed");
            }
        }
    }
    deleted
}

/// Session windows over `count` and `stats` (which merge): records that
/// bridge two sessions — stored ones and ones of the same batch — merge
/// them; late records are counted; sessions past retention are deleted;
/// a range query picks the overlapping sessions. Exact against a
/// record-at-a-time model of Kafka Streams' rules.
#[test]
fn session_windows_merge_on_bridging_records_and_are_exact() {
    let setup = Setup::new(&["visits"]);
    let records = visit_records(6_000, 0x5e55_1011);
    let truth = session_truth(&records);
    assert!(
        truth.bridges >= 20,
        "the test should bridge sessions ({})",
        truth.bridges
    );
    assert!(
        truth.late >= 50,
        "the test should have late records ({})",
        truth.late
    );
    let aggregations = format!(
        r#"
[[aggregation]]
name = "visits"
plugin = {count:?}
time = "/ts"
window = {{ kind = "session", gap = "1m", grace = "30s", retention = "10m" }}

[[aggregation]]
name = "visit_spend"
plugin = {stats:?}
params = {{ field = "/amount" }}
time = "/ts"
window = {{ kind = "session", gap = "1m", grace = "30s", retention = "10m" }}
"#,
        count = plugin("count"),
        stats = plugin("stats")
    );
    let applied = |truth: &SessionTruth| {
        BTreeMap::from([
            ("visits".to_owned(), truth.applied),
            ("visit_spend".to_owned(), truth.applied),
        ])
    };
    let wagg = setup.start(&setup.config(&["visits"], &aggregations));
    // In two halves, the first written before the second arrives, so
    // bridging records merge stored sessions too.
    let (first, second) = records.split_at(3_000);
    setup.broker.produce("visits", first);
    wagg.wait_for(&applied(&session_truth(first)), CATCH_UP);
    setup.broker.produce("visits", second);
    wagg.wait_for(&applied(&truth), CATCH_UP);
    let deleted = assert_sessions_exact(&wagg, &truth, "visits", Some("visit_spend"));
    assert!(deleted >= 20, "the test should delete sessions ({deleted})");

    // A range: the sessions overlapping it (a session covers its end).
    let key = "visitor-3";
    let (start, end, _) = truth.sessions[key]
        .iter()
        .rev()
        .nth(1)
        .expect("two sessions")
        .clone();
    let (status, answer) = wagg.get(&format!(
        "/v1/aggregations/visits/keys/{key}/windows?from={end}&to={}",
        end + 1
    ));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["windows"][0]["start"], json!(start), "{answer}");
    assert_eq!(answer["windows"].as_array().unwrap().len(), 1, "{answer}");
}
