//! The JSON management API under `/api/`: the plugin operations of the CLI, for the admin page
//! and for scripts. Every request needs `Authorization: Bearer <admin API token>`
//! (`appliance api-token` prints it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::Query;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::jobs::{now_ms, JobQueue, JobView};
use crate::plugins::manifest::Manifest;
use crate::plugins::runtime::Runtime;
use crate::plugins::{self, PluginError};
use crate::store::{Control, JobId, JobState, Store, StoreError, TeamId};

/// Largest plugin upload accepted (the component travels base64-encoded in JSON).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

pub struct ApiState {
    pub store: Store,
    pub runtime: Arc<Runtime>,
    pub data_dir: PathBuf,
    pub token: String,
    pub jobs: JobQueue,
    /// Deadline of each export page.
    pub task_timeout: std::time::Duration,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/plugins", get(list_plugins).post(install_plugin))
        .route("/api/teams/{team}/plugins/{plugin}", put(configure_plugin))
        .route("/api/teams/{team}/plugins/{plugin}/logs", get(plugin_logs))
        .route(
            "/api/teams/{team}/plugins/{plugin}/storage",
            get(plugin_storage),
        )
        .route("/api/teams/{team}/plugins/{plugin}/jobs", post(enqueue_job))
        .route(
            "/api/teams/{team}/plugins/{plugin}/exports",
            post(start_export),
        )
        .route("/api/exports", get(list_exports))
        .route("/api/exports/{id}", get(show_export))
        .route("/api/exports/{id}/cancel", post(cancel_export))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/jobs/{id}/{action}", post(control_job))
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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) | ApiError::Plugin(PluginError::BadRequest(_)) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Plugin(PluginError::NotFound(_)) | ApiError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Conflict(_)
            | ApiError::Plugin(PluginError::Store(StoreError::Conflict(_))) => StatusCode::CONFLICT,
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            other => ApiError::Internal(other.to_string()),
        }
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

/// A plugin upload: plugin.json and the component, or an archive of both.
#[derive(Deserialize)]
struct Upload {
    /// plugin.json's content.
    manifest: Option<Value>,
    /// The component, base64.
    wasm_base64: Option<String>,
    /// A `.tar.gz` or `.zip` of the plugin folder, base64 (instead of the two above).
    archive_base64: Option<String>,
}

fn base64_field(name: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::BadRequest(format!("{name} is not base64: {e}")))
}

async fn install_plugin(
    State(state): State<Arc<ApiState>>,
    Json(upload): Json<Upload>,
) -> Result<Response, ApiError> {
    let record =
        match upload {
            Upload {
                archive_base64: Some(archive),
                ..
            } => {
                let bytes = base64_field("archive_base64", &archive)?;
                blocking(move || {
                    Ok(plugins::install_archive(
                        &state.store,
                        &state.runtime,
                        &state.data_dir,
                        std::path::Path::new("the uploaded archive"),
                        &bytes,
                    )?)
                })
                .await?
            }
            Upload {
                manifest: Some(manifest),
                wasm_base64: Some(wasm),
                ..
            } => {
                let manifest = Manifest::parse(&manifest.to_string()).map_err(PluginError::from)?;
                let wasm = base64_field("wasm_base64", &wasm)?;
                blocking(move || {
                    Ok(plugins::install_parts(
                        &state.store,
                        &state.runtime,
                        &state.data_dir,
                        manifest,
                        &wasm,
                    )?)
                })
                .await?
            }
            _ => return Err(ApiError::BadRequest(
                "send {\"manifest\": plugin.json, \"wasm_base64\": …} or {\"archive_base64\": …}"
                    .into(),
            )),
        };
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

async fn plugin_storage(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let entries: serde_json::Map<String, Value> = plugins::storage(&store, team, &plugin)?
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect();
        Ok(Json(json!({ "storage": entries })))
    })
    .await
}

#[derive(Deserialize)]
struct EnqueueRequest {
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

async fn enqueue_job(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(request): Json<EnqueueRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (store, queue) = (state.store.clone(), state.jobs.clone());
    blocking(move || {
        let enqueue = |jobs| queue.enqueue(jobs);
        let id = plugins::enqueue_job(
            &enqueue,
            &store,
            team,
            &plugin,
            plugins::JobRequest {
                name: request.name,
                payload: request.payload.to_string(),
                idempotency_key: request.idempotency_key,
                delay_ms: request.delay_ms,
                max_attempts: request.max_attempts,
                timeout_ms: 0,
            },
        )?;
        Ok((StatusCode::ACCEPTED, Json(json!({ "id": id.to_string() }))))
    })
    .await
}

#[derive(Deserialize)]
struct JobFilter {
    state: Option<String>,
    limit: Option<usize>,
}

async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Query(filter): Query<JobFilter>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let wanted = match filter.state {
            Some(s) => Some(JobState::parse(&s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown state {s:?}: scheduled, waiting, running, retrying, dead or cancelled"
                ))
            })?),
            None => None,
        };
        let stats = store.job_stats()?;
        let jobs: Vec<JobView> = store
            .list_jobs(wanted, filter.limit.unwrap_or(100))?
            .iter()
            .map(JobView::from)
            .collect();
        Ok(Json(json!({ "stats": stats, "jobs": jobs })))
    })
    .await
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not a job id")))
}

async fn show_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let job = store.job(job_id(&id)?)?.ok_or_else(|| {
            ApiError::NotFound(format!("no job {id} is kept (succeeded jobs are not kept)"))
        })?;
        Ok(Json(json!(JobView::from(&job))))
    })
    .await
}

async fn control_job(
    State(state): State<Arc<ApiState>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (store, queue) = (state.store.clone(), state.jobs.clone());
    blocking(move || {
        let id = job_id(&id)?;
        let state = match action.as_str() {
            "cancel" => store.control_job(id, Control::Cancel, now_ms())?,
            "terminate" => store.control_job(id, Control::Terminate, now_ms())?,
            "retry" => {
                store.requeue_job(id, now_ms())?;
                queue.wake();
                JobState::Scheduled
            }
            other => {
                return Err(ApiError::NotFound(format!(
                    "no job action {other:?}: cancel, terminate or retry"
                )))
            }
        };
        Ok(Json(json!({ "id": id.to_string(), "state": state.name() })))
    })
    .await
}

#[derive(Deserialize)]
struct ExportRequest {
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    page_size: Option<u32>,
}

async fn start_export(
    State(state): State<Arc<ApiState>>,
    Path((team, plugin)): Path<(TeamId, String)>,
    Json(request): Json<ExportRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (store, queue, timeout) = (state.store.clone(), state.jobs.clone(), state.task_timeout);
    blocking(move || {
        let export = plugins::start_export(
            &store,
            team,
            &plugin,
            (request.from, request.to),
            request.page_size,
            timeout,
        )?;
        queue.wake();
        Ok((
            StatusCode::ACCEPTED,
            Json(plugins::export_view(&store, &export)),
        ))
    })
    .await
}

async fn list_exports(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let exports: Vec<Value> = store
            .list_exports()?
            .iter()
            .map(|e| plugins::export_view(&store, e))
            .collect();
        Ok(Json(json!({ "exports": exports })))
    })
    .await
}

async fn show_export(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let export = store
            .export(id)?
            .ok_or_else(|| ApiError::NotFound(format!("no export {id}")))?;
        Ok(Json(plugins::export_view(&store, &export)))
    })
    .await
}

async fn cancel_export(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let export = plugins::cancel_export(&store, id)?;
        Ok(Json(plugins::export_view(&store, &export)))
    })
    .await
}
