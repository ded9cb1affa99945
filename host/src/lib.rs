//! wagg: consume Kafka topics, aggregate records per key with WebAssembly
//! plugins, keep the state in RocksDB and serve it over HTTP while
//! consuming. See `ARCHITECTURE.md` for the map.

pub mod api;
pub mod app;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dead_letter;
pub mod demo;
pub mod metrics;
pub mod partition_map;
pub mod partitioner;
pub mod pipeline;
pub mod plugin;
pub mod progress;
pub mod record;
pub mod rng;
pub mod source;
pub mod state_cache;
pub mod status;
pub mod store;
pub mod writer;
