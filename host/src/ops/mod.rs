//! What an operator sees: the shared [`status::Status`] (counters,
//! progress, readiness), the Prometheus [`metrics`], and `wagg run`'s
//! [`progress`] reporting.

pub mod metrics;
pub mod panics;
pub mod progress;
pub mod snapshot;
pub mod status;
