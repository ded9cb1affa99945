//! The plugin runtime: loads WebAssembly aggregation components, runs them
//! sandboxed and limited, and applies batches of grouped records through
//! them.
//!
//! Vocabulary follows wasmtime: one [`PluginRuntime`] (the engine, shared)
//! loads [`LoadedPlugin`]s (compiled components, cached by content hash);
//! each worker owns [`PluginInstance`]s (a store plus an instance).

mod batch;
mod bindings;
mod error;
mod instance;
mod runtime;
mod sandbox;

pub use batch::{BatchOutcome, Change, Failure, GroupInput, GroupOutcome};
pub use error::{CallError, PluginError};
pub use instance::PluginInstance;
pub use runtime::{LoadedPlugin, PluginMetadata, PluginRuntime, RuntimeConfig, content_hash};
