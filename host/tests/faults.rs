//! Faults stay small, with the real binary: each module plays one fault against `sluice run` and
//! checks what the README's Operations section says sluice does about it, and what shows it.
//!
//! - [`disk`]: the data directory's filesystem fills up.

mod common;
#[path = "faults/disk.rs"]
mod disk;
