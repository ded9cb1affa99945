//! `sum`: the sum of a numeric field per key.
//!
//! Params: `field`, a JSON pointer into the record value (e.g. `"/amount"`).
//! A record whose field is missing or not a number is rejected, never
//! counted as zero.

use serde::{Deserialize, Serialize};
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result};

pub struct Sum;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub field: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Total {
    pub sum: f64,
}

impl Aggregation for Sum {
    const NAME: &'static str = "sum";
    type State = Total;
    type Params = Params;

    fn validate(params: &Params) -> Result<()> {
        validate_pointer("field", &params.field)
    }

    fn aggregate(state: &mut Total, record: &Record<'_>, params: &Params) -> Result<()> {
        state.sum += record.value_number(&params.field)?;
        Ok(())
    }
}

wagg_guest_sdk::export_aggregation!(Sum);
