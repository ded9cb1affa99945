//! Migrating an aggregation's stored states to its plugin's new state
//! format, a chunk of keys at a time between two batches, on the consumer
//! thread (which owns the plugin instances). The other aggregations go on
//! live meanwhile; the migrating one applies nothing, and once every key is
//! migrated it catches up from where it stopped (see
//! `state::store::migration`).

use std::collections::BTreeMap;
use std::time::Instant;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Pipeline, PipelineError};
use crate::config::AggregationConfig;
use crate::plugin::{CallError, LoadedPlugin, PluginInstance};
use crate::state::store::{AggregationMeta, Migration, StateMigrator, StateStore};

/// Keys migrated per step (one RocksDB write each).
const CHUNK_KEYS: usize = 1000;

/// How often a migration before consuming logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
#[error(
    "aggregation {aggregation:?}: migrating the state of key {key:?} from state format {from_format} failed: {error}. Keys before it are migrated; the migration resumes at this key when wagg starts again (fix the plugin's `migrate`, or `wagg reset` the aggregation)"
)]
pub struct MigrationError {
    aggregation: String,
    key: String,
    from_format: u32,
    #[source]
    error: CallError,
}

/// The number of keys among chunk entries (a key in several slots has an
/// entry per slot, next to each other).
fn distinct_keys(entries: &[(crate::state::store::Slot, Vec<u8>, Vec<u8>)]) -> u64 {
    entries.chunk_by(|a, b| a.1 == b.1).count() as u64
}

/// What one step of a migration did.
enum Step {
    /// A chunk of keys was migrated and written.
    Migrated,
    /// No key is left to migrate.
    Done,
}

/// Migrates the next chunk of `name`'s stored keys with `instance` and
/// writes it with the cursor in `meta` (whose migration it advances).
fn migrate_chunk(
    store: &StateStore,
    name: &str,
    meta: &mut AggregationMeta,
    instance: &mut PluginInstance,
) -> Result<Step, PipelineError> {
    let Some(migration) = meta.migration.as_mut() else {
        return Ok(Step::Done);
    };
    let chunk = store.migration_chunk(name, migration, CHUNK_KEYS)?;
    let Some(last) = chunk.last().map(|(_, key, _)| key.clone()) else {
        return Ok(Step::Done);
    };
    let from_format = migration.from_format;
    let mut migrated = Vec::with_capacity(chunk.len());
    let mut failed = None;
    for (i, (slot, key, old)) in chunk.iter().enumerate() {
        match instance.migrate(from_format, old) {
            Ok(state) => migrated.push((*slot, key.as_slice(), state)),
            Err(error) => {
                failed = Some((i, error));
                break;
            }
        }
    }
    let Some((i, error)) = failed else {
        migration.through = Some(last);
        migration.keys_migrated += distinct_keys(&chunk);
        store.write_migrated(name, meta, &migrated)?;
        crate::fault_injection::delay_point("migration-chunk");
        crate::fault_injection::crash_point("migration-chunk");
        return Ok(Step::Migrated);
    };
    // The keys before the failing one stay migrated (whole keys: not the
    // failing key's entries in other slots); it resumes there.
    let key = &chunk[i].1;
    let first = chunk.iter().position(|(_, k, _)| k == key).unwrap_or(i);
    if first > 0 {
        migrated.truncate(first);
        migration.through = Some(chunk[first - 1].1.clone());
        migration.keys_migrated += distinct_keys(&chunk[..first]);
        store.write_migrated(name, meta, &migrated)?;
    }
    Err(Box::new(MigrationError {
        aggregation: name.to_owned(),
        key: String::from_utf8_lossy(key).into_owned(),
        from_format,
        error,
    })
    .into())
}

/// Where a migrated aggregation catches up from on each partition
/// consumed (`consumed`: partition → its live offset): where it stopped
/// applying records, or the beginning of a partition first consumed
/// during the migration (as a new aggregation would start there).
fn catch_up_after(
    migration: &Migration,
    consumed: BTreeMap<(String, i32), i64>,
) -> BTreeMap<(String, i32), i64> {
    let resume: BTreeMap<(String, i32), i64> = migration
        .resume
        .iter()
        .map(|(topic, partition, next)| ((topic.clone(), *partition), *next))
        .collect();
    consumed
        .into_iter()
        .filter_map(|(partition, live)| {
            let from = resume.get(&partition).copied().unwrap_or(0);
            (from < live).then_some((partition, from))
        })
        .collect()
}

/// Migrates every remaining key of `aggregation` (whose stored meta,
/// `meta`, records the migration) before anything else runs: how an
/// instance of a cluster migrates its copy of the state before it joins
/// the group, while the other instances go on. Returns early, with the
/// migration recorded where it got to, once `shutdown` is set.
pub fn migrate_before_consuming(
    store: &StateStore,
    aggregation: &AggregationConfig,
    instance: &mut PluginInstance,
    mut meta: AggregationMeta,
    shutdown: &AtomicBool,
) -> Result<(), PipelineError> {
    let name = &aggregation.name;
    let started = Instant::now();
    let mut logged = Instant::now();
    while let Step::Migrated = migrate_chunk(store, name, &mut meta, instance)? {
        if shutdown.load(Ordering::Relaxed) {
            return Ok(());
        }
        if logged.elapsed() >= PROGRESS_EVERY
            && let Some(migration) = &meta.migration
        {
            logged = Instant::now();
            tracing::info!(
                aggregation = %name,
                keys_migrated = migration.keys_migrated,
                keys_estimate = migration.keys_estimate,
                "migrating the local state before joining the cluster"
            );
        }
    }
    let Some(migration) = meta.migration.clone() else {
        return Ok(());
    };
    let consumed = store.consumed(|topic| aggregation.applies_to(topic))?;
    let catch_up = catch_up_after(&migration, consumed);
    store.finish_migration(name, &meta, &catch_up)?;
    tracing::info!(
        aggregation = %name,
        keys = migration.keys_migrated,
        seconds = started.elapsed().as_secs_f64(),
        from_format = migration.from_format,
        to_format = meta.state_format,
        "local state migrated"
    );
    Ok(())
}

impl Pipeline {
    /// Migrates the next chunk of keys of the first migrating aggregation,
    /// or ends its migration; `false` when none is migrating.
    pub(super) fn migrate_step(&mut self) -> Result<bool, PipelineError> {
        let store = self.applier.store.clone();
        let Some(aggregation) = self.applier.migrating_mut() else {
            return Ok(false);
        };
        let name = aggregation.config.name.clone();
        let Some(meta) = aggregation.migrating.as_mut() else {
            return Ok(false);
        };
        let keys_before = meta.migration.as_ref().map_or(0, |m| m.keys_migrated);
        self.migration_clock
            .get_or_insert_with(|| (Instant::now(), keys_before));
        match migrate_chunk(&store, &name, meta, &mut aggregation.instance)? {
            Step::Migrated => Ok(true),
            Step::Done => self.finish_migration(&name).map(|()| true),
        }
    }

    /// Every key is migrated: records it, and has the aggregation catch up
    /// from where it stopped applying records.
    fn finish_migration(&mut self, name: &str) -> Result<(), PipelineError> {
        // The stored offsets become the live ones: the catch-up below
        // starts from them.
        self.flush()?;
        let store = self.applier.store.clone();
        let Some(aggregation) = self.applier.aggregation_mut(name) else {
            return Ok(());
        };
        let Some(meta) = aggregation.migrating.take() else {
            return Ok(());
        };
        let config = aggregation.config.clone();
        let Some(migration) = &meta.migration else {
            return Ok(());
        };
        let catch_up = catch_up_after(migration, self.consumed(&config)?);
        store.finish_migration(name, &meta, &catch_up)?;
        let (started, keys_before) = self
            .migration_clock
            .take()
            .unwrap_or((Instant::now(), migration.keys_migrated));
        let here = migration.keys_migrated.saturating_sub(keys_before);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            aggregation = name,
            keys = migration.keys_migrated,
            keys_per_second = (here as f64 / seconds.max(1e-6)) as u64,
            from_format = migration.from_format,
            to_format = meta.state_format,
            partitions_behind = catch_up.len(),
            "state migrated; catching up on the records consumed meanwhile"
        );
        self.catch_up_here(name)
    }
}

/// A [`StateMigrator`] over an aggregation's plugin: one instance, made on
/// first use (restores and standby copies only need it when another
/// instance wrote another format) and made again after a trap.
pub struct PluginMigrator {
    plugin: LoadedPlugin,
    params: String,
    instance: Mutex<Option<PluginInstance>>,
}

impl PluginMigrator {
    pub fn new(plugin: LoadedPlugin, aggregation: &AggregationConfig) -> Self {
        Self {
            plugin,
            params: aggregation.params_json(),
            instance: Mutex::new(None),
        }
    }
}

impl StateMigrator for PluginMigrator {
    fn state_format(&self) -> u32 {
        self.plugin.metadata().state_format
    }

    fn migrate(&self, from_format: u32, state: &[u8]) -> Result<Vec<u8>, String> {
        let migrates_from = &self.plugin.metadata().migrates_from;
        if !migrates_from.contains(&from_format) {
            return Err(format!(
                "plugin {} does not migrate from state format {from_format} (it migrates from {migrates_from:?})",
                self.plugin.label()
            ));
        }
        let mut slot = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        let instance = match &mut *slot {
            Some(instance) => instance,
            None => slot.insert(
                self.plugin
                    .instantiate(&self.params)
                    .map_err(|e| format!("instantiating plugin {}: {e}", self.plugin.label()))?,
            ),
        };
        instance
            .migrate(from_format, state)
            .map_err(|e| format!("plugin {}: {e}", self.plugin.label()))
    }
}
