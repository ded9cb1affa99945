//! The keys of a windowed aggregation's states: the aggregation key and
//! the window, in one byte string whose order keeps each key's windows
//! together and in start order.
//!
//! `escape(key) ‖ 00 00 ‖ start` for tumbling and hopping windows (their
//! end follows from the size), `escape(key) ‖ 00 00 ‖ start ‖ end` for
//! sessions (whose end is the time of their last record). In `escape`,
//! every `00` byte of the key becomes `00 ff`, so `00 00` ends the key
//! unambiguously and no key's windows interleave with another's (a key
//! that is a prefix of another sorts, with all its windows, first); times
//! are 8 bytes big-endian with the sign bit flipped, so byte order is time
//! order.

/// A window key, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowedKey {
    /// The aggregation key.
    pub key: Vec<u8>,
    pub start: i64,
    /// A session's end (the time of its last record); `None` for the
    /// windows whose end follows from their size.
    pub session_end: Option<i64>,
}

/// The store key (within its slot) of `key`'s window starting at `start`.
pub fn window_key(key: &[u8], start: i64) -> Vec<u8> {
    let mut out = window_prefix(key);
    out.extend_from_slice(&time_bytes(start));
    out
}

/// The store key (within its slot) of `key`'s session `[start, end]`.
pub fn session_key(key: &[u8], start: i64, end: i64) -> Vec<u8> {
    let mut out = window_key(key, start);
    out.extend_from_slice(&time_bytes(end));
    out
}

/// Sorts after every window key of `key` and before those of any key
/// after it (`00 01` never occurs in an escaped key).
pub fn after_windows_of(key: &[u8]) -> Vec<u8> {
    let mut out = window_prefix(key);
    if let Some(last) = out.last_mut() {
        *last = 1;
    }
    out
}

fn time_bytes(time: i64) -> [u8; 8] {
    ((time as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_of(bytes: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = bytes.try_into().ok()?;
    Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
}

/// What every window key of `key` starts with.
pub fn window_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    for &byte in key {
        out.push(byte);
        if byte == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
    out
}

/// The aggregation key and window of a window key; `None` if it is not
/// one.
pub fn split_window_key(bytes: &[u8]) -> Option<WindowedKey> {
    let mut key = Vec::with_capacity(bytes.len().saturating_sub(10));
    let mut rest = bytes;
    loop {
        match rest {
            [0, 0, times @ ..] => {
                let (start, session_end) = match times.len() {
                    8 => (time_of(times)?, None),
                    16 => (time_of(&times[..8])?, Some(time_of(&times[8..])?)),
                    _ => return None,
                };
                return Some(WindowedKey {
                    key,
                    start,
                    session_end,
                });
            }
            [0, 0xff, tail @ ..] => {
                key.push(0);
                rest = tail;
            }
            [0, ..] | [] => return None,
            [byte, tail @ ..] => {
                key.push(*byte);
                rest = tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn window_keys_round_trip(key in proptest::collection::vec(any::<u8>(), 0..24), start in any::<i64>(), end in any::<i64>()) {
            let fixed = WindowedKey { key: key.clone(), start, session_end: None };
            prop_assert_eq!(split_window_key(&window_key(&key, start)), Some(fixed));
            let session = WindowedKey { key: key.clone(), start, session_end: Some(end) };
            prop_assert_eq!(split_window_key(&session_key(&key, start, end)), Some(session));
        }

        #[test]
        fn window_keys_sort_by_key_then_start(
            a in proptest::collection::vec(0u8..3, 0..6),
            b in proptest::collection::vec(0u8..3, 0..6),
            s in any::<i64>(),
            t in any::<i64>(),
        ) {
            let (x, y) = (window_key(&a, s), window_key(&b, t));
            if a == b {
                prop_assert_eq!(x.cmp(&y), s.cmp(&t));
            } else {
                // All of one key's windows are on one side of the other's.
                prop_assert_eq!(x.cmp(&y), window_key(&a, i64::MIN).cmp(&window_key(&b, i64::MAX)));
                prop_assert!(!y.starts_with(&window_prefix(&a)));
            }
            // Sessions sort like windows, and all before the end marker.
            prop_assert!(session_key(&a, s, t) > window_key(&a, s));
            prop_assert!(session_key(&a, s, t) < after_windows_of(&a));
            if a < b {
                prop_assert!(after_windows_of(&a) < window_key(&b, i64::MIN));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some(split) = split_window_key(&bytes) {
                let again = match split.session_end {
                    Some(end) => session_key(&split.key, split.start, end),
                    None => window_key(&split.key, split.start),
                };
                prop_assert_eq!(again, bytes);
            }
        }
    }
}
