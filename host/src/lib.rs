//! wagg: consume Kafka topics, aggregate records per key with WebAssembly
//! plugins, keep the state in RocksDB and serve it over HTTP while
//! consuming. See `ARCHITECTURE.md` for the map.
//!
//! The modules follow the data: `ingest` (crate-private) → [`apply`] → [`plugin`] →
//! [`state`] → [`serve`], with [`cluster`] beside the state (scale-out),
//! [`ops`] (status, metrics, progress) read by all of them, and [`tools`]
//! (bench, demo, client, plugin author tools) on top.

pub mod app;
pub mod apply;
pub mod cluster;
pub mod config;
pub(crate) mod fault_injection;
pub(crate) mod ingest;
pub mod kafka;
pub mod lifecycle;
pub mod ops;
pub mod plugin;
pub mod record;
pub mod serve;
pub mod state;
pub mod tools;
