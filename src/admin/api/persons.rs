//! `/api/teams/{team}/persons/{distinct_id}` (show, delete) and
//! `/api/teams/{team}/ingestion_warnings`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::store::TeamId;

pub(super) async fn show(
    State(state): State<Arc<ApiState>>,
    Path((team, distinct_id)): Path<(TeamId, String)>,
) -> Result<Json<Value>, ApiError> {
    let view = blocking(&state, move |ops| ops.show_person(team, &distinct_id)).await?;
    Ok(Json(json!(view)))
}

pub(super) async fn delete(
    State(state): State<Arc<ApiState>>,
    Path((team, distinct_id)): Path<(TeamId, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let view = blocking(&state, move |ops| ops.delete_person(team, &distinct_id)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(view))))
}

#[derive(Deserialize)]
pub(super) struct WarningsQuery {
    limit: Option<usize>,
}

pub(super) async fn warnings(
    State(state): State<Arc<ApiState>>,
    Path(team): Path<TeamId>,
    Query(query): Query<WarningsQuery>,
) -> Result<Json<Value>, ApiError> {
    let warnings = blocking(&state, move |ops| ops.ingestion_warnings(team, query.limit)).await?;
    Ok(Json(json!({ "warnings": warnings })))
}
