//! Turning a batch into per-key groups for one plugin call: each record's
//! group key for an aggregation, and the grouping itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::Hash;

use foldhash::fast::RandomState;
use smallvec::{SmallVec, smallvec};

use crate::config::AggregationConfig;
use crate::record::SourceRecord;
use crate::state::store::Slot;

/// Where a group's state lives: the store slot and the key within it.
pub type GroupKey<'r> = (Slot, Cow<'r, [u8]>);

/// The group key of a record for an aggregation: the Kafka key in its
/// partition's slot, or the re-keying field in the re-keyed slot.
pub fn group_key<'r>(
    config: &AggregationConfig,
    record: &'r SourceRecord,
    slot: Slot,
) -> Result<GroupKey<'r>, String> {
    let Some(pointer) = &config.key else {
        return Ok((
            slot,
            Cow::Borrowed(record.key.as_deref().unwrap_or_default()),
        ));
    };
    let value = record
        .value
        .as_deref()
        .ok_or_else(|| format!("cannot re-key by `{pointer}`: the record has no value"))?;
    let json: serde_json::Value = serde_json::from_slice(value)
        .map_err(|e| format!("cannot re-key by `{pointer}`: value is not JSON: {e}"))?;
    let key = match json.pointer(pointer) {
        None | Some(serde_json::Value::Null) => {
            return Err(format!(
                "cannot re-key by `{pointer}`: the field is missing or null"
            ));
        }
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    };
    Ok((Slot::REKEYED, Cow::Owned(key)))
}

/// A group's items: the first few inline, since most groups of a batch
/// over many keys hold one or two records (no allocation per group then).
pub type GroupItems<T> = SmallVec<[T; 4]>;

/// Groups `(key, item)` pairs by key, keeping each group's items in input
/// order and the groups in order of first appearance (so results are
/// deterministic).
pub fn group_by_key<K: Hash + Eq + Clone, T>(
    pairs: impl IntoIterator<Item = (K, T)>,
) -> Vec<(K, GroupItems<T>)> {
    // foldhash: several times faster than SipHash on short keys, and still
    // seeded per process against crafted collisions.
    let mut index: HashMap<K, usize, RandomState> = HashMap::default();
    let mut groups: Vec<(K, GroupItems<T>)> = Vec::new();
    for (key, item) in pairs {
        match index.get(&key) {
            Some(&i) => groups[i].1.push(item),
            None => {
                index.insert(key.clone(), groups.len());
                groups.push((key, smallvec![item]));
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
