//! The pipeline: drains the ingest queue through the plugins into the sink, then queues the
//! after-write deliveries.
//!
//! Owns: the loop that reads batches after the positions ([`positions`]), runs the teams' plugin
//! chains, writes to the sink, queues deliveries of what the sink inserted, trims the queue
//! behind both, quarantines records it cannot read, and retries a failing step with backoff.
//! Must never: trim a batch before the sink has durably committed it and its deliveries are
//! queued; skip a batch; run the plugins again over a batch the sink already holds.

mod backoff;
pub mod positions;
mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::jobs::JobQueue;
use crate::plugins::tasks::{self, ToDeliver};
use crate::plugins::{Catalog, Chains};
use crate::shutdown::Shutdown;
use crate::sinks::{Sink, StoredRows, Written};
use crate::store::{QueuedBatch, ReadLimits, Store, StoreError};
use backoff::Backoff;
use positions::{Plan, Positions};
pub use status::{PipelineReport, PipelineStatus};

/// How often the queue is trimmed behind the sink under load: each trim is an fsync, and the
/// sink's own position makes a late trim harmless.
const TRIM_INTERVAL: Duration = Duration::from_millis(500);
/// While idle the pipeline looks at the queue this often even without a wake-up, so batches
/// appended by another process are not left waiting.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How many prepared batches may wait for the sink: enough to keep both stages busy.
const PREPARED_AHEAD: usize = 2;

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
    Sink(#[from] crate::sinks::SinkError),
    #[error("{0}")]
    Plugin(#[from] crate::plugins::PluginError),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One read of the queue, ready for the sink.
struct Prepared {
    /// Batches the sink holds already, whose deliveries are rebuilt from its rows.
    redeliver: Vec<QueuedBatch>,
    /// Batches through the plugins, to write; in queue order, after `redeliver`.
    process: Arc<Vec<QueuedBatch>>,
    /// Batches above this position have their deliveries queued (none at or below it).
    deliver_after: u64,
    /// Queue position of the last record read (unreadable ones included).
    last: u64,
    events: usize,
}

impl Pipeline {
    /// Runs the two stages until drained: one reads the queue and runs the plugin chains, the
    /// other writes to the sink and queues deliveries, so a batch's plugins run while the
    /// previous batch is written.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        let mut start_shutdown = shutdown.clone();
        let Some(start) = this.initial_positions(&mut start_shutdown).await else {
            return;
        };
        tracing::debug!(?start, "pipeline positions at start");
        let (prepared_tx, prepared_rx) = mpsc::channel(PREPARED_AHEAD);
        let reader = tokio::spawn(
            this.clone()
                .read_stage(start, prepared_tx, shutdown.clone()),
        );
        this.write_stage(start, prepared_rx, shutdown).await;
        if let Err(e) = reader.await {
            tracing::error!(error = %e, "the pipeline's read stage failed");
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
        loop {
            if shutdown.deadline_passed() {
                break;
            }
            let draining = shutdown.is_draining();
            match self.prepare(&start, position).await {
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
                        }
                    }
                }
                Ok(None) => {
                    if draining {
                        break;
                    }
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.changed() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
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

    /// Reads the records after `position`; `None` when there are none.
    async fn prepare(
        &self,
        start: &Positions,
        position: u64,
    ) -> Result<Option<Prepared>, StepError> {
        let store = self.store.clone();
        let limits = self.read_limits;
        let read = tokio::task::spawn_blocking(move || store.read_ingest_after(position, limits))
            .await??;
        let Some(last) = read.last else {
            return Ok(None);
        };
        for bad in &read.unreadable {
            self.quarantine(bad.seq, &bad.reason).await?;
        }
        let (mut redeliver, mut process) = (Vec::new(), Vec::new());
        for queued in read.batches {
            match start.plan(queued.seq) {
                Plan::Process { .. } => process.push(queued),
                Plan::Redeliver => redeliver.push(queued),
                Plan::Done => {}
            }
        }
        if !process.is_empty() {
            let chains = self.plugins.clone();
            process = tokio::task::spawn_blocking(move || {
                let mut chains = chains.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Err(e) = chains.refresh() {
                    tracing::error!(error = %e, "cannot reload plugin configs; keeping the previous chains");
                }
                for queued in &mut process {
                    if chains.has_chain(queued.batch.team_id) {
                        chains.process(&mut queued.batch);
                    }
                }
                process
            })
            .await?;
        }
        let events = process
            .iter()
            .chain(&redeliver)
            .map(|q| q.batch.events.len())
            .sum();
        Ok(Some(Prepared {
            redeliver,
            process: Arc::new(process),
            deliver_after: start.delivered,
            last,
            events,
        }))
    }

    /// Sets an unreadable queue record aside, visibly, so the events after it flow.
    async fn quarantine(&self, seq: u64, reason: &str) -> Result<(), StepError> {
        tracing::error!(
            position = seq,
            reason,
            "an ingest queue record cannot be read; it is quarantined and the pipeline goes on"
        );
        let store = self.store.clone();
        let why = reason.to_owned();
        tokio::task::spawn_blocking(move || store.quarantine_ingest(seq, &why)).await??;
        self.status.count_quarantined();
        Ok(())
    }

    /// Writes prepared batches to the sink in order, queues their deliveries, and trims the
    /// queue behind both; each step is retried until it succeeds.
    async fn write_stage(
        &self,
        mut positions: Positions,
        mut input: mpsc::Receiver<Prepared>,
        mut shutdown: Shutdown,
    ) {
        let mut trimmed = 0u64;
        let mut last_trim = Instant::now();
        while let Some(prepared) = input.recv().await {
            let Some(written) = self.write(&positions, &prepared, &mut shutdown).await else {
                break;
            };
            positions.stored(prepared.last);
            crate::failpoint::hit("pipeline.after_sink_write");
            if !self.deliver(&prepared, &written, &mut shutdown).await {
                break;
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
    }

    /// Writes the batches the sink does not hold (and moves its position past unreadable
    /// records); `None` if the shutdown deadline passed first.
    async fn write(
        &self,
        positions: &Positions,
        prepared: &Prepared,
        shutdown: &mut Shutdown,
    ) -> Option<Written> {
        if prepared.last <= positions.sink {
            return Some(Written::default());
        }
        let mut backoff = Backoff::default();
        loop {
            if shutdown.deadline_passed() {
                tracing::warn!(
                    position = positions.sink,
                    "shutdown deadline reached; the rest stays queued for the next start"
                );
                return None;
            }
            match self
                .sink
                .write(prepared.process.clone(), prepared.last)
                .await
            {
                Ok(written) => {
                    let stored = written.count();
                    let total: usize = prepared.process.iter().map(|q| q.batch.events.len()).sum();
                    self.status.count_written(stored, total - stored);
                    return Some(written);
                }
                Err(e) => {
                    backoff
                        .wait(&self.status, "writing to the sink", e, shutdown)
                        .await
                }
            }
        }
    }

    /// Queues the deliveries of what the write inserted and of the stored batches being
    /// redelivered, retrying until they are durable; `false` if the shutdown deadline passed
    /// first (the batches are then read again at the next start, and not processed again).
    async fn deliver(
        &self,
        prepared: &Prepared,
        written: &Written,
        shutdown: &mut Shutdown,
    ) -> bool {
        let Some(deliveries) = &self.deliveries else {
            return true;
        };
        let mut backoff = Backoff::default();
        loop {
            if shutdown.deadline_passed() {
                return false;
            }
            match self.queue_deliveries(deliveries, prepared, written).await {
                Ok(()) => return true,
                Err(e) => {
                    backoff
                        .wait(&self.status, "queuing deliveries", e, shutdown)
                        .await
                }
            }
        }
    }

    async fn queue_deliveries(
        &self,
        deliveries: &Deliveries,
        prepared: &Prepared,
        written: &Written,
    ) -> Result<(), StepError> {
        let catalog = deliveries.catalog.clone();
        let teams = tokio::task::spawn_blocking(move || tasks::exporting_teams(&catalog)).await??;
        let after = prepared.deliver_after;
        let wanted = move |q: &QueuedBatch| teams.contains(&q.batch.team_id);
        let redeliver: Vec<QueuedBatch> = prepared
            .redeliver
            .iter()
            .filter(|q| wanted(q))
            .cloned()
            .collect();
        let fresh = prepared.process.iter().any(|q| q.seq > after && wanted(q));
        if redeliver.is_empty() && !fresh {
            return Ok(());
        }
        let stored: StoredRows = if redeliver.is_empty() {
            Vec::new()
        } else {
            self.sink.stored_rows(Arc::new(redeliver.clone())).await?
        };
        let (catalog, queue) = (deliveries.catalog.clone(), deliveries.queue.clone());
        let (process, inserted, last) = (
            prepared.process.clone(),
            written.inserted.clone(),
            prepared.last,
        );
        tokio::task::spawn_blocking(move || {
            let mut items = Vec::new();
            for (queued, rows) in redeliver.iter().zip(&stored) {
                items.push(ToDeliver::of(&queued.batch, rows.iter().flatten()));
            }
            for (queued, inserted) in process.iter().zip(&inserted) {
                if queued.seq > after && wanted(queued) {
                    let rows = queued.batch.events.iter().zip(inserted);
                    let rows = rows.filter(|(_, inserted)| **inserted).map(|(row, _)| row);
                    items.push(ToDeliver::of(&queued.batch, rows));
                }
            }
            let jobs = tasks::delivery_jobs(&catalog, &items)?;
            if !jobs.is_empty() {
                queue.enqueue_marking(jobs, Some(last))?;
            }
            Ok::<_, StepError>(())
        })
        .await?
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
