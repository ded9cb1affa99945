//! One configured aggregation as the consumer thread runs it: its plugin
//! instance, its state cache, its counters and its metrics.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::config::AggregationConfig;
use crate::ops::metrics::{AggregationLabel, CacheLabel, Metrics};
use crate::ops::status::{AggregationCounters, Status};
use crate::plugin::{CallError, LoadedPlugin, PluginInstance};
use crate::record::SourceRecord;
use crate::state::cache::StateCache;
use crate::state::store::{AggregationMeta, StateStore, StoreError};

use super::window::Windowing;

/// One configured aggregation as the consumer loop runs it.
pub struct Aggregation {
    pub config: AggregationConfig,
    pub plugin: LoadedPlugin,
    /// The plugin instance of the first apply worker, which also merges,
    /// migrates and renders.
    pub(super) instance: PluginInstance,
    /// Aggregations applied by several workers: the plugin instances of
    /// workers 1.. (see [`Aggregation::split_across`]).
    pub(super) siblings: Vec<PluginInstance>,
    /// Encoded store key → newest state: the applied but unwritten ones and
    /// a bounded number of written ones. One shard per apply worker.
    pub(super) states: StateCache,
    /// Including what is applied but not yet written (the written ones are
    /// what the last flush reported to `Status`).
    pub(super) applied: AggregationCounters,
    pub(super) instruments: Instruments,
    /// Partitions this aggregation is catching up on, with its own next
    /// offset there: the live records of these partitions are not its
    /// (see `state::store::catch_up`).
    pub(super) catch_up: HashMap<(Arc<str>, i32), i64>,
    /// The stored states are being migrated to this plugin's state format
    /// (the aggregation's meta record, with the migration's progress):
    /// no record is applied meanwhile (see `state::store::migration`).
    pub(super) migrating: Option<AggregationMeta>,
    /// Windowed aggregations: the window spec and stream times.
    pub(super) windowing: Option<Windowing>,
    /// Aggregations that emit: the last states of windows deleted past
    /// retention before a flush handed them on (store key, state), emitted
    /// with the next flush.
    pub(super) emit_expired: Vec<(Vec<u8>, Vec<u8>)>,
}

/// An aggregation's metrics, looked up once (not per batch).
#[derive(Debug, Clone)]
pub(super) struct Instruments {
    pub(super) plugin_call_seconds: Histogram,
    pub(super) hits: Counter,
    pub(super) misses: Counter,
}

impl Default for Instruments {
    /// Detached: counts into instruments no registry reads.
    fn default() -> Self {
        Self {
            plugin_call_seconds: Histogram::new(std::iter::empty()),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }
}

impl Instruments {
    pub(super) fn new(metrics: &Metrics, aggregation: &str) -> Self {
        let lookups = |result| {
            metrics
                .state_lookups
                .get_or_create(&CacheLabel {
                    aggregation: aggregation.to_owned(),
                    result,
                })
                .clone()
        };
        Self {
            plugin_call_seconds: metrics
                .plugin_call_seconds
                .get_or_create(&AggregationLabel {
                    aggregation: aggregation.to_owned(),
                })
                .clone(),
            hits: lookups("hit"),
            misses: lookups("miss"),
        }
    }
}

impl Aggregation {
    pub fn new(
        config: AggregationConfig,
        plugin: LoadedPlugin,
        instance: PluginInstance,
        cache_entries: usize,
        counters: AggregationCounters,
    ) -> Self {
        Self {
            plugin,
            instance,
            siblings: Vec::new(),
            states: match &config.window {
                // Placing a record in a session looks up the key's
                // unwritten sessions by prefix.
                Some(window) if window.is_session() => StateCache::new(cache_entries).ordered(),
                _ => StateCache::new(cache_entries),
            },
            applied: counters,
            // Attached to the registry by `BatchApplier::new`.
            instruments: Instruments::default(),
            catch_up: HashMap::new(),
            migrating: None,
            emit_expired: Vec::new(),
            windowing: config
                .window
                .clone()
                .map(|spec| Windowing::new(spec, config.time.clone(), cache_entries)),
            config,
        }
    }

    /// Has `workers` workers apply the aggregation in parallel, worker `i`
    /// the partitions `p` with `p % workers == i`, each with its own plugin
    /// instance and cache shard. Only aggregations keyed by the Kafka key
    /// and without windows are split: a re-keyed state gathers records of
    /// every partition, and windows share stream times and sweeps; those
    /// stay on one worker. Call before applying anything.
    pub fn split_across(mut self, workers: usize) -> Result<Self, CallError> {
        if workers <= 1 || !self.splittable() {
            return Ok(self);
        }
        self.siblings = (1..workers)
            .map(|_| self.instance.sibling())
            .collect::<Result<_, _>>()?;
        self.states = self.states.resharded(workers);
        Ok(self)
    }

    fn splittable(&self) -> bool {
        self.config.key.is_none() && self.config.window.is_none()
    }

    /// What keying a record reads of the aggregation.
    pub(super) fn keying(&self) -> Keying<'_> {
        Keying {
            config: &self.config,
            catch_up: &self.catch_up,
            migrating: self.migrating.is_some(),
            windowing: self.windowing.as_ref(),
        }
    }

    /// Tells `status` the stream times loaded from the store.
    pub(super) fn report_stream_times(&self, status: &Status) {
        if let Some(windowing) = &self.windowing {
            for ((topic, partition), time) in windowing.stream_times() {
                status.set_stream_time(&self.config.name, topic, *partition, *time);
            }
        }
    }

    /// Loads a windowed aggregation's stream times from the store.
    pub fn restore_stream_times(&mut self, store: &StateStore) -> Result<(), StoreError> {
        if let Some(windowing) = &mut self.windowing {
            let stored = store.stream_times(&self.config.name)?;
            windowing.restore(
                stored
                    .into_iter()
                    .map(|((topic, partition), time)| ((Arc::from(topic), partition), time)),
            );
        }
        Ok(())
    }

    /// Has the aggregation migrate its stored states (recorded in `meta`
    /// by `StateStore::begin_migration`) before it applies records again.
    pub fn migrate_first(&mut self, meta: AggregationMeta) {
        self.migrating = meta.migration.is_some().then_some(meta);
    }

    /// Takes over what `old` (the same aggregation, with another plugin
    /// build or settings) has applied: its states (same state format), its
    /// counters, its metrics and where it is catching up.
    pub(super) fn take_over(&mut self, old: &mut Aggregation) {
        // Split the same way (the same key and windows), else the new one
        // starts with an empty cache: nothing is unwritten.
        if self.states.shard_count() == old.states.shard_count() {
            std::mem::swap(&mut self.states, &mut old.states);
        }
        self.applied = old.applied;
        self.instruments = old.instruments.clone();
        self.catch_up = std::mem::take(&mut old.catch_up);
        // A migration in progress goes on with the new build.
        if self.migrating.is_none() {
            self.migrating = old.migrating.take();
        }
        // The same windows (a reload refuses to change them).
        if self.windowing.is_some() {
            self.windowing = old.windowing.take();
        }
    }
}

/// What keying a record reads of an aggregation: shared by the workers
/// applying it in parallel while each changes its own cache shard.
pub(super) struct Keying<'a> {
    pub(super) config: &'a AggregationConfig,
    pub(super) catch_up: &'a HashMap<(Arc<str>, i32), i64>,
    pub(super) migrating: bool,
    pub(super) windowing: Option<&'a Windowing>,
}

impl Keying<'_> {
    /// Whether a record of `feed` is this aggregation's to apply: a live
    /// record where it is current, a re-read one where it is catching up
    /// and has not applied it yet.
    pub(super) fn takes(&self, feed: Feed, record: &SourceRecord) -> bool {
        if self.migrating || !self.config.applies_to(&record.topic) {
            return false;
        }
        if self.catch_up.is_empty() {
            return feed == Feed::Live;
        }
        match (
            feed,
            self.catch_up.get(&(record.topic.clone(), record.partition)),
        ) {
            (Feed::Live, None) => true,
            (Feed::CatchUp, Some(&next)) => record.offset >= next,
            _ => false,
        }
    }
}

/// Where a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The source's live records: applied to every aggregation current on
    /// their partition.
    Live,
    /// Records read again for aggregations catching up: applied only to
    /// them, each from its own next offset.
    CatchUp,
}
