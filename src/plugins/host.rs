//! What a plugin instance can reach: the host side of every import in `wit/plugin.wit`, scoped
//! to one plugin config by construction (storage keys, cache and logs carry its id), and a WASI
//! context with nothing in it (no files, no environment, no sockets).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::runtime::bindings::appliance::plugin::{
    cache, config, geoip, http, jobs, log, storage, types,
};
use crate::geoip::GeoIp;
use crate::jobs::{JobQueue, StopFlags};
use crate::store::{JobId, JobKind, NewJob, PluginConfigId, PluginLogEntry, Store};

/// Largest response body `http.fetch` hands to a plugin.
const MAX_FETCH_BYTES: usize = 16 << 20;
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const STDERR_CAPACITY: usize = 64 * 1024;

/// The HTTP client plugins fetch with, built once: it holds the connection pool and the trusted
/// certificates (the system's store; `SSL_CERT_FILE`/`SSL_CERT_DIR` override it), which are
/// too costly to load per request. Redirects are not followed: a redirect could leave the
/// hosts the plugin may call.
fn fetch_client() -> Result<&'static reqwest::blocking::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::blocking::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::blocking::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .https_only(false)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// An error with the chain of its causes (a TLS failure is several levels down).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A plugin config's in-memory cache, shared by its successive instances.
pub type SharedCache = Arc<Mutex<HashMap<String, (String, Option<Instant>)>>>;

/// Everything one plugin config's instance may touch.
pub struct PluginScope {
    pub config_id: PluginConfigId,
    pub config: BTreeMap<String, String>,
    /// Hosts the plugin declared and the operator allows.
    pub allowed_hosts: Vec<String>,
    pub store: Store,
    pub cache: SharedCache,
    /// Where `jobs.enqueue` outside a running job goes; `None` where there is no queue.
    pub jobs: Option<JobQueue>,
    /// The job names the plugin declares; empty means any.
    pub job_names: Vec<String>,
    /// Deadline given to the plugin's jobs.
    pub job_timeout: Duration,
    pub geoip: Arc<GeoIp>,
}

/// Attempts a plugin job gets unless it asks for another number.
pub const DEFAULT_JOB_ATTEMPTS: u32 = 5;

/// The job an instance is running, if it runs one.
pub struct JobContext {
    pub id: JobId,
    pub checkpoint: Option<String>,
    pub stop: Arc<StopFlags>,
    /// Jobs enqueued by this job, committed with its success.
    pub follow_ups: Vec<NewJob>,
}

/// The `T` of each plugin's wasmtime `Store`.
pub struct HostState {
    wasi: WasiCtx,
    /// The plugin's stderr (a Rust panic message lands here), quoted when it traps.
    stderr: MemoryOutputPipe,
    table: ResourceTable,
    pub(super) limits: MemoryLimit,
    scope: PluginScope,
    /// Log lines of the current call, written to the store in one transaction afterwards.
    pending_logs: Vec<PluginLogEntry>,
    /// The running job, while the instance runs one.
    pub job: Option<JobContext>,
    /// When the current call must end.
    pub(super) deadline: Option<Instant>,
}

impl HostState {
    pub fn new(scope: PluginScope, memory_bytes: usize) -> HostState {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        HostState {
            wasi: WasiCtx::builder().stderr(stderr.clone()).build(),
            stderr,
            table: ResourceTable::new(),
            limits: MemoryLimit {
                bytes: memory_bytes,
                hit: false,
            },
            scope,
            pending_logs: Vec::new(),
            job: None,
            deadline: None,
        }
    }

    /// True once the running job was terminated by the operator.
    pub(super) fn terminated(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.stop.terminated())
    }

    pub fn config_id(&self) -> PluginConfigId {
        self.scope.config_id
    }

    /// The end of what the plugin wrote to stderr, on one line.
    pub fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr.contents()).into_owned();
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let skip = flat.chars().count().saturating_sub(500);
        flat.chars().skip(skip).collect()
    }

    pub fn memory_limit_hit(&self) -> bool {
        self.limits.hit
    }

    /// Records a line against this plugin config (the plugin's own, or the host's about it).
    pub fn log(&mut self, level: &str, message: String) {
        self.pending_logs.push(PluginLogEntry {
            at: Utc::now(),
            level: level.to_owned(),
            message,
        });
    }

    /// Writes the pending log lines to the store.
    pub fn flush_logs(&mut self) {
        let entries = std::mem::take(&mut self.pending_logs);
        if let Err(e) = self
            .scope
            .store
            .append_plugin_logs(self.scope.config_id, &entries)
        {
            tracing::warn!(config = self.scope.config_id, error = %e, "cannot store plugin logs");
        }
    }
}

/// Caps a plugin's linear memory; a growth past the cap traps the call.
pub(super) struct MemoryLimit {
    bytes: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached",
                self.bytes
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.scope.config.get(&key).cloned()
    }

    fn all(&mut self) -> Vec<(String, String)> {
        self.scope
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl storage::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        match self
            .scope
            .store
            .plugin_storage_get(self.scope.config_id, &key)
        {
            Ok(v) => v,
            Err(e) => {
                self.log("error", format!("storage.get({key:?}) failed: {e}"));
                None
            }
        }
    }

    fn set(&mut self, key: String, value: String) {
        if let Err(e) =
            self.scope
                .store
                .plugin_storage_set(self.scope.config_id, &key, Some(&value))
        {
            self.log("error", format!("storage.set({key:?}) failed: {e}"));
        }
    }

    fn delete(&mut self, key: String) {
        if let Err(e) = self
            .scope
            .store
            .plugin_storage_set(self.scope.config_id, &key, None)
        {
            self.log("error", format!("storage.delete({key:?}) failed: {e}"));
        }
    }
}

impl cache::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        let mut cache = self.scope.cache.lock().ok()?;
        match cache.get(&key) {
            Some((_, Some(expiry))) if *expiry <= Instant::now() => {
                cache.remove(&key);
                None
            }
            Some((value, _)) => Some(value.clone()),
            None => None,
        }
    }

    fn set(&mut self, key: String, value: String, ttl_seconds: Option<u32>) {
        let expiry = ttl_seconds.map(|s| Instant::now() + Duration::from_secs(s.into()));
        if let Ok(mut cache) = self.scope.cache.lock() {
            cache.insert(key, (value, expiry));
        }
    }

    fn incr(&mut self, key: String, by: i64) -> i64 {
        let current = cache::Host::get(self, key.clone())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        let next = current.saturating_add(by);
        let expiry = self
            .scope
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&key).and_then(|(_, e)| *e));
        if let Ok(mut cache) = self.scope.cache.lock() {
            cache.insert(key, (next.to_string(), expiry));
        }
        next
    }

    fn expire(&mut self, key: String, ttl_seconds: u32) -> bool {
        let Ok(mut cache) = self.scope.cache.lock() else {
            return false;
        };
        match cache.get_mut(&key) {
            Some(entry) => {
                entry.1 = Some(Instant::now() + Duration::from_secs(ttl_seconds.into()));
                true
            }
            None => false,
        }
    }
}

impl jobs::Host for HostState {
    fn enqueue(
        &mut self,
        name: String,
        payload: String,
        when: jobs::When,
    ) -> Result<String, String> {
        jobs::Host::enqueue_with(
            self,
            name,
            payload,
            jobs::Options {
                when,
                idempotency_key: None,
                max_attempts: None,
                after: Vec::new(),
            },
        )
    }

    fn enqueue_with(
        &mut self,
        name: String,
        payload: String,
        options: jobs::Options,
    ) -> Result<String, String> {
        if !self.scope.job_names.is_empty() && !self.scope.job_names.contains(&name) {
            return Err(format!(
                "this plugin declares no job named {name:?} (it declares {})",
                self.scope.job_names.join(", ")
            ));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Err(format!("the payload of job {name:?} is not JSON"));
        }
        let now = crate::jobs::now_ms();
        let run_at_ms = match options.when {
            jobs::When::Now => now,
            jobs::When::AfterMs(ms) => now.saturating_add(ms.min(i64::MAX as u64) as i64),
            jobs::When::At(text) => chrono::DateTime::parse_from_rfc3339(&text)
                .map_err(|_| format!("{text:?} is not an RFC 3339 time"))?
                .timestamp_millis(),
        };
        let after = options
            .after
            .iter()
            .map(|id| {
                id.parse::<JobId>()
                    .map_err(|_| format!("{id:?} is not a job id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config = self.scope.config_id;
        let job = NewJob {
            id: uuid::Uuid::now_v7(),
            kind: JobKind::Plugin { config, name },
            payload,
            run_at_ms,
            max_attempts: options
                .max_attempts
                .unwrap_or(DEFAULT_JOB_ATTEMPTS)
                .clamp(1, 100),
            timeout_ms: self.scope.job_timeout.as_millis() as u64,
            // Keys are per plugin config: one plugin cannot collide with another's.
            idempotency_key: options.idempotency_key.map(|k| format!("{config}:{k}")),
            after,
        };
        let id = job.id.to_string();
        if let Some(running) = &mut self.job {
            running.follow_ups.push(job);
            return Ok(id);
        }
        match &self.scope.jobs {
            Some(queue) => queue
                .enqueue(vec![job])
                .map(|ids| ids.first().map(|i| i.to_string()).unwrap_or(id))
                .map_err(|e| format!("cannot queue the job: {e}")),
            None => Err("there is no job queue in this process".into()),
        }
    }

    fn current(&mut self) -> Option<String> {
        self.job.as_ref().map(|j| j.id.to_string())
    }

    fn checkpoint(&mut self) -> Option<String> {
        self.job.as_ref().and_then(|j| j.checkpoint.clone())
    }

    fn save_checkpoint(&mut self, state: String) -> Result<(), String> {
        let Some(job) = &mut self.job else {
            return Err("no job is running".into());
        };
        if job.stop.cancelled() {
            return Err("the job was cancelled; stop now".into());
        }
        self.scope
            .store
            .save_job_checkpoint(job.id, &state, crate::jobs::now_ms())
            .map_err(|e| format!("cannot save the checkpoint: {e}"))?;
        job.checkpoint = Some(state);
        Ok(())
    }

    fn cancelled(&mut self) -> bool {
        self.job.as_ref().is_some_and(|j| j.stop.cancelled())
    }
}

impl geoip::Host for HostState {
    fn locate(&mut self, ip: String) -> Option<geoip::Location> {
        let found = self.scope.geoip.locate(&ip)?;
        Some(geoip::Location {
            country_code: found.country_code,
            country_name: found.country_name,
            city_name: found.city_name,
            subdivision_code: found.subdivision_code,
            postal_code: found.postal_code,
            continent_code: found.continent_code,
            latitude: found.latitude,
            longitude: found.longitude,
            time_zone: found.time_zone,
        })
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        HostState::log(self, level, message);
    }
}

impl http::Host for HostState {
    fn fetch(&mut self, request: http::Request) -> Result<http::Response, String> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| format!("invalid URL {:?}: {e}", request.url))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        if !self
            .scope
            .allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&host))
        {
            let refusal = format!("host {host:?} is not among the hosts this plugin may call");
            self.log("warn", format!("http.fetch refused: {refusal}"));
            return Err(refusal);
        }
        let timeout = request
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.into()))
            .unwrap_or(DEFAULT_FETCH_TIMEOUT)
            .min(MAX_FETCH_TIMEOUT);
        let method =
            reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|e| e.to_string())?;
        let client = fetch_client()?;
        let mut builder = client.request(method, url).timeout(timeout);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let response = builder.send().map_err(|e| with_causes(&e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_string(), v.to_owned())))
            .collect();
        let body = response.bytes().map_err(|e| e.to_string())?;
        if body.len() > MAX_FETCH_BYTES {
            return Err(format!("response body over {MAX_FETCH_BYTES} bytes"));
        }
        Ok(http::Response {
            status,
            headers,
            body: body.to_vec(),
        })
    }
}
