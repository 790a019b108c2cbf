//! The pipeline: drains the ingest queue through the plugins into the sink, then queues the
//! after-write deliveries.
//!
//! Owns: the loop that reads batches after the positions ([`positions`]), runs the teams' plugin
//! chains, writes to the sink, queues deliveries of what the sink inserted, trims the queue
//! behind both, quarantines records it cannot read, and retries a failing step with backoff.
//! Must never: trim a batch before the sink has durably committed it and its deliveries are
//! queued; skip a batch; run the plugins again over a batch the sink already holds.

mod backoff;
mod deliver;
mod follow;
mod isolate;
mod persons;
pub mod positions;
mod prepare;
mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::ids::TeamId;
use crate::jobs::JobQueue;
use crate::person::{PersonColumns, PersonUpdates};
use crate::plugins::{Catalog, Chains};
use crate::shutdown::Shutdown;
use crate::sinks::{Sink, SinkError, SinkWrite, StoredRows, Written};
use crate::store::{QueuedBatch, ReadLimits, Store, StoreError};
use backoff::Backoff;
pub use follow::{FollowMarks, Follower};
pub use persons::PersonEngine;
use positions::Positions;
pub use status::{PipelineReport, PipelineStatus};

/// How often the queue is trimmed behind the sink under load: each trim is an fsync, and the
/// sink's own position makes a late trim harmless.
const TRIM_INTERVAL: Duration = Duration::from_millis(500);
/// While idle the pipeline looks at the queue this often even without a wake-up, so batches
/// appended by another process are not left waiting.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How many prepared batches may wait for the sink: enough to keep both stages busy.
const PREPARED_AHEAD: usize = 2;
/// The least time between two starts of the stages after a conflict in a shared person store.
const RESTART_PAUSE: Duration = Duration::from_millis(50);
/// While deferred batches wait for their team's plugins, the queue is looked at this often.
const BACKLOG_POLL: Duration = Duration::from_millis(200);

pub struct Pipeline {
    pub store: Store,
    pub sink: Arc<dyn Sink>,
    /// How much one read of the queue (one sink transaction) may hold.
    pub read_limits: ReadLimits,
    /// How long a part-filled batch may wait to fill before it is written.
    pub linger: Duration,
    /// The teams' `process-event` plugin chains, run on each batch before the sink write.
    pub plugins: Arc<Mutex<Chains>>,
    pub status: Arc<PipelineStatus>,
    /// Notified by the ingest writer after each commit.
    pub wake: Arc<Notify>,
    /// Where written events are handed to `on-event`/`export-events` plugins.
    pub deliveries: Option<Deliveries>,
    /// The person step, run on each batch after the plugins.
    pub persons: Arc<Mutex<PersonEngine>>,
    /// Whether the sink is a person store shared with other boxes (`SHARED_PERSONS`): persons
    /// other boxes moved on are read from it before each step.
    pub shared_persons: bool,
    /// Set when other sinks follow this one: each write is then also kept in the follow log,
    /// and this is notified after it.
    pub followers: Option<Arc<Notify>>,
}

/// Why the write stage stopped.
enum StageEnd {
    /// Shutdown, or its deadline: the rest stays queued for the next start.
    Stopped,
    /// A person store shared with other boxes holds persons another box changed after a step
    /// read them (what it said): both stages start again from the committed positions.
    Restart(String),
}

/// After-write deliveries: written events become jobs of the plugins that export them.
pub struct Deliveries {
    pub catalog: Arc<Catalog>,
    pub queue: JobQueue,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Plugin(#[from] crate::plugins::PluginError),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One read of the queue (and of deferred batches whose team is ready again), for the sink.
pub(super) struct Prepared {
    /// Batches the sink holds already, whose deliveries are rebuilt from its rows.
    redeliver: Vec<QueuedBatch>,
    /// The rows the sink stored for each batch of `redeliver`.
    redeliver_rows: StoredRows,
    /// The person columns of those rows, recomputed (for the followers).
    redeliver_columns: Vec<Vec<PersonColumns>>,
    /// Batches through the plugins and the person step, to write.
    process: Arc<Vec<QueuedBatch>>,
    /// For each event of `process`, its person columns.
    columns: Arc<Vec<Vec<PersonColumns>>>,
    /// What the person step changed (committed with the deliveries).
    persons: Arc<PersonUpdates>,
    /// For each batch of `process`: whether its deliveries are to be queued.
    deliver: Vec<bool>,
    /// Deferred batches this completes (removed with the deliveries' transaction).
    undefer: Vec<(TeamId, u64)>,
    /// Queue position the sink reaches with this write.
    last: u64,
    events: usize,
}

impl Pipeline {
    /// Runs the two stages until drained: one reads the queue and runs the plugin chains, the
    /// other writes to the sink and queues deliveries, so a batch's plugins run while the
    /// previous batch is written.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        // Restarts one after another without the delivered mark moving: a conflict the import
        // does not resolve, waited out ever longer and reported, not spun on.
        let mut stuck = Backoff::default();
        let mut restarted_at: Option<u64> = None;
        loop {
            let mut start_shutdown = shutdown.clone();
            let Some(start) = this.initial_positions(&mut start_shutdown).await else {
                return;
            };
            if restarted_at.is_some_and(|at| start.delivered > at) {
                stuck.reset();
            }
            tracing::debug!(?start, "pipeline positions at start");
            let (prepared_tx, prepared_rx) = mpsc::channel(PREPARED_AHEAD);
            let reader = tokio::spawn(this.clone().read_stage(
                start,
                prepared_tx,
                shutdown.clone(),
            ));
            // The write stage's end closes the channel, which stops the read stage.
            let end = this.write_stage(start, prepared_rx, shutdown.clone()).await;
            if let Err(e) = reader.await {
                tracing::error!(error = %e, "the pipeline's read stage failed");
            }
            match end {
                StageEnd::Stopped => return,
                StageEnd::Restart(conflict) => {
                    // As after a crash, but without one: the steps not committed are made
                    // again from the queue, over what the shared store holds now.
                    this.persons
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .abandon();
                    if restarted_at == Some(start.delivered) {
                        let mut shutdown = shutdown.clone();
                        stuck
                            .wait(&this.status, "writing persons", conflict, &mut shutdown)
                            .await;
                    } else {
                        tokio::time::sleep(RESTART_PAUSE).await;
                    }
                    restarted_at = Some(start.delivered);
                }
            }
        }
    }

    /// The marks at start-up, retried until the sink answers; `None` if the shutdown deadline
    /// passes first.
    async fn initial_positions(&self, shutdown: &mut Shutdown) -> Option<Positions> {
        let mut backoff = Backoff::default();
        loop {
            if shutdown.deadline_passed() {
                return None;
            }
            let store = self.store.clone();
            let delivered = tokio::task::spawn_blocking(move || store.delivered_position());
            let step: Result<Positions, StepError> = async {
                let sink = self.sink.position().await?;
                let delivered = delivered.await??;
                Ok(Positions::at_start(sink, delivered))
            }
            .await;
            match step {
                Ok(positions) => {
                    self.status
                        .set_positions(positions.sink, positions.delivered);
                    self.status.set_error(None);
                    return Some(positions);
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "reading the positions", e, shutdown)
                        .await
                }
            }
        }
    }

    /// Reads after the lower mark, sets aside unreadable records, runs the plugin chains over
    /// the batches the sink does not hold yet, and hands everything on in order.
    async fn read_stage(
        self: Arc<Self>,
        start: Positions,
        out: mpsc::Sender<Prepared>,
        mut shutdown: Shutdown,
    ) {
        let mut position = start.read_after();
        let mut backoff = Backoff::default();
        let mut deferred = loop {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.deferred_positions()).await {
                Ok(Ok(found)) => break found,
                Ok(Err(e)) => {
                    backoff
                        .wait(&self.status, "reading deferred batches", e, &mut shutdown)
                        .await
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "reading deferred batches", e, &mut shutdown)
                        .await
                }
            }
            if shutdown.deadline_passed() {
                return;
            }
        };
        loop {
            if shutdown.deadline_passed() || out.is_closed() {
                break;
            }
            self.status.beat();
            let draining = shutdown.is_draining();
            match self.prepare(&start, position, &mut deferred).await {
                Ok(Some(prepared)) => {
                    backoff.reset();
                    position = prepared.last;
                    let part_filled = prepared.events < self.read_limits.events;
                    if out.send(prepared).await.is_err() {
                        break;
                    }
                    // A part-filled batch means the pipeline is keeping up: let the next batch
                    // fill for a moment rather than commit (and fsync) a trickle of small ones.
                    if part_filled && !draining {
                        tokio::select! {
                            _ = tokio::time::sleep(self.linger) => {}
                            _ = shutdown.changed() => {}
                            _ = out.closed() => {}
                        }
                    }
                }
                Ok(None) => {
                    if draining {
                        break;
                    }
                    // Idle: dead letters an operator asked to resend go now.
                    if let Err(e) = isolate::resend(&*self.sink, &self.store).await {
                        tracing::warn!(error = %e, "resending dead letters failed; will retry");
                    }
                    // Deferred batches wait for their team's plugins: look again soon.
                    let poll = if self.store.deferred_teams().is_empty() {
                        IDLE_POLL
                    } else {
                        BACKLOG_POLL
                    };
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.changed() => {}
                        _ = tokio::time::sleep(poll) => {}
                        _ = out.closed() => {}
                    }
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "reading the ingest queue", e, &mut shutdown)
                        .await
                }
            }
        }
    }

    /// Writes prepared batches to the sink in order, queues their deliveries, and trims the
    /// queue behind both; each step is retried until it succeeds.
    async fn write_stage(
        &self,
        mut positions: Positions,
        mut input: mpsc::Receiver<Prepared>,
        mut shutdown: Shutdown,
    ) -> StageEnd {
        let mut trimmed = 0u64;
        let mut last_trim = Instant::now();
        let mut end = StageEnd::Stopped;
        while let Some(prepared) = input.recv().await {
            self.status.beat();
            let written = match self.write(&positions, &prepared, &mut shutdown).await {
                Ok(written) => written,
                Err(stop) => {
                    end = stop;
                    break;
                }
            };
            positions.stored(prepared.last);
            if written.count() > 0 {
                crate::failpoint::hit("pipeline.after_sink_write");
            }
            if !self.deliver(&prepared, &written, &mut shutdown).await {
                break;
            }
            self.persons
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .committed(prepared.last);
            if let Some(followers) = &self.followers {
                followers.notify_waiters();
            }
            positions.delivered(prepared.last);
            self.status
                .set_positions(positions.sink, positions.delivered);
            self.status.set_error(None);
            // Trim when caught up, and at least every TRIM_INTERVAL under load.
            if input.is_empty() || last_trim.elapsed() >= TRIM_INTERVAL {
                trimmed = self.trim(positions.trimmable(), trimmed).await;
                last_trim = Instant::now();
            }
        }
        self.trim(positions.trimmable(), trimmed).await;
        end
    }

    /// Writes the batches the sink does not hold (and moves its position past unreadable
    /// records); stops if the shutdown deadline passed first, or for a restart if a shared
    /// person store holds persons changed since the step.
    async fn write(
        &self,
        positions: &Positions,
        prepared: &Prepared,
        shutdown: &mut Shutdown,
    ) -> Result<Written, StageEnd> {
        if prepared.process.is_empty()
            && prepared.last <= positions.sink
            && !prepared.persons.touches_sinks()
        {
            return Ok(Written::default());
        }
        let mut backoff = Backoff::default();
        let sink = self.sink.name();
        loop {
            if shutdown.deadline_passed() {
                tracing::warn!(
                    position = positions.sink,
                    "shutdown deadline reached; the rest stays queued for the next start"
                );
                return Err(StageEnd::Stopped);
            }
            if let Some(pause) = crate::failpoint::pause("pipeline.before_sink_write") {
                tokio::time::sleep(pause).await;
            }
            let started = Instant::now();
            let write = SinkWrite {
                batches: prepared.process.clone(),
                columns: prepared.columns.clone(),
                persons: prepared.persons.clone(),
            };
            let result =
                isolate::write_setting_aside(&*self.sink, &self.store, write, prepared.last).await;
            let total: usize = prepared.process.iter().map(|q| q.batch.events.len()).sum();
            let stored = result.as_ref().ok().map(Written::count);
            self.status
                .record_write(sink, started.elapsed(), total, stored);
            match result {
                Ok(written) => {
                    return Ok(written);
                }
                Err(isolate::StepFailure::Sink(SinkError::Conflict { detail, .. })) => {
                    tracing::info!(%detail, "persons changed on another box");
                    metrics::counter!(crate::telemetry::names::PERSON_CONFLICTS).increment(1);
                    return Err(StageEnd::Restart(detail));
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "writing to the sink", e, shutdown)
                        .await
                }
            }
        }
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
