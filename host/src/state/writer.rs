//! Writing flushed state on its own thread, so the consumer keeps applying
//! batches (on one core) while RocksDB inserts the previous commit
//! interval's states (on the other).
//!
//! At most one write is in flight: the consumer hands over a [`FlushJob`]
//! and does not submit the next before this one has completed, so writes
//! reach RocksDB in order and each is one atomic write batch of states,
//! counters and offsets — the exactly-once argument of `apply` is
//! unchanged. While a job is in flight the consumer keeps reading its
//! states from its [`StateCache`](super::cache::StateCache), which
//! does not evict them until the write has completed.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use prometheus_client::metrics::histogram::Histogram;

use super::flush::{FlushJob, FlushPublisher, PublishError};
use super::store::{StateStore, StoreError};

/// The writer's metrics, handed to it (the state layer keeps no registry).
#[derive(Debug, Clone)]
pub struct WriteInstruments {
    /// Seconds per write.
    pub write_seconds: Histogram,
    /// States per write.
    pub write_states: Histogram,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing the flush: {0}")]
    Publish(PublishError),
    #[error("the state writer thread stopped unexpectedly")]
    WriterGone,
}

/// The writer thread and its two channels.
pub struct StateWriter {
    jobs: Option<mpsc::SyncSender<FlushJob>>,
    results: mpsc::Receiver<Result<(), WriteError>>,
    thread: Option<JoinHandle<()>>,
}

impl StateWriter {
    /// With a `publisher` (the cluster), each job is published (and
    /// acknowledged) before it is written locally.
    pub fn spawn(
        store: Arc<StateStore>,
        metrics: WriteInstruments,
        publisher: Option<Arc<dyn FlushPublisher>>,
    ) -> std::io::Result<Self> {
        let (jobs, incoming) = mpsc::sync_channel::<FlushJob>(1);
        let (outcomes, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wagg-writer".into())
            .spawn(move || {
                for job in incoming {
                    crate::fault_injection::fault_point("wagg-writer");
                    let started = std::time::Instant::now();
                    let states: usize = job.aggregations.iter().map(|a| a.states.len()).sum();
                    let mut job = job;
                    let result = write(&store, publisher.as_deref(), &mut job);
                    if result.is_ok()
                        && let Some(publisher) = &publisher
                    {
                        publisher.written(&store, &job);
                    }
                    metrics
                        .write_seconds
                        .observe(started.elapsed().as_secs_f64());
                    metrics.write_states.observe(states as f64);
                    if outcomes.send(result).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            results,
            thread: Some(thread),
        })
    }

    /// Hands a job to the writer thread. The caller must have received the
    /// result of the previous job first.
    pub fn submit(&self, job: FlushJob) -> Result<(), WriteError> {
        self.jobs
            .as_ref()
            .ok_or(WriteError::WriterGone)?
            .send(job)
            .map_err(|_| WriteError::WriterGone)
    }

    /// The result of the job in flight, if it has completed.
    pub fn try_result(&self) -> Option<Result<(), WriteError>> {
        match self.results.try_recv() {
            Ok(result) => Some(result),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(WriteError::WriterGone)),
        }
    }

    /// Waits for the result of the job in flight.
    pub fn wait(&self) -> Result<(), WriteError> {
        match self.results.recv() {
            Ok(result) => result,
            Err(mpsc::RecvError) => Err(WriteError::WriterGone),
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the job in flight.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write(
    store: &StateStore,
    publisher: Option<&dyn FlushPublisher>,
    job: &mut FlushJob,
) -> Result<(), WriteError> {
    // The changelog first: a crash after it and before the local write
    // leaves the local state one flush behind the changelog, which the next
    // owner (this instance included) notices and restores; the other order
    // would leave local state the changelog cannot reproduce.
    let commits = match publisher {
        Some(publisher) => {
            let commits = publisher
                .publish_flush(store, job)
                .map_err(WriteError::Publish)?;
            // Published (emitted changes, changelog) but not written.
            crate::fault_injection::crash_point("flush-published");
            commits
        }
        None => Vec::new(),
    };
    let mut batch = store.begin_write();
    for commit in &commits {
        batch.set_commit(commit.topic_id, commit.partition, commit.epoch, commit.seq);
    }
    for aggregation in &mut job.aggregations {
        // In key order: the memtable's skip list reuses its last insert
        // position for ascending keys instead of searching from the top
        // (random-order inserts were a third of the engine's time).
        aggregation.states.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (store_key, state) in &aggregation.states {
            match state {
                Some(state) => batch.put_raw(&aggregation.name, store_key, state)?,
                None => batch.delete_raw(&aggregation.name, store_key)?,
            }
        }
        batch.set_counters(&aggregation.name, &aggregation.counters);
        for ((topic, partition), time) in &aggregation.stream_times {
            batch.set_stream_time(
                store.topic_id(topic)?,
                *partition,
                &aggregation.name,
                Some(*time),
            );
        }
    }
    for ((topic, partition), next) in &job.offsets {
        // Known since the batch was applied: a lookup in the store's map.
        batch.set_offset(store.topic_id(topic)?, *partition, *next);
    }
    for ((topic, partition, aggregation), next) in &job.catch_up {
        batch.set_catch_up(store.topic_id(topic)?, *partition, aggregation, *next);
    }
    Ok(store.write(batch)?)
}
