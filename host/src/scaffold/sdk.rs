//! `sluice plugin sdk --out DIR`: the plugin SDK crate (`plugin-sdk`, with the WIT world it builds
//! against) written from the binary, so a plugin can be made, tested and built where there is no
//! sluice checkout, offline if the crates it needs are in cargo's cache.
//!
//! The sources are this build's own `plugin-sdk/`, compiled in; the manifest is the one
//! `cargo package -p plugin-sdk` would write (the workspace's settings filled in, without the SDK's
//! own dev-dependencies and tests, which a dependent never builds). The SDK depends on no crate, so
//! a plugin built against it needs no crates index and no network.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

macro_rules! sdk_file {
    ($path:literal) => {
        ($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk/", $path)))
    };
}

/// The SDK's files other than its manifest, by their path in the crate.
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
    sdk_file!("src/wire.rs"),
    sdk_file!("wit/sluice.wit"),
];

/// The SDK's `Cargo.toml`.
pub fn manifest() -> String {
    format!(
        "[package]\nname = \"plugin-sdk\"\nversion = \"{version}\"\nedition = \"2024\"\nrust-version = \"{rust}\"\n\
         license = \"Apache-2.0\"\ndescription = \"Write sluice plugins in plain Rust.\"\n\n\
         [dependencies]\n",
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
    let manifest = manifest();
    for (path, text) in FILES.iter().copied().chain([("Cargo.toml", manifest.as_str())]) {
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

    /// Every file of `plugin-sdk/` but its manifest and its own tests is written: a file added there
    /// and not here fails.
    #[test]
    fn every_file_of_the_sdk_is_bundled() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
        let mut on_disk = Vec::new();
        listed(&root, "", &mut on_disk);
        on_disk.retain(|f| f != "Cargo.toml" && !f.starts_with("tests/"));
        on_disk.sort();
        let mut bundled: Vec<String> = FILES.iter().map(|(p, _)| (*p).to_owned()).collect();
        bundled.sort();
        assert_eq!(bundled, on_disk);
    }

    /// The SDK depends on no crate, and neither does the manifest written for it.
    #[test]
    fn the_sdk_and_its_manifest_depend_on_no_crate() {
        let own =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk/Cargo.toml")).unwrap();
        let dependencies = own.split("[dependencies]").nth(1).unwrap().split('[').next().unwrap();
        assert!(dependencies.trim().is_empty(), "plugin-sdk depends on {dependencies}: write it in manifest()");
        assert!(manifest().trim_end().ends_with("[dependencies]"), "{}", manifest());
    }
}
