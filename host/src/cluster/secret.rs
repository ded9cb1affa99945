//! The cluster's shared secret (`cluster.secret_env` / `secret_file`):
//! HMAC-SHA256 tags on member announcements (so that whoever can write the
//! members topic cannot route lookups elsewhere) and on requests one
//! instance forwards to another (so that a forwarded request needs no
//! client token, and the client's token never leaves the instance it was
//! sent to). The secret itself is never logged or shown.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The header that carries an announcement's tag.
pub const MAC_HEADER: &str = "wagg.mac";
/// How far a forwarded request's time may be from this instance's clock.
const FORWARD_SKEW_MS: i64 = 60_000;

pub struct ClusterSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Self {
        Self {
            key: secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        for part in parts {
            // Length-prefixed, so that no two different part lists sign
            // the same bytes.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The hex tag of `parts`.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        hex::encode(self.mac(parts).finalize().into_bytes())
    }

    /// Whether `tag` (hex) is the tag of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let Ok(tag) = hex::decode(tag) else {
            return false;
        };
        let expected = self.mac(parts).finalize().into_bytes();
        expected.as_slice().ct_eq(&tag).into()
    }

    /// The `x-wagg-forwarded` value of a request for `path_and_query` sent
    /// at `now_ms`: `<now_ms>.<tag>`.
    pub fn forwarded_value(&self, path_and_query: &str, now_ms: i64) -> String {
        let time = now_ms.to_string();
        format!(
            "{time}.{}",
            self.sign(&[b"forward", path_and_query.as_bytes(), time.as_bytes()])
        )
    }

    /// Whether a `x-wagg-forwarded` value is this cluster's, for this
    /// request, and recent.
    pub fn verify_forwarded(&self, value: &str, path_and_query: &str, now_ms: i64) -> bool {
        let Some((time, tag)) = value.split_once('.') else {
            return false;
        };
        let Ok(sent) = time.parse::<i64>() else {
            return false;
        };
        (now_ms - sent).abs() <= FORWARD_SKEW_MS
            && self.verify(
                &[b"forward", path_and_query.as_bytes(), time.as_bytes()],
                tag.as_bytes(),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_for_the_same_secret_and_bytes() {
        let secret = ClusterSecret::new("a-shared-cluster-secret-of-32-chars!");
        let other = ClusterSecret::new("another-cluster-secret-of-32-chars!!");
        let tag = secret.sign(&[b"announcement"]);
        assert!(secret.verify(&[b"announcement"], tag.as_bytes()));
        assert!(!other.verify(&[b"announcement"], tag.as_bytes()));
        assert!(!secret.verify(&[b"announcement!"], tag.as_bytes()));
        assert!(!secret.verify(&[b"announ", b"cement"], tag.as_bytes()));
        assert!(!secret.verify(&[b"announcement"], b"not hex"));
        assert!(!secret.verify(&[b"announcement"], b""));
        assert_eq!(format!("{secret:?}"), "ClusterSecret(<redacted>)");
    }

    #[test]
    fn forwarded_requests_are_bound_to_their_path_and_time() {
        let secret = ClusterSecret::new("a-shared-cluster-secret-of-32-chars!");
        let value = secret.forwarded_value("/v1/aggregations/count/keys/a", 1_000_000);
        assert!(secret.verify_forwarded(&value, "/v1/aggregations/count/keys/a", 1_030_000));
        assert!(!secret.verify_forwarded(&value, "/v1/aggregations/count/keys/b", 1_000_000));
        assert!(!secret.verify_forwarded(&value, "/v1/aggregations/count/keys/a", 1_100_000));
        assert!(!secret.verify_forwarded("1", "/", 1));
        assert!(!secret.verify_forwarded("x.y", "/", 1));
    }
}
