//! `GET /v1/log`: the hand-off between the roles, per partition: where it starts and ends, where the
//! sink has committed, and the lag between them (`kafka-consumer-groups --describe` for sluice).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::{ApiError, ApiState};
use crate::handoff::LogStatus;

/// Reads the hand-off's status; blocking (it may ask Kafka), so the handler runs it off the runtime.
pub type LogProbe = Arc<dyn Fn() -> Result<LogStatus, String> + Send + Sync>;

/// `GET /v1/log`: 200 `{"mode", "partitions": [{"partition", "start", "end", "committed", "lag"}]}`,
/// with `local` (the local log's sizes against its cap, and whether it refuses records) and
/// `store_dead_letters` where they apply; 503 `unavailable` while the roles start or when Kafka
/// does not answer.
pub async fn status(State(state): State<ApiState>) -> Result<Json<LogStatus>, ApiError> {
    let probe = state.log.get().cloned().ok_or_else(|| ApiError::Unavailable("the log is not open yet".into()))?;
    tokio::task::spawn_blocking(move || probe())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map(Json)
        .map_err(ApiError::Unavailable)
}
