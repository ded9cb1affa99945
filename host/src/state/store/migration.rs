//! State migrations: an aggregation whose plugin changed state format has
//! its stored states rewritten, key by key, by the new plugin's `migrate`.
//!
//! The migration is recorded in the aggregation's meta record
//! ([`AggregationMeta::migration`]): the old format, the last key migrated
//! (keys are migrated in byte order, every slot of a key in the same
//! write) and where the aggregation resumes each partition afterwards.
//! Each chunk of migrated states is written with the new cursor, so a
//! crash resumes after the last chunk written. While it migrates, the
//! aggregation applies no record (its catch-up entries are removed in the
//! write that starts the migration, so nothing re-reads the topic for it);
//! the write that ends the migration gives it catch-up entries from where
//! it stopped, and it catches up like a new aggregation.
//!
//! Queries read states and the cursor under one lock
//! ([`StateStore::reading`]), so a state is known to be of the old or the
//! new format, never guessed.

use super::*;

/// An aggregation's migration in progress, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The state format the stored states not migrated yet are in.
    pub from_format: u32,
    /// The plugin that wrote them ("stats 0.1.0"), for messages.
    pub from_plugin: String,
    /// Every key up to this one (byte order) is in the new format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<Vec<u8>>,
    /// Keys migrated so far.
    pub keys_migrated: u64,
    /// RocksDB's estimate of the aggregation's keys when it started.
    pub keys_estimate: u64,
    /// Where the aggregation resumes each partition once migrated: the
    /// next offset it had applied when the migration started.
    pub resume: Vec<(String, i32, i64)>,
}

/// What a query needs to know about a migrating aggregation's states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub from_format: u32,
    through: Option<Vec<u8>>,
}

impl Behind {
    /// The state format of `key`'s stored state: `Some(old format)` when
    /// the migration has not reached it yet.
    pub fn old_format_of(&self, key: &[u8]) -> Option<u32> {
        let migrated = self.through.as_deref().is_some_and(|t| key <= t);
        (!migrated).then_some(self.from_format)
    }
}

/// Converts states of another format into the one an aggregation's plugin
/// writes now (its `migrate`), for states that arrive from elsewhere:
/// changelog records written by an instance that ran another version of
/// the plugin. Implemented over a plugin instance (`apply::migrate`), so
/// that the layers below the plugin runtime need not know it.
pub trait StateMigrator: Send + Sync {
    /// The state format the aggregation's states are in here.
    fn state_format(&self) -> u32;

    /// `state`, of format `from_format`, in [`Self::state_format`]; the
    /// error says why not (e.g. the plugin does not migrate from it).
    fn migrate(&self, from_format: u32, state: &[u8]) -> Result<Vec<u8>, String>;
}

/// One chunk of states to migrate: (slot, key, old state), in key order.
pub type MigrationChunk = SlottedStates;

impl StateStore {
    /// The aggregations being migrated, from their meta records (at open).
    pub(super) fn load_migrations(&self) -> Result<(), StoreError> {
        let mut migrating = HashMap::new();
        for aggregation in self.stored_aggregations() {
            if let Some(meta) = self.aggregation_meta(&aggregation)?
                && let Some(migration) = meta.migration
            {
                migrating.insert(aggregation, behind(&migration));
            }
        }
        *write_lock(&self.migrating) = migrating;
        Ok(())
    }

    /// Calls `read` (reads of `aggregation`'s states) with no migration
    /// chunk written meanwhile; returns its result and, if the aggregation
    /// is migrating, which of the states read are still of the old format.
    pub fn reading<T>(
        &self,
        aggregation: &str,
        read: impl FnOnce(&Self) -> Result<T, StoreError>,
    ) -> Result<(T, Option<Behind>), StoreError> {
        let migrating = read_lock(&self.migrating);
        let behind = migrating.get(aggregation).cloned();
        Ok((read(self)?, behind))
    }

    /// Starts migrating `aggregation` (which reads the topics `applies_to`
    /// accepts) from the format `from` describes to the one `to` describes:
    /// one write records the migration, with where the aggregation stands on
    /// each partition (it resumes there once migrated), and removes its
    /// catch-up entries (it applies nothing meanwhile).
    pub fn begin_migration(
        &self,
        aggregation: &str,
        from: &AggregationMeta,
        to: &AggregationMeta,
        applies_to: impl Fn(&str) -> bool,
    ) -> Result<Migration, StoreError> {
        let resume = self.own_offsets(aggregation, applies_to)?;
        let migration = Migration {
            from_format: from.state_format,
            from_plugin: format!("{} {}", from.plugin_name, from.plugin_version),
            through: None,
            keys_migrated: 0,
            keys_estimate: self.count_keys(aggregation)?,
            resume: resume
                .iter()
                .map(|((topic, partition), next)| (topic.clone(), *partition, *next))
                .collect(),
        };
        let mut meta = to.clone();
        meta.migration = Some(migration.clone());
        let mut migrating = write_lock(&self.migrating);
        let mut batch = self.begin_write();
        batch.set_aggregation_meta(aggregation, &meta)?;
        self.forget_catch_up(&mut batch, &self.all_catch_ups()?, aggregation)?;
        self.write(batch)?;
        migrating.insert(aggregation.to_owned(), behind(&migration));
        Ok(migration)
    }

    /// The next states to migrate: up to about `limit` entries after the
    /// migration's cursor, whole keys only (every slot of the last key is
    /// in the chunk); empty when every key is migrated.
    pub fn migration_chunk(
        &self,
        aggregation: &str,
        migration: &Migration,
        limit: usize,
    ) -> Result<MigrationChunk, StoreError> {
        let slots = self.slots(aggregation)?;
        // A key has at most one entry per slot: room for a whole key.
        let limit = limit.max(slots.len() + 1);
        let mut entries = self.entries_in_slots(
            aggregation,
            &slots,
            &[],
            migration.through.as_deref(),
            limit,
        )?;
        if entries.len() == limit
            && let Some(last) = entries.last().map(|(_, key, _)| key.clone())
        {
            // The last key may have entries beyond the page: next chunk.
            entries.retain(|(_, key, _)| *key != last);
        }
        Ok(entries)
    }

    /// Writes migrated states together with the migration's new cursor
    /// (`migration.through`, `keys_migrated`), atomically with respect to
    /// [`StateStore::reading`].
    pub fn write_migrated(
        &self,
        aggregation: &str,
        meta: &AggregationMeta,
        states: &[(Slot, &[u8], Vec<u8>)],
    ) -> Result<(), StoreError> {
        let Some(migration) = &meta.migration else {
            return Err(self.corrupt(format!(
                "aggregation {aggregation:?}: migrated states written without a migration"
            )));
        };
        let mut migrating = write_lock(&self.migrating);
        let mut batch = self.begin_write();
        for (slot, key, state) in states {
            batch.put_state(aggregation, *slot, key, state)?;
        }
        batch.set_aggregation_meta(aggregation, meta)?;
        self.write(batch)?;
        migrating.insert(aggregation.to_owned(), behind(migration));
        Ok(())
    }

    /// Ends a migration (every key is migrated): records the aggregation's
    /// meta without it and its catch-up entries from `catch_up`, in one
    /// write.
    pub fn finish_migration(
        &self,
        aggregation: &str,
        meta: &AggregationMeta,
        catch_up: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), StoreError> {
        let mut meta = meta.clone();
        meta.migration = None;
        let mut migrating = write_lock(&self.migrating);
        let mut batch = self.begin_write();
        batch.set_aggregation_meta(aggregation, &meta)?;
        for ((topic, partition), next) in catch_up {
            batch.set_catch_up(self.topic_id(topic)?, *partition, aggregation, Some(*next));
        }
        self.write(batch)?;
        migrating.remove(aggregation);
        Ok(())
    }
}

impl StateStore {
    /// Where an aggregation stands on each partition consumed so far (of
    /// the topics `applies_to` accepts): its catch-up entry if it is
    /// behind, else the partition's stored offset.
    fn own_offsets(
        &self,
        aggregation: &str,
        applies_to: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let mut own = self.consumed(applies_to)?;
        for (partition, entries) in self.all_catch_ups()? {
            if let (Some(next), Some(&behind)) = (own.get_mut(&partition), entries.get(aggregation))
            {
                *next = behind;
            }
        }
        Ok(own)
    }

    /// Writes `batch`, which leaves the aggregation without a migration
    /// (cleared, registered anew, dropped), and forgets its migration for
    /// queries in the same step.
    pub(super) fn write_ending_migration(
        &self,
        aggregation: &str,
        batch: StateWrite<'_>,
    ) -> Result<(), StoreError> {
        let mut migrating = write_lock(&self.migrating);
        self.write(batch)?;
        migrating.remove(aggregation);
        Ok(())
    }
}

fn behind(migration: &Migration) -> Behind {
    Behind {
        from_format: migration.from_format,
        through: migration.through.clone(),
    }
}
