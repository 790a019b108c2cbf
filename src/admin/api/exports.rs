//! `/api/exports` and `/api/teams/{team}/plugins/{plugin}/exports`: start, list, show, cancel.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::store::TeamId;

#[derive(Deserialize)]
pub(super) struct ExportBody {
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    page_size: Option<u32>,
}

pub(super) async fn start(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(body): Json<ExportBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let export = blocking(&state, move |ops| {
        ops.start_export(team, &plugin, (body.from, body.to), body.page_size)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(json!(export))))
}

pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let exports = blocking(&state, |ops| ops.list_exports()).await?;
    Ok(Json(json!({ "exports": exports })))
}

pub(super) async fn show(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let export = blocking(&state, move |ops| ops.show_export(id)).await?;
    Ok(Json(json!(export)))
}

pub(super) async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let export = blocking(&state, move |ops| ops.cancel_export(id)).await?;
    Ok(Json(json!(export)))
}
