//! The pipeline: drains the ingest queue into the sink.
//!
//! Owns: the rules that normalise an event ([`normalize`], [`timestamp`]; applied where events
//! enter the queue), and the loop that reads batches after the sink's committed position, hands
//! them to the sink, and trims the queue behind it, retrying with backoff while the sink fails.
//! Later steps (GeoIP, persons, the plugin chain, after-write deliveries) slot in between
//! reading and writing.
//! Must never: trim a batch from the queue before the sink has durably committed it, or skip one.

pub mod normalize;
pub mod timestamp;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::plugins::Chains;
use crate::sinks::Sink;
use crate::store::{Store, StoreError};

/// How often the queue is trimmed behind the sink: each trim is an fsync, and the sink's own
/// position makes a late trim harmless.
const TRIM_INTERVAL: Duration = Duration::from_millis(500);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// While idle the pipeline looks at the queue this often even without a wake-up, so batches
/// appended by another process (a future source) are not left waiting.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What `/_ready` shows about the pipeline; updated as it works.
#[derive(Default)]
pub struct PipelineStatus {
    position: AtomicU64,
    events_written: AtomicU64,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
}

#[derive(Serialize)]
pub struct PipelineReport {
    pub sink: &'static str,
    /// Last queue position the sink has committed.
    pub position: u64,
    /// Events written since start-up (replayed duplicates included, skipped by the sink).
    pub events_written: u64,
    pub healthy: bool,
    pub last_error: Option<String>,
}

impl PipelineStatus {
    pub fn report(&self, sink: &'static str) -> PipelineReport {
        PipelineReport {
            sink,
            position: self.position.load(Ordering::Relaxed),
            events_written: self.events_written.load(Ordering::Relaxed),
            healthy: self.healthy.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn set_error(&self, error: Option<String>) {
        self.healthy.store(error.is_none(), Ordering::Relaxed);
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = error;
        }
    }
}

/// When to stop: `None` while running; `Some(deadline)` to drain what is queued, giving up at
/// the deadline (what is left stays durable in the queue for the next start).
pub type DrainSignal = watch::Receiver<Option<Instant>>;

pub struct Pipeline {
    pub store: Store,
    pub sink: Arc<dyn Sink>,
    pub batch_events: usize,
    /// How long a part-filled batch may wait to fill before it is written.
    pub linger: Duration,
    /// The teams' `process-event` plugin chains, run on each batch before the sink write.
    pub plugins: Arc<Mutex<Chains>>,
    pub status: Arc<PipelineStatus>,
    /// Notified by the ingest writer after each commit.
    pub wake: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Sink(#[from] crate::sinks::SinkError),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Pipeline {
    pub async fn run(self, mut drain: DrainSignal) {
        let mut position = self.initial_position().await;
        let mut trimmed = 0u64;
        let mut last_trim = Instant::now();
        let mut backoff = RETRY_MIN;
        loop {
            let deadline = *drain.borrow();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!(
                    position,
                    "shutdown deadline reached; the rest stays queued for the next start"
                );
                break;
            }
            match self.step(position).await {
                Ok(Some((reached, events))) => {
                    position = reached;
                    backoff = RETRY_MIN;
                    self.status.set_error(None);
                    if last_trim.elapsed() >= TRIM_INTERVAL {
                        trimmed = self.trim(position, trimmed).await;
                        last_trim = Instant::now();
                    }
                    // A part-filled batch means the sink is keeping up: let the next batch fill
                    // for a moment rather than commit (and fsync) a trickle of small ones.
                    if events < self.batch_events && deadline.is_none() {
                        tokio::select! {
                            _ = tokio::time::sleep(self.linger) => {}
                            _ = drain.changed() => {}
                        }
                    }
                }
                Ok(None) => {
                    trimmed = self.trim(position, trimmed).await;
                    if deadline.is_some() {
                        break;
                    }
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = drain.changed() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "pipeline step failed; retrying");
                    self.status.set_error(Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = drain.changed() => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        self.trim(position, trimmed).await;
    }

    /// The sink's committed position, retried until the sink answers.
    async fn initial_position(&self) -> u64 {
        let mut backoff = RETRY_MIN;
        loop {
            match self.sink.position().await {
                Ok(p) => {
                    self.status.position.store(p, Ordering::Relaxed);
                    self.status.set_error(None);
                    return p;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the sink position; retrying");
                    self.status.set_error(Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Moves one batch of events from the queue to the sink and returns the position reached and
    /// the number of events; `None` when the queue is empty.
    async fn step(&self, position: u64) -> Result<Option<(u64, usize)>, StepError> {
        let store = self.store.clone();
        let max = self.batch_events;
        let queued =
            tokio::task::spawn_blocking(move || store.read_ingest_after(position, max)).await??;
        let Some(last) = queued.last().map(|q| q.seq) else {
            return Ok(None);
        };
        let mut batches: Vec<_> = queued.into_iter().map(|q| q.batch).collect();
        let chains = self.plugins.clone();
        batches = tokio::task::spawn_blocking(move || {
            let mut chains = chains.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(e) = chains.refresh() {
                tracing::error!(error = %e, "cannot reload plugin configs; keeping the previous chains");
            }
            for batch in &mut batches {
                if chains.has_chain(batch.team_id) {
                    chains.process(batch);
                }
            }
            batches
        })
        .await?;
        let count: usize = batches.iter().map(|b| b.events.len()).sum();
        self.sink.write(batches, last).await?;
        self.status.position.store(last, Ordering::Relaxed);
        self.status
            .events_written
            .fetch_add(count as u64, Ordering::Relaxed);
        Ok(Some((last, count)))
    }

    /// Trims the queue through `position` if that is past what was trimmed; returns the new mark.
    async fn trim(&self, position: u64, trimmed: u64) -> u64 {
        if position <= trimmed {
            return trimmed;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.trim_ingest_through(position)).await {
            Ok(Ok(_)) => position,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "trimming the ingest queue failed; will retry");
                trimmed
            }
            Err(e) => {
                tracing::warn!(error = %e, "trimming the ingest queue failed; will retry");
                trimmed
            }
        }
    }
}
