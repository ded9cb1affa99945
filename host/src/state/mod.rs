//! Where states live: the consumer's [`cache::StateCache`] of newest
//! states, the [`flush::FlushJob`] that carries a commit interval's states
//! and offsets, the [`writer::StateWriter`] thread that writes it, and the
//! RocksDB [`store`]; the [`feed`] of written changes to watchers.

pub mod cache;
pub mod feed;
pub mod flush;
pub mod store;
pub mod writer;
