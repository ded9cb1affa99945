//! `conformance`: the probe the ABI conformance suite
//! (`abi/conformance/`) runs in every guest SDK. It keeps, per key, one
//! line per record describing everything the SDK decoded, so a vector's
//! expected rendering pins the decoding of every field; values `reject`
//! and `delete` exercise rejected records and deleted keys (a rejected
//! record changes the state before it fails, which the SDK must undo).
//!
//! A line: `p{partition}@{offset} k={key} v={value} t={timestamp}
//! h=[{name}={value},...]`, bytes in lowercase hex, `-` for absent.

use serde_json::json;
use wagg_guest_sdk::{Aggregation, NoParams, Record, Result, bail};

pub struct Conformance;

fn hex(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "-".to_owned(),
        Some(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The line the conformance vectors expect for `record`.
pub fn describe(record: &Record<'_>) -> String {
    let headers: Vec<String> = record
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}={}", hex(value)))
        .collect();
    let timestamp = record
        .timestamp()
        .map_or_else(|| "-".to_owned(), |t| t.to_string());
    format!(
        "p{}@{} k={} v={} t={timestamp} h=[{}]",
        record.partition(),
        record.offset(),
        hex(record.key()),
        hex(record.value()),
        headers.join(",")
    )
}

impl Aggregation for Conformance {
    const NAME: &'static str = "conformance";
    type State = Vec<String>;
    type Params = NoParams;

    fn aggregate(lines: &mut Vec<String>, record: &Record<'_>, _: &NoParams) -> Result<()> {
        match record.value() {
            Some(b"reject") => {
                // Changed before failing: the SDK must roll this back.
                lines.push("rejected record".to_owned());
                bail!("rejected p{}@{}", record.partition(), record.offset())
            }
            Some(b"delete") => lines.clear(),
            _ => lines.push(describe(record)),
        }
        Ok(())
    }

    fn keep(lines: &Vec<String>, _: &NoParams) -> bool {
        !lines.is_empty()
    }

    fn render(lines: &Vec<String>, _: &NoParams) -> Result<serde_json::Value> {
        Ok(json!({ "records": lines }))
    }
}

wagg_guest_sdk::export_aggregation!(Conformance);
