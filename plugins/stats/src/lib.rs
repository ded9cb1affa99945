//! `stats`: count, min, max, mean and population variance of a numeric field
//! per key, updated with Welford's algorithm (numerically stable, O(1) state).
//!
//! Params: `field`, a JSON pointer into the record value (e.g. `"/amount"`).
//! A record whose field is missing or not a number is rejected.

use serde::{Deserialize, Serialize};
use serde_json::json;
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result};

pub struct Stats;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub field: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Aggregation for Stats {
    const NAME: &'static str = "stats";
    type State = Moments;
    type Params = Params;
    const MERGES: bool = true;

    fn validate(params: &Params) -> Result<()> {
        validate_pointer("field", &params.field)
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
        let delta = x - state.mean;
        state.mean += delta / state.count as f64;
        state.m2 += delta * (x - state.mean);
        Ok(())
    }

    /// Chan et al.'s parallel combination of two sets of moments.
    fn merge(a: Moments, b: Moments, _params: &Params) -> Result<Moments> {
        if a.count == 0 {
            return Ok(b);
        }
        if b.count == 0 {
            return Ok(a);
        }
        let count = a.count + b.count;
        let (na, nb, n) = (a.count as f64, b.count as f64, count as f64);
        let delta = b.mean - a.mean;
        Ok(Moments {
            count,
            min: a.min.min(b.min),
            max: a.max.max(b.max),
            mean: a.mean + delta * nb / n,
            m2: a.m2 + b.m2 + delta * delta * na * nb / n,
        })
    }

    fn render(state: &Moments, _params: &Params) -> Result<serde_json::Value> {
        Ok(json!({
            "count": state.count,
            "min": state.min,
            "max": state.max,
            "mean": state.mean,
            "variance": if state.count == 0 { 0.0 } else { state.m2 / state.count as f64 },
        }))
    }
}

wagg_guest_sdk::export_aggregation!(Stats);
