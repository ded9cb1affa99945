//! Helpers for plugins whose record values are JSON documents.

use serde_json::Value;

use crate::{Error, Result};

/// The number at `pointer` (RFC 6901, e.g. `/order/amount`) in `doc`.
///
/// A missing field, `null`, or a non-numeric value is an error naming the
/// pointer: aggregations must not silently treat bad records as zero.
pub fn number_at(doc: &Value, pointer: &str) -> Result<f64> {
    match doc.pointer(pointer) {
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
