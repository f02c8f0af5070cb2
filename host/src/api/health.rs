//! `/health/live` and `/health/ready`, over the [`Health`] checks the components keep.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::ApiState;
use crate::telemetry::health::Readiness;

/// `GET /health/live`: the process answers.
pub(super) async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "live" }))
}

/// `GET /health/ready`: 200 when every check is ok, else 503; the body lists the checks either way.
pub(super) async fn ready(State(state): State<ApiState>) -> (StatusCode, Json<Readiness>) {
    let readiness = state.health.snapshot();
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(readiness))
}
