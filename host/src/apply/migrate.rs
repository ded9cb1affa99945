//! Migrating an aggregation's stored states to its plugin's new state
//! format, a chunk of keys at a time between two batches, on the consumer
//! thread (which owns the plugin instances). The other aggregations go on
//! live meanwhile; the migrating one applies nothing, and once every key is
//! migrated it catches up from where it stopped (see
//! `state::store::migration`).

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Pipeline, PipelineError};
use crate::plugin::CallError;

/// Keys migrated per step (one RocksDB write each).
const CHUNK_KEYS: usize = 1000;

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
        let Some(migration) = meta.migration.as_mut() else {
            return Ok(false);
        };
        let keys_before = migration.keys_migrated;
        self.migration_clock
            .get_or_insert_with(|| (Instant::now(), keys_before));
        let chunk = store.migration_chunk(&name, migration, CHUNK_KEYS)?;
        let Some(last) = chunk.last().map(|(_, key, _)| key.clone()) else {
            return self.finish_migration(&name).map(|()| true);
        };
        let from_format = migration.from_format;
        let mut migrated = Vec::with_capacity(chunk.len());
        let mut failed = None;
        for (i, (slot, key, old)) in chunk.iter().enumerate() {
            match aggregation.instance.migrate(from_format, old) {
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
            store.write_migrated(&name, meta, &migrated)?;
            crate::fault_injection::delay_point("migration-chunk");
            crate::fault_injection::crash_point("migration-chunk");
            return Ok(true);
        };
        // The keys before the failing one stay migrated (whole keys: not
        // the failing key's entries in other slots); it resumes there.
        let key = &chunk[i].1;
        let first = chunk.iter().position(|(_, k, _)| k == key).unwrap_or(i);
        if first > 0 {
            migrated.truncate(first);
            migration.through = Some(chunk[first - 1].1.clone());
            migration.keys_migrated += distinct_keys(&chunk[..first]);
            store.write_migrated(&name, meta, &migrated)?;
        }
        Err(Box::new(MigrationError {
            aggregation: name,
            key: String::from_utf8_lossy(key).into_owned(),
            from_format,
            error,
        })
        .into())
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
        let resume: BTreeMap<(String, i32), i64> = migration
            .resume
            .iter()
            .map(|(topic, partition, next)| ((topic.clone(), *partition), *next))
            .collect();
        let mut catch_up = BTreeMap::new();
        for (partition, live) in self.consumed(&config)? {
            // A partition first consumed during the migration: from the
            // beginning, as a new aggregation would start there.
            let from = resume.get(&partition).copied().unwrap_or(0);
            if from < live {
                catch_up.insert(partition, from);
            }
        }
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
