//! `wagg bench e2e` and `wagg bench query`: one pre-produced topic, read
//! first by a raw rdkafka consumer that discards everything (the ceiling),
//! then by a `wagg run` child process aggregating it from the beginning;
//! optionally with key lookups against that process while it ingests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use super::query::{self, LoadResult};
use super::{Rng, aggregation_toml, key, report, value};
use crate::tools::author::build::{example_plugin, example_plugins_dir};
use crate::tools::tansu::{Tansu, free_port, tansu_binary};

#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// A running broker; when absent, tansu is started with in-memory
    /// storage on a free loopback port.
    pub brokers: Option<String>,
    /// The tansu binary (default `$WAGG_TANSU`, the setup script's cache,
    /// or `tansu` on the PATH).
    pub tansu: Option<PathBuf>,
    pub records: u64,
    pub partitions: i32,
    pub keys: u64,
    pub plugin: String,
    pub plugins_dir: Option<PathBuf>,
    /// Lookups per second while wagg ingests (`wagg bench query`).
    pub query_rate: Option<u32>,
    /// How long to measure lookups with ingestion stopped.
    pub max_rate_seconds: u64,
    /// wagg's `batch.commit_interval_ms`.
    pub commit_interval_ms: u64,
    /// librdkafka properties for both consumers (wagg's `[source.kafka]`).
    pub consumer_properties: Vec<(String, String)>,
    /// The aggregation emits its changes to `<topic>-changes`.
    pub emit: bool,
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eRow {
    pub plugin: String,
    /// Whether the aggregation emitted its changes.
    pub emit: bool,
    pub records: u64,
    pub partitions: i32,
    pub keys: u64,
    pub produce_rate: f64,
    pub raw_seconds: f64,
    pub raw_rate: f64,
    pub wagg_startup_seconds: f64,
    pub wagg_seconds: f64,
    pub wagg_rate: f64,
    pub wagg_over_raw: f64,
}

/// A child process killed on drop.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }
    Ok(())
}

fn produce(brokers: &str, topic: &str, options: &E2eOptions) -> anyhow::Result<f64> {
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating the producer")?;
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    let started = Instant::now();
    for _ in 0..options.records {
        let k = rng.next_u64() % options.keys;
        let key = key(k);
        let value = value(&mut rng);
        let mut record = BaseRecord::to(topic)
            .partition((k % options.partitions as u64) as i32)
            .key(&key)
            .payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("producing: {e}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .context("flushing the producer")?;
    Ok(options.records as f64 / started.elapsed().as_secs_f64())
}

/// Reads and discards the whole topic; returns the seconds it took.
fn raw_consume(brokers: &str, topic: &str, options: &E2eOptions) -> anyhow::Result<f64> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-raw"))
        .set("enable.auto.commit", "false");
    for (key, value) in &options.consumer_properties {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().context("creating the raw consumer")?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..options.partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut seen = 0u64;
    let mut bytes = 0usize;
    while seen < options.records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                use rdkafka::Message;
                bytes += message.payload().map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(e)) => bail!("raw consumer: {e}"),
            None if started.elapsed() > Duration::from_secs(600) => {
                bail!(
                    "raw consumer: only {seen} of {} records in 10 minutes",
                    options.records
                )
            }
            None => {}
        }
    }
    std::hint::black_box(bytes);
    Ok(started.elapsed().as_secs_f64())
}

fn applied(client: &reqwest::blocking::Client, base: &str) -> Option<u64> {
    let body: serde_json::Value = client
        .get(format!("{base}/v1/aggregations"))
        .send()
        .ok()?
        .json()
        .ok()?;
    body["aggregations"][0]["records_applied"].as_u64()
}

// Long on purpose: the benchmark's steps in the order BENCHMARKS.md
/// `wagg bench query`: [`run`] as configured and, with `unpaced`, again
/// with librdkafka's fetch wait at 10 ms — tansu then answers fetches as
/// soon as it has records instead of holding them, so wagg ingests as fast
/// as the broker serves — and both sets of lookups side by side.
pub fn run_query(options: &E2eOptions, unpaced: bool) -> anyhow::Result<Vec<LoadResult>> {
    let (_, mut lookups) = run(options)?;
    if !unpaced {
        return Ok(lookups);
    }
    let mut fast = options.clone();
    fast.consumer_properties
        .retain(|(name, _)| name != "fetch.wait.max.ms");
    fast.consumer_properties
        .push(("fetch.wait.max.ms".into(), "10".into()));
    fast.out = options
        .out
        .as_ref()
        .map(|o| o.with_extension("unpaced.json"));
    let (_, unpaced_lookups) = run(&fast)?;
    lookups.extend(unpaced_lookups.into_iter().map(|mut result| {
        result.phase = format!("unpaced: {}", result.phase);
        result
    }));
    report(
        "wagg bench query: paced and unpaced ingestion",
        &lookups,
        None,
    )?;
    Ok(lookups)
}

// describes them (broker, produce, raw consumer, wagg, lookups), each a
// few lines with its own progress message.
pub fn run(options: &E2eOptions) -> anyhow::Result<(E2eRow, Vec<LoadResult>)> {
    let work = tempfile::tempdir().context("creating a work directory")?;
    let (_broker, brokers) = match &options.brokers {
        Some(brokers) => (None, brokers.clone()),
        None => {
            // Sequential reads from the start only: memory storage is fine.
            let broker = Tansu::start(
                &tansu_binary(options.tansu.as_deref()),
                work.path(),
                "memory://tansu/",
            )?;
            let address = broker.address().to_owned();
            (Some(broker), address)
        }
    };
    let topic = format!(
        "wagg-bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    create_topic(&brokers, &topic, options.partitions)?;
    eprintln!(
        "e2e: producing {} records to {topic} on {brokers}...",
        options.records
    );
    let produce_rate = produce(&brokers, &topic, options)?;
    eprintln!("e2e: produced at {produce_rate:.0} records/s; raw consumer...");
    let raw_seconds = raw_consume(&brokers, &topic, options)?;
    eprintln!("e2e: raw consumer took {raw_seconds:.2} s; wagg...");

    let plugins = example_plugins_dir(options.plugins_dir.as_deref())?;
    let port = free_port()?;
    let kafka: String = options
        .consumer_properties
        .iter()
        .map(|(key, value)| format!("{key:?} = {value:?}\n"))
        .collect();
    let mut aggregation =
        aggregation_toml(&options.plugin, &example_plugin(&plugins, &options.plugin));
    if options.emit {
        let changes = format!("{topic}-changes");
        create_topic(&brokers, &changes, options.partitions)?;
        aggregation.push_str(&format!("emit = {{ topic = {changes:?} }}\n"));
    }
    let config = format!(
        "[source]\nbrokers = \"{brokers}\"\ngroup_id = \"{topic}-wagg\"\ntopics = [\"{topic}\"]\n\n[source.kafka]\n{kafka}\n[state]\ndir = \"state\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[batch]\ncommit_interval_ms = {}\n\n{aggregation}",
        options.commit_interval_ms,
    );
    let config_path = work.path().join("wagg.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(work.path().join("wagg.log"))?;
    let spawned = Instant::now();
    let _wagg = Guarded(
        Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting wagg")?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    while applied(&client, &base).is_none() {
        if spawned.elapsed() > Duration::from_secs(120) {
            bail!(
                "wagg did not start; see {}",
                work.path().join("wagg.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let startup = spawned.elapsed();
    let ingest_started = Instant::now();
    let done = AtomicBool::new(false);
    let (wagg_seconds, during) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let load = options.query_rate.map(|rate| {
            let (base, done) = (&base, &done);
            scope.spawn(move || {
                query::fixed_rate(
                    base,
                    &options.plugin,
                    options.keys,
                    rate,
                    4,
                    done,
                    Duration::from_secs(600),
                )
            })
        });
        let finished = loop {
            if applied(&client, &base) == Some(options.records) {
                break ingest_started.elapsed();
            }
            if ingest_started.elapsed() > Duration::from_secs(1200) {
                done.store(true, Ordering::Relaxed);
                bail!(
                    "wagg did not apply {} records in 20 minutes",
                    options.records
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        done.store(true, Ordering::Relaxed);
        let during = match load {
            Some(handle) => Some(
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("load generator panicked"))??,
            ),
            None => None,
        };
        Ok((finished.as_secs_f64(), during))
    })?;
    let mut lookups = Vec::new();
    if let Some(during) = during {
        lookups.push(during);
        lookups.push(query::max_rate(
            &base,
            &options.plugin,
            options.keys,
            4,
            Duration::from_secs(options.max_rate_seconds),
        )?);
    }
    let row = E2eRow {
        plugin: options.plugin.clone(),
        emit: options.emit,
        records: options.records,
        partitions: options.partitions,
        keys: options.keys,
        produce_rate,
        raw_seconds,
        raw_rate: options.records as f64 / raw_seconds,
        wagg_startup_seconds: startup.as_secs_f64(),
        wagg_seconds,
        wagg_rate: options.records as f64 / wagg_seconds,
        wagg_over_raw: raw_seconds / wagg_seconds,
    };
    report(
        "wagg bench e2e (same topic: raw consumer vs wagg)",
        std::slice::from_ref(&row),
        options.out.as_deref(),
    )?;
    if !lookups.is_empty() {
        let out = options.out.as_ref().map(|o| o.with_extension("query.json"));
        report(
            "wagg bench query (key lookups, loopback, keep-alive)",
            &lookups,
            out.as_deref(),
        )?;
    }
    Ok((row, lookups))
}
