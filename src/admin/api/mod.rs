//! The JSON management API under `/api/`: the operations of `ops` over HTTP, for the admin page
//! and for scripts, one file per resource. Every request needs
//! `Authorization: Bearer <admin API token>` (`appliance api-token` prints it).
//!
//! Owns: routing, request and response shapes, and the one mapping of [`OpError`] to HTTP
//! statuses ([`ApiError`]'s `IntoResponse`).
//! Must never: hold an operation's rules (they live in `ops`, shared with the CLI), or run store
//! or plugin work on an async worker (everything goes through [`blocking`]).

mod exports;
mod jobs;
mod plugins;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::ops::{OpError, Ops};

/// Largest request body accepted (a plugin upload travels base64-encoded in JSON).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

pub struct ApiState {
    pub ops: Ops,
    pub token: String,
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
            post(jobs::enqueue),
        )
        .route(
            "/api/teams/{team}/plugins/{plugin}/exports",
            post(exports::start),
        )
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
    #[error(transparent)]
    Op(#[from] OpError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Op(OpError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Op(OpError::Malformed(_)) => StatusCode::BAD_REQUEST,
            ApiError::Op(OpError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Op(OpError::Conflict(_)) => StatusCode::CONFLICT,
            ApiError::Op(OpError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same_token(given, &state.token) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
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
