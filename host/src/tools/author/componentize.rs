//! Plugins written in Python or JavaScript: the guest SDKs embedded in the
//! binary, the componentize tools (installed on first use into wagg's
//! cache, never globally) and the build of a project directory into a
//! component.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::vendor::write;

/// The language a plugin is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Python,
    Javascript,
}

impl Language {
    /// What the project at `dir` is written in: a `Cargo.toml` makes it
    /// Rust, a `plugin.py` Python, a `plugin.js` JavaScript.
    pub fn of_project(dir: &Path) -> anyhow::Result<Self> {
        let found = [
            ("Cargo.toml", Self::Rust),
            (PYTHON_ENTRY, Self::Python),
            (JAVASCRIPT_ENTRY, Self::Javascript),
        ]
        .into_iter()
        .find(|(file, _)| dir.join(file).is_file());
        match found {
            Some((_, language)) => Ok(language),
            None => bail!(
                "{} is not a plugin project: it has no Cargo.toml (Rust), {PYTHON_ENTRY} (Python) or {JAVASCRIPT_ENTRY} (JavaScript); `wagg plugin new NAME --lang LANG` creates one",
                dir.display()
            ),
        }
    }
}

/// The module a Python plugin project defines its aggregation in.
pub const PYTHON_ENTRY: &str = "plugin.py";
/// The module a JavaScript plugin project defines its aggregation in.
pub const JAVASCRIPT_ENTRY: &str = "plugin.js";
/// Where `wagg plugin build` writes a Python or JavaScript plugin, in its
/// project.
pub const OUTPUT: &str = "target/plugin.wasm";

/// The Python SDK package, written as `wagg_sdk/__init__.py`.
pub const PYTHON_SDK: &str = include_str!("../../../../guest-sdk-python/wagg_sdk/__init__.py");
/// The JavaScript SDK module and its TypeScript types.
pub const JAVASCRIPT_SDK: &[(&str, &str)] = &[
    (
        "wagg-sdk.js",
        include_str!("../../../../guest-sdk-javascript/wagg-sdk.js"),
    ),
    (
        "wagg-sdk.d.ts",
        include_str!("../../../../guest-sdk-javascript/wagg-sdk.d.ts"),
    ),
];
const WIT: &str = include_str!("../../../../wit/aggregator.wit");
const WORLD: &str = "aggregator";
const TOOL_PINS: &str = include_str!("../../../templates/plugin-tools.txt");
const COMPONENTIZE_JS_SCRIPT: &str = include_str!("../../../templates/componentize-js.mjs");

/// Builds the Python or JavaScript project at `dir` into
/// `target_dir/plugin.wasm` (`wagg plugin build`: `dir/target`), with the
/// project's own copy of the SDK when it has one and the embedded one
/// otherwise; returns the component's path.
pub fn build_project(dir: &Path, language: Language, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let build_dir = target_dir.join("wagg-build");
    recreate(&build_dir)?;
    write(&build_dir.join("wit/aggregator.wit"), WIT)?;
    let output = target_dir.join("plugin.wasm");
    let mut command = match language {
        Language::Rust => bail!("Rust plugins are built with cargo"),
        Language::Python => python_command(dir, &build_dir)?,
        Language::Javascript => javascript_command(dir, &build_dir)?,
    };
    // stdout is for the component's path alone (scripts read it).
    command
        .arg(output.as_os_str())
        .stdout(std::process::Stdio::from(std::io::stderr()));
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!(
            "building {} failed ({status}); its errors are above",
            dir.display()
        );
    }
    Ok(output)
}

/// componentize-py over the project and (unless it has its own) the SDK.
fn python_command(dir: &Path, build_dir: &Path) -> anyhow::Result<Command> {
    let tool = ensure_tool(Language::Python)?;
    let mut command = Command::new(tool.join("bin/python"));
    // componentize-py imports the project: keep its bytecode out of it.
    command
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            "-c",
            "import sys; from componentize_py import script; sys.exit(script())",
        ])
        .arg("-d")
        .arg(build_dir.join("wit"))
        .args(["-w", WORLD, "componentize", "-p"])
        .arg(dir);
    if !dir.join("wagg_sdk").is_dir() {
        let sdk = build_dir.join("sdk");
        write(&sdk.join("wagg_sdk/__init__.py"), PYTHON_SDK)?;
        command.arg("-p").arg(sdk);
    }
    command.args(["plugin", "-o"]);
    Ok(command)
}

/// componentize-js over a copy of the project's modules (plus the SDK
/// unless it has its own): the modules import each other by relative path.
fn javascript_command(dir: &Path, build_dir: &Path) -> anyhow::Result<Command> {
    let tool = ensure_tool(Language::Javascript)?;
    let sources = build_dir.join("js");
    for (name, text) in JAVASCRIPT_SDK {
        write(&sources.join(name), text)?;
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let is_module = path.extension().is_some_and(|e| e == "js" || e == "mjs");
        if let (true, Some(name)) = (path.is_file() && is_module, path.file_name()) {
            std::fs::copy(&path, sources.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    let mut command = Command::new("node");
    command
        .arg(build_script(&tool)?)
        .arg(sources.join(JAVASCRIPT_ENTRY))
        .arg(build_dir.join("wit"))
        .arg(WORLD);
    Ok(command)
}

/// This wagg's build script in the componentize-js install (it imports the
/// package from there): named by its digest, so an install made by another
/// wagg (or by setup.sh) gets this one's script beside its own, and a
/// concurrent build never reads half a file.
fn build_script(tool: &Path) -> anyhow::Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(&Sha256::digest(COMPONENTIZE_JS_SCRIPT)[..8]);
    let script = tool.join(format!("componentize-js-{digest}.mjs"));
    if !script.is_file() {
        let partial = tool.join(format!(
            "componentize-js-{digest}.{}.tmp",
            std::process::id()
        ));
        write(&partial, COMPONENTIZE_JS_SCRIPT)?;
        std::fs::rename(&partial, &script)
            .with_context(|| format!("writing {}", script.display()))?;
    }
    Ok(script)
}

/// One pinned tool from `templates/plugin-tools.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub package: String,
    pub version: String,
}

/// The pinned componentize tool for `language`.
pub fn pinned_tool(language: Language) -> anyhow::Result<Tool> {
    let wanted = match language {
        Language::Rust => bail!("Rust plugins need no componentize tool"),
        Language::Python => "python",
        Language::Javascript => "javascript",
    };
    TOOL_PINS
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [lang, _registry, package, version] if lang == wanted => Some(Tool {
                    package: package.to_owned(),
                    version: version.to_owned(),
                }),
                _ => None,
            },
        )
        .with_context(|| format!("plugin-tools.txt pins no tool for {wanted}"))
}

/// `$WAGG_CACHE`, else `~/.cache/wagg` (where setup.sh caches tools too).
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    crate::tools::cache_dir()
        .context("neither WAGG_CACHE nor HOME is set: no cache directory for plugin build tools")
}

/// The tool's install directory, installing it first if needed. Installs
/// are serialized by a lock file, and an install counts only once its
/// `.installed` marker is written, so an interrupted one is redone.
pub fn ensure_tool(language: Language) -> anyhow::Result<PathBuf> {
    let tool = pinned_tool(language)?;
    let tools = cache_dir()?.join("plugin-tools");
    let name = tool.package.rsplit('/').next().unwrap_or(&tool.package);
    let dir = tools.join(format!("{name}-{}", tool.version));
    let marker = dir.join(".installed");
    if marker.is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    let lock = File::create(tools.join(".lock"))
        .with_context(|| format!("creating the lock in {}", tools.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", tools.display()))?;
    if marker.is_file() {
        return Ok(dir);
    }
    eprintln!(
        "installing {} {} into {} (once; about a minute)",
        tool.package,
        tool.version,
        dir.display()
    );
    recreate(&dir)?;
    match language {
        Language::Python => install_python_tool(&dir, &tool)?,
        _ => install_javascript_tool(&dir, &tool)?,
    }
    write(&marker, "")?;
    Ok(dir)
}

fn install_python_tool(dir: &Path, tool: &Tool) -> anyhow::Result<()> {
    run(
        Command::new("python3").args(["-m", "venv"]).arg(dir),
        "creating a Python virtualenv (needs python3 with venv; Debian: apt install python3-venv)",
    )?;
    run(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{}=={}", tool.package, tool.version)),
        &format!("installing {} {} from PyPI", tool.package, tool.version),
    )
}

fn install_javascript_tool(dir: &Path, tool: &Tool) -> anyhow::Result<()> {
    write(&dir.join("package.json"), "{\"private\": true}\n")?;
    run(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(dir)
            .arg(format!("{}@{}", tool.package, tool.version)),
        &format!(
            "installing {} {} from npm (needs Node.js 20 or later and npm)",
            tool.package, tool.version
        ),
    )
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: cannot run {command:?}"))?;
    if !status.success() {
        bail!("{what}: {command:?} failed ({status})");
    }
    Ok(())
}

fn recreate(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_but_rust_has_a_pinned_tool() {
        assert_eq!(
            pinned_tool(Language::Python).expect("python").package,
            "componentize-py"
        );
        assert_eq!(
            pinned_tool(Language::Javascript)
                .expect("javascript")
                .package,
            "@bytecodealliance/componentize-js"
        );
        assert!(pinned_tool(Language::Rust).is_err());
    }

    #[test]
    fn a_project_is_known_by_its_entry_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Language::of_project(dir.path()).is_err());
        std::fs::write(dir.path().join("plugin.js"), "").expect("write");
        assert_eq!(
            Language::of_project(dir.path()).expect("js"),
            Language::Javascript
        );
        std::fs::write(dir.path().join("plugin.py"), "").expect("write");
        assert_eq!(
            Language::of_project(dir.path()).expect("py"),
            Language::Python
        );
    }
}
