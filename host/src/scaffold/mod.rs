//! `sluice plugin new`: a plugin crate to start from, which builds, passes its own tests and matches
//! its own golden output from the first minute, inside this workspace (`plugins/<name>`) or outside.

pub mod sdk;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// What the new plugin does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Frames to records.
    Decode,
    /// Records to records.
    Transform,
}

/// The files written, relative to the crate's folder.
pub const FILES: &[&str] = &["Cargo.toml", "src/lib.rs", "frames.jsonl", "expected.jsonl", "README.md"];

/// Writes the crate `name` into `dir` (which must not exist yet), depending on the SDK at `sdk`.
/// Returns the crate's folder.
///
/// # Errors
/// A name that is not a crate name, a folder that exists, or a write that fails.
pub fn new_plugin(name: &str, kind: Kind, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if !valid {
        bail!("invalid plugin name {name:?}: use a-z, 0-9 and '-', starting with a letter");
    }
    if dir.exists() {
        bail!("{} already exists: choose another --dir or remove it", dir.display());
    }
    let sdk = sdk.canonicalize().with_context(|| {
        format!("the SDK at {} is not there (--sdk; `sluice plugin sdk --out DIR` writes one)", sdk.display())
    })?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "{} is not the plugin-sdk crate (no Cargo.toml): pass --sdk DIR (`sluice plugin sdk --out DIR` writes one)",
            sdk.display()
        );
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    // Inside a workspace that lists `plugins/*` the crate is a member; anywhere else it is its own.
    let member = in_sluice_plugins(&dir);
    let sdk_dep = relative(&dir, &sdk).unwrap_or(sdk);
    let lib = name.replace('-', "_");
    let type_name: String = name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    let files = [
        ("Cargo.toml", manifest(name, kind, &sdk_dep, member)),
        ("src/lib.rs", source(kind, &type_name)),
        ("frames.jsonl", FRAMES.to_owned()),
        ("expected.jsonl", if kind == Kind::Decode { EXPECTED_DECODE } else { EXPECTED_TRANSFORM }.to_owned()),
        ("README.md", readme(name, &lib, kind, member)),
    ];
    for (file, text) in files {
        std::fs::write(dir.join(file), text).with_context(|| format!("cannot write {}", dir.join(file).display()))?;
    }
    Ok(dir)
}

/// Whether `dir` is `<a sluice checkout>/plugins/<name>`.
fn in_sluice_plugins(dir: &Path) -> bool {
    let Some(parent) = dir.parent() else { return false };
    parent.file_name().is_some_and(|n| n == "plugins")
        && parent.parent().is_some_and(|root| root.join("plugin-sdk").is_dir() && root.join("wit").is_dir())
}

/// `to` relative to `from`, when they share more than the file system's root.
fn relative(from: &Path, to: &Path) -> Option<PathBuf> {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    Some(out)
}

fn manifest(name: &str, kind: Kind, sdk: &Path, member: bool) -> String {
    let what = match kind {
        Kind::Decode => "decodes venue frames into sluice records",
        Kind::Transform => "transforms sluice records",
    };
    let own_workspace = if member {
        String::new()
    } else {
        // Its own workspace, with the settings the bundled plugins are built with.
        "\n[workspace]\n\n[profile.release]\nlto = true\ncodegen-units = 1\npanic = \"abort\"\nstrip = true\n"
            .to_owned()
    };
    format!(
        "[package]\nname = \"{name}\"\ndescription = \"A sluice plugin: {what}.\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n[dependencies]\nplugin-sdk = {{ path = \"{}\" }}\n{own_workspace}",
        sdk.display()
    )
}

fn source(kind: Kind, type_name: &str) -> String {
    let template = match kind {
        Kind::Decode => DECODE_TEMPLATE,
        Kind::Transform => TRANSFORM_TEMPLATE,
    };
    template.replace("Template", type_name)
}

fn readme(name: &str, lib: &str, kind: Kind, member: bool) -> String {
    let build = if member {
        format!(
            "cargo build -p {name} --target wasm32-wasip2 --profile plugin\nls ../../target/wasm32-wasip2/plugin/{lib}.wasm"
        )
    } else {
        format!("cargo build --release --target wasm32-wasip2\nls target/wasm32-wasip2/release/{lib}.wasm")
    };
    let wasm = if member {
        format!("../../target/wasm32-wasip2/plugin/{lib}.wasm")
    } else {
        format!("target/wasm32-wasip2/release/{lib}.wasm")
    };
    let decode_with = match kind {
        Kind::Decode => String::new(),
        Kind::Transform => " \\\n    --decode-with binance".to_owned(),
    };
    format!(
        "# {name}\n\nA sluice plugin made with `sluice plugin new`. `src/lib.rs` is the plugin; `frames.jsonl` holds sample \
         frames (Binance combined-stream `aggTrade`) and `expected.jsonl` what the plugin makes of them.\n\n\
         Test it natively (no wasm involved):\n\n```sh\ncargo test\n```\n\n\
         Build the component (`rustup target add wasm32-wasip2` once):\n\n```sh\n{build}\n```\n\n\
         Run it on the sample frames and compare with the expected output (exit status 0 when equal):\n\n```sh\n\
         sluice plugin test {wasm} --frames frames.jsonl --expect expected.jsonl --strict{decode_with}\n```\n\n\
         Upload it to a running sluice with `curl -X PUT --data-binary @{wasm} -H \"Authorization: Bearer $TOKEN\" \
         http://127.0.0.1:8080/v1/plugins/{name}`.\n"
    )
}

/// Sample frames: Binance combined-stream `aggTrade` events.
const FRAMES: &str = r#"{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1700000000100,"s":"BTCUSDT","a":101,"p":"36500.10000000","q":"0.25000000","f":1,"l":1,"T":1700000000100,"m":false,"M":true}}
{"stream":"ethusdt@aggTrade","data":{"e":"aggTrade","E":1700000000200,"s":"ETHUSDT","a":202,"p":"2050.55000000","q":"1.50000000","f":2,"l":2,"T":1700000000200,"m":true,"M":true}}
{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","E":1700000000300,"s":"BTCUSDT","a":102,"p":"36499.90000000","q":"0.00100000","f":3,"l":3,"T":1700000000300,"m":true,"M":true}}
"#;

/// What the decode template makes of [`FRAMES`], as `sluice plugin test` prints it.
const EXPECTED_DECODE: &str = r#"{"source_id":0,"symbol":"BTCUSDT","symbol_id":1,"price_e8":3650010000000,"volume_e8":25000000,"timestamp_ms":1700000000100,"is_buy":true,"trade_id":101}
{"source_id":0,"symbol":"ETHUSDT","symbol_id":2,"price_e8":205055000000,"volume_e8":150000000,"timestamp_ms":1700000000200,"is_buy":false,"trade_id":202}
{"source_id":0,"symbol":"BTCUSDT","symbol_id":1,"price_e8":3649990000000,"volume_e8":100000,"timestamp_ms":1700000000300,"is_buy":false,"trade_id":102}
"#;

/// What the transform template (volume at least 0.01) makes of [`FRAMES`] decoded by `binance`.
const EXPECTED_TRANSFORM: &str = r#"{"source_id":0,"symbol":"BTCUSDT","symbol_id":1,"price_e8":3650010000000,"volume_e8":25000000,"timestamp_ms":1700000000100,"is_buy":true,"trade_id":101}
{"source_id":0,"symbol":"ETHUSDT","symbol_id":2,"price_e8":205055000000,"volume_e8":150000000,"timestamp_ms":1700000000200,"is_buy":false,"trade_id":202}
"#;

const DECODE_TEMPLATE: &str = include_str!("decode.rs.txt");
const TRANSFORM_TEMPLATE: &str = include_str!("transform.rs.txt");
