//! The bearer token: every call that changes something needs it, and with `[api] read_token` every
//! read too, but for the health checks and the page's HTML (which holds no data). The token comes
//! from `SLUICE_API_TOKEN`; it is checked before a body is read.

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};

/// Reads that never need the token: what orchestrators probe, and the page's static HTML (its data
/// comes from the routes that do need it).
const OPEN_READS: [&str; 3] = ["/health/live", "/health/ready", "/"];

/// Refuses a mutating request (any method but GET and HEAD) without the right bearer token.
pub(super) async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if is_read(&request) {
        return next.run(request).await;
    }
    match check(&state, &request, "plugin changes") {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// With `[api] read_token`: refuses a read (GET, HEAD) without the right bearer token, but for
/// [`OPEN_READS`].
pub(super) async fn require_read_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if !state.read_token || !is_read(&request) || OPEN_READS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match check(&state, &request, "reads ([api] read_token)") {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn is_read(request: &Request) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
}

/// Whether `request` carries the configured token; `what` names what a missing token forbids.
fn check(state: &ApiState, request: &Request, what: &str) -> Result<(), ApiError> {
    let Some(expected) = state.token.as_deref() else {
        return Err(ApiError::Unauthorized(format!(
            "no API token is configured: set SLUICE_API_TOKEN to allow {what}"
        )));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if same_secret(token, expected) => Ok(()),
        Some(_) => Err(ApiError::Unauthorized("the bearer token is not valid".into())),
        None => Err(ApiError::Unauthorized("this call needs an Authorization: Bearer <token> header".into())),
    }
}

/// Compares the digests, so the time taken says nothing about where the strings differ.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a.as_bytes()), sha2::Sha256::digest(b.as_bytes()));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3creT"));
        assert!(!same_secret("s3cret", "s3cret "));
        assert!(!same_secret("", "x"));
    }
}
