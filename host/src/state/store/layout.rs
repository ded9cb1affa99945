//! How the store lays out its keys: the slot prefix of every state key,
//! and the prefixes of the `meta` column family.

pub(super) const META_CF: &str = "meta";
pub(super) const AGG_CF_PREFIX: &str = "agg.";
pub(super) const TOPIC_PREFIX: &[u8] = b"topic\0";
pub(super) const OFFSET_PREFIX: &[u8] = b"offset\0";
pub(super) const AGG_META_PREFIX: &[u8] = b"aggregation\0";
pub(super) const APPLIED_PREFIX: &[u8] = b"applied\0";
pub(super) const FAILED_PREFIX: &[u8] = b"failed\0";
pub(super) const DEAD_LETTERED_PREFIX: &[u8] = b"dead-lettered\0";
pub(super) const LATE_PREFIX: &[u8] = b"late\0";
pub(super) const DROPPED_PREFIX: &[u8] = b"dropped\0";
/// `keys\0` + aggregation name + `\0` + slot → how many states the
/// aggregation holds in the slot (see `key_count.rs`).
pub(super) const KEYS_PREFIX: &[u8] = b"keys\0";
/// `keys-counted\0` + aggregation name: its counts are kept.
pub(super) const KEYS_COUNTED_PREFIX: &[u8] = b"keys-counted\0";
/// `stream-time\0` + topic id + partition + aggregation name → the largest
/// event time a windowed aggregation has seen in the partition (ms).
pub(super) const STREAM_TIME_PREFIX: &[u8] = b"stream-time\0";
pub(super) const COMMIT_PREFIX: &[u8] = b"commit\0";
/// `catch-up\0` + topic id + partition + aggregation name → the next offset
/// of an aggregation that is behind the partition's offset (see
/// `catch_up.rs`).
pub(super) const CATCH_UP_PREFIX: &[u8] = b"catch-up\0";

/// Keys with their states.
pub type KeyStates = Vec<(Vec<u8>, Vec<u8>)>;

/// Keys and states with the slot each is in (a key may be in several).
pub type SlottedStates = Vec<(Slot, Vec<u8>, Vec<u8>)>;
/// A store key held without a heap allocation up to 48 bytes (a slot and
/// a 42-byte key: a UUID's text fits): the state cache keeps its keys so,
/// and the applier builds them so for each group of a batch.
pub type InlineKey = smallvec::SmallVec<[u8; 48]>;

/// Which source partition a state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub topic_id: u16,
    pub partition: u32,
}

impl Slot {
    /// The slot of aggregations that re-key records.
    pub const REKEYED: Slot = Slot {
        topic_id: u16::MAX,
        partition: u32::MAX,
    };
    pub const LEN: usize = 6;

    /// The RocksDB key of `key` in this slot.
    pub fn store_key(self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + key.len());
        out.extend_from_slice(&self.topic_id.to_be_bytes());
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(key);
        out
    }

    /// [`Slot::store_key`] as an [`InlineKey`].
    pub fn inline_key(self, key: &[u8]) -> InlineKey {
        let mut out = InlineKey::new();
        out.extend_from_slice(&self.topic_id.to_be_bytes());
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(key);
        out
    }

    /// The slot and key of an encoded store key.
    pub fn decode(bytes: &[u8]) -> Option<(Slot, &[u8])> {
        let (head, key) = bytes.split_at_checked(Self::LEN)?;
        let topic_id = u16::from_be_bytes([head[0], head[1]]);
        let partition = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
        Some((
            Slot {
                topic_id,
                partition,
            },
            key,
        ))
    }
}

pub(super) fn partition_key(prefix: &[u8], topic_id: u16, partition: i32) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&topic_id.to_be_bytes());
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

pub(super) fn meta_key(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(name);
    key
}

/// The smallest byte string greater than every string starting with `prefix`.
pub(super) fn next_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < u8::MAX {
            next.push(last + 1);
            return Some(next);
        }
    }
    None
}
