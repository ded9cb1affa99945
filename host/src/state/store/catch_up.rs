//! Progress of aggregations that are behind their partitions: one added to
//! a store that has consumed its topics already (or reset), catching up from
//! its own offset while the others go on live.
//!
//! A partition's stored offset is where its live consumption resumes; every
//! aggregation without a catch-up entry for the partition has applied
//! exactly the records before that offset. An aggregation with an entry `n`
//! has applied exactly the records before `n` instead. The entry changes
//! with the aggregation's states, in the same write, and is deleted by the
//! write that makes the aggregation current.

use super::*;

impl StateStore {
    /// The aggregations catching up on a partition, with their next
    /// offsets.
    pub fn catch_ups(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        self.partition_numbers(CATCH_UP_PREFIX, topic, partition)
    }

    /// One partition's per-aggregation numbers under `prefix` (catch-up
    /// offsets, stream times): aggregation → number. Reads that
    /// partition's entries only.
    fn partition_numbers(
        &self,
        prefix: &[u8],
        topic: &str,
        partition: i32,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let Some(topic_id) = self.known_topic_id(topic) else {
            return Ok(BTreeMap::new());
        };
        self.meta_scan(&partition_key(prefix, topic_id, partition))?
            .into_iter()
            .map(|(name, value)| {
                let name = String::from_utf8(name)
                    .map_err(|_| self.corrupt("a per-partition entry's key is malformed".into()))?;
                Ok((name, self.offset_value(&value)?))
            })
            .collect()
    }

    /// Every catch-up entry: partition → aggregation → next offset.
    pub fn all_catch_ups(&self) -> Result<CatchUps, StoreError> {
        self.partition_entries(CATCH_UP_PREFIX)
    }

    /// Every entry of a per-partition, per-aggregation number under
    /// `prefix` (catch-up offsets, stream times): partition → aggregation
    /// → value.
    pub(super) fn partition_entries(&self, prefix: &[u8]) -> Result<CatchUps, StoreError> {
        let mut out = CatchUps::new();
        for (key, value) in self.meta_scan(prefix)? {
            let malformed = || {
                self.corrupt(format!(
                    "meta key {:?} is malformed",
                    String::from_utf8_lossy(prefix)
                ))
            };
            let (slot, name) = key.split_at_checked(Slot::LEN).ok_or_else(malformed)?;
            let topic_id = u16::from_be_bytes([slot[0], slot[1]]);
            let partition = i32::from_be_bytes([slot[2], slot[3], slot[4], slot[5]]);
            let topic = self
                .topic_name(topic_id)
                .ok_or_else(|| self.corrupt(format!("catch-up for unknown topic id {topic_id}")))?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| malformed())?;
            out.entry((topic, partition))
                .or_default()
                .insert(name, self.offset_value(&value)?);
        }
        Ok(out)
    }

    /// Records an aggregation new to this store (its plugin) together with
    /// where it starts on the partitions the store has consumed already:
    /// one write, so a crash leaves it either unknown or registered with
    /// its catch-up. Whatever an earlier aggregation of that name left
    /// (it was removed from the config, then added back) is cleared in
    /// the same write.
    pub fn register_aggregation(
        &self,
        aggregation: &str,
        meta: &AggregationMeta,
        start: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), StoreError> {
        let mut batch = self.restart(aggregation, start)?;
        batch.set_aggregation_meta(aggregation, meta)?;
        self.write_ending_migration(aggregation, batch)
    }

    /// Clears an aggregation — its states, counters and catch-up progress —
    /// and has it start again from `start` on the partitions the store has
    /// consumed (the others start with everyone), in one write.
    pub fn reset_aggregation(
        &self,
        aggregation: &str,
        start: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), StoreError> {
        let mut batch = self.restart(aggregation, start)?;
        // Its states are gone: a migration of them is over too.
        if let Some(mut meta) = self.aggregation_meta(aggregation)?
            && meta.migration.take().is_some()
        {
            batch.set_aggregation_meta(aggregation, &meta)?;
        }
        self.write_ending_migration(aggregation, batch)
    }

    /// Marks the stored aggregations left out of `configured` as removed
    /// (once); returns them. Their states stay until `wagg state drop`,
    /// but they miss what is consumed from now on, so one that comes back
    /// starts over instead of being taken for current.
    pub fn mark_removed(&self, configured: &[&str]) -> Result<Vec<String>, StoreError> {
        let mut marked = Vec::new();
        let mut batch = self.begin_write();
        let catch_ups = self.all_catch_ups()?;
        for aggregation in self.stored_aggregations() {
            if configured.contains(&aggregation.as_str()) {
                continue;
            }
            if let Some(mut meta) = self.aggregation_meta(&aggregation)?
                && !meta.removed
            {
                meta.removed = true;
                batch.set_aggregation_meta(&aggregation, &meta)?;
                // Nothing re-reads the topic for it any more.
                self.forget_catch_up(&mut batch, &catch_ups, &aggregation)?;
                marked.push(aggregation);
            }
        }
        self.write(batch)?;
        Ok(marked)
    }

    /// A write that clears an aggregation and gives it catch-up entries
    /// from `start`.
    fn restart(
        &self,
        aggregation: &str,
        start: &BTreeMap<(String, i32), i64>,
    ) -> Result<StateWrite<'_>, StoreError> {
        let mut batch = self.begin_write();
        batch.clear_aggregation(aggregation)?;
        self.forget_catch_up(&mut batch, &self.all_catch_ups()?, aggregation)?;
        for (topic, partition) in self.stream_times(aggregation)?.keys() {
            batch.set_stream_time(self.topic_id(topic)?, *partition, aggregation, None);
        }
        for ((topic, partition), next) in start {
            batch.set_catch_up(self.topic_id(topic)?, *partition, aggregation, Some(*next));
        }
        Ok(batch)
    }

    /// Adds the deletion of every catch-up entry of `aggregation` (among
    /// `catch_ups`) to `batch`.
    pub(super) fn forget_catch_up(
        &self,
        batch: &mut StateWrite<'_>,
        catch_ups: &CatchUps,
        aggregation: &str,
    ) -> Result<(), StoreError> {
        for ((topic, partition), entries) in catch_ups {
            if entries.contains_key(aggregation) {
                batch.set_catch_up(self.topic_id(topic)?, *partition, aggregation, None);
            }
        }
        Ok(())
    }

    pub(super) fn offset_value(&self, value: &[u8]) -> Result<i64, StoreError> {
        <[u8; 8]>::try_from(value)
            .map(i64::from_be_bytes)
            .map_err(|_| self.corrupt("offset value is malformed".into()))
    }
}

/// Catch-up entries: partition → aggregation → next offset.
pub type CatchUps = BTreeMap<(String, i32), BTreeMap<String, i64>>;

fn catch_up_key(topic_id: u16, partition: i32, aggregation: &str) -> Vec<u8> {
    aggregation_key(CATCH_UP_PREFIX, topic_id, partition, aggregation)
}

/// The key of an aggregation's entry under `prefix` for a partition.
fn aggregation_key(prefix: &[u8], topic_id: u16, partition: i32, aggregation: &str) -> Vec<u8> {
    let mut key = partition_key(prefix, topic_id, partition);
    key.extend_from_slice(aggregation.as_bytes());
    key
}

impl StateWrite<'_> {
    /// Sets (or, with `None`, deletes: the aggregation is current) an
    /// aggregation's own next offset on a partition.
    pub fn set_catch_up(
        &mut self,
        topic_id: u16,
        partition: i32,
        aggregation: &str,
        next: Option<i64>,
    ) {
        let key = catch_up_key(topic_id, partition, aggregation);
        match next {
            Some(next) => self
                .batch
                .put_cf(&self.store.meta(), key, next.to_be_bytes()),
            None => self.batch.delete_cf(&self.store.meta(), key),
        }
    }
}

impl StateStore {
    /// Every windowed aggregation's stream time on one partition.
    pub fn stream_times_of(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        self.partition_numbers(STREAM_TIME_PREFIX, topic, partition)
    }

    /// The stream time of a windowed aggregation on each partition it has
    /// seen records of: the largest event time there (ms).
    pub fn stream_times(
        &self,
        aggregation: &str,
    ) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        Ok(self
            .partition_entries(STREAM_TIME_PREFIX)?
            .into_iter()
            .filter_map(|(partition, mut entries)| Some((partition, entries.remove(aggregation)?)))
            .collect())
    }
}

impl StateWrite<'_> {
    /// Sets (or, with `None`, deletes) a windowed aggregation's stream time
    /// on a partition.
    pub fn set_stream_time(
        &mut self,
        topic_id: u16,
        partition: i32,
        aggregation: &str,
        time: Option<i64>,
    ) {
        let key = aggregation_key(STREAM_TIME_PREFIX, topic_id, partition, aggregation);
        match time {
            Some(time) => self
                .batch
                .put_cf(&self.store.meta(), key, time.to_be_bytes()),
            None => self.batch.delete_cf(&self.store.meta(), key),
        }
    }
}
