//! `/v1/sources/{name}/chain`: a source's chain as it runs, and edits of it: a link added (at the
//! end or at a position), removed, or given another configuration, and a return to the
//! configuration file's chain. Each edit is kept in the data directory (see [`crate::chains`]) and
//! reaches the process role between two polls, as a version swap does.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::chains::{BookLink, ChainBook, ChainError, Edit};
use crate::plugin::registry::Registry;

impl From<ChainError> for ApiError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::UnknownSource(_) => ApiError::NotFound(e.to_string()),
            ChainError::NoLink { .. } => ApiError::BadRequest(e.to_string()),
            ChainError::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// A link as the API shows it.
#[derive(Debug, Serialize)]
struct LinkView {
    plugin: String,
    config: BTreeMap<String, String>,
    /// The plugin's active version.
    version: Option<String>,
    /// Where its state is stored (kept while the link stays, new for a new link).
    state_key: u32,
}

/// A source's chain as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct ChainView {
    source: String,
    /// True when the API edited it: it runs instead of the configuration file's chain.
    edited: bool,
    links: Vec<LinkView>,
}

fn view(book: &ChainBook, registry: &Registry, source: &str, links: Vec<BookLink>) -> ChainView {
    let links = links
        .into_iter()
        .map(|l| LinkView {
            version: registry.slot(&l.plugin).map(|s| s.active().version().to_owned()),
            plugin: l.plugin,
            config: l.config,
            state_key: l.state_key,
        })
        .collect();
    ChainView { source: source.to_owned(), edited: book.is_edited(source), links }
}

/// The book and the registry, or 404 where this instance runs no process role.
fn parts(state: &ApiState) -> Result<(Arc<ChainBook>, Arc<Registry>), ApiError> {
    let book = state.chains.clone().ok_or_else(|| {
        ApiError::NotFound("this instance runs no process role: edit chains where the process role runs".into())
    })?;
    Ok((book, state.plugins.get()?))
}

/// Reads a JSON body whatever the content type says (so `curl -d` works as is).
fn json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, what: &str) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("expected a JSON body {what}: {e}")))
}

/// Runs on a blocking thread (plugin instances start, the file is synced).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("chain task failed: {e}")))?
}

/// `GET /v1/sources/{name}/chain`.
pub(super) async fn get_chain(
    State(state): State<ApiState>,
    Path(source): Path<String>,
) -> Result<Json<ChainView>, ApiError> {
    let (book, registry) = parts(&state)?;
    let links = book.chain(&source).ok_or(ChainError::UnknownSource(source.clone()))?;
    Ok(Json(view(&book, &registry, &source, links)))
}

/// The body of `POST .../chain/links`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddLink {
    plugin: String,
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// The position (0 is the first transform); the end when missing.
    at: Option<usize>,
    /// The version to activate for the plugin; by default its active one, else its newest.
    version: Option<String>,
}

/// Applies `edit` to `source`'s chain and moves the registry's bindings with it.
fn apply(book: &ChainBook, registry: &Registry, source: &str, edit: Edit) -> Result<ChainView, ApiError> {
    let pairs = |links: &[BookLink]| -> Vec<(String, Vec<(String, String)>)> {
        links.iter().map(|l| (l.plugin.clone(), l.config_pairs())).collect()
    };
    let before = book.chain(source).ok_or(ChainError::UnknownSource(source.to_owned()))?;
    let after = book.edit(source, edit)?;
    registry.rebind(source, &pairs(&before), &pairs(&after));
    let plugins: Vec<&str> = after.iter().map(|l| l.plugin.as_str()).collect();
    tracing::info!(source, chain = %plugins.join(" -> "), "chain edited over the API");
    Ok(view(book, registry, source, after))
}

/// Checks that `plugin`'s active version starts with `config` (its `init` accepts it).
fn check_init(registry: &Registry, plugin: &str, config: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let slot = registry.slot(plugin).ok_or_else(|| ApiError::UnknownPlugin(format!("no plugin named {plugin:?}")))?;
    let pairs: Vec<(String, String)> = config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    crate::plugin::PluginInstance::new(&slot.active(), &pairs)
        .map(drop)
        .map_err(|e| ApiError::PluginInitFailed(format!("{plugin}: init refused the configuration: {e}")))
}

/// `POST /v1/sources/{name}/chain/links` `{"plugin", "config"?, "at"?, "version"?}`: the plugin (uploaded
/// first) joins the chain with empty state.
pub(super) async fn add_link(
    State(state): State<ApiState>,
    Path(source): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ChainView>, ApiError> {
    let (book, registry) = parts(&state)?;
    let add: AddLink = json(body, r#"{"plugin": "...", "config": {...}, "at": N}"#)?;
    blocking(move || {
        book.chain(&source).ok_or(ChainError::UnknownSource(source.clone()))?;
        registry.ensure_active(&add.plugin, add.version.as_deref())?;
        check_init(&registry, &add.plugin, &add.config)?;
        let edit = Edit::Insert { plugin: add.plugin, config: add.config, at: add.at };
        apply(&book, &registry, &source, edit)
    })
    .await
    .map(Json)
}

/// The body of `PUT .../chain/links/{at}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Configure {
    config: BTreeMap<String, String>,
}

/// `?state=empty`: the link starts its state empty.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateQuery {
    #[serde(default)]
    state: Option<String>,
}

/// `PUT /v1/sources/{name}/chain/links/{at}[?state=empty]` `{"config": {...}}`: the link runs with
/// another configuration, keeping its state (or starting empty).
pub(super) async fn configure_link(
    State(state): State<ApiState>,
    Path((source, at)): Path<(String, usize)>,
    query: Result<Query<StateQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ChainView>, ApiError> {
    let (book, registry) = parts(&state)?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(format!("the only query is state=keep|empty: {e}")))?;
    let empty_state = match query.state.as_deref() {
        None | Some("keep") => false,
        Some("empty") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("state must be keep or empty, not {other:?}"))),
    };
    let body: Configure = json(body, r#"{"config": {...}}"#)?;
    blocking(move || {
        let links = book.chain(&source).ok_or(ChainError::UnknownSource(source.clone()))?;
        let link = links.get(at).ok_or(ChainError::NoLink { source_name: source.clone(), len: links.len(), at })?;
        check_init(&registry, &link.plugin, &body.config)?;
        apply(&book, &registry, &source, Edit::Configure { at, config: body.config, empty_state })
    })
    .await
    .map(Json)
}

/// `DELETE /v1/sources/{name}/chain/links/{at}`: the link leaves the chain; its state is dropped.
pub(super) async fn remove_link(
    State(state): State<ApiState>,
    Path((source, at)): Path<(String, usize)>,
) -> Result<Json<ChainView>, ApiError> {
    let (book, registry) = parts(&state)?;
    blocking(move || apply(&book, &registry, &source, Edit::Remove(at))).await.map(Json)
}

/// `DELETE /v1/sources/{name}/chain`: back to the configuration file's chain, every link starting
/// with empty state.
pub(super) async fn reset_chain(
    State(state): State<ApiState>,
    Path(source): Path<String>,
) -> Result<Json<ChainView>, ApiError> {
    let (book, registry) = parts(&state)?;
    blocking(move || {
        // The configuration's plugins were deployed at start; a start that ran an edited chain
        // may not have loaded them.
        for link in book.configured(&source).ok_or(ChainError::UnknownSource(source.clone()))? {
            registry.ensure_active(&link.plugin, None).map_err(|e| {
                ApiError::Conflict(format!("plugin {} of the configuration's chain cannot run here: {e}", link.plugin))
            })?;
        }
        apply(&book, &registry, &source, Edit::Reset)
    })
    .await
    .map(Json)
}
