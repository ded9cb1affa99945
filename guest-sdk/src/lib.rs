#![warn(missing_docs)]
//! Write [wagg](https://github.com/wagg) aggregation plugins in a few lines of
//! safe Rust.
//!
//! A plugin is a type implementing [`Aggregation`] plus one
//! [`export_aggregation!`] line. The SDK hides the plugin ABI completely: it
//! decodes the host's batches, decodes and encodes your state (with
//! [postcard]), parses your parameters (JSON, through serde), renders state to
//! JSON for queries and reports which record failed when your code returns an
//! error.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use wagg_guest_sdk::{Aggregation, NoParams, Record, Result};
//!
//! /// Counts records per key.
//! pub struct Count;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Total {
//!     count: u64,
//! }
//!
//! impl Aggregation for Count {
//!     const NAME: &'static str = "count";
//!     type State = Total;
//!     type Params = NoParams;
//!
//!     fn aggregate(state: &mut Total, _record: &Record<'_>, _params: &NoParams) -> Result<()> {
//!         state.count += 1;
//!         Ok(())
//!     }
//! }
//!
//! // In the plugin crate (built for wasm32-wasip2):
//! // wagg_guest_sdk::export_aggregation!(Count);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release` (or
//! `wagg plugin build`); the `.wasm` file is the plugin.
//!
//! # Rules a plugin lives by
//! - State lives in `State` and nowhere else. The host may drop and recreate
//!   an instance at any time; statics are not carried over.
//! - Returning `Err` from [`Aggregation::aggregate`] rejects that one record:
//!   the state keeps the effect of the records before it, and the host decides
//!   (by the aggregation's `on_error` policy) what happens to the record.
//! - A plugin has no filesystem, network or environment access.
//! - Bump [`Aggregation::STATE_FORMAT`] whenever a new version can no longer
//!   read the `State` bytes an older version wrote. List the old format in
//!   [`Aggregation::MIGRATES_FROM`] and implement [`Aggregation::migrate`]:
//!   the host then migrates every stored key when the new version is
//!   deployed; without a migration it refuses to run the new plugin over the
//!   old state instead of misreading it.

use std::fmt;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use wagg_abi::{BatchDecoder, GroupResult, RecordFailure, ResultEncoder, StateChange};

pub use wagg_abi::Headers;

pub mod json;

/// What most plugins import: `use wagg_guest_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::json::{FieldParams, FieldPointer};
    pub use crate::{Aggregation, Error, NoParams, Record, Result, bail, export_aggregation};
    pub use serde::{Deserialize, Serialize};
}

/// The WIT bindings; used by [`export_aggregation!`], not meant for plugin code.
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "aggregator",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_aggregator",
        default_bindings_module: "wagg_guest_sdk::__bindings",
    });
}

/// A plugin's error: a message for the operator. Any `std::error::Error`
/// converts into it, so `?` works on serde, parsing and I/O errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self(message.to_string())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        Self(error.to_string())
    }
}

/// A plugin function's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns early with an [`Error`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::msg(::std::format!($($arg)*)))
    };
}

/// Parameters for plugins that take none: accepts only an empty table.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// One Kafka record, borrowed from the batch.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a>(wagg_abi::Record<'a>);

impl<'a> Record<'a> {
    /// The record's Kafka key (`None` for a null key).
    pub fn key(&self) -> Option<&'a [u8]> {
        self.0.key
    }

    /// The record's value (`None` for a tombstone).
    pub fn value(&self) -> Option<&'a [u8]> {
        self.0.value
    }

    /// Milliseconds since the Unix epoch, when the record has a timestamp.
    pub fn timestamp(&self) -> Option<i64> {
        self.0.timestamp
    }

    /// The Kafka partition the record was consumed from.
    pub fn partition(&self) -> i32 {
        self.0.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.0.offset
    }

    /// The record's headers.
    pub fn headers(&self) -> Headers<'a> {
        self.0.headers
    }

    /// The value as UTF-8 text; an error for tombstones and invalid UTF-8.
    pub fn value_str(&self) -> Result<&'a str> {
        Ok(std::str::from_utf8(self.value_bytes()?)?)
    }

    /// The value parsed as JSON into `T`; an error for tombstones and
    /// values that are not valid JSON of that shape.
    pub fn value_json<T: serde::Deserialize<'a>>(&self) -> Result<T> {
        serde_json::from_slice(self.value_bytes()?)
            .map_err(|e| Error::msg(format!("value is not valid JSON: {e}")))
    }

    /// The number at a JSON pointer (e.g. `"/amount"`) in the value, parsed
    /// without building the rest of the document ([`json::number_in`]).
    pub fn value_number(&self, pointer: &str) -> Result<f64> {
        json::number_in(self.value_bytes()?, pointer)
    }

    /// The JSON value at a pointer in the record's value ([`json::field_in`]).
    pub fn value_field(&self, pointer: &str) -> Result<serde_json::Value> {
        json::field_in(self.value_bytes()?, pointer)
    }

    fn value_bytes(&self) -> Result<&'a [u8]> {
        self.0
            .value
            .ok_or_else(|| Error::msg("record has no value (tombstone)"))
    }

    /// Builds a record for tests of plugin logic.
    pub fn for_test(key: Option<&'a [u8]>, value: Option<&'a [u8]>, offset: i64) -> Self {
        Self(wagg_abi::Record {
            key,
            value,
            timestamp: None,
            partition: 0,
            offset,
            headers: Headers::EMPTY,
        })
    }
}

/// An aggregation: what a plugin author implements.
pub trait Aggregation: 'static {
    /// Reported to the host and shown by `wagg plugin inspect`.
    const NAME: &'static str;
    /// Bump when `State`'s encoding changes incompatibly.
    const STATE_FORMAT: u32 = 1;
    /// Older state formats [`Aggregation::migrate`] reads.
    const MIGRATES_FROM: &'static [u32] = &[];

    /// Per-key state. A key seen for the first time starts from `Default`.
    type State: Default + Serialize + DeserializeOwned;
    /// The aggregation's `params` table from the config file.
    type Params: DeserializeOwned + Send + Sync;

    /// Checks parameters beyond what deserialization checks. The message
    /// should name the parameter.
    fn validate(_params: &Self::Params) -> Result<()> {
        Ok(())
    }

    /// Folds one record into the key's state.
    fn aggregate(state: &mut Self::State, record: &Record<'_>, params: &Self::Params)
    -> Result<()>;

    /// Whether to keep the key after its records were applied; `false`
    /// deletes the key (for example after a tombstone).
    fn keep(_state: &Self::State, _params: &Self::Params) -> bool {
        true
    }

    /// A state written by a version of this plugin whose `STATE_FORMAT` was
    /// `from_format` (one of [`Aggregation::MIGRATES_FROM`]), as this
    /// version's state. Decode the old bytes with [`decode_previous`] into
    /// a copy of the old state type. An error stops the migration with its
    /// message.
    fn migrate(from_format: u32, _state: &[u8]) -> Result<Self::State> {
        Err(Error::msg(format!(
            "`{}` does not migrate state format {from_format}",
            Self::NAME
        )))
    }

    /// Whether [`Aggregation::merge`] is implemented (session windows need
    /// it).
    const MERGES: bool = false;

    /// One state holding the records of `a` and then those of `b`: folding
    /// records A then B into a state must give the same as merging the
    /// state of A with the state of B.
    fn merge(_a: Self::State, _b: Self::State, _params: &Self::Params) -> Result<Self::State> {
        Err(Error::msg(format!(
            "`{}` does not merge states",
            Self::NAME
        )))
    }

    /// The JSON document a query for this key returns. Defaults to the state
    /// serialized as JSON.
    fn render(state: &Self::State, _params: &Self::Params) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(state)?)
    }
}

/// Drives an [`Aggregation`] through the plugin ABI. The
/// [`export_aggregation!`] macro keeps one in a static; tests can create
/// their own and call it natively.
pub struct Runner<A: Aggregation> {
    params: Mutex<Option<A::Params>>,
}

impl<A: Aggregation> Default for Runner<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregation> Runner<A> {
    /// A runner not configured yet.
    pub const fn new() -> Self {
        Self {
            params: Mutex::new(None),
        }
    }

    /// Parses and validates `params_json`; on success later calls use it.
    pub fn configure(&self, params_json: &str) -> Result<(), String> {
        let params: A::Params = serde_json::from_str(params_json)
            .map_err(|e| format!("invalid params for `{}`: {}", A::NAME, without_position(&e)))?;
        A::validate(&params).map_err(|e| format!("invalid params for `{}`: {e}", A::NAME))?;
        *self.lock() = Some(params);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<A::Params>> {
        // A poisoned lock only means an earlier call panicked, which traps the
        // whole instance anyway; the params inside are still intact.
        self.params
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies an encoded batch and returns the encoded result.
    pub fn apply(&self, batch: &[u8]) -> Result<Vec<u8>, String> {
        let guard = self.lock();
        let params = guard.as_ref().ok_or("apply called before configure")?;
        let mut decoder =
            BatchDecoder::new(batch).map_err(|e| format!("batch could not be decoded: {e}"))?;
        let mut out = ResultEncoder::with_capacity(16 * decoder.group_count() as usize);
        // Reused for every group's encoded state: no allocation per group.
        let mut scratch = Vec::new();
        while let Some(group) = decoder.next_group() {
            let group = group.map_err(|e| format!("batch could not be decoded: {e}"))?;
            let mut state = match decode_state::<A>(group.state) {
                Ok(state) => state,
                Err(message) => {
                    out.push(&GroupResult {
                        change: StateChange::Unchanged,
                        failure: Some(RecordFailure {
                            index: 0,
                            message: message.as_bytes(),
                        }),
                    });
                    continue;
                }
            };
            let mut applied = 0u32;
            let mut failure = None;
            for record in group.records() {
                match A::aggregate(&mut state, &Record(record), params) {
                    Ok(()) => applied += 1,
                    Err(e) => {
                        failure = Some(e.0);
                        break;
                    }
                }
            }
            if failure.is_some() {
                // `aggregate` may have changed the state before it failed:
                // rebuild the state from exactly the records before the
                // failing one (rare, so cheaper than a copy per record).
                state = decode_state::<A>(group.state).unwrap_or_default();
                for record in group.records().take(applied as usize) {
                    if let Err(e) = A::aggregate(&mut state, &Record(record), params) {
                        failure = Some(format!("aggregate is not deterministic: {e}"));
                        break;
                    }
                }
            }
            let failure = failure.as_ref().map(|message| RecordFailure {
                index: applied,
                message: message.as_bytes(),
            });
            if applied == 0 {
                out.push(&GroupResult {
                    change: StateChange::Unchanged,
                    failure,
                });
            } else if !A::keep(&state, params) {
                out.push(&GroupResult {
                    change: StateChange::Delete,
                    failure,
                });
            } else {
                // postcard only fails for types it cannot represent (e.g.
                // sequences of unknown length); report that instead of writing
                // a half-encoded state.
                scratch.clear();
                match postcard::to_extend(&state, std::mem::take(&mut scratch)) {
                    Ok(bytes) => {
                        scratch = bytes;
                        out.push(&GroupResult {
                            change: StateChange::Set(&scratch),
                            failure,
                        });
                    }
                    Err(e) => {
                        let message = format!("state could not be encoded: {e}");
                        out.push(&GroupResult {
                            change: StateChange::Unchanged,
                            failure: Some(RecordFailure {
                                index: 0,
                                message: message.as_bytes(),
                            }),
                        });
                    }
                }
            }
        }
        Ok(out.finish())
    }

    /// Turns a state of the older format `from_format` into an encoded
    /// state of this one.
    pub fn migrate(&self, from_format: u32, state: &[u8]) -> Result<Vec<u8>, String> {
        if !A::MIGRATES_FROM.contains(&from_format) {
            return Err(format!(
                "`{}` (state format {}) does not migrate from state format {from_format} (MIGRATES_FROM: {:?})",
                A::NAME,
                A::STATE_FORMAT,
                A::MIGRATES_FROM
            ));
        }
        let state = A::migrate(from_format, state).map_err(|e| e.0)?;
        postcard::to_allocvec(&state).map_err(|e| format!("state could not be encoded: {e}"))
    }

    /// Merges two encoded states of one key (`a`'s records first).
    pub fn merge(&self, a: &[u8], b: &[u8]) -> Result<Vec<u8>, String> {
        if !A::MERGES {
            return Err(format!("`{}` does not merge states", A::NAME));
        }
        let guard = self.lock();
        let params = guard.as_ref().ok_or("merge called before configure")?;
        let merged = A::merge(
            decode_state::<A>(Some(a))?,
            decode_state::<A>(Some(b))?,
            params,
        )
        .map_err(|e| e.0)?;
        postcard::to_allocvec(&merged).map_err(|e| format!("state could not be encoded: {e}"))
    }

    /// Renders one encoded state as JSON text.
    pub fn render(&self, state: &[u8]) -> Result<String, String> {
        let guard = self.lock();
        let params = guard.as_ref().ok_or("render called before configure")?;
        let state = decode_state::<A>(Some(state))?;
        let value = A::render(&state, params).map_err(|e| e.0)?;
        serde_json::to_string(&value).map_err(|e| e.to_string())
    }
}

/// `e`'s message without "at line 1 column 2": the position is in the JSON
/// the host made from the config's `params` table, which nobody sees.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&position) {
        Some(bare) => bare.to_owned(),
        None => message,
    }
}

/// Decodes state bytes an older version of the plugin wrote, into (a copy
/// of) that version's state type: for [`Aggregation::migrate`]. The SDK
/// encodes states with postcard, so the old type must keep the old
/// fields, in their old order, with their old types.
pub fn decode_previous<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::msg(format!("old state: {e}")))
}

fn decode_state<A: Aggregation>(stored: Option<&[u8]>) -> Result<A::State, String> {
    match stored {
        None => Ok(A::State::default()),
        Some(bytes) => postcard::from_bytes(bytes).map_err(|e| {
            format!(
                "stored state could not be decoded as state format {} of `{}`: {e}",
                A::STATE_FORMAT,
                A::NAME
            )
        }),
    }
}

/// Exports an [`Aggregation`] as the plugin's component interface. Use it
/// exactly once, in the plugin crate's `lib.rs`.
#[macro_export]
macro_rules! export_aggregation {
    ($aggregation:ty) => {
        const _: () = {
            static RUNNER: $crate::Runner<$aggregation> = $crate::Runner::new();

            struct Export;

            impl $crate::__bindings::Guest for Export {
                fn metadata() -> $crate::__bindings::Metadata {
                    $crate::__bindings::Metadata {
                        name: <$aggregation as $crate::Aggregation>::NAME.into(),
                        version: ::core::env!("CARGO_PKG_VERSION").into(),
                        state_format: <$aggregation as $crate::Aggregation>::STATE_FORMAT,
                    }
                }

                fn configure(
                    params_json: ::std::string::String,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    RUNNER.configure(&params_json)
                }

                fn apply(
                    batch: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    RUNNER.apply(&batch)
                }

                fn render(
                    state: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    RUNNER.render(&state)
                }

                fn merges() -> bool {
                    <$aggregation as $crate::Aggregation>::MERGES
                }

                fn merge(
                    a: ::std::vec::Vec<u8>,
                    b: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    RUNNER.merge(&a, &b)
                }

                fn migrates_from() -> ::std::vec::Vec<u32> {
                    <$aggregation as $crate::Aggregation>::MIGRATES_FROM.to_vec()
                }

                fn migrate(
                    from_format: u32,
                    state: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    RUNNER.migrate(from_format, &state)
                }
            }

    $crate::__bindings::__export_aggregator!(Export with_types_in $crate::__bindings);
        };
    };
}

#[cfg(test)]
mod tests;

/// A stable 64-bit hash (XXH3) for plugins that sketch or sample: the same
/// bytes hash the same on every host and in every plugin version.
pub fn hash64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}
