//! The state store: per-key aggregation state and consumed offsets in
//! RocksDB.
//!
//! Layout:
//! - one column family per aggregation, `agg.<name>`; each key is
//!   `slot (6 bytes) ++ aggregation key`, where the slot is the source
//!   `(topic id u16, partition u32)`, big-endian, so a partition's state is
//!   one contiguous range that can be moved, restored or dropped as a unit.
//!   Aggregations that re-key records by a value field use the single
//!   [`Slot::REKEYED`] slot, because one key's records then come from many
//!   partitions;
//! - the `meta` column family: the topic-id table, per-partition next
//!   offsets, per-aggregation metadata and counters.
//!
//! Invariant: states and offsets change only together, in one
//! [`StateWrite`] written atomically, so the store always equals "every
//! record before the stored offsets, each applied once".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rocksdb::{
    BlockBasedOptions, BoundColumnFamily, Cache, ColumnFamilyDescriptor, DBWithThreadMode,
    Direction, IteratorMode, MultiThreaded, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};

mod admin;
mod catch_up;
mod key_count;
mod layout;
mod migration;
mod reads;
mod windowed;
mod write;

pub use catch_up::CatchUps;
use layout::*;
pub use layout::{InlineKey, KeyStates, Slot};
pub use migration::{Behind, Migration, MigrationChunk, StateMigrator};
pub use windowed::{
    WindowedKey, after_windows_of, session_key, split_window_key, window_key, window_prefix,
};
pub use write::StateWrite;

/// Per-aggregation record counters, stored with the state they describe.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct AggregationCounters {
    /// Records whose effect is in the state.
    pub records_applied: u64,
    /// Records the plugin rejected (skipped or dead-lettered).
    pub records_failed: u64,
    /// Of `records_failed`, those sent to the dead-letter topic.
    pub records_dead_lettered: u64,
    /// Records of a windowed aggregation that came after every window
    /// they belong to had closed: not applied (and not in
    /// `records_failed`; dead-lettered, and counted there too, under
    /// `on_error = "dead-letter"`).
    pub records_late: u64,
    /// Records not aggregated by rule: a record without a Kafka key (null
    /// key) in an aggregation keyed by it, as Kafka Streams drops them.
    pub records_dropped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state directory {dir} is in use by another wagg process (RocksDB lock held); stop it or use another `state.dir`"
    )]
    Locked { dir: PathBuf },
    // The RocksDB error is in the message only (see PluginError::Read).
    #[error("state store {dir}: {error}")]
    Rocks { dir: PathBuf, error: rocksdb::Error },
    #[error(
        "aggregation {:?}: the stored state was written by plugin {} {} in state format {}, but the configured plugin {} {} uses format {}; use a compatible plugin (or one that migrates from format {}: see `migrate` in the plugin guide) or a new aggregation name",
        .0.aggregation, .0.stored.plugin_name, .0.stored.plugin_version, .0.stored.state_format,
        .0.configured.plugin_name, .0.configured.plugin_version, .0.configured.state_format,
        .0.stored.state_format
    )]
    IncompatibleState(Box<Incompatibility>),
    #[error(
        "aggregation {:?}: its state is being migrated to state format {} of plugin {} (from format {}), but the configured plugin {} {} uses format {}; configure a plugin of format {} to finish the migration, or `wagg reset` the aggregation",
        .0.aggregation, .0.stored.state_format, .0.stored.plugin_name,
        .0.stored.migration.as_ref().map_or(0, |m| m.from_format),
        .0.configured.plugin_name, .0.configured.plugin_version, .0.configured.state_format,
        .0.stored.state_format
    )]
    MigrationInProgress(Box<Incompatibility>),
    #[error("state store {dir}: corrupt metadata: {message}")]
    Corrupt { dir: PathBuf, message: String },
    #[error("unknown aggregation {0:?}")]
    UnknownAggregation(String),
}

/// The stored and configured plugins of an aggregation whose state formats
/// differ.
#[derive(Debug)]
pub struct Incompatibility {
    pub aggregation: String,
    pub stored: AggregationMeta,
    pub configured: AggregationMeta,
}

/// What is recorded about the plugin that writes an aggregation's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregationMeta {
    pub plugin_name: String,
    pub plugin_version: String,
    pub state_format: u32,
    pub content_hash: String,
    /// The aggregation was left out of the config of a run: the records
    /// consumed since are not in its state, so if it comes back it starts
    /// over (see [`StateStore::mark_removed`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// The stored states are being migrated to `state_format` (see
    /// `migration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// Whether the store knew an aggregation before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Its state (possibly empty) and progress are in the store.
    Known,
    /// Never run on this store: nothing of it is stored yet.
    New,
}

/// Options the store is opened with.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub block_cache_bytes: usize,
    pub sync_writes: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            sync_writes: false,
        }
    }
}

/// Multi-threaded mode: column families are created and dropped while
/// the store is shared (an aggregation added or dropped by a reload).
type Db = DBWithThreadMode<MultiThreaded>;

pub struct StateStore {
    db: Db,
    dir: PathBuf,
    write_options: WriteOptions,
    topic_ids: Mutex<HashMap<String, u16>>,
    /// Per aggregation, the slots known to hold state: found by one scan on
    /// first use, then extended by every write, so a key lookup costs one
    /// point read per slot and no iterator (iterators over a memtable under
    /// heavy writes were most of a lookup's time while ingesting).
    known_slots: RwLock<HashMap<String, BTreeSet<Slot>>>,
    /// The column families open, and the options a new one gets.
    column_families: RwLock<BTreeSet<String>>,
    block_cache: Cache,
    /// Aggregations being migrated → how far (see `migration`).
    migrating: RwLock<HashMap<String, Behind>>,
}

impl StateStore {
    /// Opens (or creates) the store with a column family per aggregation.
    // RocksDB options, column families and the lock error, in the order
    // RocksDB needs them.
    pub fn open(
        dir: &Path,
        aggregations: &[&str],
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Corrupt {
            dir: dir.to_owned(),
            message: format!("cannot create the directory: {e}"),
        })?;
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        // Keep every existing column family open (aggregations removed from
        // the config keep their state until deleted on purpose).
        let existing = Db::list_cf(&db_options, dir).unwrap_or_default();
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut names: Vec<String> = existing;
        names.push(META_CF.into());
        names.extend(aggregations.iter().map(|a| format!("{AGG_CF_PREFIX}{a}")));
        names.sort();
        names.dedup();
        let descriptors = names.iter().map(|name| {
            let mut options = column_family_options(&cache);
            if name == META_CF {
                options.set_merge_operator_associative(key_count::ADD_I64, key_count::add_i64);
            }
            ColumnFamilyDescriptor::new(name, options)
        });
        let db = Db::open_cf_descriptors(&db_options, dir, descriptors).map_err(|source| {
            if source.to_string().contains("lock") {
                StoreError::Locked {
                    dir: dir.to_owned(),
                }
            } else {
                StoreError::Rocks {
                    dir: dir.to_owned(),
                    error: source,
                }
            }
        })?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(options.sync_writes);
        let store = Self {
            db,
            dir: dir.to_owned(),
            write_options,
            topic_ids: Mutex::new(HashMap::new()),
            known_slots: RwLock::new(HashMap::new()),
            column_families: RwLock::new(names.into_iter().collect()),
            block_cache: cache,
            migrating: RwLock::new(HashMap::new()),
        };
        store.load_topic_ids()?;
        store.load_migrations()?;
        for aggregation in store.stored_aggregations() {
            store.count_if_uncounted(&aggregation)?;
        }
        Ok(store)
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            dir: self.dir.clone(),
            error: source,
        }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            message,
        }
    }

    fn meta(&self) -> Arc<BoundColumnFamily<'_>> {
        self.db
            .cf_handle(META_CF)
            .expect("meta column family is created at open")
    }

    fn aggregation_cf(&self, aggregation: &str) -> Result<Arc<BoundColumnFamily<'_>>, StoreError> {
        self.db
            .cf_handle(&format!("{AGG_CF_PREFIX}{aggregation}"))
            .ok_or_else(|| StoreError::UnknownAggregation(aggregation.to_owned()))
    }

    fn meta_scan(&self, prefix: &[u8]) -> Result<KeyStates, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&self.meta(), IteratorMode::From(prefix, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            out.push((rest.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    fn load_topic_ids(&self) -> Result<(), StoreError> {
        let mut ids = self.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
        for (name, id) in self.meta_scan(TOPIC_PREFIX)? {
            let name = String::from_utf8(name)
                .map_err(|_| self.corrupt("topic name is not UTF-8".into()))?;
            let id: [u8; 2] = id
                .try_into()
                .map_err(|_| self.corrupt(format!("topic id of {name:?} is malformed")))?;
            ids.insert(name, u16::from_be_bytes(id));
        }
        Ok(())
    }

    /// The id of `topic`, assigned and persisted on first use.
    pub fn topic_id(&self, topic: &str) -> Result<u16, StoreError> {
        let mut ids = self.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = ids.get(topic) {
            return Ok(id);
        }
        let id = u16::try_from(ids.len())
            .ok()
            .filter(|&id| id < u16::MAX)
            .ok_or_else(|| self.corrupt("too many topics".into()))?;
        self.db
            .put_cf_opt(
                &self.meta(),
                meta_key(TOPIC_PREFIX, topic.as_bytes()),
                id.to_be_bytes(),
                &self.write_options,
            )
            .map_err(|e| self.rocks(e))?;
        ids.insert(topic.to_owned(), id);
        Ok(id)
    }

    /// The id of `topic` if it has one (never assigns one).
    pub fn known_topic_id(&self, topic: &str) -> Option<u16> {
        let ids = self.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.get(topic).copied()
    }

    /// A per-partition `meta` value (none for a topic never seen).
    fn partition_meta(
        &self,
        prefix: &[u8],
        topic: &str,
        partition: i32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(topic_id) = self.known_topic_id(topic) else {
            return Ok(None);
        };
        self.db
            .get_cf(&self.meta(), partition_key(prefix, topic_id, partition))
            .map_err(|e| self.rocks(e))
    }

    /// The next offset stored for a partition.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.partition_meta(OFFSET_PREFIX, topic, partition)?
            .map(|v| self.offset_value(&v))
            .transpose()
    }

    /// The changelog commit `(epoch, seq)` the partition's local state is
    /// at (cluster mode; see `cluster::log`).
    pub fn local_commit(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        self.partition_meta(COMMIT_PREFIX, topic, partition)?
            .map(|v| {
                let bytes = <[u8; 16]>::try_from(v.as_slice())
                    .map_err(|_| self.corrupt("commit value is malformed".into()))?;
                let (epoch, seq) = bytes.split_at(8);
                let number = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
                Ok((number(epoch), number(seq)))
            })
            .transpose()
    }

    /// Deletes a partition's states in the given aggregations, its offset,
    /// its aggregations' catch-up progress and its commit, in one write: the partition then starts from
    /// nothing (before a restore).
    pub fn clear_slot(&self, aggregations: &[&str], slot: Slot) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let start = slot.store_key(&[]);
        let end = next_prefix(&start).unwrap_or_else(|| vec![0xff; Slot::LEN + 1]);
        for aggregation in aggregations {
            batch.delete_range_cf(&self.aggregation_cf(aggregation)?, &start, &end);
            batch.delete_cf(&self.meta(), key_count::count_key(aggregation, slot));
        }
        let partition = slot.partition as i32;
        batch.delete_cf(
            &self.meta(),
            partition_key(OFFSET_PREFIX, slot.topic_id, partition),
        );
        batch.delete_cf(
            &self.meta(),
            partition_key(COMMIT_PREFIX, slot.topic_id, partition),
        );
        for prefix in [CATCH_UP_PREFIX, STREAM_TIME_PREFIX] {
            let start = partition_key(prefix, slot.topic_id, partition);
            let end = next_prefix(&start).unwrap_or_else(|| vec![0xff; start.len()]);
            batch.delete_range_cf(&self.meta(), &start, &end);
        }
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.rocks(e))
    }

    /// The topic name of an id, for reporting.
    pub fn topic_name(&self, id: u16) -> Option<String> {
        let ids = self.topic_ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().find(|(_, v)| **v == id).map(|(k, _)| k.clone())
    }

    /// Checks the plugin of `aggregation` against the one that wrote its
    /// state: it must have the same name and state format (a new version
    /// is recorded). An aggregation the store does not know yet, or one
    /// that was removed from the config meanwhile, is
    /// [`Registration::New`] and nothing is written: see
    /// [`StateStore::register_aggregation`].
    pub fn check_aggregation_meta(
        &self,
        aggregation: &str,
        meta: &AggregationMeta,
    ) -> Result<Registration, StoreError> {
        let Some(stored) = self.aggregation_meta(aggregation)? else {
            return Ok(Registration::New);
        };
        if stored.removed {
            // Whatever it is now, its old state is discarded.
            return Ok(Registration::New);
        }
        if stored.state_format != meta.state_format || stored.plugin_name != meta.plugin_name {
            let incompatibility = Box::new(Incompatibility {
                aggregation: aggregation.to_owned(),
                stored,
                configured: meta.clone(),
            });
            return Err(match incompatibility.stored.migration {
                Some(_) => StoreError::MigrationInProgress(incompatibility),
                None => StoreError::IncompatibleState(incompatibility),
            });
        }
        // A migration in progress goes on with the new build.
        let meta = AggregationMeta {
            migration: stored.migration.clone(),
            ..meta.clone()
        };
        if stored != meta {
            let mut batch = self.begin_write();
            batch.set_aggregation_meta(aggregation, &meta)?;
            self.write(batch)?;
        }
        Ok(Registration::Known)
    }

    pub fn aggregation_meta(
        &self,
        aggregation: &str,
    ) -> Result<Option<AggregationMeta>, StoreError> {
        let key = meta_key(AGG_META_PREFIX, aggregation.as_bytes());
        match self
            .db
            .get_cf(&self.meta(), key)
            .map_err(|e| self.rocks(e))?
        {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(format!("metadata of aggregation {aggregation:?}: {e}"))),
        }
    }

    /// The stored next offsets of the partitions of topics `applies_to`
    /// accepts (the partitions consumed so far that an aggregation reads).
    pub fn consumed(
        &self,
        applies_to: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let mut offsets = self.offsets()?;
        offsets.retain(|(topic, _), _| applies_to(topic));
        Ok(offsets)
    }

    /// Next offset to consume for every partition with stored progress.
    pub fn offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.meta_scan(OFFSET_PREFIX)? {
            let (topic_id, partition) = match key.as_slice() {
                [t0, t1, p0, p1, p2, p3] => (
                    u16::from_be_bytes([*t0, *t1]),
                    i32::from_be_bytes([*p0, *p1, *p2, *p3]),
                ),
                _ => return Err(self.corrupt("offset key is malformed".into())),
            };
            let offset = self.offset_value(&value)?;
            let topic = self
                .topic_name(topic_id)
                .ok_or_else(|| self.corrupt(format!("offset for unknown topic id {topic_id}")))?;
            out.insert((topic, partition), offset);
        }
        Ok(out)
    }

    pub fn counters(&self, aggregation: &str) -> Result<AggregationCounters, StoreError> {
        let read = |prefix: &[u8]| -> Result<u64, StoreError> {
            let value = self
                .db
                .get_cf(&self.meta(), meta_key(prefix, aggregation.as_bytes()))
                .map_err(|e| self.rocks(e))?;
            Ok(value
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        Ok(AggregationCounters {
            records_applied: read(APPLIED_PREFIX)?,
            records_failed: read(FAILED_PREFIX)?,
            records_dead_lettered: read(DEAD_LETTERED_PREFIX)?,
            records_late: read(LATE_PREFIX)?,
            records_dropped: read(DROPPED_PREFIX)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

// The guarded maps are caches that stay consistent under a panic (every
// update is one insert), so a poisoned lock is used as is.
fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;

/// The options of every aggregation's column family (and `meta`'s).
fn column_family_options(cache: &Cache) -> Options {
    let mut cf_options = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    // Point lookups of keys never seen before are the common case for new
    // keys: a bloom filter answers most without a read.
    table.set_bloom_filter(10.0, false);
    // Index and filter blocks live in the block cache (memory stays bounded
    // by `state.block_cache_mib`), partitioned so that a lookup reads one
    // small partition, not a whole multi-megabyte filter: unpartitioned,
    // 10 M keys thrashed the cache and spent most of the time copying and
    // checksumming filter blocks.
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    cf_options.set_block_based_table_factory(&table);
    // Most lookups of a large key space miss the memtable; a bloom filter
    // over it answers those without walking the skip list (which was the
    // top of the profile at 10 M keys).
    cf_options.set_memtable_whole_key_filtering(true);
    cf_options.set_memtable_prefix_bloom_ratio(0.1);
    cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    cf_options
}
