//! What an operator sees: the shared [`status::Status`] (counters,
//! progress, readiness), the Prometheus [`metrics`], and `wagg run`'s
//! [`progress`] reporting; [`alloc_count`] counts heap allocations for
//! the engine benchmark; [`scheduling`] puts ingestion behind queries.

pub mod alloc_count;
pub mod metrics;
pub mod panics;
pub mod progress;
pub mod scheduling;
pub mod snapshot;
pub mod status;
