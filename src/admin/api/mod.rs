//! The JSON management API under `/api/`: the operations of `ops` over HTTP, for the admin page
//! and for scripts, one file per resource. Every request needs
//! `Authorization: Bearer <admin API token>` (`appliance api-token` prints it, the settings
//! page shows and rotates it) or an admin page session (with its CSRF token in
//! `X-CSRF-Token` unless it only reads).
//!
//! Owns: routing, request and response shapes, and the one mapping of [`OpError`] to HTTP
//! statuses ([`ApiError`]'s `IntoResponse`).
//! Must never: hold an operation's rules (they live in `ops`, shared with the CLI), or run store
//! or plugin work on an async worker (everything goes through [`blocking`]).

mod exports;
mod jobs;
mod persons;
mod plugins;
mod sinks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use super::session::{Sessions, CSRF_HEADER};
use super::throttle::FailedAuth;
use crate::ops::admin::constant_time_eq;
use crate::ops::{OpError, Ops};

/// Largest request body accepted (a plugin upload travels base64-encoded in JSON).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

pub struct ApiState {
    pub ops: Ops,
    /// Admin page sessions, which `/api/` accepts beside the token.
    pub sessions: Sessions,
    failures: FailedAuth,
}

impl ApiState {
    pub fn new(ops: Ops, sessions: Sessions) -> ApiState {
        ApiState {
            ops,
            sessions,
            failures: FailedAuth::new(),
        }
    }

    /// Whether the request carries a live admin page session, with its CSRF token in
    /// [`CSRF_HEADER`] unless it only reads.
    async fn session_admits(&self, headers: &axum::http::HeaderMap, method: &Method) -> bool {
        let ops = self.ops.clone();
        let Ok(Ok(epoch)) = tokio::task::spawn_blocking(move || ops.session_epoch()).await else {
            return false;
        };
        let Some(session) = self.sessions.check(headers, epoch) else {
            return false;
        };
        let reads = matches!(*method, Method::GET | Method::HEAD);
        reads
            || headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|given| session.csrf_matches(given))
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/plugins", get(plugins::list).post(plugins::install))
        .route(
            "/api/teams/{team}/plugins/{plugin}",
            put(plugins::configure),
        )
        .route(
            "/api/teams/{team}/plugins/{plugin}/logs",
            get(plugins::logs),
        )
        .route(
            "/api/teams/{team}/plugins/{plugin}/storage",
            get(plugins::storage),
        )
        .route(
            "/api/teams/{team}/plugins/{plugin}/jobs",
            post(jobs::enqueue).layer(DefaultBodyLimit::max(jobs::MAX_ENQUEUE_BYTES)),
        )
        .route(
            "/api/teams/{team}/plugins/{plugin}/exports",
            post(exports::start),
        )
        .route(
            "/api/teams/{team}/persons/{distinct_id}",
            get(persons::show).delete(persons::delete),
        )
        .route(
            "/api/teams/{team}/ingestion_warnings",
            get(persons::warnings),
        )
        .route("/api/sink/dead-letters", get(sinks::list))
        .route("/api/sink/dead-letters/resend", post(sinks::resend))
        .route("/api/sink/dead-letters/drop", post(sinks::drop))
        .route("/api/exports", get(exports::list))
        .route("/api/exports/{id}", get(exports::show))
        .route("/api/exports/{id}/cancel", post(exports::cancel))
        .route("/api/jobs", get(jobs::list))
        .route("/api/jobs/{id}", get(jobs::show))
        .route("/api/jobs/{id}/{action}", post(jobs::control))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "missing or wrong admin API token (Authorization: Bearer …; see `appliance api-token`)"
    )]
    Unauthorized,
    #[error("too many wrong admin API tokens from this address; retry in {seconds} s")]
    Throttled { seconds: u64 },
    #[error(transparent)]
    Op(#[from] OpError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Throttled { seconds } => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"error": self.to_string()})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
                return response;
            }
            ApiError::Op(OpError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Op(OpError::Malformed(_)) => StatusCode::BAD_REQUEST,
            ApiError::Op(OpError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Op(OpError::Conflict(_)) => StatusCode::CONFLICT,
            ApiError::Op(OpError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// Admits a request with the current admin API token (read from the store each time, so a
/// rotation applies at once); throttles an address that keeps sending wrong ones.
async fn require_token(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(until) = state.failures.locked_until(peer.ip()) {
        let seconds = until.saturating_duration_since(Instant::now()).as_secs() + 1;
        return ApiError::Throttled { seconds }.into_response();
    }
    let Some(given) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
    else {
        if state
            .session_admits(request.headers(), request.method())
            .await
        {
            return next.run(request).await;
        }
        return ApiError::Unauthorized.into_response();
    };
    let store = state.ops.store.clone();
    let expected = tokio::task::spawn_blocking(move || store.current_admin_api_token()).await;
    let expected = match expected {
        Ok(Ok(Some(token))) => token,
        Ok(Ok(None)) => return ApiError::Unauthorized.into_response(),
        Ok(Err(e)) => return ApiError::Op(OpError::Internal(e.to_string())).into_response(),
        Err(e) => return ApiError::Op(OpError::Internal(e.to_string())).into_response(),
    };
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        next.run(request).await
    } else {
        state.failures.failed(peer.ip());
        ApiError::Unauthorized.into_response()
    }
}

/// Admits a request from loopback as is; from elsewhere, as [`require_token`] does.
pub(crate) async fn require_token_off_loopback(
    state: State<Arc<ApiState>>,
    peer: ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if peer.0.ip().is_loopback() {
        return next.run(request).await;
    }
    require_token(state, peer, request, next).await
}

/// Runs an operation off the async workers.
async fn blocking<T: Send + 'static>(
    state: &Arc<ApiState>,
    work: impl FnOnce(&Ops) -> Result<T, OpError> + Send + 'static,
) -> Result<T, ApiError> {
    let ops = state.ops.clone();
    tokio::task::spawn_blocking(move || work(&ops))
        .await
        .map_err(|e| OpError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}
