//! The wasmtime side: one `Engine` for the process (pooling allocator, epoch interruption),
//! components compiled once and cached on disk by content hash, one `Store` per plugin config
//! with its memory limit, and per-call deadlines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::host::HostState;
use super::PluginError;
pub use crate::config::PluginLimits as Limits;
use crate::ids::PluginConfigId;
use crate::store::Cadence;

/// Host bindings of `wit/plugin.wit`.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "wit",
    });
}

pub use bindings::appliance::plugin::types::{
    Event as WitEvent, Exports, PluginError as WitPluginError, PluginInfo,
};
use bindings::{Plugin, PluginPre};

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// A running call looks at its deadline and at terminate requests at least this often.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Why the host stopped a call from the epoch callback.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("the call ran past its deadline")]
    Deadline,
    #[error("the job was terminated")]
    Terminated,
}

fn ticks(d: Duration) -> u64 {
    (d.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// Why a call did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("ran past its deadline of {0:?}")]
    Timeout(Duration),
    #[error("exceeded its memory limit of {0} bytes")]
    OutOfMemory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("terminated by the operator")]
    Terminated,
    #[error("asked to retry: {0}")]
    Retry(String),
    #[error("failed: {0}")]
    Failed(String),
}

/// The process-wide engine, the linker with every host import, and the compiled-code cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    pub limits: Limits,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// A compiled plugin, ready to instantiate cheaply.
#[derive(Clone)]
pub struct Loaded {
    pre: PluginPre<HostState>,
    pub sha256: String,
}

/// The engine, its instances allocated by `strategy`.
fn engine(strategy: InstanceAllocationStrategy) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    config.allocation_strategy(strategy);
    Engine::new(&config)
}

/// The pooling allocator: instances made and dropped often (a kept instance per config, a
/// fresh one after a trap) reuse slots reserved once.
fn pool(memory_bytes: usize) -> InstanceAllocationStrategy {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(1000)
        .total_core_instances(2000)
        .total_memories(1000)
        .total_tables(2000)
        .max_memory_size(memory_bytes);
    InstanceAllocationStrategy::Pooling(pool)
}

impl Runtime {
    pub fn new(cache_dir: &Path, limits: Limits) -> Result<Runtime, PluginError> {
        let engine = engine(pool(limits.memory_bytes))
            .or_else(|pool_error| {
                // The pool reserves address space for every instance up front (terabytes of it,
                // never touched); a process whose address space is capped (`ulimit -v`,
                // valgrind) cannot have it, and allocates each instance's memory when it is
                // made instead, under the same limiter.
                tracing::warn!(error = %pool_error, "the plugin instance pool cannot reserve its address space; plugin instances are allocated one by one");
                engine(InstanceAllocationStrategy::OnDemand)
            })
            .map_err(|e| PluginError::Runtime(e.to_string()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticking, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Runtime(e.to_string()))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Runtime(e.to_string()))?;
        super::host::clock::shadow_sleeps(&mut linker)
            .map_err(|e| PluginError::Runtime(e.to_string()))?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|e| PluginError::Runtime(e.to_string()))?;
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| PluginError::Runtime(format!("{}: {e}", cache_dir.display())))?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir: cache_dir.to_owned(),
            limits,
            ticker_stop,
        })
    }

    /// Compiles a component (or takes the precompiled artifact from the cache) and links it.
    pub fn load(&self, wasm: &[u8]) -> Result<Loaded, PluginError> {
        let sha256 = format!("{:x}", Sha256::digest(wasm));
        let cached = self.cache_dir.join(format!("{sha256}.cwasm"));
        // SAFETY: the cache holds only artifacts this engine configuration wrote (the file name
        // is the source's hash); wasmtime checks the artifact's engine compatibility on load.
        let from_cache = cached
            .exists()
            .then(|| unsafe { Component::deserialize_file(&self.engine, &cached) }.ok())
            .flatten();
        let component = match from_cache {
            Some(c) => c,
            None => {
                let component = Component::new(&self.engine, wasm)
                    .map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))?;
                if let Ok(bytes) = component.serialize() {
                    let tmp = cached.with_extension("tmp");
                    if std::fs::write(&tmp, bytes).is_ok() {
                        let _ = std::fs::rename(&tmp, &cached);
                    }
                }
                component
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))?;
        let pre =
            PluginPre::new(pre).map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))?;
        Ok(Loaded { pre, sha256 })
    }

    /// A new instance with its own store and limits; asks the plugin what it implements.
    pub fn instantiate(&self, loaded: &Loaded, state: HostState) -> Result<Instance, CallError> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if state.terminated() {
                return Err(Stopped::Terminated.into());
            }
            let left = state
                .deadline
                .map(|d| d.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or(CHECK_EVERY);
            if left.is_zero() {
                return Err(Stopped::Deadline.into());
            }
            Ok(wasmtime::UpdateDeadline::Continue(ticks(
                left.min(CHECK_EVERY),
            )))
        });
        let mut instance = Instance {
            plugin: None,
            store,
            info: PluginInfo {
                exports: Exports::empty(),
                jobs: Vec::new(),
            },
            limits: self.limits,
            call: None,
            broken: false,
        };
        instance.arm("instantiate", self.limits.task);
        let limits = self.limits;
        let plugin = loaded
            .pre
            .instantiate(&mut instance.store)
            .map_err(|e| classify(&instance.store, &limits, e, limits.task))?;
        instance.info = plugin
            .call_info(&mut instance.store)
            .map_err(|e| classify(&instance.store, &limits, e, limits.task))?;
        instance.plugin = Some(plugin);
        Ok(instance)
    }
}

/// A live plugin instance: one per plugin config. After a trap it must be dropped.
pub struct Instance {
    plugin: Option<Plugin>,
    store: Store<HostState>,
    pub info: PluginInfo,
    limits: Limits,
    /// The running call's kind and start, for its metrics.
    call: Option<(&'static str, std::time::Instant)>,
    /// Set when a call trapped, timed out, ran out of memory or was terminated: the guest's
    /// state is then unknown, and the instance must not run another call.
    broken: bool,
}

impl Instance {
    fn arm(&mut self, kind: &'static str, deadline: Duration) {
        let now = std::time::Instant::now();
        self.call = Some((kind, now));
        self.store.data_mut().deadline = Some(now + deadline);
        self.store
            .set_epoch_deadline(ticks(deadline.min(CHECK_EVERY)));
    }

    pub fn host(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    /// True while every call so far ended normally (with a value or the plugin's own error), so
    /// the instance may run the next one.
    pub fn reusable(&self) -> bool {
        !self.broken && self.plugin.is_some()
    }

    /// Runs `setup`, within `PLUGIN_SETUP_TIMEOUT_MS`.
    pub fn setup(&mut self) -> Result<(), CallError> {
        if !self.info.exports.contains(Exports::SETUP) {
            return Ok(());
        }
        let deadline = self.limits.setup;
        self.arm("setup", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        let result = plugin.call_setup(&mut self.store);
        self.ended(result, deadline)
    }

    /// Runs `teardown` (a config disabled or replaced, or the server stopping), within
    /// `PLUGIN_SETUP_TIMEOUT_MS`.
    pub fn teardown(&mut self) -> Result<(), CallError> {
        if !self.info.exports.contains(Exports::TEARDOWN) {
            return Ok(());
        }
        let deadline = self.limits.setup;
        self.arm("teardown", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        let result = plugin.call_teardown(&mut self.store).map(Ok);
        self.ended(result, deadline)
    }

    /// Ends a call: its storage writes and log lines are committed, its result classified.
    fn ended<T>(
        &mut self,
        result: wasmtime::Result<Result<T, WitPluginError>>,
        deadline: Duration,
    ) -> Result<T, CallError> {
        self.store.data_mut().end_call();
        self.store.data_mut().deadline = None;
        let result = finish(&self.store, &self.limits, result, deadline);
        if matches!(
            result,
            Err(CallError::Trap(_)
                | CallError::Timeout(_)
                | CallError::OutOfMemory(_)
                | CallError::Terminated)
        ) {
            self.broken = true;
        }
        if let Some((kind, started)) = self.call.take() {
            record_call(self.store.data().config_id(), kind, started, &result);
        }
        result
    }

    /// Runs `process-event-batch` (or `process-event` per event) over `events`.
    pub fn process_batch(
        &mut self,
        events: &[WitEvent],
    ) -> Result<Vec<Option<WitEvent>>, CallError> {
        let deadline = self.limits.process_event;
        self.arm("process_event", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        if self.info.exports.contains(Exports::PROCESS_EVENT_BATCH) {
            let result = plugin.call_process_event_batch(&mut self.store, events);
            return self.ended(result, deadline);
        }
        let mut out = Vec::with_capacity(events.len());
        let mut failed = None;
        for event in events {
            match plugin.call_process_event(&mut self.store, event) {
                Ok(Ok(result)) => out.push(result),
                other => {
                    failed = Some(other);
                    break;
                }
            }
        }
        match failed {
            Some(result) => self.ended(result.map(|r| r.map(|_| Vec::new())), deadline),
            None => self.ended(Ok(Ok(out)), deadline),
        }
    }
}

impl Instance {
    /// Runs the plugin's job `name` within `deadline`.
    pub fn run_job(
        &mut self,
        name: &str,
        payload: &str,
        deadline: Duration,
    ) -> Result<(), CallError> {
        self.arm("job", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        let result = plugin.call_run_job(&mut self.store, name, payload);
        self.ended(result, deadline)
    }

    /// Runs one of the plugin's `run-every-*` tasks within `deadline`.
    pub fn run_every(&mut self, cadence: Cadence, deadline: Duration) -> Result<(), CallError> {
        let export = match cadence {
            Cadence::Minute => Exports::RUN_EVERY_MINUTE,
            Cadence::Hour => Exports::RUN_EVERY_HOUR,
            Cadence::Day => Exports::RUN_EVERY_DAY,
        };
        if !self.info.exports.contains(export) {
            return Ok(());
        }
        self.arm("schedule", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        let result = match cadence {
            Cadence::Minute => plugin.call_run_every_minute(&mut self.store),
            Cadence::Hour => plugin.call_run_every_hour(&mut self.store),
            Cadence::Day => plugin.call_run_every_day(&mut self.store),
        };
        self.ended(result, deadline)
    }

    /// Hands stored events to `export-events` (one call) or else `on-event` (one call each).
    pub fn deliver(&mut self, events: &[WitEvent], deadline: Duration) -> Result<(), CallError> {
        self.arm("export", deadline);
        let plugin = self.plugin.as_ref().ok_or_else(uninitialised)?;
        let mut result = Ok(Ok(()));
        if self.info.exports.contains(Exports::EXPORT_EVENTS) {
            result = plugin.call_export_events(&mut self.store, events);
        }
        if self.info.exports.contains(Exports::ON_EVENT) && matches!(result, Ok(Ok(()))) {
            for event in events {
                result = plugin.call_on_event(&mut self.store, event);
                if !matches!(result, Ok(Ok(()))) {
                    break;
                }
            }
        }
        self.ended(result, deadline)
    }
}

fn uninitialised() -> CallError {
    CallError::Trap("the instance is not initialised".into())
}

fn classify(
    store: &Store<HostState>,
    limits: &Limits,
    error: wasmtime::Error,
    deadline: Duration,
) -> CallError {
    match error.downcast_ref::<Stopped>() {
        Some(Stopped::Deadline) => return CallError::Timeout(deadline),
        Some(Stopped::Terminated) => return CallError::Terminated,
        None => {}
    }
    if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return CallError::Timeout(deadline);
    }
    if store.data().memory_limit_hit() {
        return CallError::OutOfMemory(limits.memory_bytes);
    }
    let what = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    match store.data().stderr_tail() {
        stderr if stderr.is_empty() => CallError::Trap(what),
        stderr => CallError::Trap(format!("{what}; the plugin wrote: {stderr}")),
    }
}

/// Counts a finished call and its duration under its plugin config and kind.
fn record_call<T>(
    config: PluginConfigId,
    kind: &'static str,
    started: std::time::Instant,
    result: &Result<T, CallError>,
) {
    use crate::telemetry::names;
    let outcome = match result {
        Ok(_) => "ok",
        Err(CallError::Timeout(_)) => "timeout",
        Err(CallError::OutOfMemory(_)) => "out_of_memory",
        Err(CallError::Trap(_)) => "trap",
        Err(CallError::Terminated) => "terminated",
        Err(CallError::Retry(_)) => "retry",
        Err(CallError::Failed(_)) => "failed",
    };
    let elapsed = started.elapsed();
    crate::telemetry::count_plugin_call(config, kind, elapsed, result.is_err());
    let config = config.to_string();
    metrics::histogram!(names::PLUGIN_CALL_SECONDS, "config" => config.clone(), "kind" => kind)
        .record(elapsed.as_secs_f64());
    metrics::counter!(names::PLUGIN_CALLS, "config" => config, "kind" => kind, "outcome" => outcome)
        .increment(1);
}

fn finish<T>(
    store: &Store<HostState>,
    limits: &Limits,
    result: wasmtime::Result<Result<T, WitPluginError>>,
    deadline: Duration,
) -> Result<T, CallError> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(WitPluginError::Retry(m))) => Err(CallError::Retry(m)),
        Ok(Err(WitPluginError::Failed(m))) => Err(CallError::Failed(m)),
        Err(e) => Err(classify(store, limits, e, deadline)),
    }
}
