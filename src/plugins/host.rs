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
use crate::store::{PluginConfigId, PluginLogEntry, Store};

/// Largest response body `http.fetch` hands to a plugin.
const MAX_FETCH_BYTES: usize = 16 << 20;
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const STDERR_CAPACITY: usize = 64 * 1024;

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
        }
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
        _payload: String,
        _when: jobs::When,
    ) -> Result<String, String> {
        // The durable job queue is the next step (see ARCHITECTURE.md); say so instead of
        // pretending the job was queued.
        Err(format!(
            "cannot queue job {name:?}: this appliance has no job queue yet"
        ))
    }
}

impl geoip::Host for HostState {
    fn locate(&mut self, _ip: String) -> Option<geoip::Location> {
        // No MMDB is loaded by this build: every address is unknown.
        None
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
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let mut builder = client.request(method, url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        let response = builder.send().map_err(|e| e.to_string())?;
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
