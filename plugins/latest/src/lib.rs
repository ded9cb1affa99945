//! `latest`: the last value per key (a KTable).
//!
//! Params: `timestamp` (optional), a JSON pointer to a numeric timestamp in
//! the value. Without it, the record consumed last wins (offset order within
//! a partition); with it, the record with the greatest timestamp wins and
//! late, older records are ignored. A tombstone (null value) deletes the key.

use serde::{Deserialize, Serialize};
use serde_json::json;
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result};

pub struct Latest;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub timestamp: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Last {
    /// `None` once a tombstone arrived: the key is then deleted.
    pub value: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<f64>,
}

impl Aggregation for Latest {
    const NAME: &'static str = "latest";
    type State = Last;
    type Params = Params;
    const MERGES: bool = true;

    fn validate(params: &Params) -> Result<()> {
        match &params.timestamp {
            Some(pointer) => validate_pointer("timestamp", pointer),
            None => Ok(()),
        }
    }

    fn aggregate(state: &mut Last, record: &Record<'_>, params: &Params) -> Result<()> {
        let Some(value) = record.value() else {
            state.value = None;
            return Ok(());
        };
        let timestamp = match &params.timestamp {
            Some(pointer) => {
                let ts = record.value_number(pointer)?;
                if state.value.is_some() && state.timestamp.is_some_and(|current| ts < current) {
                    return Ok(());
                }
                Some(ts)
            }
            None => None,
        };
        state.value = Some(value.to_vec());
        state.partition = record.partition();
        state.offset = record.offset();
        state.timestamp = timestamp;
        Ok(())
    }

    /// The later of the two: by timestamp when there is one (ties: `b`,
    /// consumed after `a`), else `b`. (With `timestamp`, a tombstone in
    /// `b`'s records followed by a record older than `a`'s is merged as
    /// that older record losing to `a`: the reset a tombstone makes is not
    /// part of any state.)
    fn merge(a: Last, b: Last, _params: &Params) -> Result<Last> {
        let b_is_later = match (a.timestamp, b.timestamp) {
            (Some(ta), Some(tb)) => tb >= ta,
            _ => true,
        };
        Ok(if b_is_later { b } else { a })
    }

    fn keep(state: &Last, _params: &Params) -> bool {
        state.value.is_some()
    }

    fn render(state: &Last, _params: &Params) -> Result<serde_json::Value> {
        let bytes = state.value.as_deref().unwrap_or_default();
        // Show JSON values as JSON, anything else as text.
        let value = serde_json::from_slice(bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
        });
        let mut doc =
            json!({ "value": value, "partition": state.partition, "offset": state.offset });
        if let Some(ts) = state.timestamp {
            doc["timestamp"] = json!(ts);
        }
        Ok(doc)
    }
}

wagg_guest_sdk::export_aggregation!(Latest);
