//! Plugins: WebAssembly components, run by wasmtime, that transform events on the way in.
//!
//! Owns: the plugin contract's host side ([`host`]), the engine, compilation cache and limits
//! ([`runtime`]), `plugin.json` ([`manifest`]), installing plugins, and each team's chain of
//! `process-event` plugins ([`Chains`]), reloaded when plugin configs change.
//! Must never: let a plugin's failure (trap, timeout, memory, garbage) stop the pipeline or touch
//! another plugin config or team; a failing plugin is logged against its config with the event
//! uuids, the events continue unchanged, and after many consecutive failures that one config is
//! disabled, visibly.

mod archive;
pub mod host;
pub mod manifest;
pub mod runtime;
pub mod tasks;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{timestamp_text, EventRow, IngestBatch};
use serde::Deserialize;

use crate::geoip::GeoIp;
use crate::jobs::JobQueue;
use crate::store::{
    Export, JobId, JobKind, NewJob, PluginConfig, PluginConfigId, PluginRecord, Store, StoreError,
    TeamId,
};
use host::{HostState, JobContext, PluginScope, SharedCache};
use manifest::{Manifest, ManifestError};
use runtime::{CallError, Exports, Instance, Loaded, PluginInfo, Runtime, WitEvent};

/// Consecutive failing calls after which a plugin config is disabled.
pub const DISABLE_AFTER_FAILURES: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error("not a valid plugin component: {0}")]
    InvalidComponent(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("the plugin failed when loaded: {0}")]
    Instantiate(String),
    #[error("{0}")]
    BadRequest(String),
}

/// Where installed components are kept, by content hash.
pub fn plugin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("plugins")
}

/// Installs the plugin at `path`: a folder holding plugin.json and its component, or a
/// `.tar.gz` or `.zip` archive of one.
pub fn install(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    path: &Path,
) -> Result<PluginRecord, PluginError> {
    if !path.is_dir() {
        let bytes = std::fs::read(path)
            .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", path.display())))?;
        return install_archive(store, runtime, data_dir, path, &bytes);
    }
    let manifest_path = path.join("plugin.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", manifest_path.display())))?;
    let manifest = Manifest::parse(&text)?;
    let wasm_path = path.join(&manifest.main);
    let wasm = std::fs::read(&wasm_path)
        .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", wasm_path.display())))?;
    install_parts(store, runtime, data_dir, manifest, &wasm)
}

/// Installs the plugin in a `.tar.gz` or `.zip` archive's bytes; `name` names it in errors.
pub fn install_archive(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    name: &Path,
    bytes: &[u8],
) -> Result<PluginRecord, PluginError> {
    let files = archive::read(name, bytes)?;
    let folder = archive::manifest_folder(name, &files)?;
    let text = files
        .get(&folder.join("plugin.json"))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let manifest = Manifest::parse(&text)?;
    let wasm = files.get(&folder.join(&manifest.main)).ok_or_else(|| {
        PluginError::Io(format!(
            "{}: the archive has no {} beside plugin.json",
            name.display(),
            manifest.main
        ))
    })?;
    install_parts(store, runtime, data_dir, manifest, wasm)
}

/// Installs a plugin from its manifest and component bytes: compiles the component against the
/// contract, loads it once (a plugin that cannot even start is refused now), keeps the component
/// under the data directory by hash, and records the plugin.
pub fn install_parts(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    manifest: Manifest,
    wasm: &[u8],
) -> Result<PluginRecord, PluginError> {
    let loaded = runtime.load(wasm)?;
    let defaults = manifest
        .validate_config(&Default::default())
        .unwrap_or_default();
    probe(runtime, store, &loaded, defaults)?;
    let dir = plugin_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| PluginError::Io(format!("{}: {e}", dir.display())))?;
    let target = dir.join(format!("{}.wasm", loaded.sha256));
    std::fs::write(&target, wasm)
        .map_err(|e| PluginError::Io(format!("{}: {e}", target.display())))?;
    let manifest_json =
        serde_json::to_value(&manifest).map_err(|e| PluginError::Io(e.to_string()))?;
    Ok(store.install_plugin(&manifest.name, manifest_json, &loaded.sha256)?)
}

/// An instance of `loaded` that reaches nothing (no config id, storage of its own, jobs or
/// GeoIP), to see that the component starts and ask what it implements.
fn probe(
    runtime: &Runtime,
    store: &Store,
    loaded: &Loaded,
    config: std::collections::BTreeMap<String, String>,
) -> Result<Instance, PluginError> {
    let scope = PluginScope {
        config_id: 0,
        config,
        allowed_hosts: Vec::new(),
        store: store.clone(),
        cache: SharedCache::default(),
        jobs: None,
        job_names: Vec::new(),
        job_timeout: runtime.limits.task,
        geoip: Arc::new(GeoIp::disabled()),
    };
    runtime
        .instantiate(loaded, HostState::new(scope, runtime.limits.memory_bytes))
        .map_err(|e| PluginError::Instantiate(e.to_string()))
}

/// An installed plugin by name or id.
pub fn find(store: &Store, name_or_id: &str) -> Result<PluginRecord, PluginError> {
    store
        .list_plugins()?
        .into_iter()
        .find(|p| p.name == name_or_id || p.id.to_string() == name_or_id)
        .ok_or_else(|| {
            PluginError::NotFound(format!("no installed plugin is called {name_or_id:?}"))
        })
}

/// Enables `plugin` for `team` with config values checked against its schema.
pub fn enable(
    store: &Store,
    team: TeamId,
    plugin: &str,
    given: &std::collections::BTreeMap<String, String>,
    order: Option<i64>,
) -> Result<(PluginRecord, PluginConfig), PluginError> {
    if !store.list_teams()?.iter().any(|t| t.id == team) {
        return Err(PluginError::NotFound(format!("no team {team}")));
    }
    let record = find(store, plugin)?;
    let manifest: Manifest = serde_json::from_value(record.manifest.clone())
        .map_err(|e| PluginError::Manifest(ManifestError::Parse(e.to_string())))?;
    let values = manifest.validate_config(given)?;
    let config = store.upsert_plugin_config(team, record.id, true, order, Some(values))?;
    Ok((record, config))
}

pub fn disable(store: &Store, team: TeamId, plugin: &str) -> Result<PluginConfig, PluginError> {
    let record = find(store, plugin)?;
    config_of(store, team, &record)?;
    Ok(store.upsert_plugin_config(team, record.id, false, None, None)?)
}

/// What the team's config of `plugin` logged.
pub fn logs(
    store: &Store,
    team: TeamId,
    plugin: &str,
) -> Result<Vec<crate::store::PluginLogEntry>, PluginError> {
    let record = find(store, plugin)?;
    let config = config_of(store, team, &record)?;
    Ok(store.plugin_logs(config.id)?)
}

/// What the team's config of `plugin` keeps in storage.
pub fn storage(
    store: &Store,
    team: TeamId,
    plugin: &str,
) -> Result<Vec<(String, String)>, PluginError> {
    let record = find(store, plugin)?;
    let config = config_of(store, team, &record)?;
    Ok(store.plugin_storage_all(config.id)?)
}

/// Queues the plugin's job `name` for the team's config, as an operator asks.
pub fn enqueue_job(
    queue: &dyn Fn(Vec<NewJob>) -> Result<Vec<JobId>, StoreError>,
    store: &Store,
    team: TeamId,
    plugin: &str,
    request: JobRequest,
) -> Result<JobId, PluginError> {
    let record = find(store, plugin)?;
    let config = config_of(store, team, &record)?;
    if serde_json::from_str::<serde::de::IgnoredAny>(&request.payload).is_err() {
        return Err(PluginError::BadRequest(format!(
            "the payload of job {:?} is not JSON",
            request.name
        )));
    }
    let ids = queue(vec![NewJob {
        id: Uuid::now_v7(),
        kind: JobKind::Plugin {
            config: config.id,
            name: request.name,
        },
        payload: request.payload,
        run_at_ms: crate::jobs::now_ms() + request.delay_ms as i64,
        max_attempts: request
            .max_attempts
            .unwrap_or(host::DEFAULT_JOB_ATTEMPTS)
            .clamp(1, 100),
        timeout_ms: request.timeout_ms,
        idempotency_key: request
            .idempotency_key
            .map(|k| format!("{}:{k}", config.id)),
        after: Vec::new(),
    }])?;
    ids.into_iter()
        .next()
        .ok_or_else(|| PluginError::Io("the queue returned no job id".into()))
}

/// Events handed to the plugin per page of a historical export, unless the operator says.
pub const EXPORT_PAGE_SIZE: u32 = 500;

/// Starts a historical export of the team's stored events with `from <= timestamp < to` to its
/// config of `plugin`.
pub fn start_export(
    store: &Store,
    team: TeamId,
    plugin: &str,
    range: (DateTime<Utc>, DateTime<Utc>),
    page_size: Option<u32>,
    timeout: std::time::Duration,
) -> Result<Export, PluginError> {
    let record = find(store, plugin)?;
    let config = config_of(store, team, &record)?;
    if !config.enabled {
        return Err(PluginError::BadRequest(format!(
            "{} is disabled for team {team}; enable it first",
            record.name
        )));
    }
    if range.0 >= range.1 {
        return Err(PluginError::BadRequest(format!(
            "the export range is empty: from {} is not before to {}",
            range.0, range.1
        )));
    }
    Ok(store.start_export(
        config.id,
        team,
        (range.0.timestamp_millis(), range.1.timestamp_millis()),
        page_size.unwrap_or(EXPORT_PAGE_SIZE).clamp(1, 100_000),
        timeout.as_millis() as u64,
        crate::jobs::now_ms(),
    )?)
}

/// Cancels a historical export: no further page starts, and a page running now is asked to stop.
pub fn cancel_export(store: &Store, id: u64) -> Result<Export, PluginError> {
    let now = crate::jobs::now_ms();
    let export = store.cancel_export(id, now)?;
    if let Some(job) = export.job {
        // The page job may have finished already; only a live one is asked to stop.
        if let Err(e) = store.control_job(job, crate::store::Control::Cancel, now) {
            tracing::debug!(export = id, error = %e, "no page job to stop");
        }
    }
    Ok(export)
}

/// An export as the CLI and `/api/` show it, with the state of its page job.
pub fn export_view(store: &Store, export: &Export) -> serde_json::Value {
    let time = |ms: i64| {
        DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    let job_state = export
        .job
        .and_then(|id| store.job(id).ok().flatten())
        .map(|j| j.state.name());
    serde_json::json!({
        "id": export.id,
        "plugin_config": export.config,
        "team": export.team,
        "from": time(export.from_ms),
        "to": time(export.to_ms),
        "state": export.state.name(),
        "total": export.total,
        "done": export.done,
        "page_size": export.page_size,
        "page_job": export.job.map(|j| j.to_string()),
        "page_job_state": job_state,
    })
}

/// A job an operator queues for a plugin.
#[derive(Clone, Debug, Deserialize)]
pub struct JobRequest {
    pub name: String,
    #[serde(default = "null_payload")]
    pub payload: String,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Deadline of each attempt; 0 for the appliance's task deadline.
    #[serde(default)]
    pub timeout_ms: u64,
}

fn null_payload() -> String {
    "null".into()
}

fn config_of(
    store: &Store,
    team: TeamId,
    record: &PluginRecord,
) -> Result<PluginConfig, PluginError> {
    store
        .list_plugin_configs()?
        .into_iter()
        .find(|c| c.team_id == team && c.plugin_id == record.id)
        .ok_or_else(|| {
            PluginError::NotFound(format!("{} has no config for team {team}", record.name))
        })
}

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

/// What is installed and enabled, compiled and ready: shared by the pipeline's chains, the job
/// runner, the scheduler and the after-write deliveries, reloaded when the store's plugin
/// generation changes.
pub struct Catalog {
    runtime: Arc<Runtime>,
    store: Store,
    data_dir: PathBuf,
    /// Operator's allow-list for `http.fetch`; empty means any host a plugin declares.
    operator_hosts: Vec<String>,
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
        operator_hosts: Vec<String>,
        jobs: Option<JobQueue>,
        geoip: Arc<GeoIp>,
    ) -> Catalog {
        Catalog {
            runtime,
            store,
            data_dir: data_dir.to_owned(),
            operator_hosts,
            jobs,
            geoip,
            state: Mutex::default(),
        }
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
                cache: state.caches.entry(config.id).or_default().clone(),
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
        if self.operator_hosts.is_empty() {
            return declared;
        }
        declared
            .into_iter()
            .filter(|h| {
                self.operator_hosts
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(h))
            })
            .collect()
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
        };
        let mut state = HostState::new(scope, self.runtime.limits.memory_bytes);
        state.job = job;
        let mut instance = self.runtime.instantiate(&entry.loaded, state)?;
        instance.setup()?;
        Ok(instance)
    }
}

/// One plugin config in a team's chain.
struct Slot {
    entry: Arc<Entry>,
    instance: Option<Instance>,
    consecutive_failures: u32,
}

/// The `process-event` chains of every team, as the store describes them.
pub struct Chains {
    catalog: Arc<Catalog>,
    generation: Option<u64>,
    teams: HashMap<TeamId, Vec<Slot>>,
}

impl Chains {
    pub fn new(catalog: Arc<Catalog>) -> Chains {
        Chains {
            catalog,
            generation: None,
            teams: HashMap::new(),
        }
    }

    /// Rebuilds the chains if plugins or configs changed since the last look. Calls already made
    /// finished on the old instances; the next batch uses the new ones.
    pub fn refresh(&mut self) -> Result<(), PluginError> {
        let (generation, entries) = self.catalog.enabled()?;
        if self.generation == Some(generation) {
            return Ok(());
        }
        let mut old: HashMap<PluginConfigId, Slot> = self
            .teams
            .drain()
            .flat_map(|(_, slots)| slots)
            .map(|s| (s.entry.config.id, s))
            .collect();
        for entry in entries {
            if !entry
                .info
                .exports
                .intersects(Exports::PROCESS_EVENT | Exports::PROCESS_EVENT_BATCH)
            {
                continue;
            }
            // An unchanged config keeps its live instance (and its plugin's in-memory state).
            let slot = match old.remove(&entry.config.id) {
                Some(slot) if Arc::ptr_eq(&slot.entry, &entry) => slot,
                _ => Slot {
                    entry: entry.clone(),
                    instance: None,
                    consecutive_failures: 0,
                },
            };
            self.teams
                .entry(entry.config.team_id)
                .or_default()
                .push(slot);
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// True when a team has at least one enabled `process-event` plugin.
    pub fn has_chain(&self, team_id: TeamId) -> bool {
        self.teams
            .get(&team_id)
            .is_some_and(|slots| !slots.is_empty())
    }

    /// Runs the team's chain over one queued batch, in order. Failures leave events unchanged.
    ///
    /// Events are converted to the plugins' form once, stay in it from the first plugin to the
    /// last, and are converted back once: each plugin's output is checked against its input
    /// without re-parsing what it left unchanged.
    pub fn process(&mut self, batch: &mut IngestBatch) {
        let Some(slots) = self.teams.get_mut(&batch.team_id) else {
            return;
        };
        let mut chain = ChainEvents {
            keys: batch.events.iter().map(|e| (e.uuid, e.timestamp)).collect(),
            events: batch.events.iter().map(|e| to_wit(e, batch)).collect(),
            team_id: batch.team_id,
        };
        let mut disabled = Vec::new();
        for slot in slots.iter_mut() {
            if chain.events.is_empty() {
                break;
            }
            run_slot(&self.catalog, slot, &mut chain);
            if slot.consecutive_failures >= DISABLE_AFTER_FAILURES {
                disabled.push(slot.entry.config.clone());
            }
        }
        batch.events = chain.into_rows();
        for config in disabled {
            self.disable(config);
        }
    }

    fn disable(&mut self, config: PluginConfig) {
        let store = self.catalog.store();
        let message = format!("disabled after {DISABLE_AFTER_FAILURES} consecutive failures; fix the cause and enable it again");
        tracing::error!(
            config = config.id,
            team = config.team_id,
            "plugin config {message}"
        );
        log_error(store, config.id, message);
        if let Err(e) =
            store.upsert_plugin_config(config.team_id, config.plugin_id, false, None, None)
        {
            tracing::error!(error = %e, "cannot disable the failing plugin config");
        }
        if let Some(slots) = self.teams.get_mut(&config.team_id) {
            slots.retain(|s| s.entry.config.id != config.id);
        }
    }
}

fn run_slot(catalog: &Catalog, slot: &mut Slot, chain: &mut ChainEvents) {
    let mut instance = match slot.instance.take() {
        Some(i) => i,
        None => match catalog.start(&slot.entry, None) {
            Ok(i) => i,
            Err(e) => {
                slot.consecutive_failures += 1;
                log_error(
                    catalog.store(),
                    slot.entry.config.id,
                    format!("{} could not start: {e}", slot.entry.plugin_name),
                );
                return;
            }
        },
    };
    if !instance
        .info
        .exports
        .intersects(Exports::PROCESS_EVENT | Exports::PROCESS_EVENT_BATCH)
    {
        slot.instance = Some(instance);
        return;
    }
    let outcome = instance.process_batch(&chain.events);
    let keep_instance = match outcome {
        Ok(results) if results.len() == chain.events.len() => {
            slot.consecutive_failures = 0;
            let mut kept = ChainEvents {
                keys: Vec::with_capacity(results.len()),
                events: Vec::with_capacity(results.len()),
                team_id: chain.team_id,
            };
            let inputs = chain.events.drain(..).zip(chain.keys.drain(..));
            for ((input, key), result) in inputs.zip(results) {
                let Some(changed) = result else {
                    continue;
                };
                match check_changed(changed, &input, key, chain.team_id) {
                    Ok((event, key)) => {
                        kept.events.push(event);
                        kept.keys.push(key);
                    }
                    Err(problem) => {
                        instance.host().log(
                            "error",
                            format!("process-event returned an invalid event for {}: {problem}; the event continues unchanged", key.0),
                        );
                        kept.events.push(input);
                        kept.keys.push(key);
                    }
                }
            }
            *chain = kept;
            true
        }
        Ok(results) => {
            slot.consecutive_failures += 1;
            instance.host().log(
                "error",
                format!(
                    "process-event-batch returned {} results for {} events ({}); the events continue unchanged",
                    results.len(),
                    chain.events.len(),
                    chain.uuid_list()
                ),
            );
            true
        }
        Err(e) => {
            slot.consecutive_failures += 1;
            let fatal = matches!(
                e,
                CallError::Timeout(_) | CallError::OutOfMemory(_) | CallError::Trap(_)
            );
            instance.host().log(
                "error",
                format!(
                    "process-event {e} on events {}; they continue unchanged",
                    chain.uuid_list()
                ),
            );
            !fatal
        }
    };
    instance.host().flush_logs();
    // After a trap, timeout or memory blow-up the instance's state is unknown: start afresh.
    if keep_instance {
        slot.instance = Some(instance);
    }
}

/// A batch's events on their way through a chain: in the plugins' form, with each event's uuid
/// and timestamp as the store holds them (unchanged by the chain, or checked when changed).
struct ChainEvents {
    events: Vec<WitEvent>,
    keys: Vec<(Uuid, DateTime<Utc>)>,
    team_id: TeamId,
}

impl ChainEvents {
    /// The event uuids, for a log line; built only when a call failed.
    fn uuid_list(&self) -> String {
        let uuids: Vec<String> = self.keys.iter().map(|k| k.0.to_string()).collect();
        uuids.join(", ")
    }

    fn into_rows(self) -> Vec<EventRow> {
        self.events
            .into_iter()
            .zip(self.keys)
            .map(|(e, (uuid, timestamp))| EventRow {
                uuid,
                event: e.event,
                distinct_id: e.distinct_id,
                properties: e.properties,
                timestamp,
                elements_chain: e.elements_chain,
            })
            .collect()
    }
}

/// Records a line against a plugin config from outside a call (no instance to buffer it).
fn log_error(store: &Store, config: PluginConfigId, message: String) {
    let entry = crate::store::PluginLogEntry {
        at: Utc::now(),
        level: "error".into(),
        message,
    };
    if let Err(e) = store.append_plugin_logs(config, &[entry]) {
        tracing::warn!(config, error = %e, "cannot store a plugin log line");
    }
}

fn to_wit(row: &EventRow, batch: &IngestBatch) -> WitEvent {
    WitEvent {
        uuid: row.uuid.to_string(),
        event: row.event.clone(),
        distinct_id: row.distinct_id.clone(),
        team_id: batch.team_id,
        timestamp: timestamp_text(row.timestamp),
        properties: row.properties.clone(),
        elements_chain: row.elements_chain.clone(),
        ip: batch.ip.clone(),
    }
}

/// Accepts a plugin's changed event only if it is still a valid event of the same team and uuid;
/// what it left as it was is not checked again.
fn check_changed(
    e: WitEvent,
    input: &WitEvent,
    key: (Uuid, DateTime<Utc>),
    team_id: TeamId,
) -> Result<(WitEvent, (Uuid, DateTime<Utc>)), String> {
    if e.uuid != input.uuid {
        return Err(format!("the uuid changed to {:?}", e.uuid));
    }
    if e.team_id != team_id {
        return Err(format!("the team changed to {}", e.team_id));
    }
    if e.event.trim().is_empty() {
        return Err("the event name is empty".into());
    }
    if e.distinct_id.trim().is_empty() {
        return Err("the distinct_id is empty".into());
    }
    let timestamp = if e.timestamp == input.timestamp {
        key.1
    } else {
        DateTime::parse_from_rfc3339(&e.timestamp)
            .map_err(|_| format!("the timestamp {:?} is not RFC 3339", e.timestamp))?
            .with_timezone(&Utc)
    };
    if e.properties != input.properties {
        // Checked without building the object: it is stored as text.
        let is_object = e.properties.trim_start().starts_with('{')
            && serde_json::from_str::<serde::de::IgnoredAny>(&e.properties).is_ok();
        if !is_object {
            return Err("the properties are not a JSON object".into());
        }
    }
    Ok((e, (key.0, timestamp)))
}
