//! The keys of a windowed aggregation's states: the aggregation key and
//! the window's start, in one byte string whose order keeps each key's
//! windows together and in start order.
//!
//! `escape(key) ‖ 00 00 ‖ start`: in `escape`, every `00` byte of the key
//! becomes `00 ff`, so `00 00` ends the key unambiguously and no key's
//! windows interleave with another's (a key that is a prefix of another
//! sorts, with all its windows, first); the start is 8 bytes big-endian
//! with the sign bit flipped, so byte order is time order.

/// The store key (within its slot) of `key`'s window starting at `start`.
pub fn window_key(key: &[u8], start: i64) -> Vec<u8> {
    let mut out = window_prefix(key);
    out.extend_from_slice(&((start as u64) ^ (1 << 63)).to_be_bytes());
    out
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

/// The aggregation key and window start of a window key; `None` if it is
/// not one.
pub fn split_window_key(bytes: &[u8]) -> Option<(Vec<u8>, i64)> {
    let mut key = Vec::with_capacity(bytes.len().saturating_sub(10));
    let mut rest = bytes;
    loop {
        match rest {
            [0, 0, start @ ..] => {
                let start: [u8; 8] = start.try_into().ok()?;
                return Some((key, (u64::from_be_bytes(start) ^ (1 << 63)) as i64));
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
        fn window_keys_round_trip(key in proptest::collection::vec(any::<u8>(), 0..24), start in any::<i64>()) {
            prop_assert_eq!(split_window_key(&window_key(&key, start)), Some((key, start)));
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
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some((key, start)) = split_window_key(&bytes) {
                prop_assert_eq!(window_key(&key, start), bytes);
            }
        }
    }
}
