//! What is installed and enabled, compiled and ready to instantiate: one [`Catalog`] shared by
//! the pipeline's chains, the job runner, the scheduler and the after-write deliveries,
//! reloaded when the store's plugin generation changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::host::cache::new_cache;
use super::host::{HostState, JobContext, NetworkPolicy, PluginScope, SharedCache};
use super::install::probe;
use super::runtime::{CallError, Instance, Loaded, PluginInfo, Runtime};
use super::{plugin_dir, PluginError};
use crate::config::PluginQuotas;
use crate::geoip::GeoIp;
use crate::jobs::JobQueue;
use crate::store::{PluginConfig, PluginConfigId, Store};

/// An enabled plugin config, compiled and ready to instantiate.
pub struct Entry {
    pub config: PluginConfig,
    pub plugin_name: String,
    pub loaded: Loaded,
    /// What the plugin implements (asked once per component).
    pub info: PluginInfo,
    pub allowed_hosts: Vec<String>,
    pub cache: SharedCache,
}

/// What the operator allows plugins: the hosts they may fetch from, the networks beyond the
/// public internet, and the quotas of each config.
#[derive(Clone)]
pub struct PluginPolicy {
    /// Operator's allow-list for `http.fetch`; empty means any host a plugin declares.
    pub operator_hosts: Vec<String>,
    pub quotas: Arc<PluginQuotas>,
    pub network: Arc<NetworkPolicy>,
}

impl PluginPolicy {
    pub fn new(operator_hosts: Vec<String>, quotas: PluginQuotas) -> PluginPolicy {
        PluginPolicy {
            operator_hosts,
            network: NetworkPolicy::new(quotas.allowed_networks.clone()),
            quotas: Arc::new(quotas),
        }
    }

    /// The defaults, reaching public addresses only (tools and tests).
    pub fn closed() -> PluginPolicy {
        PluginPolicy::new(Vec::new(), PluginQuotas::default())
    }
}

/// What is installed and enabled, compiled and ready: shared by the pipeline's chains, the job
/// runner, the scheduler and the after-write deliveries, reloaded when the store's plugin
/// generation changes.
pub struct Catalog {
    runtime: Arc<Runtime>,
    store: Store,
    data_dir: PathBuf,
    policy: PluginPolicy,
    jobs: Option<JobQueue>,
    geoip: Arc<GeoIp>,
    state: Mutex<CatalogState>,
}

#[derive(Default)]
struct CatalogState {
    generation: Option<u64>,
    /// Enabled configs in chain order (team, order, id).
    entries: Vec<Arc<Entry>>,
    compiled: HashMap<String, (Loaded, PluginInfo)>,
    caches: HashMap<PluginConfigId, SharedCache>,
}

impl Catalog {
    pub fn new(
        runtime: Arc<Runtime>,
        store: Store,
        data_dir: &Path,
        policy: PluginPolicy,
        jobs: Option<JobQueue>,
        geoip: Arc<GeoIp>,
    ) -> Catalog {
        Catalog {
            runtime,
            store,
            data_dir: data_dir.to_owned(),
            policy,
            jobs,
            geoip,
            state: Mutex::default(),
        }
    }

    pub fn policy(&self) -> &PluginPolicy {
        &self.policy
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CatalogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The enabled configs in chain order, reloaded first if plugins or configs changed. An
    /// unchanged config keeps its entry (the same `Arc`), so callers can keep live instances.
    pub fn enabled(&self) -> Result<(u64, Vec<Arc<Entry>>), PluginError> {
        let state = self.current()?;
        Ok((state.generation.unwrap_or_default(), state.entries.clone()))
    }

    /// The enabled config `id`, if it is enabled.
    pub fn entry(&self, id: PluginConfigId) -> Result<Option<Arc<Entry>>, PluginError> {
        let state = self.current()?;
        Ok(state.entries.iter().find(|e| e.config.id == id).cloned())
    }

    /// The state, reloaded first if the store's plugin generation moved.
    fn current(&self) -> Result<std::sync::MutexGuard<'_, CatalogState>, PluginError> {
        let generation = self.store.plugins_generation()?;
        let mut state = self.lock();
        if state.generation == Some(generation) {
            return Ok(state);
        }
        let plugins: HashMap<_, _> = self
            .store
            .list_plugins()?
            .into_iter()
            .map(|p| (p.id, p))
            .collect();
        let mut configs: Vec<PluginConfig> = self
            .store
            .list_plugin_configs()?
            .into_iter()
            .filter(|c| c.enabled)
            .collect();
        configs.sort_by_key(|c| (c.team_id, c.order, c.id));
        let old: HashMap<PluginConfigId, Arc<Entry>> =
            state.entries.drain(..).map(|e| (e.config.id, e)).collect();
        let mut entries = Vec::new();
        for config in configs {
            let Some(plugin) = plugins.get(&config.plugin_id) else {
                continue;
            };
            if let Some(previous) = old.get(&config.id) {
                if previous.config == config && previous.loaded.sha256 == plugin.sha256 {
                    entries.push(previous.clone());
                    continue;
                }
            }
            let (loaded, info) = match self.compiled(&mut state, &plugin.sha256) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(config = config.id, plugin = %plugin.name, error = %e, "cannot load plugin; it is skipped");
                    continue;
                }
            };
            entries.push(Arc::new(Entry {
                allowed_hosts: self.allowed_hosts(&plugin.manifest),
                plugin_name: plugin.name.clone(),
                cache: state
                    .caches
                    .entry(config.id)
                    .or_insert_with(|| new_cache(self.policy.quotas.cache_max_bytes))
                    .clone(),
                config,
                loaded,
                info,
            }));
        }
        state.entries = entries;
        state.generation = Some(generation);
        Ok(state)
    }

    fn compiled(
        &self,
        state: &mut CatalogState,
        sha256: &str,
    ) -> Result<(Loaded, PluginInfo), PluginError> {
        if let Some(c) = state.compiled.get(sha256) {
            return Ok(c.clone());
        }
        let path = plugin_dir(&self.data_dir).join(format!("{sha256}.wasm"));
        let wasm = std::fs::read(&path)
            .map_err(|e| PluginError::Io(format!("{}: {e}", path.display())))?;
        let loaded = self.runtime.load(&wasm)?;
        let probe = probe(&self.runtime, &self.store, &loaded, Default::default())?;
        let compiled = (loaded, probe.info.clone());
        state.compiled.insert(sha256.to_owned(), compiled.clone());
        Ok(compiled)
    }

    fn allowed_hosts(&self, manifest: &serde_json::Value) -> Vec<String> {
        let declared: Vec<String> = manifest["allowed_hosts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if self.policy.operator_hosts.is_empty() {
            return declared;
        }
        declared
            .into_iter()
            .filter(|h| {
                self.policy
                    .operator_hosts
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(h))
            })
            .collect()
    }

    /// Records a line against a plugin config from outside a call (no instance to buffer it).
    pub fn log_error(&self, config: PluginConfigId, message: String) {
        let entry = crate::store::PluginLogEntry {
            at: chrono::Utc::now(),
            level: "error".into(),
            message,
        };
        let max = self.policy.quotas.log_max_lines;
        if let Err(e) = self.store.append_plugin_logs(config, &[entry], max) {
            tracing::warn!(config, error = %e, "cannot store a plugin log line");
        }
    }

    /// A new instance of `entry`, set up, optionally running a job.
    pub fn start(&self, entry: &Entry, job: Option<JobContext>) -> Result<Instance, CallError> {
        let scope = PluginScope {
            config_id: entry.config.id,
            config: entry.config.config.clone(),
            allowed_hosts: entry.allowed_hosts.clone(),
            store: self.store.clone(),
            cache: entry.cache.clone(),
            jobs: self.jobs.clone(),
            job_names: entry.info.jobs.clone(),
            job_timeout: self.runtime.limits.task,
            geoip: self.geoip.clone(),
            quotas: self.policy.quotas.clone(),
            network: self.policy.network.clone(),
        };
        let mut state = HostState::new(scope, self.runtime.limits.memory_bytes);
        state.job = job;
        let mut instance = self.runtime.instantiate(&entry.loaded, state)?;
        instance.setup()?;
        Ok(instance)
    }
}
