//! Which aggregations the store holds, and changes to that: dropping the
//! state of an aggregation removed from the config, opening one for an
//! aggregation added by a reload.

use super::*;

impl StateStore {
    /// The aggregations whose state the store holds (configured or not).
    pub fn stored_aggregations(&self) -> Vec<String> {
        self.column_families
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|cf| cf.strip_prefix(AGG_CF_PREFIX))
            .map(str::to_owned)
            .collect()
    }

    /// Deletes everything stored of an aggregation: its states (the whole
    /// column family), plugin record, counters and catch-up progress.
    /// Returns whether there was anything.
    pub fn drop_aggregation(&self, aggregation: &str) -> Result<bool, StoreError> {
        let cf = format!("{AGG_CF_PREFIX}{aggregation}");
        let mut column_families = self
            .column_families
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !column_families.contains(&cf) {
            return Ok(false);
        }
        let mut batch = self.begin_write();
        self.forget_catch_up(&mut batch, &self.all_catch_ups()?, aggregation)?;
        for prefix in [
            AGG_META_PREFIX,
            APPLIED_PREFIX,
            FAILED_PREFIX,
            DEAD_LETTERED_PREFIX,
            LATE_PREFIX,
            DROPPED_PREFIX,
            KEYS_COUNTED_PREFIX,
        ] {
            batch
                .batch
                .delete_cf(&self.meta(), meta_key(prefix, aggregation.as_bytes()));
        }
        batch.delete_counts(aggregation);
        self.write_ending_migration(aggregation, batch)?;
        self.db.drop_cf(&cf).map_err(|e| self.rocks(e))?;
        column_families.remove(&cf);
        Ok(true)
    }

    /// Opens a column family for an aggregation added while the store is
    /// open (a reload); nothing if it has one.
    pub fn add_aggregation(&self, aggregation: &str) -> Result<(), StoreError> {
        let cf = format!("{AGG_CF_PREFIX}{aggregation}");
        let mut column_families = self
            .column_families
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if column_families.contains(&cf) {
            return Ok(());
        }
        self.db
            .create_cf(&cf, &column_family_options(&self.block_cache))
            .map_err(|e| self.rocks(e))?;
        column_families.insert(cf);
        drop(column_families);
        self.count_if_uncounted(aggregation)
    }
}
