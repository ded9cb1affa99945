//! The guest SDK, the ABI crate and the WIT world, embedded in the binary
//! and written into each new plugin crate (`wagg-sdk/`): a plugin crate
//! then builds wherever it is copied, with no checkout of wagg and no
//! network beyond cargo's registry cache.

use std::path::Path;

use anyhow::{Context, bail};

/// Where a new crate's copy of the SDK goes, relative to the crate.
pub const VENDOR_DIR: &str = "wagg-sdk";

/// The files copied, by their path in the wagg workspace (and under
/// [`VENDOR_DIR`]). Tests are left out: they need the workspace's
/// dev-dependencies. `vendored_files_cover_the_sdk` fails when a source
/// file is added to the SDK and not here.
const FILES: &[(&str, &str)] = &[
    (
        "guest-sdk/Cargo.toml",
        include_str!("../../../../guest-sdk/Cargo.toml"),
    ),
    (
        "guest-sdk/README.md",
        include_str!("../../../../guest-sdk/README.md"),
    ),
    (
        "guest-sdk/src/lib.rs",
        include_str!("../../../../guest-sdk/src/lib.rs"),
    ),
    (
        "guest-sdk/src/json.rs",
        include_str!("../../../../guest-sdk/src/json.rs"),
    ),
    ("abi/Cargo.toml", include_str!("../../../../abi/Cargo.toml")),
    ("abi/src/lib.rs", include_str!("../../../../abi/src/lib.rs")),
    (
        "wit/aggregator.wit",
        include_str!("../../../../wit/aggregator.wit"),
    ),
];

/// Supplies `[workspace.package]` and `[workspace.dependencies]`, which
/// the SDK's manifests inherit from.
const WORKSPACE_MANIFEST: &str = include_str!("../../../../Cargo.toml");

/// The versions wagg's own plugins were built and tested with; cargo keeps
/// what the new crate uses and drops the rest.
const WORKSPACE_LOCKFILE: &str = include_str!("../../../../Cargo.lock");

/// Writes the SDK into `crate_dir/wagg-sdk/` and a `Cargo.lock`; the crate's
/// manifest refers to `wagg-sdk/guest-sdk` by a relative path.
pub fn vendor_sdk(crate_dir: &Path) -> anyhow::Result<()> {
    let workspace: toml::Table = WORKSPACE_MANIFEST
        .parse()
        .context("wagg's embedded workspace manifest")?;
    for (path, text) in FILES {
        let text = if path.ends_with("Cargo.toml") {
            standalone_manifest(text, &workspace)
                .with_context(|| format!("making {path} standalone"))?
        } else {
            (*text).to_owned()
        };
        write(&crate_dir.join(VENDOR_DIR).join(path), &text)?;
    }
    write(&crate_dir.join("Cargo.lock"), WORKSPACE_LOCKFILE)
}

pub(super) fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `manifest` with what it inherits from the workspace written out, its
/// path dependencies pointing at the vendored siblings, and no
/// dev-dependencies (they would need the workspace).
fn standalone_manifest(manifest: &str, workspace: &toml::Table) -> anyhow::Result<String> {
    let mut doc: toml::Table = manifest.parse()?;
    let inherited = |section: &str| -> anyhow::Result<toml::Table> {
        workspace
            .get("workspace")
            .and_then(|w| w.get(section))
            .and_then(toml::Value::as_table)
            .cloned()
            .with_context(|| format!("no [workspace.{section}]"))
    };
    let package_fields = inherited("package")?;
    let dependencies = inherited("dependencies")?;
    if let Some(package) = doc.get_mut("package").and_then(toml::Value::as_table_mut) {
        for (field, value) in package.iter_mut() {
            if inherits(value) {
                *value = package_fields
                    .get(field)
                    .cloned()
                    .with_context(|| format!("package.{field} is not in [workspace.package]"))?;
            }
        }
        package.insert("publish".into(), toml::Value::Boolean(false));
    }
    doc.remove("dev-dependencies");
    if let Some(deps) = doc
        .get_mut("dependencies")
        .and_then(toml::Value::as_table_mut)
    {
        for (name, spec) in deps.iter_mut() {
            if inherits(spec) {
                let shared = dependencies.get(name).with_context(|| {
                    format!("dependency {name} is not in [workspace.dependencies]")
                })?;
                *spec = resolved_dependency(spec, shared)?;
            }
        }
    }
    let mut text = String::from(concat!(
        "# Vendored by `wagg plugin new` from wagg ",
        env!("CARGO_PKG_VERSION"),
        "; to upgrade, replace the\n# wagg-sdk directory with a newer wagg's (`wagg plugin new` writes one).\n\n"
    ));
    text.push_str(&toml::to_string(&doc)?);
    Ok(text)
}

fn inherits(value: &toml::Value) -> bool {
    value
        .get("workspace")
        .and_then(toml::Value::as_bool)
        .unwrap_or(false)
}

/// A `{ workspace = true, features = [...] }` dependency as the workspace
/// defines it (a version string or a table), its own keys added; a path
/// becomes the vendored sibling directory.
fn resolved_dependency(local: &toml::Value, shared: &toml::Value) -> anyhow::Result<toml::Value> {
    let mut table = match shared {
        toml::Value::String(version) => {
            toml::Table::from_iter([("version".to_owned(), toml::Value::String(version.clone()))])
        }
        toml::Value::Table(table) => table.clone(),
        other => bail!("unexpected workspace dependency {other}"),
    };
    if let Some(path) = table.get("path").and_then(toml::Value::as_str) {
        let sibling = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("workspace path {path}"))?;
        table.insert("path".into(), toml::Value::String(format!("../{sibling}")));
    }
    if let Some(local) = local.as_table() {
        for (key, value) in local.iter().filter(|(key, _)| *key != "workspace") {
            table.insert(key.clone(), value.clone());
        }
    }
    Ok(toml::Value::Table(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendored_files_cover_the_sdk() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace");
        for dir in ["guest-sdk/src", "abi/src", "wit"] {
            for entry in std::fs::read_dir(root.join(dir)).expect("read dir") {
                let name = entry.expect("entry").file_name();
                let name = name.to_str().expect("utf-8");
                if name == "tests.rs" {
                    continue;
                }
                let path = format!("{dir}/{name}");
                assert!(
                    FILES.iter().any(|(vendored, _)| *vendored == path),
                    "{path} is not vendored into new plugin crates: add it to FILES"
                );
            }
        }
    }

    #[test]
    fn manifests_become_standalone() {
        let workspace: toml::Table = WORKSPACE_MANIFEST.parse().expect("workspace");
        let (_, sdk) = FILES[0];
        let text = standalone_manifest(sdk, &workspace).expect("standalone");
        assert!(!text.contains("workspace"), "{text}");
        let doc: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(doc["package"]["edition"].as_str(), Some("2024"));
        assert_eq!(
            doc["dependencies"]["wagg-abi"]["path"].as_str(),
            Some("../abi")
        );
        assert!(
            doc["dependencies"]["serde"]["features"].is_array(),
            "{text}"
        );
        let (_, abi) = FILES[4];
        let abi = standalone_manifest(abi, &workspace).expect("standalone");
        assert!(!abi.contains("proptest"), "{abi}");
    }
}
