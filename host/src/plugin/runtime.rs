//! Loading plugins: one wasmtime [`Engine`] per process, components compiled
//! once and cached on disk by content hash, instances sandboxed and limited.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Instance, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::config::{AggregationConfig, PluginLimits};

use super::bindings::{Aggregator, AggregatorPre};
use super::error::{CallError, PluginError};
use super::sandbox::{self, FrozenMonotonicClock, FrozenWallClock, ReseedableRng};

/// How often the engine's epoch advances; the granularity of call timeouts.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Bytes of a plugin's stderr kept for error messages (panic messages land
/// there).
const STDERR_CAPTURE_BYTES: usize = 16 * 1024;

/// Limits and caching for every plugin this runtime loads.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Linear memory one plugin instance may grow to.
    pub memory_limit_bytes: usize,
    /// Wall-clock budget of one plugin call (a whole batch).
    pub call_timeout: Duration,
    /// Largest state a plugin may return for one key.
    pub max_state_bytes: usize,
    /// Where compiled plugins are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
}

impl RuntimeConfig {
    /// `[plugins]`'s limits, with compiled plugins cached in `cache_dir`.
    pub fn new(limits: &PluginLimits, cache_dir: PathBuf) -> Self {
        Self {
            memory_limit_bytes: limits.memory_limit_mib << 20,
            call_timeout: Duration::from_millis(limits.call_timeout_ms),
            max_state_bytes: limits.max_state_bytes,
            cache_dir: Some(cache_dir),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            memory_limit_bytes: 64 << 20,
            call_timeout: Duration::from_secs(1),
            max_state_bytes: 1 << 20,
            cache_dir: None,
        }
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginMetadata {
    pub name: String,
    pub version: String,
    pub state_format: u32,
    /// The older state formats the plugin migrates from (`migrates-from`,
    /// world 0.2.0; empty for plugins without it).
    pub migrates_from: Vec<u32>,
    /// Whether the plugin merges two states of a key (`merges`, world
    /// 0.2.0; session windows need it).
    pub merges: bool,
}

/// The identity of a plugin build: the SHA-256 of its bytes, in hex.
pub fn content_hash(wasm: &[u8]) -> String {
    hex::encode(Sha256::digest(wasm))
}

/// Compiles and instantiates plugins. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct PluginRuntime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<PluginCtx>,
    config: RuntimeConfig,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl PluginRuntime {
    pub fn new(config: RuntimeConfig) -> Result<Self, PluginError> {
        let mut wasm_config = Config::new();
        wasm_config.epoch_interruption(true);
        let engine =
            Engine::new(&wasm_config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        // Plugins built for wasm32-wasip2 import WASI; every capability in
        // it is denied by the context built in `new_store`.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| sandbox::deny_timers(&mut linker))
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(&engine, ticker_stop.clone());
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config,
                ticker_stop,
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Loads the component at `path`: compiles it (or reuses the cached
    /// compilation) and reads its metadata.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let wasm = fs::read(path).map_err(|error| PluginError::Read {
            path: path.to_owned(),
            error,
        })?;
        self.load_bytes(path, &wasm)
    }

    /// Like [`load`](Self::load) for bytes already in memory; `path` only
    /// names the plugin in messages.
    pub fn load_bytes(&self, path: &Path, wasm: &[u8]) -> Result<LoadedPlugin, PluginError> {
        let content_hash = content_hash(wasm);
        let component = self.compile(path, wasm, &content_hash)?;
        let component_type = component.component_type();
        let names = |items: &mut dyn Iterator<Item = &str>| items.map(str::to_owned).collect();
        let imports = names(
            &mut component_type
                .imports(&self.inner.engine)
                .map(|(name, _)| name),
        );
        let exports = names(
            &mut component_type
                .exports(&self.inner.engine)
                .map(|(name, _)| name),
        );
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .and_then(AggregatorPre::new)
            .map_err(|e| PluginError::NotAPlugin {
                path: path.to_owned(),
                message: format!("{e:#}"),
            })?;
        let not_a_plugin = |message: String| PluginError::NotAPlugin {
            path: path.to_owned(),
            message,
        };
        let (mut store, bindings, instance) =
            instantiate(&self.inner.engine, &self.inner.config, &pre)
                .map_err(|e| not_a_plugin(format!("{e:#}")))?;
        let metadata = bindings
            .call_metadata(&mut store)
            .map_err(|e| not_a_plugin(format!("metadata() failed: {e:#}")))?;
        let migrates_from = super::instance::call_migrates_from(&mut store, &instance)
            .map_err(|e| not_a_plugin(format!("migrates-from() failed: {e:#}")))?;
        let merges = super::instance::call_merges(&mut store, &instance)
            .map_err(|e| not_a_plugin(format!("merges() failed: {e:#}")))?;
        Ok(LoadedPlugin {
            inner: Arc::new(LoadedInner {
                runtime: self.clone(),
                pre,
                path: path.to_owned(),
                content_hash,
                metadata: PluginMetadata {
                    name: metadata.name,
                    version: metadata.version,
                    state_format: metadata.state_format,
                    migrates_from,
                    merges,
                },
                imports,
                exports,
            }),
        })
    }

    fn compile(
        &self,
        path: &Path,
        wasm: &[u8],
        content_hash: &str,
    ) -> Result<Component, PluginError> {
        let compile = || {
            Component::new(&self.inner.engine, wasm).map_err(|e| PluginError::NotAPlugin {
                path: path.to_owned(),
                message: format!("{e:#}"),
            })
        };
        let Some(cache_dir) = &self.inner.config.cache_dir else {
            return compile();
        };
        // The engine's compatibility hash covers wasmtime's version and
        // settings, so an upgraded host never loads stale machine code.
        let mut engine_hash = DefaultHasher::new();
        self.inner
            .engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let cached = cache_dir.join(format!(
            "{content_hash}-{:016x}.cwasm",
            engine_hash.finish()
        ));
        match read_cache_entry(&cached) {
            Ok(Some(bytes)) => {
                // SAFETY: these bytes were written by `Component::serialize`
                // of this same engine configuration (the name carries the
                // content and engine hashes) into a directory only wagg
                // writes to, and they match the digest written beside them,
                // so a truncated or corrupted entry never reaches here;
                // wasmtime still validates the header and version.
                match unsafe { Component::deserialize(&self.inner.engine, &bytes) } {
                    Ok(component) => {
                        mark_used(&cached);
                        return Ok(component);
                    }
                    Err(e) => {
                        tracing::warn!(path = %cached.display(), error = %format!("{e:#}"), "ignoring unusable compiled plugin cache entry")
                    }
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(path = %cached.display(), %reason, "ignoring compiled plugin cache entry; compiling again")
            }
        }
        let component = compile()?;
        if let Err(e) = write_cache_entry(cache_dir, &cached, &component) {
            tracing::warn!(path = %cached.display(), error = %e, "could not cache compiled plugin");
        }
        prune_cache(cache_dir, &cached, CACHE_BUDGET_BYTES);
        Ok(component)
    }
}

/// Bytes of compiled plugins a cache directory keeps: every plugin version
/// built adds an entry (a Rust plugin's is a few MB, a Python or
/// JavaScript one's about 40 MB), so the least recently used go first.
const CACHE_BUDGET_BYTES: u64 = 1 << 30;

/// Records a cache hit in the entry's modification time (the eviction
/// order); best effort.
fn mark_used(entry: &Path) {
    if let Ok(file) = fs::File::options().append(true).open(entry) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the least recently used entries of `dir` (never `keep`, the
/// entry just written) until the rest fit in `budget` bytes; best effort.
fn prune_cache(dir: &Path, keep: &Path, budget: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
    entries.sort();
    for (_, size, path) in entries {
        if total <= budget {
            break;
        }
        if path == keep {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            let _ = fs::remove_file(digest_path(&path));
            total -= size;
            tracing::debug!(path = %path.display(), "evicted a compiled plugin from the cache");
        }
    }
}

/// The SHA-256 of a cache entry, kept beside it (`<entry>.sha256`).
fn digest_path(entry: &Path) -> PathBuf {
    entry.with_extension("cwasm.sha256")
}

/// A cache entry's bytes if it exists and matches its digest; an error
/// saying what is wrong otherwise (missing digest, mismatch).
fn read_cache_entry(entry: &Path) -> Result<Option<Vec<u8>>, String> {
    let bytes = match fs::read(entry) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let expected = fs::read_to_string(digest_path(entry))
        .map_err(|e| format!("cannot read its digest: {e}"))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if expected.trim() != actual {
        return Err(format!(
            "its SHA-256 is {actual}, its digest file says {}",
            expected.trim()
        ));
    }
    Ok(Some(bytes))
}

fn write_cache_entry(dir: &Path, target: &Path, component: &Component) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let bytes = component
        .serialize()
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    // Write then rename, so a concurrent loader never sees half a file;
    // the digest first, so an entry never exists without one.
    let pid = std::process::id();
    let digest = digest_path(target);
    let tmp_digest = digest.with_extension(format!("tmp{pid}"));
    fs::write(&tmp_digest, hex::encode(Sha256::digest(&bytes)))?;
    fs::rename(&tmp_digest, &digest)?;
    let tmp = target.with_extension(format!("tmp{pid}"));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, target)?;
    Ok(())
}

fn spawn_epoch_ticker(engine: &Engine, stop: Arc<AtomicBool>) {
    let engine = engine.weak();
    thread::Builder::new()
        .name("wagg-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        // Without the ticker timeouts would never fire; failing to start a
        // thread at startup means the process is out of resources anyway.
        .expect("failed to start the plugin epoch thread");
}

/// A compiled plugin, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct LoadedPlugin {
    inner: Arc<LoadedInner>,
}

struct LoadedInner {
    runtime: PluginRuntime,
    pre: AggregatorPre<PluginCtx>,
    path: PathBuf,
    content_hash: String,
    metadata: PluginMetadata,
    /// The component's imported and exported names (interfaces and
    /// functions), for `wagg plugin inspect`.
    imports: Vec<String>,
    exports: Vec<String>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.inner.path)
            .field("metadata", &self.inner.metadata)
            .finish()
    }
}

impl LoadedPlugin {
    pub fn metadata(&self) -> &PluginMetadata {
        &self.inner.metadata
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The component's imports (WASI interfaces it was linked against).
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }

    /// The component's exports (the `wagg:aggregator` interface).
    pub fn exports(&self) -> &[String] {
        &self.inner.exports
    }

    /// SHA-256 of the component's bytes, hex.
    pub fn content_hash(&self) -> &str {
        &self.inner.content_hash
    }

    /// Whether the plugin can serve `aggregation` as configured: a session
    /// window merges two sessions' states when a record bridges them, so
    /// its plugin must export `merge`.
    pub fn check_fits(&self, aggregation: &AggregationConfig) -> Result<(), String> {
        let session = aggregation.window.as_ref().is_some_and(|w| w.is_session());
        let metadata = self.metadata();
        if session && !metadata.merges {
            return Err(format!(
                "a session window needs a plugin that merges states, and plugin {:?} {} ({}) does not (`wagg plugin inspect` shows `merges`): implement `merge` in it (plugin guide, \"Windows\"), or use a tumbling or hopping window",
                metadata.name,
                metadata.version,
                self.path().display()
            ));
        }
        Ok(())
    }

    /// Name for messages: the plugin's own name and version.
    pub fn label(&self) -> String {
        let m = &self.inner.metadata;
        format!("{} {} ({})", m.name, m.version, self.inner.path.display())
    }

    pub fn limits(&self) -> &RuntimeConfig {
        self.inner.runtime.config()
    }

    pub(super) fn instantiate_raw(
        &self,
    ) -> Result<(Store<PluginCtx>, Aggregator, Instance), CallError> {
        let runtime = &self.inner.runtime.inner;
        instantiate(&runtime.engine, &runtime.config, &self.inner.pre).map_err(|e| {
            CallError::Instantiate {
                plugin: self.label(),
                message: format!("{e:#}"),
            }
        })
    }
}

fn instantiate(
    engine: &Engine,
    limits: &RuntimeConfig,
    pre: &AggregatorPre<PluginCtx>,
) -> wasmtime::Result<(Store<PluginCtx>, Aggregator, Instance)> {
    let mut store = new_store(engine, limits);
    // Instantiation runs guest start-up code: give it the same budget as a call.
    store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
    // The raw instance too: the exports added after 0.1.0 are looked up on it.
    let instance = pre.instance_pre().instantiate(&mut store)?;
    let bindings = Aggregator::new(&mut store, &instance)?;
    Ok((store, bindings, instance))
}

/// Per-instance host state: the (empty) WASI context and the limits.
pub struct PluginCtx {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) stderr: MemoryOutputPipe,
    /// The WASI random source, reseeded before every call.
    pub(super) rng: ReseedableRng,
}

impl WasiView for PluginCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn new_store(engine: &Engine, limits: &RuntimeConfig) -> Store<PluginCtx> {
    let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
    // Deny everything: no preopened directories, no environment variables or
    // arguments, no sockets, no name lookups, stdin closed, stdout dropped.
    // stderr is captured only to quote panic messages in errors. Clocks and
    // randomness are deterministic and timers never wait (`sandbox`).
    let rng = ReseedableRng::new();
    let wasi = WasiCtx::builder()
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .wall_clock(FrozenWallClock)
        .monotonic_clock(FrozenMonotonicClock)
        .secure_random(rng.clone())
        .insecure_random(rng.clone())
        .insecure_random_seed(0)
        .build();
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_WASI_RESOURCES);
    let mut store = Store::new(
        engine,
        PluginCtx {
            wasi,
            table,
            limiter: MemoryLimiter {
                limit: limits.memory_limit_bytes,
                total: 0,
                hit: false,
            },
            stderr,
            rng,
        },
    );
    store.limiter(|ctx| &mut ctx.limiter);
    store.epoch_deadline_trap();
    store
}

/// Number of epoch ticks that make up `timeout` (at least one full tick).
pub(super) fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// Caps the linear memory of the whole store (all of a component's
/// memories together, not each one) and the number of instances, memories
/// and tables, and remembers whether the memory cap was hit, so a trap that
/// follows (Rust's allocator aborts when growth fails) is reported as what
/// it is.
pub struct MemoryLimiter {
    limit: usize,
    /// Bytes of every memory of the store, as last grown.
    pub(super) total: usize,
    pub(super) hit: bool,
}

/// Core instances, memories and tables one plugin store may hold. A Rust
/// component built for wasm32-wasip2 has under ten of each; wasmtime's
/// default is 10,000, which lets a component multiply the memory cap.
pub(super) const MAX_INSTANCES: usize = 64;
pub(super) const MAX_MEMORIES: usize = 8;
pub(super) const MAX_TABLES: usize = 32;
/// Entries of any one table.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;
/// WASI resources (pollables, streams) one store may hold at once.
pub(super) const MAX_WASI_RESOURCES: usize = 1024;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use wasm_encoder::{
        Component, InstanceSection, MemorySection, MemoryType, Module, ModuleSection,
    };
    use wasmtime::component::Linker;

    use super::*;

    /// A component instantiating a core module (with `memories` memories
    /// of 1 page) `instances` times.
    fn component(memories: usize, instances: usize) -> Vec<u8> {
        let mut module = Module::new();
        let mut section = MemorySection::new();
        for _ in 0..memories {
            section.memory(MemoryType {
                minimum: 1,
                maximum: None,
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
        }
        module.section(&section);
        let mut component = Component::new();
        component.section(&ModuleSection(&module));
        let mut instantiations = InstanceSection::new();
        for _ in 0..instances {
            instantiations.instantiate(0, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
        }
        component.section(&instantiations);
        component.finish()
    }

    fn instantiate(bytes: &[u8], limits: &RuntimeConfig) -> wasmtime::Result<()> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        let component = wasmtime::component::Component::new(&engine, bytes)?;
        let mut store = new_store(&engine, limits);
        store.set_epoch_deadline(u64::MAX / 2);
        Linker::<PluginCtx>::new(&engine).instantiate(&mut store, &component)?;
        Ok(())
    }

    #[test]
    fn the_compiled_cache_evicts_the_least_recently_used_past_its_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |name: &str| dir.path().join(format!("{name}.cwasm"));
        let base = std::time::SystemTime::now() - Duration::from_secs(100);
        for (age, name) in [(0, "old"), (10, "used"), (20, "newer"), (30, "new")] {
            fs::write(at(name), [0u8; 100]).expect("entry");
            fs::write(digest_path(&at(name)), "digest").expect("digest");
            let file = fs::File::options()
                .append(true)
                .open(at(name))
                .expect("open");
            file.set_modified(base + Duration::from_secs(age))
                .expect("mtime");
        }
        mark_used(&at("used")); // a hit makes it the most recently used
        prune_cache(dir.path(), &at("new"), 250);
        let left = |name: &str| at(name).exists();
        assert!(
            !left("old") && !left("newer"),
            "the two least recently used go"
        );
        assert!(left("used") && left("new"));
        assert!(!digest_path(&at("old")).exists(), "with their digests");
        prune_cache(dir.path(), &at("new"), 50);
        assert!(
            left("new"),
            "the entry just written stays, even over budget"
        );
    }

    #[test]
    fn a_component_cannot_multiply_its_limits_with_many_instances_or_memories() {
        let limits = RuntimeConfig::default();
        instantiate(&component(1, 4), &limits).expect("a small component is fine");
        let error =
            instantiate(&component(0, MAX_INSTANCES + 1), &limits).expect_err("too many instances");
        assert!(format!("{error:#}").contains("instance"), "{error:#}");
        let error =
            instantiate(&component(MAX_MEMORIES + 1, 1), &limits).expect_err("too many memories");
        assert!(format!("{error:#}").contains("memor"), "{error:#}");
    }

    #[test]
    fn the_memory_cap_holds_for_all_memories_together() {
        // Each memory alone is under the cap; together they are over it.
        let limits = RuntimeConfig {
            memory_limit_bytes: 3 << 16,
            ..RuntimeConfig::default()
        };
        instantiate(&component(3, 1), &limits).expect("three pages fit");
        let error = instantiate(&component(4, 1), &limits).expect_err("four do not");
        assert!(format!("{error:#}").contains("memory"), "{error:#}");
    }
}
