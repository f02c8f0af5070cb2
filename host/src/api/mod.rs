//! The HTTP API (axum): health for orchestrators, read-only SQL over the embedded store, and a page
//! for operators.
//!
//! Every route, with what it answers, is in the book's route tables (`docs/src/operating/api.md`
//! and `docs/src/plugins/upload-and-swap.md`); `host/tests/it/docs.rs` checks them against the
//! `.route(...)` calls of [`router`]'s table below, so neither can drift.
//!
//! Mutating calls need `Authorization: Bearer <SLUICE_API_TOKEN>` (401 otherwise); with
//! `[api] read_token` reads do too, but for `/health/*` and the page's HTML.
//!
//! Connections are bounded: a request's header must arrive whole within `header_read_timeout_ms`
//! (an idle keep-alive connection is closed after it too), a request must be answered within
//! `request_timeout_ms` (408 otherwise), and at most `max_connections` are served at once (more wait
//! in the listen backlog), so slow or idle clients cannot take the API, `/metrics` included, away
//! from the rest.
//!
//! Every failure answers `{"error": {"code", "message"}}` with its status ([`ApiError`]), unknown
//! routes, wrong methods, malformed query strings and oversized bodies included.
//!
//! [`router`] builds the routes over an [`ApiState`]; [`serve`] runs them on a listener until a
//! shutdown future resolves, so tests bind port 0 and stop the server when they are done.

mod auth;
mod chains;
mod dead_letters;
mod error;
mod health;
mod log;
mod plugins;
mod query;
pub mod replay;
mod sources;

pub use dead_letters::DeadLetterSource;
pub use log::LogProbe;
pub use plugins::PluginDirectory;
pub use sources::{SourceDirectory, SourceEntry};

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

pub use crate::telemetry::health::{Check, Health, Readiness};
pub use error::ApiError;

/// The `[api]` table: where the API listens and the limits requests run under.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on; loopback by default, so nothing is exposed until an operator says so.
    #[serde(default = "defaults::bind")]
    pub bind: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Rows `/v1/query` returns when the request names no `limit`.
    #[serde(default = "defaults::query_default_limit")]
    pub query_default_limit: usize,
    /// The largest `limit` a query may ask for.
    #[serde(default = "defaults::query_max_limit")]
    pub query_max_limit: usize,
    /// How long a query may wait for a slot and run before it is stopped.
    #[serde(default = "defaults::query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// Queries run at once; more wait for a slot (each runs on a blocking thread).
    #[serde(default = "defaults::query_concurrency")]
    pub query_concurrency: usize,
    /// How long a client may take to send a request's header, and how long an idle keep-alive
    /// connection stays open; then the connection is closed.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a request may take, its body included, before it is answered 408.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Connections served at once; more wait in the listen backlog until one closes.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Whether reads need the token too (every route but `/health/live`, `/health/ready` and the
    /// page's HTML): for an API bound beyond loopback. Needs `SLUICE_API_TOKEN`.
    #[serde(default)]
    pub read_token: bool,
    /// The bearer token mutating calls (and with `read_token`, reads) need, from the environment
    /// variable `SLUICE_API_TOKEN` (never from the file, never printed). Without one, mutating calls
    /// are refused.
    #[serde(skip)]
    pub token: Option<Secret>,
}

/// A secret: compared and used, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// The token from `SLUICE_API_TOKEN`, if set and not blank.
    pub fn from_env() -> Option<Secret> {
        std::env::var("SLUICE_API_TOKEN").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).map(Secret)
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            bind: defaults::bind(),
            max_body_bytes: defaults::max_body_bytes(),
            query_default_limit: defaults::query_default_limit(),
            query_max_limit: defaults::query_max_limit(),
            query_timeout_ms: defaults::query_timeout_ms(),
            query_concurrency: defaults::query_concurrency(),
            header_read_timeout_ms: defaults::header_read_timeout_ms(),
            request_timeout_ms: defaults::request_timeout_ms(),
            max_connections: defaults::max_connections(),
            read_token: false,
            token: None,
        }
    }
}

impl ApiConfig {
    /// Checks what types cannot.
    ///
    /// # Errors
    /// A message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.query_max_limit == 0 {
            return Err("api.query_max_limit must be positive".into());
        }
        if self.query_default_limit > self.query_max_limit {
            return Err(format!(
                "api.query_default_limit ({}) is over api.query_max_limit ({})",
                self.query_default_limit, self.query_max_limit
            ));
        }
        if self.query_timeout_ms == 0 || self.query_concurrency == 0 || self.max_body_bytes == 0 {
            return Err("api: query_timeout_ms, query_concurrency and max_body_bytes must be positive".into());
        }
        for (key, value) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_connections", self.max_connections as u64),
        ] {
            if value == 0 {
                return Err(format!("api.{key} must be positive"));
            }
        }
        if self.max_connections > MAX_CONNECTIONS {
            return Err(format!("api.max_connections must be at most {MAX_CONNECTIONS}"));
        }
        Ok(())
    }
}

mod defaults {
    use super::*;

    /// The API's default port.
    pub const PORT: u16 = 8080;

    pub fn bind() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, PORT))
    }
    pub fn max_body_bytes() -> usize {
        // Room for a plugin upload: components are well under this.
        32 << 20
    }
    pub fn query_default_limit() -> usize {
        1_000
    }
    pub fn query_max_limit() -> usize {
        100_000
    }
    pub fn query_timeout_ms() -> u64 {
        10_000
    }
    pub fn query_concurrency() -> usize {
        4
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn request_timeout_ms() -> u64 {
        60_000
    }
    pub fn max_connections() -> usize {
        // Well under the usual 1,024 open files a process may have, which sources and stores share.
        256
    }
}

/// The most `[api] max_connections` may be.
const MAX_CONNECTIONS: usize = 100_000;

/// What the handlers share. Cheap to clone: axum clones it for every request.
#[derive(Clone)]
pub struct ApiState {
    /// The embedded store's file, when the sink is the embedded store; `/v1/query` answers 404
    /// `no_store` without it.
    store: Option<PathBuf>,
    /// The checks `/health/ready` reports; components hold the same `Arc` and update it.
    health: Arc<Health>,
    /// The request body limit.
    max_body_bytes: usize,
    /// Query limits and the slots that bound how many run at once.
    query: query::QueryLimits,
    /// The sources `/v1/sources` lists.
    sources: Arc<SourceDirectory>,
    /// What `/metrics` renders.
    metrics: Arc<crate::telemetry::Metrics>,
    /// The plugin registry `/v1/plugins` serves.
    plugins: Arc<PluginDirectory>,
    /// The bearer token mutating calls need.
    token: Option<Arc<str>>,
    /// Whether reads need it too.
    read_token: bool,
    /// How long a request may take.
    request_timeout: Duration,
    /// Reads the hand-off's positions for `/v1/log`; set once the log is open.
    log: Arc<std::sync::OnceLock<LogProbe>>,
    /// The replay jobs of `/v1/replay`.
    replays: Arc<replay::ReplayJobs>,
    /// What `/v1/dead-letters` needs beside the store: the symbol dictionary, or the topic.
    dead_letters: Arc<DeadLetterSource>,
    /// The chains `/v1/sources/{name}/chain` shows and edits, where this instance runs them.
    chains: Option<Arc<crate::chains::ChainBook>>,
}

impl ApiState {
    /// State for the API under `config`: queries go to the store at `store` (if any), readiness
    /// comes from `health`.
    pub fn new(config: &ApiConfig, store: Option<PathBuf>, health: Arc<Health>) -> Self {
        ApiState {
            store,
            health,
            max_body_bytes: config.max_body_bytes,
            query: query::QueryLimits {
                default_limit: config.query_default_limit.min(config.query_max_limit),
                max_limit: config.query_max_limit,
                timeout: Duration::from_millis(config.query_timeout_ms),
                slots: Arc::new(Semaphore::new(config.query_concurrency.clamp(1, Semaphore::MAX_PERMITS))),
            },
            sources: Arc::default(),
            metrics: Arc::default(),
            plugins: Arc::default(),
            token: config.token.as_ref().map(|t| Arc::from(t.0.as_str())),
            read_token: config.read_token,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            log: Arc::default(),
            replays: Arc::default(),
            dead_letters: Arc::default(),
            chains: None,
        }
    }

    /// Where `/v1/dead-letters` finds symbol names (or, without a store, which topic to point to).
    pub fn dead_letter_source(&self) -> &Arc<DeadLetterSource> {
        &self.dead_letters
    }

    /// Where `/v1/replay` starts and tracks its jobs.
    pub fn replays(&self) -> &Arc<replay::ReplayJobs> {
        &self.replays
    }

    /// Where `/v1/log` reads the hand-off; the first call counts.
    pub fn set_log(&self, probe: LogProbe) {
        let _ = self.log.set(probe);
    }

    /// Serves the registry `directory` will hold on `/v1/plugins`.
    pub fn with_plugins(mut self, directory: Arc<PluginDirectory>) -> Self {
        self.plugins = directory;
        self
    }

    /// Renders `metrics` on `/metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Shows and edits the chains of `book` on `/v1/sources/{name}/chain` (and `/v1/sources` lists
    /// them as they run).
    pub fn with_chains(mut self, book: Arc<crate::chains::ChainBook>) -> Self {
        self.chains = Some(book);
        self
    }

    /// Lists the sources of `directory` on `/v1/sources`.
    pub fn with_sources(mut self, directory: Arc<SourceDirectory>) -> Self {
        self.sources = directory;
        self
    }
}

/// The API's routes over `state`, with JSON errors for unknown routes, wrong methods and bodies over
/// the limit.
pub fn router(state: ApiState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let plugin_routes = Router::new()
        .route("/v1/plugins", get(plugins::list))
        .route("/v1/plugins/{name}", get(plugins::get_one).put(plugins::upload))
        .route("/v1/plugins/{name}/activate", post(plugins::activate))
        .route("/v1/plugins/{name}/promote", post(plugins::promote))
        .route("/v1/plugins/{name}/rollback", post(plugins::rollback))
        .route("/v1/plugins/{name}/versions/{version}", delete(plugins::delete))
        .route("/v1/sources/{name}/chain", get(chains::get_chain).delete(chains::reset_chain))
        .route("/v1/sources/{name}/chain/links", post(chains::add_link))
        .route("/v1/sources/{name}/chain/links/{at}", put(chains::configure_link).delete(chains::remove_link))
        .route("/v1/replay", post(replay::start))
        .route("/v1/replay/{id}", get(replay::status).delete(replay::cancel))
        .route("/v1/replay/tables", get(replay::list))
        .route("/v1/replay/tables/{name}", delete(replay::drop))
        // Checked before a body is read; GET passes.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .merge(plugin_routes)
        .route("/", get(page))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/v1/query", get(query::query))
        .route("/v1/dead-letters", get(dead_letters::list))
        .route("/v1/sources", get(sources::list))
        .route("/v1/log", get(log::status))
        .route("/metrics", get(metrics))
        // Reads with `[api] read_token`; on the routes above, so it comes after them.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_read_token))
        // Applies to the routes above, so it comes after them.
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        // Bodies read by extractors stop at the limit; a declared length over it is refused up front.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(max_body_bytes, refuse_large_bodies))
        // A request answered within its time, a slow body included (inside the count, so it counts
        // the 408s).
        .layer(middleware::from_fn_with_state(state.request_timeout, limit_time))
        // Outermost, so every answer is counted, refusals included.
        .layer(middleware::from_fn_with_state(state.metrics.clone(), count_requests))
        .with_state(state)
}

/// Counts each request and times it, by the route it matched (never the raw path, so labels stay
/// bounded: a path no route has counts as `unmatched`), its method and its status.
async fn count_requests(
    State(metrics): State<Arc<crate::telemetry::Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    };
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [route.as_str(), method, status.as_str()];
    metrics.http_requests_total.with_label_values(&labels).inc();
    metrics.http_request_duration_seconds.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
    response
}

/// The operator page: one self-contained HTML file (inline CSS and script, nothing fetched from
/// elsewhere) that reads the JSON routes above every two seconds.
const PAGE: &str = include_str!("page.html");

/// `GET /`: the operator page.
async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

/// `GET /metrics`: Prometheus' text exposition format.
async fn metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

/// Answers 408 to a request not answered within `timeout`, its body included. (Work a handler moved
/// to a blocking thread goes on: a plugin upload may still be stored, a query still runs to its own
/// deadline.)
async fn limit_time(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(timeout).into_response(),
    }
}

/// Answers 413 to a request whose `Content-Length` is over the limit, before any handler runs.
async fn refuse_large_bodies(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => ApiError::PayloadTooLarge { limit }.into_response(),
        _ => next.run(request).await,
    }
}

/// How [`serve`] bounds its connections.
#[derive(Clone, Debug)]
pub struct Connections {
    /// How long a request's header may take to arrive, and an idle keep-alive connection may stay.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max: usize,
    /// Where the open connections and header timeouts are counted (a registry of their own when
    /// none is given).
    pub metrics: Arc<crate::telemetry::Metrics>,
}

impl Connections {
    /// The limits `config` sets, counted in `metrics`.
    pub fn new(config: &ApiConfig, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        Connections {
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            max: config.max_connections.clamp(1, MAX_CONNECTIONS),
            metrics,
        }
    }
}

/// How long [`serve`] waits, once stopped, for the requests still in flight to finish.
const DRAIN: Duration = Duration::from_secs(10);

/// The router as one connection's service, knowing whether a request of the connection is in
/// flight: at a stop, a connection with none (idle, or a client still sending its header) is closed
/// at once, and one with a request lets it finish.
struct Tracked {
    inner: hyper_util::service::TowerToHyperService<Router>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// One request in flight, for as long as its future lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, request: Request<hyper::body::Incoming>) -> Self::Future {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(guard);
            answer
        })
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, closes the
/// connections that serve no request, lets requests in flight finish (at most [`DRAIN`]), and
/// returns.
///
/// HTTP/1.1, one task per connection. At most `limits.max` connections are served at once: at the
/// cap nothing more is accepted until one closes, so new clients wait in the listen backlog rather
/// than the process running out of file descriptors. A header that has not arrived whole within
/// `limits.header_read_timeout` closes its connection (counted in
/// `sluice_http_header_timeouts_total`), which is what frees a slot a slow client holds.
///
/// # Errors
/// None yet: an accept that fails (out of file descriptors, say) is logged and retried after a
/// second.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Connections,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(Semaphore::new(limits.max));
    let (closing, _) = tokio::sync::watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let metrics = limits.metrics;
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, clients wait in the backlog until a connection closes.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the HTTP API cannot accept a connection; retrying in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            },
            _ = &mut shutdown => break,
        };
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = Tracked { inner: TowerToHyperService::new(router.clone()), in_flight: in_flight.clone() };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let (mut closing, metrics) = (closing.subscribe(), metrics.clone());
        tokio::spawn(async move {
            let _slot = permit;
            metrics.http_open_connections.inc();
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                    connection.as_mut().graceful_shutdown();
                    if in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                        // Idle, or a header still arriving: nothing to finish.
                        Ok(())
                    } else {
                        connection.await
                    }
                }
            };
            if let Err(e) = served {
                if e.is_timeout() {
                    metrics.http_header_timeouts_total.inc();
                }
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            metrics.http_open_connections.dec();
        });
    }
    // Stop: connections finish what they serve; each gives its slot back when it ends.
    let _ = closing.send(true);
    let all = u32::try_from(limits.max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, slots.acquire_many(all)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_to_loopback_and_names_unknown_fields() {
        let c: ApiConfig = toml::from_str("").unwrap();
        assert_eq!(c, ApiConfig::default());
        assert_eq!(c.bind, "127.0.0.1:8080".parse().unwrap());
        assert!(c.bind.ip().is_loopback());
        assert_eq!((c.query_default_limit, c.query_max_limit), (1_000, 100_000));
        assert_eq!(c.validate(), Ok(()));
        let c: ApiConfig = toml::from_str("bind = \"0.0.0.0:8000\"\nquery_timeout_ms = 500").unwrap();
        assert_eq!((c.bind.port(), c.query_timeout_ms), (8000, 500));
        let e = toml::from_str::<ApiConfig>("listen = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = toml::from_str::<ApiConfig>("bind = \"localhost\"").unwrap_err();
        assert!(e.to_string().contains("bind"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let c = ApiConfig { query_default_limit: 10, query_max_limit: 5, ..ApiConfig::default() };
        assert!(c.validate().unwrap_err().contains("query_default_limit"));
        let c = ApiConfig { query_concurrency: 0, ..ApiConfig::default() };
        assert!(c.validate().unwrap_err().contains("query_concurrency"));
        for (c, key) in [
            (ApiConfig { header_read_timeout_ms: 0, ..ApiConfig::default() }, "api.header_read_timeout_ms"),
            (ApiConfig { request_timeout_ms: 0, ..ApiConfig::default() }, "api.request_timeout_ms"),
            (ApiConfig { max_connections: 0, ..ApiConfig::default() }, "api.max_connections"),
            (ApiConfig { max_connections: usize::MAX, ..ApiConfig::default() }, "api.max_connections"),
        ] {
            assert!(c.validate().unwrap_err().starts_with(key), "{key}");
        }
        let c: ApiConfig = toml::from_str("read_token = true\nmax_connections = 16").unwrap();
        assert_eq!((c.read_token, c.max_connections, c.header_read_timeout_ms), (true, 16, 10_000));
    }

    #[tokio::test]
    async fn extreme_limits_do_not_panic() {
        let c = ApiConfig { query_concurrency: usize::MAX, query_timeout_ms: u64::MAX, ..ApiConfig::default() };
        let state = ApiState::new(&c, Some("/nonexistent/store.db".into()), Arc::new(Health::new()));
        let r = query::run("/nonexistent/store.db".into(), "SELECT 1".into(), 1, state.query.clone()).await;
        assert_eq!(r.unwrap_err().code(), "unavailable");
    }

    #[test]
    fn every_error_has_its_status_and_code() {
        use axum::http::StatusCode;
        let cases = [
            (ApiError::NotFound("/x".into()), StatusCode::NOT_FOUND, "not_found"),
            (
                ApiError::MethodNotAllowed { method: "POST".into(), path: "/x".into() },
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (ApiError::BadRequest("x".into()), StatusCode::BAD_REQUEST, "bad_request"),
            (ApiError::PayloadTooLarge { limit: 1 }, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            (ApiError::NoStore, StatusCode::NOT_FOUND, "no_store"),
            (ApiError::ReadOnly, StatusCode::BAD_REQUEST, "read_only"),
            (ApiError::BadSql("x".into()), StatusCode::BAD_REQUEST, "bad_sql"),
            (ApiError::QueryTimeout(Duration::from_secs(1)), StatusCode::GATEWAY_TIMEOUT, "query_timeout"),
            (ApiError::RequestTimeout(Duration::from_secs(1)), StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            (ApiError::Unavailable("x".into()), StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (ApiError::Internal("x".into()), StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status(), e.code()), (status, code), "{e:?}");
            assert_eq!(e.into_response().status(), status);
        }
    }
}
