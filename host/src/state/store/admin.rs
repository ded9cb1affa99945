//! Changes an operator makes to a stopped instance's store: dropping the
//! state of an aggregation removed from the config.

use super::*;

impl StateStore {
    /// The aggregations whose state the store holds (configured or not).
    pub fn stored_aggregations(&self) -> Vec<String> {
        self.column_families
            .iter()
            .filter_map(|cf| cf.strip_prefix(AGG_CF_PREFIX))
            .map(str::to_owned)
            .collect()
    }

    /// Deletes everything stored of an aggregation: its states (the whole
    /// column family), plugin record, counters and catch-up progress.
    /// Returns whether there was anything.
    pub fn drop_aggregation(&mut self, aggregation: &str) -> Result<bool, StoreError> {
        let cf = format!("{AGG_CF_PREFIX}{aggregation}");
        if !self.column_families.contains(&cf) {
            return Ok(false);
        }
        let mut batch = self.begin_write();
        self.forget_catch_up(&mut batch, &self.all_catch_ups()?, aggregation)?;
        for prefix in [
            AGG_META_PREFIX,
            APPLIED_PREFIX,
            FAILED_PREFIX,
            DEAD_LETTERED_PREFIX,
        ] {
            batch
                .batch
                .delete_cf(self.meta(), meta_key(prefix, aggregation.as_bytes()));
        }
        let batch = batch.batch;
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.rocks(e))?;
        self.db.drop_cf(&cf).map_err(|e| self.rocks(e))?;
        self.column_families.retain(|name| *name != cf);
        Ok(true)
    }
}
