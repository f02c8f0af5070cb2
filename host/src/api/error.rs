//! The one error type handlers return, and the JSON every failed request answers with:
//! `{"error": {"code": "<snake_case>", "message": "..."}}` and the matching status.

use std::time::Duration;

use axum::Json;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// Why a request failed. Each variant has one status and one `code` clients can match on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route has this path (404 `not_found`).
    #[error("no route for {0}")]
    NotFound(String),
    /// The path exists but not for this method (405 `method_not_allowed`; the `Allow` header lists
    /// the methods that are).
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The query string or a parameter is malformed or missing (400 `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// The request body is over the limit (413 `payload_too_large`).
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// `/v1/query` without an embedded store: the sink is Druid, query it there (404 `no_store`).
    #[error("no embedded store is configured; query the sink instead")]
    NoStore,
    /// `/v1/dead-letters` where this instance keeps none: they are in the Kafka topic the message
    /// names (404 `dead_letters_elsewhere`).
    #[error("{0}")]
    DeadLettersElsewhere(String),
    /// The statement would write (400 `read_only`).
    #[error("only read-only statements are allowed")]
    ReadOnly,
    /// SQLite refused the statement; the message is SQLite's (400 `bad_sql`).
    #[error("{0}")]
    BadSql(String),
    /// The answer would be over the byte budget of one query (422 `result_too_large`).
    #[error("{0}")]
    ResultTooLarge(String),
    /// The request (its body included) was not answered within `[api] request_timeout_ms` (408
    /// `request_timeout`).
    #[error("the request was not answered within {} ms", .0.as_millis())]
    RequestTimeout(Duration),
    /// The query ran past its deadline and was interrupted (504 `query_timeout`).
    #[error("the query did not finish within {} ms and was stopped", .0.as_millis())]
    QueryTimeout(Duration),
    /// The store cannot answer now: not created yet, busy, or too many queries waiting (503
    /// `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// Something failed on our side (500 `internal`).
    #[error("{0}")]
    Internal(String),
    /// A mutating call, or a read with `[api] read_token`, without the right bearer token (401
    /// `unauthorized`, with `WWW-Authenticate`).
    #[error("{0}")]
    Unauthorized(String),
    /// The uploaded bytes are not a plugin of our world version (422 `invalid_plugin`).
    #[error("{0}")]
    InvalidPlugin(String),
    /// The plugin's `init` refused a bound source's configuration (422 `plugin_init_failed`).
    #[error("{0}")]
    PluginInitFailed(String),
    /// No such plugin or version (404 `unknown_plugin`).
    #[error("{0}")]
    UnknownPlugin(String),
    /// The call conflicts with the plugin's state, e.g. deleting the active version (409 `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// An upload declares another plugin name, or keeps another state format, than the version it
    /// would follow, and `?replace=true` was not given (409 `not_same_rule`).
    #[error("{0}")]
    NotSameRule(String),
}

impl From<crate::plugin::registry::RegistryError> for ApiError {
    fn from(e: crate::plugin::registry::RegistryError) -> Self {
        use crate::plugin::registry::RegistryError as R;
        match e {
            R::BadName(_) => ApiError::BadRequest(e.to_string()),
            R::UnknownPlugin(_) | R::UnknownVersion { .. } => ApiError::UnknownPlugin(e.to_string()),
            R::Invalid(_) => ApiError::InvalidPlugin(e.to_string()),
            R::InitFailed { .. } => ApiError::PluginInitFailed(e.to_string()),
            R::Conflict(_) => ApiError::Conflict(e.to_string()),
            R::NotSameRule(_) => ApiError::NotSameRule(e.to_string()),
            R::Io(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status the error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) | ApiError::NoStore | ApiError::DeadLettersElsewhere(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) | ApiError::ReadOnly | ApiError::BadSql(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueryTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::InvalidPlugin(_) | ApiError::PluginInitFailed(_) | ApiError::ResultTooLarge(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::UnknownPlugin(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::NotSameRule(_) => StatusCode::CONFLICT,
        }
    }

    /// The stable, machine-readable code in the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::NoStore => "no_store",
            ApiError::DeadLettersElsewhere(_) => "dead_letters_elsewhere",
            ApiError::ReadOnly => "read_only",
            ApiError::BadSql(_) => "bad_sql",
            ApiError::QueryTimeout(_) => "query_timeout",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::ResultTooLarge(_) => "result_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::InvalidPlugin(_) => "invalid_plugin",
            ApiError::PluginInitFailed(_) => "plugin_init_failed",
            ApiError::UnknownPlugin(_) => "unknown_plugin",
            ApiError::Conflict(_) => "conflict",
            ApiError::NotSameRule(_) => "not_same_rule",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "API request failed");
        }
        let body = serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } });
        if status == StatusCode::UNAUTHORIZED {
            return (status, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response();
        }
        (status, Json(body)).into_response()
    }
}

/// The router's fallback: a path no route has.
pub(super) async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

/// Every route's fallback for a method it does not serve.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
}
