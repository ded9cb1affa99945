//! The core invariant in process, without a broker: the applier, the flush
//! state machine and the writer thread over a real RocksDB and real plugins,
//! fed batches by the test. Each "life" resumes every partition at the next
//! offset the store holds (as the source does on assignment), applies some
//! batches with flushes in between, and then "crashes": it is dropped
//! without a final flush, so what it applied since its last write is lost
//! together with the offsets. After several lives and a last one that
//! finishes the input, every key's state must be exactly what the whole
//! input gives, computed independently here.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count_and_stats_toml, json_approx_eq, stats_json};
use wagg::apply::{BatchApplier, EventFeed, Pipeline, SourceEvent};
use wagg::config::Config;
use wagg::ops::status::Status;
use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::record::SourceRecord;
use wagg::state::store::{Slot, StateStore};

const PARTITIONS: i32 = 4;
const KEYS: u64 = 150;
const RECORDS: usize = 12_000;

/// A small seeded generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The input: per partition, records in offset order.
fn input(seed: u64) -> Vec<Vec<SourceRecord>> {
    let mut rng = Rng(seed | 1);
    let topic: Arc<str> = Arc::from("events");
    let mut partitions: Vec<Vec<SourceRecord>> = vec![Vec::new(); PARTITIONS as usize];
    for _ in 0..RECORDS {
        let k = rng.next() % KEYS;
        // A key always lands in the same partition, as Kafka keys do.
        let partition = (k % PARTITIONS as u64) as usize;
        let amount = (rng.next() % 1000) as f64 / 10.0;
        let offset = partitions[partition].len() as i64;
        partitions[partition].push(SourceRecord {
            topic: topic.clone(),
            partition: partition as i32,
            offset,
            key: Some(format!("key-{k:03}").into_bytes()),
            value: Some(format!(r#"{{"amount": {amount}}}"#).into_bytes()),
            timestamp: Some(offset),
            headers: Vec::new(),
        });
    }
    partitions
}

struct Life {
    applier: BatchApplier,
    store: Arc<StateStore>,
}

fn config(state_dir: &Path) -> Config {
    config_with_threads(state_dir, 2)
}

/// The test's config with `apply.threads = threads`.
fn config_with_threads(state_dir: &Path, threads: usize) -> Config {
    let text = format!(
        "[source]\nbrokers = \"unused:9092\"\ntopics = [\"events\"]\n\n[state]\ndir = {:?}\n\n[batch]\n# Flushes happen only when the test asks.\ncommit_interval_ms = 3600000\nmax_unwritten_states = 1000000\n\n[apply]\nthreads = {threads}\n{}",
        state_dir,
        count_and_stats_toml()
    );
    Config::parse(&text, "<apply test>", Path::new("/")).expect("config")
}

/// `count` and `stats` on `state_dir`, with `stats` run by the plugin
/// `stats_plugin` (`stats`, or `stats-v2`: the upgrade) and `extra` config.
fn upgraded(state_dir: &Path, extra: &str, stats_plugin: &str) -> Config {
    let toml = format!(
        "[source]\nbrokers = \"unused:9092\"\ntopics = [\"events\"]\n\n[state]\ndir = {state_dir:?}\n{extra}\n{}",
        count_and_stats_toml().replace(
            &format!("{:?}", common::plugin("stats")),
            &format!("{:?}", common::plugin(stats_plugin))
        )
    );
    Config::parse(&toml, "<apply test>", Path::new("/")).expect("config")
}

fn start(config: &Config) -> Life {
    let runtime = PluginRuntime::new(RuntimeConfig::new(
        &config.plugins,
        config.plugin_cache_dir(),
    ))
    .expect("runtime");
    let plugins = wagg::app::load_plugins(config, &runtime).expect("plugins");
    let (store, aggregations, _) =
        wagg::app::open_aggregations(config, plugins, &AtomicBool::new(false)).expect("store");
    let applier = BatchApplier::new(
        store.clone(),
        Arc::new(Status::default()),
        aggregations,
        None,
        &config.batch,
        None,
    )
    .expect("writer thread");
    Life { applier, store }
}

/// The next batch of up to `size` records from every partition's cursor,
/// partitions interleaved in runs as a consumer delivers them.
fn next_batch(
    input: &[Vec<SourceRecord>],
    cursors: &mut [usize],
    rng: &mut Rng,
) -> Vec<SourceRecord> {
    let mut batch = Vec::new();
    // Mostly small batches, sometimes a backlog's worth (past the size
    // from which the apply workers run in parallel).
    let longest = if rng.next().is_multiple_of(4) {
        1500
    } else {
        40
    };
    for (partition, records) in input.iter().enumerate() {
        let run = (rng.next() % longest) as usize;
        let from = cursors[partition];
        let to = (from + run).min(records.len());
        batch.extend_from_slice(&records[from..to]);
        cursors[partition] = to;
    }
    batch
}

/// Where a new life starts each partition: its stored next offset.
fn resume(store: &StateStore) -> Vec<usize> {
    let stored = store.offsets().expect("offsets");
    (0..PARTITIONS)
        .map(|p| {
            stored
                .get(&("events".to_owned(), p))
                .map_or(0, |next| *next as usize)
        })
        .collect()
}

/// Runs one life: `batches` batches, flushing (waiting, or only handing
/// the write over) at random points; `finish` also applies and writes
/// everything left.
fn live(config: &Config, input: &[Vec<SourceRecord>], rng: &mut Rng, batches: usize, finish: bool) {
    let mut life = start(config);
    let mut cursors = resume(&life.store);
    let never = AtomicBool::new(false);
    let mut applied = 0;
    loop {
        let done = cursors
            .iter()
            .zip(input)
            .all(|(cursor, records)| *cursor == records.len());
        if done || (!finish && applied == batches) {
            break;
        }
        let batch = next_batch(input, &mut cursors, rng);
        if batch.is_empty() {
            continue;
        }
        life.applier.apply(&batch, &never).expect("apply");
        applied += 1;
        match rng.next() % 8 {
            0 => {
                life.applier.flush().expect("flush");
            }
            1 => {
                life.applier.start_flush().expect("start a flush");
            }
            _ => {}
        }
    }
    if finish {
        life.applier.flush().expect("final flush");
    }
    // Dropped without a final flush: the simulated crash. (A write already
    // handed to the writer completes first, as a write RocksDB had
    // acknowledged before a kill would.)
}

/// What every key's count and stats must be after the whole input.
fn expected(input: &[Vec<SourceRecord>]) -> BTreeMap<Vec<u8>, Vec<f64>> {
    let mut amounts: BTreeMap<Vec<u8>, Vec<f64>> = BTreeMap::new();
    for record in input.iter().flatten() {
        let value: serde_json::Value =
            serde_json::from_slice(record.value.as_deref().expect("value")).expect("json");
        amounts
            .entry(record.key.clone().expect("key"))
            .or_default()
            .push(value["amount"].as_f64().expect("amount"));
    }
    amounts
}

/// Renders stored states the way the HTTP API does, one plugin instance
/// per aggregation (loaded once: compiling per key made the test slow).
struct Renderer {
    instances: BTreeMap<String, wagg::plugin::PluginInstance>,
}

impl Renderer {
    fn new(config: &Config) -> Self {
        let runtime = PluginRuntime::new(RuntimeConfig::default()).expect("runtime");
        let instances = config
            .aggregations
            .iter()
            .map(|settings| {
                let plugin = runtime.load(&config.plugin_path(settings)).expect("plugin");
                let instance = plugin
                    .instantiate(&settings.params_json())
                    .expect("instance");
                (settings.name.clone(), instance)
            })
            .collect();
        Self { instances }
    }

    fn render(&mut self, store: &StateStore, aggregation: &str, key: &[u8]) -> serde_json::Value {
        let state = store
            .find(aggregation, key)
            .expect("read")
            .unwrap_or_else(|| {
                panic!(
                    "{aggregation}: no state for {}",
                    String::from_utf8_lossy(key)
                )
            });
        let instance = self.instances.get_mut(aggregation).expect("aggregation");
        serde_json::from_str(&instance.render(&state).expect("render")).expect("json")
    }
}

#[test]
fn applier_and_writer_are_exactly_once_across_crashes_between_flushes() {
    // One apply worker, and more workers than partitions of some shards.
    for threads in [1, 3] {
        exactly_once_across_crashes(threads);
    }
}

fn exactly_once_across_crashes(threads: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_threads(&dir.path().join("state"), threads);
    let input = input(0x5eed_0001);
    let mut rng = Rng(0xC0FFEE);
    for _ in 0..6 {
        let batches = 5 + (rng.next() % 40) as usize;
        live(&config, &input, &mut rng, batches, false);
    }
    live(&config, &input, &mut rng, 0, true);

    let life = start(&config);
    let next = resume(&life.store);
    let lengths: Vec<usize> = input.iter().map(Vec::len).collect();
    assert_eq!(
        next, lengths,
        "every partition's stored next offset is its end"
    );
    let expected = expected(&input);
    assert_eq!(expected.len() as u64, KEYS);
    let counters = life.store.counters("count").expect("counters");
    assert_eq!(counters.records_applied, RECORDS as u64);
    drop(life.applier);
    let mut renderer = Renderer::new(&config);
    for (key, amounts) in &expected {
        let name = String::from_utf8_lossy(key);
        assert_eq!(
            renderer.render(&life.store, "count", key),
            serde_json::json!({ "count": amounts.len() }),
            "count of {name}"
        );
        let stats = renderer.render(&life.store, "stats", key);
        assert!(
            json_approx_eq(&stats, &stats_json(amounts)),
            "stats of {name}: {stats} != {}",
            stats_json(amounts)
        );
    }
}

/// However many workers apply the batches, and however the batches are cut
/// and flushed, the store ends up byte for byte the same: every state of
/// both aggregations, the counters and the offsets.
#[test]
fn any_number_of_apply_threads_writes_the_same_store() {
    let input = input(0x5eed_0002);
    let keys: Vec<Vec<u8>> = expected(&input).into_keys().collect();
    let mut runs = Vec::new();
    for (threads, seed) in [(1, 7), (2, 11), (4, 13), (5, 17)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with_threads(&dir.path().join("state"), threads);
        live(&config, &input, &mut Rng(seed), 0, true);
        let Life { applier, store } = start(&config);
        drop(applier);
        let mut image = Vec::new();
        for aggregation in ["count", "stats"] {
            for key in &keys {
                image.push(store.find(aggregation, key).expect("read"));
            }
            image.push(Some(
                format!("{:?}", store.counters(aggregation).expect("counters")).into_bytes(),
            ));
        }
        image.push(Some(
            format!("{:?}", store.offsets().expect("offsets")).into_bytes(),
        ));
        runs.push((threads, image));
    }
    let (_, one_thread) = &runs[0];
    assert!(
        one_thread.iter().all(Option::is_some),
        "every key has a state"
    );
    for (threads, image) in &runs[1..] {
        let differ = one_thread.iter().zip(image).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{threads} apply threads: {differ} states, counters or offsets differ from 1 thread's"
        );
    }
}

/// A source that hands the pipeline a fixed list of events, in order, and
/// then asks it to stop.
struct Script {
    events: Mutex<VecDeque<SourceEvent>>,
    shutdown: Arc<AtomicBool>,
    /// Empty polls answered after the events before asking to stop (the
    /// loop does work between batches, such as a migration).
    linger: std::sync::atomic::AtomicUsize,
}

impl Script {
    fn new(events: VecDeque<SourceEvent>, shutdown: Arc<AtomicBool>, linger: usize) -> Self {
        Self {
            events: Mutex::new(events),
            shutdown,
            linger: linger.into(),
        }
    }
}

impl EventFeed for Script {
    fn recv_timeout(&self, _: Duration) -> Result<SourceEvent, RecvTimeoutError> {
        let next = self.events.lock().expect("script").pop_front();
        next.ok_or_else(|| {
            let left = self.linger.load(Ordering::Relaxed);
            if left == 0 {
                self.shutdown.store(true, Ordering::Relaxed);
            } else {
                self.linger.store(left - 1, Ordering::Relaxed);
            }
            RecvTimeoutError::Timeout
        })
    }

    fn start_catch_up(&self, _: &str, _: i32, _: i64, _: i64) {}

    fn commit(&self, _: &[(&str, i32, i64)]) {}

    fn close(self: Box<Self>) {}
}

/// Records fetched before a revocation reach the pipeline behind it (the
/// source thread queues them; librdkafka may hand one over in the poll
/// that ran the revocation). Applied, they gave a partition that moved
/// away effects in the next flush: in cluster mode that flush failed
/// ("covers a partition this instance has not taken over") and stopped
/// consumption; alone, the state went past what the partition's next
/// owner resumes from.
#[test]
fn records_and_catch_up_events_of_a_revoked_partition_queued_behind_the_revocation_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir.path().join("state"));
    let input = input(0x5eed_0002);
    let (p0, p1) = (&input[0], &input[1]);
    let (done, acknowledged) = mpsc::channel();
    let both = vec![("events".to_owned(), 0), ("events".to_owned(), 1)];
    let events = VecDeque::from([
        SourceEvent::Assigned(both.clone()),
        SourceEvent::Records([&p0[..50], &p1[..50]].concat()),
        SourceEvent::Revoked {
            partitions: both,
            done,
        },
        // Fetched before the revocation, queued behind it.
        SourceEvent::Records([&p0[50..80], &p1[50..60]].concat()),
        SourceEvent::CatchUp(p0[80..90].to_vec()),
        SourceEvent::CaughtUp {
            topic: Arc::from("events"),
            partition: 0,
            at: 90,
        },
        SourceEvent::Assigned(vec![("events".to_owned(), 1)]),
        SourceEvent::Records(p1[50..100].to_vec()),
    ]);
    let shutdown = Arc::new(AtomicBool::new(false));
    let life = start(&config);
    let script = Script::new(events, shutdown.clone(), 0);
    let pipeline = Pipeline::new(Box::new(script), life.applier, Arc::new(Status::default()));
    pipeline
        .run(&shutdown)
        .expect("the pipeline runs the script");
    assert!(
        acknowledged.try_recv().is_err(),
        "the revocation was acknowledged (its sender dropped)"
    );

    let stored = life.store.offsets().expect("offsets");
    assert_eq!(stored.get(&("events".to_owned(), 0)), Some(&50));
    assert_eq!(stored.get(&("events".to_owned(), 1)), Some(&100));
    let applied = [&p0[..50], &p1[..100]].concat();
    let expected = expected(&[applied]);
    let counters = life.store.counters("count").expect("counters");
    assert_eq!(counters.records_applied, 150);
    let mut renderer = Renderer::new(&config);
    for (key, amounts) in &expected {
        assert_eq!(
            renderer.render(&life.store, "count", key),
            serde_json::json!({ "count": amounts.len() }),
            "count of {}",
            String::from_utf8_lossy(key)
        );
    }
}

/// A plugin upgrade with a new state format, as `wagg run` opens it: with
/// a plugin that migrates from the stored format, the aggregation is
/// recorded as migrating (and applies nothing until it is done); going
/// back to the old plugin mid-migration is refused; in cluster mode the
/// start migrates every key before it returns (before joining the group).
#[test]
fn opening_a_store_with_a_plugin_of_a_new_format_starts_a_migration_only_where_it_can() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = config(&dir.path().join("state"));
    let mut life = start(&v1);
    let input = input(0x5eed_0003);
    let never = AtomicBool::new(false);
    life.applier.apply(&input[0][..100], &never).expect("apply");
    life.applier.flush().expect("flush");
    drop(life);

    let with =
        |extra: &str, stats_plugin: &str| upgraded(&dir.path().join("state"), extra, stats_plugin);
    let open = |config: &Config| {
        let runtime = PluginRuntime::new(RuntimeConfig::default()).expect("runtime");
        let plugins = wagg::app::load_plugins(config, &runtime).expect("plugins");
        wagg::app::open_aggregations(config, plugins, &AtomicBool::new(false))
            .map(|(store, _, _)| store)
    };
    let stored_sizes = |store: &StateStore| {
        let slot = Slot {
            topic_id: store.topic_id("events").expect("topic"),
            partition: 0,
        };
        let mut sizes = BTreeMap::new();
        store
            .scan_slot("stats", slot, &mut |key, state| {
                sizes.insert(key.to_vec(), state.len());
                true
            })
            .expect("scan");
        sizes
    };
    let store = open(&with("", "stats-v2")).expect("migration starts");
    let v1_sizes = stored_sizes(&store);
    let meta = store.aggregation_meta("stats").unwrap().expect("meta");
    assert_eq!(meta.state_format, 2);
    let migration = meta.migration.expect("migrating");
    assert_eq!(migration.from_format, 1);
    assert_eq!(migration.resume, vec![("events".to_owned(), 0, 100)]);
    drop(store);
    // Back to the old plugin: refused, naming both formats.
    let back = open(&v1).err().expect("refused while migrating");
    assert!(
        format!("{back:#}").contains("being migrated to state format 2"),
        "{back:#}"
    );
    // In cluster mode the start migrates every key before it returns:
    // each state is format 2, a `sum` (8 bytes) longer.
    let cluster = "[cluster]\nadvertised_http = \"http://127.0.0.1:1\"\n";
    let store = open(&with(cluster, "stats-v2")).expect("migrated in cluster mode");
    let meta = store.aggregation_meta("stats").unwrap().expect("meta");
    assert_eq!((meta.state_format, meta.migration), (2, None));
    let v2_sizes = stored_sizes(&store);
    assert!(!v1_sizes.is_empty());
    let expected: BTreeMap<Vec<u8>, usize> = v1_sizes
        .into_iter()
        .map(|(key, size)| (key, size + 8))
        .collect();
    assert_eq!(v2_sizes, expected);
}

/// A `migrate` that fails on one key (here: a state the old plugin could
/// not have written, put there by hand) stops consumption with the key and
/// the plugin's message; the keys before it stay migrated and the
/// migration resumes at that key once the cause is gone, then finishes.
#[test]
fn a_failing_migrate_stops_at_the_key_with_its_message_and_resumes_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = config(&dir.path().join("state"));
    let input = input(0x5eed_0004);
    let mut life = start(&v1);
    let never = AtomicBool::new(false);
    life.applier.apply(&input[0], &never).expect("apply");
    life.applier.flush().expect("flush");
    let slot = wagg::state::store::Slot {
        topic_id: life.store.topic_id("events").expect("topic"),
        partition: 0,
    };
    let mut write = life.store.begin_write();
    write
        .put_state("stats", slot, b"key-bad", &[0xff; 3])
        .expect("corrupt state");
    life.store.write(write).expect("write");
    drop(life);

    let v2 = upgraded(&dir.path().join("state"), "", "stats-v2");
    let run = |config: &Config| {
        let life = start(config);
        let shutdown = Arc::new(AtomicBool::new(false));
        let script = Script::new(VecDeque::new(), shutdown.clone(), 50);
        let outcome = Pipeline::new(Box::new(script), life.applier, Arc::new(Status::default()))
            .run(&shutdown);
        (life.store, outcome)
    };
    let (store, outcome) = run(&v2);
    let error = outcome
        .expect_err("the bad key stops the migration")
        .to_string();
    assert!(
        error.contains("\"key-bad\"") && error.contains("from state format 1"),
        "{error}"
    );
    let migration = store
        .aggregation_meta("stats")
        .expect("meta")
        .and_then(|meta| meta.migration)
        .expect("still migrating");
    assert!(
        migration.through.as_deref() < Some(b"key-bad".as_slice()),
        "{migration:?}"
    );
    // The keys before it are migrated already.
    let (state, behind) = store
        .reading("stats", |s| s.get("stats", slot, b"key-000"))
        .expect("read");
    assert!(state.is_some());
    assert_eq!(behind.expect("migrating").old_format_of(b"key-000"), None);

    let mut write = store.begin_write();
    write
        .delete_state("stats", slot, b"key-bad")
        .expect("remove the bad state");
    store.write(write).expect("write");
    drop(store);
    let (store, outcome) = run(&v2);
    outcome.expect("the migration finishes");
    let meta = store
        .aggregation_meta("stats")
        .expect("meta")
        .expect("stats");
    assert_eq!((meta.state_format, meta.migration), (2, None));
    drop(store);
    let mut renderer = Renderer::new(&v2);
    let life = start(&v2);
    for (key, amounts) in expected(&input[..1]) {
        let mut want = stats_json(&amounts);
        want["sum"] = serde_json::json!(amounts.iter().sum::<f64>());
        let got = renderer.render(&life.store, "stats", &key);
        assert!(json_approx_eq(&got, &want), "{got} != {want}");
    }
}
