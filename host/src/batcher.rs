//! Turning a run of records into per-key groups for one plugin call.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::hash::Hash;

/// Groups `(key, item)` pairs by key, keeping each group's items in input
/// order and the groups in order of first appearance (so results are
/// deterministic).
pub fn group_by_key<K: Hash + Eq + Clone, T>(
    pairs: impl IntoIterator<Item = (K, T)>,
) -> Vec<(K, Vec<T>)> {
    // foldhash: several times faster than SipHash on short keys, and still
    // seeded per process against crafted collisions.
    let mut index: HashMap<K, usize, RandomState> = HashMap::default();
    let mut groups: Vec<(K, Vec<T>)> = Vec::new();
    for (key, item) in pairs {
        match index.get(&key) {
            Some(&i) => groups[i].1.push(item),
            None => {
                index.insert(key.clone(), groups.len());
                groups.push((key, vec![item]));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourceRecord;

    #[test]
    fn groups_keep_first_appearance_and_record_order() {
        let records: Vec<SourceRecord> = [b"b", b"a", b"b", b"c", b"a"]
            .iter()
            .enumerate()
            .map(|(offset, key)| SourceRecord {
                key: Some(key.to_vec()),
                offset: offset as i64,
                ..SourceRecord::default()
            })
            .collect();
        let groups = group_by_key(records.iter().map(|r| (r.key.clone(), r)));
        let summary: Vec<(Vec<u8>, Vec<i64>)> = groups
            .into_iter()
            .map(|(k, rs)| (k.unwrap(), rs.iter().map(|r| r.offset).collect()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (b"b".to_vec(), vec![0, 2]),
                (b"a".to_vec(), vec![1, 4]),
                (b"c".to_vec(), vec![3])
            ]
        );
    }
}
