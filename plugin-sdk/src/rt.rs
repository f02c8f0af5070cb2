//! The little runtime the generated bindings (`bindings.rs`) call: a guard that frees a lowered
//! list, the once-only static constructors, and the canonical ABI's allocator hook.
//!
//! It is the part of `wit-bindgen`'s runtime our world uses, kept here so a plugin's build pulls in
//! no crate besides this one: no proc macro, no WIT parser, no network on the first build.

use core::alloc::Layout;
use core::ptr::{self, NonNull};

#[cfg(not(target_env = "p2"))]
compile_error!("sluice plugins are WASI 0.2 components: build them with `--target wasm32-wasip2`");

/// Frees a block of canonical ABI data lowered for the host, unless [`Cleanup::forget`] hands it on.
pub struct Cleanup {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Cleanup {
    /// Allocates `layout`; a zero-sized layout gives a null pointer and nothing to free.
    pub fn new(layout: Layout) -> (*mut u8, Option<Cleanup>) {
        if layout.size() == 0 {
            return (ptr::null_mut(), None);
        }
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        (ptr.as_ptr(), Some(Cleanup { ptr, layout }))
    }

    /// Leaves the block to its new owner (the host frees it through the post-return call).
    pub fn forget(self) {
        core::mem::forget(self);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with `layout` in `new` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Runs the module's static constructors before the first export runs, once.
pub fn run_ctors_once() {
    static mut RUN: bool = false;
    // SAFETY: a component instance is single-threaded; `__wasm_call_ctors` is synthesized by
    // `wasm-ld` for modules that run their constructors themselves.
    unsafe {
        if !RUN {
            unsafe extern "C" {
                fn __wasm_call_ctors();
            }
            __wasm_call_ctors();
            RUN = true;
        }
    }
}

/// On WASI 0.2 the standard library exports `cabi_realloc` itself; nothing to link.
pub fn maybe_link_cabi_realloc() {}
