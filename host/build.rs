//! Build steps the host needs before it compiles:
//! 1. `proto/` compiled to Rust by prost (through protox, a pure-Rust protobuf compiler, so no
//!    `protoc` binary is needed), plus the encoded descriptor set the Druid spec carries.
//! 2. Every crate in `plugins/` and `host/tests/plugins/` (the plugins only the tests use) built to a
//!    `wasm32-wasip2` component, so `sluice demo`, the tests and the benchmarks run real `.wasm` files. The wasm target is installed with rustup when missing.
//!    Set `SLUICE_PLUGIN_DIR` to a folder of prebuilt `.wasm` files to skip this step.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The package names of the crates in `plugins/` and `host/tests/plugins/` (each
/// folder with a `Cargo.toml`): every one is built to wasm, so a new plugin needs no list kept here.
fn plugin_packages(root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for dir in [root.join("plugins"), root.join("host/tests/plugins")] {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        names.extend(
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| std::fs::read_to_string(entry.path().join("Cargo.toml")).ok())
                .filter_map(|manifest| package_name(&manifest)),
        );
    }
    names.sort();
    names
}

/// The `name` of a manifest's `[package]` table.
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package && let Some(value) = line.strip_prefix("name").map(str::trim_start) {
            let value = value.strip_prefix('=')?.trim();
            return Some(value.trim_matches('"').to_owned());
        }
    }
    None
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("host/ sits in the workspace root").to_path_buf();
    compile_protos(&root);
    let plugin_dir = match env::var("SLUICE_PLUGIN_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => build_plugins(&root),
    };
    println!("cargo:rustc-env=SLUICE_PLUGIN_DIR={}", plugin_dir.display());
    println!("cargo:rerun-if-env-changed=SLUICE_PLUGIN_DIR");
}

fn compile_protos(root: &Path) {
    let proto_dir = root.join("proto");
    let file = proto_dir.join("sluice.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_dir]).unwrap_or_else(|e| panic!("proto/ does not compile: {e:?}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("descriptor.bin"), bytes).expect("write descriptor set");
    prost_build::Config::new().compile_fds(fds).expect("generate Rust from proto/");
}

fn build_plugins(root: &Path) -> PathBuf {
    for dir in ["plugins", "host/tests/plugins", "plugin-sdk/src", "plugin-sdk/wit", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());
    ensure_wasm_target();
    let target_dir =
        env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target")).join("plugins");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--profile", "plugin", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target_dir);
    let plugins = plugin_packages(root);
    if plugins.is_empty() {
        panic!("no plugin crates found in {}", root.join("plugins").display());
    }
    for p in &plugins {
        cmd.args(["-p", p]);
    }
    // The outer build's settings are for the host, not the wasm guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("could not run cargo to build the plugins: {e}"));
    if !status.success() {
        panic!("building the plugins in plugins/ for wasm32-wasip2 failed (see the output above)");
    }
    target_dir.join("wasm32-wasip2").join("plugin")
}

/// Installs the `wasm32-wasip2` standard library with rustup when the toolchain lacks it.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success());
    if let Some(out) = sysroot {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib/rustlib/wasm32-wasip2");
        if path.exists() {
            return;
        }
    }
    let status = Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).status();
    match status {
        Ok(s) if s.success() => {}
        _ => panic!("the wasm32-wasip2 target is missing and `rustup target add wasm32-wasip2` failed"),
    }
}
