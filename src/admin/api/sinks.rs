//! `/api/sink/dead-letters` (list; `?sink=` to filter, `?limit=`, 100 by default), `/api/sink/dead-letters/resend` and
//! `/api/sink/dead-letters/drop` (a JSON body `{"ids": [...]}`, or `{"all": true}`).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};

#[derive(Deserialize)]
pub(super) struct ListQuery {
    sink: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let letters = blocking(&state, move |ops| {
        ops.dead_letters(query.sink.as_deref(), query.limit)
    })
    .await?;
    Ok(Json(json!({ "dead_letters": letters })))
}

/// Which dead letters an action is for.
#[derive(Deserialize)]
pub(super) struct Selection {
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    all: bool,
}

impl Selection {
    fn ids(&self) -> Option<Vec<u64>> {
        (!self.all).then(|| self.ids.clone())
    }
}

pub(super) async fn resend(
    State(state): State<Arc<ApiState>>,
    Json(selection): Json<Selection>,
) -> Result<Json<Value>, ApiError> {
    let ids = selection.ids();
    let count = blocking(&state, move |ops| ops.resend_dead_letters(ids.as_deref())).await?;
    Ok(Json(json!({ "resend": count })))
}

pub(super) async fn drop(
    State(state): State<Arc<ApiState>>,
    Json(selection): Json<Selection>,
) -> Result<Json<Value>, ApiError> {
    let ids = selection.ids();
    let count = blocking(&state, move |ops| ops.drop_dead_letters(ids.as_deref())).await?;
    Ok(Json(json!({ "dropped": count })))
}
