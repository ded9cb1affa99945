//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// The cargo target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_owned()
}

/// Every example and testing plugin, built once per test binary (cargo keeps
/// later builds incremental), by short name: `count`, `top-n`, `hostile`...
pub fn plugins() -> &'static BTreeMap<String, PathBuf> {
    static PLUGINS: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        let built = wagg::tools::author::build::build_example_plugins(
            &workspace_root(),
            &target_dir().join("wasm-plugins"),
            true,
        )
        .expect("building the plugins for wasm32-wasip2");
        built
            .into_iter()
            .map(|(package, path)| (package.trim_start_matches("wagg-plugin-").to_owned(), path))
            .collect()
    })
}

pub fn plugin(name: &str) -> PathBuf {
    plugins()
        .get(name)
        .unwrap_or_else(|| panic!("no plugin called {name}"))
        .clone()
}

/// What the `stats` plugin should render for these values, computed the
/// textbook way (two passes), independently of the plugin's Welford update.
pub fn stats_json(xs: &[f64]) -> serde_json::Value {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let variance = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    serde_json::json!({
        "count": xs.len(),
        "min": xs.iter().copied().fold(f64::INFINITY, f64::min),
        "max": xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "mean": mean,
        "variance": variance,
    })
}

/// JSON equality where numbers compare with a tolerance of 1e-9 (relative,
/// absolute below 1)
/// (floating-point sums depend on order of evaluation).
#[allow(unused_imports)]
pub use wagg::tools::author::offline::json_approx_eq;

pub mod broker;
#[allow(dead_code)]
pub mod demo;
pub mod markdown;
pub mod sdk_plugins;
pub mod wagg_process;

/// The config most single-instance end-to-end tests run: topic `events` on
/// `broker`, state in `state/`, the API on `http_port`, small batches;
/// `extra` (sections) and `aggregations` are appended.
#[allow(dead_code)]
pub fn single_instance_toml(
    broker: &str,
    group_id: &str,
    http_port: u16,
    max_records: usize,
    extra: &str,
    aggregations: &str,
) -> String {
    format!(
        r#"
[source]
brokers = "{broker}"
group_id = "{group_id}"
topics = ["events"]

[state]
dir = "state"

[http]
listen = "127.0.0.1:{http_port}"

# Two apply workers, whatever the machine (see `apply.threads`).
[apply]
threads = 2

[batch]
max_records = {max_records}
max_delay_ms = 20
{extra}
{aggregations}"#
    )
}

/// The `[[aggregation]]` table of `count` alone (a deployment before
/// another aggregation is added).
#[allow(dead_code)]
pub fn count_toml() -> String {
    format!(
        "[[aggregation]]\nname = \"count\"\nplugin = {:?}\n",
        plugin("count")
    )
}

/// `[[aggregation]]` tables for `count` and `stats` (of `/amount`), as
/// most end-to-end tests configure them.
#[allow(dead_code)]
pub fn count_and_stats_toml() -> String {
    format!(
        r#"
[[aggregation]]
name = "count"
plugin = {:?}

[[aggregation]]
name = "stats"
plugin = {:?}
params = {{ field = "/amount" }}
"#,
        plugin("count"),
        plugin("stats")
    )
}

/// What `count_and_stats_toml` aggregations report once `n` records are in.
#[allow(dead_code)]
pub fn count_and_stats_applied(n: u64) -> std::collections::BTreeMap<String, u64> {
    [("count".to_owned(), n), ("stats".to_owned(), n)].into()
}
