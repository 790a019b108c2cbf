//! Schedules: `run-every-minute`, `run-every-hour` and `run-every-day` of every enabled plugin
//! config that exports them, each slot run as its own job.
//!
//! Owns: which slots are due. Slots are aligned to UTC; a schedule's state (the last slot handed
//! to a job, and that job) lives in redb and changes in the same transaction that enqueues the
//! slot's job, so a slot is queued once even across a crash. After downtime every missed hourly
//! and daily slot runs once, oldest first, up to a cap; missed minute slots coalesce into one
//! run. A slot is not queued while the previous slot's job may still run (no overlap).
//! Must never: run a plugin's code (the job queue does), or read the wall clock itself: the time
//! comes from the caller, so tests drive it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::jobs::JobQueue;
use crate::pipeline::DrainSignal;
use crate::store::{Cadence, JobKind, NewJob, PluginConfigId, ScheduleState, Store, StoreError};

/// Missed hourly slots run after downtime, at most this many (the most recent ones).
pub const CATCH_UP_HOURS: i64 = 24;
/// Missed daily slots run after downtime, at most this many.
pub const CATCH_UP_DAYS: i64 = 7;
/// Attempts of one slot's run.
pub const SLOT_ATTEMPTS: u32 = 3;
/// How often due slots are looked for without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// The start (unix seconds) of the slot of `cadence` that contains `now_s`.
pub fn slot_of(cadence: Cadence, now_s: i64) -> i64 {
    now_s.div_euclid(cadence.seconds()) * cadence.seconds()
}

/// The slot to queue next for a schedule whose last queued slot is `last`, or `None` if it is
/// up to date.
pub fn next_slot(cadence: Cadence, last: Option<i64>, now_s: i64) -> Option<i64> {
    let current = slot_of(cadence, now_s);
    let step = cadence.seconds();
    let Some(last) = last else {
        // A new schedule runs its current slot at once.
        return Some(current);
    };
    if last >= current {
        return None;
    }
    match cadence {
        // Missed minutes are not worth replaying one by one: one run stands for all of them.
        Cadence::Minute => Some(current),
        Cadence::Hour => Some((last + step).max(current - (CATCH_UP_HOURS - 1) * step)),
        Cadence::Day => Some((last + step).max(current - (CATCH_UP_DAYS - 1) * step)),
    }
}

/// Brings the stored schedules in line with `wanted` (the enabled configs' cadences) and queues
/// each schedule's next due slot, at `now_ms`. Returns the jobs queued.
pub fn tick(
    store: &Store,
    wanted: &[(PluginConfigId, Cadence)],
    now_ms: i64,
    timeout_ms: u64,
) -> Result<Vec<(PluginConfigId, Cadence, i64)>, StoreError> {
    let now_s = now_ms.div_euclid(1000);
    store.update_schedules(now_ms, |tables| {
        let mut queued = Vec::new();
        let existing = tables.all()?;
        for ((config, cadence), _) in &existing {
            if !wanted.contains(&(*config, *cadence)) {
                tables.remove(*config, *cadence)?;
            }
        }
        for &(config, cadence) in wanted {
            let state = existing
                .iter()
                .find(|(key, _)| *key == (config, cadence))
                .map(|(_, s)| *s);
            if let Some(job) = state.and_then(|s| s.job) {
                if tables.jobs.is_live(job)? {
                    continue;
                }
            }
            let Some(slot) = next_slot(cadence, state.map(|s| s.last_slot), now_s) else {
                continue;
            };
            let job = tables.jobs.insert(
                NewJob {
                    id: uuid::Uuid::now_v7(),
                    kind: JobKind::Schedule {
                        config,
                        cadence,
                        slot,
                    },
                    payload: "null".into(),
                    run_at_ms: now_ms,
                    max_attempts: SLOT_ATTEMPTS,
                    timeout_ms,
                    idempotency_key: None,
                    after: Vec::new(),
                },
                0,
            )?;
            tables.set(
                config,
                cadence,
                &ScheduleState {
                    last_slot: slot,
                    job: Some(job),
                },
            )?;
            queued.push((config, cadence, slot));
        }
        Ok(queued)
    })
}

/// Which (plugin config, cadence) pairs should have a schedule now.
pub trait ScheduleSource: Send + Sync + 'static {
    /// An error leaves every schedule as it is until the next tick.
    fn wanted(&self) -> Result<Vec<(PluginConfigId, Cadence)>, String>;
}

/// Queues due slots every second, and at once when a schedule's job ends.
pub struct Scheduler {
    pub queue: JobQueue,
    pub source: Arc<dyn ScheduleSource>,
    pub timeout: Duration,
    /// Notified by the workers when a schedule's job ends.
    pub job_done: Arc<Notify>,
}

impl Scheduler {
    pub async fn run(self, mut drain: DrainSignal) {
        loop {
            if drain.borrow().is_some() {
                return;
            }
            let source = self.source.clone();
            let store = self.queue.store().clone();
            let timeout_ms = self.timeout.as_millis() as u64;
            let result = tokio::task::spawn_blocking(move || {
                let wanted = source.wanted().map_err(StoreError::Conflict)?;
                tick(&store, &wanted, crate::jobs::now_ms(), timeout_ms)
            })
            .await;
            match result {
                Ok(Ok(queued)) if !queued.is_empty() => {
                    for (config, cadence, slot) in &queued {
                        tracing::debug!(
                            config,
                            cadence = cadence.name(),
                            slot,
                            "schedule slot queued"
                        );
                    }
                    self.queue.wake();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot queue scheduled runs; retrying"),
                Err(e) => tracing::error!(error = %e, "the scheduler's task failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.job_done.notified() => {}
                _ = drain.changed() => {}
            }
        }
    }
}
