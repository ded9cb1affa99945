//! The consumer loop: a batch from the source thread → groups per key →
//! one plugin call per aggregation → staged states → a flush to the writer.
//!
//! - this module: [`Pipeline`], the loop itself (batches, assignments,
//!   revocations, idle flushes, shutdown);
//! - `applier`: [`BatchApplier`], one batch applied to every aggregation;
//! - `flusher`: when applied effects go to the writer thread, and what
//!   moves forward once they are durable;
//! - `group`: group keys and grouping; `aggregation`: one aggregation's
//!   plugin instance, state cache and counters; `dead_letter`: the
//!   dead-letter sink; `partition_map`: per-partition lookups.
//!
//! The consumer thread owns the plugin instances and the state cache; it
//! takes batches from the source thread (see `ingest::kafka`). Each batch
//! is applied to every aggregation in memory; every
//! `batch.commit_interval_ms` (and when idle, on revocation, on shutdown)
//! all new states, the counters and the next offset of every partition they
//! cover are written in one RocksDB write batch — by the writer thread,
//! while this one goes on applying (it waits only to revoke, to stop, and
//! before handing over the next write). Records at offsets below a
//! partition's next offset are dropped on arrival, so a record is applied at
//! most once even when the consumer re-delivers it (after a rebalance or a
//! seek); and every record is applied at least once because offsets only
//! advance with the state that includes them.

mod aggregation;
mod applier;
pub mod control;
pub mod dead_letter;
pub mod emit;
mod flusher;
pub mod group;
mod migrate;
pub mod partition_map;
mod session;
mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

pub use aggregation::Aggregation;
pub use applier::BatchApplier;
pub use control::{Control, ControlChange, Reconfigure, StartAt};
pub use migrate::{PluginMigrator, migrate_before_consuming};
// What a pipeline is fed: public so that tests can script it.
pub use crate::ingest::{EventFeed, SourceEvent};
use crate::ops::status::Status;
use crate::plugin::CallError;
use crate::record::SourceRecord;
use crate::state::flush::FlushOffsets;
use crate::state::store::StoreError;
use crate::state::writer::WriteError;
use dead_letter::DeadLetterError;
use partition_map::PartitionMap;

/// Why the consumer loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "aggregation {aggregation:?} rejected the record at {position}: {message} (on_error = \"fail\": stopped without committing it)"
    )]
    RecordRejected {
        aggregation: String,
        position: String,
        message: String,
    },
    #[error("aggregation {aggregation:?}: {error}")]
    Plugin {
        aggregation: String,
        #[source]
        error: CallError,
    },
    #[error("writing state: {0}")]
    Store(#[from] StoreError),
    #[error("writing state: {0}")]
    Write(#[from] WriteError),
    #[error("{0}")]
    DeadLetter(#[from] DeadLetterError),
    #[error("{0}")]
    Migration(#[from] Box<migrate::MigrationError>),
    #[error("starting the apply workers: {0}")]
    Workers(String),
    #[error("the Kafka source thread stopped unexpectedly")]
    SourceGone,
    #[error("{0}")]
    Source(String),
}

pub struct Pipeline {
    source: Box<dyn EventFeed>,
    applier: BatchApplier,
    status: Arc<Status>,
    /// The partitions this member owns, with the next offset to apply
    /// where one is known (`None`: owned, nothing consumed yet). Records,
    /// re-read records and catch-up events of any other partition are
    /// dropped: they were fetched before a revocation and queued behind it,
    /// and applying them would give a partition that moved away effects
    /// without an owner to write them.
    owned: PartitionMap<Option<i64>>,
    /// Changes an operator asks for while consuming (see `control`).
    controls: Option<mpsc::Receiver<Control>>,
    /// When this process started migrating keys, and how many were
    /// migrated then (for the rate it logs at the end).
    migration_clock: Option<(std::time::Instant, u64)>,
}

/// How long the consumer waits for a batch before treating the source as
/// idle (and writing what it applied).
const IDLE_AFTER: Duration = Duration::from_millis(100);

impl Pipeline {
    pub fn new(source: Box<dyn EventFeed>, applier: BatchApplier, status: Arc<Status>) -> Self {
        Self {
            source,
            applier,
            status,
            owned: PartitionMap::default(),
            controls: None,
            migration_clock: None,
        }
    }

    /// Takes reloads and resets from `controls` between batches.
    pub fn with_controls(mut self, controls: mpsc::Receiver<Control>) -> Self {
        self.controls = Some(controls);
        self
    }

    /// Consumes until `shutdown` is set (then finishes and writes the batch
    /// in flight) or a fatal error.
    pub fn run(mut self, shutdown: &AtomicBool) -> Result<(), PipelineError> {
        self.status.set_consumer_running(true);
        let result = self.consume(shutdown);
        // Whatever stopped the loop, effects of whole batches are written
        // (a failing batch left none behind)...
        let flushed = self.flush();
        // ...before the source lets go of its partitions.
        self.source.close();
        let result = match (result, flushed) {
            (Err(e), Err(flush)) => {
                tracing::error!(error = %flush, "writing the applied batches failed too");
                Err(e)
            }
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        };
        match &result {
            Ok(()) => {
                self.status.set_consumer_running(false);
                tracing::info!("consumer stopped cleanly");
            }
            Err(e) => {
                tracing::error!(error = %e, "consumer stopped");
                self.status.set_fatal(e.to_string());
            }
        }
        result
    }

    fn consume(&mut self, shutdown: &AtomicBool) -> Result<(), PipelineError> {
        while !shutdown.load(Ordering::Relaxed) {
            let written = self.applier.poll_flush()?;
            self.commit(&written);
            self.take_controls()?;
            // A migration goes on between batches, without waiting for one.
            let migrating = self.migrate_step()?;
            let wait = if migrating {
                Duration::ZERO
            } else {
                IDLE_AFTER
            };
            match self.source.recv_timeout(wait) {
                Ok(SourceEvent::Records(mut batch)) => {
                    self.drop_redelivered(&mut batch);
                    if !batch.is_empty() {
                        self.process(&batch, shutdown)?;
                    }
                    self.flush_if_due()?;
                }
                Ok(SourceEvent::CatchUp(mut batch)) => {
                    self.drop_not_owned(&mut batch);
                    self.applier.apply_catch_up(&batch, shutdown)?;
                    self.flush_if_due()?;
                }
                Ok(SourceEvent::CaughtUp {
                    topic,
                    partition,
                    at,
                }) => {
                    if let Some(live) = self.owned.get(&topic, partition) {
                        self.applier.catch_up_reached(&topic, partition, at, live);
                    }
                }
                Ok(SourceEvent::Assigned(partitions)) => self.assigned(partitions)?,
                Ok(SourceEvent::Failed(reason)) => return Err(PipelineError::Source(reason)),
                Ok(SourceEvent::Revoked { partitions, done }) => {
                    // What was applied from these partitions is written
                    // before their next owner reads the stored offsets.
                    self.flush()?;
                    for (topic, partition) in &partitions {
                        self.owned.remove(topic, *partition);
                    }
                    self.applier.forget_partitions(&partitions);
                    drop(done);
                }
                // Nothing queued while migrating: back to the migration,
                // flushing only when due (this is not idleness).
                Err(RecvTimeoutError::Timeout) if migrating => {
                    self.flush_if_due()?;
                }
                // Idle (caught up, or no partitions): write what waits.
                Err(RecvTimeoutError::Timeout) => self.flush()?,
                Err(RecvTimeoutError::Disconnected) => return Err(PipelineError::SourceGone),
            }
        }
        Ok(())
    }

    /// Hands the applied effects to the writer if a flush is due (without
    /// waiting for the write).
    fn flush_if_due(&mut self) -> Result<(), PipelineError> {
        if self.applier.flush_due() {
            let written = self.applier.start_flush()?;
            self.commit(&written);
        }
        Ok(())
    }

    /// Writes the applied effects and waits for them to be durable.
    fn flush(&mut self) -> Result<(), PipelineError> {
        let written = self.applier.flush()?;
        self.commit(&written);
        Ok(())
    }

    /// Lets the group know how far this member got (monitoring only: start
    /// offsets come from the state store).
    fn commit(&self, written: &FlushOffsets) {
        if !written.is_empty() {
            let commits: Vec<(&str, i32, i64)> = written
                .iter()
                .map(|((topic, partition), next)| (&**topic, *partition, *next))
                .collect();
            self.source.commit(&commits);
        }
    }

    /// Drops records below their partition's next offset (applied
    /// already, delivered again after a rebalance or a seek) and records of
    /// partitions this member does not own.
    fn drop_redelivered(&mut self, batch: &mut Vec<SourceRecord>) {
        let before = batch.len();
        let owned = &mut self.owned;
        let mut not_owned = 0usize;
        batch.retain(|record| match owned.get(&record.topic, record.partition) {
            Some(Some(next)) => record.offset >= next,
            Some(None) => true,
            None => {
                not_owned += 1;
                false
            }
        });
        let redelivered = (before - batch.len() - not_owned) as u64;
        if redelivered > 0 {
            self.status
                .metrics()
                .records_redelivered
                .inc_by(redelivered);
        }
        if not_owned > 0 {
            tracing::debug!(
                records = not_owned,
                "dropped records of partitions no longer owned"
            );
        }
    }

    /// Drops re-read records of partitions this member does not own.
    fn drop_not_owned(&mut self, batch: &mut Vec<SourceRecord>) {
        let owned = &mut self.owned;
        batch.retain(|record| owned.get(&record.topic, record.partition).is_some());
    }

    /// Starts newly assigned partitions from their stored offsets, and
    /// their aggregations that are catching up from their own.
    fn assigned(&mut self, partitions: Vec<(String, i32)>) -> Result<(), PipelineError> {
        // A take-over may have restored them (cluster mode).
        self.applier.reload_stream_times(&partitions)?;
        let stored = self.applier.store.offsets()?;
        for (topic, partition) in partitions {
            let topic = Arc::<str>::from(topic.as_str());
            let catch_ups = self.applier.store.catch_ups(&topic, partition)?;
            let next = stored.get(&(topic.to_string(), partition)).copied();
            self.owned.insert(topic.clone(), partition, next);
            match next {
                Some(_) => {
                    self.applier.start_catch_up(&topic, partition, &catch_ups);
                }
                // Nothing consumed yet: every aggregation starts together.
                None if !catch_ups.is_empty() => {
                    self.applier.start_catch_up(&topic, partition, &catch_ups);
                    self.applier.catch_up_reached(&topic, partition, 0, None);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Applies one batch; its records are from now on dropped if delivered
    /// again.
    fn process(
        &mut self,
        batch: &[SourceRecord],
        shutdown: &AtomicBool,
    ) -> Result<(), PipelineError> {
        let partitions = self.applier.apply(batch, shutdown)?;
        for ((topic, partition), next) in partitions {
            self.owned.insert(topic, partition, Some(next));
        }
        Ok(())
    }
}
