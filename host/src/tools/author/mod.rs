//! Plugin author tools: `wagg plugin new` ([`scaffold`]), `wagg plugin
//! build` ([`build`]) and `wagg plugin test` ([`offline`]); [`vendor`]
//! holds the guest SDK a new crate gets a copy of; [`componentize`] builds
//! plugins written in Python and JavaScript; [`conformance`] checks a
//! guest SDK against the ABI's conformance vectors.

pub mod build;
pub mod componentize;
pub mod conformance;
pub mod offline;
pub mod scaffold;
pub mod vendor;
