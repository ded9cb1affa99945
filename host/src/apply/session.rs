//! Session windows of one key in one batch: which sessions the batch's
//! records make, extend or merge, and which records are late.
//!
//! The rules are Kafka Streams': a record at time `t` joins every session
//! of its key that ends at or after `t - gap` and starts at or before
//! `t + gap` — all of them become one session, `[earliest start, latest
//! end]` — or starts a session `[t, t]` of its own. The record is late (not
//! applied) when the session it would make is closed at the stream time
//! its partition had when it arrived. Records are taken one by one in
//! partition order, so the outcome is the one a record-at-a-time processor
//! would reach, and the same after a crash and a replay.
//!
//! This module only plans: the applier loads the stored states, merges
//! those of sessions that became one with the plugin's `merge`, and hands
//! each planned session's records to the plugin in one call.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::config::{Window, WindowConfig};

/// A record of the batch for a session-windowed key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival<R> {
    pub(super) record: R,
    /// Its event time.
    pub(super) time: i64,
    /// Its partition's stream time once it arrived (itself included).
    pub(super) stream_time: i64,
}

/// A session of the key as stored before the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StoredSession {
    /// Its key within the slot.
    pub(super) key: Vec<u8>,
    pub(super) window: Window,
}

/// A session the batch writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlannedSession<R> {
    pub(super) window: Window,
    /// The stored sessions it is made of, in start order: their states,
    /// merged, are its state before `records` (none: a new session).
    pub(super) absorbed: Vec<StoredSession>,
    /// The batch's records in it, in arrival order.
    pub(super) records: Vec<R>,
}

impl<R> PlannedSession<R> {
    /// Whether it is one stored session with the same window: its state
    /// is updated in place, nothing is merged or moved.
    pub(super) fn in_place(&self) -> bool {
        matches!(self.absorbed.as_slice(), [only] if only.window == self.window)
    }
}

/// What the batch does to one key's sessions.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct KeyPlan<R> {
    /// Sessions with records of the batch; stored sessions that are not
    /// absorbed by one of them stay as they are.
    pub(super) sessions: Vec<PlannedSession<R>>,
    /// Records whose session had closed.
    pub(super) late: Vec<R>,
}

/// A session while planning: the batch's records go with their positions
/// in `arrivals`, so merged sessions keep arrival order.
struct Working {
    window: Window,
    absorbed: Vec<StoredSession>,
    records: Vec<usize>,
}

/// Plans the key's sessions after `arrivals` (in partition order), given
/// its `stored` sessions. `spec` must be a session window.
pub(super) fn plan<R: Copy>(
    spec: &WindowConfig,
    stored: Vec<StoredSession>,
    arrivals: &[Arrival<R>],
) -> KeyPlan<R> {
    let gap = spec.length();
    let mut sessions: Vec<Working> = stored
        .into_iter()
        .map(|session| Working {
            window: session.window,
            absorbed: vec![session],
            records: Vec::new(),
        })
        .collect();
    let mut late = Vec::new();
    for (position, arrival) in arrivals.iter().enumerate() {
        let t = arrival.time;
        let joins = |window: &Window| {
            window.end >= t.saturating_sub(gap) && window.start <= t.saturating_add(gap)
        };
        let merged = sessions.iter().filter(|s| joins(&s.window)).fold(
            Window { start: t, end: t },
            |w, s| Window {
                start: w.start.min(s.window.start),
                end: w.end.max(s.window.end),
            },
        );
        if spec.closed(merged, arrival.stream_time) {
            late.push(arrival.record);
            continue;
        }
        let mut joined = Working {
            window: merged,
            absorbed: Vec::new(),
            records: Vec::new(),
        };
        sessions.retain_mut(|s| {
            if !joins(&s.window) {
                return true;
            }
            joined.absorbed.append(&mut s.absorbed);
            joined.records.append(&mut s.records);
            false
        });
        joined.absorbed.sort_by_key(|s| s.window.start);
        joined.records.sort_unstable();
        joined.records.push(position);
        sessions.push(joined);
    }
    let mut planned: Vec<PlannedSession<R>> = sessions
        .into_iter()
        .filter(|s| !s.records.is_empty())
        .map(|s| PlannedSession {
            window: s.window,
            absorbed: s.absorbed,
            records: s.records.iter().map(|&i| arrivals[i].record).collect(),
        })
        .collect();
    planned.sort_by_key(|s| s.window.start);
    KeyPlan {
        sessions: planned,
        late,
    }
}

/// The sessions of recently used keys, so that placing a record need not
/// read RocksDB: the key in its slot (`slot ‖ key`) → its sessions as of
/// the batches applied so far. The applier keeps it in step (a batch's
/// sessions once the batch succeeded; a sweep forgets the keys it deletes
/// from); any entry may be dropped at any time, as it is read again from
/// the store and the cache's unwritten states.
#[derive(Debug)]
pub(super) struct SessionIndex {
    entries: HashMap<Vec<u8>, Vec<StoredSession>, RandomState>,
    capacity: usize,
}

impl SessionIndex {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::default(),
            capacity: capacity.max(1),
        }
    }

    pub(super) fn get(&self, slot_key: &[u8]) -> Option<&[StoredSession]> {
        self.entries.get(slot_key).map(Vec::as_slice)
    }

    /// Records a key's sessions; over capacity, a quarter of the entries
    /// (arbitrary ones: the map's order) make room.
    pub(super) fn set(&mut self, slot_key: Vec<u8>, sessions: Vec<StoredSession>) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&slot_key) {
            let mut drop = self.capacity / 4 + 1;
            self.entries.retain(|_, _| {
                drop = drop.saturating_sub(1);
                drop == 0
            });
        }
        self.entries.insert(slot_key, sessions);
    }

    pub(super) fn forget(&mut self, slot_key: &[u8]) {
        self.entries.remove(slot_key);
    }

    /// Forgets the keys of a slot (`prefix`: the slot's store-key prefix).
    pub(super) fn forget_prefix(&mut self, prefix: &[u8]) {
        self.entries.retain(|key, _| !key.starts_with(prefix));
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Span;
    use proptest::prelude::*;

    fn spec(gap: u64, grace: u64) -> WindowConfig {
        WindowConfig::Session {
            gap: Span::from_millis(gap),
            grace: Span::from_millis(grace),
            retention: Span::from_millis(u64::MAX / 4),
        }
    }

    /// Arrivals at `times` (each record is its index), stream time
    /// following them.
    fn arrivals(times: &[i64]) -> Vec<Arrival<usize>> {
        let mut stream_time = i64::MIN;
        times
            .iter()
            .enumerate()
            .map(|(record, &time)| {
                stream_time = stream_time.max(time);
                Arrival {
                    record,
                    time,
                    stream_time,
                }
            })
            .collect()
    }

    fn stored(start: i64, end: i64) -> StoredSession {
        StoredSession {
            key: format!("{start}-{end}").into_bytes(),
            window: Window { start, end },
        }
    }

    #[test]
    fn a_record_between_two_sessions_merges_them() {
        let plan = plan(
            &spec(10, 100),
            vec![stored(0, 5), stored(20, 30)],
            &arrivals(&[12]),
        );
        assert_eq!(plan.late, Vec::<usize>::new());
        assert_eq!(
            plan.sessions,
            [PlannedSession {
                window: Window { start: 0, end: 30 },
                absorbed: vec![stored(0, 5), stored(20, 30)],
                records: vec![0],
            }]
        );
        assert!(!plan.sessions[0].in_place());
    }

    #[test]
    fn a_record_inside_a_session_updates_it_in_place_and_far_ones_start_their_own() {
        let plan = plan(&spec(10, 100), vec![stored(0, 5)], &arrivals(&[3, 40, 5]));
        assert_eq!(plan.sessions.len(), 2);
        assert!(plan.sessions[0].in_place());
        assert_eq!(plan.sessions[0].records, [0, 2]);
        assert_eq!(plan.sessions[1].window, Window { start: 40, end: 40 });
        assert!(plan.sessions[1].absorbed.is_empty());
    }

    #[test]
    fn a_record_is_late_only_when_the_session_it_would_make_is_closed() {
        // Gap 10, grace 5: at stream time 100, a session ending at 84 has
        // closed (100 > 84 + 15); one ending at 85 has not.
        let at_100 = |time| Arrival {
            record: 0,
            time,
            stream_time: 100,
        };
        assert_eq!(plan(&spec(10, 5), vec![], &[at_100(84)]).late, [0]);
        assert!(plan(&spec(10, 5), vec![], &[at_100(85)]).late.is_empty());
        // An old record joining a session still open is on time (Kafka
        // Streams checks the merged session).
        let joined = plan(&spec(10, 5), vec![stored(80, 90)], &[at_100(71)]);
        assert!(joined.late.is_empty());
        assert_eq!(joined.sessions[0].window, Window { start: 71, end: 90 });
    }

    /// Sessions with no lateness are the runs of the sorted times whose
    /// neighbours are at most `gap` apart — whatever the arrival order,
    /// and however the times were split between stored sessions and the
    /// batch.
    fn runs(mut times: Vec<i64>, gap: i64) -> Vec<Window> {
        times.sort_unstable();
        let mut runs: Vec<Window> = Vec::new();
        for t in times {
            match runs.last_mut() {
                Some(last) if t - last.end <= gap => last.end = t,
                _ => runs.push(Window { start: t, end: t }),
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn without_lateness_sessions_are_the_runs_of_the_times_within_gap(
            earlier in proptest::collection::vec(-200i64..200, 0..12),
            batch in proptest::collection::vec(-200i64..200, 1..24),
            gap in 1i64..40,
        ) {
            let spec = spec(gap as u64, u64::MAX / 8);
            // The earlier records, planned alone, are what is stored.
            let before = plan(&spec, vec![], &arrivals(&earlier));
            let stored: Vec<StoredSession> = before
                .sessions
                .iter()
                .map(|s| stored(s.window.start, s.window.end))
                .collect();
            prop_assert_eq!(
                stored.iter().map(|s| s.window).collect::<Vec<_>>(),
                runs(earlier.clone(), gap)
            );
            let after = plan(&spec, stored.clone(), &arrivals(&batch));
            prop_assert!(after.late.is_empty());
            // Untouched stored sessions plus the planned ones: the runs of
            // every time.
            let absorbed: Vec<&StoredSession> =
                after.sessions.iter().flat_map(|s| &s.absorbed).collect();
            let mut windows: Vec<Window> = stored
                .iter()
                .filter(|s| !absorbed.contains(s))
                .map(|s| s.window)
                .chain(after.sessions.iter().map(|s| s.window))
                .collect();
            windows.sort();
            let every: Vec<i64> = earlier.iter().chain(&batch).copied().collect();
            prop_assert_eq!(windows, runs(every, gap));
            // Each batch record in exactly one session that covers it, in
            // arrival order.
            let mut seen: Vec<usize> = Vec::new();
            for session in &after.sessions {
                prop_assert!(session.records.windows(2).all(|w| w[0] < w[1]));
                for &record in &session.records {
                    prop_assert!(session.window.start <= batch[record] && batch[record] <= session.window.end);
                }
                seen.extend(&session.records);
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..batch.len()).collect::<Vec<_>>());
        }
    }
}
