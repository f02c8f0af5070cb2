//! The plugin registry: every uploaded version of every plugin, stored content-addressed under the
//! data directory, and the version each plugin runs.
//!
//! - **Store.** A version's `.wasm` lives at `plugins/blobs/<sha256>.wasm`; `plugins/registry.json`
//!   lists each plugin's versions, its active version, the versions it was activated from (for
//!   rollback) and its shadow version. Both are written to a temporary file and renamed into place,
//!   so a crash leaves the old file or the new one, never half of either; both survive restarts.
//! - **Swap.** Each plugin has a [`Slot`] holding its active (and shadow) compiled code in an
//!   [`ArcSwap`]. Workers hold a [`BoundPlugin`] and call [`BoundPlugin::sync`] before each batch:
//!   one atomic load, and a new instance only when the slot changed. So a batch in flight finishes on
//!   the version it started with and the next batch runs on the new one; no record is dropped or
//!   processed twice, since the batches themselves are untouched.
//! - **Shadow.** A version activated in shadow mode runs beside the active one on the same batches;
//!   its output is compared record by record with the active version's and counted, never delivered.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::declared::declared_name;
pub use super::slot::{BoundPlugin, Running, Shadow, ShadowStageView, ShadowStages, Slot};
use super::{Limits, PluginCode, PluginError, PluginInstance, Runtime, version_of};

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The plugin name is not one the registry accepts.
    #[error("invalid plugin name {0:?}: use 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit")]
    BadName(String),
    /// No plugin has this name.
    #[error("no plugin named {0:?}")]
    UnknownPlugin(String),
    /// The plugin has no such version.
    #[error("plugin {plugin:?} has no version {version:?}")]
    UnknownVersion {
        /// The plugin.
        plugin: String,
        /// The version asked for.
        version: String,
    },
    /// The bytes are not a plugin: not wasm, a core module, not compiling, or another world.
    #[error("{0}")]
    Invalid(PluginError),
    /// The plugin's `init` refused the configuration of a source bound to it.
    #[error("init refused the configuration of source {source_name:?}: {error}")]
    InitFailed {
        /// The source whose configuration was refused (empty when no source is bound).
        source_name: String,
        /// What `init` said.
        error: PluginError,
    },
    /// The upload is another rule than the plugin's active version: it declares another name, or
    /// keeps another state format (refused unless replacing is asked for).
    #[error("{0}")]
    NotSameRule(String),
    /// The operation conflicts with the plugin's state (deleting the active version, promoting
    /// without a shadow, rolling back past the first version).
    #[error("{0}")]
    Conflict(String),
    /// Reading or writing the store failed.
    #[error("plugin store: {0}")]
    Io(String),
}

/// One version as the registry lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionMeta {
    /// `sha256:` and the first 16 hex digits of the digest.
    pub version: String,
    /// The full SHA-256 of the `.wasm`, hex.
    pub digest: String,
    /// Size of the `.wasm`.
    pub size_bytes: u64,
    /// When it was uploaded, milliseconds since the Unix epoch.
    pub uploaded_at_ms: i64,
}

/// A plugin's state on disk.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct PluginMeta {
    versions: Vec<VersionMeta>,
    active: Option<String>,
    activated_at_ms: Option<i64>,
    /// Versions it was active on before, oldest first; rollback returns to the last.
    history: Vec<String>,
    shadow: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    plugins: BTreeMap<String, PluginMeta>,
}

/// What an upload answers.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Uploaded {
    /// The plugin.
    pub name: String,
    /// The version id.
    pub version: String,
    /// The full SHA-256 of the bytes.
    pub digest: String,
    /// Size of the `.wasm`.
    pub size_bytes: u64,
    /// False when these bytes were already a version of this plugin (nothing changed).
    pub created: bool,
}

/// How a version is activated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// It becomes the version that runs and delivers.
    Active,
    /// It runs beside the active version, compared, delivering nothing.
    Shadow,
}

/// A plugin as the registry keeps it in memory.
struct Entry {
    meta: PluginMeta,
    /// Compiled versions (the active and shadow ones, and whatever was uploaded since start).
    compiled: HashMap<String, Arc<PluginCode>>,
    slot: Option<Arc<Slot>>,
}

/// Configuration of one source bound to a plugin: `init` must accept it before a version is stored.
#[derive(Clone, Debug)]
pub struct Binding {
    /// The source's name.
    pub source: String,
    /// Its plugin config.
    pub config: Vec<(String, String)>,
}

/// A plugin's active version, compiled, and the name it declares.
type ActiveRule = (Arc<PluginCode>, Option<String>);

/// The registry.
pub struct Registry {
    runtime: Arc<Runtime>,
    dir: PathBuf,
    limits: HashMap<String, Limits>,
    /// The sources bound to each plugin; chain edits change them.
    bindings: Mutex<HashMap<String, Vec<Binding>>>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

/// A plugin as `GET /v1/plugins` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct PluginView {
    /// The plugin.
    pub name: String,
    /// The version that runs.
    pub active: Option<String>,
    /// When it was activated, milliseconds since the Unix epoch.
    pub activated_at_ms: Option<i64>,
    /// The version rollback returns to.
    pub previous: Option<String>,
    /// The shadow version and its comparison so far.
    pub shadow: Option<ShadowView>,
    /// Every stored version, oldest first.
    pub versions: Vec<VersionView>,
}

/// What an activation does to the links' state, as the API answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateOutcome {
    /// `continues` (the same state format as the version it replaces), `starts_empty` (another
    /// format, or an empty start was asked for), `none` (the version keeps no state) or `copy` (a
    /// shadow runs on a copy and never writes the state).
    pub state: &'static str,
    /// The state format of the version activated.
    pub format: Option<String>,
}

/// A shadow version's comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowView {
    /// The version in shadow.
    pub version: String,
    /// Batches compared.
    pub batches: u64,
    /// Output records equal to the active version's.
    pub records_equal: u64,
    /// Output records that differ (or that one side lacks).
    pub records_different: u64,
    /// Shadow calls that failed.
    pub failed_calls: u64,
    /// Batches the shadow was not run on: its own breaker was open after a failed call, so it
    /// could not slow the live path.
    pub batches_skipped: u64,
    /// The same, per stage (a plugin may both decode and transform).
    pub stages: ShadowStages,
}

/// A version with its counts since this process started.
#[derive(Clone, Debug, Serialize)]
pub struct VersionView {
    /// The stored metadata.
    #[serde(flatten)]
    pub meta: VersionMeta,
    /// True for the version that runs.
    pub active: bool,
    /// Calls (decode and transform).
    pub calls: u64,
    /// Frames and records handed to it.
    pub records_in: u64,
    /// Records it returned.
    pub records_out: u64,
    /// Inputs it refused.
    pub rejects: u64,
    /// Calls that trapped, timed out or hit a limit.
    pub errors: u64,
}

use crate::clock::now_ms;

/// Accepts names that are safe as paths, labels and URL segments.
fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(RegistryError::BadName(name.to_owned())) }
}

/// Writes `bytes` to `path` so that readers see the old file or the new one: a temporary file in the
/// same directory, synced, renamed over `path`, and the directory synced.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Registry {
    /// Opens the registry under `dir` (created if missing). `limits` gives each plugin's call limits
    /// (default [`Limits::default`]); `bindings` the sources bound to each plugin.
    ///
    /// # Errors
    /// [`RegistryError::Io`] when the directory or its index cannot be read.
    pub fn open(
        runtime: Arc<Runtime>,
        dir: &Path,
        limits: HashMap<String, Limits>,
        bindings: HashMap<String, Vec<Binding>>,
    ) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir.join("blobs"))
            .map_err(|e| RegistryError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let index = dir.join("registry.json");
        let file: RegistryFile = match std::fs::read(&index) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Io(format!("{} is not a plugin index: {e}", index.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile::default(),
            Err(e) => return Err(RegistryError::Io(format!("cannot read {}: {e}", index.display()))),
        };
        let entries = file
            .plugins
            .into_iter()
            .map(|(name, meta)| (name, Entry { meta, compiled: HashMap::new(), slot: None }))
            .collect();
        let bindings = Mutex::new(bindings);
        Ok(Registry { runtime, dir: dir.to_owned(), limits, bindings, entries: Mutex::new(entries) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{digest}.wasm"))
    }

    fn limits_of(&self, name: &str) -> Limits {
        self.limits.get(name).copied().unwrap_or_default()
    }

    /// Writes the index with `name`'s changed state; if that fails, puts `before` back, so memory
    /// never says what the disk does not.
    fn persist_or_restore(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        name: &str,
        before: PluginMeta,
    ) -> Result<(), RegistryError> {
        self.persist(entries).inspect_err(|_| {
            if let Some(entry) = entries.get_mut(name) {
                entry.meta = before;
            }
        })
    }

    fn persist(&self, entries: &BTreeMap<String, Entry>) -> Result<(), RegistryError> {
        let file = RegistryFile { plugins: entries.iter().map(|(n, e)| (n.clone(), e.meta.clone())).collect() };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| RegistryError::Io(e.to_string()))?;
        let path = self.dir.join("registry.json");
        write_atomically(&path, &json).map_err(|e| RegistryError::Io(format!("cannot write {}: {e}", path.display())))
    }

    /// Compiles `wasm` as plugin `name` and runs `init` with every bound source's configuration.
    fn compile_checked(&self, name: &str, wasm: &[u8]) -> Result<Arc<PluginCode>, RegistryError> {
        let code = self.runtime.compile(name, wasm, self.limits_of(name)).map_err(RegistryError::Invalid)?;
        let unbound = [Binding { source: String::new(), config: Vec::new() }];
        let bound = self.bindings_of(name);
        let bindings = Some(bound.as_slice()).filter(|b| !b.is_empty()).unwrap_or(&unbound);
        // Each distinct configuration once: many sources often share one, and every check is an
        // instance and an `init` call.
        let mut checked: std::collections::HashSet<&[(String, String)]> = std::collections::HashSet::new();
        for binding in bindings.iter().filter(|b| checked.insert(&b.config)) {
            PluginInstance::new(&code, &binding.config)
                .map_err(|error| RegistryError::InitFailed { source_name: binding.source.clone(), error })?;
        }
        Ok(code)
    }

    /// Checks, compiles and stores `wasm` as a version of plugin `name` (created if new). Blocks for
    /// the compile: call it off the async runtime. Uploading bytes that are already a version of the
    /// plugin changes nothing and answers the same version with `created: false`.
    ///
    /// # Errors
    /// [`RegistryError::BadName`], [`RegistryError::Invalid`], [`RegistryError::InitFailed`] or
    /// [`RegistryError::Io`]; nothing is stored then.
    pub fn upload(&self, name: &str, wasm: &[u8]) -> Result<Uploaded, RegistryError> {
        self.upload_as(name, wasm, true)
    }

    /// [`upload`](Self::upload), checking first that `wasm` is a version of the same rule as the
    /// plugin's active version: the name it declares (see [`declared_name`]) and, once compiled,
    /// its state format must be the active version's, unless `replace`. A plugin with no active
    /// version takes whatever comes first.
    ///
    /// # Errors
    /// As [`upload`](Self::upload), and [`RegistryError::NotSameRule`] for another rule.
    pub fn upload_as(&self, name: &str, wasm: &[u8], replace: bool) -> Result<Uploaded, RegistryError> {
        check_name(name)?;
        let active = if replace { None } else { self.active_code_and_name(name)? };
        if let Some((_, Some(theirs))) = &active
            && let Some(ours) = declared_name(wasm).filter(|ours| ours != theirs)
        {
            return Err(RegistryError::NotSameRule(format!(
                "the upload declares plugin {ours:?}, but the active version of {name:?} declares {theirs:?}: a \
                 name holds versions of one rule. Upload it under its own name (PUT /v1/plugins/{ours}), or add ?replace=true to make it \
                 the next version of {name:?}"
            )));
        }
        let digest = hex(&sha2::Sha256::digest(wasm));
        let version = version_of(wasm);
        let answer = |created| Uploaded {
            name: name.to_owned(),
            version: version.clone(),
            digest: digest.clone(),
            size_bytes: wasm.len() as u64,
            created,
        };
        if self.lock().get(name).is_some_and(|e| e.meta.versions.iter().any(|v| v.digest == digest)) {
            return Ok(answer(false));
        }
        let code = self.compile_checked(name, wasm)?;
        if let Some((running, _)) = &active
            && let Some(theirs) = running.state_format()
        {
            let ours = code.state_format().flatten();
            if ours != theirs {
                let show = |f: Option<&str>| f.map_or("no state".to_owned(), |f| format!("state format {f:?}"));
                return Err(RegistryError::NotSameRule(format!(
                    "the upload keeps {}, but {name:?} runs {} ({}): its links' state would start empty. \
                     Add ?replace=true if that is meant (a new state format), or upload it under its own name",
                    show(ours),
                    show(theirs),
                    running.version()
                )));
            }
        }
        let blob = self.blob_path(&digest);
        if !blob.exists() {
            write_atomically(&blob, wasm)
                .map_err(|e| RegistryError::Io(format!("cannot write {}: {e}", blob.display())))?;
        }
        let mut entries = self.lock();
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            meta: PluginMeta::default(),
            compiled: HashMap::new(),
            slot: None,
        });
        if entry.meta.versions.iter().any(|v| v.digest == digest) {
            return Ok(answer(false));
        }
        entry.meta.versions.push(VersionMeta {
            version: version.clone(),
            digest: digest.clone(),
            size_bytes: wasm.len() as u64,
            uploaded_at_ms: now_ms(),
        });
        entry.compiled.insert(version.clone(), code);
        if let Err(e) = self.persist(&entries) {
            if let Some(entry) = entries.get_mut(name) {
                entry.meta.versions.retain(|v| v.digest != digest);
                entry.compiled.remove(&version);
            }
            return Err(e);
        }
        Ok(answer(true))
    }

    /// The active version of plugin `name` (compiled, so its state format is known) and the name it
    /// declares, when the plugin has one.
    fn active_code_and_name(&self, name: &str) -> Result<Option<ActiveRule>, RegistryError> {
        let active = {
            let entries = self.lock();
            let Some(entry) = entries.get(name) else { return Ok(None) };
            let Some(version) = entry.meta.active.clone() else { return Ok(None) };
            let digest = entry.meta.versions.iter().find(|v| v.version == version).map(|v| v.digest.clone());
            (version, digest)
        };
        let (version, Some(digest)) = active else { return Ok(None) };
        let code = self.code_of(name, &version)?;
        if code.state_format().is_none() {
            // No instance has started yet: one does, and records the format.
            let config = self.bindings_of(name).into_iter().next().map(|b| b.config);
            let _ = PluginInstance::new(&code, &config.unwrap_or_default());
        }
        let declared = std::fs::read(self.blob_path(&digest)).ok().and_then(|wasm| declared_name(&wasm));
        Ok(Some((code, declared)))
    }

    /// The compiled code of a stored version, compiling it from its blob if needed (without the lock).
    fn code_of(&self, name: &str, version: &str) -> Result<Arc<PluginCode>, RegistryError> {
        let digest =
            {
                let entries = self.lock();
                let entry = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
                if let Some(code) = entry.compiled.get(version) {
                    return Ok(code.clone());
                }
                entry.meta.versions.iter().find(|v| v.version == version).map(|v| v.digest.clone()).ok_or_else(
                    || RegistryError::UnknownVersion { plugin: name.to_owned(), version: version.to_owned() },
                )?
            };
        let path = self.blob_path(&digest);
        let wasm =
            std::fs::read(&path).map_err(|e| RegistryError::Io(format!("cannot read {}: {e}", path.display())))?;
        let actual = hex(&sha2::Sha256::digest(&wasm));
        if actual != digest {
            return Err(RegistryError::Io(format!("{} is corrupt: its SHA-256 is {actual}", path.display())));
        }
        let code = self.compile_checked(name, &wasm)?;
        if let Some(entry) = self.lock().get_mut(name) {
            entry.compiled.entry(version.to_owned()).or_insert_with(|| code.clone());
        }
        Ok(code)
    }

    /// Makes `version` the active (or shadow) version of plugin `name`. Active: workers switch before
    /// their next batch, and the version it replaces becomes the one [`rollback`](Self::rollback)
    /// returns to. Shadow: it runs beside the active version until [`promote`](Self::promote)d or
    /// replaced.
    ///
    /// # Errors
    /// Unknown plugin or version, a version that no longer compiles or starts, a conflict (shadowing
    /// the active version), or the index cannot be written.
    pub fn activate(&self, name: &str, version: &str, mode: Mode) -> Result<PluginView, RegistryError> {
        self.activate_state(name, version, mode, false).map(|(view, _)| view)
    }

    /// [`activate`](Self::activate), saying what becomes of the links' state: a version of the
    /// same state format goes on from it, another format starts empty, and `empty` asks for an
    /// empty start whatever the formats (each link drops its state at its next batch).
    ///
    /// # Errors
    /// As [`activate`](Self::activate).
    pub fn activate_state(
        &self,
        name: &str,
        version: &str,
        mode: Mode,
        empty: bool,
    ) -> Result<(PluginView, StateOutcome), RegistryError> {
        // Compiled outside the lock (it may take a while); what it decides is checked again inside.
        let code = self.code_of(name, version)?;
        let before = self.lock().get(name).and_then(|e| e.slot.as_ref()).map(|s| s.active());
        let (to, from) = (
            code.state_format().flatten().map(str::to_owned),
            before.as_ref().and_then(|c| c.state_format().flatten()),
        );
        let outcome = match (mode, &to) {
            (Mode::Shadow, _) => StateOutcome { state: "copy", format: to.clone() },
            (Mode::Active, None) => StateOutcome { state: "none", format: None },
            (Mode::Active, Some(_)) if empty => StateOutcome { state: "starts_empty", format: to.clone() },
            (Mode::Active, Some(f)) if from == Some(f.as_str()) => {
                StateOutcome { state: "continues", format: to.clone() }
            }
            (Mode::Active, Some(_)) => StateOutcome { state: "starts_empty", format: to.clone() },
        };
        let view = self.activate_code(name, version, code, mode)?;
        if empty
            && mode == Mode::Active
            && let Some(slot) = self.lock().get(name).and_then(|e| e.slot.clone())
        {
            slot.state_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok((view, outcome))
    }

    /// Whether any source of this process runs plugin `name`.
    pub fn is_bound(&self, name: &str) -> bool {
        !self.bindings_of(name).is_empty()
    }

    fn bindings_of(&self, name: &str) -> Vec<Binding> {
        let bindings = self.bindings.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        bindings.get(name).cloned().unwrap_or_default()
    }

    /// A chain edit of `source`: its links were `before` and are `after` (plugin, configuration),
    /// so uploads are checked against the configurations that run and activation knows the plugin
    /// runs somewhere.
    pub fn rebind(
        &self,
        source: &str,
        before: &[(String, Vec<(String, String)>)],
        after: &[(String, Vec<(String, String)>)],
    ) {
        let mut bindings = self.bindings.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (plugin, config) in before {
            if let Some(list) = bindings.get_mut(plugin)
                && let Some(i) = list.iter().position(|b| b.source == source && &b.config == config)
            {
                list.remove(i);
            }
        }
        for (plugin, config) in after {
            bindings
                .entry(plugin.clone())
                .or_default()
                .push(Binding { source: source.to_owned(), config: config.clone() });
        }
    }

    /// Makes sure plugin `name` has an active version: `version` is activated when given, else the
    /// active one stays, else the newest uploaded is activated. Returns its slot.
    ///
    /// # Errors
    /// Unknown plugin or version, or a version that does not compile or start.
    pub fn ensure_active(&self, name: &str, version: Option<&str>) -> Result<Arc<Slot>, RegistryError> {
        let (active, newest) = {
            let entries = self.lock();
            let entry = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
            (entry.meta.active.clone(), entry.meta.versions.last().map(|v| v.version.clone()))
        };
        match (version, active, newest) {
            (Some(v), _, _) => {
                self.activate(name, v, Mode::Active)?;
            }
            (None, Some(_), _) => return self.load(name),
            (None, None, Some(v)) => {
                self.activate(name, &v, Mode::Active)?;
            }
            (None, None, None) => return Err(RegistryError::UnknownPlugin(name.to_owned())),
        }
        self.slot(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))
    }

    /// The part of [`activate`](Self::activate) under the lock: `version` must still be stored (a
    /// delete may have run since it was compiled), so `active` never names a deleted version.
    fn activate_code(
        &self,
        name: &str,
        version: &str,
        code: Arc<PluginCode>,
        mode: Mode,
    ) -> Result<PluginView, RegistryError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
        if !entry.meta.versions.iter().any(|v| v.version == version) {
            return Err(RegistryError::UnknownVersion { plugin: name.to_owned(), version: version.to_owned() });
        }
        let before = entry.meta.clone();
        match mode {
            Mode::Active => {
                if entry.meta.active.as_deref() != Some(version) {
                    if let Some(old) = entry.meta.active.take() {
                        entry.meta.history.push(old);
                    }
                    entry.meta.active = Some(version.to_owned());
                    entry.meta.activated_at_ms = Some(now_ms());
                }
                if entry.meta.shadow.as_deref() == Some(version) {
                    entry.meta.shadow = None;
                }
            }
            Mode::Shadow => {
                if entry.meta.active.as_deref() == Some(version) {
                    return Err(RegistryError::Conflict(format!("{version} is the active version of {name}")));
                }
                entry.meta.shadow = Some(version.to_owned());
            }
        }
        self.persist_or_restore(&mut entries, name, before)?;
        let entry = entries.get_mut(name).expect("present above");
        self.publish(entry, Some(code));
        Ok(self.view(name, entry))
    }

    /// Brings the slot in line with the entry's active and shadow versions.
    fn publish(&self, entry: &mut Entry, fresh: Option<Arc<PluginCode>>) {
        if let Some(code) = fresh {
            entry.compiled.insert(code.version().to_owned(), code);
        }
        let active = entry.meta.active.as_ref().and_then(|v| entry.compiled.get(v)).cloned();
        let Some(active) = active else { return };
        let slot = entry.slot.get_or_insert_with(|| Slot::new(active.clone()));
        if !Arc::ptr_eq(&slot.active.load(), &active) {
            slot.active.store(active);
        }
        let shadow = entry.meta.shadow.as_ref().and_then(|v| entry.compiled.get(v)).cloned();
        match (shadow, slot.shadow.load_full()) {
            (None, _) => slot.shadow.store(None),
            (Some(code), Some(current)) if Arc::ptr_eq(&code, &current.code) => {}
            (Some(code), _) => slot.shadow.store(Some(Arc::new(Shadow::new(code, &self.runtime)))),
        }
    }

    /// Makes the shadow version active.
    ///
    /// # Errors
    /// [`RegistryError::Conflict`] when no version runs in shadow.
    pub fn promote(&self, name: &str) -> Result<PluginView, RegistryError> {
        let shadow = {
            let entries = self.lock();
            let entry = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
            entry.meta.shadow.clone().ok_or_else(|| RegistryError::Conflict(format!("{name} has no shadow version")))?
        };
        self.activate(name, &shadow, Mode::Active)
    }

    /// Returns to the version that was active before the current one.
    ///
    /// # Errors
    /// [`RegistryError::Conflict`] when there is no earlier version to return to.
    pub fn rollback(&self, name: &str) -> Result<PluginView, RegistryError> {
        let previous = {
            let entries = self.lock();
            let entry = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
            entry
                .meta
                .history
                .last()
                .cloned()
                .ok_or_else(|| RegistryError::Conflict(format!("{name} has no earlier version to roll back to")))?
        };
        let code = self.code_of(name, &previous)?;
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
        let before = entry.meta.clone();
        if entry.meta.history.last() != Some(&previous) {
            return Err(RegistryError::Conflict(format!("{name} changed meanwhile; try again")));
        }
        entry.meta.history.pop();
        entry.meta.active = Some(previous.clone());
        entry.meta.activated_at_ms = Some(now_ms());
        if entry.meta.shadow.as_deref() == Some(previous.as_str()) {
            entry.meta.shadow = None;
        }
        self.persist_or_restore(&mut entries, name, before)?;
        let entry = entries.get_mut(name).expect("present above");
        self.publish(entry, Some(code));
        Ok(self.view(name, entry))
    }

    /// Deletes a version that is neither active nor in shadow; its blob goes when no plugin uses it.
    ///
    /// # Errors
    /// [`RegistryError::Conflict`] for the active or shadow version; unknown plugin or version.
    pub fn delete(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
        let Some(meta) = entry.meta.versions.iter().find(|v| v.version == version).cloned() else {
            return Err(RegistryError::UnknownVersion { plugin: name.to_owned(), version: version.to_owned() });
        };
        if entry.meta.active.as_deref() == Some(version) {
            return Err(RegistryError::Conflict(format!(
                "{version} is the active version of {name}; activate another first"
            )));
        }
        if entry.meta.shadow.as_deref() == Some(version) {
            return Err(RegistryError::Conflict(format!(
                "{version} runs in shadow for {name}; promote or replace it first"
            )));
        }
        let before = entry.meta.clone();
        entry.meta.versions.retain(|v| v.version != version);
        entry.meta.history.retain(|v| v != version);
        self.persist_or_restore(&mut entries, name, before)?;
        if let Some(entry) = entries.get_mut(name) {
            entry.compiled.remove(version);
        }
        if let Some(m) = self.runtime.metrics() {
            m.forget_plugin_version(name, version);
        }
        let used = entries.values().any(|e| e.meta.versions.iter().any(|v| v.digest == meta.digest));
        if !used {
            let _ = std::fs::remove_file(self.blob_path(&meta.digest));
        }
        Ok(())
    }

    /// The slot workers of plugin `name` run from, making `wasm` (the configured or bundled bytes) its
    /// active version when these bytes are new to the registry. Bytes already stored leave the
    /// plugin on the version the API last activated, so uploads and activations survive restarts,
    /// while a changed plugin file deploys itself.
    ///
    /// # Errors
    /// As [`upload`](Self::upload) and [`activate`](Self::activate).
    pub fn deploy(&self, name: &str, wasm: &[u8]) -> Result<Arc<Slot>, RegistryError> {
        let uploaded = self.upload(name, wasm)?;
        let has_active = self.lock().get(name).is_some_and(|e| e.meta.active.is_some());
        if uploaded.created || !has_active {
            self.activate(name, &uploaded.version, Mode::Active)?;
            return self.slot(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()));
        }
        self.load(name)
    }

    /// The slot of plugin `name` running the version the index says is active (and in shadow),
    /// compiled from its stored blob: how a plugin uploaded over the API, with no file or bundled
    /// bytes, starts again after a restart.
    ///
    /// # Errors
    /// The plugin has no active version, or neither it nor an earlier one loads.
    pub fn load(&self, name: &str) -> Result<Arc<Slot>, RegistryError> {
        if let Some(slot) = self.slot(name) {
            return Ok(slot);
        }
        {
            let (active, shadow) = {
                let entries = self.lock();
                let e = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
                let active = e.meta.active.clone().ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
                (active, e.meta.shadow.clone())
            };
            let code = match self.code_of(name, &active) {
                Ok(code) => code,
                Err(e) => return self.fall_back(name, &active, e),
            };
            // A shadow that cannot be loaded is dropped rather than stopping the start.
            let shadow_code = shadow.and_then(|v| match self.code_of(name, &v) {
                Ok(code) => Some(code),
                Err(e) => {
                    tracing::error!(plugin = name, version = %v, error = %e, "the shadow version cannot be loaded; it does not run");
                    None
                }
            });
            let mut entries = self.lock();
            let entry = entries.get_mut(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
            if let Some(s) = shadow_code {
                entry.compiled.insert(s.version().to_owned(), s);
            }
            self.publish(entry, Some(code));
        }
        self.slot(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))
    }

    /// The active version `active` cannot be loaded at start (its blob is missing or corrupt): runs
    /// the version before it (or, failing that, the newest other one that loads) and says so, rather
    /// than failing the start.
    fn fall_back(&self, name: &str, active: &str, error: RegistryError) -> Result<Arc<Slot>, RegistryError> {
        let candidates: Vec<String> = {
            let entries = self.lock();
            let e = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
            let mut c: Vec<String> = e.meta.history.iter().rev().cloned().collect();
            c.extend(e.meta.versions.iter().rev().map(|v| v.version.clone()));
            c.retain(|v| v != active);
            c
        };
        for version in candidates {
            let Ok(code) = self.code_of(name, &version) else { continue };
            tracing::error!(
                plugin = name,
                missing = active,
                running = %version,
                error = %error,
                "the active version cannot be loaded; falling back to an earlier one"
            );
            {
                let mut entries = self.lock();
                if let Some(entry) = entries.get_mut(name) {
                    let before = entry.meta.clone();
                    entry.meta.history.retain(|v| v != &version);
                    entry.meta.active = Some(version.clone());
                    entry.meta.activated_at_ms = Some(now_ms());
                    if entry.meta.shadow.as_deref() == Some(version.as_str()) {
                        entry.meta.shadow = None;
                    }
                    self.persist_or_restore(&mut entries, name, before)?;
                    let entry = entries.get_mut(name).expect("present above");
                    self.publish(entry, Some(code));
                }
            }
            return self.slot(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()));
        }
        Err(error)
    }

    /// The slot of plugin `name`, once it has an active version.
    pub fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.lock().get(name).and_then(|e| e.slot.clone())
    }

    /// Every plugin, by name.
    pub fn list(&self) -> Vec<PluginView> {
        self.lock().iter().map(|(name, e)| self.view(name, e)).collect()
    }

    /// One plugin.
    ///
    /// # Errors
    /// [`RegistryError::UnknownPlugin`].
    pub fn get(&self, name: &str) -> Result<PluginView, RegistryError> {
        let entries = self.lock();
        let entry = entries.get(name).ok_or_else(|| RegistryError::UnknownPlugin(name.to_owned()))?;
        Ok(self.view(name, entry))
    }

    fn view(&self, name: &str, entry: &Entry) -> PluginView {
        let shadow = entry.slot.as_ref().and_then(|s| s.shadow()).map(|s| ShadowView {
            version: s.code.version().to_owned(),
            batches: s.batches.load(Ordering::Relaxed),
            records_equal: s.equal.get(),
            records_different: s.different.get(),
            failed_calls: s.failed_calls.load(Ordering::Relaxed),
            batches_skipped: s.skipped.load(Ordering::Relaxed),
            stages: ShadowStages { decode: s.stages[0].view(), transform: s.stages[1].view() },
        });
        let versions = entry
            .meta
            .versions
            .iter()
            .map(|meta| {
                let (mut calls, mut records_in, mut records_out, mut rejects, mut errors) = (0, 0, 0, 0, 0);
                if let Some(code) = entry.compiled.get(&meta.version) {
                    for m in [code.decode_metrics(), code.transform_metrics()] {
                        calls += m.calls.get();
                        records_in += m.records_in.get();
                        records_out += m.records_out.get();
                        rejects += m.rejects.get();
                        errors += m.errors();
                    }
                }
                VersionView {
                    meta: meta.clone(),
                    active: entry.meta.active.as_deref() == Some(meta.version.as_str()),
                    calls,
                    records_in,
                    records_out,
                    rejects,
                    errors,
                }
            })
            .collect();
        PluginView {
            name: name.to_owned(),
            active: entry.meta.active.clone(),
            activated_at_ms: entry.meta.activated_at_ms,
            previous: entry.meta.history.last().cloned(),
            shadow,
            versions,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::bundled;
    use crate::plugin::runtime::RuntimeSettings;

    fn runtime() -> Arc<Runtime> {
        let settings = RuntimeSettings { max_instances: 16, max_memory_bytes: 64 << 20, ..RuntimeSettings::default() };
        Arc::new(Runtime::new(settings, Arc::new(crate::symbols::Symbols::new())).unwrap())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-registry-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `wasm` with a custom section declaring `name` right after its header, ahead of the one its
    /// build wrote (the first one found counts).
    fn declaring(wasm: &[u8], name: &str) -> Vec<u8> {
        let section = plugin_sdk::NAME_SECTION.as_bytes();
        let mut body = vec![section.len() as u8];
        body.extend_from_slice(section);
        body.extend_from_slice(name.as_bytes());
        let mut out = wasm[..8].to_vec();
        out.push(0);
        out.push(body.len() as u8);
        out.extend(body);
        out.extend_from_slice(&wasm[8..]);
        out
    }

    /// An upload of another rule under a plugin's name is refused unless replacing is asked for:
    /// another declared name, or (under the same declared name) another state format. A version of
    /// the same rule, or a name with no active version yet, is taken.
    #[test]
    fn another_rule_under_a_plugins_name_needs_replace() {
        let dir = temp_dir("same-rule");
        let registry = Registry::open(runtime(), &dir, HashMap::new(), HashMap::new()).unwrap();
        registry.deploy("outlier-filter", bundled::OUTLIER_FILTER).unwrap();
        let err = registry.upload_as("outlier-filter", bundled::VWAP_BAND, false).unwrap_err();
        assert!(
            matches!(&err, RegistryError::NotSameRule(m) if m.contains("\"vwap-band\"") && m.contains("replace=true")),
            "{err}"
        );
        // Declaring the slot's name is not enough: vwap-band keeps another state format.
        let disguised = declaring(bundled::VWAP_BAND, "outlier-filter");
        assert_eq!(declared_name(&disguised).as_deref(), Some("outlier-filter"));
        let err = registry.upload_as("outlier-filter", &disguised, false).unwrap_err();
        assert!(matches!(&err, RegistryError::NotSameRule(m) if m.contains("state format")), "{err}");
        assert_eq!(registry.get("outlier-filter").unwrap().versions.len(), 1, "nothing stored");
        // The same rule rebuilt is a version; replace takes the other rule; a new name takes any.
        let rebuilt = declaring(bundled::OUTLIER_FILTER, "outlier-filter");
        assert!(registry.upload_as("outlier-filter", &rebuilt, false).unwrap().created);
        assert!(registry.upload_as("outlier-filter", bundled::VWAP_BAND, true).unwrap().created);
        assert!(registry.upload_as("vwap-dev", bundled::VWAP_BAND, false).unwrap().created);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn open(dir: &Path, bindings: HashMap<String, Vec<Binding>>) -> Registry {
        Registry::open(runtime(), dir, HashMap::new(), bindings).unwrap()
    }

    #[test]
    fn uploads_are_content_addressed_idempotent_and_survive_a_restart() {
        let dir = temp_dir("store");
        let registry = open(&dir, HashMap::new());
        let first = registry.upload("binance", bundled::BINANCE).unwrap();
        assert!(first.created);
        assert_eq!(first.version, version_of(bundled::BINANCE));
        assert_eq!(first.digest, hex(&sha2::Sha256::digest(bundled::BINANCE)));
        assert!(first.version.ends_with(&first.digest[..16]));
        let blob = dir.join("blobs").join(format!("{}.wasm", first.digest));
        assert_eq!(std::fs::read(&blob).unwrap(), bundled::BINANCE);
        let again = registry.upload("binance", bundled::BINANCE).unwrap();
        assert_eq!(again, Uploaded { created: false, ..first.clone() });
        assert_eq!(registry.get("binance").unwrap().versions.len(), 1);
        // No temporary files are left behind.
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        drop(registry);

        let reopened = open(&dir, HashMap::new());
        let view = reopened.get("binance").unwrap();
        assert_eq!(view.versions.len(), 1);
        assert_eq!(view.versions[0].meta.digest, first.digest);
        assert_eq!(view.active, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_is_not_a_plugin_of_our_world_or_fails_init_is_refused_and_not_stored() {
        let dir = temp_dir("refuse");
        let bindings = HashMap::from([(
            "rescale".to_owned(),
            vec![Binding { source: "feed".into(), config: vec![("scale".into(), "2".into())] }],
        )]);
        let registry = open(&dir, bindings);
        let refused = |name: &str, wasm: &[u8]| registry.upload(name, wasm).unwrap_err();
        assert!(matches!(refused("x", b"not wasm at all"), RegistryError::Invalid(PluginError::NotWasm)));
        assert!(matches!(refused("x", b"\0asm\x01\0\0\0"), RegistryError::Invalid(PluginError::CoreModule)));
        assert!(matches!(refused("x", b"\0asm\x0d\0\x01\0garbage"), RegistryError::Invalid(PluginError::Compile(_))));
        // outlier-filter does not know rescale's `scale` key: its init refuses the bound source.
        match refused("rescale", bundled::OUTLIER_FILTER) {
            RegistryError::InitFailed { source_name, error } => {
                assert_eq!(source_name, "feed");
                assert!(error.to_string().contains("scale"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(refused("Bad/Name", bundled::BINANCE), RegistryError::BadName(_)));
        assert!(matches!(refused("", bundled::BINANCE), RegistryError::BadName(_)));
        assert!(registry.list().is_empty());
        assert_eq!(std::fs::read_dir(dir.join("blobs")).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn activation_swaps_between_batches_and_rollback_returns() {
        let dir = temp_dir("swap");
        let registry = open(&dir, HashMap::new());
        // Two builds that both decode without config: the bundled binance and kraken plugins.
        let slot = registry.deploy("feed", bundled::BINANCE).unwrap();
        let v1 = version_of(bundled::BINANCE);
        let v2 = registry.upload("feed", bundled::KRAKEN).unwrap().version;
        let mut worker = BoundPlugin::new(slot.clone(), PluginInstance::new(&slot.active(), &[]).unwrap());
        assert_eq!(worker.code().version(), v1);

        let view = registry.activate("feed", &v2, Mode::Active).unwrap();
        assert_eq!((view.active.as_deref(), view.previous.as_deref()), (Some(v2.as_str()), Some(v1.as_str())));
        // The worker is still on v1 until its next batch starts.
        assert_eq!(worker.code().version(), v1);
        worker.sync();
        assert_eq!(worker.code().version(), v2);

        let err = registry.delete("feed", &v2).unwrap_err();
        assert!(matches!(err, RegistryError::Conflict(_)), "{err}");
        let view = registry.rollback("feed").unwrap();
        assert_eq!(view.active.as_deref(), Some(v1.as_str()));
        assert_eq!(view.previous, None);
        worker.sync();
        assert_eq!(worker.code().version(), v1);
        assert!(matches!(registry.rollback("feed").unwrap_err(), RegistryError::Conflict(_)));

        registry.delete("feed", &v2).unwrap();
        assert!(!dir.join("blobs").join(format!("{}.wasm", hex(&sha2::Sha256::digest(bundled::KRAKEN)))).exists());
        assert!(matches!(
            registry.activate("feed", &v2, Mode::Active).unwrap_err(),
            RegistryError::UnknownVersion { .. }
        ));
        assert!(matches!(registry.rollback("nope").unwrap_err(), RegistryError::UnknownPlugin(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restart_keeps_the_version_the_api_activated_and_a_new_file_deploys_itself() {
        let dir = temp_dir("restart");
        let v2 = {
            let registry = open(&dir, HashMap::new());
            registry.deploy("feed", bundled::BINANCE).unwrap();
            let v2 = registry.upload("feed", bundled::KRAKEN).unwrap().version;
            registry.activate("feed", &v2, Mode::Active).unwrap();
            v2
        };
        let registry = open(&dir, HashMap::new());
        let slot = registry.deploy("feed", bundled::BINANCE).unwrap();
        assert_eq!(slot.active().version(), v2);
        assert_eq!(registry.rollback("feed").unwrap().active.unwrap(), version_of(bundled::BINANCE));
        drop(registry);
        // A plugin file the registry has never seen becomes active.
        let registry = open(&dir, HashMap::new());
        let slot = registry.deploy("feed", bundled::COINBASE).unwrap();
        assert_eq!(slot.active().version(), version_of(bundled::COINBASE));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A shadow whose calls fail is run once, then skipped while its own breaker cools down, so it
    /// cannot slow the live path batch after batch (a hanging shadow costs one deadline per
    /// cool-down, not one per batch). The shadow here is `chaos` compiled with 64 KiB of memory, too
    /// little to start: every batch it is given fails. Of twenty decode batches, the shadow's one
    /// failed call is counted and the other nineteen are skipped; the active version decodes every
    /// one.
    #[test]
    fn a_failing_shadow_is_skipped_after_its_first_failed_call() {
        let rt = runtime();
        let chaos = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
        let code = rt.compile("chaos", &chaos, Limits::default()).unwrap();
        let slot = Slot::new(code.clone());
        let mut decoder =
            crate::decode::Decoder::bound(BoundPlugin::new(slot.clone(), PluginInstance::new(&code, &[]).unwrap()));
        let starved = Limits { memory_bytes: 64 << 10, ..Limits::default() };
        let shadow = Arc::new(Shadow::new(rt.compile("chaos", &chaos, starved).unwrap(), &rt));
        slot.shadow.store(Some(shadow.clone()));
        let frame = crate::source::Frame {
            source: 1,
            received_at_us: 0,
            bytes: bytes::Bytes::from_static(b"{}"),
            oversized: None,
            overlap: false,
            file_offset: 0,
        };
        for _ in 0..20 {
            decoder.decode(std::slice::from_ref(&frame)).unwrap();
        }
        assert_eq!(shadow.failed_calls.load(Ordering::Relaxed), 1);
        assert_eq!(shadow.skipped.load(Ordering::Relaxed), 19);
    }

    /// A version activated with the same state format goes on from the state the one it replaces
    /// left: no reference is lost at the swap.
    #[test]
    fn an_activated_version_of_the_same_state_format_continues_the_state() {
        let dir = temp_dir("swap-state");
        let binding = Binding { source: "feed".into(), config: vec![("mode".to_owned(), "count".to_owned())] };
        let registry = open(&dir, HashMap::from([("counter".to_owned(), vec![binding])]));
        let chaos = std::fs::read(format!("{}/chaos.wasm", env!("SLUICE_PLUGIN_DIR"))).unwrap();
        let slot = registry.deploy("counter", &chaos).unwrap();
        let config = [("mode".to_owned(), "count".to_owned())];
        let mut transformer = crate::transform::Transformer::bound(BoundPlugin::new(
            slot.clone(),
            PluginInstance::new(&slot.active(), &config).unwrap(),
        ));
        let mut batch = plugin_sdk::Records::new();
        for i in 1..=3 {
            batch.push(&plugin_sdk::Record {
                symbol_id: 1,
                price_e8: 100,
                volume_e8: 1,
                trade_id: i,
                ..Default::default()
            });
        }
        let volumes = |t: &mut crate::transform::Transformer| -> Vec<i64> {
            t.transform(batch.as_bytes()).unwrap().parsed.iter().map(|r| r.volume_e8).collect()
        };
        assert_eq!(volumes(&mut transformer), [1, 2, 3]);
        // The same component rebuilt (a custom section appended): another version, the same format.
        let mut rebuilt = chaos.clone();
        rebuilt.extend_from_slice(&[0, 8, 7, b'r', b'e', b'b', b'u', b'i', b'l', b't']);
        let v2 = registry.upload("counter", &rebuilt).unwrap().version;
        let (_, outcome) = registry.activate_state("counter", &v2, Mode::Active, false).unwrap();
        assert_eq!(outcome, StateOutcome { state: "continues", format: Some("chaos.count@1".into()) });
        assert_eq!(volumes(&mut transformer), [4, 5, 6]);
        assert_eq!(transformer.plugin().version(), v2.as_str());
        // An operator asks for an empty start: the next batch counts from 1 again.
        let v1 = version_of(&chaos);
        let (_, outcome) = registry.activate_state("counter", &v1, Mode::Active, true).unwrap();
        assert_eq!(outcome.state, "starts_empty");
        assert_eq!(volumes(&mut transformer), [1, 2, 3]);
        // A shadow runs on a copy.
        let (_, outcome) = registry.activate_state("counter", &v2, Mode::Shadow, false).unwrap();
        assert_eq!(outcome.state, "copy");
        assert_eq!(volumes(&mut transformer), [4, 5, 6]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A shadow `transform` call counts the records it was given, like the active version's.
    #[test]
    fn a_shadow_transform_counts_its_records_in() {
        let dir = temp_dir("shadow-transform");
        let registry = open(&dir, HashMap::new());
        // Both pass records through unchanged (a decoder's default transform).
        let slot = registry.deploy("filter", bundled::BINANCE).unwrap();
        let v2 = registry.upload("filter", bundled::COINBASE).unwrap().version;
        registry.activate("filter", &v2, Mode::Shadow).unwrap();
        let mut transformer = crate::transform::Transformer::bound(BoundPlugin::new(
            slot.clone(),
            PluginInstance::new(&slot.active(), &[]).unwrap(),
        ));
        let mut batch = plugin_sdk::Records::new();
        for i in 1..=5 {
            batch.push(&plugin_sdk::Record {
                symbol_id: 1,
                price_e8: 100,
                volume_e8: 1,
                trade_id: i,
                ..Default::default()
            });
        }
        transformer.transform(batch.as_bytes()).unwrap();
        let view = registry.get("filter").unwrap();
        let shadow = view.versions.iter().find(|v| v.meta.version == v2).unwrap();
        assert_eq!((shadow.calls, shadow.records_in), (1, 5), "{view:?}");
        let compared = view.shadow.unwrap().stages;
        assert_eq!((compared.transform.batches, compared.transform.records_equal), (1, 5));
        assert_eq!(compared.decode.batches, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_shadow_runs_beside_the_active_version_and_is_compared() {
        let dir = temp_dir("shadow");
        let registry = open(&dir, HashMap::new());
        let slot = registry.deploy("feed", bundled::BINANCE).unwrap();
        let v2 = registry.upload("feed", bundled::KRAKEN).unwrap().version;
        assert!(matches!(
            registry.activate("feed", &version_of(bundled::BINANCE), Mode::Shadow).unwrap_err(),
            RegistryError::Conflict(_)
        ));
        assert!(matches!(registry.promote("feed").unwrap_err(), RegistryError::Conflict(_)));
        registry.activate("feed", &v2, Mode::Shadow).unwrap();
        let mut decoder = crate::decode::Decoder::bound(BoundPlugin::new(
            slot.clone(),
            PluginInstance::new(&slot.active(), &[]).unwrap(),
        ));
        let frame = |text: &str| crate::source::Frame {
            source: 1,
            bytes: bytes::Bytes::copy_from_slice(text.as_bytes()),
            received_at_us: 1,
            oversized: None,
            overlap: false,
            file_offset: 0,
        };
        // A Binance trade: the active version decodes it, the Kraken build in shadow refuses it.
        let trade = r#"{"e":"trade","E":1,"s":"BTCUSDT","t":7,"p":"1.5","q":"2","T":1,"m":false}"#;
        let out = decoder.decode(&[frame(trade)]).unwrap();
        assert_eq!(out.records.len(), 1);
        let shadow = registry.get("feed").unwrap().shadow.unwrap();
        assert_eq!((shadow.version.as_str(), shadow.batches), (v2.as_str(), 1));
        assert_eq!((shadow.records_equal, shadow.records_different), (0, 1));
        // A frame neither decodes into a record: nothing differs.
        decoder.decode(&[frame(r#"{"result":null,"id":1}"#)]).unwrap();
        let shadow = registry.get("feed").unwrap().shadow.unwrap();
        assert_eq!((shadow.batches, shadow.records_different), (2, 1));
        // All of it in the decode stage.
        assert_eq!((shadow.stages.decode.batches, shadow.stages.decode.records_different), (2, 1));
        assert_eq!(shadow.stages.transform.batches, 0);

        let view = registry.promote("feed").unwrap();
        assert_eq!(view.active.as_deref(), Some(v2.as_str()));
        assert!(view.shadow.is_none());
        decoder.decode(&[frame(trade)]).unwrap();
        let view = registry.get("feed").unwrap();
        let active = view.versions.iter().find(|v| v.active).unwrap();
        // Its two shadow calls and the one since it was promoted.
        assert_eq!((active.meta.version.as_str(), active.calls, active.records_in), (v2.as_str(), 3, 3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_activation_racing_a_delete_of_its_version_is_refused() {
        let dir = temp_dir("race");
        let registry = open(&dir, HashMap::new());
        let v1 = registry.upload("binance", bundled::BINANCE).unwrap().version;
        registry.activate("binance", &v1, Mode::Active).unwrap();
        let v2 = registry.upload("binance", bundled::KRAKEN).unwrap().version;
        // The interleaving: activate has compiled v2 (outside the lock) when a delete of v2 runs.
        let code = registry.code_of("binance", &v2).unwrap();
        registry.delete("binance", &v2).unwrap();
        let err = registry.activate_code("binance", &v2, code, Mode::Active).unwrap_err();
        assert!(matches!(err, RegistryError::UnknownVersion { .. }), "{err}");
        assert_eq!(registry.get("binance").unwrap().active.as_deref(), Some(v1.as_str()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_start_whose_active_blob_is_missing_falls_back_to_the_previous_version() {
        let dir = temp_dir("missing-blob");
        let registry = open(&dir, HashMap::new());
        let v1 = registry.upload("binance", bundled::BINANCE).unwrap().version;
        registry.activate("binance", &v1, Mode::Active).unwrap();
        let v2 = registry.upload("binance", bundled::KRAKEN).unwrap();
        registry.activate("binance", &v2.version, Mode::Active).unwrap();
        drop(registry);
        std::fs::remove_file(dir.join("blobs").join(format!("{}.wasm", v2.digest))).unwrap();
        let registry = open(&dir, HashMap::new());
        // The configured bytes are v1's, already stored: the index's active version (v2) is the one
        // to run, and its blob is gone.
        let slot = registry.deploy("binance", bundled::BINANCE).unwrap();
        assert_eq!(slot.active().version(), v1);
        let view = registry.get("binance").unwrap();
        assert_eq!(view.active.as_deref(), Some(v1.as_str()));
        drop(registry);
        // And the fallback was written down: the next start runs v1 without falling back again.
        let registry = open(&dir, HashMap::new());
        assert_eq!(registry.get("binance").unwrap().active.as_deref(), Some(v1.as_str()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_worker_retries_a_version_that_could_not_start_and_reports_what_it_runs() {
        // Room for two instances (three core instances each): the worker's, and one that keeps the
        // pool full for a while.
        let settings = RuntimeSettings { max_instances: 3, max_memory_bytes: 64 << 20, ..RuntimeSettings::default() };
        let runtime = Runtime::new(settings, Arc::new(crate::symbols::Symbols::new())).unwrap();
        let old = runtime.compile("p", bundled::BINANCE, Limits::default()).unwrap();
        let new = runtime.compile("p", bundled::KRAKEN, Limits::default()).unwrap();
        let slot = Slot::new(old.clone());
        let mut bound = BoundPlugin::new(slot.clone(), PluginInstance::new(&old, &[]).unwrap());
        let running = bound.running();
        assert_eq!(running.get().as_deref().map(String::as_str), Some(old.version()));
        let hog = PluginInstance::new(&old, &[]).unwrap();
        slot.active.store(new.clone());
        bound.sync();
        // The pool is full: it stays on the old version, says so, and counts the failure.
        assert_eq!(bound.code().version(), old.version());
        assert_eq!(running.get().as_deref().map(String::as_str), Some(old.version()));
        assert_eq!(slot.start_failures(), 1);
        drop(hog);
        // Not retried on every batch, but retried after its backoff.
        bound.sync();
        assert_eq!(bound.code().version(), old.version());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        bound.sync();
        assert_eq!(bound.code().version(), new.version());
        assert_eq!(running.get().as_deref().map(String::as_str), Some(new.version()));
        assert_eq!(slot.start_failures(), 1);
    }
}
