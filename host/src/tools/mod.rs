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

/// wagg's cache directory: `$WAGG_CACHE`, else `~/.cache/wagg` (where
/// `scripts/setup.sh` installs the test broker and the plugin tools).
pub fn cache_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("WAGG_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/wagg"))
        })
}
