//! `GET /v1/replay/tables` and `DELETE /v1/replay/tables/{name}`: the tables `sluice replay --into`
//! wrote beside the live `rollup`, listed with their rows, and dropped when compared.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::{ApiError, ApiState};
use crate::sink::embedded::{EmbeddedStore, REPLAY_PREFIX, StoreError, check_replay_name};

#[derive(Serialize)]
struct TableView {
    name: String,
    table: String,
    rows: i64,
}

fn store_error(e: StoreError) -> ApiError {
    ApiError::Internal(format!("the embedded store failed: {e}"))
}

/// `GET /v1/replay/tables`.
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone().ok_or(ApiError::NoStore)?;
    let tables = tokio::task::spawn_blocking(move || EmbeddedStore::replay_tables(&store))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(store_error)?;
    let views: Vec<TableView> = tables
        .into_iter()
        .map(|(name, rows)| TableView { table: format!("{REPLAY_PREFIX}{name}"), name, rows })
        .collect();
    Ok(Json(serde_json::json!({ "tables": views })))
}

/// `DELETE /v1/replay/tables/{name}` (with the token): 200 with the name, 404 when there is none.
pub(super) async fn drop(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_replay_name(&name).map_err(ApiError::BadRequest)?;
    let store = state.store.clone().ok_or(ApiError::NoStore)?;
    let dropped = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || EmbeddedStore::drop_replay(&store, &name))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(store_error)?
    };
    if dropped {
        Ok(Json(serde_json::json!({ "dropped": name })))
    } else {
        Err(ApiError::NotFound(format!("no replay table {name:?}")))
    }
}
