//! What `/_ready` shows about the pipeline, updated as it works (atomics and a short lock).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::ids::TeamId;

#[derive(Default)]
pub struct PipelineStatus {
    position: AtomicU64,
    delivered: AtomicU64,
    events_stored: AtomicU64,
    duplicates_skipped: AtomicU64,
    quarantined: AtomicU64,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Teams whose events wait for their plugins, and why.
    waiting: Mutex<BTreeMap<TeamId, String>>,
    /// When the pipeline's loops last went round, in ms after [`clock_base`].
    last_beat_ms: AtomicU64,
}

/// The base of the pipeline's heartbeat clock (monotonic).
fn clock_base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

#[derive(Debug, Serialize)]
pub struct PipelineReport {
    pub sink: &'static str,
    /// Last queue position the sink has committed.
    pub position: u64,
    /// Last queue position whose after-write deliveries are queued.
    pub delivered: u64,
    /// Events the sink inserted since start-up.
    pub events_stored: u64,
    /// Events the sink already held (a client re-sent them), skipped since start-up.
    pub duplicates_skipped: u64,
    /// Unreadable queue records set aside since start-up (`appliance queue quarantine` lists
    /// them).
    pub quarantined: u64,
    pub healthy: bool,
    pub last_error: Option<String>,
    /// Teams whose events wait (deferred) for their plugins, and why.
    pub waiting_teams: BTreeMap<TeamId, String>,
}

impl PipelineStatus {
    /// Notes that a loop of the pipeline went round (read, write, or a wait between retries).
    pub(super) fn beat(&self) {
        let ms = clock_base().elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the pipeline last went round; the service watchdog pings only while this
    /// stays short.
    pub fn since_beat(&self) -> std::time::Duration {
        let now = clock_base().elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)),
        )
    }

    pub fn report(&self, sink: &'static str) -> PipelineReport {
        PipelineReport {
            sink,
            position: self.position.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            events_stored: self.events_stored.load(Ordering::Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            healthy: self.healthy.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            waiting_teams: self.waiting.lock().map(|w| w.clone()).unwrap_or_default(),
        }
    }

    pub(super) fn set_waiting(&self, teams: BTreeMap<TeamId, String>) {
        if let Ok(mut slot) = self.waiting.lock() {
            *slot = teams;
        }
    }

    pub(super) fn set_positions(&self, sink: u64, delivered: u64) {
        self.position.store(sink, Ordering::Relaxed);
        self.delivered.store(delivered, Ordering::Relaxed);
    }

    /// Counts one sink write that took `took` (metrics and `/_ready`): `total` events, of which
    /// the sink inserted `stored` (`None`: the write failed).
    pub(super) fn record_write(
        &self,
        sink: &'static str,
        took: std::time::Duration,
        total: usize,
        stored: Option<usize>,
    ) {
        use crate::telemetry::names;
        metrics::histogram!(names::SINK_WRITE_SECONDS, "sink" => sink).record(took.as_secs_f64());
        let Some(stored) = stored else {
            metrics::counter!(names::SINK_ERRORS, "sink" => sink).increment(1);
            return;
        };
        self.count_written(stored, total - stored);
        metrics::histogram!(names::SINK_BATCH_EVENTS, "sink" => sink).record(total as f64);
        metrics::counter!(names::SINK_EVENTS, "sink" => sink, "outcome" => "stored")
            .increment(stored as u64);
        metrics::counter!(names::SINK_EVENTS, "sink" => sink, "outcome" => "duplicate")
            .increment((total - stored) as u64);
    }

    fn count_written(&self, stored: usize, skipped: usize) {
        self.events_stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        self.duplicates_skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
    }

    pub(super) fn count_quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn set_error(&self, error: Option<String>) {
        self.healthy.store(error.is_none(), Ordering::Relaxed);
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = error;
        }
    }
}
