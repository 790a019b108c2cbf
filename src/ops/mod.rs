//! The operator's operations, written once for both faces: the CLI (`cli`) and the management
//! API (`admin::api`). Teams, plugins, jobs, historical exports, and the pre-start check.
//!
//! Owns: each operation's rules and its one typed error ([`OpError`]), which the API maps to
//! HTTP statuses and the CLI to exit codes, each in one place.
//! Must never: format for a terminal or build an HTTP response; wake the workers other than
//! through [`JobQueue::wake`] (which reaches a server in another process too).

pub mod admin;
pub mod check;
pub mod exports;
pub mod jobs;
pub mod persons;
pub mod plugins;
pub mod sinks;
pub mod teams;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::config::{JobSettings, PluginLimits};
use crate::jobs::JobQueue;
use crate::plugins::runtime::Runtime;
use crate::plugins::PluginError;
use crate::store::{Store, StoreError};

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed (an id that is not an id, a payload that is not JSON, a field
    /// missing).
    #[error("{0}")]
    Malformed(String),
    /// The request is well formed but what it carries is refused (a plugin component, manifest,
    /// archive or config value, a token).
    #[error("{0}")]
    Invalid(String),
    /// The request is well formed but the state does not allow it (a job already dead).
    #[error("{0}")]
    Conflict(String),
    /// The appliance could not do it (storage, runtime); retrying may help.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        match e {
            StoreError::NotFound(m) => OpError::NotFound(m),
            StoreError::Conflict(m) => OpError::Conflict(m),
            StoreError::Invalid(m) => OpError::Invalid(m),
            other => OpError::Internal(other.to_string()),
        }
    }
}

impl From<PluginError> for OpError {
    fn from(e: PluginError) -> OpError {
        match e {
            PluginError::NotFound(m) => OpError::NotFound(m),
            PluginError::Store(e) => e.into(),
            PluginError::BadRequest(m) => OpError::Malformed(m),
            PluginError::Manifest(_)
            | PluginError::InvalidComponent(_)
            | PluginError::InvalidArchive(_)
            | PluginError::Instantiate(_) => OpError::Invalid(e.to_string()),
            PluginError::Io(_) | PluginError::Runtime(_) => OpError::Internal(e.to_string()),
        }
    }
}

/// What the operations act on: the state store, the job queue (whose wake-ups reach the
/// workers, in this process or the server's), and the plugin runtime, made on first use.
#[derive(Clone)]
pub struct Ops {
    pub store: Store,
    pub queue: JobQueue,
    pub data_dir: PathBuf,
    pub plugin_limits: PluginLimits,
    runtime: Arc<OnceLock<Arc<Runtime>>>,
}

impl Ops {
    /// Operations inside the server, sharing its queue and plugin runtime.
    pub fn in_server(store: Store, queue: JobQueue, data_dir: &Path, runtime: Arc<Runtime>) -> Ops {
        let plugin_limits = runtime.limits;
        let cell = OnceLock::new();
        let _ = cell.set(runtime);
        Ops {
            store,
            queue,
            data_dir: data_dir.to_owned(),
            plugin_limits,
            runtime: Arc::new(cell),
        }
    }

    /// Operations from another process (the CLI), beside a server that may be running.
    pub fn remote(
        store: Store,
        data_dir: &Path,
        jobs: JobSettings,
        plugin_limits: PluginLimits,
    ) -> Ops {
        Ops {
            queue: JobQueue::remote(store.clone(), jobs, data_dir),
            store,
            data_dir: data_dir.to_owned(),
            plugin_limits,
            runtime: Arc::default(),
        }
    }

    /// The plugin runtime (engine and compile cache), made on first use.
    fn runtime(&self) -> Result<Arc<Runtime>, OpError> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime.clone());
        }
        let cache = crate::plugins::plugin_dir(&self.data_dir).join("compiled");
        let runtime = Arc::new(Runtime::new(&cache, self.plugin_limits)?);
        Ok(self.runtime.get_or_init(|| runtime).clone())
    }
}

/// Milliseconds since the epoch as RFC 3339 with milliseconds, as operators read times.
fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}
