use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct OwnedRecord {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: Option<i64>,
    partition: i32,
    offset: i64,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Debug, Clone)]
struct OwnedGroup {
    key: Vec<u8>,
    state: Option<Vec<u8>>,
    /// `true` records reuse the group key, exercising the shared-key flag.
    records: Vec<(bool, OwnedRecord)>,
}

fn record() -> impl Strategy<Value = OwnedRecord> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::option::of(any::<i64>()),
        any::<i32>(),
        any::<i64>(),
        proptest::collection::vec(
            (
                "[a-z]{0,6}",
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
            ),
            0..3,
        ),
    )
        .prop_map(
            |(key, value, timestamp, partition, offset, headers)| OwnedRecord {
                key,
                value,
                timestamp,
                partition,
                offset,
                headers,
            },
        )
}

fn groups() -> impl Strategy<Value = Vec<OwnedGroup>> {
    proptest::collection::vec(
        (
            proptest::collection::vec(any::<u8>(), 0..8),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::collection::vec((any::<bool>(), record()), 1..4),
        )
            .prop_map(|(key, state, records)| OwnedGroup {
                key,
                state,
                records,
            }),
        0..5,
    )
}

fn encode(groups: &[OwnedGroup]) -> Vec<u8> {
    let mut encoder = BatchEncoder::new();
    for group in groups {
        encoder.begin_group(&group.key, group.state.as_deref());
        for (use_group_key, r) in &group.records {
            let key = if *use_group_key {
                Some(group.key.as_slice())
            } else {
                r.key.as_deref()
            };
            let record = Record {
                key,
                value: r.value.as_deref(),
                timestamp: r.timestamp,
                partition: r.partition,
                offset: r.offset,
                headers: Headers::EMPTY,
            };
            encoder.push_record_with_headers(
                &record,
                r.headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())),
            );
        }
    }
    encoder.finish().to_vec()
}

proptest! {
    #[test]
    fn batch_roundtrips(groups in groups()) {
        let bytes = encode(&groups);
        let mut decoder = BatchDecoder::new(&bytes).unwrap();
        prop_assert_eq!(decoder.group_count() as usize, groups.len());
        for expected in &groups {
            let group = decoder.next_group().unwrap().unwrap();
            prop_assert_eq!(group.key, expected.key.as_slice());
            prop_assert_eq!(group.state, expected.state.as_deref());
            prop_assert_eq!(group.record_count() as usize, expected.records.len());
            for (got, (use_group_key, want)) in group.records().zip(&expected.records) {
                let want_key = if *use_group_key { Some(expected.key.as_slice()) } else { want.key.as_deref() };
                prop_assert_eq!(got.key, want_key);
                prop_assert_eq!(got.value, want.value.as_deref());
                prop_assert_eq!(got.timestamp, want.timestamp);
                prop_assert_eq!(got.partition, want.partition);
                prop_assert_eq!(got.offset, want.offset);
                let headers: Vec<_> = got.headers.iter().map(|(n, v)| (n.to_owned(), v.map(<[u8]>::to_vec))).collect();
                prop_assert_eq!(&headers, &want.headers);
            }
        }
        prop_assert!(decoder.next_group().is_none());
    }

    #[test]
    fn result_roundtrips(results in proptest::collection::vec(
        (0u8..3, proptest::collection::vec(any::<u8>(), 0..16), proptest::option::of((any::<u32>(), "[ -~]{0,20}"))),
        0..6,
    )) {
        let mut encoder = ResultEncoder::new();
        let expected: Vec<GroupResult<'_>> = results.iter().map(|(change, state, failure)| GroupResult {
            change: match change { 0 => StateChange::Unchanged, 1 => StateChange::Set(state), _ => StateChange::Delete },
            failure: failure.as_ref().map(|(index, message)| RecordFailure { index: *index, message: message.as_bytes() }),
        }).collect();
        for result in &expected {
            encoder.push(result);
        }
        let bytes = encoder.finish();
        let mut decoder = ResultDecoder::new(&bytes).unwrap();
        prop_assert_eq!(decoder.group_count() as usize, expected.len());
        for want in &expected {
            prop_assert_eq!(&decoder.next_group().unwrap().unwrap(), want);
        }
        prop_assert!(decoder.next_group().is_none());
    }

    /// Untrusted input: decoding random or corrupted bytes never panics and
    /// never loops forever.
    #[test]
    fn decoders_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..64), flip in any::<usize>()) {
        if !bytes.is_empty() {
            bytes[0] = ABI_VERSION;
            let i = flip % bytes.len();
            bytes[i] ^= 0x5a;
        }
        if let Ok(mut decoder) = BatchDecoder::new(&bytes) {
            while let Some(group) = decoder.next_group() {
                if let Ok(group) = group { let _ = group.records().count(); } else { break; }
            }
        }
        if let Ok(mut decoder) = ResultDecoder::new(&bytes) {
            while let Some(result) = decoder.next_group() {
                if result.is_err() { break; }
            }
        }
    }

    #[test]
    fn truncated_batches_are_errors(groups in groups(), cut in any::<usize>()) {
        let bytes = encode(&groups);
        let cut = cut % bytes.len();
        let outcome = BatchDecoder::new(&bytes[..cut]).and_then(|mut decoder| {
            while let Some(group) = decoder.next_group() { group?; }
            Ok(())
        });
        prop_assert!(outcome.is_err());
    }
}

#[test]
fn huge_declared_counts_fail_fast() {
    let mut bytes = vec![ABI_VERSION];
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut decoder = BatchDecoder::new(&bytes).unwrap();
    assert!(matches!(
        decoder.next_group(),
        Some(Err(DecodeError::Truncated { .. }))
    ));
    assert!(decoder.next_group().is_none());
}

#[test]
fn wrong_version_is_rejected() {
    assert_eq!(
        BatchDecoder::new(&[9, 0, 0, 0, 0]).err(),
        Some(DecodeError::Version(9))
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut encoder = ResultEncoder::new();
    encoder.push(&GroupResult {
        change: StateChange::Delete,
        failure: None,
    });
    let mut bytes = encoder.finish();
    bytes.push(0);
    let mut decoder = ResultDecoder::new(&bytes).unwrap();
    assert!(decoder.next_group().unwrap().is_ok());
    assert_eq!(
        decoder.next_group(),
        Some(Err(DecodeError::TrailingBytes(1)))
    );
}
