//! Everything besides `wagg run`: benchmarks, the demo, the HTTP client
//! behind `wagg query`/`wagg lag`, the plugin author tools, and the test
//! broker the benchmarks and tests start.

pub mod author;
pub mod bench;
pub mod client;
pub mod demo;
pub mod diff;
pub mod rng;
pub mod state_admin;
pub mod tansu;
