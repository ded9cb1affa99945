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

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Header of a changelog record: the owner's epoch for the partition.
pub const EPOCH_HEADER: &str = "wagg.epoch";
/// Header of a changelog record: the flush's sequence number in its epoch.
pub const SEQ_HEADER: &str = "wagg.seq";
/// Header of a changelog record: the source offset its flush reached.
pub const OFFSET_HEADER: &str = "wagg.source.offset";
/// Header of a changelog record with a state: the plugin's state format
/// the state is in. Instances running another version of the plugin
/// migrate it when they restore or copy it; a record without it was
/// written before formats were recorded, in the format the aggregation
/// has on the instance that reads it (clusters could not change formats
/// then).
pub const FORMAT_HEADER: &str = "wagg.format";

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

/// The key of a source partition's commit records of one epoch. The epoch
/// is in the key so that compaction keeps the last commit of every epoch:
/// with one key per partition, a deposed owner's late commit would be the
/// one compaction keeps, and the newer owner's claim would be gone.
pub fn commit_key(topic: &str, partition: i32, epoch: u64) -> Vec<u8> {
    changelog_key(topic, partition, &epoch.to_be_bytes())
}

/// Whether the rest of a decoded key (after topic and partition) is a
/// commit record's: an epoch, or nothing (the key of older versions).
pub fn is_commit_key_rest(rest: &[u8]) -> bool {
    rest.is_empty() || rest.len() == 8
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
    /// A first owner's claim whose state (a single instance's store from
    /// before the cluster) is being published: until a commit of this
    /// epoch follows, the state exists only in that store, so another
    /// owner must not resume at `next_offset` (see `cluster::takeover`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot_pending: bool,
    /// Aggregations catching up on the partition (added, or reset, after
    /// it was consumed) → their own next offset, below `next_offset`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub catch_up: BTreeMap<String, i64>,
    /// The aggregations whose states this commit describes (`None`: a
    /// commit of an earlier wagg, which describes every configured one).
    /// One configured now and not named here is new to the partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregations: Option<BTreeSet<String>>,
    /// Windowed aggregations → their stream time on the partition (the
    /// largest event time applied), which decides what is late next.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stream_times: BTreeMap<String, i64>,
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
            snapshot_pending: false,
            catch_up: self.catch_up.clone(),
            aggregations: self.aggregations.clone(),
            stream_times: self.stream_times.clone(),
        }
    }

    /// The commit of the next flush in this epoch, reaching `next_offset`.
    pub fn next_flush(&self, next_offset: Option<i64>) -> Commit {
        let seq = self.seq + 1;
        let mut lineage = self.lineage.clone();
        lineage.insert(self.epoch, seq);
        Commit {
            epoch: self.epoch,
            seq,
            next_offset,
            lineage,
            ends: self.ends.clone(),
            at_ms: 0,
            snapshot_pending: false,
            catch_up: self.catch_up.clone(),
            aggregations: self.aggregations.clone(),
            stream_times: self.stream_times.clone(),
        }
    }

    /// Where `aggregation` stands on the partition in this state: its own
    /// next offset if it is catching up, `None` if it is at `next_offset`.
    /// One the commit does not describe is new here and starts at
    /// `new_from` (`source.start_from`: 0 for the beginning, `None` with
    /// the others).
    pub fn catch_up_of(&self, aggregation: &str, new_from: Option<i64>) -> Option<i64> {
        if let Some(&own) = self.catch_up.get(aggregation) {
            return Some(own);
        }
        self.next_offset?;
        match &self.aggregations {
            Some(described) if !described.contains(aggregation) => new_from,
            _ => None,
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
            snapshot_pending: false,
            catch_up: BTreeMap::new(),
            aggregations: None,
            stream_times: BTreeMap::new(),
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
    let past_the_end = |own: i64| commit.next_offset.is_none_or(|next| own > next);
    if let Some((aggregation, offset)) = commit
        .catch_up
        .iter()
        .find(|(_, o)| **o < 0 || past_the_end(**o))
    {
        return Err(format!(
            "catch-up offset {offset} of aggregation {aggregation:?} is negative or past the partition's next offset {:?}",
            commit.next_offset
        ));
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
        let flushed = claim
            .next_flush(Some(10))
            .next_flush(Some(20))
            .claim(2)
            .next_flush(Some(30));
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
                    catch_up: [("added".to_owned(), -1)].into(),
                    ..flushed.clone()
                },
                "negative",
            ),
            (
                Commit {
                    catch_up: [("added".to_owned(), 31)].into(),
                    ..flushed.clone()
                },
                "past the partition's next offset",
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

    #[test]
    fn a_commit_says_where_each_aggregation_stands() {
        let mut commit = Commit::empty().claim(1).next_flush(Some(100));
        // A commit of an earlier wagg describes every aggregation.
        assert_eq!(commit.catch_up_of("count", Some(0)), None);
        commit.aggregations = Some(["count".to_owned(), "stats".to_owned()].into());
        commit.catch_up = [("stats".to_owned(), 40)].into();
        assert_eq!(commit.catch_up_of("count", Some(0)), None);
        assert_eq!(commit.catch_up_of("stats", Some(0)), Some(40));
        // Not described: new to the partition, from `start_from`.
        assert_eq!(commit.catch_up_of("top", Some(0)), Some(0));
        assert_eq!(commit.catch_up_of("top", None), None);
        // Nothing consumed yet: everyone starts together.
        let fresh = Commit {
            aggregations: Some(BTreeSet::new()),
            ..Commit::empty().claim(1)
        };
        assert_eq!(fresh.catch_up_of("top", Some(0)), None);
        // Carried through claims and flushes.
        let later = commit.claim(2).next_flush(Some(120));
        assert_eq!(later.catch_up_of("stats", Some(0)), Some(40));
        assert_eq!(later.catch_up_of("top", Some(0)), Some(0));
    }

    #[test]
    fn stream_times_travel_with_claims_flushes_and_the_record() {
        let mut commit = Commit::empty().claim(1).next_flush(Some(100));
        commit.stream_times = [("per_minute".to_owned(), 1_700_000_000_000)].into();
        let later = commit.claim(2).next_flush(Some(120));
        assert_eq!(later.stream_times, commit.stream_times);
        let json = serde_json::to_vec(&later).expect("json");
        assert_eq!(parse_commit(Some(&json)).expect("parses"), later);
        // Commits without windows do not carry the field.
        let plain = Commit::empty().claim(1).next_flush(Some(5));
        let text = serde_json::to_string(&plain).expect("json");
        assert!(!text.contains("stream_times"), "{text}");
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
    /// owner dies in between — the commit), deposed owners keep flushing
    /// as zombies until they see the claim that deposed them, and the
    /// broker compacts the commits topic.
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
        Compact,
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
            Just(Step::Compact),
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

    /// How the model's commits topic behaves and is read.
    #[derive(Clone, Copy)]
    struct Rules {
        /// Owners check the commits after each flush (`cluster::fence`).
        fenced: bool,
        /// Commit records are keyed by epoch (`commit_key`), not only by
        /// partition.
        key_by_epoch: bool,
    }

    /// The commits partition as the broker keeps it: offsets stay,
    /// compaction empties the slots of superseded records.
    #[derive(Default)]
    struct CommitsLog {
        slots: Vec<Option<Commit>>,
    }

    impl CommitsLog {
        fn compact(&mut self, rules: Rules) {
            let key = |c: &Commit| if rules.key_by_epoch { c.epoch } else { 0 };
            let mut last = BTreeMap::new();
            for (offset, commit) in self.slots.iter().enumerate() {
                if let Some(commit) = commit {
                    last.insert(key(commit), offset);
                }
            }
            for (offset, slot) in self.slots.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|c| last[&key(c)] != offset) {
                    *slot = None;
                }
            }
        }

        /// What `Cluster::scan_commits` finds among the slots from
        /// `from`: the newest commit (highest epoch, the last of it) and
        /// the highest epoch.
        fn scan(&self, from: usize) -> (Option<Commit>, u64) {
            let mut newest: Option<&Commit> = None;
            let mut max_epoch = 0;
            for commit in self.slots[from..].iter().flatten() {
                max_epoch = max_epoch.max(commit.epoch);
                if newest.is_none_or(|n| commit.epoch >= n.epoch) {
                    newest = Some(commit);
                }
            }
            (newest.cloned(), max_epoch)
        }

        /// What `Cluster::newest_commits` reads: the window, or the whole
        /// log if the window holds no commit.
        fn newest(&self) -> (Option<Commit>, u64) {
            let window = super::super::takeover::COMMIT_WINDOW as usize;
            match self.scan(self.slots.len().saturating_sub(window)) {
                (None, _) => self.scan(0),
                found => found,
            }
        }
    }

    /// What the model's run produced, and every way it went wrong.
    struct Run {
        changelog: Vec<Record>,
        commits: Vec<Commit>,
        /// A commit whose restore differs from the state its owner had
        /// when it wrote it, or a claim whose epoch was used before.
        violations: Vec<String>,
    }

    /// Runs the steps under `rules`.
    fn simulate(steps: &[Step], rules: Rules) -> Run {
        let mut run = Run {
            changelog: Vec::new(),
            commits: Vec::new(),
            violations: Vec::new(),
        };
        let mut log = CommitsLog::default();
        // Each owner's commit and in-memory state.
        let mut owners: [Option<(Commit, BTreeMap<u8, u8>)>; 3] = [None, None, None];
        for step in steps {
            match step {
                Step::Claim { owner } => {
                    let (newest, max_epoch) = log.newest();
                    let newest = newest.unwrap_or_else(Commit::empty);
                    let claim = newest.claim(max_epoch.max(newest.epoch) + 1);
                    if run.commits.iter().any(|c| c.epoch >= claim.epoch) {
                        run.violations
                            .push(format!("epoch {} claimed again", claim.epoch));
                    }
                    let state = restore(&run.changelog, &newest);
                    log.slots.push(Some(claim.clone()));
                    run.commits.push(claim.clone());
                    owners[*owner] = Some((claim, state));
                }
                Step::Flush {
                    owner,
                    writes,
                    dies_before_commit,
                } => {
                    let Some((current, mut state)) = owners[*owner].take() else {
                        continue;
                    };
                    let mut next = current.next_flush(Some(run.changelog.len() as i64));
                    for &(key, value) in writes {
                        run.changelog.push((next.epoch, next.seq, key, value));
                        match value {
                            Some(value) => state.insert(key, value),
                            None => state.remove(&key),
                        };
                    }
                    if !writes.is_empty() {
                        let end = run.changelog.len() as i64;
                        let known = next.ends.entry("a".into()).or_insert(end);
                        *known = (*known).max(end);
                    }
                    if *dies_before_commit {
                        continue;
                    }
                    if restore(&run.changelog, &next) != state {
                        run.violations
                            .push(format!("{next:?} does not restore its owner's state"));
                    }
                    log.slots.push(Some(next.clone()));
                    run.commits.push(next.clone());
                    let window = super::super::takeover::COMMIT_WINDOW as usize;
                    let deposed = rules.fenced
                        && log.scan(log.slots.len().saturating_sub(window)).1 > next.epoch;
                    if !deposed {
                        owners[*owner] = Some((next, state));
                    }
                }
                Step::Compact => log.compact(rules),
            }
        }
        run
    }

    const AS_BUILT: Rules = Rules {
        fenced: true,
        key_by_epoch: true,
    };

    proptest! {
        /// Whatever the owners, zombies and compaction do, every commit
        /// restores exactly the state its owner had, and no epoch is
        /// claimed twice.
        #[test]
        fn every_commit_restores_its_owners_state_despite_zombies_and_compaction(steps in proptest::collection::vec(step(), 1..60)) {
            let run = simulate(&steps, AS_BUILT);
            prop_assert!(run.violations.is_empty(), "{:?}", run.violations);
        }
    }

    /// The failure the fence and the epoch in the key prevent, step by
    /// step: a zombie's late commits hide the claim that deposed it from
    /// the window (or compaction removes the claim), the next owner reuses
    /// the claim's epoch, and its lineage accepts the earlier owner's
    /// records of that epoch.
    #[test]
    fn a_zombie_cannot_hide_a_claim_from_the_next_owner() {
        let flush = |owner, key| Step::Flush {
            owner,
            writes: vec![(key, Some(owner as u8 + 1))],
            dies_before_commit: false,
        };
        let zombie = |n| vec![flush(0, 1); n];
        let claim = |owner| Step::Claim { owner };
        let hidden_by_late_commits: Vec<Step> = [
            vec![claim(0), flush(0, 0), claim(1), flush(1, 0)],
            zombie(4),
            vec![claim(2), flush(2, 2)],
        ]
        .concat();
        let compacted_away: Vec<Step> = [
            vec![claim(0), flush(0, 0), claim(1), flush(1, 0)],
            zombie(1),
            vec![Step::Compact, claim(2), flush(2, 2)],
        ]
        .concat();
        for (steps, without) in [
            (
                &hidden_by_late_commits,
                Rules {
                    fenced: false,
                    key_by_epoch: true,
                },
            ),
            (
                &compacted_away,
                Rules {
                    fenced: true,
                    key_by_epoch: false,
                },
            ),
        ] {
            assert!(!simulate(steps, without).violations.is_empty(), "{steps:?}");
            let run = simulate(steps, AS_BUILT);
            assert!(run.violations.is_empty(), "{:?}", run.violations);
        }
    }

    proptest! {
        /// What a standby does: from a commit it holds, read the changelog
        /// between the two commits' ends and apply what the newer accepts.
        /// That must equal a full restore whenever the newer commit extends
        /// the older one (otherwise the standby restores in full).
        #[test]
        fn following_a_changelog_between_commits_equals_a_restore(steps in proptest::collection::vec(step(), 1..40)) {
            let Run { changelog, commits, .. } = simulate(&steps, AS_BUILT);
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
        let first = Commit::empty()
            .claim(1)
            .next_flush(Some(10))
            .next_flush(Some(20));
        assert!(first.accepts(1, 2) && first.accepts(1, 1) && !first.accepts(1, 3));
        // A new owner continues from the first owner's second flush; the
        // first owner's third flush (unfinished, or written after it was
        // deposed) is not part of the new owner's state.
        let second = first.claim(2).next_flush(Some(35));
        assert!(second.accepts(1, 2) && !second.accepts(1, 3));
        assert!(second.accepts(2, 1) && !second.accepts(2, 2));
        assert_eq!(second.next_offset, Some(35));
        assert!(!Commit::empty().accepts(0, 0));
    }

    #[test]
    fn a_state_extends_its_ancestors_but_not_a_deposed_owners_later_flushes() {
        let first = Commit::empty().claim(1).next_flush(Some(10));
        let zombie = first.next_flush(Some(20));
        let second = first.claim(2).next_flush(Some(30));
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
        let busy = idle.next_flush(Some(5)).claim(4).claim(5);
        assert_eq!(busy.lineage.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
        assert!(busy.accepts(3, 1));
    }
}
