//! `src/bindings.rs` is the WIT world's glue, generated once and kept in the source so that a
//! plugin's build needs no proc macro and no crate from the network. This test generates it again
//! from `wit/` with the same options and fails when the two differ; `SLUICE_BLESS=1 cargo test -p
//! plugin-sdk --test bindings` rewrites the file after a WIT change.

use std::path::Path;

use wit_bindgen_core::{Files, WorldGenerator};

fn generated() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_path(root.join("wit")).expect("plugin-sdk/wit/ parses");
    let world = resolve.select_world(&[package], Some("sluice:plugin/plugin@0.2.0")).expect("the world exists");
    let options = wit_bindgen_rust::Opts {
        format: true,
        runtime_path: Some("crate::rt".into()),
        default_bindings_module: Some("plugin_sdk::bindings".into()),
        export_macro_name: Some("__export_sluice_plugin".into()),
        pub_export_macro: true,
        ..Default::default()
    };
    let mut files = Files::default();
    options.build().generate(&mut resolve, world, &mut files).expect("bindings generate");
    let mut text = String::new();
    for (_, bytes) in files.iter() {
        text.push_str(std::str::from_utf8(bytes).expect("generated Rust is UTF-8"));
    }
    text
}

#[test]
fn the_kept_bindings_are_what_the_wit_generates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bindings.rs");
    let fresh = generated();
    if std::env::var_os("SLUICE_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write src/bindings.rs");
        return;
    }
    let kept = std::fs::read_to_string(&path).expect("read src/bindings.rs");
    assert!(
        kept == fresh,
        "plugin-sdk/src/bindings.rs differs from what plugin-sdk/wit/ generates: run \
         `SLUICE_BLESS=1 cargo test -p plugin-sdk --test bindings` and commit the file"
    );
}
