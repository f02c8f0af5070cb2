//! Replays over HTTP: `POST /v1/replay` starts a job in this process, `GET /v1/replay/{id}` shows
//! its progress, `DELETE /v1/replay/{id}` cancels it; `GET /v1/replay/tables` and
//! `DELETE /v1/replay/tables/{name}` list and drop the tables replays `--into` a name wrote.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};
use crate::sink::embedded::{EmbeddedStore, REPLAY_PREFIX, StoreError, check_replay_name};
use crate::sink::replay::{ReplayProgress, ReplaySpec, ReplaySummary, Written};

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

/// Starts a replay in this process: given what to replay, its progress and its stop flag, a future
/// that ends with its summary or what went wrong.
pub type ReplayStarter = Arc<
    dyn Fn(
            ReplaySpec,
            Arc<ReplayProgress>,
            Arc<AtomicBool>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ReplaySummary, String>> + Send>>
        + Send
        + Sync,
>;

/// The replay jobs `POST /v1/replay` starts, by id; one runs at a time.
#[derive(Default)]
pub struct ReplayJobs {
    starter: OnceLock<ReplayStarter>,
    jobs: Mutex<BTreeMap<u64, Job>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ReplayJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayJobs").finish_non_exhaustive()
    }
}

impl ReplayJobs {
    /// Lets jobs start (the pipeline sets this where it can replay: with the process role).
    pub fn set_starter(&self, starter: ReplayStarter) {
        let _ = self.starter.set(starter);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a job ended, and how long it took.
type Outcome = (Result<ReplaySummary, String>, Duration);

struct Job {
    spec: ReplaySpec,
    progress: Arc<ReplayProgress>,
    stop: Arc<AtomicBool>,
    started: std::time::Instant,
    outcome: Arc<Mutex<Option<Outcome>>>,
}

/// `POST /v1/replay`'s body: times as milliseconds since the epoch or RFC 3339 strings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayRequest {
    since: serde_json::Value,
    #[serde(default)]
    until: Option<serde_json::Value>,
    #[serde(default)]
    into: Option<String>,
}

fn time_of(field: &str, v: &serde_json::Value) -> Result<i64, ApiError> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => plugin_sdk::time::rfc3339_to_ms(s).ok(),
        _ => None,
    }
    .ok_or_else(|| ApiError::BadRequest(format!("{field}: milliseconds since the epoch or an RFC 3339 time")))
}

/// `POST /v1/replay` (with the token): 202 with the job's id; 409 while another replay runs; 404
/// where this instance cannot replay (it runs no process role).
pub(super) async fn start(
    State(state): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let request: ReplayRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("expected {{\"since\": ..., \"until\": ..., \"into\": ...}}: {e}"))
    })?;
    let since_ms = time_of("since", &request.since)?;
    let until_ms = request.until.as_ref().map(|u| time_of("until", u)).transpose()?;
    if until_ms.is_some_and(|u| u <= since_ms) {
        return Err(ApiError::BadRequest("until must be later than since".into()));
    }
    if let Some(into) = &request.into {
        check_replay_name(into).map_err(ApiError::BadRequest)?;
    }
    let jobs = state.replays.clone();
    let starter = jobs
        .starter
        .get()
        .cloned()
        .ok_or_else(|| ApiError::NotFound("this instance cannot replay: it runs no process role".into()))?;
    let mut all = jobs.lock();
    if all.values().any(|j| j.outcome.lock().unwrap_or_else(|p| p.into_inner()).is_none()) {
        return Err(ApiError::Conflict("a replay is running; wait for it or cancel it".into()));
    }
    let id = jobs.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let spec = ReplaySpec { since_ms, until_ms, into: request.into };
    let (progress, stop) = (Arc::new(ReplayProgress::default()), Arc::new(AtomicBool::new(false)));
    let outcome = Arc::new(Mutex::new(None));
    let started = std::time::Instant::now();
    let run = starter(spec.clone(), progress.clone(), stop.clone());
    let done = outcome.clone();
    // The job runs in a task of its own, so a panic in it fails the job visibly (and lets the next
    // replay start) instead of leaving it "running" for good.
    let job = tokio::spawn(run);
    tokio::spawn(async move {
        let result = match job.await {
            Ok(result) => result,
            Err(e) => {
                let message = match e.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(panic = %message, "a replay job panicked; it is failed");
                Err(format!("the replay panicked: {message}"))
            }
        };
        *done.lock().unwrap_or_else(|p| p.into_inner()) = Some((result, started.elapsed()));
    });
    all.insert(id, Job { spec, progress, stop, started, outcome });
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "state": "running" }))))
}

/// `GET /v1/replay/{id}`: the job's state (`running`, `done`, `failed`), progress and outcome (the
/// table written, or for the Druid sink the topic).
pub(super) async fn status(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let jobs = state.replays.lock();
    let job = jobs.get(&id).ok_or_else(|| ApiError::NotFound(format!("no replay job {id}")))?;
    let p = &job.progress;
    let read = p.read.load(Ordering::Relaxed);
    let outcome = job.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let elapsed = outcome.as_ref().map_or_else(|| job.started.elapsed(), |(_, d)| *d);
    let mut view = serde_json::json!({
        "id": id,
        "state": match &outcome { None => "running", Some((Ok(_), _)) => "done", Some((Err(_), _)) => "failed" },
        "since_ms": job.spec.since_ms,
        "until_ms": job.spec.until_ms,
        "into": job.spec.into,
        "cancel_requested": job.stop.load(Ordering::Relaxed),
        "records_read": read,
        "records_in_range": p.in_range.load(Ordering::Relaxed),
        "rows": p.rows.load(Ordering::Relaxed),
        "refused": p.refused.load(Ordering::Relaxed),
        "elapsed_ms": elapsed.as_millis() as u64,
        "records_per_second": (read as f64 / elapsed.as_secs_f64().max(1e-3)).round(),
    });
    match outcome {
        Some((Ok(summary), _)) => {
            match summary.written {
                Written::Table(table) => view["table"] = table.into(),
                Written::Topic(topic) => view["topic"] = topic.into(),
            }
            view["buckets"] = summary.buckets.into();
        }
        Some((Err(error), _)) => view["error"] = error.into(),
        None => {}
    }
    Ok(Json(view))
}

/// `DELETE /v1/replay/{id}` (with the token): asks a running job to stop (its partial work is
/// dropped; the store stays as it was); 202.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let jobs = state.replays.lock();
    let job = jobs.get(&id).ok_or_else(|| ApiError::NotFound(format!("no replay job {id}")))?;
    job.stop.store(true, Ordering::Relaxed);
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "state": "cancelling" }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay that panics is failed, with the panic's message, and the next replay is accepted
    /// (not refused with 409 because the first stays "running").
    #[tokio::test]
    async fn a_replay_that_panics_fails_and_the_next_one_starts() {
        let state =
            ApiState::new(&crate::api::ApiConfig::default(), None, Arc::new(crate::telemetry::health::Health::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        state.replays().set_starter(Arc::new(move |_, _, _| {
            let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
            Box::pin(async move {
                if first {
                    panic!("the range held a surprise");
                }
                Err("the second one ends normally".to_owned())
            })
        }));
        let body = || axum::body::Bytes::from_static(br#"{"since": 0}"#);
        let (status, Json(first)) = start(State(state.clone()), body()).await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        let id = first["id"].as_u64().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let job = loop {
            let Json(job) = status_of(&state, id).await;
            if job["state"] != "running" || std::time::Instant::now() > deadline {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(job["state"], "failed", "{job}");
        assert!(job.to_string().contains("the range held a surprise"), "{job}");
        let (status, _) = start(State(state.clone()), body()).await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    async fn status_of(state: &ApiState, id: u64) -> Json<serde_json::Value> {
        status(State(state.clone()), axum::extract::Path(id)).await.unwrap()
    }
}
