//! Exact counts of each aggregation's stored states (keys; one per key
//! and window for windowed aggregations), kept in `meta` beside them.
//!
//! Every [`StateWrite`] that creates or deletes a state adds +1 or −1 to
//! the count of its (aggregation, slot) in the same atomic write, so a
//! count always matches the states it describes, across crashes. The
//! count is a merge operand (a sum), so writers of different slots never
//! read and rewrite one value. Whether a written key existed is read from
//! RocksDB just before the write (one batched lookup per write); a slot
//! has one writer at a time (the consumer, or the standby applier, or a
//! take-over), so nothing changes between that read and the write.
//!
//! (RocksDB's own `estimate-num-keys` counts every version of a key in the
//! memtables and unmerged files: 60–100× the truth under updates.)

use rocksdb::MergeOperands;

use super::*;

/// The name RocksDB stores with the `meta` column family's merge operator.
pub(super) const ADD_I64: &str = "wagg.add-i64";

/// Sums big-endian i64 operands onto the existing value.
pub(super) fn add_i64(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let total = operands
        .iter()
        .fold(existing.map_or(0, decode), |sum, operand| {
            sum.saturating_add(decode(operand))
        });
    Some(total.to_be_bytes().to_vec())
}

fn decode(bytes: &[u8]) -> i64 {
    bytes.try_into().map(i64::from_be_bytes).unwrap_or(0)
}

/// `keys\0 ‖ aggregation ‖ \0`: the prefix of an aggregation's counts (the
/// `\0` keeps aggregation `a` from matching `ab`'s).
pub(super) fn counts_prefix(aggregation: &str) -> Vec<u8> {
    let mut key = meta_key(KEYS_PREFIX, aggregation.as_bytes());
    key.push(0);
    key
}

/// The range `[start, end)` of an aggregation's counts.
pub(super) fn counts_range(aggregation: &str) -> (Vec<u8>, Vec<u8>) {
    let start = counts_prefix(aggregation);
    let end = next_prefix(&start).unwrap_or_else(|| vec![0xff; start.len()]);
    (start, end)
}

pub(super) fn count_key(aggregation: &str, slot: Slot) -> Vec<u8> {
    let mut key = counts_prefix(aggregation);
    key.extend_from_slice(&slot.store_key(&[]));
    key
}

/// A state written in a batch: whether it exists afterwards.
#[derive(Debug)]
pub(super) struct Touched {
    pub(super) aggregation: usize,
    pub(super) store_key: Vec<u8>,
    pub(super) exists: bool,
}

impl StateStore {
    /// How many states the aggregation holds: keys, or one per key and
    /// window for a windowed aggregation.
    pub fn count_keys(&self, aggregation: &str) -> Result<u64, StoreError> {
        self.aggregation_cf(aggregation)?;
        let total: i64 = self
            .meta_scan(&counts_prefix(aggregation))?
            .iter()
            .map(|(_, value)| decode(value))
            .sum();
        Ok(u64::try_from(total).unwrap_or(0))
    }

    /// Adds to `write` the count changes of the states it writes.
    pub(super) fn add_count_changes(&self, write: &mut StateWrite<'_>) -> Result<(), StoreError> {
        let mut touched = std::mem::take(&mut write.touched);
        if touched.is_empty() {
            return Ok(());
        }
        // Stable: of several writes of one key, the last is what stays.
        touched.sort_by(|a, b| (a.aggregation, &a.store_key).cmp(&(b.aggregation, &b.store_key)));
        let mut last: Vec<Touched> = Vec::with_capacity(touched.len());
        for item in touched {
            match last.last_mut() {
                Some(prev)
                    if prev.aggregation == item.aggregation && prev.store_key == item.store_key =>
                {
                    *prev = item;
                }
                _ => last.push(item),
            }
        }
        let mut deltas: BTreeMap<(usize, Slot), i64> = BTreeMap::new();
        for group in last.chunk_by(|a, b| a.aggregation == b.aggregation) {
            let index = group[0].aggregation;
            let name = &write.aggregations[index];
            let existed = if write.cleared.contains(name) {
                vec![false; group.len()]
            } else {
                self.existing(name, group)?
            };
            for (item, existed) in group.iter().zip(existed) {
                let delta = i64::from(item.exists) - i64::from(existed);
                if delta != 0
                    && let Some((slot, _)) = Slot::decode(&item.store_key)
                {
                    *deltas.entry((index, slot)).or_default() += delta;
                }
            }
        }
        let meta = self.meta();
        for ((index, slot), delta) in deltas {
            let key = count_key(&write.aggregations[index], slot);
            write.batch.merge_cf(&meta, key, delta.to_be_bytes());
        }
        Ok(())
    }

    /// Whether each of `group`'s keys (one aggregation's, sorted) has a
    /// state now.
    fn existing(&self, aggregation: &str, group: &[Touched]) -> Result<Vec<bool>, StoreError> {
        /// A lookup pins the block holding its value until it is dropped:
        /// in chunks, a flush of 400 k states pinned 80 MiB less.
        const CHUNK: usize = 1024;
        let cf = self.aggregation_cf(aggregation)?;
        let mut existing = Vec::with_capacity(group.len());
        for chunk in group.chunks(CHUNK) {
            for found in self.db.batched_multi_get_cf(
                &cf,
                chunk.iter().map(|t| t.store_key.as_slice()),
                true,
            ) {
                existing.push(found.map_err(|e| self.rocks(e))?.is_some());
            }
        }
        Ok(existing)
    }

    /// Counts the states of an aggregation whose count was never kept (a
    /// store written by a wagg before key counts, or a new column family):
    /// once, at open or when the aggregation is added.
    pub(super) fn count_if_uncounted(&self, aggregation: &str) -> Result<(), StoreError> {
        let marker = meta_key(KEYS_COUNTED_PREFIX, aggregation.as_bytes());
        let meta = self.meta();
        if self
            .db
            .get_pinned_cf(&meta, &marker)
            .map_err(|e| self.rocks(e))?
            .is_some()
        {
            return Ok(());
        }
        let cf = self.aggregation_cf(aggregation)?;
        let started = std::time::Instant::now();
        let mut per_slot: BTreeMap<Slot, i64> = BTreeMap::new();
        let mut keys = self.db.raw_iterator_cf(&cf);
        keys.seek_to_first();
        while let Some(key) = keys.key() {
            if let Some((slot, _)) = Slot::decode(key) {
                *per_slot.entry(slot).or_default() += 1;
            }
            keys.next();
        }
        keys.status().map_err(|e| self.rocks(e))?;
        let states: i64 = per_slot.values().sum();
        if states > 0 {
            tracing::info!(
                aggregation,
                states,
                seconds = started.elapsed().as_secs_f64(),
                "counted the stored states (once: the store predates key counts)"
            );
        }
        let mut batch = WriteBatch::default();
        let (start, end) = counts_range(aggregation);
        batch.delete_range_cf(&meta, &start, &end);
        for (slot, count) in per_slot {
            batch.put_cf(&meta, count_key(aggregation, slot), count.to_be_bytes());
        }
        batch.put_cf(&meta, marker, []);
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.rocks(e))
    }
}
