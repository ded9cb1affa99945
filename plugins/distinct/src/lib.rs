//! `distinct`: the approximate number of distinct values per key, with a
//! HyperLogLog sketch of `2^precision` one-byte registers.
//!
//! Params:
//! - `field` (optional): JSON pointer to the counted value; without it the
//!   whole record value is counted;
//! - `precision` (4..=16, default 12): the relative standard error is
//!   `1.04 / sqrt(2^precision)`: 1.6 % at 12 (4 KiB of state per key),
//!   0.8 % at 14 (16 KiB).

use serde::{Deserialize, Serialize};
use serde_json::json;
use wagg_guest_sdk::json::validate_pointer;
use wagg_guest_sdk::{Aggregation, Record, Result, bail, hash64};

pub struct Distinct;

pub const MIN_PRECISION: u8 = 4;
pub const MAX_PRECISION: u8 = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub field: Option<String>,
    #[serde(default = "default_precision")]
    pub precision: u8,
}

fn default_precision() -> u8 {
    12
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Sketch {
    /// Empty until the first value, then `2^precision` registers.
    pub registers: Vec<u8>,
}

impl Sketch {
    fn insert(&mut self, hash: u64, precision: u8) {
        let index = (hash >> (64 - precision)) as usize;
        // Position of the first set bit in the remaining bits, 1-based; the
        // sentinel bit bounds it when all remaining bits are zero.
        let rest = (hash << precision) | (1 << (precision - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if self.registers[index] < rank {
            self.registers[index] = rank;
        }
    }

    pub fn estimate(&self) -> f64 {
        let m = self.registers.len() as f64;
        if self.registers.is_empty() {
            return 0.0;
        }
        let alpha = match self.registers.len() {
            16 => 0.673,
            32 => 0.697,
            64 => 0.709,
            _ => 0.7213 / (1.0 + 1.079 / m),
        };
        let sum: f64 = self.registers.iter().map(|&r| (-(r as f64)).exp2()).sum();
        let raw = alpha * m * m / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        if raw <= 2.5 * m && zeros > 0 {
            // Linear counting is more accurate for small cardinalities.
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }
}

impl Aggregation for Distinct {
    const NAME: &'static str = "distinct";
    type State = Sketch;
    type Params = Params;
    const MERGES: bool = true;

    fn validate(params: &Params) -> Result<()> {
        if !(MIN_PRECISION..=MAX_PRECISION).contains(&params.precision) {
            bail!(
                "`precision` must be between {MIN_PRECISION} and {MAX_PRECISION}, got {}",
                params.precision
            );
        }
        if let Some(field) = &params.field {
            validate_pointer("field", field)?;
        }
        Ok(())
    }

    fn aggregate(state: &mut Sketch, record: &Record<'_>, params: &Params) -> Result<()> {
        let size = 1usize << params.precision;
        if state.registers.is_empty() {
            state.registers = vec![0; size];
        } else if state.registers.len() != size {
            bail!(
                "stored sketch has {} registers but `precision` {} needs {size}; precision cannot change for existing state",
                state.registers.len(),
                params.precision
            );
        }
        let hash = match &params.field {
            Some(pointer) => {
                hash64(serde_json::to_string(&record.value_field(pointer)?)?.as_bytes())
            }
            None => match record.value() {
                Some(value) => hash64(value),
                None => bail!("record has no value (tombstone)"),
            },
        };
        state.insert(hash, params.precision);
        Ok(())
    }

    /// Register-wise maximum: the sketch of the union.
    fn merge(a: Sketch, b: Sketch, _params: &Params) -> Result<Sketch> {
        if a.registers.is_empty() {
            return Ok(b);
        }
        if b.registers.is_empty() {
            return Ok(a);
        }
        if a.registers.len() != b.registers.len() {
            bail!(
                "sketches of {} and {} registers cannot be merged",
                a.registers.len(),
                b.registers.len()
            );
        }
        let registers = a
            .registers
            .iter()
            .zip(&b.registers)
            .map(|(x, y)| *x.max(y))
            .collect();
        Ok(Sketch { registers })
    }

    fn render(state: &Sketch, params: &Params) -> Result<serde_json::Value> {
        Ok(json!({
            "estimate": state.estimate().round() as u64,
            "precision": params.precision,
            "standard_error": 1.04 / ((1u64 << params.precision) as f64).sqrt(),
        }))
    }
}

wagg_guest_sdk::export_aggregation!(Distinct);
