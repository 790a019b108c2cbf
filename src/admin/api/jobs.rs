//! `/api/jobs` and `/api/teams/{team}/plugins/{plugin}/jobs`: list, show, enqueue, cancel,
//! terminate, retry.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::ops::jobs::{parse_job_id, parse_job_state, JobRequest, JobSpec, DEFAULT_LIST_LIMIT};
use crate::ops::OpError;
use crate::store::TeamId;

/// Most bytes of an enqueue request: room for a bulk enqueue of many small jobs, far below what
/// would let one request hold the server's memory.
pub(super) const MAX_ENQUEUE_BYTES: usize = 16 << 20;

/// Queues one job (a JSON object, answered with its `id`) or many (an array of them, committed
/// in one transaction and answered with their `ids` in order).
pub(super) async fn enqueue(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Read straight into the jobs, without a JSON tree of the whole body first.
    let bulk = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let requests: Vec<JobRequest> = if bulk {
        let specs: Vec<JobSpec> = serde_json::from_slice(&body)
            .map_err(|e| OpError::Malformed(format!("not a list of jobs: {e}")))?;
        specs.into_iter().map(JobRequest::from).collect()
    } else {
        let spec: JobSpec = serde_json::from_slice(&body)
            .map_err(|e| OpError::Malformed(format!("not a job: {e}")))?;
        vec![JobRequest::from(spec)]
    };
    let ids = blocking(&state, move |ops| ops.enqueue_jobs(team, &plugin, requests)).await?;
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let answer = match (bulk, ids.first()) {
        (false, Some(id)) => json!({ "id": id }),
        _ => json!({ "ids": ids }),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)))
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
