use super::*;
use serde::Deserialize;
use wagg_abi::{BatchEncoder, ResultDecoder};

/// Sums `/n`; rejects negative numbers; deletes the key when the sum hits
/// `delete_at`.
struct Sum;

#[derive(Default, Serialize, serde::Deserialize, Debug, PartialEq)]
struct Total {
    sum: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SumParams {
    delete_at: i64,
}

impl Aggregation for Sum {
    const NAME: &'static str = "sum-test";
    type State = Total;
    type Params = SumParams;

    fn validate(params: &SumParams) -> Result<()> {
        if params.delete_at <= 0 {
            bail!("`delete_at` must be positive, got {}", params.delete_at);
        }
        Ok(())
    }

    fn aggregate(state: &mut Total, record: &Record<'_>, _params: &SumParams) -> Result<()> {
        // Mutate before validating, as careless plugins do: the runner must
        // not keep this partial effect of a rejected record.
        state.sum += 1000;
        state.sum -= 1000;
        if record.value() == Some(b"poison".as_slice()) {
            state.sum += 999;
            bail!("poison");
        }
        let n: i64 = record.value_json::<serde_json::Value>()?["n"]
            .as_i64()
            .ok_or_else(|| Error::msg("no n"))?;
        if n < 0 {
            bail!("negative n {n} at offset {}", record.offset());
        }
        state.sum += n;
        Ok(())
    }

    fn keep(state: &Total, params: &SumParams) -> bool {
        state.sum != params.delete_at
    }
}

/// `(key, stored state, record values)` per group.
type Groups<'a> = [(&'a str, Option<&'a [u8]>, &'a [&'a str])];

/// Per group: the state change (`None` unchanged, `Some(None)` deleted) and
/// the failure.
type Outcomes = Vec<(Option<Option<Total>>, Option<(u32, String)>)>;

fn batch(groups: &Groups<'_>) -> Vec<u8> {
    let mut encoder = BatchEncoder::new();
    let mut offset = 0;
    for (key, state, values) in groups {
        encoder.begin_group(key.as_bytes(), *state);
        for value in *values {
            encoder.push_record(&wagg_abi::Record {
                key: Some(key.as_bytes()),
                value: Some(value.as_bytes()),
                timestamp: None,
                partition: 0,
                offset,
                headers: Headers::EMPTY,
            });
            offset += 1;
        }
    }
    encoder.finish().to_vec()
}

/// Decodes a result into (state, failure) per group, states decoded.
fn outcomes(bytes: &[u8]) -> Outcomes {
    let mut decoder = ResultDecoder::new(bytes).unwrap();
    let mut out = Vec::new();
    while let Some(group) = decoder.next_group() {
        let group = group.unwrap();
        let change = match group.change {
            StateChange::Unchanged => None,
            StateChange::Set(state) => Some(Some(postcard::from_bytes(state).unwrap())),
            StateChange::Delete => Some(None),
        };
        let failure = group
            .failure
            .map(|f| (f.index, String::from_utf8(f.message.to_vec()).unwrap()));
        out.push((change, failure));
    }
    out
}

fn configured() -> Runner<Sum> {
    let runner = Runner::<Sum>::new();
    runner.configure(r#"{"delete_at": 100}"#).unwrap();
    runner
}

#[test]
fn applies_groups_starting_from_stored_state() {
    let runner = configured();
    let stored = postcard::to_allocvec(&Total { sum: 10 }).unwrap();
    let result = runner
        .apply(&batch(&[
            ("a", None, &[r#"{"n":1}"#, r#"{"n":2}"#]),
            ("b", Some(&stored), &[r#"{"n":5}"#]),
        ]))
        .unwrap();
    assert_eq!(
        outcomes(&result),
        vec![
            (Some(Some(Total { sum: 3 })), None),
            (Some(Some(Total { sum: 15 })), None)
        ]
    );
}

#[test]
fn a_failing_record_is_reported_with_its_index_and_earlier_records_kept() {
    let runner = configured();
    let result = runner
        .apply(&batch(&[
            ("a", None, &[r#"{"n":1}"#, r#"{"n":-4}"#, r#"{"n":2}"#]),
            ("b", None, &[r#"not json"#]),
            ("c", None, &[r#"{"n":7}"#]),
        ]))
        .unwrap();
    assert_eq!(
        outcomes(&result),
        vec![
            (
                Some(Some(Total { sum: 1 })),
                Some((1, "negative n -4 at offset 1".to_owned()))
            ),
            (
                None,
                Some((
                    0,
                    "value is not valid JSON: expected ident at line 1 column 2".to_owned()
                ))
            ),
            (Some(Some(Total { sum: 7 })), None),
        ]
    );
}

#[test]
fn a_rejected_record_leaves_no_partial_effect() {
    let runner = configured();
    let result = runner
        .apply(&batch(&[(
            "a",
            None,
            &[r#"{"n":1}"#, "poison", r#"{"n":2}"#],
        )]))
        .unwrap();
    assert_eq!(
        outcomes(&result),
        vec![(Some(Some(Total { sum: 1 })), Some((1, "poison".to_owned())))]
    );
}

#[test]
fn keep_false_deletes_the_key() {
    let runner = configured();
    let result = runner
        .apply(&batch(&[("a", None, &[r#"{"n":60}"#, r#"{"n":40}"#])]))
        .unwrap();
    assert_eq!(outcomes(&result), vec![(Some(None), None)]);
}

#[test]
fn corrupt_state_fails_the_group_without_touching_it() {
    let runner = configured();
    let result = runner
        .apply(&batch(&[("a", Some(&[0xff, 0xff, 0xff]), &[r#"{"n":1}"#])]))
        .unwrap();
    let outcome = outcomes(&result);
    assert_eq!(outcome[0].0, None);
    let (index, message) = outcome[0].1.clone().unwrap();
    assert_eq!(index, 0);
    assert!(
        message.starts_with("stored state could not be decoded as state format 1 of `sum-test`"),
        "{message}"
    );
}

#[test]
fn params_are_parsed_and_validated() {
    let runner = Runner::<Sum>::new();
    assert_eq!(
        runner.apply(&batch(&[])),
        Err("apply called before configure".to_owned())
    );
    let err = runner.configure(r#"{"delete_at": 0}"#).unwrap_err();
    assert_eq!(
        err,
        "invalid params for `sum-test`: `delete_at` must be positive, got 0"
    );
    let err = runner
        .configure(r#"{"delete_at": 1, "typo": 2}"#)
        .unwrap_err();
    assert!(err.contains("unknown field `typo`"), "{err}");
    let err = runner.configure(r#"{}"#).unwrap_err();
    assert!(err.contains("missing field `delete_at`"), "{err}");
}

#[test]
fn garbage_batches_are_errors_not_panics() {
    let runner = configured();
    let err = runner.apply(&[1, 5, 0, 0, 0, 1]).unwrap_err();
    assert!(err.starts_with("batch could not be decoded"), "{err}");
}

#[test]
fn render_uses_json_of_the_state() {
    let runner = configured();
    let state = postcard::to_allocvec(&Total { sum: 42 }).unwrap();
    assert_eq!(runner.render(&state).unwrap(), r#"{"sum":42}"#);
    assert!(runner.render(&[0xff]).is_err());
}

#[test]
fn no_params_accepts_only_an_empty_table() {
    assert!(serde_json::from_str::<NoParams>("{}").is_ok());
    assert!(serde_json::from_str::<NoParams>(r#"{"x":1}"#).is_err());
}

/// What `docs/plugin-guide.md` says about changing a state: postcard is
/// positional, so a new field breaks old states even with
/// `#[serde(default)]`, while a state enum can gain variants at the end.
#[test]
fn state_evolution_follows_the_plugin_guide() {
    #[derive(Serialize, serde::Deserialize)]
    struct V1 {
        total: f64,
    }
    #[derive(serde::Deserialize, Debug)]
    struct V1WithNewField {
        #[allow(dead_code)]
        total: f64,
        #[serde(default)]
        #[allow(dead_code)]
        largest: f64,
    }
    let old = postcard::to_allocvec(&V1 { total: 1.5 }).unwrap();
    assert!(
        postcard::from_bytes::<V1WithNewField>(&old).is_err(),
        "postcard now reads missing trailing fields: update the plugin guide"
    );

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    enum Versioned1 {
        V1 { total: f64 },
    }
    #[derive(serde::Deserialize, Debug, PartialEq)]
    enum Versioned2 {
        V1 { total: f64 },
        V2 { total: f64, largest: f64 },
    }
    let old = postcard::to_allocvec(&Versioned1::V1 { total: 1.5 }).unwrap();
    assert_eq!(
        postcard::from_bytes::<Versioned2>(&old).unwrap(),
        Versioned2::V1 { total: 1.5 }
    );
}

/// `Sum` with its total widened to a float and a count added: state
/// format 2, migrating from `Sum`'s format 1.
struct SumV2;

#[derive(Default, Serialize, serde::Deserialize, Debug, PartialEq)]
struct TotalV2 {
    sum: f64,
    records: u64,
}

impl Aggregation for SumV2 {
    const NAME: &'static str = "sum-test";
    const STATE_FORMAT: u32 = 2;
    const MIGRATES_FROM: &'static [u32] = &[1];
    const MERGES: bool = true;
    type State = TotalV2;
    type Params = NoParams;

    fn merge(a: TotalV2, b: TotalV2, _params: &NoParams) -> Result<TotalV2> {
        Ok(TotalV2 {
            sum: a.sum + b.sum,
            records: a.records + b.records,
        })
    }

    fn migrate(_from_format: u32, state: &[u8]) -> Result<TotalV2> {
        let old: Total = decode_previous(state)?;
        Ok(TotalV2 {
            sum: old.sum as f64,
            records: 0,
        })
    }

    fn aggregate(state: &mut TotalV2, _record: &Record<'_>, _params: &NoParams) -> Result<()> {
        state.records += 1;
        Ok(())
    }
}

#[test]
fn migrate_turns_a_listed_old_format_into_the_new_state_and_refuses_the_rest() {
    let runner = Runner::<SumV2>::new();
    runner.configure("{}").unwrap();
    let old = postcard::to_allocvec(&Total { sum: 42 }).unwrap();
    let migrated = runner.migrate(1, &old).unwrap();
    assert_eq!(
        postcard::from_bytes::<TotalV2>(&migrated).unwrap(),
        TotalV2 {
            sum: 42.0,
            records: 0
        }
    );
    let unknown = runner.migrate(3, &old).unwrap_err();
    assert!(
        unknown.contains("does not migrate from state format 3"),
        "{unknown}"
    );
    let garbage = runner.migrate(1, &[0xff; 12]).unwrap_err();
    assert!(garbage.contains("old state"), "{garbage}");
    // A plugin that lists nothing migrates nothing.
    let plain = Runner::<Sum>::new();
    assert!(plain.migrate(1, &old).is_err());
}

#[test]
fn merge_combines_two_encoded_states_and_is_refused_by_plugins_that_do_not_merge() {
    let runner = Runner::<SumV2>::new();
    assert!(runner.merge(&[], &[]).is_err(), "before configure");
    runner.configure("{}").unwrap();
    let a = postcard::to_allocvec(&TotalV2 {
        sum: 1.5,
        records: 2,
    })
    .unwrap();
    let b = postcard::to_allocvec(&TotalV2 {
        sum: 2.0,
        records: 3,
    })
    .unwrap();
    let merged = runner.merge(&a, &b).unwrap();
    assert_eq!(
        postcard::from_bytes::<TotalV2>(&merged).unwrap(),
        TotalV2 {
            sum: 3.5,
            records: 5
        }
    );
    assert!(
        runner
            .merge(&a, &[0xff; 3])
            .unwrap_err()
            .contains("could not be decoded")
    );
    let plain = Runner::<Sum>::new();
    plain.configure(r#"{"delete_at": 5}"#).unwrap();
    let refused = plain.merge(&a, &b).unwrap_err();
    assert!(refused.contains("does not merge"), "{refused}");
}
