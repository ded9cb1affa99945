//! Several `wagg run` processes in one consumer group on a real broker
//! (tansu, SQLite): partitions are spread over them, state moves with the
//! partitions through the changelog topics, and any instance answers any
//! key — exactly, after a SIGKILL and after scaling out mid-ingest.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::broker::{Broker, ProducerOnly, free_port};
use common::wagg_process::{Wagg, urlencode};
use common::{json_approx_eq, stats_json};
use serde_json::{Value, json};
use wagg::cluster::partitioner::partition_for_key;
use wagg::tools::rng::Rng;

const PARTITIONS: u32 = 8;

/// One cluster at a time: three instances and a broker already fill two
/// cores, and the tests time rebalances.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}
const KEYS: usize = 1500;
const TOPIC: &str = "events";

/// Records with their partition as Kafka's default partitioner picks it,
/// and the truth they add up to.
struct DataSet {
    records: Vec<(i32, String, String)>,
    counts: BTreeMap<String, u64>,
    amounts: BTreeMap<String, Vec<f64>>,
    /// Key → window start → count, of 10-minute windows over `/ts` (event
    /// times rise with the record number: none is late).
    windows: BTreeMap<String, BTreeMap<i64, u64>>,
}

/// The event time of the first record; each next one is 100 ms later.
const T0: i64 = 1_795_939_200_000;
/// `per10m`'s window size.
const WINDOW: i64 = 600_000;

impl DataSet {
    fn new(n: usize) -> Self {
        let mut data = DataSet {
            records: Vec::with_capacity(n),
            counts: BTreeMap::new(),
            amounts: BTreeMap::new(),
            windows: BTreeMap::new(),
        };
        for i in 0..n {
            let key = format!("user-{:04}", (i * 7919) % KEYS);
            let amount = ((i * 37) % 1000) as f64 / 4.0;
            *data.counts.entry(key.clone()).or_default() += 1;
            data.amounts.entry(key.clone()).or_default().push(amount);
            let ts = T0 + i as i64 * 100;
            *data
                .windows
                .entry(key.clone())
                .or_default()
                .entry(ts - ts.rem_euclid(WINDOW))
                .or_default() += 1;
            let partition = partition_for_key(key.as_bytes(), PARTITIONS) as i32;
            data.records.push((
                partition,
                key,
                json!({ "amount": amount, "ts": ts }).to_string(),
            ));
        }
        data
    }
}

struct Cluster {
    broker: Broker,
    dirs: Vec<tempfile::TempDir>,
    instances: Vec<Option<Wagg>>,
    standby_replicas: u32,
    /// Extra lines for `[source.kafka]` and `[cluster]`.
    source_kafka: &'static str,
    cluster_extra: &'static str,
    commit_interval_ms: u64,
    /// Environment of every instance started.
    env: Vec<(&'static str, &'static str)>,
    /// The `[[aggregation]]` tables; `stats` says whether they include
    /// `stats` (checked with `count` when they do).
    aggregations: String,
    stats: bool,
    /// `stats` is version 2 (state format 2): its states also have `sum`.
    stats_v2: bool,
    /// The aggregations include `per10m` (windowed `count`), checked too.
    windowed: bool,
    /// Each instance's HTTP port (kept for restarts).
    ports: Vec<u16>,
}

impl Cluster {
    fn new() -> Self {
        let broker = Broker::start();
        broker.create_topic(TOPIC, PARTITIONS);
        Cluster {
            broker,
            dirs: Vec::new(),
            instances: Vec::new(),
            standby_replicas: 0,
            source_kafka: "",
            cluster_extra: "",
            commit_interval_ms: 2000,
            env: Vec::new(),
            aggregations: common::count_and_stats_toml(),
            stats: true,
            stats_v2: false,
            windowed: false,
            ports: Vec::new(),
        }
    }

    fn config(&self, port: u16) -> String {
        self.config_in_group(port, "wagg-scale")
    }

    /// The config with another group id (the topics stay `wagg-scale-*`):
    /// tansu never expires a member killed with SIGKILL, so a restarted
    /// single instance joins a fresh group.
    fn config_in_group(&self, port: u16, group: &str) -> String {
        format!(
            r#"
[source]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{TOPIC}"]

[source.kafka]
{source_kafka}

[state]
dir = "state"

[http]
listen = "127.0.0.1:{port}"

# Two apply workers, whatever the machine (see `apply.threads`).
[apply]
threads = 2

[batch]
max_records = 500
max_delay_ms = 20
commit_interval_ms = {commit_interval_ms}

[cluster]
advertised_http = "http://127.0.0.1:{port}"
topic_prefix = "wagg-scale-"
replication_factor = 1
standby_replicas = {standby}
{cluster_extra}
{aggregations}"#,
            brokers = self.broker.address,
            standby = self.standby_replicas,
            source_kafka = self.source_kafka,
            cluster_extra = self.cluster_extra,
            commit_interval_ms = self.commit_interval_ms,
            aggregations = self.aggregations
        )
    }

    /// Starts one more instance and waits until it owns partitions.
    fn add_instance(&mut self) -> usize {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let wagg = Wagg::start_with_env(dir.path(), &self.config(port), port, &self.env);
        self.dirs.push(dir);
        self.ports.push(port);
        self.instances.push(Some(wagg));
        let index = self.instances.len() - 1;
        self.wait_until(
            "the new instance owns partitions",
            Duration::from_secs(90),
            |c| c.owned_by(index) > 0,
        );
        index
    }

    /// Starts every instance again on its state directory and port, with
    /// the current config (after they were stopped).
    fn start_all_again(&mut self) {
        for index in 0..self.instances.len() {
            let port = self.ports[index];
            let config = self.config(port);
            let wagg = Wagg::start_with_env(self.dirs[index].path(), &config, port, &self.env);
            self.instances[index] = Some(wagg);
        }
    }

    fn live(&self) -> Vec<&Wagg> {
        self.instances.iter().flatten().collect()
    }

    /// Partitions the instance says it owns.
    fn owned_by(&self, index: usize) -> usize {
        let Some(wagg) = &self.instances[index] else {
            return 0;
        };
        let (_, body) = wagg.get("/v1/aggregations");
        body["aggregations"][0]["partitions"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["assigned"] == true).count())
    }

    /// Starts three instances, ingests `records` records and waits until
    /// every key is exact.
    fn three_instances_with(&mut self, records: usize, rng: &mut Rng) -> DataSet {
        for _ in 0..3 {
            self.add_instance();
        }
        let data = DataSet::new(records);
        self.broker.produce(TOPIC, &data.records);
        self.wait_exact(&data, rng, Duration::from_secs(180));
        data
    }

    /// A metric summed over the live instances.
    fn metric_sum(&self, series: &str) -> f64 {
        self.live()
            .iter()
            .map(|w| w.metrics().get(series).copied().unwrap_or(0.0))
            .sum()
    }

    /// What each live instance reports of every partition (owner,
    /// offsets, copies).
    fn partition_reports(&self) -> Vec<Vec<Value>> {
        self.live()
            .iter()
            .map(|wagg| {
                let (_, body) = wagg.get("/v1/aggregations");
                body["aggregations"][0]["partitions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Whether every live instance keeps a copy of every partition it does
    /// not own, at the owner's offset.
    fn standby_copies_current(&self) -> bool {
        let reports = self.partition_reports();
        let owner_offset = |partition: &Value| {
            reports
                .iter()
                .flatten()
                .find(|p| p["partition"] == *partition && p["assigned"] == true)
                .and_then(|p| p["next_offset"].as_i64())
        };
        reports.iter().flatten().all(|p| {
            p["assigned"] == true
                || (p["standby_offset"].as_i64().is_some()
                    && p["standby_offset"].as_i64() == owner_offset(&p["partition"]))
        })
    }

    /// Whether every partition has at least one standby copy at its
    /// owner's offset.
    fn every_partition_has_a_current_copy(&self) -> bool {
        let reports: Vec<Value> = self.partition_reports().into_iter().flatten().collect();
        (0..PARTITIONS as i64).all(|partition| {
            let of = |p: &&Value| p["partition"] == partition;
            let owner = reports
                .iter()
                .filter(of)
                .find(|p| p["assigned"] == true)
                .and_then(|p| p["next_offset"].as_i64());
            owner.is_some()
                && reports
                    .iter()
                    .filter(of)
                    .any(|p| p["assigned"] != true && p["standby_offset"].as_i64() == owner)
        })
    }

    /// The owner of every partition as one instance reports it.
    fn ownership(&self, wagg: &Wagg) -> BTreeMap<i64, Option<String>> {
        let (_, body) = wagg.get("/v1/aggregations");
        body["aggregations"][0]["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["partition"].as_i64().unwrap_or(-1),
                    p["owner"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }

    /// A 6 s group session and a 3 s membership timeout instead of the
    /// defaults (45 s, 10 s): a killed or paused instance is noticed in
    /// seconds, and the suite does not wait most of a minute per kill.
    fn notice_deaths_quickly(&mut self) {
        self.source_kafka = "\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000";
        self.cluster_extra = "member_timeout_ms = 3000";
    }

    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn logs(&self) -> String {
        self.live()
            .iter()
            .map(|w| {
                let log: String = w
                    .log()
                    .lines()
                    .filter(|l| !l.contains("tower_http"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                format!("--- {} ---\n{}", w.http, tail(&log, 40))
            })
            .collect()
    }

    /// Looks every key up on a random live instance until every state is
    /// exact; returns how many lookups were not answered 200 on the way.
    fn wait_exact(&self, data: &DataSet, rng: &mut Rng, timeout: Duration) -> usize {
        let started = Instant::now();
        let mut unanswered = 0;
        loop {
            let mismatches = self.check_every_key(data, rng, &mut unanswered);
            if mismatches.is_empty() {
                return unanswered;
            }
            assert!(
                started.elapsed() < timeout,
                "states not exact within {timeout:?}: {} keys differ, e.g. {:?}; logs:\n{}",
                mismatches.len(),
                &mismatches[..mismatches.len().min(5)],
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn check_every_key(
        &self,
        data: &DataSet,
        rng: &mut Rng,
        unanswered: &mut usize,
    ) -> Vec<String> {
        let live = self.live();
        let client = reqwest::blocking::Client::new();
        let mut mismatches = Vec::new();
        for (key, count) in &data.counts {
            let wagg = live[(rng.next_u64() % live.len() as u64) as usize];
            let get = |aggregation: &str| -> Option<Value> {
                let response = lookup(&client, wagg, aggregation, key)?;
                if response.status().as_u16() != 200 {
                    return None;
                }
                response
                    .json::<Value>()
                    .ok()
                    .map(|body| body["state"].clone())
            };
            let Some(got_count) = get("count") else {
                *unanswered += 1;
                mismatches.push(format!("{key}: count not answered by {}", wagg.http));
                continue;
            };
            // Counts only grow, one record at a time: any count up to the
            // truth is a state the key went through; above it, never.
            let answered = got_count["count"].as_u64().unwrap_or(u64::MAX);
            assert!(
                answered <= *count,
                "{key}: {} answered count {answered}, above the truth {count}",
                wagg.http
            );
            if got_count != json!({ "count": count }) {
                mismatches.push(format!("{key}: count {got_count} != {count}"));
                continue;
            }
            if self.stats {
                let Some(got_stats) = get("stats") else {
                    *unanswered += 1;
                    mismatches.push(format!("{key}: stats not answered by {}", wagg.http));
                    continue;
                };
                let mut want = stats_json(&data.amounts[key]);
                if self.stats_v2 {
                    want["sum"] = json!(data.amounts[key].iter().sum::<f64>());
                }
                if !json_approx_eq(&got_stats, &want) {
                    mismatches.push(format!("{key}: stats {got_stats} != {want}"));
                }
            }
            if !self.windowed {
                continue;
            }
            let Some(response) = lookup(&client, wagg, "per10m", key) else {
                *unanswered += 1;
                mismatches.push(format!("{key}: per10m not answered by {}", wagg.http));
                continue;
            };
            let body: Value = response.json().unwrap_or_default();
            let got: BTreeMap<i64, u64> = body["windows"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| Some((w["start"].as_i64()?, w["state"]["count"].as_u64()?)))
                .collect();
            if got != data.windows[key] {
                mismatches.push(format!("{key}: windows {got:?} != {:?}", data.windows[key]));
            }
        }
        mismatches
    }
}

/// A key's state from one instance (`None`: no answer at all).
fn lookup(
    client: &reqwest::blocking::Client,
    wagg: &Wagg,
    aggregation: &str,
    key: &str,
) -> Option<reqwest::blocking::Response> {
    client
        .get(format!(
            "{}/v1/aggregations/{aggregation}/keys/{}",
            wagg.http,
            urlencode(key)
        ))
        .timeout(Duration::from_secs(10))
        .send()
        .ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A test's broker and (empty) cluster, once the previous test's are gone,
/// and its random lookups (`WAGG_SCALE_SEED=<printed seed>` replays them).
fn start(test: &str, standby_replicas: u32) -> (std::sync::MutexGuard<'static, ()>, Rng, Cluster) {
    let serial = one_at_a_time();
    let seed = std::env::var("WAGG_SCALE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("{test}: seed {seed}");
    let mut cluster = Cluster::new();
    cluster.standby_replicas = standby_replicas;
    (serial, Rng(seed), cluster)
}

/// Produces `records` in chunks from another thread, pausing between
/// them, so the instances are mid-ingest for a while.
fn produce_slowly(
    address: String,
    records: Vec<(i32, String, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer = ProducerOnly::new(&address);
        for chunk in records.chunks(2_000) {
            producer.produce(TOPIC, chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
    })
}

#[test]
fn three_instances_answer_every_key_exactly_from_any_instance() {
    let (_serial, mut rng, mut cluster) = start("scale-out test", 0);
    let data = cluster.three_instances_with(30_000, &mut rng);

    // Each instance owns some partitions, every partition has one owner,
    // and all instances agree on who.
    let live = cluster.live();
    let ownership = cluster.ownership(live[0]);
    assert_eq!(ownership.len(), PARTITIONS as usize, "{ownership:?}");
    for wagg in &live {
        assert!(
            ownership.values().any(|o| o.as_deref() == Some(&wagg.http)),
            "{} owns nothing: {ownership:?}",
            wagg.http
        );
        assert_eq!(
            cluster.ownership(wagg),
            ownership,
            "as {} sees it",
            wagg.http
        );
    }

    // A listing from any instance merges every instance's keys.
    for wagg in &live {
        let listed = wagg.all_states("count");
        let expected: BTreeMap<String, Value> = data
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), json!({ "count": v })))
            .collect();
        assert_eq!(listed, expected, "listing from {}", wagg.http);
    }

    // A key owned elsewhere is forwarded: the answer names its server.
    let key = data.counts.keys().next().expect("a key");
    let response = reqwest::blocking::Client::new()
        .get(format!("{}/v1/aggregations/count/keys/{key}", live[0].http))
        .send()
        .expect("lookup");
    let owner = ownership[&i64::from(partition_for_key(key.as_bytes(), PARTITIONS))].clone();
    if owner.as_deref() != Some(&live[0].http) {
        assert_eq!(
            response
                .headers()
                .get("x-wagg-served-by")
                .and_then(|v| v.to_str().ok()),
            owner.as_deref()
        );
    }
    // A watch of a key owned elsewhere is redirected to the same watch on
    // its owner, whose stream starts with the key's state.
    let (key, count) = data
        .counts
        .iter()
        .find(|(key, _)| {
            let partition = i64::from(partition_for_key(key.as_bytes(), PARTITIONS));
            ownership[&partition].as_deref() != Some(&live[0].http)
        })
        .expect("a key another instance owns");
    let owner = ownership[&i64::from(partition_for_key(key.as_bytes(), PARTITIONS))]
        .clone()
        .expect("an owner");
    let path = format!("/v1/aggregations/count/keys/{}/watch", urlencode(key));
    let no_redirects = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(None)
        .build()
        .expect("client");
    let redirected = no_redirects
        .get(format!("{}{path}", live[0].http))
        .send()
        .expect("watch");
    assert_eq!(redirected.status(), 307);
    assert_eq!(
        redirected.headers()["location"].to_str().ok(),
        Some(format!("{owner}{path}").as_str())
    );
    let stream = no_redirects
        .get(format!("{owner}{path}"))
        .send()
        .expect("watch on the owner");
    assert_eq!(stream.status(), 200);
    let first = std::io::BufRead::lines(std::io::BufReader::new(stream))
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("data: ").map(str::to_owned))
        .expect("a first event");
    assert_eq!(
        serde_json::from_str::<Value>(&first).expect("JSON"),
        json!({ "key": key, "state": { "count": count } })
    );

    // `wagg lag` shows the owners.
    let lag = std::process::Command::new(env!("CARGO_BIN_EXE_wagg"))
        .args(["lag", "--url", &live[0].http])
        .output()
        .expect("wagg lag");
    let lag = String::from_utf8_lossy(&lag.stdout);
    assert!(lag.contains("OWNER"), "{lag}");
    for wagg in &live {
        assert!(lag.contains(&wagg.http), "{lag}");
    }
}

#[test]
fn a_killed_instances_partitions_move_and_every_key_stays_exact() {
    let (_serial, mut rng, mut cluster) = start("kill test", 0);
    cluster.notice_deaths_quickly();
    for _ in 0..3 {
        cluster.add_instance();
    }
    let data = DataSet::new(40_000);
    let (first, rest) = data.records.split_at(20_000);
    cluster.broker.produce(TOPIC, first);
    let producing = produce_slowly(cluster.broker.address.clone(), rest.to_vec());
    // The first instance to join, which leads the group: its death must
    // also start a new generation. Mid-ingest: it has applied records.
    let victim = 0;
    cluster.wait_until("the victim applies records", Duration::from_secs(60), |c| {
        c.instances[victim]
            .as_ref()
            .is_some_and(|w| w.applied().get("count").copied().unwrap_or(0) > 0)
    });
    let victims_partitions = cluster.owned_by(victim);
    let killed_at = Instant::now();
    cluster.instances[victim].as_mut().expect("victim").kill();
    cluster.instances[victim] = None;
    eprintln!("killed instance {victim} owning {victims_partitions} partitions");

    cluster.wait_until(
        "the survivors own every partition",
        // A take-over that the broker stalls is retried for two minutes,
        // then the group is re-joined (see `Cluster::take_over`).
        Duration::from_secs(360),
        |c| (0..c.instances.len()).map(|i| c.owned_by(i)).sum::<usize>() == PARTITIONS as usize,
    );
    let moved_after = killed_at.elapsed();
    producing.join().expect("producer");
    let unanswered = cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
    eprintln!(
        "kill test: survivors owned all partitions {moved_after:?} after the kill; every key exact {:?} after it ({unanswered} lookups unanswered on the way)",
        killed_at.elapsed()
    );
    // Once settled, every lookup is answered, by any survivor.
    let mut unanswered = 0;
    let mismatches = cluster.check_every_key(&data, &mut rng, &mut unanswered);
    assert!(
        mismatches.is_empty() && unanswered == 0,
        "{} keys differ or were not answered once settled, e.g. {:?}; logs:\n{}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)],
        cluster.logs()
    );
    assert!(
        cluster.metric_sum("wagg_restored_records_total") > 0.0,
        "nothing was restored from the changelog"
    );
}

/// Two instances, a third joining mid-ingest, with `count` (emitting its
/// changes), `stats` and a windowed `count` (10-minute windows over
/// `/ts`): every key exact after, windows included — window states and
/// stream times move with their partitions — and each key's last emitted
/// `count` is its final count, whichever instances owned it.
#[test]
fn scaling_from_two_to_three_instances_mid_ingest_keeps_every_key_and_window_exact() {
    let (_serial, mut rng, mut cluster) = start("scale 2 → 3 test", 1);
    cluster.broker.create_topic("scale-changes", PARTITIONS);
    let emitting = common::count_and_stats_toml().replacen(
        "name = \"count\"\n",
        "name = \"count\"\nemit = { topic = \"scale-changes\" }\n",
        1,
    );
    cluster.aggregations = format!(
        "{emitting}\n[[aggregation]]\nname = \"per10m\"\nplugin = {:?}\ntime = \"/ts\"\nwindow = {{ kind = \"tumbling\", size = \"10m\" }}\n",
        common::plugin("count")
    );
    cluster.windowed = true;
    let data = scale_from_two_to_three(&mut cluster, &mut rng);
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for record in cluster.broker.read_all("scale-changes", PARTITIONS) {
        let state: Value =
            serde_json::from_slice(&record.value.unwrap_or_default()).expect("an emitted count");
        let key = String::from_utf8_lossy(&record.key).into_owned();
        last.insert(key, state["count"].as_u64().expect("count"));
    }
    assert_eq!(last, data.counts, "the last emitted count of every key");
}

/// Two instances, a third joining mid-ingest: every key exact after.
/// Returns what was produced.
fn scale_from_two_to_three(cluster: &mut Cluster, rng: &mut Rng) -> DataSet {
    // With a standby copy of every partition, following it while partitions
    // move: copies must never disturb an owner's state.
    cluster.add_instance();
    cluster.add_instance();
    let data = DataSet::new(40_000);
    let (first, rest) = data.records.split_at(20_000);
    cluster.broker.produce(TOPIC, first);
    let producing = produce_slowly(cluster.broker.address.clone(), rest.to_vec());
    cluster.wait_until("records are applied", Duration::from_secs(60), |c| {
        c.live()
            .iter()
            .map(|w| w.applied().get("count").copied().unwrap_or(0))
            .sum::<u64>()
            > 5_000
    });
    let third = cluster.add_instance();
    producing.join().expect("producer");
    cluster.wait_exact(&data, rng, Duration::from_secs(180));
    assert!(cluster.owned_by(third) > 0);
    assert_eq!(
        (0..3).map(|i| cluster.owned_by(i)).sum::<usize>(),
        PARTITIONS as usize
    );
    data
}

#[test]
fn standby_copies_answer_while_an_owner_is_dead_and_take_over_without_a_restore() {
    // Two copies besides the owner: every survivor has every partition.
    let (_serial, mut rng, mut cluster) = start("standby test", 2);
    // Default timeouts: the hanging owner below must stay a member while
    // its keys are asked for.
    let data = cluster.three_instances_with(20_000, &mut rng);
    cluster.wait_until(
        "every instance has a current copy of the partitions it does not own",
        Duration::from_secs(120),
        Cluster::standby_copies_current,
    );
    let restored_before = cluster.metric_sum("wagg_restored_records_total");
    assert!(
        cluster.metric_sum("wagg_standby_records_total") > 0.0,
        "no changelog record reached a copy"
    );

    // The group's leader (the first to join), as in the kill test.
    let victim = 0;
    let victims: Vec<i64> = cluster
        .ownership(cluster.instances[0].as_ref().expect("instance 0"))
        .into_iter()
        .filter(|(_, owner)| {
            owner.as_deref() == cluster.instances[victim].as_ref().map(|w| w.http.as_str())
        })
        .map(|(partition, _)| partition)
        .collect();
    assert!(!victims.is_empty(), "the victim owns no partition");
    let client = reqwest::blocking::Client::new();
    let victims_keys: Vec<(&String, &u64)> = data
        .counts
        .iter()
        .filter(|(key, _)| {
            victims.contains(&(partition_for_key(key.as_bytes(), PARTITIONS) as i64))
        })
        .collect();

    // First the victim hangs (SIGSTOP: its port accepts, nothing answers)
    // while its announcements are still fresh: a lookup forwarded to it
    // gives up after a quarter of the request timeout and is answered from
    // a copy, and a listing comes back without the victim's keys, saying
    // so, instead of the whole request timing out.
    let victim_http = cluster.instances[victim]
        .as_ref()
        .expect("victim")
        .http
        .clone();
    cluster.instances[victim]
        .as_ref()
        .expect("victim")
        .signal("STOP");
    let survivor = cluster.instances[1].as_ref().expect("instance 1");
    for (key, count) in victims_keys.iter().take(3) {
        let asked = Instant::now();
        let response = lookup(&client, survivor, "count", key).expect("lookup");
        let took = asked.elapsed();
        assert_eq!(
            response.status().as_u16(),
            200,
            "{key} while its owner hangs (after {took:?})"
        );
        assert!(
            response.headers().contains_key("x-wagg-standby"),
            "{key} from a copy"
        );
        let body: Value = response.json().expect("json");
        assert_eq!(
            body["state"],
            json!({ "count": count }),
            "{key} from a copy"
        );
        eprintln!(
            "standby test: {key} answered from a copy {took:?} after it was asked, its owner hanging"
        );
    }
    let listing: Value = client
        .get(format!(
            "{}/v1/aggregations/count/keys?limit=50",
            survivor.http
        ))
        .timeout(Duration::from_secs(30))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("a listing while an instance hangs");
    assert_eq!(
        listing["missing_instances"],
        json!([victim_http]),
        "{listing}"
    );
    assert_eq!(
        listing["items"].as_array().map(Vec::len),
        Some(50),
        "{listing}"
    );

    let killed_at = Instant::now();
    cluster.instances[victim].as_mut().expect("victim").kill();
    cluster.instances[victim] = None;

    // Right away, and until the group hands the partitions out again, the
    // survivors answer the victim's keys from their copies, exactly.
    let (mut from_standby, mut other) = (0, 0);
    let mut first_standby_answer = None;
    for (key, count) in victims_keys.iter().take(200) {
        let live = cluster.live();
        let wagg = live[(rng.next_u64() % live.len() as u64) as usize];
        let response = lookup(&client, wagg, "count", key).expect("lookup");
        if response.headers().contains_key("x-wagg-standby") {
            assert!(response.headers().contains_key("x-wagg-staleness-ms"));
            assert_eq!(response.status().as_u16(), 200);
            let body: Value = response.json().expect("json");
            assert_eq!(
                body["state"],
                json!({ "count": count }),
                "{key} from a standby"
            );
            from_standby += 1;
            first_standby_answer.get_or_insert_with(|| killed_at.elapsed());
        } else {
            other += 1;
        }
    }
    eprintln!(
        "standby test: {from_standby} of the victim's keys answered from standby copies (first {first_standby_answer:?} after the kill), {other} otherwise"
    );
    assert!(
        from_standby > 0,
        "no lookup was answered from a standby copy"
    );

    cluster.wait_until(
        "the survivors own every partition",
        Duration::from_secs(360),
        |c| (0..c.instances.len()).map(|i| c.owned_by(i)).sum::<usize>() == PARTITIONS as usize,
    );
    let moved_after = killed_at.elapsed();
    let unanswered = cluster.wait_exact(&data, &mut rng, Duration::from_secs(120));
    let restored_after = cluster.metric_sum("wagg_restored_records_total");
    eprintln!(
        "standby test: survivors owned all partitions {moved_after:?} after the kill, every key exact {:?} after it ({unanswered} lookups unanswered on the way); records restored after the kill: {}",
        killed_at.elapsed(),
        restored_after - restored_before
    );
    assert_eq!(
        restored_after, restored_before,
        "a take-over restored from the changelog although every survivor had a current copy"
    );
}

#[test]
fn forged_commit_records_are_ignored_and_take_overs_stay_exact() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (_serial, mut rng, mut cluster) = start("forged commits", 0);
    cluster.add_instance();
    let data = DataSet::new(6_000);
    cluster.broker.produce(TOPIC, &data.records);
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(120));

    // Whoever can write the commits topic writes, for every partition, a
    // record that is not JSON, one whose epoch would wrap on the next claim,
    // and one whose offset librdkafka would read as "the end".
    let commits = "wagg-scale-commits";
    let producer = cluster.broker.producer();
    for partition in 0..PARTITIONS as i32 {
        let key = wagg::cluster::log::commit_key(TOPIC, partition, 1);
        let lineage = format!(r#"{{"{}": 3}}"#, u64::MAX);
        for value in [
            "{not json".to_owned(),
            format!(
                r#"{{"epoch": {}, "seq": 3, "next_offset": 5, "lineage": {lineage}}}"#,
                u64::MAX
            ),
            r#"{"epoch": 99, "seq": 1, "next_offset": -1, "lineage": {"99": 1}}"#.to_owned(),
        ] {
            producer
                .send(
                    BaseRecord::to(commits)
                        .partition(partition)
                        .key(&key)
                        .payload(&value),
                )
                .map_err(|(e, _)| e)
                .expect("produce a forged commit");
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    // Take-overs read those records: a second instance moves partitions
    // both ways, more records arrive, and every key stays exact.
    cluster.add_instance();
    let more = DataSet::new(9_000);
    cluster
        .broker
        .produce(TOPIC, &more.records[data.records.len()..]);
    cluster.wait_exact(&more, &mut rng, Duration::from_secs(180));
    let logs: String = cluster.live().iter().map(|w| w.log()).collect();
    assert!(
        logs.contains("ignoring a malformed commit record"),
        "the forged records are reported"
    );
    for wagg in cluster.live() {
        let (status, health) = wagg.get("/healthz");
        assert_eq!(status, 200, "{health}");
    }
}

#[test]
fn a_single_instance_turned_into_a_cluster_keeps_its_state_through_a_crash_mid_move() {
    let (_serial, mut rng, mut cluster) = start("single to cluster", 0);
    let data = DataSet::new(8_000);
    let (first, rest) = data.records.split_at(5_000);
    cluster.broker.produce(TOPIC, first);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cluster_config = |group: &str| cluster.config_in_group(port, group);
    // A single instance (no `[cluster]`) consumes the first records.
    let single_config = cluster_config("wagg-single")
        .split("[cluster]")
        .next()
        .unwrap_or_default()
        .to_owned()
        + &common::count_and_stats_toml();
    let mut single = Wagg::start(dir.path(), &single_config, port);
    single.wait_for(
        &common::count_and_stats_applied(first.len() as u64),
        Duration::from_secs(60),
    );
    assert!(single.terminate().success());

    // Turned into a cluster, it claims its partitions and crashes before
    // their state is published (the fault point sits between the two).
    let mut crashing = Wagg::start_with_env(
        dir.path(),
        &cluster_config("wagg-cluster-1"),
        port,
        &[("WAGG_FAULT_CRASH", "after-claim")],
    );
    let status = crashing.wait_exit(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the injected crash happened: {status:?}; log:\n{}",
        crashing.log()
    );
    assert!(crashing.log().contains("injected crash"));

    // Restarted, it publishes its state; every key is exact through it,
    // with the rest of the records.
    let wagg = Wagg::start(dir.path(), &cluster_config("wagg-cluster-2"), port);
    cluster.instances.push(Some(wagg));
    cluster.broker.produce(TOPIC, rest);
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(120));
    let log = cluster.live()[0].log();
    assert!(
        log.contains("did not finish; publishing it again"),
        "the unfinished move is reported"
    );
}

/// Commit records after a higher epoch's, per partition of the commits
/// topic: what deposed owners wrote after the claim that deposed them.
fn late_commits(broker: &Broker) -> BTreeMap<i32, usize> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "wagg-test-late-commits")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut late = BTreeMap::new();
    for partition in 0..PARTITIONS as i32 {
        let (low, high) = consumer
            .fetch_watermarks("wagg-scale-commits", partition, Duration::from_secs(10))
            .expect("watermarks");
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment
            .add_partition_offset(
                "wagg-scale-commits",
                partition,
                rdkafka::Offset::Offset(low),
            )
            .expect("assignment");
        consumer.assign(&assignment).expect("assign");
        let (mut highest, mut count, mut next) = (0u64, 0usize, low);
        let started = Instant::now();
        while next < high && started.elapsed() < Duration::from_secs(60) {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            next = message.offset() + 1;
            let Ok(commit) = wagg::cluster::log::parse_commit(message.payload()) else {
                continue;
            };
            if commit.epoch < highest {
                count += 1;
            }
            highest = highest.max(commit.epoch);
        }
        assert!(next >= high, "read the commits of partition {partition}");
        late.insert(partition, count);
    }
    late
}

#[test]
fn a_paused_owner_that_wakes_up_is_fenced_and_every_key_stays_exact() {
    let (_serial, mut rng, mut cluster) = start("zombie", 0);
    // Quick to notice the paused instance; flushing every 3 s, so that the
    // paused instance holds records it has applied and not yet written.
    cluster.notice_deaths_quickly();
    cluster.commit_interval_ms = 3000;
    cluster.add_instance();
    cluster.add_instance();
    let data = DataSet::new(16_000);
    let (first, rest) = data.records.split_at(6_000);
    cluster.broker.produce(TOPIC, first);
    cluster.wait_exact(
        &DataSet::new(first.len()),
        &mut rng,
        Duration::from_secs(120),
    );
    let producing = produce_slowly(cluster.broker.address.clone(), rest.to_vec());

    // The second instance is paused just after it consumed records (so they are not written
    // yet); the first takes its partitions over.
    let zombie = 1;
    let consumed = |c: &Cluster| {
        c.instances[zombie]
            .as_ref()
            .expect("zombie")
            .metrics()
            .get("wagg_records_consumed_total")
            .copied()
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    let mut before = consumed(&cluster);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = consumed(&cluster);
        if now > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the instance to pause consumes nothing"
        );
        before = now;
    }
    cluster.instances[zombie]
        .as_ref()
        .expect("zombie")
        .signal("STOP");
    let paused_at = Instant::now();
    let survivor = 0;
    let owns_all = |c: &Cluster| {
        let (_, body) = c.instances[survivor]
            .as_ref()
            .expect("survivor")
            .get("/v1/aggregations");
        body["aggregations"][0]["partitions"]
            .as_array()
            .is_some_and(|p| {
                p.iter().filter(|p| p["assigned"] == true).count() == PARTITIONS as usize
            })
    };
    cluster.wait_until(
        "the survivor owns every partition",
        Duration::from_secs(120),
        owns_all,
    );
    eprintln!(
        "zombie: partitions moved {:?} after the pause",
        paused_at.elapsed()
    );

    // Woken up, it still believes it owns its partitions and writes what
    // it holds: the fence stops it, after one late commit per partition.
    let mut woken = cluster.instances[zombie].take().expect("zombie");
    woken.signal("CONT");
    let status = woken.wait_exit(Duration::from_secs(60));
    let log = woken.log();
    eprintln!("zombie: exit status after waking up: {status:?}");
    assert!(
        status.is_some_and(|s| !s.success()) && log.contains("was taken over by another instance"),
        "the woken instance is fenced: {status:?}; log:\n{}",
        tail(&log, 40)
    );
    drop(woken);

    // More moves: a third instance joins, takes partitions over from the
    // commits the zombie wrote among, and every key is exact.
    cluster.add_instance();
    producing.join().expect("producer");
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
    let late = late_commits(&cluster.broker);
    eprintln!("zombie: late commits per partition: {late:?}");
    assert!(
        late.values().all(|&n| n <= 1),
        "a deposed owner wrote more than one commit after the claim that deposed it: {late:?}"
    );
}

#[test]
fn a_dead_instances_partitions_move_with_one_standby_copy_while_records_keep_coming() {
    let (_serial, mut rng, mut cluster) = start("dead instance, one copy", 1);
    cluster.notice_deaths_quickly();
    let data = cluster.three_instances_with(20_000, &mut rng);
    cluster.wait_until(
        "every partition has a current standby copy",
        Duration::from_secs(120),
        Cluster::every_partition_has_a_current_copy,
    );
    // The group's leader (the first to join), as in the kill test.
    let victim = 0;
    let killed_at = Instant::now();
    cluster.instances[victim].as_mut().expect("victim").kill();
    cluster.instances[victim] = None;
    // Records produced after the kill, not during it.
    let more = DataSet::new(25_000);
    cluster
        .broker
        .produce(TOPIC, &more.records[data.records.len()..]);
    // The group's session timeout, the membership timeout, then most of
    // two minutes.
    let unanswered = cluster.wait_exact(&more, &mut rng, Duration::from_secs(115));
    eprintln!(
        "dead instance, one copy: every key exact through both survivors {:?} after the kill ({unanswered} lookups unanswered on the way, none above the truth)",
        killed_at.elapsed()
    );
}

#[test]
fn forged_member_announcements_are_ignored_and_route_nothing() {
    use rdkafka::producer::{BaseRecord, Producer};
    let (_serial, mut rng, mut cluster) = start("forged announcements", 0);
    cluster.cluster_extra = "secret_env = \"WAGG_CLUSTER_SECRET\"";
    cluster.env = vec![(
        "WAGG_CLUSTER_SECRET",
        "a-test-cluster-secret-of-at-least-32-characters",
    )];
    cluster.add_instance();
    cluster.add_instance();
    let data = DataSet::new(6_000);
    cluster.broker.produce(TOPIC, &data.records);
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(120));

    // An address the test listens on: a forwarded lookup would land here
    // (and fail at once: the connection is closed unanswered).
    let trap = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let trap_http = format!("http://{}", trap.local_addr().expect("address"));
    let trapped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let trapped = trapped.clone();
        std::thread::spawn(move || {
            for connection in trap.incoming() {
                drop(connection);
                trapped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    // Whoever can write the members topic announces that it owns every
    // partition, newer than anyone (without the cluster's tag).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let partitions: Vec<(&str, u32)> = (0..PARTITIONS).map(|p| (TOPIC, p)).collect();
    let forged = json!({
        "http": trap_http,
        "partitions": partitions,
        "standby": [],
        "at_ms": now_ms + 3_600_000,
    })
    .to_string();
    let producer = cluster.broker.producer();
    for _ in 0..3 {
        producer
            .send(
                BaseRecord::to("wagg-scale-members")
                    .partition(0)
                    .key(&trap_http)
                    .payload(&forged),
            )
            .map_err(|(e, _)| e)
            .expect("produce a forged announcement");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    // Every key is still answered exactly by both instances, and nothing
    // was sent to the forged address.
    std::thread::sleep(Duration::from_secs(3));
    let more = DataSet::new(8_000);
    cluster
        .broker
        .produce(TOPIC, &more.records[data.records.len()..]);
    cluster.wait_exact(&more, &mut rng, Duration::from_secs(120));
    let mut unanswered = 0;
    let mismatches = cluster.check_every_key(&more, &mut rng, &mut unanswered);
    assert!(mismatches.is_empty() && unanswered == 0, "{mismatches:?}");
    assert_eq!(
        trapped.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "connections to the forged announcement's address"
    );
    let logs: String = cluster.live().iter().map(|w| w.log()).collect();
    assert!(
        logs.contains("ignoring a member announcement that fails authentication"),
        "the forged announcement is reported"
    );
}

#[test]
fn an_aggregation_added_to_a_cluster_catches_up_on_every_partition_wherever_it_moves() {
    let (_serial, mut rng, mut cluster) = start("aggregation added", 1);
    // Two instances (one standby copy each) run `count` alone...
    cluster.aggregations = common::count_toml();
    cluster.stats = false;
    cluster.add_instance();
    cluster.add_instance();
    let data = DataSet::new(10_000);
    let (first, rest) = data.records.split_at(6_000);
    let (second, third) = rest.split_at(2_000);
    cluster.broker.produce(TOPIC, first);
    cluster.wait_exact(
        &DataSet::new(first.len()),
        &mut rng,
        Duration::from_secs(120),
    );

    // ...stop; more records arrive; both restart with `stats` added.
    for wagg in cluster.instances.iter_mut().flatten() {
        assert!(wagg.terminate().success());
    }
    cluster.broker.produce(TOPIC, second);
    cluster.aggregations = common::count_and_stats_toml();
    cluster.stats = true;
    cluster.start_all_again();
    cluster.broker.produce(TOPIC, third);
    // `stats` holds every record of the topic's history, `count` each
    // record once, through both instances.
    let unanswered = cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
    eprintln!(
        "aggregation added to a cluster: every key exact ({unanswered} lookups unanswered on the way)"
    );
    // And after the partitions move again (the second instance leaves),
    // from the changelog and the copies.
    if let Some(mut leaving) = cluster.instances[1].take() {
        assert!(leaving.terminate().success());
    }
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
}

/// `count` and `stats` version 2 (state format 2, migrates from 1).
fn count_and_stats_v2_toml() -> String {
    common::count_and_stats_toml().replace(
        &format!("{:?}", common::plugin("stats")),
        &format!("{:?}", common::plugin("stats-v2")),
    )
}

/// Produces `records` from another thread, 200 every 300 ms, so an
/// instance starts and joins while they arrive.
fn produce_during(address: &str, records: &[(i32, String, String)]) -> std::thread::JoinHandle<()> {
    let address = address.to_owned();
    let records = records.to_vec();
    std::thread::spawn(move || {
        let producer = ProducerOnly::new(&address);
        for chunk in records.chunks(200) {
            producer.produce(TOPIC, chunk);
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

#[test]
fn a_rolling_upgrade_to_a_new_state_format_migrates_every_copy_and_survives_a_crash_mid_migration()
{
    let (_serial, mut rng, mut cluster) = start("rolling upgrade", 1);
    // Two instances (one standby copy each) run `count` and `stats` 0.1.0.
    cluster.add_instance();
    cluster.add_instance();
    let data = DataSet::new(14_000);
    let upto = |n: usize| DataSet::new(n);
    let records = &data.records;
    cluster.broker.produce(TOPIC, &records[..6_000]);
    cluster.wait_exact(&upto(6_000), &mut rng, Duration::from_secs(120));
    let settled = |c: &Cluster| c.owned_by(0) + c.owned_by(1) == PARTITIONS as usize;

    // Instance 0 stops for its upgrade; instance 1 takes every partition
    // and writes states of format 1 to all of them.
    if let Some(mut wagg) = cluster.instances[0].take() {
        assert!(wagg.terminate().success());
    }
    cluster.broker.produce(TOPIC, &records[6_000..8_000]);
    cluster.wait_exact(&upto(8_000), &mut rng, Duration::from_secs(120));

    // Instance 0 comes back with `stats` 0.2.0 (state format 2), records
    // arriving: it migrates its copy before joining — killed once in the
    // middle — then takes partitions over from the changelog (format 1
    // records, migrated as they are restored).
    let producing = produce_during(&cluster.broker.address, &records[8_000..10_000]);
    cluster.aggregations = count_and_stats_v2_toml();
    let port = cluster.ports[0];
    let config = cluster.config(port);
    let mut crashed = Wagg::spawn_with_env(
        cluster.dirs[0].path(),
        &config,
        port,
        &[("WAGG_FAULT_CRASH", "migration-chunk")],
    );
    let exit = crashed
        .wait_exit(Duration::from_secs(60))
        .expect("the injected crash");
    assert!(!exit.success());
    let log = crashed.log();
    assert!(log.contains("injected crash"), "{}", tail(&log, 40));
    drop(crashed);
    cluster.instances[0] = Some(Wagg::start(cluster.dirs[0].path(), &config, port));
    cluster.wait_until(
        "the upgraded instance owns partitions",
        Duration::from_secs(90),
        |c| c.owned_by(0) > 0 && settled(c),
    );
    producing.join().expect("producer");

    // Instance 1 stops for its upgrade; instance 0 takes every partition
    // and writes states of format 2 to all of them.
    if let Some(mut wagg) = cluster.instances[1].take() {
        let exit = wagg.terminate();
        assert!(
            exit.success(),
            "{exit}: {}\nthe others:\n{}",
            tail(&wagg.log(), 40),
            cluster.logs()
        );
    }
    cluster.broker.produce(TOPIC, &records[10_000..12_000]);
    cluster.stats_v2 = true;
    cluster.wait_exact(&upto(12_000), &mut rng, Duration::from_secs(120));

    // Instance 1 comes back upgraded, records arriving: it migrates its
    // copy (format 1) and reads format 2 back from the changelogs.
    let producing = produce_during(&cluster.broker.address, &records[12_000..]);
    let port = cluster.ports[1];
    let config = cluster.config(port);
    cluster.instances[1] = Some(Wagg::start(cluster.dirs[1].path(), &config, port));
    cluster.wait_until(
        "both upgraded instances own partitions",
        Duration::from_secs(90),
        |c| c.owned_by(1) > 0 && settled(c),
    );
    producing.join().expect("producer");
    let unanswered = cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
    eprintln!("rolling upgrade: every key exact ({unanswered} lookups unanswered on the way)");
    let migrated = cluster
        .live()
        .iter()
        .filter(|w| w.log().contains("local state migrated"))
        .count();
    assert_eq!(migrated, 2, "{}", cluster.logs());
    // And after the partitions move again (instance 1 leaves), from the
    // changelogs and instance 0's copies.
    if let Some(mut leaving) = cluster.instances[1].take() {
        assert!(leaving.terminate().success());
    }
    cluster.wait_exact(&data, &mut rng, Duration::from_secs(180));
}
