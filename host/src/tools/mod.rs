//! Everything besides `wagg run`: benchmarks, the demo, the HTTP client
//! behind `wagg query`/`wagg lag`, and the plugin author tools.

pub mod author;
pub mod bench;
pub mod client;
pub mod demo;
pub mod rng;
