//! Why a plugin could not be loaded or one of its calls failed, and how each failure counts.

use std::time::Duration;

use super::world::{WORLD, WORLD_V1};

/// Why a plugin could not be loaded or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary (no \\0asm header)")]
    NotWasm,
    /// A core module instead of a component.
    #[error("a core wasm module, not a component: build the plugin for the wasm32-wasip2 target")]
    CoreModule,
    /// The component does not compile.
    #[error("the component does not compile: {0}")]
    Compile(String),
    /// The component does not implement the plugin world.
    #[error("not a sluice plugin (world {world}, or the earlier {earlier}): {0}", world = WORLD, earlier = WORLD_V1)]
    WrongWorld(String),
    /// The requested limits are outside what the runtime allows.
    #[error("invalid plugin limits: {0}")]
    Limits(String),
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// An instance could not be created.
    #[error("could not instantiate the plugin: {0}")]
    Instantiate(String),
    /// The plugin's `init` refused its configuration.
    #[error("plugin init failed: {0}")]
    Init(String),
    /// The plugin trapped (a panic, an unreachable, a bad memory access).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline and was interrupted.
    #[error("plugin call exceeded its deadline of {deadline:?}")]
    Timeout {
        /// The deadline that was exceeded.
        deadline: Duration,
    },
    /// The plugin tried to grow its memory past its cap.
    #[error("plugin exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The plugin returned more output than allowed.
    #[error("plugin output of {len} bytes exceeds the limit of {limit}")]
    OutputTooLarge {
        /// Output size in bytes.
        len: usize,
        /// The cap, in bytes.
        limit: usize,
    },
    /// The plugin returned bytes that are not valid records, inconsistent counts, or rejects that
    /// name an input past the batch or one input twice.
    #[error("plugin returned invalid output: {0}")]
    InvalidOutput(String),
    /// The plugin's state grew past its cap (`[plugins.<name>] state_bytes`).
    #[error("plugin state of {len} bytes exceeds the limit of {limit}")]
    StateTooLarge {
        /// State size in bytes (keys and values).
        len: usize,
        /// The cap, in bytes.
        limit: usize,
    },
}

impl PluginError {
    /// How a failed call counts in its metrics; `None` for errors that are not a call failing.
    pub fn failure(&self) -> Option<crate::telemetry::CallFailure> {
        use crate::telemetry::CallFailure;
        match self {
            PluginError::Trap(_) => Some(CallFailure::Trap),
            PluginError::Timeout { .. } => Some(CallFailure::Timeout),
            PluginError::MemoryLimit { .. }
            | PluginError::OutputTooLarge { .. }
            | PluginError::InvalidOutput(_)
            | PluginError::StateTooLarge { .. } => Some(CallFailure::Limit),
            _ => None,
        }
    }

    /// A short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::NotWasm => "not_wasm",
            PluginError::CoreModule => "core_module",
            PluginError::Compile(_) => "compile",
            PluginError::WrongWorld(_) => "wrong_world",
            PluginError::Limits(_) => "limits",
            PluginError::Engine(_) => "engine",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Init(_) => "init",
            PluginError::Trap(_) => "trap",
            PluginError::Timeout { .. } => "timeout",
            PluginError::MemoryLimit { .. } => "memory_limit",
            PluginError::OutputTooLarge { .. } => "output_too_large",
            PluginError::InvalidOutput(_) => "invalid_output",
            PluginError::StateTooLarge { .. } => "state_too_large",
        }
    }

    /// True for failures of a single call (the instance is replaced and the batch may be retried), as
    /// opposed to a plugin that cannot be loaded at all.
    pub fn is_call_failure(&self) -> bool {
        matches!(
            self,
            PluginError::Trap(_)
                | PluginError::Timeout { .. }
                | PluginError::MemoryLimit { .. }
                | PluginError::OutputTooLarge { .. }
                | PluginError::InvalidOutput(_)
                | PluginError::StateTooLarge { .. }
        )
    }
}
