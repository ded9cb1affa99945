//! Reads of states: point lookups, scans of a slot, paged listings and
//! size estimates.

use super::*;

impl StateStore {
    /// Calls `each` with every key and state of a slot, in key order, until
    /// it returns false.
    pub fn scan_slot(
        &self,
        aggregation: &str,
        slot: Slot,
        each: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let cf = self.aggregation_cf(aggregation)?;
        let prefix = slot.store_key(&[]);
        for item in self
            .db
            .iterator_cf(&cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            if !key.starts_with(&prefix) || !each(&key[Slot::LEN..], &value) {
                break;
            }
        }
        Ok(())
    }

    /// One state.
    pub fn get(
        &self,
        aggregation: &str,
        slot: Slot,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let cf = self.aggregation_cf(aggregation)?;
        self.db
            .get_cf(&cf, slot.store_key(key))
            .map_err(|e| self.rocks(e))
    }

    /// Several states of one aggregation at once.
    pub fn multi_get(
        &self,
        aggregation: &str,
        keys: &[(Slot, &[u8])],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let cf = self.aggregation_cf(aggregation)?;
        let encoded: Vec<Vec<u8>> = keys.iter().map(|(slot, key)| slot.store_key(key)).collect();
        self.db
            .batched_multi_get_cf(&cf, &encoded, false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|v| v.to_vec())).map_err(|e| self.rocks(e)))
            .collect()
    }

    /// The slots that hold state of `aggregation` (possibly also some that
    /// held state once).
    pub fn slots(&self, aggregation: &str) -> Result<Vec<Slot>, StoreError> {
        if let Some(known) = read_lock(&self.known_slots).get(aggregation) {
            return Ok(known.iter().copied().collect());
        }
        let scanned = self.scan_slots(aggregation)?;
        let mut known = write_lock(&self.known_slots);
        let entry = known.entry(aggregation.to_owned()).or_default();
        entry.extend(scanned);
        Ok(entry.iter().copied().collect())
    }

    /// The slots that hold state, found by seeking from one slot prefix to
    /// the next (one seek per slot).
    fn scan_slots(&self, aggregation: &str) -> Result<Vec<Slot>, StoreError> {
        let cf = self.aggregation_cf(aggregation)?;
        let mut slots = Vec::new();
        let mut iter = self.db.raw_iterator_cf(&cf);
        iter.seek_to_first();
        while let Some(key) = iter.key() {
            let Some((slot, _)) = Slot::decode(key) else {
                break;
            };
            slots.push(slot);
            if slot == Slot::REKEYED {
                break;
            }
            // Seek past every key of this slot.
            match next_prefix(&slot.store_key(&[])) {
                Some(next) => iter.seek(next),
                None => break,
            }
        }
        iter.status().map_err(|e| self.rocks(e))?;
        Ok(slots)
    }

    /// A key's state, wherever (in whichever slot) it lives.
    pub fn find(&self, aggregation: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let slots = self.slots(aggregation)?;
        let lookups: Vec<(Slot, &[u8])> = slots.iter().map(|&slot| (slot, key)).collect();
        Ok(self
            .multi_get(aggregation, &lookups)?
            .into_iter()
            .flatten()
            .next())
    }

    /// Up to `limit` stored windows of a windowed aggregation's `key`, in
    /// `slot` or every slot: (slot, window key, state), in start order per
    /// slot.
    pub fn windows_of_key(
        &self,
        aggregation: &str,
        slot: Option<Slot>,
        key: &[u8],
        limit: usize,
    ) -> Result<SlottedStates, StoreError> {
        let slots = match slot {
            Some(slot) => vec![slot],
            None => self.slots(aggregation)?,
        };
        self.entries_in_slots(aggregation, &slots, &window_prefix(key), None, limit)
    }

    /// Windowed listings: up to `limit` window entries in `slots` whose key
    /// starts with `prefix` (a plain key prefix), after every window of the
    /// plain key `after`.
    pub fn windows_in_slots(
        &self,
        aggregation: &str,
        slots: &[Slot],
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<SlottedStates, StoreError> {
        // The escaped prefix without the end-of-key marker.
        let mut escaped = window_prefix(prefix);
        escaped.truncate(escaped.len() - 2);
        let after = after.map(after_windows_of);
        self.entries_in_slots(aggregation, slots, &escaped, after.as_deref(), limit)
    }

    /// Up to `limit` keys starting with `prefix` and greater than `after`, in
    /// byte order across all slots, with their states.
    pub fn list(
        &self,
        aggregation: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyStates, StoreError> {
        let slots = self.slots(aggregation)?;
        self.list_in_slots(aggregation, &slots, prefix, after, limit)
    }

    /// [`StateStore::list`] over the given slots only.
    pub fn list_in_slots(
        &self,
        aggregation: &str,
        slots: &[Slot],
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KeyStates, StoreError> {
        Ok(self
            .entries_in_slots(aggregation, slots, prefix, after, limit)?
            .into_iter()
            .map(|(_, key, state)| (key, state))
            .collect())
    }

    /// [`StateStore::list_in_slots`], with the slot of each entry (a key
    /// may be in several slots: one entry each, in slot order).
    pub(super) fn entries_in_slots(
        &self,
        aggregation: &str,
        slots: &[Slot],
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<SlottedStates, StoreError> {
        let cf = self.aggregation_cf(aggregation)?;
        // One cursor per slot, merged in key order: at most `limit` entries
        // are read (plus one look-ahead per slot), however many slots.
        let mut cursors: Vec<(Vec<u8>, rocksdb::DBRawIteratorWithThreadMode<'_, Db>)> = slots
            .iter()
            .map(|&slot| {
                let slot_prefix = slot.store_key(prefix);
                let start = match after {
                    Some(after) if after >= prefix => {
                        let mut start = slot.store_key(after);
                        start.push(0);
                        start
                    }
                    _ => slot_prefix.clone(),
                };
                let mut cursor = self.db.raw_iterator_cf(&cf);
                cursor.seek(&start);
                (slot_prefix, cursor)
            })
            .collect();
        let mut found = Vec::new();
        while found.len() < limit {
            let next = cursors
                .iter()
                .enumerate()
                .filter_map(|(i, (slot_prefix, cursor))| {
                    let key = cursor.key().filter(|k| k.starts_with(slot_prefix))?;
                    Some((i, &key[Slot::LEN..]))
                })
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            let cursor = &mut cursors[i].1;
            if let (Some(key), Some(value)) = (cursor.key(), cursor.value()) {
                found.push((slots[i], key[Slot::LEN..].to_vec(), value.to_vec()));
            }
            cursor.next();
        }
        for (_, cursor) in &cursors {
            cursor.status().map_err(|e| self.rocks(e))?;
        }
        Ok(found)
    }

    /// Bytes in live SST files plus memtables, over all column families.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        let names: Vec<String> = self
            .column_families
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for name in &names {
            let Some(cf) = self.db.cf_handle(name) else {
                continue;
            };
            for property in [
                "rocksdb.live-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                total += self
                    .db
                    .property_int_value_cf(&cf, property)
                    .map_err(|e| self.rocks(e))?
                    .unwrap_or(0);
            }
        }
        Ok(total)
    }
}
