//! `wagg plugin new`: a plugin crate from a template that builds to
//! `wasm32-wasip2` as is and carries a golden test.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::componentize::{JAVASCRIPT_SDK, Language, PYTHON_SDK};
use super::vendor::{VENDOR_DIR, vendor_sdk, write};

const TEMPLATE: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../templates/plugin/Cargo.toml.tmpl"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../templates/plugin/lib.rs.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../../templates/plugin/README.md.tmpl"),
    ),
    (
        "rust-toolchain.toml",
        "[toolchain]\ntargets = [\"wasm32-wasip2\"]\n",
    ),
    (".gitignore", "/target\n"),
];

const GOLDEN: [(&str, &str); 3] = [
    (
        "golden/basic/input.jsonl",
        include_str!("../../../templates/plugin/golden/basic/input.jsonl"),
    ),
    (
        "golden/basic/params.json",
        include_str!("../../../templates/plugin/golden/basic/params.json"),
    ),
    (
        "golden/basic/expected.json",
        include_str!("../../../templates/plugin/golden/basic/expected.json"),
    ),
];

const PYTHON_TEMPLATE: &[(&str, &str)] = &[
    (
        "plugin.py",
        include_str!("../../../templates/plugin-python/plugin.py.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../../templates/plugin-python/README.md.tmpl"),
    ),
    ("wagg_sdk/__init__.py", PYTHON_SDK),
    (".gitignore", "/target\n__pycache__/\n"),
];

const JAVASCRIPT_TEMPLATE: &[(&str, &str)] = &[
    (
        "plugin.js",
        include_str!("../../../templates/plugin-javascript/plugin.js.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../../templates/plugin-javascript/README.md.tmpl"),
    ),
    (
        "package.json",
        include_str!("../../../templates/plugin-javascript/package.json"),
    ),
    (".gitignore", "/target\n"),
];

/// Creates `parent/name/`, a plugin project in `language` (the same
/// aggregation and golden test in each); returns its path. `sdk` is for
/// Rust crates only.
pub fn new_project(
    parent: &Path,
    name: &str,
    language: Language,
    sdk: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let files = match (language, sdk) {
        (Language::Rust, sdk) => {
            return new_plugin(parent, name, sdk.map_or(Sdk::Vendored, Sdk::Path));
        }
        (_, Some(_)) => bail!(
            "--sdk is for Rust plugins; a {language:?} project gets a copy of the SDK embedded in wagg"
        ),
        (Language::Python, None) => PYTHON_TEMPLATE,
        (Language::Javascript, None) => JAVASCRIPT_TEMPLATE,
    };
    let dir = new_dir(parent, name)?;
    let sdk_files = if language == Language::Javascript {
        JAVASCRIPT_SDK
    } else {
        &[]
    };
    for (path, text) in files.iter().chain(sdk_files).chain(&GOLDEN) {
        write(&dir.join(path), &text.replace("{{name}}", name))?;
    }
    Ok(dir)
}

/// Where a new plugin crate's guest SDK comes from.
pub enum Sdk<'a> {
    /// A copy of the SDK embedded in this binary, written into the crate:
    /// the crate builds wherever it is copied.
    Vendored,
    /// A guest SDK crate on disk (SDK development), by absolute path.
    Path(&'a Path),
}

/// Creates `parent/name/` from the template; returns its path.
pub fn new_plugin(parent: &Path, name: &str, sdk: Sdk<'_>) -> anyhow::Result<PathBuf> {
    let dir = new_dir(parent, name)?;
    let vendored = matches!(sdk, Sdk::Vendored);
    let sdk = match sdk {
        Sdk::Vendored => format!("{VENDOR_DIR}/guest-sdk"),
        Sdk::Path(path) => sdk_path(path)?,
    };
    let lib = name.replace('-', "_");
    for (path, text) in TEMPLATE.iter().chain(&GOLDEN) {
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate}}", name)
            .replace("{{lib}}", &lib)
            .replace("{{sdk}}", &sdk);
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
    }
    if vendored {
        vendor_sdk(&dir)?;
    }
    Ok(dir)
}

/// `parent/name`, for a new project: the name checked, the path free.
fn new_dir(parent: &Path, name: &str) -> anyhow::Result<PathBuf> {
    validate_name(name)?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; choose another name or --dir",
            dir.display()
        );
    }
    Ok(dir)
}

/// `path` as a TOML string's content, checked to be a guest SDK crate.
fn sdk_path(path: &Path) -> anyhow::Result<String> {
    let sdk = path
        .canonicalize()
        .with_context(|| format!("the guest SDK at {} (see --sdk)", path.display()))?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "{} is not the wagg guest SDK crate (no Cargo.toml; see --sdk)",
            sdk.display()
        );
    }
    Ok(sdk
        .to_str()
        .context("the guest SDK path is not UTF-8")?
        // TOML basic strings: escape what would end or break them.
        .replace('\\', "\\\\")
        .replace('"', "\\\""))
}

/// Crate names cargo accepts, which also work as aggregation plugin names.
fn validate_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !starts_well || !rest_ok || name.len() > 64 {
        bail!(
            "plugin name {name:?}: use lowercase letters, digits, `-` and `_`, starting with a letter (at most 64)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_and_javascript_projects_carry_their_sdk_and_the_golden_case() {
        let parent = tempfile::tempdir().expect("tempdir");
        let py = new_project(parent.path(), "spend-py", Language::Python, None).expect("python");
        let plugin = std::fs::read_to_string(py.join("plugin.py")).expect("plugin.py");
        assert!(plugin.contains("name = \"spend-py\""), "{plugin}");
        assert_eq!(
            std::fs::read_to_string(py.join("wagg_sdk/__init__.py")).expect("sdk"),
            PYTHON_SDK
        );
        let js = new_project(parent.path(), "spend-js", Language::Javascript, None).expect("js");
        for file in ["plugin.js", "wagg-sdk.js", "wagg-sdk.d.ts", "package.json"] {
            assert!(js.join(file).is_file(), "{file}");
        }
        for dir in [&py, &js] {
            assert!(dir.join("golden/basic/expected.json").is_file());
            assert_eq!(
                Language::of_project(dir).ok(),
                Some(if dir == &py {
                    Language::Python
                } else {
                    Language::Javascript
                })
            );
        }
        let error = new_project(
            parent.path(),
            "other",
            Language::Python,
            Some(parent.path()),
        )
        .expect_err("--sdk is for Rust");
        assert!(
            error.to_string().contains("--sdk is for Rust plugins"),
            "{error}"
        );
        assert!(
            new_project(parent.path(), "spend-py", Language::Python, None).is_err(),
            "exists"
        );
    }

    #[test]
    fn names_are_checked_and_files_filled_in() {
        for bad in ["", "Upper", "1st", "has space", "dot.ted", "../escape"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = new_plugin(parent.path(), "spend-total", Sdk::Vendored).expect("new");
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        assert!(manifest.contains("name = \"spend-total\""));
        assert!(
            manifest.contains("path = \"wagg-sdk/guest-sdk\""),
            "{manifest}"
        );
        assert!(dir.join("wagg-sdk/guest-sdk/src/lib.rs").is_file());
        assert!(dir.join("wagg-sdk/wit/aggregator.wit").is_file());
        assert!(dir.join("Cargo.lock").is_file());
        assert!(!manifest.contains("{{"), "{manifest}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).expect("lib");
        assert!(lib.contains("const NAME: &'static str = \"spend-total\""));
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("readme");
        assert!(readme.contains("release/spend_total.wasm"), "{readme}");
        assert!(
            new_plugin(parent.path(), "spend-total", Sdk::Vendored).is_err(),
            "exists"
        );
    }
}
