//! What a plugin instance can reach: the host side of every import in `wit/plugin.wit`, scoped
//! to one plugin config by construction (storage keys, cache and logs carry its id), and a WASI
//! context with nothing in it (no files, no environment, no sockets).
//!
//! Owns: [`HostState`] (one per instance) and the quotas every import enforces: storage
//! ([`storage`]: keys, bytes, value size; one transaction per call), cache ([`cache`]: bytes,
//! least recently used evicted, atomic `incr`), logs (line length, lines per call), jobs
//! ([`jobs`]: queued per config, per call, idempotency keys), `http.fetch` ([`http`]: declared
//! hosts, public addresses only unless the operator allows a network, the call's deadline,
//! terminate, a streamed body limit), WASI sleeps cut at the call's deadline ([`clock`]), and
//! the instance's memory as one budget across all its memories.
//! Must never: block past the call's deadline, or let a plugin touch another config's data.

pub mod cache;
pub mod clock;
pub mod http;
pub mod jobs;
pub mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::runtime::bindings::appliance::plugin::{config, geoip, log, types};
use crate::config::PluginQuotas;
use crate::geoip::GeoIp;
use crate::jobs::{JobQueue, StopFlags};
use crate::store::{JobId, NewJob, PluginConfigId, PluginLogEntry, Store};
pub use cache::SharedCache;
pub use http::NetworkPolicy;

const STDERR_CAPACITY: usize = 64 * 1024;

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
    pub quotas: Arc<PluginQuotas>,
    pub network: Arc<NetworkPolicy>,
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
    pub(super) table: ResourceTable,
    /// The guest's monotonic clock.
    clock: clock::InstanceClock,
    pub(super) limits: MemoryLimit,
    scope: PluginScope,
    /// Log lines of the current call, written to the store when it ends.
    pending_logs: Vec<PluginLogEntry>,
    /// Lines the current call wanted to log past `PLUGIN_LOG_LINES_PER_CALL`.
    dropped_logs: usize,
    /// Storage writes of the current call, committed together when it ends.
    pub(super) writes: storage::PendingWrites,
    /// Jobs queued by the current call (outside a job), queued together when it ends.
    pub(super) pending_jobs: Vec<NewJob>,
    /// The running job, while the instance runs one.
    pub job: Option<JobContext>,
    /// When the current call must end.
    pub(super) deadline: Option<Instant>,
}

impl HostState {
    pub fn new(scope: PluginScope, memory_bytes: usize) -> HostState {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let clock = clock::InstanceClock::default();
        HostState {
            wasi: WasiCtx::builder()
                .stderr(stderr.clone())
                .monotonic_clock(clock)
                .build(),
            stderr,
            table: ResourceTable::new(),
            clock,
            limits: MemoryLimit {
                bytes: memory_bytes,
                used: 0,
                hit: false,
            },
            scope,
            pending_logs: Vec::new(),
            dropped_logs: 0,
            writes: storage::PendingWrites::default(),
            pending_jobs: Vec::new(),
            job: None,
            deadline: None,
        }
    }

    /// True once the running job was terminated by the operator.
    pub(super) fn terminated(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.stop.terminated())
    }

    /// How long the current call may still run: what a host call may wait at most.
    pub(super) fn remaining(&self) -> Duration {
        if self.terminated() {
            return Duration::ZERO;
        }
        self.deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        })
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

    /// Records a line against this plugin config (the plugin's own, or the host's about it),
    /// cut at `PLUGIN_LOG_LINE_MAX_BYTES`; past `PLUGIN_LOG_LINES_PER_CALL` lines in one call the
    /// rest are only counted.
    pub fn log(&mut self, level: &str, mut message: String) {
        let quotas = &self.scope.quotas;
        if self.pending_logs.len() >= quotas.log_lines_per_call {
            self.dropped_logs += 1;
            return;
        }
        if message.len() > quotas.log_line_max_bytes {
            let mut cut = quotas.log_line_max_bytes;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" … (cut at PLUGIN_LOG_LINE_MAX_BYTES)");
        }
        self.pending_logs.push(PluginLogEntry {
            at: Utc::now(),
            level: level.to_owned(),
            message,
        });
    }

    /// Ends a call: commits its storage writes in one transaction, queues the jobs it asked for
    /// in another, and writes its log lines.
    pub fn end_call(&mut self) {
        if let Some(refused) = storage::commit(self) {
            self.log("error", refused);
        }
        if let Some(lost) = jobs::commit(self) {
            self.log("error", lost);
        }
        if self.dropped_logs > 0 {
            let dropped = std::mem::take(&mut self.dropped_logs);
            let message = format!("{dropped} more log lines of this call were dropped (PLUGIN_LOG_LINES_PER_CALL is {})", self.scope.quotas.log_lines_per_call);
            tracing::warn!(config = self.scope.config_id, "{message}");
            // Room is kept for this one line past the cap.
            self.pending_logs.push(PluginLogEntry {
                at: Utc::now(),
                level: "warn".into(),
                message,
            });
        }
        let entries = std::mem::take(&mut self.pending_logs);
        let quotas = &self.scope.quotas;
        if let Err(e) = self.scope.store.append_plugin_logs(
            self.scope.config_id,
            &entries,
            quotas.log_max_lines,
        ) {
            tracing::warn!(config = self.scope.config_id, error = %e, "cannot store plugin logs");
        }
    }
}

/// Caps a plugin instance's memory: all its linear memories together, so a component with
/// several cannot multiply the limit. A growth past the cap traps the call.
pub(super) struct MemoryLimit {
    bytes: usize,
    used: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        if self.used.saturating_add(growth) > self.bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes reached",
                self.bytes
            )));
        }
        self.used += growth;
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

impl geoip::Host for HostState {
    fn locate(&mut self, ip: String) -> Option<geoip::Location> {
        let found = self.scope.geoip.locate(&ip)?;
        Some(geoip::Location {
            country_code: found.country_code,
            country_name: found.country_name,
            city_name: found.city_name,
            subdivision_code: found.subdivisions.first().and_then(|s| s.code.clone()),
            postal_code: found.postal_code,
            continent_code: found.continent_code,
            latitude: found.latitude,
            longitude: found.longitude,
            time_zone: found.time_zone,
            continent_name: found.continent_name,
            accuracy_radius: found.accuracy_radius,
            subdivisions: found
                .subdivisions
                .into_iter()
                .map(|s| geoip::Subdivision {
                    code: s.code,
                    name: s.name,
                })
                .collect(),
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
