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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;

use crate::ops::{OpError, Ops};

/// Largest request body accepted (a plugin upload travels base64-encoded in JSON).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

pub struct ApiState {
    pub ops: Ops,
    failures: FailedAuth,
}

impl ApiState {
    pub fn new(ops: Ops) -> ApiState {
        ApiState {
            ops,
            failures: FailedAuth::new(),
        }
    }
}

/// Wrong tokens an address may send per minute; one more locks it out (429, the token not even
/// looked at) until its allowance comes back.
const AUTH_FAILURES_PER_MINUTE: u32 = 10;
/// Addresses remembered as locked out at most; the oldest lockouts go first.
const MAX_LOCKED: usize = 10_000;

/// Throttles failed authentication per client address.
struct FailedAuth {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    locked: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailedAuth {
    fn new() -> FailedAuth {
        let per_minute = NonZeroU32::new(AUTH_FAILURES_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        FailedAuth {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            locked: Mutex::default(),
        }
    }

    /// When `ip` may try again, if it is locked out now.
    fn locked_until(&self, ip: IpAddr) -> Option<Instant> {
        let locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        locked
            .get(&ip)
            .copied()
            .filter(|until| *until > Instant::now())
    }

    /// Counts a failure from `ip`; past the allowance the address is locked out.
    fn failed(&self, ip: IpAddr) {
        if self.limiter.len() > MAX_LOCKED {
            self.limiter.retain_recent();
        }
        if let Err(not_until) = self.limiter.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            locked.retain(|_, until| *until > now);
            if locked.len() < MAX_LOCKED {
                locked.insert(ip, now + wait);
            }
        }
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

/// Compares without stopping at the first difference, so timing does not leak the token.
fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let store = state.ops.store.clone();
    let expected = tokio::task::spawn_blocking(move || store.current_admin_api_token()).await;
    let expected = match expected {
        Ok(Ok(Some(token))) => token,
        Ok(Ok(None)) => return ApiError::Unauthorized.into_response(),
        Ok(Err(e)) => return ApiError::Op(OpError::Internal(e.to_string())).into_response(),
        Err(e) => return ApiError::Op(OpError::Internal(e.to_string())).into_response(),
    };
    if same_token(&given, &expected) {
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
