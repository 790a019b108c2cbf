//! HTTP capture, compatible with the real PostHog SDKs (posthog-js, posthog-python,
//! posthog-node): their paths, encodings, token places and responses.
//!
//! Owns: the capture routes and CORS, decoding ([`decode`]), request parsing and per-event
//! validation ([`parse`]), token → team resolution, and the mapping of every failure to a
//! status and JSON body ([`error`]).
//! Must never: answer 200 before the ingest writer reports the batch committed; run plugin code,
//! sink I/O or an fsync of its own on a request task.

pub mod decode;
pub mod error;
mod flags;
pub mod lz64;
pub mod parse;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, post, MethodFilter, MethodRouter};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::config::CaptureLimits;
use crate::event::normalize::{normalize, RequestContext};
use crate::event::timestamp::sent_at_from_query_millis;
use crate::event::IngestBatch;
use crate::ingest::{IngestError, IngestHandle};
use crate::store::{Store, Team};
use decode::{decode_payload, EncodedRequest};
use error::CaptureError;
use parse::{parse_json, parse_request, ParsedRequest};

/// Paths that take events in PostHog's classic protocol, each with and without a trailing slash.
const EVENT_PATHS: &[&str] = &["/e", "/capture", "/batch", "/track", "/engage", "/i/v0/e"];
/// Payloads above this size are decoded on the blocking pool, off the request workers.
const DECODE_INLINE_MAX: usize = 256 * 1024;

/// What the capture handlers share.
pub struct CaptureState {
    pub ingest: IngestHandle,
    pub teams: TeamDirectory,
    pub limits: CaptureLimits,
    pub trust_proxy: bool,
}

/// Project token → team, read from the store and remembered. Teams created while the server
/// runs (for example by `appliance team create` in another process) are found on first use.
pub struct TeamDirectory {
    store: Store,
    known: RwLock<HashMap<String, Team>>,
}

impl TeamDirectory {
    pub fn new(store: Store) -> TeamDirectory {
        TeamDirectory {
            store,
            known: RwLock::new(HashMap::new()),
        }
    }

    async fn resolve(&self, token: &str) -> Result<Team, CaptureError> {
        if let Some(team) = self.known.read().ok().and_then(|m| m.get(token).cloned()) {
            return Ok(team);
        }
        let store = self.store.clone();
        let key = token.to_owned();
        let found = tokio::task::spawn_blocking(move || store.team_by_token(&key))
            .await
            .map_err(|e| CaptureError::Unavailable(format!("team lookup failed: {e}")))?
            .map_err(|e| CaptureError::Unavailable(format!("team lookup failed: {e}")))?;
        let team = found.ok_or(CaptureError::UnknownToken)?;
        if let Ok(mut known) = self.known.write() {
            known.insert(token.to_owned(), team.clone());
        }
        Ok(team)
    }
}

/// The capture routes, CORS included.
pub fn router(state: Arc<CaptureState>) -> Router {
    event_routes(
        on(MethodFilter::GET.or(MethodFilter::POST), capture_classic),
        post(capture_v1),
    )
    .with_state(state)
}

/// The routes answered while idle: the same paths, each a 503 that says why.
pub fn idle_router() -> Router {
    let idle = || async { CaptureError::Idle };
    event_routes(
        on(MethodFilter::GET.or(MethodFilter::POST), idle),
        post(idle),
    )
}

/// Every path SDKs send events to, with and without the trailing slash, plus the flag routes.
fn event_routes<S: Clone + Send + Sync + 'static>(
    classic: MethodRouter<S>,
    v1: MethodRouter<S>,
) -> Router<S> {
    let mut router = Router::new();
    for path in EVENT_PATHS {
        router = router
            .route(path, classic.clone())
            .route(&format!("{path}/"), classic.clone());
    }
    router
        .route("/i/v1/analytics/events", v1)
        .merge(flag_routes())
        .layer(cors())
}

fn flag_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let any = MethodFilter::GET.or(MethodFilter::POST);
    Router::new()
        .route("/decide", on(any, flags::decide))
        .route("/decide/", on(any, flags::decide))
        .route("/flags", on(any, flags::flags))
        .route("/flags/", on(any, flags::flags))
        .route("/array/{token}/config", get(flags::array_config))
        .route("/array/{token}/config.js", get(flags::array_config_js))
}

/// Browsers send capture requests with credentials, so the origin is echoed (never `*`) and
/// credentials allowed; otherwise posthog-js cannot read the answer and re-sends.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_credentials(true)
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(3600))
}

/// The query parameters capture reads.
#[derive(Default)]
struct CaptureQuery {
    data: Option<String>,
    compression: Option<String>,
    sent_at_millis: Option<String>,
    token: Option<String>,
}

fn parse_query(query: Option<&str>) -> CaptureQuery {
    let mut q = CaptureQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = Some(value.into_owned());
        match key.as_ref() {
            "data" => q.data = value,
            "compression" => q.compression = value,
            "_" => q.sent_at_millis = value,
            "token" | "api_key" => q.token = value,
            _ => {}
        }
    }
    q
}

/// PostHog's classic protocol: `200 {"status": 1}` once every accepted event is durable.
async fn capture_classic(
    State(state): State<Arc<CaptureState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, CaptureError> {
    let Received {
        query,
        headers,
        body,
    } = receive(&state, request).await?;
    let parsed = decode_and_parse(&state, &headers, &query, body, query.token.clone()).await?;
    let accepted = parsed.accepted.len();
    let rejected = commit(&state, &headers, peer, &query, parsed).await?;
    if rejected.is_empty() {
        Ok(Json(json!({"status": 1})).into_response())
    } else if accepted == 0 {
        Err(CaptureError::NoValidEvents { rejected })
    } else {
        Err(CaptureError::SomeEventsRejected { accepted, rejected })
    }
}

/// PostHog's v1 protocol (posthog-python `capture_mode="v1"`): a result per event uuid.
async fn capture_v1(
    State(state): State<Arc<CaptureState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Result<Response, CaptureError> {
    let Received {
        query,
        headers,
        body,
    } = receive(&state, request).await?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let parsed = decode_and_parse(
        &state,
        &headers,
        &query,
        body,
        bearer.or(query.token.clone()),
    )
    .await?;
    let mut results = serde_json::Map::new();
    for event in &parsed.accepted {
        if let Some(uuid) = event.get("uuid").and_then(Value::as_str) {
            results.insert(uuid.to_owned(), json!({"result": "ok"}));
        }
    }
    let rejected = commit(&state, &headers, peer, &query, parsed).await?;
    for r in rejected {
        let key = r.uuid.unwrap_or_else(|| r.index.to_string());
        results.insert(key, json!({"result": "drop", "details": r.error}));
    }
    Ok(Json(json!({ "results": results })).into_response())
}

/// The parts of a capture request the handlers use, the body read within the size limit.
struct Received {
    query: CaptureQuery,
    headers: HeaderMap,
    body: bytes::Bytes,
}

async fn receive(state: &CaptureState, request: Request) -> Result<Received, CaptureError> {
    let query = parse_query(request.uri().query());
    let headers = request.headers().clone();
    let body = read_body(request, state.limits.max_body_bytes).await?;
    Ok(Received {
        query,
        headers,
        body,
    })
}

async fn read_body(request: Request, limit: usize) -> Result<bytes::Bytes, CaptureError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(CaptureError::BodyTooLarge { limit });
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                CaptureError::BodyTooLarge { limit }
            } else {
                CaptureError::BodyRead(e.to_string())
            }
        })
}

/// Decodes and validates a request; large payloads are handled on the blocking pool.
async fn decode_and_parse(
    state: &CaptureState,
    headers: &HeaderMap,
    query: &CaptureQuery,
    body: bytes::Bytes,
    extra_token: Option<String>,
) -> Result<ParsedRequest, CaptureError> {
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header_text(header::CONTENT_TYPE);
    let content_encoding = header_text(header::CONTENT_ENCODING);
    let data = query.data.clone();
    let compression = query.compression.clone();
    let limits = state.limits;
    let payload_len = body.len().max(query.data.as_ref().map_or(0, String::len));
    let work = move || {
        let request = EncodedRequest {
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
            query_data: data.as_deref(),
            query_compression: compression.as_deref(),
            body: &body,
        };
        let json = decode_payload(&request, limits.max_decompressed_bytes)?;
        parse_request(
            parse_json(&json)?,
            extra_token.as_deref(),
            limits.max_event_bytes,
        )
    };
    if payload_len > DECODE_INLINE_MAX {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| CaptureError::Unavailable(format!("decoding failed: {e}")))?
    } else {
        work()
    }
}

/// Resolves the team, makes the accepted events durable, and returns the rejections.
async fn commit(
    state: &CaptureState,
    headers: &HeaderMap,
    peer: SocketAddr,
    query: &CaptureQuery,
    parsed: ParsedRequest,
) -> Result<Vec<error::Rejection>, CaptureError> {
    let team = state.teams.resolve(&parsed.token).await?;
    if parsed.accepted.is_empty() {
        return Ok(parsed.rejected);
    }
    let ip = client_ip(headers, peer, state.trust_proxy).to_string();
    let sent_at = parsed.sent_at.or_else(|| {
        query
            .sent_at_millis
            .as_deref()
            .and_then(sent_at_from_query_millis)
    });
    let ctx = RequestContext {
        received_at: Utc::now(),
        sent_at,
        ip: Some(&ip),
        anonymize_ips: team.anonymize_ips,
    };
    let events = parsed
        .accepted
        .into_iter()
        .map(|event| normalize(&ctx, event).0)
        .collect();
    let batch = IngestBatch {
        team_id: team.id,
        received_at: ctx.received_at,
        sent_at,
        ip: Some(ip.clone()),
        events,
    };
    state
        .ingest
        .submit(batch.encode())
        .await
        .map_err(|e| match e {
            IngestError::Busy => CaptureError::Busy,
            other => CaptureError::Unavailable(other.to_string()),
        })?;
    Ok(parsed.rejected)
}

/// The client's address: the first `X-Forwarded-For` entry when a proxy is trusted, else the peer.
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_proxy: bool) -> IpAddr {
    if trust_proxy {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|first| first.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer.ip()
}
