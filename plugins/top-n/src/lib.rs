//! `top-n`: the N highest-scoring items per key.
//!
//! Params:
//! - `n` (1..=1000): how many items to keep;
//! - `field`: JSON pointer to the numeric score (e.g. `"/amount"`);
//! - `item` (optional): JSON pointer to the item's identity (e.g.
//!   `"/item"`). With it, each item appears once, with its best score;
//!   without it, every record is its own item (the whole value).
//!
//! Items are ordered by score, highest first; equal scores by item text.

use serde::{Deserialize, Serialize};
use serde_json::json;
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result, bail};

pub struct TopN;

pub const MAX_N: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub n: u32,
    pub field: String,
    pub item: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub score: f64,
    /// The item as JSON text.
    pub item: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Top {
    /// Best first, at most `n` long.
    pub entries: Vec<Entry>,
}

fn ranks_before(a: &Entry, b: &Entry) -> bool {
    a.score > b.score || (a.score == b.score && a.item < b.item)
}

impl Aggregation for TopN {
    const NAME: &'static str = "top-n";
    type State = Top;
    type Params = Params;
    const MERGES: bool = true;

    fn validate(params: &Params) -> Result<()> {
        if params.n == 0 || params.n > MAX_N {
            bail!("`n` must be between 1 and {MAX_N}, got {}", params.n);
        }
        validate_pointer("field", &params.field)?;
        if let Some(item) = &params.item {
            validate_pointer("item", item)?;
        }
        Ok(())
    }

    fn aggregate(state: &mut Top, record: &Record<'_>, params: &Params) -> Result<()> {
        let score = record.value_number(&params.field)?;
        let item = match &params.item {
            Some(pointer) => serde_json::to_string(&record.value_field(pointer)?)?,
            // The whole value, re-serialized so equal documents compare equal.
            None => serde_json::to_string(&record.value_json::<serde_json::Value>()?)?,
        };
        let entries = &mut state.entries;
        if params.item.is_some()
            && let Some(existing) = entries.iter().position(|e| e.item == item)
        {
            if entries[existing].score >= score {
                return Ok(());
            }
            entries.remove(existing);
        }
        let candidate = Entry { score, item };
        let position = entries
            .iter()
            .position(|e| ranks_before(&candidate, e))
            .unwrap_or(entries.len());
        if position < params.n as usize {
            entries.insert(position, candidate);
            entries.truncate(params.n as usize);
        }
        Ok(())
    }

    /// The best `n` of both lists (each item once, with its best score,
    /// when items have an identity): exact, because an item missing from
    /// one list ranks below that list's `n` kept ones there.
    fn merge(a: Top, b: Top, params: &Params) -> Result<Top> {
        let mut entries = a.entries;
        for candidate in b.entries {
            match entries.iter_mut().find(|e| e.item == candidate.item) {
                Some(existing) if params.item.is_some() => {
                    existing.score = existing.score.max(candidate.score);
                }
                _ => entries.push(candidate),
            }
        }
        // Stable: equal entries keep `a`'s before `b`'s, as aggregating
        // would have.
        entries.sort_by(|x, y| {
            if ranks_before(x, y) {
                std::cmp::Ordering::Less
            } else if ranks_before(y, x) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        entries.truncate(params.n as usize);
        Ok(Top { entries })
    }

    fn render(state: &Top, _params: &Params) -> Result<serde_json::Value> {
        let items = state
            .entries
            .iter()
            .map(|e| {
                let item: serde_json::Value = serde_json::from_str(&e.item)?;
                Ok(json!({ "item": item, "score": e.score }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(json!({ "top": items }))
    }
}

wagg_guest_sdk::export_aggregation!(TopN);
