//! Operator-facing HTTP: liveness (`/_health`), readiness (`/_ready`), the management API under
//! `/api/` ([`api`]), `/metrics`, and the admin page ([`page`]) with its sessions.
//!
//! Owns: what the appliance reports about itself over HTTP, and management over HTTP behind the
//! admin API token.
//! Must never: block on the sink or hold a write transaction; reports read atomics and one
//! short read transaction.

pub mod api;
pub mod metrics;
pub mod page;
pub mod session;
mod throttle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::pipeline::PipelineStatus;
use crate::store::Store;

pub struct AdminState {
    pub store: Store,
    pub sink_name: &'static str,
    /// The queue's byte budget and the disk's free-space floor capture keeps.
    pub max_queue_bytes: u64,
    pub min_free_bytes: u64,
    pub pipeline: Arc<PipelineStatus>,
    /// Each follower sink's name and progress (positions in the follow log).
    pub followers: Vec<(&'static str, Arc<PipelineStatus>)>,
    /// Set once shutdown has begun: readiness then answers 503 so balancers move away.
    pub stopping: Arc<AtomicBool>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/_health", get(health))
        .route("/_ready", get(ready))
        .with_state(state)
}

/// `/metrics`, for the admin listener: open to loopback, the API token needed from elsewhere.
pub fn metrics_router(state: Arc<AdminState>, api: Arc<api::ApiState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::scrape))
        .route_layer(axum::middleware::from_fn_with_state(
            api,
            api::require_token_off_loopback,
        ))
        .with_state(state)
}

/// The routes served while idle.
pub fn idle_router() -> Router {
    Router::new()
        .route("/_health", get(health))
        .route("/_ready", get(|| async { Json(json!({"status": "idle"})) }))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    // The sinks' reports first, the store after: a lead write commits its follow-log record
    // before its report moves, so a report read first can only be behind the store, and a lag
    // computed from the two is never 0 while a follower still has a record to copy.
    let sink = state.pipeline.report(state.sink_name);
    let followers: Vec<_> = state
        .followers
        .iter()
        .map(|(name, status)| status.report(name))
        .collect();
    let store = state.store.clone();
    let stats = tokio::task::spawn_blocking(move || {
        (
            store.ingest_stats(),
            store.job_stats(),
            store.follow_last_seq().unwrap_or(0),
        )
    })
    .await;
    let (queue, jobs, follow_last) = match stats {
        Ok((ingest, jobs, follow_last)) => (
            ingest.map_or_else(|e| json!({"error": e.to_string()}), |s| json!(s)),
            jobs.map_or_else(|e| json!({"error": e.to_string()}), |s| json!(s)),
            follow_last,
        ),
        Err(e) => (
            json!({"error": e.to_string()}),
            json!({"error": e.to_string()}),
            0,
        ),
    };
    let last_seq = queue["last_seq"].as_u64().unwrap_or(sink.position);
    let mut sinks = vec![sink_entry("lead", &sink, last_seq)];
    for report in &followers {
        sinks.push(sink_entry("follower", report, follow_last));
    }
    let room = state.store.room();
    let capture = if room.queued_bytes >= state.max_queue_bytes {
        "refusing: the ingest queue is at INGEST_MAX_QUEUE_BYTES"
    } else if room.free_disk_bytes < state.min_free_bytes {
        "refusing: the disk is under DATA_DIR_MIN_FREE_MB"
    } else {
        "accepting"
    };
    let deferred: serde_json::Map<String, serde_json::Value> = state
        .store
        .deferred_teams()
        .into_iter()
        .map(|(team, bytes)| (team.to_string(), json!(bytes)))
        .collect();
    let room = json!({
        "capture": capture,
        "deferred_bytes_by_team": deferred,
        "queued_bytes": room.queued_bytes,
        "max_queue_bytes": state.max_queue_bytes,
        "free_disk_bytes": room.free_disk_bytes,
        "min_free_disk_bytes": state.min_free_bytes,
    });
    let stopping = state.stopping.load(Ordering::Relaxed);
    let healthy = sink.healthy && followers.iter().all(|r| r.healthy);
    let status = match (stopping, healthy) {
        (true, _) => "stopping",
        (false, true) => "ready",
        (false, false) => "degraded",
    };
    let code = if stopping {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(json!({"status": status, "queue": queue, "room": room, "sink": sink, "sinks": sinks, "jobs": jobs})),
    )
        .into_response()
}

/// One sink's line of `/_ready`: its position, how far behind what it should hold it is (the
/// lead in ingest-queue batches, a follower in follow-log records), and its last error.
fn sink_entry(
    role: &str,
    report: &crate::pipeline::PipelineReport,
    last: u64,
) -> serde_json::Value {
    json!({
        "name": report.sink,
        "role": role,
        "position": report.position,
        "lag": last.saturating_sub(report.position),
        "events_stored": report.events_stored,
        "duplicates_skipped": report.duplicates_skipped,
        "healthy": report.healthy,
        "last_error": report.last_error,
    })
}
