//! The change feed: once a flush is durable, the changed states of the
//! keys someone watches go to their subscribers (the HTTP API's
//! server-sent events).
//!
//! Subscribers register what they watch — one key, or every key under a
//! prefix — of one aggregation. The writer thread, after each write, looks
//! each changed key up in that registry (nothing at all when nobody
//! watches) and hands each matching subscriber the flush's [`Change`]s of
//! its keys, as one unit, into its bounded buffer (`buffer` flushes)
//! without ever waiting: a subscriber whose buffer is full is
//! marked lagged and dropped from the registry, so a slow reader costs at
//! most its buffer and never slows ingestion. It then reads what was
//! buffered, learns it lagged, and ends (a client reconnects and reads the
//! current state).
//!
//! Ordering: a subscriber registers before it reads the current state, so
//! a flush written after that read reaches it as a change, and one written
//! before is in what it read (it may also arrive as a change: an event
//! can repeat the state the subscriber started from, never skip one).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use tokio::sync::mpsc;

use super::flush::{FlushIds, FlushJob, FlushPublisher, PartitionCommit, PublishError};
use super::store::{Slot, StateStore, split_window_key};

/// One changed state of a watched key, as written by one flush.
#[derive(Debug)]
pub struct Change {
    /// The flush that wrote it: `topic/partition@next-offset`, as the
    /// `wagg.flush` header of emitted changes.
    pub flush: Arc<str>,
    /// The partition's store slot.
    pub slot: Slot,
    /// The aggregation key.
    pub key: Vec<u8>,
    /// Windowed aggregations: the window's store key within the slot.
    pub window_key: Option<Vec<u8>>,
    /// The new state (`None`: deleted).
    pub state: Option<Vec<u8>>,
    /// When the write completed (delivery latency is measured from here).
    pub written_at: Instant,
    /// The state as the plugin renders it, once a subscriber has: the
    /// other subscribers of the key reuse it.
    pub rendered: OnceLock<serde_json::Value>,
}

/// What a subscription watches in one aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    Key(Vec<u8>),
    /// Every key starting with these bytes (empty: every key).
    Prefix(Vec<u8>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error(
        "{0} watches are open, the most `http.max_watchers` allows; close one or raise the limit"
    )]
    TooMany(usize),
    #[error("shutting down: no new watches")]
    Closed,
}

/// The registry of subscriptions, shared by the writer thread (which
/// publishes) and the HTTP handlers (which subscribe).
pub struct ChangeFeed {
    registry: Mutex<Registry>,
    /// Open subscriptions (read without the lock: the writer's fast path
    /// when nobody watches).
    open: AtomicUsize,
    max_watchers: usize,
    /// Flushes (of changes) each subscriber may have waiting.
    buffer: usize,
}

#[derive(Default)]
struct Registry {
    closed: bool,
    next_id: u64,
    aggregations: HashMap<String, Watched>,
}

/// One aggregation's subscribers.
#[derive(Default)]
struct Watched {
    keys: HashMap<Vec<u8>, Vec<Subscriber>>,
    prefixes: HashMap<Vec<u8>, Vec<Subscriber>>,
    /// The distinct lengths of `prefixes`' keys: a changed key is looked
    /// up once per length, not compared with every prefix.
    prefix_lengths: BTreeSet<usize>,
}

impl Watched {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }
}

struct Subscriber {
    id: u64,
    changes: mpsc::Sender<Vec<Arc<Change>>>,
    lagged: Arc<AtomicBool>,
}

/// An open subscription; dropping it unsubscribes.
pub struct Subscription {
    /// Each written flush's changes of the watched keys, in flush order;
    /// ends when the subscriber lagged (see [`Subscription::lagged`]) or
    /// the feed closed.
    pub changes: mpsc::Receiver<Vec<Arc<Change>>>,
    lagged: Arc<AtomicBool>,
    id: u64,
    aggregation: String,
    interest: Interest,
    feed: Arc<ChangeFeed>,
}

impl Subscription {
    /// Whether the subscription was dropped for falling behind (its buffer
    /// was full when a change came).
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.feed
            .unsubscribe(&self.aggregation, &self.interest, self.id);
        self.feed.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ChangeFeed {
    /// At most `max_watchers` subscriptions, each with up to `buffer`
    /// flushes' changes waiting.
    pub fn new(max_watchers: usize, buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(Registry::default()),
            open: AtomicUsize::new(0),
            max_watchers,
            buffer: buffer.max(1),
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open subscriptions.
    pub fn watchers(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Watches `interest` in `aggregation` from the next written flush on.
    pub fn subscribe(
        self: &Arc<Self>,
        aggregation: &str,
        interest: Interest,
    ) -> Result<Subscription, WatchError> {
        let mut registry = self.registry();
        if registry.closed {
            return Err(WatchError::Closed);
        }
        let open = self.open.load(Ordering::Relaxed);
        if open >= self.max_watchers {
            return Err(WatchError::TooMany(open));
        }
        registry.next_id += 1;
        let id = registry.next_id;
        let (sender, changes) = mpsc::channel(self.buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            id,
            changes: sender,
            lagged: lagged.clone(),
        };
        let watched = registry
            .aggregations
            .entry(aggregation.to_owned())
            .or_default();
        match &interest {
            Interest::Key(key) => watched.keys.entry(key.clone()).or_default(),
            Interest::Prefix(prefix) => {
                watched.prefix_lengths.insert(prefix.len());
                watched.prefixes.entry(prefix.clone()).or_default()
            }
        }
        .push(subscriber);
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            changes,
            lagged,
            id,
            aggregation: aggregation.to_owned(),
            interest,
            feed: self.clone(),
        })
    }

    fn unsubscribe(&self, aggregation: &str, interest: &Interest, id: u64) {
        let mut registry = self.registry();
        let Some(watched) = registry.aggregations.get_mut(aggregation) else {
            return;
        };
        remove_subscriber(watched, interest, id);
        if watched.is_empty() {
            registry.aggregations.remove(aggregation);
        }
    }

    /// Ends every subscription (their streams end once drained) and
    /// refuses new ones: on shutdown.
    pub fn close(&self) {
        let mut registry = self.registry();
        registry.closed = true;
        registry.aggregations.clear();
    }

    /// Hands the changes of a written flush to their subscribers.
    pub fn publish(&self, store: &StateStore, job: &FlushJob) {
        if self.watchers() == 0 {
            return;
        }
        let written_at = Instant::now();
        let ids = FlushIds::new(store, &job.offsets, &job.catch_up);
        let mut registry = self.registry();
        for aggregation in &job.aggregations {
            let Some(watched) = registry.aggregations.get_mut(&aggregation.name) else {
                continue;
            };
            let mut flush_ids: HashMap<Slot, Arc<str>> = HashMap::new();
            // Each subscriber's changes of this flush, sent as one unit.
            let mut batches: HashMap<u64, (&Subscriber, Vec<Arc<Change>>)> = HashMap::new();
            for (store_key, state) in &aggregation.states {
                let Some((slot, in_slot)) = Slot::decode(store_key) else {
                    continue;
                };
                // Borrowed until a subscriber wants it: most changed keys
                // have none.
                let key: Cow<'_, [u8]> = if aggregation.windowed {
                    match split_window_key(in_slot) {
                        Some(split) => Cow::Owned(split.key),
                        None => continue,
                    }
                } else {
                    Cow::Borrowed(in_slot)
                };
                let subscribers = matching(watched, &key);
                if subscribers.is_empty() {
                    continue;
                }
                let window_key = aggregation.windowed.then(|| in_slot.to_vec());
                let flush = flush_ids
                    .entry(slot)
                    .or_insert_with(|| ids.of(&aggregation.name, slot).into())
                    .clone();
                let change = Arc::new(Change {
                    flush,
                    slot,
                    key: key.into_owned(),
                    window_key,
                    state: state.clone(),
                    written_at,
                    rendered: OnceLock::new(),
                });
                for subscriber in subscribers {
                    batches
                        .entry(subscriber.id)
                        .or_insert_with(|| (subscriber, Vec::new()))
                        .1
                        .push(change.clone());
                }
            }
            let mut dropped = Vec::new();
            for (subscriber, changes) in batches.into_values() {
                if subscriber.changes.try_send(changes).is_err() {
                    // Full (or gone): never wait for a reader.
                    subscriber.lagged.store(true, Ordering::Relaxed);
                    dropped.push(subscriber.id);
                }
            }
            for id in dropped {
                remove_subscriber_anywhere(watched, id);
            }
            if watched.is_empty() {
                registry.aggregations.remove(&aggregation.name);
            }
        }
    }
}

/// The subscribers of `key`: its own and those of every prefix of it.
fn matching<'w>(watched: &'w Watched, key: &[u8]) -> Vec<&'w Subscriber> {
    let mut found: Vec<&Subscriber> = watched.keys.get(key).into_iter().flatten().collect();
    for &length in watched.prefix_lengths.range(..=key.len()) {
        if let Some(subscribers) = watched.prefixes.get(&key[..length]) {
            found.extend(subscribers);
        }
    }
    found
}

fn remove_subscriber(watched: &mut Watched, interest: &Interest, id: u64) {
    let (map, key) = match interest {
        Interest::Key(key) => (&mut watched.keys, key),
        Interest::Prefix(prefix) => (&mut watched.prefixes, prefix),
    };
    if let Some(subscribers) = map.get_mut(key) {
        subscribers.retain(|s| s.id != id);
        if subscribers.is_empty() {
            map.remove(key);
        }
    }
    watched.prefix_lengths = watched.prefixes.keys().map(Vec::len).collect();
}

/// Removes a subscriber whose interest the caller does not know (one that
/// lagged).
fn remove_subscriber_anywhere(watched: &mut Watched, id: u64) {
    for map in [&mut watched.keys, &mut watched.prefixes] {
        map.retain(|_, subscribers| {
            subscribers.retain(|s| s.id != id);
            !subscribers.is_empty()
        });
    }
    watched.prefix_lengths = watched.prefixes.keys().map(Vec::len).collect();
}

impl FlushPublisher for ChangeFeed {
    fn publish_flush(
        &self,
        _: &StateStore,
        _: &FlushJob,
    ) -> Result<Vec<PartitionCommit>, PublishError> {
        Ok(Vec::new())
    }

    fn written(&self, store: &StateStore, job: &FlushJob) {
        self.publish(store, job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::flush::FlushedAggregation;
    use crate::state::store::StoreOptions;

    fn job(store: &StateStore, states: &[(&[u8], Option<&[u8]>)], next: i64) -> FlushJob {
        let slot = Slot {
            topic_id: store.topic_id("events").expect("a topic id"),
            partition: 1,
        };
        FlushJob {
            aggregations: vec![FlushedAggregation {
                name: "count".into(),
                states: states
                    .iter()
                    .map(|(key, state)| (slot.store_key(key), state.map(<[u8]>::to_vec)))
                    .collect(),
                counters: Default::default(),
                stream_times: Vec::new(),
                windowed: false,
            }],
            offsets: [((Arc::from("events"), 1), next)].into(),
            catch_up: Default::default(),
            emits: Vec::new(),
        }
    }

    /// A change as the test compares it: key, state, flush.
    type Seen = (String, Option<Vec<u8>>, String);

    fn received(subscription: &mut Subscription) -> Vec<Vec<Seen>> {
        let mut flushes = Vec::new();
        while let Ok(changes) = subscription.changes.try_recv() {
            flushes.push(
                changes
                    .iter()
                    .map(|c| {
                        let key = String::from_utf8_lossy(&c.key).into_owned();
                        (key, c.state.clone(), c.flush.to_string())
                    })
                    .collect(),
            );
        }
        flushes
    }

    #[test]
    fn subscribers_get_their_keys_changes_per_flush_and_a_full_buffer_cuts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            StateStore::open(dir.path(), &["count"], &StoreOptions::default()).expect("a store");
        let feed = ChangeFeed::new(3, 2);
        let mut key = feed
            .subscribe("count", Interest::Key(b"ab".to_vec()))
            .expect("a key watch");
        let mut prefix = feed
            .subscribe("count", Interest::Prefix(b"a".to_vec()))
            .expect("a prefix watch");
        let mut everything = feed
            .subscribe("count", Interest::Prefix(Vec::new()))
            .expect("an everything watch");
        assert_eq!(
            feed.subscribe("count", Interest::Key(b"x".to_vec())).err(),
            Some(WatchError::TooMany(3))
        );

        feed.publish(
            &store,
            &job(&store, &[(b"ab", Some(b"1")), (b"b", Some(b"2"))], 10),
        );
        feed.publish(
            &store,
            &job(&store, &[(b"abc", None), (b"ab", Some(b"3"))], 12),
        );
        let change = |key: &str, state: Option<&[u8]>, next: i64| {
            (
                key.to_owned(),
                state.map(<[u8]>::to_vec),
                format!("events/1@{next}"),
            )
        };
        assert_eq!(
            received(&mut key),
            [
                vec![change("ab", Some(b"1"), 10)],
                vec![change("ab", Some(b"3"), 12)]
            ]
        );
        assert_eq!(
            received(&mut prefix),
            [
                vec![change("ab", Some(b"1"), 10)],
                vec![change("abc", None, 12), change("ab", Some(b"3"), 12)]
            ]
        );
        assert!(!everything.lagged());

        // `everything` has read nothing: two flushes fill its buffer, the
        // third cuts it; the others (drained above) go on.
        feed.publish(&store, &job(&store, &[(b"ab", Some(b"4"))], 13));
        assert!(everything.lagged());
        assert_eq!(received(&mut everything).len(), 2);
        assert!(
            everything.changes.try_recv().is_err(),
            "cut: no more changes"
        );
        assert_eq!(received(&mut key), [vec![change("ab", Some(b"4"), 13)]]);

        drop(everything);
        assert_eq!(feed.watchers(), 2);
        feed.close();
        assert_eq!(
            feed.subscribe("count", Interest::Key(b"x".to_vec())).err(),
            Some(WatchError::Closed)
        );
        assert!(key.changes.try_recv().is_err());
        assert!(!key.lagged(), "closed, not lagged");
    }
}
