//! Plugins written with the Python and JavaScript guest SDKs, built once
//! per test binary with the same code as `wagg plugin build` (the
//! componentize tools come from the cache `scripts/setup.sh --plugins`
//! fills, or are installed there on first use).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use wagg::plugin::{PluginRuntime, RuntimeConfig};
use wagg::tools::author::componentize::{Language, build_project};

use super::{target_dir, workspace_root};

/// The languages with a guest SDK besides Rust.
pub const LANGUAGES: [Language; 2] = [Language::Python, Language::Javascript];

pub fn language_dir(language: Language) -> &'static str {
    match language {
        Language::Rust => "rust",
        Language::Python => "python",
        Language::Javascript => "javascript",
    }
}

/// `plugins/<plugin>/<language>/` built into a component, e.g.
/// `sdk_plugin(Language::Python, "count")` or `(.., "testing/hostile")`.
pub fn sdk_plugin(language: Language, plugin: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<(&'static str, String), PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let id = (language_dir(language), plugin.to_owned());
    if let Some(path) = built.get(&id) {
        return path.clone();
    }
    let project = workspace_root()
        .join("plugins")
        .join(plugin)
        .join(language_dir(language));
    let out = target_dir()
        .join("sdk-plugins")
        .join(language_dir(language))
        .join(plugin);
    // A fresh output directory: each build differs in its bytes, and its
    // compiled cache (see `cached_runtime_config`) would grow by ~40 MB a run.
    if out.exists() {
        std::fs::remove_dir_all(&out).expect("removing the last build");
    }
    let path = build_project(&project, language, &out)
        .unwrap_or_else(|e| panic!("building {}: {e:#}", project.display()));
    built.insert(id, path.clone());
    path
}

/// Runtime settings that cache compiled components across the tests of a
/// binary: a Python or JavaScript component takes seconds to compile. The
/// cache is emptied when the first test of a binary asks for it.
pub fn cached_runtime_config() -> RuntimeConfig {
    static CLEARED: std::sync::Once = std::sync::Once::new();
    let dir = target_dir().join("sdk-plugins/compiled");
    CLEARED.call_once(|| {
        let _ = std::fs::remove_dir_all(&dir);
    });
    RuntimeConfig {
        cache_dir: Some(dir),
        ..RuntimeConfig::default()
    }
}

pub fn cached_runtime() -> PluginRuntime {
    PluginRuntime::new(cached_runtime_config()).expect("plugin runtime")
}
