//! Writes: every change to states, offsets, commits and counters goes
//! through a [`StateWrite`], applied atomically by [`StateStore::write`].

use super::key_count::{Touched, counts_range};
use super::*;

impl StateStore {
    /// Writes a batch atomically, with the key counts it changes.
    pub fn write(&self, mut batch: StateWrite<'_>) -> Result<(), StoreError> {
        self.add_count_changes(&mut batch)?;
        self.db
            .write_opt(batch.batch, &self.write_options)
            .map_err(|e| self.rocks(e))?;
        if !batch.slots.is_empty() {
            let mut known = write_lock(&self.known_slots);
            for (aggregation, slot) in batch.slots {
                // Aggregations never looked up yet are scanned on first use.
                if let Some(slots) = known.get_mut(&aggregation) {
                    slots.insert(slot);
                }
            }
        }
        Ok(())
    }

    pub fn begin_write(&self) -> StateWrite<'_> {
        StateWrite {
            store: self,
            batch: WriteBatch::default(),
            slots: BTreeSet::new(),
            last_slot: None,
            touched: Vec::new(),
            aggregations: Vec::new(),
            cleared: Vec::new(),
        }
    }
}

/// Changes that become visible together or not at all.
pub struct StateWrite<'s> {
    pub(super) store: &'s StateStore,
    pub(super) batch: WriteBatch,
    /// Slots this batch writes states into, for `known_slots`.
    slots: BTreeSet<(String, Slot)>,
    /// The last slot added to `slots` (writes come in key order, so this
    /// saves a set insert per state).
    last_slot: Option<(String, Slot)>,
    /// The states written, for the key counts.
    pub(super) touched: Vec<Touched>,
    /// Names of the aggregations in `touched` (by index).
    pub(super) aggregations: Vec<String>,
    /// Aggregations cleared by this batch: what they held is gone.
    pub(super) cleared: Vec<String>,
}

impl StateWrite<'_> {
    pub fn put_state(
        &mut self,
        aggregation: &str,
        slot: Slot,
        key: &[u8],
        state: &[u8],
    ) -> Result<(), StoreError> {
        let cf = self.store.aggregation_cf(aggregation)?;
        let store_key = slot.store_key(key);
        self.batch.put_cf(&cf, &store_key, state);
        self.note_slot(aggregation, slot);
        self.touch(aggregation, store_key, true);
        Ok(())
    }

    fn touch(&mut self, aggregation: &str, store_key: Vec<u8>, exists: bool) {
        let index = match self.aggregations.iter().rposition(|a| a == aggregation) {
            Some(index) => index,
            None => {
                self.aggregations.push(aggregation.to_owned());
                self.aggregations.len() - 1
            }
        };
        self.touched.push(Touched {
            aggregation: index,
            store_key,
            exists,
        });
    }

    fn note_slot(&mut self, aggregation: &str, slot: Slot) {
        let seen = self
            .last_slot
            .as_ref()
            .is_some_and(|(name, last)| *last == slot && name == aggregation);
        if !seen {
            self.last_slot = Some((aggregation.to_owned(), slot));
            self.slots.insert((aggregation.to_owned(), slot));
        }
    }

    /// A state by its encoded store key ([`Slot::store_key`]).
    pub fn put_raw(
        &mut self,
        aggregation: &str,
        store_key: &[u8],
        state: &[u8],
    ) -> Result<(), StoreError> {
        let cf = self.store.aggregation_cf(aggregation)?;
        self.batch.put_cf(&cf, store_key, state);
        if let Some((slot, _)) = Slot::decode(store_key) {
            self.note_slot(aggregation, slot);
        }
        self.touch(aggregation, store_key.to_vec(), true);
        Ok(())
    }

    pub fn delete_raw(&mut self, aggregation: &str, store_key: &[u8]) -> Result<(), StoreError> {
        let cf = self.store.aggregation_cf(aggregation)?;
        self.batch.delete_cf(&cf, store_key);
        self.touch(aggregation, store_key.to_vec(), false);
        Ok(())
    }

    pub fn delete_state(
        &mut self,
        aggregation: &str,
        slot: Slot,
        key: &[u8],
    ) -> Result<(), StoreError> {
        let cf = self.store.aggregation_cf(aggregation)?;
        let store_key = slot.store_key(key);
        self.batch.delete_cf(&cf, &store_key);
        self.touch(aggregation, store_key, false);
        Ok(())
    }

    /// Records that everything before `next_offset` of the partition is
    /// applied.
    pub fn set_offset(&mut self, topic_id: u16, partition: i32, next_offset: i64) {
        self.batch.put_cf(
            &self.store.meta(),
            partition_key(OFFSET_PREFIX, topic_id, partition),
            next_offset.to_be_bytes(),
        );
    }

    /// Records the changelog commit the partition's state is at.
    pub fn set_commit(&mut self, topic_id: u16, partition: i32, epoch: u64, seq: u64) {
        let mut value = epoch.to_be_bytes().to_vec();
        value.extend_from_slice(&seq.to_be_bytes());
        self.batch.put_cf(
            &self.store.meta(),
            partition_key(COMMIT_PREFIX, topic_id, partition),
            value,
        );
    }

    /// Sets the aggregation's counters to these totals.
    pub fn set_counters(&mut self, aggregation: &str, counters: &AggregationCounters) {
        let meta = &self.store.meta();
        for (prefix, value) in [
            (APPLIED_PREFIX, counters.records_applied),
            (FAILED_PREFIX, counters.records_failed),
            (DEAD_LETTERED_PREFIX, counters.records_dead_lettered),
            (LATE_PREFIX, counters.records_late),
            (DROPPED_PREFIX, counters.records_dropped),
        ] {
            self.batch.put_cf(
                meta,
                meta_key(prefix, aggregation.as_bytes()),
                value.to_be_bytes(),
            );
        }
    }

    /// Records the plugin that writes the aggregation's state.
    pub fn set_aggregation_meta(
        &mut self,
        aggregation: &str,
        meta: &AggregationMeta,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(meta).map_err(|e| self.store.corrupt(e.to_string()))?;
        self.batch.put_cf(
            &self.store.meta(),
            meta_key(AGG_META_PREFIX, aggregation.as_bytes()),
            value,
        );
        Ok(())
    }

    /// Deletes every state of the aggregation and zeroes its counters.
    pub fn clear_aggregation(&mut self, aggregation: &str) -> Result<(), StoreError> {
        let cf = self.store.aggregation_cf(aggregation)?;
        self.batch
            .delete_range_cf(&cf, [].as_slice(), vec![0xff; Slot::LEN + 1].as_slice());
        self.set_counters(aggregation, &AggregationCounters::default());
        // What this batch wrote of it before is gone too.
        let index = self.aggregations.iter().position(|a| a == aggregation);
        self.touched.retain(|t| Some(t.aggregation) != index);
        self.cleared.push(aggregation.to_owned());
        self.delete_counts(aggregation);
        Ok(())
    }

    /// Deletes the aggregation's key counts.
    pub(super) fn delete_counts(&mut self, aggregation: &str) {
        let (start, end) = counts_range(aggregation);
        self.batch.delete_range_cf(&self.store.meta(), &start, &end);
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}
