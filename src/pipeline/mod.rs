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
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::event::IngestBatch;
use crate::jobs::JobQueue;
use crate::plugins::{tasks, Catalog, Chains};
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

/// Exponential backoff between the tries of a failing step.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: RETRY_MIN }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }

    /// Reports the failure (log and `/_ready`) and waits before the next try; a change of the
    /// drain signal, if one is given, cuts the wait short.
    async fn wait(
        &mut self,
        status: &PipelineStatus,
        what: &str,
        error: impl std::fmt::Display,
        drain: Option<&mut DrainSignal>,
    ) {
        tracing::error!(error = %error, retry_in_ms = self.next.as_millis() as u64, "{what} failed; retrying");
        status.set_error(Some(error.to_string()));
        match drain {
            Some(drain) => {
                tokio::select! {
                    _ = tokio::time::sleep(self.next) => {}
                    _ = drain.changed() => {}
                }
            }
            None => tokio::time::sleep(self.next).await,
        }
        self.next = (self.next * 2).min(RETRY_MAX);
    }
}

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
    /// Where written events are handed to `on-event`/`export-events` plugins.
    pub deliveries: Option<Deliveries>,
}

/// After-write deliveries: written events become jobs of the plugins that export them.
pub struct Deliveries {
    pub catalog: Arc<Catalog>,
    pub queue: JobQueue,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Batches read from the queue and through the plugins, waiting for the sink.
struct Prepared {
    batches: Arc<Vec<IngestBatch>>,
    /// Queue position of the last batch.
    last: u64,
    events: usize,
}

/// How many prepared batches may wait for the sink: enough to keep both stages busy.
const PREPARED_AHEAD: usize = 2;

impl Pipeline {
    /// Runs the two stages until drained: one reads the queue and runs the plugin chains, the
    /// other writes to the sink, so a batch's plugins run while the previous batch is written.
    pub async fn run(self, drain: DrainSignal) {
        let this = Arc::new(self);
        let mut start_drain = drain.clone();
        let Some(start) = this.initial_position(&mut start_drain).await else {
            return;
        };
        let (prepared_tx, prepared_rx) = mpsc::channel(PREPARED_AHEAD);
        let reader = tokio::spawn(this.clone().read_stage(start, prepared_tx, drain.clone()));
        this.write_stage(start, prepared_rx, drain).await;
        if let Err(e) = reader.await {
            tracing::error!(error = %e, "the pipeline's read stage failed");
        }
    }

    /// Reads batches after `position`, runs the plugin chains, and hands them on in order.
    async fn read_stage(
        self: Arc<Self>,
        mut position: u64,
        out: mpsc::Sender<Prepared>,
        mut drain: DrainSignal,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let deadline = *drain.borrow();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            match self.prepare(position).await {
                Ok(Some(prepared)) => {
                    backoff.reset();
                    position = prepared.last;
                    let part_filled = prepared.events < self.batch_events;
                    if out.send(prepared).await.is_err() {
                        break;
                    }
                    // A part-filled batch means the pipeline is keeping up: let the next batch
                    // fill for a moment rather than commit (and fsync) a trickle of small ones.
                    if part_filled && deadline.is_none() {
                        tokio::select! {
                            _ = tokio::time::sleep(self.linger) => {}
                            _ = drain.changed() => {}
                        }
                    }
                }
                Ok(None) => {
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
                    backoff
                        .wait(
                            &self.status,
                            "reading the ingest queue",
                            e,
                            Some(&mut drain),
                        )
                        .await
                }
            }
        }
    }

    /// Writes prepared batches to the sink in order, retrying each until it is committed, and
    /// trims the queue behind the sink.
    async fn write_stage(
        &self,
        mut position: u64,
        mut input: mpsc::Receiver<Prepared>,
        mut drain: DrainSignal,
    ) {
        let mut trimmed = 0u64;
        let mut last_trim = Instant::now();
        'batches: while let Some(prepared) = input.recv().await {
            let mut backoff = Backoff::default();
            loop {
                if drain.borrow().is_some_and(|d| Instant::now() >= d) {
                    tracing::warn!(
                        position,
                        "shutdown deadline reached; the rest stays queued for the next start"
                    );
                    break 'batches;
                }
                match self
                    .sink
                    .write(prepared.batches.clone(), prepared.last)
                    .await
                {
                    Ok(()) => break,
                    Err(e) => {
                        backoff
                            .wait(&self.status, "writing to the sink", e, Some(&mut drain))
                            .await
                    }
                }
            }
            if !self.queue_deliveries(&prepared, &mut drain).await {
                break 'batches;
            }
            position = prepared.last;
            self.status.position.store(position, Ordering::Relaxed);
            self.status
                .events_written
                .fetch_add(prepared.events as u64, Ordering::Relaxed);
            self.status.set_error(None);
            // Trim when caught up, and at least every TRIM_INTERVAL under load.
            if input.is_empty() || last_trim.elapsed() >= TRIM_INTERVAL {
                trimmed = self.trim(position, trimmed).await;
                last_trim = Instant::now();
            }
        }
        self.trim(position, trimmed).await;
    }

    /// Where reading starts: after the sink's committed position, or earlier if the deliveries
    /// of written batches were not yet queued when the last run stopped (those batches are read
    /// again; the sink skips what it has). Retried until the sink answers; `None` if the
    /// shutdown deadline passes first.
    async fn initial_position(&self, drain: &mut DrainSignal) -> Option<u64> {
        let mut backoff = Backoff::default();
        loop {
            if drain.borrow().is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            let store = self.store.clone();
            let delivered = tokio::task::spawn_blocking(move || store.delivered_position()).await;
            let step = match (self.sink.position().await, delivered) {
                (Ok(sink), Ok(Ok(delivered))) => Ok((sink, delivered)),
                (Err(e), _) => Err(e.to_string()),
                (_, Ok(Err(e))) => Err(e.to_string()),
                (_, Err(e)) => Err(e.to_string()),
            };
            match step {
                Ok((sink, delivered)) => {
                    self.status.position.store(sink, Ordering::Relaxed);
                    self.status.set_error(None);
                    return Some(delivered.map_or(sink, |d| d.min(sink)));
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "reading the sink position", e, Some(drain))
                        .await
                }
            }
        }
    }

    /// Queues the deliveries of a written batch, retrying until they are durable; `false` if
    /// the shutdown deadline passed first (the batch is then read again at the next start).
    async fn queue_deliveries(&self, prepared: &Prepared, drain: &mut DrainSignal) -> bool {
        let Some(deliveries) = &self.deliveries else {
            return true;
        };
        let mut backoff = Backoff::default();
        loop {
            if drain.borrow().is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            let (catalog, queue) = (deliveries.catalog.clone(), deliveries.queue.clone());
            let (batches, last) = (prepared.batches.clone(), prepared.last);
            let result = tokio::task::spawn_blocking(move || {
                let jobs = tasks::deliveries(&catalog, &batches).map_err(|e| e.to_string())?;
                if jobs.is_empty() {
                    return Ok(());
                }
                queue
                    .enqueue_marking(jobs, Some(last))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await;
            match result {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => {
                    backoff
                        .wait(&self.status, "queuing deliveries", e, Some(drain))
                        .await
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "queuing deliveries", e, Some(drain))
                        .await
                }
            }
        }
    }

    /// Reads the batches after `position` and runs the plugin chains over them; `None` when the
    /// queue holds nothing after `position`.
    async fn prepare(&self, position: u64) -> Result<Option<Prepared>, ReadError> {
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
        let events = batches.iter().map(|b| b.events.len()).sum();
        Ok(Some(Prepared {
            batches: Arc::new(batches),
            last,
            events,
        }))
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
