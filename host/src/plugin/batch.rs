//! Applying grouped records through a plugin: encoding, checking what the
//! plugin returns, isolating the record behind a trap, and carrying on past
//! rejected records when the caller's policy says so.

use wagg_abi::{ResultDecoder, StateChange};

use super::error::CallError;
use super::instance::{PluginInstance, truncate};
use crate::config::OnError;
use crate::record::SourceRecord;

/// One key's input to a call: its current state and its records in order.
#[derive(Debug, Clone, Copy)]
pub struct GroupInput<'a> {
    pub key: &'a [u8],
    pub state: Option<&'a [u8]>,
    pub records: &'a [&'a SourceRecord],
}

/// What a group did to its key's state, relative to the state passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    Set(Vec<u8>),
    Delete,
}

impl Change {
    /// The state after this change, given the state before it.
    pub fn resolve<'a>(&'a self, before: Option<&'a [u8]>) -> Option<&'a [u8]> {
        match self {
            Change::Unchanged => before,
            Change::Set(state) => Some(state),
            Change::Delete => None,
        }
    }

    /// This change followed by `later`.
    fn then(self, later: Change) -> Change {
        match later {
            Change::Unchanged => self,
            other => other,
        }
    }
}

/// A record a plugin rejected (returned an error for, or trapped on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Index of the record within its group's `records`.
    pub index: usize,
    pub message: String,
}

/// The outcome of one group: its change covers exactly the records before
/// `failure.index` (all of them without a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    pub change: Change,
    pub failure: Option<Failure>,
}

/// The outcome of a whole batch under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// One change per input group.
    pub changes: Vec<Change>,
    /// Every rejected record as `(group index, record index, failure)`.
    pub failures: Vec<(usize, Failure)>,
}

impl PluginInstance {
    /// One plugin call for `groups`; the result is checked against the input
    /// (group count, failure indexes, state size cap).
    pub fn apply_groups(
        &mut self,
        groups: &[GroupInput<'_>],
    ) -> Result<Vec<GroupOutcome>, CallError> {
        let mut encoder = std::mem::take(&mut self.encoder);
        encoder.clear();
        for group in groups {
            encoder.begin_group(group.key, group.state);
            for record in group.records {
                encoder.push_record_with_headers(
                    &record.as_abi(),
                    record
                        .headers
                        .iter()
                        .map(|(name, value)| (name.as_str(), value.as_deref())),
                );
            }
        }
        let output = self.apply_raw(encoder.finish());
        self.encoder = encoder;
        self.check_output(groups, &output?)
    }

    fn check_output(
        &self,
        groups: &[GroupInput<'_>],
        output: &[u8],
    ) -> Result<Vec<GroupOutcome>, CallError> {
        let plugin = self.plugin();
        let bad = |message: String| CallError::BadOutput {
            plugin: plugin.label(),
            message,
        };
        let mut decoder = ResultDecoder::new(output).map_err(|e| bad(e.to_string()))?;
        if decoder.group_count() as usize != groups.len() {
            return Err(bad(format!(
                "{} group results for {} groups",
                decoder.group_count(),
                groups.len()
            )));
        }
        let limit = plugin.limits().max_state_bytes;
        let mut outcomes = Vec::with_capacity(groups.len());
        for group in groups {
            let result = match decoder.next_group() {
                Some(result) => result.map_err(|e| bad(e.to_string()))?,
                None => return Err(bad("fewer group results than announced".into())),
            };
            let change = match result.change {
                StateChange::Unchanged => Change::Unchanged,
                StateChange::Delete => Change::Delete,
                StateChange::Set(state) if state.len() > limit => {
                    return Err(CallError::StateTooLarge {
                        plugin: plugin.label(),
                        size: state.len(),
                        limit,
                    });
                }
                StateChange::Set(state) => Change::Set(state.to_vec()),
            };
            let failure = match result.failure {
                None => None,
                Some(f) if (f.index as usize) < group.records.len() => Some(Failure {
                    index: f.index as usize,
                    message: truncate(String::from_utf8_lossy(f.message).into_owned()),
                }),
                Some(f) => {
                    return Err(bad(format!(
                        "failure at record {} of a group of {}",
                        f.index,
                        group.records.len()
                    )));
                }
            };
            outcomes.push(GroupOutcome { change, failure });
        }
        if let Some(Err(e)) = decoder.next_group() {
            return Err(bad(e.to_string()));
        }
        Ok(outcomes)
    }

    /// Like [`apply_groups`](Self::apply_groups), but a call that fails as a
    /// whole (trap, timeout, memory cap, oversized state, garbage output) is
    /// bisected until the record that causes it is found; that record is then
    /// reported as a [`Failure`] like any rejected record, and every other
    /// record is applied.
    ///
    /// A record that makes the plugin fail costs about `log2(records)` extra
    /// calls (each up to the call time budget for a loop).
    pub fn apply_isolating(
        &mut self,
        groups: &[GroupInput<'_>],
    ) -> Result<Vec<GroupOutcome>, CallError> {
        let error = match self.apply_groups(groups) {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if !e.may_be_caused_by_a_record() => return Err(e),
            Err(e) => e,
        };
        match groups {
            [] => Err(error),
            [single] if single.records.len() <= 1 => Ok(vec![GroupOutcome {
                change: Change::Unchanged,
                failure: Some(Failure {
                    index: 0,
                    message: error.to_string(),
                }),
            }]),
            [single] => {
                let (left, right) = single.records.split_at(single.records.len() / 2);
                let first = self.apply_one(GroupInput {
                    records: left,
                    ..*single
                })?;
                if first.failure.is_some() {
                    return Ok(vec![first]);
                }
                let second = self.apply_one(GroupInput {
                    state: first.change.resolve(single.state),
                    records: right,
                    ..*single
                })?;
                Ok(vec![GroupOutcome {
                    change: first.change.clone().then(second.change),
                    failure: second.failure.map(|f| Failure {
                        index: f.index + left.len(),
                        ..f
                    }),
                }])
            }
            _ => {
                let (left, right) = groups.split_at(groups.len() / 2);
                let mut outcomes = self.apply_isolating(left)?;
                outcomes.extend(self.apply_isolating(right)?);
                Ok(outcomes)
            }
        }
    }

    fn apply_one(&mut self, group: GroupInput<'_>) -> Result<GroupOutcome, CallError> {
        let mut outcomes = self.apply_isolating(&[group])?;
        match outcomes.pop() {
            Some(outcome) if outcomes.is_empty() => Ok(outcome),
            _ => unreachable!("apply_isolating returns one outcome per group"),
        }
    }

    /// Applies a batch, isolating failing records; when `on_error`
    /// [applies the rest](OnError::applies_the_rest), the records after a
    /// failed one are applied too (each group resumes from its state just
    /// before the failure).
    pub fn apply_batch(
        &mut self,
        groups: &[GroupInput<'_>],
        on_error: OnError,
    ) -> Result<BatchOutcome, CallError> {
        // The first round is the whole batch as given: no copies.
        let outcomes = self.apply_isolating(groups)?;
        let mut changes = Vec::with_capacity(groups.len());
        let mut failures = Vec::new();
        // (group index, index of its first record in the next round)
        let mut pending: Vec<(usize, usize)> = Vec::new();
        for (g, outcome) in outcomes.into_iter().enumerate() {
            changes.push(outcome.change);
            if let Some(failure) = outcome.failure {
                if on_error.applies_the_rest() && failure.index + 1 < groups[g].records.len() {
                    pending.push((g, failure.index + 1));
                }
                failures.push((g, failure));
            }
        }
        // Later rounds resume each group after its rejected record, from its
        // state just before that record.
        while !pending.is_empty() {
            let round_states: Vec<Option<Vec<u8>>> = pending
                .iter()
                .map(|&(g, _)| changes[g].resolve(groups[g].state).map(<[u8]>::to_vec))
                .collect();
            let inputs: Vec<GroupInput<'_>> = pending
                .iter()
                .zip(&round_states)
                .map(|(&(g, start), state)| GroupInput {
                    key: groups[g].key,
                    state: state.as_deref(),
                    records: &groups[g].records[start..],
                })
                .collect();
            let outcomes = self.apply_isolating(&inputs)?;
            let mut next = Vec::new();
            for (&(g, start), outcome) in pending.iter().zip(outcomes) {
                changes[g] =
                    std::mem::replace(&mut changes[g], Change::Unchanged).then(outcome.change);
                if let Some(failure) = outcome.failure {
                    let index = start + failure.index;
                    failures.push((g, Failure { index, ..failure }));
                    if on_error.applies_the_rest() && index + 1 < groups[g].records.len() {
                        next.push((g, index + 1));
                    }
                }
            }
            pending = next;
        }
        Ok(BatchOutcome { changes, failures })
    }
}
