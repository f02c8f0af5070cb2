//! Write sluice plugins in plain Rust.
//!
//! A plugin is a type that implements [`Plugin`]: `init` reads its configuration, `decode` turns one raw
//! WebSocket frame into trade [`Record`]s, and `transform` turns each input record into zero or more
//! output records. Both `decode` and `transform` are optional. [`export!`] makes the type a sluice
//! plugin when the crate is built for `wasm32-wasip2`; natively the same code runs under
//! [`testing::Harness`] in `cargo test`, with no wasm at all.
//!
//! ```
//! use plugin_sdk::{Config, Plugin, Reason, Records, StreamDataView};
//!
//! /// Drops trades smaller than `min_volume` (a decimal, e.g. `0.5`).
//! pub struct MinVolume { min_volume_e8: i64 }
//!
//! impl Plugin for MinVolume {
//!     fn init(config: &Config) -> Result<Self, Reason> {
//!         config.expect_only(&["min_volume"])?;
//!         let min_volume_e8 = config.decimal_e8("min_volume")?.unwrap_or(0);
//!         Ok(MinVolume { min_volume_e8 })
//!     }
//!
//!     fn transform(&mut self, trade: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
//!         if trade.volume_e8 >= self.min_volume_e8 {
//!             out.push_view(&trade);
//!         }
//!         Ok(())
//!     }
//! }
//! plugin_sdk::export!(MinVolume);
//!
//! # use plugin_sdk::{testing::Harness, Record};
//! let mut h = Harness::<MinVolume>::new(&[("min_volume", "0.5")])?;
//! let out = h.transform(&[Record { volume_e8: 10, ..Record::default() },
//!                         Record { volume_e8: 60_000_000, ..Record::default() }]);
//! assert_eq!(out.records.len(), 1);
//! # Ok::<(), Reason>(())
//! ```
//!
//! # Layout
//! - [`wire`]: the `StreamData` wire format: [`StreamDataView`] reads in place, [`Records`] writes.
//!   (Its framing helpers and the runner are the host's, hidden from these docs.)
//! - [`decimal`]: exact decimal strings to fixed point ([`parse_e8`]).
//! - [`json`]: allocation-free JSON access for frames; [`field`] reads a decoder's fields from it.
//! - [`time`]: venue timestamps to Unix milliseconds.
//! - [`state`]: [`State`], a map a transform keeps across batches, committed and restored by the host.
//! - [`testing`]: run a plugin natively in `cargo test`.
#![deny(missing_docs)]

pub mod decimal;
pub mod field;
pub mod json;
pub mod state;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod time;
/// The `StreamData` wire format: the [`sluice_wire`] crate, which the host shares.
pub mod wire {
    pub use sluice_wire::{Record, Records, StreamDataView, WireError};
}

mod runner;
mod symbols;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

pub use decimal::{DecimalError, parse_e8};
/// What the host and the `export!` macro use to run a plugin; not for plugin code.
#[doc(hidden)]
pub use runner::Runner;
pub use state::{State, StateStore};
pub use symbols::symbol_id;
pub use wire::{Record, Records, StreamDataView, WireError};

/// The reason a plugin gives for refusing a frame, a record or its configuration.
///
/// Build it from a `&'static str` (no allocation), a `String`, or any of the SDK's errors, so `?`
/// works on [`parse_e8`], [`json::Json::parse`] and friends.
///
/// ```
/// use plugin_sdk::{parse_e8, Reason};
/// fn price(text: &str) -> Result<i64, Reason> {
///     parse_e8(text).map_err(|e| Reason::field("price", e))
/// }
/// assert_eq!(price("1.2.3").unwrap_err().as_str(), "price: invalid character at byte 3 of decimal");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason(Cow<'static, str>);

impl Reason {
    /// A reason from text.
    pub fn new(text: impl Into<Cow<'static, str>>) -> Self {
        Reason(text.into())
    }

    /// A reason naming the field it concerns: `"<field>: <error>"`.
    pub fn field(field: &str, error: impl fmt::Display) -> Self {
        Reason(Cow::Owned(format!("{field}: {error}")))
    }

    /// The reason's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reason {}

impl From<&'static str> for Reason {
    fn from(s: &'static str) -> Self {
        Reason(Cow::Borrowed(s))
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        Reason(Cow::Owned(s))
    }
}

macro_rules! reason_from_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Reason {
            fn from(e: $t) -> Self {
                Reason(Cow::Owned(e.to_string()))
            }
        }
    )*};
}
reason_from_error!(DecimalError, json::JsonError, time::TimeError, WireError, state::StateError);

/// The reason `decode` gives when a plugin does not implement it.
pub const NO_DECODER: &str = "no decoder: this plugin only transforms";

/// A plugin: its state, built by `init`, and what it does to frames and records.
///
/// The host creates one instance per worker and calls it on one batch at a time, so `&mut self` state
/// (say, the last price per symbol) needs no locking. A plugin gets no clock, files or network: the
/// same input always gives the same output. State that must survive a retry, a restart or a new
/// version lives in a [`State`] the plugin returns from [`state`](Plugin::state).
pub trait Plugin: Sized + 'static {
    /// The format of the state the plugin keeps, `name@version` (e.g. `outlier-filter.last-price@1`),
    /// or empty (the default) for a plugin that keeps none. A new version of the plugin with the same
    /// format goes on from the state the old one left; a different format starts empty, so change the
    /// version whenever the meaning or encoding of the entries changes. A plugin that sets it returns
    /// its [`State`] from [`state`](Plugin::state), and the other way round, or `init` fails.
    ///
    /// ```
    /// # use plugin_sdk::{Config, Plugin, Reason, State, StateStore};
    /// struct Counts { per_symbol: State<u32, u64> }
    /// impl Plugin for Counts {
    ///     const STATE_FORMAT: &'static str = "counts.per-symbol@1";
    ///     fn init(_: &Config) -> Result<Self, Reason> { Ok(Counts { per_symbol: State::new() }) }
    ///     fn state(&mut self) -> Option<&mut dyn StateStore> { Some(&mut self.per_symbol) }
    /// }
    /// ```
    const STATE_FORMAT: &'static str = "";

    /// The state the host commits after each batch and restores before records run again; `None`
    /// (the default) for a stateless plugin. Change it only for records you accept: a record you
    /// reject after changing the state leaves the change in place. See [`state`](mod@crate::state).
    fn state(&mut self) -> Option<&mut dyn StateStore> {
        None
    }

    /// Builds the plugin from its configuration.
    ///
    /// # Errors
    /// A [`Reason`] when the configuration is invalid; the host then refuses to load the plugin.
    fn init(config: &Config) -> Result<Self, Reason>;

    /// Decodes one raw WebSocket frame, pushing zero or more records to `out` (frames that carry no
    /// trades, such as subscription acknowledgements and heartbeats, push nothing and return `Ok`).
    /// Set `symbol_id` with [`symbol_id`]; the host fills in `source_id` and `received_at_us`.
    ///
    /// # Errors
    /// A [`Reason`] for a frame that cannot be decoded; records it pushed before failing are dropped,
    /// and the host dead-letters the frame. The default refuses every frame with [`NO_DECODER`].
    fn decode(&mut self, frame: &[u8], out: &mut Records) -> Result<(), Reason> {
        let _ = (frame, out);
        Err(Reason::from(NO_DECODER))
    }

    /// Transforms one record, pushing zero or more output records to `out`. The default passes the
    /// record through unchanged.
    ///
    /// # Errors
    /// A [`Reason`] to reject the record; records it pushed before failing are dropped, and the host
    /// dead-letters the input record.
    fn transform(&mut self, record: StreamDataView<'_>, out: &mut Records) -> Result<(), Reason> {
        out.push_view(&record);
        Ok(())
    }
}

/// A plugin's configuration: key/value pairs from the host's config for the sources it serves.
///
/// ```
/// let config = plugin_sdk::Config::new(vec![("threshold_pct".into(), "5".into())]);
/// assert_eq!(config.parse::<u32>("threshold_pct").unwrap(), Some(5));
/// assert!(config.expect_only(&["other"]).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    /// A configuration from pairs; a later pair overrides an earlier one with the same key.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Config { pairs }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value of `key` parsed as `T`, if set.
    ///
    /// # Errors
    /// A [`Reason`] naming the key when the value does not parse.
    pub fn parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, Reason>
    where
        T::Err: fmt::Display,
    {
        self.get(key).map(|v| v.parse::<T>().map_err(|e| Reason::new(format!("config {key}={v:?}: {e}")))).transpose()
    }

    /// The value of `key` read exactly as a decimal with eight implied places, if set.
    ///
    /// # Errors
    /// A [`Reason`] naming the key when the value is not a decimal.
    pub fn decimal_e8(&self, key: &str) -> Result<Option<i64>, Reason> {
        self.get(key).map(|v| parse_e8(v).map_err(|e| Reason::new(format!("config {key}={v:?}: {e}")))).transpose()
    }

    /// Fails when a key outside `known` is set, so a typo is caught at load time.
    ///
    /// # Errors
    /// A [`Reason`] naming the unknown key and the known ones.
    pub fn expect_only(&self, known: &[&str]) -> Result<(), Reason> {
        match self.pairs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => Err(Reason::new(format!("unknown config key {k:?} (known: {})", known.join(", ")))),
        }
    }

    /// All pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Severity of a log line; see [`log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Very detailed.
    Trace,
    /// For debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something the operator should look at.
    Error,
}

/// Writes a line to the host's log, tagged with the plugin's name and version. Natively (in tests) it
/// goes to standard error. Keep it off per-record paths: each call crosses into the host.
///
/// ```
/// plugin_sdk::log(plugin_sdk::Level::Info, "loaded 3 symbols");
/// ```
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use bindings::sluice::plugin::host::{Level as L, log};
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {level:?}] {message}");
}

/// The glue between the WIT world and a [`Plugin`], for `wasm32` only: generated from the crate's
/// own copy of the WIT (`plugin-sdk/wit/`, so the packaged crate builds anywhere) and kept in the
/// source, so a plugin's build runs no proc macro and fetches no crate. `tests/bindings.rs` fails
/// when the file differs from what the WIT generates, and rewrites it with `SLUICE_BLESS=1`; a
/// unit test below fails when `plugin-sdk/wit/` differs from the top-level `wit/`.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[rustfmt::skip]
pub mod bindings;

#[cfg(target_arch = "wasm32")]
mod rt;

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::exports::sluice::plugin::guest::{Decoded, Guest, Reject, Transformed};
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::exports::sluice::plugin::state::Guest as StateGuest;

    /// Sends panic messages to the host's log at error level, where the host attaches the last one
    /// to the trap it reports (stderr goes nowhere inside the sandbox).
    pub fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| crate::log(crate::Level::Error, &format!("panic: {info}"))));
    }

    /// `name`'s bytes as an array, for the custom section [`export!`](crate::export) writes.
    pub const fn name_bytes<const N: usize>(name: &str) -> [u8; N] {
        let (bytes, mut out, mut i) = (name.as_bytes(), [0u8; N], 0);
        while i < N {
            out[i] = bytes[i];
            i += 1;
        }
        out
    }
}

/// The name of the wasm custom section in which [`export!`] declares the plugin's name (the crate's
/// package name): the host reads it from an upload's bytes before compiling them, and refuses a
/// different plugin uploaded under another's name unless told to replace it.
pub const NAME_SECTION: &str = "sluice:plugin-name";

/// Makes a [`Plugin`] type the plugin this crate exports. Use it once, at the crate root.
///
/// On `wasm32` it generates the component's exports and declares the plugin's name, the crate's
/// package name, in the custom section [`NAME_SECTION`]; natively it expands to nothing, so the
/// crate still builds and tests as a normal library.
///
/// ```
/// struct Passthrough;
/// impl plugin_sdk::Plugin for Passthrough {
///     fn init(_: &plugin_sdk::Config) -> Result<Self, plugin_sdk::Reason> { Ok(Passthrough) }
/// }
/// plugin_sdk::export!(Passthrough);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__private::{Decoded, Guest, Reject, StateGuest, Transformed};
            // The plugin's name (its package's), in a custom section the host reads before compiling:
            // see `NAME_SECTION`.
            #[unsafe(link_section = "sluice:plugin-name")]
            #[used]
            static PLUGIN_NAME: [u8; env!("CARGO_PKG_NAME").len()] =
                $crate::__private::name_bytes(env!("CARGO_PKG_NAME"));
            struct SluiceGuest;
            ::std::thread_local! {
                static RUNNER: ::std::cell::RefCell<$crate::Runner<$plugin>> =
                    ::std::cell::RefCell::new($crate::Runner::new());
            }
            fn rejects(list: &[(u32, $crate::Reason)]) -> ::std::vec::Vec<Reject> {
                list.iter().map(|(index, reason)| Reject { index: *index, reason: reason.to_string() }).collect()
            }
            impl Guest for SluiceGuest {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> Result<(), ::std::string::String> {
                    $crate::__private::install_panic_hook();
                    RUNNER.with(|r| r.borrow_mut().init(config).map_err(|e| e.to_string()))
                }
                fn decode(frames: ::std::vec::Vec<u8>) -> Decoded {
                    RUNNER.with(|r| {
                        let mut r = r.borrow_mut();
                        r.decode(&frames);
                        let (records, counts, rej) = r.take_decoded();
                        Decoded { records, counts, rejects: rejects(&rej) }
                    })
                }
                fn transform(batch: ::std::vec::Vec<u8>) -> Transformed {
                    RUNNER.with(|r| {
                        let mut r = r.borrow_mut();
                        r.transform(&batch);
                        let (records, rej) = r.take_transformed();
                        Transformed { records, rejects: rejects(&rej) }
                    })
                }
            }
            impl StateGuest for SluiceGuest {
                fn format() -> ::std::string::String {
                    <$plugin as $crate::Plugin>::STATE_FORMAT.into()
                }
                fn restore(entries: ::std::vec::Vec<(::std::vec::Vec<u8>, ::std::vec::Vec<u8>)>) {
                    // The WIT gives `restore` no error: what did not decode is skipped and logged.
                    if let Err(e) = RUNNER.with(|r| r.borrow_mut().restore(entries)) {
                        $crate::log($crate::Level::Error, &e.to_string());
                    }
                }
                fn changes() -> ::std::vec::Vec<(::std::vec::Vec<u8>, ::std::option::Option<::std::vec::Vec<u8>>)> {
                    RUNNER.with(|r| r.borrow_mut().take_changes())
                }
            }
    $crate::bindings::__export_sluice_plugin!(SluiceGuest with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod wit_copy {
    /// The SDK's copy of the WIT equals the repository's top-level `wit/*.wit` (skipped in a packaged
    /// crate, which has no repository around it). `wit/deps/` holds older worlds for the host only.
    #[test]
    fn the_sdks_wit_is_the_repositorys() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let source = here.join("../wit");
        if !source.is_dir() {
            return;
        }
        let files = |dir: &std::path::Path| {
            let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "wit"))
                .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
                .collect();
            v.sort();
            v
        };
        assert!(!files(&source).is_empty(), "no .wit files in wit/");
        assert!(
            files(&source) == files(&here.join("wit")),
            "plugin-sdk/wit/ differs from wit/: copy wit/*.wit to plugin-sdk/wit/"
        );
    }
}
