//! How keys travel in paths, query strings and answers: UTF-8 (default)
//! or base64 (`encoding=base64`, for binary keys), with the length limit
//! and the check that a query string decodes to UTF-8.

use base64::Engine as _;

use super::error::ApiError;

/// Longest key (after decoding) a request may name.
pub const MAX_KEY_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyEncoding {
    Utf8,
    Base64,
}

impl KeyEncoding {
    pub(super) fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("utf8") | Some("utf-8") => Ok(Self::Utf8),
            Some("base64") => Ok(Self::Base64),
            Some(other) => Err(ApiError::bad_request(format!(
                "unknown encoding {other:?}; use `utf8` (default) or `base64`"
            ))),
        }
    }

    pub(super) fn decode(self, what: &str, text: &str) -> Result<Vec<u8>, ApiError> {
        let bytes = match self {
            Self::Utf8 => text.as_bytes().to_vec(),
            Self::Base64 => decode_base64(text)
                .ok_or_else(|| ApiError::bad_request(format!("{what} is not valid base64")))?,
        };
        if bytes.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(format!(
                "{what} is {} bytes, over the limit of {MAX_KEY_BYTES}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Keys that are not UTF-8 show lossily in `utf8` mode; binary keys
    /// need `encoding=base64` to round-trip (e.g. as paging cursors).
    pub(super) fn encode(self, key: &[u8]) -> String {
        match self {
            Self::Utf8 => String::from_utf8_lossy(key).into_owned(),
            Self::Base64 => base64::engine::general_purpose::STANDARD.encode(key),
        }
    }
}

/// Accepts standard and URL-safe alphabets, with or without padding.
pub(super) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// Query values decode lossily (`%ff` becomes U+FFFD), which would make a
/// binary cursor silently point somewhere else: refuse them instead.
pub(super) fn check_query_utf8(raw: Option<&str>) -> Result<(), ApiError> {
    for part in raw.unwrap_or_default().split('&') {
        if percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .is_err()
        {
            return Err(ApiError::bad_request(
                "the query string is not UTF-8 once percent-decoded; pass binary keys with `encoding=base64`",
            ));
        }
    }
    Ok(())
}
