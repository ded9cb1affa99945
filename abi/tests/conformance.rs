//! Generates the ABI conformance vectors, `abi/conformance/vectors.jsonl`,
//! from this crate (the reference encoder) and a model of the conformance
//! probe plugin (`plugins/testing/conformance`), and fails when the file in
//! the repository differs: run with `WAGG_BLESS=1` to rewrite it after a
//! deliberate change. `wagg plugin test --conformance` runs the vectors
//! against any probe component.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use wagg_abi::{BatchEncoder, Headers, Record};

/// A record as a vector describes it.
#[derive(Clone)]
struct Rec {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: Option<i64>,
    partition: i32,
    offset: i64,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The state a group is sent with.
#[derive(Clone)]
enum StateIn {
    /// A key the plugin has no state for.
    Absent,
    /// The state the plugin returned for this key in an earlier step.
    Carried,
    /// Bytes no SDK can decode as the probe's state.
    Raw(Vec<u8>),
}

struct Group {
    key: Vec<u8>,
    state: StateIn,
    records: Vec<Rec>,
}

fn rec(key: &[u8], value: &[u8], offset: i64) -> Rec {
    Rec {
        key: Some(key.to_vec()),
        value: Some(value.to_vec()),
        timestamp: Some(1_700_000_000_000 + offset),
        partition: 0,
        offset,
        headers: Vec::new(),
    }
}

fn group(key: &[u8], state: StateIn, records: Vec<Rec>) -> Group {
    Group {
        key: key.to_vec(),
        state,
        records,
    }
}

fn hex(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "-".to_owned(),
        Some(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn hex_json(bytes: Option<&[u8]>) -> Value {
    bytes.map_or(Value::Null, |b| Value::String(hex(Some(b))))
}

/// The probe's line for a record (independent of every SDK).
fn line(r: &Rec) -> String {
    let headers: Vec<String> = r
        .headers
        .iter()
        .map(|(name, value)| format!("{name}={}", hex(value.as_deref())))
        .collect();
    format!(
        "p{}@{} k={} v={} t={} h=[{}]",
        r.partition,
        r.offset,
        hex(r.key.as_deref()),
        hex(r.value.as_deref()),
        r.timestamp
            .map_or_else(|| "-".to_owned(), |t| t.to_string()),
        headers.join(",")
    )
}

/// What the probe must answer for `group`, given the model's states.
fn expect(group: &Group, model: &mut BTreeMap<Vec<u8>, Vec<String>>) -> Value {
    let mut lines = match &group.state {
        StateIn::Absent => Vec::new(),
        StateIn::Carried => model
            .get(&group.key)
            .cloned()
            .expect("carried state exists"),
        StateIn::Raw(_) => {
            return json!({
                "change": "unchanged",
                "failure": { "index": 0, "message_prefix": "stored state could not be decoded" },
            });
        }
    };
    let mut applied = 0;
    let mut failure = Value::Null;
    for r in &group.records {
        match r.value.as_deref() {
            Some(b"reject") => {
                failure = json!({ "index": applied, "message": format!("rejected p{}@{}", r.partition, r.offset) });
                break;
            }
            Some(b"delete") => lines.clear(),
            _ => lines.push(line(r)),
        }
        applied += 1;
    }
    if applied == 0 {
        return json!({ "change": "unchanged", "failure": failure });
    }
    if lines.is_empty() {
        model.remove(&group.key);
        return json!({ "change": "delete", "failure": failure });
    }
    let render = json!({ "records": lines });
    model.insert(group.key.clone(), lines);
    json!({ "change": "set", "render": render, "failure": failure })
}

fn encode(groups: &[Group]) -> Option<String> {
    let mut encoder = BatchEncoder::new();
    for g in groups {
        let state = match &g.state {
            StateIn::Absent => None,
            StateIn::Carried => return None,
            StateIn::Raw(bytes) => Some(bytes.as_slice()),
        };
        encoder.begin_group(&g.key, state);
        for r in &g.records {
            let headers = r
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_deref()));
            encoder.push_record_with_headers(
                &Record {
                    key: r.key.as_deref(),
                    value: r.value.as_deref(),
                    timestamp: r.timestamp,
                    partition: r.partition,
                    offset: r.offset,
                    headers: Headers::EMPTY,
                },
                headers,
            );
        }
    }
    Some(hex(Some(encoder.finish())))
}

fn describe_group(g: &Group) -> Value {
    let state = match &g.state {
        StateIn::Absent => json!("absent"),
        StateIn::Carried => json!("carried"),
        StateIn::Raw(bytes) => json!({ "hex": hex(Some(bytes)) }),
    };
    let records: Vec<Value> = g
        .records
        .iter()
        .map(|r| {
            json!({
                "key": hex_json(r.key.as_deref()),
                "value": hex_json(r.value.as_deref()),
                "timestamp": r.timestamp,
                "partition": r.partition,
                "offset": r.offset,
                "headers": r.headers.iter().map(|(n, v)| json!([n, hex_json(v.as_deref())])).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "key": hex(Some(&g.key)), "state": state, "records": records })
}

/// Every case: `(name, what it checks, steps)`.
fn cases() -> Vec<(&'static str, &'static str, Vec<Vec<Group>>)> {
    let all_fields = Rec {
        key: Some(vec![0x00, 0xff, 0x80, b'k']),
        value: Some(vec![0xde, 0xad, 0x00, 0xbe, 0xef]),
        timestamp: Some(-1),
        partition: 7,
        offset: 1 << 40,
        headers: vec![
            ("trace".into(), Some(b"abc".to_vec())),
            ("trace".into(), None),
            ("bin\u{e9}".into(), Some(vec![0xff, 0x00])),
            ("empty".into(), Some(Vec::new())),
        ],
    };
    let bare = Rec {
        key: None,
        value: None,
        timestamp: None,
        partition: 2,
        offset: 0,
        headers: Vec::new(),
    };
    let mut other_key = rec(b"other", b"1", 5);
    other_key.key = Some(b"elsewhere".to_vec());
    let mut empty_key = rec(b"", b"2", 6);
    empty_key.key = Some(Vec::new());
    let mut empty_value = rec(b"g", b"", 7);
    empty_value.timestamp = Some(i64::from(i32::MAX) * 1000);
    let big_value = rec(b"big", &vec![0x5a; 4096], 8);
    vec![
        (
            "one-record",
            "batch size 1: one group, one record",
            vec![vec![group(b"a", StateIn::Absent, vec![rec(b"a", b"1", 0)])]],
        ),
        (
            "three-groups",
            "batch size 3: three groups, group order kept",
            vec![vec![
                group(b"c", StateIn::Absent, vec![rec(b"c", b"x", 1)]),
                group(b"a", StateIn::Absent, vec![rec(b"a", b"y", 2)]),
                group(b"b", StateIn::Absent, vec![rec(b"b", b"z", 3)]),
            ]],
        ),
        (
            "every-field",
            "binary key and value, negative timestamp, partition, 2^40 offset, repeated, valueless, non-ASCII and empty headers",
            vec![vec![group(
                &all_fields.key.clone().unwrap_or_default(),
                StateIn::Absent,
                vec![all_fields],
            )]],
        ),
        (
            "absent-fields",
            "null key (grouped under the empty key), tombstone, no timestamp, no headers",
            vec![vec![group(b"", StateIn::Absent, vec![bare])]],
        ),
        (
            "record-keys",
            "a record key other than the group key, an empty record key, an empty value",
            vec![vec![group(
                b"g",
                StateIn::Absent,
                vec![other_key, empty_key, empty_value],
            )]],
        ),
        (
            "big-value",
            "a 4 KiB value",
            vec![vec![group(b"big", StateIn::Absent, vec![big_value])]],
        ),
        (
            "big-group",
            "batch size 1000: one group of 1000 records",
            vec![vec![group(
                b"hot",
                StateIn::Absent,
                (0..1000)
                    .map(|i| rec(b"hot", format!("{i}").as_bytes(), i))
                    .collect(),
            )]],
        ),
        (
            "many-groups",
            "batch size 1000: 1000 groups of one record",
            vec![
                (0..1000)
                    .map(|i| {
                        let key = format!("k{i:04}");
                        group(
                            key.as_bytes(),
                            StateIn::Absent,
                            vec![rec(key.as_bytes(), b"1", i)],
                        )
                    })
                    .collect(),
            ],
        ),
        (
            "carried-state",
            "states returned by one call come back in the next; a key deleted in between starts again",
            vec![
                vec![
                    group(
                        b"a",
                        StateIn::Absent,
                        vec![rec(b"a", b"1", 0), rec(b"a", b"2", 1)],
                    ),
                    group(b"b", StateIn::Absent, vec![rec(b"b", b"1", 2)]),
                ],
                vec![
                    group(b"a", StateIn::Carried, vec![rec(b"a", b"3", 3)]),
                    group(b"b", StateIn::Carried, vec![rec(b"b", b"delete", 4)]),
                ],
                vec![
                    group(b"b", StateIn::Absent, vec![rec(b"b", b"5", 5)]),
                    group(b"a", StateIn::Carried, vec![rec(b"a", b"6", 6)]),
                ],
            ],
        ),
        (
            "rejected",
            "a rejected first record (unchanged), a rejected middle record (the records before it only), a rejection after a carried state",
            vec![
                vec![
                    group(
                        b"first",
                        StateIn::Absent,
                        vec![rec(b"first", b"reject", 0), rec(b"first", b"1", 1)],
                    ),
                    group(
                        b"middle",
                        StateIn::Absent,
                        vec![
                            rec(b"middle", b"1", 2),
                            rec(b"middle", b"2", 3),
                            rec(b"middle", b"reject", 4),
                            rec(b"middle", b"3", 5),
                        ],
                    ),
                    group(b"fine", StateIn::Absent, vec![rec(b"fine", b"1", 6)]),
                ],
                vec![group(
                    b"middle",
                    StateIn::Carried,
                    vec![rec(b"middle", b"4", 7), rec(b"middle", b"reject", 8)],
                )],
            ],
        ),
        (
            "deleted",
            "a key deleted by its last record, and one deleted then written again in one call",
            vec![vec![
                group(
                    b"gone",
                    StateIn::Absent,
                    vec![rec(b"gone", b"1", 0), rec(b"gone", b"delete", 1)],
                ),
                group(
                    b"back",
                    StateIn::Absent,
                    vec![rec(b"back", b"delete", 2), rec(b"back", b"3", 3)],
                ),
                group(b"only", StateIn::Absent, vec![rec(b"only", b"delete", 4)]),
            ]],
        ),
        (
            "undecodable-state",
            "an empty and a garbage stored state: the group fails at record 0 and changes nothing; other groups go on",
            vec![vec![
                group(
                    b"empty",
                    StateIn::Raw(Vec::new()),
                    vec![rec(b"empty", b"1", 0)],
                ),
                group(
                    b"garbage",
                    StateIn::Raw(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
                    vec![rec(b"garbage", b"1", 1)],
                ),
                group(b"fine", StateIn::Absent, vec![rec(b"fine", b"1", 2)]),
            ]],
        ),
    ]
}

fn vectors() -> String {
    let mut out = String::new();
    for (name, about, steps) in cases() {
        let mut model = BTreeMap::new();
        let steps: Vec<Value> = steps
            .iter()
            .map(|groups| {
                let expect: Vec<Value> = groups.iter().map(|g| expect(g, &mut model)).collect();
                json!({
                    "batch_hex": encode(groups),
                    "groups": groups.iter().map(describe_group).collect::<Vec<_>>(),
                    "expect": expect,
                })
            })
            .collect();
        let case = json!({ "name": name, "about": about, "steps": steps });
        out.push_str(&case.to_string());
        out.push('\n');
    }
    out
}

#[test]
fn conformance_vectors_are_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance/vectors.jsonl");
    let generated = vectors();
    if std::env::var_os("WAGG_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing the vectors");
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "{} is not what the reference encoder and probe model generate; if the change is deliberate, run `WAGG_BLESS=1 cargo test --release -p wagg-abi --test conformance` and commit the file",
        path.display()
    );
}
