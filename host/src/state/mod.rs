//! Where states live: the consumer's [`cache::StateCache`] of newest
//! states, the [`flush::FlushJob`] that carries a commit interval's states
//! and offsets, the [`writer::StateWriter`] thread that writes it, and the
//! RocksDB [`store`].

pub mod cache;
pub mod flush;
pub mod store;
pub mod writer;
