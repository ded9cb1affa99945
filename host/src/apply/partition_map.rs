//! A map keyed by (topic, partition) for lookups once per record.

use std::collections::HashMap;
use std::sync::Arc;

/// Values per (topic, partition). Records arrive in runs from one
/// partition, so the last key looked up is compared first (a pointer
/// comparison for the source's interned topic names) before hashing; the
/// consumer thread did a SipHash and an `Arc` clone per record before.
#[derive(Debug, Clone)]
pub struct PartitionMap<V> {
    map: HashMap<(Arc<str>, i32), V, foldhash::fast::RandomState>,
    last: Option<(Arc<str>, i32, V)>,
}

impl<V> Default for PartitionMap<V> {
    fn default() -> Self {
        Self {
            map: HashMap::default(),
            last: None,
        }
    }
}

impl<V: Copy> PartitionMap<V> {
    pub fn get(&mut self, topic: &Arc<str>, partition: i32) -> Option<V> {
        if let Some((last_topic, last_partition, value)) = &self.last
            && *last_partition == partition
            && (Arc::ptr_eq(last_topic, topic) || **last_topic == **topic)
        {
            return Some(*value);
        }
        let value = *self.map.get(&(topic.clone(), partition))?;
        self.last = Some((topic.clone(), partition, value));
        Some(value)
    }

    pub fn insert(&mut self, topic: Arc<str>, partition: i32, value: V) {
        self.last = None;
        self.map.insert((topic, partition), value);
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> Vec<(Arc<str>, i32, V)> {
        self.map
            .iter()
            .map(|((topic, partition), value)| (topic.clone(), *partition, *value))
            .collect()
    }

    pub fn remove(&mut self, topic: &str, partition: i32) {
        self.last = None;
        self.map.remove(&(Arc::from(topic), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_see_inserts_and_removals_whatever_was_looked_up_last() {
        let a: Arc<str> = Arc::from("a");
        let a_again: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let mut map = PartitionMap::default();
        map.insert(a.clone(), 0, 10);
        map.insert(b.clone(), 0, 20);
        assert_eq!(map.get(&a, 0), Some(10));
        assert_eq!(map.get(&a_again, 0), Some(10), "equal names, other Arc");
        assert_eq!(map.get(&a, 1), None);
        assert_eq!(map.get(&b, 0), Some(20));
        map.insert(b.clone(), 0, 21);
        assert_eq!(map.get(&b, 0), Some(21));
        map.remove("b", 0);
        assert_eq!(map.get(&b, 0), None);
        assert_eq!(map.get(&a, 0), Some(10));
    }
}
