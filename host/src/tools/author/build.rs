//! Building plugin crates into `.wasm` components with cargo.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The target every plugin is built for.
pub const PLUGIN_TARGET: &str = "wasm32-wasip2";

/// The example plugins shipped in `plugins/`, by package name.
pub const EXAMPLE_PLUGINS: &[&str] = &[
    "wagg-plugin-count",
    "wagg-plugin-sum",
    "wagg-plugin-stats",
    "wagg-plugin-latest",
    "wagg-plugin-top-n",
    "wagg-plugin-distinct",
];

/// Runs `cargo build --target wasm32-wasip2` for `packages` (all of the
/// manifest's when empty) and returns each built component's path by
/// package name.
///
/// `target_dir` must not be the target directory of a cargo process that is
/// running this code (a nested cargo would wait forever on its lock).
pub fn build_components(
    manifest_path: &Path,
    target_dir: &Path,
    profile: &str,
    packages: &[&str],
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--target",
            PLUGIN_TARGET,
        ])
        .arg("--profile")
        .arg(profile)
        .arg("--manifest-path")
        .arg(manifest_path)
        .arg("--target-dir")
        .arg(target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for package in packages {
        command.args(["-p", package]);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run cargo to build {}", manifest_path.display()))?;
    let mut built = BTreeMap::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading cargo's output")?;
            if let Some((package, path)) = wasm_artifact(&line) {
                built.insert(package, path);
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        let hint = match target_installed(manifest_path) {
            Some(false) => format!(
                "; the {PLUGIN_TARGET} target is not installed: `rustup target add {PLUGIN_TARGET}`"
            ),
            // cargo printed the compiler's errors above.
            _ => String::new(),
        };
        bail!(
            "building {} for {PLUGIN_TARGET} failed ({status}){hint}",
            manifest_path.display()
        );
    }
    Ok(built)
}

/// Whether the Rust toolchain that builds `manifest_path` has the plugin
/// target's standard library (`None`: cannot tell).
fn target_installed(manifest_path: &Path) -> Option<bool> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut command = Command::new(rustc);
    command.args(["--print", "target-libdir", "--target", PLUGIN_TARGET]);
    // A crate's rust-toolchain.toml picks the toolchain.
    if let Some(dir) = manifest_path.parent().filter(|d| d.is_dir()) {
        command.current_dir(dir);
    }
    let output = command.output().ok().filter(|o| o.status.success())?;
    let libdir = String::from_utf8_lossy(&output.stdout);
    Some(Path::new(libdir.trim()).is_dir())
}

/// The `(package name, .wasm path)` of a cargo `compiler-artifact` message.
fn wasm_artifact(line: &str) -> Option<(String, PathBuf)> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let wasm = message["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))?;
    let name = message["target"]["name"].as_str()?.replace('_', "-");
    Some((name, PathBuf::from(wasm)))
}

/// Builds the crate at `crate_dir` in release mode; returns the component.
pub fn build_plugin_crate(crate_dir: &Path, target_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest = crate_dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} has no Cargo.toml: not a plugin crate",
            crate_dir.display()
        );
    }
    let target_dir = target_dir.map_or_else(|| crate_dir.join("target"), Path::to_owned);
    let built = build_components(&manifest, &target_dir, "release", &[])?;
    let mut components = built.into_values();
    match (components.next(), components.next()) {
        (Some(path), None) => Ok(path),
        (None, _) => bail!(
            "{} produced no .wasm component; does it have `crate-type = [\"cdylib\"]`?",
            crate_dir.display()
        ),
        (Some(_), Some(_)) => bail!(
            "{} built several components; build one crate at a time",
            crate_dir.display()
        ),
    }
}

/// Builds the example plugins of the wagg workspace at `workspace_root` (and
/// the test-only ones) with the small, optimised `plugin` profile; returns
/// their paths by package name.
pub fn build_example_plugins(
    workspace_root: &Path,
    target_dir: &Path,
    include_testing: bool,
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut packages = EXAMPLE_PLUGINS.to_vec();
    if include_testing {
        packages.extend([
            "wagg-plugin-hostile",
            "wagg-plugin-stats-v2",
            "wagg-plugin-conformance",
        ]);
    }
    let built = build_components(
        &workspace_root.join("Cargo.toml"),
        target_dir,
        "plugin",
        &packages,
    )?;
    for package in &packages {
        if !built.contains_key(*package) {
            bail!("cargo did not report a component for {package}");
        }
    }
    Ok(built)
}

/// The directory of the example plugins' `.wasm` files: `explicit` when
/// given, else built from the workspace this binary was compiled from into
/// `<its target dir>/wasm-plugins` (for `wagg demo` and `wagg bench`).
pub fn example_plugins_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_owned());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("locating the wagg workspace")?;
    let exe = std::env::current_exe().context("locating the wagg binary")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the wagg binary is not in a cargo target directory; pass --plugins-dir")?;
    eprintln!("building the example plugins (the first time takes a minute)...");
    let built = build_example_plugins(workspace, &target.join("wasm-plugins"), false)
        .context("building the example plugins; or pass --plugins-dir with prebuilt ones")?;
    built
        .values()
        .next()
        .and_then(|p| p.parent())
        .map(Path::to_owned)
        .context("no plugins were built")
}

/// The path of example plugin `name` (`count`, `top-n`, ...) in `dir`.
pub fn example_plugin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("wagg_plugin_{}.wasm", name.replace('-', "_")))
}
