//! `/v1/plugins`: upload, list, activate (or shadow), promote, roll back and delete plugin versions.
//!
//! Every call that changes something needs `Authorization: Bearer <token>` with the token from
//! `SLUICE_API_TOKEN`; without a configured token, changes are refused. The token is checked before
//! the body is read. Compiles run on blocking threads, never on the async runtime.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::plugin::registry::{Mode, Registry, RegistryError};

/// The registry the API serves, set once the plugins are loaded (the API starts before them, and
/// answers 503 until then).
#[derive(Default)]
pub struct PluginDirectory(OnceLock<Arc<Registry>>);

impl PluginDirectory {
    /// Publishes the registry; only the first call counts.
    pub fn set(&self, registry: Arc<Registry>) {
        let _ = self.0.set(registry);
    }

    pub(super) fn get(&self) -> Result<Arc<Registry>, ApiError> {
        self.0.get().cloned().ok_or_else(|| ApiError::Unavailable("the plugins are still loading".into()))
    }
}

impl std::fmt::Debug for PluginDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDirectory").field("loaded", &self.0.get().is_some()).finish()
    }
}

/// The body, or the JSON error for one that could not be read: over the limit (a body sent without a
/// declared length stops at the limit) or cut off.
fn read_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
        _ => ApiError::BadRequest(format!("cannot read the request body: {e}")),
    })
}

/// Runs a registry call on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::plugin::registry::RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("plugin task failed: {e}")))?
        .map_err(Into::into)
}

/// The query of `upload`: `?replace=true` takes another rule under the name (see
/// [`Registry::upload_as`](crate::plugin::registry::Registry::upload_as)).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    #[serde(default)]
    replace: bool,
}

/// `PUT /v1/plugins/{name}[?replace=true]`: the body is the `.wasm`. 201 with the new version, 200
/// when these bytes were already a version of the plugin, 409 `not_same_rule` when it declares
/// another name or state format than the active version and `replace` is not set.
pub(super) async fn upload(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(UploadQuery { replace }) =
        query.map_err(|e| ApiError::BadRequest(format!("the only query is replace=true or false: {e}")))?;
    let body = read_body(body, state.max_body_bytes)?;
    let registry = state.plugins.get()?;
    if body.is_empty() {
        return Err(ApiError::InvalidPlugin("the body is empty: send the plugin's .wasm".into()));
    }
    let uploaded = blocking(move || registry.upload_as(&name, &body, replace)).await?;
    let status = if uploaded.created { StatusCode::CREATED } else { StatusCode::OK };
    tracing::info!(plugin = %uploaded.name, version = %uploaded.version, created = uploaded.created, "plugin uploaded");
    Ok((status, Json(uploaded)).into_response())
}

/// `GET /v1/plugins`.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let registry = state.plugins.get()?;
    Ok(Json(serde_json::json!({ "plugins": registry.list() })))
}

/// `GET /v1/plugins/{name}`.
pub(super) async fn get_one(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<crate::plugin::registry::PluginView>, ApiError> {
    Ok(Json(state.plugins.get()?.get(&name)?))
}

/// The body of `activate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActivateBody {
    version: String,
}

/// The query of `activate`: `?mode=shadow` runs the version beside the active one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActivateQuery {
    #[serde(default = "active")]
    mode: Mode,
    /// `?state=empty`: the links start the version with no state, whatever its format.
    #[serde(default)]
    state: StateStart,
}

/// What an activation does to the links' state when asked.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum StateStart {
    /// Keep it when the state format is the same (the default).
    #[default]
    Keep,
    /// Start empty.
    Empty,
}

/// The answer of `activate`: the plugin, and what became of its state.
#[derive(Debug, serde::Serialize)]
pub(super) struct Activated {
    #[serde(flatten)]
    view: crate::plugin::registry::PluginView,
    state: crate::plugin::registry::StateOutcome,
}

fn active() -> Mode {
    Mode::Active
}

/// `POST /v1/plugins/{name}/activate[?mode=shadow][&state=empty]` with `{"version": "sha256:..."}`;
/// the answer says whether the links' state continues (`state.state`).
pub(super) async fn activate(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<ActivateQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Activated>, ApiError> {
    let body = read_body(body, state.max_body_bytes)?;
    let Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("mode must be active or shadow, state keep or empty: {e}")))?;
    // Read as JSON whatever the content type says, so `curl -d '{"version": ...}'` works as is.
    let body: ActivateBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected a JSON body {{\"version\": \"...\"}}: {e}")))?;
    let registry = state.plugins.get()?;
    let view = blocking(move || {
        // A version no source of this process runs would do nothing: refused, not answered as if it ran.
        if registry.get(&name).is_ok() && !registry.is_bound(&name) {
            let what = if query.mode == Mode::Shadow { "shadow" } else { "activate" };
            return Err(RegistryError::Conflict(format!(
                "no source of this process uses plugin {name:?}, so there is nothing to {what} it for: \
                 name it in a [[source]] first"
            )));
        }
        registry.activate_state(&name, &body.version, query.mode, query.state == StateStart::Empty)
    })
    .await?;
    let (view, outcome) = view;
    tracing::info!(plugin = %view.name, active = ?view.active, shadow = ?view.shadow.as_ref().map(|s| &s.version), state = outcome.state, "plugin activated");
    Ok(Json(Activated { view, state: outcome }))
}

/// `POST /v1/plugins/{name}/promote`: the shadow version becomes active.
pub(super) async fn promote(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<crate::plugin::registry::PluginView>, ApiError> {
    let registry = state.plugins.get()?;
    Ok(Json(blocking(move || registry.promote(&name)).await?))
}

/// `POST /v1/plugins/{name}/rollback`: back to the version active before the current one.
pub(super) async fn rollback(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<crate::plugin::registry::PluginView>, ApiError> {
    let registry = state.plugins.get()?;
    let view = blocking(move || registry.rollback(&name)).await?;
    tracing::info!(plugin = %view.name, active = ?view.active, "plugin rolled back");
    Ok(Json(view))
}

/// `DELETE /v1/plugins/{name}/versions/{version}`: 204, or 409 for the active or shadow version.
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let registry = state.plugins.get()?;
    blocking(move || registry.delete(&name, &version)).await?;
    Ok(StatusCode::NO_CONTENT)
}
