//! Not a plugin: built for `wasm32-wasip2` this is a component of the `wasi:cli/command` world, which
//! the host must refuse as "not a sluice plugin" when it is uploaded as one.

fn main() {
    println!("a command, not a sluice plugin");
}
