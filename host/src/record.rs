//! The record type that flows from sources through the batcher to plugins.

/// One consumed record, owned. Sources (Kafka, the offline runner, the
/// benchmark generator) produce these; plugins see them through the ABI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceRecord {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl SourceRecord {
    pub(crate) fn as_abi(&self) -> wagg_abi::Record<'_> {
        wagg_abi::Record {
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            timestamp: self.timestamp,
            partition: self.partition,
            offset: self.offset,
            headers: wagg_abi::Headers::EMPTY,
        }
    }

    /// `topic/partition@offset`, for messages.
    pub fn position(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }

    /// The record's event time in milliseconds since the Unix epoch: the
    /// field at JSON pointer `time` in its value (a number of milliseconds,
    /// or an RFC 3339 text), or without `time` its Kafka timestamp. The
    /// error says why there is none, for the record's `on_error`.
    pub fn event_time(&self, time: Option<&str>) -> Result<i64, String> {
        let Some(pointer) = time else {
            return self
                .timestamp
                .ok_or_else(|| "the record has no timestamp".to_owned());
        };
        let value = self
            .value
            .as_deref()
            .ok_or_else(|| "the record has no value (tombstone): no event time".to_owned())?;
        let document: serde_json::Value = serde_json::from_slice(value).map_err(|e| {
            format!("the value is not JSON, so it has no event time {pointer:?}: {e}")
        })?;
        match document.pointer(pointer) {
            Some(serde_json::Value::Number(number)) => number
                .as_i64()
                .or_else(|| number.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .ok_or_else(|| format!("event time {pointer:?} is out of range: {number}")),
            Some(serde_json::Value::String(text)) => chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp_millis())
                .map_err(|e| format!("event time {pointer:?} is not RFC 3339 ({text:?}): {e}")),
            Some(other) => Err(format!(
                "event time {pointer:?} must be epoch milliseconds or an RFC 3339 text, not {other}"
            )),
            None => Err(format!("the value has no event time at {pointer:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_value(value: &str) -> SourceRecord {
        SourceRecord {
            value: Some(value.as_bytes().to_vec()),
            timestamp: Some(7),
            ..SourceRecord::default()
        }
    }

    #[test]
    fn event_time_comes_from_the_value_or_the_kafka_timestamp() {
        assert_eq!(with_value("{}").event_time(None), Ok(7));
        assert_eq!(
            with_value(r#"{"ts": 1700000000123}"#).event_time(Some("/ts")),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            with_value(r#"{"ts": 12.9}"#).event_time(Some("/ts")),
            Ok(12)
        );
        assert_eq!(
            with_value(r#"{"at": {"ts": "2026-11-30T00:00:01.5Z"}}"#).event_time(Some("/at/ts")),
            Ok(1_795_996_801_500) // python: datetime(2026, 11, 30, 0, 0, 1, 500000, utc)
        );
        for (value, wanted) in [
            (r#"{"ts": "yesterday"}"#, "not RFC 3339"),
            (r#"{"ts": true}"#, "must be epoch milliseconds"),
            (r#"{"other": 1}"#, "no event time at"),
            ("not json", "not JSON"),
        ] {
            let error = with_value(value).event_time(Some("/ts")).unwrap_err();
            assert!(error.contains(wanted), "{value}: {error}");
        }
        let untimed = SourceRecord::default();
        assert!(
            untimed
                .event_time(None)
                .unwrap_err()
                .contains("no timestamp")
        );
        assert!(
            untimed
                .event_time(Some("/ts"))
                .unwrap_err()
                .contains("tombstone")
        );
    }
}
