//! `sum`: the sum of a numeric field per key.
//!
//! Params: `field`, a JSON pointer into the record value (e.g. `"/amount"`).
//! A record whose field is missing or not a number is rejected, never
//! counted as zero.

use wagg_guest_sdk::prelude::*;

pub struct Sum;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Total {
    pub sum: f64,
}

impl Aggregation for Sum {
    const NAME: &'static str = "sum";
    type State = Total;
    type Params = FieldParams;
    const MERGES: bool = true;

    fn aggregate(state: &mut Total, record: &Record<'_>, params: &FieldParams) -> Result<()> {
        state.sum += record.value_number(&params.field)?;
        Ok(())
    }

    fn merge(a: Total, b: Total, _params: &FieldParams) -> Result<Total> {
        Ok(Total { sum: a.sum + b.sum })
    }
}

export_aggregation!(Sum);
