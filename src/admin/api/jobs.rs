//! `/api/jobs` and `/api/teams/{team}/plugins/{plugin}/jobs`: list, show, enqueue, cancel,
//! terminate, retry.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::ops::jobs::{parse_job_id, parse_job_state, JobRequest, DEFAULT_LIST_LIMIT};
use crate::store::TeamId;

#[derive(Deserialize)]
pub(super) struct EnqueueBody {
    name: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    max_attempts: Option<u32>,
}

pub(super) async fn enqueue(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(body): Json<EnqueueBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = JobRequest {
        name: body.name,
        payload: body.payload.to_string(),
        idempotency_key: body.idempotency_key,
        delay_ms: body.delay_ms,
        max_attempts: body.max_attempts,
        timeout_ms: 0,
    };
    let id = blocking(&state, move |ops| ops.enqueue_job(team, &plugin, request)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id.to_string() }))))
}

#[derive(Deserialize)]
pub(super) struct JobFilter {
    state: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    Query(filter): Query<JobFilter>,
) -> Result<Json<Value>, ApiError> {
    let wanted = filter.state.as_deref().map(parse_job_state).transpose()?;
    let limit = filter.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    let (stats, jobs) = blocking(&state, move |ops| ops.list_jobs(wanted, limit)).await?;
    Ok(Json(json!({ "stats": stats, "jobs": jobs })))
}

pub(super) async fn show(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_job_id(&id)?;
    let job = blocking(&state, move |ops| ops.show_job(id)).await?;
    Ok(Json(json!(job)))
}

pub(super) async fn control(
    State(state): State<Arc<ApiState>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_job_id(&id)?;
    let new_state = blocking(&state, move |ops| ops.act_on_job(id, &action)).await?;
    Ok(Json(
        json!({ "id": id.to_string(), "state": new_state.name() }),
    ))
}
