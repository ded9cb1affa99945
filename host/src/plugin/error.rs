use std::path::PathBuf;
use std::time::Duration;

/// Loading or configuring a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot start the plugin engine: {0}")]
    Engine(String),
    // The I/O error is part of the message, not a `source`: chained
    // displays (`{:#}`) would print the OS error twice.
    #[error("cannot read plugin {path}: {error}{}", read_hint(error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a wagg plugin component: {message}")]
    NotAPlugin { path: PathBuf, message: String },
    #[error("plugin {plugin} rejected its params: {message}")]
    Params { plugin: String, message: String },
    #[error("cannot instantiate plugin {plugin}: {message}")]
    Instantiate { plugin: String, message: String },
}

fn read_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            " (a relative path is relative to the config file's directory; `wagg plugin build` prints where a plugin crate's .wasm is)"
        }
        _ => "",
    }
}

/// One call into a plugin failed. Everything but [`CallError::Instantiate`]
/// may be caused by a particular record, so callers can isolate it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("plugin {plugin} exceeded its time budget of {budget:?} per call")]
    Timeout { plugin: String, budget: Duration },
    #[error("plugin {plugin} exceeded its memory limit of {} MiB", limit_bytes >> 20)]
    MemoryLimit { plugin: String, limit_bytes: usize },
    #[error("plugin {plugin} overflowed its call stack")]
    StackOverflow { plugin: String },
    #[error("plugin {plugin} trapped: {message}{}", quote_stderr(stderr))]
    Trap {
        plugin: String,
        message: String,
        stderr: String,
    },
    #[error("plugin {plugin} failed the call: {message}")]
    Rejected { plugin: String, message: String },
    #[error("plugin {plugin} returned an invalid result: {message}")]
    BadOutput { plugin: String, message: String },
    #[error("plugin {plugin} returned a state of {size} bytes, over the cap of {limit} bytes")]
    StateTooLarge {
        plugin: String,
        size: usize,
        limit: usize,
    },
    #[error("cannot instantiate plugin {plugin}: {message}")]
    Instantiate { plugin: String, message: String },
}

impl CallError {
    /// Whether retrying with fewer records could avoid the error.
    pub fn may_be_caused_by_a_record(&self) -> bool {
        !matches!(self, CallError::Instantiate { .. })
    }
}

fn quote_stderr(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(" (plugin stderr: {stderr})")
    }
}
