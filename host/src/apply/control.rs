//! Changes to the running aggregations that an operator asks for while
//! wagg consumes (a reload, a reset): sent to the consumer thread, which
//! makes them between two batches, after writing what it applied — so
//! every record before the change went through the old aggregations and
//! every record after it through the new ones, none lost or applied twice.

use std::collections::BTreeMap;
use std::sync::mpsc;

use super::{Aggregation, Pipeline, PipelineError};
use crate::config::{AggregationConfig, StartFrom};
use crate::state::store::{AggregationMeta, Registration, StoreError};

/// One request to the consumer thread, answered on `done` once made (or
/// refused: the running aggregations then stay as they were).
pub struct Control {
    pub change: ControlChange,
    pub done: mpsc::SyncSender<Result<(), String>>,
}

pub enum ControlChange {
    /// A reload's changes, made together.
    Reconfigure(Vec<Reconfigure>),
    /// Clears an aggregation's state; it catches up from `start`.
    Reset { aggregation: String, start: StartAt },
}

pub enum Reconfigure {
    /// An aggregation new to the running config: registered in the store
    /// (it catches up from `start`).
    Add {
        aggregation: Box<Aggregation>,
        meta: AggregationMeta,
        start: StartAt,
    },
    /// The same aggregation with another plugin build or other settings:
    /// its states, counters and catch-up progress carry over. With
    /// `migrate`, the new build has another state format and migrates from
    /// the stored one: the states are migrated first (see `migrate`).
    Replace {
        aggregation: Box<Aggregation>,
        meta: AggregationMeta,
        migrate: bool,
    },
    /// No longer applied; its stored state is kept, marked removed.
    Remove(String),
}

/// Where an aggregation starts on the partitions consumed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The first record of each partition.
    Beginning,
    /// Where the other aggregations are: nothing to catch up.
    Here,
    /// These offsets (from the broker's offsets-for-times), where they are
    /// below the partition's stored offset; elsewhere, with the others.
    Offsets(BTreeMap<(String, i32), i64>),
}

impl From<StartFrom> for StartAt {
    fn from(start_from: StartFrom) -> Self {
        match start_from {
            StartFrom::Earliest => StartAt::Beginning,
            StartFrom::Latest => StartAt::Here,
        }
    }
}

impl StartAt {
    /// The catch-up entries of an aggregation starting here, given the
    /// partitions consumed so far (`consumed`: partition → stored next
    /// offset, only the partitions it applies to).
    pub fn entries(&self, consumed: &BTreeMap<(String, i32), i64>) -> BTreeMap<(String, i32), i64> {
        match self {
            StartAt::Beginning => consumed.keys().map(|p| (p.clone(), 0)).collect(),
            StartAt::Here => BTreeMap::new(),
            StartAt::Offsets(offsets) => consumed
                .iter()
                .filter_map(|(partition, &stored)| {
                    let &offset = offsets.get(partition)?;
                    (offset < stored).then(|| (partition.clone(), offset))
                })
                .collect(),
        }
    }
}

impl Pipeline {
    /// Makes the changes asked for since the last batch, each after
    /// writing what was applied, and answers each request. A change the
    /// store refuses is answered with the error and stops nothing; a
    /// failed write stops the pipeline, as it would have anyway.
    pub(super) fn take_controls(&mut self) -> Result<(), PipelineError> {
        let Some(controls) = &self.controls else {
            return Ok(());
        };
        let requests: Vec<Control> = controls.try_iter().collect();
        for Control { change, done } in requests {
            self.flush()?;
            let outcome = self.control(change);
            let answer = outcome.as_ref().map(|_| ()).map_err(|e| e.to_string());
            let _ = done.send(answer);
            if let Err(e @ (PipelineError::Write(_) | PipelineError::SourceGone)) = outcome {
                return Err(e);
            }
        }
        Ok(())
    }

    fn control(&mut self, change: ControlChange) -> Result<(), PipelineError> {
        match change {
            ControlChange::Reconfigure(changes) => {
                for change in changes {
                    self.reconfigure(change)?;
                }
                let running = self.applier.names();
                let running: Vec<&str> = running.iter().map(String::as_str).collect();
                self.applier.store.mark_removed(&running)?;
                Ok(())
            }
            ControlChange::Reset { aggregation, start } => {
                let config = self
                    .applier
                    .aggregation_mut(&aggregation)
                    .map(|a| a.config.clone())
                    .ok_or_else(|| StoreError::UnknownAggregation(aggregation.clone()))?;
                let entries = start.entries(&self.consumed(&config)?);
                self.applier
                    .store
                    .reset_aggregation(&aggregation, &entries)?;
                self.applier.reset(&aggregation);
                tracing::info!(%aggregation, partitions = entries.len(), "reset: state cleared, catching up");
                self.catch_up_here(&aggregation)
            }
        }
    }

    fn reconfigure(&mut self, change: Reconfigure) -> Result<(), PipelineError> {
        let store = self.applier.store.clone();
        match change {
            Reconfigure::Add {
                aggregation,
                meta,
                start,
            } => {
                let name = aggregation.config.name.clone();
                store.add_aggregation(&name)?;
                if store.check_aggregation_meta(&name, &meta)? == Registration::New {
                    let entries = start.entries(&self.consumed(&aggregation.config)?);
                    store.register_aggregation(&name, &meta, &entries)?;
                }
                self.applier.add(*aggregation)?;
                tracing::info!(aggregation = %name, "reload: aggregation added");
                self.catch_up_here(&name)
            }
            Reconfigure::Replace {
                aggregation,
                meta,
                migrate,
            } => {
                let name = aggregation.config.name.clone();
                if migrate {
                    return self.migrate_on_reload(*aggregation, &meta);
                }
                store.check_aggregation_meta(&name, &meta)?;
                self.applier.replace(*aggregation);
                tracing::info!(aggregation = %name, plugin = %meta.plugin_version, "reload: aggregation updated");
                Ok(())
            }
            Reconfigure::Remove(name) => {
                self.applier.remove(&name);
                tracing::warn!(aggregation = %name, "reload: aggregation removed; its stored state is kept until `wagg state drop`");
                Ok(())
            }
        }
    }

    /// Replaces an aggregation by a plugin build of another state format
    /// that migrates from the stored one: records the migration (from
    /// where the aggregation stands now: everything it applied is written)
    /// and has the new build migrate the states before it applies records.
    fn migrate_on_reload(
        &mut self,
        aggregation: Aggregation,
        meta: &AggregationMeta,
    ) -> Result<(), PipelineError> {
        let store = self.applier.store.clone();
        let config = aggregation.config.clone();
        let name = config.name.clone();
        let stored = store
            .aggregation_meta(&name)?
            .ok_or_else(|| StoreError::UnknownAggregation(name.clone()))?;
        let migration =
            store.begin_migration(&name, &stored, meta, |topic| config.applies_to(topic))?;
        self.applier.replace(aggregation);
        let mut migrating = meta.clone();
        migrating.migration = Some(migration);
        self.applier.pause_to_migrate(&name, migrating);
        tracing::info!(aggregation = %name, from_format = stored.state_format, to_format = meta.state_format, "reload: migrating the stored state to the new plugin's state format");
        Ok(())
    }

    /// The partitions consumed so far (stored next offsets) that an
    /// aggregation applies to.
    pub(super) fn consumed(
        &self,
        config: &AggregationConfig,
    ) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        self.applier
            .store
            .consumed(|topic| config.applies_to(topic))
    }

    /// Has an aggregation catch up on the owned partitions where the store
    /// says it is behind.
    pub(super) fn catch_up_here(&mut self, aggregation: &str) -> Result<(), PipelineError> {
        for (topic, partition, live) in self.owned.entries() {
            let Some(live) = live else {
                continue; // nothing consumed: nothing to catch up on
            };
            let catch_ups = self.applier.store.catch_ups(&topic, partition)?;
            let Some(&from) = catch_ups.get(aggregation) else {
                continue;
            };
            let own = BTreeMap::from([(aggregation.to_owned(), from)]);
            self.applier.start_catch_up(&topic, partition, &own);
            self.source.start_catch_up(&topic, partition, from, live);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_catches_up_only_where_it_is_behind_the_stored_offset() {
        let consumed: BTreeMap<(String, i32), i64> =
            [(("t".to_owned(), 0), 10), (("t".to_owned(), 1), 5)].into();
        assert_eq!(
            StartAt::Beginning.entries(&consumed),
            [(("t".to_owned(), 0), 0), (("t".to_owned(), 1), 0)].into()
        );
        assert!(StartAt::Here.entries(&consumed).is_empty());
        // Partition 1: the time is past what was consumed (it starts with
        // the others); partition 2 was never consumed.
        let at_time = StartAt::Offsets(
            [
                (("t".to_owned(), 0), 7),
                (("t".to_owned(), 1), 5),
                (("t".to_owned(), 2), 0),
            ]
            .into(),
        );
        assert_eq!(
            at_time.entries(&consumed),
            [(("t".to_owned(), 0), 7)].into()
        );
    }
}
