//! Plugins, from the bottom up: the sandbox they run in (`world`: the WIT bindings, the host state,
//! the WASI shims), why loading one or a call fails (`error`), the name an upload declares before it
//! is compiled (`declared`), the wasm runtime that compiles them
//! (`runtime`), an instance's calls and the checks of their output (`instance`), the hot-swap slots
//! (`slot`) and the registry of their versions (`registry`: upload, activate, rollback, shadow, hot
//! swap between batches).

pub mod bundled;
pub mod declared;
mod error;
pub mod instance;
pub mod registry;
pub mod runtime;
pub mod slot;
mod world;

pub use error::PluginError;
pub use instance::{DecodeOutput, PluginInstance, PluginReject, TransformOutput};
pub use runtime::{Limits, PluginCode, Runtime, RuntimeSettings, version_of};
pub use world::{RefusedSymbols, StateChanges, WORLD, WORLD_V1};
