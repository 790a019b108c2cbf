//! The JSON management API under `/api/`: the plugin operations of the CLI, for the admin page
//! and for scripts. Every request needs `Authorization: Bearer <admin API token>`
//! (`appliance api-token` prints it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::plugins::manifest::Manifest;
use crate::plugins::runtime::Runtime;
use crate::plugins::{self, PluginError};
use crate::store::{Store, TeamId};

/// Largest plugin upload accepted (the component travels base64-encoded in JSON).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

pub struct ApiState {
    pub store: Store,
    pub runtime: Arc<Runtime>,
    pub data_dir: PathBuf,
    pub token: String,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/plugins", get(list_plugins).post(install_plugin))
        .route("/api/teams/{team}/plugins/{plugin}", put(configure_plugin))
        .route("/api/teams/{team}/plugins/{plugin}/logs", get(plugin_logs))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(
        "missing or wrong admin API token (Authorization: Bearer …; see `appliance api-token`)"
    )]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Plugin(PluginError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Plugin(
                PluginError::Manifest(_)
                | PluginError::InvalidComponent(_)
                | PluginError::Instantiate(_),
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Plugin(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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

/// Runs store and runtime work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Config values of fields marked `secret` are not shown.
fn masked(config: &BTreeMap<String, String>, manifest: &Value) -> Value {
    let secret = |key: &str| {
        manifest["config"].as_array().is_some_and(|fields| {
            fields
                .iter()
                .any(|f| f["key"] == key && f["secret"] == true)
        })
    };
    config
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if secret(k) {
                    json!("••••")
                } else {
                    json!(v)
                },
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn list_plugins(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let configs = store.list_plugin_configs().map_err(PluginError::from)?;
        let plugins: Vec<Value> = store
            .list_plugins()
            .map_err(PluginError::from)?
            .into_iter()
            .map(|p| {
                let mine: Vec<Value> = configs
                    .iter()
                    .filter(|c| c.plugin_id == p.id)
                    .map(|c| {
                        json!({"id": c.id, "team_id": c.team_id, "enabled": c.enabled, "order": c.order,
                               "config": masked(&c.config, &p.manifest), "updated_at": c.updated_at})
                    })
                    .collect();
                json!({"id": p.id, "name": p.name, "manifest": p.manifest, "sha256": p.sha256,
                       "installed_at": p.installed_at, "configs": mine})
            })
            .collect();
        Ok(Json(json!({ "plugins": plugins })))
    })
    .await
}

#[derive(Deserialize)]
struct Upload {
    /// plugin.json's content.
    manifest: Value,
    /// The component, base64.
    wasm_base64: String,
}

async fn install_plugin(
    State(state): State<Arc<ApiState>>,
    Json(upload): Json<Upload>,
) -> Result<Response, ApiError> {
    let manifest = Manifest::parse(&upload.manifest.to_string()).map_err(PluginError::from)?;
    let wasm = base64::engine::general_purpose::STANDARD
        .decode(upload.wasm_base64.trim())
        .map_err(|e| ApiError::BadRequest(format!("wasm_base64 is not base64: {e}")))?;
    let record = blocking(move || {
        Ok(plugins::install_parts(
            &state.store,
            &state.runtime,
            &state.data_dir,
            manifest,
            &wasm,
        )?)
    })
    .await?;
    let body = json!({"id": record.id, "name": record.name, "sha256": record.sha256});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
struct Configure {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    config: BTreeMap<String, String>,
    order: Option<i64>,
}

fn default_true() -> bool {
    true
}

async fn configure_plugin(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(request): Json<Configure>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let config = if request.enabled {
            plugins::enable(&store, team, &plugin, &request.config, request.order)?.1
        } else {
            plugins::disable(&store, team, &plugin)?
        };
        Ok(Json(json!({"id": config.id, "team_id": config.team_id, "enabled": config.enabled, "order": config.order})))
    })
    .await
}

async fn plugin_logs(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let logs = plugins::logs(&store, team, &plugin)?;
        Ok(Json(json!({ "logs": logs })))
    })
    .await
}
