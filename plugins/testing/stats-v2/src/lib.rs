//! `stats` version 2, for the state-migration tests: the same moments plus
//! the running `sum`, in a new state format (2) that `migrate`s from the
//! `stats` plugin's format 1 — the way a plugin author ships a state change
//! (see the plugin guide, "Changing the state").

use serde::{Deserialize, Serialize};
use serde_json::json;
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result, decode_previous};

pub struct StatsV2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub field: String,
}

/// State format 2.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub m2: f64,
    pub sum: f64,
}

/// State format 1, as `stats` 0.1.0 wrote it (postcard: same fields, same
/// order, same types).
#[derive(Debug, Deserialize)]
struct MomentsV1 {
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    m2: f64,
}

impl Aggregation for StatsV2 {
    const NAME: &'static str = "stats";
    const STATE_FORMAT: u32 = 2;
    const MIGRATES_FROM: &'static [u32] = &[1];
    type State = Moments;
    type Params = Params;

    fn validate(params: &Params) -> Result<()> {
        validate_pointer("field", &params.field)
    }

    fn migrate(_from_format: u32, state: &[u8]) -> Result<Moments> {
        let old: MomentsV1 = decode_previous(state)?;
        Ok(Moments {
            count: old.count,
            min: old.min,
            max: old.max,
            mean: old.mean,
            m2: old.m2,
            // Not stored before: recovered from the mean.
            sum: old.mean * old.count as f64,
        })
    }

    fn aggregate(state: &mut Moments, record: &Record<'_>, params: &Params) -> Result<()> {
        let x = record.value_number(&params.field)?;
        if state.count == 0 {
            state.min = x;
            state.max = x;
        } else {
            state.min = state.min.min(x);
            state.max = state.max.max(x);
        }
        state.count += 1;
        state.sum += x;
        let delta = x - state.mean;
        state.mean += delta / state.count as f64;
        state.m2 += delta * (x - state.mean);
        Ok(())
    }

    fn render(state: &Moments, _params: &Params) -> Result<serde_json::Value> {
        Ok(json!({
            "count": state.count,
            "min": state.min,
            "max": state.max,
            "mean": state.mean,
            "variance": if state.count == 0 { 0.0 } else { state.m2 / state.count as f64 },
            "sum": state.sum,
        }))
    }
}

wagg_guest_sdk::export_aggregation!(StatsV2);
