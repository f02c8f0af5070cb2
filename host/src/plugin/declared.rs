//! What an uploaded component says about itself before it is compiled: the plugin name that the
//! SDK's `export!` writes into the custom section [`plugin_sdk::NAME_SECTION`] (the crate's package
//! name). Reading it walks the binary's sections (and the core modules a component nests), which
//! costs microseconds and no compile.

/// The plugin name `wasm` declares, if it is a component or module that carries one (components
/// built before the section existed, or without the SDK, declare none). Bytes that are not wasm
/// declare none; the compile refuses them afterwards with its own error.
pub fn declared_name(wasm: &[u8]) -> Option<String> {
    find(wasm, 0)
}

/// Nested components and modules are followed this deep at most.
const MAX_DEPTH: usize = 4;

/// Reads an unsigned LEB128 `u32` at `*at`, moving past it.
fn leb_u32(bytes: &[u8], at: &mut usize) -> Option<u32> {
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return u32::try_from(value).ok();
        }
    }
    None
}

fn find(wasm: &[u8], depth: usize) -> Option<String> {
    let header = wasm.get(..8)?;
    if &header[..4] != b"\0asm" || depth > MAX_DEPTH {
        return None;
    }
    // A core module has layer 0 (version 1), a component layer 1.
    let component = header[6..8] == [1, 0];
    let mut at = 8;
    while at < wasm.len() {
        let id = wasm[at];
        at += 1;
        let size = leb_u32(wasm, &mut at)? as usize;
        let body = wasm.get(at..at.checked_add(size)?)?;
        at += size;
        match id {
            0 => {
                let mut name_at = 0;
                let len = leb_u32(body, &mut name_at)? as usize;
                let name = body.get(name_at..name_at.checked_add(len)?)?;
                if name == plugin_sdk::NAME_SECTION.as_bytes() {
                    let value = &body[name_at + len..];
                    return std::str::from_utf8(value).ok().map(str::to_owned);
                }
            }
            // In a component: a core module (1) or a nested component (4).
            1 | 4 if component => {
                if let Some(name) = find(body, depth + 1) {
                    return Some(name);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::declared_name;
    use crate::plugin::bundled;

    /// Bundled plugins built with the SDK declare their crate's name; bytes that are not wasm, or a
    /// component made without the SDK, declare none.
    #[test]
    fn sdk_plugins_declare_their_crate_name() {
        assert_eq!(declared_name(bundled::OUTLIER_FILTER).as_deref(), Some("outlier-filter"));
        assert_eq!(declared_name(bundled::MIN_VOLUME).as_deref(), Some("min-volume"));
        assert_eq!(declared_name(bundled::by_name("kraken-v2").unwrap()).as_deref(), Some("kraken-v2"));
        assert_eq!(declared_name(b"not wasm at all"), None);
        assert_eq!(declared_name(&[]), None);
        // Truncated: a section longer than the bytes.
        assert_eq!(declared_name(&bundled::OUTLIER_FILTER[..64]), None);
    }
}
