//! `count`: the number of records per key.

use serde::{Deserialize, Serialize};
use wagg_guest_sdk::{Aggregation, NoParams, Record, Result};

pub struct Count;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Total {
    pub count: u64,
}

impl Aggregation for Count {
    const NAME: &'static str = "count";
    type State = Total;
    type Params = NoParams;
    const MERGES: bool = true;

    fn aggregate(state: &mut Total, _record: &Record<'_>, _params: &NoParams) -> Result<()> {
        state.count += 1;
        Ok(())
    }

    fn merge(a: Total, b: Total, _params: &NoParams) -> Result<Total> {
        Ok(Total {
            count: a.count + b.count,
        })
    }
}

wagg_guest_sdk::export_aggregation!(Count);
