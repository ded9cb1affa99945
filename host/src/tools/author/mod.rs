//! Plugin author tools: `wagg plugin new` ([`scaffold`]), `wagg plugin
//! build` ([`build`]) and `wagg plugin test` ([`offline`]).

pub mod build;
pub mod offline;
pub mod scaffold;
