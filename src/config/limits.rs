//! The limits and quotas the settings table fills in: per plugin call, per plugin config, the
//! job queue's, capture's per request, and each listener's. Plain values: parsing and
//! validating them is the settings table's work, in `mod.rs`.

use std::time::Duration;

use super::Config;

/// Limits applied to every plugin call.
#[derive(Clone, Copy, Debug)]
pub struct PluginLimits {
    pub memory_bytes: usize,
    /// Deadline of `setup` and `teardown`.
    pub setup: Duration,
    /// Deadline of `process-event` calls (per batch call).
    pub process_event: Duration,
    /// Deadline of setup, scheduled tasks, jobs and exports.
    pub task: Duration,
}

/// What one plugin config may use, beyond its instance's memory and call deadlines.
#[derive(Clone, Debug)]
pub struct PluginQuotas {
    /// Largest event a plugin may return (capture's own limit).
    pub max_event_bytes: usize,
    /// Time in process-event calls per minute.
    pub time_budget_per_minute: Duration,
    /// Bytes of one team's events that may wait for its plugins.
    pub deferred_max_bytes: u64,
    pub storage_max_bytes: u64,
    pub storage_max_keys: u64,
    pub storage_max_value_bytes: usize,
    pub cache_max_bytes: usize,
    pub log_line_max_bytes: usize,
    pub log_lines_per_call: usize,
    pub log_max_lines: u64,
    pub log_retention: Duration,
    pub max_queued_jobs: u64,
    pub max_jobs_per_call: usize,
    pub fetch_max_bytes: usize,
    /// Loopback, link-local and private networks plugins may reach anyway.
    pub allowed_networks: Vec<ipnet::IpNet>,
}

impl Default for PluginQuotas {
    /// The defaults of the settings table.
    fn default() -> PluginQuotas {
        Config::from_vars(Vec::new())
            .map(|c| c.plugin_quotas)
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

/// How the job queue behaves.
#[derive(Clone, Copy, Debug)]
pub struct JobSettings {
    /// Jobs that run at once.
    pub slots: usize,
    /// Jobs of one plugin config that may be claimed at once.
    pub per_plugin_config: usize,
    /// Delay before the first retry; doubled for each further one.
    pub retry_base: Duration,
    /// How long an idempotency key keeps deduplicating.
    pub key_retention: Duration,
    /// How long dead and cancelled jobs are kept.
    pub dead_retention: Duration,
    /// How often idle workers look at the queue without a wake-up (other processes wake them
    /// through the data directory's socket, so this only bounds a lost wake-up).
    pub idle_poll: Duration,
}

/// Limits applied by capture to each request.
#[derive(Clone, Copy, Debug)]
pub struct CaptureLimits {
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_event_bytes: usize,
    pub max_events_per_request: usize,
    /// Memory for bodies and decoded events of requests in flight, together.
    pub max_inflight_bytes: usize,
    pub body_timeout: Duration,
    /// Requests per second per client address; 0 for none.
    pub rate_per_ip: u32,
    /// Events per second per project token; 0 for none.
    pub rate_per_token: u32,
}

/// The connection limits and timeouts of a listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Connections from one client address at once; 0 for no per-address cap.
    pub max_connections_per_ip: usize,
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it too.
    pub header_timeout: Duration,
    /// How long shutdown waits for requests in flight before closing their connections.
    pub drain_timeout: Duration,
}
