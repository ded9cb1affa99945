//! Helpers for plugins whose record values are JSON documents.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::{Error, Result};

/// The value at `pointer` (RFC 6901) in the JSON document `doc`, or `None`
/// when there is none, found while parsing: every other field is skipped
/// without being built, so nothing is allocated for it. The whole document
/// is still checked to be valid JSON.
///
/// Several times faster than parsing into a [`Value`] and calling
/// [`Value::pointer`] for records with more than the one wanted field.
pub fn pointer_in(doc: &[u8], pointer: &str) -> Result<Option<Value>> {
    let mut deserializer = serde_json::Deserializer::from_slice(doc);
    let found = At { rest: pointer }
        .deserialize(&mut deserializer)
        .and_then(|found| deserializer.end().map(|()| found))
        .map_err(|e| Error::msg(format!("value is not valid JSON: {e}")))?;
    Ok(found)
}

/// [`number_at`] for a document given as bytes (see [`pointer_in`]).
pub fn number_in(doc: &[u8], pointer: &str) -> Result<f64> {
    as_number(pointer_in(doc, pointer)?.as_ref(), pointer)
}

/// [`field_at`] for a document given as bytes (see [`pointer_in`]).
pub fn field_in(doc: &[u8], pointer: &str) -> Result<Value> {
    pointer_in(doc, pointer)?.ok_or_else(|| Error::msg(format!("field `{pointer}` is missing")))
}

/// Looks for the rest of a pointer in the value being parsed.
struct At<'p> {
    rest: &'p str,
}

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        if self.rest.is_empty() {
            return serde::Deserialize::deserialize(deserializer).map(Some);
        }
        deserializer.deserialize_any(self)
    }
}

impl At<'_> {
    /// The next reference token (unescaped lazily) and the pointer after it.
    fn split(&self) -> (&str, &str) {
        let tokens = &self.rest[1..];
        match tokens.find('/') {
            Some(end) => (&tokens[..end], &tokens[end..]),
            None => (tokens, ""),
        }
    }
}

impl<'de> Visitor<'de> for At<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (token, rest) = self.split();
        let mut found = None;
        while let Some(matches) = map.next_key_seed(KeyIs { token })? {
            if matches {
                // The last of duplicate keys wins, as in `Value`.
                found = map.next_value_seed(At { rest })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (token, rest) = self.split();
        // RFC 6901 array indexes: digits without leading zeros.
        let index = (token == "0" || !token.starts_with('0'))
            .then(|| token.parse::<usize>().ok())
            .flatten();
        let mut found = None;
        let mut position = 0;
        loop {
            let item = if Some(position) == index {
                seq.next_element_seed(At { rest })?
                    .map(|value| found = value)
            } else {
                seq.next_element::<IgnoredAny>()?.map(drop)
            };
            if item.is_none() {
                return Ok(found);
            }
            position += 1;
        }
    }

    // A pointer that goes on into a scalar finds nothing.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Whether an object key equals a pointer's reference token.
struct KeyIs<'t> {
    token: &'t str,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(if self.token.contains('~') {
            self.token.replace("~1", "/").replace("~0", "~") == key
        } else {
            self.token == key
        })
    }
}

/// The number at `pointer` (RFC 6901, e.g. `/order/amount`) in `doc`.
///
/// A missing field, `null`, or a non-numeric value is an error naming the
/// pointer: aggregations must not silently treat bad records as zero.
pub fn number_at(doc: &Value, pointer: &str) -> Result<f64> {
    as_number(doc.pointer(pointer), pointer)
}

fn as_number(found: Option<&Value>, pointer: &str) -> Result<f64> {
    match found {
        None => Err(Error::msg(format!("field `{pointer}` is missing"))),
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| {
            Error::msg(format!(
                "field `{pointer}` is not representable as a number"
            ))
        }),
        Some(other) => Err(Error::msg(format!(
            "field `{pointer}` is not a number: {}",
            kind(other)
        ))),
    }
}

/// The value at `pointer`, or an error naming the pointer.
pub fn field_at<'v>(doc: &'v Value, pointer: &str) -> Result<&'v Value> {
    doc.pointer(pointer)
        .ok_or_else(|| Error::msg(format!("field `{pointer}` is missing")))
}

/// A parameter naming a field of the record value: a JSON pointer (empty for
/// the whole value, else starting with `/`), checked when the params are
/// parsed — a plugin whose `Params` uses it needs no `validate` for it.
///
/// ```
/// use wagg_guest_sdk::json::FieldPointer;
///
/// #[derive(serde::Deserialize)]
/// struct Params { field: FieldPointer }
///
/// let ok: Params = serde_json::from_str(r#"{"field": "/amount"}"#).unwrap();
/// assert_eq!(ok.field.as_str(), "/amount");
/// let bad = serde_json::from_str::<Params>(r#"{"field": "amount"}"#);
/// assert!(bad.is_err_and(|e| e.to_string().contains("must be a JSON pointer")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct FieldPointer(String);

impl FieldPointer {
    /// `pointer`, if it is a JSON pointer.
    pub fn new(pointer: impl Into<String>) -> Result<Self> {
        let pointer = pointer.into();
        if pointer.is_empty() || pointer.starts_with('/') {
            Ok(Self(pointer))
        } else {
            Err(Error::msg(format!(
                "must be a JSON pointer such as \"/amount\", got {pointer:?}"
            )))
        }
    }

    /// The pointer, as [`Record::value_number`](crate::Record::value_number)
    /// and the other field accessors take it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for FieldPointer {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for FieldPointer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(text).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// The params of a plugin over one field of the record value:
/// `{"field": "/amount"}`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldParams {
    /// The field the plugin reads.
    pub field: FieldPointer,
}

/// Checks that a parameter is a JSON pointer (empty, or starting with `/`).
pub fn validate_pointer(param: &str, pointer: &str) -> Result<()> {
    if pointer.is_empty() || pointer.starts_with('/') {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "`{param}` must be a JSON pointer such as \"/amount\", got {pointer:?}"
        )))
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_found_and_non_numbers_named() {
        let doc = json!({"a": {"b": 2.5}, "s": "7", "n": null});
        assert_eq!(number_at(&doc, "/a/b"), Ok(2.5));
        assert_eq!(
            number_at(&doc, "/x").unwrap_err().message(),
            "field `/x` is missing"
        );
        assert_eq!(
            number_at(&doc, "/s").unwrap_err().message(),
            "field `/s` is not a number: a string"
        );
        assert_eq!(
            number_at(&doc, "/n").unwrap_err().message(),
            "field `/n` is not a number: null"
        );
    }

    #[test]
    fn pointer_in_agrees_with_value_pointer() {
        let docs = [
            r#"{"a": {"b": 2.5, "c": [1, {"d": "x"}]}, "s": "7", "n": null, "a/b": 1, "t~": 2}"#,
            r#"[10, {"k": true}]"#,
            r#"{"dup": 1, "dup": 2}"#,
            r#"3"#,
        ];
        let pointers = [
            "", "/a", "/a/b", "/a/c", "/a/c/0", "/a/c/1/d", "/a/c/01", "/a/c/2", "/a/b/x", "/s",
            "/n", "/a~1b", "/t~0", "/missing", "/0", "/1/k", "/dup", "/-",
        ];
        for doc in docs {
            let value: Value = serde_json::from_str(doc).unwrap();
            for pointer in pointers {
                assert_eq!(
                    pointer_in(doc.as_bytes(), pointer).unwrap(),
                    value.pointer(pointer).cloned(),
                    "{doc} {pointer}"
                );
            }
        }
    }

    #[test]
    fn pointer_in_rejects_invalid_json_anywhere() {
        for doc in [r#"{"a": 1, "b": }"#, r#"{"a": 1} x"#, "", r#"{"a": [1,}"#] {
            let error = pointer_in(doc.as_bytes(), "/a").unwrap_err();
            assert!(
                error.message().starts_with("value is not valid JSON"),
                "{doc}"
            );
        }
    }

    #[test]
    fn number_in_names_the_pointer_like_number_at() {
        let doc = br#"{"a": {"b": 2.5}, "s": "7", "n": null}"#;
        assert_eq!(number_in(doc, "/a/b"), Ok(2.5));
        for pointer in ["/x", "/s", "/n", "/a"] {
            let value: Value = serde_json::from_slice(doc).unwrap();
            assert_eq!(
                number_in(doc, pointer).unwrap_err().message(),
                number_at(&value, pointer).unwrap_err().message()
            );
        }
    }

    #[test]
    fn pointers_are_validated() {
        assert!(validate_pointer("field", "/amount").is_ok());
        assert!(validate_pointer("field", "").is_ok());
        assert!(
            validate_pointer("field", "amount")
                .unwrap_err()
                .message()
                .contains("`field`")
        );
    }
}
