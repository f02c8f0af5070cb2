//! `sluice plugin sdk --out DIR`: the plugin SDK crate (`plugin-sdk`, with the WIT world it builds
//! against) written from the binary, so a plugin can be made, tested and built where there is no
//! sluice checkout, offline if the crates it needs are in cargo's cache.
//!
//! The sources are this build's own `plugin-sdk/` and `proto/wire/` (the wire format the SDK shares
//! with the host, written into the SDK's folder as `wire/`), compiled in; the manifests are the
//! workspace's settings filled in, without the crates' own dev-dependencies and tests, which a
//! dependent never builds. The SDK depends on no crate but the wire crate beside it, which depends
//! on none, so a plugin built against it needs no crates index and no network.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

macro_rules! sdk_file {
    ($path:literal) => {
        ($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk/", $path)))
    };
}

macro_rules! wire_file {
    ($path:literal) => {
        (concat!("wire/", $path), include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/wire/", $path)))
    };
}

/// The SDK's files other than its manifests, by their path in the folder written: the SDK's own,
/// and the wire crate's under `wire/`.
pub const FILES: &[(&str, &str)] = &[
    sdk_file!("src/lib.rs"),
    sdk_file!("src/bindings.rs"),
    sdk_file!("src/rt.rs"),
    sdk_file!("src/decimal.rs"),
    sdk_file!("src/field.rs"),
    sdk_file!("src/json.rs"),
    sdk_file!("src/runner.rs"),
    sdk_file!("src/state.rs"),
    sdk_file!("src/symbols.rs"),
    sdk_file!("src/testing.rs"),
    sdk_file!("src/time.rs"),
    sdk_file!("wit/sluice.wit"),
    wire_file!("src/lib.rs"),
];

/// The SDK's `Cargo.toml`: its one dependency the wire crate in `wire/`.
pub fn manifest() -> String {
    package("plugin-sdk", "Write sluice plugins in plain Rust.") + "sluice-wire = { path = \"wire\" }\n"
}

/// The wire crate's `Cargo.toml` (`wire/Cargo.toml`).
pub fn wire_manifest() -> String {
    package("sluice-wire", "The wire format of sluice's StreamData records.")
}

/// A manifest's package table, up to its (empty) dependencies table.
fn package(name: &str, description: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"{version}\"\nedition = \"2024\"\nrust-version = \"{rust}\"\n\
         license = \"Apache-2.0\"\ndescription = \"{description}\"\n\n[dependencies]\n",
        version = env!("CARGO_PKG_VERSION"),
        rust = env!("CARGO_PKG_RUST_VERSION"),
    )
}

/// Writes the SDK crate into `out` (created if missing; a folder holding anything else than an
/// SDK written before is refused). Returns the crate's folder.
///
/// # Errors
/// A folder that holds other files, or a write that fails.
pub fn write_sdk(out: &Path) -> anyhow::Result<PathBuf> {
    if out.is_file() {
        bail!("{} is a file: --out takes a folder", out.display());
    }
    if out.is_dir() && std::fs::read_dir(out)?.next().is_some() && !out.join("src/lib.rs").is_file() {
        bail!("{} is not empty and holds no SDK: choose another --out", out.display());
    }
    let (manifest, wire) = (manifest(), wire_manifest());
    let manifests = [("Cargo.toml", manifest.as_str()), ("wire/Cargo.toml", wire.as_str())];
    for (path, text) in FILES.iter().copied().chain(manifests) {
        let file = out.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(out.canonicalize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{prefix}{}", path.file_name().unwrap().to_string_lossy());
            if path.is_dir() {
                listed(&path, &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }

    /// Every file of `plugin-sdk/` and `proto/wire/` but their manifests and their own tests is
    /// written: a file added there and not here fails.
    #[test]
    fn every_file_of_the_sdk_is_bundled() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut on_disk = Vec::new();
        listed(&root.join("plugin-sdk"), "", &mut on_disk);
        listed(&root.join("proto/wire"), "wire/", &mut on_disk);
        on_disk.retain(|f| !f.ends_with("Cargo.toml") && !f.starts_with("tests/"));
        on_disk.sort();
        let mut bundled: Vec<String> = FILES.iter().map(|(p, _)| (*p).to_owned()).collect();
        bundled.sort();
        assert_eq!(bundled, on_disk);
    }

    /// The `[dependencies]` of the manifest at `path` (from the repository's root), comments left out.
    fn dependencies(path: &str) -> Vec<String> {
        let own = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap();
        let table = own.split("[dependencies]").nth(1).unwrap().split("\n[").next().unwrap();
        table.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
    }

    /// The SDK depends on the wire crate alone and the wire crate on none, and so do the manifests
    /// written for them: a plugin builds offline.
    #[test]
    fn the_sdk_depends_on_the_wire_crate_alone_and_it_on_none() {
        assert_eq!(dependencies("plugin-sdk/Cargo.toml"), ["sluice-wire = { workspace = true }"]);
        assert!(dependencies("proto/wire/Cargo.toml").is_empty());
        assert!(manifest().trim_end().ends_with("[dependencies]\nsluice-wire = { path = \"wire\" }"), "{}", manifest());
        assert!(wire_manifest().trim_end().ends_with("[dependencies]"), "{}", wire_manifest());
    }
}
