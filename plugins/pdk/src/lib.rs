//! appliance-pdk: write an appliance plugin as plain Rust.
//!
//! Implement [`Plugin`] on a type, list the exports you implement in [`Plugin::EXPORTS`], and
//! register it with [`plugin!`]. Build with `cargo build --release --target wasm32-wasip2`; the
//! `.wasm` in `target/wasm32-wasip2/release/` and a `plugin.json` make the plugin.
//!
//! ```ignore
//! use appliance_pdk::{Event, Error, Exports, Plugin};
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     const EXPORTS: Exports = Exports::PROCESS_EVENT;
//!     fn process_event(mut event: Event) -> Result<Option<Event>, Error> {
//!         event.properties.insert("hello".into(), "world".into());
//!         Ok(Some(event))
//!     }
//! }
//! appliance_pdk::plugin!(Hello);
//! ```

use std::marker::PhantomData;

mod properties;
pub use properties::Properties;

pub use serde_json::{self, json, Map, Value};

/// The generated bindings of `wit/plugin.wit`; plugins normally use the wrappers below instead.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "appliance_pdk::bindings",
    });
}

use bindings::appliance::plugin as host;
use bindings::appliance::plugin::types as wit;

/// Which exports a plugin implements (`Exports::PROCESS_EVENT | Exports::SETUP`, …).
pub use wit::Exports;

/// An event: PostHog's processed event, properties parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    pub team_id: u64,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Parsed only as far as the plugin looks (see [`Properties`]).
    pub properties: Properties,
    pub elements_chain: String,
    pub ip: Option<String>,
}

/// How a call failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// Try again later (PostHog's `RetryError`).
    Retry(String),
    /// Failed; do not retry.
    Failed(String),
}

impl Error {
    pub fn failed(message: impl std::fmt::Display) -> Error {
        Error::Failed(message.to_string())
    }
    pub fn retry(message: impl std::fmt::Display) -> Error {
        Error::Retry(message.to_string())
    }
}

/// A plugin. Every function has a default; [`Plugin::EXPORTS`] tells the host which ones to call.
pub trait Plugin {
    const EXPORTS: Exports;
    /// Names of the jobs [`Plugin::run_job`] accepts.
    const JOBS: &'static [&'static str] = &[];

    fn setup() -> Result<(), Error> {
        Ok(())
    }
    fn teardown() {}
    /// The event changed, or `None` to drop it.
    fn process_event(event: Event) -> Result<Option<Event>, Error> {
        Ok(Some(event))
    }
    fn process_event_batch(events: Vec<Event>) -> Result<Vec<Option<Event>>, Error> {
        events.into_iter().map(Self::process_event).collect()
    }
    fn on_event(_event: Event) -> Result<(), Error> {
        Ok(())
    }
    fn export_events(_events: Vec<Event>) -> Result<(), Error> {
        Ok(())
    }
    fn run_every_minute() -> Result<(), Error> {
        Ok(())
    }
    fn run_every_hour() -> Result<(), Error> {
        Ok(())
    }
    fn run_every_day() -> Result<(), Error> {
        Ok(())
    }
    fn run_job(name: &str, _payload: Value) -> Result<(), Error> {
        Err(Error::failed(format!(
            "this plugin has no job named {name:?}"
        )))
    }
}

/// Registers a [`Plugin`] as the component's exports.
#[macro_export]
macro_rules! plugin {
    ($plugin:ty) => {
        type __AppliancePluginExports = $crate::Adapter<$plugin>;
        $crate::bindings::export!(__AppliancePluginExports with_types_in $crate::bindings);
    };
}

/// Bridges a [`Plugin`] to the generated bindings; used by [`plugin!`].
pub struct Adapter<P>(PhantomData<P>);

fn from_wit(e: wit::Event) -> Event {
    let properties = Properties::from_json_text(e.properties);
    Event {
        uuid: e.uuid,
        event: e.event,
        distinct_id: e.distinct_id,
        team_id: e.team_id,
        timestamp: e.timestamp,
        properties,
        elements_chain: e.elements_chain,
        ip: e.ip,
    }
}

fn to_wit(e: Event) -> wit::Event {
    wit::Event {
        uuid: e.uuid,
        event: e.event,
        distinct_id: e.distinct_id,
        team_id: e.team_id,
        timestamp: e.timestamp,
        properties: e.properties.into_json_text(),
        elements_chain: e.elements_chain,
        ip: e.ip,
    }
}

fn error_to_wit(e: Error) -> wit::PluginError {
    match e {
        Error::Retry(m) => wit::PluginError::Retry(m),
        Error::Failed(m) => wit::PluginError::Failed(m),
    }
}

type WitResult<T> = Result<T, wit::PluginError>;

impl<P: Plugin> bindings::Guest for Adapter<P> {
    fn info() -> wit::PluginInfo {
        wit::PluginInfo {
            exports: P::EXPORTS,
            jobs: P::JOBS.iter().map(|j| j.to_string()).collect(),
        }
    }
    fn setup() -> WitResult<()> {
        P::setup().map_err(error_to_wit)
    }
    fn teardown() {
        P::teardown()
    }
    fn process_event(event: wit::Event) -> WitResult<Option<wit::Event>> {
        P::process_event(from_wit(event))
            .map(|e| e.map(to_wit))
            .map_err(error_to_wit)
    }
    fn process_event_batch(events: Vec<wit::Event>) -> WitResult<Vec<Option<wit::Event>>> {
        P::process_event_batch(events.into_iter().map(from_wit).collect())
            .map(|out| out.into_iter().map(|e| e.map(to_wit)).collect())
            .map_err(error_to_wit)
    }
    fn on_event(event: wit::Event) -> WitResult<()> {
        P::on_event(from_wit(event)).map_err(error_to_wit)
    }
    fn export_events(events: Vec<wit::Event>) -> WitResult<()> {
        P::export_events(events.into_iter().map(from_wit).collect()).map_err(error_to_wit)
    }
    fn run_every_minute() -> WitResult<()> {
        P::run_every_minute().map_err(error_to_wit)
    }
    fn run_every_hour() -> WitResult<()> {
        P::run_every_hour().map_err(error_to_wit)
    }
    fn run_every_day() -> WitResult<()> {
        P::run_every_day().map_err(error_to_wit)
    }
    fn run_job(name: String, payload: String) -> WitResult<()> {
        let payload = serde_json::from_str(&payload).unwrap_or(Value::Null);
        P::run_job(&name, payload).map_err(error_to_wit)
    }
}

/// The plugin config's values (from the operator, typed by plugin.json's schema).
pub mod config {
    use super::host::config;

    pub fn get(key: &str) -> Option<String> {
        config::get(key)
    }
    pub fn all() -> Vec<(String, String)> {
        config::all()
    }
}

/// Persistent storage, private to this plugin config.
pub mod storage {
    use super::host::storage;

    pub fn get(key: &str) -> Option<String> {
        storage::get(key)
    }
    /// Stores `value` at `key`; fails (storing nothing) past the config's storage quota.
    pub fn set(key: &str, value: &str) -> Result<(), String> {
        storage::set(key, value)
    }
    pub fn delete(key: &str) {
        storage::delete(key)
    }
}

/// In-memory cache with expiry, private to this plugin config.
pub mod cache {
    use super::host::cache;

    pub fn get(key: &str) -> Option<String> {
        cache::get(key)
    }
    /// Caches `value`; fails only for a value larger than the whole cache.
    pub fn set(key: &str, value: &str, ttl_seconds: Option<u32>) -> Result<(), String> {
        cache::set(key, value, ttl_seconds)
    }
    pub fn incr(key: &str, by: i64) -> i64 {
        cache::incr(key, by)
    }
    pub fn expire(key: &str, ttl_seconds: u32) -> bool {
        cache::expire(key, ttl_seconds)
    }
}

/// Logs kept against this plugin config (`appliance plugin logs`).
pub mod log {
    use super::host::log::{log, Level};

    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// HTTP requests to the hosts this plugin declares in plugin.json and the operator allows.
pub mod http {
    pub use super::host::http::{Request, Response};

    pub fn fetch(request: &Request) -> Result<Response, String> {
        super::host::http::fetch(request)
    }

    /// POSTs a JSON body.
    pub fn post_json(url: &str, body: &serde_json::Value) -> Result<Response, String> {
        fetch(&Request {
            method: "POST".into(),
            url: url.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.to_string().into_bytes()),
            timeout_ms: None,
        })
    }
}

/// Durable jobs of this plugin, and the running job's checkpoint and stop requests.
///
/// Jobs enqueued while a job runs are queued only if that job succeeds (atomically with its
/// completion), which makes chains of jobs safe to retry.
pub mod jobs {
    use super::host::jobs::{
        cancelled as host_cancelled, checkpoint as host_checkpoint, current, enqueue, enqueue_with,
        save_checkpoint as host_save,
    };
    pub use super::host::jobs::{Options, When};

    pub fn run_now(name: &str, payload: &serde_json::Value) -> Result<String, String> {
        enqueue(name, &payload.to_string(), &When::Now)
    }
    pub fn run_in(name: &str, payload: &serde_json::Value, millis: u64) -> Result<String, String> {
        enqueue(name, &payload.to_string(), &When::AfterMs(millis))
    }
    pub fn run_at(
        name: &str,
        payload: &serde_json::Value,
        rfc3339: &str,
    ) -> Result<String, String> {
        enqueue(name, &payload.to_string(), &When::At(rfc3339.into()))
    }
    /// Full control: idempotency key, attempts, and jobs to wait for (fan-in).
    pub fn enqueue_job(
        name: &str,
        payload: &serde_json::Value,
        options: &Options,
    ) -> Result<String, String> {
        enqueue_with(name, &payload.to_string(), options)
    }
    /// Options that run the job now, once per `key`, after `after` have succeeded.
    pub fn options(key: Option<&str>, after: &[String]) -> Options {
        Options {
            when: When::Now,
            idempotency_key: key.map(str::to_owned),
            max_attempts: None,
            after: after.to_vec(),
        }
    }
    /// The running job's id.
    pub fn current_job() -> Option<String> {
        current()
    }
    /// The state this job saved before a retry or restart, if any.
    pub fn checkpoint() -> Option<String> {
        host_checkpoint()
    }
    /// Saves this job's state durably; `Err` once the job has been cancelled: stop then.
    pub fn save_checkpoint(state: &str) -> Result<(), String> {
        host_save(state)
    }
    /// True once the operator cancelled this job.
    pub fn cancelled() -> bool {
        host_cancelled()
    }
}

/// IP geolocation.
pub mod geoip {
    pub use super::host::geoip::Location;

    pub fn locate(ip: &str) -> Option<Location> {
        super::host::geoip::locate(ip)
    }
}
