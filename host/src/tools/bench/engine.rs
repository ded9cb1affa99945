//! `wagg bench engine`: generated records through the real batch applier
//! (batcher → plugin runtime → state cache → RocksDB on disk), no broker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::{Rng, aggregation_toml, dir_size, key_bytes, report, rss_bytes, value};
use crate::apply::BatchApplier;
use crate::config::Config;
use crate::ops::status::Status;
use crate::plugin::{PluginRuntime, RuntimeConfig};
use crate::record::SourceRecord;
use crate::tools::author::build::{example_plugin, example_plugins_dir};

/// `wagg bench engine`'s options (also its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct EngineOptions {
    /// Example plugins to run, one at a time, comma-separated; `NAME=PATH`
    /// runs the component at PATH with example NAME's params (e.g.
    /// `stats=plugins/stats/python/target/plugin.wasm`).
    #[arg(long, value_delimiter = ',', default_value = "count,stats,top-n")]
    pub plugins: Vec<String>,
    /// Key-space sizes, comma-separated; one run per plugin and size.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000")]
    pub keys: Vec<u64>,
    /// Records per run; keys are drawn uniformly from the key space.
    #[arg(long, default_value_t = 2_000_000)]
    pub records: u64,
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Windows to run each plugin with, comma-separated: `none`,
    /// `tumbling:SIZE`, `hopping:SIZE/ADVANCE` or `session:GAP` (e.g.
    /// `tumbling:1m`, `hopping:5m/1m`, `session:30s`).
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub windows: Vec<String>,
    /// Records per second of event time (record timestamps advance
    /// evenly): with `--keys`, how many records a key has per window.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_rate: u64,
    /// `apply.threads` for the runs, comma-separated; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub apply_threads: Vec<usize>,
    /// `state.cache_entries` for the runs.
    #[arg(long, default_value_t = 200_000)]
    pub cache_entries: usize,
    /// `state.block_cache_mib` for the runs.
    #[arg(long, default_value_t = 64)]
    pub block_cache_mib: usize,
    /// `batch.commit_interval_ms` for the runs.
    #[arg(long, default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// Directory of the example plugins' .wasm files (built when absent).
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
    /// Where the runs' RocksDB directories go (default: the temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineRow {
    pub plugin: String,
    pub apply_threads: usize,
    /// `none`, or the window as given (`tumbling:1m`).
    pub window: String,
    /// Records per second of event time.
    pub event_rate: u64,
    pub keys: u64,
    pub records: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    /// Key and value bytes per second.
    pub mib_per_sec: f64,
    /// Of `seconds`, spent generating the records.
    pub generate_seconds: f64,
    pub peak_rss_mib: f64,
    pub rocksdb_mib: f64,
    /// Heap allocations per record in the steady state (after the run,
    /// see `steady_allocations`); absent when not counted.
    pub allocations_per_record: Option<f64>,
    #[serde(flatten)]
    pub costs: PluginCosts,
}

/// What a plugin costs before and beside its records.
#[derive(Debug, Clone, Serialize)]
pub struct PluginCosts {
    /// Size of the component file.
    pub component_mib: f64,
    /// Compiling the component to machine code (no compiled cache).
    pub compile_seconds: f64,
    /// Loading it again from the compiled cache (a restart).
    pub cached_load_seconds: f64,
    /// A new configured instance (after a trap, a rebalance, a start).
    pub instantiate_ms: f64,
    /// Linear memory of one instance after a batch of the run's records.
    pub instance_memory_mib: f64,
}

const PARTITIONS: u64 = 8;
const VALUE_POOL: usize = 4096;

pub fn run(options: &EngineOptions) -> anyhow::Result<Vec<EngineRow>> {
    let needs_examples = options.plugins.iter().any(|p| !p.contains('='));
    let plugins_dir = match needs_examples {
        true => Some(example_plugins_dir(options.plugins_dir.as_deref())?),
        false => None,
    };
    let mut rows = Vec::new();
    for spec in &options.plugins {
        let (plugin, path) = match spec.split_once('=') {
            Some((name, path)) => (
                name,
                std::path::absolute(path).with_context(|| format!("--plugins {spec}"))?,
            ),
            None => {
                let dir = plugins_dir.as_deref().context("no example plugins")?;
                (spec.as_str(), example_plugin(dir, spec))
            }
        };
        let costs = plugin_costs(&path, plugin, options.batch_size)
            .with_context(|| format!("measuring {}", path.display()))?;
        for window in &options.windows {
            let window_toml = window_toml(window)?;
            for (&keys, &threads) in options
                .keys
                .iter()
                .flat_map(|k| options.apply_threads.iter().map(move |t| (k, t)))
            {
                let run = Run {
                    plugin: &path,
                    name: plugin,
                    costs: &costs,
                    keys,
                    threads,
                    window,
                    window_toml: &window_toml,
                };
                let row = run_one(options, &run).with_context(|| {
                    format!("engine run: {plugin} ({window}) at {keys} keys, {threads} threads")
                })?;
                eprintln!(
                    "engine: {plugin} ({window}) at {keys} keys, {threads} apply threads: {:.0} records/s",
                    row.records_per_sec
                );
                rows.push(row);
            }
        }
    }
    report(
        "wagg bench engine (batcher → plugin → RocksDB, no broker)",
        &rows,
        options.out.as_deref(),
    )?;
    Ok(rows)
}

/// One run's plugin, key space and window.
struct Run<'a> {
    plugin: &'a Path,
    name: &'a str,
    costs: &'a PluginCosts,
    keys: u64,
    /// `apply.threads`.
    threads: usize,
    window: &'a str,
    /// The `window = ...` line (empty for `none`).
    window_toml: &'a str,
}

/// The `window = ...` line of `--windows` entry `spec`.
fn window_toml(spec: &str) -> anyhow::Result<String> {
    let bad = || {
        anyhow::anyhow!(
            "--windows {spec:?}: expected none, tumbling:SIZE, hopping:SIZE/ADVANCE or session:GAP (e.g. tumbling:1m)"
        )
    };
    Ok(match spec.split_once(':') {
        None if spec == "none" => String::new(),
        Some(("tumbling", size)) => {
            format!("window = {{ kind = \"tumbling\", size = {size:?} }}\n")
        }
        Some(("hopping", spans)) => {
            let (size, advance) = spans.split_once('/').ok_or_else(bad)?;
            format!("window = {{ kind = \"hopping\", size = {size:?}, advance = {advance:?} }}\n")
        }
        Some(("session", gap)) => {
            format!("window = {{ kind = \"session\", gap = {gap:?} }}\n")
        }
        _ => return Err(bad()),
    })
}

/// Compiles `path` cold and from the cache, instantiates it a few times
/// and runs one batch of `batch_size` generated records through a fresh
/// instance.
fn plugin_costs(path: &Path, name: &str, batch_size: usize) -> anyhow::Result<PluginCosts> {
    const INSTANCES: u32 = 5;
    let cache = tempfile::tempdir().context("creating a compiled-plugin cache")?;
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..RuntimeConfig::default()
    };
    let started = Instant::now();
    PluginRuntime::new(config.clone())?.load(path)?;
    let compile_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let loaded = PluginRuntime::new(config)?.load(path)?;
    let cached_load_seconds = started.elapsed().as_secs_f64();
    let params = super::params_json(name)?;
    let started = Instant::now();
    for _ in 0..INSTANCES {
        loaded.instantiate(&params)?;
    }
    let instantiate_ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(INSTANCES);
    let mut instance = loaded.instantiate(&params)?;
    let batch = Generator::new(10_000, 10_000).batch(batch_size as u64);
    let mut states = crate::tools::author::offline::StateMap::default();
    crate::tools::author::offline::apply_chunk(
        &mut instance,
        &mut states,
        &batch,
        crate::config::OnError::Skip,
    )?;
    Ok(PluginCosts {
        component_mib: std::fs::metadata(path)?.len() as f64 / (1 << 20) as f64,
        compile_seconds,
        cached_load_seconds,
        instantiate_ms,
        instance_memory_mib: instance.memory_bytes() as f64 / (1 << 20) as f64,
    })
}

/// Event time of the first generated record (ms).
const EVENT_TIME_START: i64 = 1_700_000_000_000;

// One measurement from set-up to numbers; the steps share the timers.
fn run_one(options: &EngineOptions, run: &Run<'_>) -> anyhow::Result<EngineRow> {
    let (plugin, name, keys) = (run.plugin, run.name, run.keys);
    let work = match &options.work_dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .context("creating the benchmark's state directory")?;
    let text = format!(
        "[source]\nbrokers = \"unused:9092\"\ntopics = [\"bench\"]\n\n[state]\ndir = {:?}\ncache_entries = {}\nblock_cache_mib = {}\n\n[batch]\ncommit_interval_ms = {}\n\n[apply]\nthreads = {}\n\n{}",
        work.path().join("state"),
        options.cache_entries,
        options.block_cache_mib,
        options.commit_interval_ms,
        run.threads,
        aggregation_toml(name, plugin) + run.window_toml
    );
    let config = Config::parse(&text, "<bench config>", Path::new("/"))?;
    let runtime = PluginRuntime::new(RuntimeConfig::new(
        &config.plugins,
        config.plugin_cache_dir(),
    ))?;
    let plugins = crate::app::load_plugins(&config, &runtime)?;
    let (store, aggregations, _) =
        crate::app::open_aggregations(&config, plugins, &AtomicBool::new(false))?;
    let status = Arc::new(Status::default());
    let mut applier = BatchApplier::new(store, status, aggregations, None, &config.batch, None)
        .context("starting the state writer thread")?;

    // Reset the peak-RSS counter so each run reports its own peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let records = options.records;
    let batch_size = options.batch_size.max(1) as u64;
    let mut source = Generator::new(keys, options.event_rate);
    let mut generating = Duration::ZERO;
    let never = AtomicBool::new(false);
    let started = Instant::now();
    let mut done = 0;
    while done < records {
        let generated = Instant::now();
        let n = batch_size.min(records - done);
        let batch = source.batch(n);
        generating += generated.elapsed();
        applier.apply(&batch, &never)?;
        if applier.flush_due() {
            applier.start_flush()?;
        }
        done += n;
    }
    applier.flush()?;
    let seconds = started.elapsed().as_secs_f64();
    let (_, peak_rss) = rss_bytes();
    let bytes = source.bytes;
    let allocations_per_record = steady_allocations(&mut applier, &mut source, batch_size)?;
    drop(applier);
    Ok(EngineRow {
        costs: run.costs.clone(),
        plugin: name.to_owned(),
        apply_threads: run.threads,
        window: run.window.to_owned(),
        event_rate: options.event_rate,
        keys,
        records,
        seconds,
        records_per_sec: records as f64 / seconds,
        mib_per_sec: bytes as f64 / seconds / (1 << 20) as f64,
        generate_seconds: generating.as_secs_f64(),
        peak_rss_mib: peak_rss as f64 / (1 << 20) as f64,
        rocksdb_mib: dir_size(&work.path().join("state")) as f64 / (1 << 20) as f64,
        allocations_per_record,
    })
}

/// Records of the steady-state allocation count.
const STEADY_RECORDS: u64 = 100_000;

/// Heap allocations per record on every thread while the applier takes
/// [`STEADY_RECORDS`] more records (generated beforehand, so generating
/// them is not counted) and writes them (one flush); `None` when the
/// allocator does not count (a test binary).
fn steady_allocations(
    applier: &mut BatchApplier,
    source: &mut Generator,
    batch_size: u64,
) -> anyhow::Result<Option<f64>> {
    if !crate::ops::alloc_count::available() {
        return Ok(None);
    }
    let batches: Vec<Vec<SourceRecord>> = (0..STEADY_RECORDS.div_ceil(batch_size))
        .map(|_| source.batch(batch_size))
        .collect();
    let records: usize = batches.iter().map(Vec::len).sum();
    let never = AtomicBool::new(false);
    let (applied, allocations) = crate::ops::alloc_count::measure(|| {
        for batch in &batches {
            applier.apply(batch, &never)?;
        }
        applier.flush()
    });
    applied?;
    Ok(Some(allocations as f64 / records as f64))
}

/// Generated records: uniform keys over the key space, values from a pool
/// (so that generating them stays a small share of the run; the
/// per-record copy into a `SourceRecord` remains, as a Kafka source makes
/// it too), timestamps advancing at the event rate.
struct Generator {
    rng: Rng,
    pool: Vec<Vec<u8>>,
    offsets: [i64; PARTITIONS as usize],
    topic: Arc<str>,
    keys: u64,
    event_rate: u64,
    done: u64,
    /// Key and value bytes generated so far.
    bytes: u64,
}

impl Generator {
    fn new(keys: u64, event_rate: u64) -> Self {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ keys);
        let pool = (0..VALUE_POOL)
            .map(|_| value(&mut rng).into_bytes())
            .collect();
        Self {
            rng,
            pool,
            offsets: [0; PARTITIONS as usize],
            topic: Arc::from("bench"),
            keys,
            event_rate,
            done: 0,
            bytes: 0,
        }
    }

    fn batch(&mut self, n: u64) -> Vec<SourceRecord> {
        let batch = (0..n)
            .map(|i| {
                let k = self.rng.next_u64() % self.keys;
                let partition = (k % PARTITIONS) as usize;
                let offset = self.offsets[partition];
                self.offsets[partition] += 1;
                let key = key_bytes(k);
                let value = self.pool[(self.rng.next_u64() % VALUE_POOL as u64) as usize].clone();
                self.bytes += (key.len() + value.len()) as u64;
                SourceRecord {
                    topic: self.topic.clone(),
                    partition: partition as i32,
                    offset,
                    key: Some(key),
                    value: Some(value),
                    timestamp: Some(
                        EVENT_TIME_START + ((self.done + i) * 1000 / self.event_rate) as i64,
                    ),
                    headers: Vec::new(),
                }
            })
            .collect();
        self.done += n;
        batch
    }
}
