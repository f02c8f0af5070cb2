//! The Overlord's supervisor API: submit the spec, then watch the supervisor's status and health.
//!
//! Druid answers as its API reference says
//! (<https://druid.apache.org/docs/latest/api-reference/supervisor-api>): `200` with `{"id": ...}` for a
//! spec it took, `400` with `{"error": ...}` (or a `DruidException` with `errorMessage`) for one it refused,
//! `401`/`403` from its authenticator and authorizer, `404` for an unknown supervisor, `415` for a body that
//! is not JSON. An Overlord that is not the leader redirects to the leader with `307`, and one that knows no
//! leader answers `503`; both are followed or retried here, a bounded number of times.
//! The supervisor's `/health` answers `200` when healthy and `503` with `{"healthy": false}` when not.

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, LOCATION};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::config::DruidSinkConfig;
use super::spec::{SpecError, SupervisorId, SupervisorSpec, supervisor_spec};

/// Redirects followed within one call; Druid needs one (to the leader).
const MAX_REDIRECTS: u32 = 5;

/// How much of an unexpected body an error keeps.
const BODY_EXCERPT_CHARS: usize = 512;

/// Why a call to the Overlord failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlordError {
    /// The configuration does not make a valid spec; nothing was sent.
    #[error("supervisor spec: {0}")]
    Spec(#[from] SpecError),
    /// The configured Overlord URL cannot be used.
    #[error("overlord_url {url:?}: {reason}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
    /// `400`: Druid refused the spec; its message says why.
    #[error("the Overlord refused the spec: {message}")]
    BadRequest {
        /// Druid's error message.
        message: String,
    },
    /// `401`: no or wrong credentials.
    #[error("the Overlord refused the credentials (401): set [sink.druid] username and password")]
    Unauthorized,
    /// `403`: the credentials lack the permission (e.g. write on the datasource).
    #[error("the Overlord forbids this for the configured user (403): {message}")]
    Forbidden {
        /// Druid's explanation, if any.
        message: String,
    },
    /// `404`: no such supervisor (or no supervisor API at that URL).
    #[error("not found (404): {message}")]
    NotFound {
        /// Druid's explanation, if any.
        message: String,
    },
    /// `415`: the Overlord did not take the body as JSON.
    #[error("the Overlord does not accept the request's content type (415)")]
    UnsupportedMediaType,
    /// `503` outside `/health`: the Overlord has no leader (yet); retried until the attempts run out.
    #[error("no Overlord leader is available (503): {message}")]
    NotLeader {
        /// What the Overlord said, if anything.
        message: String,
    },
    /// A redirect that cannot or should not be followed.
    #[error("redirect from the Overlord: {reason}")]
    Redirect {
        /// Why it was not followed.
        reason: String,
    },
    /// The Overlord could not be reached or did not answer in time; retried until the attempts run out.
    #[error("cannot reach the Overlord: {0}")]
    Connect(String),
    /// A status this client does not expect from the endpoint.
    #[error("unexpected answer {status} from the Overlord: {body}")]
    Unexpected {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A `200` whose body is not what Druid documents.
    #[error("unreadable answer from the Overlord: {0}")]
    Body(String),
}

impl OverlordError {
    /// Whether trying again later may succeed: no leader yet, or no connection. Everything else is an
    /// answer that will not change by asking again.
    pub fn is_retriable(&self) -> bool {
        matches!(self, OverlordError::NotLeader { .. } | OverlordError::Connect(_))
    }
}

/// A supervisor's status report, as far as sluice reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorStatus {
    /// The generic state: `PENDING`, `RUNNING`, `SUSPENDED`, `STOPPING`, `UNHEALTHY_SUPERVISOR`,
    /// `UNHEALTHY_TASKS`.
    pub state: String,
    /// The Kafka supervisor's own, finer state (e.g. `CONNECTING_TO_STREAM`, `LOST_CONTACT_WITH_STREAM`).
    pub detailed_state: Option<String>,
    /// Druid's overall verdict.
    pub healthy: bool,
    /// Whether the supervisor is suspended.
    pub suspended: bool,
    /// Messages in the topic not yet read by Druid, over all partitions, when Druid knows it.
    pub aggregate_lag: Option<i64>,
}

/// One poll's findings: the status report and the health endpoint's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    /// From `/status`.
    pub status: SupervisorStatus,
    /// From `/health`.
    pub healthy: bool,
}

/// The latest known state of the supervisor, for `/health/ready` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SupervisorHealth {
    /// The last state Druid reported; kept when a later poll fails.
    pub state: Option<String>,
    /// The last detailed state Druid reported.
    pub detailed_state: Option<String>,
    /// True only when the last poll succeeded and `/health` said healthy.
    pub healthy: bool,
    /// The last known lag of Druid behind the topic, in messages.
    pub aggregate_lag: Option<i64>,
    /// Why the last poll failed, `None` after a successful one.
    pub last_error: Option<String>,
    /// When the last poll finished; `None` before the first.
    pub last_checked: Option<SystemTime>,
}

impl SupervisorHealth {
    /// Folds one poll's outcome in.
    pub fn record(&mut self, outcome: Result<Poll, OverlordError>, at: SystemTime) {
        self.last_checked = Some(at);
        match outcome {
            Ok(poll) => {
                self.state = Some(poll.status.state);
                self.detailed_state = poll.status.detailed_state;
                self.aggregate_lag = poll.status.aggregate_lag;
                self.healthy = poll.healthy;
                self.last_error = None;
            }
            Err(e) => {
                self.healthy = false;
                self.last_error = Some(e.to_string());
            }
        }
    }
}

/// How the client retries a leaderless or unreachable Overlord.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Requests per call, at least one.
    pub max_attempts: u32,
    /// The first pause; it doubles per attempt up to ten times this.
    pub backoff: Duration,
}

impl RetryPolicy {
    fn pause(&self, failed_attempts: u32) -> Duration {
        let factor = 1u32 << failed_attempts.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(self.backoff.saturating_mul(10))
    }
}

/// Basic-auth credentials for the Overlord.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// The user.
    pub username: String,
    /// The password, if the user has one.
    pub password: Option<String>,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth").field("username", &self.username).field("password", &"***").finish()
    }
}

/// A client of one Druid cluster's Overlord (or Router).
#[derive(Clone, Debug)]
pub struct OverlordClient {
    http: reqwest::Client,
    /// The configured base URL; every call starts here, since the leader may have moved since the last.
    base: Url,
    /// Sent with every request, redirects to the leader included.
    auth: Option<BasicAuth>,
    retry: RetryPolicy,
}

impl OverlordClient {
    /// A client for the Overlord at `base_url`.
    ///
    /// # Errors
    /// [`OverlordError::Url`] for a URL that is not `http(s)://`, [`OverlordError::Client`] when the TLS
    /// stack cannot be set up.
    pub fn new(
        base_url: &str,
        auth: Option<BasicAuth>,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Self, OverlordError> {
        let url_error = |reason: &str| OverlordError::Url { url: base_url.into(), reason: reason.into() };
        let base = Url::parse(base_url).map_err(|e| url_error(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(url_error("must start with http:// or https://"));
        }
        if base.cannot_be_a_base() {
            return Err(url_error("is not a base URL"));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
            .map_err(|e| OverlordError::Client(e.to_string()))?;
        let retry = RetryPolicy { max_attempts: retry.max_attempts.max(1), ..retry };
        Ok(OverlordClient { http, base, auth, retry })
    }

    /// A client as `[sink.druid]` describes it.
    ///
    /// # Errors
    /// As [`OverlordClient::new`].
    pub fn from_config(cfg: &DruidSinkConfig) -> Result<Self, OverlordError> {
        let auth = cfg.username.clone().map(|username| BasicAuth { username, password: cfg.resolved_password() });
        let retry =
            RetryPolicy { max_attempts: cfg.max_attempts, backoff: Duration::from_millis(cfg.retry_backoff_ms) };
        OverlordClient::new(&cfg.overlord_url, auth, cfg.request_timeout(), retry)
    }

    /// Checks `cfg`, generates its supervisor spec and submits it; a spec that fails the check is never sent.
    ///
    /// # Errors
    /// [`OverlordError::Spec`] before any request, else as [`OverlordClient::submit`].
    pub async fn apply(
        &self,
        cfg: &DruidSinkConfig,
        descriptor_set: &[u8],
        brokers: &str,
    ) -> Result<SupervisorId, OverlordError> {
        let spec = supervisor_spec(cfg, descriptor_set, brokers)?;
        self.submit(&spec).await
    }

    /// Creates or updates the supervisor (`POST /druid/indexer/v1/supervisor?skipRestartIfUnmodified=true`,
    /// so resubmitting an unchanged spec at every start does not restart Druid's tasks).
    ///
    /// # Errors
    /// The [`OverlordError`] for Druid's answer; leaderless and unreachable Overlords are retried first.
    pub async fn submit(&self, spec: &SupervisorSpec) -> Result<SupervisorId, OverlordError> {
        let mut url = self.endpoint(&[])?;
        url.query_pairs_mut().append_pair("skipRestartIfUnmodified", "true");
        let (status, body) = self.call(Method::POST, url, Some(spec.json())).await?;
        if status != StatusCode::OK {
            return Err(error_for(status, &body));
        }
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let created: Created = serde_json::from_slice(&body).map_err(|e| OverlordError::Body(e.to_string()))?;
        Ok(SupervisorId(created.id))
    }

    /// The supervisor's status report (`GET /druid/indexer/v1/supervisor/{id}/status`).
    ///
    /// # Errors
    /// [`OverlordError::NotFound`] for an unknown supervisor, else as [`OverlordClient::submit`].
    pub async fn status(&self, id: &SupervisorId) -> Result<SupervisorStatus, OverlordError> {
        let url = self.endpoint(&[&id.0, "status"])?;
        let (status, body) = self.call(Method::GET, url, None).await?;
        if status != StatusCode::OK {
            return Err(error_for(status, &body));
        }
        #[derive(Deserialize)]
        struct Report {
            payload: Payload,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Payload {
            state: String,
            detailed_state: Option<String>,
            healthy: bool,
            #[serde(default)]
            suspended: bool,
            aggregate_lag: Option<i64>,
        }
        let report: Report = serde_json::from_slice(&body).map_err(|e| OverlordError::Body(e.to_string()))?;
        let p = report.payload;
        Ok(SupervisorStatus {
            state: p.state,
            detailed_state: p.detailed_state,
            healthy: p.healthy,
            suspended: p.suspended,
            aggregate_lag: p.aggregate_lag,
        })
    }

    /// Whether Druid deems the supervisor healthy (`GET /druid/indexer/v1/supervisor/{id}/health`: `200`
    /// healthy, `503` with `{"healthy": false}` unhealthy).
    ///
    /// # Errors
    /// [`OverlordError::NotFound`] for an unknown supervisor, else as [`OverlordClient::submit`].
    pub async fn health(&self, id: &SupervisorId) -> Result<bool, OverlordError> {
        let url = self.endpoint(&[&id.0, "health"])?;
        let (status, body) = self.call(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::SERVICE_UNAVAILABLE => Ok(false),
            _ => Err(error_for(status, &body)),
        }
    }

    /// One poll: the status report, then the health verdict.
    ///
    /// # Errors
    /// The first call's [`OverlordError`].
    pub async fn poll_once(&self, id: &SupervisorId) -> Result<Poll, OverlordError> {
        let status = self.status(id).await?;
        let healthy = self.health(id).await?;
        Ok(Poll { status, healthy })
    }

    /// Polls the supervisor every `interval` and publishes what it finds to `health`, until `shutdown`
    /// completes. The first poll is immediate.
    pub async fn watch_health(
        &self,
        id: SupervisorId,
        interval: Duration,
        health: watch::Sender<SupervisorHealth>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let outcome = tokio::select! {
                outcome = self.poll_once(&id) => outcome,
                () = &mut shutdown => return,
            };
            if let Err(e) = &outcome {
                tracing::warn!(supervisor = %id, error = %e, "Druid supervisor poll failed");
            }
            health.send_modify(|h| h.record(outcome, SystemTime::now()));
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// `{base}/druid/indexer/v1/supervisor/{segments...}`, each segment percent-encoded.
    fn endpoint(&self, segments: &[&str]) -> Result<Url, OverlordError> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| OverlordError::Url { url: self.base.to_string(), reason: "is not a base URL".into() })?;
            path.pop_if_empty().extend(["druid", "indexer", "v1", "supervisor"]).extend(segments);
        }
        Ok(url)
    }

    /// Sends one logical request: follows redirects to the leader and retries leaderless or unreachable
    /// Overlords with back-off. Returns the final status and body.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Vec<u8>), OverlordError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.follow(method.clone(), url.clone(), body).await {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            };
            if !error.is_retriable() || attempt >= self.retry.max_attempts {
                return Err(error);
            }
            let pause = self.retry.pause(attempt);
            tracing::info!(%url, attempt, error = %error, pause_ms = pause.as_millis() as u64, "retrying the Overlord");
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt: the request and the redirects it leads to.
    async fn follow(
        &self,
        method: Method,
        mut url: Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Vec<u8>), OverlordError> {
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.http.request(method.clone(), url.clone()).header(ACCEPT, "application/json");
            if let Some(auth) = &self.auth {
                req = req.basic_auth(&auth.username, auth.password.as_ref());
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let resp = req.send().await.map_err(|e| OverlordError::Connect(error_chain(&e)))?;
            let status = resp.status();
            let location = resp.headers().get(LOCATION).cloned();
            let bytes = resp.bytes().await.map_err(|e| OverlordError::Connect(error_chain(&e)))?.to_vec();
            match status {
                StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => {
                    url = redirect_target(&url, location.as_ref())?;
                }
                StatusCode::SERVICE_UNAVAILABLE if !is_health_verdict(&bytes) => {
                    return Err(OverlordError::NotLeader { message: druid_message(&bytes) });
                }
                _ => return Ok((status, bytes)),
            }
        }
        Err(OverlordError::Redirect { reason: format!("more than {MAX_REDIRECTS} redirects") })
    }
}

/// Where a `307`/`308` points, relative to the URL that answered. A redirect from `https` to `http` is
/// refused: it would send the credentials in clear text.
fn redirect_target(from: &Url, location: Option<&reqwest::header::HeaderValue>) -> Result<Url, OverlordError> {
    let reason = |r: String| OverlordError::Redirect { reason: r };
    let location = location.ok_or_else(|| reason("no Location header".into()))?;
    let location = location.to_str().map_err(|_| reason("the Location header is not text".into()))?;
    let to = from.join(location).map_err(|e| reason(format!("Location {location:?}: {e}")))?;
    if from.scheme() == "https" && to.scheme() != "https" {
        return Err(reason(format!("refusing to follow {to} from https")));
    }
    if !matches!(to.scheme(), "http" | "https") {
        return Err(reason(format!("refusing to follow {to}")));
    }
    Ok(to)
}

/// Whether a `503` body is `/health`'s verdict (`{"healthy": false}`) rather than a leaderless Overlord.
fn is_health_verdict(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("healthy").is_some_and(Value::is_boolean))
}

/// The [`OverlordError`] for a non-success answer.
fn error_for(status: StatusCode, body: &[u8]) -> OverlordError {
    match status {
        StatusCode::BAD_REQUEST => OverlordError::BadRequest { message: druid_message(body) },
        StatusCode::UNAUTHORIZED => OverlordError::Unauthorized,
        StatusCode::FORBIDDEN => OverlordError::Forbidden { message: druid_message(body) },
        StatusCode::NOT_FOUND => OverlordError::NotFound { message: druid_message(body) },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => OverlordError::UnsupportedMediaType,
        _ => OverlordError::Unexpected { status: status.as_u16(), body: druid_message(body) },
    }
}

/// Druid's error message from a body: `errorMessage` (a `DruidException`), else `error`, else the text.
fn druid_message(body: &[u8]) -> String {
    if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) {
        for key in ["errorMessage", "error"] {
            if let Some(Value::String(s)) = o.get(key) {
                return excerpt(s);
            }
        }
    }
    excerpt(String::from_utf8_lossy(body).trim())
}

fn excerpt(s: &str) -> String {
    match s.char_indices().nth(BODY_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// A reqwest error with its causes, which hold the useful part ("connection refused").
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn druid_messages_come_from_either_error_shape() {
        assert_eq!(druid_message(br#"{"error":"Cannot construct instance"}"#), "Cannot construct instance");
        assert_eq!(
            druid_message(br#"{"error":"druidException","errorCode":"invalidInput","errorMessage":"bad name"}"#),
            "bad name"
        );
        assert_eq!(druid_message(b"  plain text\n"), "plain text");
        assert_eq!(druid_message(&[b'x'; 600]).chars().count(), BODY_EXCERPT_CHARS + 1);
    }

    #[test]
    fn only_no_leader_and_no_connection_are_retried() {
        assert!(OverlordError::NotLeader { message: String::new() }.is_retriable());
        assert!(OverlordError::Connect("refused".into()).is_retriable());
        assert!(!OverlordError::BadRequest { message: String::new() }.is_retriable());
        assert!(!OverlordError::Unauthorized.is_retriable());
        assert!(!OverlordError::Redirect { reason: String::new() }.is_retriable());
    }

    #[test]
    fn back_off_doubles_up_to_ten_times_the_first_pause() {
        let p = RetryPolicy { max_attempts: 10, backoff: Duration::from_millis(100) };
        let pauses: Vec<_> = (1..=6).map(|n| p.pause(n).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn redirects_resolve_and_never_downgrade() {
        let from = Url::parse("https://overlord-2:8281/druid/indexer/v1/supervisor?x=1").unwrap();
        let to = |loc: &str| redirect_target(&from, Some(&reqwest::header::HeaderValue::from_str(loc).unwrap()));
        assert_eq!(
            to("https://overlord-1:8281/druid/indexer/v1/supervisor?x=1").unwrap().as_str(),
            "https://overlord-1:8281/druid/indexer/v1/supervisor?x=1"
        );
        assert_eq!(to("/elsewhere").unwrap().as_str(), "https://overlord-2:8281/elsewhere");
        assert!(matches!(to("http://overlord-1:8081/"), Err(OverlordError::Redirect { .. })));
        assert!(matches!(redirect_target(&from, None), Err(OverlordError::Redirect { .. })));
    }

    #[test]
    fn credentials_never_print() {
        let auth = BasicAuth { username: "sluice".into(), password: Some("hunter2".into()) };
        let retry = RetryPolicy { max_attempts: 1, backoff: Duration::ZERO };
        let c = OverlordClient::new("http://overlord:8081", Some(auth), Duration::from_secs(1), retry).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn endpoints_keep_a_path_prefix_and_encode_the_id() {
        let retry = RetryPolicy { max_attempts: 1, backoff: Duration::ZERO };
        let c = OverlordClient::new("http://router:8888/proxy/", None, Duration::from_secs(1), retry).unwrap();
        assert_eq!(
            c.endpoint(&["ticks 1m?", "status"]).unwrap().as_str(),
            "http://router:8888/proxy/druid/indexer/v1/supervisor/ticks%201m%3F/status"
        );
        assert!(matches!(
            OverlordClient::new("ftp://x", None, Duration::from_secs(1), retry),
            Err(OverlordError::Url { .. })
        ));
    }

    #[test]
    fn health_keeps_the_last_state_and_reports_the_failure() {
        let mut h = SupervisorHealth::default();
        let status = SupervisorStatus {
            state: "RUNNING".into(),
            detailed_state: Some("RUNNING".into()),
            healthy: true,
            suspended: false,
            aggregate_lag: Some(3),
        };
        h.record(Ok(Poll { status, healthy: true }), SystemTime::UNIX_EPOCH);
        assert!(h.healthy);
        assert_eq!(h.state.as_deref(), Some("RUNNING"));
        h.record(Err(OverlordError::Connect("connection refused".into())), SystemTime::UNIX_EPOCH);
        assert!(!h.healthy);
        assert_eq!(h.state.as_deref(), Some("RUNNING"));
        assert!(h.last_error.as_deref().unwrap().contains("connection refused"));
    }
}
