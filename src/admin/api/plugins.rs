//! `/api/plugins` and `/api/teams/{team}/plugins/{plugin}`: install, list, configure, logs,
//! storage.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::ops::plugins::Upload;
use crate::ops::OpError;
use crate::store::TeamId;

pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let plugins = blocking(&state, |ops| ops.list_plugins()).await?;
    Ok(Json(json!({ "plugins": plugins })))
}

/// A plugin upload: plugin.json and the component, or an archive of both, base64.
#[derive(Deserialize)]
pub(super) struct UploadBody {
    manifest: Option<Value>,
    wasm_base64: Option<String>,
    /// A `.tar.gz` or `.zip` of the plugin folder (instead of the two above).
    archive_base64: Option<String>,
}

fn base64_field(name: &str, text: &str) -> Result<Vec<u8>, OpError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| OpError::Malformed(format!("{name} is not base64: {e}")))
}

impl UploadBody {
    fn into_upload(self) -> Result<Upload, OpError> {
        match self {
            UploadBody {
                archive_base64: Some(archive),
                ..
            } => Ok(Upload::Archive(base64_field("archive_base64", &archive)?)),
            UploadBody {
                manifest: Some(manifest),
                wasm_base64: Some(wasm),
                ..
            } => Ok(Upload::Parts {
                manifest,
                wasm: base64_field("wasm_base64", &wasm)?,
            }),
            _ => Err(OpError::Malformed(
                "send {\"manifest\": plugin.json, \"wasm_base64\": …} or {\"archive_base64\": …}"
                    .into(),
            )),
        }
    }
}

pub(super) async fn install(
    State(state): State<Arc<ApiState>>,
    Json(body): Json<UploadBody>,
) -> Result<Response, ApiError> {
    let upload = body.into_upload()?;
    let record = blocking(&state, move |ops| ops.install_plugin_upload(upload)).await?;
    let body = json!({"id": record.id, "name": record.name, "sha256": record.sha256});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
pub(super) struct Configure {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    config: BTreeMap<String, String>,
    order: Option<i64>,
}

fn default_true() -> bool {
    true
}

pub(super) async fn configure(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(request): Json<Configure>,
) -> Result<Json<Value>, ApiError> {
    let config = blocking(&state, move |ops| {
        if request.enabled {
            Ok(ops
                .enable_plugin(team, &plugin, &request.config, request.order)?
                .1)
        } else {
            ops.disable_plugin(team, &plugin)
        }
    })
    .await?;
    Ok(Json(
        json!({"id": config.id, "team_id": config.team_id, "enabled": config.enabled, "order": config.order}),
    ))
}

#[derive(Deserialize)]
pub(super) struct LogPage {
    limit: Option<usize>,
    before: Option<u64>,
}

/// A page of log lines, newest first; `next_before` asks for the page after it.
pub(super) async fn logs(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Query(page): Query<LogPage>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(100).min(10_000);
    let lines = blocking(&state, move |ops| {
        ops.plugin_logs(team, &plugin, page.before, limit)
    })
    .await?;
    let next_before = (lines.len() == limit)
        .then(|| lines.last().map(|(n, _)| *n))
        .flatten();
    let logs: Vec<Value> = lines
        .into_iter()
        .map(|(line, e)| json!({"line": line, "at": e.at, "level": e.level, "message": e.message}))
        .collect();
    Ok(Json(json!({ "logs": logs, "next_before": next_before })))
}

pub(super) async fn storage(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
) -> Result<Json<Value>, ApiError> {
    let entries = blocking(&state, move |ops| ops.plugin_storage(team, &plugin)).await?;
    let entries: serde_json::Map<String, Value> =
        entries.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Ok(Json(json!({ "storage": entries })))
}
