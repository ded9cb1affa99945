//! The states of one aggregation kept in memory in front of RocksDB: one
//! map holds both the written states (a bounded cache) and the applied but
//! not yet durable ones, so finding a key's newest state is one probe.
//!
//! Each entry is in one of three conditions:
//! - *clean*: equal to what RocksDB holds; may be evicted;
//! - *dirty*: applied since the last hand-over to the writer;
//! - *in flight*: handed to the writer, not yet known to be durable.
//!
//! Dirty and in-flight entries are never evicted — RocksDB does not have
//! them yet — so a key missing from the map has its newest state in
//! RocksDB. Eviction is CLOCK-like: a sweep drops the clean entries not
//! used since the previous sweep (a full LRU list cost a pointer chase per
//! lookup and showed up in profiles), and only if that is not enough, any
//! clean ones.
//!
//! With several apply workers (`apply.threads`), the cache is split into
//! shards by the partition in each store key, one per worker: a worker
//! changes only its own shard, so workers never share a map or a lock.

use std::collections::{BTreeSet, HashMap};

use foldhash::fast::RandomState;

use crate::state::store::{InlineKey, Slot};

/// A store key as the map holds it: inline up to 48 bytes, so an entry
/// costs no allocation of its own and comparing a probed entry's key reads
/// the bucket rather than another allocation.
type CachedKey = InlineKey;

/// A state as the store holds it (`None`: the key has none / was deleted).
pub type State = Option<Vec<u8>>;

const DIRTY: u8 = 1;
const IN_FLIGHT: u8 = 2;
const USED: u8 = 4;

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    flags: u8,
}

/// One shard of a [`StateCache`]: the states of the partitions one apply
/// worker owns (the whole cache when there is one worker).
#[derive(Debug)]
pub struct CacheShard {
    entries: HashMap<CachedKey, Entry, RandomState>,
    /// Clean entries to keep; the map may exceed it by the dirty and
    /// in-flight ones, and by up to a quarter between sweeps.
    capacity: usize,
    dirty: usize,
    in_flight: usize,
    /// With [`CacheShard::ordered`]: the dirty and in-flight keys, in
    /// order, so that those under a prefix are found without a scan.
    unwritten: Option<BTreeSet<Vec<u8>>>,
}

impl CacheShard {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::default(),
            capacity: capacity.max(1),
            dirty: 0,
            in_flight: 0,
            unwritten: None,
        }
    }

    /// Keeps the unwritten keys in order too: [`CacheShard::unwritten_keys`]
    /// then costs a range lookup instead of a scan of the map, for one
    /// more ordered insert per changed key.
    pub fn ordered(mut self) -> Self {
        let unwritten = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.flags & (DIRTY | IN_FLIGHT) != 0)
            .map(|(key, _)| key.to_vec())
            .collect();
        self.unwritten = Some(unwritten);
        self
    }

    /// Forgets every entry (the states were deleted from RocksDB). Call
    /// with none dirty or in flight.
    pub fn clear(&mut self) {
        debug_assert_eq!(self.dirty + self.in_flight, 0);
        self.entries.clear();
        if let Some(unwritten) = &mut self.unwritten {
            unwritten.clear();
        }
    }

    /// The newest state of `key` if the map has it (marking it used);
    /// `None` means: read it from RocksDB.
    pub fn get(&mut self, key: &[u8]) -> Option<&State> {
        let entry = self.entries.get_mut(key)?;
        entry.flags |= USED;
        Some(&entry.state)
    }

    /// Like [`CacheShard::get`], without marking (for reads that follow
    /// a `get` or `insert_loaded` of the same key).
    pub fn peek(&self, key: &[u8]) -> Option<&State> {
        self.entries.get(key).map(|e| &e.state)
    }

    /// A state read from RocksDB for a key the map did not have.
    pub fn insert_loaded(&mut self, key: &[u8], state: State) {
        self.entries
            .entry(CachedKey::from_slice(key))
            .or_insert(Entry { state, flags: USED });
    }

    /// An applied change: newer than anything written.
    pub fn set(&mut self, key: &[u8], state: State) {
        match self.entries.get_mut(key) {
            Some(entry) => {
                if let Some(unwritten) = &mut self.unwritten
                    && entry.flags & (DIRTY | IN_FLIGHT) == 0
                {
                    unwritten.insert(key.to_vec());
                }
                if entry.flags & DIRTY == 0 {
                    self.dirty += 1;
                }
                entry.state = state;
                entry.flags |= DIRTY | USED;
            }
            None => {
                self.dirty += 1;
                if let Some(unwritten) = &mut self.unwritten {
                    unwritten.insert(key.to_vec());
                }
                self.entries.insert(
                    CachedKey::from_slice(key),
                    Entry {
                        state,
                        flags: DIRTY | USED,
                    },
                );
            }
        }
    }

    /// Whether `key` changed since the last hand-over.
    pub fn is_dirty(&self, key: &[u8]) -> bool {
        self.entries.get(key).is_some_and(|e| e.flags & DIRTY != 0)
    }

    /// States changed since the last hand-over.
    pub fn dirty_len(&self) -> usize {
        self.dirty
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Copies of the dirty states for the writer; they are in flight until
    /// [`CacheShard::write_completed`] or [`CacheShard::write_failed`].
    /// A write must complete or fail before the next hand-over.
    pub fn take_dirty(&mut self) -> Vec<(Vec<u8>, State)> {
        debug_assert_eq!(self.in_flight, 0, "one write in flight at a time");
        let mut taken = Vec::with_capacity(self.dirty);
        if self.dirty > 0 {
            for (key, entry) in &mut self.entries {
                if entry.flags & DIRTY != 0 {
                    entry.flags = (entry.flags & !DIRTY) | IN_FLIGHT;
                    taken.push((key.to_vec(), entry.state.clone()));
                }
            }
        }
        self.in_flight += taken.len();
        self.dirty = 0;
        taken
    }

    /// The states in flight are durable: they may be evicted from now on.
    pub fn write_completed(&mut self) {
        if self.in_flight > 0 {
            for entry in self.entries.values_mut() {
                entry.flags &= !IN_FLIGHT;
            }
            self.in_flight = 0;
            if let Some(unwritten) = &mut self.unwritten {
                let entries = &self.entries;
                unwritten.retain(|key| {
                    entries
                        .get(key.as_slice())
                        .is_some_and(|e| e.flags & DIRTY != 0)
                });
            }
        }
        self.evict_if_over();
    }

    /// The write in flight failed: its states are dirty again (unless
    /// changed since, they still hold what it carried; if changed, the
    /// newer state is what must be written).
    pub fn write_failed(&mut self) {
        if self.in_flight > 0 {
            for entry in self.entries.values_mut() {
                if entry.flags & IN_FLIGHT != 0 {
                    if entry.flags & DIRTY == 0 {
                        self.dirty += 1;
                    }
                    entry.flags = (entry.flags & !IN_FLIGHT) | DIRTY;
                }
            }
            self.in_flight = 0;
        }
        self.evict_if_over();
    }

    /// The keys starting with `prefix` whose newest state here is not yet
    /// in RocksDB (dirty or in flight) and is not a deletion.
    pub fn unwritten_keys(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        if let Some(unwritten) = &self.unwritten {
            return unwritten
                .range::<[u8], _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|key| key.starts_with(prefix))
                .filter(|key| {
                    self.entries
                        .get(key.as_slice())
                        .is_some_and(|e| e.state.is_some())
                })
                .cloned()
                .collect();
        }
        self.unwritten_by_scan(prefix)
    }

    fn unwritten_by_scan(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .filter(|(key, entry)| {
                entry.flags & (DIRTY | IN_FLIGHT) != 0
                    && entry.state.is_some()
                    && key.starts_with(prefix)
            })
            .map(|(key, _)| key.to_vec())
            .collect()
    }

    /// Drops the clean entries whose keys start with `prefix` (a partition
    /// that moved away: its next owner may change those states, so a copy
    /// here would be stale if the partition came back). Dirty and in-flight
    /// entries stay: they are not written yet.
    pub fn forget_clean(&mut self, prefix: &[u8]) {
        self.entries.retain(|key, entry| {
            entry.flags & (DIRTY | IN_FLIGHT) != 0 || !key.starts_with(prefix)
        });
    }

    /// Keeps the clean entries within a quarter over capacity (a sweep
    /// visits the whole map, so it runs rarely and evicts down to
    /// capacity).
    pub fn evict_if_over(&mut self) {
        // An entry changed while in flight counts in both: `clean` may be
        // underestimated, which only delays a sweep.
        let pinned = self.dirty + self.in_flight;
        let clean = self.entries.len().saturating_sub(pinned);
        if clean <= self.capacity + self.capacity / 4 {
            return;
        }
        let mut excess = clean - self.capacity;
        // Pass 1: clean entries not used since the last sweep.
        self.entries.retain(|_, entry| {
            if entry.flags & (DIRTY | IN_FLIGHT) != 0 {
                return true;
            }
            if excess > 0 && entry.flags & USED == 0 {
                excess -= 1;
                return false;
            }
            entry.flags &= !USED;
            true
        });
        // Pass 2: everything was used recently; drop any clean ones.
        if excess > 0 {
            self.entries.retain(|_, entry| {
                if excess > 0 && entry.flags & (DIRTY | IN_FLIGHT) == 0 {
                    excess -= 1;
                    return false;
                }
                true
            });
        }
    }
}

/// Which of `shards` shards (and apply workers) holds `partition`.
pub fn shard_of(partition: u32, shards: usize) -> usize {
    partition as usize % shards.max(1)
}

/// The states of one aggregation kept in memory, split into shards by
/// partition (one shard unless the aggregation is applied by several
/// workers). Every operation on a key goes to the key's shard; the rest
/// goes to all.
#[derive(Debug)]
pub struct StateCache {
    shards: Vec<CacheShard>,
}

impl StateCache {
    /// One shard holding `capacity` clean states.
    pub fn new(capacity: usize) -> Self {
        Self::sharded(capacity, 1)
    }

    /// `shards` shards (at least one) sharing `capacity` clean states.
    pub fn sharded(capacity: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        Self {
            shards: (0..shards)
                .map(|_| CacheShard::new(capacity.div_ceil(shards)))
                .collect(),
        }
    }

    /// See [`CacheShard::ordered`].
    pub fn ordered(self) -> Self {
        Self {
            shards: self.shards.into_iter().map(CacheShard::ordered).collect(),
        }
    }

    /// The same capacity in `shards` shards. Call while empty.
    pub fn resharded(self, shards: usize) -> Self {
        debug_assert!(self.is_empty());
        Self::sharded(self.shards.iter().map(|s| s.capacity).sum(), shards)
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard holding the states of `partition`.
    pub fn shard_of_partition(&self, partition: u32) -> usize {
        shard_of(partition, self.shards.len())
    }

    /// The shard holding `key` (a store key: its slot names the
    /// partition).
    fn shard_of(&self, key: &[u8]) -> usize {
        match (self.shards.len(), Slot::decode(key)) {
            (1, _) | (_, None) => 0,
            (_, Some((slot, _))) => self.shard_of_partition(slot.partition),
        }
    }

    pub fn shard_mut(&mut self, index: usize) -> &mut CacheShard {
        &mut self.shards[index]
    }

    /// Each shard on its own, for workers applying in parallel.
    pub fn shards_mut(&mut self) -> &mut [CacheShard] {
        &mut self.shards
    }

    pub fn clear(&mut self) {
        self.shards.iter_mut().for_each(CacheShard::clear);
    }

    /// See [`CacheShard::get`].
    pub fn get(&mut self, key: &[u8]) -> Option<&State> {
        let shard = self.shard_of(key);
        self.shards[shard].get(key)
    }

    /// See [`CacheShard::peek`].
    pub fn peek(&self, key: &[u8]) -> Option<&State> {
        self.shards[self.shard_of(key)].peek(key)
    }

    /// See [`CacheShard::insert_loaded`].
    pub fn insert_loaded(&mut self, key: &[u8], state: State) {
        let shard = self.shard_of(key);
        self.shards[shard].insert_loaded(key, state);
    }

    /// See [`CacheShard::set`].
    pub fn set(&mut self, key: &[u8], state: State) {
        let shard = self.shard_of(key);
        self.shards[shard].set(key, state);
    }

    /// See [`CacheShard::is_dirty`].
    pub fn is_dirty(&self, key: &[u8]) -> bool {
        self.shards[self.shard_of(key)].is_dirty(key)
    }

    pub fn dirty_len(&self) -> usize {
        self.shards.iter().map(CacheShard::dirty_len).sum()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(CacheShard::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(CacheShard::is_empty)
    }

    /// See [`CacheShard::take_dirty`]: every shard's.
    pub fn take_dirty(&mut self) -> Vec<(Vec<u8>, State)> {
        let mut taken = Vec::with_capacity(self.dirty_len());
        for shard in &mut self.shards {
            taken.append(&mut shard.take_dirty());
        }
        taken
    }

    pub fn write_completed(&mut self) {
        self.shards.iter_mut().for_each(CacheShard::write_completed);
    }

    pub fn write_failed(&mut self) {
        self.shards.iter_mut().for_each(CacheShard::write_failed);
    }

    /// See [`CacheShard::unwritten_keys`] (in order).
    pub fn unwritten_keys(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        if let [shard] = self.shards.as_slice() {
            return shard.unwritten_keys(prefix);
        }
        let mut keys: Vec<Vec<u8>> = self
            .shards
            .iter()
            .flat_map(|shard| shard.unwritten_keys(prefix))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// See [`CacheShard::forget_clean`].
    pub fn forget_clean(&mut self, prefix: &[u8]) {
        for shard in &mut self.shards {
            shard.forget_clean(prefix);
        }
    }

    pub fn evict_if_over(&mut self) {
        self.shards.iter_mut().for_each(CacheShard::evict_if_over);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// Read a key (from the cache, or "RocksDB" on a miss).
        Read(u8),
        /// Apply a change.
        Set(u8, Option<u8>),
        Flush,
        Complete,
        Fail,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u8>().prop_map(|k| Op::Read(k % 32)),
            4 => (any::<u8>(), any::<Option<u8>>()).prop_map(|(k, v)| Op::Set(k % 32, v)),
            1 => Just(Op::Flush),
            1 => Just(Op::Complete),
            1 => Just(Op::Fail),
        ]
    }

    proptest! {
        /// Whatever the interleaving of reads, changes, hand-overs, writes
        /// and failures, and however small the cache: a read (cache first,
        /// RocksDB on a miss) always sees the newest applied state, and
        /// after a final successful write RocksDB holds every newest state.
        #[test]
        fn reads_see_the_newest_state_and_writes_lose_nothing(
            capacity in 1usize..8,
            ops in proptest::collection::vec(op(), 0..300),
            ordered in any::<bool>(),
            shards in 1usize..4,
        ) {
            let mut cache = StateCache::sharded(capacity, shards);
            if ordered {
                cache = cache.ordered();
            }
            let mut rocksdb: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut newest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            let mut in_flight: Option<Vec<(Vec<u8>, State)>> = None;
            let write = |rocksdb: &mut BTreeMap<Vec<u8>, Vec<u8>>, states: Vec<(Vec<u8>, State)>| {
                for (key, state) in states {
                    match state {
                        Some(state) => { rocksdb.insert(key, state); }
                        None => { rocksdb.remove(&key); }
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Read(k) => {
                        let key = store_key(k);
                        let seen = match cache.get(&key) {
                            Some(state) => state.clone(),
                            None => {
                                let loaded = rocksdb.get(&key).cloned();
                                cache.insert_loaded(&key, loaded.clone());
                                loaded
                            }
                        };
                        let expected = newest.get(&key).cloned().flatten();
                        prop_assert_eq!(seen, expected, "key {}", k);
                        // As the pipeline does after each batch.
                        cache.evict_if_over();
                    }
                    Op::Set(k, v) => {
                        let state = v.map(|v| vec![v]);
                        cache.set(&store_key(k), state.clone());
                        newest.insert(store_key(k), state);
                        cache.evict_if_over();
                    }
                    Op::Flush => {
                        if in_flight.is_none() {
                            in_flight = Some(cache.take_dirty());
                        }
                    }
                    Op::Complete => {
                        if let Some(states) = in_flight.take() {
                            write(&mut rocksdb, states);
                            cache.write_completed();
                        }
                    }
                    Op::Fail => {
                        if in_flight.take().is_some() {
                            cache.write_failed();
                        }
                    }
                }
                let mut scanned = Vec::new();
                for shard in cache.shards_mut() {
                    prop_assert!(shard.len() <= shard.capacity + shard.capacity / 4 + shard.dirty + shard.in_flight);
                    scanned.append(&mut shard.unwritten_by_scan(&[]));
                }
                // The ordered index finds what a scan finds.
                let mut found = cache.unwritten_keys(&[]);
                found.sort();
                scanned.sort();
                prop_assert_eq!(found, scanned);
            }
            if let Some(states) = in_flight.take() {
                write(&mut rocksdb, states);
                cache.write_completed();
            }
            let last = cache.take_dirty();
            write(&mut rocksdb, last);
            cache.write_completed();
            for (key, state) in newest {
                prop_assert_eq!(rocksdb.get(&key).cloned(), state);
            }
        }
    }

    /// A key in partition `k % 5`, so that shards split the keys.
    fn store_key(k: u8) -> Vec<u8> {
        Slot {
            topic_id: 0,
            partition: u32::from(k % 5),
        }
        .store_key(&[k])
    }

    #[test]
    fn each_partition_stays_in_one_shard() {
        let mut cache = StateCache::sharded(100, 3);
        for k in 0..50u8 {
            cache.set(&store_key(k), Some(vec![k]));
        }
        let slot_of = |key: &[u8]| Slot::decode(key).map(|(slot, _)| slot.partition);
        for (index, shard) in cache.shards_mut().iter_mut().enumerate() {
            for (key, _) in shard.take_dirty() {
                assert_eq!(slot_of(&key).map(|p| p as usize % 3), Some(index));
            }
        }
    }

    #[test]
    fn eviction_prefers_entries_not_used_since_the_last_sweep() {
        let mut cache = CacheShard::new(4);
        for k in 0..5u8 {
            cache.insert_loaded(&[k], Some(vec![k]));
        }
        // A sweep clears the used marks (nothing over a quarter yet).
        cache.entries.values_mut().for_each(|e| e.flags &= !USED);
        cache.get(&[0]);
        cache.get(&[1]);
        cache.insert_loaded(&[5], Some(vec![5]));
        cache.insert_loaded(&[6], Some(vec![6]));
        cache.evict_if_over();
        assert_eq!(cache.len(), 4);
        for k in [0u8, 1, 5, 6] {
            assert!(cache.peek(&[k]).is_some(), "key {k} was evicted");
        }
    }
}
