//! The records wagg keeps in Kafka for a cluster: changelog records (one
//! per state write), commit records (one per flush and source partition)
//! and their keys.
//!
//! A flush of source partition `(topic, p)` produces, for every aggregation,
//! the new states of the keys it changed to partition `p` of that
//! aggregation's changelog topic, each tagged with the writer's *epoch* and
//! the flush's *sequence number*; once all are acknowledged, one commit
//! record to partition `p` of the commits topic. A commit names the source
//! offset the states correspond to and the *lineage* of the state: for each
//! epoch whose records it includes, the last sequence number included. A
//! restore applies exactly the changelog records its chosen commit's
//! lineage accepts, so records of an unfinished flush (a crash between the
//! state records and the commit) or of a deposed owner are never applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Header of a changelog record: the owner's epoch for the partition.
pub const EPOCH_HEADER: &str = "wagg.epoch";
/// Header of a changelog record: the flush's sequence number in its epoch.
pub const SEQ_HEADER: &str = "wagg.seq";
/// Header of a changelog record: the source offset its flush reached.
pub const OFFSET_HEADER: &str = "wagg.source.offset";

/// The key of a changelog record: source topic, source partition and the
/// aggregation key, so a compacted changelog keeps one state per key and
/// partition.
pub fn changelog_key(topic: &str, partition: i32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + topic.len() + 4 + key.len());
    // Topic names are at most 249 bytes (Kafka's limit).
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// `(topic, partition, key)` of a changelog key; `None` if malformed.
pub fn decode_changelog_key(bytes: &[u8]) -> Option<(&str, i32, &[u8])> {
    let (len, rest) = bytes.split_at_checked(2)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let (topic, rest) = rest.split_at_checked(len)?;
    let (partition, key) = rest.split_at_checked(4)?;
    let topic = std::str::from_utf8(topic).ok()?;
    let partition = i32::from_be_bytes([partition[0], partition[1], partition[2], partition[3]]);
    Some((topic, partition, key))
}

/// The key of a source partition's commit records.
pub fn commit_key(topic: &str, partition: i32) -> Vec<u8> {
    changelog_key(topic, partition, &[])
}

/// What a source partition's state is: the commit record's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The owner's epoch (one more than any epoch before it on this
    /// partition).
    pub epoch: u64,
    /// The flush's sequence number in the epoch; 0 for the claim an owner
    /// writes when it takes the partition over.
    pub seq: u64,
    /// The next source offset to apply (`None`: nothing applied yet).
    pub next_offset: Option<i64>,
    /// Epoch → last sequence number of that epoch in the state.
    pub lineage: BTreeMap<u64, u64>,
    /// Aggregation → the changelog offset (in partition `p`) below which
    /// every record of this state lies: a standby that has read that far
    /// can apply the commit.
    #[serde(default)]
    pub ends: BTreeMap<String, i64>,
    /// When the owner wrote the commit (ms since the epoch); how stale a
    /// standby's copy is.
    #[serde(default)]
    pub at_ms: i64,
}

impl Commit {
    /// Whether the record of flush `seq` of `epoch` is part of this state.
    pub fn accepts(&self, epoch: u64, seq: u64) -> bool {
        self.lineage.get(&epoch).is_some_and(|&last| seq <= last)
    }

    /// Whether every record `older` accepts is part of this state too (then
    /// this state is `older` plus the records between their `ends`).
    pub fn extends(&self, older: &Commit) -> bool {
        older
            .lineage
            .iter()
            .all(|(&epoch, &last)| last == 0 || self.accepts(epoch, last))
    }

    /// Orders commits of one partition: a higher epoch, then a later flush.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }

    /// The claim of a new owner (epoch `epoch`) of the state `self`.
    pub fn claim(&self, epoch: u64) -> Commit {
        let mut lineage = self.lineage.clone();
        // An epoch that never flushed wrote no record (sequence numbers of
        // records start at 1): nothing to accept, so it need not be carried
        // (every rebalance starts an epoch per partition).
        lineage.retain(|_, last| *last > 0);
        lineage.insert(epoch, 0);
        Commit {
            epoch,
            seq: 0,
            next_offset: self.next_offset,
            lineage,
            ends: self.ends.clone(),
            at_ms: 0,
        }
    }

    /// The commit of the next flush in this epoch, reaching `next_offset`.
    pub fn next_flush(&self, next_offset: i64) -> Commit {
        let seq = self.seq + 1;
        let mut lineage = self.lineage.clone();
        lineage.insert(self.epoch, seq);
        Commit {
            epoch: self.epoch,
            seq,
            next_offset: Some(next_offset),
            lineage,
            ends: self.ends.clone(),
            at_ms: 0,
        }
    }

    /// The state before any record: no lineage, no offset.
    pub fn empty() -> Commit {
        Commit {
            epoch: 0,
            seq: 0,
            next_offset: None,
            lineage: BTreeMap::new(),
            ends: BTreeMap::new(),
            at_ms: 0,
        }
    }
}

/// The largest epoch a commit may carry. Real epochs grow by one per
/// take-over; a record claiming more is forged or corrupt, and a claim
/// must be able to add one without wrapping.
pub const MAX_EPOCH: u64 = 1 << 62;

/// A commit record's value, parsed and checked: whoever can write the
/// commits topic could otherwise stop every take-over with one bad record,
/// wrap the next epoch (`u64::MAX + 1`), or make a negative offset that
/// librdkafka reads as a logical one (beginning, end).
pub fn parse_commit(payload: Option<&[u8]>) -> Result<Commit, String> {
    let payload = payload.ok_or("no value")?;
    let commit: Commit = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if commit.epoch == 0 || commit.epoch > MAX_EPOCH {
        return Err(format!("epoch {} is outside 1..={MAX_EPOCH}", commit.epoch));
    }
    if let Some(offset) = commit.next_offset.filter(|o| *o < 0) {
        return Err(format!("next_offset {offset} is negative"));
    }
    if commit.lineage.get(&commit.epoch) != Some(&commit.seq) {
        return Err(format!(
            "its lineage does not end at its own flush (epoch {}, seq {})",
            commit.epoch, commit.seq
        ));
    }
    if let Some(epoch) = commit.lineage.keys().find(|e| **e > commit.epoch) {
        return Err(format!("its lineage names a later epoch ({epoch})"));
    }
    if let Some((aggregation, end)) = commit.ends.iter().find(|(_, end)| **end < 0) {
        return Err(format!(
            "the changelog end of {aggregation:?} is negative ({end})"
        ));
    }
    Ok(commit)
}

/// A decimal header value.
pub fn parse_number_header(value: Option<&[u8]>) -> Option<u64> {
    std::str::from_utf8(value?).ok()?.parse().ok()
}

#[cfg(test)]
mod commit_validation {
    use super::*;

    fn json(commit: &Commit) -> Vec<u8> {
        serde_json::to_vec(commit).expect("json")
    }

    #[test]
    fn real_commits_parse_and_forged_ones_are_refused_with_the_reason() {
        let claim = Commit::empty().claim(1);
        let flushed = claim.next_flush(10).next_flush(20).claim(2).next_flush(30);
        for commit in [&claim, &flushed] {
            assert_eq!(parse_commit(Some(&json(commit))).as_ref(), Ok(commit));
        }
        let forged = [
            (
                Commit {
                    epoch: u64::MAX,
                    ..flushed.clone()
                },
                "epoch",
            ),
            (
                Commit {
                    next_offset: Some(-2),
                    ..flushed.clone()
                },
                "negative",
            ),
            (
                Commit {
                    seq: 7,
                    ..flushed.clone()
                },
                "lineage",
            ),
            (
                Commit {
                    epoch: 1,
                    ..flushed.clone()
                },
                "lineage",
            ),
        ];
        for (commit, reason) in forged {
            let error = parse_commit(Some(&json(&commit))).expect_err("forged");
            assert!(error.contains(reason), "{error}");
        }
        assert!(parse_commit(Some(b"{not json")).is_err());
        assert!(parse_commit(None).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn changelog_keys_round_trip(topic in "[a-z._-]{1,40}", partition in 0i32..10_000, key in proptest::collection::vec(any::<u8>(), 0..64)) {
            let encoded = changelog_key(&topic, partition, &key);
            prop_assert_eq!(decode_changelog_key(&encoded), Some((topic.as_str(), partition, key.as_slice())));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_changelog_key(&bytes);
        }
    }

    /// What happens to one partition: owners claim it (each from the
    /// newest commit it reads), flush (records, then maybe — unless the
    /// owner dies in between — the commit), and deposed owners keep
    /// flushing as zombies.
    #[derive(Debug, Clone)]
    enum Step {
        Claim {
            owner: usize,
        },
        Flush {
            owner: usize,
            writes: Vec<(u8, Option<u8>)>,
            dies_before_commit: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3).prop_map(|owner| Step::Claim { owner }),
            (
                0usize..3,
                proptest::collection::vec((0u8..6, proptest::option::of(any::<u8>())), 0..4),
                proptest::bool::weighted(0.15),
            )
                .prop_map(|(owner, writes, dies_before_commit)| Step::Flush {
                    owner,
                    writes,
                    dies_before_commit
                }),
        ]
    }

    /// A changelog record: epoch, seq, key, state.
    type Record = (u64, u64, u8, Option<u8>);

    /// The states `commit` stands for: what a restore builds.
    fn restore(changelog: &[Record], commit: &Commit) -> BTreeMap<u8, u8> {
        let mut state = BTreeMap::new();
        for &(epoch, seq, key, value) in changelog {
            if commit.accepts(epoch, seq) {
                match value {
                    Some(value) => state.insert(key, value),
                    None => state.remove(&key),
                };
            }
        }
        state
    }

    /// Runs the steps; returns the changelog and the commits log.
    fn simulate(steps: &[Step]) -> (Vec<Record>, Vec<Commit>) {
        let (mut changelog, mut commits) = (Vec::<Record>::new(), Vec::<Commit>::new());
        let mut owners: [Option<Commit>; 3] = [None, None, None];
        for step in steps {
            match step {
                Step::Claim { owner } => {
                    // The newest commit: the highest epoch, the last of it.
                    let newest = commits
                        .iter()
                        .fold(None::<&Commit>, |n, c| match n {
                            Some(n) if c.epoch < n.epoch => Some(n),
                            _ => Some(c),
                        })
                        .cloned()
                        .unwrap_or_else(Commit::empty);
                    let max_epoch = commits.iter().map(|c| c.epoch).max().unwrap_or(0);
                    let claim = newest.claim(max_epoch.max(newest.epoch) + 1);
                    commits.push(claim.clone());
                    owners[*owner] = Some(claim);
                }
                Step::Flush {
                    owner,
                    writes,
                    dies_before_commit,
                } => {
                    let Some(current) = owners[*owner].clone() else {
                        continue;
                    };
                    let mut next = current.next_flush(changelog.len() as i64);
                    for &(key, value) in writes {
                        changelog.push((next.epoch, next.seq, key, value));
                    }
                    if !writes.is_empty() {
                        let end = changelog.len() as i64;
                        let known = next.ends.entry("a".into()).or_insert(end);
                        *known = (*known).max(end);
                    }
                    if *dies_before_commit {
                        owners[*owner] = None;
                    } else {
                        commits.push(next.clone());
                        owners[*owner] = Some(next);
                    }
                }
            }
        }
        (changelog, commits)
    }

    proptest! {
        /// What a standby does: from a commit it holds, read the changelog
        /// between the two commits' ends and apply what the newer accepts.
        /// That must equal a full restore whenever the newer commit extends
        /// the older one (otherwise the standby restores in full).
        #[test]
        fn following_a_changelog_between_commits_equals_a_restore(steps in proptest::collection::vec(step(), 1..40)) {
            let (changelog, commits) = simulate(&steps);
            let end_of = |c: &Commit| c.ends.get("a").copied().unwrap_or(0) as usize;
            for commit in &commits {
                // Every record a commit accepts lies below its ends.
                for (offset, &(epoch, seq, _, _)) in changelog.iter().enumerate() {
                    if commit.accepts(epoch, seq) {
                        prop_assert!(offset < end_of(commit), "{commit:?} accepts offset {offset}");
                    }
                }
            }
            for older in &commits {
                for newer in &commits {
                    if newer.position() <= older.position() || !newer.extends(older) {
                        continue;
                    }
                    let mut copy = restore(&changelog, older);
                    let (from, to) = (end_of(older), end_of(newer).max(end_of(older)));
                    for &(epoch, seq, key, value) in &changelog[from..to] {
                        if newer.accepts(epoch, seq) {
                            match value {
                                Some(value) => copy.insert(key, value),
                                None => copy.remove(&key),
                            };
                        }
                    }
                    prop_assert_eq!(&copy, &restore(&changelog, newer), "{:?} → {:?}", older, newer);
                }
            }
        }
    }

    #[test]
    fn a_lineage_accepts_its_flushes_and_nothing_after_them() {
        let first = Commit::empty().claim(1).next_flush(10).next_flush(20);
        assert!(first.accepts(1, 2) && first.accepts(1, 1) && !first.accepts(1, 3));
        // A new owner continues from the first owner's second flush; the
        // first owner's third flush (unfinished, or written after it was
        // deposed) is not part of the new owner's state.
        let second = first.claim(2).next_flush(35);
        assert!(second.accepts(1, 2) && !second.accepts(1, 3));
        assert!(second.accepts(2, 1) && !second.accepts(2, 2));
        assert_eq!(second.next_offset, Some(35));
        assert!(!Commit::empty().accepts(0, 0));
    }

    #[test]
    fn a_state_extends_its_ancestors_but_not_a_deposed_owners_later_flushes() {
        let first = Commit::empty().claim(1).next_flush(10);
        let zombie = first.next_flush(20);
        let second = first.claim(2).next_flush(30);
        assert!(second.extends(&first) && second.extends(&Commit::empty()));
        assert!(!second.extends(&zombie), "flush 2 of epoch 1 is not in it");
        assert!(zombie.extends(&first) && !first.extends(&zombie));
        // Claims carry nothing new: any later state extends them.
        assert!(second.extends(&first.claim(2)));
    }

    #[test]
    fn epochs_without_a_flush_are_not_carried() {
        let idle = Commit::empty().claim(1).claim(2).claim(3);
        assert_eq!(idle.lineage.len(), 1, "{idle:?}");
        let busy = idle.next_flush(5).claim(4).claim(5);
        assert_eq!(busy.lineage.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
        assert!(busy.accepts(3, 1));
    }
}
