//! `GET /v1/query?sql=...&limit=N`: read-only SQL over the embedded store, answered as a JSON table.
//!
//! Each query runs on the blocking pool through a fresh read-only connection. At most
//! `query_concurrency` run at once, and one that passes its deadline is interrupted inside SQLite, so a
//! runaway statement neither holds a thread nor keeps running after its client has gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use rusqlite::ErrorCode;
use serde::Deserialize;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use super::{ApiError, ApiState};
use crate::sink::embedded::{QueryConnection, QueryResult, StoreError};

/// How often a timed-out statement is interrupted again until it stops (an interrupt that lands
/// before the statement starts is lost).
const INTERRUPT_EVERY: Duration = Duration::from_millis(50);

/// The query string.
#[derive(Debug, Deserialize)]
pub(super) struct QueryParams {
    /// One read-only SQL statement.
    sql: Option<String>,
    /// Most rows to return.
    limit: Option<usize>,
}

/// The limits queries run under, shared by all requests.
#[derive(Clone, Debug)]
pub(super) struct QueryLimits {
    /// Rows returned when the request names no limit.
    pub default_limit: usize,
    /// The largest limit a request may ask for.
    pub max_limit: usize,
    /// How long a query may wait for a slot and run.
    pub timeout: Duration,
    /// One permit per query allowed to run at once.
    pub slots: Arc<Semaphore>,
}

/// The handler.
pub(super) async fn query(
    State(state): State<ApiState>,
    params: Result<Query<QueryParams>, QueryRejection>,
) -> Result<Json<QueryResult>, ApiError> {
    let path = state.store.clone().ok_or(ApiError::NoStore)?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let sql = params
        .sql
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::BadRequest("the `sql` parameter is required".to_owned()))?;
    let limits = state.query.clone();
    let limit = params.limit.unwrap_or(limits.default_limit);
    if limit > limits.max_limit {
        return Err(ApiError::BadRequest(format!("limit {limit} is over the maximum of {}", limits.max_limit)));
    }
    // A task of its own, so a client that hangs up does not stop the deadline from being enforced.
    tokio::spawn(run(path, sql, limit, limits))
        .await
        .map_err(|e| ApiError::Internal(format!("the query task failed: {e}")))?
        .map(Json)
}

/// Waits for a slot, runs the query on the blocking pool and interrupts it at the deadline.
pub(super) async fn run(
    path: PathBuf,
    sql: String,
    limit: usize,
    limits: QueryLimits,
) -> Result<QueryResult, ApiError> {
    // A timeout too far ahead to represent has no deadline to speak of: a year stands in for it.
    let deadline = Instant::now()
        .checked_add(limits.timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let permit = tokio::time::timeout_at(deadline, limits.slots.acquire_owned())
        .await
        .map_err(|_| ApiError::Unavailable("too many queries are running; try again later".to_owned()))?
        .map_err(|_| ApiError::Internal("the query slots are closed".to_owned()))?;
    let (handle_tx, mut handle_rx) = oneshot::channel();
    let mut task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let conn = QueryConnection::open(&path).map_err(|e| {
            ApiError::Unavailable(format!("the embedded store at {} cannot be opened: {e}", path.display()))
        })?;
        let _ = handle_tx.send(conn.interrupt_handle());
        conn.query_table(&sql, limit).map_err(query_error)
    });
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(joined) => joined.map_err(|e| ApiError::Internal(format!("the query failed: {e}")))?,
        Err(_) => {
            let mut handle = None;
            loop {
                if handle.is_none() {
                    handle = handle_rx.try_recv().ok();
                }
                if let Some(h) = &handle {
                    h.interrupt();
                }
                if tokio::time::timeout(INTERRUPT_EVERY, &mut task).await.is_ok() {
                    break;
                }
            }
            Err(ApiError::QueryTimeout(limits.timeout))
        }
    }
}

/// Sorts a failed statement into the client's fault (bad or writing SQL) and the store's.
fn query_error(e: StoreError) -> ApiError {
    let e = match e {
        StoreError::NotReadOnly => return ApiError::ReadOnly,
        e @ StoreError::TooLarge { .. } => return ApiError::ResultTooLarge(e.to_string()),
        e @ StoreError::BadName(_) => return ApiError::BadSql(e.to_string()),
        StoreError::Sqlite(e) => e,
    };
    match e.sqlite_error_code() {
        Some(ErrorCode::ReadOnly) => ApiError::ReadOnly,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            ApiError::Unavailable(format!("the embedded store is busy: {e}"))
        }
        Some(
            ErrorCode::SystemIoFailure
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::NotADatabase
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::PermissionDenied
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::InternalMalfunction,
        ) => ApiError::Internal(format!("the embedded store failed: {e}")),
        // Syntax, unknown tables and columns, runtime errors of the statement, more than one statement.
        _ => ApiError::BadSql(e.to_string()),
    }
}
